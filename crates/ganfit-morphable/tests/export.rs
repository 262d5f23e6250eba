//! Exports: OBJ + MTL, PLY, and .glb checked by the Khronos glTF validator.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{ict, sfm};
use ganfit_morphable::TexturedMesh;
use ganfit_morphable::export::{write_glb, write_glb_with_targets, write_obj, write_ply};

fn checker_texture() -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| {
        if (x / 8 + y / 8) % 2 == 0 {
            image::Rgb([230, 190, 160])
        } else {
            image::Rgb([90, 60, 50])
        }
    })
}

fn smile(model: &ganfit_morphable::MorphableModel) -> Tensor {
    let p_s = Tensor::new(common::pseudo_random(model.shape_modes(), 8), &Device::Cpu).unwrap();
    let p_e = Tensor::new(vec![0.5f32; model.expression_modes()], &Device::Cpu).unwrap();
    model.instance(&p_s, &p_e).unwrap()
}

#[test]
fn obj_and_mtl_hold_every_vertex_uv_and_triangle() {
    let dir = tempfile::tempdir().unwrap();
    let model = sfm();
    let mesh = model.mesh(&smile(model)).unwrap();
    let path = dir.path().join("face.obj");
    write_obj(&path, &mesh, Some(Path::new("face_albedo.png"))).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count("v "), 3448);
    assert_eq!(count("vt "), 3448);
    assert_eq!(count("f "), 6736);
    assert!(text.contains("mtllib face.mtl"));
    let first_v: Vec<f32> = text.lines().find(|l| l.starts_with("v ")).unwrap()[2..]
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(first_v, mesh.positions[0]);
    let mtl = std::fs::read_to_string(dir.path().join("face.mtl")).unwrap();
    assert!(mtl.contains("map_Kd face_albedo.png"), "{mtl}");
}

#[test]
fn ply_has_a_consistent_header_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let model = sfm();
    let mesh = model.mesh(model.mean()).unwrap();
    let path = dir.path().join("face.ply");
    write_ply(&path, &mesh).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header_end = bytes
        .windows(11)
        .position(|w| w == b"end_header\n")
        .unwrap()
        + 11;
    let header = std::str::from_utf8(&bytes[..header_end]).unwrap();
    assert!(
        header.contains("element vertex 3448") && header.contains("element face 6736"),
        "{header}"
    );
    assert_eq!(bytes.len() - header_end, 3448 * 12 + 6736 * 13);
    let x0 = f32::from_le_bytes(bytes[header_end..header_end + 4].try_into().unwrap());
    assert_eq!(x0, mesh.positions[0][0]);
}

#[test]
fn out_of_range_meshes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = TexturedMesh {
        positions: vec![[0.0; 3]; 2],
        triangles: vec![[0, 1, 2]],
        uvs: vec![[0.0; 2]],
        uv_triangles: vec![[0, 0, 0]],
    };
    let err = write_glb(&dir.path().join("x.glb"), &mesh, None).unwrap_err();
    assert!(
        err.to_string().contains("vertex index out of range"),
        "{err}"
    );
}

fn validator_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/gltf-validator/validate.mjs")
}

/// Runs the Khronos validator; `None` when it is not installed (allowed only outside CI).
fn validate(file: &Path) -> Option<serde_json::Value> {
    let script = validator_script();
    let output =
        validator_available().then(|| Command::new("node").arg(&script).arg(file).output());
    match output {
        Some(Ok(out)) => {
            let report: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!(
                        "validator output is not JSON ({e}): {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            Some(report)
        }
        _ => {
            let fix = "install it with `npm ci --prefix tools/gltf-validator` (needs node)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the glTF validator is missing: {fix}"
            );
            eprintln!("skipping glTF validation: the validator is missing; {fix}");
            None
        }
    }
}

