//! The flowswitch end to end in one process: a real nexus (control socket, channels, flow
//! table, host-port reservations) serving an in-memory interface pair, an app on a channel,
//! and a "wire peer" holding the other end of the pair.

use std::time::{Duration, Instant};

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use netchannel::nexus::{ChannelOptions, FlowProto, Nexus};
use netchannel::{Interest, Packet};
use netchannel_nexus::datapath::Datapath;
use netchannel_nexus::flowswitch::NextHop;
use netchannel_nexus::netif::Netif;
use netchannel_nexus::netif::pair::{PairEnd, pair};

const NEXUS_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const HOST: [u8; 4] = [198, 18, 0, 1];
const PEER: [u8; 4] = [198, 18, 0, 2];

fn udp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NEXUS_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("writing into a Vec cannot fail");
    out
}

fn udp_ip(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("writing into a Vec cannot fail");
    out
}

struct Running {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: String,
    wire: PairEnd,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn start(name: &str) -> Running {
    start_with(name, netchannel_nexus::Config::default())
}

fn start_with(name: &str, mut cfg: netchannel_nexus::Config) -> Running {
    let (nexus_end, wire) = pair(NEXUS_MAC, PEER_MAC).expect("an interface pair");
    let socket = format!("/tmp/netchannel-fsw-{}-{name}.sock", std::process::id());
    cfg.control.socket = socket.clone().into();
    let sw = Datapath::on(
        Box::new(nexus_end),
        vec![HOST.into()],
        NextHop::Fixed(PEER_MAC),
    )
    .expect("a datapath");
    let mut nexus = netchannel_nexus::Nexus::with_datapath(cfg, sw).expect("a nexus on the pair");
    let stop = nexus.stop_flag();
    let thread = std::thread::spawn(move || nexus.run().expect("the nexus runs"));
    let t0 = Instant::now();
    while Nexus::connect(&socket).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    Running {
        stop,
        thread: Some(thread),
        socket,
        wire,
    }
}

/// Waits for frames on the wire side, up to `n` or 500 ms.
fn wire_frames(wire: &mut PairEnd, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < n && t0.elapsed() < Duration::from_millis(500) {
        wire.recv(64, &mut |fs| got.extend(fs.iter().map(|f| f.to_vec())));
        std::thread::sleep(Duration::from_millis(1));
    }
    got
}

fn counter(list: &[(String, u64)], name: &str) -> u64 {
    list.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
}

/// A channel with `opts` and a UDP flow on an ephemeral port: the channel and its address.
fn udp_channel(
    nexus: &mut Nexus,
    opts: ChannelOptions,
) -> (netchannel::nexus::Channel, std::net::SocketAddr) {
    let ch = nexus.open_channel(opts).expect("a channel");
    let any = "0.0.0.0:0".parse().expect("an address");
    let (_, local) = nexus
        .add_flow(&ch, FlowProto::Udp, any, None)
        .expect("a UDP flow");
    (ch, local)
}

/// Receives on `ch` until `n` packets have arrived or 5 s have passed; returns them all.
fn recv_at_least(ch: &mut netchannel::nexus::Channel, n: usize) -> Vec<Packet> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < n && t0.elapsed() < Duration::from_secs(5) {
        ch.wait(Interest::Readable, Some(Duration::from_millis(50)))
            .ok();
        ch.recv(&mut got, 32).expect("a live channel");
    }
    got
}

