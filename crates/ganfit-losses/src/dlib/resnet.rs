//! Architecture-directed reading of the face-recognition ResNet and its safetensors form.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

use super::DlibFormatError;
use super::reader::{Dims, DlibTensor, Reader};
use crate::identity::arch::{
    self, FC, INPUT_MEAN, INPUT_SIZE, STAGES, STEM_AFFINE, STEM_CHANNELS, STEM_CONV, STEM_KERNEL,
    STEM_POOL, STEM_POOL_STRIDE, STEM_STRIDE,
};

type Result<T> = std::result::Result<T, DlibFormatError>;

/// A named parameter tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Name in the safetensors file, e.g. `stage1.block0.conv1.weight`.
    pub name: String,
    /// Shape: `[out, in, kh, kw]` for convolution weights, `[C]` for biases and affine
    /// parameters, `[128, 256]` (out × in) for the fully connected layer.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

/// The parameters of dlib's face-recognition ResNet, as read from its `.dat` file.
#[derive(Debug, Clone, PartialEq)]
pub struct DlibResnet {
    /// Every parameter tensor, in forward order; the first is the input mean.
    pub tensors: Vec<NamedTensor>,
}

/// The layers of the network in forward order, as dlib nests them.
#[derive(Debug)]
enum Layer {
    Conv {
        name: String,
        inputs: usize,
        filters: usize,
        size: usize,
        stride: usize,
    },
    Affine {
        name: String,
        channels: usize,
    },
    Relu,
    MaxPool {
        size: usize,
        stride: usize,
    },
    /// `size == 0` is dlib's `avg_pool_everything`.
    AvgPool {
        size: usize,
        stride: usize,
    },
    Tag,
    Skip,
    AddPrev,
    Fc {
        name: String,
        inputs: usize,
        outputs: usize,
    },
}

impl Layer {
    /// Tag and skip layers are written without details or bookkeeping.
    fn is_add_layer(&self) -> bool {
        !matches!(self, Layer::Tag | Layer::Skip)
    }
}

fn layers() -> Vec<Layer> {
    let conv = |name: String, inputs, filters, size, stride| Layer::Conv {
        name,
        inputs,
        filters,
        size,
        stride,
    };
    let affine = |name: String, channels| Layer::Affine { name, channels };
    let mut layers = vec![
        conv(STEM_CONV.into(), 3, STEM_CHANNELS, STEM_KERNEL, STEM_STRIDE),
        affine(STEM_AFFINE.into(), STEM_CHANNELS),
        Layer::Relu,
        Layer::MaxPool {
            size: STEM_POOL,
            stride: STEM_POOL_STRIDE,
        },
    ];
    let mut channels = STEM_CHANNELS;
    for (s, stage) in STAGES.iter().enumerate() {
        for b in 0..stage.blocks {
            let prefix = arch::block_prefix(s, b);
            let down = arch::is_down_block(stage, b);
            let n = stage.channels;
            layers.push(Layer::Tag);
            layers.push(conv(
                format!("{prefix}.conv1"),
                channels,
                n,
                3,
                if down { 2 } else { 1 },
            ));
            layers.push(affine(format!("{prefix}.affine1"), n));
            layers.push(Layer::Relu);
            layers.push(conv(format!("{prefix}.conv2"), n, n, 3, 1));
            layers.push(affine(format!("{prefix}.affine2"), n));
            if down {
                layers.push(Layer::Tag);
                layers.push(Layer::Skip);
                layers.push(Layer::AvgPool { size: 2, stride: 2 });
            }
            layers.push(Layer::AddPrev);
            layers.push(Layer::Relu);
            channels = n;
        }
    }
    layers.push(Layer::AvgPool { size: 0, stride: 1 });
    layers.push(Layer::Fc {
        name: FC.into(),
        inputs: channels,
        outputs: arch::EMBEDDING_DIM,
    });
    layers
}

impl DlibResnet {
    /// Reads the network from the bytes of `dlib_face_recognition_resnet_model_v1.dat`. Every
    /// byte must belong to the network.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let layers = layers();
        let mut r = Reader::new(bytes);
        let mut tensors = Vec::new();

        // add_loss_layer: version, the loss details, then the network.
        r.version("loss layer version", 1, 1)?;
        if r.tag("loss layer", &["loss_metric_", "loss_metric_2"])? == 1 {
            r.float("loss margin")?;
            r.float("loss distance threshold")?;
        }

        // Headers from the output inwards; the stem convolution wraps the input layer.
        let (stem, rest) = layers.split_first().expect("the architecture has layers");
        let mut versions = vec![0; rest.len()];
        for (layer, version) in rest.iter().zip(&mut versions).rev() {
            *version = if layer.is_add_layer() {
                r.version("layer version", 1, 2)?
            } else {
                r.version("tag/skip layer version", 1, 1)?
            };
        }

