//! The security review, each point against real processes: a real coordinator
//! on loopback, real `cvdist` / `cvdist-worker` processes, and raw gRPC sessions or raw TCP
//! connections playing the malicious client, member or stranger. docs/RELIABILITY.md
//! ("Threat model") lists what each test shows.
mod cluster;

use cluster::{cvdist_bin, free_port, lone_worker, small_spec, wait_exit, Cluster, TOKEN, WORKER_TOKEN};
use cvdist_common::client::connect;
use cvdist_common::proto::{
    coordinator_message, job_report, worker_message, Assignment, CancelJobRequest, CheckpointChunk, CoordinatorMessage,
    DownloadCheckpointRequest, EpochMetrics, FetchDatasetRequest, GetJobRequest, Heartbeat, JobInfo, JobReport,
    JobSpec, JobState, ListJobsRequest, Progress, RegisterRequest, SubmitJobRequest, WorkerMessage,
};
use cvdist_common::version::PROTOCOL_VERSION;
use prost::Message;
use sha2::{Digest, Sha256};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

type Session = (mpsc::UnboundedSender<WorkerMessage>, Streaming<CoordinatorMessage>, String);

fn register(id: &str) -> WorkerMessage {
    WorkerMessage {
        msg: Some(worker_message::Msg::Register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: id.into(),
            data_addr: "127.0.0.1:9".into(),
            capabilities: None,
        })),
    }
}

/// A worker session opened by hand with `token`; heartbeats keep it alive while the
/// returned sender lives. Returns the sender, the inbound stream and the session key.
async fn session_with(c: &Cluster, token: &str, id: &str) -> Result<Session, Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(register(id)).unwrap();
    let mut client = connect(&c.url(), Some(token), None).await.unwrap();
    let mut inbound =
        client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
    let key = match inbound.message().await? {
        Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Registered(r)) }) => r.session_key,
        other => panic!("expected Registered, got {other:?}"),
    };
    // A weak handle: dropping the returned sender ends the session.
    let beat = tx.downgrade();
    tokio::spawn(async move {
        while let Some(tx) = beat.upgrade() {
            if tx.send(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) }).is_err() {
                return;
            }
            drop(tx);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Ok((tx, inbound, key))
}

async fn session(c: &Cluster, id: &str) -> Session {
    session_with(c, WORKER_TOKEN, id).await.unwrap()
}

async fn next_assignment(inbound: &mut Streaming<CoordinatorMessage>) -> Assignment {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
            Ok(Ok(Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) }))) => return a,
            Ok(Ok(Some(_))) => continue,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
}

fn report(a: &Assignment, kind: job_report::Kind) -> WorkerMessage {
    WorkerMessage {
        msg: Some(worker_message::Msg::Report(JobReport {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
            kind: Some(kind),
            ..Default::default()
        })),
    }
}

/// Chunks of an upload of `data` as checkpoint `name` for `attempt` by the session `key`.
fn chunks(job: &str, attempt: u32, name: &str, key: &str, data: &[u8]) -> Vec<CheckpointChunk> {
    let (epoch, step) = cvdist_common::names::parse_checkpoint_name(name).unwrap();
    let sha = hex::encode(Sha256::digest(data));
    let mut state = cvdist_common::checkpoint::CheckpointState::new("resnet20", epoch, step, 0, 1);
    state.sha256 = sha;
    state.bytes = data.len() as u64;
    let mut out: Vec<CheckpointChunk> = data
        .chunks(cvdist_common::version::CHUNK_BYTES)
        .map(|d| CheckpointChunk {
            job_id: job.into(),
            name: name.into(),
            data: d.to_vec(),
            attempt,
            ..Default::default()
        })
        .collect();
    if out.is_empty() {
        out.push(CheckpointChunk { job_id: job.into(), name: name.into(), attempt, ..Default::default() });
    }
    out[0].state = Some((&state).into());
    out[0].session_key = key.into();
    out
}

async fn upload_with(c: &Cluster, token: &str, chunks: Vec<CheckpointChunk>) -> Result<u64, Status> {
    let mut client = connect(&c.url(), Some(token), None).await.unwrap();
    client.upload_checkpoint(tokio_stream::iter(chunks)).await.map(|r| r.into_inner().bytes)
}

