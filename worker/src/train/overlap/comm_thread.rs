//! The comm thread: it owns the communicator for a whole run and serves, in arrival
//! order, the gradient buckets the hooks launch and every other collective of the trainer
//! ([`CommProxy`]).

use super::proxy::CommProxy;
use crate::collective::{Collective, CollectiveError};
use crate::train::reduction_audit::ReductionAudit;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;
use tch::{Device, Tensor};
use tracing::warn;

/// A collective run on the comm thread for the training thread ([`CommProxy`]).
pub(super) type CommOp = Box<dyn FnOnce(&mut dyn Collective) + Send>;

/// What the comm thread is asked to do.
pub(super) enum Msg {
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
pub(super) struct Done {
    pub result: Result<f64, CollectiveError>,
}

/// The two ends of the bucket queue of a comm thread, for [`GradHooks::connect`].
pub struct Lane {
    pub(super) tx: Sender<Msg>,
    pub(super) done: Receiver<Done>,
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
        let mut proxy = CommProxy::new(tx, rank, world, abort);
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