        let input_version = r.version("input layer version", 2, 3)?;
        r.tag("input layer", &["input_rgb_image_sized"])?;
        let mean = [
            r.float("red mean")? as f32,
            r.float("green mean")? as f32,
            r.float("blue mean")? as f32,
        ];
        for what in ["input rows", "input columns"] {
            let at = r.offset();
            let size = r.size(what)?;
            if size != INPUT_SIZE {
                return Err(r.malformed(at, what, format!("{size}, expected {INPUT_SIZE}")));
            }
        }
        tensors.push(NamedTensor {
            name: INPUT_MEAN.into(),
            shape: vec![3],
            data: mean.to_vec(),
        });
        read_details(&mut r, stem, &mut tensors)?;
        read_bookkeeping(&mut r, 3)?;
        if input_version >= 3 {
            r.size("sample expansion factor")?;
        }

        // Details from the input outwards.
        for (layer, &version) in rest.iter().zip(&versions) {
            if layer.is_add_layer() {
                read_details(&mut r, layer, &mut tensors)?;
                read_bookkeeping(&mut r, if version >= 2 { 3 } else { 2 })?;
            }
        }
        r.finish()?;
        Ok(Self { tensors })
    }

    /// Serialises the tensors to safetensors bytes. The output depends only on the tensors, with
    /// one metadata entry (`format`) naming where they come from.
    pub fn to_safetensors(&self) -> std::result::Result<Vec<u8>, safetensors::SafeTensorError> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|t| {
                let raw = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (t.name.clone(), raw, t.shape.clone())
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, raw, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), raw).map(|v| (name.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([(
            "format".to_string(),
            "dlib_face_recognition_resnet_model_v1 (dlib ResNet-29), converted by ganfit-losses"
                .to_string(),
        )]);
        safetensors::serialize(views, Some(metadata))
    }
}

/// The three flags and the two or three cached tensors (`x_grad`, output, and `params_grad` or
/// the input layer's gradient) that follow every layer's details; none is needed for inference.
fn read_bookkeeping(r: &mut Reader<'_>, tensors: usize) -> Result<()> {
    r.bool("setup flag")?;
    r.bool("stale-gradient flag")?;
    r.bool("disabled-output flag")?;
    for _ in 0..tensors {
        r.tensor("cached tensor")?;
    }
    Ok(())
}

fn expect_dims(r: &Reader<'_>, at: usize, what: &str, found: Dims, expected: Dims) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(r.malformed(at, what, format!("shape {found:?}, expected {expected:?}")))
    }
}

fn expect_value(r: &Reader<'_>, at: usize, what: &str, found: i64, expected: usize) -> Result<()> {
    if usize::try_from(found).is_ok_and(|f| f == expected) {
        Ok(())
    } else {
        Err(r.malformed(at, what, format!("{found}, expected {expected}")))
    }
}

/// Reads one sized field and checks it against the architecture.
fn read_expected(r: &mut Reader<'_>, what: &str, expected: usize) -> Result<()> {
    let at = r.offset();
    let found = r.int32(what)?;
    expect_value(r, at, what, found, expected)
}

/// Splits a parameter tensor into parts of the given lengths, which must cover it exactly.
fn split_params(
    r: &Reader<'_>,
    at: usize,
    what: &str,
    params: DlibTensor,
    lengths: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let total: usize = lengths.iter().sum();
    if params.data.len() != total {
        return Err(r.malformed(
            at,
            what,
            format!("{} parameters, expected {total}", params.data.len()),
        ));
    }
    let mut rest = params.data.as_slice();
    Ok(lengths
        .iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head.to_vec()
        })
        .collect())
}

