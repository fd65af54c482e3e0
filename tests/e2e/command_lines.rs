//! Real `train_network.py` / `sdxl_train_network.py` command lines that users posted
//! (`tests/fixtures/command_lines`, provenance in its README), run through train-lora with only
//! their paths replaced by fixtures and the run capped at one step. Each must train a LoRA or be
//! refused before any work with a message that names the options; none may die in the parser
//! ("unexpected argument") or panic. Folder datasets point at a small kohya layout (DreamBooth
//! folders, a regularisation folder, a dataset config over them), which train-lora prepares
//! itself. The outcome of each file is pinned by its `# expect:` line (and, for lines without
//! `--in_json`, by `# expect-with-in_json:`: the same line with `--in_json` cached training
//! data added), so support for more of them shows as edits to those lines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{self, fixtures, make_training_caches};

/// One corpus file.
struct CommandLine {
    file: String,
    headers: BTreeMap<String, String>,
    args: Vec<String>,
}

fn corpus() -> Vec<CommandLine> {
    let dir = fixtures().join("command_lines");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let mut headers = BTreeMap::new();
            let mut args = Vec::new();
            for line in text.lines() {
                if let Some(header) = line.strip_prefix("# ") {
                    let (key, value) = header.split_once(": ").unwrap_or((header, ""));
                    headers.insert(key.to_string(), value.trim().to_string());
                } else {
                    args.push(line.to_string());
                }
            }
            CommandLine {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                headers,
                args,
            }
        })
        .collect()
}

/// Options whose value is a path (or a step count) the test replaces; matched as argparse
/// matches them (exact name, else a unique prefix among these).
const REPLACED: &[&str] = &[
    "pretrained_model_name_or_path",
    "in_json",
    "train_data_dir",
    "reg_data_dir",
    "dataset_config",
    "config_file",
    "sample_prompts",
    "output_dir",
    "logging_dir",
    "vae",
    "network_weights",
    "max_train_steps",
    "max_train_epochs",
    "train_batch_size",
];

fn replaced_name(given: &str) -> Option<&'static str> {
    if let Some(exact) = REPLACED.iter().find(|name| **name == given) {
        return Some(exact);
    }
    let mut prefixed = REPLACED.iter().filter(|name| name.starts_with(given));
    match (prefixed.next(), prefixed.next()) {
        (Some(name), None) if given.len() >= 3 => Some(name),
        _ => None,
    }
}

/// The fixture inputs one run uses.
struct Inputs {
    /// Cached training data (`meta_lat.json` and its caches).
    data: PathBuf,
    out: PathBuf,
    /// Holds a kohya layout: `img/2_sks photo/` (two photos, one caption file),
    /// `reg/1_photo/` (one photo), `dataset.toml` over `img/`.
    scratch: PathBuf,
    /// `--train_data_dir` is the cached data (the line has or gets `--in_json`) rather than
    /// the kohya folder.
    cached: bool,
}

impl Inputs {
    fn value_for(&self, option: &str, given: &str) -> Option<String> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        Some(match option {
            "pretrained_model_name_or_path" | "vae" => {
                path(fixtures().join("sd15-tiny/model.safetensors"))
            }
            "in_json" => path(self.data.join("meta_lat.json")),
            "train_data_dir" if self.cached => path(self.data.clone()),
            "train_data_dir" => path(self.scratch.join("img")),
            "reg_data_dir" => path(self.scratch.join("reg")),
            "dataset_config" => path(self.scratch.join("dataset.toml")),
            "config_file" => path(self.scratch.join("config.toml")),
            "sample_prompts" => path(self.scratch.join("prompts.txt")),
            "output_dir" => path(self.out.clone()),
            "logging_dir" => path(self.scratch.join("logs")),
            "network_weights" => path(self.scratch.join("network_weights.safetensors")),
            // More than two images a batch is lowered to one (the caches hold two images).
            "train_batch_size" => match given.parse::<u64>() {
                Ok(n) if n > 2 => "1".to_string(),
                _ => given.to_string(),
            },
            _ => return None,
        })
    }
}

/// The corpus line with fixture paths, `--max_train_steps 1` instead of its step or epoch
/// count, and (when `add_in_json`) cached training data added if it names none.
fn rewrite(args: &[String], inputs: &Inputs, add_in_json: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut has_data_dir = false;
    while i < args.len() {
        let token = &args[i];
        i += 1;
        let Some(long) = token.strip_prefix("--") else {
            out.push(token.clone());
            continue;
        };
        let (name, inline) = match long.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (long, None),
        };
        let Some(option) = replaced_name(name) else {
            out.push(token.clone());
            continue;
        };
        let value = match inline {
            Some(value) => value,
            None if i < args.len() && !args[i].starts_with("--") => {
                i += 1;
                args[i - 1].clone()
            }
            None => String::new(),
        };
        if option == "train_data_dir" {
            has_data_dir = true;
        }
        if option == "max_train_steps" || option == "max_train_epochs" {
            continue;
        }
        let value = inputs.value_for(option, &value).unwrap();
        out.push(format!("--{name}"));
        out.push(value);
    }
    if add_in_json {
        out.push("--in_json".into());
        out.push(inputs.value_for("in_json", "").unwrap());
        if !has_data_dir {
            out.push("--train_data_dir".into());
            out.push(inputs.value_for("train_data_dir", "").unwrap());
        }
    }
    out.push("--max_train_steps".into());
    out.push("1".into());
    out
}

