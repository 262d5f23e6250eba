//! Writing meshes: OBJ + MTL (with a texture path), binary PLY and binary glTF (`.glb`) with an
//! embedded PNG texture.
//!
//! The glTF JSON is written by hand with `serde_json`: it is one mesh, one material and a handful
//! of accessors, and the Khronos validator checks the output in the tests, so a glTF object-model
//! crate would add dependencies without adding safety.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use image::ImageEncoder;
use rayon::prelude::*;
use serde_json::json;

use crate::{MorphableError, Result, TexturedMesh};

/// A mesh whose vertices carry exactly one UV each: vertices on texture seams are duplicated.
/// Renderers and formats with per-vertex attributes (glTF) need this form.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeamSplit {
    /// For each split vertex, the original vertex it copies.
    pub source_vertex: Vec<u32>,
    /// The split vertex's texture coordinate (OBJ convention, v up).
    pub uvs: Vec<[f32; 2]>,
    /// Triangles over the split vertices.
    pub triangles: Vec<[u32; 3]>,
}

impl TexturedMesh {
    /// Checks that every index is in range.
    fn check(&self) -> Result<()> {
        let bad = |what: &str| {
            Err(MorphableError::Export(format!(
                "the mesh has a {what} index out of range"
            )))
        };
        if self
            .triangles
            .iter()
            .flatten()
            .any(|&v| v as usize >= self.positions.len())
        {
            return bad("vertex");
        }
        if self.uv_triangles.len() != self.triangles.len()
            || self
                .uv_triangles
                .iter()
                .flatten()
                .any(|&t| t as usize >= self.uvs.len())
        {
            return bad("texture");
        }
        Ok(())
    }

    /// Splits vertices so each has one UV: one split vertex per distinct (vertex, UV) pair, in
    /// order of first use.
    pub fn split_seams(&self) -> SeamSplit {
        let mut index: HashMap<(u32, u32), u32> = HashMap::new();
        let mut split = SeamSplit::default();
        for (tri, uv_tri) in self.triangles.iter().zip(&self.uv_triangles) {
            let mut out = [0u32; 3];
            for c in 0..3 {
                let key = (tri[c], uv_tri[c]);
                out[c] = *index.entry(key).or_insert_with(|| {
                    split.source_vertex.push(key.0);
                    split.uvs.push(self.uvs[key.1 as usize]);
                    (split.source_vertex.len() - 1) as u32
                });
            }
            split.triangles.push(out);
        }
        split
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> MorphableError + '_ {
    move |e| MorphableError::io("cannot write", path, e)
}

/// Writes `mesh` as a Wavefront OBJ at `path` plus a material file next to it (same name,
/// `.mtl`) whose diffuse map is `texture` (written as given, so pass a path relative to the OBJ
/// for a portable pair). Positions are in millimetres.
pub fn write_obj(path: &Path, mesh: &TexturedMesh, texture: Option<&Path>) -> Result<()> {
    mesh.check()?;
    let mtl_path = path.with_extension("mtl");
    let mtl_name = mtl_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            MorphableError::Export(format!("{} has no usable file name", path.display()))
        })?;
    let mut mtl =
        String::from("# ganfit-morphable\nnewmtl face\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nillum 1\n");
    if let Some(texture) = texture {
        mtl += &format!("map_Kd {}\n", texture.display());
    }
    std::fs::write(&mtl_path, mtl).map_err(io_error(&mtl_path))?;

    let file = std::fs::File::create(path).map_err(io_error(path))?;
    let mut w = std::io::BufWriter::new(file);
    let write = |w: &mut std::io::BufWriter<std::fs::File>| -> std::io::Result<()> {
        writeln!(
            w,
            "# ganfit-morphable, millimetres\nmtllib {mtl_name}\nusemtl face"
        )?;
        for p in &mesh.positions {
            writeln!(w, "v {} {} {}", p[0], p[1], p[2])?;
        }
        for t in &mesh.uvs {
            writeln!(w, "vt {} {}", t[0], t[1])?;
        }
        for (v, t) in mesh.triangles.iter().zip(&mesh.uv_triangles) {
            writeln!(
                w,
                "f {}/{} {}/{} {}/{}",
                v[0] + 1,
                t[0] + 1,
                v[1] + 1,
                t[1] + 1,
                v[2] + 1,
                t[2] + 1
            )?;
        }
        w.flush()
    };
    write(&mut w).map_err(io_error(path))
}

