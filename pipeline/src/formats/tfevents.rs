//! TensorBoard event files (`events.out.tfevents.*`): scalar summaries in TFRecord framing, as
//! sd-scripts writes them through accelerate's TensorBoard tracker, so `tensorboard --logdir`
//! shows a lorakit run next to a kohya one.
//!
//! A file is a sequence of records: `u64` length, masked CRC-32C of the length, the payload (an
//! `Event` protocol buffer) and its masked CRC-32C, all little-endian. The first event carries
//! the file version; every later one a `Summary` with one `simple_value` per tag.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The CRC TFRecord stores: CRC-32C rotated right by 15 bits plus a constant.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = CASTAGNOLI.checksum(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its CRC, payload, its CRC.
fn record(payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(number << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: (u64, &[u8])) -> Vec<u8> {
    let mut out = vec![1 << 3 | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        varint(2 << 3, &mut out);
        varint(step as u64, &mut out);
    }
    bytes_field(body.0, body.1, &mut out);
    out
}

/// `Summary { repeated Value value = 1 }`, `Value { tag = 1, simple_value = 2 (float) }`.
fn summary(scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, value) in scalars {
        let mut entry = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut entry);
        entry.push(2 << 3 | 5);
        entry.extend_from_slice(&value.to_le_bytes());
        bytes_field(1, &entry, &mut out);
    }
    out
}

/// The bytes of a version event followed by one summary event per `(step, wall_time, scalars)`.
pub fn encode(start_time: f64, events: &[(i64, f64, Vec<(&str, f32)>)]) -> Vec<u8> {
    let mut out = record(&event(start_time, 0, (3, b"brain.Event:2")));
    for (step, wall_time, scalars) in events {
        out.extend(record(&event(*wall_time, *step, (5, &summary(scalars)))));
    }
    out
}

/// An event file being appended to during a run; each record is flushed when written, so
/// TensorBoard can follow the run live and a killed run keeps every finished record.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `events.out.tfevents.<seconds>.<host>.<pid>` in `dir` (created if needed).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = unix_seconds();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}",
            now as u64,
            host_name(),
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = EventWriter { file, path };
        writer.append(&encode(now, &[]))?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event at `step` with the given scalars.
    pub fn scalars(&mut self, step: usize, scalars: &[(&str, f32)]) -> Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let payload = event(unix_seconds(), step as i64, (5, &summary(scalars)));
        self.append(&record(&payload))
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        (self.file.write_all(bytes))
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The machine's name as TensorBoard puts it in event file names (`localhost` if unknown).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().replace(['/', '\\'], "_"))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Reads the scalars of an event file: `(step, tag, value)` in file order; checks every CRC.
pub fn read_scalars(path: &Path) -> Result<Vec<(i64, String, f32)>> {
    let bytes = crate::infra::fsio::read(path)?;
    let bad = |what: &str| Error::bad_file(path, format!("not a TensorBoard event file: {what}"));
    let mut scalars = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes.get(at..at + 12).ok_or_else(|| bad("cut short"))?;
        let length = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        if masked_crc(&header[..8]).to_le_bytes() != header[8..12] {
            return Err(bad("length CRC mismatch"));
        }
        let end = (at + 12).checked_add(length).ok_or_else(|| bad("length"))?;
        let payload = bytes.get(at + 12..end).ok_or_else(|| bad("cut short"))?;
        let crc = bytes.get(end..end + 4).ok_or_else(|| bad("cut short"))?;
        if masked_crc(payload).to_le_bytes() != crc {
            return Err(bad("payload CRC mismatch"));
        }
        parse_event(payload, &mut scalars).ok_or_else(|| bad("malformed event"))?;
        at = end + 4;
    }
    Ok(scalars)
}

/// The fields of a protobuf message: `(number, wire type, varint or fixed value, bytes)`.
fn fields(mut bytes: &[u8]) -> Option<Vec<(u64, u8, u64, &[u8])>> {
    fn read_varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = read_varint(&mut bytes)?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        let (value, data) = match wire {
            0 => (read_varint(&mut bytes)?, &[][..]),
            1 | 5 => {
                let size = if wire == 1 { 8 } else { 4 };
                let (head, rest) = (bytes.get(..size)?, bytes.get(size..)?);
                bytes = rest;
                let mut buffer = [0u8; 8];
                buffer[..size].copy_from_slice(head);
                (u64::from_le_bytes(buffer), head)
            }
            2 => {
                let size = read_varint(&mut bytes)? as usize;
                let (head, rest) = (bytes.get(..size)?, bytes.get(size..)?);
                bytes = rest;
                (0, head)
            }
            _ => return None,
        };
        out.push((number, wire, value, data));
    }
    Some(out)
}

fn parse_event(payload: &[u8], scalars: &mut Vec<(i64, String, f32)>) -> Option<()> {
    let event = fields(payload)?;
    let step = (event.iter())
        .find(|f| f.0 == 2 && f.1 == 0)
        .map_or(0, |f| f.2 as i64);
    for (_, _, _, summary) in event.iter().filter(|f| f.0 == 5 && f.1 == 2) {
        for (_, _, _, value) in fields(summary)?.iter().filter(|f| f.0 == 1 && f.1 == 2) {
            let value = fields(value)?;
            let tag = value.iter().find(|f| f.0 == 1 && f.1 == 2)?.3;
            if let Some(number) = value.iter().find(|f| f.0 == 2 && f.1 == 5) {
                let tag = String::from_utf8(tag.to_vec()).ok()?;
                scalars.push((step, tag, f32::from_bits(number.2 as u32)));
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/golden/tensorboard/events.out.tfevents.golden")
    }

    /// The events `tests/fixtures/generate/tensorboard_events.py` writes with TensorBoard's own
    /// protobuf classes and record writer.
    fn golden_events() -> Vec<(i64, f64, Vec<(&'static str, f32)>)> {
        vec![
            (
                1,
                1_700_000_001.25,
                vec![("loss/current", 0.5), ("lr/unet", 1e-4)],
            ),
            (
                2,
                1_700_000_002.5,
                vec![("loss/current", 0.25), ("loss/average", 0.375)],
            ),
            (
                300,
                1_700_000_003.75,
                vec![("loss/validation/epoch_average", -1.5)],
            ),
        ]
    }

    #[test]
    fn bytes_equal_tensorboards_own_writer() {
        let ours = encode(1_700_000_000.0, &golden_events());
        assert_eq!(ours, std::fs::read(golden()).unwrap());
    }

    #[test]
    fn the_reader_checks_crcs_and_reads_tensorboards_file() {
        let read = read_scalars(&golden()).unwrap();
        let expected: Vec<(i64, String, f32)> = (golden_events().into_iter())
            .flat_map(|(step, _, scalars)| {
                scalars
                    .into_iter()
                    .map(move |(tag, v)| (step, tag.to_string(), v))
            })
            .collect();
        assert_eq!(read, expected);
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = std::fs::read(golden()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        let damaged = dir.path().join("events.out.tfevents.damaged");
        std::fs::write(&damaged, bytes).unwrap();
        assert!(read_scalars(&damaged)
            .unwrap_err()
            .to_string()
            .contains("CRC"));
    }

    #[test]
    fn a_writer_appends_readable_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(&dir.path().join("run")).unwrap();
        writer.scalars(1, &[("loss/current", 0.5)]).unwrap();
        writer
            .scalars(2, &[("loss/current", 0.25), ("lr/unet", 2e-4)])
            .unwrap();
        let read = read_scalars(writer.path()).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read[2], (2, "lr/unet".to_string(), 2e-4));
    }
}
