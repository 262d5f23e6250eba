//! Differentiable rendering for ganfit: a pinhole camera, a rasteriser, attribute interpolation,
//! texture sampling, shading and silhouette antialiasing, each a candle op with exact gradients,
//! composed by [`Renderer`] into image, mask, depth and normals.
//!
//! The split follows nvdiffrast: [`rasterize`] finds which triangle covers each pixel centre,
//! [`interpolate`] and [`texture`] turn that into per-pixel attributes, [`antialias`] gives
//! silhouettes a position gradient. The kernels run on the CPU (rayon) in f32 or f64, and with the
//! `cuda` feature on CUDA devices too (kernels/render.cu: the same arithmetic, so forward outputs
//! agree bit for bit, except for [`shade_phong`]'s power function).
//!
//! Conventions, shared by every op:
//! * Camera space is OpenCV's: x right, y down, z forward ([`Camera`]).
//! * Images are `[B, H, W, C]`, row 0 at the top of the picture.
//! * In clip space, pixel (column i, row j) has its centre at normalised device coordinates
//!   `((2i + 1) / W - 1, (2j + 1) / H - 1)`, so `y/w = -1` is the top edge (unlike OpenGL,
//!   whose images come out upside down); `z/w` runs from -1 (near) to 1 (far).
//! * `rast` holds `(u, v, z/w, triangle id + 1)` per pixel, zeros where nothing is drawn.
//!
//! Gradients of [`rasterize`] and [`interpolate`] exist only inside covered pixels; the
//! position gradient at silhouettes comes from [`antialias`].
//!
//! The kernels use rayon's current pool; in a one-thread pool (e.g. `RAYON_NUM_THREADS=1`) they
//! run in the calling thread and take their sequential paths.

mod antialias;
mod camera;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod error;
mod interpolate;
mod kernel;
mod raster;
mod renderer;
mod shading;
mod shading_kernels;
mod texture;
mod triangles;

pub use antialias::antialias;
pub use camera::{Camera, camera_from_world, rotation_matrix};
pub use device::cuda_device;
pub use error::{RenderError, Result};
pub use interpolate::interpolate;
pub use raster::{RasterOptions, rasterize};
pub use renderer::{Appearance, Lighting, RenderOptions, Renderer, Rendering, Scene};
pub use shading::{
    PhongLight, normalize, sh_irradiance_basis, shade_phong, shade_sh, vertex_normals,
};
pub use texture::{WrapMode, sample_vertex_colors, texture};
pub use triangles::Triangles;
