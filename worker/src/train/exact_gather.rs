//! Gathering every rank's f64 values exactly over collectives that only sum f32.
//!
//! Each f64 is cut into four 16-bit pieces of its bit pattern, each held exactly by an
//! f32 (an integer below 2^16). Every rank fills only its own slots of a buffer sized for
//! the whole group and leaves the others 0.0, so the all-reduce's sum adds only zeros to
//! each slot and is exact whatever the reduction order or wire; any f64 (non-finite,
//! signed zero, subnormal) comes back bit for bit. Used for what must not be rounded: the
//! partial-epoch sums a checkpoint or a kept live state carries (rounding them would make
//! a resumed epoch's totals differ from the uninterrupted run's) and the live-state
//! agreement's positions.
//!
//! The same packing is built on the host ([`gather_f64`]) and, for values that live on
//! the training device, on the device ([`pack_on_device`]), so a step that gathers them
//! reads nothing back.

use crate::collective::{Collective, CollectiveError};
use tch::{Device, Kind, TchError, Tensor};

/// f32 pieces per f64 value.
pub const PIECES: usize = 4;

/// Every rank's `values`, by rank, exactly (bit for bit) on every rank. Every rank must
/// pass the same number of values. One f32 all-reduce of `world × values.len() × 4`.
pub fn gather_f64(values: &[f64], comm: &mut dyn Collective) -> Result<Vec<Vec<f64>>, CollectiveError> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(vec![values.to_vec()]);
    }
    let mut buf = pack(values, comm.rank(), world);
    comm.all_reduce_sum(&mut buf)?;
    Ok(unpack(&buf, world))
}

/// `values` in rank `rank`'s slots of a buffer for `world` ranks, zero elsewhere.
pub fn pack(values: &[f64], rank: usize, world: usize) -> Vec<f32> {
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

/// [`pack`] on the device: `values` are 0-dim f64 tensors on `device`; the result is a
/// 1-D f32 tensor of `world × values.len() × 4` on `device`. Enqueues a few small kernels
/// and reads nothing back.
pub fn pack_on_device(values: &[&Tensor], rank: usize, world: usize, device: Device) -> Result<Tensor, TchError> {
    tch::no_grad(|| {
        let bits = Tensor::f_stack(values, 0)?.f_to_kind(Kind::Double)?.f_contiguous()?.f_view_dtype(Kind::Int64)?;
        let pieces = (0..PIECES)
            .map(|k| bits.f_bitwise_right_shift_tensor_scalar(16 * k as i64)?.f_bitwise_and(0xffff_i64))
            .collect::<Result<Vec<_>, _>>()?;
        let own = Tensor::f_stack(&pieces, 1)?.f_to_kind(Kind::Float)?.f_reshape([-1])?;
        let per_rank = own.numel() as i64;
        let buf = Tensor::f_zeros([world as i64 * per_rank], (Kind::Float, device))?;
        buf.f_narrow(0, rank as i64 * per_rank, per_rank)?.f_copy_(&own)?;
        Ok(buf)
    })
}

/// Every rank's values from a reduced [`pack`] buffer of `world` ranks, by rank.
pub fn unpack(buf: &[f32], world: usize) -> Vec<Vec<f64>> {
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

/// [`unpack`] of a reduced [`pack_on_device`] buffer (read back to the host).
pub fn unpack_tensor(t: &Tensor, world: usize) -> Result<Vec<Vec<f64>>, TchError> {
    let t = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
    let n = t.numel();
    let mut buf = vec![0f32; n];
    t.f_copy_data(&mut buf, n)?;
    Ok(unpack(&buf, world))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [f64; 5] = [1.742447123456789e3, -0.0, f64::MIN_POSITIVE, 1.0 / 3.0, 123_456_789.125];
    const B: [f64; 5] = [1.152_921_504_606_847e18, 1e-300, -7.25, f64::MAX, f64::NEG_INFINITY];

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Two ranks' packed buffers summed as the ring sums them (f32 adds) unpack to each
    /// rank's exact values, including ones f32 cannot hold.
    #[test]
    fn gathered_f64_values_are_bit_exact() {
        let mut sum = pack(&A, 0, 2);
        for (s, x) in sum.iter_mut().zip(pack(&B, 1, 2)) {
            *s += x;
        }
        let got = unpack(&sum, 2);
        assert_eq!(got.len(), 2);
        assert_eq!(bits(&got[0]), bits(&A));
        assert_eq!(bits(&got[1]), bits(&B));
    }

    /// The device packing is the host packing, value for value, so the two sides share
    /// one decoder; summed as a tensor all-reduce sums them, they unpack exactly.
    #[test]
    fn the_device_packing_equals_the_host_packing() {
        let on_device = |v: &[f64], rank| {
            let t: Vec<Tensor> = v.iter().map(|&x| Tensor::from(x)).collect();
            let refs: Vec<&Tensor> = t.iter().collect();
            pack_on_device(&refs, rank, 2, Device::Cpu).unwrap()
        };
        let (a, b) = (on_device(&A, 0), on_device(&B, 1));
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), pack(&A, 0, 2));
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), pack(&B, 1, 2));
        let got = unpack_tensor(&(a + b), 2).unwrap();
        assert_eq!(bits(&got[0]), bits(&A));
        assert_eq!(bits(&got[1]), bits(&B));
    }
}
