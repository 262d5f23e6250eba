//! A fully grown generator level with fixed weights as one candle op on the latent: the
//! fitter's case, which differentiates the texture w.r.t. `p_t` hundreds of times per photo.
//!
//! Built from candle ops, every layer's gradient would pass through autograd's bookkeeping
//! (a zero tensor and an addition per node) and every kernel would run as a separate graph
//! node. Here the forward pass keeps its pre-activations, and the backward pass runs the
//! adjoint kernels of `ops` back to back; weight gradients are never formed. The
//! candle-graph path in [`crate::Generator::forward`] remains for trained weights and fade-in,
//! and the tests check that both agree.

use crate::ops::{
    ConvDims, PIXEL_NORM_EPS, Real, bias_act_norm, contiguous, conv_forward_packed,
    conv_up_input_grad_packed, dense_forward, dense_input_grad, pack_kernel, pack_up_input_grad,
};
use crate::params::{ParamMap, RELU_GAIN, param, weight_and_scale};
use crate::{Result, TextureError};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex, OnceLock};

/// Texels per channel of the first (4x4) feature map, into which the dense output is reshaped.
const DENSE_TEXELS: usize = 16;

/// The convolution weights of a [`LatentPass`] scaled and packed for the kernels (per
/// convolution, then for toRGB: the forward packing, then the adjoint's), built on first use.
/// Packing costs about as much as a small layer, so generators whose weights cannot change
/// share one across calls; it is rebuilt per call where weights may be updated in place (a
/// trainer's variables).
pub(crate) type PackedWeights = Arc<OnceLock<Vec<CpuStorage>>>;

/// The pass `latent -> raw RGB [B, 3, R, R]` of a generator up to one level with `alpha = 1`.
pub(crate) struct LatentPass {
    /// Dense weight and bias, then weight and bias of every convolution, then toRGB's.
    tensors: Vec<Tensor>,
    dense_scale: f64,
    /// Sizes (batch filled in per call) and weight scale of every 3x3 convolution.
    convs: Vec<(ConvDims, f64)>,
    rgb_scale: f64,
    /// `(mul, add)` applied to the output (e.g. the map from `[-1, 1]` to `[0, 1]`).
    output_map: (f64, f64),
    packed: PackedWeights,
    /// Pre-activations of the dense layer and of every convolution, kept for the backward pass.
    saved: Mutex<Vec<CpuStorage>>,
}