#[test]
fn udp_crosses_the_flowswitch_both_ways_and_spoofs_are_dropped() {
    let mut r = start("udp");
    let mut nexus = Nexus::connect(&r.socket).unwrap();
    let (mut ch, local) = udp_channel(&mut nexus, ChannelOptions::default());
    let port = local.port();

    // Wire → app: only the claimed port arrives, as an IP packet.
    r.wire
        .send(&udp_frame(PEER, 999, HOST, port, b"to the app"))
        .unwrap();
    r.wire
        .send(&udp_frame(
            PEER,
            999,
            HOST,
            port.wrapping_add(1),
            b"unclaimed",
        ))
        .unwrap();
    let mut bad = udp_frame(PEER, 999, HOST, port, b"corrupt");
    *bad.last_mut().unwrap() ^= 1;
    r.wire.send(&bad).unwrap();
    let got = recv_at_least(&mut ch, 1);
    assert!(!got.is_empty(), "nothing delivered");
    let ip = ch.payload(&got[0]).to_vec();
    let sliced = SlicedPacket::from_ip(&ip).unwrap();
    let Some(TransportSlice::Udp(u)) = sliced.transport else {
        panic!("not UDP")
    };
    assert_eq!(
        (u.source_port(), u.destination_port(), u.payload()),
        (999, port, &b"to the app"[..])
    );
    ch.free(got.iter().map(|p| p.buf)).unwrap();

    // App → wire: a valid reply goes out with an Ethernet header; spoofs do not.
    let send = |ch: &mut netchannel::nexus::Channel, pkt: Vec<u8>| send_ip(ch, &pkt).unwrap();
    send(&mut ch, udp_ip(HOST, port, PEER, 999, b"reply"));
    send(
        &mut ch,
        udp_ip(HOST, port.wrapping_add(7), PEER, 999, b"other source port"),
    );
    send(
        &mut ch,
        udp_ip([198, 18, 0, 77], port, PEER, 999, b"other source address"),
    );
    let frames = wire_frames(&mut r.wire, 3);
    assert_eq!(
        frames.len(),
        1,
        "only the valid reply may leave: {frames:?}"
    );
    let f = SlicedPacket::from_ethernet(&frames[0]).unwrap();
    assert_eq!(&frames[0][..12], &[PEER_MAC, NEXUS_MAC].concat()[..]);
    let Some(TransportSlice::Udp(u)) = f.transport else {
        panic!("not UDP")
    };
    assert_eq!(u.payload(), b"reply");

    let s = nexus.status().unwrap();
    let c = s.channels.iter().find(|c| c.id == ch.id()).unwrap();
    assert_eq!(counter(&c.drops, "tx_no_flow"), 1, "{:?}", c.drops);
    assert_eq!(counter(&c.drops, "tx_spoofed_address"), 1, "{:?}", c.drops);
    assert_eq!(counter(&s.interface, "rx_no_flow"), 1, "{:?}", s.interface);
    assert_eq!(
        counter(&s.interface, "rx_bad_l4_checksum"),
        1,
        "{:?}",
        s.interface
    );
    assert_eq!(counter(&s.interface, "rx_switched"), 1);
    assert_eq!(counter(&s.interface, "tx_frames"), 1);
    let flows = nexus.flows().unwrap();
    assert_eq!(
        (flows[0].rx_packets, flows[0].tx_packets),
        (1, 1),
        "{flows:?}"
    );
}

#[test]
fn two_channels_get_only_their_own_flows() {
    let mut r = start("two");
    let mut nexus = Nexus::connect(&r.socket).unwrap();
    let (mut a, la) = udp_channel(&mut nexus, ChannelOptions::default());
    let (mut b, lb) = udp_channel(&mut nexus, ChannelOptions::default());
    for i in 0..20u8 {
        let port = if i % 2 == 0 { la.port() } else { lb.port() };
        r.wire
            .send(&udp_frame(PEER, 1000 + u16::from(i), HOST, port, &[i]))
            .unwrap();
    }
    for (ch, parity) in [(&mut a, 0u8), (&mut b, 1u8)] {
        let got = recv_at_least(ch, 10);
        assert_eq!(got.len(), 10);
        for p in &got {
            let ip = ch.payload(p);
            assert_eq!(
                ip.last().copied().unwrap() % 2,
                parity,
                "a packet of the other channel arrived"
            );
        }
        ch.free(got.iter().map(|p| p.buf)).unwrap();
    }
}

