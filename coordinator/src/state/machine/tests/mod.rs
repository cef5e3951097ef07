//! Every edge of the job state diagram (`machine/mod.rs`), and the events a job ignores or
//! refuses in each state, one file per concept of the machine; the fixtures here build jobs
//! the way the coordinator does, through [`step`].

use super::*;
use crate::state::error::CoordinatorError;
use cvdist_common::proto::job_report::Kind;
use cvdist_common::proto::{EpochMetrics, FailureKind, Finished, Progress, Resumed};
use cvdist_common::run_dir::outcome;
use cvdist_common::spec;

mod attempt;
mod ended;
mod ending;
mod readopt;
mod recovery;
mod report;
mod upload;

const ID: &str = "j0001-resnet20";

fn now() -> Now {
    Now::current()
}

fn later(now: Now, by: Duration) -> Now {
    Now { instant: now.instant + by, unix: now.unix + by.as_secs_f64() }
}

fn spec(min: u32, max: u32) -> JobSpec {
    JobSpec { min_workers: min, max_workers: max, ..spec::default_spec("resnet20", 2) }
}

fn queued(spec: JobSpec) -> Job {
    Job::submitted(ID.into(), spec, now()).0
}

fn idle(n: usize) -> Vec<IdleWorker> {
    (0..n).map(|i| IdleWorker { id: format!("w{i}"), data_addr: format!("127.0.0.1:{}", 40000 + i) }).collect()
}

fn schedule(job: &mut Job, workers: &[IdleWorker], at: Now) -> Transition {
    step(job, Event::Schedule { idle: workers, secret: "s".into() }, at).expect("scheduling is never refused")
}

/// A job RUNNING on w0, w1 in attempt 0.
fn running() -> Job {
    let mut job = queued(spec(2, 2));
    schedule(&mut job, &idle(2), now());
    assert_eq!(job.state(), JobState::Running);
    job
}

fn report(job: &mut Job, worker: &str, rank: u32, kind: Kind, on_disk: bool) -> Transition {
    report_kind(job, worker, rank, kind, FailureKind::Unspecified, on_disk).expect("report accepted")
}

fn report_kind(
    job: &mut Job,
    worker: &str,
    rank: u32,
    kind: Kind,
    failure: FailureKind,
    on_disk: bool,
) -> Result<Transition, CoordinatorError> {
    let report = job_report(job, job.info.attempt, rank, kind, failure);
    step(job, Event::Report { worker, report, final_checkpoint_on_disk: on_disk }, now())
}

/// Rank 0's report from `worker` in `attempt` at `at`: unlike [`report_kind`], of any
/// attempt (late and stale reports of one the job has left) and at a chosen instant.
fn report_in(
    job: &mut Job,
    worker: &str,
    attempt: u32,
    kind: Kind,
    failure: FailureKind,
    at: Now,
) -> Result<Transition, CoordinatorError> {
    let report = job_report(job, attempt, 0, kind, failure);
    step(job, Event::Report { worker, report, final_checkpoint_on_disk: false }, at)
}

fn job_report(job: &Job, attempt: u32, rank: u32, kind: Kind, failure: FailureKind) -> JobReport {
    JobReport { job_id: job.info.id.clone(), attempt, rank, kind: Some(kind), failure_kind: failure as i32 }
}

fn finished() -> Kind {
    Kind::Finished(Finished { final_test_acc: 0.5, ..Default::default() })
}

fn lose_member(job: &mut Job) -> Transition {
    let attempt = job.info.attempt;
    step(job, Event::MemberLost { attempt, reason: "worker w1 lost (session closed)".into() }, now()).unwrap()
}

fn aborts(t: &Transition) -> Vec<(String, u32)> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Abort { worker, abort } => Some((worker.clone(), abort.attempt)),
            _ => None,
        })
        .collect()
}

fn kinds(t: &Transition) -> Vec<&'static str> {
    t.effects
        .iter()
        .map(|e| match e {
            Effect::Assign { .. } => "assign",
            Effect::Abort { .. } => "abort",
            Effect::Release { .. } => "release",
            Effect::WriteSpec => "write_spec",
            Effect::WriteMetrics => "write_metrics",
            Effect::Persist => "persist",
            Effect::Finish => "finish",
            Effect::Publish(job_event::Event::Log(_)) => "log",
            Effect::Publish(_) => "publish",
            Effect::PublishSnapshot => "snapshot",
            Effect::Wake => "wake",
        })
        .collect()
}

fn assignments(t: &Transition) -> Vec<Assignment> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Assign { assignment, .. } => Some(assignment.clone()),
            _ => None,
        })
        .collect()
}

/// A job of 2 epochs on 2 workers, `steps` steps per epoch on 2 ranks (256 samples,
/// batch 32: 128 per rank, 4 steps).
fn small_running() -> Job {
    let mut job = queued(JobSpec { train_samples: 256, batch_size: 32, ..spec(2, 2) });
    schedule(&mut job, &idle(2), now());
    assert_eq!(spec::steps_per_epoch(job.spec(), 2), 4);
    job
}

fn progress(epoch: u32, step: u64) -> Kind {
    Kind::Progress(Progress { epoch, step, steps_per_epoch: 4, ..Default::default() })
}

#[test]
fn submit_makes_a_queued_job_written_then_stored() {
    let (job, t) = Job::submitted(ID.into(), spec(1, 1), now());
    assert_eq!(job.state(), JobState::Queued);
    assert_eq!(kinds(&t), ["write_spec", "log", "persist"]);
    assert!(job.info.events[0].contains("submitted: resnet20 for 2 epochs on 1..1 workers"), "{:?}", job.info.events);
}

#[test]
fn a_coordinator_restart_sends_active_jobs_to_recovering_in_a_new_attempt() {
    let mut job = running();
    let t = step(&mut job, Event::Resumed, now()).unwrap();
    assert_eq!(job.state(), JobState::Recovering);
    assert_eq!(job.info.attempt, 1);
    assert!(job.info.worker_ids.is_empty());
    assert_eq!(kinds(&t), ["log", "persist"]);
    let t = step(&mut job, Event::Resumed, now()).unwrap();
    assert_eq!((job.state(), job.info.attempt), (JobState::Recovering, 2));
    assert_eq!(kinds(&t), ["log", "persist"]);

    let mut waiting = queued(spec(1, 1));
    let t = step(&mut waiting, Event::Resumed, now()).unwrap();
    assert_eq!((waiting.state(), waiting.info.attempt), (JobState::Queued, 0));
    assert!(t.effects.is_empty());
}
