//! The GPU kernels of kernels/render.cu, compiled for the host (tests/cuda_on_host) and run one
//! item at a time, against the CPU ops on the same inputs: forward outputs bit for bit
//! (triangle ids, barycentrics, depths, interpolated and sampled values), gradients to 1e-10 of
//! their scale (the GPU adds them atomically, in another order).
//!
//! This checks the kernels' arithmetic and indexing on any machine with a C++ compiler; the
//! device check (scripts/device-check.sh) runs the same kernels on a GPU through candle.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor, WithDType};
use common::{Rng, bumpy_sphere, camera, random_clip_mesh, vjp};
use ganfit_render::{
    PhongLight, RasterOptions, Triangles, WrapMode, antialias, interpolate, normalize, rasterize,
    shade_phong, shade_sh, texture, vertex_normals,
};

/// The kernels' float types and their entry-point suffixes.
trait Float: WithDType + Default {
    const SUFFIX: &'static str;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Float for f64 {
    const SUFFIX: &'static str = "f64";
}

/// The host build of the kernels, compiled once per test process.
struct Kernels {
    library: libloading::Library,
    _dir: tempfile::TempDir,
}

fn kernels() -> &'static Kernels {
    static KERNELS: OnceLock<Kernels> = OnceLock::new();
    KERNELS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libganfit_render_kernels.so");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_on_host/emulation.cpp");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        // No contraction into FMAs, as the GPU build (build.rs) and Rust's own arithmetic.
        let status = Command::new(&compiler)
            .args([
                "-std=c++17",
                "-O2",
                "-ffp-contract=off",
                "-fPIC",
                "-shared",
                "-o",
            ])
            .arg(&library)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| panic!("these tests need a C++ compiler ({compiler}): {e}"));
        assert!(
            status.success(),
            "{compiler} failed on {}",
            source.display()
        );
        let library = unsafe { libloading::Library::new(&library) }.unwrap();
        Kernels { library, _dir: dir }
    })
}

impl Kernels {
    /// The entry point `name` (without suffix) of type `F`.
    fn get<F: Copy>(&self, name: &str) -> F {
        unsafe { *self.library.get::<F>(name.as_bytes()).unwrap() }
    }

    /// Runs `kernel` for items `0..items`, as a launch over that many threads would.
    fn launch(&self, items: usize, mut kernel: impl FnMut()) {
        let select: unsafe extern "C" fn(u32) = self.get("emulation_select_item");
        for item in 0..items {
            unsafe { select(item as u32) };
            kernel();
        }
    }
}

fn values<T: Float>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn indices(tris: &Triangles) -> Vec<u32> {
    tris.as_slice().iter().flatten().copied().collect()
}

/// `rasterize` the way src/cuda.rs launches it: setup, clear, nearest depth, lowest id at that
/// depth, resolve.
fn rasterize_on_host<T: Float>(
    clip: &[T],
    tris: &[u32],
    (batch, nv, h, w): (usize, usize, usize, usize),
    cull: bool,
) -> Vec<T> {
    type Setup<T> =
        unsafe extern "C" fn(*const T, *const u32, i32, i32, i32, i32, i32, i32, *mut T, *mut i32);
    type Clear = unsafe extern "C" fn(i64, *mut u64, *mut u32);
    type Draw<T> =
        unsafe extern "C" fn(*const T, *const i32, i32, i32, i32, i32, i32, *mut u64, *mut u32);
    type Resolve<T> = unsafe extern "C" fn(*const T, *const u32, i32, i32, i32, i32, *mut T);
    let k = kernels();
    let s = T::SUFFIX;
    let nt = tris.len() / 3;
    let pixels = batch * h * w;
    let (mut setups, mut boxes) = (
        vec![T::default(); batch * nt * 15],
        vec![0i32; batch * nt * 5],
    );
    let (mut depth, mut ids) = (vec![0u64; pixels], vec![0u32; pixels]);
    let mut rast = vec![T::default(); pixels * 4];
    let (b, nv, nt32, h32, w32) = (batch as i32, nv as i32, nt as i32, h as i32, w as i32);
    let setup: Setup<T> = k.get(&format!("raster_setup_{s}"));
    k.launch(batch * nt, || unsafe {
        setup(
            clip.as_ptr(),
            tris.as_ptr(),
            b,
            nv,
            nt32,
            h32,
            w32,
            cull.into(),
            setups.as_mut_ptr(),
            boxes.as_mut_ptr(),
        )
    });
    let clear: Clear = k.get("raster_clear_keys");
    k.launch(pixels, || unsafe {
        clear(pixels as i64, depth.as_mut_ptr(), ids.as_mut_ptr())
    });
    let draw: Draw<T> = k.get(&format!("raster_draw_{s}"));
    for mode in 0..2 {
        k.launch(batch * nt, || unsafe {
            draw(
                setups.as_ptr(),
                boxes.as_ptr(),
                b,
                nt32,
                h32,
                w32,
                mode,
                depth.as_mut_ptr(),
                ids.as_mut_ptr(),
            )
        });
    }
    let resolve: Resolve<T> = k.get(&format!("raster_resolve_{s}"));
    k.launch(pixels, || unsafe {
        resolve(
            setups.as_ptr(),
            ids.as_ptr(),
            b,
            nt32,
            h32,
            w32,
            rast.as_mut_ptr(),
        )
    });
    rast
}

