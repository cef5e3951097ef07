//! The trainer's [`Collective`] while a comm thread owns the communicator.

use super::comm_thread::Msg;
use crate::collective::{AbortHandle, Collective, CollectiveError, Completion, CompletionState};
use std::sync::mpsc::{self, Sender};
use tch::Tensor;

/// A [`Collective`] whose operations run on the comm thread of [`super::with_comm_thread`], in
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
    pub(super) fn new(tx: Sender<Msg>, rank: usize, world: usize, abort: AbortHandle) -> CommProxy {
        CommProxy { tx, rank, world, abort }
    }

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
