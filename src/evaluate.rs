//! Reconstruction error in millimetres, following the NoW benchmark's protocol (Sanyal et al.,
//! CVPR 2019): align the reconstruction to the ground truth from corresponding landmarks, refine
//! the alignment by ICP, then measure the distance from every ground-truth point of the narrow
//! face area to the reconstruction's surface.
//!
//! The metric is topology-independent: a reconstruction is any triangle mesh plus its 3D
//! positions of (some of) the 68 iBUG landmarks, so meshes of different morphable models (ours,
//! eos's Surrey model, a scan) are scored the same way.
//!
//! ```
//! use ganfit::evaluate::{GroundTruth, MetricConfig, Reconstruction, SurfaceMesh, reconstruction_error};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A unit square in z = 0 as the reconstruction; ground truth 1 mm above it.
//! let square = SurfaceMesh {
//!     vertices: vec![[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [10.0, 10.0, 0.0], [0.0, 10.0, 0.0]],
//!     triangles: vec![[0, 1, 2], [0, 2, 3]],
//! };
//! let landmarks = vec![Some([0.0, 0.0, 0.0]), Some([10.0, 0.0, 0.0]), Some([0.0, 10.0, 0.0])];
//! let reconstruction = Reconstruction { mesh: square, landmarks: landmarks.clone() };
//! let truth = GroundTruth { points: vec![[5.0, 5.0, 1.0]], landmarks };
//! let config = MetricConfig { landmark_ids: vec![0, 1, 2], icp_iterations: 0, ..Default::default() };
//! let error = reconstruction_error(&truth, &reconstruction, &config)?;
//! assert!((error.mean_mm - 1.0).abs() < 1e-9);
//! # Ok(())
//! # }
//! ```

use nalgebra::{Matrix3, Rotation3, Vector3};
use rstar::{AABB, PointDistance, RTree, RTreeObject};

/// Why a reconstruction could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    /// Too few landmarks exist in both meshes to align them.
    #[error(
        "only {usable} landmarks are present in both the ground truth and the reconstruction; \
         at least {needed} non-collinear ones are needed to align them (check that both list \
         their landmarks in the same order, e.g. iBUG-68)"
    )]
    TooFewLandmarks {
        /// Landmarks usable for the alignment.
        usable: usize,
        /// The minimum.
        needed: usize,
    },
    /// The landmarks are (nearly) collinear or coincident, so no rotation follows from them.
    #[error(
        "the landmarks used for the alignment are degenerate (collinear or coincident); pass \
         landmarks spread over the face"
    )]
    DegenerateLandmarks,
    /// The reconstruction has no triangles, or the ground truth no points.
    #[error("{0} is empty; nothing to measure")]
    Empty(&'static str),
    /// A triangle names a vertex that does not exist.
    #[error(
        "triangle {triangle} of the reconstruction uses vertex {vertex}, but the mesh has only \
         {vertices} vertices"
    )]
    VertexOutOfRange {
        /// Triangle index.
        triangle: usize,
        /// Offending vertex index.
        vertex: u32,
        /// Number of vertices.
        vertices: usize,
    },
    /// A coordinate is NaN or infinite.
    #[error("{0} contains a NaN or infinite coordinate")]
    NonFinite(&'static str),
    /// A landmark id in the configuration exceeds the landmark lists.
    #[error(
        "landmark id {id} is out of range: the ground truth lists {truth} and the \
         reconstruction {reconstruction} landmarks"
    )]
    LandmarkOutOfRange {
        /// The id.
        id: usize,
        /// Ground-truth landmark count.
        truth: usize,
        /// Reconstruction landmark count.
        reconstruction: usize,
    },
}

/// A triangle mesh: positions (millimetres) and triangles (vertex indices).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SurfaceMesh {
    /// Vertex positions.
    pub vertices: Vec<[f64; 3]>,
    /// Triangles as vertex indices; orientation does not matter.
    pub triangles: Vec<[u32; 3]>,
}

/// A reconstruction to score: its surface and its 3D landmark positions in the same frame, in
/// the landmark order of the ground truth (`None` where the reconstruction has no such point).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reconstruction {
    /// The reconstructed surface (only the outer face surface: every triangle is a candidate
    /// for the nearest point).
    pub mesh: SurfaceMesh,
    /// Landmark positions.
    pub landmarks: Vec<Option<[f64; 3]>>,
}

