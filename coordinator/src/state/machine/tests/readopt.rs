//! A coordinator restart: re-adopting the running attempt (`machine/readopt.rs`), and the
//! fallback to recovery when that cannot complete.

use super::*;

/// The job as a restarted coordinator loads it: only what the record holds.
fn reloaded(job: &Job, now: Now) -> Job {
    Job::new(job.info.clone(), now.instant)
}

fn rejoin<'a>(worker: &'a str, rank: u32) -> Event<'a> {
    Event::Rejoin { worker, attempt: 0, rank, world_size: 2, position: (1, 4) }
}

#[test]
fn running_stays_running_and_waits_for_its_members_after_a_restart() {
    let now = now();
    let mut job = reloaded(&running(), now);
    let t = step(&mut job, Event::Restarted { window: Duration::from_secs(30) }, now).unwrap();
    assert_eq!((job.state(), job.info.attempt), (JobState::Running, 0));
    assert_eq!(job.members, ["w0", "w1"]);
    assert!(job.readopting().is_some() && job.awaits("w0") && job.awaits("w1"));
    assert!(t.effects.contains(&Effect::Persist));
    assert!(!t.effects.iter().any(|e| matches!(e, Effect::Abort { .. })), "{:?}", t.effects);
}

#[test]
fn a_recovering_job_still_resumes_in_a_new_attempt_after_a_restart() {
    let now = now();
    let mut job = running();
    step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost".into() }, now).unwrap();
    let mut job = reloaded(&job, now);
    step(&mut job, Event::Restarted { window: Duration::from_secs(30) }, now).unwrap();
    assert_eq!((job.state(), job.info.attempt), (JobState::Recovering, 2));
    assert!(job.readopting().is_none());
}

#[test]
fn only_each_members_own_claim_counts_and_the_last_completes_the_readoption() {
    let now = now();
    let mut job = reloaded(&running(), now);
    step(&mut job, Event::Restarted { window: Duration::from_secs(30) }, now).unwrap();
    for wrong in [
        Event::Rejoin { worker: "w0", attempt: 1, rank: 0, world_size: 2, position: (0, 0) },
        Event::Rejoin { worker: "w0", attempt: 0, rank: 1, world_size: 2, position: (0, 0) },
        Event::Rejoin { worker: "w0", attempt: 0, rank: 0, world_size: 3, position: (0, 0) },
        Event::Rejoin { worker: "w9", attempt: 0, rank: 0, world_size: 2, position: (0, 0) },
    ] {
        let t = step(&mut job, wrong.clone(), now).unwrap();
        assert!(t.effects.is_empty(), "{wrong:?}: {:?}", t.effects);
    }
    assert!(!job.rejoined("w0", 0));
    step(&mut job, rejoin("w0", 0), later(now, Duration::from_secs(2))).unwrap();
    assert!(job.rejoined("w0", 0) && job.awaits("w1") && !job.awaits("w0"));
    let t = step(&mut job, rejoin("w1", 1), later(now, Duration::from_secs(3))).unwrap();
    assert!(job.readopting().is_none(), "complete");
    assert_eq!((job.state(), job.info.attempt, job.info.restarts), (JobState::Running, 0, 0));
    assert!(job.info.recoveries.is_empty());
    assert_eq!(job.attempt_position, (1, 4), "the claims' position");
    assert!(job.info.events.last().unwrap().contains("re-registered 3.0 s after the coordinator restarted"));
    assert!(t.effects.contains(&Effect::Persist) && t.effects.contains(&Effect::PublishSnapshot));
    // The window passing later changes nothing.
    assert!(step(&mut job, Event::ReadoptDeadline, later(now, Duration::from_secs(60))).unwrap().effects.is_empty());
}

#[test]
fn the_window_passing_falls_back_to_recovery_without_counting_a_restart() {
    let now = now();
    let mut job = reloaded(&running(), now);
    step(&mut job, Event::Restarted { window: Duration::from_secs(30) }, now).unwrap();
    step(&mut job, rejoin("w0", 0), now).unwrap();
    assert!(
        step(&mut job, Event::ReadoptDeadline, later(now, Duration::from_secs(29))).unwrap().effects.is_empty(),
        "not yet"
    );
    let t = step(&mut job, Event::ReadoptDeadline, later(now, Duration::from_secs(30))).unwrap();
    assert_eq!((job.state(), job.info.attempt, job.info.restarts), (JobState::Recovering, 1, 0));
    // The member that did come back is told to stop the attempt.
    let aborted: Vec<&str> = t
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Abort { worker, abort } if abort.attempt == 0 => Some(worker.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(aborted, ["w0", "w1"]);
    assert_eq!(job.info.recoveries.len(), 1);
    let r = &job.info.recoveries[0];
    assert_eq!((r.attempt, r.old_world_size), (0, 2));
    assert_eq!(r.cause, "coordinator restarted; attempt 0 not re-adopted: w1 did not re-register within 30s");
    assert!(t.effects.contains(&Effect::Wake));
}

#[test]
fn a_failure_before_every_member_is_back_falls_back_to_recovery_without_counting_a_restart() {
    let now = now();
    let mut job = reloaded(&running(), now);
    step(&mut job, Event::Restarted { window: Duration::from_secs(30) }, now).unwrap();
    step(&mut job, rejoin("w0", 0), now).unwrap();
    // w1 stopped the attempt while the coordinator was away; w0's ring broke.
    report_in(&mut job, "w0", 0, Kind::Failed("rank 1 closed the connection".into()), FailureKind::Retryable, now)
        .unwrap();
    assert_eq!((job.state(), job.info.attempt, job.info.restarts), (JobState::Recovering, 1, 0));
    let cause = &job.info.recoveries.last().unwrap().cause;
    assert_eq!(
        cause,
        "coordinator restarted; attempt 0 not re-adopted: rank 0 on w0 failed: rank 1 closed the connection \
         while the others had not re-registered"
    );
}

#[test]
fn a_member_back_without_the_attempt_ends_the_wait_at_once() {
    let now = now();
    let mut job = reloaded(&running(), now);
    step(&mut job, Event::Restarted { window: Duration::from_secs(30) }, now).unwrap();
    assert!(step(&mut job, Event::RegisteredIdle { worker: "w7" }, now).unwrap().effects.is_empty(), "not a member");
    step(&mut job, Event::RegisteredIdle { worker: "w1" }, now).unwrap();
    assert_eq!((job.state(), job.info.attempt), (JobState::Recovering, 1));
    assert!(job.info.message.ends_with("not re-adopted: worker w1 re-registered without it"), "{}", job.info.message);
}
