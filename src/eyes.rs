//! The eyeballs' texture: each eyeball's front seen head-on, painted as an eye (a pupil, an
//! iris darkening towards its rim, the sclera) in the photo's eye colours and, where the photo
//! saw the eyeball between its lids, the photo's own pixels (the iris's pattern, catchlights,
//! the lids' shadow on the sclera). Drawn flat in solid colours, the eyes of the frontal render
//! were polygons of one colour each, its most artificial feature.

use candle_core::Tensor;
use ganfit_morphable::MorphableModel;
use ganfit_optim::{FitParams, Projection, UvLayout, UvTexture, project_photo_onto};
use image::RgbImage;
use nalgebra::Vector3;

use crate::atlas::{EyeColours, inside};

/// The model's eyeball vertex sets, in the order of their squares in an [`EyeTexture`].
const EYEBALLS: [&str; 2] = ["eyeball_left", "eyeball_right"];

/// Iris and pupil radii over the eyeball's: the sines of 30° and 11°, the angles from the
/// eyeball's forward axis within which ICT's eyeball mesh models them.
const IRIS_RADIUS: f32 = 0.5;
const PUPIL_RADIUS: f32 = 0.19;

/// The share of its square's side an eyeball's front spans (the rest keeps the renderer's
/// bilinear lookups off the neighbouring square).
const DISC_SPAN: f32 = 0.96;

/// How far, as a fraction of a square's side, the photo's pixels fade into the painted eye
/// from the edge of what the photo saw: about a photo pixel for an eye 30 pixels wide.
const PHOTO_FADE: f32 = 0.03;

/// An iris is looked for only where the photo saw at least this many texels of an eyeball
/// (sampled on a grid of at most 128 × 128 per square) and this many of them darker than
/// midway between the iris's and the sclera's colours.
const MIN_SEEN_SAMPLES: usize = 40;
const MIN_DARK_SAMPLES: usize = 10;

/// The difference in luma between sclera and iris from which the painted pupil is black.
const FULL_CONTRAST: f32 = 0.3;

/// How far each eye outline is drawn in towards its centre before the photo's pixels inside it
/// are measured ([`EyeColours::measure`]) or taken for the eyeball: the lids' rims, lashes and
/// liner are darker than any iris.
const EYE_OUTLINE_INSET: f32 = 0.2;

/// How far beside the eyeball's forward axis (in eyeball radii) an iris is looked for.
const MAX_GAZE: f32 = 0.3;

/// Where each eyeball vertex lies on an [`EyeTexture`].
#[derive(Debug, Clone)]
pub(crate) struct EyeLayout {
    /// The eyeballs' triangles.
    pub triangles: Vec<[u32; 3]>,
    /// Per model vertex, its place `(x, y)` on the texture: `x` across both squares, `y`
    /// downwards, both in `[0, 1]`; `[0, 0]` for vertices off the eyeballs.
    pub places: Vec<[f32; 2]>,
    /// Whether each model vertex is an eyeball's.
    pub on_eyeball: Vec<bool>,
}

impl EyeLayout {
    /// The layout of `model`'s eyeballs (mean shape `mean`): each eyeball's front projected
    /// along its forward axis (the model's +z) onto its square, centred on the eyeball's centre
    /// and spanning its radius (both measured on `mean`); the back half, which the lids and
    /// the skull hide, is pressed onto the disc's rim. `None` for a model without eyeballs.
    pub fn new(model: &MorphableModel, mean: &[[f32; 3]]) -> Option<Self> {
        let n = model.n_vertices();
        let mut places = vec![[0.0f32; 2]; n];
        let mut on_eyeball = vec![false; n];
        for (square, name) in EYEBALLS.iter().enumerate() {
            let ids = model.vertex_set(name).unwrap_or(&[]);
            if ids.is_empty() {
                continue;
            }
            let point = |v: u32| Vector3::from(mean[v as usize].map(f64::from));
            let centre = ids.iter().map(|&v| point(v)).sum::<Vector3<f64>>() / ids.len() as f64;
            let radius =
                ids.iter().map(|&v| (point(v) - centre).norm()).sum::<f64>() / ids.len() as f64;
            for &v in ids {
                let d = (point(v) - centre) / radius;
                let (mut a, mut b) = (d.x as f32, d.y as f32);
                let across = a.hypot(b);
                if d.z < 0.0 || across > 1.0 {
                    (a, b) = if across > 0.0 {
                        (a / across, b / across)
                    } else {
                        (1.0, 0.0)
                    };
                }
                places[v as usize] = disc_place(square, a, b);
                on_eyeball[v as usize] = true;
            }
        }
        let triangles: Vec<[u32; 3]> = model
            .triangles()
            .iter()
            .filter(|t| t.iter().all(|&v| on_eyeball[v as usize]))
            .copied()
            .collect();
        (!triangles.is_empty()).then_some(EyeLayout {
            triangles,
            places,
            on_eyeball,
        })
    }
}

