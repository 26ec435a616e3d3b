//! IP reassembly: fragments from the wire become whole packets again before they are
//! classified, as the kernel's `ip_defrag` / `ipv6_frag_rcv` do for its sockets.
//!
//! The protections are the kernel's:
//! * **Memory**: every fragment held is charged its bytes plus a fixed overhead; over the
//!   budget ([`Limits::memory`], 4 MiB as `ipfrag_high_thresh`), the oldest incomplete
//!   datagrams are given up first (`rx_frag_memory`), so a flood of incomplete fragments
//!   costs at most the budget and fresh datagrams still complete.
//! * **Time**: a datagram not complete within [`Limits::timeout`] (30 s, `ipfrag_time`) is
//!   given up (`rx_frag_timeout`).
//! * **Shape**: overlapping fragments kill their datagram (RFC 5722; the kernel does the same
//!   for IPv4), an exact duplicate is dropped alone (`rx_frag_duplicate`), a datagram past
//!   65,535 bytes (`rx_frag_oversized`), a fragment that is empty, not a multiple of 8 bytes
//!   before the last, or that contradicts the known end (`rx_frag_malformed`), and more than
//!   [`Limits::fragments`] pieces (`rx_frag_too_many`) are refused.
//!
//! The whole packet handed back has a plain fixed header (IPv4: no options, fragment fields
//! cleared, checksum rewritten; IPv6: the fragmentable part right after the fixed header),
//! and is parsed and classified like any other.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::drop::DropReason;
use super::parse::checksum;

/// The bounds on reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes held in incomplete datagrams (fragment bytes plus overhead).
    pub memory: usize,
    /// How long a datagram may take to complete.
    pub timeout: Duration,
    /// Most fragments in one datagram.
    pub fragments: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: 4 << 20,
            timeout: Duration::from_secs(30),
            fragments: 256,
        }
    }
}

/// What each held fragment and datagram costs beyond its bytes (allocations, bookkeeping).
const PIECE_OVERHEAD: usize = 64;
const SET_OVERHEAD: usize = 256;

/// Fragments of one datagram share this (RFC 791: source, destination, protocol and ID;
/// RFC 8200: source, destination and ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(Ipv4Addr, Ipv4Addr, u8, u16),
    V6(Ipv6Addr, Ipv6Addr, u32),
}

/// One fragment, as found in its packet.
#[derive(Debug)]
struct Fragment<'a> {
    key: Key,
    /// Offset of its data in the datagram's payload.
    offset: usize,
    /// More fragments follow.
    more: bool,
    data: &'a [u8],
    /// The fixed header (20 or 40 bytes) and the payload's protocol.
    header: &'a [u8],
    proto: u8,
}

/// An incomplete datagram.
#[derive(Debug)]
struct Set {
    /// Fixed header and protocol, from the fragment at offset 0.
    first: Option<(Vec<u8>, u8)>,
    /// (offset, data), sorted by offset, never overlapping.
    pieces: Vec<(usize, Vec<u8>)>,
    received: usize,
    /// The payload's length, once the last fragment came.
    total: Option<usize>,
    cost: usize,
    generation: u64,
}

/// The reassembler of one interface.
#[derive(Debug, Default)]
pub struct Reassembler {
    limits: Limits,
    sets: HashMap<Key, Set>,
    /// (deadline, key, generation) in arrival order: the deadline order, as the timeout is
    /// the same for all.
    expiry: VecDeque<(Instant, Key, u64)>,
    memory: usize,
    generation: u64,
}

impl Reassembler {
    /// A reassembler within `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Bytes held now (fragments and overhead).
    pub fn memory(&self) -> usize {
        self.memory
    }

    /// Datagrams waiting for fragments.
    pub fn incomplete(&self) -> usize {
        self.sets.len()
    }

