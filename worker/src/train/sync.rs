//! Keeping ranks consistent: gradient averaging every step, the initial weight broadcast,
//! and BatchNorm running statistics before evaluation and checkpoints.
//!
//! Gradients already live in flat bucket buffers of `--bucket-cap-mb` ([`super::buckets`]): the
//! all-reduce sums each bucket in place, with no pack or unpack copy. The last bucket's
//! trailing slot carries each rank's divergence flag through the same all-reduce, and
//! under fp16 the loss scaler checks and unscales the buckets with one fused call each.

use super::buckets::Buckets;
use super::divergence;
use super::overlap::Overlap;
use super::scaler::GradScaler;
use crate::collective::{Collective, CollectiveError};
use tch::{Device, Kind, Tensor};

/// Reduces a step's gradients over the ranks (see [`GradSync::reduce`]).
#[derive(Default)]
pub struct GradSync {
    /// Set when the buckets are all-reduced during backward by the comm thread
    /// ([`super::overlap`]); otherwise they are all-reduced here, after backward.
    overlap: Option<Overlap>,
}

/// What one step's gradient reduction found, identical on every rank.
#[derive(Debug)]
pub struct Reduced {
    /// Seconds spent in the all-reduce itself.
    pub wire: f64,
    /// False when the loss scaler found an overflow: the step must be skipped.
    pub apply: bool,
    /// The summed divergence flag, one f32 on the device (not read back): 0 when every
    /// rank's loss was finite, non-finite (the sum of the non-finite losses) when some
    /// rank's was not; the same on every rank. It may be a view of the gradient buffer,
    /// so it must be consumed (by kernels enqueued) before the next step zeroes that
    /// ([`super::divergence::DivergenceRecord::record`] does).
    pub flag: Tensor,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl GradSync {
    pub fn new() -> GradSync {
        GradSync::default()
    }

    /// Reduces with the all-reduce overlapped with backward: the gradient-ready hooks
    /// hand complete buckets to the comm thread during backward, and
    /// [`GradSync::reduce`] only hands over the rest and waits for the tail. The `comm`
    /// passed to `reduce` must be that comm thread's proxy (or one with the same world).
    pub fn overlapped(overlap: Overlap) -> GradSync {
        GradSync { overlap: Some(overlap) }
    }

    /// The overlapped reduction's state, when there is one.
    pub fn overlap(&self) -> Option<&Overlap> {
        self.overlap.as_ref()
    }

    /// Replaces every gradient in `buckets` by its mean over the ranks, unscales it when
    /// `scaler` is given (one fused check over all of them), and agrees over the ranks whether
    /// any rank's `loss` (the step's mean loss, a tensor on the device) was non-finite —
    /// all in the one all-reduce the step already does: the flag slot after the last
    /// gradient holds this rank's loss if it is non-finite and 0 otherwise, so the sum is
    /// non-finite exactly when some rank diverged. The flag is filled and the sum returned
    /// on the device: nothing is read back here (the trainer checks it lazily,
    /// `super::divergence`), except the scaler's skip decision under fp16.
    pub fn reduce(
        &mut self,
        buckets: &mut Buckets,
        comm: &mut dyn Collective,
        loss: &Tensor,
        scaler: Option<&mut GradScaler>,
    ) -> Result<Reduced, SyncError> {
        let world = comm.world_size();
        let flag = divergence::flag_of(loss)?;
        let (Some(mut flag_slot), false) = (buckets.flag_slot(), world == 1 && scaler.is_none()) else {
            return Ok(Reduced { wire: 0.0, apply: true, flag });
        };
        tch::no_grad(|| flag_slot.f_copy_(&flag))?;
        let start = std::time::Instant::now();
        let mut wire = 0.0;
        if let (Some(overlap), true) = (&self.overlap, world > 1) {
            // Overlapped with backward: the buckets backward completed are already reduced
            // or in flight; parameters without a gradient count as ready with zeros, the flag
            // slot just filled releases the last bucket, and only the tail is waited for.
            overlap.end_backward();
            overlap.flag_ready();
            wire = overlap.wait()?;
        } else if world > 1 {
            for bucket in buckets.reduce_buffers() {
                comm.reduce_tensor_sum(bucket)?;
            }
            // Waits for the device collectives (host ones return complete) so `wire` measures
            // the reduction; bounded, because the communicator's watchdog ends the wait with
            // an error when a peer is dead or stalled, where a device sync would block forever.
            comm.wait()?;
            wire = start.elapsed().as_secs_f64();
        }

        // The buckets are parts of one flat buffer: unscaling or averaging is one pass
        // over all gradients, whatever the number of buckets.
        let mut grads = buckets.all_grads();
        let apply = match scaler {
            Some(scaler) => {
                scaler.unscale(&mut grads, 1.0 / world as f64)?;
                scaler.update()?
            }
            None => {
                let _ = tch::no_grad(|| grads.f_mul_scalar_(1.0 / world as f64))?;
                true
            }
        };
        Ok(Reduced { wire, apply, flag: flag_slot })
    }
}

/// Views a contiguous CPU f32 tensor's storage as a slice.
fn host_slice(t: &mut Tensor, numel: usize) -> &mut [f32] {
    assert!(t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    assert_eq!(t.numel(), numel);
    // FFI, not a byte cast: the memory is libtorch's, reached only through a raw pointer, so
    // `bytemuck` (which casts between Rust slices) cannot express this view.
    // SAFETY: the tensor is a contiguous CPU float tensor of `numel` elements that we own
    // exclusively for the lifetime of the returned borrow (`&mut Tensor`).
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, numel) }
}

