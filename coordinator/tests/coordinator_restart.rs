//! A coordinator restart does not stop training. Real processes: the
//! coordinator is SIGKILLed mid-epoch and started again on the same state dir and port; the
//! workers keep training meanwhile and a restarted coordinator re-adopts their attempt.

mod cluster;

use cluster::{
    final_weights_sha, is_progress_in, small_spec, spawn_logged, watch_until_done, worker_bin, Cluster, WORKER_TOKEN,
};
use cvdist_common::client::connect;
use cvdist_common::proto::{
    coordinator_message, job_event, worker_message, Assignment, CoordinatorMessage, GetJobRequest, JobInfo, JobSpec,
    JobState, RegisterRequest, RejoinRequest, WorkerMessage,
};
use cvdist_common::rejoin;
use cvdist_common::version::PROTOCOL_VERSION;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(300);
const EPOCHS: u32 = 3;
/// How long the coordinator stays down in the re-adoption test.
const DOWN: Duration = Duration::from_secs(5);

/// The job of `fault_tolerance.rs` with 4 times the data: resnet20, 3 epochs of 3,072
/// synthetic images on 2 workers (48 steps per epoch), a checkpoint every 4 steps. Long
/// enough (about 10 s here) that the job is still training when the coordinator comes back.
fn spec() -> JobSpec {
    let mut s = small_spec("resnet20", EPOCHS, (2, 2));
    s.train_samples = 3072;
    s.checkpoint_every_steps = 4;
    s.max_restarts = 3;
    s
}

/// Starts worker `k` as `Cluster::start_worker` does, with `extra` arguments.
fn start_worker_with(c: &mut Cluster, k: usize, extra: &[&str]) {
    let log = c.log(&format!("worker-{k}"));
    let mut cmd = Command::new(worker_bin());
    cmd.args(["worker", "--coordinator", &c.url(), "--data-listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--worker-id", &format!("w{k}")])
        .arg("--cache-dir")
        .arg(c.dir.path().join(format!("cache-{k}")))
        .arg("--data")
        .arg(c.data())
        .args(extra);
    let child = spawn_logged(&mut cmd, log);
    while c.workers.len() <= k {
        c.workers.push(None);
    }
    c.workers[k] = Some(child);
}

/// Two workers (with `extra` arguments) and the job submitted to them.
async fn two_worker_job(extra: &[&str]) -> (Cluster, String) {
    let mut c = Cluster::new(1024, 100);
    start_worker_with(&mut c, 0, extra);
    start_worker_with(&mut c, 1, extra);
    let job = c.submit(spec()).await;
    (c, job)
}

/// Runs the job to its end; when its first progress report of epoch 1 arrives, the
/// coordinator is SIGKILLed and started again `down` later. Returns the final record and
/// the position (epoch, step) of the report the kill followed.
async fn run_with_coordinator_restart(c: &mut Cluster, job: &str, down: Duration) -> (JobInfo, (u32, u64)) {
    let url = c.url();
    let mut killed_at = None;
    let (info, _) = watch_until_done(&url, job, TIMEOUT, |ev| match &ev.event {
        Some(job_event::Event::Progress(p)) if killed_at.is_none() && is_progress_in(ev, 1) => {
            c.kill_coordinator();
            std::thread::sleep(down);
            c.start_coordinator();
            killed_at = Some((p.epoch, p.step));
            true // the old stream is dead; watch again on the new coordinator
        }
        _ => false,
    })
    .await;
    let killed_at = killed_at.unwrap_or_else(|| panic!("the job ended before the kill\n{}", c.logs()));
    (info, killed_at)
}

/// Seconds the job trained: the sum of its epochs' `seconds` (each epoch's wall time on
/// rank 0, so a pause in training shows there; waiting for the coordinator to store the
/// final model after the last epoch does not).
fn training_seconds(info: &JobInfo) -> f64 {
    info.history.iter().map(|m| m.seconds).sum()
}

