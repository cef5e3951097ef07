//! The job this worker runs, kept across sessions with its journal of reports.

use super::control::JobControl;
use cvdist_common::proto::{job_report, worker_message, Assignment, RegisterRequest, RejoinRequest, WorkerMessage};
use cvdist_common::rejoin;
use cvdist_common::text::printable;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The job this worker runs, or ran last, kept across sessions because a job outlives the
/// session it was assigned on.
pub(super) struct Current {
    pub id: String,
    pub attempt: u32,
    rank: u32,
    world_size: u32,
    /// This worker's id in the attempt (the coordinator picks one when `--worker-id` is
    /// empty): a re-registration claims the rank under it.
    member_id: String,
    /// The attempt's `Assignment.session_secret`: signs the claim of a re-registration.
    secret: String,
    pub control: JobControl,
    /// The training thread, until it has been joined.
    pub handle: Option<std::thread::JoinHandle<()>>,
    /// What the training thread reports; `None` once it hung up.
    pub reports: Option<mpsc::UnboundedReceiver<WorkerMessage>>,
    /// This attempt's epoch, finished and failed reports, sent again after a re-registration:
    /// one sent just before a session broke may never have arrived, and the reports made
    /// while no session was up arrived nowhere. The coordinator ignores copies.
    pub journal: Vec<WorkerMessage>,
    /// The newest progress report not sent yet.
    pub progress: Option<WorkerMessage>,
    /// The newest position reported: epoch, steps done in it.
    position: (u32, u64),
    /// Since when the job has had no session with the coordinator.
    pub detached_since: Option<Instant>,
}

impl Current {
    /// The job of assignment `a`, before its training thread starts; `reports` is what
    /// that thread will report on.
    pub fn new(a: &Assignment, control: JobControl, reports: mpsc::UnboundedReceiver<WorkerMessage>) -> Current {
        Current {
            id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
            world_size: a.world_size,
            member_id: a.peers.get(a.rank as usize).map(|p| p.worker_id.clone()).unwrap_or_default(),
            secret: a.session_secret.clone(),
            control,
            handle: None,
            reports: Some(reports),
            journal: Vec::new(),
            progress: None,
            position: (a.start_epoch, a.start_step),
            detached_since: None,
        }
    }

