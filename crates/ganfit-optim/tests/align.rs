//! Landmark alignment on synthetic faces with known parameters.

use candle_core::{DType, Device, Tensor};
use ganfit_morphable::MorphableModel;
use ganfit_optim::{
    AlignmentConfig, ImageLandmarks, Intrinsics, align_one_person, align_to_landmarks,
};
use nalgebra::{Rotation3, UnitQuaternion, Vector3};

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
    rotation: Rotation3<f64>,
    translation: Vector3<f64>,
    camera: Intrinsics,
}

impl Synthetic {
    fn pixel(&self, vertex: u32) -> [f64; 2] {
        let v = self.vertices[vertex as usize].map(f64::from);
        let p = self
            .camera
            .project(&(self.rotation * Vector3::from(v) + self.translation));
        [p.x, p.y]
    }
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
    let mut synthetic = Synthetic {
        landmarks: ImageLandmarks {
            points: Vec::new(),
            vertices: None,
            weights: None,
            dense: Vec::new(),
            width: 512,
            height: 512,
        },
        vertices,
        rotation,
        translation,
        camera,
    };
    synthetic.landmarks.points = model
        .landmark_vertex_ids()
        .iter()
        .map(|id| id.map(|id| synthetic.pixel(id)))
        .collect();
    synthetic
}

