//! End-to-end tests of `cache-text-encoder`: cache files against the sd-scripts text-encoder
//! goldens (tests/fixtures/README.md §2e), incremental re-runs, variants and bad inputs.

use crate::common;

use std::path::{Path, PathBuf};

use common::{fixtures, run_expect};
use serde_json::{json, Value};

fn model() -> PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

fn golden_captions() -> serde_json::Map<String, Value> {
    let path = fixtures().join("golden/text_encoder/captions.json");
    let value: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    value["captions"].as_object().unwrap().clone()
}

/// A metadata JSON keyed by the golden caption names, each caption in the `caption` field.
fn write_metadata(path: &Path, captions: &serde_json::Map<String, Value>) {
    let entries: serde_json::Map<String, Value> = captions
        .iter()
        .map(|(name, text)| (name.clone(), json!({ "caption": text })))
        .collect();
    std::fs::write(
        path,
        serde_json::to_vec_pretty(&Value::Object(entries)).unwrap(),
    )
    .unwrap();
}

/// Reads one array of an npz file as f64 values with its shape and numpy dtype string.
fn npz_array(path: &Path, name: &str) -> (Vec<f64>, Vec<u64>, String) {
    let mut archive =
        npyz::npz::NpzArchive::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let array = archive
        .by_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("{} has no {name}", path.display()));
    let shape = array.shape().to_vec();
    let dtype = array.dtype().descr().trim_matches('\'').to_string();
    let values = if dtype.contains("f4") {
        array
            .into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    } else if dtype.contains("f2") {
        array
            .into_vec::<half::f16>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    } else if dtype.contains("i8") {
        array
            .into_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as f64)
            .collect()
    } else {
        array
            .into_vec::<u8>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    (values, shape, dtype)
}

fn golden(name: &str) -> Vec<f64> {
    npz_array(
        &fixtures().join("golden/text_encoder/text_encoder.npz"),
        name,
    )
    .0
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn cache_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}_te_outputs.npz"))
}

#[test]
fn cache_files_match_sd_scripts_hidden_states_and_rerun_is_incremental() {
    let root = tempfile::tempdir().unwrap();
    let meta = root.path().join("meta.json");
    let cache = root.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let mut captions = golden_captions();
    write_metadata(&meta, &captions);

    for (length, clip_skip) in [("75", "2"), ("225", "1")] {
        let stderr = run_expect(
            "cache-text-encoder",
            args![
                meta,
                model(),
                "--cache_dir",
                cache,
                "--max_token_length",
                length,
                "--clip_skip",
                clip_skip,
                "--batch_size",
                "3"
            ],
            0,
        );
        assert!(stderr.contains("8 done, 0 up to date"), "{stderr}");
        let truncated = stderr.contains("2 caption(s) exceeded --max_token_length 75");
        assert_eq!(
            truncated,
            length == "75",
            "t100 and t200 are cut only at 75: {stderr}"
        );
        for name in captions.keys() {
            let file = cache_file(&cache, name);
            let (hidden, shape, dtype) = npz_array(&file, "hidden_state");
            let expected_len = if length == "75" { 77 } else { 227 };
            assert_eq!(shape, [expected_len, 64], "{name}");
            assert_eq!(dtype, "<f4");
            let diff = max_abs(
                &hidden,
                &golden(&format!("{name}__hidden_{length}_clipskip{clip_skip}")),
            );
            assert!(
                diff <= 1e-4,
                "{name} at {length}/{clip_skip}: max abs {diff}"
            );
            let (ids, _, dtype) = npz_array(&file, "input_ids");
            assert_eq!(dtype, "<i8");
            assert_eq!(ids, golden(&format!("{name}__ids_{length}")), "{name}");
        }
    }

    // The incremental runs below all use the 225-token settings.
    let model = model();
    let encode_225 = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = args![
            meta,
            model,
            "--cache_dir",
            cache,
            "--max_token_length",
            "225"
        ]
        .to_vec();
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        run_expect("cache-text-encoder", &args, 0)
    };

    // Unchanged: nothing re-encoded. One caption edited: only it is.
    let stderr = encode_225(&[]);
    assert!(stderr.contains("0 done, 8 up to date"), "{stderr}");
    // A temporary file left by a killed run is not a cache and so not an orphan either.
    std::fs::write(cache.join(".lorakit-tmp-1-0-short_te_outputs.npz"), b"PK").unwrap();
    let stderr = encode_225(&[]);
    assert!(!stderr.contains("belong to no metadata entry"), "{stderr}");
    captions.insert("short".into(), json!("a photo of a dog"));
    write_metadata(&meta, &captions);
    let stderr = encode_225(&[]);
    assert!(stderr.contains("1 done, 7 up to date"), "{stderr}");

    let index: Value =
        serde_json::from_slice(&std::fs::read(cache.join("meta_te_cache.json")).unwrap()).unwrap();
    assert_eq!(index["schema"], "lorakit.te_cache/v1");
    assert_eq!(index["entries"].as_object().unwrap().len(), 8);
    let key = index["entries"]["short"]["key"].as_str().unwrap();
    let (stored, _, _) = npz_array(&cache_file(&cache, "short"), "lorakit_key");
    assert_eq!(
        stored.iter().map(|&b| b as u8 as char).collect::<String>(),
        key
    );
    assert!(cache.join("meta_te_cache.json.manifest.json").is_file());

    // An entry removed from the metadata leaves an orphan: reported, then pruned.
    captions.remove("t100");
    write_metadata(&meta, &captions);
    let stderr = encode_225(&[]);
    assert!(stderr.contains("belong to no metadata entry"), "{stderr}");
    assert!(cache_file(&cache, "t100").is_file());
    encode_225(&["--prune"]);
    assert!(!cache_file(&cache, "t100").exists());
}

