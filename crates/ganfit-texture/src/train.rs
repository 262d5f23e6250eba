//! Progressive-growing GAN training of a [`Generator`] on (possibly partial) UV maps.

use crate::discriminator::Discriminator;
use crate::generator::{CONFIG_METADATA_KEY, Generator, GeneratorConfig, levels_for_resolution};
use crate::model::normal_from;
use crate::params::{
    ParamMap, downsample2, init_params, load_safetensors, metadata_json, save_safetensors,
    take_params, upsample2,
};
use crate::{Result, TextureError};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TRAIN_CONFIG_KEY: &str = "ganfit.train_config";
const STEP_KEY: &str = "ganfit.step";

/// The adversarial objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GanLoss {
    /// ProGAN's loss: Wasserstein critic, gradient penalty `gp_weight * (|grad D(x)| - 1)^2` at
    /// random real/fake interpolates, and drift `drift * D(real)^2` keeping scores near zero.
    WganGp {
        /// Weight of the gradient penalty (ProGAN: 10).
        gp_weight: f64,
        /// Weight of the drift term (ProGAN: 0.001).
        drift: f64,
    },
    /// Non-saturating logistic loss with the R1 penalty `r1_gamma / 2 * |grad D(real)|^2`.
    NonSaturatingR1 {
        /// R1 weight (StyleGAN: 10).
        r1_gamma: f64,
    },
}

impl Default for GanLoss {
    fn default() -> Self {
        Self::WganGp {
            gp_weight: 10.0,
            drift: 0.001,
        }
    }
}

/// Everything that defines a training run; serialisable (e.g. to a TOML or JSON file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Generator architecture; the discriminator mirrors its widths.
    pub generator: GeneratorConfig,
    /// Images per step, a multiple of `mbstd_group_size`.
    pub batch_size: usize,
    /// Steps of each progressive-growing phase: 4x4 trains for one phase, then every further
    /// resolution fades in for one phase and stabilises for one.
    pub phase_steps: usize,
    /// Total steps; training continues at full resolution after the last phase.
    pub total_steps: usize,
    /// Adam step size for both networks.
    pub learning_rate: f64,
    /// Adam first-moment decay (ProGAN: 0).
    pub adam_beta1: f64,
    /// Adam second-moment decay (ProGAN: 0.99).
    pub adam_beta2: f64,
    /// Adam epsilon.
    pub adam_eps: f64,
    /// The adversarial objective.
    pub loss: GanLoss,
    /// Decay of the exponential moving average of generator weights (the exported model).
    pub ema_decay: f64,
    /// Apply the gradient penalty (or R1) only every this many steps, scaled up by the same
    /// factor ("lazy regularisation", StyleGAN2); 1 is ProGAN's every-step penalty. The
    /// penalty's double backward costs about twice a plain discriminator step, so 4 to 16
    /// speeds training up markedly.
    pub penalty_every: usize,
    /// Group size of the discriminator's minibatch standard deviation.
    pub mbstd_group_size: usize,
    /// Seed of every random draw (initialisation, batches, latents, penalties).
    pub seed: u64,
    /// Write a sample grid every this many steps (0: never).
    pub sample_every: usize,
    /// Number of textures in a sample grid.
    pub sample_count: usize,
    /// Write a checkpoint every this many steps (0: only at the end of [`Trainer::run`]).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            generator: GeneratorConfig::default(),
            batch_size: 16,
            phase_steps: 4000,
            total_steps: 60_000,
            learning_rate: 1e-3,
            adam_beta1: 0.0,
            adam_beta2: 0.99,
            adam_eps: 1e-8,
            loss: GanLoss::default(),
            ema_decay: 0.999,
            penalty_every: 1,
            mbstd_group_size: 4,
            seed: 0,
            sample_every: 1000,
            sample_count: 16,
            checkpoint_every: 5000,
        }
    }
}

