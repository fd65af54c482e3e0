//! `lint-dataset` findings on the bad-input corpus and on small purpose-made datasets; the JSON
//! report is validated against `schemas/lint_report.v1.schema.json`.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{copy_dir, fixtures, run, run_expect};
use lorakit_pipeline::formats::schema::LINT_REPORT_V1;
use lorakit_tests::corpus::{self, jpeg_bytes, picture, png_bytes};
use serde_json::Value;

/// Runs `lint-dataset --json` with `extra` flags; returns the validated report and exit code.
fn lint_json(dir: &Path, extra: &[&str]) -> (Value, i32) {
    let mut args: Vec<&std::ffi::OsStr> = vec![dir.as_os_str(), "--json".as_ref(), "-q".as_ref()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let output = run("lint-dataset", &args);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 report");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    lorakit_pipeline::formats::schema::validate(LINT_REPORT_V1, &report)
        .expect("report follows its schema");
    (report, output.status.code().expect("exit code"))
}

/// File name → codes reported for it.
fn codes_by_file(report: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut codes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for finding in report["findings"].as_array().unwrap() {
        let path = Path::new(finding["path"].as_str().unwrap());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        codes
            .entry(name)
            .or_default()
            .insert(finding["code"].as_str().unwrap().to_string());
    }
    codes
}

#[test]
fn corpus_files_get_the_right_findings() {
    let root = tempfile::tempdir().unwrap();
    let corpus = corpus::generate(root.path()).unwrap();
    let (report, code) = lint_json(&corpus.images(), &["--decode"]);
    assert_eq!(code, 3, "errors found must give exit code 3");
    let codes = codes_by_file(&report);
    let expected = [
        ("empty.png", "unreadable_image"),
        ("truncated.png", "truncated_image"),
        ("truncated.jpg", "truncated_image"),
        ("random.png", "unreadable_image"),
        ("random.webp", "unreadable_image"),
        ("bomb.png", "too_large"),
        ("cmyk.jpg", "color_mode"),
        ("deep16.png", "color_mode"),
        ("palette_transparent.png", "color_mode"),
        ("gray_alpha.png", "color_mode"),
        ("animated.webp", "animated"),
        ("rotated.jpg", "exif_rotation"),
        ("jpeg_named.png", "format_mismatch"),
        ("._good_1.png", "apple_double"),
        (".hidden.png", "hidden_file"),
        ("folder.png", "not_a_file"),
        ("cap_bad_utf8.caption", "sidecar_not_utf8"),
        ("cap_bom.caption", "sidecar_bom"),
        ("cap_empty.caption", "sidecar_empty"),
        ("cap_crlf.caption", "sidecar_multiline"),
        ("cap_long.caption", "sidecar_too_long"),
        ("cap_long.txt", "sidecar_not_utf8"),
        ("cap_missing.caption", "sidecar_missing"),
    ];
    for (file, code) in expected {
        assert!(
            codes.get(file).is_some_and(|c| c.contains(code)),
            "{file}: expected {code}, got {:?}",
            codes.get(file)
        );
    }
    for good in [
        "good_1.png",
        "good_2.jpg",
        "good with spaces.png",
        "雪景 猫.png",
    ] {
        let about_good: Vec<&Value> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| Path::new(f["path"].as_str().unwrap()).file_name().unwrap() == good)
            .collect();
        assert!(about_good.is_empty(), "{good}: {about_good:?}");
    }
    let severity_of = |file: &str, code: &str| {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(file) && f["code"] == code)
            .map(|f| f["severity"].as_str().unwrap().to_string())
    };
    assert_eq!(
        severity_of("deep16.png", "color_mode").as_deref(),
        Some("info")
    );
    assert_eq!(
        severity_of("cmyk.jpg", "color_mode").as_deref(),
        Some("warning")
    );
    assert_eq!(
        severity_of("bomb.png", "too_large").as_deref(),
        Some("error")
    );
    let rotated = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "exif_rotation")
        .unwrap();
    assert!(
        rotated["message"].as_str().unwrap().contains("50x90"),
        "{rotated}"
    );
    let tags: Vec<(&str, u64)> = report["tag_frequency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tag"].as_str().unwrap(), t["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        tags,
        [
            ("1girl", 5),
            ("cat", 5),
            ("indoors", 5),
            ("outdoors", 5),
            ("solo", 5)
        ],
        "tag files that are not UTF-8 are not counted"
    );
}

