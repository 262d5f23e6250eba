//! ICT Face Model Light: parity with the upstream OBJ files, conventions, regions, landmarks.

mod common;

use std::collections::HashMap;
use std::io::Read;

use candle_core::{Device, Tensor};
use common::{ict, rows, shared_asset_dir};

/// Positions of the named OBJ files (stems) inside FaceXModel.tar.xz, read in one pass.
fn upstream_positions(stems: &[&str]) -> HashMap<String, Vec<[f32; 3]>> {
    let archive = shared_asset_dir("ICT-FaceKit").join("FaceXModel.tar.xz");
    let file = std::fs::File::open(&archive).unwrap();
    let mut tar = tar::Archive::new(xz2::read::XzDecoder::new(std::io::BufReader::new(file)));
    let mut found = HashMap::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_some_and(|e| e == "obj") && stems.contains(&stem.as_str()) {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            let positions = text
                .lines()
                .filter_map(|l| l.strip_prefix("v "))
                .map(|l| {
                    let v: Vec<f32> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
                    [v[0], v[1], v[2]]
                })
                .collect();
            found.insert(stem, positions);
        }
        if found.len() == stems.len() {
            break;
        }
    }
    assert_eq!(found.len(), stems.len(), "archive lacks some of {stems:?}");
    found
}

