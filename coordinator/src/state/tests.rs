//! The coordinator's state through its methods: message order to workers, effects run
//! outside the lock and before anyone sees their result, restarts.

use super::*;
use cvdist_common::proto::{
    coordinator_message, CoordinatorMessage, EpochMetrics, JobInfo, JobReport, JobSpec, JobState, RegisterRequest,
    RejoinRequest, WorkerState,
};
use cvdist_common::{spec, version};
use std::sync::{Condvar, OnceLock, Weak};
use tokio::sync::broadcast;
use tokio::sync::mpsc;

fn open() -> (tempfile::TempDir, Arc<Coordinator>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let state = Coordinator::new(store, StateConfig { heartbeat_timeout: Duration::from_secs(60) }).expect("state");
    (dir, state)
}

fn register(state: &Coordinator, id: &str) -> mpsc::UnboundedReceiver<Result<CoordinatorMessage, Status>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = RegisterRequest {
        protocol_version: version::PROTOCOL_VERSION,
        worker_id: id.into(),
        data_addr: "127.0.0.1:40000".into(),
        ..Default::default()
    };
    state.register(req, tx).expect("register");
    rx
}

fn next(rx: &mut mpsc::UnboundedReceiver<Result<CoordinatorMessage, Status>>) -> coordinator_message::Msg {
    rx.try_recv().expect("a message").expect("not an error").msg.expect("a message body")
}

#[test]
fn a_worker_hears_registered_before_its_first_assignment() {
    // A job is already waiting when the worker registers, so the scheduler can hand it
    // out at once; the session key must still reach the worker first.
    let (_dir, state) = open();
    state.submit(spec::default_spec("resnet20", 1)).expect("submit");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let req = RegisterRequest {
        protocol_version: version::PROTOCOL_VERSION,
        worker_id: "w1".into(),
        data_addr: "127.0.0.1:40000".into(),
        ..Default::default()
    };
    let (id, _) = state.register(req, tx).expect("register");
    state.tick();
    let first = rx.try_recv().expect("a first message").expect("not an error").msg;
    let key = match first {
        Some(coordinator_message::Msg::Registered(r)) => {
            assert_eq!(r.worker_id, id);
            r.session_key
        }
        other => panic!("the first message must be Registered, got {other:?}"),
    };
    assert_eq!(key.len(), 64, "a 32-byte hex session key");
    match rx.try_recv().expect("a second message").expect("not an error").msg {
        Some(coordinator_message::Msg::Assignment(a)) => assert_eq!(a.rank, 0),
        other => panic!("the second message must be the assignment, got {other:?}"),
    }
}

#[test]
fn a_survivor_hears_the_abort_before_its_next_assignment() {
    let (_dir, state) = open();
    let id =
        state.submit(JobSpec { min_workers: 2, max_workers: 2, ..spec::default_spec("resnet20", 2) }).expect("submit");
    let mut w1 = register(&state, "w1");
    let _w2 = register(&state, "w2");
    state.tick();
    state.session_closed("w2", 2, "eof");
    assert_eq!(state.get(&id).unwrap().state(), JobState::Recovering);
    let _w3 = register(&state, "w3");
    // Past the grace period without waiting for it.
    state.lock().jobs.get_mut(&id).unwrap().job.not_before = std::time::Instant::now();
    state.tick();
    assert_eq!(state.get(&id).unwrap().state(), JobState::Running);
    assert!(matches!(next(&mut w1), coordinator_message::Msg::Registered(_)));
    match next(&mut w1) {
        coordinator_message::Msg::Assignment(a) => assert_eq!(a.attempt, 0),
        other => panic!("expected the first assignment, got {other:?}"),
    }
    match next(&mut w1) {
        coordinator_message::Msg::Abort(a) => {
            assert_eq!((a.attempt, a.reason.as_str()), (0, "worker w2 lost (eof)"))
        }
        other => panic!("expected the abort, got {other:?}"),
    }
    match next(&mut w1) {
        coordinator_message::Msg::Assignment(a) => assert_eq!((a.attempt, a.world_size), (1, 2)),
        other => panic!("expected the second assignment, got {other:?}"),
    }
}

