//! `cvdist train`: the bare trainer in this process, without a coordinator, writing a run
//! directory (job.json, metrics.jsonl, summary.json, checkpoints/) as a coordinator job
//! would.

use super::{RunFailed, TrainArgs};
use anyhow::Context;
use cvdist_common::proto::{EpochMetrics, JobSpec, Progress};
use cvdist_common::run_dir;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::collective::Solo;
use crate::data::Datasets;
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::{self, Observer, TrainerConfig};
use cvdist_common::tensorboard;

/// Progress bar and run-directory writer for the bare trainer.
struct LocalObserver {
    bar: ProgressBar,
    out: PathBuf,
    history: Vec<EpochMetrics>,
    epochs: u32,
    tensorboard: Option<tensorboard::EventWriter>,
}

impl Observer for LocalObserver {
    fn progress(&mut self, p: &Progress) {
        self.bar.set_length(p.steps_per_epoch);
        self.bar.set_position(p.step);
        self.bar.set_message(format!(
            "epoch {}/{} loss {:.4} acc {:.2}% {:.0} img/s",
            p.epoch + 1,
            self.epochs,
            p.loss,
            p.acc * 100.0,
            p.images_per_sec
        ));
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        self.bar.println(cvdist_common::term::epoch_line(m, self.epochs));
        self.history.retain(|h| h.epoch < m.epoch);
        self.history.push(*m);
        if let Err(e) = run_dir::write_metrics(&self.out, &self.history) {
            self.bar.println(format!("warning: {e}"));
        }
        if let Some(tb) = &mut self.tensorboard {
            if let Err(e) = tb.epoch(m) {
                self.bar.println(format!("warning: TensorBoard {}: {e}", tb.path().display()));
            }
        }
    }

    fn checkpoint(&mut self, json: &Path, _state: &CheckpointState) {
        tracing::debug!(checkpoint = %json.display(), "checkpoint written");
    }
}

pub(super) fn run(a: TrainArgs) -> anyhow::Result<()> {
    let device = crate::device::for_request(a.device)?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    let s = JobSpec::try_from(&a.training)?;
    let data = Datasets::for_spec(&s, a.data.as_deref()).map_err(train::TrainError::from)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    run_dir::write_job(&a.out, &s)?;
    // Resuming into the same directory keeps the epochs already recorded.
    let history = if a.resume.is_some() { run_dir::read_metrics(&a.out).unwrap_or_default() } else { Vec::new() };
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("[{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let tensorboard = match &a.tensorboard {
        Some(dir) => Some(
            tensorboard::EventWriter::create(dir)
                .with_context(|| format!("creating TensorBoard events in {}", dir.display()))?,
        ),
        None => None,
    };
    let mut observer = LocalObserver { bar, out: a.out.clone(), history, epochs: s.epochs, tensorboard };
    let cfg = TrainerConfig {
        spec: s.clone(),
        device,
        rank: 0,
        world_size: 1,
        checkpoint_dir: Some(a.out.join(run_dir::CHECKPOINT_DIR)),
        resume: a.resume,
        progress_interval: Duration::from_millis(500),
        freeze_bn: false,
    };
    let started = std::time::Instant::now();
    let result = train::train(&cfg, &data, &mut Solo::new(), &mut observer);
    observer.bar.finish_and_clear();
    let mut summary = run_dir::Summary::from_history(&observer.history);
    summary.model = s.model.clone();
    // A failed run (a diverged one above all) says so in its summary, so that nothing that
    // reads the run directory mistakes it for a result; the error also ends the process
    // with a non-zero status.
    match &result {
        Ok(outcome) => {
            summary.wall_seconds = outcome.wall_seconds;
            let final_name = checkpoint::name_for(s.epochs, 0);
            let final_json = cfg.checkpoint_dir.as_ref().map(|d| d.join(format!("{final_name}.json")));
            // Trained to the end is not enough: without its final checkpoint the run has no model.
            let missing = match (&outcome.final_checkpoint_error, &final_json) {
                (Some(e), _) => Some(e.clone()),
                (None, Some(p)) if !p.is_file() => Some(format!("{} does not exist", p.display())),
                _ => None,
            };
            if let Some(why) = missing {
                summary.state = "failed".into();
                summary.outcome = run_dir::outcome::FINAL_CHECKPOINT_MISSING.into();
                summary.message =
                    format!("training finished but the final checkpoint {final_name} was not written: {why}");
                run_dir::write_summary(&a.out, &summary)?;
                return Err(RunFailed(format!("{}; run directory {}", summary.message, a.out.display())).into());
            }
            summary.state = "succeeded".into();
            summary.outcome = "succeeded".into();
        }
        Err(e) => {
            summary.state = "failed".into();
            summary.outcome = run_dir::outcome::of_failure(e.failure_kind()).into();
            summary.message = e.to_string();
            summary.wall_seconds = started.elapsed().as_secs_f64();
        }
    }
    run_dir::write_summary(&a.out, &summary)?;
    result?;
    println!(
        "{}: final test accuracy {:.2}%, best {:.2}%, {:.1}s per epoch, run directory {}",
        s.model,
        summary.final_test_acc * 100.0,
        summary.best_test_acc * 100.0,
        summary.mean_epoch_seconds,
        a.out.display()
    );
    Ok(())
}
