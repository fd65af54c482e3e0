//! The run form's back end: the form's options as a train-lora command line (checked against
//! train-lora's own flags), the `--config_file` TOML written by `train-lora --output_config`,
//! one train-lora child process at a time (Stop sends SIGINT, Resume runs `--resume latest`),
//! and the live state the page follows: progress lines read from its stderr and the loss log.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::infra::fsio;
use lorakit_pipeline::infra::report::PlainProgress;
use lorakit_pipeline::stages::train_lora::contact_sheet::CONTACT_SHEET;
use lorakit_pipeline::stages::train_lora::samples::sample_dir;
use lorakit_pipeline::stages::train_lora::TrainArgs;
use serde::Serialize;
use serde_json::Value;

use crate::access::Folders;

/// The flags of train-lora, as the tool declares them.
#[derive(Parser)]
#[command(rename_all = "snake_case")]
struct TrainCommand {
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// Options the page sets itself; the form may not.
const PAGE_OWNED: &[&str] = &["config_file", "output_config", "resume", "quiet", "verbose"];

/// Lines of the child's output kept for the page.
const LOG_LINES: usize = 40;

/// The form's options (`name -> value`, flags as `true`) as train-lora arguments: every name
/// must be a train-lora option; values with a `/` are paths and must lie inside the folders.
pub fn command_line(
    options: &BTreeMap<String, String>,
    folders: &Folders,
) -> Result<Vec<String>, String> {
    let command = lorakit_pipeline::cli::train_lora::command::<TrainCommand>();
    let mut argv = Vec::new();
    for (name, value) in options {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        if PAGE_OWNED.contains(&name.as_str()) {
            return Err(format!("--{name} is set by the page itself"));
        }
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_id().as_str() == name && a.get_long().is_some())
        else {
            return Err(format!("`{name}` is not an option of train-lora"));
        };
        if !arg.get_action().takes_values() {
            match value {
                "true" => argv.push(format!("--{name}")),
                "false" => {}
                _ => return Err(format!("--{name} is a flag: true or false, not `{value}`")),
            }
            continue;
        }
        let many = arg
            .get_num_args()
            .is_some_and(|range| range.max_values() > 1);
        let values: Vec<&str> = if many {
            value.split_whitespace().collect()
        } else {
            vec![value]
        };
        for item in &values {
            if item.contains('/') {
                folders.resolve(Path::new(item))?;
            }
            if many && item.starts_with('-') && item.parse::<f64>().is_err() {
                return Err(format!("--{name}: `{item}` is not a value"));
            }
        }
        if many {
            argv.push(format!("--{name}"));
            argv.extend(values.iter().map(|v| v.to_string()));
        } else {
            argv.push(format!("--{name}={value}"));
        }
    }
    Ok(argv)
}

