//! The whole head drawn with one texture: the skin's UV map on the left half of an atlas, a
//! palette of solid colours for eyes, mouth and the head beyond the face's UV tile on the right.
//!
//! ICT lays its UVs out in UDIM tiles: only the face's tile (`u` in `[0, 1]`) is in a UV map;
//! the head, neck and ears beyond it, the eyeballs, teeth and mouth take palette colours.

use candle_core::{Device, Tensor};
use ganfit_morphable::MorphableModel;
use ganfit_render::{RenderError, Triangles};
use nalgebra::Vector3;

/// What each vertex is coloured as: its palette row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Pupil,
    Iris,
    Sclera,
    EyeSocket,
    MouthSocket,
    Gums,
    Teeth,
    Skin,
}

const PARTS: usize = 8;

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

/// Brown: the iris colour of renders whose eye colour is not known.
pub(crate) const DEFAULT_IRIS: [f32; 3] = [0.25, 0.14, 0.07];

/// The head's triangles and their atlas coordinates.
#[derive(Debug, Clone)]
pub(crate) struct HeadLayout {
    /// Every triangle but the overlays.
    pub triangles: Triangles,
    /// Their atlas triangles: into the model's UVs, or into one palette entry per vertex.
    pub uv_triangles: Triangles,
    /// The same, but the neck below the chin in the palette's skin colour too: for views of
    /// a fitted face from elsewhere than the photo's camera, where the neck's texels would
    /// show the photo's collar and tie more often than skin.
    pub uv_triangles_bare_neck: Triangles,
    /// The skin triangles inside the UV map's tile (no eyes, teeth, mouth interior, nor the
    /// head and neck beyond the tile) and their atlas triangles: for renders laid onto the
    /// photo, which shows its own eyes, teeth and hair through the gaps. (Flat palette colour
    /// over hair and collar moved dlib's descriptor of the astronaut from 0.07 to 0.33.)
    pub textured_skin: (Triangles, Triangles),
    /// Atlas coordinates `[Vt + V, 2]` (row 0 of the atlas at `v = 0`).
    pub uv: Tensor,
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
        let neck = below_chin(model, mean);
        let (mut triangles, mut uv_triangles) = (Vec::new(), Vec::new());
        let mut uv_triangles_bare_neck = Vec::new();
        let (mut skin_triangles, mut skin_uv_triangles) = (Vec::new(), Vec::new());
        for (tri, uv_tri) in model.triangles().iter().zip(model.uv_triangles()) {
            if tri.iter().any(|v| hidden.contains(v)) {
                continue;
            }
            triangles.push(*tri);
            let in_first_tile = uv_tri
                .iter()
                .all(|&t| (0.0..=1.0).contains(&model.uvs()[t as usize][0]));
            let textured = skin.contains(tri) && in_first_tile;
            let palette = tri.map(|v| uv_count + v);
            uv_triangles.push(if textured { *uv_tri } else { palette });
            uv_triangles_bare_neck.push(if textured && !tri.iter().all(|&v| neck[v as usize]) {
                *uv_tri
            } else {
                palette
            });
            if textured {
                skin_triangles.push(*tri);
                skin_uv_triangles.push(*uv_tri);
            }
        }
        let mut uv: Vec<f32> = model
            .uvs()
            .iter()
            .flat_map(|&[u, v]| [0.5 * u, 1.0 - v])
            .collect();
        for part in &parts {
            uv.extend([0.75, (*part as usize as f32 + 0.5) / PARTS as f32]);
        }
        let atlas_vertices = model.uvs().len() + n;
        Ok(HeadLayout {
            triangles: Triangles::new(triangles, n)?,
            uv_triangles: Triangles::new(uv_triangles, atlas_vertices)?,
            uv_triangles_bare_neck: Triangles::new(uv_triangles_bare_neck, atlas_vertices)?,
            textured_skin: (
                Triangles::new(skin_triangles, n)?,
                Triangles::new(skin_uv_triangles, atlas_vertices)?,
            ),
            uv: Tensor::from_vec(uv, (atlas_vertices, 2), &Device::Cpu)?,
        })
    }

    /// The atlas `[S, 2S, 3]` for a UV map `rgb` (`S × S × 3` in `[0, 1]`, image orientation)
    /// with the given iris colour; the rest of the head takes the colour `skin`.
    pub fn atlas(
        rgb: &[f32],
        side: usize,
        iris: [f32; 3],
        skin: [f32; 3],
    ) -> Result<Tensor, RenderError> {
        let palette: [[f32; 3]; PARTS] = [
            [0.03, 0.03, 0.03],
            iris,
            [0.86, 0.83, 0.8],
            [0.55, 0.32, 0.3],
            [0.3, 0.08, 0.08],
            [0.7, 0.36, 0.36],
            [0.9, 0.87, 0.78],
            skin,
        ];
        let mut atlas = vec![0.0f32; side * 2 * side * 3];
        for (row, chunk) in atlas.chunks_mut(2 * side * 3).enumerate() {
            let (left, right) = chunk.split_at_mut(side * 3);
            left.copy_from_slice(&rgb[row * side * 3..(row + 1) * side * 3]);
            let colour = palette[(row * PARTS / side).min(PARTS - 1)];
            for texel in right.chunks_mut(3) {
                texel.copy_from_slice(&colour);
            }
        }
        Ok(Tensor::from_vec(atlas, (side, 2 * side, 3), &Device::Cpu)?)
    }
}

/// How far below the chin landmark (on the mean face) the neck starts, millimetres: the
/// jaw's underside and the neck, which portraits show covered by collars as often as not.
const NECK_BELOW_CHIN_MM: f32 = 5.0;

/// Whether each vertex lies on the neck, below the chin (all `false` for a model without a
/// chin landmark, iBUG 8).
fn below_chin(model: &MorphableModel, mean: &[[f32; 3]]) -> Vec<bool> {
    let chin = model
        .landmark_vertex_ids()
        .get(8)
        .copied()
        .flatten()
        .map(|v| mean[v as usize][1]);
    mean.iter()
        .map(|p| chin.is_some_and(|chin| p[1] < chin - NECK_BELOW_CHIN_MM))
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

/// The part of each vertex: iris and pupil are the eyeball's vertices within 30° and 11° of
/// its forward axis (the model's +z) seen from the eyeball's centre.
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
    for name in ["eyeball_left", "eyeball_right"] {
        let ids = model.vertex_set(name).unwrap_or(&[]);
        if ids.is_empty() {
            continue;
        }
        let centre = ids
            .iter()
            .map(|&v| Vector3::from(mean[v as usize].map(f64::from)))
            .sum::<Vector3<f64>>()
            / ids.len() as f64;
        for &v in ids {
            let direction = (Vector3::from(mean[v as usize].map(f64::from)) - centre).normalize();
            parts[v as usize] = match direction.z {
                z if z > 11f64.to_radians().cos() => Part::Pupil,
                z if z > 30f64.to_radians().cos() => Part::Iris,
                _ => Part::Sclera,
            };
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
