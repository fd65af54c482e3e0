//! The `train_network.py` / `sdxl_train_network.py` options that train-lora has no flag of its
//! own for: each is accepted because it only changes how PyTorch runs (listed in `--help`), or
//! refused with a message that names the alternative. None dies in the parser
//! (docs/kohya-compat.md#command-lines).

use clap::{Arg, ArgAction};

/// How train-lora treats a kohya option it has no flag of its own for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Accepted; it only changes PyTorch speed, memory, distribution or Python logging.
    NoEffect(&'static str),
    /// Refused before any work, with this message.
    Refuse(&'static str),
}

/// What an option takes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// A flag.
    Flag,
    /// One value.
    One,
    /// Any number of values (argparse `nargs="*"` / `"+"`).
    Many,
}

/// One kohya option train-lora has no flag of its own for.
#[derive(Debug, Clone, Copy)]
pub struct KohyaOption {
    /// Option name without `--` (sd-scripts' spelling).
    pub name: &'static str,
    /// What it takes.
    pub values: Values,
    /// How it is treated.
    pub handling: Handling,
}

const PYTORCH: &str = "changes only how PyTorch runs (speed, memory, distribution)";
const PYTHON_LOG: &str = "Python's console log; train-lora logs to stderr (-q / -v)";
const NO_TOKENIZER: &str = "train-lora reads cached text-encoder outputs and loads no tokenizer";
const PREPARED: &str =
    "the caches decide it; set it when preparing them (prepare-latents / cache-text-encoder)";
pub(crate) const CAPTION_AUGMENTATION: &str =
    "changes the caption every step, which needs the text \
    encoder; train-lora trains from cached text-encoder outputs, where sd-scripts refuses it too \
    (--cache_text_encoder_outputs). Leave it out (--shuffle_caption, --keep_tokens and \
    --caption_tag_dropout_rate work from cached caption variants, caption dropout from the \
    cached empty caption)";
pub(crate) const IMAGE_AUGMENTATION: &str =
    "changes the image every step, which needs the VAE; train-lora \
    trains from cached latents, where sd-scripts refuses it too (--cache_latents). Leave it out \
    (--flip_aug is supported)";
const NO_NETWORK: &str = "train-lora does not upload or download: it has no network access. \
    Upload the saved files yourself (e.g. `huggingface-cli upload`)";
const fn option(name: &'static str, values: Values, handling: Handling) -> KohyaOption {
    KohyaOption {
        name,
        values,
        handling,
    }
}

use Handling::{NoEffect, Refuse};
use Values::{Flag, Many, One};

