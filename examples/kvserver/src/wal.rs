//! The write-ahead log: every write is appended and made durable before it
//! is acknowledged.
//!
//! Framing: `len: u32 LE | crc32(body): u32 LE | body`, where the body is
//! `op: u8 | key_len: u32 LE | key | value` (op 1 = SET, 2 = DEL).
//!
//! Group commit: writers queue their records in memory under the store lock
//! (so log order is apply order) and wait; one writer thread writes whatever
//! is queued with one `write` and one `fdatasync`, then wakes every writer
//! whose record that covered. Under load one fsync acknowledges many writes.
//!
//! Replay: a record cut short at the end of the file, or whose checksum fails
//! and which ends exactly at the end of the file, is a torn tail (a write the
//! process did not finish): it is reported and truncated. A checksum failure
//! with more data after it is corruption in the middle: an error, never
//! skipped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::thread;

use parking_lot::{Condvar, Mutex};

/// Sets `key` to `value`.
pub const OP_SET: u8 = 1;
/// Deletes `key`.
pub const OP_DEL: u8 = 2;

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// [`OP_SET`] or [`OP_DEL`].
    pub kind: u8,
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a delete).
    pub value: Vec<u8>,
}

/// Appends the framed record for `op` to `out`.
pub fn encode(out: &mut Vec<u8>, kind: u8, key: &[u8], value: &[u8]) {
    let body_len = 1 + 4 + key.len() + value.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What replay found.
#[derive(Debug)]
pub struct Replay {
    /// The operations, in log order.
    pub ops: Vec<Op>,
    /// Bytes of valid records.
    pub valid_len: u64,
    /// Bytes of a torn tail that were truncated (0 if none).
    pub torn_bytes: u64,
}

/// Reads the log at `path` (missing means empty), truncating a torn tail.
pub fn replay(path: &Path) -> io::Result<Replay> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let (ops, valid_len) = decode_all(&data)?;
    let torn_bytes = (data.len() - valid_len) as u64;
    if torn_bytes > 0 {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(valid_len as u64)?;
        f.sync_all()?;
    }
    Ok(Replay {
        ops,
        valid_len: valid_len as u64,
        torn_bytes,
    })
}

/// Decodes records; returns them and the length of the valid prefix, or an
/// error for corruption before the end.
pub fn decode_all(data: &[u8]) -> io::Result<(Vec<Op>, usize)> {
    let mut ops = Vec::new();
    let mut at = 0;
    while at < data.len() {
        if data.len() - at < 8 {
            break; // torn header
        }
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let end = at + 8 + len;
        if end > data.len() {
            break; // torn body
        }
        let body = &data[at + 8..end];
        let bad = crc32fast::hash(body) != crc || len < 5 || {
            let key_len = u32::from_le_bytes(body[1..5].try_into().unwrap()) as usize;
            5 + key_len > len || !matches!(body[0], OP_SET | OP_DEL)
        };
        if bad {
            if end == data.len() {
                break; // a torn last record
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "corrupt log record at byte {at} with {} bytes after it",
                    data.len() - end
                ),
            ));
        }
        let key_len = u32::from_le_bytes(body[1..5].try_into().unwrap()) as usize;
        ops.push(Op {
            kind: body[0],
            key: body[5..5 + key_len].to_vec(),
            value: body[5 + key_len..].to_vec(),
        });
        at = end;
    }
    Ok((ops, at))
}

struct State {
    /// Encoded records not yet written.
    queued: Vec<u8>,
    /// Sequence number of the last queued record.
    queued_seq: u64,
    /// Sequence number of the last durable record.
    durable_seq: u64,
    closing: bool,
    closed: bool,
    failed: Option<String>,
}

/// The log, shared by connection threads and its writer thread.
pub struct Wal {
    state: Mutex<State>,
    changed: Condvar,
}

impl Wal {
    /// Opens `path` for appending and starts the group-commit thread.
    pub fn open(path: &Path) -> io::Result<Arc<Wal>> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let wal = Arc::new(Wal {
            state: Mutex::new(State {
                queued: Vec::new(),
                queued_seq: 0,
                durable_seq: 0,
                closing: false,
                closed: false,
                failed: None,
            }),
            changed: Condvar::new(),
        });
        let w = wal.clone();
        thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || w.writer(file))?;
        Ok(wal)
    }

    /// Queues a record; returns its sequence number for [`Wal::wait`].
    /// Call it under the lock that orders writes to the store.
    pub fn queue(&self, kind: u8, key: &[u8], value: &[u8]) -> Result<u64, String> {
        let mut s = self.state.lock();
        if s.closing {
            return Err("log closed".into());
        }
        encode(&mut s.queued, kind, key, value);
        s.queued_seq += 1;
        let seq = s.queued_seq;
        drop(s);
        self.changed.notify_all();
        Ok(seq)
    }

    /// Waits until record `seq` is durable.
    pub fn wait(&self, seq: u64) -> Result<(), String> {
        let mut s = self.state.lock();
        loop {
            if s.durable_seq >= seq {
                return Ok(());
            }
            if let Some(e) = &s.failed {
                return Err(e.clone());
            }
            if s.closed {
                return Err("log closed".into());
            }
            self.changed.wait(&mut s);
        }
    }

    /// Writes and fsyncs everything queued, stops the writer and closes the
    /// file. Later `queue` calls fail.
    pub fn close(&self) {
        let mut s = self.state.lock();
        s.closing = true;
        self.changed.notify_all();
        while !s.closed {
            self.changed.wait(&mut s);
        }
    }

    fn writer(&self, mut file: File) {
        loop {
            let mut s = self.state.lock();
            while s.queued.is_empty() && !s.closing {
                self.changed.wait(&mut s);
            }
            if s.queued.is_empty() && s.closing {
                let result = file.sync_all();
                if let Err(e) = result {
                    s.failed = Some(format!("fsync on close: {e}"));
                }
                s.closed = true;
                drop(s);
                self.changed.notify_all();
                return;
            }
            let batch = std::mem::take(&mut s.queued);
            let upto = s.queued_seq;
            drop(s);
            let result = file.write_all(&batch).and_then(|()| file.sync_data());
            let mut s = self.state.lock();
            match result {
                Ok(()) => s.durable_seq = upto,
                Err(e) => {
                    s.failed = Some(format!("log write failed: {e}"));
                    s.closing = true;
                }
            }
            drop(s);
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..n {
            encode(&mut v, OP_SET, format!("k{i}").as_bytes(), &[i as u8; 100]);
        }
        v
    }

    #[test]
    fn round_trip() {
        let data = log(5);
        let (ops, len) = decode_all(&data).unwrap();
        assert_eq!(ops.len(), 5);
        assert_eq!(len, data.len());
        assert_eq!(ops[3].key, b"k3");
    }

    #[test]
    fn torn_tail_is_cut_not_an_error() {
        let data = log(5);
        for cut in [1, 7, 8, 50, 114] {
            let (ops, len) = decode_all(&data[..data.len() - cut]).unwrap();
            assert_eq!(ops.len(), 4, "cut {cut}");
            assert_eq!(len, data.len() / 5 * 4);
        }
        // A garbled last record of full length is torn too.
        let mut garbled = data.clone();
        let n = garbled.len();
        garbled[n - 3] ^= 0xFF;
        assert_eq!(decode_all(&garbled).unwrap().0.len(), 4);
    }

    #[test]
    fn corruption_in_the_middle_is_an_error() {
        let mut data = log(5);
        data[30] ^= 0xFF;
        assert!(decode_all(&data).is_err());
    }
}
