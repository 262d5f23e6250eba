//! The whole head drawn with one texture: the skin's UV map on the left half of an atlas; on
//! the right the eyeballs' texture ([`EyeTexture`]) above a palette of solid colours for the
//! mouth and the head beyond the face's UV tile.
//!
//! ICT lays its UVs out in UDIM tiles: only the face's tile (`u` in `[0, 1]`) is in a UV map;
//! the head, neck and ears beyond it, the teeth and mouth take palette colours.

use candle_core::{Device, Tensor};
use ganfit_morphable::{MorphableModel, TexturedMesh};
use ganfit_render::{RenderError, Triangles};
use image::RgbImage;
use nalgebra::Vector3;

use crate::eyes::{EyeLayout, EyeTexture, inset, luma, smoothstep};

/// What each vertex is coloured as: its palette row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    EyeSocket,
    MouthSocket,
    Gums,
    Teeth,
    Skin,
    /// The head above the eyes beyond the UV map's tile: the hair's place.
    Scalp,
}

const PARTS: usize = 6;

/// Mesh parts that are transparent overlays in the ICT model (shadows, tear film, eyelashes):
/// drawn opaque they would hide the eyes.
const OVERLAY_PARTS: [&str; 8] = [
    "eye_occlusion_left",
    "eye_occlusion_right",
    "lacrimal_fluid_left",
    "lacrimal_fluid_right",
    "eye_blend_left",
    "eye_blend_right",
    "eyelashes_left",
    "eyelashes_right",
];

/// The colours of the eyes' visible parts, RGB in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EyeColours {
    /// The iris.
    pub iris: [f32; 3],
    /// The white of the eye.
    pub sclera: [f32; 3],
}

/// Skin at least this saturated ((largest − smallest channel) / largest) leaves the palette's
/// colours as they are; greyer skin (black-and-white and faded photos) greys them in
/// proportion. The cheeks of the shared colour photos' fits measure 0.2–0.6, of the sepia and
/// black-and-white ones 0–0.15.
const COLOURFUL_SKIN_SATURATION: f32 = 0.2;

/// Pixels both eye openings must hold together for [`EyeColours::measure`] to trust them.
const MIN_EYE_PIXELS: usize = 16;

/// Eyes whose [`opening`] is below this are taken as closed (open eyes measure about 0.25–0.35,
/// closed ones below 0.1): between their lids there is only lash and skin.
const MIN_EYE_OPENING: f32 = 0.15;

impl EyeColours {
    /// Brown irises and an off-white sclera: for eyes whose colour is not known.
    pub const DEFAULT: EyeColours = EyeColours {
        iris: [0.25, 0.14, 0.07],
        sclera: [0.86, 0.83, 0.8],
    };

    /// The colours inside the eye openings that the iBUG points 36–41 and 42–47 of `landmarks`
    /// outline in `photo`: the iris is the per-channel median of the darkest 40 % of those
    /// pixels (by luma; the pupil and the iris), the sclera that of the brightest 20 %. The
    /// photo's own light is in them, as it is in the UV texture unwrapped from the same photo.
    /// [`EyeColours::DEFAULT`] where both eyes are closed, the openings hold too few pixels (a
    /// tiny face) or the landmarks are missing.
    pub fn measure(photo: &RgbImage, landmarks: &[[f32; 2]]) -> EyeColours {
        let Some(outlines) = landmarks.get(36..48) else {
            return EyeColours::DEFAULT;
        };
        let mut pixels: Vec<(f32, [f32; 3])> = Vec::new();
        for outline in outlines.chunks_exact(6) {
            let opening = opening(outline);
            if opening.is_nan() || opening < MIN_EYE_OPENING {
                continue;
            }
            for (x, y) in pixels_inside(photo, &inset(outline)) {
                let rgb = photo.get_pixel(x, y).0.map(|v| f32::from(v) / 255.0);
                pixels.push((luma(&rgb), rgb));
            }
        }
        if pixels.len() < MIN_EYE_PIXELS {
            return EyeColours::DEFAULT;
        }
        pixels.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = pixels.len();
        let colours = |pixels: &[(f32, [f32; 3])]| -> Vec<[f32; 3]> {
            pixels.iter().map(|&(_, rgb)| rgb).collect()
        };
        EyeColours {
            iris: channel_medians(&colours(&pixels[..n * 2 / 5])),
            sclera: channel_medians(&colours(&pixels[n * 4 / 5..])),
        }
    }
}

impl EyeColours {
    /// These colours with as little colour as `skin` has: a black-and-white or faded photo's
    /// painted eyes are as grey as its skin (their saturation scaled by the skin's over 0.2,
    /// at most 1; their luma kept).
    pub fn toned_like(self, skin: [f32; 3]) -> EyeColours {
        let tone = toned_like(skin);
        EyeColours {
            iris: tone(self.iris),
            sclera: tone(self.sclera),
        }
    }
}

/// A black-and-white or faded photo's skin has little colour, and colours drawn beside it
/// (the mouth, the eye corners, default eyes) should have as little: a colour's saturation
/// scaled by the skin's over [`COLOURFUL_SKIN_SATURATION`] (at most 1), its luma kept.
fn toned_like(skin: [f32; 3]) -> impl Fn([f32; 3]) -> [f32; 3] {
    let (lightest, darkest) = skin
        .iter()
        .fold((0.0f32, 1.0f32), |(hi, lo), &v| (hi.max(v), lo.min(v)));
    let skin_saturation = if lightest > 0.0 {
        (lightest - darkest) / lightest
    } else {
        0.0
    };
    let saturation = (skin_saturation / COLOURFUL_SKIN_SATURATION).clamp(0.0, 1.0);
    move |colour: [f32; 3]| {
        let luma = luma(&colour);
        colour.map(|v| luma + saturation * (v - luma))
    }
}

