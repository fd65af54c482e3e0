//! The whole dataset-to-LoRA flow through `make lora`: a first run does everything, a re-run
//! does no model work, one edited caption re-encodes one text-encoder entry and retrains, one
//! replaced image is re-tagged, re-captioned and re-encoded alone, and a second network trains
//! from the same caches without re-encoding.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{fixtures, tool};

/// `(done, up_to_date)` per tool, parsed from the tools' end-of-run summary lines.
fn run_make(out: &Path, extra: &[&str]) -> BTreeMap<String, (usize, usize)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = tool("train-lora").parent().unwrap().to_path_buf();
    let output = Command::new("make")
        .arg("-C")
        .arg(repo)
        .arg("--no-print-directory")
        .arg("lora")
        .arg(format!("OUT={}", out.display()))
        .arg(format!("DATA={}", out.join("dataset").display()))
        .arg(format!("BIN={}", bin.display()))
        .args([
            "SKIP_BUILD=1",
            "RES=128,128",
            "MIN_BUCKET=64",
            "MAX_BUCKET=256",
            "STEPS=2",
            "BATCH=2",
        ])
        .args(extra)
        .output()
        .expect("make runs");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "make lora failed:\n{text}");
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(": ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() > 5 && words[1] == "done," && words[3] == "up" {
            counts.insert(
                name.to_string(),
                (words[0].parse().unwrap(), words[2].parse().unwrap()),
            );
        }
    }
    counts
}

fn done(counts: &BTreeMap<String, (usize, usize)>, tool: &str) -> usize {
    counts
        .get(tool)
        .unwrap_or_else(|| panic!("{tool} did not report: {counts:?}"))
        .0
}

#[test]
fn incremental_rebuilds_redo_only_what_changed() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let data = out.join("dataset");
    std::fs::create_dir_all(&data).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-dataset");
    for entry in std::fs::read_dir(&example).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "png") {
            std::fs::copy(&path, data.join(path.file_name().unwrap())).unwrap();
        }
    }
    let images = 6;

    let first = run_make(&out, &[]);
    for stage in [
        "tag-images",
        "caption-images",
        "prepare-latents",
        "cache-text-encoder",
    ] {
        assert_eq!(done(&first, stage), images, "{stage}: {first:?}");
    }
    assert_eq!(done(&first, "train-lora"), 1);
    let lora = out.join("lora/lora.safetensors");
    assert!(lora.is_file());
    let plot = image::open(out.join("lora/lora_loss.png")).expect("the loss plot is a PNG");
    assert_eq!((plot.width(), plot.height()), (800, 450));

    let again = run_make(&out, &[]);
    for stage in [
        "tag-images",
        "caption-images",
        "prepare-latents",
        "cache-text-encoder",
        "train-lora",
    ] {
        assert_eq!(
            done(&again, stage),
            0,
            "{stage} did work on an unchanged dataset: {again:?}"
        );
    }
    assert_eq!(again["train-lora"].1, 1);

    std::fs::write(
        data.join("astronaut.caption"),
        "an edited caption of an astronaut\n",
    )
    .unwrap();
    let edited = run_make(&out, &[]);
    assert_eq!(done(&edited, "cache-text-encoder"), 1, "{edited:?}");
    assert_eq!(edited["cache-text-encoder"].1, images - 1);
    for stage in ["tag-images", "caption-images", "prepare-latents"] {
        assert_eq!(done(&edited, stage), 0, "{stage}: {edited:?}");
    }
    assert_eq!(done(&edited, "train-lora"), 1);
    let meta = std::fs::read_to_string(out.join("meta_lat.json")).unwrap();
    assert!(
        meta.contains("an edited caption of an astronaut"),
        "the edited caption was kept"
    );

    std::fs::copy(
        fixtures().join("images/cell.png"),
        data.join("astronaut.png"),
    )
    .unwrap();
    let replaced = run_make(&out, &[]);
    for stage in [
        "tag-images",
        "caption-images",
        "prepare-latents",
        "cache-text-encoder",
    ] {
        assert_eq!(done(&replaced, stage), 1, "{stage}: {replaced:?}");
        assert_eq!(replaced[stage].1, images - 1, "{stage}: {replaced:?}");
    }
    assert_eq!(done(&replaced, "train-lora"), 1);

    let second_network = run_make(&out, &["NAME=rank8", "DIM=8", "ALPHA=4"]);
    for stage in [
        "tag-images",
        "caption-images",
        "prepare-latents",
        "cache-text-encoder",
    ] {
        assert_eq!(
            done(&second_network, stage),
            0,
            "{stage}: {second_network:?}"
        );
    }
    assert_eq!(done(&second_network, "train-lora"), 1);
    assert!(out.join("lora/rank8.safetensors").is_file() && lora.is_file());
}
