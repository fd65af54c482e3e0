//! LoRA training loop (`train_network.py` semantics, docs/kohya-compat.md#training): cached data,
//! seeded noise, loss weighting, AdamW/Lion, LR schedulers, gradient accumulation, periodic saves
//! with sd-scripts naming and `ss_*` metadata, exact resume from a saved state, and
//! [`data_parallel`] runs over several ranks.

pub mod args;
pub mod contact_sheet;
pub mod data;
pub mod data_parallel;
pub mod live_text;
pub mod loss;
pub mod lr;
pub mod metadata;
pub mod network_args;
pub mod noise;
pub mod optim;
pub mod plot;
pub mod preparation;
pub mod samples;
pub mod saving;
pub mod schedule;
pub mod settings;
pub mod state;
pub mod tensorboard;
pub mod validation;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::formats::manifest::Manifest;
use crate::formats::schema::LORA_V1;
use crate::formats::te_cache::describe_width;
use crate::infra::collective::{self, Collective, Patience, SingleProcess, TcpGroup};
use crate::infra::report::{Progress, Summary, Throughput};
use crate::infra::{fsio, interrupt, memory};
use crate::models::adapter::{Adaptable, Joined};
use crate::models::precision::{MixedPrecision, ModelPrecision};
use crate::models::recompute;
use crate::models::unet::{self, Unet};
use crate::models::{Checkpoint, Component, ModelFamily};
use crate::networks::dylora::DyloraNetwork;
use crate::networks::lora::{BlockLayout, LoraNetwork};
use crate::networks::lycoris::LycorisNetwork;
use crate::networks::Network;
use crate::text::caption_text::CaptionAugmentation;
use crate::{Error, Result};
pub use args::TrainArgs;
use data::{Batch, CachedDataset};
use loss::LossFunction;
use lr::{LrScheduler, ScheduleParams};
use network_args::NetworkOptions;
use noise::{NoiseOptions, NoiseRng, RecordedNoise};
use optim::{Optimizer, OptimizerKind};
use saving::SavePoint;
use schedule::{LossWeighting, NoiseSchedule};
use validation::Validation;

/// The LoRA's file stem without `--output_name` (as sd-scripts).
const DEFAULT_OUTPUT_NAME: &str = "last";

/// What the loss of one micro-batch needs besides the model.
pub struct LossContext<'a> {
    /// The noise schedule.
    pub schedule: &'a NoiseSchedule,
    /// Noise / timestep options.
    pub noise: NoiseOptions,
    /// Element-wise loss.
    pub loss: LossFunction,
    /// Per-sample weighting.
    pub weighting: LossWeighting,
    /// Run seed.
    pub seed: u64,
    /// Compute dtype of the UNet.
    pub dtype: DType,
    /// The trained text encoder, when batches carry captions instead of cached contexts.
    pub text: Option<&'a live_text::LiveText>,
    /// Noise and timesteps read from a file instead of drawn (`--recorded_noise`).
    pub recorded: Option<&'a RecordedNoise>,
}

