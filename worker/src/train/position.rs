//! Where an epoch stands, and which samples the rest of it trains on when the world size
//! changes mid-epoch (docs/ARCHITECTURE.md, "Position").
//!
//! An epoch's order is the DistributedSampler permutation of `seed + epoch`
//! (`cvdist_common::sampler`). Rank `r` of `N` takes padded positions `r, r+N, …` and step
//! `k` takes its positions `k·b … (k+1)·b`, so the samples `s` complete steps consumed are
//! exactly the first `N·s·b` positions of the padded order: a prefix. The rest of the epoch
//! is therefore "the order minus a prefix", whatever `N` was. A group of another size `N'`
//! continues with a **segment**: the order from the consumed prefix to its end, padded by
//! repeating its own head to a multiple of `N'` and strided over the `N'` ranks exactly as
//! DistributedSampler strides the whole epoch. A segment from position 0 is the
//! DistributedSampler shard itself, and a group of the segment's own size continues it step
//! by step, so an unchanged world size trains exactly what an uninterrupted run trains.

use cvdist_common::proto::JobSpec;
use cvdist_common::sampler;

/// How many samples a step takes: a fixed number per rank (`--batch-size`: the global
/// batch grows with the world size), or a fixed number over all ranks (`--global-batch B`:
/// each of N ranks takes B/N, and a step covers the same B positions of the epoch's order
/// at any N).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    PerRank(usize),
    Global(usize),
}

impl Batch {
    /// The job's batch.
    pub fn of(spec: &JobSpec) -> Batch {
        match spec.global_batch {
            0 => Batch::PerRank(spec.batch_size as usize),
            b => Batch::Global(b as usize),
        }
    }

    /// Samples per rank per step on `world` ranks (at least 1).
    pub fn per_rank(self, world: u32) -> usize {
        match self {
            Batch::PerRank(b) => b.max(1),
            Batch::Global(b) => (b / world.max(1) as usize).max(1),
        }
    }

    /// Samples per step over all `world` ranks.
    pub fn per_step(self, world: u32) -> u64 {
        self.per_rank(world) as u64 * u64::from(world.max(1))
    }
}

/// The position of the last complete step: epoch, the segment it trains, and the steps of
/// that segment done. Identical on every rank of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: u32,
    /// Samples of the epoch's order consumed before the segment started (0: the epoch's
    /// DistributedSampler shards, as every epoch starts).
    pub base: u64,
    /// The world size the segment is sharded over.
    pub world: u32,
    /// Complete steps of the segment.
    pub steps: u64,
}

/// One rank's part of a segment: its sample indices in order, and the step numbering the
/// loop, the schedule and progress reports use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub indices: Vec<usize>,
    /// The step number of the segment's first batch: `base / (world · batch)`, rounded
    /// down (0 for a whole epoch), so the learning-rate schedule moves on from about where
    /// the epoch was.
    pub first_step: u64,
    /// `first_step` plus the segment's batches per rank: the epoch's last step number.
    pub steps_per_epoch: u64,
}

impl Position {
    /// The start of `epoch` on `world` ranks.
    pub fn epoch_start(epoch: u32, world: u32) -> Position {
        Position { epoch, base: 0, world, steps: 0 }
    }

    /// Samples of the epoch's order consumed by the complete steps (at most `len`: the
    /// padding only repeats samples already counted).
    pub fn consumed(&self, len: usize, batch: Batch) -> u64 {
        self.base.saturating_add(self.steps.saturating_mul(batch.per_step(self.world))).min(len as u64)
    }

    /// Where a group of `world` ranks continues from this position: the same segment at the
    /// same world size, otherwise a new segment from the consumed prefix.
    pub fn continue_on(&self, world: u32, len: usize, batch: Batch) -> Position {
        if world == self.world {
            *self
        } else {
            Position { epoch: self.epoch, base: self.consumed(len, batch), world, steps: 0 }
        }
    }

    /// The step number the loop counts at this position (the next step to train).
    pub fn step(&self, batch: Batch) -> u64 {
        self.first_step(batch) + self.steps
    }

    fn first_step(&self, batch: Batch) -> u64 {
        self.base / batch.per_step(self.world)
    }

