//! Helpers shared by the end-to-end tests: locating the built tools and the bundled fixtures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The folder of bundled fixtures (`tests/fixtures`); a missing fixture is a test failure.
pub fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    assert!(
        dir.join("MANIFEST.json").is_file(),
        "fixtures missing at {}",
        dir.display()
    );
    dir
}

/// Path of a built lorakit executable (built by `cargo build --workspace`, which `make test` runs).
pub fn tool(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps layout");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace` (make test does)",
        path.display()
    );
    path
}

/// An argument list from mixed strings and paths, owned.
pub fn os(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

/// Runs a tool with arguments and returns its output.
pub fn run(name: &str, args: &[&std::ffi::OsStr]) -> Output {
    run_with_env(name, args, &[])
}

/// Runs a tool with arguments and the environment variables `env` set.
pub fn run_with_env(name: &str, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Output {
    Command::new(tool(name))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("tool starts")
}

/// Runs a tool and asserts its exit code, returning stderr as text.
pub fn run_expect(name: &str, args: &[&std::ffi::OsStr], code: i32) -> String {
    run_expect_with_env(name, args, &[], code)
}

/// [`run_expect`] with the environment variables `env` set.
pub fn run_expect_with_env(
    name: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
    code: i32,
) -> String {
    let output = run_with_env(name, args, env);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "{name} {args:?}\nstderr:\n{stderr}"
    );
    stderr
}

/// Copies the files of `from` (not subfolders) into a new folder `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Writes an npz with one float32 array.
pub fn write_npz_f32(path: &Path, name: &str, values: Vec<f32>, shape: &[usize]) {
    let mut npz = lorakit_pipeline::formats::npz::NpzWriter::new();
    npz.add_f32(name, values, shape).unwrap();
    npz.write(path).unwrap();
}

/// `train-lora` inputs in `dir`: `meta_lat.json` with two images with 16x16 latents (crops of
/// the golden latent cache) and golden text states.
pub fn make_training_caches(dir: &Path) {
    let golden = fixtures().join("golden/vae/astronaut_0512x0512_sd.npz");
    let (full, _) = lorakit_pipeline::formats::npz::NpzReader::open(&golden)
        .unwrap()
        .read_f32("latents")
        .unwrap();
    let crop: Vec<f32> = (0..4)
        .flat_map(|c| (0..16).flat_map(move |y| (0..16).map(move |x| (c, y, x))))
        .map(|(c, y, x)| full[c * 1024 + y * 32 + x])
        .collect();
    let (states, _) =
        lorakit_pipeline::formats::npz::NpzReader::open(&fixtures().join("golden/unet/unet.npz"))
            .unwrap()
            .read_f32("encoder_hidden_states_77")
            .unwrap();
    let mut meta = serde_json::Map::new();
    for (i, stem) in ["one", "two"].iter().enumerate() {
        write_npz_f32(
            &dir.join(format!("{stem}_0512x0512_sd.npz")),
            "latents",
            crop.clone(),
            &[4, 16, 16],
        );
        write_npz_f32(
            &dir.join(format!("{stem}_te_outputs.npz")),
            "hidden_state",
            states[i * 77 * 64..(i + 1) * 77 * 64].to_vec(),
            &[77, 64],
        );
        meta.insert(
            format!("{stem}.png"),
            serde_json::json!({"caption": "a cat", "tags": "cat", "train_resolution": [128, 128]}),
        );
    }
    std::fs::write(
        dir.join("meta_lat.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
}

/// Shorthand for building an argument list of mixed strings and paths.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new(&$a)),*] };
}

/// Points the tools at this repository's ONNX Runtime (`make setup` installs it), so a binary
/// built from another checkout sharing the target folder still finds it.
pub fn use_project_runtime() {
    let library = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.local/onnxruntime")
        .join(lorakit_pipeline::stages::tag_images::onnx::LIBRARY_NAME);
    assert!(
        library.is_file(),
        "{} missing: run `make setup` (make test does)",
        library.display()
    );
    std::env::set_var("ORT_DYLIB_PATH", library);
}

/// Where the `ss_*` / `modelspec.*` metadata `ours` of a LoRA differs from what sd-scripts
/// wrote in a `golden/sd_scripts_runs` case (`golden`), key by key, as `key: ours ..,
/// sd-scripts ..` lines: every key of the golden except those that change between any two runs
/// (its `varying_keys`) and those that differ on purpose (listed here with the reason).
pub fn sd_scripts_metadata_differences(
    golden: &serde_json::Value,
    ours: &std::collections::HashMap<String, String>,
) -> Vec<String> {
    let varying = golden["varying_keys"].as_object().unwrap();
    let explained: &[(&str, &str)] = &[
        (
            "ss_cache_latents",
            "latents are always cached here; recorded as True regardless",
        ),
        (
            "modelspec.implementation_version",
            "names our tool and version",
        ),
        ("ss_sd_scripts_commit_hash", "sd-scripts' own commit"),
        ("ss_text_encoder_lr", "UNet-only training"),
    ];
    let mut differences = Vec::new();
    for (key, value) in golden["lora_metadata"].as_object().unwrap() {
        if varying.contains_key(key) || explained.iter().any(|(k, _)| k == key) {
            continue;
        }
        let value = value.as_str().unwrap();
        match ours.get(key) {
            Some(ours) if ours == value => {}
            Some(ours) => differences.push(format!("{key}: ours {ours:?}, sd-scripts {value:?}")),
            None => differences.push(format!("{key}: missing (sd-scripts {value:?})")),
        }
    }
    differences
}

/// Every tensor of a safetensors file (name → shape and dtype) and its metadata.
pub fn safetensors_header(
    path: &Path,
) -> (
    std::collections::BTreeMap<String, (Vec<u64>, String)>,
    serde_json::Value,
) {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let tensors = (header.as_object().unwrap().iter())
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let shape = info["shape"].as_array().unwrap();
            let shape = shape.iter().map(|d| d.as_u64().unwrap()).collect();
            (
                name.clone(),
                (shape, info["dtype"].as_str().unwrap().into()),
            )
        })
        .collect();
    (tensors, header["__metadata__"].clone())
}

/// The `keys` of a golden key-set JSON (name → shape and torch dtype) as
/// [`safetensors_header`] gives them, and the whole JSON.
pub fn golden_keys(
    path: &Path,
) -> (
    std::collections::BTreeMap<String, (Vec<u64>, String)>,
    serde_json::Value,
) {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let keys = (golden["keys"].as_object().unwrap().iter())
        .map(|(name, info)| {
            let shape = info["shape"].as_array().unwrap();
            let shape = shape.iter().map(|d| d.as_u64().unwrap()).collect();
            let dtype = match info["dtype"].as_str().unwrap() {
                "float32" => "F32",
                "int64" => "I64",
                other => panic!("{name}: unexpected golden dtype {other}"),
            };
            (name.clone(), (shape, dtype.to_string()))
        })
        .collect();
    (keys, golden)
}

/// The Python of the reference environment (`LORAKIT_REFERENCE_PYTHON`), when it is set and can
/// import `modules` (a comma-separated import list).
pub fn reference_python(modules: &str) -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("LORAKIT_REFERENCE_PYTHON")?);
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .current_dir(std::env::temp_dir())
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

/// Runs the Python `script` (`python -c`) with `args` in the temporary folder, asserts that it
/// succeeded (naming `what` could not load the file) and returns its standard output.
pub fn run_reference_script(
    python: &Path,
    script: &str,
    args: &[&std::ffi::OsStr],
    what: &str,
) -> String {
    let output = Command::new(python)
        .args(["-c", script])
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{what} cannot load the file: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
