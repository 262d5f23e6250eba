//! GANFIT's first stage: align the morphable model to 2D landmarks of the photo.
//!
//! The camera starts from the closed-form [`pose_from_landmarks`] solution on the mean face;
//! then Adam refines the camera alone, and finally camera, identity and expression together
//! under Gaussian priors. Later stages (identity, content and pixel losses through the
//! renderer) start from this result.

use candle_core::{DType, Device, Tensor, Var};
use ganfit_losses::losses::{LandmarkWeights, landmark_loss};
use ganfit_morphable::MorphableModel;
use nalgebra::{Vector2, Vector3};

use crate::{
    Intrinsics, Loss, OptimError, ParamGroup, Schedule, StageConfig, StageReport,
    pose_from_landmarks, run_stage,
};

/// Weights, iterations and learning rates of the landmark alignment.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignmentConfig {
    /// Iterations that move the camera only.
    pub camera_iterations: usize,
    /// Iterations that move camera, identity and expression together.
    pub shape_iterations: usize,
    /// Identity modes used (the model's first ones); `None` for all.
    pub shape_modes: Option<usize>,
    /// Weight of `‖p_s‖²` (identity coefficients are in standard deviations).
    pub shape_prior: f64,
    /// Weight of `‖p_e‖²` (expression blendshape weights).
    pub expression_prior: f64,
    /// Learning rate of the rotation (radians, axis-angle).
    pub rotation_lr: f64,
    /// Learning rate of the translation (model units, millimetres).
    pub translation_lr: f64,
    /// Learning rate of the log focal length (unused when `intrinsics` is given).
    pub focal_lr: f64,
    /// The photo's camera intrinsics when known (a calibrated camera, or a synthetic image):
    /// they are used as given. `None` guesses them from the image size and fits the focal
    /// length, which a single photo determines only weakly (it trades off against distance).
    pub intrinsics: Option<Intrinsics>,
    /// Learning rate of the identity coefficients.
    pub shape_lr: f64,
    /// Learning rate of the expression coefficients.
    pub expression_lr: f64,
    /// Weight of the dense correspondences ([`ImageLandmarks::dense`]) taken together,
    /// relative to the model's landmarks taken together.
    pub dense_weight: f64,
    /// Dynamic jaw contour: each jaw landmark (iBUG 0–7 and 9–16) is matched, every
    /// iteration, to the outermost vertex of its horizontal slice of the face as the camera
    /// sees it, instead of its fixed vertex — for detectors that put the jaw points on the
    /// face's visible outline (e.g. dlib's 68-point predictor), where a turned head's far
    /// cheek hides the fixed vertex. The landmark stage only: the full objective keeps each
    /// point's vertex. Off by default: MediaPipe's jaw points stay on the surface (marching
    /// them raised their error on 40 synthetic faces from 7.5 % to 8.9 % of the inter-ocular
    /// distance).
    pub jaw_contour: bool,
}

