//! The dataset view: a folder's images with their captions, lint-dataset's report (findings,
//! bucket histogram, tag frequencies), and caption edits written back atomically.

use std::path::{Path, PathBuf};

use clap::Parser;
use lorakit_pipeline::cli::lint_dataset::LintDatasetArgs;
use lorakit_pipeline::dataset::kohya::config::parse_folder_name;
use lorakit_pipeline::dataset::kohya::register::TagFrequency;
use lorakit_pipeline::dataset::{list_images, read_text, relative_name, sidecar_path};
use lorakit_pipeline::formats::metadata::resolve_image;
use lorakit_pipeline::infra::fsio;
use lorakit_pipeline::stages::lint_dataset::{lint, LintReport};
use lorakit_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the page asks to see.
#[derive(Debug, Clone, Deserialize)]
pub struct DatasetQuery {
    /// The image folder: DreamBooth `N_name` subfolders or images directly inside.
    pub dir: PathBuf,
    /// A metadata JSON describing the folder's images (its captions are shown).
    #[serde(default)]
    pub json: Option<PathBuf>,
    /// Caption file extension (with the dot).
    #[serde(default = "default_caption_extension")]
    pub caption_extension: String,
    /// Training resolution `W,H` or `SIZE`, for the bucket histogram.
    #[serde(default = "default_resolution")]
    pub resolution: String,
    /// Training batch size (buckets with fewer images are reported).
    #[serde(default = "default_batch")]
    pub train_batch_size: usize,
}

fn default_caption_extension() -> String {
    ".caption".into()
}

fn default_resolution() -> String {
    "512,512".into()
}

fn default_batch() -> usize {
    1
}

/// One image of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct ImageEntry {
    /// The image file.
    pub path: PathBuf,
    /// Its name relative to the dataset folder.
    pub name: String,
    /// The DreamBooth subset folder (`N_name`) it lies in, if any.
    pub subset: Option<String>,
    /// Repeats of that subset.
    pub repeats: Option<i64>,
    /// The caption shown: the metadata's, else the caption file's.
    pub caption: String,
    /// The caption file edits are written to.
    pub caption_file: PathBuf,
}

/// The whole dataset view.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetView {
    /// `dreambooth` (N_name subfolders), `metadata` (a metadata JSON) or `folder`.
    pub layout: &'static str,
    /// The images with their captions, sorted by path.
    pub images: Vec<ImageEntry>,
    /// lint-dataset's report of the folder (its tag frequencies count the tag files).
    pub lint: LintReport,
    /// The captions' tags per folder, as sd-scripts records them in `ss_tag_frequency`.
    pub caption_tags: Value,
}

/// The lint-dataset command line the view runs, parsed by the tool's own flags.
#[derive(Parser)]
#[command(rename_all = "snake_case")]
struct LintCommand {
    #[command(flatten)]
    lint: LintDatasetArgs,
}

/// Reads the folder (and metadata JSON) and lints it as `lint-dataset` would with the same
/// flags (`--recursive` for DreamBooth subfolders).
pub fn view(query: &DatasetQuery) -> Result<DatasetView> {
    let dreambooth = subsets(&query.dir)?;
    let layout = match (&query.json, dreambooth) {
        (Some(_), _) => "metadata",
        (None, true) => "dreambooth",
        (None, false) => "folder",
    };
    let mut argv: Vec<std::ffi::OsString> = vec!["lint-dataset".into(), query.dir.clone().into()];
    argv.extend(
        [
            "--caption_extension",
            &query.caption_extension,
            "--resolution",
            &query.resolution,
            "--train_batch_size",
            &query.train_batch_size.to_string(),
        ]
        .map(Into::into),
    );
    if layout == "dreambooth" {
        argv.push("--recursive".into());
    }
    if let Some(json) = &query.json {
        argv.push("--in_json".into());
        argv.push(json.clone().into());
    }
    let command =
        LintCommand::try_parse_from(argv).map_err(|e| Error::Usage(e.render().to_string()))?;
    let report = lint(&command.lint.options(true)?)?;
    let metadata = match &query.json {
        Some(path) => Some(read_metadata(path)?),
        None => None,
    };
    let images = list_images(&query.dir, layout == "dreambooth")?.images;
    let mut entries = Vec::new();
    for image in images {
        let caption_file = sidecar_path(&image, &query.caption_extension);
        let from_metadata = metadata
            .as_ref()
            .and_then(|m| caption_in(m, &image, &query.dir));
        let caption = match from_metadata {
            Some(caption) => caption,
            None if caption_file.is_file() => read_text(&caption_file)?,
            None => String::new(),
        };
        let subset = (layout == "dreambooth")
            .then(|| image.parent().and_then(Path::file_name))
            .flatten()
            .map(|name| name.to_string_lossy().into_owned());
        let repeats = subset
            .as_deref()
            .and_then(parse_folder_name)
            .map(|(n, _)| n);
        entries.push(ImageEntry {
            name: relative_name(&query.dir, &image),
            path: image,
            subset,
            repeats,
            caption,
            caption_file,
        });
    }
    let mut caption_tags = TagFrequency::default();
    let folder_name = query.dir.file_name().unwrap_or_default().to_string_lossy();
    for entry in &entries {
        let folder = entry.subset.as_deref().unwrap_or(&folder_name);
        caption_tags.add(folder, &[entry.caption.as_str()]);
    }
    Ok(DatasetView {
        layout,
        images: entries,
        lint: report,
        caption_tags: caption_tags.to_json(),
    })
}

