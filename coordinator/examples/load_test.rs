//! Control-plane load benchmark (not part of `cargo test`; run `scripts/bench-load.sh`).
//!
//! Starts one real `cvdist coordinator` on loopback, N real `cvdist-worker worker`
//! processes (`--threads 1`), optionally a small real job on two of them, then for a fixed
//! time keeps W concurrent `WatchJob` streams open and S client loops issuing
//! `GetJob`/`ListJobs` back to back. Reports status-call latency (p50/p90/p99/max) and
//! checks that no worker was dropped: `cvdist_workers` on the Prometheus endpoint still
//! equals N, every worker process is alive, and the coordinator logged no lost session.
//!
//! Exit status 0 when p99 < --p99-target-ms and nothing was dropped, 1 otherwise.

use clap::Parser;
use cvdist_common::client::connect;
use cvdist_common::proto::{GetJobRequest, ListJobsRequest, SubmitJobRequest, WatchJobRequest};
use cvdist_common::{cifar, spec};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "load-test-token";
const WORKER_TOKEN: &str = "load-test-worker-token";

#[derive(Parser)]
struct Args {
    /// Worker processes to register.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Concurrent WatchJob streams.
    #[arg(long, default_value_t = 50)]
    watchers: usize,
    /// Concurrent GetJob/ListJobs loops.
    #[arg(long, default_value_t = 8)]
    status_clients: usize,
    /// Pause between one loop's calls, in milliseconds.
    #[arg(long, default_value_t = 20)]
    status_interval_ms: u64,
    /// Measurement time in seconds (after every worker has registered).
    #[arg(long, default_value_t = 45)]
    duration: u64,
    /// Also train a small real job on two of the workers during the measurement.
    #[arg(long)]
    job: bool,
    #[arg(long, default_value_t = 100.0)]
    p99_target_ms: f64,
    /// Directory with the cvdist and cvdist-worker binaries (default: next to this example's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "port {port} did not open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(port: u16, name: &str) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return -1.0 };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(-1.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn write_dataset(dir: &Path) {
    let batches = dir.join(cifar::BATCHES_DIR);
    std::fs::create_dir_all(&batches).unwrap();
    for (i, f) in cifar::TRAIN_FILES.iter().enumerate() {
        cifar::write_split(&batches.join(f), &cifar::synthetic(256, 100 + i as u64)).unwrap();
    }
    cifar::write_split(&batches.join(cifar::TEST_FILE), &cifar::synthetic(128, 7)).unwrap();
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(|p| p.parent()).unwrap().to_path_buf()
    });
    let (cvdist, worker) = (bin_dir.join("cvdist"), bin_dir.join("cvdist-worker"));
    assert!(
        cvdist.is_file() && worker.is_file(),
        "build the binaries first (scripts/build.sh); looked in {}",
        bin_dir.display()
    );

    let dir = tempfile::tempdir().unwrap();
    write_dataset(&dir.path().join("data"));
    let (port, metrics) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let coord_log = dir.path().join("coordinator.log");
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(&cvdist)
            .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("CVDIST_TOKEN", TOKEN)
            .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&coord_log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_port(port);
    wait_port(metrics);

    let t0 = Instant::now();
    for k in 0..args.workers {
        procs.0.push(
            Command::new(&worker)
                .args([
                    "worker",
                    "--coordinator",
                    &url,
                    "--data-listen",
                    "127.0.0.1:0",
                    "--threads",
                    "1",
                    "--device",
                    "cpu",
                ])
                .args(["--worker-id", &format!("lw{k:02}")])
                .arg("--data")
                .arg(dir.path().join("data"))
                .arg("--cache-dir")
                .arg(dir.path().join(format!("cache-{k}")))
                .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
                .env("CVDIST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(format!("worker-{k}.log"))).unwrap())
                .spawn()
                .unwrap(),
        );
    }
    while metric(metrics, "cvdist_workers") < args.workers as f64 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "only {} of {} workers registered",
            metric(metrics, "cvdist_workers"),
            args.workers
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let register_s = t0.elapsed().as_secs_f64();
    println!("{} workers registered in {register_s:.1}s", args.workers);

    // The watched job: a small real one on two workers, or one that waits for more
    // workers than exist (so every worker stays idle and registered).
    let mut s = spec::default_spec("resnet20", 1000);
    s.dataset = cvdist_common::choices::Dataset::Cifar10.to_string();
    s.train_samples = 1024;
    s.test_samples = 128;
    s.batch_size = 32;
    if args.job {
        s.min_workers = 2;
        s.max_workers = 2;
    } else {
        s.min_workers = (args.workers as u32 + 1).min(1024);
        s.max_workers = s.min_workers;
        s.train_samples = 0;
    }
    let mut client = connect(&url, Some(TOKEN), None).await.unwrap();
    let job = client.submit_job(SubmitJobRequest { spec: Some(s) }).await.unwrap().into_inner().job_id;

    let stop_at = Instant::now() + Duration::from_secs(args.duration);
    let events = Arc::new(AtomicU64::new(0));
    let broken = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let (url, job, events, broken) = (url.clone(), job.clone(), events.clone(), broken.clone());
        watchers.push(tokio::spawn(async move {
            let mut c = connect(&url, Some(TOKEN), None).await.unwrap();
            let mut stream = c.watch_job(WatchJobRequest { job_id: job }).await.unwrap().into_inner();
            loop {
                let left = stop_at.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, stream.message()).await {
                    Err(_) => return,
                    Ok(Ok(Some(_))) => {
                        events.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        broken.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    let mut loops = Vec::new();
    for k in 0..args.status_clients {
        let (url, job) = (url.clone(), job.clone());
        let pause = Duration::from_millis(args.status_interval_ms);
        loops.push(tokio::spawn(async move {
            let mut c = connect(&url, Some(TOKEN), None).await.unwrap();
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = k;
            while Instant::now() < stop_at {
                let t = Instant::now();
                let ok = if i % 2 == 0 {
                    c.get_job(GetJobRequest { job_id: job.clone() }).await.is_ok()
                } else {
                    c.list_jobs(ListJobsRequest {}).await.is_ok()
                };
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                errors += u64::from(!ok);
                i += 1;
                tokio::time::sleep(pause).await;
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for l in loops {
        let (v, e) = l.await.unwrap();
        lat.extend(v);
        errors += e;
    }
    for w in watchers {
        let _ = w.await;
    }
    lat.sort_by(f64::total_cmp);

    let workers_now = metric(metrics, "cvdist_workers");
    let alive = procs.0.iter_mut().skip(1).filter_map(|c| c.try_wait().ok()).filter(Option::is_none).count();
    let log = std::fs::read_to_string(&coord_log).unwrap_or_default();
    let lost = log.matches("worker session ended").count() + log.matches("no heartbeat within").count();
    let info = client.get_job(GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    let (p50, p90, p99, max) = (
        percentile(&lat, 50.0),
        percentile(&lat, 90.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "workers={} watchers={} status_clients={} duration={}s job={}",
        args.workers, args.watchers, args.status_clients, args.duration, args.job
    );
    println!(
        "status calls: {} ({:.0}/s), errors {errors}; latency ms p50 {p50:.2} p90 {p90:.2} p99 {p99:.2} max {max:.2}",
        lat.len(),
        lat.len() as f64 / args.duration as f64
    );
    println!(
        "watch streams: {} open, {} broken, {} events received",
        args.watchers,
        broken.load(Ordering::Relaxed),
        events.load(Ordering::Relaxed)
    );
    println!(
        "workers: cvdist_workers={workers_now} processes alive={alive}/{} sessions lost={lost}; job {} {:?} epochs done {}",
        args.workers,
        info.id,
        info.state(),
        info.history.len()
    );
    let ok = p99 < args.p99_target_ms
        && errors == 0
        && workers_now == args.workers as f64
        && alive == args.workers
        && lost == 0
        && broken.load(Ordering::Relaxed) == 0;
    println!("{}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        eprintln!("coordinator log: {}", coord_log.display());
        let _ = dir.keep();
    }
    drop(procs);
    std::process::exit(if ok { 0 } else { 1 });
}
