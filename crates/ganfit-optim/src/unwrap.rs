//! Projecting a photo onto the fitted mesh's UV layout.
//!
//! Every texel of the UV map belongs to one point of the surface; where that point is visible in
//! the photo under the fitted camera, the texel takes the photo's colour. This gives the first
//! texture of a fit (and, over many photos, the UV maps a texture model is trained on).

use candle_core::{DType, Device, Tensor};
use ganfit_morphable::MorphableModel;
use ganfit_render::{RasterOptions, Triangles, camera_from_world, interpolate, rasterize};

use crate::{FitParams, OptimError};

/// A UV texture in image orientation: row 0 is the top of the map (OBJ `v = 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct UvTexture {
    /// Side length in texels.
    pub size: usize,
    /// RGB in `[0, 1]`, row-major, `size × size × 3`.
    pub rgb: Vec<f32>,
    /// 1 where the texel was seen in the photo, 0 elsewhere, `size × size`.
    pub observed: Vec<f32>,
}

/// Surface points that face away from the camera more steeply than this (cosine between the
/// normal and the direction to the camera) are not taken from the photo: at grazing angles a
/// texel's footprint smears across many pixels.
const MIN_VIEW_COSINE: f32 = 0.2;

/// A texel counts as visible when its depth is within this many millimetres, plus the depth
/// change across one and a half pixels of its slanted surface, of the depth the photo's camera
/// sees at its nearest pixel.
const DEPTH_TOLERANCE_MM: f32 = 2.0;

/// The triangles of the model's skin (mesh and UV triangles, parallel), or all of them when the
/// model names no `skin` set. Eyeballs, teeth and the mouth's interior are left out: the fit
/// does not place them, so neither textures nor renders should take them from the photo.
pub fn skin_triangles(model: &MorphableModel) -> (Vec<[u32; 3]>, Vec<[u32; 3]>) {
    let skin: Option<std::collections::HashSet<u32>> = model
        .vertex_set("skin")
        .ok()
        .map(|set| set.iter().copied().collect());
    model
        .triangles()
        .iter()
        .zip(model.uv_triangles())
        .filter(|(t, _)| {
            skin.as_ref()
                .is_none_or(|s| t.iter().all(|v| s.contains(v)))
        })
        .map(|(t, u)| (*t, *u))
        .unzip()
}

