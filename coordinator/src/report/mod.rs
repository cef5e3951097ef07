//! Results people can look at: charts and a summary table for one or more run directories
//! (see `cvdist_common::run_dir` for the layout), and a confusion-matrix heatmap for `cvdist eval`.
//!
//! Modules, one concept each:
//! - `font`: finding a font at runtime for chart text, and what happens without one;
//! - `chart`: per-epoch line charts (loss, accuracy, learning rate, throughput), runs overlaid;
//! - `confusion`: the confusion-matrix heatmap;
//! - `table`: the aligned text summary table.
//!
//! Epochs are shown 1-based everywhere in the report ("epoch 1" is the first epoch), while
//! `metrics.jsonl` and `summary.json` store them 0-based.

mod chart;
mod confusion;
mod font;
mod table;

pub use chart::{series_colour, write_charts, write_charts_with, ChartOptions};
pub use confusion::write_confusion_matrix;
pub use font::{font_status, FontStatus, FONT_ENV};
pub use table::summary_table;

use cvdist_common::proto::{EpochMetrics, JobSpec};
use cvdist_common::run_dir::{self, RunDirError, Summary};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("run directory {path} does not exist or is not a directory")]
    NotARunDir { path: PathBuf },
    /// Reading metrics.jsonl, summary.json or job.json; the message names the file and line.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("no runs to chart")]
    NoRuns,
    #[error("cannot create output directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("confusion matrix: {0}")]
    Shape(String),
}

/// What a render produced: the files written, and anything the user should know about them
/// (e.g. `$CVDIST_FONT` could not be used, so the built-in font was).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    pub files: Vec<PathBuf>,
    pub warnings: Vec<String>,
}

/// One run directory, loaded.
#[derive(Debug, Clone)]
pub struct Run {
    /// How the run is named in legends and tables: the job name, else model and directory name.
    pub label: String,
    pub dir: PathBuf,
    /// As stored, in file order (may repeat an epoch after a restart; see [`Run::epochs`]).
    pub metrics: Vec<EpochMetrics>,
    /// Absent while the run is still going (summary.json is written at the end).
    pub summary: Option<Summary>,
    /// Absent for run directories written without a job.json.
    pub job: Option<JobSpec>,
}

impl Run {
    /// One record per epoch in epoch order, the latest record winning: after a restart an
    /// epoch can be recorded again, and the rerun is the one that counts.
    pub fn epochs(&self) -> Vec<&EpochMetrics> {
        let mut by_epoch = BTreeMap::new();
        for m in &self.metrics {
            by_epoch.insert(m.epoch, m);
        }
        by_epoch.into_values().collect()
    }

    /// The model name from job.json, else from summary.json.
    pub fn model(&self) -> Option<&str> {
        let from_job = self.job.as_ref().map(|j| j.model.as_str());
        let from_summary = self.summary.as_ref().map(|s| s.model.as_str());
        from_job.into_iter().chain(from_summary).find(|m| !m.is_empty())
    }

    fn dir_name(&self) -> String {
        dir_name(&self.dir)
    }
}

/// Loads a run directory. metrics.jsonl is required (nothing to show without it); summary.json
/// and job.json are optional, but a corrupt one is an error rather than silently ignored.
pub fn load_run(dir: &Path) -> Result<Run, ReportError> {
    if !dir.is_dir() {
        return Err(ReportError::NotARunDir { path: dir.to_path_buf() });
    }
    let metrics = run_dir::read_metrics(dir)?;
    let summary = match dir.join(run_dir::SUMMARY_FILE).exists() {
        true => Some(run_dir::read_summary(dir)?),
        false => None,
    };
    let job = read_job(dir)?;
    let mut run = Run { label: String::new(), dir: dir.to_path_buf(), metrics, summary, job };
    run.label = match run.job.as_ref().map(|j| j.name.trim()).filter(|n| !n.is_empty()) {
        Some(name) => name.to_string(),
        None => match run.model() {
            Some(model) => format!("{model} ({})", run.dir_name()),
            None => run.dir_name(),
        },
    };
    Ok(run)
}

fn read_job(dir: &Path) -> Result<Option<JobSpec>, RunDirError> {
    let path = dir.join(run_dir::JOB_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| RunDirError::Read { path: path.clone(), source })?;
    serde_json::from_str(&text).map(Some).map_err(|source| {
        let line = source.line();
        RunDirError::Parse { path, line, source }
    })
}

/// The last component of the directory, resolving "." and ".." so a run given as `.` still
/// gets a meaningful name.
fn dir_name(dir: &Path) -> String {
    let resolved = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    resolved.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

/// Labels to show for `runs`, made unique: two runs with the same job name get their
/// directory names appended, and a counter if even those clash, so legends stay unambiguous.
pub(crate) fn display_labels(runs: &[Run]) -> Vec<String> {
    let count = |labels: &[String], l: &String| labels.iter().filter(|x| *x == l).count();
    let base: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    let with_dir: Vec<String> = runs
        .iter()
        .zip(&base)
        .map(|(r, l)| if count(&base, l) > 1 { format!("{l} [{}]", r.dir_name()) } else { l.clone() })
        .collect();
    with_dir
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if count(&with_dir, l) > 1 {
                let nth = with_dir[..=i].iter().filter(|x| *x == l).count();
                format!("{l} #{nth}")
            } else {
                l.clone()
            }
        })
        .collect()
}