/// Loss of one micro-batch of cached latents and text-encoder states (and loss masks); the noise
/// stream (or recorded draw) is that of micro-batch `index`. Returns the batch-mean loss (f32
/// scalar tensor). A batch of captions is encoded by the trained text encoder of `ctx` first.
pub fn micro_batch_loss(
    unet: &Unet,
    ctx: &LossContext,
    batch: &Batch,
    index: u64,
) -> Result<Tensor> {
    let (context, vector) = match (&batch.captions, ctx.text) {
        (Some(captions), Some(text)) => text.encode(captions, batch.sizes.as_deref())?,
        (Some(_), None) => {
            return Err(Error::Model(
                "a batch of captions needs the trained text encoder".into(),
            ))
        }
        (None, _) => (batch.context.clone(), batch.vector.clone()),
    };
    let context = &context;
    let x0 = (&batch.latents * unet.config.family().vae_scale())?;
    let noise::NoiseDraw {
        eps,
        input_eps,
        timesteps,
    } = match ctx.recorded {
        Some(recorded) => recorded.draw(index, &x0)?,
        None => noise::draw(
            &mut NoiseRng::for_micro_batch(ctx.seed, index),
            &x0,
            &ctx.noise,
        )?,
    };
    let device = x0.device();
    let b = timesteps.len();
    let (mut a, mut s) = (Vec::with_capacity(b), Vec::with_capacity(b));
    for &t in &timesteps {
        let (sa, sb) = ctx.schedule.coefficients(t);
        a.push(sa);
        s.push(sb);
    }
    let a = Tensor::from_vec(a, (b, 1, 1, 1), device)?;
    let s = Tensor::from_vec(s, (b, 1, 1, 1), device)?;
    let noisy = (x0.broadcast_mul(&a)? + input_eps.broadcast_mul(&s)?)?;
    let target = if ctx.weighting.v_prediction {
        (eps.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?
    } else {
        eps
    };
    let t_tensor = Tensor::from_vec(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        b,
        device,
    )?;
    let pred = unet
        .forward(
            &noisy.to_dtype(ctx.dtype)?,
            &t_tensor,
            &context.to_dtype(ctx.dtype)?,
            vector
                .as_ref()
                .map(|v| v.to_dtype(ctx.dtype))
                .transpose()?
                .as_ref(),
        )?
        .to_dtype(DType::F32)?;
    let mut elementwise = (ctx.loss).elementwise(&pred, &target, ctx.schedule, &timesteps)?;
    if let Some(mask) = &batch.mask {
        // Masked loss: still the mean over every element, not over the mask's area.
        elementwise = elementwise.broadcast_mul(mask)?;
    }
    let per_sample = elementwise.flatten_from(1)?.mean(1)?;
    let weights: Vec<f32> = timesteps
        .iter()
        .map(|&t| ctx.weighting.weight(&ctx.schedule.all_snr, t))
        .collect();
    let mut weighted = (per_sample * Tensor::from_vec(weights, b, device)?)?;
    if let Some(loss_weights) = &batch.loss_weights {
        // Regularisation images count `--prior_loss_weight` times (sd-scripts' `loss_weights`).
        weighted = (weighted * loss_weights)?;
    }
    Ok(weighted.mean_all()?)
}

/// Resolved run plan.
struct Plan {
    name: String,
    total_steps: usize,
    num_epochs: usize,
    /// Batches each rank trains on per epoch ([`data_parallel::rounds`]).
    rounds_per_epoch: usize,
    seed: u64,
    /// Ranks training together.
    world_size: usize,
    lr: f64,
    save_every_n_epochs: Option<usize>,
}

/// Runs `train-lora` as one rank of the data-parallel group a launcher describes in the
/// environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), or alone without one.
pub fn run(args: &TrainArgs) -> Result<Summary> {
    let timeout = std::time::Duration::from_secs(60 * args.ddp_timeout.unwrap_or(30));
    let Some(group) = TcpGroup::from_env(timeout)? else {
        return run_in_group(args, &SingleProcess);
    };
    // GPUs sum their gradients over NCCL when the build has it; else through host memory.
    #[cfg(feature = "nccl")]
    if args.device == crate::models::ComputeDevice::Cuda {
        let device = args.device.open(collective::local_rank())?;
        return run_in_group(args, &crate::models::nccl::NcclGroup::new(group, &device)?);
    }
    run_in_group(args, &group)
}

/// Runs `train-lora` as one rank of `group`: the dataset's [`preparation`] (when the command
/// line names a kohya dataset), [`prepare`] the run, [`Training::run`] the loop, [`finish`] the
/// files. Only rank 0 prepares the dataset and writes files.
pub fn run_in_group(args: &TrainArgs, group: &dyn Collective) -> Result<Summary> {
    let main = collective::is_main(group);
    let samples = samples::SampleImages::from_args(args)?.filter(|_| main);
    if let Some(preparation) = &args.preparation {
        if args.no_prepare {
            preparation.check_prepared()?;
        } else if main {
            preparation.run(args.quiet)?;
            collective::barrier(group, Patience::Unlimited)?;
        } else {
            collective::barrier(group, Patience::Unlimited)?;
            preparation.check_prepared()?;
        }
    }
    let started = Instant::now();
    let started_unix = unix_time();
    let Some(mut setup) = prepare(args, group)? else {
        return Ok(Summary {
            up_to_date: 1,
            ..Summary::default()
        });
    };
    let plan = &setup.plan;
    let noise_schedule = NoiseSchedule::scaled_linear(args.zero_terminal_snr);
    let mut loss_ctx = loss_context(args, &noise_schedule, plan.seed, setup.dtype)?;
    let recorded = args
        .recorded_noise
        .as_deref()
        .map(RecordedNoise::read)
        .transpose()?;
    loss_ctx.text = setup.text.as_ref();
    loss_ctx.recorded = recorded.as_ref();
    let validation = setup.held_out.take().map(|set| {
        Validation::new(
            set,
            args.train_batch_size,
            args.max_validation_steps,
            args.validation_seed.unwrap_or(plan.seed),
            &loss_ctx.noise,
        )
    });
    if main {
        std::fs::create_dir_all(&args.output_dir).map_err(|e| Error::io(&args.output_dir, e))?;
    }
    let mut start = state::Progress::default();
    if let Some(resume) = &args.resume {
        let dir = state::resolve_resume(resume, Some(&args.output_dir))?;
        start = state::load(
            &dir,
            &setup.network,
            &mut setup.optimizer,
            group.world_size(),
        )?;
        tracing::info!(
            "resumed from {} at step {}",
            dir.display(),
            start.global_step
        );
        if !args.settings.restored.is_empty() {
            tracing::info!(
                "the run's settings, restored from the state: {}",
                args.settings.restored.join(" ")
            );
        }
    }
    let saver = saving::Saver {
        args,
        network: &setup.network,
        save_dtype: setup.save_dtype,
        meta_base: metadata::base_metadata(
            args,
            &setup.dataset,
            &plan_info(plan, validation.as_ref().map_or(0, Validation::images)),
            started_unix,
            &setup.optimizer_kind,
            setup.unet.config.family(),
        )?,
        name: plan.name.clone(),
        every_n_epochs: plan.save_every_n_epochs,
        settings: args.settings.with_value("seed", plan.seed.to_string()),
    };
    let log_path = args
        .loss_log
        .clone()
        .unwrap_or_else(|| args.output_dir.join(format!("{}_loss.jsonl", plan.name)));
    let training = Training {
        args,
        plan,
        device: &setup.device,
        dataset: &setup.dataset,
        unet: &setup.unet,
        network: &setup.network,
        scheduler: &setup.scheduler,
        loss_ctx: &loss_ctx,
        validation: validation.as_ref(),
        saver: &saver,
        samples: samples.as_ref(),
        log_path: &log_path,
        tracker: match tensorboard::run_dir(args)?.filter(|_| main) {
            Some(dir) => Some(std::cell::RefCell::new(tensorboard::Tracker::create(&dir)?)),
            None => None,
        },
        group,
    };
    let first_step = start.global_step;
    let end = training.run(&mut setup.optimizer, start)?;
    if !main {
        tracing::info!(
            "rank {} of {}: {} steps trained; rank 0 wrote the files",
            group.rank(),
            group.world_size(),
            end.global_step - first_step
        );
        return Ok(Summary {
            done: 1,
            ..Summary::default()
        });
    }
    saver.save_model(&plan.name, end.global_step, plan.num_epochs)?;
    let summary = Summary {
        done: 1,
        throughput: Some(Throughput {
            count: end.global_step - first_step,
            unit: "steps",
        }),
        ..Summary::default()
    };
    finish(args, &setup, &end, &log_path, summary, started)
}

/// Everything a run needs before its first step.
struct Setup {
    device: Device,
    dtype: DType,
    save_dtype: Option<DType>,
    dataset: CachedDataset,
    held_out: Option<CachedDataset>,
    unet: Unet,
    text: Option<live_text::LiveText>,
    network: Network,
    optimizer: Optimizer,
    optimizer_kind: OptimizerKind,
    scheduler: LrScheduler,
    plan: Plan,
    training_key: String,
    sample_keys: BTreeMap<String, String>,
    final_path: PathBuf,
}

/// Checks the arguments, loads the caches and the UNet, merges `--base_weights`, builds the
/// network, optimizer and scheduler. `None` when the LoRA is already up to date.
fn prepare(args: &TrainArgs, group: &dyn Collective) -> Result<Option<Setup>> {
    for notice in &args.notices {
        if notice.warning {
            tracing::warn!("{}", notice.text);
        } else {
            tracing::info!("{}", notice.text);
        }
    }
    check_args(args)?;
    if collective::is_main(group) {
        check_outputs_writable(args)?;
    }
    crate::models::tune_process_for_training();
    let device = args.device.open(collective::local_rank())?;
    let precision = model_precision(args, &device)?;
    // Without --save_precision sd-scripts saves the network as it is in memory: the training
    // dtype under --full_fp16/--full_bf16 (here the LoRA trains in fp32 and is cast on saving).
    let save_dtype = match args.save_precision.as_deref() {
        None if args.full_fp16 => Some(DType::F16),
        None if args.full_bf16 => Some(DType::BF16),
        None => None,
        Some("float") => Some(DType::F32),
        Some("fp16") => Some(DType::F16),
        Some("bf16") => Some(DType::BF16),
        Some(other) => {
            return Err(Error::Usage(format!(
                "--save_precision {other}: use float, fp16 or bf16"
            )))
        }
    };
    let optimizer_name = optim::optimizer_name(
        &args.optimizer_type,
        args.use_8bit_adam,
        args.use_lion_optimizer,
    )?;
    let optimizer_kind = OptimizerKind::parse(&optimizer_name, &args.optimizer_args)?;

    let checkpoint = Checkpoint::open(&args.pretrained_model_name_or_path)?;
    let family = checkpoint.family();
    let block_layout = match family {
        ModelFamily::Sdxl => BlockLayout::Sdxl,
        _ => BlockLayout::Sd,
    };
    let network_options = NetworkOptions::from_args(args, block_layout)?;
    let live = args.trains_text_encoder();
    if args.weighted_captions && !live {
        return Err(Error::Usage(
            "--weighted_captions: with --network_train_unet_only / --cache_text_encoder_outputs \
             the captions are encoded when caching: use cache-text-encoder --weighted_captions, \
             and leave it out here"
                .into(),
        ));
    }
    if args.network_train_text_encoder_only && !live {
        return Err(Error::Usage(
            "--network_train_text_encoder_only trains the text encoder, but \
             --network_train_unet_only / --cache_text_encoder_outputs leave it untrained: give \
             one or the other"
                .into(),
        ));
    }
    if live {
        tracing::info!(
            "training the text encoder and the UNet (sd-scripts' default): the text encoder is \
             loaded and every step's captions are encoded live (--shuffle_caption, \
             --keep_tokens, tag and caption dropout are exact); latents come from the latent \
             caches. --network_train_unet_only trains the UNet only from cached text-encoder \
             outputs"
        );
    } else {
        tracing::info!(
            "training the UNet only (--network_train_unet_only / --cache_text_encoder_outputs): \
             text-encoder outputs and latents come from the caches"
        );
    }
    let dataset = CachedDataset::load(
        &args.in_json,
        args.train_data_dir.as_deref(),
        args.dataset_repeats,
        data::CacheOptions {
            family,
            alpha_mask: args.alpha_mask || args.masked_loss,
            augment: data::Augment {
                flip: args.flip_aug,
                caption_variants: args.augments_captions(),
                caption_dropout_rate: args.caption_dropout_rate.unwrap_or(0.0),
                caption_dropout_every_n_epochs: args.caption_dropout_every_n_epochs.unwrap_or(0),
            },
            prior_loss_weight: args.prior_loss_weight as f32,
            live_captions: live,
        },
    )?;
    // Live captions are encoded every step; cached ones need the caption variants.
    if !live {
        if dataset.config.is_some() {
            check_subset_caption_variants(args, &dataset)?;
        } else if args.augments_captions() {
            check_caption_variants(args, &dataset)?;
        }
    }
    let sample_keys = dataset
        .samples
        .iter()
        .map(|s| Ok((s.key.clone(), sample_key(s)?)))
        .collect::<Result<BTreeMap<String, String>>>()?;
    if let Some(tokens) = args.compat.max_token_length.filter(|_| !live) {
        let cached = dataset.samples[0].context.dim(0)?;
        if cached != tokens + 2 {
            return Err(Error::Usage(format!(
                "--max_token_length {tokens}: the text-encoder caches hold {} tokens (--max_token_length {} at cache-text-encoder time); re-run cache-text-encoder or drop the option",
                cached,
                cached - 2
            )));
        }
    }
    // Every rank trains with rank 0's seed, drawn when --seed is not given.
    let seed = collective::broadcast_from_main(
        group,
        args.seed
            .unwrap_or_else(|| rand::random::<u32>() as u64)
            .to_le_bytes(),
    )?;
    let seed = u64::from_le_bytes(seed);
    let (mut dataset, held_out) =
        dataset.split_validation(args.validation_split, args.validation_seed.unwrap_or(seed))?;
    let caption_dropout = dataset.samples.iter().any(|s| {
        s.augment.caption_dropout_rate > 0.0 || s.augment.caption_dropout_every_n_epochs > 0
    });
    if caption_dropout && !live {
        dataset.empty_caption = Some(empty_caption(args, &dataset, family)?);
    }
    if live {
        dataset.augmentation = Some(CaptionAugmentation {
            shuffle: args.shuffle_caption,
            keep_tokens: args.keep_tokens.unwrap_or(0),
            tag_dropout_rate: args.caption_tag_dropout_rate.unwrap_or(0.0),
            separator: crate::text::caption_text::DEFAULT_SEPARATOR.into(),
        })
        .filter(|augmentation| !augmentation.is_identity());
    }
    let mut unet = load_unet(args, &checkpoint, precision, &device)?;
    let mut text = match live {
        true => Some(live_text::LiveText::load(
            &checkpoint,
            precision.compute,
            &device,
            args.compat.clip_skip,
            args.compat.max_token_length,
            args.weighted_captions,
        )?),
        false => None,
    };
    if let Some(text) = &mut text {
        text.set_gradient_checkpointing(args.gradient_checkpointing);
    }
    if let Some(text) = &text {
        let width: usize = (text.encoder.encoders.encoders.iter())
            .map(|e| e.config().hidden_size)
            .sum();
        if width != unet.config.context_dim {
            return Err(Error::bad_file(
                &args.pretrained_model_name_or_path,
                format!(
                    "the text encoder(s) give width {width}, but the UNet expects {}: the \
                     checkpoint's parts do not belong together",
                    unet.config.context_dim
                ),
            ));
        }
    }
    if text.is_none() && dataset.context_dim != unet.config.context_dim {
        return Err(Error::bad_file(
            &dataset.samples[0].text_cache,
            format!(
                "the text-encoder caches (this one and the rest of {}) have width {}, but the \
                 UNet of {} expects {}: the caches were made with another model; re-run \
                 cache-text-encoder with this checkpoint",
                args.in_json.display(),
                describe_width(dataset.context_dim),
                args.pretrained_model_name_or_path.display(),
                describe_width(unet.config.context_dim)
            ),
        ));
    }
    let cached_pool2 = dataset.samples[0].pool2.as_ref().filter(|_| text.is_none());
    if let (Some(expected), Some(pool2)) = (unet.config.pool_dim(), cached_pool2) {
        if pool2.dim(0)? != expected {
            return Err(Error::bad_file(
                &dataset.samples[0].text_cache,
                format!(
                    "pool2 has width {}, but the UNet of {} expects {expected}: the caches were \
                     made with another model; re-run cache-text-encoder with this checkpoint",
                    pool2.dim(0)?,
                    args.pretrained_model_name_or_path.display()
                ),
            ));
        }
    }

    let plan = plan(args, &dataset, seed, group.world_size());
    let final_path = args.output_dir.join(format!("{}.safetensors", plan.name));
    let training_key = training_key(
        args,
        &checkpoint,
        &sample_keys,
        text.as_ref(),
        group.world_size(),
    )?;
    let up_to_date = args.resume.is_none() && is_up_to_date(&final_path, &training_key);
    let fingerprint = crate::infra::hashing::KeyBuilder::new("train-lora ranks", 1)
        .text("training", &training_key)
        .text("up_to_date", &up_to_date.to_string())
        .finish();
    collective::check_agreement(
        group,
        "their command lines, datasets, models or outputs",
        fingerprint.as_bytes()[..8]
            .try_into()
            .expect("a key of 8 bytes or more"),
    )?;
    if up_to_date {
        tracing::info!(
            "{} is up to date: same caches, model and settings as the run that wrote it",
            final_path.display()
        );
        return Ok(None);
    }
    if !(args.dim_from_weights && args.network_weights.is_some())
        && network_options.lycoris.is_none()
        && network_options.dylora_unit.is_none()
    {
        check_network_fits(&mut unet, &network_options.lora, &optimizer_kind)?;
    }
    let two_text_encoders = (text.as_ref()).is_some_and(|t| t.encoder.encoders.encoders.len() > 1);
    if network_options.dylora_unit.is_some() && two_text_encoders {
        return Err(Error::Usage(
            "networks.dylora names the modules of both SDXL text encoders lora_te_*, so they \
             collide; train the UNet only (--network_train_unet_only) or use networks.lora"
                .into(),
        ));
    }
    let network = {
        // sd-scripts' network spans the text encoder(s) (first) and the UNet.
        let mut models: Vec<&mut dyn Adaptable> = match &mut text {
            Some(text) => text.models(),
            None => Vec::new(),
        };
        if !args.network_train_text_encoder_only {
            models.push(&mut unet);
        }
        let mut models = Joined(models);
        merge_base_weights(args, &mut models, live)?;
        match (&network_options.lycoris, network_options.dylora_unit) {
            (_, Some(unit)) => Network::Dylora(match &args.network_weights {
                Some(path) if args.dim_from_weights => {
                    let (network, unknown) = DyloraNetwork::load(&mut models, path, unit, &device)?;
                    log_modules_loaded(path, "DyLoRA", network.modules.len(), &unknown);
                    network
                }
                Some(path) => {
                    let network = DyloraNetwork::create(
                        &mut models,
                        &network_options.lora,
                        unit,
                        plan.seed,
                        &device,
                    )?;
                    let applied = network.load_weights(path, false)?;
                    tracing::info!("{}: {applied} DyLoRA modules loaded", path.display());
                    network
                }
                None => DyloraNetwork::create(
                    &mut models,
                    &network_options.lora,
                    unit,
                    plan.seed,
                    &device,
                )?,
            }),
            (Some(config), None) => Network::Lycoris(match &args.network_weights {
                Some(path) if args.dim_from_weights => {
                    let (network, unknown) = LycorisNetwork::load(&mut models, path, 1.0, &device)?;
                    log_modules_loaded(path, "LyCORIS", network.modules.len(), &unknown);
                    network
                }
                Some(path) => {
                    let network = LycorisNetwork::create(&mut models, config, plan.seed, &device)?;
                    let applied = network.load_weights(path)?;
                    tracing::info!("{}: {applied} LyCORIS modules loaded", path.display());
                    network
                }
                None => LycorisNetwork::create(&mut models, config, plan.seed, &device)?,
            }),
            (None, None) => {
                let mut network = match &args.network_weights {
                    Some(path) if args.dim_from_weights => {
                        let (network, report) = LoraNetwork::load(&mut models, path, 1.0, &device)?;
                        log_loaded(path, &report, live);
                        network
                    }
                    Some(path) => {
                        let mut network = LoraNetwork::create(
                            &mut models,
                            &network_options.lora,
                            plan.seed,
                            &device,
                        )?;
                        let report = network.load_weights(&mut models, path)?;
                        log_loaded(path, &report, live);
                        network
                    }
                    None => {
                        LoraNetwork::create(&mut models, &network_options.lora, plan.seed, &device)?
                    }
                };
                if network_options.dropout.any() {
                    network.enable_dropout(&mut models, network_options.dropout);
                }
                Network::Lora(network)
            }
        }
    };
    if live {
        let names = network.module_names();
        let te_modules = names
            .iter()
            .filter(|name| name.starts_with("lora_te"))
            .count();
        tracing::info!(
            "{te_modules} text-encoder and {} UNet modules; text-encoder learning rate {}",
            names.len() - te_modules,
            args.text_encoder_lr()
        );
    }
    // The text-encoder modules learn at --text_encoder_lr: a factor on the UNet's rate, so the
    // scheduler scales both alike.
    let text_encoder_factor = match plan.lr {
        lr if lr > 0.0 => args.text_encoder_lr() / lr,
        _ => 0.0,
    };
    let trainable: Vec<(candle_core::Var, &str, bool)> = match &network {
        Network::Lora(network) => (network.modules.iter())
            .flat_map(|m| [(&m.down, &m.name, false), (&m.up, &m.name, true)])
            .map(|(var, name, is_up)| (var.clone(), name.as_str(), is_up))
            .collect(),
        Network::Dylora(network) => network.named_vars(),
        Network::Lycoris(network) => (network.named_vars().into_iter())
            .map(|(name, var)| (var, name, false))
            .collect(),
    };
    let (vars, lr_factors): (Vec<_>, Vec<_>) = (trainable.into_iter())
        .map(|(var, name, is_up)| {
            let factor = network_options.lr_factor(name, is_up);
            match name.starts_with("lora_te") {
                true => (var, factor * text_encoder_factor),
                false => (var, factor),
            }
        })
        .filter(|(_, factor)| *factor > 0.0)
        .unzip();
    let group_lrs: Vec<f64> = lr_factors.iter().map(|factor| plan.lr * factor).collect();
    optimizer_kind.check_learning_rates(&group_lrs)?;
    let optimizer = Optimizer::new(optimizer_kind.clone(), vars, lr_factors)?;
    let warmup = lr::resolve_steps("--lr_warmup_steps", &args.lr_warmup_steps, plan.total_steps)?;
    let requested = match args.lr_scheduler_type.as_str() {
        "" => args.lr_scheduler.as_str(),
        class => class,
    };
    let replaced = optimizer_kind.replaces_scheduler(requested, warmup)?;
    let scheduler = if args.lr_scheduler_type.is_empty() || replaced {
        if !args.lr_scheduler_type.is_empty() {
            // Checked all the same, so that a mistake is not found only with another optimizer.
            LrScheduler::torch(requested, &args.lr_scheduler_args, 1)?;
        }
        LrScheduler::new(
            if replaced { "constant" } else { requested },
            ScheduleParams {
                total: plan.total_steps,
                warmup,
                decay: lr::resolve_steps(
                    "--lr_decay_steps",
                    &args.lr_decay_steps,
                    plan.total_steps,
                )?,
                base_lr: plan.lr,
                cycles: args.lr_scheduler_num_cycles,
                power: args.lr_scheduler_power,
                timescale: args.lr_scheduler_timescale,
                min_lr_ratio: args.lr_scheduler_min_lr_ratio,
                scheduler_args: match args.lr_scheduler_type.is_empty() {
                    true => args.lr_scheduler_args.clone(),
                    false => Vec::new(),
                },
            },
        )?
    } else {
        if warmup > 0 {
            return Err(Error::Usage(format!(
                "--lr_warmup_steps: --lr_scheduler_type {requested} takes no warmup (sd-scripts \
                 refuses it too); drop it, or warm up with --lr_scheduler_type LinearLR"
            )));
        }
        LrScheduler::torch(requested, &args.lr_scheduler_args, plan.total_steps)?
    };
    Ok(Some(Setup {
        device,
        dtype: precision.compute,
        save_dtype,
        dataset,
        held_out,
        unet,
        text,
        network,
        optimizer,
        optimizer_kind,
        scheduler,
        plan,
        training_key,
        sample_keys,
        final_path,
    }))
}

/// How the frozen UNet is stored and computed: `--mixed_precision`, `--full_fp16`/`--full_bf16`
/// (checked against it, as sd-scripts does) and `--fp8_base`.
fn model_precision(args: &TrainArgs, device: &Device) -> Result<ModelPrecision> {
    let mixed = MixedPrecision::parse(&args.mixed_precision)?;
    for (flag, set, needs) in [
        ("--full_fp16", args.full_fp16, MixedPrecision::Fp16),
        ("--full_bf16", args.full_bf16, MixedPrecision::Bf16),
    ] {
        if set && mixed != needs {
            return Err(Error::Usage(format!(
                "{flag} requires --mixed_precision {}",
                needs.name()
            )));
        }
    }
    let fp8 = args.fp8_base || args.fp8_base_unet;
    if fp8 && mixed == MixedPrecision::No {
        return Err(Error::Usage(
            "--fp8_base requires --mixed_precision fp16 or bf16".into(),
        ));
    }
    Ok(ModelPrecision::new(mixed, fp8, device))
}

/// The frozen UNet of an SD1.x/SD2.x/SDXL checkpoint, checked against `--v2`.
fn load_unet(
    args: &TrainArgs,
    checkpoint: &Checkpoint,
    precision: ModelPrecision,
    device: &Device,
) -> Result<Unet> {
    let mapping = unet::ldm_mapping(checkpoint.family());
    let vb = checkpoint.var_builder(Component::Unet, precision.compute, device, &mapping)?;
    let mut unet = Unet::load(&vb, precision.weights).map_err(|e| {
        Error::bad_file(
            &args.pretrained_model_name_or_path,
            format!("not an SD1.x/SD2.x/SDXL checkpoint with a UNet: {e}"),
        )
    })?;
    let model = args.pretrained_model_name_or_path.display();
    if unet.config.is_sdxl() {
        if args.v2 {
            return Err(Error::Usage(format!(
                "{model} is an SDXL UNet; remove --v2 (sd-scripts refuses it for SDXL too)"
            )));
        }
    } else if unet.config.is_sd2() != args.v2 {
        let (found, fix) = if unet.config.is_sd2() {
            ("SD2.x", "add")
        } else {
            ("SD1.x", "remove")
        };
        return Err(Error::Usage(format!(
            "{model} is an {found} UNet; {fix} --v2"
        )));
    }
    unet.set_gradient_checkpointing(match args.gradient_checkpointing {
        false => 0,
        true => args
            .gradient_checkpointing_levels
            .map_or(usize::MAX, |levels| levels as usize),
    });
    Ok(unet)
}

/// `--base_weights`: merges each LoRA file into the frozen models at its multiplier (the UNet,
/// and the text encoder(s) when they are trained).
fn merge_base_weights(args: &TrainArgs, models: &mut Joined, live: bool) -> Result<()> {
    for (i, path) in args.base_weights.iter().enumerate() {
        let multiplier = args.base_weights_multiplier.get(i).copied().unwrap_or(1.0);
        let report = crate::networks::merge_file(models, path, multiplier)?;
        tracing::info!(
            "{}: {} modules merged into the base model at {multiplier}",
            path.display(),
            report.applied
        );
        if report.ignored_text_encoder > 0 && !live {
            tracing::warn!(
                "{}: {} text-encoder modules not merged (the text-encoder caches were made without them)",
                path.display(),
                report.ignored_text_encoder
            );
        }
        if !report.unknown.is_empty() {
            return Err(Error::bad_file(path, format!(
                "{} UNet modules (e.g. {}) do not exist in this UNet; the file was made for another model family",
                report.unknown.len(),
                report.unknown[0]
            )));
        }
    }
    Ok(())
}

/// Noise, loss and loss weighting of every micro-batch, from the arguments.
fn loss_context<'a>(
    args: &TrainArgs,
    schedule: &'a NoiseSchedule,
    seed: u64,
    dtype: DType,
) -> Result<LossContext<'a>> {
    if args.recorded_noise.is_some() {
        let changes_noise = [
            ("--noise_offset", args.noise_offset.is_some()),
            (
                "--multires_noise_iterations",
                args.multires_noise_iterations.is_some(),
            ),
            ("--ip_noise_gamma", args.ip_noise_gamma.is_some()),
            ("--min_timestep", args.min_timestep.is_some()),
            ("--max_timestep", args.max_timestep.is_some()),
        ];
        if let Some((option, _)) = changes_noise.iter().find(|(_, given)| *given) {
            return Err(Error::Usage(format!(
                "{option} with --recorded_noise: the recorded noise and timesteps are final; record them from a run with {option} instead"
            )));
        }
    }
    Ok(LossContext {
        schedule,
        noise: NoiseOptions {
            noise_offset: args.noise_offset,
            noise_offset_random_strength: args.noise_offset_random_strength,
            adaptive_noise_scale: args.adaptive_noise_scale,
            multires_noise_iterations: args.multires_noise_iterations,
            multires_noise_discount: args.multires_noise_discount,
            min_timestep: args.min_timestep.unwrap_or(0),
            max_timestep: args.max_timestep.unwrap_or(schedule::TRAIN_TIMESTEPS),
            ip_noise_gamma: args.ip_noise_gamma,
            ip_noise_gamma_random_strength: args.ip_noise_gamma_random_strength,
        },
        loss: LossFunction::parse(
            &args.loss_type,
            &args.huber_schedule,
            args.huber_c,
            args.huber_scale,
        )?,
        weighting: LossWeighting {
            min_snr_gamma: args.min_snr_gamma,
            scale_v_pred_loss_like_noise_pred: args.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss: args.v_pred_like_loss,
            debiased_estimation: args.debiased_estimation_loss,
            v_prediction: args.v_parameterization,
        },
        seed,
        dtype,
        text: None,
        recorded: None,
    })
}

