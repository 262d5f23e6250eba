use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use ganfit_assets::Resolver;

use super::arch::{
    self, EMBEDDING_DIM, FC, INPUT_MEAN, INPUT_SIZE, STAGES, STEM_AFFINE, STEM_CHANNELS, STEM_CONV,
    STEM_KERNEL, STEM_POOL, STEM_POOL_STRIDE, STEM_STRIDE,
};
use super::ops::{FixedConv, MaxPool};
use super::portable::PortableStages;
use super::stages::{Block, Pool, Stage, StageOp};
use super::winograd::Scratch;

use crate::{LossError, Result};

/// Manifest id of the converted dlib model (`weights-manifest.toml`).
pub const DLIB_RESNET_ASSET_ID: &str = "dlib-face-recognition-resnet-v1";

/// dlib's face-recognition ResNet-29 (`dlib_face_recognition_resnet_model_v1`): 150×150 RGB face
/// chips to 128-d descriptors, differentiable with respect to the input.
///
/// Architecture (dlib's `anet_type`): input `(pixel − mean)/256`; stem 7×7/2 convolution with 32
/// filters, affine, ReLU, 3×3/2 max-pool; five residual stages (dlib's `alevel4` … `alevel0`) of
/// 3×32, 4×64, 3×128, 3×256 and 1×256 channels, each block `relu(x' + affine(conv(relu(affine(
/// conv(x))))))` with 3×3 convolutions, where the first block of every stage but the first has a
/// stride-2 unpadded first convolution and `x'` is `x` average-pooled 2×2/2 and zero-padded to the
/// larger shape; global average pool; 256→128 fully connected layer without bias.
///
/// Each convolution is fused with the affine (folded batch-norm) layer that follows it, and with
/// the ReLU and residual addition after it where there are some; the input normalisation is
/// folded into the stem. The stem and each residual stage run as one custom op that processes
/// the images of a batch in parallel. The weights are constants: backward passes compute input
/// gradients only. The fused ops have CPU kernels; on other devices (CUDA) the same network
/// runs as candle tensor operations on the same folded weights.
#[derive(Clone)]
pub struct FaceRecognitionNet {
    /// The stem, then the residual stages.
    stages: Stages,
    /// The stages as tensor operations, where the weights live on a device other than the CPU.
    portable: Option<PortableStages>,
    /// `[256, 128]`: pooled features times this give the descriptor.
    fc_t: Tensor,
}

/// The stages in the network's element type, and the buffers they share.
#[derive(Clone)]
enum Stages {
    F32(Vec<Arc<Stage<f32>>>, Arc<Pool<f32>>),
    F64(Vec<Arc<Stage<f64>>>, Arc<Pool<f64>>),
}

impl Stages {
    fn len(&self) -> usize {
        match self {
            Self::F32(stages, _) => stages.len(),
            Self::F64(stages, _) => stages.len(),
        }
    }

    /// Stage `i` applied to `x`.
    fn apply(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::F32(stages, pool) => x.apply_op1(StageOp::new(stages[i].clone(), pool.clone())),
            Self::F64(stages, pool) => x.apply_op1(StageOp::new(stages[i].clone(), pool.clone())),
        }
    }

    /// The stages as tensor operations on `device`, unless that is the CPU (where the fused
    /// ops run).
    fn portable(&self, device: &Device) -> candle_core::Result<Option<PortableStages>> {
        if device.is_cpu() {
            return Ok(None);
        }
        Ok(Some(match self {
            Self::F32(stages, _) => PortableStages::new(stages, device)?,
            Self::F64(stages, _) => PortableStages::new(stages, device)?,
        }))
    }

    fn cast<T: Scratch, U: Scratch>(stages: &[Arc<Stage<T>>]) -> Vec<Arc<Stage<U>>> {
        stages.iter().map(|s| Arc::new(s.cast())).collect()
    }
}

impl std::fmt::Debug for FaceRecognitionNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceRecognitionNet")
            .field("dtype", &self.fc_t.dtype())
            .field("stages", &self.stages.len())
            .finish_non_exhaustive()
    }
}

