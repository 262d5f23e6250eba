//! Closed-form camera initialisation from 2D–3D landmark correspondences.
//!
//! Gradient descent on camera parameters from an arbitrary start is slow and can settle on a
//! mirrored or upside-down pose, so the fit starts from a perspective-n-point solution: an affine
//! (weak-perspective) camera by linear least squares, turned into a rotation through the SVD, then
//! refined by Levenberg–Marquardt on the full pinhole reprojection error.
//!
//! Conventions are OpenCV's: x right, y down, z forward; `pixel ≃ K·(R·X + t)`.

use nalgebra::{Matrix2x3, Matrix3, Matrix6, Rotation3, SMatrix, Vector2, Vector3, Vector6};

use crate::OptimError;

/// Pinhole intrinsics in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intrinsics {
    /// Focal length along x, pixels.
    pub fx: f64,
    /// Focal length along y, pixels.
    pub fy: f64,
    /// Principal point x, pixels.
    pub cx: f64,
    /// Principal point y, pixels.
    pub cy: f64,
}

impl Intrinsics {
    /// A plausible camera for a photo of `width`×`height` pixels when nothing is known about it:
    /// principal point at the centre and a focal length of the longer side, about a 53° field of
    /// view (a portrait lens on a full-frame camera at head-and-shoulders distance).
    pub fn guess_for_image(width: u32, height: u32) -> Self {
        let focal = f64::from(width.max(height));
        Intrinsics {
            fx: focal,
            fy: focal,
            cx: f64::from(width) / 2.0,
            cy: f64::from(height) / 2.0,
        }
    }

    /// Projects a point given in camera coordinates to pixels.
    pub fn project(&self, p: &Vector3<f64>) -> Vector2<f64> {
        Vector2::new(self.fx * p.x / p.z + self.cx, self.fy * p.y / p.z + self.cy)
    }
}

/// A rigid camera pose: `X_camera = rotation · X_model + translation`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    /// Model-to-camera rotation.
    pub rotation: Rotation3<f64>,
    /// Model-to-camera translation, in the model's units.
    pub translation: Vector3<f64>,
}

impl Pose {
    /// The rotation as an axis-angle vector (the renderer's camera parameterisation).
    pub fn axis_angle(&self) -> Vector3<f64> {
        self.rotation.scaled_axis()
    }

    /// Root-mean-square reprojection error in pixels of `points` against `pixels`.
    pub fn rms_reprojection_error(
        &self,
        intrinsics: &Intrinsics,
        points: &[Vector3<f64>],
        pixels: &[Vector2<f64>],
    ) -> f64 {
        let sum: f64 = points
            .iter()
            .zip(pixels)
            .map(|(x, u)| {
                (intrinsics.project(&(self.rotation * x + self.translation)) - u).norm_squared()
            })
            .sum();
        (sum / points.len().max(1) as f64).sqrt()
    }
}

/// Solves for the pose that projects `points` (model coordinates) onto `pixels`.
///
/// Needs at least 6 correspondences that do not all lie on one plane or line.
pub fn pose_from_landmarks(
    intrinsics: &Intrinsics,
    points: &[Vector3<f64>],
    pixels: &[Vector2<f64>],
) -> Result<Pose, OptimError> {
    if points.len() != pixels.len() {
        return Err(OptimError::InvalidInput(format!(
            "{} model points but {} image points: give one image point per model point",
            points.len(),
            pixels.len()
        )));
    }
    if points.len() < 6 {
        return Err(OptimError::DegenerateLandmarks(format!(
            "only {} correspondences; at least 6 are needed",
            points.len()
        )));
    }
    let all_finite = points.iter().all(|p| p.iter().all(|v| v.is_finite()))
        && pixels.iter().all(|p| p.iter().all(|v| v.is_finite()));
    if !all_finite {
        return Err(OptimError::InvalidInput(
            "a landmark coordinate is NaN or infinite".into(),
        ));
    }
    let initial = weak_perspective_pose(intrinsics, points, pixels)?;
    Ok(refine_pose(intrinsics, points, pixels, initial))
}

