//! Fused CPU kernels for vertex normals, normalisation and spherical-harmonic shading: one pass over the
//! pixels instead of a dozen image-sized candle temporaries (and their backward passes).
//!
//! The candle tensor-op versions in [`crate::shading`] define the semantics (they also run on
//! other devices); the unit tests below compare the two on outputs and on vector-Jacobian
//! products, and check these backward passes against central finite differences in f64.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use num_traits::{One, Zero};
use rayon::prelude::*;

use crate::kernel::{
    PIXEL_CHUNK, Real, cpu_tensor, cross, data, dispatch_float, dot, min_tasks, tracked, with_data,
};
use crate::triangles::Triangles;

/// `v / sqrt(|v|² + eps)` along the last dim.
pub(crate) struct Normalize {
    pub(crate) eps: f64,
}

impl Normalize {
    fn forward<T: Real>(&self, v: &[T], c: usize) -> Vec<T> {
        let eps = T::of(self.eps);
        let mut out = vec![T::zero(); v.len()];
        out.par_chunks_mut(PIXEL_CHUNK * c.max(1))
            .zip(v.par_chunks(PIXEL_CHUNK * c))
            .with_min_len(min_tasks())
            .for_each(|(out, v)| {
                for (o, v) in out.chunks_exact_mut(c).zip(v.chunks_exact(c)) {
                    let norm = (v.iter().fold(T::zero(), |a, &x| a + x * x) + eps).sqrt();
                    o.iter_mut().zip(v).for_each(|(o, &x)| *o = x / norm);
                }
            });
        out
    }
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "ganfit-normalize"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        dispatch_float!(storage, T => {
            let out = self.forward::<T>(data(storage, layout)?, c);
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::normalize(self.eps, storage, layout)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(&grad.contiguous()?, &NormalizeGrad { eps: self.eps })?;
        Ok(Some(grad))
    }
}

/// Vector-Jacobian product of [`Normalize`]: (v, d out) -> d v = g / r - v (v · g) / r³.
struct NormalizeGrad {
    eps: f64,
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "ganfit-normalize-grad"
    }

    fn cpu_fwd(
        &self,
        v: &CpuStorage,
        v_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = v_l.shape().dims().last().copied().unwrap_or(1).max(1);
        dispatch_float!(v, T => {
            let (v, g) = (data::<T>(v, v_l)?, data::<T>(g, g_l)?);
            let eps = T::of(self.eps);
            let mut out = vec![T::zero(); v.len()];
            out.par_chunks_mut(PIXEL_CHUNK * c.max(1))
                .zip(v.par_chunks(PIXEL_CHUNK * c).zip(g.par_chunks(PIXEL_CHUNK * c)))
                .with_min_len(min_tasks())
                .for_each(|(out, (v, g))| {
                    for ((o, v), g) in out.chunks_exact_mut(c).zip(v.chunks_exact(c)).zip(g.chunks_exact(c)) {
                        let sq = v.iter().fold(T::zero(), |a, &x| a + x * x) + eps;
                        let inv = T::one() / sq.sqrt();
                        let vg = v.iter().zip(g).fold(T::zero(), |a, (&x, &y)| a + x * y);
                        let along = vg * inv / sq;
                        for ((o, &x), &y) in o.iter_mut().zip(v).zip(g) {
                            *o = y * inv - x * along;
                        }
                    }
                });
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), v_l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
        g: &candle_core::CudaStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::normalize_grad(self.eps, (v, v_l), (g, g_l))
    }
}

/// Band constants of [`crate::sh_irradiance_basis`] (see there), per basis function.
pub(crate) struct ShBands {
    pub(crate) dc: f64,
    pub(crate) linear: f64,
    pub(crate) cross: f64,
    pub(crate) zonal: f64,
    pub(crate) square: f64,
}

impl ShBands {
    /// The nine basis values at unit normal `n`.
    fn basis<T: Real>(&self, [x, y, z]: [T; 3]) -> [T; 9] {
        let (lin, cross) = (T::of(self.linear), T::of(self.cross));
        [
            T::of(self.dc),
            lin * y,
            lin * z,
            lin * x,
            cross * (x * y),
            cross * (y * z),
            T::of(self.zonal) * (T::of(3.0) * z * z - T::one()),
            cross * (x * z),
            T::of(self.square) * (x * x - y * y),
        ]
    }

