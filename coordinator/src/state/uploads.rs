//! Checkpoint uploads as the state sees them: which upload may be stored (only rank 0 of the
//! job's current, running attempt, at a position that attempt can have reached), and the
//! record of one stored or refused.

use super::effects::Pending;
use super::machine::{self, Event, Now};
use super::{Coordinator, CoordinatorError, Inner};
use cvdist_common::{models, names};

/// What a checkpoint upload says about itself: the job, the attempt and the session key of
/// its uploader (from `Registered`), and the checkpoint's name, which encodes its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadClaim {
    pub job_id: String,
    pub attempt: u32,
    pub session_key: String,
    pub name: String,
}

impl UploadClaim {
    /// The position (epoch, step) the name encodes.
    fn position(&self) -> Result<(u32, u64), CoordinatorError> {
        names::parse_checkpoint_name(&self.name).map_err(|e| CoordinatorError::BadCheckpointName(e.to_string()))
    }
}

/// How far an upload has got when it is checked: this bounds how far past what the ranks
/// reported its position may lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadStage {
    /// At the first chunk, which may overtake on the wire rank 0's report of the last step of
    /// the epoch: two epochs past the reports.
    Started,
    /// Every byte received and verified: rank 0 reports the last step of an epoch before it
    /// uploads that epoch's checkpoint, so one epoch past the reports.
    Complete,
}

impl UploadStage {
    fn slack_epochs(self) -> u32 {
        match self {
            UploadStage::Started => 2,
            UploadStage::Complete => 1,
        }
    }
}

impl Coordinator {
    /// Records that a verified checkpoint of the current attempt is stored, if it is still
    /// the newest and its uploader still holds rank 0 of that attempt; returns once the
    /// record naming it is durable (the worker then deletes its local copy).
    pub fn checkpoint_stored(&self, claim: &UploadClaim) -> Result<(), CoordinatorError> {
        let mut pending = Pending::new(&self.committer);
        {
            let mut inner = self.lock();
            inner.accepts(claim, UploadStage::Complete)?;
            let entry = inner.visible(&claim.job_id)?;
            let event = Event::CheckpointStored { attempt: claim.attempt, name: claim.name.clone() };
            let t = machine::step(&mut entry.job, event, Now::current())?;
            inner.apply(&claim.job_id, t, &mut pending);
        }
        match self.run(pending).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Records a refused checkpoint upload of the current attempt, so the job's log shows
    /// it and a job whose final checkpoint never arrives can say why.
    pub fn checkpoint_refused(&self, job_id: &str, attempt: u32, name: &str, reason: &str) {
        let mut pending = Pending::new(&self.committer);
        {
            let mut inner = self.lock();
            if inner.visible(job_id).is_err() {
                return;
            }
            let event = Event::CheckpointRefused { attempt, name: name.to_string(), reason: reason.to_string() };
            self.step_job(&mut inner, job_id, event, &mut pending);
        }
        self.run_logged(pending);
    }

    /// Whether the upload `claim` makes may be stored; returns the most bytes it may take.
    /// Only the session holding rank 0 of the job's current, running attempt may upload,
    /// and only a position this attempt can have reached: after where it started and after
    /// the newest stored checkpoint, within the job's epochs, and no further past what its
    /// ranks reported than `stage` allows.
    pub fn accepts_checkpoint(&self, claim: &UploadClaim, stage: UploadStage) -> Result<u64, CoordinatorError> {
        self.lock().accepts(claim, stage)
    }
}

impl Inner {
    /// See [`Coordinator::accepts_checkpoint`].
    fn accepts(&self, claim: &UploadClaim, stage: UploadStage) -> Result<u64, CoordinatorError> {
        let UploadClaim { job_id, attempt, session_key, .. } = claim;
        let pos = claim.position()?;
        let entry =
            self.jobs.get(job_id).filter(|e| e.stored).ok_or_else(|| CoordinatorError::NoSuchJob(job_id.clone()))?;
        let job = &entry.job;
        machine::check_upload_attempt(job, *attempt)?;
        let is_rank0 =
            job.members.first().is_some_and(|w| self.workers.holds_attempt(w, job_id, *attempt, session_key));
        if !is_rank0 {
            return Err(CoordinatorError::CheckpointRefused {
                job_id: job_id.clone(),
                why: "only rank 0 of the current attempt uploads checkpoints".into(),
            });
        }
        machine::check_upload_position(job, *attempt, pos, stage.slack_epochs())?;
        let model = &job.spec().model;
        models::max_checkpoint_bytes(model)
            .ok_or_else(|| CoordinatorError::UnknownModel { job_id: job_id.clone(), model: model.clone() })
    }
}
