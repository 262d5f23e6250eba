use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use ganfit_assets::{AssetSource, Resolver};

use crate::blend::AffineBlend;
use crate::data::{ModelData, ModelInfo};
use crate::ict::{ICT_ASSET_ID, IctSource};
use crate::sfm::{SFM_ASSET_ID, SfmSource};
use crate::{MorphableError, Result};

/// A linear 3D morphable face model, `S(p_s, p_e) = mean + U_s·p_s + U_e·p_e`, with its mesh
/// topology, texture coordinates, regions and landmarks. Positions are in millimetres.
#[derive(Debug, Clone)]
pub struct MorphableModel {
    info: ModelInfo,
    /// `[N, 3]`.
    mean: Tensor,
    /// `[K_s + K_e, 3N]`: identity modes, then expression modes.
    basis: Tensor,
    triangles: Vec<[u32; 3]>,
    /// `[T, 3]` u32, the triangles on the model's device.
    triangle_tensor: Tensor,
    uvs: Vec<[f32; 2]>,
    uv_triangles: Vec<[u32; 3]>,
    vertex_sets: BTreeMap<String, Vec<u32>>,
}

/// A mesh part (or any vertex set) cut out of a model and re-indexed.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// The region's name.
    pub name: String,
    /// For each vertex of the region, its index in the whole model: the map back.
    pub vertex_ids: Vec<u32>,
    /// Triangles whose three corners lie in the region, in region vertex indices.
    pub triangles: Vec<[u32; 3]>,
    /// The texture coordinates those triangles use.
    pub uvs: Vec<[f32; 2]>,
    /// For each triangle, its corners' indices into `uvs`.
    pub uv_triangles: Vec<[u32; 3]>,
}

/// Plain positions, triangles and per-corner texture coordinates: what the exporters write.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TexturedMesh {
    /// Vertex positions (millimetres).
    pub positions: Vec<[f32; 3]>,
    /// Triangles, counter-clockwise seen from outside.
    pub triangles: Vec<[u32; 3]>,
    /// Texture coordinates, OBJ convention (v up).
    pub uvs: Vec<[f32; 2]>,
    /// For each triangle, its corners' indices into `uvs`.
    pub uv_triangles: Vec<[u32; 3]>,
}

fn positions_of(vertices: &Tensor, expected: usize) -> Result<Vec<[f32; 3]>> {
    let dims = vertices.dims();
    if dims != [expected, 3] {
        return Err(MorphableError::Coefficients(format!(
            "expected vertices of shape [{expected}, 3], got {dims:?}; pass one instance, not a batch"
        )));
    }
    Ok(vertices
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|v| [v[0], v[1], v[2]])
        .collect())
}

impl MorphableModel {
    /// Builds a model from its CPU arrays, placing the tensors on `device`.
    pub fn from_data(data: ModelData, device: &Device) -> Result<Self> {
        data.validate()
            .map_err(|reason| MorphableError::InvalidModelFile {
                path: format!("(model `{}`)", data.info.name),
                reason,
            })?;
        let n = data.info.n_vertices;
        let k = data.info.shape_modes + data.expression_modes();
        let mut basis = Vec::with_capacity(data.shape_basis.len() + data.expression_basis.len());
        basis.extend_from_slice(&data.shape_basis);
        basis.extend_from_slice(&data.expression_basis);
        let flat: Vec<u32> = data.triangles.iter().flatten().copied().collect();
        Ok(MorphableModel {
            mean: Tensor::from_vec(data.mean, (n, 3), device)?,
            basis: Tensor::from_vec(basis, (k, 3 * n), device)?,
            triangle_tensor: Tensor::from_vec(flat, (data.triangles.len(), 3), device)?,
            triangles: data.triangles,
            uvs: data.uvs,
            uv_triangles: data.uv_triangles,
            vertex_sets: data.vertex_sets,
            info: data.info,
        })
    }

