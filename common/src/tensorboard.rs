//! TensorBoard event files of scalar summaries, so training curves can be watched with
//! `tensorboard --logdir DIR`: `cvdist-worker train --tensorboard DIR` appends to its own file
//! ([`EventWriter`]), and every run directory (each job under the coordinator's
//! `STATE_DIR/jobs/<id>/`, and `cvdist train --out`) holds [`RUN_EVENTS_FILE`], rewritten from
//! the run's metrics history on every epoch ([`write_run_events`]).
//!
//! The file is a sequence of TFRecords, each
//! `u64 length (LE) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)`,
//! whose data is a serialized `tensorflow.Event` protobuf (the few messages needed are in
//! [`pb`], encoded by `prost`; CRC-32C comes from the `crc32c` crate). The first event carries
//! `file_version = "brain.Event:2"`; every later one holds a `Summary` of `simple_value`
//! scalars.
//!
//! [`read_events`] parses such a file back, checking both CRCs of every record (used by the
//! tests, and handy for debugging).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::proto::EpochMetrics;

/// File-version string TensorBoard expects in the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// The events file of a run directory. TensorBoard reads any file whose name contains
/// `tfevents`; the name is fixed so each rewrite replaces (extends) the same file.
pub const RUN_EVENTS_FILE: &str = "events.out.tfevents.0.cvdist";

/// The subset of TensorFlow's `event.proto` and `summary.proto` cvdist writes, with the
/// upstream field numbers; fields not listed are skipped when decoding.
pub mod pb {
    /// `tensorflow.Event`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        /// Seconds since the Unix epoch.
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "event::What", tags = "3, 5")]
        pub what: Option<event::What>,
    }

    pub mod event {
        /// `oneof what` of `tensorflow.Event`.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum What {
            #[prost(string, tag = "3")]
            FileVersion(String),
            #[prost(message, tag = "5")]
            Summary(super::Summary),
        }
    }

    /// `tensorflow.Summary`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    /// `tensorflow.Summary.Value`. Upstream `simple_value` is a member of `oneof value`, so it
    /// is on the wire even when 0.0; `optional` gives the same encoding.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(float, optional, tag = "2")]
        pub simple_value: Option<f32>,
    }
}

/// CRC-32C (Castagnoli) of `data`, as TFRecord uses (`crc32c(b"123456789") == 0xE306_9283`).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The masked CRC TFRecord stores: rotate right by 15, add a constant (TensorFlow's
/// `crc32c::Mask`, `tensorflow/core/lib/hash/crc32c.h`).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// A serialized `Event` carrying the file version.
pub fn encode_file_version(wall_time: f64) -> Vec<u8> {
    pb::Event { wall_time, step: 0, what: Some(pb::event::What::FileVersion(FILE_VERSION.into())) }.encode_to_vec()
}

/// A serialized `Event` with one `simple_value` per `(tag, value)`.
pub fn encode_scalars(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    let value = scalars.iter().map(|(tag, v)| pb::Value { tag: tag.to_string(), simple_value: Some(*v) }).collect();
    pb::Event { wall_time, step, what: Some(pb::event::What::Summary(pb::Summary { value })) }.encode_to_vec()
}

/// The per-epoch scalars of a run, at step = epochs completed (1 for the first epoch).
pub fn epoch_scalars(m: &EpochMetrics) -> (i64, [(&'static str, f32); 6]) {
    (
        m.epoch as i64 + 1,
        [
            ("train/loss", m.train_loss as f32),
            ("train/accuracy", m.train_acc as f32),
            ("test/loss", m.test_loss as f32),
            ("test/accuracy", m.test_acc as f32),
            ("lr", m.lr as f32),
            ("images_per_sec", m.images_per_sec as f32),
        ],
    )
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// Writer.

/// Appends scalar events to `DIR/events.out.tfevents.<unix seconds>.<host>.<pid>`.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it (never appends to an old one, so
    /// a resumed run adds a file next to the first; TensorBoard merges them).
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now() as u64, std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).write(true).open(&path)?;
        let mut w = EventWriter { path, out: BufWriter::new(file) };
        w.write_record(&encode_file_version(now()))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&frame(data))?;
        // Flushed per event so a live TensorBoard sees each epoch as it finishes.
        self.out.flush()
    }

    /// Writes `scalars` at `step`.
    pub fn scalars(&mut self, step: i64, scalars: &[(&str, f32)]) -> std::io::Result<()> {
        self.write_record(&encode_scalars(now(), step, scalars))
    }

    /// The per-epoch scalars of the trainer at step = epochs completed (1 for the first).
    pub fn epoch(&mut self, m: &EpochMetrics) -> std::io::Result<()> {
        let (step, scalars) = epoch_scalars(m);
        self.scalars(step, &scalars)
    }
}