#[test]
fn the_event_channel_exists_only_while_someone_watches() {
    let (_dir, state) = open();
    let id = state.submit(spec::default_spec("resnet20", 1)).expect("submit");
    let events = |state: &Coordinator| state.lock().jobs[&id].events.is_some();
    assert!(!events(&state), "no channel without a watcher");
    let (snapshot, sub) = state.watch(&id).expect("watch");
    let mut sub = sub.expect("a subscription while the job is active");
    assert_eq!(snapshot.events.len(), 1, "the submission is in the snapshot");
    assert!(matches!(sub.try_recv(), Err(broadcast::error::TryRecvError::Empty)), "and not sent again");
    state.checkpoint_refused(&id, 0, "ckpt-e0001-s000000", "watched");
    match sub.try_recv().map(|e| e.event) {
        Ok(Some(job_event::Event::Log(line))) => assert!(line.ends_with(" watched"), "{line}"),
        other => panic!("expected the log line, got {other:?}"),
    }
    drop(sub);
    state.checkpoint_refused(&id, 0, "ckpt-e0001-s000000", "the watcher left");
    assert!(!events(&state), "the channel goes with its last watcher");
    assert_eq!(state.get(&id).unwrap().events.len(), 3, "the event log itself is kept");
}

#[test]
fn a_retired_job_keeps_only_what_listing_and_scheduling_need() {
    let (_dir, state) = open();
    let id = state.submit(spec::default_spec("resnet20", 2)).expect("submit");
    state.lock().jobs.get_mut(&id).unwrap().job.info.history.push(EpochMetrics::default());
    let (_, sub) = state.watch(&id).expect("watch");
    let mut sub = sub.expect("a subscription");
    let full = state.cancel(&id).expect("cancel");
    assert_eq!(full.history.len(), 1, "cancel answers with the whole record");
    let inner = state.lock();
    let entry = &inner.jobs[&id];
    assert!(entry.retired && entry.events.is_none());
    assert!(entry.job.info.history.is_empty() && entry.job.info.events.is_empty());
    assert_eq!((entry.job.info.state(), entry.job.info.message.as_str()), (JobState::Cancelled, "cancelled by user"));
    assert!(entry.job.info.spec.is_some(), "the name check on submit needs the spec");
    drop(inner);
    let mut last = None;
    while let Ok(e) = sub.try_recv() {
        last = e.event;
    }
    match last {
        Some(job_event::Event::Snapshot(s)) => assert_eq!(s.state(), JobState::Cancelled),
        other => panic!("the watcher's last event is the final snapshot, got {other:?}"),
    }
    let stored = state.get(&id).expect("get");
    assert_eq!((stored.history.len(), stored.events.len()), (1, 2), "read back from the store");
}

/// Records the effects, checks each runs outside the coordinator's lock, and can hold a
/// job-record write or fail it.
#[derive(Default)]
struct Recorder {
    store: OnceLock<Arc<Store>>,
    state: OnceLock<Weak<Coordinator>>,
    log: Mutex<Vec<String>>,
    /// Set: the next job-record write of this state waits until it is cleared.
    hold: Mutex<Option<JobState>>,
    held: Condvar,
    fail_puts: Mutex<bool>,
}

impl Recorder {
    fn note(&self, what: String) {
        if let Some(state) = self.state.get().and_then(Weak::upgrade) {
            assert!(state.inner.try_lock().is_ok(), "{what} ran under the coordinator's lock");
        }
        self.log.lock().unwrap().push(what);
    }

