use std::path::PathBuf;

/// Everything that can go wrong while reading a photo or finding a face and its landmarks.
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// The image file could not be read from disk.
    #[error("cannot read the image {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The bytes are not in an image format ganfit reads.
    #[error(
        "{origin} is not an image ganfit can read ({reason}); save it as PNG or JPEG \
         ({} also work)",
        super::OTHER_PHOTO_FORMATS
    )]
    UnsupportedImage {
        /// The file, or a description of the bytes.
        origin: String,
        /// What the decoder said.
        reason: String,
    },

    /// The file looks like an image but cannot be decoded, e.g. because it is truncated.
    #[error(
        "{origin} could not be decoded ({reason}); the file is probably truncated or corrupt: \
         open and re-save it in an image editor, or download it again"
    )]
    CorruptImage {
        /// The file, or a description of the bytes.
        origin: String,
        /// What the decoder said.
        reason: String,
    },

    /// The image has no pixels.
    #[error("the image is empty ({width}x{height} pixels); pass a photo of a face")]
    EmptyImage {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
    },

    /// The image has more pixels than a fit reads ([`crate::face::MAX_IMAGE_PIXELS`]).
    #[error(
        "{origin} is {width}x{height} pixels, more than the {max_megapixels} megapixels ganfit \
         reads; scale it down (a face needs a few hundred pixels, not tens of thousands)"
    )]
    ImageTooLarge {
        /// The file, or a description of the bytes.
        origin: String,
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// The limit, megapixels.
        max_megapixels: u64,
    },

    /// The detector found no face.
    #[error(
        "no face found in the {width}x{height} image; use a photo where one face is clearly \
         visible, roughly frontal and at least 40 pixels wide"
    )]
    NoFaceFound {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
    },

    /// The chosen face is too small for reliable landmarks and texture.
    #[error(
        "the face is only {size:.0} pixels wide, ganfit needs at least {min:.0}: use a \
         higher-resolution photo or one taken closer to the face"
    )]
    FaceTooSmall {
        /// The longer side of the face's bounding box, in image pixels.
        size: f32,
        /// The smallest size accepted.
        min: f32,
    },

    /// A face was requested by index but the detector found fewer.
    #[error(
        "face {index} was asked for but the photo shows {count}; pick one of 0 to {last}",
        last = .count.saturating_sub(1)
    )]
    FaceIndexOutOfRange {
        /// The requested index.
        index: usize,
        /// How many faces were found.
        count: usize,
    },

    /// The landmark network does not see a face inside the crop it was given.
    #[error(
        "the landmark network does not see a face in the detected region (confidence \
         {confidence:.2}); use a sharper, better-lit, more frontal photo"
    )]
    LandmarksNotConfident {
        /// The network's face-presence probability.
        confidence: f32,
    },

    /// A weights file lacks a tensor or has one of the wrong shape.
    #[error(
        "{path} does not hold the expected MediaPipe weights ({reason}); regenerate it with \
         tools/convert/mediapipe_tflite_to_safetensors.py"
    )]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The model file could not be found or verified.
    #[error(transparent)]
    Asset(#[from] ganfit_assets::AssetError),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the [`face`](crate::face) module.
pub type Result<T> = std::result::Result<T, FaceError>;
