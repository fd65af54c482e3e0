//! Command-line options of `train-lora`, spelled like sd-scripts' `train_network.py`.

use std::path::PathBuf;

/// Train a LoRA (kohya `networks.lora` format) for SD1.x/SD2.x/SDXL from cached latents.
///
/// Two modes, decided as sd-scripts decides them. By default the text encoder is trained too
/// (`lora_te_*` / `lora_te1_*` + `lora_te2_*` modules beside the UNet's): train-lora loads the
/// text encoder(s) and tokenizes every caption each step, so --shuffle_caption, --keep_tokens,
/// --caption_tag_dropout_rate and caption dropout are exact. With --network_train_unet_only
/// (or --cache_text_encoder_outputs) only the UNet is trained, from the text-encoder outputs
/// cache-text-encoder cached; the text encoder never runs. The VAE is never loaded in either
/// mode (latents come from prepare-latents).
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    /// Base model: single-file SD1.x/SD2.x/SDXL checkpoint (.safetensors).
    #[arg(long)]
    pub pretrained_model_name_or_path: PathBuf,
    /// SD2.x base model (checked against the weights).
    #[arg(long)]
    pub v2: bool,
    /// v-prediction model (SD2 768-v): the target is v instead of the noise.
    #[arg(long)]
    pub v_parameterization: bool,
    /// Metadata JSON with the training images (keys absolute or relative to --train_data_dir),
    /// as prepare-latents wrote it. Without it, the dataset of --train_data_dir /
    /// --reg_data_dir / --dataset_config is prepared first (see --no_prepare).
    #[arg(long)]
    pub in_json: PathBuf,
    /// Folder of the images for relative metadata keys; without --in_json, a kohya DreamBooth
    /// folder of `<repeats>_<class tokens>` subfolders, prepared before training.
    #[arg(long)]
    pub train_data_dir: Option<PathBuf>,
    /// Folder of `<repeats>_<class tokens>` subfolders of regularisation images (without
    /// --in_json; prepared with --train_data_dir).
    #[arg(long)]
    pub reg_data_dir: Option<PathBuf>,
    /// sd-scripts dataset config (.toml) with [general], [[datasets]], [[datasets.subsets]],
    /// prepared before training (its values win over the command line's).
    #[arg(long)]
    pub dataset_config: Option<PathBuf>,
    /// Text put before every caption, with a space (sd-scripts' `--caption_prefix`): encoded
    /// with the captions when train-lora prepares the dataset (refused with --in_json: give it
    /// to prepare-dataset then).
    #[arg(long)]
    pub caption_prefix: Option<String>,
    /// Text put after every caption, with a space (as --caption_prefix).
    #[arg(long)]
    pub caption_suffix: Option<String>,
    /// Do not run prepare-dataset, prepare-latents and cache-text-encoder for a
    /// --train_data_dir / --dataset_config dataset: train from what an earlier run prepared
    /// (refused, with the commands to run, when nothing was).
    #[arg(long)]
    pub no_prepare: bool,
    /// Caption variants cache-text-encoder encodes per image when train-lora prepares a dataset
    /// with --shuffle_caption / --keep_tokens / --caption_tag_dropout_rate.
    #[arg(long, default_value_t = 8)]
    pub caption_variants: usize,
    /// Shuffle the comma-separated tags of each caption every step: each step trains on one of
    /// the caption variants `cache-text-encoder --shuffle_caption --variants N` cached (made
    /// with the same --shuffle_caption / --keep_tokens / --caption_tag_dropout_rate).
    #[arg(long)]
    pub shuffle_caption: bool,
    /// A1111 attention syntax in captions (`(word:1.2)`, `[word]`, `\(`), weighting the text
    /// encoder's hidden states as sd-scripts does, when the text encoder is trained (captions
    /// encoded live). With cached text-encoder outputs the weighting is made when caching
    /// (cache-text-encoder --weighted_captions), so it is refused here then.
    #[arg(long)]
    pub weighted_captions: bool,
    /// Tags kept in front when shuffling (from the caption variants, as --shuffle_caption).
    #[arg(long)]
    pub keep_tokens: Option<usize>,
    /// Drop each tag with this probability every step (from the caption variants, as
    /// --shuffle_caption).
    #[arg(long)]
    pub caption_tag_dropout_rate: Option<f64>,
    /// Loss weight of regularisation images (entries prepare-dataset marked `is_reg`).
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Probability that a step trains an image on the empty caption (the encoded empty caption
    /// cache-text-encoder stores beside its index).
    #[arg(long)]
    pub caption_dropout_rate: Option<f64>,
    /// Every N-th epoch trains every image on the empty caption.
    #[arg(long)]
    pub caption_dropout_every_n_epochs: Option<usize>,
    /// Repeats of the dataset per epoch.
    #[arg(long, default_value_t = 1)]
    pub dataset_repeats: usize,
    /// networks.lora, networks.dylora for DyLoRA (docs/dylora.md), or lycoris.kohya for a LyCORIS
    /// network (docs/lycoris.md).
    #[arg(long, default_value = "networks.lora")]
    pub network_module: String,
    /// LoRA rank (default 4).
    #[arg(long)]
    pub network_dim: Option<usize>,
    /// LoRA alpha (default integer 1, stored as int64 like sd-scripts).
    #[arg(long)]
    pub network_alpha: Option<f32>,
    /// Network arguments key=value: conv_dim, conv_alpha, block_dims, block_alphas,
    /// conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight,
    /// block_lr_zero_threshold, rank_dropout, module_dropout, loraplus_lr_ratio,
    /// loraplus_unet_lr_ratio (loraplus_text_encoder_lr_ratio is accepted; no text encoder is
    /// trained). With lycoris.kohya: algo=locon|loha|lokr, conv_dim, conv_alpha, factor,
    /// decompose_both, rank_dropout, module_dropout. With networks.dylora: conv_dim (equal to
    /// --network_dim), unit, the loraplus ratios.
    #[arg(long, num_args = 1..)]
    pub network_args: Vec<String>,
    /// Dropout probability of the LoRA hidden units while training (sd-scripts'
    /// `--network_dropout`; default none).
    #[arg(long)]
    pub network_dropout: Option<f32>,
    /// Start from these LoRA weights (kohya .safetensors; UNet modules are used). Modules are
    /// built from --network_dim / --network_args and must have the file's shapes.
    #[arg(long)]
    pub network_weights: Option<PathBuf>,
    /// Build the network from the --network_weights file's modules, ranks and alphas instead.
    #[arg(long)]
    pub dim_from_weights: bool,
    /// LoRA files (kohya LoRA or DyLoRA, or LyCORIS LoCon/LoHa/LoKr) merged into the base UNet
    /// before training (their text-encoder modules only when the text encoder runs live: cached
    /// text-encoder outputs were made without them).
    #[arg(long, num_args = 1..)]
    pub base_weights: Vec<PathBuf>,
    /// Multiplier of each --base_weights file (default 1.0 each).
    #[arg(long, num_args = 1..)]
    pub base_weights_multiplier: Vec<f64>,
    /// Train the UNet only, from cached text-encoder outputs (cache-text-encoder); without it
    /// the text encoder is trained too, from the captions (as sd-scripts).
    #[arg(long)]
    pub network_train_unet_only: bool,
    /// Train the text-encoder LoRA only: no UNet modules are made (the saved file has
    /// `lora_te*` modules only), the frozen UNet still computes the loss (as sd-scripts).
    #[arg(long)]
    pub network_train_text_encoder_only: bool,
    /// Output folder (created if missing).
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Output file name without extension (default "last").
    #[arg(long)]
    pub output_name: Option<String>,
    /// Only safetensors is written.
    #[arg(long, default_value = "safetensors")]
    pub save_model_as: String,
    /// Cast saved tensors: float, fp16 or bf16 (default: as trained, integer alpha kept).
    #[arg(long)]
    pub save_precision: Option<String>,
    /// Save every N epochs (`<name>-<epoch:06>.safetensors`).
    #[arg(long)]
    pub save_every_n_epochs: Option<usize>,
    /// Save every N optimizer steps (`<name>-step<step:08>.safetensors`).
    #[arg(long)]
    pub save_every_n_steps: Option<usize>,
    /// Save about N times in the run: every floor(epochs / N) epochs (at least 1; overrides
    /// --save_every_n_epochs).
    #[arg(long)]
    pub save_n_epoch_ratio: Option<usize>,
    /// Keep only the last N epoch saves.
    #[arg(long)]
    pub save_last_n_epochs: Option<usize>,
    /// Keep only the epoch state folders of the last N epoch saves (default: as
    /// --save_last_n_epochs).
    #[arg(long)]
    pub save_last_n_epochs_state: Option<usize>,
    /// Keep only the step saves of the last N steps.
    #[arg(long)]
    pub save_last_n_steps: Option<usize>,
    /// Keep only the step state folders of the last N steps (default: as --save_last_n_steps).
    #[arg(long)]
    pub save_last_n_steps_state: Option<usize>,
    /// Prompt file of sample images made during training (.txt prompt lines with ` --n --w --h
    /// --d --l --s --ss` options, .toml `[[prompt.subset]]` tables or .json; as generate-images
    /// --from_file reads them): at each sample point the current LoRA is saved and
    /// generate-images renders it into `<output_dir>/sample/`, with a contact sheet.
    #[arg(long)]
    pub sample_prompts: Option<PathBuf>,
    /// Sample images every N optimizer steps (ignored when --sample_every_n_epochs is given,
    /// as in sd-scripts; 0 turns it off).
    #[arg(long)]
    pub sample_every_n_steps: Option<usize>,
    /// Sample images at the end of every N epochs (0 turns it off).
    #[arg(long)]
    pub sample_every_n_epochs: Option<usize>,
    /// Also sample images before the first step of a fresh run.
    #[arg(long)]
    pub sample_at_first: bool,
    /// Sampler of the sample images (a prompt's `--ss` wins): ddim, pndm, lms (k_lms), euler
    /// (k_euler), euler_a (k_euler_a), heun, dpm_2 (k_dpm_2), dpm_2_a (k_dpm_2_a), dpmsolver,
    /// dpmsolver++, dpmsingle.
    #[arg(long, default_value = "ddim")]
    pub sample_sampler: String,
    /// Save the final state folder (`<name>-state`) even without --save_state.
    #[arg(long)]
    pub save_state_on_train_end: bool,
    /// Also save a resumable training state folder with every saved model.
    #[arg(long)]
    pub save_state: bool,
    /// Resume from a state folder, or `latest` for the newest complete one in --output_dir. The
    /// state restores the run's options (model, data, network, ...), so they may be left out;
    /// only length, saving and logging options may change.
    #[arg(long)]
    pub resume: Option<String>,
    /// Write only the minimal metadata.
    #[arg(long)]
    pub no_metadata: bool,
    /// Title of the LoRA (`modelspec.title`; default the output name).
    #[arg(long)]
    pub metadata_title: Option<String>,
    /// `modelspec.author`.
    #[arg(long)]
    pub metadata_author: Option<String>,
    /// `modelspec.description`.
    #[arg(long)]
    pub metadata_description: Option<String>,
    /// `modelspec.license`.
    #[arg(long)]
    pub metadata_license: Option<String>,
    /// `modelspec.tags` (comma-separated).
    #[arg(long)]
    pub metadata_tags: Option<String>,
    /// `modelspec.usage_hint`.
    #[arg(long)]
    pub metadata_usage_hint: Option<String>,
    /// `modelspec.thumbnail` (a data URI).
    #[arg(long)]
    pub metadata_thumbnail: Option<String>,
    /// `modelspec.merged_from`.
    #[arg(long)]
    pub metadata_merged_from: Option<String>,
    /// `modelspec.trigger_phrase`.
    #[arg(long)]
    pub metadata_trigger_phrase: Option<String>,
    /// `modelspec.preprocessor`.
    #[arg(long)]
    pub metadata_preprocessor: Option<String>,
    /// `modelspec.is_negative_embedding`.
    #[arg(long)]
    pub metadata_is_negative_embedding: Option<String>,
    /// Free text stored as ss_training_comment.
    #[arg(long)]
    pub training_comment: Option<String>,
    /// Number of optimizer steps.
    #[arg(long, default_value_t = 1600)]
    pub max_train_steps: usize,
    /// Number of epochs (overrides --max_train_steps).
    #[arg(long)]
    pub max_train_epochs: Option<usize>,
    /// Batch size (one bucket per batch).
    #[arg(long, default_value_t = 1)]
    pub train_batch_size: usize,
    /// Micro-batches summed per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Random seed (random when unset; the value used is stored as ss_seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Learning rate.
    #[arg(long, default_value_t = 2e-6)]
    pub learning_rate: f64,
    /// UNet learning rate (overrides --learning_rate).
    #[arg(long)]
    pub unet_lr: Option<f64>,
    /// Text-encoder learning rate (default --learning_rate). Like sd-scripts with
    /// networks.lora, only the first of several values is used (for both SDXL encoders). 0
    /// leaves the text encoder as it is. No effect with --network_train_unet_only.
    #[arg(long, num_args = 0..)]
    pub text_encoder_lr: Vec<f64>,
    /// AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit,
    /// PagedLion8bit, SGDNesterov, SGDNesterov8bit, Adafactor, Prodigy, DAdaptation,
    /// DAdaptAdamPreprint, DAdaptAdam, DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, DAdaptLion,
    /// DAdaptSGD, AdamWScheduleFree, RAdamScheduleFree or SGDScheduleFree (any case).
    #[arg(long, default_value = "")]
    pub optimizer_type: String,
    /// The legacy spelling of `--optimizer_type Lion`.
    #[arg(long)]
    pub use_lion_optimizer: bool,
    /// The legacy spelling of `--optimizer_type AdamW8bit`.
    #[arg(long)]
    pub use_8bit_adam: bool,
    /// Optimizer arguments key=value, each value a Python literal (betas=(0.9,0.99),
    /// weight_decay=0.01, relative_step=False, ...); keys the optimizer does not take are refused.
    #[arg(long, num_args = 1..)]
    pub optimizer_args: Vec<String>,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial,
    /// inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant.
    #[arg(long, default_value = "constant")]
    pub lr_scheduler: String,
    /// Warmup steps: a count, a fraction < 1 of the total, or N%.
    #[arg(long, default_value = "0")]
    pub lr_warmup_steps: String,
    /// Cycles of cosine_with_restarts.
    #[arg(long, default_value_t = 1.0)]
    pub lr_scheduler_num_cycles: f64,
    /// Decay steps of warmup_stable_decay: a count, a fraction < 1 of the total, or N%.
    #[arg(long, default_value = "0")]
    pub lr_decay_steps: String,
    /// Timescale of inverse_sqrt (default: the warmup steps, or 10000 without warmup).
    #[arg(long)]
    pub lr_scheduler_timescale: Option<usize>,
    /// Final LR ratio of cosine_with_min_lr (required) and warmup_stable_decay (default 0).
    #[arg(long)]
    pub lr_scheduler_min_lr_ratio: Option<f64>,
    /// A torch.optim.lr_scheduler class instead of --lr_scheduler (bare or with its module):
    /// CosineAnnealingLR, CosineAnnealingWarmRestarts, LinearLR, StepLR, MultiStepLR,
    /// ExponentialLR, ConstantLR, PolynomialLR, OneCycleLR (with cycle_momentum=False).
    #[arg(long, default_value = "")]
    pub lr_scheduler_type: String,
    /// Scheduler arguments key=value, each value a Python literal: the class's arguments with
    /// --lr_scheduler_type (T_max=30, milestones=[10,20]), or step_rules="1:100,0.1:200,0.01"
    /// of piecewise_constant.
    #[arg(long, num_args = 1..)]
    pub lr_scheduler_args: Vec<String>,
    /// Power of the polynomial scheduler.
    #[arg(long, default_value_t = 1.0)]
    pub lr_scheduler_power: f64,
    /// Noise offset.
    #[arg(long)]
    pub noise_offset: Option<f64>,
    /// Scale the noise offset by U(0,1) per batch.
    #[arg(long)]
    pub noise_offset_random_strength: bool,
    /// Add |mean latent| × this to the noise offset (needs --noise_offset).
    #[arg(long)]
    pub adaptive_noise_scale: Option<f64>,
    /// Multi-resolution noise iterations.
    #[arg(long)]
    pub multires_noise_iterations: Option<usize>,
    /// Multi-resolution noise discount.
    #[arg(long, default_value_t = 0.3)]
    pub multires_noise_discount: f64,
    /// Smallest timestep (inclusive).
    #[arg(long)]
    pub min_timestep: Option<usize>,
    /// Largest timestep (exclusive).
    #[arg(long)]
    pub max_timestep: Option<usize>,
    /// Min-SNR weighting gamma (5 recommended).
    #[arg(long)]
    pub min_snr_gamma: Option<f32>,
    /// Weight v-prediction loss like noise prediction.
    #[arg(long)]
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// Add a v-prediction-like loss term (noise prediction only).
    #[arg(long)]
    pub v_pred_like_loss: Option<f32>,
    /// Debiased estimation loss weighting.
    #[arg(long)]
    pub debiased_estimation_loss: bool,
    /// Input perturbation noise strength (0.1 recommended): the UNet sees `eps + gamma * N(0,1)`,
    /// the target stays `eps`.
    #[arg(long)]
    pub ip_noise_gamma: Option<f64>,
    /// Scale --ip_noise_gamma by a uniform random factor per micro-batch.
    #[arg(long)]
    pub ip_noise_gamma_random_strength: bool,
    /// Share of the images held out for a validation loss (0 to below 1; default 0: none).
    #[arg(long, default_value_t = 0.0)]
    pub validation_split: f64,
    /// Seed of the validation split and noise (default: --seed).
    #[arg(long)]
    pub validation_seed: Option<u64>,
    /// Also validate every N optimizer steps.
    #[arg(long)]
    pub validate_every_n_steps: Option<usize>,
    /// Validate at the end of every N epochs (default: every epoch, when there is a split).
    #[arg(long)]
    pub validate_every_n_epochs: Option<usize>,
    /// Evaluate at most this many validation batches.
    #[arg(long)]
    pub max_validation_steps: Option<usize>,
    /// Weight the loss by each image's alpha (the `alpha_mask` that prepare-latents --alpha_mask
    /// stores in the latent cache).
    #[arg(long)]
    pub alpha_mask: bool,
    /// Train on each image or its mirror image at random (the `latents_flipped` that
    /// prepare-latents --flip_aug caches).
    #[arg(long)]
    pub flip_aug: bool,
    /// Masked loss: the same as --alpha_mask here (there are no conditioning images).
    #[arg(long)]
    pub masked_loss: bool,
    /// Element-wise loss: l2, l1, huber or smooth_l1.
    #[arg(long, default_value = "l2")]
    pub loss_type: String,
    /// Threshold schedule of the Huber losses: constant, exponential or snr.
    #[arg(long, default_value = "snr")]
    pub huber_schedule: String,
    /// Huber threshold parameter (above 0, at most 1).
    #[arg(long, default_value_t = 0.1)]
    pub huber_c: f64,
    /// Scale of the Huber threshold (constant and exponential schedules).
    #[arg(long, default_value_t = 1.0)]
    pub huber_scale: f64,
    /// Max-norm regularisation: after every micro-batch, scale each module so the norm of its
    /// weight change is at most this.
    #[arg(long)]
    pub scale_weight_norms: Option<f64>,
    /// Rescale the schedule to zero terminal SNR.
    #[arg(long)]
    pub zero_terminal_snr: bool,
    /// Precision of the frozen UNet: no (fp32), fp16 or bf16. On the CPU, fp16/bf16 store the
    /// UNet's weights in that dtype (half the memory) and compute in fp32; on CUDA they also
    /// compute in it. The LoRA stays fp32.
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// Needs --mixed_precision fp16. Means the same as --mixed_precision fp16 alone: the LoRA,
    /// its gradients and the optimizer state stay fp32 here; without --save_precision the LoRA is
    /// saved as fp16, as sd-scripts saves it. Recorded as ss_full_fp16.
    #[arg(long)]
    pub full_fp16: bool,
    /// Needs --mixed_precision bf16. Means the same as --mixed_precision bf16 alone: the LoRA,
    /// its gradients and the optimizer state stay fp32 here; without --save_precision the LoRA is
    /// saved as bf16, as sd-scripts saves it.
    #[arg(long)]
    pub full_bf16: bool,
    /// Store the frozen UNet's weights as float8 (e4m3), a quarter of fp32's memory, widened
    /// layer by layer when used. Needs --mixed_precision fp16 or bf16.
    #[arg(long)]
    pub fp8_base: bool,
    /// The same as --fp8_base here (text encoders are not loaded: their outputs are cached).
    #[arg(long)]
    pub fp8_base_unet: bool,
    /// Keep only each UNet resnet's and transformer block's input (and, when the text encoder is
    /// trained, each text-encoder layer's) for the backward pass and run the block again there,
    /// as sd-scripts checkpoints them: much less activation memory (the larger the images, the
    /// more), for about one more forward pass of time per step.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// With --gradient_checkpointing: only the blocks at the N highest-resolution UNet levels
    /// recompute (default: every level, as sd-scripts). Each level has about the same number of
    /// multiply-adds, but the first holds most of the activations: 1 kept about half of the
    /// memory saving in the full-size SD1.5 benchmark (docs/train-lora.md).
    #[arg(long, requires = "gradient_checkpointing", value_parser = clap::value_parser!(u32).range(1..))]
    pub gradient_checkpointing_levels: Option<u32>,
    /// Compute device: cpu, or cuda (needs a build with the `cuda` feature; a data-parallel
    /// rank uses the GPU of its LOCAL_RANK).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: crate::models::ComputeDevice,
    /// Data-parallel runs (launched with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as
    /// torchrun does): minutes a rank waits for the others before failing (default 30).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ddp_timeout: Option<u64>,
    /// Write the loss log as JSON lines here (default `<output_dir>/<name>_loss.jsonl`).
    #[arg(long)]
    pub loss_log: Option<PathBuf>,
    /// Take each micro-batch's noise and timesteps from this `.npz` (`noise_<i>`, `timesteps_<i>`
    /// for micro-batch i, counted from 0 over the whole run) instead of drawing them: for
    /// comparing a run step by step with one recorded from sd-scripts
    /// (tests/fixtures/generate/sdxl_train_run.py). Not with the options that change the noise
    /// or the timestep range (the recorded noise is final).
    #[arg(long)]
    pub recorded_noise: Option<PathBuf>,
    /// Also write loss, average loss, learning rate and validation loss as TensorBoard events
    /// under `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/network_train` (implied by
    /// --logging_dir). Only `tensorboard`: wandb needs the network.
    #[arg(long)]
    pub log_with: Option<String>,
    /// Folder of the TensorBoard runs (`tensorboard --logdir` it).
    #[arg(long)]
    pub logging_dir: Option<PathBuf>,
    /// Name of the TensorBoard run's subfolder (default `network_train`).
    #[arg(long)]
    pub log_tracker_name: Option<String>,
    /// Prefix of the run folder name under --logging_dir.
    #[arg(long)]
    pub log_prefix: Option<String>,
    /// No progress display.
    #[arg(skip)]
    pub quiet: bool,
    /// The options the command line gave (with `--resume`: and the restored ones); kept in
    /// state folders. Filled by the command-line parser of `train-lora`.
    #[arg(skip)]
    pub settings: super::settings::Settings,
    /// What the command-line parser has to say about accepted sd-scripts options (logged when
    /// the run starts).
    #[arg(skip)]
    pub notices: Vec<super::settings::Notice>,
    /// The preparation of a --train_data_dir / --dataset_config dataset (run before training
    /// unless --no_prepare).
    #[arg(skip)]
    pub preparation: Option<super::preparation::Preparation>,
    /// Options of train_network.py that change nothing here.
    #[command(flatten)]
    pub compat: CompatArgs,
}

