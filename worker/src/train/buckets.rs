//! Flat bucket buffers that hold every trainable parameter and its gradient.
//!
//! Each parameter's data and its `.grad` are views into one flat f32 buffer each (values,
//! gradients), and a bucket is a consecutive part of those buffers: the design of PyTorch
//! DDP's `gradient_as_bucket_view` extended to the parameters themselves, as fused/flat
//! optimizers do. The per-step bookkeeping is then a handful of kernels whatever the model
//! and the bucket count, instead of a few launches per parameter (ResNet-50 has 161
//! parameters) or per bucket:
//! - zeroing the gradients is one `zero_`;
//! - the all-reduce works on the gradient buckets in place: no pack or unpack copies;
//! - averaging or unscaling the gradients is one pass, and the SGD update
//!   ([`super::sgd`]) four kernels, over all parameters at once.
//!
//! A view keeps its parameter's strides, so channels_last weights stay NHWC and autograd
//! accumulates into them without a layout change. Gradients stay views because autograd's
//! `AccumulateGrad` adds into an already defined gradient in place (grad mode is off
//! during backward); they are never reset to undefined (no `zero_grad` of tch, whose
//! `detach_` is not allowed on views).
//!
//! Bucket boundaries fall between parameters (a view cannot straddle two buffers): a
//! bucket closes once the next parameter would take it past its capacity, and a parameter
//! larger than the capacity gets a bucket of its own. The layout is a pure function of the
//! parameter sizes in the order given ([`plan`]), so every rank derives the same buckets.

use crate::collective::{Collective, CollectiveError};
use std::ops::Range;
use tch::{Device, Kind, TchError, Tensor};

/// Bucket capacity in f32 elements: 25 MB, PyTorch DDP's default `bucket_cap_mb` (the trainer uses the
/// job's `--bucket-cap-mb`, `cvdist_common::spec::bucket_cap_mb`; this is for tools and tests).
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("parameter {name:?} cannot live in a flat f32 bucket: {why}")]
    Unsupported { name: String, why: String },
    #[error("bucket order is not a permutation of the parameters: {0}")]
    Order(String),
    #[error("libtorch refused to make the gradient of {name:?} a view into its bucket")]
    SetGrad { name: String },
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

