//! The dataset: image discovery and sidecar text files (captions, tags), with the shard
//! assignment, sidecar ownership, aspect-ratio buckets and image decoding beside it.

pub mod bucket;
pub mod imaging;
pub mod kohya;
pub mod shard;
pub mod sidecar;

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Image file extensions sd-scripts recognises (compared case-insensitively here).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// True when `path` has one of the [`IMAGE_EXTENSIONS`], in any letter case.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| e.eq_ignore_ascii_case(known))
    })
}

/// What [`find_images`] found.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Image files, sorted by path, each `train_data_dir` joined with its relative path.
    pub images: Vec<PathBuf>,
    /// Entries named like images that are not regular files (directories, sockets, ...).
    pub not_files: Vec<PathBuf>,
}

/// The per-item error of an entry named like an image that is not a regular file (a folder,
/// socket, ...): every stage skips it.
pub fn not_a_file(path: &Path) -> Error {
    Error::bad_file(
        path,
        "named like an image but is not a regular file; skipped (rename it)",
    )
}

/// The error for a caption or tag path that holds a folder, pipe or device instead of a file.
pub fn not_a_regular_sidecar(path: &Path) -> Error {
    Error::bad_file(
        path,
        "is not a regular file (a folder, pipe or device); remove or rename it",
    )
}

/// Lists the images of `train_data_dir` (and its subfolders with `recursive`), sorted by path.
///
/// Paths start with `train_data_dir` exactly as given, so metadata keys made from them match
/// sd-scripts' `--full_path` keys. Hidden AppleDouble files (`._name.png`) are not images.
pub fn find_images(train_data_dir: &Path, recursive: bool) -> Result<Discovery> {
    if !train_data_dir.is_dir() {
        return Err(Error::bad_file(
            train_data_dir,
            "image folder not found (give the folder that holds the training images)",
        ));
    }
    let found = list_images(train_data_dir, recursive)?;
    if found.images.is_empty() {
        return Err(no_images(train_data_dir, recursive));
    }
    Ok(found)
}

/// As [`find_images`], but a folder without images gives an empty [`Discovery`] instead of an
/// error (sd-scripts skips such a DreamBooth subset with a warning).
pub fn list_images(train_data_dir: &Path, recursive: bool) -> Result<Discovery> {
    let mut walker = walkdir::WalkDir::new(train_data_dir)
        .min_depth(1)
        .follow_links(true);
    if !recursive {
        walker = walker.max_depth(1);
    }
    let mut found = Discovery::default();
    for entry in walker {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(train_data_dir).to_path_buf();
            Error::io(
                &path,
                e.into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("loop in symlinks")),
            )
        })?;
        let path = entry.path();
        if !has_image_extension(path) {
            continue;
        }
        if entry.file_name().as_encoded_bytes().starts_with(b"._") {
            continue;
        }
        let is_file = entry.file_type().is_file()
            || (entry.path_is_symlink() && std::fs::metadata(path).is_ok_and(|m| m.is_file()));
        if is_file {
            found.images.push(path.to_path_buf());
        } else {
            found.not_files.push(path.to_path_buf());
        }
    }
    found.images.sort();
    found.images.dedup();
    found.not_files.sort();
    Ok(found)
}

