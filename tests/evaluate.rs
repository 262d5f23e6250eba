//! The NoW-style reconstruction metric on meshes with known answers: identical meshes score 0,
//! a known rigid motion is undone, a 1 mm offset along the normals measures 1 mm, point-to-
//! surface distances match a brute-force search, and bad input gives typed errors.

use ganfit::evaluate::{
    AlignmentKind, EvaluateError, GroundTruth, MetricConfig, Reconstruction, SurfaceMesh,
    fit_similarity, reconstruction_error,
};
use nalgebra::{Rotation3, Vector3};

/// Radius of the test surface, about a face's curvature, millimetres.
const RADIUS: f64 = 90.0;
/// Grid points per side of the test surface.
const GRID: usize = 41;

/// A sphere cap `z = sqrt(R² − x² − y²)` over a square 100 mm wide, centred on the origin and
/// scaled radially by `(RADIUS + offset) / RADIUS` (so `offset` moves it along its normals).
fn cap(offset: f64) -> SurfaceMesh {
    let scale = (RADIUS + offset) / RADIUS;
    let mut vertices = Vec::new();
    for row in 0..GRID {
        for col in 0..GRID {
            let x = -50.0 + 100.0 * col as f64 / (GRID - 1) as f64;
            let y = -50.0 + 100.0 * row as f64 / (GRID - 1) as f64;
            let z = (RADIUS * RADIUS - x * x - y * y).sqrt();
            vertices.push([x * scale, y * scale, z * scale]);
        }
    }
    let mut triangles = Vec::new();
    for row in 0..GRID - 1 {
        for col in 0..GRID - 1 {
            let i = (row * GRID + col) as u32;
            let g = GRID as u32;
            triangles.push([i, i + 1, i + g + 1]);
            triangles.push([i, i + g + 1, i + g]);
        }
    }
    SurfaceMesh {
        vertices,
        triangles,
    }
}

/// Vertices playing the part of landmarks: spread over the surface, not collinear.
const LANDMARK_VERTICES: [usize; 7] = [
    10 * GRID + 10,
    10 * GRID + 30,
    20 * GRID + 20,
    30 * GRID + 12,
    30 * GRID + 28,
    5 * GRID + 20,
    35 * GRID + 20,
];

fn landmarks_of(mesh: &SurfaceMesh) -> Vec<Option<[f64; 3]>> {
    LANDMARK_VERTICES
        .iter()
        .map(|&v| Some(mesh.vertices[v]))
        .collect()
}

/// The ground truth: the inner part of the cap (away from its rim, like the narrow face area
/// inside a face model), with the landmarks of `mesh`.
fn truth_of(mesh: &SurfaceMesh) -> GroundTruth {
    let points = mesh
        .vertices
        .iter()
        .filter(|p| p[0].abs() <= 35.0 && p[1].abs() <= 35.0)
        .copied()
        .collect();
    GroundTruth {
        points,
        landmarks: landmarks_of(mesh),
    }
}

fn config(alignment: AlignmentKind, icp_iterations: usize) -> MetricConfig {
    MetricConfig {
        alignment,
        landmark_ids: (0..LANDMARK_VERTICES.len()).collect(),
        icp_iterations,
        ..MetricConfig::default()
    }
}

fn moved(mesh: &SurfaceMesh, rotation: &Rotation3<f64>, translation: Vector3<f64>) -> SurfaceMesh {
    SurfaceMesh {
        vertices: mesh
            .vertices
            .iter()
            .map(|&p| (rotation * Vector3::from(p) + translation).into())
            .collect(),
        triangles: mesh.triangles.clone(),
    }
}

#[test]
fn identical_meshes_score_zero() {
    let mesh = cap(0.0);
    let reconstruction = Reconstruction {
        landmarks: landmarks_of(&mesh),
        mesh: mesh.clone(),
    };
    for kind in [AlignmentKind::Rigid, AlignmentKind::Similarity] {
        let error =
            reconstruction_error(&truth_of(&mesh), &reconstruction, &config(kind, 50)).unwrap();
        assert!(error.mean_mm < 1e-9, "{kind:?}: {error:?}");
        assert!(error.median_mm < 1e-9 && error.std_mm < 1e-9);
        assert!(error.landmark_rms_mm < 1e-9);
    }
}

#[test]
fn a_known_rigid_motion_is_undone() {
    let mesh = cap(0.0);
    let rotation = Rotation3::from_euler_angles(0.3, -0.5, 0.2);
    let translation = Vector3::new(40.0, -25.0, 300.0);
    let reconstruction_mesh = moved(&mesh, &rotation, translation);
    let reconstruction = Reconstruction {
        landmarks: landmarks_of(&reconstruction_mesh),
        mesh: reconstruction_mesh,
    };
    let error = reconstruction_error(
        &truth_of(&mesh),
        &reconstruction,
        &config(AlignmentKind::Rigid, 50),
    )
    .unwrap();
    assert!(error.mean_mm < 1e-6, "{error:?}");
    // The transform found is the inverse of the motion applied.
    let undone = (error.transform.rotation * rotation).matrix() - nalgebra::Matrix3::identity();
    assert!(undone.norm() < 1e-9, "residual rotation {undone}");
    let back = error.transform.apply(&translation);
    assert!(back.norm() < 1e-6, "{back}");
    assert!((error.transform.scale - 1.0).abs() < 1e-12);
}

