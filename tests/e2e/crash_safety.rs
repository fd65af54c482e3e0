//! Crash safety: each long-running tool is killed with SIGKILL at random points (several seeds).
//! Every output present afterwards must be complete and valid, and a re-run must finish the job
//! with the same result as an uninterrupted run. Leftover temporary files of the killed run are
//! never read by the re-run, and `lint-dataset` reports them.
//!
//! Rows are per tool, like the bad-input table; stages with per-item outputs add a row whose
//! check also asserts that the re-run counts the finished items as up to date.

use crate::common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::tool;
use lorakit_pipeline::infra::fsio::TEMP_PREFIX;

/// One tool under test.
struct CrashRow {
    /// Executable name.
    tool: &'static str,
    /// Prepares inputs under the given folder; returns the arguments and the output files.
    setup: fn(&Path) -> (Vec<OsString>, Vec<PathBuf>),
    /// Checks that an output file that exists after a kill is complete and valid.
    valid: fn(&Path) -> Result<(), String>,
    /// Per-item outputs (cache files) under the row's folder, for per-item stages: each present
    /// after a kill must be valid, and the re-run must count them as up to date.
    items: Option<fn(&Path) -> Vec<PathBuf>>,
}

/// Number of images in the generated dataset: enough for a run of a few tens of milliseconds.
const IMAGES: usize = 3000;

fn caption_dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for index in 0..IMAGES {
        std::fs::write(data.join(format!("img{index:05}.png")), b"").unwrap();
        std::fs::write(
            data.join(format!("img{index:05}.caption")),
            format!("a photo number {index}, 1girl, ({index}), rating: safe"),
        )
        .unwrap();
    }
    data
}

fn valid_metadata(path: &Path) -> Result<(), String> {
    if path.to_string_lossy().ends_with(".manifest.json") {
        let value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return lorakit_pipeline::formats::schema::validate(
            lorakit_pipeline::formats::schema::MANIFEST_V1,
            &value,
        );
    }
    let metadata =
        lorakit_pipeline::formats::metadata::Metadata::load(path).map_err(|e| e.to_string())?;
    if metadata.len() != IMAGES {
        return Err(format!(
            "{}: {} of {IMAGES} entries",
            path.display(),
            metadata.len()
        ));
    }
    Ok(())
}

const ROWS: &[CrashRow] = &[
    CrashRow {
        tool: "merge-captions",
        setup: |root| {
            let data = caption_dataset(root);
            let out = root.join("meta_cap.json");
            let manifest = root.join("meta_cap.json.manifest.json");
            (
                vec![data.into(), out.clone().into(), "-q".into()],
                vec![out, manifest],
            )
        },
        valid: valid_metadata,
        items: None,
    },
    CrashRow {
        tool: "clean-captions",
        setup: |root| {
            let data = caption_dataset(root);
            let input = root.join("meta_cap.json");
            let status = Command::new(tool("merge-captions"))
                .args([data.as_os_str(), input.as_os_str(), "-q".as_ref()])
                .status()
                .unwrap();
            assert!(status.success());
            let out = root.join("meta_clean.json");
            let manifest = root.join("meta_clean.json.manifest.json");
            (
                vec![input.into(), out.clone().into(), "-q".into()],
                vec![out, manifest],
            )
        },
        valid: valid_metadata,
        items: None,
    },
    CrashRow {
        tool: "cache-text-encoder",
        setup: |root| {
            std::fs::create_dir_all(root.join("cache")).unwrap();
            let entries: serde_json::Map<String, serde_json::Value> = (0..TE_ENTRIES)
                .map(|i| {
                    (
                        format!("img{i:03}"),
                        serde_json::json!({"caption": format!("a photo number {i} of a cat")}),
                    )
                })
                .collect();
            let metadata = root.join("meta.json");
            std::fs::write(&metadata, serde_json::to_vec(&entries).unwrap()).unwrap();
            let model = common::fixtures().join("sd15-tiny/model.safetensors");
            let index = root.join("cache/meta_te_cache.json");
            (
                vec![
                    metadata.into(),
                    model.into(),
                    "--cache_dir".into(),
                    root.join("cache").into(),
                    "--batch_size".into(),
                    "1".into(),
                ],
                vec![index],
            )
        },
        valid: |path| {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(path).unwrap())
                .map(|_| ())
                .map_err(|e| format!("{}: {e}", path.display()))
        },
        items: Some(|root| {
            let mut caches: Vec<PathBuf> = std::fs::read_dir(root.join("cache"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.ends_with("_te_outputs.npz") && !name.starts_with(TEMP_PREFIX)
                })
                .collect();
            caches.sort();
            caches
        }),
    },
];

/// Captions in the text-encoder row (a run of about a second with the tiny model).
const TE_ENTRIES: usize = 40;

/// The content key and hidden states of a cache file (zip timestamps aside).
fn cache_content(path: &Path) -> (Option<String>, Vec<f32>) {
    let mut reader = lorakit_pipeline::formats::npz::NpzReader::open(path).unwrap();
    let key = lorakit_pipeline::formats::npz::stored_key(&mut reader);
    (key, reader.read_f32("hidden_state").unwrap().0)
}