/// The run's wall time, first attempt start to end (`summary.json`'s `wall_seconds`).
fn wall_seconds(c: &Cluster, job: &str) -> f64 {
    cvdist_common::run_dir::read_summary(&c.state_dir().join("jobs").join(job)).unwrap().wall_seconds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restart_mid_epoch_is_re_adopted_with_no_step_replayed() {
    // The uninterrupted run: the reference for the weights and the wall time.
    let (reference, reference_wall, reference_training) = {
        let (c, job) = two_worker_job(&[]).await;
        let (info, _) = watch_until_done(&c.url(), &job, TIMEOUT, |_| false).await;
        assert_eq!(info.state(), JobState::Succeeded, "{}", c.logs());
        (final_weights_sha(&c, &job, EPOCHS), wall_seconds(&c, &job), training_seconds(&info))
    };

    let (mut c, job) = two_worker_job(&[]).await;
    let started = Instant::now();
    let (info, killed_at) = run_with_coordinator_restart(&mut c, &job, DOWN).await;
    let elapsed = started.elapsed();
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{:?}\n{}", info.message, info.events, c.logs());
    // Re-adopted: the same attempt ran to the end; no abort, no recovery, nothing replayed.
    assert_eq!((info.attempt, info.restarts), (0, 0), "{:?}", info.events);
    assert!(info.recoveries.is_empty(), "{:?}", info.recoveries);
    let summary = cvdist_common::run_dir::read_summary(&c.state_dir().join("jobs").join(&job)).unwrap();
    assert!(summary.recoveries.is_empty(), "{:?}", summary.recoveries);
    assert!(!info.events.iter().any(|e| e.contains("recovering")), "{:?}", info.events);
    let waiting = info.events.iter().find(|e| e.contains("coordinator restarted; waiting up to 15s for the 2 workers"));
    assert!(waiting.is_some(), "{:?}", info.events);
    let adopted = info
        .events
        .iter()
        .find(|e| e.contains("attempt 0 re-adopted: all 2 workers re-registered"))
        .unwrap_or_else(|| panic!("no re-adoption in {:?}", info.events));
    assert!(adopted.ends_with("no step replayed"), "{adopted}");
    // The workers trained on while the coordinator was down: the position they claimed
    // when they re-registered is past the report the kill followed.
    let claimed: Vec<u64> = adopted
        .split(" at epoch ")
        .nth(1)
        .map(|r| r.split(|ch: char| !ch.is_ascii_digit()).filter_map(|n| n.parse().ok()).take(2).collect())
        .unwrap_or_default();
    assert_eq!(claimed.len(), 2, "{adopted}");
    let claimed = (claimed[0] as u32, claimed[1]);
    assert!(claimed > killed_at, "re-registered at {claimed:?}, killed after {killed_at:?}: {adopted}");
    // Every epoch is recorded once, by attempt 0, including those reported while the
    // coordinator was away.
    assert_eq!(info.history.len() as u32, EPOCHS, "{:?}", info.history);
    assert!(info.history.iter().enumerate().all(|(e, m)| m.epoch == e as u32 && m.attempt == 0), "{:?}", info.history);
    // The final model is stored, and it is the uninterrupted run's, bit for bit.
    assert_eq!(final_weights_sha(&c, &job, EPOCHS), reference, "the re-adopted run differs from the uninterrupted one");

    // Measurements for docs/RELIABILITY.md: how long after the restart the attempt was
    // re-adopted (from the log line), and how much longer the run took than the reference.
    let readopt_s: f64 = adopted
        .split(" re-registered ")
        .nth(1)
        .and_then(|r| r.split(" s after").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no time in {adopted}"));
    assert!(readopt_s < 15.0, "re-adopted after {readopt_s} s, the window is 15 s");
    let wall = wall_seconds(&c, &job);
    let log = std::fs::read_to_string(c.dir.path().join("worker-0.log")).unwrap();
    assert!(log.contains("the coordinator re-adopted the running attempt"), "{log}");
    let training = training_seconds(&info);
    eprintln!(
        "coordinator restart measured: killed after {killed_at:?}, down {:.1} s, workers re-registered at {claimed:?}, \
         re-adopted {readopt_s:.1} s after the restart; training {training:.1} s vs {reference_training:.1} s \
         uninterrupted ({:+.1} s); job wall {wall:.1} s vs {reference_wall:.1} s ({:+.1} s); test {:.1} s",
        DOWN.as_secs_f64(),
        training - reference_training,
        wall - reference_wall,
        elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_down_longer_than_the_workers_wait_falls_back_to_recovery() {
    // The workers stop their job after 3 s without a session; the coordinator is down 8 s.
    let (mut c, job) = two_worker_job(&["--detached-timeout", "3"]).await;
    let (info, _) = run_with_coordinator_restart(&mut c, &job, Duration::from_secs(8)).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{:?}\n{}", info.message, info.events, c.logs());
    // A restart is not the job's failure: no restart counted, one recovery recorded.
    assert_eq!(info.restarts, 0, "{:?}", info.events);
    assert_eq!(info.recoveries.len(), 1, "{:?}", info.recoveries);
    let r = &info.recoveries[0];
    // Either the member that stopped the job re-registers first, or the other one's
    // broken ring is reported first: both end the wait without counting a restart.
    assert!(
        (r.cause.starts_with("coordinator restarted; attempt 0 not re-adopted: worker w")
            && r.cause.ends_with(" re-registered without it"))
            || (r.cause.starts_with("coordinator restarted; attempt 0 not re-adopted: rank ")
                && r.cause.ends_with(" while the others had not re-registered")),
        "{r:?}"
    );
    assert_eq!((r.attempt, r.old_world_size, r.new_world_size), (0, 2, 2), "{r:?}");
    assert!(info.attempt >= 1);
    assert_eq!(info.history.len() as u32, EPOCHS, "{:?}", info.history);
    final_weights_sha(&c, &job, EPOCHS);
    // A member was training when its limit passed and stopped the job itself (usually
    // rank 0: rank 1 may have trained to the end by then).
    let logs: Vec<String> =
        (0..2).map(|k| std::fs::read_to_string(c.dir.path().join(format!("worker-{k}.log"))).unwrap()).collect();
    assert!(logs.iter().any(|l| l.contains("no session with the coordinator for 3s (--detached-timeout)")), "{logs:?}");
}

/// A raw worker session opened with `first`; returns the sender that keeps it open and the
/// coordinator's answer: the first message (`Registered`), or the refusal.
async fn raw_session(
    c: &Cluster,
    first: worker_message::Msg,
) -> Result<(mpsc::UnboundedSender<WorkerMessage>, tonic::Streaming<CoordinatorMessage>, bool), tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WorkerMessage { msg: Some(first) }).unwrap();
    let mut client = connect(&c.url(), Some(WORKER_TOKEN), None).await.unwrap();
    let mut inbound =
        client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Registered(r)) }) => Ok((tx, inbound, r.adopted)),
        other => panic!("expected Registered, got {other:?}"),
    }
}

