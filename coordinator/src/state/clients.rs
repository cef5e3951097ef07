//! The client API (`SubmitJob`, `ListJobs`, `GetJob`, `WatchJob`, `CancelJob`,
//! `ListWorkers`): every answer shows a record that is already durable.

use super::effects::Pending;
use super::entry::{JobEntry, Subscription};
use super::machine::{self, Event, Job, Now};
use super::{now_unix, record, Coordinator, CoordinatorError};
use cvdist_common::proto::{JobInfo, JobSpec, WorkerInfo, WorkerState};
use cvdist_common::spec;

impl Coordinator {
    /// Validates and stores a job; returns its id once its record is durable.
    pub fn submit(&self, spec: JobSpec) -> Result<String, CoordinatorError> {
        spec::validate(&spec).map_err(|e| CoordinatorError::InvalidSpec(e.to_string()))?;
        let mut pending = Pending::new(&self.committer);
        let id = {
            let mut inner = self.lock();
            if !spec.name.is_empty() && inner.jobs.values().any(|j| j.job.spec().name == spec.name) {
                return Err(CoordinatorError::NameTaken(spec.name));
            }
            let id = format!("j{:04}-{}", inner.next_job, spec.model);
            inner.next_job += 1;
            let (job, t) = Job::submitted(id.clone(), spec, Now::current());
            // Holds the name from now on, but stays invisible until its record is stored.
            inner.jobs.insert(id.clone(), JobEntry::new(job, false));
            inner.apply(&id, t, &mut pending);
            id
        };
        let failed = self.run(pending).into_iter().next();
        let mut inner = self.lock();
        if let Some((_, e)) = failed {
            inner.jobs.remove(&id);
            return Err(e);
        }
        if let Some(entry) = inner.jobs.get_mut(&id) {
            entry.stored = true;
        }
        drop(inner);
        self.wake.notify_one();
        Ok(id)
    }

    /// Number of jobs known (active and ended).
    pub fn job_count(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Every job, in id order, summarised (see [`record::summarise`]).
    pub fn list(&self) -> Result<Vec<JobInfo>, CoordinatorError> {
        let (mut jobs, retired, seq) = {
            let inner = self.lock();
            let visible: Vec<&JobEntry> = inner.jobs.values().filter(|j| j.stored).collect();
            let jobs: Vec<JobInfo> = visible.iter().map(|j| j.job.info.clone()).collect();
            let retired: Vec<usize> = visible.iter().enumerate().filter(|(_, j)| j.retired).map(|(i, _)| i).collect();
            let seq = visible.iter().map(|j| j.seq).max().unwrap_or(0);
            (jobs, retired, seq)
        };
        self.committer.wait_through(seq);
        // An ended job's record never changes again, so reading it outside the lock is safe.
        let ids: Vec<&str> = retired.iter().map(|&i| jobs[i].id.as_str()).collect();
        let stored = self.store.get_jobs(&ids)?;
        for (i, full) in retired.into_iter().zip(stored) {
            if let Some(full) = full {
                jobs[i] = full;
            }
        }
        for job in &mut jobs {
            record::summarise(job);
        }
        Ok(jobs)
    }

    pub fn get(&self, id: &str) -> Result<JobInfo, CoordinatorError> {
        let mut inner = self.lock();
        let entry = inner.visible(id)?;
        let (info, retired, seq) = (entry.job.info.clone(), entry.retired, entry.seq);
        drop(inner);
        if retired {
            return self.stored(info);
        }
        self.committer.wait_through(seq);
        Ok(info)
    }

    /// The full record of an ended job, read from the store (the trimmed one if it is gone).
    fn stored(&self, trimmed: JobInfo) -> Result<JobInfo, CoordinatorError> {
        let full = self.store.get_jobs(&[trimmed.id.as_str()])?.pop().flatten();
        Ok(full.unwrap_or(trimmed))
    }

    /// The job as it is now, and a subscription to its later events unless it has ended.
    pub fn watch(&self, id: &str) -> Result<(JobInfo, Option<Subscription>), CoordinatorError> {
        let mut inner = self.lock();
        let decided = inner.next_seq - 1;
        let entry = inner.visible(id)?;
        if entry.retired {
            let trimmed = entry.job.info.clone();
            drop(inner);
            return Ok((self.stored(trimmed)?, None));
        }
        let rx = entry.subscribe();
        let (info, seq) = (entry.job.info.clone(), entry.seq);
        drop(inner);
        self.committer.wait_through(seq);
        Ok((info, Some(Subscription { rx, after: decided })))
    }

    /// Cancels a job that has not ended; returns its final record once stored.
    pub fn cancel(&self, id: &str) -> Result<JobInfo, CoordinatorError> {
        let mut pending = Pending::new(&self.committer);
        let full = {
            let mut inner = self.lock();
            let entry = inner.visible(id)?;
            let t = machine::step(&mut entry.job, Event::Cancel, Now::current())?;
            let full = entry.job.info.clone();
            inner.apply(id, t, &mut pending);
            full
        };
        match self.run(pending).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(full),
        }
    }

    /// Registered workers by id, for `cvdist status` without a job (RPC ListWorkers).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let inner = self.lock();
        let now = now_unix();
        inner
            .workers
            .iter()
            .map(|(id, w)| {
                let mut info = WorkerInfo {
                    worker_id: id.clone(),
                    capabilities: Some(w.caps.clone()),
                    data_addr: w.data_addr.clone(),
                    state: WorkerState::Idle as i32,
                    registered_unix: w.registered_unix,
                    last_heartbeat_unix: now - w.last_seen.elapsed().as_secs_f64(),
                    ..Default::default()
                };
                if let Some((job_id, attempt)) = &w.job {
                    info.set_state(WorkerState::Busy);
                    info.job_id = job_id.clone();
                    info.attempt = *attempt;
                    if let Some(entry) = inner.jobs.get(job_id) {
                        info.rank = entry.job.members.iter().position(|m| m == id).unwrap_or(0) as u32;
                        info.world_size = entry.job.members.len() as u32;
                    }
                }
                info
            })
            .collect()
    }
}
