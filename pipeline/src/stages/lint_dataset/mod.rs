//! `lint-dataset`: checks a dataset folder (and optionally its metadata JSON and cache files)
//! before any expensive stage runs, and reports per-file findings with a severity.
//!
//! By default only file headers are read, so a 10,000-image folder takes seconds; `--decode`
//! also decodes every image (catching damage inside the pixel data) and finds near-duplicates.

mod findings;
mod header;
mod similar;
mod stale;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use findings::{
    BucketCount, Code, Counts, Finding, LintReport, Severity, SkippedCheck, TagCount,
};
pub use header::{read_header, ImageHeader, StoredColor};
pub use similar::{dhash, near_pairs};
pub use stale::CacheSettings;

use crate::dataset::bucket::{BucketManager, BucketSettings};
use crate::dataset::imaging::{DecodeOptions, LoadedImage};
use crate::dataset::sidecar::WrittenSidecars;
use crate::dataset::{has_image_extension, relative_name, sidecar_path};
use crate::formats::bookkeeping::LORAKIT_DIR;
use crate::formats::latent_cache::{parse_cache_name, recorded_source, CacheName, KEYED_DIR};
use crate::formats::manifest::Manifest;
use crate::formats::metadata::{image_key, resolve_image};
use crate::formats::schema::LINT_REPORT_V1;
use crate::infra::report::{Progress, Summary};
use crate::stages::caption_images::caption_index;
use crate::stages::tag_images::default_store;
use crate::text::tokenize::{ClipTokenizer, MaxTokenLength, Padding};
use crate::{infra::fsio, infra::hashing, Error, Result};

/// What to check and how to report it.
#[derive(Debug, Clone)]
pub struct LintOptions {
    /// The folder of training images.
    pub train_data_dir: PathBuf,
    /// Also check subfolders.
    pub recursive: bool,
    /// Metadata JSON to check against the folder.
    pub in_json: Option<PathBuf>,
    /// Extension of caption files (with the dot).
    pub caption_extension: String,
    /// Extension of tag files (with the dot).
    pub tag_extension: String,
    /// Decode every image fully (slower; catches damaged pixel data, finds near-duplicates).
    pub decode: bool,
    /// The stages' decode options: decompression-bomb limits and EXIF handling.
    pub image: DecodeOptions,
    /// Largest perceptual-hash distance (bits of 64) reported as a near-duplicate.
    pub near_duplicate_distance: u32,
    /// Caption/tag files larger than this many bytes are reported.
    pub max_caption_bytes: u64,
    /// Tags shown in the text report.
    pub top_tags: usize,
    /// Bucket settings to check image sizes and bucket occupancy against (`--resolution`).
    pub buckets: Option<BucketSettings>,
    /// Training batch size: buckets with fewer images get smaller batches.
    pub batch_size: usize,
    /// Folder of the CLIP tokenizer files, for the token-overflow check.
    pub tokenizer: Option<PathBuf>,
    /// `--max_token_length` the captions are checked against.
    pub max_token_length: MaxTokenLength,
    /// Model and cache-stage settings to recompute cache keys with (stale-cache check).
    pub caches: Option<CacheSettings>,
    /// Print the JSON report instead of the text report.
    pub json: bool,
    /// Hide progress.
    pub quiet: bool,
}

/// Runs the checks, prints the report to stdout and returns the outcome: every image counts as
/// done, every error-severity finding as a failure (exit code 3).
pub fn run(options: &LintOptions) -> Result<Summary> {
    let report = lint(options)?;
    if options.json {
        let text = serde_json::to_string_pretty(&report).expect("report serialises");
        println!("{text}");
    } else {
        print!("{}", report.to_text(options.top_tags));
    }
    let mut summary = Summary {
        done: report.images,
        ..Summary::default()
    };
    for finding in report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
    {
        summary.fail(
            Path::new(&finding.path),
            &Error::bad_file(&finding.path, finding.message.clone()),
        );
    }
    Ok(summary)
}

