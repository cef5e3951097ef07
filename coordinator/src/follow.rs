//! Watching a job from the terminal: live progress bars while it runs, a line per epoch,
//! and a final summary. A dropped stream (coordinator restarting, say) is re-opened with
//! backoff, so `--follow` survives what the job itself survives.

use cvdist_common::client::{connect, error_chain};
use cvdist_common::proto::{job_event, EpochMetrics, JobInfo, JobState, WatchJobRequest, WorkerInfo, WorkerState};
use cvdist_common::term::stderr_line;
use cvdist_common::text::printable;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Connection {
    pub url: String,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
}

impl Connection {
    pub async fn client(&self) -> anyhow::Result<cvdist_common::client::Client> {
        Ok(connect(&self.url, self.token.as_deref(), self.tls_ca.as_deref()).await?)
    }
}

pub fn state_label(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "QUEUED",
        JobState::Running => "RUNNING",
        JobState::Recovering => "RECOVERING",
        JobState::Succeeded => "SUCCEEDED",
        JobState::Failed => "FAILED",
        JobState::Cancelled => "CANCELLED",
        JobState::Unspecified => "?",
    }
}

pub fn epoch_line(m: &EpochMetrics, epochs: u32) -> String {
    let attempt = if m.attempt > 0 { format!("  (attempt {})", m.attempt) } else { String::new() };
    format!("{}  x{} workers{attempt}", cvdist_common::term::epoch_line(m, epochs), m.world_size)
}

/// A copy of `info` whose text fields are safe to print: everything in a job record may
/// have come from a peer (a worker's failure report, a job name), so control characters
/// are shown escaped rather than sent to the terminal.
pub fn printable_info(info: &JobInfo) -> JobInfo {
    let mut info = info.clone();
    let fix = |s: &mut String| {
        if let std::borrow::Cow::Owned(p) = printable(s) {
            *s = p;
        }
    };
    fix(&mut info.id);
    fix(&mut info.message);
    fix(&mut info.latest_checkpoint);
    info.events.iter_mut().for_each(fix);
    info.worker_ids.iter_mut().for_each(fix);
    for r in info.recoveries.iter_mut() {
        fix(&mut r.cause);
        fix(&mut r.resumed_from);
    }
    if let Some(spec) = info.spec.as_mut() {
        for f in [&mut spec.name, &mut spec.model, &mut spec.dataset, &mut spec.collective] {
            fix(f);
        }
    }
    info
}

/// Prints the final state; returns whether the job succeeded.
pub fn print_summary(info: &JobInfo) -> bool {
    let info = &printable_info(info);
    let state = info.state();
    println!("job {} {}", info.id, state_label(state));
    if !info.message.is_empty() && state != JobState::Succeeded {
        println!("  {}", info.message);
    }
    if let Some(best) = info.history.iter().max_by(|a, b| a.test_acc.total_cmp(&b.test_acc)) {
        let last = info.history.last().map(|m| m.test_acc).unwrap_or(0.0);
        println!(
            "  final test accuracy {:.2}%, best {:.2}% (epoch {}), {} epochs, {} restarts, {:.1}s wall",
            last * 100.0,
            best.test_acc * 100.0,
            best.epoch + 1,
            info.history.len(),
            info.restarts,
            (info.finished_unix - info.started_unix).max(0.0)
        );
    }
    state == JobState::Succeeded
}

