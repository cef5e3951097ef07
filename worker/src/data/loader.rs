//! A prefetching batch loader: one background thread augments batches ahead of the model
//! and hands them over through a bounded channel, in order. For a CUDA run the batches are
//! in page-locked (pinned) host memory, so the trainer's copy to the device can be
//! asynchronous (`non_blocking`), as PyTorch's `DataLoader(pin_memory=True)` arranges.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use cvdist_common::cifar::{CifarSplit, IMAGE_BYTES, SIDE};
use tch::{Device, Tensor};

use super::augment::fill_batch;

/// Batches prepared ahead of the consumer (queued ones plus the one being built). A few
/// keep the model fed through jitter while bounding memory to a few MB; the producer is
/// far faster than training, so more would not help.
pub const PREFETCH: usize = 3;

/// One mini-batch on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, 32, 32]` f32, normalised (and augmented if asked).
    pub images: Tensor,
    /// `[B]` i64 class labels.
    pub labels: Tensor,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
    /// Position of this batch in the epoch, counting skipped batches (so it is the step
    /// number within the epoch).
    pub number: usize,
}

/// Iterator over the batches of one epoch. Dropping it stops the background thread.
pub struct Loader {
    rx: Option<Receiver<Batch>>,
    thread: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Loader {
    /// Loads `indices` of `split` (this rank's order for `epoch`, e.g. from
    /// `cvdist_common::sampler::rank_indices`) in batches of `batch_size`; the last batch
    /// may be smaller. The first `skip_batches` batches are skipped without being
    /// computed (resume mid-epoch); since augmentation depends only on
    /// `(seed, epoch, index)`, the remaining batches are identical to an uninterrupted run.
    ///
    /// # Panics
    /// If `batch_size` is 0 or an index is out of range for `split`: both mean the caller
    /// built its index list or job spec wrong, and checking here beats a panic on the
    /// background thread.
    pub fn new(
        split: Arc<CifarSplit>,
        indices: Vec<usize>,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        augment: bool,
        skip_batches: usize,
    ) -> Loader {
        Loader::for_device(Device::Cpu, split, indices, batch_size, seed, epoch, augment, skip_batches)
    }

    /// As [`Loader::new`], for batches that go to `device`: when that is a CUDA device, each
    /// batch is moved into page-locked memory on the loader thread (libtorch's caching
    /// pinned-memory allocator, which also keeps a block from reuse until the asynchronous
    /// copy that reads it has completed). Where pinning fails (no usable CUDA driver) the
    /// batch stays in ordinary memory and the copy is synchronous, which is only slower;
    /// a warning says so once per loader.
    #[allow(clippy::too_many_arguments)]
    pub fn for_device(
        device: Device,
        split: Arc<CifarSplit>,
        indices: Vec<usize>,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        augment: bool,
        skip_batches: usize,
    ) -> Loader {
        let pin = device.is_cuda().then_some(device);
        assert!(batch_size > 0, "batch size must be positive");
        if let Some(&bad) = indices.iter().find(|&&i| i >= split.len()) {
            panic!("sample index {bad} out of range for a split of {} samples", split.len());
        }
        let total = indices.len().div_ceil(batch_size);
        let first = skip_batches.min(total);
        let remaining = total - first;
        let (tx, rx) = sync_channel(PREFETCH - 1);
        let thread = std::thread::Builder::new()
            .name(format!("cifar-loader-e{epoch}"))
            .spawn(move || {
                let mut pin = pin;
                for (number, chunk) in indices.chunks(batch_size).enumerate().skip(first) {
                    let (images, labels) = new_batch_tensors(chunk.len());
                    // FFI, not a byte cast: the producer fills libtorch's own storage in
                    // place (no copy per batch); `bytemuck` cannot view a raw pointer.
                    // SAFETY: both tensors were just created by `new_batch_tensors`:
                    // contiguous CPU tensors of exactly these element counts and types,
                    // not shared with anything yet, and they outlive the slices.
                    let (image_buf, label_buf) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(images.data_ptr() as *mut f32, chunk.len() * IMAGE_BYTES),
                            std::slice::from_raw_parts_mut(labels.data_ptr() as *mut i64, chunk.len()),
                        )
                    };
                    fill_batch(&split, chunk, seed, epoch, augment, image_buf, label_buf);
                    let (images, labels) = match pin {
                        Some(device) => match pinned(&images, &labels, device) {
                            Ok(both) => both,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot pin the loader's batches; copying them to the device synchronously");
                                pin = None;
                                (images, labels)
                            }
                        },
                        None => (images, labels),
                    };
                    let batch = Batch { images, labels, indices: chunk.to_vec(), number };
                    if tx.send(batch).is_err() {
                        return; // the loader was dropped
                    }
                }
            })
            // Out of threads or memory: as fatal as a failed allocation.
            .unwrap_or_else(|e| panic!("cannot start the data loader thread: {e}"));
        Loader { rx: Some(rx), thread: Some(thread), remaining }
    }

    /// Batches still to come.
    pub fn remaining(&self) -> usize {
        self.remaining
    }
}

