//! End-to-end test of `--shard auto` through the shipped scheduler examples:
//! `examples/slurm/prepare.sbatch` submitted as a chain of jobs (a stand-in `sbatch` runs each
//! job at once, each array task with the variables Slurm sets) and the Jobs of
//! `examples/k8s/prepare-job.yaml` (each Indexed Job's pods run with `JOB_COMPLETION_INDEX`)
//! tag, caption, build the metadata, cache latents and text-encoder outputs as 3 shards and
//! join them; both leave the files of the same script run unsharded (`SHARDS=1`), byte for
//! byte except float rounding in the caches.

use crate::common;
use crate::sharding::{assert_caches_match, restore, snapshot};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{copy_dir, fixtures};

/// The scheduler variables `--shard auto` reads; cleared so a test run inside a real job array
/// does not see its own.
const SCHEDULER_VARIABLES: [&str; 7] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
    "SHARDS",
];

/// The steps of the example, in order.
const STEPS: [&str; 6] = [
    "label",
    "metadata",
    "latents",
    "merge-latents",
    "text",
    "merge-text",
];

/// Stands in for `sbatch`: records its command line in `$FAKE_SBATCH_LOG` and runs the job at
/// once, each array task in turn with the variables Slurm gives it; prints a job id as
/// `sbatch --parsable` does.
const FAKE_SBATCH: &str = r#"#!/bin/bash
echo "$*" >> "$FAKE_SBATCH_LOG"
array=
args=()
for arg in "$@"; do
  case $arg in
    --array=*) array=${arg#--array=} ;;
    --*) ;;
    *) args+=("$arg") ;;
  esac
