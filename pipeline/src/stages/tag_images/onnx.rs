//! ONNX Runtime: locating the shared library the project installs, opening a tagger session on
//! the requested device and running batches.

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::Tensor;

use crate::{Error, Result};

/// File name of the ONNX Runtime shared library on this platform.
#[cfg(target_os = "windows")]
pub const LIBRARY_NAME: &str = "onnxruntime.dll";
/// File name of the ONNX Runtime shared library on this platform.
#[cfg(target_os = "macos")]
pub const LIBRARY_NAME: &str = "libonnxruntime.dylib";
/// File name of the ONNX Runtime shared library on this platform.
#[cfg(not(any(target_os = "windows", target_os = "macos")))]
pub const LIBRARY_NAME: &str = "libonnxruntime.so";

/// Project-local install folder written by `scripts/setup-onnxruntime.sh` (`make setup`).
pub const PROJECT_LIBRARY_DIR: &str = ".local/onnxruntime";

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// The CUDA execution provider (needs the `cuda` cargo feature and a GPU build of the
    /// runtime); never falls back to the CPU silently.
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device {other:?} (expected cpu or cuda)")),
        }
    }
}

/// Candidate library paths in resolution order. A library named explicitly is the only one
/// tried: `--ort-lib`, else `ORT_DYLIB_PATH`. Otherwise the project-local install (found by
/// walking up from the executable, else from the working directory, else in the repository it
/// was built from), then the folder of the executable.
pub fn library_candidates(explicit: Option<&Path>) -> Vec<(String, PathBuf)> {
    if let Some(path) = explicit {
        return vec![("--ort-lib".to_string(), path.to_path_buf())];
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return vec![("ORT_DYLIB_PATH".to_string(), PathBuf::from(path))];
    }
    let mut candidates = Vec::new();
    let executable = std::env::current_exe()
        .ok()
        .map(|exe| exe.canonicalize().unwrap_or(exe));
    // The repository holding the executable (walking up from it), else the one holding the
    // working directory, else the repository the binary was built from (for shared or
    // out-of-tree target folders).
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    let working = std::env::current_dir().ok();
    let local = executable
        .iter()
        .flat_map(|exe| exe.ancestors().skip(1))
        .chain(working.iter().flat_map(|dir| dir.ancestors()))
        .chain(built_from)
        .map(|folder| folder.join(PROJECT_LIBRARY_DIR).join(LIBRARY_NAME))
        .find(|path| path.exists());
    match local {
        Some(path) => candidates.push(("project-local install".to_string(), path)),
        None => candidates.push((
            "project-local install, not set up".to_string(),
            built_from
                .unwrap_or(Path::new("."))
                .join(PROJECT_LIBRARY_DIR)
                .join(LIBRARY_NAME),
        )),
    }
    if let Some(folder) = executable.as_deref().and_then(Path::parent) {
        candidates.push((
            "next to the executable".to_string(),
            folder.join(LIBRARY_NAME),
        ));
    }
    candidates
}

/// A loaded ONNX Runtime library and its process-wide environment.
pub struct Runtime {
    /// The shared library that was loaded.
    pub library: PathBuf,
    environment: ort::environment::Environment,
}

/// Loads the ONNX Runtime library once per process, trying every candidate in order.
/// The error lists each path tried with its failure and how to install the library.
pub fn load_runtime(explicit: Option<&Path>) -> Result<&'static Runtime> {
    static LOADED: std::sync::OnceLock<std::result::Result<Runtime, String>> =
        std::sync::OnceLock::new();
    let outcome = LOADED.get_or_init(|| {
        let mut tried = Vec::new();
        for (source, path) in library_candidates(explicit) {
            if !path.is_file() {
                tried.push(format!("  {} ({source}): not found", path.display()));
                continue;
            }
            match ort::init_from(&path) {
                Ok(builder) => match builder.with_name("lorakit").build() {
                    Ok(environment) => {
                        return Ok(Runtime {
                            library: path,
                            environment,
                        })
                    }
                    Err(e) => tried.push(format!("  {} ({source}): {e}", path.display())),
                },
                Err(e) => tried.push(format!("  {} ({source}): {e}", path.display())),
            }
        }
        if tried.is_empty() {
            tried.push("  (no candidate path could be formed)".to_string());
        }
        Err(format!(
            "ONNX Runtime library not found or not loadable. Tried:\n{}\nInstall it with \
             `make setup` (runs scripts/setup-onnxruntime.sh, which puts {LIBRARY_NAME} \
             1.31 into {PROJECT_LIBRARY_DIR}/ of the repository), or point --ort-lib / \
             ORT_DYLIB_PATH at an existing {LIBRARY_NAME} (version 1.31)",
            tried.join("\n")
        ))
    });
    outcome
        .as_ref()
        .map_err(|message| Error::Model(message.clone()))
}

