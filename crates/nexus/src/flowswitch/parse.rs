//! One-pass parsing of frames (from the wire) and IP packets (from apps).
//!
//! The header walk is etherparse's (validated lengths, no panics, a bounded IPv6 extension
//! chain); on top of it the flowswitch enforces what the kernel does:
//!
//! * **Accepted and parsed past**, as a kernel socket accepts them: a VLAN-0 priority tag,
//!   well-formed IPv4 options, and the IPv6 extension headers hop-by-hop, destination options,
//!   routing with no segment left, and an atomic fragment header. [`Parsed::l4`] says where
//!   the transport header is; on receive the switch hands the app the packet without them
//!   ([`canonical`]), so coalescing, connection tracking and the app's stack keep seeing the
//!   transport header at a fixed offset (20 or 40 bytes), as a socket that did not ask for
//!   `IP_OPTIONS` sees no options.
//! * **Refused and counted**: malformed options (`ip_options`), extension headers the kernel
//!   would not pass either (a routing header with segments left, an option whose type says
//!   "discard if unknown", authentication headers: `ext_headers`), other VLAN IDs, protocols
//!   other than UDP and TCP, and every bad length or checksum. The IPv4 header checksum and
//!   the UDP/TCP checksums are verified in software (copy-mode AF_XDP gives no guarantee).
//! * **Fragments** are reported as [`RxDrop::Fragment`]: the switch gives them to its
//!   reassembler (`super::reassembly`), which hands back the whole packet to parse again.

use std::net::IpAddr;

pub use crate::flow::Proto;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// What a packet is, after parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// UDP or TCP.
    pub proto: Proto,
    /// Source address and port.
    pub src: (IpAddr, u16),
    /// Destination address and port.
    pub dst: (IpAddr, u16),
    /// Offset of the IP header in the buffer (14 for an Ethernet frame, 0 for an IP packet).
    pub ip_offset: usize,
    /// Length of the IP packet (header and payload) as its headers say.
    pub ip_len: usize,
    /// Offset of the transport header in the IP packet: 20 (IPv4) or 40 (IPv6) unless IPv4
    /// options or IPv6 extension headers come first.
    pub l4: usize,
}

impl Parsed {
    /// Whether options or extension headers sit between the fixed IP header and the
    /// transport header.
    pub fn has_options(&self) -> bool {
        self.l4 != if self.src.0.is_ipv4() { 20 } else { 40 }
    }
}

/// Why a packet was not classified. Each maps to one counter (`rx_<name>` / `tx_<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RxDrop {
    /// Shorter than its headers say (at any layer).
    Truncated,
    /// A header field is invalid (bad IHL, bad version, inconsistent lengths).
    BadHeader,
    /// Not IPv4 or IPv6 (ARP, other EtherTypes): not for apps.
    NotIp,
    /// IPv4 options that are malformed (a bad length, no room for their value).
    IpOptions,
    /// IPv6 extension headers the kernel would not pass to a socket either (a routing header
    /// with segments left, an unknown option that asks to be discarded, authentication).
    ExtHeaders,
    /// An IP fragment (see the fragment policy in the module docs).
    Fragment,
    /// Neither UDP nor TCP.
    Protocol,
    /// The IPv4 header checksum is wrong.
    BadL3Checksum,
    /// The UDP or TCP checksum is wrong (or a zero UDP checksum on IPv6).
    BadL4Checksum,
    /// No flow claims the packet.
    NoFlow,
}

impl RxDrop {
    /// Counter suffix.
    pub fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::BadHeader => "bad_header",
            Self::NotIp => "not_ip",
            Self::IpOptions => "ip_options",
            Self::ExtHeaders => "ext_headers",
            Self::Fragment => "fragment",
            Self::Protocol => "protocol",
            Self::BadL3Checksum => "bad_l3_checksum",
            Self::BadL4Checksum => "bad_l4_checksum",
            Self::NoFlow => "no_flow",
        }
    }
}

fn slice_error(e: &etherparse::err::packet::SliceError) -> RxDrop {
    match e {
        etherparse::err::packet::SliceError::Len(_) => RxDrop::Truncated,
        _ => RxDrop::BadHeader,
    }
}