/// Runs every check and returns the report.
pub fn lint(options: &LintOptions) -> Result<LintReport> {
    let dir = &options.train_data_dir;
    if !dir.is_dir() {
        return Err(Error::bad_file(
            dir,
            "dataset folder not found (give the folder that holds the training images)",
        ));
    }
    let mut findings = Vec::new();
    let listing = scan_folder(options, &mut findings)?;
    if listing.images.is_empty() {
        let message = crate::dataset::no_images(dir, options.recursive).detail();
        findings.push(finding(Severity::Error, Code::NoImages, dir, message));
    }
    let progress = Progress::new("lint-dataset", listing.images.len(), options.quiet);
    let inspected: Vec<ImageFacts> = listing
        .images
        .par_iter()
        .map(|path| {
            let facts = inspect_image(path, options);
            progress.inc(1);
            facts
        })
        .collect();
    progress.finish();
    for facts in &inspected {
        findings.extend(facts.findings.iter().cloned());
    }
    find_duplicates(&inspected, options, &mut findings);
    find_key_collisions(&listing.images, &mut findings);
    let tokenizer = match &options.tokenizer {
        Some(dir) => Some(ClipTokenizer::from_dir(dir, Padding::Eos)?),
        None => None,
    };
    let mut tag_frequency = check_sidecars(&listing, options, tokenizer.as_ref(), &mut findings);
    if let Some(in_json) = &options.in_json {
        check_metadata(
            in_json,
            &listing.images,
            dir,
            &mut findings,
            &mut tag_frequency,
        );
    }
    check_caches(&listing, &inspected, &mut findings);
    let mut skipped_checks = Vec::new();
    let reported: HashSet<String> = findings
        .iter()
        .filter(|f| matches!(f.code, Code::OrphanedCache | Code::StaleCache))
        .map(|f| f.path.clone())
        .collect();
    stale::check_stale(
        options,
        options.caches.as_ref(),
        &listing.images,
        &listing.caches,
        &reported,
        &mut findings,
        &mut skipped_checks,
    )?;
    let bucket_occupancy = match options.buckets {
        Some(settings) => check_buckets(settings, options, &inspected, &mut findings)?,
        None => Vec::new(),
    };
    if tokenizer.is_none() {
        skipped_checks.push(SkippedCheck {
            check: "token_overflow".into(),
            reason: "give --tokenizer DIR (the folder with the CLIP vocab.json and merges.txt) to count caption tokens against --max_token_length".into(),
        });
    }
    if options.buckets.is_none() {
        skipped_checks.push(SkippedCheck {
            check: "bucket_fit".into(),
            reason: "give --resolution (and the bucket options used for training) to check image sizes against the buckets and see the bucket occupancy".into(),
        });
    }

    let mut report = LintReport {
        schema: LINT_REPORT_V1,
        tool_version: crate::formats::manifest::TOOL_VERSION,
        train_data_dir: dir.display().to_string(),
        in_json: options.in_json.as_ref().map(|p| p.display().to_string()),
        images: listing.images.len(),
        decoded: options.decode,
        counts: Counts::default(),
        findings,
        tag_frequency: sorted_tags(tag_frequency),
        bucket_occupancy,
        skipped_checks,
    };
    report.finalize();
    Ok(report)
}

/// What the folder walk found.
struct Listing {
    /// Image files (by extension), sorted.
    images: Vec<PathBuf>,
    /// `.npz` files, sorted.
    caches: Vec<PathBuf>,
    /// `.npz` files in the `.lorakit/latents/` folders (keyed latent caches), sorted.
    keyed_caches: Vec<PathBuf>,
    /// Other regular files (captions, tags, ...), as a set for sidecar look-ups.
    others: HashSet<PathBuf>,
    /// Pipes, sockets and devices (a pipe at a sidecar path would block a reader).
    special: HashSet<PathBuf>,
}