/// Checks that a cache file is a complete npz carrying its content key.
fn valid_cache(path: &Path) -> Result<(), String> {
    let reader =
        lorakit_pipeline::formats::npz::NpzReader::open(path).map_err(|e| e.to_string())?;
    if reader.contains("lorakit_key") {
        Ok(())
    } else {
        Err(format!("{}: no lorakit_key", path.display()))
    }
}

/// Small deterministic generator for kill delays.
fn next_random(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
        })
        .collect()
}

#[test]
fn killed_runs_leave_valid_outputs_and_resume() {
    let root = tempfile::tempdir().unwrap();
    for row in ROWS {
        let reference_dir = root.path().join(format!("{}-reference", row.tool));
        let (args, outputs) = (row.setup)(&reference_dir);
        let started = Instant::now();
        let status = Command::new(tool(row.tool)).args(&args).status().unwrap();
        let duration = started.elapsed();
        assert!(status.success(), "{} reference run failed", row.tool);
        let reference = std::fs::read(&outputs[0]).unwrap();

        for seed in 1..=5u64 {
            let dir = root.path().join(format!("{}-{seed}", row.tool));
            let (args, outputs) = (row.setup)(&dir);
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let delay = duration.mul_f64(1.2 * next_random(&mut state));
            let mut child = Command::new(tool(row.tool)).args(&args).spawn().unwrap();
            std::thread::sleep(delay.min(Duration::from_secs(5)));
            let _ = child.kill();
            child.wait().unwrap();
            for output in outputs.iter().filter(|o| o.exists()) {
                if let Err(problem) = (row.valid)(output) {
                    panic!(
                        "{} killed after {delay:?}: invalid output: {problem}",
                        row.tool
                    );
                }
            }
            let mut leftovers = temp_files(&dir);
            if row.items.is_some() {
                leftovers.extend(temp_files(&dir.join("cache")));
            }
            if !leftovers.is_empty() {
                let report = Command::new(tool("lint-dataset"))
                    .args([
                        dir.as_os_str(),
                        "--recursive".as_ref(),
                        "--json".as_ref(),
                        "-q".as_ref(),
                    ])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&report.stdout);
                for leftover in &leftovers {
                    let name = leftover.file_name().unwrap().to_string_lossy();
                    assert!(text.contains(name.as_ref()), "lint-dataset misses {name}");
                }
            }
            let finished_items = match row.items {
                Some(items) => {
                    let present = items(&dir);
                    for item in &present {
                        if let Err(problem) = valid_cache(item) {
                            panic!("{} killed after {delay:?}: {problem}", row.tool);
                        }
                    }
                    Some(present.len())
                }
                None => None,
            };
            let rerun = Command::new(tool(row.tool)).args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&rerun.stderr);
            assert!(
                rerun.status.success(),
                "{} re-run after a kill failed:\n{stderr}",
                row.tool
            );
            if let Some(finished) = finished_items {
                assert!(
                    stderr.contains(&format!("{} up to date", finished)),
                    "{}: {finished} caches were finished before the kill, the re-run says:\n{stderr}",
                    row.tool
                );
                let items = row.items.expect("per-item row")(&dir);
                let reference_items = row.items.expect("per-item row")(&reference_dir);
                assert_eq!(items.len(), reference_items.len());
                for (item, expected) in items.iter().zip(&reference_items) {
                    assert!(
                        cache_content(item) == cache_content(expected),
                        "{} differs from an uninterrupted run",
                        item.display()
                    );
                }
            } else {
                assert_eq!(
                    std::fs::read(&outputs[0]).unwrap(),
                    reference,
                    "{} re-run after a kill at {delay:?} differs from an uninterrupted run",
                    row.tool
                );
            }
            for output in &outputs {
                (row.valid)(output).unwrap();
            }
        }
    }
}

/// `train-lora --save_state` arguments for a short run of the tiny model writing into `out`: a
/// C3Lier network (3x3 conv modules beside the linear ones), so that resuming is checked for
/// every module kind.
fn train_args(data: &Path, out: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--pretrained_model_name_or_path".into(),
        common::fixtures()
            .join("sd15-tiny/model.safetensors")
            .into(),
        "--in_json".into(),
        data.join("meta_lat.json").into(),
        "--train_data_dir".into(),
        data.into(),
        "--output_dir".into(),
        out.into(),
    ];
    for flag in [
        "--output_name=crash",
        "--max_train_steps=8",
        "--train_batch_size=1",
        "--learning_rate=1e-3",
        "--lr_scheduler=cosine",
        "--lr_warmup_steps=2",
        "--seed=3",
        "--network_args",
        "conv_dim=2",
        "conv_alpha=0.5",
        "--save_state",
        "--save_every_n_steps=2",
        "--quiet",
    ] {
        args.push(flag.into());
    }
    args
}

/// The tensor-data section of a safetensors file: everything after the JSON header (whose
/// metadata holds the training timestamps).
fn tensor_data(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..].to_vec()
}