/// Scenes that exercise the rasteriser: random triangles with shared edges, some crossing the
/// near plane or behind the camera; an exact depth tie; pixel centres on edges; a closed bumpy
/// sphere seen from outside.
fn scenes() -> Vec<(Tensor, Triangles)> {
    let mut rng = Rng::new(7);
    let (random, random_tris) = random_clip_mesh(&mut rng, 2, 80);
    // Pull some corners behind the camera and through the near plane.
    let mut data: Vec<f64> = values(&random);
    for (i, c) in data.chunks_exact_mut(4).enumerate() {
        match i % 17 {
            0 => c[3] = -c[3],
            5 => c[2] = -1.5 * c[3],
            _ => {}
        }
    }
    let random = Tensor::from_vec(data, random.shape(), &Device::Cpu).unwrap();
    // Two copies of one triangle: the lower id must win the tie.
    let tie = Tensor::new(
        &[[
            [-0.8f64, -0.7, 0.1, 1.0],
            [0.9, -0.6, 0.1, 1.0],
            [0.0, 0.9, 0.1, 1.0],
        ]],
        &Device::Cpu,
    )
    .unwrap();
    let tie_tris = Triangles::new(vec![[0, 1, 2], [0, 1, 2]], 3).unwrap();
    // A grid with its vertices on pixel centres, so that many centres lie exactly on edges
    // (horizontal, vertical and both diagonals): the top-left rule decides them.
    let centre = |i: usize, n: usize| (2 * i + 1) as f64 / n as f64 - 1.0;
    let cells = 8;
    let mut grid = Vec::new();
    for j in 0..=cells {
        for i in 0..=cells {
            grid.extend([centre(2 + 3 * i, 53), centre(3 + 3 * j, 37), 0.25, 1.0]);
        }
    }
    let id = |i: usize, j: usize| (j * (cells + 1) + i) as u32;
    let mut grid_tris = Vec::new();
    for j in 0..cells {
        for i in 0..cells {
            let (a, b, c, d) = (id(i, j), id(i + 1, j), id(i, j + 1), id(i + 1, j + 1));
            if (i + j) % 2 == 0 {
                grid_tris.extend([[a, c, b], [b, c, d]]);
            } else {
                grid_tris.extend([[a, d, b], [a, c, d]]);
            }
        }
    }
    let grid_nv = grid.len() / 4;
    let grid = Tensor::from_vec(grid, (1, grid_nv, 4), &Device::Cpu).unwrap();
    let grid_tris = Triangles::new(grid_tris, grid_nv).unwrap();
    let (verts, tris) = bumpy_sphere(12, 20, 1.0, 0.15);
    let nv = verts.len() / 3;
    let cam = camera(53, 37);
    let points = Tensor::from_vec(verts, (1, nv, 3), &Device::Cpu).unwrap();
    let translation = Tensor::new(&[0.1f64, -0.05, 3.0], &Device::Cpu).unwrap();
    let sphere = cam
        .to_clip(&points.broadcast_add(&translation).unwrap())
        .unwrap();
    let sphere_tris = Triangles::new(tris, nv).unwrap();
    vec![
        (random, random_tris),
        (tie, tie_tris),
        (grid, grid_tris),
        (sphere, sphere_tris),
    ]
}

fn check_rasterizer<T: Float>() {
    let (h, w) = (37, 53);
    for (clip, tris) in scenes() {
        let clip = clip.to_dtype(T::DTYPE).unwrap();
        let (batch, nv, _) = clip.dims3().unwrap();
        for cull in [false, true] {
            let options = RasterOptions {
                cull_backfaces: cull,
            };
            let cpu: Vec<T> = values(&rasterize(&clip, &tris, h, w, options).unwrap());
            let gpu = rasterize_on_host(
                &values::<T>(&clip),
                &indices(&tris),
                (batch, nv, h, w),
                cull,
            );
            let covered = cpu.chunks(4).filter(|p| p[3].to_f64() > 0.0).count();
            assert!(cull || covered > 50, "only {covered} pixels covered");
            let differing = cpu
                .iter()
                .zip(&gpu)
                .filter(|(a, b)| a.to_f64().to_bits() != b.to_f64().to_bits())
                .count();
            assert_eq!(
                differing,
                0,
                "{} {cull}: {differing} of {} values differ",
                T::SUFFIX,
                cpu.len()
            );
        }
    }
}

#[test]
fn rasterizer_matches_the_cpu_bit_for_bit() {
    check_rasterizer::<f32>();
    check_rasterizer::<f64>();
}

/// Largest entry-wise difference relative to the largest magnitude of `expected`.
fn relative_error(expected: &[f64], got: &[f64]) -> f64 {
    assert_eq!(expected.len(), got.len());
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "an all-zero gradient checks nothing");
    expected
        .iter()
        .zip(got)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// The gradients of `Σ cot ⊙ f(inputs)` with respect to each input, by the CPU ops.
