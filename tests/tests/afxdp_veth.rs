//! A nexus on the host end of a veth pair over AF_XDP, sharing the interface with the kernel's
//! own stack; kernel peers (python3, kernel sockets and raw AF_PACKET sockets) in a network
//! namespace on the other end. Needs root; without root each test says it skipped.
//!
//! Every test makes its own namespace and veth pair (names from this process's id and the
//! test's number), uses addresses from 198.18.0.0/15 and fd00:198:18::/64 only (a /24 and a
//! /112 of its own, so concurrent runs do not collide), and removes everything in a guard,
//! however it ends. Every loop and every wait has a time bound. The tests run one at a time
//! ([`serial`]): the machine has two cores and every nexus polls.
//!
//! * `udp_v4_and_v6_...`: kernel UDP peers on both families reach an echo app and get every
//!   echo; the flows count exactly what went each way.
//! * `many_flows_...`: 64 flows over 4 channels; each channel gets exactly its own ports'
//!   datagrams, and every frame is accounted for.
//! * `spoofs_never_reach_the_wire`: what an app may not send is dropped under its reason and
//!   never seen by a capture on the peer; the valid packet after them is.
//! * `malformed_frames_...`: raw frames from the peer (every truncation, bad lengths, bad
//!   checksums, options, fragments) are counted and never delivered; a valid one still is.
//! * `the_kernel_keeps_serving_...`: a separate nexus process; ICMP and other ports stay with
//!   the kernel while it runs, and its XDP program and port reservations go with it when it is
//!   killed.
//! * `ports_collide_both_ways_...`: the flow reservations and the host's sockets share one port
//!   space, per protocol and per family.
//! * `an_interface_deleted_...`: the nexus reports an interface deleted under it (status
//!   `interface_failed`), idle or not, and keeps its control socket and channels.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netchannel::nexus::{Channel, ChannelOptions, FlowProto, Nexus};
use netchannel::{Error, Interest, Packet};
use netchannel_nexus::datapath::Datapath;
use netchannel_nexus::flowswitch::NextHop;
use netchannel_nexus::netif::afxdp::{AfXdp, AfXdpOptions};
use netchannel_shm::control::{ErrorCode, NexusStatus};
use netchannel_tests::testbed::{Kid, VethNet, run, serial, skip_without_root};

const DAEMON: &str = env!("CARGO_BIN_EXE_nexus_daemon");

/// Bound for anything that should take milliseconds.
const SHORT: Duration = Duration::from_secs(10);

/// Test `n`'s network: its own slot of the bed, 8 + 8 × (pid mod 62) + `n`, so that the
/// tests of concurrent runs do not collide.
struct Net(VethNet);

impl std::ops::Deref for Net {
    type Target = VethNet;
    fn deref(&self) -> &VethNet {
        &self.0
    }
}

impl Net {
    fn new(n: u32) -> Self {
        let k = 8 + 8 * (std::process::id() % 62) + n;
        Self(VethNet::new("veth", k))
    }

    /// `ip netns exec NS python3 -c SCRIPT`, its output read line by line.
    fn python(&self, script: &str) -> Kid {
        self.0.exec("the python peer", "python3", &["-c", script])
    }

    /// Opens the host end over AF_XDP (XDP program attached) and builds its flowswitch.
    fn switch(&self) -> Datapath {
        let xsk = AfXdp::open(self.host(), AfXdpOptions::default()).expect("AF_XDP on the veth");
        let ifindex = xsk.ifindex();
        Datapath::on(
            Box::new(xsk),
            vec![IpAddr::V4(self.host4()), IpAddr::V6(self.host6())],
            NextHop::Kernel(ifindex),
        )
        .expect("a netlink socket")
    }
}