    fn log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Durable for Recorder {
    fn put_job(&self, info: &JobInfo) -> Result<(), StoreError> {
        self.note(format!("put {}", state_name(info.state())));
        let mut hold = self.hold.lock().unwrap();
        if *hold == Some(info.state()) {
            self.held.notify_all();
            while hold.is_some() {
                hold = self.held.wait(hold).unwrap();
            }
        }
        drop(hold);
        if *self.fail_puts.lock().unwrap() {
            return Err(StoreError::Db { path: "state.redb".into(), message: "disk full".into() });
        }
        self.store.get().unwrap().put_job(info)
    }

    fn write_spec(&self, job_id: &str, spec: &JobSpec) -> Result<(), run_dir::RunDirError> {
        self.note("spec".into());
        Durable::write_spec(&**self.store.get().unwrap(), job_id, spec)
    }

    fn write_metrics(&self, job_id: &str, history: &[EpochMetrics]) -> Result<(), run_dir::RunDirError> {
        self.note("metrics".into());
        Durable::write_metrics(&**self.store.get().unwrap(), job_id, history)
    }

    fn write_summary(&self, job_id: &str, summary: &run_dir::Summary) -> Result<(), run_dir::RunDirError> {
        self.note("summary".into());
        Durable::write_summary(&**self.store.get().unwrap(), job_id, summary)
    }

    fn checkpoint_on_disk(&self, job_id: &str, name: &str) -> bool {
        self.store.get().unwrap().checkpoint_on_disk(job_id, name)
    }
}

fn recorded() -> (tempfile::TempDir, Arc<Recorder>, Arc<Coordinator>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let recorder = Arc::new(Recorder::default());
    let _ = recorder.store.set(store.clone());
    let cfg = StateConfig { heartbeat_timeout: Duration::from_secs(60) };
    let state = Coordinator::with_durable(store, recorder.clone(), cfg).expect("state");
    let _ = recorder.state.set(Arc::downgrade(&state));
    (dir, recorder, state)
}

#[test]
fn effects_run_outside_the_lock_in_the_order_decided() {
    let (_dir, recorder, state) = recorded();
    let id = state.submit(spec::default_spec("resnet20", 2)).expect("submit");
    assert_eq!(recorder.log(), ["spec", "put queued"]);
    let _w = register(&state, "w1");
    state.tick();
    assert_eq!(recorder.log(), ["put running"]);
    state.cancel(&id).expect("cancel");
    assert_eq!(recorder.log(), ["put cancelled", "summary", "metrics"]);
    assert!(state.store().job_dir(&id).join(run_dir::SUMMARY_FILE).is_file());
}

#[test]
fn no_client_sees_a_state_before_its_record_is_durable() {
    let (_dir, recorder, state) = recorded();
    let id = state.submit(spec::default_spec("resnet20", 2)).expect("submit");
    *recorder.hold.lock().unwrap() = Some(JobState::Cancelled);
    let canceller = {
        let (state, id) = (state.clone(), id.clone());
        std::thread::spawn(move || state.cancel(&id).map(|j| j.state()))
    };
    // Wait until the cancellation's record write has begun (and is held).
    {
        let mut hold = recorder.hold.lock().unwrap();
        while !recorder.log.lock().unwrap().iter().any(|l| l == "put cancelled") {
            hold = recorder.held.wait_timeout(hold, Duration::from_millis(50)).unwrap().0;
        }
    }
    // The lock is free meanwhile: counters and workers answer at once.
    assert_eq!(state.stats().jobs_by_state.get("cancelled"), Some(&1));
    let reader = {
        let (state, id) = (state.clone(), id.clone());
        std::thread::spawn(move || state.get(&id).map(|j| j.state()))
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(!reader.is_finished(), "GetJob answered with a record not yet stored");
    assert!(!canceller.is_finished(), "CancelJob answered before its record was stored");
    *recorder.hold.lock().unwrap() = None;
    recorder.held.notify_all();
    assert_eq!(reader.join().unwrap().unwrap(), JobState::Cancelled);
    assert_eq!(canceller.join().unwrap().unwrap(), JobState::Cancelled);
    let stored = state.store().get_jobs(&[id.as_str()]).unwrap().pop().flatten().unwrap();
    assert_eq!(stored.state(), JobState::Cancelled);
}

#[test]
fn a_submission_that_cannot_be_stored_leaves_no_job_behind() {
    let (_dir, recorder, state) = recorded();
    *recorder.fail_puts.lock().unwrap() = true;
    let spec = JobSpec { name: "mine".into(), ..spec::default_spec("resnet20", 2) };
    let err = state.submit(spec.clone()).unwrap_err();
    assert_eq!(err.to_string(), "coordinator storage error: state database state.redb: disk full");
    assert!(state.list().unwrap().is_empty());
    assert!(matches!(state.get("j0001-resnet20"), Err(CoordinatorError::NoSuchJob(_))));
    *recorder.fail_puts.lock().unwrap() = false;
    assert_eq!(state.submit(spec).expect("the name is free again"), "j0002-resnet20");
}

/// The spec a job runs by is taken from its record once; the record keeps it, in the store
/// and in every answer, and a record stored without one still loads.
#[test]
fn the_record_keeps_its_spec_and_one_stored_without_a_spec_still_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = StateConfig { heartbeat_timeout: Duration::from_secs(60) };
    let store = Store::open(dir.path()).unwrap();
    let bare = JobInfo { id: "j0007-bare".into(), state: JobState::Queued as i32, ..Default::default() };
    store.put_job(&bare).unwrap();
    drop(store);
    let state = Coordinator::new(Store::open(dir.path()).unwrap(), cfg).unwrap();
    let loaded = state.get("j0007-bare").expect("loaded");
    assert_eq!((loaded.state(), loaded.spec.is_none()), (JobState::Queued, true), "the record as stored");
    let spec = JobSpec { name: "kept".into(), ..spec::default_spec("resnet20", 2) };
    let id = state.submit(spec.clone()).expect("submit");
    assert_eq!(id, "j0008-resnet20", "ids go on after the loaded ones");
    let cancelled = state.cancel(&id).expect("cancel");
    assert_eq!(cancelled.spec.as_ref(), Some(&spec));
    let stored = state.store().get_jobs(&[id.as_str()]).unwrap().pop().flatten().unwrap();
    assert_eq!(stored.spec.as_ref(), Some(&spec));
    assert!(matches!(state.submit(spec), Err(CoordinatorError::NameTaken(_))), "the name is held by the ended job");
}

#[test]
fn a_restarted_coordinator_resumes_running_jobs_in_a_new_attempt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = StateConfig { heartbeat_timeout: Duration::from_secs(60) };
    let id = {
        let state = Coordinator::new(Store::open(dir.path()).unwrap(), cfg.clone()).unwrap();
        let id = state.submit(spec::default_spec("resnet20", 2)).expect("submit");
        let _w = register(&state, "w1");
        state.tick();
        assert_eq!(state.get(&id).unwrap().state(), JobState::Running);
        id
    };
    let state = Coordinator::new(Store::open(dir.path()).unwrap(), cfg).unwrap();
    // The running attempt first waits for its workers to re-register.
    let info = state.get(&id).unwrap();
    assert_eq!((info.state(), info.attempt), (JobState::Running, 0));
    assert!(info
        .events
        .last()
        .unwrap()
        .ends_with("coordinator restarted; waiting up to 180s for the 1 workers of attempt 0 (w1) to re-register"));
    // Its worker comes back without it: the job falls back to a new attempt.
    let _w = register(&state, "w1");
    let info = state.get(&id).unwrap();
    assert_eq!((info.state(), info.attempt), (JobState::Recovering, 1));
    let stored = state.store().get_jobs(&[id.as_str()]).unwrap().pop().flatten().unwrap();
    assert_eq!(stored.attempt, 1, "the new attempt is stored");
}

