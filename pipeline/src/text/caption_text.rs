//! The caption text a training image is encoded with, assembled from its metadata entry the
//! way sd-scripts' fine-tuning dataset does it (docs/kohya-compat.md#caption-assembly), and
//! sd-scripts' per-step caption augmentation (shuffle, keep_tokens, tag dropout;
//! docs/kohya-compat.md#caption-augmentation).

use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{Map, Value};

/// sd-scripts' default `--caption_separator`.
pub const DEFAULT_SEPARATOR: &str = ",";

/// The caption of one metadata entry: `caption` (missing → empty), then, when `tags` is
/// non-empty, `separator` + `tags` (the separator is left out when the caption is empty).
///
/// An entry prepare-dataset wrote gets its subset's `caption_prefix` / `caption_suffix`
/// (`lorakit_subset`) joined on with a space, as sd-scripts' `process_caption` does.
///
/// Returns `None` when the entry has neither a `caption` nor a `tags` string, so callers can
/// report it; sd-scripts would train such an image on the empty caption.
pub fn training_caption(entry: &Map<String, Value>, separator: &str) -> Option<String> {
    let caption = entry.get("caption").and_then(Value::as_str);
    let tags = entry.get("tags").and_then(Value::as_str);
    if caption.is_none() && tags.is_none() {
        return None;
    }
    let mut text = caption.unwrap_or_default().to_string();
    if let Some(tags) = tags.filter(|t| !t.is_empty()) {
        if !text.is_empty() {
            text.push_str(separator);
        }
        text.push_str(tags);
    }
    let subset = |key: &str| {
        entry
            .get("lorakit_subset")
            .and_then(|subset| subset.get(key))
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
    };
    if let Some(prefix) = subset("caption_prefix") {
        text = format!("{prefix} {text}");
    }
    if let Some(suffix) = subset("caption_suffix") {
        text = format!("{text} {suffix}");
    }
    Some(text)
}

/// Caption augmentation settings (sd-scripts dataset options of the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionAugmentation {
    /// `--shuffle_caption`: shuffle the pieces after the first `keep_tokens`.
    pub shuffle: bool,
    /// `--keep_tokens`: leading pieces that never move or drop.
    pub keep_tokens: usize,
    /// `--caption_tag_dropout_rate`: probability of dropping each movable piece.
    pub tag_dropout_rate: f64,
    /// `--caption_separator`: what pieces are split on (re-joined with `", "`).
    pub separator: String,
}

impl CaptionAugmentation {
    /// True when the settings change nothing.
    pub fn is_identity(&self) -> bool {
        !self.shuffle && self.tag_dropout_rate <= 0.0
    }

    /// One augmented version of `caption`: split on the separator (pieces trimmed), the first
    /// `keep_tokens` fixed, the rest shuffled and/or dropped, re-joined with `", "`.
    pub fn apply(&self, caption: &str, rng: &mut impl Rng) -> String {
        if self.is_identity() {
            return caption.to_string();
        }
        let pieces: Vec<&str> = caption
            .split(self.separator.as_str())
            .map(str::trim)
            .collect();
        let fixed_count = self.keep_tokens.min(pieces.len());
        let (fixed, movable) = pieces.split_at(fixed_count);
        let mut movable = movable.to_vec();
        if self.shuffle {
            movable.shuffle(rng);
        }
        if self.tag_dropout_rate > 0.0 {
            movable.retain(|_| rng.random::<f64>() >= self.tag_dropout_rate);
        }
        fixed
            .iter()
            .chain(movable.iter())
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::json;

    fn entry(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn subset_prefix_and_suffix_are_joined_with_a_space_like_sd_scripts() {
        let prefixed = entry(json!({
            "caption": "a cat, solo",
            "lorakit_subset": {"caption_prefix": "masterpiece", "caption_suffix": "best", "dataset": 0}
        }));
        assert_eq!(
            training_caption(&prefixed, ",").unwrap(),
            "masterpiece a cat, solo best"
        );
        let unset = entry(json!({
            "caption": "a cat",
            "lorakit_subset": {"caption_prefix": null, "caption_suffix": ""}
        }));
        assert_eq!(training_caption(&unset, ",").unwrap(), "a cat");
    }

    #[test]
    fn caption_and_tags_are_joined_like_sd_scripts() {
        let both = entry(json!({"caption": "a cat", "tags": "1girl, solo"}));
        assert_eq!(training_caption(&both, ",").unwrap(), "a cat,1girl, solo");
        let tags_only = entry(json!({"tags": "1girl"}));
        assert_eq!(training_caption(&tags_only, ",").unwrap(), "1girl");
        let empty_tags = entry(json!({"caption": "a cat", "tags": ""}));
        assert_eq!(training_caption(&empty_tags, ",").unwrap(), "a cat");
        assert_eq!(
            training_caption(&entry(json!({"image_size": [1, 1]})), ","),
            None
        );
    }

    #[test]
    fn augmentation_keeps_leading_tokens_and_drops_others() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let shuffle = CaptionAugmentation {
            shuffle: true,
            keep_tokens: 1,
            tag_dropout_rate: 0.0,
            separator: ",".into(),
        };
        let caption = "trigger, a, b, c, d, e, f";
        let shuffled = shuffle.apply(caption, &mut rng);
        assert!(shuffled.starts_with("trigger, "));
        let mut sorted: Vec<&str> = shuffled.split(", ").collect();
        sorted.sort_unstable();
        assert_eq!(sorted, ["a", "b", "c", "d", "e", "f", "trigger"]);

        let drop_all = CaptionAugmentation {
            shuffle: false,
            keep_tokens: 1,
            tag_dropout_rate: 1.0,
            separator: ",".into(),
        };
        assert_eq!(drop_all.apply(caption, &mut rng), "trigger");
    }
}
