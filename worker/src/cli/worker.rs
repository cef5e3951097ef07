//! `cvdist worker`: join a coordinator and train what it assigns, or with `--gpus`,
//! supervise one such worker process per GPU.

use super::WorkerArgs;
use anyhow::Context;
use cvdist_common::auth;
use cvdist_common::choices::DeviceRequest;
use cvdist_common::term::stderr_line;
use std::path::PathBuf;
use std::time::Duration;

use crate::agent::{self, WorkerConfig};
use crate::{device, supervisor};

/// Where fetched data and local checkpoints go without `--cache-dir`:
/// `$XDG_CACHE_HOME/cvdist`, else `~/.cache/cvdist`, else the temp dir's `cvdist`.
fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("cvdist")
}

pub(super) fn run(a: WorkerArgs) -> anyhow::Result<()> {
    if let Some(gpus) = &a.gpus {
        return run_supervisor(&a, gpus);
    }
    let device = device::for_request(a.device)?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    let token = match auth::load_worker_token(a.worker_token_file.as_deref())? {
        Some(t) => Some(t),
        None => {
            let t = auth::load_token(a.token_file.as_deref())?;
            if t.is_some() {
                tracing::warn!(
                    "no worker credential (CVDIST_WORKER_TOKEN or --worker-token-file); trying the client token, which a coordinator with a worker credential refuses"
                );
            }
            t
        }
    };
    let cfg = WorkerConfig {
        coordinator: a.coordinator,
        token,
        tls_ca: a.tls_ca,
        worker_id: a.worker_id,
        device,
        threads: tch::get_num_threads() as usize,
        data: a.data,
        cache_dir: a.cache_dir.unwrap_or_else(default_cache),
        data_listen: a.data_listen,
        advertise_addr: a.advertise_addr,
        detached_timeout: Duration::from_secs(a.detached_timeout.max(1)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(agent::run(cfg, stop_signal()))?;
    Ok(())
}

/// `worker --gpus`: one child `cvdist-worker worker` per GPU (see `supervisor.rs`).
fn run_supervisor(a: &WorkerArgs, gpus: &str) -> anyhow::Result<()> {
    let count = supervisor::parse_gpus(gpus)?;
    // Only count GPUs when they matter: CPU stand-ins need no CUDA driver.
    let cuda = if a.device == DeviceRequest::Cpu { 0 } else { device::visible_cuda_devices() };
    let worker_id = if a.worker_id.is_empty() {
        format!("worker-{:06x}", rand::random::<u32>() & 0xff_ffff)
    } else {
        a.worker_id.clone()
    };
    let req = supervisor::Request {
        gpus: count,
        device: a.device.to_string(),
        data_listen: a.data_listen,
        advertise_addr: a.advertise_addr.clone(),
        worker_id,
        threads: a.threads,
        cache_dir: a.cache_dir.clone().unwrap_or_else(default_cache),
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let plans = supervisor::plan(&req, cuda, cores)?;
    let program = std::env::current_exe().context("locating the cvdist-worker executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    supervisor::run(&program, &args, plans, supervisor::DEFAULT_GRACE)
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C), after which the agent stops its job
/// and leaves; a second one ends the process at once.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            // Without handlers the default action (terminate) still applies.
            return std::future::pending().await;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping the job and leaving the coordinator");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stderr_line(format_args!("second signal: exiting at once"));
            // `_exit`, not `std::process::exit`: the latter runs libtorch's static
            // destructors (atexit) while the training thread is still inside libtorch,
            // which crashed the process with SIGSEGV instead of exiting 130.
            // SAFETY: `_exit` only ends the process; nothing after it runs.
            unsafe { libc::_exit(130) }
        });
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
