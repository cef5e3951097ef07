//! A minimal TensorBoard event-file writer for scalar summaries, so `cvdist-worker train
//! --tensorboard DIR` curves can be watched with `tensorboard --logdir DIR`.
//!
//! The file is a sequence of TFRecords, each
//! `u64 length (LE) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)`,
//! whose data is a serialized `tensorflow.Event` protobuf. The first event carries
//! `file_version = "brain.Event:2"`; every later one holds a `Summary` of `simple_value`
//! scalars. The few protobuf fields needed are encoded by hand:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! [`read_events`] parses such a file back (used by the tests, and handy for debugging).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use cvdist_common::proto::EpochMetrics;

/// File-version string TensorBoard expects in the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";

// ---------------------------------------------------------------------------------------
// CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as TFRecord uses.

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// CRC-32C of `data` (`crc32c(b"123456789") == 0xE306_9283`).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC TFRecord stores: rotate right by 15, add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
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

// ---------------------------------------------------------------------------------------
// Protobuf encoding of the Event subset.

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, ((field << 3) | 2) as u64);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(0x09); // field 1, 64-bit
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        out.push(0x10); // field 2, varint
        put_varint(&mut out, step as u64);
    }
    out
}

/// A serialized `Event` carrying the file version.
pub fn encode_file_version(wall_time: f64) -> Vec<u8> {
    let mut out = event_header(wall_time, 0);
    put_bytes(&mut out, 3, FILE_VERSION.as_bytes());
    out
}

/// A serialized `Event` with one `simple_value` per `(tag, value)`.
pub fn encode_scalars(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        v.push(0x15); // field 2, 32-bit
        v.extend_from_slice(&value.to_le_bytes());
        put_bytes(&mut summary, 1, &v);
    }
    let mut out = event_header(wall_time, step);
    put_bytes(&mut out, 5, &summary);
    out
}

// ---------------------------------------------------------------------------------------
// Writer.

/// Appends scalar events to `DIR/events.out.tfevents.<unix seconds>.<host>.<pid>`.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
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
        self.scalars(
            m.epoch as i64 + 1,
            &[
                ("train/loss", m.train_loss as f32),
                ("train/accuracy", m.train_acc as f32),
                ("test/loss", m.test_loss as f32),
                ("test/accuracy", m.test_acc as f32),
                ("lr", m.lr as f32),
                ("images_per_sec", m.images_per_sec as f32),
            ],
        )
    }
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

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= ((b & 0x7F) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = pos.checked_add(n).filter(|&e| e <= buf.len()).ok_or("truncated field")?;
    let s = &buf[*pos..end];
    *pos = end;
    Ok(s)
}

/// Calls `f(field, wire_type, payload)` for each field; varints are passed as their bytes.
fn fields(buf: &[u8], mut f: impl FnMut(u64, u64, &[u8]) -> Result<(), String>) -> Result<(), String> {
    let mut pos = 0;
    while pos < buf.len() {
        let key = get_varint(buf, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => {
                let start = pos;
                get_varint(buf, &mut pos)?;
                &buf[start..pos]
            }
            1 => take(buf, &mut pos, 8)?,
            2 => {
                let n = get_varint(buf, &mut pos)? as usize;
                take(buf, &mut pos, n)?
            }
            5 => take(buf, &mut pos, 4)?,
            w => return Err(format!("unsupported wire type {w}")),
        };
        f(field, wire, payload)?;
    }
    Ok(())
}

/// Decodes one serialized `Event` (the subset this module writes; other fields are skipped).
pub fn decode_event(data: &[u8]) -> Result<Event, String> {
    let mut ev = Event { wall_time: 0.0, step: 0, file_version: None, scalars: Vec::new() };
    fields(data, |field, wire, payload| {
        match (field, wire) {
            (1, 1) => ev.wall_time = f64::from_le_bytes(payload.try_into().expect("8 bytes")),
            (2, 0) => ev.step = get_varint(payload, &mut 0)? as i64,
            (3, 2) => ev.file_version = Some(String::from_utf8_lossy(payload).into_owned()),
            (5, 2) => fields(payload, |f, w, value| {
                if (f, w) != (1, 2) {
                    return Ok(());
                }
                let (mut tag, mut val) = (String::new(), f32::NAN);
                fields(value, |f, w, p| {
                    match (f, w) {
                        (1, 2) => tag = String::from_utf8_lossy(p).into_owned(),
                        (2, 5) => val = f32::from_le_bytes(p.try_into().expect("4 bytes")),
                        _ => {}
                    }
                    Ok(())
                })?;
                ev.scalars.push((tag, val));
                Ok(())
            })?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(ev)
}

/// Reads every record of an event file, checking both CRCs of each frame.
pub fn read_events(path: &Path) -> Result<Vec<Event>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut pos = 0;
    let mut events = Vec::new();
    while pos < bytes.len() {
        let at = pos;
        let bad = |what: &str| format!("{}: record at byte {at}: {what}", path.display());
        let len_bytes = take(&bytes, &mut pos, 8).map_err(|e| bad(&e))?;
        let len_crc = u32::from_le_bytes(take(&bytes, &mut pos, 4).map_err(|e| bad(&e))?.try_into().unwrap());
        if masked_crc32c(len_bytes) != len_crc {
            return Err(bad("length CRC mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let data = take(&bytes, &mut pos, len).map_err(|e| bad(&e))?;
        let data_crc = u32::from_le_bytes(take(&bytes, &mut pos, 4).map_err(|e| bad(&e))?.try_into().unwrap());
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
        // Event{wall_time: 1.0, step: 3, summary{value{tag:"a", simple_value:0.5}}}
        let bytes = encode_scalars(1.0, 3, &[("a", 0.5)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 3, 0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15]);
        want.extend_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(bytes, want);
        let ev = decode_event(&bytes).unwrap();
        assert_eq!(ev.step, 3);
        assert_eq!(ev.scalars, vec![("a".to_string(), 0.5)]);
    }

    #[test]
    fn write_then_read_back() {
        let dir = std::env::temp_dir().join(format!("cvdist-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