#[test]
fn datagrams_past_the_mtu_leave_as_fragments_that_reassemble() {
    use netchannel_nexus::flowswitch::reassembly::{Limits, Reassembler};
    let mut r = start("mtu");
    let mut nexus = Nexus::connect(&r.socket).unwrap();
    let (mut ch, local) = udp_channel(&mut nexus, ChannelOptions::default());
    let port = local.port();
    // 1600 bytes fit a 2 KiB pool buffer but not the 1500-byte MTU; 1500 exactly does.
    let sent: Vec<Vec<u8>> = [1600usize, 1501, 1500]
        .iter()
        .map(|&size| udp_ip(HOST, port, PEER, 999, &vec![7u8; size - 28]))
        .collect();
    for pkt in &sent {
        send_ip(&mut ch, pkt).unwrap();
    }
    let frames = wire_frames(&mut r.wire, 5);
    let sizes: Vec<usize> = frames.iter().map(Vec::len).collect();
    // 1480 bytes of data in a first fragment, the rest (100, then 1) in a last one.
    assert_eq!(sizes, [14 + 1500, 14 + 120, 14 + 1500, 14 + 21, 14 + 1500]);
    let mut reassembler = Reassembler::new(Limits::default());
    let now = Instant::now();
    let mut whole = Vec::new();
    for f in &frames {
        let ip = &f[14..];
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0 {
            whole.push(ip.to_vec());
        } else if let Some(p) = reassembler.insert(ip, now, &mut |d| panic!("{d:?}")) {
            whole.push(p);
        }
    }
    assert_eq!(whole.len(), 3, "three datagrams");
    for (got, want) in whole.iter().zip(&sent) {
        // The same datagram; only the IPv4 header's flags and checksum may differ.
        assert_eq!(got.len(), want.len());
        assert_eq!(got[20..], want[20..]);
    }
    let s = nexus.status().unwrap();
    let c = s.channels.iter().find(|c| c.id == ch.id()).unwrap();
    assert!(c.drops.iter().all(|(_, n)| *n == 0), "{:?}", c.drops);
    assert_eq!(counter(&s.interface, "tx_fragmented"), 2);
    assert_eq!(counter(&s.interface, "tx_netif_errors"), 0);
}

#[test]
fn a_channel_that_stops_reading_loses_only_its_own_packets_each_counted_once() {
    let mut r = start("stall");
    let mut nexus = Nexus::connect(&r.socket).unwrap();
    let opts = ChannelOptions {
        ring_slots: Some(64),
        ..ChannelOptions::default()
    };
    let (mut stalled, ls) = udp_channel(&mut nexus, opts);
    let (mut healthy, lh) = udp_channel(&mut nexus, ChannelOptions::default());
    const SENT: u64 = 300;
    for i in 0..SENT {
        r.wire
            .send(&udp_frame(PEER, 1000, HOST, ls.port(), &i.to_be_bytes()))
            .unwrap();
        if i % 30 == 0 {
            r.wire
                .send(&udp_frame(PEER, 1000, HOST, lh.port(), b"still here"))
                .unwrap();
        }
    }
    // The nexus has handled every frame once the interface counter says so.
    let t0 = Instant::now();
    loop {
        let s = nexus.status().unwrap();
        if counter(&s.interface, "rx_frames") == SENT + 10 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", s.interface);
        std::thread::sleep(Duration::from_millis(5));
    }
    // The healthy channel got all of its own.
    let got = recv_at_least(&mut healthy, 10);
    assert_eq!(got.len(), 10);
    healthy.free(got.iter().map(|p| p.buf)).unwrap();
    // The stalled one: what it can read now plus what was dropped is what was sent, and the
    // drops are the ring's and the pool's.
    let mut held = Vec::new();
    while stalled.recv(&mut held, 64).unwrap() > 0 {}
    let s = nexus.status().unwrap();
    let c = s.channels.iter().find(|c| c.id == stalled.id()).unwrap();
    let dropped = counter(&c.drops, "rx_ring_full") + counter(&c.drops, "rx_no_buf");
    assert!(
        !held.is_empty() && held.len() <= 64,
        "{} delivered",
        held.len()
    );
    assert_eq!(held.len() as u64 + dropped, SENT, "{:?}", c.drops);
    assert!(counter(&c.drops, "rx_ring_full") > 0, "{:?}", c.drops);
    assert_eq!(c.audit, "ok");
    let h = s.channels.iter().find(|c| c.id == healthy.id()).unwrap();
    assert_eq!(
        counter(&h.drops, "rx_ring_full") + counter(&h.drops, "rx_no_buf"),
        0
    );
    // Once it reads again, it receives again.
    stalled.free(held.iter().map(|p| p.buf)).unwrap();
    r.wire
        .send(&udp_frame(PEER, 1000, HOST, ls.port(), b"again"))
        .unwrap();
    assert_eq!(recv_at_least(&mut stalled, 1).len(), 1);
}