/// The outputs of [`FaceRecognitionNet::forward`].
#[derive(Debug, Clone)]
pub struct FaceFeatures {
    /// Feature maps `[B, C, H, W]` after the stem (32×35×35) and after each of the five
    /// residual stages (32×35×35, 64×17×17, 128×8×8, 256×4×4, 256×2×2), in that order.
    pub maps: Vec<Tensor>,
    /// The `[B, 128]` descriptors, exactly as dlib's `compute_face_descriptor` returns them
    /// (not normalised).
    pub embedding: Tensor,
}

impl FaceRecognitionNet {
    /// Loads the default weights: the manifest's [`DLIB_RESNET_ASSET_ID`] found (and verified) by
    /// [`Resolver::new`].
    pub fn load(device: &Device) -> Result<Self> {
        Self::from_resolver(&Resolver::new(), device)
    }

    /// Loads [`DLIB_RESNET_ASSET_ID`] through `resolver`.
    pub fn from_resolver(resolver: &Resolver, device: &Device) -> Result<Self> {
        let path = resolver.resolve(DLIB_RESNET_ASSET_ID)?;
        Self::from_file(&path, device)
    }

    /// Loads weights from a safetensors file made by the `convert_dlib` example (no checksum:
    /// use this for weights of your own).
    pub fn from_file(path: &Path, device: &Device) -> Result<Self> {
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| LossError::WeightsFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Self::from_tensors(&tensors)
    }