/// Projects `photo` (`[H, W, 3]`, values in `[0, 1]`) onto the UV layout of `model` posed as
/// `vertices` (`[N, 3]`) under `params`' camera, at `size × size` texels. Texels not seen in the
/// photo get the mean colour of those that were, so renders show no holes.
pub fn unwrap_photo(
    model: &MorphableModel,
    vertices: &Tensor,
    params: &FitParams,
    photo: &Tensor,
    size: usize,
) -> Result<UvTexture, OptimError> {
    let (height, width, channels) = photo.dims3()?;
    if channels != 3 || size == 0 {
        return Err(OptimError::InvalidInput(format!(
            "unwrap needs an RGB photo [H, W, 3] and a texture size above 0; got {:?} and {size}",
            photo.dims()
        )));
    }
    let cpu = Device::Cpu;
    let (skin, skin_uv) = skin_triangles(model);
    let triangles = Triangles::new(skin, model.n_vertices())?;
    let camera_vertices = camera_from_world(
        &vertices.to_dtype(DType::F32)?.to_device(&cpu)?,
        &params.rotation.to_device(&cpu)?.unsqueeze(0)?,
        &params.translation.to_device(&cpu)?.unsqueeze(0)?,
    )?;

    // Rasterise the UV layout: one "pixel" per texel, the UV triangles as geometry.
    let uvs = model.uvs();
    let uv_clip: Vec<f32> = uvs
        .iter()
        .flat_map(|&[u, v]| [2.0 * u - 1.0, 2.0 * (1.0 - v) - 1.0, 0.0, 1.0])
        .collect();
    let uv_clip = Tensor::from_vec(uv_clip, (1, uvs.len(), 4), &cpu)?;
    let uv_triangles = Triangles::new(skin_uv, uvs.len())?;
    let uv_rast = rasterize(
        &uv_clip,
        &uv_triangles,
        size,
        size,
        RasterOptions::default(),
    )?;
    // The UV triangles are parallel to the mesh triangles, so each texel's barycentrics
    // interpolate the mesh's camera-space positions and normals too.
    let surface = interpolate(&camera_vertices, &uv_rast, &triangles)?;
    let normals = interpolate(
        &ganfit_render::vertex_normals(&camera_vertices, &triangles)?,
        &uv_rast,
        &triangles,
    )?;

    // What the photo's camera sees: depth per pixel.
    let k = &params.intrinsics;
    let camera = ganfit_render::Camera::new(k.fx, k.fy, k.cx, k.cy, width, height, 1.0, 1e5)?;
    let clip = camera.to_clip(&camera_vertices)?;
    let photo_rast = rasterize(&clip, &triangles, height, width, RasterOptions::default())?;
    let photo_depth = interpolate(&camera_vertices.narrow(2, 2, 1)?, &photo_rast, &triangles)?;

    let covered: Vec<f32> = uv_rast.narrow(3, 3, 1)?.flatten_all()?.to_vec1()?;
    let surface: Vec<f32> = surface.flatten_all()?.to_vec1()?;
    let normals: Vec<f32> = normals.flatten_all()?.to_vec1()?;
    let depth: Vec<f32> = photo_depth.flatten_all()?.to_vec1()?;
    let pixels: Vec<f32> = photo.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;

    let texels = size * size;
    let mut rgb = vec![0.0f32; texels * 3];
    let mut observed = vec![0.0f32; texels];
    for texel in 0..texels {
        if covered[texel] == 0.0 {
            continue;
        }
        let p = &surface[texel * 3..texel * 3 + 3];
        let normal = &normals[texel * 3..texel * 3 + 3];
        let distance = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
        let normal_length =
            (normal[0] * normal[0] + normal[1] * normal[1] + normal[2] * normal[2]).sqrt();
        let facing = -(p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2])
            / (distance * normal_length).max(f32::MIN_POSITIVE);
        if p[2] <= 0.0 || facing < MIN_VIEW_COSINE {
            continue;
        }
        let x = (k.fx * f64::from(p[0] / p[2]) + k.cx) as f32;
        let y = (k.fy * f64::from(p[1] / p[2]) + k.cy) as f32;
        let (column, row) = (x.round(), y.round());
        if column < 0.0 || row < 0.0 || column >= width as f32 || row >= height as f32 {
            continue;
        }
        let seen_depth = depth[row as usize * width + column as usize];
        let pixel_footprint = p[2] / k.fx as f32;
        if (seen_depth - p[2]).abs() > DEPTH_TOLERANCE_MM + 1.5 * pixel_footprint / facing {
            continue;
        }
        let colour = bilinear(&pixels, width, height, x, y);
        rgb[texel * 3..texel * 3 + 3].copy_from_slice(&colour);
        observed[texel] = 1.0;
    }
    fill_unobserved(&mut rgb, &observed);
    Ok(UvTexture {
        size,
        rgb,
        observed,
    })
}

/// Bilinear sample of an `[H, W, 3]` image at pixel-centre coordinates (x, y), clamped.
fn bilinear(pixels: &[f32], width: usize, height: usize, x: f32, y: f32) -> [f32; 3] {
    let x = x.clamp(0.0, (width - 1) as f32);
    let y = y.clamp(0.0, (height - 1) as f32);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(width - 1), (y0 + 1).min(height - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let at = |xx: usize, yy: usize, c: usize| pixels[(yy * width + xx) * 3 + c];
    [0, 1, 2].map(|c| {
        let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
        let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
        top * (1.0 - fy) + bottom * fy
    })
}

/// Gives every unobserved texel the mean colour of the observed ones.
fn fill_unobserved(rgb: &mut [f32], observed: &[f32]) {
    let seen = observed.iter().filter(|&&o| o > 0.0).count();
    if seen == 0 {
        return;
    }
    let mut mean = [0.0f32; 3];
    for (texel, _) in observed.iter().enumerate().filter(|(_, o)| **o > 0.0) {
        for c in 0..3 {
            mean[c] += rgb[texel * 3 + c] / seen as f32;
        }
    }
    for (texel, _) in observed.iter().enumerate().filter(|(_, o)| **o == 0.0) {
        rgb[texel * 3..texel * 3 + 3].copy_from_slice(&mean);
    }
}
