//! The flags of `lint-dataset` (sd-scripts spellings) and the stage options they describe.

use crate::cli::{BucketArgs, ImageArgs};
use crate::infra::report::Summary;
use crate::models::precision::MixedPrecision;
use crate::stages::lint_dataset::{CacheSettings, LintOptions};
use crate::text::caption_text::DEFAULT_SEPARATOR;
use crate::text::tokenize::MaxTokenLength;
use crate::Result;

/// The flags of `lint-dataset`; the tool adds its description and the logging flags.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct LintDatasetArgs {
    /// Folder of training images.
    pub train_data_dir: std::path::PathBuf,
    /// Also check subfolders.
    #[arg(long)]
    pub recursive: bool,
    /// Metadata JSON to compare with the folder (entries without image, images without entry).
    #[arg(long)]
    pub in_json: Option<std::path::PathBuf>,
    /// Extension of caption files.
    #[arg(long, default_value = ".caption")]
    pub caption_extension: String,
    /// Extension of tag files.
    #[arg(long, default_value = ".txt")]
    pub tag_extension: String,
    /// Decode every image (slower): catches damaged pixel data and finds near-duplicates.
    #[arg(long)]
    pub decode: bool,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Training resolution `W,H` or `SIZE`: enables the bucket checks and occupancy histogram.
    #[arg(long)]
    pub resolution: Option<String>,
    #[command(flatten)]
    pub buckets: BucketArgs,
    /// Training batch size: buckets holding fewer images are reported.
    #[arg(long, default_value_t = 1)]
    pub train_batch_size: usize,
    /// Folder with the CLIP vocab.json and merges.txt: enables the token-overflow check.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Token budget captions are checked against: 75, 150 or 225.
    #[arg(long, default_value_t = 75)]
    pub max_token_length: usize,
    /// Largest perceptual-hash distance (of 64 bits) reported as a near-duplicate (with --decode).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=32))]
    pub near_duplicate_distance: u32,
    /// Report caption/tag files longer than this many bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_caption_bytes: u64,
    /// Number of tags shown in the frequency table of the text report.
    #[arg(long, default_value_t = 30)]
    pub top_tags: usize,
    /// Model (checkpoint or diffusers folder) the caches were made with: enables the stale-cache
    /// check, which recomputes every cache file's content key (latents need --resolution,
    /// text-encoder outputs --in_json) with the flags below, spelled as in the cache stages.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Separate VAE given to prepare-latents.
    #[arg(long)]
    pub vae: Option<std::path::PathBuf>,
    /// --cache_dir of prepare-latents / cache-text-encoder (default: caches beside the images).
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Metadata keys are full image paths (--full_path of the stages).
    #[arg(long)]
    pub full_path: bool,
    /// --mixed_precision of prepare-latents and cache-text-encoder: no, fp16 or bf16.
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// --flip_aug of prepare-latents.
    #[arg(long)]
    pub flip_aug: bool,
    /// --alpha_mask of prepare-latents.
    #[arg(long)]
    pub alpha_mask: bool,
    /// --seed of prepare-latents.
    #[arg(long, default_value_t = 0)]
    pub latent_seed: u64,
    /// --clip_skip of cache-text-encoder.
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// --weighted_captions of cache-text-encoder.
    #[arg(long)]
    pub weighted_captions: bool,
    /// --caption_separator of cache-text-encoder.
    #[arg(long, default_value = DEFAULT_SEPARATOR)]
    pub caption_separator: String,
    /// --seed of cache-text-encoder.
    #[arg(long, default_value_t = 42)]
    pub text_seed: u64,
    /// Print the report as JSON (schema lorakit.lint_report/v1) instead of text.
    #[arg(long)]
    pub json: bool,
}

impl LintDatasetArgs {
    /// The stage options these flags describe (`quiet` comes from the logging flags).
    pub fn options(self, quiet: bool) -> Result<LintOptions> {
        let buckets = match &self.resolution {
            Some(text) => Some(self.buckets.settings(text)?),
            None => None,
        };
        let options = LintOptions {
            train_data_dir: self.train_data_dir,
            recursive: self.recursive,
            in_json: self.in_json,
            caption_extension: self.caption_extension,
            tag_extension: self.tag_extension,
            decode: self.decode,
            image: self.image.options()?,
            near_duplicate_distance: self.near_duplicate_distance,
            max_caption_bytes: self.max_caption_bytes,
            top_tags: self.top_tags,
            buckets,
            batch_size: self.train_batch_size,
            tokenizer: self.tokenizer,
            max_token_length: MaxTokenLength::new(self.max_token_length)?,
            caches: match self.model {
                Some(model) => Some(CacheSettings {
                    model,
                    vae: self.vae,
                    cache_dir: self.cache_dir,
                    full_path: self.full_path,
                    latent_precision: MixedPrecision::parse(&self.mixed_precision)?,
                    text_precision: MixedPrecision::parse(&self.mixed_precision)?,
                    flip_aug: self.flip_aug,
                    alpha_mask: self.alpha_mask,
                    latent_seed: self.latent_seed,
                    clip_skip: self.clip_skip,
                    weighted_captions: self.weighted_captions,
                    caption_separator: self.caption_separator,
                    text_seed: self.text_seed,
                }),
                None => None,
            },
            json: self.json,
            quiet,
        };
        Ok(options)
    }

    /// Runs the stage with these flags.
    pub fn run(self, quiet: bool) -> Result<Summary> {
        crate::stages::lint_dataset::run(&self.options(quiet)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::parse_flags;

    fn options(flags: &[&str]) -> LintOptions {
        parse_flags::<LintDatasetArgs>(&["lint-dataset", "data"], flags)
            .options(false)
            .unwrap()
    }

    #[test]
    fn bucket_checks_need_resolution_and_cache_checks_need_model() {
        let plain = options(&["--min_bucket_reso", "320"]);
        assert!(plain.buckets.is_none() && plain.caches.is_none());

        let checked = options(&[
            "--resolution",
            "512,768",
            "--min_bucket_reso",
            "320",
            "--model",
            "model.safetensors",
            "--mixed_precision",
            "bf16",
            "--latent_seed",
            "7",
        ]);
        let buckets = checked.buckets.unwrap();
        assert_eq!(buckets.max_resolution, (512, 768));
        assert_eq!(buckets.min_bucket_reso, 320);
        let caches = checked.caches.unwrap();
        assert_eq!(caches.latent_precision, MixedPrecision::Bf16);
        assert_eq!(caches.text_precision, MixedPrecision::Bf16);
        assert_eq!((caches.latent_seed, caches.text_seed), (7, 42));
    }
}
