//! The network as candle tensor operations, for devices the fused CPU kernels do not run on
//! (CUDA): the same folded weights, convolutions by candle's `conv2d`, the 3×3/2 max-pool as
//! a gather of each window's largest element, the residual sums zero-padded as dlib's `add_prev` does.
//! Slower than the fused ops on the CPU, but differentiable with candle's autograd anywhere.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Relu};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Storage, Tensor,
};

use super::ops::FixedConv;
use super::stages::Stage;
use super::winograd::Scratch;

/// A convolution with its affine layer folded in: `conv2d(x, weight) + bias`.
#[derive(Debug, Clone)]
struct Conv {
    /// `[O, I, k, k]`.
    weight: Tensor,
    /// `[1, O, 1, 1]`.
    bias: Tensor,
    /// `[I, O, k, k]`, flipped in both spatial dims: the input gradient of a stride-1
    /// convolution is the output gradient convolved with it.
    flipped: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new<T: Scratch>(conv: &FixedConv<T>, device: &Device) -> Result<Self> {
        let (weight, bias, stride, padding) = conv.to_tensors(device)?;
        let k = weight.dim(2)?;
        let reversed = Tensor::from_vec((0..k as u32).rev().collect(), k, device)?;
        let flipped = weight
            .transpose(0, 1)?
            .contiguous()?
            .index_select(&reversed, 2)?
            .index_select(&reversed, 3)?
            .contiguous()?;
        Ok(Self {
            weight,
            bias,
            flipped,
            stride,
            padding,
        })
    }

    /// The convolution plus the bias, through a ReLU if `relu`, as one node of the autograd
    /// graph whose backward is only the input's gradient: candle's own backward of
    /// `relu(conv2d(x, w) + b)` also computes the gradients of the weights and the bias
    /// (constants here), takes the input's from a direct transposed convolution, and sums a
    /// gradient into each intermediate tensor; on a GPU, where each small kernel costs its
    /// launch, that was most of the network's backward pass.
    fn apply(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let conv = x
            .detach()
            .conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        x.apply_op1(ConvOutput {
            conv,
            layer: self.clone(),
            relu,
        })
    }

    /// The gradient with respect to the input `x` from that with respect to the convolution's
    /// output: a convolution with the flipped, transposed weights (a transposed convolution
    /// for strided ones).
    fn input_gradient(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        if self.stride == 1 {
            return grad.conv2d(&self.flipped, k - 1 - self.padding, 1, 1, 1);
        }
        // As candle's own conv2d backward: the rows a strided convolution skipped at the end.
        let covered = (grad.dim(2)? - 1) * self.stride + k - 2 * self.padding;
        let output_padding = x.dim(2)? - covered;
        grad.conv_transpose2d(&self.weight, self.padding, output_padding, self.stride, 1)
    }
}

/// [`Conv::apply`]'s op: a function of the convolution's input whose value, the already
/// computed convolution of the detached input plus the bias (and the ReLU), is finished in
/// the forward pass, and whose backward is [`Conv::input_gradient`].
#[derive(Debug, Clone)]
struct ConvOutput {
    /// `conv2d(x, weight)`, without the bias.
    conv: Tensor,
    layer: Conv,
    relu: bool,
}

impl ConvOutput {
    /// `conv + bias`, through the ReLU if asked for, into a new storage.
    fn finish<S: BackendStorage>(
        &self,
        conv: &S,
        conv_layout: &Layout,
        bias: &S,
        bias_layout: &Layout,
    ) -> Result<S> {
        let bias_layout = bias_layout.broadcast_as(conv_layout.shape())?;
        sum_of_storages(conv, conv_layout, bias, &bias_layout, self.relu)
    }

    /// [`ConvOutput::finish`] on the storages of the convolution and the bias that `on_device`
    /// picks (`None` where they are not on its device, called `device` in the error).
    fn finish_stored<S: BackendStorage>(
        &self,
        on_device: fn(&Storage) -> Option<&S>,
        device: &str,
    ) -> Result<(S, Shape)> {
        let (conv, conv_layout) = self.conv.storage_and_layout();
        let (bias, bias_layout) = self.layer.bias.storage_and_layout();
        let (Some(conv), Some(bias)) = (on_device(&conv), on_device(&bias)) else {
            candle_core::bail!("the convolution and its bias are not on the {device}")
        };
        let out = self.finish(conv, conv_layout, bias, bias_layout)?;
        Ok((out, self.conv.shape().clone()))
    }
}

impl CustomOp1 for ConvOutput {
    fn name(&self) -> &'static str {
        "dlib-conv-output"
    }

    fn cpu_fwd(&self, _input: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        fn on_cpu(storage: &Storage) -> Option<&CpuStorage> {
            match storage {
                Storage::Cpu(storage) => Some(storage),
                _ => None,
            }
        }
        self.finish_stored(on_cpu, "CPU")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        fn on_gpu(storage: &Storage) -> Option<&candle_core::CudaStorage> {
            match storage {
                Storage::Cuda(storage) => Some(storage),
                _ => None,
            }
        }
        self.finish_stored(on_gpu, "GPU")
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = if self.relu {
            // The ReLU passes the gradient where its output is positive; that output is never
            // negative, so its sign is the mask (one kernel instead of a comparison and a cast).
            (grad * res.sign()?)?
        } else {
            grad.clone()
        };
        Ok(Some(self.layer.input_gradient(arg, &grad)?))
    }
}