impl TrainConfig {
    /// `(level, alpha)` at `step`: the resolution level being trained (0 is 4x4) and the
    /// fade-in weight of its newest layers.
    pub fn schedule(&self, step: usize) -> (usize, f64) {
        let phase = step / self.phase_steps.max(1);
        let level = phase.div_ceil(2);
        if level > self.generator.max_level() {
            return (self.generator.max_level(), 1.0);
        }
        if phase % 2 == 1 {
            let into = step % self.phase_steps.max(1);
            (level, into as f64 / self.phase_steps as f64)
        } else {
            (level, 1.0)
        }
    }

    /// Checks every field; errors say which value to change.
    pub fn validate(&self) -> Result<()> {
        self.generator.validate()?;
        let bad = |msg: String| Err(TextureError::InvalidConfig(msg));
        if self.batch_size == 0
            || self.mbstd_group_size == 0
            || !self.batch_size.is_multiple_of(self.mbstd_group_size)
        {
            return bad(format!(
                "batch_size ({}) must be a positive multiple of mbstd_group_size ({})",
                self.batch_size, self.mbstd_group_size
            ));
        }
        if self.phase_steps == 0 || self.penalty_every == 0 {
            return bad("phase_steps and penalty_every must be positive".into());
        }
        if self.learning_rate.is_nan()
            || self.learning_rate <= 0.0
            || !(0.0..1.0).contains(&self.adam_beta1)
            || !(0.0..1.0).contains(&self.adam_beta2)
        {
            return bad("learning_rate must be positive and adam betas in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!(
                "ema_decay must be in [0, 1), got {}",
                self.ema_decay
            ));
        }
        Ok(())
    }
}

/// Training textures: images `[N, 3, R, R]` with values in `[0, 1]` and validity masks
/// `[N, 1, R, R]` (1 = observed texel, 0 = hole).
#[derive(Debug, Clone)]
pub struct TextureDataset {
    images: Tensor,
    masks: Tensor,
}

impl TextureDataset {
    /// Wraps image and (optional, default all-valid) mask tensors, checking shapes.
    pub fn new(images: Tensor, masks: Option<Tensor>) -> Result<Self> {
        let (n, c, h, w) = images.dims4().map_err(|_| {
            TextureError::Data(format!(
                "images must be [N, 3, R, R], got {:?}",
                images.dims()
            ))
        })?;
        if c != 3 || h != w || n == 0 {
            return Err(TextureError::Data(format!(
                "images must be a non-empty [N, 3, R, R] batch of square RGB textures, got {:?}",
                images.dims()
            )));
        }
        levels_for_resolution(h).map_err(|e| TextureError::Data(e.to_string()))?;
        let images = images.to_dtype(DType::F32)?;
        let masks = match masks {
            Some(m) if m.dims() == [n, 1, h, w] => m.to_dtype(DType::F32)?,
            Some(m) => {
                return Err(TextureError::Data(format!(
                    "masks must be [{n}, 1, {h}, {w}] to match the images, got {:?}",
                    m.dims()
                )));
            }
            None => Tensor::ones((n, 1, h, w), DType::F32, images.device())?,
        };
        Ok(Self { images, masks })
    }

