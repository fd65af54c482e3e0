//! Opening Stable Diffusion weights in the layouts users have, memory-mapped.
//!
//! Supported: single-file original-LDM `.safetensors` checkpoints (SD1.x, SD2.x, SDXL),
//! diffusers model folders (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`), and standalone
//! component files (a VAE in LDM or diffusers naming, a diffusers UNet or text encoder). Models ask
//! for their tensors by diffusers/HF names; for LDM files each name goes through the model's own
//! `ldm_name` mapping and the component prefix is added here. Pickle files are refused with a
//! conversion recipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::kernels::with_f32_slice;

pub use crate::formats::model_family::ModelFamily;
use crate::{Error, Result};

/// One network inside a Stable Diffusion model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The denoising UNet.
    Unet,
    /// The autoencoder.
    Vae,
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    const ALL: [Component; 4] = [
        Component::Unet,
        Component::Vae,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    /// Human-readable name used in messages.
    pub fn label(self) -> &'static str {
        match self {
            Component::Unet => "UNet",
            Component::Vae => "VAE",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder",
        }
    }

    /// The diffusers sub-folder holding this component.
    pub fn diffusers_folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How tensor names are spelled in a part's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Naming {
    /// Original LDM / SAI names: requested names go through the model's `ldm_name` mapping.
    Ldm,
    /// Diffusers / Hugging Face names: requested names are used as they are.
    Diffusers,
}

/// Where one component's tensors live.
struct Part {
    files: Vec<PathBuf>,
    tensors: Arc<MmapedSafetensors>,
    prefix: String,
    naming: Naming,
}

impl Part {
    /// The file holding the stored tensor `name`: the part's only file, else the one whose
    /// header lists it (looked up only for messages).
    fn file_of(&self, name: &str) -> &Path {
        if let [file] = self.files.as_slice() {
            return file;
        }
        self.files
            .iter()
            .find(|file| {
                // SAFETY: mapped read-only, like every checkpoint file (see `mmap_files`).
                unsafe { MmapedSafetensors::new(file) }.is_ok_and(|m| m.get(name).is_ok())
            })
            .map_or(self.files[0].as_path(), PathBuf::as_path)
    }
}

/// Stable Diffusion weights opened for reading.
pub struct Checkpoint {
    path: PathBuf,
    family: ModelFamily,
    parts: BTreeMap<Component, Part>,
    diffusers_root: Option<PathBuf>,
    hashes: std::sync::Mutex<BTreeMap<String, String>>,
    all_hash: OnceLock<String>,
}

/// Single-file LDM prefixes that identify a full checkpoint.
const LDM_ROOT_PREFIXES: [&str; 4] = [
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
];

