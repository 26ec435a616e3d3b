//! Delivery into a channel: the copy that verifies checksums on the way, and receive
//! coalescing (the "receive coalescing" offload of `DESIGN.md` §8).
//!
//! Every packet is copied once into the app's pool (the isolation boundary), and its UDP/TCP
//! checksum is summed during that copy instead of in a pass of its own.
//!
//! On a channel granted [`rx_coalesce`](netchannel_shm::control::Offloads::rx_coalesce), in-order TCP segments of one connection
//! that arrive in the same batch are appended to one packet, up to a pool buffer, so the app's
//! stack handles one packet (and sends one ACK) where the wire carried many. The rules are
//! GRO's: the next segment must continue the sequence exactly, carry the same acknowledgement,
//! options (timestamps included) and IP header fields, and only ACK and PSH; a PSH closes the
//! packet, and SYN, FIN, RST, URG and ECN flags are never merged. The merged packet's lengths,
//! window (the newest), IPv4 header checksum and TCP checksum are rewritten, so it is a valid
//! packet that the peer could have sent. Only the last packet staged on a channel can grow, so
//! nothing is ever reordered.
//!
//! On a channel granted [`tx_segment`](netchannel_shm::control::Offloads::tx_segment), the MSS option of the peer's SYN is raised to
//! what a pool buffer holds: the app's stack then sends large segments, which the nexus cuts to
//! the real MSS (it remembers it; see `conntrack`).

use std::net::IpAddr;

use netchannel_shm::control::ChannelId;

use super::checksum::{self, Sum};
use super::parse::{Proto, RxDrop};
use super::port::{Port, Ports};

const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const SYN: u8 = 0x02;

/// A packet on its way to a channel, as the parser found it.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The IP packet, exactly as long as its header says.
    pub ip: &'a [u8],
    /// UDP or TCP.
    pub proto: Proto,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
}

impl Incoming<'_> {
    /// Offset of the transport header (options and extension headers are stripped before
    /// delivery: see `parse::canonical`).
    fn l4(&self) -> usize {
        if self.src.is_ipv4() { 20 } else { 40 }
    }

    /// Length of the transport header (the parser has checked that it fits).
    fn l4_header_len(&self) -> usize {
        match self.proto {
            Proto::Udp => 8,
            Proto::Tcp => self
                .ip
                .get(self.l4() + 12)
                .map_or(20, |b| usize::from(b >> 4) * 4),
        }
    }
}

/// A coalesced packet that may still grow: the last packet staged on its channel.
#[derive(Debug, Clone, Copy)]
struct Open {
    channel: ChannelId,
    src: IpAddr,
    dst: IpAddr,
    /// Transport header offset and TCP header length.
    l4: usize,
    tcp_hl: usize,
    /// The sequence number the next segment must carry.
    next_seq: u32,
    /// Sum of the payload so far, and its length.
    payload: Sum,
    payload_len: usize,
    /// Segments merged so far.
    segs: u32,
    /// A PSH was merged: nothing more may follow.
    closed: bool,
}

/// Counters of the coalescing.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoalesceStats {
    /// Segments appended to a previous one (each saves the app one packet).
    pub merged: u64,
    /// Coalesced packets delivered (two segments or more).
    pub packets: u64,
}

/// Receive coalescing state for one batch of frames.
#[derive(Debug, Default)]
pub struct Coalescer {
    open: Vec<Open>,
    /// What it has done.
    pub stats: CoalesceStats,
}

/// The outcome of trying to append a segment.
enum Append {
    Done,
    BadChecksum,
    No,
}

