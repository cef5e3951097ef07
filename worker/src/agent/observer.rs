//! The trainer's observer for a job run by a worker: reports go to the coordinator, and
//! checkpoints are uploaded to it.

use super::control::JobControl;
use super::env::JobEnv;
use super::link;
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::ckpt_writer::CheckpointStore;
use crate::train::Observer;
use cvdist_common::proto::{
    job_report, worker_message, Assignment, EpochMetrics, FailureKind, JobReport, Progress, WorkerMessage,
};
use std::path::Path;
use tracing::{info, warn};

/// Sends a report about assignment `a` to the coordinator, through the session that holds
/// the job (or, while none does, to wait for one).
pub(super) fn send_report(env: &JobEnv, a: &Assignment, kind: job_report::Kind, failure_kind: FailureKind) {
    let report = JobReport {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        kind: Some(kind),
        failure_kind: failure_kind as i32,
    };
    let _ = env.outbox.send(WorkerMessage { msg: Some(worker_message::Msg::Report(report)) });
}

/// Reports a job's progress and epochs to the coordinator and uploads its checkpoints.
pub(super) struct ReportingObserver<'a> {
    assignment: &'a Assignment,
    env: &'a JobEnv,
    control: JobControl,
    /// The newest checkpoint the coordinator confirmed it stored, and why the newest
    /// upload failed (cleared by a later success).
    pub confirmed: Option<String>,
    pub upload_error: Option<(String, String)>,
}

impl<'a> ReportingObserver<'a> {
    pub fn new(assignment: &'a Assignment, env: &'a JobEnv, control: JobControl) -> ReportingObserver<'a> {
        ReportingObserver { assignment, env, control, confirmed: None, upload_error: None }
    }

    pub fn send(&self, kind: job_report::Kind) {
        self.send_with(kind, FailureKind::Unspecified);
    }

    pub fn send_with(&self, kind: job_report::Kind, failure_kind: FailureKind) {
        send_report(self.env, self.assignment, kind, failure_kind);
    }
}

impl Observer for ReportingObserver<'_> {
    fn progress(&mut self, p: &Progress) {
        self.send(job_report::Kind::Progress(*p));
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        if self.assignment.rank == 0 {
            self.send(job_report::Kind::Epoch(*m));
        }
    }

    /// The upload runs on the checkpoint writer thread, off the training thread, so the
    /// other ranks do not wait at the next all-reduce while rank 0 uploads. A stop cuts it
    /// short.
    fn checkpoint_store(&mut self) -> Option<CheckpointStore> {
        let link = self.env.link.clone();
        let runtime = self.env.runtime.clone();
        let control = self.control.clone();
        let (job_id, attempt) = (self.assignment.job_id.clone(), self.assignment.attempt);
        let epochs = self.assignment.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
        Some(Box::new(move |json: &Path, state: &CheckpointState| {
            let is_final = (state.epoch, state.step) == (epochs, 0);
            link::upload_checkpoint(&link, &control, &runtime, &job_id, attempt, json, state, is_final)?;
            // Only what the coordinator holds (this one) or has superseded (anything
            // older) may go; a local copy is the only copy until then.
            let name = state.name();
            if let Some(dir) = json.parent() {
                for old in checkpoint::list(dir) {
                    let older = old.file_stem().is_some_and(|s| s.to_string_lossy().as_ref() < name.as_str());
                    if older {
                        let _ = std::fs::remove_file(old.with_extension("safetensors"));
                        let _ = std::fs::remove_file(&old);
                    }
                }
            }
            Ok(())
        }))
    }

    fn checkpoint_stored(&mut self, name: &str, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                info!(checkpoint = %name, "checkpoint uploaded");
                self.confirmed = Some(name.to_string());
                self.upload_error = None;
            }
            // The job can go on; a restart would resume from an older checkpoint. The local
            // copy stays.
            Err(e) => {
                warn!(checkpoint = %name, error = %e, "checkpoint upload failed");
                self.upload_error = Some((name.to_string(), e.clone()));
            }
        }
    }

    fn should_stop(&mut self) -> Option<String> {
        self.control.stop.lock().ok().and_then(|s| s.clone())
    }
}
