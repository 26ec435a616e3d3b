//! `netchannel demo`: a nexus on a built-in test interface serving real traffic to a kernel
//! peer, with no configuration.
//!
//! It makes a network namespace and a TAP device (198.18.0.1 for the nexus, 198.18.0.2 for the
//! kernel peer in the namespace), runs a nexus on the TAP in this process and a UDP echo app on
//! a channel, drives the app from a kernel UDP socket inside the namespace, prints what
//! happened, and removes everything it made, also on Ctrl-C or failure.

use std::io::BufRead;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netchannel::nexus::{ChannelOptions, FlowProto, Nexus};
use netchannel::{Interest, Packet};
use netchannel_nexus::datapath::Datapath;
use netchannel_nexus::flowswitch::NextHop;
use netchannel_nexus::netif::afxdp::{AfXdp, AfXdpOptions};
use netchannel_nexus::netif::tap::Tap;
use netchannel_testbed::{Bed, Netns, Offloads, Slot};

const NEXUS_MAC: [u8; 6] = [0x02, 0x4e, 0x43, 0x00, 0x00, 0x01];

/// The demo's addresses, from the test bed's slot 0: 198.18.0.1 for the nexus (this host's end
/// of the veth, or the host behind the TAP), 198.18.0.2 for the kernel peer.
const SLOT: u32 = 0;

/// The network namespace holding the kernel peer, and the interface between it and the nexus;
/// deleted on drop.
enum Network {
    /// A veth pair, the host end served by the nexus.
    Veth(Bed),
    /// The namespace holding the TAP device's kernel end.
    Tap(Netns),
}

impl Network {
    fn ns(&self) -> &Netns {
        match self {
            Self::Veth(bed) => bed.ns(),
            Self::Tap(ns) => ns,
        }
    }
}

/// Removes the control socket, however the demo ends.
struct SocketFile(String);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The interface the demo's nexus serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DemoBackend {
    /// A veth pair, the host end shared with the kernel through AF_XDP and the XDP program.
    Afxdp,
    /// A TAP device, the nexus a host of its own behind it.
    Tap,
}

/// Builds the test network and the flowswitch of its nexus.
fn network(backend: DemoBackend, slot: Slot) -> Result<(Network, Datapath), String> {
    let (nexus_ip, peer_ip) = (slot.host4(), slot.peer4());
    let host = std::net::IpAddr::V4(nexus_ip);
    match backend {
        DemoBackend::Afxdp => {
            // Software checksums on the wire: a veth would otherwise hand the nexus packets
            // whose checksum the (absent) hardware was meant to fill in.
            let bed = Bed::builder("demo")
                .slot(slot.index())
                .offloads(Offloads::PeerOff)
                .build()
                .map_err(|e| e.to_string())?;
            let (ns, dev, peer_dev) = (bed.ns().name(), bed.host(), bed.peer());
            println!(
                "1. test network: namespace {ns}, veth {dev} ({nexus_ip}, this host) <-> {peer_dev} ({peer_ip}, kernel peer); peer offloads off"
            );
            let xsk = AfXdp::open(dev, AfXdpOptions::default()).map_err(|e| e.to_string())?;
            let ifindex = xsk.ifindex();
            println!(
                "2. nexus on {dev}: XDP program attached ({:?}), AF_XDP socket in {} mode; \
                 ARP, ICMP and other ports stay with the kernel",
                xsk.mode(),
                if xsk.zerocopy() { "zero-copy" } else { "copy" }
            );
            let sw = Datapath::on(Box::new(xsk), vec![host], NextHop::Kernel(ifindex))
                .map_err(|e| e.to_string())?;
            Ok((Network::Veth(bed), sw))
        }
        DemoBackend::Tap => {
            let ns = Netns::new("demo").map_err(|e| e.to_string())?;
            let pid = std::process::id() % 100_000;
            let tap = Tap::create(&format!("ncdemo{pid}"), NEXUS_MAC).map_err(|e| e.to_string())?;
            let dev = tap.name().to_owned();
            let name = ns.name();
            let ip = |args: &[&str]| netchannel_testbed::ip(args).map_err(|e| e.to_string());
            ip(&["link", "set", &dev, "netns", name])?;
            let in_ns = |args: &[&str]| ns.ip(args).map_err(|e| e.to_string());
            in_ns(&["addr", "add", &format!("{peer_ip}/24"), "dev", &dev])?;
            in_ns(&["link", "set", &dev, "up"])?;
            println!(
                "1. test network: namespace {name} with {dev} at {peer_ip}/24 (kernel peer); the nexus behind it at {nexus_ip}"
            );
            println!("2. nexus on the TAP device {dev}, answering ARP itself");
            let sw =
                Datapath::on(Box::new(tap), vec![host], NextHop::Arp).map_err(|e| e.to_string())?;
            Ok((Network::Tap(ns), sw))
        }
    }
}