    /// Takes one fragment (`ip`: its IP packet, headers checked by the parser). Returns the
    /// whole packet when this fragment completes it; every fragment that is refused, and every
    /// datagram given up, is reported to `note` once.
    pub fn insert(
        &mut self,
        ip: &[u8],
        now: Instant,
        note: &mut dyn FnMut(DropReason),
    ) -> Option<Vec<u8>> {
        self.expire(now, note);
        let f = match fragment(ip) {
            Ok(f) => f,
            Err(reason) => {
                note(reason);
                return None;
            }
        };
        let max = match f.key {
            Key::V4(..) => 65535 - 20,
            Key::V6(..) => 65535,
        };
        let end = f.offset + f.data.len();
        if end > max {
            note(DropReason::RxFragOversized);
            return None;
        }
        if f.data.is_empty() || (f.more && f.data.len() % 8 != 0) {
            note(DropReason::RxFragMalformed);
            return None;
        }
        if !self.sets.contains_key(&f.key) {
            self.generation += 1;
            let deadline = now + self.limits.timeout;
            self.expiry.push_back((deadline, f.key, self.generation));
            // The entries of datagrams completed or given up stay until their deadline: drop
            // them once they outnumber the live ones, or a stream of tiny datagrams would
            // grow the queue outside the memory budget (amortized: each entry goes once).
            if self.expiry.len() > 2 * self.sets.len() + 64 {
                let sets = &self.sets;
                self.expiry
                    .retain(|(_, k, g)| sets.get(k).is_some_and(|s| s.generation == *g));
            }
            self.sets.insert(
                f.key,
                Set {
                    first: None,
                    pieces: Vec::new(),
                    received: 0,
                    total: None,
                    cost: SET_OVERHEAD,
                    generation: self.generation,
                },
            );
            self.memory += SET_OVERHEAD;
        }
        let verdict = match self.sets.get_mut(&f.key) {
            Some(set) => place(set, &f, end, self.limits.fragments),
            None => return None,
        };
        match verdict {
            Place::Kept(cost) => self.memory += cost,
            Place::Duplicate => {
                note(DropReason::RxFragDuplicate);
                return None;
            }
            Place::Kill(reason) => {
                note(reason);
                self.remove(&f.key);
                return None;
            }
        }
        // Over budget: give up the oldest datagrams (this one last).
        while self.memory > self.limits.memory {
            let victim = self.oldest_other(&f.key).unwrap_or(f.key);
            note(DropReason::RxFragMemory);
            self.remove(&victim);
            if victim == f.key {
                return None;
            }
        }
        let set = self.sets.get(&f.key)?;
        if set.total != Some(set.received) {
            return None;
        }
        let set = self.remove(&f.key)?;
        Some(assemble(f.key, set))
    }

    /// Gives up the datagrams whose time is out.
    pub fn expire(&mut self, now: Instant, note: &mut dyn FnMut(DropReason)) {
        while let Some(&(deadline, key, generation)) = self.expiry.front() {
            if deadline > now {
                break;
            }
            self.expiry.pop_front();
            if self
                .sets
                .get(&key)
                .is_some_and(|s| s.generation == generation)
            {
                note(DropReason::RxFragTimeout);
                self.remove(&key);
            }
        }
    }

    /// The oldest incomplete datagram other than `keep`.
    fn oldest_other(&mut self, keep: &Key) -> Option<Key> {
        let live = |sets: &HashMap<Key, Set>, k: &Key, g: u64| {
            sets.get(k).is_some_and(|s| s.generation == g)
        };
        // Drop stale entries at the front as we go; keep `keep`'s.
        while let Some(&(_, k, g)) = self.expiry.front() {
            if live(&self.sets, &k, g) {
                break;
            }
            self.expiry.pop_front();
        }
        self.expiry
            .iter()
            .find(|(_, k, g)| k != keep && live(&self.sets, k, *g))
            .map(|(_, k, _)| *k)
    }

    fn remove(&mut self, key: &Key) -> Option<Set> {
        let set = self.sets.remove(key)?;
        self.memory = self.memory.saturating_sub(set.cost);
        Some(set)
    }
}

enum Place {
    /// Held, at this cost.
    Kept(usize),
    /// The same bytes were already there: this copy is dropped, the datagram kept.
    Duplicate,
    /// The datagram is given up.
    Kill(DropReason),
}

