//! Building blocks shared by the two MediaPipe networks, with TensorFlow Lite's semantics
//! (SAME padding puts the odd extra row and column after, not before).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{FaceError, Result};

/// The tensors of one converted weights file (see tools/convert/mediapipe_tflite_to_safetensors.py
/// for the names and layouts).
pub(crate) struct Weights {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

impl Weights {
    pub(crate) fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| FaceError::Weights {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            tensors,
            path: path.to_path_buf(),
        })
    }

    fn error(&self, reason: String) -> FaceError {
        FaceError::Weights {
            path: self.path.clone(),
            reason,
        }
    }

    /// The tensor `name`, checked to have `rank` dimensions.
    fn get(&self, name: &str, rank: usize) -> Result<Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| self.error(format!("no tensor `{name}`")))?;
        if tensor.rank() != rank {
            return Err(self.error(format!(
                "`{name}` has shape {:?}, expected {rank} dimensions",
                tensor.dims()
            )));
        }
        Ok(tensor.clone())
    }
}

/// Applies `f` to `x` `[N, C, H, W]` viewed as `[N, C, H·W]`, so that per-channel `[C, 1]`
/// operands broadcast over one contiguous axis: candle's broadcasting over `[1, C, 1, 1]` took
/// 3.4 ms against 0.1 ms for a 16×96×96 map on this project's 2-core test machine.
fn per_channel(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(f(&x.reshape((n, c, h * w))?)?.reshape((n, c, h, w))?)
}

/// How a convolution pads its input, as TensorFlow Lite defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Padding {
    /// Output size `ceil(input / stride)`; the odd extra zero row/column goes after.
    Same,
    /// No padding.
    Valid,
}

/// Zero rows (before, after) that SAME padding adds along an axis.
fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// A 2-d convolution with bias; depthwise when its weight is `[channels, 1, kh, kw]` and it was
/// loaded with [`Conv::depthwise`].
pub(crate) struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: Padding,
    groups: usize,
}

impl Conv {
    /// A full convolution, weight `[out, in, kh, kw]`.
    pub(crate) fn new(w: &Weights, layer: &str, stride: usize, padding: Padding) -> Result<Self> {
        Self::load(w, layer, stride, padding, false)
    }

    /// A depthwise convolution, weight `[channels, 1, kh, kw]`.
    pub(crate) fn depthwise(w: &Weights, layer: &str, stride: usize) -> Result<Self> {
        Self::load(w, layer, stride, Padding::Same, true)
    }

    fn load(
        w: &Weights,
        layer: &str,
        stride: usize,
        padding: Padding,
        depthwise: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{layer}.weight"), 4)?;
        let out = weight.dim(0)?;
        let bias = w.get(&format!("{layer}.bias"), 1)?.reshape((out, 1))?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            groups: if depthwise { out } else { 1 },
        })
    }

    pub(crate) fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub(crate) fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.groups > 1 && x.device().is_cpu() {
            let (kh, kw) = (self.weight.dims()[2], self.weight.dims()[3]);
            let op = DepthwiseConv {
                stride: self.stride,
                rows: same_padding(x.dim(2)?, kh, self.stride),
                columns: same_padding(x.dim(3)?, kw, self.stride),
            };
            let y = x.contiguous()?.apply_op2_no_bwd(&self.weight, &op)?;
            return per_channel(&y, |y| y.broadcast_add(&self.bias));
        }
        let x = match self.padding {
            Padding::Valid => x.clone(),
            Padding::Same => {
                let (kh, kw) = (self.weight.dims()[2], self.weight.dims()[3]);
                let (top, bottom) = same_padding(x.dim(2)?, kh, self.stride);
                let (left, right) = same_padding(x.dim(3)?, kw, self.stride);
                x.pad_with_zeros(2, top, bottom)?
                    .pad_with_zeros(3, left, right)?
            }
        };
        let (out, inputs, kh, kw) = self.weight.dims4()?;
        if (kh, kw, self.stride, self.groups) == (1, 1, 1, 1) {
            // A pointwise convolution is a matrix product; candle's im2col path took 1.0 ms
            // against 0.2 ms for a 16×96×96 map.
            let (n, _, h, w) = x.dims4()?;
            let y = self
                .weight
                .reshape((1, out, inputs))?
                .broadcast_as((n, out, inputs))?
                .matmul(&x.reshape((n, inputs, h * w))?)?
                .broadcast_add(&self.bias)?;
            return Ok(y.reshape((n, out, h, w))?);
        }
        let y = x.conv2d(&self.weight, 0, self.stride, 1, self.groups)?;
        per_channel(&y, |y| y.broadcast_add(&self.bias))
    }
}

