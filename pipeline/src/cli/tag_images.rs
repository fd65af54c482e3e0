//! The flags of `tag-images` (sd-scripts spellings) and the stage options they describe.

use crate::cli::{ImageArgs, ShardArgs};
use crate::infra::report::Summary;
use crate::stages::tag_images::labels::{
    parse_replacements, LabelOptions, Placement, Selection, Thresholds,
};
use crate::stages::tag_images::onnx::Device;
use crate::stages::tag_images::{TagOptions, DEFAULT_REPO_ID};
use crate::{Error, Result};
use std::path::PathBuf;

/// The flags of `tag-images`; the tool adds its description and the logging flags.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct TagImagesArgs {
    /// Folder of training images.
    pub train_data_dir: PathBuf,
    /// Tagger repository id; selects the folder `<model_dir>/<owner>_<repo>` (no download).
    #[arg(long, default_value = DEFAULT_REPO_ID)]
    pub repo_id: String,
    /// Folder holding tagger models.
    #[arg(long, default_value = "wd14_tagger_model")]
    pub model_dir: PathBuf,
    /// Accepted for compatibility; lorakit never downloads models.
    #[arg(long)]
    pub force_download: bool,
    /// Accepted for compatibility; inference always uses ONNX Runtime.
    #[arg(long)]
    pub onnx: bool,
    /// Images per inference (a fixed-batch model overrides it).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Accepted for compatibility; decoding always runs on a thread pool and skips bad images.
    #[arg(long)]
    pub max_data_loader_n_workers: Option<usize>,
    /// Accepted for compatibility; no effect.
    #[arg(long)]
    pub pin_memory: bool,
    /// Write one JSON (or JSON Lines, for a .jsonl name) file instead of tag files (with
    /// --shard i/n: NAME.shard-i-of-n.json(l)).
    #[arg(long)]
    pub output_path: Option<PathBuf>,
    /// Extension of the tag files.
    #[arg(long, default_value = ".txt")]
    pub caption_extension: String,
    /// Misspelled alias of --caption_extension kept by sd-scripts (overrides it).
    #[arg(long)]
    pub caption_extention: Option<String>,
    /// Base threshold for every tag category.
    #[arg(long, default_value_t = 0.35)]
    pub thresh: f32,
    /// Threshold for general tags (default: --thresh).
    #[arg(long)]
    pub general_threshold: Option<f32>,
    /// Threshold for character tags (default: --thresh; above 1 disables them).
    #[arg(long)]
    pub character_threshold: Option<f32>,
    /// Threshold for meta tags (tag_mapping models; default: --thresh).
    #[arg(long)]
    pub meta_threshold: Option<f32>,
    /// Threshold for model tags (tag_mapping models; default: --thresh).
    #[arg(long)]
    pub model_threshold: Option<f32>,
    /// Threshold for copyright tags (tag_mapping models; default: --thresh).
    #[arg(long)]
    pub copyright_threshold: Option<f32>,
    /// Threshold for artist tags (tag_mapping models; default: --thresh).
    #[arg(long)]
    pub artist_threshold: Option<f32>,
    /// Also tag images in subfolders.
    #[arg(long)]
    pub recursive: bool,
    /// Replace `_` with a space in tags longer than 3 characters.
    #[arg(long)]
    pub remove_underscore: bool,
    /// Tags never written, separated by the caption separator.
    #[arg(long, default_value = "")]
    pub undesired_tags: String,
    /// Print tag frequencies at the end.
    #[arg(long)]
    pub frequency_tags: bool,
    /// Merge the model's tags into tag files you wrote or edited (tags not already there are
    /// appended). Tag files tag-images wrote itself are regenerated.
    #[arg(long)]
    pub append_tags: bool,
    /// Replace tag files you wrote or edited since tag-images wrote them. Each is first copied to
    /// <name>.bak (or <name>.bak.N). Without it (and without --append_tags) they are kept.
    #[arg(long)]
    pub overwrite: bool,
    /// Put the most likely rating tag first.
    #[arg(long)]
    pub use_rating_tags: bool,
    /// Put the most likely rating tag last.
    #[arg(long)]
    pub use_rating_tags_as_last_tag: bool,
    /// Put the most likely quality tag first (tag_mapping models).
    #[arg(long)]
    pub use_quality_tags: bool,
    /// Put the most likely quality tag last (tag_mapping models).
    #[arg(long)]
    pub use_quality_tags_as_last_tag: bool,
    /// Put character tags before general tags.
    #[arg(long)]
    pub character_tags_first: bool,
    /// Tags moved to the front when present (separated by the caption separator, no spaces).
    #[arg(long)]
    pub always_first_tags: Option<String>,
    /// Separator between tags in the output.
    #[arg(long, default_value = ", ")]
    pub caption_separator: String,
    /// Renames `src,dst;src2,dst2` (escape literal commas/semicolons as \, and \;).
    #[arg(long)]
    pub tag_replacement: Option<String>,
    /// Write `name_(series)` character tags as `name, series`.
    #[arg(long)]
    pub character_tag_expand: bool,
    /// Log every image's tags.
    #[arg(long)]
    pub debug: bool,
    /// Inference device: cpu, or cuda (needs a build with the `cuda` feature; never falls
    /// back to the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// ONNX Runtime shared library to load (else ORT_DYLIB_PATH, then the project's
    /// .local/onnxruntime/, then next to the executable).
    #[arg(long = "ort-lib", alias = "ort_lib")]
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Tag-probability store (default: <train_data_dir>/.lorakit/tag-probs.bin, moved there from
    /// the older <train_data_dir>/.lorakit-tag-probs.bin; with --shard i/n:
    /// tag-probs.shard-i-of-n.bin, joined by merge-shards).
    #[arg(long)]
    pub probs_store: Option<PathBuf>,
    /// Only re-render tag files from the store (new thresholds, undesired tags, ...): never
    /// loads the model; images missing from the store are reported and skipped.
    #[arg(long)]
    pub from_store: bool,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
}

