use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::verify::{temp_sibling, verify};
use crate::{AssetEntry, AssetError, Manifest, Result, SearchedPlace};

/// Error type that [`AssetSource::build`] returns; its text reaches the user.
pub type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// A local source an asset can be made from, e.g. the ICT-FaceKit folder that the morphable-model
/// crate converts into its own model file.
pub trait AssetSource {
    /// Looks for the source. Returns its path, or every place that was looked at.
    fn locate(&self) -> std::result::Result<PathBuf, Vec<SearchedPlace>>;

    /// Converts the source found at `source` and writes the asset to `out`.
    ///
    /// `source` is what [`AssetSource::locate`] returned or, when the source was fetched from
    /// [`AssetSource::upstream`], the downloaded file. `out` is a temporary path; the resolver
    /// verifies it and moves it into the cache.
    fn build(&self, source: &Path, out: &Path) -> std::result::Result<(), BuildError>;

    /// Where the source can be downloaded when it is not present locally. The resolver fetches
    /// it (with the `download` feature) into the cache's `sources/` folder and passes that file
    /// to [`AssetSource::build`]; the built asset is verified against the manifest as usual.
    fn upstream(&self) -> Option<Upstream> {
        None
    }
}

/// A downloadable source of an asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Where to fetch it.
    pub url: String,
    /// Name to store it under in the cache's `sources/` folder.
    pub file_name: String,
}

/// Turns asset ids into verified file paths. See the crate documentation for the search order.
#[derive(Debug, Clone)]
pub struct Resolver {
    manifest: Manifest,
    explicit: HashMap<String, PathBuf>,
    asset_dirs: Vec<PathBuf>,
    repo_weights: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    download: bool,
}

/// Configures a [`Resolver`]; start from [`Resolver::builder`].
#[derive(Debug, Clone)]
pub struct ResolverBuilder {
    resolver: Resolver,
}

/// The repository checkout this crate was compiled from.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Candidate locations of `../shared/<relative>` — the project's shared assets folder that sits
/// beside a checkout — relative to the checkout this crate was built from and to the current
/// directory.
pub fn shared_dir_candidates(relative: &str) -> Vec<PathBuf> {
    let mut candidates = vec![repo_root().join("../shared").join(relative)];
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("../shared").join(relative));
    }
    candidates
}

impl Default for Resolver {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl Resolver {
    /// A resolver configured from the environment: the embedded manifest, `GANFIT_ASSETS`, the
    /// repository's `weights/` folder and the user cache (`$XDG_CACHE_HOME/ganfit`, else
    /// `~/.cache/ganfit`); downloads are on when the `download` feature is.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder that starts from the same defaults as [`Resolver::new`].
    pub fn builder() -> ResolverBuilder {
        let asset_dirs = std::env::var_os("GANFIT_ASSETS")
            .map(|v| std::env::split_paths(&v).collect())
            .unwrap_or_default();
        let repo_weights = repo_root().join("weights");
        ResolverBuilder {
            resolver: Resolver {
                manifest: Manifest::embedded().clone(),
                explicit: HashMap::new(),
                asset_dirs,
                repo_weights: repo_weights.is_dir().then_some(repo_weights),
                cache_dir: dirs::cache_dir().map(|d| d.join("ganfit")),
                download: cfg!(feature = "download"),
            },
        }
    }

    /// The manifest this resolver reads.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The folder that built and downloaded assets are written to.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    /// The manifest entry of `id`.
    pub fn entry(&self, id: &str) -> Result<&AssetEntry> {
        self.manifest.get(id)
    }

    /// Finds `id` in the places that hold finished files, verifies it and returns its path.
    pub fn resolve(&self, id: &str) -> Result<PathBuf> {
        self.resolve_inner(id, None)
    }

    /// Like [`Resolver::resolve`], but when no finished file exists, builds one into the cache
    /// from `source` if that source is present.
    pub fn resolve_or_build(&self, id: &str, source: &dyn AssetSource) -> Result<PathBuf> {
        self.resolve_inner(id, Some(source))
    }

