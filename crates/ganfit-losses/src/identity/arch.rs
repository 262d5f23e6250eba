//! The layout of dlib's face-recognition ResNet, shared by the file reader and the network.
//!
//! dlib defines the network (`dnn_face_recognition_ex.cpp`) as a stem (7×7/2 convolution with 32
//! filters, affine, ReLU, 3×3/2 max-pool) followed by five residual levels, a global average pool
//! and a 128-output fully connected layer without bias. A residual block is
//! `relu(x' + affine(conv3x3(relu(affine(conv3x3(x))))))`; in a down block the first convolution
//! has stride 2 (no padding) and `x'` is `x` average-pooled 2×2/2, zero-padded to the larger
//! shape. Stage `i` here is dlib's `alevel{4-i}`.

/// Side of the square RGB input in pixels.
pub const INPUT_SIZE: usize = 150;

/// Length of the face descriptor.
pub const EMBEDDING_DIM: usize = 128;

/// Filters of the stem convolution.
pub(crate) const STEM_CHANNELS: usize = 32;
pub(crate) const STEM_KERNEL: usize = 7;
pub(crate) const STEM_STRIDE: usize = 2;
pub(crate) const STEM_POOL: usize = 3;
pub(crate) const STEM_POOL_STRIDE: usize = 2;

/// One residual stage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stage {
    pub channels: usize,
    /// Number of residual blocks, the down block included.
    pub blocks: usize,
    /// Whether the first block halves the resolution.
    pub downsamples: bool,
}

/// The residual stages in forward order (dlib's `alevel4` … `alevel0`).
pub(crate) const STAGES: [Stage; 5] = [
    Stage {
        channels: 32,
        blocks: 3,
        downsamples: false,
    },
    Stage {
        channels: 64,
        blocks: 4,
        downsamples: true,
    },
    Stage {
        channels: 128,
        blocks: 3,
        downsamples: true,
    },
    Stage {
        channels: 256,
        blocks: 3,
        downsamples: true,
    },
    Stage {
        channels: 256,
        blocks: 1,
        downsamples: true,
    },
];

/// Name of the stem's convolution and affine layers in the safetensors file.
pub(crate) const STEM_CONV: &str = "stem.conv";
pub(crate) const STEM_AFFINE: &str = "stem.affine";
/// Name of the final fully connected layer.
pub(crate) const FC: &str = "fc";
/// Name of the per-channel input means (R, G, B).
pub(crate) const INPUT_MEAN: &str = "input.mean_rgb";

/// Prefix of the layers of block `block` in stage `stage`; the block's layers are
/// `{prefix}.conv1`, `{prefix}.affine1`, `{prefix}.conv2`, `{prefix}.affine2`.
pub(crate) fn block_prefix(stage: usize, block: usize) -> String {
    format!("stage{stage}.block{block}")
}

/// Whether block `block` of `stage` is a down block.
pub(crate) fn is_down_block(stage: &Stage, block: usize) -> bool {
    stage.downsamples && block == 0
}

/// dlib's default padding of a convolution or pooling window: "same" for stride 1, none otherwise.
pub(crate) fn dlib_padding(kernel: usize, stride: usize) -> usize {
    if stride == 1 { kernel / 2 } else { 0 }
}
