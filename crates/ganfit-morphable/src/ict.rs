//! ICT Face Model Light (ICT-FaceKit, MIT) converter.
//!
//! The source folder holds `FaceXModel.tar.xz` (158 OBJ files, 400 MB unpacked) and
//! `vertex_indices.json`. The archive is decompressed once, as a stream, straight into the
//! parser: nothing is unpacked to disk.
//!
//! Facts the converter relies on, checked against the data by the tests:
//! - `identityNNN.obj − generic_neutral_mesh.obj` are mutually orthogonal with decreasing norms:
//!   PCA eigenvectors already scaled by the square root of their eigenvalue. `identityNNN.obj` is
//!   the mean moved one standard deviation along mode NNN, so coefficients are N(0, 1) as the
//!   modes are stored (ICT's own `sample_random.py` draws them that way). No rescaling is done.
//! - Expression shapes are ARKit-style blendshapes; coefficient 1 gives the full expression.
//! - Units are centimetres; the converted model stores millimetres.
//! - Every OBJ corner has its own UV (28,911 UVs for 26,719 vertices): the model keeps a separate
//!   UV index buffer, so seams stay exact; exporters that need one UV per vertex split vertices.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use ganfit_assets::{AssetSource, BuildError, SearchedPlace};

use crate::data::{LANDMARK_COUNT, ModelData, ModelInfo};
use crate::obj::{ObjMesh, parse_mesh, parse_positions};
use crate::{MorphableError, Result};

/// Asset id of the converted ICT Face Model in `weights-manifest.toml`.
pub const ICT_ASSET_ID: &str = "ict-face-model";
/// The archive inside the ICT-FaceKit source folder.
pub const ICT_ARCHIVE: &str = "FaceXModel.tar.xz";
const ICT_INDICES: &str = "vertex_indices.json";
const ICT_HINT: &str = "ICT-FaceKit (github.com/ICT-VGL/ICT-FaceKit, commit da5f95a)";
const ICT_IDENTITY_MODES: usize = 100;
const MM_PER_CM: f32 = 10.0;

/// The mesh parts of the ICT topology, from the tables of ICT-FaceKit's README: name and
/// half-open vertex range. Vertices of a part are contiguous.
pub const ICT_REGIONS: &[(&str, u32, u32)] = &[
    ("face", 0, 9409),
    ("narrow_face", 0, 6706),
    ("head_and_neck", 9409, 11248),
    // Face and head/neck together: the skin a photo shows.
    ("skin", 0, 11248),
    ("mouth_socket", 11248, 13294),
    ("eye_socket_left", 13294, 13678),
    ("eye_socket_right", 13678, 14062),
    ("gums_and_tongue", 14062, 17039),
    ("teeth", 17039, 21451),
    ("eyeball_left", 21451, 23021),
    ("eyeball_right", 23021, 24591),
    ("lacrimal_fluid_left", 24591, 24795),
    ("lacrimal_fluid_right", 24795, 24999),
    ("eye_blend_left", 24999, 25023),
    ("eye_blend_right", 25023, 25047),
    ("eye_occlusion_left", 25047, 25199),
    ("eye_occlusion_right", 25199, 25351),
    ("eyelashes_left", 25351, 26035),
    ("eyelashes_right", 26035, 26719),
];
const ICT_VERTICES: usize = 26719;

#[derive(serde::Deserialize)]
struct VertexIndices {
    expressions: Vec<String>,
    idx_to_landmark_verts: Vec<u32>,
    idx_to_rigid_verts: Vec<u32>,
    idx_to_fitting_verts: Vec<u32>,
    idx_to_lap_rigid_verts: Vec<u32>,
}

fn invalid(file: &Path, format: &'static str, reason: impl ToString) -> MorphableError {
    MorphableError::InvalidSource {
        file: file.display().to_string(),
        format,
        reason: reason.to_string(),
    }
}

fn sorted_set(mut ids: Vec<u32>) -> Vec<u32> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The OBJ files of an ICT-FaceKit archive, read in one pass.
struct ArchiveContents {
    neutral: ObjMesh,
    /// Positions per blendshape file stem (`identity042`, `jawOpen`, …).
    shapes: HashMap<String, Vec<[f32; 3]>>,
    /// `vertex_indices.json`, when the archive holds it (upstream's repository archive does).
    indices: Option<String>,
}