fn assert_valid_glb(path: &Path, expected_vertices_at_least: u64, triangles: usize) {
    let Some(report) = validate(path) else { return };
    let issues = &report["issues"];
    assert_eq!(
        issues["numErrors"], 0,
        "validator errors: {:#}",
        issues["messages"]
    );
    assert_eq!(
        issues["numWarnings"], 0,
        "validator warnings: {:#}",
        issues["messages"]
    );
    assert_eq!(report["mimeType"], "model/gltf-binary");
    let info = &report["info"];
    assert!(
        info["totalVertexCount"].as_u64().unwrap() >= expected_vertices_at_least,
        "{info:#}"
    );
    assert_eq!(info["hasTextures"], true, "{info:#}");
    assert_eq!(info["totalTriangleCount"], triangles, "{info:#}");
}

#[test]
fn glb_of_the_ict_skin_with_texture_passes_the_khronos_validator() {
    let dir = tempfile::tempdir().unwrap();
    let model = ict();
    let skin = model.region("skin").unwrap();
    let mesh = skin.mesh(&smile(model)).unwrap();
    let path = dir.path().join("skin.glb");
    write_glb(&path, &mesh, Some(&checker_texture())).unwrap();
    // Seams split some vertices, so the .glb has at least as many as the region.
    assert_valid_glb(&path, skin.vertex_ids.len() as u64, skin.triangles.len());
}

#[test]
fn glb_of_the_sfm_passes_the_khronos_validator_and_a_damaged_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let model = sfm();
    let path = dir.path().join("sfm.glb");
    write_glb(
        &path,
        &model.mesh(model.mean()).unwrap(),
        Some(&checker_texture()),
    )
    .unwrap();
    assert_valid_glb(&path, 3448, 6736);

    // The validator is really looking: an index past the vertices is reported as an error.
    let mut bytes = std::fs::read(&path).unwrap();
    let json_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let bin_start = 20 + json_len + 8;
    bytes[bin_start..bin_start + 4].copy_from_slice(&100_000u32.to_le_bytes());
    let damaged = dir.path().join("damaged.glb");
    std::fs::write(&damaged, bytes).unwrap();
    if let Some(report) = validate(&damaged) {
        assert!(
            report["issues"]["numErrors"].as_u64().unwrap() > 0,
            "{report:#}"
        );
    }
}

/// The JSON and binary chunks of a `.glb`.
fn glb_chunks(bytes: &[u8]) -> (serde_json::Value, &[u8]) {
    let json_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let json = serde_json::from_slice(&bytes[20..20 + json_len]).unwrap();
    (json, &bytes[20 + json_len + 8..])
}

/// The little-endian 32-bit words of a buffer view.
fn view_words<T>(json: &serde_json::Value, bin: &[u8], view: &serde_json::Value) -> Vec<T>
where
    T: From<u32>,
{
    let view = &json["bufferViews"][view.as_u64().unwrap() as usize];
    let (offset, length) = (
        view["byteOffset"].as_u64().unwrap() as usize,
        view["byteLength"].as_u64().unwrap() as usize,
    );
    bin[offset..offset + length]
        .chunks_exact(4)
        .map(|w| T::from(u32::from_le_bytes(w.try_into().unwrap())))
        .collect()
}

