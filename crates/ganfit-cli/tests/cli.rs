//! The `ganfit` binary end to end: a real fit of the bundled photo, and clean failures.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ganfit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ganfit"))
}

fn astronaut() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/astronaut.png")
}

#[test]
fn fits_the_astronaut_and_writes_every_output() {
    let out = tempfile::tempdir().unwrap();
    let status = ganfit()
        .args(["fit", "--quiet", "--out"])
        .arg(out.path())
        .arg(astronaut())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let dir = out.path();
    // The README's list (which the CLI's guard against overwriting a photo also keeps).
    let mut written: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "albedo.png",
            "frontal.png",
            "landmarks.json",
            "mesh.glb",
            "mesh.mtl",
            "mesh.obj",
            "mesh_texture.png",
            "overlay.png",
            "params.json",
            "render.png",
            "report.html",
            "texture.png",
            "texture_observed.png",
            "views.png",
        ]
    );

    let obj = std::fs::read_to_string(dir.join("mesh.obj")).unwrap();
    let vertices = obj.lines().filter(|l| l.starts_with("v ")).count();
    let faces = obj.lines().filter(|l| l.starts_with("f ")).count();
    assert!(vertices > 20_000 && faces > 40_000, "{vertices} {faces}");
    assert!(obj.contains("mtllib"));
    let mtl = std::fs::read_to_string(dir.join("mesh.mtl")).unwrap();
    assert!(mtl.contains("map_Kd mesh_texture.png"), "{mtl}");
    // Every texture coordinate a face uses lies inside the texture: viewers clamp or wrap
    // beyond it, and ICT's other UV tiles would sample the face's texels.
    let uvs: Vec<[f64; 2]> = obj
        .lines()
        .filter_map(|l| l.strip_prefix("vt "))
        .map(|l| {
            let mut uv = l.split_whitespace().map(|x| x.parse::<f64>().unwrap());
            [uv.next().unwrap(), uv.next().unwrap()]
        })
        .collect();
    for line in obj.lines().filter_map(|l| l.strip_prefix("f ")) {
        for corner in line.split_whitespace() {
            let vt: usize = corner.split('/').nth(1).unwrap().parse().unwrap();
            let [u, v] = uvs[vt - 1];
            assert!(
                (0.0..=1.0).contains(&u) && (0.0..=1.0).contains(&v),
                "{line}"
            );
        }
    }
    let mesh_texture = image::open(dir.join("mesh_texture.png")).unwrap();
    assert_eq!((mesh_texture.width(), mesh_texture.height()), (2048, 1024));
    let glb = std::fs::read(dir.join("mesh.glb")).unwrap();
    assert_eq!(&glb[..4], b"glTF");
    // Animatable: ICT's 53 expression blendshapes as named, weighted morph targets.
    let json_len = u32::from_le_bytes(glb[12..16].try_into().unwrap()) as usize;
    let gltf: serde_json::Value = serde_json::from_slice(&glb[20..20 + json_len]).unwrap();
    let names = gltf["meshes"][0]["extras"]["targetNames"]
        .as_array()
        .unwrap();
    assert_eq!(names.len(), 53);
    assert!(names.iter().any(|n| n == "eyeBlink_L"), "{names:?}");
    assert_eq!(gltf["meshes"][0]["weights"].as_array().unwrap().len(), 53);

    let albedo = image::open(dir.join("albedo.png")).unwrap();
    assert!(albedo.width() >= 64 && albedo.width() == albedo.height());
    let texture = image::open(dir.join("texture.png")).unwrap();
    assert_eq!((texture.width(), texture.height()), (1024, 1024));
    for name in ["render.png", "overlay.png"] {
        let img = image::open(dir.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (512, 512), "{name}");
    }
    let render = image::open(dir.join("render.png")).unwrap().to_rgba8();
    let covered = render.pixels().filter(|p| p.0[3] > 0).count();
    let transparent = render.pixels().filter(|p| p.0[3] == 0).count();
    assert!(
        covered > 10_000 && transparent > 10_000,
        "{covered} {transparent}"
    );
    assert!(image::open(dir.join("frontal.png")).is_ok());
    // Three views in each of two rows, the face drawn in each.
    let views = image::open(dir.join("views.png")).unwrap().to_rgba8();
    assert_eq!(views.dimensions(), (3 * 256, 2 * 256));
    for (column, row) in (0..3).flat_map(|c| (0..2).map(move |r| (c, r))) {
        let tile = image::imageops::crop_imm(&views, column * 256, row * 256, 256, 256);
        let covered = tile.to_image().pixels().filter(|p| p.0[3] > 0).count();
        assert!(covered > 256 * 256 / 5, "view {column}, {row}: {covered}");
    }
    let report = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        report.contains("data:image/jpeg;base64,")
            && report.contains("data:image/png;base64,")
            && report.contains("<polyline")
    );
    assert!(
        !report.contains("src=\"http"),
        "the report must open offline"
    );

    let landmarks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("landmarks.json")).unwrap())
            .unwrap();
    let point = |kind: &str, i: usize| -> [f64; 2] {
        let p = &landmarks[kind][i];
        [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()]
    };
    assert_eq!(landmarks["detected"].as_array().unwrap().len(), 68);
    // Outer eye corners give the inter-ocular distance the error is measured in.
    let (l, r) = (point("detected", 36), point("detected", 45));
    let interocular = ((l[0] - r[0]).powi(2) + (l[1] - r[1]).powi(2)).sqrt();
    let mut total = 0.0;
    let mut count = 0;
    for i in 0..68 {
        if landmarks["fitted"][i].is_null() {
            continue;
        }
        let (d, f) = (point("detected", i), point("fitted", i));
        total += ((d[0] - f[0]).powi(2) + (d[1] - f[1]).powi(2)).sqrt();
        count += 1;
    }
    let mean_error = total / f64::from(count) / interocular;
    eprintln!(
        "mean landmark error: {:.2} % of the inter-ocular distance",
        100.0 * mean_error
    );
    assert!(count >= 60 && mean_error < 0.03, "{mean_error}");

    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["units"], "millimetres");
    assert_eq!(params["camera"]["K"].as_array().unwrap().len(), 3);
    let light = params["light_sh"]["coefficients"].as_array().unwrap();
    assert_eq!(light.len(), 3);
    assert!(light.iter().all(|row| row.as_array().unwrap().len() == 9));
    // pixel ≃ K·(R·X + t) for the OBJ's vertices: the mesh's centroid must land in the photo,
    // in front of the camera.
    let m = |name: &str, i: usize, j: usize| params["camera"][name][i][j].as_f64().unwrap();
    let t: Vec<f64> = (0..3)
        .map(|i| params["camera"]["t"][i].as_f64().unwrap())
        .collect();
    let mut centroid = [0.0f64; 3];
    for line in obj.lines().filter(|l| l.starts_with("v ")) {
        for (c, v) in line.split_whitespace().skip(1).take(3).enumerate() {
            centroid[c] += v.parse::<f64>().unwrap() / vertices as f64;
        }
    }
    let camera: Vec<f64> = (0..3)
        .map(|i| (0..3).map(|j| m("R", i, j) * centroid[j]).sum::<f64>() + t[i])
        .collect();
    let u = m("K", 0, 0) * camera[0] / camera[2] + m("K", 0, 2);
    let v = m("K", 1, 1) * camera[1] / camera[2] + m("K", 1, 2);
    assert!(camera[2] > 0.0 && (0.0..512.0).contains(&u) && (0.0..512.0).contains(&v));
}