/// Sends `pkt` (an IP packet) on `ch`, waiting for a buffer and for room on the TX ring.
fn send_ip(ch: &mut netchannel::nexus::Channel, pkt: &[u8]) -> Result<(), netchannel::Error> {
    let buf = loop {
        if let Some(b) = ch.alloc() {
            break b;
        }
        ch.wait(Interest::Buffers, Some(Duration::from_secs(1)))?;
    };
    ch.buffer_mut(buf).expect("an allocated buffer")[..pkt.len()].copy_from_slice(pkt);
    let p = Packet {
        buf,
        offset: 0,
        len: pkt.len() as u32,
    };
    loop {
        match ch.send(&[p]) {
            Ok(0) => ch.wait(Interest::Writable, Some(Duration::from_secs(1)))?,
            Ok(_) => return Ok(()),
            Err(netchannel::SendError::Channel(e)) => return Err(e),
            Err(other) => panic!("{other:?}"),
        }
    }
}

#[test]
fn an_app_that_keeps_spoofing_is_quarantined_and_its_neighbour_is_not() {
    let mut cfg = netchannel_nexus::Config::default();
    cfg.channel.max_strikes = 8;
    let mut r = start_with("strikes", cfg);
    let mut nexus = Nexus::connect(&r.socket).unwrap();
    let (mut rogue, lr) = udp_channel(&mut nexus, ChannelOptions::default());
    let (mut honest, lh) = udp_channel(&mut nexus, ChannelOptions::default());
    let forged = |i: u32| {
        if i.is_multiple_of(2) {
            udp_ip(HOST, lh.port(), PEER, 9, b"not mine")
        } else {
            udp_ip([198, 18, 0, 99], lr.port(), PEER, 9, b"not my address")
        }
    };
    // Packets from a flow it no longer has are not strikes (a closed socket's stragglers).
    let gone = (40000..)
        .find(|&p| p != lr.port() && p != lh.port())
        .expect("a free port");
    for _ in 0..20 {
        send_ip(&mut rogue, &udp_ip(HOST, gone, PEER, 9, b"late")).unwrap();
    }
    // Nor is a forged packet now and then (one from a port another app has since taken).
    for i in 0..12 {
        send_ip(&mut rogue, &forged(i)).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    send_ip(&mut rogue, &udp_ip(HOST, lr.port(), PEER, 9, b"fine")).unwrap();
    assert_eq!(
        wire_frames(&mut r.wire, 1).len(),
        1,
        "the rogue was cut off early"
    );
    // A stream of them is an attack.
    let t0 = Instant::now();
    let mut i = 0;
    let reason = loop {
        match send_ip(&mut rogue, &forged(i)) {
            Err(netchannel::Error::Defunct { reason }) => break reason,
            Err(e) => panic!("{e}"),
            Ok(()) => assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the rogue channel was not quarantined"
            ),
        }
        i += 1;
    };
    assert_eq!(reason, netchannel::DefunctReason::Quarantined);
    assert!(wire_frames(&mut r.wire, 1).is_empty(), "a spoof left");
    // The neighbour goes on both ways.
    send_ip(
        &mut honest,
        &udp_ip(HOST, lh.port(), PEER, 9, b"still fine"),
    )
    .unwrap();
    assert_eq!(wire_frames(&mut r.wire, 1).len(), 1);
    r.wire
        .send(&udp_frame(PEER, 9, HOST, lh.port(), b"to the honest app"))
        .unwrap();
    assert_eq!(recv_at_least(&mut honest, 1).len(), 1);
}

