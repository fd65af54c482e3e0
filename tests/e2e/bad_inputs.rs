//! Every lorakit tool run over the generated bad-input corpus (`lorakit_tests::corpus`).
//!
//! Each row of [`ROWS`] says how to invoke one tool on the corpus, which exit code is documented
//! for that case, which files the output must name, and how to check that the good files were
//! processed. For every row: no panic, no temporary (`.lorakit-tmp-*`) or partial output files.

use crate::common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{os, tool};
use lorakit_pipeline::infra::fsio::TEMP_PREFIX;
use lorakit_tests::corpus::{self, Corpus, Expect};
use serde_json::Value;

/// How one tool is run over the corpus and what must come out.
struct Row {
    /// Label shown in failures.
    name: &'static str,
    /// Executable name.
    tool: &'static str,
    /// Command-line arguments, given the corpus and an empty output folder.
    args: fn(&Corpus, &Path) -> Vec<OsString>,
    /// Documented exit code (see pipeline/src/report.rs).
    code: i32,
    /// Files (relative to the corpus root) that the output must name.
    must_name: fn(&Corpus) -> Vec<PathBuf>,
    /// Checks the outputs in the output folder given stdout; panics with a message on failure.
    check: fn(&Corpus, &Path, &str),
}

/// What a merge of `extension` sidecars must name: bad/missing sidecars of that extension,
/// the sidecar path of every image without one, images whose name cannot be a JSON key, and
/// the folder named like an image.
fn unmergeable(corpus: &Corpus, extension: &str) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = corpus
        .items
        .iter()
        .filter(|i| i.path.starts_with("images"))
        .filter_map(|i| {
            let ext = i.path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if format!(".{ext}") == extension {
                (i.expect == Expect::Bad).then(|| i.path.clone())
            } else if lorakit_pipeline::dataset::has_image_extension(&i.path)
                && corpus.path(&i.path).is_file()
                && matches!(i.expect, Expect::Bad | Expect::Unusual)
                && !i.path.file_name()?.to_string_lossy().starts_with('.')
            {
                if i.path.to_str().is_none() {
                    return Some(i.path.clone());
                }
                let sidecar = lorakit_pipeline::dataset::sidecar_path(&i.path, extension);
                let has_sidecar = corpus.items.iter().any(|s| s.path == sidecar);
                (!has_sidecar).then_some(sidecar)
            } else {
                None
            }
        })
        .collect();
    names.push("images/folder.png".into());
    names
}

/// Images expected in a merge of `extension`: good images whose sidecar is not bad or missing.
fn mergeable_images(corpus: &Corpus, extension: &str) -> Vec<PathBuf> {
    corpus
        .items_in("images", Expect::Good)
        .into_iter()
        .chain(corpus.items_in("images", Expect::Unusual))
        .filter(|i| {
            lorakit_pipeline::dataset::has_image_extension(&i.path) && i.path.to_str().is_some()
        })
        .filter(|i| {
            let sidecar = lorakit_pipeline::dataset::sidecar_path(&i.path, extension);
            corpus.items.iter().any(|s| {
                s.path == sidecar && s.expect != Expect::Bad && corpus.path(&s.path).is_file()
            })
        })
        .map(|i| i.path.clone())
        .collect()
}

/// The tiny SD1 fixture checkpoint.
fn tiny_model() -> PathBuf {
    common::fixtures().join("sd15-tiny/model.safetensors")
}

/// `cache-text-encoder` arguments writing into `out` (never beside the corpus images).
fn te_args(corpus: &Corpus, metadata: &str, model: PathBuf, out: &Path) -> Vec<OsString> {
    os(&[
        &corpus.path(metadata),
        &model,
        &"--cache_dir",
        &out,
        &"--train_data_dir",
        &corpus.images(),
    ])
}

fn json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_merge(corpus: &Corpus, out: &Path, extension: &str, field: &str) {
    let document = json(&out.join("meta.json"));
    let entries = document.as_object().expect("metadata object");
    for image in mergeable_images(corpus, extension) {
        let key = corpus.path(&image).display().to_string();
        let entry = entries
            .get(&key)
            .unwrap_or_else(|| panic!("good image {key} missing from the merge"));
        assert!(entry[field].is_string(), "{key}: no {field}");
    }
    assert!(out.join("meta.json.manifest.json").is_file());
}

