//! The ProGAN generator (Karras et al., ICLR 2018) used as GANFIT's texture model.

use crate::latent_pass::{LatentPass, PackedWeights};
use crate::model::{TextureModel, check_latent};
use crate::ops::{bias_lrelu_pixel_norm, pixel_norm};
use crate::params::{
    ParamMap, ParamSpec, RELU_GAIN, add_channel_bias, conv, dense, init_params, load_safetensors,
    metadata_json, own_params, param, save_safetensors, take_params, upsample2,
};
use crate::{Result, TextureError};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Metadata key under which weight files store their [`GeneratorConfig`] as JSON.
pub const CONFIG_METADATA_KEY: &str = "ganfit.generator_config";

/// Architecture of a [`Generator`]: latent size and the channel width of every resolution
/// block from 4x4 upwards. The output resolution is `4 * 2^(channels.len() - 1)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Length of the latent code `p_t` (512 in GANFIT and ProGAN).
    pub latent_dim: usize,
    /// Channels of the 4x4, 8x8, ... blocks, one entry per resolution.
    pub channels: Vec<usize>,
}

impl Default for GeneratorConfig {
    /// A 256x256 generator with the paper's 512-d latent and widths
    /// `[128, 128, 64, 32, 16, 8, 4]` for 4x4 ... 256x256 (1.64 M parameters).
    ///
    /// Chosen for the fitter, which differentiates the generator w.r.t. its latent hundreds of
    /// times per photo on a CPU: widths halve with every doubling of resolution, so each level
    /// costs the same (about 28 M multiply-adds per pass) instead of the high-resolution levels
    /// dominating, and a forward + backward pass stays within tens of milliseconds. The
    /// capacity sits where a UV face texture needs it: the coarse levels (128 channels) carry
    /// the identity-specific layout of skin tone, lips, brows and shading, which is what the
    /// identity loss constrains; the high-resolution levels only refine local detail (pores,
    /// edges) from their input, which is why ProGAN's own largest models also narrow towards
    /// the output (16 channels at 1024x1024). It is a starting point for CPU work; on a GPU,
    /// train wider models (e.g. [`GeneratorConfig::progan`]) and record the choice in the
    /// weight file's metadata, which every loader reads.
    fn default() -> Self {
        Self {
            latent_dim: 512,
            channels: vec![128, 128, 64, 32, 16, 8, 4],
        }
    }
}

impl GeneratorConfig {
    /// ProGAN's width rule `min(fmap_base / 2^stage, fmap_max)` (stage 1 is 4x4) for a square
    /// output of `resolution` texels; the official models use `fmap_base = 8192, fmap_max = 512`.
    pub fn progan(
        resolution: usize,
        latent_dim: usize,
        fmap_base: usize,
        fmap_max: usize,
    ) -> Result<Self> {
        let levels = levels_for_resolution(resolution)?;
        let channels = (1..=levels)
            .map(|stage| (fmap_base >> stage).clamp(1, fmap_max))
            .collect();
        let config = Self {
            latent_dim,
            channels,
        };
        config.validate()?;
        Ok(config)
    }

    /// Output side length in texels.
    pub fn resolution(&self) -> usize {
        4 << self.channels.len().saturating_sub(1)
    }

    /// Index of the final resolution level (0 is 4x4).
    pub fn max_level(&self) -> usize {
        self.channels.len().saturating_sub(1)
    }

