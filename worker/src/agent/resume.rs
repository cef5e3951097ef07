//! Where an attempt continues from: the checkpoint its assignment names, or the training
//! state its members kept in memory.

use super::control::JobControl;
use super::env::JobEnv;
use super::failure::Failure;
use super::observer::send_report;
use super::transfer;
use crate::collective::Collective;
use crate::train::live_state::{self, LiveStart};
use crate::train::position::Batch;
use cvdist_common::proto::{job_report, Assignment, FailureKind, JobSpec, Resumed};
use std::path::{Path, PathBuf};

/// Downloads the assignment's checkpoint (if it names one) into the job's `resume` folder.
pub(super) fn download_resume(
    a: &Assignment,
    env: &JobEnv,
    control: &JobControl,
    job_dir: &Path,
) -> Result<Option<PathBuf>, Failure> {
    if a.checkpoint.is_empty() {
        return Ok(None);
    }
    let mut client = env.client.clone();
    let dir = job_dir.join("resume");
    let path = control
        .block_on_unless_stopped(
            &env.runtime,
            transfer::download_checkpoint(&mut client, &a.job_id, &a.checkpoint, &dir),
        )
        .map_err(Failure::retry)?
        .map_err(|e| Failure::retry(format!("downloading checkpoint {}: {e}", a.checkpoint)))?;
    Ok(Some(path))
}

/// A recovery from memory: the members agree over the ring on the furthest live state any
/// of them kept from attempt `a.live_attempt` and all take it; rank 0 tells the
/// coordinator where the group continues. `None`: no member kept one. This worker's own
/// state goes back to its slot if the agreement fails (another recovery may use it).
pub(super) fn continue_live(
    a: &Assignment,
    env: &JobEnv,
    comm: &mut dyn Collective,
    spec: &JobSpec,
    train_len: usize,
) -> Result<Option<LiveStart>, Failure> {
    let mut own = live_state::take(&env.live, &a.job_id, a.live_attempt, a.attempt);
    let agreed = live_state::agree(&mut own, spec, env.device, train_len, a.live_max_epoch, comm);
    live_state::put_back(&env.live, own);
    let start = agreed?;
    if a.rank == 0 {
        let batch = Batch::of(spec);
        let resumed = match &start {
            Some(s) => {
                let at = s.at.continue_on(a.world_size, train_len, batch);
                Resumed {
                    epoch: at.epoch,
                    step: at.step(batch),
                    samples: at.consumed(train_len, batch),
                    live: true,
                    source_worker: a.peers.get(s.source).map(|p| p.worker_id.clone()).unwrap_or_default(),
                }
            }
            None => Resumed::default(),
        };
        send_report(env, a, job_report::Kind::Resumed(resumed), FailureKind::Unspecified);
    }
    Ok(start)
}