    /// A copy with its tensors on `device` (e.g. a CPU copy of a GPU model, for the steps whose
    /// many small operations a GPU runs slower than a CPU).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(MorphableModel {
            mean: self.mean.to_device(device)?,
            basis: self.basis.to_device(device)?,
            triangle_tensor: self.triangle_tensor.to_device(device)?,
            ..self.clone()
        })
    }

    /// Loads a converted model file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_data(ModelData::read(path)?, device)
    }

    /// Finds (or converts into the cache, on first use) the asset `id` through `resolver`, then
    /// loads it.
    pub fn from_asset(
        resolver: &Resolver,
        id: &str,
        source: &dyn AssetSource,
        device: &Device,
    ) -> Result<Self> {
        let path = resolver.resolve_or_build(id, source)?;
        Self::load(&path, device)
    }

    /// The ICT Face Model Light (26,719 vertices, 100 identity and 53 expression modes),
    /// converted from ICT-FaceKit into the cache on first use.
    pub fn ict(resolver: &Resolver, device: &Device) -> Result<Self> {
        Self::from_asset(resolver, ICT_ASSET_ID, &IctSource::default(), device)
    }

    /// The Surrey Face Model (3,448 vertices, 63 identity modes, 6 expression blendshapes),
    /// converted from eos's files into the cache on first use.
    pub fn sfm(resolver: &Resolver, device: &Device) -> Result<Self> {
        Self::from_asset(resolver, SFM_ASSET_ID, &SfmSource, device)
    }

    /// Names, units, provenance and notes.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The device holding the model's tensors.
    pub fn device(&self) -> &Device {
        self.mean.device()
    }

    /// Number of vertices.
    pub fn n_vertices(&self) -> usize {
        self.info.n_vertices
    }

    /// Number of identity modes.
    pub fn shape_modes(&self) -> usize {
        self.info.shape_modes
    }

    /// Number of expression modes.
    pub fn expression_modes(&self) -> usize {
        self.info.expression_names.len()
    }

    /// Names of the expression modes, in coefficient order.
    pub fn expression_names(&self) -> &[String] {
        &self.info.expression_names
    }

    /// The mean shape as one `[x, y, z]` row per vertex, millimetres.
    pub fn mean_rows(&self) -> Result<Vec<[f32; 3]>> {
        Ok(self
            .mean
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|v| [v[0], v[1], v[2]])
            .collect())
    }

    /// The mean shape, `[N, 3]` millimetres.
    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// Vertex positions `mean + U_s·p_s + U_e·p_e` in millimetres, differentiable with respect to
    /// the coefficients.
    ///
    /// `shape` is `[k_s]` and `expression` `[k_e]` for one face (giving `[N, 3]`), or `[B, k_s]`
    /// and `[B, k_e]` for a batch (giving `[B, N, 3]`). Shorter vectors use only the first modes
    /// (`k_s ≤ shape_modes()`, `k_e ≤ expression_modes()`, either may be 0). Identity
    /// coefficients are in standard deviations; expression coefficients are blendshape weights.
    pub fn instance(&self, shape: &Tensor, expression: &Tensor) -> Result<Tensor> {
        let batched = match (shape.rank(), expression.rank()) {
            (1, 1) => false,
            (2, 2) => true,
            (a, b) => {
                return Err(MorphableError::Coefficients(format!(
                    "shape and expression coefficients must both be vectors [k] or both batches \
                     [B, k]; got ranks {a} and {b}"
                )));
            }
        };
        let (shape, expression) = if batched {
            (shape.clone(), expression.clone())
        } else {
            (shape.unsqueeze(0)?, expression.unsqueeze(0)?)
        };
        let (b, ks) = shape.dims2()?;
        let (be, ke) = expression.dims2()?;
        if b != be {
            return Err(MorphableError::Coefficients(format!(
                "{b} shape coefficient vectors but {be} expression vectors"
            )));
        }
        for (kind, given, available) in [
            ("identity", ks, self.shape_modes()),
            ("expression", ke, self.expression_modes()),
        ] {
            if given > available {
                return Err(MorphableError::Coefficients(format!(
                    "{given} {kind} coefficients given, but `{}` has only {available} {kind} modes",
                    self.name()
                )));
            }
        }
        let n = self.n_vertices();
        let (shape, expression) = (
            shape.to_dtype(DType::F32)?,
            expression.to_dtype(DType::F32)?,
        );
        if self.device().is_cpu() {
            return Ok(shape.contiguous()?.apply_op2(
                &expression.contiguous()?,
                AffineBlend {
                    basis: self.basis.clone(),
                    expression_row: self.shape_modes(),
                    offset: self.mean.clone(),
                    output_shape: Some(if batched {
                        (b, n, 3).into()
                    } else {
                        (n, 3).into()
                    }),
                },
            )?);
        }
        // Elsewhere candle's matmul (whose backward also forms an unused basis gradient).
        let mut sum = self.mean.flatten_all()?.unsqueeze(0)?.repeat((b, 1))?;
        for (coeffs, first_row, k) in [(shape, 0, ks), (expression, self.shape_modes(), ke)] {
            if k > 0 {
                sum = (sum + coeffs.matmul(&self.basis.narrow(0, first_row, k)?)?)?;
            }
        }
        let vertices = sum.reshape((b, n, 3))?;
        Ok(if batched {
            vertices
        } else {
            vertices.squeeze(0)?
        })
    }

    /// The expression blendshapes as morph targets for [`export::write_glb_with_targets`]:
    /// each one's offsets of every vertex at weight 1 (blendshapes add to any identity), named
    /// as the model names them (ICT's are ARKit's), weighted by `weights` (`[k_e]`, missing ones
    /// 0), e.g. a fitted expression.
    ///
    /// [`export::write_glb_with_targets`]: crate::export::write_glb_with_targets
    pub fn expression_targets(&self, weights: &Tensor) -> Result<Vec<crate::export::MorphTarget>> {
        let weights: Vec<f32> = weights.to_dtype(DType::F32)?.to_vec1()?;
        let modes = self.expression_modes();
        if weights.len() > modes {
            return Err(MorphableError::Coefficients(format!(
                "{} expression weights given, but `{}` has only {modes} expression modes",
                weights.len(),
                self.name()
            )));
        }
        let basis = self
            .basis
            .narrow(0, self.shape_modes(), modes)?
            .to_vec2::<f32>()?;
        Ok(basis
            .into_iter()
            .enumerate()
            .map(|(j, row)| crate::export::MorphTarget {
                name: self
                    .expression_names()
                    .get(j)
                    .cloned()
                    .unwrap_or_else(|| format!("expression{j}")),
                offsets: row.chunks_exact(3).map(|o| [o[0], o[1], o[2]]).collect(),
                weight: weights.get(j).copied().unwrap_or(0.0),
            })
            .collect())
    }

    /// Triangles (vertex indices), counter-clockwise seen from outside; quads of the source
    /// are split into two triangles.
    pub fn triangles(&self) -> &[[u32; 3]] {
        &self.triangles
    }

    /// Texture coordinates (OBJ convention: origin bottom-left, v up). There may be more UVs than
    /// vertices: a vertex on a texture seam has one UV per side.
    pub fn uvs(&self) -> &[[f32; 2]] {
        &self.uvs
    }

    /// The UV index buffer: for each triangle, its three corners' indices into [`uvs`](Self::uvs).
    pub fn uv_triangles(&self) -> &[[u32; 3]] {
        &self.uv_triangles
    }

    /// The vertex of each of the 68 iBUG / Multi-PIE landmarks (0-based, in iBUG order), or
    /// `None` where the model has no fixed vertex (the SFM's jaw contour, chosen per pose).
    pub fn landmark_vertex_ids(&self) -> &[Option<u32>] {
        &self.info.landmarks
    }

    /// Names of the regions and vertex sets the model defines.
    pub fn vertex_set_names(&self) -> impl Iterator<Item = &str> {
        self.vertex_sets.keys().map(String::as_str)
    }

    /// A named vertex set: mesh regions (sorted) (ICT: `face`, `narrow_face`, `head_and_neck`,
    /// `skin`, `mouth_socket`, `teeth`, `gums_and_tongue`, `eyeball_left`, …, SFM: `face`) and
    /// fitting sets (ICT: `rigid`, `fitting`, `lap_rigid`; SFM: `contour_right`,
    /// `contour_left`, ordered along the contour).
    pub fn vertex_set(&self, name: &str) -> Result<&[u32]> {
        self.vertex_sets
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| MorphableError::UnknownRegion {
                model: self.name().to_string(),
                name: name.to_string(),
                known: self.vertex_set_names().collect::<Vec<_>>().join(", "),
            })
    }

    /// The sub-mesh of a region: its vertices (with their indices in the whole model), the
    /// triangles lying entirely inside it and their UVs, all re-indexed.
    pub fn region(&self, name: &str) -> Result<Region> {
        Ok(self.region_of(name, self.vertex_set(name)?.to_vec()))
    }

    /// The sub-mesh on `vertex_ids` (distinct, in range), named `name`.
    fn region_of(&self, name: &str, vertex_ids: Vec<u32>) -> Region {
        let mut new_index = vec![u32::MAX; self.n_vertices()];
        for (new, &old) in vertex_ids.iter().enumerate() {
            new_index[old as usize] = new as u32;
        }
        let mut new_uv = vec![u32::MAX; self.uvs.len()];
        let mut region = Region {
            name: name.to_string(),
            vertex_ids,
            triangles: Vec::new(),
            uvs: Vec::new(),
            uv_triangles: Vec::new(),
        };
        for (tri, uv_tri) in self.triangles.iter().zip(&self.uv_triangles) {
            let mapped = tri.map(|v| new_index[v as usize]);
            if mapped.contains(&u32::MAX) {
                continue;
            }
            region.triangles.push(mapped);
            region.uv_triangles.push(uv_tri.map(|t| {
                let slot = &mut new_uv[t as usize];
                if *slot == u32::MAX {
                    *slot = region.uvs.len() as u32;
                    region.uvs.push(self.uvs[t as usize]);
                }
                *slot
            }));
        }
        region
    }

    /// A model of one region alone (e.g. `face` for fitting): its vertices, triangles, UVs,
    /// landmarks and vertex sets re-indexed. Landmarks outside the region become `None`, vertex
    /// sets are cut to the region. [`Region::vertex_ids`] of `self.region(name)` maps back.
    pub fn region_model(&self, name: &str) -> Result<MorphableModel> {
        self.model_of(self.region(name)?)
    }

    /// A model of any vertex subset, in the order given, named `name`: e.g. only the landmark
    /// vertices, which makes a landmark-only fit cheap. Vertex ids must be distinct and in range.
    pub fn subset_model(&self, name: &str, vertex_ids: &[u32]) -> Result<MorphableModel> {
        let mut seen = vec![false; self.n_vertices()];
        for &v in vertex_ids {
            let slot = seen.get_mut(v as usize).ok_or_else(|| {
                MorphableError::Coefficients(format!(
                    "vertex {v} is out of range: `{}` has {} vertices",
                    self.name(),
                    self.n_vertices()
                ))
            })?;
            if std::mem::replace(slot, true) {
                return Err(MorphableError::Coefficients(format!(
                    "vertex {v} appears twice in the subset `{name}`"
                )));
            }
        }
        self.model_of(self.region_of(name, vertex_ids.to_vec()))
    }

    fn model_of(&self, region: Region) -> Result<MorphableModel> {
        let name = region.name.as_str();
        let n = region.vertex_ids.len();
        let mut new_index = vec![None; self.n_vertices()];
        for (new, &old) in region.vertex_ids.iter().enumerate() {
            new_index[old as usize] = Some(new as u32);
        }
        let ids = Tensor::from_vec(region.vertex_ids.clone(), n, self.device())?;
        let k = self.shape_modes() + self.expression_modes();
        let basis = self
            .basis
            .reshape((k, self.n_vertices(), 3))?
            .index_select(&ids, 1)?
            .reshape((k, 3 * n))?;
        let vertex_sets = self
            .vertex_sets
            .iter()
            .filter_map(|(set, members)| {
                let kept: Vec<u32> = members
                    .iter()
                    .filter_map(|&v| new_index[v as usize])
                    .collect();
                (!kept.is_empty()).then(|| (set.clone(), kept))
            })
            .collect();
        let mut info = self.info.clone();
        info.name = format!("{} ({name})", self.info.name);
        info.n_vertices = n;
        info.landmarks = info
            .landmarks
            .iter()
            .map(|l| l.and_then(|v| new_index[v as usize]))
            .collect();
        let flat: Vec<u32> = region.triangles.iter().flatten().copied().collect();
        Ok(MorphableModel {
            info,
            mean: self.mean.index_select(&ids, 0)?,
            basis,
            triangle_tensor: Tensor::from_vec(flat, (region.triangles.len(), 3), self.device())?,
            triangles: region.triangles,
            uvs: region.uvs,
            uv_triangles: region.uv_triangles,
            vertex_sets,
        })
    }

    /// Area-weighted unit vertex normals of `vertices` (`[N, 3]` or `[B, N, 3]`) on this
    /// model's triangles, differentiable. See [`crate::vertex_normals`].
    pub fn vertex_normals(&self, vertices: &Tensor) -> Result<Tensor> {
        crate::normals::vertex_normals(vertices, &self.triangle_tensor)
    }

    /// The mesh of one instance (`[N, 3]` vertices) with this model's triangles and UVs, ready to
    /// export.
    pub fn mesh(&self, vertices: &Tensor) -> Result<TexturedMesh> {
        Ok(TexturedMesh {
            positions: positions_of(vertices, self.n_vertices())?,
            triangles: self.triangles.clone(),
            uvs: self.uvs.clone(),
            uv_triangles: self.uv_triangles.clone(),
        })
    }
}

