//! dlib's face-recognition ResNet in candle: the identity embedding and the feature maps that
//! GANFIT's identity and content losses compare.

pub(crate) mod arch;
mod net;
mod ops;
mod portable;
mod stages;
mod winograd;

pub use arch::{EMBEDDING_DIM, INPUT_SIZE};
pub use net::{DLIB_RESNET_ASSET_ID, FaceFeatures, FaceRecognitionNet};
