//! Field bugs around checkpoints, replayed with real processes:
//!
//! * a run or job whose final checkpoint was not stored is not reported as a success, and
//!   the coordinator logs every refused upload (full disks are real tmpfs mounts);
//! * the coordinator keeps `--keep-checkpoints K` per job, so a small disk holds a long job;
//! * after a recovery with two workers the resumed epoch reports the uninterrupted run's
//!   training loss and accuracy;
//! * `cvdist local` workers sharing one cache dir never delete each other's checkpoints.

mod cluster;

use cluster::{
    cvdist_bin, free_port, spawn_logged, wait_port, watch_until_done, write_dataset, ChildGuard, Cluster, TinyDisk,
    TOKEN,
};
use cvdist_common::client::connect;
use cvdist_common::proto::{JobInfo, JobSpec, JobState, SubmitJobRequest};
use cvdist_common::{run_dir, spec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Generous: a job here trains a few hundred resnet20 steps on two shared cores.
const TIMEOUT: Duration = Duration::from_secs(600);

// ------------------------------------------------------------------ helpers

/// summary.json's `outcome` when a run trained to the end without storing its final
/// checkpoint (`run_dir::outcome::FINAL_CHECKPOINT_MISSING`, spelled out as users read it).
const FINAL_CHECKPOINT_MISSING: &str = "final_checkpoint_missing";

/// A run directory's summary.json as users' scripts read it.
fn summary_json(dir: &Path) -> serde_json::Value {
    let path = dir.join(run_dir::SUMMARY_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).unwrap()
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Checkpoint names (JSON commit records) in a directory, sorted.
fn checkpoints_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".json").map(str::to_string))
        .filter(|n| n.starts_with("ckpt-e"))
        .collect();
    names.sort();
    names
}

/// The SHA-256 a checkpoint's JSON record gives for its tensor file, after checking the
/// tensor file has it.
fn verified_sha(json: &Path) -> String {
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sha = v["sha256"].as_str().unwrap().to_string();
    let bytes = std::fs::read(json.with_extension("safetensors")).unwrap();
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), sha, "{} does not match its record", json.display());
    sha
}

/// A coordinator process (with extra flags) whose state dir the test prepared, one worker.
struct Single {
    dir: PathBuf,
    port: u16,
    _coordinator: ChildGuard,
    _worker: ChildGuard,
}

