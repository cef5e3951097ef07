//! Field bugs, replayed with real processes: listeners that must bind, aborts
//! that must reach a worker forming its ring, the `cvdist` front end that must *be* the
//! worker, SIGTERM/Ctrl-C that must stop every long-running process within 10 s, the
//! workers overview of `cvdist status`, colour only on terminals, and readable event times.
//!
//! Every bound here is generous (CI machines vary, and have two cores); each one is far
//! below what the bug costs: the 60 s ring timeout, a shutdown that never ends.

mod cluster;

use cluster::{
    cvdist_bin, free_port, small_spec, spawn_logged, wait_exit, wait_port, watch_until_done, worker_bin, ChildGuard,
    Cluster, TOKEN, WORKER_TOKEN,
};
use cvdist_common::proto::{
    coordinator_message, worker_message, CheckpointChunk, CoordinatorMessage, GetJobRequest, Heartbeat, JobSpec,
    JobState, RegisterRequest, WatchJobRequest, WorkerMessage,
};
use cvdist_common::version::PROTOCOL_VERSION;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How soon every long-running process must stop on SIGTERM or Ctrl-C.
const STOP_WITHIN: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ helpers

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we started and have not reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig}) failed", child.id());
}

/// Pids of live processes whose command line contains `marker` (zombies excluded).
fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Field 3 of /proc/PID/stat is the state; Z = exited, waiting to be reaped.
        let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(marker) && pid != std::process::id() {
            found.push(pid);
        }
    }
    found
}

fn wait_no_process(marker: &str, within: Duration, context: &dyn Fn() -> String) {
    let start = Instant::now();
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < within, "processes {left:?} ({marker}) still alive after {within:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn gauge(c: &Cluster, name: &str) -> f64 {
    c.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("{name} missing from the metrics"))
}