/// Parses an Ethernet frame.
pub fn parse_frame(frame: &[u8]) -> Result<Parsed, RxDrop> {
    ipv6_fragment_first(frame_ipv6(frame))?;
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| slice_error(&e))?;
    let ip_offset = link_len(&sliced)?;
    finish(&sliced, frame, ip_offset, true)
}

/// Parses an Ethernet frame's headers, leaving the UDP/TCP checksum to the copy into a channel
/// (`coalesce`), which sums the payload as it copies it.
pub fn parse_frame_headers(frame: &[u8]) -> Result<Parsed, RxDrop> {
    ipv6_fragment_first(frame_ipv6(frame))?;
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| slice_error(&e))?;
    let ip_offset = link_len(&sliced)?;
    finish(&sliced, frame, ip_offset, false)
}

/// Where a frame's IP header would start: after the Ethernet header, and after one VLAN tag
/// (of the EtherTypes etherparse reads as one). Whether the tag is acceptable is
/// [`link_len`]'s call.
pub fn frame_ip_offset(frame: &[u8]) -> usize {
    match frame.get(12..14) {
        Some([0x81, 0x00] | [0x88, 0xa8] | [0x91, 0x00]) => 18,
        _ => 14,
    }
}

/// A frame's IPv6 packet, if its (inner) EtherType says IPv6.
fn frame_ipv6(frame: &[u8]) -> Option<&[u8]> {
    let at = frame_ip_offset(frame);
    (frame.get(at - 2..at) == Some(&[0x86, 0xdd])).then(|| &frame[at..])
}

/// Reports an IPv6 fragment (one with a fragment header that says offset or more fragments)
/// before etherparse reads it: etherparse walks on past a fragment header, and would take a
/// non-first fragment's data for more extension headers when its next header names one.
/// IPv4 and IPv6 packets whose transport comes first pass at the cost of two compares.
fn ipv6_fragment_first(ip: Option<&[u8]>) -> Result<(), RxDrop> {
    let Some(ip) = ip else { return Ok(()) };
    if ip.first().map(|b| b >> 4) != Some(6) || matches!(ip.get(6), Some(6 | 17) | None) {
        return Ok(());
    }
    let mut next = ip[6];
    let mut at = 40;
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let (Some(&n), Some(&len)) = (ip.get(at), ip.get(at + 1)) else {
                    return Ok(()); // etherparse says what is wrong with it
                };
                next = n;
                at += (usize::from(len) + 1) * 8;
            }
            44 => {
                let field = match (ip.get(at + 2), ip.get(at + 3)) {
                    (Some(&a), Some(&b)) => u16::from_be_bytes([a, b]),
                    _ => return Ok(()),
                };
                return if field & 0xfff9 != 0 {
                    Err(RxDrop::Fragment)
                } else {
                    Ok(()) // an atomic fragment: a whole packet
                };
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Where the IP header starts: after the Ethernet header, and after a VLAN-0 priority tag
/// (802.1p: a priority, no VLAN), which the kernel accepts on an untagged interface. Other
/// VLAN IDs belong to VLAN interfaces, not to this one's apps.
fn link_len(s: &SlicedPacket<'_>) -> Result<usize, RxDrop> {
    match s.link_exts.as_slice() {
        [] => Ok(14),
        [etherparse::LinkExtSlice::Vlan(v)] if v.vlan_identifier().value() == 0 => Ok(18),
        _ => Err(RxDrop::NotIp),
    }
}

/// Whether IPv4 options are well formed (RFC 791: single-byte EOL and NOP, every other
/// option a type, a length of at least 2 that fits, and its value), as the kernel's
/// `ip_options_compile` demands of what it accepts; source routes (loose, strict) are refused,
/// as the kernel refuses them by default (`accept_source_route` = 0).
fn ipv4_options_ok(opts: &[u8]) -> bool {
    const LSRR: u8 = 131;
    const SSRR: u8 = 137;
    let mut i = 0;
    while let Some(&kind) = opts.get(i) {
        match kind {
            0 => return true,
            1 => i += 1,
            LSRR | SSRR => return false,
            _ => match opts.get(i + 1) {
                Some(&len) if len >= 2 && i + usize::from(len) <= opts.len() => {
                    i += usize::from(len);
                }
                _ => return false,
            },
        }
    }
    true
}

/// Whether the options of a hop-by-hop or destination options header (`area`: the bytes
/// after its next-header and length bytes) may be skipped: padding, and unknown options whose
/// type's two high bits say "skip" (RFC 8200 §4.2). A jumbo payload is refused (see
/// [`finish`]), as is an unknown option that asks to be discarded.
fn ipv6_options_ok(area: &[u8]) -> bool {
    // Known options a host may skip: router alert (5), tunnel encapsulation limit (4).
    const KNOWN: [u8; 2] = [4, 5];
    let mut i = 0;
    while let Some(&kind) = area.get(i) {
        if kind == 0 {
            i += 1;
            continue;
        }
        let Some(&len) = area.get(i + 1) else {
            return false;
        };
        if i + 2 + usize::from(len) > area.len() {
            return false;
        }
        if kind != 1 && !KNOWN.contains(&kind) && kind >> 6 != 0 {
            return false;
        }
        i += 2 + usize::from(len);
    }
    true
}

/// Whether an IPv6 packet's extension headers are ones a host passes to a socket.
fn ipv6_extensions_ok(v6: &etherparse::Ipv6Slice<'_>) -> bool {
    use etherparse::Ipv6ExtensionSlice as E;
    v6.extensions().clone().into_iter().all(|e| match e {
        E::HopByHop(h) | E::DestinationOptions(h) => ipv6_options_ok(h.payload()),
        // A routing header still to be followed (segments left) was not for this host.
        E::Routing(r) => r.slice().get(3) == Some(&0),
        // An atomic fragment (offset 0, no more): a whole packet (RFC 6946).
        E::Fragment(_) => true,
        E::Authentication(_) => false,
    })
}

/// Where the value of a TCP header's MSS option is (offset into `tcp`), if it has one.
pub fn tcp_mss_option(tcp: &[u8]) -> Option<usize> {
    let hl = usize::from(tcp.get(12)? >> 4) * 4;
    let opts = tcp.get(20..hl)?;
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 || i + len > opts.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(20 + i + 2);
                }
                i += len;
            }
        }
    }
    None
}