    /// Gradient of `Σ_k l_k basis_k(n)` with respect to `n`.
    fn irradiance_gradient<T: Real>(&self, l: &[T], [x, y, z]: [T; 3]) -> [T; 3] {
        let (lin, cross) = (T::of(self.linear), T::of(self.cross));
        let (zonal6, square2) = (T::of(6.0 * self.zonal), T::of(2.0 * self.square));
        [
            lin * l[3] + cross * (l[4] * y + l[7] * z) + square2 * l[8] * x,
            lin * l[1] + cross * (l[4] * x + l[5] * z) - square2 * l[8] * y,
            lin * l[2] + cross * (l[5] * y + l[7] * x) + zonal6 * l[6] * z,
        ]
    }
}

/// `(batch, pixels per image, channels)` of per-pixel values `[B, .., C]` (`[B, N, C]` or
/// `[B, H, W, C]`: the shading kernels take images without a reshape).
fn pixel_dims(shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    match shape.dims() {
        [batch, pixels @ .., channels] if !pixels.is_empty() => {
            Ok((*batch, pixels.iter().product(), *channels))
        }
        _ => candle_core::bail!("shading takes [B, N, C] or [B, H, W, C] values, got {shape:?}"),
    }
}

/// `albedo ⊙ (basis(n) · coeffsᵀ)` for albedo `[B, N, C]`, normals `[B, N, 3]`, coeffs
/// `[B, C, 9]`.
pub(crate) struct ShadeSh {
    pub(crate) bands: ShBands,
    /// Normalise the normals first, as [`Normalize`] with this `eps` does (CPU only): the
    /// renderer's interpolated normals then reach the shading without an image-sized gradient
    /// buffer and sum between two ops in candle's backward pass.
    pub(crate) normalize: Option<f64>,
}

/// Sizes of a shading call.
#[derive(Clone, Copy)]
struct ShDims {
    batch: usize,
    pixels: usize,
    channels: usize,
}

impl ShDims {
    fn of(albedo: &Shape) -> candle_core::Result<Self> {
        let (batch, pixels, channels) = pixel_dims(albedo)?;
        Ok(Self {
            batch,
            pixels,
            channels,
        })
    }
}

/// [`Normalize`]'s arithmetic on one 3-vector.
fn normalize3<T: Real>(v: [T; 3], eps: T) -> [T; 3] {
    let norm = (v.iter().fold(T::zero(), |a, &x| a + x * x) + eps).sqrt();
    v.map(|x| x / norm)
}

/// [`NormalizeGrad`]'s arithmetic on one 3-vector `v` with output gradient `g`.
fn normalize_grad3<T: Real>(v: [T; 3], g: [T; 3], eps: T) -> [T; 3] {
    let sq = v.iter().fold(T::zero(), |a, &x| a + x * x) + eps;
    let inv = T::one() / sq.sqrt();
    let vg = v.iter().zip(&g).fold(T::zero(), |a, (&x, &y)| a + x * y);
    let along = vg * inv / sq;
    [0, 1, 2].map(|i| g[i] * inv - v[i] * along)
}

impl ShadeSh {
    /// The unit normal the shading uses for normal `n` as given.
    fn unit<T: Real>(&self, n: [T; 3]) -> [T; 3] {
        match self.normalize {
            None => n,
            Some(eps) => normalize3(n, T::of(eps)),
        }
    }

