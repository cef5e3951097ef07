//! `cvdist worker --gpus N|all`: one worker process per GPU of this node, started and
//! watched by one supervisor process, as `torchrun --nproc-per-node` does.
//!
//! Why one process per GPU rather than one pod (or one container) per GPU: when every rank
//! runs in its own container, NCCL sees each rank as a separate host and talks over the
//! network even between GPUs of the same node; ranks that share a node (and its /dev/shm)
//! can use NVLink / PCIe peer-to-peer and shared-memory transports.
//!
//! Each child is an ordinary `cvdist-worker worker` with its own
//! * device: `cuda:K` (or `cpu` for CPU stand-ins, used by the tests),
//! * data-plane port: the given `--data-listen` / `--advertise-addr` port plus K
//!   (port 0 stays 0: the kernel picks one),
//! * worker id: `ID-gK`, stable across restarts so the coordinator's logs follow a GPU,
//! * cache directory `CACHE/gpu-K` (children must not fetch the data set into one place),
//! * `LOCAL_RANK=K` in its environment, and `--threads` = cores / N unless given.
//!
//! A child that dies is restarted after a back-off (a crash or an OOM kill; the coordinator
//! re-forms the job from its newest checkpoint). A child that exits with status 2 — the
//! worker's "refused at start / fatal error" status (bad flags, wrong protocol version,
//! bad token, port taken) — would fail the same way again, so the supervisor stops all
//! children and exits 2, which a pod's restart policy or Slurm then reports. SIGTERM or
//! SIGINT is forwarded to every child; children still running after the grace period get
//! SIGKILL. Children get SIGTERM from the kernel if the supervisor itself dies
//! (PR_SET_PDEATHSIG), so a SIGKILLed supervisor leaves no orphans behind.

use cvdist_common::term::stderr_line;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// Longest worker id the coordinator accepts (`spec::valid_name`).
const MAX_WORKER_ID: usize = 64;
/// First restart delay after a child dies; doubled after each quick death (one that ran less
/// than [`STABLE_RUN`]), up to [`MAX_BACKOFF`] — the same shape as a kubelet's crash loop
/// back-off, shorter because a worker's start is cheap.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE_RUN: Duration = Duration::from_secs(60);
/// Default time children get between SIGTERM and SIGKILL. Kubernetes gives the pod 60 s
/// (terminationGracePeriodSeconds in deploy/) and Slurm 30 s (KillWait's default), so the
/// supervisor finishes within both.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(25);
/// The worker's exit status for errors that retrying cannot fix (see `main.rs`).
const FATAL_STATUS: i32 = 2;
/// Flags the supervisor sets per child; the user's values are removed from the child's
/// command line first (clap refuses a flag given twice).
const PER_CHILD_FLAGS: [&str; 7] =
    ["--gpus", "--device", "--data-listen", "--advertise-addr", "--worker-id", "--threads", "--cache-dir"];
/// Environment variables the supervisor's own options may come from, removed from the
/// children's environment: a child must not supervise in turn.
const SUPERVISOR_ENV: [&str; 1] = ["CVDIST_GPUS"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("--gpus {0:?} must be a positive number or \"all\"")]
    Syntax(String),
    #[error("--gpus all counts CUDA devices, and none is visible (with --device cpu, give a number)")]
    AllWithoutCuda,
    #[error(
        "--gpus {wanted} needs {wanted} CUDA device(s) but {visible} are visible (use --device cpu for CPU stand-ins)"
    )]
    TooFew { wanted: usize, visible: usize },
    #[error("--gpus gives each worker its own GPU, so --device {0} cannot be combined with it (use --device cuda, auto or cpu)")]
    FixedDevice(String),
    #[error("--device {0:?} must be auto, cpu, cuda or cuda:K")]
    BadDevice(String),
    #[error("--advertise-addr {0:?} must be HOST:PORT so each worker can advertise PORT+K")]
    BadAdvertise(String),
    #[error("port {base} + {k} for worker {k} is past 65535; choose a lower --data-listen/--advertise-addr port")]
    PortOverflow { base: u16, k: usize },
    #[error("worker id {id:?} is too long: with the suffix -g{k} it must stay within {MAX_WORKER_ID} characters")]
    IdTooLong { id: String, k: usize },
}

/// `--gpus` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuCount {
    All,
    N(usize),
}

pub fn parse_gpus(text: &str) -> Result<GpuCount, SupervisorError> {
    match text {
        "all" => Ok(GpuCount::All),
        n => match n.parse::<usize>() {
            Ok(k) if k > 0 => Ok(GpuCount::N(k)),
            _ => Err(SupervisorError::Syntax(text.to_string())),
        },
    }
}