#[test]
fn icp_fixes_what_noisy_landmarks_got_wrong() {
    let mesh = cap(0.0);
    let mut landmarks = landmarks_of(&mesh);
    // Landmarks off by a few millimetres, as detected landmarks are.
    let nudges = [[3.0, -2.0, 1.0], [-2.5, 1.0, 0.5], [1.0, 3.0, -1.0]];
    for (landmark, nudge) in landmarks.iter_mut().zip(nudges) {
        let p = landmark.as_mut().unwrap();
        for axis in 0..3 {
            p[axis] += nudge[axis];
        }
    }
    let reconstruction = Reconstruction {
        mesh: mesh.clone(),
        landmarks,
    };
    let truth = truth_of(&mesh);
    let landmarks_only =
        reconstruction_error(&truth, &reconstruction, &config(AlignmentKind::Rigid, 0)).unwrap();
    let with_icp =
        reconstruction_error(&truth, &reconstruction, &config(AlignmentKind::Rigid, 100)).unwrap();
    assert!(landmarks_only.mean_mm > 0.1, "{}", landmarks_only.mean_mm);
    assert!(
        with_icp.mean_mm < 0.05 * landmarks_only.mean_mm,
        "ICP left {} mm of {} mm",
        with_icp.mean_mm,
        landmarks_only.mean_mm
    );
    assert!(with_icp.icp_iterations > 1);
}

#[test]
fn a_one_millimetre_offset_along_the_normals_measures_one_millimetre() {
    let truth_mesh = cap(0.0);
    let offset = cap(1.0);
    // The landmarks are where the truth's are, so the alignment is the identity and the
    // distance is the offset alone, less the chord sag of the 2.5 mm triangles (< 0.02 mm).
    let reconstruction = Reconstruction {
        landmarks: landmarks_of(&truth_mesh),
        mesh: offset,
    };
    let truth = truth_of(&truth_mesh);
    let error =
        reconstruction_error(&truth, &reconstruction, &config(AlignmentKind::Rigid, 0)).unwrap();
    assert!((error.mean_mm - 1.0).abs() < 0.02, "{error:?}");
    assert!((error.median_mm - 1.0).abs() < 0.02);
    assert!(error.std_mm < 0.02);
    // A radial offset of a sphere is a scaling about its centre, which the similarity
    // alignment is allowed to undo: only the shape is scored then.
    let scaled = reconstruction_error(
        &truth,
        &reconstruction,
        &config(AlignmentKind::Similarity, 50),
    )
    .unwrap();
    assert!(scaled.mean_mm < 0.05, "{scaled:?}");
    assert!((scaled.transform.scale - RADIUS / (RADIUS + 1.0)).abs() < 1e-3);
}