fn nothing_written(_: &Corpus, out: &Path, _: &str) {
    let written: Vec<_> = std::fs::read_dir(out).unwrap().collect();
    assert!(
        written.is_empty(),
        "a failed run left files behind: {written:?}"
    );
}

fn lint_must_name(corpus: &Corpus) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = corpus
        .items
        .iter()
        .filter(|i| i.path.starts_with("images"))
        .filter(|i| matches!(i.expect, Expect::Bad | Expect::Unusual))
        .filter(|i| {
            i.description != "file name that is not UTF-8"
                && i.description != "emoji in the file name"
        })
        .map(|i| i.path.clone())
        .collect();
    names.push("images/._good_1.png".into());
    names.push("images/.hidden.png".into());
    names
}

/// Copies a folder with everything in it (odd names, hidden files, sub-folders) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of the corpus images in `out/images`, for the tools that write beside the images.
fn image_copy(corpus: &Corpus, out: &Path) -> PathBuf {
    let images = out.join("images");
    copy_tree(&corpus.images(), &images);
    images
}

/// Image files of the corpus that no tool can read, and the folder named like an image.
fn bad_images(corpus: &Corpus) -> Vec<PathBuf> {
    corpus
        .items
        .iter()
        .filter(|i| i.path.starts_with("images") && i.expect == Expect::Bad)
        .filter(|i| lorakit_pipeline::dataset::has_image_extension(&i.path))
        .map(|i| i.path.clone())
        .collect()
}

/// Readable, visible image files of the corpus (good and unusual).
fn readable_images(corpus: &Corpus) -> Vec<PathBuf> {
    corpus
        .items
        .iter()
        .filter(|i| i.path.starts_with("images") && i.expect != Expect::Bad)
        .filter(|i| lorakit_pipeline::dataset::has_image_extension(&i.path))
        .filter(|i| {
            !i.path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with('.')
        })
        .filter(|i| corpus.path(&i.path).is_file())
        .map(|i| i.path.clone())
        .collect()
}

/// Every readable image of the copy got its `extension` sidecar; no unreadable one did.
fn check_sidecars_written(corpus: &Corpus, out: &Path, extension: &str) {
    let images = out.join("images");
    for image in readable_images(corpus) {
        let sidecar = lorakit_pipeline::dataset::sidecar_path(
            &images.join(image.strip_prefix("images").unwrap()),
            extension,
        );
        assert!(sidecar.is_file(), "{} not written", sidecar.display());
    }
    for image in bad_images(corpus) {
        let sidecar = lorakit_pipeline::dataset::sidecar_path(
            &images.join(image.strip_prefix("images").unwrap()),
            extension,
        );
        let had_one = corpus.path(lorakit_pipeline::dataset::sidecar_path(&image, extension));
        assert!(
            !sidecar.exists() || had_one.exists(),
            "{} written for an unreadable image",
            sidecar.display()
        );
    }
}

/// `prepare-latents` arguments over the corpus images, caches in `out/cache`.
fn latent_args(corpus: &Corpus, model: PathBuf, out: &Path) -> Vec<OsString> {
    os(&[
        &corpus.images(),
        &corpus.path("json/good.json"),
        &out.join("meta_lat.json"),
        &model,
        &"--full_path",
        &"--cache_dir",
        &out.join("cache"),
        &"--max_resolution",
        &"64",
        &"--min_bucket_reso",
        &"64",
        &"--max_bucket_reso",
        &"128",
        &"--bucket_reso_steps",
        &"64",
    ])
}

/// The latent cache name `prepare-latents` gives a corpus image.
fn latent_name(corpus: &Corpus, image: &str) -> String {
    let (w, h) = image::image_dimensions(corpus.path(format!("images/{image}.png"))).unwrap();
    format!("{image}_{w:04}x{h:04}_sd.npz")
}

