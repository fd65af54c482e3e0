//! `--shard i/n`: split a per-image stage over `n` machines with a stable assignment.
//!
//! An item belongs to shard `i` when the BLAKE3 hash of its identity (the image path relative to
//! the dataset folder, or its metadata key) modulo `n` equals `i`. The assignment depends only on
//! the item itself, so every machine computes the same split without reading the other items,
//! and adding images moves no existing image to another shard.

use std::str::FromStr;

/// One part of a sharded run: shard `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This machine's part, `0..count`.
    pub index: u64,
    /// Number of parts.
    pub count: u64,
}

impl Shard {
    /// The whole dataset as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// True when the item with identity `key` belongs to this shard.
    pub fn contains(&self, key: &str) -> bool {
        if self.count == 1 {
            return true;
        }
        let hash = blake3::hash(key.as_bytes());
        let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        head % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || format!("--shard expects i/n with 0 <= i < n (e.g. 0/3), got {text:?}");
        let (index, count) = text.split_once('/').ok_or_else(usage)?;
        let index: u64 = index.trim().parse().map_err(|_| usage())?;
        let count: u64 = count.trim().parse().map_err(|_| usage())?;
        if count == 0 || index >= count {
            return Err(usage());
        }
        Ok(Shard { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_items() {
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for n in 0..300 {
            let key = format!("img_{n}.png");
            assert_eq!(shards.iter().filter(|s| s.contains(&key)).count(), 1);
        }
        let sizes: Vec<usize> = shards
            .iter()
            .map(|s| {
                (0..300)
                    .filter(|n| s.contains(&format!("img_{n}.png")))
                    .count()
            })
            .collect();
        assert!(sizes.iter().all(|&c| c > 70), "{sizes:?}");
    }

    #[test]
    fn parsing() {
        assert_eq!(
            "2/5".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 5 }
        );
        assert!("5/5".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
    }
}
