use std::fmt;
use std::path::PathBuf;

/// One place the resolver looked at while searching for an asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchedPlace {
    /// What kind of place this is, e.g. "GANFIT_ASSETS" or "user cache".
    pub kind: String,
    /// The path that was checked, or a description when the place is not a path (a URL, a
    /// disabled feature).
    pub location: String,
}

impl fmt::Display for SearchedPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.location)
    }
}

fn list_places(places: &[SearchedPlace]) -> String {
    places.iter().map(|p| format!("\n  - {p}")).collect()
}

/// Everything that can go wrong while finding, verifying, building or downloading an asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// The id is not in the manifest.
    #[error(
        "unknown asset id `{id}`: weights-manifest.toml has no entry for it (known ids: {known}); \
         check the spelling or add an entry to the manifest"
    )]
    UnknownId {
        /// The id that was asked for.
        id: String,
        /// The ids the manifest does know, comma-separated.
        known: String,
    },

    /// The asset is in no place the resolver knows and could neither be built nor downloaded.
    #[error(
        "asset `{id}` (file `{file}`) was not found. Put the file in a folder listed in \
         GANFIT_ASSETS, pass its path through the API, provide its source ({source_hint}), or \
         build with the `download` feature to fetch it. Places searched, in order:{}",
        list_places(.searched)
    )]
    NotFound {
        /// The asset id.
        id: String,
        /// The file name the manifest gives.
        file: String,
        /// Where the asset comes from, as the manifest says.
        source_hint: String,
        /// Every place that was looked at, in search order.
        searched: Vec<SearchedPlace>,
    },

    /// The file's size differs from the manifest's.
    #[error(
        "asset `{id}` at {path} has {actual} bytes but the manifest expects {expected}: the file \
         is truncated, corrupt or a different version. Delete it and run again so ganfit rebuilds \
         or re-downloads it (for files in weights/, restore them with `git checkout -- weights/`)"
    )]
    SizeMismatch {
        /// The asset id.
        id: String,
        /// The offending file.
        path: PathBuf,
        /// Size from the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },

    /// The file's sha256 differs from the manifest's.
    #[error(
        "asset `{id}` at {path} failed its checksum: expected sha256 {expected}, found {actual}. \
         The file is corrupt or has been tampered with. Delete it and run again so ganfit \
         rebuilds or re-downloads it (for files in weights/, restore them with \
         `git checkout -- weights/`)"
    )]
    ChecksumMismatch {
        /// The asset id.
        id: String,
        /// The offending file.
        path: PathBuf,
        /// Hash from the manifest.
        expected: String,
        /// Hash of the file on disk.
        actual: String,
    },

    /// The manifest itself could not be read or parsed.
    #[error("weights manifest {origin} is invalid: {reason}")]
    Manifest {
        /// Which manifest (embedded or a path).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Building the asset from its local source failed.
    #[error("building asset `{id}` from {source_desc} failed: {reason}")]
    Build {
        /// The asset id.
        id: String,
        /// The source that was converted.
        source_desc: String,
        /// Why it failed.
        reason: String,
    },

    /// Fetching the asset from its upstream URL failed.
    #[error(
        "downloading asset `{id}` from {url} failed: {reason}. Check the network connection, or \
         download the file by hand and put it in a folder listed in GANFIT_ASSETS"
    )]
    Download {
        /// The asset id.
        id: String,
        /// The URL that was fetched.
        url: String,
        /// Why it failed.
        reason: String,
    },

    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot read".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl AssetError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        AssetError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
