//! The full objective on a rendered ICT face whose camera is known: starting from a shifted
//! camera it must move back towards it and descend, and it rejects bad input with typed
//! errors.

use candle_core::{DType, Device, Tensor};
use ganfit_losses::identity::FaceRecognitionNet;
use ganfit_morphable::MorphableModel;
use ganfit_optim::{
    FitParams, ImageLandmarks, Intrinsics, OptimError, PhotoView, RefineConfig, TextureSource,
    UvTexture, refine, unwrap_photo,
};
use ganfit_render::{
    Appearance, Camera, Lighting, RenderOptions, Renderer, Scene, Triangles, WrapMode,
};

const SIZE: usize = 224;

struct Photo {
    image: Tensor,
    landmarks: ImageLandmarks,
    truth: FitParams,
}

/// The ICT mean face under a half-turned camera, textured with a smooth skin-like pattern on a
/// grey background, and its exact landmarks.
fn photo(model: &MorphableModel) -> Photo {
    let device = Device::Cpu;
    let intrinsics = Intrinsics {
        fx: 700.0,
        fy: 700.0,
        cx: 111.5,
        cy: 111.5,
    };
    let truth = FitParams {
        shape: Tensor::zeros(model.shape_modes(), DType::F32, &device).unwrap(),
        expression: Tensor::zeros(model.expression_modes(), DType::F32, &device).unwrap(),
        // A half turn about x (model y up -> camera y down) plus a slight yaw.
        rotation: Tensor::new(&[3.1f32, 0.2, 0.0], &device).unwrap(),
        translation: Tensor::new(&[0.0f32, 10.0, 900.0], &device).unwrap(),
        intrinsics,
    };
    let texture_size = 64;
    let texture: Vec<f32> = (0..texture_size * texture_size)
        .flat_map(|i| {
            let (row, column) = ((i / texture_size) as f32, (i % texture_size) as f32);
            let shade = 0.1 * (row / 9.0).sin() + 0.1 * (column / 7.0).cos();
            [0.75 + shade, 0.55 + shade, 0.45 + shade]
        })
        .collect();
    let texture = Tensor::from_vec(texture, (texture_size, texture_size, 3), &device).unwrap();
    let uv: Vec<f32> = model
        .uvs()
        .iter()
        .flat_map(|&[u, v]| [u, 1.0 - v])
        .collect();
    let uv = Tensor::from_vec(uv, (model.uvs().len(), 2), &device).unwrap();
    let (skin, skin_uv) = ganfit_optim::skin_triangles(model);
    let camera = Camera::new(700.0, 700.0, 111.5, 111.5, SIZE, SIZE, 1.0, 1e5).unwrap();
    let renderer = Renderer::new(
        Triangles::new(skin, model.n_vertices()).unwrap(),
        camera,
        RenderOptions {
            cull_backfaces: true,
            antialias: true,
        },
    );
    let uv_triangles = Triangles::new(skin_uv, model.uvs().len()).unwrap();
    let vertices = model.mean().clone();
    let rendering = renderer
        .render(&Scene {
            vertices: &vertices,
            rotation: &truth.rotation.unsqueeze(0).unwrap(),
            translation: &truth.translation.unsqueeze(0).unwrap(),
            appearance: Appearance::Texture {
                texture: &texture,
                uv: &uv,
                uv_triangles: Some(&uv_triangles),
                wrap: WrapMode::Clamp,
            },
            lighting: Lighting::Unlit,
        })
        .unwrap();
    let background = rendering.mask.affine(-0.4, 0.4).unwrap();
    let image = rendering
        .image
        .broadcast_add(&background)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let projected: Vec<Vec<f32>> = camera
        .project(&rendering.camera_vertices)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let points = model
        .landmark_vertex_ids()
        .iter()
        .map(|id| {
            id.map(|v| {
                projected[v as usize]
                    .iter()
                    .map(|&c| f64::from(c))
                    .collect::<Vec<_>>()
            })
        })
        .map(|p| p.map(|p| [p[0], p[1]]))
        .collect();
    Photo {
        image,
        landmarks: ImageLandmarks {
            points,
            vertices: None,
            weights: None,
            dense: Vec::new(),
            width: SIZE as u32,
            height: SIZE as u32,
        },
        truth,
    }
}

fn ict() -> MorphableModel {
    MorphableModel::ict(&ganfit_assets::Resolver::new(), &Device::Cpu).unwrap()
}

