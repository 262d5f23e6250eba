//! The GANFIT optimisation loop.
//!
//! Fitting is plain gradient descent over shape, expression, texture, camera and light, run as
//! a sequence of stages (landmark alignment first, then the full objective). This crate holds
//! the machinery those stages share — Adam per parameter group, learning-rate schedules,
//! early stopping, divergence recovery — the closed-form camera initialisation from 2D–3D
//! landmark correspondences that the first stage starts from, the landmark alignment stage
//! itself ([`align_to_landmarks`], or [`align_one_person`] for several photos of one person),
//! and the projection of the photo onto the fitted mesh's UV layout ([`unwrap_photo`]).

mod adam;
mod align;
mod pose;
mod refine;
mod schedule;
mod stage;
mod unwrap;

pub use align::{
    Alignment, AlignmentConfig, FitParams, ImageLandmarks, VertexObservation, align_one_person,
    align_to_landmarks,
};
pub use pose::{Intrinsics, Pose, pose_from_landmarks};
pub use refine::{
    LossWeights, PhotoView, RefineConfig, Refinement, TextureSource, frontal_camera, refine,
};
pub use schedule::Schedule;
pub use stage::{
    DivergenceGuard, EarlyStop, IterationRecord, Loss, ParamGroup, StageConfig, StageReport,
    StopReason, run_stage,
};
pub use unwrap::{
    EXPRESSION_FUSE_MM, EXPRESSION_FUSE_TOLERANCE_MM, Projection, UvLayout, UvTexture,
    project_photo, project_photo_onto, project_photo_with_view, rasterize_uv_layout,
    skin_triangles, surface_distances, unwrap_photo,
};

/// Nearest and farthest depth, millimetres, that the fit's cameras draw. A face is more than
/// a centimetre and less than ten metres from the camera; a range no wider keeps the
/// rasteriser's depth test fine enough to tell eyeballs from the sockets around them.
pub const DEPTH_RANGE_MM: (f64, f64) = (10.0, 1e4);

/// The least weight a fit gives an expression blendshape. Blendshapes are activations (ICT's
/// and ARKit's run from 0 to 1; eos fits the Surrey model's by non-negative least squares): a
/// negative weight is a face no rig means, which the landmarks' systematic errors otherwise
/// pull the fit towards (a neutral photo fitted `cheekSquint_R −0.14`). Against unbounded
/// weights, FaceRes distance of the frontal render to the photo (a recogniser not in the loss)
/// on 23 unseen shared photos 0.1708 → 0.1665 (15 lower), on 57 others 0.1631 → 0.1593 (41
/// lower); dlib's 0.3131 → 0.3103 and 0.2984 → 0.2915; the landmark error 1.95 → 2.06 and
/// 1.84 → 1.96 % of the inter-ocular distance (fewer shapes to follow the detector's points);
/// the renders in the photo's view as close to it as before (FaceRes 0.011).
pub const MIN_EXPRESSION_WEIGHT: f64 = 0.0;

/// Errors of the optimisation loop.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The loss kept diverging after every allowed recovery.
    #[error(
        "stage `{stage}` diverged at iteration {iteration} (NaN, infinite or exploding loss) \
         after {recoveries} recoveries; lower its learning rates or check the input photo and \
         landmarks"
    )]
    Diverged {
        /// Stage name.
        stage: String,
        /// Iteration at which it gave up.
        iteration: usize,
        /// Recoveries tried.
        recoveries: usize,
    },

    /// The morphable model rejected an operation.
    #[error(transparent)]
    Model(#[from] ganfit_morphable::MorphableError),

    /// The renderer rejected an operation.
    #[error(transparent)]
    Render(#[from] ganfit_render::RenderError),

    /// A loss network or loss term rejected its input (boxed: it is large and rare).
    #[error(transparent)]
    Loss(Box<ganfit_losses::LossError>),

    /// The texture model failed (boxed: it is large and rare).
    #[error(transparent)]
    Texture(Box<ganfit_texture::TextureError>),

    /// The landmarks cannot determine a camera.
    #[error("cannot initialise the camera from the landmarks: {0}")]
    DegenerateLandmarks(String),

    /// The caller passed inconsistent input.
    #[error("invalid optimiser input: {0}")]
    InvalidInput(String),
}

impl From<ganfit_losses::LossError> for OptimError {
    fn from(error: ganfit_losses::LossError) -> Self {
        OptimError::Loss(Box::new(error))
    }
}

impl From<ganfit_texture::TextureError> for OptimError {
    fn from(error: ganfit_texture::TextureError) -> Self {
        OptimError::Texture(Box::new(error))
    }
}