fn cpu_vjp(inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Tensor, cot: &Tensor) -> Vec<Vec<f64>> {
    let inputs: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
    vjp(&inputs, f, cot).iter().map(values).collect()
}

#[test]
fn rasterizer_gradient_matches_the_cpu() {
    type Grad = unsafe extern "C" fn(
        *const f64,
        *const u32,
        *const f64,
        *const f64,
        i32,
        i32,
        i32,
        i32,
        *mut f64,
    );
    let (h, w) = (37, 53);
    let mut rng = Rng::new(21);
    for (clip, tris) in scenes() {
        let (batch, nv, _) = clip.dims3().unwrap();
        let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
        let cot = rng.tensor(&[batch, h, w, 4], -1.0, 1.0);
        let draw = |t: &[Tensor]| rasterize(&t[0], &tris, h, w, RasterOptions::default()).unwrap();
        let cpu = cpu_vjp(&[&clip], draw, &cot).remove(0);
        let mut gpu = vec![0.0; cpu.len()];
        let grad: Grad = kernels().get("raster_grad_f64");
        let (clip, tri_ids, rast, cot) = (
            values::<f64>(&clip),
            indices(&tris),
            values::<f64>(&rast),
            values::<f64>(&cot),
        );
        kernels().launch(batch * h * w, || unsafe {
            grad(
                clip.as_ptr(),
                tri_ids.as_ptr(),
                rast.as_ptr(),
                cot.as_ptr(),
                batch as i32,
                nv as i32,
                h as i32,
                w as i32,
                gpu.as_mut_ptr(),
            )
        });
        let error = relative_error(&cpu, &gpu);
        assert!(error < 1e-10, "relative error {error:e}");
    }
}

#[test]
fn interpolation_matches_the_cpu() {
    type Fwd<T> =
        unsafe extern "C" fn(*const T, *const T, *const u32, i32, i32, i32, i32, i64, i64, *mut T);
    type Bwd = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const f64,
        *const u32,
        i32,
        i32,
        i32,
        i32,
        i64,
        i64,
        *mut f64,
        *mut f64,
    );
    let (h, w, c) = (37, 53, 5);
    let mut rng = Rng::new(33);
    let (clip, tris) = scenes().remove(0);
    let (batch, nv, _) = clip.dims3().unwrap();
    let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
    let tri_ids = indices(&tris);
    let nt = tris.len() as i32;
    let k = kernels();
    for attr_batch in [1, batch] {
        let attr = rng.tensor(&[attr_batch, nv, c], -2.0, 2.0);
        let dims = (
            nt,
            attr_batch as i32,
            nv as i32,
            c as i32,
            (h * w) as i64,
            (batch * h * w) as i64,
        );
        // Forward, in both float types.
        fn forward<T: Float>(
            attr: &Tensor,
            rast: &Tensor,
            tris: &Triangles,
            ids: &[u32],
            dims: (i32, i32, i32, i32, i64, i64),
        ) {
            let (attr, rast) = (
                attr.to_dtype(T::DTYPE).unwrap(),
                rast.to_dtype(T::DTYPE).unwrap(),
            );
            let cpu: Vec<T> = values(&interpolate(&attr, &rast, tris).unwrap());
            let mut gpu = vec![T::default(); cpu.len()];
            let fwd: Fwd<T> = kernels().get(&format!("interpolate_fwd_{}", T::SUFFIX));
            let (a, r) = (values::<T>(&attr), values::<T>(&rast));
            let (nt, ab, nv, c, pixels, total) = dims;
            kernels().launch(total as usize, || unsafe {
                fwd(
                    a.as_ptr(),
                    r.as_ptr(),
                    ids.as_ptr(),
                    nt,
                    ab,
                    nv,
                    c,
                    pixels,
                    total,
                    gpu.as_mut_ptr(),
                )
            });
            assert!(
                cpu.iter()
                    .zip(&gpu)
                    .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits())
            );
        }
        forward::<f32>(&attr, &rast, &tris, &tri_ids, dims);
        forward::<f64>(&attr, &rast, &tris, &tri_ids, dims);
        // Backward to the attributes and the barycentrics; a masked-out half of the image
        // (zero cotangent) must add nothing.
        let mask = Tensor::arange(0u32, (h * w) as u32, &Device::Cpu)
            .unwrap()
            .lt(((h * w) / 2) as u32)
            .unwrap();
        let mask = mask
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .reshape((1, h, w, 1))
            .unwrap();
        let cot = rng
            .tensor(&[batch, h, w, c], -1.0, 1.0)
            .broadcast_mul(&mask)
            .unwrap();
        let cpu = cpu_vjp(
            &[&attr, &rast],
            |t| interpolate(&t[0], &t[1], &tris).unwrap(),
            &cot,
        );
        let (mut g_attr, mut g_rast) = (vec![0.0; cpu[0].len()], vec![0.0; cpu[1].len()]);
        let bwd: Bwd = k.get("interpolate_bwd_f64");
        let (a, r, g) = (
            values::<f64>(&attr),
            values::<f64>(&rast),
            values::<f64>(&cot),
        );
        let (nt, ab, nv, c, pixels, total) = dims;
        k.launch(total as usize, || unsafe {
            bwd(
                a.as_ptr(),
                r.as_ptr(),
                g.as_ptr(),
                tri_ids.as_ptr(),
                nt,
                ab,
                nv,
                c,
                pixels,
                total,
                g_attr.as_mut_ptr(),
                g_rast.as_mut_ptr(),
            )
        });
        assert!(relative_error(&cpu[0], &g_attr) < 1e-10);
        assert!(relative_error(&cpu[1], &g_rast) < 1e-10);
    }
}

