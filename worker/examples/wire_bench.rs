//! Times the ring's 16-bit wire conversions on one core: what a hop does to the values it
//! sends (encode f32 → bf16) and receives (widen bf16 and add into the f32 partial sum),
//! cvdist's vectorised bf16 code against the `half` crate's one-value-at-a-time
//! conversion (the code the wire used before), over the gradients of a model's size.
//! Prints the CPU's SIMD features, medians of ns per value, and ours / half.
//!
//! ```text
//! cargo run --release -p cvdist-worker --example wire_bench -- [--values 11173962] [--rounds 15]
//! ```

use clap::Parser;
use cvdist_worker::collective::compress::bf16_simd;
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Values per conversion (default: ResNet-18's parameter count).
    #[arg(long, default_value_t = 11_173_962)]
    values: usize,
    /// Timed rounds per conversion (the median is printed).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
}

fn median_ns_per_value(rounds: usize, values: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm the caches and page in the buffers
    let mut t: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e9 / values as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let a = Args::parse();
    #[cfg(target_arch = "x86_64")]
    let features = ["sse2", "avx2", "avx512f", "avx512bf16", "f16c"]
        .iter()
        .filter(|f| match **f {
            "sse2" => std::is_x86_feature_detected!("sse2"),
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bf16" => std::is_x86_feature_detected!("avx512bf16"),
            _ => std::is_x86_feature_detected!("f16c"),
        })
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    #[cfg(not(target_arch = "x86_64"))]
    let features = String::from("not x86-64");
    let src: Vec<f32> = (0..a.values).map(|i| ((i as f32) * 0.618).sin() * 1e-3).collect();
    let mut words = vec![0u16; a.values];
    let mut acc = vec![0f32; a.values];
    let mut scratch = vec![0f32; a.values];
    let n = a.values;

    let enc_ours = median_ns_per_value(a.rounds, n, || bf16_simd::encode(&src, &mut words));
    let enc_half = median_ns_per_value(a.rounds, n, || bf16_simd::reference::encode(&src, &mut words));
    let add_ours = median_ns_per_value(a.rounds, n, || bf16_simd::decode_add(&words, &mut acc));
    let add_half = median_ns_per_value(a.rounds, n, || {
        bf16_simd::reference::decode(&words, &mut scratch);
        acc.iter_mut().zip(&scratch).for_each(|(d, s)| *d += *s);
    });
    println!("wire_bench: CPU features {features}; {n} values, median of {} rounds, one thread", a.rounds);
    println!("{:<28} {:>10} {:>10} {:>11}", "bf16 conversion", "ours ns/v", "half ns/v", "ours/half");
    println!("{:<28} {enc_ours:>10.3} {enc_half:>10.3} {:>11.3}", "encode (send)", enc_ours / enc_half);
    println!("{:<28} {add_ours:>10.3} {add_half:>10.3} {:>11.3}", "widen + add (receive)", add_ours / add_half);
    // Keep the results observable so that the loops are not optimised away.
    let check: f64 = acc.iter().step_by(4096).map(|&x| f64::from(x)).sum::<f64>() + f64::from(words[n / 2]);
    eprintln!("wire_bench: checksum {check:e}");
}