/// Runs `train-lora ARGS --output_config --config_file PATH` (train-lora writes the TOML that
/// it reads back with `--config_file`); an existing `path` is replaced atomically.
pub fn save_config(train_lora: &Path, argv: &[String], path: &Path) -> Result<(), String> {
    let staged = fsio::temp_sibling(path, "web-ui").with_extension("toml");
    // A leftover of an interrupted save would make train-lora refuse to write.
    let _ = std::fs::remove_file(&staged);
    let output = Command::new(train_lora)
        .args(argv)
        .arg("--output_config")
        .arg("--config_file")
        .arg(&staged)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", train_lora.display()))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&staged);
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    std::fs::rename(&staged, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What the page shows of the current (or last) run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Live {
    /// A run is in progress.
    pub running: bool,
    /// Its exit code once finished (130: stopped, resumable).
    pub exit_code: Option<i32>,
    /// The config file it runs from.
    pub config: Option<PathBuf>,
    /// Its output folder and output name.
    pub output_dir: Option<PathBuf>,
    /// `--output_name` (sd-scripts' default `last`).
    pub output_name: String,
    /// The last progress line (stage label, counts, rate, ETA, loss status).
    pub progress: Option<PlainProgress>,
    /// `(step, loss)`: from the progress lines during the run, from the loss log once written.
    pub losses: Vec<(u64, f64)>,
    /// Sample images made so far (newest last).
    pub samples: Vec<PathBuf>,
    /// The contact sheet, once drawn.
    pub contact_sheet: Option<PathBuf>,
    /// The last lines of its output.
    pub log: Vec<String>,
    /// When it started (Unix seconds).
    pub started: f64,
}

/// The one run the page manages.
#[derive(Default)]
pub struct Runs {
    live: Arc<Mutex<Live>>,
    pid: Arc<Mutex<Option<u32>>>,
}

impl Runs {
    /// Starts `train-lora --config_file CONFIG [extra]` unless a run is in progress.
    pub fn start(
        &self,
        train_lora: &Path,
        config: &Path,
        output_dir: &Path,
        output_name: &str,
        extra: &[&str],
    ) -> Result<(), String> {
        let mut pid = self.pid.lock().expect("run lock");
        if pid.is_some() {
            return Err("a run is in progress: stop it first".into());
        }
        let mut command = Command::new(train_lora);
        command
            .arg("--config_file")
            .arg(config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so Stop interrupts its child tools too (as Ctrl-C would).
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .spawn()
            .map_err(|e| format!("{}: {e}", train_lora.display()))?;
        *pid = Some(child.id());
        *self.live.lock().expect("live lock") = Live {
            running: true,
            config: Some(config.to_path_buf()),
            output_dir: Some(output_dir.to_path_buf()),
            output_name: output_name.to_string(),
            started: unix_seconds(SystemTime::now()),
            ..Live::default()
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_reader = {
            let live = self.live.clone();
            std::thread::spawn(move || follow(stdout, &live))
        };
        let (live, slot) = (self.live.clone(), self.pid.clone());
        std::thread::spawn(move || {
            follow(stderr, &live);
            let _ = out_reader.join();
            let status = child.wait();
            let mut state = live.lock().expect("live lock");
            state.running = false;
            state.exit_code = status.ok().and_then(|s| s.code()).or(Some(-1));
            refresh_files(&mut state);
            *slot.lock().expect("run lock") = None;
        });
        Ok(())
    }

    /// Sends SIGINT to the run's process group: train-lora finishes its step, saves the LoRA
    /// and a resumable state, and exits with 130.
    pub fn stop(&self) -> Result<(), String> {
        let pid = self.pid.lock().expect("run lock");
        let Some(pid) = *pid else {
            return Err("no run in progress".into());
        };
        // SAFETY: kill(2) with a process-group id we started; no memory is touched.
        let sent = unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
        if sent != 0 {
            return Err(format!(
                "SIGINT to run {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// The live state, with the output folder's files read again.
    pub fn snapshot(&self) -> Live {
        let mut state = self.live.lock().expect("live lock");
        refresh_files(&mut state);
        state.clone()
    }
}

/// Reads a child's output line by line (progress lines end in `\n` when stderr is not a
/// terminal) into the live state.
fn follow(stream: impl Read, live: &Mutex<Live>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let mut state = live.lock().expect("live lock");
        if let Some(progress) = PlainProgress::parse(&line) {
            if let Some(loss) = status_loss(&progress.status) {
                state.losses.push((progress.done, loss));
            }
            state.progress = Some(progress);
        }
        state.log.push(line);
        let excess = state.log.len().saturating_sub(LOG_LINES);
        state.log.drain(..excess);
    }
}

/// The loss in a train-lora progress status (`loss 0.1234 avg ...`).
fn status_loss(status: &str) -> Option<f64> {
    status
        .strip_prefix("loss ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// The loss log, samples and contact sheet of the run's output folder (only files written
/// since it started).
fn refresh_files(state: &mut Live) {
    let Some(dir) = state.output_dir.clone() else {
        return;
    };
    let started = state.started;
    let fresh = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| unix_seconds(t) + 1.0 >= started)
    };
    let log = dir.join(format!("{}_loss.jsonl", state.output_name));
    if fresh(&log) {
        if let Ok(text) = std::fs::read_to_string(&log) {
            let logged = loss_log_points(&text);
            if logged.last().map(|p| p.0) >= state.losses.last().map(|p| p.0) {
                state.losses = logged;
            }
        }
    }
    let samples = sample_dir(&dir);
    let sheet = samples.join(CONTACT_SHEET);
    state.contact_sheet = fresh(&sheet).then_some(sheet);
    let mut images: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&samples)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "png") && !p.ends_with(CONTACT_SHEET))
        .filter(|p| fresh(p))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    images.sort();
    state.samples = images.into_iter().map(|(_, p)| p).collect();
}

/// `(step, loss)` of each line of a train-lora loss log.
pub fn loss_log_points(text: &str) -> Vec<(u64, f64)> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_form_becomes_train_lora_arguments_or_is_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        let folders = Folders::new(&[root.path().to_path_buf()]).unwrap();
        let model = root.path().join("model.safetensors");
        std::fs::write(&model, b"").unwrap();
        let form = options(&[
            ("pretrained_model_name_or_path", model.to_str().unwrap()),
            ("network_dim", "4"),
            ("network_train_unet_only", "true"),
            ("shuffle_caption", "false"),
            ("network_args", "conv_dim=4 conv_alpha=1"),
            ("output_name", ""),
        ]);
        let argv = command_line(&form, &folders).unwrap();
        assert_eq!(
            argv,
            [
                "--network_args",
                "conv_dim=4",
                "conv_alpha=1",
                "--network_dim=4",
                "--network_train_unet_only",
                &format!("--pretrained_model_name_or_path={}", model.display()),
            ]
        );
        let refused = [
            (("no_such_option", "1"), "not an option"),
            (("resume", "latest"), "set by the page"),
            (("network_train_unet_only", "yes"), "is a flag"),
            (("output_dir", "/etc"), "outside the folders"),
            (("network_args", "--output_name=x"), "not a value"),
        ];
        for ((name, value), why) in refused {
            let error = command_line(&options(&[(name, value)]), &folders).unwrap_err();
            assert!(error.contains(why), "{name}={value}: {error}");
        }
    }

    #[test]
    fn losses_are_read_from_progress_lines_and_the_loss_log() {
        let progress = PlainProgress::parse(
            "train-lora steps: 3/8 (2.0/s, ETA 3 s, loss 0.1250 avg 0.1300 lr 1.00e-4)",
        )
        .unwrap();
        assert_eq!(status_loss(&progress.status), Some(0.125));
        let log = "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.25,\"lr\":1e-4}\n";
        assert_eq!(loss_log_points(log), [(1, 0.5), (2, 0.25)]);
    }
}