/// Fits `normalised pixel ≈ A·X + b` by least squares and reads a rotation and translation off
/// the affine camera `A = R_{1,2} / t_z`, `b = t_{x,y} / t_z`.
fn weak_perspective_pose(
    intrinsics: &Intrinsics,
    points: &[Vector3<f64>],
    pixels: &[Vector2<f64>],
) -> Result<Pose, OptimError> {
    let n = points.len() as f64;
    let mean_x = points.iter().sum::<Vector3<f64>>() / n;
    let normalised: Vec<Vector2<f64>> = pixels
        .iter()
        .map(|u| {
            Vector2::new(
                (u.x - intrinsics.cx) / intrinsics.fx,
                (u.y - intrinsics.cy) / intrinsics.fy,
            )
        })
        .collect();
    let mean_u = normalised.iter().sum::<Vector2<f64>>() / n;
    // Normal equations of the centred problem: A · Σ(xxᵀ) = Σ(u xᵀ).
    let mut xx = Matrix3::zeros();
    let mut ux = Matrix2x3::zeros();
    for (x, u) in points.iter().zip(&normalised) {
        let dx = x - mean_x;
        let du = u - mean_u;
        xx += dx * dx.transpose();
        ux += du * dx.transpose();
    }
    let spread = xx.trace();
    let xx_inverse = (xx / spread)
        .try_inverse()
        .filter(|_| xx.symmetric_eigenvalues().min() > 1e-9 * spread)
        .ok_or_else(|| {
            OptimError::DegenerateLandmarks(
                "the model points lie on a plane or a line, so the pose is ambiguous".into(),
            )
        })?
        / spread;
    let affine: Matrix2x3<f64> = ux * xx_inverse;
    let svd = affine.svd(true, true);
    let (u, v_t) = (svd.u.expect("u requested"), svd.v_t.expect("v_t requested"));
    let scale = (svd.singular_values[0] + svd.singular_values[1]) / 2.0;
    if scale <= f64::EPSILON {
        return Err(OptimError::DegenerateLandmarks(
            "all image points coincide".into(),
        ));
    }
    let rows: Matrix2x3<f64> = u * v_t;
    let r1 = rows.row(0).transpose();
    let r2 = rows.row(1).transpose();
    let rotation = Rotation3::from_matrix(&Matrix3::from_rows(&[
        r1.transpose(),
        r2.transpose(),
        r1.cross(&r2).transpose(),
    ]));
    let tz = 1.0 / scale;
    // The centroid projects to the centroid of the image points under the affine camera.
    let centre_camera = Vector3::new(mean_u.x * tz, mean_u.y * tz, tz);
    let translation = centre_camera - rotation * mean_x;
    Ok(Pose {
        rotation,
        translation,
    })
}

