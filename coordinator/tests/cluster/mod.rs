//! Test harness: a real coordinator process and real worker processes on loopback, with
//! a small CIFAR-10-format dataset written by the test. Processes are killed on drop.
#![allow(dead_code)]

use cvdist_common::cifar;
use cvdist_common::client::{connect, Client};
use cvdist_common::proto::{job_event, JobEvent, JobInfo, JobSpec, JobState, SubmitJobRequest, WatchJobRequest};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The client token (CLI, job management) and the worker credential every test process gets.
pub const TOKEN: &str = "test-token-0123456789";
pub const WORKER_TOKEN: &str = "test-worker-token-9876543210";

pub fn cvdist_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cvdist"))
}

pub fn worker_bin() -> PathBuf {
    let p = cvdist_bin().with_file_name("cvdist-worker");
    assert!(p.is_file(), "{} missing: build all binaries first (scripts/build.sh)", p.display());
    p
}

/// Writes a CIFAR-10-layout dataset of synthetic, learnable images.
pub fn write_dataset(dir: &Path, per_file: usize, test: usize) {
    let batches = dir.join(cifar::BATCHES_DIR);
    std::fs::create_dir_all(&batches).unwrap();
    for (i, f) in cifar::TRAIN_FILES.iter().enumerate() {
        cifar::write_split(&batches.join(f), &cifar::synthetic(per_file, 100 + i as u64)).unwrap();
    }
    cifar::write_split(&batches.join(cifar::TEST_FILE), &cifar::synthetic(test, 7)).unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `cvdist coordinator` on loopback with the test token, a 5 s heartbeat timeout and a
/// metrics endpoint, logging to `log`.
pub fn spawn_coordinator(port: u16, metrics_port: u16, state_dir: &Path, data: &Path, log: std::fs::File) -> Child {
    spawn_coordinator_with(port, metrics_port, state_dir, data, log, &[])
}

/// [`spawn_coordinator`] with extra command-line arguments.
pub fn spawn_coordinator_with(
    port: u16,
    metrics_port: u16,
    state_dir: &Path,
    data: &Path,
    log: std::fs::File,
    extra: &[String],
) -> Child {
    let mut cmd = Command::new(cvdist_bin());
    cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--data")
        .arg(data)
        .args(["--heartbeat-timeout", "5"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(extra);
    spawn_logged(&mut cmd, log)
}

/// Starts a cvdist process with the test credentials and plain-text info logs into `log`.
pub fn spawn_logged(cmd: &mut Command, log: std::fs::File) -> Child {
    cmd.env("CVDIST_TOKEN", TOKEN)
        .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
        .env("CVDIST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `dir/NAME.log`, created if missing and opened for appending (a restarted process adds
/// to its predecessor's log).
pub fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).unwrap()
}

/// Every `*.log` file in `dir`, each under a `==== PATH` line: what a failing test prints.
pub fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            out.push_str(&format!("==== {}\n{}\n", p.display(), std::fs::read_to_string(&p).unwrap_or_default()));
        }
    }
    out
}