    /// Checks sizes: 1 to 9 levels (4x4 to 1024x1024), all widths and the latent positive.
    pub fn validate(&self) -> Result<()> {
        if self.latent_dim == 0 {
            return Err(TextureError::InvalidConfig(
                "latent_dim must be positive".into(),
            ));
        }
        if self.channels.is_empty() || self.channels.len() > 9 {
            return Err(TextureError::InvalidConfig(format!(
                "channels needs one width per resolution from 4x4 up to at most 1024x1024 (1 to 9 entries), got {}",
                self.channels.len()
            )));
        }
        if self.channels.contains(&0) {
            return Err(TextureError::InvalidConfig(
                "every channel width must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Names and shapes of the generator's parameters (see the crate docs for the key scheme).
    pub(crate) fn generator_specs(&self) -> Vec<ParamSpec> {
        let c0 = self.channels[0];
        let mut specs = vec![
            ("4x4.dense.weight".into(), vec![16 * c0, self.latent_dim]),
            ("4x4.dense.bias".into(), vec![c0]),
            ("4x4.conv.weight".into(), vec![c0, c0, 3, 3]),
            ("4x4.conv.bias".into(), vec![c0]),
        ];
        for (level, pair) in self.channels.windows(2).enumerate() {
            let (prev, c) = (pair[0], pair[1]);
            let r = 8 << level;
            specs.push((format!("{r}x{r}.conv0.weight"), vec![c, prev, 3, 3]));
            specs.push((format!("{r}x{r}.conv0.bias"), vec![c]));
            specs.push((format!("{r}x{r}.conv1.weight"), vec![c, c, 3, 3]));
            specs.push((format!("{r}x{r}.conv1.bias"), vec![c]));
        }
        for (level, &c) in self.channels.iter().enumerate() {
            let r = 4 << level;
            specs.push((format!("to_rgb.{r}x{r}.weight"), vec![3, c, 1, 1]));
            specs.push((format!("to_rgb.{r}x{r}.bias"), vec![3]));
        }
        specs
    }
}

pub(crate) fn levels_for_resolution(resolution: usize) -> Result<usize> {
    if !resolution.is_power_of_two() || !(4..=1024).contains(&resolution) {
        return Err(TextureError::InvalidConfig(format!(
            "resolution must be a power of two from 4 to 1024, got {resolution}"
        )));
    }
    Ok(resolution.trailing_zeros() as usize - 1)
}

/// A ProGAN generator: pixel-normalised latent, a dense layer to 4x4, then per resolution a
/// nearest-neighbour 2x upsample and two 3x3 equalised-LR convolutions, each followed by leaky
/// ReLU (0.2) and pixel normalisation; a 1x1 "toRGB" convolution per resolution.
///
/// Raw outputs are in the training range `[-1, 1]`; the [`TextureModel`] implementation maps
/// them to `[0, 1]`.
#[derive(Debug, Clone)]
pub struct Generator {
    config: GeneratorConfig,
    params: ParamMap,
    device: Device,
    /// The final level's packed weights, shared by clones; `None` where the parameters may be
    /// updated in place (built around a trainer's variables), which forbids keeping them.
    packed: Option<PackedWeights>,
}

impl Generator {
    /// Randomly initialised weights (N(0, 1) weights, zero biases), deterministic in `seed`.
    pub fn new_random(config: GeneratorConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let params = init_params(&config.generator_specs(), seed, device)?;
        Ok(Self {
            config,
            params,
            device: device.clone(),
            packed: Some(PackedWeights::default()),
        })
    }

    /// Builds a generator around existing parameters (e.g. a trainer's variables), checking
    /// that exactly the expected names and shapes are present, all of one dtype (kept).
    pub fn from_params(config: GeneratorConfig, params: &ParamMap) -> Result<Self> {
        config.validate()?;
        let as_hash: HashMap<String, Tensor> = params.clone().into_iter().collect();
        let params = own_params(&config.generator_specs(), &as_hash)?;
        let mut dtypes = params.values().map(Tensor::dtype);
        if let Some(first) = dtypes.next()
            && dtypes.any(|d| d != first)
        {
            return Err(TextureError::InvalidConfig(
                "the generator's parameters mix dtypes; convert them all to one".to_string(),
            ));
        }
        let device = params
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        Ok(Self {
            config,
            params,
            device,
            packed: None,
        })
    }

    /// Loads weights written by [`Generator::save`]; the architecture comes from the file's
    /// metadata entry [`CONFIG_METADATA_KEY`].
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let (tensors, meta) = load_safetensors(path, device)?;
        Self::from_loaded(path, &tensors, &meta, device)
    }

    /// The generator in a loaded file's tensors and metadata (`path` names it in errors).
    pub(crate) fn from_loaded(
        path: &Path,
        tensors: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
        device: &Device,
    ) -> Result<Self> {
        let config: GeneratorConfig = metadata_json(meta, CONFIG_METADATA_KEY, path)?;
        config.validate().map_err(|e| TextureError::file(path, e))?;
        let params = take_params(&config.generator_specs(), tensors, "", path)?;
        Ok(Self {
            config,
            params,
            device: device.clone(),
            packed: Some(PackedWeights::default()),
        })
    }

    /// Saves the weights (f32, bit-exact) with the config in the metadata.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let meta = HashMap::from([(
            CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&self.config).expect("config serialises"),
        )]);
        save_safetensors(path.as_ref(), &self.params, meta)
    }

    /// The architecture.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// The parameters by name.
    pub fn params(&self) -> &ParamMap {
        &self.params
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.params.values().map(Tensor::elem_count).sum()
    }

    /// The same generator computing in `dtype` (f64 is handy for finite-difference checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: self.config.clone(),
            params,
            device: self.device.clone(),
            packed: Some(PackedWeights::default()),
        })
    }

    /// A copy whose parameters are cut from any autograd graph, so backward passes w.r.t. the
    /// latent do not compute weight gradients.
    pub fn detached(&self) -> Self {
        let params = self
            .params
            .iter()
            .map(|(k, t)| (k.clone(), t.detach()))
            .collect();
        Self {
            config: self.config.clone(),
            params,
            device: self.device.clone(),
            packed: self.packed.clone(),
        }
    }

    /// Raw output `[B, 3, R, R]` (range about `[-1, 1]`) at resolution `R = 4 * 2^level`,
    /// blending in the new level with weight `alpha` during progressive growing
    /// (`alpha = 1` for a fully grown level).
    pub fn forward(&self, latent: &Tensor, level: usize, alpha: f64) -> Result<Tensor> {
        self.forward_mapped(latent, level, alpha, (1.0, 0.0))
    }

    /// [`Generator::forward`] followed by `x * mul + add` (`map = (mul, add)`), which the
    /// fused latent pass folds into its last layer.
    fn forward_mapped(
        &self,
        latent: &Tensor,
        level: usize,
        alpha: f64,
        map: (f64, f64),
    ) -> Result<Tensor> {
        let b = check_latent(latent, self.config.latent_dim, self.dtype())?;
        if level > self.config.max_level() {
            return Err(TextureError::InvalidConfig(format!(
                "level {level} exceeds this generator's final level {}",
                self.config.max_level()
            )));
        }
        let fixed = !self.params.values().any(Tensor::track_op);
        if fixed && self.device.is_cpu() && (alpha >= 1.0 || level == 0) {
            let packed = match &self.packed {
                Some(packed) if level == self.config.max_level() => packed.clone(),
                _ => PackedWeights::default(),
            };
            let pass = LatentPass::new(&self.params, &self.config.channels, level, packed, map)?;
            return Ok(latent.contiguous()?.apply_op1(pass)?);
        }
        let p = &self.params;
        let c0 = self.config.channels[0];
        let x = dense(p, "4x4.dense", &pixel_norm(latent)?, RELU_GAIN / 4.0)?;
        let x = self.activate(&x.reshape((b, c0, 4, 4))?, "4x4.dense")?;
        let mut x = self.activate(&conv(p, "4x4.conv", &x, RELU_GAIN, false)?, "4x4.conv")?;
        let mut previous = None;
        for lvl in 1..=level {
            let r = 4 << lvl;
            let (conv0, conv1) = (format!("{r}x{r}.conv0"), format!("{r}x{r}.conv1"));
            let h = self.activate(&conv(p, &conv0, &x, RELU_GAIN, true)?, &conv0)?;
            let next = self.activate(&conv(p, &conv1, &h, RELU_GAIN, false)?, &conv1)?;
            previous = Some(std::mem::replace(&mut x, next));
        }
        let rgb = self.to_rgb(level, &x)?;
        let raw = match previous {
            Some(prev) if alpha < 1.0 => {
                let coarse = upsample2(&self.to_rgb(level - 1, &prev)?)?;
                (&coarse + ((&rgb - &coarse)? * alpha)?)?
            }
            _ => rgb,
        };
        Ok(match map {
            (1.0, 0.0) => raw,
            (mul, add) => raw.affine(mul, add)?,
        })
    }

    /// Adds the layer's bias, then leaky ReLU and pixel normalisation, fused into one op.
    fn activate(&self, x: &Tensor, layer: &str) -> Result<Tensor> {
        let bias = param(&self.params, &format!("{layer}.bias"))?;
        Ok(bias_lrelu_pixel_norm(x, bias)?)
    }

    fn to_rgb(&self, level: usize, x: &Tensor) -> Result<Tensor> {
        let layer = format!("to_rgb.{}x{0}", 4 << level);
        add_channel_bias(
            &conv(&self.params, &layer, x, 1.0, false)?,
            &self.params,
            &layer,
        )
    }

    fn dtype(&self) -> DType {
        self.params
            .values()
            .next()
            .map(Tensor::dtype)
            .unwrap_or(DType::F32)
    }
}

impl TextureModel for Generator {
    fn latent_dim(&self) -> usize {
        self.config.latent_dim
    }

    fn resolution(&self) -> (usize, usize) {
        (self.config.resolution(), self.config.resolution())
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn generate(&self, latent: &Tensor) -> Result<Tensor> {
        self.forward_mapped(latent, self.config.max_level(), 1.0, (0.5, 0.5))
    }

    /// GANFIT keeps `p_t` on the shell where a standard normal's mass concentrates; since the
    /// generator pixel-normalises its latent, only the direction matters, and the penalty
    /// `0.5 * (|z| - sqrt(L))^2` fixes the radius so gradient steps stay well scaled.
    fn latent_prior(&self, latent: &Tensor) -> Result<Tensor> {
        check_latent(latent, self.config.latent_dim, self.dtype())?;
        let radius = latent.sqr()?.sum(1)?.sqrt()?;
        Ok(((radius - (self.config.latent_dim as f64).sqrt())?.sqr()? * 0.5)?)
    }
}