/// Levenberg–Marquardt on the 6 pose parameters, with rotation updates applied on the left
/// (`R ← exp([δω]×)·R`), so the Jacobian has the simple form `∂P/∂δω = −[R·X]×`.
fn refine_pose(
    intrinsics: &Intrinsics,
    points: &[Vector3<f64>],
    pixels: &[Vector2<f64>],
    mut pose: Pose,
) -> Pose {
    let cost = |pose: &Pose| {
        let e = pose.rms_reprojection_error(intrinsics, points, pixels);
        e * e
    };
    let mut current = cost(&pose);
    let mut damping = 1e-3;
    for _ in 0..100 {
        let mut jtj = Matrix6::<f64>::zeros();
        let mut jtr = Vector6::<f64>::zeros();
        for (x, u) in points.iter().zip(pixels) {
            let rx = pose.rotation * x;
            let p = rx + pose.translation;
            let residual = intrinsics.project(&p) - u;
            let z_inv = 1.0 / p.z;
            let d_proj = Matrix2x3::new(
                intrinsics.fx * z_inv,
                0.0,
                -intrinsics.fx * p.x * z_inv * z_inv,
                0.0,
                intrinsics.fy * z_inv,
                -intrinsics.fy * p.y * z_inv * z_inv,
            );
            let d_rotation = -rx.cross_matrix();
            let mut jacobian = SMatrix::<f64, 2, 6>::zeros();
            jacobian
                .fixed_view_mut::<2, 3>(0, 0)
                .copy_from(&(d_proj * d_rotation));
            jacobian.fixed_view_mut::<2, 3>(0, 3).copy_from(&d_proj);
            jtj += jacobian.transpose() * jacobian;
            jtr += jacobian.transpose() * residual;
        }
        let mut improved = false;
        while damping < 1e10 {
            let mut damped = jtj;
            for i in 0..6 {
                damped[(i, i)] *= 1.0 + damping;
            }
            let Some(step) = damped.cholesky().map(|c| -c.solve(&jtr)) else {
                damping *= 10.0;
                continue;
            };
            let candidate = Pose {
                rotation: Rotation3::new(step.fixed_rows::<3>(0).into_owned()) * pose.rotation,
                translation: pose.translation + step.fixed_rows::<3>(3),
            };
            let candidate_cost = cost(&candidate);
            if candidate_cost.is_finite() && candidate_cost < current {
                let relative_gain = (current - candidate_cost) / current.max(f64::MIN_POSITIVE);
                pose = candidate;
                current = candidate_cost;
                damping = (damping / 10.0).max(1e-12);
                improved = relative_gain > 1e-12;
                break;
            }
            damping *= 10.0;
        }
        if !improved {
            break;
        }
    }
    // Products of many small rotations drift from orthonormality by rounding.
    pose.rotation = Rotation3::from_matrix(pose.rotation.matrix());
    pose
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    /// A face-sized cloud of points (millimetres) with depth relief, deterministic.
    fn face_like_points() -> Vec<Vector3<f64>> {
        (0..68)
            .map(|i| {
                let a = i as f64 * 0.7;
                Vector3::new(
                    70.0 * a.sin(),
                    90.0 * (1.3 * a).cos(),
                    30.0 * (2.1 * a).sin() - 20.0 * (a.sin()).powi(2),
                )
            })
            .collect()
    }

    /// Angle between two rotations, robust near zero where `acos` loses precision.
    fn degrees_between(a: &Rotation3<f64>, b: &Rotation3<f64>) -> f64 {
        let relative = nalgebra::UnitQuaternion::from_rotation_matrix(&(a.inverse() * b));
        (2.0 * relative.vector().norm().atan2(relative.scalar().abs())).to_degrees()
    }

    fn camera() -> Intrinsics {
        Intrinsics::guess_for_image(640, 480)
    }

    fn project_all(pose: &Pose, points: &[Vector3<f64>]) -> Vec<Vector2<f64>> {
        points
            .iter()
            .map(|x| camera().project(&(pose.rotation * x + pose.translation)))
            .collect()
    }

    #[test]
    fn recovers_exact_poses_over_the_range_of_head_rotations() {
        let points = face_like_points();
        for (yaw, pitch, roll) in [
            (0.0, 0.0, 0.0),
            (45.0, 20.0, 10.0),
            (-45.0, -20.0, -15.0),
            (30.0, -10.0, 5.0),
        ] {
            let truth = Pose {
                rotation: Rotation3::from_euler_angles(
                    f64::to_radians(pitch),
                    f64::to_radians(yaw),
                    f64::to_radians(roll),
                ),
                translation: Vector3::new(15.0, -20.0, 600.0),
            };
            let pixels = project_all(&truth, &points);
            let pose = pose_from_landmarks(&camera(), &points, &pixels).unwrap();
            let initial = weak_perspective_pose(&camera(), &points, &pixels).unwrap();
            assert!(
                degrees_between(&pose.rotation, &truth.rotation) < 1e-6,
                "{yaw} {pitch}: init off by {}°, refined off by {}°",
                degrees_between(&initial.rotation, &truth.rotation),
                degrees_between(&pose.rotation, &truth.rotation),
            );
            assert_relative_eq!(pose.translation, truth.translation, epsilon = 1e-5);
        }
    }

    #[test]
    fn noisy_landmarks_give_a_pose_within_a_degree() {
        let points = face_like_points();
        let truth = Pose {
            rotation: Rotation3::from_euler_angles(0.2, -0.5, 0.05),
            translation: Vector3::new(-10.0, 5.0, 500.0),
        };
        // Deterministic ±1 px noise.
        let pixels: Vec<_> = project_all(&truth, &points)
            .into_iter()
            .enumerate()
            .map(|(i, p)| p + Vector2::new((i as f64 * 2.3).sin(), (i as f64 * 1.7).cos()))
            .collect();
        let pose = pose_from_landmarks(&camera(), &points, &pixels).unwrap();
        assert!(degrees_between(&pose.rotation, &truth.rotation) < 1.0);
        assert!((pose.translation - truth.translation).norm() < 15.0);
        assert!(pose.rms_reprojection_error(&camera(), &points, &pixels) < 1.5);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let points = face_like_points();
        let pixels = vec![Vector2::new(320.0, 240.0); points.len()];
        assert!(matches!(
            pose_from_landmarks(&camera(), &points[..4], &pixels[..4]),
            Err(OptimError::DegenerateLandmarks(_))
        ));
        assert!(matches!(
            pose_from_landmarks(&camera(), &points, &pixels[..10]),
            Err(OptimError::InvalidInput(_))
        ));
        assert!(matches!(
            pose_from_landmarks(&camera(), &points, &pixels),
            Err(OptimError::DegenerateLandmarks(_))
        ));
        let planar: Vec<_> = points.iter().map(|p| Vector3::new(p.x, p.y, 0.0)).collect();
        let other = project_all(
            &Pose {
                rotation: Rotation3::identity(),
                translation: Vector3::new(0.0, 0.0, 500.0),
            },
            &points,
        );
        assert!(matches!(
            pose_from_landmarks(&camera(), &planar, &other),
            Err(OptimError::DegenerateLandmarks(_))
        ));
        let mut nan = other.clone();
        nan[3].x = f64::NAN;
        assert!(matches!(
            pose_from_landmarks(&camera(), &points, &nan),
            Err(OptimError::InvalidInput(_))
        ));
    }
}
