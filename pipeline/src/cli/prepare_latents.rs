//! The flags of `prepare-latents` (sd-scripts spellings) and the stage options they describe.

use crate::cli::{BucketArgs, ImageArgs, ShardArgs};
use crate::infra::report::Summary;
use crate::models::precision::MixedPrecision;
use crate::models::ComputeDevice;
use crate::stages::prepare_latents::LatentOptions;
use crate::Result;
use std::path::PathBuf;

/// The flags of `prepare-latents`; the tool adds its description and the logging flags.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct PrepareLatentsArgs {
    /// Folder with the training images.
    pub train_data_dir: PathBuf,
    /// Metadata JSON to read (merge-captions / merge-tags / clean-captions output).
    pub in_json: PathBuf,
    /// Metadata JSON to write (adds train_resolution to every entry).
    pub out_json: PathBuf,
    /// Model: single-file checkpoint (.safetensors) or diffusers folder.
    pub model_name_or_path: PathBuf,
    /// Use this VAE (.safetensors file or diffusers folder) instead of the model's.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Accepted for compatibility; the model family is detected from the weights.
    #[arg(long)]
    pub v2: bool,
    /// Images per VAE call (images of one bucket are batched together).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Accepted for compatibility; decoding uses every core.
    #[arg(long)]
    pub max_data_loader_n_workers: Option<usize>,
    /// Maximum resolution "W,H" (or "S"): its area bounds every bucket.
    #[arg(long, default_value = "512,512")]
    pub max_resolution: String,
    #[command(flatten)]
    pub buckets: BucketArgs,
    /// no, fp16 or bf16: accepted for sd-scripts command lines; on the CPU the VAE computes in
    /// float32 whatever the value, on a GPU in this dtype.
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// Where the VAE runs: cpu, or cuda (a build with the `cuda` feature).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: ComputeDevice,
    /// The VAE computes in float32 whatever --mixed_precision says (on the CPU it always does).
    #[arg(long)]
    pub no_half_vae: bool,
    /// Metadata keys are full image paths.
    #[arg(long)]
    pub full_path: bool,
    /// Also cache latents of the horizontally flipped image (latents_flipped).
    #[arg(long)]
    pub flip_aug: bool,
    /// Also cache the alpha channel as a loss mask (alpha_mask); a bare flag or any non-empty value turns it on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub alpha_mask: Option<String>,
    /// Accept existing cache files that pass sd-scripts' validity check even without our content key.
    #[arg(long)]
    pub skip_existing: bool,
    /// Search sub-folders too (requires --full_path).
    #[arg(long)]
    pub recursive: bool,
    /// Seed of the latent samples (each image's sample also depends on its content).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write cache files here (keeping sub-folders) instead of beside the images.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Re-encode every image, even up-to-date ones.
    #[arg(long)]
    pub force: bool,
    /// After the run, delete the latent caches (ours only: sd-scripts-named and under
    /// .lorakit/latents/, holding a lorakit key) in the images' cache folders that no entry of
    /// OUT_JSON uses, e.g. those of replaced images or of other settings; prints each one.
    /// Skipped when an item failed; not with --shard.
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
}

impl PrepareLatentsArgs {
    /// The stage options these flags describe (`quiet` comes from the logging flags).
    pub fn options(self, quiet: bool) -> Result<LatentOptions> {
        let precision = if self.no_half_vae {
            MixedPrecision::No
        } else {
            MixedPrecision::parse(&self.mixed_precision)?
        };
        let options = LatentOptions {
            train_data_dir: self.train_data_dir,
            in_json: self.in_json,
            out_json: self.out_json,
            model: self.model_name_or_path,
            vae: self.vae,
            buckets: self.buckets.settings(&self.max_resolution)?,
            batch_size: self.batch_size,
            precision,
            device: self.device,
            full_path: self.full_path,
            flip_aug: self.flip_aug,
            alpha_mask: self
                .alpha_mask
                .is_some_and(|v| !v.is_empty() && v != "false"),
            skip_existing: self.skip_existing,
            recursive: self.recursive,
            decode: self.image.options()?,
            seed: self.seed,
            cache_dir: self.cache_dir,
            force: self.force,
            prune: self.prune,
            shard: self.shard.resolve()?,
            quiet,
        };
        Ok(options)
    }

    /// Runs the stage with these flags.
    pub fn run(self, quiet: bool) -> Result<Summary> {
        crate::stages::prepare_latents::prepare_latents(&self.options(quiet)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::parse_flags;
    use crate::models::precision::MixedPrecision;

    fn options(flags: &[&str]) -> LatentOptions {
        parse_flags::<PrepareLatentsArgs>(
            &["prepare-latents", "data", "in.json", "out.json", "model"],
            flags,
        )
        .options(true)
        .unwrap()
    }

    #[test]
    fn no_half_vae_overrides_mixed_precision_and_alpha_mask_reads_kohya_values() {
        let half = options(&["--mixed_precision", "bf16"]);
        assert_eq!(half.precision, MixedPrecision::Bf16);
        let full = options(&["--mixed_precision", "bf16", "--no_half_vae"]);
        assert_eq!(full.precision, MixedPrecision::No);
        assert!(options(&["--alpha_mask", "true"]).alpha_mask);
        assert!(!options(&["--alpha_mask", "false"]).alpha_mask);
        assert!(full.quiet && !full.alpha_mask);
    }
}
