//! Where a new attempt continues: every member says what live state it holds (a
//! [`Claim`]), all learn every claim exactly, and the furthest state is broadcast.

use super::{LiveStart, LiveState};
use crate::collective::Collective;
use crate::train::engine::Engine;
use crate::train::error::TrainError;
use crate::train::exact_gather;
use crate::train::position::{Batch, Position};
use crate::train::scaler::{GradScaler, ScalerState};
use crate::train::sync;
use cvdist_common::epoch_sums::EpochSums;
use cvdist_common::proto::JobSpec;
use tch::{Device, Tensor};
use tracing::info;

/// What one rank holds: the position of its last complete step and what training
/// continues with besides the tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Held {
    at: Position,
    /// This rank's sums of the epoch at `at`.
    partial: EpochSums,
    /// The fp16 loss scaler's state; None for fp32/bf16 runs.
    scaler: Option<ScalerState>,
    /// Whether the state has SGD momentum buffers (none before the first update).
    momentum: bool,
}

/// What one rank says in the agreement of a group of `world`.
#[derive(Debug, Clone, PartialEq)]
struct Claim {
    /// None: this rank holds no live state (a replacement, or its state was not kept).
    held: Option<Held>,
    /// The sums (loss·samples, correct, samples) each of the `world` new ranks continues
    /// from, when this rank's state carried every old rank's: the old ranks' own when the
    /// world size is the same (new rank r trains old rank r's shard), otherwise all of
    /// them added on rank 0 (an epoch's totals are sums over the ranks).
    rank_sums: Option<Vec<EpochSums>>,
}

/// Values of a claim before its per-rank sums: held flag, epoch, base, world, steps, the
/// five epoch sums, scaler flag, scale, growth tracker, momentum flag, rank-sums flag.
const FIXED: usize = 15;
/// Values per new rank in the per-rank sums: loss·samples, correct, samples.
const PER_RANK: usize = 3;

impl Claim {
    /// `state`'s claim in a group of `world`.
    fn of(state: Option<&LiveState>, world: usize) -> Claim {
        let Some(s) = state else { return Claim { held: None, rank_sums: None } };
        let held = Held {
            at: s.at,
            partial: s.partial,
            scaler: s.engine.scaler.as_ref().map(GradScaler::state),
            momentum: !s.engine.sgd.momentum_buffers().is_empty(),
        };
        let rank_sums = s.rank_sums.as_ref().map(|sums| {
            if s.at.world as usize == world && sums.len() == world {
                sums.clone()
            } else {
                let mut out = vec![EpochSums::default(); world];
                if let Some(first) = out.first_mut() {
                    *first = EpochSums { seconds: 0.0, allreduce_seconds: 0.0, ..EpochSums::total(sums, first) };
                }
                out
            }
        });
        Claim { held: Some(held), rank_sums }
    }

    /// The claim as `FIXED + world × PER_RANK` numbers, for [`exact_gather::gather_f64`]
    /// (every position and count is an integer below 2^53, so f64 holds it exactly).
    fn encode(&self, world: usize) -> Vec<f64> {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut out = vec![0.0; FIXED + PER_RANK * world];
        if let Some(h) = &self.held {
            let p = h.partial.to_array();
            let fixed = [
                1.0,
                f64::from(h.at.epoch),
                h.at.base as f64,
                f64::from(h.at.world),
                h.at.steps as f64,
                p[0],
                p[1],
                p[2],
                p[3],
                p[4],
                flag(h.scaler.is_some()),
                h.scaler.map_or(0.0, |s| s.scale),
                h.scaler.map_or(0.0, |s| s.growth_tracker as f64),
                flag(h.momentum),
                flag(self.rank_sums.is_some()),
            ];
            out[..FIXED].copy_from_slice(&fixed);
        }
        if let Some(sums) = &self.rank_sums {
            for (slot, s) in out[FIXED..].chunks_mut(PER_RANK).zip(sums) {
                slot.copy_from_slice(&[s.loss_sum, s.correct, s.samples]);
            }
        }
        out
    }

    /// The inverse of [`Claim::encode`]; None for numbers of another length (a peer that
    /// counted another world size) or a held flag other than 0 or 1.
    fn decode(v: &[f64], world: usize) -> Option<Claim> {
        if v.len() != FIXED + PER_RANK * world {
            return None;
        }
        let held = match v[0] {
            0.0 => return Some(Claim { held: None, rank_sums: None }),
            1.0 => Held {
                at: Position { epoch: v[1] as u32, base: v[2] as u64, world: v[3] as u32, steps: v[4] as u64 },
                partial: EpochSums::from_array([v[5], v[6], v[7], v[8], v[9]]),
                scaler: (v[10] == 1.0).then(|| ScalerState { scale: v[11], growth_tracker: v[12] as i64 }),
                momentum: v[13] == 1.0,
            },
            _ => return None,
        };
        let rank_sums = (v[14] == 1.0).then(|| {
            v[FIXED..]
                .chunks(PER_RANK)
                .map(|s| EpochSums { loss_sum: s[0], correct: s[1], samples: s[2], ..EpochSums::default() })
                .collect()
        });
        Some(Claim { held: Some(held), rank_sums })
    }
}

