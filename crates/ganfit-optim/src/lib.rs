//! The GANFIT optimisation loop.
//!
//! Fitting is plain gradient descent over shape, expression, texture, camera and light, run as
//! a sequence of stages (landmark alignment first, then the full objective). This crate holds
//! the machinery those stages share — Adam per parameter group, learning-rate schedules,
//! early stopping, divergence recovery — the closed-form camera initialisation from 2D–3D
//! landmark correspondences that the first stage starts from, the landmark alignment stage
//! itself ([`align_to_landmarks`]), and the projection of the photo onto the fitted mesh's UV
//! layout ([`unwrap_photo`]).

mod align;
mod pose;
mod schedule;
mod stage;
mod unwrap;

pub use align::{Alignment, AlignmentConfig, FitParams, ImageLandmarks, align_to_landmarks};
pub use pose::{Intrinsics, Pose, pose_from_landmarks};
pub use schedule::Schedule;
pub use stage::{
    DivergenceGuard, EarlyStop, IterationRecord, Loss, ParamGroup, StageConfig, StageReport,
    StopReason, run_stage,
};
pub use unwrap::{UvTexture, skin_triangles, unwrap_photo};

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

    /// The landmarks cannot determine a camera.
    #[error("cannot initialise the camera from the landmarks: {0}")]
    DegenerateLandmarks(String),

    /// The caller passed inconsistent input.
    #[error("invalid optimiser input: {0}")]
    InvalidInput(String),
}
