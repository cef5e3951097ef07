//! The worker API: registration (fresh, or re-registration into a running attempt after a
//! coordinator restart), heartbeats, reports, and the end of a session.

use super::effects::Pending;
use super::machine::{self, Event, Now};
use super::registry::{CheckedRegistration, WorkerTx};
use super::{now_unix, Coordinator, CoordinatorError, Inner};
use cvdist_common::proto::{JobReport, JobState, RegisterRequest, RejoinRequest};
use cvdist_common::rejoin;
use tracing::warn;

impl Coordinator {
    /// Registers a worker session and sends it `Registered` (its id and the session key its
    /// checkpoint uploads present) on `tx`, ahead of any assignment; returns the id and
    /// the session number.
    pub fn register(&self, req: RegisterRequest, tx: WorkerTx) -> Result<(String, u64), CoordinatorError> {
        let reg = CheckedRegistration::new(req)?;
        let mut pending = Pending::new(&self.committer);
        let registered = {
            let mut inner = self.lock();
            if *self.closing.borrow() {
                return Err(CoordinatorError::ShuttingDown);
            }
            let registered = inner.workers.register(reg, tx, now_unix(), None)?;
            self.back_without_attempt(&mut inner, &registered.0, &mut pending);
            registered
        };
        self.run_logged(pending);
        self.wake.notify_one();
        Ok(registered)
    }

    /// A worker registered idle: if a restarted coordinator waits for it to re-register into
    /// a running attempt, that attempt cannot be re-adopted.
    fn back_without_attempt(&self, inner: &mut Inner, worker: &str, pending: &mut Pending<'_>) {
        let waiting: Vec<String> =
            inner.jobs.iter().filter(|(_, e)| e.job.awaits(worker)).map(|(id, _)| id.clone()).collect();
        for id in waiting {
            self.step_job(inner, &id, Event::RegisteredIdle { worker }, pending);
        }
    }

    /// A worker that kept training while its session was down re-registers, claiming its
    /// rank in the attempt it runs. When a restarted coordinator waits for
    /// that attempt's members and the claim is this worker's (its proof is made with the
    /// attempt's secret, which only the attempt's members received), the session starts busy
    /// in the attempt and `Registered.adopted` says so; otherwise it registers as
    /// [`Coordinator::register`] does and the worker stops the attempt. A claim on an attempt
    /// being re-adopted whose proof does not match is refused (PERMISSION_DENIED): no one
    /// may take another worker's place in a running group.
    pub fn rejoin(&self, req: RejoinRequest, tx: WorkerTx) -> Result<(String, u64), CoordinatorError> {
        let register = req.register.clone().unwrap_or_default();
        let worker = register.worker_id.clone();
        let reg = CheckedRegistration::new(register)?;
        let mut pending = Pending::new(&self.committer);
        let registered = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if *self.closing.borrow() {
                return Err(CoordinatorError::ShuttingDown);
            }
            inner.workers.check_free(&worker)?;
            let claim = rejoin::Claim {
                job_id: &req.job_id,
                attempt: req.attempt,
                rank: req.rank,
                world_size: req.world_size,
                worker_id: &worker,
            };
            let adopted = match inner.jobs.get_mut(&req.job_id).filter(|e| e.stored && !worker.is_empty()) {
                Some(entry) if entry.job.readopting().is_some_and(|r| r.attempt == req.attempt) => {
                    let secret = rejoin::attempt_secret(&self.attempt_key, &req.job_id, req.attempt);
                    if !rejoin::verify(&secret, &claim, &req.proof) {
                        return Err(CoordinatorError::RejoinRefused(format!(
                            "the proof for rank {} of attempt {} of job {} does not match",
                            req.rank, req.attempt, req.job_id
                        )));
                    }
                    let event = Event::Rejoin {
                        worker: &worker,
                        attempt: req.attempt,
                        rank: req.rank,
                        world_size: req.world_size,
                        position: (req.epoch, req.step),
                    };
                    let t = machine::step(&mut entry.job, event, Now::current())?;
                    let adopted = entry.job.rejoined(&worker, req.rank);
                    inner.apply(&req.job_id, t, &mut pending);
                    adopted
                }
                _ => false,
            };
            if !adopted {
                warn!(worker = %worker, job = ?req.job_id, attempt = req.attempt,
                    "a re-registering worker's attempt is not re-adopted; it stops it");
            }
            let registered =
                inner.workers.register(reg, tx, now_unix(), adopted.then(|| (req.job_id.clone(), req.attempt)))?;
            if !adopted {
                self.back_without_attempt(inner, &registered.0, &mut pending);
            }
            registered
        };
        self.run_logged(pending);
        self.wake.notify_one();
        Ok(registered)
    }

    pub fn heartbeat(&self, worker: &str, session: u64) {
        self.lock().workers.heartbeat(worker, session);
    }

    /// The worker's session ended (process died, network lost, or it shut down).
    pub fn session_closed(&self, worker: &str, session: u64, why: &str) {
        let mut pending = Pending::new(&self.committer);
        {
            let mut inner = self.lock();
            let Some(entry) = inner.workers.remove_session(worker, session) else { return };
            warn!(worker, why, "worker session ended");
            let reason = format!("worker {worker} lost ({why})");
            if let Some((job_id, attempt)) = entry.job {
                self.step_job(&mut inner, &job_id, Event::MemberLost { attempt, reason }, &mut pending);
            } else {
                self.lost_after_abort(&mut inner, worker, reason, &mut pending);
            }
        }
        self.run_logged(pending);
        self.wake.notify_one();
    }

    /// A worker without a job was lost: if it was a member of an attempt that already failed
    /// (a survivor reported the broken ring first, and every member was aborted), the job's
    /// recovery learns which worker was lost.
    pub(super) fn lost_after_abort(&self, inner: &mut Inner, worker: &str, reason: String, pending: &mut Pending<'_>) {
        let found = inner.jobs.iter().find_map(|(id, e)| match &e.job.failed_attempt {
            Some((attempt, members))
                if e.job.state() == JobState::Recovering && members.iter().any(|m| m == worker) =>
            {
                Some((id.clone(), *attempt))
            }
            _ => None,
        });
        if let Some((job_id, attempt)) = found {
            self.step_job(inner, &job_id, Event::MemberLost { attempt, reason }, pending);
        }
    }

    /// A report from `worker`'s session `session`; only the session that holds the rank in
    /// the job's current attempt is heard.
    pub fn report(&self, worker: &str, session: u64, report: JobReport) -> Result<(), CoordinatorError> {
        use cvdist_common::proto::job_report::Kind;
        let mut pending = Pending::new(&self.committer);
        let wake = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if !inner.workers.is_current(worker, session) {
                return Err(CoordinatorError::ClosedSession(worker.to_string()));
            }
            let id = report.job_id.clone();
            let entry = inner.visible(&id)?;
            // Read only for `Finished`: whether the final checkpoint's files exist.
            let on_disk = matches!(report.kind, Some(Kind::Finished(_)))
                && self.durable.checkpoint_on_disk(&id, &machine::final_checkpoint_name(&entry.job));
            let event = Event::Report { worker, report, final_checkpoint_on_disk: on_disk };
            let t = machine::step(&mut entry.job, event, Now::current())?;
            inner.apply(&id, t, &mut pending)
        };
        let failed = self.run(pending).into_iter().next();
        if wake {
            self.wake.notify_one();
        }
        match failed {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}
