//! A linear texture model: weighted PCA learned from masked UV maps.

use crate::model::{TextureModel, check_latent};
use crate::params::{load_safetensors, save_safetensors};
use crate::train::TextureDataset;
use crate::{Result, TextureError};
use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, SymmetricEigen};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Standard deviation of a texel's difference from the model, in `[0, 1]` colour units, that
/// [`PcaTextureModel`]'s [`TextureModel::encode`] assumes: what a few dozen components leave
/// of a photo's unwrapped face (pores, stubble, specular spots).
const ENCODE_NOISE: f64 = 0.05;

/// Settings of [`PcaTextureModel::fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct PcaFitOptions {
    /// Number of principal components (the latent size).
    pub components: usize,
    /// Maximum EM iterations.
    pub iterations: usize,
    /// Stop when the relative change of the observed-texel residual falls below this.
    pub tolerance: f64,
    /// Seed of the initial basis.
    pub seed: u64,
}

impl Default for PcaFitOptions {
    fn default() -> Self {
        Self {
            components: 64,
            iterations: 500,
            tolerance: 1e-8,
            seed: 0,
        }
    }
}

/// `texture = mean + sum_k z_k * stddev_k * component_k`: a PCA model whose latent `z` is
/// whitened, so its prior is a standard normal and the penalty is `0.5 * |z|^2`.
#[derive(Debug, Clone)]
pub struct PcaTextureModel {
    mean: Tensor,
    components: Tensor,
    stddev: Tensor,
    height: usize,
    width: usize,
}

/// Orthonormalises the rows of `m` (`[K, D]`) through the Cholesky factor of `m m^T`.
fn orthonormal_rows(m: &Tensor) -> Result<Tensor> {
    let k = m.dim(0)?;
    let gram: Vec<f64> = m
        .matmul(&m.t()?)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let gram = DMatrix::from_row_slice(k, k, &gram) + DMatrix::identity(k, k) * 1e-12;
    let chol = gram.cholesky().ok_or_else(|| {
        TextureError::Data(
            "the data has fewer independent directions than requested components; ask for fewer"
                .into(),
        )
    })?;
    let inv_l = chol
        .l()
        .try_inverse()
        .ok_or_else(|| TextureError::Data("degenerate PCA basis".into()))?;
    let inv_l: Vec<f32> = inv_l
        .transpose()
        .as_slice()
        .iter()
        .map(|&v| v as f32)
        .collect();
    Ok(Tensor::from_vec(inv_l, (k, k), m.device())?.matmul(m)?)
}

impl PcaTextureModel {
    /// Fits the model to `data`, weighting every texel by its mask; a texel that no mask
    /// covers takes its values from the maps as they are.
    ///
    /// This is EM for weighted low-rank approximation (Srebro & Jaakkola, 2003): unobserved
    /// texels are filled with the current reconstruction, `x <- w*x + (1-w)*(mean + A B)`, and a
    /// subspace-iteration step of ordinary PCA runs on the filled data; with 0/1 masks this is
    /// the maximum-likelihood PCA fit of the observed texels. Memory is a few `N x 3HW` f32
    /// matrices; time per iteration is `O(N * 3HW * K)`.
    pub fn fit(data: &TextureDataset, options: &PcaFitOptions) -> Result<Self> {
        let (images, masks) = data.tensors();
        let (n, c, h, w) = images.dims4()?;
        let dim = c * h * w;
        let k = options.components;
        if k == 0 || k >= n.min(dim) {
            return Err(TextureError::InvalidConfig(format!(
                "components must be between 1 and {} (fewer than the {n} textures), got {k}",
                n.min(dim).saturating_sub(1)
            )));
        }
        let x = images.reshape((n, dim))?;
        let observed_weight = masks
            .broadcast_as((n, c, h, w))?
            .reshape((n, dim))?
            .contiguous()?;
        if observed_weight.max_all()?.to_scalar::<f32>()? <= 0.0 {
            return Err(TextureError::Data(
                "no texel is observed in any texture: every mask is empty".into(),
            ));
        }
        // Texels that no texture observes (a UV layout's parts that photos never show) are
        // modelled from the values the maps hold there, e.g. their fills, rather than left
        // undetermined.
        let never_observed = observed_weight
            .sum_keepdim(0)?
            .le(0.0)?
            .to_dtype(DType::F32)?;
        let weight = observed_weight.broadcast_maximum(&never_observed)?;
        let coverage = weight.sum(0)?;
        let mut mean = ((&x * &weight)?.sum(0)? / &coverage)?;
        let missing = weight.affine(-1.0, 1.0)?;
        let observed = (&x * &weight)?;
        let mut filled = (&observed + missing.broadcast_mul(&mean.unsqueeze(0)?)?)?;
        let init = crate::model::standard_normal(k * dim, None, options.seed);
        let mut basis = orthonormal_rows(&Tensor::from_vec(init, (k, dim), x.device())?)?;
        let mut previous = f64::INFINITY;
        for _ in 0..options.iterations {
            let centred = filled.broadcast_sub(&mean.unsqueeze(0)?)?;
            let scores = centred.matmul(&basis.t()?)?;
            basis = orthonormal_rows(&scores.t()?.matmul(&centred)?)?;
            let scores = centred.matmul(&basis.t()?)?;
            let reconstruction = scores.matmul(&basis)?.broadcast_add(&mean.unsqueeze(0)?)?;
            // Summed in f64: in f32 the residual stops changing long before EM has converged.
            let residual = ((&reconstruction - &x)? * &weight)?
                .sqr()?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            filled = (&observed + (&missing * &reconstruction)?)?;
            mean = filled.mean(0)?;
            let converged = previous.is_finite()
                && (previous - residual).abs() <= options.tolerance * previous.max(1e-30);
            previous = residual;
            if converged {
                break;
            }
        }
        // Rotate the basis onto the principal axes of the final scores.
        let centred = filled.broadcast_sub(&mean.unsqueeze(0)?)?;
        let scores = centred.matmul(&basis.t()?)?;
        let cov: Vec<f64> = (scores.t()?.matmul(&scores)? / n as f64)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let eigen = SymmetricEigen::new(DMatrix::from_row_slice(k, k, &cov));
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        let rotation: Vec<f32> = order
            .iter()
            .flat_map(|&j| {
                eigen
                    .eigenvectors
                    .column(j)
                    .iter()
                    .map(|&v| v as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let rotation = Tensor::from_vec(rotation, (k, k), x.device())?;
        let components = rotation.matmul(&basis)?.reshape((k, c, h, w))?;
        let stddev: Vec<f32> = order
            .iter()
            .map(|&j| eigen.eigenvalues[j].max(0.0).sqrt() as f32)
            .collect();
        Ok(Self {
            mean: mean.reshape((c, h, w))?,
            components,
            stddev: Tensor::from_vec(stddev, k, x.device())?,
            height: h,
            width: w,
        })
    }

    /// Mean texture `[3, H, W]`.
    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// Orthonormal components `[K, 3, H, W]`, by decreasing variance.
    pub fn components(&self) -> &Tensor {
        &self.components
    }

    /// Standard deviation of the data along each component `[K]`.
    pub fn stddev(&self) -> &Tensor {
        &self.stddev
    }

    /// Saves `mean`, `components` and `stddev` to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors = BTreeMap::from([
            ("mean".to_string(), self.mean.clone()),
            ("components".to_string(), self.components.clone()),
            ("stddev".to_string(), self.stddev.clone()),
        ]);
        save_safetensors(path.as_ref(), &tensors, HashMap::new())
    }

