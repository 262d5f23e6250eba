//! Named parameter sets with equalised-learning-rate layers, and their safetensors files.

use crate::ops::conv2d;
use crate::{Result, TextureError};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Parameters by name. Weights are stored as drawn from N(0, 1) and scaled by
/// `gain / sqrt(fan_in)` at run time (ProGAN's equalised learning rate), so files hold the
/// unscaled values, exactly like the official TensorFlow checkpoints with `use_wscale=True`.
pub type ParamMap = BTreeMap<String, Tensor>;

/// Name and shape of one parameter; names ending in `.bias` start at zero, others at N(0, 1).
pub(crate) type ParamSpec = (String, Vec<usize>);

/// He gain for layers followed by a leaky ReLU.
pub(crate) const RELU_GAIN: f64 = std::f64::consts::SQRT_2;

pub(crate) fn param<'a>(params: &'a ParamMap, name: &str) -> Result<&'a Tensor> {
    params.get(name).ok_or_else(|| {
        TextureError::InvalidConfig(format!("parameter `{name}` is missing from the model"))
    })
}

/// An equalised-LR layer's stored (unscaled) weight and its run-time scale
/// `gain / sqrt(fan_in)`.
pub(crate) fn weight_and_scale<'a>(
    params: &'a ParamMap,
    layer: &str,
    gain: f64,
) -> Result<(&'a Tensor, f64)> {
    let w = param(params, &format!("{layer}.weight"))?;
    let fan_in = w.elem_count() / w.dim(0)?;
    Ok((w, gain / (fan_in as f64).sqrt()))
}

/// Adds a per-channel bias to `[B, C, ...]`.
pub(crate) fn add_channel_bias(x: &Tensor, params: &ParamMap, layer: &str) -> Result<Tensor> {
    let bias = param(params, &format!("{layer}.bias"))?;
    let mut shape = vec![1; x.rank()];
    shape[1] = bias.dim(0)?;
    Ok(x.broadcast_add(&bias.reshape(shape)?)?)
}

/// Equalised-LR dense layer without bias: `x @ (w * scale)^T`. A trained weight goes through
/// candle's matmul (both gradients are needed); a fixed one through [`crate::ops::dense`],
/// whose backward skips the weight gradient.
pub(crate) fn dense(params: &ParamMap, layer: &str, x: &Tensor, gain: f64) -> Result<Tensor> {
    let (w, scale) = weight_and_scale(params, layer, gain)?;
    if w.track_op() {
        Ok((x.matmul(&w.t()?)? * scale)?)
    } else {
        Ok(crate::ops::dense(x, w, scale)?)
    }
}

/// Equalised-LR same-padding convolution without bias, of `x` upsampled 2x (nearest) first
/// when `upsample`.
pub(crate) fn conv(
    params: &ParamMap,
    layer: &str,
    x: &Tensor,
    gain: f64,
    upsample: bool,
) -> Result<Tensor> {
    let (w, scale) = weight_and_scale(params, layer, gain)?;
    Ok(conv2d(x, w, scale, upsample)?)
}

/// Random initial parameters for `specs`: N(0, 1) weights from a ChaCha8 stream, zero biases.
pub(crate) fn init_params(specs: &[ParamSpec], seed: u64, device: &Device) -> Result<ParamMap> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    specs
        .iter()
        .map(|(name, shape)| {
            let t = if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            } else {
                let n = shape.iter().product();
                let v = crate::model::normal_from(&mut rng, n, None);
                Tensor::from_vec(v, shape.as_slice(), device)?
            };
            Ok((name.clone(), t))
        })
        .collect()
}

/// Takes exactly the tensors named in `specs` out of `tensors` (under `prefix`), checking shapes,
/// as f32 (a file may hold other float types).
pub(crate) fn take_params(
    specs: &[ParamSpec],
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    path: &Path,
) -> Result<ParamMap> {
    select_params(specs, tensors, prefix, path, |t| t.to_dtype(DType::F32))
}

/// Exactly the tensors named in `specs`, checked like [`take_params`]'s but kept in their own
/// dtype (an f64 copy for gradient checks stays f64).
pub(crate) fn own_params(
    specs: &[ParamSpec],
    tensors: &HashMap<String, Tensor>,
) -> Result<ParamMap> {
    select_params(specs, tensors, "", Path::new("<memory>"), |t| Ok(t.clone()))
}

fn select_params(
    specs: &[ParamSpec],
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    path: &Path,
    convert: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<ParamMap> {
    specs
        .iter()
        .map(|(name, shape)| {
            let key = format!("{prefix}{name}");
            let t = tensors.get(&key).ok_or_else(|| {
                TextureError::file(
                    path,
                    format!("tensor `{key}` is missing; the file was written for another architecture (check the config stored with it)"),
                )
            })?;
            if t.dims() != shape.as_slice() {
                return Err(TextureError::file(
                    path,
                    format!("tensor `{key}` has shape {:?} but the config needs {shape:?}", t.dims()),
                ));
            }
            Ok((name.clone(), convert(t)?))
        })
        .collect()
}

/// Writes tensors (f32, bit-exact) and string metadata to a safetensors file.
pub(crate) fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let contiguous = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(contiguous, Some(metadata), path)
        .map_err(|e| TextureError::file(path, format!("cannot write safetensors: {e}")))
}

/// Reads all tensors and the metadata of a safetensors file.
pub(crate) fn load_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes =
        std::fs::read(path).map_err(|e| TextureError::file(path, format!("cannot read: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        TextureError::file(
            path,
            format!("not a safetensors file ({e}); pass a .safetensors weights file"),
        )
    })?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| TextureError::file(path, format!("cannot decode tensors: {e}")))?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// Fetches and parses a JSON metadata entry.
pub(crate) fn metadata_json<T: serde::de::DeserializeOwned>(
    meta: &HashMap<String, String>,
    key: &str,
    path: &Path,
) -> Result<T> {
    let text = meta.get(key).ok_or_else(|| {
        TextureError::file(path, format!("metadata entry `{key}` is missing; this file was not written by ganfit-texture (convert it first, see the crate docs)"))
    })?;
    serde_json::from_str(text)
        .map_err(|e| TextureError::file(path, format!("metadata `{key}` is not valid: {e}")))
}

/// Nearest-neighbour 2x upsampling written with broadcasts (cheap, and its backward is a sum).
pub(crate) fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// 2x2 average pooling written with a reshape.
pub(crate) fn downsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .mean_keepdim(5)?
        .mean_keepdim(3)?
        .reshape((b, c, h / 2, w / 2))?)
}