/// The eye's height over its width from its six iBUG points (corner, two upper-lid points,
/// corner, two lower-lid points): the "eye aspect ratio" of blink detection.
fn opening(outline: &[[f32; 2]]) -> f32 {
    let distance =
        |a: usize, b: usize| (outline[a][0] - outline[b][0]).hypot(outline[a][1] - outline[b][1]);
    (distance(1, 5) + distance(2, 4)) / (2.0 * distance(0, 3))
}

/// The smallest and the largest coordinates of `points`: `([x, y], [x, y])`.
pub(crate) fn bounds(points: &[[f32; 2]]) -> ([f32; 2], [f32; 2]) {
    points.iter().fold(
        ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]),
        |(lo, hi), p| {
            (
                [lo[0].min(p[0]), lo[1].min(p[1])],
                [hi[0].max(p[0]), hi[1].max(p[1])],
            )
        },
    )
}

/// The pixels of `photo` (column, row) inside the polygon `outline` (pixel coordinates, a
/// pixel's centre at integers).
pub(crate) fn pixels_inside<'a>(
    photo: &RgbImage,
    outline: &'a [[f32; 2]],
) -> impl Iterator<Item = (u32, u32)> + 'a {
    let (lo, hi) = bounds(outline);
    let columns = lo[0].max(0.0).floor() as u32..(hi[0].ceil().max(0.0) as u32).min(photo.width());
    let rows = lo[1].max(0.0).floor() as u32..(hi[1].ceil().max(0.0) as u32).min(photo.height());
    rows.flat_map(move |y| columns.clone().map(move |x| (x, y)))
        .filter(|&(x, y)| inside(outline, [x as f32, y as f32]))
}

/// Whether `point` lies inside the polygon `outline` (even–odd rule).
pub(crate) fn inside(outline: &[[f32; 2]], point: [f32; 2]) -> bool {
    let mut crossings = false;
    for (i, a) in outline.iter().enumerate() {
        let b = outline[(i + 1) % outline.len()];
        if (a[1] > point[1]) != (b[1] > point[1])
            && point[0] < a[0] + (point[1] - a[1]) / (b[1] - a[1]) * (b[0] - a[0])
        {
            crossings = !crossings;
        }
    }
    crossings
}

/// The per-channel median of `colours`.
pub(crate) fn channel_medians(colours: &[[f32; 3]]) -> [f32; 3] {
    [0, 1, 2].map(|c| {
        let mut values: Vec<f32> = colours.iter().map(|p| p[c]).collect();
        let middle = values.len() / 2;
        *values.select_nth_unstable_by(middle, f32::total_cmp).1
    })
}

/// A triangle's mesh corners and its UV corners.
type Corners = ([u32; 3], [u32; 3]);

/// The head's triangles and their atlas coordinates.
#[derive(Debug, Clone)]
pub(crate) struct HeadLayout {
    /// Every triangle but the overlays.
    pub triangles: Triangles,
    /// Their atlas triangles: into the model's UVs, or into one palette entry per vertex.
    pub uv_triangles: Triangles,
    /// The same, but the neck below the chin in the palette's skin colour too: for views of
    /// a fitted face from elsewhere than the photo's camera, where the neck's texels would
    /// show the photo's collar and tie more often than skin. Drawn with a
    /// [`HeadLayout::bare_neck_atlas`].
    pub uv_triangles_bare_neck: Triangles,
    /// The textured triangles where the UV map fades into the palette's colours (UV
    /// triangles): below the chin into the skin's, and along the UV map's border with the rest
    /// of the head into the skin's or, on the scalp, the hair's; and each UV vertex's shares of
    /// skin and hair `[1, UV vertices, 2]`.
    palette_band: (Triangles, Tensor),
    /// The skin triangles inside the UV map's tile (no eyes, teeth, mouth interior, nor the
    /// head and neck beyond the tile) and their atlas triangles: for renders laid onto the
    /// photo, which shows its own eyes, teeth and hair through the gaps. (Flat palette colour
    /// over hair and collar moved dlib's descriptor of the astronaut from 0.07 to 0.33.)
    pub textured_skin: (Triangles, Triangles),
    /// Atlas coordinates `[Vt + V, 2]` (row 0 of the atlas at `v = 0`).
    pub uv: Tensor,
    /// Where the eyeballs lie on their texture, for a model that has them.
    pub eyes: Option<EyeLayout>,
}

