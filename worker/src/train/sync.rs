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

/// Copies consecutive pieces of the 1-D `flat` into `tensors`, each in its own shape,
/// kind and device: the inverse of flattening them in order and concatenating.
pub fn unflatten_into(tensors: &[&Tensor], flat: &Tensor) {
    tch::no_grad(|| {
        let mut offset = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            let src = flat.narrow(0, offset, n).view(t.size().as_slice()).to_kind(t.kind()).to_device(t.device());
            let mut dst = t.shallow_clone();
            dst.copy_(&src);
            offset += n;
        }
    });
}

/// Runs `op` over `tensors` packed into one host f32 buffer (f32 on the wire: weights,
/// momentum and running statistics are f32; `num_batches_tracked` counts stay exact below
/// 2^24), then writes the result back.
fn through_host(
    tensors: &[&Tensor],
    op: impl FnOnce(&mut [f32]) -> Result<(), CollectiveError>,
) -> Result<(), CollectiveError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let flats: Vec<Tensor> =
        tensors.iter().map(|t| t.detach().reshape([-1]).to_device(Device::Cpu).to_kind(Kind::Float)).collect();
    let flat = Tensor::cat(&flats, 0).contiguous();
    let numel = flat.numel();
    let mut host = vec![0f32; numel];
    flat.copy_data(&mut host, numel);
    op(&mut host)?;
    unflatten_into(tensors, &Tensor::from_slice(&host));
    Ok(())
}

/// Makes every rank's `tensors` equal rank `root`'s.
pub fn broadcast(tensors: &[&Tensor], comm: &mut dyn Collective, root: usize) -> Result<(), CollectiveError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    through_host(tensors, |buf| comm.broadcast(buf, root))
}

/// Makes every rank hold rank 0's values (weights and buffers at the start of a job).
pub fn broadcast_from_root(tensors: &[(String, Tensor)], comm: &mut dyn Collective) -> Result<(), CollectiveError> {
    broadcast(&tensors.iter().map(|(_, t)| t).collect::<Vec<_>>(), comm, 0)
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
    through_host(&buffers.iter().map(|(_, t)| t).collect::<Vec<_>>(), |buf| {
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
