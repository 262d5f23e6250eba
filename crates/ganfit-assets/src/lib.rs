//! Finds, verifies, builds and downloads the model files that ganfit loads.
//!
//! Every file is described once in the repository's `weights-manifest.toml` (id, file name, sha256,
//! size, licence, source and the exact command that produced it). A [`Resolver`] turns an id into
//! a verified path by looking, in order, at a path given through the API, the folders in
//! `GANFIT_ASSETS`, the repository's `weights/`, the user cache, a locally present source it can
//! convert ([`AssetSource`]) and finally, with the `download` feature, the upstream URL.

mod error;
mod manifest;
mod resolver;
mod verify;

#[cfg(feature = "download")]
pub mod download;

pub use error::{AssetError, SearchedPlace};
pub use manifest::{AssetEntry, Manifest};
pub use resolver::{
    AssetSource, BuildError, Resolver, ResolverBuilder, Upstream, shared_dir_candidates,
};
pub use verify::sha256_file;

/// Result type of this crate.
pub type Result<T, E = AssetError> = std::result::Result<T, E>;
