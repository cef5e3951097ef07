//! Per-epoch line charts, one PNG per quantity, with every run overlaid in its own colour.

use super::font::{self, FAMILY};
use super::{display_labels, Rendered, ReportError, Run};
use cvdist_common::proto::EpochMetrics;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::colors::TRANSPARENT;
use std::path::Path;

/// Run colours, in order: the Okabe–Ito set (distinguishable with common colour-blindness)
/// minus its yellow, which is unreadable on white, then a few extras. Cycles after that.
const PALETTE: [(u8, u8, u8); 10] = [
    (0, 114, 178),   // blue
    (213, 94, 0),    // vermillion
    (0, 158, 115),   // bluish green
    (204, 121, 167), // reddish purple
    (230, 159, 0),   // orange
    (86, 180, 233),  // sky blue
    (0, 0, 0),       // black
    (127, 127, 127), // grey
    (140, 86, 75),   // brown
    (188, 189, 34),  // olive
];

/// The colour of the `index`-th run in the charts (the order `runs` is passed in).
pub fn series_colour(index: usize) -> (u8, u8, u8) {
    PALETTE[index % PALETTE.len()]
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChartOptions {
    /// Pixel size of each chart.
    pub size: (u32, u32),
    /// Draw titles, axis labels and legends. With `false`, or when no font is found, charts
    /// carry only lines, axes and grid.
    pub text: bool,
}

impl Default for ChartOptions {
    fn default() -> Self {
        ChartOptions { size: (1000, 600), text: true }
    }
}

/// Writes loss.png, accuracy.png, lr.png and throughput.png into `out_dir` (created if needed).
pub fn write_charts(runs: &[Run], out_dir: &Path) -> Result<Rendered, ReportError> {
    write_charts_with(runs, out_dir, &ChartOptions::default())
}

pub fn write_charts_with(runs: &[Run], out_dir: &Path, opts: &ChartOptions) -> Result<Rendered, ReportError> {
    if runs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|source| ReportError::CreateDir { path: out_dir.to_path_buf(), source })?;

    let mut rendered = Rendered::default();
    let text = opts.text && {
        let status = font::font_status();
        rendered.warnings.extend(status.warning().map(str::to_string));
        status.is_loaded()
    };

    let labels = display_labels(runs);
    let epochs: Vec<Vec<&EpochMetrics>> = runs.iter().map(|r| r.epochs()).collect();
    let series = |f: fn(&EpochMetrics) -> f64| -> RunSeries {
        epochs.iter().map(|run| run.iter().map(|m| (m.epoch + 1, f(m))).collect()).collect()
    };
    let single = (runs.len() == 1).then(|| labels[0].as_str());
    let titled = |what: &str| match single {
        Some(label) => format!("{what}: {label}"),
        None => what.to_string(),
    };

    let charts = [
        Chart {
            file: "loss.png",
            title: titled("Loss"),
            y_desc: "loss",
            lines: vec![(series(|m| m.train_loss), Kind::Train), (series(|m| m.test_loss), Kind::Test)],
            y_range: YRange::FromZero,
            y_format: fmt_plain,
            legend: SeriesLabelPosition::UpperRight,
        },
        Chart {
            file: "accuracy.png",
            title: titled("Accuracy"),
            y_desc: "accuracy %",
            lines: vec![(series(|m| m.train_acc * 100.0), Kind::Train), (series(|m| m.test_acc * 100.0), Kind::Test)],
            y_range: YRange::Percent,
            y_format: fmt_percent,
            legend: SeriesLabelPosition::LowerRight,
        },
        Chart {
            file: "lr.png",
            title: titled("Learning rate"),
            y_desc: "learning rate",
            lines: vec![(series(|m| m.lr), Kind::Only)],
            y_range: YRange::FromZero,
            y_format: fmt_plain,
            legend: SeriesLabelPosition::UpperRight,
        },
        Chart {
            file: "throughput.png",
            title: titled("Training throughput"),
            y_desc: "images / s",
            lines: vec![(series(|m| m.images_per_sec), Kind::Only)],
            y_range: YRange::FromZero,
            y_format: fmt_plain,
            legend: SeriesLabelPosition::LowerRight,
        },
    ];

    for chart in &charts {
        let path = out_dir.join(chart.file);
        chart
            .draw(&path, &labels, single.is_some(), opts.size, text)
            .map_err(|e| ReportError::Draw { path: path.clone(), message: e.to_string() })?;
        rendered.files.push(path);
    }
    Ok(rendered)
}

/// Which line of a run a series is; train and test share the run's colour and differ in dash.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Train,
    Test,
    Only,
}

enum YRange {
    /// 0 up to a little above the largest value: losses, rates and throughputs are non-negative.
    FromZero,
    /// Percent, from the decade below the lowest value to 100, so late-training differences of
    /// a point or two stay visible instead of being squashed against a 0..100 axis.
    Percent,
}

/// Per run, (1-based epoch, value) points.
type RunSeries = Vec<Vec<(u32, f64)>>;