fn wait_gauge(c: &Cluster, name: &str, want: f64, within: Duration) {
    let start = Instant::now();
    while gauge(c, name) != want {
        assert!(start.elapsed() < within, "{name} != {want} after {within:?}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_log(path: &Path, needle: &str, within: Duration) {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{needle:?} not in {} after {within:?}:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A job that keeps a worker busy far longer than any test runs.
fn long_spec(workers: u32) -> JobSpec {
    let mut s = small_spec("resnet20", 200, (workers, workers));
    s.dataset = "synthetic".into();
    s.train_samples = 256;
    s.test_samples = 64;
    s
}

/// A tiny single-worker job that finishes in seconds once a worker takes it.
fn quick_spec() -> JobSpec {
    let mut s = small_spec("resnet20", 1, (1, 1));
    s.dataset = "synthetic".into();
    s.train_samples = 64;
    s.test_samples = 32;
    s
}

async fn job_state(c: &Cluster, job: &str) -> cvdist_common::proto::JobInfo {
    c.client().await.get_job(GetJobRequest { job_id: job.into() }).await.unwrap().into_inner()
}

async fn wait_state(c: &Cluster, job: &str, want: JobState, within: Duration) -> cvdist_common::proto::JobInfo {
    let start = Instant::now();
    loop {
        let info = job_state(c, job).await;
        if info.state() == want {
            return info;
        }
        assert!(
            start.elapsed() < within,
            "job {job} is {:?}, not {want:?}, after {within:?}: {:?}\n{}",
            info.state(),
            info.events,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ 1. listeners

/// Runs a command that must fail at start; returns (exit code, stderr).
fn run_to_exit(cmd: &mut Command) -> (Option<i32>, String) {
    let mut child = cmd
        .env("CVDIST_TOKEN", TOKEN)
        .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, _) = wait_exit(&mut child, Duration::from_secs(30), &|| "expected it to exit at start".into());
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

fn assert_one_line_naming(stderr: &str, addr: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(addr), "{stderr}");
    assert!(lines[0].contains("in use"), "{stderr}");
}

#[test]
fn every_listener_a_user_asked_for_binds_or_the_process_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let state = dir.path().join("state");

    // --metrics-listen: an exit, not just a warning with the coordinator serving on.
    let (code, err) = run_to_exit(
        Command::new(cvdist_bin())
            .args(["coordinator", "--listen", &format!("127.0.0.1:{}", free_port()), "--metrics-listen", &taken_addr])
            .arg("--state-dir")
            .arg(&state),
    );
    assert_eq!(code, Some(2), "{err}");
    assert_one_line_naming(&err, &taken_addr);
    assert!(err.contains("metrics"), "{err}");

    // --listen and --data-listen, through the `cvdist` front end and the worker binary.
    let (code, err) = run_to_exit(
        Command::new(cvdist_bin()).args(["coordinator", "--listen", &taken_addr]).arg("--state-dir").arg(&state),
    );
    assert_eq!(code, Some(2), "{err}");
    assert_one_line_naming(&err, &taken_addr);
    for bin in [cvdist_bin(), worker_bin()] {
        let (code, err) = run_to_exit(
            Command::new(&bin)
                .args(["worker", "--coordinator", "http://127.0.0.1:9", "--data-listen", &taken_addr])
                .env("CVDIST_LOG", "error")
                .arg("--cache-dir")
                .arg(dir.path().join("cache")),
        );
        assert_eq!(code, Some(2), "{}: {err}", bin.display());
        assert_one_line_naming(&err, &taken_addr);
    }
    drop(taken);
}

// ------------------------------------------------------------------ 2. aborts

/// Worker b's data_batch_2.bin is cut to 196,572 bytes, so b fails to load its data
/// while a waits for it to form the ring; with --max-restarts 0 the job fails at once.
/// The abort must reach a in the rendezvous: left to the ring's 60 s connect timeout, the
/// next job given to a would sit RUNNING for a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_reaches_a_worker_that_is_forming_the_ring() {
    let mut c = Cluster::new(64, 32);
    // Worker b gets its own copy of the dataset, with one file truncated mid-record.
    let bad = c.dir.path().join("bad-data");
    cluster::write_dataset(&bad, 64, 32);
    let batch2 = bad.join(cvdist_common::cifar::BATCHES_DIR).join("data_batch_2.bin");
    assert_eq!(std::fs::metadata(&batch2).unwrap().len(), 64 * 3073);
    std::fs::OpenOptions::new().write(true).open(&batch2).unwrap().set_len(196_572).unwrap();
    c.start_worker(0, true); // w0 = worker a
    let log = c.log("worker-1");
    let mut cmd = Command::new(worker_bin());
    cmd.args([
        "worker",
        "--coordinator",
        &c.url(),
        "--data-listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--worker-id",
        "w1",
    ])
    .arg("--cache-dir")
    .arg(c.dir.path().join("cache-1"))
    .arg("--data")
    .arg(&bad);
    c.workers.push(None);
    c.workers.push(Some(spawn_logged(&mut cmd, log)));
    wait_gauge(&c, "cvdist_workers", 2.0, Duration::from_secs(60));

    let mut s = small_spec("resnet20", 1, (2, 2));
    s.max_restarts = 0;
    let first = c.submit(s).await;
    let (info, _) = watch_until_done(&c.url(), &first, Duration::from_secs(120), |_| false).await;
    assert_eq!(info.state(), JobState::Failed, "{:?}\n{}", info.events, c.logs());
    assert!(info.message.contains("data_batch_2.bin"), "{}", info.message);
    let failed_at = Instant::now();

    // The next job goes to worker a (ids are taken in order) and must start at once.
    let second = c.submit(quick_spec()).await;
    let (info, _) = watch_until_done(&c.url(), &second, Duration::from_secs(120), |_| false).await;
    let took = failed_at.elapsed();
    assert_eq!(info.state(), JobState::Succeeded, "{:?}\n{}", info.events, c.logs());
    assert_eq!(info.worker_ids, ["w0"]);
    eprintln!("next job done {took:?} after the first one failed");
    assert!(took < Duration::from_secs(40), "the next job took {took:?} (the ring timeout is 60 s)\n{}", c.logs());
    let a_log = std::fs::read_to_string(c.dir.path().join("worker-0.log")).unwrap();
    assert!(a_log.contains("collective aborted"), "worker a did not leave the ring setup through the abort:\n{a_log}");
}

/// Registers a worker by hand that never joins a ring (its data address refuses), and
/// keeps its session alive with heartbeats; returns the sender that keeps it open.
async fn phantom_worker(c: &Cluster, id: &str) -> tokio::sync::mpsc::UnboundedSender<WorkerMessage> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(WorkerMessage {
        msg: Some(worker_message::Msg::Register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: id.into(),
            data_addr: format!("127.0.0.1:{}", free_port()),
            capabilities: None,
        })),
    })
    .unwrap();
    let mut client = c.worker_client().await;
    let mut inbound =
        client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    match inbound.message().await.unwrap() {
        Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Registered(_)) }) => {}
        other => panic!("expected Registered, got {other:?}"),
    }
    let beat = tx.clone();
    tokio::spawn(async move {
        // Drain assignments and aborts; heartbeat well within the 5 s timeout.
        let _keep = inbound;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if beat.send(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) }).is_err() {
                return;
            }
        }
    });
    tx
}