/// The training loop's inputs, borrowed from the prepared run.
struct Training<'a> {
    args: &'a TrainArgs,
    plan: &'a Plan,
    device: &'a Device,
    dataset: &'a CachedDataset,
    unet: &'a Unet,
    network: &'a Network,
    scheduler: &'a LrScheduler,
    loss_ctx: &'a LossContext<'a>,
    validation: Option<&'a Validation>,
    saver: &'a saving::Saver<'a>,
    /// `--sample_prompts`: the sample images made during the run.
    samples: Option<&'a samples::SampleImages>,
    log_path: &'a Path,
    /// `--log_with tensorboard`: every loss-log line also goes to an event file.
    tracker: Option<std::cell::RefCell<tensorboard::Tracker>>,
    /// The ranks training together; rank 0 validates, samples and saves.
    group: &'a dyn Collective,
}

impl Training<'_> {
    /// Whether this rank writes the run's files (and validates).
    fn is_main(&self) -> bool {
        collective::is_main(self.group)
    }

    /// Trains from `start` (a fresh run or a resumed state) to the planned number of steps;
    /// returns where it ended, with the whole loss log.
    fn run(&self, optimizer: &mut Optimizer, start: state::Progress) -> Result<state::Progress> {
        let (resume_epoch, resume_batches) = (start.epoch, start.batches_done_in_epoch);
        let mut at = start;
        interrupt::catch("train-lora").map_err(|e| Error::Model(format!("signal handler: {e}")))?;
        let progress = Progress::new("train-lora steps", self.plan.total_steps, self.args.quiet);
        progress.inc(at.global_step as u64);
        // sd-scripts samples `--sample_at_first` as point `e000000` at the start of every run,
        // a resumed one included (its step counter restarts at 0 there); the LoRA is the one
        // the run starts from.
        if let Some(samples) = self.samples {
            let epochs_done = resume_epoch.saturating_sub(1);
            samples.make_if_due(Some(0), 0, &progress, &|path| {
                self.saver.save_model_at(path, at.global_step, epochs_done)
            });
        }
        let (rank, world_size) = (self.group.rank(), self.group.world_size());
        for epoch in resume_epoch.max(1)..=self.plan.num_epochs {
            let batches =
                self.dataset
                    .epoch_batches(self.plan.seed, epoch, self.args.train_batch_size);
            let rounds = data_parallel::rank_batches(batches.len(), rank, world_size);
            let skip = if epoch == resume_epoch {
                resume_batches
            } else {
                0
            };
            let accum = self.args.gradient_accumulation_steps.max(1);
            let mut summed: Option<Vec<Option<Tensor>>> = None;
            let mut group_losses = Vec::new();
            for (round, &position) in rounds.iter().enumerate().skip(skip) {
                if at.global_step >= self.plan.total_steps {
                    // Resumed from the final state (killed before the LoRA was written).
                    progress.finish();
                    return Ok(at);
                }
                optimizer.prepare_forward()?;
                let vars = optimizer.vars();
                let (loss, grads) =
                    self.micro_batch(epoch, round, &batches[position], accum, &at, vars)?;
                match &mut summed {
                    None => summed = Some(grads),
                    Some(sum) => optim::accumulate(sum, grads)?,
                }
                group_losses.push(loss);
                let closes_group = (round + 1) % accum == 0 || round + 1 == rounds.len();
                let rate = self.scheduler.rate(at.global_step);
                let mut lr = rate.of(self.plan.lr);
                if closes_group {
                    let mut grads = summed.take().expect("gradients of this group");
                    data_parallel::reduce_step(self.group, vars, &mut grads, &mut group_losses)?;
                    let first_round = round + 1 - group_losses.len();
                    for (offset, &loss) in group_losses.iter().enumerate() {
                        at.loss_average.record(epoch, first_round + offset, loss);
                    }
                    optim::clip_grad_norm(&mut grads, self.args.max_grad_norm)?;
                    optimizer.step(&grads, self.plan.lr * rate.scale, rate.offset)?;
                    lr = optimizer.own_lr().unwrap_or(lr);
                }
                let max_norm = match self.args.scale_weight_norms {
                    // check_args refuses --scale_weight_norms for LyCORIS networks.
                    Some(limit) => match self.network {
                        Network::Lora(network) => Some(network.apply_max_norm(limit)?),
                        Network::Dylora(_) | Network::Lycoris(_) => None,
                    },
                    None => None,
                };
                if !closes_group {
                    continue;
                }
                at.global_step += 1;
                let step_loss = group_losses.iter().sum::<f32>() / group_losses.len() as f32;
                group_losses.clear();
                self.log_step(&mut at, epoch, step_loss, lr, max_norm)?;
                progress.set_status(format!(
                    "loss {step_loss:.4} avg {:.4} lr {lr:.2e}",
                    at.loss_average.value()
                ));
                progress.inc(1);
                self.sample_images(None, at.global_step, epoch - 1, &progress);
                if self.save_after_step(optimizer, &at, epoch, round)? {
                    // Last step: the end-of-epoch validation still runs.
                    break;
                }
                if data_parallel::any_rank(self.group, interrupt::requested())? {
                    progress.finish();
                    return Err(self.save_interrupted(optimizer, &at, epoch, round)?);
                }
            }
            self.end_epoch(optimizer, &mut at, epoch)?;
            self.sample_images(Some(epoch), at.global_step, epoch, &progress);
            if at.global_step >= self.plan.total_steps {
                break;
            }
        }
        progress.finish();
        Ok(at)
    }

    /// Sample images when `--sample_prompts` asks for them at this point (`epoch`: the epoch
    /// just ended, `None` inside one), from the network trained `steps` steps in `epochs_done`
    /// whole epochs.
    fn sample_images(
        &self,
        epoch: Option<usize>,
        steps: usize,
        epochs_done: usize,
        progress: &Progress,
    ) {
        if let Some(samples) = self.samples {
            samples.make_if_due(epoch, steps, progress, &|path| {
                self.saver.save_model_at(path, steps, epochs_done)
            });
        }
    }

    /// The loss of this rank's micro-batch of `round` and its gradients (divided by the
    /// accumulation steps and ranks, so the gradients of one step add up to their mean).
    fn micro_batch(
        &self,
        epoch: usize,
        round: usize,
        batch: &[usize],
        accum: usize,
        at: &state::Progress,
        vars: &[candle_core::Var],
    ) -> Result<(f32, Vec<Option<Tensor>>)> {
        let (rank, world_size) = (self.group.rank(), self.group.world_size());
        let rounds = self.plan.rounds_per_epoch;
        let micro_index = data_parallel::micro_index(epoch, round, rounds, rank, world_size);
        let seed = self.plan.seed;
        let draws = data::Draws {
            epoch,
            flip_seed: Some(NoiseRng::flip_stream(seed, micro_index)),
            variant_seed: Some(NoiseRng::variant_stream(seed, micro_index)),
            caption_dropout_seed: Some(NoiseRng::caption_dropout_stream(seed, micro_index)),
        };
        let collated = self.dataset.collate(batch, self.device, &draws)?;
        self.network
            .set_dropout_stream(Some(NoiseRng::dropout_stream(self.plan.seed, micro_index)));
        let loss = micro_batch_loss(self.unet, self.loss_ctx, &collated, micro_index)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            if self.is_main() {
                write_log(self.log_path, &at.log_lines)?;
            }
            let sources: Vec<String> = (batch.iter())
                .map(|&i| &self.dataset.samples[i])
                .map(|s| {
                    let (latents, text) = (s.latent_cache.display(), s.text_cache.display());
                    format!("{} ({latents}, {text})", s.key)
                })
                .collect();
            return Err(Error::Model(format!(
                "loss became {loss_value} at epoch {epoch}, step {} on the batch of {}; training stopped and the files saved so far are intact; check those caches (finite but out-of-range values also do this) or lower --learning_rate",
                at.global_step + 1,
                sources.join(", ")
            )));
        }
        let grads = recompute::backward(&(loss / (accum * world_size) as f64)?)?;
        Ok((loss_value, optim::collect_grads(&grads, vars)))
    }

    /// Appends the loss-log line of the step just taken (with validation when due).
    fn log_step(
        &self,
        at: &mut state::Progress,
        epoch: usize,
        step_loss: f32,
        lr: f64,
        max_norm: Option<crate::networks::lora::MaxNormReport>,
    ) -> Result<()> {
        let step = at.global_step;
        let average = at.loss_average.value();
        let mut line = serde_json::json!({"step": step, "epoch": epoch, "loss": step_loss, "loss_average": average, "lr": lr});
        let validate_now = self
            .args
            .validate_every_n_steps
            .is_some_and(|n| n > 0 && step % n == 0);
        if let Some(validation) = self.validation.filter(|_| validate_now && self.is_main()) {
            let value = validation.loss(self.unet, self.network, self.loss_ctx, self.device)?;
            line["validation_loss"] = value.into();
            line["validation_divergence"] = (value - average).into();
        }
        if let Some(report) = max_norm {
            line["keys_scaled"] = report.keys_scaled.into();
            line["average_key_norm"] = report.mean_norm.into();
            line["max_key_norm"] = report.max_norm.into();
        }
        self.record(at, line)?;
        tracing::debug!("step {step}: loss {step_loss:.5} (avg {average:.5}) lr {lr:e}");
        Ok(())
    }

    /// Appends a line to the loss log (and to TensorBoard with `--log_with tensorboard`).
    fn record(&self, at: &mut state::Progress, line: serde_json::Value) -> Result<()> {
        if let Some(tracker) = &self.tracker {
            tracker.borrow_mut().record(&line)?;
        }
        at.log_lines.push(line.to_string());
        Ok(())
    }

    /// Saves a step checkpoint when one is due, or the final state after the last step; true
    /// after the last step.
    fn save_after_step(
        &self,
        optimizer: &Optimizer,
        at: &state::Progress,
        epoch: usize,
        round: usize,
    ) -> Result<bool> {
        let step = at.global_step;
        if !self.is_main() {
            return Ok(step >= self.plan.total_steps);
        }
        // Built only when a state is saved: the log grows with every step.
        let position = || state::Progress {
            epoch,
            batches_done_in_epoch: round + 1,
            world_size: self.plan.world_size,
            global_step: step,
            log_lines: at.log_lines.clone(),
            loss_average: at.loss_average.clone(),
        };
        let due = self
            .args
            .save_every_n_steps
            .is_some_and(|n| n > 0 && step % n == 0);
        if due && step < self.plan.total_steps {
            let point = SavePoint::Step(step);
            self.saver
                .checkpoint(point, step, epoch - 1, optimizer, &position())?;
            write_log(self.log_path, &at.log_lines)?;
        }
        if step >= self.plan.total_steps {
            self.saver.final_state(optimizer, &position())?;
            return Ok(true);
        }
        Ok(false)
    }

    /// After an interrupt: saves the LoRA and a resumable state at the step just finished
    /// (`<name>-step<N>`), whatever `--save_state` says, and the loss log; returns the error
    /// that tells the user where they are and how to go on.
    fn save_interrupted(
        &self,
        optimizer: &Optimizer,
        at: &state::Progress,
        epoch: usize,
        round: usize,
    ) -> Result<Error> {
        let step = at.global_step;
        if !self.is_main() {
            return Ok(Error::Interrupted(format!(
                "rank {} stopped after step {step} with the others; rank 0 saved the state",
                self.group.rank()
            )));
        }
        let stem = self.saver.stem(SavePoint::Step(step));
        let model = self.saver.save_model(&stem, step, epoch - 1)?;
        let dir = self.args.output_dir.join(format!("{stem}-state"));
        let position = state::Progress {
            epoch,
            batches_done_in_epoch: round + 1,
            world_size: self.plan.world_size,
            global_step: step,
            log_lines: at.log_lines.clone(),
            loss_average: at.loss_average.clone(),
        };
        state::save(
            &dir,
            self.network,
            optimizer,
            &position,
            &self.saver.settings,
        )?;
        write_log(self.log_path, &at.log_lines)?;
        Ok(Error::Interrupted(format!(
            "interrupted after step {step} of {}: saved {} and the state {}; to go on, run the \
             same command with --resume {} (or --resume latest)",
            self.plan.total_steps,
            model.display(),
            dir.display(),
            dir.display()
        )))
    }

    /// End of an epoch: validation when due, and an epoch checkpoint when due.
    fn end_epoch(
        &self,
        optimizer: &Optimizer,
        at: &mut state::Progress,
        epoch: usize,
    ) -> Result<()> {
        if !self.is_main() {
            return Ok(());
        }
        let validate_epoch = self
            .args
            .validate_every_n_epochs
            .is_none_or(|n| n > 0 && epoch % n == 0);
        if let Some(tracker) = &self.tracker {
            let average = serde_json::json!({"step": at.global_step, "epoch_loss_average": at.loss_average.value()});
            tracker.borrow_mut().record(&average)?;
        }
        if let Some(validation) = self.validation.filter(|_| validate_epoch) {
            let value = validation.loss(self.unet, self.network, self.loss_ctx, self.device)?;
            let divergence = value - at.loss_average.value();
            let line = serde_json::json!({"step": at.global_step, "epoch": epoch, "epoch_validation_loss": value, "epoch_validation_divergence": divergence});
            self.record(at, line)?;
        }
        if let Some(n) = self.plan.save_every_n_epochs {
            if epoch % n == 0 && epoch < self.plan.num_epochs {
                let position = state::Progress {
                    epoch: epoch + 1,
                    batches_done_in_epoch: 0,
                    world_size: self.plan.world_size,
                    global_step: at.global_step,
                    log_lines: at.log_lines.clone(),
                    loss_average: at.loss_average.clone(),
                };
                let point = SavePoint::Epoch(epoch);
                self.saver
                    .checkpoint(point, at.global_step, epoch, optimizer, &position)?;
                write_log(self.log_path, &at.log_lines)?;
            }
        }
        Ok(())
    }
}

