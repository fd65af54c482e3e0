//! One dataset prepared at several settings: the latent caches of each coexist (sd-scripts'
//! names plus `.lorakit/latents/`), every metadata trains from its own, `prepare-latents
//! --prune` removes exactly the caches the metadata does not use, and the tools' bookkeeping
//! files live in the dataset's `.lorakit/` folder (older layouts are moved there).

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{copy_dir, fixtures, run, run_expect};
use lorakit_pipeline::formats::manifest::Manifest;
use lorakit_pipeline::formats::npz::{self, NpzReader};

const IMAGES: [&str; 3] = ["astronaut.png", "chelsea.png", "coins.png"];

fn model() -> PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

/// A dataset of [`IMAGES`] with stem-keyed captions in `meta.json`.
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir(&data).unwrap();
    let mut meta = serde_json::Map::new();
    for name in IMAGES {
        std::fs::copy(fixtures().join("images").join(name), data.join(name)).unwrap();
        let stem = name.trim_end_matches(".png");
        meta.insert(
            stem.into(),
            serde_json::json!({"caption": format!("a {stem}")}),
        );
    }
    std::fs::write(root.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    data
}

/// `prepare-latents` at `--max_resolution side,side`; returns its stderr and stdout.
fn prepare(root: &Path, out: &str, side: u32, extra: &[&str]) -> (String, String) {
    let resolution = format!("{side},{side}");
    let mut args = common::os(&[
        &root.join("data"),
        &root.join("meta.json"),
        &root.join(out),
        &model(),
        &"--max_resolution",
        &resolution,
        &"--min_bucket_reso",
        &"64",
        &"--max_bucket_reso",
        &"256",
        &"--bucket_reso_steps",
        &"64",
    ]);
    args.extend(extra.iter().map(Into::into));
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let output = run("prepare-latents", &refs);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    (stderr, String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Every `.npz` file under `dir` (relative, `/`-separated).
fn npz_files(dir: &Path) -> BTreeSet<String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "npz"))
        .map(|e| lorakit_pipeline::dataset::relative_name(dir, e.path()))
        .collect()
}

/// A one-step `train-lora` run from `meta`, writing `out/<name>.safetensors`.
fn train_run(root: &Path, meta: &str, name: &str) -> std::process::Output {
    run(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model(),
            "--in_json",
            root.join(meta),
            "--train_data_dir",
            root.join("data"),
            "--output_dir",
            root.join("out"),
            "--output_name",
            name,
            "--max_train_steps",
            "1",
            // These runs check which caches are read, the text-encoder caches among them.
            "--network_train_unet_only",
            "--quiet"
        ],
    )
}

/// [`train_run`], which must succeed.
fn train(root: &Path, meta: &str, name: &str) {
    let output = train_run(root, meta, name);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(root
        .join("out")
        .join(format!("{name}.safetensors"))
        .is_file());
}

/// The latent cache file `meta`'s manifest names the key of for `stem`, and its bucket.
fn cache_of(root: &Path, meta: &str, stem: &str) -> (String, Vec<usize>) {
    let manifest = Manifest::read_for(&root.join(meta)).unwrap().unwrap();
    let key = &manifest.items[stem];
    let data = root.join("data");
    for name in npz_files(&data) {
        let path = data.join(&name);
        let mut reader = NpzReader::open(&path).unwrap();
        if npz::stored_key(&mut reader).as_deref() == Some(key.as_str()) {
            return (name, reader.shape("latents").unwrap());
        }
    }
    panic!("no cache of {stem} holds the key of {meta}");
}

