//! Reduction audit (`CVDIST_AUDIT_REDUCTIONS=STEPS`): checks, on a real job, that every
//! rank's gradient all-reduce produced the sum of what the ranks sent, within the
//! rounding the gradient wire allows, and the same values on every rank.
//!
//! It exists for the cases a test cannot reach: a new GPU type, driver, NCCL version or
//! network, where a reduction that silently corrupts gradients (a stream-ordering mistake
//! with the 16-bit wire, say) would only show as a worse final accuracy. For the first
//! STEPS steps of every attempt, the comm thread copies each gradient bucket just before
//! its all-reduce starts (on the device, in stream order); once the step's buckets are
//! finished it all-reduces the copies again, exactly in f32, with their magnitudes, and
//! compares element by element:
//!
//! |reduced − Σ_r sent_r| ≤ 2·N·u·Σ_r |sent_r| + N²·2^-25 (fp16 only),
//!
//! with u the unit roundoff of the wire (2^-8 bf16, 2^-11 fp16, 2^-23 f32 for a different
//! summation order) and N the world size: each of the N terms and N partial sums is
//! rounded at most once (docs/RELIABILITY.md, "The 16-bit gradient wire"); fp16 also loses what
//! falls below 2^-25 after the division by N. Then every rank's result must equal rank
//! 0's up to f32 rounding of the check itself. A non-finite value (an fp16 loss scale
//! that overflowed) must reach every rank's result, since the loss scaler decides on it: a
//! non-finite exact sum requires a non-finite result; a non-finite result is accepted only
//! there, or where the fp16 wire's range (65504 after the division by N) was exceeded.
//! Each audited step logs one
//! `reduction audit` line; a violation fails the attempt with the worst element named.
//! Audited steps read back from the device (a host wait each): leave it off for timing.

use crate::collective::{Collective, CollectiveError, GradCompression};
use tch::{Kind, Tensor};
use tracing::info;

/// Environment variable: how many steps of each attempt to audit (absent or 0: none).
pub const ENV: &str = "CVDIST_AUDIT_REDUCTIONS";

/// The largest finite IEEE 754 binary16 value.
const F16_MAX: f64 = 65504.0;

/// One step's buckets: what this rank sent, and the buckets reduced in place.
pub struct ReductionAudit {
    steps_left: u64,
    step: u64,
    sent: Vec<(Tensor, Tensor)>,
}

impl ReductionAudit {
    /// The audit `ENV` asks for, if any; an unparsable value is reported and ignored.
    pub fn from_env() -> Option<ReductionAudit> {
        let raw = std::env::var(ENV).ok()?;
        match raw.trim().parse::<u64>() {
            Ok(0) => None,
            Ok(steps) => Some(ReductionAudit::new(steps)),
            Err(_) => {
                tracing::warn!("{ENV}={raw:?} is not a number of steps; no reduction is audited");
                None
            }
        }
    }

    /// Audits the next `steps` steps.
    pub fn new(steps: u64) -> ReductionAudit {
        ReductionAudit { steps_left: steps, step: 0, sent: Vec::new() }
    }

    /// Whether the current step is audited.
    pub fn active(&self) -> bool {
        self.steps_left > 0
    }

    /// Records bucket `grad` as this rank sends it (call just before its all-reduce
    /// starts; the copy is ordered before it on the device).
    pub fn before(&mut self, grad: &Tensor) -> Result<(), CollectiveError> {
        if !self.active() {
            return Ok(());
        }
        let copy = grad.f_detach_copy().map_err(torch)?;
        self.sent.push((copy, grad.shallow_clone()));
        Ok(())
    }

