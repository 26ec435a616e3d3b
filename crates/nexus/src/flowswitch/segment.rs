//! Segmentation offload: the nexus's half of [`tx_segment`] (TSO done in software, where
//! the packet is copied anyway).
//!
//! An app's stack on a segmenting channel sends TCP packets as large as a pool buffer and
//! leaves their checksums out. The nexus validates each such packet once (one flow lookup,
//! one anti-spoofing check for up to a buffer's worth of segments), then cuts it into segments
//! of the connection's real MSS while copying them into the interface's frames, summing each
//! payload in the same pass: the per-segment cost left is a header copy and the copy the
//! nexus makes of every packet anyway. Segment *k* carries the original headers with its own
//! lengths, sequence number, IPv4 ID + *k*, and flags (FIN and PSH only on the last, CWR only
//! on the first), as the kernel's GSO does.
//!
//! [`tx_segment`]: netchannel_shm::control::Offloads::tx_segment

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use super::checksum::{self, Sum};
use super::parse::tcp_mss_option;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;
const TCP: u8 = 6;

/// A TCP packet's layout: transport header offset, TCP header length, and the TCP length the
/// IP header gives (bounded by the bytes present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLayout {
    /// Offset of the TCP header.
    pub l4: usize,
    /// Length of the TCP header, options included.
    pub hl: usize,
    /// Header and payload, as the IP header says.
    pub tcp_len: usize,
    /// Source and destination addresses.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
}