impl Checkpoint {
    /// Opens a single-file checkpoint, a standalone component file, or a diffusers folder.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Self::open_folder(path);
        }
        let tensors = Arc::new(mmap_files(path, &[path.to_path_buf()])?);
        let names: Vec<String> = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        let files = vec![path.to_path_buf()];
        let mut parts = BTreeMap::new();
        if names
            .iter()
            .any(|n| LDM_ROOT_PREFIXES.iter().any(|p| n.starts_with(p)))
        {
            let family = ldm_family(&tensors, &names);
            for component in Component::ALL {
                let Some(prefix) = ldm_prefix(family, component) else {
                    continue;
                };
                if names.iter().any(|n| n.starts_with(prefix)) {
                    parts.insert(
                        component,
                        Part {
                            files: files.clone(),
                            tensors: tensors.clone(),
                            prefix: prefix.to_string(),
                            naming: Naming::Ldm,
                        },
                    );
                }
            }
            return Ok(Self::new(path, family, parts, None));
        }
        Self::single_component(path, files, tensors, &names)
    }

    fn new(
        path: &Path,
        family: ModelFamily,
        parts: BTreeMap<Component, Part>,
        diffusers_root: Option<PathBuf>,
    ) -> Checkpoint {
        Checkpoint {
            path: path.to_path_buf(),
            family,
            parts,
            diffusers_root,
            hashes: Default::default(),
            all_hash: OnceLock::new(),
        }
    }

    fn open_folder(dir: &Path) -> Result<Checkpoint> {
        let mut parts = BTreeMap::new();
        for component in Component::ALL {
            let sub = dir.join(component.diffusers_folder());
            let files = safetensors_in(&sub)?;
            if files.is_empty() {
                continue;
            }
            let tensors = Arc::new(mmap_files(&sub, &files)?);
            parts.insert(
                component,
                Part {
                    files,
                    tensors,
                    prefix: String::new(),
                    naming: Naming::Diffusers,
                },
            );
        }
        if parts.is_empty() {
            // A folder holding one component directly (e.g. a downloaded diffusers VAE).
            let files = safetensors_in(dir)?;
            if files.is_empty() {
                return Err(Error::bad_file(
                    dir,
                    "no .safetensors weights found: expected a diffusers model folder (unet/, vae/, \
                     text_encoder/ sub-folders) or a folder with one component's weights",
                ));
            }
            let tensors = Arc::new(mmap_files(dir, &files)?);
            let names: Vec<String> = tensors.tensors().into_iter().map(|(n, _)| n).collect();
            return Self::single_component(dir, files, tensors, &names);
        }
        let family = if parts.contains_key(&Component::TextEncoder2) {
            ModelFamily::Sdxl
        } else if let Some(unet) = parts.get(&Component::Unet) {
            diffusers_unet_family(&unet.tensors)
        } else {
            ModelFamily::Sd1
        };
        Ok(Self::new(dir, family, parts, Some(dir.to_path_buf())))
    }

    /// A checkpoint holding one component's weights (a standalone file or folder), recognised
    /// from its tensor names.
    fn single_component(
        path: &Path,
        files: Vec<PathBuf>,
        tensors: Arc<MmapedSafetensors>,
        names: &[String],
    ) -> Result<Checkpoint> {
        let (component, naming) = classify_component(path, names)?;
        let family = match component {
            Component::Unet => diffusers_unet_family(&tensors),
            _ => ModelFamily::Sd1,
        };
        let part = Part {
            files,
            tensors,
            prefix: String::new(),
            naming,
        };
        Ok(Self::new(
            path,
            family,
            BTreeMap::from([(component, part)]),
            None,
        ))
    }

    /// The file or folder this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model family, detected from tensor names and shapes (a file holding only a VAE
    /// reports [`ModelFamily::Sd1`]: SD1/SD2/SDXL VAEs share one architecture).
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Whether the checkpoint holds weights for `component`.
    pub fn has(&self, component: Component) -> bool {
        self.parts.contains_key(&component)
    }

    /// For diffusers folders, the tokenizer folder matching a text encoder (`tokenizer/`,
    /// `tokenizer_2/`) if it exists.
    pub fn tokenizer_dir(&self, component: Component) -> Option<PathBuf> {
        let folder = match component {
            Component::TextEncoder => "tokenizer",
            Component::TextEncoder2 => "tokenizer_2",
            _ => return None,
        };
        let dir = self.diffusers_root.as_ref()?.join(folder);
        dir.is_dir().then_some(dir)
    }

    fn part(&self, component: Component) -> Result<&Part> {
        self.parts.get(&component).ok_or_else(|| {
            Error::bad_file(
                &self.path,
                format!(
                    "holds no {} weights (is it the right file? pass a full checkpoint or the \
                     component's own file)",
                    component.label()
                ),
            )
        })
    }

    /// Names of `component`'s tensors as stored, without the component prefix.
    pub fn tensor_names(&self, component: Component) -> Result<Vec<String>> {
        let part = self.part(component)?;
        let mut names: Vec<String> = part
            .tensors
            .tensors()
            .into_iter()
            .filter_map(|(n, _)| n.strip_prefix(&part.prefix).map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether tensors of `component` use the original LDM names (else diffusers/HF names).
    pub fn uses_ldm_names(&self, component: Component) -> Result<bool> {
        Ok(self.part(component)?.naming == Naming::Ldm)
    }

    /// Raw access to one stored tensor of `component` by its on-disk name without the component
    /// prefix (for tensors that need reshaping or splitting before use).
    pub fn tensor(&self, component: Component, name: &str) -> Result<Tensor> {
        let part = self.part(component)?;
        let stored = format!("{}{name}", part.prefix);
        self.load(component, part, &stored, name, &Device::Cpu)
    }

    /// Loads the stored tensor `stored` of `component` (asked for as `requested`); a tensor that
    /// is missing, not stored as floats, or unreadable is refused naming the file and tensor.
    fn load(
        &self,
        component: Component,
        part: &Part,
        stored: &str,
        requested: &str,
        device: &Device,
    ) -> Result<Tensor> {
        let label = component.label();
        let view = part.tensors.get(stored).map_err(|_| {
            Error::bad_file(
                &self.path,
                format!(
                    "{label} tensor `{stored}` (for `{requested}`) is missing: the checkpoint is \
                     incomplete or of another architecture"
                ),
            )
        })?;
        let dtype = view.dtype();
        if !matches!(
            dtype,
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
        ) {
            return Err(Error::bad_file(
                part.file_of(stored),
                format!(
                    "{label} tensor `{stored}` has dtype {dtype:?}; expected F32/F16/BF16 \
                     (a quantised or converted checkpoint?): use the model's float weights"
                ),
            ));
        }
        load_and_release(&part.tensors, stored, device).map_err(|e| {
            Error::bad_file(
                part.file_of(stored),
                format!("{label} tensor `{stored}` cannot be read ({e})"),
            )
        })
    }

    /// A candle `VarBuilder` for `component` answering diffusers/HF names.
    ///
    /// For LDM files each requested name is translated by `ldm_name` and prefixed with the
    /// component prefix. A stored `[C, C, 1, 1]` weight is served as `[C, C]` when the model asks
    /// for a linear weight, and vice versa (LDM VAE attention, SD2 projections).
    pub fn var_builder<'a>(
        &'a self,
        component: Component,
        dtype: DType,
        device: &Device,
        ldm_name: &'a (dyn Fn(&str) -> String + Send + Sync),
    ) -> Result<VarBuilder<'a>> {
        let part = self.part(component)?;
        let backend = PartBackend {
            checkpoint: self,
            component,
            part,
            ldm_name,
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }

    /// Hash of all tensor data (names, dtypes, shapes and bytes), memoised on disk by file
    /// path, size and modification time.
    pub fn weights_hash(&self) -> Result<String> {
        if let Some(hash) = self.all_hash.get() {
            return Ok(hash.clone());
        }
        let mut combined = crate::infra::hashing::KeyBuilder::new("weights", 1);
        for component in self.parts.keys() {
            combined.text(component.label(), &self.component_hash(*component)?);
        }
        Ok(self.all_hash.get_or_init(|| combined.finish()).clone())
    }

    /// Hash of one component's tensor data, memoised like [`Checkpoint::weights_hash`]. Cache keys
    /// use this so that, e.g., latents stay valid when only the UNet of a checkpoint changes.
    pub fn component_hash(&self, component: Component) -> Result<String> {
        let part = self.part(component)?;
        let mut memo = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hash) = memo.get(component.label()) {
            return Ok(hash.clone());
        }
        let hash =
            crate::infra::hashing::memoised(&part.files, &part.prefix, || Ok(hash_part(part)))?;
        memo.insert(component.label().to_string(), hash.clone());
        Ok(hash)
    }
}

