//! Every lorakit tool run over the generated bad-input corpus (`lorakit_tests::corpus`).
//!
//! Each row of [`ROWS`] says how to invoke one tool on the corpus, which exit code is documented
//! for that case, which files the output must name, and how to check that the good files were
//! processed. For every row: no panic, no temporary (`.lorakit-tmp-*`) or partial output files.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::tool;
use lorakit_pipeline::fsio::TEMP_PREFIX;
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

fn os(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
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

fn run_row(corpus: &Corpus, row: &Row, out: &Path) -> Result<(), String> {
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
            "{:<60} exit {} {}",
            row.name,
            row.code,
            if outcome.is_ok() { "ok" } else { "FAILED" }
        );
        if let Err(message) = outcome {
            failures.push(message);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