impl Single {
    /// `limit`: a file-size limit (KiB) for the coordinator; `env`: its extra variables.
    fn start(dir: &Path, limit: Option<&str>, env: &[(&str, &str)]) -> Single {
        let data = dir.join("data");
        write_dataset(&data, 16, 16);
        let port = free_port();
        let state = dir.join("state");
        let mut cmd = match limit {
            // Without root there is no mount: a file-size limit makes writes fail instead.
            Some(limit) => {
                let mut c = Command::new("bash");
                c.args(["-c", &format!("trap '' XFSZ; ulimit -f {limit}; exec \"$0\" \"$@\"")]).arg(cvdist_bin());
                c
            }
            None => Command::new(cvdist_bin()),
        };
        cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(&state)
            .arg("--data")
            .arg(&data)
            .envs(env.iter().copied());
        let coordinator = ChildGuard(spawn_logged(&mut cmd, log_file(dir, "coordinator")));
        wait_port(port);
        let mut w = Command::new(cluster::worker_bin());
        w.args(["worker", "--coordinator", &format!("http://127.0.0.1:{port}"), "--data-listen", "127.0.0.1:0"])
            .args(["--threads", "1", "--worker-id", "w0", "--device", "cpu"])
            .arg("--cache-dir")
            .arg(dir.join("cache-0"));
        let worker = ChildGuard(spawn_logged(&mut w, log_file(dir, "worker-0")));
        Single { dir: dir.to_path_buf(), port, _coordinator: coordinator, _worker: worker }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn submit(&self, spec: JobSpec) -> String {
        let mut c = connect(&self.url(), Some(TOKEN), None).await.unwrap();
        c.submit_job(SubmitJobRequest { spec: Some(spec) }).await.unwrap().into_inner().job_id
    }

    async fn run(&self, spec: JobSpec) -> (String, JobInfo) {
        let job = self.submit(spec).await;
        let (info, _) = watch_until_done(&self.url(), &job, TIMEOUT, |_| false).await;
        (job, info)
    }

    fn job_dir(&self, job: &str) -> PathBuf {
        self.dir.join("state/jobs").join(job)
    }

    fn logs(&self) -> String {
        format!(
            "==== coordinator\n{}\n==== worker\n{}",
            read_log(&self.dir, "coordinator"),
            read_log(&self.dir, "worker-0")
        )
    }

    /// `cvdist status JOB` output.
    fn status(&self, job: &str) -> String {
        let out = Command::new(cvdist_bin())
            .args(["status", job, "--coordinator", &self.url()])
            .env("CVDIST_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The job of the state-disk tests: one worker, resnet20, 3 epochs on 1,024 synthetic images, a
/// checkpoint every 2 steps (8 steps per epoch at batch 128: 4 checkpoints per epoch).
fn disk_job(model: &str) -> JobSpec {
    let mut s = spec::default_spec(model, 3);
    s.dataset = "synthetic".into();
    s.train_samples = 1024;
    s.test_samples = 100;
    s.checkpoint_every_steps = 2;
    s.max_restarts = 0;
    s
}

// ------------------------------------------------------------------ full disks

/// `cvdist train` whose run directory fills up. A resnet20 checkpoint (weights and
/// momentum) is ~2.2 MB, so a 3 MiB disk holds the first and refuses the later ones.
#[test]
fn train_whose_final_checkpoint_cannot_be_written_does_not_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let disk = TinyDisk::mount(&out, "3m");
    let mut cmd = Command::new("bash");
    if disk.is_none() {
        // No root: a 1 MiB file-size limit fails every checkpoint (EFBIG instead of ENOSPC).
        eprintln!("cannot mount a tmpfs here: simulating the full disk with ulimit -f 1024");
        cmd.args(["-c", "trap '' XFSZ; ulimit -f 1024; exec \"$0\" \"$@\""]);
    } else {
        cmd.args(["-c", "exec \"$0\" \"$@\""]);
    }
    cmd.arg(cvdist_bin())
        .args(["train", "--model", "resnet20", "--epochs", "3", "--dataset", "synthetic"])
        .args(["--train-samples", "256", "--test-samples", "100", "--threads", "2", "--quiet", "--device", "cpu"])
        .arg("--out")
        .arg(&out);
    let result = cmd.env("NO_COLOR", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "exit status; stderr:\n{stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(
        error_lines[0]
            .starts_with("error: training finished but the final checkpoint ckpt-e0003-s000000 was not written: "),
        "{stderr}"
    );
    let summary = summary_json(&out);
    assert_eq!(
        (summary["state"].as_str(), summary["outcome"].as_str()),
        (Some("failed"), Some(FINAL_CHECKPOINT_MISSING))
    );
    assert!(summary["message"].as_str().unwrap().contains("ckpt-e0003-s000000"), "{summary}");
    assert_eq!(summary["epochs_completed"], 3, "all epochs trained");
    assert!(!out.join("checkpoints/ckpt-e0003-s000000.json").exists());
    drop(disk);
}

/// The coordinator's state dir is a 12 MiB disk. With the default
/// `--keep-checkpoints 3` the 12 checkpoints of the job never need more than three stored
/// plus one arriving (~9 MB), so the job ends with its final checkpoint stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_state_disk_keeps_three_checkpoints_and_the_final_one() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = TinyDisk::mount(&tmp.path().join("state"), "12m");
    if disk.is_none() {
        eprintln!("cannot mount a tmpfs here: checking the retention without a disk limit");
    }
    let c = Single::start(tmp.path(), None, &[]);
    let (job, info) = c.run(disk_job("resnet20")).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.latest_checkpoint, "ckpt-e0003-s000000");
    let dir = c.job_dir(&job).join("checkpoints");
    let kept = checkpoints_in(&dir);
    assert_eq!(kept, ["ckpt-e0002-s000004", "ckpt-e0002-s000006", "ckpt-e0003-s000000"], "{}", c.logs());
    verified_sha(&dir.join("ckpt-e0003-s000000.json"));
    // Every deletion came after a newer checkpoint was stored, and none failed.
    let log = read_log(tmp.path(), "coordinator");
    assert_eq!(log.matches("older checkpoint deleted").count(), 9, "{log}");
    assert!(!log.contains("checkpoint upload refused"), "{log}");
    let summary = summary_json(&c.job_dir(&job));
    assert_eq!((summary["state"].as_str(), summary["outcome"].as_str()), (Some("succeeded"), Some("succeeded")));
    drop(c);
    drop(disk);
}

/// The same with retention off: the 12 MiB disk fills up, uploads are refused, and the job must
/// not succeed. The coordinator logs every refusal (as many as the worker saw), the job
/// fails with the reason in `cvdist status` and summary.json, the newest stored checkpoint
/// is intact, and the worker still holds its unconfirmed final checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_state_disk_fails_the_job_and_logs_every_refused_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = TinyDisk::mount(&tmp.path().join("state"), "12m");
    // Without root: a 4 MiB file-size limit on the coordinator (state.redb needs ~1.5 MiB)
    // refuses every checkpoint of resnet56 (~7 MB with momentum).
    let (limit, model) = if disk.is_some() { (None, "resnet20") } else { (Some("4096"), "resnet56") };
    // CVDIST_KEEP_CHECKPOINTS is `--keep-checkpoints`.
    let c = Single::start(tmp.path(), limit, &[("CVDIST_KEEP_CHECKPOINTS", "0")]);
    let (job, info) = c.run(disk_job(model)).await;
    assert_eq!(info.state(), JobState::Failed, "{}\n{}", info.message, c.logs());
    let expected =
        "training finished but the final checkpoint ckpt-e0003-s000000 was not stored: the coordinator refused it: ";
    assert!(info.message.starts_with(expected), "{}", info.message);
    assert!(info.message.contains("disk full") || info.message.contains("File too large"), "{}", info.message);
    assert_eq!(info.history.len(), 3, "all epochs trained");

