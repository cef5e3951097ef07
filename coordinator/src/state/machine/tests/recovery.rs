//! What a recovery records: cause, position reached, steps replayed, downtime.

use super::*;

#[test]
fn a_recovery_records_its_cause_sizes_replayed_steps_and_downtime() {
    let t0 = now();
    let mut job = small_running();
    step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(0, 2) }, t0).unwrap();
    report(&mut job, "w0", 0, progress(1, 1), false);
    report(&mut job, "w0", 0, progress(0, 3), false);
    // Lost at epoch 1, step 1; the newest checkpoint is epoch 0, step 2.
    let lost = later(t0, Duration::from_secs(10));
    step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, lost).unwrap();
    let r = job.info.recoveries.last().cloned().unwrap();
    assert_eq!((r.attempt, r.cause.as_str(), r.old_world_size, r.new_world_size), (0, "worker w1 lost (eof)", 2, 0));
    assert_eq!((r.reached_epoch, r.reached_step, r.lost_unix), (1, 1, lost.unix));

    let restart = later(lost, RECOVERY_GRACE * 2);
    let others =
        [IdleWorker { id: "w0".into(), data_addr: "a".into() }, IdleWorker { id: "w2".into(), data_addr: "b".into() }];
    step(&mut job, Event::Schedule { idle: &others, secret: "s".into() }, restart).unwrap();
    assert_eq!(job.state(), JobState::Running);
    let r = job.info.recoveries.last().cloned().unwrap();
    // (1·4 + 1) − (0·4 + 2) = 3 steps of the failed group are trained again.
    assert_eq!((r.new_world_size, r.resumed_from.as_str(), r.steps_replayed), (2, "ckpt-e0000-s000002", 3));
    assert_eq!(r.downtime_seconds, None, "no step of the new group yet");

    // A report at the start position is no step of the new group; the next one is.
    let t = report(&mut job, "w0", 0, progress(0, 2), false);
    assert_eq!(kinds(&t), ["publish"]);
    let first = later(restart, Duration::from_secs(5));
    let t = report_in(&mut job, "w0", 1, progress(0, 3), FailureKind::Unspecified, first).unwrap();
    assert_eq!(kinds(&t), ["publish", "log", "persist"]);
    let r = job.info.recoveries.last().cloned().unwrap();
    let down = r.downtime_seconds.expect("measured at the first step");
    assert!((down - (first.unix - lost.unix)).abs() < 1e-9, "{down}");
    assert!(
        job.info.events.last().unwrap().ends_with(
            "recovery 1: worker w1 lost (eof); 2 -> 2 workers; resumed from ckpt-e0000-s000002; 3 steps replayed; down for 9.0 s"
        ),
        "{:?}",
        job.info.events
    );
    // Later progress changes nothing more; the summary carries the entry.
    let t = report(&mut job, "w0", 0, progress(1, 1), false);
    assert_eq!(kinds(&t), ["publish"]);
    assert_eq!(job.info.recoveries.len(), 1);
    let summary = cvdist_common::run_dir::Recovery::from(&job.info.recoveries[0]);
    assert_eq!((summary.steps_replayed, summary.old_world_size, summary.new_world_size), (3, 2, 2));
}

#[test]
fn replayed_steps_count_from_the_epoch_start_when_the_world_size_changes() {
    let mut job = queued(JobSpec { train_samples: 256, batch_size: 32, ..spec(1, 2) });
    schedule(&mut job, &idle(2), now());
    step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(1, 2) }, now()).unwrap();
    report(&mut job, "w0", 0, progress(1, 3), false);
    lose_member(&mut job);
    schedule(&mut job, &idle(1), later(now(), RECOVERY_GRACE * 2));
    let r = &job.info.recoveries[0];
    // One worker restarts epoch 1 from its first step: 3 steps of the 2-worker group again.
    assert_eq!((r.old_world_size, r.new_world_size, r.steps_replayed), (2, 1, 3));
}

#[test]
fn an_epoch_report_or_a_stored_checkpoint_past_the_reports_is_the_reached_position() {
    let mut job = small_running();
    report(&mut job, "w0", 0, Kind::Epoch(EpochMetrics { epoch: 0, ..Default::default() }), false);
    step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(1, 2) }, now()).unwrap();
    lose_member(&mut job);
    let r = &job.info.recoveries[0];
    assert_eq!((r.reached_epoch, r.reached_step), (1, 2));
    schedule(&mut job, &idle(2), later(now(), RECOVERY_GRACE * 2));
    assert_eq!(job.info.recoveries[0].steps_replayed, 0, "lost right after a stored checkpoint");
    // The epoch report of the new group ends the downtime too.
    report(&mut job, "w0", 0, Kind::Epoch(EpochMetrics { epoch: 1, ..Default::default() }), false);
    assert!(job.info.recoveries[0].downtime_seconds.is_some());
}

