//! Conversion of official ProGAN (TensorFlow) generator weights, exported to `.npz` by
//! `tools/texture/progan_to_npz.py`, into a [`Generator`].

use crate::generator::{Generator, GeneratorConfig};
use crate::params::ParamMap;
use crate::{Result, TextureError};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Loads the generator variables of an official ProGAN network from an `.npz` archive that
/// maps TensorFlow variable names (e.g. `4x4/Dense/weight`, `8x8/Conv0_up/weight`,
/// `ToRGB_lod0/weight`; any scope prefix such as `G_paper/` is ignored) to arrays, and builds
/// the equivalent [`Generator`]; save it with [`Generator::save`].
///
/// The architecture (latent size, widths, resolution) is read off the array shapes. Layouts are
/// converted as documented in the crate docs: dense `[in, out]` is transposed, convolution
/// kernels `[kh, kw, in, out]` become `[out, in, kh, kw]`, and the fused upsampling kernels of
/// `Conv0_up` (`[kh, kw, out, in]`, applied by a transposed convolution) are also flipped
/// spatially, which makes nearest upsampling followed by our 3x3 convolution compute the same
/// interior texels. Both frameworks store unscaled weights and apply the same
/// equalised-learning-rate factors at run time, so no value is rescaled. Networks with a label
/// input (`label_size > 0`) are not supported: their dense layer has more inputs than the latent.
pub fn import_progan_npz(path: impl AsRef<Path>, device: &Device) -> Result<Generator> {
    let path = path.as_ref();
    let arrays = Tensor::read_npz(path).map_err(|e| {
        TextureError::file(
            path,
            format!("cannot read as .npz ({e}); export the TensorFlow weights with tools/texture/progan_to_npz.py"),
        )
    })?;
    let arrays: HashMap<String, Tensor> = arrays
        .into_iter()
        .map(|(name, t)| (strip_scope(&name).to_string(), t))
        .collect();
    let get = |name: &str, rank: usize| -> Result<Tensor> {
        let t = arrays.get(name).ok_or_else(|| {
            TextureError::file(
                path,
                format!("variable `{name}` is missing; is this an official ProGAN generator (not the discriminator)?"),
            )
        })?;
        if t.rank() != rank {
            return Err(TextureError::file(
                path,
                format!(
                    "variable `{name}` has shape {:?}, expected {rank} dimensions",
                    t.dims()
                ),
            ));
        }
        Ok(t.to_dtype(DType::F32)?)
    };

    let dense = get("4x4/Dense/weight", 2)?;
    let (latent_dim, dense_out) = dense.dims2()?;
    let c0 = get("4x4/Conv/weight", 4)?.dim(3)?;
    let mut channels = vec![c0];
    loop {
        let name = format!("{0}x{0}/Conv1/weight", 4 << channels.len());
        if channels.len() > 9 || !arrays.contains_key(&name) {
            break;
        }
        channels.push(get(&name, 4)?.dim(3)?);
    }
    if dense_out != 16 * c0 {
        return Err(TextureError::file(
            path,
            format!(
                "`4x4/Dense/weight` has {dense_out} outputs but 16 x {c0} channels are expected"
            ),
        ));
    }
    let config = GeneratorConfig {
        latent_dim,
        channels,
    };
    config.validate().map_err(|e| TextureError::file(path, e))?;

    // TF convolution kernels [kh, kw, in, out] -> [out, in, kh, kw].
    let conv = |t: Tensor| -> Result<Tensor> { Ok(t.permute((3, 2, 0, 1))?.contiguous()?) };
    let mut params = ParamMap::new();
    params.insert("4x4.dense.weight".into(), dense.t()?.contiguous()?);
    params.insert("4x4.dense.bias".into(), get("4x4/Dense/bias", 1)?);
    params.insert("4x4.conv.weight".into(), conv(get("4x4/Conv/weight", 4)?)?);
    params.insert("4x4.conv.bias".into(), get("4x4/Conv/bias", 1)?);
    for level in 1..config.channels.len() {
        let r = 4 << level;
        let block = format!("{r}x{r}");
        let (conv0, conv0_bias) = if arrays.contains_key(&format!("{block}/Conv0_up/weight")) {
            // [kh, kw, out, in] used by conv2d_transpose, i.e. a correlation with the kernel
            // flipped in both spatial axes.
            let w = get(&format!("{block}/Conv0_up/weight"), 4)?;
            (
                w.permute((2, 3, 0, 1))?.contiguous()?.flip(&[2, 3])?,
                get(&format!("{block}/Conv0_up/bias"), 1)?,
            )
        } else {
            (
                conv(get(&format!("{block}/Conv0/weight"), 4)?)?,
                get(&format!("{block}/Conv0/bias"), 1)?,
            )
        };
        params.insert(format!("{block}.conv0.weight"), conv0);
        params.insert(format!("{block}.conv0.bias"), conv0_bias);
        let conv1 = conv(get(&format!("{block}/Conv1/weight"), 4)?)?;
        params.insert(format!("{block}.conv1.weight"), conv1);
        params.insert(
            format!("{block}.conv1.bias"),
            get(&format!("{block}/Conv1/bias"), 1)?,
        );
    }
    let top = config.max_level();
    for level in 0..=top {
        let r = 4 << level;
        let tf = format!("ToRGB_lod{}", top - level);
        params.insert(
            format!("to_rgb.{r}x{r}.weight"),
            conv(get(&format!("{tf}/weight"), 4)?)?,
        );
        params.insert(
            format!("to_rgb.{r}x{r}.bias"),
            get(&format!("{tf}/bias"), 1)?,
        );
    }
    let params = params
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<Result<ParamMap>>()?;
    Generator::from_params(config, &params).map_err(|e| match e {
        TextureError::File { reason, .. } => TextureError::file(path, reason),
        other => TextureError::file(path, other),
    })
}

/// Drops a network scope (`G_paper/`, `G/`, ...) in front of the layer name.
fn strip_scope(name: &str) -> &str {
    let is_layer = |part: &str| {
        part.starts_with("ToRGB_lod")
            || part
                .split_once('x')
                .is_some_and(|(a, b)| a == b && a.parse::<usize>().is_ok())
    };
    name.match_indices('/')
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(0))
        .filter(|&i| is_layer(name[i..].split('/').next().unwrap_or("")))
        .min()
        .map_or(name, |i| &name[i..])
}
