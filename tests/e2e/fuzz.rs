//! The hostile-input property layer: proptest generates damaged metadata, caches, models,
//! sidecars, argument values and file names; each case runs the built tools in a sandbox folder
//! and checks the invariants every tool keeps, whatever its input:
//!
//! - it ends by itself (no hang: a time limit per run) with a documented exit code, never a
//!   panic or a signal;
//! - it writes only inside the folders it was given for output, never replaces or damages an
//!   input, and leaves no temporary file;
//! - when it fails, or skips an item, its message names the file or the flag at fault.
//!
//! `LORAKIT_FUZZ_CASES` sets the cases per property (`make test` runs a few; `make fuzz` more),
//! `LORAKIT_FUZZ_VERBOSE` prints how each run ended,
//! `LORAKIT_FUZZ_SEED` the generator seed (fixed unless given, so CI runs are repeatable).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lorakit_pipeline::infra::fsio::TEMP_PREFIX;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

use crate::common::{fixtures, make_training_caches, os, tool};

/// Longest a single tool run may take before it counts as a hang.
const TIME_LIMIT: Duration = Duration::from_secs(120);

/// Cases per property: `LORAKIT_FUZZ_CASES`, else a number small enough for every `make test`.
fn cases() -> u32 {
    std::env::var("LORAKIT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

thread_local! {
    /// The tool and exit code of every run of the current property (a property runs on one thread).
    static EXITS: std::cell::RefCell<Vec<(String, Option<i32>)>> = Default::default();
}

/// Runs `property` first on `baseline` (an undamaged input: every tool must succeed, so the
/// property is known to reach the work), then on `cases()` values of `strategy`, from
/// `LORAKIT_FUZZ_SEED` (or a fixed seed), and prints how the runs ended.
fn check<S>(
    name: &str,
    strategy: S,
    baseline: S::Value,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    if let Err(failure) = property(baseline) {
        panic!("fuzz {name}: the undamaged baseline fails: {failure}");
    }
    let failed: Vec<_> = EXITS
        .with_borrow_mut(std::mem::take)
        .into_iter()
        .filter(|(_, code)| *code != Some(0))
        .collect();
    assert!(
        failed.is_empty(),
        "fuzz {name}: the undamaged baseline fails: {failed:?}"
    );
    let seed: u64 = std::env::var("LORAKIT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261204);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 16,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let started = Instant::now();
    let result = runner.run(&strategy, property);
    let mut ends = BTreeMap::<String, usize>::new();
    for (tool_name, code) in EXITS.with_borrow_mut(std::mem::take) {
        let code = code.map_or("signal".into(), |c| c.to_string());
        *ends.entry(format!("{tool_name} exit {code}")).or_default() += 1;
    }
    eprintln!(
        "fuzz {name}: {} cases, seed {seed}, {:.1} s; runs: {ends:?}",
        cases(),
        started.elapsed().as_secs_f64()
    );
    if let Err(failure) = result {
        panic!("fuzz {name} (LORAKIT_FUZZ_SEED={seed}): {failure}");
    }
}

/// A folder for one case: inputs under `data/`, outputs under `out/`.
struct Sandbox {
    root: tempfile::TempDir,
}

/// Every file under a folder with a digest of its content.
type Snapshot = BTreeMap<PathBuf, (u64, u32)>;

impl Sandbox {
    fn new() -> Self {
        let sandbox = Sandbox {
            root: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(sandbox.data()).unwrap();
        std::fs::create_dir(sandbox.out()).unwrap();
        sandbox
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn out(&self) -> PathBuf {
        self.root.path().join("out")
    }

    fn snapshot(&self) -> Snapshot {
        walkdir::WalkDir::new(self.root.path())
            .into_iter()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_type().is_file())
            .map(|entry| {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                let relative = entry.path().strip_prefix(self.root.path()).unwrap();
                let digest = (bytes.len() as u64, crc32fast::hash(&bytes));
                (relative.to_path_buf(), digest)
            })
            .collect()
    }

    /// Runs `tool` and checks the invariants; `names` are the file names or flags a failure
    /// message must mention one of.
    fn run(
        &self,
        tool_name: &str,
        args: &[OsString],
        names: &[String],
    ) -> Result<Run, TestCaseError> {
        self.run_writing(tool_name, args, names, &[])
    }

    /// [`Sandbox::run`] for a tool that may also write, under `data/`, files whose names end
    /// with one of `data_suffixes` (caches beside the images).
    fn run_writing(
        &self,
        tool_name: &str,
        args: &[OsString],
        names: &[String],
        data_suffixes: &[&str],
    ) -> Result<Run, TestCaseError> {
        let writable = |path: &Path| {
            path.starts_with("out")
                || (path.starts_with("data")
                    && data_suffixes.iter().any(|s| name_of(path).ends_with(s)))
        };
        let before = self.snapshot();
        let run = run_bounded(tool_name, args)?;
        EXITS.with_borrow_mut(|exits| exits.push((tool_name.to_string(), run.code)));
        if std::env::var_os("LORAKIT_FUZZ_VERBOSE").is_some() {
            let last = run.stderr.lines().filter(|l| !l.contains(" INFO ")).last();
            eprintln!("  {tool_name} exit {:?}: {}", run.code, last.unwrap_or(""));
        }
        let context = || format!("{tool_name} {args:?}\nstderr:\n{}", run.stderr);
        match run.code {
            Some(0..=3) => {}
            code => {
                return Err(fail(format!(
                    "exit {code:?} (panic or signal): {}",
                    context()
                )))
            }
        }
        if run.stderr.contains("panicked at") {
            return Err(fail(format!("panicked: {}", context())));
        }
        let after = self.snapshot();
        for (path, digest) in &before {
            if !writable(path) && after.get(path) != Some(digest) {
                return Err(fail(format!(
                    "changed input {}: {}",
                    path.display(),
                    context()
                )));
            }
        }
        for path in after.keys() {
            if !writable(path) && !before.contains_key(path) {
                return Err(fail(format!(
                    "wrote {} outside its outputs: {}",
                    path.display(),
                    context()
                )));
            }
            let name = path.file_name().unwrap().to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                return Err(fail(format!("left {}: {}", path.display(), context())));
            }
        }
        if run.code != Some(0) && !names.iter().any(|n| run.stderr.contains(n.as_str())) {
            return Err(fail(format!("names none of {names:?}: {}", context())));
        }
        Ok(run)
    }
}

/// How a bounded tool run ended.
struct Run {
    code: Option<i32>,
    stderr: String,
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

/// Runs a tool with its output in files (no pipe to fill) and kills it at [`TIME_LIMIT`].
fn run_bounded(tool_name: &str, args: &[OsString]) -> Result<Run, TestCaseError> {
    let logs = tempfile::tempdir().unwrap();
    let stderr_path = logs.path().join("stderr");
    let mut child = Command::new(tool(tool_name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIME_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "{tool_name} {args:?} still running after {TIME_LIMIT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Run {
        code: status.code(),
        stderr: String::from_utf8_lossy(&std::fs::read(&stderr_path).unwrap()).into_owned(),
    })
}

fn name_of(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

// ---- Damage: byte edits for any file, structural edits for JSON --------------------------------

/// Byte sequences that break parsers in interesting ways.
const TOKENS: &[&[u8]] = &[
    b"\xEF\xBB\xBF",
    b"\xFF\xFE",
    b"\x00",
    b"\xC3\x28",
    b"NaN",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\"../../escaped\"",
    b"/",
    b"[",
    b"{",
    b"}",
    b"\"",
    b",",
    b"\\u0000",
    b"\r\n",
];

/// One edit of a file's bytes.
#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(Index),
    FlipBit(Index, u8),
    Insert(Index, Index),
    Overwrite(Index, Vec<u8>),
    Remove(Index, usize),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        any::<Index>().prop_map(ByteEdit::Truncate),
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| ByteEdit::FlipBit(at, bit)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, token)| ByteEdit::Insert(at, token)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(at, bytes)| ByteEdit::Overwrite(at, bytes)),
        (any::<Index>(), 1usize..64).prop_map(|(at, len)| ByteEdit::Remove(at, len)),
    ]
}

/// Applies `edits` to the bytes in `range` of `bytes` (the whole file when `None`).
fn apply_bytes(bytes: &mut Vec<u8>, edits: &[ByteEdit], range: Option<std::ops::Range<usize>>) {
    for edit in edits {
        let range = range.clone().unwrap_or(0..bytes.len());
        let span = range
            .end
            .min(bytes.len())
            .saturating_sub(range.start)
            .max(1);
        let at = |index: &Index| (range.start + index.index(span)).min(bytes.len());
        match edit {
            ByteEdit::Truncate(index) => bytes.truncate(at(index)),
            ByteEdit::FlipBit(index, bit) => {
                let i = at(index);
                if i < bytes.len() {
                    bytes[i] ^= 1 << bit;
                }
            }
            ByteEdit::Insert(index, token) => {
                let i = at(index);
                let token = TOKENS[token.index(TOKENS.len())];
                bytes.splice(i..i, token.iter().copied());
            }
            ByteEdit::Overwrite(index, new) => {
                let i = at(index);
                let end = (i + new.len()).min(bytes.len());
                bytes.splice(i..end, new.iter().copied());
            }
            ByteEdit::Remove(index, len) => {
                let i = at(index);
                bytes.drain(i..(i + len).min(bytes.len()));
            }
        }
    }
}

/// JSON values that are legal JSON but hostile where a caption, size or path is expected.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(1e300)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!("")),
        Just(serde_json::json!("../../escaped.png")),
        Just(serde_json::json!("/etc/passwd")),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
        Just(serde_json::json!([0, 0])),
        Just(serde_json::json!([100000, 100000])),
        Just(serde_json::json!("\u{0}\u{202e}\u{feff}")),
        "\\PC{0,40}".prop_map(Value::String),
    ]
}