fn shifted(truth: &FitParams) -> FitParams {
    FitParams {
        translation: (&truth.translation
            + Tensor::new(&[6.0f32, -4.0, 0.0], &Device::Cpu).unwrap())
        .unwrap(),
        ..truth.clone()
    }
}

/// Mean distance in camera space (millimetres) between the face area of two fits.
fn camera_space_error(model: &MorphableModel, a: &FitParams, b: &FitParams) -> f32 {
    let face = Tensor::from_slice(model.vertex_set("face").unwrap(), 9409, &Device::Cpu).unwrap();
    let place = |p: &FitParams| {
        let vertices = model
            .instance(&p.shape, &p.expression)
            .unwrap()
            .index_select(&face, 0)
            .unwrap();
        ganfit_render::camera_from_world(
            &vertices,
            &p.rotation.unsqueeze(0).unwrap(),
            &p.translation.unsqueeze(0).unwrap(),
        )
        .unwrap()
    };
    (place(a) - place(b))
        .unwrap()
        .sqr()
        .unwrap()
        .sum(2)
        .unwrap()
        .sqrt()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn config() -> RefineConfig {
    RefineConfig {
        iterations: 25,
        crop_size: 112,
        texture_size: 32,
        ..RefineConfig::default()
    }
}

#[test]
fn a_shifted_camera_moves_back_and_the_objective_descends() {
    let model = ict();
    let net = FaceRecognitionNet::load(&Device::Cpu).unwrap();
    let photo = photo(&model);
    let start = shifted(&photo.truth);
    let vertices = model.mean().clone();
    let initial: UvTexture = unwrap_photo(&model, &vertices, &start, &photo.image, 64).unwrap();
    let view = PhotoView {
        image: &photo.image,
        landmarks: &photo.landmarks,
        params: &start,
    };
    let mut seen = 0;
    // Every term on, the render's identity too (off by default).
    let config = RefineConfig {
        weights: ganfit_optim::LossWeights {
            identity: 0.2,
            ..ganfit_optim::LossWeights::default()
        },
        ..config()
    };
    let result = refine(
        &model,
        &net,
        &[view],
        &initial,
        TextureSource::FreeUv,
        &config,
        |_| seen += 1,
    )
    .unwrap();
    assert_eq!(seen, 25);
    let before = camera_space_error(&model, &start, &photo.truth);
    let after = camera_space_error(&model, &result.params[0], &photo.truth);
    eprintln!("camera-space error {before} mm -> {after} mm");
    // Not to zero: identity and expression trade against distance (a monocular fit's depth
    // is ambiguous), and the texture, unwrapped at the shifted pose, holds the face back.
    assert!(
        after < 0.8 * before,
        "camera-space error {before} mm -> {after} mm"
    );

    let history = &result.report.history;
    let term = |record: &ganfit_optim::IterationRecord, name: &str| {
        record
            .terms
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no term {name}"))
    };
    let (first, last) = (&history[0], history.last().unwrap());
    assert!(
        term(last, "landmark") < 0.5 * term(first, "landmark"),
        "landmark: {} -> {}",
        term(first, "landmark"),
        term(last, "landmark")
    );
    assert!(
        term(last, "identity") < term(first, "identity"),
        "identity: {} -> {}",
        term(first, "identity"),
        term(last, "identity")
    );
    assert!(result.report.best_loss < first.total);
    assert_eq!(result.lights.len(), 1);
    assert_eq!(result.lights[0].dims(), &[3, 9]);
    assert_eq!(result.albedo.dims(), &[32, 32, 3]);
    assert!(result.latent.is_none());
}

#[test]
fn bad_input_is_a_typed_error() {
    let model = ict();
    let net = FaceRecognitionNet::load(&Device::Cpu).unwrap();
    let photo = photo(&model);
    let initial = UvTexture {
        size: 8,
        rgb: vec![0.5; 8 * 8 * 3],
        observed: vec![1.0; 64],
    };
    let run = |views: &[PhotoView<'_>], config: &RefineConfig| {
        refine(
            &model,
            &net,
            views,
            &initial,
            TextureSource::FreeUv,
            config,
            |_| {},
        )
    };
    let err = run(&[], &config()).unwrap_err();
    assert!(matches!(err, OptimError::InvalidInput(_)), "{err}");

    let view = PhotoView {
        image: &photo.image,
        landmarks: &photo.landmarks,
        params: &photo.truth,
    };
    let tiny = RefineConfig {
        crop_size: 8,
        ..config()
    };
    assert!(matches!(
        run(&[view], &tiny).unwrap_err(),
        OptimError::InvalidInput(_)
    ));

    let few = ImageLandmarks {
        points: vec![Some([1.0, 1.0]); 5],
        vertices: None,
        weights: None,
        ..photo.landmarks.clone()
    };
    let wrong = PhotoView {
        landmarks: &few,
        ..view
    };
    let err = run(&[wrong], &config()).unwrap_err();
    assert!(err.to_string().contains("68"), "{err}");
}

/// The full objective on `photo` from its true parameters, the texture from `texture_model`.
fn refine_with_model(
    model: &MorphableModel,
    photo: &Photo,
    initial: &UvTexture,
    texture_model: &dyn ganfit_texture::TextureModel,
    config: &RefineConfig,
) -> ganfit_optim::Refinement {
    let net = FaceRecognitionNet::load(&Device::Cpu).unwrap();
    let view = PhotoView {
        image: &photo.image,
        landmarks: &photo.landmarks,
        params: &photo.truth,
    };
    refine(
        model,
        &net,
        &[view],
        initial,
        TextureSource::Model(texture_model),
        config,
        |_| {},
    )
    .unwrap()
}

#[test]
fn a_texture_model_has_its_latent_fitted() {
    use ganfit_texture::{Generator, GeneratorConfig, TextureModel};
    let model = ict();
    let photo = photo(&model);
    let generator = Generator::new_random(
        GeneratorConfig::progan(32, 16, 256, 32).unwrap(),
        3,
        &Device::Cpu,
    )
    .unwrap();
    let initial = UvTexture {
        size: 8,
        rgb: vec![0.5; 8 * 8 * 3],
        observed: vec![1.0; 64],
    };
    let config = RefineConfig {
        iterations: 8,
        seed: 5,
        ..config()
    };
    let result = refine_with_model(&model, &photo, &initial, &generator, &config);
    let start = generator.sample_latent(1, None, 5).unwrap();
    let latent = result.latent.expect("a model's latent is returned");
    assert_eq!(latent.dims(), &[1, 16]);
    let moved = (&latent - &start)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-3, "the latent did not move: {moved}");
    assert_eq!(result.albedo.dims(), &[32, 32, 3]);
    let history = &result.report.history;
    assert!(
        history
            .iter()
            .any(|r| r.terms.iter().any(|(n, _)| n == "texture prior"))
    );
    assert!(
        history
            .iter()
            .all(|r| r.terms.iter().all(|(n, _)| n != "texture symmetry")),
        "symmetry is a free UV map's prior"
    );
    assert!(result.report.best_loss < history[0].total);
}

