//! Stored and refused checkpoint uploads.

use super::*;

#[test]
fn a_stored_checkpoint_is_recorded_and_a_refused_one_logged_while_running() {
    let mut job = running();
    let t = step(&mut job, Event::CheckpointStored { attempt: 0, name: "ckpt-e0001-s000000".into() }, now()).unwrap();
    assert_eq!(job.info.latest_checkpoint, "ckpt-e0001-s000000");
    assert_eq!(kinds(&t), ["persist"]);
    let refused = Event::CheckpointRefused { attempt: 0, name: "ckpt-e0002-s000000".into(), reason: "disk".into() };
    let t = step(&mut job, refused, now()).unwrap();
    assert_eq!(kinds(&t), ["log"]);
    assert_eq!(job.refused_upload, Some(("ckpt-e0002-s000000".into(), "disk".into())));
    let err =
        step(&mut job, Event::CheckpointStored { attempt: 3, name: "ckpt-e0002-s000000".into() }, now()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "checkpoint for job j0001-resnet20 refused: the job is running on attempt 0, the upload is for attempt 3"
    );
}