impl Coalescer {
    /// Delivers `p` to `c`: appended to the channel's growing packet if it continues it,
    /// otherwise copied into a buffer of its own. A packet with a wrong checksum is not
    /// delivered. `Ok(false)`: the channel could not take it, and counted why (`rx_no_buf`,
    /// `rx_too_big`).
    pub fn deliver(&mut self, c: &mut impl Port, p: &Incoming<'_>) -> Result<bool, RxDrop> {
        let coalesce = c.offloads().rx_coalesce && p.proto == Proto::Tcp;
        let id = c.id();
        if let Some(i) = self.open.iter().position(|o| o.channel == id) {
            if coalesce {
                match append(&mut self.open[i], c, p) {
                    Append::Done => {
                        self.stats.merged += 1;
                        return Ok(true);
                    }
                    Append::BadChecksum => return Err(RxDrop::BadL4Checksum),
                    Append::No => {}
                }
            }
            // Anything else staged on the channel ends its growing packet.
            let o = self.open.swap_remove(i);
            self.close(c, &o);
        }
        let (l4, hl) = (p.l4(), p.l4_header_len());
        let (Some(header), Some(payload)) = (p.ip.get(l4..l4 + hl), p.ip.get(l4 + hl..)) else {
            return Err(RxDrop::Truncated);
        };
        let zero_udp4 =
            p.proto == Proto::Udp && p.src.is_ipv4() && header.get(6..8) == Some(&[0, 0]);
        let pseudo = checksum::pseudo(p.src, p.dst, p.proto as u8, p.ip.len() - l4);
        let raise_mss = (c.offloads().tx_segment && p.proto == Proto::Tcp)
            .then(|| max_segment(c.buf_size(), p.src.is_ipv4()));
        let mut bad = false;
        let mut payload_sum = Sum::default();
        let staged = c.stage_with(p.ip.len(), |dst| {
            let (head, rest) = dst.split_at_mut(l4);
            head.copy_from_slice(&p.ip[..l4]);
            let (th, body) = rest.split_at_mut(hl);
            let h = Sum::copy(th, header);
            payload_sum = Sum::copy(body, payload);
            if !zero_udp4 && pseudo.plus(h).plus(payload_sum).fold() != 0xffff {
                bad = true;
                return false;
            }
            if let Some(mss) = raise_mss {
                raise_syn_mss(th, mss);
            }
            true
        });
        if bad {
            return Err(RxDrop::BadL4Checksum);
        }
        let flags = header.get(13).copied().unwrap_or(0);
        if staged && coalesce && flags == ACK && !payload.is_empty() {
            self.open.push(Open {
                channel: id,
                src: p.src,
                dst: p.dst,
                l4,
                tcp_hl: hl,
                next_seq: seq(header).wrapping_add(payload.len() as u32),
                payload: payload_sum,
                payload_len: payload.len(),
                segs: 1,
                closed: false,
            });
        }
        Ok(staged)
    }

    /// Closes every growing packet (at the end of a batch, before the channels' RX rings are
    /// published): their checksums are written.
    pub fn finish(&mut self, ports: &mut impl Ports) {
        for o in std::mem::take(&mut self.open) {
            if let Some(c) = ports.port(o.channel) {
                self.close(c, &o);
            }
        }
    }

    /// Writes the checksums of a packet that grew (`o` must be the channel's last staged).
    fn close(&mut self, c: &mut impl Port, o: &Open) {
        if o.segs < 2 {
            return;
        }
        self.stats.packets += 1;
        let Some((len, buf)) = c.last_staged() else {
            return;
        };
        let total = (*len as usize).min(buf.len());
        let (l4, hl) = (o.l4, o.tcp_hl);
        if o.src.is_ipv4() {
            buf[10..12].fill(0);
            let c = Sum::of(&buf[..20]).finish();
            buf[10..12].copy_from_slice(&c.to_be_bytes());
        }
        buf[l4 + 16..l4 + 18].fill(0);
        let sum = checksum::pseudo(o.src, o.dst, Proto::Tcp as u8, total - l4)
            .plus(Sum::of(&buf[l4..l4 + hl]))
            .plus(o.payload);
        buf[l4 + 16..l4 + 18].copy_from_slice(&sum.finish().to_be_bytes());
    }
}

