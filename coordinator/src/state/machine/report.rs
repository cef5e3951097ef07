//! What a rank's report does to its job: progress and epoch metrics move the attempt's
//! position on, rank 0's `Resumed` says where a live recovery continues, `Finished` from
//! every rank ends the job, and a failure ends the attempt or the job.

use super::ending::{fail_attempt, fail_job, release_members};
use super::recovery::{end_recovery, first_step_check, resumed_live};
use super::upload::final_checkpoint_missing;
use super::{readopt, Effect, Job, Now, Transition, NOT_RESTARTED};
use crate::state::error::CoordinatorError;
use cvdist_common::proto::job_report::Kind;
use cvdist_common::proto::{job_event, EpochMetrics, FailureKind, Finished, JobReport, JobState};
use cvdist_common::run_dir::outcome;
use cvdist_common::text;

/// A report from `worker`, whose session is the current one. Reports from an aborted
/// attempt change nothing, except a permanent failure of the attempt that just failed.
pub(super) fn on_report(
    job: &mut Job,
    worker: &str,
    report: JobReport,
    final_on_disk: bool,
    now: Now,
    t: &mut Transition,
) -> Result<(), CoordinatorError> {
    if job.state().is_terminal() {
        return Err(CoordinatorError::ReportAfterEnd(report.job_id));
    }
    let failure_kind = FailureKind::try_from(report.failure_kind).unwrap_or(FailureKind::Unspecified);
    if late_permanent_failure(job, worker, &report, failure_kind, now, t) {
        return Ok(());
    }
    // Reports from an aborted attempt arrive late; they must not touch the new one.
    if report.attempt != job.info.attempt || job.members.get(report.rank as usize).map(String::as_str) != Some(worker) {
        return Ok(());
    }
    let epochs = job.spec.epochs;
    let epoch_ok = |epoch: u32, what: &'static str| {
        if epoch < epochs {
            Ok(())
        } else {
            Err(CoordinatorError::EpochOutOfRange { what, epoch, job: job.info.id.clone(), epochs })
        }
    };
    match &report.kind {
        Some(Kind::Progress(p)) => epoch_ok(p.epoch, "progress report")?,
        Some(Kind::Epoch(m)) => epoch_ok(m.epoch, "epoch report")?,
        _ => {}
    }
    match report.kind {
        Some(Kind::Progress(p)) => {
            job.attempt_reached = job.attempt_reached.max(p.epoch);
            job.attempt_position = job.attempt_position.max((p.epoch, p.step));
            job.info.progress = Some(p);
            t.effects.push(Effect::Publish(job_event::Event::Progress(p)));
            first_step_check(job, now, t);
        }
        Some(Kind::Resumed(r)) => {
            if report.rank == 0 && r.live {
                resumed_live(job, &r, now, t);
            }
        }
        Some(Kind::Epoch(m)) => on_epoch(job, m, now, t),
        Some(Kind::Finished(f)) => on_finished(job, report.rank, &f, final_on_disk, now, t),
        Some(Kind::Failed(why)) => on_failed(job, worker, report.rank, &why, failure_kind, now, t),
        None => return Err(CoordinatorError::EmptyReport),
    }
    Ok(())
}

/// A rank whose failure would repeat (it diverged, say) can report after its peers, whose
/// rings broke because it stopped, already ended the attempt as retryable: while the group
/// is still waiting to be re-formed, its reason replaces theirs and the job fails
/// (RECOVERING → FAILED). Returns whether the report was that.
fn late_permanent_failure(
    job: &mut Job,
    worker: &str,
    report: &JobReport,
    failure_kind: FailureKind,
    now: Now,
    t: &mut Transition,
) -> bool {
    let Some(Kind::Failed(text)) = &report.kind else { return false };
    let same_attempt = job.failed_attempt.as_ref().is_some_and(|(attempt, members)| {
        *attempt == report.attempt && members.get(report.rank as usize).map(String::as_str) == Some(worker)
    });
    if !(outcome::is_permanent(failure_kind) && job.state() == JobState::Recovering && same_attempt) {
        return false;
    }
    // The restart being prepared does not happen.
    job.info.restarts = job.info.restarts.saturating_sub(1);
    job.info.attempt = report.attempt;
    job.recoveries().withdraw(report.attempt);
    let reason = format!("rank {} on {worker} failed: {text}; {NOT_RESTARTED}", report.rank);
    fail_job(job, reason, outcome::of_failure(failure_kind), now, t);
    t.effects.push(Effect::Wake);
    true
}