    /// Builds the network from named tensors (the names and shapes of the safetensors file).
    pub fn from_tensors(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| LossError::MissingTensor {
                name: name.to_string(),
            })?;
            if t.dims() != shape {
                return Err(LossError::TensorShape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let conv_affine = |conv: &str,
                           affine: &str,
                           inputs: usize,
                           filters: usize,
                           kernel: usize|
         -> Result<(Vec<f32>, Vec<f32>)> {
            let weight = get(
                &format!("{conv}.weight"),
                &[filters, inputs, kernel, kernel],
            )?;
            // dlib convolutions may be saved without bias.
            let bias = if tensors.contains_key(&format!("{conv}.bias")) {
                get(&format!("{conv}.bias"), &[filters])?
            } else {
                Tensor::zeros(filters, DType::F32, weight.device())?
            };
            let gamma = get(&format!("{affine}.gamma"), &[filters])?;
            let beta = get(&format!("{affine}.beta"), &[filters])?;
            // affine(conv(x)) = γ·(W∗x + b) + β = (γW)∗x + (γb + β).
            let weight = weight.broadcast_mul(&gamma.reshape((filters, 1, 1, 1))?)?;
            let bias = ((bias * &gamma)? + beta)?;
            Ok((weight.flatten_all()?.to_vec1()?, bias.to_vec1()?))
        };
        let conv3x3 = |prefix: &str, n: usize, inputs: usize, layer: usize, stride: usize| {
            let (weight, bias) = conv_affine(
                &format!("{prefix}.conv{layer}"),
                &format!("{prefix}.affine{layer}"),
                inputs,
                n,
                3,
            )?;
            Ok::<_, LossError>(FixedConv::new(
                weight,
                bias,
                (n, inputs, 3),
                stride,
                arch::dlib_padding(3, stride),
            ))
        };

        let mean = get(INPUT_MEAN, &[3])?.to_vec1::<f32>()?;
        let (weight, bias) = conv_affine(STEM_CONV, STEM_AFFINE, 3, STEM_CHANNELS, STEM_KERNEL)?;
        let (weight, bias) = fold_input_normalisation(&weight, &bias, &mean);
        let mut stages = vec![Arc::new(Stage::Stem {
            conv: FixedConv::new(
                weight,
                bias,
                (STEM_CHANNELS, 3, STEM_KERNEL),
                STEM_STRIDE,
                arch::dlib_padding(STEM_KERNEL, STEM_STRIDE),
            ),
            pool: MaxPool {
                kernel: STEM_POOL,
                stride: STEM_POOL_STRIDE,
            },
        })];
        let mut channels = STEM_CHANNELS;
        for (s, stage) in STAGES.iter().enumerate() {
            let mut blocks = Vec::with_capacity(stage.blocks);
            for b in 0..stage.blocks {
                let prefix = arch::block_prefix(s, b);
                let down = arch::is_down_block(stage, b);
                let n = stage.channels;
                blocks.push(Block {
                    conv1: conv3x3(&prefix, n, channels, 1, if down { 2 } else { 1 })?,
                    conv2: conv3x3(&prefix, n, n, 2, 1)?,
                    down,
                });
                channels = n;
            }
            stages.push(Arc::new(Stage::Residual(blocks)));
        }
        let fc_t = get(&format!("{FC}.weight"), &[EMBEDDING_DIM, channels])?
            .t()?
            .contiguous()?;
        let stages = Stages::F32(stages, Arc::default());
        Ok(Self {
            portable: stages.portable(fc_t.device())?,
            stages,
            fc_t,
        })
    }

    /// The same network computing in `dtype` (`F32` or `F64`; f64 serves gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let stages = match (&self.stages, dtype) {
            (Stages::F32(s, _), DType::F32) => Stages::F32(Stages::cast(s), Arc::default()),
            (Stages::F64(s, _), DType::F32) => Stages::F32(Stages::cast(s), Arc::default()),
            (Stages::F32(s, _), DType::F64) => Stages::F64(Stages::cast(s), Arc::default()),
            (Stages::F64(s, _), DType::F64) => Stages::F64(Stages::cast(s), Arc::default()),
            (_, other) => {
                return Err(LossError::InputValue {
                    what: "the face-recognition network's dtype",
                    reason: format!("must be F32 or F64, not {other:?}"),
                });
            }
        };
        Ok(Self {
            portable: stages.portable(self.fc_t.device())?,
            stages,
            fc_t: self.fc_t.to_dtype(dtype)?,
        })
    }

    /// Runs the network on `[B, 3, 150, 150]` RGB images with values in 0–255 (dlib's pixel
    /// scale; multiply images in [0, 1] by 255), returning the descriptors and the intermediate
    /// feature maps.
    pub fn forward(&self, images: &Tensor) -> Result<FaceFeatures> {
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != INPUT_SIZE || dims[3] != INPUT_SIZE {
            return Err(LossError::InputShape {
                what: "face-recognition input",
                expected: format!("[B, 3, {INPUT_SIZE}, {INPUT_SIZE}] (RGB face chips)"),
                actual: dims.to_vec(),
            });
        }
        let mut x = images.to_dtype(self.fc_t.dtype())?.contiguous()?;
        let mut maps = Vec::with_capacity(self.stages.len());
        for i in 0..self.stages.len() {
            x = match &self.portable {
                Some(portable) => portable.apply(i, &x)?,
                None => self.stages.apply(i, &x)?,
            };
            maps.push(x.clone());
        }
        let pooled = x.mean((D::Minus2, D::Minus1))?;
        let embedding = pooled.matmul(&self.fc_t)?;
        Ok(FaceFeatures { maps, embedding })
    }

    /// The `[B, 128]` descriptors of `[B, 3, 150, 150]` images in 0–255.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.forward(images)?.embedding)
    }

    /// The same network running its tensor-operation path on the CPU, for comparing the two.
    #[cfg(test)]
    pub(crate) fn with_portable_stages(mut self) -> Result<Self> {
        self.portable = Some(match &self.stages {
            Stages::F32(stages, _) => PortableStages::new(stages, &Device::Cpu)?,
            Stages::F64(stages, _) => PortableStages::new(stages, &Device::Cpu)?,
        });
        Ok(self)
    }
}

/// Folds dlib's input normalisation `(pixel − mean)/256` into the stem convolution (which has
/// no padding, so every tap reads a pixel): `W∗((x − m)/256) + b = (W/256)∗x + (b − Σ W·m/256)`.
/// Dividing by 256 is exact; the bias correction is summed in f64.
fn fold_input_normalisation(weight: &[f32], bias: &[f32], mean: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let per_filter = weight.len() / bias.len();
    let per_channel = per_filter / mean.len();
    let scaled = weight.iter().map(|w| w / 256.0).collect();
    let bias = weight
        .chunks(per_filter)
        .zip(bias)
        .map(|(filter, &b)| {
            let shift: f64 = filter
                .chunks(per_channel)
                .zip(mean)
                .map(|(taps, &m)| taps.iter().map(|&w| f64::from(w)).sum::<f64>() * f64::from(m))
                .sum();
            (f64::from(b) - shift / 256.0) as f32
        })
        .collect();
    (scaled, bias)
}
