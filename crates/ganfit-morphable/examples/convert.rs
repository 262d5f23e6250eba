//! Converts a model's upstream files into ganfit's model file and prints its size and sha256,
//! the values its `weights-manifest.toml` entry records.
//!
//! ```text
//! cargo run --release -p ganfit-morphable --example convert -- ict ../shared/assets/ICT-FaceKit ict-face-model-light.safetensors
//! cargo run --release -p ganfit-morphable --example convert -- sfm ../shared/assets/eos-sfm sfm-3448.safetensors
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, source, out] = args.as_slice() else {
        eprintln!("usage: convert <ict|sfm> <source folder> <output file>");
        return ExitCode::FAILURE;
    };
    let (source, out) = (PathBuf::from(source), PathBuf::from(out));
    let converted = match kind.as_str() {
        "ict" => ganfit_morphable::convert_ict(&source),
        "sfm" => ganfit_morphable::convert_sfm(&source),
        other => {
            eprintln!("unknown model kind `{other}`: use `ict` or `sfm`");
            return ExitCode::FAILURE;
        }
    };
    let written = converted.and_then(|model| model.write(&out));
    if let Err(e) = written {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match (std::fs::metadata(&out), ganfit_assets::sha256_file(&out)) {
        (Ok(meta), Ok(sha)) => {
            println!("{}: {} bytes, sha256 {sha}", out.display(), meta.len());
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!("error: cannot stat {}: {e}", out.display());
            ExitCode::FAILURE
        }
        (_, Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
