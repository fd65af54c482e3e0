//! The flags of `cache-text-encoder` (sd-scripts spellings) and the stage options they describe.

use crate::cli::ShardArgs;
use crate::infra::report::Summary;
use crate::models::precision::MixedPrecision;
use crate::models::ComputeDevice;
use crate::stages::cache_text_encoder::TeCacheOptions;
use crate::text::caption_text::{CaptionAugmentation, DEFAULT_SEPARATOR};
use crate::text::tokenize::MaxTokenLength;
use crate::Result;
use std::path::PathBuf;

/// The flags of `cache-text-encoder`; the tool adds its description and the logging flags.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct CacheTextEncoderArgs {
    /// Metadata JSON (merge-captions / clean-captions / prepare-latents output).
    pub in_json: PathBuf,
    /// Model: single-file checkpoint (.safetensors) or diffusers folder.
    pub model: PathBuf,
    /// Folder with the CLIP vocab.json and merges.txt (default: the model's tokenizer/).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Folder that stem or relative metadata keys are resolved in.
    #[arg(long)]
    pub train_data_dir: Option<PathBuf>,
    /// Metadata keys are image paths (written with --full_path); stems are not looked up.
    #[arg(long)]
    pub full_path: bool,
    /// Write cache files here (named by image stem) instead of beside the images.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Use the output of the k-th layer from the end, with the final layer norm (SD1/SD2).
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// Token budget per caption: 75, 150 or 225.
    #[arg(long, default_value_t = 75)]
    pub max_token_length: usize,
    /// Captions per encoder call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// no, fp16 or bf16: the encoder runs on the CPU in float32; fp16 stores the outputs as
    /// float16 (as sd-scripts), bf16 as float32.
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// Where the text encoders run: cpu, or cuda (a build with the `cuda` feature; the GPU
    /// computes in the --mixed_precision dtype).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: ComputeDevice,
    /// Refuse models that are not SDXL (the family is detected from the weights anyway).
    #[arg(long)]
    pub sdxl: bool,
    /// Parse A1111 attention syntax `(word:1.2)`, `[word]` in captions.
    #[arg(long)]
    pub weighted_captions: bool,
    /// Separator between caption and tags, and between tags for augmentation.
    #[arg(long, default_value = DEFAULT_SEPARATOR)]
    pub caption_separator: String,
    /// Also store N augmented versions of every caption (needs --shuffle_caption or --caption_tag_dropout_rate).
    #[arg(long, default_value_t = 0)]
    pub variants: usize,
    /// Variants: shuffle the comma-separated pieces after the first --keep_tokens.
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Variants: leading pieces that never move or drop.
    #[arg(long, default_value_t = 0)]
    pub keep_tokens: usize,
    /// Variants: probability of dropping each movable piece.
    #[arg(long, default_value_t = 0.0)]
    pub caption_tag_dropout_rate: f64,
    /// Variants: random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Delete cache files that belong to no metadata entry.
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub shard: ShardArgs,
}

impl CacheTextEncoderArgs {
    /// The stage options these flags describe (`quiet` comes from the logging flags).
    pub fn options(self, quiet: bool) -> Result<TeCacheOptions> {
        let options = TeCacheOptions {
            in_json: self.in_json,
            model: self.model,
            tokenizer: self.tokenizer,
            train_data_dir: self.train_data_dir,
            full_path: self.full_path,
            cache_dir: self.cache_dir,
            clip_skip: self.clip_skip,
            max_token_length: MaxTokenLength::new(self.max_token_length)?,
            batch_size: self.batch_size,
            mixed_precision: MixedPrecision::parse(&self.mixed_precision)?,
            device: self.device,
            require_sdxl: self.sdxl,
            weighted_captions: self.weighted_captions,
            augmentation: CaptionAugmentation {
                shuffle: self.shuffle_caption,
                keep_tokens: self.keep_tokens,
                tag_dropout_rate: self.caption_tag_dropout_rate,
                separator: self.caption_separator.clone(),
            },
            caption_separator: self.caption_separator,
            variants: self.variants,
            seed: self.seed,
            prune: self.prune,
            shard: self.shard.resolve()?,
            quiet,
        };
        Ok(options)
    }

    /// Runs the stage with these flags.
    pub fn run(self, quiet: bool) -> Result<Summary> {
        crate::stages::cache_text_encoder::cache_text_encoder_outputs(&self.options(quiet)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::parse_flags;

    fn parse(flags: &[&str]) -> CacheTextEncoderArgs {
        parse_flags(&["cache-text-encoder", "in.json", "model"], flags)
    }

    #[test]
    fn caption_separator_reaches_the_augmentation_and_precision_is_parsed() {
        let options = parse(&[
            "--caption_separator",
            "|",
            "--mixed_precision",
            "fp16",
            "--max_token_length",
            "150",
        ])
        .options(false)
        .unwrap();
        assert_eq!(options.augmentation.separator, "|");
        assert_eq!(options.caption_separator, "|");
        assert_eq!(options.mixed_precision, MixedPrecision::Fp16);
        assert_eq!(options.max_token_length.tokens(), 150);
    }

    #[test]
    fn token_budgets_other_than_75_150_225_are_refused() {
        assert!(parse(&["--max_token_length", "100"])
            .options(false)
            .is_err());
        assert!(parse(&["--mixed_precision", "fp8"]).options(false).is_err());
    }
}