    /// Loads a model written by [`PcaTextureModel::save`].
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let (tensors, _) = load_safetensors(path, device)?;
        Self::from_loaded(path, tensors)
    }

    /// The model in a loaded file's tensors (`path` names it in errors).
    pub(crate) fn from_loaded(path: &Path, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| {
                TextureError::file(
                    path,
                    format!("tensor `{name}` is missing; expected a PCA texture model file"),
                )
            })
        };
        let (mean, components, stddev) = (take("mean")?, take("components")?, take("stddev")?);
        let (c, height, width) = mean.dims3()?;
        if c != 3
            || components.dims()[1..] != [c, height, width]
            || stddev.dims() != [components.dim(0)?]
        {
            return Err(TextureError::file(
                path,
                "mean, components and stddev shapes disagree",
            ));
        }
        Ok(Self {
            mean,
            components,
            stddev,
            height,
            width,
        })
    }
}

impl TextureModel for PcaTextureModel {
    fn latent_dim(&self) -> usize {
        self.stddev.dim(0).unwrap_or(0)
    }

    fn resolution(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    fn device(&self) -> &Device {
        self.mean.device()
    }

    fn generate(&self, latent: &Tensor) -> Result<Tensor> {
        let b = check_latent(latent, self.latent_dim(), DType::F32)?;
        let k = self.latent_dim();
        let flat = self.components.reshape((k, ()))?;
        let offsets = latent
            .broadcast_mul(&self.stddev.unsqueeze(0)?)?
            .matmul(&flat)?;
        Ok(offsets
            .broadcast_add(&self.mean.flatten_all()?.unsqueeze(0)?)?
            .reshape((b, 3, self.height, self.width))?)
    }

    fn latent_prior(&self, latent: &Tensor) -> Result<Tensor> {
        check_latent(latent, self.latent_dim(), DType::F32)?;
        Ok((latent.sqr()?.sum(1)? * 0.5)?)
    }

    /// The MAP latent for Gaussian texel noise of σ = 0.05: the ridge solution of
    /// `(BᵀWB + σ²I) z = BᵀW (x − mean)` with `B` the components scaled by their deviations.
    fn encode(&self, texture: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
        let (c, h, w) = (3, self.height, self.width);
        if texture.dims() != [1, c, h, w] || weight.dims() != [1, 1, h, w] {
            return Err(TextureError::Data(format!(
                "encode needs a [1, 3, {h}, {w}] texture and a [1, 1, {h}, {w}] weight, got {:?} and {:?}",
                texture.dims(),
                weight.dims()
            )));
        }
        let k = self.latent_dim();
        let basis = self
            .components
            .reshape((k, ()))?
            .broadcast_mul(&self.stddev.unsqueeze(1)?)?;
        let weight = weight
            .to_dtype(DType::F32)?
            .broadcast_as((1, c, h, w))?
            .reshape((1, ()))?;
        let residual =
            (texture.to_dtype(DType::F32)?.reshape((1, ()))? - self.mean.reshape((1, ()))?)?;
        let weighted = basis.broadcast_mul(&weight)?;
        let gram: Vec<f64> = weighted
            .matmul(&basis.t()?)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let rhs: Vec<f64> = weighted
            .matmul(&residual.t()?)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let noise = ENCODE_NOISE * ENCODE_NOISE;
        let system = DMatrix::from_row_slice(k, k, &gram) + DMatrix::identity(k, k) * noise;
        let latent = system
            .cholesky()
            .ok_or_else(|| {
                TextureError::Data("the encoding system is not positive definite".into())
            })?
            .solve(&nalgebra::DVector::from_vec(rhs));
        let latent: Vec<f32> = latent.iter().map(|&v| v as f32).collect();
        Ok(Some(Tensor::from_vec(latent, (1, k), self.mean.device())?))
    }
}