/// The decompressing reader for `archive`, chosen by its first bytes: xz (the shared copy) or
/// gzip (upstream's repository archive).
fn decompress(archive: &Path) -> Result<Box<dyn Read>> {
    let mut file =
        std::fs::File::open(archive).map_err(|e| MorphableError::io("cannot open", archive, e))?;
    let mut magic = [0u8; 6];
    let n = file
        .read(&mut magic)
        .map_err(|e| MorphableError::io("cannot read", archive, e))?;
    let file = std::io::Read::chain(std::io::Cursor::new(magic[..n].to_vec()), file);
    let buffered = std::io::BufReader::with_capacity(1 << 20, file);
    match magic {
        [0xFD, b'7', b'z', b'X', b'Z', 0x00] => Ok(Box::new(xz2::read::XzDecoder::new(buffered))),
        [0x1F, 0x8B, ..] => Ok(Box::new(flate2::read::GzDecoder::new(buffered))),
        _ => Err(invalid(
            archive,
            "ICT-FaceKit archive",
            "it is neither xz nor gzip compressed",
        )),
    }
}

/// Reads every OBJ file (and `vertex_indices.json`, if present) from a tar archive, wherever it
/// lies inside: the shared copy keeps them at the top, upstream's repository archive under
/// `ICT-FaceKit-<commit>/FaceXModel/`.
fn read_archive(archive: &Path) -> Result<ArchiveContents> {
    let mut tar = tar::Archive::new(decompress(archive)?);
    let tar_error = |e: std::io::Error| invalid(archive, "tar archive", e);
    let mut neutral = None;
    let mut shapes = HashMap::new();
    let mut indices = None;
    let mut text = String::new();
    for entry in tar.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        let path = entry.path().map_err(tar_error)?.into_owned();
        let Some(file_name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if file_name == ICT_INDICES {
            let mut json = String::new();
            entry.read_to_string(&mut json).map_err(tar_error)?;
            indices = Some(json);
            continue;
        }
        let Some(stem) = file_name.strip_suffix(".obj") else {
            continue;
        };
        text.clear();
        entry.read_to_string(&mut text).map_err(tar_error)?;
        let name = format!("{}:{}", archive.display(), path.display());
        if stem == "generic_neutral_mesh" {
            neutral = Some(parse_mesh(&text, &name)?);
        } else {
            shapes.insert(stem.to_string(), parse_positions(&text, &name)?);
        }
    }
    let neutral = neutral.ok_or_else(|| MorphableError::MissingEntry {
        container: archive.display().to_string(),
        entry: "generic_neutral_mesh.obj".to_string(),
        hint: ICT_HINT,
    })?;
    Ok(ArchiveContents {
        neutral,
        shapes,
        indices,
    })
}

/// Millimetre offsets of each named shape from the neutral mesh, one shape after another.
fn offsets(
    names: &[String],
    shapes: &HashMap<String, Vec<[f32; 3]>>,
    neutral: &[[f32; 3]],
    archive: &Path,
) -> Result<Vec<f32>> {
    let mut basis = Vec::with_capacity(names.len() * neutral.len() * 3);
    for name in names {
        let positions = &shapes[name];
        if positions.len() != neutral.len() {
            return Err(invalid(
                archive,
                "ICT-FaceKit archive",
                format!(
                    "{name}.obj has {} vertices, the neutral mesh {}",
                    positions.len(),
                    neutral.len()
                ),
            ));
        }
        for (p, n) in positions.iter().zip(neutral) {
            basis.extend((0..3).map(|c| (p[c] - n[c]) * MM_PER_CM));
        }
    }
    Ok(basis)
}

