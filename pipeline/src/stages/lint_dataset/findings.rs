//! The lint report: findings with a severity and a stable code, rendered as text or JSON
//! (`lorakit.lint_report/v1`, schema in `schemas/lint_report.v1.schema.json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// A later stage will fail on or skip this file: fix it first.
    Error,
    /// Works, but probably not the way you want (silently changed data, wasted steps, ...).
    Warning,
    /// Handled automatically; shown so nothing is a surprise.
    Info,
}

/// What a finding is about; the JSON `code` (stable across versions of the v1 report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The file is empty, not an image, or its header is damaged.
    UnreadableImage,
    /// The file ends before its end-of-image marker.
    TruncatedImage,
    /// Full decoding (`--decode`) failed.
    DecodeFailed,
    /// Width, height or pixel count beyond the decompression-bomb limits.
    TooLarge,
    /// No image in the folder (with a hint when subfolders hold some).
    NoImages,
    /// Named like an image but is a folder or other non-file.
    NotAFile,
    /// The extension names another format than the content.
    FormatMismatch,
    /// Mixed-case extension (`.Jpg`), which sd-scripts does not pick up.
    ExtensionCase,
    /// macOS AppleDouble metadata file (`._name`).
    AppleDouble,
    /// Hidden file or folder (ignored by every stage).
    HiddenFile,
    /// Temporary file of an interrupted lorakit run.
    LeftoverTempFile,
    /// Animated image: only the first frame is used.
    Animated,
    /// Pixel format that stages convert (alpha, CMYK, 16-bit, palette, grayscale).
    ColorMode,
    /// EXIF orientation other than upright.
    ExifRotation,
    /// Two images share a metadata key / sidecar name (`a.png` and `a.jpg`).
    KeyCollision,
    /// Byte-identical to another image.
    Duplicate,
    /// Visually almost identical to another image (perceptual hash, `--decode`).
    NearDuplicate,
    /// A caption or tag file is missing for an image.
    SidecarMissing,
    /// A caption or tag file is empty.
    SidecarEmpty,
    /// A caption or tag file is not valid UTF-8.
    SidecarNotUtf8,
    /// A caption or tag file starts with a byte-order mark.
    SidecarBom,
    /// A caption or tag file has several non-empty lines.
    SidecarMultiline,
    /// A caption or tag file is suspiciously long.
    SidecarTooLong,
    /// A caption or tag file with no image of the same name.
    SidecarWithoutImage,
    /// A caption or tag file edited since `caption-images` / `tag-images` wrote it: the user's
    /// now, kept by those tools.
    SidecarEdited,
    /// The metadata JSON cannot be read.
    MetadataUnreadable,
    /// A metadata entry whose image does not exist.
    EntryWithoutImage,
    /// An image without a metadata entry.
    ImageWithoutEntry,
    /// A metadata entry with neither caption nor tags.
    EntryWithoutText,
    /// A cache file whose image no longer exists.
    OrphanedCache,
    /// A cache file made for a different version of its image.
    StaleCache,
    /// No caption or tag files at all.
    NoCaptions,
    /// A caption or tag file longer than the `--max_token_length` budget.
    TokenOverflow,
    /// Smaller than its bucket: enlarged for training.
    Upscaled,
    /// Far larger than the largest bucket.
    Oversized,
    /// Smaller than one bucket step with `--bucket_no_upscale`.
    BucketTooSmall,
    /// A bucket with fewer images than the batch size.
    SparseBucket,
}

/// One problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    /// How serious it is.
    pub severity: Severity,
    /// What kind of problem.
    pub code: Code,
    /// The file concerned (the dataset folder for dataset-wide findings).
    pub path: String,
    /// What is wrong, what later stages will do, and what to do about it.
    pub message: String,
}

/// A tag and the number of tag files it occurs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagCount {
    /// The tag text.
    pub tag: String,
    /// Number of images carrying it.
    pub count: usize,
}

/// One bucket of the occupancy histogram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BucketCount {
    /// Bucket width in pixels.
    pub width: u32,
    /// Bucket height in pixels.
    pub height: u32,
    /// Images placed in it (before repeats).
    pub images: usize,
}

/// A check that did not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedCheck {
    /// Name of the check.
    pub check: String,
    /// Why it was skipped and how to enable it.
    pub reason: String,
}

/// Number of findings per severity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Findings of severity error.
    pub errors: usize,
    /// Findings of severity warning.
    pub warnings: usize,
    /// Findings of severity info.
    pub infos: usize,
}