/// A nexus running in a thread of this process; stopped and joined on drop.
struct InProcess {
    socket: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl InProcess {
    fn start(net: &Net, tag: &str) -> Self {
        let socket = format!("/tmp/netchannel-afxdp-{}-{tag}.sock", std::process::id());
        let _ = std::fs::remove_file(&socket);
        let mut cfg = netchannel_nexus::Config::default();
        cfg.control.socket = socket.clone().into();
        let mut nexus =
            netchannel_nexus::Nexus::with_datapath(cfg, net.switch()).expect("a nexus on the veth");
        let stop = nexus.stop_flag();
        let thread = std::thread::spawn(move || nexus.run().expect("the nexus runs"));
        Self {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> Nexus {
        connect(&self.socket)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn connect(socket: &str) -> Nexus {
    let t0 = Instant::now();
    loop {
        match Nexus::connect(socket) {
            Ok(n) => return n,
            Err(e) if t0.elapsed() > SHORT => panic!("no nexus on {socket}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn counter(list: &[(String, u64)], name: &str) -> u64 {
    list.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
}

/// The interface's drop counters: its `rx_*` drop reasons.
fn rx_drops(st: &NexusStatus) -> BTreeMap<String, u64> {
    st.interface
        .iter()
        .filter(|(k, _)| {
            k.starts_with("rx_")
                && netchannel_nexus::flowswitch::DropReason::ALL
                    .iter()
                    .any(|r| r.name() == k)
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// `after - before` for each counter of `after`, zeros left out.
fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn channel_drops(st: &NexusStatus, ch: &Channel) -> BTreeMap<String, u64> {
    st.channels
        .iter()
        .find(|c| c.id == ch.id())
        .expect("the channel in the status")
        .drops
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Sends one IP packet on the channel.
fn send_ip(ch: &mut Channel, pkt: &[u8]) {
    let t0 = Instant::now();
    let buf = loop {
        if let Some(b) = ch.alloc() {
            break b;
        }
        assert!(t0.elapsed() < SHORT, "no buffer to send from");
        match ch.wait(Interest::Buffers, Some(Duration::from_millis(100))) {
            Ok(()) | Err(Error::TimedOut) => {}
            Err(e) => panic!("waiting for a buffer: {e}"),
        }
    };
    ch.buffer_mut(buf).expect("we hold the buffer")[..pkt.len()].copy_from_slice(pkt);
    let p = Packet {
        buf,
        offset: 0,
        len: pkt.len() as u32,
    };
    while ch.send(&[p]).expect("a valid send") == 0 {
        assert!(t0.elapsed() < SHORT, "the TX ring stays full");
        let _ = ch.wait(Interest::Writable, Some(Duration::from_millis(100)));
    }
}

/// The packets waiting on the channel (copied out; their buffers freed).
fn recv_now(ch: &mut Channel) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut out = Vec::new();
    loop {
        got.clear();
        if ch.recv(&mut got, 64).expect("recv") == 0 {
            return out;
        }
        out.extend(got.iter().map(|p| ch.payload(p).to_vec()));
        ch.free(got.iter().map(|p| p.buf)).expect("free");
    }
}

/// Waits up to `timeout` for packets on the channel and returns those that came.
fn recv_within(ch: &mut Channel, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = recv_now(ch);
        let left = deadline.saturating_duration_since(Instant::now());
        if !got.is_empty() || left.is_zero() {
            return got;
        }
        match ch.wait(
            Interest::Readable,
            Some(left.min(Duration::from_millis(50))),
        ) {
            Ok(()) | Err(Error::TimedOut) => {}
            Err(e) => panic!("waiting on the channel: {e}"),
        }
    }
}

/// A UDP datagram's (source, destination, payload), for IPv4 and IPv6 alike.
fn udp_of(pkt: &[u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    let s = etherparse::SlicedPacket::from_ip(pkt).ok()?;
    let (src, dst): (IpAddr, IpAddr) = match s.net? {
        etherparse::NetSlice::Ipv4(v4) => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        etherparse::NetSlice::Ipv6(v6) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
        etherparse::NetSlice::Arp(_) => return None,
    };
    let Some(etherparse::TransportSlice::Udp(u)) = s.transport else {
        return None;
    };
    Some((
        SocketAddr::new(src, u.source_port()),
        SocketAddr::new(dst, u.destination_port()),
        u.payload().to_vec(),
    ))
}

/// A UDP datagram from `src` to `dst` (checksums computed).
fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let b = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 64)
        }
        _ => panic!("mixed families"),
    };
    let mut out = Vec::new();
    b.udp(src.port(), dst.port())
        .write(&mut out, payload)
        .expect("a UDP packet");
    out
}

fn status(control: &mut Nexus) -> NexusStatus {
    control.status().expect("the nexus's status")
}

/// The nexus's status once `done` holds for it (or after `timeout`, whatever it is then):
/// counters are updated by the nexus's thread a moment after the packets move.
fn status_when(
    control: &mut Nexus,
    timeout: Duration,
    done: impl Fn(&NexusStatus) -> bool,
) -> NexusStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(control);
        if done(&st) || Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn skip() -> bool {
    skip_without_root("network namespace, veth pair, XDP and AF_XDP")
}

#[test]
fn udp_v4_and_v6_kernel_peers_reach_apps_over_afxdp() {
    if skip() {
        return;
    }
    let _serial = serial();
    const N: u32 = 20;
    let net = Net::new(1);
    let nexus = InProcess::start(&net, "udp");
    let mut control = nexus.connect();
    let mut ch = control.open_channel(ChannelOptions::default()).unwrap();
    let (f4, l4) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::new(net.host4().into(), 0),
            None,
        )
        .unwrap();
    let (f6, l6) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::new(net.host6().into(), 0),
            None,
        )
        .unwrap();
    assert_eq!(l4.ip(), IpAddr::V4(net.host4()));
    assert_eq!(l6.ip(), IpAddr::V6(net.host6()));

    // The kernel peer: N datagrams to each flow, one at a time, each waiting for its echo.
    let script = format!(
        "import socket\n\
         res = []\n\
         for fam, host, port in ((socket.AF_INET, '{h4}', {p4}), (socket.AF_INET6, '{h6}', {p6})):\n\
         \x20   s = socket.socket(fam, socket.SOCK_DGRAM)\n\
         \x20   s.settimeout(2)\n\
         \x20   ok = 0\n\
         \x20   for i in range({N}):\n\
         \x20       msg = b'echo %d %d' % (port, i)\n\
         \x20       s.sendto(msg, (host, port))\n\
         \x20       try:\n\
         \x20           data, addr = s.recvfrom(2048)\n\
         \x20       except socket.timeout:\n\
         \x20           continue\n\
         \x20       if data == msg and addr[0] == host and addr[1] == port:\n\
         \x20           ok += 1\n\
         \x20   res.append(str(ok))\n\
         print(' '.join(res))\n",
        h4 = net.host4(),
        p4 = l4.port(),
        h6 = net.host6(),
        p6 = l6.port(),
    );
    let mut peer = net.python(&script);

    // The app: echo every datagram back, addresses and ports swapped.
    let mut echoed = (0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer.exited().is_none() {
        assert!(Instant::now() < deadline, "the peer did not finish");
        for req in recv_within(&mut ch, Duration::from_millis(50)) {
            let (src, dst, payload) = udp_of(&req).expect("a UDP datagram");
            assert!(
                dst == l4 || dst == l6,
                "delivered to {dst}, not one of our flows"
            );
            let want_src = if dst.is_ipv4() {
                IpAddr::V4(net.peer4())
            } else {
                IpAddr::V6(net.peer6())
            };
            assert_eq!(src.ip(), want_src, "from the peer");
            send_ip(&mut ch, &udp_packet(dst, src, &payload));
            if dst.is_ipv4() {
                echoed.0 += 1;
            } else {
                echoed.1 += 1;
            }
        }
    }
    let lines = peer.succeed(SHORT);
    assert_eq!(
        lines,
        vec![format!("{N} {N}")],
        "echoes the peer got (v4 v6)"
    );
    assert_eq!(echoed, (N, N), "datagrams the app got (v4, v6)");

    let flows = control.flows().unwrap();
    let by_id = |id: u32| {
        flows
            .iter()
            .find(|f| f.id == id)
            .map(|f| (f.rx_packets, f.tx_packets))
            .expect("the flow is listed")
    };
    assert_eq!(by_id(f4), (u64::from(N), u64::from(N)), "IPv4 flow rx/tx");
    assert_eq!(by_id(f6), (u64::from(N), u64::from(N)), "IPv6 flow rx/tx");
    let st = status(&mut control);
    assert_eq!(counter(&st.interface, "rx_switched"), u64::from(2 * N));
    assert_eq!(counter(&st.interface, "tx_frames"), u64::from(2 * N));
    // Next hops were asked of the kernel, answered, and nothing was lost on the way.
    assert!(st.interface.iter().any(|(k, _)| k == "netlink_errors"));
    assert_eq!(counter(&st.interface, "netlink_unsent"), 0);
    assert_eq!(counter(&st.interface, "netlink_errors"), 0);
    assert_eq!(
        channel_drops(&st, &ch),
        BTreeMap::new(),
        "nothing dropped on the channel"
    );
}

#[test]
fn many_flows_across_many_channels_get_only_their_own_traffic() {
    if skip() {
        return;
    }
    let _serial = serial();
    const CHANNELS: usize = 4;
    const PER_CHANNEL: usize = 16;
    const ROUNDS: usize = 4;
    let net = Net::new(2);
    let nexus = InProcess::start(&net, "many");
    let mut control = nexus.connect();
    let mut chans: Vec<Channel> = (0..CHANNELS)
        .map(|_| control.open_channel(ChannelOptions::default()).unwrap())
        .collect();
    // ports[c] = the ports of channel c (chosen by the kernel), interleaved across channels.
    let mut ports: Vec<Vec<u16>> = vec![Vec::new(); CHANNELS];
    for i in 0..CHANNELS * PER_CHANNEL {
        let c = i % CHANNELS;
        let (_, local) = control
            .add_flow(
                &chans[c],
                FlowProto::Udp,
                SocketAddr::new(net.host4().into(), 0),
                None,
            )
            .unwrap();
        ports[c].push(local.port());
    }
    let all: Vec<u16> = (0..PER_CHANNEL)
        .flat_map(|i| ports.iter().map(move |p| p[i]))
        .collect();
    assert_eq!(control.flows().unwrap().len(), CHANNELS * PER_CHANNEL);
    let before = status(&mut control);

    let port_list = all.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         sent = 0\n\
         for r in range({ROUNDS}):\n\
         \x20   for port in ({port_list},):\n\
         \x20       s.sendto(b'for port %d round %d' % (port, r), ('{h}', port))\n\
         \x20       sent += 1\n\
         \x20   time.sleep(0.005)\n\
         print(sent)\n",
        h = net.host4(),
    );
    let peer = net.python(&script);
    let sent = peer.succeed(SHORT);
    let total = CHANNELS * PER_CHANNEL * ROUNDS;
    assert_eq!(sent, vec![total.to_string()], "datagrams the peer sent");

    // got[c][port] = rounds received on channel c for port.
    let mut got: Vec<BTreeMap<u16, Vec<usize>>> = vec![BTreeMap::new(); CHANNELS];
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while received < total && Instant::now() < deadline {
        let mut any = false;
        for (c, ch) in chans.iter_mut().enumerate() {
            for pkt in recv_now(ch) {
                any = true;
                received += 1;
                let (src, dst, payload) = udp_of(&pkt).expect("a UDP datagram");
                assert_eq!(src.ip(), IpAddr::V4(net.peer4()));
                assert_eq!(dst.ip(), IpAddr::V4(net.host4()));
                let text = String::from_utf8(payload).expect("text");
                let words: Vec<&str> = text.split(' ').collect();
                assert_eq!(
                    words[2],
                    dst.port().to_string(),
                    "payload names its port: {text}"
                );
                let round: usize = words[4].parse().expect("a round");
                got[c].entry(dst.port()).or_default().push(round);
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Anything late or extra would show up now.
    std::thread::sleep(Duration::from_millis(200));
    for ch in &mut chans {
        received += recv_now(ch).len();
    }
    for c in 0..CHANNELS {
        let want: BTreeMap<u16, Vec<usize>> = ports[c]
            .iter()
            .map(|&p| (p, (0..ROUNDS).collect()))
            .collect();
        assert_eq!(got[c], want, "channel {c} got exactly its own ports");
    }
    assert_eq!(received, total);

    // Accounting: every frame the peer sent reached the nexus and was delivered or counted.
    let after = status_when(&mut control, Duration::from_secs(2), |st| {
        counter(&st.interface, "rx_frames") - counter(&before.interface, "rx_frames")
            >= total as u64
    });
    let d = |name: &str| counter(&after.interface, name) - counter(&before.interface, name);
    let iface_drops: u64 = delta(&rx_drops(&after), &rx_drops(&before)).values().sum();
    let xsk_drops = d("xsk_rx_dropped") + d("xsk_rx_ring_full");
    let chan_rx_drops: u64 = chans
        .iter()
        .flat_map(|ch| channel_drops(&after, ch))
        .filter(|(k, _)| k.starts_with("rx_"))
        .map(|(_, v)| v)
        .sum();
    let delivered: u64 = chans
        .iter()
        .map(|ch| {
            after
                .channels
                .iter()
                .find(|c| c.id == ch.id())
                .expect("listed")
                .rx_packets
        })
        .sum();
    assert_eq!(
        delivered + iface_drops + xsk_drops + chan_rx_drops,
        total as u64,
        "delivered + drops == sent; interface: {:?}",
        after.interface
    );
    assert_eq!(d("rx_frames"), total as u64, "frames the nexus received");
    assert_eq!(
        d("rx_switched"),
        total as u64,
        "frames switched to channels"
    );
    assert_eq!(delivered, total as u64, "nothing dropped at this rate");
    for f in control.flows().unwrap() {
        assert_eq!(f.rx_packets, ROUNDS as u64, "flow {} on {}", f.id, f.local);
    }
}

#[test]
fn spoofs_never_reach_the_wire() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(3);
    let nexus = InProcess::start(&net, "spoof");
    let mut control = nexus.connect();
    let mut a = control.open_channel(ChannelOptions::default()).unwrap();
    let b = control.open_channel(ChannelOptions::default()).unwrap();
    let (fa, la) = control
        .add_flow(
            &a,
            FlowProto::Udp,
            SocketAddr::new(net.host4().into(), 0),
            None,
        )
        .unwrap();
    let (fb, lb) = control
        .add_flow(
            &b,
            FlowProto::Udp,
            SocketAddr::new(net.host4().into(), 0),
            None,
        )
        .unwrap();

    // The capture: every frame arriving at the peer end, from before the first spoof until a
    // second after the valid packet. The peer also sends A one datagram first (so the host's
    // kernel learns the peer's MAC from its ARP request) and keeps the socket the valid packet
    // is addressed to.
    let script = format!(
        "import socket, select, time\n\
         cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n\
         cap.bind(('{dev}', 0))\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         u.bind(('{p4}', 0))\n\
         print('PORT', u.getsockname()[1], flush=True)\n\
         u.sendto(b'hello A', ('{h4}', {pa}))\n\
         deadline = time.time() + 8\n\
         valid_at = None\n\
         while time.time() < deadline and (valid_at is None or time.time() < valid_at + 1.0):\n\
         \x20   r, _, _ = select.select([cap, u], [], [], 0.05)\n\
         \x20   if cap in r:\n\
         \x20       data, addr = cap.recvfrom(65535)\n\
         \x20       if addr[2] != socket.PACKET_OUTGOING:\n\
         \x20           print('FRAME', data.hex(), flush=True)\n\
         \x20   if u in r:\n\
         \x20       data, addr = u.recvfrom(2048)\n\
         \x20       print('UDP', addr[0], addr[1], data.decode(errors='replace'), flush=True)\n\
         \x20       if data == b'VALID-FROM-A':\n\
         \x20           valid_at = time.time()\n\
         print('DONE', flush=True)\n",
        dev = net.peer(),
        p4 = net.peer4(),
        h4 = net.host4(),
        pa = la.port(),
    );
    let peer = net.python(&script);
    let port_line = peer.line(SHORT).expect("the peer's port");
    let peer_port: u16 = port_line
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected {port_line:?}"));
    let peer_addr = SocketAddr::new(net.peer4().into(), peer_port);
    let hello = recv_within(&mut a, Duration::from_secs(5));
    assert_eq!(hello.len(), 1, "the peer's first datagram");
    assert_eq!(udp_of(&hello[0]).expect("UDP").2, b"hello A");

    let [o1, o2, o3, _] = net.host4().octets();
    let other_addr = SocketAddr::new(Ipv4Addr::new(o1, o2, o3, 77).into(), la.port());
    let mut other_port = la;
    other_port.set_port(if la.port() == 65_535 {
        1024
    } else {
        la.port() + 1
    });
    assert_ne!(
        other_port.port(),
        lb.port(),
        "pick another free-looking port"
    );
    let mut tcp = Vec::new();
    etherparse::PacketBuilder::ipv4(net.host4().octets(), net.peer4().octets(), 64)
        .tcp(la.port(), peer_port, 1, 4096)
        .write(&mut tcp, b"SPOOF-TCP")
        .unwrap();
    // An ARP reply claiming the peer's address for a made-up MAC, Ethernet header and all, and
    // the same ARP body on its own: neither is an IP packet.
    let fake_mac = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];
    let mut arp_body = vec![0, 1, 8, 0, 6, 4, 0, 2];
    arp_body.extend_from_slice(&fake_mac);
    arp_body.extend_from_slice(&net.peer4().octets());
    arp_body.extend_from_slice(&net.peer_mac());
    arp_body.extend_from_slice(&net.peer4().octets());
    let mut arp_frame = net.peer_mac().to_vec();
    arp_frame.extend_from_slice(&fake_mac);
    arp_frame.extend_from_slice(&[0x08, 0x06]);
    arp_frame.extend_from_slice(&arp_body);
    let spoofs: Vec<(&str, Vec<u8>)> = vec![
        (
            "another source port",
            udp_packet(other_port, peer_addr, b"SPOOF-SPORT"),
        ),
        (
            "another source address",
            udp_packet(other_addr, peer_addr, b"SPOOF-SADDR"),
        ),
        ("TCP on a UDP flow", tcp),
        ("B's flow", udp_packet(lb, peer_addr, b"SPOOF-NOTOWNER")),
        ("an ARP reply frame", arp_frame),
        ("a bare ARP reply", arp_body.clone()),
    ];
    for (_, pkt) in &spoofs {
        send_ip(&mut a, pkt);
    }
    send_ip(&mut a, &udp_packet(la, peer_addr, b"VALID-FROM-A"));

    let lines = peer.succeed(SHORT);
    assert_eq!(lines.last().map(String::as_str), Some("DONE"), "{lines:?}");
    let udp: Vec<&String> = lines.iter().filter(|l| l.starts_with("UDP ")).collect();
    assert_eq!(
        udp,
        vec![&format!("UDP {} {} VALID-FROM-A", net.host4(), la.port())],
        "the peer's socket got the valid packet only"
    );
    let frames: Vec<Vec<u8>> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FRAME "))
        .map(|h| {
            (0..h.len() / 2)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("hex"))
                .collect()
        })
        .collect();
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let valid: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| contains(f, b"VALID-FROM-A"))
        .collect();
    assert_eq!(valid.len(), 1, "the capture saw the valid packet once");
    assert_eq!(&valid[0][..6], &net.peer_mac(), "to the peer's MAC");
    assert_eq!(&valid[0][6..12], &net.host_mac(), "from the host end's MAC");
    for f in &frames {
        for marker in [
            &b"SPOOF-SPORT"[..],
            b"SPOOF-SADDR",
            b"SPOOF-TCP",
            b"SPOOF-NOTOWNER",
            &fake_mac,
            &arp_body[8..18],
        ] {
            assert!(!contains(f, marker), "a spoof reached the wire: {f:02x?}");
        }
    }

    let st = status_when(&mut control, Duration::from_secs(2), |st| {
        channel_drops(st, &a).values().sum::<u64>() >= spoofs.len() as u64
    });
    let drops = channel_drops(&st, &a);
    let want: BTreeMap<String, u64> = [
        ("tx_no_flow", 2), // another source port; TCP from a port only UDP is claimed on
        ("tx_spoofed_address", 1),
        ("tx_not_owner", 1),
        ("tx_bad_header", 2), // neither ARP starts with an IP version
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(drops, want, "channel A's drops, by reason");
    assert_eq!(channel_drops(&st, &b), BTreeMap::new(), "B dropped nothing");
    let flows = control.flows().unwrap();
    let tx = |id| {
        flows
            .iter()
            .find(|f| f.id == id)
            .expect("listed")
            .tx_packets
    };
    assert_eq!((tx(fa), tx(fb)), (1, 0), "only A's valid packet was sent");
    assert_eq!(
        counter(&st.interface, "tx_frames"),
        1,
        "one frame on the wire"
    );
}

/// An IPv4 header checksum, computed over `hdr` with its checksum field taken as zero.
fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum = 0u32;
    for (i, c) in hdr.chunks(2).enumerate() {
        if i != 5 {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Rewrites the IPv4 header checksum of an Ethernet frame after a header change.
fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let c = ipv4_checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Whether the XDP program steers this frame to the nexus (claimed: the destination address
/// and port of UDP to `udp` or TCP to `tcp`), as crates/nexus/src/netif/xdp/program.rs does:
/// Ethernet, IPv4 with its fixed header present, not a non-first fragment, UDP or TCP, and the
/// first four bytes of the L4 header (the ports) present.
fn xdp_steers(frame: &[u8], host: Ipv4Addr, udp: u16, tcp: u16) -> bool {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let frag = u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff;
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if frag != 0 || ihl < 20 || frame.len() < 14 + ihl + 4 || frame[30..34] != host.octets() {
        return false;
    }
    let dport = u16::from_be_bytes([frame[14 + ihl + 2], frame[14 + ihl + 3]]);
    match frame[23] {
        17 => dport == udp,
        6 => dport == tcp,
        _ => false,
    }
}

/// Sends raw frames from the peer end (AF_PACKET), 2 ms apart; returns per frame whether the
/// kernel took it (it refuses frames shorter than an Ethernet header).
fn send_frames(net: &Net, frames: &[Vec<u8>]) -> Vec<bool> {
    let list = frames
        .iter()
        .map(|f| {
            let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
            format!("'{hex}'")
        })
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
         s.bind(('{dev}', 0))\n\
         res = []\n\
         for h in [{list}]:\n\
         \x20   f = bytes.fromhex(h)\n\
         \x20   try:\n\
         \x20       res.append('ok' if s.send(f) == len(f) else 'short')\n\
         \x20   except OSError as e:\n\
         \x20       res.append('E%d' % e.errno)\n\
         \x20   time.sleep(0.002)\n\
         print(' '.join(res))\n",
        dev = net.peer(),
    );
    let lines = net.python(&script).succeed(SHORT);
    let res: Vec<bool> = lines
        .first()
        .expect("the send results")
        .split(' ')
        .map(|r| r == "ok")
        .collect();
    assert_eq!(res.len(), frames.len(), "a result per frame: {lines:?}");
    res
}

#[test]
fn malformed_frames_from_the_peer_are_counted_and_never_delivered() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(4);
    let nexus = InProcess::start(&net, "malformed");
    let mut control = nexus.connect();
    let mut ch = control.open_channel(ChannelOptions::default()).unwrap();
    let (_, lu) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::new(net.host4().into(), 0),
            None,
        )
        .unwrap();
    let (_, lt) = control
        .add_flow(
            &ch,
            FlowProto::Tcp,
            SocketAddr::new(net.host4().into(), 0),
            None,
        )
        .unwrap();
    let eth = || etherparse::PacketBuilder::ethernet2(net.peer_mac(), net.host_mac());
    let udp_frame = |payload: &[u8]| {
        let mut f = Vec::new();
        eth()
            .ipv4(net.peer4().octets(), net.host4().octets(), 64)
            .udp(40_000, lu.port())
            .write(&mut f, payload)
            .unwrap();
        f
    };
    let good = udp_frame(b"a well-formed datagram");
    let mut tcp_good = Vec::new();
    eth()
        .ipv4(net.peer4().octets(), net.host4().octets(), 64)
        .tcp(40_001, lt.port(), 7, 4096)
        .write(&mut tcp_good, b"a TCP segment")
        .unwrap();

    // (what, frame): every one is malformed and must not be delivered.
    let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in 0..good.len() {
        bad.push((format!("UDP cut at {cut}"), good[..cut].to_vec()));
    }
    for cut in 0..tcp_good.len() {
        bad.push((format!("TCP cut at {cut}"), tcp_good[..cut].to_vec()));
    }
    let ip_len = good.len() - 14;
    let mut set_total = |what: &str, total: usize| {
        let mut f = good.clone();
        f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        fix_ip_checksum(&mut f);
        bad.push((what.to_owned(), f));
    };
    set_total("IP total length past the frame", ip_len + 10);
    set_total("IP total length inside the UDP payload", ip_len - 6);
    set_total("IP total length inside the UDP header", 20 + 4);
    set_total("IP total length shorter than its header", 12);
    let udp_len = ip_len - 20;
    for (what, len) in [
        ("UDP length past the IP payload", udp_len + 4),
        ("UDP length shorter than the IP payload", udp_len - 4),
        ("UDP length shorter than its header", 4),
    ] {
        let mut f = good.clone();
        f[38..40].copy_from_slice(&(len as u16).to_be_bytes());
        bad.push((what.to_owned(), f));
    }
    let mut f = good.clone();
    f[40] ^= 0x5a;
    bad.push(("bad UDP checksum".into(), f));
    let mut f = good.clone();
    f[24] ^= 0x5a;
    bad.push(("bad IPv4 header checksum".into(), f));
    // IPv4 with a malformed 4-byte option (its length, 9, runs past the header): IHL 6,
    // lengths and checksums right. (Well-formed options are accepted: `fragments` tests.)
    let mut f = good[..34].to_vec();
    f.extend_from_slice(&[7, 9, 0, 0]);
    f.extend_from_slice(&good[34..]);
    f[14] = 0x46;
    let total = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut f);
    bad.push(("IPv4 with options".into(), f));
    // A first fragment (more fragments, offset 0) whose 30 bytes of data are not a multiple
    // of 8 (a malformed fragment), and a non-first one (offset 8 bytes) whose first fragment
    // never came, each with its own IP id and a right header checksum.
    for (what, flags_offset, id) in [
        ("first fragment", 0x2000u16, 0x1111u16),
        ("non-first fragment", 0x0001, 0x2222),
    ] {
        let mut f = good.clone();
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20..22].copy_from_slice(&flags_offset.to_be_bytes());
        fix_ip_checksum(&mut f);
        bad.push((what.to_owned(), f));
    }

    // Well formed, for the app's flow, but to another host's MAC (PACKET_OTHERHOST).
    let mut f = good.clone();
    f[..6].copy_from_slice(&[0x02, 0x77, 0x77, 0x77, 0x77, 0x77]);
    bad.push(("another host's MAC".into(), f));

    let before = status(&mut control);
    let mut frames: Vec<Vec<u8>> = bad.iter().map(|(_, f)| f.clone()).collect();
    frames.push(good.clone());
    let sent = send_frames(&net, &frames);
    assert!(sent[frames.len() - 1], "the valid frame was sent");
    // Which frames reach the nexus: the XDP program passes to the kernel every frame too short
    // to hold the IPv4 header and the ports (under 38 bytes here: truncations at 0..38, of
    // which 0..14 the kernel does not even send), and the non-first fragment (it carries no
    // ports, and no first fragment of its datagram was steered); the kernel drops those
    // itself (bad lengths, or a reassembly that never completes). Everything else is steered
    // and must be counted.
    let steered: Vec<&str> = bad
        .iter()
        .zip(&sent)
        .filter(|((_, f), ok)| **ok && xdp_steers(f, net.host4(), lu.port(), lt.port()))
        .map(|((w, _), _)| w.as_str())
        .collect();
    let passed: Vec<&str> = bad
        .iter()
        .zip(&sent)
        .filter(|((_, f), ok)| **ok && !xdp_steers(f, net.host4(), lu.port(), lt.port()))
        .map(|((w, _), _)| w.as_str())
        .collect();
    assert!(passed.contains(&"non-first fragment"));
    assert!(passed.contains(&"UDP cut at 37"));
    assert!(steered.contains(&"UDP cut at 38") && steered.contains(&"first fragment"));
    let steered_n = steered.len() as u64;

    // The app gets the valid datagram, and only it.
    let mut got = recv_within(&mut ch, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    got.extend(recv_now(&mut ch));
    let named: Vec<String> = got
        .iter()
        .map(|p| {
            bad.iter()
                .find(|(_, f)| f.get(14..) == Some(p.as_slice()))
                .map_or_else(|| format!("{} bytes", p.len()), |(w, _)| w.clone())
        })
        .collect();
    assert_eq!(got.len(), 1, "delivered: {named:?}");
    assert_eq!(got[0], good[14..], "the valid datagram, as sent");

    // The nexus is still up, and counted every malformed frame that reached it.
    let after = status_when(&mut control, Duration::from_secs(2), |st| {
        counter(&st.interface, "rx_frames") - counter(&before.interface, "rx_frames") > steered_n
    });
    let d = |name: &str| counter(&after.interface, name) - counter(&before.interface, name);
    let drops = delta(&rx_drops(&after), &rx_drops(&before));
    eprintln!(
        "{} malformed frames sent, {steered_n} steered to the nexus, drops {drops:?}",
        sent.iter().filter(|s| **s).count() - 1
    );
    assert_eq!(
        d("rx_frames"),
        steered_n + 1,
        "frames that reached the nexus"
    );
    assert_eq!(d("rx_switched"), 1, "frames switched");
    assert_eq!(
        drops.values().sum::<u64>(),
        steered_n,
        "every malformed frame that reached the nexus is counted once: {drops:?}"
    );
    for reason in [
        "rx_ip_options",
        "rx_frag_malformed",
        "rx_bad_l3_checksum",
        "rx_other_host",
        "rx_no_flow",
    ] {
        let want = u64::from(reason != "rx_no_flow");
        assert_eq!(drops.get(reason).copied().unwrap_or(0), want, "{reason}");
    }
    assert!(drops.get("rx_bad_l4_checksum").copied().unwrap_or(0) >= 1);
    let steered_cuts = steered.iter().filter(|w| w.contains(" cut at ")).count() as u64;
    assert!(
        drops.get("rx_truncated").copied().unwrap_or(0) >= steered_cuts,
        "every steered truncation is counted as truncated: {drops:?}"
    );
}

/// Whether `ip -d link show DEV` shows an XDP program (`xdp`/`xdpgeneric`/... as the mode,
/// `prog/xdp id N` with `-d`).
fn xdp_attached(dev: &str) -> bool {
    let out = run("ip", &["-d", "link", "show", dev]);
    assert!(out.status.success(), "ip link show {dev}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w.starts_with("prog/xdp") || w.starts_with("xdp"))
}

/// Pings `to` 3 times from the namespace, with `ping` if the system has it, else with an ICMP
/// echo written in python (a raw socket, as ping does). True if all 3 were answered.
fn ping_from(net: &Net, to: Ipv4Addr) -> bool {
    let has_ping = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("ping").is_file()));
    if has_ping {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                net.ns().name(),
                "ping",
                "-c",
                "3",
                "-W",
                "1",
                &to.to_string(),
            ],
        );
        return out.status.success();
    }
    let script = format!(
        "import socket, struct, time, os\n\
         def csum(b):\n\
         \x20   s = sum(struct.unpack('!%dH' % (len(b) // 2), b))\n\
         \x20   s = (s >> 16) + (s & 0xffff)\n\
         \x20   s += s >> 16\n\
         \x20   return ~s & 0xffff\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n\
         s.settimeout(0.2)\n\
         ident = os.getpid() & 0xffff\n\
         ok = 0\n\
         for seq in range(3):\n\
         \x20   body = b'netchannel-ping!'\n\
         \x20   c = csum(struct.pack('!BBHHH', 8, 0, 0, ident, seq) + body)\n\
         \x20   s.sendto(struct.pack('!BBHHH', 8, 0, c, ident, seq) + body, ('{to}', 0))\n\
         \x20   end = time.time() + 1\n\
         \x20   while time.time() < end:\n\
         \x20       try:\n\
         \x20           data = s.recv(2048)\n\
         \x20       except socket.timeout:\n\
         \x20           continue\n\
         \x20       ihl = (data[0] & 15) * 4\n\
         \x20       t, _, _, i, sq = struct.unpack('!BBHHH', data[ihl:ihl + 8])\n\
         \x20       if t == 0 and i == ident and sq == seq:\n\
         \x20           ok += 1\n\
         \x20           break\n\
         print(ok)\n"
    );
    let (st, lines, err) = net.python(&script).finish(SHORT);
    assert!(st.success(), "the python ping failed: {err}");
    lines == ["3"]
}

#[test]
fn the_kernel_keeps_serving_icmp_and_other_ports_and_xdp_goes_with_a_killed_nexus() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(5);
    let pid = std::process::id();
    let socket = format!("/tmp/netchannel-afxdp-{pid}-daemon.sock");
    let config = format!("/tmp/netchannel-afxdp-{pid}-daemon.toml");
    struct Files(Vec<String>);
    impl Drop for Files {
        fn drop(&mut self) {
            for f in &self.0 {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    let _files = Files(vec![socket.clone(), config.clone()]);
    std::fs::write(
        &config,
        format!(
            "[interface]\nname = \"{}\"\nbackend = \"afxdp\"\n",
            net.host()
        ),
    )
    .unwrap();
    assert!(!xdp_attached(net.host()), "no XDP program before the nexus");
    let mut daemon = Kid::spawn(
        Command::new(DAEMON).args([&socket, &config]),
        "nexus_daemon",
    );
    let t0 = Instant::now();
    let mut control = loop {
        if let Ok(n) = Nexus::connect(&socket) {
            break n;
        }
        if daemon.exited().is_some() || t0.elapsed() > SHORT {
            let (st, _, err) = daemon.finish(Duration::ZERO);
            panic!("nexus_daemon did not come up ({st}): {err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ch = control.open_channel(ChannelOptions::default()).unwrap();
    let (_, claimed) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::new(net.host4().into(), 0),
            None,
        )
        .unwrap();
    assert!(
        xdp_attached(net.host()),
        "the nexus's XDP program is attached"
    );
    assert_ne!(
        status(&mut control).pid,
        pid,
        "the nexus is another process"
    );

    // ICMP stays with the kernel.
    assert!(ping_from(&net, net.host4()), "the host answers pings");

    // So does every port no flow claims: a kernel socket of this process answers the peer.
    let host_sock = UdpSocket::bind((net.host4(), 0)).unwrap();
    host_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(5)\n\
         s.sendto(b'to the kernel', ('{h}', {p}))\n\
         data, addr = s.recvfrom(2048)\n\
         print(data.decode(), addr[0], addr[1])\n",
        h = net.host4(),
        p = host_sock.local_addr().unwrap().port(),
    );
    let peer = net.python(&script);
    let mut buf = [0u8; 2048];
    let (n, from) = host_sock.recv_from(&mut buf).expect("the peer's datagram");
    assert_eq!(&buf[..n], b"to the kernel");
    assert_eq!(from.ip(), IpAddr::V4(net.peer4()));
    host_sock.send_to(b"from the kernel", from).unwrap();
    assert_eq!(
        peer.succeed(SHORT),
        vec![format!(
            "from the kernel {} {}",
            net.host4(),
            host_sock.local_addr().unwrap().port()
        )]
    );
    let st = status(&mut control);
    assert_eq!(
        counter(&st.interface, "rx_frames"),
        0,
        "neither ICMP nor the other port went to the nexus: {:?}",
        st.interface
    );

    // kill -9: the BPF link dies with the process, and so do its port reservations.
    daemon.kill();
    let t0 = Instant::now();
    while xdp_attached(net.host()) {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the XDP program outlived the nexus by 2 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("XDP gone {:?} after the kill", t0.elapsed());
    let taken = UdpSocket::bind(claimed).expect("the claimed port is free again");
    taken
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // And the kernel now gets that port's traffic.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.sendto(b'after the nexus', ('{h}', {p}))\n",
        h = net.host4(),
        p = claimed.port(),
    );
    net.python(&script).succeed(SHORT);
    let (n, _) = taken.recv_from(&mut buf).expect("the kernel got the port");
    assert_eq!(&buf[..n], b"after the nexus");
    drop(ch);
}

fn refused_in_use(r: Result<(u32, SocketAddr), Error>, port: u16) -> String {
    match r {
        Err(Error::Refused {
            code: ErrorCode::InUse,
            message,
        }) => {
            assert!(
                message.contains(&format!(":{port}")),
                "the message names the port {port}: {message}"
            );
            message
        }
        other => panic!("expected a refusal (in use), got {other:?}"),
    }
}

#[test]
fn ports_collide_both_ways_with_the_host_stack() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(6);
    let nexus = InProcess::start(&net, "ports");
    let mut control = nexus.connect();
    let ch = control.open_channel(ChannelOptions::default()).unwrap();
    let me = std::process::id();
    let v4 = |port| SocketAddr::new(net.host4().into(), port);
    let v6 = |port| SocketAddr::new(net.host6().into(), port);

    // The host first: the app is refused, told the port and who holds it.
    let host = UdpSocket::bind(v4(0)).unwrap();
    let p = host.local_addr().unwrap().port();
    let msg = refused_in_use(control.add_flow(&ch, FlowProto::Udp, v4(p), None), p);
    assert!(
        msg.contains(&format!("[{me}]")),
        "the holder (this process) is named: {msg}"
    );
    drop(host);
    let (f, _) = control
        .add_flow(&ch, FlowProto::Udp, v4(p), None)
        .expect("free once the host socket is closed");
    control.remove_flow(f).unwrap();

    // The app first: the host cannot bind the port, on that address or the wildcard.
    let (f, held) = control.add_flow(&ch, FlowProto::Udp, v4(0), None).unwrap();
    let e = UdpSocket::bind(held).expect_err("the app holds it");
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    let e = UdpSocket::bind(("0.0.0.0", held.port())).expect_err("the wildcard overlaps");
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    // Other protocol, other family: no clash.
    let tcp = TcpListener::bind(held).expect("TCP on the app's UDP port");
    let udp6 = UdpSocket::bind(v6(held.port())).expect("IPv6 on the app's IPv4 port");
    drop((tcp, udp6));
    control.remove_flow(f).unwrap();
    UdpSocket::bind(held).expect("released with the flow");

    // The host on the wildcard, the app on a specific address: refused.
    let wild = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
    let w = wild.local_addr().unwrap().port();
    refused_in_use(control.add_flow(&ch, FlowProto::Udp, v4(w), None), w);
    // The app on the wildcard, the host on a specific address: refused too.
    let (f, any) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            None,
        )
        .unwrap();
    let e = UdpSocket::bind(v4(any.port())).expect_err("the app's wildcard covers it");
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    control.remove_flow(f).unwrap();

    // TCP against UDP, both orders: both succeed.
    let host_udp = UdpSocket::bind(v4(0)).unwrap();
    let q = host_udp.local_addr().unwrap().port();
    control
        .add_flow(&ch, FlowProto::Tcp, v4(q), None)
        .expect("a TCP flow on the host's UDP port");
    let host_tcp = TcpListener::bind(v4(0)).unwrap();
    let t = host_tcp.local_addr().unwrap().port();
    control
        .add_flow(&ch, FlowProto::Udp, v4(t), None)
        .expect("a UDP flow on the host's TCP port");
    // ... but TCP against TCP clashes.
    refused_in_use(control.add_flow(&ch, FlowProto::Tcp, v4(t), None), t);

    // IPv4 against IPv6, both orders: both succeed.
    let host4 = UdpSocket::bind(v4(0)).unwrap();
    let r = host4.local_addr().unwrap().port();
    control
        .add_flow(&ch, FlowProto::Udp, v6(r), None)
        .expect("an IPv6 flow on the host's IPv4 port");
    let host6 = UdpSocket::bind(v6(0)).unwrap();
    let s = host6.local_addr().unwrap().port();
    control
        .add_flow(&ch, FlowProto::Udp, v4(s), None)
        .expect("an IPv4 flow on the host's IPv6 port");
    refused_in_use(control.add_flow(&ch, FlowProto::Udp, v6(s), None), s);
    drop((host_udp, host_tcp, host4, host6, wild));
}

/// The UDP checksum of an IPv4 Ethernet frame's datagram, over the pseudo-header (with the UDP
/// length field as the length) and the first `length` bytes of the datagram.
fn udp4_checksum(frame: &[u8]) -> u16 {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let l4 = &frame[14 + ihl..];
    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
    let mut sum = 17u32 + len as u32;
    let words = |b: &[u8]| -> u32 {
        b.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    };
    sum += words(&frame[26..34]);
    let mut dgram = l4[..len].to_vec();
    dgram[6] = 0;
    dgram[7] = 0;
    sum += words(&dgram);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// Regression: a datagram whose UDP length is shorter than the IP payload (4 bytes of trailer
/// after it), its checksum right for the UDP length, is refused as `bad_header`. (The check
/// once compared against a slice etherparse had already cut to the UDP length, and never
/// fired.)
#[test]
fn regression_a_udp_length_shorter_than_its_ip_payload_is_refused() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(7);
    let nexus = InProcess::start(&net, "udplen");
    let mut control = nexus.connect();
    let mut ch = control.open_channel(ChannelOptions::default()).unwrap();
    let (_, lu) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::new(net.host4().into(), 0),
            None,
        )
        .unwrap();
    let mut good = Vec::new();
    etherparse::PacketBuilder::ethernet2(net.peer_mac(), net.host_mac())
        .ipv4(net.peer4().octets(), net.host4().octets(), 64)
        .udp(40_000, lu.port())
        .write(&mut good, b"datagram+TRLR")
        .unwrap();
    assert_eq!(
        udp4_checksum(&good),
        u16::from_be_bytes([good[40], good[41]])
    );
    let mut short = good.clone();
    let udp_len = (good.len() - 34 - 4) as u16;
    short[38..40].copy_from_slice(&udp_len.to_be_bytes());
    let c = udp4_checksum(&short);
    short[40..42].copy_from_slice(&c.to_be_bytes());
    let before = status(&mut control);
    let sent = send_frames(&net, &[short.clone(), good.clone()]);
    assert_eq!(sent, [true, true]);
    let mut got = recv_within(&mut ch, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    got.extend(recv_now(&mut ch));
    let after = status_when(&mut control, Duration::from_secs(2), |st| {
        counter(&st.interface, "rx_frames") - counter(&before.interface, "rx_frames") >= 2
    });
    let drops = delta(&rx_drops(&after), &rx_drops(&before));
    assert!(
        !got.iter().any(|p| p[..] == short[14..]),
        "the datagram with the short UDP length was delivered; drops {drops:?}"
    );
    assert_eq!(got, vec![good[14..].to_vec()], "the valid datagram only");
    assert_eq!(drops.get("rx_bad_header"), Some(&1), "{drops:?}");
}

#[test]
fn an_interface_deleted_under_the_nexus_is_reported() {
    if skip() {
        return;
    }
    let _serial = serial();
    // Test 7's slot: the tests run one at a time, and each removes its bed.
    let net = Net::new(7);
    let nexus = InProcess::start(&net, "gone");
    let mut control = nexus.connect();
    let mut ch = control.open_channel(ChannelOptions::default()).unwrap();
    let (_, local) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::new(IpAddr::V4(net.host4()), 0),
            None,
        )
        .unwrap();
    let peer = SocketAddr::new(IpAddr::V4(net.peer4()), 9);
    // One packet while the interface is there (the peer's address gets resolved).
    send_ip(&mut ch, &udp_packet(local, peer, b"before"));
    let st = status_when(&mut control, SHORT, |st| {
        counter(&st.interface, "tx_frames") >= 1
    });
    assert_eq!(counter(&st.interface, "interface_failed"), 0);
    let out = run("ip", &["link", "del", net.host()]);
    assert!(out.status.success(), "ip link del: {out:?}");
    // Nothing is sent from now on: the nexus must notice by itself.
    let st = status_when(&mut control, SHORT, |st| {
        counter(&st.interface, "interface_failed") == 1
    });
    assert_eq!(
        counter(&st.interface, "interface_failed"),
        1,
        "{:?}",
        st.interface
    );
    // Still serving: the channel and the control socket.
    assert_eq!(control.flows().unwrap().len(), 1);
    assert!(matches!(
        ch.wait(Interest::Readable, Some(Duration::from_millis(20))),
        Ok(()) | Err(Error::TimedOut)
    ));
}
