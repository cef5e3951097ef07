//! CIFAR-10 training augmentation with torchvision semantics, in plain Rust.
//! Our own rather than an image crate's transforms or libtorch ops: it must match
//! torchvision bit for bit and draw its randomness per sample (below), neither of which
//! those give.
//!
//! Equivalent to `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ToTensor()`,
//! `Normalize(MEAN, STD)`:
//! - the image is zero-padded by 4 pixels in *pixel* space, so padding becomes
//!   `-mean/std` after normalisation;
//! - the crop's top/left offsets in the 40x40 padded image are uniform in `0..=8`;
//! - the crop is mirrored left-right with probability 1/2;
//! - pixels become `(v / 255 - mean[c]) / std[c]` in f32, in that order, so the values
//!   match torchvision's bit for bit.
//!
//! **Determinism.** The random choices for a sample are a pure function of
//! `(seed, epoch, dataset index)` — see [`augmentation_for`]. They do not depend on the
//! world size, the rank, the batch size, the position in the batch or the thread that
//! fills it. That is stronger than per-(seed, epoch, rank) random streams: a job resumed
//! mid-epoch, or re-run with a different number of workers, augments every sample exactly
//! as the original run did.

use cvdist_common::cifar::{CifarSplit, CHANNELS, IMAGE_BYTES, SIDE};

pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
/// Zero padding on each side before the random crop.
pub const PAD: usize = 4;
/// Crop offsets are drawn from `0..=MAX_OFFSET`.
pub const MAX_OFFSET: usize = 2 * PAD;

const PLANE: usize = SIDE * SIDE;

/// The random choices for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    /// Top of the crop in the padded 40x40 image, `0..=8`.
    pub offset_y: usize,
    /// Left of the crop in the padded 40x40 image, `0..=8`.
    pub offset_x: usize,
    /// Mirror the crop left-right.
    pub flip: bool,
}

impl Augmentation {
    /// The identity: a centred crop without flip.
    pub const NONE: Augmentation = Augmentation { offset_y: PAD, offset_x: PAD, flip: false };
}

/// SplitMix64's finaliser: a bijective mixer with full avalanche, so nearby keys
/// (consecutive indices, epochs) give unrelated outputs.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw from `0..n` using the high bits of `r` (bias below 2^-60).
fn below(r: u64, n: u64) -> usize {
    ((r as u128 * n as u128) >> 64) as usize
}

/// The augmentation of dataset sample `index` in `epoch` of a job with `seed`.
///
/// This is a stable contract: changing it changes every training run's data.
pub fn augmentation_for(seed: u64, epoch: u64, index: usize) -> Augmentation {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let key = mix64(mix64(mix64(seed ^ 0xc1fa_a0c0_0000_0001) ^ epoch) ^ index as u64);
    let draw = |k: u64| mix64(key.wrapping_add(k.wrapping_mul(GOLDEN)));
    Augmentation {
        offset_y: below(draw(1), MAX_OFFSET as u64 + 1),
        offset_x: below(draw(2), MAX_OFFSET as u64 + 1),
        flip: draw(3) >> 63 == 1,
    }
}

/// `LUT[c][v]` is the normalised value of byte `v` in channel `c`, computed exactly as
/// torchvision does (`v / 255` then `(x - mean) / std`, all f32). A table lookup replaces
/// a divide per pixel.
fn lut() -> &'static [[f32; 256]; CHANNELS] {
    static LUT: std::sync::OnceLock<[[f32; 256]; CHANNELS]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = [[0f32; 256]; CHANNELS];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                *out = normalize(c, v as u8);
            }
        }
        t
    })
}

/// The normalised value of pixel byte `v` in channel `c`.
pub fn normalize(c: usize, v: u8) -> f32 {
    (v as f32 / 255.0 - MEAN[c]) / STD[c]
}