    /// Whether the training thread is still running.
    pub fn training(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Notes a report of the training thread (journal, position) and returns it for sending.
    pub fn record(&mut self, msg: WorkerMessage) -> WorkerMessage {
        if let Some(worker_message::Msg::Report(r)) = &msg.msg {
            match &r.kind {
                Some(job_report::Kind::Progress(p)) => {
                    self.position = self.position.max((p.epoch, p.step));
                    self.progress = Some(msg.clone());
                }
                Some(job_report::Kind::Epoch(m)) => {
                    self.position = self.position.max((m.epoch + 1, 0));
                    self.journal.push(msg.clone());
                }
                Some(job_report::Kind::Finished(_) | job_report::Kind::Failed(_)) => self.journal.push(msg.clone()),
                // Not journaled: sent again after a coordinator restart it would move the
                // attempt's start back to where the group began.
                Some(job_report::Kind::Resumed(r)) => self.position = self.position.max((r.epoch, r.step)),
                None => {}
            }
        }
        msg
    }

    /// Takes in every report waiting while no session was up.
    pub fn drain(&mut self) {
        while let Some(rx) = self.reports.as_mut() {
            match rx.try_recv() {
                Ok(msg) => {
                    self.record(msg);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.reports = None,
            }
        }
    }

    /// The first message of a session while this job exists: a registration claiming it.
    pub fn rejoin_request(&self, mut register: RegisterRequest) -> RejoinRequest {
        register.worker_id = self.member_id.clone();
        let claim = rejoin::Claim {
            job_id: &self.id,
            attempt: self.attempt,
            rank: self.rank,
            world_size: self.world_size,
            worker_id: &register.worker_id,
        };
        let proof = rejoin::proof(&self.secret, &claim);
        RejoinRequest {
            job_id: self.id.clone(),
            attempt: self.attempt,
            rank: self.rank,
            world_size: self.world_size,
            epoch: self.position.0,
            step: self.position.1,
            proof,
            register: Some(register),
        }
    }

    /// Joins the training thread, waiting at most `wait` (forever when `None`); returns
    /// whether it ended in time.
    pub async fn join(&mut self, wait: Option<Duration>) -> bool {
        let Some(handle) = self.handle.take() else { return true };
        let join = tokio::task::spawn_blocking(move || handle.join());
        match wait {
            Some(d) => tokio::time::timeout(d, join).await.is_ok(),
            None => {
                let _ = join.await;
                true
            }
        }
    }

    /// Stops the job and waits for its thread (see [`Current::join`]).
    pub async fn stop(&mut self, reason: &str, wait: Option<Duration>) {
        if self.training() {
            info!(job = %printable(&self.id), attempt = self.attempt, reason, "stopping the job");
        }
        self.control.request_stop(reason);
        if !self.join(wait).await {
            warn!(job = %printable(&self.id), "the job did not stop within {}s; leaving anyway", wait.unwrap_or_default().as_secs());
        }
    }
}

/// The next report of the running job's thread; pending when there is none.
pub(super) async fn next_report(current: &mut Option<Current>) -> Option<WorkerMessage> {
    match current.as_mut().and_then(|c| c.reports.as_mut()) {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvdist_common::proto::{EpochMetrics, Finished, Heartbeat, JobReport, Peer, Progress, Resumed};

    fn assignment() -> Assignment {
        Assignment {
            job_id: "j0001-resnet20".into(),
            attempt: 3,
            rank: 1,
            world_size: 2,
            peers: vec![
                Peer { rank: 0, worker_id: "w0".into(), data_addr: "a:1".into() },
                Peer { rank: 1, worker_id: "w1".into(), data_addr: "b:1".into() },
            ],
            start_epoch: 2,
            start_step: 10,
            session_secret: "secret".into(),
            ..Default::default()
        }
    }

    fn job() -> (Current, mpsc::UnboundedSender<WorkerMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Current::new(&assignment(), JobControl::default(), rx), tx)
    }

    fn report(kind: job_report::Kind) -> WorkerMessage {
        let r =
            JobReport { job_id: "j0001-resnet20".into(), attempt: 3, rank: 1, kind: Some(kind), ..Default::default() };
        WorkerMessage { msg: Some(worker_message::Msg::Report(r)) }
    }

    fn progress(epoch: u32, step: u64) -> WorkerMessage {
        report(job_report::Kind::Progress(Progress { epoch, step, ..Default::default() }))
    }

    #[test]
    fn progress_is_kept_as_the_newest_unsent_report_and_never_moves_the_position_back() {
        let (mut c, _tx) = job();
        let behind = progress(2, 5);
        assert_eq!(c.record(behind.clone()), behind);
        assert_eq!(c.position, (2, 10));
        assert_eq!(c.progress, Some(behind));
        let ahead = progress(3, 1);
        c.record(ahead.clone());
        assert_eq!(c.position, (3, 1));
        assert_eq!(c.progress, Some(ahead));
        assert!(c.journal.is_empty());
    }

    #[test]
    fn epoch_finished_and_failed_reports_are_journaled_in_order() {
        let (mut c, _tx) = job();
        let epoch = report(job_report::Kind::Epoch(EpochMetrics { epoch: 4, ..Default::default() }));
        let finished = report(job_report::Kind::Finished(Finished::default()));
        let failed = report(job_report::Kind::Failed("boom".into()));
        for m in [&epoch, &finished, &failed] {
            c.record(m.clone());
        }
        // A finished epoch puts the position at the start of the next.
        assert_eq!(c.position, (5, 0));
        assert_eq!(c.journal, vec![epoch, finished, failed]);
        assert_eq!(c.progress, None);
    }

    #[test]
    fn resumed_moves_the_position_but_is_not_journaled() {
        let (mut c, _tx) = job();
        c.record(report(job_report::Kind::Resumed(Resumed { epoch: 2, step: 40, ..Default::default() })));
        assert_eq!(c.position, (2, 40));
        c.record(report(job_report::Kind::Resumed(Resumed { epoch: 1, step: 99, ..Default::default() })));
        assert_eq!(c.position, (2, 40));
        assert!(c.journal.is_empty());
        assert_eq!(c.progress, None);
    }

    #[test]
    fn messages_other_than_reports_pass_through_unrecorded() {
        let (mut c, _tx) = job();
        let beat = WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) };
        assert_eq!(c.record(beat.clone()), beat);
        let empty = WorkerMessage { msg: Some(worker_message::Msg::Report(JobReport::default())) };
        assert_eq!(c.record(empty.clone()), empty);
        assert_eq!(c.position, (2, 10));
        assert!(c.journal.is_empty());
        assert_eq!(c.progress, None);
    }

    #[test]
    fn drain_records_what_waited_and_notices_the_thread_hung_up() {
        let (mut c, tx) = job();
        tx.send(progress(2, 11)).expect("send");
        c.drain();
        assert_eq!(c.position, (2, 11));
        assert!(c.reports.is_some());
        tx.send(report(job_report::Kind::Failed("boom".into()))).expect("send");
        drop(tx);
        c.drain();
        assert_eq!(c.journal.len(), 1);
        assert!(c.reports.is_none());
    }

    #[test]
    fn rejoin_request_claims_the_attempt_under_the_member_id_at_the_newest_position() {
        let (mut c, _tx) = job();
        c.record(progress(3, 7));
        let register = RegisterRequest { worker_id: "asked-for".into(), data_addr: "b:1".into(), ..Default::default() };
        let req = c.rejoin_request(register);
        assert_eq!((req.job_id.as_str(), req.attempt, req.rank, req.world_size), ("j0001-resnet20", 3, 1, 2));
        assert_eq!((req.epoch, req.step), (3, 7));
        let register = req.register.expect("register");
        assert_eq!(register.worker_id, "w1");
        assert_eq!(register.data_addr, "b:1");
        let claim = rejoin::Claim { job_id: "j0001-resnet20", attempt: 3, rank: 1, world_size: 2, worker_id: "w1" };
        assert!(rejoin::verify("secret", &claim, &req.proof));
        assert!(!rejoin::verify("other", &claim, &req.proof));
    }
}
