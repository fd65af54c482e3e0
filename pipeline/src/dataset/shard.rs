//! `--shard i/n`: split a per-image stage over `n` machines with a stable assignment.
//!
//! An item belongs to shard `i` when the BLAKE3 hash of its identity modulo `n` equals `i`. The
//! identity of an image is its path relative to the dataset folder (`tag-images`,
//! `caption-images`, `prepare-latents`: one image lands on the same shard in every stage); a
//! `cache-text-encoder` entry, which reads no image, is identified by its metadata key. The
//! assignment is a function of the path alone, not of the image bytes or of the other items:
//! deciding ownership reads nothing, so no machine opens an image it does not own, every machine
//! computes the same split, and adding images moves no existing image to another shard.
//!
//! Per-image outputs (tag and caption files, latent and text-encoder caches) are written as in
//! an unsharded run. A run's own files (metadata JSON, cache index, caption index,
//! tag-probability store, `--output_path`) get a shard-named path ([`Shard::output_path`]) so
//! shards sharing a folder never overwrite each other;
//! [`crate::stages::merge_shards::merge_shard_outputs`] joins them. Each shard's manifest
//! records a [`ShardRecord`] (which part, and which items the whole run was split over), so the
//! join can check it got every part of one run.
//!
//! `--shard auto` takes the part from the scheduler that started the process
//! ([`Shard::from_scheduler`]): a Slurm job array or a Kubernetes Indexed Job.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dataset::{self, Discovery};

/// One part of a sharded run: shard `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This machine's part, `0..count`.
    pub index: u64,
    /// Number of parts.
    pub count: u64,
}

/// What a sharded run records in its manifest: which part it is, and which items the whole run
/// was split over, so that `merge-shards` joins only every part of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// This part, `0..count`.
    pub index: u64,
    /// Number of parts.
    pub count: u64,
    /// BLAKE3 of the identities of every item of every shard (sorted): the same for all parts
    /// of one run, different for a run over another dataset.
    pub dataset: String,
}

impl ShardRecord {
    /// The shard this record describes.
    pub fn shard(&self) -> Shard {
        Shard {
            index: self.index,
            count: self.count,
        }
    }
}

impl Shard {
    /// The whole dataset as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// The manifest record of this shard of a run over the items `identities` (every shard's,
    /// see [`Shard::contains`]); `None` for an unsharded run.
    pub fn record<S: AsRef<str>>(
        &self,
        identities: impl IntoIterator<Item = S>,
    ) -> Option<ShardRecord> {
        if *self == Shard::ALL {
            return None;
        }
        let mut identities: Vec<S> = identities.into_iter().collect();
        identities.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let mut hasher = blake3::Hasher::new();
        for identity in &identities {
            let bytes = identity.as_ref().as_bytes();
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        Some(ShardRecord {
            index: self.index,
            count: self.count,
            dataset: hasher.finalize().to_hex().to_string(),
        })
    }

    /// [`Shard::record`] of a run over `images` found under the dataset folder `root`.
    pub fn record_images(&self, root: &Path, images: &[PathBuf]) -> Option<ShardRecord> {
        self.record(
            images
                .iter()
                .map(|image| dataset::relative_name(root, image)),
        )
    }

    /// True when the item with identity `key` belongs to this shard.
    pub fn contains(&self, key: &str) -> bool {
        if self.count == 1 {
            return true;
        }
        let hash = blake3::hash(key.as_bytes());
        let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        head % self.count == self.index
    }

    /// True when `image`, found under the dataset folder `root`, belongs to this shard (its
    /// identity is its path relative to `root`, see [`dataset::relative_name`]).
    pub fn contains_image(&self, root: &Path, image: &Path) -> bool {
        self.count == 1 || self.contains(&dataset::relative_name(root, image))
    }

    /// Keeps only the images (and non-files) of `discovery` that belong to this shard, found
    /// under `root`; returns the shard's record over every discovered image
    /// ([`Shard::record_images`]).
    pub fn retain_images(&self, discovery: &mut Discovery, root: &Path) -> Option<ShardRecord> {
        let record = self.record_images(root, &discovery.images);
        discovery
            .images
            .retain(|image| self.contains_image(root, image));
        discovery
            .not_files
            .retain(|path| self.contains_image(root, path));
        record
    }

    /// Where this shard writes a run output that would be `path` unsharded: `path` itself for
    /// the whole dataset, else `.shard-<i>-of-<n>` before the extension
    /// (`meta_lat.json` -> `meta_lat.shard-0-of-3.json`).
    pub fn output_path(&self, path: &Path) -> PathBuf {
        if *self == Shard::ALL {
            return path.to_path_buf();
        }
        let mut name = path.file_stem().unwrap_or_default().to_os_string();
        name.push(format!(".shard-{}-of-{}", self.index, self.count));
        if let Some(extension) = path.extension() {
            name.push(".");
            name.push(extension);
        }
        path.with_file_name(name)
    }

    /// The shard whose output [`Shard::output_path`] names `path`, and the unsharded path
    /// (`meta_lat.shard-0-of-3.json` -> shard 0/3, `meta_lat.json`); `None` for another name.
    pub fn from_output_path(path: &Path) -> Option<(Shard, PathBuf)> {
        let name = path.file_name()?.to_str()?;
        let (stem, rest) = name.rsplit_once(".shard-")?;
        let (part, extension) = match rest.split_once('.') {
            Some((part, extension)) => (part, Some(extension)),
            None => (rest, None),
        };
        let (index, count) = part.split_once("-of-")?;
        let shard = Shard {
            index: index.parse().ok()?,
            count: count.parse().ok()?,
        };
        if shard.index >= shard.count || shard == Shard::ALL {
            return None;
        }
        let whole = match extension {
            Some(extension) => format!("{stem}.{extension}"),
            None => stem.to_string(),
        };
        Some((shard, path.with_file_name(whole)))
    }
}

/// What `--shard` names: one part given as `i/n`, or `auto`, the part a scheduler assigns
/// ([`Shard::from_scheduler`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardChoice {
    /// `--shard i/n`.
    Given(Shard),
    /// `--shard auto`.
    Auto,
}