/// Parses an IP packet (what apps send and receive), checksums included.
pub fn parse_ip(packet: &[u8]) -> Result<Parsed, RxDrop> {
    ipv6_fragment_first(Some(packet))?;
    let sliced = SlicedPacket::from_ip(packet).map_err(|e| slice_error(&e))?;
    finish(&sliced, packet, 0, true)
}

/// Parses an IP packet an app sends: everything [`parse_ip`] checks but the UDP/TCP checksum.
/// A wrong one harms only the sender (its peer drops the packet), and anti-spoofing needs the
/// headers, not a pass over the whole payload.
pub fn parse_ip_headers(packet: &[u8]) -> Result<Parsed, RxDrop> {
    ipv6_fragment_first(Some(packet))?;
    let sliced = SlicedPacket::from_ip(packet).map_err(|e| slice_error(&e))?;
    finish(&sliced, packet, 0, false)
}

fn finish(
    s: &SlicedPacket<'_>,
    buf: &[u8],
    ip_offset: usize,
    verify_l4: bool,
) -> Result<Parsed, RxDrop> {
    // `l4_len`: what the IP header says the transport part holds (etherparse has already cut
    // the slice to the IP lengths).
    let (src_ip, dst_ip, fragmented, ip_len, l4_len) = match &s.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            if h.ihl() != 5 && !ipv4_options_ok(h.options()) {
                return Err(RxDrop::IpOptions);
            }
            if checksum(&[h.slice()], 0) != 0 {
                return Err(RxDrop::BadL3Checksum);
            }
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                v4.payload().fragmented,
                usize::from(h.total_len()),
                v4.payload().payload.len(),
            )
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            // Payload length 0 announces a jumbogram (RFC 2675), whose real length is in a
            // hop-by-hop option: no link here carries one, so it is refused (etherparse would
            // take the rest of the slice as the payload; found by the fuzzer).
            if h.payload_length() == 0 {
                return Err(RxDrop::BadHeader);
            }
            let len = 40 + usize::from(h.payload_length());
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                v6.payload().fragmented,
                len,
                v6.payload().payload.len(),
            )
        }
        Some(NetSlice::Arp(_)) | None => return Err(RxDrop::NotIp),
    };
    if let Some(NetSlice::Ipv6(v6)) = &s.net
        && !v6.extensions().is_empty()
        && !ipv6_extensions_ok(v6)
    {
        return Err(RxDrop::ExtHeaders);
    }
    if fragmented {
        return Err(RxDrop::Fragment);
    }
    if ip_offset + ip_len > buf.len() {
        return Err(RxDrop::Truncated);
    }
    let (proto, l4, sport, dport) = match &s.transport {
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() == 0 && src_ip.is_ipv6() {
                return Err(RxDrop::BadL4Checksum);
            }
            // The UDP length must cover exactly what IP carries: a shorter one would leave
            // bytes no checksum covers.
            if usize::from(u.length()) != l4_len {
                return Err(RxDrop::BadHeader);
            }
            (Proto::Udp, u.slice(), u.source_port(), u.destination_port())
        }
        Some(TransportSlice::Tcp(t)) => {
            (Proto::Tcp, t.slice(), t.source_port(), t.destination_port())
        }
        Some(_) => return Err(RxDrop::Protocol),
        None => return Err(RxDrop::Protocol),
    };
    let zero_udp_v4 = proto == Proto::Udp && src_ip.is_ipv4() && l4.get(6..8) == Some(&[0, 0]);
    if verify_l4 && !zero_udp_v4 && l4_checksum(proto, src_ip, dst_ip, l4) != 0 {
        return Err(RxDrop::BadL4Checksum);
    }
    Ok(Parsed {
        proto,
        src: (src_ip, sport),
        dst: (dst_ip, dport),
        ip_offset,
        ip_len,
        l4: ip_len - l4_len,
    })
}

