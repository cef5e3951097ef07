//! `--grad-compression` on the real ring (threads over loopback sockets, as
//! `collective.rs`): what 16-bit gradient all-reduces return, how many bytes they send, and
//! that `none` is still exactly the f32 all-reduce.
//!
//! The reference model every result is compared with is the ring's documented order of
//! summation (`worker/src/collective/schedule.rs`): segment s starts at rank s and travels
//! s → s+1 → … → s+N−1, each rank adding its own values, so its f32 sum is
//! `x[s+N−1] + (… + (x[s+1] + x[s]))`; with 16-bit compression every hop's partial sum is
//! rounded to 16 bits before the receiver adds its f32 values, and the complete sum is
//! rounded once more before the all-gather hands it to every rank.

mod support;

use cvdist_worker::collective::compress::Wire;
use cvdist_worker::collective::{all_reduce_buckets, Collective, CollectiveError, GradCompression, Ring};
use cvdist_worker::train::scaler::{GradScaler, INIT_SCALE};
use std::time::Duration;

const SECRET: &str = "grad-compression-test";
const TIMEOUT: Duration = Duration::from_secs(30);
const OP_HEADER: u64 = 32;

/// Runs `f(rank, ring)` on `n` threads over a freshly connected loopback ring.
fn with_ring<R: Send + 'static>(n: usize, f: impl Fn(usize, Ring) -> R + Send + Sync + 'static) -> Vec<R> {
    support::with_ring(n, SECRET, TIMEOUT, f)
}

/// Gradient-like values: both signs, magnitudes from 1e-4 to 10, different on every rank,
/// none of them exactly representable in 16 bits.
fn grads(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = ((i * 7 + rank * 13) as f32 * 0.618_034).sin();
            x * 10f32.powi((i % 6) as i32 - 4) * (1.0 + 1.234_567e-3 * rank as f32)
        })
        .collect()
}

/// Start and length of segment `s` of `len` values over `n` ranks (`schedule::split`).
fn segment(len: usize, n: usize, s: usize) -> (usize, usize) {
    let (base, rem) = (len / n, len % n);
    (s * base + s.min(rem), base + usize::from(s < rem))
}

fn rounded(wire: Wire, x: f32) -> f32 {
    if wire == Wire::F32 {
        return x;
    }
    let mut w = [0u16];
    let mut back = [0f32];
    wire.encode(&[x], &mut w);
    wire.decode(&w, &mut back);
    back[0]
}

/// The ring's result, computed independently in the ring's order (module docs).
fn model(inputs: &[Vec<f32>], wire: Wire) -> Vec<f32> {
    let (n, len) = (inputs.len(), inputs[0].len());
    let mut out = vec![0f32; len];
    for s in 0..n {
        let (start, l) = segment(len, n, s);
        for i in start..start + l {
            let mut acc = inputs[s][i];
            for k in 1..n {
                acc = inputs[(s + k) % n][i] + rounded(wire, acc);
            }
            out[i] = rounded(wire, acc);
        }
    }
    out
}

/// Elements this rank sends in one all-reduce: one segment per step, 2(N−1) steps.
fn elems_sent(len: usize, n: usize, rank: usize) -> u64 {
    (0..2 * (n - 1)).map(|step| segment(len, n, (rank + 2 * n - step) % n).1 as u64).sum()
}

/// Runs one all-reduce of `grads(rank, len)` under `c` on every rank; returns each rank's
/// result and the bytes it sent for the op.
fn reduce(n: usize, len: usize, c: GradCompression, chunk_bytes: Option<usize>) -> Vec<(Vec<f32>, u64)> {
    with_ring(n, move |rank, mut ring| {
        if let Some(b) = chunk_bytes {
            ring.set_chunk_bytes(b);
        }
        ring.set_grad_compression(c).unwrap();
        assert_eq!(ring.grad_compression(), c);
        let mut buf = grads(rank, len);
        let before = ring.bytes_sent();
        ring.all_reduce_sum_grads(&mut buf).unwrap_or_else(|e| panic!("n={n} len={len} rank {rank} {c}: {e}"));
        (buf, ring.bytes_sent() - before)
    })
}

