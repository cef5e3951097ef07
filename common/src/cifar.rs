//! Reader and writer for the official CIFAR-10 binary layout.
//!
//! Each file (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`) is a sequence of
//! 3073-byte records: one label byte (0..=9) followed by 3072 pixel bytes — 1024 red, 1024
//! green, 1024 blue, each plane 32x32 row-major. Images are kept exactly in that planar
//! (CHW) `u8` layout in memory (150 MB for the training set), so loading is a copy and
//! augmentation reads contiguous rows.
//!
//! The official files hold 10,000 records each, but the reader accepts **any whole number
//! of records** per file: tests and tools write small files in the same layout. A file
//! whose size is not a whole number of records is rejected as truncated.
//!
//! Kept as our own code rather than a dataset crate: the format is fixed-size records read
//! with one `chunks_exact`, and owning the reader keeps the images in exactly the planar
//! `u8` layout the augmentation reads, with errors that name the file and record.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Image side in pixels.
pub const SIDE: usize = 32;
/// Channels per image.
pub const CHANNELS: usize = 3;
/// Bytes of one image (3 planes of 32x32).
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
/// Bytes of one on-disk record: a label byte then the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes; labels are `0..NUM_CLASSES`.
pub const NUM_CLASSES: usize = 10;
/// Records in each official file.
pub const OFFICIAL_RECORDS_PER_FILE: usize = 10_000;
/// Folder the official archive extracts to.
pub const BATCHES_DIR: &str = "cifar-10-batches-bin";
/// Training files, in the order their records are concatenated.
pub const TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
/// Test file.
pub const TEST_FILE: &str = "test_batch.bin";

/// A problem with a CIFAR-10 file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CifarError {
    #[error("CIFAR-10 file {path} is missing (expected the official binary layout in {dir}; use the download command to fetch it)", path = .path.display(), dir = .path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    Missing { path: PathBuf },
    #[error("cannot read CIFAR-10 file {path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("CIFAR-10 file {path} is empty (0 records)", path = .path.display())]
    Empty { path: PathBuf },
    #[error("CIFAR-10 file {path} is truncated: {size} bytes is {records} whole records of {RECORD_BYTES} bytes plus {extra} bytes of a partial record (official files are {official} bytes)",
        path = .path.display(), records = .size / RECORD_BYTES as u64, extra = .size % RECORD_BYTES as u64,
        official = OFFICIAL_RECORDS_PER_FILE * RECORD_BYTES)]
    Truncated { path: PathBuf, size: u64 },
    #[error("CIFAR-10 file {path}: record {record} has label {label}, labels must be 0..=9 (corrupt or not a CIFAR-10 file)", path = .path.display())]
    BadLabel { path: PathBuf, record: usize, label: u8 },
    #[error("cannot write CIFAR-10 file {path}: {source}", path = .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("invalid CIFAR-10 split: {0}")]
    Parts(String),
}

/// Images and labels of one split, in file order.
#[derive(Clone, PartialEq, Eq)]
pub struct CifarSplit {
    /// `len * IMAGE_BYTES` bytes, planar CHW per image as on disk.
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl fmt::Debug for CifarSplit {
    // The default derive would print 150 MB of pixels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CifarSplit").field("len", &self.len()).finish()
    }
}

