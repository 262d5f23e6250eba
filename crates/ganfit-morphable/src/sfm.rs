//! The Surrey Face Model as eos distributes it: cereal binary archives plus TOML/JSON side files.
//!
//! The byte layout is documented in `../shared/assets/eos-sfm/README.md`. Every length read from
//! a file is checked against the bytes that remain before anything is allocated, so a truncated or
//! foreign file yields [`MorphableError::Truncated`] or [`MorphableError::InvalidSource`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ganfit_assets::{AssetSource, BuildError, SearchedPlace};

use crate::data::{LANDMARK_COUNT, ModelData, ModelInfo};
use crate::{MorphableError, Result};

/// File names of the eos model files the converter reads.
pub const SFM_SHAPE_FILE: &str = "sfm_shape_3448.bin";
/// The expression blendshapes that belong to [`SFM_SHAPE_FILE`].
pub const SFM_EXPRESSION_FILE: &str = "expression_blendshapes_3448.bin";
const SFM_LANDMARK_FILE: &str = "ibug_to_sfm.txt";
const SFM_CONTOUR_FILE: &str = "sfm_model_contours.json";
const SFM_HINT: &str = "eos's share/ folder (github.com/patrikhuber/eos, commit ce984207)";

/// Asset id of the converted Surrey Face Model in `weights-manifest.toml`.
pub const SFM_ASSET_ID: &str = "sfm-face-model";

