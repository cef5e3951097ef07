//! Bad inputs where users meet them: a real `cvdist coordinator` process on a loopback
//! port, real `cvdist` / `cvdist-worker` processes, raw gRPC sessions and raw TCP bytes.
//!
//! Every test checks three things: the input is refused with a clear message (the exact
//! text is listed in docs/RELIABILITY.md), the coordinator keeps serving, and nothing
//! stored was lost — usually by comparing a SHA-256 of every file under the state dir
//! (state.redb, job.json, checkpoints) before and after the bad input.

mod cluster;

use cluster::{
    cvdist_bin, free_port, log_file, logs, lone_worker, spawn_coordinator, spawn_logged, wait_exit, wait_port,
    worker_bin, write_dataset, ChildGuard, TinyDisk, TOKEN, WORKER_TOKEN,
};
use cvdist_common::client::{connect, Client};
use cvdist_common::proto::coordinator_client::CoordinatorClient;
use cvdist_common::proto::{
    coordinator_message, job_report, worker_message, CancelJobRequest, CheckpointChunk, CoordinatorMessage,
    DownloadCheckpointRequest, EpochMetrics, FetchDatasetRequest, Finished, GetJobRequest, Heartbeat, JobInfo,
    JobReport, JobSpec, JobState, ListJobsRequest, RegisterRequest, SubmitJobRequest, WorkerMessage,
};
use cvdist_common::version::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use cvdist_common::{cifar, spec};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

// ------------------------------------------------------------------ harness

/// A coordinator process with a token, a small dataset to serve and a metrics endpoint.
struct Coord {
    dir: tempfile::TempDir,
    port: u16,
    metrics: u16,
    child: Option<ChildGuard>,
    workers: Vec<ChildGuard>,
}

impl Coord {
    fn start() -> Coord {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(&dir.path().join("data"), 64, 32);
        let mut c = Coord { dir, port: free_port(), metrics: free_port(), child: None, workers: Vec::new() };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let child =
            spawn_coordinator(self.port, self.metrics, &self.state_dir(), &self.data(), self.log_file("coordinator"));
        self.child = Some(ChildGuard(child));
        wait_port(self.port);
        wait_port(self.metrics);
    }

    fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        log_file(self.dir.path(), name)
    }

    fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    async fn client(&self) -> Client {
        connect(&self.url(), Some(TOKEN), None).await.unwrap()
    }

    /// A client holding the worker credential (sessions, checkpoints, the dataset).
    async fn worker_client(&self) -> Client {
        connect(&self.url(), Some(WORKER_TOKEN), None).await.unwrap()
    }

    /// One gauge from the Prometheus endpoint.
    fn metric(&self, name: &str) -> f64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
    }

    /// Waits until `cvdist_workers` reads `n`.
    fn wait_workers(&self, n: u32, within: Duration) {
        self.wait_metric("cvdist_workers", f64::from(n), within);
    }

    /// Waits until the metric `name` reads `value`.
    fn wait_metric(&self, name: &str, value: f64, within: Duration) {
        let start = Instant::now();
        while self.metric(name) != value {
            assert!(start.elapsed() < within, "expected {name} = {value}\n{}", self.all_logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Submits a valid job that needs more workers than any test registers, so it stays
    /// QUEUED: the stored record every bad input must leave untouched.
    async fn baseline(&self) -> (String, BTreeMap<String, String>) {
        let mut s = spec::default_spec("resnet20", 2);
        s.name = "baseline".into();
        s.min_workers = 8;
        s.max_workers = 8;
        let id = self.client().await.submit_job(SubmitJobRequest { spec: Some(s) }).await.unwrap().into_inner().job_id;
        (id, digest(&self.state_dir()))
    }

    /// The coordinator process is alive and answers, the baseline job is as it was, and
    /// every stored file is byte-identical to `before`.
    async fn assert_intact(&self, job: &str, before: &BTreeMap<String, String>) {
        let started = Instant::now();
        let mut c = connect(&self.url(), Some(TOKEN), None).await.expect("coordinator still accepts connections");
        let jobs = c.list_jobs(ListJobsRequest {}).await.expect("coordinator still serves ListJobs").into_inner().jobs;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "coordinator slow after bad input: {:?}",
            started.elapsed()
        );
        let j = jobs.iter().find(|j| j.id == job).unwrap_or_else(|| panic!("baseline job {job} lost: {jobs:?}"));
        assert_eq!(j.state(), JobState::Queued, "{j:?}");
        assert_eq!(&digest(&self.state_dir()), before, "stored files changed\n{}", self.all_logs());
    }

    fn start_worker(&mut self, id: &str, data: &Path, data_listen: &str) {
        let mut cmd = Command::new(worker_bin());
        cmd.args(["worker", "--coordinator", &self.url(), "--data-listen", data_listen, "--threads", "1"])
            .args(["--worker-id", id, "--device", "cpu"])
            .arg("--cache-dir")
            .arg(self.dir.path().join(format!("cache-{id}")))
            .arg("--data")
            .arg(data);
        let child = spawn_logged(&mut cmd, self.log_file(id));
        self.workers.push(ChildGuard(child));
    }

    fn all_logs(&self) -> String {
        logs(self.dir.path())
    }

    /// Runs the `cvdist` CLI against this coordinator.
    fn cli(&self, args: &[&str], token: Option<&str>) -> Output {
        let mut cmd = Command::new(cvdist_bin());
        cmd.args(args).env("CVDIST_COORDINATOR", self.url()).env("RUST_BACKTRACE", "1").env_remove("CVDIST_TOKEN");
        if let Some(t) = token {
            cmd.env("CVDIST_TOKEN", t);
        }
        cmd.output().unwrap()
    }
}

/// SHA-256 of every file under `dir`, by relative path.
fn digest(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, hex::encode(Sha256::digest(std::fs::read(&p).unwrap())));
            }
        }
    }
    out
}

