use candle_core::{D, Tensor};

use crate::model::cross;
use crate::{MorphableError, Result};

/// Area-weighted unit vertex normals of `vertices` (`[N, 3]` or `[B, N, 3]`) for `triangles`
/// (`[T, 3]` u32, counter-clockwise seen from outside), differentiable through candle autograd.
/// A vertex in no triangle gets a zero normal.
pub fn vertex_normals(vertices: &Tensor, triangles: &Tensor) -> Result<Tensor> {
    let batched = match vertices.rank() {
        2 => false,
        3 => true,
        r => {
            return Err(MorphableError::Coefficients(format!(
                "vertices must be [N, 3] or [B, N, 3], got rank {r}"
            )));
        }
    };
    let v = if batched {
        vertices.clone()
    } else {
        vertices.unsqueeze(0)?
    };
    let (b, n, c) = v.dims3()?;
    let (t, three) = triangles.dims2()?;
    if c != 3 || three != 3 {
        return Err(MorphableError::Coefficients(format!(
            "vertices {:?} and triangles {:?} must both have 3 columns",
            vertices.dims(),
            triangles.dims()
        )));
    }
    let corner_ids = triangles.flatten_all()?;
    let corners = v.index_select(&corner_ids, 1)?.reshape((b, t, 3, 3))?;
    let p0 = corners.narrow(2, 0, 1)?;
    let e1 = (corners.narrow(2, 1, 1)? - &p0)?;
    let e2 = (corners.narrow(2, 2, 1)? - &p0)?;
    // Twice the triangle's area times its unit normal: summing these weights faces by area.
    let face = cross(&e1, &e2)?;
    let per_corner = face.broadcast_as((b, t, 3, 3))?.reshape((b, 3 * t, 3))?;
    let summed =
        Tensor::zeros((b, n, 3), v.dtype(), v.device())?.index_add(&corner_ids, &per_corner, 1)?;
    let norm = (summed.sqr()?.sum_keepdim(D::Minus1)? + 1e-20)?.sqrt()?;
    let normals = summed.broadcast_div(&norm)?;
    Ok(if batched {
        normals
    } else {
        normals.squeeze(0)?
    })
}
