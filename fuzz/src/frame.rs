//! `parse_frame`: the flowswitch's one-pass parser of frames from the wire and of IP packets
//! from apps, the TCP MSS option walk, the segmentation offload's layout of an app's TCP
//! packet, IP fragmentation and reassembly. Nothing may panic, and the entry points must agree
//! with each other.

use std::time::Instant;

use netchannel_nexus::flowswitch::fragment;
use netchannel_nexus::flowswitch::parse::{
    Parsed, Proto, RxDrop, canonical, checksum, frame_ip_offset, parse_frame, parse_frame_headers,
    parse_ip, parse_ip_headers, tcp_mss_option,
};
use netchannel_nexus::flowswitch::reassembly::{Limits, Reassembler};
use netchannel_nexus::flowswitch::segment::{self, TcpLayout};

/// Runs every check on one input.
pub fn run(data: &[u8]) {
    frame(data);
    // The same bytes as an IP packet, as an app would send it.
    ip(data, 0);
    tcp_layout(data);
    mss(data);
    sums(data);
}

/// The checks of the wire path.
fn frame(data: &[u8]) {
    let full = parse_frame(data);
    let headers = parse_frame_headers(data);
    agree(full, headers);
    if let Ok(p) = full {
        // After the Ethernet header, or after a VLAN-0 priority tag.
        assert!(matches!(p.ip_offset, 14 | 18), "{p:?}");
        let (at, end) = (p.ip_offset, p.ip_offset + p.ip_len);
        assert!(end <= data.len(), "{p:?} past a frame of {}", data.len());
        // The frame's IP packet, with and without the Ethernet padding after it, parses the
        // same way as an app's packet (the TX path's parser).
        let at_zero = Parsed { ip_offset: 0, ..p };
        assert_eq!(parse_ip(&data[at..]), Ok(at_zero), "trailing bytes kept");
        assert_eq!(parse_ip(&data[at..end]), Ok(at_zero), "exact packet");
        transport(&data[at..end], &p);
    }
    if headers == Err(RxDrop::Fragment) {
        // Whatever the fragment, the reassembler does not panic, and a datagram of one
        // fragment (an atomic one: offset 0, no more) holds no byte the fragment did not.
        let ip = &data[frame_ip_offset(data).min(data.len())..];
        let mut r = Reassembler::new(Limits::default());
        if let Some(whole) = r.insert(ip, Instant::now(), &mut |_| {}) {
            assert!(
                whole.len() <= ip.len(),
                "{} bytes from {}",
                whole.len(),
                ip.len()
            );
            assert_eq!(r.memory(), 0, "a complete datagram leaves nothing held");
        }
    }
}

/// The checks of the app path; `depth` stops the recursion.
fn ip(data: &[u8], depth: u8) {
    let full = parse_ip(data);
    let headers = parse_ip_headers(data);
    agree(full, headers);
    if let Ok(p) = full {
        assert_eq!(p.ip_offset, 0, "{p:?}");
        assert!(
            p.ip_len <= data.len(),
            "{p:?} past a packet of {}",
            data.len()
        );
        let exact = &data[..p.ip_len];
        if depth == 0 && exact.len() < data.len() {
            assert_eq!(parse_ip(exact), Ok(p), "trailing bytes changed the verdict");
        }
        transport(exact, &p);
    }
}

/// `parse_*` and `parse_*_headers` differ only in the UDP/TCP checksum check, which is last.
fn agree(full: Result<Parsed, RxDrop>, headers: Result<Parsed, RxDrop>) {
    match full {
        Ok(p) => assert_eq!(headers, Ok(p)),
        Err(RxDrop::BadL4Checksum) => assert!(
            headers.is_ok() || headers == Err(RxDrop::BadL4Checksum),
            "full: bad L4 checksum, headers: {headers:?}"
        ),
        Err(e) => assert_eq!(headers, Err(e)),
    }
}