/// A CLI failure must be exactly one `error: …` line on stderr, exit status 2, no panic.
fn assert_one_line_error(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.to_lowercase().contains("backtrace"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert_eq!(lines[0], expected);
}

fn refused(result: Result<impl std::fmt::Debug, Status>, code: Code, message: &str) {
    let err = result.expect_err("the bad input was accepted");
    assert_eq!((err.code(), err.message()), (code, message));
}

fn valid_spec() -> JobSpec {
    let mut s = spec::default_spec("resnet20", 2);
    s.train_samples = 1000;
    s.batch_size = 32;
    s
}

async fn submit(c: &Coord, s: JobSpec) -> Result<String, Status> {
    c.client().await.submit_job(SubmitJobRequest { spec: Some(s) }).await.map(|r| r.into_inner().job_id)
}

fn register(id: &str, version: u32) -> WorkerMessage {
    WorkerMessage {
        msg: Some(worker_message::Msg::Register(RegisterRequest {
            protocol_version: version,
            worker_id: id.into(),
            data_addr: "127.0.0.1:9".into(),
            capabilities: None,
        })),
    }
}

/// Opens a worker session over gRPC by hand, sending `first` as its first message.
async fn raw_session(
    c: &Coord,
    first: WorkerMessage,
) -> Result<(mpsc::UnboundedSender<WorkerMessage>, Streaming<CoordinatorMessage>), Status> {
    raw_session_key(c, first).await.map(|(tx, inbound, _)| (tx, inbound))
}

/// [`raw_session`] that also returns the session key from `Registered`.
async fn raw_session_key(
    c: &Coord,
    first: WorkerMessage,
) -> Result<(mpsc::UnboundedSender<WorkerMessage>, Streaming<CoordinatorMessage>, String), Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(first).unwrap();
    let mut client = c.worker_client().await;
    let mut inbound =
        client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Registered(r)) }) => {
            Ok((tx, inbound, r.session_key))
        }
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// A 1-worker job running on a raw session that the test plays as its rank 0 (uploads
/// are accepted only from there): the job id, the session key, and the session (kept
/// alive with heartbeats while the sender lives).
async fn running_as_rank0(
    c: &Coord,
) -> (String, String, mpsc::UnboundedSender<WorkerMessage>, Streaming<CoordinatorMessage>) {
    let job = submit(c, JobSpec { min_workers: 1, max_workers: 1, ..valid_spec() }).await.unwrap();
    let (tx, mut inbound, key) = raw_session_key(c, register("r0", PROTOCOL_VERSION)).await.unwrap();
    match inbound.message().await.unwrap() {
        Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) }) => {
            assert_eq!((a.job_id.as_str(), a.rank), (job.as_str(), 0))
        }
        other => panic!("expected an assignment, got {other:?}"),
    }
    let beat = tx.clone();
    tokio::spawn(async move {
        while beat.send(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) }).is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    (job, key, tx, inbound)
}

/// An upload of `data` as checkpoint `name` by the session with `key`; the declared
/// position follows the name (epoch 0 step 1 when the name has none).
fn checkpoint_chunks(job: &str, name: &str, key: &str, data: &[u8], declared_sha: &str) -> Vec<CheckpointChunk> {
    let (epoch, step) = cvdist_common::names::parse_checkpoint_name(name).unwrap_or((0, 1));
    let mut state = cvdist_common::checkpoint::CheckpointState::new("resnet20", epoch, step, 0, 1);
    state.sha256 = declared_sha.into();
    state.bytes = data.len() as u64;
    let mut chunks: Vec<CheckpointChunk> = data
        .chunks(cvdist_common::version::CHUNK_BYTES)
        .map(|d| CheckpointChunk { job_id: job.into(), name: name.into(), data: d.to_vec(), ..Default::default() })
        .collect();
    if chunks.is_empty() {
        chunks.push(CheckpointChunk { job_id: job.into(), name: name.into(), ..Default::default() });
    }
    chunks[0].state = Some((&state).into());
    chunks[0].session_key = key.into();
    chunks
}

async fn upload(c: &Coord, chunks: Vec<CheckpointChunk>) -> Result<u64, Status> {
    c.worker_client().await.upload_checkpoint(tokio_stream::iter(chunks)).await.map(|r| r.into_inner().bytes)
}

async fn get_job(c: &Coord, id: &str) -> JobInfo {
    c.client().await.get_job(GetJobRequest { job_id: id.into() }).await.unwrap().into_inner()
}