impl Reconstruction {
    /// A morphable model's reconstruction: `vertices` (one `[x, y, z]` row per model vertex,
    /// millimetres) on the triangles of the model's `face` area (all triangles if it names
    /// none), with the model's landmark vertices.
    pub fn of_model(model: &ganfit_morphable::MorphableModel, vertices: &[Vec<f32>]) -> Self {
        let triangles = match model.vertex_set("face") {
            Ok(face) => {
                let inside: std::collections::HashSet<u32> = face.iter().copied().collect();
                model
                    .triangles()
                    .iter()
                    .filter(|t| t.iter().all(|v| inside.contains(v)))
                    .copied()
                    .collect()
            }
            Err(_) => model.triangles().to_vec(),
        };
        let point = |v: u32| {
            let p = &vertices[v as usize];
            [f64::from(p[0]), f64::from(p[1]), f64::from(p[2])]
        };
        Reconstruction {
            mesh: SurfaceMesh {
                vertices: (0..vertices.len() as u32).map(point).collect(),
                triangles,
            },
            landmarks: model
                .landmark_vertex_ids()
                .iter()
                .map(|id| id.map(point))
                .collect(),
        }
    }
}

/// The ground truth: the points measured (e.g. the narrow face area's vertices) and the
/// landmarks, millimetres.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroundTruth {
    /// The points whose distance to the reconstruction is measured.
    pub points: Vec<[f64; 3]>,
    /// Landmark positions, same order as [`Reconstruction::landmarks`].
    pub landmarks: Vec<Option<[f64; 3]>>,
}

/// Which transforms may align the reconstruction to the ground truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlignmentKind {
    /// Rotation and translation: absolute size errors count.
    Rigid,
    /// Rotation, translation and a uniform scale, as NoW does: a monocular reconstruction's
    /// size is ambiguous with its distance to the camera, so only its shape is scored.
    #[default]
    Similarity,
}

/// How [`reconstruction_error`] aligns and measures.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricConfig {
    /// Transforms allowed for both the landmark alignment and ICP.
    pub alignment: AlignmentKind,
    /// Landmark indices used for the initial alignment. The default is the 51 inner iBUG
    /// landmarks (17..68: brows, nose, eyes, mouth), which every model places on fixed
    /// vertices; the jaw contour (0..17) is a silhouette whose vertices depend on the pose.
    pub landmark_ids: Vec<usize>,
    /// ICP iterations after the landmark alignment (0: landmarks only).
    pub icp_iterations: usize,
    /// ICP stops once the mean distance improves by less than this, millimetres.
    pub icp_tolerance_mm: f64,
}

impl Default for MetricConfig {
    fn default() -> Self {
        MetricConfig {
            alignment: AlignmentKind::default(),
            landmark_ids: (17..68).collect(),
            icp_iterations: 50,
            icp_tolerance_mm: 1e-4,
        }
    }
}

/// A similarity transform `x ↦ s·R·x + t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// Uniform scale (1 for a rigid transform).
    pub scale: f64,
    /// Rotation.
    pub rotation: Rotation3<f64>,
    /// Translation.
    pub translation: Vector3<f64>,
}

impl Similarity {
    /// The identity transform.
    pub fn identity() -> Self {
        Similarity {
            scale: 1.0,
            rotation: Rotation3::identity(),
            translation: Vector3::zeros(),
        }
    }

    /// `s·R·p + t`.
    pub fn apply(&self, p: &Vector3<f64>) -> Vector3<f64> {
        self.rotation * p * self.scale + self.translation
    }

    /// The inverse map, `Rᵀ(p − t) / s`.
    pub fn apply_inverse(&self, p: &Vector3<f64>) -> Vector3<f64> {
        self.rotation.inverse() * (p - self.translation) / self.scale
    }
}

/// The least-squares similarity (or rigid) transform taking `from[i]` to `to[i]` (Umeyama 1991):
/// the rotation from the SVD of the cross-covariance, with a reflection ruled out.
pub fn fit_similarity(
    from: &[Vector3<f64>],
    to: &[Vector3<f64>],
    kind: AlignmentKind,
) -> Result<Similarity, EvaluateError> {
    let n = from.len().min(to.len());
    if n < 3 {
        return Err(EvaluateError::TooFewLandmarks {
            usable: n,
            needed: 3,
        });
    }
    let centroid = |ps: &[Vector3<f64>]| ps.iter().sum::<Vector3<f64>>() / n as f64;
    let (mean_from, mean_to) = (centroid(&from[..n]), centroid(&to[..n]));
    let mut covariance = Matrix3::zeros();
    let mut from_variance = 0.0;
    for (a, b) in from.iter().zip(to) {
        let (a, b) = (a - mean_from, b - mean_to);
        covariance += b * a.transpose();
        from_variance += a.norm_squared();
    }
    covariance /= n as f64;
    from_variance /= n as f64;
    let svd = covariance.svd(true, true);
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        return Err(EvaluateError::DegenerateLandmarks);
    };
    let mut singular = svd.singular_values;
    // A rank below 2 leaves a rotation about the points' line undetermined.
    let mut order = [0usize, 1, 2];
    order.sort_by(|&i, &j| singular[j].total_cmp(&singular[i]));
    if from_variance <= f64::EPSILON || singular[order[1]] <= 1e-9 * singular[order[0]].max(1e-300)
    {
        return Err(EvaluateError::DegenerateLandmarks);
    }
    let mut sign = Matrix3::identity();
    if (u.determinant() * v_t.determinant()) < 0.0 {
        // Flip the axis of the smallest singular value: the best proper rotation.
        sign[(order[2], order[2])] = -1.0;
        singular[order[2]] = -singular[order[2]];
    }
    let rotation = Rotation3::from_matrix_unchecked(u * sign * v_t);
    let scale = match kind {
        AlignmentKind::Rigid => 1.0,
        AlignmentKind::Similarity => singular.sum() / from_variance,
    };
    Ok(Similarity {
        scale,
        rotation,
        translation: mean_to - rotation * mean_from * scale,
    })
}

