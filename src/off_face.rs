//! Which pixels of a photo show something other than the face beside and below the jaw: a
//! collar, the backdrop, clothing. The fitted jaw's edge often projects onto them (the mesh's
//! outline strays a little past the face's, and the photo sees the jaw's sides at grazing
//! angles), and views of the head from elsewhere than the photo's camera showed them as white or
//! coloured streaks down the jaw and the neck; those texels are left to the fill instead.

use image::RgbImage;
use rayon::prelude::*;

use crate::atlas::{bounds, inside, pixels_inside};

/// How many robust standard deviations of the cheeks' colours a pixel's colour may lie from
/// their median (or from the hair's colour) and still count as the face's.
const SKIN_DEVIATIONS: f32 = 3.0;

/// The least spread a colour channel is given: a flat or black-and-white photo's cheeks vary by
/// little more than noise.
const MIN_SPREAD: f32 = 0.02;

/// A skin colour this much darker (brightness ratio) than the cheeks' still counts as skin in
/// shadow (under the jaw, on a turned face's far side).
const DARKEST_SHADOW: f32 = 0.4;

/// The radius of the majority vote that smooths the mask, as a fraction of the face's width:
/// single pixels of noise, or of skin between a collar's threads, neither cut holes nor leave
/// specks.
const SMOOTHING: f32 = 0.015;

/// The pixels of `photo` off the face: below the line between the jaw line's ends (iBUG 0 and
/// 16 of the `detected` 68 landmarks, beside the eyes), outside the jaw line (iBUG 0–16), and
/// neither of the cheeks' skin colour (lit as brightly or less) nor of the `hair`'s colour
/// (hair falling beside the jaw is the person's too). `None` without 68 landmarks or cheeks to
/// measure the skin's colour on.
pub(crate) fn off_face_mask(
    photo: &RgbImage,
    detected: &[[f32; 2]],
    hair: Option<[f32; 3]>,
) -> Option<OffFaceMask> {
    if detected.len() != 68 {
        return None;
    }
    let jaw = &detected[..17];
    let (left, right, chin) = (jaw[0], jaw[16], jaw[8]);
    let across = [right[0] - left[0], right[1] - left[1]];
    let face_width = across[0].hypot(across[1]);
    // Also false for NaN landmarks.
    if face_width.partial_cmp(&1.0) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    // Downwards: perpendicular to the jaw's ends, towards the chin.
    let mut down = [-across[1] / face_width, across[0] / face_width];
    if (chin[0] - left[0]) * down[0] + (chin[1] - left[1]) * down[1] < 0.0 {
        down = [-down[0], -down[1]];
    }
    let skin = Colours::of_cheeks(photo, detected)?;
    let hair = hair.map(Colours::opponent_of);
    // The jaw line's box widened by the face's width on every side: the fitted head's jaw and
    // neck do not reach farther, and a large photo's other pixels need no test.
    let ([x0, y0], [x1, y1]) = bounds(jaw);
    let clamp = |v: f32, end: u32| (v.max(0.0) as usize).min(end as usize);
    let (left_edge, right_edge) = (
        clamp(x0 - face_width, photo.width()),
        clamp(x1 + face_width + 1.0, photo.width()),
    );
    let (top, bottom) = (
        clamp(y0 - face_width, photo.height()),
        clamp(y1 + face_width + 1.0, photo.height()),
    );
    let (width, height) = (right_edge - left_edge, bottom - top);
    let mut candidates = vec![0u8; width * height];
    candidates
        .par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(row, pixels)| {
            let y = top + row;
            for (column, off) in pixels.iter_mut().enumerate() {
                let x = left_edge + column;
                let p = [x as f32, y as f32];
                let below = (p[0] - left[0]) * down[0] + (p[1] - left[1]) * down[1];
                if below <= 0.0 || inside(jaw, p) {
                    continue;
                }
                let colour = opponent(photo.get_pixel(x as u32, y as u32).0);
                let face = skin.holds_in_shadow(colour)
                    || hair.is_some_and(|hair| skin.near(hair, colour));
                *off = u8::from(!face);
            }
        });
    let radius = ((SMOOTHING * face_width).round() as usize).max(1);
    Some(OffFaceMask {
        left: left_edge,
        top,
        width,
        off: majority(&candidates, width, height, radius),
    })
}

/// [`off_face_mask`]'s pixels, within a box of the photo.
pub(crate) struct OffFaceMask {
    left: usize,
    top: usize,
    width: usize,
    /// Row-major over the box.
    off: Vec<bool>,
}