// ---------------------------------------------------------------------------------------
// The events file of a run directory, a function of the metrics history.

/// The whole events file for `history`: the file-version record at `base_time`, then one
/// record per epoch at `base_time` plus the epoch seconds so far. Deterministic, so the file
/// for a longer history starts with the bytes of the file for any prefix of it.
pub fn encode_run_events(base_time: f64, history: &[EpochMetrics]) -> Vec<u8> {
    let mut out = frame(&encode_file_version(base_time));
    let mut elapsed = 0.0;
    for m in history {
        if m.seconds.is_finite() && m.seconds > 0.0 {
            elapsed += m.seconds;
        }
        let (step, scalars) = epoch_scalars(m);
        out.extend_from_slice(&frame(&encode_scalars(base_time + elapsed, step, &scalars)));
    }
    out
}

/// The wall time of the first record of an existing events file, if it has a whole one.
fn first_wall_time(bytes: &[u8]) -> Option<f64> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let data = bytes.get(12..12usize.checked_add(len)?)?;
    pb::Event::decode(data).ok().map(|e| e.wall_time).filter(|t| t.is_finite())
}

/// (Re)writes `dir/`[`RUN_EVENTS_FILE`] from `history` (the run's epochs so far, in order).
///
/// The file's first record keeps its time across rewrites, so the bytes for a grown history
/// extend the file already there: then only the new records are appended, in place, which a
/// running TensorBoard (it keeps the file open and reads on from where it was) picks up. When
/// the history changed otherwise (a recovery re-ran epochs) or the file is unreadable, it is
/// replaced whole with [`crate::atomic_file::write`]. A crash during an append leaves a
/// prefix of the intended file, which TensorBoard reads up to its last whole record and the
/// next call completes.
pub fn write_run_events(dir: &Path, history: &[EpochMetrics]) -> std::io::Result<()> {
    let path = dir.join(RUN_EVENTS_FILE);
    let have = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let want = encode_run_events(first_wall_time(&have).unwrap_or_else(now), history);
    if !have.is_empty() && want.starts_with(&have) {
        if want.len() > have.len() {
            let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
            f.write_all(&want[have.len()..])?;
            f.sync_data()?;
        }
        return Ok(());
    }
    crate::atomic_file::write(&path, &want)
}

// ---------------------------------------------------------------------------------------
// Reader.

/// A parsed event: either the file-version record or scalars.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub scalars: Vec<(String, f32)>,
}

/// Decodes one serialized `Event` (fields other than those in [`pb`] are skipped; a value
/// without `simple_value` reads as NaN).
pub fn decode_event(data: &[u8]) -> Result<Event, String> {
    let e = pb::Event::decode(data).map_err(|e| e.to_string())?;
    let mut ev = Event { wall_time: e.wall_time, step: e.step, file_version: None, scalars: Vec::new() };
    match e.what {
        Some(pb::event::What::FileVersion(v)) => ev.file_version = Some(v),
        Some(pb::event::What::Summary(s)) => {
            ev.scalars = s.value.into_iter().map(|v| (v.tag, v.simple_value.unwrap_or(f32::NAN))).collect();
        }
        None => {}
    }
    Ok(ev)
}

