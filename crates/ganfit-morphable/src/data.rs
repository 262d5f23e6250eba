//! The model as plain CPU arrays, and its on-disk form: one safetensors file whose single
//! metadata key holds a JSON description, so the bytes depend only on the content.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::{MorphableError, Result};

/// Number of iBUG / Multi-PIE facial landmarks.
pub const LANDMARK_COUNT: usize = 68;

/// Identifies the file format; bumped whenever the layout changes.
const FORMAT: &str = "ganfit-morphable-model/1";
const METADATA_KEY: &str = "ganfit_model";

/// Descriptive part of a model: names, units, provenance, landmarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Human-readable model name.
    pub name: String,
    /// Licence of the model data.
    pub license: String,
    /// Where the data came from.
    pub source: String,
    /// The units of the original data (ganfit always stores millimetres).
    pub source_units: String,
    /// Millimetres per original unit (10 for ICT-FaceKit's centimetres).
    pub mm_per_source_unit: f64,
    /// Number of vertices.
    pub n_vertices: usize,
    /// Number of identity (shape) modes.
    pub shape_modes: usize,
    /// Names of the expression modes, in order.
    pub expression_names: Vec<String>,
    /// The vertex of each of the 68 iBUG landmarks (0-based), where the model defines one.
    pub landmarks: Vec<Option<u32>>,
    /// How to read the coefficients and the UVs.
    pub notes: String,
}

/// A complete model as CPU arrays, all positions in millimetres.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelData {
    /// Descriptive fields.
    pub info: ModelInfo,
    /// Mean shape, `x0, y0, z0, x1, …`.
    pub mean: Vec<f32>,
    /// Identity modes, one after another, each scaled to one standard deviation.
    pub shape_basis: Vec<f32>,
    /// Expression modes (blendshape offsets), one after another.
    pub expression_basis: Vec<f32>,
    /// Triangles as vertex indices, counter-clockwise seen from outside.
    pub triangles: Vec<[u32; 3]>,
    /// Texture coordinates (OBJ convention: v grows upwards).
    pub uvs: Vec<[f32; 2]>,
    /// For each triangle, its corners' indices into `uvs`.
    pub uv_triangles: Vec<[u32; 3]>,
    /// Named vertex sets: mesh regions (e.g. `face`, sorted) and fitting sets (e.g. `rigid`;
    /// contours are ordered along the contour).
    pub vertex_sets: BTreeMap<String, Vec<u32>>,
}

/// What the single metadata entry holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    info: ModelInfo,
    /// Vertex sets as sorted lists of half-open `[start, end)` runs: compact for the ICT ranges.
    vertex_sets: BTreeMap<String, Vec<[u32; 2]>>,
}

fn to_runs(ids: &[u32]) -> Vec<[u32; 2]> {
    let mut runs: Vec<[u32; 2]> = Vec::new();
    for &i in ids {
        match runs.last_mut() {
            Some(run) if run[1] == i => run[1] = i + 1,
            _ => runs.push([i, i + 1]),
        }
    }
    runs
}

/// A little-endian tensor for safetensors.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw_f32(shape: Vec<usize>, values: impl Iterator<Item = f32>) -> Raw {
    Raw {
        dtype: Dtype::F32,
        shape,
        bytes: values.flat_map(f32::to_le_bytes).collect(),
    }
}

fn raw_u32(shape: Vec<usize>, values: impl Iterator<Item = u32>) -> Raw {
    Raw {
        dtype: Dtype::U32,
        shape,
        bytes: values.flat_map(u32::to_le_bytes).collect(),
    }
}

fn in_range<'a>(
    mut ids: impl Iterator<Item = &'a u32>,
    limit: usize,
    what: &str,
) -> std::result::Result<(), String> {
    match ids.find(|&&i| i as usize >= limit) {
        Some(i) => Err(format!("{what} refers to {i}, past the {limit} entries")),
        None => Ok(()),
    }
}

impl ModelData {
    /// Number of expression modes.
    pub fn expression_modes(&self) -> usize {
        self.info.expression_names.len()
    }