impl Default for AlignmentConfig {
    fn default() -> Self {
        AlignmentConfig {
            camera_iterations: 60,
            shape_iterations: 240,
            shape_modes: None,
            // The landmark term is the mean squared error relative to the face size over L
            // points, so Gaussian MAP weights are σ²/L for a detector noise of σ × face size.
            // Measured with `ganfit bench landmark-map`, MediaPipe's points lie 4-5 % of the
            // inter-ocular distance from where they should (2-3 % of the face size), jaw line
            // 9 %. On 20 synthetic ICT faces (seeds 0..20, landmark stage, NoW-style mean
            // error; the untouched mean face: 1.358 mm), with dense points at weight 1 and
            // expression prior 1e-4: shape prior 1e-5 1.339 mm, 3e-5 1.343 mm, 1e-4 1.355 mm;
            // without dense points and at expression prior 3e-5: 3e-6 1.395, 3e-5 1.387,
            // 1e-4 1.398 mm. Synthetic faces hardly tell the weights apart, real ones do: on
            // the hand-annotated face outlines of 12 FRL photos the fitted jaw lay 2.2 % of
            // the inter-ocular distance inside the outline at 1e-5 (|d| 2.58 %, MediaPipe's
            // own points 2.13 %) and 1.4 % at 3e-6 (|d| 2.03 %); over 50 unseen shared photos
            // (tools/sweep/sweep.py) the landmark error fell from a median 2.18 to 1.93 %,
            // no photo worse by more than 0.2 %, |p_s| median 2.1 -> 3.1.
            shape_prior: 3e-6,
            // Blendshapes readily absorb the detector's systematic errors. Same faces, shape
            // prior 3e-5, no dense points: expression prior 3e-5 1.387 mm, 1e-4 1.354 mm; with
            // dense points 1e-4 1.343 mm, 3e-4 1.330 mm. The synthetic faces carry at most
            // three random expressions; real smiles need room (the joint neutral/smiling fit
            // of `tests/fit.rs`), so not more than 1e-4.
            expression_prior: 1e-4,
            rotation_lr: 0.01,
            translation_lr: 2.0,
            focal_lr: 0.01,
            intrinsics: None,
            shape_lr: 0.05,
            expression_lr: 0.02,
            // MediaPipe's 468 points through the measured `ICT_VERTEX_FROM_MESH` (same faces
            // and priors as above): weight 0 1.354 mm, 1 1.343 mm, 2 1.341 mm.
            dense_weight: 1.0,
            jaw_contour: false,
        }
    }
}

/// 2D landmarks of one photo in the model's landmark order (iBUG-68 for the bundled models):
/// pixel coordinates, `None` where a point was not detected.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageLandmarks {
    /// One entry per model landmark.
    pub points: Vec<Option<[f64; 2]>>,
    /// The model vertex each of `points` shows, when the detector puts its points elsewhere on
    /// the face than the model's landmark definition (MediaPipe's iBUG points on ICT sit up to
    /// centimetres off ICT's own landmark vertices); `None` for the model's
    /// [`MorphableModel::landmark_vertex_ids`].
    pub vertices: Option<Vec<Option<u32>>>,
    /// How much each of `points` counts in the landmark term, e.g. the inverse variance of
    /// the detector's error there (a landmarker is far surer of an eye corner than of a point
    /// on the jaw line); `None` counts them equally. Only ratios matter.
    pub weights: Option<Vec<f64>>,
    /// Further points whose model vertex is known, e.g. MediaPipe's 468 face-mesh points on
    /// the ICT model; may be empty.
    pub dense: Vec<VertexObservation>,
    /// Photo width in pixels.
    pub width: u32,
    /// Photo height in pixels.
    pub height: u32,
}

impl ImageLandmarks {
    /// The model vertex of each of [`ImageLandmarks::points`] (`None` where it has none).
    pub fn vertex_ids<'a>(&'a self, model: &'a MorphableModel) -> &'a [Option<u32>] {
        self.vertices
            .as_deref()
            .unwrap_or_else(|| model.landmark_vertex_ids())
    }
}

/// A model vertex seen at a photo pixel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VertexObservation {
    /// Vertex index in the model.
    pub vertex: u32,
    /// Where the photo shows it, pixels.
    pub pixel: [f64; 2],
}

/// One 2D–3D correspondence of the landmark term with its weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Correspondence {
    /// The model landmark it is (`None` for a dense point).
    pub landmark: Option<usize>,
    pub vertex: u32,
    pub pixel: [f64; 2],
    pub weight: f64,
}

