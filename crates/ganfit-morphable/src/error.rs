use std::path::PathBuf;

/// Everything that can go wrong while converting, loading, evaluating or exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum MorphableError {
    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot read".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A binary eos/cereal file ends before a field it announces.
    #[error(
        "{file} is truncated or not an eos model file: reading {what} needs {needed} bytes at \
         offset {offset}, but only {available} remain. Re-copy the file from the eos \
         distribution (share/ folder)"
    )]
    Truncated {
        /// The file being parsed.
        file: String,
        /// The field being read.
        what: String,
        /// Byte offset of the field.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },

    /// A source file has content that does not fit the expected format.
    #[error("{file} is not a valid {format} file: {reason}")]
    InvalidSource {
        /// The file being parsed.
        file: String,
        /// What kind of file it should be.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },

    /// A file the converter needs is missing from the source.
    #[error("{container} has no {entry}: point the converter at an unmodified copy of {hint}")]
    MissingEntry {
        /// The folder or archive that was searched.
        container: String,
        /// The missing file.
        entry: String,
        /// Where a good copy comes from.
        hint: &'static str,
    },

    /// A converted model file is not one this version of ganfit can read.
    #[error(
        "{path} is not a usable ganfit morphable-model file: {reason}. Delete it so ganfit \
         converts the model again, or re-run the converter that the manifest's produced_by names"
    )]
    InvalidModelFile {
        /// The model file.
        path: String,
        /// What is wrong.
        reason: String,
    },

    /// Coefficient tensors of the wrong shape or with too many modes.
    #[error("{0}")]
    Coefficients(String),

    /// A region or vertex set name the model does not define.
    #[error("the model `{model}` has no region or vertex set `{name}`; it has: {known}")]
    UnknownRegion {
        /// The model's name.
        model: String,
        /// The name that was asked for.
        name: String,
        /// The names it does have, comma-separated.
        known: String,
    },

    /// Bad input to an export function.
    #[error("cannot export: {0}")]
    Export(String),

    /// Finding, building or verifying the converted model file failed.
    #[error(transparent)]
    Asset(#[from] ganfit_assets::AssetError),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl MorphableError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        MorphableError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
