//! The coordinator's memory per stored job: 1,000 jobs submitted and cancelled must stay
//! small, also after a restart, since every stored job is reloaded. A 1,024-slot event
//! channel per job, allocated at submission, would hold 466 MB of RSS; so an ended job
//! keeps only its spec, state and counters in memory, and its history and event log are
//! read from the store when asked for.
//!
//! A real `cvdist coordinator` process; its resident set size from /proc/PID/status.

mod cluster;

use cluster::{free_port, spawn_coordinator, wait_port, write_dataset, TOKEN};
use cvdist_common::client::{connect, Client};
use cvdist_common::proto::{
    CancelJobRequest, GetJobRequest, JobState, ListJobsRequest, SubmitJobRequest, WatchJobRequest,
};
use std::path::Path;
use std::process::Child;

const JOBS: usize = 1_000;
/// The bound for 1,000 jobs. The process itself (runtime, gRPC, redb) takes ~10 MB.
const LIMIT_KB: u64 = 50 * 1024;

/// VmRSS of `pid` in kB, as the kernel reports it.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn start(dir: &Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("coordinator.log")).unwrap();
    let child = spawn_coordinator(port, free_port(), &dir.join("state"), &dir.join("data"), log);
    wait_port(port);
    child
}

async fn client(port: u16) -> Client {
    connect(&format!("http://127.0.0.1:{port}"), Some(TOKEN), None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cancelled_jobs_keep_the_coordinator_small_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(&dir.path().join("data"), 8, 8);
    let port = free_port();
    let mut coord = start(dir.path(), port);
    let idle_kb = rss_kb(coord.id());

    let mut c = client(port).await;
    let mut spec = cvdist_common::spec::default_spec("resnet20", 2);
    // More workers than will ever register: every job stays QUEUED until cancelled.
    spec.min_workers = 64;
    spec.max_workers = 64;
    let mut ids = Vec::with_capacity(JOBS);
    for _ in 0..JOBS {
        ids.push(c.submit_job(SubmitJobRequest { spec: Some(spec.clone()) }).await.unwrap().into_inner().job_id);
    }
    // A watcher on one queued job: its channel exists while it watches.
    let mut watch = c.watch_job(WatchJobRequest { job_id: ids[0].clone() }).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().is_some(), "the first snapshot");
    let queued_kb = rss_kb(coord.id());
    for id in &ids {
        let info = c.cancel_job(CancelJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(info.state(), JobState::Cancelled);
        assert!(info.events.iter().any(|e| e.ends_with("cancelled by user")), "{:?}", info.events);
    }
    // The watcher sees the end, and its stream closes.
    let mut saw_end = false;
    while let Some(ev) = watch.message().await.unwrap() {
        if let Some(cvdist_common::proto::job_event::Event::Snapshot(s)) = ev.event {
            saw_end |= s.state() == JobState::Cancelled;
        }
    }
    assert!(saw_end, "the watcher got the final snapshot");
    let cancelled_kb = rss_kb(coord.id());

    // An ended job's history and events come from the store, in full.
    let info = c.get_job(GetJobRequest { job_id: ids[JOBS - 1].clone() }).await.unwrap().into_inner();
    assert_eq!(info.events.len(), 2, "{:?}", info.events);
    assert!(info.events[0].contains("submitted: resnet20"), "{:?}", info.events);
    let listed = c.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), JOBS);
    // A listing carries summaries (no event log); GetJob above has the full record.
    assert!(listed.iter().all(|j| j.state() == JobState::Cancelled && j.events.is_empty() && j.outcome == "cancelled"));

    let _ = coord.kill();
    let _ = coord.wait();
    coord = start(dir.path(), port);
    let mut c = client(port).await;
    let listed = c.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), JOBS);
    let restarted_kb = rss_kb(coord.id());
    let info = c.get_job(GetJobRequest { job_id: ids[0].clone() }).await.unwrap().into_inner();
    assert_eq!(info.state(), JobState::Cancelled);
    assert_eq!(info.events.len(), 2, "{:?}", info.events);
    let _ = coord.kill();
    let _ = coord.wait();

    let per_job = |kb: u64| (kb.saturating_sub(idle_kb) as f64 / JOBS as f64 * 1024.0).round();
    eprintln!(
        "coordinator VmRSS: idle {idle_kb} kB; {JOBS} jobs queued {queued_kb} kB ({} B/job); cancelled {cancelled_kb} kB \
         ({} B/job); after a restart {restarted_kb} kB ({} B/job)",
        per_job(queued_kb),
        per_job(cancelled_kb),
        per_job(restarted_kb)
    );
    assert!(queued_kb < LIMIT_KB, "{queued_kb} kB with {JOBS} queued jobs");
    assert!(cancelled_kb < LIMIT_KB, "{cancelled_kb} kB with {JOBS} cancelled jobs");
    assert!(restarted_kb < LIMIT_KB, "{restarted_kb} kB after a restart with {JOBS} stored jobs");
}
