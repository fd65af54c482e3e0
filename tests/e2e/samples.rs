//! End-to-end tests of sample images during training (`--sample_prompts`): train-lora saves the
//! LoRA at each sample point and runs generate-images on it, writing sd-scripts' file names and
//! a contact sheet into `<output_dir>/sample/`; a sample run that fails does not stop training.

use std::path::Path;

use crate::common;

use common::{fixtures, make_training_caches, run_expect};
use lorakit_pipeline::stages::train_lora::contact_sheet::{sheet_size, CONTACT_SHEET};

/// Runs a short train-lora on the cached fixture data with `extra` flags; returns stderr.
fn train(data: &Path, out: &Path, extra: &[&str]) -> String {
    let model = fixtures().join("sd15-tiny/model.safetensors");
    let mut args: Vec<std::ffi::OsString> = common::os(&[
        &"--pretrained_model_name_or_path",
        &model,
        &"--in_json",
        &data.join("meta_lat.json"),
        &"--train_data_dir",
        &data,
        &"--output_dir",
        &out,
        &"--output_name",
        &"run",
        &"--network_dim",
        &"4",
        &"--learning_rate",
        &"1e-3",
        &"--train_batch_size",
        &"2",
        &"--seed",
        &"3",
    ]);
    args.extend(extra.iter().map(std::ffi::OsString::from));
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_expect("train-lora", &args, 0)
}

/// The file names in `<out>/sample`, sorted.
fn sample_files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("sample"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn sample_points_write_sd_scripts_names_and_a_contact_sheet() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let prompts = data.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# sample prompts\na cat --w 64 --h 64 --s 2 --d 7\na dog --n blurry --w 80 --h 64 --s 2\n",
    )
    .unwrap();
    // The text encoder is trained (the default), so the samples use its modules too.
    let stderr = train(
        data.path(),
        out.path(),
        &[
            "--max_train_steps",
            "4",
            "--sample_prompts",
            prompts.to_str().unwrap(),
            "--sample_every_n_steps",
            "2",
            "--sample_at_first",
            "--sample_sampler",
            "euler_a",
        ],
    );
    assert!(!stderr.contains("training goes on"), "{stderr}");
    assert!(out.path().join("run.safetensors").is_file());
    let names = sample_files(out.path());
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(names.contains(&CONTACT_SHEET.to_string()));
    // sd-scripts: `{output_name}_{e<epoch:06> | <steps:06>}_{prompt:02}_{time}[_{seed}].png`.
    for (point, index, seed) in [
        ("e000000", "00", "_7"),
        ("e000000", "01", ""),
        ("000002", "00", "_7"),
        ("000002", "01", ""),
        ("000004", "00", "_7"),
        ("000004", "01", ""),
    ] {
        let prefix = format!("run_{point}_{index}_");
        let name = names
            .iter()
            .find(|n| n.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}*: {names:?}"));
        let stamp = &name[prefix.len()..name.len() - ".png".len() - seed.len()];
        assert!(
            stamp.len() == 14 && stamp.bytes().all(|b| b.is_ascii_digit()),
            "{name}"
        );
        assert!(name.ends_with(&format!("{seed}.png")), "{name}");
        let image = image::open(out.path().join("sample").join(name))
            .unwrap()
            .to_rgb8();
        let expected = if index == "00" { (64, 64) } else { (80, 64) };
        assert_eq!(image.dimensions(), expected, "{name}");
    }
    let sheet = image::open(out.path().join("sample").join(CONTACT_SHEET))
        .unwrap()
        .to_rgb8();
    assert_eq!(sheet.dimensions(), sheet_size(2, 3));
    // The scratch LoRA of each point is removed after its samples.
    let scratch = out.path().join(".lorakit/samples");
    assert_eq!(std::fs::read_dir(scratch).unwrap().count(), 0);
}