/// Depthwise convolution with explicit zero padding, for inference on the CPU: candle runs a
/// grouped convolution as one convolution per channel, which made the detector 3× slower.
/// There is no backward pass; nothing differentiates through the detector or landmarker.
struct DepthwiseConv {
    stride: usize,
    /// Zero rows (before, after).
    rows: (usize, usize),
    /// Zero columns (before, after).
    columns: (usize, usize),
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let contiguous =
            |storage: &'_ CpuStorage, layout: &Layout| -> candle_core::Result<Vec<f32>> {
                let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("depthwise-conv2d needs contiguous tensors".into())
                })?;
                match storage {
                    CpuStorage::F32(v) => Ok(v[start..end].to_vec()),
                    _ => Err(candle_core::Error::Msg(
                        "depthwise-conv2d runs on f32".into(),
                    )),
                }
            };
        let (batch, channels, height, width) = input_layout.shape().dims4()?;
        let (kernel_channels, _, kh, kw) = kernel_layout.shape().dims4()?;
        if kernel_channels != channels {
            candle_core::bail!(
                "depthwise-conv2d: {channels} channels but {kernel_channels} kernels"
            );
        }
        let x = contiguous(input, input_layout)?;
        let k = contiguous(kernel, kernel_layout)?;
        let out_h = (height + self.rows.0 + self.rows.1 - kh) / self.stride + 1;
        let out_w = (width + self.columns.0 + self.columns.1 - kw) / self.stride + 1;
        let mut out = vec![0f32; batch * channels * out_h * out_w];
        out.par_chunks_mut(out_h * out_w)
            .enumerate()
            .for_each(|(plane, o)| {
                let x = &x[plane * height * width..(plane + 1) * height * width];
                let k = &k[(plane % channels) * kh * kw..][..kh * kw];
                for oy in 0..out_h {
                    for ox in 0..out_w {
                        let mut sum = 0f32;
                        for ky in 0..kh {
                            let Some(iy) = (oy * self.stride + ky).checked_sub(self.rows.0) else {
                                continue;
                            };
                            if iy >= height {
                                continue;
                            }
                            for kx in 0..kw {
                                let Some(ix) = (ox * self.stride + kx).checked_sub(self.columns.0)
                                else {
                                    continue;
                                };
                                if ix < width {
                                    sum += x[iy * width + ix] * k[ky * kw + kx];
                                }
                            }
                        }
                        o[oy * out_w + ox] = sum;
                    }
                }
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, channels, out_h, out_w)),
        ))
    }
}

/// The nonlinearity after each block.
pub(crate) enum Activation {
    Relu,
    /// Per-channel PReLU slopes, shaped `[C, 1]`.
    PRelu(Tensor),
}

impl Activation {
    pub(crate) fn prelu(w: &Weights, layer: &str) -> Result<Self> {
        let alpha = w.get(&format!("{layer}.alpha"), 1)?;
        let channels = alpha.dim(0)?;
        Ok(Self::PRelu(alpha.reshape((channels, 1))?))
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Relu => x.relu()?,
            Self::PRelu(alpha) => {
                per_channel(x, |x| x.relu()? + x.minimum(0f32)?.broadcast_mul(alpha)?)?
            }
        })
    }
}

/// BlazeBlock: depthwise 3×3 then pointwise 1×1, added to a shortcut that is max-pooled when
/// the block strides and zero-padded in channels when it widens, then the activation.
pub(crate) struct Residual {
    depthwise: Conv,
    pointwise: Conv,
    activation: Activation,
    stride: usize,
}

impl Residual {
    pub(crate) fn new(
        w: &Weights,
        depthwise: &str,
        pointwise: &str,
        stride: usize,
        activation: Activation,
    ) -> Result<Self> {
        let block = Self {
            depthwise: Conv::depthwise(w, depthwise, stride)?,
            pointwise: Conv::new(w, pointwise, 1, Padding::Valid)?,
            activation,
            stride,
        };
        if block.pointwise.in_channels() != block.depthwise.out_channels()
            || block.pointwise.out_channels() < block.depthwise.out_channels()
        {
            return Err(w.error(format!(
                "`{depthwise}` and `{pointwise}` do not form a residual block"
            )));
        }
        Ok(block)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branch = self.pointwise.forward(&self.depthwise.forward(x)?)?;
        let shortcut = if self.stride == 2 {
            x.max_pool2d(2)?
        } else {
            x.clone()
        };
        let extra = self.pointwise.out_channels() - self.depthwise.out_channels();
        let shortcut = shortcut.pad_with_zeros(1, 0, extra)?;
        self.activation.forward(&(branch + shortcut)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depthwise_kernel_matches_candles_grouped_convolution() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 9, 8), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (5, 1, 3, 3), &device).unwrap();
        for stride in [1, 2] {
            let rows = same_padding(9, 3, stride);
            let columns = same_padding(8, 3, stride);
            let ours = x
                .apply_op2_no_bwd(
                    &k,
                    &DepthwiseConv {
                        stride,
                        rows,
                        columns,
                    },
                )
                .unwrap();
            let padded = x
                .pad_with_zeros(2, rows.0, rows.1)
                .unwrap()
                .pad_with_zeros(3, columns.0, columns.1)
                .unwrap();
            let reference = padded.conv2d(&k, 0, stride, 1, 5).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let error = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(error.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    #[test]
    fn same_padding_puts_the_odd_row_after() {
        assert_eq!(same_padding(128, 5, 2), (1, 2));
        assert_eq!(same_padding(64, 3, 2), (0, 1));
        assert_eq!(same_padding(6, 3, 2), (0, 1));
        assert_eq!(same_padding(64, 3, 1), (1, 1));
        assert_eq!(same_padding(3, 3, 1), (1, 1));
    }
}
