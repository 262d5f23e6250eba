//! Projecting a photo onto the fitted mesh's UV layout.
//!
//! Every texel of the UV map belongs to one point of the surface; where that point is visible in
//! the photo under the fitted camera, the texel takes the photo's colour. This gives the first
//! texture of a fit (and, over many photos, the UV maps a texture model is trained on).

use candle_core::{CpuStorage, DType, Device, Layout, Storage, StorageRef, Tensor};
use ganfit_morphable::MorphableModel;
use ganfit_render::{RasterOptions, Triangles, camera_from_world, interpolate, rasterize};
use rayon::prelude::*;

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

/// Texels seen on both sides of the face ([`UvTexture::fill_unobserved_mirrored`]), or by both
/// photos ([`Projection::fuse`]), needed before colours are corrected for uneven light.
const MIN_SHADING_TEXELS: usize = 64;

/// The most those corrections brighten or darken colours.
const MAX_SHADING_GAIN: f32 = 4.0;

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
/// photo are filled from the seen ones (see [`UvTexture::fill_unobserved`]), so renders show no
/// holes.
pub fn unwrap_photo(
    model: &MorphableModel,
    vertices: &Tensor,
    params: &FitParams,
    photo: &Tensor,
    size: usize,
) -> Result<UvTexture, OptimError> {
    let mut texture = project_photo(model, vertices, params, photo, size)?;
    texture.fill_unobserved(None);
    Ok(texture)
}

/// [`unwrap_photo`] without the fill: the texels the photo does not see stay black, for a
/// caller that fills them its own way (a fill reads only the seen texels).
pub fn project_photo(
    model: &MorphableModel,
    vertices: &Tensor,
    params: &FitParams,
    photo: &Tensor,
    size: usize,
) -> Result<UvTexture, OptimError> {
    Ok(project_photo_with_view(model, vertices, params, photo, size, None)?.texture)
}

/// A photo's colours on the UV layout ([`project_photo`]) and how much detail the photo saw at
/// each texel, for merging the projections of several photos of one face
/// ([`Projection::fuse`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// The seen texels' colours; the unseen ones are black and marked unobserved.
    pub texture: UvTexture,
    /// Per texel, photo pixels per millimetre of surface across its slant (the view cosine
    /// times the focal length over the depth) where the photo saw it, 0 elsewhere: a face seen
    /// head-on and close scores high, a far or turned-away one low.
    pub pixels_per_mm: Vec<f32>,
    /// Per texel, whether the photo pixel it projects to lies off the face (the caller's mask,
    /// [`project_photo_with_view`]'s `off_face`), where the surface faces the camera and is
    /// not hidden, even at angles too grazing for its colour to be taken (the render in the
    /// photo's view shows those texels there, so a texture fitted to the photo learns the
    /// pixels' colours).
    pub off_face: Vec<bool>,
}

/// [`project_photo`], keeping how much detail the photo saw at each texel, and which texels
/// project to pixels that show something other than the face: those (column, row) for which
/// `off_face` is true.
pub fn project_photo_with_view(
    model: &MorphableModel,
    vertices: &Tensor,
    params: &FitParams,
    photo: &Tensor,
    size: usize,
    off_face: Option<&(dyn Fn(usize, usize) -> bool + Sync)>,
) -> Result<Projection, OptimError> {
    let (skin, skin_uv) = skin_triangles(model);
    let layout = UvLayout {
        triangles: &skin,
        uv_triangles: &skin_uv,
        uvs: model.uvs(),
        occluders: &skin,
    };
    project_photo_onto(&layout, vertices, params, photo, size, off_face)
}

/// A surface that a photo is projected onto ([`project_photo_onto`]).
#[derive(Debug, Clone, Copy)]
pub struct UvLayout<'a> {
    /// The mesh triangles that carry the texture.
    pub triangles: &'a [[u32; 3]],
    /// Their UV triangles (parallel to `triangles`), into `uvs`.
    pub uv_triangles: &'a [[u32; 3]],
    /// UV coordinates in `[0, 1]²`, `v` up (OBJ's convention).
    pub uvs: &'a [[f32; 2]],
    /// The mesh triangles that can hide the textured ones from the camera (the textured ones
    /// among them): the photo's depth is theirs.
    pub occluders: &'a [[u32; 3]],
}

