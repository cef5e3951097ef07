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
//!   still compare a fingerprint of it before training ([`check_same_layout`]).
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

use super::buckets::Buckets;
use super::reduction_audit::ReductionAudit;
use crate::collective::{AbortHandle, Collective, CollectiveError, Completion, CompletionState};
use std::ffi::c_void;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};
use tracing::warn;

/// Elements of the first bucket in ready order: 1 MB of f32, PyTorch DDP's first bucket,
/// so the first all-reduce starts after the last layers' gradients.
pub const FIRST_BUCKET_ELEMS: usize = 1024 * 1024 / 4;

type ReadyFn = unsafe extern "C" fn(ctx: *mut c_void, index: i64);

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

/// Mutex poisoning only means a thread panicked while holding plain bookkeeping.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs `f(ctx, i)` as parameter `i`'s hook on every parameter; on failure removes
/// the ones already installed.
fn install(params: &[(String, Tensor)], f: ReadyFn, ctx: *mut c_void) -> Result<Vec<Tensor>, HookError> {
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

fn remove(handles: &mut [Tensor]) {
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

/// A collective run on the comm thread for the training thread ([`CommProxy`]).
type CommOp = Box<dyn FnOnce(&mut dyn Collective) + Send>;

/// What the comm thread is asked to do.
enum Msg {
    /// All-reduce (sum) this bucket's whole gradient buffer in place; `last` marks a
    /// step's last bucket.
    Bucket {
        grad: Tensor,
        last: bool,
    },
    /// Any other collective of the trainer, run in queue order ([`CommProxy`]).
    Run(CommOp),
    Stop,
}

/// One bucket's reduction: host seconds the comm thread spent starting it (with the
/// step's last bucket, also finishing them all), or its error.
struct Done {
    result: Result<f64, CollectiveError>,
}

/// The two ends of the bucket queue of a comm thread, for [`GradHooks::connect`].
pub struct Lane {
    tx: Sender<Msg>,
    done: Receiver<Done>,
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

unsafe extern "C" fn grad_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: `ctx` is the `HookState` a `GradHooks` keeps alive (in an Arc) until it has
    // removed its hooks.
    let state = unsafe { &*(ctx as *const HookState) };
    let mut p = lock(&state.progress);
    if let Some(i) = usize::try_from(index).ok().filter(|&i| i < state.bucket_of.len()) {
        state.mark(&mut p, i);
        HookState::launch(&mut p);
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
        let handles = install(params, grad_ready, ctx)?;
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
        remove(&mut self.handles);
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

/// Runs `f` with a communication thread that owns `comm`: `f` gets a [`CommProxy`] (a
/// [`Collective`] whose ops run on that thread, in order) and the [`Lane`] that
/// [`GradHooks::connect`] feeds gradient buckets into. The thread ends when `f` returns
/// (after the ops queued before), also when `f` fails or panics. On `Device::Cuda(d)`
/// the thread makes `d` its current CUDA device first (it is per thread), so c10d
/// issues its collectives on the training thread's device.
///
/// Errors: the thread could not be started.
pub fn with_comm_thread<R>(
    comm: &mut dyn Collective,
    device: Device,
    f: impl FnOnce(&mut CommProxy, Lane) -> R,
) -> Result<R, CollectiveError> {
    let (rank, world, abort) = (comm.rank(), comm.world_size(), comm.abort_handle());
    let (tx, rx) = mpsc::channel::<Msg>();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let lane = Lane { tx: tx.clone(), done: done_rx };
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("cvdist-comm".into())
            .spawn_scoped(s, move || {
                if let Device::Cuda(d) = device {
                    use_cuda_device(d);
                }
                serve(comm, rx, done_tx)
            })
            .map_err(|e| CollectiveError::io("starting the gradient communication thread", e))?;
        // The guard tells the thread to stop when `f` returns *or unwinds*: a sender kept
        // elsewhere (the hooks of a model parked for live recovery) must not keep the
        // thread, and so the scope, waiting for more buckets.
        let _stop = StopOnDrop(tx.clone());
        let mut proxy = CommProxy { tx, rank, world, abort };
        Ok(f(&mut proxy, lane))
    })
}

/// Sends [`Msg::Stop`] when dropped, including during a panic's unwinding.
struct StopOnDrop(Sender<Msg>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Msg::Stop);
    }
}