/// The supervisor's options, as `cvdist-worker worker` received them.
#[derive(Debug, Clone)]
pub struct Request {
    pub gpus: GpuCount,
    pub device: String,
    pub data_listen: SocketAddr,
    pub advertise_addr: Option<String>,
    /// The base id; the caller makes one up when the user gave none.
    pub worker_id: String,
    /// Intra-op threads per child; 0 = this machine's cores divided among the children.
    pub threads: usize,
    pub cache_dir: PathBuf,
}

/// One child's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildPlan {
    pub local_rank: usize,
    pub device: String,
    pub data_listen: SocketAddr,
    pub advertise_addr: Option<String>,
    pub worker_id: String,
    pub threads: usize,
    pub cache_dir: PathBuf,
}

/// Works out every child's settings. Pure: `cuda_count` is the number of visible CUDA
/// devices and `cores` this machine's CPU count, so the logic is testable anywhere.
pub fn plan(req: &Request, cuda_count: usize, cores: usize) -> Result<Vec<ChildPlan>, SupervisorError> {
    let cpu = match crate::device::parse(&req.device) {
        Ok(crate::device::DeviceRequest::Cpu) => true,
        Ok(crate::device::DeviceRequest::Cuda(Some(_))) => {
            return Err(SupervisorError::FixedDevice(req.device.clone()))
        }
        Ok(_) => false,
        Err(_) => return Err(SupervisorError::BadDevice(req.device.clone())),
    };
    let n = match req.gpus {
        GpuCount::All if cpu || cuda_count == 0 => return Err(SupervisorError::AllWithoutCuda),
        GpuCount::All => cuda_count,
        GpuCount::N(n) if !cpu && n > cuda_count => {
            return Err(SupervisorError::TooFew { wanted: n, visible: cuda_count })
        }
        GpuCount::N(n) => n,
    };
    let advertise = match &req.advertise_addr {
        None => None,
        Some(a) => {
            let (host, port) = a.rsplit_once(':').ok_or_else(|| SupervisorError::BadAdvertise(a.clone()))?;
            let port: u16 = port.parse().map_err(|_| SupervisorError::BadAdvertise(a.clone()))?;
            if host.is_empty() || port == 0 {
                return Err(SupervisorError::BadAdvertise(a.clone()));
            }
            Some((host.to_string(), port))
        }
    };
    let offset = |base: u16, k: usize| -> Result<u16, SupervisorError> {
        if base == 0 {
            return Ok(0);
        }
        u16::try_from(base as usize + k).map_err(|_| SupervisorError::PortOverflow { base, k })
    };
    let threads = if req.threads > 0 { req.threads } else { (cores / n).max(1) };
    (0..n)
        .map(|k| {
            let worker_id = format!("{}-g{k}", req.worker_id);
            if worker_id.len() > MAX_WORKER_ID {
                return Err(SupervisorError::IdTooLong { id: req.worker_id.clone(), k });
            }
            let mut data_listen = req.data_listen;
            data_listen.set_port(offset(req.data_listen.port(), k)?);
            let advertise_addr = match &advertise {
                Some((host, port)) => Some(format!("{host}:{}", offset(*port, k)?)),
                None => None,
            };
            Ok(ChildPlan {
                local_rank: k,
                device: if cpu { "cpu".into() } else { format!("cuda:{k}") },
                data_listen,
                advertise_addr,
                worker_id,
                threads,
                cache_dir: req.cache_dir.join(format!("gpu-{k}")),
            })
        })
        .collect()
}

/// The child's command line: the supervisor's own arguments (after the program name)
/// without [`PER_CHILD_FLAGS`], then the child's values for them.
pub fn child_args(original: &[OsString], child: &ChildPlan) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in original {
        if skip_value {
            skip_value = false;
            continue;
        }
        let text = arg.to_string_lossy();
        if let Some(flag) = PER_CHILD_FLAGS.iter().find(|f| text == **f || text.starts_with(&format!("{f}="))) {
            // `--flag value` also drops the value; `--flag=value` is one argument.
            skip_value = text == *flag;
            continue;
        }
        out.push(arg.clone());
    }
    let mut push = |flag: &str, value: &OsStr| {
        out.push(flag.into());
        out.push(value.to_owned());
    };
    push("--device", child.device.as_ref());
    push("--data-listen", child.data_listen.to_string().as_ref());
    if let Some(a) = &child.advertise_addr {
        push("--advertise-addr", a.as_ref());
    }
    push("--worker-id", child.worker_id.as_ref());
    push("--threads", child.threads.to_string().as_ref());
    push("--cache-dir", child.cache_dir.as_os_str());
    out
}

