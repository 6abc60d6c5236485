//! SVG plots of training curves: loss against wall time for one or several named runs
//! (e.g. top-2 vs adaptive), with axis labels and a legend. Native only. No twin.

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// One curve: `(x, y)` points, e.g. (wall seconds, loss).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn as separate marked points instead of a line.
    pub markers: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            markers: false,
        }
    }

    /// Points drawn as markers, not joined.
    pub fn markers(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            markers: true,
            ..Series::new(name, points)
        }
    }
}

/// Axis labels and title of a plot.
#[derive(Clone, Debug)]
pub struct PlotLabels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

impl Default for PlotLabels<'_> {
    fn default() -> Self {
        PlotLabels {
            title: "training loss",
            x: "wall time (s)",
            y: "loss",
        }
    }
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(format!("plotting: {e}")),
    }
}

/// Draws `series` as lines into an SVG file at `path` (800x500). Non-finite points are
/// skipped; at least one finite point overall is required.
pub fn plot_series(path: impl AsRef<Path>, labels: &PlotLabels, series: &[Series]) -> Result<()> {
    let path = path.as_ref();
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = finite.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(Error::invalid("plot", "no finite point to plot"));
    }
    // A flat or single-point curve still needs a non-empty range.
    let pad = |lo: f64, hi: f64| {
        let m = if hi > lo {
            (hi - lo) * 0.05
        } else {
            lo.abs().max(1.0) * 0.05
        };
        (lo - m, hi + m)
    };
    let (x0, x1) = pad(x0, x1);
    let (y0, y1) = pad(y0, y1);

    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(labels.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(labels.x)
        .y_desc(labels.y)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, (s, pts)) in series.iter().zip(finite).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if s.markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(|e| plot_err(path, e))?
                .label(s.name.as_str())
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// Loss against wall time, with the default labels.
pub fn plot_loss(path: impl AsRef<Path>, series: &[Series]) -> Result<()> {
    plot_series(path, &PlotLabels::default(), series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svg_with_series_names() {
        let dir = std::env::temp_dir().join(format!("amoe_plot_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.svg");
        let top2 = Series::new(
            "top-2",
            (0..50)
                .map(|i| (i as f64, 5.0 / (1.0 + i as f64 * 0.1)))
                .collect(),
        );
        let adaptive = Series::new(
            "adaptive T=0.1",
            (0..40)
                .map(|i| (i as f64 * 0.9, 5.0 / (1.0 + i as f64 * 0.12)))
                .chain([(41.0, f64::NAN)])
                .collect(),
        );
        plot_loss(&path, &[top2, adaptive]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in [
            "top-2",
            "adaptive T=0.1",
            "wall time (s)",
            "loss",
            "<polyline",
        ] {
            assert!(svg.contains(text), "missing {text}");
        }
        // One point, flat curve: still a valid plot.
        plot_loss(&path, &[Series::new("one", vec![(1.0, 2.0)])]).unwrap();
        assert!(matches!(
            plot_loss(&path, &[Series::new("none", vec![(f64::NAN, 1.0)])]),
            Err(Error::InvalidArgument { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
