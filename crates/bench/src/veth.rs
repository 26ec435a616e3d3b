//! `netchannel bench veth`: UDP across a veth pair, through the nexus on AF_XDP against the
//! kernel's own stack, both measured in the same run.
//!
//! The test bed is a network namespace holding one end of a veth pair (198.18.1.2), the other
//! end in this namespace (198.18.1.1), offloads off on both ends (so both paths see the same
//! wire frames). Per repetition and metric, both paths run in turn (alternating which goes
//! first):
//!
//! * **receive**: an AF_PACKET generator in the namespace (`bench-gen`) sends UDP to this end
//!   as fast as it can; the kernel path receives it on a UDP socket with `recvmmsg`, the
//!   netchannel path on a channel of a nexus serving the veth over AF_XDP. The nexus (and its
//!   XDP program) exists only during netchannel trials, so the kernel path runs on a plain veth.
//! * **CPU per packet**: the same at a fixed offered rate; the whole machine's busy time
//!   (`/proc/stat`, every core, the generator included, as it is the same for both paths) per
//!   packet received.
//! * **transmit**: a UDP socket (`sendmmsg`) or an app on a channel sends to a kernel UDP sink
//!   in the namespace (`bench-sink`), which counts what arrives.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use netchannel::nexus::{ChannelOptions, FlowProto, Nexus};
use netchannel::{Interest, Packet};
use netchannel_nexus::datapath::Datapath;
use netchannel_nexus::flowswitch::NextHop;
use netchannel_nexus::netif::afxdp::{AfXdp, AfXdpOptions};
use netchannel_testbed::{Offloads, format_mac, parse_mac};
use serde::{Deserialize, Serialize};

use super::sys::MsgBatch;
use super::{Better, Options};

/// The bed's addresses: 198.18.1.1 on this host's end, 198.18.1.2 on the peer's.
const SLOT: u32 = 1;
const KERNEL_PORT: u16 = 9101;
const NEXUS_PORT: u16 = 9102;
const SINK_PORT: u16 = 9103;
const GEN_PORT: u16 = 9100;

/// Options of `bench veth`.
#[derive(Debug, Clone)]
pub(crate) struct VethOptions {
    pub(crate) common: Options,
    /// Offered packets/s of the CPU trials.
    pub(crate) cpu_rate: u64,
    /// Only these metrics (keys as in the JSON); empty: all.
    pub(crate) only: Vec<String>,
    /// Only one path (`kernel` or `netchannel`), for profiling one at a time.
    pub(crate) only_path: Option<String>,
}

/// What a generator or sink reports (one JSON line).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Count {
    /// Datagrams sent or received.
    pub(crate) packets: u64,
    /// Seconds between the first and the last.
    pub(crate) secs: f64,
}

/// The test bed (offloads off on both ends, the peer resolved before anything is measured)
/// and the control socket of the trials' nexus; removed however the run ends.
pub(super) struct Bed {
    net: netchannel_testbed::Bed,
    pub(super) socket: String,
}