/// The score of one reconstruction.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconstructionError {
    /// Mean point-to-surface distance, millimetres.
    pub mean_mm: f64,
    /// Median distance, millimetres.
    pub median_mm: f64,
    /// Standard deviation of the distances, millimetres.
    pub std_mm: f64,
    /// RMS distance between corresponding landmarks after the landmark alignment alone.
    pub landmark_rms_mm: f64,
    /// The final transform taking the reconstruction into the ground truth's frame.
    pub transform: Similarity,
    /// ICP iterations run.
    pub icp_iterations: usize,
    /// The distance of every ground-truth point, millimetres (same order as
    /// [`GroundTruth::points`]).
    pub distances: Vec<f64>,
}

/// Scores `reconstruction` against `truth`: landmark alignment, ICP, then point-to-surface
/// distance statistics (see the module documentation).
pub fn reconstruction_error(
    truth: &GroundTruth,
    reconstruction: &Reconstruction,
    config: &MetricConfig,
) -> Result<ReconstructionError, EvaluateError> {
    let surface = Surface::new(&reconstruction.mesh)?;
    if truth.points.is_empty() {
        return Err(EvaluateError::Empty("the ground truth's point set"));
    }
    if truth.points.iter().flatten().any(|c| !c.is_finite()) {
        return Err(EvaluateError::NonFinite("the ground truth"));
    }
    let (mut from, mut to) = (Vec::new(), Vec::new());
    for &id in &config.landmark_ids {
        let (Some(t), Some(r)) = (truth.landmarks.get(id), reconstruction.landmarks.get(id)) else {
            return Err(EvaluateError::LandmarkOutOfRange {
                id,
                truth: truth.landmarks.len(),
                reconstruction: reconstruction.landmarks.len(),
            });
        };
        if let (Some(t), Some(r)) = (t, r) {
            if t.iter().chain(r).any(|c| !c.is_finite()) {
                return Err(EvaluateError::NonFinite("a landmark"));
            }
            from.push(Vector3::from(*r));
            to.push(Vector3::from(*t));
        }
    }
    let mut transform = fit_similarity(&from, &to, config.alignment)?;
    let landmark_rms_mm = (from
        .iter()
        .zip(&to)
        .map(|(r, t)| (transform.apply(r) - t).norm_squared())
        .sum::<f64>()
        / from.len() as f64)
        .sqrt();

    let points: Vec<Vector3<f64>> = truth.points.iter().map(|&p| Vector3::from(p)).collect();
    let mut nearest = surface.nearest_points(&points, &transform);
    let mut mean = mean_distance(&points, &nearest, &transform);
    let mut iterations = 0;
    while iterations < config.icp_iterations {
        // Ground-truth point i corresponds to the nearest reconstruction point found for it;
        // refit the transform to those pairs, then look the pairs up again.
        let candidate = fit_similarity(&nearest, &points, config.alignment)?;
        let candidate_nearest = surface.nearest_points(&points, &candidate);
        let candidate_mean = mean_distance(&points, &candidate_nearest, &candidate);
        iterations += 1;
        if candidate_mean > mean {
            break;
        }
        let improvement = mean - candidate_mean;
        (transform, nearest, mean) = (candidate, candidate_nearest, candidate_mean);
        if improvement < config.icp_tolerance_mm {
            break;
        }
    }
    let distances: Vec<f64> = points
        .iter()
        .zip(&nearest)
        .map(|(p, q)| (transform.apply(q) - p).norm())
        .collect();
    let (mean_mm, median_mm, std_mm) = statistics(&distances);
    Ok(ReconstructionError {
        mean_mm,
        median_mm,
        std_mm,
        landmark_rms_mm,
        transform,
        icp_iterations: iterations,
        distances,
    })
}

/// Mean, median and (population) standard deviation.
fn statistics(values: &[f64]) -> (f64, f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    };
    (mean, median, std)
}