/// A single-file checkpoint without a `tokenizer/` folder beside it (as users have them) is
/// tokenized with the built-in CLIP vocabulary, and the states still equal sd-scripts'.
#[test]
fn a_checkpoint_without_a_tokenizer_folder_uses_the_built_in_vocabulary() {
    let root = tempfile::tempdir().unwrap();
    let alone = root.path().join("model.safetensors");
    std::os::unix::fs::symlink(model(), &alone).unwrap();
    // The tiny model's head count, which tensor shapes cannot give (full-size ones need none).
    let arch = fixtures().join("sd15-tiny/arch.json");
    std::os::unix::fs::symlink(arch, root.path().join("arch.json")).unwrap();
    let (meta, cache) = (root.path().join("meta.json"), root.path().join("cache"));
    std::fs::create_dir(&cache).unwrap();
    let captions = golden_captions();
    write_metadata(&meta, &captions);
    let stderr = run_expect(
        "cache-text-encoder",
        args![meta, alone, "--cache_dir", cache, "--clip_skip", "2"],
        0,
    );
    assert!(
        stderr.contains("using the built-in CLIP vocabulary"),
        "{stderr}"
    );
    for name in captions.keys() {
        let (hidden, _, _) = npz_array(&cache_file(&cache, name), "hidden_state");
        let diff = max_abs(&hidden, &golden(&format!("{name}__hidden_75_clipskip2")));
        assert!(diff <= 1e-4, "{name}: {diff}");
    }
}

#[test]
fn caches_beside_images_with_tags_weights_fp16_and_variants() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for name in ["a.png", "b.png", "c.png"] {
        std::fs::write(data.join(name), b"not decoded by this stage").unwrap();
    }
    let captions = golden_captions();
    let meta = root.path().join("meta.json");
    let entries = json!({
        data.join("a.png").display().to_string(): {"caption": "a photo of a cat", "tags": "1girl, solo"},
        "b": {"caption": captions["weighted"]},
        "c.png": {"image_size": [64, 64]},
        "missing": {"caption": "x"},
    });
    std::fs::write(&meta, serde_json::to_vec(&entries).unwrap()).unwrap();

    let stderr = run_expect(
        "cache-text-encoder",
        args![
            meta,
            model(),
            "--train_data_dir",
            data,
            "--weighted_captions",
            "--mixed_precision",
            "fp16"
        ],
        3,
    );
    assert!(
        stderr.contains("missing") && stderr.contains("--train_data_dir"),
        "{stderr}"
    );
    assert!(stderr.contains("neither caption nor tags"), "{stderr}");
    let (hidden, shape, dtype) = npz_array(&data.join("b_te_outputs.npz"), "hidden_state");
    assert_eq!((shape, dtype.as_str()), (vec![77, 64], "<f2"));
    let diff = max_abs(&hidden, &golden("weighted__weighted_hidden_75_clipskip1"));
    assert!(diff <= 2e-2, "fp16 weighted caption: max abs {diff}");
    let (_, _, _) = npz_array(&data.join("a_te_outputs.npz"), "hidden_state");
    // An entry with neither caption nor tags is encoded as the empty caption.
    let (hidden, _, _) = npz_array(&data.join("c_te_outputs.npz"), "hidden_state");
    assert!(max_abs(&hidden, &golden("empty__hidden_75_clipskip1")) <= 2e-2);

    // Variants: N augmented captions stacked beside the plain one, reproducible by seed.
    let model = model();
    let variant_args = args![
        meta,
        model,
        "--train_data_dir",
        data,
        "--variants",
        "3",
        "--shuffle_caption",
        "--keep_tokens",
        "1",
        "--seed",
        "5"
    ];
    run_expect("cache-text-encoder", variant_args, 3);
    let file = data.join("a_te_outputs.npz");
    let (_, shape, _) = npz_array(&file, "variants_hidden_state");
    assert_eq!(shape, [3, 77, 64]);
    let (ids, shape, _) = npz_array(&file, "variants_input_ids");
    assert_eq!(shape, [3, 1, 77]);
    std::fs::remove_file(&file).unwrap();
    run_expect("cache-text-encoder", variant_args, 3);
    assert_eq!(npz_array(&file, "variants_input_ids").0, ids);
}

