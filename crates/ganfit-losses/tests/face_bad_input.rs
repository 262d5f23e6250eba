//! Bad and unusual input to the face pipeline: every case ends in a converted image or a typed
//! error with advice, never a panic. Test images are made here from the public-domain astronaut.

use std::io::Cursor;
use std::sync::OnceLock;

use candle_core::Device;
use ganfit_losses::face::{
    FaceChoice, FaceDetector, FaceError, decode_rgb, is_photo_name, load_rgb, probe_image,
};
use image::imageops::{FilterType, resize};
use image::{DynamicImage, ImageFormat, RgbImage};

fn astronaut() -> RgbImage {
    let candidates = ganfit_assets::shared_dir_candidates("data/faces/astronaut/astronaut.png");
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("astronaut.png not found; looked at {candidates:?}"));
    load_rgb(path).unwrap()
}

fn detector() -> &'static FaceDetector {
    static DETECTOR: OnceLock<FaceDetector> = OnceLock::new();
    DETECTOR.get_or_init(|| FaceDetector::new(&Device::Cpu).unwrap())
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .unwrap();
    bytes
}

fn mean_abs_difference(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| f64::from(x.abs_diff(y)))
        .sum();
    sum / a.as_raw().len() as f64
}

#[test]
fn an_image_without_a_face_is_no_face_found() {
    let image = RgbImage::from_fn(320, 240, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    assert!(detector().detect(&image).unwrap().is_empty());
    let error = detector()
        .detect_face(&image, FaceChoice::Largest)
        .unwrap_err();
    assert!(
        matches!(
            error,
            FaceError::NoFaceFound {
                width: 320,
                height: 240
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("at least 40 pixels"));
}

#[test]
fn of_several_faces_the_largest_is_chosen_unless_asked_otherwise() {
    // Two copies of the astronaut's head, one at 2/3 the size of the other, side by side.
    let head = image::imageops::crop_imm(&astronaut(), 124, 30, 200, 200).to_image();
    let small = resize(&head, 130, 130, FilterType::Triangle);
    let mut canvas = RgbImage::from_pixel(330, 200, image::Rgb([90, 90, 90]));
    image::imageops::replace(&mut canvas, &head, 0, 0);
    image::imageops::replace(&mut canvas, &small, 200, 35);

    let faces = detector().detect(&canvas).unwrap();
    assert_eq!(faces.len(), 2, "{faces:?}");
    let largest = detector()
        .detect_face(&canvas, FaceChoice::Largest)
        .unwrap();
    assert!(
        largest.bbox[2] < 200.0,
        "the large face is on the left: {largest:?}"
    );
    let other = faces.iter().find(|f| f.bbox[0] > 200.0).unwrap();
    let index = faces.iter().position(|f| f == other).unwrap();
    assert_eq!(
        detector()
            .detect_face(&canvas, FaceChoice::Index(index))
            .unwrap(),
        *other
    );
    assert_eq!(
        detector()
            .detect_face(&canvas, FaceChoice::MostConfident)
            .unwrap(),
        faces[0]
    );
    let error = detector()
        .detect_face(&canvas, FaceChoice::Index(2))
        .unwrap_err();
    assert!(
        matches!(error, FaceError::FaceIndexOutOfRange { index: 2, count: 2 }),
        "{error}"
    );
}

#[test]
fn a_face_under_40_pixels_is_rejected_with_advice() {
    let tiny = resize(&astronaut(), 96, 96, FilterType::Triangle);
    let faces = detector().detect(&tiny).unwrap();
    assert_eq!(faces.len(), 1, "the detector still sees the tiny face");
    assert!(faces[0].size() < 40.0);
    let error = detector()
        .detect_face(&tiny, FaceChoice::Largest)
        .unwrap_err();
    assert!(
        matches!(error, FaceError::FaceTooSmall { min: 40.0, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("higher-resolution"));
}

#[test]
fn grayscale_is_replicated_to_rgb() {
    let gray = DynamicImage::ImageRgb8(astronaut()).into_luma8();
    let decoded = decode_rgb(
        &encode(&DynamicImage::ImageLuma8(gray.clone()), ImageFormat::Png),
        "gray",
    )
    .unwrap();
    for (rgb, luma) in decoded.pixels().zip(gray.pixels()) {
        assert_eq!(rgb.0, [luma.0[0]; 3]);
    }
    assert_eq!(detector().detect(&decoded).unwrap().len(), 1);
}

#[test]
fn gif_and_pnm_photos_are_read_and_their_truncation_reported() {
    let rgb = astronaut();
    // PNM holds the pixels exactly; GIF through a 256-colour palette.
    let pnm = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Pnm);
    assert_eq!(decode_rgb(&pnm, "photo.ppm").unwrap(), rgb);
    let gif = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Gif);
    let decoded = decode_rgb(&gif, "photo.gif").unwrap();
    let difference = mean_abs_difference(&decoded, &rgb);
    assert!(difference < 8.0, "mean difference {difference} levels");
    assert_eq!(detector().detect(&decoded).unwrap().len(), 1);
    for (bytes, name) in [(&pnm, "cut.ppm"), (&gif, "cut.gif")] {
        let error = decode_rgb(&bytes[..bytes.len() * 9 / 10], name).unwrap_err();
        assert!(matches!(error, FaceError::CorruptImage { .. }), "{error}");
    }
}

/// HEIC (what iPhones save) is read through its own decoder: the photo comes back within JPEG-like
/// compression error and its face is found; a cut-off file is corrupt, probing gives the size
/// from the container alone, and a container claiming too many pixels is refused before
/// decoding. (The file is encoded here by the same crate's encoder; a libheif/x265 file of the
/// astronaut decoded within 0.9 levels of libheif's own decode, chroma upsampling apart.)
#[test]
fn heic_photos_are_read_and_their_damage_reported() {
    let rgb = astronaut();
    let heic = heifer::encode_rgb8(
        rgb.width(),
        rgb.height(),
        rgb.as_raw(),
        &heifer::EncodeOptions {
            quality: 90,
            ..Default::default()
        },
    )
    .unwrap();
    let decoded = decode_rgb(&heic, "photo.heic").unwrap();
    let difference = mean_abs_difference(&decoded, &rgb);
    assert!(difference < 3.0, "mean difference {difference} levels");
    assert_eq!(detector().detect(&decoded).unwrap().len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    assert_eq!(load_rgb(file("photo.heic", &heic)).unwrap(), decoded);
    // A folder's photos are picked by name.
    for name in ["IMG_0001.HEIC", "photo.heif", "photo.jpg", "photo.png"] {
        assert!(is_photo_name(name), "{name}");
    }
    for name in ["notes.txt", "heic", "photo.heic.txt"] {
        assert!(!is_photo_name(name), "{name}");
    }
    assert_eq!(
        probe_image(file("renamed.jpg", &heic)).unwrap(),
        rgb.dimensions()
    );
    for cut in [&heic[..heic.len() / 2], &heic[..40]] {
        let error = load_rgb(file("cut.heic", cut)).unwrap_err();
        assert!(matches!(error, FaceError::CorruptImage { .. }), "{error}");
    }
    // The container's image size (`ispe`: version and flags, then width and height, big-endian).
    let mut bomb = heic.clone();
    let at = bomb.windows(4).position(|w| w == b"ispe").unwrap() + 8;
    bomb[at..at + 4].copy_from_slice(&30_000u32.to_be_bytes());
    bomb[at + 4..at + 8].copy_from_slice(&20_000u32.to_be_bytes());
    for error in [
        decode_rgb(&bomb, "bomb.heic").unwrap_err(),
        probe_image(file("bomb.heic", &bomb)).unwrap_err(),
    ] {
        assert!(
            matches!(
                error,
                FaceError::ImageTooLarge {
                    width: 30_000,
                    height: 20_000,
                    ..
                }
            ),
            "{error}"
        );
    }
}

/// A photo in a wider colour space than sRGB (a phone's Display P3) is converted to sRGB from
/// its embedded profile, as a colour-managed viewer shows it, within two levels of the two
/// spaces' published matrices; an sRGB profile, or one that cannot be read, leaves the pixels
/// as they are.
#[test]
fn colours_are_converted_to_srgb_from_the_photos_profile() {
    use image::ImageEncoder;
    let rgb = RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    let png_with = |profile: Vec<u8>| {
        let mut bytes = Vec::new();
        let mut encoder = image::codecs::png::PngEncoder::new(&mut bytes);
        encoder.set_icc_profile(profile).unwrap();
        encoder
            .write_image(rgb.as_raw(), 64, 64, image::ExtendedColorType::Rgb8)
            .unwrap();
        bytes
    };
    let p3 = moxcms::ColorProfile::new_display_p3().encode().unwrap();
    let converted = decode_rgb(&png_with(p3), "p3.png").unwrap();
    // Linear Display P3 to linear sRGB (both D65, both with sRGB's transfer curve).
    const P3_TO_SRGB: [[f64; 3]; 3] = [
        [1.224_940, -0.224_940, 0.0],
        [-0.042_057, 1.042_057, 0.0],
        [-0.019_638, -0.078_636, 1.098_274],
    ];
    let linear = |v: f64| {
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    let encoded = |v: f64| {
        let v = v.clamp(0.0, 1.0);
        if v <= 0.003_130_8 {
            v * 12.92
        } else {
            1.055 * v.powf(1.0 / 2.4) - 0.055
        }
    };
    let mut worst = 0.0f64;
    for (source, got) in rgb.pixels().zip(converted.pixels()) {
        let l = source.0.map(|v| linear(f64::from(v) / 255.0));
        for (row, &value) in P3_TO_SRGB.iter().zip(&got.0) {
            let expected = encoded((0..3).map(|k| row[k] * l[k]).sum()) * 255.0;
            worst = worst.max((f64::from(value) - expected).abs());
        }
    }
    assert!(worst <= 2.0, "{worst} levels from the published conversion");
    assert!(mean_abs_difference(&converted, &rgb) > 2.0);

    let srgb = moxcms::ColorProfile::new_srgb().encode().unwrap();
    assert_eq!(decode_rgb(&png_with(srgb), "srgb.png").unwrap(), rgb);
    let damaged = png_with(b"not a colour profile".to_vec());
    assert_eq!(decode_rgb(&damaged, "damaged.png").unwrap(), rgb);
}

/// TGA, ICO and QOI photos are read too; a TGA file carries no signature, so its name says what
/// it is (the same bytes without a name are no image ganfit can tell).
#[test]
fn tga_ico_and_qoi_photos_are_read() {
    let rgb = astronaut();
    // An icon holds at most 256 × 256 pixels.
    let small = resize(&rgb, 256, 256, FilterType::Triangle);
    let dir = tempfile::tempdir().unwrap();
    for (image, format, name) in [
        (&rgb, ImageFormat::Tga, "photo.tga"),
        (&small, ImageFormat::Ico, "photo.ico"),
        (&rgb, ImageFormat::Qoi, "photo.qoi"),
    ] {
        // Icons hold RGBA (the decoder refuses an RGB one's PNG).
        let source = match format {
            ImageFormat::Ico => {
                DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(image.clone()).into_rgba8())
            }
            _ => DynamicImage::ImageRgb8(image.clone()),
        };
        let bytes = encode(&source, format);
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(&load_rgb(&path).unwrap(), image, "{name}");
        assert_eq!(probe_image(&path).unwrap(), image.dimensions(), "{name}");
        assert!(is_photo_name(&path), "{name}");
        if format == ImageFormat::Tga {
            let error = decode_rgb(&bytes, "unnamed bytes").unwrap_err();
            assert!(
                matches!(error, FaceError::UnsupportedImage { .. }),
                "{error}"
            );
        }
    }
}

#[test]
fn alpha_is_dropped() {
    let rgb = astronaut();
    let rgba = DynamicImage::ImageRgb8(rgb.clone()).into_rgba8();
    let rgba = image::RgbaImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        image::Rgba([p[0], p[1], p[2], (x % 256) as u8])
    });
    let decoded = decode_rgb(
        &encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png),
        "rgba",
    )
    .unwrap();
    assert_eq!(decoded, rgb);
}

#[test]
fn sixteen_bit_samples_are_scaled_to_eight() {
    let rgb = astronaut();
    let deep = DynamicImage::ImageRgb8(rgb.clone()).into_rgb16();
    assert_eq!(
        deep.get_pixel(0, 0).0[0],
        u16::from(rgb.get_pixel(0, 0).0[0]) * 257
    );
    let decoded = decode_rgb(
        &encode(&DynamicImage::ImageRgb16(deep), ImageFormat::Png),
        "16-bit",
    )
    .unwrap();
    assert_eq!(decoded, rgb);
}

#[test]
fn cmyk_jpeg_is_converted_to_rgb() {
    let rgb = astronaut();
    let cmyk: Vec<u8> = rgb
        .pixels()
        .flat_map(|p| [255 - p.0[0], 255 - p.0[1], 255 - p.0[2], 0])
        .collect();
    let mut bytes = Vec::new();
    jpeg_encoder::Encoder::new(&mut bytes, 95)
        .encode(
            &cmyk,
            rgb.width() as u16,
            rgb.height() as u16,
            jpeg_encoder::ColorType::Cmyk,
        )
        .unwrap();
    let decoded = decode_rgb(&bytes, "cmyk.jpg").unwrap();
    let difference = mean_abs_difference(&decoded, &rgb);
    assert!(difference < 3.0, "mean difference {difference} levels");
    assert_eq!(detector().detect(&decoded).unwrap().len(), 1);
}

/// An EXIF APP1 payload holding only the orientation tag.
fn exif_orientation(orientation: u16) -> Vec<u8> {
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
    exif.extend(orientation.to_be_bytes());
    exif.extend([0, 0, 0, 0, 0, 0]);
    exif
}

#[test]
fn exif_orientation_is_applied() {
    // Stored sideways as a camera held upright writes it: the upright photo turned 90° counter-
    // clockwise, with orientation 6 (rotate 90° clockwise to display).
    let upright = astronaut();
    let stored = image::imageops::rotate270(&upright);
    let mut bytes = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 95);
    encoder.add_app_segment(1, exif_orientation(6)).unwrap();
    encoder
        .encode(
            stored.as_raw(),
            stored.width() as u16,
            stored.height() as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .unwrap();
    let decoded = decode_rgb(&bytes, "rotated.jpg").unwrap();
    let difference = mean_abs_difference(&decoded, &upright);
    assert!(difference < 3.0, "mean difference {difference} levels");

    let stored_rect =
        RgbImage::from_fn(40, 20, |x, _| image::Rgb([if x < 20 { 0 } else { 255 }; 3]));
    let mut bytes = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 95);
    encoder.add_app_segment(1, exif_orientation(6)).unwrap();
    encoder
        .encode(stored_rect.as_raw(), 40, 20, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    let decoded = decode_rgb(&bytes, "rect.jpg").unwrap();
    assert_eq!(decoded.dimensions(), (20, 40));
    assert!(
        decoded.get_pixel(10, 5).0[0] < 30,
        "the stored left half is now on top"
    );
    assert!(decoded.get_pixel(10, 35).0[0] > 225);
}

#[test]
fn a_truncated_file_is_reported_as_corrupt() {
    let png = encode(&DynamicImage::ImageRgb8(astronaut()), ImageFormat::Png);
    let error = decode_rgb(&png[..png.len() / 2], "half.png").unwrap_err();
    assert!(matches!(error, FaceError::CorruptImage { .. }), "{error}");
    assert!(error.to_string().contains("truncated"));

    let jpeg = encode(&DynamicImage::ImageRgb8(astronaut()), ImageFormat::Jpeg);
    let error = decode_rgb(&jpeg[..300], "header-only.jpg").unwrap_err();
    assert!(matches!(error, FaceError::CorruptImage { .. }), "{error}");

    // Cut within the scan: the decoder alone would fill the missing rows with grey.
    for kept in [jpeg.len() / 2, jpeg.len() - 2] {
        let error = decode_rgb(&jpeg[..kept], "cut.jpg").unwrap_err();
        assert!(matches!(error, FaceError::CorruptImage { .. }), "{error}");
        assert!(error.to_string().contains("end-of-image"), "{error}");
    }
    // Data after the end marker (phones append videos there) is no reason to refuse it, even
    // where it holds a start-of-scan marker with no end marker after it.
    let mut motion_photo = jpeg.clone();
    motion_photo.extend_from_slice(b"\0\0\0\x18ftypmp42 \xFF\xDA\x00\x08 then more video");
    assert_eq!(
        decode_rgb(&motion_photo, "motion.jpg").unwrap(),
        decode_rgb(&jpeg, "whole.jpg").unwrap()
    );
}

#[test]
fn a_file_that_is_no_image_is_reported_as_unsupported() {
    let error = decode_rgb(b"name,age\nada,36\n", "people.csv").unwrap_err();
    assert!(
        matches!(error, FaceError::UnsupportedImage { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("PNG or JPEG"));

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jpg");
    let error = load_rgb(&missing).unwrap_err();
    assert!(matches!(error, FaceError::Io { .. }), "{error}");
}

#[test]
fn an_empty_image_is_an_error_not_a_panic() {
    let empty = RgbImage::new(0, 0);
    let error = detector().detect(&empty).unwrap_err();
    assert!(
        matches!(
            error,
            FaceError::EmptyImage {
                width: 0,
                height: 0
            }
        ),
        "{error}"
    );
}

#[test]
fn wrong_weights_files_are_reported_with_the_fix() {
    use ganfit_losses::face::{FaceLandmarker, LANDMARKER_ASSET};
    let resolver = ganfit_assets::Resolver::new();
    let landmark_weights = resolver.resolve(LANDMARKER_ASSET).unwrap();
    let error = FaceDetector::from_file(&landmark_weights, &Device::Cpu).unwrap_err();
    assert!(matches!(error, FaceError::Weights { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("mediapipe_tflite_to_safetensors.py"),
        "{error}"
    );

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let error = FaceLandmarker::from_file(&garbage, &Device::Cpu).unwrap_err();
    assert!(matches!(error, FaceError::Weights { .. }), "{error}");
}

#[test]
fn an_image_claiming_too_many_pixels_is_refused_before_decoding() {
    let mut bmp = encode(
        &DynamicImage::ImageRgb8(RgbImage::new(2, 2)),
        ImageFormat::Bmp,
    );
    // The header's width and height (little-endian at bytes 18 and 22): 20000 x 10000.
    bmp[18..22].copy_from_slice(&20_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&10_000i32.to_le_bytes());
    let error = decode_rgb(&bmp, "bomb.bmp").unwrap_err();
    assert!(
        matches!(
            error,
            FaceError::ImageTooLarge {
                width: 20_000,
                height: 10_000,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("scale it down"), "{error}");
}

/// Probing reads a file's header only: it gives a photo's size and the errors of a missing file,
/// a file that is no image and a header claiming too many pixels, as decoding would; a body cut
/// short passes (decoding finds it).
#[test]
fn probing_a_photo_checks_its_header_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let jpeg = encode(&DynamicImage::ImageRgb8(astronaut()), ImageFormat::Jpeg);
    let (width, height) = astronaut().dimensions();
    assert_eq!(
        probe_image(file("whole.jpg", &jpeg)).unwrap(),
        (width, height)
    );
    let cut = file("cut.jpg", &jpeg[..jpeg.len() / 2]);
    assert_eq!(probe_image(&cut).unwrap(), (width, height));
    assert!(matches!(
        load_rgb(&cut).unwrap_err(),
        FaceError::CorruptImage { .. }
    ));

    let missing = probe_image(dir.path().join("missing.jpg")).unwrap_err();
    assert!(matches!(missing, FaceError::Io { .. }), "{missing}");
    let table = probe_image(file("people.csv", b"name,age\nada,36\n")).unwrap_err();
    assert!(
        matches!(table, FaceError::UnsupportedImage { .. }),
        "{table}"
    );
    let mut bmp = encode(
        &DynamicImage::ImageRgb8(RgbImage::new(2, 2)),
        ImageFormat::Bmp,
    );
    bmp[18..22].copy_from_slice(&20_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&10_000i32.to_le_bytes());
    let bomb = probe_image(file("bomb.bmp", &bmp)).unwrap_err();
    assert!(matches!(bomb, FaceError::ImageTooLarge { .. }), "{bomb}");
}
