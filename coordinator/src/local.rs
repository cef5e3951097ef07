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
use cvdist_common::proto::{JobSpec, SubmitJobRequest};
use cvdist_common::run_dir;
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
    pub device: String,
    pub worker_bin: PathBuf,
    pub quiet: bool,
}

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

/// Runs the job to its end; returns whether it succeeded.
pub async fn run_local(run: LocalRun) -> anyhow::Result<bool> {
    if run.out.join(run_dir::SUMMARY_FILE).exists() {
        bail!("{} already holds a finished run; choose another --out", run.out.display());
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
        children.push(spawn_worker(&run, &url, &worker_token, k)?);
    }
    let children = std::sync::Arc::new(tokio::sync::Mutex::new(children));
    let supervisor = tokio::spawn(supervise(children.clone(), run.spec.max_restarts, {
        let (out, url, token) = (run.out.clone(), url.clone(), worker_token.clone());
        let (bin, data, device, threads) = (run.worker_bin.clone(), run.data.clone(), run.device.clone(), run.threads_per_worker);
        move |k| {
            let r = LocalRun {
                spec: JobSpec::default(),
                workers: 0,
                data: data.clone(),
                out: out.clone(),
                threads_per_worker: threads,
                device: device.clone(),
                worker_bin: bin.clone(),
                quiet: true,
            };
            spawn_worker(&r, &url, &token, k)
        }
    }));
    let outcome = drive(&run, &conn).await;
    supervisor.abort();
    let mut children = children.lock().await;
    for child in children.iter_mut() {
        let _ = child.start_kill();
    }
    for child in children.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let (job_id, ok) = outcome?;
    collect(&state_dir.join("jobs").join(&job_id), &run.out)?;
    if !run.quiet {
        eprintln!("run directory: {}", run.out.display());
    }
    Ok(ok)
}

/// Restarts local workers that die (a crash, the OOM killer), as a cluster scheduler would
/// reschedule a pod; the coordinator then re-forms the group from the newest checkpoint.
async fn supervise(
    children: std::sync::Arc<tokio::sync::Mutex<Vec<Child>>>,
    budget: u32,
    respawn: impl Fn(u32) -> anyhow::Result<Child>,
) {
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
                    eprintln!("local worker {k} exited ({status}); restart budget spent");
                    given_up.insert(k);
                    continue;
                }
                used += 1;
                eprintln!("local worker {k} exited ({status}); starting a replacement");
                match respawn(k as u32) {
                    Ok(c) => *child = c,
                    Err(e) => eprintln!("cannot restart local worker {k}: {e:#}"),
                }
            }
        }
    }
}

fn spawn_worker(run: &LocalRun, url: &str, worker_token: &str, k: u32) -> anyhow::Result<Child> {
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
        .arg(&run.device)
        .arg("--cache-dir")
        .arg(run.out.join(".cache"))
        .env(cvdist_common::auth::WORKER_TOKEN_ENV, worker_token)
        .env_remove(cvdist_common::auth::TOKEN_ENV)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
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
        eprintln!(
            "job {job_id}: {} for {} epochs on {} local worker(s) x {} thread(s)",
            run.spec.model, run.spec.epochs, run.workers, run.threads_per_worker
        );
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
        std::fs::rename(entry.path(), &dest).with_context(|| format!("moving {} to {}", entry.path().display(), dest.display()))?;
    }
    Ok(())
}