/// The whole lint report.
#[derive(Debug, Clone, Serialize)]
pub struct LintReport {
    /// Schema id of this document, `lorakit.lint_report/v1`.
    pub schema: &'static str,
    /// lorakit version that wrote it.
    pub tool_version: &'static str,
    /// The checked folder as given.
    pub train_data_dir: String,
    /// The metadata JSON checked along, if any.
    pub in_json: Option<String>,
    /// Number of image files inspected.
    pub images: usize,
    /// True when pixels were decoded (`--decode`); otherwise headers only.
    pub decoded: bool,
    /// Findings per severity.
    pub counts: Counts,
    /// Every finding, errors first, then by path.
    pub findings: Vec<Finding>,
    /// Tags by number of images, most frequent first.
    pub tag_frequency: Vec<TagCount>,
    /// Images per bucket, by (width, height), with `--resolution`.
    pub bucket_occupancy: Vec<BucketCount>,
    /// Checks that could not run.
    pub skipped_checks: Vec<SkippedCheck>,
}

/// Findings of one code shown in the text report before the rest is summarised.
const TEXT_LINES_PER_CODE: usize = 20;

impl LintReport {
    /// Sorts the findings and fills in the counts.
    pub fn finalize(&mut self) {
        self.findings.sort();
        self.findings.dedup();
        let count = |s| self.findings.iter().filter(|f| f.severity == s).count();
        self.counts = Counts {
            errors: count(Severity::Error),
            warnings: count(Severity::Warning),
            infos: count(Severity::Info),
        };
    }

    /// The human-readable report: findings grouped by severity and code (long groups shortened),
    /// the most frequent tags, skipped checks and the totals.
    pub fn to_text(&self, top_tags: usize) -> String {
        let mut out = String::new();
        let mode = if self.decoded {
            "decoded"
        } else {
            "headers only"
        };
        let _ = writeln!(
            out,
            "lint-dataset: {} ({} images, {mode})",
            self.train_data_dir, self.images
        );
        let mut groups: BTreeMap<(Severity, Code), Vec<&Finding>> = BTreeMap::new();
        for finding in &self.findings {
            groups
                .entry((finding.severity, finding.code))
                .or_default()
                .push(finding);
        }
        for ((severity, code), findings) in &groups {
            let label = serde_json::to_value(code).expect("code serialises");
            let _ = writeln!(
                out,
                "\n{} {} ({}):",
                severity_label(*severity),
                label.as_str().unwrap_or_default(),
                findings.len()
            );
            for finding in findings.iter().take(TEXT_LINES_PER_CODE) {
                let _ = writeln!(out, "  {}: {}", finding.path, finding.message);
            }
            if findings.len() > TEXT_LINES_PER_CODE {
                let _ = writeln!(
                    out,
                    "  ... and {} more (all are listed with --json)",
                    findings.len() - TEXT_LINES_PER_CODE
                );
            }
        }
        if !self.tag_frequency.is_empty() {
            let shown = self.tag_frequency.len().min(top_tags);
            let _ = writeln!(
                out,
                "\ntag frequency (top {shown} of {} tags):",
                self.tag_frequency.len()
            );
            for tag in &self.tag_frequency[..shown] {
                let _ = writeln!(out, "  {:>6}  {}", tag.count, tag.tag);
            }
        }
        if !self.bucket_occupancy.is_empty() {
            let _ = writeln!(out, "\nbucket occupancy (images per bucket):");
            let most = self
                .bucket_occupancy
                .iter()
                .map(|b| b.images)
                .max()
                .unwrap_or(1);
            for bucket in &self.bucket_occupancy {
                let bar = "#".repeat((bucket.images * 40).div_ceil(most));
                let _ = writeln!(
                    out,
                    "  {:>5}x{:<5} {:>6}  {bar}",
                    bucket.width, bucket.height, bucket.images
                );
            }
        }
        for skipped in &self.skipped_checks {
            let _ = writeln!(out, "\nskipped check {}: {}", skipped.check, skipped.reason);
        }
        let _ = writeln!(
            out,
            "\n{} errors, {} warnings, {} notes",
            self.counts.errors, self.counts.warnings, self.counts.infos
        );
        out
    }
}

fn severity_label(severity: Severity) -> &'static str {
    match severity {
        Severity::Error => "ERROR",
        Severity::Warning => "warning",
        Severity::Info => "note",
    }
}
