//! Landmark alignment on synthetic faces with known parameters.

use candle_core::{DType, Device, Tensor};
use ganfit_morphable::MorphableModel;
use ganfit_optim::{AlignmentConfig, ImageLandmarks, Intrinsics, align_to_landmarks};
use nalgebra::{Rotation3, Vector3};

fn sfm() -> MorphableModel {
    MorphableModel::sfm(&ganfit_assets::Resolver::new(), &Device::Cpu).unwrap()
}

/// Deterministic pseudo-random numbers in [-1, 1].
fn wobble(seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((seed * 7919 + i * 104_729) as f32 * 0.618_034).sin())
        .collect()
}

fn rows(vertices: &Tensor) -> Vec<[f32; 3]> {
    vertices
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| [v[0], v[1], v[2]])
        .collect()
}

/// Mean distance between corresponding vertices after moving both centroids to the origin.
fn centred_error(a: &[[f32; 3]], b: &[[f32; 3]]) -> f32 {
    let centroid = |vs: &[[f32; 3]]| {
        let n = vs.len() as f32;
        [0, 1, 2].map(|axis| vs.iter().map(|v| v[axis]).sum::<f32>() / n)
    };
    let (ca, cb) = (centroid(a), centroid(b));
    a.iter()
        .zip(b)
        .map(|(p, q)| {
            (0..3)
                .map(|axis| ((p[axis] - ca[axis]) - (q[axis] - cb[axis])).powi(2))
                .sum::<f32>()
                .sqrt()
        })
        .sum::<f32>()
        / a.len() as f32
}

struct Synthetic {
    landmarks: ImageLandmarks,
    vertices: Vec<[f32; 3]>,
}

fn synthesise(model: &MorphableModel, seed: usize, yaw_degrees: f64) -> Synthetic {
    let shape: Vec<f32> = wobble(seed, 10).iter().map(|v| 1.5 * v).collect();
    let shape = Tensor::new(shape.as_slice(), &Device::Cpu).unwrap();
    let expression = Tensor::zeros(model.expression_modes(), DType::F32, &Device::Cpu).unwrap();
    let vertices = rows(&model.instance(&shape, &expression).unwrap());
    // Model y is up and z towards the viewer; the OpenCV camera looks along +z with y down.
    let rotation = Rotation3::from_euler_angles(std::f64::consts::PI, 0.0, 0.0)
        * Rotation3::from_euler_angles(0.1, yaw_degrees.to_radians(), 0.05);
    let translation = Vector3::new(10.0, -15.0, 700.0);
    let camera = Intrinsics::guess_for_image(512, 512);
    let points = model
        .landmark_vertex_ids()
        .iter()
        .map(|id| {
            id.map(|id| {
                let v = vertices[id as usize].map(f64::from);
                let p = camera.project(&(rotation * Vector3::from(v) + translation));
                [p.x, p.y]
            })
        })
        .collect();
    Synthetic {
        landmarks: ImageLandmarks {
            points,
            vertices: None,
            weights: None,
            dense: Vec::new(),
            width: 512,
            height: 512,
        },
        vertices,
    }
}

#[test]
fn recovers_landmarks_and_shape_of_synthetic_faces() {
    let model = sfm();
    for (seed, yaw) in [(1, 0.0), (2, 25.0), (3, -30.0)] {
        let truth = synthesise(&model, seed, yaw);
        let fit =
            align_to_landmarks(&model, &truth.landmarks, &AlignmentConfig::default()).unwrap();
        // The landmark term is the mean squared error relative to the face size: at the end the
        // RMS landmark error must be under 0.5 % of the face.
        let last = fit.stages.last().unwrap();
        let landmark = last
            .history
            .iter()
            .filter(|r| r.total == last.best_loss)
            .flat_map(|r| r.terms.iter().filter(|(n, _)| n == "landmark"))
            .map(|(_, v)| *v)
            .next()
            .unwrap();
        eprintln!(
            "seed {seed}: landmark term {landmark}, total {}",
            last.best_loss
        );
        assert!(
            landmark.sqrt() < 0.005,
            "seed {seed}: landmark term {landmark}"
        );
        // Mean 3D error of the fitted shape (without pose) against the truth, after removing
        // the translation between them: a landmark-only fit recovers the face's proportions
        // only roughly, so the bound is loose but far below the spread of random faces.
        let fitted = rows(
            &model
                .instance(&fit.params.shape, &fit.params.expression)
                .unwrap(),
        );
        let mean_shape = rows(model.mean());
        let error = centred_error(&fitted, &truth.vertices);
        let baseline = centred_error(&mean_shape, &truth.vertices);
        eprintln!("seed {seed}: error {error} mm, mean-face error {baseline} mm");
        assert!(
            error < 0.7 * baseline,
            "seed {seed}: fitted error {error} mm vs mean-face error {baseline} mm"
        );
    }
}

#[test]
fn wrong_landmark_count_is_a_typed_error() {
    let model = sfm();
    let landmarks = ImageLandmarks {
        points: vec![Some([1.0, 2.0]); 5],
        vertices: None,
        weights: None,
        dense: Vec::new(),
        width: 100,
        height: 100,
    };
    let err = align_to_landmarks(&model, &landmarks, &AlignmentConfig::default()).unwrap_err();
    assert!(err.to_string().contains("68"), "{err}");
}
