//! Synthetic ground-truth faces: seeded and reproducible, drawn within the configured ranges,
//! and realistic enough that the face detector and landmarker find the face where the ground
//! truth says it is.

use std::sync::OnceLock;

use candle_core::Device;
use ganfit::losses::face::{FaceChoice, FaceDetector, FaceError, FaceLandmarker};
use ganfit::morphable::MorphableModel;
use ganfit::synthetic::{
    SyntheticAssets, SyntheticConfig, SyntheticError, SyntheticGenerator, shared_dir, shared_photos,
};

fn model() -> &'static MorphableModel {
    static MODEL: OnceLock<MorphableModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        MorphableModel::ict(&ganfit::assets::Resolver::new(), &Device::Cpu).unwrap()
    })
}

fn assets() -> SyntheticAssets {
    SyntheticAssets::flat_skin(3, 256, 5, &shared_dir().unwrap()).unwrap()
}

fn generator(config: SyntheticConfig) -> SyntheticGenerator<'static> {
    SyntheticGenerator::new(model(), config, assets()).unwrap()
}

#[test]
fn a_seed_gives_the_same_face_and_another_seed_another() {
    let generator = generator(SyntheticConfig::default());
    let a = generator.generate(11).unwrap();
    let b = generator.generate(11).unwrap();
    let c = generator.generate(12).unwrap();
    assert_eq!(a.image, b.image);
    assert_eq!(a.shape, b.shape);
    assert_eq!(a.rotation, b.rotation);
    assert_eq!(a.landmarks, b.landmarks);
    assert_ne!(a.shape, c.shape);
    assert_ne!(a.image, c.image);
}

#[test]
fn parameters_stay_within_the_configured_ranges() {
    let config = SyntheticConfig {
        yaw_deg: 30.0,
        pitch_deg: 10.0,
        roll_deg: 0.0,
        image_size: 64,
        ..SyntheticConfig::default()
    };
    let generator = generator(config.clone());
    let mut all_shape = Vec::new();
    for seed in 0..8 {
        let face = generator.generate(seed).unwrap();
        let [yaw, pitch, roll] = face.yaw_pitch_roll_deg;
        assert!(yaw.abs() <= 30.0 && pitch.abs() <= 10.0 && roll == 0.0);
        let active = face.expression.iter().filter(|&&w| w != 0.0).count();
        assert!(active <= config.max_expressions, "{active} expressions");
        assert!(
            face.expression
                .iter()
                .all(|&w| w == 0.0 || (0.1..=config.max_expression_weight).contains(&w))
        );
        assert_eq!(face.shape.len(), model().shape_modes());
        all_shape.extend(face.shape.iter().map(|&s| f64::from(s)));
        assert_eq!(face.image.dimensions(), (64, 64));
        // The ground truth is the model instance of the recorded parameters.
        let truth = face.ground_truth(model()).unwrap();
        let narrow = model().vertex_set("narrow_face").unwrap();
        assert_eq!(truth.points.len(), narrow.len());
        assert_eq!(truth.landmarks.len(), 68);
    }
    // Identity coefficients are N(0, 1): 800 draws.
    let n = all_shape.len() as f64;
    let mean = all_shape.iter().sum::<f64>() / n;
    let std = (all_shape.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 0.15 && (std - 1.0).abs() < 0.1, "{mean} {std}");
}

fn detector_and_landmarker() -> (FaceDetector, FaceLandmarker) {
    let resolver = ganfit::assets::Resolver::new();
    (
        FaceDetector::from_resolver(&resolver, &Device::Cpu).unwrap(),
        FaceLandmarker::from_resolver(&resolver, &Device::Cpu).unwrap(),
    )
}