/// Writes `mesh` as a binary little-endian PLY (positions in millimetres and triangles; PLY has
/// no standard per-corner UVs).
pub fn write_ply(path: &Path, mesh: &TexturedMesh) -> Result<()> {
    mesh.check()?;
    let mut bytes = format!(
        "ply\nformat binary_little_endian 1.0\ncomment ganfit-morphable, millimetres\n\
         element vertex {}\nproperty float x\nproperty float y\nproperty float z\n\
         element face {}\nproperty list uchar uint vertex_indices\nend_header\n",
        mesh.positions.len(),
        mesh.triangles.len()
    )
    .into_bytes();
    for p in &mesh.positions {
        p.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    }
    for t in &mesh.triangles {
        bytes.push(3);
        t.iter().for_each(|i| bytes.extend(i.to_le_bytes()));
    }
    std::fs::write(path, bytes).map_err(io_error(path))
}

/// Unit normals of the split vertices for each of `shapes` (positions of every vertex of
/// `mesh`, as many as it has), from the area-weighted normals of its triangles: the normals
/// [`crate::vertex_normals`] gives, without a tensor op per shape (on the CPU, candle's
/// scatter made a head's 54 shapes half a second, this 20 ms).
fn split_normals(
    mesh: &TexturedMesh,
    split: &SeamSplit,
    shapes: &[&[[f32; 3]]],
) -> Vec<Vec<[f32; 3]>> {
    shapes
        .par_iter()
        .map(|positions| {
            let mut sums = vec![[0.0f32; 3]; positions.len()];
            for triangle in &mesh.triangles {
                let [p0, p1, p2] = triangle.map(|v| positions[v as usize]);
                let (e1, e2) = (sub(p1, p0), sub(p2, p0));
                // Twice the triangle's area times its unit normal: summing these weights faces
                // by area.
                let face = [
                    e1[1] * e2[2] - e1[2] * e2[1],
                    e1[2] * e2[0] - e1[0] * e2[2],
                    e1[0] * e2[1] - e1[1] * e2[0],
                ];
                for &v in triangle {
                    let sum = &mut sums[v as usize];
                    for c in 0..3 {
                        sum[c] += face[c];
                    }
                }
            }
            split
                .source_vertex
                .iter()
                .map(|&v| {
                    let n = sums[v as usize];
                    let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
                    // Only vertices of degenerate triangles lack a normal; glTF demands unit
                    // vectors.
                    if len > 0.0 {
                        [n[0] / len, n[1] / len, n[2] / len]
                    } else {
                        [0.0, 0.0, 1.0]
                    }
                })
                .collect()
        })
        .collect()
}

