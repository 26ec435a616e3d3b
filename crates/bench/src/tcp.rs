//! `netchannel bench tcp`: bulk TCP and UDP round trips between this host and a kernel peer
//! across a veth, the host side being an app on netchannel's user-space stack (through the
//! nexus on AF_XDP) or the kernel's own stack, measured in the same run.
//!
//! The test bed is `bench veth`'s (offloads off on both ends, so both paths see the same
//! segments). Per repetition, both paths run in turn, alternating which goes first:
//!
//! * **to the host**: the peer's kernel sends for the trial's duration, the host receives;
//! * **from the host**: the host sends, the peer's kernel receives;
//! * **UDP round trip**: the host sends 64-byte requests one at a time to a kernel echo in the
//!   namespace.
//!
//! Throughput is payload bits per second at the receiver; CPU is the whole machine's busy
//! time per gigabyte moved.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::veth::{Bed, NexusRun, busy_seconds_since, finish, machine_ticks};
use super::{Better, Options, Row, median};

const HOST_PORT: u16 = 9201;
const PEER_PORT: u16 = 9202;
const ECHO_PORT: u16 = 9203;
/// Bytes per write.
const CHUNK: usize = 256 * 1024;
/// A bulk trial in which nothing moves for this long has stalled: it fails instead of hanging.
const STALL: Duration = Duration::from_secs(10);

/// What one trial measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    bytes: u64,
    secs: f64,
    busy_s: f64,
    rtt_p50_us: f64,
}

/// One side's report (the peer prints it as JSON).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Moved {
    bytes: u64,
    secs: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trial {
    ToHost,
    FromHost,
    Rtt,
}

/// Reads everything from `r`; returns bytes and seconds from the first byte to the end.
fn drain(mut r: impl Read) -> std::io::Result<Moved> {
    let mut buf = vec![0u8; CHUNK];
    let (mut bytes, mut first) = (0u64, None::<Instant>);
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        bytes += n as u64;
    }
    Ok(Moved {
        bytes,
        secs: first.map_or(0.0, |f| f.elapsed().as_secs_f64()),
    })
}

/// Writes for `d`, then closes the write side and waits for the reader to close.
fn pour(mut w: impl Write, d: Duration) -> std::io::Result<u64> {
    let buf = vec![0x5au8; CHUNK];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < d {
        w.write_all(&buf)?;
        sent += CHUNK as u64;
    }
    Ok(sent)
}

/// The error of a bulk trial whose transfer failed or stalled; stops the peer.
fn stalled(e: std::io::Error, path: &str, peer: &mut std::process::Child) -> String {
    let _ = peer.kill();
    let _ = peer.wait();
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        format!("the {path} path's transfer stalled: nothing moved for {STALL:?}")
    } else {
        format!("the {path} path's transfer failed: {e}")
    }
}

fn spawn_peer(bed: &Bed, args: &[&str]) -> Result<(std::process::Child, String), String> {
    let mut full = vec!["bench-peer".to_owned()];
    full.extend(args.iter().map(|s| (*s).to_owned()));
    let mut child = bed.spawn_in_ns(&full)?;
    let out = child.stdout.take().ok_or("peer has no stdout")?;
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        return Err(format!("the bench peer did not start: {line:?}"));
    }
    // Hand the rest of the output back to `finish`.
    child.stdout = Some(reader.into_inner());
    Ok((child, line))
}

