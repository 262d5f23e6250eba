use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use ganfit_assets::Resolver;

use super::arch::{
    self, EMBEDDING_DIM, FC, INPUT_MEAN, INPUT_SIZE, STAGES, STEM_AFFINE, STEM_CHANNELS, STEM_CONV,
    STEM_KERNEL, STEM_POOL, STEM_POOL_STRIDE, STEM_STRIDE,
};
use super::ops::{FixedConv, MaxPool, ResidualRelu};
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
/// the ReLU after it where there is one. The weights are constants: backward passes compute
/// input gradients only. The custom ops have CPU kernels only, so the network runs on
/// [`Device::Cpu`].
#[derive(Debug, Clone)]
pub struct FaceRecognitionNet {
    /// `[1, 3, 1, 1]` input means (R, G, B) in pixel units.
    mean: Tensor,
    stem: FixedConv,
    stages: Vec<Vec<Block>>,
    /// `[256, 128]`: pooled features times this give the descriptor.
    fc_t: Tensor,
}

#[derive(Debug, Clone)]
struct Block {
    conv1: FixedConv,
    conv2: FixedConv,
    down: bool,
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
                           kernel: usize,
                           stride: usize|
         -> Result<FixedConv> {
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
            Ok(FixedConv::new(
                &weight,
                &bias,
                stride,
                arch::dlib_padding(kernel, stride),
            )?)
        };

        let mean = get(INPUT_MEAN, &[3])?.reshape((1, 3, 1, 1))?;
        let stem = conv_affine(
            STEM_CONV,
            STEM_AFFINE,
            3,
            STEM_CHANNELS,
            STEM_KERNEL,
            STEM_STRIDE,
        )?
        .with_relu();
        let mut channels = STEM_CHANNELS;
        let mut stages = Vec::with_capacity(STAGES.len());
        for (s, stage) in STAGES.iter().enumerate() {
            let mut blocks = Vec::with_capacity(stage.blocks);
            for b in 0..stage.blocks {
                let prefix = arch::block_prefix(s, b);
                let down = arch::is_down_block(stage, b);
                let n = stage.channels;
                blocks.push(Block {
                    conv1: conv_affine(
                        &format!("{prefix}.conv1"),
                        &format!("{prefix}.affine1"),
                        channels,
                        n,
                        3,
                        if down { 2 } else { 1 },
                    )?
                    .with_relu(),
                    conv2: conv_affine(
                        &format!("{prefix}.conv2"),
                        &format!("{prefix}.affine2"),
                        n,
                        n,
                        3,
                        1,
                    )?,
                    down,
                });
                channels = n;
            }
            stages.push(blocks);
        }
        let fc_t = get(&format!("{FC}.weight"), &[EMBEDDING_DIM, channels])?
            .t()?
            .contiguous()?;
        Ok(Self {
            mean,
            stem,
            stages,
            fc_t,
        })
    }

    /// The same network computing in `dtype` (`F32` or `F64`; f64 serves gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let conv = |c: &FixedConv| c.to_dtype(dtype);
        Ok(Self {
            mean: self.mean.to_dtype(dtype)?,
            stem: conv(&self.stem)?,
            stages: self
                .stages
                .iter()
                .map(|blocks| {
                    blocks
                        .iter()
                        .map(|b| {
                            Ok(Block {
                                conv1: conv(&b.conv1)?,
                                conv2: conv(&b.conv2)?,
                                down: b.down,
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?,
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
        let x = (images
            .to_dtype(self.mean.dtype())?
            .broadcast_sub(&self.mean)?
            / 256.0)?;
        let x = x.contiguous()?.apply_op1(self.stem.clone())?;
        let mut x = x.apply_op1(MaxPool {
            kernel: STEM_POOL,
            stride: STEM_POOL_STRIDE,
        })?;
        let mut maps = vec![x.clone()];
        for blocks in &self.stages {
            for block in blocks {
                x = block.forward(&x)?;
            }
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
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let main = x.apply_op1(self.conv1.clone())?;
        let main = main.apply_op1(self.conv2.clone())?;
        let shortcut = if self.down {
            avg_pool_2x2_floor(x)?
        } else {
            x.clone()
        };
        Ok(main.apply_op2(&shortcut, ResidualRelu)?)
    }
}

/// 2×2/2 average pooling that drops an odd last row/column, as dlib does.
fn avg_pool_2x2_floor(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.narrow(2, 0, h / 2 * 2)?
        .narrow(3, 0, w / 2 * 2)?
        .contiguous()?
        .avg_pool2d(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_gradient, seeded_tensor};

    #[test]
    fn floor_average_pool_drops_the_odd_edge_and_has_exact_gradients() -> candle_core::Result<()> {
        let x = seeded_tensor(&[1, 2, 5, 5], 11)?;
        let y = avg_pool_2x2_floor(&x)?;
        assert_eq!(y.dims(), &[1, 2, 2, 2]);
        let xv: Vec<Vec<Vec<f64>>> = x.squeeze(0)?.to_vec3()?;
        let yv: Vec<Vec<Vec<f64>>> = y.squeeze(0)?.to_vec3()?;
        let expected = (xv[1][2][2] + xv[1][2][3] + xv[1][3][2] + xv[1][3][3]) / 4.0;
        assert!((yv[1][1][1] - expected).abs() < 1e-12);
        check_input_gradient(&x, avg_pool_2x2_floor, 1e-6)
    }
}
