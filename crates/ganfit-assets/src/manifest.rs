use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::{AssetError, Result};

/// One model file, as `weights-manifest.toml` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetEntry {
    /// Stable name the code asks for, e.g. `ict-face-model`.
    pub id: String,
    /// File name, looked up in every search folder.
    pub file: String,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// SPDX identifier or short licence note.
    pub license: String,
    /// Where the data comes from: an upstream URL, or a package name and version.
    pub source: String,
    /// The exact command that produced the file from its source.
    pub produced_by: String,
    /// Direct download URL of the finished file, when one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// The list of every asset the library may load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The entries, in file order.
    #[serde(default, rename = "asset")]
    pub assets: Vec<AssetEntry>,
}

const EMBEDDED: &str = include_str!("../../../weights-manifest.toml");

impl Manifest {
    /// Parses a manifest from TOML text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| AssetError::Manifest {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        manifest.validate(origin)?;
        Ok(manifest)
    }

    /// Reads and parses a manifest file.
    pub fn from_path(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| AssetError::io("cannot read", path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The manifest compiled into the library (the repository's `weights-manifest.toml`).
    pub fn embedded() -> &'static Manifest {
        static MANIFEST: OnceLock<Manifest> = OnceLock::new();
        MANIFEST.get_or_init(|| {
            // The repository's own manifest is checked by a unit test, so failing here means the
            // build itself is broken rather than bad user input.
            Self::parse(EMBEDDED, "weights-manifest.toml (embedded)")
                .expect("the embedded weights-manifest.toml is valid")
        })
    }

    /// The entry for `id`.
    pub fn get(&self, id: &str) -> Result<&AssetEntry> {
        self.assets
            .iter()
            .find(|a| a.id == id)
            .ok_or_else(|| AssetError::UnknownId {
                id: id.to_string(),
                known: self
                    .assets
                    .iter()
                    .map(|a| a.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let invalid = |reason: String| AssetError::Manifest {
            origin: origin.to_string(),
            reason,
        };
        let mut seen = std::collections::HashSet::new();
        for entry in &self.assets {
            if !seen.insert(entry.id.as_str()) {
                return Err(invalid(format!("id `{}` appears twice", entry.id)));
            }
            let hex_ok = entry.sha256.len() == 64
                && entry
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(invalid(format!(
                    "`{}` has sha256 `{}`, which is not 64 lower-case hex digits",
                    entry.id, entry.sha256
                )));
            }
            if entry.file.is_empty() || entry.file.contains(['/', '\\']) || entry.file == ".." {
                return Err(invalid(format!(
                    "`{}` has file `{}`: it must be a plain file name",
                    entry.id, entry.file
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_manifest_parses() {
        let m = Manifest::embedded();
        for entry in &m.assets {
            assert!(!entry.license.is_empty(), "{} lacks a licence", entry.id);
            assert!(
                !entry.produced_by.is_empty(),
                "{} lacks produced_by",
                entry.id
            );
        }
    }

    #[test]
    fn rejects_bad_hash_duplicate_ids_and_paths() {
        let entry = |id: &str, file: &str, sha: &str| {
            format!(
                "[[asset]]\nid = \"{id}\"\nfile = \"{file}\"\nsha256 = \"{sha}\"\nbytes = 1\n\
                 license = \"MIT\"\nsource = \"s\"\nproduced_by = \"p\"\n"
            )
        };
        let good = "a".repeat(64);
        assert!(Manifest::parse(&entry("x", "x.bin", &good), "t").is_ok());
        assert!(Manifest::parse(&entry("x", "x.bin", "abc"), "t").is_err());
        assert!(Manifest::parse(&entry("x", "../x.bin", &good), "t").is_err());
        let twice = entry("x", "x.bin", &good) + &entry("x", "y.bin", &good);
        let err = Manifest::parse(&twice, "t").unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
        let unknown_field = entry("x", "x.bin", &good) + "colour = \"red\"\n";
        assert!(Manifest::parse(&unknown_field, "t").is_err());
    }

    #[test]
    fn unknown_id_lists_known_ids() {
        let good = "b".repeat(64);
        let text = format!(
            "[[asset]]\nid = \"known\"\nfile = \"k.bin\"\nsha256 = \"{good}\"\nbytes = 1\n\
             license = \"MIT\"\nsource = \"s\"\nproduced_by = \"p\"\n"
        );
        let m = Manifest::parse(&text, "t").unwrap();
        let err = m.get("nope").unwrap_err().to_string();
        assert!(err.contains("`nope`") && err.contains("known"), "{err}");
    }
}
