//! Faces the plain MediaPipe pipeline misses: a portrait placed small in a large canvas (a
//! person further away, or a high-resolution photo) must still be found, where the bundled
//! photo's own detection says, and an empty canvas must still hold no face; in a tilted photo
//! where the detector's largest box is not a face, the face the landmark network confirms is
//! taken; a face turned sideways or upside down keeps its points on its own features.

use std::path::Path;

use candle_core::Device;
use ganfit_losses::face::{
    Detection, FaceChoice, FaceDetector, FaceError, FaceLandmarker, load_rgb,
};
use image::{RgbImage, imageops};

fn astronaut() -> RgbImage {
    load_rgb(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/astronaut.png"))
        .unwrap()
}

/// `photo` scaled to `scale` and placed at `offset` on a grey `width`×`height` canvas.
fn composite(
    photo: &RgbImage,
    width: u32,
    height: u32,
    scale: f32,
    offset: (u32, u32),
) -> RgbImage {
    let small = imageops::resize(
        photo,
        (photo.width() as f32 * scale).round() as u32,
        (photo.height() as f32 * scale).round() as u32,
        imageops::FilterType::Triangle,
    );
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([118, 121, 125]));
    imageops::replace(
        &mut canvas,
        &small,
        i64::from(offset.0),
        i64::from(offset.1),
    );
    canvas
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

#[test]
fn small_faces_in_large_images_are_found_where_they_are() {
    let device = Device::Cpu;
    let detector = FaceDetector::new(&device).unwrap();
    let landmarker = FaceLandmarker::new(&device).unwrap();
    let photo = astronaut();
    let reference: Detection = detector.detect_face(&photo, FaceChoice::Largest).unwrap();
    // (canvas, scale of the photo, where it goes): faces of 8–9 % of the canvas width.
    for (width, height, scale, offset) in [
        (4032, 3024, 3.5, (1100, 600)),
        (1008, 756, 0.9, (500, 200)),
        (504, 378, 0.44, (250, 150)),
    ] {
        let image = composite(&photo, width, height, scale, offset);
        let (whole, _) = detector.input_tensor(&image).unwrap();
        assert!(
            detector.detect_in_tensor(&whole).unwrap().is_empty(),
            "{width}x{height}: MediaPipe's whole-image pass already finds this face"
        );
        let expected = reference.bbox.map(|v| v * scale);
        let expected = [
            expected[0] + offset.0 as f32,
            expected[1] + offset.1 as f32,
            expected[2] + offset.0 as f32,
            expected[3] + offset.1 as f32,
        ];
        let face = detector
            .detect_face(&image, FaceChoice::Largest)
            .unwrap_or_else(|e| {
                panic!(
                    "{width}x{height}, face {:.0} px: {e}",
                    expected[2] - expected[0]
                )
            });
        let overlap = iou(&face.bbox, &expected);
        let landmarks = landmarker.landmarks(&image, &face);
        eprintln!(
            "{width}x{height}, face {:.0} px: IoU {overlap:.2} with the photo's own detection, landmarks {}",
            expected[2] - expected[0],
            if landmarks.is_ok() {
                "found"
            } else {
                "refused"
            }
        );
        assert!(
            overlap > 0.6,
            "{width}x{height}: found {:?}, expected {expected:?}",
            face.bbox
        );
        landmarks.unwrap();
    }
}

#[test]
fn a_face_in_a_long_narrow_strip_is_found() {
    // The astronaut's head (200 px square, the face about 90 px) in a strip 200 px wide: the
    // whole strip letterboxed shrinks the face to 10 px, and windows of half the strip's width
    // are below the smallest searched.
    let detector = FaceDetector::new(&Device::Cpu).unwrap();
    let photo = astronaut();
    let reference = detector.detect_face(&photo, FaceChoice::Largest).unwrap();
    let head = imageops::crop_imm(&photo, 130, 30, 200, 200).to_image();
    for (width, height, offset) in [(200, 1200, (0, 500)), (1200, 200, (700, 0))] {
        let mut strip = RgbImage::from_pixel(width, height, image::Rgb([118, 121, 125]));
        imageops::replace(&mut strip, &head, offset.0, offset.1);
        let [x0, y0, x1, y1] = reference.bbox;
        let (dx, dy) = ((offset.0 - 130) as f32, (offset.1 - 30) as f32);
        let expected = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
        let face = detector
            .detect_face(&strip, FaceChoice::Largest)
            .unwrap_or_else(|e| panic!("{width}x{height}: {e}"));
        assert!(
            iou(&face.bbox, &expected) > 0.6,
            "{width}x{height}: found {:?}, expected {expected:?}",
            face.bbox
        );
    }
}

#[test]
fn an_empty_large_image_still_holds_no_face() {
    let detector = FaceDetector::new(&Device::Cpu).unwrap();
    let mut image = RgbImage::from_pixel(1200, 800, image::Rgb([118, 121, 125]));
    for (i, p) in image.pixels_mut().enumerate() {
        let v = ((i * 2654435761) >> 13) as u8 % 40;
        p.0 = [100 + v, 110 + v / 2, 120 - v / 3];
    }
    assert!(matches!(
        detector.detect_face(&image, FaceChoice::Largest),
        Err(FaceError::NoFaceFound { .. })
    ));
}

/// `photo` turned by `degrees` counter-clockwise about its centre onto a grey square large
/// enough to hold it (bilinear), and where the turn takes a point of the photo.
fn rotated(photo: &RgbImage, degrees: f32) -> (RgbImage, impl Fn([f32; 2]) -> [f32; 2]) {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (w, h) = (photo.width() as f32, photo.height() as f32);
    let side = (w * cos.abs() + h * sin.abs())
        .max(w * sin.abs() + h * cos.abs())
        .ceil();
    let (from, to) = ([w / 2.0, h / 2.0], [side / 2.0, side / 2.0]);
    let forward = move |p: [f32; 2]| {
        let (dx, dy) = (p[0] - from[0], p[1] - from[1]);
        [to[0] + cos * dx + sin * dy, to[1] - sin * dx + cos * dy]
    };
    let out = RgbImage::from_fn(side as u32, side as u32, |x, y| {
        let (dx, dy) = (x as f32 - to[0], y as f32 - to[1]);
        let (sx, sy) = (from[0] + cos * dx - sin * dy, from[1] + sin * dx + cos * dy);
        let (x0, y0) = (sx.floor(), sy.floor());
        if x0 < 0.0 || y0 < 0.0 || x0 + 1.0 >= w || y0 + 1.0 >= h {
            return image::Rgb([118, 121, 125]);
        }
        let (fx, fy) = (sx - x0, sy - y0);
        let texel = |dx: u32, dy: u32| photo.get_pixel(x0 as u32 + dx, y0 as u32 + dy).0;
        image::Rgb(std::array::from_fn(|c| {
            let value = f32::from(texel(0, 0)[c]) * (1.0 - fx) * (1.0 - fy)
                + f32::from(texel(1, 0)[c]) * fx * (1.0 - fy)
                + f32::from(texel(0, 1)[c]) * (1.0 - fx) * fy
                + f32::from(texel(1, 1)[c]) * fx * fy;
            value.round() as u8
        }))
    });
    (out, forward)
}

#[test]
fn a_larger_box_that_is_no_face_is_passed_over_for_the_confirmed_face() {
    let device = Device::Cpu;
    let detector = FaceDetector::new(&device).unwrap();
    let landmarker = FaceLandmarker::new(&device).unwrap();
    let photo = astronaut();
    let reference = detector.detect_face(&photo, FaceChoice::Largest).unwrap();
    let centre = |d: &Detection| [(d.bbox[0] + d.bbox[2]) / 2.0, (d.bbox[1] + d.bbox[3]) / 2.0];
    let (image, turn) = rotated(&photo, 30.0);
    let expected = turn(centre(&reference));
    let largest = detector.detect_face(&image, FaceChoice::Largest).unwrap();
    assert!(
        matches!(
            landmarker.landmarks(&image, &largest),
            Err(FaceError::LandmarksNotConfident { .. })
        ),
        "the detector's largest box is a face here: the test no longer tests the fallback"
    );
    let (face, points) = landmarker
        .locate(&detector, &image, FaceChoice::Largest)
        .unwrap();
    let [x, y] = centre(&face);
    let offset = (x - expected[0]).hypot(y - expected[1]);
    eprintln!("confirmed face {offset:.1} px from where the turn takes the photo's face");
    assert!(offset < 0.2 * face.size(), "{offset} px off");
    assert!(points.presence > 0.5);
}

/// A photo turned sideways or upside down (its file not saying so): the detector's crop is
/// nearly upright only for small turns, and without trying the crop's other turns the landmark
/// network laid an upright face's points over an upside-down one (its eyes on the mouth).
#[test]
fn a_face_turned_by_any_angle_keeps_its_points_on_its_features() {
    let device = Device::Cpu;
    let detector = FaceDetector::new(&device).unwrap();
    let landmarker = FaceLandmarker::new(&device).unwrap();
    let photo = astronaut();
    let (_, upright) = landmarker
        .locate(&detector, &photo, FaceChoice::Largest)
        .unwrap();
    // Outer eye corners (Face Mesh 33 and 263).
    let eyes = upright.xy(33)[0] - upright.xy(263)[0];
    for degrees in [60.0, 90.0, 135.0, 180.0, 225.0, 270.0] {
        let (image, turn) = rotated(&photo, degrees);
        let (_, points) = landmarker
            .locate(&detector, &image, FaceChoice::Largest)
            .unwrap();
        let mean_offset = (0..points.points.len())
            .map(|i| {
                let [x, y] = turn(upright.xy(i));
                let [px, py] = points.xy(i);
                (px - x).hypot(py - y)
            })
            .sum::<f32>()
            / points.points.len() as f32;
        eprintln!("turned {degrees}°: points {mean_offset:.1} px from the upright photo's");
        assert!(
            mean_offset < 0.1 * eyes.abs(),
            "turned {degrees}°: the points are {mean_offset:.1} px off, the eyes {eyes:.0} px apart"
        );
    }
}
