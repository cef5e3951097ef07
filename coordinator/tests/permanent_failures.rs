//! Failures that a restart would only repeat: a diverged run, a job the
//! workers cannot run as configured. They end the job at once, FAILED with the reason and
//! an outcome in summary.json, after exactly one attempt; only lost or failed peers are
//! restarted. And a diverged run's files stay readable by cvdist's own tools.
//!
//! Real `cvdist train` / `cvdist local` processes (real workers, gRPC, libtorch), and raw
//! worker sessions against a real coordinator process for the order in which ranks report.

mod cluster;

use cluster::{
    cvdist_bin, free_port, local_on_cpu, spawn_coordinator, wait_port, write_dataset, ChildGuard, TOKEN, WORKER_TOKEN,
};
use cvdist_common::client::connect;
use cvdist_common::proto::{
    coordinator_message, job_report, worker_message, CoordinatorMessage, FailureKind, GetJobRequest, JobReport,
    JobState, RegisterRequest, SubmitJobRequest, WorkerMessage,
};
use cvdist_common::run_dir;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn worker_logs(dir: &Path) -> String {
    let mut s = String::new();
    for k in 0..4 {
        if let Ok(t) = std::fs::read_to_string(dir.join(format!("worker-{k}.log"))) {
            s.push_str(&format!("==== worker-{k}.log\n{t}\n"));
        }
    }
    s
}

/// `cvdist local` of resnet20 on synthetic data, one thread per worker, plus `extra`, on CPU;
/// returns the process output.
fn local(out: &Path, extra: &[&str]) -> Output {
    local_on_cpu().arg("--out").arg(out).args(extra).env("NO_COLOR", "1").output().unwrap()
}

/// `cvdist train --lr 100` diverges: the run must fail as diverged, not say `succeeded`, and
/// `cvdist report` must read its run directory although it holds `"test_loss":null`.
#[test]
fn diverged_bare_run_fails_as_diverged_and_its_files_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("A");
    let out = Command::new(cvdist_bin())
        .args(["train", "--model", "resnet20", "--epochs", "1", "--dataset", "synthetic", "--train-samples", "128"])
        .args(["--test-samples", "100", "--batch-size", "128", "--lr", "100", "--device", "cpu", "--quiet", "--out"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a diverged run must exit non-zero\n{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One step at lr 100 leaves weights whose test loss is inf or NaN (either is divergence).
    assert!(stderr.contains("error: training diverged at epoch 0 step 1: test loss is "), "{}", text(&out));

    let summary = run_dir::read_summary(&a).expect("summary.json reads back");
    assert_eq!(summary.state, "failed", "{summary:?}");
    assert_eq!(summary.outcome, "diverged", "{summary:?}");
    assert!(summary.message.contains("training diverged"), "{summary:?}");

    // Written as null (module cvdist_common::nonfinite), read back as NaN.
    let raw = std::fs::read_to_string(a.join(run_dir::METRICS_FILE)).unwrap();
    assert!(raw.contains("\"test_loss\":null"), "{raw}");
    let metrics = run_dir::read_metrics(&a).expect("metrics.jsonl reads back");
    assert_eq!(metrics.len(), 1);
    assert!(metrics[0].test_loss.is_nan(), "null reads back as NaN: {metrics:?}");
    assert!(metrics[0].train_loss.is_finite(), "{metrics:?}");

    let report =
        Command::new(cvdist_bin()).arg("report").arg(&a).arg("--out").arg(dir.path().join("charts")).output().unwrap();
    assert!(report.status.success(), "cvdist report on a diverged run\n{}", text(&report));
    let table = String::from_utf8_lossy(&report.stdout);
    assert!(table.contains("FAILED (diverged): training diverged at epoch 0 step 1: test loss is "), "{table}");
    assert!(table.contains("wrote "), "charts written: {table}");
}

/// A run diverging from a deterministic state would diverge at the same step again if
/// restarted, so it fails after one attempt.
#[test]
fn diverged_local_job_fails_after_one_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("R");
    let out = local(
        &r,
        &[
            "--epochs",
            "2",
            "--workers",
            "2",
            "--train-samples",
            "1024",
            "--test-samples",
            "100",
            "--batch-size",
            "16",
            "--lr",
            "100",
            "--max-restarts",
            "1",
        ],
    );
    let all = format!("{}\n{}", text(&out), worker_logs(&r));
    assert!(!out.status.success(), "{all}");
    let summary = run_dir::read_summary(&r).expect("summary.json");
    assert_eq!(summary.state, "failed", "{summary:?}\n{all}");
    assert_eq!(summary.outcome, "diverged", "{summary:?}\n{all}");
    assert_eq!(summary.restarts, 0, "{summary:?}\n{all}");
    assert!(summary.message.contains("training diverged at epoch"), "{summary:?}");
    assert!(summary.message.contains("not restarted: the same failure would repeat"), "{summary:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("started on 2 workers").count(), 1, "exactly one attempt\n{all}");
    assert!(!stderr.contains("attempt 1 started"), "{all}");
    assert!(run_dir::read_metrics(&r).is_ok(), "metrics.jsonl of a diverged job reads back");
}

/// `--collective nccl` on CPU workers would fail with "NCCL unavailable" in every attempt, so
/// the job fails at once instead of spending its restart budget (3 by default).
#[test]
fn nccl_on_cpu_workers_fails_at_once_as_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("C");
    let out = local(
        &r,
        &[
            "--epochs",
            "1",
            "--workers",
            "2",
            "--train-samples",
            "256",
            "--test-samples",
            "100",
            "--batch-size",
            "32",
            "--collective",
            "nccl",
        ],
    );
    let all = format!("{}\n{}", text(&out), worker_logs(&r));
    assert!(!out.status.success(), "{all}");
    let summary = run_dir::read_summary(&r).expect("summary.json");
    assert_eq!(summary.state, "failed", "{summary:?}\n{all}");
    assert_eq!(summary.outcome, "configuration", "{summary:?}\n{all}");
    assert_eq!(summary.restarts, 0, "{summary:?}\n{all}");
    assert!(summary.message.contains("--collective nccl requested but unusable on some rank"), "{summary:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("started on 2 workers").count(), 1, "exactly one attempt\n{all}");
}

// ------------------------------------------------------------------ rank order, raw sessions

struct Coord {
    _dir: tempfile::TempDir,
    url: String,
    _child: ChildGuard,
}

fn coordinator() -> Coord {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(&dir.path().join("data"), 16, 16);
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
    let child = spawn_coordinator(port, free_port(), &dir.path().join("state"), &dir.path().join("data"), log);
    wait_port(port);
    Coord { _dir: dir, url: format!("http://127.0.0.1:{port}"), _child: ChildGuard(child) }
}

type Session = (mpsc::UnboundedSender<WorkerMessage>, tonic::Streaming<CoordinatorMessage>);

async fn session(c: &Coord, id: &str) -> Session {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WorkerMessage {
        msg: Some(worker_message::Msg::Register(RegisterRequest {
            protocol_version: cvdist_common::version::PROTOCOL_VERSION,
            worker_id: id.into(),
            data_addr: "127.0.0.1:9".into(),
            capabilities: None,
        })),
    })
    .unwrap();
    let mut client = connect(&c.url, Some(WORKER_TOKEN), None).await.unwrap();
    let inbound =
        client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, inbound)
}

