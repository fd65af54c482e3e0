//! The hidden `.lorakit/` folder of a dataset: where the tools keep their own bookkeeping (the
//! tag-probability store, the caption index, their manifests, and the latent caches of settings
//! whose sd-scripts file name another setting holds) instead of among the user's images.
//!
//! Earlier versions wrote the bookkeeping files straight into the image folder;
//! [`Bookkeeping::migrate`] moves such a file (and its manifest) into `.lorakit/` by renaming it.

use std::path::{Path, PathBuf};

use crate::formats::manifest::Manifest;
use crate::{Error, Result};

/// Name of the bookkeeping folder inside a dataset folder (and inside every image folder that
/// holds keyed latent caches).
pub const LORAKIT_DIR: &str = ".lorakit";

/// One bookkeeping file of a dataset: where it lives now (`<dataset>/.lorakit/<name>`) and where
/// earlier versions kept it (`<dataset>/<legacy name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookkeeping {
    /// `<dataset>/.lorakit/<name>`.
    pub path: PathBuf,
    /// The file's location before it moved into `.lorakit/`.
    pub legacy: PathBuf,
}

impl Bookkeeping {
    /// The file `name` of the dataset folder `train_data_dir`, formerly `legacy_name` there.
    pub fn new(train_data_dir: &Path, name: &str, legacy_name: &str) -> Self {
        Bookkeeping {
            path: train_data_dir.join(LORAKIT_DIR).join(name),
            legacy: train_data_dir.join(legacy_name),
        }
    }

    /// Both paths with a shard's name ([`crate::dataset::shard::Shard::output_path`]).
    pub fn map(&self, rename: impl Fn(&Path) -> PathBuf) -> Self {
        Bookkeeping {
            path: rename(&self.path),
            legacy: rename(&self.legacy),
        }
    }

    /// The file to read: the current location, or the legacy one while only that exists (a
    /// dataset no tool has migrated yet).
    pub fn existing(&self) -> &Path {
        if !self.path.exists() && self.legacy.exists() {
            &self.legacy
        } else {
            &self.path
        }
    }

    /// Makes the current location ready to be written: creates `.lorakit/`, and when only the
    /// legacy file exists moves it there with its manifest (renames, so each move is atomic),
    /// saying so once. Returns the current path.
    pub fn migrate(&self) -> Result<&Path> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        if self.legacy.exists() && !self.path.exists() {
            for (from, to) in [
                (
                    Manifest::path_for(&self.legacy),
                    Manifest::path_for(&self.path),
                ),
                (self.legacy.clone(), self.path.clone()),
            ] {
                if from.exists() && !to.exists() {
                    std::fs::rename(&from, &to).map_err(|e| {
                        Error::bad_file(
                            &from,
                            format!(
                                "cannot move it to {}: {e}; move it there yourself",
                                to.display()
                            ),
                        )
                    })?;
                }
            }
            tracing::info!(
                "moved {} (and its manifest) to {}: lorakit keeps its bookkeeping in {LORAKIT_DIR}/",
                self.legacy.display(),
                self.path.display()
            );
        }
        Ok(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_moves_the_legacy_file_and_its_manifest_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = Bookkeeping::new(dir.path(), "store.bin", ".old-store.bin");
        std::fs::write(&file.legacy, b"data").unwrap();
        std::fs::write(Manifest::path_for(&file.legacy), b"{}").unwrap();
        assert_eq!(file.existing(), file.legacy);
        assert_eq!(file.migrate().unwrap(), file.path);
        assert_eq!(std::fs::read(&file.path).unwrap(), b"data");
        assert!(Manifest::path_for(&file.path).is_file());
        assert!(!file.legacy.exists() && !Manifest::path_for(&file.legacy).exists());
        assert_eq!(file.existing(), file.path);
        // A legacy file appearing beside a current one is left alone.
        std::fs::write(&file.legacy, b"other").unwrap();
        file.migrate().unwrap();
        assert_eq!(std::fs::read(&file.path).unwrap(), b"data");
        assert!(file.legacy.exists());
    }

    #[test]
    fn shard_names_apply_to_both_locations() {
        let file = Bookkeeping::new(Path::new("data"), "x.json", "y.json");
        let shard = file.map(|p| p.with_extension("shard.json"));
        assert_eq!(shard.path, Path::new("data/.lorakit/x.shard.json"));
        assert_eq!(shard.legacy, Path::new("data/y.shard.json"));
    }
}