/// Follows a job until it ends; returns its last snapshot.
pub async fn follow(conn: &Connection, job_id: &str, quiet: bool) -> anyhow::Result<JobInfo> {
    let bar = ProgressBar::with_draw_target(
        None,
        if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() },
    );
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    // Progress bars only draw on a terminal; lines must reach logs and pipes too.
    let say = |line: String| {
        let line = printable(&line).into_owned();
        if quiet {
        } else if bar.is_hidden() {
            stderr_line(format_args!("{line}"));
        } else {
            bar.println(line);
        }
    };
    let mut last: Option<JobInfo> = None;
    let mut backoff = Duration::from_millis(200);
    let mut printed_events = 0usize;
    let started = Instant::now();
    loop {
        let mut client = match conn.client().await {
            Ok(c) => c,
            Err(e) if last.is_some() => {
                say(format!("lost the coordinator ({e}); reconnecting"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut stream = match client.watch_job(WatchJobRequest { job_id: job_id.to_string() }).await {
            Ok(s) => s.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && last.is_some() => {
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(status) => anyhow::bail!("{}", status_text(&status)),
        };
        backoff = Duration::from_millis(200);
        loop {
            let ev = match stream.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(status) => {
                    say(format!("watch interrupted ({}); reconnecting", status.message()));
                    break;
                }
            };
            match ev.event {
                Some(job_event::Event::Snapshot(info)) => {
                    let epochs = info.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
                    bar.set_prefix(format!("{} {}", printable(&info.id), state_label(info.state())));
                    // Replay what happened while we were not watching.
                    for line in info.events.iter().skip(printed_events) {
                        say(format!("  {}", strip_stamp(line)));
                    }
                    printed_events = info.events.len();
                    if last.is_none() {
                        for m in &info.history {
                            say(epoch_line(m, epochs));
                        }
                    }
                    let done = info.state().is_terminal();
                    last = Some(info);
                    if done {
                        bar.finish_and_clear();
                        return last.ok_or_else(|| anyhow::anyhow!("no snapshot"));
                    }
                }
                Some(job_event::Event::Progress(p)) => {
                    bar.set_length(p.steps_per_epoch);
                    bar.set_position(p.step);
                    let epochs = last.as_ref().and_then(|i| i.spec.as_ref()).map(|s| s.epochs).unwrap_or(0);
                    bar.set_message(format!(
                        "epoch {}/{epochs} loss {:.4} acc {:.2}% {:.0} img/s",
                        p.epoch + 1,
                        p.loss,
                        p.acc * 100.0,
                        p.images_per_sec
                    ));
                }
                Some(job_event::Event::Epoch(m)) => {
                    let epochs = last.as_ref().and_then(|i| i.spec.as_ref()).map(|s| s.epochs).unwrap_or(0);
                    say(epoch_line(&m, epochs));
                    if let Some(info) = last.as_mut() {
                        info.history.retain(|h| h.epoch < m.epoch);
                        info.history.push(m);
                    }
                }
                Some(job_event::Event::Log(line)) => {
                    say(format!("  {}", strip_stamp(&line)));
                    printed_events += 1;
                }
                None => {}
            }
        }
        if started.elapsed() > Duration::from_secs(365 * 24 * 3600) {
            anyhow::bail!("gave up following {job_id}");
        }
        tokio::time::sleep(backoff).await;
    }
}

fn strip_stamp(line: &str) -> &str {
    line.split_once(' ').map(|(_, rest)| rest).unwrap_or(line)
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A Unix time in seconds as RFC 3339 UTC with milliseconds, e.g.
/// `2026-11-30T14:43:02.590Z`; `None` when it is not a representable time.
pub fn utc_time(unix: f64) -> Option<String> {
    use time::macros::format_description;
    if !unix.is_finite() {
        return None;
    }
    // Whole milliseconds first: at today's magnitudes an f64 of nanoseconds is off by up
    // to 256 ns, which would turn .590 into .589 when truncated to three digits.
    let nanos = (unix * 1e3).round() as i128 * 1_000_000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    t.format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z")).ok()
}

/// How long before `now` the Unix time `then` was, to the second and in at most two
/// units: `0s ago`, `3m 12s ago`, `2h 5m ago`, `3d 4h ago`. Times slightly in the future
/// (clock skew between hosts) read `0s ago`.
pub fn ago(then: f64, now: f64) -> String {
    let secs = (now - then).floor();
    let secs = if secs.is_finite() && secs > 0.0 { secs as u64 } else { 0 };
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let text = if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    };
    format!("{text} ago")
}

/// An event as stored by the coordinator (`UNIX_SECONDS text`) with a readable UTC time
/// in place of the number, and how long ago it was when `now` is given. Lines without a
/// leading number are returned as they are.
pub fn event_line(line: &str, now: Option<f64>) -> String {
    let Some((stamp, text)) = line.split_once(' ') else { return line.to_string() };
    let Some((unix, when)) = stamp.parse::<f64>().ok().and_then(|u| Some((u, utc_time(u)?))) else {
        return line.to_string();
    };
    match now {
        Some(now) => format!("{when} ({}) {text}", ago(unix, now)),
        None => format!("{when} {text}"),
    }
}

/// The workers overview of `cvdist status`: one line per registered worker.
pub fn workers_table(workers: &[WorkerInfo], now: f64) -> String {
    let busy = workers.iter().filter(|w| w.state() == WorkerState::Busy).count();
    let mut out = format!("{} workers ({busy} busy)\n", workers.len());
    if workers.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "{:<20} {:<8} {:<5} {:<24} {:>6}  LAST HEARTBEAT\n",
        "WORKER", "DEVICE", "STATE", "JOB", "RANK"
    ));
    for w in workers {
        let device = w.capabilities.as_ref().map(|c| c.device.as_str()).unwrap_or("?");
        let (state, job, rank) = match w.state() {
            WorkerState::Busy => ("busy", w.job_id.as_str(), format!("{}/{}", w.rank, w.world_size)),
            WorkerState::Idle => ("idle", "-", "-".to_string()),
            WorkerState::Unspecified => ("?", "-", "-".to_string()),
        };
        out.push_str(&format!(
            "{:<20} {:<8} {:<5} {:<24} {:>6}  {}\n",
            w.worker_id,
            device,
            state,
            job,
            rank,
            ago(w.last_heartbeat_unix, now)
        ));
    }
    out
}

/// One line per job for `cvdist jobs`.
pub fn job_row(info: &JobInfo) -> String {
    let info = &printable_info(info);
    let spec = info.spec.clone().unwrap_or_default();
    let acc = info.history.last().map(|m| format!("{:.2}%", m.test_acc * 100.0)).unwrap_or_else(|| "-".into());
    format!(
        "{:<24} {:<11} {:<12} {:>5}/{:<5} {:>3} {:>8}  {}",
        info.id,
        state_label(info.state()),
        spec.model,
        info.history.len(),
        spec.epochs,
        info.world_size,
        acc,
        info.message
    )
}

/// Human-readable detail for `cvdist status JOB`; event times are shown relative to `now`
/// (Unix seconds) as well.
pub fn describe(info: &JobInfo, now: f64) -> String {
    let info = &printable_info(info);
    let spec = info.spec.clone().unwrap_or_default();
    let mut out = format!(
        "job:        {}\nstate:      {}\nmodel:      {} ({} epochs, {}, lr {}, workers {}..{})\nattempt:    {} ({} restarts of {} allowed)\nworkers:    {}\ncheckpoint: {}\n",
        info.id,
        state_label(info.state()),
        spec.model,
        spec.epochs,
        cvdist_common::spec::batch_description(&spec),
        spec.lr,
        spec.min_workers,
        spec.max_workers,
        info.attempt,
        info.restarts,
        spec.max_restarts,
        if info.worker_ids.is_empty() { "-".to_string() } else { info.worker_ids.join(", ") },
        if info.latest_checkpoint.is_empty() { "-" } else { &info.latest_checkpoint },
    );
    if !info.message.is_empty() {
        out.push_str(&format!("message:    {}\n", info.message));
    }
    if let Some(p) = &info.progress {
        if info.state() == JobState::Running {
            out.push_str(&format!(
                "progress:   epoch {} step {}/{} loss {:.4} acc {:.2}% {:.0} img/s\n",
                p.epoch + 1,
                p.step,
                p.steps_per_epoch,
                p.loss,
                p.acc * 100.0,
                p.images_per_sec
            ));
        }
    }
    if !info.history.is_empty() {
        out.push_str("history:\n");
        for m in &info.history {
            out.push_str(&format!("  {}\n", epoch_line(m, spec.epochs)));
        }
    }
    if !info.events.is_empty() {
        out.push_str("events:\n");
        for e in &info.events {
            out.push_str(&format!("  {}\n", event_line(e, Some(now))));
        }
    }
    out
}

/// Formats a connection failure with its cause, for the one-line errors the CLI prints.
/// A failed RPC as one line: the status message, then what the transport says caused it
/// (a TLS alert, a closed connection), which `Status::message` alone leaves out.
pub fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        src = e.source();
    }
    printable(&text).into_owned()
}

