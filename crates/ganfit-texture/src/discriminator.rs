//! The ProGAN discriminator, with a hand-written input gradient so gradient penalties (WGAN-GP,
//! R1) can be differentiated w.r.t. its weights: candle's autograd is first-order only.

use crate::generator::GeneratorConfig;
use crate::ops::{conv2d_input_grad, leaky_relu_with_slope};
use crate::params::{
    ParamMap, ParamSpec, RELU_GAIN, add_channel_bias, conv, downsample2, init_params, upsample2,
    weight_and_scale,
};
use crate::{Result, TextureError};
use candle_core::{Device, Tensor};

type Vjp = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

/// Vector-Jacobian products of a chain of layers, recorded during the forward pass and replayed
/// in reverse. Every product is built from differentiable candle ops.
#[derive(Default)]
struct Tape(Vec<Vjp>);

impl Tape {
    fn push(&mut self, vjp: impl Fn(&Tensor) -> candle_core::Result<Tensor> + 'static) {
        self.0.push(Box::new(vjp));
    }

    fn backward(&self, grad: Tensor) -> candle_core::Result<Tensor> {
        self.0.iter().rev().try_fold(grad, |g, vjp| vjp(&g))
    }
}

/// ProGAN's discriminator, mirroring the [`crate::Generator`] widths: per resolution a 1x1
/// "fromRGB", two 3x3 convolutions and 2x2 average pooling; at 4x4 the minibatch standard
/// deviation channel, a 3x3 convolution and two dense layers. Leaky ReLU (0.2) throughout.
#[derive(Debug, Clone)]
pub struct Discriminator {
    channels: Vec<usize>,
    group_size: usize,
    params: ParamMap,
}

impl Discriminator {
    /// Randomly initialised weights for the generator architecture `config`, with minibatch
    /// standard deviation over groups of `group_size` samples.
    pub fn new_random(
        config: &GeneratorConfig,
        group_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let channels = config.channels.clone();
        let params = init_params(&specs(&channels), seed, device)?;
        Self::from_params(config, group_size, params)
    }