/// [`project_photo_with_view`] onto any [`UvLayout`] of the mesh `vertices` (`[N, 3]`).
pub fn project_photo_onto(
    layout: &UvLayout<'_>,
    vertices: &Tensor,
    params: &FitParams,
    photo: &Tensor,
    size: usize,
    off_face: Option<&(dyn Fn(usize, usize) -> bool + Sync)>,
) -> Result<Projection, OptimError> {
    let (height, width, channels) = photo.dims3()?;
    if channels != 3 || size == 0 {
        return Err(OptimError::InvalidInput(format!(
            "unwrap needs an RGB photo [H, W, 3] and a texture size above 0; got {:?} and {size}",
            photo.dims()
        )));
    }
    let cpu = Device::Cpu;
    let n_vertices = vertices.dim(0)?;
    let triangles = Triangles::new(layout.triangles.to_vec(), n_vertices)?;
    let camera_vertices = camera_from_world(
        &vertices.to_dtype(DType::F32)?.to_device(&cpu)?,
        &params.rotation.to_device(&cpu)?.unsqueeze(0)?,
        &params.translation.to_device(&cpu)?.unsqueeze(0)?,
    )?;

    let uv_triangles = Triangles::new(layout.uv_triangles.to_vec(), layout.uvs.len())?;
    let uv_rast = rasterize_uv_layout(layout.uvs, &uv_triangles, size)?;
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
    let (near, far) = crate::DEPTH_RANGE_MM;
    let camera = ganfit_render::Camera::new(k.fx, k.fy, k.cx, k.cy, width, height, near, far)?;
    let clip = camera.to_clip(&camera_vertices)?;
    let occluders = Triangles::new(layout.occluders.to_vec(), n_vertices)?;
    let photo_rast = rasterize(&clip, &occluders, height, width, RasterOptions::default())?;
    let photo_depth = interpolate(&camera_vertices.narrow(2, 2, 1)?, &photo_rast, &occluders)?;

    let photo = photo.to_dtype(DType::F32)?.to_device(&cpu)?.contiguous()?;
    let borrowed =
        [&uv_rast, &surface, &normals, &photo_depth, &photo].map(|t| t.storage_and_layout());
    let [rast, surface, normals, depth, pixels] = borrowed
        .each_ref()
        .map(|(storage, layout)| cpu_f32(storage, layout));
    let (rast, surface, normals, depth, pixels) = (rast?, surface?, normals?, depth?, pixels?);

    let mut rgb = vec![0.0f32; size * size * 3];
    let mut pixels_per_mm = vec![0.0f32; size * size];
    let mut texel_off_face = vec![false; size * size];
    let rows = rgb
        .par_chunks_mut(size * 3)
        .zip(pixels_per_mm.par_chunks_mut(size))
        .zip(texel_off_face.par_chunks_mut(size));
    rows.enumerate()
        .for_each(|(row, ((rgb, pixels_per_mm), texel_off_face))| {
            for column in 0..size {
                let texel = row * size + column;
                // Channel 3 of the rasterizer's output is the triangle id + 1, 0 where uncovered.
                if rast[texel * 4 + 3] == 0.0 {
                    continue;
                }
                let p = &surface[texel * 3..texel * 3 + 3];
                let normal = &normals[texel * 3..texel * 3 + 3];
                let distance = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
                let normal_length =
                    (normal[0] * normal[0] + normal[1] * normal[1] + normal[2] * normal[2]).sqrt();
                let facing = -(p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2])
                    / (distance * normal_length).max(f32::MIN_POSITIVE);
                if p[2] <= 0.0 || facing <= 0.0 {
                    continue;
                }
                let x = (k.fx * f64::from(p[0] / p[2]) + k.cx) as f32;
                let y = (k.fy * f64::from(p[1] / p[2]) + k.cy) as f32;
                let (pixel_column, pixel_row) = (x.round(), y.round());
                if pixel_column < 0.0
                    || pixel_row < 0.0
                    || pixel_column >= width as f32
                    || pixel_row >= height as f32
                {
                    continue;
                }
                let (column_in_photo, row_in_photo) = (pixel_column as usize, pixel_row as usize);
                let pixel = row_in_photo * width + column_in_photo;
                let pixel_footprint = p[2] / k.fx as f32;
                let tolerance =
                    DEPTH_TOLERANCE_MM + 1.5 * pixel_footprint / facing.max(MIN_VIEW_COSINE);
                if (depth[pixel] - p[2]).abs() > tolerance {
                    continue;
                }
                texel_off_face[column] =
                    off_face.is_some_and(|off_face| off_face(column_in_photo, row_in_photo));
                if facing < MIN_VIEW_COSINE {
                    continue;
                }
                let colour = bilinear(pixels, width, height, x, y);
                rgb[column * 3..column * 3 + 3].copy_from_slice(&colour);
                pixels_per_mm[column] = facing * k.fx as f32 / p[2];
            }
        });
    let observed = pixels_per_mm.iter().map(|&d| f32::from(d > 0.0)).collect();
    Ok(Projection {
        texture: UvTexture {
            size,
            rgb,
            observed,
        },
        pixels_per_mm,
        off_face: texel_off_face,
    })
}

/// How strongly [`Projection::fuse`] prefers the photo that saw a texel in most detail: the
/// weights are [`Projection::pixels_per_mm`] to this power, so a texel seen head-on by one
/// photo and at 60° by another (or from twice as far) takes 94 % of its colour from the
/// first. On four photos of one person (frl_lisa) a power of 4 on the view cosine alone
/// brought the merged face's FaceRes distance to her other photos to 0.276, with the
/// distance from the camera too to 0.262.
const FUSE_DETAIL_POWER: i32 = 4;

/// How much further a photo's expression may move a texel's surface than the most neutral
/// photo's, in millimetres, and still count fully in [`Projection::fuse`]: the fitted
/// expressions of photos that all look neutral differ by about this much.
pub const EXPRESSION_FUSE_TOLERANCE_MM: f32 = 1.0;

/// Each millimetre beyond [`EXPRESSION_FUSE_TOLERANCE_MM`] that a photo's expression moved a
/// texel's surface further than the most neutral photo's divides its weight in
/// [`Projection::fuse`] by e: a smile, which moves the lips and cheeks by several
/// millimetres, gives way to a neutral photo there.
pub const EXPRESSION_FUSE_MM: f32 = 1.0;