/// Uninitialised `[b, 3, 32, 32]` f32 and `[b]` i64 CPU tensors for the producer to fill
/// in place. `Tensor::empty` rather than `Tensor::from_slice`: the latter zero-fills
/// through libtorch's OpenMP pool, which, called from this second thread, contends with
/// the training thread's pool; on a loaded 2-core machine that made the loader ~20x slower.
fn new_batch_tensors(b: usize) -> (Tensor, Tensor) {
    let cpu = tch::Device::Cpu;
    let images = Tensor::empty([b as i64, 3, SIDE as i64, SIDE as i64], (tch::Kind::Float, cpu));
    let labels = Tensor::empty([b as i64], (tch::Kind::Int64, cpu));
    (images, labels)
}

/// Page-locked copies of a batch's tensors, for asynchronous copies to `device` (CUDA).
fn pinned(images: &Tensor, labels: &Tensor, device: Device) -> Result<(Tensor, Tensor), tch::TchError> {
    // `_pin_memory` rather than `pin_memory`: tch always passes a device, and
    // `pin_memory(device)` warns that the argument is deprecated.
    Ok((images.f_internal_pin_memory(device)?, labels.f_internal_pin_memory(device)?))
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.remaining == 0 {
            return None;
        }
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(batch) => {
                self.remaining -= 1;
                Some(batch)
            }
            Err(_) => {
                // The producer ended early, which only happens if it panicked: surface
                // that panic here rather than silently ending the epoch short.
                self.remaining = 0;
                if let Some(Err(panic)) = self.thread.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Loader {}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail, so it exits after at
        // most one more batch; joining keeps the thread from outliving the loader.
        drop(self.rx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::augment::{augment_into, augmentation_for};
    use cvdist_common::cifar::synthetic;
    use cvdist_common::sampler::rank_indices;

    fn images_of(batch: &Batch) -> Vec<f32> {
        Vec::<f32>::try_from(batch.images.flatten(0, -1)).unwrap()
    }

    #[test]
    fn yields_all_batches_in_order_with_partial_last() {
        let split = Arc::new(synthetic(50, 1));
        let indices = rank_indices(50, 1, 0, 3, 0);
        let loader = Loader::new(split.clone(), indices.clone(), 16, 3, 0, true, 0);
        assert_eq!(loader.len(), 4);
        let batches: Vec<Batch> = loader.collect();
        assert_eq!(batches.iter().map(|b| b.indices.len()).collect::<Vec<_>>(), vec![16, 16, 16, 2]);
        assert_eq!(batches.iter().map(|b| b.number).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        let all: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(all, indices);
        let last = &batches[3];
        assert_eq!(last.images.size(), vec![2, 3, 32, 32]);
        assert_eq!(last.images.kind(), tch::Kind::Float);
        assert_eq!(last.labels.kind(), tch::Kind::Int64);
        let labels = Vec::<i64>::try_from(&last.labels).unwrap();
        assert_eq!(labels, last.indices.iter().map(|&i| split.label(i) as i64).collect::<Vec<_>>());
        // Content equals the augmentation of each sample.
        let got = images_of(last);
        let mut want = vec![0f32; IMAGE_BYTES];
        for (k, &i) in last.indices.iter().enumerate() {
            augment_into(split.image(i), augmentation_for(3, 0, i), &mut want);
            assert_eq!(&got[k * IMAGE_BYTES..(k + 1) * IMAGE_BYTES], &want[..]);
        }
    }

    #[test]
    fn skip_resumes_with_identical_batches() {
        let split = Arc::new(synthetic(40, 2));
        let indices = rank_indices(40, 2, 1, 9, 4);
        let full: Vec<Batch> = Loader::new(split.clone(), indices.clone(), 6, 9, 4, true, 0).collect();
        let resumed: Vec<Batch> = Loader::new(split.clone(), indices.clone(), 6, 9, 4, true, 2).collect();
        assert_eq!(resumed.len(), full.len() - 2);
        for (a, b) in full[2..].iter().zip(&resumed) {
            assert_eq!(a.indices, b.indices);
            assert_eq!(a.number, b.number);
            assert_eq!(images_of(a), images_of(b));
        }
        assert_eq!(Loader::new(split.clone(), indices.clone(), 6, 9, 4, true, 99).count(), 0);
    }

    /// A CUDA run's loader pins its batches; where that is impossible (this CPU machine:
    /// no driver) it falls back to ordinary memory with the same batches, not an error.
    #[test]
    fn a_loader_for_a_cuda_device_yields_the_same_batches_pinned_or_not() {
        let split = Arc::new(synthetic(40, 2));
        let indices = rank_indices(40, 1, 0, 5, 1);
        let plain: Vec<Batch> = Loader::new(split.clone(), indices.clone(), 16, 5, 1, true, 0).collect();
        let cuda = tch::Device::Cuda(0);
        let pinned: Vec<Batch> = Loader::for_device(cuda, split.clone(), indices.clone(), 16, 5, 1, true, 0).collect();
        assert_eq!(plain.len(), pinned.len());
        for (a, b) in plain.iter().zip(&pinned) {
            assert_eq!(a.indices, b.indices);
            assert_eq!(images_of(a), images_of(b));
            assert_eq!(Vec::<i64>::try_from(&a.labels).unwrap(), Vec::<i64>::try_from(&b.labels).unwrap());
            assert_eq!(b.images.device(), tch::Device::Cpu);
            if tch::Cuda::is_available() {
                assert!(b.images.is_pinned(cuda) && b.labels.is_pinned(cuda), "a CUDA run's batches are pinned");
            }
        }
        // A CPU run's loader never pins.
        let cpu: Vec<Batch> = Loader::for_device(tch::Device::Cpu, split, indices, 16, 5, 1, true, 0).collect();
        assert_eq!(images_of(&cpu[0]), images_of(&plain[0]));
    }

    #[test]
    fn empty_index_list_yields_nothing() {
        let split = Arc::new(synthetic(3, 2));
        assert_eq!(Loader::new(split, Vec::new(), 4, 0, 0, false, 0).count(), 0);
    }

    #[test]
    fn dropping_mid_epoch_stops_the_thread() {
        let split = Arc::new(synthetic(64, 2));
        let indices: Vec<usize> = (0..64).cycle().take(64 * 50).collect();
        let mut loader = Loader::new(split, indices, 8, 0, 0, true, 0);
        assert!(loader.next().is_some());
        let start = std::time::Instant::now();
        drop(loader); // joins the producer; must not hang on the full channel
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn out_of_range_index_is_caught_up_front() {
        let split = Arc::new(synthetic(3, 2));
        let _ = Loader::new(split, vec![0, 3], 2, 0, 0, false, 0);
    }
}
