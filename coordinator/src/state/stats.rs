//! Counts for the metrics endpoint (`server.rs` renders them), read under the lock.

use super::machine::state_name;
use super::Coordinator;
use cvdist_common::proto::JobState;
use std::collections::BTreeMap;

/// Counts for the metrics endpoint.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub jobs_by_state: BTreeMap<&'static str, u64>,
    pub workers: u64,
    pub busy_workers: u64,
    pub restarts: u64,
    /// Recoveries of every job (`JobInfo.recoveries`), and the steps they trained again.
    pub recoveries: u64,
    pub steps_replayed: u64,
    pub images_per_sec: f64,
    pub step_seconds: f64,
    pub allreduce_seconds: f64,
    /// The world size of each RUNNING job, by job id (it changes when a job shrinks in a
    /// recovery or grows).
    pub world_sizes: BTreeMap<String, u64>,
}

impl Coordinator {
    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut s = Stats::default();
        for j in inner.jobs.values().filter(|j| j.stored).map(|j| &j.job) {
            *s.jobs_by_state.entry(state_name(j.state())).or_default() += 1;
            s.restarts += j.info.restarts as u64;
            s.recoveries += j.info.recoveries.len() as u64;
            s.steps_replayed += j.info.recoveries.iter().map(|r| r.steps_replayed).sum::<u64>();
            if j.state() == JobState::Running {
                s.world_sizes.insert(j.info.id.clone(), u64::from(j.info.world_size));
                if let Some(p) = &j.info.progress {
                    s.images_per_sec += p.images_per_sec;
                    s.step_seconds = s.step_seconds.max(p.step_seconds);
                    s.allreduce_seconds = s.allreduce_seconds.max(p.allreduce_seconds);
                }
            }
        }
        s.workers = inner.workers.len() as u64;
        s.busy_workers = inner.workers.busy() as u64;
        s
    }
}