fn sub(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

/// Appends `data` to the binary chunk as a 4-byte aligned buffer view; returns its index.
fn push_view(
    bin: &mut Vec<u8>,
    views: &mut Vec<serde_json::Value>,
    data: &[u8],
    target: Option<u32>,
) -> usize {
    while !bin.len().is_multiple_of(4) {
        bin.push(0);
    }
    let mut view = json!({"buffer": 0, "byteOffset": bin.len(), "byteLength": data.len()});
    if let Some(target) = target {
        view["target"] = json!(target);
    }
    bin.extend_from_slice(data);
    views.push(view);
    views.len() - 1
}

/// A morph target's attribute as a sparse accessor over all `values` (one per split vertex):
/// only those longer than `min_length` are stored. Returns the accessor.
fn push_sparse_target(
    bin: &mut Vec<u8>,
    views: &mut Vec<serde_json::Value>,
    values: impl ExactSizeIterator<Item = [f32; 3]>,
    min_length: f32,
) -> serde_json::Value {
    let count = values.len();
    let kept: Vec<(u32, [f32; 3])> = values
        .enumerate()
        .map(|(i, value)| (i as u32, value))
        .filter(|(_, value)| value.iter().map(|x| x * x).sum::<f32>() > min_length * min_length)
        .collect();
    // The bounds glTF asks of a POSITION accessor (and allows of others), over every vertex:
    // the ones left at zero too.
    let (mut lo, mut hi) = ([0.0f32; 3], [0.0f32; 3]);
    for (_, value) in &kept {
        for c in 0..3 {
            lo[c] = lo[c].min(value[c]);
            hi[c] = hi[c].max(value[c]);
        }
    }
    let mut accessor =
        json!({"componentType": FLOAT, "count": count, "type": "VEC3", "min": lo, "max": hi});
    if !kept.is_empty() {
        let ids: Vec<u8> = kept.iter().flat_map(|(i, _)| i.to_le_bytes()).collect();
        let ids = push_view(bin, views, &ids, None);
        let values: Vec<u8> = kept
            .iter()
            .flat_map(|(_, value)| *value)
            .flat_map(f32::to_le_bytes)
            .collect();
        let values = push_view(bin, views, &values, None);
        accessor["sparse"] = json!({
            "count": kept.len(),
            "indices": {"bufferView": ids, "componentType": UNSIGNED_INT},
            "values": {"bufferView": values},
        });
    }
    accessor
}

const ARRAY_BUFFER: u32 = 34962;
const ELEMENT_ARRAY_BUFFER: u32 = 34963;
const FLOAT: u32 = 5126;
const UNSIGNED_INT: u32 = 5125;

/// Morph-target offsets shorter than this (metres; a hundredth of a millimetre, far below what
/// any render of a head shows) are not stored: ICT's blendshapes move most vertices of the head
/// by less, and storing those too made a fitted head's `.glb` 11 MB instead of 7 (positions
/// alone).
const MIN_MORPH_OFFSET_M: f32 = 1e-5;

/// Morph-target normal differences shorter than this (a turn of a sixth of a degree, which no
/// shading shows; a third of that stored 0.7 MB more of a fitted head's 11 MB) are not stored
/// either.
const MIN_MORPH_NORMAL_TURN: f32 = 3e-3;

/// A blendshape to export with a mesh: how far each of the mesh's vertices moves at weight 1.
#[derive(Debug, Clone, PartialEq)]
pub struct MorphTarget {
    /// Its name (glTF's `extras.targetNames`, which three.js, Blender and others read).
    pub name: String,
    /// One offset per vertex of the mesh, in the mesh's units (millimetres).
    pub offsets: Vec<[f32; 3]>,
    /// The weight it is exported with, so that viewers show the mesh posed by it.
    pub weight: f32,
}

/// Writes `mesh` as binary glTF 2.0 with normals, texture coordinates and, when given, `texture`
/// embedded as PNG. Positions are converted to metres (glTF's unit); vertices on UV seams are
/// split ([`TexturedMesh::split_seams`]).
pub fn write_glb(
    path: &Path,
    mesh: &TexturedMesh,
    texture: Option<&image::RgbImage>,
) -> Result<()> {
    write_glb_with_targets(path, mesh, texture, &[])
}

/// [`write_glb`] with `targets` as the mesh's morph targets, positions and normals (stored
/// sparsely: only the vertices each one moves by a hundredth of a millimetre or more, and the
/// normals it turns by more than a sixth of a degree), weighted as they say: an engine can
/// animate the mesh by their weights and shade it as it moves.
pub fn write_glb_with_targets(
    path: &Path,
    mesh: &TexturedMesh,
    texture: Option<&image::RgbImage>,
    targets: &[MorphTarget],
) -> Result<()> {
    mesh.check()?;
    if mesh.triangles.is_empty() {
        return Err(MorphableError::Export(
            "the mesh has no triangles".to_string(),
        ));
    }
    if let Some(target) = targets
        .iter()
        .find(|t| t.offsets.len() != mesh.positions.len())
    {
        return Err(MorphableError::Export(format!(
            "the morph target `{}` moves {} vertices, the mesh has {}",
            target.name,
            target.offsets.len(),
            mesh.positions.len()
        )));
    }
    if let Some(target) = targets
        .iter()
        .find(|t| !t.weight.is_finite() || t.offsets.iter().flatten().any(|x| !x.is_finite()))
    {
        return Err(MorphableError::Export(format!(
            "the morph target `{}` has a weight or an offset that is not a number",
            target.name
        )));
    }
    let split = mesh.split_seams();
    // The base mesh, then each target at weight 1: a morphed normal is the base's plus the
    // weighted differences, so the shading turns with the surface as an engine animates it.
    let posed: Vec<Vec<[f32; 3]>> = targets
        .iter()
        .map(|t| {
            mesh.positions
                .iter()
                .zip(&t.offsets)
                .map(|(p, o)| [p[0] + o[0], p[1] + o[1], p[2] + o[2]])
                .collect()
        })
        .collect();
    let shapes: Vec<&[[f32; 3]]> = std::iter::once(mesh.positions.as_slice())
        .chain(posed.iter().map(Vec::as_slice))
        .collect();
    let mut shape_normals = split_normals(mesh, &split, &shapes).into_iter();
    let normals = shape_normals.next().expect("the base mesh's normals");
    let positions: Vec<[f32; 3]> = split
        .source_vertex
        .iter()
        .map(|&v| mesh.positions[v as usize].map(|x| x * 1e-3))
        .collect();
    let mut min = [f32::INFINITY; 3];
    let mut max = [f32::NEG_INFINITY; 3];
    for p in &positions {
        for c in 0..3 {
            min[c] = min[c].min(p[c]);
            max[c] = max[c].max(p[c]);
        }
    }
    let le = |values: &mut dyn Iterator<Item = f32>| {
        values.flat_map(f32::to_le_bytes).collect::<Vec<u8>>()
    };
    let mut bin = Vec::new();
    let mut views = Vec::new();
    let indices: Vec<u8> = split
        .triangles
        .iter()
        .flatten()
        .flat_map(|i| i.to_le_bytes())
        .collect();
    let v_indices = push_view(&mut bin, &mut views, &indices, Some(ELEMENT_ARRAY_BUFFER));
    let v_pos = push_view(
        &mut bin,
        &mut views,
        &le(&mut positions.iter().flatten().copied()),
        Some(ARRAY_BUFFER),
    );
    let v_nrm = push_view(
        &mut bin,
        &mut views,
        &le(&mut normals.iter().flatten().copied()),
        Some(ARRAY_BUFFER),
    );
    // glTF puts the texture origin at the top left, OBJ at the bottom left.
    let uv = le(&mut split.uvs.iter().flat_map(|t| [t[0], 1.0 - t[1]]));
    let v_uv = push_view(&mut bin, &mut views, &uv, Some(ARRAY_BUFFER));
    let n = positions.len();
    let mut accessors = vec![
        json!({"bufferView": v_indices, "componentType": UNSIGNED_INT, "count": indices.len() / 4, "type": "SCALAR"}),
        json!({"bufferView": v_pos, "componentType": FLOAT, "count": n, "type": "VEC3", "min": min, "max": max}),
        json!({"bufferView": v_nrm, "componentType": FLOAT, "count": n, "type": "VEC3"}),
        json!({"bufferView": v_uv, "componentType": FLOAT, "count": n, "type": "VEC2"}),
    ];
    let mut primitive_targets = Vec::with_capacity(targets.len());
    for (target, target_normals) in targets.iter().zip(shape_normals) {
        let offsets = split
            .source_vertex
            .iter()
            .map(|&v| target.offsets[v as usize].map(|x| x * 1e-3));
        let position = push_sparse_target(&mut bin, &mut views, offsets, MIN_MORPH_OFFSET_M);
        accessors.push(position);
        let turns = target_normals
            .iter()
            .zip(&normals)
            .map(|(&t, &b)| sub(t, b));
        let normal = push_sparse_target(&mut bin, &mut views, turns, MIN_MORPH_NORMAL_TURN);
        accessors.push(normal);
        primitive_targets
            .push(json!({"POSITION": accessors.len() - 2, "NORMAL": accessors.len() - 1}));
    }
    let mut doc = json!({
        "asset": {"version": "2.0", "generator": "ganfit-morphable"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "face"}],
        "meshes": [{"name": "face", "primitives": [{
            "attributes": {"POSITION": 1, "NORMAL": 2, "TEXCOORD_0": 3},
            "indices": 0, "material": 0, "mode": 4
        }]}],
        "materials": [{"name": "face", "pbrMetallicRoughness": {
            "baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0
        }}],
        "accessors": accessors,
    });
    if !targets.is_empty() {
        doc["meshes"][0]["primitives"][0]["targets"] = json!(primitive_targets);
        doc["meshes"][0]["weights"] = json!(targets.iter().map(|t| t.weight).collect::<Vec<_>>());
        doc["meshes"][0]["extras"] =
            json!({"targetNames": targets.iter().map(|t| &t.name).collect::<Vec<_>>()});
    }
    if let Some(texture) = texture {
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(
                texture.as_raw(),
                texture.width(),
                texture.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| {
                MorphableError::Export(format!("cannot encode the texture as PNG: {e}"))
            })?;
        let v_png = push_view(&mut bin, &mut views, &png, None);
        doc["images"] = json!([{"bufferView": v_png, "mimeType": "image/png"}]);
        doc["samplers"] =
            json!([{"magFilter": 9729, "minFilter": 9729, "wrapS": 33071, "wrapT": 33071}]);
        doc["textures"] = json!([{"source": 0, "sampler": 0}]);
        doc["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"] = json!({"index": 0});
    }
    while !bin.len().is_multiple_of(4) {
        bin.push(0);
    }
    doc["buffers"] = json!([{"byteLength": bin.len()}]);
    doc["bufferViews"] = json!(views);
    let mut json_bytes =
        serde_json::to_vec(&doc).map_err(|e| MorphableError::Export(e.to_string()))?;
    while !json_bytes.len().is_multiple_of(4) {
        json_bytes.push(b' ');
    }
    let total = 12 + 8 + json_bytes.len() + 8 + bin.len();
    let total = u32::try_from(total).map_err(|_| {
        MorphableError::Export(format!("{total} bytes exceed the 4 GiB limit of .glb"))
    })?;
    let mut out = Vec::with_capacity(total as usize);
    out.extend(b"glTF");
    out.extend(2u32.to_le_bytes());
    out.extend(total.to_le_bytes());
    out.extend((json_bytes.len() as u32).to_le_bytes());
    out.extend(b"JSON");
    out.extend(&json_bytes);
    out.extend((bin.len() as u32).to_le_bytes());
    out.extend(b"BIN\0");
    out.extend(&bin);
    std::fs::write(path, out).map_err(io_error(path))
}