/// Polls the job until it ends; fails with every process's log after `within`.
async fn wait_terminal(c: &Coord, id: &str, within: Duration) -> JobInfo {
    let start = Instant::now();
    loop {
        let info = get_job(c, id).await;
        if info.state().is_terminal() {
            return info;
        }
        assert!(start.elapsed() < within, "job {id} did not finish\n{}", c.all_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ job specs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let s = JobSpec { model: "resnet9000".into(), ..valid_spec() };
    refused(
        submit(&c, s).await,
        Code::InvalidArgument,
        "unknown model \"resnet9000\"; run `cvdist models` for the list",
    );
    // The CLI checks the spec before it connects, and says the same in one line.
    let out = c.cli(&["submit", "--model", "resnet9000", "--epochs", "1"], Some(TOKEN));
    assert_one_line_error(&out, "error: unknown model \"resnet9000\"; run `cvdist models` for the list");
    c.assert_intact(&job, &before).await;
}

/// An unknown `--grad-compression` (or `JobSpec.grad_compression`) is
/// refused in one line naming the value, by the service and by `submit` and `local`
/// before they start anything; "" (clients from before the field) means none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_grad_compression_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let msg = "unknown gradient compression \"zstd\"; expected \"none\", \"bf16\" or \"fp16\"";
    refused(submit(&c, JobSpec { grad_compression: "zstd".into(), ..valid_spec() }).await, Code::InvalidArgument, msg);
    let out = c.cli(&["submit", "--model", "resnet20", "--epochs", "1", "--grad-compression", "zstd"], Some(TOKEN));
    assert_one_line_error(&out, &format!("error: {msg}"));
    let out = c.cli(&["local", "--model", "resnet20", "--epochs", "1", "--grad-compression", "zstd"], None);
    assert_one_line_error(&out, &format!("error: {msg}"));
    c.assert_intact(&job, &before).await;
    // An older client's spec has no such field: accepted, as no compression.
    submit(&c, JobSpec { grad_compression: String::new(), ..valid_spec() }).await.expect("\"\" means none");
}

/// `--bucket-cap-mb` past 1024 is refused in one line by the service, `submit` and `local`;
/// 0 (clients from before the field) means the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_cap_out_of_range_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let msg = "bucket capacity must be between 1 and 1024 MB, got 4096";
    refused(submit(&c, JobSpec { bucket_cap_mb: 4096, ..valid_spec() }).await, Code::InvalidArgument, msg);
    for cmd in ["submit", "local"] {
        let token = (cmd == "submit").then_some(TOKEN);
        let out = c.cli(&[cmd, "--model", "resnet20", "--epochs", "1", "--bucket-cap-mb", "4096"], token);
        assert_one_line_error(&out, &format!("error: {msg}"));
    }
    c.assert_intact(&job, &before).await;
    submit(&c, JobSpec { bucket_cap_mb: 0, ..valid_spec() }).await.expect("0 means the default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_epochs_are_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    refused(
        submit(&c, JobSpec { epochs: 0, ..valid_spec() }).await,
        Code::InvalidArgument,
        "epochs must be between 1 and 10000, got 0",
    );
    let out = c.cli(&["submit", "--model", "resnet20", "--epochs", "0"], Some(TOKEN));
    assert_one_line_error(&out, "error: epochs must be between 1 and 10000, got 0");
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_epochs_are_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    refused(
        submit(&c, JobSpec { epochs: u32::MAX, ..valid_spec() }).await,
        Code::InvalidArgument,
        "epochs must be between 1 and 10000, got 4294967295",
    );
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_batch_size_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    refused(
        submit(&c, JobSpec { batch_size: 0, ..valid_spec() }).await,
        Code::InvalidArgument,
        "batch size must be between 1 and 65536, got 0",
    );
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_larger_than_the_shard_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let s = JobSpec { train_samples: 100, batch_size: 64, min_workers: 2, max_workers: 2, ..valid_spec() };
    refused(
        submit(&c, s).await,
        Code::InvalidArgument,
        "batch size 64 is larger than each worker's shard of 50 samples (100 samples over 2 workers)",
    );
    let out = c.cli(
        &[
            "submit",
            "--model",
            "resnet20",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--train-samples",
            "100",
            "--workers",
            "2",
        ],
        Some(TOKEN),
    );
    assert_one_line_error(
        &out,
        "error: batch size 64 is larger than each worker's shard of 50 samples (100 samples over 2 workers)",
    );
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_learning_rate_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    for (lr, shown) in
        [(f64::NAN, "NaN"), (f64::INFINITY, "inf"), (f64::NEG_INFINITY, "-inf"), (0.0, "0"), (-0.1, "-0.1")]
    {
        refused(
            submit(&c, JobSpec { lr, ..valid_spec() }).await,
            Code::InvalidArgument,
            &format!("learning rate must be a finite number in (0, 100], got {shown}"),
        );
    }
    let out = c.cli(&["submit", "--model", "resnet20", "--epochs", "1", "--lr", "NaN"], Some(TOKEN));
    assert_one_line_error(&out, "error: learning rate must be a finite number in (0, 100], got NaN");
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_name_with_path_traversal_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    for name in ["../x", "../../etc/passwd", "a/b", ".hidden", "x\0y"] {
        refused(
            submit(&c, JobSpec { name: name.into(), ..valid_spec() }).await,
            Code::InvalidArgument,
            &format!("job name {name:?} must be 1-64 characters from [A-Za-z0-9._-] and not start with '.'"),
        );
    }
    // Nothing was created next to (or above) the state dir.
    let parent: Vec<_> = std::fs::read_dir(c.dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!parent.iter().any(|n| n == "x"), "{parent:?}");
    c.assert_intact(&job, &before).await;
}