impl Region {
    /// The region's mesh, with positions taken from `vertices` (`[N, 3]`) of the whole model.
    pub fn mesh(&self, vertices: &Tensor) -> Result<TexturedMesh> {
        let ids = Tensor::from_vec(
            self.vertex_ids.clone(),
            self.vertex_ids.len(),
            vertices.device(),
        )?;
        let covers_region = vertices.rank() == 2
            && self
                .vertex_ids
                .iter()
                .all(|&v| (v as usize) < vertices.dims()[0]);
        if !covers_region {
            return Err(MorphableError::Coefficients(format!(
                "region `{}` needs the whole model's vertices [N, 3], got {:?}",
                self.name,
                vertices.dims()
            )));
        }
        let selected = vertices.index_select(&ids, 0)?;
        Ok(TexturedMesh {
            positions: positions_of(&selected, self.vertex_ids.len())?,
            triangles: self.triangles.clone(),
            uvs: self.uvs.clone(),
            uv_triangles: self.uv_triangles.clone(),
        })
    }
}

/// Component `i` of the last dimension, keeping that dimension.
fn component(t: &Tensor, i: usize) -> candle_core::Result<Tensor> {
    t.narrow(D::Minus1, i, 1)
}

/// Cross product along the last dimension.
pub(crate) fn cross(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (ax, ay, az) = (component(a, 0)?, component(a, 1)?, component(a, 2)?);
    let (bx, by, bz) = (component(b, 0)?, component(b, 1)?, component(b, 2)?);
    let x = ((&ay * &bz)? - (&az * &by)?)?;
    let y = ((&az * &bx)? - (&ax * &bz)?)?;
    let z = ((&ax * &by)? - (&ay * &bx)?)?;
    Tensor::cat(&[x, y, z], D::Minus1)
}