/// One edit of a JSON document's structure.
#[derive(Debug, Clone)]
enum JsonEdit {
    /// Replaces the value at one of the document's paths.
    Replace(Index, Value),
    /// Renames a top-level key.
    RenameKey(Index, String),
    /// Removes a value.
    Remove(Index),
}

fn hostile_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("../outside/x.png".to_string()),
        Just("/tmp/absolute.png".to_string()),
        Just(String::new()),
        Just("a\u{0}b.png".to_string()),
        Just("one.png/..".to_string()),
        "[a-z./\\\\]{1,30}",
    ]
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        (any::<Index>(), hostile_value()).prop_map(|(at, v)| JsonEdit::Replace(at, v)),
        (any::<Index>(), hostile_key()).prop_map(|(at, k)| JsonEdit::RenameKey(at, k)),
        any::<Index>().prop_map(JsonEdit::Remove),
    ]
}

/// JSON pointers of every value under `value` (the root excluded).
fn pointers(value: &Value, prefix: String, found: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.replace('~', "~0").replace('/', "~1"), v))
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => Vec::new(),
    };
    for (key, child) in children {
        let pointer = format!("{prefix}/{key}");
        found.push(pointer.clone());
        pointers(child, pointer, found);
    }
}

fn apply_json(document: &mut Value, edits: &[JsonEdit]) {
    for edit in edits {
        let mut paths = Vec::new();
        pointers(document, String::new(), &mut paths);
        if paths.is_empty() {
            return;
        }
        match edit {
            JsonEdit::Replace(at, value) => {
                *document.pointer_mut(&paths[at.index(paths.len())]).unwrap() = value.clone();
            }
            JsonEdit::RenameKey(at, key) => {
                if let Value::Object(map) = document {
                    let keys: Vec<String> = map.keys().cloned().collect();
                    if !keys.is_empty() {
                        let old = &keys[at.index(keys.len())];
                        let value = map.remove(old).unwrap();
                        map.insert(key.clone(), value);
                    }
                }
            }
            JsonEdit::Remove(at) => {
                let path = &paths[at.index(paths.len())];
                let (parent, key) = path.rsplit_once('/').unwrap();
                match document.pointer_mut(parent) {
                    Some(Value::Object(map)) => {
                        map.remove(&key.replace("~1", "/").replace("~0", "~"));
                    }
                    Some(Value::Array(items)) => {
                        items.remove(key.parse::<usize>().unwrap());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Damage to a JSON file: its bytes, or its structure.
#[derive(Debug, Clone)]
enum JsonDamage {
    Bytes(Vec<ByteEdit>),
    Structure(Vec<JsonEdit>),
}

fn json_damage() -> impl Strategy<Value = JsonDamage> {
    prop_oneof![
        prop::collection::vec(byte_edit(), 1..4).prop_map(JsonDamage::Bytes),
        prop::collection::vec(json_edit(), 1..4).prop_map(JsonDamage::Structure),
    ]
}

fn damage_json(path: &Path, damage: &JsonDamage) {
    let mut bytes = std::fs::read(path).unwrap();
    match damage {
        JsonDamage::Bytes(edits) => apply_bytes(&mut bytes, edits, None),
        JsonDamage::Structure(edits) => {
            let mut document: Value = serde_json::from_slice(&bytes).unwrap();
            apply_json(&mut document, edits);
            bytes = serde_json::to_vec_pretty(&document).unwrap();
        }
    }
    std::fs::write(path, bytes).unwrap();
}

// ---- Properties --------------------------------------------------------------------------------

fn tiny_model() -> PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

/// `train-lora` for one step on the caches in `data`, writing into `out/lora`.
fn train_args(sandbox: &Sandbox, model: &Path, extra: &[OsString]) -> Vec<OsString> {
    let mut args = os(&[
        &"--pretrained_model_name_or_path",
        &model,
        &"--in_json",
        &sandbox.data().join("meta_lat.json"),
        &"--train_data_dir",
        &sandbox.data(),
        &"--output_dir",
        &sandbox.out().join("lora"),
        &"--max_train_steps",
        &"1",
        &"--network_dim",
        &"2",
        &"--quiet",
    ]);
    args.extend(extra.iter().cloned());
    args
}

#[test]
fn damaged_metadata() {
    let undamaged = JsonDamage::Structure(Vec::new());
    check("damaged_metadata", json_damage(), undamaged, |damage| {
        let sandbox = Sandbox::new();
        make_training_caches(&sandbox.data());
        for stem in ["one", "two"] {
            image::RgbImage::from_pixel(128, 128, image::Rgb([90, 120, 30]))
                .save(sandbox.data().join(format!("{stem}.png")))
                .unwrap();
        }
        let meta = sandbox.data().join("meta_lat.json");
        damage_json(&meta, &damage);
        // A failure names the file or, for one bad entry, the entry.
        let mut names = vec![name_of(&meta)];
        if let Ok(Value::Object(entries)) = serde_json::from_slice(&std::fs::read(&meta).unwrap()) {
            names.extend(entries.keys().flat_map(|k| [k.clone(), format!("{k:?}")]));
        }
        let clean = os(&[&meta, &sandbox.out().join("clean.json")]);
        sandbox.run("clean-captions", &clean, &names)?;
        // Text caches go beside the images: keys must not lead them anywhere else.
        let encode = os(&[&meta, &tiny_model(), &"--train_data_dir", &sandbox.data()]);
        let te_outputs = [
            "_te_outputs.npz",
            "_te_cache.json",
            "_te_cache.json.manifest.json",
            "_te_cache_empty.npz",
        ];
        sandbox.run_writing("cache-text-encoder", &encode, &names, &te_outputs)?;
        sandbox.run(
            "train-lora",
            &train_args(&sandbox, &tiny_model(), &[]),
            &names,
        )?;
        Ok(())
    });
}

/// Damage to a cache `.npz`: its bytes, or arrays rewritten with hostile content.
#[derive(Debug, Clone)]
enum CacheDamage {
    Bytes(Vec<ByteEdit>),
    /// The first array's values with one set to this (NaN, infinity, huge).
    Value(f32),
    /// The first array reshaped (same values, another shape).
    Shape(Vec<usize>),
    /// The first array stored as float16.
    Half,
}

fn cache_damage() -> impl Strategy<Value = CacheDamage> {
    prop_oneof![
        prop::collection::vec(byte_edit(), 1..4).prop_map(CacheDamage::Bytes),
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::MAX),
            Just(-1e30f32)
        ]
        .prop_map(CacheDamage::Value),
        prop::collection::vec(1usize..80, 1..4).prop_map(CacheDamage::Shape),
        Just(CacheDamage::Half),
    ]
}

fn damage_cache(path: &Path, damage: &CacheDamage) {
    use lorakit_pipeline::formats::npz::{NpzReader, NpzWriter};
    if let CacheDamage::Bytes(edits) = damage {
        let mut bytes = std::fs::read(path).unwrap();
        apply_bytes(&mut bytes, edits, None);
        std::fs::write(path, bytes).unwrap();
        return;
    }
    let mut reader = NpzReader::open(path).unwrap();
    let name = reader.keys()[0].clone();
    let (mut values, shape) = reader.read_f32(&name).unwrap();
    let mut npz = NpzWriter::new();
    match damage {
        CacheDamage::Value(value) => {
            let middle = values.len() / 2;
            values[middle] = *value;
            npz.add_f32(&name, values, &shape).unwrap();
        }
        CacheDamage::Shape(dims) => {
            let count: usize = dims.iter().product();
            values.resize(count, 0.5);
            npz.add_f32(&name, values, dims).unwrap();
        }
        CacheDamage::Half => {
            let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
            npz.add_f16(&name, halves, &shape).unwrap();
        }
        CacheDamage::Bytes(_) => unreachable!(),
    }
    npz.write(path).unwrap();
}

#[test]
fn damaged_caches() {
    let strategy = (cache_damage(), prop::bool::ANY);
    let undamaged = (CacheDamage::Bytes(Vec::new()), false);
    check(
        "damaged_caches",
        strategy,
        undamaged,
        |(damage, text_cache)| {
            let sandbox = Sandbox::new();
            make_training_caches(&sandbox.data());
            let cache = match text_cache {
                true => sandbox.data().join("two_te_outputs.npz"),
                false => sandbox.data().join("two_0512x0512_sd.npz"),
            };
            damage_cache(&cache, &damage);
            let names = vec![name_of(&cache)];
            sandbox.run(
                "train-lora",
                &train_args(&sandbox, &tiny_model(), &[]),
                &names,
            )?;
            Ok(())
        },
    );
}

#[test]
fn damaged_model_headers() {
    let strategy = prop::collection::vec(byte_edit(), 1..4);
    check("damaged_model_headers", strategy, Vec::new(), |edits| {
        let sandbox = Sandbox::new();
        make_training_caches(&sandbox.data());
        let mut bytes = std::fs::read(tiny_model()).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        apply_bytes(&mut bytes, &edits, Some(0..8 + header_len));
        let model = sandbox.data().join("model.safetensors");
        std::fs::write(&model, bytes).unwrap();
        let names = vec![name_of(&model)];
        sandbox.run("train-lora", &train_args(&sandbox, &model, &[]), &names)?;
        Ok(())
    });
}

/// Sidecar text: arbitrary bytes, or text built from troublesome pieces.
fn sidecar_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just("cat".to_string()),
        Just(", ".to_string()),
        Just("\r\n".to_string()),
        Just("\u{feff}".to_string()),
        Just("\u{0}".to_string()),
        Just("(((best quality:1.3)))".to_string()),
        Just("\\, ".to_string()),
        "\\PC{0,12}",
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat().into_bytes()),
    ]
}

#[test]
fn hostile_sidecars() {
    let strategy = (sidecar_bytes(), sidecar_bytes());
    let plain = (b"a photo of a cat".to_vec(), b"cat, sitting".to_vec());
    check("hostile_sidecars", strategy, plain, |(caption, tags)| {
        let sandbox = Sandbox::new();
        let data = sandbox.data();
        image::RgbImage::from_pixel(8, 8, image::Rgb([200, 100, 50]))
            .save(data.join("img.png"))
            .unwrap();
        std::fs::write(data.join("img.caption"), &caption).unwrap();
        std::fs::write(data.join("img.txt"), &tags).unwrap();
        let names = vec!["img.caption".to_string(), "img.txt".to_string()];
        let (meta, tagged, clean) = (
            sandbox.out().join("meta.json"),
            sandbox.out().join("meta_tags.json"),
            sandbox.out().join("meta_clean.json"),
        );
        sandbox.run("merge-captions", &os(&[&data, &meta]), &names)?;
        let merge_tags = os(&[&data, &tagged, &"--in_json", &meta]);
        if meta.is_file() {
            sandbox.run("merge-tags", &merge_tags, &names)?;
        }
        if tagged.is_file() {
            let run = sandbox.run("clean-captions", &os(&[&tagged, &clean]), &names)?;
            if run.code == Some(0) {
                let text = std::fs::read(&clean).unwrap();
                prop_assert!(serde_json::from_slice::<Value>(&text).is_ok(), "not JSON");
            }
        }
        sandbox.run("lint-dataset", &os(&[&data]), &names)?;
        Ok(())
    });
}

/// Values that are wrong for most numeric or path options.
fn hostile_argument() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("1e40".to_string()),
        Just("18446744073709551616".to_string()),
        Just(String::new()),
        Just("../escaped".to_string()),
        Just("0.5".to_string()),
        Just("3".to_string()),
    ]
}

