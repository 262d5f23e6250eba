//! The ICT model on a CUDA device against the CPU: instances (cuBLAS products there, the fused
//! `AffineBlend` kernel here) and vertex normals, with vector-Jacobian products for random
//! cotangents. Both sides compute in f32 and sum in different orders, so vertices must agree to
//! 1e-5 of their scale (a face is ~200 mm across: ~2 µm). The normals are compared on the very
//! same vertices: fed each side's own instance they would differ by the turn that those ~2 µm
//! give ICT's shortest edges (0.06 mm, in the eyelids), ~3e-3, which says nothing about the
//! normal kernels; on equal vertices only their own rounding remains, so 1e-4 for the normals
//! and the vertex gradient through them. Built only with the `cuda` feature and run on a
//! machine with a GPU by scripts/device-check.sh (which brings the converted model).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::ict;
use ganfit_assets::Resolver;
use ganfit_morphable::MorphableModel;
use ganfit_testkit::{gpu, pseudo_random, relative_error};

fn tensor(data: Vec<f64>, dims: &[usize], device: &Device) -> Tensor {
    Tensor::from_vec(data, dims, device)
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap()
}

/// Vertices of `model` for the coefficients, and the gradients of `<vertices, a>` with respect
/// to both coefficient vectors.
fn instance_with_vjp(
    model: &MorphableModel,
    shape: &[f64],
    expression: &[f64],
    batch: usize,
) -> [Tensor; 3] {
    let device = model.device();
    let dims = |len: usize| {
        if batch == 0 {
            vec![len]
        } else {
            vec![batch, len / batch]
        }
    };
    let shape = Var::from_tensor(&tensor(shape.to_vec(), &dims(shape.len()), device)).unwrap();
    let expression = Var::from_tensor(&tensor(
        expression.to_vec(),
        &dims(expression.len()),
        device,
    ))
    .unwrap();
    let vertices = model.instance(&shape, &expression).unwrap();
    let grads = (&vertices * cotangent(&vertices, 21))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    [
        vertices,
        grads.get(shape.as_tensor()).unwrap().clone(),
        grads.get(expression.as_tensor()).unwrap().clone(),
    ]
}

/// Normals of `model` at `vertices` (moved to its device) and the gradient of `<normals, b>`
/// with respect to the vertices.
fn normals_with_vjp(model: &MorphableModel, vertices: &Tensor) -> [Tensor; 2] {
    let vertices = Var::from_tensor(&vertices.to_device(model.device()).unwrap()).unwrap();
    let normals = model.vertex_normals(vertices.as_tensor()).unwrap();
    let grads = (&normals * cotangent(&normals, 22))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = grads.get(vertices.as_tensor()).unwrap().clone();
    [normals, grad]
}

/// A deterministic random cotangent shaped and placed like `t`.
fn cotangent(t: &Tensor, seed: u64) -> Tensor {
    tensor(pseudo_random(t.elem_count(), seed), t.dims(), t.device())
}

#[test]
fn cuda_instances_normals_and_their_gradients_match_cpu() {
    let cpu = ict();
    let on_gpu = MorphableModel::ict(&Resolver::new(), &gpu()).expect("ICT model");
    let (ks, ke) = (cpu.shape_modes(), cpu.expression_modes());
    // One face with every mode, and a batch of three using only the first modes.
    for (batch, ks, ke) in [(0, ks, ke), (3, 40, 12)] {
        let faces = batch.max(1);
        let shape: Vec<f64> = pseudo_random(faces * ks, 1)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let expression: Vec<f64> = pseudo_random(faces * ke, 2)
            .iter()
            .map(|v| 0.5 * (v + 1.0))
            .collect();
        let mut expected = instance_with_vjp(cpu, &shape, &expression, batch).to_vec();
        let mut got = instance_with_vjp(&on_gpu, &shape, &expression, batch).to_vec();
        expected.extend(normals_with_vjp(cpu, &expected[0]));
        got.extend(normals_with_vjp(&on_gpu, &expected[0]));
        let checks = [
            ("vertices", 1e-5),
            ("shape gradient", 1e-4),
            ("expression gradient", 1e-4),
            ("normals", 1e-4),
            ("vertex gradient through the normals", 1e-4),
        ];
        for (((what, tolerance), e), g) in checks.iter().zip(&expected).zip(&got) {
            let error = relative_error(e, g);
            eprintln!("batch {batch}, {ks} + {ke} modes: {what} {error:.1e}");
            assert!(
                error < *tolerance,
                "batch {batch}: {what} differ by {error}"
            );
        }
    }
}