/// The error for a folder without images, with a hint when its subfolders hold some (a kohya
/// DreamBooth layout such as `img/10_sks dog/`).
pub fn no_images(train_data_dir: &Path, recursive: bool) -> Error {
    let with_images: Vec<String> = if recursive {
        Vec::new()
    } else {
        (std::fs::read_dir(train_data_dir)
            .into_iter()
            .flatten()
            .flatten())
        .filter(|entry| entry.path().is_dir())
        .filter(|entry| {
            walkdir::WalkDir::new(entry.path())
                .into_iter()
                .flatten()
                .any(|e| e.file_type().is_file() && has_image_extension(e.path()))
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
    };
    let message = match with_images.first() {
        None => format!(
            "no images found (looked for {} files{})",
            IMAGE_EXTENSIONS.join(" "),
            if recursive { ", in subfolders too" } else { "" }
        ),
        Some(first) => {
            let dreambooth = with_images.iter().any(|name| {
                name.split_once('_')
                    .is_some_and(|(n, rest)| !rest.is_empty() && n.parse::<u32>().is_ok())
            });
            format!(
                "no images directly in this folder, but {} subfolder(s) hold some (e.g. {first:?}); \
                 pass --recursive to include them{}",
                with_images.len(),
                if dreambooth {
                    " (the `<repeats>_<name>` folders of a kohya DreamBooth layout are read as \
                     plain subfolders: their repeat counts are not applied)"
                } else {
                    ""
                }
            )
        }
    };
    Error::bad_file(train_data_dir, message)
}

/// `image` relative to the dataset folder `root`, `/`-separated: the name under which indexes,
/// stores and manifests record an image, and its identity for `--shard`.
pub fn relative_name(root: &Path, image: &Path) -> String {
    let relative = image.strip_prefix(root).unwrap_or(image);
    relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// The sidecar path of `image`: its extension replaced by `extension` (e.g. `.caption`).
pub fn sidecar_path(image: &Path, extension: &str) -> PathBuf {
    let mut name = image.file_stem().unwrap_or_default().to_os_string();
    name.push(extension);
    image.with_file_name(name)
}

/// Reads a caption/tag file as text: UTF-8, a leading BOM removed, CRLF turned into LF.
///
/// A missing, unreadable or non-UTF-8 file is an error naming the file.
pub fn read_text(path: &Path) -> Result<String> {
    // Reading a FIFO would block until something writes to it: only regular files are read.
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !metadata.is_file() {
        return Err(not_a_regular_sidecar(path));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let text = std::str::from_utf8(body).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "not valid UTF-8 (invalid byte at offset {}); re-save the file as UTF-8",
                e.valid_up_to() + (bytes.len() - body.len())
            ),
        )
    })?;
    Ok(text.replace("\r\n", "\n"))
}

/// Reads a sidecar the way sd-scripts' merge tools do: the whole file, surrounding whitespace
/// stripped (line breaks inside are kept).
pub fn read_sidecar(path: &Path) -> Result<String> {
    Ok(read_text(path)?.trim().to_string())
}

/// The first line of a caption file, as sd-scripts' DreamBooth-style loader reads captions.
pub fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_images_in_any_case_sorted_and_skips_directories() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "b.PNG",
            "a.jpg",
            "c.Jpeg",
            "d.txt",
            "e.webp",
            "f.BmP",
            "._g.png",
            "雪 景.png",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("folder.png")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join("h.png"), b"x").unwrap();
        let flat = find_images(dir.path(), false).unwrap();
        let names: Vec<_> = flat
            .images
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["a.jpg", "b.PNG", "c.Jpeg", "e.webp", "f.BmP", "雪 景.png"]
        );
        assert_eq!(flat.not_files, vec![dir.path().join("folder.png")]);
        let deep = find_images(dir.path(), true).unwrap();
        assert!(deep.images.contains(&dir.path().join("sub").join("h.png")));
    }

    #[test]
    fn a_folder_without_images_is_an_error_that_points_at_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        let empty = find_images(dir.path(), false).unwrap_err().to_string();
        assert!(empty.contains("no images found"), "{empty}");
        let class = dir.path().join("10_sks dog");
        std::fs::create_dir(&class).unwrap();
        std::fs::write(class.join("a.png"), b"x").unwrap();
        let layered = find_images(dir.path(), false).unwrap_err().to_string();
        assert!(
            layered.contains("--recursive") && layered.contains("10_sks dog"),
            "{layered}"
        );
        assert!(layered.contains("DreamBooth"), "{layered}");
        assert_eq!(find_images(dir.path(), true).unwrap().images.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_file_names_are_found() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xff name.png");
        std::fs::write(dir.path().join(name), b"x").unwrap();
        let found = find_images(dir.path(), false).unwrap();
        assert_eq!(found.images, vec![dir.path().join(name)]);
        assert_eq!(
            sidecar_path(&found.images[0], ".txt"),
            dir.path()
                .join(std::ffi::OsStr::from_bytes(b"bad\xff name.txt"))
        );
    }

    #[test]
    fn sidecar_reading_strips_bom_and_crlf_and_rejects_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let bom = dir.path().join("bom.txt");
        std::fs::write(&bom, b"\xEF\xBB\xBFa cat\r\nsecond line\r\n").unwrap();
        assert_eq!(read_sidecar(&bom).unwrap(), "a cat\nsecond line");
        assert_eq!(first_line(&read_text(&bom).unwrap()), "a cat");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, b"caf\xe9").unwrap();
        let message = read_sidecar(&bad).unwrap_err().to_string();
        assert!(
            message.contains("bad.txt") && message.contains("UTF-8"),
            "{message}"
        );
        let missing = read_sidecar(&dir.path().join("missing.txt"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing.txt"), "{missing}");
    }
}
