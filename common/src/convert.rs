//! Conversions between the generated protocol types (`crate::proto`) and the domain types
//! both sides use, in one place: the checkpoint record, a recovery's cost as `summary.json`
//! shows it, and what a job state means. (The
//! job-spec fields that stay strings on the wire are read and written by the enums in
//! `crate::choices`; the one whose empty string has a meaning of its own,
//! `grad_compression`, is read here.)

use crate::checkpoint::{CheckpointState, ScalerState};
use crate::choices::{ChoiceError, GradCompression};
use crate::epoch_sums::EpochSums;
use crate::proto;

impl GradCompression {
    /// The compression `spec` asks for. An empty field is what clients that predate it
    /// send (and what proto3 decodes when it is absent): no compression, which keeps their gradients exact.
    ///
    /// Errors: [`ChoiceError::GradCompression`] naming any other unknown value.
    pub fn from_spec(spec: &proto::JobSpec) -> Result<GradCompression, ChoiceError> {
        match spec.grad_compression.as_str() {
            "" => Ok(GradCompression::None),
            other => other.parse(),
        }
    }
}

impl proto::JobState {
    /// Whether a job in this state has ended for good (succeeded, failed or cancelled):
    /// nothing changes it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, proto::JobState::Succeeded | proto::JobState::Failed | proto::JobState::Cancelled)
    }
}

impl From<&proto::Recovery> for crate::run_dir::Recovery {
    fn from(r: &proto::Recovery) -> crate::run_dir::Recovery {
        crate::run_dir::Recovery {
            attempt: r.attempt,
            cause: r.cause.clone(),
            downtime_seconds: r.downtime_seconds,
            steps_replayed: r.steps_replayed,
            old_world_size: r.old_world_size,
            new_world_size: r.new_world_size,
            resumed_from: r.resumed_from.clone(),
        }
    }
}

/// A checkpoint state from the wire that cannot be a record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointStateError {
    #[error("checkpoint state is missing")]
    Missing,
    #[error("checkpoint state has {got} per-rank sums but the job ran on {world_size} ranks")]
    RankPartials { got: usize, world_size: u32 },
}

impl From<&EpochSums> for proto::EpochSums {
    fn from(s: &EpochSums) -> proto::EpochSums {
        proto::EpochSums {
            loss_sum: s.loss_sum,
            correct: s.correct,
            samples: s.samples,
            seconds: s.seconds,
            allreduce_seconds: s.allreduce_seconds,
        }
    }
}

impl From<&proto::EpochSums> for EpochSums {
    fn from(s: &proto::EpochSums) -> EpochSums {
        EpochSums {
            loss_sum: s.loss_sum,
            correct: s.correct,
            samples: s.samples,
            seconds: s.seconds,
            allreduce_seconds: s.allreduce_seconds,
        }
    }
}

impl From<&CheckpointState> for proto::CheckpointState {
    fn from(s: &CheckpointState) -> proto::CheckpointState {
        proto::CheckpointState {
            format_version: s.format_version,
            model: s.model.clone(),
            epoch: s.epoch,
            step: s.step,
            seed: s.seed,
            world_size: s.world_size,
            // The group's sums carry no all-reduce time (it is a per-rank figure).
            partial: Some(proto::EpochSums { allreduce_seconds: 0.0, ..(&s.partial).into() }),
            rank_partials: s.rank_partials.iter().map(Into::into).collect(),
            loss_scale: s.loss_scale,
            grad_scaler: s
                .grad_scaler
                .map(|g| proto::GradScalerState { scale: g.scale, growth_tracker: g.growth_tracker }),
            sha256: s.sha256.clone(),
            bytes: s.bytes,
            created_unix: s.created_unix,
        }
    }
}

impl TryFrom<proto::CheckpointState> for CheckpointState {
    type Error = CheckpointStateError;