#[test]
fn the_landmarker_finds_the_face_where_the_ground_truth_puts_it() {
    let (detector, landmarker) = detector_and_landmarker();
    let generator = generator(SyntheticConfig {
        yaw_deg: 30.0,
        ..SyntheticConfig::default()
    });
    for seed in [1, 2, 3] {
        let face = generator.generate(seed).unwrap();
        let detection = detector
            .detect_face(&face.image, FaceChoice::Largest)
            .unwrap();
        let detected = landmarker
            .landmarks(&face.image, &detection)
            .unwrap()
            .to_ibug68();
        let truth: Vec<[f64; 2]> = face.landmarks.iter().map(|p| p.unwrap()).collect();
        let inter_ocular =
            ((truth[36][0] - truth[45][0]).powi(2) + (truth[36][1] - truth[45][1]).powi(2)).sqrt();
        // Inner landmarks (brows, eyes, nose, mouth): the jaw contour is a silhouette that
        // detectors and the model's fixed jaw vertices place differently at an angle.
        let error = (17..68)
            .map(|i| {
                ((f64::from(detected[i][0]) - truth[i][0]).powi(2)
                    + (f64::from(detected[i][1]) - truth[i][1]).powi(2))
                .sqrt()
            })
            .sum::<f64>()
            / 51.0
            / inter_ocular;
        assert!(
            error < 0.1,
            "seed {seed} (yaw/pitch/roll {:?}): mean inner landmark error {:.1} % of the \
             inter-ocular distance",
            face.yaw_pitch_roll_deg,
            100.0 * error
        );
    }
}

/// A face the short-range detector scores under its threshold (flat skin, turned 25° and
/// looking down 17°: 0.34 < 0.5) is still located where the landmark network is sure of it,
/// and its points lie where the ground truth puts them; a photo whose face is painted over,
/// where the detector's best guess scores 0.31, still holds no face.
#[test]
fn a_face_the_detector_doubts_is_taken_only_when_the_landmark_network_confirms_it() {
    let (detector, landmarker) = detector_and_landmarker();
    let face = generator(SyntheticConfig::default()).generate(375).unwrap();
    assert!(detector.detect(&face.image).unwrap().is_empty());
    let (_, points) = landmarker
        .locate(&detector, &face.image, FaceChoice::Largest)
        .unwrap();
    let detected = points.to_ibug68();
    let truth: Vec<[f64; 2]> = face.landmarks.iter().map(|p| p.unwrap()).collect();
    let inter_ocular = (truth[36][0] - truth[45][0]).hypot(truth[36][1] - truth[45][1]);
    let error = (17..68)
        .map(|i| {
            (f64::from(detected[i][0]) - truth[i][0]).hypot(f64::from(detected[i][1]) - truth[i][1])
        })
        .sum::<f64>()
        / 51.0
        / inter_ocular;
    assert!(
        error < 0.1,
        "mean inner landmark error {:.1} % IOD",
        100.0 * error
    );

    let photo = shared_dir()
        .unwrap()
        .join("data/faces/frl_london/142_smiling.jpg");
    let mut painted = image::open(photo).unwrap().to_rgb8();
    let [x0, y0, x1, y1] = detector
        .detect_face(&painted, FaceChoice::Largest)
        .unwrap()
        .bbox;
    let (w, h) = (x1 - x0, y1 - y0);
    let (width, height) = painted.dimensions();
    for y in (y0 - 0.4 * h).max(0.0) as u32..((y1 + 0.4 * h) as u32).min(height) {
        for x in (x0 - 0.3 * w).max(0.0) as u32..((x1 + 0.3 * w) as u32).min(width) {
            painted.put_pixel(x, y, image::Rgb([128, 128, 128]));
        }
    }
    assert!(
        !detector
            .unsure_faces(&painted, FaceChoice::Largest, 0.25)
            .unwrap()
            .is_empty(),
        "the painted photo should leave the detector a doubtful guess to reject"
    );
    assert!(matches!(
        landmarker.locate(&detector, &painted, FaceChoice::Largest),
        Err(FaceError::NoFaceFound { .. })
    ));
}