/// Writes the loss log, the loss plot and the manifest of the trained LoRA.
fn finish(
    args: &TrainArgs,
    setup: &Setup,
    end: &state::Progress,
    log_path: &Path,
    summary: Summary,
    started: Instant,
) -> Result<Summary> {
    let name = &setup.plan.name;
    write_log(log_path, &end.log_lines)?;
    let losses = logged_values(&end.log_lines, "loss");
    let plot_path = args.output_dir.join(format!("{name}_loss.png"));
    let averages = logged_values(&end.log_lines, "loss_average");
    fsio::write_atomic(&plot_path, &plot::loss_png(&losses, &averages, name)?)?;
    let mut manifest = Manifest::new(
        "train-lora",
        &setup.final_path,
        LORA_V1,
        serde_json::json!({ "training_key": setup.training_key, "arguments": format!("{args:?}") }),
    );
    manifest.add_input_file("in_json", &args.in_json)?;
    manifest.items = setup.sample_keys.clone();
    manifest.summary = summary.clone();
    manifest.write_for(&setup.final_path)?;
    let first = losses.first().copied().unwrap_or(f32::NAN);
    let last = losses.last().copied().unwrap_or(f32::NAN);
    tracing::info!(
        "{} steps in {:.1} s; loss {first:.4} -> {last:.4}; wrote {}",
        end.global_step,
        started.elapsed().as_secs_f64(),
        setup.final_path.display()
    );
    Ok(summary)
}