async fn upload(c: &Cluster, chunks: Vec<CheckpointChunk>) -> Result<u64, Status> {
    upload_with(c, WORKER_TOKEN, chunks).await
}

fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message: &str) {
    let err = result.expect_err("accepted");
    assert_eq!((err.code(), err.message()), (code, message));
}

async fn get_job(c: &Cluster, id: &str) -> JobInfo {
    c.client().await.get_job(GetJobRequest { job_id: id.into() }).await.unwrap().into_inner()
}

async fn wait_state(c: &Cluster, id: &str, want: JobState, within: Duration) -> JobInfo {
    let start = Instant::now();
    loop {
        let info = get_job(c, id).await;
        if info.state() == want {
            return info;
        }
        assert!(start.elapsed() < within, "job {id} never reached {want:?}: {info:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_log(c: &Cluster, name: &str, needle: &str, within: Duration) {
    let start = Instant::now();
    let path = c.dir.path().join(format!("{name}.log"));
    while !std::fs::read_to_string(&path).unwrap_or_default().contains(needle) {
        assert!(start.elapsed() < within, "{needle:?} never logged\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cvdist ARGS --coordinator URL` with the client token.
fn cli(c: &Cluster, args: &[&str]) -> Output {
    Command::new(cvdist_bin())
        .args(args)
        .args(["--coordinator", &c.url()])
        .env("CVDIST_TOKEN", TOKEN)
        .env_remove("CVDIST_WORKER_TOKEN")
        .output()
        .unwrap()
}

fn spec(epochs: u32, workers: u32) -> JobSpec {
    let mut s = cvdist_common::spec::default_spec("resnet20", epochs);
    s.dataset = "synthetic".into();
    s.train_samples = 1000;
    s.batch_size = 32;
    s.min_workers = workers;
    s.max_workers = workers;
    s.max_restarts = 5;
    s
}

// ------------------------------------------------------------------ 1. two credentials

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_token_does_not_make_anyone_a_worker() {
    let mut c = Cluster::new(64, 32);
    let as_worker = "the client token cannot act as a worker: workers authenticate with the worker credential (CVDIST_WORKER_TOKEN or --worker-token-file)";
    // The attacker: the CLI token, registering as "-evil" (or any id) to be ranked first.
    refused(session_with(&c, TOKEN, "-evil").await, Code::PermissionDenied, as_worker);
    refused(session_with(&c, TOKEN, "a-evil").await, Code::PermissionDenied, as_worker);
    let job = c.submit(spec(1, 8)).await;
    refused(
        upload_with(&c, TOKEN, chunks(&job, 0, "ckpt-e0001-s000000", "", b"x")).await,
        Code::PermissionDenied,
        as_worker,
    );
    let mut client = c.client().await;
    refused(
        client
            .download_checkpoint(DownloadCheckpointRequest { job_id: job.clone(), name: "ckpt-e0001-s000000".into() })
            .await,
        Code::PermissionDenied,
        as_worker,
    );
    refused(
        client.fetch_dataset(FetchDatasetRequest { dataset: "cifar10".into() }).await,
        Code::PermissionDenied,
        as_worker,
    );
    // And the worker credential does not manage jobs.
    let as_client = "the worker credential cannot manage jobs: use the client token (CVDIST_TOKEN or --token-file)";
    let mut w = c.worker_client().await;
    refused(w.submit_job(SubmitJobRequest { spec: Some(spec(1, 1)) }).await, Code::PermissionDenied, as_client);
    refused(w.list_jobs(ListJobsRequest {}).await, Code::PermissionDenied, as_client);
    refused(w.cancel_job(CancelJobRequest { job_id: job.clone() }).await, Code::PermissionDenied, as_client);

    // A real worker holding only the client token is refused and exits with that line.
    let log = c.log("client-token-worker");
    let mut p =
        lone_worker(&c.url()).env("CVDIST_TOKEN", TOKEN).env_remove("CVDIST_WORKER_TOKEN").stderr(log).spawn().unwrap();
    let (status, _) =
        wait_exit(&mut p, Duration::from_secs(30), &|| "a worker with the client token kept running".into());
    assert_eq!(status.code(), Some(2));
    let text = std::fs::read_to_string(c.dir.path().join("client-token-worker.log")).unwrap();
    assert_eq!(text.lines().last().unwrap_or(""), format!("error: registration refused: {as_worker}"), "{text}");

    // A real worker's id cannot be squatted while it is connected, even with the worker credential.
    c.start_worker(0, true);
    let start = Instant::now();
    while !c.metrics().contains("cvdist_workers 1") {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    refused(
        session_with(&c, WORKER_TOKEN, "w0").await,
        Code::AlreadyExists,
        "a worker with id \"w0\" is already connected; ids must be unique (a restarted worker may retry once the old session times out)",
    );
    assert!(c.metrics().contains("cvdist_workers 1"));
    assert_eq!(get_job(&c, &job).await.state(), JobState::Queued);
}

#[test]
fn coordinator_refuses_one_token_for_both_roles() {
    let dir = tempfile::tempdir().unwrap();
    let run = |worker_token: Option<&str>| {
        let mut cmd = Command::new(cvdist_bin());
        cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("CVDIST_TOKEN", TOKEN)
            .env_remove("CVDIST_WORKER_TOKEN")
            .env_remove("CVDIST_WORKER_TOKEN_FILE")
            .env("NO_COLOR", "1");
        if let Some(w) = worker_token {
            cmd.env("CVDIST_WORKER_TOKEN", w);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_string()
    };
    assert_eq!(
        run(None),
        "error: a client token is set but no worker credential: set CVDIST_WORKER_TOKEN or --worker-token-file to a different secret for the workers (the client token does not admit workers)"
    );
    assert_eq!(
        run(Some(TOKEN)),
        "error: the worker credential (CVDIST_WORKER_TOKEN / --worker-token-file) must differ from the client token (CVDIST_TOKEN / --token-file)"
    );
}

// ------------------------------------------------------------------ 2. uploads from rank 0 only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_come_only_from_rank0_of_the_current_attempt() {
    let c = Cluster::new(64, 32);
    let data = vec![9u8; 100_000];
    // A queued job takes nothing, not even from a holder of the worker credential.
    let queued = c.submit(spec(5, 2)).await;
    let (_s, _i, stranger) = session(&c, "stranger").await;
    refused(
        upload(&c, chunks(&queued, 0, "ckpt-e0004-s000000", &stranger, &data)).await,
        Code::PermissionDenied,
        &format!("checkpoint for job {queued} refused: the job is queued on attempt 0, the upload is for attempt 0"),
    );
    // The job starts on "stranger" and a second session; ids in order: rank 0 is "a-r0".
    let (_t0, mut in0, key0) = session(&c, "a-r0").await;
    let a0 = next_assignment(&mut in0).await;
    assert_eq!((a0.job_id.as_str(), a0.rank), (queued.as_str(), 0));
    let only_rank0 =
        format!("checkpoint for job {queued} refused: only rank 0 of the current attempt uploads checkpoints");
    refused(
        upload(&c, chunks(&queued, 0, "ckpt-e0001-s000000", &stranger, &data)).await,
        Code::PermissionDenied,
        &only_rank0,
    );
    refused(upload(&c, chunks(&queued, 0, "ckpt-e0001-s000000", "", &data)).await, Code::PermissionDenied, &only_rank0);
    // Rank 0 itself cannot jump ahead of what the attempt has reached (a
    // ckpt-e0004 planted into a fresh 5-epoch job) ...
    refused(
        upload(&c, chunks(&queued, 0, "ckpt-e0004-s000000", &key0, &data)).await,
        Code::PermissionDenied,
        &format!("checkpoint for job {queued} refused: ckpt-e0004-s000000 does not follow from the attempt's progress (started at epoch 0, reported epoch 0, 5 epochs)"),
    );
    // ... but stores the checkpoint its progress leads to, and nothing at or before it again.
    assert_eq!(upload(&c, chunks(&queued, 0, "ckpt-e0001-s000000", &key0, &data)).await.unwrap(), data.len() as u64);
    refused(
        upload(&c, chunks(&queued, 0, "ckpt-e0001-s000000", &key0, &data)).await,
        Code::PermissionDenied,
        &format!("checkpoint for job {queued} refused: ckpt-e0001-s000000 is not after where attempt 0 started (ckpt-e0000-s000000) and the newest checkpoint (ckpt-e0001-s000000)"),
    );
    _t0.send(report(
        &a0,
        job_report::Kind::Progress(Progress { epoch: 1, step: 31, steps_per_epoch: 31, ..Default::default() }),
    ))
    .unwrap();
    // The upload follows from the progress once the coordinator has it.
    let start = Instant::now();
    while get_job(&c, &queued).await.progress.is_none_or(|p| (p.epoch, p.step) != (1, 31)) {
        assert!(start.elapsed() < Duration::from_secs(20), "the progress report never arrived\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    upload(&c, chunks(&queued, 0, "ckpt-e0002-s000000", &key0, &data)).await.unwrap();
    assert_eq!(get_job(&c, &queued).await.latest_checkpoint, "ckpt-e0002-s000000");
    // Once the attempt is over (rank 1 lost), its rank 0 uploads nothing more.
    drop(_s);
    drop(_i);
    let info = wait_state(&c, &queued, JobState::Recovering, Duration::from_secs(20)).await;
    assert_eq!(info.attempt, 1);
    refused(
        upload(&c, chunks(&queued, 0, "ckpt-e0003-s000000", &key0, &data)).await,
        Code::PermissionDenied,
        &format!(
            "checkpoint for job {queued} refused: the job is recovering on attempt 1, the upload is for attempt 0"
        ),
    );
    assert_eq!(get_job(&c, &queued).await.latest_checkpoint, "ckpt-e0002-s000000");
}

// ------------------------------------------------------------------ 3. and 8. bounded, escaped peer text

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_text_is_bounded_escaped_and_records_stay_small() {
    let mut c = Cluster::new(64, 32);
    let job = c.submit(spec(2, 1)).await;
    let (tx, mut inbound, _) = session(&c, "r0").await;
    let a = next_assignment(&mut inbound).await;
    // Epoch reports outside the job's epochs are refused; the history stays empty.
    tx.send(report(&a, job_report::Kind::Epoch(EpochMetrics { epoch: 999_999, ..Default::default() }))).unwrap();
    tx.send(report(&a, job_report::Kind::Progress(Progress { epoch: 2, ..Default::default() }))).unwrap();
    wait_log(
        &c,
        "coordinator",
        &format!("epoch report for epoch 999999, but job {job} has 2 epochs (0-based)"),
        Duration::from_secs(10),
    );
    wait_log(
        &c,
        "coordinator",
        &format!("progress report for epoch 2, but job {job} has 2 epochs (0-based)"),
        Duration::from_secs(10),
    );
    // A 9 MiB failure report full of terminal escapes (ESC[2K, \r, an OSC title).
    let evil = "\u{1b}[2K\r\u{1b}]0;pwned\u{7}boom ".repeat(9 * 1024 * 1024 / 20);
    tx.send(report(&a, job_report::Kind::Failed(evil))).unwrap();
    let info = wait_state(&c, &job, JobState::Recovering, Duration::from_secs(20)).await;
    assert!(info.history.is_empty(), "{:?}", info.history);
    assert!(info.message.len() <= cvdist_common::text::MAX_REPORT_TEXT, "{}", info.message.len());
    assert!(
        info.message.starts_with("rank 0 on r0 failed: \\u{1b}[2K\\r\\u{1b}]0;pwned\\u{7}boom"),
        "{}",
        &info.message[..100]
    );
    assert!(info.message.ends_with(" bytes in all]"), "{}", &info.message[info.message.len() - 80..]);
    assert!(info.encoded_len() < 64 * 1024, "record is {} bytes", info.encoded_len());
    for text in std::iter::once(&info.message).chain(&info.events) {
        assert!(!text.chars().any(cvdist_common::text::is_unsafe), "{text:?}");
    }
    // Every view of the job works and prints no control characters.
    for args in [vec!["jobs"], vec!["status"], vec!["status", &job], vec!["logs", &job]] {
        let out = cli(&c, &args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains(['\u{1b}', '\r', '\u{7}']), "{args:?} printed control characters");
        if args.len() == 2 {
            assert!(text.contains("\\u{1b}[2K\\r\\u{1b}]0;pwned\\u{7}boom"), "{args:?}: {text}");
        }
    }
    // Also after a restart.
    c.kill_coordinator();
    c.start_coordinator();
    let jobs = c.client().await.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 1);
    assert!(jobs[0].encoded_len() < 64 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_in_a_job_record_are_not_printed_by_the_cli() {
    let c = Cluster::new(64, 32);
    let job = c.submit(spec(2, 1)).await;
    let (tx, mut inbound, _) = session(&c, "r0").await;
    let a = next_assignment(&mut inbound).await;
    tx.send(report(&a, job_report::Kind::Failed("\u{1b}[2K\r\u{1b}]0;owned\u{7}disk on fire\u{202e}".into()))).unwrap();
    wait_state(&c, &job, JobState::Recovering, Duration::from_secs(20)).await;
    let out = cli(&c, &["status", &job]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!text.contains(['\u{1b}', '\r', '\u{7}', '\u{202e}']), "{text:?}");
    assert!(
        text.contains("message:    rank 0 on r0 failed: \\u{1b}[2K\\r\\u{1b}]0;owned\\u{7}disk on fire\\u{202e}"),
        "{text}"
    );
}

// ------------------------------------------------------------------ 4. slow attacker on the data port

/// The attacker: 24 connections to each data port, each sending one byte of a
/// hello every 5 s, reopened as soon as one is closed — from 127.0.0.2, another host as far
/// as the workers can tell. With the per-handshake deadline and the per-address limit the
/// ring forms and the 2-worker job succeeds without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_attacker_on_the_data_ports_does_not_block_the_ring() {
    let mut c = Cluster::new(64, 32);
    let ports = [free_port(), free_port()];
    for (k, p) in ports.iter().enumerate() {
        c.start_worker_on(k, true, &format!("127.0.0.1:{p}"));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for p in ports {
        for _ in 0..24 {
            let stop = stop.clone();
            let connected = connected.clone();
            attackers.push(tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut counted = false;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                    let Ok(mut s) = sock.connect(([127, 0, 0, 1], p).into()).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if !counted {
                        counted = true;
                        connected.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    // One byte of "CVDRING\x01" every 5 s, until the worker hangs up.
                    for b in b"CVDRING\x01".iter().cycle() {
                        if s.write_all(&[*b]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }));
        }
    }
    // The attack is in place once every attacker holds a connection.
    let start = Instant::now();
    while connected.load(std::sync::atomic::Ordering::SeqCst) < attackers.len() {
        assert!(start.elapsed() < Duration::from_secs(60), "the attackers could not connect\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = c.submit(small_spec("resnet20", 1, (2, 2))).await;
    let info = wait_state_terminal(&c, &job).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.restarts, 0);
    let logs = c.logs();
    assert!(
        logs.contains("too many pending handshakes from one address; dropping connections (logged once per address)"),
        "{logs}"
    );
    // The connections that held handshake slots are cut at the total deadline (~2 s after
    // they were accepted), although each of them sent a byte within every 5 s read.
    let start = Instant::now();
    while !c.logs().contains("127.0.0.2") || !c.logs().contains("reading hello: handshake deadline passed") {
        assert!(start.elapsed() < Duration::from_secs(15), "no handshake hit its deadline\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for a in attackers {
        a.abort();
    }
}

async fn wait_state_terminal(c: &Cluster, id: &str) -> JobInfo {
    let start = Instant::now();
    loop {
        let info = get_job(c, id).await;
        if info.state().is_terminal() {
            return info;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "job {id} did not finish\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------ 5. TLS off loopback

#[test]
fn a_non_loopback_listener_needs_tls_and_the_cli_warns_about_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(cvdist_bin())
            .args(["coordinator", "--listen", "192.0.2.1:50999"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .env("CVDIST_TOKEN", TOKEN)
            .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&[]);
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        "error: refusing to listen on 192.0.2.1:50999 without TLS: tokens would cross the network in plaintext; pass --tls-cert and --tls-key, or --allow-insecure-remote if the network itself is trusted and encrypted"
    );
    // The opt-out passes the check (binding TEST-NET-1 then fails), with a warning.
    let stderr = run(&["--allow-insecure-remote"]);
    assert!(
        stderr.contains("listening without TLS (--allow-insecure-remote): tokens cross the network in plaintext"),
        "{stderr}"
    );
    assert!(stderr.lines().last().unwrap_or("").starts_with("error: binding 192.0.2.1:50999"), "{stderr}");
    // With TLS files the check passes too.
    let stderr = run(&["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"]);
    assert!(stderr.lines().last().unwrap_or("").starts_with("error: binding 192.0.2.1:50999"), "{stderr}");

    // The CLI says when it sends the token in plaintext to another host.
    let out = Command::new(cvdist_bin())
        .args(["jobs", "--coordinator", "http://cvdist-test.invalid:50051"])
        .env("CVDIST_TOKEN", TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().next().unwrap_or(""),
        "warning: sending the token to http://cvdist-test.invalid:50051 over plaintext http://: anyone on the network path can read and reuse it; use https:// (coordinator --tls-cert/--tls-key)"
    );
}

// ------------------------------------------------------------------ 7. upload size, idle, temp files

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_bounded_by_the_model_time_out_when_idle_and_use_their_own_temp_files() {
    let c = Cluster::with_args(64, 32, &["--upload-idle-timeout", "2"]);
    let job = c.submit(spec(5, 1)).await;
    let (_tx, mut inbound, key) = session(&c, "r0").await;
    next_assignment(&mut inbound).await;
    let dir = c.state_dir().join("jobs").join(&job).join("checkpoints");
    let temps = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".upload"))
                    .collect()
            })
            .unwrap_or_default()
    };
    // resnet20: 269,722 parameters -> at most 269722*4*2.5 + 4 MiB bytes.
    let limit = cvdist_common::models::max_checkpoint_bytes("resnet20").unwrap();
    assert_eq!(limit, 269_722 * 10 + (4 << 20));
    let big = vec![1u8; limit as usize + 1];
    refused(
        upload(&c, chunks(&job, 0, "ckpt-e0001-s000000", &key, &big)).await,
        Code::ResourceExhausted,
        &format!(
            "checkpoint ckpt-e0001-s000000 exceeds {limit} bytes, the most a checkpoint of this job's model can take"
        ),
    );
    assert!(temps().is_empty(), "{:?}", temps());

    // Two uploads of one name that stall after their first chunk: two temp files, and both
    // are dropped (files removed) after the idle timeout.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = mpsc::unbounded_channel::<CheckpointChunk>();
        tx.send(chunks(&job, 0, "ckpt-e0001-s000000", &key, &[2u8; 1000]).remove(0)).unwrap();
        let mut client = c.worker_client().await;
        let call = tokio::spawn(async move {
            client.upload_checkpoint(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await
        });
        streams.push((tx, call));
    }
    let start = Instant::now();
    while temps().len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(2), "temp files: {:?}", temps());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let names = temps();
    assert!(names.iter().all(|n| n.starts_with(".ckpt-e0001-s000000.")) && names[0] != names[1], "{names:?}");
    for (tx, call) in streams {
        let err = tokio::time::timeout(Duration::from_secs(20), call).await.unwrap().unwrap().unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::DeadlineExceeded, "checkpoint upload sent nothing for 2 s; dropped")
        );
        drop(tx);
    }
    assert!(temps().is_empty(), "{:?}", temps());
    assert_eq!(get_job(&c, &job).await.latest_checkpoint, "");
    // A normal upload still goes through.
    upload(&c, chunks(&job, 0, "ckpt-e0001-s000000", &key, &[3u8; 5000])).await.unwrap();
}