/// `cvdist cancel` while worker a waits for a peer that never connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_worker_that_is_forming_the_ring() {
    let mut c = Cluster::new(64, 32);
    c.start_worker(0, true);
    wait_gauge(&c, "cvdist_workers", 1.0, Duration::from_secs(60));
    let _phantom = phantom_worker(&c, "w9").await;
    let mut s = long_spec(2);
    s.max_restarts = 0;
    let first = c.submit(s).await;
    wait_state(&c, &first, JobState::Running, Duration::from_secs(30)).await;
    // Worker a is in the ring setup, waiting for the phantom that never connects.
    wait_log(&c.dir.path().join("worker-0.log"), "forming the data-plane ring", Duration::from_secs(30));
    let (ok, out) = c.cli(&["cancel", &first]);
    assert!(ok && out.contains("CANCELLED"), "{out}");
    let cancelled_at = Instant::now();

    let second = c.submit(quick_spec()).await;
    let (info, _) = watch_until_done(&c.url(), &second, Duration::from_secs(120), |_| false).await;
    let took = cancelled_at.elapsed();
    eprintln!("next job done {took:?} after the cancel");
    assert_eq!(info.state(), JobState::Succeeded, "{:?}\n{}", info.events, c.logs());
    assert_eq!(info.worker_ids, ["w0"]);
    assert!(took < Duration::from_secs(40), "the next job took {took:?} (the ring timeout is 60 s)\n{}", c.logs());
}

// ------------------------------------------------------------------ 4. the front end execs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_cvdist_worker_stops_the_real_worker() {
    let c = Cluster::new(16, 16);
    for (sig, marker) in [(libc::SIGTERM, "frontend-term"), (libc::SIGKILL, "frontend-kill")] {
        let mut cmd = Command::new(cvdist_bin());
        cmd.args(["worker", "--coordinator", &c.url(), "--data-listen", "127.0.0.1:0", "--threads", "1"])
            .args(["--worker-id", marker])
            .arg("--cache-dir")
            .arg(c.dir.path().join(marker));
        let mut guard = ChildGuard(spawn_logged(&mut cmd, c.log(marker)));
        let child = &mut guard.0;
        wait_gauge(&c, "cvdist_workers", 1.0, Duration::from_secs(60));
        // The pid we started is the worker itself: no parent left behind to outlive.
        let exe = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
        assert!(exe.ends_with("cvdist-worker"), "pid {} runs {}", child.id(), exe.display());
        signal(child, sig);
        let (status, took) = wait_exit(child, STOP_WITHIN, &|| c.logs());
        eprintln!("cvdist worker stopped {took:?} after signal {sig}");
        if sig == libc::SIGTERM {
            assert!(status.success(), "{status:?} after {took:?}\n{}", c.logs());
        }
        wait_no_process(marker, Duration::from_secs(5), &|| c.logs());
        wait_gauge(&c, "cvdist_workers", 0.0, STOP_WITHIN);
    }
}

// ------------------------------------------------------------------ 5. stopping on signals

