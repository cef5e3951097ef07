//! The running sums of a training epoch, from which its reported loss, accuracy,
//! throughput and all-reduce share are computed. One rank's sums describe its own shard;
//! the group's are the sums over the ranks (`EpochSums::total`). On the wire they are the
//! proto message `EpochSums` (conversions in `crate::convert`); in a checkpoint's JSON
//! record they are arrays of numbers in field order ([`four`], [`rows_of_five`]).

/// An epoch's running sums, all in f64 so that a resumed epoch's totals equal the
/// uninterrupted run's bit for bit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochSums {
    /// Σ over batches of (mean cross-entropy of the batch, in nats) × (its samples).
    pub loss_sum: f64,
    /// Correctly classified training samples (an exact integer).
    pub correct: f64,
    /// Training samples seen (an exact integer).
    pub samples: f64,
    /// Seconds of the epoch's training so far (wall clock).
    pub seconds: f64,
    /// Seconds of them spent waiting for the gradient all-reduce.
    pub allreduce_seconds: f64,
}

impl EpochSums {
    /// The values in field order: loss·samples, correct, samples, seconds, all-reduce
    /// seconds (the order of the JSON rows and of the exact gathers that carry them).
    pub fn to_array(&self) -> [f64; 5] {
        [self.loss_sum, self.correct, self.samples, self.seconds, self.allreduce_seconds]
    }

    /// The inverse of [`EpochSums::to_array`].
    pub fn from_array([loss_sum, correct, samples, seconds, allreduce_seconds]: [f64; 5]) -> EpochSums {
        EpochSums { loss_sum, correct, samples, seconds, allreduce_seconds }
    }

    /// The group's sums over `ranks`: loss·samples, correct and samples add up; the
    /// times are `clock`'s (the ranks train side by side, so their times do not add).
    pub fn total(ranks: &[EpochSums], clock: &EpochSums) -> EpochSums {
        EpochSums {
            loss_sum: ranks.iter().map(|r| r.loss_sum).sum(),
            correct: ranks.iter().map(|r| r.correct).sum(),
            samples: ranks.iter().map(|r| r.samples).sum(),
            seconds: clock.seconds,
            allreduce_seconds: clock.allreduce_seconds,
        }
    }
}

/// Serde for the group's sums in a checkpoint record: four numbers (loss·samples,
/// correct, samples, seconds; the all-reduce seconds are not kept there and read as 0),
/// non-finite values as `crate::nonfinite` describes.
pub mod four {
    use super::EpochSums;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &EpochSums, s: S) -> Result<S::Ok, S::Error> {
        crate::nonfinite::array::serialize(&[v.loss_sum, v.correct, v.samples, v.seconds], s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EpochSums, D::Error> {
        let [loss_sum, correct, samples, seconds]: [f64; 4] = crate::nonfinite::array::deserialize(d)?;
        Ok(EpochSums { loss_sum, correct, samples, seconds, allreduce_seconds: 0.0 })
    }
}

/// Serde for every rank's sums in a checkpoint record: one row of five numbers per rank,
/// in [`EpochSums::to_array`] order.
pub mod rows_of_five {
    use super::EpochSums;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[EpochSums], s: S) -> Result<S::Ok, S::Error> {
        let rows: Vec<[f64; 5]> = v.iter().map(EpochSums::to_array).collect();
        crate::nonfinite::vec_of_arrays::serialize(&rows, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EpochSums>, D::Error> {
        let rows: Vec<[f64; 5]> = crate::nonfinite::vec_of_arrays::deserialize(d)?;
        Ok(rows.into_iter().map(EpochSums::from_array).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_total_adds_counts_and_keeps_one_clock() {
        let a = EpochSums { loss_sum: 1.5, correct: 3.0, samples: 4.0, seconds: 2.0, allreduce_seconds: 0.5 };
        let b = EpochSums { loss_sum: 0.25, correct: 1.0, samples: 4.0, seconds: 9.0, allreduce_seconds: 7.0 };
        let t = EpochSums::total(&[a, b], &a);
        assert_eq!(t, EpochSums { loss_sum: 1.75, correct: 4.0, samples: 8.0, seconds: 2.0, allreduce_seconds: 0.5 });
        assert_eq!(EpochSums::from_array(b.to_array()), b);
    }
}