impl HeadLayout {
    /// The layout of `model`, whose mean shape is `mean` (one row per vertex).
    pub fn new(model: &MorphableModel, mean: &[[f32; 3]]) -> Result<Self, RenderError> {
        let n = model.n_vertices();
        let parts = vertex_parts(model, mean);
        let hidden: std::collections::HashSet<u32> = OVERLAY_PARTS
            .iter()
            .filter_map(|name| model.vertex_set(name).ok())
            .flatten()
            .copied()
            .collect();
        let skin: std::collections::HashSet<[u32; 3]> =
            ganfit_optim::skin_triangles(model).0.into_iter().collect();
        let uv_count = model.uvs().len() as u32;
        let (triangles, textured): (Vec<Corners>, Vec<bool>) = model
            .triangles()
            .iter()
            .zip(model.uv_triangles())
            .filter(|(tri, _)| !tri.iter().any(|v| hidden.contains(v)))
            .map(|(tri, uv_tri)| {
                let in_first_tile = uv_tri
                    .iter()
                    .all(|&t| (0.0..=1.0).contains(&model.uvs()[t as usize][0]));
                ((*tri, *uv_tri), skin.contains(tri) && in_first_tile)
            })
            .unzip();
        let shares = palette_shares(mean, &parts, &triangles, &textured, model);
        let (mut uv_triangles, mut uv_triangles_bare_neck) = (Vec::new(), Vec::new());
        let (mut skin_triangles, mut skin_uv_triangles) = (Vec::new(), Vec::new());
        let mut band_uv_triangles = Vec::new();
        let mut band_shares = vec![[0.0f32; 2]; uv_count as usize];
        for (&(tri, uv_tri), &textured) in triangles.iter().zip(&textured) {
            let palette = tri.map(|v| uv_count + v);
            uv_triangles.push(if textured { uv_tri } else { palette });
            let bare = tri.iter().all(|&v| shares.neck[v as usize] >= 1.0);
            uv_triangles_bare_neck.push(if textured && !bare { uv_tri } else { palette });
            if textured && tri.iter().any(|&v| shares.of(v) != [0.0; 2]) {
                band_uv_triangles.push(uv_tri);
                for (&v, &t) in tri.iter().zip(&uv_tri) {
                    band_shares[t as usize] = shares.of(v);
                }
            }
            if textured {
                skin_triangles.push(tri);
                skin_uv_triangles.push(uv_tri);
            }
        }
        let mut uv: Vec<f32> = model
            .uvs()
            .iter()
            .flat_map(|&[u, v]| [0.5 * u, 1.0 - v])
            .collect();
        let eyes = EyeLayout::new(model, mean);
        for (v, part) in parts.iter().enumerate() {
            uv.extend(match &eyes {
                Some(eyes) if eyes.on_eyeball[v] => {
                    let [x, y] = eyes.places[v];
                    [0.5 + 0.5 * x, 0.5 * y]
                }
                _ => [
                    0.75,
                    0.5 + (*part as usize as f32 + 0.5) / (2 * PARTS) as f32,
                ],
            });
        }
        let atlas_vertices = model.uvs().len() + n;
        Ok(HeadLayout {
            triangles: Triangles::new(triangles.iter().map(|(tri, _)| *tri).collect(), n)?,
            uv_triangles: Triangles::new(uv_triangles, atlas_vertices)?,
            uv_triangles_bare_neck: Triangles::new(uv_triangles_bare_neck, atlas_vertices)?,
            palette_band: (
                Triangles::new(band_uv_triangles, uv_count as usize)?,
                Tensor::from_iter(band_shares.into_iter().flatten(), &Device::Cpu)?.reshape((
                    1,
                    uv_count as usize,
                    2,
                ))?,
            ),
            textured_skin: (
                Triangles::new(skin_triangles, n)?,
                Triangles::new(skin_uv_triangles, atlas_vertices)?,
            ),
            uv: Tensor::from_vec(uv, (atlas_vertices, 2), &Device::Cpu)?,
            eyes,
        })
    }

    /// The head drawn with a [bare neck](HeadLayout::uv_triangles_bare_neck), ready to
    /// export: `vertices` (`[N, 3]`, all of `model`'s, so vertex indices stay the model's), the
    /// triangles but the overlays, and texture coordinates into its
    /// [`HeadLayout::bare_neck_atlas`] (OBJ convention, v up), all inside the atlas.
    pub fn bare_neck_mesh(
        &self,
        model: &MorphableModel,
        vertices: &Tensor,
    ) -> Result<TexturedMesh, crate::Error> {
        let uvs = self
            .uv
            .to_vec2::<f32>()?
            .into_iter()
            .map(|uv| [uv[0], 1.0 - uv[1]])
            .collect();
        Ok(TexturedMesh {
            triangles: self.triangles.as_slice().to_vec(),
            uvs,
            uv_triangles: self.uv_triangles_bare_neck.as_slice().to_vec(),
            ..model.mesh(vertices)?
        })
    }

    /// [`HeadLayout::atlas`] for the [bare neck](HeadLayout::uv_triangles_bare_neck): the UV
    /// map's texels fade into `skin` over the band between the textured chin and the neck drawn
    /// in the palette's colour (an edge along the mesh's triangles there was a jagged seam), and
    /// into `skin` or `hair` along the UV map's border with the rest of the head (where the
    /// photo's colours, seen at a grazing angle or filled in, met the palette's in a hard edge).
    /// `model` is the one the layout was made for.
    pub fn bare_neck_atlas(
        &self,
        model: &MorphableModel,
        rgb: &[f32],
        side: usize,
        eyes: &EyeTexture,
        skin: [f32; 3],
        hair: [f32; 3],
    ) -> Result<Tensor, crate::Error> {
        let (band, shares) = &self.palette_band;
        let mut faded = rgb.to_vec();
        if !band.is_empty() {
            let rast = ganfit_optim::rasterize_uv_layout(model.uvs(), band, side)?;
            let shares = ganfit_render::interpolate(shares, &rast, band)?.flatten_all()?;
            let shares: Vec<f32> = shares.to_vec1()?;
            for (texel, share) in faded.chunks_exact_mut(3).zip(shares.chunks_exact(2)) {
                for ((value, skin), hair) in texel.iter_mut().zip(skin).zip(hair) {
                    *value += share[0] * (skin - *value) + share[1] * (hair - *value);
                }
            }
        }
        Ok(Self::atlas(&faded, side, eyes, skin, hair)?)
    }

    /// The atlas `[S, 2S, 3]` for a UV map `rgb` (`S × S × 3` in `[0, 1]`, image orientation)
    /// with the given eyes (in the right half's upper half, resampled to `S / 2` a square);
    /// the rest of the head takes the colour `skin`, but for the scalp (above the eyes), which
    /// takes `hair`.
    pub fn atlas(
        rgb: &[f32],
        side: usize,
        eyes: &EyeTexture,
        skin: [f32; 3],
        hair: [f32; 3],
    ) -> Result<Tensor, RenderError> {
        let tone = toned_like(skin);
        let palette: [[f32; 3]; PARTS] = [
            tone([0.55, 0.32, 0.3]),
            tone([0.3, 0.08, 0.08]),
            tone([0.7, 0.36, 0.36]),
            tone([0.9, 0.87, 0.78]),
            skin,
            hair,
        ];
        // The eyes' texel under an atlas texel's centre (the same texel at `eyes.side = S / 2`).
        let eye_texel = |row: usize, column: usize| {
            let at = |i: usize| (2 * i + 1) * eyes.side / side;
            let (row, column) = (
                at(row).min(eyes.side - 1),
                at(column).min(2 * eyes.side - 1),
            );
            &eyes.rgb[(row * 2 * eyes.side + column) * 3..][..3]
        };
        let mut atlas = vec![0.0f32; side * 2 * side * 3];
        for (row, chunk) in atlas.chunks_mut(2 * side * 3).enumerate() {
            let (left, right) = chunk.split_at_mut(side * 3);
            left.copy_from_slice(&rgb[row * side * 3..(row + 1) * side * 3]);
            // Rows whose centres lie above the middle hold the eyes, the rest the palette.
            if 2 * row < side {
                for (column, texel) in right.chunks_mut(3).enumerate() {
                    texel.copy_from_slice(eye_texel(row, column));
                }
            } else {
                let part = ((2 * row + 1 - side) * PARTS / side).min(PARTS - 1);
                for texel in right.chunks_mut(3) {
                    texel.copy_from_slice(&palette[part]);
                }
            }
        }
        Ok(Tensor::from_vec(atlas, (side, 2 * side, 3), &Device::Cpu)?)
    }
}

