//! Reader for dlib's `dlib_face_recognition_resnet_model_v1.dat` and its conversion to
//! safetensors.
//!
//! dlib writes a network as nested records: the loss layer's header and details, then for every
//! layer from the output inwards a version header, then the input layer, and only then, from the
//! input outwards, each layer's details (name string, parameters) and bookkeeping tensors. Since
//! no record names its own type, the reader follows the network's known architecture
//! (described in [`crate::identity::FaceRecognitionNet`]) and checks every name, size and version
//! on the way.

mod reader;
mod resnet;

pub use resnet::{DlibResnet, NamedTensor};

/// Why a dlib model file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DlibFormatError {
    /// The file ends in the middle of a value.
    #[error(
        "the dlib model ends at byte {offset} while reading {what} ({needed} more bytes needed, \
         {available} left): the file is truncated or is not dlib_face_recognition_resnet_model_v1.dat; \
         extract it again from the face-recognition-models 0.3.0 package"
    )]
    Truncated {
        /// Offset of the value that could not be read.
        offset: usize,
        /// Bytes the value needs.
        needed: usize,
        /// Bytes left in the file.
        available: usize,
        /// What was being read.
        what: String,
    },

    /// A value has the wrong encoding, version, name or size.
    #[error(
        "the dlib model is malformed at byte {offset} ({what}): {detail}. This reader only accepts \
         dlib_face_recognition_resnet_model_v1.dat (ResNet-29, 150×150 input)"
    )]
    Malformed {
        /// Offset of the value.
        offset: usize,
        /// What was being read.
        what: String,
        /// What is wrong with it.
        detail: String,
    },

    /// The network ends before the file does.
    #[error(
        "the dlib model has {extra} unexpected bytes after the network (from byte {offset}): the \
         file is not exactly dlib_face_recognition_resnet_model_v1.dat"
    )]
    TrailingBytes {
        /// Offset where the network ended.
        offset: usize,
        /// Bytes left over.
        extra: usize,
    },
}
