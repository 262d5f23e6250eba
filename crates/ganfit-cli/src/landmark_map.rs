//! `ganfit bench landmark-map`: where on ICT's face MediaPipe's Face Mesh points really lie.
//!
//! A fit pulls model vertices onto detected points, so each detected point must name the vertex
//! it shows. A purely geometric correspondence (aligning MediaPipe's canonical mesh to ICT's)
//! misses how the landmarker actually places its points, e.g. its nose tip or jaw line. This
//! command measures that instead: it draws synthetic ICT faces with known geometry and camera
//! ([`ganfit::synthetic`]), runs the detector and the landmarker on them, and gives every
//! Face Mesh point the ICT face vertex whose true projection lies nearest the detected point on
//! average over the faces (distances relative to the inter-ocular distance). The points follow
//! the head's outline as it turns, so besides one table pooled over all faces it measures one
//! per head yaw in [`TABLE_YAWS_DEG`], each weighting the faces by how near their yaw (as the
//! fitter estimates it, [`estimate_head_yaw_deg`]) lies. Held-out faces (other seeds) report
//! the error of the new tables and of the current ones. The tables are written as the Rust
//! source of `ganfit_losses::face`'s `ict.rs`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use ganfit::losses::face::{
    FaceChoice, FaceDetector, FaceLandmarker, IBUG68_FROM_MESH, ICT_VERTEX_FROM_MESH, MESH_POINTS,
};
use ganfit::synthetic::{SyntheticAssets, SyntheticConfig, SyntheticGenerator, shared_dir};
use ganfit::{Fitter, MeshCorrespondence, estimate_head_yaw_deg, nearest_yaw_table};
use nalgebra::{Rotation3, Vector3};

/// The head yaws (degrees) a table is measured for: the synthetic faces' range, ±45°, in steps
/// that leave a photo at most 5° from its table.
const TABLE_YAWS_DEG: [f32; 9] = [-40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0];

/// Standard deviation (degrees) of the Gaussian weight a face gets in a yaw's table: wide
/// enough that each table averages about 150 of 1000 faces, narrow enough that the jaw line
/// does not move far over the cheek within it.
const YAW_BANDWIDTH_DEG: f64 = 7.0;

/// Options of `ganfit bench landmark-map`.
#[derive(Debug, Args)]
pub struct LandmarkMapArgs {
    /// Synthetic faces the correspondence is measured on.
    #[arg(long, default_value_t = 1000)]
    faces: u64,
    /// Further faces (other seeds) it is checked on.
    #[arg(long, default_value_t = 150)]
    held_out: u64,
    /// Seed of the first measuring face; the held-out faces follow the measuring ones. The
    /// default keeps clear of `ganfit bench accuracy`'s seeds.
    #[arg(long, default_value_t = 1_000_000)]
    seed: u64,
    /// Where the tables' Rust source is written.
    #[arg(long, default_value = "ict.rs")]
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
    /// Head yaw estimated from the detected points, degrees.
    yaw_deg: f64,
}

impl Sighting {
    /// Distance between detected `point` and the true pixel of `candidate`, relative to the
    /// inter-ocular distance.
    fn error(&self, point: usize, candidate: usize) -> f64 {
        let (d, p) = (self.detected[point], self.candidates[candidate]);
        (f64::from(d[0]) - p[0]).hypot(f64::from(d[1]) - p[1]) / self.inter_ocular
    }
}

/// Summed weighted errors of every (point, candidate vertex) pair over the measuring faces.
struct CostTable {
    cost: Vec<Vec<f64>>,
    weight: f64,
}

impl CostTable {
    fn new(candidates: usize) -> Self {
        CostTable {
            cost: vec![vec![0.0; candidates]; MESH_POINTS],
            weight: 0.0,
        }
    }

