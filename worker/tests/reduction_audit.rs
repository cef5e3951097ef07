//! The reduction audit (`CVDIST_AUDIT_REDUCTIONS`) on real communicators: it accepts what
//! the ring and gloo really produce with each gradient wire, rejects a result corrupted on
//! one rank, and a job with it switched on trains as usual.

mod support;

use cvdist_worker::collective::GradCompression;
use cvdist_worker::train::reduction_audit::ReductionAudit;
use std::time::Duration;
use support::{with_comm, COMMS};
use tch::Tensor;

const SECRET: &str = "audit-test-secret";
const TIMEOUT: Duration = Duration::from_secs(30);

fn bucket(rank: usize, b: usize, len: usize) -> Tensor {
    let v: Vec<f32> = (0..len)
        .map(|i| {
            let x = ((i * 31 + b * 3) % 101) as f32 * 0.013 - 0.6;
            // Every third element nearly cancels across ranks (rank 1 sends about minus
            // rank 0's value), as gradients of opposite sign do: the sum is small, and a
            // 16-bit wire's error is bounded by the ranks' magnitudes, not by the sum's.
            match (i % 3, rank) {
                (0, 0) => x,
                (0, 1) => -x * 1.0078125 + 1e-4,
                (0, _) => 3e-5,
                _ => ((i * 31 + rank * 7 + b * 3) % 101) as f32 * 0.013 - 0.6,
            }
        })
        .collect();
    Tensor::from_slice(&v)
}

/// What a test does to the buckets of one step: (step, rank, buckets).
type Touch = fn(usize, usize, &mut [Tensor]);

fn untouched(_: usize, _: usize, _: &mut [Tensor]) {}

/// Two steps of three buckets on 3 ranks, per communicator and wire; `sent` changes the
/// buckets before they are handed to the all-reduce, `reduced` after it.
fn audited(sent: Touch, reduced: Touch) -> Vec<(String, Vec<Result<(), String>>)> {
    let mut out = Vec::new();
    for kind in COMMS {
        for wire in [GradCompression::None, GradCompression::Bf16, GradCompression::Fp16] {
            let got = with_comm(kind, 3, SECRET, TIMEOUT, move |rank, mut c| {
                c.set_grad_compression(wire).unwrap();
                let mut audit = ReductionAudit::new(2);
                let mut ends = Vec::new();
                for step in 0..2 {
                    let mut grads: Vec<Tensor> = (0..3).map(|b| bucket(rank, b + step, 1000 + 17 * b)).collect();
                    sent(step, rank, &mut grads);
                    for g in &mut grads {
                        audit.before(g).unwrap();
                        c.start_reduce_grads(g).unwrap();
                    }
                    c.finish_reduce_grads().unwrap();
                    reduced(step, rank, &mut grads);
                    ends.push(audit.after_step(c.as_mut()).map_err(|e| e.to_string()));
                }
                assert!(!audit.active(), "two steps audited, then none");
                ends
            });
            for (rank, ends) in got.into_iter().enumerate() {
                out.push((format!("{kind:?} {wire} rank {rank}"), ends));
            }
        }
    }
    out
}

#[test]
fn real_reductions_pass_the_audit_with_every_wire() {
    for (who, ends) in audited(untouched, untouched) {
        assert!(ends.iter().all(|r| r.is_ok()), "{who}: {ends:?}");
    }
}

/// Half a unit more in one element of one rank's result is caught at that step: the rank
/// that holds it sees the sum differ, every rank sees the ranks disagree.
#[test]
fn a_result_corrupted_on_one_rank_fails_the_audit_on_every_rank() {
    let corrupt: Touch = |step, rank, grads| {
        if step == 1 && rank == 1 {
            let _ = grads[2].narrow(0, 5, 1).g_add_scalar_(0.5);
        }
    };
    for (who, ends) in audited(untouched, corrupt) {
        assert!(ends[0].is_ok(), "{who}: the clean step passes: {:?}", ends[0]);
        let err = ends[1].as_ref().expect_err(&who);
        assert!(err.contains("reduction audit failed at step 1, bucket 2, element 5"), "{who}: {err}");
    }
}

/// An overflowed gradient (an fp16 loss scale too large) sent by one rank must reach every
/// rank's result, where the loss scaler looks for it: it passes the audit on every wire; a
/// result from which it vanished on one rank fails it.
#[test]
fn an_overflow_must_reach_every_rank() {
    let overflow: Touch = |step, rank, grads| {
        if step == 1 && rank == 2 {
            let _ = grads[0].narrow(0, 7, 1).fill_(f64::INFINITY);
        }
    };
    for (who, ends) in audited(overflow, untouched) {
        assert!(ends.iter().all(|r| r.is_ok()), "{who}: {ends:?}");
    }
    let vanished: Touch = |step, rank, grads| {
        if step == 1 && rank == 0 {
            let _ = grads[0].narrow(0, 7, 1).fill_(0.0);
        }
    };
    for (who, ends) in audited(overflow, vanished) {
        assert!(ends[0].is_ok(), "{who}: {:?}", ends[0]);
        if who.ends_with("rank 0") {
            let err = ends[1].as_ref().expect_err(&who);
            assert!(
                err.contains("bucket 0, element 7") && err.contains("overflow must reach every rank"),
                "{who}: {err}"
            );
        }
    }
}