    /// Builds a discriminator around existing parameters.
    pub fn from_params(
        config: &GeneratorConfig,
        group_size: usize,
        params: ParamMap,
    ) -> Result<Self> {
        if group_size == 0 {
            return Err(TextureError::InvalidConfig(
                "minibatch stddev group size must be positive".into(),
            ));
        }
        let channels = config.channels.clone();
        for (name, shape) in specs(&channels) {
            let t = params.get(&name).ok_or_else(|| {
                TextureError::InvalidConfig(format!("discriminator parameter `{name}` is missing"))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(TextureError::InvalidConfig(format!(
                    "discriminator parameter `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
        }
        Ok(Self {
            channels,
            group_size,
            params,
        })
    }

    /// Names and shapes of the parameters for `config`.
    pub fn parameter_specs(config: &GeneratorConfig) -> Vec<(String, Vec<usize>)> {
        specs(&config.channels)
    }

    /// The parameters by name.
    pub fn params(&self) -> &ParamMap {
        &self.params
    }

    /// A copy whose parameters are cut from the autograd graph (for the generator's step).
    pub fn detached(&self) -> Self {
        let params = self
            .params
            .iter()
            .map(|(k, t)| (k.clone(), t.detach()))
            .collect();
        Self {
            channels: self.channels.clone(),
            group_size: self.group_size,
            params,
        }
    }

    /// Scores `[B]` for images `[B, 3, R, R]` at `R = 4 * 2^level`, fading in the top level with
    /// weight `alpha`.
    pub fn forward(&self, images: &Tensor, level: usize, alpha: f64) -> Result<Tensor> {
        Ok(self.forward_traced(images, level, alpha)?.0)
    }

    /// Scores `[B]` and the gradient of their sum w.r.t. `images`, the latter built from
    /// differentiable ops so a penalty on it can be backpropagated to the weights.
    pub fn forward_with_input_grad(
        &self,
        images: &Tensor,
        level: usize,
        alpha: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (score, (tail, top), coarse) = self.forward_traced(images, level, alpha)?;
        let at_merge = tail.backward(score.ones_like()?.unsqueeze(1)?)?;
        let grad = match coarse {
            Some(coarse) => {
                (top.backward((&at_merge * alpha)?)?
                    + coarse.backward((&at_merge * (1.0 - alpha))?)?)?
            }
            None => top.backward(at_merge)?,
        };
        Ok((score, grad))
    }

    /// Returns the score, the (tail, top-branch) tapes and, while fading in, the tape of the
    /// coarse branch.
    #[allow(clippy::type_complexity)]
    fn forward_traced(
        &self,
        images: &Tensor,
        level: usize,
        alpha: f64,
    ) -> Result<(Tensor, (Tape, Tape), Option<Tape>)> {
        let (b, c, h, w) = images.dims4()?;
        let r = 4 << level;
        if level >= self.channels.len() || c != 3 || h != r || w != r {
            return Err(TextureError::InvalidConfig(format!(
                "discriminator level {level} expects [B, 3, {r}, {r}] images, got {:?}",
                images.dims()
            )));
        }
        if b % self.group_size.min(b) != 0 {
            return Err(TextureError::InvalidConfig(format!(
                "batch size {b} must be a multiple of the minibatch stddev group size {}",
                self.group_size
            )));
        }
        let mut top = Tape::default();
        let mut x = self.rgb_features(level, images, &mut top)?;
        let mut skip = None;
        if level > 0 {
            x = self.block(level, &x, &mut top)?;
            if alpha < 1.0 {
                let mut coarse_tape = Tape::default();
                coarse_tape.push(|g| upsample2(g).map_err(candle_err)?.affine(0.25, 0.0));
                let coarse =
                    self.rgb_features(level - 1, &downsample2(images)?, &mut coarse_tape)?;
                x = (&coarse + ((&x - &coarse)? * alpha)?)?;
                skip = Some(coarse_tape);
            }
        }
        let mut tail = Tape::default();
        for lvl in (1..level).rev() {
            x = self.block(lvl, &x, &mut tail)?;
        }
        let x = self.minibatch_stddev(&x, &mut tail)?;
        let x = self.conv_lrelu("4x4.conv", &x, &mut tail)?;
        let features = x.dim(1)?;
        let x = x.flatten_from(1)?;
        tail.push(move |g| g.reshape((b, features, 4, 4)));
        let x = self.dense(&x, "4x4.dense0", RELU_GAIN, true, &mut tail)?;
        let score = self.dense(&x, "4x4.dense1", 1.0, false, &mut tail)?;
        Ok((score.squeeze(1)?, (tail, top), skip))
    }

    fn rgb_features(&self, level: usize, images: &Tensor, tape: &mut Tape) -> Result<Tensor> {
        let r = 4 << level;
        self.conv_lrelu(&format!("from_rgb.{r}x{r}"), images, tape)
    }

    fn block(&self, level: usize, x: &Tensor, tape: &mut Tape) -> Result<Tensor> {
        let r = 4 << level;
        let x = self.conv_lrelu(&format!("{r}x{r}.conv0"), x, tape)?;
        let x = self.conv_lrelu(&format!("{r}x{r}.conv1"), &x, tape)?;
        tape.push(|g| upsample2(g).map_err(candle_err)?.affine(0.25, 0.0));
        downsample2(&x)
    }

    fn conv_lrelu(&self, layer: &str, x: &Tensor, tape: &mut Tape) -> Result<Tensor> {
        let pre = conv(&self.params, layer, x, RELU_GAIN, false)?;
        let (y, slope) = leaky_relu_with_slope(&add_channel_bias(&pre, &self.params, layer)?)?;
        let (w, scale) = weight_and_scale(&self.params, layer, RELU_GAIN)?;
        let w = w.clone();
        tape.push(move |g| conv2d_input_grad(&(g * &slope)?, &w, scale));
        Ok(y)
    }

    fn dense(
        &self,
        x: &Tensor,
        layer: &str,
        gain: f64,
        activate: bool,
        tape: &mut Tape,
    ) -> Result<Tensor> {
        // Always candle's matmul: the discriminator's weights are trained in its own step.
        let (w, scale) = weight_and_scale(&self.params, layer, gain)?;
        let pre = add_channel_bias(&(x.matmul(&w.t()?)? * scale)?, &self.params, layer)?;
        let w = (w * scale)?;
        if activate {
            let (y, slope) = leaky_relu_with_slope(&pre)?;
            tape.push(move |g| (g * &slope)?.matmul(&w));
            Ok(y)
        } else {
            tape.push(move |g| g.matmul(&w));
            Ok(pre)
        }
    }

    /// Appends the mean over features of the per-feature standard deviation within groups of
    /// `group_size` samples (samples `g * M + m` share group `m`), as one constant channel.
    fn minibatch_stddev(&self, x: &Tensor, tape: &mut Tape) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let g = self.group_size.min(b);
        let m = b / g;
        let grouped = x.reshape((g, m, c, h, w))?;
        let centred = grouped.broadcast_sub(&grouped.mean_keepdim(0)?)?;
        let std = (centred.sqr()?.mean_keepdim(0)? + 1e-8)?.sqrt()?;
        let per_group = std.reshape((1, m, c * h * w))?.mean_keepdim(2)?;
        let feature = per_group
            .reshape((1, m, 1, 1))?
            .broadcast_as((g, m, h, w))?
            .reshape((b, 1, h, w))?;
        let out = Tensor::cat(&[x, &feature], 1)?;
        // d s_m / d x_{g,m,i} = centred_{g,m,i} / (G * std_{m,i} * C*H*W): the mean's own
        // derivative cancels because centred values sum to zero over the group.
        let coeff = (centred / std.broadcast_as((g, m, c, h, w))?)?
            .affine(1.0 / (g * c * h * w) as f64, 0.0)?;
        tape.push(move |grad| {
            let direct = grad.narrow(1, 0, c)?;
            let through_std = grad
                .narrow(1, c, 1)?
                .reshape((g, m, h * w))?
                .sum(2)?
                .sum_keepdim(0)?
                .reshape((1, m, 1, 1, 1))?;
            direct + coeff.broadcast_mul(&through_std)?.reshape((b, c, h, w))?
        });
        Ok(out)
    }
}

fn candle_err(e: TextureError) -> candle_core::Error {
    match e {
        TextureError::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

fn specs(channels: &[usize]) -> Vec<ParamSpec> {
    let c0 = channels[0];
    let mut specs = Vec::new();
    for (level, &c) in channels.iter().enumerate() {
        let r = 4 << level;
        specs.push((format!("from_rgb.{r}x{r}.weight"), vec![c, 3, 1, 1]));
        specs.push((format!("from_rgb.{r}x{r}.bias"), vec![c]));
        if level > 0 {
            let below = channels[level - 1];
            specs.push((format!("{r}x{r}.conv0.weight"), vec![c, c, 3, 3]));
            specs.push((format!("{r}x{r}.conv0.bias"), vec![c]));
            specs.push((format!("{r}x{r}.conv1.weight"), vec![below, c, 3, 3]));
            specs.push((format!("{r}x{r}.conv1.bias"), vec![below]));
        }
    }
    specs.extend([
        ("4x4.conv.weight".to_string(), vec![c0, c0 + 1, 3, 3]),
        ("4x4.conv.bias".to_string(), vec![c0]),
        ("4x4.dense0.weight".to_string(), vec![c0, 16 * c0]),
        ("4x4.dense0.bias".to_string(), vec![c0]),
        ("4x4.dense1.weight".to_string(), vec![1, c0]),
        ("4x4.dense1.bias".to_string(), vec![1]),
    ]);
    specs
}
