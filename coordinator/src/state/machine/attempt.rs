//! Starting an attempt: a waiting job (QUEUED, or RECOVERING after its grace period) forms a
//! group from the idle workers, and a RUNNING job below its maximum grows into a new attempt
//! from its members' in-memory state.

use super::ending::{fail_job, leave_attempt};
use super::recovery::resume_recovery;
use super::{Effect, IdleWorker, Job, Now, Transition};
use cvdist_common::proto::{Assignment, JobState, Peer};
use cvdist_common::run_dir::outcome;
use cvdist_common::spec;
use std::time::Duration;

/// QUEUED or RECOVERING: starts an attempt when enough workers are idle, or fails the job
/// when its rendezvous times out or the world size cannot shard its data.
pub(super) fn schedule(job: &mut Job, idle: &[IdleWorker], secret: String, now: Now, t: &mut Transition) {
    if !matches!(job.state(), JobState::Queued | JobState::Recovering) || now.instant < job.not_before {
        return;
    }
    let spec = &job.spec;
    // With a global batch only the sizes that divide it: the largest such with the idle workers.
    let Some(n) = spec::world_size_for(spec, idle.len() as u32).map(|n| n as usize) else {
        let limit = spec.rendezvous_timeout_s;
        if limit > 0 && now.instant.saturating_duration_since(job.waiting_since) > Duration::from_secs(limit as u64) {
            // The smallest group the job runs on: its minimum, or with a global batch
            // the smallest size at or above it that divides the batch.
            let needed = spec::allowed_world_sizes(spec).first().copied().unwrap_or(spec.min_workers);
            let msg =
                format!("rendezvous timed out after {limit}s: {} of at least {needed} workers available", idle.len());
            fail_job(job, msg, outcome::FAILED, now, t);
        }
        // First come, first served: later jobs wait behind this one.
        t.holds_queue = true;
        return;
    };
    if let Err(e) = spec::check_shard(spec, n as u32) {
        fail_job(job, e.to_string(), outcome::CONFIGURATION, now, t);
        return;
    }
    start_attempt(job, &idle[..n], secret, now, t);
}

/// Whether a RUNNING job would take more workers now: it runs on fewer
/// than its maximum, is not being re-adopted, and its attempt has completed a step past its
/// start (a group that just formed trains before it is re-formed again, so workers that
/// register one after another do not stop it at every registration).
pub fn wants_growth(job: &Job) -> bool {
    job.state() == JobState::Running
        && job.readopt.is_none()
        && spec::allowed_world_sizes(&job.spec).last().is_some_and(|&most| job.members.len() < most as usize)
        && job.attempt_position > job.attempt_start
}

/// RUNNING on fewer than its maximum workers, with idle workers → a new attempt on
/// `members` (the current ones, rank order kept) plus as many `idle` workers as the job
/// takes, continuing from the members' in-memory state: the
/// members are told to stop (each at a step boundary, keeping the state of its last complete
/// step) and the assignments name the attempt they leave as the live one. No step is
/// trained again and no restart is counted; the rest of the epoch is re-sharded over the new
/// world size (worker/src/train/position.rs) and `--scale-lr` scales by it from the next
/// step. Nothing happens when the grown size would not shard the data.
pub(super) fn grow(
    job: &mut Job,
    members: &[IdleWorker],
    idle: &[IdleWorker],
    secret: String,
    now: Now,
    t: &mut Transition,
) {
    if !wants_growth(job) || idle.is_empty() || members.len() != job.members.len() {
        return;
    }
    let current = members.len();
    let Some(n) = spec::world_size_for(&job.spec, (current + idle.len()) as u32).map(|n| n as usize) else {
        return;
    };
    if n <= current || spec::check_shard(&job.spec, n as u32).is_err() {
        return;
    }
    let scale_lr = job.spec.scale_lr;
    let batch = |n: usize| {
        let per_rank = spec::per_rank_batch(&job.spec, n as u32);
        (n as u64 * u64::from(per_rank), per_rank)
    };
    let ((global, per_rank), (old_global, old_per_rank)) = (batch(n), batch(current));
    let reason = format!("growing from {current} to {n} workers");
    leave_attempt(job, &reason, t);
    let (epoch, step) = job.attempt_position;
    let lr = if scale_lr {
        format!("; the learning rate is scaled by {n} instead of {current} from here (--scale-lr)")
    } else {
        String::new()
    };
    let batch = if job.spec.global_batch > 0 {
        format!("global batch {global} kept ({per_rank} per worker instead of {old_per_rank})")
    } else {
        format!("global batch {global} instead of {old_global}")
    };
    job.log(
        format!(
            "{reason} ({} idle): attempt {} continues from the members' live state after epoch {epoch} step {step}, \
             {batch}{lr}",
            idle.len(),
            job.info.attempt,
        ),
        now,
        t,
    );
    let mut group = members.to_vec();
    group.extend_from_slice(&idle[..n - current]);
    start_attempt(job, &group, secret, now, t);
}

/// Assigns ranks 0..N-1 to `members` in order and starts the job's current attempt on them,
/// from the newest checkpoint or, in a recovery or growth, from the state of the attempt
/// that ended (`failed_attempt`).
fn start_attempt(job: &mut Job, members: &[IdleWorker], secret: String, now: Now, t: &mut Transition) {
    let spec = &job.spec;
    let attempt = job.info.attempt;
    let (start_epoch, start_step) = job.stored_position();
    let live_attempt = job.failed_attempt.as_ref().map(|(a, _)| *a);
    let live_max_epoch = job.info.history.last().map_or(0, |m| m.epoch + 1);
    let peers: Vec<Peer> = members
        .iter()
        .enumerate()
        .map(|(rank, w)| Peer { rank: rank as u32, worker_id: w.id.clone(), data_addr: w.data_addr.clone() })
        .collect();
    for (rank, w) in members.iter().enumerate() {
        let assignment = Assignment {
            job_id: job.info.id.clone(),
            attempt,
            rank: rank as u32,
            world_size: members.len() as u32,
            peers: peers.clone(),
            spec: Some(spec.clone()),
            start_epoch,
            start_step,
            checkpoint: job.info.latest_checkpoint.clone(),
            session_secret: secret.clone(),
            // A recovery: survivors of the failed attempt hold its state in memory;
            // the checkpoint is the fallback when none of them is in the group.
            live: live_attempt.is_some(),
            live_attempt: live_attempt.unwrap_or(0),
            live_max_epoch,
        };
        t.effects.push(Effect::Assign { worker: w.id.clone(), assignment });
    }
    let ids: Vec<String> = members.iter().map(|w| w.id.clone()).collect();
    job.members = ids.clone();
    job.finished.clear();
    job.failed_attempt = None;
    job.refused_upload = None;
    job.final_checkpoint_error.clear();
    job.attempt_start = (start_epoch, start_step);
    job.attempt_reached = start_epoch;
    job.attempt_position = (start_epoch, start_step);
    resume_recovery(job, ids.len() as u32, (start_epoch, start_step));
    job.info.set_state(JobState::Running);
    job.info.world_size = ids.len() as u32;
    job.info.worker_ids = ids.clone();
    if job.info.started_unix == 0.0 {
        job.info.started_unix = now.unix;
    }
    let from = if job.info.latest_checkpoint.is_empty() {
        "from scratch".to_string()
    } else {
        format!("from {}", job.info.latest_checkpoint)
    };
    job.log(format!("attempt {attempt} started on {} workers ({}) {from}", ids.len(), ids.join(", ")), now, t);
    t.effects.push(Effect::Persist);
    t.effects.push(Effect::PublishSnapshot);
}