/// Reports what `--network_weights --dim_from_weights` loaded from a DyLoRA or LyCORIS file.
fn log_modules_loaded(path: &Path, kind: &str, loaded: usize, unknown: &[String]) {
    tracing::info!("{}: {loaded} {kind} modules loaded", path.display());
    if let Some(first) = unknown.first() {
        tracing::warn!(
            "{}: {} modules (e.g. {first}) have no layer in the trained models",
            path.display(),
            unknown.len()
        );
    }
}

/// Reports what `--network_weights` contributed.
fn log_loaded(path: &Path, report: &crate::networks::lora::LoadReport, live: bool) {
    tracing::info!(
        "{}: {} modules loaded, {} text-encoder modules ignored{}",
        path.display(),
        report.applied,
        report.ignored_text_encoder,
        if live {
            ""
        } else {
            " (--network_train_unet_only)"
        }
    );
    if !report.unknown.is_empty() {
        tracing::warn!(
            "{}: {} UNet modules (e.g. {}) have no layer in this UNet",
            path.display(),
            report.unknown.len(),
            report.unknown[0]
        );
    }
}

/// Content key of a training run: every argument, the UNet weights, the starting network
/// weights and every cached sample (`sample_keys`: metadata key → [`sample_key`]). The same key
/// means the same LoRA would be trained again.
fn training_key(
    args: &TrainArgs,
    checkpoint: &Checkpoint,
    sample_keys: &std::collections::BTreeMap<String, String>,
    text: Option<&live_text::LiveText>,
    world_size: usize,
) -> Result<String> {
    let mut key = crate::infra::hashing::KeyBuilder::new("train-lora", 1);
    // Several ranks train other batches per step than one process does.
    if world_size > 1 {
        key.text("world_size", &world_size.to_string());
    }
    let mut relevant = args.clone();
    relevant.quiet = false;
    relevant.settings = Default::default();
    relevant.notices = Vec::new();
    relevant.compat = Default::default();
    // Checkpointing changes memory and time, not what is trained.
    (
        relevant.gradient_checkpointing,
        relevant.gradient_checkpointing_levels,
    ) = (false, None);
    // Where the run logs does not change what it trains.
    (relevant.log_with, relevant.logging_dir, relevant.log_prefix) = (None, None, None);
    key.text("arguments", &format!("{relevant:?}"));
    key.text("unet", &checkpoint.component_hash(Component::Unet)?);
    if let Some(text) = text {
        let encoder = &text.encoder;
        key.text("text_encoder", &encoder.encoders.weights_hash);
        for tokenizer in &encoder.tokenizers {
            key.text("tokenizer", tokenizer.files_hash());
        }
        key.text(
            "text_settings",
            &format!("{} {}", encoder.clip_skip, encoder.max_len.tokens()),
        );
    }
    if let Some(path) = &args.network_weights {
        key.text("network_weights", &crate::infra::hashing::hash_file(path)?);
    }
    for path in &args.base_weights {
        key.text("base_weights", &crate::infra::hashing::hash_file(path)?);
    }
    for (item, sample) in sample_keys {
        key.text("item", item).text("sample", sample);
    }
    Ok(key.finish())
}