    fn forward<T: Real>(&self, albedo: &[T], normals: &[T], coeffs: &[T], d: ShDims) -> Vec<T> {
        let c = d.channels;
        let mut out = vec![T::zero(); albedo.len()];
        for b in 0..d.batch {
            let l = &coeffs[b * c * 9..(b + 1) * c * 9];
            let image = b * d.pixels..(b + 1) * d.pixels;
            let out = &mut out[image.start * c..image.end * c];
            let albedo = &albedo[image.start * c..image.end * c];
            let normals = &normals[image.start * 3..image.end * 3];
            out.par_chunks_mut(PIXEL_CHUNK * c.max(1))
                .zip(albedo.par_chunks(PIXEL_CHUNK * c.max(1)))
                .zip(normals.par_chunks(PIXEL_CHUNK * 3))
                .with_min_len(min_tasks())
                .for_each(|((out, albedo), normals)| {
                    for ((o, a), n) in out
                        .chunks_exact_mut(c)
                        .zip(albedo.chunks_exact(c))
                        .zip(normals.chunks_exact(3))
                    {
                        let basis = self.bands.basis(self.unit([n[0], n[1], n[2]]));
                        for ch in 0..c {
                            let lc = &l[ch * 9..ch * 9 + 9];
                            let irradiance =
                                (0..9).fold(T::zero(), |acc, k| acc + lc[k] * basis[k]);
                            o[ch] = a[ch] * irradiance;
                        }
                    }
                });
        }
        out
    }

    /// Gradients to albedo, normals and coefficients in one sweep.
    fn sh_backward<T: Real>(
        &self,
        albedo: &[T],
        normals: &[T],
        coeffs: &[T],
        grad: &[T],
        d: ShDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let c = d.channels;
        let mut g_albedo = vec![T::zero(); albedo.len()];
        let mut g_normals = vec![T::zero(); normals.len()];
        let mut g_coeffs = vec![T::zero(); coeffs.len()];
        for b in 0..d.batch {
            let l = &coeffs[b * c * 9..(b + 1) * c * 9];
            let image = b * d.pixels..(b + 1) * d.pixels;
            let px = |s: usize| image.start * s..image.end * s;
            let (albedo, normals, grad) = (&albedo[px(c)], &normals[px(3)], &grad[px(c)]);
            let sums = g_albedo[px(c)]
                .par_chunks_mut(PIXEL_CHUNK * c.max(1))
                .zip(g_normals[px(3)].par_chunks_mut(PIXEL_CHUNK * 3))
                .zip(albedo.par_chunks(PIXEL_CHUNK * c.max(1)))
                .zip(normals.par_chunks(PIXEL_CHUNK * 3))
                .zip(grad.par_chunks(PIXEL_CHUNK * c.max(1)))
                .with_min_len(min_tasks())
                .map(|((((ga, gn), albedo), normals), grad)| {
                    let mut gl = vec![T::zero(); c * 9];
                    for ((((ga, gn), a), n), g) in ga
                        .chunks_exact_mut(c)
                        .zip(gn.chunks_exact_mut(3))
                        .zip(albedo.chunks_exact(c))
                        .zip(normals.chunks_exact(3))
                        .zip(grad.chunks_exact(c))
                    {
                        // Pixels the loss ignores (e.g. masked background) contribute nothing.
                        if g.iter().all(|&g| g == T::zero()) {
                            continue;
                        }
                        let given = [n[0], n[1], n[2]];
                        let n = self.unit(given);
                        let basis = self.bands.basis(n);
                        // The irradiance is linear in the coefficients, so the normal's gradient
                        // is that of one irradiance with the channels' coefficients combined.
                        let mut combined = [T::zero(); 9];
                        for ch in 0..c {
                            let lc = &l[ch * 9..ch * 9 + 9];
                            let irradiance =
                                (0..9).fold(T::zero(), |acc, k| acc + lc[k] * basis[k]);
                            ga[ch] = g[ch] * irradiance;
                            let t = g[ch] * a[ch];
                            for k in 0..9 {
                                gl[ch * 9 + k] += t * basis[k];
                                combined[k] += t * lc[k];
                            }
                        }
                        let g_unit = self.bands.irradiance_gradient(&combined, n);
                        gn.copy_from_slice(&match self.normalize {
                            None => g_unit,
                            Some(eps) => normalize_grad3(given, g_unit, T::of(eps)),
                        });
                    }
                    gl
                })
                .reduce(|| vec![T::zero(); c * 9], crate::kernel::add_into);
            g_coeffs[b * c * 9..(b + 1) * c * 9].copy_from_slice(&sums);
        }
        (g_albedo, g_normals, g_coeffs)
    }
}

impl CustomOp3 for ShadeSh {
    fn name(&self) -> &'static str {
        "ganfit-shade-sh"
    }

