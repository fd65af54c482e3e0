//! The loss plot written next to a trained LoRA: a PNG chart of the per-step loss and its
//! running average, with a legend, drawn with plotters. Text needs a TrueType font, looked up at run time in the
//! usual system places; without one the chart is drawn without text.

use std::sync::OnceLock;

use plotters::prelude::*;

use crate::{Error, Result};

const WIDTH: u32 = 800;
const HEIGHT: u32 = 450;

/// Font files tried, in order, for the chart's text.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// PNG bytes of a chart of the per-step `losses` and their running `averages` (step 1 at the
/// left), titled with `title` and the step count.
pub fn loss_png(losses: &[f32], averages: &[f32], title: &str) -> Result<Vec<u8>> {
    let with_text = sans_serif_registered();
    if !with_text {
        tracing::warn!("no TrueType font found; the loss plot has no text");
    }
    render(losses, averages, title, with_text)
}

/// Registers the first font of [`FONT_PATHS`] that loads as "sans-serif" (once per process).
pub(super) fn sans_serif_registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        FONT_PATHS.iter().any(|path| {
            std::fs::read(path).is_ok_and(|bytes| {
                // plotters keeps fonts for the whole process, so the bytes live as long.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

fn render(losses: &[f32], averages: &[f32], title: &str, with_text: bool) -> Result<Vec<u8>> {
    let failed =
        |e: &dyn std::fmt::Display| Error::Model(format!("cannot draw the loss plot: {e}"));
    let finite = || {
        losses
            .iter()
            .chain(averages)
            .copied()
            .filter(|l| l.is_finite())
    };
    let low = finite().fold(f32::INFINITY, f32::min);
    let high = finite().fold(f32::NEG_INFINITY, f32::max);
    let (low, high) = match (low.is_finite(), high - low) {
        (false, _) => (0.0, 1.0),
        (true, span) if span < 1e-6 => (low - 0.5, high + 0.5),
        (true, span) => (low - 0.05 * span, high + 0.05 * span),
    };
    let last_step = losses.len().max(2) as f32;
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(16);
        if with_text {
            builder
                .caption(
                    format!("{title}: loss per step ({} steps)", losses.len()),
                    ("sans-serif", 20),
                )
                .x_label_area_size(40)
                .y_label_area_size(64);
        }
        let mut chart = builder
            .build_cartesian_2d(1f32..last_step, low..high)
            .map_err(|e| failed(&e))?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(WHITE.mix(0.0));
        if with_text {
            mesh.x_desc("step")
                .y_desc("loss")
                .x_label_formatter(&|step| format!("{}", step.round()));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| failed(&e))?;
        let series = |values: &[f32]| -> Vec<(f32, f32)> {
            (values.iter().enumerate())
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| ((i + 1) as f32, v))
                .collect()
        };
        let sample = |colour: RGBColor, width: u32| {
            move |(x, y): (i32, i32)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(width))
            }
        };
        chart
            .draw_series(LineSeries::new(series(losses), LOSS_COLOUR.stroke_width(1)))
            .map_err(|e| failed(&e))?
            .label("loss per step (loss/current)")
            .legend(sample(LOSS_COLOUR, 1));
        chart
            .draw_series(LineSeries::new(
                series(averages),
                AVERAGE_COLOUR.stroke_width(3),
            ))
            .map_err(|e| failed(&e))?
            .label("running average (loss/average)")
            .legend(sample(AVERAGE_COLOUR, 3));
        if with_text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| failed(&e))?;
        }
        root.present().map_err(|e| failed(&e))?;
    }
    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, pixels)
        .ok_or_else(|| Error::Model("loss plot buffer has the wrong size".into()))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| failed(&e))?;
    Ok(png.into_inner())
}

/// Colour of the per-step loss line.
const LOSS_COLOUR: RGBColor = RGBColor(150, 190, 230);
/// Colour of the running-average line.
const AVERAGE_COLOUR: RGBColor = RGBColor(200, 60, 30);

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png: &[u8]) -> image::RgbImage {
        image::load_from_memory(png).unwrap().to_rgb8()
    }

    fn count(image: &image::RgbImage, colour: RGBColor) -> usize {
        let RGBColor(r, g, b) = colour;
        image.pixels().filter(|p| p.0 == [r, g, b]).count()
    }

    #[test]
    fn draws_both_lines_with_or_without_text() {
        let losses: Vec<f32> = (0..50).map(|i| 1.0 + ((i * 7) % 5) as f32 * 0.05).collect();
        let averages: Vec<f32> = (0..50).map(|i| 1.1 - i as f32 * 0.002).collect();
        // Text is drawn exactly when one of the known font files exists on this machine.
        let font_present = FONT_PATHS.iter().any(|p| std::path::Path::new(p).is_file());
        assert_eq!(sans_serif_registered(), font_present);
        for with_text in [false, font_present] {
            let image = decode(&render(&losses, &averages, "demo", with_text).unwrap());
            assert_eq!(image.dimensions(), (WIDTH, HEIGHT));
            assert!(count(&image, LOSS_COLOUR) > 100, "loss line drawn");
            assert!(count(&image, AVERAGE_COLOUR) > 300, "average line drawn");
        }
        let flat = decode(&render(&[1.0; 50], &[1.0; 50], "demo", false).unwrap());
        let varied = decode(&render(&losses, &averages, "demo", false).unwrap());
        assert_ne!(flat, varied, "the picture follows the data");
        let empty = decode(&render(&[], &[], "demo", false).unwrap());
        assert_eq!(count(&empty, AVERAGE_COLOUR), 0);
        if font_present {
            // With text, a legend shows a sample of each line even when there is no data.
            let legend = decode(&render(&[], &[], "demo", true).unwrap());
            assert!(
                count(&legend, AVERAGE_COLOUR) >= 24 * 3,
                "average legend sample"
            );
            assert!(count(&legend, LOSS_COLOUR) >= 24, "loss legend sample");
        }
    }
}