fn finding(severity: Severity, code: Code, path: &Path, message: impl Into<String>) -> Finding {
    Finding {
        severity,
        code,
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Lists the folder, reporting hidden, AppleDouble, temporary and non-file entries on the way.
fn scan_folder(options: &LintOptions, findings: &mut Vec<Finding>) -> Result<Listing> {
    let dir = &options.train_data_dir;
    let mut walker = walkdir::WalkDir::new(dir).min_depth(1).follow_links(true);
    if !options.recursive {
        walker = walker.max_depth(1);
    }
    let mut listing = Listing {
        images: Vec::new(),
        caches: Vec::new(),
        keyed_caches: Vec::new(),
        others: HashSet::new(),
        special: HashSet::new(),
    };
    let mut walk = walker.into_iter();
    while let Some(entry) = walk.next() {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                let path = error.path().unwrap_or(dir).to_path_buf();
                findings.push(finding(
                    Severity::Error,
                    Code::UnreadableImage,
                    &path,
                    format!("cannot be listed: {error}"),
                ));
                continue;
            }
        };
        let path = entry.path();
        let name = entry.file_name().as_encoded_bytes();
        let is_dir = entry.file_type().is_dir();
        if name.starts_with(fsio::TEMP_PREFIX.as_bytes()) {
            findings.push(finding(
                Severity::Warning,
                Code::LeftoverTempFile,
                path,
                "temporary file of an interrupted lorakit run; nothing reads it, delete it",
            ));
            continue;
        }
        if name.starts_with(b"._") {
            findings.push(finding(
                Severity::Warning,
                Code::AppleDouble,
                path,
                "macOS AppleDouble metadata, not an image: lorakit ignores it but sd-scripts tries to load it and fails; delete it (`dot_clean` on macOS)",
            ));
            continue;
        }
        if is_dir && name == LORAKIT_DIR.as_bytes() {
            // lorakit's own bookkeeping: not images; its keyed latent caches are checked.
            listing.keyed_caches.extend(
                std::fs::read_dir(path.join(KEYED_DIR))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "npz")),
            );
            walk.skip_current_dir();
            continue;
        }
        if name.starts_with(b".") {
            findings.push(finding(
                Severity::Info,
                Code::HiddenFile,
                path,
                if is_dir {
                    "hidden folder: not searched, nothing in it is trained"
                } else {
                    "hidden file: ignored by every stage"
                },
            ));
            if is_dir {
                walk.skip_current_dir();
            }
            continue;
        }
        if has_image_extension(path) {
            if !entry.file_type().is_file() {
                findings.push(finding(
                    Severity::Error,
                    Code::NotAFile,
                    path,
                    "named like an image but is not a regular file: every stage skips it; rename it",
                ));
                continue;
            }
            let extension = path.extension().unwrap_or_default().to_string_lossy();
            let uniform = extension.chars().all(|c| c.is_ascii_lowercase())
                || extension.chars().all(|c| c.is_ascii_uppercase());
            if !uniform {
                findings.push(finding(
                    Severity::Info,
                    Code::ExtensionCase,
                    path,
                    format!("mixed-case extension .{extension}: lorakit uses it, but sd-scripts silently skips it; rename to lower case for compatibility"),
                ));
            }
            listing.images.push(path.to_path_buf());
        } else if entry.file_type().is_file() {
            if path.extension().is_some_and(|e| e == "npz") {
                listing.caches.push(path.to_path_buf());
            } else {
                listing.others.insert(path.to_path_buf());
            }
        } else if !entry.file_type().is_dir() {
            listing.special.insert(path.to_path_buf());
        }
    }
    listing.images.sort();
    listing.caches.sort();
    listing.keyed_caches.sort();
    Ok(listing)
}

/// Per-image results of the parallel pass.
struct ImageFacts {
    path: PathBuf,
    length: u64,
    header: Option<ImageHeader>,
    perceptual_hash: Option<u64>,
    findings: Vec<Finding>,
}

fn inspect_image(path: &Path, options: &LintOptions) -> ImageFacts {
    let mut facts = ImageFacts {
        path: path.to_path_buf(),
        length: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        header: None,
        perceptual_hash: None,
        findings: Vec::new(),
    };
    let mut report = |severity, code, message: String| {
        facts.findings.push(finding(severity, code, path, message))
    };
    let header = match read_header(path) {
        Ok(header) => header,
        Err(message) => {
            report(
                Severity::Error,
                Code::UnreadableImage,
                format!("{message}; every stage will skip this image"),
            );
            return facts;
        }
    };
    let (width, height) = (header.width, header.height);
    let pixels = u64::from(width) * u64::from(height);
    let limits = &options.image.limits;
    let too_large =
        width > limits.max_side || height > limits.max_side || pixels > limits.max_pixels;
    if too_large {
        report(
            Severity::Error,
            Code::TooLarge,
            format!(
                "declares {width}x{height} ({:.1} megapixels), beyond the decompression-bomb limits every stage applies (--max_image_side {}, --max_image_pixels {}): a decompression bomb or a mistake; downscale it, or raise the limits if it is real",
                pixels as f64 / 1e6,
                limits.max_side,
                limits.max_pixels
            ),
        );
    }
    if width == 0 || height == 0 {
        report(
            Severity::Error,
            Code::UnreadableImage,
            format!("declares a {width}x{height} size: damaged header"),
        );
    }
    if header.truncated {
        report(
            Severity::Error,
            Code::TruncatedImage,
            "the file ends before its end-of-image marker (cut-off download or copy): decoding will fail or show grey; copy it again".into(),
        );
    }
    let extension = path
        .extension()
        .unwrap_or_default()
        .to_string_lossy()
        .to_ascii_lowercase();
    if !header.format.extensions_str().contains(&extension.as_str()) {
        report(
            Severity::Warning,
            Code::FormatMismatch,
            format!(
                "named .{extension} but contains {:?} data: lorakit decodes by content, other tools may not; rename it to .{}",
                header.format,
                header.format.extensions_str().first().copied().unwrap_or("?")
            ),
        );
    }
    if header.animated {
        report(
            Severity::Warning,
            Code::Animated,
            "animated image: only the first frame is tagged, captioned and trained; export the frame you want as a still image".into(),
        );
    }
    if let Some((severity, message)) = color_mode_message(&header) {
        report(severity, Code::ColorMode, message);
    }
    if let Some(orientation) = header.orientation {
        let (w, h) = header.upright_size();
        report(
            Severity::Warning,
            Code::ExifRotation,
            format!(
                "EXIF orientation {orientation}: the stages use the stored pixels, {}, like sd-scripts (with --exif_transpose they turn it upright, {w}x{h}); to be safe with every tool, save it already rotated",
                if orientation >= 5 { "sideways" } else { "flipped" }
            ),
        );
    }
    if options.decode && !too_large && !header.truncated {
        match decode(path, options) {
            Ok(image) => facts.perceptual_hash = Some(dhash(image.image())),
            Err(message) => report(
                Severity::Error,
                Code::DecodeFailed,
                format!("cannot be decoded: {message}; every stage will skip this image"),
            ),
        }
    }
    facts.header = Some(header);
    facts
}