// ------------------------------------------------------------------ authentication

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let out = c.cli(&["jobs"], None);
    assert_one_line_error(&out, "error: this coordinator requires a token (CVDIST_TOKEN or --token-file)");
    let mut anon = connect(&c.url(), None, None).await.unwrap();
    refused(
        anon.cancel_job(CancelJobRequest { job_id: job.clone() }).await,
        Code::Unauthenticated,
        "this coordinator requires a token (CVDIST_TOKEN or --token-file)",
    );
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(register("anon", PROTOCOL_VERSION)).unwrap();
    refused(
        anon.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await,
        Code::Unauthenticated,
        "this coordinator requires a token (CVDIST_TOKEN or --token-file)",
    );
    assert_eq!(c.metric("cvdist_workers"), 0.0);
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused() {
    let mut c = Coord::start();
    let (job, before) = c.baseline().await;
    let out = c.cli(&["cancel", &job], Some("not-the-token"));
    assert_one_line_error(&out, "error: cancel refused: wrong token");
    // A worker process with the wrong token gives up at once (retrying cannot help).
    let log = c.log_file("bad-worker");
    let mut w = lone_worker(&c.url())
        .arg("--data")
        .arg(c.data())
        .env("CVDIST_TOKEN", "not-the-token")
        .env("RUST_BACKTRACE", "1")
        .stderr(log)
        .spawn()
        .unwrap();
    let (status, _) = wait_exit(&mut w, Duration::from_secs(30), &|| "worker with a wrong token kept running".into());
    assert_eq!(status.code(), Some(2));
    let text = c.log_text("bad-worker");
    assert_eq!(text.lines().last().unwrap_or(""), "error: registration refused: wrong token", "{text}");
    assert_eq!(c.metric("cvdist_workers"), 0.0);
    c.assert_intact(&job, &before).await;
    // And after a restart the stored record reads back the same.
    let record = get_job(&c, &job).await;
    c.restart();
    assert_eq!(get_job(&c, &job).await, record);
}