fn register(id: &str) -> RegisterRequest {
    RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.into(),
        data_addr: "127.0.0.1:9".into(),
        capabilities: None,
    }
}

/// The claim of `id` on `a`'s rank, signed with `secret`.
fn rejoin_as(id: &str, a: &Assignment, secret: &str) -> worker_message::Msg {
    let claim =
        rejoin::Claim { job_id: &a.job_id, attempt: a.attempt, rank: a.rank, world_size: a.world_size, worker_id: id };
    worker_message::Msg::Rejoin(RejoinRequest {
        register: Some(register(id)),
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        world_size: a.world_size,
        epoch: 0,
        step: 0,
        proof: rejoin::proof(secret, &claim),
    })
}

/// Over real gRPC to a restarted coordinator process: holding the worker credential is not
/// enough to take a rank of a running attempt; the attempt's secret is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_registration_must_prove_the_attempt_it_claims() {
    let mut c = Cluster::new(16, 16);
    let mut s = small_spec("resnet20", 1, (1, 1));
    s.dataset = "synthetic".into();
    let job = c.submit(s).await;
    // The "worker" is this test: it registers as w0 and is given the job.
    let (tx, mut inbound, _) = raw_session(&c, worker_message::Msg::Register(register("w0"))).await.unwrap();
    let a = loop {
        match inbound.message().await.unwrap() {
            Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) }) => break a,
            Some(_) => continue,
            None => panic!("session ended before the assignment\n{}", c.logs()),
        }
    };
    drop((tx, inbound));
    c.kill_coordinator();
    c.start_coordinator();

    // Another id, or the right id with a forged proof: refused, no session.
    let forged = raw_session(&c, rejoin_as("w0", &a, "guessed")).await.map(|_| ()).unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    assert_eq!(
        forged.message(),
        format!("re-registration refused: the proof for rank 0 of attempt 0 of job {job} does not match")
    );
    // A stranger with the secret but under another id is not w0: not adopted, and the job
    // waits on for w0.
    let (_s, _i, adopted) = raw_session(&c, rejoin_as("w9", &a, &a.session_secret)).await.unwrap();
    assert!(!adopted);
    let mut client = c.client().await;
    let info = client.get_job(GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    assert_eq!((info.state(), info.attempt), (JobState::Running, 0), "{:?}", info.events);
    // The member itself, with its proof: adopted, no recovery.
    let (_s, _i, adopted) = raw_session(&c, rejoin_as("w0", &a, &a.session_secret)).await.unwrap();
    assert!(adopted);
    let info = client.get_job(GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    assert_eq!((info.state(), info.attempt, info.restarts), (JobState::Running, 0, 0));
    assert!(info.recoveries.is_empty());
    assert!(info.events.last().unwrap().contains("attempt 0 re-adopted: all 1 workers"), "{:?}", info.events);
}