/// Converts ICT-FaceKit into ganfit's model representation: either a folder holding
/// `FaceXModel.tar.xz` and `vertex_indices.json` (the layout of `../shared/assets/ICT-FaceKit`),
/// or upstream's whole-repository archive (`.tar.gz`) as [`IctSource::upstream`] downloads it.
/// See the module documentation for the conventions.
pub fn convert_ict(source: &Path) -> Result<ModelData> {
    let (archive, indices_file) = if source.is_dir() {
        let archive = source.join(ICT_ARCHIVE);
        if !archive.is_file() {
            return Err(MorphableError::MissingEntry {
                container: source.display().to_string(),
                entry: ICT_ARCHIVE.to_string(),
                hint: ICT_HINT,
            });
        }
        (archive, Some(source.join(ICT_INDICES)))
    } else {
        (source.to_path_buf(), None)
    };
    let ArchiveContents {
        neutral,
        shapes,
        indices: archived_indices,
    } = read_archive(&archive)?;
    let (indices_path, text) = match indices_file.filter(|f| f.is_file()) {
        Some(file) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| MorphableError::io("cannot read", &file, e))?;
            (file, text)
        }
        None => (
            archive.join(ICT_INDICES),
            archived_indices.ok_or_else(|| MorphableError::MissingEntry {
                container: source.display().to_string(),
                entry: ICT_INDICES.to_string(),
                hint: ICT_HINT,
            })?,
        ),
    };
    let indices: VertexIndices =
        serde_json::from_str(&text).map_err(|e| invalid(&indices_path, "JSON", e))?;
    if indices.idx_to_landmark_verts.len() != LANDMARK_COUNT {
        return Err(invalid(
            &indices_path,
            "JSON",
            format!(
                "it lists {} landmarks, not 68",
                indices.idx_to_landmark_verts.len()
            ),
        ));
    }
    let identity_names: Vec<String> = (0..ICT_IDENTITY_MODES)
        .map(|k| format!("identity{k:03}"))
        .collect();
    let wanted: Vec<String> = identity_names
        .iter()
        .chain(&indices.expressions)
        .cloned()
        .collect();
    if let Some(stem) = wanted.iter().find(|s| !shapes.contains_key(*s)) {
        return Err(MorphableError::MissingEntry {
            container: archive.display().to_string(),
            entry: format!("{stem}.obj"),
            hint: ICT_HINT,
        });
    }
    if neutral.positions.len() != ICT_VERTICES {
        return Err(invalid(
            &archive,
            "ICT-FaceKit archive",
            format!(
                "the neutral mesh has {} vertices; ICT Face Model Light has {ICT_VERTICES}",
                neutral.positions.len()
            ),
        ));
    }
    let shape_basis = offsets(&identity_names, &shapes, &neutral.positions, &archive)?;
    let expression_basis = offsets(&indices.expressions, &shapes, &neutral.positions, &archive)?;

    let mut vertex_sets: BTreeMap<String, Vec<u32>> = ICT_REGIONS
        .iter()
        .map(|&(name, start, end)| (name.to_string(), (start..end).collect()))
        .collect();
    for (name, ids) in [
        ("rigid", indices.idx_to_rigid_verts),
        ("fitting", indices.idx_to_fitting_verts),
        ("lap_rigid", indices.idx_to_lap_rigid_verts),
    ] {
        vertex_sets.insert(name.to_string(), sorted_set(ids));
    }
    let data = ModelData {
        info: ModelInfo {
            name: "ICT Face Model Light".to_string(),
            license:
                "MIT (ICT-FaceKit, Copyright (c) 2020 USC Institute for Creative Technologies)"
                    .to_string(),
            source: "https://github.com/ICT-VGL/ICT-FaceKit (commit da5f95a)".to_string(),
            source_units: "cm".to_string(),
            mm_per_source_unit: f64::from(MM_PER_CM),
            n_vertices: neutral.positions.len(),
            shape_modes: identity_names.len(),
            expression_names: indices.expressions,
            landmarks: indices
                .idx_to_landmark_verts
                .into_iter()
                .map(Some)
                .collect(),
            notes: "identity modes are identityNNN.obj - neutral: orthogonal PCA modes already \
                    scaled to one standard deviation, so identity coefficients are N(0,1); \
                    expression coefficients are ARKit-style blendshape weights in [0,1]; UVs are \
                    per corner (separate UV index buffer)"
                .to_string(),
        },
        mean: neutral
            .positions
            .iter()
            .flatten()
            .map(|x| x * MM_PER_CM)
            .collect(),
        shape_basis,
        expression_basis,
        triangles: neutral.triangles,
        uvs: neutral.uvs,
        uv_triangles: neutral.uv_triangles,
        vertex_sets,
    };
    data.validate()
        .map_err(|reason| invalid(&indices_path, "ICT-FaceKit vertex_indices.json", reason))?;
    Ok(data)
}

/// Upstream's archive of the ICT-FaceKit commit the manifest's model was converted from.
pub const ICT_UPSTREAM_URL: &str = "https://github.com/ICT-VGL/ICT-FaceKit/archive/da5f95a.tar.gz";

/// Where ICT-FaceKit is: `GANFIT_ICT_DIR`, else `../shared/assets/ICT-FaceKit` beside the
/// checkout, else (with the resolver's `download` feature) upstream's archive. Pass it to
/// [`ganfit_assets::Resolver::resolve_or_build`] with [`ICT_ASSET_ID`].
#[derive(Debug, Clone)]
pub struct IctSource {
    upstream_url: String,
}

impl Default for IctSource {
    fn default() -> Self {
        IctSource {
            upstream_url: ICT_UPSTREAM_URL.to_string(),
        }
    }
}

impl IctSource {
    /// A source that downloads from `url` instead of GitHub (a mirror, or a test server).
    pub fn with_upstream(url: impl Into<String>) -> Self {
        IctSource {
            upstream_url: url.into(),
        }
    }
}

impl AssetSource for IctSource {
    fn upstream(&self) -> Option<ganfit_assets::Upstream> {
        Some(ganfit_assets::Upstream {
            url: self.upstream_url.clone(),
            file_name: "ICT-FaceKit-da5f95a.tar.gz".to_string(),
        })
    }

    fn locate(&self) -> std::result::Result<PathBuf, Vec<SearchedPlace>> {
        crate::source::locate_dir("GANFIT_ICT_DIR", "assets/ICT-FaceKit", ICT_ARCHIVE)
    }

    fn build(&self, source: &Path, out: &Path) -> std::result::Result<(), BuildError> {
        convert_ict(source)?.write(out)?;
        Ok(())
    }
}