/// `train-lora` arguments on two good cached samples in `out/data`, one cache file replaced
/// by the corpus file `damaged` (with the entry's `train_resolution` set to `resolution`).
fn train_args(
    corpus: &Corpus,
    out: &Path,
    model: PathBuf,
    damaged: Option<(&str, &str, [u32; 2])>,
) -> Vec<OsString> {
    let data = out.join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::make_training_caches(&data);
    if let Some((file, target, resolution)) = damaged {
        std::fs::copy(corpus.path(file), data.join(target)).unwrap();
        let meta = data.join("meta_lat.json");
        let mut value = json(&meta);
        value["two.png"]["train_resolution"] = serde_json::json!(resolution);
        std::fs::write(&meta, serde_json::to_vec(&value).unwrap()).unwrap();
    }
    os(&[
        &"--pretrained_model_name_or_path",
        &model,
        &"--in_json",
        &data.join("meta_lat.json"),
        &"--train_data_dir",
        &data,
        &"--output_dir",
        &out.join("lora"),
        &"--max_train_steps",
        &"1",
        // The cached text-encoder outputs are among the damaged inputs: the UNet-only mode
        // reads them.
        &"--network_train_unet_only",
        &"--quiet",
    ])
}

/// The tiny model with the header entry of one UNet tensor re-typed (see
/// [`corpus::retyped_tensor`]), written as `out/models/<name>`.
fn damaged_model(out: &Path, name: &str, dtype: &str, shape: &[usize]) -> PathBuf {
    let models = out.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let path = models.join(name);
    // A 3x3 convolution of 32 channels: [32, 32, 3, 3] in F32, 36864 bytes.
    let tensor = "model.diffusion_model.input_blocks.2.0.in_layers.2.weight";
    corpus::retyped_tensor(&tiny_model(), &path, tensor, dtype, shape).unwrap();
    path
}

fn no_lora_written(_: &Corpus, out: &Path, _: &str) {
    assert!(
        !out.join("lora").exists(),
        "a failed training left an output folder behind"
    );
}

