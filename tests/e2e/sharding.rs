//! End-to-end test of `--shard i/n`: every per-image stage (`tag-images`, `caption-images`,
//! `prepare-latents`, `cache-text-encoder`) run as 3 shards in one folder, the shard outputs
//! joined with `merge-shards`, leaves exactly the files of the unsharded run, byte for byte
//! (tag and caption files, latent and text-encoder caches, metadata JSON with
//! `train_resolution`, caption and cache indexes, the tag-probability store, every manifest).

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use common::{copy_dir, fixtures, run};
use lorakit_pipeline::dataset::shard::Shard;
use lorakit_pipeline::formats::npz::NpzReader;

const SHARDS: u64 = 3;
/// Six photos (one JPEG); each of the 3 shards gets some of them (asserted).
const IMAGES: [&str; 6] = [
    "astronaut.png",
    "chelsea.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "logo.png",
    "text.png",
];

/// A folder with the test images, the tagger laid out as sd-scripts expects, and a metadata
/// JSON (captions, `--full_path` keys) with one entry whose image does not exist.
struct Setup {
    root: tempfile::TempDir,
    data: PathBuf,
    models: PathBuf,
    meta: PathBuf,
    missing_key: String,
}

fn setup() -> Setup {
    common::use_project_runtime();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for name in IMAGES {
        std::fs::copy(fixtures().join("images").join(name), data.join(name)).unwrap();
    }
    let models = root.path().join("models");
    copy_dir(
        &fixtures().join("wd14-tiny"),
        &models.join("SmilingWolf_wd-v1-4-convnext-tagger-v2"),
    );
    let mut meta = serde_json::Map::new();
    for (n, name) in IMAGES.iter().enumerate() {
        meta.insert(
            data.join(name).display().to_string(),
            serde_json::json!({"caption": format!("a photo number {n}"), "tags": "cat, solo"}),
        );
    }
    let missing_key = data.join("missing.png").display().to_string();
    meta.insert(
        missing_key.clone(),
        serde_json::json!({"caption": "an image that is not there"}),
    );
    let meta_path = root.path().join("meta.json");
    std::fs::write(
        &meta_path,
        serde_json::to_vec_pretty(&serde_json::Value::Object(meta)).unwrap(),
    )
    .unwrap();
    Setup {
        root,
        data,
        models,
        meta: meta_path,
        missing_key,
    }
}

/// Every file under `dir` (relative path -> bytes).
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    files
}

/// Deletes every file under `dir` that is not in `keep`.
pub(crate) fn restore(dir: &Path, keep: &BTreeMap<PathBuf, Vec<u8>>) {
    for path in snapshot(dir).keys() {
        if !keep.contains_key(path) {
            std::fs::remove_file(dir.join(path)).unwrap();
        }
    }
}

fn shard(index: u64) -> Shard {
    Shard {
        index,
        count: SHARDS,
    }
}

