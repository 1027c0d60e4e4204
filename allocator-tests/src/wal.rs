//! A minimal write-ahead log for the cgroup scenario: checksummed records,
//! each fsynced before it is acknowledged, and a reader that tells a clean
//! end from a torn tail.
//!
//! Record: `len: u32 LE | crc32(payload): u32 LE | payload`.

use std::fs::File;
use std::io::Write;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bit by bit.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// The payload of record `seq`: its number, then filler derived from it.
pub fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    p.extend((0..len.saturating_sub(8)).map(|i| (seq as usize + i) as u8));
    p
}

/// Appends one record and fsyncs it.
pub fn append(file: &mut File, payload: &[u8]) -> std::io::Result<()> {
    let mut rec = Vec::with_capacity(8 + payload.len());
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32(payload).to_le_bytes());
    rec.extend_from_slice(payload);
    file.write_all(&rec)?;
    file.sync_data()
}

/// What a log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Sequence numbers of the valid records, in order.
    pub records: Vec<u64>,
    /// Bytes after the last valid record (a torn tail if non-zero).
    pub torn_bytes: usize,
}

/// Reads records until the data ends or stops being a valid record.
pub fn replay(data: &[u8]) -> Replay {
    let mut records = Vec::new();
    let mut at = 0;
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let Some(body) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if len < 8 || crc32(body) != crc {
            break;
        }
        records.push(u64::from_le_bytes(body[..8].try_into().unwrap()));
        at += 8 + len;
    }
    Replay {
        records,
        torn_bytes: data.len() - at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn replay_finds_a_torn_tail() {
        let mut data = Vec::new();
        for seq in 0..3 {
            let p = payload(seq, 100);
            data.extend_from_slice(&(p.len() as u32).to_le_bytes());
            data.extend_from_slice(&crc32(&p).to_le_bytes());
            data.extend_from_slice(&p);
        }
        let whole = replay(&data);
        assert_eq!(whole.records, vec![0, 1, 2]);
        assert_eq!(whole.torn_bytes, 0);
        let torn = replay(&data[..data.len() - 5]);
        assert_eq!(torn.records, vec![0, 1]);
        assert_eq!(torn.torn_bytes, 108 - 5);
    }
}
