//! The `Fitter`: photo in, fitted 3D face out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ganfit_losses::face::{FaceChoice, FaceDetector, FaceLandmarker, check_pixel_count};
use ganfit_losses::identity::FaceRecognitionNet;
use ganfit_morphable::{MorphableModel, TexturedMesh};
use ganfit_optim::{
    AlignmentConfig, FitParams, ImageLandmarks, Intrinsics, LossWeights, PhotoView, Projection,
    RefineConfig, StageReport, TextureSource, UvTexture, surface_distances,
};
use ganfit_render::{Appearance, Lighting, PhongLight, RenderOptions, Renderer, Scene, WrapMode};
use ganfit_texture::TextureModel;
use image::{RgbImage, RgbaImage};

use crate::atlas::{EyeColours, HeadLayout, cheek_colour, hair_colour};
use crate::correspondence::MeshCorrespondence;
use crate::eyes::EyeTexture;

/// Everything that can go wrong while building a [`Fitter`] or fitting a photo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file could not be found, verified, built or downloaded.
    #[error(transparent)]
    Asset(#[from] ganfit_assets::AssetError),
    /// The morphable model failed to load or evaluate.
    #[error(transparent)]
    Model(#[from] ganfit_morphable::MorphableError),
    /// Reading the photo, or finding the face and its landmarks, failed.
    #[error(transparent)]
    Face(#[from] ganfit_losses::face::FaceError),
    /// The identity network failed to load or run.
    #[error(transparent)]
    Loss(#[from] ganfit_losses::LossError),
    /// The optimisation failed.
    #[error(transparent)]
    Optim(#[from] ganfit_optim::OptimError),
    /// Rendering failed.
    #[error(transparent)]
    Render(#[from] ganfit_render::RenderError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The builder was given options that do not work together.
    #[error("invalid fitter configuration: {0}")]
    Config(String),
    /// One of several photos fitted together ([`Fitter::fit_many`]) could not be used, e.g.
    /// no face was found in it.
    #[error("photo {} of {count}: {source}", index + 1)]
    InPhoto {
        /// Which photo, counting from 0 in the order given.
        index: usize,
        /// How many photos were given.
        count: usize,
        /// What went wrong with it.
        source: Box<Error>,
    },
}

impl Error {
    /// This error of photo `index` of `count` fitted together: named by its photo when there
    /// are several.
    fn in_photo(self, index: usize, count: usize) -> Self {
        match count {
            1 => self,
            _ => Error::InPhoto {
                index,
                count,
                source: Box::new(self),
            },
        }
    }
}

/// Result type of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Configures a [`Fitter`]; every option has a default (the embedded models on the CPU).
#[derive(Debug, Default)]
pub struct FitterBuilder {
    device: Option<Device>,
    resolver: Option<ganfit_assets::Resolver>,
    model: Option<MorphableModel>,
    identity_net: Option<FaceRecognitionNet>,
    texture_model: Option<Arc<dyn TextureModel>>,
    alignment: Option<AlignmentConfig>,
    refine: Option<RefineConfig>,
    iterations: Option<usize>,
    loss_weights: Option<LossWeights>,
    seed: u64,
    intrinsics: Option<Intrinsics>,
    face_choice: FaceChoice,
    texture_size: Option<usize>,
}

impl FitterBuilder {
    /// The device the models run on (default: CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = Some(device);
        self
    }

    /// Where model files are looked up (default: [`ganfit_assets::Resolver::new`]).
    pub fn resolver(mut self, resolver: ganfit_assets::Resolver) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// The 3D morphable model to fit (default: ICT Face Model Light). It must define the 68
    /// iBUG landmarks, as both bundled models do.
    pub fn morphable_model(mut self, model: MorphableModel) -> Self {
        self.model = Some(model);
        self
    }

    /// Iterations, priors and learning rates of the landmark alignment stage.
    pub fn alignment(mut self, config: AlignmentConfig) -> Self {
        self.alignment = Some(config);
        self
    }

    /// The face-recognition network of the identity and content losses (default: dlib's
    /// ResNet from the weights manifest).
    pub fn identity_net(mut self, net: FaceRecognitionNet) -> Self {
        self.identity_net = Some(net);
        self
    }

    /// A learned texture model (the texture GAN, or PCA) whose latent the fit optimises. By
    /// default the fit optimises a free UV map under smoothness and symmetry priors.
    pub fn texture_model(mut self, model: Arc<dyn TextureModel>) -> Self {
        self.texture_model = Some(model);
        self
    }

    /// Iterations, weights, learning rates and resolutions of the full objective (the stage
    /// after the landmark alignment).
    pub fn refine(mut self, config: RefineConfig) -> Self {
        self.refine = Some(config);
        self
    }

    /// Iterations of the full objective (overrides [`FitterBuilder::refine`]'s); 0 stops after
    /// the landmark alignment.
    pub fn iterations(mut self, iterations: usize) -> Self {
        self.iterations = Some(iterations);
        self
    }

    /// The λ's of the full objective (overrides [`FitterBuilder::refine`]'s).
    pub fn loss_weights(mut self, weights: LossWeights) -> Self {
        self.loss_weights = Some(weights);
        self
    }

    /// Seed of the fit's only random choice, the texture model's starting latent (default 0).
    /// The fit is deterministic for a seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The photos' camera intrinsics, when known (a calibrated camera): used as given instead
    /// of guessed from the image size and fitted. Overrides [`FitterBuilder::alignment`]'s.
    pub fn intrinsics(mut self, intrinsics: Intrinsics) -> Self {
        self.intrinsics = Some(intrinsics);
        self
    }

    /// Which face to fit when the photo shows several (default: the largest).
    pub fn face_choice(mut self, choice: FaceChoice) -> Self {
        self.face_choice = choice;
        self
    }

    /// Side of the UV texture map in texels (default 1024).
    pub fn texture_size(mut self, size: usize) -> Self {
        self.texture_size = Some(size);
        self
    }

    /// Loads the models and checks the configuration.
    pub fn build(self) -> Result<Fitter> {
        // Options are checked before the models load, so a mistake fails fast.
        let mut alignment = self.alignment.unwrap_or_default();
        if let Some(intrinsics) = self.intrinsics {
            alignment.intrinsics = Some(intrinsics);
        }
        if let Some(k) = alignment.intrinsics
            && (![k.fx, k.fy, k.cx, k.cy].iter().all(|v| v.is_finite())
                || k.fx <= 0.0
                || k.fy <= 0.0)
        {
            return Err(Error::Config(format!(
                "intrinsics need positive finite focal lengths and a finite principal point, \
                 got {k:?}"
            )));
        }
        if alignment.camera_iterations + alignment.shape_iterations == 0 {
            return Err(Error::Config(
                "the alignment stage has no iterations".to_string(),
            ));
        }
        let texture_size = self.texture_size.unwrap_or(1024);
        if !(16..=8192).contains(&texture_size) {
            return Err(Error::Config(format!(
                "texture size {texture_size} is outside 16..=8192 texels"
            )));
        }
        let mut refine = self.refine.unwrap_or_default();
        if let Some(iterations) = self.iterations {
            refine.iterations = iterations;
        }
        if let Some(weights) = self.loss_weights {
            refine.weights = weights;
        }
        let weights = [
            refine.weights.identity,
            refine.weights.frontal_identity,
            refine.weights.content,
            refine.weights.pixel,
            refine.weights.landmark,
            refine.weights.shape_prior,
            refine.weights.expression_prior,
            refine.weights.light_prior,
            refine.weights.texture_prior,
            refine.weights.texture_symmetry,
        ];
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(Error::Config(format!(
                "loss weights must be finite and non-negative, got {:?}",
                refine.weights
            )));
        }
        if refine.iterations > 0 && weights.iter().all(|w| *w == 0.0) {
            return Err(Error::Config(
                "every loss weight is zero: the full objective would have nothing to minimise"
                    .to_string(),
            ));
        }
        let device = self.device.unwrap_or(Device::Cpu);
        if let Some(texture_model) = &self.texture_model
            && !texture_model.device().same_device(&device)
        {
            return Err(Error::Config(
                "the texture model lives on another device than the fitter".to_string(),
            ));
        }
        let resolver = self.resolver.unwrap_or_default();
        let model = match self.model {
            Some(model) => model,
            None => MorphableModel::ict(&resolver, &device)?,
        };
        let landmark_count = model.landmark_vertex_ids().len();
        if landmark_count != ganfit_morphable::LANDMARK_COUNT {
            return Err(Error::Config(format!(
                "the morphable model `{}` defines {landmark_count} landmarks; fitting needs the \
                 {} iBUG landmarks",
                model.name(),
                ganfit_morphable::LANDMARK_COUNT
            )));
        }
        refine.seed = self.seed;
        let identity_net = match self.identity_net {
            Some(net) => Some(net),
            None if refine.iterations > 0 => {
                Some(FaceRecognitionNet::from_resolver(&resolver, &device)?)
            }
            // Only the full objective uses it: spare the load.
            None => None,
        };
        // Detection, landmarks, the landmark alignment and the final renders are hundreds of
        // small steps each, which a GPU runs slower than a CPU (one default fit of the bundled
        // photo on an H200: 0.47, 1.13 and 1.19 s there against 0.14, 0.48 and 0.89 s on its
        // host's CPU): only the full objective runs on the fitter's device.
        let host_model = if device.is_cpu() {
            None
        } else {
            Some(model.to_device(&Device::Cpu)?)
        };
        let host = host_model.as_ref().unwrap_or(&model);
        let head_layout = HeadLayout::new(host, &host.mean_rows()?)?;
        Ok(Fitter {
            texture_size,
            head_layout,
            detector: FaceDetector::from_resolver(&resolver, &Device::Cpu)?,
            landmarker: FaceLandmarker::from_resolver(&resolver, &Device::Cpu)?,
            model,
            host_model,
            identity_net,
            texture_model: self.texture_model,
            alignment,
            refine,
            face_choice: self.face_choice,
        })
    }
}

/// Fits a morphable model to photos. Build one with [`Fitter::builder`], then call
/// [`Fitter::fit`] for each photo, or [`Fitter::fit_many`] for several photos of one person.
/// A fitter is `Send` and `Sync`: threads may share one (its models load once) and fit at
/// once, each fit giving what it gives alone.
#[derive(Debug)]
pub struct Fitter {
    model: MorphableModel,
    /// A CPU copy of `model` when that lives on a GPU.
    host_model: Option<MorphableModel>,
    detector: FaceDetector,
    landmarker: FaceLandmarker,
    identity_net: Option<FaceRecognitionNet>,
    texture_model: Option<Arc<dyn TextureModel>>,
    alignment: AlignmentConfig,
    refine: RefineConfig,
    face_choice: FaceChoice,
    texture_size: usize,
    /// How the whole head is drawn from the model's texture and palette (the same for every
    /// fit and render).
    head_layout: HeadLayout,
}

/// How [`Fitter::render_turned`] draws a fitted face.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewStyle {
    /// In the fitted texture, unlit, as [`FitResult::frontal_render`].
    Textured,
    /// Grey under one light: the shape alone, as [`FitResult::geometry_render`] shows it.
    ShadedGeometry,
}

/// What a fit reports while it runs, e.g. to drive a progress bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress<'a> {
    /// A step of the fit begins.
    Step(&'a str),
    /// One iteration of the full objective ran.
    Iteration {
        /// Iteration index, from 0.
        iteration: usize,
        /// Iterations planned.
        of: usize,
        /// Its total loss.
        loss: f64,
    },
}

/// What a fit produces. Its tensors live on the CPU whatever the fitter's device: a fit's last
/// steps run there.
#[derive(Debug, Clone)]
pub struct FitResult {
    /// Camera, identity and expression.
    pub params: FitParams,
    /// Spherical-harmonic light of the photo `[3, 9]` (camera space), when the full objective
    /// ran.
    pub light: Option<Tensor>,
    /// Fitted vertices `[N, 3]` in millimetres, model coordinates (apply the camera's pose to
    /// get camera coordinates).
    pub vertices: Tensor,
    /// The fitted head, ready to export and to draw as the frontal render draws it: every
    /// vertex of the model (as `vertices`), the model's triangles but its transparent overlays
    /// (ICT's eye shadows, tear film and eyelashes), and texture coordinates into
    /// `mesh_texture`, all inside it.
    pub mesh: TexturedMesh,
    /// The texture of `mesh`, twice as wide as high: `uv_texture` on the left half (the neck
    /// below the chin fading into skin, as photos often show a collar there), on the right
    /// `eye_texture` above solid colours for the mouth's inside, the scalp (`hair_colour`) and
    /// the head beyond the UV map (the skin's).
    pub mesh_texture: RgbImage,
    /// The UV texture (image orientation, row 0 at the top): the photo where it sees the
    /// face, the fitted albedo (scaled to the photo's brightness) elsewhere, and where the
    /// photo shows something else than the face on the surface (a collar or the backdrop
    /// beside the jaw, told from the face by the cheeks' and the hair's colours). From
    /// [`Fitter::fit_many`], one texture merged from all the photos (each texel mostly from
    /// those that saw it in most detail), the same in every result.
    pub uv_texture: RgbImage,
    /// Which texels of `uv_texture` were taken from the photo, or from any of the photos
    /// (255), or filled in (0).
    pub uv_observed: image::GrayImage,
    /// The albedo UV map the full objective fitted (without the photo's shading), when it ran.
    pub albedo: Option<RgbImage>,
    /// The textured reconstruction rendered through the fitted camera, the photo's size,
    /// transparent where empty; textured from this photo alone, also after
    /// [`Fitter::fit_many`].
    pub render: RgbaImage,
    /// The untextured reconstruction, grey and lit, through the fitted camera: shows the fitted
    /// geometry (the textured render reproduces the photo where the texture came from it).
    pub geometry_render: RgbaImage,
    /// The reconstruction with a neutral expression, seen from the front.
    pub frontal_render: RgbaImage,
    /// The eye colours measured in the photo ([`EyeColours::measure`]), which paint what the
    /// photo did not show of the eyeballs in `eye_texture`.
    pub eye_colours: EyeColours,
    /// The eyeballs' texture ([`EyeTexture`]) of the renders that show them (the frontal
    /// render, the exported head): the photo's pixels where it saw them between the lids,
    /// painted eyes elsewhere; twice as wide as high. `mesh_texture` holds it too.
    pub eye_texture: RgbImage,
    /// The colour of the frontal render's scalp: the photo's above the fitted head (the mesh
    /// ends at about the hairline; the hair's volume lies beyond it), `None` where that was the
    /// background (a bald or close-cropped head), which leaves the scalp the skin's colour.
    pub hair_colour: Option<[f32; 3]>,
    /// The 68 iBUG landmarks detected on the photo, pixels.
    pub detected_landmarks: Vec<[f32; 2]>,
    /// The 68 landmarks projected with the fitted camera, pixels: the vertices the detected
    /// points were fitted to (for ICT, where the landmarker's points lie on it; otherwise the
    /// model's landmark vertices), `None` where the model has no vertex for a landmark.
    pub fitted_landmarks: Vec<Option<[f32; 2]>>,
    /// The model vertex of each of `fitted_landmarks` (for ICT, chosen for the photo's head
    /// yaw: see [`MeshCorrespondence`]).
    pub landmark_vertices: Vec<Option<u32>>,
    /// Loss history of each stage.
    pub stages: Vec<StageReport>,
    /// Wall time of each step.
    pub timings: Vec<(String, Duration)>,
}

impl FitResult {
    /// Mean distance between the fitted and the detected landmarks, as a fraction of the
    /// detected inter-ocular distance (outer eye corners, iBUG 36 and 45); `NaN` when the
    /// model has none of the landmarks.
    pub fn landmark_error(&self) -> f64 {
        let detected = &self.detected_landmarks;
        let distance = |a: [f32; 2], b: [f32; 2]| f64::from((a[0] - b[0]).hypot(a[1] - b[1]));
        let (Some(&left), Some(&right)) = (detected.get(36), detected.get(45)) else {
            return f64::NAN;
        };
        let errors: Vec<f64> = self
            .fitted_landmarks
            .iter()
            .zip(detected)
            .filter_map(|(fitted, &d)| fitted.map(|f| distance(f, d)))
            .collect();
        errors.iter().sum::<f64>() / errors.len() as f64 / distance(left, right)
    }

    /// How many of [`FitResult::detected_landmarks`] lie beyond the photo's edges: guesses of
    /// the landmarker on a face the frame cuts off, which the fit counts a tenth as much as
    /// the points it sees (its dense points there not at all), leaving that part of the face
    /// mostly to the model's prior.
    pub fn landmarks_beyond_photo(&self) -> usize {
        let (width, height) = self.render.dimensions();
        let detected = self.detected_landmarks.iter();
        detected
            .filter(|&&point| !in_photo(point, width, height))
            .count()
    }
}

/// Whether `point` (pixels) lies on a `width` × `height` photo.
fn in_photo([x, y]: [f32; 2], width: u32, height: u32) -> bool {
    (0.0..width as f32).contains(&x) && (0.0..height as f32).contains(&y)
}

/// How much a landmark the landmarker places beyond the photo's edges (on a face the frame
/// cuts off: a guess from the rest of the face) counts against one inside it; its dense points
/// beyond the edges are left out. Measured on five photos (us_congress_gpo_pd) cut below by 15,
/// 25 and 35 % of their landmarks' height, as the landmark alignment's distance from the whole
/// photo's fit (NoW protocol): all points counted alike 0.62, 0.71 and 0.89 mm; this weight
/// 0.54, 0.61 and 0.81 mm; 0 for both kinds 0.54, 0.64 and 0.92 mm (the guesses still help
/// where the mouth is cut off too).
const BEYOND_PHOTO_WEIGHT: f64 = 0.1;

/// One photo's state between the steps of a fit.
struct Observed {
    detected: Vec<[f32; 2]>,
    landmarks: ImageLandmarks,
    photo: Tensor,
}

/// A photo's fitted parameters, mesh and projection onto the UV layout, on the host.
struct Posed {
    params: FitParams,
    vertices: Tensor,
    projection: Projection,
    /// Every vertex's pixel in the photo.
    pixels: Vec<[f32; 2]>,
    /// The hair's colour in the photo ([`hair_colour`]).
    hair: Option<[f32; 3]>,
    /// What the photo shows of the eyeballs ([`EyeTexture::seen_in_photo`]).
    eyes_seen: Option<Projection>,
}

impl Fitter {
    /// A builder with every option at its default.
    pub fn builder() -> FitterBuilder {
        FitterBuilder::default()
    }

    /// The morphable model being fitted.
    pub fn model(&self) -> &MorphableModel {
        &self.model
    }

    /// The model on the CPU, for the steps that run there.
    fn host_model(&self) -> &MorphableModel {
        self.host_model.as_ref().unwrap_or(&self.model)
    }

    /// Fits one photo.
    pub fn fit(&self, image: &RgbImage) -> Result<FitResult> {
        self.fit_with_progress(image, |_| {})
    }

    /// Fits one photo, reporting progress to `observer`.
    pub fn fit_with_progress(
        &self,
        image: &RgbImage,
        observer: impl FnMut(Progress<'_>),
    ) -> Result<FitResult> {
        let mut results = self.fit_many_with_progress(std::slice::from_ref(image), observer)?;
        Ok(results.remove(0))
    }

    /// Fits several photos of one person: they share identity and texture, each has its own
    /// expression, camera and light. Returns one result per photo, in order. The identity is
    /// shared from the landmark alignment on ([`ganfit_optim::align_one_person`]), so every
    /// photo's landmarks shape it; the texture of the mesh and the frontal render is merged
    /// from every photo ([`ganfit_optim::Projection::fuse`]; where several saw a texel, those
    /// whose fitted expression moved it least count the most), while each render in its
    /// photo's view keeps that photo's colours.
    pub fn fit_many(&self, images: &[RgbImage]) -> Result<Vec<FitResult>> {
        self.fit_many_with_progress(images, |_| {})
    }

    /// [`Fitter::fit_many`], reporting progress to `observer`.
    pub fn fit_many_with_progress(
        &self,
        images: &[RgbImage],
        mut observer: impl FnMut(Progress<'_>),
    ) -> Result<Vec<FitResult>> {
        if images.is_empty() {
            return Err(Error::Config("no photos to fit".to_string()));
        }
        let count = images.len();
        for (index, image) in images.iter().enumerate() {
            check_pixel_count(image.width(), image.height(), "the photo")
                .map_err(|e| Error::from(e).in_photo(index, count))?;
        }
        let mut timings = Vec::new();
        let mut clock = Instant::now();
        let mut lap = |name: &str, timings: &mut Vec<(String, Duration)>| {
            timings.push((name.to_string(), clock.elapsed()));
            clock = Instant::now();
        };
        let mut observed = Vec::with_capacity(images.len());
        for (index, image) in images.iter().enumerate() {
            // Together: the landmark network confirms the detected face.
            observer(Progress::Step("face detection and landmarks"));
            let (_, mesh_points) = self
                .landmarker
                .locate(&self.detector, image, self.face_choice)
                .map_err(|e| Error::from(e).in_photo(index, count))?;
            let detected = mesh_points.to_ibug68().to_vec();
            lap("face detection and landmarks", &mut timings);
            let correspondence = MeshCorrespondence::for_photo(
                self.host_model(),
                &mesh_points,
                image.width(),
                image.height(),
            );
            // Points the landmarker places beyond the photo's edges, on a face the frame cuts
            // off, are its guesses (see `BEYOND_PHOTO_WEIGHT`).
            let on_photo = |point: [f32; 2]| in_photo(point, image.width(), image.height());
            let weight = |point| {
                if on_photo(point) {
                    1.0
                } else {
                    BEYOND_PHOTO_WEIGHT
                }
            };
            let landmarks = ImageLandmarks {
                vertices: correspondence.map(|c| c.landmark_vertices()),
                weights: Some(
                    correspondence
                        .map_or_else(|| vec![1.0; detected.len()], |c| c.landmark_weights())
                        .into_iter()
                        .zip(&detected)
                        .map(|(base, &point)| base * weight(point))
                        .collect(),
                ),
                points: detected
                    .iter()
                    .map(|p| Some([f64::from(p[0]), f64::from(p[1])]))
                    .collect(),
                dense: correspondence.map_or_else(Vec::new, |c| {
                    let mut dense = c.observations(&mesh_points);
                    dense.retain(|seen| on_photo(seen.pixel.map(|v| v as f32)));
                    dense
                }),
                width: image.width(),
                height: image.height(),
            };
            observed.push(Observed {
                detected,
                landmarks,
                photo: photo_tensor(image, self.model.device())?,
            });
        }
        observer(Progress::Step("landmark alignment"));
        let all_landmarks: Vec<ImageLandmarks> =
            observed.iter().map(|o| o.landmarks.clone()).collect();
        let mut alignments =
            ganfit_optim::align_one_person(self.host_model(), &all_landmarks, &self.alignment)?;
        for alignment in &mut alignments {
            alignment.params = alignment.params.to_device(self.model.device())?;
        }
        lap("landmark alignment", &mut timings);

        let refined = match &self.identity_net {
            Some(net) if self.refine.iterations > 0 => {
                observer(Progress::Step("full objective"));
                let first = &observed[0];
                let params = &alignments[0].params;
                let vertices = self.model.instance(&params.shape, &params.expression)?;
                let initial = ganfit_optim::unwrap_photo(
                    &self.model,
                    &vertices,
                    params,
                    &first.photo,
                    self.refine.texture_size,
                )?;
                let views: Vec<PhotoView<'_>> = observed
                    .iter()
                    .zip(&alignments)
                    .map(|(o, alignment)| PhotoView {
                        image: &o.photo,
                        landmarks: &o.landmarks,
                        params: &alignment.params,
                    })
                    .collect();
                let source = match &self.texture_model {
                    Some(model) => TextureSource::Model(model.as_ref()),
                    None => TextureSource::FreeUv,
                };
                let of = self.refine.iterations;
                let refinement = ganfit_optim::refine(
                    &self.model,
                    net,
                    &views,
                    &initial,
                    source,
                    &self.refine,
                    |record| {
                        observer(Progress::Iteration {
                            iteration: record.iteration,
                            of,
                            loss: record.total,
                        })
                    },
                )?;
                lap("full objective", &mut timings);
                Some(refinement)
            }
            _ => None,
        };

        observer(Progress::Step("texture and renders"));
        let params: Vec<FitParams> = match &refined {
            Some(r) => r.params.clone(),
            None => alignments.iter().map(|a| a.params.clone()).collect(),
        };
        let posed = params
            .iter()
            .zip(&observed)
            .zip(images)
            .map(|((params, observed), image)| self.posed(params, observed, image))
            .collect::<Result<Vec<_>>>()?;
        // Several photos of one person: one texture merged from all of them for the views
        // that are no photo's own (the frontal render, the exported mesh), which show the
        // face without expression: where several photos saw a texel, those whose expression
        // moved it least count the most.
        let merged = if posed.len() > 1 {
            let model = self.host_model();
            let on_face: Vec<Projection> = posed.iter().map(|p| p.projection.on_face()).collect();
            let neutral = posed
                .iter()
                .map(|p| {
                    let still = p.params.expression.zeros_like()?;
                    Ok(model.instance(&p.params.shape, &still)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let posings: Vec<(&Tensor, &Tensor)> =
                posed.iter().map(|p| &p.vertices).zip(&neutral).collect();
            let moved = surface_distances(model, &posings, self.texture_size)?;
            let photos: Vec<(&Projection, &[f32])> = on_face
                .iter()
                .zip(&moved)
                .map(|(projection, moved)| (projection, moved.as_slice()))
                .collect();
            Some(Projection::fuse(&photos)?)
        } else {
            None
        };
        // And their eyes: each eyeball's texels mostly from the photo that saw them in most
        // detail, so a photo with closed eyes borrows the others' (the eyeballs' surface does
        // not move with the expression).
        let seen_eyes: Vec<&Projection> =
            posed.iter().filter_map(|p| p.eyes_seen.as_ref()).collect();
        let merged_eyes = match seen_eyes.first() {
            Some(first) if posed.len() > 1 => {
                let still = vec![0.0; first.pixels_per_mm.len()];
                let photos: Vec<(&Projection, &[f32])> =
                    seen_eyes.iter().map(|p| (*p, still.as_slice())).collect();
                Some(Projection::fuse(&photos)?)
            }
            _ => None,
        };
        // One albedo serves every photo: the fill's background for each of their textures.
        let albedo = refined.as_ref().map(|r| rgb_image(&r.albedo)).transpose()?;
        let background = albedo
            .as_ref()
            .map(|albedo| albedo_background(albedo, self.texture_size));
        // The albedo learnt the colours of the collar and backdrop that the renders in the
        // photos' views showed on the jaw: refilled from the rest of it for the other views.
        let background_elsewhere = background.as_ref().and_then(|background| {
            let off_face: Vec<bool> = (0..self.texture_size * self.texture_size)
                .map(|texel| posed.iter().any(|p| p.projection.off_face[texel]))
                .collect();
            off_face.contains(&true).then(|| {
                let mut albedo = UvTexture {
                    size: self.texture_size,
                    rgb: background.clone(),
                    observed: off_face.iter().map(|&off| f32::from(!off)).collect(),
                };
                albedo.fill_unobserved_from_afar();
                albedo.rgb
            })
        });
        let mut results = Vec::with_capacity(images.len());
        let photos = images.iter().zip(observed).zip(alignments).zip(posed);
        for (index, (((image, observed), alignment), posed)) in photos.enumerate() {
            let mut stages = alignment.stages;
            let light = refined.as_ref().map(|r| {
                stages.push(r.report.clone());
                r.lights[index].clone()
            });
            let vertex_ids = observed.landmarks.vertex_ids(&self.model).to_vec();
            let eye_colours = EyeColours::measure(image, &observed.detected);
            let mut result = self.finish(
                image,
                posed,
                &vertex_ids,
                albedo.clone(),
                background.as_deref(),
                background_elsewhere.as_deref().or(background.as_deref()),
                eye_colours,
                merged.as_ref(),
                merged_eyes.as_ref(),
            )?;
            result.light = light;
            result.detected_landmarks = observed.detected;
            result.stages = stages;
            lap("texture and renders", &mut timings);
            result.timings = timings.clone();
            results.push(result);
        }
        Ok(results)
    }

    /// [`face_descriptor`] with this fitter's identity network; `None` when it has none (it
    /// loads one only for the full objective).
    pub fn identity_descriptor(
        &self,
        image: &RgbImage,
        landmarks: &[[f32; 2]],
    ) -> Result<Option<Vec<f32>>> {
        self.identity_net
            .as_ref()
            .map(|net| face_descriptor(net, image, landmarks, self.model.device()))
            .transpose()
    }

    /// The distance between two photos' [`Fitter::identity_descriptor`]s (`None` without the
    /// identity network), e.g. to check photos fitted as one person's.
    pub fn identity_distance(
        &self,
        (a, a_landmarks): (&RgbImage, &[[f32; 2]]),
        (b, b_landmarks): (&RgbImage, &[[f32; 2]]),
    ) -> Result<Option<f64>> {
        let a = self.identity_descriptor(a, a_landmarks)?;
        let b = self.identity_descriptor(b, b_landmarks)?;
        Ok(a.zip(b).map(|(a, b)| descriptor_distance(&a, &b)))
    }

    /// The fitted head ([`FitResult::mesh`]) with a neutral expression, and the model's
    /// expression blendshapes as morph targets weighted as fitted: written with
    /// [`export::write_glb_with_targets`](ganfit_morphable::export::write_glb_with_targets), a
    /// viewer shows the fitted face, and an engine animates it by the blendshapes' weights
    /// (ICT's blendshapes carry ARKit's names, so ARKit face tracking can drive it).
    pub fn head_with_expressions(
        &self,
        result: &FitResult,
    ) -> Result<(TexturedMesh, Vec<ganfit_morphable::export::MorphTarget>)> {
        let model = self.host_model();
        let shape = result.params.shape.to_device(model.device())?;
        let neutral = model.instance(&shape, &Tensor::zeros(0, DType::F32, model.device())?)?;
        let head = TexturedMesh {
            positions: model.mesh(&neutral)?.positions,
            ..result.mesh.clone()
        };
        Ok((head, model.expression_targets(&result.params.expression)?))
    }

    /// Renders a fitted face from the front (like [`FitResult::frontal_render`]) with another
    /// expression, e.g. one fitted to another photo: `expression` holds blendshape weights of
    /// this fitter's model.
    pub fn render_frontal(
        &self,
        result: &FitResult,
        expression: &Tensor,
        size: u32,
    ) -> Result<RgbaImage> {
        let mut view =
            self.render_turned(result, expression, &[(0.0, ViewStyle::Textured)], size)?;
        Ok(view.remove(0))
    }

    /// Renders a fitted face as [`Fitter::render_frontal`] does, once per `(yaw_deg, style)`
    /// of `views`, turned `yaw_deg` degrees about its vertical axis first: positive turns the
    /// nose towards the image's right, so the face's left cheek (on the image's right in a
    /// frontal view) turns away. Side views show the depth of the fitted shape that a frontal
    /// view hides, the more so in [`ViewStyle::ShadedGeometry`]. The face stays framed as the
    /// frontal render frames it. (One call for several views prepares the texture once.)
    pub fn render_turned(
        &self,
        result: &FitResult,
        expression: &Tensor,
        views: &[(f64, ViewStyle)],
        size: u32,
    ) -> Result<Vec<RgbaImage>> {
        if let Some((yaw, _)) = views.iter().find(|(yaw, _)| !yaw.is_finite()) {
            return Err(Error::Config(format!(
                "a view's yaw must be a number of degrees, not {yaw}"
            )));
        }
        if size == 0 || size > MAX_RENDER_SIZE {
            return Err(Error::Config(format!(
                "a render is 1 to {MAX_RENDER_SIZE} pixels on a side, not {size}"
            )));
        }
        let (width, height) = result.uv_texture.dimensions();
        let texture = UvTexture {
            size: width as usize,
            rgb: result
                .uv_texture
                .as_raw()
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect(),
            observed: vec![1.0; (width * height) as usize],
        };
        if width != height {
            return Err(Error::Config(format!(
                "the result's texture is {width}×{height}; fitted textures are square"
            )));
        }
        let model = self.host_model();
        let vertices = model.instance(
            &result.params.shape.to_device(model.device())?,
            &expression.to_dtype(DType::F32)?.to_device(model.device())?,
        )?;
        let eyes = EyeTexture::from_image(&result.eye_texture).ok_or_else(|| {
            Error::Config(format!(
                "the result's eye texture is {}×{}; fitted eye textures are twice as wide as high",
                result.eye_texture.width(),
                result.eye_texture.height()
            ))
        })?;
        let view = View::new(
            model,
            &self.head_layout,
            &texture,
            &eyes,
            result.hair_colour,
            Seen::FromFront,
        )?;
        views
            .iter()
            .map(|&(yaw, style)| view.render_turned(&vertices, yaw, style, size))
            .collect()
    }

    /// A fitted photo's mesh, and the photo projected onto its UV layout, on the host.
    fn posed(&self, params: &FitParams, observed: &Observed, image: &RgbImage) -> Result<Posed> {
        let model = self.host_model();
        let params = params.to_device(model.device())?;
        // The photo's tensor as the full objective used it: no copy on the CPU.
        let photo = observed.photo.to_device(model.device())?;
        let vertices = model.instance(&params.shape, &params.expression)?;
        let pixels = vertex_pixels(&vertices, &params)?;
        let head_pixels: Vec<[f32; 2]> = match model.vertex_set("skin") {
            Ok(skin) => skin.iter().map(|&v| pixels[v as usize]).collect(),
            Err(_) => pixels.clone(),
        };
        // From the chin to the top of the nose's bridge (iBUG 8 and 27): the photo need not
        // be upright.
        let up = match observed.detected.as_slice() {
            detected if detected.len() == 68 => {
                let (chin, bridge) = (detected[8], detected[27]);
                [bridge[0] - chin[0], bridge[1] - chin[1]]
            }
            _ => [0.0, -1.0],
        };
        let hair = hair_colour(image, &head_pixels, up);
        let off_face = crate::off_face::off_face_mask(image, &observed.detected, hair)
            .map(|mask| move |column, row| mask.contains(column, row));
        let projection = ganfit_optim::project_photo_with_view(
            model,
            &vertices,
            &params,
            &photo,
            self.texture_size,
            off_face
                .as_ref()
                .map(|mask| mask as &(dyn Fn(usize, usize) -> bool + Sync)),
        )?;
        let eyes_seen = match &self.head_layout.eyes {
            Some(eyes) => EyeTexture::seen_in_photo(
                eyes,
                self.head_layout.triangles.as_slice(),
                &vertices,
                &params,
                &photo,
                &observed.detected,
                eye_side(self.texture_size),
            )?,
            None => None,
        };
        Ok(Posed {
            params,
            vertices,
            projection,
            pixels,
            hair,
            eyes_seen,
        })
    }

    /// Geometry, texture and renders of a fitted photo. `background` (the albedo at the
    /// texture's size) fills what the photo did not see in the render in its view,
    /// `background_elsewhere` (the same without what the photos saw off the face) in the views
    /// away from its camera; `merged` and `merged_eyes`, the skin's and the eyeballs' textures
    /// of several photos of the person, stand for the photo's own in those views.
    fn finish(
        &self,
        image: &RgbImage,
        posed: Posed,
        landmark_vertices: &[Option<u32>],
        albedo: Option<RgbImage>,
        background: Option<&[f32]>,
        background_elsewhere: Option<&[f32]>,
        eye_colours: EyeColours,
        merged: Option<&UvTexture>,
        merged_eyes: Option<&UvTexture>,
    ) -> Result<FitResult> {
        let model = self.host_model();
        let Posed {
            params,
            vertices,
            projection,
            pixels,
            hair,
            eyes_seen,
        } = posed;
        let fitted_landmarks = landmark_vertices
            .iter()
            .map(|id| id.map(|id| pixels[id as usize]))
            .collect();
        // Through the photo's camera the unseen texels it shows are grazing ones, which the
        // albedo was fitted to; from elsewhere (the frontal render, the exported mesh) the far
        // side of a turned head is better shown by the seen side's mirror image. The render in
        // the photo's view lies on the photo, which shows its collar and backdrop anyway; the
        // views from elsewhere leave what the photo saw off the face to the fill.
        let (in_photo, texture) = match merged {
            None if !projection.off_face.contains(&true) => {
                projection.texture.filled_both_ways(background)
            }
            _ => {
                let elsewhere = merged
                    .cloned()
                    .unwrap_or_else(|| projection.on_face().texture);
                let (mut in_photo, mut elsewhere) = (projection.texture, elsewhere);
                rayon::join(
                    || in_photo.fill_unobserved(background),
                    || elsewhere.fill_unobserved_mirrored(background_elsewhere),
                );
                (in_photo, elsewhere)
            }
        };
        let eyes = {
            let colours = eye_colours.toned_like(cheek_colour(&texture.rgb, texture.size));
            let side = eye_side(self.texture_size);
            match merged_eyes.or(eyes_seen.as_ref().map(|p| &p.texture)) {
                Some(seen) => EyeTexture::blended(seen, colours, side),
                None => EyeTexture::painted(colours, side),
            }
        };
        let (photo_renders, from_front) = rayon::join(
            || -> Result<_> {
                let view = View::new(
                    model,
                    &self.head_layout,
                    &in_photo,
                    &eyes,
                    None,
                    Seen::InPhoto,
                )?;
                let (width, height) = image.dimensions();
                Ok((
                    view.render(&vertices, &params, width, height, false)?,
                    view.render(&vertices, &params, width, height, true)?,
                ))
            },
            || -> Result<_> {
                let neutral = model.instance(&params.shape, &params.expression.zeros_like()?)?;
                let view = View::new(
                    model,
                    &self.head_layout,
                    &texture,
                    &eyes,
                    hair,
                    Seen::FromFront,
                )?;
                Ok((
                    view.render_frontal(&neutral, FRONTAL_SIZE)?,
                    view.head_mesh(&vertices)?,
                ))
            },
        );
        let ((render, geometry_render), (frontal_render, (mesh, mesh_texture))) =
            (photo_renders?, from_front?);
        Ok(FitResult {
            params,
            light: None,
            vertices,
            mesh,
            mesh_texture,
            uv_texture: rgb_image_of(&texture.rgb, texture.size, texture.size)?,
            uv_observed: image::GrayImage::from_fn(
                texture.size as u32,
                texture.size as u32,
                |x, y| {
                    image::Luma([
                        (texture.observed[y as usize * texture.size + x as usize] * 255.0) as u8,
                    ])
                },
            ),
            albedo,
            render,
            geometry_render,
            frontal_render,
            eye_colours,
            eye_texture: eyes.to_image(),
            hair_colour: hair,
            detected_landmarks: Vec::new(),
            fitted_landmarks,
            landmark_vertices: landmark_vertices.to_vec(),
            stages: Vec::new(),
            timings: Vec::new(),
        })
    }
}

/// Side of each eye's square in the eyes' texture that goes with a UV texture of
/// `texture_size`: half the side of the eye's square in the atlas (whose right half holds the
/// eyes in its upper half), still some ten texels per photo pixel for an eye 30 pixels wide,
/// and a quarter of the projection's work.
fn eye_side(texture_size: usize) -> usize {
    (texture_size / 4).max(1)
}

/// `[H, W, 3]` in `[0, 1]` → an RGB image.
fn rgb_image(rgb: &Tensor) -> Result<RgbImage> {
    let (h, w, c) = rgb.dims3()?;
    if c != 3 {
        return Err(Error::Config(format!(
            "a {h}×{w}×{c} tensor is no RGB image"
        )));
    }
    let values: Vec<f32> = rgb.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    rgb_image_of(&values, w, h)
}

/// `width × height × 3` values in `[0, 1]`, row-major → an RGB image.
fn rgb_image_of(values: &[f32], width: usize, height: usize) -> Result<RgbImage> {
    use rayon::prelude::*;
    let bytes = values.par_iter().map(|&v| to_byte(v)).collect();
    RgbImage::from_raw(width as u32, height as u32, bytes).ok_or_else(|| {
        Error::Config(format!(
            "{} values are no {width}×{height} RGB image",
            values.len()
        ))
    })
}

/// The fitted albedo at `size × size` texels, as the background for the texels the photo
/// did not see (see [`UvTexture::fill_unobserved`]): the far side of a turned head gets the
/// person's skin, not an average colour.
fn albedo_background(albedo: &RgbImage, size: usize) -> Vec<f32> {
    let size = size as u32;
    let albedo = image::imageops::resize(albedo, size, size, image::imageops::FilterType::Triangle);
    albedo
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 255.0)
        .collect()
}

/// Every vertex in the fitted camera's coordinates, millimetres.
fn camera_space(vertices: &Tensor, params: &FitParams) -> Result<Vec<Vec<f32>>> {
    Ok(ganfit_render::camera_from_world(
        &vertices.to_dtype(DType::F32)?,
        &params.rotation.unsqueeze(0)?,
        &params.translation.unsqueeze(0)?,
    )?
    .squeeze(0)?
    .to_vec2::<f32>()?)
}

/// The pixel a camera-space point projects to.
fn pixel_of(p: &[f32], k: &Intrinsics) -> [f32; 2] {
    [
        (k.fx * f64::from(p[0] / p[2]) + k.cx) as f32,
        (k.fy * f64::from(p[1] / p[2]) + k.cy) as f32,
    ]
}

/// Pixels of every vertex under the fitted camera.
fn vertex_pixels(vertices: &Tensor, params: &FitParams) -> Result<Vec<[f32; 2]>> {
    let k = &params.intrinsics;
    Ok(camera_space(vertices, params)?
        .iter()
        .map(|p| pixel_of(p, k))
        .collect())
}

/// The pixel rectangle `(x0, y0, x1, y1)` (end exclusive, within `width` × `height`) that
/// holds every vertex projected through the fitted camera, with a pixel to spare for the
/// antialiased edges; the whole image where a vertex lies at or behind the near plane.
fn projected_bounds(
    vertices: &Tensor,
    params: &FitParams,
    width: u32,
    height: u32,
) -> Result<(u32, u32, u32, u32)> {
    let (near, _) = ganfit_optim::DEPTH_RANGE_MM;
    let points = camera_space(vertices, params)?;
    if points
        .iter()
        .any(|p| p[2].is_nan() || f64::from(p[2]) <= near)
    {
        return Ok((0, 0, width, height));
    }
    let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
    for p in points.iter().map(|p| pixel_of(p, &params.intrinsics)) {
        for axis in 0..2 {
            lo[axis] = lo[axis].min(p[axis]);
            hi[axis] = hi[axis].max(p[axis]);
        }
    }
    let clamp = |v: f32, limit: u32| v.clamp(0.0, limit as f32) as u32;
    Ok((
        clamp(lo[0].floor() - 1.0, width),
        clamp(lo[1].floor() - 1.0, height),
        clamp(hi[0].ceil() + 2.0, width),
        clamp(hi[1].ceil() + 2.0, height),
    ))
}

/// Side of the frontal render in pixels.
const FRONTAL_SIZE: u32 = 512;

/// The largest side [`Fitter::render_turned`] draws: the renderer keeps several float planes of
/// the image, 64 MiB each at this size.
const MAX_RENDER_SIZE: u32 = 4096;

/// `[H, W, 3]` f32 in `[0, 1]`.
/// dlib's 128-number descriptor of a photo's face, aligned by its 68 landmarks in iBUG order
/// (e.g. a fit's [`FitResult::detected_landmarks`]), computed by `net` on `device` (where the
/// net is): faces whose descriptors lie under 0.6 apart ([`descriptor_distance`]) dlib takes
/// for one person.
pub fn face_descriptor(
    net: &FaceRecognitionNet,
    image: &RgbImage,
    landmarks: &[[f32; 2]],
    device: &Device,
) -> Result<Vec<f32>> {
    let points: Vec<[f64; 2]> = landmarks
        .iter()
        .map(|p| [f64::from(p[0]), f64::from(p[1])])
        .collect();
    let (w, h) = image.dimensions();
    let warp = ganfit_losses::align::ChipWarp::dlib_chip(
        &points,
        h as usize,
        w as usize,
        DType::F32,
        device,
    )?;
    let values: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v)).collect();
    let pixels = Tensor::from_vec(values, (1, h as usize, w as usize, 3), device)?;
    let chip = warp.apply_channels_last(&pixels)?;
    Ok(net.embed(&chip)?.flatten_all()?.to_vec1()?)
}

/// Euclidean distance between two identity descriptors.
pub fn descriptor_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn photo_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 255.0)
        .collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?)
}

fn to_byte(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// The textured mesh, ready to draw through any camera.
struct View<'a> {
    model: &'a MorphableModel,
    /// Triangles and atlas coordinates of the whole head, eyes and mouth included.
    layout: &'a HeadLayout,
    /// The UV map beside the palette of eyes, mouth and the head off the UV tile.
    atlas: Tensor,
}

/// Where a [`View`] is drawn from.
#[derive(Debug, Clone, Copy)]
enum Seen {
    /// Through the photo's camera ([`View::render`]): the skin's texels as they are.
    InPhoto,
    /// From the front ([`View::render_frontal`]): the neck fading into bare skin.
    FromFront,
}

impl<'a> View<'a> {
    fn new(
        model: &'a MorphableModel,
        layout: &'a HeadLayout,
        texture: &UvTexture,
        eyes: &EyeTexture,
        hair: Option<[f32; 3]>,
        seen: Seen,
    ) -> Result<Self> {
        let (rgb, side) = (&texture.rgb, texture.size);
        let skin = cheek_colour(rgb, side);
        let hair = hair.unwrap_or(skin);
        let atlas = match seen {
            Seen::InPhoto => HeadLayout::atlas(rgb, side, eyes, skin, hair)?,
            Seen::FromFront => layout.bare_neck_atlas(model, rgb, side, eyes, skin, hair)?,
        };
        Ok(View {
            model,
            layout,
            atlas,
        })
    }
}

impl View<'_> {
    /// The head as this view draws it from elsewhere than the photo's camera, posed as
    /// `vertices`, and its texture: for export, where a viewer should show what the frontal
    /// render shows (not ICT's eye shells drawn opaque over the eyes, nor the face's texture
    /// stretched over the eyeballs, teeth and the head beyond the UV map's tile).
    fn head_mesh(&self, vertices: &Tensor) -> Result<(TexturedMesh, RgbImage)> {
        let mesh = self.layout.bare_neck_mesh(self.model, vertices)?;
        Ok((mesh, rgb_image(&self.atlas)?))
    }

    fn draw(
        &self,
        vertices: &Tensor,
        rotation: &Tensor,
        translation: &Tensor,
        camera: ganfit_render::Camera,
        shaded_geometry: bool,
        whole_head: bool,
    ) -> Result<RgbaImage> {
        let device = Device::Cpu;
        let (triangles, uv_triangles) = if whole_head {
            (&self.layout.triangles, &self.layout.uv_triangles_bare_neck)
        } else {
            (&self.layout.textured_skin.0, &self.layout.textured_skin.1)
        };
        let grey = Tensor::full(0.75f32, (self.model.n_vertices(), 3), &device)?;
        let light = PhongLight {
            direction: Tensor::new(&[[0.3f32, -0.4, -1.0]], &device)?,
            color: Tensor::new(&[[0.7f32, 0.7, 0.7]], &device)?,
            ambient: Tensor::new(&[[0.35f32, 0.35, 0.35]], &device)?,
            specular: 0.1,
            shininess: 20.0,
        };
        let (appearance, lighting) = if shaded_geometry {
            (Appearance::VertexColors(&grey), Lighting::Phong(&light))
        } else {
            (
                Appearance::Texture {
                    texture: &self.atlas,
                    uv: &self.layout.uv,
                    uv_triangles: Some(uv_triangles),
                    wrap: WrapMode::Clamp,
                },
                Lighting::Unlit,
            )
        };
        let renderer = Renderer::new(
            triangles.clone(),
            camera,
            RenderOptions {
                // The mouth and eye sockets are seen from inside; the depth test suffices.
                cull_backfaces: false,
                antialias: true,
            },
        );
        let rendering = renderer.render(&Scene {
            vertices: &vertices.to_dtype(DType::F32)?.to_device(&device)?,
            rotation: &rotation.to_device(&device)?.unsqueeze(0)?,
            translation: &translation.to_device(&device)?.unsqueeze(0)?,
            appearance,
            lighting,
        })?;
        let rgb: Vec<f32> = rendering.image.flatten_all()?.to_vec1()?;
        let alpha: Vec<f32> = rendering.mask.flatten_all()?.to_vec1()?;
        let (w, h) = (camera.width as u32, camera.height as u32);
        Ok(RgbaImage::from_fn(w, h, |x, y| {
            let p = y as usize * camera.width + x as usize;
            let a = alpha[p];
            // The renderer composites onto black; un-premultiply so the PNG's alpha blends right.
            let colour = |c: usize| to_byte(if a > 0.0 { rgb[p * 3 + c] / a } else { 0.0 });
            image::Rgba([colour(0), colour(1), colour(2), to_byte(a)])
        }))
    }

    /// Through the photo's camera at the photo's size. Only the rectangle the mesh projects
    /// into is rasterised (a face fills a small part of a large photo; rendering all of a
    /// 12-megapixel frame cost seconds and gigabytes); the rest stays transparent.
    fn render(
        &self,
        vertices: &Tensor,
        params: &FitParams,
        width: u32,
        height: u32,
        shaded_geometry: bool,
    ) -> Result<RgbaImage> {
        let k = &params.intrinsics;
        let (near, far) = ganfit_optim::DEPTH_RANGE_MM;
        let (x0, y0, x1, y1) = projected_bounds(vertices, params, width, height)?;
        let mut canvas = RgbaImage::new(width, height);
        if x1 <= x0 || y1 <= y0 {
            return Ok(canvas);
        }
        let camera = ganfit_render::Camera::new(
            k.fx,
            k.fy,
            k.cx - f64::from(x0),
            k.cy - f64::from(y0),
            (x1 - x0) as usize,
            (y1 - y0) as usize,
            near,
            far,
        )?;
        // The textured skin only: laid onto the photo, its own eyes, teeth and hair show
        // through.
        let window = self.draw(
            vertices,
            &params.rotation,
            &params.translation,
            camera,
            shaded_geometry,
            false,
        )?;
        image::imageops::replace(&mut canvas, &window, i64::from(x0), i64::from(y0));
        Ok(canvas)
    }

    /// Seen from straight ahead (see [`ganfit_optim::frontal_camera`]), framing the face.
    fn render_frontal(&self, vertices: &Tensor, size: u32) -> Result<RgbaImage> {
        self.render_turned(vertices, 0.0, ViewStyle::Textured, size)
    }

    /// [`View::render_frontal`] of the head turned `yaw_deg` about the vertical axis through
    /// the face's centre (see [`Fitter::render_turned`]).
    fn render_turned(
        &self,
        vertices: &Tensor,
        yaw_deg: f64,
        style: ViewStyle,
        size: u32,
    ) -> Result<RgbaImage> {
        let face = |vertices: &Tensor| -> Result<Tensor> {
            Ok(match self.model.vertex_set("face") {
                Ok(face) => {
                    let ids = Tensor::from_slice(face, face.len(), vertices.device())?;
                    vertices.index_select(&ids, 0)?
                }
                Err(_) => vertices.clone(),
            })
        };
        let turned = if yaw_deg == 0.0 {
            vertices.clone()
        } else {
            let framed = face(vertices)?;
            let lo = framed.min(0)?;
            let centre = ((framed.max(0)? + &lo)? * 0.5)?.unsqueeze(0)?;
            let (sin, cos) = yaw_deg.to_radians().sin_cos();
            // Rows are points, so this is the transpose of the rotation about the vertical axis
            // that turns the face's forward, (0, 0, 1), to (sin, 0, cos).
            let turn = Tensor::new(
                &[
                    [cos as f32, 0.0, -sin as f32],
                    [0.0, 1.0, 0.0],
                    [sin as f32, 0.0, cos as f32],
                ],
                vertices.device(),
            )?;
            (vertices.broadcast_sub(&centre)?.matmul(&turn)?).broadcast_add(&centre)?
        };
        let (camera, rotation, translation) =
            ganfit_optim::frontal_camera(&face(&turned)?, size as usize)?;
        let shaded = style == ViewStyle::ShadedGeometry;
        self.draw(&turned, &rotation, &translation, camera, shaded, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params_at_depth(depth: f32) -> FitParams {
        let zero = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        FitParams {
            shape: zero(0),
            expression: zero(0),
            rotation: zero(3),
            translation: Tensor::new(&[0.0f32, 0.0, depth], &Device::Cpu).unwrap(),
            intrinsics: Intrinsics {
                fx: 1000.0,
                fy: 1000.0,
                cx: 320.0,
                cy: 240.0,
            },
        }
    }

    #[test]
    fn projected_bounds_hold_every_vertex_or_the_whole_image() {
        let vertices = Tensor::new(
            &[[-50.0f32, -20.0, 0.0], [30.0, 40.0, 0.0], [0.0, 0.0, 10.0]],
            &Device::Cpu,
        )
        .unwrap();
        // At 500 mm the corners land on (220, 200) and (380, 320).
        let bounds = projected_bounds(&vertices, &params_at_depth(500.0), 640, 480).unwrap();
        assert_eq!(bounds, (219, 199, 382, 322));
        // Clipped to the image when the face runs off it.
        let near = projected_bounds(&vertices, &params_at_depth(60.0), 640, 480).unwrap();
        assert_eq!(near, (0, 0, 640, 480));
        // A vertex behind the near plane projects nowhere sensible: the whole image is drawn.
        let behind = projected_bounds(&vertices, &params_at_depth(5.0), 640, 480).unwrap();
        assert_eq!(behind, (0, 0, 640, 480));
    }
}
