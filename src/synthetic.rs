//! Synthetic faces with known geometry, for measuring reconstruction accuracy.
//!
//! [`SyntheticGenerator::generate`] draws, from a seed: an identity `p_s ~ N(0, I)` on the
//! model's identity modes, a sparse random expression, a head pose (yaw, pitch, roll within
//! configurable ranges), a camera, spherical-harmonic lighting, one of a bank of UV textures and
//! a background cut from a real photo. It renders the face at `image_size²` with the eyeballs,
//! teeth, gums and mouth interior drawn too, composites it over the background, adds Gaussian
//! noise and passes the result through JPEG compression. The [`SyntheticFace`] it returns holds
//! the image and the ground truth: vertices (model coordinates, millimetres), camera, every
//! parameter and the 68 landmarks in pixels.
//!
//! The UV textures come from real photos ([`SyntheticAssets::from_shared`]: a [`Fitter`]
//! unwraps studio portraits onto the model's UV layout; they are cached as PNG files) or are
//! flat skin tones with noise when no photo or fitter is at hand. Unwrapped photos carry their
//! own (soft, frontal) studio lighting in the albedo; the random light comes on top of it.
//!
//! Shared photos are found through [`shared_dir`]: the `GANFIT_SHARED` environment variable, else
//! `../shared` beside the repository.
//!
//! ```no_run
//! use ganfit::morphable::MorphableModel;
//! use ganfit::synthetic::{SyntheticAssets, SyntheticConfig, SyntheticGenerator, shared_dir};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = MorphableModel::ict(&ganfit::assets::Resolver::new(), &candle_core::Device::Cpu)?;
//! let assets = SyntheticAssets::flat_skin(4, 256, 7, &shared_dir()?)?;
//! let generator = SyntheticGenerator::new(&model, SyntheticConfig::default(), assets)?;
//! let face = generator.generate(42)?;
//! face.image.save("synthetic.png")?;
//! let truth = face.ground_truth(&model)?; // for ganfit::evaluate
//! # let _ = truth;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ganfit_morphable::MorphableModel;
use ganfit_optim::Intrinsics;
use ganfit_render::{Appearance, Camera, Lighting, RenderOptions, Renderer, Scene, WrapMode};
use image::RgbImage;
use nalgebra::{Rotation3, Vector3};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Fitter;
use crate::atlas::{EyeColours, HeadLayout, mean_colour};
use crate::evaluate::GroundTruth;
use crate::eyes::EyeTexture;

