//! Validated triangle index lists and their edge adjacency.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};

use crate::error::{RenderError, Result};

/// Marks "no neighbouring triangle" in the adjacency table.
pub(crate) const NO_NEIGHBOUR: u32 = u32::MAX;

/// Largest triangle count whose `id + 1` is exact in an f32 channel.
const MAX_TRIANGLES: usize = (1 << 24) - 1;

/// A triangle index list checked against a vertex count, shared cheaply (clones are `Arc`s).
///
/// Each triangle is `[i0, i1, i2]` (0-based vertex indices). Its edge `k` joins corner `k` and
/// corner `(k + 1) % 3`. The edge adjacency used by [`crate::antialias`] is built on first use.
#[derive(Clone, Debug)]
pub struct Triangles {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    indices: Vec<[u32; 3]>,
    num_vertices: usize,
    neighbours: OnceLock<Vec<[u32; 3]>>,
    #[cfg(feature = "cuda")]
    gpu: crate::cuda::GpuTriangles,
}

impl Triangles {
    /// Checks that every index is below `num_vertices`.
    pub fn new(indices: Vec<[u32; 3]>, num_vertices: usize) -> Result<Self> {
        if indices.len() > MAX_TRIANGLES {
            return Err(RenderError::TooManyTriangles(indices.len()));
        }
        for (triangle, tri) in indices.iter().enumerate() {
            if let Some(&vertex) = tri.iter().find(|&&v| v as usize >= num_vertices) {
                return Err(RenderError::VertexIndex {
                    triangle,
                    vertex: vertex.into(),
                    num_vertices,
                });
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                indices,
                num_vertices,
                neighbours: OnceLock::new(),
                #[cfg(feature = "cuda")]
                gpu: Default::default(),
            }),
        })
    }

    /// Reads a `[T, 3]` tensor of `u32` or `i64` indices.
    pub fn from_tensor(indices: &Tensor, num_vertices: usize) -> Result<Self> {
        let dims = indices.dims();
        if dims.len() != 2 || dims[1] != 3 {
            return Err(RenderError::Shape {
                what: "triangles",
                expected: "[T, 3]".into(),
                got: dims.to_vec(),
            });
        }
        if dims[0] > MAX_TRIANGLES {
            return Err(RenderError::TooManyTriangles(dims[0]));
        }
        let flat: Vec<i64> = match indices.dtype() {
            DType::U32 | DType::I64 | DType::U8 => {
                indices.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?
            }
            got => {
                return Err(RenderError::DType {
                    what: "triangles (must be u32 or i64 indices)",
                    got,
                });
            }
        };
        let mut tris = Vec::with_capacity(flat.len() / 3);
        for (triangle, c) in flat.chunks_exact(3).enumerate() {
            let mut tri = [0u32; 3];
            for (slot, &v) in tri.iter_mut().zip(c) {
                *slot = u32::try_from(v)
                    .ok()
                    .filter(|&v| (v as usize) < num_vertices)
                    .ok_or(RenderError::VertexIndex {
                        triangle,
                        vertex: v as u64,
                        num_vertices,
                    })?;
            }
            tris.push(tri);
        }
        Self::new(tris, num_vertices)
    }

    /// The triangles.
    pub fn as_slice(&self) -> &[[u32; 3]] {
        &self.inner.indices
    }

    /// The list's copy in GPU memory, made on first use.
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_copy(&self) -> &crate::cuda::GpuTriangles {
        &self.inner.gpu
    }

    /// Number of triangles.
    pub fn len(&self) -> usize {
        self.inner.indices.len()
    }

    /// True when there are no triangles.
    pub fn is_empty(&self) -> bool {
        self.inner.indices.is_empty()
    }

    /// Number of vertices the indices refer into.
    pub fn num_vertices(&self) -> usize {
        self.inner.num_vertices
    }

    /// The indices as a `[T, 3]` u32 tensor on `device`.
    pub fn to_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        let flat: Vec<u32> = self.as_slice().iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (self.len(), 3), device)?)
    }

    /// For triangle `t` and edge `k` (from corner k to corner k + 1), the other triangle sharing
    /// that edge, or `u32::MAX` when the edge is on the mesh boundary or shared by more than two
    /// triangles.
    pub fn neighbours(&self) -> &[[u32; 3]] {
        self.inner.neighbours.get_or_init(|| {
            let tris = self.as_slice();
            let mut owners: HashMap<(u32, u32), Vec<(u32, usize)>> = HashMap::new();
            for (t, tri) in tris.iter().enumerate() {
                for k in 0..3 {
                    let (a, b) = (tri[k], tri[(k + 1) % 3]);
                    owners
                        .entry((a.min(b), a.max(b)))
                        .or_default()
                        .push((t as u32, k));
                }
            }
            let mut neighbours = vec![[NO_NEIGHBOUR; 3]; tris.len()];
            for sharing in owners.values() {
                if let [(t0, k0), (t1, k1)] = sharing[..] {
                    neighbours[t0 as usize][k0] = t1;
                    neighbours[t1 as usize][k1] = t0;
                }
            }
            neighbours
        })
    }
}
