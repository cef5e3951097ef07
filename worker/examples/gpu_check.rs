//! The GPU check `scripts/gpu-check.sh` runs on a lent GPU host (issue 12): one process,
//! a few minutes, synthetic data only. Prints, as `gpu-check:` lines,
//!
//! * the NCCL library and version,
//! * step time and images/s of the real training `Engine` (forward, backward, SGD) for
//!   each model × precision at the given batch,
//! * the NCCL all-reduce time of a 94 MB buffer (ResNet-50's gradients) at world size 1,
//!   then at world size 2 with both ranks on the same GPU (two processes with distinct
//!   `NCCL_HOSTID`s, which NCCL treats as two hosts),
//! * the watchdog on real NCCL: with a peer that never joins an all-reduce, the op must
//!   end in a `Deadline` error at the collective timeout instead of hanging.
//!
//! ```text
//! gpu_check [--device K] [--batch 128] [--steps 20] [--warmup 5]
//!           [--models resnet18,resnet50] [--precisions fp32,bf16] [--skip-two-ranks]
//! ```
//!
//! Exits 1 if any part failed (each part still runs); the failing line says why.

use cvdist_worker::collective::nccl::{self, NcclComm, NcclOptions};
use cvdist_worker::collective::{AbortHandle, Collective, CollectiveError};
use cvdist_worker::train::Engine;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// ResNet-50's parameter count: the gradient buffer one step all-reduces (94 MB of f32).
const ALLREDUCE_FLOATS: i64 = 23_520_842;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(mode) = args.iter().position(|a| a == "--rank-process").and_then(|i| args.get(i + 1)) {
        let code = match rank_process(mode, &args) {
            Ok(()) => 0,
            Err(e) => {
                println!("gpu-check: rank {} ({mode}) failed: {e}", arg(&args, "--rank", "?"));
                1
            }
        };
        std::process::exit(code);
    }
    let device: usize = arg(&args, "--device", "0").parse().expect("--device K");
    let batch: i64 = arg(&args, "--batch", "128").parse().expect("--batch N");
    let steps: usize = arg(&args, "--steps", "20").parse().expect("--steps N");
    let warmup: usize = arg(&args, "--warmup", "5").parse().expect("--warmup N");
    let models = arg(&args, "--models", "resnet18,resnet50");
    let precisions = arg(&args, "--precisions", "fp32,bf16");
    let mut ok = true;

    let count = tch::Cuda::device_count();
    println!("gpu-check: libtorch sees {count} CUDA device(s); cuDNN available: {}", tch::Cuda::cudnn_is_available());
    match nccl::describe() {
        Ok(d) => println!("gpu-check: {d}"),
        Err(e) => {
            println!("gpu-check: NCCL unavailable: {e}");
            ok = false;
        }
    }
    if device as i64 >= count {
        println!("gpu-check: FAILED: cuda:{device} requested, {count} visible");
        std::process::exit(1);
    }

    println!("gpu-check: training step, batch {batch}, synthetic 32x32 images, {warmup} warm-up + {steps} timed steps");
    println!("gpu-check: | model | precision | step ms (median) | images/s |");
    for model in models.split(',') {
        for precision in precisions.split(',') {
            match time_steps(model, precision, device, batch, warmup, steps) {
                Ok(step) => {
                    println!("gpu-check: | {model} | {precision} | {:.2} | {:.0} |", step * 1e3, batch as f64 / step)
                }
                Err(e) => {
                    println!("gpu-check: | {model} | {precision} | FAILED: {e} | |");
                    ok = false;
                }
            }
        }
    }

    match allreduce_world1(device) {
        Ok(ms) => println!(
            "gpu-check: NCCL all-reduce 94 MB, world size 1: median {ms:.3} ms ({:.1} GB/s algorithm bandwidth)",
            ALLREDUCE_FLOATS as f64 * 4.0 / (ms * 1e-3) / 1e9
        ),
        Err(e) => {
            println!("gpu-check: NCCL all-reduce world size 1 FAILED: {e}");
            ok = false;
        }
    }
    if !args.iter().any(|a| a == "--skip-two-ranks") {
        ok &= two_ranks(device, "allreduce", Duration::from_secs(120));
        ok &= two_ranks(device, "stall", Duration::from_secs(120));
    }
    println!("gpu-check: {}", if ok { "all parts passed" } else { "FAILED (see the lines above)" });
    std::process::exit(if ok { 0 } else { 1 });
}

