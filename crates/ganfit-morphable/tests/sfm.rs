//! Surrey Face Model: parity with eos, the bounds-checked cereal parser, landmarks.

mod common;

use candle_core::{Device, Tensor};
use common::{rows, sfm, shared_asset_dir};
use ganfit_morphable::MorphableError;
use ganfit_morphable::sfm::{SFM_EXPRESSION_FILE, SFM_SHAPE_FILE, SfmShapeFile, parse_blendshapes};
use proptest::prelude::*;

#[derive(serde::Deserialize)]
struct Fixture {
    samples: Vec<Sample>,
}

#[derive(serde::Deserialize)]
struct Sample {
    shape: Vec<f32>,
    expression: Vec<f32>,
}

#[test]
fn vertices_match_eos_for_three_coefficient_vectors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sfm_eos_samples.json")).unwrap())
            .unwrap();
    let expected: Vec<f32> = std::fs::read(dir.join("sfm_eos_samples.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let model = sfm();
    let n = model.n_vertices();
    assert_eq!(expected.len(), fixture.samples.len() * n * 3);
    for (i, sample) in fixture.samples.iter().enumerate() {
        let p_s = Tensor::new(sample.shape.as_slice(), &Device::Cpu).unwrap();
        let p_e = Tensor::new(sample.expression.as_slice(), &Device::Cpu).unwrap();
        let ours = model
            .instance(&p_s, &p_e)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let theirs = &expected[i * n * 3..(i + 1) * n * 3];
        let err = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!("eos sample {i}: max abs error {err:e} mm");
        assert!(err <= 1e-4, "sample {i}: max abs error {err} mm");
    }
}

#[test]
fn counts_landmarks_and_symmetry() {
    let model = sfm();
    assert_eq!(
        (
            model.n_vertices(),
            model.shape_modes(),
            model.expression_modes()
        ),
        (3448, 63, 6)
    );
    assert_eq!(model.triangles().len(), 6736);
    assert_eq!(model.uvs().len(), 3448);
    assert_eq!(model.expression_names()[3], "happiness");
    let landmarks = model.landmark_vertex_ids();
    assert_eq!(landmarks.len(), 68);
    assert_eq!(landmarks[8], Some(33), "chin");
    assert_eq!(landmarks[30], Some(114), "nose tip");
    assert!(
        landmarks[..8].iter().all(Option::is_none),
        "contour points are chosen per pose"
    );
    assert_eq!(
        model.vertex_set("contour_right").unwrap()[..3],
        [380, 373, 356]
    );
    let mean = rows(model.mean());
    let face = model.vertex_set("face").unwrap();
    let c = face
        .iter()
        .map(|&v| mean[v as usize][0] as f64)
        .sum::<f64>()
        / face.len() as f64;
    for (right, left) in [(36, 45), (39, 42), (48, 54), (17, 26), (31, 35)] {
        let (r, l) = (
            mean[landmarks[right].unwrap() as usize],
            mean[landmarks[left].unwrap() as usize],
        );
        let err = ((r[0] - (2.0 * c as f32 - l[0])).powi(2)
            + (r[1] - l[1]).powi(2)
            + (r[2] - l[2]).powi(2))
        .sqrt();
        assert!(
            err < 2.0,
            "landmarks {right}/{left} are {err} mm from mirror images"
        );
    }
}

fn real_file(name: &str) -> Vec<u8> {
    std::fs::read(shared_asset_dir("eos-sfm").join(name)).unwrap()
}

#[test]
fn the_real_files_parse_completely() {
    let shape = SfmShapeFile::parse(&real_file(SFM_SHAPE_FILE), SFM_SHAPE_FILE).unwrap();
    assert_eq!((shape.mean.len(), shape.eigenvalues.len()), (10344, 63));
    assert!((shape.eigenvalues[0] - 56502.4).abs() < 0.1);
    let blend = parse_blendshapes(&real_file(SFM_EXPRESSION_FILE), SFM_EXPRESSION_FILE).unwrap();
    let names: Vec<&str> = blend.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "anger",
            "disgust",
            "fear",
            "happiness",
            "sadness",
            "surprise"
        ]
    );
}

#[test]
fn a_missing_source_file_names_the_file_and_where_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = ganfit_morphable::convert_sfm(dir.path()).unwrap_err();
    assert!(matches!(err, MorphableError::MissingEntry { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(SFM_SHAPE_FILE) && text.contains("eos"),
        "{text}"
    );
}

fn shape_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| real_file(SFM_SHAPE_FILE))
}

fn blend_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| real_file(SFM_EXPRESSION_FILE))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn truncated_files_give_a_truncation_error(cut in 0usize..2_784_392) {
        let bytes = shape_bytes();
        let err = SfmShapeFile::parse(&bytes[..cut.min(bytes.len() - 1)], "cut.bin").unwrap_err();
        prop_assert!(matches!(err, MorphableError::Truncated { .. }), "{}", err);
        let blend = blend_bytes();
        let err = parse_blendshapes(&blend[..cut % blend.len()], "cut.bin").unwrap_err();
        prop_assert!(matches!(err, MorphableError::Truncated { .. } | MorphableError::InvalidSource { .. }), "{}", err);
    }

    #[test]
    fn random_bytes_give_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(SfmShapeFile::parse(&bytes, "random.bin").is_err());
        // Random bytes can in principle form a valid blendshape file; it must only not panic.
        let _ = parse_blendshapes(&bytes, "random.bin");
    }

    #[test]
    fn corrupted_headers_give_errors_not_panics(offset in 0usize..64, value in any::<u32>()) {
        // Overwrite a word among the leading size fields with an arbitrary (often huge) value.
        let mut bytes = shape_bytes()[..4096].to_vec();
        bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        prop_assert!(SfmShapeFile::parse(&bytes, "corrupt.bin").is_err());
    }
}