/// The final landmark term of a fit: mean squared error relative to the face size.
fn final_landmark_term(fit: &ganfit_optim::Alignment) -> f64 {
    let last = fit.stages.last().unwrap();
    last.history
        .iter()
        .filter(|r| r.total == last.best_loss)
        .flat_map(|r| r.terms.iter().filter(|(n, _)| n == "landmark"))
        .map(|(_, v)| *v)
        .next()
        .unwrap()
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
        let landmark = final_landmark_term(&fit);
        eprintln!("seed {seed}: landmark term {landmark}");
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

/// A detector that puts the jaw points on the face's outline sees a turned head's far jaw
/// points where the cheek's silhouette is, not where the (hidden) jaw vertices project. With
/// the dynamic contour the fit explains such points; with fixed vertices it cannot.
#[test]
fn the_jaw_contour_follows_the_outline_of_a_turned_head() {
    // The Surrey model names no jaw landmarks (eos fits its contour separately); ICT does.
    let model = MorphableModel::ict(&ganfit_assets::Resolver::new(), &Device::Cpu).unwrap();
    let mut truth = synthesise(&model, 4, 40.0);
    let ids = model.landmark_vertex_ids().to_vec();
    let mut moved = 0;
    for landmark in (0..17).filter(|&i| i != 8) {
        let vertex = ids[landmark].unwrap();
        let at = truth.vertices[vertex as usize];
        let outward = truth.rotation * Vector3::new(f64::from(at[0].signum()), 0.0, 0.0);
        if outward.z <= 0.0 {
            continue; // this side faces the camera: its jaw line is visible
        }
        // The outline at the landmark's height: the outermost projection of any vertex of
        // that side within 5 mm of its height.
        let fixed = truth.pixel(vertex);
        let reach = |v: u32| {
            let p = truth.pixel(v);
            (p[0] - fixed[0]) * outward.x + (p[1] - fixed[1]) * outward.y
        };
        let outline = (0..truth.vertices.len() as u32)
            .filter(|&v| {
                let p = truth.vertices[v as usize];
                (p[1] - at[1]).abs() < 5.0 && p[0] * at[0] > 0.0
            })
            .max_by(|&a, &b| reach(a).total_cmp(&reach(b)))
            .unwrap();
        if reach(outline) > 1.0 {
            truth.landmarks.points[landmark] = Some(truth.pixel(outline));
            moved += 1;
        }
    }
    assert!(
        moved >= 4,
        "only {moved} far jaw points differ from their outline"
    );

    let fit = |jaw_contour| {
        let config = AlignmentConfig {
            jaw_contour,
            ..AlignmentConfig::default()
        };
        let fit = align_to_landmarks(&model, &truth.landmarks, &config).unwrap();
        let shape = rows(
            &model
                .instance(&fit.params.shape, &fit.params.expression)
                .unwrap(),
        );
        (
            final_landmark_term(&fit),
            centred_error(&shape, &truth.vertices),
        )
    };
    let (fixed_term, fixed_error) = fit(false);
    let (contour_term, contour_error) = fit(true);
    eprintln!(
        "fixed jaw vertices: landmark term {fixed_term:.2e}, error {fixed_error:.2} mm; \
         contour: {contour_term:.2e}, {contour_error:.2} mm"
    );
    assert!(contour_term < 0.5 * fixed_term);
    assert!(contour_error < fixed_error);
}

/// Several photos of one face, each with its own pose and its own detector noise: aligned
/// together they share one identity, each keeps its own camera, and the shared shape is nearer
/// the truth than the shapes the photos give one at a time (on average: a single photo's noise
/// may happen to suit the truth).
#[test]
fn photos_of_one_face_aligned_together_share_a_better_shape() {
    let model = sfm();
    let yaws = [-30.0, 0.0, 30.0];
    let views: Vec<Synthetic> = yaws
        .iter()
        .enumerate()
        .map(|(view, &yaw)| {
            let mut truth = synthesise(&model, 6, yaw);
            // Detector noise of up to 1 px, different in every photo: far more, and the
            // identity prior (tuned for real detectors' errors) lets each fit follow it.
            let noise = wobble(100 + view, 2 * truth.landmarks.points.len());
            for (point, offset) in truth.landmarks.points.iter_mut().zip(noise.chunks(2)) {
                if let Some(p) = point {
                    p[0] += f64::from(offset[0]);
                    p[1] += f64::from(offset[1]);
                }
            }
            truth
        })
        .collect();
    let config = AlignmentConfig::default();
    let shape_error = |fit: &ganfit_optim::Alignment, truth: &Synthetic| {
        let neutral = Tensor::zeros(model.expression_modes(), DType::F32, &Device::Cpu).unwrap();
        let fitted = rows(&model.instance(&fit.params.shape, &neutral).unwrap());
        centred_error(&fitted, &truth.vertices)
    };
    let alone: Vec<f32> = views
        .iter()
        .map(|truth| {
            let fit = align_to_landmarks(&model, &truth.landmarks, &config).unwrap();
            shape_error(&fit, truth)
        })
        .collect();
    let landmarks: Vec<ImageLandmarks> = views.iter().map(|v| v.landmarks.clone()).collect();
    let together = align_one_person(&model, &landmarks, &config).unwrap();
    assert_eq!(together.len(), views.len());
    let shared = together[0].params.shape.to_vec1::<f32>().unwrap();
    for fit in &together[1..] {
        assert_eq!(fit.params.shape.to_vec1::<f32>().unwrap(), shared);
    }
    // Each photo keeps its own camera: the fitted rotations differ as the true ones do.
    let rotation = |fit: &ganfit_optim::Alignment| {
        let axis_angle: Vec<f32> = fit.params.rotation.to_vec1().unwrap();
        Rotation3::new(Vector3::from_iterator(
            axis_angle.iter().map(|&v| f64::from(v)),
        ))
    };
    for (fit, truth) in together.iter().zip(&views) {
        let relative = rotation(&together[1]).inverse() * rotation(fit);
        let true_relative = views[1].rotation.inverse() * truth.rotation;
        let off = UnitQuaternion::from_rotation_matrix(&relative)
            .angle_to(&UnitQuaternion::from_rotation_matrix(&true_relative))
            .to_degrees();
        assert!(
            off < 2.0,
            "a photo's rotation relative to the frontal one is {off}° off"
        );
    }
    let joint = shape_error(&together[0], &views[0]);
    eprintln!("shape error alone {alone:?} mm, together {joint} mm");
    let mean_alone = alone.iter().sum::<f32>() / alone.len() as f32;
    assert!(
        joint < 0.9 * mean_alone,
        "together {joint} mm, alone {mean_alone} mm on average"
    );
}

#[test]
fn aligning_no_photos_is_a_typed_error() {
    let err = align_one_person(&sfm(), &[], &AlignmentConfig::default()).unwrap_err();
    assert!(
        matches!(err, ganfit_optim::OptimError::InvalidInput(_)),
        "{err}"
    );
}