/// Bounds-checked little-endian reader over one cereal binary archive.
struct CerealReader<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> CerealReader<'a> {
    fn new(file: &'a str, bytes: &'a [u8]) -> Self {
        CerealReader {
            file,
            bytes,
            pos: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Takes `count` items of `item_size` bytes, after checking that they exist.
    fn take(&mut self, count: u64, item_size: u64, what: &str) -> Result<&'a [u8]> {
        let available = self.remaining() as u64;
        let needed = count.saturating_mul(item_size);
        if needed > available {
            return Err(MorphableError::Truncated {
                file: self.file.to_string(),
                what: what.to_string(),
                offset: self.pos as u64,
                needed,
                available,
            });
        }
        let start = self.pos;
        // `needed <= available` fits in usize because `available` does.
        self.pos += needed as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(1, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        let b = self.take(1, 4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(1, 8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn invalid(&self, reason: String) -> MorphableError {
        MorphableError::InvalidSource {
            file: self.file.to_string(),
            format: "eos cereal binary",
            reason,
        }
    }

    /// An Eigen float matrix: `i32 rows, i32 cols`, then column-major data.
    fn matrix(&mut self, what: &str) -> Result<Matrix> {
        let rows = self.i32(what)?;
        let cols = self.i32(what)?;
        let (Ok(rows), Ok(cols)) = (usize::try_from(rows), usize::try_from(cols)) else {
            return Err(self.invalid(format!("{what} has negative size {rows} x {cols}")));
        };
        let data = self.take((rows as u64) * (cols as u64), 4, what)?;
        Ok(Matrix {
            rows,
            cols,
            data: f32s(data),
        })
    }

    fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.invalid(format!(
                "{n} unexpected bytes after the last field at offset {}",
                self.pos
            ))),
        }
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// An Eigen matrix as cereal stores it (column-major).
struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

/// A PCA model as stored in an eos archive: mean, orthonormal basis, eigenvalues, triangles.
struct PcaModel {
    mean: Matrix,
    basis: Matrix,
    eigenvalues: Matrix,
    triangles: Vec<[u32; 3]>,
}

fn read_pca(r: &mut CerealReader<'_>, name: &str) -> Result<PcaModel> {
    let mean = r.matrix(&format!("{name} mean"))?;
    let basis = r.matrix(&format!("{name} basis"))?;
    let eigenvalues = r.matrix(&format!("{name} eigenvalues"))?;
    let what = format!("{name} triangle list");
    let count = r.u64(&what)?;
    let raw = r.take(count, 12, &what)?;
    let mut triangles = Vec::with_capacity(raw.len() / 12);
    for t in raw.chunks_exact(12) {
        let idx = |i: usize| i32::from_le_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        let corners = [idx(0), idx(4), idx(8)];
        let mut out = [0u32; 3];
        for (o, c) in out.iter_mut().zip(corners) {
            *o = u32::try_from(c)
                .map_err(|_| r.invalid(format!("{what} has a negative vertex index {c}")))?;
        }
        triangles.push(out);
    }
    Ok(PcaModel {
        mean,
        basis,
        eigenvalues,
        triangles,
    })
}

/// The shape-only Surrey Face Model file (`sfm_shape_3448.bin`), parsed.
#[derive(Debug, Clone)]
pub struct SfmShapeFile {
    /// Mean shape, `x0, y0, z0, x1, …` in millimetres.
    pub mean: Vec<f32>,
    /// Orthonormal PCA basis, one mode after another (each of length `mean.len()`).
    pub orthonormal_basis: Vec<f32>,
    /// PCA variances, one per mode.
    pub eigenvalues: Vec<f32>,
    /// Triangles, 0-based vertex indices.
    pub triangles: Vec<[u32; 3]>,
    /// Per-vertex texture coordinates.
    pub uvs: Vec<[f32; 2]>,
}

impl SfmShapeFile {
    /// Parses the bytes of an eos `MorphableModel` archive (class version 1); `file` names it in
    /// errors.
    pub fn parse(bytes: &[u8], file: &str) -> Result<Self> {
        let mut r = CerealReader::new(file, bytes);
        let version = r.u32("class version")?;
        if version != 1 {
            return Err(r.invalid(format!(
                "class version {version}; only version 1 (shape model without expressions) is \
                 supported"
            )));
        }
        let shape = read_pca(&mut r, "shape model")?;
        // The low-resolution SFM has an empty colour model; it is read only to get past it.
        read_pca(&mut r, "colour model")?;
        let what = "texture coordinates";
        let count = r.u64(what)?;
        let raw = r.take(count, 16, what)?;
        let uvs = raw
            .chunks_exact(16)
            .map(|c| {
                let f = |i: usize| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&c[i..i + 8]);
                    f64::from_le_bytes(a) as f32
                };
                [f(0), f(8)]
            })
            .collect::<Vec<_>>();
        r.finish()?;

        let PcaModel {
            mean,
            basis,
            eigenvalues,
            triangles,
        } = shape;
        if mean.cols != 1 || mean.rows == 0 || mean.rows % 3 != 0 {
            return Err(r.invalid(format!(
                "the mean is {} x {}; expected a 3·vertices x 1 column",
                mean.rows, mean.cols
            )));
        }
        let n_vertices = mean.rows / 3;
        if basis.rows != mean.rows {
            return Err(r.invalid(format!(
                "the basis has {} rows but the mean has {}",
                basis.rows, mean.rows
            )));
        }
        if eigenvalues.cols != 1 || eigenvalues.rows != basis.cols {
            return Err(r.invalid(format!(
                "{} x {} eigenvalues for {} modes",
                eigenvalues.rows, eigenvalues.cols, basis.cols
            )));
        }
        if let Some(bad) = eigenvalues
            .data
            .iter()
            .find(|e| !e.is_finite() || **e < 0.0)
        {
            return Err(r.invalid(format!("eigenvalue {bad} is not a variance")));
        }
        if let Some(t) = triangles
            .iter()
            .find(|t| t.iter().any(|&i| i as usize >= n_vertices))
        {
            return Err(r.invalid(format!(
                "triangle {t:?} refers past the {n_vertices} vertices"
            )));
        }
        if uvs.len() != n_vertices {
            return Err(r.invalid(format!(
                "{} texture coordinates for {n_vertices} vertices",
                uvs.len()
            )));
        }
        Ok(SfmShapeFile {
            mean: mean.data,
            orthonormal_basis: basis.data,
            eigenvalues: eigenvalues.data,
            triangles,
            uvs,
        })
    }
}

/// Parses an eos blendshape archive (`expression_blendshapes_3448.bin`): names and per-vertex
/// offsets, each of length `3 · vertices`.
pub fn parse_blendshapes(bytes: &[u8], file: &str) -> Result<Vec<(String, Vec<f32>)>> {
    let mut r = CerealReader::new(file, bytes);
    let count = r.u64("blendshape count")?;
    // Each blendshape takes at least 16 bytes (name length and matrix size), which bounds the
    // count before anything is reserved.
    if count > (r.remaining() / 16) as u64 {
        return Err(r.invalid(format!(
            "it announces {count} blendshapes, more than its {} bytes can hold",
            bytes.len()
        )));
    }
    let mut shapes = Vec::with_capacity(count as usize);
    for i in 0..count {
        let what = format!("name of blendshape {i}");
        let len = r.u64(&what)?;
        let name = std::str::from_utf8(r.take(len, 1, &what)?)
            .map_err(|_| r.invalid(format!("{what} is not UTF-8")))?
            .to_string();
        let m = r.matrix(&format!("offsets of blendshape `{name}`"))?;
        if m.cols != 1 || m.rows % 3 != 0 {
            return Err(r.invalid(format!(
                "blendshape `{name}` is {} x {}; expected a 3·vertices x 1 column",
                m.rows, m.cols
            )));
        }
        shapes.push((name, m.data));
    }
    r.finish()?;
    Ok(shapes)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| MorphableError::io("cannot read", path, e))
}