/// Writes sample `image` (3072 planar bytes) with `aug` applied into `out` (3072 f32, CHW).
pub fn augment_into(image: &[u8], aug: Augmentation, out: &mut [f32]) {
    assert_eq!(image.len(), IMAGE_BYTES, "image must be {IMAGE_BYTES} bytes");
    assert_eq!(out.len(), IMAGE_BYTES, "output must be {IMAGE_BYTES} floats");
    assert!(aug.offset_x <= MAX_OFFSET && aug.offset_y <= MAX_OFFSET, "offset out of range: {aug:?}");
    let lut = lut();
    // Output column x reads padded column x + ox, i.e. source column x + ox - PAD
    // (mirrored: source column (SIDE - 1 - x) + ox - PAD). Rows and columns outside the
    // source are padding; the valid source columns form one contiguous run per row, so
    // each row is: pad | contiguous lookups | pad.
    let (ox, oy) = (aug.offset_x as isize, aug.offset_y as isize);
    let shift = ox - PAD as isize; // source column of output column 0 (unflipped)
    let src_lo = shift.max(0) as usize; // first source column used
    let src_hi = ((SIDE as isize + shift).min(SIDE as isize)) as usize; // one past the last
    let run = src_hi - src_lo;
    // Where that run lands in the output row. Mirrored, output x reads source
    // SIDE - 1 - x + shift, so the run's last source column lands first, at SIDE - src_hi + shift.
    let dst_lo =
        if aug.flip { (SIDE as isize - src_hi as isize + shift) as usize } else { (src_lo as isize - shift) as usize };
    for c in 0..CHANNELS {
        let table = &lut[c];
        let pad = table[0];
        let src_plane = &image[c * PLANE..(c + 1) * PLANE];
        let out_plane = &mut out[c * PLANE..(c + 1) * PLANE];
        for (y, out_row) in out_plane.chunks_exact_mut(SIDE).enumerate() {
            let sy = y as isize + oy - PAD as isize;
            if !(0..SIDE as isize).contains(&sy) {
                out_row.fill(pad);
                continue;
            }
            let src = &src_plane[sy as usize * SIDE + src_lo..sy as usize * SIDE + src_hi];
            out_row[..dst_lo].fill(pad);
            out_row[dst_lo + run..].fill(pad);
            let dst = &mut out_row[dst_lo..dst_lo + run];
            if aug.flip {
                for (o, &v) in dst.iter_mut().zip(src.iter().rev()) {
                    *o = table[v as usize];
                }
            } else {
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o = table[v as usize];
                }
            }
        }
    }
}