    /// Loads every PNG/JPEG file in `dir` (sorted by name). All must be square with the same
    /// power-of-two size; an alpha channel, if present, is the validity mask (alpha >= 128 is
    /// observed).
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| TextureError::file(dir, format!("cannot list training textures: {e}")))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(TextureError::file(
                dir,
                "contains no .png/.jpg textures; point it at a folder of UV maps",
            ));
        }
        let (mut pixels, mut valid, mut size) = (Vec::new(), Vec::new(), None);
        for file in &files {
            let img = image::open(file)
                .map_err(|e| TextureError::file(file, format!("cannot decode image: {e}")))?
                .to_rgba8();
            let dims = img.dimensions();
            if *size.get_or_insert(dims) != dims {
                return Err(TextureError::file(
                    file,
                    format!(
                        "is {}x{} but earlier textures are {:?}; resize all to one size",
                        dims.0, dims.1, size
                    ),
                ));
            }
            let plane = (dims.0 * dims.1) as usize;
            let base = pixels.len();
            pixels.resize(base + 3 * plane, 0.0f32);
            for (i, px) in img.pixels().enumerate() {
                for ch in 0..3 {
                    pixels[base + ch * plane + i] = f32::from(px[ch]) / 255.0;
                }
                valid.push(if px[3] >= 128 { 1.0f32 } else { 0.0 });
            }
        }
        let (w, h) = size.unwrap_or_default();
        let n = files.len();
        let images = Tensor::from_vec(pixels, (n, 3, h as usize, w as usize), device)?;
        let masks = Tensor::from_vec(valid, (n, 1, h as usize, w as usize), device)?;
        Self::new(images, Some(masks))
    }

    /// Images `[N, 3, R, R]` and masks `[N, 1, R, R]`.
    pub fn tensors(&self) -> (&Tensor, &Tensor) {
        (&self.images, &self.masks)
    }

    /// Number of textures.
    pub fn len(&self) -> usize {
        self.images.dim(0).unwrap_or(0)
    }

    /// Whether there are no textures (never true for a constructed dataset).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Side length in texels.
    pub fn resolution(&self) -> usize {
        self.images.dim(3).unwrap_or(0)
    }

    /// Images and masks at every level from 4x4 up: colours are averaged over observed texels
    /// only, and a coarse texel counts as observed when at least half its children are.
    fn pyramid(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let mut levels = vec![(self.images.clone(), self.masks.clone())];
        while levels
            .last()
            .map(|(i, _)| i.dim(3))
            .transpose()?
            .unwrap_or(4)
            > 4
        {
            let (img, mask) = levels.last().expect("non-empty");
            let weight = downsample2(mask)?;
            let colour =
                downsample2(&img.broadcast_mul(mask)?)?.broadcast_div(&weight.clamp(1e-6, 1.0)?)?;
            levels.push((colour, weight.ge(0.5)?.to_dtype(DType::F32)?));
        }
        levels.reverse();
        Ok(levels)
    }
}

/// Losses of one training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Index of the step just taken (0-based).
    pub step: usize,
    /// Resolution level trained (0 is 4x4).
    pub level: usize,
    /// Fade-in weight of the level.
    pub alpha: f64,
    /// Discriminator loss including penalties.
    pub d_loss: f64,
    /// Generator loss.
    pub g_loss: f64,
    /// The gradient penalty (WGAN-GP) or R1 term, unweighted; `None` on steps that skip it
    /// (see [`TrainConfig::penalty_every`]).
    pub penalty: Option<f64>,
}

/// Passed to the progress callback of [`Trainer::run`] after every step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Losses of the step.
    pub stats: StepStats,
    /// `config.total_steps`.
    pub total_steps: usize,
    /// Time since `run` started.
    pub elapsed: Duration,
    /// Estimated time to `total_steps` at this run's average speed.
    pub eta: Duration,
}

/// Adam over named variables, with moments kept so checkpoints resume exactly.
#[derive(Debug)]
struct Adam {
    vars: BTreeMap<String, Var>,
    first: ParamMap,
    second: ParamMap,
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr: f64,
}

