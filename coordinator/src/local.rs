//! `cvdist local`: the whole system on one machine — an embedded coordinator on a free
//! loopback port, N worker processes, one job — with the results moved to `--out`.
//!
//! The workers are real processes talking real gRPC and real TCP to each other, exactly
//! as on a cluster; only the addresses are loopback ones. Two random credentials (a client
//! token for this process, a worker credential for the workers) protect the embedded
//! coordinator from other local users for the job's lifetime.

use crate::follow::{follow, print_summary, Connection};
use crate::server::{serve, CoordinatorConfig};
use anyhow::{bail, Context};
use cvdist_common::choices::DeviceRequest;
use cvdist_common::proto::{JobSpec, SubmitJobRequest};
use cvdist_common::run_dir;
use cvdist_common::term::stderr_line;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

pub struct LocalRun {
    pub spec: JobSpec,
    pub workers: u32,
    pub data: Option<PathBuf>,
    pub out: PathBuf,
    pub threads_per_worker: u32,
    pub device: DeviceRequest,
    pub worker_bin: PathBuf,
    pub quiet: bool,
    /// See [`CoordinatorConfig::keep_checkpoints`].
    pub keep_checkpoints: usize,
}

/// Set on every local worker when several of them train on the same GPU: NCCL refuses two
/// ranks of one communicator on one device of one host ("Duplicate GPU detected"), so each
/// worker claims a host of its own. NCCL then connects them through sockets, not NVLink or
/// shared memory: a way to run a multi-rank job on a one-GPU machine, not a fast one.
pub const NCCL_HOSTID: &str = "NCCL_HOSTID";

/// Finds `cvdist-worker` next to the running executable (how both are installed), or
/// where `$CVDIST_WORKER_BIN` says.
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CVDIST_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the cvdist executable")?;
    let dir = exe.parent().context("cvdist executable has no directory")?;
    let candidate = dir.join("cvdist-worker");
    if candidate.is_file() {
        return Ok(candidate);
    }
    // `cargo test` runs from target/*/deps while the binaries sit one level up.
    if let Some(up) = dir.parent() {
        let c = up.join("cvdist-worker");
        if c.is_file() {
            return Ok(c);
        }
    }
    bail!("cannot find cvdist-worker next to {} (set CVDIST_WORKER_BIN)", exe.display())
}

/// How a local run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job ended; `true` when it succeeded.
    Finished(bool),
    /// Stopped by this signal number (SIGINT, SIGTERM) before the job ended.
    Interrupted(i32),
}

/// Makes a child process get SIGKILL when the thread that started it dies (Linux
/// `PR_SET_PDEATHSIG`), so a `cvdist` killed with SIGKILL leaves no worker behind that
/// would retry a coordinator that is gone. Call it from a long-lived thread (the main
/// thread or a runtime worker): the signal fires when that *thread* exits. No-op
/// elsewhere.
pub fn die_with_parent<C: PreExec>(cmd: &mut C) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        let hook = move || {
            // SAFETY: prctl and getppid are async-signal-safe; no allocation happens here.
            unsafe {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would
                // ever send the signal.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("parent exited while starting the worker"));
                }
            }
            Ok(())
        };
        cmd.set_pre_exec(hook);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// The `pre_exec` hook of std's and tokio's `Command`.
pub trait PreExec {
    fn set_pre_exec(&mut self, f: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static);
}

#[cfg(unix)]
impl PreExec for std::process::Command {
    fn set_pre_exec(&mut self, f: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static) {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only makes async-signal-safe calls (see die_with_parent).
        unsafe {
            self.pre_exec(f);
        }
    }
}

#[cfg(unix)]
impl PreExec for Command {
    fn set_pre_exec(&mut self, f: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static) {
        // SAFETY: the hook only makes async-signal-safe calls (see die_with_parent).
        unsafe {
            self.pre_exec(f);
        }
    }
}

#[cfg(not(unix))]
impl PreExec for std::process::Command {
    fn set_pre_exec(&mut self, _f: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static) {}
}

#[cfg(not(unix))]
impl PreExec for Command {
    fn set_pre_exec(&mut self, _f: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static) {}
}

