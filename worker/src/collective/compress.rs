//! 16-bit gradient wire (`--grad-compression bf16|fp16`): how the ring's compressed
//! all-reduce turns f32 values into 16-bit words and back.
//!
//! Only the values on the link are 16-bit. Every rank keeps its buffer in f32: a hop's
//! receiver widens the 16-bit partial sum back to f32 and adds its own f32 values to it
//! in f32, so the rounding error is one 16-bit rounding per hop, not per addition of
//! 16-bit numbers. When a chunk's sum is complete (the last reduce-scatter step) its
//! owner rounds its own f32 copy to the 16-bit value it will send, so after the
//! all-gather every rank, the owner included, holds exactly the same numbers
//! ([`Wire::round`]).
//!
//! Rounding is IEEE round-to-nearest-even. bf16 is converted here, by a branch-free loop
//! the compiler turns into SIMD (AVX2 where the CPU has it, chosen at run time, SSE2
//! otherwise): the `half` crate converts bf16 one value at a time with branches, which
//! put the conversion on the ring's critical path (a hop's receive, add and forward) and
//! took the cores backward needs (`examples/wire_bench.rs` times both). fp16 uses `half`,
//! which already converts with the CPU's F16C instructions. A value too large for the
//! format becomes ±inf; for fp16 that is any magnitude of 65520 or more (half-way past
//! the largest finite fp16, 65504), for bf16 only values beyond f32's own range. NaN and
//! ±inf stay NaN and ±inf, so a non-finite gradient or divergence flag survives the wire.
//! fp16 also loses magnitudes below 2^-25 (about 3e-8, half its smallest subnormal) to 0.
//!
//! Error bound (documented in docs/RELIABILITY.md and asserted by
//! `worker/tests/grad_compression.rs`): with unit roundoff u (2^-8 for bf16, 2^-11 for
//! fp16), each of the N−1 hops of a chunk and the final rounding add at most
//! u·Σ|x_r| (the partial sums never exceed the sum of magnitudes), so over N ranks
//! |result − Σx_r| ≤ N·u·Σ|x_r| plus f32 rounding and, for fp16, N·2^-25 of underflow.

use cvdist_common::choices::GradCompression;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// The number format of an op's values on the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// 4-byte f32, sent as it is: every collective except a compressed gradient all-reduce.
    F32,
    Bf16,
    Fp16,
}

impl Wire {
    /// The format gradients travel in under `c`.
    pub fn of(c: GradCompression) -> Wire {
        match c {
            GradCompression::None => Wire::F32,
            GradCompression::Bf16 => Wire::Bf16,
            GradCompression::Fp16 => Wire::Fp16,
        }
    }

    /// Bytes one value takes on the link.
    pub fn bytes_per_value(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::Bf16 | Wire::Fp16 => 2,
        }
    }

    /// Rounds `src` into the 16-bit words `dst` (same length). Returns how many finite
    /// values became ±inf (overflow; only fp16 is likely to see any).
    ///
    /// # Panics
    /// On `Wire::F32` (which is never encoded) or different lengths: both are bugs of
    /// the executor, not anything a peer controls.
    pub fn encode(self, src: &[f32], dst: &mut [u16]) -> usize {
        assert_eq!(src.len(), dst.len(), "encode: slices of different lengths");
        match self {
            Wire::Bf16 => bf16_simd::encode(src, dst),
            Wire::Fp16 => dst.reinterpret_cast_mut::<f16>().convert_from_f32_slice(src),
            Wire::F32 => panic!("f32 values are sent as they are, not encoded"),
        }
        self.overflows(src, dst)
    }

    /// Widens the 16-bit words `src` into `dst` (same length), exactly.
    pub fn decode(self, src: &[u16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "decode: slices of different lengths");
        match self {
            Wire::Bf16 => bf16_simd::decode(src, dst),
            Wire::Fp16 => src.reinterpret_cast::<f16>().convert_to_f32_slice(dst),
            Wire::F32 => panic!("f32 values are received as they are, not decoded"),
        }
    }

    /// Adds the widened 16-bit words `src` to `dst` (same length): [`Wire::decode`] into a
    /// scratch buffer and an f32 add, in one pass for bf16. `scratch` (same length) is
    /// used for fp16 only.
    ///
    /// # Panics
    /// As [`Wire::decode`].
    pub fn decode_add(self, src: &[u16], dst: &mut [f32], scratch: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "decode_add: slices of different lengths");
        match self {
            Wire::Bf16 => bf16_simd::decode_add(src, dst),
            _ => {
                self.decode(src, scratch);
                dst.iter_mut().zip(scratch.iter()).for_each(|(d, s)| *d += *s);
            }
        }
    }

    /// Replaces every value of `buf` by its 16-bit rounding (still stored as f32), using
    /// `tmp` (any non-empty length; `buf` is rounded in pieces of that size) as scratch. Returns the
    /// number of finite values that became ±inf. Rounding is idempotent: a rounded value
    /// encodes to the same word and decodes back to itself.
    pub fn round(self, buf: &mut [f32], tmp: &mut [u16]) -> usize {
        let mut overflows = 0;
        for piece in buf.chunks_mut(tmp.len()) {
            let words = &mut tmp[..piece.len()];
            overflows += self.encode(piece, words);
            self.decode(words, piece);
        }
        overflows
    }

    fn overflows(self, src: &[f32], dst: &[u16]) -> usize {
        // Exponent all ones and mantissa zero: ±inf in either format.
        let inf_bits: u16 = match self {
            Wire::Bf16 => 0x7f80,
            Wire::Fp16 => 0x7c00,
            Wire::F32 => return 0,
        };
        src.iter().zip(dst).filter(|(x, w)| x.is_finite() && (**w & 0x7fff) == inf_bits).count()
    }
}

