//! Starting attempts: scheduling a waiting job, its rendezvous timeout, growth.

use super::*;

#[test]
fn queued_to_running_assigns_ranks_in_worker_order() {
    let mut job = queued(spec(2, 3));
    let t = schedule(&mut job, &idle(4), now());
    assert_eq!(job.state(), JobState::Running);
    assert_eq!(kinds(&t), ["assign", "assign", "assign", "log", "persist", "snapshot"]);
    let ranks: Vec<(String, u32, u32)> = t
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Assign { worker, assignment } => Some((worker.clone(), assignment.rank, assignment.world_size)),
            _ => None,
        })
        .collect();
    assert_eq!(ranks, [("w0".into(), 0, 3), ("w1".into(), 1, 3), ("w2".into(), 2, 3)]);
    assert_eq!(job.members, ["w0", "w1", "w2"]);
    assert_eq!(job.info.worker_ids, ["w0", "w1", "w2"]);
    assert!(!t.holds_queue);
}

#[test]
fn a_queued_job_short_of_workers_waits_and_holds_the_queue() {
    let mut job = queued(JobSpec { rendezvous_timeout_s: 60, ..spec(2, 2) });
    let t = schedule(&mut job, &idle(1), later(now(), Duration::from_secs(30)));
    assert_eq!(job.state(), JobState::Queued);
    assert!(t.effects.is_empty() && t.holds_queue);
}

#[test]
fn queued_to_failed_when_the_rendezvous_times_out() {
    let mut job = queued(JobSpec { rendezvous_timeout_s: 5, ..spec(2, 2) });
    let t = schedule(&mut job, &idle(1), later(now(), Duration::from_secs(6)));
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.info.outcome, outcome::FAILED);
    assert_eq!(job.info.message, "rendezvous timed out after 5s: 1 of at least 2 workers available");
    assert_eq!(kinds(&t), ["log", "finish"]);
    assert!(t.holds_queue, "later jobs still wait behind it this pass");
}

#[test]
fn queued_to_failed_when_the_world_size_cannot_shard_the_data() {
    let mut job = queued(JobSpec { batch_size: 30_000, ..spec(2, 2) });
    let t = schedule(&mut job, &idle(2), now());
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.info.outcome, outcome::CONFIGURATION);
    assert!(job.info.message.contains("batch"), "{}", job.info.message);
    assert_eq!(kinds(&t), ["log", "finish"]);
    assert!(!t.holds_queue, "a job that cannot run does not hold the queue");
}

#[test]
fn recovering_to_running_after_the_grace_period_from_the_newest_checkpoint() {
    let mut job = running();
    job.info.latest_checkpoint = names::checkpoint_name(1, 0);
    lose_member(&mut job);
    let t = schedule(&mut job, &idle(2), now());
    assert_eq!(job.state(), JobState::Recovering, "not within the grace period");
    assert!(t.effects.is_empty() && !t.holds_queue, "a job in its grace period holds no one");
    let t = schedule(&mut job, &idle(1), later(now(), RECOVERY_GRACE * 2));
    assert_eq!(job.state(), JobState::Recovering, "min 2 workers, 1 idle");
    assert!(t.holds_queue);
    let t = schedule(&mut job, &idle(3), later(now(), RECOVERY_GRACE * 2));
    assert_eq!(job.state(), JobState::Running);
    match &t.effects[0] {
        Effect::Assign { assignment, .. } => {
            assert_eq!((assignment.attempt, assignment.start_epoch, assignment.start_step), (1, 1, 0));
            assert_eq!(assignment.checkpoint, "ckpt-e0001-s000000");
        }
        other => panic!("expected an assignment first, got {other:?}"),
    }
    assert_eq!(job.attempt_start, (1, 0));
}

#[test]
fn recovering_to_failed_when_the_rendezvous_times_out() {
    let mut job = queued(JobSpec { rendezvous_timeout_s: 5, ..spec(2, 2) });
    schedule(&mut job, &idle(2), now());
    lose_member(&mut job);
    let t = schedule(&mut job, &idle(1), later(now(), Duration::from_secs(10)));
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.info.message, "rendezvous timed out after 5s: 1 of at least 2 workers available");
    assert_eq!(kinds(&t), ["log", "log", "finish"], "the recovery's line, then the failure's");
    assert!(
        job.info
            .events
            .iter()
            .any(|e| e.ends_with("recovery 1: worker w1 lost (session closed); 2 workers; not resumed")),
        "{:?}",
        job.info.events
    );
}

