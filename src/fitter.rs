//! The `Fitter`: photo in, fitted 3D face out.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ganfit_losses::face::{FaceChoice, FaceDetector, FaceLandmarker};
use ganfit_morphable::{MorphableModel, TexturedMesh};
use ganfit_optim::{AlignmentConfig, FitParams, ImageLandmarks, StageReport, UvTexture};
use ganfit_render::{
    Appearance, Lighting, PhongLight, RenderOptions, Renderer, Scene, Triangles, WrapMode,
};
use image::{RgbImage, RgbaImage};

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
}

/// Result type of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Configures a [`Fitter`]; every option has a default (the embedded models on the CPU).
#[derive(Debug, Default)]
pub struct FitterBuilder {
    device: Option<Device>,
    resolver: Option<ganfit_assets::Resolver>,
    model: Option<MorphableModel>,
    alignment: Option<AlignmentConfig>,
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
        let alignment = self.alignment.unwrap_or_default();
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
        let device = self.device.unwrap_or(Device::Cpu);
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
        Ok(Fitter {
            texture_size,
            detector: FaceDetector::from_resolver(&resolver, &device)?,
            landmarker: FaceLandmarker::from_resolver(&resolver, &device)?,
            model,
            alignment,
            face_choice: self.face_choice,
        })
    }
}

/// Fits a morphable model to photos. Build one with [`Fitter::builder`], then call
/// [`Fitter::fit`] for each photo.
#[derive(Debug)]
pub struct Fitter {
    model: MorphableModel,
    detector: FaceDetector,
    landmarker: FaceLandmarker,
    alignment: AlignmentConfig,
    face_choice: FaceChoice,
    texture_size: usize,
}

/// What a fit produces.
#[derive(Debug, Clone)]
pub struct FitResult {
    /// Camera, identity and expression.
    pub params: FitParams,
    /// Fitted vertices `[N, 3]` in millimetres, model coordinates (apply the camera's pose to
    /// get camera coordinates).
    pub vertices: Tensor,
    /// The fitted mesh, ready to export.
    pub mesh: TexturedMesh,
    /// The photo projected onto the mesh's UV layout (image orientation, row 0 at the top).
    pub uv_texture: RgbImage,
    /// Which texels of `uv_texture` were seen in the photo (255) or filled in (0).
    pub uv_observed: image::GrayImage,
    /// The textured reconstruction rendered through the fitted camera, the photo's size,
    /// transparent where empty.
    pub render: RgbaImage,
    /// The untextured reconstruction, grey and lit, through the fitted camera: shows the fitted
    /// geometry (the textured render reproduces the photo where the texture came from it).
    pub geometry_render: RgbaImage,
    /// The reconstruction with a neutral expression, seen from the front.
    pub frontal_render: RgbaImage,
    /// The 68 iBUG landmarks detected on the photo, pixels.
    pub detected_landmarks: Vec<[f32; 2]>,
    /// The model's 68 landmarks projected with the fitted camera, pixels (`None` where the
    /// model has no vertex for a landmark).
    pub fitted_landmarks: Vec<Option<[f32; 2]>>,
    /// Loss history of each stage.
    pub stages: Vec<StageReport>,
    /// Wall time of each step.
    pub timings: Vec<(String, Duration)>,
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

    /// Fits one photo.
    pub fn fit(&self, image: &RgbImage) -> Result<FitResult> {
        let mut timings = Vec::new();
        let mut clock = Instant::now();
        let mut lap = |name: &str, timings: &mut Vec<(String, Duration)>| {
            timings.push((name.to_string(), clock.elapsed()));
            clock = Instant::now();
        };
        let face = self.detector.detect_face(image, self.face_choice)?;
        lap("face detection", &mut timings);
        let mesh_points = self.landmarker.landmarks(image, &face)?;
        let detected = mesh_points.to_ibug68().to_vec();
        lap("landmarks", &mut timings);

        let landmarks = ImageLandmarks {
            points: detected
                .iter()
                .map(|p| Some([f64::from(p[0]), f64::from(p[1])]))
                .collect(),
            width: image.width(),
            height: image.height(),
        };
        let alignment = ganfit_optim::align_to_landmarks(&self.model, &landmarks, &self.alignment)?;
        lap("landmark alignment", &mut timings);

        let params = alignment.params;
        let vertices = self.model.instance(&params.shape, &params.expression)?;
        let fitted_landmarks = project_landmarks(&self.model, &vertices, &params)?;
        let mesh = self.model.mesh(&vertices)?;
        let photo = photo_tensor(image, self.model.device())?;
        let texture =
            ganfit_optim::unwrap_photo(&self.model, &vertices, &params, &photo, self.texture_size)?;
        lap("texture", &mut timings);
        let view = View::new(&self.model, &texture)?;
        let render = view.render(&vertices, &params, image.width(), image.height(), false)?;
        let geometry_render =
            view.render(&vertices, &params, image.width(), image.height(), true)?;
        let neutral = self
            .model
            .instance(&params.shape, &params.expression.zeros_like()?)?;
        let frontal_render = view.render_frontal(&neutral, FRONTAL_SIZE)?;
        lap("renders", &mut timings);
        Ok(FitResult {
            params,
            vertices,
            mesh,
            uv_texture: texture_image(&texture),
            uv_observed: image::GrayImage::from_fn(
                texture.size as u32,
                texture.size as u32,
                |x, y| {
                    image::Luma([
                        (texture.observed[y as usize * texture.size + x as usize] * 255.0) as u8,
                    ])
                },
            ),
            render,
            geometry_render,
            frontal_render,
            detected_landmarks: detected,
            fitted_landmarks,
            stages: alignment.stages,
            timings,
        })
    }
}