fn kernel_trial(
    bed: &Bed,
    t: Trial,
    d: Duration,
    rtts: usize,
    with_xdp: bool,
) -> Result<Measured, String> {
    // The nexus's steering program claims nothing here, so every packet passes to the kernel
    // stack, having paid what XDP on a veth costs (a copy of each frame into a page of the
    // XDP page pool, and NAPI); the nexus trials attach their own program, so it goes at the
    // end of each trial.
    let _xdp = if with_xdp {
        Some(bed.steering_without_claims()?)
    } else {
        None
    };
    let t0 = machine_ticks();
    match t {
        Trial::ToHost => {
            let l = TcpListener::bind(SocketAddrV4::new(bed.host4(), HOST_PORT))
                .map_err(|e| e.to_string())?;
            let ms = d.as_millis().to_string();
            let to = SocketAddrV4::new(bed.host4(), HOST_PORT).to_string();
            let mut child = bed.spawn_in_ns(&[
                "bench-peer".into(),
                "tcp-send".into(),
                "--addr".into(),
                to,
                "--duration-ms".into(),
                ms,
            ])?;
            let (conn, _) = l.accept().map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(STALL))
                .map_err(|e| e.to_string())?;
            let m = drain(&conn).map_err(|e| stalled(e, "kernel", &mut child))?;
            drop(conn);
            let busy_s = busy_seconds_since(t0);
            let _ = child.wait();
            Ok(Measured {
                bytes: m.bytes,
                secs: m.secs,
                busy_s,
                rtt_p50_us: 0.0,
            })
        }
        Trial::FromHost => {
            let addr = SocketAddrV4::new(bed.peer4(), PEER_PORT).to_string();
            let (mut child, _) = spawn_peer(bed, &["tcp-recv", "--addr", &addr])?;
            let mut conn = TcpStream::connect(SocketAddrV4::new(bed.peer4(), PEER_PORT))
                .map_err(|e| e.to_string())?;
            conn.set_write_timeout(Some(STALL))
                .map_err(|e| e.to_string())?;
            pour(&conn, d).map_err(|e| stalled(e, "kernel", &mut child))?;
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            let _ = conn.read(&mut [0u8; 16]);
            let busy_s = busy_seconds_since(t0);
            let c = finish(child)?;
            Ok(Measured {
                bytes: c.packets,
                secs: c.secs,
                busy_s,
                rtt_p50_us: 0.0,
            })
        }
        Trial::Rtt => {
            let addr = SocketAddrV4::new(bed.peer4(), ECHO_PORT).to_string();
            let (child, _) = spawn_peer(bed, &["udp-echo", "--addr", &addr])?;
            let s =
                UdpSocket::bind(SocketAddrV4::new(bed.host4(), 0)).map_err(|e| e.to_string())?;
            s.connect(SocketAddrV4::new(bed.peer4(), ECHO_PORT))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?;
            let p50 = rtt_loop(rtts, |req, resp| {
                s.send(req)?;
                s.recv(resp)
            })?;
            let _ = s.send(b"quit");
            let _ = finish(child);
            Ok(Measured {
                bytes: 0,
                secs: 0.0,
                busy_s: busy_seconds_since(t0),
                rtt_p50_us: p50,
            })
        }
    }
}

/// Times `n` request/response round trips; returns the median in µs.
fn rtt_loop(
    n: usize,
    mut once: impl FnMut(&[u8], &mut [u8]) -> std::io::Result<usize>,
) -> Result<f64, String> {
    let req = [0x42u8; 64];
    let mut resp = [0u8; 2048];
    let mut v = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        let got = once(&req, &mut resp).map_err(|e| format!("round trip {i}: {e}"))?;
        if got != req.len() {
            return Err(format!("round trip {i}: {got}-byte answer"));
        }
        // The first tenth warms the path (neighbours, caches) and is not counted.
        if i >= n / 10 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(median(&v))
}