#[test]
fn bad_inputs_fail_with_clear_messages() {
    let root = tempfile::tempdir().unwrap();
    let meta = root.path().join("meta.json");
    write_metadata(&meta, &golden_captions());

    // A --tokenizer folder without the vocabulary.
    let empty_dir = root.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let stderr = run_expect(
        "cache-text-encoder",
        args![
            meta,
            model(),
            "--cache_dir",
            root.path(),
            "--tokenizer",
            empty_dir
        ],
        1,
    );
    assert!(stderr.contains("vocab.json"), "{stderr}");

    // A checkpoint without a text encoder.
    let unet_only = root.path().join("unet_only.safetensors");
    std::fs::write(
        &unet_only,
        safetensors_with_one_tensor("model.diffusion_model.out.2.bias"),
    )
    .unwrap();
    let stderr = run_expect(
        "cache-text-encoder",
        args![meta, unet_only, "--cache_dir", root.path()],
        1,
    );
    assert!(stderr.contains("no text encoder"), "{stderr}");

    // Usage errors.
    run_expect(
        "cache-text-encoder",
        args![meta, model(), "--max_token_length", "100"],
        2,
    );
    run_expect(
        "cache-text-encoder",
        args![meta, model(), "--shuffle_caption"],
        2,
    );
    run_expect(
        "cache-text-encoder",
        args![meta, model(), "--sdxl", "--cache_dir", root.path()],
        2,
    );
    for bad_skip in ["0", "13"] {
        let stderr = run_expect(
            "cache-text-encoder",
            args![
                meta,
                model(),
                "--clip_skip",
                bad_skip,
                "--cache_dir",
                root.path()
            ],
            2,
        );
        assert!(stderr.contains("between 1 and 12"), "{stderr}");
    }
}

/// A minimal .safetensors file holding one f32 scalar-vector tensor named `name`.
fn safetensors_with_one_tensor(name: &str) -> Vec<u8> {
    let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&1.0f32.to_le_bytes());
    bytes
}

#[test]
fn shards_split_the_entries_without_seeing_each_other_as_orphans() {
    let root = tempfile::tempdir().unwrap();
    let meta = root.path().join("meta.json");
    write_metadata(&meta, &golden_captions());
    let mut done = 0;
    for shard in ["0/2", "1/2"] {
        let stderr = run_expect(
            "cache-text-encoder",
            args![meta, model(), "--cache_dir", root.path(), "--shard", shard],
            0,
        );
        assert!(!stderr.contains("belong to no metadata entry"), "{stderr}");
        let line = stderr.lines().find(|l| l.contains(" done, ")).unwrap();
        done += line
            .split(' ')
            .nth(1)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap();
        let index = format!("meta_te_cache.shard-{}-of-2.json", &shard[..1]);
        assert!(root.path().join(index).is_file());
    }
    assert_eq!(done, 8);
}

/// Rewrites the cache at `path` with its own content key and `hidden_state` (as float64 when
/// `as_f64`): a cache whose key says "up to date".
fn write_lying_cache(path: &Path, hidden: Vec<f32>, shape: &[usize], as_f64: bool) {
    use lorakit_pipeline::formats::npz;
    let key = npz::stored_key(&mut npz::NpzReader::open(path).unwrap()).unwrap();
    let mut writer = npz::NpzWriter::new();
    if as_f64 {
        let values = hidden.into_iter().map(f64::from).collect();
        writer.add_f64("hidden_state", values, shape).unwrap();
    } else {
        writer.add_f32("hidden_state", hidden, shape).unwrap();
    }
    npz::store_key(&mut writer, &key).unwrap();
    writer.write(path).unwrap();
}