/// An epoch's metrics: recorded once per attempt, replacing an earlier attempt's record of
/// the same epoch.
fn on_epoch(job: &mut Job, mut m: EpochMetrics, now: Now, t: &mut Transition) {
    // A re-registered worker sends its epoch reports again: an
    // attempt reports each epoch once, so one already recorded is a copy.
    if job.info.history.iter().any(|h| h.epoch == m.epoch && h.attempt == job.info.attempt) {
        return;
    }
    job.attempt_reached = job.attempt_reached.max(m.epoch + 1);
    job.attempt_position = job.attempt_position.max((m.epoch + 1, 0));
    first_step_check(job, now, t);
    m.attempt = job.info.attempt;
    // After a restart an epoch may be trained again; the newer record replaces it.
    job.info.history.retain(|h| h.epoch < m.epoch);
    job.info.history.push(m);
    t.effects.push(Effect::WriteMetrics);
    t.effects.push(Effect::Persist);
    t.effects.push(Effect::Publish(job_event::Event::Epoch(m)));
}

/// `rank` trained to the end. Once every rank has, RUNNING → SUCCEEDED if the final
/// checkpoint is stored, else → FAILED.
fn on_finished(job: &mut Job, rank: u32, f: &Finished, final_on_disk: bool, now: Now, t: &mut Transition) {
    job.finished.insert(rank);
    if rank == 0 {
        job.final_checkpoint_error = f.final_checkpoint_error.clone();
    }
    if job.finished.len() != job.members.len() {
        return;
    }
    release_members(job, "", t);
    // Trained to the end is not success until the final model is stored.
    if let Some(why) = final_checkpoint_missing(job, final_on_disk) {
        fail_job(job, why, outcome::FINAL_CHECKPOINT_MISSING, now, t);
    } else {
        end_recovery(job, now, t);
        job.info.set_state(JobState::Succeeded);
        job.info.finished_unix = now.unix;
        // From the recorded history: a group that resumed from the final
        // checkpoint trains nothing and reports no accuracy of its own.
        let acc = job.info.history.last().map(|m| m.test_acc).unwrap_or(f.final_test_acc);
        job.info.message = format!("final test accuracy {:.2}%", acc * 100.0);
        job.info.outcome = "succeeded".into();
        job.log(format!("succeeded: {}", job.info.message), now, t);
        t.effects.push(Effect::Finish);
    }
    t.effects.push(Effect::Wake);
}

/// `rank` of the current attempt failed: the job fails when a restart would fail the same
/// way, the attempt fails (and the job recovers) otherwise.
fn on_failed(
    job: &mut Job,
    worker: &str,
    rank: u32,
    why: &str,
    failure_kind: FailureKind,
    now: Now,
    t: &mut Transition,
) {
    let why = text::bound(why, text::MAX_REPORT_TEXT);
    let reason = format!("rank {rank} on {worker} failed: {why}");
    if outcome::is_permanent(failure_kind) {
        // Divergence from a deterministic state, a configuration the workers
        // cannot run, bad data: a restart would fail the same way, so the job
        // fails now (RUNNING → FAILED), with this reason, and its restart budget
        // stays unused.
        release_members(job, &reason, t);
        fail_job(job, format!("{reason}; {NOT_RESTARTED}"), outcome::of_failure(failure_kind), now, t);
    } else if job.readopting().is_some() {
        readopt::member_failed(job, &reason, now, t);
    } else {
        let attempt = job.info.attempt;
        fail_attempt(job, attempt, reason, now, t);
    }
    t.effects.push(Effect::Wake);
}