/// What to do after a child's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Restart it after this delay.
    Restart(Duration),
    /// Stop every child and exit with status 2.
    StopAll,
}

/// The restart policy: `status` is how the child ended, `ran` how long it lived, and
/// `backoff` the delay used for its previous restart (None before the first).
pub fn after_exit(code: Option<i32>, ran: Duration, backoff: Option<Duration>) -> AfterExit {
    if code == Some(FATAL_STATUS) {
        return AfterExit::StopAll;
    }
    match backoff {
        Some(prev) if ran < STABLE_RUN => AfterExit::Restart((prev * 2).min(MAX_BACKOFF)),
        _ => AfterExit::Restart(FIRST_BACKOFF),
    }
}

struct Slot {
    plan: ChildPlan,
    child: Option<Child>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Option<Duration>,
    restarts: u32,
}

/// Starts every child and supervises them until SIGTERM/SIGINT (returns Ok) or a child's
/// fatal exit (returns the error). `program` is this binary, `args` the arguments it was
/// started with (after the program name).
pub fn run(program: &Path, args: &[OsString], plans: Vec<ChildPlan>, grace: Duration) -> anyhow::Result<()> {
    // One thread: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    // every child must be spawned from a thread that lives as long as the supervisor.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(supervise(program, args, plans, grace))
}