/// What the stages do with a stored pixel format other than 8-bit RGB, and how serious it is.
fn color_mode_message(header: &ImageHeader) -> Option<(Severity, String)> {
    let alpha = "tag-images composites it onto white; caption-images, prepare-latents and training drop the alpha (the colour stored under transparent pixels, often black, becomes visible); flatten it onto the background you want";
    let deep = if header.bits > 8 {
        format!(
            "{}-bit channels are reduced to 8 bits by every stage; ",
            header.bits
        )
    } else {
        String::new()
    };
    match header.color {
        StoredColor::Cmyk => Some((
            Severity::Warning,
            format!("{deep}CMYK JPEG (print colour space): converted to RGB without colour management, so colours may shift; convert it to sRGB in an image editor"),
        )),
        StoredColor::Rgba | StoredColor::GrayAlpha | StoredColor::Palette if header.transparency => Some((
            Severity::Warning,
            format!("{deep}has transparency: {alpha}"),
        )),
        StoredColor::Palette => Some((
            Severity::Info,
            format!("{deep}palette (indexed) colours: expanded to RGB by every stage"),
        )),
        StoredColor::Gray | StoredColor::GrayAlpha => Some((
            Severity::Info,
            format!("{deep}grayscale: copied into R, G and B by every stage (the LoRA learns a grayscale look from it)"),
        )),
        StoredColor::Rgb | StoredColor::Rgba if header.bits > 8 => Some((
            Severity::Info,
            deep.trim_end_matches("; ").to_string(),
        )),
        StoredColor::Rgb | StoredColor::Rgba => None,
    }
}

fn decode(path: &Path, options: &LintOptions) -> std::result::Result<LoadedImage, String> {
    crate::dataset::imaging::open(path, &options.image).map_err(|error| Error::detail(&error))
}

/// Exact duplicates (same length, then same BLAKE3) and, after decoding, near-duplicates.
fn find_duplicates(facts: &[ImageFacts], options: &LintOptions, findings: &mut Vec<Finding>) {
    let mut by_length: HashMap<u64, Vec<usize>> = HashMap::new();
    for (index, image) in facts.iter().enumerate() {
        if image.header.is_some() {
            by_length.entry(image.length).or_default().push(index);
        }
    }
    let candidates: Vec<usize> = by_length
        .values()
        .filter(|group| group.len() > 1)
        .flatten()
        .copied()
        .collect();
    let hashes: Vec<(usize, Option<String>)> = candidates
        .par_iter()
        .map(|&index| (index, hashing::hash_file(&facts[index].path).ok()))
        .collect();
    let mut by_hash: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (index, hash) in hashes {
        if let Some(hash) = hash {
            by_hash.entry(hash).or_default().push(index);
        }
    }
    let mut same_as: HashMap<usize, usize> = HashMap::new();
    for group in by_hash.values_mut().filter(|g| g.len() > 1) {
        group.sort_unstable();
        for &copy in &group[1..] {
            same_as.insert(copy, group[0]);
            findings.push(finding(
                Severity::Warning,
                Code::Duplicate,
                &facts[copy].path,
                format!(
                    "byte-identical to {}: trained twice as often; delete one copy",
                    facts[group[0]].path.display()
                ),
            ));
        }
    }
    if !options.decode {
        return;
    }
    let perceptual: Vec<Option<u64>> = facts
        .iter()
        .enumerate()
        .map(|(index, image)| {
            image
                .perceptual_hash
                .filter(|_| !same_as.contains_key(&index))
        })
        .collect();
    for (earlier, later, distance) in near_pairs(&perceptual, options.near_duplicate_distance) {
        findings.push(finding(
            Severity::Warning,
            Code::NearDuplicate,
            &facts[later].path,
            format!(
                "looks almost the same as {} (perceptual hash differs in {distance} of 64 bits): probably a resized or re-encoded copy; keep one unless the difference matters",
                facts[earlier].path.display()
            ),
        ));
    }
}

