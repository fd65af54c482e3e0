//! The loss plot written next to a trained LoRA: a dependency-free SVG line chart.

use std::fmt::Write;

const WIDTH: f32 = 640.0;
const HEIGHT: f32 = 360.0;
const MARGIN: f32 = 48.0;

/// An SVG chart of the per-step `losses` (step 1 at the left) titled `title`.
pub fn loss_svg(losses: &[f32], title: &str) -> String {
    let finite: Vec<f32> = losses.iter().copied().filter(|l| l.is_finite()).collect();
    let (low, high) = finite
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &l| {
            (lo.min(l), hi.max(l))
        });
    let (low, high) = if finite.is_empty() {
        (0.0, 1.0)
    } else if high - low < 1e-6 {
        (low - 0.5, high + 0.5)
    } else {
        (low, high)
    };
    let plot_w = WIDTH - 2.0 * MARGIN;
    let plot_h = HEIGHT - 2.0 * MARGIN;
    let x = |i: usize| MARGIN + plot_w * i as f32 / (losses.len().max(2) - 1) as f32;
    let y = |l: f32| MARGIN + plot_h * (high - l) / (high - low);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{MARGIN}" y="24" font-size="14">{} — loss per step ({} steps)</text>
<line x1="{MARGIN}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{}" stroke="black"/>
<text x="4" y="{}">{high:.4}</text>
<text x="4" y="{}">{low:.4}</text>
<text x="{}" y="{}" text-anchor="end">step {}</text>
"##,
        escape(title),
        losses.len(),
        HEIGHT - MARGIN,
        WIDTH - MARGIN,
        HEIGHT - MARGIN,
        HEIGHT - MARGIN,
        MARGIN + 4.0,
        HEIGHT - MARGIN,
        WIDTH - MARGIN,
        HEIGHT - MARGIN + 16.0,
        losses.len()
    );
    let points: Vec<String> = losses
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| format!("{:.1},{:.1}", x(i), y(l)))
        .collect();
    let _ = writeln!(
        svg,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
        points.join(" ")
    );
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_one_point_per_finite_loss_within_the_frame() {
        let svg = loss_svg(&[1.2, 1.0, f32::NAN, 0.8], "a<b");
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let coords: Vec<(f32, f32)> = points
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert_eq!(coords.len(), 3);
        assert_eq!(coords[0].1, MARGIN);
        assert_eq!(coords[2].1, HEIGHT - MARGIN);
        assert!(coords.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(svg.contains("a&lt;b"));
    }
}
