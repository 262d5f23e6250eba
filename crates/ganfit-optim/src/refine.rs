//! GANFIT's second stage: the full objective through the differentiable renderer.
//!
//! Starting from the landmark alignment, gradient descent moves identity, expression, camera
//! pose, light and texture together to minimise
//! `λ_id·L_id(R) + λ̂_id·L_id(R̂) + λ_con·L_con + λ_pix·L_pix + λ_lan·L_lan + priors`, where R is
//! the reconstruction rendered through each photo's camera and composited onto the photo, and
//! R̂ the same face with a neutral expression, seen from the front under even light. Identity
//! and content terms compare dlib's face-recognition descriptors and feature maps of the photo's
//! and the renders' face chips. Several photos of one person share identity and texture; each
//! has its own expression, pose and light.

use candle_core::{DType, Device, Tensor, Var};
use ganfit_losses::align::{ChipWarp, SimilarityTransform};
use ganfit_losses::identity::{FaceFeatures, FaceRecognitionNet};
use ganfit_losses::losses::{
    LandmarkWeights, content_loss, gaussian_prior, identity_loss, landmark_loss, pixel_loss,
};
use ganfit_morphable::MorphableModel;
use ganfit_render::{
    Appearance, Camera, Lighting, RenderOptions, Renderer, Scene, Triangles, WrapMode,
    camera_from_world, sh_irradiance_basis,
};
use ganfit_texture::TextureModel;

use crate::align::{Correspondence, correspondences};
use crate::{
    DEPTH_RANGE_MM, FitParams, ImageLandmarks, IterationRecord, Loss, OptimError, ParamGroup,
    StageConfig, StageReport, UvTexture, run_stage,
};

/// The weights λ of the full objective's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct LossWeights {
    /// `λ_id`: identity loss (1 − cosine of dlib descriptors) of the render R against the photo.
    pub identity: f64,
    /// `λ̂_id`: identity loss of the frontal, neutral, evenly lit render R̂ against the photo.
    pub frontal_identity: f64,
    /// `λ_con`: content loss on the face-recognition network's early feature maps.
    pub content: f64,
    /// `λ_pix`: mean colour distance between R composited on the photo and the photo.
    pub pixel: f64,
    /// `λ_lan`: landmark loss (squared distance over the squared landmark box diagonal).
    pub landmark: f64,
    /// Weight of `‖p_s‖²` (identity coefficients, standard deviations).
    pub shape_prior: f64,
    /// Weight of `‖p_e‖²` (expression blendshape weights).
    pub expression_prior: f64,
    /// Weight of the light's distance from white ambient light.
    pub light_prior: f64,
    /// Texture regulariser: the latent prior of a [`TextureModel`], or for a free UV map the
    /// mean squared difference of neighbouring texels (smoothness).
    pub texture_prior: f64,
    /// Free UV map only: mean squared difference between the map and its left–right mirror
    /// image (the face's UV layout is mirror-symmetric about `u = 0.5`).
    pub texture_symmetry: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            // Off by default with a free UV map, whose texels the identity gradient may not
            // move (see `Problem::loss`): the term then steers only shape, pose and light
            // towards whatever dlib's network prefers in the photo's view. On 57 unseen shared
            // photos (`ganfit bench accuracy --chips`), λ_id 0.2 → 0 with λ̂_id kept at 0.2:
            // landmark error 1.93 → 1.84 % of the inter-ocular distance (51 of 57 lower), the
            // frontal render's dlib distance to the photo 0.307 → 0.299 (37 lower) and, for a
            // second recogniser that is not in the loss (FaceRes, tools/bench/
            // second-recogniser), 0.163 → 0.161 (36 lower); the render's own distances
            // unchanged (dlib 0.064, FaceRes 0.011). A texture model's latent takes the term,
            // as in GANFIT: give it a weight there.
            identity: 0.0,
            frontal_identity: 0.2,
            content: 0.05,
            pixel: 0.1,
            // As in the alignment (see `AlignmentConfig`): the landmark term and the priors
            // weighted as a Gaussian MAP estimate for a detector noise of about 1.4 %.
            landmark: 1.0,
            shape_prior: 3e-6,
            expression_prior: 3e-5,
            light_prior: 1e-3,
            texture_prior: 1.0,
            texture_symmetry: 0.05,
        }
    }
}