/// The band of the photo above the fitted head's top in which [`hair_colour`] looks for hair:
/// its gap from the head's outline and its height, as fractions of the head's width there.
const HAIR_BAND_GAP: f32 = 0.02;
const HAIR_BAND_HEIGHT: f32 = 0.12;

/// A colour this close (RGB distance in `[0, 1]`) to the photo's backdrop is the backdrop
/// showing above a bald or close-cropped head, not hair.
const MIN_HAIR_BACKGROUND_DISTANCE: f32 = 0.1;

/// The share of the band above the head that must stand apart from the backdrop for it to
/// hold hair rather than the backdrop above a bald head.
const MIN_HAIR_SHARE: f32 = 0.5;

/// How far beside the fitted head, as a fraction of its width, [`hair_colour`] samples the
/// backdrop (in a strip 15 % of the width wide): beyond most hair that stands out sideways.
const HAIR_BACKDROP_MARGIN: f32 = 0.3;

/// The colour of the hair above the fitted head in the photo: the mesh ends at about the
/// hairline, and the hair's volume lies outside it. The per-channel median of the pixels of a
/// band above the outline of `pixels` (the head's vertices projected into `photo`), over the
/// middle half of its width, that differ from the backdrop (measured beside the band, which a
/// backdrop's gradient from top to bottom does not fool); `None` where the band is off the
/// photo or shows mostly the backdrop. "Above" is towards the crown, which points `up` in the
/// photo (image coordinates, any length): a photo whose head lies sideways or upside down is
/// measured as turned upright by quarter turns.
pub(crate) fn hair_colour(photo: &RgbImage, pixels: &[[f32; 2]], up: [f32; 2]) -> Option<[f32; 3]> {
    let (width, height) = (photo.width() as f32, photo.height() as f32);
    // Clockwise quarter turns of the crown from the photo's top.
    let turned = (up[0].atan2(-up[1]) / std::f32::consts::FRAC_PI_2).round();
    let (photo, pixels): (RgbImage, Vec<[f32; 2]>) = match (turned as i32).rem_euclid(4) {
        1 => (
            image::imageops::rotate270(photo),
            pixels.iter().map(|&[x, y]| [y, width - 1.0 - x]).collect(),
        ),
        2 => (
            image::imageops::rotate180(photo),
            pixels
                .iter()
                .map(|&[x, y]| [width - 1.0 - x, height - 1.0 - y])
                .collect(),
        ),
        3 => (
            image::imageops::rotate90(photo),
            pixels.iter().map(|&[x, y]| [height - 1.0 - y, x]).collect(),
        ),
        // Upright, or no direction (NaN): as the photo stands.
        _ => return hair_colour_upright(photo, pixels),
    };
    hair_colour_upright(&photo, &pixels)
}

/// [`hair_colour`] for a head whose crown points to the photo's top.
fn hair_colour_upright(photo: &RgbImage, pixels: &[[f32; 2]]) -> Option<[f32; 3]> {
    let (left, right) = pixels
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, r), p| {
            (l.min(p[0]), r.max(p[0]))
        });
    let width = right - left;
    if width.is_nan() || width <= 4.0 {
        return None;
    }
    // The outline's top per column of the head's middle half.
    let (start, end) = (left + width / 4.0, right - width / 4.0);
    let columns = (end - start).ceil() as usize;
    let mut top = vec![f32::INFINITY; columns.max(1)];
    for p in pixels.iter().filter(|p| (start..end).contains(&p[0])) {
        let column = ((p[0] - start) as usize).min(columns - 1);
        top[column] = top[column].min(p[1]);
    }
    let colour = |x: u32, y: u32| photo.get_pixel(x, y).0.map(|v| f32::from(v) / 255.0);
    let (gap, height) = (HAIR_BAND_GAP * width, HAIR_BAND_HEIGHT * width);
    let mut band = Vec::new();
    let (mut first_row, mut end_row) = (u32::MAX, 0);
    for (column, &y) in top.iter().enumerate().filter(|(_, y)| y.is_finite()) {
        let x = (start + column as f32).round();
        if x < 0.0 || x >= photo.width() as f32 {
            continue;
        }
        let upper = (y - gap - height).max(0.0) as u32;
        let lower = (y - gap).clamp(0.0, photo.height() as f32) as u32;
        (first_row, end_row) = (first_row.min(upper), end_row.max(lower));
        band.extend((upper..lower).map(|row| colour(x as u32, row)));
    }
    if band.len() < MIN_EYE_PIXELS {
        return None;
    }
    // The backdrop beside the band, in its rows, clear of hair that stands out sideways; the
    // photo's top corners where the head leaves no room beside it.
    let beside = |from: f32, to: f32| {
        let columns = from.max(0.0) as u32..to.clamp(0.0, photo.width() as f32) as u32;
        (first_row..end_row).flat_map(move |y| columns.clone().map(move |x| (x, y)))
    };
    let (near, far) = (
        HAIR_BACKDROP_MARGIN * width,
        (HAIR_BACKDROP_MARGIN + 0.15) * width,
    );
    let mut backdrop: Vec<[f32; 3]> = beside(left - far, left - near)
        .chain(beside(right + near, right + far))
        .map(|(x, y)| colour(x, y))
        .collect();
    if backdrop.len() < MIN_EYE_PIXELS {
        let corner = (photo.width().min(photo.height()) / 20).max(1);
        backdrop = (0..corner)
            .flat_map(|y| {
                (0..corner)
                    .chain(photo.width() - corner..photo.width())
                    .map(move |x| (x, y))
            })
            .map(|(x, y)| colour(x, y))
            .collect();
    }
    let backdrop = channel_medians(&backdrop);
    // Close-cropped hair leaves backdrop in the band's upper rows, and a per-channel median
    // over both mixes a colour that is in neither (brown hair on a blue backdrop gave green).
    let band_len = band.len();
    band.retain(|colour| {
        let distance = (0..3)
            .map(|c| (colour[c] - backdrop[c]).powi(2))
            .sum::<f32>()
            .sqrt();
        distance >= MIN_HAIR_BACKGROUND_DISTANCE
    });
    (band.len() as f32 >= MIN_HAIR_SHARE * band_len as f32).then(|| channel_medians(&band))
}

