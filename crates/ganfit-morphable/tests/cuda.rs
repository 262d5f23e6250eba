//! The ICT model on a CUDA device against the CPU: instances (cuBLAS products there, the fused
//! `AffineBlend` kernel here) and vertex normals, with vector-Jacobian products for random
//! cotangents. Both sides compute in f32 and sum in different orders, so vertices must agree to
//! 1e-5 of their scale (a face is ~200 mm across: ~2 µm); normals and the gradients through
//! them to 1e-4, since a normal turns by the rounding of its short edges (~1 mm) divided by
//! their length. Built only with the `cuda` feature and
//! run on a machine with a GPU by scripts/device-check.sh (which brings the converted model).
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

/// Vertices and normals of `model` for the coefficients, and the gradients of
/// `<vertices, a> + <normals, b>` with respect to both coefficient vectors.
fn instance_with_vjp(
    model: &MorphableModel,
    shape: &[f64],
    expression: &[f64],
    batch: usize,
) -> [Tensor; 4] {
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
    let normals = model.vertex_normals(&vertices).unwrap();
    let cotangent =
        |t: &Tensor, seed| tensor(pseudo_random(t.elem_count(), seed), t.dims(), device);
    let objective = ((&vertices * cotangent(&vertices, 21))
        .unwrap()
        .sum_all()
        .unwrap()
        + (&normals * cotangent(&normals, 22))
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = objective.backward().unwrap();
    [
        vertices,
        normals,
        grads.get(shape.as_tensor()).unwrap().clone(),
        grads.get(expression.as_tensor()).unwrap().clone(),
    ]
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
        let expected = instance_with_vjp(cpu, &shape, &expression, batch);
        let got = instance_with_vjp(&on_gpu, &shape, &expression, batch);
        let checks = [
            ("vertices", 1e-5),
            ("normals", 1e-4),
            ("shape gradient", 1e-4),
            ("expression gradient", 1e-4),
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
