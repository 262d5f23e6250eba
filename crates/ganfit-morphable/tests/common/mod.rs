//! Shared by the integration tests: the two models, loaded once per test binary, and helpers.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use ganfit_assets::Resolver;
use ganfit_morphable::MorphableModel;

/// `../shared/assets/<name>` beside the checkout (present here and in CI).
pub fn shared_asset_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/assets")
        .join(name)
}

/// The ICT model through the normal resolver: converted into the user cache the first time any
/// test binary needs it (the resolver's lock makes concurrent binaries convert it once).
pub fn ict() -> &'static MorphableModel {
    static MODEL: OnceLock<MorphableModel> = OnceLock::new();
    MODEL.get_or_init(|| MorphableModel::ict(&Resolver::new(), &Device::Cpu).expect("ICT model"))
}

/// The Surrey Face Model, likewise.
pub fn sfm() -> &'static MorphableModel {
    static MODEL: OnceLock<MorphableModel> = OnceLock::new();
    MODEL.get_or_init(|| MorphableModel::sfm(&Resolver::new(), &Device::Cpu).expect("SFM model"))
}

/// A deterministic pseudo-random vector in [-1, 1) (a small LCG: tests need no statistics).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Rows of an `[N, 3]` tensor.
pub fn rows(t: &Tensor) -> Vec<[f32; 3]> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0], r[1], r[2]])
        .collect()
}
