//! `ganfit bench landmark-map`: where on ICT's face MediaPipe's Face Mesh points really lie.
//!
//! A fit pulls model vertices onto detected points, so each detected point must name the vertex
//! it shows. A purely geometric correspondence (aligning MediaPipe's canonical mesh to ICT's)
//! misses how the landmarker actually places its points, e.g. its nose tip or jaw line. This
//! command measures that instead: it draws synthetic ICT faces with known geometry and camera
//! ([`ganfit::synthetic`]), runs the detector and the landmarker on them, and gives every
//! Face Mesh point the ICT face vertex whose true projection lies nearest the detected point on
//! average over the faces (distances relative to the inter-ocular distance). Held-out faces
//! (other seeds) report the per-point error of the new and of the current correspondence. The
//! table is written as the Rust source of `ICT_VERTEX_FROM_MESH`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use ganfit::Fitter;
use ganfit::losses::face::{
    FaceChoice, FaceDetector, FaceLandmarker, IBUG68_FROM_MESH, ICT_VERTEX_FROM_MESH, MESH_POINTS,
};
use ganfit::synthetic::{SyntheticAssets, SyntheticConfig, SyntheticGenerator, shared_dir};
use nalgebra::{Rotation3, Vector3};

/// Options of `ganfit bench landmark-map`.
#[derive(Debug, Args)]
pub struct LandmarkMapArgs {
    /// Synthetic faces the correspondence is measured on.
    #[arg(long, default_value_t = 200)]
    faces: u64,
    /// Further faces (other seeds) it is checked on.
    #[arg(long, default_value_t = 50)]
    held_out: u64,
    /// Seed of the first measuring face; the held-out faces follow the measuring ones. The
    /// default keeps clear of `ganfit bench accuracy`'s seeds.
    #[arg(long, default_value_t = 1_000_000)]
    seed: u64,
    /// Where the table's Rust source is written.
    #[arg(long, default_value = "ict_vertex_from_mesh.rs")]
    out: PathBuf,
    /// Where the unwrapped portrait textures are kept.
    #[arg(long, default_value = "bench-accuracy/cache/textures")]
    cache: PathBuf,
}

/// One synthetic face as the landmarker saw it.
struct Sighting {
    /// True pixel of each candidate vertex.
    candidates: Vec<[f64; 2]>,
    /// The landmarker's 468 points.
    detected: Vec<[f32; 2]>,
    /// True distance between the outer eye corners, pixels.
    inter_ocular: f64,
}