    fn stamp_dir(&self) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|d| d.join("verified"))
    }

    fn resolve_inner(&self, id: &str, source: Option<&dyn AssetSource>) -> Result<PathBuf> {
        let entry = self.manifest.get(id)?;
        let stamp_dir = self.stamp_dir();
        let check = |path: &Path| verify(entry, path, stamp_dir.as_deref());
        let mut searched = Vec::new();

        // An explicit path is what the caller asked for: never fall back silently.
        if let Some(path) = self.explicit.get(id) {
            check(path)?;
            return Ok(path.clone());
        }
        let mut finished_places: Vec<(&str, PathBuf)> = self
            .asset_dirs
            .iter()
            .map(|d| ("GANFIT_ASSETS", d.join(&entry.file)))
            .collect();
        if let Some(dir) = &self.repo_weights {
            finished_places.push(("repository weights/", dir.join(&entry.file)));
        }
        if let Some(dir) = &self.cache_dir {
            finished_places.push(("user cache", dir.join(&entry.file)));
        }
        for (kind, path) in finished_places {
            if path.is_file() {
                check(&path)?;
                return Ok(path);
            }
            searched.push(place(kind, path.display()));
        }

        if let Some(source) = source {
            match source.locate() {
                Ok(source_path) => return self.build_into_cache(entry, &source_path, source),
                Err(places) => searched.extend(places),
            }
            match (source.upstream(), self.download) {
                (Some(upstream), true) => {
                    let downloaded = self.download_source(entry, &upstream)?;
                    return self.build_into_cache(entry, &downloaded, source);
                }
                (Some(upstream), false) => searched.push(place(
                    "source download (needs the `download` feature)",
                    upstream.url,
                )),
                (None, _) => {}
            }
        }
        match (&entry.url, self.download) {
            (Some(url), true) => return self.download_into_cache(entry, url),
            (Some(url), false) => {
                searched.push(place("download (needs the `download` feature)", url))
            }
            (None, _) => {}
        }
        Err(AssetError::NotFound {
            id: entry.id.clone(),
            file: entry.file.clone(),
            source_hint: entry.source.clone(),
            searched,
        })
    }

    fn writable_cache(&self, entry: &AssetEntry) -> Result<PathBuf> {
        let dir = self.cache_dir.clone().ok_or_else(|| AssetError::Build {
            id: entry.id.clone(),
            source_desc: "its source".into(),
            reason: "no user cache folder is known (set XDG_CACHE_HOME or HOME)".into(),
        })?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| AssetError::io("cannot create cache folder", &dir, e))?;
        Ok(dir)
    }

    /// Runs `produce` to make the cached copy of `entry`, under an exclusive lock so that
    /// concurrent processes produce it once; the result is verified before it is moved in place.
    fn produce_into_cache(
        &self,
        entry: &AssetEntry,
        produce: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let dir = self.writable_cache(entry)?;
        let target = dir.join(&entry.file);
        let lock = lock_beside(&target)?;
        let stamp_dir = self.stamp_dir();
        // Another process may have finished it while this one waited for the lock.
        if target.is_file() {
            verify(entry, &target, stamp_dir.as_deref())?;
            return Ok(target);
        }
        let tmp = temp_sibling(&target);
        let outcome = produce(&tmp)
            .and_then(|()| verify(entry, &tmp, None))
            .and_then(|()| {
                std::fs::rename(&tmp, &target)
                    .map_err(|e| AssetError::io("cannot move into place", &target, e))
            });
        if outcome.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        drop::<File>(lock);
        outcome.map(|()| target)
    }

    fn build_into_cache(
        &self,
        entry: &AssetEntry,
        source_path: &Path,
        source: &dyn AssetSource,
    ) -> Result<PathBuf> {
        self.produce_into_cache(entry, |tmp| {
            source
                .build(source_path, tmp)
                .map_err(|e| AssetError::Build {
                    id: entry.id.clone(),
                    source_desc: source_path.display().to_string(),
                    reason: e.to_string(),
                })
        })
        .map_err(|e| {
            let mismatch = match &e {
                AssetError::ChecksumMismatch {
                    expected, actual, ..
                } => format!("sha256 {actual} but the manifest expects {expected}"),
                AssetError::SizeMismatch {
                    expected, actual, ..
                } => format!("{actual} bytes but the manifest expects {expected}"),
                _ => return e,
            };
            AssetError::Build {
                id: entry.id.clone(),
                source_desc: source_path.display().to_string(),
                reason: format!(
                    "the converted file has {mismatch}: the source is not the version the \
                     manifest was made from, or the converter changed without the manifest \
                     being updated"
                ),
            }
        })
    }

    #[cfg(feature = "download")]
    fn download_into_cache(&self, entry: &AssetEntry, url: &str) -> Result<PathBuf> {
        self.produce_into_cache(entry, |tmp| {
            crate::download::fetch(url, tmp, &entry.id).map_err(|reason| AssetError::Download {
                id: entry.id.clone(),
                url: url.to_string(),
                reason,
            })
        })
    }

    /// Fetches a source into `<cache>/sources/`, once: an earlier complete download is reused.
    #[cfg(feature = "download")]
    fn download_source(&self, entry: &AssetEntry, upstream: &Upstream) -> Result<PathBuf> {
        let dir = self.writable_cache(entry)?.join("sources");
        std::fs::create_dir_all(&dir)
            .map_err(|e| AssetError::io("cannot create cache folder", &dir, e))?;
        let target = dir.join(&upstream.file_name);
        let _lock = lock_beside(&target)?;
        if target.is_file() {
            return Ok(target);
        }
        let tmp = temp_sibling(&target);
        let fetched = crate::download::fetch(&upstream.url, &tmp, &upstream.file_name)
            .map_err(|reason| AssetError::Download {
                id: entry.id.clone(),
                url: upstream.url.clone(),
                reason,
            })
            .and_then(|()| {
                std::fs::rename(&tmp, &target)
                    .map_err(|e| AssetError::io("cannot move into place", &target, e))
            });
        if fetched.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        fetched.map(|()| target)
    }

    #[cfg(not(feature = "download"))]
    fn download_source(&self, _entry: &AssetEntry, _upstream: &Upstream) -> Result<PathBuf> {
        unreachable!("downloads are only switched on with the `download` feature")
    }

    #[cfg(not(feature = "download"))]
    fn download_into_cache(&self, _entry: &AssetEntry, _url: &str) -> Result<PathBuf> {
        unreachable!("downloads are only switched on with the `download` feature")
    }
}