#[test]
fn texture_sampling_matches_the_cpu() {
    type Fwd<T> =
        unsafe extern "C" fn(*const T, *const T, i32, i32, i32, i32, i64, i64, i32, *mut T);
    type TexGrad =
        unsafe extern "C" fn(*const f64, *const f64, i32, i32, i32, i32, i64, i64, i32, *mut f64);
    type UvGrad = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const f64,
        i32,
        i32,
        i32,
        i32,
        i64,
        i64,
        i32,
        *mut f64,
    );
    let (batch, h, w, ht, wt, c) = (2, 9, 11, 7, 13, 3);
    let mut rng = Rng::new(45);
    let k = kernels();
    for (wrap, mode) in [(WrapMode::Clamp, 0), (WrapMode::Wrap, 1)] {
        for tex_batch in [1, batch] {
            let tex = rng.tensor(&[tex_batch, ht, wt, c], 0.0, 1.0);
            // Outside [0, 1] too, where clamping and wrapping differ.
            let uv = rng.tensor(&[batch, h, w, 2], -0.4, 1.4);
            let dims = (
                tex_batch as i32,
                ht as i32,
                wt as i32,
                c as i32,
                (h * w) as i64,
                (batch * h * w) as i64,
            );
            fn forward<T: Float>(
                tex: &Tensor,
                uv: &Tensor,
                wrap: WrapMode,
                mode: i32,
                dims: (i32, i32, i32, i32, i64, i64),
            ) {
                let (tex, uv) = (
                    tex.to_dtype(T::DTYPE).unwrap(),
                    uv.to_dtype(T::DTYPE).unwrap(),
                );
                let cpu: Vec<T> = values(&texture(&tex, &uv, wrap).unwrap());
                let mut gpu = vec![T::default(); cpu.len()];
                let fwd: Fwd<T> = kernels().get(&format!("texture_fwd_{}", T::SUFFIX));
                let (t, u) = (values::<T>(&tex), values::<T>(&uv));
                let (tb, ht, wt, c, samples, total) = dims;
                kernels().launch(total as usize, || unsafe {
                    fwd(
                        t.as_ptr(),
                        u.as_ptr(),
                        tb,
                        ht,
                        wt,
                        c,
                        samples,
                        total,
                        mode,
                        gpu.as_mut_ptr(),
                    )
                });
                assert!(
                    cpu.iter()
                        .zip(&gpu)
                        .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits())
                );
            }
            forward::<f32>(&tex, &uv, wrap, mode, dims);
            forward::<f64>(&tex, &uv, wrap, mode, dims);
            let cot = rng.tensor(&[batch, h, w, c], -1.0, 1.0);
            let cpu = cpu_vjp(&[&tex, &uv], |t| texture(&t[0], &t[1], wrap).unwrap(), &cot);
            let (mut g_tex, mut g_uv) = (vec![0.0; cpu[0].len()], vec![0.0; cpu[1].len()]);
            let (t, u, g) = (values::<f64>(&tex), values::<f64>(&uv), values::<f64>(&cot));
            let (tb, ht, wt, c, samples, total) = dims;
            let tex_grad: TexGrad = k.get("texture_tex_grad_f64");
            let uv_grad: UvGrad = k.get("texture_uv_grad_f64");
            k.launch(total as usize, || unsafe {
                tex_grad(
                    u.as_ptr(),
                    g.as_ptr(),
                    tb,
                    ht,
                    wt,
                    c,
                    samples,
                    total,
                    mode,
                    g_tex.as_mut_ptr(),
                );
                uv_grad(
                    t.as_ptr(),
                    u.as_ptr(),
                    g.as_ptr(),
                    tb,
                    ht,
                    wt,
                    c,
                    samples,
                    total,
                    mode,
                    g_uv.as_mut_ptr(),
                );
            });
            assert!(relative_error(&cpu[0], &g_tex) < 1e-10);
            assert!(relative_error(&cpu[1], &g_uv) < 1e-10);
        }
    }
}

/// Words per crossing slot, two slots per pixel: the dense target, and the record of 18
/// (kernels/render.cu).
const CROSSING_WORDS: usize = 1 + 18;