struct Chart {
    file: &'static str,
    title: String,
    y_desc: &'static str,
    /// Per kind, per run, (1-based epoch, value) points.
    lines: Vec<(RunSeries, Kind)>,
    y_range: YRange,
    y_format: fn(&f64) -> String,
    legend: SeriesLabelPosition,
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

impl Chart {
    fn draw(&self, path: &Path, labels: &[String], single: bool, size: (u32, u32), text: bool) -> DrawResult {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;

        let points = || self.lines.iter().flat_map(|(runs, _)| runs.iter().flatten());
        let last_epoch = points().map(|&(e, _)| e).max().unwrap_or(1);
        let values: Vec<f64> = points().map(|&(_, v)| v).filter(|v| v.is_finite()).collect();
        let (y_lo, y_hi) = self.y_bounds(&values);

        let mut builder = ChartBuilder::on(&root);
        builder.margin(20).x_label_area_size(60).y_label_area_size(90);
        if text {
            // (family, size, style): FontDesc::style() would keep the regular face's glyphs.
            builder.caption(&self.title, (FAMILY, 26, FontStyle::Bold));
        }
        // An integer axis keeps epoch ticks on whole numbers; at least 1..2 so a one-epoch run
        // still has a non-empty range.
        let mut chart = builder.build_cartesian_2d(1u32..last_epoch.max(2), y_lo..y_hi)?;

        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(205, 205, 205))
            .max_light_lines(2)
            .label_style(text_style(15, text))
            .axis_desc_style(text_style(18, text))
            .y_label_formatter(&self.y_format)
            .x_labels(12);
        if text {
            mesh.x_desc("epoch").y_desc(self.y_desc);
        }
        mesh.draw()?;

        for (runs, kind) in &self.lines {
            for (i, points) in runs.iter().enumerate() {
                let (r, g, b) = series_colour(i);
                let style = RGBColor(r, g, b).stroke_width(if *kind == Kind::Test { 2 } else { 3 });
                // NaN/inf (a diverged run) would map to nonsense pixels: break the line there.
                for segment in points.split(|(_, v)| !v.is_finite()).filter(|s| !s.is_empty()) {
                    let segment = segment.to_vec();
                    match kind {
                        Kind::Test => chart.draw_series(DashedLineSeries::new(segment.clone(), 9, 5, style))?,
                        _ => chart.draw_series(LineSeries::new(segment.clone(), style))?,
                    };
                    // With few epochs a line is a couple of segments; markers show where the
                    // measurements are. Past ~40 they would only clutter.
                    if points.len() <= 40 {
                        chart.draw_series(segment.iter().map(|&p| Circle::new(p, 3, style.filled())))?;
                    }
                }
                if text {
                    let label = match (kind, single) {
                        (Kind::Train, true) => "train".to_string(),
                        (Kind::Test, true) => "test".to_string(),
                        (Kind::Train, false) => format!("{} train", labels[i]),
                        (Kind::Test, false) => format!("{} test", labels[i]),
                        (Kind::Only, _) => labels[i].clone(),
                    };
                    // An empty labelled series: one legend entry per line however many segments it has.
                    let dashed = *kind == Kind::Test;
                    chart
                        .draw_series(std::iter::empty::<Circle<(u32, f64), i32>>())?
                        .label(label)
                        .legend(move |(x, y)| legend_sample(x, y, dashed, style));
                }
            }
        }

        if text {
            chart
                .configure_series_labels()
                .position(self.legend.clone())
                .margin(12)
                .label_font(text_style(15, true))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }

    fn y_bounds(&self, values: &[f64]) -> (f64, f64) {
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        match self.y_range {
            YRange::FromZero if max > 0.0 => (0.0, max * 1.08),
            YRange::FromZero => (0.0, 1.0),
            YRange::Percent if min.is_finite() => (((min / 10.0).floor() * 10.0).clamp(0.0, 90.0), 100.0),
            YRange::Percent => (0.0, 100.0),
        }
    }
}

/// The short line drawn next to a legend label, dashed like the series it names.
fn legend_sample<DB: DrawingBackend>(
    x: i32,
    y: i32,
    dashed: bool,
    style: ShapeStyle,
) -> DynElement<'static, DB, (i32, i32)> {
    let ends = vec![(x, y), (x + 28, y)];
    if dashed {
        DashedPathElement::new(ends, 9, 5, style).into_dyn()
    } else {
        PathElement::new(ends, style).into_dyn()
    }
}

/// Text in the chart font; fully transparent when there is no font, because plotters skips
/// transparent text before it looks for a font, so axes and ticks still draw.
pub(super) fn text_style(size: u32, text: bool) -> TextStyle<'static> {
    let style = TextStyle::from((FAMILY, size).into_font());
    if text {
        style.color(&BLACK)
    } else {
        style.color(&TRANSPARENT)
    }
}

/// Tick labels with as many decimals as the step between ticks needs, without float noise
/// (0.30000000000000004) or needless zeros.
fn fmt_plain(v: &f64) -> String {
    let a = v.abs();
    let s = if a == 0.0 {
        "0".to_string()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 0.001 {
        format!("{v:.4}")
    } else {
        return format!("{v:.1e}");
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn fmt_percent(v: &f64) -> String {
    format!("{v:.0}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_tidy() {
        assert_eq!(fmt_plain(&0.30000000000000004), "0.3");
        assert_eq!(fmt_plain(&0.0), "0");
        assert_eq!(fmt_plain(&2.5), "2.5");
        assert_eq!(fmt_plain(&1234.567), "1235");
        assert_eq!(fmt_plain(&0.0001), "1.0e-4");
        assert_eq!(fmt_plain(&0.05), "0.05");
    }
}