/// Per texel of the model's UV layout at `size × size` (as [`project_photo`] lays it out), for
/// each pair of posings `(a, b)` (each `[N, 3]`, the model's vertices, millimetres), the
/// distance between their surface points, 0 where the layout has no surface: e.g. how far each
/// photo's fitted expression moved the face from its neutral posing, for [`Projection::fuse`].
/// One map per pair, the layout rasterized once for all.
pub fn surface_distances(
    model: &MorphableModel,
    posings: &[(&Tensor, &Tensor)],
    size: usize,
) -> Result<Vec<Vec<f32>>, OptimError> {
    if posings.is_empty() {
        return Ok(Vec::new());
    }
    let (skin, skin_uv) = skin_triangles(model);
    let triangles = Triangles::new(skin, model.n_vertices())?;
    let skin_uv = Triangles::new(skin_uv, model.uvs().len())?;
    let uv_rast = rasterize_uv_layout(model.uvs(), &skin_uv, size)?;
    // One channel per pair: [V, pairs].
    let lengths = posings
        .iter()
        .map(|(a, b)| {
            let offsets = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
            offsets
                .to_device(&Device::Cpu)?
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let per_texel = interpolate(&Tensor::cat(&lengths, 1)?, &uv_rast, &triangles)?;
    let per_texel = per_texel.squeeze(0)?.permute((2, 0, 1))?;
    Ok((0..posings.len())
        .map(|pair| per_texel.get(pair)?.flatten_all()?.to_vec1())
        .collect::<candle_core::Result<_>>()?)
}

impl Projection {
    /// This projection without the texels the photo saw off the face
    /// ([`Projection::off_face`]), for views away from the photo's camera, which should not
    /// show the photo's collar or backdrop on the jaw.
    pub fn on_face(&self) -> Projection {
        let mut on_face = self.clone();
        for (texel, _) in self.off_face.iter().enumerate().filter(|(_, off)| **off) {
            on_face.texture.observed[texel] = 0.0;
            on_face.texture.rgb[texel * 3..][..3].fill(0.0);
            on_face.pixels_per_mm[texel] = 0.0;
        }
        on_face
    }

    /// One texture from the projections of several photos of one face, all at one size, for
    /// views of the face without expression: each texel the weighted mean of the colours the
    /// photos saw there, weighted by the fourth power of the detail they saw
    /// ([`Projection::pixels_per_mm`]), so the far side of a turned head comes from the photo
    /// that faced it and a face seen close outweighs one seen from afar, and by how little
    /// each photo's expression moved the surface there: each projection comes with that
    /// movement per texel in millimetres (see [`surface_distances`]), and every
    /// [`EXPRESSION_FUSE_MM`] more than the least among the photos that saw the texel, beyond
    /// [`EXPRESSION_FUSE_TOLERANCE_MM`], divides its weight by e, so a smiling photo's teeth
    /// and creases do not show through a neutral photo's closed lips while both count alike
    /// where the smile moved nothing. Each photo's colours are first scaled per channel to the
    /// first photo's brightness where both saw the face, so differently exposed photos meet
    /// without seams. Texels no photo saw stay unobserved.
    pub fn fuse(photos: &[(&Projection, &[f32])]) -> Result<UvTexture, OptimError> {
        let Some(&(first, _)) = photos.first() else {
            return Err(OptimError::InvalidInput(
                "fusing textures needs at least one projection".to_string(),
            ));
        };
        let size = first.texture.size;
        if let Some((other, _)) = photos.iter().find(|(p, _)| p.texture.size != size) {
            return Err(OptimError::InvalidInput(format!(
                "fused projections must share one size; got {size} and {}",
                other.texture.size
            )));
        }
        let texels = size * size;
        if let Some((_, moved)) = photos.iter().find(|(_, moved)| {
            moved.len() != texels || moved.iter().any(|m| !(*m >= 0.0 && m.is_finite()))
        }) {
            return Err(OptimError::InvalidInput(format!(
                "the expression's movement of a fused photo needs one finite distance of 0 or \
                 more per texel, {texels}; got {} values",
                moved.len()
            )));
        }
        let gains: Vec<[f32; 3]> = photos
            .iter()
            .map(|(p, _)| p.brightness_relative_to(first))
            .collect();
        let mut rgb = vec![0.0f32; texels * 3];
        let mut observed = vec![0.0f32; texels];
        rgb.par_chunks_exact_mut(3)
            .zip(observed.par_iter_mut())
            .enumerate()
            .for_each(|(texel, (colour, observed))| {
                let least_moved = photos
                    .iter()
                    .filter(|(p, _)| p.pixels_per_mm[texel] > 0.0)
                    .map(|(_, moved)| moved[texel])
                    .fold(f32::INFINITY, f32::min);
                let mut total = 0.0f32;
                for ((projection, moved), gain) in photos.iter().zip(&gains) {
                    let detail = projection.pixels_per_mm[texel].powi(FUSE_DETAIL_POWER);
                    let beyond = moved[texel] - least_moved - EXPRESSION_FUSE_TOLERANCE_MM;
                    let neutral = (-beyond.max(0.0) / EXPRESSION_FUSE_MM).exp();
                    let weight = detail * neutral;
                    if weight > 0.0 {
                        let seen = &projection.texture.rgb[texel * 3..][..3];
                        for c in 0..3 {
                            colour[c] += weight * seen[c] * gain[c];
                        }
                        total += weight;
                    }
                }
                if total > 0.0 {
                    colour
                        .iter_mut()
                        .for_each(|v| *v = (*v / total).clamp(0.0, 1.0));
                    *observed = 1.0;
                }
            });
        Ok(UvTexture {
            size,
            rgb,
            observed,
        })
    }

    /// Per channel, the factor that brings this projection's colours to `reference`'s
    /// brightness: the ratio of their sums over the texels both saw, each texel weighted by
    /// the lesser detail. 1 where they share too few texels to tell.
    fn brightness_relative_to(&self, reference: &Projection) -> [f32; 3] {
        let (mut own, mut wanted, mut shared) = ([0.0f64; 3], [0.0f64; 3], 0usize);
        for texel in 0..self.pixels_per_mm.len() {
            let weight = f64::from(self.pixels_per_mm[texel].min(reference.pixels_per_mm[texel]));
            if weight <= 0.0 {
                continue;
            }
            for c in 0..3 {
                own[c] += weight * f64::from(self.texture.rgb[texel * 3 + c]);
                wanted[c] += weight * f64::from(reference.texture.rgb[texel * 3 + c]);
            }
            shared += 1;
        }
        brightness_gain(wanted, own, shared)
    }
}

/// Per channel, `wanted / own` (sums of colours over `texels` texels), within
/// [`MAX_SHADING_GAIN`] of 1; 1 where fewer than [`MIN_SHADING_TEXELS`] texels were summed.
fn brightness_gain(wanted: [f64; 3], own: [f64; 3], texels: usize) -> [f32; 3] {
    [0, 1, 2].map(|c| {
        if texels < MIN_SHADING_TEXELS || own[c] <= 0.0 {
            1.0
        } else {
            ((wanted[c] / own[c]) as f32).clamp(1.0 / MAX_SHADING_GAIN, MAX_SHADING_GAIN)
        }
    })
}

/// The rasterizer's output `[1, size, size, 4]` (see `ganfit_render::rasterize`) for the UV
/// layout: one pixel per texel of a `size × size` UV map in image orientation (row 0 at
/// `v = 1`), `uv_triangles` (into `uvs`) as the geometry. Interpolating with the parallel
/// mesh triangles gives each texel's surface point.
pub fn rasterize_uv_layout(
    uvs: &[[f32; 2]],
    uv_triangles: &Triangles,
    size: usize,
) -> Result<Tensor, OptimError> {
    let uv_clip: Vec<f32> = uvs
        .iter()
        .flat_map(|&[u, v]| [2.0 * u - 1.0, 2.0 * (1.0 - v) - 1.0, 0.0, 1.0])
        .collect();
    let uv_clip = Tensor::from_vec(uv_clip, (1, uvs.len(), 4), &Device::Cpu)?;
    Ok(rasterize(
        &uv_clip,
        uv_triangles,
        size,
        size,
        RasterOptions::default(),
    )?)
}

/// The elements of a contiguous f32 CPU tensor's storage, borrowed: the maps read here are
/// megabytes, and copying them out costs more than the pass over them.
fn cpu_f32<'a>(storage: &'a StorageRef<'_>, layout: &Layout) -> Result<&'a [f32], OptimError> {
    match (&**storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Ok(&values[start..end]),
        _ => Err(OptimError::InvalidInput(
            "unwrap reads contiguous f32 maps on the CPU".to_string(),
        )),
    }
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

impl UvTexture {
    /// How deep inside the observed texels each texel lies, for blending them into something
    /// else without a seam: 0 outside them and on their edge, rising to 1 at `radius` texels
    /// in (twice a box blur's excess of the observed share over a half).
    pub fn observed_interior(&self, radius: usize) -> Vec<f32> {
        let mut share = self.observed.clone();
        let mut scratch = vec![0.0; share.len()];
        box_blur(&mut share, &mut scratch, self.size, 1, radius);
        share
            .iter()
            .zip(&self.observed)
            .map(|(&blurred, &observed)| observed * (2.0 * blurred - 1.0).clamp(0.0, 1.0))
            .collect()
    }

    /// Fills the texels the photo did not see: near seen ones with their average (a
    /// normalised convolution over a few texels, which closes the specks a depth test leaves),
    /// farther away with `background` (`size × size × 3`, e.g. a fitted albedo), scaled per
    /// channel to the photo's brightness where both exist, or with the seen texels' mean
    /// colour when there is no background. Seen texels keep the photo's colour exactly.
    pub fn fill_unobserved(&mut self, background: Option<&[f32]>) {
        if let Some(fill) = Fill::new(self, background) {
            fill.apply(self, None);
        }
    }

    /// [`UvTexture::fill_unobserved`], but where only the mirror position (`u → 1 − u`: the
    /// face's UV layout is left–right symmetric about `u = 0.5`) was seen, the texel takes the
    /// colour seen there: the far cheek of a turned head shows the near cheek's skin, beard
    /// and brow rather than a blur. For views away from the photo's (the frontal render, the
    /// exported mesh); a render through the photo's own camera should keep
    /// [`UvTexture::fill_unobserved`], whose background was fitted to the photo's grazing
    /// texels.
    pub fn fill_unobserved_mirrored(&mut self, background: Option<&[f32]>) {
        if let Some(fill) = Fill::new(self, background) {
            fill.apply(self, Some(&MirrorFill::new(self)));
        }
    }

    /// This texture filled both ways: `(`[`fill_unobserved`](Self::fill_unobserved)`,`
    /// [`fill_unobserved_mirrored`](Self::fill_unobserved_mirrored)`)`, the same texels as the
    /// two calls give, with what they share (the blur of the seen colours, the brightness
    /// gain) computed once and the two fills run side by side.
    pub fn filled_both_ways(&self, background: Option<&[f32]>) -> (UvTexture, UvTexture) {
        let (mut plain, mut mirrored) = (self.clone(), self.clone());
        let (fill, mirror) = rayon::join(|| Fill::new(self, background), || MirrorFill::new(self));
        if let Some(fill) = fill {
            rayon::join(
                || fill.apply(&mut plain, None),
                || fill.apply(&mut mirrored, Some(&mirror)),
            );
        }
        (plain, mirrored)
    }

    /// Fills the unseen texels from the seen ones nearest them, however far (a push-pull
    /// fill): the seen colours are averaged over blocks of 2 × 2, 4 × 4, … texels up to the
    /// whole map, and each unseen texel takes the finest of those averages that saw anything,
    /// blended smoothly into the coarser ones. For a map with holes and nothing else to fill
    /// them from (an albedo with the texels of a photo's collar cut out).
    pub fn fill_unobserved_from_afar(&mut self) {
        if !self.observed.iter().any(|&o| o > 0.0) {
            return;
        }
        // Push: weighted colours and their weights, [r·w, g·w, b·w, w] per texel, summed over
        // ever larger blocks.
        let finest: Vec<[f32; 4]> = self
            .rgb
            .par_chunks_exact(3)
            .zip(&self.observed)
            .map(|(c, &w)| [c[0] * w, c[1] * w, c[2] * w, w])
            .collect();
        let mut pyramid = vec![(self.size, finest)];
        while let Some((side, sums)) = pyramid.last().filter(|(side, _)| *side > 1) {
            let (side, half) = (*side, side.div_ceil(2));
            let mut coarser = vec![[0.0f32; 4]; half * half];
            coarser
                .par_chunks_mut(half)
                .enumerate()
                .for_each(|(row, blocks)| {
                    for fine_row in (2 * row..2 * row + 2).filter(|&r| r < side) {
                        for (column, sum) in sums[fine_row * side..][..side].iter().enumerate() {
                            let block = &mut blocks[column / 2];
                            for (total, value) in block.iter_mut().zip(sum) {
                                *total += value;
                            }
                        }
                    }
                });
            pyramid.push((half, coarser));
        }
        // Pull: from the whole map's mean down, each level's own average where its block saw
        // a texel's worth, blended with the coarser level's colours interpolated to it; the
        // finest level's unseen texels take the next coarser level's alone.
        // A finer texel's centre in the coarser level's texels (each covers 2 × 2 of it).
        let coarser_at = |position: usize| (position as f32 + 0.5) / 2.0 - 0.5;
        let mut pulled: Vec<f32> = Vec::new();
        let mut pulled_side = 0;
        for (side, sums) in pyramid[1..].iter().rev() {
            let coarser = &pulled;
            let level: Vec<f32> = (0..side * side)
                .into_par_iter()
                .flat_map_iter(|texel| {
                    let [r, g, b, weight] = sums[texel];
                    let far = if coarser.is_empty() {
                        [0.0; 3]
                    } else {
                        let (x, y) = (coarser_at(texel % side), coarser_at(texel / side));
                        bilinear(coarser, pulled_side, pulled_side, x, y)
                    };
                    let trust = weight.min(1.0);
                    let own = [r, g, b].map(|v| v / weight.max(f32::MIN_POSITIVE));
                    [0, 1, 2].map(|c| trust * own[c] + (1.0 - trust) * far[c])
                })
                .collect();
            pulled = level;
            pulled_side = *side;
        }
        let (size, observed) = (self.size, &self.observed);
        self.rgb
            .par_chunks_exact_mut(3)
            .enumerate()
            .filter(|(texel, _)| observed[*texel] == 0.0)
            .for_each(|(texel, colour)| {
                let (x, y) = (coarser_at(texel % size), coarser_at(texel / size));
                colour.copy_from_slice(&bilinear(&pulled, pulled_side, pulled_side, x, y));
            });
    }

    /// Per channel, how much brighter the side of the map that needs mirror filling was seen
    /// than the other side at the mirror positions, where the photo saw both (ratio of sums):
    /// the photo's light falls differently on the two halves of a turned face, so a cheek
    /// copied from the lit side is too bright beside the shaded side's seen texels by this
    /// much. 1 where too few texels were seen on both sides to tell.
    fn mirror_shading_gain(&self) -> [f32; 3] {
        let size = self.size;
        let seen = |t: usize| self.observed[t] > 0.0;
        let left = |t: usize| t % size < size / 2;
        let (mut fill_left, mut fill_right) = (0usize, 0usize);
        for t in (0..size * size).filter(|&t| !seen(t) && seen(self.mirror(t))) {
            if left(t) {
                fill_left += 1;
            } else {
                fill_right += 1;
            }
        }
        let filled_side = |t: usize| left(t) == (fill_left >= fill_right);
        let (mut own, mut opposite, mut count) = ([0.0f64; 3], [0.0f64; 3], 0usize);
        for t in (0..size * size).filter(|&t| filled_side(t) && seen(t) && seen(self.mirror(t))) {
            for c in 0..3 {
                own[c] += f64::from(self.rgb[t * 3 + c]);
                opposite[c] += f64::from(self.rgb[self.mirror(t) * 3 + c]);
            }
            count += 1;
        }
        brightness_gain(own, opposite, count)
    }

    /// The texel at the mirror position of `texel` (`u → 1 − u`).
    fn mirror(&self, texel: usize) -> usize {
        let column = texel % self.size;
        texel - column + (self.size - 1 - column)
    }

    /// Radius of the fills' blur: a few texels at any resolution.
    fn blur_radius(&self) -> usize {
        (self.size / 256).max(1)
    }

    /// The weighted colours `weight(t) · rgb[source(t)]` and the density `weight(t)`, as four
    /// channels per texel, box-blurred twice: the ratio of the first three to the fourth is a
    /// smooth average of the weighted texels.
    fn blurred(
        &self,
        weight: impl Fn(usize) -> f32 + Sync,
        source: impl Fn(usize) -> usize + Sync,
    ) -> BlurredColours {
        let mut values = vec![0.0f32; self.size * self.size * 4];
        values
            .par_chunks_exact_mut(4)
            .enumerate()
            .for_each(|(texel, out)| {
                let density = weight(texel);
                let colour = &self.rgb[source(texel) * 3..][..3];
                out.copy_from_slice(&[
                    colour[0] * density,
                    colour[1] * density,
                    colour[2] * density,
                    density,
                ]);
            });
        let mut scratch = vec![0.0f32; values.len()];
        for _ in 0..2 {
            box_blur(&mut values, &mut scratch, self.size, 4, self.blur_radius());
        }
        BlurredColours(values)
    }
}

/// Colours blurred with their density ([`UvTexture::blurred`]).
struct BlurredColours(Vec<f32>);

impl BlurredColours {
    /// Full trust in the average at `texel` where at least half its window was weighted.
    fn trust(&self, texel: usize) -> f32 {
        (2.0 * self.0[texel * 4 + 3]).min(1.0)
    }

    /// The average of channel `c` at `texel`, `otherwise` where nothing was weighted near.
    fn average(&self, texel: usize, c: usize, otherwise: f32) -> f32 {
        let density = self.0[texel * 4 + 3];
        if density > 0.0 {
            self.0[texel * 4 + c] / density
        } else {
            otherwise
        }
    }
}

/// What a fill of the unseen texels needs from the seen ones.
struct Fill<'a> {
    background: Option<&'a [f32]>,
    /// Per channel, the seen texels' colour over the background's there.
    gain: [f32; 3],
    /// The seen colours, blurred.
    direct: BlurredColours,
}

/// What a mirror fill needs besides: the colours seen only at the mirror position, blurred,
/// and their shading gain ([`UvTexture::mirror_shading_gain`]).
struct MirrorFill {
    mirrored: BlurredColours,
    gain: [f32; 3],
}

impl MirrorFill {
    fn new(texture: &UvTexture) -> Self {
        let observed = &texture.observed;
        MirrorFill {
            mirrored: texture.blurred(
                |t| observed[texture.mirror(t)] * (1.0 - observed[t]),
                |t| texture.mirror(t),
            ),
            gain: texture.mirror_shading_gain(),
        }
    }
}

impl<'a> Fill<'a> {
    /// `None` where nothing was seen or `background` does not cover the map: nothing to fill
    /// from.
    fn new(texture: &UvTexture, background: Option<&'a [f32]>) -> Option<Self> {
        let texels = texture.size * texture.size;
        let seen = texture.observed.iter().filter(|&&o| o > 0.0).count();
        if seen == 0 || background.is_some_and(|b| b.len() != texels * 3) {
            return None;
        }
        let mut sums = [[0.0f64; 3]; 2];
        for texel in (0..texels).filter(|&t| texture.observed[t] > 0.0) {
            for c in 0..3 {
                sums[0][c] += f64::from(texture.rgb[texel * 3 + c]);
                sums[1][c] += f64::from(background.map_or(1.0, |b| b[texel * 3 + c]));
            }
        }
        // Without a background the fill is the mean colour: a constant 1 times that gain.
        let gain = [0, 1, 2].map(|c| {
            if sums[1][c] > 0.0 {
                (sums[0][c] / sums[1][c]) as f32
            } else {
                1.0
            }
        });
        // Colours seen on the photo (and, in a mirror fill, those seen only at the mirror
        // position) each as a normalised convolution, so both blend smoothly at their borders.
        let direct = texture.blurred(|t| texture.observed[t], |t| t);
        Some(Fill {
            background,
            gain,
            direct,
        })
    }

    /// Fills `texture`'s unseen texels (`texture` is the one this fill was measured on, or a
    /// copy).
    fn apply(&self, texture: &mut UvTexture, mirror: Option<&MirrorFill>) {
        let size = texture.size;
        let observed = &texture.observed;
        let rows = texture.rgb.par_chunks_mut(size * 3).enumerate();
        rows.for_each(|(row, rgb)| {
            for column in (0..size).filter(|&column| observed[row * size + column] == 0.0) {
                let texel = row * size + column;
                let near_trust = self.direct.trust(texel);
                for c in 0..3 {
                    let mut far = self.background.map_or(1.0, |b| b[texel * 3 + c]) * self.gain[c];
                    if let Some(MirrorFill { mirrored, gain }) = mirror {
                        let mirror_trust = mirrored.trust(texel);
                        let seen_opposite = mirrored.average(texel, c, far / gain[c]) * gain[c];
                        far = mirror_trust * seen_opposite + (1.0 - mirror_trust) * far;
                    }
                    let near = self.direct.average(texel, c, far);
                    rgb[column * 3 + c] =
                        (near_trust * near + (1.0 - near_trust) * far).clamp(0.0, 1.0);
                }
            }
        });
    }
}

/// Replaces each value of a `size × size × channels` image by the mean over a
/// `(2·radius + 1)²` window (shrunk at the borders), as a running-sum pass along the rows into
/// `scratch` (as long as `values`) and one down the columns back. The column pass keeps one
/// running sum per column and walks whole rows, so every read is sequential (a map is
/// megabytes; a walk down each column missed the cache at every step).
fn box_blur(values: &mut [f32], scratch: &mut [f32], size: usize, channels: usize, radius: usize) {
    let row_length = size * channels;
    let window = |inner: usize| (inner.saturating_sub(radius), (inner + radius + 1).min(size));
    let rows = values.par_chunks_exact(row_length);
    rows.zip(scratch.par_chunks_exact_mut(row_length))
        .for_each(|(row, line)| {
            for c in 0..channels {
                let mut sum = 0.0f64;
                let mut span = (0, 0);
                for inner in 0..size {
                    let (lo, hi) = window(inner);
                    while span.1 < hi {
                        sum += f64::from(row[span.1 * channels + c]);
                        span.1 += 1;
                    }
                    while span.0 < lo {
                        sum -= f64::from(row[span.0 * channels + c]);
                        span.0 += 1;
                    }
                    line[inner * channels + c] = (sum / (hi - lo) as f64) as f32;
                }
            }
        });
    // Bands of rows in parallel, each starting its running sums afresh.
    const BAND_ROWS: usize = 32;
    let rows: &[f32] = scratch;
    let row_at = |r: usize| &rows[r * row_length..][..row_length];
    let bands = values.par_chunks_mut(BAND_ROWS * row_length).enumerate();
    bands.for_each(|(band, out)| {
        let mut sums = vec![0.0f64; row_length];
        let first = band * BAND_ROWS;
        let mut span = (window(first).0, window(first).0);
        for (offset, out) in out.chunks_exact_mut(row_length).enumerate() {
            let (lo, hi) = window(first + offset);
            while span.1 < hi {
                sums.iter_mut()
                    .zip(row_at(span.1))
                    .for_each(|(s, &v)| *s += f64::from(v));
                span.1 += 1;
            }
            while span.0 < lo {
                sums.iter_mut()
                    .zip(row_at(span.0))
                    .for_each(|(s, &v)| *s -= f64::from(v));
                span.0 += 1;
            }
            let count = (hi - lo) as f64;
            out.iter_mut()
                .zip(&sums)
                .for_each(|(o, &s)| *o = (s / count) as f32);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texture(size: usize, observed: impl Fn(usize, usize) -> bool) -> UvTexture {
        let mut rgb = vec![0.0; size * size * 3];
        let mut seen = vec![0.0; size * size];
        for row in 0..size {
            for column in 0..size {
                if observed(row, column) {
                    let t = row * size + column;
                    rgb[t * 3..t * 3 + 3].copy_from_slice(&[0.8, 0.6, 0.4]);
                    seen[t] = 1.0;
                }
            }
        }
        UvTexture {
            size,
            rgb,
            observed: seen,
        }
    }

    #[test]
    fn a_speck_takes_its_neighbours_colour_and_far_texels_the_scaled_background() {
        // Left half seen except one speck; the right half never.
        let mut t = texture(64, |row, column| column < 32 && (row, column) != (20, 10));
        let background = vec![0.5f32; 64 * 64 * 3];
        t.fill_unobserved(Some(&background));
        let at = |row: usize, column: usize| &t.rgb[(row * 64 + column) * 3..][..3];
        for (got, want) in at(20, 10).iter().zip([0.8, 0.6, 0.4]) {
            assert!((got - want).abs() < 1e-5, "speck {got} vs {want}");
        }
        // Far from anything seen: background 0.5 times the gain photo/background = 0.8/0.5 …
        for (got, want) in at(40, 60).iter().zip([0.8, 0.6, 0.4]) {
            assert!((got - want).abs() < 1e-5, "far {got} vs {want}");
        }
        assert!(
            t.observed[20 * 64 + 10] == 0.0,
            "filling does not mark texels seen"
        );
    }

    #[test]
    fn a_background_shows_its_own_pattern_where_nothing_was_seen() {
        let mut t = texture(32, |_, column| column < 8);
        let background: Vec<f32> = (0..32 * 32 * 3)
            .map(|i| if (i / 3) % 2 == 0 { 0.2 } else { 0.6 })
            .collect();
        t.fill_unobserved(Some(&background));
        // Blue: the seen colour 0.4 equals the background's mean, so the gain is 1.
        let far = |texel: usize| t.rgb[texel * 3 + 2];
        let (even, odd) = (far(31 * 32 + 30), far(31 * 32 + 31));
        assert!(
            odd > even * 2.5,
            "the background's pattern survives: {even} {odd}"
        );
    }

    /// Side of the patterned maps.
    const PATTERN_SIZE: usize = 64;

    /// A colour that changes along both axes, mirror-symmetric about the map's middle.
    fn pattern(row: usize, column: usize) -> [f32; 3] {
        let column = column.min(PATTERN_SIZE - 1 - column);
        [row as f32 / 64.0, column as f32 / 32.0, 0.5]
    }

    /// Columns `0..seen` seen with [`pattern`], those right of the middle at `right_shade` of
    /// its brightness; filled by [`UvTexture::fill_unobserved_mirrored`] over a dark background.
    fn mirror_filled(seen: usize, right_shade: f32) -> UvTexture {
        let size = PATTERN_SIZE;
        let mut t = texture(size, |_, column| column < seen);
        for row in 0..size {
            for column in 0..seen {
                let shade = if column < size / 2 { 1.0 } else { right_shade };
                t.rgb[(row * size + column) * 3..][..3]
                    .copy_from_slice(&pattern(row, column).map(|v| v * shade));
            }
        }
        t.fill_unobserved_mirrored(Some(&vec![0.1f32; size * size * 3]));
        t
    }

    /// Asserts that the texels at `places` hold [`pattern`] at `shade` of its brightness.
    fn assert_pattern(t: &UvTexture, places: &[(usize, usize)], shade: f32) {
        for &(row, column) in places {
            let got = &t.rgb[(row * PATTERN_SIZE + column) * 3..][..3];
            let want = pattern(row, column).map(|v| v * shade);
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-5,
                    "({row}, {column}): {got:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn holes_take_the_colours_seen_nearest_them_however_far() {
        // Seen: a red left third and a blue right third of the map; a hole of 80 × 80 texels in
        // the red third's middle.
        let size = 256;
        let colour = |column: usize| {
            if column < size / 3 {
                [0.9, 0.1, 0.1]
            } else {
                [0.1, 0.1, 0.9]
            }
        };
        let hole =
            |row: usize, column: usize| (88..168).contains(&row) && (5..85).contains(&column);
        let mut t = texture(size, |row, column| {
            (column < size / 3 || column >= 2 * size / 3) && !hole(row, column)
        });
        for texel in 0..size * size {
            if t.observed[texel] > 0.0 {
                t.rgb[texel * 3..][..3].copy_from_slice(&colour(texel % size));
            }
        }
        let before = t.clone();
        t.fill_unobserved_from_afar();
        let at = |row: usize, column: usize| &t.rgb[(row * size + column) * 3..][..3];
        // The hole's middle lies 40 texels from the red and 85 from the blue; its edges next
        // to the red.
        for (row, column, least_red) in [(128, 45, 0.7), (90, 10, 0.8), (165, 80, 0.8)] {
            let [r, g, b] = [0, 1, 2].map(|c| at(row, column)[c]);
            assert!(
                r > least_red && g < 0.15 && b < 1.0 - least_red,
                "({row}, {column}) in the hole: {:?}",
                at(row, column)
            );
        }
        // Midway between the red and the blue, some of each.
        let middle = at(200, size / 2);
        assert!(middle[0] > 0.2 && middle[2] > 0.2, "{middle:?}");
        for texel in (0..size * size).filter(|&t| before.observed[t] > 0.0) {
            assert_eq!(t.rgb[texel * 3..][..3], before.rgb[texel * 3..][..3]);
        }
        assert_eq!(t.observed, before.observed, "filling marks nothing seen");
    }

    #[test]
    fn the_far_side_takes_the_mirrored_near_side_where_the_photo_saw_only_that() {
        // The left half seen; the right half never.
        let places = [(5, 40), (30, 50), (60, 61), (12, 36)];
        assert_pattern(&mirror_filled(PATTERN_SIZE / 2, 1.0), &places, 1.0);
        // The plain fill knows nothing of the pattern there: the seen texels' mean.
        let mut plain = texture(PATTERN_SIZE, |_, column| column < PATTERN_SIZE / 2);
        for row in 0..PATTERN_SIZE {
            for column in 0..PATTERN_SIZE / 2 {
                plain.rgb[(row * PATTERN_SIZE + column) * 3..][..3]
                    .copy_from_slice(&pattern(row, column));
            }
        }
        plain.fill_unobserved(Some(&vec![0.1f32; PATTERN_SIZE * PATTERN_SIZE * 3]));
        for (row, column) in places {
            let plain = &plain.rgb[(row * PATTERN_SIZE + column) * 3..][..3];
            assert!((plain[0] - 63.0 / 128.0).abs() < 1e-3, "{plain:?}");
        }
    }

    #[test]
    fn mirrored_colours_take_the_shading_of_the_side_they_fill() {
        // On the right only a strip beside the middle was seen, at half the brightness (the
        // photo's light came from the left): the copies are shaded alike.
        let t = mirror_filled(40, 0.5);
        assert_pattern(&t, &[(5, 50), (30, 55), (60, 61), (12, 45)], 0.5);
    }

    #[test]
    fn filling_both_ways_gives_each_fills_texels() {
        // The far side needs the mirror; a speck on the seen side only the plain fill.
        let mut t = texture(PATTERN_SIZE, |row, column| {
            column < 40 && (row, column) != (20, 10)
        });
        for (texel, rgb) in t.rgb.chunks_mut(3).enumerate() {
            if t.observed[texel] > 0.0 {
                rgb.copy_from_slice(&pattern(texel / PATTERN_SIZE, texel % PATTERN_SIZE));
            }
        }
        let background: Vec<f32> = (0..PATTERN_SIZE * PATTERN_SIZE * 3)
            .map(|i| 0.1 + (i % 7) as f32 / 20.0)
            .collect();
        let (plain, mirrored) = t.filled_both_ways(Some(&background));
        let mut want_plain = t.clone();
        want_plain.fill_unobserved(Some(&background));
        let mut want_mirrored = t.clone();
        want_mirrored.fill_unobserved_mirrored(Some(&background));
        assert_eq!(plain, want_plain);
        assert_eq!(mirrored, want_mirrored);
        assert_ne!(plain, mirrored, "the two fills differ on the far side");
        // Nothing seen: nothing to fill from, both stay as they were.
        let unseen = texture(8, |_, _| false);
        let (plain, mirrored) = unseen.filled_both_ways(None);
        assert_eq!((&plain, &mirrored), (&unseen, &unseen));
    }

    #[test]
    fn box_blur_is_the_mean_over_each_window_clipped_to_the_map() {
        let channels = 3;
        // 70 rows span several of the column pass's bands.
        for (size, radius) in [(11, 1), (11, 3), (11, 12), (70, 3)] {
            let original: Vec<f32> = (0..size * size * channels)
                .map(|i| ((i * 7919 % 1000) as f32) / 1000.0)
                .collect();
            let mut blurred = original.clone();
            box_blur(
                &mut blurred,
                &mut vec![0.0; size * size * channels],
                size,
                channels,
                radius,
            );
            for row in 0..size {
                for column in 0..size {
                    let rows = row.saturating_sub(radius)..(row + radius + 1).min(size);
                    let columns = column.saturating_sub(radius)..(column + radius + 1).min(size);
                    let count = (rows.len() * columns.len()) as f32;
                    for c in 0..channels {
                        let mut sum = 0.0;
                        for r in rows.clone() {
                            for k in columns.clone() {
                                sum += original[(r * size + k) * channels + c];
                            }
                        }
                        let got = blurred[(row * size + column) * channels + c];
                        assert!(
                            (got - sum / count).abs() < 1e-5,
                            "radius {radius} at ({row}, {column}, {c}): {got} vs {}",
                            sum / count
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_observed_interior_rises_from_the_edge_to_one_inside() {
        let seen = texture(20, |_, column| column >= 10);
        let interior = seen.observed_interior(3);
        let at = |column: usize| interior[5 * 20 + column];
        assert_eq!(at(9), 0.0, "unobserved");
        assert!(
            at(10) < 0.5 && at(10) < at(11) && at(11) < at(12),
            "{interior:?}"
        );
        assert_eq!(at(13), 1.0);
        assert_eq!(at(19), 1.0);
    }

    #[test]
    fn box_blur_keeps_a_constant_and_averages_a_step() {
        let mut constant = vec![0.3f32; 10 * 10];
        box_blur(&mut constant, &mut [0.0; 100], 10, 1, 2);
        assert!(constant.iter().all(|v| (v - 0.3).abs() < 1e-6));
        let mut step: Vec<f32> = (0..100)
            .map(|i| if i % 10 < 5 { 0.0 } else { 1.0 })
            .collect();
        box_blur(&mut step, &mut [0.0; 100], 10, 1, 1);
        // Column 4 sees columns 3, 4, 5: one of three is 1.
        assert!((step[4] - 1.0 / 3.0).abs() < 1e-6, "{}", step[4]);
    }

    /// A `size × size` projection seeing `colour` in `detail(row, column)` pixels per
    /// millimetre (0: unseen).
    fn projection(
        size: usize,
        colour: [f32; 3],
        detail: impl Fn(usize, usize) -> f32,
    ) -> Projection {
        let pixels_per_mm: Vec<f32> = (0..size * size)
            .map(|t| detail(t / size, t % size))
            .collect();
        let mut texture = texture(size, |row, column| detail(row, column) > 0.0);
        for (t, &d) in pixels_per_mm.iter().enumerate() {
            if d > 0.0 {
                texture.rgb[t * 3..][..3].copy_from_slice(&colour);
            }
        }
        Projection {
            off_face: vec![false; size * size],
            texture,
            pixels_per_mm,
        }
    }

    fn rgb_at(texture: &UvTexture, row: usize, column: usize) -> [f32; 3] {
        let t = row * texture.size + column;
        [0, 1, 2].map(|c| texture.rgb[t * 3 + c])
    }

    #[test]
    fn fused_projections_take_each_texel_from_the_photos_that_saw_it() {
        // One photo saw the left two thirds, the other the right two thirds, both of the same
        // brightness where they overlap.
        let grey = [0.5, 0.5, 0.5];
        let left = projection(30, grey, |_, column| if column < 20 { 0.9 } else { 0.0 });
        let right = projection(30, grey, |_, column| if column >= 10 { 0.9 } else { 0.0 });
        let mut right = right;
        // A mark only the second photo saw, beside one both saw less squarely (the first at
        // half the second's detail) in another colour.
        right.texture.rgb[(5 * 30 + 25) * 3..][..3].copy_from_slice(&[1.0, 0.0, 0.0]);
        right.texture.rgb[(5 * 30 + 15) * 3..][..3].copy_from_slice(&[1.0, 0.0, 0.0]);
        let mut left = left;
        left.pixels_per_mm[5 * 30 + 15] = 0.45;
        let fused = Projection::fuse(&[(&left, &still(30)), (&right, &still(30))]).unwrap();
        assert!(
            fused.observed.iter().all(|&o| o == 1.0),
            "every texel was seen"
        );
        assert_eq!(rgb_at(&fused, 20, 2), grey);
        // 0.45⁴ against 0.9⁴: the more detailed view gives 16/17 of the colour. (The one texel the
        // photos disagree on moves their brightness match by a fraction of a percent.)
        let mixed = [16.0 / 17.0 + 0.5 / 17.0, 0.5 / 17.0, 0.5 / 17.0];
        for (at, want) in [((5, 25), [1.0, 0.0, 0.0]), ((5, 15), mixed)] {
            let got = rgb_at(&fused, at.0, at.1);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 5e-3, "{at:?}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn a_brighter_exposed_photo_is_scaled_to_the_first_before_fusing() {
        let dim = projection(
            16,
            [0.2, 0.3, 0.4],
            |_, column| if column < 12 { 1.0 } else { 0.0 },
        );
        let bright = projection(
            16,
            [0.4, 0.6, 0.8],
            |_, column| if column >= 4 { 1.0 } else { 0.0 },
        );
        let fused = Projection::fuse(&[(&dim, &still(16)), (&bright, &still(16))]).unwrap();
        for column in [0, 8, 15] {
            for (got, want) in rgb_at(&fused, 3, column).iter().zip([0.2, 0.3, 0.4]) {
                assert!(
                    (got - want).abs() < 1e-5,
                    "column {column}: {got} vs {want}"
                );
            }
        }
        // Texels no photo saw stay unseen.
        let edge = projection(
            16,
            [0.2, 0.3, 0.4],
            |_, column| if column < 8 { 1.0 } else { 0.0 },
        );
        let fused = Projection::fuse(&[(&edge, &still(16)), (&edge, &still(16))]).unwrap();
        assert_eq!(fused.observed[3 * 16 + 12], 0.0);
    }

    #[test]
    fn fusing_nothing_or_mixed_sizes_is_an_error() {
        assert!(Projection::fuse(&[]).is_err());
        let (small, large) = (
            projection(8, [0.5; 3], |_, _| 1.0),
            projection(16, [0.5; 3], |_, _| 1.0),
        );
        let error = Projection::fuse(&[(&small, &still(8)), (&large, &still(16))]).unwrap_err();
        assert!(error.to_string().contains("one size"), "{error}");
        for moved in [vec![0.0; 8], vec![-1.0; 64], vec![f32::NAN; 64]] {
            let error = Projection::fuse(&[(&small, &still(8)), (&small, &moved)]).unwrap_err();
            assert!(error.to_string().contains("per texel"), "{error}");
        }
    }

    /// No movement by the expression at any texel of a `size × size` map.
    fn still(size: usize) -> Vec<f32> {
        vec![0.0; size * size]
    }

    #[test]
    fn a_photo_whose_expression_moved_the_surface_gives_way_where_others_saw_it_too() {
        // Both photos saw the left half alike, only the second the right half.
        let neutral = projection(
            16,
            [0.4, 0.4, 0.4],
            |_, column| {
                if column < 8 { 1.0 } else { 0.0 }
            },
        );
        let mut smiling = projection(16, [0.4, 0.4, 0.4], |_, _| 1.0);
        // Teeth where the first photo shows closed lips, on the side only it saw, and on a
        // cheek that both photos' expressions left nearly alike.
        for texel in [3 * 16 + 4, 3 * 16 + 12, 10 * 16 + 2] {
            smiling.texture.rgb[texel * 3..][..3].copy_from_slice(&[0.9, 0.9, 0.9]);
        }
        // The second photo's expression moved the lips by ln 4 = 1.39 mm more than the first's
        // (which moved them too, by 0.5 mm) beyond the tolerance, the side only it saw by
        // 3 mm, and the rest by less than the tolerance more.
        let neutral_moved = vec![0.5; 16 * 16];
        let mut smiling_moved = vec![0.5 + 0.9 * EXPRESSION_FUSE_TOLERANCE_MM; 16 * 16];
        smiling_moved[3 * 16 + 4] =
            0.5 + EXPRESSION_FUSE_TOLERANCE_MM + 4f32.ln() * EXPRESSION_FUSE_MM;
        smiling_moved[3 * 16 + 12] = 3.0;
        let fused =
            Projection::fuse(&[(&neutral, &neutral_moved), (&smiling, &smiling_moved)]).unwrap();
        // The lips 0.4 · 1/1.25 + 0.9 · 0.25/1.25; beside them, however far its expression
        // moved it, all the second photo's colour; the cheek the mean of both. (The light
        // texels, darkened into the first photo's brightness, move each by about 2 %.)
        for (row, column, want) in [(3, 4, 0.5), (3, 12, 0.9), (10, 2, 0.65)] {
            let got = rgb_at(&fused, row, column);
            assert!(got.iter().all(|&v| (v - want).abs() < 0.025), "{got:?}");
        }
    }
}