#[test]
fn two_preparations_coexist_and_each_trains() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let data = dataset(root);
    let (stderr, _) = prepare(root, "meta_a.json", 128, &[]);
    assert!(stderr.contains("3 done, 0 up to date"), "{stderr}");
    let (stderr, _) = prepare(root, "meta_b.json", 192, &[]);
    assert!(stderr.contains("3 done, 0 up to date"), "{stderr}");
    assert!(stderr.contains(".lorakit/latents/"), "{stderr}");

    // A's caches keep sd-scripts' names; B's sit beside them, keyed.
    for name in IMAGES {
        let stem = name.trim_end_matches(".png");
        let (a, a_shape) = cache_of(root, "meta_a.json", stem);
        let (b, b_shape) = cache_of(root, "meta_b.json", stem);
        assert!(
            a.starts_with(&format!("{stem}_")) && a.ends_with("_sd.npz"),
            "{a}"
        );
        assert!(b.starts_with(&format!(".lorakit/latents/{stem}_")), "{b}");
        assert_ne!(
            a_shape, b_shape,
            "{stem}: the two settings have other buckets"
        );
    }
    // Both stay up to date.
    for (meta, side) in [("meta_a.json", 128), ("meta_b.json", 192)] {
        let (stderr, _) = prepare(root, meta, side, &[]);
        assert!(stderr.contains("0 done, 3 up to date"), "{meta}: {stderr}");
    }

    run_expect(
        "cache-text-encoder",
        args![root.join("meta_a.json"), model(), "--train_data_dir", data],
        0,
    );
    train(root, "meta_a.json", "a");
    train(root, "meta_b.json", "b");

    // lint with either setting: its own caches are current, the other's (sd-scripts-named or
    // keyed) are not stale or orphaned, and `.lorakit/` is not a hidden folder to it.
    for (meta, side) in [("meta_a.json", "128"), ("meta_b.json", "192")] {
        let output = run(
            "lint-dataset",
            args![
                data,
                "--json",
                "-q",
                "--model",
                model(),
                "--resolution",
                side,
                "--min_bucket_reso",
                "64",
                "--max_bucket_reso",
                "256",
                "--in_json",
                root.join(meta)
            ],
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        for finding in report["findings"].as_array().unwrap() {
            let path = finding["path"].as_str().unwrap();
            assert!(!path.contains(".lorakit"), "{meta}: {finding}");
            assert!(
                finding["code"] != "stale_cache" && finding["code"] != "orphaned_cache",
                "{meta}: {finding}"
            );
        }
    }

    // Text-encoder caches keep one name per image: another run (here with --clip_skip 2)
    // replaces them, and training from the metadata whose index lists the old keys refuses
    // them instead of training on the other settings' text states.
    run_expect(
        "cache-text-encoder",
        args![
            root.join("meta_b.json"),
            model(),
            "--train_data_dir",
            data,
            "--clip_skip",
            "2"
        ],
        0,
    );
    let output = train_run(root, "meta_a.json", "a_again");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("meta_a_te_cache.json"), "{stderr}");
    train(root, "meta_b.json", "b2");
}

#[test]
fn prune_removes_exactly_the_caches_the_metadata_does_not_use() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let data = dataset(root);
    prepare(root, "meta_a.json", 128, &[]);
    prepare(root, "meta_b.json", 192, &[]);
    let before = npz_files(&data);
    assert_eq!(before.len(), 6, "{before:?}");
    // Not ours: an npz named like a cache without a lorakit key, and another file.
    common::write_npz_f32(
        &data.join("notes_0064x0064_sd.npz"),
        "latents",
        vec![0.0; 4],
        &[4, 1, 1],
    );
    std::fs::write(data.join(".lorakit/latents/keep.txt"), b"x").unwrap();
    // chelsea is replaced by another picture: its caches of both settings are stale.
    std::fs::copy(fixtures().join("images/moon.png"), data.join("chelsea.png")).unwrap();

    // lint names the keyed cache of the replaced image (its image hash differs).
    let output = run("lint-dataset", args![data, "--json", "-q"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let orphaned: Vec<String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "orphaned_cache")
        .map(|f| {
            lorakit_pipeline::dataset::relative_name(&data, Path::new(f["path"].as_str().unwrap()))
        })
        .collect();
    assert!(
        orphaned.contains(&cache_of_name(&before, "chelsea.png", true)),
        "{orphaned:?}"
    );

    let (stderr, stdout) = prepare(root, "meta_b.json", 192, &["--prune"]);
    assert!(stderr.contains("1 done, 2 up to date"), "{stderr}");
    let pruned: BTreeSet<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("pruned "))
        .map(|p| lorakit_pipeline::dataset::relative_name(&data, Path::new(p)))
        .collect();
    let a_caches: BTreeSet<String> = IMAGES
        .iter()
        .map(|n| cache_of_name(&before, n, false))
        .collect();
    let old_chelsea_b = cache_of_name(&before, "chelsea.png", true);
    let expected: BTreeSet<String> = a_caches.iter().cloned().chain([old_chelsea_b]).collect();
    assert_eq!(pruned, expected, "{stdout}");
    // B's keyed caches moved to the freed sd-scripts names; nothing else was touched.
    let after = npz_files(&data);
    assert_eq!(after.len(), 4, "{after:?}");
    assert!(after.contains("notes_0064x0064_sd.npz"));
    assert!(data.join(".lorakit/latents/keep.txt").is_file());
    for name in IMAGES {
        let stem = name.trim_end_matches(".png");
        let (cache, _) = cache_of(root, "meta_b.json", stem);
        assert!(!cache.starts_with(".lorakit"), "{cache}");
    }
    assert!(after.contains("chelsea_0512x0512_sd.npz"), "{after:?}");
    let (stderr, _) = prepare(root, "meta_b.json", 192, &[]);
    assert!(stderr.contains("0 done, 3 up to date"), "{stderr}");

    // A's caches are gone, so its metadata no longer trains; the message says what to run.
    let output = train_run(root, "meta_a.json", "a_again");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("prepare-latents"));

    // --prune and --shard do not mix.
    let output = run(
        "prepare-latents",
        args![
            data,
            root.join("meta.json"),
            root.join("meta_c.json"),
            model(),
            "--prune",
            "--shard",
            "0/2"
        ],
    );
    assert_eq!(output.status.code(), Some(2));
}