#[test]
fn a_missing_photo_fails_with_one_line() {
    let stderr = one_line_failure(ganfit().args(["fit", "--quiet", "no/such/photo.jpg"]));
    assert!(stderr.contains("photo.jpg"), "{stderr}");
    // The operating system's reason once, though both the message and its source name it.
    assert_eq!(stderr.matches("(os error").count(), 1, "{stderr}");
}

#[test]
fn a_face_of_a_group_photo_is_chosen_by_its_place_from_the_left() {
    let dir = tempfile::tempdir().unwrap();
    let person = image::open(astronaut()).unwrap().to_rgb8();
    let width = person.width();
    let mut pair = image::RgbImage::new(2 * width, person.height());
    image::imageops::replace(&mut pair, &person, 0, 0);
    image::imageops::replace(
        &mut pair,
        &image::imageops::flip_horizontal(&person),
        width.into(),
        0,
    );
    let photo = dir.path().join("pair.png");
    pair.save(&photo).unwrap();
    for (face, right_half) in [("0", false), ("1", true)] {
        let out = dir.path().join(face);
        run_ok(&[
            "fit",
            "--quiet",
            "--iterations",
            "0",
            "--face",
            face,
            "--out",
            out.to_str().unwrap(),
            photo.to_str().unwrap(),
        ]);
        let landmarks: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("landmarks.json")).unwrap())
                .unwrap();
        let points = landmarks["detected"].as_array().unwrap();
        let on_right = points
            .iter()
            .all(|p| p[0].as_f64().unwrap() > f64::from(width));
        assert_eq!(on_right, right_half, "--face {face}");
    }
    let stderr = one_line_failure(
        landmark_fit()
            .args(["--face", "2", "--out"])
            .arg(dir.path().join("2"))
            .arg(&photo),
    );
    assert!(stderr.contains("pick one of 0 to 1"), "{stderr}");
}

