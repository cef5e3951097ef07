//! Arithmetic precision of a run (`--precision fp32|bf16|fp16`) and autocast around the
//! forward pass.
//!
//! - fp32: no autocast.
//! - bf16: autocast to bfloat16 on CUDA and on CPU. bfloat16 has fp32's exponent range, so
//!   gradients cannot overflow the way fp16's do and no loss scaling is used (as
//!   `torch.autocast(dtype=torch.bfloat16)` without a GradScaler).
//! - fp16: CUDA autocast to float16 with dynamic loss scaling (`super::scaler`). On a CPU
//!   run it trains in fp32 with a warning, as `--amp` always did there.
//!
//! libtorch keeps a separate autocast switch and dtype per device type, per thread: CPU
//! autocast (dispatch key AutocastCPU, default dtype bfloat16) is independent of CUDA's
//! (default float16), and tch's `autocast` only turns on CUDA's with its default dtype. The
//! switches are set through a small C++ shim (csrc/autocast_shim.cpp).

use tch::Device;

pub use cvdist_common::choices::Precision;

/// What actually runs on `device` for `precision`: fp16 is a CUDA mode (see the module
/// comment), so a CPU run of an fp16 job trains in fp32.
pub fn effective(precision: Precision, device: Device) -> Precision {
    if precision == Precision::Fp16 && !device.is_cuda() {
        Precision::Fp32
    } else {
        precision
    }
}

unsafe extern "C" {
    fn cvdist_autocast_enter(cuda: i32, bf16: i32, prev_enabled: *mut i32, prev_dtype: *mut i32) -> i32;
    fn cvdist_autocast_exit(cuda: i32, prev_enabled: i32, prev_dtype: i32) -> i32;
    fn cvdist_autocast_state(cuda: i32, enabled: *mut i32, bf16: *mut i32) -> i32;
}

/// Restores the previous autocast state when dropped, also when `f` panics.
struct Restore {
    cuda: i32,
    prev_enabled: i32,
    prev_dtype: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: plain-integer FFI into the shim, which catches every C++ exception.
        let rc = unsafe { cvdist_autocast_exit(self.cuda, self.prev_enabled, self.prev_dtype) };
        if rc != 0 {
            tracing::warn!("libtorch refused to restore the autocast state");
        }
    }
}

/// Runs `f` (a forward pass) under autocast for `precision` on `device`'s device type.
pub fn autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> T {
    let bf16 = match effective(precision, device) {
        Precision::Fp32 => return f(),
        Precision::Bf16 => 1,
        Precision::Fp16 => 0,
    };
    let cuda = i32::from(device.is_cuda());
    let (mut prev_enabled, mut prev_dtype) = (0i32, 0i32);
    // SAFETY: plain-integer FFI; the out-pointers are valid locals.
    let rc = unsafe { cvdist_autocast_enter(cuda, bf16, &mut prev_enabled, &mut prev_dtype) };
    if rc != 0 {
        // Only reachable if libtorch's autocast tables reject the device type: train in fp32
        // rather than abort, and say so.
        tracing::warn!(precision = precision.as_str(), "libtorch would not enable autocast; this pass runs in fp32");
        return f();
    }
    let _restore = Restore { cuda, prev_enabled, prev_dtype };
    f()
}

/// (enabled, is-bfloat16) of the calling thread's autocast on `device`'s type; for tests.
pub fn autocast_state(device: Device) -> (bool, Option<bool>) {
    let (mut enabled, mut bf16) = (0i32, -1i32);
    // SAFETY: plain-integer FFI; the out-pointers are valid locals.
    let rc = unsafe { cvdist_autocast_state(i32::from(device.is_cuda()), &mut enabled, &mut bf16) };
    if rc != 0 {
        return (false, None);
    }
    (enabled != 0, if bf16 < 0 { None } else { Some(bf16 == 1) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// bf16 autocast on CPU: a matmul inside runs in bfloat16, the state is restored after,
    /// and fp32 leaves everything in float32.
    #[test]
    fn bf16_autocast_on_cpu_casts_and_restores() {
        let a = Tensor::randn([8, 8], (Kind::Float, Device::Cpu));
        let before = autocast_state(Device::Cpu);
        let inside = autocast(Device::Cpu, Precision::Bf16, || (a.matmul(&a).kind(), autocast_state(Device::Cpu)));
        assert_eq!(inside, (Kind::BFloat16, (true, Some(true))));
        assert_eq!(autocast_state(Device::Cpu), before);
        assert!(!before.0, "autocast is off outside");
        assert_eq!(autocast(Device::Cpu, Precision::Fp32, || a.matmul(&a).kind()), Kind::Float);
        // fp16 is a CUDA mode: on CPU it runs in fp32.
        assert_eq!(autocast(Device::Cpu, Precision::Fp16, || a.matmul(&a).kind()), Kind::Float);
    }
}
