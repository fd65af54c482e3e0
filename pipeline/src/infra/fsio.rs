//! Crash-safe file output: every artifact is written to a temporary file in the destination
//! directory, flushed to disk, then renamed over the destination.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Prefix of the temporary files [`write_atomic_with`] creates; lint and cleanup recognise it.
pub const TEMP_PREFIX: &str = ".lorakit-tmp-";

/// Writes `bytes` to `path` atomically.
///
/// When `path` already holds exactly `bytes` it is left alone, so its modification time only
/// changes when its content does: `make` then re-runs downstream stages only after a real change.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let unchanged = std::fs::metadata(path)
        .is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
        && std::fs::read(path).is_ok_and(|old| old == bytes);
    if unchanged {
        return Ok(());
    }
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically with `fill`, which receives a buffered writer on a temporary file.
///
/// Readers see either the old file or the complete new one, never a partial write. On any error
/// the temporary file is removed and the destination is left untouched.
pub fn write_atomic_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    let temp = temp_path_for(path)?;
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&temp)?;
        let mut writer = BufWriter::with_capacity(1 << 16, file);
        fill(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            sync_parent(path);
            Ok(())
        }
        Err(source) => {
            let _ = std::fs::remove_file(&temp);
            Err(Error::io(path, source))
        }
    }
}

/// Checks, before any work, that [`write_atomic`] will be able to write `path`: its directory
/// exists and takes new files, and `path` itself is not a folder. A probe file is created and
/// removed, so a read-only folder or a full quota is found now instead of after the work.
pub fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::bad_file(
            path,
            "is a folder: cannot write the output here (move it away or choose another name)",
        ));
    }
    let probe = temp_path_for(path)?;
    File::create(&probe).map_err(|e| {
        Error::bad_file(
            path,
            format!("cannot write in {}: {e}", parent_dir(path).display()),
        )
    })?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))
}

/// The temporary sibling path used while writing `path`; fails if the directory is missing.
fn temp_path_for(path: &Path) -> Result<PathBuf> {
    let parent = parent_dir(path);
    if !parent.is_dir() {
        return Err(Error::bad_file(
            path,
            format!(
                "cannot write here: the directory {} does not exist (create it first)",
                parent.display()
            ),
        ));
    }
    if path.file_name().is_none() {
        return Err(Error::Usage(format!(
            "{} is not a file path",
            path.display()
        )));
    }
    let tag = format!(
        "{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    Ok(temp_sibling(path, &tag))
}

/// A hidden sibling of `path` to stage a write in: `.lorakit-tmp-<tag>-<hash of the name>`.
///
/// It is short whatever the length of the final name (at most 40 bytes plus `tag`), so a file
/// whose legal name is near the 255-byte limit can still be written.
pub fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().as_encoded_bytes();
    let hash = blake3::hash(name).to_hex();
    parent_dir(path).join(format!("{TEMP_PREFIX}{tag}-{}", &hash[..12]))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes the directory entry of a rename so it survives a power loss (best effort).
fn sync_parent(path: &Path) {
    if let Ok(dir) = File::open(parent_dir(path)) {
        let _ = dir.sync_all();
    }
}

/// Reads a whole file, mapping errors to [`Error::Io`] naming the file.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        write_atomic(&target, b"first").unwrap();
        write_atomic(&target, b"second").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.json")]);
    }

    #[test]
    fn identical_content_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        write_atomic(&target, b"same").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(&target)
            .unwrap()
            .set_modified(old)
            .unwrap();
        write_atomic(&target, b"same").unwrap();
        assert_eq!(std::fs::metadata(&target).unwrap().modified().unwrap(), old);
        write_atomic(&target, b"new!").unwrap();
        assert_ne!(std::fs::metadata(&target).unwrap().modified().unwrap(), old);
    }

    #[test]
    fn failed_fill_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        write_atomic(&target, b"old").unwrap();
        let err = write_atomic_with(&target, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("interrupted"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn names_near_the_length_limit_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(format!("{}.txt", "n".repeat(251)));
        assert_eq!(target.file_name().unwrap().len(), 255);
        write_atomic(&target, b"tags").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"tags");
        assert!(temp_sibling(&target, "123-4").file_name().unwrap().len() < 64);
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nope").join("out.json");
        let message = write_atomic(&target, b"x").unwrap_err().to_string();
        assert!(message.contains("does not exist"), "{message}");
        assert!(message.contains("nope"), "{message}");
    }
}