/// Serves one component's tensors to candle-nn under diffusers names.
struct PartBackend<'a> {
    checkpoint: &'a Checkpoint,
    component: Component,
    part: &'a Part,
    ldm_name: &'a (dyn Fn(&str) -> String + Send + Sync),
}

impl PartBackend<'_> {
    fn stored_name(&self, name: &str) -> String {
        match self.part.naming {
            Naming::Ldm => format!("{}{}", self.part.prefix, (self.ldm_name)(name)),
            Naming::Diffusers => format!("{}{name}", self.part.prefix),
        }
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let stored = self.stored_name(name);
        self.checkpoint
            .load(self.component, self.part, &stored, name, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl SimpleBackend for PartBackend<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dev)?;
        let tensor = if tensor.shape() == &shape {
            tensor
        } else if is_pointwise_variant(tensor.dims(), shape.dims()) {
            tensor.reshape(shape)?
        } else {
            let stored = self.stored_name(name);
            return Err(candle_core::Error::Msg(format!(
                "{}: {} tensor `{stored}` has shape {:?}, the model expects {:?} (another \
                 architecture, or a damaged file?)",
                self.part.file_of(&stored).display(),
                self.component.label(),
                tensor.dims(),
                shape.dims()
            )));
        };
        to_dtype_in_parallel(tensor, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        to_dtype_in_parallel(self.load(name, dev)?, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.part.tensors.get(&self.stored_name(name)).is_ok()
    }
}

/// `tensor` in `dtype`; f32 CPU tensors narrowed to f16 or bf16 are converted in parallel chunks
/// (candle converts element by element on one thread, which made loading a full-size UNet in
/// half precision 12 s slower than in f32).
fn to_dtype_in_parallel(tensor: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if tensor.dtype() != DType::F32 || !tensor.device().is_cpu() {
        return tensor.to_dtype(dtype);
    }
    let (shape, device) = (tensor.shape(), tensor.device());
    match dtype {
        DType::F16 => with_f32_slice(&tensor, |v| narrowed::<half::f16>(v, shape, device))?,
        DType::BF16 => with_f32_slice(&tensor, |v| narrowed::<half::bf16>(v, shape, device))?,
        _ => tensor.to_dtype(dtype),
    }
}

/// A tensor of `values` rounded to a 16-bit float type, converted in parallel chunks.
fn narrowed<T>(values: &[f32], shape: &Shape, device: &Device) -> candle_core::Result<Tensor>
where
    T: candle_core::WithDType,
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![T::zero(); values.len()];
    out.par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(out, values)| out.convert_from_f32_slice(values));
    Tensor::from_vec(out, shape, device)
}