/// How far below the chin landmark (on the mean face) the neck starts, millimetres: the
/// jaw's underside and the neck, which portraits show covered by collars as often as not.
const NECK_BELOW_CHIN_MM: f32 = 5.0;

/// Over how many millimetres further down the neck's texels fade into the palette's skin.
const NECK_FADE_MM: f32 = 10.0;

/// Over how many millimetres (on the mean face) from the UV map's border with the rest of the
/// head its texels fade into the palette's colours.
const BORDER_FADE_MM: f32 = 15.0;

/// How much of each vertex's texels [`HeadLayout::bare_neck_atlas`] draws in the palette's
/// colours.
struct PaletteShares {
    /// The skin's share on the neck (see [`neck_skin_share`]).
    neck: Vec<f32>,
    /// The share by closeness to the UV map's border with the rest of the head: 1 on it, 0
    /// from [`BORDER_FADE_MM`] inside.
    border: Vec<f32>,
    /// Whether the vertex is the scalp's, which fades into the hair's colour.
    scalp: Vec<bool>,
}

impl PaletteShares {
    /// The vertex's shares of the skin's and the hair's colour.
    fn of(&self, v: u32) -> [f32; 2] {
        let v = v as usize;
        if self.scalp[v] {
            [0.0, self.border[v]]
        } else {
            [self.neck[v].max(self.border[v]), 0.0]
        }
    }
}

/// The palette's shares of every vertex: `triangles` (mesh and UV corners) are the drawn ones,
/// `textured` says which of them take the UV map. The border is where textured triangles
/// meet untextured skin or scalp (not the eyes' or the mouth's openings).
fn palette_shares(
    mean: &[[f32; 3]],
    parts: &[Part],
    triangles: &[Corners],
    textured: &[bool],
    model: &MorphableModel,
) -> PaletteShares {
    let n = mean.len();
    let mut on_map = vec![false; n];
    for ((tri, _), _) in triangles.iter().zip(textured).filter(|(_, t)| **t) {
        for &v in tri {
            on_map[v as usize] = true;
        }
    }
    let head = |v: &u32| matches!(parts[*v as usize], Part::Skin | Part::Scalp);
    let mut on_border = vec![false; n];
    for ((tri, _), _) in triangles.iter().zip(textured).filter(|(_, t)| !**t) {
        if tri.iter().all(head) {
            for &v in tri {
                on_border[v as usize] |= on_map[v as usize];
            }
        }
    }
    // Border vertices in cubes of the fade's width: only the 27 around a vertex can be near.
    let cube = |p: &[f32; 3]| p.map(|x| (x / BORDER_FADE_MM).floor() as i32);
    let mut cubes: std::collections::HashMap<[i32; 3], Vec<Vector3<f32>>> = Default::default();
    for v in (0..n).filter(|&v| on_border[v]) {
        cubes
            .entry(cube(&mean[v]))
            .or_default()
            .push(Vector3::from(mean[v]));
    }
    let border = (0..n)
        .map(|v| {
            if !on_map[v] {
                return 0.0;
            }
            let (p, [x, y, z]) = (Vector3::from(mean[v]), cube(&mean[v]));
            let mut nearest = f32::INFINITY;
            for [dx, dy, dz] in (0..27).map(|i| [i % 3 - 1, i / 3 % 3 - 1, i / 9 - 1]) {
                for b in cubes.get(&[x + dx, y + dy, z + dz]).into_iter().flatten() {
                    nearest = nearest.min((b - p).norm_squared());
                }
            }
            smoothstep(BORDER_FADE_MM, 0.0, nearest.sqrt())
        })
        .collect();
    PaletteShares {
        neck: neck_skin_share(model, mean),
        border,
        scalp: parts.iter().map(|&p| p == Part::Scalp).collect(),
    }
}

/// How much of each vertex a bare neck draws in the palette's skin colour: 0 above the neck's
/// start, 1 from [`NECK_FADE_MM`] below it (all 0 for a model without a chin landmark, iBUG 8).
fn neck_skin_share(model: &MorphableModel, mean: &[[f32; 3]]) -> Vec<f32> {
    let chin = model
        .landmark_vertex_ids()
        .get(8)
        .copied()
        .flatten()
        .map(|v| mean[v as usize][1]);
    mean.iter()
        .map(|p| {
            chin.map_or(0.0, |chin| {
                ((chin - NECK_BELOW_CHIN_MM - p[1]) / NECK_FADE_MM).clamp(0.0, 1.0)
            })
        })
        .collect()
}