/// Facts read from the model graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    /// Name of the first graph input.
    pub input_name: String,
    /// Fixed batch size of the graph, when its first dimension is a positive constant.
    pub fixed_batch: Option<usize>,
    /// Square input side (448 for SmilingWolf v2/v3 models).
    pub input_size: usize,
    /// Whether the input is NCHW (tag_mapping models) rather than NHWC.
    pub channels_first: bool,
}

/// An open tagger session.
pub struct Tagger {
    session: Session,
    /// Graph facts.
    pub shape: ModelShape,
    /// The execution provider that runs the graph (`CPUExecutionProvider`, ...).
    pub provider: &'static str,
}

impl Tagger {
    /// Opens `model` on `device`. `threads` = 0 lets ONNX Runtime choose.
    pub fn open(runtime: &Runtime, model: &Path, device: Device, threads: usize) -> Result<Self> {
        let failed = |e: &dyn std::fmt::Display| {
            Error::Model(format!(
                "{}: cannot create an ONNX Runtime session: {e}",
                model.display()
            ))
        };
        let mut builder = Session::builder(&runtime.environment).map_err(|e| failed(&e))?;
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| failed(&e))?;
        }
        let (builder, provider) = register_device(builder, device)?;
        let mut builder = builder;
        let session = builder.commit_from_file(model).map_err(|e| failed(&e))?;
        let shape = read_shape(model, &session)?;
        Ok(Tagger {
            session,
            shape,
            provider,
        })
    }

    /// Runs one batch of `count` images laid out as the graph expects; returns `count` rows of
    /// output 0.
    pub fn run(&mut self, input: Vec<f32>, count: usize) -> Result<Vec<Vec<f32>>> {
        let side = self.shape.input_size as i64;
        let dims = if self.shape.channels_first {
            [count as i64, 3, side, side]
        } else {
            [count as i64, side, side, 3]
        };
        let tensor = Tensor::from_array((dims, input))
            .map_err(|e| Error::Model(format!("cannot build the input tensor: {e}")))?;
        let outputs = self
            .session
            .run(ort::inputs![self.shape.input_name.as_str() => tensor])
            .map_err(|e| Error::Model(format!("inference failed: {e}")))?;
        let (shape, values) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::Model(format!("model output 0 is not a float tensor: {e}")))?;
        let rows = shape.first().copied().unwrap_or(0).max(0) as usize;
        if rows < count || values.is_empty() {
            return Err(Error::Model(format!(
                "model returned {rows} rows for a batch of {count}"
            )));
        }
        let width = values.len() / rows;
        Ok(values
            .chunks(width)
            .take(count)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

#[cfg(feature = "cuda")]
fn register_device(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
) -> Result<(ort::session::builder::SessionBuilder, &'static str)> {
    match device {
        Device::Cpu => Ok((builder, "CPUExecutionProvider")),
        Device::Cuda => {
            let cuda = ort::ep::CUDA::default().build().error_on_failure();
            let builder = builder.with_execution_providers([cuda]).map_err(|e| {
                Error::Model(format!(
                    "--device cuda: the CUDA execution provider cannot be used ({e}). The \
                     runtime from `make setup` is CPU-only: install the GPU build with \
                     `ORT_PACKAGE=onnxruntime-gpu scripts/setup-onnxruntime.sh` (needs CUDA 12 \
                     and cuDNN 9), or run with --device cpu"
                ))
            })?;
            Ok((builder, "CUDAExecutionProvider"))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn register_device(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
) -> Result<(ort::session::builder::SessionBuilder, &'static str)> {
    match device {
        Device::Cpu => Ok((builder, "CPUExecutionProvider")),
        Device::Cuda => Err(Error::Usage(
            "--device cuda: this build has no CUDA support; rebuild with \
             `cargo build --release -p tag-images --features cuda`, or run with --device cpu"
                .to_string(),
        )),
    }
}

fn read_shape(model: &Path, session: &Session) -> Result<ModelShape> {
    let bad = |message: String| Error::bad_file(model, message);
    let input = session
        .inputs()
        .first()
        .ok_or_else(|| bad("the model has no input".to_string()))?;
    let dims: Vec<i64> = input
        .dtype()
        .tensor_shape()
        .map(|shape| shape.iter().copied().collect())
        .ok_or_else(|| bad("the first model input is not a tensor".to_string()))?;
    if dims.len() != 4 {
        return Err(bad(format!(
            "expected a 4-D image input, found shape {dims:?}"
        )));
    }
    let channels_first = dims[1] == 3 && dims[3] != 3;
    let side = if channels_first { dims[2] } else { dims[1] };
    Ok(ModelShape {
        input_name: input.name().to_string(),
        fixed_batch: (dims[0] > 0).then_some(dims[0] as usize),
        input_size: if side > 0 { side as usize } else { 448 },
        channels_first,
    })
}