/// The crossing slots of every pixel, found the way src/cuda.rs launches the kernels.
fn crossings_on_host(
    clip: &[f64],
    rast: &[f64],
    tris: &Triangles,
    (batch, nv, h, w): (usize, usize, usize, usize),
) -> Vec<u32> {
    type Facing = unsafe extern "C" fn(*const f64, *const u32, i32, i32, i32, *mut u8);
    type Bits = unsafe extern "C" fn(*const u32, *const u8, i32, i32, *mut u8);
    type Crossings = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const u32,
        *const u8,
        i32,
        i32,
        i32,
        i32,
        i32,
        *mut u32,
    );
    let k = kernels();
    let nt = tris.len();
    let (ids, neighbours) = (
        indices(tris),
        tris.neighbours()
            .iter()
            .flatten()
            .copied()
            .collect::<Vec<u32>>(),
    );
    let (b, nv, nt32, h32, w32) = (batch as i32, nv as i32, nt as i32, h as i32, w as i32);
    let (mut facing, mut bits) = (vec![0u8; batch * nt], vec![0u8; batch * nt]);
    let mut slots = vec![0u32; batch * h * w * 2 * CROSSING_WORDS];
    let f: Facing = k.get("silhouette_facing_f64");
    k.launch(batch * nt, || unsafe {
        f(
            clip.as_ptr(),
            ids.as_ptr(),
            b,
            nv,
            nt32,
            facing.as_mut_ptr(),
        )
    });
    let f: Bits = k.get("silhouette_edge_bits");
    k.launch(batch * nt, || unsafe {
        f(
            neighbours.as_ptr(),
            facing.as_ptr(),
            b,
            nt32,
            bits.as_mut_ptr(),
        )
    });
    let f: Crossings = k.get("silhouette_crossings_f64");
    k.launch(batch * h * w, || unsafe {
        f(
            rast.as_ptr(),
            clip.as_ptr(),
            ids.as_ptr(),
            bits.as_ptr(),
            b,
            nv,
            nt32,
            h32,
            w32,
            slots.as_mut_ptr(),
        )
    });
    slots
}

#[test]
fn antialiasing_matches_the_cpu() {
    type Blend = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const u32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        *mut f64,
    );
    type ColorGrad =
        unsafe extern "C" fn(*const f64, *const f64, *const u32, i32, i32, i32, i32, i32, *mut f64);
    type PositionGrad = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const f64,
        *const u32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        *mut f64,
    );
    let (h, w, c) = (37, 53, 3);
    let mut rng = Rng::new(57);
    let k = kernels();
    let mut checked = 0;
    for (clip, tris) in scenes() {
        let (batch, nv, _) = clip.dims3().unwrap();
        let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
        let slots = crossings_on_host(&values(&clip), &values(&rast), &tris, (batch, nv, h, w));
        // The dense targets come first, one per slot.
        let crossings = slots[..batch * h * w * 2]
            .iter()
            .filter(|&&target| target != u32::MAX)
            .count();
        let covered = rast
            .narrow(3, 3, 1)
            .unwrap()
            .ge(1.0)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let color = rng.tensor(&[batch, h, w, c], 0.0, 1.0);
        let cot = rng.tensor(&[batch, h, w, c], -1.0, 1.0);
        let (b, h32, w32) = (batch as i32, h as i32, w as i32);
        // (mask, coverage): plain antialias; masked colour, as the Renderer's image; coverage,
        // as the Renderer's mask. Each equals antialias of a masked input on the CPU.
        for (mask, coverage) in [(0, 0), (1, 0), (0, 1)] {
            let (input, channels) = match (mask, coverage) {
                (0, 0) => (color.clone(), c),
                (1, 0) => (color.broadcast_mul(&covered).unwrap(), c),
                _ => (covered.clone(), 1),
            };
            let cot = cot.narrow(3, 0, channels).unwrap();
            let blend = |t: &[Tensor]| antialias(&t[0], &rast, &t[1], &tris).unwrap();
            let cpu = blend(&[input.clone(), clip.clone()]);
            let (col, r, g) = (
                values::<f64>(&color),
                values::<f64>(&rast),
                values::<f64>(&cot),
            );
            let mut gpu = vec![0.0; cpu.elem_count()];
            let f: Blend = k.get("blend_fwd_f64");
            let c32 = channels as i32;
            k.launch(batch * h * w, || unsafe {
                f(
                    col.as_ptr(),
                    r.as_ptr(),
                    slots.as_ptr(),
                    b,
                    h32,
                    w32,
                    c32,
                    mask,
                    coverage,
                    gpu.as_mut_ptr(),
                )
            });
            let cpu_values: Vec<f64> = values(&cpu);
            assert!(
                cpu_values
                    .iter()
                    .zip(&gpu)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "blend ({mask}, {coverage})"
            );
            // Gradients: to the colour (plain and masked) and to the positions (all three).
            let grads = cpu_vjp(&[&input, &clip], blend, &cot);
            if coverage == 0 {
                let mut d_color = vec![0.0; grads[0].len()];
                let f: ColorGrad = k.get("blend_color_grad_f64");
                k.launch(batch * h * w, || unsafe {
                    f(
                        g.as_ptr(),
                        r.as_ptr(),
                        slots.as_ptr(),
                        b,
                        h32,
                        w32,
                        c32,
                        mask,
                        d_color.as_mut_ptr(),
                    )
                });
                // Masking zeroes the gradient outside the mesh, where the CPU's antialias of the
                // masked input still passes it to the (constant) input.
                let expected: Vec<f64> = if mask == 1 {
                    let d =
                        Tensor::from_vec(grads[0].clone(), input.shape(), &Device::Cpu).unwrap();
                    values(&d.broadcast_mul(&covered).unwrap())
                } else {
                    grads[0].clone()
                };
                assert!(
                    relative_error(&expected, &d_color) < 1e-10,
                    "colour gradient ({mask}, {coverage})"
                );
            }
            let mut d_clip = vec![0.0; grads[1].len()];
            let f: PositionGrad = k.get("blend_position_grad_f64");
            k.launch(batch * h * w * 2, || unsafe {
                f(
                    col.as_ptr(),
                    g.as_ptr(),
                    r.as_ptr(),
                    slots.as_ptr(),
                    b,
                    nv as i32,
                    h32,
                    w32,
                    c32,
                    mask,
                    coverage,
                    d_clip.as_mut_ptr(),
                )
            });
            if crossings > 0 {
                assert!(
                    relative_error(&grads[1], &d_clip) < 1e-10,
                    "position gradient ({mask}, {coverage})"
                );
            }
        }
        checked += crossings;
    }
    // The random triangles and the sphere have silhouettes; the grid's outline runs through
    // pixel centres (no crossing) and the tie's twin triangles share all edges.
    assert!(checked > 100, "only {checked} silhouette crossings checked");
}

