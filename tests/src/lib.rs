//! Helpers shared by the integration tests and their peer binaries.
//!
//! The packets of the stream tests carry their own proof of integrity, so that the receiver can
//! check every one without any side channel:
//!
//! ```text
//! bytes 0..8    sequence number (u64, little endian)
//! bytes 8..16   checksum of (sequence, length, body) (u64, little endian)
//! bytes 16..    body: a deterministic function of the sequence number
//! ```
//!
//! The length of packet `seq` is [`packet_len`]`(seq)`, from [`MIN_PACKET`] to [`MAX_PACKET`].

pub mod testbed;

use std::fmt;

/// Smallest stream packet: header only.
pub const MIN_PACKET: usize = 16;
/// Largest stream packet.
pub const MAX_PACKET: usize = 1400;
/// Header bytes (sequence number and checksum).
const HEADER: usize = 16;

/// Source of the body bytes: the body of packet `seq` is a window of this table.
static PATTERN: [u8; 4096] = pattern();

const fn pattern() -> [u8; 4096] {
    let mut p = [0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    let mut i = 0;
    while i < p.len() {
        // xorshift32
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (x >> 24) as u8;
        i += 1;
    }
    p
}

/// Length in bytes of stream packet `seq` (deterministic, varied, `16..=1400`).
pub fn packet_len(seq: u64) -> usize {
    let h = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    MIN_PACKET + (h % (MAX_PACKET - MIN_PACKET + 1) as u64) as usize
}

/// Where in [`PATTERN`] the body of packet `seq` starts.
fn body_start(seq: u64) -> usize {
    (seq.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 54) as usize // 0..1024
}

/// The expected body of packet `seq`.
fn body(seq: u64) -> &'static [u8] {
    let start = body_start(seq);
    &PATTERN[start..start + packet_len(seq) - HEADER]
}

/// Checksum of a packet's sequence number, length and body: position-sensitive over 8-byte
/// words (FNV-style multiply-xor), so that a reordered, truncated or altered body fails.
pub fn checksum(seq: u64, len: usize, body: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seq ^ ((len as u64) << 48);
    let mut words = body.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a)).wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h ^ (h >> 29)
}

/// Writes stream packet `seq` at the start of `buf` and returns its length.
///
/// # Panics
/// If `buf` is shorter than [`MAX_PACKET`].
pub fn fill_packet(seq: u64, buf: &mut [u8]) -> usize {
    let len = packet_len(seq);
    let b = body(seq);
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&checksum(seq, len, b).to_le_bytes());
    buf[HEADER..len].copy_from_slice(b);
    len
}

/// What is wrong with a received stream packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacketError {
    /// Shorter than a header.
    Short(usize),
    /// The length does not match the one of its sequence number.
    Length {
        /// Sequence number in the packet.
        seq: u64,
        /// Length received.
        got: usize,
        /// Length expected for `seq`.
        want: usize,
    },
    /// The checksum does not match the bytes.
    Checksum {
        /// Sequence number in the packet.
        seq: u64,
    },
    /// The checksum matches but the body is not the one of its sequence number.
    Body {
        /// Sequence number in the packet.
        seq: u64,
    },
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short(n) => write!(f, "packet of {n} bytes is shorter than its header"),
            Self::Length { seq, got, want } => {
                write!(f, "packet {seq} is {got} bytes long, expected {want}")
            }
            Self::Checksum { seq } => write!(f, "packet {seq}: checksum mismatch"),
            Self::Body { seq } => write!(f, "packet {seq}: body differs from the one sent"),
        }
    }
}

/// Checks a received stream packet (length, checksum, body) and returns its sequence number.
pub fn check_packet(bytes: &[u8]) -> Result<u64, PacketError> {
    let (Some(seq), Some(sum)) = (bytes.get(..8), bytes.get(8..16)) else {
        return Err(PacketError::Short(bytes.len()));
    };
    let mut a = [0u8; 8];
    a.copy_from_slice(seq);
    let seq = u64::from_le_bytes(a);
    a.copy_from_slice(sum);
    let sum = u64::from_le_bytes(a);
    let want = packet_len(seq);
    if bytes.len() != want {
        return Err(PacketError::Length {
            seq,
            got: bytes.len(),
            want,
        });
    }
    let b = &bytes[HEADER..];
    if checksum(seq, bytes.len(), b) != sum {
        return Err(PacketError::Checksum { seq });
    }
    if b != body(seq) {
        return Err(PacketError::Body { seq });
    }
    Ok(seq)
}

/// Payload of the `i`-th valid packet a hostile peer sends after its violations.
pub fn valid_payload(i: u32) -> Vec<u8> {
    format!("valid packet {i} after the violations").into_bytes()
}

/// How many valid packets a hostile peer sends after its violations.
pub const VALID_AFTER_VIOLATIONS: u32 = 8;

/// Payload of the one packet that the `double-submit` peer submits twice.
pub const DOUBLE_PAYLOAD: &[u8] = b"submitted twice";

/// Payload of the packets the listener sends to a `sender` peer during a stream.
pub const CONTROL_PAYLOAD: &[u8] = b"control packet from the listener";

/// A tiny seeded pseudo-random generator (xorshift64*), for reproducible random choices in
/// the tests and their peers without a dependency.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; zero is replaced by a fixed constant).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_reproducible_and_spread() {
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        let xs: Vec<u64> = (0..1000).map(|_| a.below(10)).collect();
        let ys: Vec<u64> = (0..1000).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        for v in 0..10 {
            assert!(
                xs.iter().filter(|&&x| x == v).count() > 50,
                "value {v} is rare"
            );
        }
        assert_eq!(XorShift::new(0).below(0), 0);
    }

    #[test]
    fn lengths_cover_the_range() {
        let lens: Vec<usize> = (0..100_000).map(packet_len).collect();
        assert_eq!(lens.iter().min(), Some(&MIN_PACKET));
        assert_eq!(lens.iter().max(), Some(&MAX_PACKET));
    }

    #[test]
    fn a_packet_checks_and_any_change_is_caught() {
        let mut buf = vec![0u8; 2048];
        for seq in [0, 1, 2, 77, 1 << 40, u64::MAX] {
            let len = fill_packet(seq, &mut buf);
            assert_eq!(check_packet(&buf[..len]), Ok(seq));
            if len > MIN_PACKET {
                buf[len - 1] ^= 1;
                assert_eq!(
                    check_packet(&buf[..len]),
                    Err(PacketError::Checksum { seq })
                );
                buf[len - 1] ^= 1;
            }
            buf[3] ^= 0x10;
            assert!(check_packet(&buf[..len]).is_err());
            buf[3] ^= 0x10;
            assert!(check_packet(&buf[..len - 1]).is_err());
        }
    }
}