/// Images of one folder whose names differ only in the extension share a stem key and sidecars.
fn find_key_collisions(images: &[PathBuf], findings: &mut Vec<Finding>) {
    let mut by_stem: HashMap<PathBuf, &PathBuf> = HashMap::new();
    for image in images {
        let stem = image.with_extension("");
        if let Some(first) = by_stem.get(&stem) {
            findings.push(finding(
                Severity::Warning,
                Code::KeyCollision,
                image,
                format!(
                    "has the same name as {} apart from the extension: both read the same caption/tag files and collide as metadata keys without --full_path; rename one",
                    first.display()
                ),
            ));
        } else {
            by_stem.insert(stem, image);
        }
    }
}

/// Checks the caption and tag file of every image; returns how often each tag occurs.
fn check_sidecars(
    listing: &Listing,
    options: &LintOptions,
    tokenizer: Option<&ClipTokenizer>,
    findings: &mut Vec<Finding>,
) -> HashMap<String, usize> {
    let mut tags: HashMap<String, usize> = HashMap::new();
    let mut any_sidecar = false;
    let mut expected = HashSet::new();
    let written = [
        (
            "caption-images",
            written_sidecars(
                caption_index(&options.train_data_dir, &options.caption_extension).existing(),
            ),
        ),
        (
            "tag-images",
            written_sidecars(default_store(&options.train_data_dir).existing()),
        ),
    ];
    for ((extension, is_tags), (writer, recorded)) in [
        (&options.caption_extension, false),
        (&options.tag_extension, true),
    ]
    .into_iter()
    .zip(&written)
    {
        let paths: Vec<PathBuf> = listing
            .images
            .iter()
            .map(|image| sidecar_path(image, extension))
            .collect();
        let present = paths.iter().filter(|p| listing.others.contains(*p)).count();
        any_sidecar |= present > 0;
        for (image, sidecar) in listing.images.iter().zip(&paths) {
            expected.insert(sidecar.clone());
            if listing.special.contains(sidecar) {
                findings.push(finding(
                    Severity::Error,
                    Code::NotAFile,
                    sidecar,
                    "not a regular file (a pipe, socket or device): the merge stages report it as \
                     an error for this image; remove it or replace it with a text file",
                ));
                continue;
            }
            if !listing.others.contains(sidecar) {
                if present > 0 {
                    findings.push(finding(
                        Severity::Warning,
                        Code::SidecarMissing,
                        sidecar,
                        format!(
                            "missing: {} has no {extension} file while other images do; it trains with an empty {}",
                            image.display(),
                            if is_tags { "tag list" } else { "caption" }
                        ),
                    ));
                }
                continue;
            }
            let recorded = recorded
                .get(&relative_name(&options.train_data_dir, sidecar))
                .map(|hash| (*writer, hash.as_str()));
            if let Some(text) =
                check_sidecar(sidecar, options.max_caption_bytes, recorded, findings)
            {
                if let Some(tokenizer) = tokenizer {
                    check_tokens(
                        tokenizer,
                        options.max_token_length,
                        sidecar,
                        &text,
                        findings,
                    );
                }
                if is_tags {
                    let unique: HashSet<&str> = text
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .collect();
                    for tag in unique {
                        *tags.entry(tag.to_string()).or_default() += 1;
                    }
                }
            }
        }
    }
    if !any_sidecar && !listing.images.is_empty() && options.in_json.is_none() {
        findings.push(finding(
            Severity::Warning,
            Code::NoCaptions,
            &options.train_data_dir,
            format!(
                "no {} caption or {} tag files: run caption-images or tag-images first, or training uses only the folder's class tokens",
                options.caption_extension, options.tag_extension
            ),
        ));
    }
    for extension in [&options.caption_extension, &options.tag_extension] {
        let mut orphans: Vec<&PathBuf> = listing
            .others
            .iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.as_encoded_bytes().ends_with(extension.as_bytes()))
                    && !expected.contains(*p)
            })
            .collect();
        orphans.sort();
        for orphan in orphans {
            findings.push(finding(
                Severity::Info,
                Code::SidecarWithoutImage,
                orphan,
                "no image with this name: the file is not used",
            ));
        }
    }
    tags
}

