//! End-to-end tests of `caption-images` with the tiny BLIP fixture: golden captions, incremental
//! re-runs, per-image failures and model errors.

use crate::common;

use std::path::{Path, PathBuf};

use common::{fixtures, run_expect};
use serde_json::Value;

const IMAGES: [&str; 4] = ["astronaut", "chelsea", "coins", "text"];

fn model() -> PathBuf {
    fixtures().join("blip-tiny")
}

/// A folder with the 4 images the BLIP goldens were made from.
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for name in IMAGES {
        let file = format!("{name}.png");
        std::fs::copy(fixtures().join("images").join(&file), data.join(&file)).unwrap();
    }
    data
}

/// The sd-scripts caption of every image for one golden generation run.
fn golden_captions(run: &str) -> Vec<String> {
    let golden: Value =
        serde_json::from_slice(&std::fs::read(model().join("golden.json")).unwrap()).unwrap();
    (0..IMAGES.len())
        .map(|i| {
            golden["images"][i][run]["sd_scripts_caption"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn caption_of(data: &Path, name: &str) -> String {
    std::fs::read_to_string(data.join(format!("{name}.caption"))).unwrap()
}

#[test]
fn greedy_and_beam_captions_equal_sd_scripts() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let stderr = run_expect(
        "caption-images",
        args![
            data,
            "--caption_weights",
            model(),
            "--beam_search",
            "--batch_size",
            "3"
        ],
        0,
    );
    assert!(stderr.contains("4 done"), "{stderr}");
    for (name, expected) in IMAGES.iter().zip(golden_captions("greedy75")) {
        assert_eq!(caption_of(&data, name), format!("{expected}\n"), "{name}");
    }

    // Same model and settings: nothing to do.
    let stderr = run_expect(
        "caption-images",
        args![
            data,
            "--caption_weights",
            model(),
            "--beam_search",
            "--batch_size",
            "3"
        ],
        0,
    );
    assert!(stderr.contains("0 done, 4 up to date"), "{stderr}");

    // Other settings: every caption is redone.
    run_expect(
        "caption-images",
        args![
            data,
            "--caption_weights",
            model(),
            "--beam_search",
            "--num_beams",
            "3",
            "--max_length",
            "30"
        ],
        0,
    );
    for (name, expected) in IMAGES.iter().zip(golden_captions("beam3")) {
        assert_eq!(caption_of(&data, name), format!("{expected}\n"), "{name}");
    }
    let index: Value = serde_json::from_slice(
        &std::fs::read(data.join(".lorakit/caption-images.caption.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["chelsea.png"], "scots brest edmonton 670");
}

#[test]
fn changed_images_and_deleted_captions_are_redone() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let weights = model();
    let caption = |extra: &[&str]| {
        let mut list: Vec<&std::ffi::OsStr> = args![data, "--caption_weights", weights].to_vec();
        list.extend(extra.iter().map(std::ffi::OsStr::new));
        run_expect("caption-images", &list, 0)
    };
    caption(&[]);
    let sampled: Vec<String> = IMAGES.iter().map(|n| caption_of(&data, n)).collect();
    assert!(sampled.iter().all(|c| c.ends_with('\n') && c.len() > 1));

    std::fs::remove_file(data.join("coins.caption")).unwrap();
    std::fs::copy(
        fixtures().join("images/moon.png"),
        data.join("astronaut.png"),
    )
    .unwrap();
    let stderr = caption(&[]);
    assert!(stderr.contains("2 done, 2 up to date"), "{stderr}");
    // Sampling is seeded per image content: the same image gets the same caption again.
    assert_eq!(caption_of(&data, "coins"), sampled[2]);

    let stderr = caption(&["--force"]);
    assert!(stderr.contains("4 done, 0 up to date"), "{stderr}");
    assert_eq!(caption_of(&data, "chelsea"), sampled[1]);
    let stderr = caption(&["--seed", "7"]);
    assert!(stderr.contains("4 done"), "{stderr}");
}

#[test]
fn bad_images_are_skipped_and_reported() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    std::fs::write(data.join("broken.png"), b"not a png").unwrap();
    std::fs::create_dir(data.join("sub")).unwrap();
    std::fs::copy(data.join("chelsea.png"), data.join("sub/cat.png")).unwrap();
    let stderr = run_expect(
        "caption-images",
        args![
            data,
            "--caption_weights",
            model(),
            "--beam_search",
            "--recursive",
            "--batch_size",
            "2"
        ],
        3,
    );
    assert!(stderr.contains("broken.png"), "{stderr}");
    assert!(
        stderr.contains("4 done") || stderr.contains("5 done"),
        "{stderr}"
    );
    assert!(!data.join("broken.caption").exists());
    assert!(data.join("sub/cat.caption").exists());
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(data.join(".lorakit/caption-images.caption.json.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["summary"]["failures"][0]["path"],
        data.join("broken.png").display().to_string()
    );
}

#[test]
fn missing_or_pickled_models_are_fatal_with_directions() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let absent = root.path().join("no-model");
    let stderr = run_expect(
        "caption-images",
        args![data, "--caption_weights", absent],
        1,
    );
    assert!(
        stderr.contains("no-model") && stderr.contains("config.json"),
        "{stderr}"
    );
    let pickle = root.path().join("model_large_caption.pth");
    std::fs::write(&pickle, b"PK").unwrap();
    let stderr = run_expect(
        "caption-images",
        args![data, "--caption_weights", pickle],
        1,
    );
    assert!(stderr.contains("Hugging Face"), "{stderr}");
    let stderr = run_expect(
        "caption-images",
        args![data, "--caption_weights", model(), "--batch_size", "0"],
        2,
    );
    assert!(stderr.contains("--batch_size"), "{stderr}");
    assert!(!data.join("chelsea.caption").exists());
}