const ROWS: &[Row] = &[
    Row {
        name: "merge-captions over the image folder",
        tool: "merge-captions",
        args: |c, out| {
            os(&[
                &c.images(),
                &out.join("meta.json"),
                &"--full_path",
                &"--caption_extension",
                &".caption",
            ])
        },
        code: 3,
        must_name: |c| unmergeable(c, ".caption"),
        check: |c, out, _| check_merge(c, out, ".caption", "caption"),
    },
    Row {
        name: "merge-tags over the image folder",
        tool: "merge-tags",
        args: |c, out| os(&[&c.images(), &out.join("meta.json"), &"--full_path"]),
        code: 3,
        must_name: |c| unmergeable(c, ".txt"),
        check: |c, out, _| check_merge(c, out, ".txt", "tags"),
    },
    Row {
        name: "merge-captions with a truncated --in_json",
        tool: "merge-captions",
        args: |c, out| {
            os(&[
                &c.images(),
                &out.join("meta.json"),
                &"--full_path",
                &"--in_json",
                &c.path("json/truncated.json"),
            ])
        },
        code: 1,
        must_name: |_| vec!["json/truncated.json".into()],
        check: nothing_written,
    },
    Row {
        name: "clean-captions on truncated JSON",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/truncated.json"), &out.join("clean.json")]),
        code: 1,
        must_name: |_| vec!["json/truncated.json".into()],
        check: nothing_written,
    },
    Row {
        name: "clean-captions on a future schema version",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/wrong_version.json"), &out.join("clean.json")]),
        code: 1,
        must_name: |_| vec!["json/wrong_version.json".into()],
        check: nothing_written,
    },
    Row {
        name: "clean-captions on a JSON array",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/not_an_object.json"), &out.join("clean.json")]),
        code: 1,
        must_name: |_| vec!["json/not_an_object.json".into()],
        check: nothing_written,
    },
    Row {
        name: "clean-captions on wrongly typed fields",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/wrong_types.json"), &out.join("clean.json")]),
        code: 1,
        must_name: |_| vec!["json/wrong_types.json".into()],
        check: nothing_written,
    },
    Row {
        name: "clean-captions on a key given twice",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/duplicate_key.json"), &out.join("clean.json")]),
        code: 1,
        must_name: |_| vec!["json/duplicate_key.json".into()],
        check: nothing_written,
    },
    Row {
        name: "clean-captions on UTF-16 metadata",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/utf16.json"), &out.join("clean.json")]),
        code: 1,
        must_name: |_| vec!["json/utf16.json".into()],
        check: nothing_written,
    },
    Row {
        name: "clean-captions on UTF-8 metadata with a byte-order mark",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/utf8_bom.json"), &out.join("clean.json")]),
        code: 0,
        must_name: |_| Vec::new(),
        check: |_, out, _| {
            let cleaned = json(&out.join("clean.json"));
            assert_eq!(cleaned.as_object().unwrap().len(), 2, "{cleaned}");
        },
    },
    Row {
        name: "clean-captions on a key without image",
        tool: "clean-captions",
        args: |c, out| os(&[&c.path("json/dangling_key.json"), &out.join("clean.json")]),
        code: 0,
        must_name: |_| Vec::new(),
        check: |_, out, _| {
            let cleaned = json(&out.join("clean.json"));
            assert_eq!(cleaned.as_object().unwrap().len(), 2, "{cleaned}");
        },
    },
    Row {
        name: "cache-text-encoder with a corrupt safetensors header",
        tool: "cache-text-encoder",
        args: |c, out| {
            te_args(
                c,
                "json/good.json",
                c.path("models/corrupt_header.safetensors"),
                out,
            )
        },
        code: 1,
        must_name: |_| vec!["models/corrupt_header.safetensors".into()],
        check: nothing_written,
    },
    Row {
        name: "cache-text-encoder with an oversized safetensors header length",
        tool: "cache-text-encoder",
        args: |c, out| {
            te_args(
                c,
                "json/good.json",
                c.path("models/header_length.safetensors"),
                out,
            )
        },
        code: 1,
        must_name: |_| vec!["models/header_length.safetensors".into()],
        check: nothing_written,
    },
    Row {
        name: "cache-text-encoder with cut-off safetensors data",
        tool: "cache-text-encoder",
        args: |c, out| {
            te_args(
                c,
                "json/good.json",
                c.path("models/truncated.safetensors"),
                out,
            )
        },
        code: 1,
        must_name: |_| vec!["models/truncated.safetensors".into()],
        check: nothing_written,
    },
    Row {
        name: "cache-text-encoder on truncated metadata",
        tool: "cache-text-encoder",
        args: |c, out| te_args(c, "json/truncated.json", tiny_model(), out),
        code: 1,
        must_name: |_| vec!["json/truncated.json".into()],
        check: nothing_written,
    },
    Row {
        name: "cache-text-encoder over damaged existing caches",
        tool: "cache-text-encoder",
        args: |c, out| {
            for (damaged, image) in [("npz/truncated.npz", "good_1"), ("npz/nan.npz", "good_2")] {
                std::fs::copy(c.path(damaged), out.join(format!("{image}_te_outputs.npz")))
                    .unwrap();
            }
            te_args(c, "json/good.json", tiny_model(), out)
        },
        code: 0,
        must_name: |_| Vec::new(),
        check: |c, out, _| {
            for (damaged, image) in [("npz/truncated.npz", "good_1"), ("npz/nan.npz", "good_2")] {
                let cache = std::fs::read(out.join(format!("{image}_te_outputs.npz"))).unwrap();
                assert_ne!(
                    cache,
                    std::fs::read(c.path(damaged)).unwrap(),
                    "{image}: damaged cache kept"
                );
            }
        },
    },
    Row {
        name: "cache-text-encoder with a key without image",
        tool: "cache-text-encoder",
        args: |c, out| te_args(c, "json/dangling_key.json", tiny_model(), out),
        code: 0,
        must_name: |_| Vec::new(),
        check: |_, out, _| {
            assert!(out.join("good_1_te_outputs.npz").is_file());
        },
    },
    Row {
        name: "lint-dataset over the image folder",
        tool: "lint-dataset",
        args: |c, _| os(&[&c.images()]),
        code: 3,
        must_name: lint_must_name,
        check: |c, out, stdout| {
            assert!(stdout.contains("errors,"), "no summary line:\n{stdout}");
            nothing_written(c, out, stdout);
        },
    },
    Row {
        name: "lint-dataset --decode --json with a dangling metadata key",
        tool: "lint-dataset",
        args: |c, _| {
            os(&[
                &c.images(),
                &"--decode",
                &"--json",
                &"--in_json",
                &c.path("json/dangling_key.json"),
            ])
        },
        code: 3,
        must_name: |c| {
            let mut names = lint_must_name(c);
            names.push("json/dangling_key.json".into());
            names
        },
        check: |c, _, stdout| {
            let report: Value = serde_json::from_str(stdout).expect("JSON report");
            let good = c.path("images/good_1.png").display().to_string();
            let findings = report["findings"].as_array().unwrap();
            assert!(
                findings.iter().all(|f| f["path"] != good.as_str()),
                "a good image was reported: {good}"
            );
            assert!(findings.iter().any(|f| f["code"] == "entry_without_image"));
        },
    },
    Row {
        name: "tag-images over a copy of the image folder",
        tool: "tag-images",
        args: |c, out| {
            common::use_project_runtime();
            let models = out.join("models/SmilingWolf_wd-v1-4-convnext-tagger-v2");
            copy_tree(&common::fixtures().join("wd14-tiny"), &models);
            os(&[
                &image_copy(c, out),
                &"--model_dir",
                &out.join("models"),
                &"--onnx",
                &"--batch_size",
                &"4",
            ])
        },
        code: 3,
        must_name: bad_images,
        check: |c, out, _| check_sidecars_written(c, out, ".txt"),
    },
    Row {
        name: "caption-images over a copy of the image folder",
        tool: "caption-images",
        args: |c, out| {
            os(&[
                &image_copy(c, out),
                &"--caption_weights",
                &common::fixtures().join("blip-tiny"),
                &"--batch_size",
                &"4",
            ])
        },
        code: 3,
        must_name: bad_images,
        check: |c, out, _| check_sidecars_written(c, out, ".caption"),
    },
    Row {
        name: "prepare-latents over the image folder",
        tool: "prepare-latents",
        args: |c, out| latent_args(c, tiny_model(), out),
        code: 3,
        must_name: bad_images,
        check: |c, out, _| {
            for image in ["good_1", "good_2"] {
                let name = if image == "good_1" {
                    latent_name(c, image)
                } else {
                    let (w, h) = image::image_dimensions(c.path("images/good_2.jpg")).unwrap();
                    format!("good_2_{w:04}x{h:04}_sd.npz")
                };
                assert!(out.join("cache").join(&name).is_file(), "{name} missing");
            }
            let metadata = json(&out.join("meta_lat.json"));
            let key = c.path("images/good_1.png").display().to_string();
            assert!(metadata[&key]["train_resolution"].is_array(), "{metadata}");
        },
    },
    Row {
        name: "prepare-latents over damaged existing caches",
        tool: "prepare-latents",
        args: |c, out| {
            std::fs::create_dir_all(out.join("cache")).unwrap();
            std::fs::copy(
                c.path("npz/truncated.npz"),
                out.join("cache").join(latent_name(c, "good_1")),
            )
            .unwrap();
            latent_args(c, tiny_model(), out)
        },
        code: 3,
        must_name: bad_images,
        check: |c, out, _| {
            let cache = out.join("cache").join(latent_name(c, "good_1"));
            let mut reader = lorakit_pipeline::formats::npz::NpzReader::open(&cache).unwrap();
            assert!(lorakit_pipeline::formats::npz::stored_key(&mut reader).is_some());
        },
    },
    Row {
        name: "prepare-latents with a corrupt safetensors header",
        tool: "prepare-latents",
        args: |c, out| latent_args(c, c.path("models/corrupt_header.safetensors"), out),
        code: 1,
        must_name: |_| vec!["models/corrupt_header.safetensors".into()],
        check: nothing_written,
    },
    Row {
        name: "train-lora with a corrupt safetensors header",
        tool: "train-lora",
        args: |c, out| train_args(c, out, c.path("models/corrupt_header.safetensors"), None),
        code: 1,
        must_name: |_| vec!["models/corrupt_header.safetensors".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora on metadata whose manifest declares a future schema version",
        tool: "train-lora",
        args: |c, out| {
            let args = train_args(c, out, tiny_model(), None);
            let manifest = out.join("data/meta_lat.json.manifest.json");
            std::fs::copy(c.path("json/wrong_version.json.manifest.json"), manifest).unwrap();
            args
        },
        code: 1,
        must_name: |_| vec!["meta_lat.json.manifest.json".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with a latent cache without latents",
        tool: "train-lora",
        args: |c, out| {
            let damaged = ("npz/wrong_keys.npz", "two_0512x0512_sd.npz", [128, 128]);
            train_args(c, out, tiny_model(), Some(damaged))
        },
        code: 1,
        must_name: |_| vec!["two_0512x0512_sd.npz".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with latents of another bucket",
        tool: "train-lora",
        args: |c, out| {
            let damaged = ("npz/wrong_shape.npz", "two_0512x0512_sd.npz", [128, 128]);
            train_args(c, out, tiny_model(), Some(damaged))
        },
        code: 1,
        must_name: |_| vec!["two_0512x0512_sd.npz".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with NaN latents",
        tool: "train-lora",
        args: |c, out| {
            let damaged = ("npz/nan.npz", "two_0512x0512_sd.npz", [96, 64]);
            train_args(c, out, tiny_model(), Some(damaged))
        },
        code: 1,
        must_name: |_| vec!["two_0512x0512_sd.npz".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with a latent cache declaring 4 GiB",
        tool: "train-lora",
        args: |c, out| {
            let damaged = ("npz/huge_shape.npz", "two_0512x0512_sd.npz", [128, 128]);
            train_args(c, out, tiny_model(), Some(damaged))
        },
        code: 1,
        must_name: |_| vec!["two_0512x0512_sd.npz".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with a truncated latent cache",
        tool: "train-lora",
        args: |c, out| {
            let damaged = ("npz/truncated.npz", "two_0512x0512_sd.npz", [128, 128]);
            train_args(c, out, tiny_model(), Some(damaged))
        },
        code: 1,
        must_name: |_| vec!["two_0512x0512_sd.npz".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with a UNet tensor of the wrong shape",
        tool: "train-lora",
        args: |c, out| {
            let model = damaged_model(out, "unet_wrong_shape.safetensors", "F32", &[64, 16, 3, 3]);
            train_args(c, out, model, None)
        },
        code: 1,
        must_name: |_| vec!["unet_wrong_shape.safetensors".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with an I8 UNet tensor",
        tool: "train-lora",
        args: |c, out| {
            let model = damaged_model(out, "unet_int8.safetensors", "I8", &[128, 32, 3, 3]);
            train_args(c, out, model, None)
        },
        code: 1,
        must_name: |_| vec!["unet_int8.safetensors".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with a text-encoder cache of another model",
        tool: "train-lora",
        args: |c, out| {
            let args = train_args(c, out, tiny_model(), None);
            // 1024 wide, as SD2.x's text encoder writes it.
            let cache = out.join("data/two_te_outputs.npz");
            common::write_npz_f32(&cache, "hidden_state", vec![0.0; 77 * 1024], &[77, 1024]);
            args
        },
        code: 1,
        must_name: |_| vec!["two_te_outputs.npz".into(), "one_te_outputs.npz".into()],
        check: no_lora_written,
    },
    Row {
        name: "train-lora with an integer text-encoder cache",
        tool: "train-lora",
        args: |c, out| {
            let damaged = ("npz/te_wrong_dtype.npz", "two_te_outputs.npz", [128, 128]);
            train_args(c, out, tiny_model(), Some(damaged))
        },
        code: 1,
        must_name: |_| vec!["two_te_outputs.npz".into()],
        check: no_lora_written,
    },
];

/// Every file and folder under `root`, relative.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path.clone());
            }
            found.insert(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
    found
}

/// The tool's closing summary line (`N done, N up to date, N failed`), or its error line.
fn outcome_line(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find(|l| l.contains(" done, ") || l.contains("error"))
        .map(|l| {
            let line = l.split_once(": ").map_or(l, |(_, rest)| rest);
            line.chars().take(70).collect()
        })
        .unwrap_or_default()
}

/// Runs one row; returns the tool's outcome line.
fn run_row(corpus: &Corpus, row: &Row, out: &Path) -> Result<String, String> {
    std::fs::create_dir_all(out).unwrap();
    let before = tree(&corpus.root);
    let output = Command::new(tool(row.tool))
        .args((row.args)(corpus, out))
        .output()
        .expect("tool starts");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let all = format!("{stdout}\n{stderr}");
    let context = || format!("{}: {}\nstderr:\n{stderr}", row.name, row.tool);
    if output.status.code() == Some(101) || stderr.contains("panicked at") {
        return Err(format!("{} panicked", context()));
    }
    if output.status.code() != Some(row.code) {
        return Err(format!(
            "{} exit code {:?}, documented {}",
            context(),
            output.status.code(),
            row.code
        ));
    }
    for name in (row.must_name)(corpus) {
        let file_name = name.file_name().unwrap().to_string_lossy().into_owned();
        if !all.contains(&file_name) {
            return Err(format!(
                "{} never names {file_name}\nstdout:\n{stdout}",
                context()
            ));
        }
    }
    let after = tree(&corpus.root);
    let changed: Vec<_> = after.symmetric_difference(&before).collect();
    if !changed.is_empty() {
        return Err(format!("{} changed the corpus: {changed:?}", context()));
    }
    let leftovers: Vec<_> = tree(out)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
        })
        .collect();
    if !leftovers.is_empty() {
        return Err(format!("{} left temporary files {leftovers:?}", context()));
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (row.check)(corpus, out, &stdout)
    }))
    .map(|()| outcome_line(&stderr))
    .map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{}: output check failed: {message}", context())
    })
}

#[test]
fn every_tool_survives_the_bad_input_corpus() {
    let root = tempfile::tempdir().unwrap();
    let corpus = corpus::generate(&root.path().join("corpus")).unwrap();
    assert!(
        corpus.items.len() >= 30,
        "corpus has {} items",
        corpus.items.len()
    );
    eprintln!("corpus: {} items", corpus.items.len());
    let mut failures = Vec::new();
    for (index, row) in ROWS.iter().enumerate() {
        let out = root.path().join(format!("out{index}"));
        let outcome = run_row(&corpus, row, &out);
        eprintln!(
            "| {:<52} | {} | {:<6} | {} |",
            row.name,
            row.code,
            if outcome.is_ok() { "ok" } else { "FAILED" },
            outcome.as_deref().unwrap_or("")
        );
        if let Err(message) = outcome {
            failures.push(message);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn declared_array_sizes_are_checked_before_reading() {
    let root = tempfile::tempdir().unwrap();
    let corpus = corpus::generate(&root.path().join("corpus")).unwrap();
    // The corpus archives are readable as such: a good one reads, the huge one is refused.
    let valid = corpus.path("npz/valid_latents.npz");
    let mut reader = lorakit_pipeline::formats::npz::NpzReader::open(&valid).unwrap();
    assert_eq!(reader.read_f32("latents").unwrap().1, vec![4, 8, 12]);
    let path = corpus.path("npz/huge_shape.npz");
    let started = std::time::Instant::now();
    let message = lorakit_pipeline::formats::npz::NpzReader::open(&path)
        .unwrap()
        .read_f32("latents")
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("huge_shape.npz") && message.contains("declares 4294967296 bytes"),
        "{message}"
    );
    assert!(started.elapsed().as_secs_f64() < 1.0);
}