fn source_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MorphableError::MissingEntry {
            container: dir.display().to_string(),
            entry: name.to_string(),
            hint: SFM_HINT,
        })
    }
}

fn invalid_text(path: &Path, format: &'static str, reason: impl ToString) -> MorphableError {
    MorphableError::InvalidSource {
        file: path.display().to_string(),
        format,
        reason: reason.to_string(),
    }
}

/// iBUG-68 landmark → vertex map from `ibug_to_sfm.txt` (its `[landmark_mappings]` table).
fn read_landmarks(path: &Path, n_vertices: usize) -> Result<Vec<Option<u32>>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| MorphableError::io("cannot read", path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| invalid_text(path, "TOML", e))?;
    let mappings = table
        .get("landmark_mappings")
        .and_then(|m| m.as_table())
        .ok_or_else(|| invalid_text(path, "TOML", "it has no [landmark_mappings] table"))?;
    let mut landmarks = vec![None; LANDMARK_COUNT];
    for (key, value) in mappings {
        let ibug: usize = key
            .parse()
            .ok()
            .filter(|k| (1..=LANDMARK_COUNT).contains(k))
            .ok_or_else(|| invalid_text(path, "TOML", format!("`{key}` is not an iBUG-68 id")))?;
        let vertex = value
            .as_integer()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| (v as usize) < n_vertices)
            .ok_or_else(|| {
                invalid_text(
                    path,
                    "TOML",
                    format!("landmark {key} maps to `{value}`, not a vertex"),
                )
            })?;
        landmarks[ibug - 1] = Some(vertex);
    }
    Ok(landmarks)
}

/// The right and left contour candidate vertices from `sfm_model_contours.json`.
fn read_contours(path: &Path, n_vertices: usize) -> Result<BTreeMap<String, Vec<u32>>> {
    #[derive(serde::Deserialize)]
    struct Contours {
        model_contour: Sides,
    }
    #[derive(serde::Deserialize)]
    struct Sides {
        right_contour: Vec<u32>,
        left_contour: Vec<u32>,
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| MorphableError::io("cannot read", path, e))?;
    let c: Contours = serde_json::from_str(&text).map_err(|e| invalid_text(path, "JSON", e))?;
    let mut sets = BTreeMap::new();
    for (name, ids) in [
        ("contour_right", c.model_contour.right_contour),
        ("contour_left", c.model_contour.left_contour),
    ] {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n_vertices) {
            return Err(invalid_text(
                path,
                "JSON",
                format!("vertex {bad} is out of range"),
            ));
        }
        sets.insert(name.to_string(), ids);
    }
    Ok(sets)
}

/// Converts the eos Surrey Face Model folder (`sfm_shape_3448.bin`,
/// `expression_blendshapes_3448.bin`, `ibug_to_sfm.txt`, `sfm_model_contours.json`) into
/// ganfit's model representation.
///
/// The PCA basis is scaled by the square roots of its eigenvalues, as eos does at load time, so
/// shape coefficients are in standard deviations. Expression coefficients are blendshape weights
/// (eos fits them non-negative). The SFM is already in millimetres.
pub fn convert_sfm(dir: &Path) -> Result<ModelData> {
    let shape_path = source_file(dir, SFM_SHAPE_FILE)?;
    let shape = SfmShapeFile::parse(&read_file(&shape_path)?, &shape_path.display().to_string())?;
    let expr_path = source_file(dir, SFM_EXPRESSION_FILE)?;
    let blendshapes = parse_blendshapes(&read_file(&expr_path)?, &expr_path.display().to_string())?;
    let n_coords = shape.mean.len();
    let n_vertices = n_coords / 3;
    if let Some((name, _)) = blendshapes.iter().find(|(_, d)| d.len() != n_coords) {
        return Err(invalid_text(
            &expr_path,
            "eos cereal binary",
            format!("blendshape `{name}` does not have {n_vertices} vertices like the shape model"),
        ));
    }
    let landmarks = read_landmarks(&source_file(dir, SFM_LANDMARK_FILE)?, n_vertices)?;
    let mut vertex_sets = read_contours(&source_file(dir, SFM_CONTOUR_FILE)?, n_vertices)?;
    vertex_sets.insert("face".to_string(), (0..n_vertices as u32).collect());

    let shape_basis = shape
        .orthonormal_basis
        .chunks_exact(n_coords)
        .zip(&shape.eigenvalues)
        .flat_map(|(mode, &var)| {
            let sd = var.sqrt();
            mode.iter().map(move |x| x * sd)
        })
        .collect();
    let expression_names = blendshapes.iter().map(|(n, _)| n.clone()).collect();
    let expression_basis = blendshapes.into_iter().flat_map(|(_, d)| d).collect();
    Ok(ModelData {
        info: ModelInfo {
            name: "Surrey Face Model 3448".to_string(),
            license: "Surrey Face Model licence: non-commercial use only (eos share/LICENSE.md)"
                .to_string(),
            source: "eos share/ (github.com/patrikhuber/eos, commit ce984207)".to_string(),
            source_units: "mm".to_string(),
            mm_per_source_unit: 1.0,
            n_vertices,
            shape_modes: shape.eigenvalues.len(),
            expression_names,
            landmarks,
            notes:
                "shape coefficients in standard deviations (orthonormal basis x sqrt(eigenvalue), \
                    as eos); expression coefficients are non-negative blendshape weights; one UV \
                    per vertex (no seams)"
                    .to_string(),
        },
        mean: shape.mean,
        shape_basis,
        expression_basis,
        uv_triangles: shape.triangles.clone(),
        triangles: shape.triangles,
        uvs: shape.uvs,
        vertex_sets,
    })
}