impl OffFaceMask {
    /// Whether the photo's pixel in `column` and `row` is off the face.
    pub fn contains(&self, column: usize, row: usize) -> bool {
        let (Some(x), Some(y)) = (column.checked_sub(self.left), row.checked_sub(self.top)) else {
            return false;
        };
        x < self.width && self.off.get(y * self.width + x).copied().unwrap_or(false)
    }
}

/// Per pixel, whether more than half of the `(2·radius + 1)²` window around it (shrunk at the
/// image's borders) is set in `mask` (0 or 1 per pixel), through a summed-area table.
fn majority(mask: &[u8], width: usize, height: usize, radius: usize) -> Vec<bool> {
    let stride = width + 1;
    let mut sums = vec![0u32; stride * (height + 1)];
    for y in 0..height {
        let mut row = 0u32;
        for x in 0..width {
            row += u32::from(mask[y * width + x]);
            sums[(y + 1) * stride + x + 1] = sums[y * stride + x + 1] + row;
        }
    }
    let mut out = vec![false; width * height];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(y, row)| {
            let (y0, y1) = (y.saturating_sub(radius), (y + radius + 1).min(height));
            for (x, out) in row.iter_mut().enumerate() {
                let (x0, x1) = (x.saturating_sub(radius), (x + radius + 1).min(width));
                let set = sums[y1 * stride + x1] + sums[y0 * stride + x0]
                    - sums[y0 * stride + x1]
                    - sums[y1 * stride + x0];
                *out = 2 * set as usize > (y1 - y0) * (x1 - x0);
            }
        });
    out
}

/// A colour's median and robust spread per opponent channel ([`Colours::opponent_of`]).
struct Colours {
    median: [f32; 3],
    spread: [f32; 3],
}

impl Colours {
    /// Measured inside the cheeks, between the jaw, the nose, the mouth's corner and the lower
    /// eyelid; `None` where they cover fewer than 16 pixels.
    fn of_cheeks(photo: &RgbImage, detected: &[[f32; 2]]) -> Option<Self> {
        let cheeks = [
            [1, 2, 3, 4, 48, 31, 40, 41, 36],
            [15, 14, 13, 12, 54, 35, 47, 46, 45],
        ];
        let mut samples: [Vec<f32>; 3] = Default::default();
        for cheek in cheeks {
            let outline = cheek.map(|i| detected[i]);
            for (x, y) in pixels_inside(photo, &outline) {
                let colour = opponent(photo.get_pixel(x, y).0);
                for (samples, value) in samples.iter_mut().zip(colour) {
                    samples.push(value);
                }
            }
        }
        if samples[0].len() < 16 {
            return None;
        }
        let median = |values: &mut Vec<f32>| {
            let middle = values.len() / 2;
            *values.select_nth_unstable_by(middle, f32::total_cmp).1
        };
        let (mut medians, mut spread) = ([0.0; 3], [0.0; 3]);
        for (c, values) in samples.iter_mut().enumerate() {
            medians[c] = median(values);
            let mut deviations: Vec<f32> = values.iter().map(|v| (v - medians[c]).abs()).collect();
            // The median absolute deviation of a normal distribution is 0.6745 σ.
            spread[c] = (median(&mut deviations) / 0.6745).max(MIN_SPREAD);
        }
        Some(Colours {
            median: medians,
            spread,
        })
    }

    /// The opponent channels of an RGB colour in `[0, 1]`: brightness, red–green and
    /// yellow–blue.
    fn opponent_of([r, g, b]: [f32; 3]) -> [f32; 3] {
        [(r + g + b) / 3.0, r - g, (r + g) / 2.0 - b]
    }

    /// Whether `colour` (opponent channels) could be this colour lit as brightly or less (down
    /// to [`DARKEST_SHADOW`] of its brightness): a darker colour's hue is compared as if it
    /// were lit as brightly (shade scales all three of its channels), a brighter one's as it is.
    fn holds_in_shadow(&self, colour: [f32; 3]) -> bool {
        let [brightness, red_green, yellow_blue] = colour;
        if brightness < DARKEST_SHADOW * self.median[0] {
            return false;
        }
        let lit = (self.median[0] / brightness).max(1.0);
        let deviation = |c: usize, value: f32| (value - self.median[c]) / self.spread[c];
        deviation(0, brightness) <= SKIN_DEVIATIONS
            && deviation(1, lit * red_green).abs() <= SKIN_DEVIATIONS
            && deviation(2, lit * yellow_blue).abs() <= SKIN_DEVIATIONS
    }

