//! End-to-end tests of `merge-captions`, `merge-tags` and `clean-captions` against sd-scripts'
//! golden outputs and a set of bad inputs.

use crate::common;

use std::path::Path;

use common::{copy_dir, fixtures, run_expect};
use serde_json::Value;

/// A dataset folder with the 12 fixture photos, their `.caption` files and WD14 `.txt` tags.
fn dataset(root: &Path) -> std::path::PathBuf {
    let data = root.join("data");
    copy_dir(&fixtures().join("images"), &data);
    copy_dir(&fixtures().join("golden/wd14/default"), &data);
    data
}

fn golden(name: &str, data: &Path) -> String {
    let text = std::fs::read_to_string(fixtures().join("golden/metadata").join(name)).unwrap();
    text.replace("{DATA}/", &format!("{}/", data.display()))
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Full-path keys: compared as JSON values, because the golden full-path files keep non-ASCII
/// characters unescaped (they were re-serialised when the `{DATA}` placeholder was inserted),
/// while sd-scripts itself escapes them; the stem-key test below compares bytes.
#[test]
fn full_path_chain_matches_sd_scripts() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let cap = root.path().join("meta_cap.json");
    let dd = root.path().join("meta_cap_dd.json");
    let clean = root.path().join("meta_clean.json");
    run_expect(
        "merge-captions",
        args![data, cap, "--full_path", "--caption_extension", ".caption"],
        0,
    );
    assert_eq!(
        json(&cap),
        serde_json::from_str::<Value>(&golden("meta_cap.json", &data)).unwrap()
    );
    run_expect(
        "merge-tags",
        args![
            data,
            dd,
            "--in_json",
            cap,
            "--full_path",
            "--caption_extension",
            ".txt"
        ],
        0,
    );
    assert_eq!(
        json(&dd),
        serde_json::from_str::<Value>(&golden("meta_cap_dd.json", &data)).unwrap()
    );
    run_expect("clean-captions", args![dd, clean], 0);
    assert_eq!(
        json(&clean),
        serde_json::from_str::<Value>(&golden("meta_clean.json", &data)).unwrap()
    );
    for output in [&cap, &dd, &clean] {
        let manifest = json(&lorakit_pipeline::formats::manifest::Manifest::path_for(
            output,
        ));
        lorakit_pipeline::formats::schema::validate(
            lorakit_pipeline::formats::schema::MANIFEST_V1,
            &manifest,
        )
        .unwrap();
        lorakit_pipeline::formats::schema::validate(
            lorakit_pipeline::formats::schema::METADATA_V1,
            &json(output),
        )
        .unwrap();
        assert_eq!(manifest["summary"]["done"], 12);
    }
}

/// Stem keys: byte-equal with sd-scripts' files (2-space indent, `\uXXXX` escapes, no final newline).
#[test]
fn stem_key_chain_is_byte_equal_to_sd_scripts() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let cap = root.path().join("cap.json");
    let dd = root.path().join("dd.json");
    let clean = root.path().join("clean.json");
    run_expect("merge-captions", args![data, cap], 0);
    assert_eq!(
        std::fs::read_to_string(&cap).unwrap(),
        golden("meta_cap_stem_keys.json", &data)
    );
    run_expect("merge-tags", args![data, dd, "--in_json", cap], 0);
    assert_eq!(
        std::fs::read_to_string(&dd).unwrap(),
        golden("meta_cap_dd_stem_keys.json", &data)
    );
    run_expect("clean-captions", args![dd, clean], 0);
    assert_eq!(
        std::fs::read_to_string(&clean).unwrap(),
        golden("meta_clean_stem_keys.json", &data)
    );
    // sd-scripts' legacy three-argument form gives the same result.
    let legacy = root.path().join("legacy.json");
    run_expect("clean-captions", args![data, dd, legacy], 0);
    assert_eq!(
        std::fs::read(&legacy).unwrap(),
        std::fs::read(&clean).unwrap()
    );
}

#[test]
fn out_json_is_updated_in_place_when_no_in_json() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let meta = root.path().join("meta.json");
    run_expect("merge-captions", args![data, meta], 0);
    run_expect("merge-tags", args![data, meta], 0);
    assert_eq!(
        std::fs::read_to_string(&meta).unwrap(),
        golden("meta_cap_dd_stem_keys.json", &data)
    );
}

