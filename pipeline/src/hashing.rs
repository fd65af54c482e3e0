//! Content keys: BLAKE3 digests over everything that determines an output.

use std::path::Path;

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
