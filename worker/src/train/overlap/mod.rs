//! The gradient all-reduce overlapped with backward, as PyTorch DDP does it.
//!
//! ```text
//!  training thread                                   comm thread (owns the communicator)
//!  ───────────────                                   ────────────────────────────────────
//!  forward
//!  backward ─ AccumulateGrad(p) ─ hook(p) ─┐
//!            (grads arrive in reverse      │ pending[bucket(p)] -= 1; the buckets whose
//!             forward order)               │ count reached 0 are launched strictly in
//!                                          │ index order ──Bucket(b)──▶ reduce bucket b
//!  backward continues …                    ┘                            (in place, sum)
//!  end of backward: unused params ready (their grads stay 0)            Done(b) ──┐
//!  flag slot filled: the last bucket's final "gradient" ──Bucket(last)─▶ reduce    │
//!  wait for every Done (only the tail is left)  ◀────────────────────────────────┘
//!  unscale / divide by N, SGD over whole buckets
//! ```
//!
//! - **Hooks** ([`GradHooks`]): one post-accumulate-grad hook per parameter, through the
//!   C++ shim `csrc/grad_ready_shim.cpp`, registered once per [`super::Engine`] when it
//!   gets a comm thread (a single rank has none and no hooks) and removed when it drops. They fire once per backward per parameter, after its gradient was
//!   added in place into its bucket view.
//! - **Buckets in ready order** ([`ready_order`]): at construction one probe backward (a
//!   zero batch, eval mode, so no statistics change and no random numbers are drawn)
//!   records the order in which autograd finishes the parameters; the buckets are planned
//!   over that order, a small first one (1 MB, [`FIRST_BUCKET_ELEMS`]) and then `--bucket-cap-mb` (by default 4 MB on CPU, 25 MB on CUDA)
//!   ones, so the first bucket is complete early in backward. The order depends only on
//!   the model, so every rank (and every resumed run) gets the same layout; the ranks
//!   still compare a fingerprint of it before training ([`super::buckets::check_same_layout`]).
//! - **Launch order**: bucket `b` is handed over only after buckets `0..b`, on every rank
//!   the same sequence of all-reduces of the same lengths, with the same arithmetic as
//!   reducing them after backward: results are deterministic.
//! - **Comm thread** ([`with_comm_thread`]): owns the communicator for the whole run;
//!   every other collective of the trainer goes through it too ([`CommProxy`]), in order,
//!   so there is one user of the communicator. A failed bucket fails the step with that
//!   error; the buckets after it are not attempted (the ring is broken anyway). The hooks
//!   never block, so the backward thread and the comm thread cannot deadlock: a peer dying
//!   mid-backward ends the step with the collective error once backward is done, and a
//!   stalled peer within `--collective-timeout` or at the job's abort.
//! - **Start and finish**: the comm thread *starts* each bucket's all-reduce
//!   ([`Collective::start_reduce_grads`]) and, after the step's last bucket, *finishes*
//!   them all ([`Collective::finish_reduce_grads`]). The ring completes each bucket as it
//!   starts it. A c10d group only issues it: on NCCL, c10d orders the reduction after the
//!   kernels the compute stream holds at that moment, and finishing makes the compute
//!   stream wait for the reductions on the device, after backward, with no host wait; on
//!   gloo, finishing waits on the host. The streams, events and allocator rules are
//!   c10d's, as in PyTorch DDP.
//! - **Failure**: if `f` returns or unwinds (a panic anywhere in the step), the comm
//!   thread is told to stop by a guard, so the scope joins and the panic reaches the job
//!   thread, which reports it as a failure instead of hanging.

mod comm_thread;
mod hooks;
mod proxy;

use super::buckets::Buckets;
use crate::collective::CollectiveError;
use comm_thread::{Done, Msg};
use std::ffi::c_void;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::Tensor;

pub use comm_thread::{with_comm_thread, Lane};
pub use hooks::{ready_order, HookError};
pub use proxy::CommProxy;

/// Elements of the first bucket in ready order: 1 MB of f32, PyTorch DDP's first bucket,
/// so the first all-reduce starts after the last layers' gradients.
pub const FIRST_BUCKET_ELEMS: usize = 1024 * 1024 / 4;

/// Mutex poisoning only means a thread panicked while holding plain bookkeeping.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-step readiness of parameters and buckets.
struct Progress {
    ready: Vec<bool>,
    pending: Vec<usize>,
    /// Per bucket: its parameters, plus one for the last bucket's flag slot.
    full: Vec<usize>,
    /// The next bucket to launch; buckets go strictly in index order.
    next: usize,
    /// The whole gradient buffers (the last with its flag slot).
    grads: Vec<Tensor>,
    tx: Option<Sender<Msg>>,
}

struct HookState {
    bucket_of: Vec<usize>,
    progress: Mutex<Progress>,
}

impl HookState {
    fn mark(&self, p: &mut Progress, i: usize) {
        if p.tx.is_none() || p.ready[i] {
            return;
        }
        p.ready[i] = true;
        p.pending[self.bucket_of[i]] -= 1;
    }

