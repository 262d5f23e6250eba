use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::{AssetEntry, AssetError, Result};

/// Lower-case hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|e| AssetError::io("cannot open", path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| AssetError::io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What identifies a file's contents cheaply: if none of these changed since the file was hashed,
/// the hash still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    path: PathBuf,
    bytes: u64,
    mtime_ns: u128,
}

impl Fingerprint {
    fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| AssetError::io("cannot stat", path, e))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(Fingerprint {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            bytes: meta.len(),
            mtime_ns,
        })
    }

    fn stamp_line(&self, sha256: &str) -> String {
        format!(
            "{}\n{}\n{}\n{}\n",
            self.path.display(),
            self.bytes,
            self.mtime_ns,
            sha256
        )
    }

    fn stamp_name(&self) -> String {
        let digest = Sha256::digest(self.path.to_string_lossy().as_bytes());
        format!("{}.stamp", &hex::encode(digest)[..32])
    }
}

fn memo() -> &'static Mutex<HashMap<PathBuf, (Fingerprint, String)>> {
    static MEMO: OnceLock<Mutex<HashMap<PathBuf, (Fingerprint, String)>>> = OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// Checks size and sha256 of `path` against `entry`.
///
/// A file whose (path, size, mtime) was already verified, in this process or in an earlier one
/// that left a stamp in `stamp_dir`, is not hashed again: the large models would otherwise cost
/// a second or more at every start.
pub(crate) fn verify(entry: &AssetEntry, path: &Path, stamp_dir: Option<&Path>) -> Result<()> {
    let fingerprint = Fingerprint::of(path)?;
    if fingerprint.bytes != entry.bytes {
        return Err(AssetError::SizeMismatch {
            id: entry.id.clone(),
            path: path.to_path_buf(),
            expected: entry.bytes,
            actual: fingerprint.bytes,
        });
    }
    let remembered = memo()
        .lock()
        .ok()
        .and_then(|m| m.get(&fingerprint.path).cloned());
    if let Some((known, sha)) = remembered
        && known == fingerprint
        && sha == entry.sha256
    {
        return Ok(());
    }
    let stamp_path = stamp_dir.map(|d| d.join(fingerprint.stamp_name()));
    if let Some(stamp_path) = &stamp_path
        && std::fs::read_to_string(stamp_path).ok() == Some(fingerprint.stamp_line(&entry.sha256))
    {
        remember(&fingerprint, &entry.sha256);
        return Ok(());
    }
    let actual = sha256_file(path)?;
    if actual != entry.sha256 {
        return Err(AssetError::ChecksumMismatch {
            id: entry.id.clone(),
            path: path.to_path_buf(),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    remember(&fingerprint, &actual);
    if let Some(stamp_path) = stamp_path {
        // The stamp only saves time later; a read-only cache must not make loading fail.
        let _ = write_atomically(&stamp_path, fingerprint.stamp_line(&actual).as_bytes());
    }
    Ok(())
}

fn remember(fingerprint: &Fingerprint, sha256: &str) {
    if let Ok(mut m) = memo().lock() {
        m.insert(
            fingerprint.path.clone(),
            (fingerprint.clone(), sha256.to_string()),
        );
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so readers
/// never see a half-written file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = temp_sibling(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A unique temporary path next to `path` (same folder, so a rename onto `path` is atomic).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}