/// Where the eos Surrey Face Model files are: `GANFIT_SFM_DIR`, else `../shared/assets/eos-sfm`
/// beside the checkout. Pass it to [`ganfit_assets::Resolver::resolve_or_build`] with
/// [`SFM_ASSET_ID`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SfmSource;

impl AssetSource for SfmSource {
    fn locate(&self) -> std::result::Result<PathBuf, Vec<SearchedPlace>> {
        crate::source::locate_dir("GANFIT_SFM_DIR", "assets/eos-sfm", SFM_SHAPE_FILE)
    }

    fn build(&self, source: &Path, out: &Path) -> std::result::Result<(), BuildError> {
        convert_sfm(source)?.write(out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix_bytes(rows: i32, cols: i32, data: &[f32]) -> Vec<u8> {
        let mut b = rows.to_le_bytes().to_vec();
        b.extend(cols.to_le_bytes());
        data.iter().for_each(|x| b.extend(x.to_le_bytes()));
        b
    }

    #[test]
    fn huge_announced_sizes_are_rejected_before_allocation() {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend(matrix_bytes(i32::MAX, i32::MAX, &[]));
        let err = SfmShapeFile::parse(&bytes, "x.bin").unwrap_err();
        assert!(matches!(err, MorphableError::Truncated { .. }), "{err}");
        let mut blend = u64::MAX.to_le_bytes().to_vec();
        blend.extend([0u8; 32]);
        let err = parse_blendshapes(&blend, "b.bin").unwrap_err();
        assert!(err.to_string().contains("more than its"), "{err}");
    }

    #[test]
    fn negative_sizes_and_wrong_versions_are_invalid() {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend(matrix_bytes(-3, 1, &[]));
        let err = SfmShapeFile::parse(&bytes, "x.bin").unwrap_err();
        assert!(err.to_string().contains("negative size"), "{err}");
        let err = SfmShapeFile::parse(&7u32.to_le_bytes(), "x.bin").unwrap_err();
        assert!(err.to_string().contains("class version 7"), "{err}");
    }

    #[test]
    fn a_small_hand_made_model_parses() {
        // Two vertices, one mode, no triangles; an empty colour model; two UVs.
        let mut b = 1u32.to_le_bytes().to_vec();
        b.extend(matrix_bytes(6, 1, &[1., 2., 3., 4., 5., 6.]));
        b.extend(matrix_bytes(6, 1, &[0., 0., 1., 0., 0., 0.]));
        b.extend(matrix_bytes(1, 1, &[4.0]));
        b.extend(0u64.to_le_bytes());
        b.extend(matrix_bytes(0, 1, &[]));
        b.extend(matrix_bytes(0, 0, &[]));
        b.extend(matrix_bytes(0, 1, &[]));
        b.extend(0u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        for x in [0.25f64, 0.5, 0.75, 1.0] {
            b.extend(x.to_le_bytes());
        }
        let m = SfmShapeFile::parse(&b, "small.bin").unwrap();
        assert_eq!(m.mean, [1., 2., 3., 4., 5., 6.]);
        assert_eq!(m.eigenvalues, [4.0]);
        assert_eq!(m.uvs, [[0.25, 0.5], [0.75, 1.0]]);
        b.push(0);
        let err = SfmShapeFile::parse(&b, "small.bin").unwrap_err();
        assert!(err.to_string().contains("1 unexpected bytes"), "{err}");
    }
}