/// Fills `out_images` (`indices.len() * 3072` f32, NCHW) and `out_labels`
/// (`indices.len()`) with samples `indices` of `split`, augmented per
/// [`augmentation_for`]`(seed, epoch, index)` when `augment` is set, else only normalised.
///
/// # Panics
/// If the output lengths do not match `indices`, or an index is out of range; the
/// loader validates indices before calling this.
pub fn fill_batch(
    split: &CifarSplit,
    indices: &[usize],
    seed: u64,
    epoch: u64,
    augment: bool,
    out_images: &mut [f32],
    out_labels: &mut [i64],
) {
    assert_eq!(out_images.len(), indices.len() * IMAGE_BYTES, "out_images length");
    assert_eq!(out_labels.len(), indices.len(), "out_labels length");
    for ((&index, out), label) in indices.iter().zip(out_images.chunks_exact_mut(IMAGE_BYTES)).zip(out_labels) {
        let aug = if augment { augmentation_for(seed, epoch, index) } else { Augmentation::NONE };
        augment_into(split.image(index), aug, out);
        *label = i64::from(split.label(index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvdist_common::cifar::synthetic;
    use proptest::prelude::*;

    /// Straightforward reference: build the padded 40x40 image, crop, flip, normalise.
    fn reference(image: &[u8], aug: Augmentation) -> Vec<f32> {
        let p = SIDE + 2 * PAD;
        let mut out = vec![0f32; IMAGE_BYTES];
        for c in 0..CHANNELS {
            let mut padded = vec![0u8; p * p];
            for y in 0..SIDE {
                for x in 0..SIDE {
                    padded[(y + PAD) * p + x + PAD] = image[c * PLANE + y * SIDE + x];
                }
            }
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let cx = if aug.flip { SIDE - 1 - x } else { x };
                    let v = padded[(y + aug.offset_y) * p + cx + aug.offset_x];
                    out[c * PLANE + y * SIDE + x] = (v as f32 / 255.0 - MEAN[c]) / STD[c];
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_reference(pixels in proptest::collection::vec(any::<u8>(), IMAGE_BYTES),
                             oy in 0usize..=8, ox in 0usize..=8, flip: bool) {
            let aug = Augmentation { offset_y: oy, offset_x: ox, flip };
            let mut out = vec![0f32; IMAGE_BYTES];
            augment_into(&pixels, aug, &mut out);
            let want = reference(&pixels, aug);
            // Bit-exact, not approximately equal.
            prop_assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        }

        #[test]
        fn fill_batch_matches_reference(seed: u64, epoch in 0u64..1000,
                                        indices in proptest::collection::vec(0usize..20, 1..6)) {
            let split = synthetic(20, seed);
            let mut images = vec![0f32; indices.len() * IMAGE_BYTES];
            let mut labels = vec![0i64; indices.len()];
            fill_batch(&split, &indices, seed, epoch, true, &mut images, &mut labels);
            for (k, &i) in indices.iter().enumerate() {
                let want = reference(split.image(i), augmentation_for(seed, epoch, i));
                prop_assert_eq!(&images[k * IMAGE_BYTES..(k + 1) * IMAGE_BYTES], &want[..]);
                prop_assert_eq!(labels[k], split.label(i) as i64);
            }
        }
    }

    #[test]
    fn offsets_and_flips_are_uniform() {
        let n = 90_000usize;
        let mut ys = [0usize; 9];
        let mut xs = [0usize; 9];
        let mut joint = [[0usize; 9]; 9];
        let mut flips = 0;
        for i in 0..n {
            let a = augmentation_for(42, 3, i);
            ys[a.offset_y] += 1;
            xs[a.offset_x] += 1;
            joint[a.offset_y][a.offset_x] += 1;
            flips += a.flip as usize;
        }
        // Expected 10,000 per offset value; sd ~94, so ±500 is > 5 sd.
        for c in ys.iter().chain(&xs) {
            assert!((9_500..=10_500).contains(c), "offsets {ys:?} {xs:?}");
        }
        // y and x independent: each of 81 cells ~1111 (sd ~33).
        assert!(joint.iter().flatten().all(|&c| (900..=1330).contains(&c)), "{joint:?}");
        assert!((44_000..=46_000).contains(&flips), "flips {flips}");
    }

    #[test]
    fn choices_depend_on_seed_epoch_and_index_only() {
        assert_eq!(augmentation_for(1, 2, 3), augmentation_for(1, 2, 3));
        let differ = |f: &dyn Fn(usize) -> Augmentation, g: &dyn Fn(usize) -> Augmentation| {
            (0..200).filter(|&i| f(i) != g(i)).count()
        };
        assert!(differ(&|i| augmentation_for(1, 2, i), &|i| augmentation_for(1, 3, i)) > 150);
        assert!(differ(&|i| augmentation_for(1, 2, i), &|i| augmentation_for(9, 2, i)) > 150);
        // The same sample gets the same augmentation whatever batch it lands in.
        let split = synthetic(16, 5);
        let mut a = vec![0f32; 3 * IMAGE_BYTES];
        let mut b = vec![0f32; 2 * IMAGE_BYTES];
        fill_batch(&split, &[4, 11, 7], 8, 1, true, &mut a, &mut [0; 3]);
        fill_batch(&split, &[7, 2], 8, 1, true, &mut b, &mut [0; 2]);
        assert_eq!(&a[2 * IMAGE_BYTES..], &b[..IMAGE_BYTES]);
    }

    #[test]
    fn padding_is_minus_mean_over_std() {
        let image = vec![255u8; IMAGE_BYTES];
        let mut out = vec![0f32; IMAGE_BYTES];
        augment_into(&image, Augmentation { offset_y: 0, offset_x: 8, flip: false }, &mut out);
        for c in 0..CHANNELS {
            let pad = -MEAN[c] / STD[c];
            let plane = &out[c * PLANE..(c + 1) * PLANE];
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let v = plane[y * SIDE + x];
                    // offset_y 0: rows 0..4 come from padding; offset_x 8: columns 28..32.
                    if y < 4 || x >= 28 {
                        assert!((v - pad).abs() < 1e-6, "c{c} y{y} x{x}: {v} vs {pad}");
                    } else {
                        assert_eq!(v, normalize(c, 255));
                    }
                }
            }
        }
        // Flipped, the padded columns move to the left edge.
        augment_into(&image, Augmentation { offset_y: 4, offset_x: 8, flip: true }, &mut out);
        assert_eq!(out[0], normalize(0, 0));
        assert_eq!(out[3], normalize(0, 0));
        assert_eq!(out[4], normalize(0, 255));
    }

    #[test]
    fn no_augment_is_plain_normalisation() {
        let split = synthetic(5, 1);
        let idx = [3, 0, 4];
        let mut images = vec![0f32; idx.len() * IMAGE_BYTES];
        let mut labels = vec![0i64; idx.len()];
        fill_batch(&split, &idx, 7, 7, false, &mut images, &mut labels);
        for (k, &i) in idx.iter().enumerate() {
            for (p, &v) in split.image(i).iter().enumerate() {
                assert_eq!(images[k * IMAGE_BYTES + p], normalize(p / PLANE, v));
            }
            assert_eq!(labels[k], split.label(i) as i64);
        }
    }

    #[test]
    fn normalisation_is_bit_identical_to_torch() {
        // Bits from libtorch 2.x running torchvision's ops: `x.to(float32).div(255)`,
        // then `.sub(mean).div(std)` with float32 mean/std tensors.
        assert_eq!(normalize(0, 0).to_bits(), 0xc01b_75d0);
        assert_eq!(normalize(1, 77).to_bits(), 0xbf67_6680);
        assert_eq!(normalize(2, 255).to_bits(), 0x4030_3d22);
    }

    #[test]
    fn normalisation_matches_torchvision_constants() {
        // ToTensor then Normalize: 0 -> -mean/std, 255 -> (1 - mean)/std.
        assert!((normalize(0, 0) - (-0.4914 / 0.2023)).abs() < 1e-6);
        assert!((normalize(2, 255) - ((1.0 - 0.4465) / 0.2010)).abs() < 1e-6);
    }
}