/// The texture place `(x, y)` of the point `(a, b)` (eyeball radii, `b` up) of eyeball
/// `square`'s front.
fn disc_place(square: usize, a: f32, b: f32) -> [f32; 2] {
    [
        (square as f32 + 0.5 + 0.5 * DISC_SPAN * a) / 2.0,
        0.5 - 0.5 * DISC_SPAN * b,
    ]
}

/// The eyeballs' texture: two squares side by side, one per eyeball (`eyeball_left` first),
/// each showing its eyeball's front head-on.
#[derive(Debug, Clone, PartialEq)]
pub struct EyeTexture {
    /// Side of each square, texels: the texture is `side` high and `2 · side` wide.
    pub side: usize,
    /// RGB in `[0, 1]`, row-major, `side × 2·side × 3`.
    pub rgb: Vec<f32>,
}

impl EyeTexture {
    /// Eyes painted in `colours`, looking straight ahead.
    pub fn painted(colours: EyeColours, side: usize) -> Self {
        let iris = Iris {
            centre: [0.0; 2],
            colour: colours.iris,
        };
        Self::painted_around(colours.sclera, side, [iris; 2])
    }

    /// Eyes with a `sclera` of this colour and the `irises` of each eyeball.
    fn painted_around(sclera: [f32; 3], side: usize, irises: [Iris; 2]) -> Self {
        let width = 2 * side;
        let mut rgb = vec![0.0f32; side * width * 3];
        for (texel, out) in rgb.chunks_exact_mut(3).enumerate() {
            let (row, column) = (texel / width, texel % width);
            let [a, b] = disc_point(side, row, column);
            out.copy_from_slice(&eye_colour(&irises[column / side], sclera, [a, b]));
        }
        EyeTexture { side, rgb }
    }

    /// What `photo` (`[H, W, 3]` in `[0, 1]`) shows of the eyeballs of the head `vertices`
    /// (`[N, 3]`, posed as in the photo) through `params`' camera, hidden by `occluders` (the
    /// head's triangles), for [`EyeTexture::blended`] (several photos' fused first, as the
    /// skin's are): the photo's colours on a square of
    /// `2 · side` texels whose upper half is an eye texture's layout, taken only inside the
    /// eye outlines of the 68 iBUG `landmarks` (36–41, 42–47), drawn in by
    /// [`EYE_OUTLINE_INSET`]: the fitted lids may open wider than the photo's, and the lids'
    /// rims, lashes and corners would otherwise show inside the eye where the frontal render's
    /// neutral lids open wider still. `None` without those landmarks.
    pub(crate) fn seen_in_photo(
        layout: &EyeLayout,
        occluders: &[[u32; 3]],
        vertices: &Tensor,
        params: &FitParams,
        photo: &Tensor,
        landmarks: &[[f32; 2]],
        side: usize,
    ) -> Result<Option<Projection>, ganfit_optim::OptimError> {
        let Some(outlines) = landmarks.get(36..48) else {
            return Ok(None);
        };
        let [left, right] = [&outlines[..6], &outlines[6..]].map(inset);
        let off_eyes = |column: usize, row: usize| {
            let (left, right) = (left.as_slice(), right.as_slice());
            let pixel = [column as f32, row as f32];
            !inside(left, pixel) && !inside(right, pixel)
        };
        let uvs: Vec<[f32; 2]> = layout
            .places
            .iter()
            .map(|&[x, y]| [x, 1.0 - y / 2.0])
            .collect();
        let projection = project_photo_onto(
            &UvLayout {
                triangles: &layout.triangles,
                uv_triangles: &layout.triangles,
                uvs: &uvs,
                occluders,
            },
            vertices,
            params,
            photo,
            2 * side,
            Some(&off_eyes),
        )?;
        Ok(Some(projection.on_face()))
    }