/// Puts a fragment into its datagram.
fn place(set: &mut Set, f: &Fragment<'_>, end: usize, most: usize) -> Place {
    // The end must agree with what the last fragment said, and the last with what came.
    if let Some(total) = set.total
        && (end > total || (!f.more && end != total))
    {
        return Place::Kill(DropReason::RxFragMalformed);
    }
    if !f.more && set.pieces.last().is_some_and(|(o, d)| o + d.len() > end) {
        return Place::Kill(DropReason::RxFragMalformed);
    }
    let at = set.pieces.partition_point(|(o, _)| *o < f.offset);
    let dup = set
        .pieces
        .get(at)
        .is_some_and(|(o, d)| *o == f.offset && d.len() == f.data.len());
    if dup {
        return Place::Duplicate;
    }
    let overlaps_next = set.pieces.get(at).is_some_and(|(o, _)| *o < end);
    let overlaps_prev = at > 0
        && set
            .pieces
            .get(at - 1)
            .is_some_and(|(o, d)| o + d.len() > f.offset);
    if overlaps_next || overlaps_prev {
        return Place::Kill(DropReason::RxFragOverlap);
    }
    if set.pieces.len() >= most {
        return Place::Kill(DropReason::RxFragTooMany);
    }
    if f.offset == 0 {
        set.first = Some((f.header.to_vec(), f.proto));
    }
    if !f.more {
        set.total = Some(end);
    }
    set.pieces.insert(at, (f.offset, f.data.to_vec()));
    set.received += f.data.len();
    let cost = f.data.len() + PIECE_OVERHEAD;
    set.cost += cost;
    Place::Kept(cost)
}

