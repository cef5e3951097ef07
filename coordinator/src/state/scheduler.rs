//! The scheduler pass: expired heartbeats, re-adoption windows, and forming and growing
//! groups from the idle workers, first come, first served.

use super::effects::Pending;
use super::machine::{self, Event, IdleWorker, Now};
use super::{Coordinator, Inner};
use cvdist_common::proto::JobState;
use cvdist_common::rejoin;
use tonic::Status;
use tracing::warn;

impl Coordinator {
    /// Periodic housekeeping: expired heartbeats, rendezvous timeouts, forming groups.
    pub fn tick(&self) {
        let mut pending = Pending::new(&self.committer);
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            for id in inner.workers.silent(self.cfg.heartbeat_timeout) {
                warn!(worker = %id, "no heartbeat within {:?}; dropping the worker", self.cfg.heartbeat_timeout);
                let Some(w) = inner.workers.drop_worker(&id, Status::deadline_exceeded("heartbeat timeout")) else {
                    continue;
                };
                let reason = format!("worker {id} missed heartbeats");
                if let Some((job, attempt)) = w.job {
                    self.step_job(inner, &job, Event::MemberLost { attempt, reason }, &mut pending);
                } else {
                    self.lost_after_abort(inner, &id, reason, &mut pending);
                }
            }
            let readopting: Vec<String> =
                inner.jobs.iter().filter(|(_, e)| e.job.readopting().is_some()).map(|(id, _)| id.clone()).collect();
            for id in readopting {
                self.step_job(inner, &id, Event::ReadoptDeadline, &mut pending);
            }
            schedule(inner, &self.attempt_key, &mut pending);
        }
        self.run_logged(pending);
    }
}

/// First come, first served: offers the idle workers to each waiting job in id order; a job
/// that waits for more workers holds the jobs behind it.
fn schedule(inner: &mut Inner, attempt_key: &[u8], pending: &mut Pending<'_>) {
    let waiting: Vec<String> = inner
        .jobs
        .values()
        .filter(|j| j.stored && matches!(j.job.state(), JobState::Queued | JobState::Recovering))
        .map(|j| j.job.info.id.clone())
        .collect();
    let now = Now::current();
    for id in waiting {
        let idle = inner.workers.idle();
        let Some(entry) = inner.jobs.get_mut(&id) else { continue };
        // Derived, not stored: a restarted coordinator checks re-registration proofs with it.
        let secret = rejoin::attempt_secret(attempt_key, &id, entry.job.info.attempt);
        let Ok(t) = machine::step(&mut entry.job, Event::Schedule { idle: &idle, secret }, now) else { continue };
        let holds = t.holds_queue;
        inner.apply(&id, t, pending);
        if holds {
            // Waiting jobs come first: no running job grows while one waits for workers.
            return;
        }
    }
    let growing: Vec<String> = inner
        .jobs
        .values()
        .filter(|j| j.stored && machine::wants_growth(&j.job))
        .map(|j| j.job.info.id.clone())
        .collect();
    for id in growing {
        let idle = inner.workers.idle();
        if idle.is_empty() {
            return;
        }
        let Some(entry) = inner.jobs.get_mut(&id) else { continue };
        let members: Option<Vec<IdleWorker>> = entry
            .job
            .members
            .iter()
            .map(|m| inner.workers.data_addr(m).map(|a| IdleWorker { id: m.clone(), data_addr: a }))
            .collect();
        // A member without a session is being lost: the recovery, not growth, re-forms.
        let Some(members) = members else { continue };
        let secret = rejoin::attempt_secret(attempt_key, &id, entry.job.info.attempt + 1);
        let Ok(t) = machine::step(&mut entry.job, Event::Grow { members: &members, idle: &idle, secret }, now) else {
            continue;
        };
        inner.apply(&id, t, pending);
    }
}
