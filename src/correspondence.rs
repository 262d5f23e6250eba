//! Which ICT vertex each of the landmarker's Face Mesh points shows on a photo.
//!
//! MediaPipe's points do not sit on fixed places of the face: the jaw line follows the
//! visible outline, which slides over the cheek as the head turns, and the other points drift
//! less but likewise. `ganfit bench landmark-map` therefore measures one correspondence per
//! head yaw ([`ICT_VERTEX_FROM_MESH_AT_YAW`]), and a photo gets the one measured nearest its
//! own yaw, read from its detected points ([`estimate_head_yaw_deg`]) before any fitting.

use ganfit_losses::face::{
    IBUG68_FROM_MESH, ICT_VERTEX_FROM_MESH, ICT_VERTEX_FROM_MESH_AT_YAW, Landmarks468,
    MESH_POINT_ERROR_AT_YAW, MESH_TABLE_YAWS_DEG,
};
use ganfit_morphable::MorphableModel;
use ganfit_optim::{Intrinsics, VertexObservation, pose_from_landmarks};
use nalgebra::{Rotation3, Vector2, Vector3};

/// The Face Mesh → ICT correspondence measured for one head yaw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeshCorrespondence {
    /// ICT vertex of each Face Mesh point.
    pub vertices: &'static [u32; 468],
    /// The landmarker's typical error at each point, fraction of the inter-ocular distance.
    pub errors: &'static [f32; 468],
}

impl MeshCorrespondence {
    /// The correspondence measured nearest `yaw_deg` (see [`head_yaw_deg`]); NaN takes the
    /// frontal one.
    pub fn at_yaw(yaw_deg: f64) -> Self {
        let nearest = nearest_yaw_table(&MESH_TABLE_YAWS_DEG, yaw_deg);
        MeshCorrespondence {
            vertices: &ICT_VERTEX_FROM_MESH_AT_YAW[nearest],
            errors: &MESH_POINT_ERROR_AT_YAW[nearest],
        }
    }

    /// The correspondence for `mesh`, the landmarker's points on a `width`×`height` photo of
    /// the ICT face `model`; `None` for other models, whose vertices the tables do not name.
    pub fn for_photo(
        model: &MorphableModel,
        mesh: &Landmarks468,
        width: u32,
        height: u32,
    ) -> Option<Self> {
        is_ict(model).then(|| Self::at_yaw(estimate_head_yaw_deg(model, mesh, width, height)))
    }

    /// The ICT vertex of each of the 68 iBUG landmarks.
    pub fn landmark_vertices(&self) -> Vec<Option<u32>> {
        IBUG68_FROM_MESH
            .iter()
            .map(|&point| Some(self.vertices[point]))
            .collect()
    }

    /// Each iBUG landmark's inverse squared typical error: the landmark term then counts each
    /// point as far as the landmarker can be trusted there.
    pub fn landmark_weights(&self) -> Vec<f64> {
        IBUG68_FROM_MESH
            .iter()
            .map(|&point| f64::from(self.errors[point]).powi(-2))
            .collect()
    }

    /// All 468 detected points as observations of their vertices.
    pub fn observations(&self, mesh: &Landmarks468) -> Vec<VertexObservation> {
        self.vertices
            .iter()
            .zip(&mesh.points)
            .map(|(&vertex, p)| VertexObservation {
                vertex,
                pixel: [f64::from(p[0]), f64::from(p[1])],
            })
            .collect()
    }
}

/// The index of the yaw in `table_yaws_deg` nearest `yaw_deg` (the one nearest 0° for NaN).
///
/// # Panics
///
/// If `table_yaws_deg` is empty.
pub fn nearest_yaw_table(table_yaws_deg: &[f32], yaw_deg: f64) -> usize {
    let yaw = if yaw_deg.is_nan() { 0.0 } else { yaw_deg };
    let distance = |i: usize| (f64::from(table_yaws_deg[i]) - yaw).abs();
    (0..table_yaws_deg.len())
        .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
        .expect("at least one table")
}

/// Whether `model` is ICT's, whose vertices the correspondence tables name.
pub(crate) fn is_ict(model: &MorphableModel) -> bool {
    model.name().starts_with("ICT Face Model")
        && ICT_VERTEX_FROM_MESH_AT_YAW
            .iter()
            .flatten()
            .chain(&ICT_VERTEX_FROM_MESH)
            .all(|&v| (v as usize) < model.n_vertices())
}

/// Head yaw in degrees of a model-to-camera `rotation` (OpenCV camera), in the convention of
/// [`crate::synthetic::SyntheticFace::yaw_pitch_roll_deg`]: the rotation is a half turn about
/// x after `roll(z) · pitch(x) · yaw(y)`, and yaw is positive when the face turns to its left.
pub fn head_yaw_deg(rotation: &Rotation3<f64>) -> f64 {
    let head =
        Rotation3::from_axis_angle(&Vector3::x_axis(), std::f64::consts::PI).inverse() * rotation;
    // The bottom row of roll · pitch · yaw is (−cos p · sin y, sin p, cos p · cos y): roll
    // leaves it alone.
    let m = head.matrix();
    (-m[(2, 0)]).atan2(m[(2, 2)]).to_degrees()
}

/// The head yaw (degrees, see [`head_yaw_deg`]) that best explains where the landmarker put
/// its points: the mean ICT face posed by [`pose_from_landmarks`] through the correspondence
/// pooled over all yaws, with a guessed camera (the yaw hardly depends on the focal length).
/// NaN when no pose fits, e.g. for points that are all NaN.
pub fn estimate_head_yaw_deg(
    model: &MorphableModel,
    mesh: &Landmarks468,
    width: u32,
    height: u32,
) -> f64 {
    let Ok(mean) = model.mean_rows() else {
        return f64::NAN;
    };
    let points: Vec<Vector3<f64>> = ICT_VERTEX_FROM_MESH
        .iter()
        .map(|&v| Vector3::from(mean[v as usize].map(f64::from)))
        .collect();
    let pixels: Vec<Vector2<f64>> = mesh
        .points
        .iter()
        .map(|p| Vector2::new(f64::from(p[0]), f64::from(p[1])))
        .collect();
    pose_from_landmarks(
        &Intrinsics::guess_for_image(width, height),
        &points,
        &pixels,
    )
    .map_or(f64::NAN, |pose| head_yaw_deg(&pose.rotation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_photo_gets_the_table_of_the_nearest_yaw_and_nan_the_frontal_one() {
        let yaws = [-20.0, 0.0, 20.0];
        assert_eq!(nearest_yaw_table(&yaws, -100.0), 0);
        assert_eq!(nearest_yaw_table(&yaws, -10.5), 0);
        assert_eq!(nearest_yaw_table(&yaws, 9.9), 1);
        assert_eq!(nearest_yaw_table(&yaws, 10.1), 2);
        assert_eq!(nearest_yaw_table(&yaws, f64::NAN), 1);
        assert_eq!(nearest_yaw_table(&yaws, 1e9), 2);
    }
}