/// The time-of-check/time-of-use attack: a second thread of the app rewrites the source
/// address and port of its packets (through the pool's memory) while the nexus validates
/// and sends them. The nexus copies a packet before it looks at it, so what reaches the wire
/// is always what it checked: the app's own flow, or nothing.
#[test]
fn headers_rewritten_while_the_nexus_validates_never_reach_the_wire() {
    let mut cfg = netchannel_nexus::Config::default();
    cfg.channel.max_strikes = u64::MAX;
    let mut r = start_with("toctou", cfg);
    let mut nexus = Nexus::connect(&r.socket).unwrap();
    let (mut ch, local) = udp_channel(&mut nexus, ChannelOptions::default());
    let (_victim, victim) = udp_channel(&mut nexus, ChannelOptions::default());
    let (pool, size, buffers) = ch.hostile_pool().unwrap();
    // IPv4 header bytes 10..16 (checksum, source address) of the app's packets, and of the
    // same packets from an address the host does not have, each with a valid checksum: the
    // forgery must meet the ownership checks, not the checksum.
    let head_of = |src: [u8; 4]| -> [u8; 6] {
        let p = udp_ip(src, local.port(), PEER, 9, &[0; 4]);
        p[10..16].try_into().unwrap()
    };
    let heads = [head_of([198, 18, 0, 77]), head_of(HOST)];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let passes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flipper = {
        let stop = stop.clone();
        let passes = passes.clone();
        std::thread::spawn(move || {
            // The source address and the UDP source port of every buffer, in turn the app's
            // own and someone else's.
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for b in 0..buffers {
                    let port = if i.is_multiple_of(3) {
                        victim.port()
                    } else {
                        local.port()
                    };
                    let at = u64::from(b) * u64::from(size);
                    let _ = rustix::io::pwrite(&pool, &heads[(i % 2) as usize], at + 10);
                    let _ = rustix::io::pwrite(&pool, &port.to_be_bytes(), at + 20);
                    i += 1;
                }
                passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    while passes.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    // At least 3000 packets, and on until the flipper has won some races (a 2-core machine
    // may not run it at first), within bounds.
    let id = ch.id();
    let refused_now = |nexus: &mut Nexus| -> u64 {
        let s = nexus.status().unwrap();
        let c = s.channels.iter().find(|c| c.id == id).unwrap();
        c.drops.iter().map(|(_, n)| *n).sum()
    };
    let mut wire = Vec::new();
    let mut sent = 0usize;
    let t0 = Instant::now();
    while sent < 3000 || (refused_now(&mut nexus) == 0 && t0.elapsed() < Duration::from_secs(10)) {
        for _ in 0..500 {
            let payload = (sent as u32).to_be_bytes();
            send_ip(&mut ch, &udp_ip(HOST, local.port(), PEER, 9, &payload)).unwrap();
            sent += 1;
            if sent.is_multiple_of(64) {
                r.wire
                    .recv(64, &mut |fs| wire.extend(fs.iter().map(|f| f.to_vec())));
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    wire.extend(wire_frames(&mut r.wire, sent));
    let s = nexus.status().unwrap();
    let c = s.channels.iter().find(|c| c.id == ch.id()).unwrap();
    let refused: u64 = c.drops.iter().map(|(_, n)| *n).sum();
    assert_eq!(
        wire.len() as u64 + refused,
        sent as u64,
        "every packet went out or was refused once: {:?} {:?}",
        c.drops,
        s.interface
    );
    assert!(refused > 0, "the race was never won by the flipper");
    assert!(!wire.is_empty(), "nothing got through at all");
    for f in &wire {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("not IPv4: {f:02x?}")
        };
        let Some(TransportSlice::Udp(u)) = p.transport else {
            panic!("not UDP: {f:02x?}")
        };
        assert_eq!(
            (ip.header().source(), u.source_port()),
            (HOST, local.port()),
            "a forged packet reached the wire"
        );
    }
}

#[test]
fn frames_the_interface_refuses_are_counted_once_on_their_channel_and_the_interface() {
    // The wire side never reads: the pair's queue takes 4,096 frames and refuses the rest.
    let r = start("refused");
    let mut nexus = Nexus::connect(&r.socket).unwrap();
    let (mut ch, local) = udp_channel(&mut nexus, ChannelOptions::default());
    const SENT: u64 = 4096 + 300;
    for i in 0..SENT {
        let pkt = udp_ip(HOST, local.port(), PEER, 999, &i.to_be_bytes());
        send_ip(&mut ch, &pkt).unwrap();
    }
    let t0 = Instant::now();
    loop {
        let s = nexus.status().unwrap();
        let c = s.channels.iter().find(|c| c.id == ch.id()).unwrap();
        let (sent, refused) = (
            counter(&s.interface, "tx_frames"),
            counter(&c.drops, "tx_netif"),
        );
        if sent + refused == SENT {
            assert_eq!(sent, 4096, "{:?}", s.interface);
            assert_eq!(refused, 300, "{:?}", c.drops);
            assert_eq!(counter(&s.interface, "tx_netif_errors"), 300);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{sent} sent, {refused} refused: {:?} {:?}",
            s.interface,
            c.drops
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(r);
}
