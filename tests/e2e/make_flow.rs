//! The whole dataset-to-LoRA flow through `make lora`: a first run does everything, a re-run
//! does no model work, one edited caption re-encodes one text-encoder entry and retrains, one
//! replaced image is re-tagged, re-captioned and re-encoded alone, and a second network trains
//! from the same caches without re-encoding. Caption and tag files the user wrote or edited
//! survive every run; `make demo` trains on the example's own captions.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures, tool};

/// What one tool reported at the end of its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    done: usize,
    up_to_date: usize,
    kept: usize,
}

/// Runs `make lora` on `out/dataset` with small settings; returns the counts per tool.
fn run_make(out: &Path, extra: &[&str]) -> BTreeMap<String, Counts> {
    run_make_target("lora", out, extra)
}

/// Runs a make target with `OUT=out` and small settings, parsing the tools' end-of-run summary
/// lines (`N done, M up to date[, K kept (...)], F failed`).
fn run_make_target(target: &str, out: &Path, extra: &[&str]) -> BTreeMap<String, Counts> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = tool("train-lora").parent().unwrap().to_path_buf();
    let output = Command::new("make")
        .arg("-C")
        .arg(repo)
        .arg("--no-print-directory")
        .arg(target)
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
    assert!(output.status.success(), "make {target} failed:\n{text}");
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(": ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() > 5 && words[1] == "done," && words[3] == "up" {
            let kept = match words.get(7) {
                Some(&"kept") => words[6].parse().unwrap(),
                _ => 0,
            };
            counts.insert(
                name.to_string(),
                Counts {
                    done: words[0].parse().unwrap(),
                    up_to_date: words[2].parse().unwrap(),
                    kept,
                },
            );
        }
    }
    counts
}

fn counts(all: &BTreeMap<String, Counts>, tool: &str) -> Counts {
    *all.get(tool)
        .unwrap_or_else(|| panic!("{tool} did not report: {all:?}"))
}

fn done(all: &BTreeMap<String, Counts>, tool: &str) -> usize {
    counts(all, tool).done
}

/// A folder `out/dataset` with the example's six images (no caption or tag files).
fn example_images(out: &Path) -> PathBuf {
    let data = out.join("dataset");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(example()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "png") {
            std::fs::copy(&path, data.join(path.file_name().unwrap())).unwrap();
        }
    }
    data
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-dataset")
}