/// The sidecar files the stage writing `output` recorded in its manifest (empty when there is
/// no readable manifest).
fn written_sidecars(output: &Path) -> WrittenSidecars {
    Manifest::read_for(output)
        .ok()
        .flatten()
        .map(|manifest| manifest.sidecars)
        .unwrap_or_default()
}

/// Checks one caption/tag file; returns its text when it is readable. `recorded` names the
/// tool that wrote the file and the hash it recorded, when one did.
fn check_sidecar(
    path: &Path,
    max_bytes: u64,
    recorded: Option<(&str, &str)>,
    findings: &mut Vec<Finding>,
) -> Option<String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            findings.push(finding(
                Severity::Error,
                Code::SidecarNotUtf8,
                path,
                format!("cannot be read: {error}"),
            ));
            return None;
        }
    };
    if let Some((writer, hash)) = recorded {
        if hashing::hash_bytes(&bytes) != hash {
            findings.push(finding(
                Severity::Info,
                Code::SidecarEdited,
                path,
                format!(
                    "edited since {writer} wrote it: it is yours now, and {writer} keeps it \
                     (its --overwrite replaces it after copying it to a .bak file)"
                ),
            ));
        }
    }
    if bytes.len() as u64 > max_bytes {
        findings.push(finding(
            Severity::Warning,
            Code::SidecarTooLong,
            path,
            format!(
                "{} bytes long (more than --max_caption_bytes {max_bytes}): training keeps only the first 75/150/225 tokens; is this really a caption?",
                bytes.len()
            ),
        ));
    }
    let body = match bytes.strip_prefix(b"\xEF\xBB\xBF") {
        Some(body) => {
            findings.push(finding(
                Severity::Info,
                Code::SidecarBom,
                path,
                "starts with a UTF-8 byte-order mark: lorakit strips it, but sd-scripts keeps it glued to the first word or tag; re-save without BOM for compatibility",
            ));
            body
        }
        None => &bytes[..],
    };
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(error) => {
            findings.push(finding(
                Severity::Error,
                Code::SidecarNotUtf8,
                path,
                format!(
                    "not valid UTF-8 (invalid byte at offset {}): every stage skips this image; re-save the file as UTF-8",
                    error.valid_up_to() + (bytes.len() - body.len())
                ),
            ));
            return None;
        }
    };
    if text.trim().is_empty() {
        findings.push(finding(
            Severity::Warning,
            Code::SidecarEmpty,
            path,
            "empty: the image trains with an empty caption; write one or remove the image",
        ));
    } else if text.lines().filter(|l| !l.trim().is_empty()).count() > 1 {
        findings.push(finding(
            Severity::Info,
            Code::SidecarMultiline,
            path,
            "several lines: the metadata merge keeps all of them, but DreamBooth-style folder training reads only the first line",
        ));
    }
    Some(text.to_string())
}

/// Compares the metadata JSON with the folder.
fn check_metadata(
    in_json: &Path,
    images: &[PathBuf],
    dir: &Path,
    findings: &mut Vec<Finding>,
    tags: &mut HashMap<String, usize>,
) {
    let metadata = match crate::formats::metadata::load_input_metadata(in_json) {
        Ok(metadata) => metadata,
        Err(error) => {
            findings.push(finding(
                Severity::Error,
                Code::MetadataUnreadable,
                in_json,
                format!("{}; later stages refuse it", Error::detail(&error)),
            ));
            return;
        }
    };
    let mut keys_of_images: HashMap<String, &PathBuf> = HashMap::new();
    for image in images {
        for full_path in [true, false] {
            if let Ok(key) = image_key(image, full_path) {
                keys_of_images.insert(key, image);
            }
        }
    }
    let count_tags = tags.is_empty();
    let mut covered: HashSet<&PathBuf> = HashSet::new();
    for (key, entry) in metadata.iter() {
        let image = keys_of_images.get(key.as_str()).copied();
        match image {
            Some(image) => {
                covered.insert(image);
            }
            None if resolve_image(key, Some(dir)).is_some() => {}
            None => findings.push(finding(
                Severity::Warning,
                Code::EntryWithoutImage,
                in_json,
                format!("entry {key:?} names no image in {}: training skips it; re-run the merge or remove the entry", dir.display()),
            )),
        }
        let text_of = |field: &str| {
            entry
                .get(field)
                .and_then(|v| v.as_str())
                .map(str::trim)
                .unwrap_or("")
        };
        if text_of("caption").is_empty() && text_of("tags").is_empty() {
            findings.push(finding(
                Severity::Warning,
                Code::EntryWithoutText,
                in_json,
                format!("entry {key:?} has neither caption nor tags: it trains unconditioned"),
            ));
        }
        if count_tags {
            let unique: HashSet<&str> = text_of("tags")
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect();
            for tag in unique {
                *tags.entry(tag.to_string()).or_default() += 1;
            }
        }
    }
    for image in images.iter().filter(|i| !covered.contains(i)) {
        findings.push(finding(
            Severity::Warning,
            Code::ImageWithoutEntry,
            image,
            format!(
                "no entry in {}: stages that read the metadata skip this image; re-run merge-captions/merge-tags",
                in_json.display()
            ),
        ));
    }
}