/// `[O, I]` versus `[O, I, 1, 1]`: a linear layer stored as a 1x1 convolution or back.
fn is_pointwise_variant(stored: &[usize], wanted: &[usize]) -> bool {
    let (short, long) = if stored.len() < wanted.len() {
        (stored, wanted)
    } else {
        (wanted, stored)
    };
    short.len() == 2 && long.len() == 4 && long[..2] == short[..] && long[2..] == [1, 1]
}

/// The LDM prefix of `component` for `family`.
pub fn ldm_prefix(family: ModelFamily, component: Component) -> Option<&'static str> {
    match (component, family) {
        (Component::Unet, _) => Some("model.diffusion_model."),
        (Component::Vae, _) => Some("first_stage_model."),
        (Component::TextEncoder, ModelFamily::Sd1) => Some("cond_stage_model.transformer."),
        (Component::TextEncoder, ModelFamily::Sd2) => Some("cond_stage_model.model."),
        (Component::TextEncoder, ModelFamily::Sdxl) => Some("conditioner.embedders.0.transformer."),
        (Component::TextEncoder2, ModelFamily::Sdxl) => Some("conditioner.embedders.1.model."),
        (Component::TextEncoder2, _) => None,
    }
}

/// Family of a single-file LDM checkpoint from its key layout, then from UNet shapes.
fn ldm_family(tensors: &MmapedSafetensors, names: &[String]) -> ModelFamily {
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if has("conditioner.embedders.") || has("model.diffusion_model.label_emb.") {
        return ModelFamily::Sdxl;
    }
    if has("cond_stage_model.model.") {
        return ModelFamily::Sd2;
    }
    if has("cond_stage_model.transformer.") {
        return ModelFamily::Sd1;
    }
    // No text encoder: SD2 UNets store their transformer projections as linear weights.
    match tensors.get("model.diffusion_model.input_blocks.1.1.proj_in.weight") {
        Ok(view) if view.shape().len() == 2 => ModelFamily::Sd2,
        _ => ModelFamily::Sd1,
    }
}

/// Family of a diffusers UNet from its tensors.
fn diffusers_unet_family(tensors: &MmapedSafetensors) -> ModelFamily {
    if tensors.get("add_embedding.linear_1.weight").is_ok() {
        return ModelFamily::Sdxl;
    }
    match tensors.get("down_blocks.0.attentions.0.proj_in.weight") {
        Ok(view) if view.shape().len() == 2 => ModelFamily::Sd2,
        _ => ModelFamily::Sd1,
    }
}

