//! Fetching an asset from its upstream URL, with a progress bar on a terminal.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

/// Downloads `url` (http, https or file) to `dest`, showing progress labelled `label` on stderr
/// when it is a terminal. The caller verifies the result.
pub fn fetch(url: &str, dest: &Path, label: &str) -> Result<(), String> {
    if let Some(path) = url.strip_prefix("file://") {
        return std::fs::copy(path, dest)
            .map(|_| ())
            .map_err(|e| format!("cannot copy {path}: {e}"));
    }
    let response = ureq::get(url).call().map_err(|e| e.to_string())?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    bar.set_message(format!("downloading {label}"));
    let mut reader = response.into_body().into_reader();
    let file = File::create(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let mut writer = BufWriter::new(file);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        writer
            .write_all(&buf[..n])
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        bar.inc(n as u64);
    }
    writer
        .flush()
        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    bar.finish_and_clear();
    Ok(())
}