#[test]
fn a_pca_model_starts_from_the_photos_unwrap_encoded() {
    use ganfit_texture::{PcaFitOptions, PcaTextureModel, TextureDataset};
    let model = ict();
    let photo = photo(&model);
    // Flat 8×8 maps whose colours span a plane: (0.3 + 0.5t, 0.2 + 0.3t, 0.1 + 0.3s).
    let colour = |t: f32, s: f32| [0.3 + 0.5 * t, 0.2 + 0.3 * t, 0.1 + 0.3 * s];
    let maps: Vec<f32> = [
        (0.1, 0.9),
        (0.5, 0.2),
        (0.9, 0.6),
        (0.3, 0.4),
        (0.7, 0.1),
        (0.2, 0.3),
    ]
    .into_iter()
    .flat_map(|(t, s)| colour(t, s).into_iter().flat_map(|c| [c; 64]))
    .collect();
    let maps = Tensor::from_vec(maps, (6, 3, 8, 8), &Device::Cpu).unwrap();
    let data = TextureDataset::new(maps, None).unwrap();
    let options = PcaFitOptions {
        components: 2,
        iterations: 100,
        ..PcaFitOptions::default()
    };
    let pca = PcaTextureModel::fit(&data, &options).unwrap();
    // The unwrap, twice the model's resolution, shows a colour of the plane.
    let target = colour(0.8, 0.7);
    let initial = UvTexture {
        size: 16,
        rgb: target.repeat(256),
        observed: vec![1.0; 256],
    };
    let config = RefineConfig {
        iterations: 1,
        latent_lr: 0.0,
        ..config()
    };
    let result = refine_with_model(&model, &photo, &initial, &pca, &config);
    let albedo: Vec<f32> = result.albedo.mean((0, 1)).unwrap().to_vec1().unwrap();
    for (got, want) in albedo.iter().zip(target) {
        assert!(
            (got - want).abs() < 0.02,
            "albedo {albedo:?}, unwrap {target:?}"
        );
    }
}