/// The landmark term's correspondences: the model's detected landmarks sharing weight 1, the
/// dense points sharing `dense_weight`.
pub(crate) fn correspondences(
    model: &MorphableModel,
    landmarks: &ImageLandmarks,
    dense_weight: f64,
) -> Result<Vec<Correspondence>, OptimError> {
    let model_ids = landmarks.vertex_ids(model);
    let landmark_count = model.landmark_vertex_ids().len();
    if landmarks.points.len() != landmark_count || model_ids.len() != landmark_count {
        return Err(OptimError::InvalidInput(format!(
            "{} landmarks on {} vertices given but the model `{}` defines {}",
            landmarks.points.len(),
            model_ids.len(),
            model.name(),
            landmark_count
        )));
    }
    let named = model_ids.iter().flatten().copied();
    if let Some(bad) = named
        .chain(landmarks.dense.iter().map(|d| d.vertex))
        .find(|&v| v as usize >= model.n_vertices())
    {
        return Err(OptimError::InvalidInput(format!(
            "a landmark on vertex {bad} but `{}` has {} vertices",
            model.name(),
            model.n_vertices()
        )));
    }
    let weights = match &landmarks.weights {
        Some(w) if w.len() != landmark_count || w.iter().any(|&w| !(w.is_finite() && w >= 0.0)) => {
            return Err(OptimError::InvalidInput(format!(
                "{} landmark weights given for {landmark_count} landmarks, or one is negative or \
                 not a number",
                w.len()
            )));
        }
        Some(w) => w.clone(),
        None => vec![1.0; landmark_count],
    };
    let sparse: Vec<(usize, u32, [f64; 2], f64)> = model_ids
        .iter()
        .zip(&landmarks.points)
        .zip(&weights)
        .enumerate()
        .filter_map(|(slot, ((id, point), &weight))| Some((slot, (*id)?, (*point)?, weight)))
        .filter(|&(.., weight)| weight > 0.0)
        .collect();
    let total: f64 = sparse.iter().map(|&(.., weight)| weight).sum();
    let mut all: Vec<Correspondence> = sparse
        .iter()
        .map(|&(slot, vertex, pixel, weight)| Correspondence {
            landmark: Some(slot),
            vertex,
            pixel,
            weight: weight / total,
        })
        .collect();
    if dense_weight > 0.0 {
        all.extend(landmarks.dense.iter().map(|d| Correspondence {
            landmark: None,
            vertex: d.vertex,
            pixel: d.pixel,
            weight: dense_weight / landmarks.dense.len() as f64,
        }));
    }
    if all.iter().flat_map(|c| c.pixel).any(|v| !v.is_finite()) {
        return Err(OptimError::DegenerateLandmarks(
            "a landmark position is not a finite number".to_string(),
        ));
    }
    Ok(all)
}

/// Camera and coefficients of a fit.
#[derive(Debug, Clone)]
pub struct FitParams {
    /// Identity coefficients `[k_s]`, standard deviations.
    pub shape: Tensor,
    /// Expression coefficients `[k_e]`.
    pub expression: Tensor,
    /// Model-to-camera rotation, axis-angle `[3]` (OpenCV camera: x right, y down, z forward).
    pub rotation: Tensor,
    /// Model-to-camera translation `[3]`, millimetres.
    pub translation: Tensor,
    /// Pinhole intrinsics in pixels.
    pub intrinsics: Intrinsics,
}

impl FitParams {
    /// A copy with its tensors on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> candle_core::Result<Self> {
        Ok(FitParams {
            shape: self.shape.to_device(device)?,
            expression: self.expression.to_device(device)?,
            rotation: self.rotation.to_device(device)?,
            translation: self.translation.to_device(device)?,
            intrinsics: self.intrinsics,
        })
    }
}

/// The fitted parameters and the history of each stage.
#[derive(Debug, Clone)]
pub struct Alignment {
    /// Result.
    pub params: FitParams,
    /// One report per stage, in order.
    pub stages: Vec<StageReport>,
}