/// Runs `tool` with `args` and asserts its exit code.
fn run_code(tool: &str, args: &[OsString], code: i32) {
    let output = run(
        tool,
        &args.iter().map(OsString::as_os_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        output.status.code(),
        Some(code),
        "{tool} {args:?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn os_args(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// One stage: its tool, arguments, its run outputs (unsharded paths) and exit codes.
struct Stage {
    tool: &'static str,
    args: Vec<OsString>,
    /// The run outputs that every shard writes under a shard-named path.
    outputs: Vec<PathBuf>,
    /// `merge-shards --order_like`.
    order_like: Option<PathBuf>,
    /// Whether the run reports the metadata entry without an image (exit code 3).
    reports_missing: bool,
}

/// Runs `stage` unsharded, then as 3 shards plus `merge-shards` in the same folder, and asserts
/// that both leave the same files with the same bytes.
fn assert_shards_join_to_the_whole(setup: &Setup, stage: Stage) {
    let root = setup.root.path();
    let inputs = snapshot(root);
    let missing_code = |owns_missing: bool| if owns_missing { 3 } else { 0 };

    run_code(stage.tool, &stage.args, missing_code(stage.reports_missing));
    let whole = snapshot(root);
    for output in &stage.outputs {
        assert!(
            whole.contains_key(output.strip_prefix(root).unwrap()),
            "{} did not write {}",
            stage.tool,
            output.display()
        );
    }
    restore(root, &inputs);

    let mut shard_outputs: Vec<Vec<PathBuf>> = vec![Vec::new(); stage.outputs.len()];
    for index in 0..SHARDS {
        let mut args = stage.args.clone();
        args.push("--shard".into());
        args.push(format!("{index}/{SHARDS}").into());
        // An entry without an image belongs to the shard of its metadata key.
        let owns_missing = stage.reports_missing && shard(index).contains(&setup.missing_key);
        run_code(stage.tool, &args, missing_code(owns_missing));
        for (joined, output) in shard_outputs.iter_mut().zip(&stage.outputs) {
            let path = shard(index).output_path(output);
            assert!(path.is_file(), "{} missing", path.display());
            joined.push(path);
        }
    }
    for (output, parts) in stage.outputs.iter().zip(&shard_outputs) {
        assert_incomplete_set_refused(output, parts);
        let mut args = os_args(&[output]);
        args.extend(parts.iter().map(|p| p.as_os_str().to_os_string()));
        if let Some(order) = &stage.order_like {
            args.extend(os_args(&[&"--order_like", order]));
        }
        run_code("merge-shards", &args, missing_code(stage.reports_missing));
        for part in parts {
            std::fs::remove_file(part).unwrap();
            std::fs::remove_file(lorakit_pipeline::formats::manifest::Manifest::path_for(
                part,
            ))
            .unwrap();
        }
    }
    let joined = snapshot(root);
    assert_eq!(
        joined.keys().collect::<Vec<_>>(),
        whole.keys().collect::<Vec<_>>(),
        "{}: the shards wrote other files than the unsharded run",
        stage.tool
    );
    for (path, bytes) in &whole {
        if path.extension().is_some_and(|e| e == "npz") {
            assert_caches_match(&root.join(path), bytes);
            continue;
        }
        assert!(
            joined[path] == *bytes,
            "{}: {} differs between the unsharded and the sharded run:\n{}\n---\n{}",
            stage.tool,
            path.display(),
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&joined[path])
        );
    }
    restore(root, &inputs);
}

/// `merge-shards` refuses the shard outputs `parts` without the middle one (exit code 2, naming
/// the missing file) and with a whole output in its place (exit code 1, naming it), and writes
/// nothing.
fn assert_incomplete_set_refused(output: &Path, parts: &[PathBuf]) {
    let without_middle = os_args(&[&output, &parts[0], &parts[2]]);
    let stderr = common::run_expect(
        "merge-shards",
        &without_middle
            .iter()
            .map(OsString::as_os_str)
            .collect::<Vec<_>>(),
        2,
    );
    let missing = parts[1].file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr.contains(&missing), "{stderr}");
    assert!(
        !output.exists(),
        "a refused merge wrote {}",
        output.display()
    );

    let whole = output.with_file_name("lorakit-whole-output.json");
    std::fs::copy(&parts[1], &whole).unwrap();
    std::fs::copy(
        lorakit_pipeline::formats::manifest::Manifest::path_for(&parts[1]),
        lorakit_pipeline::formats::manifest::Manifest::path_for(&whole),
    )
    .unwrap();
    let mut manifest = lorakit_pipeline::formats::manifest::Manifest::read_for(&whole)
        .unwrap()
        .unwrap();
    manifest.shard = None;
    manifest.write_for(&whole).unwrap();
    let with_whole = os_args(&[&output, &parts[0], &whole, &parts[2]]);
    let stderr = common::run_expect(
        "merge-shards",
        &with_whole
            .iter()
            .map(OsString::as_os_str)
            .collect::<Vec<_>>(),
        1,
    );
    assert!(stderr.contains("lorakit-whole-output.json"), "{stderr}");
    assert!(
        !output.exists(),
        "a refused merge wrote {}",
        output.display()
    );
    for file in [
        whole.clone(),
        lorakit_pipeline::formats::manifest::Manifest::path_for(&whole),
    ] {
        std::fs::remove_file(file).unwrap();
    }
}

/// A cache file (latents or text-encoder outputs) of the sharded run against the unsharded
/// run's bytes `expected`: the same arrays, exact except the model outputs, which may differ by
/// float rounding because the shards batch other items together (matrix products then sum in
/// another order).
pub(crate) fn assert_caches_match(path: &Path, expected: &[u8]) {
    let reference = path.with_extension("unsharded.npz");
    std::fs::write(&reference, expected).unwrap();
    let mut ours = NpzReader::open(path).unwrap();
    let mut theirs = NpzReader::open(&reference).unwrap();
    std::fs::remove_file(&reference).unwrap();
    assert_eq!(ours.keys(), theirs.keys(), "{}", path.display());
    for key in ours.keys() {
        match key.as_str() {
            "original_size" | "input_ids" => {
                assert_eq!(ours.read_i64(&key).unwrap(), theirs.read_i64(&key).unwrap())
            }
            "crop_ltrb" => assert_eq!(ours.read_f64(&key).unwrap(), theirs.read_f64(&key).unwrap()),
            "lorakit_key" | "lorakit_source" => {
                assert_eq!(ours.read_u8(&key).unwrap(), theirs.read_u8(&key).unwrap())
            }
            _ => {
                let (a, shape_a) = ours.read_f32(&key).unwrap();
                let (b, shape_b) = theirs.read_f32(&key).unwrap();
                assert_eq!(shape_a, shape_b, "{key}");
                let gap = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(gap <= 1e-5, "{}: {key} differs by {gap}", path.display());
            }
        }
    }
}

#[test]
fn every_per_image_stage_sharded_in_three_equals_the_unsharded_run() {
    let setup = setup();
    let data = &setup.data;
    // Every shard has work, so the joins are really exercised.
    for index in 0..SHARDS {
        assert!(
            IMAGES
                .iter()
                .any(|name| shard(index).contains_image(data, &data.join(name))),
            "shard {index} has no image"
        );
    }
    let sd15 = fixtures().join("sd15-tiny/model.safetensors");
    let lat_json = setup.root.path().join("meta_lat.json");

    assert_shards_join_to_the_whole(
        &setup,
        Stage {
            tool: "tag-images",
            args: os_args(&[data, &"--model_dir", &setup.models, &"--batch_size", &"4"]),
            outputs: vec![data.join(".lorakit/tag-probs.bin")],
            order_like: None,
            reports_missing: false,
        },
    );
    assert_shards_join_to_the_whole(
        &setup,
        Stage {
            tool: "caption-images",
            args: os_args(&[
                data,
                &"--caption_weights",
                &fixtures().join("blip-tiny"),
                &"--beam_search",
                &"--batch_size",
                &"2",
            ]),
            outputs: vec![data.join(".lorakit/caption-images.caption.json")],
            order_like: None,
            reports_missing: false,
        },
    );
    assert_shards_join_to_the_whole(
        &setup,
        Stage {
            tool: "prepare-latents",
            args: os_args(&[
                data,
                &setup.meta,
                &lat_json,
                &sd15,
                &"--full_path",
                &"--max_resolution",
                &"128,128",
                &"--min_bucket_reso",
                &"64",
                &"--max_bucket_reso",
                &"256",
                &"--batch_size",
                &"2",
                &"--seed",
                &"42",
            ]),
            outputs: vec![lat_json.clone()],
            order_like: Some(setup.meta.clone()),
            reports_missing: true,
        },
    );
    assert_shards_join_to_the_whole(
        &setup,
        Stage {
            tool: "cache-text-encoder",
            args: os_args(&[&setup.meta, &sd15, &"--full_path", &"--batch_size", &"2"]),
            outputs: vec![setup.root.path().join("meta_te_cache.json")],
            order_like: Some(setup.meta.clone()),
            reports_missing: true,
        },
    );
}
