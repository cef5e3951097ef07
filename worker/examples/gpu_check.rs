//! The single-device part of the GPU check `scripts/gpu-check.sh` runs on a lent GPU host
//! (and, with `--device cpu`, of its CPU twin): one process, synthetic data only. Prints,
//! as `gpu-check:` lines, the device and the step time and images/s of the real training
//! `Engine` (forward, backward, SGD; channels_last as jobs train) for each model ×
//! precision at the given batch, and with `--json FILE` appends one JSON line per cell
//! (`impl` "cvdist", model, precision, step_seconds) for the script to set beside PyTorch
//! eager and DDP (`benches/python/gpu_step.py`). The multi-rank parts (NCCL through c10d,
//! the compressed wire audited, a killed rank) run the real worker from the script.
//!
//! ```text
//! gpu_check [--device K|cpu] [--batch 128] [--steps 20] [--warmup 5]
//!           [--models resnet18,resnet50] [--precisions fp32,bf16] [--json FILE]
//! ```
//!
//! Exits 1 if any part failed (each part still runs); the failing line says why.

use cvdist_worker::collective::Solo;
use cvdist_worker::train::sync::GradSync;
use cvdist_worker::train::Engine;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device_arg = arg(&args, "--device", "0");
    let json = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let batch: i64 = arg(&args, "--batch", "128").parse().expect("--batch N");
    let steps: usize = arg(&args, "--steps", "20").parse().expect("--steps N");
    let warmup: usize = arg(&args, "--warmup", "5").parse().expect("--warmup N");
    let models = arg(&args, "--models", "resnet18,resnet50");
    let precisions = arg(&args, "--precisions", "fp32,bf16");
    let mut ok = true;

    let count = tch::Cuda::device_count();
    println!("gpu-check: libtorch sees {count} CUDA device(s); cuDNN available: {}", tch::Cuda::cudnn_is_available());
    let device = if device_arg == "cpu" {
        Device::Cpu
    } else {
        let k: usize = device_arg.parse().expect("--device K or cpu");
        if k as i64 >= count {
            println!("gpu-check: FAILED: cuda:{k} requested, {count} visible");
            std::process::exit(1);
        }
        Device::Cuda(k)
    };

    println!("gpu-check: training step, batch {batch}, synthetic 32x32 images, {warmup} warm-up + {steps} timed steps");
    println!("gpu-check: | model | precision | step ms (median) | images/s |");
    for model in models.split(',') {
        for precision in precisions.split(',') {
            match time_steps(model, precision, device, batch, warmup, steps) {
                Ok(times) => {
                    let step = median(times.clone());
                    println!("gpu-check: | {model} | {precision} | {:.2} | {:.0} |", step * 1e3, batch as f64 / step);
                    if let Some(path) = &json {
                        let line = format!(
                            "{{\"impl\": \"cvdist\", \"model\": \"{model}\", \"precision\": \"{precision}\", \"batch\": {batch}, \"step_seconds\": {times:?}}}\n"
                        );
                        let written = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(path)
                            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
                        if let Err(e) = written {
                            println!("gpu-check: FAILED: writing {path}: {e}");
                            ok = false;
                        }
                    }
                }
                Err(e) => {
                    println!("gpu-check: | {model} | {precision} | FAILED: {e} | |");
                    ok = false;
                }
            }
        }
    }

    println!("gpu-check: {}", if ok { "step timings done" } else { "FAILED (see the lines above)" });
    std::process::exit(if ok { 0 } else { 1 });
}

/// Wall time of each timed training step (the loss is read back every step, so each step
/// ends with the device idle).
fn time_steps(
    model: &str,
    precision: &str,
    dev: Device,
    batch: i64,
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>, String> {
    let mut spec = cvdist_common::spec::default_spec(model, 1);
    let precision = precision.parse::<cvdist_common::choices::Precision>().map_err(|e| e.to_string())?;
    cvdist_common::spec::set_precision(&mut spec, Some(precision), false).map_err(|e| e.to_string())?;
    let mut engine = Engine::new(&spec, dev).map_err(|e| e.to_string())?;
    tch::manual_seed(0);
    let x = Tensor::randn([batch, 3, 32, 32], (Kind::Float, dev));
    let y = Tensor::randint(10, [batch], (Kind::Int64, dev));
    let mut times = Vec::new();
    let (mut sync, mut solo) = (GradSync::new(), Solo::new());
    for i in 0..warmup + steps {
        let start = Instant::now();
        let out = engine.forward_backward(&x, &y);
        // The trainer's own step end: under fp16 it unscales the gradients (and skips an
        // overflowed step) before SGD, as a job does.
        engine
            .finish_step(&mut sync, &mut solo, &out.loss, 0.01, (0, i as u64))
            .map_err(|e| format!("step {i}: {e}"))?;
        // Read back on purpose: it ends the step with the device idle, so the host clock
        // times the whole step (the trainer itself reads once per progress interval).
        let loss = out.loss.double_value(&[]);
        if !loss.is_finite() {
            return Err(format!("non-finite loss {loss} at step {i}"));
        }
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
