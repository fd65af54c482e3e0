//! Sample images during training (sd-scripts' `--sample_prompts` and `sample_images_common`,
//! docs/train-lora.md#sample-images-during-training): at each sample point the current LoRA is
//! saved to a scratch file and generate-images, the sibling executable, renders the prompt file
//! with it as a child process into `<output_dir>/sample/`, with sd-scripts' file names and
//! defaults; the trainer never loads the VAE. A sample run that fails is reported and training
//! goes on. After each point the contact sheet is redrawn ([`super::contact_sheet`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::preparation::sibling_executable;
use super::TrainArgs;
use crate::formats::bookkeeping::LORAKIT_DIR;
use crate::infra::report::Progress;
use crate::models::samplers::SamplerKind;
use crate::stages::generate_images::prompts::read_prompt_file;
use crate::{Error, Result};

/// sd-scripts' `sample_image_inference` defaults for what a prompt leaves out.
const SAMPLE_STEPS: &str = "30";
const SAMPLE_SIZE: &str = "512";
const SAMPLE_SCALE: &str = "7.5";
/// The long-prompt pipeline sd-scripts samples with reads up to 3 chunks (225 tokens).
const SAMPLE_CHUNKS: &str = "3";

/// The folder sample images go to (sd-scripts' `<output_dir>/sample`).
pub fn sample_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("sample")
}

/// When sample images are due, as `--sample_every_n_steps`, `--sample_every_n_epochs` and
/// `--sample_at_first` say (sd-scripts' rule; 0 turns an interval off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSchedule {
    /// `--sample_every_n_steps`.
    pub every_n_steps: Option<usize>,
    /// `--sample_every_n_epochs` (when given, the step interval is not used).
    pub every_n_epochs: Option<usize>,
    /// `--sample_at_first`.
    pub at_first: bool,
}

impl SampleSchedule {
    /// Whether to sample after `steps` optimizer steps: `epoch` is `Some(e)` at the end of epoch
    /// `e` (`Some(0)` before the first step) and `None` after a step inside an epoch.
    pub fn due(&self, epoch: Option<usize>, steps: usize) -> bool {
        if steps == 0 {
            return self.at_first;
        }
        let every_n_steps = self.every_n_steps.filter(|&n| n > 0);
        match self.every_n_epochs.filter(|&n| n > 0) {
            Some(n) => epoch.is_some_and(|e| e % n == 0),
            None => every_n_steps.is_some_and(|n| epoch.is_none() && steps % n == 0),
        }
    }
}

/// The sample images of a run: what to render and how to call generate-images.
#[derive(Debug, Clone)]
pub struct SampleImages {
    /// When to sample.
    pub schedule: SampleSchedule,
    program: PathBuf,
    /// The generate-images arguments every sample point shares.
    common_args: Vec<OsString>,
    output_dir: PathBuf,
    output_name: Option<String>,
}

impl SampleImages {
    /// The sample images `args` ask for (`None` without `--sample_prompts`). Refuses an unknown
    /// `--sample_sampler`, an unreadable prompt file or a missing generate-images before any
    /// work.
    pub fn from_args(args: &TrainArgs) -> Result<Option<Self>> {
        let schedule = SampleSchedule {
            every_n_steps: args.sample_every_n_steps,
            every_n_epochs: args.sample_every_n_epochs,
            at_first: args.sample_at_first,
        };
        let Some(prompts) = &args.sample_prompts else {
            if schedule.every_n_steps.is_some() || schedule.every_n_epochs.is_some() {
                tracing::warn!(
                    "--sample_every_n_* without --sample_prompts: no sample images are made"
                );
            }
            return Ok(None);
        };
        SamplerKind::parse(&args.sample_sampler)
            .map_err(|e| Error::Usage(format!("--sample_sampler: {e}")))?;
        let lines = read_prompt_file(prompts)?;
        if lines.is_empty() {
            return Err(Error::bad_file(
                prompts,
                "--sample_prompts: the file holds no prompt",
            ));
        }
        let program = sibling_executable("generate-images").map_err(|_| {
            Error::Usage(
                "--sample_prompts needs generate-images beside train-lora (build every tool: \
                 make build), or leave out --sample_prompts and render a saved LoRA later with \
                 `make samples`"
                    .into(),
            )
        })?;
        let mut common_args: Vec<OsString> = vec![
            "--ckpt".into(),
            args.pretrained_model_name_or_path.clone().into(),
            "--from_file".into(),
            prompts.into(),
            "--outdir".into(),
            sample_dir(&args.output_dir).into(),
            "--sampler".into(),
            args.sample_sampler.clone().into(),
            "--steps".into(),
            SAMPLE_STEPS.into(),
            "--W".into(),
            SAMPLE_SIZE.into(),
            "--H".into(),
            SAMPLE_SIZE.into(),
            "--scale".into(),
            SAMPLE_SCALE.into(),
            "--max_embeddings_multiples".into(),
            SAMPLE_CHUNKS.into(),
        ];
        if let Some(vae) = &args.compat.vae {
            common_args.extend(["--vae".into(), vae.into()]);
        }
        if let Some(clip_skip) = args.compat.clip_skip {
            common_args.extend(["--clip_skip".into(), clip_skip.to_string().into()]);
        }
        if args.v2 {
            common_args.push("--v2".into());
        }
        if args.v_parameterization {
            common_args.push("--v_parameterization".into());
        }
        if args.quiet {
            common_args.push("--quiet".into());
        }
        Ok(Some(SampleImages {
            schedule,
            program,
            common_args,
            output_dir: args.output_dir.clone(),
            output_name: args.output_name.clone(),
        }))
    }

