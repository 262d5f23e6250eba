//! Finding a model's source folder for the asset resolver.

use std::path::PathBuf;

use ganfit_assets::{SearchedPlace, shared_dir_candidates};

/// The folder named by `env_var`, else `../shared/<shared_relative>` beside the checkout; a
/// folder counts only when it holds `marker`.
pub(crate) fn locate_dir(
    env_var: &str,
    shared_relative: &str,
    marker: &str,
) -> Result<PathBuf, Vec<SearchedPlace>> {
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    if let Some(dir) = std::env::var_os(env_var) {
        candidates.push((env_var.to_string(), PathBuf::from(dir)));
    }
    for dir in shared_dir_candidates(shared_relative) {
        candidates.push(("shared assets".to_string(), dir));
    }
    let mut searched = Vec::new();
    for (kind, dir) in candidates {
        if dir.join(marker).is_file() {
            return Ok(dir);
        }
        searched.push(SearchedPlace {
            kind: format!("model source ({kind})"),
            location: dir.join(marker).display().to_string(),
        });
    }
    Err(searched)
}