fn read_details(r: &mut Reader<'_>, layer: &Layer, out: &mut Vec<NamedTensor>) -> Result<()> {
    match layer {
        Layer::Conv {
            name,
            inputs,
            filters,
            size,
            stride,
        } => {
            let version = r.tag("convolution", &["con_4", "con_5", "con_6"])?;
            let at = r.offset();
            let params = r.tensor("convolution parameters")?;
            read_expected(r, "number of filters", *filters)?;
            read_expected(r, "filter rows", *size)?;
            read_expected(r, "filter columns", *size)?;
            read_expected(r, "vertical stride", *stride)?;
            read_expected(r, "horizontal stride", *stride)?;
            let padding = arch::dlib_padding(*size, *stride);
            read_expected(r, "vertical padding", padding)?;
            read_expected(r, "horizontal padding", padding)?;
            let filter_at = r.offset();
            let filter_dims = r.alias_tensor("filter shape")?;
            expect_dims(
                r,
                filter_at,
                "filter shape",
                filter_dims,
                [*filters, *inputs, *size, *size],
            )?;
            let bias_at = r.offset();
            let bias_dims = r.alias_tensor("bias shape")?;
            for what in [
                "learning rate",
                "weight decay",
                "bias learning rate",
                "bias decay",
            ] {
                r.float(what)?;
            }
            let use_bias = if version >= 1 {
                r.bool("use-bias flag")?
            } else {
                true
            };
            if version >= 2 {
                let relu_at = r.offset();
                if r.bool("fused ReLU flag")? {
                    return Err(r.malformed(
                        relu_at,
                        "fused ReLU flag",
                        "convolutions with a fused ReLU are not part of this network".into(),
                    ));
                }
            }
            let bias_len = if use_bias { *filters } else { 0 };
            let expected_bias = if use_bias {
                [1, *filters, 1, 1]
            } else {
                [0; 4]
            };
            expect_dims(r, bias_at, "bias shape", bias_dims, expected_bias)?;
            let weight_len = filters * inputs * size * size;
            let mut parts = split_params(r, at, "convolution", params, &[weight_len, bias_len])?;
            let bias = parts.pop().unwrap_or_default();
            let weight = parts.pop().unwrap_or_default();
            out.push(NamedTensor {
                name: format!("{name}.weight"),
                shape: vec![*filters, *inputs, *size, *size],
                data: weight,
            });
            if use_bias {
                out.push(NamedTensor {
                    name: format!("{name}.bias"),
                    shape: vec![*filters],
                    data: bias,
                });
            }
        }
        Layer::Affine { name, channels } => {
            let version = r.tag("affine layer", &["affine_", "affine_2"])?;
            let at = r.offset();
            let params = r.tensor("affine parameters")?;
            for what in ["gamma shape", "beta shape"] {
                let dims_at = r.offset();
                let dims = r.alias_tensor(what)?;
                expect_dims(r, dims_at, what, dims, [1, *channels, 1, 1])?;
            }
            read_expected(r, "affine mode (0 = convolutional)", 0)?;
            let disabled = version == 1 && r.bool("disabled flag")?;
            let mut parts = split_params(r, at, "affine", params, &[*channels, *channels])?;
            let (mut beta, mut gamma) = (
                parts.pop().unwrap_or_default(),
                parts.pop().unwrap_or_default(),
            );
            if disabled {
                // A disabled affine layer passes its input through unchanged.
                gamma.fill(1.0);
                beta.fill(0.0);
            }
            for (suffix, data) in [("gamma", gamma), ("beta", beta)] {
                out.push(NamedTensor {
                    name: format!("{name}.{suffix}"),
                    shape: vec![*channels],
                    data,
                });
            }
        }
        Layer::Relu => {
            if r.tag("ReLU layer", &["relu_", "relu_2"])? == 1 {
                let at = r.offset();
                if r.bool("disabled flag")? {
                    return Err(r.malformed(
                        at,
                        "ReLU disabled flag",
                        "disabled ReLU layers are not part of this network".into(),
                    ));
                }
            }
        }
        Layer::MaxPool { size, stride } | Layer::AvgPool { size, stride } => {
            let what = if matches!(layer, Layer::MaxPool { .. }) {
                "max_pool_2"
            } else {
                "avg_pool_2"
            };
            r.tag("pooling layer", &[what])?;
            read_expected(r, "pool rows", *size)?;
            read_expected(r, "pool columns", *size)?;
            read_expected(r, "vertical stride", *stride)?;
            read_expected(r, "horizontal stride", *stride)?;
            let padding = arch::dlib_padding(*size, *stride);
            read_expected(r, "vertical padding", padding)?;
            read_expected(r, "horizontal padding", padding)?;
        }
        Layer::AddPrev => {
            r.tag("residual addition", &["add_prev_"])?;
        }
        Layer::Fc {
            name,
            inputs,
            outputs,
        } => {
            let version = r.tag("fully connected layer", &["fc_2", "fc_3"])?;
            read_expected(r, "outputs", *outputs)?;
            read_expected(r, "inputs", *inputs)?;
            let at = r.offset();
            let params = r.tensor("fully connected parameters")?;
            let dims_at = r.offset();
            let dims = r.alias_tensor("weight shape")?;
            expect_dims(r, dims_at, "weight shape", dims, [*inputs, *outputs, 1, 1])?;
            let bias_at = r.offset();
            let bias_dims = r.alias_tensor("bias shape")?;
            expect_dims(r, bias_at, "bias shape", bias_dims, [0; 4])?;
            read_expected(r, "bias mode (1 = no bias)", 1)?;
            for what in [
                "learning rate",
                "weight decay",
                "bias learning rate",
                "bias decay",
            ] {
                r.float(what)?;
            }
            if version == 1 {
                r.bool("use-bias flag")?;
            }
            let mut parts = split_params(r, at, "fully connected", params, &[inputs * outputs])?;
            let weight_in_out = parts.pop().unwrap_or_default();
            // dlib multiplies row vectors by an inputs × outputs matrix; store outputs × inputs
            // like every other linear layer.
            let data = (0..*outputs)
                .flat_map(|o| (0..*inputs).map(move |i| (o, i)))
                .map(|(o, i)| weight_in_out[i * outputs + o])
                .collect();
            out.push(NamedTensor {
                name: format!("{name}.weight"),
                shape: vec![*outputs, *inputs],
                data,
            });
        }
        Layer::Tag | Layer::Skip => {}
    }
    Ok(())
}