/// `train-lora` options a user sets by hand, each given one hostile value.
const TRAIN_FLAGS: &[&str] = &[
    "--learning_rate",
    "--unet_lr",
    "--network_alpha",
    "--network_dim",
    "--train_batch_size",
    "--noise_offset",
    "--min_snr_gamma",
    "--seed",
    "--lr_warmup_steps",
    "--max_grad_norm",
    "--save_every_n_steps",
    "--validation_split",
    "--network_dropout",
    "--output_name",
    "--lr_scheduler_num_cycles",
    "--huber_c",
];

#[test]
fn hostile_train_arguments() {
    let flag = (any::<Index>(), hostile_argument());
    let strategy = prop::collection::vec(flag, 1..4);
    check("hostile_train_arguments", strategy, Vec::new(), |choices| {
        let sandbox = Sandbox::new();
        make_training_caches(&sandbox.data());
        let mut extra = Vec::new();
        let mut names = Vec::new();
        for (index, value) in &choices {
            let flag = TRAIN_FLAGS[index.index(TRAIN_FLAGS.len())];
            extra.push(OsString::from(format!("{flag}={value}")));
            names.push(flag.to_string());
        }
        sandbox.run(
            "train-lora",
            &train_args(&sandbox, &tiny_model(), &extra),
            &names,
        )?;
        Ok(())
    });
}