    /// Eyes painted in `colours` under the texels `seen` saw ([`EyeTexture::seen_in_photo`]
    /// at this `side`), each iris where the photo's appears to be, the photo's texels fading
    /// into the painted ones over [`PHOTO_FADE`].
    pub(crate) fn blended(seen: &UvTexture, colours: EyeColours, side: usize) -> Self {
        let irises = [0, 1].map(|square| photo_iris(seen, colours, side, square));
        let mut eyes = Self::painted_around(colours.sclera, side, irises);
        let radius = ((PHOTO_FADE * side as f32).round() as usize).max(1);
        let weights = seen.observed_interior(radius);
        let texels = side * 2 * side;
        for ((out, photo), &weight) in eyes
            .rgb
            .chunks_exact_mut(3)
            .zip(seen.rgb[..texels * 3].chunks_exact(3))
            .zip(&weights[..texels])
        {
            for (value, &from_photo) in out.iter_mut().zip(photo) {
                *value += weight * (from_photo - *value);
            }
        }
        eyes
    }

    /// This texture as an 8-bit image.
    pub fn to_image(&self) -> RgbImage {
        let bytes = self
            .rgb
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        RgbImage::from_raw(2 * self.side as u32, self.side as u32, bytes)
            .expect("side × 2·side × 3 values")
    }

    /// An 8-bit image twice as wide as high (as [`EyeTexture::to_image`] writes) as a
    /// texture; `None` for other proportions.
    pub fn from_image(image: &RgbImage) -> Option<Self> {
        let (width, height) = image.dimensions();
        (width == 2 * height && height > 0).then(|| EyeTexture {
            side: height as usize,
            rgb: image
                .as_raw()
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect(),
        })
    }
}

/// `outline` drawn in towards its centre by [`EYE_OUTLINE_INSET`].
pub(crate) fn inset(outline: &[[f32; 2]]) -> Vec<[f32; 2]> {
    let n = outline.len() as f32;
    let centre = outline
        .iter()
        .fold([0.0, 0.0], |c, p| [c[0] + p[0] / n, c[1] + p[1] / n]);
    let keep = 1.0 - EYE_OUTLINE_INSET;
    outline
        .iter()
        .map(|p| [0, 1].map(|i| centre[i] + keep * (p[i] - centre[i])))
        .collect()
}

/// The eyeball point `(a, b)` (radii from its forward axis, `b` up) at a texel of a texture
/// whose squares are `side` texels.
fn disc_point(side: usize, row: usize, column: usize) -> [f32; 2] {
    let square = column / side;
    let x = (column as f32 + 0.5) / (2 * side) as f32;
    let y = (row as f32 + 0.5) / side as f32;
    [
        (2.0 * x - square as f32 - 0.5) / (0.5 * DISC_SPAN),
        (0.5 - y) / (0.5 * DISC_SPAN),
    ]
}

/// A painted iris: where it is on its eyeball (eyeball radii from the forward axis, `b` up)
/// and its colour.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Iris {
    centre: [f32; 2],
    colour: [f32; 3],
}

/// The painted eye's colour at the point `(a, b)` of an eyeball with this `iris` and `sclera`.
fn eye_colour(iris: &Iris, sclera: [f32; 3], [a, b]: [f32; 2]) -> [f32; 3] {
    const BLACK: [f32; 3] = [0.03, 0.03, 0.03];
    // The pupil is as much darker than the iris as the iris is than the sclera, up to black
    // (a faded photo's pale eyes show no black pupils).
    let contrast = ((luma(&sclera) - luma(&iris.colour)) / FULL_CONTRAST).clamp(0.0, 1.0);
    let pupil: [f32; 3] =
        [0, 1, 2].map(|c| iris.colour[c] + contrast * (BLACK[c] - iris.colour[c]));
    let from_iris = (a - iris.centre[0]).hypot(b - iris.centre[1]);
    // The sclera darkens towards the eyeball's edge, which turns away from the light, and the
    // iris towards its rim (the limbal ring); both edges are a few texels soft.
    let sclera = sclera.map(|c| c * (1.0 - 0.2 * a.hypot(b).min(1.0).powi(2)));
    let rim = smoothstep(0.6 * IRIS_RADIUS, IRIS_RADIUS, from_iris);
    let iris = iris.colour.map(|c| c * (1.1 - 0.3 * rim));
    let in_iris = 1.0 - smoothstep(IRIS_RADIUS - 0.02, IRIS_RADIUS + 0.02, from_iris);
    let in_pupil = 1.0 - smoothstep(PUPIL_RADIUS - 0.015, PUPIL_RADIUS + 0.015, from_iris);
    [0, 1, 2].map(|c| {
        let eye = sclera[c] + in_iris * (iris[c] - sclera[c]);
        eye + in_pupil * (pupil[c] - eye)
    })
}