#[test]
fn killed_training_resumes_to_the_same_lora() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::make_training_caches(&data);
    let reference = root.path().join("reference");
    let started = Instant::now();
    let status = Command::new(tool("train-lora"))
        .args(train_args(&data, &reference))
        .status()
        .unwrap();
    let duration = started.elapsed();
    assert!(status.success(), "uninterrupted run failed");
    let expected = tensor_data(&reference.join("crash.safetensors"));
    let expected_log = std::fs::read_to_string(reference.join("crash_loss.jsonl")).unwrap();

    for seed in 1..=3u64 {
        let out = root.path().join(format!("run-{seed}"));
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let delay = duration.mul_f64(0.15 + 0.8 * next_random(&mut state));
        let mut child = Command::new(tool("train-lora"))
            .args(train_args(&data, &out))
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().unwrap();
        let states: Vec<PathBuf> = std::fs::read_dir(&out)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.to_string_lossy().ends_with("-state"))
                    .filter(|p| {
                        !p.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with(TEMP_PREFIX)
                    })
                    .collect()
            })
            .unwrap_or_default();
        for dir in &states {
            for file in [
                "model.safetensors",
                "optimizer.safetensors",
                "train_state.json",
            ] {
                assert!(
                    dir.join(file).is_file(),
                    "killed after {delay:?}: {} lacks {file}",
                    dir.display()
                );
            }
        }
        let mut args = train_args(&data, &out);
        if !states.is_empty() {
            args.extend(["--resume".into(), "latest".into()]);
        }
        let rerun = Command::new(tool("train-lora"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            rerun.status.success(),
            "resume after a kill at {delay:?} ({} states) failed:\n{}",
            states.len(),
            String::from_utf8_lossy(&rerun.stderr)
        );
        assert!(
            tensor_data(&out.join("crash.safetensors")) == expected,
            "killed after {delay:?} with {} states saved: the resumed LoRA differs from an uninterrupted run's",
            states.len()
        );
        assert_eq!(
            std::fs::read_to_string(out.join("crash_loss.jsonl")).unwrap(),
            expected_log,
            "killed after {delay:?}: the loss log differs"
        );
        eprintln!(
            "train-lora killed after {delay:?} ({} states): resumed LoRA identical",
            states.len()
        );
    }

    // Killed after the final state was saved but before the LoRA was written: the resume
    // trains no further step.
    std::fs::remove_file(reference.join("crash.safetensors")).unwrap();
    let mut args = train_args(&data, &reference);
    args.extend(["--resume".into(), "latest".into()]);
    let rerun = Command::new(tool("train-lora"))
        .args(&args)
        .output()
        .unwrap();
    assert!(rerun.status.success());
    assert!(tensor_data(&reference.join("crash.safetensors")) == expected);
    assert_eq!(
        std::fs::read_to_string(reference.join("crash_loss.jsonl")).unwrap(),
        expected_log
    );
}

#[test]
fn ctrl_c_saves_a_state_that_resumes_to_the_same_lora() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::make_training_caches(&data);
    // Long enough that the interrupt lands mid-run; no periodic saves, so whatever is saved
    // comes from the interrupt.
    let args = |out: &Path| -> Vec<OsString> {
        let mut args = train_args(&data, out);
        args.retain(|a| a != "--save_state" && a != "--save_every_n_steps=2");
        args.retain(|a| a != "--max_train_steps=8" && a != "--quiet");
        args.push("--max_train_steps=20".into());
        args
    };
    let reference = root.path().join("reference");
    let status = Command::new(tool("train-lora"))
        .args(args(&reference))
        .status()
        .unwrap();
    assert!(status.success(), "uninterrupted run failed");
    let expected = tensor_data(&reference.join("crash.safetensors"));
    let expected_log = std::fs::read_to_string(reference.join("crash_loss.jsonl")).unwrap();

    let out = root.path().join("interrupted");
    let stderr_path = root.path().join("stderr");
    let mut child = Command::new(tool("train-lora"))
        .args(args(&out))
        .arg("--verbose")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    // Interrupt once training is under way (the loop logs its first step).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&stderr_path)
        .unwrap_or_default()
        .contains("step 2:")
    {
        assert!(Instant::now() < deadline, "training never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id() as i32;
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let states: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-state"))
        .collect();
    assert_eq!(states.len(), 1, "{stderr}");
    let stem = states[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace("-state", "");
    assert!(
        out.join(format!("{stem}.safetensors")).is_file(),
        "{stderr}"
    );
    assert!(!out.join("crash.safetensors").exists(), "{stderr}");

    let mut resume = args(&out);
    resume.extend(["--resume".into(), "latest".into()]);
    let rerun = Command::new(tool("train-lora"))
        .args(&resume)
        .output()
        .unwrap();
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    assert!(
        tensor_data(&out.join("crash.safetensors")) == expected,
        "interrupted at {stem}: the resumed LoRA differs from an uninterrupted run's"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("crash_loss.jsonl")).unwrap(),
        expected_log
    );
}