impl TcpLayout {
    /// The layout of `ip` if it is a TCP packet whose headers fit (nothing else is checked:
    /// validation decides whether it may go out).
    pub fn of(ip: &[u8]) -> Option<Self> {
        let (l4, ip_len, src, dst) = match ip.first()? >> 4 {
            4 if ip.get(9) == Some(&TCP) => {
                let l4 = usize::from(ip[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
                let a: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
                let b: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
                (
                    l4,
                    total,
                    Ipv4Addr::from(a).into(),
                    Ipv4Addr::from(b).into(),
                )
            }
            6 if ip.get(6) == Some(&TCP) => {
                let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
                let a: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
                let b: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
                (
                    40,
                    40 + payload,
                    Ipv6Addr::from(a).into(),
                    Ipv6Addr::from(b).into(),
                )
            }
            _ => return None,
        };
        let hl = usize::from(ip.get(l4 + 12)? >> 4) * 4;
        let end = ip_len.min(ip.len());
        // `then`, not `then_some`: the length is computed only once the bounds hold (found by
        // the fuzzer: a total length under the header length overflowed).
        (hl >= 20 && l4 >= 20 && end >= l4 + hl).then(|| Self {
            l4,
            hl,
            tcp_len: end - l4,
            src,
            dst,
        })
    }

    /// Payload bytes.
    pub fn payload_len(&self) -> usize {
        self.tcp_len - self.hl
    }
}

/// The largest TCP payload per segment, options excluded, that `mtu` carries.
pub fn link_mss(mtu: u32, v4: bool) -> u16 {
    let ip = if v4 { 20 } else { 40 };
    (mtu as usize).saturating_sub(ip + 20).min(65535) as u16
}

/// Readies a TCP packet of a segmenting channel that goes out whole: lowers a SYN's MSS
/// option to `max_mss` (the app's stack advertises what its buffers hold, the wire carries
/// less) and computes the checksum the app left out.
pub fn finish_whole(ip: &mut [u8], t: &TcpLayout, max_mss: u16) {
    let tcp = &mut ip[t.l4..t.l4 + t.tcp_len];
    if tcp[13] & SYN != 0
        && let Some(at) = tcp_mss_option(&tcp[..t.hl])
        && u16::from_be_bytes([tcp[at], tcp[at + 1]]) > max_mss
    {
        tcp[at..at + 2].copy_from_slice(&max_mss.to_be_bytes());
    }
    tcp[16..18].fill(0);
    let sum = checksum::pseudo(t.src, t.dst, TCP, t.tcp_len).plus(Sum::of(tcp));
    tcp[16..18].copy_from_slice(&sum.finish().to_be_bytes());
}

/// Readies a large TCP packet for the kernel's segmentation (CHECKSUM_PARTIAL): its checksum
/// field holds the pseudo-header sum over the whole packet's TCP length, which the kernel
/// adjusts for each segment and completes over its bytes.
pub fn prepare_partial(ip: &mut [u8], t: &TcpLayout) {
    let sum = checksum::pseudo(t.src, t.dst, TCP, t.tcp_len).fold();
    ip[t.l4 + 16..t.l4 + 18].copy_from_slice(&sum.to_be_bytes());
}

/// The payload ranges of the segments `t`'s payload is cut into, `mss` bytes each (at least 1).
pub fn cuts(t: &TcpLayout, mss: usize) -> impl Iterator<Item = Range<usize>> {
    let (len, mss) = (t.payload_len(), mss.max(1));
    (0..len.div_ceil(mss)).map(move |k| k * mss..((k + 1) * mss).min(len))
}

/// Writes segment `index` into `out`: the headers of `headers` (the packet's IP and TCP
/// headers, `t`'s layout) and bytes `range` of `payload` (the packet's payload, wherever it
/// lies). Returns its length, or `None` if `out` is too small.
pub fn write_segment(
    headers: &[u8],
    payload: &[u8],
    t: &TcpLayout,
    index: usize,
    range: Range<usize>,
    last: bool,
    out: &mut [u8],
) -> Option<usize> {
    let (l4, hl) = (t.l4, t.hl);
    let n = range.len();
    let total = l4 + hl + n;
    let payload = payload.get(range.start..range.end)?;
    let out = out.get_mut(..total)?;
    out[..l4 + hl].copy_from_slice(headers.get(..l4 + hl)?);
    if t.src.is_ipv4() {
        out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(index as u16);
        out[4..6].copy_from_slice(&id.to_be_bytes());
        out[10..12].fill(0);
        let c = Sum::of(&out[..l4]).finish();
        out[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        out[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    }
    let (head, body) = out.split_at_mut(l4 + hl);
    let tcp = &mut head[l4..];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_add(range.start as u32);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    if !last {
        tcp[13] &= !(FIN | PSH);
    }
    if index > 0 {
        tcp[13] &= !CWR;
    }
    tcp[16..18].fill(0);
    let psum = Sum::copy(body, payload);
    let sum = checksum::pseudo(t.src, t.dst, TCP, hl + n)
        .plus(Sum::of(tcp))
        .plus(psum);
    tcp[16..18].copy_from_slice(&sum.finish().to_be_bytes());
    Some(total)
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, TcpOptionElement};

    use super::*;
    use crate::flowswitch::parse::parse_ip;

    /// Regression (fuzzer): an IPv4 total length under the header length is no layout, and
    /// no overflow.
    #[test]
    fn a_total_length_under_the_headers_is_no_layout() {
        let mut p = big(true, b"x", false);
        p[2..4].copy_from_slice(&[0, 0]);
        assert!(TcpLayout::of(&p).is_none());
        p[2..4].copy_from_slice(&[0, 30]);
        assert!(TcpLayout::of(&p).is_none());
    }

    fn big(v4: bool, payload: &[u8], fin: bool) -> Vec<u8> {
        let b = if v4 {
            PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        } else {
            let a: [u8; 16] = "fd00:198:18::1".parse::<Ipv6Addr>().unwrap().octets();
            let b: [u8; 16] = "fd00:198:18::2".parse::<Ipv6Addr>().unwrap().octets();
            PacketBuilder::ipv6(a, b, 64)
        };
        let mut t = b
            .tcp(4000, 80, 0xffff_f000, 512)
            .ack(77)
            .psh()
            .options(&[TcpOptionElement::Timestamp(5, 6)])
            .unwrap();
        if fin {
            t = t.fin();
        }
        let mut out = Vec::new();
        t.write(&mut out, payload).unwrap();
        // The app's stack leaves the checksum out.
        let l4 = if v4 { 20 } else { 40 };
        out[l4 + 16..l4 + 18].fill(0);
        out
    }

    #[test]
    fn a_large_packet_becomes_valid_segments_that_rebuild_it() {
        for v4 in [true, false] {
            let data: Vec<u8> = (0..10_001u32).map(|i| (i * 31 + 7) as u8).collect();
            let pkt = big(v4, &data, true);
            let t = TcpLayout::of(&pkt).unwrap();
            assert_eq!(t.payload_len(), data.len());
            let mss = usize::from(link_mss(1500, v4)) - (t.hl - 20);
            let cuts: Vec<_> = cuts(&t, mss).collect();
            assert_eq!(cuts.len(), data.len().div_ceil(mss));
            let mut rebuilt = Vec::new();
            let mut out = vec![0u8; 2048];
            for (k, r) in cuts.iter().enumerate() {
                let last = k + 1 == cuts.len();
                let body = &pkt[t.l4 + t.hl..];
                let n = write_segment(&pkt, body, &t, k, r.clone(), last, &mut out).unwrap();
                assert!(n <= 1500);
                // Every segment is valid on the wire: lengths, IP and TCP checksums.
                let p = parse_ip(&out[..n]).unwrap();
                assert_eq!(p.ip_len, n);
                let s = etherparse::SlicedPacket::from_ip(&out[..n]).unwrap();
                let Some(etherparse::TransportSlice::Tcp(tcp)) = s.transport else {
                    panic!("not TCP")
                };
                assert_eq!(
                    tcp.sequence_number(),
                    0xffff_f000u32.wrapping_add(r.start as u32)
                );
                assert_eq!(tcp.fin(), last);
                assert_eq!(tcp.psh(), last);
                assert!(tcp.ack());
                rebuilt.extend_from_slice(tcp.payload());
            }
            assert_eq!(rebuilt, data);
        }
    }

    #[test]
    fn a_whole_packet_gets_its_checksum_and_a_syn_its_mss_lowered() {
        let mut syn = Vec::new();
        PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(4000, 80, 1, 512)
            .syn()
            .options(&[TcpOptionElement::MaximumSegmentSize(16344)])
            .unwrap()
            .write(&mut syn, &[])
            .unwrap();
        syn[36..38].fill(0);
        let t = TcpLayout::of(&syn).unwrap();
        finish_whole(&mut syn, &t, 1460);
        parse_ip(&syn).unwrap();
        let at = tcp_mss_option(&syn[20..]).unwrap();
        assert_eq!(u16::from_be_bytes([syn[20 + at], syn[21 + at]]), 1460);
        // A smaller MSS stays as it is.
        let t = TcpLayout::of(&syn).unwrap();
        finish_whole(&mut syn, &t, 9000);
        assert_eq!(u16::from_be_bytes([syn[20 + at], syn[21 + at]]), 1460);
        parse_ip(&syn).unwrap();
    }

    #[test]
    fn layouts_of_what_is_not_tcp_or_does_not_fit_are_none() {
        assert_eq!(TcpLayout::of(&[]), None);
        let mut u = Vec::new();
        PacketBuilder::ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
            .udp(1, 2)
            .write(&mut u, b"x")
            .unwrap();
        assert_eq!(TcpLayout::of(&u), None);
        let pkt = big(true, b"abc", false);
        for cut in 0..40 {
            assert_eq!(TcpLayout::of(&pkt[..cut]), None, "cut at {cut}");
        }
        assert!(TcpLayout::of(&pkt[..52]).is_some());
    }
}