/// Waits for this session's assignment; returns (job, attempt, rank).
async fn assignment(s: &mut Session) -> (String, u32, u32) {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), s.1.message()).await.expect("an assignment").unwrap();
        if let Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) }) = msg {
            return (a.job_id, a.attempt, a.rank);
        }
    }
}

fn failed(job: &str, attempt: u32, rank: u32, why: &str, kind: FailureKind) -> WorkerMessage {
    WorkerMessage {
        msg: Some(worker_message::Msg::Report(JobReport {
            job_id: job.into(),
            attempt,
            rank,
            kind: Some(job_report::Kind::Failed(why.into())),
            failure_kind: kind as i32,
        })),
    }
}

async fn wait_state(c: &Coord, job: &str, want: impl Fn(JobState) -> bool) -> cvdist_common::proto::JobInfo {
    let start = Instant::now();
    loop {
        let mut client = connect(&c.url, Some(TOKEN), None).await.unwrap();
        let info = client.get_job(GetJobRequest { job_id: job.into() }).await.unwrap().into_inner();
        if want(info.state()) {
            return info;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "job {job} stuck in {:?}", info.state());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn two_rank_job(c: &Coord) -> (String, Session, Session) {
    let mut a = session(c, "wa").await;
    let mut b = session(c, "wb").await;
    let mut spec = cvdist_common::spec::default_spec("resnet20", 2);
    spec.dataset = "synthetic".into();
    spec.min_workers = 2;
    spec.max_workers = 2;
    let mut client = connect(&c.url, Some(TOKEN), None).await.unwrap();
    let job = client.submit_job(SubmitJobRequest { spec: Some(spec) }).await.unwrap().into_inner().job_id;
    let (ja, _, ra) = assignment(&mut a).await;
    let (jb, _, rb) = assignment(&mut b).await;
    assert_eq!((ja.as_str(), jb.as_str()), (job.as_str(), job.as_str()));
    assert_eq!((ra, rb), (0, 1), "ranks follow worker-id order");
    (job, a, b)
}

/// The diverged rank stops; its peer's ring breaks and the peer may report first. The
/// diverged rank's report, arriving while the group waits to be re-formed, still ends the
/// job as diverged with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_reported_after_a_peers_broken_ring_still_ends_the_job() {
    let c = coordinator();
    let (job, a, b) = two_rank_job(&c).await;
    b.0.send(failed(&job, 0, 1, "collective: rank 0 closed the connection", FailureKind::Retryable)).unwrap();
    wait_state(&c, &job, |s| s == JobState::Recovering).await;
    a.0.send(failed(&job, 0, 0, "training diverged at epoch 0 step 3: loss is NaN", FailureKind::Diverged)).unwrap();
    let info = wait_state(&c, &job, |s| s != JobState::Recovering).await;
    assert_eq!(info.state(), JobState::Failed, "{info:?}");
    assert_eq!(info.outcome, "diverged");
    assert_eq!((info.attempt, info.restarts), (0, 0), "{info:?}");
    assert!(info.message.contains("training diverged at epoch 0 step 3"), "{}", info.message);
}

/// A failure from a worker of an older release carries no kind: it is restarted, since it
/// may be transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_without_a_kind_is_restarted_as_before() {
    let c = coordinator();
    let (job, mut a, mut b) = two_rank_job(&c).await;
    a.0.send(failed(&job, 0, 0, "something broke", FailureKind::Unspecified)).unwrap();
    let info = wait_state(&c, &job, |s| s == JobState::Recovering).await;
    assert_eq!(info.restarts, 1);
    // The group is re-formed: attempt 1 reaches both workers.
    assert_eq!(assignment(&mut a).await.1, 1);
    assert_eq!(assignment(&mut b).await.1, 1);
}
