//! Usable renderer gradients on the real face: Adam recovers a known rotation and translation of
//! the ICT mean face from a target render (shading + silhouette), and without antialiasing the
//! silhouette alone gives no pose gradient at all.

use candle_core::{D, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ganfit::morphable::MorphableModel;
use ganfit::render::{
    Appearance, Camera, Lighting, PhongLight, RenderOptions, Renderer, Scene, Triangles,
};

const SIZE: usize = 128;

struct Setup {
    /// Face vertices turned to face the camera and centred 60 cm in front of it, `[N, 3]`.
    vertices: Tensor,
    triangles: Triangles,
    albedo: Tensor,
    light: PhongLight,
}

fn setup() -> Setup {
    let device = Device::Cpu;
    let face = MorphableModel::ict(&ganfit::assets::Resolver::new(), &device)
        .unwrap()
        .region_model("face")
        .unwrap();
    let mean = face.mean();
    let centre = mean.mean_keepdim(0).unwrap();
    // Half turn about x (model y-up, z towards the viewer -> OpenCV camera), then 600 mm away.
    let flip = Tensor::new(&[1.0f32, -1.0, -1.0], &device).unwrap();
    let vertices = mean
        .broadcast_sub(&centre)
        .unwrap()
        .broadcast_mul(&flip)
        .unwrap()
        .broadcast_add(&Tensor::new(&[0.0f32, 0.0, 600.0], &device).unwrap())
        .unwrap();
    Setup {
        triangles: Triangles::new(face.triangles().to_vec(), face.n_vertices()).unwrap(),
        albedo: Tensor::full(0.8f32, (face.n_vertices(), 3), &device).unwrap(),
        light: PhongLight {
            direction: Tensor::new(&[[0.5f32, -0.4, -1.0]], &device).unwrap(),
            color: Tensor::new(&[[0.8f32, 0.8, 0.8]], &device).unwrap(),
            ambient: Tensor::new(&[[0.2f32, 0.2, 0.2]], &device).unwrap(),
            specular: 0.0,
            shininess: 8.0,
        },
        vertices,
    }
}

fn camera() -> Camera {
    let half = (SIZE as f64 - 1.0) / 2.0;
    // The face (about 16 cm wide at 60 cm) fills most of the frame.
    let focal = 3.8 * SIZE as f64;
    Camera::new(focal, focal, half, half, SIZE, SIZE, 10.0, 2000.0).unwrap()
}

/// Renders the face rotated about its own centre by `rotation` and moved by `translation`.
fn render(
    setup: &Setup,
    renderer: &Renderer,
    rotation: &Tensor,
    translation: &Tensor,
) -> (Tensor, Tensor) {
    let centre = Tensor::new(&[0.0f32, 0.0, 600.0], &Device::Cpu).unwrap();
    // Rotating about the face's centre keeps rotation and translation decoupled.
    let shift = (translation.unsqueeze(0).unwrap() + &centre.unsqueeze(0).unwrap()).unwrap();
    let local = setup.vertices.broadcast_sub(&centre).unwrap();
    let rendering = renderer
        .render(&Scene {
            vertices: &local,
            rotation: &rotation.unsqueeze(0).unwrap(),
            translation: &shift,
            appearance: Appearance::VertexColors(&setup.albedo),
            lighting: Lighting::Phong(&setup.light),
        })
        .unwrap();
    (rendering.image, rendering.mask)
}

/// Euclidean distance between two vectors.
fn distance(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn squared_error(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .mean_all()
        .unwrap()
}

#[test]
fn adam_recovers_a_known_pose_of_the_face() {
    let setup = setup();
    let renderer = Renderer::new(setup.triangles.clone(), camera(), RenderOptions::default());
    let true_rotation = Tensor::new(&[0.06f32, -0.09, 0.04], &Device::Cpu).unwrap();
    let true_translation = Tensor::new(&[4.0f32, -3.0, 10.0], &Device::Cpu).unwrap();
    let (target_image, target_mask) = render(&setup, &renderer, &true_rotation, &true_translation);

    let rotation = Var::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    let translation = Var::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut rotation_opt = AdamW::new(
        vec![rotation.clone()],
        ParamsAdamW {
            lr: 0.004,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut translation_opt = AdamW::new(
        vec![translation.clone()],
        ParamsAdamW {
            lr: 0.5,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for step in 0..250 {
        if step == 150 {
            rotation_opt.set_learning_rate(0.001);
            translation_opt.set_learning_rate(0.1);
        }
        let (image, mask) = render(
            &setup,
            &renderer,
            rotation.as_tensor(),
            translation.as_tensor(),
        );
        let loss =
            (squared_error(&image, &target_image) + squared_error(&mask, &target_mask)).unwrap();
        let grads = loss.backward().unwrap();
        rotation_opt.step(&grads).unwrap();
        translation_opt.step(&grads).unwrap();
    }
    let degrees = distance(rotation.as_tensor(), &true_rotation).to_degrees();
    let millimetres = distance(translation.as_tensor(), &true_translation);
    eprintln!("pose error: {degrees:.3} deg, {millimetres:.3} mm");
    assert!(degrees < 1.0, "rotation off by {degrees} deg");
    assert!(millimetres < 1.0, "translation off by {millimetres} mm");
}

#[test]
fn without_antialiasing_the_silhouette_gives_no_pose_gradient() {
    let setup = setup();
    let aliased = Renderer::new(
        setup.triangles.clone(),
        camera(),
        RenderOptions {
            antialias: false,
            ..RenderOptions::default()
        },
    );
    let smooth = Renderer::new(setup.triangles.clone(), camera(), RenderOptions::default());
    let target_rotation = Tensor::new(&[0.0f32, -0.1, 0.0], &Device::Cpu).unwrap();
    let (_, target_mask) = render(
        &setup,
        &smooth,
        &target_rotation,
        &Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    for (renderer, expect_gradient) in [(&aliased, false), (&smooth, true)] {
        let rotation = Var::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let translation = Var::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let (_, mask) = render(
            &setup,
            renderer,
            rotation.as_tensor(),
            translation.as_tensor(),
        );
        let grads = squared_error(&mask, &target_mask).backward().unwrap();
        let magnitude: f32 = [&rotation, &translation]
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .map(|g| {
                        g.abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                    })
                    .unwrap_or(0.0)
            })
            .sum();
        if expect_gradient {
            assert!(
                magnitude > 0.0,
                "antialiased silhouette has no pose gradient"
            );
        } else {
            assert_eq!(
                magnitude, 0.0,
                "aliased silhouette should have no pose gradient"
            );
        }
    }
}
