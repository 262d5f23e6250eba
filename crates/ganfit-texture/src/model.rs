//! The interface the fitter optimises through.

use crate::{Result, TextureError};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A differentiable map from a latent code to a UV texture map.
///
/// Conventions shared by all implementations:
/// - latents are `f32` tensors of shape `[B, latent_dim()]`;
/// - [`TextureModel::generate`] returns `[B, 3, H, W]` RGB textures whose values are *nominally*
///   in `[0, 1]` (the training data's range) but are not clamped, so gradients never vanish;
///   clamp for display only;
/// - [`TextureModel::latent_prior`] returns a per-sample penalty `[B]` (a negative log-prior up
///   to a constant) that the fitter adds, weighted, to its energy.
pub trait TextureModel: std::fmt::Debug + Send + Sync {
    /// Length of one latent code.
    fn latent_dim(&self) -> usize;

    /// Output `(height, width)` in texels.
    fn resolution(&self) -> (usize, usize);

    /// Device the model's weights live on; latents must be on it too.
    fn device(&self) -> &Device;

    /// Textures `[B, 3, H, W]` for latents `[B, latent_dim]`, differentiable w.r.t. the latents.
    fn generate(&self, latent: &Tensor) -> Result<Tensor>;

    /// Per-sample prior penalty `[B]` for latents `[B, latent_dim]`, differentiable.
    fn latent_prior(&self, latent: &Tensor) -> Result<Tensor>;

    /// The latent whose texture best matches `texture` `[1, 3, H, W]` where `weight`
    /// `[1, 1, H, W]` (e.g. 1 on texels seen in a photo, 0 elsewhere) says it counts, under
    /// the latent prior; `None` for models without a closed-form or cheap encoder (the GAN),
    /// whose latent then starts from a draw of the prior.
    fn encode(&self, texture: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
        let _ = (texture, weight);
        Ok(None)
    }

    /// `n` latents drawn from the model's prior (standard normal), deterministic in `seed`.
    ///
    /// `truncation = Some(t)` redraws every component whose magnitude exceeds `t` (the
    /// "truncation trick" of BigGAN), trading diversity for typicality; it works for any
    /// model whose prior is a standard normal, which both models here are.
    fn sample_latent(&self, n: usize, truncation: Option<f64>, seed: u64) -> Result<Tensor> {
        if let Some(t) = truncation.filter(|t| t.is_nan() || *t <= 0.0) {
            return Err(TextureError::InvalidConfig(format!(
                "truncation must be a positive threshold, got {t}"
            )));
        }
        let values = standard_normal(n * self.latent_dim(), truncation, seed);
        Ok(Tensor::from_vec(
            values,
            (n, self.latent_dim()),
            self.device(),
        )?)
    }
}

/// `len` standard-normal `f32` samples from a ChaCha8 stream seeded with `seed`, each redrawn
/// while its magnitude exceeds `truncation`.
pub(crate) fn standard_normal(len: usize, truncation: Option<f64>, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    normal_from(&mut rng, len, truncation)
}

pub(crate) fn normal_from(
    rng: &mut impl rand::Rng,
    len: usize,
    truncation: Option<f64>,
) -> Vec<f32> {
    let limit = truncation.unwrap_or(f64::INFINITY);
    (0..len)
        .map(|_| {
            loop {
                let v: f64 = StandardNormal.sample(rng);
                if v.abs() <= limit {
                    break v as f32;
                }
            }
        })
        .collect()
}

/// Checks that `latent` is `[B, expected]` of the model's dtype and returns `B`.
pub(crate) fn check_latent(latent: &Tensor, expected: usize, dtype: DType) -> Result<usize> {
    match latent.dims() {
        [b, l] if *l == expected && latent.dtype() == dtype => Ok(*b),
        dims => Err(TextureError::LatentShape {
            expected,
            got: dims.to_vec(),
        }),
    }
}
