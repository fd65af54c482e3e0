//! The contact sheet of the sample images made during training: `sample/contact_sheet.png`, one
//! PNG grid with a row per prompt and a column per sample point (epoch end or step, in training
//! order), each row titled with its prompt and each column with its point. It is drawn from the
//! sample images in the folder, so a resumed run's sheet holds the earlier points too. Text needs
//! a TrueType font (as the loss plot); without one the grid is drawn without text.

use std::collections::BTreeMap;
use std::path::Path;

use image::RgbImage;
use plotters::prelude::*;

use crate::infra::fsio;
use crate::stages::generate_images::png::{encode_png, read_png_texts};
use crate::{Error, Result};

/// File name of the sheet in the sample folder.
pub const CONTACT_SHEET: &str = "contact_sheet.png";
/// Side of the square cell each image is fitted into.
pub const CELL: u32 = 256;
/// Height of the band of column titles at the top.
pub const HEADER: u32 = 28;
/// Height of the prompt title above each row.
pub const ROW_TITLE: u32 = 22;
/// Space around cells.
pub const GAP: u32 = 4;
const BACKGROUND: image::Rgb<u8> = image::Rgb([255, 255, 255]);
const EMPTY_CELL: image::Rgb<u8> = image::Rgb([224, 224, 224]);

/// A sample point, ordered as training reaches them (`e000000` before the first step comes
/// first; sd-scripts never mixes epoch and step points otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SamplePoint {
    /// At the end of an epoch (`e<epoch:06>`; epoch 0: the start of a run, resumed or not).
    Epoch(usize),
    /// After a step (`<steps:06>`).
    Step(usize),
}

impl SamplePoint {
    /// The column title.
    fn title(self) -> String {
        match self {
            SamplePoint::Epoch(0) => "start".to_string(),
            SamplePoint::Epoch(epoch) => format!("epoch {epoch}"),
            SamplePoint::Step(step) => format!("step {step}"),
        }
    }
}

/// The point and prompt index of a sample image named as sd-scripts names them,
/// `[<output_name>_]<point>_<prompt:02>_<YYYYmmddHHMMSS>[_<seed>].png`; `None` for other files.
pub fn parse_sample_name(
    file_name: &str,
    output_name: Option<&str>,
) -> Option<(SamplePoint, usize)> {
    let mut rest = file_name.strip_suffix(".png")?;
    if let Some(name) = output_name {
        rest = rest.strip_prefix(name)?.strip_prefix('_')?;
    }
    let parts: Vec<&str> = rest.split('_').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(3..=4).contains(&parts.len())
        || !parts[1..].iter().all(|p| digits(p))
        || parts[2].len() != 14
    {
        return None;
    }
    let point = match parts[0].strip_prefix('e') {
        Some(epoch) if digits(epoch) => SamplePoint::Epoch(epoch.parse().ok()?),
        None if digits(parts[0]) => SamplePoint::Step(parts[0].parse().ok()?),
        _ => return None,
    };
    Some((point, parts[1].parse().ok()?))
}

/// Redraws `<dir>/contact_sheet.png` from the sample images in `dir` (the newest image of each
/// prompt and point), written atomically.
pub fn write(dir: &Path, output_name: Option<&str>) -> Result<()> {
    let mut newest: BTreeMap<(usize, SamplePoint), String> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let name = entry.map_err(|e| Error::io(dir, e))?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((point, prompt)) = parse_sample_name(name, output_name) {
            let slot = newest.entry((prompt, point)).or_default();
            // The time stamp follows the point and prompt: the largest name is the newest.
            if name > slot.as_str() {
                *slot = name.to_string();
            }
        }
    }
    if newest.is_empty() {
        return Ok(());
    }
    let mut cells = BTreeMap::new();
    let mut prompts: BTreeMap<usize, String> = BTreeMap::new();
    for ((prompt, point), name) in &newest {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let image = image::load_from_memory(&bytes)
            .map_err(|e| Error::bad_file(&path, format!("not a PNG: {e}")))?
            .to_rgb8();
        if let Some((_, text)) = read_png_texts(&bytes)
            .into_iter()
            .find(|(k, _)| k == "prompt")
        {
            prompts.insert(*prompt, text);
        }
        cells.insert((*prompt, *point), image);
    }
    let sheet = draw(&cells, &prompts)?;
    fsio::write_atomic(&dir.join(CONTACT_SHEET), &encode_png(&sheet, &[])?)
}

/// The sheet of `cells` (by prompt index and point); `prompts` titles the rows.
pub fn draw(
    cells: &BTreeMap<(usize, SamplePoint), RgbImage>,
    prompts: &BTreeMap<usize, String>,
) -> Result<RgbImage> {
    let rows: Vec<usize> = dedup_sorted(cells.keys().map(|(prompt, _)| *prompt));
    let columns: Vec<SamplePoint> = dedup_sorted(cells.keys().map(|(_, point)| *point));
    let (width, height) = sheet_size(rows.len(), columns.len());
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
    let row_top = |row: usize| HEADER + row as u32 * (ROW_TITLE + CELL + GAP) + ROW_TITLE;
    let column_left = |column: usize| GAP + column as u32 * (CELL + GAP);
    for (row, prompt) in rows.iter().enumerate() {
        for (column, point) in columns.iter().enumerate() {
            let (left, top) = (column_left(column), row_top(row));
            match cells.get(&(*prompt, *point)) {
                Some(image) => {
                    let fitted = fit(image);
                    let x = left + (CELL - fitted.width()) / 2;
                    let y = top + (CELL - fitted.height()) / 2;
                    image::imageops::replace(&mut sheet, &fitted, x.into(), y.into());
                }
                None => {
                    let empty = RgbImage::from_pixel(CELL, CELL, EMPTY_CELL);
                    image::imageops::replace(&mut sheet, &empty, left.into(), top.into());
                }
            }
        }
    }
    if super::plot::sans_serif_registered() {
        let mut texts = Vec::new();
        for (column, point) in columns.iter().enumerate() {
            texts.push((point.title(), column_left(column), 6, CELL));
        }
        for (row, prompt) in rows.iter().enumerate() {
            let title = match prompts.get(prompt) {
                Some(text) => format!("{prompt}: {text}"),
                None => format!("prompt {prompt}"),
            };
            texts.push((title, GAP, row_top(row) - ROW_TITLE + 3, width - 2 * GAP));
        }
        label(&mut sheet, &texts)?;
    } else {
        tracing::warn!("no TrueType font found; the contact sheet has no titles");
    }
    Ok(sheet)
}

