//! Content keys: BLAKE3 digests over everything that determines an output.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Incrementally builds a content key from named, length-prefixed fields.
///
/// Every field is framed with its name and length, so `("ab", "c")` and `("a", "bc")` differ.
#[derive(Clone)]
pub struct KeyBuilder(blake3::Hasher);

impl KeyBuilder {
    /// Starts a key for `stage` at cache-format `version`.
    pub fn new(stage: &str, version: u32) -> Self {
        let mut builder = KeyBuilder(blake3::Hasher::new());
        builder.field("stage", stage.as_bytes());
        builder.field("version", &version.to_le_bytes());
        builder
    }

    /// Adds a named byte field.
    pub fn field(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.0.update(&(name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update(&(value.len() as u64).to_le_bytes());
        self.0.update(value);
        self
    }

    /// Adds a named text field.
    pub fn text(&mut self, name: &str, value: &str) -> &mut Self {
        self.field(name, value.as_bytes())
    }

    /// Finishes the key as 64 lowercase hex digits.
    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// BLAKE3 of a byte slice, as hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// BLAKE3 of a file's content, as hex (streamed, memory-mapped for large files).
pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path).map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Lower-case hex SHA-256 of a file's bytes from `offset` on (streamed in 4 MiB reads).
pub fn sha256_file_from(path: &Path, offset: u64) -> Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek};
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .map_err(|e| Error::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 4 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The hash `compute` returns for the files `files`, memoised on disk (`weights-hashes.json` in
/// `$LORAKIT_CACHE_DIR`, `$XDG_CACHE_HOME/lorakit` or `~/.cache/lorakit`) under
/// their canonical paths, sizes and modification times plus `label`, so large model files are
/// hashed once per machine rather than on every run.
pub fn memoised(
    files: &[PathBuf],
    label: &str,
    compute: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let signature = file_signature(files, label)?;
    if let Some(hash) = memo_lookup(&signature) {
        return Ok(hash);
    }
    let hash = compute()?;
    memo_store(&signature, &hash);
    Ok(hash)
}

/// Identity of files for the hash memo: canonical paths, sizes, mtimes and a label.
fn file_signature(files: &[PathBuf], label: &str) -> Result<String> {
    let mut signature = KeyBuilder::new("weights-memo", 1);
    signature.text("prefix", label);
    for file in files {
        let canonical = std::fs::canonicalize(file).map_err(|e| Error::io(file, e))?;
        let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        signature.text("file", &canonical.to_string_lossy());
        signature.text("size", &meta.len().to_string());
        signature.text("mtime", &mtime.to_string());
    }
    Ok(signature.finish())
}

/// The memo file: `$LORAKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`.
fn memo_path() -> Option<PathBuf> {
    let dir = if let Some(dir) = std::env::var_os("LORAKIT_CACHE_DIR") {
        PathBuf::from(dir)
    } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(dir).join("lorakit")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("lorakit")
    };
    Some(dir.join("weights-hashes.json"))
}

fn memo_read(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn memo_lookup(signature: &str) -> Option<String> {
    let memo = memo_read(&memo_path()?);
    memo.get(signature)?.as_str().map(str::to_string)
}

/// Records a hash in the memo (best effort: a read-only cache directory only costs a re-hash).
fn memo_store(signature: &str, hash: &str) {
    let Some(path) = memo_path() else { return };
    if let Some(dir) = path.parent() {
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
    }
    let mut memo = memo_read(&path);
    memo.insert(signature.to_string(), serde_json::Value::from(hash));
    if let Ok(bytes) = serde_json::to_vec_pretty(&memo) {
        let _ = crate::infra::fsio::write_atomic(&path, &bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_framed() {
        let a = KeyBuilder::new("s", 1)
            .text("x", "ab")
            .text("y", "c")
            .finish();
        let b = KeyBuilder::new("s", 1)
            .text("x", "a")
            .text("y", "bc")
            .finish();
        assert_ne!(a, b);
        assert_eq!(
            a,
            KeyBuilder::new("s", 1)
                .text("x", "ab")
                .text("y", "c")
                .finish()
        );
        assert_eq!(a.len(), 64);
    }
}