/// The encoded empty caption cache-text-encoder stored beside its index (caption dropout); it
/// must have the shape of the samples' contexts.
fn empty_caption(
    args: &TrainArgs,
    dataset: &CachedDataset,
    family: ModelFamily,
) -> Result<data::EncodedCaption> {
    let path = crate::stages::cache_text_encoder::empty_caption_path(&args.in_json, None);
    if !path.is_file() {
        return Err(Error::Usage(format!(
            "caption dropout (caption_dropout_rate / caption_dropout_every_n_epochs) trains on \
             the encoded empty caption, and {} does not exist; run cache-text-encoder on {} (it \
             stores the empty caption beside its index)",
            path.display(),
            args.in_json.display()
        )));
    }
    let cache_family = match family {
        ModelFamily::Sdxl => ModelFamily::Sdxl,
        _ => ModelFamily::Sd1,
    };
    let spec = crate::formats::te_cache::TeCacheSpec::any(cache_family);
    let cached = crate::formats::te_cache::read_cache_file(&path, &spec, &Device::Cpu)?;
    let empty = data::EncodedCaption::from_arrays(&cached.arrays)?;
    let expected = dataset.samples[0].context.dims();
    if empty.context.dims() != expected {
        return Err(Error::bad_file(
            &path,
            format!(
                "holds an empty caption of shape {:?}, the captions are {expected:?}; re-run \
                 cache-text-encoder with the settings of the captions' caches",
                empty.context.dims()
            ),
        ));
    }
    Ok(empty)
}