impl Bed {
    pub(super) fn new() -> Result<Self, String> {
        let net = netchannel_testbed::Bed::builder("bench")
            .slot(SLOT)
            .offloads(Offloads::BothOff)
            .resolve_peer(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            net,
            socket: format!("/tmp/netchannel-bench-veth-{}.sock", std::process::id()),
        })
    }

    /// This host's address.
    pub(super) fn host4(&self) -> Ipv4Addr {
        self.net.host4()
    }

    /// The peer's address.
    pub(super) fn peer4(&self) -> Ipv4Addr {
        self.net.peer4()
    }

    /// The nexus's XDP steering program on the host's end, with no claims: every packet
    /// passes to the kernel stack. Detached when dropped.
    pub(super) fn steering_without_claims(
        &self,
    ) -> Result<netchannel_nexus::netif::xdp::XdpProgram, String> {
        netchannel_nexus::netif::xdp::XdpProgram::attach(self.net.host_ifindex(), 1, None)
            .map_err(|e| e.to_string())
    }

    /// `ip netns exec NS PROGRAM` in the peer's namespace, not started.
    pub(super) fn command_in_ns(&self, program: &str) -> std::process::Command {
        self.net.command(program)
    }

    /// Starts a hidden helper command of this binary inside the namespace.
    pub(super) fn spawn_in_ns(&self, args: &[String]) -> Result<Child, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        self.net
            .command(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting a helper in the namespace: {e}"))
    }

    /// Runs the generator: `size`-byte payloads to `port` for `ms`, at `rate` packets/s if
    /// given, else as fast as it can.
    fn generator(
        &self,
        port: u16,
        size: usize,
        ms: u64,
        rate: Option<u64>,
    ) -> Result<Child, String> {
        let mut args = vec![
            "bench-gen".to_owned(),
            "--ifname".into(),
            self.net.peer().to_owned(),
            "--dst-mac".into(),
            format_mac(self.net.host_mac()),
            "--src".into(),
            SocketAddrV4::new(self.peer4(), GEN_PORT).to_string(),
            "--dst".into(),
            SocketAddrV4::new(self.host4(), port).to_string(),
            "--size".into(),
            size.to_string(),
            "--duration-ms".into(),
            ms.to_string(),
        ];
        if let Some(r) = rate {
            args.extend(["--rate".into(), r.to_string()]);
        }
        self.spawn_in_ns(&args)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Reads a helper's one JSON line and waits for it.
pub(super) fn finish(mut child: Child) -> Result<Count, String> {
    let out = child.stdout.take().ok_or("helper has no stdout")?;
    let mut last = String::new();
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        last = line;
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("a bench helper failed ({st})"));
    }
    serde_json::from_str(&last).map_err(|e| format!("unreadable helper report {last:?}: {e}"))
}

/// Busy and total clock ticks of the whole machine so far. Busy is user, nice, system, irq
/// and softirq time; idle, I/O wait and steal (another guest's time) are not ours.
pub(super) fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    (at(0) + at(1) + at(2) + at(5) + at(6), total)
}

pub(super) fn busy_seconds_since(start: (u64, u64)) -> f64 {
    let now = machine_ticks();
    let hz = rustix::param::clock_ticks_per_second() as f64;
    now.0.saturating_sub(start.0) as f64 / hz
}

/// What one trial measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    packets: u64,
    secs: f64,
    busy_s: f64,
}

impl Measured {
    fn pps(&self) -> f64 {
        self.packets as f64 / self.secs.max(1e-9)
    }
}

/// Which direction and load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trial {
    /// Receive at full speed, payload bytes.
    Rx(usize),
    /// Receive at a fixed rate (64-byte payloads).
    RxPaced,
    /// Transmit at full speed, payload bytes.
    Tx(usize),
}

/// Kernel path, receive: a UDP socket on this end.
fn kernel_rx(bed: &Bed, size: usize, ms: u64, rate: Option<u64>) -> Result<Measured, String> {
    let sock =
        UdpSocket::bind(SocketAddrV4::new(bed.host4(), KERNEL_PORT)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 4 << 20);
    let mut batch = MsgBatch::new(64, 2048);
    let t0 = machine_ticks();
    let mut gen_child = Some(bed.generator(KERNEL_PORT, size, ms, rate)?);
    let (mut packets, mut first, mut last) = (0u64, None, Instant::now());
    let mut idle_since: Option<Instant> = None;
    loop {
        match batch.recv(sock.as_fd(), 64, false) {
            Ok(n) if n > 0 => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                packets += n as u64;
                idle_since = None;
            }
            _ => {
                if let Some(c) = gen_child.as_mut()
                    && matches!(c.try_wait(), Ok(Some(_)))
                {
                    idle_since.get_or_insert_with(Instant::now);
                }
                if idle_since.is_some_and(|t| t.elapsed() > Duration::from_millis(100)) {
                    break;
                }
            }
        }
    }
    let busy_s = busy_seconds_since(t0);
    if let Some(c) = gen_child.take() {
        finish(c)?;
    }
    Ok(Measured {
        packets,
        secs: first.map_or(0.0, |f| last.duration_since(f).as_secs_f64()),
        busy_s,
    })
}