/// The cache of image `name` in `files`: its sd-scripts-named one, or its keyed one.
fn cache_of_name(files: &BTreeSet<String>, name: &str, keyed: bool) -> String {
    let stem = name.trim_end_matches(".png");
    let prefix = if keyed {
        format!(".lorakit/latents/{stem}_")
    } else {
        format!("{stem}_")
    };
    let found: Vec<&String> = files.iter().filter(|f| f.starts_with(&prefix)).collect();
    assert_eq!(found.len(), 1, "{name}: {files:?}");
    found[0].clone()
}

#[test]
fn bookkeeping_lives_in_lorakit_and_the_old_layout_is_moved_there() {
    common::use_project_runtime();
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let data = root.join("data");
    std::fs::create_dir(&data).unwrap();
    for name in ["astronaut.png", "coins.png"] {
        std::fs::copy(fixtures().join("images").join(name), data.join(name)).unwrap();
    }
    let models = root.join("models");
    copy_dir(
        &fixtures().join("wd14-tiny"),
        &models.join("SmilingWolf_wd-v1-4-convnext-tagger-v2"),
    );
    let tag = || run_expect("tag-images", args![data, "--model_dir", models], 0);
    let caption = || {
        run_expect(
            "caption-images",
            args![data, "--caption_weights", fixtures().join("blip-tiny")],
            0,
        )
    };
    tag();
    caption();
    let store = data.join(".lorakit/tag-probs.bin");
    let index = data.join(".lorakit/caption-images.caption.json");
    for file in [&store, &index] {
        assert!(file.is_file(), "{}", file.display());
        assert!(Manifest::path_for(file).is_file(), "{}", file.display());
    }
    let visible: BTreeSet<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        visible,
        [
            ".lorakit",
            "astronaut.caption",
            "astronaut.png",
            "astronaut.txt",
            "coins.caption",
            "coins.png",
            "coins.txt"
        ]
        .map(String::from)
        .into(),
    );

    // The layout of earlier versions: both files (and manifests) straight in the image folder.
    let legacy_store = data.join(".lorakit-tag-probs.bin");
    let legacy_index = data.join("caption-images.caption.json");
    for (new, old) in [(&store, &legacy_store), (&index, &legacy_index)] {
        std::fs::rename(new, old).unwrap();
        std::fs::rename(Manifest::path_for(new), Manifest::path_for(old)).unwrap();
    }
    std::fs::remove_dir_all(data.join(".lorakit")).unwrap();
    let stderr = tag();
    assert!(
        stderr.contains("moved") && stderr.contains(".lorakit"),
        "{stderr}"
    );
    assert!(
        stderr.contains("0 done, 2 up to date"),
        "the store moved, not rebuilt: {stderr}"
    );
    let stderr = caption();
    assert!(stderr.contains("moved"), "{stderr}");
    assert!(stderr.contains("0 done, 2 up to date"), "{stderr}");
    for (new, old) in [(&store, &legacy_store), (&index, &legacy_index)] {
        assert!(new.is_file() && Manifest::path_for(new).is_file());
        assert!(!old.exists() && !Manifest::path_for(old).exists());
    }
    // Said once: the next run has nothing to move.
    assert!(!tag().contains("moved"));
}
