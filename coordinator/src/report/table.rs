//! The text summary table: one row per run, columns aligned for a terminal.

use super::{display_labels, Run};

const HEADER: [&str; 8] =
    ["run", "model", "workers", "epochs", "final test acc", "best test acc (epoch)", "mean s/epoch", "restarts"];
/// Text columns read best left-aligned, numbers right-aligned so their digits line up.
const RIGHT_ALIGNED: [bool; 8] = [false, false, true, true, true, true, true, true];

/// Aligned text table, one row per run. Figures come from metrics.jsonl (it is there even while
/// a run is going); restarts from summary.json when present. "-" marks what is not known.
pub fn summary_table(runs: &[Run]) -> String {
    let labels = display_labels(runs);
    let rows: Vec<[String; 8]> = runs.iter().zip(labels.clone()).map(|(run, label)| row(run, label)).collect();

    let mut widths = HEADER.map(|h| h.chars().count());
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (k, cell) in cells.iter().enumerate() {
            let pad = " ".repeat(widths[k] - cell.chars().count());
            if k > 0 {
                s.push_str("  ");
            }
            if RIGHT_ALIGNED[k] {
                s.push_str(&pad);
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&pad);
            }
        }
        s.trim_end().to_string()
    };

    let mut out = line(&HEADER.map(String::from));
    out.push('\n');
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    // A failed run's figures are not results (a diverged one's loss is NaN): say so below
    // the table, with the outcome and reason from summary.json.
    for (run, label) in runs.iter().zip(labels) {
        if let Some(s) = run.summary.as_ref().filter(|s| s.state == "failed") {
            let why =
                if s.outcome.is_empty() || s.outcome == s.state { String::new() } else { format!(" ({})", s.outcome) };
            out.push_str(&format!("{label}: FAILED{why}: {}\n", s.message));
        }
    }
    out
}

fn row(run: &Run, label: String) -> [String; 8] {
    let epochs = run.epochs();
    let dash = || "-".to_string();
    let pct = |acc: f64| format!("{:.2}%", acc * 100.0);

    let model = run.model().map(str::to_string).unwrap_or_else(dash);

    // World size can change between epochs (elastic restarts); show the range if it did.
    let sizes = epochs.iter().map(|m| m.world_size).filter(|&w| w > 0);
    let workers = match (sizes.clone().min(), sizes.max()) {
        (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
        (Some(lo), Some(hi)) => format!("{lo}-{hi}"),
        _ => match run.summary.as_ref().map(|s| s.world_size).filter(|&w| w > 0) {
            Some(w) => w.to_string(),
            None => dash(),
        },
    };

    // "7/30" while a run is short of its planned epochs, so unfinished runs stand out.
    let planned = run.job.as_ref().map(|j| j.epochs).unwrap_or(0);
    let epochs_col =
        if planned as usize > epochs.len() { format!("{}/{planned}", epochs.len()) } else { epochs.len().to_string() };

    let final_acc = epochs.last().map(|m| pct(m.test_acc)).unwrap_or_else(dash);
    // NaN accuracies (never expected, but a diverged run can produce them) must not win.
    let best = epochs
        .iter()
        .filter(|m| m.test_acc.is_finite())
        .max_by(|a, b| a.test_acc.total_cmp(&b.test_acc).then(b.epoch.cmp(&a.epoch)));
    let best_col = best.map(|m| format!("{} ({})", pct(m.test_acc), m.epoch + 1)).unwrap_or_else(dash);

    let mean = if epochs.is_empty() {
        dash()
    } else {
        format!("{:.1}", epochs.iter().map(|m| m.seconds).sum::<f64>() / epochs.len() as f64)
    };

    // Each epoch records the restart count it ran under, so without a summary (a run still
    // going) the highest attempt is the number of restarts so far.
    let restarts = match &run.summary {
        Some(s) => s.restarts.to_string(),
        None => epochs.iter().map(|m| m.attempt).max().map(|a| a.to_string()).unwrap_or_else(dash),
    };

    [label, model, workers, epochs_col, final_acc, best_col, mean, restarts]
}