/// Reads every record of an event file, checking both CRCs of each frame.
pub fn read_events(path: &Path) -> Result<Vec<Event>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut pos = 0usize;
    let mut events = Vec::new();
    while pos < bytes.len() {
        let at = pos;
        let bad = |what: &str| format!("{}: record at byte {at}: {what}", path.display());
        let mut take = |n: usize| -> Result<&[u8], String> {
            let end = pos.checked_add(n).filter(|&e| e <= bytes.len()).ok_or_else(|| bad("truncated"))?;
            let s = &bytes[pos..end];
            pos = end;
            Ok(s)
        };
        let len_bytes = take(8)?;
        let len_crc = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("truncated"))?);
        if masked_crc32c(len_bytes) != len_crc {
            return Err(bad("length CRC mismatch"));
        }
        let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().map_err(|_| bad("truncated"))?))
            .map_err(|_| bad("length too large"))?;
        let data = take(len)?;
        let data_crc = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("truncated"))?);
        if masked_crc32c(data) != data_crc {
            return Err(bad("data CRC mismatch"));
        }
        events.push(decode_event(data).map_err(|e| bad(&e))?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // The standard check value of CRC-32C, and RFC 3720 (iSCSI) B.4 test vectors.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
    }

    #[test]
    fn masked_crc_known_values() {
        // Computed independently with a bitwise Python implementation of CRC-32C and the
        // TFRecord mask ((crc >> 15 | crc << 17) + 0xA282EAD8).
        assert_eq!(crc32c(&[0u8; 8]), 0x8C28_B28A);
        assert_eq!(masked_crc32c(&[0u8; 8]), 0x0798_0329);
        assert_eq!(masked_crc32c(&24u64.to_le_bytes()), 0x224B_7FA3);
        let f = frame(&[]);
        assert_eq!(f.len(), 16);
        assert_eq!(&f[8..12], &0x0798_0329u32.to_le_bytes());
    }

    #[test]
    fn scalar_event_encoding_is_exact() {
        // Event{wall_time: 1.0, step: 3, summary{value{tag:"a", simple_value:0.5}}}, the bytes
        // the previous hand-written encoder produced.
        let bytes = encode_scalars(1.0, 3, &[("a", 0.5)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 3, 0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15]);
        want.extend_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(bytes, want);
        let ev = decode_event(&bytes).unwrap();
        assert_eq!(ev.step, 3);
        assert_eq!(ev.scalars, vec![("a".to_string(), 0.5)]);
        // A zero scalar is still on the wire (TensorBoard drops a value without a kind).
        let zero = encode_scalars(1.0, 1, &[("z", 0.0)]);
        assert_eq!(decode_event(&zero).unwrap().scalars, vec![("z".to_string(), 0.0)]);
        assert!(zero.windows(5).any(|w| w == [0x15, 0, 0, 0, 0]));
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("train/loss", 2.5), ("lr", 0.1)]).unwrap();
        w.scalars(300, &[("train/loss", 1.25)]).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert_eq!(events[1].step, 1);
        assert_eq!(events[1].scalars, vec![("train/loss".to_string(), 2.5), ("lr".to_string(), 0.1)]);
        assert_eq!(events[2].step, 300);
        // A flipped byte is caught by the data CRC.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_events(&path).unwrap_err().contains("CRC"));
    }

    fn epoch(e: u32, loss: f64) -> EpochMetrics {
        EpochMetrics {
            epoch: e,
            train_loss: loss,
            train_acc: 0.5,
            test_loss: loss + 0.25,
            test_acc: 0.25,
            lr: 0.1,
            seconds: 2.0,
            images_per_sec: 1000.0,
            ..Default::default()
        }
    }

    #[test]
    fn run_events_grow_in_place_and_follow_a_rewritten_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RUN_EVENTS_FILE);
        write_run_events(dir.path(), &[epoch(0, 2.0)]).unwrap();
        let first = std::fs::read(&path).unwrap();
        let t0 = read_events(&path).unwrap()[0].wall_time;
        write_run_events(dir.path(), &[epoch(0, 2.0), epoch(1, 1.5)]).unwrap();
        let second = std::fs::read(&path).unwrap();
        // Appended: the old bytes are untouched (a live TensorBoard reads on from its offset).
        assert!(second.starts_with(&first) && second.len() > first.len());
        // The same history again changes nothing.
        write_run_events(dir.path(), &[epoch(0, 2.0), epoch(1, 1.5)]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), second);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert_eq!((events[1].step, events[2].step), (1, 2));
        assert_eq!(events[2].wall_time, t0 + 4.0);
        assert_eq!(events[2].scalars[0], ("train/loss".to_string(), 1.5));
        assert_eq!(events[2].scalars[2], ("test/loss".to_string(), 1.75));
        // A recovery re-ran epoch 1 with other numbers: the file is replaced whole, same start time.
        write_run_events(dir.path(), &[epoch(0, 2.0), epoch(1, 1.0)]).unwrap();
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].wall_time, t0);
        assert_eq!(events[2].scalars[0], ("train/loss".to_string(), 1.0));
        // A torn append (crash mid-write) is completed by the next call.
        let full = std::fs::read(&path).unwrap();
        write_run_events(dir.path(), &[epoch(0, 2.0), epoch(1, 1.0), epoch(2, 0.5)]).unwrap();
        let grown = std::fs::read(&path).unwrap();
        std::fs::write(&path, &grown[..full.len() + 7]).unwrap();
        write_run_events(dir.path(), &[epoch(0, 2.0), epoch(1, 1.0), epoch(2, 0.5)]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), grown);
        // Garbage is replaced.
        std::fs::write(&path, b"not an events file").unwrap();
        write_run_events(dir.path(), &[epoch(0, 2.0)]).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 2);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