#[test]
fn bad_sidecars_are_reported_per_file_and_good_ones_merged() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for name in [
        "missing.png",
        "empty.png",
        "latin1.png",
        "bom.png",
        "crlf.png",
        "雪 景.png",
    ] {
        std::fs::write(data.join(name), b"not decoded by this stage").unwrap();
    }
    std::fs::write(data.join("empty.caption"), b"").unwrap();
    std::fs::write(data.join("latin1.caption"), b"caf\xe9 au lait").unwrap();
    std::fs::write(data.join("bom.caption"), b"\xEF\xBB\xBFa cat\n").unwrap();
    std::fs::write(data.join("crlf.caption"), b"line one\r\nline two\r\n").unwrap();
    std::fs::write(data.join("雪 景.caption"), "snow scene").unwrap();
    std::fs::create_dir(data.join("folder.png")).unwrap();
    let out = root.path().join("meta.json");
    let stderr = run_expect("merge-captions", args![data, out], 3);
    assert!(stderr.contains("missing.caption"), "{stderr}");
    assert!(
        stderr.contains("latin1.caption") && stderr.contains("UTF-8"),
        "{stderr}"
    );
    assert!(stderr.contains("folder.png"), "{stderr}");
    let meta = json(&out);
    assert_eq!(meta["empty"]["caption"], "");
    assert_eq!(meta["bom"]["caption"], "a cat");
    assert_eq!(meta["crlf"]["caption"], "line one\nline two");
    assert_eq!(meta["雪 景"]["caption"], "snow scene");
    assert!(meta.get("missing").is_none() && meta.get("latin1").is_none());
    let manifest = json(&lorakit_pipeline::formats::manifest::Manifest::path_for(
        &out,
    ));
    assert_eq!(manifest["summary"]["failures"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_json_inputs_are_fatal_with_clear_messages() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let out = root.path().join("out.json");

    let truncated = root.path().join("truncated.json");
    std::fs::write(&truncated, b"{\"a\": {\"caption\": \"x\"").unwrap();
    let stderr = run_expect("merge-tags", args![data, out, "--in_json", truncated], 1);
    assert!(
        stderr.contains("truncated.json") && stderr.contains("not valid JSON"),
        "{stderr}"
    );

    let wrong_shape = root.path().join("wrong.json");
    std::fs::write(&wrong_shape, br#"{"a": {"train_resolution": "big"}}"#).unwrap();
    let stderr = run_expect("clean-captions", args![wrong_shape, out], 1);
    assert!(
        stderr.contains("wrong.json") && stderr.contains("train_resolution"),
        "{stderr}"
    );

    let good = root.path().join("good.json");
    run_expect("merge-captions", args![data, good], 0);
    let manifest = lorakit_pipeline::formats::manifest::Manifest::path_for(&good);
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("lorakit.metadata/v1", "lorakit.metadata/v3");
    std::fs::write(&manifest, text).unwrap();
    let stderr = run_expect("clean-captions", args![good, out], 1);
    assert!(
        stderr.contains("v3") && stderr.contains("newer"),
        "{stderr}"
    );
    assert!(!out.exists(), "no output after a fatal error");
}

#[test]
fn usage_errors() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let missing_dir = root.path().join("no/such/dir/meta.json");
    let stderr = run_expect("merge-captions", args![data, missing_dir], 1);
    assert!(stderr.contains("does not exist"), "{stderr}");

    std::fs::create_dir(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/astronaut.png"), b"x").unwrap();
    std::fs::write(data.join("sub/astronaut.caption"), b"again").unwrap();
    let out = root.path().join("meta.json");
    let stderr = run_expect("merge-captions", args![data, out, "--recursive"], 2);
    assert!(stderr.contains("--full_path"), "{stderr}");
    std::fs::copy(data.join("astronaut.png"), data.join("astronaut.jpg")).unwrap();
    std::fs::write(data.join("astronaut.caption"), b"x").unwrap();
    let stderr = run_expect("merge-captions", args![data, out], 2);
    assert!(
        stderr.contains("astronaut.jpg") && stderr.contains("--full_path"),
        "{stderr}"
    );
    run_expect(
        "merge-captions",
        args![data, out, "--recursive", "--full_path"],
        0,
    );
    assert_eq!(
        json(&out)[format!("{}/sub/astronaut.png", data.display())]["caption"],
        "again"
    );
}

#[cfg(unix)]
#[test]
fn a_pipe_in_place_of_a_sidecar_is_a_per_file_error_not_a_hang() {
    // Reading a FIFO blocks until something writes to it; the merge tools must not open it.
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    for (tool, extension) in [("merge-captions", ".caption"), ("merge-tags", ".txt")] {
        let pipe = data.join(format!("chelsea{extension}"));
        std::fs::remove_file(&pipe).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .unwrap();
        assert!(made.success());
        let out = root.path().join(format!("{tool}.json"));
        let mut child = std::process::Command::new(common::tool(tool))
            .args([data.as_os_str(), out.as_os_str()])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > std::time::Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("{tool} hung on the pipe {}", pipe.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(3), "{tool}: {stderr}");
        assert!(
            stderr.contains(&format!("chelsea{extension}")) && stderr.contains("regular file"),
            "{tool}: {stderr}"
        );
        let merged = json(&out);
        assert_eq!(
            merged.as_object().unwrap().len(),
            11,
            "{tool}: the other files merged"
        );
        std::fs::remove_file(&pipe).unwrap();
    }
}

#[test]
fn quiet_prints_nothing_for_a_clean_run_and_still_names_failures() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let meta = root.path().join("meta.json");
    let stderr = run_expect("merge-captions", args![data, meta, "-q"], 0);
    assert_eq!(stderr, "", "a clean -q run printed something");
    // An unchanged re-run says so.
    let stderr = run_expect("merge-captions", args![data, meta], 0);
    let images = std::fs::read_dir(&data)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png" || x == "jpg")
        })
        .count();
    assert!(
        stderr.contains(&format!("0 done, {images} up to date")),
        "{stderr}"
    );
    std::fs::write(data.join("broken.png"), b"not an image").unwrap();
    std::fs::write(data.join("broken.caption"), [0xff, 0xfe, 0x00]).unwrap();
    let stderr = run_expect("merge-captions", args![data, meta, "-q"], 3);
    assert!(
        stderr.contains("broken.caption") && stderr.contains("1 failed"),
        "{stderr}"
    );
}
