//! The full fit on synthetic ICT faces with known shape, expression, pose, light and
//! texture: the fitted surface must be within 2 mm of the truth on average, and the fitted
//! landmark vertices (the vertices the fit ties the detected points to, chosen for the face's
//! head yaw: `ganfit::MeshCorrespondence`) within 6 px (512² images) of their true pixels. The
//! neutral mean face is printed beside it: it is a strong baseline here (ICT's identity modes
//! move the narrow face by only a millimetre or two, about what the landmark detector's own
//! error is worth, and these faces are drawn from exactly the prior the fit assumes), and the
//! fit only matches it (1.49 mm against 1.47 mm on these three faces, landmarks 3.90, 2.60 and
//! 2.41 px off, the 51 inner ones without the jaw line 2.71, 1.67 and 2.24 px, on textures a
//! fresh checkout unwraps; 3.94, 2.64 and 2.37 px before the synthetic faces' eyes were painted
//! as eyes rather than polygons of one colour each; 3.85, 2.65 and 2.39 px before blendshape
//! weights were kept at 0 or above; 3.92, 2.70 and 2.55 px with the identity
//! term on the render in the photo's view, λ_id = 0.2; 3.84, 2.80 and 2.31 px before the
//! rasterizer's depth fix on older textures; with one correspondence for every yaw 1.50 mm and
//! 4.09, 3.30 and 2.36 px; 1.70 mm and 4.62, 4.87 and 3.47 px before the landmarker's
//! refinement, `FaceLandmarker::refine`; 2.0 mm before the landmarker's points were measured on
//! ICT faces).
//!
//! The distance is the NoW protocol's (`ganfit::evaluate`: landmark similarity alignment, ICP,
//! then point-to-surface over the narrow face). Two errors without any alignment are printed
//! too and not asserted: in the model's frame (the fitted camera undoes the pose; 4.33, 3.72
//! and 3.51 mm, the mean face 4.14, 2.93 and 4.25 mm: the fitted rotation trades against the
//! face's shape, and the overall size is not observable), and in the camera's frame (33.6,
//! 18.0 and 25.4 mm: a monocular fit's depth trades against the face's size, so it is
//! centimetres even with the true intrinsics).

use ganfit::Fitter;
use ganfit::evaluate::{MetricConfig, Reconstruction, reconstruction_error};
use ganfit::morphable::MorphableModel;
use ganfit::synthetic::{SyntheticAssets, SyntheticConfig, SyntheticGenerator, shared_dir};
use nalgebra::{Rotation3, Vector3};

/// Mean NoW-style error (mm) of `vertices` (rows of the model's vertices) against `face`.
fn error_mm(
    model: &MorphableModel,
    vertices: &[Vec<f32>],
    face: &ganfit::synthetic::SyntheticFace,
) -> f64 {
    let truth = face.ground_truth(model).unwrap();
    let reconstruction = Reconstruction::of_model(model, vertices);
    reconstruction_error(&truth, &reconstruction, &MetricConfig::default())
        .unwrap()
        .mean_mm
}

/// Mean distances (mm) over the narrow face between fitted and true vertices without any
/// alignment: in the model's own frame (the fitted camera has undone the pose), and in the
/// camera's frame (each mesh posed by its own camera).
fn unaligned_errors_mm(
    model: &MorphableModel,
    vertices: &[Vec<f32>],
    result: &ganfit::FitResult,
    face: &ganfit::synthetic::SyntheticFace,
) -> (f64, f64) {
    let area = model.vertex_set("narrow_face").unwrap();
    let pose = |rotation: [f64; 3], translation: [f64; 3]| {
        let rotation = Rotation3::new(Vector3::from(rotation));
        move |p: Vector3<f64>| rotation * p + Vector3::from(translation)
    };
    let vector = |t: &candle_core::Tensor| -> [f64; 3] {
        let v: Vec<f32> = t.to_vec1().unwrap();
        [v[0], v[1], v[2]].map(f64::from)
    };
    let fitted_pose = pose(
        vector(&result.params.rotation),
        vector(&result.params.translation),
    );
    let true_pose = pose(face.rotation, face.translation);
    let (mut model_frame, mut camera_frame) = (0.0, 0.0);
    for &v in area {
        let fitted = Vector3::from_iterator(vertices[v as usize].iter().map(|&x| f64::from(x)));
        let truth = Vector3::from(face.vertices[v as usize].map(f64::from));
        model_frame += (fitted - truth).norm();
        camera_frame += (fitted_pose(fitted) - true_pose(truth)).norm();
    }
    let n = area.len() as f64;
    (model_frame / n, camera_frame / n)
}

