//! Cancels and failed attempts.

use super::*;

#[test]
fn queued_to_cancelled() {
    let mut job = queued(spec(1, 1));
    let t = step(&mut job, Event::Cancel, now()).unwrap();
    assert_eq!(job.state(), JobState::Cancelled);
    assert_eq!((job.info.outcome.as_str(), job.info.message.as_str()), ("cancelled", "cancelled by user"));
    assert_eq!(kinds(&t), ["log", "finish"]);
}

#[test]
fn running_to_cancelled_aborts_the_members() {
    let mut job = running();
    let t = step(&mut job, Event::Cancel, now()).unwrap();
    assert_eq!(job.state(), JobState::Cancelled);
    assert_eq!(aborts(&t), [("w0".into(), 0), ("w1".into(), 0)]);
    assert_eq!(kinds(&t), ["abort", "abort", "log", "finish"]);
}

#[test]
fn recovering_to_cancelled() {
    let mut job = running();
    lose_member(&mut job);
    let t = step(&mut job, Event::Cancel, now()).unwrap();
    assert_eq!(job.state(), JobState::Cancelled);
    assert_eq!(kinds(&t), ["log", "log", "finish"], "the recovery's line; no members left to abort");
}

#[test]
fn running_to_recovering_when_a_member_is_lost() {
    let mut job = running();
    let at = now();
    let t = step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, at).unwrap();
    assert_eq!(job.state(), JobState::Recovering);
    assert_eq!((job.info.attempt, job.info.restarts), (1, 1));
    assert_eq!(aborts(&t), [("w0".into(), 0), ("w1".into(), 0)], "every member, with the failed attempt");
    assert_eq!(kinds(&t), ["abort", "abort", "log", "persist", "snapshot"]);
    assert_eq!(job.not_before, at.instant + RECOVERY_GRACE);
    assert_eq!(job.failed_attempt, Some((0, vec!["w0".to_string(), "w1".to_string()])));
    assert!(job.members.is_empty());
}

#[test]
fn running_to_failed_when_the_restart_budget_is_spent() {
    let mut job = queued(JobSpec { max_restarts: 1, ..spec(2, 2) });
    schedule(&mut job, &idle(2), now());
    lose_member(&mut job);
    assert_eq!(job.state(), JobState::Recovering);
    schedule(&mut job, &idle(2), later(now(), RECOVERY_GRACE * 2));
    assert_eq!(job.state(), JobState::Running);
    let t = lose_member(&mut job);
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.info.outcome, outcome::FAILED);
    assert_eq!(job.info.message, "worker w1 lost (session closed); restart budget of 1 exhausted");
    // First the line of the recovery whose group never completed a step.
    assert_eq!(kinds(&t), ["log", "abort", "abort", "log", "finish"]);
    assert_eq!(job.info.recoveries.len(), 1, "the failure that spent the budget is no recovery");
    assert_eq!(job.info.recoveries[0].downtime_seconds, None);
}

#[test]
fn a_lost_member_of_an_old_attempt_changes_nothing() {
    let mut job = running();
    let t = step(&mut job, Event::MemberLost { attempt: 5, reason: "old".into() }, now()).unwrap();
    assert!(t.effects.is_empty());
    assert_eq!(job.state(), JobState::Running);
}
