//! An abort (the coordinator's, or `cvdist cancel`) must end every blocking wait of a
//! worker within about a second, so a cancelled job frees its workers at once. The
//! end-to-end case with real processes is in coordinator/tests/lifecycle.rs; these pin
//! down the waits one by one.

mod trainer_config;

use cvdist_worker::agent::control::JobControl;
use cvdist_worker::collective::{AbortHandle, CollectiveError, Ring};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

/// What "within a second" is checked against: generous for loaded 2-core CI machines,
/// and far below the waits the abort replaces (the 60 s rendezvous timeout, the 10 s
/// handshake timeout).
const ABORT_BOUND: Duration = Duration::from_secs(2);

/// Connects rank 0 of 2 to `peer` with a 60 s timeout, aborts after 300 ms, and returns
/// the result and how long after the abort it came.
fn connect_then_abort(peer: String) -> (Result<Ring, CollectiveError>, Duration) {
    let own = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![own.local_addr().unwrap().to_string(), peer];
    let abort = AbortHandle::new();
    let trigger = abort.clone();
    let aborter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        trigger.abort("job cancelled by user");
        Instant::now()
    });
    let r = Ring::connect_with_abort(0, 2, &peers, own, "secret", Duration::from_secs(60), abort);
    let returned = Instant::now();
    let aborted_at = aborter.join().unwrap();
    (r, returned.saturating_duration_since(aborted_at))
}

fn assert_aborted(r: Result<Ring, CollectiveError>, after: Duration) {
    match r {
        Err(CollectiveError::Aborted(reason)) => assert!(reason.contains("cancelled"), "{reason}"),
        Err(e) => panic!("expected Aborted, got {e}"),
        Ok(_) => panic!("expected Aborted, got a ring"),
    }
    assert!(after < ABORT_BOUND, "returned {after:?} after the abort");
}

#[test]
fn abort_ends_a_ring_setup_whose_peer_never_comes() {
    // Nothing listens there: connects are refused and the acceptor never sees rank 1.
    let gone = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (r, after) = connect_then_abort(gone);
    assert_aborted(r, after);
}

#[test]
fn abort_ends_a_handshake_with_a_silent_peer() {
    // The kernel completes the TCP connect (backlog) but nobody ever answers the hello:
    // before, the handshake read waited out its 10 s timeout before seeing the abort.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let (r, after) = connect_then_abort(silent.local_addr().unwrap().to_string());
    assert_aborted(r, after);
    drop(silent);
}

#[test]
fn a_stop_ends_a_transfer_wait_and_reaches_a_handle_installed_late() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let control = JobControl::default();
    let stopper = control.clone();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        stopper.request_stop("job cancelled by user");
        Instant::now()
    });
    // A download from a coordinator that never sends anything.
    let r = control.block_on_unless_stopped(rt.handle(), std::future::pending::<()>());
    let returned = Instant::now();
    let stopped_at = t.join().unwrap();
    assert_eq!(r, Err("stopped: job cancelled by user".to_string()));
    assert!(returned.saturating_duration_since(stopped_at) < ABORT_BOUND);

    // Once stopped, a later wait does not even start, and a communicator set up after
    // the stop (a ring that was still being created) is aborted as it is installed.
    let started = Instant::now();
    assert!(control.block_on_unless_stopped(rt.handle(), std::future::pending::<()>()).is_err());
    assert!(started.elapsed() < ABORT_BOUND);
    let late = AbortHandle::new();
    control.install_abort(late.clone());
    assert!(late.is_aborted());
    assert_eq!(late.reason().as_deref(), Some("job cancelled by user"));
}

/// Stops as soon as the last step of the first epoch was reported, i.e. during the test
/// pass; counts what the trainer did after that.
#[derive(Default)]
struct StopDuringEval {
    stop_requested: bool,
    epochs_reported: usize,
    checkpoints: usize,
}

impl cvdist_worker::train::Observer for StopDuringEval {
    fn progress(&mut self, p: &cvdist_common::proto::Progress) {
        if p.step == p.steps_per_epoch {
            self.stop_requested = true;
        }
    }
    fn epoch(&mut self, _m: &cvdist_common::proto::EpochMetrics) {
        self.epochs_reported += 1;
    }
    fn checkpoint(&mut self, _json: &std::path::Path, _state: &cvdist_worker::train::checkpoint::CheckpointState) {
        self.checkpoints += 1;
    }
    fn should_stop(&mut self) -> Option<String> {
        self.stop_requested.then(|| "job cancelled by user".to_string())
    }
}

#[test]
fn a_stop_during_the_test_pass_ends_training_without_finishing_the_epoch() {
    use cvdist_worker::data::Datasets;
    use cvdist_worker::train::{self, TrainError, TrainerConfig};
    let dir = tempfile::tempdir().unwrap();
    let mut spec = cvdist_common::spec::default_spec("resnet20", 2);
    spec.dataset = "synthetic".into();
    spec.train_samples = 64;
    // The whole synthetic test set: ten evaluation batches, each a stop point.
    spec.test_samples = 1000;
    spec.batch_size = 32;
    let data = Datasets::for_spec(&spec, None).unwrap();
    let cfg = TrainerConfig { checkpoint_dir: Some(dir.path().join("checkpoints")), ..trainer_config::cpu(spec, 0, 1) };
    let mut observer = StopDuringEval::default();
    let r = train::train(&cfg, &data, &mut cvdist_worker::collective::Solo::new(), &mut observer);
    assert!(observer.stop_requested);
    assert!(matches!(r, Err(TrainError::Stopped(ref reason)) if reason.contains("cancelled")), "{:?}", r.err());
    // Before, the whole test pass ran, the epoch's checkpoint was written and its metrics
    // reported, and only the next epoch's first step saw the stop.
    assert_eq!(observer.checkpoints, 0);
    assert_eq!(observer.epochs_reported, 0);
}