#[test]
fn results_never_overwrite_a_photo() {
    let dir = tempfile::tempdir().unwrap();
    let photo = dir.path().join("render.png");
    std::fs::copy(astronaut(), &photo).unwrap();
    let before = std::fs::read(&photo).unwrap();
    let stderr = one_line_failure(
        ganfit()
            .args(["fit", "--quiet", "--iterations", "0", "--out"])
            .arg(dir.path())
            .arg(&photo),
    );
    assert!(stderr.contains("would overwrite the photo"), "{stderr}");
    assert_eq!(std::fs::read(&photo).unwrap(), before);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing written"
    );
}

#[test]
fn photos_of_one_person_get_one_texture_and_their_own_renders() {
    let london = ganfit::synthetic::shared_dir()
        .unwrap()
        .join("data/faces/frl_london");
    let photos = [
        london.join("001_neutral.jpg"),
        london.join("001_smiling.jpg"),
    ];
    let out = tempfile::tempdir().unwrap();
    run_ok(&[
        "fit",
        "--quiet",
        "--same-person",
        "--iterations",
        "2",
        "--out",
        out.path().to_str().unwrap(),
        photos[0].to_str().unwrap(),
        photos[1].to_str().unwrap(),
    ]);
    let read = |photo: &str, file: &str| std::fs::read(out.path().join(photo).join(file)).unwrap();
    assert_eq!(
        read("001_neutral", "texture.png"),
        read("001_smiling", "texture.png")
    );
    assert_ne!(
        read("001_neutral", "render.png"),
        read("001_smiling", "render.png")
    );
}

/// `ganfit fit --quiet` through the landmark alignment only; options and photos to follow.
fn landmark_fit() -> Command {
    let mut command = ganfit();
    command.args(["fit", "--quiet", "--iterations", "0"]);
    command
}

/// [`landmark_fit`] of `photos` as one person's, into `out`.
fn same_person_landmark_fit(out: &Path, photos: &[&Path]) -> Command {
    let mut command = landmark_fit();
    command
        .args(["--same-person", "--out"])
        .arg(out)
        .args(photos);
    command
}

#[test]
fn a_faceless_photo_of_one_person_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.png");
    image::RgbImage::from_pixel(300, 300, image::Rgb([90, 120, 150]))
        .save(&blank)
        .unwrap();
    let out = dir.path().join("out");
    let stderr = one_line_failure(&mut same_person_landmark_fit(&out, &[&astronaut(), &blank]));
    let named = format!("error: {}: no face found", blank.display());
    assert!(stderr.starts_with(&named), "{stderr}");
    assert!(!out.join("astronaut").join("mesh.obj").exists());
}

#[test]
fn photos_of_two_people_fitted_as_one_are_warned_about() {
    let london = ganfit::synthetic::shared_dir()
        .unwrap()
        .join("data/faces/frl_london/001_neutral.jpg");
    let out = tempfile::tempdir().unwrap();
    let output = same_person_landmark_fit(out.path(), &[&astronaut(), &london])
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.starts_with("warning: ") && stderr.contains("look like two people"),
        "{stderr}"
    );
    assert!(out.path().join("001_neutral").join("mesh.obj").exists());
}