    // `cvdist status` and summary.json say so.
    let status = c.status(&job);
    assert!(status.contains("state:      FAILED"), "{status}");
    assert!(status.contains(&format!("message:    {expected}")), "{status}");
    let summary = summary_json(&c.job_dir(&job));
    assert_eq!(
        (summary["state"].as_str(), summary["outcome"].as_str()),
        (Some("failed"), Some(FINAL_CHECKPOINT_MISSING))
    );
    assert_eq!(summary["message"].as_str(), Some(info.message.as_str()));

    // Every refusal the worker saw, the coordinator logged with its reason.
    let worker_log = read_log(tmp.path(), "worker-0");
    let coordinator_log = read_log(tmp.path(), "coordinator");
    let failed = worker_log.matches("checkpoint upload failed").count();
    let refused: Vec<&str> = coordinator_log.lines().filter(|l| l.contains("checkpoint upload refused")).collect();
    assert!(failed >= 1, "{}", c.logs());
    assert_eq!(refused.len(), failed, "{}", c.logs());
    assert!(refused.iter().all(|l| l.contains("disk full") || l.contains("File too large")), "{refused:#?}");
    assert!(refused.iter().any(|l| l.contains("ckpt-e0003-s000000")), "{refused:#?}");

    // The newest stored checkpoint is whole, and nothing newer left a partial file.
    let dir = c.job_dir(&job).join("checkpoints");
    if !info.latest_checkpoint.is_empty() {
        verified_sha(&dir.join(format!("{}.json", info.latest_checkpoint)));
    }
    assert!(!std::fs::read_dir(&dir).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".upload")));

    // The worker never deleted what the coordinator did not confirm: the final checkpoint
    // is still in its own scratch folder.
    let local = tmp.path().join(format!("cache-0/workers/w0/jobs/{job}/attempt-0"));
    let kept = checkpoints_in(&local);
    assert!(kept.contains(&"ckpt-e0003-s000000".to_string()), "{kept:?}\n{}", c.logs());
    verified_sha(&local.join("ckpt-e0003-s000000.json"));
    drop(c);
    drop(disk);
}

// ------------------------------------------------------------------ metrics of a resumed epoch

