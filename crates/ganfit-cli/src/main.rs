//! The `ganfit` command line: fits photos and manages the model files the fit needs.

mod bench;
mod landmark_map;
mod report;

// Candle allocates and frees image-sized buffers on every autograd step; glibc's default
// thresholds hand them back to the kernel each time and fault them in again (a third of the
// renderer's backward time), which mimalloc avoids.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, Subcommand};
use ganfit::losses::face::{FaceChoice, OTHER_PHOTO_FORMATS, is_photo_name, load_rgb, probe_image};
use ganfit::losses::identity::FaceRecognitionNet;
use ganfit::morphable::export;
use ganfit::{FitResult, Fitter, Progress, ViewStyle};
use image::RgbImage;
use indicatif::ProgressBar;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "ganfit",
    version,
    about = "Textured 3D faces from photos (GANFIT)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fit a 3D face to one or more photos of one person and write meshes, textures and renders.
    Fit {
        /// Photos (PNG, JPEG, HEIC, TIFF, WebP, BMP, GIF, PNM, TGA, ICO or QOI, at most 150
        /// megapixels), or folders of them (their photos by name).
        #[arg(required = true)]
        photos: Vec<PathBuf>,
        /// Folder the results are written to (one sub-folder per photo when there are several).
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Iterations of the full objective after the landmark alignment (0: landmarks only;
        /// 35 run a quarter faster for nearly the same result, see BENCHMARKS.md).
        #[arg(long, default_value_t = ganfit::optim::RefineConfig::default().iterations)]
        iterations: usize,
        /// Where the models run: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with the `cuda`
        /// feature).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Seed of the fit's random choices; the same seed gives the same result.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The photos show one person: fit them together, sharing identity and texture
        /// (otherwise each photo is fitted on its own).
        #[arg(long)]
        same_person: bool,
        /// A texture model file (a PCA model from `ganfit texture pca`, or a texture GAN) whose
        /// latent the full objective optimises instead of a free UV map.
        #[arg(long)]
        texture_model: Option<PathBuf>,
        /// Which face of a photo that shows several: `largest`, `most-confident`, or a number N
        /// for the N-th from the left (0 the leftmost).
        #[arg(long, default_value = "largest", value_parser = parse_face_choice)]
        face: FaceChoice,
        /// Side of the UV texture in texels (16 to 8192; `mesh_texture.png` is twice as wide):
        /// more keeps more of a large photo's detail, at more time and memory (a fit of a 512²
        /// photo peaks at about 0.5 GB with 1024, 2 GB with 4096 and 8 GB with 8192).
        #[arg(long, default_value_t = 1024)]
        texture_size: usize,
        /// Print nothing but errors.
        #[arg(long)]
        quiet: bool,
    },
    /// Texture-model tools.
    Texture {
        #[command(subcommand)]
        command: TextureCommand,
    },
    /// Measure accuracy: synthetic ground truth, a peer and real photos.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Show where every model file resolves, or fetch and verify the ones named.
    Assets {
        /// Asset ids to resolve (default: list all).
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TextureCommand {
    /// Train the progressive-GAN texture model on a folder of UV maps (PNG/JPEG; an alpha
    /// channel marks valid texels), writing checkpoints, sample grids, a loss log and the
    /// final generator to --out.
    Train(TrainArgs),
    /// Gather the UV textures of fits (`ganfit fit` output folders: `texture.png` and
    /// `texture_observed.png`) into a folder of training maps for `texture pca` and `texture
    /// train`: one RGBA PNG per fit, downsampled, with the seen texels opaque.
    Collect {
        /// Output folders of `ganfit fit`.
        #[arg(required = true)]
        fits: Vec<PathBuf>,
        /// Side of the written maps in texels (a power of two).
        #[arg(long, default_value_t = 128)]
        size: u32,
        /// Folder the maps are written to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fit a weighted-PCA texture model to a folder of UV maps (PNG/JPEG, all one square
    /// size; an alpha channel marks the observed texels, e.g. the `texture.png` of fits with
    /// `texture_observed.png` as alpha).
    Pca {
        /// Folder of UV texture maps.
        data: PathBuf,
        /// Number of principal components (the latent size).
        #[arg(long, default_value_t = 64)]
        components: usize,
        /// Most EM iterations.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Output model file (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert official ProGAN (TensorFlow) generator weights, dumped to .npz by
    /// tools/texture/progan_to_npz.py, into a generator .safetensors file.
    ImportProgan {
        /// The .npz of TensorFlow variable names and arrays.
        npz: PathBuf,
        /// Output weights file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// Folder of UV texture maps, all the same square size.
    data: PathBuf,
    /// Output folder.
    #[arg(long, default_value = "texture-gan")]
    out: PathBuf,
    /// Training configuration as JSON (fields of `TrainConfig`; missing ones take defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from this checkpoint instead of starting afresh.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Total steps (overrides the configuration).
    #[arg(long)]
    steps: Option<usize>,
    /// Random seed (overrides the configuration).
    #[arg(long)]
    seed: Option<u64>,
    /// Where training runs: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with the `cuda`
    /// feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

/// `err` and its causes on one line, leaving out a cause the message already quotes (many of
/// our errors name their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut message = err.to_string();
    for cause in err.chain().skip(1).map(ToString::to_string) {
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}

fn main() -> ExitCode {
    // candle 0.11 runs element-wise ops (autograd's gradient sums among them) on a thread pool
    // of its own, as wide as rayon's, whose idle workers spin beside the rayon workers that
    // every ganfit kernel runs on: twice the busy threads, and on two cores the renderer's
    // batch-8 backward took 1.8x the CPU time. One thread for those ops, unless the user says.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the first statement of main, before any thread is started.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Fit {
            photos,
            out,
            iterations,
            device,
            seed,
            same_person,
            texture_model,
            face,
            texture_size,
            quiet,
        } => {
            let device = parse_device(&device)?;
            let mut builder = Fitter::builder()
                .device(device.clone())
                .seed(seed)
                .face_choice(face)
                .texture_size(texture_size)
                .iterations(iterations);
            if let Some(path) = texture_model {
                builder =
                    builder.texture_model(ganfit::texture::load_texture_model(&path, &device)?);
            }
            if same_person && iterations == 0 {
                // Without the full objective only the check that the photos show one person
                // needs the recognition network, which the fitter then does not load.
                builder = builder.identity_net(FaceRecognitionNet::from_resolver(
                    &ganfit::assets::Resolver::default(),
                    &device,
                )?);
            }
            fit(builder, &photos, &out, same_person, quiet)
        }
        Command::Assets { ids } => assets(&ids),
        Command::Bench { command } => bench::run(command),
        Command::Texture {
            command: TextureCommand::Train(args),
        } => train_texture(&args),
        Command::Texture {
            command: TextureCommand::Collect { fits, size, out },
        } => collect_textures(&fits, size, &out),
        Command::Texture {
            command:
                TextureCommand::Pca {
                    data,
                    components,
                    iterations,
                    out,
                },
        } => pca_texture(&data, components, iterations, &out),
        Command::Texture {
            command: TextureCommand::ImportProgan { npz, out },
        } => {
            let generator = ganfit::texture::import_progan_npz(&npz, &Device::Cpu)?;
            generator.save(&out)?;
            println!("wrote {} ({:?})", out.display(), generator.config());
            Ok(())
        }
    }
}

fn parse_face_choice(name: &str) -> Result<FaceChoice, String> {
    match name {
        "largest" => Ok(FaceChoice::Largest),
        "most-confident" => Ok(FaceChoice::MostConfident),
        place => place.parse().map(FaceChoice::FromLeft).map_err(|_| {
            format!(
                "`{place}` is no face: use largest, most-confident or a number (0 the leftmost)"
            )
        }),
    }
}

fn parse_device(name: &str) -> anyhow::Result<Device> {
    let cuda = |ordinal: usize| {
        ganfit::render::cuda_device(ordinal).with_context(|| {
            format!("cannot use `{name}`: build with `--features cuda` on a machine with a GPU")
        })
    };
    match name.split_once(':') {
        None if name == "cpu" => Ok(Device::Cpu),
        None if name == "cuda" => cuda(0),
        Some(("cuda", ordinal)) => cuda(
            ordinal
                .parse()
                .with_context(|| format!("`{ordinal}` is not a GPU number"))?,
        ),
        _ => anyhow::bail!("unknown device `{name}`: use cpu, cuda or cuda:N"),
    }
}

/// `photos` with every folder among them replaced by the photos in it (by name; files whose
/// extension names no format this build reads, and sub-folders, are passed over).
fn expand_folders(photos: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut expanded = Vec::with_capacity(photos.len());
    for path in photos {
        if !path.is_dir() {
            expanded.push(path.clone());
            continue;
        }
        let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list the folder {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|file| file.is_file() && is_photo_name(file))
            .collect();
        if inside.is_empty() {
            anyhow::bail!(
                "the folder {} holds no photos (PNG, JPEG, {OTHER_PHOTO_FORMATS} files)",
                path.display()
            );
        }
        inside.sort();
        expanded.extend(inside);
    }
    Ok(expanded)
}

fn fit(
    builder: ganfit::FitterBuilder,
    photos: &[PathBuf],
    out: &Path,
    same_person: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let photos = &expand_folders(photos)?;
    let dirs = output_dirs(photos, out);
    check_outputs(photos, &dirs)?;
    // Every photo's header first: a missing or unreadable file fails before minutes of fitting.
    // The pixels are read a group at a time, so a folder of large photos does not fill the
    // memory.
    for photo in photos {
        probe_image(photo)?;
    }
    let bar = progress(quiet);
    bar.set_message("loading models");
    let fitter = builder.build()?;
    let groups: Vec<Vec<(&PathBuf, &PathBuf)>> = if same_person {
        vec![photos.iter().zip(&dirs).collect()]
    } else {
        photos.iter().zip(&dirs).map(|pair| vec![pair]).collect()
    };
    let mut failed = Vec::new();
    for paths in groups {
        let names: Vec<String> = paths.iter().map(|(p, _)| p.display().to_string()).collect();
        let label = names.join(", ");
        let images: Vec<RgbImage> = match paths.iter().map(|(photo, _)| load_rgb(photo)).collect() {
            Ok(images) => images,
            // A photo whose body is damaged should not cost the others their fits either.
            Err(error) if photos.len() > 1 && !same_person => {
                bar.suspend(|| eprintln!("error: {}", one_line(&error.into())));
                failed.push(label);
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let fitted = fitter.fit_many_with_progress(&images, |progress| match progress {
            Progress::Step(step) => bar.set_message(format!("{label}: {step}")),
            Progress::Iteration {
                iteration,
                of,
                loss,
            } => bar.set_message(format!(
                "{label}: full objective {}/{of}, loss {loss:.4}",
                iteration + 1
            )),
        });
        let results = match fitted {
            Ok(results) => results,
            // One photo of a batch without a face should not cost the others their fits.
            Err(error) if photos.len() > 1 && !same_person => {
                bar.suspend(|| eprintln!("error: {label}: {}", one_line(&error.into())));
                failed.push(label);
                continue;
            }
            // Name the photo of a group that failed by its path, not its place in the group.
            Err(ganfit::Error::InPhoto { index, source, .. }) => {
                return Err(
                    anyhow::Error::from(*source).context(paths[index].0.display().to_string())
                );
            }
            Err(error) => return Err(error.into()),
        };
        let mut warnings: Vec<String> = names
            .iter()
            .zip(&results)
            .filter_map(|(name, result)| cut_off_face(name, result))
            .collect();
        if same_person {
            warnings.extend(different_people(&fitter, &names, &images, &results)?);
        }
        for warning in warnings {
            bar.suspend(|| eprintln!("warning: {warning}"));
        }
        for (((photo, dir), image), result) in paths.iter().zip(&images).zip(&results) {
            let name = photo.file_name().unwrap_or_default().to_string_lossy();
            write_outputs(dir, &name, image, &fitter, result)
                .with_context(|| format!("cannot write the results to {}", dir.display()))?;
            bar.println(format!("{} -> {}", photo.display(), dir.display()));
        }
        if let Some(result) = results.first()
            && !quiet
            && !bar.is_hidden()
        {
            for (step, time) in &result.timings {
                bar.println(format!("  {step}: {:.2} s", time.as_secs_f64()));
            }
        }
    }
    bar.finish_and_clear();
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} photos could not be fitted: {}",
            failed.len(),
            photos.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// dlib's same-person threshold on its descriptor distance.
const SAME_PERSON_DISTANCE: f64 = 0.6;

/// A warning when the edges of the photo `name` cut off part of its face: the landmarker
/// guessed the points beyond them, and the fit rests there mostly on the model's prior.
fn cut_off_face(name: &str, result: &FitResult) -> Option<String> {
    let beyond = result.landmarks_beyond_photo();
    (beyond > 0).then(|| {
        format!(
            "{name}: the photo's edge cuts off part of the face ({beyond} of {} landmarks lie \
             beyond it), which the fit completes mostly from the model's average face; a \
             photo showing the whole face fits better",
            result.detected_landmarks.len()
        )
    })
}

/// A warning for each pair of photos fitted as one person's whose faces dlib takes for two
/// people (none when the fit had no identity network to ask).
fn different_people(
    fitter: &Fitter,
    names: &[String],
    images: &[RgbImage],
    results: &[FitResult],
) -> anyhow::Result<Vec<String>> {
    let mut descriptors = Vec::with_capacity(images.len());
    for (image, result) in images.iter().zip(results) {
        match fitter.identity_descriptor(image, &result.detected_landmarks)? {
            Some(descriptor) => descriptors.push(descriptor),
            None => return Ok(Vec::new()),
        }
    }
    let mut warnings = Vec::new();
    for (i, a) in descriptors.iter().enumerate() {
        for (j, b) in descriptors.iter().enumerate().skip(i + 1) {
            let distance = ganfit::descriptor_distance(a, b);
            if distance > SAME_PERSON_DISTANCE {
                warnings.push(format!(
                    "{} and {} look like two people (dlib distance {distance:.2}, over its \
                     same-person threshold {SAME_PERSON_DISTANCE}); --same-person fitted one \
                     identity to both",
                    names[i], names[j]
                ));
            }
        }
    }
    Ok(warnings)
}

/// Where each photo's results go: `out` itself for one photo, else a sub-folder named after
/// the photo, numbered (`name-2`, …) where names repeat, so no fit overwrites another's.
fn output_dirs(photos: &[PathBuf], out: &Path) -> Vec<PathBuf> {
    if photos.len() == 1 {
        return vec![out.to_path_buf()];
    }
    let mut taken = std::collections::HashSet::new();
    photos
        .iter()
        .map(|photo| {
            let stem = photo.file_stem().unwrap_or_default().to_string_lossy();
            let name = (1..)
                .map(|n| match n {
                    1 => stem.to_string(),
                    n => format!("{stem}-{n}"),
                })
                // Case-blind: some file systems are.
                .find(|name| taken.insert(name.to_lowercase()))
                .unwrap_or_default();
            out.join(name)
        })
        .collect()
}

fn progress(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// The files [`write_outputs`] writes into a photo's folder.
mod output {
    pub const TEXTURE: &str = "texture.png";
    pub const TEXTURE_OBSERVED: &str = "texture_observed.png";
    pub const OBJ: &str = "mesh.obj";
    /// The texture of [`OBJ`] and [`GLB`].
    pub const MESH_TEXTURE: &str = "mesh_texture.png";
    /// Written beside [`OBJ`] by `export::write_obj`.
    pub const MTL: &str = "mesh.mtl";
    pub const GLB: &str = "mesh.glb";
    pub const RENDER: &str = "render.png";
    pub const FRONTAL: &str = "frontal.png";
    pub const OVERLAY: &str = "overlay.png";
    pub const LANDMARKS: &str = "landmarks.json";
    pub const PARAMS: &str = "params.json";
    pub const REPORT: &str = "report.html";
    pub const ALBEDO: &str = "albedo.png";
    pub const VIEWS: &str = "views.png";
    pub const ALL: [&str; 14] = [
        TEXTURE,
        TEXTURE_OBSERVED,
        OBJ,
        MESH_TEXTURE,
        MTL,
        GLB,
        RENDER,
        FRONTAL,
        OVERLAY,
        LANDMARKS,
        PARAMS,
        REPORT,
        ALBEDO,
        VIEWS,
    ];
}

/// Refuses, before any fitting, output folders that cannot be made (a file stands where the
/// folder or one of its parents would be) and results that would overwrite one of the photos
/// (a photo named `render.png` in the output folder).
fn check_outputs(photos: &[PathBuf], dirs: &[PathBuf]) -> anyhow::Result<()> {
    let photos: Vec<PathBuf> = photos
        .iter()
        .filter_map(|photo| photo.canonicalize().ok())
        .collect();
    for dir in dirs {
        if let Some(file) = dir.ancestors().find(|p| p.exists()).filter(|p| !p.is_dir()) {
            anyhow::bail!(
                "cannot write the results to {}: {} is a file, not a folder; name a folder \
                 with --out (it is created if missing)",
                dir.display(),
                file.display()
            );
        }
        for name in output::ALL {
            let Ok(target) = dir.join(name).canonicalize() else {
                continue;
            };
            if photos.contains(&target) {
                anyhow::bail!(
                    "the results would overwrite the photo {}: write them to another folder \
                     with --out",
                    target.display()
                );
            }
        }
    }
    Ok(())
}

fn write_outputs(
    dir: &Path,
    photo_name: &str,
    photo: &RgbImage,
    fitter: &Fitter,
    result: &FitResult,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let overlay = overlay(photo, &result.geometry_render);
    let views = views(fitter, result)?;
    type Job<'a> = Box<dyn FnOnce() -> anyhow::Result<()> + Send + 'a>;
    let mut jobs: Vec<Job<'_>> = vec![
        Box::new(|| Ok(result.uv_texture.save(dir.join(output::TEXTURE))?)),
        Box::new(|| {
            Ok(result
                .uv_observed
                .save(dir.join(output::TEXTURE_OBSERVED))?)
        }),
        Box::new(|| {
            export::write_obj(
                &dir.join(output::OBJ),
                &result.mesh,
                Some(Path::new(output::MESH_TEXTURE)),
            )?;
            Ok(())
        }),
        Box::new(|| Ok(result.mesh_texture.save(dir.join(output::MESH_TEXTURE))?)),
        Box::new(|| {
            let (head, expressions) = fitter.head_with_expressions(result)?;
            export::write_glb_with_targets(
                &dir.join(output::GLB),
                &head,
                Some(&result.mesh_texture),
                &expressions,
            )?;
            Ok(())
        }),
        Box::new(|| Ok(result.render.save(dir.join(output::RENDER))?)),
        Box::new(|| Ok(result.frontal_render.save(dir.join(output::FRONTAL))?)),
        Box::new(|| Ok(overlay.save(dir.join(output::OVERLAY))?)),
        Box::new(|| Ok(views.save(dir.join(output::VIEWS))?)),
        Box::new(|| {
            std::fs::write(
                dir.join(output::LANDMARKS),
                serde_json::to_string_pretty(&json!({
                    "convention": "iBUG-68 order, pixel coordinates (x right, y down, pixel centres at integers)",
                    "detected": result.detected_landmarks,
                    "fitted": result.fitted_landmarks,
                }))?,
            )?;
            std::fs::write(
                dir.join(output::PARAMS),
                serde_json::to_string_pretty(&params_json(fitter, result)?)?,
            )?;
            Ok(())
        }),
        Box::new(|| {
            report::write(
                &dir.join(output::REPORT),
                photo_name,
                photo,
                &overlay,
                &views,
                result,
            )
        }),
    ];
    if let Some(albedo) = &result.albedo {
        jobs.push(Box::new(|| Ok(albedo.save(dir.join(output::ALBEDO))?)));
    }
    // Independent files, most of their time PNG compression: one thread each.
    std::thread::scope(|scope| {
        let writers: Vec<_> = jobs.into_iter().map(|job| scope.spawn(job)).collect();
        writers.into_iter().try_for_each(|writer| {
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("a thread writing the results panicked"))?
        })
    })
}

/// Yaws of the views in `views.png`, degrees (positive: the nose turned to the right).
const VIEW_YAWS_DEG: [f64; 3] = [-45.0, 0.0, 45.0];
/// Side of each view in `views.png`, pixels.
const VIEW_SIZE: u32 = 256;

/// The fitted face with a neutral expression turned through [`VIEW_YAWS_DEG`]: textured in
/// the top row, the shaded shape alone below.
fn views(fitter: &Fitter, result: &FitResult) -> anyhow::Result<image::RgbaImage> {
    let neutral = result.params.expression.zeros_like()?;
    let styles = [ViewStyle::Textured, ViewStyle::ShadedGeometry];
    let views: Vec<(f64, ViewStyle)> = styles
        .iter()
        .flat_map(|&style| VIEW_YAWS_DEG.map(|yaw| (yaw, style)))
        .collect();
    let rendered = fitter.render_turned(result, &neutral, &views, VIEW_SIZE)?;
    let columns = VIEW_YAWS_DEG.len();
    let mut sheet = image::RgbaImage::new(columns as u32 * VIEW_SIZE, 2 * VIEW_SIZE);
    for (index, view) in rendered.iter().enumerate() {
        let (x, y) = ((index % columns) as u32, (index / columns) as u32);
        image::imageops::replace(
            &mut sheet,
            view,
            i64::from(x * VIEW_SIZE),
            i64::from(y * VIEW_SIZE),
        );
    }
    Ok(sheet)
}

/// The grey geometry render blended half-transparently over the photo.
fn overlay(photo: &RgbImage, render: &image::RgbaImage) -> RgbImage {
    RgbImage::from_fn(photo.width(), photo.height(), |x, y| {
        let p = photo.get_pixel(x, y).0;
        let r = render.get_pixel(x, y).0;
        let a = 0.6 * f32::from(r[3]) / 255.0;
        image::Rgb(
            [0, 1, 2].map(|c| (f32::from(p[c]) * (1.0 - a) + f32::from(r[c]) * a).round() as u8),
        )
    })
}

fn params_json(fitter: &Fitter, result: &FitResult) -> anyhow::Result<serde_json::Value> {
    let params = &result.params;
    let rotation: Vec<f32> = params.rotation.to_vec1()?;
    let translation: Vec<f32> = params.translation.to_vec1()?;
    let axis_angle = nalgebra::Vector3::new(rotation[0], rotation[1], rotation[2]).cast::<f64>();
    let r = nalgebra::Rotation3::new(axis_angle);
    let k = &params.intrinsics;
    Ok(json!({
        "model": fitter.model().name(),
        "units": "millimetres",
        "camera": {
            "convention": "OpenCV: x right, y down, z forward; pixel ≃ K·(R·X + t) for every vertex X of mesh.obj",
            "K": [[k.fx, 0.0, k.cx], [0.0, k.fy, k.cy], [0.0, 0.0, 1.0]],
            "R": (0..3).map(|i| (0..3).map(|j| r[(i, j)]).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "t": translation,
            "rotation_axis_angle": rotation,
        },
        "shape": params.shape.to_vec1::<f32>()?,
        "light_sh": match &result.light {
            Some(light) => json!({
                "convention": "Lambertian spherical harmonics, camera space, RGB x 9 (ganfit_render::shade_sh)",
                "coefficients": light.to_vec2::<f32>()?,
            }),
            None => serde_json::Value::Null,
        },
        "expression": params.expression.to_vec1::<f32>()?,
        "expression_names": fitter.model().expression_names(),
        "stages": result.stages.iter().map(|s| json!({
            "name": s.name,
            "best_loss": s.best_loss,
            "iterations": s.history.len(),
        })).collect::<Vec<_>>(),
    }))
}

/// Writes `out/<fit folder name>.png` for every fit folder: its texture averaged down to
/// `size`², opaque where at least half the averaged texels were seen in the photo.
fn collect_textures(fits: &[PathBuf], size: u32, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        size.is_power_of_two() && size >= 4,
        "--size must be a power of two of at least 4, got {size}"
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for fit in fits {
        let read = |name: &str| {
            image::open(fit.join(name)).with_context(|| {
                format!(
                    "{} holds no readable {name}: pass output folders of `ganfit fit`",
                    fit.display()
                )
            })
        };
        let texture = read(output::TEXTURE)?.to_rgb8();
        let observed = read(output::TEXTURE_OBSERVED)?.to_luma8();
        let (width, height) = texture.dimensions();
        anyhow::ensure!(
            observed.dimensions() == (width, height) && width == height && width % size == 0,
            "{}: texture.png and texture_observed.png must be square, of one size, and a \
             multiple of --size {size}",
            fit.display()
        );
        let block = width / size;
        let collected = image::RgbaImage::from_fn(size, size, |bx, by| {
            let mut sum = [0u32; 4];
            for y in by * block..(by + 1) * block {
                for x in bx * block..(bx + 1) * block {
                    let (c, o) = (texture.get_pixel(x, y).0, observed.get_pixel(x, y).0);
                    for (total, value) in sum.iter_mut().zip([c[0], c[1], c[2], o[0]]) {
                        *total += u32::from(value);
                    }
                }
            }
            let count = block * block;
            let mean = sum.map(|total| ((total + count / 2) / count) as u8);
            let seen = if 2 * sum[3] >= 255 * count { 255 } else { 0 };
            image::Rgba([mean[0], mean[1], mean[2], seen])
        });
        let name = fit.file_name().unwrap_or(fit.as_os_str()).to_string_lossy();
        let path = out.join(format!("{name}.png"));
        collected
            .save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "wrote {} maps of {size}x{size} texels to {}",
        fits.len(),
        out.display()
    );
    Ok(())
}

fn pca_texture(
    data: &Path,
    components: usize,
    iterations: usize,
    out: &Path,
) -> anyhow::Result<()> {
    use ganfit::texture::{PcaFitOptions, PcaTextureModel, TextureDataset};
    let dataset = TextureDataset::from_dir(data, &Device::Cpu)?;
    let options = PcaFitOptions {
        components,
        iterations,
        ..PcaFitOptions::default()
    };
    PcaTextureModel::fit(&dataset, &options)?.save(out)?;
    println!(
        "wrote {}: {components} components from {} maps",
        out.display(),
        dataset.len()
    );
    Ok(())
}

fn train_texture(args: &TrainArgs) -> anyhow::Result<()> {
    use ganfit::texture::{TextureDataset, TrainConfig, Trainer};
    let device = parse_device(&args.device)?;
    let dataset = TextureDataset::from_dir(&args.data, &device)?;
    let mut trainer = match &args.resume {
        Some(checkpoint) => Trainer::resume(checkpoint, &dataset, &device)?,
        None => {
            let mut config: TrainConfig = match &args.config {
                Some(path) => serde_json::from_str(
                    &std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .with_context(|| {
                    format!("{} is not a valid training configuration", path.display())
                })?,
                None => TrainConfig::default(),
            };
            if let Some(steps) = args.steps {
                config.total_steps = steps;
            }
            if let Some(seed) = args.seed {
                config.seed = seed;
            }
            Trainer::new(config, &dataset, &device)?
        }
    }
    .with_output_dir(&args.out)?;
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(trainer.config().total_steps as u64)
    };
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps, {msg}, eta {eta}",
    )?);
    trainer.run(|progress| {
        bar.set_position(progress.stats.step as u64 + 1);
        bar.set_message(format!(
            "level {} D {:.3} G {:.3}",
            progress.stats.level, progress.stats.d_loss, progress.stats.g_loss
        ));
    })?;
    bar.finish_and_clear();
    if !args.quiet {
        println!("wrote {}", args.out.join("generator.safetensors").display());
    }
    Ok(())
}

fn assets(ids: &[String]) -> anyhow::Result<()> {
    let resolver = ganfit::assets::Resolver::new();
    if ids.is_empty() {
        let report = ganfit::asset_report(&resolver);
        if report.is_empty() {
            println!("weights-manifest.toml lists no assets yet");
        }
        for (entry, found) in report {
            match found {
                Ok(path) => println!("{:<32} {:<12} {}", entry.id, entry.license, path.display()),
                Err(err) => println!("{:<32} {:<12} missing: {err}", entry.id, entry.license),
            }
        }
        return Ok(());
    }
    for id in ids {
        let path = ganfit::prepare_asset(&resolver, id)?;
        println!("{id}: {}", path.display());
    }
    Ok(())
}