/// What a classified packet's transport header gives the other parsers; the packet stripped
/// of its options parses the same, and cut into fragments it comes back whole.
fn transport(ip: &[u8], p: &Parsed) {
    let l4 = p.l4;
    let fixed = if p.src.0.is_ipv4() { 20 } else { 40 };
    assert!(
        l4 >= fixed && l4 <= ip.len(),
        "{p:?} with a {}-byte packet",
        ip.len()
    );
    assert_eq!(p.has_options(), l4 != fixed);
    let mut plain = Vec::new();
    canonical(ip, p, &mut plain);
    let q = parse_ip_headers(&plain).expect("a packet stripped of its options parses");
    assert_eq!(
        (q.proto, q.src, q.dst, q.l4),
        (p.proto, p.src, p.dst, fixed)
    );
    assert_eq!(plain[fixed..], ip[l4..p.ip_len]);
    round_trip(&plain);
    let t = &ip[l4..];
    match p.proto {
        Proto::Udp => assert!(t.len() >= 8, "UDP header of {} bytes", t.len()),
        Proto::Tcp => {
            assert!(t.len() >= 20, "TCP header of {} bytes", t.len());
            let hl = usize::from(t[12] >> 4) * 4;
            assert!(
                (20..=t.len()).contains(&hl),
                "TCP header length {hl} of {}",
                t.len()
            );
            // (An IPv6 packet with extension headers is not segmented: its TCP header is
            // not where the segmenter looks.)
            if let Some(layout) = TcpLayout::of(ip) {
                assert_eq!((layout.l4, layout.hl, layout.tcp_len), (l4, hl, t.len()));
                assert_eq!((layout.src, layout.dst), (p.src.0, p.dst.0));
            } else {
                assert!(
                    p.src.0.is_ipv6() && p.has_options(),
                    "{p:?} has no TCP layout"
                );
            }
        }
    }
}

/// A packet of fixed headers cut to a small MTU by the TX side comes back from the reassembler
/// as the same packet.
fn round_trip(ip: &[u8]) {
    let mtu = 576;
    if ip.len() <= mtu {
        return;
    }
    let Ok(plan) = fragment::plan(ip, mtu) else {
        return;
    };
    let mut r = Reassembler::new(Limits::default());
    let now = Instant::now();
    let mut whole = None;
    let mut out = vec![0u8; mtu];
    for k in (0..plan.count()).rev() {
        let n = plan
            .write(ip, k, 7, &mut out)
            .expect("a fragment fits the MTU");
        assert!(n <= mtu);
        if let Some(w) = r.insert(&out[..n], now, &mut |d| panic!("{d:?}")) {
            whole = Some(w);
        }
    }
    let whole = whole.expect("all fragments make the datagram");
    // The same packet but for the IPv4 header's flags (DF cleared) and checksum.
    assert_eq!(whole.len(), ip.len());
    let skip = if ip[0] >> 4 == 4 { 20 } else { 40 };
    assert_eq!(whole[skip..], ip[skip..]);
}

/// The segmentation offload's walk over an app's packet (any bytes: `TcpLayout::of` is what
/// decides whether the rest may run).
fn tcp_layout(data: &[u8]) {
    let Some(t) = TcpLayout::of(data) else { return };
    assert!(t.l4 >= 20 && t.hl >= 20, "{t:?}");
    assert!(t.l4 + t.tcp_len <= data.len(), "{t:?} past {}", data.len());
    assert!(t.hl <= t.tcp_len, "{t:?}");
    let v4 = t.src.is_ipv4();
    let mut copy = data.to_vec();
    segment::finish_whole(&mut copy, &t, segment::link_mss(1500, v4));
    segment::prepare_partial(&mut copy, &t);
    let headers = &data[..t.l4 + t.hl];
    let payload = &data[t.l4 + t.hl..t.l4 + t.tcp_len];
    let mss = usize::from(segment::link_mss(576, v4)).max(1);
    let mut out = vec![0u8; t.l4 + t.hl + mss];
    let mut covered = 0;
    let cuts: Vec<_> = segment::cuts(&t, mss).collect();
    for (k, r) in cuts.iter().enumerate() {
        assert_eq!(r.start, covered, "cuts leave a gap");
        assert!(!r.is_empty() && r.len() <= mss, "{r:?} with mss {mss}");
        covered = r.end;
        // A few segments are enough to reach every branch.
        if k < 3 || k + 1 == cuts.len() {
            let n = segment::write_segment(
                headers,
                payload,
                &t,
                k,
                r.clone(),
                k + 1 == cuts.len(),
                &mut out,
            )
            .expect("a segment of at most mss bytes fits");
            assert_eq!(n, t.l4 + t.hl + r.len());
        }
    }
    assert_eq!(covered, t.payload_len(), "cuts do not cover the payload");
}

/// The MSS option walk over any bytes: what it points at is inside the header.
fn mss(tcp: &[u8]) {
    if let Some(at) = tcp_mss_option(tcp) {
        let hl = usize::from(tcp[12] >> 4) * 4;
        assert!(
            at >= 22 && at + 2 <= hl && hl <= tcp.len(),
            "MSS at {at}, header {hl}"
        );
        assert_eq!(tcp[at - 2], 2, "not an MSS option");
        assert_eq!(tcp[at - 1], 4, "not a 4-byte option");
    }
}

/// The one's-complement sum against its word-by-word definition, and split at an even offset.
fn sums(data: &[u8]) {
    let mut sum: u32 = 0;
    for w in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let naive = !(sum as u16);
    assert_eq!(checksum(&[data], 0), naive);
    let mid = (data.len() / 2) & !1;
    assert_eq!(checksum(&[&data[..mid], &data[mid..]], 0), naive);
}