#[test]
fn a_face_cut_off_by_the_photos_edge_is_fitted_and_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let whole = image::open(astronaut()).unwrap().to_rgb8();
    // Cut below her mouth: the lower jaw's landmarks lie beyond the photo.
    let cut = dir.path().join("cut.png");
    image::imageops::crop_imm(&whole, 0, 0, 512, 150)
        .to_image()
        .save(&cut)
        .unwrap();
    let out = dir.path().join("out");
    let output = landmark_fit()
        .arg("--out")
        .arg(&out)
        .arg(&cut)
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "warning: {}: the photo's edge cuts off",
            cut.display()
        )) && stderr.contains("of 68 landmarks lie beyond it"),
        "{stderr}"
    );
    assert!(out.join("mesh.obj").exists());
    // The whole photo: no warning.
    let output = landmark_fit()
        .arg("--out")
        .arg(dir.path().join("whole"))
        .arg(astronaut())
        .output()
        .unwrap();
    assert!(output.status.success() && output.stderr.is_empty());
}

#[test]
fn an_output_folder_that_is_a_file_fails_before_the_fit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("results");
    std::fs::write(&file, "notes").unwrap();
    for out in [file.clone(), file.join("astronaut")] {
        let stderr = one_line_failure(
            ganfit()
                .args(["fit", "--quiet", "--out"])
                .arg(&out)
                .arg(astronaut()),
        );
        assert!(stderr.contains("is a file, not a folder"), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "notes");
}

#[test]
fn a_batch_fits_every_photo_it_can_and_overwrites_none() {
    let dir = tempfile::tempdir().unwrap();
    // Two photos named alike in different folders, and one without a face between them.
    let photos: Vec<PathBuf> = ["a/1.png", "blank.png", "b/1.png"]
        .iter()
        .map(|name| dir.path().join(name))
        .collect();
    for photo in [&photos[0], &photos[2]] {
        std::fs::create_dir_all(photo.parent().unwrap()).unwrap();
        std::fs::copy(astronaut(), photo).unwrap();
    }
    image::RgbImage::from_pixel(300, 300, image::Rgb([90, 120, 150]))
        .save(&photos[1])
        .unwrap();
    let out = dir.path().join("out");
    let status = ganfit()
        .args(["fit", "--quiet", "--iterations", "0", "--out"])
        .arg(&out)
        .args(&photos)
        .output()
        .unwrap();
    assert!(!status.status.success());
    let stderr = String::from_utf8(status.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 2, "{stderr}");
    assert!(
        stderr.contains("blank.png: no face found") && stderr.contains("1 of 3 photos"),
        "{stderr}"
    );
    for fitted in ["1", "1-2"] {
        assert!(out.join(fitted).join("mesh.obj").is_file(), "{fitted}");
    }
    assert!(!out.join("blank").exists());
}

