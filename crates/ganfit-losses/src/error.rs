use std::path::PathBuf;

use crate::dlib::DlibFormatError;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// The model file could not be found or verified.
    #[error(transparent)]
    Asset(#[from] ganfit_assets::AssetError),

    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "read".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A dlib `.dat` file is not the expected network.
    #[error(transparent)]
    DlibFormat(#[from] DlibFormatError),

    /// A weights file is not a readable safetensors file.
    #[error(
        "{path} is not a readable safetensors file ({reason}); convert the dlib model with \
         `cargo run --release -p ganfit-losses --example convert_dlib -- <in.dat> <out.safetensors>`"
    )]
    WeightsFile {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        reason: String,
    },

    /// A weights file lacks a tensor the network needs.
    #[error(
        "the weights lack tensor `{name}`: they are not a converted \
         dlib_face_recognition_resnet_model_v1 (convert it with the convert_dlib example)"
    )]
    MissingTensor {
        /// The tensor's name.
        name: String,
    },

    /// A weights tensor has the wrong shape.
    #[error(
        "weights tensor `{name}` has shape {actual:?}, the network needs {expected:?}: the file \
         is not a converted dlib_face_recognition_resnet_model_v1"
    )]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape the network needs.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },

    /// An input tensor has the wrong shape.
    #[error("{what} must have shape {expected}, got {actual:?}")]
    InputShape {
        /// Which input.
        what: &'static str,
        /// The required shape, in words.
        expected: String,
        /// The shape given.
        actual: Vec<usize>,
    },

    /// An input tensor has the right shape but values a loss cannot use.
    #[error("{what} {reason}")]
    InputValue {
        /// Which input.
        what: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// Landmarks cannot define an alignment.
    #[error("cannot align the face: {reason}")]
    Alignment {
        /// What is wrong with the landmarks.
        reason: String,
    },

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// One of the renderer's ops (the chip warp samples images with its texture op) failed.
    #[error(transparent)]
    Render(#[from] ganfit_render::RenderError),
}

/// Result type of this crate.
pub type Result<T, E = LossError> = std::result::Result<T, E>;
