//! A nexus on a TAP device, a kernel UDP peer in its own network namespace on the other side
//! of it (198.18.0.0/15 only), and an app on a channel answering it. Needs root; without root
//! the test says it skipped.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netchannel::nexus::{ChannelOptions, FlowProto, Nexus};
use netchannel::{Interest, Packet};
use netchannel_nexus::datapath::Datapath;
use netchannel_nexus::flowswitch::NextHop;
use netchannel_nexus::netif::tap::Tap;
use netchannel_testbed::{Netns, is_root};

const NEXUS_MAC: [u8; 6] = [2, 0x4e, 0x43, 0, 0, 1];

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("the ip command (iproute2)");
    assert!(st.success(), "ip {args:?} failed");
}

#[test]
fn a_kernel_peer_in_a_namespace_talks_udp_to_an_app_through_a_tap() {
    exchange_through_tap(false);
}

#[test]
fn a_kernel_peer_talks_udp_over_ipv6_to_an_app_through_a_tap() {
    exchange_through_tap(true);
}

/// The peer resolves the nexus (ARP, or neighbour discovery for IPv6), sends a datagram, and
/// gets the app's answer back.
fn exchange_through_tap(v6: bool) {
    if !is_root() {
        eprintln!("SKIPPED: needs root (TAP device and network namespace)");
        return;
    }
    let pid = std::process::id();
    let fam = u8::from(v6);
    // Deleted (with the TAP in it) however the test ends.
    let ns = Netns::new(&format!("tap{fam}")).expect("a network namespace");
    let tap = Tap::create(&format!("nct{fam}{}", pid % 100_000), NEXUS_MAC).expect("a TAP device");
    let dev = tap.name().to_owned();
    ip(&["link", "set", &dev, "netns", ns.name()]);
    let nsx = |args: &[&str]| {
        ns.ip(args).expect("ip in the namespace");
    };
    let (us, peer_ip) = if v6 {
        nsx(&["addr", "add", "fd00:198:18::2/64", "dev", &dev, "nodad"]);
        ("fd00:198:18::1", "fd00:198:18::2")
    } else {
        nsx(&["addr", "add", "198.18.0.2/24", "dev", &dev]);
        ("198.18.0.1", "198.18.0.2")
    };
    nsx(&["link", "set", &dev, "up"]);
    // No static neighbour: the peer must resolve the nexus, and the nexus must answer.
    let socket = format!("/tmp/netchannel-tap{fam}-{pid}.sock");
    let mut cfg = netchannel_nexus::Config::default();
    cfg.control.socket = socket.clone().into();
    let sw = Datapath::on(
        Box::new(tap),
        vec![us.parse().expect("TAP exchange")],
        NextHop::Arp,
    )
    .expect("a datapath");
    let mut nexus = netchannel_nexus::Nexus::with_datapath(cfg, sw).expect("TAP exchange");
    let stop = nexus.stop_flag();
    let daemon = std::thread::spawn(move || nexus.run().expect("TAP exchange"));
    let t0 = Instant::now();
    while Nexus::connect(&socket).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut control = Nexus::connect(&socket).expect("TAP exchange");
    let mut ch = control
        .open_channel(ChannelOptions::default())
        .expect("TAP exchange");
    let any = if v6 { "[::]:0" } else { "0.0.0.0:0" };
    let (_, local) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            any.parse().expect("TAP exchange"),
            None,
        )
        .expect("TAP exchange");

    // The kernel peer: send a datagram to the app, print the answer.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.{}, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.sendto(b'ping from the kernel', ('{us}', {}))\n\
         data, addr = s.recvfrom(2048)\n\
         print(data.decode(), addr[0], addr[1])\n",
        if v6 { "AF_INET6" } else { "AF_INET" },
        local.port()
    );
    let peer = ns
        .command("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 in the namespace");

    // The app: answer the first datagram, echoing its payload with a suffix.
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no datagram from the kernel peer"
        );
        let _ = ch.wait(Interest::Readable, Some(Duration::from_millis(100)));
        ch.recv(&mut got, 8).expect("TAP exchange");
    }
    let req = ch.payload(&got[0]).to_vec();
    ch.free(got.iter().map(|p| p.buf)).expect("TAP exchange");
    let sliced = etherparse::SlicedPacket::from_ip(&req).expect("TAP exchange");
    let Some(etherparse::TransportSlice::Udp(u)) = sliced.transport else {
        panic!("not UDP")
    };
    assert_eq!(u.payload(), b"ping from the kernel");
    let mut reply = Vec::new();
    let builder = match (
        us.parse().expect("TAP exchange"),
        peer_ip.parse().expect("TAP exchange"),
    ) {
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
            etherparse::PacketBuilder::ipv6(a.octets(), b.octets(), 64)
        }
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            etherparse::PacketBuilder::ipv4(a.octets(), b.octets(), 64)
        }
        _ => unreachable!("one family"),
    };
    builder
        .udp(local.port(), u.source_port())
        .write(&mut reply, b"pong from the app")
        .expect("TAP exchange");
    let buf = loop {
        if let Some(b) = ch.alloc() {
            break b;
        }
        ch.wait(Interest::Buffers, Some(Duration::from_secs(1)))
            .expect("TAP exchange");
    };
    ch.buffer_mut(buf).expect("TAP exchange")[..reply.len()].copy_from_slice(&reply);
    ch.send(&[Packet {
        buf,
        offset: 0,
        len: reply.len() as u32,
    }])
    .expect("TAP exchange");

    let out = peer.wait_with_output().expect("TAP exchange");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.trim(),
        format!("pong from the app {us} {}", local.port())
    );

    let flows = control.flows().expect("TAP exchange");
    assert_eq!((flows[0].rx_packets, flows[0].tx_packets), (1, 1));
    let st = control.status().expect("TAP exchange");
    let resolver = if v6 { "rx_ndp" } else { "rx_arp" };
    let seen = st
        .interface
        .iter()
        .find(|(k, _)| k == resolver)
        .map_or(0, |(_, v)| *v);
    assert!(
        seen >= 1,
        "the peer resolved us ({resolver}): {:?}",
        st.interface
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    daemon.join().expect("TAP exchange");
    let _ = std::fs::remove_file(&socket);
}