impl Adam {
    fn new(vars: BTreeMap<String, Var>, config: &TrainConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), zeros(v)?)))
            .collect::<Result<ParamMap>>()?;
        let second = first.clone();
        Ok(Self {
            vars,
            first,
            second,
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_eps,
            lr: config.learning_rate,
        })
    }

    /// One update; `t` is the 1-based update count (for bias correction).
    fn step(&mut self, grads: &GradStore, t: usize) -> Result<()> {
        let (c1, c2) = (
            1.0 - self.beta1.powi(t as i32),
            1.0 - self.beta2.powi(t as i32),
        );
        for (name, var) in &self.vars {
            // Gradients of leaves keep the graph of the ops that made them (e.g. a kernel
            // gradient built from the step's activations); moments built from them would chain
            // every step's graph together, so they are detached.
            let Some(g) = grads.get(var.as_tensor()).map(Tensor::detach) else {
                continue;
            };
            let m = self.first.get_mut(name).expect("moment per variable");
            *m = ((&*m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = self.second.get_mut(name).expect("moment per variable");
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.eps)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }

    fn tensors(&self, prefix: &str) -> ParamMap {
        let mut out = ParamMap::new();
        for (name, var) in &self.vars {
            out.insert(format!("{prefix}.{name}"), var.as_tensor().clone());
            out.insert(format!("{prefix}_adam_m.{name}"), self.first[name].clone());
            out.insert(format!("{prefix}_adam_v.{name}"), self.second[name].clone());
        }
        out
    }

    fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        path: &Path,
    ) -> Result<()> {
        let specs: Vec<_> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        let values = take_params(&specs, tensors, &format!("{prefix}."), path)?;
        for (name, value) in values {
            self.vars[&name].set(&value)?;
        }
        self.first = take_params(&specs, tensors, &format!("{prefix}_adam_m."), path)?;
        self.second = take_params(&specs, tensors, &format!("{prefix}_adam_v."), path)?;
        Ok(())
    }
}

/// Trains a [`Generator`] with progressive growing, minibatch stddev, an EMA of the generator,
/// Adam and the configured [`GanLoss`], on the CPU or any candle device.
///
/// Every random draw of step `s` comes from a ChaCha8 stream keyed by `(seed, s)`, so a run is
/// deterministic and a resumed run continues exactly as an uninterrupted one would.
#[derive(Debug)]
pub struct Trainer {
    config: TrainConfig,
    pyramid: Vec<(Tensor, Tensor)>,
    generator: Generator,
    discriminator: Discriminator,
    ema: ParamMap,
    adam_g: Adam,
    adam_d: Adam,
    step: usize,
    output_dir: Option<PathBuf>,
    device: Device,
}

fn into_vars(params: ParamMap) -> Result<BTreeMap<String, Var>> {
    params
        .into_iter()
        .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
        .collect()
}

fn var_tensors(vars: &BTreeMap<String, Var>) -> ParamMap {
    vars.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("plain data serialises to JSON")
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Per-sample squared L2 norm of `[B, ...]`.
fn squared_norm(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.flatten_from(1)?.sum(1)?)
}

impl Trainer {
    /// A fresh run on `data`, whose resolution must be at least the generator's: larger
    /// textures are averaged down (where their masks say they are valid), as for every lower
    /// level of the progressive growing.
    pub fn new(config: TrainConfig, data: &TextureDataset, device: &Device) -> Result<Self> {
        config.validate()?;
        if data.resolution() < config.generator.resolution() {
            return Err(TextureError::Data(format!(
                "textures are {0}x{0} but the generator makes {1}x{1}; give textures at least that large or change generator.channels",
                data.resolution(),
                config.generator.resolution()
            )));
        }
        let data = TextureDataset::new(
            data.images.to_device(device)?,
            Some(data.masks.to_device(device)?),
        )?;
        let g_params = init_params(&config.generator.generator_specs(), config.seed, device)?;
        let d_specs = Discriminator::parameter_specs(&config.generator);
        let d_params = init_params(&d_specs, config.seed.wrapping_add(1), device)?;
        let g_vars = into_vars(g_params.clone())?;
        let d_vars = into_vars(d_params)?;
        let generator = Generator::from_params(config.generator.clone(), &var_tensors(&g_vars))?;
        let discriminator = Discriminator::from_params(
            &config.generator,
            config.mbstd_group_size,
            var_tensors(&d_vars),
        )?;
        let mut pyramid = data.pyramid()?;
        pyramid.truncate(config.generator.max_level() + 1);
        Ok(Self {
            pyramid,
            generator,
            discriminator,
            ema: g_params,
            adam_g: Adam::new(g_vars, &config)?,
            adam_d: Adam::new(d_vars, &config)?,
            step: 0,
            output_dir: None,
            device: device.clone(),
            config,
        })
    }

