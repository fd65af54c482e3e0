//! The `ss_*` / `modelspec.*` header metadata sd-scripts writes into a LoRA file (see
//! docs/kohya-compat.md#lora-file-metadata), as far as it applies to cache-based UNet-only
//! training.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::formats::model_family::ModelFamily;
use crate::infra::pyjson::float_repr;
use crate::stages::train_lora::args::TrainArgs;
use crate::stages::train_lora::data::CachedDataset;
use crate::stages::train_lora::optim::OptimizerKind;
use crate::Result;

/// Step/epoch plan values recorded in the metadata.
#[derive(Debug, Clone, Copy)]
pub struct PlanInfo {
    /// `max_train_steps` after the epoch override.
    pub total_steps: usize,
    /// Computed number of epochs.
    pub num_epochs: usize,
    /// Batches per epoch and rank (sd-scripts: the prepared data loader's length).
    pub batches_per_epoch: usize,
    /// Ranks training together (accelerate's `num_processes`).
    pub world_size: usize,
    /// Seed used.
    pub seed: u64,
    /// Images held out for validation.
    pub validation_images: usize,
}

fn py_opt_f64(x: Option<f64>) -> String {
    x.map(float_repr).unwrap_or_else(|| "None".into())
}

fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}

/// sd-webui "old" model hash: SHA-256 of the 64 KiB at 0x100000, first 8 hex characters.
pub fn legacy_model_hash(path: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut buf = Vec::with_capacity(0x10000);
    file.seek(SeekFrom::Start(0x100000))
        .map_err(|e| crate::Error::io(path, e))?;
    file.take(0x10000)
        .read_to_end(&mut buf)
        .map_err(|e| crate::Error::io(path, e))?;
    Ok(crate::networks::lora::sha256_hex(&buf)[..8].to_string())
}

