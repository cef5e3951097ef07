//! Times full training steps (forward, backward, SGD update) of the real cvdist engine —
//! the same `Engine` the trainer uses — on random CIFAR-shaped batches.
//!
//!   cargo run --release -p cvdist-worker --example step_bench -- --model resnet18 --steps 10
//!
//! Prints one JSON line: {"model", "batch", "threads", "step_seconds": [..]}.

use cvdist_worker::train::Engine;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = arg(&args, "--model", "resnet18");
    let batch: i64 = arg(&args, "--batch", "128").parse().expect("--batch N");
    let steps: usize = arg(&args, "--steps", "10").parse().expect("--steps N");
    let warmup: usize = arg(&args, "--warmup", "2").parse().expect("--warmup N");
    let threads: i32 = arg(&args, "--threads", "2").parse().expect("--threads N");
    // The same process settings as the worker binary, so the step timed is the one it runs.
    cvdist_worker::allocator::keep_freed_memory();
    tch::set_num_threads(threads);
    let spec = cvdist_common::spec::default_spec(&model, 1);
    let mut engine = Engine::new(&spec, Device::Cpu).expect("model builds");
    tch::manual_seed(0);
    let x = Tensor::randn([batch, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let start = Instant::now();
        engine.forward_backward(&x, &y);
        engine.sgd.step(0.1);
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let list: Vec<String> = times.iter().map(|t| format!("{t:.5}")).collect();
    println!(
        "{{\"impl\": \"cvdist\", \"model\": \"{model}\", \"batch\": {batch}, \"threads\": {threads}, \"step_seconds\": [{}]}}",
        list.join(", ")
    );
}