    fn cpu_fwd(
        &self,
        albedo: &CpuStorage,
        albedo_l: &Layout,
        normals: &CpuStorage,
        normals_l: &Layout,
        coeffs: &CpuStorage,
        coeffs_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = ShDims::of(albedo_l.shape())?;
        dispatch_float!(albedo, T => {
            let out = self.forward::<T>(
                data(albedo, albedo_l)?, data(normals, normals_l)?, data(coeffs, coeffs_l)?, d,
            );
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), albedo_l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        albedo: &candle_core::CudaStorage,
        albedo_l: &Layout,
        normals: &candle_core::CudaStorage,
        normals_l: &Layout,
        coeffs: &candle_core::CudaStorage,
        coeffs_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if self.normalize.is_some() {
            candle_core::bail!(
                "ganfit-render: shading with built-in normalisation runs on the CPU"
            );
        }
        let inputs = [(albedo, albedo_l), (normals, normals_l), (coeffs, coeffs_l)];
        crate::cuda::shade(crate::cuda::Shading::sh(&self.bands), inputs)
    }

    fn bwd(
        &self,
        albedo: &Tensor,
        normals: &Tensor,
        coeffs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if albedo.device().is_cuda() {
            let inputs = [albedo, normals, coeffs];
            let shading = crate::cuda::Shading::sh(&self.bands);
            let (ga, gn, gc) = crate::cuda::shade_grads(shading, inputs, grad)?;
            return Ok((
                tracked(albedo, ga),
                tracked(normals, gn),
                tracked(coeffs, gc),
            ));
        }
        fused_backward(
            self,
            [albedo, normals, coeffs],
            grad,
            ShDims::of(albedo.shape())?,
        )
    }
}

/// Phong shading (see [`crate::shade_phong`]) for albedo `[B, N, 3]`, geometry `[B, N, 3]`
/// (unit normals) or `[B, N, 6]` (unit normals, then unit view vectors: only the specular term
/// needs them) and light `[B, 9]` (unit direction towards the light, colour, ambient).
pub(crate) struct ShadePhong {
    pub(crate) specular: f64,
    pub(crate) shininess: f64,
}

/// Sizes of a Phong call: pixels per image and the geometry's floats per pixel (3 or 6).
#[derive(Clone, Copy)]
struct PhongDims {
    batch: usize,
    pixels: usize,
    stride: usize,
}

impl PhongDims {
    fn of(albedo: &Shape, geometry: &Shape) -> candle_core::Result<Self> {
        let (batch, pixels, _) = pixel_dims(albedo)?;
        Ok(Self {
            batch,
            pixels,
            stride: pixel_dims(geometry)?.2,
        })
    }
}

/// One pixel's light-dependent factors.
struct PhongPixel<T> {
    n: [T; 3],
    v: [T; 3],
    n_dot_l: T,
    /// `r · v` with `r = 2 (n · l) n - l`.
    r_dot_v: T,
    /// `max(0, n · l)` and `specular · max(0, r · v)^shininess`.
    diffuse: T,
    lobe: T,
}

/// `max(x, 0)`.
fn positive<T: Real>(x: T) -> T {
    if x > T::zero() { x } else { T::zero() }
}

impl ShadePhong {
    fn pixel<T: Real>(&self, geometry: &[T], l: [T; 3]) -> PhongPixel<T> {
        let n = [geometry[0], geometry[1], geometry[2]];
        let n_dot_l = dot(n, l);
        let diffuse = positive(n_dot_l);
        if self.specular == 0.0 {
            let zero = T::zero();
            return PhongPixel {
                n,
                v: [zero; 3],
                n_dot_l,
                r_dot_v: zero,
                diffuse,
                lobe: zero,
            };
        }
        let v = [geometry[3], geometry[4], geometry[5]];
        let r_dot_v = T::of(2.0) * n_dot_l * dot(n, v) - dot(l, v);
        let lobe = T::of(self.specular) * positive(r_dot_v).powf(T::of(self.shininess));
        PhongPixel {
            n,
            v,
            n_dot_l,
            r_dot_v,
            diffuse,
            lobe,
        }
    }