impl FromStr for ShardChoice {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        if text.trim() == "auto" {
            return Ok(ShardChoice::Auto);
        }
        text.parse().map(ShardChoice::Given).map_err(|message| {
            format!("{message}, or auto (from a Slurm job array or a Kubernetes Indexed Job)")
        })
    }
}

impl Shard {
    /// The part of `--shard auto`, read from the scheduler's environment (`var` looks a
    /// variable up):
    /// * a Slurm job array: shard `(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    ///   SLURM_ARRAY_TASK_STEP` of `SLURM_ARRAY_TASK_COUNT`, so `--array=1-3` works as well
    ///   as `0-2`; an array with gaps (`--array=0,4,5`) is refused. `shard_count`, when given,
    ///   must equal the array's size.
    /// * a Kubernetes Indexed Job: shard `JOB_COMPLETION_INDEX` of `shard_count` (the Job's
    ///   `completions`, which the pod's environment does not hold), which is then required.
    ///
    /// Also returns where the part came from, for the log.
    pub fn from_scheduler(
        var: impl Fn(&str) -> Option<String>,
        shard_count: Option<u64>,
    ) -> std::result::Result<(Shard, &'static str), String> {
        let number = |name: &str| -> std::result::Result<Option<u64>, String> {
            match var(name) {
                None => Ok(None),
                Some(text) => text.trim().parse().map(Some).map_err(|_| {
                    format!("--shard auto: {name}={text:?} is not a non-negative integer")
                }),
            }
        };
        if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let count = number("SLURM_ARRAY_TASK_COUNT")?.ok_or(
                "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not",
            )?;
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let max = number("SLURM_ARRAY_TASK_MAX")?;
            let regular = count > 0
                && id >= min
                && (id - min) % step == 0
                && (id - min) / step < count
                && max.is_none_or(|max| max == min + (count - 1) * step);
            if !regular {
                return Err(format!(
                    "--shard auto: the Slurm array (task {id}, {count} tasks from {min}{}) has \
                     gaps; submit a range such as --array=0-{}, or give --shard i/n",
                    max.map(|max| format!(" to {max}")).unwrap_or_default(),
                    count.saturating_sub(1)
                ));
            }
            if let Some(given) = shard_count.filter(|&given| given != count) {
                return Err(format!(
                    "--shard_count {given} disagrees with the Slurm array's \
                     SLURM_ARRAY_TASK_COUNT={count}; leave --shard_count out under Slurm"
                ));
            }
            let shard = Shard {
                index: (id - min) / step,
                count,
            };
            return Ok((shard, "Slurm job array"));
        }
        if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let count = shard_count.ok_or(
                "--shard auto in a Kubernetes Indexed Job needs --shard_count N (the Job's \
                 completions)",
            )?;
            if index >= count {
                return Err(format!(
                    "--shard auto: JOB_COMPLETION_INDEX={index} is not below --shard_count {count}"
                ));
            }
            return Ok((Shard { index, count }, "Kubernetes Indexed Job"));
        }
        Err(
            "--shard auto needs a scheduler's task index: SLURM_ARRAY_TASK_ID with \
             SLURM_ARRAY_TASK_COUNT (a Slurm job array), or JOB_COMPLETION_INDEX with \
             --shard_count N (a Kubernetes Indexed Job); neither is set, so give --shard i/n"
                .to_string(),
        )
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
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
    fn shard_outputs_are_named_apart() {
        let shard = Shard { index: 1, count: 3 };
        assert_eq!(
            shard.output_path(Path::new("out/meta_lat.json")),
            Path::new("out/meta_lat.shard-1-of-3.json")
        );
        assert_eq!(
            shard.output_path(Path::new("d/.lorakit-tag-probs.bin")),
            Path::new("d/.lorakit-tag-probs.shard-1-of-3.bin")
        );
        assert_eq!(
            Shard::ALL.output_path(Path::new("meta.json")),
            Path::new("meta.json")
        );
        for path in ["out/meta_lat.json", "d/.lorakit-tag-probs.bin", "noext"] {
            let named = shard.output_path(Path::new(path));
            assert_eq!(
                Shard::from_output_path(&named),
                Some((shard, PathBuf::from(path)))
            );
        }
        assert_eq!(Shard::from_output_path(Path::new("meta.json")), None);
        assert_eq!(
            Shard::from_output_path(Path::new("m.shard-3-of-3.json")),
            None
        );
        let root = Path::new("data");
        let image = Path::new("data/sub/a.png");
        assert_eq!(
            shard.contains_image(root, image),
            shard.contains("sub/a.png")
        );
    }

    /// [`Shard::from_scheduler`] over the variables `vars`.
    fn scheduled(
        vars: &[(&str, &str)],
        shard_count: Option<u64>,
    ) -> std::result::Result<Shard, String> {
        let lookup = |name: &str| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        };
        Shard::from_scheduler(lookup, shard_count).map(|(shard, _)| shard)
    }

    #[test]
    fn auto_reads_slurm_arrays_and_indexed_jobs() {
        let slurm = |id: &str, min: &str, step: &str, max: &str| {
            scheduled(
                &[
                    ("SLURM_ARRAY_TASK_ID", id),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                    ("SLURM_ARRAY_TASK_MIN", min),
                    ("SLURM_ARRAY_TASK_STEP", step),
                    ("SLURM_ARRAY_TASK_MAX", max),
                ],
                None,
            )
        };
        // --array=0-2, --array=1-3 and --array=2-6:2 all give parts 0..3.
        assert_eq!(slurm("1", "0", "1", "2"), Ok(Shard { index: 1, count: 3 }));
        assert_eq!(slurm("3", "1", "1", "3"), Ok(Shard { index: 2, count: 3 }));
        assert_eq!(slurm("4", "2", "2", "6"), Ok(Shard { index: 1, count: 3 }));
        // --array=0,4,5: gaps.
        let gaps = slurm("4", "0", "1", "5").unwrap_err();
        assert!(gaps.contains("--array=0-2"), "{gaps}");
        let slurm_count = |count| {
            scheduled(
                &[
                    ("SLURM_ARRAY_TASK_ID", "0"),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                ],
                count,
            )
        };
        assert_eq!(slurm_count(Some(3)), Ok(Shard { index: 0, count: 3 }));
        assert!(slurm_count(Some(4))
            .unwrap_err()
            .contains("SLURM_ARRAY_TASK_COUNT=3"));

        let job = |index: &str, count| scheduled(&[("JOB_COMPLETION_INDEX", index)], count);
        assert_eq!(job("2", Some(3)), Ok(Shard { index: 2, count: 3 }));
        assert!(job("2", None).unwrap_err().contains("--shard_count"));
        assert!(job("3", Some(3)).unwrap_err().contains("not below"));
        assert!(job("x", Some(3))
            .unwrap_err()
            .contains("JOB_COMPLETION_INDEX"));

        let none = scheduled(&[], Some(3)).unwrap_err();
        assert!(
            none.contains("SLURM_ARRAY_TASK_ID") && none.contains("JOB_COMPLETION_INDEX"),
            "{none}"
        );
    }

    #[test]
    fn parsing() {
        assert_eq!("auto".parse::<ShardChoice>(), Ok(ShardChoice::Auto));
        assert_eq!(
            "1/2".parse::<ShardChoice>(),
            Ok(ShardChoice::Given(Shard { index: 1, count: 2 }))
        );
        assert!("x".parse::<ShardChoice>().unwrap_err().contains("auto"));
        assert_eq!(
            "2/5".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 5 }
        );
        assert!("5/5".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
    }
}
