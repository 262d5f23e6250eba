//! The composed renderer: mesh + appearance + light + camera -> image, mask, depth, normals.

use candle_core::Tensor;

use crate::antialias::{Silhouettes, blend, coverage};
use crate::camera::{Camera, camera_from_world};
use crate::error::{RenderError, Result};
use crate::interpolate::interpolate;
use crate::raster::{RasterOptions, rasterize};
use crate::shading::{PhongLight, normalize, shade_phong, shade_sh_of_normalized, vertex_normals};
use crate::texture::{WrapMode, texture};
use crate::triangles::Triangles;

/// Switches for [`Renderer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// Drop back-facing triangles (see [`RasterOptions::cull_backfaces`]).
    pub cull_backfaces: bool,
    /// Antialias silhouettes of the image and mask, which gives them position gradients.
    pub antialias: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            cull_backfaces: false,
            antialias: true,
        }
    }
}

/// Where surface colour comes from.
#[derive(Clone, Copy, Debug)]
pub enum Appearance<'a> {
    /// Per-vertex colours `[V, C]` or `[B, V, C]`.
    VertexColors(&'a Tensor),
    /// A texture `[Ht, Wt, C]` or `[B, Ht, Wt, C]` sampled at interpolated texture coordinates.
    Texture {
        /// The texture (row 0 at `v = 0`, see [`crate::texture`]).
        texture: &'a Tensor,
        /// Texture coordinates `[Vt, 2]`, one row per UV vertex.
        uv: &'a Tensor,
        /// UV triangles (same count and order as the mesh's), or `None` when the mesh
        /// triangles index `uv` directly (then `Vt = V`).
        uv_triangles: Option<&'a Triangles>,
        /// Addressing outside `[0, 1]`.
        wrap: WrapMode,
    },
}

/// How the surface is lit.
#[derive(Clone, Copy, Debug)]
pub enum Lighting<'a> {
    /// The albedo as is.
    Unlit,
    /// Lambertian with `[B, C, 9]` spherical-harmonic coefficients in camera space (see
    /// [`crate::shade_sh`]).
    SphericalHarmonics(&'a Tensor),
    /// One directional plus ambient light in camera space (see [`crate::shade_phong`]); needs
    /// three colour channels.
    Phong(&'a PhongLight),
}

/// One batch to draw.
#[derive(Clone, Copy, Debug)]
pub struct Scene<'a> {
    /// World-space vertex positions `[B, V, 3]` or `[V, 3]`.
    pub vertices: &'a Tensor,
    /// Camera-from-world rotation as axis-angle `[B, 3]`.
    pub rotation: &'a Tensor,
    /// Camera-from-world translation `[B, 3]`.
    pub translation: &'a Tensor,
    /// Surface colour.
    pub appearance: Appearance<'a>,
    /// Light.
    pub lighting: Lighting<'a>,
}

/// What [`Renderer::render`] returns; every image is `[B, H, W, _]` with row 0 at the top.
/// Depth and normals are computed when asked for ([`Rendering::depth`],
/// [`Rendering::normals`]): most uses of a render never read them.
#[derive(Clone, Debug)]
pub struct Rendering {
    /// Shaded colour on a black background, antialiased if enabled.
    pub image: Tensor,
    /// Coverage in `[0, 1]`, `[B, H, W, 1]`: 1 on the mesh, fractional on antialiased silhouettes.
    pub mask: Tensor,
    /// The rasteriser output (see [`crate::rasterize`]).
    pub rast: Tensor,
    /// Camera-space vertex positions `[B, V, 3]` (e.g. for projecting landmarks).
    pub camera_vertices: Tensor,
    /// The vertex normals interpolated over the image, before normalisation.
    interpolated_normals: Tensor,
    triangles: Triangles,
}

impl Rendering {
    /// Camera-space depth (z) of the visible surface, 0 on the background, `[B, H, W, 1]`.
    pub fn depth(&self) -> Result<Tensor> {
        let z = self.camera_vertices.narrow(2, 2, 1)?.contiguous()?;
        interpolate(&z, &self.rast, &self.triangles)
    }

    /// Unit camera-space normals of the visible surface, 0 on the background, `[B, H, W, 3]`.
    pub fn normals(&self) -> Result<Tensor> {
        normalize(&self.interpolated_normals)
    }
}

/// [`Lighting`] with what it needs per pixel besides the normals.
enum Light<'a> {
    Unlit,
    SphericalHarmonics(&'a Tensor),
    Phong {
        light: &'a PhongLight,
        /// Unit normals `[B, H, W, 3]`.
        normals: Tensor,
        /// Unit directions to the camera `[B, H, W, 3]`.
        towards_camera: Tensor,
    },
}