/// Caption augmentation trains on the caption variants cache-text-encoder stored: every entry
/// needs them, and the index of the caches (when it is beside the metadata) must record the same
/// augmentation settings as this command line.
fn check_caption_variants(args: &TrainArgs, dataset: &CachedDataset) -> Result<()> {
    let remedy = format!(
        "run cache-text-encoder on {} with{}{}{} --variants N (8 is a good start)",
        args.in_json.display(),
        if args.shuffle_caption {
            " --shuffle_caption"
        } else {
            ""
        },
        args.keep_tokens
            .map_or(String::new(), |n| format!(" --keep_tokens {n}")),
        args.caption_tag_dropout_rate
            .map_or(String::new(), |r| format!(
                " --caption_tag_dropout_rate {r}"
            )),
    );
    let without: Vec<&Path> = (dataset.samples.iter())
        .filter(|s| s.context_variants.is_none())
        .map(|s| s.text_cache.as_path())
        .collect();
    if let Some(first) = without.first() {
        return Err(Error::Usage(format!(
            "--shuffle_caption / --keep_tokens / --caption_tag_dropout_rate train each step on \
             one of the caption variants cached per entry, and {} of {} text-encoder caches hold \
             none (e.g. {}); {remedy}",
            without.len(),
            dataset.samples.len(),
            first.display()
        )));
    }
    let index = crate::stages::cache_text_encoder::index_path(
        &args.in_json,
        None,
        crate::dataset::shard::Shard::ALL,
    );
    let Ok(document) = crate::infra::pyjson::read_document(&index) else {
        tracing::warn!(
            "no text-encoder cache index at {}: cannot check that the caption variants were made \
             with --shuffle_caption {} --keep_tokens {} --caption_tag_dropout_rate {}",
            index.display(),
            args.shuffle_caption,
            args.keep_tokens.unwrap_or(0),
            args.caption_tag_dropout_rate.unwrap_or(0.0)
        );
        return Ok(());
    };
    let made = &document["parameters"];
    let differs = [
        (
            made["shuffle_caption"].as_bool() != Some(args.shuffle_caption),
            "--shuffle_caption",
            made["shuffle_caption"].to_string(),
        ),
        (
            made["keep_tokens"].as_u64() != Some(args.keep_tokens.unwrap_or(0) as u64),
            "--keep_tokens",
            made["keep_tokens"].to_string(),
        ),
        (
            made["caption_tag_dropout_rate"].as_f64()
                != Some(args.caption_tag_dropout_rate.unwrap_or(0.0)),
            "--caption_tag_dropout_rate",
            made["caption_tag_dropout_rate"].to_string(),
        ),
    ];
    let named: Vec<String> = differs
        .iter()
        .filter(|(differs, _, _)| *differs)
        .map(|(_, flag, made)| format!("{flag} (the variants were made with {made})"))
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "the caption variants in the caches of {} were made with other settings: {}; {remedy}, \
         or give train-lora the settings they were made with",
        args.in_json.display(),
        named.join(", ")
    )))
}

/// With a `--dataset_config`, each subset that shuffles or drops tags trains on caption variants
/// cache-text-encoder made with that subset's settings (it reads them from the metadata): every
/// entry of such a subset needs them.
fn check_subset_caption_variants(args: &TrainArgs, dataset: &CachedDataset) -> Result<()> {
    let without: Vec<&Path> = (dataset.samples.iter())
        .filter(|s| s.augment.caption_variants && s.context_variants.is_none())
        .map(|s| s.text_cache.as_path())
        .collect();
    match without.first() {
        None => Ok(()),
        Some(first) => Err(Error::Usage(format!(
            "subsets of the dataset config set shuffle_caption or caption_tag_dropout_rate, and \
             {} of their text-encoder caches hold no caption variants (e.g. {}); run \
             cache-text-encoder on {} with --variants N (8 is a good start): it takes each \
             subset's settings from the metadata",
            without.len(),
            first.display(),
            args.in_json.display()
        ))),
    }
}

/// Content key of one cached sample: its metadata key, latents, text-encoder states and (SDXL)
/// size conditioning.
fn sample_key(sample: &data::Sample) -> Result<String> {
    let mut key = crate::infra::hashing::KeyBuilder::new("train-sample", 1);
    key.text("key", &sample.key);
    if let Some(caption) = &sample.caption {
        key.text("caption", caption);
    }
    if sample.pool2.is_some() {
        key.text("sizes", &format!("{:?}", sample.size_values(false)?));
    }
    for tensor in [&sample.latents, &sample.context]
        .into_iter()
        .chain(&sample.pool2)
        .chain(&sample.mask)
        .chain(&sample.context_variants)
    {
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        key.text("shape", &format!("{:?}", tensor.dims()));
        key.field("data", &bytes);
    }
    Ok(key.finish())
}

/// True when `lora` exists and its manifest records `training_key`.
fn is_up_to_date(lora: &Path, training_key: &str) -> bool {
    lora.is_file()
        && Manifest::read_for(lora).ok().flatten().is_some_and(|m| {
            m.output_schema == LORA_V1
                && m.parameters["training_key"].as_str() == Some(training_key)
                && m.output_blake3.as_deref()
                    == crate::infra::hashing::hash_file(lora).ok().as_deref()
        })
}

