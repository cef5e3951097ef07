//! Checkpoint uploads and the final checkpoint: which uploads a job takes (only its current,
//! running attempt's, at a position that attempt can have reached), what a stored or refused
//! upload changes, and why a job that trained to its end lacks its final checkpoint.

use super::{state_name, Effect, Job, Now, Transition};
use crate::state::error::CoordinatorError;
use cvdist_common::names;
use cvdist_common::proto::JobState;

/// A verified checkpoint of `attempt` was stored under `name`: the newest a recovery resumes
/// from, stored by a group of the current world size.
pub(super) fn stored(job: &mut Job, attempt: u32, name: String, t: &mut Transition) -> Result<(), CoordinatorError> {
    check_upload_attempt(job, attempt)?;
    job.info.latest_checkpoint = name;
    job.checkpoint_world_size = job.info.world_size;
    t.effects.push(Effect::Persist);
    Ok(())
}

/// An upload of the current attempt was refused: logged, and kept to explain a missing
/// final checkpoint. Ignored for another attempt or an ended job.
pub(super) fn refused(job: &mut Job, attempt: u32, name: String, reason: String, now: Now, t: &mut Transition) {
    if attempt == job.info.attempt && !job.state().is_terminal() {
        job.log(format!("checkpoint {name} refused: {reason}"), now, t);
        job.refused_upload = Some((name, reason));
    }
}

/// The name of the job's final checkpoint (the one after its last epoch).
pub fn final_checkpoint_name(job: &Job) -> String {
    names::checkpoint_name(job.spec.epochs, 0)
}

/// Why the job's final checkpoint is not stored, if not; `on_disk`: both its files exist.
pub(super) fn final_checkpoint_missing(job: &Job, on_disk: bool) -> Option<String> {
    let name = final_checkpoint_name(job);
    if job.info.latest_checkpoint == name && on_disk {
        return None;
    }
    let why = match (&job.refused_upload, job.final_checkpoint_error.as_str()) {
        (Some((refused, reason)), _) if *refused == name => format!("the coordinator refused it: {reason}"),
        (_, e) if !e.is_empty() => e.to_string(),
        (Some((refused, reason)), _) => {
            format!("rank 0 did not upload it; the last refused upload was {refused}: {reason}")
        }
        (None, _) => "rank 0 did not upload it".to_string(),
    };
    let newest =
        if job.info.latest_checkpoint.is_empty() { "none".to_string() } else { job.info.latest_checkpoint.clone() };
    Some(format!(
        "training finished but the final checkpoint {name} was not stored: {why}; newest stored checkpoint: {newest}"
    ))
}

fn refuse(job: &Job, why: String) -> CoordinatorError {
    CoordinatorError::CheckpointRefused { job_id: job.info.id.clone(), why }
}

/// A checkpoint upload must be for the job's current attempt, while it runs.
pub fn check_upload_attempt(job: &Job, attempt: u32) -> Result<(), CoordinatorError> {
    if job.state() != JobState::Running || attempt != job.info.attempt {
        return Err(refuse(
            job,
            format!(
                "the job is {} on attempt {}, the upload is for attempt {attempt}",
                state_name(job.state()),
                job.info.attempt
            ),
        ));
    }
    Ok(())
}

/// A checkpoint at `pos` (epoch, step) must be one the current attempt can have reached:
/// after where it started and after the newest stored checkpoint, within the job's epochs,
/// and at most `slack` epochs past what its ranks reported.
pub fn check_upload_position(job: &Job, attempt: u32, pos: (u32, u64), slack: u32) -> Result<(), CoordinatorError> {
    let spec = &job.spec;
    let newest = job.stored_position();
    let shown = names::checkpoint_name(pos.0, pos.1);
    if pos <= job.attempt_start || pos <= newest {
        return Err(refuse(
            job,
            format!(
                "{shown} is not after where attempt {attempt} started ({}) and the newest checkpoint ({})",
                names::checkpoint_name(job.attempt_start.0, job.attempt_start.1),
                if job.info.latest_checkpoint.is_empty() { "none" } else { &job.info.latest_checkpoint }
            ),
        ));
    }
    let reached = job.attempt_reached.max(job.attempt_start.0);
    if pos.0 > spec.epochs || (pos.0 == spec.epochs && pos.1 > 0) || pos.0 > reached + slack {
        return Err(refuse(
            job,
            format!(
                "{shown} does not follow from the attempt's progress (started at epoch {}, reported epoch {reached}, {} epochs)",
                job.attempt_start.0, spec.epochs
            ),
        ));
    }
    Ok(())
}