    /// Rank `rank`'s samples of this position's segment (all of them, including those of
    /// the steps already done: the loader skips `self.steps` batches).
    pub fn segment(&self, len: usize, rank: usize, seed: u64, batch: Batch) -> Segment {
        let world = self.world.max(1) as usize;
        let first_step = self.first_step(batch);
        let indices = if self.base == 0 {
            sampler::rank_indices(len, world, rank, seed, u64::from(self.epoch))
        } else {
            let order = sampler::epoch_permutation(len, seed, u64::from(self.epoch));
            let rest = &order[(self.base as usize).min(len)..];
            if rest.is_empty() {
                Vec::new()
            } else {
                let total = rest.len().div_ceil(world) * world;
                (rank..total).step_by(world).map(|p| rest[p % rest.len()]).collect()
            }
        };
        let steps = indices.len().div_ceil(batch.per_rank(self.world)) as u64;
        Segment { indices, first_step, steps_per_epoch: first_step + steps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Trains `steps` steps of every rank's segment from `at`, recording every sample.
    fn run(at: Position, len: usize, seed: u64, batch: Batch, steps: u64, seen: &mut [u32]) -> Position {
        let segs: Vec<Segment> = (0..at.world as usize).map(|r| at.segment(len, r, seed, batch)).collect();
        let batch = batch.per_rank(at.world);
        let mut done = at.steps;
        for _ in 0..steps {
            if done >= segs[0].steps_per_epoch - segs[0].first_step {
                break;
            }
            for s in &segs {
                let lo = (done as usize * batch).min(s.indices.len());
                let hi = ((done as usize + 1) * batch).min(s.indices.len());
                for &i in &s.indices[lo..hi] {
                    seen[i] += 1;
                }
            }
            done += 1;
        }
        Position { steps: done, ..at }
    }

    #[test]
    fn a_whole_epoch_segment_is_the_distributed_sampler_shard() {
        let at = Position::epoch_start(3, 4);
        for r in 0..4 {
            let s = at.segment(1000, r, 7, Batch::PerRank(32));
            assert_eq!(s.indices, sampler::rank_indices(1000, 4, r, 7, 3));
            assert_eq!((s.first_step, s.steps_per_epoch), (0, 8));
        }
    }

    #[test]
    fn an_unchanged_world_size_continues_the_same_shards() {
        let at = Position { epoch: 1, base: 0, world: 2, steps: 5 };
        assert_eq!(at.continue_on(2, 768, Batch::PerRank(32)), at);
        assert_eq!(at.step(Batch::PerRank(32)), 5);
    }

    #[test]
    fn three_to_two_ranks_mid_epoch_trains_every_sample_once() {
        // 768 samples, batch 32: 3 ranks consume 96 per step; after 4 steps 384 are done
        // and 2 ranks shard the other 384 (6 steps of 64).
        let (len, batch, seed) = (768, Batch::PerRank(32), 0);
        let mut seen = vec![0u32; len];
        let at = run(Position::epoch_start(0, 3), len, seed, batch, 4, &mut seen);
        assert_eq!(at.consumed(len, batch), 384);
        let next = at.continue_on(2, len, batch);
        assert_eq!(next, Position { epoch: 0, base: 384, world: 2, steps: 0 });
        let seg = next.segment(len, 0, seed, batch);
        assert_eq!((seg.first_step, seg.steps_per_epoch), (6, 12));
        run(next, len, seed, batch, u64::MAX, &mut seen);
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    }

    /// With a global batch a step covers the same positions of the epoch's order at any
    /// world size: 4 ranks then 2 then 1 train, step by step, the samples 1 rank trains.
    #[test]
    fn a_global_batch_trains_the_same_samples_per_step_at_any_world_size() {
        let (len, batch, seed) = (1024, Batch::Global(64), 5);
        let step_samples = |at: Position| -> Vec<usize> {
            let mut all: Vec<usize> = (0..at.world as usize)
                .flat_map(|r| {
                    let seg = at.segment(len, r, seed, batch);
                    let b = batch.per_rank(at.world);
                    seg.indices[(at.steps as usize * b).min(seg.indices.len())
                        ..((at.steps as usize + 1) * b).min(seg.indices.len())]
                        .to_vec()
                })
                .collect();
            all.sort_unstable();
            all
        };
        let mut one = Position::epoch_start(0, 1);
        let mut elastic = Position::epoch_start(0, 4);
        for step in 0..16u64 {
            let world = match step {
                0..=4 => 4,
                5..=9 => 2,
                _ => 1,
            };
            elastic = elastic.continue_on(world, len, batch);
            assert_eq!(elastic.step(batch), step);
            assert_eq!(step_samples(elastic), step_samples(one), "step {step} on {world} ranks");
            elastic.steps += 1;
            one.steps += 1;
        }
        assert_eq!(elastic.consumed(len, batch), one.consumed(len, batch));
    }

    proptest! {
        /// Any sequence of world sizes, each training some steps, covers the epoch: every
        /// sample at least once, and more than once only as DistributedSampler padding
        /// (at most world − 1 repeats per segment).
        #[test]
        fn world_size_changes_skip_no_sample(len in 1usize..400, batch in 1usize..40, seed: u64,
                                              plan in proptest::collection::vec((1u32..6, 0u64..6), 1..5)) {
            let batch = Batch::PerRank(batch);
            let mut seen = vec![0u32; len];
            let mut at = Position::epoch_start(0, plan[0].0);
            let mut repeats_allowed = 0usize;
            for (k, &(world, steps)) in plan.iter().enumerate() {
                at = at.continue_on(world, len, batch);
                if k == 0 || at.steps == 0 {
                    repeats_allowed += world as usize - 1;
                }
                let last = k == plan.len() - 1;
                at = run(at, len, seed, batch, if last { u64::MAX } else { steps }, &mut seen);
            }
            prop_assert!(seen.iter().all(|&n| n >= 1));
            let extra: usize = seen.iter().map(|&n| n as usize - 1).sum();
            prop_assert!(extra <= repeats_allowed, "{} repeats, {} allowed", extra, repeats_allowed);
            prop_assert_eq!(at.consumed(len, batch), len as u64);
        }
    }
}