#[test]
fn synthetic_faces_are_recovered_within_two_millimetres() {
    let base = Fitter::builder()
        .iterations(0)
        .texture_size(256)
        .build()
        .unwrap();
    let model = base.model();
    // Beside the build, so a fresh checkout unwraps its textures with the fitter under test.
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("synthetic-fit-textures");
    let assets = SyntheticAssets::from_shared(&shared_dir().unwrap(), &base, &cache, 2).unwrap();
    let config = SyntheticConfig {
        yaw_deg: 30.0,
        ..SyntheticConfig::default()
    };
    let generator = SyntheticGenerator::new(model, config, assets).unwrap();
    let mean: Vec<Vec<f32>> = model.mean().to_vec2().unwrap();
    let (mut fitted_errors, mut baseline_errors) = (Vec::new(), Vec::new());
    for seed in 0..3 {
        let face = generator.generate(seed).unwrap();
        let fitter = Fitter::builder()
            .intrinsics(face.intrinsics)
            .iterations(20)
            .texture_size(256)
            .build()
            .unwrap();
        let result = fitter.fit(&face.image).unwrap();
        let vertices: Vec<Vec<f32>> = result.vertices.to_vec2().unwrap();
        let fitted = error_mm(model, &vertices, &face);
        let (model_frame, camera_frame) = unaligned_errors_mm(model, &vertices, &result, &face);
        let baseline = error_mm(model, &mean, &face);
        let (mean_model_frame, _) = unaligned_errors_mm(model, &mean, &result, &face);
        // The fit places the vertices the landmarker's points lie on; their true pixels:
        let rotation = Rotation3::new(Vector3::from(face.rotation));
        let k = face.intrinsics;
        let truth = result.landmark_vertices.iter().map(|vertex| {
            let p = face.vertices[(*vertex)? as usize].map(f64::from);
            let c = rotation * Vector3::from(p) + Vector3::from(face.translation);
            Some([k.fx * c.x / c.z + k.cx, k.fy * c.y / c.z + k.cy])
        });
        // Per iBUG-68 point (`None` where a point has no vertex).
        let pixels: Vec<Option<f64>> = result
            .fitted_landmarks
            .iter()
            .zip(truth)
            .map(|(f, t)| {
                let (f, t) = ((*f)?, t?);
                Some((f64::from(f[0]) - t[0]).hypot(f64::from(f[1]) - t[1]))
            })
            .collect();
        let mean_of = |points: &[Option<f64>]| {
            let known: Vec<f64> = points.iter().flatten().copied().collect();
            known.iter().sum::<f64>() / known.len() as f64
        };
        let landmark_px = mean_of(&pixels);
        // The 51 inner points (brows, nose, eyes, mouth; not the jaw line, iBUG 0–16).
        let inner_px = mean_of(&pixels[17..]);
        eprintln!(
            "seed {seed}, yaw {:+.0}°: {fitted:.2} mm (mean face {baseline:.2} mm), \
             landmarks {landmark_px:.2} px from the truth (the 51 inner ones {inner_px:.2} px); \
             unaligned: {model_frame:.2} mm \
             in the model's frame (mean face {mean_model_frame:.2} mm), {camera_frame:.1} mm in \
             the camera's",
            face.yaw_pitch_roll_deg[0]
        );
        assert!(
            landmark_px < 6.0,
            "seed {seed}: landmarks {landmark_px:.2} px off"
        );
        fitted_errors.push(fitted);
        baseline_errors.push(baseline);
    }
    let average = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (fitted, baseline) = (average(&fitted_errors), average(&baseline_errors));
    eprintln!("average {fitted:.2} mm, mean face {baseline:.2} mm");
    assert!(
        fitted <= 2.0,
        "mean error {fitted:.2} mm over {fitted_errors:?}"
    );
}