/// Takes an exclusive lock on a `.lock` file beside `path`, held until the file is dropped, so
/// that concurrent processes produce `path` once.
fn lock_beside(path: &Path) -> Result<File> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock_path = path.with_file_name(format!(".{name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| AssetError::io("cannot create lock file", &lock_path, e))?;
    lock.lock()
        .map_err(|e| AssetError::io("cannot lock", &lock_path, e))?;
    Ok(lock)
}

fn place(kind: &str, location: impl std::fmt::Display) -> SearchedPlace {
    SearchedPlace {
        kind: kind.to_string(),
        location: location.to_string(),
    }
}

impl ResolverBuilder {
    /// Uses `manifest` instead of the embedded one.
    pub fn manifest(mut self, manifest: Manifest) -> Self {
        self.resolver.manifest = manifest;
        self
    }

    /// Loads `id` from `path` (still verified against the manifest). To load a model of your
    /// own that has no manifest entry, use the owning crate's `from_file` style constructors.
    pub fn path(mut self, id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.resolver.explicit.insert(id.into(), path.into());
        self
    }

    /// Replaces the folders otherwise read from `GANFIT_ASSETS`.
    pub fn asset_dirs(mut self, dirs: Vec<PathBuf>) -> Self {
        self.resolver.asset_dirs = dirs;
        self
    }

    /// Replaces (or with `None` skips) the repository's `weights/` folder.
    pub fn repo_weights(mut self, dir: Option<PathBuf>) -> Self {
        self.resolver.repo_weights = dir;
        self
    }

    /// Replaces (or with `None` disables) the user cache folder.
    pub fn cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.resolver.cache_dir = dir;
        self
    }

    /// Switches downloading off, or on when the `download` feature is compiled in.
    pub fn download(mut self, enabled: bool) -> Self {
        self.resolver.download = enabled && cfg!(feature = "download");
        self
    }

    /// Finishes the configuration.
    pub fn build(self) -> Resolver {
        self.resolver
    }
}