/// `netchannel demo`.
pub(crate) fn run(count: u32, backend: DemoBackend) -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("the demo makes a network namespace and interfaces: run it as root".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    let slot = Slot::new(SLOT).map_err(|e| e.to_string())?;
    let nexus_ip = slot.host4();
    let socket = SocketFile(format!("/tmp/netchannel-demo-{}.sock", std::process::id()));
    let (net, switch) = network(backend, slot)?;
    let ns = net.ns().name().to_owned();

    let mut cfg = netchannel_nexus::Config::default();
    cfg.control.socket = socket.0.clone().into();
    let mut nexus =
        netchannel_nexus::Nexus::with_datapath(cfg, switch).map_err(|e| e.to_string())?;
    let nexus_stop = nexus.stop_flag();
    let daemon = std::thread::spawn(move || nexus.run().map_err(|e| e.to_string()));

    let mut control = connect(&socket.0)?;
    let mut ch = control
        .open_channel(ChannelOptions::default())
        .map_err(|e| e.to_string())?;
    let (_, local) = control
        .add_flow(
            &ch,
            FlowProto::Udp,
            "0.0.0.0:7".parse().map_err(|_| "bad address")?,
            None,
        )
        .or_else(|_| {
            control.add_flow(
                &ch,
                FlowProto::Udp,
                "0.0.0.0:0".parse().expect("literal"),
                None,
            )
        })
        .map_err(|e| e.to_string())?;
    println!(
        "3. UDP echo app on channel {} owns UDP port {} (reserved in the host's port space too)",
        ch.id(),
        local.port()
    );

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let target = format!("{nexus_ip}:{}", local.port());
    let mut peer = net
        .ns()
        .command(&exe)
        .args([
            "demo-peer",
            "--target",
            &target,
            "--count",
            &count.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the kernel peer: {e}"))?;
    println!("4. kernel UDP client in {ns} sends {count} datagrams to {target}, one at a time");

    let app_stop = stop.clone();
    let echoed = echo(&mut ch, &app_stop, &mut peer)?;
    let mut summary = String::new();
    if let Some(out) = peer.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            summary = line;
        }
    }
    let ok = peer.wait().map_err(|e| e.to_string())?.success();
    println!("5. the app echoed {echoed} datagrams; the kernel peer says: {summary}");

    let http = serve_http_once(&socket.0, net.ns(), &exe, nexus_ip);
    match &http {
        Ok(line) => println!(
            "6. HTTP from a user-space TCP/IP stack: an app running smoltcp on its own channel served a page on port 80; the kernel's TCP client in {ns} says: {line}"
        ),
        Err(e) => println!("6. HTTP from the user-space stack failed: {e}"),
    }

    let st = control.status().map_err(|e| e.to_string())?;
    let list = |v: &[(String, u64)]| {
        v.iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("7. nexus counters: interface {}", list(&st.interface));
    for c in &st.channels {
        println!(
            "   channel {}: {} packets in, {} out, drops [{}], ledger audit {}",
            c.id,
            c.rx_packets,
            c.tx_packets,
            list(&c.drops),
            c.audit
        );
    }
    for f in control.flows().map_err(|e| e.to_string())? {
        println!(
            "   flow {}: {} {} → {} packets in, {} out",
            f.id,
            format!("{:?}", f.proto).to_lowercase(),
            f.local,
            f.rx_packets,
            f.tx_packets
        );
    }
    drop(ch);
    drop(control);
    nexus_stop.store(true, Ordering::Relaxed);
    let _ = daemon.join();
    drop(net);
    drop(socket);
    println!("8. removed the namespace, its interfaces and the socket");
    if stop.load(Ordering::Relaxed) {
        return Err("interrupted".into());
    }
    if !ok || echoed < count {
        return Err(format!("the kernel peer got {echoed} of {count} echoes"));
    }
    http.map(drop)
}

/// The page the demo serves.
const PAGE: &str = "<!doctype html><title>netchannel</title><p>Hello from a TCP/IP stack in user space, \
                    through a shared-memory channel and the nexus.</p>\n";

/// Serves one HTTP request from a user-space stack on a channel of the demo's nexus, fetched by
/// a kernel TCP client in the namespace; returns what the client printed.
fn serve_http_once(
    socket: &str,
    ns: &Netns,
    exe: &std::path::Path,
    nexus_ip: std::net::Ipv4Addr,
) -> Result<String, String> {
    use std::io::{Read, Write};
    let stack = netchannel::stack::Stack::connect(socket).map_err(|e| e.to_string())?;
    let mut listener = netchannel::stack::TcpListener::bind(
        &stack,
        "0.0.0.0:80".parse().map_err(|_| "bad address")?,
    )
    .map_err(|e| format!("listening on port 80: {e}"))?;
    let target = format!("{nexus_ip}:80");
    let mut client = ns
        .command(exe)
        .args(["demo-peer", "--target", &target, "--count", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the kernel TCP client: {e}"))?;
    // Never wait forever: the client gives up after 5 s, and so do we.
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let (mut conn, _) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t0.elapsed() > Duration::from_secs(10)
                    || matches!(client.try_wait(), Ok(Some(_)))
                {
                    let _ = client.kill();
                    let _ = client.wait();
                    return Err("the kernel TCP client never connected".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 || req.len() > 16 * 1024 {
            return Err("the client sent no complete request".into());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        PAGE.len()
    );
    conn.write_all(head.as_bytes())
        .and_then(|()| conn.write_all(PAGE.as_bytes()))
        .map_err(|e| format!("writing the response: {e}"))?;
    drop(conn);
    let out = client.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        return Err(format!("the kernel client failed: {text}"));
    }
    Ok(text)
}

/// The kernel side of the HTTP part: one GET with a plain kernel TCP socket.
fn http_get(target: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = target
        .parse()
        .map_err(|_| format!("bad address {target}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET / HTTP/1.1\r\nhost: {target}\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| format!("reading: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.lines().next().unwrap_or_default();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    if body != PAGE {
        return Err(format!("unexpected response: {text:?}"));
    }
    println!("{status}, {} bytes of page intact", body.len());
    Ok(())
}

fn connect(socket: &str) -> Result<Nexus, String> {
    let t0 = Instant::now();
    loop {
        match Nexus::connect(socket) {
            Ok(n) => return Ok(n),
            Err(e) if t0.elapsed() > Duration::from_secs(5) => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Echoes UDP datagrams (swapping addresses and ports) until the peer process exits.
fn echo(
    ch: &mut netchannel::nexus::Channel,
    stop: &AtomicBool,
    peer: &mut std::process::Child,
) -> Result<u32, String> {
    let mut echoed = 0;
    let mut got = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if matches!(peer.try_wait(), Ok(Some(_))) {
            break;
        }
        got.clear();
        if ch.recv(&mut got, 32).map_err(|e| e.to_string())? == 0 {
            match ch.wait(Interest::Readable, Some(Duration::from_millis(50))) {
                Ok(()) | Err(netchannel::Error::TimedOut) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        let requests: Vec<Vec<u8>> = got.iter().map(|p| ch.payload(p).to_vec()).collect();
        ch.free(got.iter().map(|p| p.buf))
            .map_err(|e| e.to_string())?;
        for req in requests {
            let Some(reply) = udp_reply(&req) else {
                continue;
            };
            let Some(buf) = ch.alloc() else { continue };
            let Some(bytes) = ch.buffer_mut(buf) else {
                continue;
            };
            let len = reply.len().min(bytes.len());
            bytes[..len].copy_from_slice(&reply[..len]);
            if ch
                .send(&[Packet {
                    buf,
                    offset: 0,
                    len: len as u32,
                }])
                .map_err(|e| e.to_string())?
                == 1
            {
                echoed += 1;
            }
        }
    }
    Ok(echoed)
}

/// The echo of an IPv4 UDP datagram: addresses and ports swapped, payload kept.
fn udp_reply(req: &[u8]) -> Option<Vec<u8>> {
    let s = etherparse::SlicedPacket::from_ip(req).ok()?;
    let Some(etherparse::NetSlice::Ipv4(v4)) = s.net else {
        return None;
    };
    let Some(etherparse::TransportSlice::Udp(u)) = s.transport else {
        return None;
    };
    let h = v4.header();
    let mut out = Vec::with_capacity(req.len());
    etherparse::PacketBuilder::ipv4(h.destination(), h.source(), 64)
        .udp(u.destination_port(), u.source_port())
        .write(&mut out, u.payload())
        .ok()?;
    Some(out)
}

/// `netchannel demo-peer`: the kernel side, run inside the namespace. Sends `count` datagrams
/// one at a time and prints one summary line.
pub(crate) fn peer(target: &str, count: u32) -> Result<(), String> {
    if count == 0 {
        return http_get(target);
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    sock.connect(target).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let (mut rtts, mut lost) = (Vec::with_capacity(count as usize), 0u32);
    let mut buf = [0u8; 2048];
    for i in 0..count {
        let msg = format!("netchannel demo datagram {i}");
        let t0 = Instant::now();
        sock.send(msg.as_bytes()).map_err(|e| e.to_string())?;
        match sock.recv(&mut buf) {
            Ok(n) if &buf[..n] == msg.as_bytes() => rtts.push(t0.elapsed().as_micros() as u64),
            _ => lost += 1,
        }
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{} of {count} echoed intact, {lost} lost; round trip p50 {} µs, p99 {} µs",
        rtts.len(),
        pct(0.5),
        pct(0.99)
    );
    if lost > 0 {
        Err(format!("{lost} datagrams lost"))
    } else {
        Ok(())
    }
}