fn mean_distance(points: &[Vector3<f64>], nearest: &[Vector3<f64>], map: &Similarity) -> f64 {
    points
        .iter()
        .zip(nearest)
        .map(|(p, q)| (map.apply(q) - p).norm())
        .sum::<f64>()
        / points.len() as f64
}

/// A reconstruction's triangles in an R*-tree, for nearest-point queries in its own frame.
struct Surface {
    tree: RTree<Triangle>,
}

impl Surface {
    fn new(mesh: &SurfaceMesh) -> Result<Self, EvaluateError> {
        if mesh.triangles.is_empty() {
            return Err(EvaluateError::Empty("the reconstruction's mesh"));
        }
        if mesh.vertices.iter().flatten().any(|c| !c.is_finite()) {
            return Err(EvaluateError::NonFinite("the reconstruction's mesh"));
        }
        let vertex = |triangle: usize, v: u32| {
            mesh.vertices
                .get(v as usize)
                .map(|&p| Vector3::from(p))
                .ok_or(EvaluateError::VertexOutOfRange {
                    triangle,
                    vertex: v,
                    vertices: mesh.vertices.len(),
                })
        };
        let triangles = mesh
            .triangles
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(Triangle {
                    corners: [vertex(i, t[0])?, vertex(i, t[1])?, vertex(i, t[2])?],
                })
            })
            .collect::<Result<Vec<_>, EvaluateError>>()?;
        Ok(Surface {
            tree: RTree::bulk_load(triangles),
        })
    }

    /// For each point (in the ground truth's frame), the nearest surface point, in the
    /// reconstruction's frame, with `map` taking the reconstruction into the ground truth's.
    /// Distances scale uniformly under `map`, so the nearest point is the same in both frames.
    fn nearest_points(&self, points: &[Vector3<f64>], map: &Similarity) -> Vec<Vector3<f64>> {
        points
            .iter()
            .map(|p| {
                let local = map.apply_inverse(p);
                let query = [local.x, local.y, local.z];
                self.tree
                    .nearest_neighbor(query)
                    .map(|t| t.closest_point(&local))
                    // The tree is never empty (checked in `new`).
                    .unwrap_or(local)
            })
            .collect()
    }
}

struct Triangle {
    corners: [Vector3<f64>; 3],
}

impl Triangle {
    /// The point of the (closed) triangle nearest to `p`, found by which Voronoi region of the
    /// triangle's vertices, edges or face `p` lies in.
    fn closest_point(&self, p: &Vector3<f64>) -> Vector3<f64> {
        let [a, b, c] = &self.corners;
        let (ab, ac, ap) = (b - a, c - a, p - a);
        let (d1, d2) = (ab.dot(&ap), ac.dot(&ap));
        if d1 <= 0.0 && d2 <= 0.0 {
            return *a;
        }
        let bp = p - b;
        let (d3, d4) = (ab.dot(&bp), ac.dot(&bp));
        if d3 >= 0.0 && d4 <= d3 {
            return *b;
        }
        let vc = d1 * d4 - d3 * d2;
        if vc <= 0.0 && d1 >= 0.0 && d3 <= 0.0 {
            return a + ab * (d1 / (d1 - d3));
        }
        let cp = p - c;
        let (d5, d6) = (ab.dot(&cp), ac.dot(&cp));
        if d6 >= 0.0 && d5 <= d6 {
            return *c;
        }
        let vb = d5 * d2 - d1 * d6;
        if vb <= 0.0 && d2 >= 0.0 && d6 <= 0.0 {
            return a + ac * (d2 / (d2 - d6));
        }
        let va = d3 * d6 - d5 * d4;
        if va <= 0.0 && (d4 - d3) >= 0.0 && (d5 - d6) >= 0.0 {
            return b + (c - b) * ((d4 - d3) / ((d4 - d3) + (d5 - d6)));
        }
        let denominator = va + vb + vc;
        if denominator.abs() <= f64::MIN_POSITIVE {
            // A degenerate (zero-area) triangle that is not caught above: its nearest corner.
            return *[a, b, c]
                .into_iter()
                .min_by(|x, y| (p - *x).norm_squared().total_cmp(&(p - *y).norm_squared()))
                .unwrap_or(a);
        }
        a + ab * (vb / denominator) + ac * (vc / denominator)
    }
}

impl RTreeObject for Triangle {
    type Envelope = AABB<[f64; 3]>;

    fn envelope(&self) -> Self::Envelope {
        let [a, b, c] = &self.corners;
        let lo = a.inf(b).inf(c);
        let hi = a.sup(b).sup(c);
        AABB::from_corners([lo.x, lo.y, lo.z], [hi.x, hi.y, hi.z])
    }
}

impl PointDistance for Triangle {
    fn distance_2(&self, point: &[f64; 3]) -> f64 {
        let p = Vector3::from(*point);
        (self.closest_point(&p) - p).norm_squared()
    }
}
