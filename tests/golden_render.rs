//! Golden image: the ICT mean face, grey and Phong-lit, rendered frontally at 256² must match
//! `tests/golden/ict_mean_face_256.png` (see `tests/golden/README.md` for the threshold).
//!
//! To re-bless after an intended change: `GANFIT_BLESS=1 cargo test --release --test golden_render`.

use candle_core::{Device, Tensor};
use ganfit::morphable::MorphableModel;
use ganfit::render::{
    Appearance, Camera, Lighting, PhongLight, RenderOptions, Renderer, Scene, Triangles,
};

const SIZE: usize = 256;
const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/ict_mean_face_256.png"
);

fn render_mean_face() -> image::RgbImage {
    let device = Device::Cpu;
    let face = MorphableModel::ict(&ganfit::assets::Resolver::new(), &device)
        .unwrap()
        .region_model("face")
        .unwrap();
    let triangles = Triangles::new(face.triangles().to_vec(), face.n_vertices()).unwrap();
    // The model is y-up with the face towards +z; the OpenCV camera looks along +z with y down,
    // hence the half turn about x. The face's centre sits 60 cm in front of the camera.
    let centre: Vec<f32> = face.mean().mean(0).unwrap().to_vec1().unwrap();
    let rotation = Tensor::new(&[[std::f32::consts::PI, 0.0, 0.0]], &device).unwrap();
    let translation = Tensor::new(&[[-centre[0], centre[1], centre[2] + 600.0]], &device).unwrap();
    let half = (SIZE as f64 - 1.0) / 2.0;
    let camera = Camera::new(900.0, 900.0, half, half, SIZE, SIZE, 10.0, 2000.0).unwrap();
    let grey = Tensor::full(0.8f32, (face.n_vertices(), 3), &device).unwrap();
    let light = PhongLight {
        direction: Tensor::new(&[[0.4f32, -0.5, -1.0]], &device).unwrap(),
        color: Tensor::new(&[[0.8f32, 0.8, 0.8]], &device).unwrap(),
        ambient: Tensor::new(&[[0.25f32, 0.25, 0.25]], &device).unwrap(),
        specular: 0.2,
        shininess: 16.0,
    };
    let renderer = Renderer::new(triangles, camera, RenderOptions::default());
    let rendering = renderer
        .render(&Scene {
            vertices: face.mean(),
            rotation: &rotation,
            translation: &translation,
            appearance: Appearance::VertexColors(&grey),
            lighting: Lighting::Phong(&light),
        })
        .unwrap();
    let rgb: Vec<f32> = rendering.image.flatten_all().unwrap().to_vec1().unwrap();
    image::RgbImage::from_fn(SIZE as u32, SIZE as u32, |x, y| {
        let i = (y as usize * SIZE + x as usize) * 3;
        image::Rgb([0, 1, 2].map(|c| (rgb[i + c].clamp(0.0, 1.0) * 255.0).round() as u8))
    })
}

#[test]
fn ict_mean_face_matches_the_golden_image() {
    let rendered = render_mean_face();
    if std::env::var_os("GANFIT_BLESS").is_some() {
        rendered.save(GOLDEN).unwrap();
    }
    let golden = image::open(GOLDEN)
        .expect("golden image missing: run with GANFIT_BLESS=1 once")
        .to_rgb8();
    assert_eq!(golden.dimensions(), rendered.dimensions());
    let total: u64 = golden
        .as_raw()
        .iter()
        .zip(rendered.as_raw())
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum();
    let mean = total as f64 / golden.as_raw().len() as f64;
    // The face must cover a real part of the frame, or the comparison says little.
    let covered = rendered.pixels().filter(|p| p.0 != [0, 0, 0]).count();
    assert!(covered > SIZE * SIZE / 5, "only {covered} pixels drawn");
    assert!(
        mean <= 0.5,
        "mean absolute difference {mean:.3} grey levels"
    );
}