/// Median wall time of one training step (the loss is read back every step, so each step
/// ends with the device idle).
fn time_steps(
    model: &str,
    precision: &str,
    device: usize,
    batch: i64,
    warmup: usize,
    steps: usize,
) -> Result<f64, String> {
    let mut spec = cvdist_common::spec::default_spec(model, 1);
    let precision = precision.parse::<cvdist_common::choices::Precision>().map_err(|e| e.to_string())?;
    cvdist_common::spec::set_precision(&mut spec, Some(precision), false).map_err(|e| e.to_string())?;
    let dev = Device::Cuda(device);
    let mut engine = Engine::new(&spec, dev).map_err(|e| e.to_string())?;
    tch::manual_seed(0);
    let x = Tensor::randn([batch, 3, 32, 32], (Kind::Float, dev));
    let y = Tensor::randint(10, [batch], (Kind::Int64, dev));
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let start = Instant::now();
        let out = engine.forward_backward(&x, &y);
        engine.sgd.step(0.01);
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
    Ok(median(times))
}

fn allreduce_world1(device: usize) -> Result<f64, CollectiveError> {
    let id = nccl::unique_id()?;
    let opts = NcclOptions { device, timeout: Duration::from_secs(60), abort: AbortHandle::new() };
    let mut comm = NcclComm::init(0, 1, id, &opts)?;
    let t = Tensor::arange(1024, (Kind::Float, Device::Cuda(device)));
    let before = t.copy();
    comm.all_reduce_sum_tensor(&t)?;
    comm.broadcast_tensor(&t, 0)?;
    comm.wait()?;
    if !t.equal(&before) {
        return Err(CollectiveError::Protocol("world-size-1 all-reduce changed the data".into()));
    }
    time_allreduce(&mut comm, device, 1)
}

