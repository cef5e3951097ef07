//! End to end over real sockets: a coordinator process and two worker processes (one with
//! a local dataset, one fetching it from the coordinator) train a small job to success.

mod cluster;

use cluster::{small_spec, watch_until_done, Cluster};
use cvdist_common::proto::{job_event, GetJobRequest, JobState, ListJobsRequest};
use cvdist_common::run_dir;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_a_job_to_success() {
    let mut c = Cluster::new(256, 200);
    c.start_worker(0, true);
    c.start_worker(1, false);
    let mut spec = small_spec("resnet20", 3, (2, 2));
    spec.name = "e2e".into();
    spec.train_samples = 1024;
    let job = c.submit(spec).await;
    let (info, events) = watch_until_done(&c.url(), &job, Duration::from_secs(240), |_| false).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.world_size, 2);
    assert_eq!(info.history.len(), 3);

    // The stream carried state changes, progress and per-epoch metrics.
    let progress = events.iter().filter(|e| matches!(e.event, Some(job_event::Event::Progress(_)))).count();
    let epochs = events.iter().filter(|e| matches!(e.event, Some(job_event::Event::Epoch(_)))).count();
    assert!(progress >= 1, "no progress events");
    assert_eq!(epochs, 3);
    for m in &info.history {
        assert!(m.train_loss.is_finite() && m.test_loss.is_finite());
        assert!((0.0..=1.0).contains(&m.test_acc));
        assert_eq!(m.world_size, 2);
    }
    // Synthetic classes are easy: three short epochs must learn well above chance (10%).
    assert!(info.history[2].train_loss < info.history[0].train_loss, "{:?}", info.history);
    assert!(info.history[2].test_acc > 0.3, "test accuracy {}", info.history[2].test_acc);

    // The run directory holds metrics, summary, spec and checkpoints.
    let dir = c.state_dir().join("jobs").join(&job);
    let metrics = run_dir::read_metrics(&dir).unwrap();
    assert_eq!(metrics.len(), 3);
    let summary = run_dir::read_summary(&dir).unwrap();
    assert_eq!(summary.state, "succeeded");
    assert_eq!(summary.epochs_completed, 3);
    assert!((summary.final_test_acc - info.history[2].test_acc).abs() < 1e-12);
    assert!(dir.join("job.json").is_file());
    assert!(dir.join("checkpoints/ckpt-e0003-s000000.safetensors").is_file());
    assert!(dir.join("checkpoints/ckpt-e0003-s000000.json").is_file());
    assert_eq!(info.latest_checkpoint, "ckpt-e0003-s000000");

    // ListJobs carries a summary (newest epoch, no event log); GetJob the whole record.
    let listed = c.client().await.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    let row = listed.iter().find(|j| j.id == job).unwrap();
    assert_eq!((row.state(), row.history.as_slice(), row.events.len()), (JobState::Succeeded, &info.history[2..], 0));
    let full = c.client().await.get_job(GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    assert_eq!(full.history, info.history);
    assert!(full.events.iter().any(|e| e.contains("succeeded")), "{:?}", full.events);

    // The worker without --data received the dataset from the coordinator, verified.
    assert!(c.dir.path().join("cache-1/cifar10/cifar-10-batches-bin/.complete").is_file());

    // Prometheus sees the finished job and both workers.
    let prom = c.metrics();
    assert!(prom.contains("cvdist_jobs{state=\"succeeded\"} 1"), "{prom}");
    assert!(prom.contains("cvdist_workers 2"), "{prom}");
    assert!(prom.contains("cvdist_restarts_total 0"), "{prom}");

    // The CLI sees the same job.
    let (ok, text) = c.cli(&["status", &job]);
    assert!(ok && text.contains("SUCCEEDED") && text.contains("epoch   3/3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_token_are_refused() {
    let c = Cluster::new(16, 16);
    let mut client = cvdist_common::client::connect(&c.url(), None, None).await.unwrap();
    let err = client.list_jobs(cvdist_common::proto::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut client = cvdist_common::client::connect(&c.url(), Some("wrong"), None).await.unwrap();
    let err = client.list_jobs(cvdist_common::proto::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("wrong token"));
}