/// ICT's expression blendshapes as sparse morph targets: the file passes the validator, names
/// and weights them, and its base plus the weighted targets is the posed mesh (in metres; the
/// offsets a render cannot show are the only ones left out), with the posed mesh's normals
/// (nearly: a normal's differences add linearly). Targets that do not fit the mesh are refused.
#[test]
fn ict_expressions_as_morph_targets_pose_the_neutral_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let model = ict();
    let p_s = Tensor::new(common::pseudo_random(model.shape_modes(), 3), &Device::Cpu).unwrap();
    let weights: Vec<f32> = (0..model.expression_modes())
        .map(|j| (j % 5) as f32 * 0.2)
        .collect();
    let p_e = Tensor::new(weights.as_slice(), &Device::Cpu).unwrap();
    let neutral = model.instance(&p_s, &p_e.zeros_like().unwrap()).unwrap();
    let posed = model.mesh(&model.instance(&p_s, &p_e).unwrap()).unwrap();
    let mesh = model.mesh(&neutral).unwrap();
    let targets = model.expression_targets(&p_e).unwrap();
    assert_eq!(targets.len(), model.expression_modes());
    let path = dir.path().join("head.glb");
    write_glb_with_targets(&path, &mesh, Some(&checker_texture()), &targets).unwrap();
    if let Some(report) = validate(&path) {
        let issues = &report["issues"];
        assert_eq!(issues["numErrors"], 0, "{:#}", issues["messages"]);
        assert_eq!(issues["numWarnings"], 0, "{:#}", issues["messages"]);
        assert_eq!(report["info"]["hasMorphTargets"], true);
    }

    let bytes = std::fs::read(&path).unwrap();
    let (json, bin) = glb_chunks(&bytes);
    let names = &json["meshes"][0]["extras"]["targetNames"];
    assert_eq!(names[26], "jawOpen", "{names}");
    let stored: Vec<f64> = json["meshes"][0]["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert_eq!(
        stored,
        weights.iter().map(|&w| f64::from(w)).collect::<Vec<_>>()
    );
    let (_, positions, stored_offsets) = morphed_attribute(&json, bin, "POSITION", &weights);
    let (base_normals, normals, stored_normals) = morphed_attribute(&json, bin, "NORMAL", &weights);
    let split = mesh.split_seams();
    assert!(stored_offsets < split.source_vertex.len() * targets.len() / 2);
    assert!(stored_normals < split.source_vertex.len() * targets.len() / 2);
    let posed_normals = vertex_normals(model, &model.instance(&p_s, &p_e).unwrap());
    let mean = |angles: Vec<f32>| angles.iter().sum::<f32>() / angles.len() as f32;
    let unmorphed = mean(angles_deg(&base_normals, &posed_normals, &split));
    let morphed = mean(angles_deg(&normals, &posed_normals, &split));
    // 2.4° against 6.8°: with 42 of 53 targets at once, their normals' differences do not add
    // up to the posed mesh's normals (see the next test for one).
    assert!(
        morphed < 0.5 * unmorphed,
        "morphed normals {morphed:.3}° from the posed mesh's, unmorphed {unmorphed:.3}°"
    );
    let worst = split
        .source_vertex
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            (0..3)
                .map(|c| (positions[i * 3 + c] * 1e3 - posed.positions[v as usize][c]).abs())
                .fold(0.0f32, f32::max)
        })
        .fold(0.0f32, f32::max);
    assert!(
        worst < 0.05,
        "the morphed mesh is {worst} mm off the posed one"
    );

    let short = ganfit_morphable::export::MorphTarget {
        name: "short".into(),
        offsets: vec![[0.0; 3]; 3],
        weight: 1.0,
    };
    let err = write_glb_with_targets(&path, &mesh, None, &[short]).unwrap_err();
    assert!(err.to_string().contains("moves 3 vertices"), "{err}");
    let mut not_a_number = targets[0].clone();
    not_a_number.weight = f32::NAN;
    let err = write_glb_with_targets(&path, &mesh, None, &[not_a_number]).unwrap_err();
    assert!(err.to_string().contains("not a number"), "{err}");
}