/// Mean colour of a UV map (`texels × 3`).
pub(crate) fn mean_colour(rgb: &[f32]) -> [f32; 3] {
    let mut sum = [0.0f64; 3];
    for texel in rgb.chunks_exact(3) {
        for (sum, &value) in sum.iter_mut().zip(texel) {
            *sum += f64::from(value);
        }
    }
    sum.map(|s| (s / (rgb.len() / 3).max(1) as f64) as f32)
}

/// Per-channel median of the UV map's cheeks (the face's UV layout puts them left and right
/// of the nose, below the eyes): the person's skin colour, where the map's mean would mix in
/// hair, brows, lips, a collar on the neck and the background.
pub(crate) fn cheek_colour(rgb: &[f32], side: usize) -> [f32; 3] {
    let (rows, columns) = (side * 45 / 100..side * 60 / 100, side / 4..side * 3 / 4);
    let mut channels: [Vec<f32>; 3] = Default::default();
    for row in rows {
        for column in columns.clone() {
            if (side * 2 / 5..side * 3 / 5).contains(&column) {
                continue; // the nose
            }
            let texel = &rgb[(row * side + column) * 3..][..3];
            for (channel, &value) in channels.iter_mut().zip(texel) {
                channel.push(value);
            }
        }
    }
    channels.map(|mut values| {
        if values.is_empty() {
            return 0.5;
        }
        let middle = values.len() / 2;
        *values.select_nth_unstable_by(middle, f32::total_cmp).1
    })
}

