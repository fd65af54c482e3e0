//! Who owns a caption or tag file: the stage that wrote it, or the user.
//!
//! `caption-images` and `tag-images` record in their manifest (`sidecars`) the BLAKE3 of every
//! sidecar file they wrote, by path relative to the dataset folder. On the next run each file is
//! one of:
//! - absent: the stage writes it;
//! - the stage's own (its bytes still hash to the recorded value, or equal what the stage would
//!   write now): regenerated when its content key changed;
//! - the user's (never written by the stage, or edited since): kept as it is. `--overwrite`
//!   replaces it, after copying it to a backup (`<name>.bak`, or `<name>.bak.<n>` when that
//!   exists), so nothing the user wrote is ever lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{infra::fsio, infra::hashing, Error, Result};

/// Sidecar files a stage wrote: path relative to the dataset folder -> BLAKE3 of the bytes.
pub type WrittenSidecars = BTreeMap<String, String>;

/// Whose the file at a sidecar path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// No file yet.
    Absent,
    /// Written by the stage and unchanged since.
    Stage,
    /// Written or edited by the user.
    User,
}

/// A sidecar path as found before the stage writes it.
#[derive(Debug, Clone)]
pub struct Existing {
    /// Whose the file is.
    pub owner: Owner,
    /// Its bytes, when it exists.
    pub bytes: Option<Vec<u8>>,
}

/// What [`write`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file was created or regenerated.
    Written,
    /// The file already held exactly these bytes.
    Unchanged,
    /// The user's file was kept; nothing was written.
    Kept,
    /// The user's file was copied to this backup, then replaced (`--overwrite`).
    Replaced(PathBuf),
}

impl Outcome {
    /// True when the file now holds the stage's bytes (record it as the stage's own).
    pub fn is_stage_owned(&self) -> bool {
        !matches!(self, Outcome::Kept)
    }
}

/// Reads the sidecar at `path` and decides whose it is. `recorded` is the hash the stage's
/// previous run recorded for it, if any.
///
/// Only regular files are read: a folder, FIFO or device at a sidecar path is an error naming
/// it, never a hang.
pub fn inspect(path: &Path, recorded: Option<&str>) -> Result<Existing> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Existing {
                owner: Owner::Absent,
                bytes: None,
            })
        }
        Err(error) => return Err(Error::io(path, error)),
    };
    if !metadata.is_file() {
        return Err(super::not_a_regular_sidecar(path));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let owner = match recorded {
        Some(hash) if hashing::hash_bytes(&bytes) == hash => Owner::Stage,
        _ => Owner::User,
    };
    Ok(Existing {
        owner,
        bytes: Some(bytes),
    })
}

/// Writes `bytes` to the sidecar at `path` under the ownership rules of this module: the
/// user's file is kept unless `overwrite`, and then backed up first. A user's file that already
/// holds exactly `bytes` is left alone and counts as unchanged.
pub fn write(path: &Path, bytes: &[u8], existing: &Existing, overwrite: bool) -> Result<Outcome> {
    if existing.bytes.as_deref() == Some(bytes) {
        return Ok(Outcome::Unchanged);
    }
    match (existing.owner, &existing.bytes) {
        (Owner::User, Some(previous)) => {
            if !overwrite {
                return Ok(Outcome::Kept);
            }
            let backup = backup_path(path);
            fsio::write_atomic(&backup, previous)?;
            fsio::write_atomic(path, bytes)?;
            Ok(Outcome::Replaced(backup))
        }
        _ => {
            fsio::write_atomic(path, bytes)?;
            Ok(Outcome::Written)
        }
    }
}

/// The first free backup name of `path`: `<name>.bak`, then `<name>.bak.1`, `<name>.bak.2`, ...
pub fn backup_path(path: &Path) -> PathBuf {
    let with_suffix = |suffix: String| {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        PathBuf::from(name)
    };
    let first = with_suffix(".bak".into());
    if std::fs::symlink_metadata(&first).is_err() {
        return first;
    }
    (1u64..)
        .map(|n| with_suffix(format!(".bak.{n}")))
        .find(|candidate| std::fs::symlink_metadata(candidate).is_err())
        .expect("a free backup name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_follows_the_recorded_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        assert_eq!(inspect(&path, None).unwrap().owner, Owner::Absent);
        std::fs::write(&path, b"cat, dog\n").unwrap();
        let recorded = hashing::hash_bytes(b"cat, dog\n");
        assert_eq!(inspect(&path, Some(&recorded)).unwrap().owner, Owner::Stage);
        assert_eq!(inspect(&path, None).unwrap().owner, Owner::User);
        std::fs::write(&path, b"cat, dog, my tag\n").unwrap();
        assert_eq!(inspect(&path, Some(&recorded)).unwrap().owner, Owner::User);
    }

    #[test]
    fn user_files_are_kept_or_backed_up_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.caption");
        std::fs::write(&path, b"my own caption\n").unwrap();
        let existing = inspect(&path, None).unwrap();
        assert_eq!(
            write(&path, b"generated\n", &existing, false).unwrap(),
            Outcome::Kept
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"my own caption\n");

        let outcome = write(&path, b"generated\n", &existing, true).unwrap();
        let backup = dir.path().join("a.caption.bak");
        assert_eq!(outcome, Outcome::Replaced(backup.clone()));
        assert_eq!(std::fs::read(&backup).unwrap(), b"my own caption\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"generated\n");

        // A second replacement keeps the first backup and takes the next free name.
        std::fs::write(&path, b"edited again\n").unwrap();
        let existing = inspect(&path, Some(&hashing::hash_bytes(b"generated\n"))).unwrap();
        let outcome = write(&path, b"generated\n", &existing, true).unwrap();
        assert_eq!(
            outcome,
            Outcome::Replaced(dir.path().join("a.caption.bak.1"))
        );
        assert_eq!(std::fs::read(&backup).unwrap(), b"my own caption\n");
        assert_eq!(
            std::fs::read(dir.path().join("a.caption.bak.1")).unwrap(),
            b"edited again\n"
        );
    }

    #[test]
    fn stage_files_are_regenerated_and_identical_bytes_are_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        let absent = inspect(&path, None).unwrap();
        assert_eq!(
            write(&path, b"cat\n", &absent, false).unwrap(),
            Outcome::Written
        );
        let ours = inspect(&path, Some(&hashing::hash_bytes(b"cat\n"))).unwrap();
        assert_eq!(
            write(&path, b"cat\n", &ours, false).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(
            write(&path, b"dog\n", &ours, false).unwrap(),
            Outcome::Written
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"dog\n");
        assert!(!dir.path().join("a.txt.bak").exists());
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.caption");
        let name = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o644) }, 0);
        let message = inspect(&path, None).unwrap_err().to_string();
        assert!(
            message.contains("a.caption") && message.contains("not a regular file"),
            "{message}"
        );
    }
}
