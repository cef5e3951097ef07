//! Reports from the ranks: progress, epochs, finishing, failures, stale reports.

use super::*;

#[test]
fn running_to_succeeded_once_every_rank_finished_and_the_final_checkpoint_is_stored() {
    let mut job = running();
    job.info.latest_checkpoint = names::checkpoint_name(2, 0);
    let t = report(&mut job, "w1", 1, finished(), true);
    assert_eq!(job.state(), JobState::Running, "one rank of two finished");
    assert!(t.effects.is_empty());
    let t = report(&mut job, "w0", 0, finished(), true);
    assert_eq!(job.state(), JobState::Succeeded);
    assert_eq!(job.info.outcome, "succeeded");
    assert_eq!(job.info.message, "final test accuracy 50.00%");
    assert_eq!(kinds(&t), ["release", "release", "log", "finish", "wake"]);
}

#[test]
fn running_to_failed_when_the_final_checkpoint_is_missing() {
    let mut job = running();
    job.info.latest_checkpoint = names::checkpoint_name(1, 0);
    report(&mut job, "w1", 1, finished(), false);
    let t = report(&mut job, "w0", 0, finished(), false);
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.info.outcome, outcome::FINAL_CHECKPOINT_MISSING);
    assert_eq!(
        job.info.message,
        "training finished but the final checkpoint ckpt-e0002-s000000 was not stored: rank 0 did not upload it; \
         newest stored checkpoint: ckpt-e0001-s000000"
    );
    assert_eq!(kinds(&t), ["release", "release", "log", "finish", "wake"]);
}

#[test]
fn running_to_recovering_when_a_rank_reports_a_retryable_failure() {
    let mut job = running();
    let t = report_kind(&mut job, "w1", 1, Kind::Failed("ring broke".into()), FailureKind::Retryable, false).unwrap();
    assert_eq!(job.state(), JobState::Recovering);
    assert_eq!(job.info.message, "rank 1 on w1 failed: ring broke");
    assert_eq!(kinds(&t), ["abort", "abort", "log", "persist", "snapshot", "wake"]);
}

#[test]
fn running_to_failed_on_a_permanent_failure_without_using_the_budget() {
    let mut job = running();
    let t = report_kind(&mut job, "w0", 0, Kind::Failed("loss is NaN".into()), FailureKind::Diverged, false).unwrap();
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.info.outcome, outcome::DIVERGED);
    assert_eq!(job.info.message, format!("rank 0 on w0 failed: loss is NaN; {NOT_RESTARTED}"));
    assert_eq!(job.info.restarts, 0);
    assert_eq!(kinds(&t), ["abort", "abort", "log", "finish", "wake"]);
}

#[test]
fn recovering_to_failed_on_a_late_permanent_failure_of_the_failed_attempt() {
    let mut job = running();
    lose_member(&mut job);
    assert_eq!((job.info.attempt, job.info.restarts), (1, 1));
    let t = report_in(&mut job, "w0", 0, Kind::Failed("loss is NaN".into()), FailureKind::Diverged, now()).unwrap();
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!((job.info.attempt, job.info.restarts), (0, 0), "the restart being prepared does not count");
    assert_eq!(job.info.outcome, outcome::DIVERGED);
    assert_eq!(kinds(&t), ["log", "finish", "wake"]);
}

#[test]
fn a_late_retryable_failure_or_a_stranger_does_not_end_a_recovering_job() {
    let mut job = running();
    lose_member(&mut job);
    for (worker, kind) in [("w0", FailureKind::Retryable), ("w9", FailureKind::Diverged)] {
        let t = report_in(&mut job, worker, 0, Kind::Failed("x".into()), kind, now()).unwrap();
        assert!(t.effects.is_empty());
        assert_eq!(job.state(), JobState::Recovering);
    }
}

#[test]
fn reports_of_another_attempt_or_rank_change_nothing() {
    let mut job = running();
    let before = format!("{:?}", job.info);
    let t =
        report_in(&mut job, "w0", 7, Kind::Epoch(EpochMetrics::default()), FailureKind::Unspecified, now()).unwrap();
    assert!(t.effects.is_empty());
    let t = report(&mut job, "w1", 0, Kind::Failed("not my rank".into()), false);
    assert!(t.effects.is_empty());
    assert_eq!(format!("{:?}", job.info), before);
}

#[test]
fn progress_and_epoch_reports_keep_the_job_running() {
    let mut job = running();
    let t = report(&mut job, "w0", 0, Kind::Progress(Progress { epoch: 0, step: 3, ..Default::default() }), false);
    assert_eq!(kinds(&t), ["publish"], "progress is not stored");
    let t = report(&mut job, "w0", 0, Kind::Epoch(EpochMetrics { epoch: 0, ..Default::default() }), false);
    assert_eq!(kinds(&t), ["write_metrics", "persist", "publish"]);
    assert_eq!((job.state(), job.info.history.len(), job.attempt_reached), (JobState::Running, 1, 1));
    let before = format!("{:?}", job.info);
    let err = report_kind(
        &mut job,
        "w0",
        0,
        Kind::Epoch(EpochMetrics { epoch: 2, ..Default::default() }),
        FailureKind::Unspecified,
        false,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "epoch report for epoch 2, but job j0001-resnet20 has 2 epochs (0-based)");
    assert_eq!(format!("{:?}", job.info), before, "a refused report changes nothing");
}
