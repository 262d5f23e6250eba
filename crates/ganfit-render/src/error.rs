//! Typed errors for bad input to the renderer.

use candle_core::DType;

/// Everything that can go wrong when calling the renderer with bad input.
///
/// Messages say what was expected and how to fix the call.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A tensor has the wrong rank or size.
    #[error("{what} must have shape {expected}, got {got:?}; reshape or batch it before calling")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The dims that were passed.
        got: Vec<usize>,
    },
    /// A tensor has an unsupported element type.
    #[error(
        "{what} must be f32 or f64 (all float inputs of one call alike), got {got:?}; convert it with to_dtype"
    )]
    DType {
        /// Which argument.
        what: &'static str,
        /// The dtype that was passed.
        got: DType,
    },
    /// A triangle refers to a vertex that does not exist.
    #[error(
        "triangle {triangle} refers to vertex {vertex} but the mesh has only {num_vertices} vertices; \
         indices must be 0-based (subtract 1 from OBJ indices)"
    )]
    VertexIndex {
        /// Triangle number.
        triangle: usize,
        /// The offending vertex index.
        vertex: u64,
        /// Number of vertices in the mesh.
        num_vertices: usize,
    },
    /// More triangles than the f32 id channel can represent exactly.
    #[error(
        "{0} triangles is too many: triangle ids are stored in a float channel, so at most 16777215 are allowed; split the mesh"
    )]
    TooManyTriangles(usize),
    /// The output image would be empty.
    #[error("image size {height}x{width} is invalid: both must be at least 1 pixel")]
    EmptyImage {
        /// Requested height.
        height: usize,
        /// Requested width.
        width: usize,
    },
    /// The camera parameters are unusable.
    #[error("invalid camera: {0}")]
    Camera(String),
    /// Two inputs disagree on the batch size.
    #[error(
        "{what} has batch size {got} but the render batch is {expected}; pass batch {expected} or 1 (broadcast)"
    )]
    Batch {
        /// Which argument.
        what: &'static str,
        /// Batch size passed.
        got: usize,
        /// Batch size expected.
        expected: usize,
    },
    /// An error from candle itself (device, allocation, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the renderer.
pub type Result<T> = std::result::Result<T, RenderError>;