/// The fitter picks the landmark correspondence for the head yaw it reads from the detected
/// points (`ganfit::MeshCorrespondence`); on synthetic faces that reading must match the yaw
/// they were drawn with, and the yaw of a pose must invert how the generator composed it.
#[test]
fn the_head_yaw_is_read_back_from_the_pose_and_from_the_detected_points() {
    use ganfit::{estimate_head_yaw_deg, head_yaw_deg};
    use nalgebra::{Rotation3, Vector3};
    let (detector, landmarker) = detector_and_landmarker();
    let generator = generator(SyntheticConfig::default());
    let mut errors = Vec::new();
    for seed in 0..8 {
        let face = generator.generate(seed).unwrap();
        let truth = face.yaw_pitch_roll_deg[0];
        let posed = head_yaw_deg(&Rotation3::new(Vector3::from(face.rotation)));
        assert!(
            (posed - truth).abs() < 1e-9,
            "seed {seed}: {posed} vs {truth}"
        );
        let (_, points) = landmarker
            .locate(&detector, &face.image, FaceChoice::Largest)
            .unwrap();
        let (width, height) = face.image.dimensions();
        let estimate = estimate_head_yaw_deg(model(), &points, width, height);
        eprintln!("seed {seed}: yaw {truth:+.1}°, estimated {estimate:+.1}°");
        errors.push((estimate - truth).abs());
    }
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    assert!(mean < 5.0, "mean yaw error {mean:.1}°: {errors:?}");
    assert!(errors.iter().all(|&e| e < 10.0), "{errors:?}");
}

#[test]
fn invalid_configurations_are_typed_errors() {
    for config in [
        SyntheticConfig {
            yaw_deg: 120.0,
            ..SyntheticConfig::default()
        },
        SyntheticConfig {
            jpeg_quality: Some(0),
            ..SyntheticConfig::default()
        },
        SyntheticConfig {
            max_expressions: 1000,
            ..SyntheticConfig::default()
        },
        SyntheticConfig {
            distance_mm: (900.0, 100.0),
            ..SyntheticConfig::default()
        },
    ] {
        let err = SyntheticGenerator::new(model(), config, assets()).unwrap_err();
        assert!(matches!(err, SyntheticError::Config(_)), "{err:?}");
    }
    let empty = SyntheticAssets {
        textures: Vec::new(),
        ..assets()
    };
    let err = SyntheticGenerator::new(model(), SyntheticConfig::default(), empty).unwrap_err();
    assert!(err.to_string().contains("texture"), "{err}");
    let err = shared_photos(std::path::Path::new("/nonexistent/shared")).unwrap_err();
    assert!(matches!(err, SyntheticError::Io { .. }), "{err:?}");
}

#[test]
fn the_ground_truth_scores_zero_against_itself_and_not_against_another_face() {
    use ganfit::evaluate::{MetricConfig, Reconstruction, SurfaceMesh, reconstruction_error};
    let model = model();
    let generator = generator(SyntheticConfig {
        image_size: 64,
        ..SyntheticConfig::default()
    });
    let face = model.vertex_set("face").unwrap();
    let surface: Vec<[u32; 3]> = model
        .triangles()
        .iter()
        .filter(|t| t.iter().all(|v| face.binary_search(v).is_ok()))
        .copied()
        .collect();
    let as_reconstruction = |vertices: &[[f32; 3]]| {
        let point = |v: u32| vertices[v as usize].map(f64::from);
        Reconstruction {
            mesh: SurfaceMesh {
                vertices: (0..vertices.len() as u32).map(point).collect(),
                triangles: surface.clone(),
            },
            landmarks: model
                .landmark_vertex_ids()
                .iter()
                .map(|id| id.map(point))
                .collect(),
        }
    };
    let a = generator.generate(21).unwrap();
    let b = generator.generate(22).unwrap();
    let truth = a.ground_truth(model).unwrap();
    let config = MetricConfig::default();
    let itself = reconstruction_error(&truth, &as_reconstruction(&a.vertices), &config).unwrap();
    assert!(itself.mean_mm < 1e-3, "{}", itself.mean_mm);
    let other = reconstruction_error(&truth, &as_reconstruction(&b.vertices), &config).unwrap();
    assert!(other.mean_mm > 0.3, "{}", other.mean_mm);
}

