//! `parse_frame`: the flowswitch's one-pass parser of frames from the wire and of IP packets
//! from apps, the TCP MSS option walk, and the segmentation offload's layout of an app's TCP
//! packet. Nothing may panic, and the entry points must agree with each other.

use netchannel_nexus::flowswitch::parse::{
    Parsed, Proto, RxDrop, checksum, parse_frame, parse_frame_headers, parse_ip, parse_ip_headers,
    tcp_mss_option,
};
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
        assert_eq!(p.ip_offset, 14, "{p:?}");
        let end = p.ip_offset + p.ip_len;
        assert!(end <= data.len(), "{p:?} past a frame of {}", data.len());
        // The frame's IP packet, with and without the Ethernet padding after it, parses the
        // same way as an app's packet (the TX path's parser).
        let at_zero = Parsed { ip_offset: 0, ..p };
        assert_eq!(parse_ip(&data[14..]), Ok(at_zero), "trailing bytes kept");
        assert_eq!(parse_ip(&data[14..end]), Ok(at_zero), "exact packet");
        transport(&data[14..end], &p);
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

/// What a classified packet's transport header gives the other parsers.
fn transport(ip: &[u8], p: &Parsed) {
    // No IPv4 options and no IPv6 extension headers: the transport header is at a fixed offset.
    let l4 = if p.src.0.is_ipv4() { 20 } else { 40 };
    assert!(l4 <= ip.len(), "{p:?} with a {}-byte packet", ip.len());
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
            let layout = TcpLayout::of(ip).expect("a classified TCP packet has a TCP layout");
            assert_eq!((layout.l4, layout.hl, layout.tcp_len), (l4, hl, t.len()));
            assert_eq!((layout.src, layout.dst), (p.src.0, p.dst.0));
        }
    }
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