/// A first attempt starts from the checkpoint (none here); a recovery tells the
/// new group which attempt's in-memory state its survivors may bring.
#[test]
fn a_recovery_assigns_the_failed_attempts_live_state() {
    let mut job = queued(spec(2, 2));
    let t = schedule(&mut job, &idle(2), now());
    assert!(assignments(&t).iter().all(|a| !a.live), "a fresh attempt has no live state");
    lose_member(&mut job);
    let t = schedule(&mut job, &idle(3)[1..], later(now(), RECOVERY_GRACE * 2));
    let a = assignments(&t);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|a| a.live && a.live_attempt == 0 && a.attempt == 1), "{a:?}");
    // No epoch recorded yet: a live state must still be in epoch 0.
    assert!(a.iter().all(|a| a.live_max_epoch == 0), "{a:?}");
    // The checkpoint stays the fallback for a group without survivors.
    assert!(a.iter().all(|a| a.checkpoint == job.info.latest_checkpoint));
    // A coordinator restart knows no survivor: the next group starts from the checkpoint.
    step(&mut job, Event::Resumed, now()).unwrap();
    let t = schedule(&mut job, &idle(2), later(now(), RECOVERY_GRACE * 2));
    assert!(assignments(&t).iter().all(|a| !a.live));
}

/// A `1:2` job running on one worker grows once a second is idle, but
/// only after its attempt completed a step: the member is told to stop, the new group of
/// two (the member keeps rank 0) continues from attempt 0's live state, no restart or
/// recovery is counted, and a full job does not grow further.
#[test]
fn a_running_job_below_its_maximum_grows_from_its_live_state() {
    let mut job = queued(JobSpec { scale_lr: true, ..spec(1, 2) });
    schedule(&mut job, &idle(1), now());
    assert_eq!((job.state(), job.members.len()), (JobState::Running, 1));
    let members = idle(1);
    let newcomer = &idle(2)[1..];
    let grow = |job: &mut Job| {
        step(job, Event::Grow { members: &members, idle: newcomer, secret: "s1".into() }, now()).unwrap()
    };
    assert!(!wants_growth(&job), "no step completed yet");
    assert!(grow(&mut job).effects.is_empty());
    report(&mut job, "w0", 0, progress(0, 3), false);
    assert!(wants_growth(&job));
    let t = grow(&mut job);
    assert_eq!(aborts(&t), [("w0".to_string(), 0)]);
    let a = assignments(&t);
    let ranks: Vec<(&str, u32, u32)> =
        a.iter().map(|a| (a.peers[a.rank as usize].worker_id.as_str(), a.rank, a.world_size)).collect();
    assert_eq!(ranks, [("w0", 0, 2), ("w1", 1, 2)]);
    assert!(a.iter().all(|a| a.live && a.live_attempt == 0 && a.attempt == 1 && a.session_secret == "s1"));
    assert_eq!((job.state(), job.info.world_size, job.info.restarts), (JobState::Running, 2, 0));
    assert!(job.info.recoveries.is_empty(), "growth is not a recovery");
    let log = job.info.events.join("\n");
    assert!(log.contains("growing from 1 to 2 workers"), "{log}");
    assert!(log.contains("scaled by 2 instead of 1"), "{log}");
    // The live resume of the grown group changes no recovery; a full job stays as it is.
    let live = Resumed { epoch: 0, step: 1, samples: 3 * 64, live: true, source_worker: "w0".into() };
    report(&mut job, "w0", 0, Kind::Resumed(live), false);
    assert!(job.info.recoveries.is_empty());
    report(&mut job, "w0", 0, progress(0, 5), false);
    assert!(!wants_growth(&job), "at its maximum");
}

/// A global batch runs only on groups whose size divides it: with 3 idle workers a `2:4`
/// job of global batch 128 starts on 2 (each takes 64), with one more idle it does not grow
/// to 3, with two more it grows to 4 (each takes 32) and says the global batch is kept.
#[test]
fn a_global_batch_job_runs_on_the_largest_group_whose_size_divides_it() {
    let mut job = queued(JobSpec { global_batch: 128, ..spec(2, 4) });
    let t = schedule(&mut job, &idle(3), now());
    let a = assignments(&t);
    assert_eq!(a.iter().map(|a| (a.rank, a.world_size)).collect::<Vec<_>>(), [(0, 2), (1, 2)]);
    assert_eq!(job.members, ["w0", "w1"]);
    report(&mut job, "w0", 0, progress(0, 3), false);
    assert!(wants_growth(&job));
    let members = idle(2);
    let all = idle(4);
    let one_more = step(&mut job, Event::Grow { members: &members, idle: &all[2..3], secret: "s1".into() }, now());
    assert!(one_more.unwrap().effects.is_empty(), "3 does not divide 128");
    let t = step(&mut job, Event::Grow { members: &members, idle: &all[2..], secret: "s1".into() }, now()).unwrap();
    assert_eq!(assignments(&t).iter().map(|a| a.world_size).collect::<Vec<_>>(), [4, 4, 4, 4]);
    let log = job.info.events.join("\n");
    assert!(log.contains("growing from 2 to 4 workers"), "{log}");
    assert!(log.contains("global batch 128 kept (32 per worker instead of 64)"), "{log}");
    assert!(log.contains("global batch 128 on 2 or 4 workers"), "{log}");
}