/// Everything the alignment objective needs, as tensors.
struct Problem {
    /// Model vertex of each correspondence, `[L]`.
    vertex_ids: Tensor,
    /// Their detected pixels, `[1, L, 2]`.
    targets: Tensor,
    /// Their weights.
    weights: LandmarkWeights,
    /// Principal point `[2]`.
    centre: Tensor,
    /// `[1, fy / fx]`: the fitted focal length is `fx`.
    aspect: Tensor,
    /// Correspondences whose vertex is chosen anew every iteration (see
    /// [`AlignmentConfig::jaw_contour`]), and their fixed vertices.
    contour: Vec<ContourPoint>,
    fixed_ids: Vec<u32>,
}

/// A jaw landmark matched to the outermost vertex of its slice of the face.
struct ContourPoint {
    /// Index of its correspondence.
    pair: usize,
    /// Which way is outward in model coordinates: the sign of the landmark's x.
    side: f64,
    /// Candidate vertices (local ids), its fixed vertex among them.
    slice: Vec<u32>,
}

/// iBUG jaw landmarks that slide along the outline: all but the chin (8), whose vertex stays
/// on the silhouette whichever way the head turns.
fn is_jaw_contour(landmark: usize) -> bool {
    landmark < 17 && landmark != 8
}

/// Half-height of a jaw landmark's horizontal slice of the face, millimetres.
const CONTOUR_SLICE_MM: f32 = 4.0;

/// The vertices a jaw landmark at `vertex` may slide to: the face area's vertices at its
/// height (±[`CONTOUR_SLICE_MM`] on the mean face), on its side, between the midline and it,
/// and not behind it. Turning the head away moves the outline from the landmark towards the
/// midline along this slice; turning it towards the camera leaves the landmark outermost.
fn contour_slice(model: &MorphableModel, mean: &[[f32; 3]], vertex: u32) -> Vec<u32> {
    let landmark = mean[vertex as usize];
    let area: Vec<u32> = match model.vertex_set("face") {
        Ok(ids) => ids.to_vec(),
        Err(_) => (0..model.n_vertices() as u32).collect(),
    };
    area.into_iter()
        .filter(|&v| {
            let p = mean[v as usize];
            (p[1] - landmark[1]).abs() <= CONTOUR_SLICE_MM
                && p[0] * landmark[0].signum() >= 0.0
                && p[0].abs() <= landmark[0].abs()
                && p[2] >= landmark[2]
        })
        .chain([vertex])
        .collect()
}

/// Aligns `model` to `landmarks`, returning camera, identity and expression.
pub fn align_to_landmarks(
    model: &MorphableModel,
    landmarks: &ImageLandmarks,
    config: &AlignmentConfig,
) -> Result<Alignment, OptimError> {
    let mut one = align_one_person(model, std::slice::from_ref(landmarks), config)?;
    Ok(one.remove(0))
}