/// 0 at `from`, 1 at `to` (either way round), smooth in between.
pub(crate) fn smoothstep(from: f32, to: f32, x: f32) -> f32 {
    let t = ((x - from) / (to - from)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Rec. 601 luma of an RGB colour.
pub(crate) fn luma(rgb: &[f32]) -> f32 {
    0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
}

/// The iris of the photo's eye on eyeball `square`: the iris-sized disc within [`MAX_GAZE`]
/// beside the forward axis that covers the most seen texels darker than midway between
/// `colours`' iris and sclera and the fewest lighter ones, coloured as the median of the dark
/// texels it covers beyond the pupil. Only sideways: the lids hide the iris's top and bottom
/// (and the upper lid's lashes are as dark as an iris, the lower lid's rim as light as the
/// sclera), so the photo does not tell a raised or lowered gaze well. On the forward axis in
/// `colours`' iris where the photo saw too little of the eyeball or its colours do not tell
/// iris from sclera.
fn photo_iris(seen: &UvTexture, colours: EyeColours, side: usize, square: usize) -> Iris {
    let unseen = Iris {
        centre: [0.0; 2],
        colour: colours.iris,
    };
    let (iris, sclera) = (luma(&colours.iris), luma(&colours.sclera));
    if sclera - iris < 0.1 {
        return unseen;
    }
    let threshold = (iris + sclera) / 2.0;
    let stride = (side / 128).max(1);
    let width = 2 * side;
    // Each sample: its eyeball point, its colour, whether it is dark.
    let mut samples: Vec<([f32; 2], [f32; 3], bool)> = Vec::new();
    for row in (0..side).step_by(stride) {
        for column in (square * side..(square + 1) * side).step_by(stride) {
            let texel = row * width + column;
            if seen.observed[texel] > 0.0 {
                let colour = [0, 1, 2].map(|c| seen.rgb[texel * 3 + c]);
                samples.push((
                    disc_point(side, row, column),
                    colour,
                    luma(&colour) < threshold,
                ));
            }
        }
    }
    let dark = samples.iter().filter(|(_, _, dark)| *dark).count();
    if samples.len() < MIN_SEEN_SAMPLES || dark < MIN_DARK_SAMPLES {
        return unseen;
    }
    const STEPS: i32 = 30;
    let mut best = (i64::MIN, f32::INFINITY);
    for step in -STEPS..=STEPS {
        let beside = step as f32 * MAX_GAZE / STEPS as f32;
        let score: i64 = samples
            .iter()
            .filter(|(p, _, _)| (p[0] - beside).hypot(p[1]) < IRIS_RADIUS)
            .map(|(_, _, dark)| if *dark { 1 } else { -1 })
            .sum();
        // Ties go to the disc nearest the axis.
        if score > best.0 || (score == best.0 && beside.abs() < best.1.abs()) {
            best = (score, beside);
        }
    }
    let centre = [best.1, 0.0];
    let in_iris: Vec<[f32; 3]> = samples
        .iter()
        .filter(|(p, _, dark)| {
            let from_centre = (p[0] - centre[0]).hypot(p[1]);
            *dark && (PUPIL_RADIUS..IRIS_RADIUS).contains(&from_centre)
        })
        .map(|(_, colour, _)| *colour)
        .collect();
    Iris {
        centre,
        colour: if in_iris.len() < MIN_DARK_SAMPLES {
            colours.iris
        } else {
            crate::atlas::channel_medians(&in_iris)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLOURS: EyeColours = EyeColours {
        iris: [0.2, 0.3, 0.6],
        sclera: [0.9, 0.88, 0.85],
    };

    fn at(eyes: &EyeTexture, [a, b]: [f32; 2], square: usize) -> [f32; 3] {
        let [x, y] = disc_place(square, a, b);
        let side = eyes.side;
        let (row, column) = ((y * side as f32) as usize, (x * 2.0 * side as f32) as usize);
        let texel = (row * 2 * side + column) * 3;
        [0, 1, 2].map(|c| eyes.rgb[texel + c])
    }

    #[test]
    fn painted_eyes_have_a_dark_pupil_a_coloured_iris_and_a_white_sclera() {
        let eyes = EyeTexture::painted(COLOURS, 64);
        for square in 0..2 {
            assert!(luma(&at(&eyes, [0.0, 0.0], square)) < 0.05);
            let iris = at(&eyes, [0.33, 0.0], square);
            assert!(iris[2] > iris[0] && luma(&iris) < 0.4, "{iris:?}");
            // The iris darkens towards its rim.
            assert!(luma(&at(&eyes, [0.0, 0.45], square)) < luma(&at(&eyes, [0.0, 0.25], square)));
            let sclera = at(&eyes, [0.7, 0.0], square);
            assert!(luma(&sclera) > 0.7, "{sclera:?}");
        }
    }

    /// A faded photo's pale eyes: the iris barely darker than the sclera, the pupil only as
    /// much darker again (a third of the way to black here), not a black hole.
    #[test]
    fn pale_eyes_get_a_faint_pupil() {
        let pale = EyeColours {
            iris: [0.6, 0.6, 0.6],
            sclera: [0.7, 0.7, 0.7],
        };
        let pupil = luma(&at(&EyeTexture::painted(pale, 64), [0.0, 0.0], 0));
        assert!((pupil - 0.41).abs() < 0.01, "{pupil}");
    }

    #[test]
    fn the_photos_texels_replace_the_painted_ones_inside_what_it_saw() {
        let side = 64;
        // The photo saw a band across the left eyeball's middle; its iris sits to the right of
        // the axis (the person looks aside), its colour a brown unlike `COLOURS`' blue.
        let mut seen = UvTexture {
            size: 2 * side,
            rgb: vec![0.0; 4 * side * side * 3],
            observed: vec![0.0; 4 * side * side],
        };
        let brown = [0.3, 0.2, 0.1];
        for row in 0..side {
            for column in 0..side {
                let [a, b] = disc_point(side, row, column);
                if b.abs() < 0.3 && a.hypot(b) < 1.0 {
                    let texel = row * 2 * side + column;
                    seen.observed[texel] = 1.0;
                    let colour = if (a - 0.2).hypot(b) < IRIS_RADIUS {
                        brown
                    } else {
                        COLOURS.sclera
                    };
                    seen.rgb[texel * 3..][..3].copy_from_slice(&colour);
                }
            }
        }
        let iris = photo_iris(&seen, COLOURS, side, 0);
        assert!((iris.centre[0] - 0.2).abs() < 0.05, "{iris:?}");
        assert_eq!(iris.centre[1], 0.0);
        assert_eq!(iris.colour, brown);
        let unseen = photo_iris(&seen, COLOURS, side, 1);
        assert_eq!((unseen.centre, unseen.colour), ([0.0; 2], COLOURS.iris));
        let eyes = EyeTexture::blended(&seen, COLOURS, side);
        // Seen: the photo's brown iris; its hidden top painted around the photo's centre.
        for seen_iris in [[0.2, 0.0], [0.5, 0.0]].map(|p| at(&eyes, p, 0)) {
            assert!(
                (0..3).all(|c| (seen_iris[c] - brown[c]).abs() < 1e-6),
                "{seen_iris:?}"
            );
        }
        assert!(
            luma(&at(&eyes, [0.2, 0.6], 0)) > 0.7,
            "above the iris: sclera"
        );
        // Painted in the photo's brown, not `COLOURS`' blue.
        let hidden_iris = at(&eyes, [0.2, 0.42], 0);
        assert!(
            hidden_iris[0] > hidden_iris[2] && luma(&hidden_iris) < 0.3,
            "{hidden_iris:?}"
        );
        // The other eye is painted throughout.
        assert_eq!(
            at(&eyes, [0.33, 0.0], 1),
            at(&EyeTexture::painted(COLOURS, side), [0.33, 0.0], 1)
        );
    }

    #[test]
    fn an_eye_texture_survives_its_image() {
        let eyes = EyeTexture::painted(COLOURS, 16);
        let image = eyes.to_image();
        assert_eq!(image.dimensions(), (32, 16));
        let back = EyeTexture::from_image(&image).unwrap();
        assert_eq!(back.side, 16);
        assert!(
            back.rgb
                .iter()
                .zip(&eyes.rgb)
                .all(|(a, b)| (a - b).abs() <= 0.5 / 255.0)
        );
        assert!(EyeTexture::from_image(&RgbImage::new(16, 16)).is_none());
    }
}
