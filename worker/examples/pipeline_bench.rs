//! Input-pipeline throughput on one core.
//!
//! ```text
//! cargo run --release -p cvdist-worker --example pipeline_bench -- --data data/cifar10
//! ```
//! Without `--data` it uses 50,000 synthetic images (same sizes, same code path).
//! Prints images/s for `fill_batch` on the calling thread (augmented and plain), and for
//! the prefetching `Loader` end to end (its one producer thread plus a consumer that only
//! receives), each the median of `--runs` full epochs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use cvdist_common::cifar::{self, IMAGE_BYTES};
use cvdist_common::sampler::rank_indices;
use cvdist_worker::data::{fill_batch, Loader};

#[derive(Parser)]
struct Args {
    /// CIFAR-10 folder (the one holding cifar-10-batches-bin/, or that folder itself).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Epochs timed per measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch_size > 0 && args.runs > 0, "--batch-size and --runs must be positive");
    let (split, source) = match &args.data {
        Some(dir) => (
            cifar::load_train(dir).with_context(|| format!("loading CIFAR-10 from {}", dir.display()))?,
            format!("CIFAR-10 train split from {}", dir.display()),
        ),
        None => (cifar::synthetic(50_000, 1), "synthetic 50,000 images".to_string()),
    };
    let split = Arc::new(split);
    let n = split.len();
    println!("data: {source} ({n} images), batch size {}, {} runs each (median)", args.batch_size, args.runs);

    let mut images = vec![0f32; args.batch_size * IMAGE_BYTES];
    let mut labels = vec![0i64; args.batch_size];
    for augment in [true, false] {
        let mut rates = Vec::new();
        for run in 0..args.runs {
            let order = rank_indices(n, 1, 0, 0, run as u64);
            let start = Instant::now();
            for chunk in order.chunks(args.batch_size) {
                let b = chunk.len();
                fill_batch(&split, chunk, 0, run as u64, augment, &mut images[..b * IMAGE_BYTES], &mut labels[..b]);
                std::hint::black_box(&images);
            }
            rates.push(n as f64 / start.elapsed().as_secs_f64());
        }
        let what = if augment { "augmented" } else { "normalised only" };
        println!("fill_batch, 1 thread, {what}: {:.0} images/s", median(rates));
    }

    let mut rates = Vec::new();
    for run in 0..args.runs {
        let order = rank_indices(n, 1, 0, 0, run as u64);
        let start = Instant::now();
        let mut seen = 0usize;
        for batch in Loader::new(split.clone(), order, args.batch_size, 0, run as u64, true, 0) {
            seen += batch.indices.len();
            std::hint::black_box(&batch.images);
        }
        anyhow::ensure!(seen == n, "loader yielded {seen} of {n} images");
        rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    println!("Loader end to end, augmented, to CPU tensors: {:.0} images/s", median(rates));
    Ok(())
}