impl LatentPass {
    /// The pass of `params` (a generator with widths `channels`) up to `level`, packing its
    /// weights into `packed` unless that already holds them (for this level).
    pub(crate) fn new(
        params: &ParamMap,
        channels: &[usize],
        level: usize,
        packed: PackedWeights,
        output_map: (f64, f64),
    ) -> Result<Self> {
        let layer = |name: &str, gain: f64| -> Result<(Tensor, Tensor, f64)> {
            let (w, scale) = weight_and_scale(params, name, gain)?;
            let bias = param(params, &format!("{name}.bias"))?;
            Ok((w.contiguous()?, bias.contiguous()?, scale))
        };
        let (dense_w, dense_b, dense_scale) = layer("4x4.dense", RELU_GAIN / 4.0)?;
        let mut tensors = vec![dense_w, dense_b];
        let mut convs = Vec::new();
        let mut push_conv = |name: String, ci: usize, co: usize, r: usize, upsample: bool| {
            let (w, b, scale) = layer(&name, RELU_GAIN)?;
            tensors.extend([w, b]);
            let dims = ConvDims {
                b: 0,
                ci,
                co,
                h: r,
                w: r,
                k: 3,
                upsample,
            };
            convs.push((dims, scale));
            Ok::<_, TextureError>(())
        };
        push_conv("4x4.conv".into(), channels[0], channels[0], 4, false)?;
        for lvl in 1..=level {
            let (prev, c, r) = (channels[lvl - 1], channels[lvl], 4 << lvl);
            push_conv(format!("{r}x{r}.conv0"), prev, c, r, true)?;
            push_conv(format!("{r}x{r}.conv1"), c, c, r, false)?;
        }
        let r = 4 << level;
        let (rgb_w, rgb_b, rgb_scale) = layer(&format!("to_rgb.{r}x{r}"), 1.0)?;
        tensors.extend([rgb_w, rgb_b]);
        Ok(Self {
            tensors,
            dense_scale,
            convs,
            rgb_scale,
            output_map,
            packed,
            saved: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` on the contiguous CPU data of every weight tensor (in `tensors` order) and on
    /// the packed convolution weights.
    fn with_weights<T: Real, R>(
        &self,
        f: impl FnOnce(&[&[T]], &[&[T]]) -> R,
    ) -> candle_core::Result<R> {
        let guards: Vec<_> = self
            .tensors
            .iter()
            .map(Tensor::storage_and_layout)
            .collect();
        let weights = guards
            .iter()
            .map(|(storage, layout)| match &**storage {
                Storage::Cpu(cpu) => contiguous::<T>(cpu, layout),
                _ => candle_core::bail!("the generator's weights must be on the CPU"),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let packed = self
            .packed
            .get_or_init(|| self.pack(&weights))
            .iter()
            .map(CpuStorage::as_slice::<T>)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(f(&weights, &packed))
    }

    /// Packs every convolution's weights for its forward pass and its adjoint.
    fn pack<T: Real>(&self, w: &[&[T]]) -> Vec<CpuStorage> {
        let mut packed = Vec::with_capacity(2 * self.convs.len() + 2);
        for (j, &(d, scale)) in self.convs.iter().enumerate() {
            let kernel = w[2 + 2 * j];
            packed.push(pack_kernel(kernel, scale, &d, false));
            packed.push(if d.upsample {
                pack_up_input_grad(kernel, scale, d)
            } else {
                pack_kernel(kernel, scale, &adjoint(d), true)
            });
        }
        let (d, kernel) = (self.output_dims(0), w[w.len() - 2]);
        packed.push(pack_kernel(kernel, self.rgb_scale, &d, false));
        packed.push(pack_kernel(kernel, self.rgb_scale, &adjoint(d), true));
        packed.into_iter().map(T::to_cpu_storage_owned).collect()
    }

    /// The last feature map's side and channels (toRGB's input).
    fn output_dims(&self, b: usize) -> ConvDims {
        let (last, _) = self.convs[self.convs.len() - 1];
        ConvDims {
            b,
            ci: last.co,
            co: 3,
            k: 1,
            upsample: false,
            ..last
        }
    }

    fn forward<T: Real>(
        &self,
        z: &[T],
        b: usize,
        w: &[&[T]],
        packed: &[&[T]],
    ) -> (Vec<T>, Vec<CpuStorage>) {
        let l = z.len() / b;
        let normalised: Vec<T> = z
            .chunks_exact(l)
            .flat_map(|row| {
                let inv = inverse_rms(row);
                row.iter().map(move |&v| v * inv)
            })
            .collect();
        let c0 = self.convs[0].0.ci;
        let dense = dense_forward(&normalised, w[0], self.dense_scale, l, DENSE_TEXELS * c0);
        let mut x = bias_act_norm(&dense, w[1], None, DENSE_TEXELS);
        let mut saved = vec![T::to_cpu_storage_owned(dense)];
        for (j, &(dims, _)) in self.convs.iter().enumerate() {
            let d = ConvDims { b, ..dims };
            let pre = conv_forward_packed(&x, packed[2 * j], d);
            x = bias_act_norm(&pre, w[3 + 2 * j], None, d.h * d.w);
            saved.push(T::to_cpu_storage_owned(pre));
        }
        let d = self.output_dims(b);
        let mut rgb = conv_forward_packed(&x, packed[packed.len() - 2], d);
        let (mul, add) = (
            T::from_f64(self.output_map.0),
            T::from_f64(self.output_map.1),
        );
        for (plane, &bias) in rgb
            .chunks_exact_mut(d.h * d.w)
            .zip(w[w.len() - 1].iter().cycle())
        {
            let shift = bias * mul + add;
            plane.iter_mut().for_each(|v| *v = *v * mul + shift);
        }
        (rgb, saved)
    }

    fn backward<T: Real>(
        &self,
        z: &[T],
        grad: &[T],
        saved: &[CpuStorage],
        w: &[&[T]],
        packed: &[&[T]],
    ) -> candle_core::Result<Vec<T>> {
        let l = self.tensors[0].dim(1)?;
        let b = z.len() / l;
        let rgb_adjoint = adjoint(self.output_dims(b));
        let mul = T::from_f64(self.output_map.0);
        let grad: Vec<T> = grad.iter().map(|&g| g * mul).collect();
        let mut g = conv_forward_packed(&grad, packed[packed.len() - 1], rgb_adjoint);
        for (j, &(dims, _)) in self.convs.iter().enumerate().rev() {
            let d = ConvDims { b, ..dims };
            let pre = saved[j + 1].as_slice::<T>()?;
            let g_pre = bias_act_norm(pre, w[3 + 2 * j], Some(&g), d.h * d.w);
            g = if d.upsample {
                conv_up_input_grad_packed(&g_pre, packed[2 * j + 1], d)
            } else {
                conv_forward_packed(&g_pre, packed[2 * j + 1], adjoint(d))
            };
        }
        let g_dense = bias_act_norm(saved[0].as_slice::<T>()?, w[1], Some(&g), DENSE_TEXELS);
        let g_normalised = dense_input_grad(&g_dense, w[0], self.dense_scale, l);
        // Pixel norm's adjoint: with n = z * inv, dL/dz = inv * g - z * inv^3 * mean(g * z).
        let mut g_z = Vec::with_capacity(z.len());
        for (row, g_row) in z.chunks_exact(l).zip(g_normalised.chunks_exact(l)) {
            let inv = inverse_rms(row);
            let mean_gz = row
                .iter()
                .zip(g_row)
                .fold(T::zero(), |sum, (&v, &g)| sum + v * g)
                / T::from_f64(l as f64);
            let coef = inv * inv * inv * mean_gz;
            g_z.extend(row.iter().zip(g_row).map(|(&v, &g)| inv * g - v * coef));
        }
        Ok(g_z)
    }
}

/// The sizes of a same-size convolution's adjoint (inputs and outputs swapped).
fn adjoint(d: ConvDims) -> ConvDims {
    ConvDims {
        ci: d.co,
        co: d.ci,
        ..d
    }
}

/// `1 / sqrt(mean(v^2) + eps)`, pixel normalisation's factor for one latent.
fn inverse_rms<T: Real>(v: &[T]) -> T {
    let mean_sq = v.iter().fold(T::zero(), |sum, &x| sum + x * x) / T::from_f64(v.len() as f64);
    (mean_sq + T::from_f64(PIXEL_NORM_EPS)).sqrt().recip()
}

impl CustomOp1 for LatentPass {
    fn name(&self) -> &'static str {
        "generator-latent-pass"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, _) = layout.shape().dims2()?;
        let (rgb, saved) = match storage {
            CpuStorage::F32(_) => {
                let z = contiguous::<f32>(storage, layout)?;
                let (rgb, saved) = self.with_weights(|w, packed| self.forward(z, b, w, packed))?;
                (CpuStorage::F32(rgb), saved)
            }
            CpuStorage::F64(_) => {
                let z = contiguous::<f64>(storage, layout)?;
                let (rgb, saved) = self.with_weights(|w, packed| self.forward(z, b, w, packed))?;
                (CpuStorage::F64(rgb), saved)
            }
            _ => candle_core::bail!("the generator computes in f32 or f64"),
        };
        *self.saved.lock().expect("no panics while holding the lock") = saved;
        let r = self.output_dims(b).h;
        Ok((rgb, Shape::from((b, 3, r, r))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (z, grad) = (arg.contiguous()?, grad_res.contiguous()?);
        let (z_storage, z_layout) = z.storage_and_layout();
        let (g_storage, g_layout) = grad.storage_and_layout();
        let saved = self.saved.lock().expect("no panics while holding the lock");
        let (shape, device) = (arg.shape(), arg.device());
        let grad_z = match (&*z_storage, &*g_storage) {
            (Storage::Cpu(zs @ CpuStorage::F32(_)), Storage::Cpu(gs)) => {
                let (z, g) = (
                    contiguous::<f32>(zs, z_layout)?,
                    contiguous::<f32>(gs, g_layout)?,
                );
                let grad =
                    self.with_weights(|w, packed| self.backward(z, g, &saved, w, packed))??;
                Tensor::from_vec(grad, shape, device)?
            }
            (Storage::Cpu(zs @ CpuStorage::F64(_)), Storage::Cpu(gs)) => {
                let (z, g) = (
                    contiguous::<f64>(zs, z_layout)?,
                    contiguous::<f64>(gs, g_layout)?,
                );
                let grad =
                    self.with_weights(|w, packed| self.backward(z, g, &saved, w, packed))??;
                Tensor::from_vec(grad, shape, device)?
            }
            _ => candle_core::bail!(
                "the generator's latent gradient is computed on the CPU in f32 or f64"
            ),
        };
        Ok(Some(grad_z))
    }
}