/// Coordinator + a worker training + an open watch stream; SIGTERM, then (after a
/// restart on the same state dir) SIGINT. It must not outlive SIGTERM while the
/// worker lives: it would hold the database lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_stops_on_sigterm_and_ctrl_c_and_restarts_at_once() {
    let mut c = Cluster::new(16, 16);
    c.start_worker(0, true);
    let job = c.submit(long_spec(1)).await;
    wait_state(&c, &job, JobState::Running, Duration::from_secs(60)).await;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // An open watch stream, as `cvdist submit --follow` keeps.
        let mut watch = c.client().await.watch_job(WatchJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
        let _ = watch.message().await.unwrap();
        // And an upload whose client never finishes: graceful shutdown alone would wait
        // for it forever (the upload idle timeout is 60 s); SHUTDOWN_GRACE cuts it off. It
        // opens the stream with the worker credential and sends nothing, so no admission
        // check can end it early.
        let (up_tx, up_rx) = tokio::sync::mpsc::unbounded_channel::<CheckpointChunk>();
        let mut uploader = c.worker_client().await;
        let upload = tokio::spawn(async move {
            uploader.upload_checkpoint(tokio_stream::wrappers::UnboundedReceiverStream::new(up_rx)).await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut coord = c.coordinator.take().unwrap();
        signal(&coord, sig);
        let (status, took) = wait_exit(&mut coord, STOP_WITHIN, &|| c.logs());
        assert!(status.success(), "signal {sig}: {status:?}\n{}", c.logs());
        eprintln!("coordinator stopped {took:?} after signal {sig}");
        // The watcher is told, rather than left hanging.
        assert!(tokio::time::timeout(Duration::from_secs(5), watch.message()).await.is_ok());
        assert!(tokio::time::timeout(Duration::from_secs(5), upload).await.is_ok(), "the upload hangs");
        drop(up_tx);

        let restarted = Instant::now();
        c.start_coordinator();
        assert!(restarted.elapsed() < STOP_WITHIN, "restart took {:?}", restarted.elapsed());
        let info = job_state(&c, &job).await;
        assert!(matches!(info.state(), JobState::Recovering | JobState::Running), "{:?}", info.state());
        let log = std::fs::read_to_string(c.dir.path().join("coordinator.log")).unwrap();
        assert!(!log.contains("already open"), "{log}");
        // The worker reconnects and the job resumes.
        wait_state(&c, &job, JobState::Running, Duration::from_secs(60)).await;
    }
}

/// A worker in the middle of a job stops within 10 s of SIGTERM or SIGINT, leaves the
/// coordinator at once, and the job goes on to recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stops_on_sigterm_and_ctrl_c_mid_job() {
    let mut c = Cluster::new(16, 16);
    let job = c.submit(long_spec(1)).await;
    for (k, sig) in [(0usize, libc::SIGTERM), (1, libc::SIGINT)] {
        c.start_worker(k, true);
        let info = wait_state(&c, &job, JobState::Running, Duration::from_secs(60)).await;
        assert_eq!(info.worker_ids, [format!("w{k}")]);
        // Wait for training proper (progress reported), not just the assignment.
        let start = Instant::now();
        while job_state(&c, &job).await.progress.is_none_or(|p| p.step == 0 && p.epoch == 0) {
            assert!(start.elapsed() < Duration::from_secs(60), "no progress\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut child = c.workers[k].take().unwrap();
        signal(&child, sig);
        let (status, took) = wait_exit(&mut child, STOP_WITHIN, &|| c.logs());
        eprintln!("worker stopped {took:?} after signal {sig}");
        assert!(status.success(), "{status:?}\n{}", c.logs());
        wait_gauge(&c, "cvdist_workers", 0.0, Duration::from_secs(5));
        wait_state(&c, &job, JobState::Recovering, Duration::from_secs(5)).await;
    }
}

/// A second signal while the first one's stop is under way ends the worker at once with
/// exit code 130, not with a crash: exiting ran libtorch's static destructors under the
/// training thread and died of SIGSEGV (found by scripts/bench-net.sh's cleanup).
#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_mid_job_exits_130_without_crashing() {
    let mut c = Cluster::new(16, 16);
    // Steps of a few hundred ms (resnet32, batch 256 on 2 cores): the first signal's stop
    // waits for the step under way, so the second one lands while it is in progress. With
    // resnet20 at batch 32 a step took ~20 ms and the stop sometimes finished first (exit 0).
    let mut s = long_spec(1);
    s.model = "resnet32".into();
    s.batch_size = 256;
    s.train_samples = 2048;
    let job = c.submit(s).await;
    c.start_worker(0, true);
    wait_state(&c, &job, JobState::Running, Duration::from_secs(60)).await;
    let start = Instant::now();
    while job_state(&c, &job).await.progress.is_none_or(|p| p.step == 0 && p.epoch == 0) {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut child = c.workers[0].take().unwrap();
    signal(&child, libc::SIGINT);
    signal(&child, libc::SIGTERM);
    let (status, took) = wait_exit(&mut child, STOP_WITHIN, &|| c.logs());
    eprintln!("worker exited {took:?} after the second signal: {status:?}");
    // 0 only if the first stop finished before the second signal, sent right after it.
    assert_eq!(status.code(), Some(130), "{status:?}\n{}", c.logs());
}

/// `cvdist local` with two workers training: SIGTERM, Ctrl-C (SIGINT) and SIGKILL each end
/// it, and no worker process is left behind.
#[test]
fn cvdist_local_stops_on_signals_and_leaves_no_worker() {
    let dir = tempfile::tempdir().unwrap();
    for (sig, code) in [(libc::SIGTERM, Some(143)), (libc::SIGINT, Some(130)), (libc::SIGKILL, None)] {
        let out = dir.path().join(format!("run-{sig}"));
        let mut cmd = Command::new(cvdist_bin());
        cmd.args(["local", "--model", "resnet20", "--epochs", "200", "--dataset", "synthetic", "--workers", "2"])
            .args([
                "--train-samples",
                "256",
                "--test-samples",
                "64",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--quiet",
            ])
            .arg("--out")
            .arg(&out);
        let log = std::fs::File::create(dir.path().join(format!("local-{sig}.log"))).unwrap();
        let mut guard = ChildGuard(spawn_logged(&mut cmd, log));
        let child = &mut guard.0;
        let context = || {
            let mut s = std::fs::read_to_string(dir.path().join(format!("local-{sig}.log"))).unwrap_or_default();
            for k in 0..2 {
                s.push_str(&std::fs::read_to_string(out.join(format!("worker-{k}.log"))).unwrap_or_default());
            }
            s
        };
        for k in 0..2 {
            wait_log(&out.join(format!("worker-{k}.log")), "assignment", Duration::from_secs(90));
        }
        // In the workers' command lines (--cache-dir OUT/.cache), not in cvdist local's.
        let marker = out.join(".cache").to_string_lossy().into_owned();
        assert_eq!(processes_with(&marker).len(), 2, "expected the two workers\n{}", context());
        signal(child, sig);
        let (status, took) = wait_exit(child, STOP_WITHIN, &context);
        eprintln!("cvdist local stopped {took:?} after signal {sig}");
        assert_eq!(status.code(), code, "signal {sig}: {status:?} after {took:?}\n{}", context());
        wait_no_process(&marker, Duration::from_secs(5), &context);
    }
}

// ------------------------------------------------------------------ 8 + 10. status and event times

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_workers_and_events_have_readable_times() {
    let mut c = Cluster::new(16, 16);
    c.start_worker(0, true);
    c.start_worker(1, true);
    wait_gauge(&c, "cvdist_workers", 2.0, Duration::from_secs(60));
    let job = c.submit(long_spec(1)).await;
    wait_state(&c, &job, JobState::Running, Duration::from_secs(60)).await;

    let (ok, out) = c.cli(&["status"]);
    assert!(ok, "{out}");
    assert!(out.contains("2 workers (1 busy)"), "{out}");
    let row = |id: &str| {
        out.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("no row for {id}:\n{out}")).to_string()
    };
    let busy = row("w0");
    for part in ["cpu", "busy", job.as_str(), "0/1", "ago"] {
        assert!(busy.contains(part), "{part:?} missing from {busy:?}");
    }
    let idle = row("w1");
    assert!(idle.contains("idle") && idle.contains("ago") && !idle.contains(&job), "{idle}");
    // What was printed before is still there.
    assert!(out.contains("1 jobs (1 active)"), "{out}");

    // Event times: RFC 3339 UTC, today, and in `status` how long ago.
    let now = time::OffsetDateTime::now_utc();
    let today = format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day());
    let (ok, logs) = c.cli(&["logs", &job]);
    assert!(ok, "{logs}");
    let first = logs.lines().next().unwrap_or_default();
    assert!(first.starts_with(&today) && first.contains("Z submitted: resnet20"), "{logs}");
    for line in logs.lines() {
        let (stamp, _) = line.split_once(' ').unwrap();
        assert_eq!(stamp.len(), "2026-11-30T14:43:02.590Z".len(), "{line}");
        assert!(stamp.parse::<f64>().is_err(), "raw Unix seconds in {line}");
    }
    let (ok, status) = c.cli(&["status", &job]);
    assert!(ok, "{status}");
    let events: Vec<&str> = status.lines().skip_while(|l| *l != "events:").skip(1).collect();
    assert!(!events.is_empty(), "{status}");
    for e in events {
        assert!(e.trim_start().starts_with(&today) && e.contains(" ago) "), "{e}");
    }
}