    fn forward<T: Real>(&self, albedo: &[T], geometry: &[T], light: &[T], d: PhongDims) -> Vec<T> {
        let mut out = vec![T::zero(); albedo.len()];
        for b in 0..d.batch {
            let px = |s: usize| b * d.pixels * s..(b + 1) * d.pixels * s;
            let light = &light[b * 9..(b + 1) * 9];
            let l = [light[0], light[1], light[2]];
            out[px(3)]
                .par_chunks_mut(PIXEL_CHUNK * 3)
                .zip(albedo[px(3)].par_chunks(PIXEL_CHUNK * 3))
                .zip(geometry[px(d.stride)].par_chunks(PIXEL_CHUNK * d.stride))
                .with_min_len(min_tasks())
                .for_each(|((out, albedo), geometry)| {
                    for ((o, a), g) in out
                        .chunks_exact_mut(3)
                        .zip(albedo.chunks_exact(3))
                        .zip(geometry.chunks_exact(d.stride))
                    {
                        let p = self.pixel(g, l);
                        for c in 0..3 {
                            let (color, ambient) = (light[3 + c], light[6 + c]);
                            o[c] = a[c] * (ambient + color * p.diffuse) + color * p.lobe;
                        }
                    }
                });
        }
        out
    }

    /// Gradients to albedo, geometry and light in one sweep.
    fn phong_backward<T: Real>(
        &self,
        albedo: &[T],
        geometry: &[T],
        light: &[T],
        grad: &[T],
        d: PhongDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let mut g_albedo = vec![T::zero(); albedo.len()];
        let mut g_geometry = vec![T::zero(); geometry.len()];
        let mut g_light = vec![T::zero(); light.len()];
        let k = T::of(self.shininess);
        for b in 0..d.batch {
            let px = |s: usize| b * d.pixels * s..(b + 1) * d.pixels * s;
            let light = &light[b * 9..(b + 1) * 9];
            let l = [light[0], light[1], light[2]];
            let color = [light[3], light[4], light[5]];
            let ambient = [light[6], light[7], light[8]];
            let sums = g_albedo[px(3)]
                .par_chunks_mut(PIXEL_CHUNK * 3)
                .zip(g_geometry[px(d.stride)].par_chunks_mut(PIXEL_CHUNK * d.stride))
                .zip(albedo[px(3)].par_chunks(PIXEL_CHUNK * 3))
                .zip(geometry[px(d.stride)].par_chunks(PIXEL_CHUNK * d.stride))
                .zip(grad[px(3)].par_chunks(PIXEL_CHUNK * 3))
                .with_min_len(min_tasks())
                .map(|((((ga, gg), albedo), geometry), grad)| {
                    // Gradients to l, colour and ambient.
                    let mut gl = [T::zero(); 9];
                    for ((((ga, gg), a), geo), g) in ga
                        .chunks_exact_mut(3)
                        .zip(gg.chunks_exact_mut(d.stride))
                        .zip(albedo.chunks_exact(3))
                        .zip(geometry.chunks_exact(d.stride))
                        .zip(grad.chunks_exact(3))
                    {
                        // Pixels the loss ignores (e.g. masked background) contribute nothing.
                        if g.iter().all(|&g| g == T::zero()) {
                            continue;
                        }
                        let p = self.pixel(geo, l);
                        let (mut g_diffuse, mut g_lobe) = (T::zero(), T::zero());
                        for c in 0..3 {
                            ga[c] = g[c] * (ambient[c] + color[c] * p.diffuse);
                            gl[3 + c] += g[c] * (a[c] * p.diffuse + p.lobe);
                            gl[6 + c] += g[c] * a[c];
                            g_diffuse += g[c] * a[c] * color[c];
                            g_lobe += g[c] * color[c];
                        }
                        let mut g_n_dot_l = if p.n_dot_l > T::zero() {
                            g_diffuse
                        } else {
                            T::zero()
                        };
                        if p.r_dot_v > T::zero() && self.specular != 0.0 {
                            // d lobe / d (r · v) = specular · k (r · v)^(k - 1).
                            let g_rv =
                                g_lobe * T::of(self.specular) * k * p.r_dot_v.powf(k - T::one());
                            // r · v = 2 (n · l)(n · v) - l · v.
                            let (n_dot_v, two) = (dot(p.n, p.v), T::of(2.0));
                            g_n_dot_l += g_rv * two * n_dot_v;
                            let g_n_dot_v = g_rv * two * p.n_dot_l;
                            for i in 0..3 {
                                gg[3 + i] = g_n_dot_v * p.n[i] - g_rv * l[i];
                                gg[i] = g_n_dot_v * p.v[i];
                                gl[i] += -g_rv * p.v[i];
                            }
                        }
                        for i in 0..3 {
                            gg[i] += g_n_dot_l * l[i];
                            gl[i] += g_n_dot_l * p.n[i];
                        }
                    }
                    gl
                })
                .reduce(
                    || [T::zero(); 9],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                        a
                    },
                );
            g_light[b * 9..(b + 1) * 9].copy_from_slice(&sums);
        }
        (g_albedo, g_geometry, g_light)
    }
}

