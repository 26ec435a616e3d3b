//! IP fragmentation of what apps send: an app hands the nexus a whole datagram of up to
//! 65,535 bytes (its stack need not fragment), the nexus validates it once (one anti-spoofing
//! check, ports and all: a fragment without ports could not be checked) and cuts it to the
//! link's MTU while copying it into the interface's frames, as the kernel does for a socket
//! whose datagram exceeds the path MTU.
//!
//! IPv4 follows `IP_PMTUDISC_WANT`, the kernel's default for sockets: a datagram over the MTU
//! is fragmented even if the app set DF, and its fragments go without DF. Options whose copy
//! bit is set are repeated in every fragment, the others only in the first (RFC 791). IPv6
//! fragments carry a Fragment header after the unfragmentable part (the fixed header, a
//! hop-by-hop header, and the headers up to the last routing header: RFC 8200 §4.5). The
//! identification is the nexus's, in both families (`Switch::next_frag_id`): an app's stack
//! may give every datagram the same IPv4 ID (smoltcp does, with DF), and fragments of two
//! datagrams under one ID would be mixed by the peer's reassembly. A packet that is already a
//! fragment never gets here (the parser refuses it).

use std::ops::Range;

use super::parse::checksum;

/// How one datagram is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    v6: bool,
    /// The header every fragment repeats: IPv4's first-fragment header (options included);
    /// IPv6's unfragmentable part.
    head: Range<usize>,
    /// IPv4: the options of the later fragments (those with the copy bit), padded to 4 bytes.
    later_options: Vec<u8>,
    /// The fragmentable part.
    body: Range<usize>,
    /// Data bytes per fragment (a multiple of 8).
    step: usize,
    /// IPv6: the next header after the unfragmentable part, and where its field is.
    next: u8,
    next_at: usize,
}

/// Why a datagram cannot be cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// The headers do not fit what they say, or leave no room for data within the MTU.
    Malformed,
}

/// How to cut the IP packet `ip` (validated, its lengths trusted up to `ip.len()`) into
/// fragments of at most `mtu` bytes.
pub fn plan(ip: &[u8], mtu: usize) -> Result<Plan, PlanError> {
    let bad = PlanError::Malformed;
    let be16 = |at: usize| -> Result<usize, PlanError> {
        Ok(usize::from(u16::from_be_bytes([
            *ip.get(at).ok_or(bad)?,
            *ip.get(at + 1).ok_or(bad)?,
        ])))
    };
    match ip.first().map(|b| b >> 4) {
        Some(4) => {
            let hl = usize::from(ip[0] & 0x0f) * 4;
            let total = be16(2)?.min(ip.len());
            if hl < 20 || total <= hl {
                return Err(bad);
            }
            let mut later_options = Vec::new();
            let opts = ip.get(20..hl).ok_or(bad)?;
            let mut i = 0;
            while let Some(&kind) = opts.get(i) {
                let len = match kind {
                    0 => break,
                    1 => 1,
                    _ => usize::from(*opts.get(i + 1).ok_or(bad)?).max(2),
                };
                let opt = opts.get(i..i + len).ok_or(bad)?;
                if kind & 0x80 != 0 {
                    later_options.extend_from_slice(opt);
                }
                i += len;
            }
            while later_options.len() % 4 != 0 {
                later_options.push(0);
            }
            let step = mtu.checked_sub(hl).ok_or(bad)? & !7;
            if step == 0 {
                return Err(bad);
            }
            Ok(Plan {
                v6: false,
                head: 0..hl,
                later_options,
                body: hl..total,
                step,
                next: 0,
                next_at: 0,
            })
        }
        Some(6) => {
            let end = (40 + be16(4)?).min(ip.len());
            // The unfragmentable part: the fixed header, then the extension headers up to the
            // last routing header (destination options before it are for the hops it
            // names), or a hop-by-hop header alone.
            let (mut next_at, mut at, mut next) = (6, 40, *ip.get(6).ok_or(bad)?);
            let mut unfrag = (next_at, at, next);
            for k in 0..8 {
                if !matches!(next, 0 | 43 | 60) {
                    break;
                }
                let len = (usize::from(*ip.get(at + 1).ok_or(bad)?) + 1) * 8;
                let kind = next;
                next_at = at;
                next = *ip.get(at).ok_or(bad)?;
                at += len;
                if kind == 43 || (kind == 0 && k == 0) {
                    unfrag = (next_at, at, next);
                }
            }
            let (next_at, at, next) = unfrag;
            if at >= end {
                return Err(bad);
            }
            let step = mtu.checked_sub(at + 8).ok_or(bad)? & !7;
            if step == 0 {
                return Err(bad);
            }
            Ok(Plan {
                v6: true,
                head: 0..at,
                later_options: Vec::new(),
                body: at..end,
                step,
                next,
                next_at,
            })
        }
        _ => Err(bad),
    }
}

impl Plan {
    /// How many fragments.
    pub fn count(&self) -> usize {
        self.body.len().div_ceil(self.step)
    }

    /// The length of the IP packet being cut (what its header says, within the buffer).
    pub fn packet_len(&self) -> usize {
        self.body.end
    }