// ------------------------------------------------------------------ 9. colour

fn has_escape(bytes: &[u8]) -> bool {
    bytes.contains(&0x1b)
}

/// `cvdist coordinator` logging to `stderr`, until it serves; returns what it wrote.
fn coordinator_output(stderr: Stdio, no_color: Option<&str>, read: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(cvdist_bin());
    cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.path())
        .env("CVDIST_TOKEN", TOKEN)
        .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    wait_port(port);
    signal(&child, libc::SIGTERM);
    let _ = wait_exit(&mut child, STOP_WITHIN, &|| String::new());
    read()
}

/// Opens a pseudo-terminal; returns (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: out-pointers to two ints; no name, termios or window size.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) }
}

/// Reads what is buffered on a pty master without blocking once it is drained.
fn drain(master: &mut std::fs::File) -> Vec<u8> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn logs_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    // Redirected to a file: plain text, even without NO_COLOR.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.log");
    let file = std::fs::File::create(&path).unwrap();
    let text = coordinator_output(Stdio::from(file), None, || std::fs::read(&path).unwrap());
    assert!(String::from_utf8_lossy(&text).contains("coordinator listening"), "{}", String::from_utf8_lossy(&text));
    assert!(!has_escape(&text), "escape codes in a log file:\n{}", String::from_utf8_lossy(&text));

    // On a terminal: coloured, unless NO_COLOR is set.
    let (mut master, slave) = openpty();
    let text = coordinator_output(Stdio::from(slave), None, || drain(&mut master));
    assert!(String::from_utf8_lossy(&text).contains("coordinator listening"), "{}", String::from_utf8_lossy(&text));
    assert!(has_escape(&text), "no colour on a terminal:\n{}", String::from_utf8_lossy(&text));
    let (mut master, slave) = openpty();
    let text = coordinator_output(Stdio::from(slave), Some("1"), || drain(&mut master));
    assert!(String::from_utf8_lossy(&text).contains("coordinator listening"), "{}", String::from_utf8_lossy(&text));
    assert!(!has_escape(&text), "colour despite NO_COLOR:\n{}", String::from_utf8_lossy(&text));
}