/// The members of a new attempt agree where it continues: each says whether it holds a
/// live state and at which position (exactly, [`exact_gather::gather_f64`]); the furthest
/// position (samples of the furthest epoch consumed; the lowest rank among equals) is the
/// source, and every rank takes its weights, BatchNorm buffers, momentum, loss scale and
/// position by a broadcast from it. A rank with no state (a replacement) or an older one
/// (its ring let a peer finish a step it did not) receives; the source's state is not
/// changed. `Ok(None)`: no member holds a state; the group resumes from the checkpoint.
///
/// Only states in epoch `max_epoch` or before count (`Assignment.live_max_epoch`: the first
/// epoch the coordinator has not recorded; a state past it would skip that epoch's report).
///
/// `own` is only taken (moved into the result) once every collective succeeded, so after
/// an error it is still this rank's intact state.
pub fn agree(
    own: &mut Option<LiveState>,
    spec: &JobSpec,
    device: Device,
    train_len: usize,
    max_epoch: u32,
    comm: &mut dyn Collective,
) -> Result<Option<LiveStart>, TrainError> {
    let rank = comm.rank();
    let world = comm.world_size();
    let claims: Vec<Option<Claim>> = exact_gather::gather_f64(&Claim::of(own.as_ref(), world).encode(world), comm)?
        .iter()
        .map(|v| Claim::decode(v, world))
        .collect();
    let batch = Batch::of(spec);
    let Some((source, src, held)) = claims
        .iter()
        .enumerate()
        .filter_map(|(r, c)| Some((r, c.as_ref()?, c.as_ref()?.held?)))
        .filter(|(_, _, h)| h.at.epoch <= max_epoch)
        .max_by_key(|&(r, _, h)| (h.at.epoch, h.at.consumed(train_len, batch), std::cmp::Reverse(r)))
    else {
        return Ok(None);
    };
    let at = held.at;
    let src_momentum = held.momentum;
    // A receiver needs tensors of the right shapes to receive into: its own (older) state
    // if it has one, otherwise a freshly built model.
    let mut fresh = None;
    let reuse = own.as_ref().is_some_and(|s| src_momentum || s.engine.sgd.momentum_buffers().is_empty());
    if rank != source && !reuse {
        fresh = Some(Engine::new(spec, device)?);
    }
    {
        let engine = match fresh.as_mut() {
            Some(e) => e,
            None => &mut own.as_mut().ok_or_else(|| TrainError::Model("no live state to send".into()))?.engine,
        };
        if src_momentum && engine.sgd.momentum_buffers().is_empty() {
            let zeros: Vec<(String, Tensor)> =
                engine.sgd.params().iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect();
            engine.sgd.load_momentum_buffers(zeros).map_err(TrainError::Model)?;
        }
        let mut tensors: Vec<Tensor> = engine.variables().into_iter().map(|(_, t)| t).collect();
        tensors.extend(engine.sgd.momentum_buffers().into_iter().map(|(_, t)| t));
        sync::broadcast(&tensors.iter().collect::<Vec<_>>(), comm, source)?;
    }
    let mut engine = match fresh {
        Some(e) => e,
        None => own.take().map(|s| s.engine).ok_or_else(|| TrainError::Model("no live state".into()))?,
    };
    engine.scaler = held.scaler.map(|s| GradScaler::from_state(device, s));
    // Every rank's sums came with the source's state (the usual case): new rank r continues
    // what its shard's sums were. Otherwise each rank continues its own sums when it
    // completed exactly the source's steps, and a replacement takes the source's as its
    // estimate (the lost rank's are gone).
    let mine = claims.get(rank).and_then(|c| c.as_ref()?.held);
    let partial = match src.rank_sums.as_ref().and_then(|sums| sums.get(rank)) {
        Some(own) => {
            EpochSums { seconds: held.partial.seconds, allreduce_seconds: held.partial.allreduce_seconds, ..*own }
        }
        None => match mine {
            Some(m) if m.at == at => m.partial,
            _ => held.partial,
        },
    };
    info!(source, epoch = at.epoch, consumed = at.consumed(train_len, batch), "continuing from a live state");
    Ok(Some(LiveStart { engine, at, partial, source }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim comes back from its numbers as it went in, and numbers counted for another
    /// world size or with an unknown flag are no claim at all.
    #[test]
    fn a_claim_round_trips_through_its_numbers() {
        let held = Held {
            at: Position { epoch: 3, base: 640, world: 2, steps: 17 },
            partial: EpochSums {
                loss_sum: 1.0 / 3.0,
                correct: 12.0,
                samples: 40.0,
                seconds: 2.5,
                allreduce_seconds: 0.25,
            },
            scaler: Some(ScalerState { scale: 32768.0, growth_tracker: 7 }),
            momentum: true,
        };
        let sums = |l: f64| EpochSums { loss_sum: l, correct: 2.0, samples: 20.0, ..EpochSums::default() };
        for claim in [
            Claim { held: None, rank_sums: None },
            Claim { held: Some(held), rank_sums: None },
            Claim {
                held: Some(Held { scaler: None, momentum: false, ..held }),
                rank_sums: Some(vec![sums(0.5), sums(0.75)]),
            },
        ] {
            let numbers = claim.encode(2);
            assert_eq!(numbers.len(), FIXED + PER_RANK * 2);
            assert_eq!(Claim::decode(&numbers, 2), Some(claim));
        }
        let numbers = Claim { held: Some(held), rank_sums: None }.encode(2);
        assert_eq!(Claim::decode(&numbers, 3), None, "another world size");
        let mut bad = numbers;
        bad[0] = 2.0;
        assert_eq!(Claim::decode(&bad, 2), None, "an unknown flag");
    }
}
