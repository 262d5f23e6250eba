//! 3D morphable face models as differentiable candle tensors.
//!
//! A [`MorphableModel`] gives face geometry `S(p_s, p_e) = mean + U_s·p_s + U_e·p_e` in
//! millimetres, with triangles, per-corner UVs, named regions, iBUG-68 landmark vertices and
//! vertex normals. Two models are supported: ICT Face Model Light (the default, MIT; [`ict`])
//! and the Surrey Face Model from eos (non-commercial; [`sfm`]). Both are converted on first use
//! from their upstream files into one versioned safetensors file that the `ganfit-assets`
//! resolver verifies and caches. [`export`] writes OBJ+MTL, PLY and binary glTF.
//!
//! ```no_run
//! use candle_core::{Device, Tensor, Var};
//! use ganfit_assets::Resolver;
//! use ganfit_morphable::MorphableModel;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Converted from ../shared/assets/ICT-FaceKit (or GANFIT_ICT_DIR) into the cache on first use.
//! let model = MorphableModel::ict(&Resolver::new(), &Device::Cpu)?.region_model("face")?;
//! let identity = Var::zeros(model.shape_modes(), candle_core::DType::F32, &Device::Cpu)?;
//! let expression = Tensor::zeros(model.expression_modes(), candle_core::DType::F32, &Device::Cpu)?;
//! let vertices = model.instance(identity.as_tensor(), &expression)?; // [9409, 3] millimetres
//! let loss = vertices.sqr()?.mean_all()?;
//! let gradient = loss.backward()?.get(identity.as_tensor()).cloned();
//! # let _ = gradient;
//! # Ok(())
//! # }
//! ```

mod blend;
mod data;
mod error;
pub mod export;
pub mod ict;
mod model;
mod normals;
mod obj;
pub mod sfm;
mod source;

pub use data::{LANDMARK_COUNT, ModelData, ModelInfo};
pub use error::MorphableError;
pub use ict::{ICT_ASSET_ID, IctSource, convert_ict};
pub use model::{MorphableModel, Region, TexturedMesh};
pub use normals::vertex_normals;
pub use sfm::{SFM_ASSET_ID, SfmSource, convert_sfm};

/// Result type of this crate.
pub type Result<T, E = MorphableError> = std::result::Result<T, E>;