#[test]
fn the_lost_worker_joins_the_cause_when_a_survivor_reported_first() {
    let mut job = running();
    report_kind(&mut job, "w0", 0, Kind::Failed("ring broke".into()), FailureKind::Retryable, false).unwrap();
    let t = step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, now()).unwrap();
    assert!(t.effects.is_empty());
    assert_eq!(job.state(), JobState::Recovering);
    assert_eq!(job.info.recoveries[0].cause, "rank 0 on w0 failed: ring broke; worker w1 lost (eof)");
    assert_eq!(job.info.restarts, 1, "the same failure, not a second one");
}

#[test]
fn a_late_permanent_failure_takes_back_the_recovery_being_prepared() {
    let mut job = running();
    lose_member(&mut job);
    report_in(&mut job, "w0", 0, Kind::Failed("loss is NaN".into()), FailureKind::Diverged, now()).unwrap();
    assert_eq!(job.state(), JobState::Failed);
    assert!(job.info.recoveries.is_empty());
}

/// Rank 0 reports that the group continues from a survivor's state past every reported
/// step: nothing is replayed, the recovery names the survivor, and the downtime ends at
/// the first step after that position.
#[test]
fn a_live_resume_replays_no_step_and_names_the_survivor() {
    let t0 = now();
    let mut job = small_running();
    step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(1, 0) }, t0).unwrap();
    report(&mut job, "w0", 0, progress(1, 2), false);
    let lost = later(t0, Duration::from_secs(10));
    step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, lost).unwrap();
    let restart = later(lost, RECOVERY_GRACE * 2);
    schedule(&mut job, &idle(3)[..1].iter().chain(&idle(3)[2..]).cloned().collect::<Vec<_>>(), restart);
    assert_eq!(job.state(), JobState::Running);
    assert_eq!(job.info.recoveries[0].steps_replayed, 2, "from the checkpoint, until the group says otherwise");

    // The survivor completed step 3 of epoch 1 (one more than rank 0 reported).
    let live = Resumed { epoch: 1, step: 3, samples: 3 * 2 * 32, live: true, source_worker: "w0".into() };
    let t = report(&mut job, "w0", 0, Kind::Resumed(live.clone()), false);
    assert_eq!(kinds(&t), ["log", "persist"]);
    let r = job.info.recoveries[0].clone();
    assert_eq!((r.resumed_from.as_str(), r.steps_replayed), ("live state of w0 at epoch 1 step 3", 0));
    assert_eq!(job.attempt_start, (1, 3));
    // Another rank's report, or one of a failed-over group without state, changes nothing.
    let before = job.info.recoveries.clone();
    report(&mut job, "w2", 1, Kind::Resumed(live), false);
    report(&mut job, "w0", 0, Kind::Resumed(Resumed::default()), false);
    assert_eq!(job.info.recoveries, before);

    // Progress at the start position is no step; the next one ends the downtime.
    report(&mut job, "w0", 0, progress(1, 3), false);
    assert_eq!(job.info.recoveries[0].downtime_seconds, None);
    report(&mut job, "w0", 0, progress(1, 4), false);
    assert!(job.info.recoveries[0].downtime_seconds.is_some());
    assert!(
        job.info.events.iter().any(|e| e.contains(
            "recovery 1: worker w1 lost (eof); 2 -> 2 workers; resumed from live state of w0 at epoch 1 step 3; \
             0 steps replayed; down for"
        )),
        "{:?}",
        job.info.events
    );
}

/// A member that died after completing a step no survivor completed: that one step is
/// trained again, and counted.
#[test]
fn a_live_resume_behind_the_reported_step_counts_the_difference() {
    let mut job = small_running();
    report(&mut job, "w0", 0, progress(1, 3), false);
    lose_member(&mut job);
    schedule(&mut job, &[idle(3)[0].clone(), idle(3)[2].clone()], later(now(), RECOVERY_GRACE * 2));
    let live = Resumed { epoch: 1, step: 2, samples: 2 * 2 * 32, live: true, source_worker: "w0".into() };
    report(&mut job, "w0", 0, Kind::Resumed(live), false);
    assert_eq!(job.info.recoveries[0].steps_replayed, 1);
}