impl TagImagesArgs {
    /// The stage options these flags describe (`quiet` comes from the logging flags).
    pub fn options(self, quiet: bool) -> Result<TagOptions> {
        if self.force_download {
            tracing::warn!("--force_download ignored: lorakit never downloads models");
        }
        for (flag, value) in [
            ("--thresh", Some(self.thresh)),
            ("--general_threshold", self.general_threshold),
            ("--character_threshold", self.character_threshold),
            ("--copyright_threshold", self.copyright_threshold),
            ("--artist_threshold", self.artist_threshold),
            ("--meta_threshold", self.meta_threshold),
            ("--model_threshold", self.model_threshold),
        ] {
            if let Some(value) = value.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(Error::Usage(format!(
                    "{flag} {value}: give a probability from 0 to 1 (above 1 turns the category off)"
                )));
            }
        }
        let thresh = self.thresh;
        let thresholds = Thresholds {
            general: self.general_threshold.unwrap_or(thresh),
            character: self.character_threshold.unwrap_or(thresh),
            copyright: self.copyright_threshold.unwrap_or(thresh),
            artist: self.artist_threshold.unwrap_or(thresh),
            meta: self.meta_threshold.unwrap_or(thresh),
            model: self.model_threshold.unwrap_or(thresh),
        };
        let placement = |first: bool, last: bool| match (first, last) {
            (true, _) => Placement::First,
            (false, true) => Placement::Last,
            (false, false) => Placement::Off,
        };
        let (undesired, always_first) = Selection::split_lists(
            &self.caption_separator,
            &self.undesired_tags,
            self.always_first_tags.as_deref(),
        );
        let replacements = match &self.tag_replacement {
            Some(text) => parse_replacements(text)?,
            None => Vec::new(),
        };
        Ok(TagOptions {
            train_data_dir: self.train_data_dir,
            model_dir: self.model_dir,
            repo_id: self.repo_id,
            batch_size: self.batch_size,
            recursive: self.recursive,
            caption_extension: self.caption_extention.unwrap_or(self.caption_extension),
            output_path: self.output_path,
            append_tags: self.append_tags,
            overwrite: self.overwrite,
            frequency_tags: self.frequency_tags,
            debug: self.debug,
            label_options: LabelOptions {
                character_tag_expand: self.character_tag_expand,
                remove_underscore: self.remove_underscore,
                replacements,
                caption_separator: self.caption_separator,
            },
            selection: Selection {
                thresholds,
                undesired,
                always_first,
                rating: placement(self.use_rating_tags, self.use_rating_tags_as_last_tag),
                quality: placement(self.use_quality_tags, self.use_quality_tags_as_last_tag),
                character_tags_first: self.character_tags_first,
            },
            store_path: self.probs_store,
            from_store: self.from_store,
            device: self.device,
            ort_lib: self.ort_lib,
            threads: self.threads,
            decode: self.image.options()?,
            shard: self.shard.resolve()?,
            quiet,
        })
    }

    /// Runs the stage with these flags.
    pub fn run(self, quiet: bool) -> Result<Summary> {
        crate::stages::tag_images::run(&self.options(quiet)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::parse_flags;
    use crate::stages::tag_images::labels::Placement;

    fn options(flags: &[&str]) -> TagOptions {
        parse_flags::<TagImagesArgs>(&["tag-images", "data"], flags)
            .options(false)
            .unwrap()
    }

    #[test]
    fn thresholds_that_are_not_probabilities_are_refused() {
        let cases: [&[&str]; 3] = [
            &["--thresh", "nan"],
            &["--character_threshold=-0.1"],
            &["--general_threshold", "inf"],
        ];
        for flags in cases {
            let args = parse_flags::<TagImagesArgs>(&["tag-images", "data"], flags);
            let error = args.options(false).unwrap_err().to_string();
            let flag = flags[0].split('=').next().unwrap();
            assert!(error.contains(flag), "{flags:?}: {error}");
        }
    }

    #[test]
    fn thresholds_fall_back_to_thresh_and_rating_first_wins() {
        let options = options(&[
            "--thresh",
            "0.5",
            "--character_threshold",
            "0.9",
            "--use_rating_tags",
            "--use_rating_tags_as_last_tag",
            "--use_quality_tags_as_last_tag",
            "--caption_extention",
            ".tags",
        ]);
        let thresholds = &options.selection.thresholds;
        assert_eq!((thresholds.general, thresholds.character), (0.5, 0.9));
        assert_eq!((thresholds.meta, thresholds.artist), (0.5, 0.5));
        assert_eq!(options.selection.rating, Placement::First);
        assert_eq!(options.selection.quality, Placement::Last);
        assert_eq!(options.caption_extension, ".tags");
        assert!(!options.overwrite && !options.append_tags);
    }
}