// ------------------------------------------------------------------ worker protocol

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_protocol_version_mismatch_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    refused(
        raw_session(&c, register("future", 999)).await,
        Code::FailedPrecondition,
        &format!(
            "worker speaks protocol version 999 but this coordinator speaks {PROTOCOL_VERSION}; run the same cvdist release on both"
        ),
    );
    assert_eq!(c.metric("cvdist_workers"), 0.0);
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_worker_registration_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    refused(
        raw_session(&c, register("../../etc", PROTOCOL_VERSION)).await,
        Code::InvalidArgument,
        "worker id \"../../etc\" must be 1-64 characters from [A-Za-z0-9._-] and not start with '.'",
    );
    let heartbeat_first = WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) };
    refused(
        raw_session(&c, heartbeat_first).await,
        Code::InvalidArgument,
        "the first message of a worker session must be a registration",
    );
    let mut bad_addr = register("w1", PROTOCOL_VERSION);
    if let Some(worker_message::Msg::Register(r)) = &mut bad_addr.msg {
        r.data_addr = "nowhere".into();
    }
    refused(
        raw_session(&c, bad_addr).await,
        Code::InvalidArgument,
        "data address \"nowhere\" is not HOST:PORT (a DNS name or IP address and a port 1-65535)",
    );
    assert_eq!(c.metric("cvdist_workers"), 0.0);
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_worker_id_is_refused_and_the_first_session_kept() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let (first_tx, _first_rx) = raw_session(&c, register("twin", PROTOCOL_VERSION)).await.unwrap();
    refused(
        raw_session(&c, register("twin", PROTOCOL_VERSION)).await,
        Code::AlreadyExists,
        "a worker with id \"twin\" is already connected; ids must be unique (a restarted worker may retry once the old session times out)",
    );
    // The original session is untouched and still heartbeats.
    first_tx.send(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) }).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.metric("cvdist_workers"), 1.0);
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_for_a_finished_job_is_ignored() {
    let c = Coord::start();
    let (job, _) = c.baseline().await;
    let mut s = valid_spec();
    s.min_workers = 2;
    s.max_workers = 2;
    let done = submit(&c, s).await.unwrap();
    let out = c.cli(&["cancel", &done], Some(TOKEN));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{done} CANCELLED"));
    let cancelled = get_job(&c, &done).await;
    let before = digest(&c.state_dir());

    let (tx, _rx) = raw_session(&c, register("ghost", PROTOCOL_VERSION)).await.unwrap();
    let report = |kind| WorkerMessage {
        msg: Some(worker_message::Msg::Report(JobReport {
            job_id: done.clone(),
            attempt: 0,
            rank: 0,
            kind: Some(kind),
            failure_kind: 0,
        })),
    };
    tx.send(report(job_report::Kind::Epoch(EpochMetrics { epoch: 0, test_acc: 0.99, ..Default::default() }))).unwrap();
    tx.send(report(job_report::Kind::Finished(Finished {
        final_test_acc: 0.99,
        wall_seconds: 1.0,
        ..Default::default()
    })))
    .unwrap();
    tx.send(WorkerMessage {
        msg: Some(worker_message::Msg::Report(JobReport {
            job_id: "j9999-nope".into(),
            attempt: 0,
            rank: 0,
            kind: Some(job_report::Kind::Failed("boom".into())),
            failure_kind: 0,
        })),
    })
    .unwrap();
    let start = Instant::now();
    while !c.log_text("coordinator").contains("no job with id \"j9999-nope\"") {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", c.log_text("coordinator"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = c.log_text("coordinator");
    assert!(log.contains(&format!("report refused worker=ghost error=job {done} already ended")), "{log}");
    // The job is exactly as cancelled; the session survived; nothing stored changed.
    assert_eq!(get_job(&c, &done).await, cancelled);
    assert_eq!(c.metric("cvdist_workers"), 1.0);
    assert_eq!(digest(&c.state_dir()), before);
    let jobs = c.client().await.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.iter().find(|j| j.id == job).unwrap().state(), JobState::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_rendezvous_is_clean() {
    let mut c = Coord::start();
    // One real worker, a job that needs two: it waits in rendezvous.
    let data = c.data();
    c.start_worker("w0", &data, "127.0.0.1:0");
    c.wait_workers(1, Duration::from_secs(30));
    let mut s = valid_spec();
    s.min_workers = 2;
    s.max_workers = 2;
    let id = submit(&c, s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get_job(&c, &id).await.state(), JobState::Queued);
    let out = c.cli(&["cancel", &id], Some(TOKEN));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{id} CANCELLED"));
    let info = get_job(&c, &id).await;
    assert_eq!((info.state(), info.message.as_str(), info.world_size), (JobState::Cancelled, "cancelled by user", 0));
    // The worker was never assigned and is still there, idle.
    assert_eq!(c.metric("cvdist_workers"), 1.0);
    assert_eq!(c.metric("cvdist_workers_busy"), 0.0);
    assert!(!c.log_text("w0").contains("assignment"), "{}", c.log_text("w0"));
    let summary = cvdist_common::run_dir::read_summary(&c.state_dir().join("jobs").join(&id)).unwrap();
    assert_eq!(summary.state, "cancelled");
    // Cancelling again says why not; the cancellation survives a coordinator restart.
    let again = c.cli(&["cancel", &id], Some(TOKEN));
    assert_one_line_error(&again, &format!("error: cancel refused: job {id} already ended (cancelled)"));
    c.restart();
    assert_eq!(get_job(&c, &id).await.state(), JobState::Cancelled);
}

// ------------------------------------------------------------------ raw bytes and sizes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    // The shared client refuses to send it at all (its encoder limit resets the stream;
    // the CLI never gets this far because it validates the spec first) ...
    let big = "a".repeat(MAX_MESSAGE_BYTES + 1024);
    let err = submit(&c, JobSpec { name: big.clone(), ..valid_spec() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Internal, "h2 protocol error: http2 error"));
    // ... so send it with a client that has no limit: the server refuses to decode it.
    let channel = tonic::transport::Endpoint::from_shared(c.url()).unwrap().connect().await.unwrap();
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
    let mut raw = CoordinatorClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", token.clone());
        Ok(req)
    })
    .max_encoding_message_size(usize::MAX)
    .max_decoding_message_size(usize::MAX);
    let limit = MAX_MESSAGE_BYTES;
    let result = raw.submit_job(SubmitJobRequest { spec: Some(JobSpec { name: big, ..valid_spec() }) }).await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(err.message().starts_with("Error, decoded message length too large: found 167"), "{}", err.message());
    assert!(err.message().ends_with(&format!("bytes, the limit is: {limit} bytes")), "{}", err.message());
    // One 17 MiB chunk in a checkpoint upload, with the worker credential.
    let channel = tonic::transport::Endpoint::from_shared(c.url()).unwrap().connect().await.unwrap();
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {WORKER_TOKEN}").parse().unwrap();
    let mut raw = CoordinatorClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", token.clone());
        Ok(req)
    })
    .max_encoding_message_size(usize::MAX)
    .max_decoding_message_size(usize::MAX);
    let chunk = CheckpointChunk {
        job_id: job.clone(),
        name: "ckpt-e0000-s000001".into(),
        data: vec![7u8; MAX_MESSAGE_BYTES + 1],
        ..Default::default()
    };
    let err = raw.upload_checkpoint(tokio_stream::iter(vec![chunk])).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(err.message().starts_with("Error, decoded message length too large"), "{}", err.message());
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_the_grpc_port_are_dropped() {
    use rand::RngCore;
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let mut rng = rand::thread_rng();
    // A silent connection that stays open, then garbage of several kinds.
    let _silent = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for _ in 0..16 {
        let mut b = vec![0u8; 1 + (rng.next_u32() % 65536) as usize];
        rng.fill_bytes(&mut b);
        payloads.push(b);
    }
    payloads.push(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec());
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0xff; 4096]);
    payloads.push(h2);
    for p in payloads {
        let mut s = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(&p);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // the server closes the connection
    }
    // The metrics port takes garbage too.
    let mut m = TcpStream::connect(("127.0.0.1", c.metrics)).unwrap();
    let mut junk = vec![0u8; 4096];
    rng.fill_bytes(&mut junk);
    let _ = m.write_all(&junk);
    drop(m);
    assert_eq!(c.metric("cvdist_workers"), 0.0);
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_a_worker_data_port_do_not_break_the_ring() {
    use rand::RngCore;
    let mut c = Coord::start();
    let data = c.data();
    let ports = [free_port(), free_port()];
    for (k, p) in ports.iter().enumerate() {
        c.start_worker(&format!("w{k}"), &data, &format!("127.0.0.1:{p}"));
    }
    c.wait_workers(2, Duration::from_secs(30));
    // Garbage queued on both data-plane ports before the ring forms: random bytes, a
    // short write, a silent open connection, and a well-formed hello for the wrong world.
    let mut rng = rand::thread_rng();
    let mut keep = Vec::new();
    for p in ports {
        for len in [4096usize, 10, 0] {
            let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
            let mut b = vec![0u8; len];
            rng.fill_bytes(&mut b);
            let _ = s.write_all(&b);
            keep.push(s);
        }
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        let mut hello = Vec::from(*b"CVDRING\x01");
        for v in [1u32, 7, 0, 1] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        hello.extend_from_slice(&[0u8; 32]);
        let _ = s.write_all(&hello);
        keep.push(s);
    }
    let mut s = spec::default_spec("resnet20", 1);
    s.batch_size = 16;
    s.train_samples = 64;
    s.test_samples = 32;
    s.min_workers = 2;
    s.max_workers = 2;
    s.max_restarts = 0;
    let id = submit(&c, s).await.unwrap();
    let info = wait_terminal(&c, &id, Duration::from_secs(120)).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.all_logs());
    assert_eq!(info.restarts, 0);
    let logs = c.log_text("w0") + &c.log_text("w1");
    assert!(logs.contains("not a cvdist ring handshake (bad magic)"), "{logs}");
    assert!(logs.contains("world size mismatch"), "{logs}");
    drop(keep);
}