/// `ShadingConstants` / `PhongParams` of kernels/render.cu, five doubles passed by value: SH's dc,
/// linear, cross, zonal and square constants, or Phong's specular and shininess.
#[repr(C)]
#[derive(Clone, Copy)]
struct ShadingConstants([f64; 5]);

/// The band constants, read off the public basis at normals where each term is one constant.
fn band_constants() -> ShadingConstants {
    let normals = Tensor::new(
        &[[0.0f64, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]],
        &Device::Cpu,
    )
    .unwrap();
    let basis: Vec<Vec<f64>> = ganfit_render::sh_irradiance_basis(&normals)
        .unwrap()
        .to_vec2()
        .unwrap();
    ShadingConstants([
        basis[0][0],
        basis[1][1],
        basis[2][4],
        -basis[0][6],
        -basis[1][8],
    ])
}

#[test]
fn shading_matches_the_cpu() {
    type Normalize<T> = unsafe extern "C" fn(*const T, i64, i32, f64, *mut T);
    type NormalizeGrad = unsafe extern "C" fn(*const f64, *const f64, i64, i32, f64, *mut f64);
    type FaceSums = unsafe extern "C" fn(*const f64, *const u32, i32, i32, i32, *mut f64);
    type FaceSumsGrad =
        unsafe extern "C" fn(*const f64, *const f64, *const u32, i32, i32, i32, *mut f64);
    type ShFwd<T> =
        unsafe extern "C" fn(*const T, *const T, *const T, i64, i64, i32, ShadingConstants, *mut T);
    type ShBwd = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const f64,
        *const f64,
        i64,
        i64,
        i32,
        ShadingConstants,
        *mut f64,
        *mut f64,
        *mut f64,
    );
    let k = kernels();
    let mut rng = Rng::new(71);
    // Normalisation of random rows (some nearly zero), both float types, and its gradient.
    let v = rng
        .tensor(&[2, 300, 3], -1.0, 1.0)
        .broadcast_mul(&rng.tensor(&[2, 300, 1], 0.0, 1.0))
        .unwrap();
    fn normalized<T: Float>(v: &Tensor) {
        let v = v.to_dtype(T::DTYPE).unwrap();
        let cpu: Vec<T> = values(&normalize(&v).unwrap());
        let mut gpu = vec![T::default(); cpu.len()];
        let f: Normalize<T> = kernels().get(&format!("normalize_fwd_{}", T::SUFFIX));
        let x = values::<T>(&v);
        kernels().launch(600, || unsafe {
            f(x.as_ptr(), 600, 3, 1e-12, gpu.as_mut_ptr())
        });
        assert!(
            cpu.iter()
                .zip(&gpu)
                .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits())
        );
    }
    normalized::<f32>(&v);
    normalized::<f64>(&v);
    let cot = rng.tensor(&[2, 300, 3], -1.0, 1.0);
    let cpu = cpu_vjp(&[&v], |t| normalize(&t[0]).unwrap(), &cot).remove(0);
    let mut gpu = vec![0.0; cpu.len()];
    let f: NormalizeGrad = k.get("normalize_grad_f64");
    let (x, g) = (values::<f64>(&v), values::<f64>(&cot));
    k.launch(600, || unsafe {
        f(x.as_ptr(), g.as_ptr(), 600, 3, 1e-12, gpu.as_mut_ptr())
    });
    assert!(relative_error(&cpu, &gpu) < 1e-12);

    // Vertex normals: the face-normal sums the GPU adds atomically, then the normalisation.
    let (verts, tris) = bumpy_sphere(12, 20, 1.0, 0.15);
    let nv = verts.len() / 3;
    let tris = Triangles::new(tris, nv).unwrap();
    let positions = Tensor::from_vec(verts, (1, nv, 3), &Device::Cpu).unwrap();
    let cpu_normals: Vec<f64> = values(&vertex_normals(&positions, &tris).unwrap());
    let (p, ids, nt) = (values::<f64>(&positions), indices(&tris), tris.len());
    let mut sums = vec![0.0; nv * 3];
    let f: FaceSums = k.get("face_normal_sums_f64");
    k.launch(nt, || unsafe {
        f(
            p.as_ptr(),
            ids.as_ptr(),
            1,
            nv as i32,
            nt as i32,
            sums.as_mut_ptr(),
        )
    });
    let mut gpu_normals = vec![0.0; nv * 3];
    let f: Normalize<f64> = k.get("normalize_fwd_f64");
    k.launch(nv, || unsafe {
        f(sums.as_ptr(), nv as i64, 3, 1e-12, gpu_normals.as_mut_ptr())
    });
    assert!(relative_error(&cpu_normals, &gpu_normals) < 1e-12);
    // The sums' gradient, through the normalisation's: compare the whole chain with the CPU's.
    let cot = rng.tensor(&[1, nv, 3], -1.0, 1.0);
    let cpu = cpu_vjp(
        &[&positions],
        |t| vertex_normals(&t[0], &tris).unwrap(),
        &cot,
    )
    .remove(0);
    let mut d_sums = vec![0.0; nv * 3];
    let f: NormalizeGrad = k.get("normalize_grad_f64");
    let g = values::<f64>(&cot);
    k.launch(nv, || unsafe {
        f(
            sums.as_ptr(),
            g.as_ptr(),
            nv as i64,
            3,
            1e-12,
            d_sums.as_mut_ptr(),
        )
    });
    let mut gpu = vec![0.0; nv * 3];
    let f: FaceSumsGrad = k.get("face_normal_sums_grad_f64");
    k.launch(nt, || unsafe {
        f(
            p.as_ptr(),
            d_sums.as_ptr(),
            ids.as_ptr(),
            1,
            nv as i32,
            nt as i32,
            gpu.as_mut_ptr(),
        )
    });
    assert!(relative_error(&cpu, &gpu) < 1e-10);

    // SH shading of random albedo under random light, on unit normals.
    let (batch, pixels, c) = (2, 500, 3);
    let albedo = rng.tensor(&[batch, pixels, c], 0.0, 1.0);
    let normals = normalize(&rng.tensor(&[batch, pixels, 3], -1.0, 1.0)).unwrap();
    let coeffs = rng.tensor(&[batch, c, 9], -0.5, 0.5);
    let bands = band_constants();
    let total = (batch * pixels) as i64;
    fn shaded<T: Float>(
        inputs: [&Tensor; 3],
        bands: ShadingConstants,
        (pixels, total, c): (i64, i64, i32),
    ) {
        let [a, n, l] = inputs.map(|t| t.to_dtype(T::DTYPE).unwrap());
        let cpu: Vec<T> = values(&shade_sh(&a, &n, &l).unwrap());
        let mut gpu = vec![T::default(); cpu.len()];
        let f: ShFwd<T> = kernels().get(&format!("shade_sh_fwd_{}", T::SUFFIX));
        let [a, n, l] = [a, n, l].map(|t| values::<T>(&t));
        kernels().launch(total as usize, || unsafe {
            f(
                a.as_ptr(),
                n.as_ptr(),
                l.as_ptr(),
                pixels,
                total,
                c,
                bands,
                gpu.as_mut_ptr(),
            )
        });
        assert!(
            cpu.iter()
                .zip(&gpu)
                .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits())
        );
    }
    shaded::<f32>(
        [&albedo, &normals, &coeffs],
        bands,
        (pixels as i64, total, c as i32),
    );
    shaded::<f64>(
        [&albedo, &normals, &coeffs],
        bands,
        (pixels as i64, total, c as i32),
    );
    let cot = rng.tensor(&[batch, pixels, c], -1.0, 1.0);
    let cpu = cpu_vjp(
        &[&albedo, &normals, &coeffs],
        |t| shade_sh(&t[0], &t[1], &t[2]).unwrap(),
        &cot,
    );
    let mut gpu = [
        vec![0.0; cpu[0].len()],
        vec![0.0; cpu[1].len()],
        vec![0.0; cpu[2].len()],
    ];
    let f: ShBwd = k.get("shade_sh_bwd_f64");
    let [a, n, l, g] = [&albedo, &normals, &coeffs, &cot].map(values::<f64>);
    let [ga, gn, gl] = &mut gpu;
    k.launch(total as usize, || unsafe {
        f(
            a.as_ptr(),
            n.as_ptr(),
            l.as_ptr(),
            g.as_ptr(),
            pixels as i64,
            total,
            c as i32,
            bands,
            ga.as_mut_ptr(),
            gn.as_mut_ptr(),
            gl.as_mut_ptr(),
        )
    });
    for (what, (expected, got)) in ["albedo", "normals", "coeffs"]
        .iter()
        .zip(cpu.iter().zip(&gpu))
    {
        assert!(
            relative_error(expected, got) < 1e-10,
            "SH gradient to the {what}"
        );
    }
}