fn check_args(args: &TrainArgs) -> Result<()> {
    let module = args.network_module.as_str();
    let known = [
        "networks.lora",
        network_args::DYLORA_MODULE,
        network_args::LYCORIS_MODULE,
    ];
    if !known.contains(&module) {
        return Err(Error::Usage(format!(
            "--network_module {module}: not supported; networks.lora (LoRA, LoCon as C3Lier), \
             networks.dylora (DyLoRA) and lycoris.kohya (algo=locon|loha|lokr) are"
        )));
    }
    if module != "networks.lora" && args.scale_weight_norms.is_some() {
        return Err(Error::Usage(format!(
            "--scale_weight_norms is not supported with {module}; it works with networks.lora"
        )));
    }
    if args.save_model_as != "safetensors" {
        return Err(Error::Usage(format!(
            "--save_model_as {}: only safetensors is written",
            args.save_model_as
        )));
    }
    if !(0.0..1.0).contains(&args.validation_split) {
        return Err(Error::Usage(format!(
            "--validation_split {}: must be at least 0 and below 1",
            args.validation_split
        )));
    }
    if args.train_batch_size == 0 || args.gradient_accumulation_steps == 0 {
        return Err(Error::Usage(
            "--train_batch_size and --gradient_accumulation_steps must be at least 1".into(),
        ));
    }
    // Zero steps only make sense to write loaded --network_weights back (e.g. re-saved).
    let steps = args.max_train_epochs.unwrap_or(args.max_train_steps);
    if steps == 0 && args.network_weights.is_none() {
        return Err(Error::Usage(
            "--max_train_steps/--max_train_epochs 0 trains nothing (an existing LoRA is kept): \
             give at least 1, or --network_weights to write loaded weights back"
                .into(),
        ));
    }
    if args.network_dim == Some(0) {
        return Err(Error::Usage(
            "--network_dim 0 gives a LoRA without modules: give a rank of at least 1".into(),
        ));
    }
    let unbounded = f64::INFINITY;
    for (flag, value, most) in [
        ("--learning_rate", Some(args.learning_rate), unbounded),
        ("--unet_lr", args.unet_lr, unbounded),
        (
            "--text_encoder_lr",
            args.text_encoder_lr.first().copied(),
            unbounded,
        ),
        (
            "--network_alpha",
            args.network_alpha.map(f64::from),
            unbounded,
        ),
        (
            "--network_dropout",
            args.network_dropout.map(f64::from),
            1.0,
        ),
        ("--max_grad_norm", Some(args.max_grad_norm), unbounded),
        (
            "--prior_loss_weight",
            Some(args.prior_loss_weight),
            unbounded,
        ),
        (
            "--caption_tag_dropout_rate",
            args.caption_tag_dropout_rate,
            1.0,
        ),
        ("--caption_dropout_rate", args.caption_dropout_rate, 1.0),
        (
            "--lr_scheduler_num_cycles",
            Some(args.lr_scheduler_num_cycles),
            unbounded,
        ),
        (
            "--lr_scheduler_power",
            Some(args.lr_scheduler_power),
            unbounded,
        ),
        (
            "--lr_scheduler_min_lr_ratio",
            args.lr_scheduler_min_lr_ratio,
            1.0,
        ),
        ("--noise_offset", args.noise_offset, 1.0),
        (
            "--multires_noise_discount",
            Some(args.multires_noise_discount),
            1.0,
        ),
        (
            "--min_snr_gamma",
            args.min_snr_gamma.map(f64::from),
            unbounded,
        ),
        (
            "--v_pred_like_loss",
            args.v_pred_like_loss.map(f64::from),
            unbounded,
        ),
        ("--ip_noise_gamma", args.ip_noise_gamma, 1.0),
        ("--huber_c", Some(args.huber_c), 1.0),
        ("--huber_scale", Some(args.huber_scale), unbounded),
        ("--scale_weight_norms", args.scale_weight_norms, unbounded),
    ] {
        if let Some(value) = value.filter(|v| !(v.is_finite() && (0.0..=most).contains(v))) {
            let range = match most {
                most if most.is_finite() => format!("from 0 to {most}"),
                _ => "a finite number of at least 0".into(),
            };
            return Err(Error::Usage(format!("{flag} {value}: give {range}")));
        }
    }
    if let Some(scale) = args.adaptive_noise_scale.filter(|v| !v.is_finite()) {
        return Err(Error::Usage(format!(
            "--adaptive_noise_scale {scale}: give a finite number"
        )));
    }
    if let Some(name) = &args.output_name {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains(['/', '\\'])
            && !name.starts_with('.');
        if !plain {
            return Err(Error::Usage(format!(
                "--output_name {name:?}: give a plain file name (no folder, not hidden); \
                 choose the folder with --output_dir"
            )));
        }
    }
    tensorboard::run_dir(args)?;
    if args.adaptive_noise_scale.is_some() && args.noise_offset.is_none() {
        return Err(Error::Usage(
            "--adaptive_noise_scale requires --noise_offset".into(),
        ));
    }
    if args.scale_v_pred_loss_like_noise_pred && !args.v_parameterization {
        return Err(Error::Usage(
            "--scale_v_pred_loss_like_noise_pred requires --v_parameterization".into(),
        ));
    }
    if args.v_pred_like_loss.is_some() && args.v_parameterization {
        return Err(Error::Usage(
            "--v_pred_like_loss cannot be used with --v_parameterization".into(),
        ));
    }
    Ok(())
}

/// Checks that the LoRA and the loss log can be written, so a read-only folder or a folder in
/// the LoRA's place is refused before training, not after. A missing `--output_dir` is not
/// created yet (a run that fails leaves nothing behind): its nearest existing parent is checked.
fn check_outputs_writable(args: &TrainArgs) -> Result<()> {
    let name = args.output_name.as_deref().unwrap_or(DEFAULT_OUTPUT_NAME);
    let lora = args.output_dir.join(format!("{name}.safetensors"));
    let existing = (args.output_dir.ancestors())
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())
        .unwrap_or(Path::new("."));
    if existing == args.output_dir {
        fsio::check_writable(&lora)?;
    } else if existing.is_dir() {
        fsio::check_writable(&existing.join(format!("{name}.safetensors")))?;
    } else {
        return Err(Error::bad_file(
            existing,
            "is a file: --output_dir cannot be created below it",
        ));
    }
    if let Some(log) = &args.loss_log {
        fsio::check_writable(log)?;
    }
    Ok(())
}

/// Refuses, before allocating it, a network whose weights, gradients and optimizer state
/// would not fit in the memory available (a `--network_dim 100000` typo, say).
fn check_network_fits(
    unet: &mut Unet,
    lora: &crate::networks::lora::LoraConfig,
    optimizer: &OptimizerKind,
) -> Result<()> {
    let values = LoraNetwork::parameter_count(unet, lora) as u64;
    let bytes = (values.saturating_mul(8)).saturating_add(optimizer.state_bytes(values as usize));
    match memory::available_bytes() {
        Some(available) if bytes > available => Err(Error::Usage(format!(
            "--network_dim {} (--conv_dim {}): the LoRA would have {values} trainable values, \
             {} with gradients and optimizer state, more than the {} of memory available; \
             give a lower rank",
            lora.network_dim,
            lora.conv_dim.map_or("none".into(), |d| d.to_string()),
            memory::gib(bytes),
            memory::gib(available),
        ))),
        _ => Ok(()),
    }
}

fn plan(args: &TrainArgs, dataset: &CachedDataset, seed: u64, world_size: usize) -> Plan {
    let batches_per_epoch = dataset.batches_per_epoch(args.train_batch_size);
    let rounds_per_epoch = data_parallel::rounds(batches_per_epoch, world_size);
    let steps_per_epoch = rounds_per_epoch
        .div_ceil(args.gradient_accumulation_steps.max(1))
        .max(1);
    let total_steps = match args.max_train_epochs {
        Some(e) => e * steps_per_epoch,
        None => args.max_train_steps,
    };
    let num_epochs = total_steps.div_ceil(steps_per_epoch);
    Plan {
        name: (args.output_name.clone()).unwrap_or_else(|| DEFAULT_OUTPUT_NAME.into()),
        total_steps,
        num_epochs,
        rounds_per_epoch,
        seed,
        world_size,
        lr: args.unet_lr.unwrap_or(args.learning_rate),
        save_every_n_epochs: match args.save_n_epoch_ratio {
            Some(ratio) if ratio > 0 => Some((num_epochs / ratio).max(1)),
            _ => args.save_every_n_epochs.filter(|&n| n > 0),
        },
    }
}

fn plan_info(plan: &Plan, validation_images: usize) -> metadata::PlanInfo {
    metadata::PlanInfo {
        total_steps: plan.total_steps,
        num_epochs: plan.num_epochs,
        batches_per_epoch: plan.rounds_per_epoch,
        world_size: plan.world_size,
        seed: plan.seed,
        validation_images,
    }
}

/// The values of `key` in the loss log's JSON lines that have it (written from `f32`, so read
/// back exactly).
fn logged_values(lines: &[String], key: &str) -> Vec<f32> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|value| value[key].as_f64().map(|l| l as f32))
        .collect()
}

fn write_log(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    fsio::write_atomic(path, text.as_bytes())
}

/// Seconds since the Unix epoch.
fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}
