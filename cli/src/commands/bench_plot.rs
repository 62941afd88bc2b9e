//! `forkd bench --plot FILE.png`: each latency series of a bench run drawn
//! as its distribution (the share of samples at or under each latency), so
//! that cold, pooled and bare paths can be compared at a glance.

use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Where a TrueType font for the labels is looked for (Debian's
/// fonts-dejavu-core, which scripts/setup-host.sh installs, first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// One latency series: its name and samples in ms.
pub struct Series {
    pub name: String,
    pub ms: Vec<f64>,
}

fn register_label_font() -> anyhow::Result<()> {
    let Some(path) = FONTS.iter().find(|p| Path::new(p).is_file()) else {
        bail!("--plot needs a TrueType font for its labels: none of {FONTS:?} (install fonts-dejavu-core)");
    };
    let bytes: &'static [u8] =
        Box::leak(std::fs::read(path).with_context(|| format!("read {path}"))?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow::anyhow!("{path}: not a usable font"))?;
    Ok(())
}

/// Draws `series` into the PNG `out` (written beside it and renamed).
pub fn draw(out: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let series: Vec<&Series> = series.iter().filter(|s| !s.ms.is_empty()).collect();
    if series.is_empty() {
        bail!("nothing to plot");
    }
    register_label_font()?;
    let lo = series.iter().flat_map(|s| &s.ms).fold(f64::INFINITY, |a, &b| a.min(b)).max(0.1);
    let hi = series.iter().flat_map(|s| &s.ms).fold(0.0f64, |a, &b| a.max(b)).max(lo * 2.0);
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plot.png".into());
    let partial = out.with_file_name(format!(".{name}.partial.{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&partial, (1200, 700)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 26))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("latency, ms (log scale)")
            .x_labels(8)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .y_desc("share of samples at or under")
            .label_style(("sans-serif", 16))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba().stroke_width(3);
            let mut sorted = s.ms.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let n = sorted.len() as f64;
            // A step per sample: the distribution as measured, no smoothing.
            let mut points = vec![(sorted[0], 0.0)];
            for (k, &v) in sorted.iter().enumerate() {
                points.push((v, k as f64 / n));
                points.push((v, (k + 1) as f64 / n));
            }
            chart
                .draw_series(LineSeries::new(points, color))?
                .label(format!("{} (n={}, median {:.1} ms)", s.name, s.ms.len(), sorted[sorted.len() / 2]))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
        root.present().with_context(|| format!("write {}", partial.display()))?;
    }
    std::fs::rename(&partial, out).with_context(|| format!("rename into {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_of_every_series() {
        let dir = std::env::temp_dir().join(format!("forkd-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("b.png");
        let series = vec![
            Series { name: "cold".into(), ms: vec![120.0, 150.0, 410.0] },
            Series { name: "pooled".into(), ms: vec![12.0, 14.5, 30.0] },
            Series { name: "empty".into(), ms: vec![] },
        ];
        draw(&out, "test", &series).unwrap();
        let png = std::fs::read(&out).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
        assert!(png.len() > 10_000, "{} bytes: the chart has content", png.len());
        assert!(draw(&dir.join("c.png"), "none", &[]).is_err(), "nothing to plot");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