done
id=$((100 + $(wc -l < "$FAKE_SBATCH_LOG")))
if [ -n "$array" ]; then
  low=${array%-*}
  high=${array#*-}
  for ((task = low; task <= high; task++)); do
    SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$task SLURM_ARRAY_TASK_MIN=$low \
      SLURM_ARRAY_TASK_MAX=$high SLURM_ARRAY_TASK_STEP=1 \
      SLURM_ARRAY_TASK_COUNT=$((high - low + 1)) bash "${args[@]}" >&2 || exit 1
  done
else
  bash "${args[@]}" >&2 || exit 1
fi
echo "$id;cluster"
"#;

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A folder with 6 test images (`data/`), the tiny tagger laid out as sd-scripts expects
/// (`models/`), and the environment of the example script for it.
struct Setup {
    root: tempfile::TempDir,
    environment: Vec<(&'static str, PathBuf)>,
}

fn setup() -> Setup {
    common::use_project_runtime();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for name in [
        "astronaut.png",
        "chelsea.png",
        "coins.png",
        "hubble_deep_field.jpg",
        "logo.png",
        "text.png",
    ] {
        std::fs::copy(fixtures().join("images").join(name), data.join(name)).unwrap();
    }
    let models = root.path().join("models");
    copy_dir(
        &fixtures().join("wd14-tiny"),
        &models.join("SmilingWolf_wd-v1-4-convnext-tagger-v2"),
    );
    let bin = common::tool("merge-shards").parent().unwrap().to_path_buf();
    let environment = vec![
        ("DATA", data),
        ("OUT", root.path().join("out")),
        ("MODEL", fixtures().join("sd15-tiny/model.safetensors")),
        ("TAGGER_DIR", models),
        ("BLIP", fixtures().join("blip-tiny")),
        ("LORAKIT_BIN", bin),
        ("RES", "128,128".into()),
        ("TAG_FLAGS", "--batch_size 4".into()),
        ("CAPTION_FLAGS", "--beam_search --batch_size 2".into()),
        (
            "LATENT_FLAGS",
            "--min_bucket_reso 64 --max_bucket_reso 256 --batch_size 2".into(),
        ),
        ("TE_FLAGS", "--batch_size 2".into()),
    ];
    Setup { root, environment }
}

/// `bash examples/slurm/prepare.sbatch <step>` with the setup's environment, `SHARDS` and
/// `extra` variables; asserts success.
fn run_step(setup: &Setup, step: &str, shards: u64, extra: &[(&str, String)]) {
    let mut command = Command::new("bash");
    command
        .arg(example("examples/slurm/prepare.sbatch"))
        .arg(step);
    for name in SCHEDULER_VARIABLES {
        command.env_remove(name);
    }
    command.envs(setup.environment.iter().map(|(k, v)| (k, v)));
    command.env("SHARDS", shards.to_string());
    command.envs(extra.iter().map(|(k, v)| (k, v)));
    let output = command.output().expect("bash starts");
    assert!(
        output.status.success(),
        "prepare.sbatch {step} {extra:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Asserts that `joined` holds the files of `whole`, with the same bytes (caches: within float
/// rounding, see [`assert_caches_match`]).
fn assert_same_files(
    root: &Path,
    whole: &BTreeMap<PathBuf, Vec<u8>>,
    joined: &BTreeMap<PathBuf, Vec<u8>>,
    how: &str,
) {
    assert_eq!(
        joined.keys().collect::<Vec<_>>(),
        whole.keys().collect::<Vec<_>>(),
        "{how}: other files than the unsharded run"
    );
    for (path, bytes) in whole {
        if path.extension().is_some_and(|e| e == "npz") {
            std::fs::write(root.join(path), &joined[path]).unwrap();
            assert_caches_match(&root.join(path), bytes);
        } else {
            assert!(
                joined[path] == *bytes,
                "{how}: {} differs from the unsharded run",
                path.display()
            );
        }
    }
}

/// The Jobs of the Kubernetes example, in file order: (step, `completions` of an Indexed Job,
/// the `SHARDS` it sets).
fn kubernetes_jobs() -> Vec<(String, Option<u64>, u64)> {
    let text = std::fs::read_to_string(example("examples/k8s/prepare-job.yaml")).unwrap();
    let field = |document: &str, key: &str| -> Option<String> {
        document
            .lines()
            .find_map(|line| line.trim().strip_prefix(key))
            .map(|rest| rest.trim().to_string())
    };
    text.split("\n---\n")
        .skip(1)
        .map(|document| {
            assert_eq!(field(document, "kind:").as_deref(), Some("Job"));
            let command = field(document, "command:").expect("a command");
            let step = command
                .strip_prefix(r#"["bash", "/scripts/prepare.sh", ""#)
                .and_then(|rest| rest.strip_suffix(r#""]"#))
                .unwrap_or_else(|| panic!("unexpected command {command}"))
                .to_string();
            let indexed = field(document, "completionMode:").as_deref() == Some("Indexed");
            let completions = field(document, "completions:").map(|n| n.parse().unwrap());
            assert_eq!(indexed, completions.is_some(), "{step}");
            let shards = field(document, "- {name: SHARDS, value:").expect("SHARDS");
            let shards = (shards.strip_suffix('}').expect("{name: SHARDS, value: N}"))
                .trim()
                .trim_matches('"')
                .parse()
                .unwrap();
            (step, completions, shards)
        })
        .collect()
}

#[test]
fn scheduler_examples_sharded_in_three_equal_the_unsharded_run() {
    let setup = setup();
    let root = setup.root.path();
    let inputs = snapshot(root);

    for step in STEPS {
        run_step(&setup, step, 1, &[]);
    }
    let whole = snapshot(root);
    for output in [
        "out/meta_clean.json",
        "out/meta_lat.json",
        "out/meta_lat_te_cache.json",
        "data/.lorakit/tag-probs.bin",
        "data/.lorakit/caption-images.caption.json",
        "data/astronaut.caption",
        "data/astronaut.txt",
    ] {
        assert!(
            whole.contains_key(Path::new(output)),
            "{output} not written"
        );
    }
    assert!(
        whole
            .keys()
            .filter(|p| p.to_string_lossy().ends_with("_te_outputs.npz"))
            .count()
            == 6,
        "{:?}",
        whole.keys().collect::<Vec<_>>()
    );
    restore(root, &inputs);

    // Slurm: `prepare.sbatch submit` chains the steps; the stand-in sbatch runs them.
    let fake_bin = root.join("fake-bin");
    std::fs::create_dir_all(&fake_bin).unwrap();
    let sbatch = fake_bin.join("sbatch");
    std::fs::write(&sbatch, FAKE_SBATCH).unwrap();
    std::fs::set_permissions(&sbatch, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let log = root.join("sbatch.log");
    let path = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run_step(
        &setup,
        "submit",
        3,
        &[
            ("PATH", path),
            ("FAKE_SBATCH_LOG", log.display().to_string()),
        ],
    );
    let submitted = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    std::fs::remove_dir_all(&fake_bin).unwrap();
    let submitted: Vec<&str> = submitted.lines().collect();
    assert_eq!(submitted.len(), STEPS.len(), "{submitted:#?}");
    for (n, (line, step)) in submitted.iter().zip(STEPS).enumerate() {
        assert!(line.ends_with(&format!(" {step}")), "{line}");
        let array = ["label", "latents", "text"].contains(&step);
        assert_eq!(line.contains("--array=0-2"), array, "{line}");
        if n > 0 {
            // Each job waits for the one before (ids 101, 102, ...).
            assert!(
                line.contains(&format!("--dependency=afterok:{}", 100 + n)),
                "{line}"
            );
        }
    }
    let joined = snapshot(root);
    assert_same_files(root, &whole, &joined, "Slurm array");
    restore(root, &inputs);

    // Kubernetes: the Jobs in file order, each Indexed Job's pods one after another.
    let jobs = kubernetes_jobs();
    assert_eq!(
        jobs.iter()
            .map(|(step, _, _)| step.as_str())
            .collect::<Vec<_>>(),
        STEPS
    );
    for (step, completions, shards) in &jobs {
        assert_eq!(*shards, 3, "{step}");
        match completions {
            Some(completions) => {
                assert_eq!(completions, shards, "{step}: completions must equal SHARDS");
                for index in 0..*completions {
                    run_step(
                        &setup,
                        step,
                        *shards,
                        &[("JOB_COMPLETION_INDEX", index.to_string())],
                    );
                }
            }
            None => run_step(&setup, step, *shards, &[]),
        }
    }
    let joined = snapshot(root);
    assert_same_files(root, &whole, &joined, "Kubernetes Indexed Jobs");
}

#[test]
fn shard_auto_outside_a_scheduler_is_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let meta = root.path().join("meta.json");
    std::fs::write(&meta, "{}").unwrap();
    let mut command = Command::new(common::tool("cache-text-encoder"));
    command
        .arg(&meta)
        .arg(fixtures().join("sd15-tiny/model.safetensors"))
        .args(["--shard", "auto"]);
    for name in SCHEDULER_VARIABLES {
        command.env_remove(name);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SLURM_ARRAY_TASK_ID") && stderr.contains("JOB_COMPLETION_INDEX"),
        "{stderr}"
    );
    let output = command.env("JOB_COMPLETION_INDEX", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--shard_count"), "{stderr}");
}