    /// Every field maps one to one; a record with more per-rank sums than ranks is refused
    /// (a resumed rank reads its own entry, and the count bounds what a peer can make the
    /// receiver store).
    fn try_from(p: proto::CheckpointState) -> Result<CheckpointState, CheckpointStateError> {
        if p.rank_partials.len() > p.world_size as usize {
            return Err(CheckpointStateError::RankPartials { got: p.rank_partials.len(), world_size: p.world_size });
        }
        Ok(CheckpointState {
            format_version: p.format_version,
            model: p.model,
            epoch: p.epoch,
            step: p.step,
            seed: p.seed,
            world_size: p.world_size,
            partial: EpochSums { allreduce_seconds: 0.0, ..p.partial.as_ref().map(Into::into).unwrap_or_default() },
            rank_partials: p.rank_partials.iter().map(Into::into).collect(),
            loss_scale: p.loss_scale,
            grad_scaler: p.grad_scaler.map(|g| ScalerState { scale: g.scale, growth_tracker: g.growth_tracker }),
            sha256: p.sha256,
            bytes: p.bytes,
            created_unix: p.created_unix,
        })
    }
}

impl TryFrom<Option<proto::CheckpointState>> for CheckpointState {
    type Error = CheckpointStateError;

    /// The state of a first checkpoint chunk, which must carry one.
    fn try_from(p: Option<proto::CheckpointState>) -> Result<CheckpointState, CheckpointStateError> {
        p.ok_or(CheckpointStateError::Missing)?.try_into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::JobState;

    #[test]
    fn terminal_states() {
        let terminal: Vec<JobState> = [
            JobState::Unspecified,
            JobState::Queued,
            JobState::Running,
            JobState::Recovering,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .filter(|s| s.is_terminal())
        .collect();
        assert_eq!(terminal, [JobState::Succeeded, JobState::Failed, JobState::Cancelled]);
    }

    /// The wire form carries every field exactly, non-finite sums included (JSON could
    /// not: it writes them as null, read back as NaN).
    #[test]
    fn checkpoint_state_round_trips_through_the_wire_form() {
        let mut s = CheckpointState::new("resnet20", 3, 17, 42, 2);
        s.partial =
            EpochSums { loss_sum: f64::INFINITY, correct: 5.0, samples: 64.0, seconds: 1.25, allreduce_seconds: 0.0 };
        s.rank_partials = [[1.0, 2.0, 32.0, 0.5, 0.125], [f64::NEG_INFINITY, 3.0, 32.0, 0.5, 0.25]]
            .into_iter()
            .map(EpochSums::from_array)
            .collect();
        s.loss_scale = 32768.0;
        s.grad_scaler = Some(ScalerState { scale: 32768.0, growth_tracker: 9 });
        s.sha256 = "ab".repeat(32);
        s.bytes = 1234;
        let wire = proto::CheckpointState::from(&s);
        let back = CheckpointState::try_from(Some(wire.clone())).unwrap();
        assert_eq!(back, s);
        // And through prost's encoding.
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded: proto::CheckpointState = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(CheckpointState::try_from(decoded).unwrap(), s);
        // fp32 runs have no scaler state; the JSON record keeps omitting it.
        let plain = CheckpointState::new("resnet20", 0, 0, 0, 1);
        let back = CheckpointState::try_from(proto::CheckpointState::from(&plain)).unwrap();
        assert_eq!(back, plain);
        assert!(!String::from_utf8(back.to_json()).unwrap().contains("grad_scaler"));
    }

    /// "" (a client from before the field) means none; the command line's spellings read
    /// back; anything else is refused with its one line.
    #[test]
    fn grad_compression_from_the_spec() {
        let with = |v: &str| proto::JobSpec { grad_compression: v.into(), ..Default::default() };
        assert_eq!(GradCompression::from_spec(&with("")), Ok(GradCompression::None));
        for c in GradCompression::ALL {
            assert_eq!(GradCompression::from_spec(&with(c.as_str())), Ok(c));
        }
        assert_eq!(
            GradCompression::from_spec(&with("zstd")).unwrap_err().to_string(),
            "unknown gradient compression \"zstd\"; expected \"none\", \"bf16\" or \"fp16\""
        );
    }

    #[test]
    fn malformed_wire_states_are_refused() {
        assert_eq!(CheckpointState::try_from(None), Err(CheckpointStateError::Missing));
        let mut wire = proto::CheckpointState::from(&CheckpointState::new("resnet20", 0, 4, 0, 1));
        wire.rank_partials = vec![proto::EpochSums::default(); 2];
        assert_eq!(
            CheckpointState::try_from(wire).unwrap_err().to_string(),
            "checkpoint state has 2 per-rank sums but the job ran on 1 ranks"
        );
    }
}
