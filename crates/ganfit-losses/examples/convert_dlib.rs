//! Converts dlib's `dlib_face_recognition_resnet_model_v1.dat` to the safetensors file that
//! `FaceRecognitionNet` loads.
//!
//! `cargo run --release -p ganfit-losses --example convert_dlib -- <in.dat> <out.safetensors>`

use std::path::PathBuf;
use std::process::ExitCode;

use ganfit_losses::dlib::DlibResnet;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!(
            "usage: convert_dlib <dlib_face_recognition_resnet_model_v1.dat> <out.safetensors>"
        );
        return ExitCode::from(2);
    };
    match convert(input.into(), output.into()) {
        Ok(count) => {
            println!("wrote {count} tensors to {output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn convert(input: PathBuf, output: PathBuf) -> Result<usize, Box<dyn std::error::Error>> {
    let bytes =
        std::fs::read(&input).map_err(|e| format!("cannot read {}: {e}", input.display()))?;
    let net = DlibResnet::parse(&bytes)?;
    let out = net.to_safetensors()?;
    std::fs::write(&output, out).map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    Ok(net.tensors.len())
}