/// Runs `op` over the named tensors packed into one host buffer, then writes the result back.
fn through_host(
    tensors: &[(String, Tensor)],
    op: impl FnOnce(&mut [f32]) -> Result<(), CollectiveError>,
) -> Result<(), CollectiveError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let flats: Vec<Tensor> =
        tensors.iter().map(|(_, t)| t.detach().reshape([-1]).to_device(Device::Cpu).to_kind(Kind::Float)).collect();
    let mut flat = Tensor::cat(&flats, 0).contiguous();
    let numel = flat.numel();
    op(host_slice(&mut flat, numel))?;
    tch::no_grad(|| {
        let mut offset = 0i64;
        for (_, t) in tensors {
            let n = t.numel() as i64;
            let src = flat.narrow(0, offset, n).view_as(t).to_kind(t.kind()).to_device(t.device());
            let mut dst = t.shallow_clone();
            dst.copy_(&src);
            offset += n;
        }
    });
    Ok(())
}

/// Makes every rank hold rank 0's values (weights and buffers at the start of a job).
pub fn broadcast_from_root(tensors: &[(String, Tensor)], comm: &mut dyn Collective) -> Result<(), CollectiveError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    through_host(tensors, |buf| comm.broadcast(buf, 0))
}

/// Averages BatchNorm running statistics over the ranks. Each rank's statistics only saw
/// its own shard; the average is what a single worker over all the data would estimate
/// (exactly so for the means). Called at the same points on every rank — before evaluation
/// and before every checkpoint — so an interrupted and an uninterrupted run stay identical.
pub fn average_running_stats(buffers: &[(String, Tensor)], comm: &mut dyn Collective) -> Result<(), CollectiveError> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    through_host(buffers, |buf| {
        comm.all_reduce_sum(buf)?;
        let inv = 1.0 / world as f32;
        buf.iter_mut().for_each(|x| *x *= inv);
        Ok(())
    })
}

/// Sums small metric vectors (loss sum, correct, count) over the ranks.
pub fn sum_metrics(values: &mut [f64], comm: &mut dyn Collective) -> Result<(), CollectiveError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    // f32 on the wire is exact for counts up to 2^24 per value; losses tolerate the rounding.
    let mut buf: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    comm.all_reduce_sum(&mut buf)?;
    for (v, b) in values.iter_mut().zip(buf) {
        *v = b as f64;
    }
    Ok(())
}

/// Every rank's `values`, by rank, exactly (bit for bit) on every rank. Every rank must
/// pass the same number of values.
///
/// The collectives only sum f32. Each f64 is cut into four 16-bit pieces, each held
/// exactly by an f32; every rank fills only its own slots and leaves the others 0.0, so
/// the sum is exact (x + 0 = x) whatever the reduction order. Used for the per-rank
/// partial-epoch sums a checkpoint carries: rounding them would make a resumed epoch's
/// totals differ from the uninterrupted run's.
pub fn gather_f64(values: &[f64], comm: &mut dyn Collective) -> Result<Vec<Vec<f64>>, CollectiveError> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(vec![values.to_vec()]);
    }
    let mut buf = pack_f64(values, comm.rank(), world);
    comm.all_reduce_sum(&mut buf)?;
    Ok(unpack_f64(&buf, world))
}

const PIECES: usize = 4;

/// `values` in rank `rank`'s slots of a buffer for `world` ranks, 16 bits per f32.
fn pack_f64(values: &[f64], rank: usize, world: usize) -> Vec<f32> {
    let per_rank = values.len() * PIECES;
    let mut buf = vec![0f32; world * per_rank];
    for (v, slot) in values.iter().zip(buf[rank * per_rank..].chunks_mut(PIECES)) {
        let bits = v.to_bits();
        for (k, piece) in slot.iter_mut().enumerate() {
            *piece = ((bits >> (16 * k)) & 0xffff) as f32;
        }
    }
    buf
}

fn unpack_f64(buf: &[f32], world: usize) -> Vec<Vec<f64>> {
    let per_rank = buf.len() / world.max(1);
    buf.chunks(per_rank.max(1))
        .map(|rank| {
            rank.chunks(PIECES)
                .map(|slot| {
                    let bits =
                        slot.iter().enumerate().fold(0u64, |acc, (k, &p)| acc | ((p as u64 & 0xffff) << (16 * k)));
                    f64::from_bits(bits)
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks' packed buffers summed as the ring sums them (f32 adds) unpack to each
    /// rank's exact values, including ones f32 cannot hold.
    #[test]
    fn gathered_f64_values_are_bit_exact() {
        let a = [1.742447123456789e3, -0.0, f64::MIN_POSITIVE, 1.0 / 3.0, 123456789.125];
        let b = [2.0f64.powi(60) + 1.0, 1e-300, -7.25, f64::MAX, 0.1];
        let mut sum = pack_f64(&a, 0, 2);
        for (s, x) in sum.iter_mut().zip(pack_f64(&b, 1, 2)) {
            *s += x;
        }
        let got = unpack_f64(&sum, 2);
        assert_eq!(got.len(), 2);
        for (want, have) in [a, b].iter().zip(&got) {
            assert_eq!(
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                have.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
