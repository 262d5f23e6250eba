//! Face detection and dense landmarks: ports of MediaPipe's BlazeFace short-range detector and
//! Face Mesh landmark network (Apache-2.0 weights converted by
//! `tools/convert/mediapipe_tflite_to_safetensors.py`), the iBUG 68-point subset and the
//! correspondence to ICT-FaceKit vertices of the Face Mesh points, and reading photos of any
//! common format into upright RGB.
//!
//! ```no_run
//! # fn main() -> ganfit_losses::face::Result<()> {
//! use candle_core::Device;
//! use ganfit_losses::face::{FaceChoice, FaceDetector, FaceLandmarker, load_rgb};
//!
//! let device = Device::Cpu;
//! let image = load_rgb("photo.jpg")?;
//! let face = FaceDetector::new(&device)?.detect_face(&image, FaceChoice::Largest)?;
//! let landmarks = FaceLandmarker::new(&device)?.landmarks(&image, &face)?;
//! let ibug = landmarks.to_ibug68();
//! println!("nose tip at {:?}", ibug[30]);
//! # Ok(())
//! # }
//! ```

mod crop;
mod detector;
mod error;
mod ibug;
mod ict;
mod image_io;
mod landmarker;
mod layers;
mod mirror;

pub use crop::FaceRoi;
pub use detector::{
    DETECTOR_ASSET, DETECTOR_INPUT, Detection, DetectorOptions, FaceChoice, FaceDetector,
};
pub use error::{FaceError, Result};
pub use ibug::IBUG68_FROM_MESH;
pub use ict::{
    ICT_VERTEX_FROM_MESH, ICT_VERTEX_FROM_MESH_AT_YAW, MESH_POINT_ERROR_AT_YAW, MESH_TABLE_YAWS_DEG,
};
pub use image_io::{
    MAX_IMAGE_PIXELS, OTHER_PHOTO_FORMATS, check_pixel_count, decode_rgb, is_photo_name, load_rgb,
    probe_image,
};
pub use landmarker::{
    FaceLandmarker, LANDMARKER_ASSET, LANDMARKER_INPUT, Landmarks468, MESH_POINTS, MeshOutput,
    roi_from_detection, roi_from_landmarks,
};
pub use mirror::MESH_MIRROR;
