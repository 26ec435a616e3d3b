//! The core in-process, without memfds, sockets or root: frames and app packets in, decisions
//! and counters out. One case per drop reason (a reason without a case fails the test), and a
//! property test that every input is accounted for exactly once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::Proto;
use super::drop::{DropCounters, DropReason, Scope};
use super::fragment;
use super::neighbour::{Hop, Neighbours};
use super::parse::checksum;
use super::parse::tests::{A, A6, B, B6, tcp6, udp4, with_hop_by_hop};
use super::port::{MemPort, Ports};
use super::reassembly::Limits;
use super::switch::{ETH, NextHop, Switch, TxStep};
use super::table::{FlowSpec, FlowTable};

const US: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// Channel 1 listens on UDP A:5000 and TCP [A6]:5000; channel 2 (absent from the ports
/// unless a case adds it) on UDP A:6000.
fn table() -> FlowTable {
    let mut t = FlowTable::new(16);
    let sa = |s: &str| s.parse::<SocketAddr>().expect("address");
    t.insert(1, FlowSpec::Listener(Proto::Udp, sa("198.18.0.1:5000")))
        .expect("flow");
    t.insert(
        1,
        FlowSpec::Listener(Proto::Tcp, sa("[fd00:198:18::1]:5000")),
    )
    .expect("flow");
    t.insert(2, FlowSpec::Listener(Proto::Udp, sa("198.18.0.1:6000")))
        .expect("flow");
    t
}

fn switch(next_hop: NextHop) -> Switch {
    Switch::new(vec![IpAddr::from(A), IpAddr::from(A6)], next_hop, US, 1500)
}

fn ports() -> BTreeMap<u64, MemPort> {
    BTreeMap::from([(1, MemPort::new(1))])
}

/// Rewrites an IPv4 frame's header checksum.
fn fix_ipv4(f: &mut [u8]) {
    let ihl = usize::from(f[ETH] & 0x0f) * 4;
    f[ETH + 10..ETH + 12].fill(0);
    let c = checksum(&[&f[ETH..ETH + ihl]], 0);
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
}

/// `frame` addressed to the switch's MAC (the builders address frames to the peer's).
fn for_us(mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&US);
    frame
}

/// A UDP frame from the peer B to A:5000 (channel 1's flow).
fn to_us() -> Vec<u8> {
    for_us(udp4(B, 9, A, 5000, b"hello"))
}

/// The frames, one per RX reason, and which reason each must be counted under.
fn rx_cases() -> Vec<(DropReason, NextHop, Vec<u8>, MemPort)> {
    let fixed = NextHop::Fixed(PEER);
    let port = MemPort::new(1);
    let mut cases = Vec::new();
    let mut add = |r, nh, f, p: &MemPort| cases.push((r, nh, f, p.clone()));
    add(
        DropReason::RxArp,
        NextHop::Arp,
        Neighbours::request(PEER, Ipv4Addr::from(B), Ipv4Addr::from(A)),
        &port,
    );
    add(
        DropReason::RxNdp,
        NextHop::Arp,
        Neighbours::solicit(PEER, Ipv6Addr::from(B6), Ipv6Addr::from(A6)),
        &port,
    );
    let mut short = to_us();
    short.truncate(short.len() - 3);
    add(DropReason::RxTruncated, fixed, short, &port);
    let mut v5 = to_us();
    v5[ETH] = 0x55; // IP version 5
    add(DropReason::RxBadHeader, fixed, v5, &port);
    let mut lldp = to_us();
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    add(DropReason::RxNotIp, fixed, lldp, &port);
    let mut opts = to_us();
    opts.splice(ETH + 20..ETH + 20, [7, 9, 0, 0]); // an option longer than the header
    opts[ETH] = 0x46;
    let total = u16::from_be_bytes([opts[ETH + 2], opts[ETH + 3]]) + 4;
    opts[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4(&mut opts);
    add(DropReason::RxIpOptions, fixed, opts, &port);
    let mut routing = for_us(with_hop_by_hop(&tcp6(B6, 9, A6, 5000, b"x")));
    routing[ETH + 6] = 43; // a routing header with a segment left: not for this host
    routing[ETH + 40 + 2..ETH + 40 + 4].copy_from_slice(&[0, 1]);
    add(DropReason::RxExtHeaders, fixed, routing, &port);
    let mut frag = to_us();
    frag[ETH + 6] = 0x20; // more fragments, but 13 bytes of data (not a multiple of 8)
    fix_ipv4(&mut frag);
    add(DropReason::RxFragMalformed, fixed, frag, &port);
    let mut far = fragments_to_us(3000).remove(1);
    far[ETH + 6..ETH + 8].copy_from_slice(&0x1fff_u16.to_be_bytes()); // ends past 65,535
    fix_ipv4(&mut far);
    add(DropReason::RxFragOversized, fixed, far, &port);
    let mut icmp = to_us();
    icmp[ETH + 9] = 1;
    fix_ipv4(&mut icmp);
    add(DropReason::RxProtocol, fixed, icmp, &port);
    let mut l3 = to_us();
    l3[ETH + 10] ^= 0x01;
    add(DropReason::RxBadL3Checksum, fixed, l3, &port);
    let mut l4 = to_us();
    *l4.last_mut().expect("payload") ^= 0x40;
    add(DropReason::RxBadL4Checksum, fixed, l4, &port);
    add(
        DropReason::RxNoFlow,
        fixed,
        for_us(udp4(B, 9, A, 5001, b"x")),
        &port,
    );
    add(
        DropReason::RxChannelGone,
        fixed,
        for_us(udp4(B, 9, A, 6000, b"x")),
        &port,
    );
    let mut other = to_us();
    other[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x77]);
    add(DropReason::RxOtherHost, fixed, other, &port);
    let mut group = to_us();
    group[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0x7f, 0, 1]); // a group nobody joined
    add(DropReason::RxOtherHost, fixed, group, &port);
    let full = MemPort {
        capacity: 0,
        ..MemPort::new(1)
    };
    add(DropReason::RxNoBuf, fixed, to_us(), &full);
    let small = MemPort {
        buf_size: 16,
        ..MemPort::new(1)
    };
    add(DropReason::RxTooBig, fixed, to_us(), &small);
    cases
}