/// `a + b` (`b` laid out to `a`'s shape), through a ReLU if `relu`, into a new storage.
fn sum_of_storages<S: BackendStorage>(
    a: &S,
    a_layout: &Layout,
    b: &S,
    b_layout: &Layout,
    relu: bool,
) -> Result<S> {
    let sum = a.binary_impl::<Add>(b, a_layout, b_layout)?;
    if relu {
        sum.unary_impl::<Relu>(&Layout::contiguous(a_layout.shape()))
    } else {
        Ok(sum)
    }
}

/// A residual block's output, `relu(main + shortcut)` for two tensors of one shape, as one node
/// of the autograd graph: candle's own add and ReLU are two, whose backward compares, casts and
/// multiplies for the ReLU and sums a gradient into each of the three tensors.
#[derive(Debug, Clone, Copy)]
struct ResidualSum;

impl CustomOp2 for ResidualSum {
    fn name(&self) -> &'static str {
        "dlib-residual-sum"
    }

    fn cpu_fwd(
        &self,
        main: &CpuStorage,
        main_layout: &Layout,
        shortcut: &CpuStorage,
        shortcut_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let sum = sum_of_storages(main, main_layout, shortcut, shortcut_layout, true)?;
        Ok((sum, main_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        main: &candle_core::CudaStorage,
        main_layout: &Layout,
        shortcut: &candle_core::CudaStorage,
        shortcut_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let sum = sum_of_storages(main, main_layout, shortcut, shortcut_layout, true)?;
        Ok((sum, main_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _main: &Tensor,
        _shortcut: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // As in `ConvOutput::bwd`: the output's sign is the ReLU's mask.
        let grad = (grad * res.sign()?)?;
        Ok((Some(grad.clone()), Some(grad)))
    }
}

#[derive(Debug, Clone)]
enum Layer {
    /// Convolution, ReLU, 3×3/2 max-pool.
    Stem(Conv),
    /// Residual blocks: (conv1, conv2, down block).
    Residual(Vec<(Conv, Conv, bool)>),
}

/// The stem and residual stages of [`super::FaceRecognitionNet`] as tensor operations.
#[derive(Debug, Clone)]
pub(crate) struct PortableStages(Vec<Layer>);

impl PortableStages {
    /// The stages' weights on `device`.
    pub fn new<T: Scratch>(stages: &[std::sync::Arc<Stage<T>>], device: &Device) -> Result<Self> {
        let layers = stages
            .iter()
            .map(|stage| {
                Ok(match stage.as_ref() {
                    Stage::Stem { conv, .. } => Layer::Stem(Conv::new(conv, device)?),
                    Stage::Residual(blocks) => Layer::Residual(
                        blocks
                            .iter()
                            .map(|b| {
                                Ok((
                                    Conv::new(&b.conv1, device)?,
                                    Conv::new(&b.conv2, device)?,
                                    b.down,
                                ))
                            })
                            .collect::<Result<_>>()?,
                    ),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self(layers))
    }

    /// Stage `i` applied to `x`.
    pub fn apply(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        match &self.0[i] {
            Layer::Stem(conv) => max_pool_3x3_stride_2(&conv.apply(x, true)?),
            Layer::Residual(blocks) => {
                let mut x = x.clone();
                for (conv1, conv2, down) in blocks {
                    let main = conv2.apply(&conv1.apply(&x, true)?, false)?;
                    let shortcut = if *down {
                        average_pool_2x2_floor(&x)?
                    } else {
                        x.clone()
                    };
                    x = if main.shape() == shortcut.shape() {
                        main.apply_op2(&shortcut, ResidualSum)?
                    } else {
                        (pad_to(&main, &shortcut)? + pad_to(&shortcut, &main)?)?.relu()?
                    };
                }
                Ok(x)
            }
        }
    }
}

/// dlib's 3×3/2 max-pool without padding (candle's own pooling has no gradient when the window
/// is larger than the stride), as a gather of each window's largest element, so that the
/// backward pass is one scatter of the output's gradient. The element is found on the detached
/// input: the nine taps of every window as the channels of a convolution with one-hot kernels
/// (exact: each output is one input times one, plus zeros), their arg-max, and the tap's offset
/// from the window's corner. On a GPU that is a handful of kernels where the maxima of strided
/// views, and their gradients, took about a hundred.
fn max_pool_3x3_stride_2(x: &Tensor) -> Result<Tensor> {
    let (batch, channels, h, w) = x.dims4()?;
    let (oh, ow) = ((h - 3) / 2 + 1, (w - 3) / 2 + 1);
    let device = x.device();
    // Built on the host: one upload instead of the kernels `Tensor::eye` launches.
    let one_hot: Vec<f32> = (0..81).map(|i| f32::from(i / 9 == i % 9)).collect();
    let one_hot = Tensor::from_vec(one_hot, (9, 1, 3, 3), device)?.to_dtype(x.dtype())?;
    let planes = batch * channels;
    let taps = x
        .detach()
        .reshape((planes, 1, h, w))?
        .conv2d(&one_hot, 0, 2, 1, 1)?;
    let tap_offsets: Vec<u32> = (0..9).map(|tap| (tap / 3 * w + tap % 3) as u32).collect();
    let corners: Vec<u32> = (0..planes * oh * ow)
        .map(|i| {
            let (plane, row, column) = (i / (oh * ow), i / ow % oh, i % ow);
            (plane * h * w + 2 * row * w + 2 * column) as u32
        })
        .collect();
    let largest = Tensor::from_vec(tap_offsets, 9, device)?
        .index_select(&taps.argmax(1)?.flatten_all()?, 0)?;
    let index = (Tensor::from_vec(corners, planes * oh * ow, device)? + largest)?;
    x.flatten_all()?
        .gather(&index, 0)?
        .reshape((batch, channels, oh, ow))
}

/// 2×2/2 average pooling that drops an odd last row/column, as dlib does.
fn average_pool_2x2_floor(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.narrow(2, 0, h / 2 * 2)?
        .narrow(3, 0, w / 2 * 2)?
        .contiguous()?
        .avg_pool2d(2)
}

/// `t` zero-padded at the end of the channel and spatial dims to cover `like`.
fn pad_to(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    let (_, c, h, w) = t.dims4()?;
    let (_, lc, lh, lw) = like.dims4()?;
    t.pad_with_zeros(1, 0, lc.max(c) - c)?
        .pad_with_zeros(2, 0, lh.max(h) - h)?
        .pad_with_zeros(3, 0, lw.max(w) - w)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Var};

    use super::max_pool_3x3_stride_2;
    use crate::gradcheck::seeded_tensor;
    use crate::identity::FaceRecognitionNet;

    /// Odd sizes need the padded views; the values are the windows' maxima and the gradient
    /// that of a maximum (ties have measure zero on random inputs).
    #[test]
    fn max_pool_takes_each_windows_maximum_at_odd_and_even_sizes() -> crate::Result<()> {
        for (h, w) in [(7, 8), (9, 9), (6, 11)] {
            let x = seeded_tensor(&[1, 2, h, w], (h * w) as u64)?;
            let pooled: Vec<Vec<Vec<f64>>> = max_pool_3x3_stride_2(&x)?.squeeze(0)?.to_vec3()?;
            let values: Vec<Vec<Vec<f64>>> = x.squeeze(0)?.to_vec3()?;
            let (oh, ow) = ((h - 3) / 2 + 1, (w - 3) / 2 + 1);
            for (c, plane) in pooled.iter().enumerate() {
                assert_eq!((plane.len(), plane[0].len()), (oh, ow));
                for (r, row) in plane.iter().enumerate() {
                    for (k, &got) in row.iter().enumerate() {
                        let want = (0..9)
                            .map(|tap| values[c][2 * r + tap / 3][2 * k + tap % 3])
                            .fold(f64::NEG_INFINITY, f64::max);
                        assert_eq!(got, want, "{h}×{w}, channel {c}, ({r}, {k})");
                    }
                }
            }
            crate::gradcheck::check_input_gradient(&x, max_pool_3x3_stride_2, 1e-6)?;
        }
        Ok(())
    }

    /// The tensor-operation path computes the fused ops' function: same feature maps and
    /// descriptors, and the same input gradient (in f64, so that only the order of sums differs).
    #[test]
    fn portable_stages_match_the_fused_ops() -> crate::Result<()> {
        let fused = FaceRecognitionNet::load(&candle_core::Device::Cpu)?.to_dtype(DType::F64)?;
        let portable = fused.clone().with_portable_stages()?;
        let images = (seeded_tensor(&[2, 3, 150, 150], 3)?.affine(100.0, 0.0)? + 127.0)?;
        let cot = seeded_tensor(&[2, 128], 4)?;
        let run = |net: &FaceRecognitionNet| -> crate::Result<_> {
            let x = Var::from_tensor(&images)?;
            let out = net.forward(x.as_tensor())?;
            let grads = (&out.embedding * &cot)?.sum_all()?.backward()?;
            let grad = grads
                .get(x.as_tensor())
                .cloned()
                .expect("the input has a gradient");
            Ok((out, grad))
        };
        let ((a, ga), (b, gb)) = (run(&fused)?, run(&portable)?);
        let relative = |x: &candle_core::Tensor, y: &candle_core::Tensor| -> crate::Result<f64> {
            let scale = x.abs()?.max_all()?.to_scalar::<f64>()?;
            Ok((x - y)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
        };
        for (x, y) in a.maps.iter().zip(&b.maps) {
            assert!(relative(x, y)? < 1e-10, "feature map {:?}", x.dims());
        }
        assert!(relative(&a.embedding, &b.embedding)? < 1e-10);
        assert!(relative(&ga, &gb)? < 1e-8, "input gradient");
        Ok(())
    }
}
