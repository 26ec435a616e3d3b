//! The two processes of one benchmark trial. The orchestrator starts the *server* side first
//! (it binds and prints `ready <addr>`), then the *client* side; each prints one JSON line of
//! results when done.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::sys::cpu_seconds;
use super::{nexus_path, pipe_path, udp_path};

/// Which transport a trial measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Path {
    /// The kernel: UDP over loopback.
    KernelUdp,
    /// A netchannel user pipe.
    Pipe,
    /// An app through a nexus (reflector) and back.
    Nexus,
}

/// What a trial measures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// One-way packets/s: the client sends `size`-byte packets in batches of `batch` for the
    /// duration, the server receives (and copies out) as many as it can.
    Throughput {
        size: usize,
        batch: usize,
        duration_ms: u64,
    },
    /// Ping-pong of one `size`-byte packet, `iterations` times.
    Rtt {
        size: usize,
        iterations: usize,
        wait: WaitMode,
    },
    /// A fixed offered load: `per_tick` packets every `per_tick / rate` seconds, the sender
    /// sleeping between ticks; measures CPU time per packet delivered.
    Paced {
        size: usize,
        per_tick: usize,
        rate: u64,
        duration_ms: u64,
    },
}

/// How a side waits for the next packet in a ping-pong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WaitMode {
    /// Poll without ever sleeping.
    Busy,
    /// Sleep at once (a doorbell or a blocking socket call for every packet).
    Blocking,
    /// netchannel's default: spin briefly, then sleep.
    Adaptive,
}

/// One trial, as passed to both worker processes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Spec {
    pub(crate) path: Path,
    pub(crate) kind: Kind,
}

/// What a worker reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Report {
    /// Packets sent (or round trips timed).
    pub(crate) packets: u64,
    /// Packets received by the receiving side of the trial (zero on the other side).
    pub(crate) received: u64,
    /// Seconds between the first and the last packet counted.
    pub(crate) secs: f64,
    /// CPU time (user + system) of this process.
    pub(crate) cpu_s: f64,
    /// Round-trip percentiles in nanoseconds (client of an RTT trial).
    pub(crate) rtt_p50_ns: Option<u64>,
    /// 99th percentile.
    pub(crate) rtt_p99_ns: Option<u64>,
}

/// How long a throughput client keeps sending past the measured window before giving up on a
/// server that should have hung up.
pub(crate) const SENDER_GRACE: Duration = Duration::from_secs(3);

/// The payload of packet `seq`: its sequence number, then a fixed pattern.
pub(crate) fn fill_payload(buf: &mut [u8], seq: u64) {
    if buf.len() >= 8 {
        buf[..8].copy_from_slice(&seq.to_le_bytes());
    }
}

/// Percentile of sorted samples.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Times `iterations` round trips (after a warm-up of a tenth as many) and fills the report.
pub(crate) fn time_round_trips(
    iterations: usize,
    mut round_trip: impl FnMut(u64) -> Result<(), String>,
) -> Result<Report, String> {
    for seq in 0..(iterations / 10) as u64 {
        round_trip(seq)?;
    }
    let mut samples = Vec::with_capacity(iterations);
    let start = Instant::now();
    for seq in 0..iterations as u64 {
        let t0 = Instant::now();
        round_trip(seq)?;
        samples.push(t0.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    Ok(Report {
        packets: iterations as u64,
        secs,
        rtt_p50_ns: Some(percentile(&samples, 0.5)),
        rtt_p99_ns: Some(percentile(&samples, 0.99)),
        ..Report::default()
    })
}

/// Tells the orchestrator this side is ready and where to find it.
pub(crate) fn announce_ready(addr: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {addr}")
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())
}

/// Pins this process to one CPU (ignored where the CPU does not exist).
fn pin(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        tracing::warn!(cpu, error = %e, "could not pin the worker; results will be noisier");
    }
}

/// Entry point of `netchannel bench-worker`.
pub(crate) fn run(
    spec: &str,
    server: bool,
    addr: Option<&str>,
    cpu: Option<usize>,
) -> Result<(), String> {
    let spec: Spec = serde_json::from_str(spec).map_err(|e| format!("bad worker spec: {e}"))?;
    pin(cpu);
    let mut report = match (spec.path, server) {
        (Path::Pipe, true) => pipe_path::server(&spec.kind, addr)?,
        (Path::Pipe, false) => pipe_path::client(&spec.kind, addr.ok_or("client needs --addr")?)?,
        (Path::KernelUdp, true) => udp_path::server(&spec.kind)?,
        (Path::KernelUdp, false) => {
            udp_path::client(&spec.kind, addr.ok_or("client needs --addr")?)?
        }
        (Path::Nexus, true) => nexus_path::server(&spec.kind)?,
        (Path::Nexus, false) => nexus_path::client(&spec.kind, addr.ok_or("client needs --addr")?)?,
    };
    report.cpu_s = cpu_seconds();
    let line = serde_json::to_string(&report).map_err(|e| e.to_string())?;
    println!("{line}");
    Ok(())
}
