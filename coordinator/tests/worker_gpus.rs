//! Devices and `cvdist worker --gpus N`, on a machine without a GPU: `--device cpu`
//! children stand in for GPUs. Real processes against a real coordinator: the children
//! register under their own ids, form a job with their own data-plane ports, a killed child
//! is restarted, SIGTERM stops all, a SIGKILLed supervisor leaves no child behind, and a
//! GPU the machine does not have is refused at start with one line.

mod cluster;

use cluster::{small_spec, spawn_logged, watch_until_done, worker_bin, Cluster};
use cvdist_common::proto::JobState;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous bounds: CI machines are slow and have two cores.
const START: Duration = Duration::from_secs(60);
const JOB: Duration = Duration::from_secs(300);
/// The supervisor gives children 25 s between SIGTERM and SIGKILL; allow for a slow host.
const STOP: Duration = Duration::from_secs(45);

fn wait_for(what: &str, timeout: Duration, c: &Cluster, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn registered_workers(c: &Cluster) -> u32 {
    c.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("cvdist_workers "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// Direct children of `pid`, from /proc (every thread's list).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out.sort();
    out
}

fn nul_list(path: String) -> Vec<String> {
    std::fs::read(path)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn flag(pid: u32, name: &str) -> Option<String> {
    let args = nul_list(format!("/proc/{pid}/cmdline"));
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// The child of `sup` that runs worker id `id`.
fn child_with_id(sup: u32, id: &str) -> Option<u32> {
    children(sup).into_iter().find(|p| flag(*p, "--worker-id").as_deref() == Some(id))
}

/// True while the process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

fn start_supervisor(c: &Cluster, gpus: u32, id: &str) -> Child {
    let mut cmd = Command::new(worker_bin());
    cmd.args(["worker", "--gpus", &gpus.to_string(), "--device", "cpu", "--coordinator", &c.url()])
        .args(["--data-listen", "127.0.0.1:0", "--threads", "1", "--worker-id", id])
        .arg("--data")
        .arg(c.data())
        .arg("--cache-dir")
        .arg(c.dir.path().join(format!("cache-{id}")));
    spawn_logged(&mut cmd, c.log(&format!("supervisor-{id}")))
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_n_starts_n_workers_restarts_a_killed_one_and_sigterm_stops_all() {
    let c = Cluster::new(128, 100);
    let mut sup = start_supervisor(&c, 2, "node0");
    let sup_pid = sup.id();
    wait_for("2 supervised workers to register", START, &c, || registered_workers(&c) == 2);

    // Each child: its own worker id, device, LOCAL_RANK and cache directory.
    let kids = children(sup_pid);
    assert_eq!(kids.len(), 2, "{}", c.logs());
    for k in 0..2 {
        let pid = child_with_id(sup_pid, &format!("node0-g{k}"))
            .unwrap_or_else(|| panic!("no child node0-g{k}\n{}", c.logs()));
        assert_eq!(flag(pid, "--device").as_deref(), Some("cpu"));
        assert!(nul_list(format!("/proc/{pid}/environ")).contains(&format!("LOCAL_RANK={k}")));
        assert!(flag(pid, "--cache-dir").unwrap().ends_with(&format!("cache-node0/gpu-{k}")));
        assert_eq!(flag(pid, "--gpus"), None, "a child must not supervise in turn");
    }
    let coord_log = std::fs::read_to_string(c.dir.path().join("coordinator.log")).unwrap();
    assert!(coord_log.contains("worker=node0-g0") && coord_log.contains("worker=node0-g1"), "{coord_log}");

    // The two children form a job: distinct data-plane ports, ring all-reduce between them.
    let mut spec = small_spec("resnet20", 1, (2, 2));
    spec.train_samples = 256;
    spec.test_samples = 100;
    let job = c.submit(spec).await;
    let (info, _) = watch_until_done(&c.url(), &job, JOB, |_| false).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}", c.logs());
    assert_eq!(info.history.last().map(|m| m.world_size), Some(2));
    assert!(info.history.iter().all(|m| m.train_loss.is_finite()));

    // A crashed child (SIGKILL, as the OOM killer does) is replaced under the same id.
    let old = child_with_id(sup_pid, "node0-g1").unwrap();
    signal(old, "-KILL");
    wait_for("node0-g1 to be restarted", START, &c, || child_with_id(sup_pid, "node0-g1").is_some_and(|p| p != old));
    let new = child_with_id(sup_pid, "node0-g1").unwrap();
    wait_for("node0-g1 to register again", START, &c, || {
        let log = std::fs::read_to_string(c.dir.path().join("coordinator.log")).unwrap_or_default();
        log.matches("worker registered worker=node0-g1").count() == 2 && registered_workers(&c) == 2
    });
    assert!(alive(child_with_id(sup_pid, "node0-g0").unwrap()), "the other child is untouched");
    let sup_log = std::fs::read_to_string(c.dir.path().join("supervisor-node0.log")).unwrap();
    assert!(sup_log.contains("worker node0-g1 (gpu 1) was killed by signal 9"), "{sup_log}");

    // SIGTERM stops every child, then the supervisor exits 0.
    let kids = children(sup_pid);
    assert_eq!(kids.len(), 2);
    assert!(kids.contains(&new));
    signal(sup_pid, "-TERM");
    let status =
        wait_exit(&mut sup, STOP).unwrap_or_else(|| panic!("supervisor still running after SIGTERM\n{}", c.logs()));
    assert!(status.success(), "{status}\n{}", c.logs());
    for pid in kids {
        assert!(!alive(pid), "worker pid {pid} outlived the supervisor");
    }
    wait_for("the coordinator to see both workers go", START, &c, || registered_workers(&c) == 0);
}

#[test]
fn a_sigkilled_supervisor_leaves_no_worker_behind() {
    let c = Cluster::new(16, 16);
    let mut sup = start_supervisor(&c, 2, "node1");
    wait_for("2 supervised workers to register", START, &c, || registered_workers(&c) == 2);
    let kids = children(sup.id());
    assert_eq!(kids.len(), 2);
    sup.kill().unwrap();
    sup.wait().unwrap();
    // PR_SET_PDEATHSIG sends each child SIGTERM when the supervisor dies.
    let start = Instant::now();
    while kids.iter().any(|p| alive(*p)) {
        assert!(start.elapsed() < STOP, "workers {kids:?} outlived their SIGKILLed supervisor");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("the coordinator to see both workers go", START, &c, || registered_workers(&c) == 0);
}

#[test]
fn a_fatal_child_exit_stops_the_supervisor_with_status_2() {
    let c = Cluster::new(16, 16);
    // The coordinator refuses this token: a worker exits 2 (retrying cannot help), so
    // restarting it would loop forever. The supervisor stops all and reports it.
    let out = Command::new(worker_bin())
        .args([
            "worker",
            "--gpus",
            "2",
            "--device",
            "cpu",
            "--coordinator",
            &c.url(),
            "--threads",
            "1",
            "--worker-id",
            "bad",
        ])
        .env("CVDIST_TOKEN", "not-the-token")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: worker bad-g")
            && last.ends_with("exited with status 2 (a fatal error: see its log above); stopped all workers"),
        "{err}"
    );
    assert!(err.contains("registration refused"), "the child's own reason is in the log: {err}");
}

/// What `cvdist-worker check-device --device auto` resolves to: "cpu" on a machine
/// without CUDA.
fn has_cuda() -> bool {
    let out = Command::new(worker_bin()).args(["check-device", "--device", "auto"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim() != "cpu"
}

/// Runs a command; returns (exit code, stderr lines).
fn refused(cmd: &mut Command) -> (Option<i32>, Vec<String>) {
    let out = cmd.env("CVDIST_TOKEN", cluster::TOKEN).env("NO_COLOR", "1").stdin(Stdio::null()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).lines().map(str::to_string).collect())
}

/// The arguments of `command` (`train` or `local`) for one resnet20 epoch on synthetic
/// data into `out`, on `device`.
fn one_epoch<'a>(command: &'a str, out: &'a str, device: &'a str) -> Vec<&'a str> {
    vec![command, "--model", "resnet20", "--epochs", "1", "--dataset", "synthetic", "--out", out, "--device", device]
}

#[test]
fn a_gpu_the_machine_lacks_is_refused_at_start_with_one_line() {
    let count = if has_cuda() { None } else { Some(0) };
    // An index no machine has: the line names it and the visible count.
    let want = |line: &str| {
        let count_ok = match count {
            Some(n) => line.ends_with(&format!("but {n} CUDA device(s) are visible")),
            None => line.ends_with("CUDA device(s) are visible"),
        };
        line.starts_with("error: device cuda:64 requested but ") && count_ok
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    for args in [
        vec!["worker", "--device", "cuda:64", "--coordinator", "http://127.0.0.1:9"],
        one_epoch("train", out, "cuda:64"),
        vec!["check-device", "--device", "cuda:64"],
    ] {
        let (code, lines) = refused(Command::new(worker_bin()).args(&args));
        assert_eq!(code, Some(2), "cvdist-worker {args:?}: {lines:?}");
        assert!(lines.len() == 1 && want(&lines[0]), "cvdist-worker {args:?}: {lines:?}");
    }
    // Through the `cvdist` front end, including `cvdist local`, which checks before it
    // starts anything (no run directory is created).
    let cvdist = cluster::cvdist_bin();
    for args in [
        vec!["worker", "--device", "cuda:64", "--coordinator", "http://127.0.0.1:9"],
        [one_epoch("local", out, "cuda:64"), vec!["--workers", "2", "--quiet"]].concat(),
    ] {
        let (code, lines) = refused(Command::new(&cvdist).args(&args));
        assert_eq!(code, Some(2), "cvdist {args:?}: {lines:?}");
        assert!(lines.len() == 1 && want(&lines[0]), "cvdist {args:?}: {lines:?}");
    }
    assert!(!std::path::Path::new(out).exists(), "nothing was started");
    if count == Some(0) {
        // Without any CUDA device, `cuda` (the local rank's GPU) and `--gpus N` are refused too.
        let (code, lines) = refused(Command::new(worker_bin()).args(["worker", "--device", "cuda"]));
        assert_eq!(
            (code, lines),
            (Some(2), vec!["error: device cuda requested but no CUDA device is visible".to_string()])
        );
        let (code, lines) = refused(Command::new(&cvdist).args(one_epoch("local", out, "cuda")));
        assert_eq!(
            (code, lines),
            (Some(2), vec!["error: device cuda requested but no CUDA device is visible".to_string()])
        );
        let (code, lines) = refused(Command::new(&cvdist).args(["worker", "--gpus", "2"]));
        assert_eq!(
            (code, lines),
            (
                Some(2),
                vec!["error: --gpus 2 needs 2 CUDA device(s) but 0 are visible (use --device cpu for CPU stand-ins)"
                    .to_string()]
            )
        );
        let (code, lines) = refused(Command::new(&cvdist).args(["worker", "--gpus", "all", "--device", "cpu"]));
        assert_eq!(code, Some(2));
        assert_eq!(
            lines,
            vec!["error: --gpus all counts CUDA devices, and none is visible (with --device cpu, give a number)"
                .to_string()]
        );
    }
}