    /// The candidate of least cost for each point, and that cost as a mean error.
    fn best(&self) -> Vec<(usize, f64)> {
        self.cost
            .iter()
            .map(|row| {
                let best = (0..row.len())
                    .min_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .expect("the face area has vertices");
                (best, row[best] / self.weight)
            })
            .collect()
    }
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
        let (width, height) = face.image.dimensions();
        Ok(Some(Sighting {
            candidates: candidates.iter().map(|&v| project(v)).collect(),
            detected,
            inter_ocular: (a[0] - b[0]).hypot(a[1] - b[1]),
            yaw_deg: estimate_head_yaw_deg(model, &landmarks, width, height),
        }))
    };

    let mut pooled = CostTable::new(candidates.len());
    let mut by_yaw: Vec<CostTable> = TABLE_YAWS_DEG
        .iter()
        .map(|_| CostTable::new(candidates.len()))
        .collect();
    let mut errors = vec![0.0; candidates.len()];
    let mut measured = 0u32;
    for seed in args.seed..args.seed + args.faces {
        let Some(sighting) = sight(seed)? else {
            continue;
        };
        anyhow::ensure!(
            sighting.yaw_deg.is_finite(),
            "no head pose fits the points of synthetic face {seed}"
        );
        let weights: Vec<f64> = TABLE_YAWS_DEG
            .iter()
            .map(|&yaw| {
                let z = (sighting.yaw_deg - f64::from(yaw)) / YAW_BANDWIDTH_DEG;
                (-0.5 * z * z).exp()
            })
            .collect();
        for point in 0..MESH_POINTS {
            for (candidate, error) in errors.iter_mut().enumerate() {
                *error = sighting.error(point, candidate);
            }
            let tables = std::iter::once((&mut pooled, 1.0))
                .chain(by_yaw.iter_mut().zip(weights.iter().copied()));
            for (table, weight) in tables {
                // Beyond three bandwidths a face adds nothing a table would notice.
                if weight < 0.01 {
                    continue;
                }
                for (total, error) in table.cost[point].iter_mut().zip(&errors) {
                    *total += weight * error;
                }
            }
        }
        pooled.weight += 1.0;
        for (table, weight) in by_yaw.iter_mut().zip(&weights) {
            if *weight >= 0.01 {
                table.weight += weight;
            }
        }
        measured += 1;
        eprintln!(
            "measured face {measured}/{} (estimated yaw {:+.0}°)",
            args.faces, sighting.yaw_deg
        );
    }
    anyhow::ensure!(measured > 0, "no synthetic face was detected");
    let pooled_best = pooled.best();
    let yaw_best: Vec<Vec<(usize, f64)>> = by_yaw.iter().map(CostTable::best).collect();
    let yaw_tables: Vec<Vec<usize>> = yaw_best
        .iter()
        .map(|table| table.iter().map(|&(c, _)| c).collect())
        .collect();

    // Held-out faces: mean error per point and |yaw| group of the tables in use now, the new
    // pooled table and the new per-yaw tables.
    let slot = |vertex: u32| candidates.iter().position(|&c| c == vertex);
    let in_use = |table: &[u32]| -> Vec<Option<usize>> { table.iter().map(|&v| slot(v)).collect() };
    let current_pooled = in_use(&ICT_VERTEX_FROM_MESH);
    let new_pooled: Vec<Option<usize>> = pooled_best.iter().map(|&(c, _)| Some(c)).collect();
    const GROUPS: [(&str, f64, f64); 4] = [
        ("all yaws", 0.0, f64::INFINITY),
        ("|yaw| < 15°", 0.0, 15.0),
        ("|yaw| 15-30°", 15.0, 30.0),
        ("|yaw| > 30°", 30.0, f64::INFINITY),
    ];
    // [group][variant][point] summed error, and faces per group.
    let mut sums = vec![vec![vec![0.0; MESH_POINTS]; 4]; GROUPS.len()];
    let mut counts = [0usize; GROUPS.len()];
    let first = args.seed + args.faces;
    for seed in first..first + args.held_out {
        let Some(sighting) = sight(seed)? else {
            continue;
        };
        let current_by_yaw = in_use(MeshCorrespondence::at_yaw(sighting.yaw_deg).vertices);
        let new_by_yaw = &yaw_tables[nearest_yaw_table(&TABLE_YAWS_DEG, sighting.yaw_deg)];
        for (group, &(_, lo, hi)) in GROUPS.iter().enumerate() {
            if !(lo..hi).contains(&sighting.yaw_deg.abs()) {
                continue;
            }
            counts[group] += 1;
            for point in 0..MESH_POINTS {
                let error = |c: Option<usize>| c.map_or(f64::NAN, |c| sighting.error(point, c));
                let variants = [
                    error(current_pooled[point]),
                    error(current_by_yaw[point]),
                    error(new_pooled[point]),
                    error(Some(new_by_yaw[point])),
                ];
                for (sum, e) in sums[group].iter_mut().zip(variants) {
                    sum[point] += e;
                }
            }
        }
    }
    let mut summary = String::new();
    for (group, &(group_name, _, _)) in GROUPS.iter().enumerate() {
        writeln!(summary, "//! - {group_name} ({} faces):", counts[group])?;
        for (name, points) in [
            ("iBUG 68", IBUG68_FROM_MESH.to_vec()),
            ("jaw 0-16", IBUG68_FROM_MESH[..17].to_vec()),
            ("inner 17-67", IBUG68_FROM_MESH[17..].to_vec()),
            ("all 468", (0..MESH_POINTS).collect::<Vec<_>>()),
        ] {
            let mean = |variant: usize| {
                100.0 * points.iter().map(|&p| sums[group][variant][p]).sum::<f64>()
                    / (points.len() * counts[group].max(1)) as f64
            };
            writeln!(
                summary,
                "//!   {name}: by yaw {:.2} %, pooled {:.2} % (in use: by yaw {:.2} %, pooled {:.2} %)",
                mean(3),
                mean(2),
                mean(1),
                mean(0)
            )?;
        }
    }
    eprint!("{summary}");

    let mut source = format!(
        "//! Correspondence from MediaPipe's 468 Face Mesh points to ICT-FaceKit vertices.\n\
         //!\n\
         //! Generated by `ganfit bench landmark-map --faces {} --held-out {} --seed {}`; do not\n\
         //! edit by hand. Each Face Mesh point takes the ICT face vertex whose true projection\n\
         //! lies nearest, on average over {measured} synthetic ICT faces (`ganfit::synthetic`:\n\
         //! random identity and expression, yaw ±45°, pitch ±20°), to where the fit finds the\n\
         //! point (`FaceLandmarker::locate`): pooled over all faces, and per head yaw with the\n\
         //! faces weighted by a Gaussian of {YAW_BANDWIDTH_DEG}° in their yaw as estimated from\n\
         //! the points. Mean distance between a detected point and its vertex's true projection\n\
         //! on {} held-out faces, in % of the inter-ocular distance, with each face's nearest\n\
         //! yaw table or the pooled one (in brackets: the tables in use when these were made):\n\
         {summary}\n\
         /// ICT-FaceKit vertex index (0-based, into the full 26,719-vertex model) of each Face\n\
         /// Mesh point, pooled over all head poses.\n\
         pub const ICT_VERTEX_FROM_MESH: [u32; {MESH_POINTS}] = [\n",
        args.faces, args.held_out, args.seed, args.held_out
    );
    push_rows(
        &mut source,
        pooled_best.iter().map(|&(c, _)| candidates[c].to_string()),
    );
    source.push_str(&format!(
        "];\n\n\
         /// The head yaws (degrees, positive when the face turns to its left) of\n\
         /// `ICT_VERTEX_FROM_MESH_AT_YAW` and `MESH_POINT_ERROR_AT_YAW`.\n\
         pub const MESH_TABLE_YAWS_DEG: [f32; {}] = {TABLE_YAWS_DEG:?};\n\n\
         /// `ICT_VERTEX_FROM_MESH` measured for each of `MESH_TABLE_YAWS_DEG`.\n\
         pub static ICT_VERTEX_FROM_MESH_AT_YAW: [[u32; {MESH_POINTS}]; {}] = [\n",
        TABLE_YAWS_DEG.len(),
        TABLE_YAWS_DEG.len()
    ));
    for table in &yaw_tables {
        source.push_str("    [\n");
        push_rows(
            &mut source,
            table.iter().map(|&c| candidates[c].to_string()),
        );
        source.push_str("    ],\n");
    }
    source.push_str(&format!(
        "];\n\n\
         /// Mean distance between each Face Mesh point as detected and its vertex's true\n\
         /// projection over the measuring faces of each of `MESH_TABLE_YAWS_DEG`, fraction of\n\
         /// the inter-ocular distance: the landmarker's typical error at that point (large on\n\
         /// the jaw line, small at the eye corners), for weighting the points by how far they\n\
         /// can be trusted.\n\
         pub static MESH_POINT_ERROR_AT_YAW: [[f32; {MESH_POINTS}]; {}] = [\n",
        TABLE_YAWS_DEG.len()
    ));
    for table in &yaw_best {
        source.push_str("    [\n");
        push_rows(&mut source, table.iter().map(|&(_, e)| format!("{e:.4}")));
        source.push_str("    ],\n");
    }
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
