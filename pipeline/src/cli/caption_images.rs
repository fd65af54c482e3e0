//! The flags of `caption-images` (sd-scripts spellings) and the stage options they describe.

use crate::cli::{ImageArgs, ShardArgs};
use crate::infra::report::Summary;
use crate::stages::caption_images::{CaptionOptions, Decoding, GenerationSettings};
use crate::Result;
use std::path::PathBuf;

/// The flags of `caption-images`; the tool adds its description and the logging flags.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct CaptionImagesArgs {
    /// Folder of training images.
    pub train_data_dir: PathBuf,
    /// Hugging Face BLIP captioning folder (config.json, model.safetensors, tokenizer.json),
    /// e.g. a local copy of Salesforce/blip-image-captioning-large. Nothing is downloaded.
    #[arg(long)]
    pub caption_weights: PathBuf,
    /// Extension of the caption files.
    #[arg(long, default_value = ".caption")]
    pub caption_extension: String,
    /// Old misspelling of --caption_extension, still accepted (overrides it when given).
    #[arg(long, hide = true)]
    pub caption_extention: Option<String>,
    /// Beam search (greedy with the default --num_beams 1) instead of nucleus sampling.
    #[arg(long)]
    pub beam_search: bool,
    /// Number of beams with --beam_search.
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Cumulative probability kept by nucleus sampling.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Longest caption in tokens, counting the 4 prompt tokens ("[DEC] a picture of").
    #[arg(long, default_value_t = 75)]
    pub max_length: usize,
    /// Shortest caption in tokens, counting the 4 prompt tokens.
    #[arg(long, default_value_t = 5)]
    pub min_length: usize,
    /// Seed of nucleus sampling (combined with each image's content).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Images per vision-encoder batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Accepted for compatibility; images are decoded in parallel anyway.
    #[arg(long)]
    pub max_data_loader_n_workers: Option<usize>,
    /// Also caption images in subfolders.
    #[arg(long)]
    pub recursive: bool,
    /// Print every caption.
    #[arg(long)]
    pub debug: bool,
    /// Caption every image again, even when its caption file is up to date (caption files
    /// you wrote or edited are still kept; see --overwrite).
    #[arg(long)]
    pub force: bool,
    /// Replace caption files you wrote or edited since caption-images wrote them. Each is first
    /// copied to <name>.bak (or <name>.bak.N). Without it they are kept and reported as kept.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
}

impl CaptionImagesArgs {
    /// The stage options these flags describe (`quiet` comes from the logging flags).
    pub fn options(self, quiet: bool) -> Result<CaptionOptions> {
        if !self.beam_search && self.num_beams != 1 {
            tracing::warn!("--num_beams is ignored without --beam_search (as in sd-scripts)");
        }
        let decoding = if self.beam_search {
            Decoding::Beam {
                num_beams: self.num_beams,
            }
        } else {
            Decoding::Nucleus { top_p: self.top_p }
        };
        let options = CaptionOptions {
            train_data_dir: self.train_data_dir,
            caption_weights: self.caption_weights,
            generation: GenerationSettings {
                decoding,
                max_length: self.max_length,
                min_length: self.min_length,
            },
            seed: self.seed,
            batch_size: self.batch_size,
            caption_extension: self.caption_extention.unwrap_or(self.caption_extension),
            recursive: self.recursive,
            debug: self.debug,
            force: self.force,
            overwrite: self.overwrite,
            decode: self.image.options()?,
            shard: self.shard.resolve()?,
            quiet,
        };
        Ok(options)
    }

    /// Runs the stage with these flags.
    pub fn run(self, quiet: bool) -> Result<Summary> {
        crate::stages::caption_images::run(&self.options(quiet)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::parse_flags;

    fn options(flags: &[&str]) -> CaptionOptions {
        parse_flags::<CaptionImagesArgs>(
            &["caption-images", "data", "--caption_weights", "blip"],
            flags,
        )
        .options(false)
        .unwrap()
    }

    #[test]
    fn beam_search_chooses_the_decoding_and_the_misspelled_extension_wins() {
        let nucleus = options(&["--num_beams", "3", "--top_p", "0.5"]);
        assert_eq!(
            nucleus.generation.decoding,
            Decoding::Nucleus { top_p: 0.5 }
        );
        assert_eq!(nucleus.caption_extension, ".caption");
        let beam = options(&[
            "--beam_search",
            "--num_beams",
            "3",
            "--caption_extension",
            ".txt",
            "--caption_extention",
            ".cap",
        ]);
        assert_eq!(beam.generation.decoding, Decoding::Beam { num_beams: 3 });
        assert_eq!(beam.caption_extension, ".cap");
    }
}