/// Distance from `p` to triangle `abc`, by a route independent of the metric's: the projection
/// onto the plane when it falls inside, else the nearest of the three edges.
fn brute_force_distance(p: Vector3<f64>, [a, b, c]: [Vector3<f64>; 3]) -> f64 {
    let normal = (b - a).cross(&(c - a)).normalize();
    let height = (p - a).dot(&normal);
    let q = p - normal * height;
    let inside = [(a, b), (b, c), (c, a)]
        .iter()
        .all(|(u, v)| (v - u).cross(&(q - u)).dot(&normal) >= 0.0);
    if inside {
        return height.abs();
    }
    [(a, b), (b, c), (c, a)]
        .iter()
        .map(|(u, v)| {
            let t = ((p - u).dot(&(v - u)) / (v - u).norm_squared()).clamp(0.0, 1.0);
            (p - (u + (v - u) * t)).norm()
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn point_to_surface_distances_match_a_brute_force_search() {
    // A random triangle soup and random points around it, from a fixed linear congruential
    // sequence so the test needs no random number crate.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 11) as f64 / (1u64 << 53) as f64 * 100.0 - 50.0
    };
    let vertices: Vec<[f64; 3]> = (0..300).map(|_| [next(), next(), next() * 0.3]).collect();
    let triangles: Vec<[u32; 3]> = (0..100)
        .map(|i| [3 * i, 3 * i + 1, 3 * i + 2].map(|v: u32| v))
        .collect();
    let points: Vec<[f64; 3]> = (0..400).map(|_| [next(), next(), next()]).collect();
    // Landmarks equal in both, so the alignment is the identity.
    let landmarks: Vec<Option<[f64; 3]>> = vertices[..4].iter().map(|&p| Some(p)).collect();
    let error = reconstruction_error(
        &GroundTruth {
            points: points.clone(),
            landmarks: landmarks.clone(),
        },
        &Reconstruction {
            mesh: SurfaceMesh {
                vertices: vertices.clone(),
                triangles: triangles.clone(),
            },
            landmarks,
        },
        &MetricConfig {
            alignment: AlignmentKind::Rigid,
            landmark_ids: vec![0, 1, 2, 3],
            icp_iterations: 0,
            ..MetricConfig::default()
        },
    )
    .unwrap();
    for (p, measured) in points.iter().zip(&error.distances) {
        let expected = triangles
            .iter()
            .map(|t| {
                brute_force_distance(
                    Vector3::from(*p),
                    t.map(|v| Vector3::from(vertices[v as usize])),
                )
            })
            .fold(f64::INFINITY, f64::min);
        assert!(
            (measured - expected).abs() < 1e-9,
            "{p:?}: metric {measured}, brute force {expected}"
        );
    }
}

#[test]
fn umeyama_recovers_a_similarity_transform() {
    let from: Vec<Vector3<f64>> = LANDMARK_VERTICES
        .iter()
        .map(|&v| Vector3::from(cap(0.0).vertices[v]))
        .collect();
    let rotation = Rotation3::from_euler_angles(-1.0, 0.4, 2.5);
    let to: Vec<Vector3<f64>> = from
        .iter()
        .map(|p| rotation * p * 1.7 + Vector3::new(1.0, 2.0, 3.0))
        .collect();
    let fitted = fit_similarity(&from, &to, AlignmentKind::Similarity).unwrap();
    assert!((fitted.scale - 1.7).abs() < 1e-12);
    let residual = (fitted.rotation.matrix() - rotation.matrix()).norm();
    assert!(residual < 1e-9, "residual rotation {residual}");
    // A mirror image is not a rotation: the best proper rotation is returned instead.
    let mirrored: Vec<Vector3<f64>> = from.iter().map(|p| Vector3::new(-p.x, p.y, p.z)).collect();
    let fitted = fit_similarity(&from, &mirrored, AlignmentKind::Rigid).unwrap();
    assert!((fitted.rotation.matrix().determinant() - 1.0).abs() < 1e-9);
}

#[test]
fn bad_input_gives_typed_errors() {
    let mesh = cap(0.0);
    let truth = truth_of(&mesh);
    let good = Reconstruction {
        landmarks: landmarks_of(&mesh),
        mesh: mesh.clone(),
    };
    let rigid = config(AlignmentKind::Rigid, 10);
    let check = |reconstruction: &Reconstruction, truth: &GroundTruth, config: &MetricConfig| {
        let err = reconstruction_error(truth, reconstruction, config).unwrap_err();
        assert!(!err.to_string().is_empty());
        err
    };

    let mut two = good.clone();
    for landmark in &mut two.landmarks[2..] {
        *landmark = None;
    }
    assert!(matches!(
        check(&two, &truth, &rigid),
        EvaluateError::TooFewLandmarks { usable: 2, .. }
    ));

    let collinear = Reconstruction {
        landmarks: (0..7)
            .map(|i| Some([i as f64, 2.0 * i as f64, 0.0]))
            .collect(),
        mesh: mesh.clone(),
    };
    let collinear_truth = GroundTruth {
        landmarks: collinear.landmarks.clone(),
        ..truth.clone()
    };
    assert!(matches!(
        check(&collinear, &collinear_truth, &rigid),
        EvaluateError::DegenerateLandmarks
    ));

    let mut broken = good.clone();
    broken.mesh.triangles.push([0, 1, 1_000_000]);
    assert!(matches!(
        check(&broken, &truth, &rigid),
        EvaluateError::VertexOutOfRange {
            vertex: 1_000_000,
            ..
        }
    ));

    let mut nan = good.clone();
    nan.mesh.vertices[5][1] = f64::NAN;
    assert!(matches!(
        check(&nan, &truth, &rigid),
        EvaluateError::NonFinite(_)
    ));

    let empty = Reconstruction {
        mesh: SurfaceMesh::default(),
        ..good.clone()
    };
    assert!(matches!(
        check(&empty, &truth, &rigid),
        EvaluateError::Empty(_)
    ));

    let no_points = GroundTruth {
        points: Vec::new(),
        ..truth.clone()
    };
    assert!(matches!(
        check(&good, &no_points, &rigid),
        EvaluateError::Empty(_)
    ));

    let far = MetricConfig {
        landmark_ids: vec![0, 1, 99],
        ..rigid.clone()
    };
    assert!(matches!(
        check(&good, &truth, &far),
        EvaluateError::LandmarkOutOfRange { id: 99, .. }
    ));
}
