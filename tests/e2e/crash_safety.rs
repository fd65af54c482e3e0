//! Crash safety: each long-running tool is killed with SIGKILL at random points (several seeds).
//! Every output present afterwards must be complete and valid, and a re-run must finish the job
//! with the same result as an uninterrupted run. Leftover temporary files of the killed run are
//! never read by the re-run, and `lint-dataset` reports them.
//!
//! Rows are per tool, like the bad-input table; stages with per-item outputs add a row whose
//! check also asserts that the re-run counts the finished items as up to date.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::tool;
use lorakit_pipeline::fsio::TEMP_PREFIX;

/// One tool under test.
struct CrashRow {
    /// Executable name.
    tool: &'static str,
    /// Prepares inputs under the given folder; returns the arguments and the output files.
    setup: fn(&Path) -> (Vec<OsString>, Vec<PathBuf>),
    /// Checks that an output file that exists after a kill is complete and valid.
    valid: fn(&Path) -> Result<(), String>,
}

/// Number of images in the generated dataset: enough for a run of a few tens of milliseconds.
const IMAGES: usize = 3000;

fn caption_dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for index in 0..IMAGES {
        std::fs::write(data.join(format!("img{index:05}.png")), b"").unwrap();
        std::fs::write(
            data.join(format!("img{index:05}.caption")),
            format!("a photo number {index}, 1girl, ({index}), rating: safe"),
        )
        .unwrap();
    }
    data
}

fn valid_metadata(path: &Path) -> Result<(), String> {
    if path.to_string_lossy().ends_with(".manifest.json") {
        let value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return lorakit_pipeline::schema::validate(lorakit_pipeline::schema::MANIFEST_V1, &value);
    }
    let metadata = lorakit_pipeline::metadata::Metadata::load(path).map_err(|e| e.to_string())?;
    if metadata.len() != IMAGES {
        return Err(format!(
            "{}: {} of {IMAGES} entries",
            path.display(),
            metadata.len()
        ));
    }
    Ok(())
}

const ROWS: &[CrashRow] = &[
    CrashRow {
        tool: "merge-captions",
        setup: |root| {
            let data = caption_dataset(root);
            let out = root.join("meta_cap.json");
            let manifest = root.join("meta_cap.json.manifest.json");
            (
                vec![data.into(), out.clone().into(), "-q".into()],
                vec![out, manifest],
            )
        },
        valid: valid_metadata,
    },
    CrashRow {
        tool: "clean-captions",
        setup: |root| {
            let data = caption_dataset(root);
            let input = root.join("meta_cap.json");
            let status = Command::new(tool("merge-captions"))
                .args([data.as_os_str(), input.as_os_str(), "-q".as_ref()])
                .status()
                .unwrap();
            assert!(status.success());
            let out = root.join("meta_clean.json");
            let manifest = root.join("meta_clean.json.manifest.json");
            (
                vec![input.into(), out.clone().into(), "-q".into()],
                vec![out, manifest],
            )
        },
        valid: valid_metadata,
    },
];

/// Small deterministic generator for kill delays.
fn next_random(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
        })
        .collect()
}

#[test]
fn killed_runs_leave_valid_outputs_and_resume() {
    let root = tempfile::tempdir().unwrap();
    for row in ROWS {
        let reference_dir = root.path().join(format!("{}-reference", row.tool));
        let (args, outputs) = (row.setup)(&reference_dir);
        let started = Instant::now();
        let status = Command::new(tool(row.tool)).args(&args).status().unwrap();
        let duration = started.elapsed();
        assert!(status.success(), "{} reference run failed", row.tool);
        let reference = std::fs::read(&outputs[0]).unwrap();

        for seed in 1..=5u64 {
            let dir = root.path().join(format!("{}-{seed}", row.tool));
            let (args, outputs) = (row.setup)(&dir);
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let delay = duration.mul_f64(1.2 * next_random(&mut state));
            let mut child = Command::new(tool(row.tool)).args(&args).spawn().unwrap();
            std::thread::sleep(delay.min(Duration::from_secs(5)));
            let _ = child.kill();
            child.wait().unwrap();
            for output in outputs.iter().filter(|o| o.exists()) {
                if let Err(problem) = (row.valid)(output) {
                    panic!(
                        "{} killed after {delay:?}: invalid output: {problem}",
                        row.tool
                    );
                }
            }
            let leftovers = temp_files(&dir);
            if !leftovers.is_empty() {
                let report = Command::new(tool("lint-dataset"))
                    .args([dir.as_os_str(), "--json".as_ref(), "-q".as_ref()])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&report.stdout);
                for leftover in &leftovers {
                    let name = leftover.file_name().unwrap().to_string_lossy();
                    assert!(text.contains(name.as_ref()), "lint-dataset misses {name}");
                }
            }
            let status = Command::new(tool(row.tool)).args(&args).status().unwrap();
            assert!(status.success(), "{} re-run after a kill failed", row.tool);
            assert_eq!(
                std::fs::read(&outputs[0]).unwrap(),
                reference,
                "{} re-run after a kill at {delay:?} differs from an uninterrupted run",
                row.tool
            );
            for output in &outputs {
                (row.valid)(output).unwrap();
            }
        }
    }
}