/// What one run gave, or why the test fails on it.
fn classify(code: Option<i32>, stderr: &str, out: &Path) -> Result<String, String> {
    if stderr.contains("unexpected argument") || stderr.contains("unrecognized") {
        return Err(format!("the parser rejected the line:\n{stderr}"));
    }
    if stderr.contains("panicked") {
        return Err(format!("train-lora panicked:\n{stderr}"));
    }
    match code {
        Some(0) => {
            let lora = std::fs::read_dir(out).unwrap().any(|e| {
                e.unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "safetensors")
            });
            if lora {
                Ok("lora".into())
            } else {
                Err(format!(
                    "exit 0 without a LoRA in the output folder:\n{stderr}"
                ))
            }
        }
        Some(2) => {
            let body = stderr.split("\nUsage:").next().unwrap_or(stderr);
            if let Some(missing) = body.split("required arguments were not provided:").nth(1) {
                let names = option_names(missing.lines().map(str::trim_start));
                return if names.is_empty() {
                    Err(format!("exit 2 naming no option:\n{stderr}"))
                } else {
                    Ok(format!("missing {}", names.join(" ")))
                };
            }
            // train-lora's refusals: one `--option: why` line each (after `train-lora: error: `
            // on the first); warnings (` WARN --option: ...`) are not refusals.
            let names = option_names(body.lines().map(|l| {
                l.split_once("error: ")
                    .map_or(l, |(_, rest)| rest)
                    .trim_start()
            }));
            if names.is_empty() {
                Err(format!("exit 2 naming no option:\n{stderr}"))
            } else {
                Ok(format!("refused {}", names.join(" ")))
            }
        }
        other => {
            let first = stderr
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or_else(|| stderr.lines().last().unwrap_or(""));
            Ok(format!("failed (exit {other:?}): {}", first.trim()))
        }
    }
}

/// `--name` at the start of each line (the options a refusal or clap's list names).
fn option_names<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = lines
        .filter_map(|line| {
            let rest = line.strip_prefix("--")?;
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn run_line(args: &[String], add_in_json: bool) -> Result<String, String> {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let (images, reg) = (
        scratch.path().join("img/2_sks photo"),
        scratch.path().join("reg/1_photo"),
    );
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&reg).unwrap();
    for (photo, folder) in [
        ("astronaut", &images),
        ("chelsea", &images),
        ("coins", &reg),
    ] {
        let name = format!("{photo}.png");
        std::fs::copy(fixtures().join("images").join(&name), folder.join(name)).unwrap();
    }
    std::fs::write(images.join("astronaut.txt"), "sks photo, astronaut, flag\n").unwrap();
    std::fs::write(
        scratch.path().join("dataset.toml"),
        format!(
            "[general]\nenable_bucket = true\ncaption_extension = \".txt\"\n\n[[datasets]]\n\
             resolution = 256\nbatch_size = 1\n\n  [[datasets.subsets]]\n  image_dir = {:?}\n\
             class_tokens = \"sks photo\"\n  num_repeats = 2\n",
            images.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(scratch.path().join("config.toml"), "").unwrap();
    std::fs::write(
        scratch.path().join("prompts.txt"),
        "a cat --w 64 --h 64 --s 2\n",
    )
    .unwrap();
    let inputs = Inputs {
        data: data.path().to_path_buf(),
        out: out.path().to_path_buf(),
        scratch: scratch.path().to_path_buf(),
        cached: add_in_json || args.iter().any(|a| a.starts_with("--in_json")),
    };
    let argv = rewrite(args, &inputs, add_in_json);
    let output = Command::new(common::tool("train-lora"))
        .args(&argv)
        .current_dir(scratch.path())
        .output()
        .expect("train-lora starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    classify(output.status.code(), &stderr, out.path())
        .map_err(|why| format!("train-lora {argv:?}\n{why}"))
}

#[test]
fn posted_train_network_command_lines_train_or_are_refused_by_name() {
    let lines = corpus();
    assert!(
        lines.len() >= 10,
        "the corpus has {} command lines",
        lines.len()
    );
    let mut table = vec![format!(
        "{:<42} {:<22} {:<40} {}",
        "file", "script", "as written", "with --in_json added"
    )];
    let mut failures = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in &lines {
        let script = line.headers.get("script").cloned().unwrap_or_default();
        assert!(
            script == "train_network.py" || script == "sdxl_train_network.py",
            "{}: `# script:` is {script:?}",
            line.file
        );
        let has_in_json = line.args.iter().any(|a| a.starts_with("--in_json"));
        let mut checks = vec![("expect", false)];
        if !has_in_json {
            checks.push(("expect-with-in_json", true));
        }
        let mut cells = Vec::new();
        for (key, add_in_json) in checks {
            match run_line(&line.args, add_in_json) {
                Ok(outcome) => {
                    let expected = line.headers.get(key).map(String::as_str).unwrap_or("");
                    if outcome != expected {
                        failures.push(format!(
                            "{}: `# {key}: {expected}` but the run gives `# {key}: {outcome}`",
                            line.file
                        ));
                    }
                    if key == "expect" {
                        let kind = outcome.split(' ').next().unwrap_or("").to_string();
                        *counts.entry(kind).or_default() += 1;
                    }
                    cells.push(outcome);
                }
                Err(why) => {
                    failures.push(format!("{}: {why}", line.file));
                    cells.push("FAILED".into());
                }
            }
        }
        cells.resize(2, "-".into());
        table.push(format!(
            "{:<42} {:<22} {:<40} {}",
            line.file, script, cells[0], cells[1]
        ));
    }
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    table.push(format!(
        "{} command lines; as written: {}",
        lines.len(),
        summary.join(", ")
    ));
    let table = table.join("\n");
    eprintln!("{table}");
    assert!(failures.is_empty(), "{table}\n\n{}", failures.join("\n\n"));
}
