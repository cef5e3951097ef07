//! NCCL smoke check for a GPU host: loads libnccl from the torch venv, builds a world-size-1
//! communicator, all-reduces and broadcasts a CUDA tensor, and times a 94 MB all-reduce.
//! On a machine without CUDA it prints why NCCL is unavailable and exits 1.

use cvdist_worker::collective::nccl::{self, NcclComm};
use cvdist_worker::collective::Collective;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() {
    if let Err(e) = nccl::available() {
        println!("nccl: unavailable: {e}");
        std::process::exit(1);
    }
    println!("nccl: {}", nccl::describe().unwrap_or_default());
    let id = nccl::unique_id().expect("unique id");
    let mut comm = NcclComm::new(0, 1, id).expect("communicator");
    let t = Tensor::arange(1024, (Kind::Float, Device::Cuda(0)));
    let before = t.copy();
    comm.all_reduce_sum_tensor(&t).expect("all-reduce");
    comm.broadcast_tensor(&t, 0).expect("broadcast");
    comm.wait().expect("wait");
    assert!(t.equal(&before), "world-size-1 all-reduce must be the identity");
    let big = Tensor::ones([23_520_842], (Kind::Float, Device::Cuda(0)));
    let mut times = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        comm.all_reduce_sum_tensor(&big).expect("all-reduce");
        comm.wait().expect("wait");
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!("nccl: world size 1 all-reduce/broadcast correct; 94 MB all-reduce median {:.3} ms", times[5]);
}