    /// After the step's buckets are finished: compares each reduced bucket with the
    /// exact sum of what was sent (see the module docs), through `comm`. Errors: a
    /// collective failed, or a bound was exceeded ([`CollectiveError::Protocol`], naming
    /// the bucket, element, values and bound).
    pub fn after_step(&mut self, comm: &mut dyn Collective) -> Result<(), CollectiveError> {
        if !self.active() {
            return Ok(());
        }
        self.steps_left -= 1;
        let step = self.step;
        self.step += 1;
        let world = comm.world_size() as f64;
        let wire = comm.grad_compression();
        let unit = match wire {
            GradCompression::None => 2f64.powi(-23),
            GradCompression::Bf16 => 2f64.powi(-8),
            GradCompression::Fp16 => 2f64.powi(-11),
        };
        let floor = if wire == GradCompression::Fp16 { world * world * 2f64.powi(-25) } else { 0.0 };
        // Every collective first, then the checks: a rank that finds a violation must not
        // leave the others waiting in a collective it no longer issues.
        let host = |t: &Tensor| -> Result<Vec<f64>, CollectiveError> {
            let t = t.f_to_kind(Kind::Double).and_then(|t| t.f_to_device(tch::Device::Cpu)).map_err(torch)?;
            Vec::<f64>::try_from(&t).map_err(torch)
        };
        let mut buckets = Vec::new();
        for (sent, reduced) in std::mem::take(&mut self.sent) {
            // A copy: the bound needs every rank's own |x|, which an in-place sum overwrites.
            let mut exact = sent.f_detach_copy().map_err(torch)?;
            comm.reduce_tensor_sum_exact(&mut exact)?;
            let mut magnitude = sent.f_abs().map_err(torch)?;
            comm.reduce_tensor_sum_exact(&mut magnitude)?;
            // Every rank's result, summed: N times this rank's when all agree.
            let mut all = reduced.f_detach_copy().map_err(torch)?;
            comm.reduce_tensor_sum_exact(&mut all)?;
            buckets.push([host(&reduced)?, host(&exact)?, host(&magnitude)?, host(&all)?]);
        }
        let mut worst_ratio = 0.0f64;
        let mut values = 0usize;
        let mut non_finite = 0usize;
        for (b, [got, want, mag, all]) in buckets.iter().enumerate() {
            values += got.len();
            for i in 0..got.len() {
                if !(got[i].is_finite() && want[i].is_finite() && mag[i].is_finite()) {
                    let wire_overflow = wire == GradCompression::Fp16 && mag[i] / world > F16_MAX;
                    let ok =
                        if want[i].is_finite() { got[i].is_finite() || wire_overflow } else { !got[i].is_finite() };
                    if !ok {
                        return Err(CollectiveError::Protocol(format!(
                            "reduction audit failed at step {step}, bucket {b}, element {i} ({wire} wire, world size \
                             {world}): reduced {} where the exact sum is {} (overflow must reach every rank)",
                            got[i], want[i]
                        )));
                    }
                    non_finite += 1;
                    continue;
                }
                let bound = 2.0 * world * unit * mag[i] + floor;
                let err = (got[i] - want[i]).abs();
                // The check's own sum of N equal f32 values rounds at most N times.
                let same_bound = world * world * 2f64.powi(-23) * got[i].abs();
                let disagree = (all[i] - world * got[i]).abs();
                if !(err <= bound && disagree <= same_bound) {
                    return Err(CollectiveError::Protocol(format!(
                        "reduction audit failed at step {step}, bucket {b}, element {i} ({wire} wire, world size {world}): \
                         reduced {} where the exact sum is {} (bound {bound:e}); the ranks' results sum to {} where \
                         {world} equal results give {} (difference {disagree:e})",
                        got[i],
                        want[i],
                        all[i],
                        world * got[i]
                    )));
                }
                if bound > 0.0 {
                    worst_ratio = worst_ratio.max(err / bound);
                }
            }
        }
        info!(step, values, non_finite, wire = %wire, worst_error_over_bound = worst_ratio, "reduction audit: ok");
        Ok(())
    }
}

fn torch(e: tch::TchError) -> CollectiveError {
    CollectiveError::Protocol(format!("reduction audit: libtorch: {e}"))
}