async fn supervise(program: &Path, args: &[OsString], plans: Vec<ChildPlan>, grace: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    stderr_line(format_args!("cvdist supervisor: starting {} worker(s) (pid {})", plans.len(), std::process::id()));
    let mut slots = Vec::new();
    for plan in plans {
        let child = spawn(program, args, &plan)?;
        slots.push(Slot {
            plan,
            child: Some(child),
            started: Instant::now(),
            restart_at: None,
            backoff: None,
            restarts: 0,
        });
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let fatal = loop {
        tokio::select! {
            _ = term.recv() => { stderr_line(format_args!("cvdist supervisor: SIGTERM, stopping all workers")); break None; }
            _ = int.recv() => { stderr_line(format_args!("cvdist supervisor: SIGINT, stopping all workers")); break None; }
            _ = tick.tick() => {}
        }
        let mut fatal = None;
        for slot in slots.iter_mut() {
            let k = slot.plan.local_rank;
            if let Some(child) = slot.child.as_mut() {
                let Ok(Some(status)) = child.try_wait() else { continue };
                slot.child = None;
                let ran = slot.started.elapsed();
                match after_exit(status.code(), ran, slot.backoff) {
                    AfterExit::StopAll => {
                        fatal = Some(format!(
                            "worker {} exited with status {FATAL_STATUS} (a fatal error: see its log above)",
                            slot.plan.worker_id
                        ));
                        break;
                    }
                    AfterExit::Restart(delay) => {
                        stderr_line(format_args!(
                            "cvdist supervisor: worker {} (gpu {k}) {} after {:.0}s; restarting in {:.0}s",
                            slot.plan.worker_id,
                            describe(status),
                            ran.as_secs_f64(),
                            delay.as_secs_f64()
                        ));
                        slot.backoff = Some(delay);
                        slot.restart_at = Some(Instant::now() + delay);
                    }
                }
            } else if slot.restart_at.is_some_and(|t| Instant::now() >= t) {
                slot.restart_at = None;
                match spawn(program, args, &slot.plan) {
                    Ok(child) => {
                        slot.restarts += 1;
                        slot.started = Instant::now();
                        slot.child = Some(child);
                    }
                    Err(e) => {
                        let delay = slot.backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                        stderr_line(format_args!(
                            "cvdist supervisor: cannot restart worker {}: {e:#}; retrying in {:.0}s",
                            slot.plan.worker_id,
                            delay.as_secs_f64()
                        ));
                        slot.backoff = Some(delay);
                        slot.restart_at = Some(Instant::now() + delay);
                    }
                }
            }
        }
        if fatal.is_some() {
            break fatal;
        }
    };
    stop_all(&mut slots, grace).await;
    match fatal {
        Some(why) => anyhow::bail!("{why}; stopped all workers"),
        None => {
            stderr_line(format_args!("cvdist supervisor: all workers stopped"));
            Ok(())
        }
    }
}

/// SIGTERM to every running child, then SIGKILL to any still running after `grace`.
async fn stop_all(slots: &mut [Slot], grace: Duration) {
    for slot in slots.iter() {
        if let Some(pid) = slot.child.as_ref().and_then(Child::id) {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet (id() is None
            // once it is), so the pid cannot have been reused by another process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let running = slots
            .iter_mut()
            .filter_map(|s| s.child.as_mut())
            .filter_map(|c| c.try_wait().ok())
            .filter(Option::is_none)
            .count();
        if running == 0 {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for slot in slots.iter_mut() {
        if let Some(child) = slot.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                stderr_line(format_args!(
                    "cvdist supervisor: worker {} ignored SIGTERM for {:.0}s; killing it",
                    slot.plan.worker_id,
                    grace.as_secs_f64()
                ));
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => status.to_string(),
    }
}

fn spawn(program: &Path, args: &[OsString], plan: &ChildPlan) -> anyhow::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.args(child_args(args, plan))
        .env("LOCAL_RANK", plan.local_rank.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in SUPERVISOR_ENV {
        cmd.env_remove(var);
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only the
    // async-signal-safe prctl(2) and getppid(2).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl: then nobody would ever
            // send the death signal.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the supervisor exited while starting a worker"));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("starting {}: {e}", program.display()))?;
    let prefix = format!("[gpu {}] ", plan.local_rank);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward(out, prefix.clone(), false));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward(err, prefix, true));
    }
    stderr_line(format_args!(
        "cvdist supervisor: worker {} on {} (data plane {}, pid {})",
        plan.worker_id,
        plan.device,
        plan.advertise_addr.as_deref().unwrap_or(&plan.data_listen.to_string()),
        child.id().unwrap_or(0)
    ));
    Ok(child)
}

/// Copies a child's output line by line with a `[gpu K] ` prefix, so one container log
/// tells the ranks apart.
async fn forward(stream: impl AsyncRead + Unpin, prefix: String, to_stderr: bool) {
    use std::io::Write;
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // A closed stdout/stderr (a log collector gone) must not take the supervisor down:
        // write errors are dropped rather than panicking as println! would.
        let _ = if to_stderr {
            writeln!(std::io::stderr().lock(), "{prefix}{line}")
        } else {
            writeln!(std::io::stdout().lock(), "{prefix}{line}")
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(gpus: GpuCount, device: &str) -> Request {
        Request {
            gpus,
            device: device.into(),
            data_listen: "0.0.0.0:29500".parse().unwrap(),
            advertise_addr: Some("cvdist-worker-0.cvdist-worker.cvdist.svc.cluster.local:29500".into()),
            worker_id: "cvdist-worker-0".into(),
            threads: 0,
            cache_dir: PathBuf::from("/var/cache/cvdist"),
        }
    }

    #[test]
    fn parses_gpus() {
        assert_eq!(parse_gpus("all"), Ok(GpuCount::All));
        assert_eq!(parse_gpus("8"), Ok(GpuCount::N(8)));
        for bad in ["0", "-1", "x", "", "ALL"] {
            assert_eq!(parse_gpus(bad), Err(SupervisorError::Syntax(bad.into())), "{bad:?}");
        }
    }

    #[test]
    fn all_gpus_of_a_node_get_a_device_port_id_and_cache_each() {
        let plans = plan(&req(GpuCount::All, "cuda"), 8, 96).unwrap();
        assert_eq!(plans.len(), 8);
        for (k, p) in plans.iter().enumerate() {
            assert_eq!(p.local_rank, k);
            assert_eq!(p.device, format!("cuda:{k}"));
            assert_eq!(p.data_listen, format!("0.0.0.0:{}", 29500 + k).parse().unwrap());
            assert_eq!(
                p.advertise_addr.as_deref(),
                Some(format!("cvdist-worker-0.cvdist-worker.cvdist.svc.cluster.local:{}", 29500 + k).as_str())
            );
            assert_eq!(p.worker_id, format!("cvdist-worker-0-g{k}"));
            assert_eq!(p.threads, 12, "96 cores shared by 8 workers");
            assert_eq!(p.cache_dir, PathBuf::from(format!("/var/cache/cvdist/gpu-{k}")));
        }
        // auto is the same as cuda here; a number below the count uses the first GPUs.
        assert_eq!(plan(&req(GpuCount::N(2), "auto"), 8, 96).unwrap()[1].device, "cuda:1");
    }

    #[test]
    fn cpu_stand_ins_and_port_zero() {
        let mut r = req(GpuCount::N(3), "cpu");
        r.data_listen = "127.0.0.1:0".parse().unwrap();
        r.advertise_addr = None;
        r.threads = 1;
        let plans = plan(&r, 0, 2).unwrap();
        assert_eq!(plans.iter().map(|p| p.device.as_str()).collect::<Vec<_>>(), ["cpu", "cpu", "cpu"]);
        assert!(plans.iter().all(|p| p.data_listen.port() == 0 && p.advertise_addr.is_none() && p.threads == 1));
        // More children than cores still gets one thread each.
        r.threads = 0;
        assert!(plan(&r, 0, 2).unwrap().iter().all(|p| p.threads == 1));
    }

    #[test]
    fn impossible_requests_are_refused() {
        assert_eq!(plan(&req(GpuCount::All, "cuda"), 0, 8), Err(SupervisorError::AllWithoutCuda));
        assert_eq!(plan(&req(GpuCount::All, "cpu"), 8, 8), Err(SupervisorError::AllWithoutCuda));
        assert_eq!(plan(&req(GpuCount::N(2), "auto"), 0, 8), Err(SupervisorError::TooFew { wanted: 2, visible: 0 }));
        assert_eq!(plan(&req(GpuCount::N(9), "cuda"), 8, 8), Err(SupervisorError::TooFew { wanted: 9, visible: 8 }));
        assert_eq!(plan(&req(GpuCount::N(2), "cuda:1"), 8, 8), Err(SupervisorError::FixedDevice("cuda:1".into())));
        assert_eq!(plan(&req(GpuCount::N(2), "gpu"), 8, 8), Err(SupervisorError::BadDevice("gpu".into())));
        let mut r = req(GpuCount::N(2), "cpu");
        r.advertise_addr = Some("host-without-port".into());
        assert_eq!(plan(&r, 0, 8), Err(SupervisorError::BadAdvertise("host-without-port".into())));
        r.advertise_addr = Some("host:65535".into());
        assert_eq!(plan(&r, 0, 8), Err(SupervisorError::PortOverflow { base: 65535, k: 1 }));
        let mut r = req(GpuCount::N(2), "cpu");
        r.worker_id = "x".repeat(62);
        assert_eq!(plan(&r, 0, 8), Err(SupervisorError::IdTooLong { id: "x".repeat(62), k: 0 }));
        // The line a user sees names both numbers.
        assert_eq!(
            SupervisorError::TooFew { wanted: 4, visible: 0 }.to_string(),
            "--gpus 4 needs 4 CUDA device(s) but 0 are visible (use --device cpu for CPU stand-ins)"
        );
    }

    #[test]
    fn child_command_line_replaces_the_per_child_flags_and_keeps_the_rest() {
        let original: Vec<OsString> = [
            "worker",
            "--gpus",
            "2",
            "--coordinator",
            "http://c:50051",
            "--device=cpu",
            "--threads",
            "4",
            "--data",
            "/data",
            "--worker-id",
            "w",
            "--token-file",
            "/t",
            "--data-listen=0.0.0.0:29500",
            "--cache-dir",
            "/c",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let child = plan(
            &Request {
                gpus: GpuCount::N(2),
                device: "cpu".into(),
                data_listen: "0.0.0.0:29500".parse().unwrap(),
                advertise_addr: Some("h:29500".into()),
                worker_id: "w".into(),
                threads: 4,
                cache_dir: "/c".into(),
            },
            0,
            8,
        )
        .unwrap()
        .remove(1);
        let got: Vec<String> = child_args(&original, &child).iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            got,
            [
                "worker",
                "--coordinator",
                "http://c:50051",
                "--data",
                "/data",
                "--token-file",
                "/t",
                "--device",
                "cpu",
                "--data-listen",
                "0.0.0.0:29501",
                "--advertise-addr",
                "h:29501",
                "--worker-id",
                "w-g1",
                "--threads",
                "4",
                "--cache-dir",
                "/c/gpu-1",
            ]
        );
    }

    #[test]
    fn restart_policy() {
        assert_eq!(after_exit(Some(2), Duration::from_secs(1), None), AfterExit::StopAll);
        assert_eq!(
            after_exit(None, Duration::from_secs(1), None),
            AfterExit::Restart(FIRST_BACKOFF),
            "killed by a signal"
        );
        assert_eq!(
            after_exit(Some(101), Duration::from_secs(1), Some(Duration::from_secs(4))),
            AfterExit::Restart(Duration::from_secs(8))
        );
        assert_eq!(
            after_exit(Some(1), Duration::from_secs(1), Some(Duration::from_secs(20))),
            AfterExit::Restart(MAX_BACKOFF)
        );
        assert_eq!(
            after_exit(Some(1), STABLE_RUN, Some(MAX_BACKOFF)),
            AfterExit::Restart(FIRST_BACKOFF),
            "a long run resets the back-off"
        );
    }
}