/// SHA-256 of a whole file.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| crate::Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Metadata shared by every file of a run (per-save keys are added by the caller).
pub fn base_metadata(
    args: &TrainArgs,
    dataset: &CachedDataset,
    plan: &PlanInfo,
    started_unix: f64,
    optimizer: &OptimizerKind,
    family: ModelFamily,
) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    let base_version = match (family, args.v_parameterization) {
        (ModelFamily::Sd1, false) => "sd_v1",
        (ModelFamily::Sd1, true) => "sd_v1_v",
        (ModelFamily::Sd2, false) => "sd_v2",
        (ModelFamily::Sd2, true) => "sd_v2_v",
        // sdxl_train_network.py records its model version, v-prediction or not.
        (ModelFamily::Sdxl, _) => "sdxl_base_v1-0",
    };
    let alpha = match args.network_alpha {
        Some(a) => float_repr(a as f64),
        None => "1".into(),
    };
    let network_args = if args.network_args.is_empty() {
        None
    } else {
        let mut map = serde_json::Map::new();
        for arg in &args.network_args {
            if let Some((k, v)) = arg.split_once('=') {
                map.insert(k.trim().into(), json!(v.trim()));
            }
        }
        // The trainer adds `--network_dropout` under "dropout" unless given
        // (docs/kohya-compat.md#network-arguments).
        if !map.contains_key("dropout") {
            map.insert("dropout".into(), json!(args.network_dropout));
        }
        Some(crate::infra::pyjson::dumps(&serde_json::Value::Object(map)))
    };
    let put = |m: &mut BTreeMap<String, String>, k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put(&mut m, "ss_v2", py_bool(args.v2));
    put(&mut m, "ss_base_model_version", base_version.into());
    put(&mut m, "ss_network_module", args.network_module.clone());
    put(
        &mut m,
        "ss_network_dim",
        args.network_dim
            .map(|d| d.to_string())
            .unwrap_or_else(|| "None".into()),
    );
    put(&mut m, "ss_network_alpha", alpha);
    if let Some(na) = network_args {
        put(&mut m, "ss_network_args", na);
    }
    let buckets = bucket_settings(args, dataset)?;
    let (width, height) = buckets.resolution;
    let arch = match (family, args.v_parameterization) {
        (ModelFamily::Sd1, _) => "stable-diffusion-v1/lora",
        (ModelFamily::Sd2, false) => "stable-diffusion-v2-512/lora",
        (ModelFamily::Sd2, true) => "stable-diffusion-v2-768-v/lora",
        (ModelFamily::Sdxl, _) => "stable-diffusion-xl-v1-base/lora",
    };
    // sd-scripts' modelspec names the SGM code base as the implementation of SDXL LoRAs.
    let implementation = match family {
        ModelFamily::Sdxl => "https://github.com/Stability-AI/generative-models",
        _ => "diffusers",
    };
    put(&mut m, "modelspec.sai_model_spec", "1.0.1".into());
    put(&mut m, "modelspec.architecture", arch.into());
    put(&mut m, "modelspec.implementation", implementation.into());
    put(
        &mut m,
        "modelspec.title",
        args.metadata_title
            .clone()
            .or_else(|| args.output_name.clone())
            .unwrap_or_else(|| format!("LoRA@{}", float_repr(started_unix))),
    );
    for (key, value) in [
        ("author", &args.metadata_author),
        ("description", &args.metadata_description),
        ("license", &args.metadata_license),
        ("tags", &args.metadata_tags),
        ("usage_hint", &args.metadata_usage_hint),
        ("thumbnail", &args.metadata_thumbnail),
        ("merged_from", &args.metadata_merged_from),
        ("trigger_phrase", &args.metadata_trigger_phrase),
        ("preprocessor", &args.metadata_preprocessor),
        (
            "is_negative_embedding",
            &args.metadata_is_negative_embedding,
        ),
    ] {
        if let Some(value) = value {
            put(&mut m, &format!("modelspec.{key}"), value.clone());
        }
    }
    // A --dataset_config run records the command line's --resolution, or the family's
    // default, as sd-scripts' model spec does.
    let spec_resolution = match (&dataset.config, &args.compat.resolution) {
        (None, _) => format!("{width}x{height}"),
        (Some(_), Some(given)) => {
            let (w, h) = crate::dataset::bucket::parse_resolution(given)?;
            format!("{w}x{h}")
        }
        (Some(_), None) => match (family, args.v2 && args.v_parameterization) {
            (ModelFamily::Sdxl, _) => "1024x1024".into(),
            (_, true) => "768x768".into(),
            _ => "512x512".into(),
        },
    };
    put(&mut m, "modelspec.resolution", spec_resolution);
    put(
        &mut m,
        "modelspec.prediction_type",
        if args.v_parameterization {
            "v"
        } else {
            "epsilon"
        }
        .into(),
    );
    put(
        &mut m,
        "modelspec.implementation_version",
        format!("lorakit/{}", env!("CARGO_PKG_VERSION")),
    );
    put(&mut m, "modelspec.date", iso_date(started_unix));
    if args.min_timestep.is_some() || args.max_timestep.is_some() {
        put(
            &mut m,
            "modelspec.timestep_range",
            format!(
                "{},{}",
                args.min_timestep.unwrap_or(0),
                args.max_timestep.unwrap_or(1000)
            ),
        );
    }
    if args.no_metadata {
        return Ok(m);
    }
    let accum = args.gradient_accumulation_steps;
    put(&mut m, "ss_session_id", (rand::random::<u32>()).to_string());
    put(&mut m, "ss_training_started_at", float_repr(started_unix));
    put(
        &mut m,
        "ss_output_name",
        args.output_name.clone().unwrap_or_else(|| "None".into()),
    );
    // Adafactor with relative_step: sd-scripts drops the learning rates and names the
    // scheduler `adafactor:<lr>`.
    let own_lr = optimizer.sets_own_lr();
    let learning_rate = (!own_lr).then_some(args.learning_rate);
    put(&mut m, "ss_learning_rate", py_opt_f64(learning_rate));
    // sd-scripts records the first --text_encoder_lr value (networks.lora has no per-encoder
    // rates), also when --network_train_unet_only leaves the text encoder untrained.
    put(
        &mut m,
        "ss_text_encoder_lr",
        py_opt_f64(args.text_encoder_lr.first().copied().filter(|_| !own_lr)),
    );
    put(
        &mut m,
        "ss_unet_lr",
        py_opt_f64(args.unet_lr.filter(|_| !own_lr)),
    );
    put(
        &mut m,
        "ss_num_train_images",
        dataset.num_train_images().to_string(),
    );
    put(
        &mut m,
        "ss_num_validation_images",
        plan.validation_images.to_string(),
    );
    put(
        &mut m,
        "ss_num_reg_images",
        dataset.num_reg_images().to_string(),
    );
    put(
        &mut m,
        "ss_num_batches_per_epoch",
        plan.batches_per_epoch.to_string(),
    );
    put(&mut m, "ss_num_epochs", plan.num_epochs.to_string());
    put(
        &mut m,
        "ss_gradient_checkpointing",
        py_bool(args.gradient_checkpointing),
    );
    put(&mut m, "ss_gradient_accumulation_steps", accum.to_string());
    put(&mut m, "ss_max_train_steps", plan.total_steps.to_string());
    put(&mut m, "ss_lr_warmup_steps", args.lr_warmup_steps.clone());
    let scheduler = if own_lr {
        format!("adafactor:{}", float_repr(args.learning_rate))
    } else {
        args.lr_scheduler.clone()
    };
    put(&mut m, "ss_lr_scheduler", scheduler);
    let dropout = args
        .network_dropout
        .map_or("None".into(), |p| p.to_string());
    put(&mut m, "ss_network_dropout", dropout);
    put(&mut m, "ss_mixed_precision", args.mixed_precision.clone());
    put(&mut m, "ss_full_fp16", py_bool(args.full_fp16));
    put(&mut m, "ss_clip_skip", "None".into());
    put(&mut m, "ss_max_token_length", "None".into());
    put(&mut m, "ss_cache_latents", "True".into());
    put(&mut m, "ss_seed", plan.seed.to_string());
    put(&mut m, "ss_lowram", "False".into());
    put(&mut m, "ss_noise_offset", py_opt_f64(args.noise_offset));
    put(
        &mut m,
        "ss_multires_noise_iterations",
        args.multires_noise_iterations
            .map(|v| v.to_string())
            .unwrap_or_else(|| "None".into()),
    );
    put(
        &mut m,
        "ss_multires_noise_discount",
        float_repr(args.multires_noise_discount),
    );
    put(
        &mut m,
        "ss_adaptive_noise_scale",
        py_opt_f64(args.adaptive_noise_scale),
    );
    put(
        &mut m,
        "ss_zero_terminal_snr",
        py_bool(args.zero_terminal_snr),
    );
    put(
        &mut m,
        "ss_training_comment",
        args.training_comment
            .clone()
            .unwrap_or_else(|| "None".into()),
    );
    put(&mut m, "ss_sd_scripts_commit_hash", "(unknown)".into());
    put(&mut m, "ss_optimizer", optimizer.description());
    put(&mut m, "ss_max_grad_norm", float_repr(args.max_grad_norm));
    put(
        &mut m,
        "ss_caption_dropout_rate",
        float_repr(args.caption_dropout_rate.unwrap_or(0.0)),
    );
    put(
        &mut m,
        "ss_caption_dropout_every_n_epochs",
        args.caption_dropout_every_n_epochs.unwrap_or(0).to_string(),
    );
    put(
        &mut m,
        "ss_caption_tag_dropout_rate",
        float_repr(args.caption_tag_dropout_rate.unwrap_or(0.0)),
    );
    put(&mut m, "ss_face_crop_aug_range", "None".into());
    put(
        &mut m,
        "ss_prior_loss_weight",
        float_repr(args.prior_loss_weight),
    );
    put(
        &mut m,
        "ss_min_snr_gamma",
        py_opt_f64(args.min_snr_gamma.map(f64::from)),
    );
    put(
        &mut m,
        "ss_scale_weight_norms",
        py_opt_f64(args.scale_weight_norms),
    );
    put(&mut m, "ss_ip_noise_gamma", py_opt_f64(args.ip_noise_gamma));
    put(
        &mut m,
        "ss_ip_noise_gamma_random_strength",
        py_bool(args.ip_noise_gamma_random_strength),
    );
    put(
        &mut m,
        "ss_noise_offset_random_strength",
        py_bool(args.noise_offset_random_strength),
    );
    put(
        &mut m,
        "ss_debiased_estimation",
        py_bool(args.debiased_estimation_loss),
    );
    put(&mut m, "ss_loss_type", args.loss_type.clone());
    put(&mut m, "ss_huber_schedule", args.huber_schedule.clone());
    put(&mut m, "ss_huber_scale", float_repr(args.huber_scale));
    put(&mut m, "ss_huber_c", float_repr(args.huber_c));
    put(&mut m, "ss_fp8_base", py_bool(args.fp8_base));
    put(&mut m, "ss_fp8_base_unet", py_bool(args.fp8_base_unet));
    let py_opt_int = |v: Option<usize>| v.map_or("None".into(), |v| v.to_string());
    put(
        &mut m,
        "ss_validation_seed",
        args.validation_seed
            .map_or("None".into(), |v| v.to_string()),
    );
    put(
        &mut m,
        "ss_validation_split",
        float_repr(args.validation_split),
    );
    put(
        &mut m,
        "ss_max_validation_steps",
        py_opt_int(args.max_validation_steps),
    );
    put(
        &mut m,
        "ss_validate_every_n_epochs",
        py_opt_int(args.validate_every_n_epochs),
    );
    put(
        &mut m,
        "ss_validate_every_n_steps",
        py_opt_int(args.validate_every_n_steps),
    );
    put(&mut m, "ss_resize_interpolation", "None".into());
    match &dataset.config {
        // sd-scripts records a --dataset_config run's datasets as one JSON document.
        Some(config) => put(
            &mut m,
            "ss_datasets",
            crate::infra::pyjson::dumps(&config.sd_scripts_datasets),
        ),
        None => {
            put(
                &mut m,
                "ss_batch_size_per_device",
                args.train_batch_size.to_string(),
            );
            put(
                &mut m,
                "ss_total_batch_size",
                (args.train_batch_size * plan.world_size * accum).to_string(),
            );
            put(&mut m, "ss_resolution", format!("({width}, {height})"));
            put(&mut m, "ss_color_aug", "False".into());
            put(&mut m, "ss_flip_aug", py_bool(args.flip_aug));
            put(&mut m, "ss_random_crop", "False".into());
            put(&mut m, "ss_shuffle_caption", py_bool(args.shuffle_caption));
            put(
                &mut m,
                "ss_keep_tokens",
                args.keep_tokens.unwrap_or(0).to_string(),
            );
            put(&mut m, "ss_enable_bucket", "True".into());
            put(&mut m, "ss_bucket_no_upscale", py_bool(buckets.no_upscale));
            put(
                &mut m,
                "ss_min_bucket_reso",
                buckets.min_bucket_reso.to_string(),
            );
            put(
                &mut m,
                "ss_max_bucket_reso",
                buckets.max_bucket_reso.to_string(),
            );
            put(
                &mut m,
                "ss_reg_dataset_dirs",
                crate::infra::pyjson::dumps(&dataset.dirs.reg_dataset_dirs),
            );
            let bucket_counts: serde_json::Map<String, serde_json::Value> = dataset
                .buckets
                .iter()
                .enumerate()
                .map(|(i, (&(w, h), members))| {
                    (
                        i.to_string(),
                        json!({"resolution": [w, h], "count": dataset.bucket_len(members)}),
                    )
                })
                .collect();
            put(
                &mut m,
                "ss_bucket_info",
                crate::infra::pyjson::dumps(
                    &json!({"buckets": bucket_counts, "mean_img_ar_error": mean_aspect_error(dataset)?}),
                ),
            );
        }
    }
    let dirs = &dataset.dirs;
    put(
        &mut m,
        "ss_dataset_dirs",
        crate::infra::pyjson::dumps(&dirs.dataset_dirs),
    );
    put(
        &mut m,
        "ss_tag_frequency",
        crate::infra::pyjson::dumps(&dirs.tag_frequency),
    );
    let model = &args.pretrained_model_name_or_path;
    put(
        &mut m,
        "ss_sd_model_name",
        model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    put(&mut m, "ss_sd_model_hash", legacy_model_hash(model)?);
    put(&mut m, "ss_new_sd_model_hash", file_sha256(model)?);
    Ok(m)
}