// ------------------------------------------------------------------ re-adopting a running attempt after a restart

/// A 2-worker job RUNNING in attempt 0 on w1, w2 in a store under `dir`; returns its id and
/// each worker's assignment (for the attempt secret).
fn running_pair(dir: &std::path::Path) -> (String, Vec<cvdist_common::proto::Assignment>) {
    let cfg = StateConfig { heartbeat_timeout: Duration::from_secs(60) };
    let state = Coordinator::new(Store::open(dir).unwrap(), cfg).unwrap();
    let id =
        state.submit(JobSpec { min_workers: 2, max_workers: 2, ..spec::default_spec("resnet20", 2) }).expect("submit");
    let mut rx = [register(&state, "w1"), register(&state, "w2")];
    state.tick();
    let assignments = rx
        .iter_mut()
        .map(|rx| {
            assert!(matches!(next(rx), coordinator_message::Msg::Registered(_)));
            match next(rx) {
                coordinator_message::Msg::Assignment(a) => a,
                other => panic!("expected an assignment, got {other:?}"),
            }
        })
        .collect();
    (id, assignments)
}

/// The `RejoinRequest` of worker `id` claiming `a`'s rank, its proof made with `secret`.
fn rejoin_request(id: &str, a: &cvdist_common::proto::Assignment, secret: &str) -> RejoinRequest {
    let claim =
        rejoin::Claim { job_id: &a.job_id, attempt: a.attempt, rank: a.rank, world_size: a.world_size, worker_id: id };
    RejoinRequest {
        register: Some(RegisterRequest {
            protocol_version: version::PROTOCOL_VERSION,
            worker_id: id.into(),
            data_addr: "127.0.0.1:40000".into(),
            ..Default::default()
        }),
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        world_size: a.world_size,
        epoch: 1,
        step: 3,
        proof: rejoin::proof(secret, &claim),
    }
}

/// Sends `req` and returns the worker's `Registered.adopted`, or the refusal.
fn rejoin(state: &Coordinator, req: RejoinRequest) -> Result<bool, CoordinatorError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    state.rejoin(req, tx)?;
    match next(&mut rx) {
        coordinator_message::Msg::Registered(r) => Ok(r.adopted),
        other => panic!("expected Registered, got {other:?}"),
    }
}

fn restarted(dir: &std::path::Path) -> Arc<Coordinator> {
    Coordinator::new(Store::open(dir).unwrap(), StateConfig { heartbeat_timeout: Duration::from_secs(60) }).unwrap()
}