pub fn explain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = error_chain(cause);
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    printable(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_are_readable_utc() {
        // 1796045238.590 is a stamp as a job's event log writes it.
        assert_eq!(utc_time(1796045238.590).as_deref(), Some("2026-11-30T13:27:18.590Z"));
        assert_eq!(
            event_line("1796045238.590 submitted: resnet20", None),
            "2026-11-30T13:27:18.590Z submitted: resnet20"
        );
        assert_eq!(
            event_line("1796045238.590 submitted: resnet20", Some(1796045238.590 + 192.4)),
            "2026-11-30T13:27:18.590Z (3m 12s ago) submitted: resnet20"
        );
        // Lines that do not start with a time are left alone.
        assert_eq!(event_line("no stamp here", None), "no stamp here");
        assert_eq!(utc_time(f64::NAN), None);
    }

    #[test]
    fn ago_uses_two_units_at_most() {
        assert_eq!(ago(100.0, 100.4), "0s ago");
        assert_eq!(ago(100.0, 90.0), "0s ago");
        assert_eq!(ago(0.0, 4.9), "4s ago");
        assert_eq!(ago(0.0, 192.0), "3m 12s ago");
        assert_eq!(ago(0.0, 2.0 * 3600.0 + 300.0), "2h 5m ago");
        assert_eq!(ago(0.0, 3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h ago");
    }
}