/// Every option of sd-scripts' `train_network.py` and `sdxl_train_network.py` (at 48d368fa)
/// that [`crate::stages::train_lora::TrainArgs`] has no field for.
pub const KOHYA_OPTIONS: &[KohyaOption] = &[
    option("console_log_level", One, NoEffect(PYTHON_LOG)),
    option("console_log_file", One, NoEffect(PYTHON_LOG)),
    option("console_log_simple", Flag, NoEffect(PYTHON_LOG)),
    option("tokenizer_cache_dir", One, NoEffect(NO_TOKENIZER)),
    option(
        "cache_info",
        Flag,
        NoEffect("image sizes come from the latent caches"),
    ),
    option("vae_batch_size", One, NoEffect(PREPARED)),
    option(
        "skip_cache_check",
        Flag,
        NoEffect("every cache is checked by its content key"),
    ),
    option("resize_interpolation", One, NoEffect(PREPARED)),
    option("caption_separator", One, NoEffect(PREPARED)),
    option("caption_extention", One, NoEffect(PREPARED)),
    option("disable_mmap_load_safetensors", Flag, NoEffect(PYTORCH)),
    option("highvram", Flag, NoEffect(PYTORCH)),
    option("torch_compile", Flag, NoEffect(PYTORCH)),
    option("dynamo_backend", One, NoEffect(PYTORCH)),
    option("ddp_gradient_as_bucket_view", Flag, NoEffect(PYTORCH)),
    option("ddp_static_graph", Flag, NoEffect(PYTORCH)),
    option("deepspeed", Flag, NoEffect(PYTORCH)),
    option("zero_stage", One, NoEffect(PYTORCH)),
    option("offload_optimizer_device", One, NoEffect(PYTORCH)),
    option("offload_optimizer_nvme_path", One, NoEffect(PYTORCH)),
    option("offload_param_device", One, NoEffect(PYTORCH)),
    option("offload_param_nvme_path", One, NoEffect(PYTORCH)),
    option("zero3_init_flag", Flag, NoEffect(PYTORCH)),
    option("zero3_save_16bit_model", Flag, NoEffect(PYTORCH)),
    option("fp16_master_weights_and_gradients", Flag, NoEffect(PYTORCH)),
    option("fused_backward_pass", Flag, NoEffect(PYTORCH)),
    option("cpu_offload_checkpointing", Flag, NoEffect(PYTORCH)),
    option(
        "log_tracker_config",
        One,
        NoEffect("a Weights & Biases tracker setting (--log_with wandb is refused)"),
    ),
    option(
        "wandb_run_name",
        One,
        NoEffect("a Weights & Biases setting (--log_with wandb is refused)"),
    ),
    option(
        "wandb_api_key",
        One,
        NoEffect("a Weights & Biases setting (--log_with wandb is refused)"),
    ),
    option(
        "log_config",
        Flag,
        NoEffect("the run's settings are in the LoRA's ss_* metadata and the state folders"),
    ),
    option("keep_tokens_separator", One, Refuse(CAPTION_AUGMENTATION)),
    option("secondary_separator", One, Refuse(CAPTION_AUGMENTATION)),
    option("enable_wildcard", Flag, Refuse(CAPTION_AUGMENTATION)),
    option("token_warmup_min", One, Refuse(CAPTION_AUGMENTATION)),
    option("token_warmup_step", One, Refuse(CAPTION_AUGMENTATION)),
    option("color_aug", Flag, Refuse(IMAGE_AUGMENTATION)),
    option("random_crop", Flag, Refuse(IMAGE_AUGMENTATION)),
    option("face_crop_aug_range", One, Refuse(IMAGE_AUGMENTATION)),
    option(
        "debug_dataset",
        Flag,
        Refuse("look at a dataset with lint-dataset instead"),
    ),
    option(
        "dataset_class",
        One,
        Refuse(
            "custom Python dataset classes cannot run here; describe the dataset in metadata JSON",
        ),
    ),
    option(
        "conditioning_data_dir",
        One,
        Refuse("ControlNet conditioning images are for ControlNet training, not LoRA"),
    ),
    option("huggingface_repo_id", One, Refuse(NO_NETWORK)),
    option("huggingface_repo_type", One, Refuse(NO_NETWORK)),
    option("huggingface_path_in_repo", One, Refuse(NO_NETWORK)),
    option("huggingface_token", One, Refuse(NO_NETWORK)),
    option("huggingface_repo_visibility", One, Refuse(NO_NETWORK)),
    option("save_state_to_huggingface", Flag, Refuse(NO_NETWORK)),
    option("resume_from_huggingface", Flag, Refuse(NO_NETWORK)),
    option("async_upload", Flag, Refuse(NO_NETWORK)),
    option(
        "skip_until_initial_step",
        Flag,
        Refuse("to continue a run use --save_state and --resume, which restore its exact position"),
    ),
    option(
        "initial_epoch",
        One,
        Refuse("to continue a run use --save_state and --resume, which restore its exact position"),
    ),
    option(
        "initial_step",
        One,
        Refuse("to continue a run use --save_state and --resume, which restore its exact position"),
    ),
];

/// The clap argument of a kohya option, with its handling as help text.
pub fn clap_arg(option: &KohyaOption) -> Arg {
    let help = match option.handling {
        NoEffect(why) => format!("Accepted, no effect: {why}."),
        Refuse(why) => format!("Refused: {why}."),
    };
    let arg = Arg::new(option.name)
        .long(option.name)
        .help(help)
        .help_heading("sd-scripts options without an effect here, or refused");
    match option.values {
        Flag => arg.action(ArgAction::SetTrue),
        One => arg.action(ArgAction::Set).num_args(1),
        Many => arg.action(ArgAction::Append).num_args(0..),
    }
}

/// The kohya options a parsed command line gave, by handling.
pub fn given(matches: &clap::ArgMatches) -> Vec<&'static KohyaOption> {
    KOHYA_OPTIONS
        .iter()
        .filter(|option| {
            matches.value_source(option.name) == Some(clap::parser::ValueSource::CommandLine)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_option_is_listed_twice() {
        let mut names: Vec<&str> = KOHYA_OPTIONS.iter().map(|o| o.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "an option is listed twice");
    }
}
