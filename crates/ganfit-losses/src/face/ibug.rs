//! The 68 iBUG 300-W points as a subset of the 468 Face Mesh points.
//!
//! The table is derived, not hand-picked, by `tools/convert/derive_ibug68_from_mediapipe_mesh.py`
//! from two permissively licensed 3D sources: ICT-FaceKit's neutral mesh with its 68 Multi-PIE
//! landmark vertices (MIT; Multi-PIE's 68-point markup is iBUG's) and MediaPipe's canonical face
//! mesh, whose vertex `i` is Face Mesh point `i` (Apache-2.0). A similarity transform fitted on
//! eight unambiguous points (nose tip, chin, eye and mouth corners) brings ICT's landmarks onto
//! the canonical mesh; every other landmark takes the nearest canonical vertex among the Face
//! Mesh points of its feature (face oval, brows, nose, eyelids, outer lip, upper or lower inner
//! lip, as MediaPipe's contour sets define them). Distance from each aligned ICT landmark to its
//! Face Mesh vertex: mean 5.1 mm, largest 15 mm (jaw point 13), on a face about 15 cm wide.
//!
//! Against an independent 68-point detector (dlib's `shape_predictor_68_face_landmarks`, used
//! only as a measuring stick by `tools/convert/check_ibug68_against_dlib.py`) on the astronaut and
//! 40 US Congress portraits, the mean distance per point is 4.6 % of the outer-eye-corner
//! distance: eyes 2.6 %, nose 3.1 %, outer lip 3.4 %, inner lip 4.5 %, brows 4.9 %, jaw 7.4 %.
//! Like any fixed subset it cannot follow the jaw *silhouette* when the head turns: for the jaw
//! points, prefer a dynamic contour correspondence in the landmark loss.

use super::Landmarks468;

/// Face Mesh index of each iBUG 68-point landmark, in iBUG order (0-based: jaw 0–16 from the
/// subject's right ear, brows 17–26, nose 27–35, eyes 36–47, outer lip 48–59, inner lip 60–67).
pub const IBUG68_FROM_MESH: [usize; 68] = [
    127, 234, 93, 132, 172, 136, 149, 148, 152, 377, // jaw
    378, 365, 397, 361, 323, 454, 356, // jaw
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300, // brows
    168, 197, 5, 1, 98, 97, 2, 326, 327, // nose
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380, // eyes
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91, // outer lip
    78, 81, 13, 311, 308, 402, 14, 178, // inner lip
];

impl Landmarks468 {
    /// The 68 iBUG 300-W points (x, y) in image pixels, in iBUG order; see [`IBUG68_FROM_MESH`].
    pub fn to_ibug68(&self) -> [[f32; 2]; 68] {
        IBUG68_FROM_MESH.map(|i| self.xy(i))
    }
}