#[test]
fn a_failing_sample_run_does_not_stop_training() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let prompts = data.path().join("prompts.txt");
    // pndm needs at least 4 steps, so generate-images refuses every sample run.
    std::fs::write(&prompts, "a cat --w 64 --h 64 --s 2 --ss pndm\n").unwrap();
    let stderr = train(
        data.path(),
        out.path(),
        &[
            "--network_train_unet_only",
            "--max_train_steps",
            "2",
            "--sample_prompts",
            prompts.to_str().unwrap(),
            "--sample_every_n_steps",
            "1",
        ],
    );
    for step in [1, 2] {
        assert!(
            stderr.contains(&format!(
                "sample images at step {step} failed, training goes on"
            )),
            "{stderr}"
        );
    }
    assert!(
        stderr.contains("pndm"),
        "the child's reason is shown: {stderr}"
    );
    assert!(out.path().join("run.safetensors").is_file());
    assert!(sample_files(out.path()).is_empty());
}

#[test]
fn an_unknown_sample_sampler_is_refused_before_training() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let prompts = data.path().join("prompts.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let model = fixtures().join("sd15-tiny/model.safetensors");
    let stderr = run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model,
            "--in_json",
            data.path().join("meta_lat.json"),
            "--train_data_dir",
            data.path(),
            "--output_dir",
            out.path(),
            "--network_train_unet_only",
            "--sample_prompts",
            prompts,
            "--sample_sampler",
            "k_dpm_3"
        ],
        2,
    );
    assert!(stderr.contains("--sample_sampler"), "{stderr}");
    assert!(!out.path().join("last.safetensors").exists());
}

#[test]
fn a_resumed_run_samples_at_its_start_and_continues_the_step_names() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let prompts = data.path().join("prompts.txt");
    std::fs::write(&prompts, "a cat --w 64 --h 64 --s 2 --d 7\n").unwrap();
    let prompts = prompts.to_str().unwrap();
    // One step per epoch (2 images, batch 2); the first run stops after step 2 with a state.
    train(
        data.path(),
        out.path(),
        &[
            "--network_train_unet_only",
            "--max_train_steps",
            "2",
            "--save_state",
            "--sample_prompts",
            prompts,
            "--sample_every_n_steps",
            "2",
            "--sample_at_first",
            "--sample_sampler",
            "euler",
        ],
    );
    let pixels = |name: &str| {
        image::open(out.path().join("sample").join(name))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    let start_of = |names: &[String], point: &str| -> Option<String> {
        (names.iter())
            .filter(|n| n.starts_with(&format!("run_{point}_00_")) && n.ends_with("_7.png"))
            .max()
            .cloned()
    };
    let first = sample_files(out.path());
    let fresh_start = pixels(&start_of(&first, "e000000").expect("a start sample"));
    let resumed_stderr = run_expect(
        "train-lora",
        args![
            "--resume",
            "latest",
            "--output_dir",
            out.path(),
            "--max_train_steps",
            "4"
        ],
        0,
    );
    assert!(
        !resumed_stderr.contains("training goes on"),
        "{resumed_stderr}"
    );
    let names = sample_files(out.path());
    let count = |point: &str| {
        (names.iter())
            .filter(|n| n.starts_with(&format!("run_{point}_00_")))
            .count()
    };
    // sd-scripts samples `--sample_at_first` at the start of a resumed run too (as e000000;
    // two files, or one if both runs started within the same second); the step points go on
    // from the resumed step: 2 in the first run, 4 after resuming.
    let starts = count("e000000");
    assert!((1..=2).contains(&starts), "{names:?}");
    assert_eq!((count("000002"), count("000004")), (1, 1), "{names:?}");
    assert_eq!(names.len(), starts + 2 + 1, "{names:?}");
    // The resumed run starts from the LoRA of step 2: its start sample has step 2's pixels,
    // which differ from the untrained start's.
    let step2 = pixels(&start_of(&names, "000002").unwrap());
    assert_ne!(fresh_start, step2, "2 steps did not change the LoRA");
    assert_eq!(pixels(&start_of(&names, "e000000").unwrap()), step2);
    assert_ne!(pixels(&start_of(&names, "000004").unwrap()), step2);
    // The sheet: one prompt, the points start (the newest e000000), step 2 and step 4.
    let sheet = image::open(out.path().join("sample").join(CONTACT_SHEET))
        .unwrap()
        .to_rgb8();
    assert_eq!(sheet.dimensions(), sheet_size(1, 3));
}