/// Iterations, weights, learning rates and resolutions of the full objective.
#[derive(Debug, Clone, PartialEq)]
pub struct RefineConfig {
    /// Gradient steps.
    pub iterations: usize,
    /// The λ's.
    pub weights: LossWeights,
    /// Side in pixels of the square crop around the face in which R is rendered and compared.
    pub crop_size: usize,
    /// Side in texels of a free UV map (ignored for a [`TextureModel`]).
    pub texture_size: usize,
    /// Learning rate of the identity coefficients.
    pub shape_lr: f64,
    /// Learning rate of the expression coefficients.
    pub expression_lr: f64,
    /// Learning rate of the rotation (radians, axis-angle).
    pub rotation_lr: f64,
    /// Learning rate of the translation (millimetres).
    pub translation_lr: f64,
    /// Learning rate of the spherical-harmonic light coefficients.
    pub light_lr: f64,
    /// Learning rate of a free UV map's texel values.
    pub texture_lr: f64,
    /// Learning rate of a texture model's latent (whitened: a unit is one standard deviation).
    pub latent_lr: f64,
    /// Seed of a texture model's starting latent where the model cannot encode the photo's
    /// unwrap (a GAN): a draw from its prior.
    pub seed: u64,
    /// Weight of the dense correspondences in the landmark term (see
    /// `AlignmentConfig::dense_weight`).
    pub dense_weight: f64,
}

impl Default for RefineConfig {
    fn default() -> Self {
        RefineConfig {
            iterations: 50,
            weights: LossWeights::default(),
            crop_size: 192,
            // The renders cover the face with about 120 px: finer texels get gradients only
            // from the identity network, which turns them into noise.
            texture_size: 128,
            // Adam moves every coefficient by about its rate on the first steps, whatever the
            // gradient: the rates are small enough that this stays below a millimetre or so.
            shape_lr: 0.01,
            expression_lr: 0.005,
            rotation_lr: 0.0005,
            translation_lr: 0.3,
            light_lr: 0.003,
            texture_lr: 0.002,
            latent_lr: 0.05,
            seed: 0,
            dense_weight: 1.0,
        }
    }
}

/// Where the texture comes from during the fit.
#[derive(Debug, Clone, Copy, Default)]
pub enum TextureSource<'a> {
    /// A UV map optimised texel by texel under smoothness and symmetry priors, starting from
    /// the photo projected onto the aligned mesh.
    #[default]
    FreeUv,
    /// A learned texture model (the GAN, or PCA); its latent is optimised.
    Model(&'a dyn TextureModel),
}

/// One photo of the person, with its landmarks and its landmark alignment.
#[derive(Debug, Clone, Copy)]
pub struct PhotoView<'a> {
    /// RGB `[H, W, 3]` in `[0, 1]`.
    pub image: &'a Tensor,
    /// The detected landmarks, in the model's landmark order.
    pub landmarks: &'a ImageLandmarks,
    /// The alignment's camera and coefficients (the start point).
    pub params: &'a FitParams,
}

/// The outcome of the full objective.
#[derive(Debug, Clone)]
pub struct Refinement {
    /// Camera and coefficients per photo; the identity coefficients are shared.
    pub params: Vec<FitParams>,
    /// Spherical-harmonic light per photo, `[3, 9]` (RGB × coefficients, camera space; see
    /// `ganfit_render::shade_sh`).
    pub lights: Vec<Tensor>,
    /// The fitted albedo as a UV map `[T, T, 3]` in `[0, 1]`, image orientation (row 0 at the
    /// top, `v = 1`).
    pub albedo: Tensor,
    /// The texture model's fitted latent, when a model was used.
    pub latent: Option<Tensor>,
    /// The stage's history.
    pub report: StageReport,
}

/// Mid-grey background of the frontal render: R̂ has no photo behind it.
const FRONTAL_BACKGROUND: f64 = 0.5;

/// The face crop is this many times the landmarks' larger extent: room for forehead, ears and
/// chin, whose silhouettes carry shape information.
const CROP_MARGIN: f64 = 1.6;

/// The feature maps the content loss compares: after the stem and the first two residual
/// stages. Deeper maps are nearly the descriptor itself, which the identity loss already uses.
const CONTENT_MAPS: usize = 3;