impl CifarSplit {
    /// Builds a split from raw parts, checking that sizes agree and labels are in range.
    pub fn from_parts(images: Vec<u8>, labels: Vec<u8>) -> Result<Self, CifarError> {
        if images.len() != labels.len() * IMAGE_BYTES {
            return Err(CifarError::Parts(format!(
                "{} image bytes for {} labels (need {} bytes each)",
                images.len(),
                labels.len(),
                IMAGE_BYTES
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= NUM_CLASSES) {
            return Err(CifarError::Parts(format!("label {l} at index {i} is out of range 0..=9")));
        }
        Ok(Self { images, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 3072 planar bytes of image `i`.
    ///
    /// # Panics
    /// If `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// # Panics
    /// If `i >= len()`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The first `n` samples (all of them if `n >= len()`): a fixed, reproducible subset
    /// for `--train-samples`, the same on every rank.
    pub fn take(&self, n: usize) -> CifarSplit {
        let n = n.min(self.len());
        CifarSplit { images: self.images[..n * IMAGE_BYTES].to_vec(), labels: self.labels[..n].to_vec() }
    }
}

/// The folder holding the `.bin` files: `dir/cifar-10-batches-bin` if it exists or `dir`
/// does not itself contain the files, else `dir` (so both the extraction root and the
/// batches folder are accepted).
pub fn batches_dir(dir: &Path) -> PathBuf {
    let nested = dir.join(BATCHES_DIR);
    if nested.is_dir() {
        return nested;
    }
    let direct = dir.file_name().is_some_and(|n| n == BATCHES_DIR)
        || dir.join(TEST_FILE).is_file()
        || dir.join(TRAIN_FILES[0]).is_file();
    if direct {
        dir.to_path_buf()
    } else {
        nested
    }
}

/// Loads the 5 training files, concatenated in order (50,000 samples for the official set).
pub fn load_train(dir: &Path) -> Result<CifarSplit, CifarError> {
    let base = batches_dir(dir);
    let paths: Vec<PathBuf> = TRAIN_FILES.iter().map(|f| base.join(f)).collect();
    load_files(&paths)
}

/// Loads the test file (10,000 samples for the official set).
pub fn load_test(dir: &Path) -> Result<CifarSplit, CifarError> {
    load_files(&[batches_dir(dir).join(TEST_FILE)])
}

/// Loads and concatenates `paths`, each a file in the binary record layout.
pub fn load_files(paths: &[PathBuf]) -> Result<CifarSplit, CifarError> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let bytes = fs::read(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                CifarError::Missing { path: path.clone() }
            } else {
                CifarError::Io { path: path.clone(), source }
            }
        })?;
        parse_records(path, &bytes, &mut images, &mut labels)?;
    }
    Ok(CifarSplit { images, labels })
}

fn parse_records(path: &Path, bytes: &[u8], images: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<(), CifarError> {
    if bytes.is_empty() {
        return Err(CifarError::Empty { path: path.to_path_buf() });
    }
    let partial = bytes.len() % RECORD_BYTES;
    if partial > 0 {
        return Err(CifarError::Truncated { path: path.to_path_buf(), size: bytes.len() as u64 });
    }
    let n = bytes.len() / RECORD_BYTES;
    images.reserve(n * IMAGE_BYTES);
    labels.reserve(n);
    for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = chunk[0];
        if label as usize >= NUM_CLASSES {
            return Err(CifarError::BadLabel { path: path.to_path_buf(), record, label });
        }
        labels.push(label);
        images.extend_from_slice(&chunk[1..]);
    }
    Ok(())
}

/// Writes `split` to `path` in the binary record layout (for tests and tools).
pub fn write_split(path: &Path, split: &CifarSplit) -> Result<(), CifarError> {
    let err = |source| CifarError::Write { path: path.to_path_buf(), source };
    let mut out = Vec::with_capacity(split.len() * RECORD_BYTES);
    for i in 0..split.len() {
        out.push(split.label(i));
        out.extend_from_slice(split.image(i));
    }
    crate::atomic_file::write(path, &out).map_err(err)
}

/// A learnable synthetic data set for smoke runs without the real data.
///
/// Each class has a fixed base colour and a fixed stripe orientation/frequency; every
/// sample adds a random brightness shift, a random stripe phase and per-pixel noise. A
/// small CNN separates the classes within an epoch or two (far above the 10% of chance).
/// Labels cycle through the classes, so any prefix (`take`) is balanced.
/// Deterministic in `(n, seed)`.
pub fn synthetic(n: usize, seed: u64) -> CifarSplit {
    // Colours spread over the RGB cube so each class is distinguishable by hue alone.
    const COLOURS: [[f32; 3]; NUM_CLASSES] = [
        [200.0, 60.0, 60.0],
        [60.0, 200.0, 60.0],
        [60.0, 60.0, 200.0],
        [200.0, 200.0, 60.0],
        [200.0, 60.0, 200.0],
        [60.0, 200.0, 200.0],
        [140.0, 140.0, 140.0],
        [230.0, 130.0, 40.0],
        [90.0, 40.0, 150.0],
        [40.0, 110.0, 70.0],
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c1fa_0000_0010);
    let mut images = vec![0u8; n * IMAGE_BYTES];
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = ((i + (seed as usize % NUM_CLASSES)) % NUM_CLASSES) as u8;
        labels.push(label);
        let class = label as usize;
        // Stripe direction: horizontal, vertical or diagonal, with a class-specific period.
        let (fx, fy) = [(1.0, 0.0), (0.0, 1.0), (0.7, 0.7), (0.7, -0.7)][class % 4];
        let period = 4.0 + (class / 4) as f32 * 3.0;
        let phase: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
        let shift: f32 = rng.gen_range(-30.0..30.0);
        let img = &mut images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES];
        for y in 0..SIDE {
            for x in 0..SIDE {
                let t = (x as f32 * fx + y as f32 * fy) * std::f32::consts::TAU / period + phase;
                let stripe = 35.0 * t.sin();
                for (c, base) in COLOURS[class].iter().enumerate() {
                    let noise: f32 = rng.gen_range(-25.0..25.0);
                    let v = base + shift + stripe + noise;
                    img[c * SIDE * SIDE + y * SIDE + x] = v.clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    CifarSplit { images, labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(n: usize) -> CifarSplit {
        synthetic(n, 7)
    }

    fn write_dir(dir: &Path, per_file: usize) -> (CifarSplit, CifarSplit) {
        let base = dir.join(BATCHES_DIR);
        fs::create_dir_all(&base).unwrap();
        let train = synthetic(per_file * 5, 1);
        for (k, f) in TRAIN_FILES.iter().enumerate() {
            let part = CifarSplit {
                images: train.images[k * per_file * IMAGE_BYTES..(k + 1) * per_file * IMAGE_BYTES].to_vec(),
                labels: train.labels[k * per_file..(k + 1) * per_file].to_vec(),
            };
            write_split(&base.join(f), &part).unwrap();
        }
        let test = synthetic(per_file, 2);
        write_split(&base.join(TEST_FILE), &test).unwrap();
        (train, test)
    }

    #[test]
    fn round_trip_from_root_and_batches_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let (train, test) = write_dir(tmp.path(), 3);
        assert_eq!(load_train(tmp.path()).unwrap(), train);
        assert_eq!(load_test(tmp.path()).unwrap(), test);
        let inner = tmp.path().join(BATCHES_DIR);
        assert_eq!(load_train(&inner).unwrap(), train);
        assert_eq!(load_test(&inner).unwrap(), test);
        assert_eq!(train.len(), 15);
    }

    #[test]
    fn on_disk_layout_is_label_then_planar_pixels() {
        let tmp = tempfile::tempdir().unwrap();
        let split = small(2);
        let path = tmp.path().join("x.bin");
        write_split(&path, &split).unwrap();
        let raw = fs::read(&path).unwrap();
        assert_eq!(raw.len(), 2 * RECORD_BYTES);
        assert_eq!(raw[RECORD_BYTES], split.label(1));
        assert_eq!(&raw[RECORD_BYTES + 1..], split.image(1));
    }

    #[test]
    fn missing_file_names_it() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load_test(tmp.path()).unwrap_err();
        assert!(matches!(err, CifarError::Missing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("test_batch.bin") && msg.contains("missing"), "{msg}");
    }

    #[test]
    fn one_missing_train_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        write_dir(tmp.path(), 1);
        fs::remove_file(tmp.path().join(BATCHES_DIR).join("data_batch_4.bin")).unwrap();
        let msg = load_train(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("data_batch_4.bin"), "{msg}");
    }

    #[test]
    fn truncated_file_reports_size_and_partial_record() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(TEST_FILE);
        write_split(&path, &small(3)).unwrap();
        let mut raw = fs::read(&path).unwrap();
        raw.truncate(2 * RECORD_BYTES + 100);
        fs::write(&path, &raw).unwrap();
        let err = load_test(tmp.path()).unwrap_err();
        assert!(matches!(err, CifarError::Truncated { size, .. } if size == (2 * RECORD_BYTES + 100) as u64));
        let msg = err.to_string();
        assert!(
            msg.contains("test_batch.bin") && msg.contains("2 whole records") && msg.contains("100 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn empty_file_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(TEST_FILE), b"").unwrap();
        let msg = load_test(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("test_batch.bin") && msg.contains("empty"), "{msg}");
    }

    #[test]
    fn bad_label_names_record_and_value() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(TEST_FILE);
        write_split(&path, &small(4)).unwrap();
        let mut raw = fs::read(&path).unwrap();
        raw[2 * RECORD_BYTES] = 17;
        fs::write(&path, &raw).unwrap();
        let err = load_test(tmp.path()).unwrap_err();
        assert!(matches!(err, CifarError::BadLabel { record: 2, label: 17, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("record 2") && msg.contains("label 17") && msg.contains("test_batch.bin"), "{msg}");
    }

    #[test]
    fn unreadable_path_is_io_error() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails with something other than NotFound.
        fs::create_dir_all(tmp.path().join(BATCHES_DIR).join(TEST_FILE)).unwrap();
        let err = load_test(tmp.path()).unwrap_err();
        assert!(matches!(err, CifarError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("test_batch.bin"));
    }

    #[test]
    fn from_parts_checks_sizes_and_labels() {
        assert!(CifarSplit::from_parts(vec![0; IMAGE_BYTES * 2], vec![1, 2]).is_ok());
        assert!(CifarSplit::from_parts(vec![0; IMAGE_BYTES], vec![1, 2]).is_err());
        let msg = CifarSplit::from_parts(vec![0; IMAGE_BYTES * 2], vec![1, 10]).unwrap_err().to_string();
        assert!(msg.contains("label 10") && msg.contains("index 1"), "{msg}");
    }

    #[test]
    fn take_is_a_prefix() {
        let s = small(10);
        let t = s.take(4);
        assert_eq!(t.len(), 4);
        assert_eq!(t.labels(), &s.labels()[..4]);
        assert_eq!(t.image(3), s.image(3));
        assert_eq!(s.take(100).len(), 10);
        assert!(s.take(0).is_empty());
    }

    #[test]
    fn synthetic_is_deterministic_balanced_and_class_dependent() {
        let a = synthetic(1000, 3);
        assert_eq!(a, synthetic(1000, 3));
        assert_ne!(a, synthetic(1000, 4));
        let mut counts = [0usize; NUM_CLASSES];
        for &l in a.labels() {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 100), "{counts:?}");
        // Nearest-class-mean on per-channel averages already beats chance by far, so the
        // set is learnable.
        let means = |img: &[u8]| -> [f32; 3] {
            let mut m = [0f32; 3];
            for (c, v) in m.iter_mut().enumerate() {
                *v = img[c * 1024..(c + 1) * 1024].iter().map(|&p| p as f32).sum::<f32>() / 1024.0;
            }
            m
        };
        let mut centroid = [[0f32; 3]; NUM_CLASSES];
        for i in 0..a.len() {
            let m = means(a.image(i));
            for c in 0..3 {
                centroid[a.label(i) as usize][c] += m[c] / 100.0;
            }
        }
        let b = synthetic(500, 99);
        let correct = (0..b.len())
            .filter(|&i| {
                let m = means(b.image(i));
                let best = (0..NUM_CLASSES)
                    .min_by(|&x, &y| {
                        let d = |k: usize| (0..3).map(|c| (m[c] - centroid[k][c]).powi(2)).sum::<f32>();
                        d(x).total_cmp(&d(y))
                    })
                    .unwrap();
                best == b.label(i) as usize
            })
            .count();
        assert!(correct > 250, "nearest-mean accuracy {correct}/500");
    }
}