/// Why synthetic data could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    /// The shared data folder is missing.
    #[error(
        "the shared data folder {} does not exist or has no data/faces; set GANFIT_SHARED to \
         the folder that holds data/faces (the project's shared inputs)",
        .0.display()
    )]
    SharedDataMissing(PathBuf),
    /// No usable photo was found for backgrounds.
    #[error(
        "no photos (.jpg, .jpeg, .png) found under {}; the backgrounds are cut from them",
        .0.display()
    )]
    NoPhotos(PathBuf),
    /// The configuration is invalid.
    #[error("invalid synthetic-data configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An image could not be decoded or encoded.
    #[error("image {origin}: {source}")]
    Image {
        /// The file or step.
        origin: String,
        /// The cause.
        source: image::ImageError,
    },
    /// A photo could not be read.
    #[error(transparent)]
    Face(#[from] ganfit_losses::face::FaceError),
    /// The morphable model rejected an operation.
    #[error(transparent)]
    Model(#[from] ganfit_morphable::MorphableError),
    /// Rendering failed.
    #[error(transparent)]
    Render(#[from] ganfit_render::RenderError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this module.
pub type Result<T, E = SyntheticError> = std::result::Result<T, E>;

/// The shared data folder: `GANFIT_SHARED` if set, else `../shared` beside the repository root.
/// It must hold `data/faces`.
pub fn shared_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("GANFIT_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("shared"),
    };
    if dir.join("data").join("faces").is_dir() {
        Ok(dir)
    } else {
        Err(SyntheticError::SharedDataMissing(dir))
    }
}

/// Every photo (`.jpg`, `.jpeg`, `.png`) one folder below `shared/data/faces`, sorted by path.
pub fn shared_photos(shared: &Path) -> Result<Vec<PathBuf>> {
    let faces = shared.join("data").join("faces");
    let list = |dir: &Path| -> Result<Vec<PathBuf>> {
        let entries = std::fs::read_dir(dir).map_err(|source| SyntheticError::Io {
            action: "cannot list",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
    };
    let mut photos: Vec<PathBuf> = Vec::new();
    for folder in list(&faces)?.into_iter().filter(|p| p.is_dir()) {
        photos.extend(list(&folder)?.into_iter().filter(|p| is_photo(p)));
    }
    photos.sort();
    if photos.is_empty() {
        return Err(SyntheticError::NoPhotos(faces));
    }
    Ok(photos)
}

fn is_photo(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// Textures and backgrounds to draw from.
#[derive(Debug, Clone)]
pub struct SyntheticAssets {
    /// UV textures (image orientation, row 0 at OBJ `v = 1`), all the same square size.
    pub textures: Vec<RgbImage>,
    /// Photos whose corners become backgrounds.
    pub backgrounds: Vec<PathBuf>,
}

impl SyntheticAssets {
    /// `count` flat skin tones of `size²` texels with a little noise, and the shared photos as
    /// backgrounds.
    pub fn flat_skin(count: usize, size: u32, seed: u64, shared: &Path) -> Result<Self> {
        if count == 0 || size == 0 {
            return Err(SyntheticError::Config(
                "flat_skin needs at least one texture of at least one texel".to_string(),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let textures = (0..count)
            .map(|_| flat_skin_texture(size, &mut rng))
            .collect();
        Ok(SyntheticAssets {
            textures,
            backgrounds: shared_photos(shared)?,
        })
    }

    /// UV textures unwrapped by `fitter` from the first `count` neutral studio portraits in
    /// `shared/data/faces/frl_london` (cached in `cache_dir` as `uv-<photo>.png`, so each photo
    /// is fitted once), and the shared photos as backgrounds. Portraits the fitter cannot fit
    /// are skipped; if none is left, flat skin tones stand in.
    pub fn from_shared(
        shared: &Path,
        fitter: &Fitter,
        cache_dir: &Path,
        count: usize,
    ) -> Result<Self> {
        let backgrounds = shared_photos(shared)?;
        let portraits: Vec<&PathBuf> = backgrounds
            .iter()
            .filter(|p| {
                p.parent().and_then(Path::file_name) == Some("frl_london".as_ref())
                    && p.file_stem()
                        .and_then(|s| s.to_str())
                        .is_some_and(|s| s.ends_with("_neutral"))
            })
            .take(count)
            .collect();
        std::fs::create_dir_all(cache_dir).map_err(|source| SyntheticError::Io {
            action: "cannot create",
            path: cache_dir.to_path_buf(),
            source,
        })?;
        let mut textures = Vec::new();
        for photo in portraits {
            let stem = photo.file_stem().unwrap_or_default().to_string_lossy();
            let cached = cache_dir.join(format!("uv-{stem}.png"));
            if let Ok(texture) = image::open(&cached) {
                textures.push(texture.to_rgb8());
                continue;
            }
            let Ok(result) = fitter.fit(&ganfit_losses::face::load_rgb(photo)?) else {
                continue;
            };
            result
                .uv_texture
                .save(&cached)
                .map_err(|source| SyntheticError::Image {
                    origin: cached.display().to_string(),
                    source,
                })?;
            textures.push(result.uv_texture);
        }
        if textures.is_empty() {
            return Self::flat_skin(count.max(1), 512, 0, shared);
        }
        Ok(SyntheticAssets {
            textures,
            backgrounds,
        })
    }
}

/// A skin tone between pale and dark brown, with low-frequency blotches and fine noise.
fn flat_skin_texture(size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let darkness: f32 = rng.random_range(0.0..1.0);
    let base = [
        0.85 - 0.5 * darkness,
        0.68 - 0.45 * darkness,
        0.58 - 0.42 * darkness,
    ];
    let phase: [f32; 4] = std::array::from_fn(|_| rng.random_range(0.0..std::f32::consts::TAU));
    RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f32 / size as f32, y as f32 / size as f32);
        let blotch = 0.03 * ((9.0 * u + phase[0]).sin() * (7.0 * v + phase[1]).sin())
            + 0.02 * ((23.0 * u + phase[2]).sin() * (19.0 * v + phase[3]).cos());
        let grain: f32 = 0.02 * Distribution::<f32>::sample(&StandardNormal, rng);
        image::Rgb(base.map(|c| to_byte(c + blotch + grain)))
    })
}

fn to_byte(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// How synthetic faces are drawn. Angles in degrees; ranges are symmetric (`±value`).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Side of the square image, pixels.
    pub image_size: u32,
    /// Yaw (turn about the vertical axis) within ±this.
    pub yaw_deg: f64,
    /// Pitch (nod) within ±this.
    pub pitch_deg: f64,
    /// Roll (tilt in the image plane) within ±this.
    pub roll_deg: f64,
    /// Identity modes drawn from N(0, 1) (the model's first ones; the rest stay 0). `None`
    /// for all.
    pub identity_modes: Option<usize>,
    /// At most this many expression blendshapes are active (0 for neutral faces); the count is
    /// uniform in `0..=max_expressions`.
    pub max_expressions: usize,
    /// Active blendshape weights are uniform in `[0.1, max_expression_weight]`.
    pub max_expression_weight: f32,
    /// Camera distance range, millimetres.
    pub distance_mm: (f64, f64),
    /// The face's width as a fraction of the image side, range.
    pub face_fraction: (f64, f64),
    /// Standard deviation of the added Gaussian noise, in units of the full intensity range
    /// (0.05: 5 %).
    pub noise_std: f32,
    /// JPEG quality of the final compression (1..=100), or `None` for none.
    pub jpeg_quality: Option<u8>,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            image_size: 512,
            yaw_deg: 45.0,
            pitch_deg: 20.0,
            roll_deg: 10.0,
            identity_modes: None,
            max_expressions: 3,
            max_expression_weight: 0.8,
            distance_mm: (450.0, 1000.0),
            face_fraction: (0.3, 0.45),
            noise_std: 0.05,
            jpeg_quality: Some(85),
        }
    }
}

impl SyntheticConfig {
    fn validate(&self, model: &MorphableModel) -> Result<()> {
        let fail = |reason: String| Err(SyntheticError::Config(reason));
        if !(32..=8192).contains(&self.image_size) {
            return fail(format!(
                "image size {} is outside 32..=8192",
                self.image_size
            ));
        }
        for (name, value, limit) in [
            ("yaw", self.yaw_deg, 90.0),
            ("pitch", self.pitch_deg, 90.0),
            ("roll", self.roll_deg, 180.0),
        ] {
            if !(0.0..=limit).contains(&value) {
                return fail(format!("{name} range ±{value}° is outside 0..={limit}°"));
            }
        }
        if self.identity_modes.is_some_and(|k| k > model.shape_modes()) {
            return fail(format!(
                "{:?} identity modes asked for, `{}` has {}",
                self.identity_modes,
                model.name(),
                model.shape_modes()
            ));
        }
        if self.max_expressions > model.expression_modes() {
            return fail(format!(
                "up to {} expressions asked for, `{}` has {}",
                self.max_expressions,
                model.name(),
                model.expression_modes()
            ));
        }
        if !(self.max_expression_weight >= 0.1 && self.max_expression_weight <= 1.5) {
            return fail(format!(
                "max expression weight {} is outside 0.1..=1.5",
                self.max_expression_weight
            ));
        }
        let ordered = |(lo, hi): (f64, f64)| lo > 0.0 && hi >= lo && hi.is_finite();
        if !ordered(self.distance_mm) || !ordered(self.face_fraction) || self.face_fraction.1 > 1.0
        {
            return fail(format!(
                "distance {:?} mm and face fraction {:?} must be positive ranges (lo ≤ hi), the \
                 fraction at most 1",
                self.distance_mm, self.face_fraction
            ));
        }
        if !(0.0..=1.0).contains(&self.noise_std) {
            return fail(format!("noise {} is outside 0..=1", self.noise_std));
        }
        if self.jpeg_quality.is_some_and(|q| !(1..=100).contains(&q)) {
            return fail(format!(
                "JPEG quality {:?} is outside 1..=100",
                self.jpeg_quality
            ));
        }
        Ok(())
    }
}

/// One synthetic face and its ground truth.
#[derive(Debug, Clone)]
pub struct SyntheticFace {
    /// The seed it was drawn from.
    pub seed: u64,
    /// The final image (noise and JPEG applied).
    pub image: RgbImage,
    /// Every vertex of the model instance, model coordinates, millimetres.
    pub vertices: Vec<[f32; 3]>,
    /// Identity coefficients (standard deviations), one per model mode.
    pub shape: Vec<f32>,
    /// Expression blendshape weights, one per model expression.
    pub expression: Vec<f32>,
    /// Head yaw, pitch and roll, degrees (yaw about the model's vertical axis, positive turns
    /// the face to its left; pitch about the horizontal axis; roll about the viewing axis).
    pub yaw_pitch_roll_deg: [f64; 3],
    /// Model-to-camera rotation, axis-angle (OpenCV camera: x right, y down, z forward).
    pub rotation: [f64; 3],
    /// Model-to-camera translation, millimetres: `X_camera = R·X + t`.
    pub translation: [f64; 3],
    /// Pinhole intrinsics, pixels.
    pub intrinsics: Intrinsics,
    /// Spherical-harmonic light, 9 coefficients per colour channel (R, G, B), in camera space
    /// (see [`ganfit_render::shade_sh`]).
    pub light: [[f32; 9]; 3],
    /// The 68 iBUG landmarks: the model's landmark vertices projected, pixels (`None` where the
    /// model has no vertex). Not occlusion-aware: a hidden jaw point is where the vertex is.
    pub landmarks: Vec<Option<[f64; 2]>>,
    /// Which texture of the bank was used.
    pub texture: usize,
    /// The photo the background was cut from.
    pub background: PathBuf,
}

impl SyntheticFace {
    /// The ground truth for [`crate::evaluate`]: the vertices of the model's narrow face area
    /// (`narrow_face`, else `face`, else all) and the 68 landmark positions, millimetres.
    pub fn ground_truth(&self, model: &MorphableModel) -> Result<GroundTruth> {
        let area = ["narrow_face", "face"]
            .iter()
            .find_map(|name| model.vertex_set(name).ok());
        let point = |v: u32| self.vertices[v as usize].map(f64::from);
        if self.vertices.len() != model.n_vertices() {
            return Err(SyntheticError::Config(format!(
                "this face has {} vertices but `{}` has {}: pass the model it was drawn from",
                self.vertices.len(),
                model.name(),
                model.n_vertices()
            )));
        }
        Ok(GroundTruth {
            points: match area {
                Some(ids) => ids.iter().map(|&v| point(v)).collect(),
                None => (0..self.vertices.len() as u32).map(point).collect(),
            },
            landmarks: model
                .landmark_vertex_ids()
                .iter()
                .map(|id| id.map(point))
                .collect(),
        })
    }
}

/// Draws synthetic faces of one model; see the module documentation.
#[derive(Debug)]
pub struct SyntheticGenerator<'a> {
    model: &'a MorphableModel,
    config: SyntheticConfig,
    assets: SyntheticAssets,
    layout: HeadLayout,
    /// Centre of the face's bounding box in the mean shape, model coordinates.
    face_centre: Vector3<f64>,
    /// Width of the face in the mean shape, millimetres.
    face_width: f64,
}

impl<'a> SyntheticGenerator<'a> {
    /// Prepares the model's render layout. The textures must all have one square size.
    pub fn new(
        model: &'a MorphableModel,
        config: SyntheticConfig,
        assets: SyntheticAssets,
    ) -> Result<Self> {
        config.validate(model)?;
        let Some(first) = assets.textures.first() else {
            return Err(SyntheticError::Config("the texture bank is empty".into()));
        };
        let size = first.dimensions();
        if size.0 != size.1 || assets.textures.iter().any(|t| t.dimensions() != size) {
            return Err(SyntheticError::Config(
                "textures must all be square and of one size".into(),
            ));
        }
        if assets.backgrounds.is_empty() {
            return Err(SyntheticError::Config("no background photos given".into()));
        }
        let n = model.n_vertices();
        let mean = model.mean_rows()?;
        let layout = HeadLayout::new(model, &mean)?;

        let face_ids: Vec<u32> = model
            .vertex_set("face")
            .map(<[u32]>::to_vec)
            .unwrap_or_else(|_| (0..n as u32).collect());
        let (mut lo, mut hi) = (
            Vector3::repeat(f64::INFINITY),
            Vector3::repeat(f64::NEG_INFINITY),
        );
        for &v in &face_ids {
            let p = Vector3::from(mean[v as usize].map(f64::from));
            lo = lo.inf(&p);
            hi = hi.sup(&p);
        }
        Ok(SyntheticGenerator {
            model,
            config,
            assets,
            layout,
            face_centre: (lo + hi) / 2.0,
            face_width: (hi.x - lo.x).max(1.0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// Draws the face of `seed` (the same seed gives the same face).
    pub fn generate(&self, seed: u64) -> Result<SyntheticFace> {
        let config = &self.config;
        let model = self.model;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let size = config.image_size;

        let identity_modes = config.identity_modes.unwrap_or(model.shape_modes());
        let shape: Vec<f32> = (0..model.shape_modes())
            .map(|k| {
                let draw: f32 = StandardNormal.sample(&mut rng);
                if k < identity_modes { draw } else { 0.0 }
            })
            .collect();
        let mut expression = vec![0.0f32; model.expression_modes()];
        let active = rng.random_range(0..=config.max_expressions);
        for k in rand::seq::index::sample(&mut rng, model.expression_modes(), active) {
            expression[k] = rng.random_range(0.1..=config.max_expression_weight);
        }

        let symmetric = |rng: &mut ChaCha8Rng, limit: f64| {
            if limit > 0.0 {
                rng.random_range(-limit..=limit)
            } else {
                0.0
            }
        };
        let yaw = symmetric(&mut rng, config.yaw_deg);
        let pitch = symmetric(&mut rng, config.pitch_deg);
        let roll = symmetric(&mut rng, config.roll_deg);
        // Models are y-up with z towards the viewer; the OpenCV camera looks down +z with y
        // down, hence the half turn about x after the head's own rotation.
        let head = Rotation3::from_axis_angle(&Vector3::z_axis(), roll.to_radians())
            * Rotation3::from_axis_angle(&Vector3::x_axis(), pitch.to_radians())
            * Rotation3::from_axis_angle(&Vector3::y_axis(), yaw.to_radians());
        let rotation = Rotation3::from_axis_angle(&Vector3::x_axis(), std::f64::consts::PI) * head;

        let distance = rng.random_range(config.distance_mm.0..=config.distance_mm.1);
        let fraction = rng.random_range(config.face_fraction.0..=config.face_fraction.1);
        let focal = fraction * f64::from(size) * distance / self.face_width;
        let centre = (f64::from(size) - 1.0) / 2.0;
        let intrinsics = Intrinsics {
            fx: focal,
            fy: focal,
            cx: centre,
            cy: centre,
        };
        let shift = 0.06 * f64::from(size);
        let offset = Vector3::new(
            symmetric(&mut rng, shift) * distance / focal,
            symmetric(&mut rng, shift) * distance / focal,
            distance,
        );
        let translation = offset - rotation * self.face_centre;
        let light = random_light(&mut rng);
        let texture = rng.random_range(0..self.assets.textures.len());
        let background_photo =
            &self.assets.backgrounds[rng.random_range(0..self.assets.backgrounds.len())];
        let background = background_crop(background_photo, size, &mut rng)?;

        let device = Device::Cpu;
        let vertices = model
            .instance(
                &Tensor::from_slice(&shape, shape.len(), &device)?,
                &Tensor::from_slice(&expression, expression.len(), &device)?,
            )?
            .to_dtype(DType::F32)?;
        let vertex_list: Vec<[f32; 3]> = vertices
            .to_vec2::<f32>()?
            .into_iter()
            .map(|v| [v[0], v[1], v[2]])
            .collect();
        let atlas = self.atlas(texture, &mut rng)?;
        let camera = Camera::new(
            focal,
            focal,
            centre,
            centre,
            size as usize,
            size as usize,
            10.0,
            1e5,
        )?;
        let renderer = Renderer::new(
            self.layout.triangles.clone(),
            camera,
            RenderOptions {
                // The mouth and eye sockets are seen from inside; the depth test suffices.
                cull_backfaces: false,
                antialias: true,
            },
        );
        let axis_angle = rotation.scaled_axis();
        let to_tensor =
            |v: Vector3<f64>| Tensor::new(&[[v.x as f32, v.y as f32, v.z as f32]], &device);
        let light_tensor = Tensor::new(&light, &device)?.unsqueeze(0)?;
        let rendering = renderer.render(&Scene {
            vertices: &vertices,
            rotation: &to_tensor(axis_angle)?,
            translation: &to_tensor(translation)?,
            appearance: Appearance::Texture {
                texture: &atlas,
                uv: &self.layout.uv,
                uv_triangles: Some(&self.layout.uv_triangles),
                wrap: WrapMode::Clamp,
            },
            lighting: Lighting::SphericalHarmonics(&light_tensor),
        })?;
        let colour: Vec<f32> = rendering.image.flatten_all()?.to_vec1()?;
        let coverage: Vec<f32> = rendering.mask.flatten_all()?.to_vec1()?;

        let mut image = RgbImage::new(size, size);
        let behind = background.as_raw();
        for (p, pixel) in image.pixels_mut().enumerate() {
            let a = coverage[p];
            pixel.0 = std::array::from_fn(|c| {
                // The render is premultiplied by its coverage (composited onto black).
                let value = colour[p * 3 + c] + (1.0 - a) * f32::from(behind[p * 3 + c]) / 255.0;
                let grain: f32 = StandardNormal.sample(&mut rng);
                to_byte(value + config.noise_std * grain)
            });
        }
        if let Some(quality) = config.jpeg_quality {
            image = jpeg_round_trip(&image, quality)?;
        }

        let landmarks = model
            .landmark_vertex_ids()
            .iter()
            .map(|id| {
                id.map(|v| {
                    let p = Vector3::from(vertex_list[v as usize].map(f64::from));
                    let pixel = intrinsics.project(&(rotation * p + translation));
                    [pixel.x, pixel.y]
                })
            })
            .collect();
        Ok(SyntheticFace {
            seed,
            image,
            vertices: vertex_list,
            shape,
            expression,
            yaw_pitch_roll_deg: [yaw, pitch, roll],
            rotation: axis_angle.into(),
            translation: translation.into(),
            intrinsics,
            light,
            landmarks,
            texture,
            background: background_photo.clone(),
        })
    }

    /// Texture `index` with a palette for the eyes and mouth beside it, `[S, 2S, 3]` in [0, 1].
    fn atlas(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let texture = &self.assets.textures[index];
        let rgb: Vec<f32> = texture
            .as_raw()
            .iter()
            .map(|&v| f32::from(v) / 255.0)
            .collect();
        // Brown, blue, green or hazel irises.
        let irises = [
            EyeColours::DEFAULT.iris,
            [0.25, 0.38, 0.55],
            [0.25, 0.38, 0.22],
            [0.42, 0.32, 0.16],
        ];
        let iris = irises[rng.random_range(0..irises.len())];
        let skin = mean_colour(&rgb);
        let colours = EyeColours {
            iris,
            ..EyeColours::DEFAULT
        };
        let side = texture.width() as usize;
        let eyes = EyeTexture::painted(colours.toned_like(skin), (side / 2).max(1));
        Ok(HeadLayout::atlas(&rgb, side, &eyes, skin, skin)?)
    }
}

/// Ambient light plus one directional light from the camera's side of the face, slightly
/// tinted, as 9 SH coefficients per channel (the basis order of [`ganfit_render::shade_sh`]).
fn random_light(rng: &mut ChaCha8Rng) -> [[f32; 9]; 3] {
    let ambient: f64 = rng.random_range(0.55..0.85);
    let strength: f64 = rng.random_range(0.2..0.6);
    // Camera space: the face looks along -z; light from above has negative y.
    let direction = Vector3::new(
        rng.random_range(-1.0..1.0),
        rng.random_range(-0.8..0.3),
        -rng.random_range(0.6..1.5),
    )
    .normalize();
    let (x, y, z) = (direction.x, direction.y, direction.z);
    // A directional light of radiance `strength` projected on the real SH basis (Y_lm), plus
    // a uniform radiance whose irradiance is `ambient` (π·L, with Y_00 = 0.2821).
    let directional = [
        0.282_095,
        0.488_603 * y,
        0.488_603 * z,
        0.488_603 * x,
        1.092_548 * x * y,
        1.092_548 * y * z,
        0.315_392 * (3.0 * z * z - 1.0),
        1.092_548 * x * z,
        0.546_274 * (x * x - y * y),
    ];
    std::array::from_fn(|_| {
        let tint: f64 = rng.random_range(0.92..1.08);
        std::array::from_fn(|k| {
            let base = strength * directional[k]
                + if k == 0 {
                    ambient / (0.282_095 * std::f64::consts::PI)
                } else {
                    0.0
                };
            (base * tint) as f32
        })
    })
}

/// A corner of `photo` (20–35 % of its shorter side, where portraits show backdrop rather than
/// faces), resized to `size²`.
fn background_crop(photo: &Path, size: u32, rng: &mut ChaCha8Rng) -> Result<RgbImage> {
    let picture = ganfit_losses::face::load_rgb(photo)?;
    let (w, h) = picture.dimensions();
    let side = ((f64::from(w.min(h)) * rng.random_range(0.2..0.35)) as u32).max(1);
    let corner = rng.random_range(0..4u32);
    let x = if corner % 2 == 0 { 0 } else { w - side };
    let y = if corner < 2 { 0 } else { h - side };
    let crop = image::imageops::crop_imm(&picture, x, y, side, side).to_image();
    Ok(image::imageops::resize(
        &crop,
        size,
        size,
        image::imageops::FilterType::Triangle,
    ))
}

fn jpeg_round_trip(image: &RgbImage, quality: u8) -> Result<RgbImage> {
    let mut bytes = Vec::new();
    let as_error = |source| SyntheticError::Image {
        origin: "JPEG compression".to_string(),
        source,
    };
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode_image(image)
        .map_err(as_error)?;
    Ok(
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
            .map_err(as_error)?
            .to_rgb8(),
    )
}