/// Appends `p` to the open packet `o` if it continues it.
fn append(o: &mut Open, c: &mut impl Port, p: &Incoming<'_>) -> Append {
    if o.closed || p.src != o.src || p.dst != o.dst {
        return Append::No;
    }
    let (l4, hl) = (o.l4, o.tcp_hl);
    let ip = p.ip;
    if p.l4_header_len() != hl || ip.len() <= l4 + hl {
        return Append::No;
    }
    let flags = ip[l4 + 13];
    if flags & !PSH != ACK {
        return Append::No;
    }
    let Some((len, buf)) = c.last_staged() else {
        return Append::No;
    };
    let cur = *len as usize;
    let add = ip.len() - l4 - hl;
    // An IPv4 total length, or an IPv6 payload length, fits in 16 bits.
    let limit = buf
        .len()
        .min(if o.src.is_ipv4() { 65535 } else { 65535 + 40 });
    if cur + add > limit || cur < l4 + hl {
        return Append::No;
    }
    let same_ip = if o.src.is_ipv4() {
        // Version/IHL and TOS; flags/fragment, TTL and protocol. (The ID may differ.)
        buf[0..2] == ip[0..2] && buf[6..10] == ip[6..10]
    } else {
        // Version, traffic class, flow label; next header and hop limit.
        buf[0..4] == ip[0..4] && buf[6..8] == ip[6..8]
    };
    let th = &ip[l4..l4 + hl];
    let same_tcp = buf[l4..l4 + 4] == th[0..4] // ports
        && buf[l4 + 8..l4 + 13] == th[8..13] // acknowledgement, data offset
        && buf[l4 + 20..l4 + hl] == th[20..hl]; // options
    if !same_ip || !same_tcp || seq(th) != o.next_seq {
        return Append::No;
    }
    let ps = Sum::copy(&mut buf[cur..cur + add], &ip[l4 + hl..]);
    let own = checksum::pseudo(p.src, p.dst, Proto::Tcp as u8, hl + add)
        .plus(Sum::of(th))
        .plus(ps);
    if own.fold() != 0xffff {
        // The bytes past `len` are not part of the packet: nothing to undo.
        return Append::BadChecksum;
    }
    o.payload = o.payload.plus_at(ps, o.payload_len);
    o.payload_len += add;
    o.next_seq = o.next_seq.wrapping_add(add as u32);
    o.segs += 1;
    let total = cur + add;
    *len = total as u32;
    if o.src.is_ipv4() {
        buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    } else {
        buf[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    }
    // The newest window; a PSH ends the packet.
    buf[l4 + 14..l4 + 16].copy_from_slice(&th[14..16]);
    if flags & PSH != 0 {
        buf[l4 + 13] |= PSH;
        o.closed = true;
    }
    Append::Done
}

fn seq(tcp: &[u8]) -> u32 {
    tcp.get(4..8)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The largest TCP payload (without options) a pool buffer of `buf_size` bytes holds.
pub fn max_segment(buf_size: usize, v4: bool) -> u16 {
    let ip = if v4 { 20 } else { 40 };
    buf_size.min(65535).saturating_sub(ip + 20) as u16
}

/// Raises the MSS option of a SYN (`tcp`: the TCP header, checksum valid) to `mss`, and
/// adjusts the checksum.
fn raise_syn_mss(tcp: &mut [u8], mss: u16) {
    if tcp.get(13).is_none_or(|f| f & SYN == 0) {
        return;
    }
    if let Some(at) = super::parse::tcp_mss_option(tcp) {
        let old = u16::from_be_bytes([tcp[at], tcp[at + 1]]);
        if mss > old {
            set_word(tcp, at, mss);
        }
    }
}

/// Writes a 16-bit word at an even offset of a TCP header and adjusts its checksum.
pub(crate) fn set_word(tcp: &mut [u8], at: usize, new: u16) {
    let old = u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let check = u16::from_be_bytes([tcp[16], tcp[17]]);
    tcp[at..at + 2].copy_from_slice(&new.to_be_bytes());
    let c = if at.is_multiple_of(2) {
        checksum::adjust(check, old, new)
    } else {
        checksum::adjust(check, old.swap_bytes(), new.swap_bytes())
    };
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {

    use etherparse::{PacketBuilder, TcpOptionElement};
    use netchannel_shm::control::Offloads;
    use netchannel_shm::endpoint::{Home, in_process_pair};
    use netchannel_shm::{Endpoint, Geometry, Packet};

    use std::collections::BTreeMap;

    use super::*;
    use crate::channel::Channel;
    use crate::config::ChannelConfig;
    use crate::control::policy::Cred;

    const A: [u8; 4] = [198, 18, 0, 1];
    const B: [u8; 4] = [198, 18, 0, 2];

    /// A channel (nexus side) and the app's end of it, in one process.
    fn channel(offloads: Offloads) -> (Channel, Endpoint) {
        let g = Geometry {
            ring_slots: [64, 64, 64, 64, 64],
            buf_size: 16384,
            bufs_per_segment: 16,
            segments: 4,
        };
        let (ep, app) = in_process_pair(g, Home::All, Home::Nothing).unwrap();
        let cred = Cred {
            pid: 1,
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        let cfg = ChannelConfig::default();
        let mut c = Channel::new(7, 1, cred, ep, &cfg);
        c.offloads = offloads;
        c.service(&cfg, 0).unwrap();
        (c, app)
    }

    fn seg(seq: u32, ack: u32, window: u16, psh: bool, ts: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(B, A, 64)
            .tcp(80, 4000, seq, window)
            .ack(ack)
            .options(&[TcpOptionElement::Timestamp(ts, 9)])
            .unwrap();
        if psh {
            b = b.psh();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn deliver(co: &mut Coalescer, c: &mut Channel, ip: &[u8]) -> Result<bool, RxDrop> {
        co.deliver(
            c,
            &Incoming {
                ip,
                proto: if ip[9] == 6 { Proto::Tcp } else { Proto::Udp },
                src: IpAddr::from(B),
                dst: IpAddr::from(A),
            },
        )
    }

    /// Ends the batch and returns what the app receives, each packet checked to be valid.
    fn received(co: &mut Coalescer, c: Channel, app: &mut Endpoint) -> Vec<Vec<u8>> {
        let mut chans = BTreeMap::from([(c.id, c)]);
        co.finish(&mut chans);
        let c = chans.get_mut(&7).unwrap();
        c.flush_rx().unwrap();
        let mut got: Vec<Packet> = Vec::new();
        app.recv(&mut got, 64).unwrap();
        got.iter()
            .map(|p| {
                let bytes = app.payload(p).to_vec();
                // Valid lengths and checksums, as parsed by the same rules as the wire.
                let parsed = super::super::parse::parse_ip(&bytes).unwrap();
                assert_eq!(parsed.ip_len, bytes.len());
                bytes
            })
            .collect()
    }

    fn payload_of(ip: &[u8]) -> &[u8] {
        let hl = usize::from(ip[32] >> 4) * 4;
        &ip[20 + hl..]
    }

    #[test]
    fn in_order_segments_become_one_valid_packet() {
        let (mut c, mut app) = channel(Offloads::ALL);
        let mut co = Coalescer::default();
        let data: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
        // Odd lengths, so later pieces land at odd offsets of the payload.
        let cuts = [0, 1447, 2895, 4000];
        for w in cuts.windows(2) {
            let s = seg(
                1000 + w[0] as u32,
                55,
                500 + w[0] as u16,
                false,
                3,
                &data[w[0]..w[1]],
            );
            deliver(&mut co, &mut c, &s).unwrap();
        }
        let got = received(&mut co, c, &mut app);
        assert_eq!(got.len(), 1);
        assert_eq!(payload_of(&got[0]), &data[..]);
        // The newest window, the first sequence number.
        assert_eq!(u16::from_be_bytes([got[0][34], got[0][35]]), 500 + 2895);
        assert_eq!(
            u32::from_be_bytes([got[0][24], got[0][25], got[0][26], got[0][27]]),
            1000
        );
        assert_eq!(co.stats.merged, 2);
        assert_eq!(co.stats.packets, 1);
    }

    #[test]
    fn a_gap_other_options_or_another_ack_start_a_new_packet() {
        let (mut c, mut app) = channel(Offloads::ALL);
        let mut co = Coalescer::default();
        let d = [7u8; 100];
        for s in [
            seg(0, 1, 10, false, 3, &d),
            seg(100, 1, 10, false, 3, &d), // merged
            seg(300, 1, 10, false, 3, &d), // gap
            seg(400, 1, 10, false, 4, &d), // another timestamp
            seg(500, 2, 10, false, 4, &d), // another ack
            seg(600, 2, 10, true, 4, &d),  // PSH: merged, and ends it
            seg(700, 2, 10, false, 4, &d), // after a PSH
        ] {
            deliver(&mut co, &mut c, &s).unwrap();
        }
        let got = received(&mut co, c, &mut app);
        let sizes: Vec<usize> = got.iter().map(|p| payload_of(p).len()).collect();
        assert_eq!(sizes, [200, 100, 100, 200, 100]);
        assert_eq!(got[3][33] & PSH, PSH);
    }

    #[test]
    fn a_corrupt_segment_is_dropped_and_ends_nothing_else() {
        let (mut c, mut app) = channel(Offloads::ALL);
        let mut co = Coalescer::default();
        let d = [1u8; 64];
        deliver(&mut co, &mut c, &seg(0, 1, 10, false, 3, &d)).unwrap();
        let mut bad = seg(64, 1, 10, false, 3, &d);
        let n = bad.len();
        bad[n - 1] ^= 0x40;
        assert_eq!(deliver(&mut co, &mut c, &bad), Err(RxDrop::BadL4Checksum));
        // The retransmission of the same bytes continues the packet.
        deliver(&mut co, &mut c, &seg(64, 1, 10, false, 3, &d)).unwrap();
        // A corrupt first segment is refused too.
        let got = received(&mut co, c, &mut app);
        assert_eq!(got.len(), 1);
        assert_eq!(payload_of(&got[0]).len(), 128);
        let (mut c, _app) = channel(Offloads::ALL);
        let mut co = Coalescer::default();
        assert_eq!(deliver(&mut co, &mut c, &bad), Err(RxDrop::BadL4Checksum));
    }

    #[test]
    fn without_the_offload_every_segment_stays_whole() {
        let (mut c, mut app) = channel(Offloads::default());
        let mut co = Coalescer::default();
        for i in 0..3u32 {
            deliver(&mut co, &mut c, &seg(i * 10, 1, 10, false, 3, &[5u8; 10])).unwrap();
        }
        assert_eq!(received(&mut co, c, &mut app).len(), 3);
    }

    #[test]
    fn udp_checksums_are_verified_in_the_copy() {
        let (mut c, mut app) = channel(Offloads::ALL);
        let mut co = Coalescer::default();
        let mut u = Vec::new();
        PacketBuilder::ipv4(B, A, 64)
            .udp(53, 4000)
            .write(&mut u, b"hello")
            .unwrap();
        deliver(&mut co, &mut c, &u).unwrap();
        // A zero checksum means "none" on IPv4.
        let mut zero = u.clone();
        zero[26..28].fill(0);
        deliver(&mut co, &mut c, &zero).unwrap();
        let mut bad = u.clone();
        bad[28] ^= 1;
        assert_eq!(deliver(&mut co, &mut c, &bad), Err(RxDrop::BadL4Checksum));
        assert_eq!(received(&mut co, c, &mut app).len(), 2);
    }

    #[test]
    fn a_peers_syn_mss_is_raised_for_segmentation() {
        let (mut c, mut app) = channel(Offloads::ALL);
        let mut co = Coalescer::default();
        let mut syn = Vec::new();
        PacketBuilder::ipv4(B, A, 64)
            .tcp(80, 4000, 9, 64240)
            .syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .unwrap()
            .write(&mut syn, &[])
            .unwrap();
        deliver(&mut co, &mut c, &syn).unwrap();
        let got = received(&mut co, c, &mut app);
        let at = super::super::parse::tcp_mss_option(&got[0][20..]).unwrap();
        let mss = u16::from_be_bytes([got[0][20 + at], got[0][21 + at]]);
        assert_eq!(mss, max_segment(16384, true));
        assert_eq!(mss, 16384 - 40);
    }
}
