//! An ended job (SUCCEEDED, FAILED, CANCELLED) refuses or ignores every event.

use super::*;

/// The three ended states, each reached the way the diagram says.
fn ended_jobs() -> Vec<Job> {
    let mut succeeded = running();
    succeeded.info.latest_checkpoint = names::checkpoint_name(2, 0);
    report(&mut succeeded, "w0", 0, finished(), true);
    report(&mut succeeded, "w1", 1, finished(), true);
    let mut failed = running();
    report_kind(&mut failed, "w0", 0, Kind::Failed("bad data".into()), FailureKind::Data, false).unwrap();
    let mut cancelled = running();
    step(&mut cancelled, Event::Cancel, now()).unwrap();
    vec![succeeded, failed, cancelled]
}

#[test]
fn an_ended_job_refuses_cancel_reports_and_checkpoints() {
    for mut job in ended_jobs() {
        let state = state_name(job.state());
        let before = format!("{:?}", job.info);
        let err = step(&mut job, Event::Cancel, now()).unwrap_err();
        assert_eq!(err.to_string(), format!("job {ID} already ended ({state})"));
        let err = report_kind(&mut job, "w0", 0, finished(), FailureKind::Unspecified, true).unwrap_err();
        assert_eq!(err.to_string(), format!("job {ID} already ended"));
        let attempt = job.info.attempt;
        let stored = Event::CheckpointStored { attempt, name: "ckpt-e0001-s000000".into() };
        let err = step(&mut job, stored, now()).unwrap_err();
        assert!(err.to_string().starts_with(&format!("checkpoint for job {ID} refused: the job is {state}")), "{err}");
        assert_eq!(format!("{:?}", job.info), before, "{state}: refused events change nothing");
    }
}

#[test]
fn an_ended_job_ignores_scheduling_lost_members_restarts_and_refused_uploads() {
    for mut job in ended_jobs() {
        let state = job.state();
        let before = format!("{:?}", job.info);
        let attempt = job.info.attempt;
        let far = later(now(), Duration::from_secs(3600));
        let events = [
            Event::Schedule { idle: &idle(4), secret: "s".into() },
            Event::MemberLost { attempt, reason: "lost".into() },
            Event::Resumed,
            Event::CheckpointRefused { attempt, name: "ckpt-e0001-s000000".into(), reason: "r".into() },
        ];
        for event in events {
            let t = step(&mut job, event, far).unwrap();
            assert!(t.effects.is_empty() && !t.holds_queue, "{state:?}: {:?}", t.effects);
        }
        assert_eq!(job.state(), state);
        assert_eq!(format!("{:?}", job.info), before);
    }
}