/// Every caption, tag and backup file of `data`, with its bytes.
fn sidecars(data: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(data)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            [".txt", ".caption", ".bak"]
                .iter()
                .any(|extension| name.ends_with(extension))
        })
        .map(|path| {
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect()
}

#[test]
fn incremental_rebuilds_redo_only_what_changed() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let data = example_images(&out);
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
    assert_eq!(again["train-lora"].up_to_date, 1);

    std::fs::write(
        data.join("astronaut.caption"),
        "an edited caption of an astronaut\n",
    )
    .unwrap();
    let edited = run_make(&out, &[]);
    assert_eq!(done(&edited, "cache-text-encoder"), 1, "{edited:?}");
    assert_eq!(edited["cache-text-encoder"].up_to_date, images - 1);
    for stage in ["tag-images", "caption-images", "prepare-latents"] {
        assert_eq!(done(&edited, stage), 0, "{stage}: {edited:?}");
    }
    assert_eq!(counts(&edited, "caption-images").kept, 1, "{edited:?}");
    assert_eq!(done(&edited, "train-lora"), 1);
    let meta = std::fs::read_to_string(out.join("meta_lat.json")).unwrap();
    assert!(
        meta.contains("an edited caption of an astronaut"),
        "the edited caption was kept"
    );

    // The edited caption is the user's now; replace an image whose files are still generated.
    std::fs::copy(fixtures().join("images/cell.png"), data.join("chelsea.png")).unwrap();
    let replaced = run_make(&out, &[]);
    for stage in [
        "tag-images",
        "caption-images",
        "prepare-latents",
        "cache-text-encoder",
    ] {
        assert_eq!(done(&replaced, stage), 1, "{stage}: {replaced:?}");
    }
    for stage in ["tag-images", "prepare-latents", "cache-text-encoder"] {
        assert_eq!(
            replaced[stage].up_to_date,
            images - 1,
            "{stage}: {replaced:?}"
        );
    }
    assert_eq!(
        counts(&replaced, "caption-images"),
        Counts {
            done: 1,
            up_to_date: images - 2,
            kept: 1
        }
    );
    assert_eq!(
        std::fs::read_to_string(data.join("astronaut.caption")).unwrap(),
        "an edited caption of an astronaut\n"
    );
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

#[test]
fn user_written_captions_and_tags_survive_every_run() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let data = example_images(&out);
    // Hand-written files: both for astronaut, a caption for chelsea, tags for coins; logo, moon
    // and text have none.
    std::fs::copy(
        example().join("astronaut.caption"),
        data.join("astronaut.caption"),
    )
    .unwrap();
    std::fs::write(data.join("astronaut.txt"), "my hand tags, astronaut\n").unwrap();
    std::fs::write(data.join("chelsea.caption"), "my own caption").unwrap();
    std::fs::write(data.join("coins.txt"), b"coins, \xEF\xBB\xBFodd bytes\r\n").unwrap();
    let user_files = sidecars(&data);

    let first = run_make(&out, &[]);
    assert_eq!(
        counts(&first, "caption-images"),
        Counts {
            done: 4,
            up_to_date: 0,
            kept: 2
        }
    );
    assert_eq!(counts(&first, "tag-images").kept, 2, "{first:?}");
    let generated = sidecars(&data);
    assert_eq!(
        generated.len(),
        user_files.len() + 8,
        "{:?}",
        generated.keys()
    );
    let again = run_make(&out, &[]);
    assert_eq!(counts(&again, "caption-images").done, 0);
    assert_eq!(counts(&again, "tag-images").done, 0);
    assert_eq!(
        sidecars(&data),
        generated,
        "a re-run rewrote or moved a file"
    );

    // The normal workflow: fix a generated tag file by hand, train again.
    std::fs::write(data.join("logo.txt"), "logo, my fix\n").unwrap();
    let edited = run_make(&out, &[]);
    assert_eq!(counts(&edited, "tag-images").kept, 3, "{edited:?}");
    let meta = std::fs::read_to_string(out.join("meta_lat.json")).unwrap();
    assert!(meta.contains("my fix"), "the edited tags are trained on");
    assert!(meta.contains("my own caption") && meta.contains("my hand tags"));
    let lint = std::fs::read_to_string(out.join("lint.json")).unwrap();
    assert!(
        lint.contains("\"sidecar_edited\"") && lint.contains("logo.txt"),
        "lint-dataset reports the edited tag file: {lint}"
    );

    // New settings regenerate the generated files only, to what a fresh run writes.
    let strict = ["TAG_FLAGS=--thresh 0.5 --batch_size 4"];
    run_make(&out, &strict);
    let now = sidecars(&data);
    for (name, bytes) in &user_files {
        assert_eq!(&now[name], bytes, "{name} changed");
    }
    assert_eq!(now["logo.txt"], b"logo, my fix\n");
    let fresh_out = root.path().join("fresh");
    let fresh = example_images(&fresh_out);
    run_make(&fresh_out, &strict);
    for stem in ["moon", "text", "chelsea"] {
        let name = format!("{stem}.txt");
        assert_eq!(
            now[&name],
            std::fs::read(fresh.join(&name)).unwrap(),
            "{name}"
        );
    }

    // OVERWRITE=1 replaces the user's files, each after a backup with its exact bytes.
    run_make(&out, &["OVERWRITE=1", strict[0]]);
    let overwritten = sidecars(&data);
    for (name, bytes) in user_files
        .iter()
        .chain([(&"logo.txt".to_string(), &b"logo, my fix\n".to_vec())])
    {
        assert_eq!(&overwritten[&format!("{name}.bak")], bytes, "{name}");
        assert_ne!(&overwritten[name], bytes, "{name} was not replaced");
    }
    for stem in ["astronaut", "coins", "logo"] {
        let name = format!("{stem}.txt");
        assert_eq!(
            overwritten[&name],
            std::fs::read(fresh.join(&name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn make_demo_trains_on_the_example_captions() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("demo");
    let report = run_make_target("demo", &out, &[]);
    assert_eq!(
        counts(&report, "caption-images"),
        Counts {
            done: 0,
            up_to_date: 0,
            kept: 6
        }
    );
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(name)).unwrap()).unwrap()
    };
    // The merged metadata holds the example's captions; training reads them after
    // clean-captions' rewording (sd-scripts' rules, e.g. "woman" -> "girl").
    let (merged, cleaned, trained) = (
        read("meta_cap.json"),
        read("meta_clean.json"),
        read("meta_lat.json"),
    );
    let entries = merged.as_object().unwrap();
    assert_eq!(entries.len(), 6);
    for (key, entry) in entries {
        let stem = Path::new(key).file_stem().unwrap().to_string_lossy();
        let caption = std::fs::read_to_string(example().join(format!("{stem}.caption"))).unwrap();
        assert_eq!(entry["caption"], caption.trim(), "{key}");
        assert_eq!(trained[key]["caption"], cleaned[key]["caption"], "{key}");
        assert_eq!(
            std::fs::read_to_string(out.join("dataset").join(format!("{stem}.caption"))).unwrap(),
            caption
        );
    }
}

#[test]
fn every_make_variable_the_docs_name_is_read_by_the_makefile() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let makefile = std::fs::read_to_string(repo.join("Makefile")).unwrap();
    let variable = regex::Regex::new(r"\b([A-Z][A-Z0-9_]{2,})=").unwrap();
    let mut named = 0;
    for doc in ["README.md", "docs/make.md"] {
        let text = std::fs::read_to_string(repo.join(doc)).unwrap();
        for found in variable.captures_iter(&text) {
            let name = &found[1];
            named += 1;
            assert!(
                makefile.contains(&format!("$({name})")),
                "{doc} names the make variable {name}, which the Makefile does not read"
            );
        }
    }
    assert!(named >= 10, "only {named} variables found in the docs");
}