/// Which component a file without LDM prefixes holds, and its naming.
fn classify_component(path: &Path, names: &[String]) -> Result<(Component, Naming)> {
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if has("encoder.down.") || has("encoder.mid.attn_1.") {
        Ok((Component::Vae, Naming::Ldm))
    } else if has("encoder.down_blocks.") {
        Ok((Component::Vae, Naming::Diffusers))
    } else if has("down_blocks.") && has("time_embedding.") {
        Ok((Component::Unet, Naming::Diffusers))
    } else if has("text_model.") {
        Ok((Component::TextEncoder, Naming::Diffusers))
    } else {
        let mut sample: Vec<&str> = names.iter().map(String::as_str).take(3).collect();
        sample.sort();
        Err(Error::bad_file(
            path,
            format!(
                "is not a Stable Diffusion checkpoint, VAE, UNet or text encoder (first tensors: \
                 {})",
                if sample.is_empty() {
                    "none".to_string()
                } else {
                    sample.join(", ")
                }
            ),
        ))
    }
}

/// `.safetensors` files of a folder, sorted; variant files (`*.fp16.safetensors`) only when
/// there is nothing else.
fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let is_variant = |p: &PathBuf| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        name.contains(".fp16.") || name.contains(".bf16.")
    };
    if files.iter().any(|p| !is_variant(p)) {
        files.retain(|p| !is_variant(p));
    }
    Ok(files)
}

/// Loads one stored tensor (a copy in memory), then lets go of the file pages it was read from.
pub(crate) fn load_and_release(
    tensors: &MmapedSafetensors,
    name: &str,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let tensor = tensors.load(name, device)?;
    release_pages(tensors.get(name)?.data());
    Ok(tensor)
}

/// Tells the kernel that the mapped file pages under `data` are not needed any more, so they stop
/// counting towards the process's memory: without this, a loaded 3.4 GB UNet would occupy both
/// its in-memory copy and 3.4 GB of mapped file pages. The mapping is read-only, so the pages
/// are simply read from the file again if touched later. No effect outside Unix.
fn release_pages(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let start = data.as_ptr() as usize;
        let aligned = start - start % page;
        let length = data.len() + (start - aligned);
        // SAFETY: the range lies in the read-only file mapping that holds `data` (rounded down to
        // its page); MADV_DONTNEED on a clean file-backed mapping only drops cached pages, whose
        // content the kernel reads back from the unchanged file on the next access.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, length, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(unix))]
    let _ = data;
}

/// Memory-maps safetensors `files`; pickle and other formats are refused with advice.
fn mmap_files(shown: &Path, files: &[PathBuf]) -> Result<MmapedSafetensors> {
    for file in files {
        refuse_pickle(file)?;
    }
    // SAFETY: the files are mapped read-only; lorakit never writes a checkpoint while reading it.
    let mapped = unsafe { MmapedSafetensors::multi(files) };
    mapped.map_err(|e| {
        Error::bad_file(
            shown,
            format!("is not a readable .safetensors file ({e}); pass a .safetensors checkpoint"),
        )
    })
}

