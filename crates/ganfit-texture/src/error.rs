//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong when building, loading, training or evaluating a texture model.
#[derive(Debug, thiserror::Error)]
pub enum TextureError {
    /// A tensor operation failed (usually a bug or an unsupported device).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A latent batch has the wrong shape or dtype.
    #[error(
        "latent has shape {got:?} but this model expects [batch, {expected}] (one row of {expected} f32 values per texture)"
    )]
    LatentShape {
        /// Latent size of the model.
        expected: usize,
        /// Shape that was passed.
        got: Vec<usize>,
    },
    /// A weights or checkpoint file could not be read or does not match the model.
    #[error("{path}: {reason}")]
    File {
        /// The offending file.
        path: PathBuf,
        /// What is wrong and what to do about it.
        reason: String,
    },
    /// Training data is unusable.
    #[error("invalid training data: {0}")]
    Data(String),
}

impl TextureError {
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = TextureError> = std::result::Result<T, E>;