impl CustomOp3 for ShadePhong {
    fn name(&self) -> &'static str {
        "ganfit-shade-phong"
    }

    fn cpu_fwd(
        &self,
        albedo: &CpuStorage,
        albedo_l: &Layout,
        geometry: &CpuStorage,
        geometry_l: &Layout,
        light: &CpuStorage,
        light_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = PhongDims::of(albedo_l.shape(), geometry_l.shape())?;
        dispatch_float!(albedo, T => {
            let out = self.forward::<T>(
                data(albedo, albedo_l)?, data(geometry, geometry_l)?, data(light, light_l)?, d,
            );
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), albedo_l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        albedo: &candle_core::CudaStorage,
        albedo_l: &Layout,
        geometry: &candle_core::CudaStorage,
        geometry_l: &Layout,
        light: &candle_core::CudaStorage,
        light_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [(albedo, albedo_l), (geometry, geometry_l), (light, light_l)];
        let shading = crate::cuda::Shading::phong(self.specular, self.shininess);
        crate::cuda::shade(shading, inputs)
    }

    fn bwd(
        &self,
        albedo: &Tensor,
        geometry: &Tensor,
        light: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if albedo.device().is_cuda() {
            let shading = crate::cuda::Shading::phong(self.specular, self.shininess);
            let (ga, gg, gl) = crate::cuda::shade_grads(shading, [albedo, geometry, light], grad)?;
            return Ok((
                tracked(albedo, ga),
                tracked(geometry, gg),
                tracked(light, gl),
            ));
        }
        let d = PhongDims::of(albedo.shape(), geometry.shape())?;
        fused_backward(self, [albedo, geometry, light], grad, d)
    }
}

/// A shading kernel whose backward sweep gives the gradients of its three inputs at once.
trait ThreeInputBackward {
    type Dims: Copy;
    fn backward<T: Real>(
        &self,
        inputs: [&[T]; 3],
        grad: &[T],
        d: Self::Dims,
    ) -> (Vec<T>, Vec<T>, Vec<T>);
}

impl ThreeInputBackward for ShadeSh {
    type Dims = ShDims;
    fn backward<T: Real>(
        &self,
        [albedo, normals, coeffs]: [&[T]; 3],
        grad: &[T],
        d: ShDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        self.sh_backward(albedo, normals, coeffs, grad, d)
    }
}

impl ThreeInputBackward for ShadePhong {
    type Dims = PhongDims;
    fn backward<T: Real>(
        &self,
        [albedo, geometry, light]: [&[T]; 3],
        grad: &[T],
        d: PhongDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        self.phong_backward(albedo, geometry, light, grad, d)
    }
}

/// `bwd` of a [`ThreeInputBackward`] kernel on CPU tensors of either float type.
fn fused_backward<K: ThreeInputBackward>(
    op: &K,
    inputs: [&Tensor; 3],
    grad: &Tensor,
    d: K::Dims,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    fn run<T: Real, K: ThreeInputBackward>(
        op: &K,
        [a, b, c]: [&Tensor; 3],
        grad: &Tensor,
        d: K::Dims,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        with_data::<T, _>(a, |da| {
            with_data::<T, _>(b, |db| {
                with_data::<T, _>(c, |dc| {
                    with_data::<T, _>(grad, |g| {
                        let (ga, gb, gc) = op.backward([da, db, dc], g, d);
                        Ok((
                            tracked(a, cpu_tensor(ga, a.shape())?),
                            tracked(b, cpu_tensor(gb, b.shape())?),
                            tracked(c, cpu_tensor(gc, c.shape())?),
                        ))
                    })
                })
            })
        })
    }
    match inputs[0].dtype() {
        DType::F32 => run::<f32, K>(op, inputs, grad, d),
        DType::F64 => run::<f64, K>(op, inputs, grad, d),
        dt => candle_core::bail!("ganfit-render kernels take f32 or f64 tensors, got {dt:?}"),
    }
}

