//! Distributed sampling with the semantics of PyTorch's `DistributedSampler`
//! (shuffle = true, drop_last = false):
//!
//! 1. the epoch's order is a permutation of `0..len` drawn from `seed + epoch`;
//! 2. it is padded by repeating its head until the length is a multiple of `world_size`;
//! 3. rank `r` takes positions `r, r + world_size, r + 2 * world_size, ...`.
//!
//! Every rank computes the same permutation locally, so no index lists travel over the
//! network, and a resumed job reproduces exactly the order it was interrupted in.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The permutation of `0..len` used for `epoch`, identical on every rank.
pub fn epoch_permutation(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch));
    order.shuffle(&mut rng);
    order
}

/// Number of samples each rank sees per epoch: `ceil(len / world_size)`.
pub fn samples_per_rank(len: usize, world_size: usize) -> usize {
    if world_size == 0 {
        return 0;
    }
    len.div_ceil(world_size)
}

/// Indices of the samples `rank` trains on in `epoch`, in order.
///
/// # Panics
/// If `rank >= world_size`; callers validate ranks when they receive an assignment.
pub fn rank_indices(len: usize, world_size: usize, rank: usize, seed: u64, epoch: u64) -> Vec<usize> {
    assert!(rank < world_size, "rank {rank} out of range for world size {world_size}");
    if len == 0 {
        return Vec::new();
    }
    let order = epoch_permutation(len, seed, epoch);
    let total = samples_per_rank(len, world_size) * world_size;
    (rank..total).step_by(world_size).map(|pos| order[pos % len]).collect()
}

/// A contiguous, unshuffled split of `0..len` for evaluation: each sample is seen by
/// exactly one rank (no padding, so summed metrics are exact).
pub fn eval_indices(len: usize, world_size: usize, rank: usize) -> std::ops::Range<usize> {
    let per = len.div_ceil(world_size.max(1));
    let start = (rank * per).min(len);
    let end = ((rank + 1) * per).min(len);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranks_partition_the_padded_permutation(len in 1usize..500, world in 1usize..9, seed: u64, epoch in 0u64..1000) {
            let order = epoch_permutation(len, seed, epoch);
            let per = samples_per_rank(len, world);
            let mut seen = vec![0usize; len];
            let parts: Vec<_> = (0..world).map(|r| rank_indices(len, world, r, seed, epoch)).collect();
            for (r, part) in parts.iter().enumerate() {
                prop_assert_eq!(part.len(), per);
                for (k, &i) in part.iter().enumerate() {
                    // position k of rank r is padded-permutation position r + k * world
                    prop_assert_eq!(i, order[(r + k * world) % len]);
                    seen[i] += 1;
                }
            }
            // every sample appears at least once; only the padding repeats
            prop_assert!(seen.iter().all(|&c| c >= 1));
            prop_assert_eq!(seen.iter().sum::<usize>(), per * world);
            prop_assert!(per * world - len < world);
        }

        #[test]
        fn permutation_is_a_permutation_and_depends_on_epoch(len in 2usize..300, seed: u64) {
            let a = epoch_permutation(len, seed, 0);
            let mut sorted = a.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..len).collect::<Vec<_>>());
            prop_assert_eq!(&a, &epoch_permutation(len, seed, 0));
            if len > 8 {
                prop_assert_ne!(a, epoch_permutation(len, seed, 1));
            }
        }

        #[test]
        fn eval_split_covers_each_sample_once(len in 0usize..500, world in 1usize..9) {
            let mut covered = Vec::new();
            for r in 0..world {
                covered.extend(eval_indices(len, world, r));
            }
            prop_assert_eq!(covered, (0..len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn single_rank_sees_whole_permutation() {
        assert_eq!(rank_indices(10, 1, 0, 7, 3), epoch_permutation(10, 7, 3));
    }
}