/// `cvdist-worker worker` against `url` on the CPU, one thread, its data plane on any
/// loopback port, stdout discarded: a lone worker a test watches start (or refuse to);
/// the caller adds credentials and routes stderr, where a refusal's one line goes.
pub fn lone_worker(url: &str) -> Command {
    let mut cmd = Command::new(worker_bin());
    cmd.args(["worker", "--coordinator", url, "--data-listen", "127.0.0.1:0", "--device", "cpu", "--threads", "1"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// `cvdist local` of resnet20 on synthetic data on the CPU, one intra-op thread per
/// worker; the caller adds the run's size and `--out`.
pub fn local_on_cpu() -> Command {
    let mut cmd = Command::new(cvdist_bin());
    cmd.args(["local", "--model", "resnet20", "--dataset", "synthetic"]);
    cmd.args(["--device", "cpu", "--threads-per-worker", "1"]);
    cmd
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub metrics_port: u16,
    pub coordinator: Option<Child>,
    pub workers: Vec<Option<Child>>,
    /// Extra `cvdist coordinator` arguments, used at every (re)start.
    pub coordinator_args: Vec<String>,
}

impl Cluster {
    pub fn new(per_file: usize, test: usize) -> Cluster {
        Cluster::with_args(per_file, test, &[])
    }

    /// A cluster whose coordinator gets `args` on top of the usual ones.
    pub fn with_args(per_file: usize, test: usize, args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(&dir.path().join("data"), per_file, test);
        let mut c = Cluster {
            dir,
            port: free_port(),
            metrics_port: free_port(),
            coordinator: None,
            workers: Vec::new(),
            coordinator_args: args.iter().map(|a| a.to_string()).collect(),
        };
        c.start_coordinator();
        c
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log(&self, name: &str) -> std::fs::File {
        log_file(self.dir.path(), name)
    }

    pub fn start_coordinator(&mut self) {
        let child = spawn_coordinator_with(
            self.port,
            self.metrics_port,
            &self.state_dir(),
            &self.data(),
            self.log("coordinator"),
            &self.coordinator_args,
        );
        self.coordinator = Some(child);
        wait_port(self.port);
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts worker `k`; `local_data` decides between --data and fetching from the coordinator.
    pub fn start_worker(&mut self, k: usize, local_data: bool) {
        self.start_worker_on(k, local_data, "127.0.0.1:0");
    }

    /// [`Cluster::start_worker`] with its data plane on `data_listen`.
    pub fn start_worker_on(&mut self, k: usize, local_data: bool, data_listen: &str) {
        let log = self.log(&format!("worker-{k}"));
        let mut cmd = Command::new(worker_bin());
        cmd.args(["worker", "--coordinator", &self.url(), "--data-listen", data_listen, "--threads", "1"])
            .args(["--worker-id", &format!("w{k}")])
            .arg("--cache-dir")
            .arg(self.dir.path().join(format!("cache-{k}")));
        if local_data {
            cmd.arg("--data").arg(self.data());
        }
        let child = spawn_logged(&mut cmd, log);
        while self.workers.len() <= k {
            self.workers.push(None);
        }
        self.workers[k] = Some(child);
    }

    /// SIGKILL, as a crashed node or an OOM kill would do.
    pub fn kill_worker(&mut self, k: usize) {
        if let Some(mut c) = self.workers.get_mut(k).and_then(|w| w.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Watches `job` to its end, SIGKILLing worker `lost` and starting worker `replacement`
    /// in its place at the first event `at` accepts; returns the final snapshot and whether
    /// the kill happened (the job may end first).
    pub async fn replace_worker_at(
        &mut self,
        job: &str,
        timeout: Duration,
        (lost, replacement): (usize, usize),
        mut at: impl FnMut(&JobEvent) -> bool,
    ) -> (JobInfo, bool) {
        let url = self.url();
        let mut killed = false;
        let (info, _) = watch_until_done(&url, job, timeout, |ev| {
            if !killed && at(ev) {
                self.kill_worker(lost);
                self.start_worker(replacement, true);
                killed = true;
            }
            false
        })
        .await;
        (info, killed)
    }

    pub async fn client(&self) -> Client {
        connect(&self.url(), Some(TOKEN), None).await.unwrap()
    }

    /// A client holding the worker credential.
    pub async fn worker_client(&self) -> Client {
        connect(&self.url(), Some(WORKER_TOKEN), None).await.unwrap()
    }

    pub async fn submit(&self, spec: JobSpec) -> String {
        let mut c = self.client().await;
        c.submit_job(SubmitJobRequest { spec: Some(spec) }).await.unwrap().into_inner().job_id
    }

    /// Runs the `cvdist` CLI against this coordinator; returns (success, stdout).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(cvdist_bin())
            .args(args)
            .args(["--coordinator", &self.url()])
            .env("CVDIST_TOKEN", TOKEN)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The coordinator's Prometheus text, fetched over plain HTTP.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    /// The value of the unlabelled metric `name` (e.g. `cvdist_workers`); None while the
    /// coordinator does not report it.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until exactly `n` workers are registered: a group formed after this has all
    /// of them to choose from, however slowly the workers started.
    pub async fn wait_workers(&self, n: u32, within: Duration) {
        let start = std::time::Instant::now();
        while self.metric("cvdist_workers") != Some(f64::from(n)) {
            assert!(start.elapsed() < within, "{n} workers did not register within {within:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        logs(self.dir.path())
    }
}

/// A child process killed and reaped when dropped, also when an assertion fails; derefs to
/// the [`Child`].
pub struct ChildGuard(pub Child);

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for k in 0..self.workers.len() {
            self.kill_worker(k);
        }
        self.kill_coordinator();
    }
}

pub fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "port {port} did not open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Watches a job until it ends (reconnecting if the coordinator goes away); returns the
/// final snapshot and every event seen. `on_event` may act on the cluster mid-run.
pub async fn watch_until_done(
    url: &str,
    job: &str,
    timeout: Duration,
    mut on_event: impl FnMut(&JobEvent) -> bool,
) -> (JobInfo, Vec<JobEvent>) {
    let start = Instant::now();
    let mut events = Vec::new();
    loop {
        assert!(start.elapsed() < timeout, "job {job} did not finish within {timeout:?}; events: {events:#?}");
        let Ok(mut client) = connect(url, Some(TOKEN), None).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(resp) = client.watch_job(WatchJobRequest { job_id: job.to_string() }).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = resp.into_inner();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(ev))) => {
                    let stop = on_event(&ev);
                    let done = match &ev.event {
                        Some(job_event::Event::Snapshot(s)) => {
                            matches!(s.state(), JobState::Succeeded | JobState::Failed | JobState::Cancelled)
                        }
                        _ => false,
                    };
                    let snapshot = match &ev.event {
                        Some(job_event::Event::Snapshot(s)) => Some(s.clone()),
                        _ => None,
                    };
                    events.push(ev);
                    if done || stop {
                        if let Some(s) = snapshot {
                            if done {
                                return (s, events);
                            }
                        }
                        if stop {
                            break;
                        }
                    }
                }
                Ok(_) => break,
                Err(_) => panic!("job {job} did not finish within {timeout:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn small_spec(model: &str, epochs: u32, workers: (u32, u32)) -> JobSpec {
    let mut s = cvdist_common::spec::default_spec(model, epochs);
    s.batch_size = 32;
    s.train_samples = 512;
    s.test_samples = 200;
    s.min_workers = workers.0;
    s.max_workers = workers.1;
    s.lr = 0.05;
    s
}

/// Waits up to `within` for the child to exit; returns its status and how long it took.
/// Kills it and panics with `context()` if it is still running then.
pub fn wait_exit(child: &mut Child, within: Duration, context: &dyn Fn() -> String) -> (ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} still running after {within:?}\n{}", child.id(), context());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tmpfs of `size` mounted on a directory (needs root), unmounted (lazily) when dropped,
/// also when the test fails. `None` without root, or with `CVDIST_TEST_NO_MOUNT` set, which
/// forces a test's no-root path.
pub struct TinyDisk(pub PathBuf);

impl TinyDisk {
    pub fn mount(dir: &Path, size: &str) -> Option<TinyDisk> {
        if std::env::var_os("CVDIST_TEST_NO_MOUNT").is_some() {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| TinyDisk(dir.to_path_buf()))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// True for a progress report of `epoch` past its first step (a point where a mid-epoch
/// fault lands inside training).
pub fn is_progress_in(ev: &JobEvent, epoch: u32) -> bool {
    matches!(&ev.event, Some(job_event::Event::Progress(p)) if p.epoch == epoch && p.step > 0)
}

/// The SHA-256 of a finished job's final weights, as its final checkpoint records it (the
/// checkpoint of the end of epoch `epochs`): the value the bit-identity checks compare.
pub fn final_weights_sha(c: &Cluster, job: &str, epochs: u32) -> String {
    let path = c.state_dir().join("jobs").join(job).join(format!("checkpoints/ckpt-e{epochs:04}-s000000.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), c.logs()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sha256"].as_str().unwrap().to_string()
}

/// Watches `job` run to success with no restart and returns [`final_weights_sha`]: the
/// uninterrupted run a faulted one must match bit for bit.
pub async fn reference_sha(c: &Cluster, job: &str, timeout: Duration, epochs: u32) -> String {
    let (info, _) = watch_until_done(&c.url(), job, timeout, |_| false).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}", c.logs());
    assert_eq!(info.restarts, 0);
    final_weights_sha(c, job, epochs)
}