/// Writes to `out` the IP packet `ip` (parsed as `p`, with options or extension headers)
/// without them: the fixed header, its lengths, next protocol and (IPv4) checksum rewritten,
/// then the transport header and payload. The transport checksum stays right: it covers
/// neither options nor extension headers (a routing header with no segment left means the
/// destination is already the final one).
pub fn canonical(ip: &[u8], p: &Parsed, out: &mut Vec<u8>) {
    out.clear();
    let Some(l4) = ip.get(p.l4..p.ip_len) else {
        return;
    };
    if p.src.0.is_ipv4() {
        let Some(h) = ip.get(..20) else { return };
        out.extend_from_slice(h);
        out[0] = 0x45;
        out[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        out[10..12].fill(0);
        let c = checksum(&[&out[..20]], 0);
        out[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        let Some(h) = ip.get(..40) else { return };
        out.extend_from_slice(h);
        out[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        out[6] = p.proto as u8;
    }
    out.extend_from_slice(l4);
}

/// The one's-complement sum of 16-bit words over `parts` plus `initial`, folded and inverted:
/// 0 over data that includes a correct checksum.
pub fn checksum(parts: &[&[u8]], initial: u32) -> u16 {
    // The ones'-complement sum does not care how the 16-bit words are grouped, so add eight
    // bytes at a time as two 32-bit words into a 64-bit accumulator (which cannot overflow
    // before 2^31 such adds) and fold the carries at the end.
    let mut sum = u64::from(initial);
    for p in parts {
        let mut wide = p.chunks_exact(8);
        for c in &mut wide {
            let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            sum += (v >> 32) + (v & 0xffff_ffff);
        }
        let mut chunks = wide.remainder().chunks_exact(2);
        for c in &mut chunks {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(u16::from_be_bytes([*last, 0]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP/TCP checksum over the pseudo-header and `l4` (0 when `l4` carries a correct one).
pub fn l4_checksum(proto: Proto, src: IpAddr, dst: IpAddr, l4: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    let n = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo[..4].copy_from_slice(&s.octets());
            pseudo[4..8].copy_from_slice(&d.octets());
            8
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo[..16].copy_from_slice(&s.octets());
            pseudo[16..32].copy_from_slice(&d.octets());
            32
        }
        _ => return 1,
    };
    let initial = u32::from(proto as u8) + (l4.len() as u32 & 0xffff) + (l4.len() as u32 >> 16);
    checksum(&[&pseudo[..n], l4], initial)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    pub(crate) fn udp4(
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    pub(crate) fn tcp6(
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6(src, dst, 64)
            .tcp(sport, dport, 1000, 4096);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    pub(crate) const A: [u8; 4] = [198, 18, 0, 1];
    pub(crate) const B: [u8; 4] = [198, 18, 0, 2];
    pub(crate) const A6: [u8; 16] = [0xfd, 0, 1, 0x98, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    pub(crate) const B6: [u8; 16] = [0xfd, 0, 1, 0x98, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// Regression (fuzzer): payload length 0 is a jumbogram's, not a packet of that length.
    #[test]
    fn ipv6_payload_length_zero_is_refused() {
        let mut f = tcp6(A6, 4000, B6, 80, b"data");
        f[14 + 4..14 + 6].copy_from_slice(&[0, 0]);
        assert_eq!(parse_frame(&f).err(), Some(RxDrop::BadHeader));
        assert_eq!(parse_ip(&f[14..]).err(), Some(RxDrop::BadHeader));
    }

    #[test]
    fn mss_option_is_found_behind_other_options() {
        // NOP, NOP, timestamps (10 bytes), MSS 1460: header of 20 + 16 bytes.
        let mut h = vec![0u8; 36];
        h[12] = 9 << 4;
        h[20..22].copy_from_slice(&[1, 1]);
        h[22..32].copy_from_slice(&[8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        h[32..36].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        assert_eq!(tcp_mss_option(&h), Some(34));
        // A bad option length ends the walk.
        h[23] = 40;
        assert_eq!(tcp_mss_option(&h), None);
        // No options at all.
        h[12] = 5 << 4;
        assert_eq!(tcp_mss_option(&h), None);
    }

    #[test]
    fn good_packets_parse() {
        let p = parse_frame(&udp4(A, 1000, B, 2000, b"hello")).unwrap();
        assert_eq!(p.proto, Proto::Udp);
        assert_eq!(p.src, (IpAddr::from(A), 1000));
        assert_eq!(p.dst, (IpAddr::from(B), 2000));
        assert_eq!(p.ip_len, 20 + 8 + 5);
        let p = parse_frame(&tcp6(A6, 5, B6, 6, b"x")).unwrap();
        assert_eq!((p.proto, p.dst.1), (Proto::Tcp, 6));
        let ip = &udp4(A, 1, B, 2, b"")[14..];
        assert_eq!(parse_ip(ip).unwrap().ip_offset, 0);
    }

    #[test]
    fn every_truncation_is_refused_and_never_panics() {
        for frame in [
            udp4(A, 1000, B, 2000, b"hello world"),
            tcp6(A6, 5, B6, 6, b"payload"),
        ] {
            for cut in 0..frame.len() {
                let r = parse_frame(&frame[..cut]);
                assert!(r.is_err(), "prefix of {cut} bytes accepted");
            }
        }
    }

    /// `frame` (an Ethernet frame of an IPv6 packet without extension headers) with an 8-byte
    /// hop-by-hop header (a PadN option) put in front of its transport header.
    pub(crate) fn with_hop_by_hop(frame: &[u8]) -> Vec<u8> {
        let (eth_ip, rest) = frame.split_at(14 + 40);
        let next = eth_ip[14 + 6];
        let mut out = eth_ip.to_vec();
        out[14 + 6] = 0; // hop-by-hop options
        let len = u16::from_be_bytes([out[14 + 4], out[14 + 5]]) + 8;
        out[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        out.extend_from_slice(rest);
        out
    }

    #[test]
    fn ipv6_extension_headers_are_parsed_past_on_both_paths() {
        let plain = tcp6(A6, 5, B6, 6, b"payload");
        let hbh = with_hop_by_hop(&plain);
        for p in [
            parse_frame(&hbh),
            parse_frame_headers(&hbh),
            parse_ip(&hbh[14..]).map(|p| Parsed { ip_offset: 14, ..p }),
            parse_ip_headers(&hbh[14..]).map(|p| Parsed { ip_offset: 14, ..p }),
        ] {
            let p = p.expect("a hop-by-hop header with padding is accepted");
            assert_eq!((p.l4, p.dst.1, p.ip_len), (48, 6, hbh.len() - 14));
            assert!(p.has_options());
        }
        // Handed on without it: the very packet that came without one.
        let p = parse_frame(&hbh).unwrap();
        let mut out = Vec::new();
        canonical(&hbh[14..], &p, &mut out);
        assert_eq!(out, plain[14..]);
        // Refused: a routing header with a segment left, an option that asks to be
        // discarded, an option longer than its header.
        let mut routing = hbh.clone();
        routing[14 + 6] = 43;
        routing[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&[0, 1]);
        assert_eq!(parse_frame(&routing), Err(RxDrop::ExtHeaders));
        routing[14 + 40 + 3] = 0;
        assert!(parse_frame(&routing).is_ok(), "no segment left");
        let mut discard = hbh.clone();
        discard[14 + 40 + 2..14 + 40 + 8].copy_from_slice(&[0x87, 4, 0, 0, 0, 0]);
        assert_eq!(parse_frame(&discard), Err(RxDrop::ExtHeaders));
        let mut long = hbh.clone();
        long[14 + 40 + 3] = 5;
        assert_eq!(parse_frame(&long), Err(RxDrop::ExtHeaders));
    }

    #[test]
    fn an_ipv6_fragment_is_reported_whatever_its_data_looks_like() {
        // A non-first fragment whose fragmentable part starts with destination options: its
        // fragment header names them, but what follows is data, not a header.
        let plain = tcp6(A6, 5, B6, 6, b"payload");
        let mut f = plain[..14 + 40].to_vec();
        f[14 + 6] = 44;
        f.extend_from_slice(&[60, 0, 0x05, 0x01, 0, 0, 0, 9]); // offset 1280, more
        f.extend_from_slice(&[0xff; 64]);
        let len = (f.len() - 14 - 40) as u16;
        f[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
        for r in [
            parse_frame(&f),
            parse_frame_headers(&f),
            parse_ip(&f[14..]),
            parse_ip_headers(&f[14..]),
        ] {
            assert_eq!(r, Err(RxDrop::Fragment));
        }
        // An atomic fragment (offset 0, no more) is a whole packet.
        let mut atomic = plain[..14 + 40].to_vec();
        atomic[14 + 6] = 44;
        atomic.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 9]);
        atomic.extend_from_slice(&plain[14 + 40..]);
        let len = (atomic.len() - 14 - 40) as u16;
        atomic[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse_frame(&atomic).map(|p| p.l4), Ok(48));
    }

    #[test]
    fn ipv4_options_and_vlan_0_are_parsed_past() {
        let good = udp4(A, 1000, B, 2000, b"hello");
        // Router alert (4 bytes) and a NOP-padded end: 8 bytes of options.
        let mut opts = good[..14 + 20].to_vec();
        opts.extend_from_slice(&[0x94, 4, 0, 0, 1, 1, 1, 0]);
        opts.extend_from_slice(&good[14 + 20..]);
        opts[14] = 0x47;
        let total = (opts.len() - 14) as u16;
        opts[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
        opts[14 + 10..14 + 12].fill(0);
        let c = checksum(&[&opts[14..14 + 28]], 0);
        opts[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        let p = parse_frame(&opts).expect("options are accepted");
        assert_eq!((p.l4, p.src.1), (28, 1000));
        let mut out = Vec::new();
        canonical(&opts[14..], &p, &mut out);
        assert_eq!(
            out,
            good[14..],
            "options stripped, header checksum rewritten"
        );
        // Malformed: an option whose length runs past the header.
        let mut bad = opts.clone();
        bad[14 + 21] = 9;
        bad[14 + 10..14 + 12].fill(0);
        let c = checksum(&[&bad[14..14 + 28]], 0);
        bad[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_frame(&bad), Err(RxDrop::IpOptions));
        // A loose source route (the kernel refuses source-routed packets by default).
        let mut lsrr = opts.clone();
        lsrr[14 + 20..14 + 28].copy_from_slice(&[131, 7, 4, 198, 18, 0, 9, 0]);
        lsrr[14 + 10..14 + 12].fill(0);
        let c = checksum(&[&lsrr[14..14 + 28]], 0);
        lsrr[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_frame(&lsrr), Err(RxDrop::IpOptions));
        // A VLAN-0 priority tag (priority 5): the packet is at 18.
        let mut tagged = good[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0xa0, 0x00]);
        tagged.extend_from_slice(&good[12..]);
        let p = parse_frame(&tagged).expect("a priority tag is accepted");
        assert_eq!((p.ip_offset, p.l4), (18, 20));
    }

    #[test]
    fn vlan_ids_bad_tcp_offsets_and_zero_ipv6_udp_checksums_are_refused() {
        // A frame of VLAN 7 is not this interface's, however good the packet inside.
        let good = udp4(A, 1000, B, 2000, b"hello");
        let mut vlan = good[..12].to_vec();
        vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        vlan.extend_from_slice(&good[12..]);
        assert_eq!(parse_frame(&vlan), Err(RxDrop::NotIp));
        assert_eq!(parse_frame_headers(&vlan), Err(RxDrop::NotIp));
        // A TCP data offset under 5 words, or past the segment.
        let tcp = tcp6(A6, 5, B6, 6, b"payload");
        for offset in [0u8, 4, 15] {
            let mut bad = tcp.clone();
            bad[14 + 40 + 12] = offset << 4;
            assert!(parse_frame(&bad).is_err(), "data offset {offset} accepted");
            assert!(
                parse_ip_headers(&bad[14..]).is_err(),
                "data offset {offset} accepted from an app"
            );
        }
        // UDP over IPv6 must carry a checksum (RFC 8200); over IPv4 zero means none.
        let mut udp6 = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6(A6, B6, 64)
            .udp(1000, 2000)
            .write(&mut udp6, b"hello")
            .unwrap();
        assert!(parse_frame(&udp6).is_ok());
        udp6[14 + 40 + 6..14 + 40 + 8].fill(0);
        assert_eq!(parse_frame(&udp6), Err(RxDrop::BadL4Checksum));
        let mut udp4_zero = good.clone();
        udp4_zero[14 + 20 + 6..14 + 20 + 8].fill(0);
        assert!(parse_frame(&udp4_zero).is_ok());
    }

    #[test]
    fn corrupted_fields_are_refused_with_their_reason() {
        let good = udp4(A, 1000, B, 2000, b"hello");
        let mut bad_ip_csum = good.clone();
        bad_ip_csum[14 + 10] ^= 0xff;
        assert_eq!(parse_frame(&bad_ip_csum), Err(RxDrop::BadL3Checksum));
        let mut bad_udp_csum = good.clone();
        bad_udp_csum[14 + 20 + 6] ^= 0x01;
        assert_eq!(parse_frame(&bad_udp_csum), Err(RxDrop::BadL4Checksum));
        let mut bad_payload = good.clone();
        *bad_payload.last_mut().unwrap() ^= 0x40;
        assert_eq!(parse_frame(&bad_payload), Err(RxDrop::BadL4Checksum));
        let mut frag = good.clone();
        frag[14 + 6] = 0x20; // more fragments
        frag[14 + 10] = 0;
        frag[14 + 11] = 0;
        let c = checksum(&[&frag[14..34]], 0);
        frag[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_frame(&frag), Err(RxDrop::Fragment));
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(matches!(
            parse_frame(&arp),
            Err(RxDrop::NotIp | RxDrop::Truncated | RxDrop::BadHeader)
        ));
        let mut long_udp_len = good.clone();
        long_udp_len[14 + 20 + 5] += 1;
        assert!(parse_frame(&long_udp_len).is_err());
    }

    proptest::proptest! {
        #[test]
        fn checksum_matches_the_word_by_word_definition(
            a in proptest::strategy::Strategy::prop_map(proptest::collection::vec(proptest::num::u8::ANY, 0..64), |mut v| { v.truncate(v.len() & !1); v }),
            b in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            init in 0u32..0x1_0000,
        ) {
            let mut sum = u64::from(init);
            for c in a.iter().chain(b.iter()).copied().collect::<Vec<u8>>().chunks(2) {
                sum += u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            proptest::prop_assert_eq!(checksum(&[&a, &b], init), !(sum as u16));
        }
    }

    #[test]
    fn regression_a_udp_length_shorter_than_the_ip_payload_is_refused() {
        // A UDP length 4 bytes short, with a checksum right for that length: the 4 trailing
        // bytes would reach the app covered by no checksum.
        let mut f = udp4(A, 1000, B, 2000, b"hello world");
        let udp_len = f.len() - 14 - 20 - 4;
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        let len = (udp_len as u16).to_be_bytes();
        let sum = checksum(
            &[
                &f[14 + 12..14 + 20],
                &[0, 17],
                &len,
                &f[14 + 20..14 + 20 + udp_len],
            ],
            0,
        );
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(parse_frame(&f), Err(RxDrop::BadHeader));
        assert_eq!(
            parse_ip(&f[14..]),
            Err(RxDrop::BadHeader),
            "nor from an app"
        );
    }
}
