//! One rank of the all-reduce benchmark; `scripts/bench-allreduce.sh` starts N of these
//! as separate processes. Rank 0 prints one `RESULT` line per size (and per gradient
//! compression, with `--grad-compression`).
//!
//! Each timed iteration is preceded by a barrier so that rank skew is not measured. With
//! a compression other than `none` the timed op is the gradient all-reduce
//! (`all_reduce_sum_grads`), and `bytes` is what rank 0 wrote to its link for one op.

use clap::Parser;
use cvdist_worker::collective::{Collective, GradCompression, Ring};
use std::net::TcpListener;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    /// Comma-separated data-plane host:port by rank.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Buffer sizes in floats, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "23500000,2300000,1024")]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value = "bench-secret")]
    secret: String,
    /// Pipelining chunk in KiB (default: the library's).
    #[arg(long)]
    chunk_kib: Option<usize>,
    /// Gradient compressions to measure, comma-separated ("none", "bf16", "fp16").
    #[arg(long, value_delimiter = ',', default_value = "none")]
    grad_compression: Vec<GradCompression>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.peers.len() == args.world, "need {} peers", args.world);
    let listener = TcpListener::bind(&args.peers[args.rank])?;
    let mut ring = Ring::connect(args.rank, args.world, &args.peers, listener, &args.secret, Duration::from_secs(60))?;
    if let Some(k) = args.chunk_kib {
        ring.set_chunk_bytes(k * 1024);
    }
    for &n in &args.sizes {
        for &c in &args.grad_compression {
            ring.set_grad_compression(c)?;
            let mut buf = vec![0f32; n];
            // Correctness check on the first op: small integer values keep sums exact,
            // in f32 and in 16 bits alike (every partial sum is below 2^8).
            for (i, v) in buf.iter_mut().enumerate() {
                *v = (args.rank + i % 50) as f32;
            }
            let sent = ring.bytes_sent();
            ring.all_reduce_sum_grads(&mut buf)?;
            let bytes = ring.bytes_sent() - sent;
            let w = args.world;
            let bad = buf.iter().enumerate().find(|(i, v)| **v != (w * (w - 1) / 2 + w * (i % 50)) as f32);
            anyhow::ensure!(bad.is_none(), "wrong sum at {:?}", bad);
            for _ in 0..args.warmup {
                ring.barrier()?;
                ring.all_reduce_sum_grads(&mut buf)?;
            }
            let mut times = Vec::with_capacity(args.iters);
            for _ in 0..args.iters {
                buf.fill(1.0);
                ring.barrier()?;
                let t = Instant::now();
                ring.all_reduce_sum_grads(&mut buf)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            if args.rank == 0 {
                println!(
                    "RESULT impl=cvdist compression={c} world={} floats={} bytes={bytes} median_ms={:.4} min_ms={:.4}",
                    args.world,
                    n,
                    times[times.len() / 2],
                    times[0]
                );
            }
        }
    }
    ring.barrier()?;
    Ok(())
}