/// Cache files (`<stem>_WxH_sd.npz`, `<stem>_sdxl.npz` style latents, `<stem>_te_outputs.npz`,
/// legacy `<stem>.npz`) whose image is gone, or whose recorded image size no longer matches;
/// keyed latent caches (`.lorakit/latents/`) whose image is gone or changed since. A keyed cache
/// of an unchanged image is another setting's valid cache and not reported.
fn check_caches(listing: &Listing, facts: &[ImageFacts], findings: &mut Vec<Finding>) {
    let mut sizes: HashMap<PathBuf, Option<(u32, u32, u32, u32)>> = HashMap::new();
    let mut images: HashMap<PathBuf, &Path> = HashMap::new();
    for image in facts {
        let size = image.header.as_ref().map(|h| {
            let (uw, uh) = h.upright_size();
            (h.width, h.height, uw, uh)
        });
        sizes.insert(image.path.with_extension(""), size);
        images.insert(image.path.with_extension(""), &image.path);
    }
    for cache in &listing.keyed_caches {
        let name = cache.file_name().unwrap_or_default().to_string_lossy();
        let Some(CacheName::Keyed { stem, .. }) = parse_cache_name(&name) else {
            continue;
        };
        // <folder>/.lorakit/latents/<name> belongs to an image <folder>/<stem>.*
        let Some(folder) = cache.ancestors().nth(3) else {
            continue;
        };
        let message = match images.get(&folder.join(&stem)) {
            None => format!("keyed latent cache without an image named {stem}.* in {}: never used; `prepare-latents --prune` (or you) can delete it", folder.display()),
            Some(image) => match (recorded_source(cache), hashing::hash_file(image)) {
                (Some(recorded), Ok(current)) if recorded != current => format!(
                    "keyed latent cache of {}, which changed since it was written: never used again; `prepare-latents --prune` (or you) can delete it",
                    image.display()
                ),
                _ => continue,
            },
        };
        findings.push(finding(
            Severity::Warning,
            Code::OrphanedCache,
            cache,
            message,
        ));
    }
    for cache in &listing.caches {
        let name = cache.file_name().unwrap_or_default().to_string_lossy();
        let (stem, recorded) =
            if let Some(CacheName::SdScripts { stem, size }) = parse_cache_name(&name) {
                (stem, Some(size))
            } else if let Some(stem) = name.strip_suffix("_te_outputs.npz") {
                (stem.to_string(), None)
            } else {
                (name.trim_end_matches(".npz").to_string(), None)
            };
        match sizes.get(&cache.with_file_name(&stem)) {
            None => findings.push(finding(
                Severity::Warning,
                Code::OrphanedCache,
                cache,
                format!("cache file without an image named {stem}.*: never used; delete it"),
            )),
            Some(Some((w, h, uw, uh))) => {
                if let Some((cw, ch)) = recorded {
                    if (cw, ch) != (*w, *h) && (cw, ch) != (*uw, *uh) {
                        findings.push(finding(
                            Severity::Warning,
                            Code::StaleCache,
                            cache,
                            format!("made for a {cw}x{ch} image but the image is now {uw}x{uh}: stale; delete it and re-run prepare-latents"),
                        ));
                    }
                }
            }
            Some(None) => {}
        }
    }
}

/// Bytes of a caption tokenized: far more than 225 tokens of any real text.
const TOKENIZE_BYTES: usize = 16 * 1024;