/// One trial of the app on the user-space stack; `show_status` prints the nexus's status after
/// it (its counters say what the offloads did).
fn nexus_trial(
    bed: &Bed,
    t: Trial,
    d: Duration,
    rtts: usize,
    show_status: bool,
) -> Result<Measured, String> {
    use netchannel::stack::{
        Stack, TcpListener as NcListener, TcpStream as NcStream, UdpSocket as NcUdp,
    };
    let run = NexusRun::start(bed)?;
    let stack = Stack::connect(&bed.socket).map_err(|e| e.to_string())?;
    let t0 = machine_ticks();
    let m = match t {
        Trial::ToHost => {
            let l = NcListener::bind(
                &stack,
                SocketAddr::V4(SocketAddrV4::new(bed.host4(), HOST_PORT)),
            )
            .map_err(|e| e.to_string())?;
            let to = SocketAddrV4::new(bed.host4(), HOST_PORT).to_string();
            let mut child = bed.spawn_in_ns(&[
                "bench-peer".into(),
                "tcp-send".into(),
                "--addr".into(),
                to,
                "--duration-ms".into(),
                d.as_millis().to_string(),
            ])?;
            let (mut conn, _) = l.accept().map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(STALL))
                .map_err(|e| e.to_string())?;
            let m = drain(&conn).map_err(|e| stalled(e, "netchannel", &mut child))?;
            drop(conn);
            let busy_s = busy_seconds_since(t0);
            let _ = child.wait();
            Measured {
                bytes: m.bytes,
                secs: m.secs,
                busy_s,
                rtt_p50_us: 0.0,
            }
        }
        Trial::FromHost => {
            let addr = SocketAddrV4::new(bed.peer4(), PEER_PORT);
            let (mut child, _) = spawn_peer(bed, &["tcp-recv", "--addr", &addr.to_string()])?;
            let mut conn =
                NcStream::connect(&stack, SocketAddr::V4(addr)).map_err(|e| e.to_string())?;
            conn.set_write_timeout(Some(STALL))
                .map_err(|e| e.to_string())?;
            pour(&conn, d).map_err(|e| stalled(e, "netchannel", &mut child))?;
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            let _ = conn.read(&mut [0u8; 16]);
            let busy_s = busy_seconds_since(t0);
            let c = finish(child)?;
            Measured {
                bytes: c.packets,
                secs: c.secs,
                busy_s,
                rtt_p50_us: 0.0,
            }
        }
        Trial::Rtt => {
            let addr = SocketAddrV4::new(bed.peer4(), ECHO_PORT);
            let (child, _) = spawn_peer(bed, &["udp-echo", "--addr", &addr.to_string()])?;
            let mut s = NcUdp::bind(&stack, SocketAddr::V4(SocketAddrV4::new(bed.host4(), 0)))
                .map_err(|e| e.to_string())?;
            s.connect(SocketAddr::V4(addr)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?;
            let p50 = rtt_loop(rtts, |req, resp| {
                s.send(req)?;
                s.recv(resp)
            })?;
            let _ = s.send(b"quit");
            let _ = finish(child);
            Measured {
                bytes: 0,
                secs: 0.0,
                busy_s: busy_seconds_since(t0),
                rtt_p50_us: p50,
            }
        }
    };
    drop(stack);
    if show_status {
        let mut run = run;
        let s = run.control.status().map_err(|e| e.to_string())?;
        eprintln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    }
    Ok(m)
}

type TcpMetric = super::PathMetric<Trial, Measured>;

fn gbps(m: &Measured, _: Trial) -> f64 {
    m.bytes as f64 * 8.0 / m.secs.max(1e-9) / 1e9
}

fn cpu_s_per_gb(m: &Measured, _: Trial) -> f64 {
    m.busy_s / (m.bytes.max(1) as f64 / 1e9)
}

fn rtt(m: &Measured, _: Trial) -> f64 {
    m.rtt_p50_us
}

/// Options of `bench tcp`.
#[derive(Debug, Clone)]
pub(crate) struct TcpOptions {
    pub(crate) common: Options,
    /// Metric keys to run; all when empty.
    pub(crate) only: Vec<String>,
    /// Only one path (`kernel` or `netchannel`), for profiling one at a time.
    pub(crate) only_path: Option<String>,
    /// Print the nexus's status after each of its trials.
    pub(crate) show_status: bool,
    /// Run the kernel path with the nexus's XDP program attached (claiming nothing).
    pub(crate) kernel_xdp: bool,
}

/// The kernel path of `bench tcp --kernel-xdp`.
const KERNEL_XDP_PATH: &str = "kernel TCP/UDP sockets on this host across the same veth, offloads off on \
     both ends, with the nexus's XDP program attached to the host's end and claiming nothing \
     (so the kernel pays what XDP on a veth costs, as the nexus does)";