/// The palette part of each vertex (the eyeballs' vertices, which [`EyeLayout`] places on the
/// eyes' texture instead, are counted as the skin or scalp around them).
fn vertex_parts(model: &MorphableModel, mean: &[[f32; 3]]) -> Vec<Part> {
    let mut parts = vec![Part::Skin; model.n_vertices()];
    let mut assign = |name: &str, part: Part| {
        for &v in model.vertex_set(name).unwrap_or(&[]) {
            parts[v as usize] = part;
        }
    };
    for (name, part) in [
        ("eye_socket_left", Part::EyeSocket),
        ("eye_socket_right", Part::EyeSocket),
        ("mouth_socket", Part::MouthSocket),
        ("gums_and_tongue", Part::Gums),
        ("teeth", Part::Teeth),
    ] {
        assign(name, part);
    }
    let eye_corners: Vec<f32> = [36, 39, 42, 45]
        .iter()
        .filter_map(|&l| model.landmark_vertex_ids().get(l).copied().flatten())
        .map(|v| mean[v as usize][1])
        .collect();
    if eye_corners.len() == 4 {
        let eyes = eye_corners.iter().sum::<f32>() / 4.0;
        for (part, p) in parts.iter_mut().zip(mean) {
            if *part == Part::Skin && p[1] > eyes {
                *part = Part::Scalp;
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A red UV map, blue skin, green hair: the bare neck's atlas fades into blue below the
    /// chin, into green along the UV map's border on the scalp and into blue along the rest of
    /// the border, and keeps the face's middle red.
    #[test]
    fn the_uv_maps_texels_fade_into_the_palette_at_the_neck_and_the_border() {
        let fitter = crate::Fitter::builder().iterations(0).build().unwrap();
        let model = fitter.model();
        let layout = HeadLayout::new(model, &model.mean_rows().unwrap()).unwrap();
        let side = 256;
        let red = [1.0f32, 0.0, 0.0].repeat(side * side);
        let (blue, green) = ([0.0, 0.0, 1.0], [0.0, 1.0, 0.0]);
        let atlas = layout
            .bare_neck_atlas(
                model,
                &red,
                side,
                &EyeTexture::painted(EyeColours::DEFAULT, side / 2),
                blue,
                green,
            )
            .unwrap();
        let rows: Vec<Vec<Vec<f32>>> = atlas.narrow(1, 0, side).unwrap().to_vec3().unwrap();
        let (mut neck, mut scalp, mut side_border) = (0, 0, 0);
        for (row, texels) in rows.iter().enumerate() {
            for (column, texel) in texels.iter().enumerate() {
                assert!((texel.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{texel:?}");
                let middle = (side * 35 / 100..side * 65 / 100).contains(&row)
                    && (side * 35 / 100..side * 65 / 100).contains(&column);
                if middle {
                    assert_eq!(
                        texel[0], 1.0,
                        "the face's middle fades at ({row}, {column})"
                    );
                }
                // ICT's UV map has the eyes at about 27 % of its height, the neck below 70 %.
                if texel[1] > 0.01 {
                    assert!(row < side * 35 / 100, "hair fades in at row {row}");
                    scalp += usize::from(texel[1] > 0.5);
                }
                if texel[2] > 0.99 && row > side * 7 / 10 {
                    neck += 1;
                } else if texel[2] > 0.5 && row < side * 7 / 10 {
                    side_border += 1;
                }
            }
        }
        assert!(
            neck > 100 && scalp > 100 && side_border > 100,
            "{neck} neck, {scalp} scalp and {side_border} side texels faded"
        );
    }

    /// A skin-coloured photo with two open eyes: white almonds around a blue iris with a black
    /// pupil, outlined by iBUG points 36–47 (the other landmarks at the origin).
    fn eyes_photo(open: f32) -> (RgbImage, Vec<[f32; 2]>) {
        // Closed eyes show no eye at all, only the lids' skin.
        let shown = if open < 0.1 { 0.0 } else { open };
        let (iris, sclera, skin) = ([40, 90, 170], [235, 230, 225], [200, 150, 120]);
        let centres = [[60.0f32, 50.0], [140.0, 50.0]];
        let photo = RgbImage::from_fn(200, 100, |x, y| {
            let (x, y) = (x as f32, y as f32);
            let colour = centres.iter().find_map(|c| {
                let (dx, dy) = (x - c[0], y - c[1]);
                let r = dx.hypot(dy);
                if shown == 0.0 || (dx / 25.0).powi(2) + (dy / (12.0 * shown)).powi(2) > 1.0 {
                    None
                } else if r < 3.0 {
                    Some([10, 10, 10])
                } else if r < 8.0 {
                    Some(iris)
                } else {
                    Some(sclera)
                }
            });
            image::Rgb(colour.unwrap_or(skin))
        });
        let mut landmarks = vec![[0.0; 2]; 68];
        for (eye, centre) in centres.iter().enumerate() {
            // Corner, two upper-lid points, corner, two lower-lid points, as iBUG goes round.
            for (i, angle) in [180.0f32, 240.0, 300.0, 0.0, 60.0, 120.0]
                .iter()
                .enumerate()
            {
                let (sin, cos) = angle.to_radians().sin_cos();
                landmarks[36 + 6 * eye + i] =
                    [centre[0] + 25.0 * cos, centre[1] + 12.0 * open * sin];
            }
        }
        (photo, landmarks)
    }

    #[test]
    fn a_grey_photos_palette_is_grey_and_a_colour_photos_keeps_its_colours() {
        let side = 2 * PARTS; // one atlas row per palette entry in the lower half
        let uv_map = vec![0.5f32; side * side * 3];
        let eyes = EyeTexture::painted(EyeColours::DEFAULT, PARTS);
        let palette = |skin: [f32; 3], hair: [f32; 3]| -> Vec<[f32; 3]> {
            let atlas = HeadLayout::atlas(&uv_map, side, &eyes, skin, hair).unwrap();
            let atlas: Vec<Vec<Vec<f32>>> = atlas.to_vec3().unwrap();
            (0..PARTS)
                .map(|part| [0, 1, 2].map(|c| atlas[PARTS + part][side][c]))
                .collect()
        };
        let (skin, hair) = ([0.8, 0.6, 0.5], [0.2, 0.1, 0.05]);
        let colour = palette(skin, hair);
        assert_eq!(colour[Part::Scalp as usize], hair);
        assert_eq!(colour[Part::Skin as usize], skin);
        assert_eq!(colour[Part::EyeSocket as usize], [0.55, 0.32, 0.3]);
        assert_eq!(EyeColours::DEFAULT.toned_like(skin), EyeColours::DEFAULT);
        let grey_skin = [0.4, 0.4, 0.4];
        let is_grey = |c: [f32; 3]| (c[0] - c[1]).abs() < 1e-6 && (c[1] - c[2]).abs() < 1e-6;
        for (part, entry) in palette(grey_skin, grey_skin).iter().enumerate() {
            assert!(
                is_grey(*entry),
                "palette entry {part} of a grey photo: {entry:?}"
            );
        }
        // Brightness is kept: the grey iris is as light as the brown one.
        let grey_eyes = EyeColours::DEFAULT.toned_like(grey_skin);
        assert!(is_grey(grey_eyes.iris) && is_grey(grey_eyes.sclera));
        assert!((luma(&grey_eyes.iris) - luma(&EyeColours::DEFAULT.iris)).abs() < 1e-6);
    }

    /// The eyes' texture fills the right half's upper half, texel for texel at half the
    /// atlas's side, and is resampled at any other size.
    #[test]
    fn the_eyes_lie_above_the_palette() {
        let side = 16;
        let uv_map = vec![0.5f32; side * side * 3];
        let colours = EyeColours {
            iris: [0.1, 0.5, 0.2],
            sclera: [0.9, 0.9, 0.9],
        };
        for eye_side in [side / 2, 3] {
            let eyes = EyeTexture::painted(colours, eye_side);
            let atlas = HeadLayout::atlas(&uv_map, side, &eyes, [0.5; 3], [0.5; 3]).unwrap();
            let atlas: Vec<Vec<Vec<f32>>> = atlas.to_vec3().unwrap();
            for (row, texels) in atlas.iter().take(side / 2).enumerate() {
                for (column, texel) in texels[side..].iter().enumerate() {
                    let (r, c) = (
                        (2 * row + 1) * eye_side / side,
                        (2 * column + 1) * eye_side / side,
                    );
                    let at = (r * 2 * eye_side + c) * 3;
                    assert_eq!(*texel, eyes.rgb[at..at + 3]);
                }
            }
        }
    }

    #[test]
    fn eye_colours_are_measured_inside_the_eye_openings() {
        let (photo, landmarks) = eyes_photo(1.0);
        let eyes = EyeColours::measure(&photo, &landmarks);
        let close = |a: [f32; 3], b: [u8; 3]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - f32::from(b) / 255.0).abs() < 0.02)
        };
        assert!(close(eyes.iris, [40, 90, 170]), "{eyes:?}");
        assert!(close(eyes.sclera, [235, 230, 225]), "{eyes:?}");
    }

    #[test]
    fn closed_or_unknown_eyes_keep_the_default_colours() {
        let (photo, closed) = eyes_photo(0.02);
        assert_eq!(EyeColours::measure(&photo, &closed), EyeColours::DEFAULT);
        let (photo, landmarks) = eyes_photo(1.0);
        assert_eq!(
            EyeColours::measure(&photo, &landmarks[..40]),
            EyeColours::DEFAULT
        );
        // Outlines partly or wholly off the photo: what lies inside counts, nothing panics.
        let shifted: Vec<[f32; 2]> = landmarks.iter().map(|p| [p[0] - 120.0, p[1]]).collect();
        let _ = EyeColours::measure(&photo, &shifted);
        let far: Vec<[f32; 2]> = landmarks.iter().map(|p| [p[0] + 1e6, p[1] - 1e6]).collect();
        assert_eq!(EyeColours::measure(&photo, &far), EyeColours::DEFAULT);
        let nan = vec![[f32::NAN; 2]; 68];
        assert_eq!(EyeColours::measure(&photo, &nan), EyeColours::DEFAULT);
    }

    #[test]
    fn the_skin_colour_comes_from_the_cheeks_not_the_hair_or_collar() {
        let side = 64;
        let skin = [0.8, 0.6, 0.5];
        let mut rgb = Vec::with_capacity(side * side * 3);
        for row in 0..side {
            for column in 0..side {
                let colour = match row * 100 / side {
                    0..30 => [0.1, 0.08, 0.05],              // hair
                    75.. => [0.95, 0.95, 0.95],              // white collar
                    _ if column % 7 == 0 => [0.3, 0.2, 0.2], // stubble
                    _ => skin,
                };
                rgb.extend(colour);
            }
        }
        assert_eq!(cheek_colour(&rgb, side), skin);
        let mean = mean_colour(&rgb);
        assert!(
            (mean[0] - skin[0]).abs() > 0.05,
            "the mean {mean:?} mixes in hair and collar"
        );
    }

    /// A blue backdrop, a round head of skin-coloured pixels centred at (100, 120) with radius
    /// 50, and above it, if `hair`, a band of brown hair 30 pixels high.
    fn head_photo(hair: bool) -> (RgbImage, Vec<[f32; 2]>) {
        head_photo_on(if hair { 30.0 } else { 0.0 }, |_| image::Rgb([60, 90, 160]))
    }

    /// [`head_photo`] with hair `hair_height` pixels high, whose brown (median (90, 60, 30))
    /// lightens and darkens from column to column as strands do, and the backdrop's colour
    /// given per row.
    fn head_photo_on(
        hair_height: f32,
        backdrop: impl Fn(u32) -> image::Rgb<u8>,
    ) -> (RgbImage, Vec<[f32; 2]>) {
        let (centre, radius) = ([100.0f32, 120.0], 50.0);
        let photo = RgbImage::from_fn(200, 200, |x, y| {
            let (dx, dy) = (x as f32 - centre[0], y as f32 - centre[1]);
            if dx.hypot(dy) <= radius {
                image::Rgb([200, 150, 120])
            } else if dx.abs() < radius && dy < 0.0 && dx.hypot(dy) <= radius + hair_height {
                let strand = (x % 9) as u8 * 5;
                image::Rgb([70 + strand, 40 + strand, 10 + strand])
            } else {
                backdrop(y)
            }
        });
        let head = (0..=100)
            .flat_map(|i| (0..=100).map(move |j| [50.0 + i as f32, 70.0 + j as f32]))
            .filter(|p| (p[0] - centre[0]).hypot(p[1] - centre[1]) <= radius)
            .collect();
        (photo, head)
    }

    #[test]
    fn the_hair_is_the_colour_above_the_heads_outline() {
        let (photo, head) = head_photo(true);
        let hair = hair_colour(&photo, &head, UP).expect("hair above the head");
        for (measured, expected) in hair.iter().zip([90u8, 60, 30]) {
            assert!(
                (measured - f32::from(expected) / 255.0).abs() < 0.02,
                "{hair:?}"
            );
        }
    }

    #[test]
    fn close_cropped_hair_is_not_mixed_with_the_backdrop_above_it() {
        // Hair 9 pixels high: the band above the head (2 to 14 pixels above its outline) shows
        // the backdrop in its upper third.
        let (photo, head) = head_photo_on(9.0, |_| image::Rgb([60, 90, 160]));
        let hair = hair_colour(&photo, &head, UP).expect("hair above the head");
        for (measured, expected) in hair.iter().zip([90u8, 60, 30]) {
            assert!(
                (measured - f32::from(expected) / 255.0).abs() < 0.03,
                "{hair:?}"
            );
        }
    }

    /// The crown's direction in an upright photo.
    const UP: [f32; 2] = [0.0, -1.0];

    #[test]
    fn a_head_lying_sideways_or_upside_down_has_its_hair_above_its_crown() {
        let (photo, head) = head_photo(true);
        let upright = hair_colour(&photo, &head, UP).unwrap();
        let (w, h) = (photo.width() as f32 - 1.0, photo.height() as f32 - 1.0);
        // The photo turned clockwise by one, two and three quarter turns, the crown with it
        // (a little off the exact direction).
        type Turn = fn([f32; 2], f32, f32) -> [f32; 2];
        let turns: [(RgbImage, Turn, [f32; 2]); 3] = [
            (
                image::imageops::rotate90(&photo),
                |[x, y], _, h| [h - y, x],
                [1.0, 0.2],
            ),
            (
                image::imageops::rotate180(&photo),
                |[x, y], w, h| [w - x, h - y],
                [-0.2, 1.0],
            ),
            (
                image::imageops::rotate270(&photo),
                |[x, y], w, _| [y, w - x],
                [-1.0, -0.2],
            ),
        ];
        for (turned, turn, up) in turns {
            let pixels: Vec<[f32; 2]> = head.iter().map(|&p| turn(p, w, h)).collect();
            assert_eq!(
                hair_colour(&turned, &pixels, up),
                Some(upright),
                "crown {up:?}"
            );
            // Read as if upright, the band above the head is the backdrop or off the photo.
            assert_ne!(hair_colour(&turned, &pixels, UP), Some(upright));
        }
    }

    #[test]
    fn the_backdrop_above_a_bald_head_or_a_head_at_the_photos_top_is_no_hair() {
        let (photo, head) = head_photo(false);
        assert_eq!(hair_colour(&photo, &head, UP), None);
        let (photo, head) = head_photo(true);
        let raised: Vec<[f32; 2]> = head.iter().map(|p| [p[0], p[1] - 70.0]).collect();
        assert_eq!(hair_colour(&photo, &raised, UP), None);
        assert_eq!(hair_colour(&photo, &[], UP), None);
        // A backdrop darkening towards the top: the corners are far from the band's colour,
        // the backdrop beside the band is not.
        let gradient = |y: u32| image::Rgb([40 + y as u8, 40 + y as u8, 90 + y as u8 / 2]);
        let (photo, head) = head_photo_on(0.0, gradient);
        assert_eq!(hair_colour(&photo, &head, UP), None);
        let (photo, head) = head_photo_on(30.0, gradient);
        assert!(hair_colour(&photo, &head, UP).is_some());
    }
}