impl TrainArgs {
    /// Whether a step trains on cached caption variants (`--shuffle_caption`, `--keep_tokens`,
    /// `--caption_tag_dropout_rate`).
    pub fn augments_captions(&self) -> bool {
        self.shuffle_caption
            || self.keep_tokens.is_some_and(|n| n > 0)
            || self.caption_tag_dropout_rate.is_some_and(|rate| rate > 0.0)
    }

    /// Whether the text encoder is trained (sd-scripts' `is_train_text_encoder`): unless
    /// `--network_train_unet_only` or `--cache_text_encoder_outputs` is given. Then captions are
    /// encoded live every step; otherwise the cached text-encoder outputs are read.
    pub fn trains_text_encoder(&self) -> bool {
        !self.network_train_unet_only && !self.compat.cache_text_encoder_outputs
    }

    /// The learning rate of the text-encoder modules: the first `--text_encoder_lr` value, else
    /// `--learning_rate`. sd-scripts' `networks.lora` has no per-encoder rates, so
    /// `train_network.py` uses the first value for every encoder (SDXL's two as well).
    pub fn text_encoder_lr(&self) -> f64 {
        self.text_encoder_lr
            .first()
            .copied()
            .unwrap_or(self.learning_rate)
    }
}

/// Options of sd-scripts' `train_network.py` that have no effect here, accepted so that command
/// lines written for it (or by kohya_ss) do not stop on them. Training always reads cached latents and
/// text-encoder outputs, keeps its data in memory and uses its own attention kernel.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(
    rename_all = "snake_case",
    next_help_heading = "Accepted for compatibility with train_network.py (no effect)"
)]
pub struct CompatArgs {
    /// Latents always come from the caches of prepare-latents.
    #[arg(long)]
    pub cache_latents: bool,
    /// Latents always come from the caches of prepare-latents.
    #[arg(long)]
    pub cache_latents_to_disk: bool,
    /// Train the UNet only, from the caches of cache-text-encoder (as
    /// --network_train_unet_only).
    #[arg(long)]
    pub cache_text_encoder_outputs: bool,
    /// Text-encoder outputs always come from the caches of cache-text-encoder.
    #[arg(long)]
    pub cache_text_encoder_outputs_to_disk: bool,
    /// Attention always runs on lorakit's own kernel.
    #[arg(long)]
    pub xformers: bool,
    /// Attention always runs on lorakit's own kernel.
    #[arg(long)]
    pub sdpa: bool,
    /// Attention always runs on lorakit's own kernel.
    #[arg(long)]
    pub mem_eff_attn: bool,
    /// The cached data are loaded into memory once.
    #[arg(long)]
    pub persistent_data_loader_workers: bool,
    /// The cached data are loaded into memory once.
    #[arg(long)]
    pub max_data_loader_n_workers: Option<usize>,
    /// Used when train-lora prepares a dataset; with --in_json the cached latents decide.
    #[arg(long)]
    pub enable_bucket: bool,
    /// Used when train-lora prepares a dataset; with --in_json the cached latents decide.
    #[arg(long)]
    pub bucket_no_upscale: bool,
    /// Used when train-lora prepares a dataset; with --in_json the cached latents decide.
    #[arg(long)]
    pub resolution: Option<String>,
    /// Used when train-lora prepares a dataset; with --in_json the cached latents decide.
    #[arg(long)]
    pub min_bucket_reso: Option<usize>,
    /// Used when train-lora prepares a dataset; with --in_json the cached latents decide.
    #[arg(long)]
    pub max_bucket_reso: Option<usize>,
    /// Used when train-lora prepares a dataset; with --in_json the cached latents decide.
    #[arg(long)]
    pub bucket_reso_steps: Option<usize>,
    /// Used when train-lora prepares a dataset; with --in_json the captions are cached.
    #[arg(long)]
    pub caption_extension: Option<String>,
    /// The VAE prepare-latents encodes with when train-lora prepares a dataset, and
    /// generate-images decodes sample images with; training never loads a VAE.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The VAE is never loaded (latents are cached).
    #[arg(long)]
    pub no_half_vae: bool,
    /// The text-encoder layer used: counted from the end (sd-scripts' --clip_skip). Live
    /// captions are encoded with it when the text encoder is trained; otherwise
    /// cache-text-encoder --clip_skip set it (passed to it when train-lora prepares a dataset).
    /// Sample images are encoded with it too.
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// Tokens per caption (75, 150 or 225): used for live captions when the text encoder is
    /// trained; otherwise set by cache-text-encoder --max_token_length (passed to it when
    /// train-lora prepares a dataset) and checked against the caches when given.
    #[arg(long)]
    pub max_token_length: Option<usize>,
    /// Memory-mapped weights already keep the resident size low.
    #[arg(long)]
    pub lowram: bool,
}