#[test]
fn a_restarted_coordinator_re_adopts_the_attempt_when_every_member_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let (id, a) = running_pair(dir.path());
    let state = restarted(dir.path());
    assert!(rejoin(&state, rejoin_request("w1", &a[0], &a[0].session_secret)).unwrap(), "w1 adopted");
    let info = state.get(&id).unwrap();
    assert_eq!((info.state(), info.attempt), (JobState::Running, 0), "still waiting for w2");
    assert!(rejoin(&state, rejoin_request("w2", &a[1], &a[1].session_secret)).unwrap(), "w2 adopted");
    let info = state.get(&id).unwrap();
    assert_eq!((info.state(), info.attempt, info.restarts), (JobState::Running, 0, 0));
    assert!(info.recoveries.is_empty(), "no recovery: {:?}", info.recoveries);
    let line = info.events.last().unwrap();
    assert!(line.contains("attempt 0 re-adopted: all 2 workers re-registered"), "{line}");
    assert!(line.ends_with("at epoch 1 step 3; no step replayed"), "{line}");
    // Both sessions hold their rank: the workers are busy in attempt 0, rank 0 may upload.
    let workers = state.workers();
    assert!(workers.iter().all(|w| w.state() == WorkerState::Busy && w.attempt == 0), "{workers:?}");
    // A replayed epoch report is recorded once.
    let (_, session) =
        state.lock().workers.iter().find(|(w, _)| *w == "w1").map(|(w, e)| (w.clone(), e.session)).unwrap();
    let epoch = JobReport {
        job_id: id.clone(),
        attempt: 0,
        rank: 0,
        kind: Some(cvdist_common::proto::job_report::Kind::Epoch(EpochMetrics { epoch: 0, ..Default::default() })),
        failure_kind: 0,
    };
    state.report("w1", session, epoch.clone()).unwrap();
    state.report("w1", session, epoch).unwrap();
    assert_eq!(state.get(&id).unwrap().history.len(), 1);
}

#[test]
fn a_rejoin_must_prove_the_attempt_and_cannot_take_another_workers_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (id, a) = running_pair(dir.path());
    let state = restarted(dir.path());
    // Someone with the worker credential but not the attempt's secret, posing as w2.
    let forged = rejoin_request("w2", &a[1], "not-the-secret");
    match rejoin(&state, forged) {
        Err(e @ CoordinatorError::RejoinRefused(_)) => assert_eq!(
            e.to_string(),
            format!("re-registration refused: the proof for rank 1 of attempt 0 of job {id} does not match")
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A proof made for another claim does not carry over (w1's proof, presented as w2).
    let mut stolen = rejoin_request("w2", &a[1], &a[1].session_secret);
    stolen.proof = rejoin_request("w1", &a[0], &a[0].session_secret).proof;
    assert!(matches!(rejoin(&state, stolen), Err(CoordinatorError::RejoinRefused(_))));
    let info = state.get(&id).unwrap();
    assert_eq!((info.state(), info.attempt), (JobState::Running, 0), "nothing changed");
    assert!(state.workers().is_empty(), "no session was opened");
    // A member with the secret claiming the other member's rank is not adopted: w1 is then
    // back without its own rank, so the attempt falls back to recovery.
    let mut other_rank = rejoin_request("w1", &a[1], &a[1].session_secret);
    other_rank.register.as_mut().unwrap().worker_id = "w1".into();
    assert!(!rejoin(&state, other_rank).unwrap());
    let info = state.get(&id).unwrap();
    assert_eq!((info.state(), info.attempt), (JobState::Recovering, 1));
    assert!(info.message.contains("attempt 0 not re-adopted: worker w1 re-registered without it"), "{}", info.message);
}

#[test]
fn a_stale_claim_is_not_adopted_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (id, a) = running_pair(dir.path());
    // Re-adopted, then a member is lost: the coordinator fails the attempt; the lost
    // worker, still holding it, comes back claiming it and is answered "not adopted".
    let state = restarted(dir.path());
    assert!(rejoin(&state, rejoin_request("w1", &a[0], &a[0].session_secret)).unwrap());
    assert!(rejoin(&state, rejoin_request("w2", &a[1], &a[1].session_secret)).unwrap());
    state.session_closed("w2", 2, "eof");
    assert_eq!(state.get(&id).unwrap().state(), JobState::Recovering);
    assert!(!rejoin(&state, rejoin_request("w2", &a[1], &a[1].session_secret)).unwrap(), "attempt 0 is over");
}
