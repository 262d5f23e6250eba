//! The networks behind GANFIT's losses and the loss terms themselves.
//!
//! * [`identity::FaceRecognitionNet`]: dlib's face-recognition ResNet-29 (CC0 weights converted
//!   from `dlib_face_recognition_resnet_model_v1.dat` by [`dlib::DlibResnet`]), giving the 128-d
//!   identity descriptor and the intermediate feature maps.
//! * [`align`]: the similarity transform from facial landmarks to dlib's canonical 150×150 chip
//!   and a differentiable bilinear warp that applies it (ganfit-render's texture op, so its
//!   gradient scatters in parallel on the GPU too).
//! * [`losses`]: GANFIT's loss terms, one value per render: identity (1 − cosine of
//!   descriptors), content (distance of feature maps), pixel (masked mean RGB distance),
//!   landmark (squared distance normalised by the face's size) and the Gaussian prior.
//! * [`face`]: MediaPipe's face detector and 468-point landmark network, the iBUG 68 subset, and
//!   photo loading.
//! * [`gradcheck`]: central finite-difference checks of candle gradients.

pub mod align;
pub mod dlib;
mod error;
pub mod face;
pub mod gradcheck;
pub mod identity;
pub mod losses;

pub use error::{LossError, Result};