/// `netchannel bench tcp`.
pub(crate) fn tcp(to: &TcpOptions) -> Result<(), String> {
    let o = &to.common;
    if !rustix::process::geteuid().is_root() {
        return Err("bench tcp makes a network namespace and attaches XDP: run it as root".into());
    }
    let metrics = [
        TcpMetric {
            key: "gbps_to_app",
            label: "TCP bulk, kernel peer → host (app or kernel), Gbit/s",
            unit: "Gbit/s",
            better: Better::Higher,
            trial: Trial::ToHost,
            value: gbps,
        },
        TcpMetric {
            key: "gbps_from_app",
            label: "TCP bulk, host (app or kernel) → kernel peer, Gbit/s",
            unit: "Gbit/s",
            better: Better::Higher,
            trial: Trial::FromHost,
            value: gbps,
        },
        TcpMetric {
            key: "cpu_to_app",
            label: "machine CPU per GB, kernel peer → host",
            unit: "s/GB",
            better: Better::Lower,
            trial: Trial::ToHost,
            value: cpu_s_per_gb,
        },
        TcpMetric {
            key: "cpu_from_app",
            label: "machine CPU per GB, host → kernel peer",
            unit: "s/GB",
            better: Better::Lower,
            trial: Trial::FromHost,
            value: cpu_s_per_gb,
        },
        TcpMetric {
            key: "rtt_udp_p50",
            label: "UDP request/response round trip p50, 64 B",
            unit: "µs",
            better: Better::Lower,
            trial: Trial::Rtt,
            value: rtt,
        },
    ];
    let metrics = super::select(&metrics, &to.only, to.only_path.as_deref())?;
    let bed = Bed::new()?;
    let d = Duration::from_millis(o.duration_ms.max(200));
    let rtts = (o.rtt_iterations / 10).clamp(100, 100_000);
    let mut table = super::interleave(o.reps, &metrics, to.only_path.as_deref(), |t, nc| {
        if nc {
            nexus_trial(&bed, t, d, rtts, to.show_status)
        } else {
            kernel_trial(&bed, t, d, rtts, to.kernel_xdp)
        }
    })?;
    // The headline: the worse of the two directions.
    if let Some((_, worse)) = table
        .iter()
        .filter(|(k, _)| k.starts_with("gbps_"))
        .min_by(|a, b| a.1.ratio_median.total_cmp(&b.1.ratio_median))
    {
        let row = Row {
            label: "TCP bulk, the worse direction",
            ..worse.clone()
        };
        table.push(("gbps".to_owned(), row));
    }
    drop(bed);
    let kernel_path = if to.kernel_xdp {
        KERNEL_XDP_PATH
    } else {
        super::Bench::Tcp.kernel_path()
    };
    super::report_paths(o, super::Bench::Tcp, kernel_path, &table)
}

/// `netchannel bench-peer`: the kernel side in the namespace.
pub(crate) fn peer(mode: &str, addr: SocketAddr, duration_ms: u64) -> Result<(), String> {
    let print = |m: &Moved| -> Result<(), String> {
        let c = super::veth::Count {
            packets: m.bytes,
            secs: m.secs,
        };
        println!("{}", serde_json::to_string(&c).map_err(|e| e.to_string())?);
        Ok(())
    };
    match mode {
        "tcp-send" => {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let sent = pour(&c, Duration::from_millis(duration_ms)).map_err(|e| e.to_string())?;
            c.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            let _ = c.read(&mut [0u8; 16]);
            print(&Moved {
                bytes: sent,
                secs: duration_ms as f64 / 1e3,
            })
        }
        "tcp-recv" => {
            let l = TcpListener::bind(addr).map_err(|e| e.to_string())?;
            println!("ready");
            let (c, _) = l.accept().map_err(|e| e.to_string())?;
            let m = drain(&c).map_err(|e| e.to_string())?;
            drop(c);
            print(&m)
        }
        "udp-echo" => {
            let s = UdpSocket::bind(addr).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            println!("ready");
            let mut buf = [0u8; 2048];
            let mut n_echoed = 0u64;
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                if &buf[..n] == b"quit" {
                    break;
                }
                let _ = s.send_to(&buf[..n], from);
                n_echoed += 1;
            }
            print(&Moved {
                bytes: n_echoed,
                secs: 0.0,
            })
        }
        other => Err(format!("unknown bench-peer mode {other:?}")),
    }
}