/// bf16 conversions over slices, written branch-free so that they vectorise, compiled
/// twice (baseline x86-64 and AVX2) and picked once per call by the CPU's features.
pub mod bf16_simd {
    /// The bf16 word of the f32 with bits `x`, rounded to nearest, ties to even: adding
    /// `0x7fff` plus the lowest kept bit carries into the kept bits exactly when the
    /// dropped half is above the tie, or at the tie with an odd kept part (IEEE 754
    /// roundTiesToEven). A NaN keeps its sign and top payload bits and is made quiet (bit
    /// 6 of the word), so it cannot round to infinity. Values past bf16's largest finite
    /// become ±inf.
    #[inline(always)]
    pub fn word(x: u32) -> u16 {
        let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
        let quiet_nan = (x >> 16) | 0x0040;
        let is_nan = (x & 0x7fff_ffff) > 0x7f80_0000;
        (if is_nan { quiet_nan } else { rounded }) as u16
    }

    #[inline(always)]
    fn encode_portable(src: &[f32], dst: &mut [u16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = word(s.to_bits());
        }
    }

    #[inline(always)]
    fn decode_portable(src: &[u16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(*s) << 16);
        }
    }

    #[inline(always)]
    fn decode_add_portable(src: &[u16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += f32::from_bits(u32::from(*s) << 16);
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        // SAFETY (all three): callers check `is_x86_feature_detected!("avx2")` first.
        #[target_feature(enable = "avx2")]
        pub unsafe fn encode(src: &[f32], dst: &mut [u16]) {
            super::encode_portable(src, dst)
        }
        #[target_feature(enable = "avx2")]
        pub unsafe fn decode(src: &[u16], dst: &mut [f32]) {
            super::decode_portable(src, dst)
        }
        #[target_feature(enable = "avx2")]
        pub unsafe fn decode_add(src: &[u16], dst: &mut [f32]) {
            super::decode_add_portable(src, dst)
        }
    }

    fn has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Rounds every f32 of `src` to its bf16 word in `dst` (same length; the shorter
    /// length is used otherwise).
    pub fn encode(src: &[f32], dst: &mut [u16]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2::encode(src, dst) };
        }
        encode_portable(src, dst)
    }

    /// Widens every bf16 word of `src` into `dst`, exactly.
    pub fn decode(src: &[u16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2::decode(src, dst) };
        }
        decode_portable(src, dst)
    }

    /// `dst[i] += widened src[i]`, in f32.
    pub fn decode_add(src: &[u16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2::decode_add(src, dst) };
        }
        decode_add_portable(src, dst)
    }

    /// The same conversions through the `half` crate (one value at a time): the reference
    /// the tests compare with and the baseline `examples/wire_bench.rs` times.
    pub mod reference {
        use half::bf16;
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

        pub fn encode(src: &[f32], dst: &mut [u16]) {
            dst.reinterpret_cast_mut::<bf16>().convert_from_f32_slice(src)
        }

        pub fn decode(src: &[u16], dst: &mut [f32]) {
            src.reinterpret_cast::<bf16>().convert_to_f32_slice(dst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(w: Wire, x: f32) -> f32 {
        let mut word = [0u16];
        w.encode(&[x], &mut word);
        let mut back = [0f32];
        w.decode(&word, &mut back);
        back[0]
    }

    #[test]
    fn exact_values_survive_and_others_round_to_nearest_even() {
        for w in [Wire::Bf16, Wire::Fp16] {
            for x in [0.0f32, -0.0, 1.0, -2.5, 0.125, 3.0, 256.0, f32::INFINITY, f32::NEG_INFINITY] {
                assert_eq!(roundtrip(w, x).to_bits(), x.to_bits(), "{w:?} {x}");
            }
            assert!(roundtrip(w, f32::NAN).is_nan());
        }
        // bf16 keeps 8 significant bits: 1 + 2^-8 is a tie and rounds to even (1.0);
        // 1 + 3·2^-9 rounds up to 1 + 2^-7.
        assert_eq!(roundtrip(Wire::Bf16, 1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(roundtrip(Wire::Bf16, 1.0 + 3.0 * 2f32.powi(-9)), 1.0 + 2f32.powi(-7));
        // fp16 keeps 11.
        assert_eq!(roundtrip(Wire::Fp16, 1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(roundtrip(Wire::Fp16, 1.0 + 3.0 * 2f32.powi(-12)), 1.0 + 2f32.powi(-10));
        // Relative error at most 2^-8 / 2^-11 on arbitrary values, plus for fp16 half its
        // subnormal spacing (2^-25) below its normal range.
        for i in 1..2000 {
            let x = (i as f32 * 0.7371).sin() * 10f32.powi(i % 9 - 5);
            for (w, u, floor) in [(Wire::Bf16, 2f32.powi(-8), 0.0), (Wire::Fp16, 2f32.powi(-11), 2f32.powi(-25))] {
                assert!((roundtrip(w, x) - x).abs() <= u * x.abs() + floor, "{w:?} {x}");
            }
        }
    }

    /// The vectorised bf16 conversion gives the `half` crate's word for every f32 bit
    /// pattern sampled (every 61st of the 2^32, which covers every exponent, both signs,
    /// ties, NaNs and infinities, plus the edges), on both code paths.
    #[test]
    fn bf16_words_equal_the_half_crates_for_every_sampled_bit_pattern() {
        let mut bits: Vec<u32> = (0..u32::MAX / 61).map(|k| k * 61).collect();
        bits.extend([0, 0x8000_0000, 0x7f7f_ffff, 0x7f80_0000, 0x7f80_0001, 0x7fc0_0000, 0xffff_ffff, 0x3f80_8000]);
        bits.extend([0x3f81_8000, 0x0000_8000, 0x0001_8000, 0x0000_7fff]);
        let src: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut want = vec![0u16; src.len()];
        bf16_simd::reference::encode(&src, &mut want);
        let mut got = vec![0u16; src.len()];
        bf16_simd::encode(&src, &mut got);
        let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
        assert_eq!(first_bad.map(|i| (bits[i], got[i], want[i])), None, "(f32 bits, ours, half's)");
        for (i, &b) in bits.iter().enumerate().step_by(4099) {
            assert_eq!(bf16_simd::word(b), want[i], "scalar path, bits {b:#x}");
        }
        let mut back = vec![0f32; src.len()];
        let mut back_ref = vec![0f32; src.len()];
        bf16_simd::decode(&got, &mut back);
        bf16_simd::reference::decode(&want, &mut back_ref);
        assert!(back.iter().zip(&back_ref).all(|(a, b)| a.to_bits() == b.to_bits()), "widening");
        let mut sum: Vec<f32> = (0..got.len()).map(|i| i as f32 * 0.25).collect();
        let mut scratch = vec![0f32; got.len()];
        Wire::Bf16.decode_add(&got, &mut sum, &mut scratch);
        for (i, (s, r)) in sum.iter().zip(&back_ref).enumerate().step_by(997) {
            assert_eq!(s.to_bits(), (i as f32 * 0.25 + r).to_bits(), "decode_add at {i}");
        }
    }

    #[test]
    fn fp16_overflows_to_inf_and_says_so_bf16_does_not() {
        let src = [65504.0f32, 65519.0, 65520.0, -70000.0, 1e30, f32::INFINITY];
        let mut words = [0u16; 6];
        assert_eq!(Wire::Fp16.encode(&src, &mut words), 3, "65520, -70000 and 1e30 overflow; inf was already inf");
        let mut back = [0f32; 6];
        Wire::Fp16.decode(&words, &mut back);
        assert_eq!(back, [65504.0, 65504.0, f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY, f32::INFINITY]);
        assert_eq!(Wire::Bf16.encode(&src, &mut words), 0);
        Wire::Bf16.decode(&words, &mut back);
        assert!(back[..5].iter().all(|v| v.is_finite()));
        assert_eq!(Wire::Bf16.encode(&[f32::MAX], &mut words[..1]), 1, "f32::MAX rounds past bf16's largest");
        // Underflow: fp16's smallest subnormal is 2^-24; half of it and less become 0.
        assert_eq!(roundtrip(Wire::Fp16, 2f32.powi(-24)), 2f32.powi(-24));
        assert_eq!(roundtrip(Wire::Fp16, 2f32.powi(-26)), 0.0);
        assert_eq!(roundtrip(Wire::Bf16, 2f32.powi(-26)), 2f32.powi(-26));
    }

    #[test]
    fn rounding_is_idempotent_and_works_in_pieces() {
        for w in [Wire::Bf16, Wire::Fp16] {
            let mut buf: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.377).cos() * 100.0).collect();
            let mut tmp = [0u16; 7];
            w.round(&mut buf, &mut tmp);
            let once = buf.clone();
            let mut words = vec![0u16; buf.len()];
            assert_eq!(w.round(&mut buf, &mut words), 0);
            assert_eq!(buf, once, "{w:?}: a rounded value is its own rounding");
            for (x, r) in once.iter().zip(&buf) {
                assert_eq!(roundtrip(w, *x).to_bits(), r.to_bits());
            }
        }
        assert_eq!(Wire::of(GradCompression::None).bytes_per_value(), 4);
        assert_eq!(Wire::of(GradCompression::Bf16), Wire::Bf16);
        assert_eq!(Wire::of(GradCompression::Fp16).bytes_per_value(), 2);
    }
}