/// Runs `ganfit bench landmark-map`.
pub fn run(args: &LandmarkMapArgs) -> anyhow::Result<()> {
    let fitter = Fitter::builder().iterations(0).build()?;
    let model = fitter.model();
    let shared = shared_dir()?;
    let assets = SyntheticAssets::from_shared(&shared, &fitter, &args.cache, 8)?;
    let generator = SyntheticGenerator::new(model, SyntheticConfig::default(), assets)?;
    let resolver = ganfit::assets::Resolver::new();
    let detector = FaceDetector::from_resolver(&resolver, &Device::Cpu)?;
    let landmarker = FaceLandmarker::from_resolver(&resolver, &Device::Cpu)?;
    let candidates = model
        .vertex_set("face")
        .context("the default model names its face area `face`")?
        .to_vec();
    let eye_corners = [36, 45].map(|i| model.landmark_vertex_ids()[i]);
    let [Some(left_eye), Some(right_eye)] = eye_corners else {
        anyhow::bail!("the model has no outer eye-corner landmarks");
    };

    let sight = |seed: u64| -> anyhow::Result<Option<Sighting>> {
        let face = generator.generate(seed)?;
        // As the fitter finds them.
        let Ok((_, landmarks)) = landmarker.locate(&detector, &face.image, FaceChoice::Largest)
        else {
            return Ok(None);
        };
        let detected = landmarks.points.iter().map(|p| [p[0], p[1]]).collect();
        let rotation = Rotation3::new(Vector3::from(face.rotation));
        let translation = Vector3::from(face.translation);
        let k = face.intrinsics;
        let project = |vertex: u32| {
            let p = face.vertices[vertex as usize].map(f64::from);
            let c = rotation * Vector3::from(p) + translation;
            [k.fx * c.x / c.z + k.cx, k.fy * c.y / c.z + k.cy]
        };
        let (a, b) = (project(left_eye), project(right_eye));
        Ok(Some(Sighting {
            candidates: candidates.iter().map(|&v| project(v)).collect(),
            detected,
            inter_ocular: (a[0] - b[0]).hypot(a[1] - b[1]),
        }))
    };
    let error = |s: &Sighting, point: usize, candidate: usize| {
        let (d, p) = (s.detected[point], s.candidates[candidate]);
        (f64::from(d[0]) - p[0]).hypot(f64::from(d[1]) - p[1]) / s.inter_ocular
    };

    let mut cost = vec![vec![0.0; candidates.len()]; MESH_POINTS];
    let mut measured = 0u32;
    for seed in args.seed..args.seed + args.faces {
        let Some(sighting) = sight(seed)? else {
            continue;
        };
        for (point, row) in cost.iter_mut().enumerate() {
            for (candidate, total) in row.iter_mut().enumerate() {
                *total += error(&sighting, point, candidate);
            }
        }
        measured += 1;
        eprintln!("measured face {measured}/{}", args.faces);
    }
    anyhow::ensure!(measured > 0, "no synthetic face was detected");
    let best: Vec<usize> = cost
        .iter()
        .map(|row| {
            (0..row.len())
                .min_by(|&a, &b| row[a].total_cmp(&row[b]))
                .expect("the face area has vertices")
        })
        .collect();

    // Held-out faces: mean error per point of the new and the current table.
    let slot = |vertex: u32| candidates.iter().position(|&c| c == vertex);
    let current: Vec<Option<usize>> = ICT_VERTEX_FROM_MESH.iter().map(|&v| slot(v)).collect();
    let (mut new_error, mut old_error) = (vec![0.0; MESH_POINTS], vec![0.0; MESH_POINTS]);
    let mut held_out = 0;
    let first = args.seed + args.faces;
    for seed in first..first + args.held_out {
        let Some(sighting) = sight(seed)? else {
            continue;
        };
        for point in 0..MESH_POINTS {
            new_error[point] += error(&sighting, point, best[point]);
            old_error[point] += current[point].map_or(f64::NAN, |c| error(&sighting, point, c));
        }
        held_out += 1;
    }
    let mean_percent = |errors: &[f64], points: &mut dyn Iterator<Item = usize>| {
        let points: Vec<usize> = points.collect();
        100.0 * points.iter().map(|&p| errors[p]).sum::<f64>()
            / (points.len() * held_out.max(1)) as f64
    };
    let mut summary = String::new();
    for (name, points) in [
        ("all 468 points", (0..MESH_POINTS).collect::<Vec<_>>()),
        ("iBUG 68", IBUG68_FROM_MESH.to_vec()),
        ("iBUG jaw 0-16", IBUG68_FROM_MESH[..17].to_vec()),
        ("iBUG inner 17-67", IBUG68_FROM_MESH[17..].to_vec()),
    ] {
        writeln!(
            summary,
            "//! - {name}: {:.2} % (was {:.2} %)",
            mean_percent(&new_error, &mut points.iter().copied()),
            mean_percent(&old_error, &mut points.iter().copied()),
        )?;
    }
    eprint!("{summary}");

    let mut source = format!(
        "//! Correspondence from MediaPipe's 468 Face Mesh points to ICT-FaceKit vertices.\n\
         //!\n\
         //! Generated by `ganfit bench landmark-map --faces {} --held-out {} --seed {}`; do not\n\
         //! edit by hand. Each Face Mesh point takes the ICT face vertex whose true projection\n\
         //! lies nearest, on average over {measured} synthetic ICT faces (`ganfit::synthetic`:\n\
         //! random identity and expression, yaw ±45°, pitch ±20°), to where the fit finds the\n\
         //! point (`FaceLandmarker::locate`). Mean distance between a detected point and its\n\
         //! vertex's true projection on {held_out} held-out faces, in % of the inter-ocular\n\
         //! distance (in brackets: with the table in use when this one was made):\n\
         {summary}\n\
         /// ICT-FaceKit vertex index (0-based, into the full 26,719-vertex model) of each Face\n\
         /// Mesh point.\n\
         pub const ICT_VERTEX_FROM_MESH: [u32; {MESH_POINTS}] = [\n",
        args.faces, args.held_out, args.seed
    );
    push_rows(&mut source, best.iter().map(|&c| candidates[c].to_string()));
    source.push_str(&format!(
        "];\n\n\
         /// Mean distance between each Face Mesh point as detected and its vertex's true\n\
         /// projection over the measuring faces, fraction of the inter-ocular distance: the\n\
         /// landmarker's typical error at that point (large on the jaw line, small at the eye\n\
         /// corners), for weighting the points by how far they can be trusted.\n\
         pub const MESH_POINT_ERROR: [f32; {MESH_POINTS}] = [\n"
    ));
    push_rows(
        &mut source,
        best.iter()
            .enumerate()
            .map(|(point, &c)| format!("{:.4}", cost[point][c] / f64::from(measured))),
    );
    source.push_str("];\n");
    std::fs::write(&args.out, source)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Appends `values` to a Rust array literal, twelve to a line.
fn push_rows(source: &mut String, values: impl Iterator<Item = String>) {
    let values: Vec<String> = values.collect();
    for row in values.chunks(12) {
        source.push_str(&format!("    {},\n", row.join(", ")));
    }
}