/// Draws a fixed mesh topology through a fixed camera; everything else varies per call.
#[derive(Clone, Debug)]
pub struct Renderer {
    triangles: Triangles,
    camera: Camera,
    options: RenderOptions,
}

impl Renderer {
    /// A renderer for meshes with `triangles`, seen through `camera`.
    pub fn new(triangles: Triangles, camera: Camera, options: RenderOptions) -> Self {
        Self {
            triangles,
            camera,
            options,
        }
    }

    /// The camera.
    pub fn camera(&self) -> &Camera {
        &self.camera
    }

    /// Renders a batch. All float inputs must share one dtype (f32 or f64); gradients flow to
    /// vertices, pose, colours or texture, and light.
    pub fn render(&self, scene: &Scene<'_>) -> Result<Rendering> {
        let mut renderings = self.render_with_appearances(scene, &[])?;
        Ok(renderings.swap_remove(0))
    }

    /// Renders `scene`, then the same scene with each of `more` appearances instead, sharing
    /// one rasterization, one set of normals and one silhouette analysis: only the colours,
    /// the shading and the antialiased blend are per appearance, in the forward pass and in
    /// the backward pass (where the shared ops see the appearances' gradients summed). For
    /// renders of one geometry whose colours must pass gradients to different variables, e.g.
    /// a texture and its detached copy. Returns the renderings in that order.
    pub fn render_with_appearances(
        &self,
        scene: &Scene<'_>,
        more: &[Appearance<'_>],
    ) -> Result<Vec<Rendering>> {
        let tris = &self.triangles;
        let cam = &self.camera;
        let camera_vertices = camera_from_world(scene.vertices, scene.rotation, scene.translation)?;
        let clip = cam.to_clip(&camera_vertices)?;
        let raster = RasterOptions {
            cull_backfaces: self.options.cull_backfaces,
        };
        let rast = rasterize(&clip, tris, cam.height, cam.width, raster)?;
        let interpolated_normals =
            interpolate(&vertex_normals(&camera_vertices, tris)?, &rast, tris)?;
        // Phong's unit normals and direction to the camera per pixel, also shared.
        let light = match scene.lighting {
            Lighting::Unlit => Light::Unlit,
            Lighting::SphericalHarmonics(coeffs) => Light::SphericalHarmonics(coeffs),
            Lighting::Phong(phong) => Light::Phong {
                light: phong,
                normals: normalize(&interpolated_normals)?,
                // Negating the vertices rather than the image: one small tensor op, same values.
                towards_camera: normalize(&interpolate(&camera_vertices.neg()?, &rast, tris)?)?,
            },
        };
        // Masking, antialiasing and the mask come from one analysis of the silhouettes.
        let silhouettes = Silhouettes::analyse(&rast, &clip, tris, self.options.antialias)?;
        let mask = if self.options.antialias {
            coverage(&clip, &silhouettes)?
        } else {
            silhouettes.covered(rast.dtype())?
        };

        std::iter::once(&scene.appearance)
            .chain(more)
            .map(|appearance| {
                let albedo = match *appearance {
                    Appearance::VertexColors(colors) => interpolate(colors, &rast, tris)?,
                    Appearance::Texture {
                        texture: tex,
                        uv,
                        uv_triangles,
                        wrap,
                    } => {
                        let uv_tris = uv_triangles.unwrap_or(tris);
                        if uv_tris.len() != tris.len() {
                            return Err(RenderError::Shape {
                                what: "uv_triangles",
                                expected: format!(
                                    "{} triangles, one per mesh triangle",
                                    tris.len()
                                ),
                                got: vec![uv_tris.len(), 3],
                            });
                        }
                        let uv_px = interpolate(uv, &rast, uv_tris)?;
                        texture(tex, &uv_px, wrap)?
                    }
                };
                let shaded = match &light {
                    Light::Unlit => albedo,
                    // Normalised again inside: when the loss does not involve `normals` (as it
                    // rarely does), the backward pass then skips the separate normalisation.
                    Light::SphericalHarmonics(coeffs) => {
                        shade_sh_of_normalized(&albedo, &interpolated_normals, coeffs)?
                    }
                    Light::Phong {
                        light,
                        normals,
                        towards_camera,
                    } => shade_phong(&albedo, normals, towards_camera, light)?,
                };
                Ok(Rendering {
                    image: blend(&shaded, &clip, &silhouettes, true)?,
                    mask: mask.clone(),
                    rast: rast.clone(),
                    camera_vertices: camera_vertices.clone(),
                    interpolated_normals: interpolated_normals.clone(),
                    triangles: tris.clone(),
                })
            })
            .collect()
    }
}