/// bf16 and fp16: every rank holds the same bits, exactly what the model of the ring's
/// order predicts, within the 16-bit rounding bound of the exact mean, and each rank sent
/// two bytes per value (plus the op header). Inline (small) and pipelined (large, many
/// chunks) ops alike.
#[test]
fn sixteen_bit_all_reduce_is_identical_on_every_rank_and_within_the_rounding_bound() {
    for (c, u, floor) in
        [(GradCompression::Bf16, 2f64.powi(-8), 0.0), (GradCompression::Fp16, 2f64.powi(-11), 2f64.powi(-25))]
    {
        let wire = Wire::of(c);
        for n in [2usize, 3, 4] {
            // 1,001 values run inline; 300,007 pipelined, in 4 KiB chunks (many per segment).
            for (len, chunk) in [(1001usize, None), (300_007, Some(4096))] {
                let results = reduce(n, len, c, chunk);
                let inputs: Vec<Vec<f32>> = (0..n).map(|r| grads(r, len)).collect();
                let want = model(&inputs, wire);
                for (rank, (got, sent)) in results.iter().enumerate() {
                    assert!(
                        got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{c} n={n} len={len}: rank {rank} differs from the ring-order model at {:?}",
                        got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits())
                    );
                    assert_eq!(*sent, OP_HEADER + 2 * elems_sent(len, n, rank), "{c} n={n} len={len} rank {rank}");
                }
                let mut worst = 0f64;
                for i in 0..len {
                    let exact: f64 = inputs.iter().map(|x| x[i] as f64).sum();
                    let magnitude: f64 = inputs.iter().map(|x| (x[i] as f64).abs()).sum();
                    // N−1 hop roundings and the final one, each ≤ u·Σ|x|, and f32's own
                    // additions (≤ 2^-24 each); as a mean, everything divided by N.
                    let bound = (n as f64 * u + n as f64 * 2f64.powi(-24)) * magnitude + n as f64 * floor;
                    let err = (results[0].0[i] as f64 - exact).abs();
                    assert!(err <= bound, "{c} n={n} i={i}: |{} - {exact}| = {err} > {bound}", results[0].0[i]);
                    worst = worst.max(err / magnitude.max(1e-30));
                }
                // The values really were rounded to 16 bits (the test would pass vacuously
                // on an f32 wire otherwise): the worst relative error is of the 16-bit order.
                assert!(worst > u / 16.0, "{c} n={n} len={len}: worst relative error {worst} looks like f32");
            }
        }
    }
}

/// `none` is the f32 all-reduce of before: bit for bit the ring-order f32 sum, the same
/// bits as `all_reduce_sum`, four bytes per value.
#[test]
fn none_is_bit_identical_to_the_f32_all_reduce() {
    for n in [2usize, 3] {
        for (len, chunk) in [(1001usize, None), (300_007, Some(4096))] {
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| grads(r, len)).collect();
            let want = model(&inputs, Wire::F32);
            let results = with_ring(n, move |rank, mut ring| {
                if let Some(b) = chunk {
                    ring.set_chunk_bytes(b);
                }
                assert_eq!(ring.grad_compression(), GradCompression::None, "the default");
                ring.set_grad_compression(GradCompression::None).unwrap();
                let mut plain = grads(rank, len);
                ring.all_reduce_sum(&mut plain).unwrap();
                let before = ring.bytes_sent();
                let mut grad = grads(rank, len);
                ring.all_reduce_sum_grads(&mut grad).unwrap();
                let sent = ring.bytes_sent() - before;
                // And the trainer's entry point: a CPU tensor bucket.
                let mut t = tch::Tensor::from_slice(&grads(rank, len));
                ring.reduce_tensor_sum(&mut t).unwrap();
                let mut via_tensor = vec![0f32; len];
                t.copy_data(&mut via_tensor, len);
                (plain, grad, via_tensor, sent)
            });
            for (rank, (plain, grad, via_tensor, sent)) in results.iter().enumerate() {
                for v in [plain, grad, via_tensor] {
                    assert!(
                        v.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "n={n} len={len} rank {rank}"
                    );
                }
                assert_eq!(*sent, OP_HEADER + 4 * elems_sent(len, n, rank));
            }
        }
    }
}

