//! UV texture models for GANFIT-style fitting.
//!
//! - [`TextureModel`]: the small interface the fitter optimises through (latent size,
//!   differentiable `generate`, latent prior, truncated sampling).
//! - [`Generator`]: a progressive GAN (ProGAN) generator, loadable from safetensors, and
//!   [`Trainer`], which trains one from (possibly partial) UV maps.
//! - [`PcaTextureModel`]: a weighted-PCA linear model learned from masked UV maps, the fast option.
//!
//! # Weight files
//!
//! Generator weights are safetensors files holding f32 tensors and, in the metadata entry
//! [`CONFIG_METADATA_KEY`], the [`GeneratorConfig`] as JSON. Weights are stored *unscaled*
//! (drawn from N(0, 1) at initialisation); layers multiply them by `gain / sqrt(fan_in)` at run
//! time (equalised learning rate), with `gain = sqrt(2)` except `sqrt(2)/4` for the first dense
//! layer and 1 for toRGB. Keys, for `R` = 8, 16, ... up to the output resolution:
//!
//! | key | shape | official ProGAN (TF) variable | conversion |
//! |---|---|---|---|
//! | `4x4.dense.weight` | `[16*C0, L]` | `4x4/Dense/weight` `[L, 16*C0]` | transpose |
//! | `4x4.dense.bias` | `[C0]` | `4x4/Dense/bias` | as is |
//! | `4x4.conv.weight` | `[C0, C0, 3, 3]` | `4x4/Conv/weight` `[3, 3, in, out]` | permute to `[out, in, kh, kw]` |
//! | `RxR.conv0.weight` | `[C, Cprev, 3, 3]` | `RxR/Conv0/weight` `[3, 3, in, out]`, or the fused `RxR/Conv0_up/weight` `[3, 3, out, in]` | permute to `[out, in, kh, kw]`; `Conv0_up` also flipped in both spatial axes |
//! | `RxR.conv1.weight` | `[C, C, 3, 3]` | `RxR/Conv1/weight` | permute as above |
//! | `to_rgb.RxR.weight` | `[3, C, 1, 1]` | `ToRGB_lod{log2(final/R)}/weight` `[1, 1, C, 3]` | permute as above |
//! | `*.bias` | `[out]` | `*/bias` | as is |
//!
//! The dense output is reshaped to `[B, C0, 4, 4]` channel-major, as in the TF code's
//! `reshape([-1, nf, 4, 4])`. TF's fused `Conv0_up` (a stride-2 transposed convolution with
//! the 3x3 kernel summed into 4x4) equals nearest upsampling followed by a 3x3 correlation
//! with the spatially flipped kernel, edges included (`tools/texture/check_fused_upconv.py`
//! checks that algebra). The official latent is 512-d and pixel normalised; both hold here.
//! Official checkpoints with `label_size > 0` are not supported.
//!
//! [`import_progan_npz`] performs this conversion on an `.npz` of TF variable names and arrays,
//! which `tools/texture/progan_to_npz.py` dumps from an official `.pkl` snapshot or checkpoint
//! (it needs TensorFlow 1.x); the CLI wraps it as `ganfit texture import-progan`.
//!
//! # Speed
//!
//! Convolutions, the fused bias + leaky ReLU + pixel norm and the dense layer are candle
//! `CustomOp`s with rayon CPU kernels (in `ops.rs`), compiled twice: for baseline x86-64
//! and for AVX2 + FMA, chosen at run time. Their backward passes skip the gradients of operands
//! that are not being trained, and a convolution's input gradient correlates with the kernel
//! transposed and flipped as it is packed (no flipped copy).
//!
//! A generator whose weights are not being trained (loaded, or detached; the fitter's case)
//! runs a fully grown level as one op on the latent (`latent_pass.rs`): the forward pass keeps
//! its pre-activations, the backward pass runs the adjoint kernels back to back, and the
//! weights are packed for the kernels once per generator (per call where they are a trainer's
//! variables, which change in place). There the upsampling convolution's input gradient is a
//! half-resolution correlation over the gradient's four polyphase planes (16 instead of 36
//! multiply-adds per channel pair and texel, no full-size temporary). Differentiating w.r.t.
//! the latent costs about as much as a second forward pass, with no autograd bookkeeping in
//! between. Trained weights and fade-in take the candle graph; the tests check that both
//! paths agree.
//!
//! # Training
//!
//! [`Trainer`] follows ProGAN: progressive growing with linear fade-in of both networks and
//! of the real images, WGAN-GP with drift (or non-saturating + R1, [`GanLoss`]), minibatch
//! standard deviation in the discriminator, an EMA of the generator (the exported model), and
//! Adam with `beta1 = 0, beta2 = 0.99`. Candle's autograd is first order, so the
//! discriminator's input gradient needed by the penalties is written out by hand
//! ([`Discriminator::forward_with_input_grad`]) with differentiable ops and checked against
//! autograd and finite differences in the tests. Checkpoints are safetensors files with keys
//! `g.*`, `d.*` (weights), `g_ema.*`, `{g,d}_adam_{m,v}.*` and the config and step in the
//! metadata; every step draws its randomness from a stream keyed by `(seed, step)`, so a
//! resumed run is bit-identical to an uninterrupted one.
//!
//! # Partial textures
//!
//! UV maps unwrapped from photos have holes. The trainer multiplies the real *and* the fake
//! image of each pair by the real sample's validity mask before the discriminator sees them,
//! so holes look identical on both sides and carry no signal ("holes are real" cannot be
//! learned); the generator still learns every texel from the samples where it is visible.

mod discriminator;
mod error;
mod generator;
mod latent_pass;
mod model;
mod ops;
mod params;
mod pca;
mod progan_import;
mod train;

pub use discriminator::Discriminator;
pub use error::{Result, TextureError};
pub use generator::{CONFIG_METADATA_KEY, Generator, GeneratorConfig};
pub use model::TextureModel;
pub use ops::{LEAKY_SLOPE, conv2d_same, leaky_relu, pixel_norm};
pub use params::ParamMap;
pub use pca::{PcaFitOptions, PcaTextureModel};
pub use progan_import::import_progan_npz;
pub use train::{GanLoss, Progress, StepStats, TextureDataset, TrainConfig, Trainer};

/// Loads a texture model file written by ganfit-texture: a [`Generator`] when the file holds
/// the generator's configuration ([`CONFIG_METADATA_KEY`]), otherwise a [`PcaTextureModel`].
pub fn load_texture_model(
    path: impl AsRef<std::path::Path>,
    device: &candle_core::Device,
) -> Result<std::sync::Arc<dyn TextureModel>> {
    let path = path.as_ref();
    let (tensors, metadata) = params::load_safetensors(path, device)?;
    Ok(if metadata.contains_key(CONFIG_METADATA_KEY) {
        std::sync::Arc::new(Generator::from_loaded(path, &tensors, &metadata, device)?)
    } else {
        std::sync::Arc::new(PcaTextureModel::from_loaded(path, tensors)?)
    })
}