/// An app's IP packet (no Ethernet header) from channel 1's UDP flow to B.
fn from_us() -> Vec<u8> {
    udp4(A, 5000, B, 9, b"hello")[ETH..].to_vec()
}

/// The packets, one per TX reason the core decides, each with how the switch finds next hops
/// and whether the packet may wait for one.
fn tx_cases() -> Vec<(DropReason, NextHop, Vec<u8>)> {
    let fixed = NextHop::Fixed(PEER);
    let ip = |f: Vec<u8>| f[ETH..].to_vec();
    let mut short = from_us();
    short.truncate(short.len() - 3);
    let mut v5 = from_us();
    v5[0] = 0x55;
    let mut opts = udp4(A, 5000, B, 9, b"hello");
    opts.splice(ETH + 20..ETH + 20, [1, 0x44, 1, 0]); // a length of 1
    opts[ETH] = 0x46;
    let total = u16::from_be_bytes([opts[ETH + 2], opts[ETH + 3]]) + 4;
    opts[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4(&mut opts);
    let mut frag = udp4(A, 5000, B, 9, b"hello");
    frag[ETH + 6] = 0x20;
    fix_ipv4(&mut frag);
    let mut icmp = udp4(A, 5000, B, 9, b"hello");
    icmp[ETH + 9] = 1;
    fix_ipv4(&mut icmp);
    let mut l3 = from_us();
    l3[10] ^= 0x01;
    let mut routing = with_hop_by_hop(&tcp6(A6, 5000, B6, 9, b"x"));
    routing[ETH + 6] = 43;
    routing[ETH + 40 + 2..ETH + 40 + 4].copy_from_slice(&[0, 1]);
    vec![
        (DropReason::TxTruncated, fixed, short),
        (DropReason::TxBadHeader, fixed, v5),
        (DropReason::TxIpOptions, fixed, ip(opts)),
        (DropReason::TxExtHeaders, fixed, ip(routing)),
        (DropReason::TxFragment, fixed, ip(frag)),
        (DropReason::TxProtocol, fixed, ip(icmp)),
        (DropReason::TxBadL3Checksum, fixed, l3),
        (DropReason::TxNoFlow, fixed, ip(udp4(A, 5001, B, 9, b"x"))),
        (
            DropReason::TxSpoofedAddress,
            fixed,
            ip(udp4([198, 18, 0, 77], 5000, B, 9, b"x")),
        ),
        (DropReason::TxNotOwner, fixed, ip(udp4(A, 6000, B, 9, b"x"))),
    ]
}

/// Reasons decided outside the core: by a channel when it publishes its RX ring, or by the
/// driver when the interface refuses a frame. Each names the test that produces it.
const OUTSIDE_THE_CORE: &[(DropReason, &str)] = &[
    (
        DropReason::RxRingFull,
        "channel: Channel::flush_rx (flowswitch_pair: \
         a_channel_that_stops_reading_loses_only_its_own_packets_each_counted_once)",
    ),
    (
        DropReason::TxNetif,
        "driver: Datapath::tx_pass when the backend refuses (flowswitch_pair: \
         frames_the_interface_refuses_are_counted_once_on_their_channel_and_the_interface)",
    ),
    (
        DropReason::TxNetifOwn,
        "driver: Datapath::send_own when the backend refuses an ARP answer or a reset (no \
         test yet: the same send path as tx_netif)",
    ),
];

fn rx_one(sw: &mut Switch, table: &mut FlowTable, ports: &mut impl Ports, frame: &[u8]) {
    rx_at(sw, table, ports, frame, Instant::now());
}

fn rx_at(
    sw: &mut Switch,
    table: &mut FlowTable,
    ports: &mut impl Ports,
    frame: &[u8],
    now: Instant,
) {
    sw.begin_rx();
    sw.rx_batch(&[frame], table, ports, now);
}

/// The frames of a UDP datagram of `n` bytes from B to A:5000, cut to a 1500-byte MTU.
fn fragments_to_us(n: usize) -> Vec<Vec<u8>> {
    let whole = for_us(udp4(B, 9, A, 5000, &vec![0x33; n]));
    let plan = fragment::plan(&whole[ETH..], 1500).expect("plan");
    (0..plan.count())
        .map(|k| {
            let mut f = vec![0u8; ETH + 1500];
            f[..ETH].copy_from_slice(&whole[..ETH]);
            let len = plan
                .write(&whole[ETH..], k, 1, &mut f[ETH..])
                .expect("write");
            f.truncate(ETH + len);
            f
        })
        .collect()
}

fn tx_one(
    sw: &mut Switch,
    table: &FlowTable,
    ip: &[u8],
    may_hold: bool,
    now: Instant,
) -> Result<TxStep, DropReason> {
    let mut frame = vec![0u8; ETH + 2048];
    frame[ETH..ETH + ip.len()].copy_from_slice(ip);
    sw.tx_prepare(table, 1, &mut frame, ip.len(), may_hold, now)
}

#[test]
fn every_drop_reason_has_a_case_that_produces_it() {
    let now = Instant::now();
    let mut covered = std::collections::BTreeSet::new();
    for (reason, nh, frame, port) in rx_cases() {
        let (mut sw, mut t) = (switch(nh), table());
        let mut ports = BTreeMap::from([(1, port)]);
        rx_one(&mut sw, &mut t, &mut ports, &frame);
        let (iface, chan) = (&sw.stats().drops, &ports[&1].drops);
        let counted = match reason.scope() {
            Scope::Interface => iface.get(reason),
            Scope::Channel => chan.get(reason),
        };
        assert_eq!(counted, 1, "{}: {iface:?} {chan:?}", reason.name());
        assert_eq!(iface.total() + chan.total(), 1, "{} only", reason.name());
        assert_eq!(sw.stats().rx_switched, 0, "{}", reason.name());
        covered.insert(reason);
    }
    for (reason, nh, ip) in tx_cases() {
        let mut sw = switch(nh);
        assert_eq!(
            tx_one(&mut sw, &table(), &ip, true, now),
            Err(reason),
            "{}",
            reason.name()
        );
        covered.insert(reason);
    }
    // Next hops.
    let t = table();
    let dst = IpAddr::from(B);
    let mut sw = switch(NextHop::Kernel(7));
    sw.on_route(dst, Hop::OtherInterface, now);
    assert_eq!(
        tx_one(&mut sw, &t, &from_us(), true, now),
        Err(DropReason::TxOtherInterface)
    );
    covered.insert(DropReason::TxOtherInterface);
    let mut sw = switch(NextHop::Kernel(7));
    assert_eq!(
        tx_one(&mut sw, &t, &from_us(), false, now),
        Err(DropReason::TxUnresolved),
        "a packet that may not wait"
    );
    covered.insert(DropReason::TxUnresolved);
    for _ in 0..16 {
        assert_eq!(tx_one(&mut sw, &t, &from_us(), true, now), Ok(TxStep::Held));
    }
    assert_eq!(
        tx_one(&mut sw, &t, &from_us(), true, now),
        Err(DropReason::TxNoNeighbour),
        "too many wait for one neighbour"
    );
    covered.insert(DropReason::TxNoNeighbour);
    let mut frame = vec![0u8; ETH + 8];
    assert_eq!(
        sw.tx_prepare(&t, 1, &mut frame, 64, true, now),
        Err(DropReason::TxBadLen)
    );
    covered.insert(DropReason::TxBadLen);
    // Reassembly, which takes more than one frame.
    let frags = fragments_to_us(3000);
    let mut shifted = frags[1].clone();
    shifted[ETH + 7] -= 1; // 8 bytes earlier: overlaps the first
    fix_ipv4(&mut shifted);
    let seqs: [(DropReason, Limits, Vec<&Vec<u8>>); 4] = [
        (
            DropReason::RxFragDuplicate,
            Limits::default(),
            vec![&frags[0], &frags[0]],
        ),
        (
            DropReason::RxFragOverlap,
            Limits::default(),
            vec![&frags[0], &shifted],
        ),
        (
            DropReason::RxFragTooMany,
            Limits {
                fragments: 1,
                ..Limits::default()
            },
            vec![&frags[0], &frags[1]],
        ),
        (
            DropReason::RxFragMemory,
            Limits {
                memory: 1000,
                ..Limits::default()
            },
            vec![&frags[0]],
        ),
    ];
    for (reason, limits, seq) in seqs {
        let (mut sw, mut t, mut ports) = (switch(NextHop::Fixed(PEER)), table(), ports());
        sw.set_reassembly_limits(limits);
        for f in seq {
            rx_one(&mut sw, &mut t, &mut ports, f);
        }
        assert_eq!(sw.stats().drops.get(reason), 1, "{}", reason.name());
        assert_eq!(sw.stats().drops.total(), 1, "{} only", reason.name());
        covered.insert(reason);
    }
    let (mut sw, mut t, mut ports) = (switch(NextHop::Fixed(PEER)), table(), ports());
    rx_at(&mut sw, &mut t, &mut ports, &frags[0], now);
    rx_at(
        &mut sw,
        &mut t,
        &mut ports,
        &frags[1],
        now + Duration::from_secs(31),
    );
    assert_eq!(sw.stats().drops.get(DropReason::RxFragTimeout), 1);
    covered.insert(DropReason::RxFragTimeout);
    for (r, _) in OUTSIDE_THE_CORE {
        covered.insert(*r);
    }
    let missing: Vec<_> = DropReason::ALL
        .iter()
        .filter(|r| !covered.contains(r))
        .map(|r| r.name())
        .collect();
    assert!(
        missing.is_empty(),
        "drop reasons without a case: {missing:?}"
    );
}

#[test]
fn a_frame_for_a_flow_is_delivered_to_its_channel_stripped_of_ethernet() {
    let (mut sw, mut t, mut ports) = (switch(NextHop::Fixed(PEER)), table(), ports());
    let frame = to_us();
    rx_one(&mut sw, &mut t, &mut ports, &frame);
    assert_eq!(sw.stats().rx_switched, 1);
    assert_eq!(sw.touched(), [1]);
    let got: Vec<&[u8]> = ports[&1].packets().collect();
    assert_eq!(got, [&frame[ETH..]]);
    // Broadcast, and a group the host joined, are the host's too; a group it left is not.
    let group = [0x01, 0x00, 0x5e, 0x7f, 0, 1];
    for dst in [[0xff; 6], group] {
        let mut f = frame.clone();
        f[..6].copy_from_slice(&dst);
        sw.set_groups(vec![group]);
        rx_one(&mut sw, &mut t, &mut ports, &f);
    }
    assert_eq!(sw.stats().rx_switched, 3);
    sw.set_groups(Vec::new());
    let mut left = frame.clone();
    left[..6].copy_from_slice(&group);
    rx_one(&mut sw, &mut t, &mut ports, &left);
    assert_eq!(sw.stats().drops.get(DropReason::RxOtherHost), 1);
    // An inactive channel's flow is gone.
    ports.get_mut(&1).expect("port").active = false;
    rx_one(&mut sw, &mut t, &mut ports, &frame);
    assert_eq!(sw.stats().drops.get(DropReason::RxChannelGone), 1);
}

#[test]
fn a_valid_packet_gets_its_ethernet_header_and_a_spoofed_one_is_a_forgery() {
    let t = table();
    let now = Instant::now();
    let mut sw = switch(NextHop::Fixed(PEER));
    let ip = from_us();
    let mut frame = vec![0u8; ETH + ip.len()];
    frame[ETH..].copy_from_slice(&ip);
    let step = sw.tx_prepare(&t, 1, &mut frame, ip.len(), true, now);
    assert!(matches!(step, Ok(TxStep::Send(..))), "{step:?}");
    assert_eq!(&frame[..6], &PEER);
    assert_eq!(&frame[6..12], &US);
    assert_eq!(&frame[12..14], &[0x08, 0x00]);
    let forged = tx_one(&mut sw, &t, &udp4(A, 6000, B, 9, b"x")[ETH..], true, now);
    assert!(forged.is_err_and(|r| r.is_forgery()));
}

#[test]
fn a_held_packet_leaves_once_the_kernel_answers_and_is_dropped_if_it_never_does() {
    let t = table();
    let now = Instant::now();
    let dst = IpAddr::from(B);
    let mut sw = switch(NextHop::Kernel(7));
    let mut ports = ports();
    assert_eq!(tx_one(&mut sw, &t, &from_us(), true, now), Ok(TxStep::Held));
    // The core asks for the route, and asks once within the retry interval.
    assert_eq!(sw.poll_query(), Some(super::neighbour::Query::Route(dst)));
    assert_eq!(tx_one(&mut sw, &t, &from_us(), true, now), Ok(TxStep::Held));
    assert_eq!(sw.poll_query(), None, "asked once");
    let mut ready = Vec::new();
    sw.poll_pending(now, &mut ports, &mut ready);
    assert!(ready.is_empty());
    // The route says on-link: the neighbour is asked next; its answer releases both.
    sw.on_route(dst, Hop::Via(dst), now);
    assert_eq!(
        sw.poll_query(),
        Some(super::neighbour::Query::Neighbour(dst))
    );
    sw.on_neighbour(dst, Some(PEER));
    sw.poll_pending(now, &mut ports, &mut ready);
    assert_eq!(ready.len(), 2);
    assert_eq!(&ready[0].frame[..6], &PEER);
    assert_eq!(&ready[0].frame[12..14], &[0x08, 0x00]);
    assert!(!sw.has_pending());
    // A neighbour that disappears holds packets again; past the limit they are dropped on
    // their channel.
    sw.on_neighbour(dst, None);
    assert_eq!(tx_one(&mut sw, &t, &from_us(), true, now), Ok(TxStep::Held));
    ready.clear();
    sw.poll_pending(now + Duration::from_secs(4), &mut ports, &mut ready);
    assert!(ready.is_empty());
    assert_eq!(ports[&1].drops.get(DropReason::TxUnresolved), 1);
    assert_eq!(sw.stats().tx_unresolved, 1);
}

#[test]
fn behind_a_tap_the_core_answers_arp_and_asks_for_unknown_neighbours() {
    let (mut sw, mut t, mut ports) = (switch(NextHop::Arp), table(), ports());
    let now = Instant::now();
    let req = Neighbours::request(PEER, Ipv4Addr::from(B), Ipv4Addr::from(A));
    rx_one(&mut sw, &mut t, &mut ports, &req);
    let reply = sw.poll_transmit().expect("an ARP reply");
    assert_eq!(&reply[..6], &PEER);
    // The asker was learned: a packet to it leaves at once.
    assert!(matches!(
        tx_one(&mut sw, &t, &from_us(), true, now),
        Ok(TxStep::Send(..))
    ));
    // To an unknown neighbour: held, and an ARP request goes out.
    let other = udp4(A, 5000, [198, 18, 0, 9], 9, b"x");
    assert_eq!(
        tx_one(&mut sw, &t, &other[ETH..], true, now),
        Ok(TxStep::Held)
    );
    let ask = sw.poll_transmit().expect("an ARP request");
    assert_eq!(&ask[..6], &[0xff; 6]);
    assert_eq!(sw.poll_transmit(), None);
}

/// An input of the property test.
#[derive(Debug, Clone)]
enum Input {
    /// A frame from the wire (valid, then perhaps damaged at one byte).
    Wire {
        port: u16,
        damage: Option<(usize, u8)>,
    },
    /// A packet from channel 1 (valid, then perhaps damaged, from some source port/address).
    App {
        sport: u16,
        src_last: u8,
        damage: Option<(usize, u8)>,
    },
}

fn input() -> impl Strategy<Value = Input> {
    let damage = proptest::option::of((0usize..60, any::<u8>()));
    prop_oneof![
        (
            prop::sample::select(vec![5000u16, 5001, 6000]),
            damage.clone()
        )
            .prop_map(|(port, damage)| Input::Wire { port, damage }),
        (
            prop::sample::select(vec![5000u16, 5001, 6000]),
            prop::sample::select(vec![1u8, 2, 77]),
            damage
        )
            .prop_map(|(sport, src_last, damage)| Input::App {
                sport,
                src_last,
                damage
            }),
    ]
}

fn damaged(mut v: Vec<u8>, damage: Option<(usize, u8)>) -> Vec<u8> {
    if let Some((at, x)) = damage
        && let Some(b) = v.get_mut(at)
    {
        *b ^= x;
    }
    v
}

#[test]
fn fragments_behind_a_vlan_0_tag_and_with_options_are_reassembled_and_delivered_stripped() {
    let (mut sw, mut t) = (switch(NextHop::Fixed(PEER)), table());
    let big = MemPort {
        buf_size: 65536,
        ..MemPort::new(1)
    };
    let mut ports = BTreeMap::from([(1, big)]);
    for f in fragments_to_us(3000) {
        // A VLAN-0 priority tag in front of each fragment.
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0xa0, 0x00]);
        tagged.extend_from_slice(&f[12..]);
        rx_one(&mut sw, &mut t, &mut ports, &tagged);
    }
    // A whole packet with IPv4 options (router alert).
    let mut opts = to_us();
    opts.splice(ETH + 20..ETH + 20, [0x94, 4, 0, 0]);
    opts[ETH] = 0x46;
    let total = u16::from_be_bytes([opts[ETH + 2], opts[ETH + 3]]) + 4;
    opts[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4(&mut opts);
    rx_one(&mut sw, &mut t, &mut ports, &opts);
    let st = sw.stats();
    assert_eq!(
        (st.rx_fragments, st.rx_reassembled, st.rx_switched),
        (3, 1, 2)
    );
    assert_eq!(st.rx_options_stripped, 1);
    assert_eq!(st.drops.total() + ports[&1].drops.total(), 0);
    let staged = &ports[&1].staged;
    assert_eq!(staged.len(), 2);
    assert_eq!(staged[0].0 as usize, 20 + 8 + 3000, "the whole datagram");
    let (len, bytes) = &staged[1];
    assert_eq!(
        bytes[..*len as usize],
        to_us()[ETH..],
        "the packet without its options"
    );
}

