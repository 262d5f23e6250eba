//! `ganfit bench accuracy`: how good the reconstructions are, in numbers.
//!
//! Synthetic faces with known geometry ([`ganfit::synthetic`]) are fitted by our landmark stage
//! alone, by the full fit, by the full fit without its identity terms (ablation) and by eos
//! (landmark-based Surrey-model fitting, through `tools/bench/eos_peer.py` in a virtual
//! environment the bench creates), all from the same detected landmarks, and every result is
//! scored with the NoW-style metric of [`ganfit::evaluate`]. Real photos from the shared set
//! give the landmark error, the dlib identity distance, the time per fit and the peak memory.
//! Results go to `accuracy.md` (tables ready for BENCHMARKS.md) and `accuracy.json` (every
//! per-image number).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use ganfit::evaluate::{MetricConfig, Reconstruction, SurfaceMesh, reconstruction_error};
use ganfit::losses::face::{FaceChoice, FaceDetector, FaceLandmarker, load_rgb};
use ganfit::losses::identity::FaceRecognitionNet;
use ganfit::morphable::MorphableModel;
use ganfit::optim::LossWeights;
use ganfit::synthetic::{
    SyntheticAssets, SyntheticConfig, SyntheticFace, SyntheticGenerator, shared_dir, shared_photos,
};
use ganfit::{FitResult, Fitter, FitterBuilder, descriptor_distance, face_descriptor};
use image::RgbImage;
use serde_json::{Value, json};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Reconstruction accuracy on synthetic faces with ground truth (ours vs eos, NoW-style
    /// metric) and landmark error, identity distance, time and memory on real photos.
    Accuracy(AccuracyArgs),
    /// Measures where MediaPipe's Face Mesh points lie on ICT faces, per head yaw, and writes
    /// the correspondence tables the fit uses (`ganfit_losses::face`'s `ict.rs`).
    LandmarkMap(crate::landmark_map::LandmarkMapArgs),
}

/// Options of `ganfit bench accuracy`.
#[derive(Debug, Args)]
pub struct AccuracyArgs {
    /// Synthetic faces to generate and fit. Each takes about 14 s on a 2-core machine (three
    /// fits and the mean faces): the default set runs in about 25 minutes there.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Real photos from the shared set to fit (0 for none).
    #[arg(long, default_value_t = 10)]
    photos: usize,
    /// Fit these photos instead of `--photos` from the shared set (repeat the option for
    /// several), e.g. the photos a generalisation sweep found hard.
    #[arg(long = "photo", value_name = "PATH")]
    photo_paths: Vec<PathBuf>,
    /// Photos of one person fitted together (`Fitter::fit_many`), comma-separated; repeat the
    /// option for more people. Each photo is scored as `--photo` scores it, beside those.
    #[arg(long = "same-person", value_name = "PATH,PATH...")]
    same_person: Vec<String>,
    /// Folder the tables and the JSON are written to.
    #[arg(long, default_value = "bench-accuracy")]
    out: PathBuf,
    /// Seed of the first synthetic face (face i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Yaw range of the synthetic faces, ± degrees.
    #[arg(long, default_value_t = 45.0)]
    yaw: f64,
    /// Pitch range of the synthetic faces, ± degrees.
    #[arg(long, default_value_t = 20.0)]
    pitch: f64,
    /// UV textures unwrapped from shared studio portraits for the synthetic faces.
    #[arg(long, default_value_t = 8)]
    textures: usize,
    /// Where unwrapped textures and eos's Python environment are kept (default: OUT/cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Iterations of the full objective (default: the fitter's own); fewer run faster.
    #[arg(long)]
    iterations: Option<usize>,
    /// A texture model file (see `ganfit fit --texture-model`) for the full fits.
    #[arg(long)]
    texture_model: Option<PathBuf>,
    /// Also write, per real photo, 224×224 face chips aligned to ArcFace's five-point
    /// template (the photo, the render composited on it, the frontal render on grey) and
    /// `chips.json` into this folder, for a second face recogniser
    /// (`tools/bench/second-recogniser`).
    #[arg(long)]
    chips: Option<PathBuf>,
    /// Leave out the eos peer.
    #[arg(long)]
    no_peer: bool,
    /// Leave out the full fit without identity terms.
    #[arg(long)]
    no_ablation: bool,
    /// Also save every synthetic image (PNG) under OUT/synthetic.
    #[arg(long)]
    save_images: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

/// Runs a bench command.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Accuracy(args) => accuracy(&args),
        BenchCommand::LandmarkMap(args) => crate::landmark_map::run(&args),
    }
}

