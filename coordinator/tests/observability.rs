//! What a job run through the coordinator can be watched with, over real processes and
//! sockets: its TensorBoard events file in the run directory and the
//! Prometheus endpoint's HTTP behaviour.

mod cluster;

use cluster::{small_spec, watch_until_done, Cluster};
use cvdist_common::proto::JobState;
use cvdist_common::tensorboard::{pb, FILE_VERSION, RUN_EVENTS_FILE};
use prost::Message;
use std::io::{Read, Write};
use std::time::Duration;

/// Splits a TFRecord file into its records, checking each length and masked CRC-32C here
/// (with the `crc32c` crate directly, not through the code under test).
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let masked = |d: &[u8]| crc32c::crc32c(d).rotate_right(15).wrapping_add(0xA282_EAD8);
    let u32_at = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        assert!(pos + 12 <= bytes.len(), "truncated record header at byte {pos}");
        let len_bytes = &bytes[pos..pos + 8];
        assert_eq!(u32_at(pos + 8), masked(len_bytes), "length CRC of the record at byte {pos}");
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let data = &bytes[pos + 12..pos + 12 + len];
        assert_eq!(u32_at(pos + 12 + len), masked(data), "data CRC of the record at byte {pos}");
        out.push(data);
        pos += 12 + len + 4;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_through_the_coordinator_writes_tensorboard_events_and_metrics_route_properly() {
    let mut c = Cluster::new(128, 100);
    c.start_worker(0, true);
    let mut spec = small_spec("resnet20", 2, (1, 1));
    spec.name = "tb".into();
    spec.train_samples = 256;
    spec.test_samples = 100;
    let job = c.submit(spec).await;
    let (info, _) = watch_until_done(&c.url(), &job, Duration::from_secs(240), |_| false).await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.history.len(), 2);

    // The run directory holds a TensorBoard events file with one scalar event per epoch.
    let path = c.state_dir().join("jobs").join(&job).join(RUN_EVENTS_FILE);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), c.logs()));
    let events: Vec<pb::Event> = records(&bytes).into_iter().map(|d| pb::Event::decode(d).unwrap()).collect();
    assert_eq!(events.len(), 1 + info.history.len(), "{events:?}");
    assert_eq!(events[0].what, Some(pb::event::What::FileVersion(FILE_VERSION.into())));
    for (e, m) in events[1..].iter().zip(&info.history) {
        assert_eq!(e.step, m.epoch as i64 + 1);
        assert!(e.wall_time > events[0].wall_time);
        let Some(pb::event::What::Summary(s)) = &e.what else { panic!("not a summary: {e:?}") };
        let got: Vec<(&str, f32)> = s.value.iter().map(|v| (v.tag.as_str(), v.simple_value.unwrap())).collect();
        let want = [
            ("train/loss", m.train_loss as f32),
            ("train/accuracy", m.train_acc as f32),
            ("test/loss", m.test_loss as f32),
            ("test/accuracy", m.test_acc as f32),
            ("lr", m.lr as f32),
            ("images_per_sec", m.images_per_sec as f32),
        ];
        assert_eq!(got, want);
    }

    // The metrics endpoint: GET /metrics only.
    let http = |request: &str| -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", c.metrics_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let ok = http("GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.to_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0"), "{ok}");
    for line in [
        "cvdist_jobs{state=\"succeeded\"} 1",
        "cvdist_jobs{state=\"queued\"} 0",
        "cvdist_workers 1",
        "cvdist_workers_busy 0",
        "cvdist_restarts_total 0",
        "# EOF",
    ] {
        assert!(ok.lines().any(|l| l == line), "{line:?} not in\n{ok}");
    }
    for name in ["cvdist_images_per_second ", "cvdist_step_seconds ", "cvdist_allreduce_seconds "] {
        assert!(ok.lines().any(|l| l.starts_with(name)), "{name:?} not in\n{ok}");
    }
    // HTTP/1.0 and no Host header, as the simplest scrapers send.
    assert!(http("GET /metrics HTTP/1.0\r\n\r\n").contains("cvdist_workers 1"));
    let head = http("HEAD /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("cvdist_workers"), "{head}");
    let other = http("GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
    let post = http("POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
    assert!(post.to_lowercase().contains("allow: get, head"), "{post}");
    let garbage = http("\u{1}\u{2}nonsense\r\n\r\n");
    assert!(garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    // Still answering after all that.
    assert!(c.metrics().contains("cvdist_workers 1"));
}