#[test]
fn phong_shading_matches_the_cpu() {
    type Fwd = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const f64,
        i64,
        i64,
        i32,
        ShadingConstants,
        *mut f64,
    );
    type Bwd = unsafe extern "C" fn(
        *const f64,
        *const f64,
        *const f64,
        *const f64,
        i64,
        i64,
        i32,
        ShadingConstants,
        *mut f64,
        *mut f64,
        *mut f64,
    );
    let k = kernels();
    let mut rng = Rng::new(83);
    let (batch, pixels) = (2, 400);
    let albedo = rng.tensor(&[batch, pixels, 3], 0.0, 1.0);
    let normals = normalize(&rng.tensor(&[batch, pixels, 3], -1.0, 1.0)).unwrap();
    let view = normalize(&rng.tensor(&[batch, pixels, 3], -1.0, 1.0)).unwrap();
    let direction = normalize(&rng.tensor(&[batch, 3], -1.0, 1.0)).unwrap();
    let (color, ambient) = (
        rng.tensor(&[batch, 3], 0.3, 1.0),
        rng.tensor(&[batch, 3], 0.0, 0.4),
    );
    let cot = rng.tensor(&[batch, pixels, 3], -1.0, 1.0);
    // The op's packed inputs: light rows (direction, colour, ambient), geometry rows (normal,
    // then view with a specular term).
    let unit = normalize(&direction).unwrap(); // as shade_phong passes it on
    let light = Tensor::cat(&[&unit, &color, &ambient], 1).unwrap();
    for specular in [0.0, 0.3] {
        let geometry = if specular == 0.0 {
            normals.clone()
        } else {
            Tensor::cat(&[&normals, &view], 2).unwrap()
        };
        let stride = geometry.dim(2).unwrap() as i32;
        let params = ShadingConstants([specular, 6.0, 0.0, 0.0, 0.0]);
        let shade = |t: &[Tensor]| {
            let light = PhongLight {
                direction: t[3].clone(),
                color: t[4].clone(),
                ambient: t[5].clone(),
                specular,
                shininess: 6.0,
            };
            shade_phong(&t[0], &t[1], &t[2], &light).unwrap()
        };
        let inputs = [&albedo, &normals, &view, &direction, &color, &ambient];
        let cpu: Vec<f64> = values(&shade(&inputs.map(|t| t.clone())));
        let (a, geo, l, g) = (
            values::<f64>(&albedo),
            values::<f64>(&geometry),
            values::<f64>(&light),
            values::<f64>(&cot),
        );
        let (n_pixels, total) = (pixels as i64, (batch * pixels) as i64);
        let mut gpu = vec![0.0; cpu.len()];
        let f: Fwd = k.get("shade_phong_fwd_f64");
        k.launch(batch * pixels, || unsafe {
            f(
                a.as_ptr(),
                geo.as_ptr(),
                l.as_ptr(),
                n_pixels,
                total,
                stride,
                params,
                gpu.as_mut_ptr(),
            )
        });
        assert!(
            relative_error(&cpu, &gpu) < 1e-14,
            "Phong forward, specular {specular}"
        );
        // The kernel's gradients against the CPU's through the public function: albedo, normals
        // and view directly; of the packed light, colour and ambient (the direction's reaches
        // the caller through shade_phong's normalisation).
        let grads = cpu_vjp(&inputs, shade, &cot);
        let mut d = [vec![0.0; a.len()], vec![0.0; geo.len()], vec![0.0; l.len()]];
        let f: Bwd = k.get("shade_phong_bwd_f64");
        let [da, dg, dl] = &mut d;
        k.launch(batch * pixels, || unsafe {
            f(
                a.as_ptr(),
                geo.as_ptr(),
                l.as_ptr(),
                g.as_ptr(),
                n_pixels,
                total,
                stride,
                params,
                da.as_mut_ptr(),
                dg.as_mut_ptr(),
                dl.as_mut_ptr(),
            )
        });
        assert!(
            relative_error(&grads[0], &d[0]) < 1e-10,
            "albedo, specular {specular}"
        );
        let d_normals: Vec<f64> = d[1]
            .chunks(stride as usize)
            .flat_map(|r| r[..3].to_vec())
            .collect();
        assert!(
            relative_error(&grads[1], &d_normals) < 1e-10,
            "normals, specular {specular}"
        );
        if specular != 0.0 {
            let d_view: Vec<f64> = d[1].chunks(6).flat_map(|r| r[3..].to_vec()).collect();
            assert!(
                relative_error(&grads[2], &d_view) < 1e-10,
                "view, specular {specular}"
            );
        }
        let light_part = |from: usize| -> Vec<f64> {
            d[2].chunks(9)
                .flat_map(|r| r[from..from + 3].to_vec())
                .collect()
        };
        assert!(
            relative_error(&grads[4], &light_part(3)) < 1e-10,
            "colour, specular {specular}"
        );
        assert!(
            relative_error(&grads[5], &light_part(6)) < 1e-10,
            "ambient, specular {specular}"
        );
    }
}