/// One way of reconstructing a face, and its results per synthetic image.
struct Method {
    key: &'static str,
    label: &'static str,
    /// Per image: the score (or why there is none) and the seconds the fit took.
    scores: Vec<Value>,
    /// Every point-to-surface distance over all images, for the pooled statistics.
    distances: Vec<f64>,
    seconds: Vec<f64>,
}

impl Method {
    fn new(key: &'static str, label: &'static str) -> Self {
        Method {
            key,
            label,
            scores: Vec::new(),
            distances: Vec::new(),
            seconds: Vec::new(),
        }
    }

    fn record(
        &mut self,
        outcome: anyhow::Result<(ganfit::evaluate::ReconstructionError, f64)>,
    ) -> Value {
        let value = match outcome {
            Ok((error, seconds)) => {
                self.distances.extend(&error.distances);
                self.seconds.push(seconds);
                json!({
                    "mean_mm": error.mean_mm,
                    "median_mm": error.median_mm,
                    "std_mm": error.std_mm,
                    "landmark_rms_mm": error.landmark_rms_mm,
                    "scale": error.transform.scale,
                    "icp_iterations": error.icp_iterations,
                    "seconds": seconds,
                })
            }
            Err(err) => json!({ "error": format!("{err:#}") }),
        };
        self.scores.push(value.clone());
        value
    }
}