/// Makes `cuda:d` this thread's current device (`tch` has no device guard; the shim uses
/// libtorch's).
fn use_cuda_device(d: usize) {
    unsafe extern "C" {
        fn cvdist_set_cuda_device(index: i32) -> i32;
    }
    // SAFETY: plain integer argument; the shim catches every exception.
    if unsafe { cvdist_set_cuda_device(d as i32) } != 0 {
        warn!("comm thread: could not make cuda:{d} its current device");
    }
}

/// The comm thread's loop: jobs in arrival order until `Stop` or every sender is gone.
/// A panic inside a collective is caught and becomes that bucket's (or op's) error, so the
/// step reports it instead of waiting for a reply that never comes.
fn serve(comm: &mut dyn Collective, rx: Receiver<Msg>, done: Sender<Done>) {
    let mut failed: Option<String> = None;
    let mut audit = ReductionAudit::from_env();
    for msg in rx {
        match msg {
            Msg::Stop => break,
            Msg::Run(op) => {
                // The op's reply channel is dropped by the unwinding, which the caller
                // sees as the thread having ended; the group is unusable afterwards.
                if let Err(p) = catch(|| op(comm)) {
                    failed.get_or_insert(p);
                }
            }
            Msg::Bucket { mut grad, last } => {
                let start = Instant::now();
                let result = match &failed {
                    Some(why) => Err(CollectiveError::Broken(format!("an earlier gradient reduction failed: {why}"))),
                    None => {
                        let reduced = catch(|| {
                            if let Some(a) = audit.as_mut() {
                                a.before(&grad)?;
                            }
                            comm.start_reduce_grads(&mut grad)?;
                            if last {
                                comm.finish_reduce_grads()?;
                                if let Some(a) = audit.as_mut() {
                                    a.after_step(comm)?;
                                }
                            }
                            Ok(())
                        });
                        match reduced {
                            Ok(r) => r.map(|()| start.elapsed().as_secs_f64()),
                            Err(p) => Err(CollectiveError::Broken(p)),
                        }
                    }
                };
                if let Err(e) = &result {
                    failed.get_or_insert_with(|| e.to_string());
                }
                if done.send(Done { result }).is_err() {
                    break;
                }
            }
        }
    }
}

/// Runs `f`, turning a panic into its message.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let text = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        format!("panic in a collective: {text}")
    })
}

/// A [`Collective`] whose operations run on the comm thread of [`with_comm_thread`], in
/// the order they were issued, after the gradient buckets queued before them. Host
/// buffers are copied to the thread and back (the trainer's host collectives are small:
/// metrics, BatchNorm statistics, the initial weights once).
pub struct CommProxy {
    tx: Sender<Msg>,
    rank: usize,
    world: usize,
    abort: AbortHandle,
}

impl CommProxy {
    fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut dyn Collective) -> T + Send + 'static,
    ) -> Result<T, CollectiveError> {
        let gone = || CollectiveError::Broken("the gradient communication thread ended".into());
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let job = Box::new(move |c: &mut dyn Collective| {
            let _ = reply_tx.send(op(c));
        });
        self.tx.send(Msg::Run(job)).map_err(|_| gone())?;
        reply_rx.recv().map_err(|_| gone())
    }

    fn on_host(
        &self,
        buf: &mut [f32],
        op: impl FnOnce(&mut dyn Collective, &mut [f32]) -> Result<(), CollectiveError> + Send + 'static,
    ) -> Result<(), CollectiveError> {
        let mut owned = buf.to_vec();
        let (owned, result) = self.call(move |c| {
            let r = op(c, &mut owned);
            (owned, r)
        })?;
        result?;
        buf.copy_from_slice(&owned);
        Ok(())
    }
}

impl Collective for CommProxy {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.on_host(buf, |c, b| c.all_reduce_sum(b))
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.on_host(buf, move |c, b| c.broadcast(b, root))
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.call(|c| c.barrier())?
    }
    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
    fn wait(&mut self) -> Result<(), CollectiveError> {
        self.call(|c| c.wait())?
    }
    fn finish(&mut self) -> Result<(), CollectiveError> {
        self.call(|c| c.finish())?
    }
    fn reduce_tensor_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let mut t = t.shallow_clone();
        self.call(move |c| c.reduce_tensor_sum(&mut t))?
    }
    fn reduce_tensor_sum_exact(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let mut t = t.shallow_clone();
        self.call(move |c| c.reduce_tensor_sum_exact(&mut t))?
    }
    fn completion(&mut self) -> Option<Completion> {
        // A comm thread that is gone cannot confirm anything.
        self.call(|c| c.completion()).unwrap_or_else(|_| Some(Completion::new(|| CompletionState::Failed)))
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
