//! With the `cuda` feature, compiles kernels/render.cu to PTX for src/cuda.rs; without it (the
//! default, and CI) nothing happens and no CUDA toolkit is needed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/render.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("render.ptx");
    // Plain compute_XX PTX: the driver JIT-compiles it for the GPU it finds, newer ones too.
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--fmad=false"])
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg("kernels/render.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!("the `cuda` feature needs nvcc ({nvcc}): {e}; see scripts/cuda-setup.sh")
        });
    assert!(status.success(), "nvcc failed on kernels/render.cu");
}