    /// Continues a run from a checkpoint written by [`Trainer::save_checkpoint`].
    pub fn resume(
        checkpoint: impl AsRef<Path>,
        data: &TextureDataset,
        device: &Device,
    ) -> Result<Self> {
        let path = checkpoint.as_ref();
        let (tensors, meta) = load_safetensors(path, device)?;
        let config: TrainConfig = metadata_json(&meta, TRAIN_CONFIG_KEY, path)?;
        let step: usize = metadata_json(&meta, STEP_KEY, path)?;
        let mut trainer = Self::new(config, data, device)?;
        trainer.adam_g.restore(&tensors, "g", path)?;
        trainer.adam_d.restore(&tensors, "d", path)?;
        trainer.ema = take_params(
            &trainer.config.generator.generator_specs(),
            &tensors,
            "g_ema.",
            path,
        )?;
        trainer.step = step;
        Ok(trainer)
    }

    /// Writes the loss log (`log.csv`), sample grids (`samples/step_NNNNNNN.png`), checkpoints
    /// (`checkpoint.safetensors`) and the final EMA generator (`generator.safetensors`) under `dir`.
    pub fn with_output_dir(mut self, dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("samples"))
            .map_err(|e| TextureError::file(&dir, format!("cannot create output folder: {e}")))?;
        self.output_dir = Some(dir);
        Ok(self)
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The generator being trained (its weights are the trainer's variables).
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The exponential moving average of the generator: the model to sample and export.
    pub fn ema_generator(&self) -> Result<Generator> {
        Generator::from_params(self.config.generator.clone(), &self.ema)
    }

    /// The discriminator being trained.
    pub fn discriminator(&self) -> &Discriminator {
        &self.discriminator
    }

    fn step_rng(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(self.step as u64 + 1);
        rng
    }

    /// Real images in `[-1, 1]` (faded between levels like the generator) and their masks.
    fn real_batch(
        &self,
        level: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor, Tensor)> {
        let (images, masks) = &self.pyramid[level];
        let n = images.dim(0)?;
        let idx: Vec<u32> = (0..self.config.batch_size)
            .map(|_| rng.random_range(0..n as u32))
            .collect();
        let idx = Tensor::from_vec(idx, self.config.batch_size, &self.device)?;
        let mut real = images.index_select(&idx, 0)?.affine(2.0, -1.0)?;
        if level > 0 && alpha < 1.0 {
            let coarse = upsample2(&downsample2(&real)?)?;
            real = (&coarse + ((&real - &coarse)? * alpha)?)?;
        }
        let mask = masks.index_select(&idx, 0)?;
        Ok((real.broadcast_mul(&mask)?, mask))
    }

    fn latents(&self, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let (b, l) = (self.config.batch_size, self.config.generator.latent_dim);
        Ok(Tensor::from_vec(
            normal_from(rng, b * l, None),
            (b, l),
            &self.device,
        )?)
    }

    /// One discriminator and one generator update.
    pub fn step(&mut self) -> Result<StepStats> {
        let (level, alpha) = self.config.schedule(self.step);
        let mut rng = self.step_rng();
        let (real, mask) = self.real_batch(level, alpha, &mut rng)?;
        let d = &self.discriminator;

        let z = self.latents(&mut rng)?;
        let fake = self
            .generator
            .forward(&z, level, alpha)?
            .detach()
            .broadcast_mul(&mask)?;
        let with_penalty = self.step.is_multiple_of(self.config.penalty_every);
        let lazy = self.config.penalty_every as f64;
        let (d_loss, penalty) = match self.config.loss {
            GanLoss::WganGp { gp_weight, drift } => {
                let d_real = d.forward(&real, level, alpha)?;
                let d_fake = d.forward(&fake, level, alpha)?;
                let mut loss = ((d_fake.mean_all()? - d_real.mean_all()?)?
                    + (d_real.sqr()?.mean_all()? * drift)?)?;
                let mut penalty = None;
                if with_penalty {
                    let eps: Vec<f32> = (0..self.config.batch_size)
                        .map(|_| rng.random::<f32>())
                        .collect();
                    let eps =
                        Tensor::from_vec(eps, (self.config.batch_size, 1, 1, 1), &self.device)?;
                    let mixed = (&real + (&fake - &real)?.broadcast_mul(&eps)?)?;
                    let (_, grad) = d.forward_with_input_grad(&mixed, level, alpha)?;
                    let gp = ((squared_norm(&grad)? + 1e-12)?.sqrt()? - 1.0)?
                        .sqr()?
                        .mean_all()?;
                    loss = (loss + (&gp * (gp_weight * lazy))?)?;
                    penalty = Some(gp);
                }
                (loss, penalty)
            }
            GanLoss::NonSaturatingR1 { r1_gamma } => {
                let d_fake = d.forward(&fake, level, alpha)?;
                let (d_real, penalty) = if with_penalty {
                    let (d_real, grad) = d.forward_with_input_grad(&real, level, alpha)?;
                    (d_real, Some(squared_norm(&grad)?.mean_all()?))
                } else {
                    (d.forward(&real, level, alpha)?, None)
                };
                let mut loss =
                    (softplus(&d_fake)?.mean_all()? + softplus(&d_real.neg()?)?.mean_all()?)?;
                if let Some(r1) = &penalty {
                    loss = (loss + (r1 * (r1_gamma / 2.0 * lazy))?)?;
                }
                (loss, penalty)
            }
        };
        self.adam_d.step(&d_loss.backward()?, self.step + 1)?;

        let z = self.latents(&mut rng)?;
        let fake = self
            .generator
            .forward(&z, level, alpha)?
            .broadcast_mul(&mask)?;
        let score = self.discriminator.detached().forward(&fake, level, alpha)?;
        let g_loss = match self.config.loss {
            GanLoss::WganGp { .. } => score.mean_all()?.neg()?,
            GanLoss::NonSaturatingR1 { .. } => softplus(&score.neg()?)?.mean_all()?,
        };
        self.adam_g.step(&g_loss.backward()?, self.step + 1)?;
        self.update_ema()?;

        let stats = StepStats {
            step: self.step,
            level,
            alpha,
            d_loss: scalar(&d_loss)?,
            g_loss: scalar(&g_loss)?,
            penalty: penalty.as_ref().map(scalar).transpose()?,
        };
        self.step += 1;
        Ok(stats)
    }

    fn update_ema(&mut self) -> Result<()> {
        let beta = self.config.ema_decay;
        for (name, var) in &self.adam_g.vars {
            let avg = self
                .ema
                .get_mut(name)
                .expect("EMA entry per generator variable");
            *avg = ((&*avg * beta)? + (var.as_tensor().detach() * (1.0 - beta))?)?;
        }
        Ok(())
    }

    /// Trains until `config.total_steps`, writing logs, samples and checkpoints when an output
    /// folder is set, and calling `on_progress` after every step.
    pub fn run(&mut self, mut on_progress: impl FnMut(&Progress)) -> Result<()> {
        let start = Instant::now();
        let first = self.step;
        let mut log = self.open_log()?;
        while self.step < self.config.total_steps {
            let stats = self.step()?;
            let elapsed = start.elapsed();
            let done = (self.step - first) as f64;
            let eta = elapsed.mul_f64((self.config.total_steps - self.step) as f64 / done);
            if let Some((file, path)) = log.as_mut() {
                writeln!(
                    file,
                    "{},{},{:.4},{:.6},{:.6},{},{:.3}",
                    stats.step,
                    stats.level,
                    stats.alpha,
                    stats.d_loss,
                    stats.g_loss,
                    stats.penalty.map(|p| format!("{p:.6}")).unwrap_or_default(),
                    elapsed.as_secs_f64()
                )
                .map_err(|e| TextureError::file(path.as_path(), e))?;
            }
            if let Some(dir) = self.output_dir.clone() {
                if self.config.sample_every > 0
                    && self.step.is_multiple_of(self.config.sample_every)
                {
                    self.save_sample_grid(
                        dir.join("samples")
                            .join(format!("step_{:07}.png", self.step)),
                    )?;
                }
                if self.config.checkpoint_every > 0
                    && self.step.is_multiple_of(self.config.checkpoint_every)
                {
                    self.save_checkpoint(dir.join("checkpoint.safetensors"))?;
                }
            }
            on_progress(&Progress {
                stats,
                total_steps: self.config.total_steps,
                elapsed,
                eta,
            });
        }
        if let Some(dir) = self.output_dir.clone() {
            self.save_checkpoint(dir.join("checkpoint.safetensors"))?;
            self.ema_generator()?
                .save(dir.join("generator.safetensors"))?;
        }
        Ok(())
    }

    fn open_log(&self) -> Result<Option<(std::fs::File, PathBuf)>> {
        let Some(dir) = &self.output_dir else {
            return Ok(None);
        };
        let path = dir.join("log.csv");
        let fresh = !path.exists();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TextureError::file(&path, format!("cannot open loss log: {e}")))?;
        if fresh {
            writeln!(file, "step,level,alpha,d_loss,g_loss,penalty,seconds")
                .map_err(|e| TextureError::file(&path, e))?;
        }
        Ok(Some((file, path)))
    }