/// Splits parameters of `sizes` elements (in the order given) into consecutive buckets:
/// the first holds up to `first_cap` elements, every later one up to `cap` (PyTorch DDP
/// uses a small first bucket so the first all-reduce can start early in backward). A
/// parameter larger than the capacity gets a bucket of its own; no bucket is empty.
/// Returns the index range of each bucket.
pub fn plan(sizes: &[usize], first_cap: usize, cap: usize) -> Vec<Range<usize>> {
    let mut buckets = Vec::new();
    let (mut start, mut filled) = (0usize, 0usize);
    for (i, &n) in sizes.iter().enumerate() {
        let limit = if buckets.is_empty() { first_cap } else { cap };
        if i > start && filled + n > limit {
            buckets.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if start < sizes.len() {
        buckets.push(start..sizes.len());
    }
    buckets
}

/// Whether a tensor of `size` and `stride` covers exactly `numel` consecutive elements
/// (no gaps, no overlap), in any dimension order: true for contiguous and channels_last
/// tensors. Dimensions of size 1 may carry any stride.
pub fn is_dense(size: &[i64], stride: &[i64]) -> bool {
    let mut dims: Vec<(i64, i64)> = size.iter().zip(stride).filter(|(&s, _)| s != 1).map(|(&s, &t)| (t, s)).collect();
    dims.sort_unstable();
    let mut expected = 1i64;
    for (stride, size) in dims {
        if stride != expected {
            return false;
        }
        expected *= size;
    }
    true
}

unsafe extern "C" {
    fn cvdist_set_grad(param: *mut torch_sys::C_tensor, grad: *const torch_sys::C_tensor) -> i32;
}

/// Where one parameter lives.
struct Slot {
    bucket: usize,
    /// Offset of its first element in the flat buffers (all buckets together).
    offset: i64,
    numel: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// The flat buffers of a model's trainable parameters (see the module docs).
pub struct Buckets {
    /// Every parameter's value, flat f32 on their device, bucket after bucket.
    all_values: Tensor,
    /// Their gradients, laid out like `all_values`, with one extra trailing element that
    /// is no parameter's: the rank's divergence flag rides the last bucket's all-reduce
    /// in it.
    all_grads: Tensor,
    /// Per bucket: its part of `all_values`.
    values: Vec<Tensor>,
    /// Per bucket: its part of `all_grads` (the last one with the flag slot).
    grads: Vec<Tensor>,
    /// Per bucket: elements of its parameters (without the trailing slot).
    numels: Vec<i64>,
    /// Per parameter, in the order of the `params` given to [`Buckets::new`].
    slots: Vec<Slot>,
    /// Per bucket: the indices of its parameters, in their order in the bucket.
    order: Vec<Vec<usize>>,
}

impl Buckets {
    /// Moves every parameter of `params` into flat buckets planned by [`plan`] in the
    /// order given: its values are copied into its bucket and its data and `.grad`
    /// become views there (existing gradient values are discarded: they start at zero).
    /// Every handle to a parameter (the model's layers, the VarStore) sees the change,
    /// since the tensor itself is re-pointed (`set_data`).
    ///
    /// Errors: a parameter that is not f32, not dense (see [`is_dense`]) or on another
    /// device than the first one; libtorch refusing the gradient view.
    pub fn new(params: &[(String, Tensor)], first_cap: usize, cap: usize) -> Result<Buckets, BucketError> {
        let order: Vec<usize> = (0..params.len()).collect();
        Buckets::in_order(params, &order, first_cap, cap)
    }

    /// As [`Buckets::new`], but the buckets are planned over the parameters in `order`
    /// (indices into `params`; the trainer passes the order in which backward makes the
    /// gradients ready, so the first bucket is complete first). Parameter `i` stays
    /// parameter `i` for [`Buckets::bucket_of`] and [`Buckets::param_view`].
    ///
    /// Errors: as [`Buckets::new`], and [`BucketError::Order`] when `order` is not a
    /// permutation of `0..params.len()`.
    pub fn in_order(
        params: &[(String, Tensor)],
        order: &[usize],
        first_cap: usize,
        cap: usize,
    ) -> Result<Buckets, BucketError> {
        let mut seen = vec![false; params.len()];
        for &i in order {
            match seen.get_mut(i) {
                Some(s) if !*s => *s = true,
                _ => return Err(BucketError::Order(format!("index {i} repeated or out of 0..{}", params.len()))),
            }
        }
        if order.len() != params.len() {
            return Err(BucketError::Order(format!("{} indices for {} parameters", order.len(), params.len())));
        }
        let device = params.first().map(|(_, p)| p.device()).unwrap_or(Device::Cpu);
        for (name, p) in params {
            let why = if p.kind() != Kind::Float {
                Some(format!("its dtype is {:?}, not f32", p.kind()))
            } else if p.device() != device {
                Some(format!("it is on {:?} while the first parameter is on {device:?}", p.device()))
            } else if !is_dense(&p.size(), &p.stride()) {
                Some(format!("its strides {:?} leave gaps for size {:?}", p.stride(), p.size()))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(BucketError::Unsupported { name: name.clone(), why });
            }
        }
        let sizes: Vec<usize> = order.iter().map(|&i| params[i].1.numel()).collect();
        let ranges = plan(&sizes, first_cap, cap);
        let total: i64 = sizes.iter().map(|&n| n as i64).sum();
        let all_values = Tensor::f_zeros([total], (Kind::Float, device))?;
        let all_grads = Tensor::f_zeros([total + 1], (Kind::Float, device))?;
        let mut buckets = Buckets {
            all_values,
            all_grads,
            values: Vec::new(),
            grads: Vec::new(),
            numels: Vec::new(),
            slots: Vec::new(),
            order: Vec::new(),
        };
        let mut slots: Vec<Option<Slot>> = (0..params.len()).map(|_| None).collect();
        let mut offset = 0i64;
        for (b, range) in ranges.iter().enumerate() {
            let numel: i64 = sizes[range.clone()].iter().map(|&n| n as i64).sum();
            let tail = i64::from(b + 1 == ranges.len());
            buckets.values.push(buckets.all_values.f_narrow(0, offset, numel)?);
            buckets.grads.push(buckets.all_grads.f_narrow(0, offset, numel + tail)?);
            buckets.numels.push(numel);
            buckets.order.push(order[range.clone()].to_vec());
            for &i in &order[range.clone()] {
                let (name, p) = &params[i];
                let slot = Slot { bucket: b, offset, numel: p.numel() as i64, size: p.size(), stride: p.stride() };
                let value = buckets.view(&buckets.all_values, &slot)?;
                let grad = buckets.view(&buckets.all_grads, &slot)?;
                tch::no_grad(|| value.shallow_clone().f_copy_(p))?;
                let mut handle = p.shallow_clone();
                handle.set_data(&value);
                // SAFETY: both pointers are live `at::Tensor`s owned by tch handles that
                // outlive the call; the shim copies the grad handle and catches exceptions.
                let rc = unsafe { cvdist_set_grad(handle.as_mut_ptr(), grad.as_ptr()) };
                if rc != 0 {
                    return Err(BucketError::SetGrad { name: name.clone() });
                }
                offset += slot.numel;
                slots[i] = Some(slot);
            }
        }
        // Every index was placed exactly once: `order` is a permutation (checked above)
        // and `plan` covers it.
        buckets.slots = slots.into_iter().flatten().collect();
        Ok(buckets)
    }

    /// The part of `buffer` (the flat values or gradients, or a buffer laid out like them)
    /// that holds `slot`'s parameter, with the parameter's shape and strides.
    fn view(&self, buffer: &Tensor, slot: &Slot) -> Result<Tensor, TchError> {
        buffer.f_narrow(0, slot.offset, slot.numel)?.f_as_strided(slot.size.as_slice(), slot.stride.as_slice(), None)
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no parameters at all.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Elements of each bucket's parameters (without the trailing flag slot).
    pub fn numels(&self) -> &[i64] {
        &self.numels
    }

    /// Bucket `b`'s parameter values, flat.
    pub fn values(&self, b: usize) -> Tensor {
        self.values[b].shallow_clone()
    }

    /// Bucket `b`'s gradients, flat, without the trailing flag slot.
    pub fn grads(&self, b: usize) -> Tensor {
        self.grads[b].narrow(0, 0, self.numels[b])
    }

    /// The whole gradient buffers, flag slot included: what the all-reduce sums.
    pub fn reduce_buffers(&mut self) -> &mut [Tensor] {
        &mut self.grads
    }

    /// Bucket `b`'s whole gradient buffer (flag slot included): what the all-reduce sums.
    pub fn reduce_buffer(&self, b: usize) -> Tensor {
        self.grads[b].shallow_clone()
    }

    /// The one-element view that carries the divergence flag (after the last gradient).
    pub fn flag_slot(&self) -> Option<Tensor> {
        let last = self.grads.len().checked_sub(1)?;
        Some(self.grads[last].narrow(0, self.numels[last], 1))
    }

    /// Every parameter's value, flat (all buckets together): one tensor for whole-model
    /// elementwise work such as the SGD update.
    pub fn all_values(&self) -> Tensor {
        self.all_values.shallow_clone()
    }

    /// Every gradient, flat (all buckets together), without the trailing flag slot.
    pub fn all_grads(&self) -> Tensor {
        self.all_grads.narrow(0, 0, self.all_values.numel() as i64)
    }

    /// Zeroes every gradient (and the flag slot): one kernel.
    pub fn zero_grads(&mut self) {
        tch::no_grad(|| {
            let _ = self.all_grads.zero_();
        });
    }

    /// Parameter `i`'s part of `flat`, a buffer laid out like [`Buckets::all_values`] (the
    /// optimizer's momentum), with the parameter's shape and strides.
    pub fn param_view(&self, flat: &Tensor, i: usize) -> Result<Tensor, TchError> {
        self.view(flat, &self.slots[i])
    }

    /// The bucket parameter `i` lives in.
    pub fn bucket_of(&self, i: usize) -> usize {
        self.slots[i].bucket
    }

    /// The indices of bucket `b`'s parameters, in their order inside the bucket.
    pub fn params_of(&self, b: usize) -> &[usize] {
        &self.order[b]
    }

    /// A number that differs, with high probability, between two different layouts
    /// (which parameter sits where, and the bucket sizes): the ranks compare it before
    /// training, since summing buckets laid out differently would mix parameters.
    pub fn layout_fingerprint(&self) -> u32 {
        // FNV-1a over the layout; a check, not a security boundary.
        let mut h: u32 = 0x811c_9dc5;
        let mut mix = |v: u64| {
            for byte in v.to_le_bytes() {
                h ^= u32::from(byte);
                h = h.wrapping_mul(0x0100_0193);
            }
        };
        for (b, params) in self.order.iter().enumerate() {
            mix(self.numels[b] as u64);
            for &i in params {
                mix(i as u64);
            }
        }
        h
    }
}

/// Fails with [`CollectiveError::Config`] unless every rank planned the same gradient
/// buckets (same parameters in the same places): reducing differently laid out buckets
/// would silently add unrelated gradients. The 32-bit fingerprint travels as four 8-bit
/// pieces together with their squares; the f32 sums are exact (world ≤ 256), and the
/// sums of x and x² equal world·x and world·x² for every rank's x only when all agree.
pub fn check_same_layout(buckets: &Buckets, comm: &mut dyn Collective) -> Result<(), CollectiveError> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    let fp = buckets.layout_fingerprint();
    let pieces: Vec<f32> = (0..4).map(|k| ((fp >> (8 * k)) & 0xff) as f32).collect();
    let mut buf: Vec<f32> = pieces.iter().copied().chain(pieces.iter().map(|x| x * x)).collect();
    let want: Vec<f32> = buf.iter().map(|x| x * world as f32).collect();
    comm.all_reduce_sum(&mut buf)?;
    if buf != want {
        return Err(CollectiveError::Config(format!(
            "the ranks planned different gradient buckets (rank {} layout {fp:08x}); every rank must run the same \
             model and cvdist version",
            comm.rank()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_closes_a_bucket_before_it_overflows_and_gives_big_parameters_their_own() {
        assert_eq!(plan(&[], 4, 10), Vec::<Range<usize>>::new());
        assert_eq!(plan(&[3, 3, 3, 3], 100, 100), vec![0..4]);
        // First bucket 4 elements, later ones 10.
        assert_eq!(plan(&[3, 3, 4, 5, 2, 20, 1], 4, 10), vec![0..1, 1..3, 3..5, 5..6, 6..7]);
        assert_eq!(plan(&[7, 1], 4, 10), vec![0..1, 1..2]);
        // Exactly at capacity stays in the bucket.
        assert_eq!(plan(&[5, 5, 5, 5], 10, 10), vec![0..2, 2..4]);
        for sizes in [vec![1usize; 17], vec![9, 2, 30, 1, 1, 8], vec![100]] {
            let buckets = plan(&sizes, 6, 12);
            let covered: Vec<usize> = buckets.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(covered, (0..sizes.len()).collect::<Vec<_>>(), "every parameter once, in order");
            assert!(buckets.iter().all(|r| !r.is_empty()));
        }
    }

    /// Every bucket's values and gradients, and every parameter and its `.grad`, are parts
    /// of one flat buffer each, in bucket order: a whole-model operation is one kernel.
    #[test]
    fn buckets_are_consecutive_parts_of_one_flat_buffer_each() {
        let p = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![("a".to_string(), p(3)), ("b".into(), p(5)), ("c".into(), p(2)), ("d".into(), p(4))];
        let buckets = Buckets::in_order(&params, &[3, 2, 1, 0], 4, 7).unwrap();
        assert_eq!(buckets.len(), 3);
        let f32_at = |base: &Tensor, t: &Tensor| (t.data_ptr() as usize - base.data_ptr() as usize) / 4;
        let (values, grads) = (buckets.all_values(), buckets.all_grads());
        assert_eq!((values.numel(), grads.numel()), (14, 14));
        let mut start = 0;
        for b in 0..buckets.len() {
            assert_eq!(f32_at(&values, &buckets.values(b)), start, "bucket {b} values");
            assert_eq!(f32_at(&grads, &buckets.grads(b)), start, "bucket {b} grads");
            start += buckets.numels()[b] as usize;
        }
        assert_eq!(start, 14);
        // Parameter d (placed first) starts the buffers; a, placed last, ends them.
        assert_eq!(f32_at(&values, &params[3].1), 0);
        assert_eq!(f32_at(&values, &params[0].1), 11);
        assert_eq!(f32_at(&grads, &params[0].1.grad()), 11);
        // One write through the flat buffer reaches every parameter; one zero every grad.
        let _ = tch::no_grad(|| values.shallow_clone().fill_(2.0));
        assert!(params.iter().all(|(_, t)| Vec::<f32>::try_from(t).unwrap().iter().all(|&x| x == 2.0)));
        let _ = tch::no_grad(|| buckets.all_grads().fill_(1.0));
        let mut buckets = buckets;
        buckets.zero_grads();
        assert!(params.iter().all(|(_, t)| Vec::<f32>::try_from(t.grad()).unwrap().iter().all(|&x| x == 0.0)));
        assert_eq!(buckets.flag_slot().unwrap().double_value(&[0]), 0.0, "the flag slot is zeroed too");
    }

    /// Buckets planned over a given order: parameter indices keep their meaning, the
    /// layout follows the order, and a non-permutation is refused.
    #[test]
    fn buckets_follow_the_given_order() {
        let p = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![("a".to_string(), p(3)), ("b".into(), p(5)), ("c".into(), p(2))];
        let buckets = Buckets::in_order(&params, &[2, 0, 1], 5, 5).unwrap();
        assert_eq!(buckets.len(), 2);
        assert_eq!(buckets.params_of(0), &[2, 0]);
        assert_eq!(buckets.params_of(1), &[1]);
        assert_eq!((buckets.bucket_of(0), buckets.bucket_of(1), buckets.bucket_of(2)), (0, 1, 0));
        assert_eq!(buckets.numels(), &[5, 5]);
        tch::no_grad(|| buckets.values(0).copy_(&Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0])));
        assert_eq!(Vec::<f32>::try_from(&params[2].1).unwrap(), vec![1.0, 2.0], "c first in bucket 0");
        assert_eq!(Vec::<f32>::try_from(&params[0].1).unwrap(), vec![3.0, 4.0, 5.0]);
        let same = Buckets::in_order(&params, &[2, 0, 1], 5, 5).unwrap();
        assert_eq!(same.layout_fingerprint(), buckets.layout_fingerprint());
        let other = Buckets::in_order(&params, &[0, 2, 1], 5, 5).unwrap();
        assert_ne!(other.layout_fingerprint(), buckets.layout_fingerprint());
        for bad in [&[0usize, 0, 1][..], &[0, 1], &[0, 1, 3]] {
            assert!(matches!(Buckets::in_order(&params, bad, 5, 5), Err(BucketError::Order(_))), "{bad:?}");
        }
    }

    #[test]
    fn dense_covers_contiguous_and_channels_last_but_not_slices() {
        assert!(is_dense(&[2, 3, 4, 5], &[60, 20, 5, 1]));
        assert!(is_dense(&[2, 3, 4, 5], &[60, 1, 15, 3]), "channels_last");
        assert!(is_dense(&[10], &[1]));
        assert!(is_dense(&[1, 3], &[99, 1]), "size-1 dims may carry any stride");
        assert!(!is_dense(&[10], &[2]));
        assert!(!is_dense(&[2, 3], &[4, 1]));
    }

    /// Values are kept, every handle sees the bucket, backward accumulates into the
    /// bucket in place, and zeroing one bucket zeroes every gradient in it.
    #[test]
    fn parameters_and_gradients_become_views_into_their_buckets() {
        let a = Tensor::linspace(-1.0, 1.0, 24, (Kind::Float, Device::Cpu)).view([2, 3, 2, 2]);
        let nhwc = a.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]).set_requires_grad(true);
        let b = Tensor::from_slice(&[5.0f32, 6.0, 7.0]).set_requires_grad(true);
        let c = Tensor::from_slice(&[0.5f32; 10]).set_requires_grad(true);
        let params = vec![
            ("a".to_string(), nhwc.shallow_clone()),
            ("b".into(), b.shallow_clone()),
            ("c".into(), c.shallow_clone()),
        ];
        let before: Vec<Vec<f32>> =
            params.iter().map(|(_, p)| Vec::<f32>::try_from(p.contiguous().view([-1])).unwrap()).collect();
        let mut buckets = Buckets::new(&params, 27, 27).unwrap();
        assert_eq!(buckets.len(), 2);
        assert_eq!(buckets.numels(), &[27, 10]);
        for ((_, p), want) in params.iter().zip(&before) {
            assert_eq!(&Vec::<f32>::try_from(p.contiguous().view([-1])).unwrap(), want, "values kept");
        }
        assert_eq!(nhwc.stride(), vec![12, 1, 6, 3], "channels_last strides kept");
        // The parameter is the bucket: writing the bucket shows through the handle.
        let _ = tch::no_grad(|| buckets.values(0).narrow(0, 24, 3).fill_(1.5));
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![1.5; 3]);

        for round in 1..=2 {
            buckets.zero_grads();
            let loss = (&nhwc * 2.0).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float) + (&c * 4.0).sum(Kind::Float);
            loss.backward();
            let g0 = Vec::<f32>::try_from(buckets.grads(0)).unwrap();
            assert_eq!(g0, [vec![2.0; 24], vec![3.0; 3]].concat(), "round {round}: gradients in the bucket");
            assert_eq!(Vec::<f32>::try_from(buckets.grads(1)).unwrap(), vec![4.0; 10]);
            assert_eq!(nhwc.grad().stride(), nhwc.stride(), "the gradient keeps the parameter's layout");
        }
        assert_eq!(buckets.flag_slot().unwrap().size(), vec![1]);
        let err = Buckets::new(&[("d".into(), Tensor::zeros([3], (Kind::Double, Device::Cpu)))], 8, 8);
        assert!(matches!(err, Err(BucketError::Unsupported { .. })));
    }
}