/// The resolution and bucket settings the latent caches were made with, as sd-scripts records
/// its `--resolution` / `--min_bucket_reso` / `--max_bucket_reso` / `--bucket_no_upscale`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BucketSettings {
    resolution: (usize, usize),
    min_bucket_reso: usize,
    max_bucket_reso: usize,
    no_upscale: bool,
}

/// The bucket settings of a run: from the manifest of the metadata when prepare-latents wrote
/// it (the caches were made with those; a train-lora flag that says otherwise gets a warning),
/// else from train-lora's own flags, else the largest bucket side and sd-scripts' defaults.
fn bucket_settings(args: &TrainArgs, dataset: &CachedDataset) -> Result<BucketSettings> {
    let compat = &args.compat;
    let given_resolution = compat
        .resolution
        .as_deref()
        .map(crate::dataset::bucket::parse_resolution)
        .transpose()?
        .map(|(w, h)| (w as usize, h as usize));
    let largest_side = dataset
        .buckets
        .keys()
        .map(|&(w, h)| w.max(h))
        .max()
        .unwrap_or(512);
    // sd-scripts' defaults of --min_bucket_reso / --max_bucket_reso.
    let defaults = crate::dataset::kohya::CommandLine::default();
    let given = BucketSettings {
        resolution: given_resolution.unwrap_or((largest_side, largest_side)),
        min_bucket_reso: (compat.min_bucket_reso).unwrap_or(defaults.min_bucket_reso as usize),
        max_bucket_reso: (compat.max_bucket_reso).unwrap_or(defaults.max_bucket_reso as usize),
        no_upscale: compat.bucket_no_upscale,
    };
    let manifest = crate::formats::manifest::Manifest::read_for(&args.in_json)
        .ok()
        .flatten()
        .filter(|m| m.tool == "prepare-latents");
    let Some(manifest) = manifest else {
        return Ok(given);
    };
    // With metadata from prepare-dataset, each dataset was bucketed with its own settings: the
    // first dataset's are recorded (a command-line dataset has only that one).
    let p = match manifest.parameters["dataset_buckets"].get(0) {
        Some(first) => first,
        None => &manifest.parameters,
    };
    let number = |key: &str| p[key].as_u64().map(|v| v as usize);
    let resolution = match p["max_resolution"].as_array().map(Vec::as_slice) {
        Some([w, h]) => w.as_u64().zip(h.as_u64()),
        _ => None,
    };
    let (Some((w, h)), Some(min), Some(max)) = (
        resolution,
        number("min_bucket_reso"),
        number("max_bucket_reso"),
    ) else {
        return Ok(given);
    };
    let cached = BucketSettings {
        resolution: (w as usize, h as usize),
        min_bucket_reso: min,
        max_bucket_reso: max,
        no_upscale: p["bucket_no_upscale"].as_bool().unwrap_or(false),
    };
    let differs = [
        (
            given_resolution.is_some_and(|r| r != cached.resolution),
            "--resolution",
        ),
        (
            compat.min_bucket_reso.is_some_and(|v| v != min),
            "--min_bucket_reso",
        ),
        (
            compat.max_bucket_reso.is_some_and(|v| v != max),
            "--max_bucket_reso",
        ),
        (
            compat.bucket_no_upscale && !cached.no_upscale,
            "--bucket_no_upscale",
        ),
    ];
    for (_, flag) in differs.iter().filter(|(differs, _)| *differs) {
        tracing::warn!(
            "{flag} differs from what prepare-latents made the caches of {} with; the caches \
             decide the buckets, and the LoRA records the caches' settings (resolution {}x{}, \
             buckets {min}..{max})",
            args.in_json.display(),
            cached.resolution.0,
            cached.resolution.1
        );
    }
    Ok(cached)
}

/// sd-scripts' `mean_img_ar_error`: the mean |bucket aspect - image aspect| over the images
/// (without repeats), from the `original_size` every latent cache records; 0 when no cache
/// records it.
fn mean_aspect_error(dataset: &CachedDataset) -> Result<f64> {
    let mut errors = Vec::with_capacity(dataset.samples.len());
    for sample in &dataset.samples {
        let Some((width, height)) = sample.original_size.filter(|&(w, h)| w > 0 && h > 0) else {
            continue;
        };
        let (_, h, w) = sample.latents.dims3()?;
        errors.push((w as f64 / h as f64 - f64::from(width) / f64::from(height)).abs());
    }
    Ok(if errors.is_empty() {
        0.0
    } else {
        errors.iter().sum::<f64>() / errors.len() as f64
    })
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of a Unix time.
pub(crate) fn iso_date(unix: f64) -> String {
    let secs = unix as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
}
