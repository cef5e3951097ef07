//! The gradient-ready hooks through the C++ shim `csrc/grad_ready_shim.cpp`, and the
//! probe backward that finds the order in which autograd finishes the parameters.

use super::{lock, HookState};
use std::ffi::c_void;
use std::sync::Mutex;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

pub(super) type ReadyFn = unsafe extern "C" fn(ctx: *mut c_void, index: i64);

unsafe extern "C" {
    fn cvdist_set_grad_ready(param: *mut torch_sys::C_tensor, f: ReadyFn, ctx: *mut c_void, index: i64) -> i32;
    fn cvdist_clear_grad_ready(param: *mut torch_sys::C_tensor) -> i32;
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("libtorch refused a gradient-ready hook on parameter {0:?}")]
    Register(String),
    #[error("probing the gradient order: {0}")]
    Torch(#[from] tch::TchError),
}

/// Installs `f(ctx, i)` as parameter `i`'s hook on every parameter; on failure removes
/// the ones already installed.
pub(super) fn install(params: &[(String, Tensor)], f: ReadyFn, ctx: *mut c_void) -> Result<Vec<Tensor>, HookError> {
    let mut handles: Vec<Tensor> = Vec::with_capacity(params.len());
    for (i, (name, p)) in params.iter().enumerate() {
        let mut handle = p.shallow_clone();
        // SAFETY: a live `at::Tensor` owned by `handle`; the hook lives in the tensor's
        // autograd metadata, which every shallow clone shares; the caller keeps `ctx` alive
        // until `remove` ran.
        let rc = unsafe { cvdist_set_grad_ready(handle.as_mut_ptr(), f, ctx, i as i64) };
        if rc != 0 {
            remove(&mut handles);
            return Err(HookError::Register(name.clone()));
        }
        handles.push(handle);
    }
    Ok(handles)
}

pub(super) fn remove(handles: &mut [Tensor]) {
    for h in handles {
        // SAFETY: a live `at::Tensor`; clearing a hook is always allowed. A failure (-1)
        // would leave a hook whose context outlives nothing we free before the tensor.
        unsafe { cvdist_clear_grad_ready(h.as_mut_ptr()) };
    }
}

unsafe extern "C" fn record_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: `ctx` is the `Mutex<Vec<usize>>` that `ready_order` keeps alive while its
    // hooks are installed.
    let seen = unsafe { &*(ctx as *const Mutex<Vec<usize>>) };
    lock(seen).push(index as usize);
}

/// Indices of `params` in the order one backward pass of `model` finishes their
/// gradients (the reverse of the order forward uses them), parameters that received no
/// gradient last in their given order. Runs one forward/backward of a zero batch of two
/// 3×32×32 images in eval mode: no BatchNorm statistics change, no random numbers are
/// drawn; the gradients it leaves are replaced when the buckets are made.
pub fn ready_order(params: &[(String, Tensor)], model: &dyn ModuleT, device: Device) -> Result<Vec<usize>, HookError> {
    let seen: Box<Mutex<Vec<usize>>> = Box::default();
    let ctx = &*seen as *const Mutex<Vec<usize>> as *mut c_void;
    let mut handles = install(params, record_ready, ctx)?;
    let probe = || -> Result<(), tch::TchError> {
        let x = Tensor::f_zeros([2, 3, 32, 32], (Kind::Float, device))?;
        model.forward_t(&x, false).f_to_kind(Kind::Float)?.f_sum(Kind::Float)?.f_backward()
    };
    let result = probe();
    remove(&mut handles);
    result?;
    let seen = std::mem::take(&mut *lock(&seen));
    let mut placed = vec![false; params.len()];
    let mut order = Vec::with_capacity(params.len());
    for i in seen.into_iter().chain(0..params.len()) {
        if i < params.len() && !placed[i] {
            placed[i] = true;
            order.push(i);
        }
    }
    Ok(order)
}

/// The hook of [`super::GradHooks`]: marks parameter `index` ready and launches the
/// buckets that completes.
pub(super) unsafe extern "C" fn grad_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: `ctx` is the `HookState` a `GradHooks` keeps alive (in an Arc) until it has
    // removed its hooks.
    let state = unsafe { &*(ctx as *const HookState) };
    let mut p = lock(&state.progress);
    if let Some(i) = usize::try_from(index).ok().filter(|&i| i < state.bucket_of.len()) {
        state.mark(&mut p, i);
        HookState::launch(&mut p);
    }
}
