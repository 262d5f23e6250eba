//! The `Fitter` through the facade: determinism and typed errors for photos it cannot fit.

use std::sync::OnceLock;

use ganfit::losses::face::{FaceError, load_rgb};
use ganfit::{Error, Fitter};

fn fitter() -> &'static Fitter {
    static FITTER: OnceLock<Fitter> = OnceLock::new();
    FITTER.get_or_init(|| Fitter::builder().texture_size(256).build().unwrap())
}

fn astronaut() -> image::RgbImage {
    load_rgb(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/data/astronaut.png"
    ))
    .unwrap()
}

#[test]
fn the_same_photo_gives_bit_identical_fits() {
    let photo = astronaut();
    let a = fitter().fit(&photo).unwrap();
    let b = fitter().fit(&photo).unwrap();
    let values = |t: &candle_core::Tensor| t.to_vec1::<f32>().unwrap();
    assert_eq!(values(&a.params.shape), values(&b.params.shape));
    assert_eq!(values(&a.params.expression), values(&b.params.expression));
    assert_eq!(values(&a.params.rotation), values(&b.params.rotation));
    assert_eq!(a.params.intrinsics, b.params.intrinsics);
    assert_eq!(a.uv_texture, b.uv_texture);
}

#[test]
fn a_photo_without_a_face_is_a_typed_error() {
    let blank = image::RgbImage::from_pixel(320, 240, image::Rgb([90, 120, 160]));
    let err = fitter().fit(&blank).unwrap_err();
    assert!(
        matches!(err, Error::Face(FaceError::NoFaceFound { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("no face"), "{err}");
}

#[test]
fn a_tiny_face_is_a_typed_error() {
    let small =
        image::imageops::resize(&astronaut(), 96, 96, image::imageops::FilterType::Triangle);
    let err = fitter().fit(&small).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Face(FaceError::FaceTooSmall { .. } | FaceError::NoFaceFound { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_builder_options_fail_in_build() {
    let err = Fitter::builder().texture_size(3).build().unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}