/// File stems a user's camera, browser or script may produce.
fn hostile_stem() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-rf".to_string()),
        Just("--help".to_string()),
        Just(" leading space".to_string()),
        Just("trailing dot.".to_string()),
        Just("new\nline".to_string()),
        Just("quote'\"".to_string()),
        Just("%s%n".to_string()),
        Just("x".repeat(240)),
        Just("é".repeat(120)),
        Just("ẞ\u{202e}gnp".to_string()),
        "[a-zA-Z0-9 ._()\\[\\]'-]{1,60}",
        "\\PC{1,20}",
    ]
    .prop_filter("a file name", |s| {
        !s.contains('/') && !s.contains('\0') && s != "." && s != ".."
    })
}

#[test]
fn hostile_file_names() {
    let strategy = (hostile_stem(), hostile_stem());
    let plain = ("one".to_string(), "two".to_string());
    check("hostile_file_names", strategy, plain, |(first, second)| {
        prop_assume!(first != second);
        let sandbox = Sandbox::new();
        let data = sandbox.data();
        for (i, stem) in [&first, &second].into_iter().enumerate() {
            image::RgbImage::from_pixel(64 + 16 * i as u32, 64, image::Rgb([40, 90, 200]))
                .save_with_format(data.join(format!("{stem}.png")), image::ImageFormat::Png)
                .unwrap();
            std::fs::write(data.join(format!("{stem}.caption")), "a blue square").unwrap();
        }
        let names = vec![first.clone(), second.clone()];
        let out = sandbox.out();
        let (meta, latents, te) = (
            out.join("meta.json"),
            out.join("meta_lat.json"),
            out.join("te"),
        );
        sandbox.run("lint-dataset", &os(&[&data]), &names)?;
        sandbox.run(
            "merge-captions",
            &os(&[&data, &meta, &"--full_path"]),
            &names,
        )?;
        let prepare = os(&[
            &data,
            &meta,
            &latents,
            &tiny_model(),
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
        ]);
        sandbox.run("prepare-latents", &prepare, &names)?;
        let encode = os(&[
            &latents,
            &tiny_model(),
            &"--cache_dir",
            &te,
            &"--train_data_dir",
            &data,
        ]);
        sandbox.run("cache-text-encoder", &encode, &names)?;
        // Every image whose text-cache name fits in a file name (255 bytes) gets its cache,
        // whatever happens to its siblings.
        let fitting = [&first, &second]
            .iter()
            .filter(|stem| stem.len() + "_te_outputs.npz".len() <= 255)
            .count();
        let written = std::fs::read_dir(&te)
            .map(|d| {
                d.flatten()
                    .filter(|e| name_of(&e.path()).ends_with("_te_outputs.npz"))
                    .count()
            })
            .unwrap_or(0);
        prop_assert_eq!(written, fitting, "text caches for {:?}", (&first, &second));
        Ok(())
    });
}