/// Pixels of the model's landmark vertices under the fitted camera.
fn project_landmarks(
    model: &MorphableModel,
    vertices: &Tensor,
    params: &FitParams,
) -> Result<Vec<Option<[f32; 2]>>> {
    let camera_space = ganfit_render::camera_from_world(
        &vertices.to_dtype(DType::F32)?,
        &params.rotation.unsqueeze(0)?,
        &params.translation.unsqueeze(0)?,
    )?
    .squeeze(0)?
    .to_vec2::<f32>()?;
    let k = &params.intrinsics;
    Ok(model
        .landmark_vertex_ids()
        .iter()
        .map(|id| {
            id.map(|id| {
                let p = &camera_space[id as usize];
                [
                    (k.fx * f64::from(p[0] / p[2]) + k.cx) as f32,
                    (k.fy * f64::from(p[1] / p[2]) + k.cy) as f32,
                ]
            })
        })
        .collect())
}

/// Side of the frontal render in pixels.
const FRONTAL_SIZE: u32 = 512;

/// `[H, W, 3]` f32 in `[0, 1]`.
fn photo_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 255.0)
        .collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?)
}

fn texture_image(texture: &UvTexture) -> RgbImage {
    let size = texture.size as u32;
    RgbImage::from_fn(size, size, |x, y| {
        let i = (y as usize * texture.size + x as usize) * 3;
        image::Rgb([0, 1, 2].map(|c| to_byte(texture.rgb[i + c])))
    })
}

fn to_byte(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// The textured mesh, ready to draw through any camera.
struct View<'a> {
    model: &'a MorphableModel,
    texture: &'a UvTexture,
    /// The skin's mesh and UV triangles (see [`ganfit_optim::skin_triangles`]).
    triangles: Triangles,
    uv_triangles: Triangles,
}

impl<'a> View<'a> {
    fn new(model: &'a MorphableModel, texture: &'a UvTexture) -> Result<Self> {
        let (skin, skin_uv) = ganfit_optim::skin_triangles(model);
        Ok(View {
            model,
            texture,
            triangles: Triangles::new(skin, model.n_vertices())?,
            uv_triangles: Triangles::new(skin_uv, model.uvs().len())?,
        })
    }
}

impl View<'_> {
    fn draw(
        &self,
        vertices: &Tensor,
        rotation: &Tensor,
        translation: &Tensor,
        camera: ganfit_render::Camera,
        shaded_geometry: bool,
    ) -> Result<RgbaImage> {
        let device = Device::Cpu;
        let model = self.model;
        // The texture op puts v = 0 at the top row; the model's UVs are OBJ-style (v up).
        let uv: Vec<f32> = model
            .uvs()
            .iter()
            .flat_map(|&[u, v]| [u, 1.0 - v])
            .collect();
        let uv = Tensor::from_vec(uv, (model.uvs().len(), 2), &device)?;
        let size = self.texture.size;
        let texture = Tensor::from_slice(&self.texture.rgb, (size, size, 3), &device)?;
        let grey = Tensor::full(0.75f32, (model.n_vertices(), 3), &device)?;
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
                    texture: &texture,
                    uv: &uv,
                    uv_triangles: Some(&self.uv_triangles),
                    wrap: WrapMode::Clamp,
                },
                Lighting::Unlit,
            )
        };
        let renderer = Renderer::new(
            self.triangles.clone(),
            camera,
            RenderOptions {
                cull_backfaces: true,
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

    fn render(
        &self,
        vertices: &Tensor,
        params: &FitParams,
        width: u32,
        height: u32,
        shaded_geometry: bool,
    ) -> Result<RgbaImage> {
        let k = &params.intrinsics;
        let camera = ganfit_render::Camera::new(
            k.fx,
            k.fy,
            k.cx,
            k.cy,
            width as usize,
            height as usize,
            1.0,
            1e5,
        )?;
        self.draw(
            vertices,
            &params.rotation,
            &params.translation,
            camera,
            shaded_geometry,
        )
    }

    /// Seen from straight ahead at 1 m with the head filling about 70 % of the frame. The
    /// models are y-up, z-towards-the-viewer; the camera is OpenCV's (y down, z forward), hence
    /// the half turn about x.
    fn render_frontal(&self, vertices: &Tensor, size: u32) -> Result<RgbaImage> {
        let device = vertices.device();
        let face = self.model.vertex_set("face").unwrap_or(&[]);
        let all: Vec<Vec<f32>> = vertices.to_dtype(DType::F32)?.to_vec2()?;
        let chosen: Vec<&Vec<f32>> = if face.is_empty() {
            all.iter().collect()
        } else {
            face.iter().map(|&i| &all[i as usize]).collect()
        };
        let (mut lo, mut hi) = ([f32::INFINITY; 3], [f32::NEG_INFINITY; 3]);
        for p in &chosen {
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a]);
            }
        }
        let centre = [0, 1, 2].map(|a| (lo[a] + hi[a]) / 2.0);
        let extent = (hi[0] - lo[0]).max(hi[1] - lo[1]).max(1.0);
        let distance = 1000.0f32;
        let focal = 0.7 * size as f32 * distance / extent;
        let rotation = Tensor::new(&[std::f32::consts::PI, 0.0, 0.0], device)?;
        // R·c = (c_x, -c_y, -c_z) for the half turn about x; cancel it and step back.
        let translation = Tensor::new(&[-centre[0], centre[1], centre[2] + distance], device)?;
        let half = f64::from(size) / 2.0 - 0.5;
        let camera = ganfit_render::Camera::new(
            f64::from(focal),
            f64::from(focal),
            half,
            half,
            size as usize,
            size as usize,
            1.0,
            1e5,
        )?;
        self.draw(vertices, &rotation, &translation, camera, false)
    }
}