/// Area-weighted vertex normals before normalisation: each triangle adds its
/// `(p1 - p0) × (p2 - p0)` to its three corners. Positions `[B, V, 3]` -> `[B, V, 3]`.
pub(crate) struct FaceNormalSums {
    pub(crate) triangles: Triangles,
}

impl FaceNormalSums {
    fn forward<T: Real>(&self, positions: &[T]) -> Vec<T> {
        let per_image = self.triangles.num_vertices() * 3;
        let tris = self.triangles.as_slice();
        let mut out = vec![T::zero(); positions.len()];
        out.par_chunks_mut(per_image.max(1))
            .zip(positions.par_chunks(per_image.max(1)))
            .with_min_len(min_tasks())
            .for_each(|(out, p)| {
                for tri in tris {
                    let [p0, p1, p2] = tri.map(|v| point(p, v));
                    let face = cross(sub(p1, p0), sub(p2, p0));
                    for &v in tri {
                        for k in 0..3 {
                            out[v as usize * 3 + k] += face[k];
                        }
                    }
                }
            });
        out
    }
}

fn point<T: Real>(p: &[T], v: u32) -> [T; 3] {
    let i = v as usize * 3;
    [p[i], p[i + 1], p[i + 2]]
}

fn sub<T: Real>(a: [T; 3], b: [T; 3]) -> [T; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

impl CustomOp1 for FaceNormalSums {
    fn name(&self) -> &'static str {
        "ganfit-face-normal-sums"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(storage, T => {
            let out = self.forward::<T>(data(storage, layout)?);
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::face_normal_sums(&self.triangles, storage, layout)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = FaceNormalSumsGrad {
            triangles: self.triangles.clone(),
        };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// Vector-Jacobian product of [`FaceNormalSums`]: (positions, d out) -> d positions. With
/// `g` the summed output gradient of a triangle's corners, `face = e1 × e2` gives
/// `d e1 = e2 × g` and `d e2 = g × e1`.
struct FaceNormalSumsGrad {
    triangles: Triangles,
}

impl CustomOp2 for FaceNormalSumsGrad {
    fn name(&self) -> &'static str {
        "ganfit-face-normal-sums-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        p_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let per_image = self.triangles.num_vertices() * 3;
        let tris = self.triangles.as_slice();
        dispatch_float!(p, T => {
            let (p, g) = (data::<T>(p, p_l)?, data::<T>(g, g_l)?);
            let mut out = vec![T::zero(); p.len()];
            out.par_chunks_mut(per_image.max(1))
                .zip(p.par_chunks(per_image.max(1)).zip(g.par_chunks(per_image.max(1))))
                .with_min_len(min_tasks())
                .for_each(|(out, (p, g))| {
                    for tri in tris {
                        let [p0, p1, p2] = tri.map(|v| point(p, v));
                        let [g0, g1, g2] = tri.map(|v| point(g, v));
                        let gf = [0, 1, 2].map(|k| g0[k] + g1[k] + g2[k]);
                        let (e1, e2) = (sub(p1, p0), sub(p2, p0));
                        let (d1, d2) = (cross(e2, gf), cross(gf, e1));
                        for k in 0..3 {
                            out[tri[0] as usize * 3 + k] -= d1[k] + d2[k];
                            out[tri[1] as usize * 3 + k] += d1[k];
                            out[tri[2] as usize * 3 + k] += d2[k];
                        }
                    }
                });
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), p_l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        p_l: &Layout,
        g: &candle_core::CudaStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::face_normal_sums_grad(&self.triangles, (p, p_l), (g, g_l))
    }
}
