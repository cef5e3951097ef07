//! How long a checkpoint holds up the training thread, on the real engine and the real
//! checkpoint code, CPU.
//!
//!   cargo run --release -p cvdist-worker --example ckpt_stall -- --model resnet18 --rounds 5
//!
//! Each round trains `--steps` steps (batch `--batch`), then takes a checkpoint:
//! - before: a save entirely on the training thread, reproduced in `old_save` below
//!   (libtorch's safetensors writer, re-read of the file for its SHA-256, fsync, rename,
//!   JSON record), the baseline that moving checkpoints off the thread is measured against
//!   (an upload would come on top);
//! - sync: the current writer (hashing while writing) still on the training thread, to show
//!   what the write itself costs;
//! - after: `checkpoint::snapshot` + `BackgroundWriter::submit`, what the worker does (the
//!   write, hash and any upload run on the writer thread; a checkpoint waits only for one
//!   still in flight, and that wait is counted).
//!
//! Prints the per-checkpoint stalls and their medians, and the median step time of each
//! mode (the writer thread shares the CPU with training).

use cvdist_worker::train::checkpoint::{self, CheckpointState};
use cvdist_worker::train::ckpt_writer::BackgroundWriter;
use cvdist_worker::train::Engine;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = arg(&args, "--model", "resnet18");
    let batch: i64 = arg(&args, "--batch", "64").parse().expect("--batch N");
    let steps: usize = arg(&args, "--steps", "3").parse().expect("--steps N");
    let rounds: usize = arg(&args, "--rounds", "5").parse().expect("--rounds N");
    let threads: i32 = arg(&args, "--threads", "2").parse().expect("--threads N");
    cvdist_worker::allocator::keep_freed_memory();
    tch::set_num_threads(threads);
    let dir = tempfile_dir();
    let spec = cvdist_common::spec::default_spec(&model, 1);
    let mut engine = Engine::new(&spec, Device::Cpu).expect("model builds");
    tch::manual_seed(0);
    let x = Tensor::randn([batch, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
    let train = |engine: &mut Engine, step_times: &mut Vec<f64>| {
        for _ in 0..steps {
            let t = Instant::now();
            engine.forward_backward(&x, &y);
            engine.sgd.step(0.1);
            step_times.push(t.elapsed().as_secs_f64());
        }
    };
    let mut bytes = 0u64;
    let (mut before, mut before_steps) = (Vec::new(), Vec::new());
    let (mut after, mut after_steps) = (Vec::new(), Vec::new());
    let mut sync = Vec::new();
    train(&mut engine, &mut Vec::new()); // warm-up
    for round in 0..rounds {
        train(&mut engine, &mut before_steps);
        let state = CheckpointState::new(&model, 0, round as u64 + 1, 0, 1);
        let t = Instant::now();
        old_save(&dir.join("before"), state, &engine.variables(), &engine.sgd.momentum_buffers());
        before.push(t.elapsed().as_secs_f64());
    }
    for round in 0..rounds {
        train(&mut engine, &mut Vec::new());
        let state = CheckpointState::new(&model, 0, round as u64 + 1, 0, 1);
        let t = Instant::now();
        let (_, saved) =
            checkpoint::save(&dir.join("sync"), state, &engine.variables(), &engine.sgd.momentum_buffers())
                .expect("checkpoint written");
        sync.push(t.elapsed().as_secs_f64());
        bytes = saved.bytes;
    }
    let mut writer = BackgroundWriter::default();
    for round in 0..rounds {
        train(&mut engine, &mut after_steps);
        let state = CheckpointState::new(&model, 0, round as u64 + 1, 0, 1);
        let t = Instant::now();
        let snap = checkpoint::snapshot(&engine.variables(), &engine.sgd.momentum_buffers());
        if let Some(done) = writer.submit(&dir.join("after"), state, snap, None).expect("writer thread") {
            done.written.expect("checkpoint written");
        }
        after.push(t.elapsed().as_secs_f64());
    }
    if let Some(done) = writer.wait() {
        done.written.expect("checkpoint written");
    }
    let fmt = |v: &[f64]| v.iter().map(|t| format!("{:.1}", t * 1e3)).collect::<Vec<_>>().join(", ");
    println!(
        "model {model}, checkpoint {:.1} MB, {steps} steps of batch {batch} between checkpoints, {threads} threads",
        bytes as f64 / 1e6
    );
    println!("before (pre-item-8 save) stall ms: [{}]", fmt(&before));
    println!("sync (today's writer on the training thread) stall ms: [{}]", fmt(&sync));
    println!("after (snapshot + background write) stall ms: [{}]", fmt(&after));
    println!(
        "median stall: before {:.1} ms, sync {:.1} ms, after {:.1} ms; median step: before {:.1} ms, after {:.1} ms",
        median(&mut before) * 1e3,
        median(&mut sync) * 1e3,
        median(&mut after) * 1e3,
        median(&mut before_steps) * 1e3,
        median(&mut after_steps) * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint write done entirely on rank 0's training thread: the baseline stall.
fn old_save(
    dir: &std::path::Path,
    mut state: CheckpointState,
    model: &[(String, Tensor)],
    momentum: &[(String, Tensor)],
) {
    use sha2::Digest;
    std::fs::create_dir_all(dir).expect("dir");
    let name = state.name();
    let tmp = dir.join(format!(".{name}.safetensors.tmp"));
    let host = |t: &Tensor| t.detach().to_device(Device::Cpu).contiguous();
    let mut named: Vec<(String, Tensor)> = model.iter().map(|(n, t)| (format!("model.{n}"), host(t))).collect();
    named.extend(momentum.iter().map(|(n, t)| (format!("momentum.{n}"), host(t))));
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &tmp).expect("write");
    let bytes = std::fs::read(&tmp).expect("read back");
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).expect("fsync");
    std::fs::rename(&tmp, dir.join(format!("{name}.safetensors"))).expect("rename");
    state.sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    state.bytes = bytes.len() as u64;
    let text = serde_json::to_vec_pretty(&state).expect("json");
    cvdist_common::atomic_file::write(&dir.join(format!("{name}.json")), &text).expect("record");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cvdist-ckpt-stall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
