//! Claims of docs/ARCHITECTURE.md that no other test backs, checked
//! against a real coordinator process with hand-made worker sessions over gRPC:
//!
//! * a worker that goes silent (its stream open, no heartbeats) is dropped after the
//!   heartbeat timeout and its job recovers;
//! * reports carry (job, attempt): anything from an aborted attempt is ignored.

mod cluster;

use cluster::{Cluster, WORKER_TOKEN};
use cvdist_common::client::connect;
use cvdist_common::proto::{
    coordinator_message, job_report, worker_message, Assignment, CoordinatorMessage, EpochMetrics, GetJobRequest,
    Heartbeat, JobInfo, JobReport, JobState, RegisterRequest, WorkerMessage,
};
use cvdist_common::version::PROTOCOL_VERSION;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Streaming;

/// `Cluster`'s coordinator runs with `--heartbeat-timeout 5`.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

struct RawWorker {
    tx: mpsc::UnboundedSender<WorkerMessage>,
    inbound: Streaming<CoordinatorMessage>,
}

impl RawWorker {
    async fn register(c: &Cluster, id: &str) -> RawWorker {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(WorkerMessage {
            msg: Some(worker_message::Msg::Register(RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: id.into(),
                data_addr: "127.0.0.1:9".into(),
                capabilities: None,
            })),
        })
        .unwrap();
        let mut client = connect(&c.url(), Some(WORKER_TOKEN), None).await.unwrap();
        let mut inbound =
            client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
        match inbound.message().await.unwrap() {
            Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Registered(_)) }) => {
                RawWorker { tx, inbound }
            }
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    fn heartbeat(&self) {
        let _ = self.tx.send(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) });
    }

    /// The next assignment, heartbeating meanwhile.
    async fn assignment(&mut self) -> Assignment {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(60), "no assignment");
            self.heartbeat();
            match tokio::time::timeout(Duration::from_secs(1), self.inbound.message()).await {
                Ok(Ok(Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(a)) }))) => return a,
                Ok(Ok(Some(_))) | Err(_) => continue,
                Ok(other) => panic!("session ended: {other:?}"),
            }
        }
    }

    fn epoch_report(&self, job: &str, attempt: u32, rank: u32, test_acc: f64) {
        let m = EpochMetrics { epoch: 0, train_loss: 1.0, test_acc, ..Default::default() };
        let report = JobReport {
            job_id: job.into(),
            attempt,
            rank,
            kind: Some(job_report::Kind::Epoch(m)),
            ..Default::default()
        };
        self.tx.send(WorkerMessage { msg: Some(worker_message::Msg::Report(report)) }).unwrap();
    }
}

fn workers_gauge(c: &Cluster) -> f64 {
    c.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("cvdist_workers ").map(|v| v.trim().parse().unwrap()))
        .expect("cvdist_workers gauge")
}

async fn get_job(c: &Cluster, id: &str) -> JobInfo {
    let mut client = c.client().await;
    client.get_job(GetJobRequest { job_id: id.into() }).await.unwrap().into_inner()
}

fn two_worker_spec() -> cvdist_common::proto::JobSpec {
    let mut s = cluster::small_spec("resnet20", 1, (2, 2));
    s.max_restarts = 3;
    s
}

/// "a silent network loss is caught by the heartbeat timeout": a session that stays open
/// but sends nothing is dropped after the timeout (not before), and its job recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_is_dropped_after_the_heartbeat_timeout() {
    let c = Cluster::new(16, 16);
    let mut a = RawWorker::register(&c, "a").await;
    let mut b = RawWorker::register(&c, "b").await;
    let job = c.submit(two_worker_spec()).await;
    a.assignment().await;
    b.assignment().await;
    // From now on `b` is silent; `a` keeps heartbeating.
    let silent_since = Instant::now();
    assert_eq!(workers_gauge(&c), 2.0);
    while workers_gauge(&c) != 1.0 {
        assert!(silent_since.elapsed() < Duration::from_secs(60), "silent worker never dropped\n{}", c.logs());
        a.heartbeat();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // b's last message (its registration-time heartbeat) came before `silent_since`; one
    // second of slack for that.
    assert!(
        silent_since.elapsed() + Duration::from_secs(1) >= HEARTBEAT_TIMEOUT,
        "dropped after {:?}",
        silent_since.elapsed()
    );
    let info = get_job(&c, &job).await;
    assert_eq!(info.state(), JobState::Recovering, "{info:?}");
    assert!(info.events.iter().any(|e| e.contains("worker b missed heartbeats")), "{:#?}", info.events);
    let log = std::fs::read_to_string(c.dir.path().join("coordinator.log")).unwrap();
    assert!(log.contains("no heartbeat within 5s; dropping the worker"), "{log}");
    drop(b);
}

/// "Reports carry (job, attempt); anything from an aborted attempt is ignored": after a
/// restart, an epoch report of attempt 0 leaves the job untouched while attempt 1's counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_from_an_aborted_attempt_are_ignored() {
    let c = Cluster::new(16, 16);
    let mut a = RawWorker::register(&c, "a").await;
    let mut b = RawWorker::register(&c, "b").await;
    let job = c.submit(two_worker_spec()).await;
    let first = a.assignment().await;
    b.assignment().await;
    assert_eq!((first.attempt, first.rank), (0, 0));
    // b's process "dies": its session closes, the attempt is aborted, a replacement joins.
    drop(b);
    let mut b2 = RawWorker::register(&c, "b2").await;
    let second = a.assignment().await;
    b2.assignment().await;
    assert_eq!((second.attempt, second.rank), (1, 0));

    a.epoch_report(&job, 0, 0, 0.99);
    a.heartbeat();
    // Then a current report, so there is something to wait for.
    a.epoch_report(&job, 1, 0, 0.25);
    let start = Instant::now();
    let info = loop {
        let info = get_job(&c, &job).await;
        if !info.history.is_empty() {
            break info;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no epoch recorded\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(info.history.len(), 1, "{:?}", info.history);
    assert_eq!((info.history[0].test_acc, info.history[0].attempt), (0.25, 1), "{:?}", info.history);
    assert_eq!(info.state(), JobState::Running);
}