// ------------------------------------------------------------------ checkpoints

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_with_a_wrong_sha256_is_refused() {
    let c = Coord::start();
    let (job, key, _session, _inbound) = running_as_rank0(&c).await;
    // A good checkpoint first: it must survive the bad upload.
    let good = vec![1u8; 300_000];
    let good_sha = hex::encode(Sha256::digest(&good));
    upload(&c, checkpoint_chunks(&job, "ckpt-e0000-s000004", &key, &good, &good_sha)).await.unwrap();
    let before = digest(&c.state_dir());

    let data = vec![2u8; 2_500_000];
    let wrong = "0".repeat(64);
    let got = hex::encode(Sha256::digest(&data));
    refused(
        upload(&c, checkpoint_chunks(&job, "ckpt-e0001-s000000", &key, &data, &wrong)).await,
        Code::DataLoss,
        &format!("checkpoint ckpt-e0001-s000000 checksum {got} != declared {wrong}"),
    );
    // Corrupted in transit: the declared hash is of other bytes.
    let mut flipped = checkpoint_chunks(&job, "ckpt-e0001-s000000", &key, &data, &got);
    flipped[1].data[10] ^= 1;
    assert_eq!(upload(&c, flipped).await.unwrap_err().code(), Code::DataLoss);
    refused(
        upload(
            &c,
            vec![CheckpointChunk {
                job_id: job.clone(),
                name: "ckpt-e0001-s000000".into(),
                state: None,
                data: vec![1],
                attempt: 0,
                session_key: key.clone(),
            }],
        )
        .await,
        Code::InvalidArgument,
        "checkpoint state is missing",
    );
    // More per-rank sums than the ranks it declares.
    let mut swollen = checkpoint_chunks(&job, "ckpt-e0001-s000000", &key, &data, &got);
    if let Some(state) = swollen[0].state.as_mut() {
        state.rank_partials = vec![Default::default(); 2];
    }
    refused(
        upload(&c, swollen).await,
        Code::InvalidArgument,
        "checkpoint state has 2 per-rank sums but the job ran on 1 ranks",
    );
    refused(
        upload(
            &c,
            checkpoint_chunks(&job, "ckpt-e0001-s000000", &key, &data, &got)
                .into_iter()
                .map(|mut ch| {
                    ch.attempt = 5;
                    ch
                })
                .collect(),
        )
        .await,
        Code::PermissionDenied,
        &format!("checkpoint for job {job} refused: the job is running on attempt 0, the upload is for attempt 5"),
    );
    // No partial file, the good checkpoint is still the latest and downloads intact.
    assert_eq!(digest(&c.state_dir()), before);
    let info = get_job(&c, &job).await;
    assert_eq!(info.latest_checkpoint, "ckpt-e0000-s000004");
    let mut stream = c
        .worker_client()
        .await
        .download_checkpoint(DownloadCheckpointRequest { job_id: job.clone(), name: "ckpt-e0000-s000004".into() })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(ch) = stream.message().await.unwrap() {
        back.extend_from_slice(&ch.data);
    }
    assert_eq!(back, good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_names_with_path_traversal_are_refused() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let data = vec![3u8; 1000];
    let sha = hex::encode(Sha256::digest(&data));
    for name in ["../x", "ckpt-e../../x", "ckpt-e0000/../../../x", "/etc/passwd", ".ckpt-e0000-s000000"] {
        refused(
            upload(&c, checkpoint_chunks(&job, name, "", &data, &sha)).await,
            Code::InvalidArgument,
            &format!("checkpoint name {name:?} is not of the form ckpt-eEEEE-sSSSSSS"),
        );
        let mut client = c.worker_client().await;
        refused(
            client.download_checkpoint(DownloadCheckpointRequest { job_id: job.clone(), name: name.into() }).await,
            Code::InvalidArgument,
            &format!("checkpoint name {name:?} is not of the form ckpt-eEEEE-sSSSSSS"),
        );
    }
    for bad_job in ["../..", "../../state.redb", "j0001-resnet20/../.."] {
        refused(
            upload(&c, checkpoint_chunks(bad_job, "ckpt-e0000-s000001", "", &data, &sha)).await,
            Code::NotFound,
            &format!("no job with id {bad_job:?}; `cvdist jobs` lists them"),
        );
        let mut client = c.worker_client().await;
        refused(
            client
                .download_checkpoint(DownloadCheckpointRequest {
                    job_id: bad_job.into(),
                    name: "ckpt-e0000-s000001".into(),
                })
                .await,
            Code::NotFound,
            &format!("no job with id {bad_job:?}; `cvdist jobs` lists them"),
        );
    }
    let parent: Vec<_> = std::fs::read_dir(c.dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!parent.iter().any(|n| n == "x"), "{parent:?}");
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_while_storing_a_checkpoint() {
    let mut c = Coord::start();
    // The job's checkpoint directory is a 1 MiB tmpfs. Without root (no mount), the
    // coordinator is restarted with a 4 MiB file-size limit instead (EFBIG, not ENOSPC;
    // state.redb starts at ~1.5 MiB, so the limit cannot be smaller).
    let can_mount = TinyDisk::mount(&c.dir.path().join("probe"), "1M").is_some();
    if !can_mount {
        eprintln!("cannot mount a tmpfs here: simulating a full disk with a 4 MiB file-size limit (ulimit -f)");
        if let Some(mut ch) = c.child.take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        let log = c.log_file("coordinator");
        let script = format!(
            "trap '' XFSZ; ulimit -f 4096; exec {} coordinator --listen 127.0.0.1:{} --state-dir {} --metrics-listen 127.0.0.1:{}",
            cvdist_bin().display(),
            c.port,
            c.state_dir().display(),
            c.metrics
        );
        let child = Command::new("bash")
            .args(["-c", &script])
            .env("CVDIST_TOKEN", TOKEN)
            .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        c.child = Some(ChildGuard(child));
        wait_port(c.port);
    }
    let (job, key, _session, _inbound) = running_as_rank0(&c).await;
    let ckpt_dir = c.state_dir().join("jobs").join(&job).join("checkpoints");
    let disk = if can_mount { TinyDisk::mount(&ckpt_dir, "1M") } else { None };
    let small = vec![5u8; 200_000];
    let small_sha = hex::encode(Sha256::digest(&small));
    upload(&c, checkpoint_chunks(&job, "ckpt-e0000-s000004", &key, &small, &small_sha)).await.unwrap();
    let before = digest(&c.state_dir());

    let big = vec![6u8; if disk.is_some() { 3_000_000 } else { 6_000_000 }];
    let big_sha = hex::encode(Sha256::digest(&big));
    let err = upload(&c, checkpoint_chunks(&job, "ckpt-e0001-s000000", &key, &big, &big_sha)).await.unwrap_err();
    eprintln!("disk full: {:?} {}", err.code(), err.message());
    if disk.is_some() {
        // Each upload has its own temp file: .NAME.<random>.upload
        let prefix = ckpt_dir.join(".ckpt-e0001-s000000.").display().to_string();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(
            err.message().starts_with(&prefix) && err.message().ends_with(".upload: disk full"),
            "{}",
            err.message()
        );
    } else {
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("File too large"), "{}", err.message());
    }
    // The partial upload was removed, the previous checkpoint is intact and still the
    // latest, and the coordinator keeps serving.
    let left: Vec<_> = std::fs::read_dir(&ckpt_dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().ends_with(".upload")), "{left:?}");
    assert_eq!(digest(&c.state_dir()), before);
    assert_eq!(get_job(&c, &job).await.latest_checkpoint, "ckpt-e0000-s000004");
    let jobs = c.client().await.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 1);
    let mut s = valid_spec();
    s.min_workers = 8;
    s.max_workers = 8;
    submit(&c, s).await.expect("the coordinator still accepts jobs");
    drop(disk);
}