fn accuracy(args: &AccuracyArgs) -> anyhow::Result<()> {
    let say = |line: String| {
        if !args.quiet {
            eprintln!("{line}");
        }
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let cache = args.cache.clone().unwrap_or_else(|| args.out.join("cache"));
    let shared = shared_dir()?;
    say("loading models".to_string());
    let started = Instant::now();
    let texture_model = args
        .texture_model
        .as_ref()
        .map(|path| ganfit::texture::load_texture_model(path, &Device::Cpu))
        .transpose()?;
    let with_iterations = |builder: FitterBuilder| {
        let builder = match &texture_model {
            Some(model) => builder.texture_model(model.clone()),
            None => builder,
        };
        match args.iterations {
            Some(n) => builder.iterations(n),
            None => builder,
        }
    };
    let full = with_iterations(Fitter::builder()).build()?;
    let landmarks_only = Fitter::builder().iterations(0).build()?;
    let ablation = if args.no_ablation {
        None
    } else {
        Some(
            with_iterations(Fitter::builder().loss_weights(LossWeights {
                identity: 0.0,
                frontal_identity: 0.0,
                ..LossWeights::default()
            }))
            .build()?,
        )
    };
    let model = full.model();

    say(format!(
        "textures: unwrapping up to {} portraits (cached in {})",
        args.textures,
        cache.display()
    ));
    let assets = SyntheticAssets::from_shared(
        &shared,
        &landmarks_only,
        &cache.join("textures"),
        args.textures,
    )?;
    let config = SyntheticConfig {
        yaw_deg: args.yaw,
        pitch_deg: args.pitch,
        ..SyntheticConfig::default()
    };
    let texture_count = assets.textures.len();
    let generator = SyntheticGenerator::new(model, config.clone(), assets)?;
    let metric = MetricConfig::default();

    let mut methods = vec![
        Method::new("mean_face", "ICT mean face (no fit, reference)"),
        Method::new("landmarks", "ours: landmark stage only"),
        Method::new("full", "ours: full fit"),
    ];
    if ablation.is_some() {
        methods.push(Method::new(
            "full_no_identity",
            "ours: full fit without identity terms",
        ));
    }
    let mut images = Vec::new();
    let mut peer_requests = Vec::new();
    let mut detector_errors = Vec::new();
    if args.save_images {
        std::fs::create_dir_all(args.out.join("synthetic"))?;
    }
    let mean_vertices = model.mean().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for index in 0..args.count {
        let seed = args.seed + index as u64;
        let face = generator.generate(seed)?;
        if args.save_images {
            face.image
                .save(args.out.join("synthetic").join(format!("{seed:05}.png")))?;
        }
        let truth = face.ground_truth(model)?;
        let mut entry = json!({
            "seed": seed,
            "yaw_pitch_roll_deg": face.yaw_pitch_roll_deg,
            "active_expressions": face.expression.iter().filter(|&&w| w != 0.0).count(),
            "texture": face.texture,
            "background": face.background.file_name().map(|n| n.to_string_lossy().to_string()),
        });
        let score = |vertices: &[Vec<f32>], seconds: f64| {
            let reconstruction = Reconstruction::of_model(model, vertices);
            Ok((
                reconstruction_error(&truth, &reconstruction, &metric)?,
                seconds,
            ))
        };
        entry["mean_face"] = methods[0].record(score(&mean_vertices, 0.0));
        let mut detected = None;
        let fits: Vec<(usize, &Fitter)> = [Some(&landmarks_only), Some(&full), ablation.as_ref()]
            .into_iter()
            .enumerate()
            .filter_map(|(i, f)| f.map(|f| (i + 1, f)))
            .collect();
        for (slot, fitter) in fits {
            let start = Instant::now();
            let outcome = fitter
                .fit(&face.image)
                .map_err(anyhow::Error::from)
                .and_then(|fit| {
                    let seconds = start.elapsed().as_secs_f64();
                    detected.get_or_insert_with(|| fit.detected_landmarks.clone());
                    score(
                        &fit.vertices.to_dtype(DType::F32)?.to_vec2::<f32>()?,
                        seconds,
                    )
                });
            let key = methods[slot].key;
            entry[key] = methods[slot].record(outcome);
        }
        if let Some(points) = &detected {
            let error = detector_error(points, &face);
            entry["detector_error_percent_iod"] = json!(error);
            detector_errors.push(error);
            peer_requests.push(json!({
                "id": seed.to_string(),
                "width": face.image.width(),
                "height": face.image.height(),
                "landmarks": points,
            }));
        }
        say(format!(
            "face {}/{} (seed {seed}, yaw {:.0}°): {}",
            index + 1,
            args.count,
            face.yaw_pitch_roll_deg[0],
            methods
                .iter()
                .map(|m| match entry[m.key]["mean_mm"].as_f64() {
                    Some(mm) => format!("{} {mm:.2} mm", m.key),
                    None => format!("{} failed", m.key),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
        images.push((face, entry));
    }

    let peer_note = if args.no_peer {
        "eos left out (--no-peer)".to_string()
    } else {
        say("eos: fitting the same landmarks".to_string());
        match run_eos(&cache, &shared, &peer_requests) {
            Ok(response) => {
                let mut mean = Method::new("sfm_mean_face", "Surrey mean face (no fit, reference)");
                let mut method = Method::new("eos", "eos 1.5.0 (Surrey Face Model, landmarks)");
                score_eos(&response, &mut images, model, &mut mean, &mut method)?;
                methods.push(mean);
                methods.push(method);
                "eos-py 1.5.0, `fit_shape_and_pose` with its defaults".to_string()
            }
            Err(err) => {
                say(format!("eos skipped: {err:#}"));
                format!("eos skipped: {err:#}")
            }
        }
    };

    let singles = if args.photo_paths.is_empty() && args.same_person.is_empty() {
        pick_photos(&shared, args.photos)?
    } else {
        args.photo_paths.clone()
    };
    let groups: Vec<Vec<PathBuf>> = singles
        .into_iter()
        .map(|photo| vec![photo])
        .chain(
            args.same_person
                .iter()
                .map(|list| list.split(',').map(PathBuf::from).collect()),
        )
        .collect();
    let real = if groups.is_empty() {
        Vec::new()
    } else {
        say(format!(
            "real photos: fitting {}",
            groups.iter().map(Vec::len).sum::<usize>()
        ));
        real_photos(
            &shared,
            &groups,
            &full,
            &landmarks_only,
            args.chips.as_deref(),
            &say,
        )?
    };

    let notes = RunNotes {
        textures: texture_count,
        peer: peer_note.clone(),
        detector_error_percent_iod: median_of(&detector_errors),
        wall_minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    let markdown = report_markdown(args, &config, &notes, &methods, &real);
    std::fs::write(args.out.join("accuracy.md"), &markdown)?;
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "metric": {
            "protocol": "NoW-style: similarity alignment on the 51 inner iBUG landmarks, ICP \
                         (similarity), then distances from every ground-truth narrow-face vertex \
                         to the reconstruction's surface",
            "units": "millimetres",
            "icp_iterations": metric.icp_iterations,
        },
        "synthetic": {
            "count": args.count,
            "first_seed": args.seed,
            "yaw_deg": config.yaw_deg,
            "pitch_deg": config.pitch_deg,
            "roll_deg": config.roll_deg,
            "noise_std": config.noise_std,
            "jpeg_quality": config.jpeg_quality,
            "image_size": config.image_size,
            "textures": texture_count,
            "summary": methods.iter().map(|m| (m.key.to_string(), summary(m))).collect::<serde_json::Map<_, _>>(),
            "images": images.iter().map(|(_, entry)| entry.clone()).collect::<Vec<_>>(),
        },
        "peer": peer_note,
        "real_photos": real,
        "wall_minutes": notes.wall_minutes,
    });
    std::fs::write(
        args.out.join("accuracy.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if !args.quiet {
        println!("{markdown}");
        println!(
            "wrote {} and {}",
            args.out.join("accuracy.md").display(),
            args.out.join("accuracy.json").display()
        );
    }
    Ok(())
}

/// Runs tools/bench/eos_peer.py on `requests` in a virtual environment under `cache` (created
/// and filled from the pinned requirements on first use).
fn run_eos(cache: &Path, shared: &Path, requests: &[Value]) -> anyhow::Result<Value> {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench");
    let script = tools.join("eos_peer.py");
    let requirements = tools.join("eos_requirements.txt");
    if !script.is_file() || !requirements.is_file() {
        bail!(
            "{} is missing (the peer runs from a source checkout)",
            script.display()
        );
    }
    let sfm = shared.join("assets").join("eos-sfm");
    if !sfm.join("sfm_shape_3448.bin").is_file() {
        bail!("the Surrey Face Model is missing from {}", sfm.display());
    }
    let venv = cache.join("eos-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join("requirements.txt");
    let pinned = std::fs::read_to_string(&requirements)?;
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(pinned.as_str()) {
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .context("python3 is not available")?;
        if !created.status.success() {
            bail!(
                "python3 -m venv failed: {}",
                String::from_utf8_lossy(&created.stderr).trim()
            );
        }
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&requirements)
            .output()
            .context("pip is not available in the virtual environment")?;
        if !installed.status.success() {
            bail!(
                "pip install -r {} failed: {}",
                requirements.display(),
                String::from_utf8_lossy(&installed.stderr).trim()
            );
        }
        std::fs::write(&stamp, &pinned)?;
    }
    let input = cache.join("eos-input.json");
    let output = cache.join("eos-output.json");
    std::fs::write(
        &input,
        serde_json::to_string(&json!({ "images": requests }))?,
    )?;
    let ran = Command::new(&python)
        .arg(&script)
        .arg(&input)
        .arg(&output)
        .arg(&sfm)
        .output()
        .context("cannot run the eos peer")?;
    if !ran.status.success() {
        bail!(
            "the eos peer failed: {}",
            String::from_utf8_lossy(&ran.stderr).trim()
        );
    }
    Ok(serde_json::from_str(&std::fs::read_to_string(&output)?)?)
}

/// Scores eos's fits (`method`) and the Surrey model's mean face (`mean`) on every image.
fn score_eos(
    response: &Value,
    images: &mut [(SyntheticFace, Value)],
    model: &MorphableModel,
    mean: &mut Method,
    method: &mut Method,
) -> anyhow::Result<()> {
    let triangles: Vec<[u32; 3]> = serde_json::from_value(response["triangles"].clone())?;
    let surrey = |result: &Value| -> anyhow::Result<Reconstruction> {
        Ok(Reconstruction {
            mesh: SurfaceMesh {
                vertices: serde_json::from_value(result["vertices"].clone())?,
                triangles: triangles.clone(),
            },
            landmarks: serde_json::from_value(result["landmarks"].clone())?,
        })
    };
    let mean_face = surrey(&response["mean"])?;
    let results = response["results"].as_array().cloned().unwrap_or_default();
    let metric = MetricConfig::default();
    for (face, entry) in images.iter_mut() {
        let truth = face.ground_truth(model)?;
        entry[mean.key] = mean.record(
            reconstruction_error(&truth, &mean_face, &metric)
                .map(|error| (error, 0.0))
                .map_err(anyhow::Error::from),
        );
        let id = face.seed.to_string();
        let outcome = match results.iter().find(|r| r["id"] == id.as_str()) {
            None => Err(anyhow::anyhow!(
                "no landmarks were detected, so eos did not run"
            )),
            Some(result) if !result["error"].is_null() => {
                Err(anyhow::anyhow!("eos failed: {}", result["error"]))
            }
            Some(result) => surrey(result).and_then(|reconstruction| {
                let seconds = result["seconds"].as_f64().unwrap_or(f64::NAN);
                Ok((
                    reconstruction_error(&truth, &reconstruction, &metric)?,
                    seconds,
                ))
            }),
        };
        entry[method.key] = method.record(outcome);
    }
    Ok(())
}

/// Pooled statistics of a method over all images.
fn summary(method: &Method) -> Value {
    let fitted = method.seconds.len();
    if method.distances.is_empty() {
        return json!({ "fitted": fitted, "attempted": method.scores.len() });
    }
    let (mean, median, std) = statistics(&method.distances);
    json!({
        "fitted": fitted,
        "attempted": method.scores.len(),
        "mean_mm": mean,
        "median_mm": median,
        "std_mm": std,
        "median_seconds": median_of(&method.seconds),
    })
}

fn statistics(values: &[f64]) -> (f64, f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    (mean, median_of(values), std)
}

fn median_of(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let m = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[m]
    } else {
        (sorted[m - 1] + sorted[m]) / 2.0
    }
}

/// The shared photos to fit: taken in turn from each folder (so every kind of photo is
/// represented), `count` in all.
fn pick_photos(shared: &Path, count: usize) -> anyhow::Result<Vec<PathBuf>> {
    let all = shared_photos(shared)?;
    let mut folders: Vec<Vec<PathBuf>> = Vec::new();
    for photo in all {
        match folders.last_mut() {
            Some(folder) if folder[0].parent() == photo.parent() => folder.push(photo),
            _ => folders.push(vec![photo]),
        }
    }
    let mut chosen = Vec::new();
    for round in 0.. {
        let before = chosen.len();
        for folder in &folders {
            if chosen.len() < count
                && let Some(photo) = folder.get(round)
            {
                chosen.push(photo.clone());
            }
        }
        if chosen.len() == count || chosen.len() == before {
            break;
        }
    }
    Ok(chosen)
}

/// Landmark error, identity distance, time and peak memory of fits of real photos; the photos
/// of each group are fitted together (each is then given the group's time divided among them,
/// and the group's peak memory).
fn real_photos(
    shared: &Path,
    groups: &[Vec<PathBuf>],
    full: &Fitter,
    landmarks_only: &Fitter,
    chips: Option<&Path>,
    say: &dyn Fn(String),
) -> anyhow::Result<Vec<Value>> {
    if let Some(dir) = chips {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut chip_index = Vec::new();
    let device = Device::Cpu;
    let resolver = ganfit::assets::Resolver::new();
    let net = FaceRecognitionNet::from_resolver(&resolver, &device)?;
    let detector = FaceDetector::from_resolver(&resolver, &device)?;
    let landmarker = FaceLandmarker::from_resolver(&resolver, &device)?;
    let mut rows = Vec::new();
    for group in groups {
        let images = group.iter().map(load_rgb).collect::<Result<Vec<_>, _>>()?;
        let resettable = reset_peak_rss();
        let start = Instant::now();
        let fits: Vec<Result<FitResult, String>> = match full.fit_many(&images) {
            Ok(fits) => fits.into_iter().map(Ok).collect(),
            Err(err) => images.iter().map(|_| Err(err.to_string())).collect(),
        };
        let seconds = start.elapsed().as_secs_f64() / images.len() as f64;
        let peak = peak_rss_mib();
        for ((photo, image), fit) in group.iter().zip(&images).zip(fits) {
            let name = photo
                .strip_prefix(shared.join("data").join("faces"))
                .unwrap_or(photo)
                .display()
                .to_string();
            let landmark_fit = landmarks_only.fit(image).map_err(|err| err.to_string());
            let row = match (fit, landmark_fit) {
                (Ok(fit), Ok(landmark_fit)) => {
                    let identity = identity_distances(&net, &detector, &landmarker, image, &fit);
                    if let (Some(dir), Ok((_, _, views))) = (chips, &identity) {
                        chip_index.push(write_chips(dir, chip_index.len(), &name, views)?);
                    }
                    json!({
                        "photo": name,
                        "size": [image.width(), image.height()],
                        "landmark_error_percent_iod": 100.0 * fit.landmark_error(),
                        "landmark_stage_error_percent_iod": 100.0 * landmark_fit.landmark_error(),
                        "identity_distance_render": identity.as_ref().ok().map(|d| d.0),
                        "identity_distance_frontal": identity.as_ref().ok().and_then(|d| d.1),
                        "identity_error": identity.err().map(|e| format!("{e:#}")),
                        "seconds": seconds,
                        "peak_rss_mib": peak,
                        "peak_rss_scope": if resettable { "this fit" } else { "process so far" },
                    })
                }
                (Err(err), _) | (_, Err(err)) => json!({ "photo": name, "error": err }),
            };
            say(format!("photo {name}: {}", compact(&row)));
            rows.push(row);
        }
    }
    if let Some(dir) = chips {
        let index = dir.join("chips.json");
        std::fs::write(&index, serde_json::to_string_pretty(&chip_index)?)
            .with_context(|| format!("cannot write {}", index.display()))?;
    }
    Ok(rows)
}

/// ArcFace's five reference points in its 112×112 chip: the eyes' centres, the nose tip and
/// the mouth corners, left to right as the image shows them (insightface's `arcface_dst`).
/// [`arcface_chip`] scales them to its own size.
const ARCFACE_TEMPLATE: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// Side of the chips `--chips` writes: [`ARCFACE_TEMPLATE`]'s framing at the second
/// recogniser's input size.
const CHIP_SIZE: usize = 224;

/// A [`CHIP_SIZE`]² chip of `image` aligned to [`ARCFACE_TEMPLATE`] through iBUG-68
/// `landmarks`.
fn arcface_chip(image: &RgbImage, landmarks: &[[f32; 2]]) -> anyhow::Result<RgbImage> {
    let mean = |range: std::ops::Range<usize>| {
        let n = range.len() as f64;
        range.fold([0.0, 0.0], |acc, i| {
            [
                acc[0] + f64::from(landmarks[i][0]) / n,
                acc[1] + f64::from(landmarks[i][1]) / n,
            ]
        })
    };
    anyhow::ensure!(landmarks.len() == 68, "expected 68 landmarks");
    let point = |i: usize| [f64::from(landmarks[i][0]), f64::from(landmarks[i][1])];
    let five = [mean(36..42), mean(42..48), point(30), point(48), point(54)];
    let scale = CHIP_SIZE as f64 / 112.0;
    let template = ARCFACE_TEMPLATE.map(|[x, y]| [x * scale, y * scale]);
    let transform = ganfit::losses::align::SimilarityTransform::fit(&template, &five)?;
    let (w, h) = (image.width() as usize, image.height() as usize);
    let warp = ganfit::losses::align::ChipWarp::new(
        &transform,
        h,
        w,
        CHIP_SIZE,
        DType::F32,
        &Device::Cpu,
    )?;
    let chip = warp.apply_channels_last(&image_tensor(image)?)?;
    let values: Vec<u8> = chip
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(CHIP_SIZE as u32, CHIP_SIZE as u32, values).context("chip size")
}

/// Writes the chips of one photo's views as `NNN_<view>.png`; returns its `chips.json` entry.
fn write_chips(
    dir: &Path,
    index: usize,
    photo: &str,
    views: &[IdentityView<'_>],
) -> anyhow::Result<Value> {
    let mut chips = serde_json::Map::new();
    for (view, image, landmarks) in views {
        let file = format!("{index:03}_{view}.png");
        let path = dir.join(&file);
        arcface_chip(image, landmarks)?
            .save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        chips.insert(view.to_string(), json!(file));
    }
    Ok(json!({ "photo": photo, "chips": chips }))
}

fn compact(row: &Value) -> String {
    match row["error"].as_str() {
        Some(err) => format!("failed: {err}"),
        None => format!(
            "landmarks {:.2} % IOD, {:.1} s",
            row["landmark_error_percent_iod"]
                .as_f64()
                .unwrap_or(f64::NAN),
            row["seconds"].as_f64().unwrap_or(f64::NAN)
        ),
    }
}

/// An image a recogniser compares, named, with the landmarks that align it; the photo itself
/// borrowed, the renders composited for it owned.
type IdentityView<'a> = (&'static str, Cow<'a, RgbImage>, Vec<[f32; 2]>);

/// dlib descriptor distance between the photo and (a) the render composited on the photo,
/// (b) the frontal render on grey (when a face is found in it); and those images, named
/// `photo`, `render` and `frontal`, with their landmarks.
fn identity_distances<'a>(
    net: &FaceRecognitionNet,
    detector: &FaceDetector,
    landmarker: &FaceLandmarker,
    photo: &'a RgbImage,
    fit: &FitResult,
) -> anyhow::Result<(f64, Option<f64>, Vec<IdentityView<'a>>)> {
    let photo_landmarks = &fit.detected_landmarks;
    let reference = face_descriptor(net, photo, photo_landmarks, &Device::Cpu)?;
    let composite = composite(&fit.render, |x, y| photo.get_pixel(x, y).0);
    let render = face_descriptor(net, &composite, photo_landmarks, &Device::Cpu)?;
    let frontal = composite_on_grey(&fit.frontal_render);
    let frontal_landmarks = detector
        .detect_face(&frontal, FaceChoice::Largest)
        .and_then(|face| landmarker.landmarks(&frontal, &face))
        .ok()
        .map(|points| points.to_ibug68().to_vec());
    let frontal_distance = frontal_landmarks
        .as_ref()
        .map(|points| {
            face_descriptor(net, &frontal, points, &Device::Cpu).map_err(anyhow::Error::from)
        })
        .transpose()?
        .map(|d| descriptor_distance(&reference, &d));
    let mut views = vec![
        ("photo", Cow::Borrowed(photo), photo_landmarks.clone()),
        ("render", Cow::Owned(composite), photo_landmarks.clone()),
    ];
    views.extend(frontal_landmarks.map(|points| ("frontal", Cow::Owned(frontal), points)));
    Ok((
        descriptor_distance(&reference, &render),
        frontal_distance,
        views,
    ))
}

fn composite_on_grey(render: &image::RgbaImage) -> RgbImage {
    composite(render, |_, _| [128, 128, 128])
}

fn composite(render: &image::RgbaImage, behind: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    RgbImage::from_fn(render.width(), render.height(), |x, y| {
        let front = render.get_pixel(x, y).0;
        let back = behind(x, y);
        let a = f32::from(front[3]) / 255.0;
        image::Rgb(std::array::from_fn(|c| {
            (f32::from(front[c]) * a + f32::from(back[c]) * (1.0 - a)).round() as u8
        }))
    })
}

/// `image` as an f32 `[1, H, W, 3]` tensor of its 0–255 values.
fn image_tensor(image: &RgbImage) -> candle_core::Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let pixels: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v)).collect();
    Tensor::from_vec(pixels, (1, h, w, 3), &Device::Cpu)
}

/// Resets the kernel's peak-RSS counter of this process (Linux: `5` to `/proc/self/clear_refs`);
/// false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory (`VmHWM`), MiB, where the platform reports it.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Mean distance between the detected and the true inner landmarks (iBUG 17..68) of a synthetic
/// face, percent of the true outer-eye-corner distance: how noisy the fits' input is.
fn detector_error(detected: &[[f32; 2]], face: &SyntheticFace) -> f64 {
    let truth = |i: usize| face.landmarks.get(i).copied().flatten();
    let (Some(left), Some(right)) = (truth(36), truth(45)) else {
        return f64::NAN;
    };
    let inter_ocular = (left[0] - right[0]).hypot(left[1] - right[1]);
    let errors: Vec<f64> = (17..68)
        .filter_map(|i| {
            let (t, d) = (truth(i)?, detected.get(i)?);
            Some((f64::from(d[0]) - t[0]).hypot(f64::from(d[1]) - t[1]))
        })
        .collect();
    100.0 * errors.iter().sum::<f64>() / errors.len().max(1) as f64 / inter_ocular
}

/// Facts about a run that the report states.
struct RunNotes {
    textures: usize,
    peer: String,
    detector_error_percent_iod: f64,
    wall_minutes: f64,
}

fn report_markdown(
    args: &AccuracyArgs,
    config: &SyntheticConfig,
    notes: &RunNotes,
    methods: &[Method],
    real: &[Value],
) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "### Reconstruction error on synthetic faces\n\n\
         {} ICT faces (seeds {}..{}): identity p_s ~ N(0, I) on all modes, up to {} random \
         expressions, yaw ±{}°, pitch ±{}°, roll ±{}°, random SH light, {} UV textures, \
         {}² over real photo backgrounds, {} % Gaussian noise, JPEG quality {}. Metric \
         (NoW protocol): similarity alignment on the 51 inner landmarks, ICP, then the distance \
         from every ground-truth narrow-face vertex to the reconstruction's surface, pooled over \
         all faces. Every method starts from the same detected landmarks (median error of the \
         detected inner landmarks on these images: {:.2} % of the inter-ocular distance). \
         {}.\n\n\
         | method | fitted | mean (mm) | median (mm) | std (mm) | median time per fit (s) |\n\
         |---|---|---|---|---|---|\n",
        args.count,
        args.seed,
        args.seed + args.count as u64,
        config.max_expressions,
        config.yaw_deg,
        config.pitch_deg,
        config.roll_deg,
        notes.textures,
        config.image_size,
        100.0 * config.noise_std,
        config
            .jpeg_quality
            .map_or("none".to_string(), |q| q.to_string()),
        notes.detector_error_percent_iod,
        notes.peer,
    ));
    for method in methods {
        let s = summary(method);
        let number = |key: &str, digits: usize| {
            s[key]
                .as_f64()
                .map_or("–".to_string(), |v| format!("{v:.digits$}"))
        };
        let time = if method.key.ends_with("mean_face") {
            "–".to_string()
        } else {
            number("median_seconds", 2)
        };
        md.push_str(&format!(
            "| {} | {}/{} | {} | {} | {} | {} |\n",
            method.label,
            method.seconds.len(),
            method.scores.len(),
            number("mean_mm", 2),
            number("median_mm", 2),
            number("std_mm", 2),
            time,
        ));
    }
    if !real.is_empty() {
        md.push_str(
            "\n### Real photos\n\n\
             Landmark error: mean distance between the fitted model's 68 landmarks and the \
             detected ones, % of the detected outer-eye-corner distance. Identity distance: dlib \
             descriptor distance between the photo and the render composited on it, and \
             between the photo and the frontal render R̂ (dlib's same-person threshold is 0.6). \
             Time and peak RSS of the full fit.\n\n\
             | photo | landmark error, landmark stage (% IOD) | landmark error, full fit (% IOD) | \
             identity distance, render | identity distance, frontal | time (s) | peak RSS (MiB) |\n\
             |---|---|---|---|---|---|---|\n",
        );
        let cell = |row: &Value, key: &str, digits: usize| {
            row[key]
                .as_f64()
                .map_or("–".to_string(), |v| format!("{v:.digits$}"))
        };
        for row in real {
            if let Some(err) = row["error"].as_str() {
                md.push_str(&format!(
                    "| {} | failed: {err} | | | | | |\n",
                    row["photo"].as_str().unwrap_or("?")
                ));
                continue;
            }
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row["photo"].as_str().unwrap_or("?"),
                cell(row, "landmark_stage_error_percent_iod", 2),
                cell(row, "landmark_error_percent_iod", 2),
                cell(row, "identity_distance_render", 3),
                cell(row, "identity_distance_frontal", 3),
                cell(row, "seconds", 1),
                cell(row, "peak_rss_mib", 0),
            ));
        }
        let column =
            |key: &str| -> Vec<f64> { real.iter().filter_map(|r| r[key].as_f64()).collect() };
        let med = |key: &str, digits: usize| {
            let v = median_of(&column(key));
            if v.is_finite() {
                format!("{v:.digits$}")
            } else {
                "–".to_string()
            }
        };
        md.push_str(&format!(
            "| **median** | {} | {} | {} | {} | {} | {} |\n",
            med("landmark_stage_error_percent_iod", 2),
            med("landmark_error_percent_iod", 2),
            med("identity_distance_render", 3),
            med("identity_distance_frontal", 3),
            med("seconds", 1),
            med("peak_rss_mib", 0),
        ));
    }
    md.push_str(&format!(
        "\nThe whole run took {:.1} min.\n",
        notes.wall_minutes
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chip_puts_the_five_points_where_arcface_expects_them() {
        // Landmarks that are the template scaled by 2.5 and shifted: the fit is exact.
        let to_photo = |[x, y]: [f64; 2]| [(2.5 * x + 20.0) as f32, (2.5 * y + 10.0) as f32];
        let mut landmarks = vec![[200.0f32, 200.0]; 68];
        let [left_eye, right_eye, nose, mouth_left, mouth_right] = ARCFACE_TEMPLATE.map(to_photo);
        landmarks[36..42].fill(left_eye);
        landmarks[42..48].fill(right_eye);
        landmarks[30] = nose;
        landmarks[48] = mouth_left;
        landmarks[54] = mouth_right;
        // Grey, with a white square on the left eye and a black one on the right mouth corner.
        let photo = RgbImage::from_fn(400, 350, |x, y| {
            let near =
                |p: [f32; 2]| (x as f32 - p[0]).abs() <= 3.0 && (y as f32 - p[1]).abs() <= 3.0;
            image::Rgb(if near(left_eye) {
                [255; 3]
            } else if near(mouth_right) {
                [0; 3]
            } else {
                [128; 3]
            })
        });
        let chip = arcface_chip(&photo, &landmarks).unwrap();
        assert_eq!(chip.dimensions(), (CHIP_SIZE as u32, CHIP_SIZE as u32));
        let scale = CHIP_SIZE as f64 / 112.0;
        let at = |[x, y]: [f64; 2]| {
            chip.get_pixel((x * scale).round() as u32, (y * scale).round() as u32)
                .0[0]
        };
        assert!(
            at(ARCFACE_TEMPLATE[0]) > 240,
            "left eye {}",
            at(ARCFACE_TEMPLATE[0])
        );
        assert!(
            at(ARCFACE_TEMPLATE[4]) < 15,
            "mouth corner {}",
            at(ARCFACE_TEMPLATE[4])
        );
        assert_eq!(at(ARCFACE_TEMPLATE[2]), 128, "nose");
    }
}