#[test]
fn an_unavailable_device_or_bad_option_fails_with_one_line() {
    let textures = tempfile::tempdir().unwrap();
    let commands = [
        (["fit", "--quiet"], astronaut()),
        (["texture", "train"], textures.path().to_path_buf()),
    ];
    for ((command, input), args) in commands.iter().flat_map(|c| {
        [
            &["--device", "cuda"][..],
            &["--device", "tpu"],
            &["--device", "cuda:x"],
        ]
        .map(|args| (c, args))
    }) {
        let out = ganfit()
            .args(command)
            .args(args)
            .arg(input)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{command:?} {args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

#[test]
fn a_file_that_is_not_an_image_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("notes.png");
    std::fs::write(&fake, "this is not a picture").unwrap();
    let out = ganfit()
        .args(["fit", "--quiet", "--out"])
        .arg(dir.path().join("out"))
        .arg(&fake)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn trains_a_tiny_texture_gan_and_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("uv");
    std::fs::create_dir(&data).unwrap();
    for i in 0..8u8 {
        let img = image::RgbaImage::from_fn(8, 8, |x, y| {
            image::Rgba([i * 30, (x * 30) as u8, (y * 30) as u8, 255])
        });
        img.save(data.join(format!("{i}.png"))).unwrap();
    }
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"generator": {"latent_dim": 8, "channels": [8, 8]}, "batch_size": 4,
            "phase_steps": 1, "total_steps": 3, "sample_every": 2, "sample_count": 4,
            "checkpoint_every": 0}"#,
    )
    .unwrap();
    let out = dir.path().join("gan");
    let run = |extra: &[&std::ffi::OsStr]| {
        let output = ganfit()
            .args(["texture", "train", "--quiet", "--out"])
            .arg(&out)
            .args(extra)
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&["--config".as_ref(), config.as_os_str()]);
    for file in ["generator.safetensors", "checkpoint.safetensors", "log.csv"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let log = std::fs::read_to_string(out.join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");
    let checkpoint = out.join("checkpoint.safetensors");
    run(&["--resume".as_ref(), checkpoint.as_os_str()]);

    let bad = ganfit()
        .args(["texture", "train", "--quiet", "--config"])
        .arg(&data)
        .arg(&data)
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn assets_lists_every_manifest_entry_and_prepares_the_named_ones() {
    let list = ganfit().arg("assets").output().unwrap();
    assert!(list.status.success());
    let text = String::from_utf8(list.stdout).unwrap();
    for id in [
        "dlib-face-recognition-resnet-v1",
        "mediapipe-face-landmark",
        "ict-face-model",
    ] {
        assert!(text.contains(id), "{text}");
    }
    let sfm = ganfit()
        .args(["assets", "sfm-face-model"])
        .output()
        .unwrap();
    assert!(
        sfm.status.success(),
        "{}",
        String::from_utf8_lossy(&sfm.stderr)
    );
    let unknown = ganfit().args(["assets", "no-such-model"]).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown asset id"));
}

#[test]
fn the_accuracy_bench_writes_its_tables() {
    let out = tempfile::tempdir().unwrap();
    let status = ganfit()
        .args([
            "bench",
            "accuracy",
            "--count",
            "1",
            "--photos",
            "1",
            "--textures",
            "1",
            "--iterations",
            "2",
            "--no-peer",
            "--out",
        ])
        .arg(out.path())
        .arg("--chips")
        .arg(out.path().join("chips"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let table = std::fs::read_to_string(out.path().join("accuracy.md")).unwrap();
    assert!(table.contains("| ours: full fit |"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("accuracy.json")).unwrap())
            .unwrap();
    let mean = json["synthetic"]["summary"]["full"]["mean_mm"].as_f64();
    assert!(mean.is_some_and(|mm| mm > 0.0 && mm < 10.0), "{json}");

    let chips_dir = out.path().join("chips");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chips_dir.join("chips.json")).unwrap())
            .unwrap();
    let chips = index[0]["chips"].as_object().expect("one photo's chips");
    for view in ["photo", "render", "frontal"] {
        let file = chips[view].as_str().unwrap();
        let chip = image::open(chips_dir.join(file)).unwrap();
        assert_eq!((chip.width(), chip.height()), (224, 224), "{view}");
    }
}

/// Runs `ganfit` with `args`, asserting success; returns stdout.
/// Runs `command`, which must fail with one line on stderr, and returns what it printed there.
fn one_line_failure(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    stderr
}

fn run_ok(args: &[&str]) -> String {
    let out = ganfit().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn collects_fitted_textures_into_a_pca_model_that_a_fit_then_uses() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let photo = astronaut().to_str().unwrap().to_owned();
    let first = path("first");
    run_ok(&[
        "fit",
        "--quiet",
        "--iterations",
        "0",
        "--out",
        &first,
        &photo,
    ]);
    // Two more "fits": the same unwrap darkened and tinted, so the maps span two directions.
    for (name, gain) in [("second", [0.6f32, 0.7, 0.8]), ("third", [1.0, 0.8, 0.6])] {
        let fit = dir.path().join(name);
        std::fs::create_dir_all(&fit).unwrap();
        let seen = Path::new(&first).join("texture_observed.png");
        std::fs::copy(seen, fit.join("texture_observed.png")).unwrap();
        let mut texture = image::open(Path::new(&first).join("texture.png"))
            .unwrap()
            .to_rgb8();
        for pixel in texture.pixels_mut() {
            for (value, gain) in pixel.0.iter_mut().zip(gain) {
                *value = (f32::from(*value) * gain) as u8;
            }
        }
        texture.save(fit.join("texture.png")).unwrap();
    }
    let maps = path("maps");
    let (second, third) = (path("second"), path("third"));
    run_ok(&[
        "texture", "collect", "--size", "64", "--out", &maps, &first, &second, &third,
    ]);
    let map = image::open(Path::new(&maps).join("second.png"))
        .unwrap()
        .to_rgba8();
    assert_eq!(map.dimensions(), (64, 64));
    let seen = map.pixels().filter(|p| p.0[3] == 255).count();
    assert!(
        seen > 200 && seen < 64 * 64 - 200 && map.pixels().all(|p| p.0[3] % 255 == 0),
        "{seen} texels seen"
    );

    let model = path("pca.safetensors");
    let said = run_ok(&[
        "texture",
        "pca",
        &maps,
        "--components",
        "2",
        "--out",
        &model,
    ]);
    assert!(said.contains("2 components from 3 maps"), "{said}");
    let fitted = path("fitted");
    run_ok(&[
        "fit",
        "--quiet",
        "--iterations",
        "2",
        "--texture-model",
        &model,
        "--out",
        &fitted,
        &photo,
    ]);
    let albedo = image::open(Path::new(&fitted).join("albedo.png")).unwrap();
    assert_eq!(
        (albedo.width(), albedo.height()),
        (64, 64),
        "the albedo is the model's"
    );

    // Not a model, and a folder that is not a fit: one line each.
    let root = dir.path().to_str().unwrap();
    for args in [
        ["fit", "--quiet", "--texture-model", &photo, &photo],
        ["texture", "collect", "--out", &maps, root],
    ] {
        let out = ganfit().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn the_texture_size_is_chosen_and_checked() {
    let out = tempfile::tempdir().unwrap();
    let output = out.path().to_str().unwrap();
    let photo = astronaut();
    let photo = photo.to_str().unwrap();
    let fit = |size| {
        [
            "fit",
            "--quiet",
            "--iterations",
            "0",
            "--texture-size",
            size,
            "--out",
            output,
            photo,
        ]
    };
    run_ok(&fit("256"));
    let size = |name: &str| image::image_dimensions(out.path().join(name)).unwrap();
    assert_eq!(size("texture.png"), (256, 256));
    assert_eq!(size("mesh_texture.png"), (512, 256));
    let stderr = one_line_failure(ganfit().args(fit("5")));
    assert!(
        stderr.contains("texture size 5 is outside 16..=8192"),
        "{stderr}"
    );
}

/// A folder stands for the photos in it: each is fitted on its own into a sub-folder of the
/// output, other files are passed over, and a photo whose body is damaged (found only when its
/// pixels are read, after the headers of all were checked) is reported while the others are
/// fitted. A folder without photos is refused before any fit.
#[test]
fn a_folder_is_fitted_photo_by_photo() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    std::fs::copy(astronaut(), photos.join("a.png")).unwrap();
    let london = ganfit::synthetic::shared_dir()
        .unwrap()
        .join("data/faces/frl_london/001_neutral.jpg");
    let jpeg = std::fs::read(london).unwrap();
    std::fs::write(photos.join("b.JPG"), &jpeg[..jpeg.len() / 4]).unwrap();
    std::fs::write(photos.join("notes.txt"), "not a photo").unwrap();
    let out = dir.path().join("out");
    let (folder, results) = (photos.to_str().unwrap(), out.to_str().unwrap());
    let stderr = String::from_utf8(
        landmark_fit()
            .args(["--out", results, folder])
            .output()
            .unwrap()
            .stderr,
    )
    .unwrap();
    assert!(out.join("a").join("mesh.obj").is_file(), "{stderr}");
    assert!(!out.join("b").exists() && !out.join("notes").exists());
    assert!(stderr.contains("b.JPG could not be decoded"), "{stderr}");
    assert!(
        stderr.contains("1 of 2 photos could not be fitted"),
        "{stderr}"
    );

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let stderr =
        one_line_failure(ganfit().args(["fit", "--out", results, empty.to_str().unwrap()]));
    assert!(stderr.contains("holds no photos"), "{stderr}");
}