/// Width and height of a sheet of `rows` prompts by `columns` points.
pub fn sheet_size(rows: usize, columns: usize) -> (u32, u32) {
    (
        GAP + columns as u32 * (CELL + GAP),
        HEADER + rows as u32 * (ROW_TITLE + CELL + GAP),
    )
}

fn dedup_sorted<T: Ord>(values: impl Iterator<Item = T>) -> Vec<T> {
    let mut values: Vec<T> = values.collect();
    values.sort();
    values.dedup();
    values
}

/// `image` scaled to fit a cell, keeping its aspect ratio.
fn fit(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let scale = f64::from(CELL) / f64::from(w.max(h));
    let (w, h) = (
        ((f64::from(w) * scale).round() as u32).clamp(1, CELL),
        ((f64::from(h) * scale).round() as u32).clamp(1, CELL),
    );
    image::imageops::resize(image, w, h, image::imageops::FilterType::Triangle)
}

/// Draws each `(text, x, y, max width)` in black, cut to fit its width.
fn label(sheet: &mut RgbImage, texts: &[(String, u32, u32, u32)]) -> Result<()> {
    let failed = |e: &dyn std::fmt::Display| Error::Model(format!("contact sheet text: {e}"));
    let (width, height) = sheet.dimensions();
    let root = BitMapBackend::with_buffer(sheet.as_mut(), (width, height)).into_drawing_area();
    let font = ("sans-serif", 16).into_font().color(&BLACK);
    for (text, x, y, max_width) in texts {
        // About 8 pixels a character at this size.
        let fits = (*max_width / 8).max(4) as usize;
        let shown = if text.chars().count() > fits {
            let cut: String = text.chars().take(fits - 3).collect();
            format!("{cut}...")
        } else {
            text.clone()
        };
        root.draw(&Text::new(shown, (*x as i32, *y as i32), font.clone()))
            .map_err(|e| failed(&e))?;
    }
    root.present().map_err(|e| failed(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_names_parse_as_sd_scripts_writes_them() {
        let parse = parse_sample_name;
        assert_eq!(
            parse("my_lora_e000002_01_20261204151000_7.png", Some("my_lora")),
            Some((SamplePoint::Epoch(2), 1))
        );
        assert_eq!(
            parse("000040_12_20261204151000.png", None),
            Some((SamplePoint::Step(40), 12))
        );
        assert_eq!(parse("contact_sheet.png", None), None);
        assert_eq!(
            parse("other_000040_00_20261204151000.png", Some("mine")),
            None
        );
        assert_eq!(parse("000040_00_2026.png", None), None);
        assert!(SamplePoint::Epoch(0) < SamplePoint::Step(2));
    }

    #[test]
    fn the_sheet_is_a_grid_of_prompts_by_points() {
        let dir = tempfile::tempdir().unwrap();
        let image =
            |shade: u8, w: u32, h: u32| RgbImage::from_pixel(w, h, image::Rgb([shade, 0, 0]));
        let write = |name: &str, picture: RgbImage| {
            let texts = [("prompt".to_string(), format!("prompt of {name}"))];
            std::fs::write(dir.path().join(name), encode_png(&picture, &texts).unwrap()).unwrap();
        };
        write("run_e000000_00_20260101000000.png", image(10, 64, 64));
        write("run_000002_00_20260101000001.png", image(20, 64, 32));
        write("run_000002_01_20260101000001_5.png", image(30, 32, 64));
        // An older image of the same prompt and point is not shown.
        write("run_000002_01_20250101000001_5.png", image(99, 32, 64));
        write("unrelated.png", image(40, 8, 8));
        super::write(dir.path(), Some("run")).unwrap();
        let sheet = image::open(dir.path().join(CONTACT_SHEET))
            .unwrap()
            .to_rgb8();
        assert_eq!(sheet.dimensions(), sheet_size(2, 2));
        let centre = |row: u32, column: u32| {
            let x = GAP + column * (CELL + GAP) + CELL / 2;
            let y = HEADER + row * (ROW_TITLE + CELL + GAP) + ROW_TITLE + CELL / 2;
            sheet.get_pixel(x, y).0
        };
        assert_eq!(centre(0, 0), [10, 0, 0]);
        assert_eq!(centre(0, 1), [20, 0, 0]);
        assert_eq!(
            centre(1, 0),
            EMPTY_CELL.0,
            "prompt 1 has no image at the start"
        );
        assert_eq!(centre(1, 1), [30, 0, 0]);
    }
}