    /// Checks that every array has the size the others imply and every index is in range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.info.n_vertices;
        let coords = 3 * n;
        let expect = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what} has {got} values, expected {want}"))
            }
        };
        expect("mean", self.mean.len(), coords)?;
        expect(
            "shape basis",
            self.shape_basis.len(),
            coords * self.info.shape_modes,
        )?;
        let ke = self.expression_modes();
        expect("expression basis", self.expression_basis.len(), coords * ke)?;
        expect(
            "uv triangles",
            self.uv_triangles.len(),
            self.triangles.len(),
        )?;
        expect("landmarks", self.info.landmarks.len(), LANDMARK_COUNT)?;
        in_range(self.triangles.iter().flatten(), n, "a triangle")?;
        in_range(
            self.uv_triangles.iter().flatten(),
            self.uvs.len(),
            "a uv triangle",
        )?;
        in_range(self.info.landmarks.iter().flatten(), n, "a landmark")?;
        for (name, ids) in &self.vertex_sets {
            in_range(ids.iter(), n, &format!("vertex set `{name}`"))?;
        }
        if self
            .mean
            .iter()
            .chain(&self.shape_basis)
            .chain(&self.expression_basis)
            .any(|x| !x.is_finite())
        {
            return Err("the model holds non-finite numbers".to_string());
        }
        Ok(())
    }

    /// The exact bytes of the model file. Deterministic: equal models give equal bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let invalid = |reason: String| MorphableError::InvalidModelFile {
            path: "(model being written)".to_string(),
            reason,
        };
        self.validate().map_err(invalid)?;
        let n = self.info.n_vertices;
        let header = Header {
            format: FORMAT.to_string(),
            info: self.info.clone(),
            vertex_sets: self
                .vertex_sets
                .iter()
                .map(|(k, v)| (k.clone(), to_runs(v)))
                .collect(),
        };
        let json = serde_json::to_string(&header).map_err(|e| invalid(e.to_string()))?;
        let t = self.triangles.len();
        let tensors = vec![
            ("mean", raw_f32(vec![n, 3], self.mean.iter().copied())),
            (
                "shape_basis",
                raw_f32(
                    vec![self.info.shape_modes, n, 3],
                    self.shape_basis.iter().copied(),
                ),
            ),
            (
                "expression_basis",
                raw_f32(
                    vec![self.expression_modes(), n, 3],
                    self.expression_basis.iter().copied(),
                ),
            ),
            (
                "triangles",
                raw_u32(vec![t, 3], self.triangles.iter().flatten().copied()),
            ),
            (
                "uvs",
                raw_f32(vec![self.uvs.len(), 2], self.uvs.iter().flatten().copied()),
            ),
            (
                "uv_triangles",
                raw_u32(vec![t, 3], self.uv_triangles.iter().flatten().copied()),
            ),
        ];
        let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
        safetensors::serialize(tensors, Some(metadata)).map_err(|e| invalid(e.to_string()))
    }

    /// Writes the model file to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| MorphableError::io("cannot write", path, e))
    }

    /// Reads a model file written by [`ModelData::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| MorphableError::io("cannot read", path, e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses the bytes of a model file; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let invalid = |reason: String| MorphableError::InvalidModelFile {
            path: origin.to_string(),
            reason,
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| invalid(e.to_string()))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| invalid(format!("it has no `{METADATA_KEY}` metadata")))?;
        let header: Header = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        if header.format != FORMAT {
            return Err(invalid(format!(
                "its format is `{}`, this ganfit reads `{FORMAT}`",
                header.format
            )));
        }
        // The tensor's little-endian 4-byte words, converted straight into the result (the
        // bases are tens of megabytes: no intermediate copy).
        let words = |name: &str, dtype: Dtype| -> Result<std::slice::ChunksExact<'_, u8>> {
            let view = st
                .tensor(name)
                .map_err(|e| invalid(format!("tensor `{name}`: {e}")))?;
            if view.dtype() != dtype {
                return Err(invalid(format!(
                    "tensor `{name}` is {:?}, expected {dtype:?}",
                    view.dtype()
                )));
            }
            Ok(view.data().chunks_exact(4))
        };
        let word = |c: &[u8]| [c[0], c[1], c[2], c[3]];
        let f32s = |name: &str| -> Result<Vec<f32>> {
            Ok(words(name, Dtype::F32)?
                .map(|c| f32::from_le_bytes(word(c)))
                .collect())
        };
        let u32s = |name: &str| -> Result<Vec<u32>> {
            Ok(words(name, Dtype::U32)?
                .map(|c| u32::from_le_bytes(word(c)))
                .collect())
        };
        let triples = |v: Vec<u32>| v.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
        let mut vertex_sets = BTreeMap::new();
        for (name, runs) in header.vertex_sets {
            let mut ids = Vec::new();
            for [start, end] in runs {
                if end <= start || end as usize > header.info.n_vertices {
                    return Err(invalid(format!(
                        "vertex set `{name}` has a bad run {start}..{end}"
                    )));
                }
                ids.extend(start..end);
            }
            vertex_sets.insert(name, ids);
        }
        let data = ModelData {
            mean: f32s("mean")?,
            shape_basis: f32s("shape_basis")?,
            expression_basis: f32s("expression_basis")?,
            triangles: triples(u32s("triangles")?),
            uvs: f32s("uvs")?.chunks_exact(2).map(|c| [c[0], c[1]]).collect(),
            uv_triangles: triples(u32s("uv_triangles")?),
            vertex_sets,
            info: header.info,
        };
        data.validate().map_err(invalid)?;
        Ok(data)
    }
}