    /// sd-scripts' file-name prefix of a sample point: `[<output_name>_]e<epoch:06>` at an
    /// epoch's end (and before the first step), `[<output_name>_]<steps:06>` after a step.
    pub fn prefix(&self, epoch: Option<usize>, steps: usize) -> String {
        let point = match epoch {
            Some(epoch) => format!("e{epoch:06}"),
            None => format!("{steps:06}"),
        };
        match &self.output_name {
            Some(name) => format!("{name}_{point}"),
            None => point,
        }
    }

    /// Makes the sample images of one point when due: `save` writes the current LoRA to the
    /// path it is given, generate-images renders every prompt with it, and the contact sheet is
    /// redrawn. Failures are warnings: training goes on.
    pub fn make_if_due(
        &self,
        epoch: Option<usize>,
        steps: usize,
        progress: &Progress,
        save: &dyn Fn(&Path) -> Result<()>,
    ) {
        if !self.schedule.due(epoch, steps) {
            return;
        }
        let prefix = self.prefix(epoch, steps);
        tracing::info!("sample images at step {steps} ({prefix})");
        let result = progress.suspend(|| self.render(&prefix, save));
        if let Err(e) = result {
            tracing::warn!("sample images at step {steps} failed, training goes on: {e}");
        }
        let sheet =
            super::contact_sheet::write(&sample_dir(&self.output_dir), self.output_name.as_deref());
        if let Err(e) = sheet {
            tracing::warn!("the contact sheet of the sample images was not written: {e}");
        }
    }

    /// Saves the LoRA to a scratch file, runs generate-images on it, removes the file.
    fn render(&self, prefix: &str, save: &dyn Fn(&Path) -> Result<()>) -> Result<()> {
        let scratch_dir = self.output_dir.join(LORAKIT_DIR).join("samples");
        std::fs::create_dir_all(&scratch_dir).map_err(|e| Error::io(&scratch_dir, e))?;
        let lora = scratch_dir.join(format!("{prefix}.safetensors"));
        save(&lora)?;
        let status = Command::new(&self.program)
            .args(&self.common_args)
            .arg("--network_weights")
            .arg(&lora)
            .arg("--training_samples")
            .arg(prefix)
            .status();
        let _ = std::fs::remove_file(&lora);
        match status.map_err(|e| Error::io(&self.program, e))?.code() {
            Some(0) => Ok(()),
            code => Err(Error::Model(format!(
                "generate-images ended with {} (its messages are above)",
                code.map_or("a signal".to_string(), |c| format!("exit code {c}"))
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_points_follow_sd_scripts() {
        let steps_only = SampleSchedule {
            every_n_steps: Some(2),
            every_n_epochs: None,
            at_first: false,
        };
        // Before the first step only with --sample_at_first.
        assert!(!steps_only.due(Some(0), 0));
        assert!(SampleSchedule {
            at_first: true,
            ..steps_only
        }
        .due(Some(0), 0));
        // Inside epochs on multiples of the interval, never at an epoch's end.
        let due: Vec<usize> = (1..=6).filter(|&s| steps_only.due(None, s)).collect();
        assert_eq!(due, [2, 4, 6]);
        assert!(!steps_only.due(Some(1), 4));
        // An epoch interval wins over the step interval.
        let epochs = SampleSchedule {
            every_n_epochs: Some(2),
            ..steps_only
        };
        assert!(!epochs.due(None, 4));
        assert!(!epochs.due(Some(1), 3) && epochs.due(Some(2), 6));
        // 0 turns an interval off, as sd-scripts' `<= 0`.
        let off = SampleSchedule {
            every_n_steps: Some(0),
            every_n_epochs: Some(0),
            at_first: false,
        };
        assert!(!off.due(None, 4) && !off.due(Some(1), 4));
    }
}