/// CPU time (clock ticks, user and system) of thread `tid` of this process.
fn thread_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .expect("the thread's /proc stat");
    // Fields after the parenthesised name: state is the 3rd field, utime the 14th, stime 15th.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn a_tap_deleted_under_the_nexus_is_reported_and_does_not_spin_it() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (TAP device)");
        return;
    }
    let pid = std::process::id();
    let tap = Tap::create(&format!("nctd{}", pid % 100_000), NEXUS_MAC).expect("a TAP device");
    let dev = tap.name().to_owned();
    let socket = format!("/tmp/netchannel-tapdel-{pid}.sock");
    let mut cfg = netchannel_nexus::Config::default();
    cfg.control.socket = socket.clone().into();
    let sw = Datapath::on(
        Box::new(tap),
        vec!["198.18.0.1".parse().expect("an address")],
        NextHop::Arp,
    )
    .expect("a datapath");
    let mut nexus = netchannel_nexus::Nexus::with_datapath(cfg, sw).expect("a nexus on the TAP");
    let stop = nexus.stop_flag();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let daemon = std::thread::spawn(move || {
        let _ = tid_tx.send(rustix::thread::gettid().as_raw_nonzero().get());
        nexus.run()
    });
    let tid = tid_rx.recv().expect("the nexus thread's id");
    let t0 = Instant::now();
    while Nexus::connect(&socket).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut control = Nexus::connect(&socket).expect("the control socket");
    let mut ch = control
        .open_channel(ChannelOptions::default())
        .expect("a channel");
    let (_, local) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            "0.0.0.0:0".parse().expect("addr"),
            None,
        )
        .expect("a flow");

    ip(&["link", "del", &dev]);
    let failed = |c: &mut Nexus| {
        let st = c.status().expect("status answers");
        st.interface
            .iter()
            .find(|(k, _)| k == "interface_failed")
            .map_or(0, |(_, v)| *v)
    };
    let t0 = Instant::now();
    while failed(&mut control) == 0 {
        // The nexus notices when it next reads; an app's packet makes it look.
        let pkt = udp_packet(local.port());
        if let Some(buf) = ch.alloc() {
            ch.buffer_mut(buf).expect("a buffer")[..pkt.len()].copy_from_slice(&pkt);
            let _ = ch.send(&[Packet {
                buf,
                offset: 0,
                len: pkt.len() as u32,
            }]);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the failure was not reported"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle from here on: the nexus must sleep, not poll a dead fd (it spun a core before).
    let before = thread_ticks(tid);
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_ticks(tid) - before;
    assert!(used < 20, "the nexus used {used} ticks in an idle second");
    // The app's channel and the control socket still work.
    assert!(matches!(
        ch.wait(Interest::Readable, Some(Duration::from_millis(20))),
        Err(netchannel::Error::TimedOut) | Ok(())
    ));
    assert_eq!(control.flows().expect("flows").len(), 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(daemon.join().expect("the nexus thread").is_ok());
    let _ = std::fs::remove_file(&socket);
}

/// A UDP packet from the nexus's address and `port` to a peer.
fn udp_packet(port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .udp(port, 9)
        .write(&mut out, b"into the void")
        .expect("writing into a Vec cannot fail");
    out
}
