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
        let (mut triangles, mut uv_triangles) = (Vec::new(), Vec::new());
        let (mut skin_triangles, mut skin_uv_triangles) = (Vec::new(), Vec::new());
        for (tri, uv_tri) in model.triangles().iter().zip(model.uv_triangles()) {
            if tri.iter().any(|v| hidden.contains(v)) {
                continue;
            }
            triangles.push(*tri);
            let in_first_tile = uv_tri
                .iter()
                .all(|&t| (0.0..=1.0).contains(&model.uvs()[t as usize][0]));
            let atlas_triangle = if skin.contains(tri) && in_first_tile {
                *uv_tri
            } else {
                tri.map(|v| uv_count + v)
            };
            uv_triangles.push(atlas_triangle);
            if skin.contains(tri) && in_first_tile {
                skin_triangles.push(*tri);
                skin_uv_triangles.push(atlas_triangle);
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
            textured_skin: (
                Triangles::new(skin_triangles, n)?,
                Triangles::new(skin_uv_triangles, atlas_vertices)?,
            ),
            uv: Tensor::from_vec(uv, (atlas_vertices, 2), &Device::Cpu)?,
        })
    }

    /// The atlas `[S, 2S, 3]` for a UV map `rgb` (`S × S × 3` in `[0, 1]`, image orientation)
    /// with the given iris colour; the rest of the head takes the map's mean colour.
    pub fn atlas(rgb: &[f32], side: usize, iris: [f32; 3]) -> Result<Tensor, RenderError> {
        let mut mean = [0.0f32; 3];
        for texel in rgb.chunks_exact(3) {
            for (sum, &value) in mean.iter_mut().zip(texel) {
                *sum += value;
            }
        }
        let skin = mean.map(|m| m / (side * side).max(1) as f32);
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
