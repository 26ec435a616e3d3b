//! The little the nexus remembers of each TCP connection: the peer's last acknowledgement and
//! next sequence number, so that when an app dies (or its channel is revoked) its peers get a
//! reset instead of silence.
//!
//! A reset is accepted only if its sequence number is the receiver's next expected one
//! (RFC 5961). The nexus sees every segment the app sends, so it knows that number: the end
//! of the app's last segment, which the reset follows on the same path. (Before the app has
//! sent anything, the peer's last acknowledgement stands in.)
//!
//! A connection is remembered from the SYN the peer sends (a SYN or a SYN-ACK) until either
//! side resets it or both have sent their FIN. Only a SYN starts one, so the stray segments
//! that follow a close (the last ACK, a retransmitted FIN) do not bring it back. A peer that
//! half-closes is still remembered: the app may go on sending to it, cut to its MSS, and die
//! while it does.
//!
//! The table is bounded. When it is full, a new SYN takes the place of the oldest connection
//! not yet confirmed: one whose peer has never acknowledged something the app sent (its
//! SYN-ACK, or data). A flood of SYNs from spoofed sources cannot keep a real connection out,
//! and blind ACKs cannot confirm the flood's entries (they would have to guess the app's
//! sequence number). Confirmed connections are never forgotten for room; when every one is,
//! a SYN is not tracked.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use netchannel_shm::control::ChannelId;

/// Most connections remembered (new ones beyond are not tracked).
const CAPACITY: usize = 1 << 16;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy)]
struct Conn {
    channel: ChannelId,
    /// The peer's last acknowledgement (what it expects from the app next, as of then).
    ack: Option<u32>,
    /// The end of the app's last segment (what the peer will expect next once it has it).
    sent: Option<u32>,
    /// The sequence number after the peer's last segment.
    next: u32,
    /// The MSS option of the peer's SYN (what segmentation offload cuts to).
    mss: Option<u16>,
    /// The peer sent its FIN; the app sent its own.
    fin_rx: bool,
    fin_tx: bool,
    /// The end of the first segment the app sent (its SYN-ACK, or its first ACK).
    first_sent: Option<u32>,
    /// The peer has acknowledged something the app sent (from `first_sent` to `sent`): a
    /// real peer, not a forged one guessing.
    confirmed: bool,
}

/// A reset to send: from `local` (the app's side) to `remote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reset {
    /// The app's address.
    pub local: SocketAddr,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Sequence number (the peer's last acknowledgement).
    pub seq: u32,
    /// Acknowledgement number (after the peer's last segment).
    pub ack: u32,
}

/// TCP connections seen on receive, by (local, remote). (Updated for every TCP segment
/// received: a fast hash, seeded per process.)
#[derive(Debug, Default)]
pub struct Conns {
    map: HashMap<(SocketAddr, SocketAddr), Conn, foldhash::fast::RandomState>,
    /// Connections not yet confirmed, oldest first: the candidates to forget for room. Keys
    /// whose connection has since gone or been confirmed are dropped from the front as new
    /// ones come, skipped when met, and pruned when the queue grows past twice the table.
    embryonic: VecDeque<(SocketAddr, SocketAddr)>,
    /// Connections forgotten to make room for a new SYN.
    evicted: u64,
}