#[test]
fn a_missing_shared_folder_is_a_typed_error() {
    // Runs itself in a child process with GANFIT_SHARED set, so no other test sees the variable.
    if std::env::var_os("GANFIT_SYNTHETIC_CHILD").is_some() {
        let err = shared_dir().unwrap_err();
        assert!(
            matches!(&err, SyntheticError::SharedDataMissing(p) if p.ends_with("nowhere")),
            "{err:?}"
        );
        assert!(err.to_string().contains("GANFIT_SHARED"), "{err}");
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_missing_shared_folder_is_a_typed_error"])
        .env("GANFIT_SHARED", "/nonexistent/nowhere")
        .env("GANFIT_SYNTHETIC_CHILD", "1")
        .status()
        .unwrap();
    assert!(status.success());
}

/// The correspondence tables are measured on synthetic faces (`ganfit bench landmark-map`); a
/// measurement gone wrong (a swapped axis, a wrong seed range, a detector failing on the
/// renders, tables in the wrong yaw order) would put points far from where ICT's own landmark
/// definition says the feature is.
#[test]
fn the_measured_landmark_vertices_lie_near_icts_own_landmarks() {
    use ganfit::losses::face::{
        IBUG68_FROM_MESH, ICT_VERTEX_FROM_MESH, ICT_VERTEX_FROM_MESH_AT_YAW, MESH_TABLE_YAWS_DEG,
    };
    let mean = model().mean_rows().unwrap();
    let own = model().landmark_vertex_ids();
    let distance = |a: u32, b: u32| {
        let (a, b) = (mean[a as usize], mean[b as usize]);
        (0..3).map(|i| (a[i] - b[i]).powi(2)).sum::<f32>().sqrt()
    };
    let distances = |table: &[u32; 468]| -> Vec<f32> {
        (0..68)
            .map(|i| distance(own[i].unwrap(), table[IBUG68_FROM_MESH[i]]))
            .collect()
    };
    let pooled = distances(&ICT_VERTEX_FROM_MESH);
    // The jaw line is where the landmarker's points and ICT's differ most (up to ~12 mm):
    // its points follow the visible outline, ICT's are fixed on the jaw.
    assert!(pooled[..17].iter().all(|&d| d < 16.0), "{pooled:?}");
    assert!(pooled[17..].iter().all(|&d| d < 10.0), "{pooled:?}");
    let mean_distance = pooled.iter().sum::<f32>() / 68.0;
    assert!(mean_distance < 6.0, "mean {mean_distance} mm");
    // Per yaw, the points on the far side move with the outline over the cheek (the jaw up to
    // 72 mm at ±40°, 19 mm head-on); the inner points stay near their features, and the
    // head-on table near the pooled one.
    for (table, yaw) in ICT_VERTEX_FROM_MESH_AT_YAW.iter().zip(MESH_TABLE_YAWS_DEG) {
        let d = distances(table);
        let inner = d[17..].iter().copied().fold(0.0f32, f32::max);
        let mean_distance = d.iter().sum::<f32>() / 68.0;
        eprintln!("yaw {yaw:+}°: inner points up to {inner:.1} mm, mean {mean_distance:.1} mm");
        assert!(inner < 25.0 && mean_distance < 10.0, "yaw {yaw}: {d:?}");
    }
    let frontal = &ICT_VERTEX_FROM_MESH_AT_YAW[MESH_TABLE_YAWS_DEG
        .iter()
        .position(|&yaw| yaw == 0.0)
        .expect("a head-on table")];
    let to_pooled = (17..68)
        .map(|i| {
            let point = IBUG68_FROM_MESH[i];
            distance(frontal[point], ICT_VERTEX_FROM_MESH[point])
        })
        .sum::<f32>()
        / 51.0;
    eprintln!("head-on inner points {to_pooled:.2} mm from the pooled ones on average");
    assert!(to_pooled < 2.0, "{to_pooled} mm");
}