#[test]
fn clean_dataset_passes_with_exit_code_zero() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    copy_dir(&fixtures().join("images"), &data);
    std::fs::remove_file(data.join("logo.png")).unwrap();
    std::fs::remove_file(data.join("logo.caption")).unwrap();
    let text = run_expect("lint-dataset", args![data], 0);
    assert!(text.contains("11 done"), "{text}");
    let (report, code) = lint_json(&data, &["--decode"]);
    assert_eq!(code, 0);
    assert_eq!(report["counts"]["errors"], 0);
    assert_eq!(report["counts"]["warnings"], 0, "{report}");
    assert_eq!(report["images"], 11);
}

#[test]
fn duplicates_near_duplicates_caches_and_leftovers() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let original = picture(256, 192, 3);
    std::fs::write(data.join("a.png"), png_bytes(&original)).unwrap();
    std::fs::write(data.join("b.png"), png_bytes(&original)).unwrap();
    let smaller =
        image::imageops::resize(&original, 128, 96, image::imageops::FilterType::Triangle);
    std::fs::write(data.join("c.jpg"), jpeg_bytes(&smaller, None)).unwrap();
    std::fs::write(data.join("d.png"), png_bytes(&picture(256, 192, 9))).unwrap();
    std::fs::write(data.join("a_0256x0192_sd.npz"), b"x").unwrap();
    std::fs::write(data.join("d_0512x0512_sd.npz"), b"x").unwrap();
    std::fs::write(data.join("gone_te_outputs.npz"), b"x").unwrap();
    std::fs::write(data.join(".lorakit-tmp-1-0-meta.json"), b"{").unwrap();
    for stem in ["a", "b", "c", "d"] {
        std::fs::write(data.join(format!("{stem}.caption")), "a picture").unwrap();
    }

    let (report, code) = lint_json(&data, &[]);
    assert_eq!(code, 0, "warnings only: {report}");
    let codes = codes_by_file(&report);
    assert!(codes["b.png"].contains("duplicate"), "{codes:?}");
    assert!(
        !codes.contains_key("c.jpg"),
        "near-duplicates need --decode"
    );
    assert!(!codes.contains_key("a_0256x0192_sd.npz"), "{codes:?}");
    assert!(codes["d_0512x0512_sd.npz"].contains("stale_cache"));
    assert!(codes["gone_te_outputs.npz"].contains("orphaned_cache"));
    assert!(codes[".lorakit-tmp-1-0-meta.json"].contains("leftover_temp_file"));

    let (decoded, _) = lint_json(&data, &["--decode"]);
    let codes = codes_by_file(&decoded);
    assert!(codes["c.jpg"].contains("near_duplicate"), "{codes:?}");
    assert!(!codes.contains_key("d.png"), "{codes:?}");
    assert!(!codes["b.png"].contains("near_duplicate"));
}