proptest! {
    /// Every frame from the wire is delivered or counted under exactly one reason; every
    /// packet from an app is sent, held, or refused under exactly one reason.
    #[test]
    fn every_input_is_accounted_for_exactly_once(inputs in proptest::collection::vec(input(), 1..64), kernel in any::<bool>()) {
        let nh = if kernel { NextHop::Kernel(7) } else { NextHop::Fixed(PEER) };
        let (mut sw, mut t, mut ports) = (switch(nh), table(), ports());
        let now = Instant::now();
        let (mut frames, mut sent, mut held, mut refused) = (0u64, 0u64, 0u64, DropCounters::default());
        for i in inputs {
            match i {
                Input::Wire { port, damage } => {
                    frames += 1;
                    rx_one(&mut sw, &mut t, &mut ports, &damaged(for_us(udp4(B, 9, A, port, b"payload")), damage));
                }
                Input::App { sport, src_last, damage } => {
                    let ip = damaged(udp4([198, 18, 0, src_last], sport, B, 9, b"payload")[ETH..].to_vec(), damage);
                    match tx_one(&mut sw, &t, &ip, true, now) {
                        Ok(TxStep::Send(..)) => sent += 1,
                        Ok(TxStep::Held) => held += 1,
                        Err(r) => refused.add(r),
                    }
                }
            }
        }
        let st = sw.stats();
        let chan = &ports[&1];
        // RX: delivered, or dropped on the interface, or dropped by the channel.
        let rx_chan: u64 = chan.drops.nonzero().filter(|(r, _)| r.name().starts_with("rx_")).map(|(_, n)| n).sum();
        prop_assert_eq!(st.rx_frames, frames);
        prop_assert_eq!(st.rx_switched + st.drops.total() + rx_chan, frames);
        prop_assert_eq!(chan.staged.len() as u64, st.rx_switched);
        // TX: every refusal is a channel-scope reason (the driver counts it on the channel).
        prop_assert!(refused.nonzero().all(|(r, _)| r.scope() == Scope::Channel));
        prop_assert_eq!(held > 0, sw.has_pending());
        if !kernel {
            prop_assert_eq!(held, 0);
        }
        let _ = sent;
    }
}