/// Runs the job to its end, or until `interrupted` resolves (with a signal number): then
/// the workers are killed and the embedded coordinator stopped, within a few seconds.
pub async fn run_local(run: LocalRun, interrupted: impl std::future::Future<Output = i32>) -> anyhow::Result<Outcome> {
    if run.out.join(run_dir::SUMMARY_FILE).exists() {
        bail!("{} already holds a finished run; choose another --out", run.out.display());
    }
    let shared_gpu = check_device(&run.worker_bin, run.device, run.workers)?;
    let distinct_hosts = shared_gpu && std::env::var_os(NCCL_HOSTID).is_none();
    if distinct_hosts && !run.quiet {
        stderr_line(format_args!(
            "{} local workers share a GPU: each gets its own {NCCL_HOSTID}, so NCCL connects them through \
             sockets (slower than one worker per GPU)",
            run.workers
        ));
    }
    std::fs::create_dir_all(&run.out).with_context(|| format!("creating {}", run.out.display()))?;
    let state_dir = run.out.join(".coordinator");
    // Two credentials, as on a cluster: the client token for this process, the worker
    // credential for the worker processes only.
    let token = hex::encode(rand::random::<[u8; 16]>());
    let worker_token = hex::encode(rand::random::<[u8; 16]>());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")?;
    let port = listener.local_addr()?.port();
    let cfg = CoordinatorConfig {
        state_dir: state_dir.clone(),
        token: Some(token.clone()),
        worker_token: Some(worker_token.clone()),
        allow_insecure_remote: false,
        tls: None,
        data_dir: run.data.clone(),
        heartbeat_timeout: Duration::from_secs(10),
        metrics_listen: None,
        keep_checkpoints: run.keep_checkpoints,
        upload_idle_timeout: Duration::from_secs(60),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, cfg, async {
        let _ = stop_rx.await;
    }));
    let url = format!("http://127.0.0.1:{port}");
    let conn = Connection { url: url.clone(), token: Some(token.clone()), tls_ca: None };

    let mut children = Vec::new();
    for k in 0..run.workers {
        children.push(spawn_worker(&run, &url, &worker_token, k, distinct_hosts)?);
    }
    let children = std::sync::Arc::new(tokio::sync::Mutex::new(children));
    let mut supervisor =
        tokio::spawn(supervise(children.clone(), run.spec.max_restarts, run.spec.min_workers.max(1), {
            let (out, url, token) = (run.out.clone(), url.clone(), worker_token.clone());
            let (bin, data, device, threads) =
                (run.worker_bin.clone(), run.data.clone(), run.device, run.threads_per_worker);
            move |k| {
                let r = LocalRun {
                    spec: JobSpec::default(),
                    workers: 0,
                    data: data.clone(),
                    out: out.clone(),
                    threads_per_worker: threads,
                    device,
                    worker_bin: bin.clone(),
                    quiet: true,
                    keep_checkpoints: 0,
                };
                spawn_worker(&r, &url, &token, k, distinct_hosts)
            }
        }));
    let outcome = tokio::select! {
        o = drive(&run, &conn) => Ok(Some(o)),
        // Too few workers left and none may be restarted: the job could only wait forever.
        gone = &mut supervisor => {
            let why = gone.unwrap_or_else(|e| format!("the worker supervisor failed: {e}"));
            stderr_line(format_args!("error: {why}; worker logs are in {}", run.out.display()));
            Ok(None)
        }
        signal = interrupted => {
            stderr_line(format_args!("interrupted: stopping the local workers and the coordinator"));
            Err(signal)
        }
    };
    supervisor.abort();
    let mut children = children.lock().await;
    for child in children.iter_mut() {
        let _ = child.start_kill();
    }
    for child in children.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    let _ = stop_tx.send(());
    // serve() stops within SHUTDOWN_GRACE by itself; the margin only guards against a bug.
    let _ = tokio::time::timeout(crate::server::SHUTDOWN_GRACE + Duration::from_secs(2), server).await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(signal) => {
            if !run.quiet {
                stderr_line(format_args!("run stopped before its end; the job's state is in {}", state_dir.display()));
            }
            return Ok(Outcome::Interrupted(signal));
        }
    };
    let Some(outcome) = outcome else {
        stderr_line(format_args!("run stopped before its end; the job's state is in {}", state_dir.display()));
        return Ok(Outcome::Finished(false));
    };
    let (job_id, ok) = outcome?;
    collect(&state_dir.join("jobs").join(&job_id), &run.out)?;
    if !run.quiet {
        stderr_line(format_args!("run directory: {}", run.out.display()));
    }
    Ok(Outcome::Finished(ok))
}

/// Refuses a CUDA device this machine does not have before anything starts (otherwise
/// every worker would exit at once, be restarted and exit again), and says whether two of
/// the `workers` would train on the same GPU. `cpu` and `auto` cannot fail, so they skip
/// the check and its libtorch start-up (and `auto` is never NCCL on a shared GPU: its
/// collective falls back to the ring when NCCL cannot be set up).
///
/// One check suffices: `--device cuda` gives local rank k the GPU k modulo the GPUs
/// visible (`cvdist_worker::device::resolve`), so the last rank resolves to `cuda:{k}`
/// exactly when no GPU is shared; an explicit `cuda:K` is the same GPU for every worker.
fn check_device(worker_bin: &Path, device: DeviceRequest, workers: u32) -> anyhow::Result<bool> {
    if matches!(device, DeviceRequest::Cpu | DeviceRequest::Auto) {
        return Ok(false);
    }
    let last = workers.max(1) - 1;
    let out = std::process::Command::new(worker_bin)
        .args(["check-device", "--device", &device.to_string()])
        .env("LOCAL_RANK", last.to_string())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", worker_bin.display()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("device check failed");
        bail!("{}", line.trim().trim_start_matches("error: "));
    }
    if matches!(device, DeviceRequest::Cuda(Some(_))) {
        return Ok(workers > 1);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim() != format!("cuda:{last}"))
}