/// Only the gradient all-reduce is compressed: broadcasts, plain all-reduces (BatchNorm
/// statistics, metrics, votes) and barriers stay exact f32 under bf16 and fp16; the
/// trainer's tensor entry point and bucketed host buffers are compressed.
#[test]
fn only_the_gradient_all_reduce_is_compressed() {
    for c in [GradCompression::Bf16, GradCompression::Fp16] {
        let n = 3;
        let len = 5000;
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| grads(r, len)).collect();
        let (exact, compressed) = (model(&inputs, Wire::F32), model(&inputs, Wire::of(c)));
        let results = with_ring(n, move |rank, mut ring| {
            ring.set_grad_compression(c).unwrap();
            let mut plain = grads(rank, len);
            ring.all_reduce_sum(&mut plain).unwrap();
            let mut weights = if rank == 1 { grads(7, len) } else { vec![0.0; len] };
            ring.broadcast(&mut weights, 1).unwrap();
            ring.barrier().unwrap();
            let mut t = tch::Tensor::from_slice(&grads(rank, len));
            ring.reduce_tensor_sum(&mut t).unwrap();
            let mut bucket = vec![0f32; len];
            t.copy_data(&mut bucket, len);
            // The trainer-style bucket loop over host memory, buckets of 1,000 values.
            let mut pieces = grads(rank, len);
            all_reduce_buckets(&mut ring, &mut pieces, 1000).unwrap();
            (plain, weights, bucket, pieces)
        });
        let piecewise: Vec<f32> = (0..len)
            .step_by(1000)
            .flat_map(|s| model(&inputs.iter().map(|x| x[s..s + 1000].to_vec()).collect::<Vec<_>>(), Wire::of(c)))
            .collect();
        for (rank, (plain, weights, bucket, pieces)) in results.iter().enumerate() {
            assert!(plain.iter().zip(&exact).all(|(a, b)| a.to_bits() == b.to_bits()), "{c} rank {rank}");
            assert_eq!(weights, &grads(7, len), "{c} rank {rank}: broadcast must be exact");
            assert!(bucket.iter().zip(&compressed).all(|(a, b)| a.to_bits() == b.to_bits()), "{c} rank {rank}");
            assert!(pieces.iter().zip(&piecewise).all(|(a, b)| a.to_bits() == b.to_bits()), "{c} rank {rank}");
        }
        assert_ne!(exact, compressed, "{c}: the compressed sum must differ somewhere");
    }
}