/// Median milliseconds of a 94 MB all-reduce, each waited for through the watchdog.
fn time_allreduce(comm: &mut NcclComm, device: usize, world: usize) -> Result<f64, CollectiveError> {
    let big = Tensor::ones([ALLREDUCE_FLOATS], (Kind::Float, Device::Cuda(device)));
    let mut times = Vec::new();
    for i in 0..23 {
        let start = Instant::now();
        comm.all_reduce_sum_tensor(&big)?;
        comm.wait()?;
        if i >= 3 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    // Every element went through 23 sums of `world` ones: exact in f32.
    let want = (world as f64).powi(23);
    let got = big.double_value(&[12345]);
    if got != want {
        return Err(CollectiveError::Protocol(format!("all-reduce result {got}, expected {want}")));
    }
    comm.finish()?;
    Ok(median(times))
}

/// Runs two rank processes on one GPU and reports; false if the part failed.
fn two_ranks(device: usize, mode: &str, limit: Duration) -> bool {
    let dir = std::env::temp_dir().join(format!("cvdist-gpu-check-{}-{mode}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        println!("gpu-check: two ranks ({mode}): cannot create {}: {e}", dir.display());
        return false;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            println!("gpu-check: two ranks ({mode}): {e}");
            return false;
        }
    };
    let spawn = |rank: usize| -> std::io::Result<Child> {
        let mut cmd = Command::new(&exe);
        cmd.args(["--rank-process", mode, "--rank", &rank.to_string(), "--device", &device.to_string()])
            .arg("--dir")
            .arg(&dir)
            // Distinct host ids make NCCL treat the two ranks as two hosts, so it accepts
            // them on one GPU (and connects them through its network transport).
            .env("NCCL_HOSTID", format!("cvdist-gpu-check-{rank}"))
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        if std::env::var_os("NCCL_SOCKET_IFNAME").is_none() {
            cmd.env("NCCL_SOCKET_IFNAME", "lo");
        }
        cmd.spawn()
    };
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..2 {
        match spawn(rank) {
            Ok(c) => children.push(c),
            Err(e) => {
                println!("gpu-check: two ranks ({mode}): starting rank {rank}: {e}");
                for mut c in children {
                    let _ = c.kill();
                }
                return false;
            }
        }
    }
    let start = Instant::now();
    let mut rank0_ok = None;
    while start.elapsed() < limit {
        if let Ok(Some(status)) = children[0].try_wait() {
            rank0_ok = Some(status.success());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // In the stall mode rank 1 is still sleeping on purpose; in any mode nothing may outlive
    // the check.
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    match rank0_ok {
        Some(ok) => ok,
        None => {
            println!("gpu-check: two ranks ({mode}): FAILED: rank 0 still running after {limit:?} (a hang)");
            false
        }
    }
}

/// One of the two rank processes. Rank 0 writes the NCCL id to `DIR/id`, rank 1 reads it.
fn rank_process(mode: &str, args: &[String]) -> Result<(), String> {
    let rank: usize = arg(args, "--rank", "0").parse().map_err(|_| "--rank")?;
    let device: usize = arg(args, "--device", "0").parse().map_err(|_| "--device")?;
    let dir = std::path::PathBuf::from(arg(args, "--dir", "."));
    let id_file = dir.join("id");
    let id = if rank == 0 {
        let id = nccl::unique_id().map_err(|e| e.to_string())?;
        let tmp = dir.join("id.tmp");
        std::fs::write(&tmp, nccl::unique_id_to_hex(&id)).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &id_file).map_err(|e| e.to_string())?;
        id
    } else {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&id_file) {
                break nccl::unique_id_from_hex(&text).map_err(|e| e.to_string())?;
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err("rank 0 never wrote the NCCL id".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The stall check wants a short deadline; the bandwidth check a comfortable one.
    let timeout = Duration::from_secs(if mode == "stall" { 10 } else { 60 });
    let opts = NcclOptions { device, timeout, abort: AbortHandle::new() };
    let init_start = Instant::now();
    let mut comm = NcclComm::init(rank, 2, id, &opts).map_err(|e| format!("NCCL init: {e}"))?;
    let init_s = init_start.elapsed().as_secs_f64();
    match mode {
        "allreduce" => {
            let ms = time_allreduce(&mut comm, device, 2).map_err(|e| e.to_string())?;
            if rank == 0 {
                let bytes = ALLREDUCE_FLOATS as f64 * 4.0;
                println!(
                    "gpu-check: NCCL all-reduce 94 MB, world size 2 on one GPU (distinct NCCL_HOSTID): median {ms:.3} ms \
                     ({:.1} GB/s bus bandwidth; init {init_s:.2} s)",
                    bytes / (ms * 1e-3) / 1e9
                );
            }
            Ok(())
        }
        "stall" if rank == 1 => {
            // Joins the communicator, then never takes part in a collective.
            std::thread::sleep(Duration::from_secs(3600));
            Ok(())
        }
        "stall" => {
            let t = Tensor::ones([1 << 20], (Kind::Float, Device::Cuda(device)));
            let start = Instant::now();
            let result = comm.all_reduce_sum_tensor(&t).and_then(|()| comm.wait());
            let took = start.elapsed().as_secs_f64();
            match result {
                Err(e @ CollectiveError::Deadline { .. }) if took < 10.0 + 30.0 => {
                    println!("gpu-check: watchdog: all-reduce with a stalled peer ended after {took:.1} s: {e}");
                    Ok(())
                }
                Err(e) => Err(format!("watchdog: unexpected outcome after {took:.1} s: {e}")),
                Ok(()) => Err("watchdog: the all-reduce completed without its peer".into()),
            }
        }
        other => Err(format!("unknown mode {other}")),
    }
}
