//! Real processes killed with SIGKILL: workers and the coordinator. Jobs must finish, lose
//! no completed epoch, and — at the same world size — end with bit-identical weights.

mod cluster;

use cluster::{final_weights_sha, is_progress_in, reference_sha, small_spec, watch_until_done, Cluster};
use cvdist_common::proto::{job_event, GetJobRequest, JobEvent, JobSpec, JobState};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(300);
const EPOCHS: u32 = 3;

fn spec(workers: (u32, u32)) -> JobSpec {
    let mut s = small_spec("resnet20", EPOCHS, workers);
    s.train_samples = 768;
    s.checkpoint_every_steps = 4;
    s.max_restarts = 3;
    s
}

fn is_epoch(ev: &JobEvent, epoch: u32) -> bool {
    matches!(&ev.event, Some(job_event::Event::Epoch(m)) if m.epoch == epoch)
}

/// A cluster with two workers and the standard job submitted to it.
async fn two_worker_job() -> (Cluster, String) {
    let mut c = Cluster::new(256, 100);
    c.start_worker(0, true);
    c.start_worker(1, true);
    let job = c.submit(spec((2, 2))).await;
    (c, job)
}

/// An uninterrupted 2-worker run: the reference for the bit-identity checks.
async fn reference_run() -> String {
    let (c, job) = two_worker_job().await;
    reference_sha(&c, &job, TIMEOUT, EPOCHS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_replaced_and_the_result_is_bit_identical() {
    let reference = reference_run().await;

    let (mut c, job) = two_worker_job().await;
    // Mid-epoch 1: after a mid-epoch checkpoint may exist, before the epoch ends.
    let (info, killed) = c.replace_worker_at(&job, TIMEOUT, (1, 2), |ev| is_progress_in(ev, 1)).await;
    assert!(killed, "the job ended before the kill");
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.restarts, 1, "{:?}", info.events);
    assert!(info.events.iter().any(|e| e.contains("worker w1 lost") || e.contains("failed")), "{:?}", info.events);
    // The metrics show the restart: later epochs were trained by attempt >= 1.
    assert_eq!(info.history.len() as u32, EPOCHS);
    assert!(info.history.last().unwrap().attempt >= 1, "{:?}", info.history);
    assert!(info.worker_ids.contains(&"w2".to_string()), "{:?}", info.worker_ids);
    assert_eq!(final_weights_sha(&c, &job, EPOCHS), reference, "resumed run differs from the uninterrupted one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elastic_job_finishes_on_survivors() {
    let mut c = Cluster::new(256, 100);
    for k in 0..3 {
        c.start_worker(k, true);
    }
    // All three registered, so the group forms with three.
    c.wait_workers(3, TIMEOUT).await;
    let job = c.submit(spec((2, 3))).await;
    let url = c.url();
    let mut killed = false;
    let mut first_world = 0;
    let (info, _) = watch_until_done(&url, &job, TIMEOUT, |ev| {
        if let Some(job_event::Event::Epoch(m)) = &ev.event {
            if first_world == 0 {
                first_world = m.world_size;
            }
        }
        if !killed && is_epoch(ev, 0) {
            c.kill_worker(2);
            killed = true;
        }
        false
    })
    .await;
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(first_world, 3);
    assert_eq!(info.world_size, 2);
    assert_eq!(info.history.last().unwrap().world_size, 2);
    assert_eq!(info.history.len() as u32, EPOCHS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_resumes_the_job_bit_identically() {
    let reference = reference_run().await;

    let (mut c, job) = two_worker_job().await;
    let url = c.url();
    let mut killed = false;
    let (info, _) = watch_until_done(&url, &job, TIMEOUT, |ev| {
        if !killed && is_progress_in(ev, 1) {
            c.kill_coordinator();
            c.start_coordinator();
            killed = true;
            return true; // the old stream is dead; watch again on the new coordinator
        }
        false
    })
    .await;
    assert!(killed);
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert!(info.events.iter().any(|e| e.contains("coordinator restarted")), "{:?}", info.events);
    // No completed epoch was lost: the full history is there, and `cvdist status` shows it.
    assert_eq!(info.history.len() as u32, EPOCHS);
    let (_, text) = c.cli(&["status", &job]);
    for e in 1..=EPOCHS {
        assert!(text.contains(&format!("epoch {e:>3}/{EPOCHS}")), "{text}");
    }
    assert_eq!(final_weights_sha(&c, &job, EPOCHS), reference, "resumed run differs from the uninterrupted one");
}

/// A recovery is one entry in `summary.json`, one line in the job log and two
/// Prometheus counters, with the steps the positions imply. Both workers are SIGKILLed, so
/// this is the checkpoint fallback (no survivor holds the state), which does replay steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_reports_its_cause_replayed_steps_and_downtime() {
    let mut c = Cluster::new(256, 100);
    c.start_worker(0, true);
    c.start_worker(1, true);
    // 768 samples on 2 ranks in batches of 32: 12 steps per epoch; a checkpoint every 5
    // steps, so a kill at a step that is no multiple of 5 comes after a checkpoint.
    let mut s = spec((2, 2));
    s.checkpoint_every_steps = 5;
    let steps_per_epoch = cvdist_common::spec::steps_per_epoch(&s, 2);
    assert_eq!(steps_per_epoch, 12);
    let job = c.submit(s).await;
    let url = c.url();
    let mut killed_at = None;
    let (info, _) = watch_until_done(&url, &job, TIMEOUT, |ev| {
        if let Some(job_event::Event::Progress(p)) = &ev.event {
            if killed_at.is_none() && p.epoch >= 1 && p.step % 5 != 0 {
                // Both members: no survivor holds the state, so the new group falls back to
                // the stored checkpoint (a single loss recovers live, below).
                c.kill_worker(1);
                c.kill_worker(0);
                c.start_worker(2, true);
                c.start_worker(3, true);
                killed_at = Some((p.epoch, p.step));
            }
        }
        false
    })
    .await;
    let killed_at = killed_at.expect("the job ended before the kill");
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());

    let summary = cvdist_common::run_dir::read_summary(&c.state_dir().join("jobs").join(&job)).unwrap();
    assert_eq!(summary.recoveries.len(), 1, "{:?}\n{:?}", summary.recoveries, info.events);
    let r = &summary.recoveries[0];
    assert!(r.cause.contains("worker w1 lost") || r.cause.contains("worker w0 lost"), "{r:?}");
    assert_eq!((r.attempt, r.old_world_size, r.new_world_size), (0, 2, 2), "{r:?}");
    // The positions: what the failed group reached (at least the progress the kill followed)
    // and the checkpoint the new group resumed from.
    let record = &info.recoveries[0];
    let reached = (record.reached_epoch, record.reached_step);
    assert!(reached >= killed_at, "reached {reached:?}, killed after {killed_at:?}");
    let resumed = cvdist_common::names::parse_checkpoint_name(&r.resumed_from).unwrap();
    assert!(resumed <= reached, "resumed from {} past {reached:?}", r.resumed_from);
    let implied =
        (u64::from(reached.0) * steps_per_epoch + reached.1) - (u64::from(resumed.0) * steps_per_epoch + resumed.1);
    assert_eq!(r.steps_replayed, implied, "{r:?}, reached {reached:?}");
    // The checkpoint it resumed from precedes the kill (the usual case; one stored between
    // the progress report and the loss would make it 0): the steps in between are trained again.
    if resumed < killed_at {
        assert!(r.steps_replayed > 0, "{r:?}");
    }
    let down = r.downtime_seconds.expect("the new group completed a step");
    // Generous: the 2 s grace, a ring, a checkpoint load and up to a 2 s progress interval.
    assert!(down.is_finite() && down > 0.0 && down < 120.0, "downtime {down}");
    eprintln!(
        "recovery measured: cause {:?}; killed after {killed_at:?}, reached {reached:?}, resumed from {}, {} steps replayed, down {down:.2} s",
        r.cause, r.resumed_from, r.steps_replayed
    );

    let line = format!(
        "recovery 1: {}; 2 -> 2 workers; resumed from {}; {} steps replayed; down for {down:.1} s",
        r.cause, r.resumed_from, r.steps_replayed
    );
    assert_eq!(info.events.iter().filter(|e| e.contains("recovery 1:")).count(), 1, "{:?}", info.events);
    assert!(info.events.iter().any(|e| e.ends_with(&line)), "{line:?} not in {:?}", info.events);

    let metrics = c.metrics();
    assert!(metrics.lines().any(|l| l == "cvdist_recoveries_total 1"), "{metrics}");
    let replayed = format!("cvdist_steps_replayed_total {}", r.steps_replayed);
    assert!(metrics.lines().any(|l| l == replayed), "{replayed:?} not in {metrics}");

    // The record is stored: a restarted coordinator still has the recovery and counts it.
    c.kill_coordinator();
    c.start_coordinator();
    let mut client = c.client().await;
    let again = client.get_job(GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    assert_eq!(again.recoveries, info.recoveries);
    let metrics = c.metrics();
    assert!(metrics.lines().any(|l| l == "cvdist_recoveries_total 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == replayed), "{replayed:?} not in {metrics}");
}

// ---------------------------------------------------------------- live recovery

/// How a member is taken out of the group.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL: a crashed process; its session ends at once.
    Kill,
    /// SIGSTOP: a hung process; only the heartbeat timeout (5 s in these clusters) finds it.
    Stop,
}

/// resnet20 on synthetic data, 2 epochs of 4,096 images: 64 steps per epoch on 2 workers
/// (about 3 s here, so rank 0's 2 s progress report falls mid-epoch), no mid-epoch
/// checkpoint (the default), so a checkpoint-based recovery would replay every step of the
/// epoch done before the fault.
fn live_spec(workers: (u32, u32)) -> JobSpec {
    let mut s = small_spec("resnet20", 2, workers);
    s.dataset = "synthetic".into();
    s.train_samples = 4096;
    s.test_samples = 200;
    s.max_restarts = 3;
    s
}

fn signal_worker(c: &Cluster, k: usize, sig: i32) {
    let pid = c.workers[k].as_ref().expect("worker running").id() as i32;
    // SAFETY: kill(2) on a child process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// 2 workers and 1 idle; a member is lost mid-epoch (at rank 0's first
/// progress report that is not an epoch end). The survivor keeps its
/// state in memory, the idle worker joins and receives it over the ring, nothing is
/// replayed, and the final weights (the whole final checkpoint: weights, BatchNorm buffers,
/// momentum) are bit-identical to an uninterrupted run.
async fn live_replacement(fault: Fault, collective: &str) {
    let spec = || {
        let mut s = live_spec((2, 2));
        s.collective = collective.into();
        s
    };
    let reference = {
        let mut c = Cluster::new(256, 100);
        c.start_worker(0, true);
        c.start_worker(1, true);
        let job = c.submit(spec()).await;
        let (info, _) = watch_until_done(&c.url(), &job, TIMEOUT, |_| false).await;
        assert_eq!(info.state(), JobState::Succeeded, "{}", c.logs());
        final_weights_sha(&c, &job, 2)
    };

    let mut c = Cluster::new(256, 100);
    for k in 0..3 {
        c.start_worker(k, true);
    }
    c.wait_workers(3, TIMEOUT).await;
    let job = c.submit(spec()).await;
    let url = c.url();
    let mut faulted: Option<((u32, u64), std::time::SystemTime)> = None;
    let (info, _) = watch_until_done(&url, &job, TIMEOUT, |ev| {
        if let Some(job_event::Event::Progress(p)) = &ev.event {
            if faulted.is_none() && p.step > 0 && p.step < p.steps_per_epoch {
                match fault {
                    Fault::Kill => c.kill_worker(1),
                    Fault::Stop => signal_worker(&c, 1, libc::SIGSTOP),
                }
                faulted = Some(((p.epoch, p.step), std::time::SystemTime::now()));
            }
        }
        false
    })
    .await;
    let (at, when) = faulted.expect("the job ended before the fault");
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.recoveries.len(), 1, "{:?}\n{:?}", info.recoveries, info.events);
    let r = &info.recoveries[0];
    let cause = match fault {
        Fault::Kill => "worker w1 lost",
        Fault::Stop => "worker w1 missed heartbeats",
    };
    assert!(r.cause.contains(cause), "{r:?}");
    assert_eq!((r.old_world_size, r.new_world_size), (2, 2), "{r:?}");
    assert!(
        r.resumed_from.starts_with(&format!("live state of w0 at epoch {} step ", at.0)),
        "{r:?}\n{:?}",
        info.events
    );
    assert_eq!(r.steps_replayed, 0, "{r:?}");
    assert!(info.worker_ids.contains(&"w2".to_string()), "{:?}", info.worker_ids);
    assert!(info.events.iter().any(|e| e.contains("continues from the live state of w0")), "{:?}", info.events);
    // The survivor did not go back to a stored checkpoint.
    let w0 = std::fs::read_to_string(c.dir.path().join("worker-0.log")).unwrap_or_default();
    assert!(w0.contains("continuing from a live state"), "{w0}");
    assert!(!w0.contains("resumed checkpoint="), "{w0}");
    let down = r.downtime_seconds.expect("the new group completed a step");
    // The loss is noticed at once (SIGKILL) or within the 5 s heartbeat timeout (SIGSTOP)
    // plus the coordinator's 1 s check tick; generous bounds, CI machines vary.
    let noticed = r.lost_unix - when.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let detect_bound = match fault {
        Fault::Kill => 5.0,
        Fault::Stop => 5.0 + 5.0,
    };
    assert!(noticed < detect_bound, "noticed after {noticed:.2} s");
    assert!(down > 0.0 && down < 30.0, "downtime {down}");
    eprintln!(
        "live recovery ({fault:?}) measured: fault after progress {at:?}, noticed after {noticed:.2} s, \
         resumed from {:?}, {} steps replayed, down {down:.2} s",
        r.resumed_from, r.steps_replayed
    );
    assert_eq!(final_weights_sha(&c, &job, 2), reference, "live-recovered run differs from the uninterrupted one");
    if matches!(fault, Fault::Stop) {
        signal_worker(&c, 1, libc::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_is_replaced_from_the_survivor_with_no_step_replayed() {
    live_replacement(Fault::Kill, "ring").await;
}

/// The same on PyTorch's c10d gloo group (`--collective gloo`): the code path a GPU job
/// runs with NCCL. The dead peer's closed sockets fail the survivor's collective, the
/// group is re-formed through a fresh authenticated rendezvous, and the result is
/// bit-identical to an uninterrupted gloo run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_on_gloo_is_replaced_from_the_survivor_with_no_step_replayed() {
    live_replacement(Fault::Kill, "gloo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_member_is_replaced_from_the_survivor_with_no_step_replayed() {
    live_replacement(Fault::Stop, "ring").await;
}

/// A stopped (SIGSTOP) member on a gloo group: its sockets stay open, so only the job's
/// abort of the survivor's process group (after the coordinator declares the member lost)
/// ends the survivor's stuck collective.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_member_on_gloo_is_replaced_from_the_survivor_with_no_step_replayed() {
    live_replacement(Fault::Stop, "gloo").await;
}

/// A `2:3` job on 3 workers loses one mid-epoch with no spare: the 2 survivors
/// go on from their last complete step (nothing replayed), the rest of the epoch re-sharded
/// over 2 (which samples: `worker/tests/live_recovery.rs::a_smaller_group_trains_the_rest_of_the_epoch_once`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elastic_job_continues_mid_epoch_on_the_survivors_with_no_step_replayed() {
    let mut c = Cluster::new(256, 100);
    for k in 0..3 {
        c.start_worker(k, true);
    }
    c.wait_workers(3, TIMEOUT).await;
    let mut s = live_spec((2, 3));
    s.train_samples = 4800; // 50 steps per epoch on 3 workers
    let job = c.submit(s).await;
    let url = c.url();
    let mut killed_at = None;
    let (info, _) = watch_until_done(&url, &job, TIMEOUT, |ev| {
        if let Some(job_event::Event::Progress(p)) = &ev.event {
            if killed_at.is_none() && p.step > 0 && p.step < p.steps_per_epoch {
                c.kill_worker(2);
                killed_at = Some((p.epoch, p.step));
            }
        }
        false
    })
    .await;
    let killed_at = killed_at.expect("the job ended before the kill");
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!(info.recoveries.len(), 1, "{:?}", info.events);
    let r = &info.recoveries[0];
    assert_eq!((r.old_world_size, r.new_world_size, r.steps_replayed), (3, 2, 0), "{r:?}");
    assert!(r.resumed_from.starts_with(&format!("live state of w0 at epoch {} step ", killed_at.0)), "{r:?}");
    let down = r.downtime_seconds.expect("measured");
    assert!(down > 0.0 && down < 30.0, "downtime {down}");
    eprintln!(
        "elastic live recovery measured: killed after progress {killed_at:?}, resumed from {:?}, down {down:.2} s",
        r.resumed_from
    );
    assert_eq!(info.history.len(), 2);
    assert_eq!(info.history.last().unwrap().world_size, 2);
    assert_eq!(info.world_size, 2);
}

/// A `1:2` job started on one worker grows to two when a second registers
/// mid-epoch: no restart and no recovery, the group of two continues from the first worker's
/// live state (nothing trained twice), the epochs from the growth on report world size 2, and
/// the coordinator's metrics show the job's world size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_below_its_maximum_grows_when_a_worker_registers() {
    grows("ring").await;
}

/// The same growth on gloo groups: the routine stop of the one-worker group and a fresh
/// rendezvous of the group of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gloo_job_below_its_maximum_grows_when_a_worker_registers() {
    grows("gloo").await;
}

async fn grows(collective: &str) {
    let mut c = Cluster::new(256, 100);
    c.start_worker(0, true);
    c.wait_workers(1, TIMEOUT).await;
    let mut s = live_spec((1, 2));
    s.epochs = 3;
    s.scale_lr = true;
    s.collective = collective.into();
    let job = c.submit(s).await;
    let url = c.url();
    let mut second_at = None;
    let mut world_metric = String::new();
    let (info, _) = watch_until_done(&url, &job, TIMEOUT, |ev| {
        if let Some(job_event::Event::Progress(p)) = &ev.event {
            if second_at.is_none() && p.step > 0 && p.step < p.steps_per_epoch {
                c.start_worker(1, true);
                second_at = Some((p.epoch, p.step));
            } else if second_at.is_some() && world_metric.is_empty() {
                let m = c.metrics();
                if let Some(l) = m.lines().find(|l| l.starts_with("cvdist_job_world_size{") && l.ends_with(" 2")) {
                    world_metric = l.to_string();
                }
            }
        }
        false
    })
    .await;
    let (epoch, step) = second_at.expect("the job ended before the second worker started");
    assert_eq!(info.state(), JobState::Succeeded, "{}\n{}", info.message, c.logs());
    assert_eq!((info.restarts, info.recoveries.len()), (0, 0), "{:?}", info.events);
    assert_eq!(info.world_size, 2, "{:?}", info.events);
    let grew = info.events.iter().find(|e| e.contains("growing from 1 to 2 workers")).unwrap_or_else(|| {
        panic!("no growth in {:?}", info.events);
    });
    assert!(grew.contains("scaled by 2 instead of 1"), "{grew}");
    // Where the grown group continued: at or after the samples the single worker had
    // reported done (its step count at world size 1, batch 32).
    let resumed = info.events.iter().find(|e| e.contains("continues from the live state of w0")).unwrap_or_else(|| {
        panic!("no live continuation in {:?}", info.events);
    });
    // "… at epoch E step S (N samples of the epoch done; …)"
    let parse = |text: Option<&str>| -> u64 {
        text.and_then(|t| t.trim().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line: {resumed}"))
    };
    let resumed_epoch = parse(resumed.split("at epoch ").nth(1));
    let resumed_samples = parse(resumed.split(" step ").nth(1).and_then(|t| t.split('(').nth(1)));
    assert!(
        (resumed_epoch, resumed_samples) >= (u64::from(epoch), step * 32),
        "{resumed} before progress {epoch}/{step}"
    );
    let grown_epoch = resumed_epoch as u32;
    for m in &info.history {
        let want = if m.epoch < grown_epoch { 1 } else { 2 };
        assert_eq!(m.world_size, want, "epoch {} of {:?}", m.epoch, info.history);
    }
    let w0 = std::fs::read_to_string(c.dir.path().join("worker-0.log")).unwrap_or_default();
    assert!(w0.contains("continuing from a live state"), "{w0}");
    assert!(!w0.contains("resumed checkpoint="), "{w0}");
    assert!(world_metric.contains(&job), "metrics never showed world size 2: {world_metric:?}");
    let stamp = |line: &str| line.split(' ').next().and_then(|t| t.parse::<f64>().ok()).unwrap_or(f64::NAN);
    eprintln!(
        "growth measured: second worker started after progress {epoch}/{step}; the grown group agreed {:.2} s \
         after the growth began; {grew}; {resumed}",
        stamp(resumed) - stamp(grew)
    );
}