    /// Saves networks, EMA, optimiser moments, config and step count (resume with
    /// [`Trainer::resume`]).
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors = self.adam_g.tensors("g");
        tensors.extend(self.adam_d.tensors("d"));
        tensors.extend(
            self.ema
                .iter()
                .map(|(k, t)| (format!("g_ema.{k}"), t.clone())),
        );
        let meta = HashMap::from([
            (TRAIN_CONFIG_KEY.to_string(), to_json(&self.config)),
            (
                CONFIG_METADATA_KEY.to_string(),
                to_json(&self.config.generator),
            ),
            (STEP_KEY.to_string(), to_json(&self.step)),
        ]);
        save_safetensors(path.as_ref(), &tensors, meta)
    }

    /// A grid of EMA-generator samples (fixed latents) at the current level, upscaled to the
    /// final resolution, as an 8-bit RGB image.
    pub fn sample_grid(&self) -> Result<image::RgbImage> {
        let (level, alpha) = self.config.schedule(self.step.saturating_sub(1));
        let n = self.config.sample_count.max(1);
        let latent_len = n * self.config.generator.latent_dim;
        let z = Tensor::from_vec(
            crate::model::standard_normal(latent_len, None, self.config.seed),
            (n, self.config.generator.latent_dim),
            &self.device,
        )?;
        let mut images = self.ema_generator()?.forward(&z, level, alpha)?;
        for _ in level..self.config.generator.max_level() {
            images = upsample2(&images)?;
        }
        let images = images
            .affine(127.5, 127.5)?
            .clamp(0.0, 255.0)?
            .to_device(&Device::Cpu)?;
        let texels = images
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let r = self.config.generator.resolution();
        let cols = (n as f64).sqrt().ceil() as usize;
        let rows = n.div_ceil(cols);
        let mut grid = image::RgbImage::new((cols * r) as u32, (rows * r) as u32);
        for (i, rgb) in texels.chunks_exact(3).enumerate() {
            let (sample, y, x) = (i / (r * r), (i / r) % r, i % r);
            let (gx, gy) = ((sample % cols) * r + x, (sample / cols) * r + y);
            grid.put_pixel(
                gx as u32,
                gy as u32,
                image::Rgb([0, 1, 2].map(|c| rgb[c].round() as u8)),
            );
        }
        Ok(grid)
    }

    /// Writes [`Trainer::sample_grid`] as a PNG.
    pub fn save_sample_grid(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.sample_grid()?
            .save(path)
            .map_err(|e| TextureError::file(path, format!("cannot write sample grid: {e}")))
    }
}