#[test]
fn your_data_without_model_is_refused_instead_of_using_the_test_models() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("img");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(fixtures().join("images/astronaut.png"), data.join("a.png")).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = tool("train-lora").parent().unwrap().to_path_buf();
    let out = root.path().join("out");
    let output = Command::new("make")
        .arg("-C")
        .arg(repo)
        .arg("--no-print-directory")
        .arg("lora")
        .arg(format!("OUT={}", out.display()))
        .arg(format!("DATA={}", data.display()))
        .arg(format!("BIN={}", bin.display()))
        .arg("SKIP_BUILD=1")
        .output()
        .expect("make runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "make lora ran on the test models");
    assert!(stderr.contains("tiny test model"), "{stderr}");
    assert!(!out.join("lora").exists());
    assert!(!data.join("a.txt").exists(), "tagged with the test tagger");
}

/// `make lora DATA=img REG=reg MODEL=...` on the layout of a real sd-scripts run (DreamBooth
/// folders with regularisation images): prepare-dataset describes it (no tagging or captioning),
/// and the LoRA records sd-scripts' image counts for it.
#[test]
fn a_kohya_layout_with_regularisation_images_trains_through_make() {
    let root = tempfile::tempdir().unwrap();
    crate::prepare_dataset::dreambooth_reg(root.path());
    let (img, reg, out) = (
        root.path().join("img"),
        root.path().join("reg"),
        root.path().join("out"),
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = tool("train-lora").parent().unwrap().to_path_buf();
    let model = fixtures().join("sd15-tiny/model.safetensors");
    let output = Command::new("make")
        .arg("-C")
        .arg(repo)
        .arg("--no-print-directory")
        .arg("lora")
        .arg(format!("OUT={}", out.display()))
        .arg(format!("DATA={}", img.display()))
        .arg(format!("REG={}", reg.display()))
        .arg(format!("MODEL={}", model.display()))
        .arg(format!("BIN={}", bin.display()))
        .args(["SKIP_BUILD=1", "STEPS=2", "CAPTION_EXT=.txt", "QUIET=-q"])
        .output()
        .expect("make runs");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "make lora failed:\n{text}");
    assert!(!text.contains("tag-images"), "no tagging: {text}");
    let metadata =
        lorakit_pipeline::networks::lora::LoraFile::read(&out.join("lora/lora.safetensors"))
            .unwrap()
            .metadata;
    assert_eq!(metadata["ss_num_train_images"], "24");
    assert_eq!(metadata["ss_num_reg_images"], "2");
}