/// One attribute of a `.glb`'s only primitive: its base values, those values plus its morph
/// targets' sparse offsets times `weights`, and how many offsets the targets store.
fn morphed_attribute(
    json: &serde_json::Value,
    bin: &[u8],
    attribute: &str,
    weights: &[f32],
) -> (Vec<f32>, Vec<f32>, usize) {
    let floats = |view: &serde_json::Value| -> Vec<f32> {
        view_words::<u32>(json, bin, view)
            .into_iter()
            .map(f32::from_bits)
            .collect()
    };
    let primitive = &json["meshes"][0]["primitives"][0];
    let accessor = |i: &serde_json::Value| &json["accessors"][i.as_u64().unwrap() as usize];
    let base = floats(&accessor(&primitive["attributes"][attribute])["bufferView"]);
    let mut values = base.clone();
    let mut stored = 0;
    for (target, &weight) in primitive["targets"].as_array().unwrap().iter().zip(weights) {
        let sparse = &accessor(&target[attribute])["sparse"];
        let ids: Vec<u32> = view_words(json, bin, &sparse["indices"]["bufferView"]);
        let offsets = floats(&sparse["values"]["bufferView"]);
        stored += ids.len();
        for (&i, offset) in ids.iter().zip(offsets.chunks_exact(3)) {
            for c in 0..3 {
                values[i as usize * 3 + c] += weight * offset[c];
            }
        }
    }
    (base, values, stored)
}

/// The area-weighted vertex normals of `vertices` (`[N, 3]`) over `model`'s triangles.
fn vertex_normals(model: &ganfit_morphable::MorphableModel, vertices: &Tensor) -> Vec<Vec<f32>> {
    let triangles: Vec<u32> = model.triangles().iter().flatten().copied().collect();
    let triangles =
        Tensor::from_vec(triangles, (model.triangles().len(), 3), &Device::Cpu).unwrap();
    ganfit_morphable::vertex_normals(vertices, &triangles)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The angle (degrees) between each split vertex's normal in `normals` (flat, any length: a
/// viewer normalises them) and its source vertex's in `truth`.
fn angles_deg(
    normals: &[f32],
    truth: &[Vec<f32>],
    split: &ganfit_morphable::export::SeamSplit,
) -> Vec<f32> {
    split
        .source_vertex
        .iter()
        .zip(normals.chunks_exact(3))
        .map(|(&v, n)| {
            let t = &truth[v as usize];
            let dot: f32 = (0..3).map(|c| n[c] * t[c]).sum();
            let lengths = (n.iter().map(|x| x * x).sum::<f32>()
                * t.iter().map(|x| x * x).sum::<f32>())
            .sqrt();
            (dot / lengths).clamp(-1.0, 1.0).acos().to_degrees()
        })
        .collect()
}

/// One target at weight 1 turns every normal to the posed mesh's, but for the turns too small
/// to store (a sixth of a degree).
#[test]
fn a_morph_targets_normals_are_the_posed_meshs() {
    let dir = tempfile::tempdir().unwrap();
    let model = ict();
    let p_s = Tensor::new(common::pseudo_random(model.shape_modes(), 5), &Device::Cpu).unwrap();
    let jaw_open = 26;
    let weights: Vec<f32> = (0..model.expression_modes())
        .map(|j| if j == jaw_open { 1.0 } else { 0.0 })
        .collect();
    let p_e = Tensor::new(weights.as_slice(), &Device::Cpu).unwrap();
    let neutral = model.instance(&p_s, &p_e.zeros_like().unwrap()).unwrap();
    let mesh = model.mesh(&neutral).unwrap();
    let path = dir.path().join("jaw.glb");
    write_glb_with_targets(&path, &mesh, None, &model.expression_targets(&p_e).unwrap()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (json, bin) = glb_chunks(&bytes);
    let (base, morphed, _) = morphed_attribute(&json, bin, "NORMAL", &weights);
    let split = mesh.split_seams();
    let posed = vertex_normals(model, &model.instance(&p_s, &p_e).unwrap());
    let max = |angles: Vec<f32>| angles.into_iter().fold(0.0f32, f32::max);
    let (unmorphed, morphed) = (
        max(angles_deg(&base, &posed, &split)),
        max(angles_deg(&morphed, &posed, &split)),
    );
    assert!(
        unmorphed > 10.0,
        "jawOpen turns the normals by at most {unmorphed}°"
    );
    assert!(
        morphed < 0.18,
        "a morphed normal is {morphed}° off the posed mesh's"
    );
}

fn validator_available() -> bool {
    validator_script()
        .parent()
        .unwrap()
        .join("node_modules/gltf-validator")
        .is_dir()
}