    /// Hands every complete bucket from `next` on to the comm thread, in index order; once
    /// the last one is gone, the counts start over for the next backward.
    fn launch(p: &mut Progress) {
        let Some(tx) = p.tx.clone() else { return };
        while p.next < p.pending.len() && p.pending[p.next] == 0 {
            let b = p.next;
            // A closed queue means the comm thread is gone; the step finds out from its
            // results channel and reports it.
            let last = b + 1 == p.pending.len();
            let _ = tx.send(Msg::Bucket { grad: p.grads[b].shallow_clone(), last });
            p.next += 1;
        }
        if p.next == p.pending.len() {
            p.next = 0;
            p.pending.clone_from(&p.full);
            p.ready.iter_mut().for_each(|r| *r = false);
        }
    }
}

/// The gradient-ready hooks of one model's parameters (see the module docs); removed on
/// drop. Until [`GradHooks::connect`] they do nothing.
pub struct GradHooks {
    state: Arc<HookState>,
    handles: Vec<Tensor>,
}

impl GradHooks {
    /// Installs a hook on every parameter of `params`, which `buckets` holds (parameter
    /// `i` of both is the same).
    pub fn register(params: &[(String, Tensor)], buckets: &Buckets) -> Result<GradHooks, HookError> {
        let n = buckets.len();
        let mut full: Vec<usize> = (0..n).map(|b| buckets.params_of(b).len()).collect();
        if let Some(last) = full.last_mut() {
            // The flag slot: the last bucket also waits for `flag_ready`.
            *last += 1;
        }
        let grads = (0..n).map(|b| buckets.reduce_buffer(b)).collect();
        let state = Arc::new(HookState {
            bucket_of: (0..params.len()).map(|i| buckets.bucket_of(i)).collect(),
            progress: Mutex::new(Progress {
                ready: vec![false; params.len()],
                pending: full.clone(),
                full,
                next: 0,
                grads,
                tx: None,
            }),
        });
        let ctx = Arc::as_ptr(&state) as *mut c_void;
        let handles = hooks::install(params, hooks::grad_ready, ctx)?;
        Ok(GradHooks { state, handles })
    }

    /// Starts sending complete buckets to `lane`'s comm thread; returns what the step
    /// needs to finish the reduction ([`Overlap`]).
    pub fn connect(&self, lane: Lane) -> Overlap {
        let mut guard = lock(&self.state.progress);
        let p = &mut *guard;
        let buckets = p.pending.len();
        p.tx = Some(lane.tx);
        p.next = 0;
        p.pending.clone_from(&p.full);
        p.ready.iter_mut().for_each(|r| *r = false);
        Overlap { state: self.state.clone(), done: lane.done, buckets }
    }
}

impl GradHooks {
    /// Stops feeding the comm thread (its queue's sender is dropped), so a thread waiting
    /// for buckets can end; [`GradHooks::connect`] starts again. Called whenever the model
    /// outlives its comm thread (kept in memory for live recovery).
    pub fn disconnect(&self) {
        lock(&self.state.progress).tx = None;
    }
}

impl Drop for GradHooks {
    fn drop(&mut self) {
        hooks::remove(&mut self.handles);
        // No hook can reach the state any more: stop feeding the comm thread.
        self.disconnect();
    }
}

/// The step's side of an overlapped reduction (held by `GradSync`).
pub struct Overlap {
    state: Arc<HookState>,
    done: Receiver<Done>,
    buckets: usize,
}

impl Overlap {
    /// Number of buckets each step reduces.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Buckets of the running step already handed to the comm thread (0 once a step's
    /// last bucket went): after backward and before [`Overlap::flag_ready`], every bucket
    /// but the last, when every parameter received a gradient.
    pub fn launched(&self) -> usize {
        lock(&self.state.progress).next
    }

    /// Call when backward has returned: every parameter that got no gradient in it (an
    /// unused head, a branch not taken) is marked ready with the zero gradient its bucket
    /// view holds since the step's `zero_grad`, as DDP's `find_unused_parameters` does,
    /// so its bucket is not held up.
    pub fn end_backward(&self) {
        let mut p = lock(&self.state.progress);
        for i in 0..self.state.bucket_of.len() {
            self.state.mark(&mut p, i);
        }
        HookState::launch(&mut p);
    }

    /// Call once the divergence flag slot (after the last gradient) holds this step's
    /// value: it is the last bucket's final entry, so that bucket goes only now.
    pub fn flag_ready(&self) {
        let mut p = lock(&self.state.progress);
        if p.tx.is_none() {
            return;
        }
        if let Some(last) = p.pending.last_mut() {
            *last = last.saturating_sub(1);
        }
        HookState::launch(&mut p);
    }

    /// Waits for every bucket of this step; returns the host seconds the comm thread spent
    /// in the all-reduces or the first bucket's error. On a c10d group on CUDA the
    /// reductions are complete in stream order only (the compute stream waits for them).
    pub fn wait(&self) -> Result<f64, CollectiveError> {
        let gone = || CollectiveError::Broken("the gradient communication thread ended".into());
        if lock(&self.state.progress).tx.is_none() {
            // The hooks were removed (their model dropped): nothing was handed over.
            return Err(CollectiveError::Broken("the gradient hooks were removed".into()));
        }
        let mut wire = 0.0;
        let mut first_error = None;
        for _ in 0..self.buckets {
            match self.done.recv().map_err(|_| gone())?.result {
                Ok(secs) => wire += secs,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(wire)
    }
}