    /// Whether `colour` lies within this colour's spread of `reference` (both opponent
    /// channels), brighter or darker.
    fn near(&self, reference: [f32; 3], colour: [f32; 3]) -> bool {
        (0..3).all(|c| (colour[c] - reference[c]).abs() <= SKIN_DEVIATIONS * self.spread[c])
    }
}

/// [`Colours::opponent_of`] an 8-bit colour.
fn opponent(rgb: [u8; 3]) -> [f32; 3] {
    Colours::opponent_of(rgb.map(|v| f32::from(v) / 255.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKIN: [u8; 3] = [200, 150, 120];
    const BACKDROP: [u8; 3] = [200, 200, 205];
    const COLLAR: [u8; 3] = [245, 245, 245];
    const HAIR: [u8; 3] = [90, 60, 40];

    /// 68 landmarks of a face whose jaw line is the lower half of an ellipse around
    /// (100, 100), 100 px wide and 140 px high; the points the mask does not read sit at the
    /// centre.
    fn landmarks() -> Vec<[f32; 2]> {
        let mut points = vec![[100.0, 100.0]; 68];
        for (i, point) in points.iter_mut().take(17).enumerate() {
            let angle = std::f32::consts::PI * (1.0 - i as f32 / 16.0);
            *point = [100.0 + 50.0 * angle.cos(), 100.0 + 70.0 * angle.sin()];
        }
        for (i, p) in [
            (31, [92.0, 120.0]),
            (35, [108.0, 120.0]),
            (48, [85.0, 140.0]),
            (54, [115.0, 140.0]),
            (36, [65.0, 88.0]),
            (40, [80.0, 90.0]),
            (41, [72.0, 90.0]),
            (45, [135.0, 88.0]),
            (46, [128.0, 90.0]),
            (47, [120.0, 90.0]),
        ] {
            points[i] = p;
        }
        points
    }

    /// A face of `SKIN` on a backdrop, a neck in the jaw's shadow, a white collar on either
    /// side of the neck's middle, a strand of hair beside the left jaw and one backdrop-coloured
    /// pixel on the neck.
    fn photo() -> RgbImage {
        let mut photo = RgbImage::from_pixel(200, 240, image::Rgb(BACKDROP));
        for (x, y, pixel) in photo.enumerate_pixels_mut() {
            let (dx, dy) = ((x as f32 - 100.0) / 50.0, (y as f32 - 100.0) / 70.0);
            let colour = if dx * dx + dy * dy <= 1.0 {
                SKIN
            } else if (75..125).contains(&x) && y >= 150 {
                if y >= 200 && !(85..115).contains(&x) {
                    COLLAR
                } else {
                    SKIN.map(|v| (f32::from(v) * 0.6) as u8)
                }
            } else if (40..50).contains(&x) && (100..200).contains(&y) {
                HAIR
            } else {
                continue;
            };
            *pixel = image::Rgb(colour);
        }
        photo.put_pixel(100, 180, image::Rgb(BACKDROP));
        photo
    }

    #[test]
    fn collar_and_backdrop_beside_the_jaw_are_off_the_face_but_neck_and_hair_are_not() {
        let (photo, landmarks) = (photo(), landmarks());
        let hair = HAIR.map(|v| f32::from(v) / 255.0);
        let mask = off_face_mask(&photo, &landmarks, Some(hair)).unwrap();
        let off = |x: usize, y: usize| mask.contains(x, y);
        assert!(off(80, 220), "the collar");
        assert!(off(170, 150), "the backdrop beside the jaw");
        assert!(!off(170, 60), "the backdrop above the jaw line's ends");
        assert!(!off(100, 130), "the face");
        assert!(!off(100, 210), "the neck in shadow");
        assert!(
            !off(100, 180),
            "a lone pixel of backdrop colour on the neck"
        );
        assert!(!off(45, 150), "hair beside the jaw");
        let without_hair = off_face_mask(&photo, &landmarks, None).unwrap();
        assert!(without_hair.contains(45, 150), "a strand of unknown colour");
        assert!(!mask.contains(500, 500), "beyond the photo");
    }

    #[test]
    fn without_68_sound_landmarks_or_cheeks_there_is_no_mask() {
        let photo = photo();
        assert!(off_face_mask(&photo, &landmarks()[..67], None).is_none());
        let collapsed = vec![[100.0, 100.0]; 68];
        assert!(off_face_mask(&photo, &collapsed, None).is_none());
        let lost = vec![[f32::NAN; 2]; 68];
        assert!(off_face_mask(&photo, &lost, None).is_none());
    }
}
