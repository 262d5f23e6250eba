//! The landmark refinement of `FaceLandmarker::locate`: the mirror table pairs each Face Mesh
//! point with its counterpart, the crop taken from a face's points follows the face, and
//! averaging a crop with its mirror image makes the points mirror-consistent (a flipped photo
//! gives the flipped points), which MediaPipe's single pass is not.

use std::path::Path;

use candle_core::Device;
use ganfit_losses::face::{
    FaceChoice, FaceDetector, FaceLandmarker, FaceRoi, Landmarks468, MESH_MIRROR, MESH_POINTS,
    load_rgb, roi_from_detection, roi_from_landmarks,
};
use image::{RgbImage, imageops};

fn astronaut() -> RgbImage {
    load_rgb(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/astronaut.png"))
        .unwrap()
}

#[test]
fn the_mirror_table_pairs_each_point_with_its_counterpart() {
    let midline: Vec<usize> = (0..MESH_POINTS)
        .filter(|&i| usize::from(MESH_MIRROR[i]) == i)
        .collect();
    assert_eq!(midline.len(), 28);
    // Nose tip, chin, forehead top, upper and lower lip centres.
    for point in [1, 152, 10, 0, 17] {
        assert!(midline.contains(&point), "{point}");
    }
    // Outer and inner eye corners, mouth corners, the face oval at the cheekbones.
    for (a, b) in [(33, 263), (133, 362), (61, 291), (234, 454)] {
        assert_eq!(
            (usize::from(MESH_MIRROR[a]), usize::from(MESH_MIRROR[b])),
            (b, a)
        );
    }
    for i in 0..MESH_POINTS {
        assert_eq!(usize::from(MESH_MIRROR[usize::from(MESH_MIRROR[i])]), i);
    }
}

/// `landmarks` turned by `angle` (radians, clockwise on screen) about `pivot`, then moved.
fn turned(landmarks: &Landmarks468, angle: f32, pivot: [f32; 2], shift: [f32; 2]) -> Landmarks468 {
    let (sin, cos) = angle.sin_cos();
    let points = landmarks
        .points
        .iter()
        .map(|&[x, y, z]| {
            let (dx, dy) = (x - pivot[0], y - pivot[1]);
            [
                pivot[0] + cos * dx - sin * dy + shift[0],
                pivot[1] + sin * dx + cos * dy + shift[1],
                z,
            ]
        })
        .collect();
    Landmarks468 {
        points,
        ..landmarks.clone()
    }
}

#[test]
fn the_crop_from_a_faces_points_follows_the_face() {
    let device = Device::Cpu;
    let photo = astronaut();
    let detector = FaceDetector::new(&device).unwrap();
    let landmarker = FaceLandmarker::new(&device).unwrap();
    let face = detector.detect_face(&photo, FaceChoice::Largest).unwrap();
    let landmarks = landmarker.landmarks(&photo, &face).unwrap();
    let roi = roi_from_landmarks(&landmarks);

    // Upright: the eye line sets the rotation; the crop holds every point with a margin.
    let ([ax, ay], [bx, by]) = (landmarks.xy(33), landmarks.xy(263));
    assert!((roi.rotation - (by - ay).atan2(bx - ax)).abs() < 1e-6);
    let (sin, cos) = roi.rotation.sin_cos();
    let extent = |axis: [f32; 2]| {
        let along = landmarks
            .points
            .iter()
            .map(|p| (p[0] - roi.center[0]) * axis[0] + (p[1] - roi.center[1]) * axis[1]);
        let (lo, hi) = along.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        // Centred: the points reach as far to either side.
        assert!((lo + hi).abs() < 1e-3 * roi.side, "{lo} {hi}");
        hi - lo
    };
    let longer = extent([cos, sin]).max(extent([-sin, cos]));
    assert!((roi.side - 1.5 * longer).abs() < 1e-3 * roi.side);
    // It holds the face about as MediaPipe's crop from the detection does.
    let from_detection = roi_from_detection(&face);
    let offset =
        (roi.center[0] - from_detection.center[0]).hypot(roi.center[1] - from_detection.center[1]);
    assert!(offset < 0.1 * from_detection.side, "{offset}");
    assert!((roi.side / from_detection.side - 1.0).abs() < 0.25);

    // Turning and moving the face turns and moves the crop the same way, size unchanged.
    let (angle, pivot, shift) = (0.4, [100.0, 50.0], [30.0, -20.0]);
    let turned_roi = roi_from_landmarks(&turned(&landmarks, angle, pivot, shift));
    let expected_center = turned(
        &Landmarks468 {
            points: vec![[roi.center[0], roi.center[1], 0.0]],
            ..landmarks.clone()
        },
        angle,
        pivot,
        shift,
    )
    .points[0];
    assert!((turned_roi.rotation - roi.rotation - angle).abs() < 1e-5);
    assert!((turned_roi.side - roi.side).abs() < 1e-3 * roi.side);
    for (got, want) in turned_roi.center.iter().zip(expected_center) {
        assert!((got - want).abs() < 1e-3 * roi.side);
    }
}

/// Mean distance (pixels) between the points of `photo` and the mirror images of the points
/// of `photo` flipped left to right, each point against its counterpart.
fn mirror_inconsistency(
    points: &Landmarks468,
    points_of_flipped: &Landmarks468,
    width: u32,
) -> f32 {
    let total: f32 = (0..MESH_POINTS)
        .map(|i| {
            let [x, y, _] = points_of_flipped.points[usize::from(MESH_MIRROR[i])];
            let unflipped = [(width - 1) as f32 - x, y];
            (points.points[i][0] - unflipped[0]).hypot(points.points[i][1] - unflipped[1])
        })
        .sum();
    total / MESH_POINTS as f32
}

#[test]
fn averaging_with_the_mirror_image_makes_the_points_mirror_consistent() {
    let device = Device::Cpu;
    let photo = astronaut();
    let flipped = imageops::flip_horizontal(&photo);
    let detector = FaceDetector::new(&device).unwrap();
    let landmarker = FaceLandmarker::new(&device).unwrap();
    let face = detector.detect_face(&photo, FaceChoice::Largest).unwrap();
    let roi = roi_from_landmarks(&landmarker.landmarks(&photo, &face).unwrap());
    let mirrored_roi = FaceRoi {
        center: [(photo.width() - 1) as f32 - roi.center[0], roi.center[1]],
        rotation: -roi.rotation,
        ..roi
    };

    let single = mirror_inconsistency(
        &landmarker.landmarks_in_roi(&photo, &roi).unwrap(),
        &landmarker
            .landmarks_in_roi(&flipped, &mirrored_roi)
            .unwrap(),
        photo.width(),
    );
    let averaged = mirror_inconsistency(
        &landmarker
            .landmarks_in_roi_and_mirror(&photo, &roi)
            .unwrap(),
        &landmarker
            .landmarks_in_roi_and_mirror(&flipped, &mirrored_roi)
            .unwrap(),
        photo.width(),
    );
    eprintln!("mirror inconsistency: single pass {single:.3} px, averaged {averaged:.3} px");
    // The two crops of the flipped photo are not exact mirrors of the photo's (each samples
    // its grid from one corner), hence not zero.
    assert!(averaged < 0.25 * single, "{averaged} vs {single}");

    // `locate` returns the refined points.
    let (_, located) = landmarker
        .locate(&detector, &photo, FaceChoice::Largest)
        .unwrap();
    let single_pass = landmarker.landmarks(&photo, &face).unwrap();
    assert_eq!(
        located,
        landmarker.refine(&photo, &single_pass).unwrap(),
        "locate = refine(landmarks)"
    );
    assert_ne!(located.points, single_pass.points);
}