/// `cvdist train --quiet … 2> log`: stderr is a file, not a terminal.
#[test]
fn cvdist_train_writes_no_escape_codes_into_a_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.log");
    let status = Command::new(cvdist_bin())
        .args(["train", "--model", "resnet20", "--epochs", "1", "--dataset", "synthetic", "--quiet", "--device", "cpu"])
        .args(["--train-samples", "64", "--test-samples", "32", "--batch-size", "32", "--threads", "1"])
        .arg("--out")
        .arg(dir.path().join("run"))
        .env_remove("NO_COLOR")
        .env_remove("CVDIST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&path).unwrap())
        .status()
        .unwrap();
    let text = std::fs::read(&path).unwrap();
    assert!(status.success(), "{}", String::from_utf8_lossy(&text));
    assert!(String::from_utf8_lossy(&text).contains("epoch done"), "{}", String::from_utf8_lossy(&text));
    assert!(!has_escape(&text), "escape codes in the log:\n{}", String::from_utf8_lossy(&text));
}

/// `cvdist local` whose workers die at start (here `/bin/false` stands in for a worker that
/// cannot load libtorch) must end once its restart budget is spent and too few workers are
/// left, with one line saying so; before, the job sat QUEUED and `cvdist local` waited forever.
#[test]
fn cvdist_local_ends_when_its_workers_are_gone_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let log_path = dir.path().join("local.log");
    let mut cmd = Command::new(cvdist_bin());
    cmd.args(["local", "--model", "resnet20", "--epochs", "1", "--dataset", "synthetic", "--workers", "2"])
        .args(["--train-samples", "64", "--test-samples", "32", "--batch-size", "32", "--device", "cpu"])
        .args(["--max-restarts", "1", "--quiet"])
        .arg("--out")
        .arg(&out)
        .env("CVDIST_WORKER_BIN", "/bin/false");
    let mut guard = ChildGuard(spawn_logged(&mut cmd, std::fs::File::create(&log_path).unwrap()));
    let (status, took) =
        wait_exit(&mut guard.0, Duration::from_secs(60), &|| std::fs::read_to_string(&log_path).unwrap_or_default());
    let log = std::fs::read_to_string(&log_path).unwrap();
    eprintln!("cvdist local ended {took:?} after start:\n{log}");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("restart budget (1) is spent; the job needs at least"), "{log}");
}
