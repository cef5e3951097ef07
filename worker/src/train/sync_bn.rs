//! The group a training step's SyncBatchNorm layers sum their statistics over
//! (`--sync-bn`), and the differentiable sum they use.
//!
//! While [`with_group`] runs a forward and backward pass, every BatchNorm layer in training
//! mode ([`crate::models::batch_norm::BatchNorm2d`]) sums its per-channel statistics over
//! the group's ranks through [`group_sum`]: a custom autograd node (csrc/sync_bn_shim.cpp)
//! whose forward and backward are both an exact f32 all-reduce (sum), so the statistics are
//! those of the global batch and the gradients carry every rank's dependence on them, as
//! `torch.nn.SyncBatchNorm` computes them. The collectives run in the order the layers run,
//! which is the same on every rank, interleaved with the gradient buckets in that order.
//!
//! A collective that fails inside the pass cannot stop libtorch's autograd engine without
//! an exception crossing the FFI; the sum then leaves its input as it was, the error is
//! kept, and [`with_group`] returns it once the pass is over (the step is not applied).

use crate::collective::{Collective, CollectiveError};
use std::cell::Cell;
use std::ffi::{c_char, c_void};
use tch::Tensor;

unsafe extern "C" {
    fn cvdist_group_sum(
        x: *const torch_sys::C_tensor,
        fn_: extern "C" fn(*mut c_void, *mut torch_sys::C_tensor),
        group: *mut c_void,
        err: *mut c_char,
        cap: usize,
    ) -> *mut torch_sys::C_tensor;
}

/// The group of the pass in progress: the collective and the first error it returned.
struct Group {
    comm: *mut (dyn Collective + 'static),
    error: Option<CollectiveError>,
}

thread_local! {
    /// The group of the pass this thread runs, if it runs one under [`with_group`].
    static CURRENT: Cell<*mut Group> = const { Cell::new(std::ptr::null_mut()) };
}

/// Runs `pass` (a forward and backward pass) with BatchNorm statistics summed over `comm`'s
/// ranks. Returns `pass`'s result, or the first error of a statistics collective.
pub fn with_group<T>(comm: &mut dyn Collective, pass: impl FnOnce() -> T) -> Result<T, CollectiveError> {
    // SAFETY: only the lifetime is erased. The pointer is used by `sum_in_place` only
    // while this function runs: the thread-local is reset before it returns (also on a
    // panic, by `Reset`), and the autograd nodes holding `group` are created and run
    // inside `pass` (the caller's backward; a graph dropped unused never calls them).
    let comm: *mut (dyn Collective + 'static) = unsafe { std::mem::transmute(comm) };
    let mut group = Group { comm, error: None };
    struct Reset(*mut Group);
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let previous = CURRENT.with(|c| c.replace(&mut group));
    let result = {
        let _reset = Reset(previous);
        pass()
    };
    match group.error.take() {
        Some(e) => Err(e),
        None => Ok(result),
    }
}

/// Whether BatchNorm layers on this thread should sum their statistics over a group now.
pub fn active() -> bool {
    CURRENT.with(|c| !c.get().is_null())
}

/// `x` (f32, any shape) summed over the current group's ranks, differentiably: the
/// gradient reaching the result is summed over the ranks on its way back to `x`. None
/// outside [`with_group`]. Errors: libtorch refused the node (the message).
pub fn group_sum(x: &Tensor) -> Option<Result<Tensor, String>> {
    let group = CURRENT.with(|c| c.get());
    if group.is_null() {
        return None;
    }
    let mut err = [0 as c_char; 512];
    // SAFETY: `x` is a live tensor; `group` is the live `Group` of the enclosing
    // `with_group` (see there for how long the node may use it); `err` is a writable
    // buffer of the given size. A non-null result is a new tensor we own.
    let out = unsafe { cvdist_group_sum(x.as_ptr(), sum_in_place, group.cast(), err.as_mut_ptr(), err.len()) };
    if out.is_null() {
        // SAFETY: the shim wrote a NUL-terminated message into `err`.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Some(Err(msg));
    }
    // SAFETY: `out` is a heap `at::Tensor*` the shim allocated for us.
    Some(Ok(unsafe { Tensor::from_ptr(out) }))
}

/// The node's callback: sums `t` in place over the group (exact f32, whatever the
/// gradient wire compression); after an error, leaves `t` and every later one unchanged.
extern "C" fn sum_in_place(group: *mut c_void, t: *mut torch_sys::C_tensor) {
    // SAFETY: `group` is the `Group` `with_group` registered, alive while its pass runs
    // (the only time the node calls back); `t` is a tensor the node owns for this call.
    let group = unsafe { &mut *group.cast::<Group>() };
    if group.error.is_some() {
        return;
    }
    // SAFETY: as above; `comm` outlives the pass (`with_group` borrows it mutably).
    let comm = unsafe { &mut *group.comm };
    if comm.world_size() == 1 {
        return;
    }
    // SAFETY: a borrowed view of the node's tensor, not dropped (it is not ours to free).
    let mut view = std::mem::ManuallyDrop::new(unsafe { Tensor::from_ptr(t) });
    if let Err(e) = comm.reduce_tensor_sum_exact(&mut view) {
        group.error = Some(e);
    }
}
