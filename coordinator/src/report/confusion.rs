//! The confusion-matrix heatmap written by `cvdist eval`: rows are true classes, columns
//! predicted classes, each cell shows its count and is shaded by its share of the row.

use super::chart::text_style;
use super::font::{self, FAMILY};
use super::{Rendered, ReportError};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const SIZE: (u32, u32) = (1000, 920);
const TOP: i32 = 70; // title
const LEFT: i32 = 150; // "true class" and row names
const BOTTOM: i32 = 80; // column names and "predicted class"
const RIGHT: i32 = 30;

/// Draws `matrix` (`matrix[true_class][predicted_class]` = count) as a PNG at `out`.
/// Accepts `&[[u64; 10]]` as well as `&[Vec<u64>]`; any square size matching `class_names`.
pub fn write_confusion_matrix<R: AsRef<[u64]>>(
    matrix: &[R],
    class_names: &[&str],
    out: &Path,
) -> Result<Rendered, ReportError> {
    let n = matrix.len();
    if n == 0 {
        return Err(ReportError::Shape("empty matrix".into()));
    }
    if let Some((i, row)) = matrix.iter().enumerate().find(|(_, r)| r.as_ref().len() != n) {
        return Err(ReportError::Shape(format!("row {i} has {} entries, expected {n}", row.as_ref().len())));
    }
    if class_names.len() != n {
        return Err(ReportError::Shape(format!("{} class names for a {n}x{n} matrix", class_names.len())));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|source| ReportError::CreateDir { path: parent.to_path_buf(), source })?;
    }

    let mut rendered = Rendered::default();
    let status = font::font_status();
    rendered.warnings.extend(status.warning().map(str::to_string));

    draw(matrix, class_names, out, status.is_loaded())
        .map_err(|e| ReportError::Draw { path: out.to_path_buf(), message: e.to_string() })?;
    rendered.files.push(out.to_path_buf());
    Ok(rendered)
}

fn draw<R: AsRef<[u64]>>(
    matrix: &[R],
    names: &[&str],
    out: &Path,
    text: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let n = matrix.len() as i32;
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;

    let (w, h) = (SIZE.0 as i32, SIZE.1 as i32);
    let cell = ((w - LEFT - RIGHT) / n).min((h - TOP - BOTTOM) / n).max(1);
    let grid = cell * n;
    // Centre the grid in the space left by the labels.
    let x0 = LEFT + (w - LEFT - RIGHT - grid) / 2;
    let y0 = TOP + (h - TOP - BOTTOM - grid) / 2;

    let total: u64 = matrix.iter().flat_map(|r| r.as_ref()).sum();
    let correct: u64 = matrix.iter().enumerate().map(|(i, r)| r.as_ref()[i]).sum();

    for (i, row) in matrix.iter().enumerate() {
        let row = row.as_ref();
        let row_total: u64 = row.iter().sum();
        for (j, &count) in row.iter().enumerate() {
            // Shade by share of the true class, so rarer classes are as readable as common ones.
            // sqrt lifts the typical 1–5% confusions off white without washing out the diagonal.
            let share = if row_total == 0 { 0.0 } else { count as f64 / row_total as f64 };
            let shade = share.sqrt();
            let (cx, cy) = (x0 + j as i32 * cell, y0 + i as i32 * cell);
            root.draw(&Rectangle::new([(cx, cy), (cx + cell, cy + cell)], shade_colour(shade).filled()))?;
            root.draw(&Rectangle::new([(cx, cy), (cx + cell, cy + cell)], RGBColor(255, 255, 255).stroke_width(1)))?;
            if text {
                let colour = if shade > 0.6 { WHITE } else { BLACK };
                let style = text_style(fit_size(&root, &count.to_string(), cell, 16), true)
                    .color(&colour)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                root.draw_text(&count.to_string(), &style, (cx + cell / 2, cy + cell / 2))?;
            }
        }
    }
    // Outline the diagonal: the correct predictions are what the eye looks for first.
    for i in 0..n {
        let (c0, c1) = ((x0 + i * cell, y0 + i * cell), (x0 + (i + 1) * cell, y0 + (i + 1) * cell));
        root.draw(&Rectangle::new([c0, c1], RGBColor(40, 40, 40).stroke_width(2)))?;
    }

    if text {
        let title = if total > 0 {
            format!("Confusion matrix: {total} images, accuracy {:.2}%", correct as f64 * 100.0 / total as f64)
        } else {
            "Confusion matrix: no images".to_string()
        };
        let title_style = TextStyle::from((FAMILY, 26, FontStyle::Bold).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw_text(&title, &title_style, (w / 2, TOP / 2))?;

        for (k, name) in names.iter().enumerate() {
            let k = k as i32;
            // Row names right-aligned against the grid; column names centred under it, shrunk
            // to the cell width ("automobile" is wider than a 10-class cell at full size).
            let row_size = fit_size(&root, name, LEFT - 50, 15);
            let row_style = text_style(row_size, true).pos(Pos::new(HPos::Right, VPos::Center));
            root.draw_text(name, &row_style, (x0 - 8, y0 + k * cell + cell / 2))?;
            let col_size = fit_size(&root, name, cell - 4, 15);
            let col_style = text_style(col_size, true).pos(Pos::new(HPos::Center, VPos::Top));
            root.draw_text(name, &col_style, (x0 + k * cell + cell / 2, y0 + grid + 8))?;
        }
        let desc = text_style(18, true);
        let x_desc = desc.clone().pos(Pos::new(HPos::Center, VPos::Bottom));
        root.draw_text("predicted class", &x_desc, (x0 + grid / 2, h - 12))?;
        let y_desc = desc.transform(FontTransform::Rotate270).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw_text("true class", &y_desc, (12, y0 + grid / 2))?;
    }
    root.present()?;
    Ok(())
}

/// White (0) to dark blue (1).
fn shade_colour(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

/// The largest font size up to `max` at which `text` fits in `width` pixels (at least 8).
fn fit_size<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    width: i32,
    max: u32,
) -> u32 {
    (8..=max)
        .rev()
        .find(|&size| {
            area.estimate_text_size(text, &text_style(size, true)).map(|(tw, _)| tw as i32 <= width).unwrap_or(true)
        })
        .unwrap_or(8)
}