/// The whole packet of a complete datagram.
fn assemble(key: Key, set: Set) -> Vec<u8> {
    let (header, proto) = set.first.unwrap_or_default();
    let mut out = Vec::with_capacity(header.len() + set.received);
    out.extend_from_slice(&header);
    for (_, d) in &set.pieces {
        out.extend_from_slice(d);
    }
    match key {
        Key::V4(..) => {
            if out.len() >= 20 {
                let len = out.len() as u16;
                out[0] = 0x45;
                out[2..4].copy_from_slice(&len.to_be_bytes());
                out[6..8].fill(0);
                out[10..12].fill(0);
                let c = checksum(&[&out[..20]], 0);
                out[10..12].copy_from_slice(&c.to_be_bytes());
            }
        }
        Key::V6(..) => {
            if out.len() >= 40 {
                out[4..6].copy_from_slice(&(set.received as u16).to_be_bytes());
                out[6] = proto;
            }
        }
    }
    out
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Finds the fragment in an IP packet the parser reported as one.
fn fragment(ip: &[u8]) -> Result<Fragment<'_>, DropReason> {
    let bad = DropReason::RxFragMalformed;
    match ip.first().map(|b| b >> 4) {
        Some(4) => {
            let hl = usize::from(ip[0] & 0x0f) * 4;
            if hl < 20 {
                return Err(bad);
            }
            let total = usize::from(be16(ip, 2).ok_or(bad)?);
            let field = be16(ip, 6).ok_or(bad)?;
            let data = ip.get(hl..total).ok_or(bad)?;
            let src: [u8; 4] = ip.get(12..16).and_then(|s| s.try_into().ok()).ok_or(bad)?;
            let dst: [u8; 4] = ip.get(16..20).and_then(|s| s.try_into().ok()).ok_or(bad)?;
            let proto = *ip.get(9).ok_or(bad)?;
            let id = be16(ip, 4).ok_or(bad)?;
            Ok(Fragment {
                key: Key::V4(src.into(), dst.into(), proto, id),
                offset: usize::from(field & 0x1fff) * 8,
                more: field & 0x2000 != 0,
                data,
                header: ip.get(..20).ok_or(bad)?,
                proto,
            })
        }
        Some(6) => {
            let end = 40 + usize::from(be16(ip, 4).ok_or(bad)?);
            let mut next = *ip.get(6).ok_or(bad)?;
            let mut at = 40;
            // The headers before the fragment header (checked by the parser) are not kept.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        let len = (usize::from(*ip.get(at + 1).ok_or(bad)?) + 1) * 8;
                        next = *ip.get(at).ok_or(bad)?;
                        at += len;
                    }
                    44 => {
                        let field = be16(ip, at + 2).ok_or(bad)?;
                        let id = ip.get(at + 4..at + 8).ok_or(bad)?;
                        let src: [u8; 16] =
                            ip.get(8..24).and_then(|s| s.try_into().ok()).ok_or(bad)?;
                        let dst: [u8; 16] =
                            ip.get(24..40).and_then(|s| s.try_into().ok()).ok_or(bad)?;
                        return Ok(Fragment {
                            key: Key::V6(
                                src.into(),
                                dst.into(),
                                u32::from_be_bytes([id[0], id[1], id[2], id[3]]),
                            ),
                            offset: usize::from(field & 0xfff8),
                            more: field & 1 != 0,
                            data: ip.get(at + 8..end).ok_or(bad)?,
                            header: ip.get(..40).ok_or(bad)?,
                            proto: *ip.get(at).ok_or(bad)?,
                        });
                    }
                    _ => return Err(bad),
                }
            }
            Err(bad)
        }
        _ => Err(bad),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fragment::{Plan, plan};
    use super::super::parse::{parse_ip, tests::*};
    use super::*;

    /// `ip` cut into fragments of at most `mtu` bytes by the TX side (IPv6 ID 7).
    fn cut(ip: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        let p: Plan = plan(ip, mtu).expect("plan");
        (0..p.count())
            .map(|k| {
                let mut out = vec![0u8; mtu];
                let n = p.write(ip, k, 7, &mut out).expect("write");
                out.truncate(n);
                out
            })
            .collect()
    }

    fn udp4_ip(n: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
        udp4(A, 1000, B, 2000, &payload)[14..].to_vec()
    }

    fn udp6_ip(n: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..n).map(|i| (i * 11) as u8).collect();
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv6(A6, B6, 64)
            .udp(1000, 2000)
            .write(&mut out, &payload)
            .unwrap();
        out
    }

    fn feed(
        r: &mut Reassembler,
        frags: &[Vec<u8>],
        now: Instant,
    ) -> (Vec<Vec<u8>>, Vec<DropReason>) {
        let mut drops = Vec::new();
        let mut whole = Vec::new();
        for f in frags {
            if let Some(p) = r.insert(f, now, &mut |d| drops.push(d)) {
                whole.push(p);
            }
        }
        (whole, drops)
    }

    #[test]
    fn datagrams_cut_by_the_tx_side_come_back_whole_in_any_order() {
        let now = Instant::now();
        for ip in [
            udp4_ip(1473),
            udp4_ip(8000),
            udp4_ip(65507),
            udp6_ip(1473),
            udp6_ip(8000),
            udp6_ip(65487),
        ] {
            let mut frags = cut(&ip, 1500);
            assert!(frags.len() > 1);
            assert!(frags.iter().all(|f| f.len() <= 1500));
            frags.reverse();
            let mut r = Reassembler::new(Limits::default());
            let (whole, drops) = feed(&mut r, &frags, now);
            assert!(drops.is_empty(), "{drops:?}");
            assert_eq!(whole.len(), 1);
            let got = parse_ip(&whole[0]).expect("a valid packet, checksums and all");
            let want = parse_ip(&ip).expect("original");
            assert_eq!(
                (got.src, got.dst, got.ip_len),
                (want.src, want.dst, want.ip_len)
            );
            assert_eq!(whole[0][got.l4..], ip[want.l4..]);
            assert_eq!(r.memory(), 0);
            assert_eq!(r.incomplete(), 0);
        }
    }

    #[test]
    fn overlapping_fragments_kill_the_datagram_and_duplicates_are_dropped_alone() {
        let now = Instant::now();
        let ip = udp4_ip(4000);
        let frags = cut(&ip, 1500);
        // An overlap: the second fragment shifted back by 8 bytes.
        let mut shifted = frags[1].clone();
        let field = u16::from_be_bytes([shifted[6], shifted[7]]);
        shifted[6..8].copy_from_slice(&(field - 1).to_be_bytes());
        let mut r = Reassembler::new(Limits::default());
        let (whole, drops) = feed(
            &mut r,
            &[
                frags[0].clone(),
                shifted,
                frags[1].clone(),
                frags[2].clone(),
            ],
            now,
        );
        assert!(whole.is_empty());
        assert_eq!(drops, vec![DropReason::RxFragOverlap]);
        // A duplicate: the datagram still completes.
        let mut r = Reassembler::new(Limits::default());
        let (whole, drops) = feed(
            &mut r,
            &[
                frags[0].clone(),
                frags[0].clone(),
                frags[1].clone(),
                frags[2].clone(),
            ],
            now,
        );
        assert_eq!(whole.len(), 1);
        assert_eq!(drops, vec![DropReason::RxFragDuplicate]);
    }

    #[test]
    fn incomplete_datagrams_time_out_and_oversized_ones_are_refused() {
        let now = Instant::now();
        let frags = cut(&udp6_ip(3000), 1280);
        let mut r = Reassembler::new(Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        });
        let (whole, _) = feed(&mut r, &frags[..frags.len() - 1], now);
        assert!(whole.is_empty());
        assert_eq!(r.incomplete(), 1);
        let mut drops = Vec::new();
        r.expire(now + Duration::from_millis(150), &mut |d| drops.push(d));
        assert_eq!(drops, vec![DropReason::RxFragTimeout]);
        assert_eq!((r.incomplete(), r.memory()), (0, 0));
        // A last fragment that ends past 65,535 bytes.
        let mut last = cut(&udp4_ip(3000), 1500).pop().unwrap();
        last[6..8].copy_from_slice(&0x1ffe_u16.to_be_bytes());
        let (_, drops) = feed(&mut r, &[last], now);
        assert_eq!(drops, vec![DropReason::RxFragOversized]);
    }

    #[test]
    fn a_flood_of_incomplete_fragments_stays_within_the_memory_budget() {
        let now = Instant::now();
        let limits = Limits {
            memory: 256 * 1024,
            ..Limits::default()
        };
        let mut r = Reassembler::new(limits);
        let mut drops = 0;
        for id in 0..5000u16 {
            let mut f = cut(&udp4_ip(3000), 1500).remove(0);
            f[4..6].copy_from_slice(&id.to_be_bytes());
            let _ = r.insert(&f, now, &mut |_| drops += 1);
            assert!(r.memory() <= limits.memory);
        }
        assert!(drops > 4000, "{drops}");
        // A real datagram still completes in the middle of it.
        let (whole, _) = feed(&mut r, &cut(&udp4_ip(8000), 1500), now);
        assert_eq!(whole.len(), 1);
    }

    #[test]
    fn completed_datagrams_leave_no_bookkeeping_behind() {
        let now = Instant::now();
        let mut r = Reassembler::new(Limits::default());
        let frags = cut(&udp4_ip(1600), 1500);
        for id in 0..10_000u16 {
            let mut set = frags.clone();
            for f in &mut set {
                f[4..6].copy_from_slice(&id.to_be_bytes());
            }
            let (whole, drops) = feed(&mut r, &set, now);
            assert_eq!((whole.len(), drops.len()), (1, 0));
        }
        assert_eq!((r.incomplete(), r.memory()), (0, 0));
        assert!(r.expiry.len() <= 66, "{} expiry entries", r.expiry.len());
    }

    #[test]
    fn bad_fragments_are_refused_and_never_panic() {
        let now = Instant::now();
        let frags = cut(&udp6_ip(3000), 1280);
        let mut r = Reassembler::new(Limits::default());
        for f in &frags {
            for n in 0..f.len() {
                let _ = r.insert(&f[..n], now, &mut |_| {});
            }
        }
        // A middle fragment of 7 bytes.
        let mut odd = frags[0].clone();
        let len = u16::from_be_bytes([odd[4], odd[5]]);
        odd[4..6].copy_from_slice(&(len - 1).to_be_bytes());
        odd.pop();
        let mut drops = Vec::new();
        let mut r = Reassembler::new(Limits::default());
        assert!(r.insert(&odd, now, &mut |d| drops.push(d)).is_none());
        assert_eq!(drops, vec![DropReason::RxFragMalformed]);
    }
}