    /// Writes fragment `k` of `ip` into `out`, identified by `id` (IPv4 takes its low 16
    /// bits); returns its length, or `None` if `out` is too small or `k` out of range.
    pub fn write(&self, ip: &[u8], k: usize, id: u32, out: &mut [u8]) -> Option<usize> {
        let from = self.body.start + k * self.step;
        if from >= self.body.end {
            return None;
        }
        let to = (from + self.step).min(self.body.end);
        let more = to < self.body.end;
        let offset = k * self.step;
        let data = ip.get(from..to)?;
        if self.v6 {
            let head = ip.get(self.head.clone())?;
            let n = head.len() + 8 + data.len();
            let out = out.get_mut(..n)?;
            out[..head.len()].copy_from_slice(head);
            out[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
            out[self.next_at] = 44;
            let f = &mut out[head.len()..head.len() + 8];
            f[0] = self.next;
            f[1] = 0;
            f[2..4].copy_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
            f[4..8].copy_from_slice(&id.to_be_bytes());
            out[head.len() + 8..].copy_from_slice(data);
            Some(n)
        } else {
            let fixed = ip.get(..20)?;
            let options = if k == 0 {
                ip.get(20..self.head.end)?
            } else {
                &self.later_options[..]
            };
            let hl = 20 + options.len();
            let n = hl + data.len();
            let out = out.get_mut(..n)?;
            out[..20].copy_from_slice(fixed);
            out[20..hl].copy_from_slice(options);
            out[0] = 0x40 | (hl / 4) as u8;
            out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            out[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let field = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
            out[6..8].copy_from_slice(&field.to_be_bytes());
            out[10..12].fill(0);
            let c = checksum(&[&out[..hl]], 0);
            out[10..12].copy_from_slice(&c.to_be_bytes());
            out[hl..].copy_from_slice(data);
            Some(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowswitch::parse::tests::{A, B};

    #[test]
    fn ipv4_options_with_the_copy_bit_are_repeated_and_df_is_cleared() {
        let payload = vec![0x5au8; 3000];
        let mut ip = Vec::new();
        etherparse::PacketBuilder::ipv4(A, B, 64)
            .udp(1, 2)
            .write(&mut ip, &payload)
            .unwrap();
        // Insert 8 bytes of options: a copied one (type 0x94, router alert, len 4), then a
        // non-copied timestamp-like one (type 0x44, len 4).
        let mut with = ip[..20].to_vec();
        with.extend_from_slice(&[0x94, 4, 0, 0, 0x44, 4, 0, 0]);
        with.extend_from_slice(&ip[20..]);
        with[0] = 0x47;
        with[6] = 0x40; // DF
        let total = with.len() as u16;
        with[2..4].copy_from_slice(&total.to_be_bytes());
        let p = plan(&with, 1500).unwrap();
        assert_eq!(p.count(), 3);
        let mut out = vec![0u8; 1500];
        let n0 = p.write(&with, 0, 0, &mut out).unwrap();
        assert_eq!(out[0], 0x47);
        assert_eq!(out[6] & 0x40, 0, "no DF on a fragment");
        assert_eq!(checksum(&[&out[..28]], 0), 0);
        assert!(n0 <= 1500);
        let n1 = p.write(&with, 1, 0, &mut out).unwrap();
        assert_eq!(out[0], 0x46, "only the copied option");
        assert_eq!(&out[20..24], &[0x94, 4, 0, 0]);
        assert_eq!(checksum(&[&out[..24]], 0), 0);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]) as usize, n1);
        assert!(p.write(&with, 3, 0, &mut out).is_none());
    }

    #[test]
    fn ipv6_headers_up_to_the_routing_header_are_repeated_and_the_id_is_ours() {
        use crate::flowswitch::parse::tests::{A6, B6};
        let mut plain = Vec::new();
        etherparse::PacketBuilder::ipv6(A6, B6, 64)
            .udp(1, 2)
            .write(&mut plain, &[0x11u8; 3000])
            .unwrap();
        // Hop-by-hop, destination options, routing (no segment left), destination options.
        let mut ip = plain[..40].to_vec();
        ip[6] = 0;
        ip.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
        ip.extend_from_slice(&[43, 0, 1, 4, 0, 0, 0, 0]);
        ip.extend_from_slice(&[60, 0, 253, 0, 0, 0, 0, 0]);
        ip.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
        ip.extend_from_slice(&plain[40..]);
        let len = (ip.len() - 40) as u16;
        ip[4..6].copy_from_slice(&len.to_be_bytes());
        let p = plan(&ip, 1280).unwrap();
        let mut out = vec![0u8; 1280];
        for k in 0..p.count() {
            let n = p.write(&ip, k, 0xabcd_0123, &mut out).unwrap();
            assert!(n <= 1280);
            // The headers up to the routing header, which now names the fragment header.
            assert_eq!(&out[40..56], &ip[40..56]);
            assert_eq!(out[56], 44, "the routing header's next header");
            assert_eq!(&out[57..64], &ip[57..64]);
            assert_eq!(
                out[64], 60,
                "the fragmentable part starts with destination options"
            );
            assert_eq!(&out[68..72], &0xabcd_0123u32.to_be_bytes());
        }
        // IPv4: the identification is ours too.
        let mut v4 = Vec::new();
        etherparse::PacketBuilder::ipv4(A, B, 64)
            .udp(1, 2)
            .write(&mut v4, &[1u8; 2000])
            .unwrap();
        let p = plan(&v4, 1500).unwrap();
        p.write(&v4, 1, 0x0001_7777, &mut out).unwrap();
        assert_eq!(&out[4..6], &[0x77, 0x77]);
    }

    #[test]
    fn a_tiny_mtu_or_broken_header_is_refused_not_panicked_on() {
        let mut ip = Vec::new();
        etherparse::PacketBuilder::ipv4(A, B, 64)
            .udp(1, 2)
            .write(&mut ip, &[1u8; 100])
            .unwrap();
        assert_eq!(plan(&ip, 20), Err(PlanError::Malformed));
        for n in 0..ip.len() {
            let _ = plan(&ip[..n], 64);
        }
    }
}