/// fp16 overflow: a sum beyond ±65504 (65520 and up rounds to inf) becomes ±inf on every
/// rank, the same bits everywhere, and the rank whose rounding overflowed counts it; bf16
/// (f32's range) keeps it finite. Non-finite inputs (the trainer's divergence flag carries
/// a rank's non-finite loss in the gradient all-reduce) stay non-finite, and 0 stays 0.
#[test]
fn fp16_overflow_becomes_inf_on_every_rank_and_is_counted() {
    let input = |rank: usize| -> Vec<f32> {
        let mut v = grads(rank, 64);
        v[3] = 40_960.0; // two ranks: 81,920, beyond fp16 (exact in bf16)
        v[4] = -40_960.0;
        v[5] = 30_720.0; // 61,440: still finite in fp16 (and exact in both formats)
        v[6] = 0.0;
        v[7] = if rank == 1 { f32::NAN } else { 0.0 };
        v[8] = if rank == 0 { f32::INFINITY } else { 1.0 };
        v
    };
    for c in [GradCompression::Fp16, GradCompression::Bf16] {
        let results = with_ring(2, move |rank, mut ring| {
            ring.set_grad_compression(c).unwrap();
            let mut v = input(rank);
            ring.all_reduce_sum_grads(&mut v).unwrap();
            (v, ring.wire_overflows())
        });
        let (a, b) = (&results[0].0, &results[1].0);
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{c}: ranks differ");
        assert_eq!(a[5], 61_440.0, "{c}");
        assert_eq!((a[6], a[6].is_sign_positive()), (0.0, true), "{c}");
        assert!(a[7].is_nan(), "{c}: a NaN flag must survive");
        assert_eq!(a[8], f32::INFINITY, "{c}");
        let overflows: u64 = results.iter().map(|r| r.1).sum();
        if c == GradCompression::Fp16 {
            assert_eq!((a[3], a[4]), (f32::INFINITY, f32::NEG_INFINITY));
            assert!(overflows >= 2, "both overflowing sums are counted: {overflows}");
        } else {
            assert_eq!((a[3], a[4]), (81_920.0, -81_920.0));
            assert_eq!(overflows, 0);
        }
    }
}

/// Under `--precision fp16` the gradients in the buckets are multiplied by the loss
/// scale (2^16 to start with), so an fp16 wire overflows easily; the GradScaler finds the
/// inf in the averaged gradients, skips the step and halves the scale, exactly as for an
/// overflow in the backward pass, until the scaled sums fit.
#[test]
fn with_loss_scaling_an_fp16_wire_overflow_skips_the_step_and_backs_the_scale_off() {
    let results = with_ring(2, move |rank, mut ring| {
        ring.set_grad_compression(GradCompression::Fp16).unwrap();
        let mut scaler = GradScaler::new(tch::Device::Cpu);
        // True gradients 0.5 and 0.75 on the two ranks: scaled by 2^16, their sum is
        // 81,920, beyond fp16; at half the scale it is 40,960 and fits.
        let true_grad = [0.5f32, 0.75][rank];
        let mut verdicts = vec![];
        for _ in 0..2 {
            let scale = scaler.state().scale as f32;
            let mut bucket = tch::Tensor::from_slice(&[true_grad * scale, 0.001 * scale]);
            ring.reduce_tensor_sum(&mut bucket).unwrap();
            let mut buckets = [bucket];
            scaler.unscale_all(&mut buckets, 0.5).unwrap();
            let applied = scaler.update().unwrap();
            verdicts.push((applied, scaler.state().scale, buckets[0].double_value(&[0])));
        }
        verdicts
    });
    for v in &results {
        assert_eq!((v[0].0, v[0].1), (false, INIT_SCALE / 2.0), "first step skipped, scale halved: {v:?}");
        assert!(v[1].0, "second step applied: {v:?}");
        // The mean of 0.5 and 0.75, within fp16's rounding.
        assert!((v[1].2 - 0.625).abs() <= 0.625 * 2f64.powi(-10), "{v:?}");
    }
    assert_eq!(results[0], results[1], "both ranks take the same decisions");
}

/// Ranks that disagree on the format (a bug, since every rank reads one spec) fail with a
/// protocol error naming both ops instead of summing misread bytes.
#[test]
fn ranks_with_different_compression_fail_loudly() {
    let results = with_ring(2, move |rank, mut ring| {
        let c = if rank == 0 { GradCompression::Bf16 } else { GradCompression::None };
        ring.set_grad_compression(c).unwrap();
        let mut v = grads(rank, 100);
        ring.all_reduce_sum_grads(&mut v)
    });
    let mut protocol = 0;
    for r in &results {
        match r {
            Err(CollectiveError::Protocol(m)) => {
                assert!(m.contains("all_reduce_bf16") && m.contains("all_reduce #1"), "{m}");
                protocol += 1;
            }
            Err(_) => {}
            Ok(()) => panic!("a mismatched op succeeded: {results:?}"),
        }
    }
    assert!(protocol >= 1, "{results:?}");
}