// ------------------------------------------------------------------ dataset

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_with_an_incomplete_dataset_names_the_missing_file() {
    let c = Coord::start();
    let (job, before) = c.baseline().await;
    let missing = cifar::batches_dir(&c.data()).join("data_batch_4.bin");
    std::fs::remove_file(&missing).unwrap();
    let mut client = c.worker_client().await;
    refused(
        client.fetch_dataset(FetchDatasetRequest { dataset: "cifar10".into() }).await,
        Code::FailedPrecondition,
        &format!("coordinator's dataset is incomplete: {} missing", missing.display()),
    );
    refused(
        client.fetch_dataset(FetchDatasetRequest { dataset: "../../etc".into() }).await,
        Code::InvalidArgument,
        "unknown dataset \"../../etc\"; only \"cifar10\" is served",
    );
    c.assert_intact(&job, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_dataset_on_a_worker_fails_the_job_with_the_file_named() {
    let mut c = Coord::start();
    let bad = c.dir.path().join("bad-data");
    write_dataset(&bad, 64, 32);
    let file = cifar::batches_dir(&bad).join("data_batch_2.bin");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    c.start_worker("w0", &bad, "127.0.0.1:0");
    c.wait_workers(1, Duration::from_secs(30));
    let mut s = spec::default_spec("resnet20", 1);
    s.batch_size = 16;
    s.train_samples = 64;
    // Bad data fails the same way on every attempt: the job fails at once, budget unused.
    s.max_restarts = 3;
    let id = submit(&c, s).await.unwrap();
    let info = wait_terminal(&c, &id, Duration::from_secs(60)).await;
    let size = bytes.len() - 100;
    let expected = format!(
        "rank 0 on w0 failed: data: CIFAR-10 file {} is truncated: {size} bytes is 63 whole records of 3073 bytes plus 2973 bytes of a partial record (official files are 30730000 bytes); not restarted: the same failure would repeat",
        file.display()
    );
    assert_eq!((info.state(), info.message.as_str()), (JobState::Failed, expected.as_str()));
    assert_eq!((info.restarts, info.attempt, info.outcome.as_str()), (0, 0, "data"));
    // The worker survives its bad data and becomes available again; the failure is stored.
    c.wait_metric("cvdist_workers_busy", 0.0, Duration::from_secs(30));
    assert_eq!(c.metric("cvdist_workers"), 1.0);
    c.restart();
    let after = get_job(&c, &id).await;
    assert_eq!((after.state(), after.message), (JobState::Failed, expected));
}

// ------------------------------------------------------------------ startup and CLI

#[test]
fn unwritable_state_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let start = |state: &Path| {
        Command::new(cvdist_bin())
            .args(["coordinator", "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--state-dir")
            .arg(state)
            .env("CVDIST_TOKEN", TOKEN)
            .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap()
    };
    let under_file = file.join("state");
    let out = start(&under_file);
    assert_one_line_error(
        &out,
        &format!("error: state dir {} is not usable: Not a directory (os error 20)", under_file.display()),
    );

    // A read-only file system (needs root to mount), else a directory without write permission.
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let mounted = std::env::var_os("CVDIST_TEST_NO_MOUNT").is_none()
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"])
            .arg(&ro)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let _guard = mounted.then(|| TinyDisk(ro.clone()));
    if !mounted {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    if std::fs::write(ro.join("probe"), b"x").is_ok() {
        // scripts/test.sh sets CVDIST_REQUIRE_MOUNT where it runs as root, so CI cannot
        // pass this case without testing it.
        assert!(
            std::env::var_os("CVDIST_REQUIRE_MOUNT").is_none(),
            "CVDIST_REQUIRE_MOUNT is set but no read-only tmpfs could be mounted"
        );
        eprintln!("SKIPPED: running as root without mount, a 0555 directory is writable: the read-only state dir case is not tested");
        return;
    }
    let out = start(&ro);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason = if mounted { "Read-only file system (os error 30)" } else { "Permission denied (os error 13)" };
    assert_one_line_error(&out, &format!("error: state dir {} is not usable: {reason}", ro.display()));
    assert!(!stderr.contains("panicked"));
}

#[test]
fn cli_with_a_bad_coordinator_url_prints_one_line() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let cases: Vec<(&str, String)> = vec![
        ("not-a-url", "error: invalid coordinator URL \"not-a-url\": must start with http:// or https://".into()),
        ("ftp://127.0.0.1:50051", "error: invalid coordinator URL \"ftp://127.0.0.1:50051\": must start with http:// or https://".into()),
        ("http://[::1", "error: invalid coordinator URL \"http://[::1\": invalid URI".into()),
        ("http://exa mple:80", "error: invalid coordinator URL \"http://exa mple:80\": invalid URI".into()),
        (&closed, format!("error: cannot reach the coordinator at {closed}: transport error: tcp connect error: Connection refused (os error 111)")),
    ];
    for (url, expected) in cases {
        for args in [vec!["jobs"], vec!["status", "j0001-x"], vec!["submit", "--model", "resnet20", "--epochs", "1"]] {
            let out = Command::new(cvdist_bin())
                .args(&args)
                .args(["--coordinator", url])
                .env("RUST_BACKTRACE", "1")
                .env("CVDIST_TOKEN", TOKEN)
                .output()
                .unwrap();
            assert_one_line_error(&out, &expected);
        }
    }
}