/// Reports a caption/tag file whose CLIP token count exceeds the `--max_token_length` budget.
fn check_tokens(
    tokenizer: &ClipTokenizer,
    budget: MaxTokenLength,
    path: &Path,
    text: &str,
    findings: &mut Vec<Finding>,
) {
    let line = crate::dataset::first_line(text);
    let mut end = line.len().min(TOKENIZE_BYTES);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let Ok(ids) = tokenizer.body_ids(&line[..end]) else {
        return;
    };
    if ids.len() > budget.tokens() {
        findings.push(finding(
            Severity::Warning,
            Code::TokenOverflow,
            path,
            format!(
                "{} CLIP tokens, more than --max_token_length {}: training silently drops the last {}; shorten it or train with --max_token_length {}",
                ids.len(),
                budget.tokens(),
                ids.len() - budget.tokens(),
                if budget.tokens() < 225 { "150 or 225" } else { "225 (the maximum)" }
            ),
        ));
    }
}

/// Upscale factor from which an upscaled image is reported (10% enlargement is harmless).
const UPSCALE_REPORT_FACTOR: f64 = 1.1;
/// Pixel-count ratio to the largest bucket from which an image is reported as far too large.
const OVERSIZE_REPORT_FACTOR: u64 = 16;

/// Places every readable image in its bucket; reports upscaled, oversized and unplaceable
/// images and sparse buckets; returns the bucket occupancy histogram.
fn check_buckets(
    settings: BucketSettings,
    options: &LintOptions,
    facts: &[ImageFacts],
    findings: &mut Vec<Finding>,
) -> Result<Vec<BucketCount>> {
    let batch_size = options.batch_size;
    let mut manager = BucketManager::new(settings)?;
    let largest_area = manager
        .predefined()
        .iter()
        .map(|&(w, h)| u64::from(w) * u64::from(h))
        .max()
        .unwrap_or(u64::from(settings.max_resolution.0) * u64::from(settings.max_resolution.1));
    let mut occupancy: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for image in facts {
        let Some(header) = &image.header else {
            continue;
        };
        let size = if options.image.exif_transpose {
            header.upright_size()
        } else {
            (header.width, header.height)
        };
        if size.0 == 0 || size.1 == 0 {
            continue;
        }
        let Some(placement) = manager.place(size) else {
            findings.push(finding(
                Severity::Error,
                Code::BucketTooSmall,
                &image.path,
                format!(
                    "{}x{} is smaller than one --bucket_reso_steps ({}): with --bucket_no_upscale it gets a zero-sized bucket; remove it or train without --bucket_no_upscale",
                    size.0, size.1, settings.bucket_reso_steps
                ),
            ));
            continue;
        };
        *occupancy.entry(placement.bucket).or_default() += 1;
        let scale = f64::from(placement.resized.0) / f64::from(size.0);
        if scale >= UPSCALE_REPORT_FACTOR {
            findings.push(finding(
                Severity::Warning,
                Code::Upscaled,
                &image.path,
                format!(
                    "{}x{} is smaller than its bucket {}x{}: enlarged {scale:.2}x (Lanczos), so it trains soft; use a larger original or --bucket_no_upscale",
                    size.0, size.1, placement.bucket.0, placement.bucket.1
                ),
            ));
        }
        if u64::from(size.0) * u64::from(size.1) > OVERSIZE_REPORT_FACTOR * largest_area {
            findings.push(finding(
                Severity::Info,
                Code::Oversized,
                &image.path,
                format!(
                    "{}x{} is more than {OVERSIZE_REPORT_FACTOR}x the pixels of the largest bucket: every stage decodes and shrinks it ({:.2}x); pre-resizing the folder makes every stage faster",
                    size.0, size.1, scale
                ),
            ));
        }
    }
    let histogram: Vec<BucketCount> = occupancy
        .into_iter()
        .map(|((width, height), images)| BucketCount {
            width,
            height,
            images,
        })
        .collect();
    for bucket in histogram.iter().filter(|b| b.images < batch_size) {
        findings.push(Finding {
            severity: Severity::Warning,
            code: Code::SparseBucket,
            path: format!("bucket {}x{}", bucket.width, bucket.height),
            message: format!(
                "holds {} image(s), fewer than --train_batch_size {batch_size}: its batches are smaller than the others (each repeat gives one short batch); add images of this aspect ratio or crop them to a neighbouring one",
                bucket.images
            ),
        });
    }
    Ok(histogram)
}

fn sorted_tags(tags: HashMap<String, usize>) -> Vec<TagCount> {
    let mut sorted: Vec<TagCount> = tags
        .into_iter()
        .map(|(tag, count)| TagCount { tag, count })
        .collect();
    sorted.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.tag.cmp(&b.tag)));
    sorted
}