#[test]
fn one_bad_item_fails_alone_and_lying_caches_are_re_encoded() {
    let root = tempfile::tempdir().unwrap();
    let meta = root.path().join("meta.json");
    let cache = root.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    // Eight entries in one batch of 8; the fourth one's cache name (250-byte stem +
    // "_te_outputs.npz") exceeds the 255-byte file-name limit.
    let mut captions = serde_json::Map::new();
    let long = "n".repeat(250);
    for (index, (name, text)) in golden_captions().into_iter().take(7).enumerate() {
        if index == 3 {
            captions.insert(long.clone(), json!("a photo of a cat"));
        }
        captions.insert(name, text);
    }
    write_metadata(&meta, &captions);
    let model = model();
    let args = args![meta, model, "--cache_dir", cache, "--batch_size", "8"];
    let stderr = run_expect("cache-text-encoder", args, 3);
    assert!(
        stderr.contains("7 done, 0 up to date, 1 failed"),
        "{stderr}"
    );
    let failure = stderr
        .lines()
        .find(|l| l.contains("skipped"))
        .unwrap_or_else(|| panic!("no failure line:\n{stderr}"));
    assert!(failure.contains(&long), "{failure}");
    for name in captions.keys().filter(|name| **name != long) {
        assert!(cache_file(&cache, name).is_file(), "{name} not written");
    }

    // A cache whose key matches but whose arrays are NaN, mis-shaped or mis-typed is encoded
    // again, and the run says why.
    let name = captions.keys().next().unwrap().clone();
    let file = cache_file(&cache, &name);
    let lies: [(Vec<f32>, Vec<usize>, bool, &str); 3] = [
        (vec![f32::NAN; 77 * 64], vec![77, 64], false, "NaN"),
        (vec![0.5; 10 * 64], vec![10, 64], false, "shape"),
        (vec![0.5; 77 * 64], vec![77, 64], true, "dtype"),
    ];
    for (hidden, shape, as_f64, reason) in lies {
        write_lying_cache(&file, hidden, &shape, as_f64);
        let stderr = run_expect("cache-text-encoder", args, 3);
        assert!(
            stderr.contains("1 done, 6 up to date"),
            "{reason}: {stderr}"
        );
        let line = stderr
            .lines()
            .find(|l| l.contains("stale cache replaced"))
            .unwrap_or_else(|| panic!("{reason}: no reason given:\n{stderr}"));
        assert!(line.contains(&name) && line.contains(reason), "{line}");
        let (values, fixed_shape, dtype) = npz_array(&file, "hidden_state");
        assert_eq!((fixed_shape, dtype.as_str()), (vec![77, 64], "<f4"));
        assert!(values.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn keys_leading_outside_the_dataset_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("ds");
    let outside = root.path().join("outside");
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&outside).unwrap();
    for image in [
        data.join("a.png"),
        outside.join("x.png"),
        outside.join("y.png"),
    ] {
        std::fs::write(image, b"not decoded by this stage").unwrap();
    }
    let absolute = outside.join("y.png").display().to_string();
    let meta = root.path().join("meta.json");
    let entries = json!({
        "a": {"caption": "a cat"},
        "../outside/x.png": {"caption": "escaping by .."},
        absolute.clone(): {"caption": "escaping by an absolute path"},
    });
    std::fs::write(&meta, serde_json::to_vec(&entries).unwrap()).unwrap();
    let stderr = run_expect(
        "cache-text-encoder",
        args![meta, model(), "--train_data_dir", data],
        3,
    );
    assert!(
        stderr.contains("1 done, 0 up to date, 2 failed"),
        "{stderr}"
    );
    for key in ["../outside/x.png", absolute.as_str()] {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("skipped {key}")))
            .unwrap_or_else(|| panic!("{key} not reported:\n{stderr}"));
        assert!(line.contains("outside the dataset folder"), "{line}");
    }
    assert!(data.join("a_te_outputs.npz").is_file());
    let written: Vec<_> = std::fs::read_dir(&outside).unwrap().collect();
    assert_eq!(written.len(), 2, "caches written outside the dataset");
    // Without --train_data_dir (full-path keys, as the Makefile runs it) a key climbing out
    // with `..` is still refused; a plain full-path key is cached beside its image.
    let climbing = data.join("../outside/x.png").display().to_string();
    let plain = data.join("a.png").display().to_string();
    let entries = json!({
        plain: {"caption": "a cat"},
        climbing.clone(): {"caption": "escaping by .."},
    });
    std::fs::write(&meta, serde_json::to_vec(&entries).unwrap()).unwrap();
    let stderr = run_expect("cache-text-encoder", args![meta, model()], 3);
    assert!(stderr.contains(&format!("skipped {climbing}")), "{stderr}");
    let written: Vec<_> = std::fs::read_dir(&outside).unwrap().collect();
    assert_eq!(written.len(), 2, "a cache written outside the dataset");
}

/// `--device cuda` in a build without the feature is a usage error naming it; nothing is
/// written.
#[test]
fn device_cuda_in_a_build_without_the_feature_is_refused_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let (meta, cache) = (root.path().join("meta.json"), root.path().join("cache"));
    std::fs::create_dir(&cache).unwrap();
    write_metadata(&meta, &golden_captions());
    let stderr = run_expect(
        "cache-text-encoder",
        args![meta, model(), "--cache_dir", cache, "--device", "cuda"],
        2,
    );
    assert!(stderr.contains("--features cuda"), "{stderr}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
}
