//! TensorBoard event files, written and read natively.
//!
//! An event file is a sequence of TFRecords: `u64` little-endian payload length, the masked CRC32C of
//! those 8 bytes, the payload, and the masked CRC32C of the payload. Each payload is a `tensorflow.Event`
//! protobuf. The first event carries `file_version = "brain.Event:2"`; each later one carries
//! `wall_time`, `step` and a `Summary` of scalar values (`Summary.Value.simple_value`), the form
//! TensorBoard reads as scalars and that W&B and Comet import. The few protobuf fields are encoded by
//! hand: field numbers from tensorflow/core/util/event.proto and summary.proto.

use crate::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The version string TensorBoard expects in the first event of a file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum TFRecord uses.
pub fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &byte in bytes {
        crc = TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotated and offset so that a CRC of data containing CRCs stays well mixed.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, u64::from(field) << 3 | u64::from(wire_type));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double); step = 2 (int64); file_version = 3 (string) | summary = 5 }`.
fn encode_event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut event = Vec::new();
    put_key(&mut event, 1, 1);
    event.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step as u64); // int64: two's complement as a 64-bit varint
    }
    match body {
        EventBody::FileVersion(version) => put_bytes(&mut event, 3, version.as_bytes()),
        EventBody::Scalars(values) => {
            // Summary { repeated Value value = 1 }; Value { tag = 1 (string); simple_value = 2 (float) }.
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut encoded = Vec::new();
                put_bytes(&mut encoded, 1, tag.as_bytes());
                put_key(&mut encoded, 2, 5);
                encoded.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &encoded);
            }
            put_bytes(&mut event, 5, &summary);
        }
    }
    event
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(&'a str, f32)]),
}

/// Frames `payload` as one TFRecord.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(payload.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    record.extend_from_slice(payload);
    record.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    record
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Writes one event file, `events.out.tfevents.{seconds}.{host}.{pid}`, in a log directory.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, starting with the file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let now = unix_seconds();
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now as u64, std::process::id()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| Error::Io { path: path.clone(), source })?;
        let mut writer = Self { path, file: BufWriter::new(file) };
        writer.write_record(&encode_event(now, 0, EventBody::FileVersion(FILE_VERSION)))?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event holding `values` (tag, value) at `step`, stamped with the current time.
    pub fn add_scalars(&mut self, step: i64, values: &[(&str, f32)]) -> Result<()> {
        self.add_scalars_at(unix_seconds(), step, values)
    }

    /// As [`EventWriter::add_scalars`], with an explicit wall time (seconds since the Unix epoch).
    pub fn add_scalars_at(&mut self, wall_time: f64, step: i64, values: &[(&str, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write_record(&encode_event(wall_time, step, EventBody::Scalars(values)))
    }

    fn write_record(&mut self, payload: &[u8]) -> Result<()> {
        self.file.write_all(&tfrecord(payload)).map_err(|source| Error::Io { path: self.path.clone(), source })
    }

    /// Pushes buffered events to the file, so TensorBoard sees them while the run goes on.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|source| Error::Io { path: self.path.clone(), source })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // Best effort: callers that need to know flush explicitly.
        let _ = self.file.flush();
    }
}

/// One event read back from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// `(tag, simple_value)` of the event's summary, in file order.
    pub scalars: Vec<(String, f32)>,
}

/// Reads every event of a TensorBoard event file, checking both CRCs of every record. Errors name the
/// file, the record's index and its byte offset.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let mut events = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let record = events.len();
        let corrupt = |message: String| Error::Corrupt { path: path.to_owned(), record, offset, message };
        let header = bytes.get(offset..offset + 12).ok_or_else(|| corrupt("truncated record header".into()))?;
        let (length_bytes, length_crc) = header.split_at(8);
        if masked_crc32c(length_bytes) != u32::from_le_bytes(length_crc.try_into().unwrap_or_default()) {
            return Err(corrupt("length CRC mismatch".into()));
        }
        let length = u64::from_le_bytes(length_bytes.try_into().unwrap_or_default());
        let length = usize::try_from(length)
            .ok()
            .filter(|&n| n <= bytes.len() - offset - 12)
            .ok_or_else(|| corrupt(format!("record length {length} runs past the end of the file")))?;
        let payload = &bytes[offset + 12..offset + 12 + length];
        let crc = bytes
            .get(offset + 12 + length..offset + 16 + length)
            .ok_or_else(|| corrupt("truncated payload CRC".into()))?;
        if masked_crc32c(payload) != u32::from_le_bytes(crc.try_into().unwrap_or_default()) {
            return Err(corrupt("payload CRC mismatch".into()));
        }
        events.push(decode_event(payload).map_err(corrupt)?);
        offset += 16 + length;
    }
    Ok(events)
}

/// A protobuf field: its number and either a varint, a fixed 32/64-bit value or a byte string.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first().ok_or("truncated varint")?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.bytes.len() {
            return Err(format!("field of {n} bytes runs past the end of its message"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn next_field(&mut self) -> Option<Result<(u64, Field<'a>), String>> {
        if self.bytes.is_empty() {
            return None;
        }
        Some((|| {
            let key = self.varint()?;
            let field = match key & 7 {
                0 => Field::Varint(self.varint()?),
                1 => Field::Fixed64(self.take(8)?.try_into().map_err(|_| "short fixed64")?),
                2 => {
                    let n = usize::try_from(self.varint()?).map_err(|_| "length overflows")?;
                    Field::Bytes(self.take(n)?)
                }
                5 => Field::Fixed32(self.take(4)?.try_into().map_err(|_| "short fixed32")?),
                other => return Err(format!("unsupported protobuf wire type {other}")),
            };
            Ok((key >> 3, field))
        })())
    }
}

fn decode_event(payload: &[u8]) -> Result<Event, String> {
    let mut event = Event { wall_time: 0.0, step: 0, file_version: None, scalars: Vec::new() };
    let mut fields = Fields { bytes: payload };
    while let Some(field) = fields.next_field() {
        match field? {
            (1, Field::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => event.step = v as i64,
            (3, Field::Bytes(b)) => {
                event.file_version = Some(String::from_utf8(b.to_vec()).map_err(|_| "file_version is not UTF-8")?)
            }
            (5, Field::Bytes(summary)) => event.scalars.extend(decode_summary(summary)?),
            (1 | 2 | 3 | 5, _) => return Err("an Event field has the wrong wire type".into()),
            _ => {} // other Event fields (log messages, graphs, ...) are not ours to read
        }
    }
    Ok(event)
}

fn decode_summary(summary: &[u8]) -> Result<Vec<(String, f32)>, String> {
    let mut scalars = Vec::new();
    let mut fields = Fields { bytes: summary };
    while let Some(field) = fields.next_field() {
        let (1, Field::Bytes(value)) = field? else { continue };
        let (mut tag, mut simple_value) = (None, None);
        let mut value_fields = Fields { bytes: value };
        while let Some(field) = value_fields.next_field() {
            match field? {
                (1, Field::Bytes(b)) => tag = Some(String::from_utf8(b.to_vec()).map_err(|_| "tag is not UTF-8")?),
                (2, Field::Fixed32(b)) => simple_value = Some(f32::from_le_bytes(b)),
                _ => {}
            }
        }
        // Values of other kinds (images, histograms, tensors) carry no simple_value: skipped.
        if let (Some(tag), Some(value)) = (tag, simple_value) {
            scalars.push((tag, value));
        }
    }
    Ok(scalars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // RFC 3720 (iSCSI) B.4 test vectors and the standard "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
    }

    #[test]
    fn file_version_record_matches_tensorflows_bytes() {
        // The first record of every TensorFlow event file with wall_time 0: the payload is
        // 09 <8 zero bytes> 1a 0d "brain.Event:2" (24 bytes), framed with masked CRC32Cs.
        let payload = encode_event(0.0, 0, EventBody::FileVersion(FILE_VERSION));
        let mut expected = vec![0x09];
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[0x1a, 0x0d]);
        expected.extend_from_slice(b"brain.Event:2");
        assert_eq!(payload, expected);
        let record = tfrecord(&payload);
        assert_eq!(&record[..8], &24u64.to_le_bytes());
        assert_eq!(record.len(), 24 + 16);
    }

    #[test]
    fn negative_steps_and_every_scalar_round_trip() {
        let payload = encode_event(12.5, -3, EventBody::Scalars(&[("a/b", 1.5), ("nan", f32::NAN)]));
        let event = decode_event(&payload).unwrap();
        assert_eq!((event.wall_time, event.step), (12.5, -3));
        assert_eq!(event.scalars[0], ("a/b".to_owned(), 1.5));
        assert!(event.scalars[1].1.is_nan());
    }

    #[test]
    fn truncated_messages_are_errors() {
        let payload = encode_event(1.0, 7, EventBody::Scalars(&[("loss", 2.0)]));
        // Cutting after wall_time (9 bytes) or after step (11 bytes) leaves a valid, shorter message;
        // anywhere else a field is cut in half.
        for cut in 1..payload.len() {
            assert_eq!(decode_event(&payload[..cut]).is_ok(), cut == 9 || cut == 11, "cut at {cut}");
        }
    }
}