/// Aligns `model` to the landmarks of several photos of one person: one set of identity
/// coefficients for them all, a camera and an expression per photo (in `photos`' order).
/// Each photo's landmark term counts as it would alone and the identity prior once, so every
/// further view constrains the shared shape more. Every result carries the same stage reports,
/// whose losses are the sums over the photos.
pub fn align_one_person(
    model: &MorphableModel,
    photos: &[ImageLandmarks],
    config: &AlignmentConfig,
) -> Result<Vec<Alignment>, OptimError> {
    if photos.is_empty() {
        return Err(OptimError::InvalidInput(
            "no photos' landmarks to align to".to_string(),
        ));
    }
    let device = model.device().clone();
    let mean = model.mean_rows()?;
    let mut views = Vec::with_capacity(photos.len());
    for landmarks in photos {
        views.push(PhotoCorrespondences::new(model, &mean, landmarks, config)?);
    }

    // Only the landmark vertices enter the loss: fitting a model of just those is hundreds of
    // times cheaper than evaluating the whole mesh every iteration.
    let mut distinct: Vec<u32> = views.iter().flat_map(|v| v.vertices()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let landmark_model = model.subset_model("landmark vertices", &distinct)?;
    let local = |vertex: &u32| {
        distinct
            .binary_search(vertex)
            .expect("distinct holds every id") as u32
    };
    let problems = views
        .iter()
        .map(|view| view.problem(&mean, local, &device))
        .collect::<Result<Vec<_>, _>>()?;

    let shape_modes = config
        .shape_modes
        .unwrap_or(model.shape_modes())
        .min(model.shape_modes());
    let vec_var = |values: &[f64]| Var::from_vec(values.to_vec(), values.len(), &device);
    let shape = Var::zeros(shape_modes, DType::F64, &device)?;
    let mut per_photo = Vec::with_capacity(views.len());
    for view in &views {
        per_photo.push(PhotoVars {
            expression: Var::zeros(model.expression_modes(), DType::F64, &device)?,
            rotation: vec_var(view.pose.axis_angle().as_slice())?,
            translation: vec_var(view.pose.translation.as_slice())?,
            log_focal: vec_var(&[view.intrinsics.fx.ln()])?,
        });
    }

    let objective = |_: usize| {
        let mut landmark = Vec::with_capacity(problems.len());
        let mut expression_prior = Vec::with_capacity(problems.len());
        for (problem, vars) in problems.iter().zip(&per_photo) {
            landmark.push(problem.landmark_term(&landmark_model, &shape, vars)?);
            let expression = vars.expression.as_tensor();
            expression_prior.push((expression.sqr()?.sum_all()? * config.expression_prior)?);
        }
        let (landmark, expression_prior) = (sum(landmark)?, sum(expression_prior)?);
        let shape_prior = (shape.as_tensor().sqr()?.sum_all()? * config.shape_prior)?;
        let scalar = |t: &Tensor| t.to_scalar::<f64>();
        let terms = vec![
            ("landmark".to_string(), scalar(&landmark)?),
            ("shape prior".to_string(), scalar(&shape_prior)?),
            ("expression prior".to_string(), scalar(&expression_prior)?),
        ];
        Ok(Loss {
            total: ((landmark + shape_prior)? + expression_prior)?,
            terms,
        })
    };
    let group = |name: &str, pick: fn(&PhotoVars) -> &Var, learning_rate: f64| {
        ParamGroup::new(
            name,
            per_photo.iter().map(|c| pick(c).clone()).collect(),
            learning_rate,
        )
    };
    let camera_groups = [
        group("rotation", |c| &c.rotation, config.rotation_lr),
        group("translation", |c| &c.translation, config.translation_lr),
        group(
            "focal",
            |c| &c.log_focal,
            if config.intrinsics.is_some() {
                0.0
            } else {
                config.focal_lr
            },
        ),
    ];
    let mut camera_stage = StageConfig::new("camera", config.camera_iterations);
    camera_stage.schedule = Schedule::Constant;
    let mut stages = vec![run_stage(&camera_stage, &camera_groups, objective, |_| {})?];

    let mut all_groups = camera_groups.to_vec();
    all_groups.push(ParamGroup::new(
        "shape",
        vec![shape.clone()],
        config.shape_lr,
    ));
    all_groups.push(
        group("expression", |c| &c.expression, config.expression_lr)
            .bounded_below(Some(crate::MIN_EXPRESSION_WEIGHT)),
    );
    let shape_stage = StageConfig::new("shape and expression", config.shape_iterations);
    stages.push(run_stage(&shape_stage, &all_groups, objective, |_| {})?);

    let shape = shape.as_tensor().to_dtype(DType::F32)?;
    views
        .iter()
        .zip(&per_photo)
        .map(|(view, vars)| {
            let focal = vars.log_focal.as_tensor().exp()?.to_vec1::<f64>()?[0];
            let intrinsics = view.intrinsics;
            Ok(Alignment {
                params: FitParams {
                    shape: shape.clone(),
                    expression: vars.expression.as_tensor().to_dtype(DType::F32)?,
                    rotation: vars.rotation.as_tensor().to_dtype(DType::F32)?,
                    translation: vars.translation.as_tensor().to_dtype(DType::F32)?,
                    intrinsics: Intrinsics {
                        fx: focal,
                        fy: focal * intrinsics.fy / intrinsics.fx,
                        ..intrinsics
                    },
                },
                stages: stages.clone(),
            })
        })
        .collect()
}

/// The sum of one or more tensors of one shape.
fn sum(terms: Vec<Tensor>) -> candle_core::Result<Tensor> {
    let mut terms = terms.into_iter();
    let first = terms.next().expect("at least one photo");
    terms.try_fold(first, |total, term| total + term)
}

/// What one photo's landmarks give the alignment before it starts: its correspondences, the
/// closed-form camera on the mean face, and the jaw landmarks' candidate slices.
struct PhotoCorrespondences {
    pairs: Vec<Correspondence>,
    intrinsics: Intrinsics,
    pose: crate::Pose,
    /// Index of a jaw correspondence and its candidate vertices (model ids).
    contour: Vec<(usize, Vec<u32>)>,
}

impl PhotoCorrespondences {
    fn new(
        model: &MorphableModel,
        mean: &[[f32; 3]],
        landmarks: &ImageLandmarks,
        config: &AlignmentConfig,
    ) -> Result<Self, OptimError> {
        let pairs = correspondences(model, landmarks, config.dense_weight)?;
        // The closed-form camera uses the model's landmarks only: they are the reliable ones.
        let sparse_count = pairs.len()
            - if config.dense_weight > 0.0 {
                landmarks.dense.len()
            } else {
                0
            };
        let object: Vec<Vector3<f64>> = pairs[..sparse_count]
            .iter()
            .map(|c| mean[c.vertex as usize].map(f64::from).into())
            .collect();
        let pixels: Vec<Vector2<f64>> = pairs[..sparse_count]
            .iter()
            .map(|c| c.pixel.into())
            .collect();
        let intrinsics = config
            .intrinsics
            .unwrap_or_else(|| Intrinsics::guess_for_image(landmarks.width, landmarks.height));
        let pose = pose_from_landmarks(&intrinsics, &object, &pixels)?;
        let contour = if config.jaw_contour {
            pairs
                .iter()
                .enumerate()
                .filter(|(_, c)| c.landmark.is_some_and(is_jaw_contour))
                .map(|(index, c)| (index, contour_slice(model, mean, c.vertex)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(PhotoCorrespondences {
            pairs,
            intrinsics,
            pose,
            contour,
        })
    }

    /// Every model vertex the photo's landmark term may look at.
    fn vertices(&self) -> impl Iterator<Item = u32> + '_ {
        let slices = self.contour.iter().flat_map(|(_, slice)| slice.iter());
        self.pairs.iter().map(|c| c.vertex).chain(slices.copied())
    }

    /// The landmark term of this photo on the subset model whose vertex `v` is `local(v)`.
    fn problem(
        &self,
        mean: &[[f32; 3]],
        local: impl Fn(&u32) -> u32,
        device: &Device,
    ) -> Result<Problem, OptimError> {
        let local_pairs: Vec<Correspondence> = self
            .pairs
            .iter()
            .map(|c| Correspondence {
                vertex: local(&c.vertex),
                ..*c
            })
            .collect();
        let contour = self
            .contour
            .iter()
            .map(|(pair, slice)| ContourPoint {
                pair: *pair,
                side: f64::from(mean[self.pairs[*pair].vertex as usize][0].signum()),
                slice: slice.iter().map(&local).collect(),
            })
            .collect();
        Problem::new(&local_pairs, contour, &self.intrinsics, device)
    }
}

/// The variables that belong to one photo.
struct PhotoVars {
    expression: Var,
    rotation: Var,
    translation: Var,
    log_focal: Var,
}

impl Problem {
    fn new(
        pairs: &[Correspondence],
        contour: Vec<ContourPoint>,
        intrinsics: &Intrinsics,
        device: &Device,
    ) -> Result<Self, OptimError> {
        let ids: Vec<u32> = pairs.iter().map(|c| c.vertex).collect();
        let flat: Vec<f64> = pairs.iter().flat_map(|c| c.pixel).collect();
        let weights: Vec<f64> = pairs.iter().map(|c| c.weight).collect();
        Ok(Problem {
            vertex_ids: Tensor::from_vec(ids.clone(), pairs.len(), device)?,
            contour,
            fixed_ids: ids,
            targets: Tensor::from_vec(flat, (1, pairs.len(), 2), device)?,
            weights: LandmarkWeights::new(&Tensor::from_vec(weights, pairs.len(), device)?)?,
            centre: Tensor::new(&[intrinsics.cx, intrinsics.cy], device)?,
            aspect: Tensor::new(&[1.0, intrinsics.fy / intrinsics.fx], device)?,
        })
    }

    /// Pixels `[L, 2]` of the landmark vertices under the current parameters.
    fn project(
        &self,
        model: &MorphableModel,
        shape: &Var,
        vars: &PhotoVars,
    ) -> Result<Tensor, OptimError> {
        let vertices = model
            .instance(shape.as_tensor(), vars.expression.as_tensor())?
            .to_dtype(DType::F64)?;
        let camera = ganfit_render::camera_from_world(
            &vertices,
            &vars.rotation.as_tensor().unsqueeze(0)?,
            &vars.translation.as_tensor().unsqueeze(0)?,
        )?
        .squeeze(0)?;
        let xy = camera.narrow(1, 0, 2)?;
        let z = camera.narrow(1, 2, 1)?;
        let focal = vars
            .log_focal
            .as_tensor()
            .exp()?
            .broadcast_mul(&self.aspect)?;
        let pixels = xy
            .broadcast_div(&z)?
            .broadcast_mul(&focal)?
            .broadcast_add(&self.centre)?;
        let ids = if self.contour.is_empty() {
            self.vertex_ids.clone()
        } else {
            self.outline_ids(&pixels, &vars.rotation)?
        };
        Ok(pixels.index_select(&ids, 0)?)
    }

    /// The correspondences' vertices with each contour landmark moved to the outermost vertex
    /// of its slice, as `pixels` (every vertex of the subset model) show them now.
    fn outline_ids(&self, pixels: &Tensor, rotation: &Var) -> Result<Tensor, OptimError> {
        let pixels: Vec<Vec<f64>> = pixels.to_vec2()?;
        let axis_angle: Vec<f64> = rotation.as_tensor().to_vec1()?;
        let rotation = nalgebra::Rotation3::new(Vector3::from_column_slice(&axis_angle));
        let mut ids = self.fixed_ids.clone();
        for point in &self.contour {
            let outward = rotation * Vector3::new(point.side, 0.0, 0.0);
            let fixed = &pixels[self.fixed_ids[point.pair] as usize];
            let reach = |v: u32| {
                let p = &pixels[v as usize];
                (p[0] - fixed[0]) * outward.x + (p[1] - fixed[1]) * outward.y
            };
            if let Some(&outermost) = point
                .slice
                .iter()
                .max_by(|&&a, &&b| reach(a).total_cmp(&reach(b)))
            {
                ids[point.pair] = outermost;
            }
        }
        let count = ids.len();
        Ok(Tensor::from_vec(ids, count, self.vertex_ids.device())?)
    }

    /// The weighted landmark error of the photo under the current parameters.
    fn landmark_term(
        &self,
        model: &MorphableModel,
        shape: &Var,
        vars: &PhotoVars,
    ) -> Result<Tensor, OptimError> {
        let projected = self.project(model, shape, vars)?.unsqueeze(0)?;
        Ok(landmark_loss(&projected, &self.targets, Some(&self.weights))?.squeeze(0)?)
    }
}