/// A nexus on the veth's host end, run in a thread of this process for one trial.
pub(super) struct NexusRun {
    pub(super) control: Nexus,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NexusRun {
    pub(super) fn start(bed: &Bed) -> Result<Self, String> {
        let xsk =
            AfXdp::open(bed.net.host(), AfXdpOptions::default()).map_err(|e| e.to_string())?;
        let ifindex = xsk.ifindex();
        let sw = Datapath::on(
            Box::new(xsk),
            vec![bed.host4().into()],
            NextHop::Kernel(ifindex),
        )
        .map_err(|e| e.to_string())?;
        let mut cfg = netchannel_nexus::Config::default();
        cfg.control.socket = bed.socket.clone().into();
        let mut nexus =
            netchannel_nexus::Nexus::with_datapath(cfg, sw).map_err(|e| e.to_string())?;
        let stop = nexus.stop_flag();
        let thread = std::thread::Builder::new()
            .name("nexus".into())
            .spawn(move || {
                if let Err(e) = nexus.run() {
                    tracing::error!(error = %e, "bench nexus failed");
                }
            })
            .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let control = loop {
            match Nexus::connect(&bed.socket) {
                Ok(c) => break c,
                Err(e) if t0.elapsed() > Duration::from_secs(5) => return Err(e.to_string()),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        Ok(Self {
            control,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NexusRun {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// netchannel path, receive: an app on a channel of the nexus.
fn nexus_rx(bed: &Bed, size: usize, ms: u64, rate: Option<u64>) -> Result<Measured, String> {
    let mut run = NexusRun::start(bed)?;
    let mut ch = run
        .control
        .open_channel(ChannelOptions::default())
        .map_err(|e| e.to_string())?;
    run.control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::V4(SocketAddrV4::new(bed.host4(), NEXUS_PORT)),
            None,
        )
        .map_err(|e| e.to_string())?;
    let t0 = machine_ticks();
    let mut gen_child = Some(bed.generator(NEXUS_PORT, size, ms, rate)?);
    let (mut packets, mut first, mut last) = (0u64, None, Instant::now());
    let mut idle_since: Option<Instant> = None;
    let mut got = Vec::with_capacity(64);
    loop {
        got.clear();
        let n = ch.recv(&mut got, 64).map_err(|e| e.to_string())?;
        if n > 0 {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            packets += n as u64;
            idle_since = None;
            ch.free(got.iter().map(|p| p.buf))
                .map_err(|e| e.to_string())?;
            continue;
        }
        match ch.wait(Interest::Readable, Some(Duration::from_millis(20))) {
            Ok(()) | Err(netchannel::Error::TimedOut) => {}
            Err(e) => return Err(e.to_string()),
        }
        if let Some(c) = gen_child.as_mut()
            && matches!(c.try_wait(), Ok(Some(_)))
        {
            idle_since.get_or_insert_with(Instant::now);
        }
        if idle_since.is_some_and(|t| t.elapsed() > Duration::from_millis(100)) {
            break;
        }
    }
    let busy_s = busy_seconds_since(t0);
    if let Some(c) = gen_child.take() {
        finish(c)?;
    }
    Ok(Measured {
        packets,
        secs: first.map_or(0.0, |f| last.duration_since(f).as_secs_f64()),
        busy_s,
    })
}

fn sink(bed: &Bed, ms: u64) -> Result<(Child, BufReader<std::process::ChildStdout>), String> {
    let mut child = bed.spawn_in_ns(&[
        "bench-sink".into(),
        "--port".into(),
        SINK_PORT.to_string(),
        "--duration-ms".into(),
        ms.to_string(),
    ])?;
    let mut out = BufReader::new(child.stdout.take().ok_or("sink has no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        return Err(format!("the sink did not start: {line:?}"));
    }
    Ok((child, out))
}

fn sink_result(
    mut child: Child,
    mut out: BufReader<std::process::ChildStdout>,
) -> Result<Count, String> {
    let mut last = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).map_err(|e| e.to_string())? > 0 {
        last = std::mem::take(&mut line);
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("the sink failed ({st})"));
    }
    serde_json::from_str(last.trim()).map_err(|e| format!("unreadable sink report {last:?}: {e}"))
}

/// Kernel path, transmit: `sendmmsg` on a UDP socket.
fn kernel_tx(bed: &Bed, size: usize, ms: u64) -> Result<Measured, String> {
    let (child, out) = sink(bed, ms)?;
    let sock = UdpSocket::bind(SocketAddrV4::new(bed.host4(), 0)).map_err(|e| e.to_string())?;
    sock.connect(SocketAddrV4::new(bed.peer4(), SINK_PORT))
        .map_err(|e| e.to_string())?;
    let mut batch = MsgBatch::new(32, size);
    let t0 = machine_ticks();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(ms) {
        // A full socket buffer says ENOBUFS/EAGAIN: try again.
        let _ = batch.send(sock.as_fd(), 32);
    }
    let busy_s = busy_seconds_since(t0);
    let c = sink_result(child, out)?;
    Ok(Measured {
        packets: c.packets,
        secs: c.secs,
        busy_s,
    })
}

/// netchannel path, transmit: an app sends through the nexus.
fn nexus_tx(bed: &Bed, size: usize, ms: u64) -> Result<Measured, String> {
    let mut run = NexusRun::start(bed)?;
    let mut ch = run
        .control
        .open_channel(ChannelOptions::default())
        .map_err(|e| e.to_string())?;
    let (_, local) = run
        .control
        .add_flow(
            &ch,
            FlowProto::Udp,
            SocketAddr::V4(SocketAddrV4::new(bed.host4(), 0)),
            None,
        )
        .map_err(|e| e.to_string())?;
    let mut pkt = Vec::with_capacity(size + 28);
    etherparse::PacketBuilder::ipv4(bed.host4().octets(), bed.peer4().octets(), 64)
        .udp(local.port(), SINK_PORT)
        .write(&mut pkt, &vec![0x5a; size])
        .map_err(|e| e.to_string())?;
    let (child, out) = sink(bed, ms)?;
    let t0 = machine_ticks();
    let start = Instant::now();
    let mut batch = Vec::with_capacity(32);
    while start.elapsed() < Duration::from_millis(ms) {
        batch.clear();
        while batch.len() < 32 {
            let Some(buf) = ch.alloc() else { break };
            let Some(bytes) = ch.buffer_mut(buf) else {
                break;
            };
            bytes[..pkt.len()].copy_from_slice(&pkt);
            batch.push(Packet {
                buf,
                offset: 0,
                len: pkt.len() as u32,
            });
        }
        if batch.is_empty() {
            match ch.wait(Interest::Buffers, Some(Duration::from_millis(10))) {
                Ok(()) | Err(netchannel::Error::TimedOut) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut sent = 0;
        while sent < batch.len() {
            let k = ch.send(&batch[sent..]).map_err(|e| e.to_string())?;
            sent += k;
            if k == 0 {
                let _ = ch.wait(Interest::Writable, Some(Duration::from_millis(10)));
            }
        }
    }
    let busy_s = busy_seconds_since(t0);
    let c = sink_result(child, out)?;
    drop(ch);
    drop(run);
    Ok(Measured {
        packets: c.packets,
        secs: c.secs,
        busy_s,
    })
}

type VethMetric = super::PathMetric<Trial, Measured>;

fn mpps(m: &Measured, _: Trial) -> f64 {
    m.pps() / 1e6
}

fn gbps(m: &Measured, t: Trial) -> f64 {
    let size = match t {
        Trial::Rx(s) | Trial::Tx(s) => s,
        Trial::RxPaced => 64,
    };
    m.pps() * size as f64 * 8.0 / 1e9
}

fn cpu_us(m: &Measured, _: Trial) -> f64 {
    m.busy_s / m.packets.max(1) as f64 * 1e6
}

/// `netchannel bench veth`.
pub(crate) fn veth(o: &VethOptions) -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("bench veth makes a network namespace and attaches XDP: run it as root".into());
    }
    let bed = Bed::new()?;
    let c = &o.common;
    let metrics = [
        VethMetric {
            key: "pps_64",
            label: "receive, 64 B UDP payload, packets/s",
            unit: "Mpps",
            better: Better::Higher,
            trial: Trial::Rx(64),
            value: mpps,
        },
        VethMetric {
            key: "gbps_1400",
            label: "receive, 1400 B UDP payload, Gbit/s of payload",
            unit: "Gbit/s",
            better: Better::Higher,
            trial: Trial::Rx(1400),
            value: gbps,
        },
        VethMetric {
            key: "cpu_per_packet",
            label: "receive, machine CPU per packet at a fixed rate (64 B)",
            unit: "µs",
            better: Better::Lower,
            trial: Trial::RxPaced,
            value: cpu_us,
        },
        VethMetric {
            key: "tx_pps_64",
            label: "transmit, 64 B UDP payload, packets/s at the peer",
            unit: "Mpps",
            better: Better::Higher,
            trial: Trial::Tx(64),
            value: mpps,
        },
        VethMetric {
            key: "tx_cpu_per_packet",
            label: "transmit, machine CPU per packet delivered (64 B, full speed)",
            unit: "µs",
            better: Better::Lower,
            trial: Trial::Tx(64),
            value: cpu_us,
        },
    ];
    let metrics = super::select(&metrics, &o.only, o.only_path.as_deref())?;
    let table = super::interleave(c.reps, &metrics, o.only_path.as_deref(), |t, nc| {
        let ms = c.duration_ms;
        match (t, nc) {
            (Trial::Rx(s), false) => kernel_rx(&bed, s, ms, None),
            (Trial::Rx(s), true) => nexus_rx(&bed, s, ms, None),
            (Trial::RxPaced, false) => kernel_rx(&bed, 64, ms.max(2000), Some(o.cpu_rate)),
            (Trial::RxPaced, true) => nexus_rx(&bed, 64, ms.max(2000), Some(o.cpu_rate)),
            (Trial::Tx(s), false) => kernel_tx(&bed, s, ms),
            (Trial::Tx(s), true) => nexus_tx(&bed, s, ms),
        }
    })?;
    drop(bed);
    super::report(c, super::Bench::Veth, &table)
}

/// `netchannel bench-gen`: the AF_PACKET generator, run inside the namespace.
pub(crate) fn generator(
    ifname: &str,
    dst_mac: &str,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    size: usize,
    duration_ms: u64,
    rate: Option<u64>,
) -> Result<(), String> {
    let parse_mac = |s: &str| parse_mac(s).ok_or_else(|| format!("{s:?} is not a MAC address"));
    let src_mac = parse_mac(
        &std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
            .map_err(|e| format!("no interface {ifname}: {e}"))?,
    )?;
    let spec = super::afpacket::FrameSpec {
        src_mac,
        dst_mac: parse_mac(dst_mac)?,
        src,
        dst,
        payload_len: size,
    };
    let mut g = super::afpacket::Generator::open(ifname, spec).map_err(|e| e.to_string())?;
    let duration = Duration::from_millis(duration_ms);
    let start = Instant::now();
    let sent = match rate {
        None => g.run_for(duration, 64).map_err(|e| e.to_string())?,
        Some(rate) => {
            let mut sent = 0u64;
            while start.elapsed() < duration {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                if sent < due {
                    sent += g
                        .send_batch(((due - sent) as usize).min(64))
                        .map_err(|e| e.to_string())? as u64;
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            sent
        }
    };
    let report = Count {
        packets: sent,
        secs: start.elapsed().as_secs_f64(),
    };
    println!(
        "{}",
        serde_json::to_string(&report).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// `netchannel bench-sink`: counts UDP datagrams on `port` until 200 ms pass without one
/// (after the first), or `duration_ms` plus 5 s.
pub(crate) fn sink_main(port: u16, duration_ms: u64) -> Result<(), String> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 4 << 20);
    println!("ready");
    let mut batch = MsgBatch::new(64, 2048);
    let deadline = Instant::now() + Duration::from_millis(duration_ms) + Duration::from_secs(5);
    let (mut packets, mut first, mut last) = (0u64, None::<Instant>, Instant::now());
    while Instant::now() < deadline {
        match batch.recv(sock.as_fd(), 64, false) {
            Ok(n) if n > 0 => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                packets += n as u64;
            }
            _ => {
                if first.is_some() && last.elapsed() > Duration::from_millis(200) {
                    break;
                }
            }
        }
    }
    let report = Count {
        packets,
        secs: first.map_or(0.0, |f| last.duration_since(f).as_secs_f64()),
    };
    println!(
        "{}",
        serde_json::to_string(&report).map_err(|e| e.to_string())?
    );
    Ok(())
}
