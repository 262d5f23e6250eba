//! The dlib reader accepts exactly the model file and rejects everything else with a typed
//! error, without panicking or allocating absurd amounts of memory.
//!
//! `tests/fixtures/dlib/model_head.bin` is the first 2048 bytes of
//! `dlib_face_recognition_resnet_model_v1.dat` (CC0): every layer header, the input layer and the
//! start of the first parameter tensor. The tests on the whole 22 MB file run when
//! `GANFIT_DLIB_DAT` names it (see tools/fixtures/make_dlib_fixture.py for how to get it).

use std::path::Path;

use ganfit_assets::Manifest;
use ganfit_losses::dlib::{DlibFormatError, DlibResnet};
use ganfit_losses::identity::DLIB_RESNET_ASSET_ID;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn head() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dlib/model_head.bin"))
        .unwrap()
}

#[test]
fn every_prefix_of_the_model_is_a_truncation_error() {
    let head = head();
    for len in 0..=head.len() {
        match DlibResnet::parse(&head[..len]) {
            Err(DlibFormatError::Truncated { offset, .. }) => assert!(offset <= len),
            other => panic!("prefix of {len} bytes: {other:?}"),
        }
    }
}

#[test]
fn corrupt_headers_are_malformed_errors() {
    let head = head();
    // [0] is the loss layer's version control byte, [1] its value, [2] the control byte of the
    // name's length, [4..17] "loss_metric_2".
    let cases: [(usize, u8, &str); 4] = [
        (1, 7, "outside [1, 1]"),
        (16, b'9', "loss_metric_9"),
        (0, 0x31, "control byte"),
        (2, 0x81, "outside"),
    ];
    for (at, byte, expected) in cases {
        let mut bytes = head.clone();
        bytes[at] = byte;
        let err = DlibResnet::parse(&bytes).unwrap_err();
        assert!(
            matches!(err, DlibFormatError::Malformed { .. }) && err.to_string().contains(expected),
            "byte {at} = {byte:#x}: {err}"
        );
    }
}

#[test]
fn non_dlib_files_are_rejected() {
    for bytes in [
        &b""[..],
        b"\x89PNG\r\n\x1a\n",
        b"{\"not\": \"a model\"}",
        &[0xFF; 64],
    ] {
        assert!(DlibResnet::parse(bytes).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(DlibResnet::parse(&bytes).is_err());
    }

    #[test]
    fn random_edits_of_the_head_never_panic(at in 0usize..2048, byte in any::<u8>()) {
        let mut bytes = head();
        bytes[at] = byte;
        prop_assert!(DlibResnet::parse(&bytes).is_err());
    }
}

/// The whole model file, when `GANFIT_DLIB_DAT` names it.
fn full_model() -> Option<Vec<u8>> {
    let Some(path) = std::env::var_os("GANFIT_DLIB_DAT") else {
        eprintln!("GANFIT_DLIB_DAT is not set: skipping the tests on the full dlib model file");
        return None;
    };
    Some(std::fs::read(&path).expect("GANFIT_DLIB_DAT names a readable file"))
}

#[test]
fn full_model_converts_to_the_manifest_file_and_rejects_edits() {
    let Some(bytes) = full_model() else { return };
    assert_eq!(bytes.len(), 22_466_066);
    let net = DlibResnet::parse(&bytes).unwrap();
    let converted = net.to_safetensors().unwrap();
    assert_eq!(
        converted,
        net.to_safetensors().unwrap(),
        "conversion is deterministic"
    );
    let entry = Manifest::embedded()
        .get(DLIB_RESNET_ASSET_ID)
        .unwrap()
        .clone();
    assert_eq!(converted.len() as u64, entry.bytes);
    assert_eq!(hex::encode(Sha256::digest(&converted)), entry.sha256);

    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        DlibResnet::parse(&longer),
        Err(DlibFormatError::TrailingBytes { extra: 1, .. })
    ));
    for len in [bytes.len() - 1, bytes.len() / 2, 4096] {
        assert!(matches!(
            DlibResnet::parse(&bytes[..len]),
            Err(DlibFormatError::Truncated { .. })
        ));
    }
}