fn max_abs_diff_cm(model_mm: &Tensor, upstream_cm: &[[f32; 3]]) -> f32 {
    let ours = rows(model_mm);
    assert_eq!(ours.len(), upstream_cm.len());
    ours.iter()
        .zip(upstream_cm)
        .flat_map(|(a, b)| (0..3).map(move |c| (a[c] / 10.0 - b[c]).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn instances_reproduce_the_upstream_identity_and_expression_files() {
    let model = ict();
    let identities = [0usize, 1, 17, 42, 99];
    let expressions = ["jawOpen", "mouthSmile_L", "eyeBlink_R", "browInnerUp_L"];
    let mut stems: Vec<String> = identities
        .iter()
        .map(|k| format!("identity{k:03}"))
        .collect();
    stems.extend(expressions.iter().map(|e| e.to_string()));
    let stems_ref: Vec<&str> = stems.iter().map(String::as_str).collect();
    let upstream = upstream_positions(&stems_ref);
    let ks = model.shape_modes();
    let ke = model.expression_modes();
    for k in identities {
        let mut p = vec![0f32; ks];
        p[k] = 1.0;
        let v = model
            .instance(
                &Tensor::new(p, &Device::Cpu).unwrap(),
                &Tensor::zeros(ke, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let err = max_abs_diff_cm(&v, &upstream[&format!("identity{k:03}")]);
        eprintln!("identity{k:03}: max abs error {err:e} cm");
        assert!(err <= 1e-4, "identity {k}: max abs error {err} cm");
    }
    for name in expressions {
        let j = model
            .expression_names()
            .iter()
            .position(|n| n == name)
            .unwrap();
        let mut p = vec![0f32; ke];
        p[j] = 1.0;
        let v = model
            .instance(
                &Tensor::zeros(ks, candle_core::DType::F32, &Device::Cpu).unwrap(),
                &Tensor::new(p, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let err = max_abs_diff_cm(&v, &upstream[name]);
        eprintln!("{name}: max abs error {err:e} cm");
        assert!(err <= 1e-4, "expression {name}: max abs error {err} cm");
    }
}

#[test]
fn counts_and_units_match_the_ict_readme() {
    let model = ict();
    assert_eq!(model.n_vertices(), 26719);
    assert_eq!(model.shape_modes(), 100);
    assert_eq!(model.expression_modes(), 53);
    // 548 triangles and 25,836 quads in the OBJ.
    assert_eq!(model.triangles().len(), 548 + 2 * 25836);
    assert_eq!(model.uvs().len(), 28911);
    assert_eq!(model.info().source_units, "cm");
    // The head is about 25 cm wide: in millimetres the bounding box is about 250 wide.
    let mean = rows(model.mean());
    let (lo, hi) = mean.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| {
        (lo.min(p[0]), hi.max(p[0]))
    });
    assert!((240.0..260.0).contains(&(hi - lo)), "width {} mm", hi - lo);
}

#[test]
fn identity_modes_are_orthogonal_with_decreasing_norms_so_coefficients_are_standard_normal() {
    let model = ict();
    let ks = model.shape_modes();
    let eye = Tensor::eye(ks, candle_core::DType::F32, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros((ks, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
    let modes = model
        .instance(&eye, &zeros)
        .unwrap()
        .broadcast_sub(model.mean())
        .unwrap()
        .reshape((ks, ()))
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let gram = modes
        .matmul(&modes.t().unwrap())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let norms: Vec<f64> = (0..ks).map(|k| gram[k][k].sqrt()).collect();
    for i in 0..ks {
        for j in 0..i {
            let cos = gram[i][j] / (norms[i] * norms[j]);
            assert!(cos.abs() < 1e-3, "modes {i} and {j} have cosine {cos}");
        }
    }
    // PCA order: each norm (= sqrt of the eigenvalue in mm) is at most the previous one.
    for k in 1..ks {
        assert!(
            norms[k] <= norms[k - 1] * 1.0001,
            "norm {k} = {} > norm {} = {}",
            norms[k],
            k - 1,
            norms[k - 1]
        );
    }
    // Unit-norm eigenvectors would all have norm 1; these are scaled by sqrt(eigenvalue).
    assert!(
        norms[0] > 100.0 && norms[ks - 1] < norms[0] / 5.0,
        "norms {} .. {}",
        norms[0],
        norms[ks - 1]
    );
}

#[test]
fn regions_follow_the_readme_table_and_map_back() {
    let model = ict();
    let face = model.region("face").unwrap();
    assert_eq!(face.vertex_ids.len(), 9409);
    assert_eq!(face.vertex_ids[..3], [0, 1, 2]);
    // The face polygons [0:9229] all lie inside the face vertices.
    assert!(
        face.triangles.len() >= 9230,
        "{} triangles",
        face.triangles.len()
    );
    // Region triangles are the whole model's triangles inside the region, in order, with the
    // same vertices and UVs after mapping back.
    let inside = model
        .triangles()
        .iter()
        .zip(model.uv_triangles())
        .filter(|(t, _)| t.iter().all(|&v| v < 9409));
    let mut count = 0;
    for ((whole_tri, whole_uv), (tri, uv_tri)) in
        inside.zip(face.triangles.iter().zip(&face.uv_triangles))
    {
        for c in 0..3 {
            assert_eq!(face.vertex_ids[tri[c] as usize], whole_tri[c]);
            assert_eq!(
                face.uvs[uv_tri[c] as usize],
                model.uvs()[whole_uv[c] as usize]
            );
        }
        count += 1;
    }
    assert_eq!(count, face.triangles.len());
    let narrow = model.region("narrow_face").unwrap();
    assert_eq!(narrow.vertex_ids.len(), 6706);
    for name in [
        "head_and_neck",
        "teeth",
        "eyeball_left",
        "eye_occlusion_right",
        "gums_and_tongue",
    ] {
        assert!(!model.region(name).unwrap().triangles.is_empty(), "{name}");
    }
    assert_eq!(model.vertex_set("rigid").unwrap().len(), 1487);
    assert_eq!(model.vertex_set("fitting").unwrap().len(), 7801);
    let err = model.region("nose").unwrap_err().to_string();
    assert!(err.contains("`nose`") && err.contains("face"), "{err}");

    // A region model gives the same positions as the whole model at its vertices.
    let sub = model.region_model("face").unwrap();
    assert_eq!(sub.n_vertices(), 9409);
    let p = Tensor::new(common::pseudo_random(100, 3), &Device::Cpu).unwrap();
    let e = Tensor::new(common::pseudo_random(53, 4), &Device::Cpu)
        .unwrap()
        .abs()
        .unwrap();
    let whole = rows(&model.instance(&p, &e).unwrap());
    let part = rows(&sub.instance(&p, &e).unwrap());
    for (i, &v) in face.vertex_ids.iter().enumerate().step_by(97) {
        for c in 0..3 {
            assert!((whole[v as usize][c] - part[i][c]).abs() < 1e-3);
        }
    }
    assert_eq!(
        sub.landmark_vertex_ids(),
        model.landmark_vertex_ids(),
        "all 68 landmarks lie in the face"
    );
}

#[test]
fn landmarks_are_the_readme_list_and_mirror_across_the_symmetry_plane() {
    let model = ict();
    let ids: Vec<u32> = model
        .landmark_vertex_ids()
        .iter()
        .map(|l| l.unwrap())
        .collect();
    assert_eq!(ids[..5], [1225, 1888, 1052, 367, 1719]);
    assert_eq!(ids[67], 5966);
    common_symmetry_check(model);
}

/// iBUG pairs (0-based) that mirror each other: eye outer/inner corners, mouth corners, brow ends.
pub fn common_symmetry_check(model: &ganfit_morphable::MorphableModel) {
    let mean = rows(model.mean());
    let face = model.vertex_set("face").unwrap();
    // The symmetry plane x = c of a left-right symmetric mean goes through its vertices' mean x.
    let c = face
        .iter()
        .map(|&v| mean[v as usize][0] as f64)
        .sum::<f64>()
        / face.len() as f64;
    for (right, left) in [(36, 45), (39, 42), (48, 54), (17, 26), (31, 35)] {
        let (Some(r), Some(l)) = (
            model.landmark_vertex_ids()[right],
            model.landmark_vertex_ids()[left],
        ) else {
            panic!("landmarks {right} and {left} must be defined");
        };
        let (r, l) = (mean[r as usize], mean[l as usize]);
        let mirrored_x = 2.0 * c as f32 - l[0];
        let err =
            ((r[0] - mirrored_x).powi(2) + (r[1] - l[1]).powi(2) + (r[2] - l[2]).powi(2)).sqrt();
        assert!(
            err < 2.0,
            "landmarks {right}/{left} are {err} mm from mirror images"
        );
        assert!(
            (r[0] - l[0]).abs() > 10.0,
            "landmarks {right}/{left} are not on opposite sides"
        );
    }
}

#[test]
fn triangles_wind_consistently_and_face_outwards() {
    let model = ict();
    // Consistent winding: every edge that two triangles share is walked in opposite directions.
    let mut directed: HashMap<(u32, u32), usize> = HashMap::new();
    for t in model.triangles() {
        for c in 0..3 {
            *directed.entry((t[c], t[(c + 1) % 3])).or_default() += 1;
        }
    }
    let shared = directed
        .keys()
        .filter(|(a, b)| directed.contains_key(&(*b, *a)))
        .count();
    let same_direction_twice = directed.values().filter(|&&n| n > 1).count();
    assert!(shared > 70_000, "only {shared} shared edges");
    assert_eq!(
        same_direction_twice, 0,
        "edges walked twice in the same direction"
    );

    // Outwards: the skin's area-weighted normals point away from the head's centre overall, and
    // the vertex normals at the nose tip and chin point forward (+z, y up).
    let mean = rows(model.mean());
    let skin = model.region("skin").unwrap();
    let centre = skin.vertex_ids.iter().fold([0f64; 3], |acc, &v| {
        let p = mean[v as usize];
        [
            acc[0] + p[0] as f64,
            acc[1] + p[1] as f64,
            acc[2] + p[2] as f64,
        ]
    });
    let centre = centre.map(|x| (x / skin.vertex_ids.len() as f64) as f32);
    let (mut out, mut total) = (0f64, 0f64);
    for t in &skin.triangles {
        let [a, b, c] = t.map(|i| mean[skin.vertex_ids[i as usize] as usize]);
        let e1 = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
        let e2 = [c[0] - a[0], c[1] - a[1], c[2] - a[2]];
        let n = [
            e1[1] * e2[2] - e1[2] * e2[1],
            e1[2] * e2[0] - e1[0] * e2[2],
            e1[0] * e2[1] - e1[1] * e2[0],
        ];
        let d = [a[0] - centre[0], a[1] - centre[1], a[2] - centre[2]];
        let len = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt().max(1e-6);
        let s = (n[0] * d[0] + n[1] * d[1] + n[2] * d[2]) / len;
        out += s.max(0.0) as f64;
        total += s.abs() as f64;
    }
    // Ears, nostrils and lips are concave, so not all of it; reversed winding would give ~0.1.
    assert!(
        out / total > 0.8,
        "only {} of the weighted skin normals face outwards",
        out / total
    );
    let normals = rows(&model.vertex_normals(model.mean()).unwrap());
    let normal_at =
        |landmark: usize| normals[model.landmark_vertex_ids()[landmark].unwrap() as usize];
    let nose_tip = normal_at(30);
    assert!(
        nose_tip[2] > 0.7,
        "nose-tip normal {nose_tip:?} should point forward"
    );
    let chin = normal_at(8);
    assert!(
        chin[1] < -0.5 && chin[2] > 0.0,
        "chin normal {chin:?} should point down and forward"
    );
}