#[test]
fn metadata_is_compared_with_the_folder() {
    let root = tempfile::tempdir().unwrap();
    let corpus = corpus::generate(root.path()).unwrap();
    let (report, _) = lint_json(
        &corpus.images(),
        &[
            "--in_json",
            corpus.path("json/dangling_key.json").to_str().unwrap(),
        ],
    );
    let findings = report["findings"].as_array().unwrap();
    let entry = findings
        .iter()
        .find(|f| f["code"] == "entry_without_image")
        .unwrap();
    assert!(entry["message"]
        .as_str()
        .unwrap()
        .contains("does_not_exist.png"));
    assert!(findings.iter().any(|f| f["code"] == "image_without_entry"
        && f["path"].as_str().unwrap().ends_with("good_2.jpg")));
    let (broken, code) = lint_json(
        &corpus.images(),
        &[
            "--in_json",
            corpus.path("json/truncated.json").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 3);
    assert!(broken["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["code"] == "metadata_unreadable"));
}

#[test]
fn missing_folder_is_fatal_and_bad_flags_are_usage_errors() {
    let root = tempfile::tempdir().unwrap();
    let message = run_expect("lint-dataset", args![root.path().join("nope")], 1);
    assert!(message.contains("nope"), "{message}");
    run_expect("lint-dataset", args![root.path(), "--no_such_flag"], 2);
}

#[test]
fn buckets_and_token_budget() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    copy_dir(&fixtures().join("images"), &data);
    let long_caption = vec!["a very detailed photo"; 40].join(", ");
    std::fs::write(data.join("astronaut.caption"), &long_caption).unwrap();
    let tokenizer = fixtures().join("sd15-tiny/tokenizer");
    let (report, code) = lint_json(
        &data,
        &[
            "--resolution",
            "512",
            "--train_batch_size",
            "2",
            "--tokenizer",
            tokenizer.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "warnings only");
    let codes = codes_by_file(&report);
    assert!(
        codes["astronaut.caption"].contains("token_overflow"),
        "{codes:?}"
    );
    assert!(!codes.contains_key("cell.caption"));
    assert!(
        codes["microaneurysms.png"].contains("upscaled"),
        "102x102 into 512x512"
    );
    assert!(
        !codes.contains_key("astronaut.png"),
        "512x512 fits its bucket exactly"
    );
    let occupancy: Vec<(u64, u64, u64)> = report["bucket_occupancy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["width"].as_u64().unwrap(),
                b["height"].as_u64().unwrap(),
                b["images"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(occupancy.iter().map(|b| b.2).sum::<u64>(), 12);
    assert!(occupancy.contains(&(512, 512, 5)), "{occupancy:?}");
    let sparse: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "sparse_bucket")
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(sparse, ["bucket 448x576", "bucket 768x320"]);
    assert_eq!(
        skipped(&report),
        BTreeSet::from(["stale_caches".to_string()]),
        "only the stale-cache check (no --model) is skipped"
    );

    let (no_upscale, _) = lint_json(&data, &["--resolution", "512", "--bucket_no_upscale"]);
    let codes = codes_by_file(&no_upscale);
    assert!(!codes
        .get("microaneurysms.png")
        .is_some_and(|c| c.contains("upscaled")));
}

/// `(file name, code)` of every stale or orphaned cache finding, and the messages by file name.
fn cache_findings(report: &Value) -> (BTreeSet<(String, String)>, BTreeMap<String, String>) {
    let mut found = BTreeSet::new();
    let mut messages = BTreeMap::new();
    for finding in report["findings"].as_array().unwrap() {
        let code = finding["code"].as_str().unwrap();
        if code != "stale_cache" && code != "orphaned_cache" {
            continue;
        }
        let path = Path::new(finding["path"].as_str().unwrap());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        messages.insert(
            name.clone(),
            finding["message"].as_str().unwrap().to_string(),
        );
        found.insert((name, code.to_string()));
    }
    (found, messages)
}

fn skipped(report: &Value) -> BTreeSet<String> {
    report["skipped_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["check"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn stale_and_orphaned_caches_are_found_by_their_content_keys() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let stems = ["one", "two", "three"];
    let mut entries = serde_json::Map::new();
    for (index, stem) in stems.iter().enumerate() {
        std::fs::write(
            data.join(format!("{stem}.png")),
            png_bytes(&picture(96, 64, index as u32)),
        )
        .unwrap();
        entries.insert(
            stem.to_string(),
            serde_json::json!({"caption": format!("picture {stem}"), "tags": "1girl"}),
        );
    }
    let meta = root.path().join("meta.json");
    let write_meta = |entries: &serde_json::Map<String, Value>| {
        std::fs::write(&meta, serde_json::to_vec_pretty(entries).unwrap()).unwrap()
    };
    write_meta(&entries);
    let model = fixtures().join("sd15-tiny/model.safetensors");
    let buckets = [
        "--min_bucket_reso",
        "64",
        "--max_bucket_reso",
        "64",
        "--bucket_reso_steps",
        "64",
    ];
    let out_json = root.path().join("meta_lat.json");
    let mut latent_args: Vec<&std::ffi::OsStr> = vec![
        data.as_os_str(),
        meta.as_os_str(),
        out_json.as_os_str(),
        model.as_os_str(),
        "--max_resolution".as_ref(),
        "64".as_ref(),
        "-q".as_ref(),
    ];
    latent_args.extend(buckets.iter().map(std::ffi::OsStr::new));
    run_expect("prepare-latents", &latent_args, 0);
    run_expect(
        "cache-text-encoder",
        args![meta, model, "--train_data_dir", data, "-q"],
        0,
    );

    let model_text = model.display().to_string();
    let meta_text = meta.display().to_string();
    let mut flags = vec![
        "--model",
        model_text.as_str(),
        "--in_json",
        meta_text.as_str(),
        "--resolution",
        "64",
    ];
    flags.extend(buckets);

    // Without --model the check is skipped with a note.
    let (report, _) = lint_json(&data, &["--in_json", &meta_text]);
    assert!(skipped(&report).contains("stale_caches"));

    // Fresh caches: nothing stale, nothing orphaned, both checks ran.
    let (report, code) = lint_json(&data, &flags);
    let (found, _) = cache_findings(&report);
    assert!(found.is_empty(), "fresh caches reported: {found:?}");
    assert!(skipped(&report).iter().all(|s| !s.starts_with("stale")));
    assert_eq!(code, 0, "{report}");

    // One image's pixels and another entry's caption change: exactly their caches are stale.
    std::fs::write(data.join("two.png"), png_bytes(&picture(96, 64, 7))).unwrap();
    entries.insert(
        "three".into(),
        serde_json::json!({"caption": "picture three, edited", "tags": "1girl"}),
    );
    write_meta(&entries);
    let (report, _) = lint_json(&data, &flags);
    let (found, messages) = cache_findings(&report);
    let expected: BTreeSet<(String, String)> = [
        ("two_0096x0064_sd.npz", "stale_cache"),
        ("three_te_outputs.npz", "stale_cache"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(found, expected);
    assert!(
        messages["two_0096x0064_sd.npz"].contains("its image changed"),
        "{messages:?}"
    );
    assert!(
        messages["three_te_outputs.npz"].contains("caption or tags"),
        "{messages:?}"
    );

    // Another setting (--clip_skip 2) makes every text-encoder cache stale; an entry removed from
    // the metadata leaves its cache orphaned, as does a cache whose image is gone.
    entries.remove("one");
    write_meta(&entries);
    std::fs::copy(
        data.join("two_te_outputs.npz"),
        data.join("ghost_te_outputs.npz"),
    )
    .unwrap();
    let mut clip_skip = flags.clone();
    clip_skip.extend(["--clip_skip", "2"]);
    let (report, _) = lint_json(&data, &clip_skip);
    let (found, messages) = cache_findings(&report);
    let expected: BTreeSet<(String, String)> = [
        ("two_0096x0064_sd.npz", "stale_cache"),
        ("two_te_outputs.npz", "stale_cache"),
        ("three_te_outputs.npz", "stale_cache"),
        ("one_te_outputs.npz", "orphaned_cache"),
        ("ghost_te_outputs.npz", "orphaned_cache"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(found, expected);
    assert!(
        messages["two_te_outputs.npz"].contains("all 2 text-encoder caches are stale"),
        "{messages:?}"
    );
}

#[cfg(unix)]
#[test]
fn a_pipe_at_a_caption_path_is_reported_as_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    for stem in ["astronaut", "chelsea"] {
        let image = fixtures().join(format!("images/{stem}.png"));
        std::fs::copy(image, dir.path().join(format!("{stem}.png"))).unwrap();
    }
    std::fs::write(dir.path().join("astronaut.caption"), "an astronaut").unwrap();
    let pipe = dir.path().join("chelsea.caption");
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(made.success());
    let (report, code) = lint_json(dir.path(), &[]);
    assert_eq!(code, 3, "{report}");
    let codes = codes_by_file(&report);
    let found = codes.get("chelsea.caption").cloned().unwrap_or_default();
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["not_a_file"],
        "{report}"
    );
}

#[test]
fn a_dreambooth_layout_is_named_instead_of_reporting_zero_images() {
    let root = tempfile::tempdir().unwrap();
    let class = root.path().join("10_sks dog");
    std::fs::create_dir(&class).unwrap();
    std::fs::write(class.join("a.png"), png_bytes(&picture(16, 16, 1))).unwrap();
    let (report, code) = lint_json(root.path(), &[]);
    assert_eq!(code, 3);
    let finding = &report["findings"][0];
    assert_eq!(finding["code"], "no_images");
    let message = finding["message"].as_str().unwrap();
    assert!(
        message.contains("--recursive") && message.contains("10_sks dog"),
        "{message}"
    );
    // Every stage that lists images refuses the folder with the same hint.
    let out = root.path().join("meta.json");
    let stderr = run_expect("merge-captions", args![root.path(), out], 1);
    assert!(
        stderr.contains("DreamBooth") && stderr.contains("--recursive"),
        "{stderr}"
    );
    let (report, _) = lint_json(root.path(), &["--recursive"]);
    assert_eq!(report["images"], 1, "{report}");
    let codes: BTreeSet<String> = codes_by_file(&report).into_values().flatten().collect();
    assert!(!codes.contains("no_images"), "{codes:?}");
}