impl Conns {
    /// Notes a TCP segment (`tcp`: header and payload) from `remote` to `local`, delivered to
    /// `channel`.
    pub fn on_rx(&mut self, channel: ChannelId, local: SocketAddr, remote: SocketAddr, tcp: &[u8]) {
        let Some(h) = tcp.get(..20) else { return };
        let flags = h[13];
        let key = (local, remote);
        if flags & RST != 0 {
            self.map.remove(&key);
            return;
        }
        let seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let ack = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let header = usize::from(h[12] >> 4) * 4;
        let data = tcp.len().saturating_sub(header) as u32;
        let next = seq
            .wrapping_add(data)
            .wrapping_add(u32::from(flags & SYN != 0))
            .wrapping_add(u32::from(flags & FIN != 0));
        // A SYN for a new connection when the table is full makes room if it can (a lookup
        // more, only then); otherwise one lookup per segment (this runs for every one).
        if flags & SYN != 0
            && self.map.len() >= CAPACITY
            && !self.map.contains_key(&key)
            && !self.evict_embryonic()
        {
            return;
        }
        let full = self.map.len() >= CAPACITY;
        let mut started = false;
        let c = match self.map.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            // Only a SYN starts a connection, and only while there is room.
            Entry::Vacant(_) if flags & SYN == 0 || full => return,
            Entry::Vacant(e) => {
                started = true;
                e.insert(Conn {
                    channel,
                    ack: None,
                    sent: None,
                    next,
                    mss: None,
                    fin_rx: false,
                    fin_tx: false,
                    first_sent: None,
                    confirmed: false,
                })
            }
        };
        c.channel = channel;
        c.next = next;
        if flags & FIN != 0 {
            c.fin_rx = true;
            if c.fin_tx {
                self.map.remove(&key);
                return;
            }
        }
        if flags & SYN != 0 {
            // No option means the RFC 9293 default.
            let default = if local.is_ipv4() { 536 } else { 1220 };
            c.mss = Some(
                super::parse::tcp_mss_option(tcp)
                    .and_then(|at| tcp.get(at..at + 2))
                    .map_or(default, |v| u16::from_be_bytes([v[0], v[1]])),
            );
        }
        if flags & ACK != 0 {
            c.ack = Some(ack);
            if let (Some(first), Some(sent)) = (c.first_sent, c.sent) {
                c.confirmed |= ack.wrapping_sub(first) <= sent.wrapping_sub(first);
            }
        }
        if started {
            self.embryonic.push_back(key);
            self.tidy_embryonic();
        }
    }

    /// Whether the connection of `k` is tracked and not yet confirmed.
    fn unconfirmed(&self, k: &(SocketAddr, SocketAddr)) -> bool {
        self.map.get(k).is_some_and(|c| !c.confirmed)
    }

    /// Drops stale keys from the front of the queue (two per new one, so it keeps up), and
    /// prunes the whole queue in the rare case that a long-lived unconfirmed entry at the
    /// front lets it grow past twice the table.
    fn tidy_embryonic(&mut self) {
        for _ in 0..2 {
            match self.embryonic.front() {
                Some(k) if !self.unconfirmed(k) => {
                    self.embryonic.pop_front();
                }
                _ => break,
            }
        }
        if self.embryonic.len() > 2 * CAPACITY {
            let map = &self.map;
            self.embryonic
                .retain(|k| map.get(k).is_some_and(|c| !c.confirmed));
        }
    }

    /// Forgets the oldest connection not yet confirmed; false if there is none.
    fn evict_embryonic(&mut self) -> bool {
        while let Some(k) = self.embryonic.pop_front() {
            if self.unconfirmed(&k) {
                self.map.remove(&k);
                self.evicted += 1;
                return true;
            }
        }
        false
    }

    /// Connections forgotten so far to make room for new ones.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Notes a TCP segment (`tcp`: header and payload) the app sends from `local` to
    /// `remote`, on a connection seen on receive.
    pub fn on_tx(&mut self, local: SocketAddr, remote: SocketAddr, tcp: &[u8]) {
        let Some(h) = tcp.get(..20) else { return };
        let key = (local, remote);
        let Some(c) = self.map.get_mut(&key) else {
            return;
        };
        let flags = h[13];
        if flags & RST != 0 {
            self.map.remove(&key);
            return;
        }
        let seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let header = usize::from(h[12] >> 4) * 4;
        let data = tcp.len().saturating_sub(header) as u32;
        let end = seq
            .wrapping_add(data)
            .wrapping_add(u32::from(flags & (SYN | FIN) != 0));
        c.first_sent.get_or_insert(end);
        // Keep the furthest end: a retransmission does not move it back.
        c.sent = Some(match c.sent {
            Some(s) if (s.wrapping_sub(end) as i32) > 0 => s,
            _ => end,
        });
        if flags & FIN != 0 {
            c.fin_tx = true;
            if c.fin_rx {
                self.map.remove(&key);
            }
        }
    }

    /// The MSS the peer of (`local`, `remote`) announced, if its SYN was seen.
    pub fn mss(&self, local: SocketAddr, remote: SocketAddr) -> Option<u16> {
        self.map.get(&(local, remote)).and_then(|c| c.mss)
    }

    /// Forgets the connections of `channel` and returns the resets its peers should get.
    pub fn take_channel(&mut self, channel: ChannelId) -> Vec<Reset> {
        let mut out = Vec::new();
        self.map.retain(|&(local, remote), c| {
            if c.channel != channel {
                return true;
            }
            if let Some(seq) = c.sent.or(c.ack) {
                out.push(Reset {
                    local,
                    remote,
                    seq,
                    ack: c.next,
                });
            }
            false
        });
        out
    }

    /// Connections tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Reset {
    /// The reset as an IP packet (RST and ACK, checksums filled in).
    pub fn packet(&self) -> Option<Vec<u8>> {
        let builder = match (self.local.ip(), self.remote.ip()) {
            (IpAddr::V4(l), IpAddr::V4(r)) => {
                etherparse::PacketBuilder::ipv4(l.octets(), r.octets(), 64)
            }
            (IpAddr::V6(l), IpAddr::V6(r)) => {
                etherparse::PacketBuilder::ipv6(l.octets(), r.octets(), 64)
            }
            _ => return None,
        };
        let mut out = Vec::with_capacity(60);
        builder
            .tcp(self.local.port(), self.remote.port(), self.seq, 0)
            .rst()
            .ack(self.ack)
            .write(&mut out, &[])
            .ok()?;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, ack: u32, flags: u8, data: usize) -> Vec<u8> {
        let mut t = vec![0u8; 20 + data];
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    #[test]
    fn a_dead_channels_peers_get_resets_where_the_apps_data_ends() {
        let mut c = Conns::default();
        let l: SocketAddr = "198.18.0.1:80".parse().expect("addr");
        let r: SocketAddr = "198.18.0.2:4000".parse().expect("addr");
        let other: SocketAddr = "198.18.0.3:4000".parse().expect("addr");
        c.on_rx(1, l, r, &seg(1000, 0, SYN, 0));
        c.on_rx(1, l, r, &seg(1001, 5000, ACK, 100));
        c.on_rx(2, l, other, &seg(6, 0, SYN, 0));
        c.on_rx(2, l, other, &seg(7, 9, ACK, 0));
        // The app sends 300 bytes, then retransmits its first 100: the peer will expect 5300.
        c.on_tx(l, r, &seg(5000, 1101, ACK, 300));
        c.on_tx(l, r, &seg(5000, 1101, ACK, 100));
        let resets = c.take_channel(1);
        assert_eq!(
            resets,
            [Reset {
                local: l,
                remote: r,
                seq: 5300,
                ack: 1101
            }]
        );
        assert_eq!(c.len(), 1, "the other channel's connection stays");
        let p = resets[0].packet().expect("a packet");
        let s = etherparse::SlicedPacket::from_ip(&p).expect("parses");
        let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else {
            panic!("not TCP")
        };
        assert!(t.rst() && t.ack());
        assert_eq!(
            (t.sequence_number(), t.acknowledgment_number()),
            (5300, 1101)
        );
        assert_eq!((t.source_port(), t.destination_port()), (80, 4000));
    }

    fn peer(i: usize) -> SocketAddr {
        let ip = std::net::Ipv4Addr::new(198, 18 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        SocketAddr::new(IpAddr::V4(ip), 4000)
    }

    fn syn_with_mss(mss: u16) -> Vec<u8> {
        let mut syn = seg(1, 0, SYN, 0);
        syn[12] = 6 << 4;
        syn.extend_from_slice(&[2, 4]);
        syn.extend_from_slice(&mss.to_be_bytes());
        syn
    }

    /// A handshake the app answers (SYN-ACK from 5000) and the peer completes: confirmed.
    fn handshake(c: &mut Conns, l: SocketAddr, r: SocketAddr, syn: &[u8]) {
        c.on_rx(1, l, r, syn);
        c.on_tx(l, r, &seg(5000, 2, SYN | ACK, 0));
        c.on_rx(1, l, r, &seg(2, 5001, ACK, 0));
    }

    #[test]
    fn a_syn_flood_cannot_keep_a_real_connection_out() {
        let mut c = Conns::default();
        let l: SocketAddr = "198.18.0.1:80".parse().expect("addr");
        // A real connection, established before the flood, and the flood itself: SYNs the app
        // answers, every other one followed by a blind ACK (a guessed acknowledgement).
        let early: SocketAddr = "198.19.255.1:5000".parse().expect("addr");
        handshake(&mut c, l, early, &syn_with_mss(1000));
        for i in 0..CAPACITY + 100 {
            c.on_rx(1, l, peer(i), &seg(1, 0, SYN, 0));
            c.on_tx(l, peer(i), &seg(5000, 2, SYN | ACK, 0));
            if i % 2 == 0 {
                c.on_rx(1, l, peer(i), &seg(2, 1234, ACK, 0));
            }
        }
        assert_eq!(c.len(), CAPACITY);
        assert_eq!(c.evicted(), 101, "the oldest unconfirmed ones made room");
        assert_eq!(c.mss(l, peer(0)), None, "the oldest was forgotten");
        assert_eq!(c.mss(l, peer(CAPACITY + 99)), Some(536));
        assert_eq!(c.mss(l, early), Some(1000), "a confirmed one stays");
        // A real client arriving during the flood is tracked.
        let real: SocketAddr = "198.19.255.2:5000".parse().expect("addr");
        c.on_rx(1, l, real, &syn_with_mss(500));
        assert_eq!(c.mss(l, real), Some(500));
        assert!(c.embryonic.len() <= 2 * CAPACITY + 1);
    }

    #[test]
    fn a_connection_the_app_opened_and_sends_on_is_confirmed_by_any_acknowledgement() {
        let mut c = Conns::default();
        let l: SocketAddr = "198.18.0.1:4000".parse().expect("addr");
        let r: SocketAddr = "198.18.0.2:80".parse().expect("addr");
        // The peer's SYN-ACK starts it; the app's ACK and then 3000 bytes go out before the
        // peer acknowledges the first 1000 of them.
        c.on_rx(1, l, r, &seg(700, 5001, SYN | ACK, 0));
        c.on_tx(l, r, &seg(5001, 701, ACK, 0));
        c.on_tx(l, r, &seg(5001, 701, ACK, 3000));
        assert!(!c.map[&(l, r)].confirmed);
        c.on_rx(1, l, r, &seg(701, 9999, ACK, 0));
        assert!(
            !c.map[&(l, r)].confirmed,
            "an acknowledgement of what was never sent"
        );
        c.on_rx(1, l, r, &seg(701, 6001, ACK, 0));
        assert!(c.map[&(l, r)].confirmed);
    }

    #[test]
    fn a_table_full_of_confirmed_connections_tracks_no_more() {
        let mut c = Conns::default();
        let l: SocketAddr = "198.18.0.1:80".parse().expect("addr");
        for i in 0..CAPACITY {
            handshake(&mut c, l, peer(i), &seg(1, 0, SYN, 0));
        }
        // The queue of candidates kept up with the confirmations.
        assert!(c.embryonic.len() <= 2, "{} stale keys", c.embryonic.len());
        let late: SocketAddr = "198.19.255.2:5000".parse().expect("addr");
        c.on_rx(1, l, late, &syn_with_mss(500));
        assert_eq!(c.mss(l, late), None);
        assert_eq!((c.len(), c.evicted()), (CAPACITY, 0));
        // Nor does a retransmitted SYN of a tracked one take a place.
        c.on_rx(1, l, peer(7), &seg(1, 0, SYN, 0));
        assert_eq!((c.len(), c.evicted()), (CAPACITY, 0));
    }

    #[test]
    fn before_the_app_sends_the_peers_acknowledgement_stands_in() {
        let mut c = Conns::default();
        let l: SocketAddr = "198.18.0.1:80".parse().expect("addr");
        let r: SocketAddr = "198.18.0.2:4000".parse().expect("addr");
        c.on_rx(1, l, r, &seg(1000, 0, SYN, 0));
        c.on_rx(1, l, r, &seg(1001, 5000, ACK, 10));
        assert_eq!(c.take_channel(1)[0].seq, 5000);
    }

    #[test]
    fn the_peers_mss_is_remembered_from_its_syn() {
        let mut c = Conns::default();
        let l: SocketAddr = "198.18.0.1:80".parse().expect("addr");
        let r: SocketAddr = "198.18.0.2:4000".parse().expect("addr");
        let mut syn = seg(1, 0, SYN, 0);
        syn[12] = 6 << 4;
        syn.extend_from_slice(&[2, 4, 0x04, 0xd8]);
        c.on_rx(1, l, r, &syn);
        assert_eq!(c.mss(l, r), Some(1240));
        // A later segment keeps it; a SYN without the option means 536.
        c.on_rx(1, l, r, &seg(2, 1, ACK, 10));
        assert_eq!(c.mss(l, r), Some(1240));
        c.on_rx(1, l, r, &seg(1, 0, SYN, 0));
        assert_eq!(c.mss(l, r), Some(536));
    }

    #[test]
    fn connections_live_from_the_peers_syn_until_a_reset_or_both_fins() {
        let mut c = Conns::default();
        let l: SocketAddr = "[fd00:198:18::1]:80".parse().expect("addr");
        let r: SocketAddr = "[fd00:198:18::2]:4000".parse().expect("addr");
        // Only a SYN starts one.
        c.on_rx(1, l, r, &seg(1, 1, ACK, 0));
        assert!(c.is_empty(), "a segment without SYN starts nothing");
        c.on_rx(1, l, r, &seg(0, 0, SYN, 0));
        // The peer half-closes: the app may still send, and still gets a reset sent for it.
        c.on_rx(1, l, r, &seg(1, 1, ACK | FIN, 10));
        assert_eq!(c.mss(l, r), Some(1220), "its MSS is still known");
        c.on_tx(l, r, &seg(1, 12, ACK, 500));
        assert_eq!(
            c.take_channel(1),
            [Reset {
                local: l,
                remote: r,
                seq: 501,
                ack: 12
            }],
            "the reset acknowledges the peer's FIN"
        );
        // Both FINs: forgotten, and the stray last ACK or a retransmitted FIN do not revive it.
        c.on_rx(1, l, r, &seg(0, 0, SYN, 0));
        c.on_rx(1, l, r, &seg(1, 1, ACK | FIN, 0));
        c.on_tx(l, r, &seg(1, 2, ACK | FIN, 0));
        assert!(c.is_empty());
        c.on_rx(1, l, r, &seg(2, 2, ACK, 0));
        c.on_rx(1, l, r, &seg(1, 1, ACK | FIN, 0));
        assert!(c.is_empty());
        // The app closes first, then the peer.
        c.on_rx(1, l, r, &seg(0, 0, SYN, 0));
        c.on_tx(l, r, &seg(1, 1, ACK | FIN, 0));
        assert_eq!(c.len(), 1);
        c.on_rx(1, l, r, &seg(1, 2, ACK | FIN, 0));
        assert!(c.is_empty());
        // A reset from either side ends it.
        c.on_rx(1, l, r, &seg(0, 0, SYN, 0));
        c.on_rx(1, l, r, &seg(1, 1, RST, 0));
        assert!(c.is_empty());
        c.on_rx(1, l, r, &seg(0, 0, SYN, 0));
        c.on_tx(l, r, &seg(1, 1, RST | ACK, 0));
        assert!(c.is_empty());
        c.on_rx(1, l, r, &[0u8; 10]);
        assert!(c.is_empty(), "a truncated header is ignored");
    }
}