/// 2 workers, resnet20, 1 epoch on 2,048 synthetic images, batch 64,
/// a checkpoint every 4 steps; once ckpt-e0000-s000008 is stored one worker is SIGKILLed
/// and another started. The epoch's metrics must equal the uninterrupted run's exactly,
/// as the final weights do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_epoch_reports_the_uninterrupted_metrics() {
    fn job_spec() -> JobSpec {
        let mut s = cluster::small_spec("resnet20", 1, (2, 2));
        s.dataset = "synthetic".into();
        s.train_samples = 2048;
        s.test_samples = 200;
        s.batch_size = 64;
        s.checkpoint_every_steps = 4;
        s.max_restarts = 2;
        s
    }
    let final_sha = |c: &Cluster, job: &str| {
        verified_sha(&c.state_dir().join("jobs").join(job).join("checkpoints/ckpt-e0001-s000000.json"))
    };

    // The uninterrupted reference.
    let (reference, reference_sha) = {
        let mut c = Cluster::new(16, 16);
        c.start_worker(0, true);
        c.start_worker(1, true);
        let job = c.submit(job_spec()).await;
        let (info, _) = watch_until_done(&c.url(), &job, TIMEOUT, |_| false).await;
        assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
        assert_eq!(info.restarts, 0);
        let metrics = run_dir::read_metrics(&c.state_dir().join("jobs").join(&job)).unwrap();
        (metrics, final_sha(&c, &job))
    };

    let mut c = Cluster::new(16, 16);
    c.start_worker(0, true);
    c.start_worker(1, true);
    let job = c.submit(job_spec()).await;
    let marker = c.state_dir().join("jobs").join(&job).join("checkpoints/ckpt-e0000-s000008.json");
    let start = Instant::now();
    while !marker.is_file() {
        assert!(start.elapsed() < TIMEOUT, "ckpt-e0000-s000008 never stored\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.kill_worker(1);
    c.start_worker(2, true);
    let (info, _) = watch_until_done(&c.url(), &job, TIMEOUT, |_| false).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.restarts, 1, "{:?}", info.events);
    // It resumed mid-epoch (from s000008, or s000012 if that was stored before the kill).
    assert!(
        info.events.iter().any(|e| e.contains("started on 2 workers (w0, w2) from ckpt-e0000-s0000")),
        "{:#?}",
        info.events
    );
    let resumed = run_dir::read_metrics(&c.state_dir().join("jobs").join(&job)).unwrap();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].attempt, 1);
    let (a, b) = (&reference[0], &resumed[0]);
    assert_eq!(
        (a.train_loss.to_bits(), a.train_acc.to_bits(), a.test_loss.to_bits(), a.test_acc.to_bits()),
        (b.train_loss.to_bits(), b.train_acc.to_bits(), b.test_loss.to_bits(), b.test_acc.to_bits()),
        "uninterrupted {a:?}\nresumed {b:?}"
    );
    assert_eq!(final_sha(&c, &job), reference_sha, "resumed weights differ from the uninterrupted run's");
}

// ------------------------------------------------------------------ a shared cache dir

/// `cvdist local` gives both workers one cache dir. Rank 1 finishing first must not
/// delete the job folder rank 0 is writing its final checkpoint into (a race a busy
/// machine makes likely). Run under two busy loops, several times: every run must
/// succeed with its final checkpoint in the run directory.
#[test]
fn local_workers_sharing_a_cache_dir_keep_the_final_checkpoint() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for run in 0..4 {
        let out = tmp.path().join(format!("run-{run}"));
        let result = Command::new(cvdist_bin())
            .args(["local", "--model", "resnet20", "--epochs", "1", "--workers", "2", "--dataset", "synthetic"])
            .args([
                "--train-samples",
                "512",
                "--test-samples",
                "256",
                "--batch-size",
                "64",
                "--quiet",
                "--device",
                "cpu",
            ])
            .arg("--out")
            .arg(&out)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let final_json = out.join("checkpoints/ckpt-e0001-s000000.json");
        let summary = run_dir::read_summary(&out).map(|s| s.state).unwrap_or_default();
        if !result.status.success() || !final_json.is_file() || summary != "succeeded" {
            let logs: String = (0..2)
                .map(|k| std::fs::read_to_string(out.join(format!("worker-{k}.log"))).unwrap_or_default())
                .collect();
            failures.push(format!(
                "run {run}: exit {:?}, summary state {summary:?}, final checkpoint present: {}\n{}\n{logs}",
                result.status.code(),
                final_json.is_file(),
                String::from_utf8_lossy(&result.stdout)
            ));
        } else {
            verified_sha(&final_json);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