/// Refuses PyTorch pickle files (`.ckpt`, `.pt`, `.pth`, `.bin`), recognised by content.
fn refuse_pickle(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let read = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    let zip = read == 4 && magic == *b"PK\x03\x04";
    let pickle = read >= 2 && magic[0] == 0x80 && (2..=5).contains(&magic[1]);
    if zip || pickle {
        return Err(Error::bad_file(
            path,
            format!(
                "is a PyTorch pickle checkpoint; lorakit reads only .safetensors (pickle files can \
                 run code when loaded). Convert it once with: python -c \"import torch, \
                 safetensors.torch as st; sd = torch.load('{0}', map_location='cpu', \
                 weights_only=True); sd = sd.get('state_dict', sd); st.save_file({{k: \
                 v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, \
                 '{0}.safetensors')\"",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Hash of a part's tensors (sorted by name; name, dtype, shape and bytes of each).
fn hash_part(part: &Part) -> String {
    let mut tensors: Vec<_> = part
        .tensors
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.starts_with(&part.prefix))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = blake3::Hasher::new();
    for (name, view) in tensors {
        let header = format!("{name}|{:?}|{:?}|", view.dtype(), view.shape());
        hasher.update(&(header.len() as u64).to_le_bytes());
        hasher.update(header.as_bytes());
        hasher.update(&(view.data().len() as u64).to_le_bytes());
        hasher.update(view.data());
        release_pages(view.data());
    }
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parallel_narrowing_rounds_as_candle_does() {
        // More than one chunk, with values that round differently in f16 and bf16.
        let tensor = Tensor::randn(0f32, 3.0, (3, 50_000), &Device::Cpu).unwrap();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let ours = to_dtype_in_parallel(tensor.clone(), dtype).unwrap();
            let candle = tensor.to_dtype(dtype).unwrap();
            assert_eq!(ours.dtype(), dtype);
            assert_eq!(ours.dims(), &[3, 50_000]);
            let (ours, candle) = (
                ours.to_dtype(DType::F32).unwrap(),
                candle.to_dtype(DType::F32),
            );
            let same = ours.eq(&candle.unwrap()).unwrap().min_all().unwrap();
            assert_eq!(same.to_scalar::<u8>().unwrap(), 1, "{dtype:?}");
        }
    }

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd15-tiny/model.safetensors")
    }

    /// Writes a safetensors file with tiny zero tensors of the given names and shapes.
    fn synthetic(dir: &Path, name: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, s)| {
                let t = Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap();
                (n.to_string(), t)
            })
            .collect();
        let path = dir.join(name);
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn fixture_is_sd1_with_all_parts() {
        let checkpoint = Checkpoint::open(&fixture()).unwrap();
        assert_eq!(checkpoint.family(), ModelFamily::Sd1);
        for component in [Component::Unet, Component::Vae, Component::TextEncoder] {
            assert!(checkpoint.has(component), "{component:?}");
        }
        assert!(!checkpoint.has(Component::TextEncoder2));
        let names = checkpoint.tensor_names(Component::Vae).unwrap();
        assert_eq!(names.len(), 248);
        assert!(names.contains(&"encoder.mid.attn_1.q.weight".to_string()));
    }

    #[test]
    fn var_builder_maps_names_and_reshapes_pointwise_weights() {
        let checkpoint = Checkpoint::open(&fixture()).unwrap();
        let map = |name: &str| name.replace("to_q", "mid.attn_1.q");
        let vb = checkpoint
            .var_builder(Component::Vae, DType::F32, &Device::Cpu, &map)
            .unwrap();
        let linear = vb.get((128, 128), "encoder.to_q.weight").unwrap();
        assert_eq!(linear.dims(), &[128, 128]);
        let raw = checkpoint
            .tensor(Component::Vae, "encoder.mid.attn_1.q.weight")
            .unwrap();
        assert_eq!(raw.dims(), &[128, 128, 1, 1]);
        let message = vb.get((3, 3), "encoder.nothing").unwrap_err().to_string();
        assert!(
            message.contains("first_stage_model.encoder.nothing"),
            "{message}"
        );
        let shape = vb
            .get((64, 128), "encoder.to_q.weight")
            .unwrap_err()
            .to_string();
        assert!(shape.contains("expects"), "{shape}");
    }

    #[test]
    fn detects_sd2_and_sdxl_layouts_from_keys_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let sd2 = synthetic(
            dir.path(),
            "a.safetensors",
            &[
                (
                    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                    &[4, 4],
                ),
                ("first_stage_model.encoder.conv_in.weight", &[2, 3, 3, 3]),
                ("cond_stage_model.model.ln_final.weight", &[4]),
            ],
        );
        let checkpoint = Checkpoint::open(&sd2).unwrap();
        assert_eq!(checkpoint.family(), ModelFamily::Sd2);
        assert_eq!(
            checkpoint.tensor_names(Component::TextEncoder).unwrap(),
            vec!["ln_final.weight"]
        );

        let unet_only_sd2 = synthetic(
            dir.path(),
            "b.safetensors",
            &[(
                "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                &[4, 4],
            )],
        );
        assert_eq!(
            Checkpoint::open(&unet_only_sd2).unwrap().family(),
            ModelFamily::Sd2
        );
        let unet_only_sd1 = synthetic(
            dir.path(),
            "c.safetensors",
            &[(
                "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                &[4, 4, 1, 1],
            )],
        );
        assert_eq!(
            Checkpoint::open(&unet_only_sd1).unwrap().family(),
            ModelFamily::Sd1
        );

        let sdxl = synthetic(
            dir.path(),
            "d.safetensors",
            &[
                ("model.diffusion_model.label_emb.0.0.weight", &[4, 4]),
                (
                    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                    &[4],
                ),
                ("conditioner.embedders.1.model.ln_final.weight", &[4]),
                ("first_stage_model.encoder.conv_in.weight", &[2, 3, 3, 3]),
            ],
        );
        let checkpoint = Checkpoint::open(&sdxl).unwrap();
        assert_eq!(checkpoint.family(), ModelFamily::Sdxl);
        assert!(checkpoint.has(Component::TextEncoder2));
        assert_eq!(checkpoint.family().latent_suffix(), "sdxl");
    }

    #[test]
    fn standalone_vae_files_and_diffusers_folders() {
        let dir = tempfile::tempdir().unwrap();
        let ldm_vae = synthetic(
            dir.path(),
            "vae.safetensors",
            &[("encoder.down.0.block.0.conv1.weight", &[2, 2, 3, 3])],
        );
        let checkpoint = Checkpoint::open(&ldm_vae).unwrap();
        assert!(checkpoint.uses_ldm_names(Component::Vae).unwrap());
        assert!(!checkpoint.has(Component::Unet));

        let root = dir.path().join("model");
        for (folder, file, key) in [
            (
                "vae",
                "diffusion_pytorch_model.safetensors",
                "encoder.down_blocks.0.resnets.0.conv1.weight",
            ),
            (
                "unet",
                "diffusion_pytorch_model.safetensors",
                "add_embedding.linear_1.weight",
            ),
            (
                "text_encoder_2",
                "model.safetensors",
                "text_model.final_layer_norm.weight",
            ),
        ] {
            std::fs::create_dir_all(root.join(folder)).unwrap();
            synthetic(&root.join(folder), file, &[(key, &[2, 2])]);
        }
        let checkpoint = Checkpoint::open(&root).unwrap();
        assert_eq!(checkpoint.family(), ModelFamily::Sdxl);
        assert!(!checkpoint.uses_ldm_names(Component::Vae).unwrap());
        let missing = checkpoint.tensor(Component::TextEncoder, "x").unwrap_err();
        assert!(
            missing.to_string().contains("holds no text encoder"),
            "{missing}"
        );
    }

    #[test]
    fn integer_tensors_are_named_with_their_dtype_not_called_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quantised.safetensors");
        let data = [1u8; 8];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I8, vec![2, 4], &data)
            .unwrap();
        let bytes =
            safetensors::serialize([("model.diffusion_model.conv_in.weight", view)], None).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let checkpoint = Checkpoint::open(&path).unwrap();
        let message = checkpoint
            .tensor(Component::Unet, "conv_in.weight")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("quantised.safetensors")
                && message.contains("`model.diffusion_model.conv_in.weight` has dtype I8")
                && message.contains("expected F32/F16/BF16")
                && !message.contains("missing"),
            "{message}"
        );
    }

    #[test]
    fn refuses_pickle_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("model.ckpt");
        std::fs::write(&ckpt, b"PK\x03\x04rest-of-a-torch-zip").unwrap();
        let message = Checkpoint::open(&ckpt).err().unwrap().to_string();
        assert!(
            message.contains("pickle") && message.contains("save_file"),
            "{message}"
        );
        let jpeg = dir.path().join("photo.safetensors");
        std::fs::write(&jpeg, b"\xff\xd8\xff\xe0 not a model").unwrap();
        let message = Checkpoint::open(&jpeg).err().unwrap().to_string();
        assert!(message.contains("not a readable .safetensors"), "{message}");
    }

    #[test]
    fn weights_hash_is_memoised_and_tracks_content() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("LORAKIT_CACHE_DIR", dir.path().join("cache"));
        let a = synthetic(dir.path(), "a.safetensors", &[("encoder.down.0.x", &[2])]);
        let b = synthetic(dir.path(), "b.safetensors", &[("encoder.down.0.x", &[3])]);
        let hash_a = Checkpoint::open(&a).unwrap().weights_hash().unwrap();
        let hash_b = Checkpoint::open(&b).unwrap().weights_hash().unwrap();
        assert_ne!(hash_a, hash_b);
        assert_eq!(
            Checkpoint::open(&a).unwrap().weights_hash().unwrap(),
            hash_a
        );
        let memo = std::fs::read_to_string(dir.path().join("cache/weights-hashes.json")).unwrap();
        assert_eq!(memo.matches(':').count(), 2, "{memo}");
    }
}