/// Restarts local workers that die (a crash, the OOM killer), as a cluster scheduler would
/// reschedule a pod; the coordinator then re-forms the group from the newest checkpoint.
/// Returns (with the reason) once fewer than `min_workers` are left and the restart budget
/// is spent: no worker can arrive any more, so waiting would never end.
async fn supervise(
    children: std::sync::Arc<tokio::sync::Mutex<Vec<Child>>>,
    budget: u32,
    min_workers: u32,
    respawn: impl Fn(u32) -> anyhow::Result<Child>,
) -> String {
    let mut used = 0;
    let mut given_up = std::collections::BTreeSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut children = children.lock().await;
        for (k, child) in children.iter_mut().enumerate() {
            if given_up.contains(&k) {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                if used >= budget {
                    stderr_line(format_args!("local worker {k} exited ({status}); restart budget spent"));
                    given_up.insert(k);
                    continue;
                }
                used += 1;
                stderr_line(format_args!("local worker {k} exited ({status}); starting a replacement"));
                match respawn(k as u32) {
                    Ok(c) => *child = c,
                    Err(e) => stderr_line(format_args!("cannot restart local worker {k}: {e:#}")),
                }
            }
        }
        let left = children.len() - given_up.len();
        if (left as u32) < min_workers {
            return format!(
                "{} of {} local workers exited and the restart budget ({budget}) is spent; the job needs at least {min_workers}",
                given_up.len(),
                children.len()
            );
        }
    }
}

fn spawn_worker(
    run: &LocalRun,
    url: &str,
    worker_token: &str,
    k: u32,
    distinct_nccl_host: bool,
) -> anyhow::Result<Child> {
    let log_path = run.out.join(format!("worker-{k}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(&run.worker_bin);
    cmd.arg("worker")
        .arg("--coordinator")
        .arg(url)
        .arg("--worker-id")
        .arg(format!("local-{k}"))
        .arg("--data-listen")
        .arg("127.0.0.1:0")
        .arg("--threads")
        .arg(run.threads_per_worker.to_string())
        .arg("--device")
        .arg(run.device.to_string())
        .arg("--cache-dir")
        .arg(run.out.join(".cache"))
        .env(cvdist_common::auth::WORKER_TOKEN_ENV, worker_token)
        .env_remove(cvdist_common::auth::TOKEN_ENV)
        // `--device cuda` then means cuda:(k mod device count) (worker/src/device.rs).
        .env("LOCAL_RANK", k.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    if distinct_nccl_host {
        cmd.env(NCCL_HOSTID, format!("cvdist-local-{k}"));
    }
    die_with_parent(&mut cmd);
    if let Some(d) = &run.data {
        cmd.arg("--data").arg(d);
    }
    cmd.spawn().with_context(|| format!("starting {}", run.worker_bin.display()))
}

async fn drive(run: &LocalRun, conn: &Connection) -> anyhow::Result<(String, bool)> {
    let mut client = conn.client().await?;
    let job_id = client
        .submit_job(SubmitJobRequest { spec: Some(run.spec.clone()) })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .job_id;
    if !run.quiet {
        stderr_line(format_args!(
            "job {job_id}: {} for {} epochs on {} local worker(s) x {} thread(s)",
            run.spec.model, run.spec.epochs, run.workers, run.threads_per_worker
        ));
    }
    let info = follow(conn, &job_id, run.quiet).await?;
    let ok = print_summary(&info);
    Ok((job_id, ok))
}

/// Moves the job's run directory contents into `out` (same filesystem: cheap renames).
fn collect(job_dir: &Path, out: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(job_dir).with_context(|| format!("reading {}", job_dir.display()))? {
        let entry = entry?;
        let dest = out.join(entry.file_name());
        if dest.exists() {
            if dest.is_dir() {
                std::fs::remove_dir_all(&dest)?;
            } else {
                std::fs::remove_file(&dest)?;
            }
        }
        std::fs::rename(entry.path(), &dest)
            .with_context(|| format!("moving {} to {}", entry.path().display(), dest.display()))?;
    }
    Ok(())
}
