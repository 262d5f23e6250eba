//! Bad input gives typed errors with actionable messages, never panics.

use candle_core::{DType, Device, Tensor};
use ganfit_render::{
    Camera, PhongLight, RasterOptions, RenderError, Triangles, WrapMode, antialias,
    camera_from_world, interpolate, rasterize, shade_phong, shade_sh, texture,
};

fn tri() -> Triangles {
    Triangles::new(vec![[0, 1, 2]], 3).unwrap()
}

fn clip() -> Tensor {
    Tensor::new(
        &[[
            [-0.5f32, -0.5, 0.0, 1.0],
            [0.5, -0.5, 0.0, 1.0],
            [0.0, 0.5, 0.0, 1.0],
        ]],
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn out_of_range_vertex_index() {
    let err = Triangles::new(vec![[0, 1, 3]], 3).unwrap_err();
    assert!(matches!(
        err,
        RenderError::VertexIndex {
            triangle: 0,
            vertex: 3,
            num_vertices: 3
        }
    ));
    assert!(err.to_string().contains("0-based"));
    let negative = Tensor::new(&[[0i64, -1, 2]], &Device::Cpu).unwrap();
    assert!(matches!(
        Triangles::from_tensor(&negative, 3),
        Err(RenderError::VertexIndex { .. })
    ));
}

#[test]
fn too_many_triangles() {
    // A broadcast tensor has the shape without the memory.
    let huge = Tensor::zeros((1, 3), DType::U32, &Device::Cpu)
        .unwrap()
        .broadcast_as((1 << 24, 3))
        .unwrap();
    let err = Triangles::from_tensor(&huge, 3).unwrap_err();
    assert!(matches!(err, RenderError::TooManyTriangles(16_777_216)));
    assert!(err.to_string().contains("split the mesh"));
}

#[test]
fn wrong_shapes_and_dtypes() {
    let flat = clip().squeeze(0).unwrap();
    let err = rasterize(&flat, &tri(), 4, 4, RasterOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            RenderError::Shape {
                what: "clip_pos",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[B, V, 4]"));
    let ints = clip().to_dtype(DType::U32).unwrap();
    let err = rasterize(&ints, &tri(), 4, 4, RasterOptions::default()).unwrap_err();
    assert!(matches!(err, RenderError::DType { .. }), "{err}");
    assert!(err.to_string().contains("to_dtype"));
    let wrong_count = Triangles::new(vec![[0, 1, 2]], 4).unwrap();
    let err = rasterize(&clip(), &wrong_count, 4, 4, RasterOptions::default()).unwrap_err();
    assert!(matches!(err, RenderError::Shape { .. }), "{err}");
    let bad_tris = Tensor::new(&[[0u32, 1]], &Device::Cpu).unwrap();
    assert!(matches!(
        Triangles::from_tensor(&bad_tris, 3),
        Err(RenderError::Shape { .. })
    ));
    let float_tris = Tensor::new(&[[0f32, 1.0, 2.0]], &Device::Cpu).unwrap();
    assert!(matches!(
        Triangles::from_tensor(&float_tris, 3),
        Err(RenderError::DType { .. })
    ));
    let rast = rasterize(&clip(), &tri(), 4, 4, RasterOptions::default()).unwrap();
    let f64_attr = Tensor::zeros((3, 2), DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(
        interpolate(&f64_attr, &rast, &tri()),
        Err(RenderError::DType { .. })
    ));
    let uv = Tensor::zeros((1, 2, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let tex = Tensor::zeros((1, 2, 2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        texture(&tex, &uv, WrapMode::Clamp),
        Err(RenderError::Shape { what: "uv", .. })
    ));
    let empty_tex = Tensor::zeros((1, 0, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let uv = Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        texture(&empty_tex, &uv, WrapMode::Clamp),
        Err(RenderError::Shape { what: "tex", .. })
    ));
    let color = Tensor::zeros((1, 3, 4, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        antialias(&color, &rast, &clip(), &tri()),
        Err(RenderError::Shape { .. })
    ));
    let sh = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let px = Tensor::zeros((1, 5, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        shade_sh(&px, &px, &sh),
        Err(RenderError::Shape {
            what: "sh coeffs",
            ..
        })
    ));
}

#[test]
fn uv_layout_with_another_triangle_count() {
    use ganfit_render::{Appearance, Lighting, RenderOptions, Renderer, Scene};
    let cam = Camera::new(10.0, 10.0, 2.0, 2.0, 5, 5, 0.1, 10.0).unwrap();
    let renderer = Renderer::new(tri(), cam, RenderOptions::default());
    let verts = Tensor::new(
        &[[-1f32, -1.0, 3.0], [1.0, -1.0, 3.0], [0.0, 1.0, 3.0]],
        &Device::Cpu,
    )
    .unwrap();
    let pose = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
    let uv = Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
    let tex = Tensor::zeros((2, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let uv_tris = Triangles::new(vec![[0, 1, 2], [1, 2, 3]], 4).unwrap();
    let scene = Scene {
        vertices: &verts,
        rotation: &pose,
        translation: &pose,
        appearance: Appearance::Texture {
            texture: &tex,
            uv: &uv,
            uv_triangles: Some(&uv_tris),
            wrap: WrapMode::Clamp,
        },
        lighting: Lighting::Unlit,
    };
    let err = renderer.render(&scene).unwrap_err();
    assert!(
        matches!(
            err,
            RenderError::Shape {
                what: "uv_triangles",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn batch_mismatch() {
    let rast = rasterize(&clip(), &tri(), 4, 4, RasterOptions::default()).unwrap();
    let attr = Tensor::zeros((2, 3, 1), DType::F32, &Device::Cpu).unwrap();
    let err = interpolate(&attr, &rast, &tri()).unwrap_err();
    assert!(
        matches!(
            err,
            RenderError::Batch {
                what: "attr",
                got: 2,
                expected: 1
            }
        ),
        "{err}"
    );
    let pts = Tensor::zeros((3, 5, 3), DType::F32, &Device::Cpu).unwrap();
    let pose = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        camera_from_world(&pts, &pose, &pose),
        Err(RenderError::Batch { .. })
    ));
}

#[test]
fn empty_image_and_bad_camera() {
    let err = rasterize(&clip(), &tri(), 0, 4, RasterOptions::default()).unwrap_err();
    assert!(matches!(
        err,
        RenderError::EmptyImage {
            height: 0,
            width: 4
        }
    ));
    assert!(matches!(
        Camera::new(100.0, 100.0, 2.0, 2.0, 4, 0, 0.1, 10.0),
        Err(RenderError::EmptyImage { .. })
    ));
    let err = Camera::new(-1.0, 100.0, 2.0, 2.0, 4, 4, 0.1, 10.0).unwrap_err();
    assert!(matches!(err, RenderError::Camera(_)) && err.to_string().contains("focal"));
    let err = Camera::new(100.0, 100.0, 2.0, 2.0, 4, 4, 1.0, 0.5).unwrap_err();
    assert!(err.to_string().contains("near < far"));
}

#[test]
fn phong_inputs_must_agree() {
    let px = Tensor::ones((2, 5, 3), DType::F32, &Device::Cpu).unwrap();
    let light = |batch: usize| PhongLight {
        direction: Tensor::ones((batch, 3), DType::F32, &Device::Cpu).unwrap(),
        color: Tensor::ones((batch, 3), DType::F32, &Device::Cpu).unwrap(),
        ambient: Tensor::ones((batch, 3), DType::F32, &Device::Cpu).unwrap(),
        specular: 0.2,
        shininess: 4.0,
    };
    let err = shade_phong(&px, &px, &px, &light(1)).unwrap_err();
    assert!(matches!(
        err,
        RenderError::Shape {
            what: "light direction",
            ..
        }
    ));
    assert!(err.to_string().contains("one light per image"));
    let short_view = px.narrow(1, 0, 4).unwrap();
    let err = shade_phong(&px, &px, &short_view, &light(2)).unwrap_err();
    assert!(matches!(err, RenderError::Shape { what: "view", .. }));
    let err = shade_phong(&px.to_dtype(DType::F64).unwrap(), &px, &px, &light(2)).unwrap_err();
    assert!(matches!(err, RenderError::DType { what: "albedo", .. }));
    assert!(shade_phong(&px, &px, &px, &light(2)).is_ok());
}