/// Runs GANFIT's full objective on one or more photos of one person.
///
/// `model` must be the model the photos were aligned with; the fit renders its `face` region
/// (the whole model if it names none). `initial_texture` (the photo projected onto the aligned
/// mesh) starts a free UV map. `observer` sees every iteration.
pub fn refine(
    model: &MorphableModel,
    net: &FaceRecognitionNet,
    photos: &[PhotoView<'_>],
    initial_texture: &UvTexture,
    texture: TextureSource<'_>,
    config: &RefineConfig,
    observer: impl FnMut(&IterationRecord),
) -> Result<Refinement, OptimError> {
    let Some(first) = photos.first() else {
        return Err(OptimError::InvalidInput(
            "the full objective needs at least one photo".to_string(),
        ));
    };
    if config.crop_size < 32 || config.texture_size < 8 {
        return Err(OptimError::InvalidInput(format!(
            "crop size {} (needs ≥ 32) or texture size {} (needs ≥ 8) too small",
            config.crop_size, config.texture_size
        )));
    }
    let face_ids: Vec<u32> = match model.vertex_set("face") {
        Ok(ids) => ids.to_vec(),
        Err(_) => (0..model.n_vertices() as u32).collect(),
    };
    let face = model.subset_model("face", &face_ids)?;
    let mut to_face = vec![None; model.n_vertices()];
    for (new, &old) in face_ids.iter().enumerate() {
        to_face[old as usize] = Some(new as u32);
    }
    let device = face.device().clone();
    let landmark_ids: Vec<Option<u32>> = first
        .landmarks
        .vertex_ids(model)
        .iter()
        .map(|id| *to_face.get((*id)? as usize)?)
        .collect();
    let scene = SceneData::new(&face, &landmark_ids, &device)?;
    let views = photos
        .iter()
        .map(|photo| {
            let pairs = correspondences(model, photo.landmarks, config.dense_weight)?;
            ViewTarget::new(
                photo,
                &pairs,
                &to_face,
                &face,
                &scene,
                net,
                config.crop_size,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let frontal = FrontalTarget::new(&face, first.params, &scene, config.crop_size)?;
    let photo_embeddings = Tensor::cat(
        &views
            .iter()
            .map(|v| v.features.embedding.clone())
            .collect::<Vec<_>>(),
        0,
    )?;
    // What each network input is compared with: its photo, and for the frontal render (the
    // last input) the photos' mean descriptor.
    let identity_targets =
        Tensor::cat(&[&photo_embeddings, &photo_embeddings.mean_keepdim(0)?], 0)?;

    // Each photo's alignment estimated the identity on its own; start from their mean.
    let shapes = photos
        .iter()
        .map(|p| p.params.shape.to_dtype(DType::F32)?.to_device(&device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let shape = Var::from_tensor(&Tensor::stack(&shapes, 0)?.mean(0)?)?;
    let per_photo = photos
        .iter()
        .map(|photo| PhotoVars::new(photo.params, &device))
        .collect::<Result<Vec<_>, _>>()?;
    let texture_vars = TextureVars::new(texture, initial_texture, config, &device)?;

    let per_photo_group = |name: &str, var: fn(&PhotoVars) -> &Var, learning_rate: f64| {
        ParamGroup::new(
            name,
            per_photo.iter().map(|p| var(p).clone()).collect(),
            learning_rate,
        )
    };
    let groups = [
        ParamGroup::new("shape", vec![shape.clone()], config.shape_lr),
        per_photo_group("expression", |p| &p.expression, config.expression_lr)
            .bounded_below(Some(crate::MIN_EXPRESSION_WEIGHT)),
        per_photo_group("rotation", |p| &p.rotation, config.rotation_lr),
        per_photo_group("translation", |p| &p.translation, config.translation_lr),
        per_photo_group("light", |p| &p.light, config.light_lr),
        ParamGroup::new(
            "texture",
            vec![texture_vars.var.clone()],
            match texture_vars.model {
                Some(_) => config.latent_lr,
                None => config.texture_lr,
            },
        ),
    ];

    let problem = Problem {
        face: &face,
        net,
        scene: &scene,
        views: &views,
        frontal: &frontal,
        identity_targets: &identity_targets,
        weights: &config.weights,
    };
    let objective = |_: usize| problem.loss(&shape, &per_photo, &texture_vars);
    let stage = StageConfig::new("full objective", config.iterations);
    let report = run_stage(&stage, &groups, objective, observer)?;

    let params = photos
        .iter()
        .zip(&per_photo)
        .map(|(photo, vars)| -> Result<FitParams, OptimError> {
            Ok(FitParams {
                shape: shape.as_tensor().copy()?,
                expression: vars.expression.as_tensor().copy()?,
                rotation: vars.rotation.as_tensor().copy()?,
                translation: vars.translation.as_tensor().copy()?,
                intrinsics: photo.params.intrinsics,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Refinement {
        params,
        lights: per_photo
            .iter()
            .map(|p| p.light.as_tensor().squeeze(0)?.copy())
            .collect::<candle_core::Result<_>>()?,
        albedo: texture_vars.albedo()?.detach(),
        latent: texture_vars
            .model
            .map(|_| texture_vars.var.as_tensor().detach()),
        report,
    })
}

/// Geometry and texture coordinates shared by every render.
struct SceneData {
    triangles: Triangles,
    uv_triangles: Triangles,
    /// `(u, 1 − v)`: the texture op puts `v = 0` on row 0, the UV map has `v = 1` there.
    uv: Tensor,
    /// Face-model vertex of each landmark, and the landmark's index in the model's order.
    landmark_vertices: Tensor,
    landmark_slots: Vec<usize>,
}

impl SceneData {
    /// `landmark_ids`: the face-model vertex of each landmark the photos' points show.
    fn new(
        face: &MorphableModel,
        landmark_ids: &[Option<u32>],
        device: &Device,
    ) -> Result<Self, OptimError> {
        let uv: Vec<f32> = face.uvs().iter().flat_map(|&[u, v]| [u, 1.0 - v]).collect();
        let (slots, ids): (Vec<usize>, Vec<u32>) = landmark_ids
            .iter()
            .enumerate()
            .filter_map(|(slot, id)| Some((slot, (*id)?)))
            .unzip();
        Ok(SceneData {
            triangles: Triangles::new(face.triangles().to_vec(), face.n_vertices())?,
            uv_triangles: Triangles::new(face.uv_triangles().to_vec(), face.uvs().len())?,
            uv: Tensor::from_vec(uv, (face.uvs().len(), 2), device)?,
            landmark_vertices: Tensor::from_vec(ids, slots.len(), device)?,
            landmark_slots: slots,
        })
    }

    /// The face textured with the UV map `albedo`.
    fn appearance<'a>(&'a self, albedo: &'a Tensor) -> Appearance<'a> {
        Appearance::Texture {
            texture: albedo,
            uv: &self.uv,
            uv_triangles: Some(&self.uv_triangles),
            wrap: WrapMode::Clamp,
        }
    }

    fn renderer(&self, camera: Camera) -> Renderer {
        Renderer::new(
            self.triangles.clone(),
            camera,
            RenderOptions {
                cull_backfaces: true,
                antialias: true,
            },
        )
    }
}

/// Pixels `[1, L, 2]` of the vertices `ids` (`[L]`) of `vertices` (`[N, 3]`) through a
/// camera.
fn project_vertices(
    ids: &Tensor,
    vertices: &Tensor,
    rotation: &Tensor,
    translation: &Tensor,
    camera: &Camera,
) -> Result<Tensor, OptimError> {
    let points = vertices.index_select(ids, 0)?;
    let camera_points =
        camera_from_world(&points, &rotation.unsqueeze(0)?, &translation.unsqueeze(0)?)?;
    Ok(camera.project(&camera_points)?)
}

/// What one photo is compared with, computed once.
struct ViewTarget {
    renderer: Renderer,
    /// The photo's pixel camera (landmarks are compared in photo pixels).
    camera: Camera,
    /// The face crop `[1, S, S, 3]`.
    crop: Tensor,
    /// Crop → dlib chip.
    chip: ChipWarp,
    features: FaceFeatures,
    /// Face-model vertex of each correspondence of the landmark term, `[L]`.
    landmark_vertices: Tensor,
    /// Their detected pixels `[1, L, 2]`.
    landmarks: Tensor,
    /// Their weights.
    landmark_weights: LandmarkWeights,
}

impl ViewTarget {
    fn new(
        photo: &PhotoView<'_>,
        pairs: &[Correspondence],
        to_face: &[Option<u32>],
        face: &MorphableModel,
        scene: &SceneData,
        net: &FaceRecognitionNet,
        crop_size: usize,
    ) -> Result<Self, OptimError> {
        let device = face.device();
        let (height, width, channels) = photo.image.dims3()?;
        if channels != 3 || photo.landmarks.points.len() != face.landmark_vertex_ids().len() {
            return Err(OptimError::InvalidInput(format!(
                "a photo must be RGB [H, W, 3] with {} landmarks; got {:?} and {}",
                face.landmark_vertex_ids().len(),
                photo.image.dims(),
                photo.landmarks.points.len()
            )));
        }
        let detected: Vec<[f64; 2]> = photo.landmarks.points.iter().flatten().copied().collect();
        if detected.len() < 3 {
            return Err(OptimError::DegenerateLandmarks(format!(
                "only {} of the photo's landmarks were detected",
                detected.len()
            )));
        }
        let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
        for p in &detected {
            for axis in 0..2 {
                lo[axis] = lo[axis].min(p[axis]);
                hi[axis] = hi[axis].max(p[axis]);
            }
        }
        let side = CROP_MARGIN * (hi[0] - lo[0]).max(hi[1] - lo[1]).max(1.0);
        // Crop pixel (c, r) sits at photo pixel origin + (c, r)·side/S.
        let step = side / crop_size as f64;
        let origin = [
            (lo[0] + hi[0]) / 2.0 - step * (crop_size as f64 - 1.0) / 2.0,
            (lo[1] + hi[1]) / 2.0 - step * (crop_size as f64 - 1.0) / 2.0,
        ];
        let to_crop = |p: [f64; 2]| [(p[0] - origin[0]) / step, (p[1] - origin[1]) / step];
        let crop_warp = ChipWarp::new(
            &SimilarityTransform {
                a: step,
                b: 0.0,
                t: origin,
            },
            height,
            width,
            crop_size,
            DType::F32,
            device,
        )?;
        let crop = crop_warp
            .apply_channels_last(&photo.image.to_dtype(DType::F32)?.unsqueeze(0)?)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;

        let k = &photo.params.intrinsics;
        let (near, far) = DEPTH_RANGE_MM;
        let camera = Camera::new(k.fx, k.fy, k.cx, k.cy, width, height, near, far)?;
        let crop_camera = Camera::new(
            k.fx / step,
            k.fy / step,
            (k.cx - origin[0]) / step,
            (k.cy - origin[1]) / step,
            crop_size,
            crop_size,
            near,
            far,
        )?;
        let in_crop: Vec<[f64; 2]> = photo
            .landmarks
            .points
            .iter()
            .map(|p| p.map_or([f64::NAN; 2], to_crop))
            .collect();
        let chip = chip_warp(&in_crop, crop_size, device)?;
        let features = net.forward(&to_chip(&chip, &crop)?)?;
        let features = FaceFeatures {
            maps: features.maps.iter().map(Tensor::detach).collect(),
            embedding: features.embedding.detach(),
        };

        // Correspondences off the rendered face area cannot be projected from it: dropped.
        let pairs: Vec<(u32, &Correspondence)> = pairs
            .iter()
            .filter_map(|c| Some((to_face[c.vertex as usize]?, c)))
            .collect();
        let count = pairs.len();
        let ids: Vec<u32> = pairs.iter().map(|(id, _)| *id).collect();
        let targets: Vec<f32> = pairs
            .iter()
            .flat_map(|(_, c)| c.pixel.map(|v| v as f32))
            .collect();
        let weights: Vec<f32> = pairs.iter().map(|(_, c)| c.weight as f32).collect();
        Ok(ViewTarget {
            renderer: scene.renderer(crop_camera),
            camera,
            crop,
            chip,
            features,
            landmark_vertices: Tensor::from_vec(ids, count, device)?,
            landmarks: Tensor::from_vec(targets, (1, count, 2), device)?,
            landmark_weights: LandmarkWeights::new(&Tensor::from_vec(weights, count, device)?)?,
        })
    }
}

/// The dlib chip warp for an `S × S` image with the given 68 landmarks (NaN where missing:
/// the chip transform needs the iBUG points it uses, which every detector here provides).
fn chip_warp(landmarks: &[[f64; 2]], size: usize, device: &Device) -> Result<ChipWarp, OptimError> {
    ChipWarp::dlib_chip(landmarks, size, size, DType::F32, device)
        .map_err(|e| OptimError::DegenerateLandmarks(e.to_string()))
}

/// `[1, S, S, 3]` images in `[0, 1]` → the network's `[1, 3, 150, 150]` chip in 0–255.
fn to_chip(warp: &ChipWarp, image: &Tensor) -> Result<Tensor, OptimError> {
    let chip = warp.apply_channels_last(image)?;
    Ok((chip * 255.0)?)
}

/// The frontal view R̂: a fixed camera straight in front of the aligned neutral face.
struct FrontalTarget {
    renderer: Renderer,
    rotation: Tensor,
    translation: Tensor,
    chip: ChipWarp,
}

impl FrontalTarget {
    fn new(
        face: &MorphableModel,
        aligned: &FitParams,
        scene: &SceneData,
        size: usize,
    ) -> Result<Self, OptimError> {
        let device = face.device();
        let neutral = face.instance(
            &aligned.shape.to_dtype(DType::F32)?,
            &Tensor::zeros(0, DType::F32, device)?,
        )?;
        let (camera, rotation, translation) = frontal_camera(&neutral, size)?;
        let landmarks: Vec<[f64; 2]> = {
            let projected: Vec<Vec<f32>> = project_vertices(
                &scene.landmark_vertices,
                &neutral,
                &rotation,
                &translation,
                &camera,
            )?
            .squeeze(0)?
            .to_vec2()?;
            let mut all = vec![[f64::NAN; 2]; face.landmark_vertex_ids().len()];
            for (&slot, p) in scene.landmark_slots.iter().zip(projected) {
                all[slot] = [f64::from(p[0]), f64::from(p[1])];
            }
            all
        };
        Ok(FrontalTarget {
            renderer: scene.renderer(camera),
            rotation,
            translation,
            chip: chip_warp(&landmarks, size, device)?,
        })
    }
}

/// A camera looking straight at `vertices` (`[N, 3]`, model coordinates: y up, z towards the
/// viewer) from 1 m, with the mesh's larger extent filling 70 % of a `size`² image. Returns
/// the camera and its axis-angle rotation and translation `[3]`.
pub fn frontal_camera(
    vertices: &Tensor,
    size: usize,
) -> Result<(Camera, Tensor, Tensor), OptimError> {
    let lo: Vec<f32> = vertices.min(0)?.to_dtype(DType::F32)?.to_vec1()?;
    let hi: Vec<f32> = vertices.max(0)?.to_dtype(DType::F32)?.to_vec1()?;
    let centre: Vec<f32> = lo.iter().zip(&hi).map(|(l, h)| (l + h) / 2.0).collect();
    let extent = f64::from((hi[0] - lo[0]).max(hi[1] - lo[1]).max(1.0));
    let distance = 1000.0f32;
    let focal = 0.7 * size as f64 * f64::from(distance) / extent;
    let device = vertices.device();
    // OpenCV's camera looks down +z with y down: a half turn about x faces the model. It maps
    // a point c to (c_x, −c_y, −c_z), so this translation puts the centre `distance` ahead.
    let rotation = Tensor::new(&[std::f32::consts::PI, 0.0, 0.0], device)?;
    let translation = Tensor::new(&[-centre[0], centre[1], centre[2] + distance], device)?;
    let half = size as f64 / 2.0 - 0.5;
    let (near, far) = DEPTH_RANGE_MM;
    let camera = Camera::new(focal, focal, half, half, size, size, near, far)?;
    Ok((camera, rotation, translation))
}

/// Per-photo variables.
struct PhotoVars {
    expression: Var,
    rotation: Var,
    translation: Var,
    /// `[1, 3, 9]` SH coefficients.
    light: Var,
    /// White ambient light of unit irradiance, what [`LossWeights::light_prior`] pulls towards.
    ambient: Tensor,
}

impl PhotoVars {
    fn new(params: &FitParams, device: &Device) -> Result<Self, OptimError> {
        let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?);
        // The DC basis function is constant; its value turns "irradiance 1" into a coefficient.
        let up = Tensor::new(&[[[0.0f32, 0.0, 1.0]]], device)?;
        let dc = sh_irradiance_basis(&up)?.flatten_all()?.to_vec1::<f32>()?[0];
        let mut ambient = vec![0.0f32; 27];
        for channel in 0..3 {
            ambient[channel * 9] = 1.0 / dc;
        }
        let ambient = Tensor::from_vec(ambient, (1, 3, 9), device)?;
        Ok(PhotoVars {
            expression: var(&params.expression)?,
            rotation: var(&params.rotation)?,
            translation: var(&params.translation)?,
            light: Var::from_tensor(&ambient)?,
            ambient,
        })
    }
}

/// The texture's variable: a free UV map `[T, T, 3]` or a model's latent `[1, L]`.
struct TextureVars<'a> {
    var: Var,
    model: Option<&'a dyn TextureModel>,
}

impl<'a> TextureVars<'a> {
    fn new(
        source: TextureSource<'a>,
        initial: &UvTexture,
        config: &RefineConfig,
        device: &Device,
    ) -> Result<Self, OptimError> {
        // The unwrap's `[1, C, height, width]` map of `values` (`size² × C`, channels last).
        let resampled = |values: &[f32], channels: usize, height: usize, width: usize| {
            let full = Tensor::from_slice(values, (initial.size, initial.size, channels), device)?
                .permute((2, 0, 1))?
                .unsqueeze(0)?;
            if height == width && initial.size.is_multiple_of(height) {
                // Block averages: nearest sampling of a finer map would alias.
                full.avg_pool2d(initial.size / height)
            } else {
                full.interpolate2d(height, width)
            }
        };
        Ok(match source {
            TextureSource::FreeUv => {
                let size = config.texture_size;
                let map = resampled(&initial.rgb, 3, size, size)?;
                TextureVars {
                    var: Var::from_tensor(&map.squeeze(0)?.permute((1, 2, 0))?.contiguous()?)?,
                    model: None,
                }
            }
            TextureSource::Model(model) => {
                let (height, width) = model.resolution();
                let texture = resampled(&initial.rgb, 3, height, width)?;
                let seen = resampled(&initial.observed, 1, height, width)?;
                // The photo's unwrap encoded where the model can, else a draw from the prior,
                // not its mean: a latent prior like a Gaussian shell has no gradient direction
                // at zero.
                let latent = match model.encode(
                    &texture.to_device(model.device())?,
                    &seen.to_device(model.device())?,
                )? {
                    Some(latent) => latent,
                    None => model.sample_latent(1, None, config.seed)?,
                };
                TextureVars {
                    var: Var::from_tensor(&latent.to_device(device)?)?,
                    model: Some(model),
                }
            }
        })
    }

    /// The albedo UV map `[T, T, 3]`.
    fn albedo(&self) -> Result<Tensor, OptimError> {
        match self.model {
            None => Ok(self.var.as_tensor().clone()),
            Some(model) => Ok(model
                .generate(self.var.as_tensor())?
                .squeeze(0)?
                .permute((1, 2, 0))?
                .contiguous()?),
        }
    }

    /// The texture's regularisers `(prior, symmetry)`.
    fn priors(&self, albedo: &Tensor) -> Result<(Tensor, Tensor), OptimError> {
        match self.model {
            Some(model) => {
                let prior = model.latent_prior(self.var.as_tensor())?.sum_all()?;
                Ok((prior.clone(), prior.zeros_like()?))
            }
            None => {
                let (h, w, _) = albedo.dims3()?;
                let dy = (albedo.narrow(0, 1, h - 1)? - albedo.narrow(0, 0, h - 1)?)?;
                let dx = (albedo.narrow(1, 1, w - 1)? - albedo.narrow(1, 0, w - 1)?)?;
                let smooth = (dy.sqr()?.mean_all()? + dx.sqr()?.mean_all()?)?;
                let reversed: Vec<u32> = (0..w as u32).rev().collect();
                let reversed = Tensor::from_vec(reversed, w, albedo.device())?;
                let mirror = albedo.index_select(&reversed, 1)?;
                let symmetry = (albedo - mirror)?.sqr()?.mean_all()?;
                Ok((smooth, symmetry))
            }
        }
    }
}

/// Everything the objective reads.
struct Problem<'a> {
    face: &'a MorphableModel,
    net: &'a FaceRecognitionNet,
    scene: &'a SceneData,
    views: &'a [ViewTarget],
    frontal: &'a FrontalTarget,
    /// The descriptors the identity terms compare the network's inputs with, `[P + 1, 128]`:
    /// the photos' in the order of `views`, then their mean for the frontal render.
    identity_targets: &'a Tensor,
    weights: &'a LossWeights,
}

impl Problem<'_> {
    fn loss(
        &self,
        shape: &Var,
        photos: &[PhotoVars],
        texture: &TextureVars<'_>,
    ) -> Result<Loss, OptimError> {
        let w = self.weights;
        let albedo = texture.albedo()?;
        // A face-recognition network's gradient, texel by texel, is adversarial noise: a free
        // UV map learns from the pixel term only (the identity and content terms fell 30-fold
        // while the pixel error doubled when they could move it). A texture model's latent
        // stays on its manifold and takes every term, as in GANFIT.
        let recognised_albedo = match texture.model {
            Some(_) => albedo.clone(),
            None => albedo.detach(),
        };

        let mut terms: Vec<(&str, f64, Tensor)> = Vec::new();
        let mut add = |name: &'static str, weight: f64, value: Tensor| -> Result<(), OptimError> {
            if weight != 0.0 {
                terms.push((name, weight, value));
            }
            Ok(())
        };

        let mut chips = Vec::with_capacity(photos.len() + 1);
        let mut pixel = Vec::new();
        let mut landmarks = Vec::new();
        let mut light = Vec::new();
        for (view, vars) in self.views.iter().zip(photos) {
            let vertices = self
                .face
                .instance(shape.as_tensor(), vars.expression.as_tensor())?;
            let rotation = vars.rotation.as_tensor().unsqueeze(0)?;
            let translation = vars.translation.as_tensor().unsqueeze(0)?;
            // A free UV map's detached copy colours the render the identity network sees: the
            // same geometry, so one rasterization serves both.
            let recognised_appearance = match texture.model {
                Some(_) => vec![],
                None => vec![self.scene.appearance(&recognised_albedo)],
            };
            let renderings = view.renderer.render_with_appearances(
                &Scene {
                    vertices: &vertices,
                    rotation: &rotation,
                    translation: &translation,
                    appearance: self.scene.appearance(&albedo),
                    lighting: Lighting::SphericalHarmonics(vars.light.as_tensor()),
                },
                &recognised_appearance,
            )?;
            let mask = &renderings[0].mask;
            let background = view.crop.broadcast_mul(&mask.affine(-1.0, 1.0)?)?;
            let composite = (&renderings[0].image + &background)?;
            let recognised = match renderings.get(1) {
                Some(rendering) => (&rendering.image + &background)?,
                None => composite.clone(),
            };
            pixel.push(pixel_loss(&composite, &view.crop, &mask.detach())?);
            chips.push(to_chip(&view.chip, &recognised)?);
            let projected = project_vertices(
                &view.landmark_vertices,
                &vertices,
                vars.rotation.as_tensor(),
                vars.translation.as_tensor(),
                &view.camera,
            )?;
            landmarks.push(landmark_loss(
                &projected,
                &view.landmarks,
                Some(&view.landmark_weights),
            )?);
            light.push(
                (vars.light.as_tensor() - &vars.ambient)?
                    .sqr()?
                    .sum_all()?
                    .reshape(1)?,
            );
        }

        let device = shape.device();
        let neutral = self
            .face
            .instance(shape.as_tensor(), &Tensor::zeros(0, DType::F32, device)?)?;
        let frontal = self.frontal.renderer.render(&Scene {
            vertices: &neutral,
            rotation: &self.frontal.rotation.unsqueeze(0)?,
            translation: &self.frontal.translation.unsqueeze(0)?,
            appearance: self.scene.appearance(&recognised_albedo),
            lighting: Lighting::Unlit,
        })?;
        let frontal_image = frontal.image.broadcast_add(
            &frontal
                .mask
                .affine(-FRONTAL_BACKGROUND, FRONTAL_BACKGROUND)?,
        )?;
        chips.push(to_chip(&self.frontal.chip, &frontal_image)?);

        let features = self.net.forward(&Tensor::cat(&chips, 0)?)?;
        let n = self.views.len();
        // Both identity terms in one call (on a GPU each call is a few dozen kernels).
        let identity = identity_loss(self.identity_targets, &features.embedding)?;
        let per_view = |values: Vec<Tensor>| -> Result<Tensor, OptimError> {
            Ok(Tensor::cat(&values, 0)?.mean_all()?)
        };
        let mut content = Vec::with_capacity(n);
        for (i, view) in self.views.iter().enumerate() {
            let render_maps: Vec<Tensor> = features.maps[..CONTENT_MAPS]
                .iter()
                .map(|m| m.narrow(0, i, 1))
                .collect::<candle_core::Result<_>>()?;
            content.push(content_loss(
                &view.features.maps[..CONTENT_MAPS],
                &render_maps,
            )?);
        }
        add(
            "identity",
            w.identity,
            identity.narrow(0, 0, n)?.mean_all()?,
        )?;
        add(
            "frontal identity",
            w.frontal_identity,
            identity.narrow(0, n, 1)?.mean_all()?,
        )?;
        add("content", w.content, per_view(content)?)?;
        add("pixel", w.pixel, per_view(pixel)?)?;
        add("landmark", w.landmark, per_view(landmarks)?)?;
        add(
            "shape prior",
            w.shape_prior,
            gaussian_prior(&shape.as_tensor().unsqueeze(0)?)?.sum_all()?,
        )?;
        let expressions = Tensor::stack(
            &photos
                .iter()
                .map(|p| p.expression.as_tensor().clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        add(
            "expression prior",
            w.expression_prior,
            gaussian_prior(&expressions)?.mean_all()?,
        )?;
        add("light prior", w.light_prior, per_view(light)?)?;
        let (texture_prior, symmetry) = texture.priors(&albedo)?;
        add("texture prior", w.texture_prior, texture_prior)?;
        if texture.model.is_none() {
            add("texture symmetry", w.texture_symmetry, symmetry)?;
        }

        if terms.is_empty() {
            return Err(OptimError::InvalidInput(
                "every weight of the full objective is zero".to_string(),
            ));
        }
        let values = terms
            .iter()
            .map(|(.., value)| value.to_dtype(DType::F32)?.reshape(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The λ's applied as one product: on a GPU a multiplication per term is a kernel
        // forward and another with a gradient sum backward.
        let weights: Vec<f32> = terms.iter().map(|&(_, weight, _)| weight as f32).collect();
        let weights = Tensor::from_vec(weights, terms.len(), device)?;
        let values = (Tensor::cat(&values, 0)? * weights)?;
        // One read-back for all the terms: on a GPU each read waits for the queue to drain.
        let reported = terms
            .iter()
            .zip(values.to_vec1::<f32>()?)
            .map(|((name, ..), value)| (name.to_string(), f64::from(value)))
            .collect();
        Ok(Loss {
            total: values.sum_all()?,
            terms: reported,
        })
    }
}