/// Whether `dir` holds DreamBooth subset folders (`N_name`).
fn subsets(dir: &Path) -> Result<bool> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(entries.flatten().any(|entry| {
        entry.path().is_dir() && parse_folder_name(&entry.file_name().to_string_lossy()).is_some()
    }))
}

fn read_metadata(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let bytes = fsio::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::bad_file(path, format!("is not a metadata JSON object: {e}")))
}

/// The metadata caption of `image` (keyed by stem or by path), tags appended as the
/// fine-tuning dataset does when both are present.
fn caption_in(
    metadata: &serde_json::Map<String, Value>,
    image: &Path,
    dir: &Path,
) -> Option<String> {
    let entry = metadata.iter().find_map(|(key, entry)| {
        let resolved = resolve_image(key, Some(dir))?;
        (resolved == image || resolved.file_stem() == image.file_stem()).then_some(entry)
    })?;
    let field = |name: &str| entry.get(name).and_then(Value::as_str).map(str::to_string);
    match (field("caption"), field("tags")) {
        (Some(caption), Some(tags)) => Some(format!("{caption}, {tags}")),
        (caption, tags) => caption.or(tags),
    }
}

/// Writes `text` as the caption file `path` (atomically: a reader sees the old or the new
/// caption, never a part). The file must be a caption file of an image beside it.
pub fn write_caption(path: &Path, text: &str, caption_extension: &str) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let is_caption = caption_extension.starts_with('.')
        && name.ends_with(caption_extension)
        && name.len() > caption_extension.len();
    if !is_caption {
        return Err(Error::Usage(format!(
            "{}: only caption files ({caption_extension}) are written",
            path.display()
        )));
    }
    let stem = &name[..name.len() - caption_extension.len()];
    let folder = path.parent().unwrap_or(Path::new("."));
    let has_image = list_images(folder, false)?.images.iter().any(|image| {
        image
            .file_stem()
            .is_some_and(|s| s.to_string_lossy() == stem)
    });
    if !has_image {
        return Err(Error::Usage(format!(
            "{}: no image named {stem}.* beside it; captions are written next to their image",
            path.display()
        )));
    }
    fsio::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caption_is_written_whole_and_only_beside_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
        image.save(dir.path().join("cat.png")).unwrap();
        let caption = dir.path().join("cat.caption");
        std::fs::write(&caption, "old").unwrap();
        write_caption(&caption, "a cat, sitting", ".caption").unwrap();
        assert_eq!(std::fs::read_to_string(&caption).unwrap(), "a cat, sitting");
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        for refused in ["dog.caption", "cat.png", "cat.txt"] {
            assert!(
                write_caption(&dir.path().join(refused), "x", ".caption").is_err(),
                "{refused}"
            );
        }
        assert_eq!(
            std::fs::read(dir.path().join("cat.png")).unwrap()[..4],
            [0x89, b'P', b'N', b'G']
        );
    }

    #[test]
    fn a_dreambooth_folder_is_listed_with_subsets_and_linted() {
        let dir = tempfile::tempdir().unwrap();
        let subset = dir.path().join("3_cat");
        std::fs::create_dir(&subset).unwrap();
        let image = image::RgbImage::from_pixel(64, 48, image::Rgb([1, 2, 3]));
        image.save(subset.join("a.png")).unwrap();
        std::fs::write(subset.join("a.caption"), "a cat").unwrap();
        let view = view(&DatasetQuery {
            dir: dir.path().to_path_buf(),
            json: None,
            caption_extension: ".caption".into(),
            resolution: "64,64".into(),
            train_batch_size: 1,
        })
        .unwrap();
        assert_eq!(view.layout, "dreambooth");
        assert_eq!(view.images.len(), 1);
        assert_eq!(view.images[0].name, "3_cat/a.png");
        assert_eq!(view.images[0].repeats, Some(3));
        assert_eq!(view.images[0].caption, "a cat");
        assert_eq!(view.lint.images, 1);
        assert_eq!(view.lint.bucket_occupancy.len(), 1);
        assert_eq!(
            view.caption_tags,
            serde_json::json!({"3_cat": {"a cat": 1}})
        );
    }
}
