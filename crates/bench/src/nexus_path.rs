//! Benchmark sides through a nexus: the server side *is* a nexus (the daemon's library, default
//! configuration, on a private socket), the client side is an app whose packets the nexus
//! validates, copies and reflects back on the same channel.

use std::time::{Duration, Instant};

use netchannel::nexus::{Channel, ChannelOptions, Nexus};
use netchannel::{Error, Interest, Packet, WaitPolicy};

use super::worker::{Kind, Report, WaitMode, announce_ready, fill_payload, time_round_trips};

/// Runs a nexus until SIGTERM (sent by the orchestrator once the app side is done). Its
/// configuration is the default, except for the strictly blocking round trip, where the nexus
/// too sleeps at once (no spinning, no coalescing) so that every packet wakes it.
pub(crate) fn server(kind: &Kind) -> Result<Report, String> {
    let socket = std::env::temp_dir().join(format!("netchannel-bench-{}.sock", std::process::id()));
    let mut cfg = netchannel_nexus::Config::default();
    cfg.control.socket = socket.clone();
    if matches!(
        kind,
        Kind::Rtt {
            wait: WaitMode::Blocking,
            ..
        }
    ) {
        cfg.datapath.spin_us = 0;
        cfg.datapath.coalesce_us = 0;
    }
    let mut nexus = netchannel_nexus::Nexus::new(cfg).map_err(|e| e.to_string())?;
    announce_ready(&socket.display().to_string())?;
    nexus.run().map_err(|e| e.to_string())?;
    Ok(Report::default())
}

pub(crate) fn client(kind: &Kind, socket: &str) -> Result<Report, String> {
    let mut nexus = Nexus::connect(socket).map_err(|e| e.to_string())?;
    let mut ch = nexus
        .open_channel(ChannelOptions::default())
        .map_err(|e| e.to_string())?;
    ch.wait(Interest::Buffers, Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    match *kind {
        Kind::Throughput {
            size,
            batch,
            duration_ms,
        } => reflect_flood(&mut ch, size, batch, Duration::from_millis(duration_ms)),
        Kind::Rtt {
            size,
            iterations,
            wait,
        } => ping(&mut ch, size, iterations, wait),
        Kind::Paced {
            size,
            per_tick,
            rate,
            duration_ms,
        } => paced(
            &mut ch,
            size,
            per_tick,
            rate,
            Duration::from_millis(duration_ms),
        ),
    }
}

/// Fills up to `n` packets of `size` bytes into `pkts` from buffers the nexus supplied.
fn fill(ch: &mut Channel, pkts: &mut Vec<Packet>, n: usize, size: usize, seq: &mut u64) {
    while pkts.len() < n {
        let Some(buf) = ch.alloc() else { break };
        let Some(bytes) = ch.buffer_mut(buf) else {
            break;
        };
        fill_payload(&mut bytes[..size], *seq);
        *seq += 1;
        pkts.push(Packet {
            buf,
            offset: 0,
            len: size as u32,
        });
    }
}

/// Receives whatever is waiting (up to `max`), reads each payload once, frees the buffers.
fn drain(
    ch: &mut Channel,
    got: &mut Vec<Packet>,
    max: usize,
    sum: &mut u64,
) -> Result<usize, String> {
    got.clear();
    let n = ch.recv(got, max).map_err(|e| e.to_string())?;
    for p in got.iter() {
        *sum = sum.wrapping_add(u64::from(ch.payload(p).first().copied().unwrap_or(0)));
    }
    ch.free(got.iter().map(|p| p.buf))
        .map_err(|e| e.to_string())?;
    Ok(n)
}

/// Keeps the nexus busy with batches and counts the packets that come back.
fn reflect_flood(
    ch: &mut Channel,
    size: usize,
    batch: usize,
    window: Duration,
) -> Result<Report, String> {
    let (mut seq, mut sum, mut received) = (0u64, 0u64, 0u64);
    let mut pkts = Vec::with_capacity(batch);
    let mut got = Vec::with_capacity(batch * 2);
    let mut start: Option<Instant> = None;
    loop {
        fill(ch, &mut pkts, batch, size, &mut seq);
        let sent = ch.send(&pkts).map_err(|e| e.to_string())?;
        pkts.drain(..sent);
        let n = drain(ch, &mut got, batch * 2, &mut sum)?;
        if n > 0 {
            let t0 = *start.get_or_insert_with(Instant::now);
            received += n as u64;
            if t0.elapsed() >= window {
                std::hint::black_box(sum);
                return Ok(Report {
                    received,
                    secs: t0.elapsed().as_secs_f64(),
                    ..Report::default()
                });
            }
        } else if sent == 0 {
            ch.wait(Interest::Readable, Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
        }
    }
}

/// Round trips app → nexus → app of one packet.
fn ping(
    ch: &mut Channel,
    size: usize,
    iterations: usize,
    mode: WaitMode,
) -> Result<Report, String> {
    ch.set_wait_policy(match mode {
        WaitMode::Blocking => WaitPolicy {
            spin: Duration::ZERO,
        },
        WaitMode::Busy | WaitMode::Adaptive => WaitPolicy::default(),
    });
    let mut pkts = Vec::with_capacity(1);
    let mut got = Vec::with_capacity(4);
    let mut seq = 0u64;
    time_round_trips(iterations, |_| {
        pkts.clear();
        while pkts.is_empty() {
            fill(ch, &mut pkts, 1, size, &mut seq);
            if pkts.is_empty() {
                ch.wait(Interest::Buffers, Some(Duration::from_secs(5)))
                    .map_err(|e| e.to_string())?;
            }
        }
        if ch.send(&pkts).map_err(|e| e.to_string())? != 1 {
            return Err("TX ring full in a ping-pong".into());
        }
        loop {
            got.clear();
            if ch.recv(&mut got, 4).map_err(|e| e.to_string())? > 0 {
                ch.free(got.iter().map(|p| p.buf))
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            if mode != WaitMode::Busy {
                ch.wait(Interest::Readable, Some(Duration::from_secs(5)))
                    .map_err(|e| e.to_string())?;
            }
        }
    })
}

/// Sends `per_tick` packets every `per_tick / rate` seconds, sleeping between ticks, and takes
/// the reflections of earlier ticks when it wakes: the offered load of the CPU comparison.
fn paced(
    ch: &mut Channel,
    size: usize,
    per_tick: usize,
    rate: u64,
    window: Duration,
) -> Result<Report, String> {
    let tick = Duration::from_secs_f64(per_tick as f64 / rate as f64);
    let (mut seq, mut sum, mut received) = (0u64, 0u64, 0u64);
    let mut pkts = Vec::with_capacity(per_tick);
    let mut got = Vec::with_capacity(per_tick * 4);
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < window {
        received += drain(ch, &mut got, per_tick * 4, &mut sum)? as u64;
        fill(ch, &mut pkts, per_tick, size, &mut seq);
        let sent = ch.send(&pkts).map_err(|e| e.to_string())?;
        pkts.drain(..sent);
        next += tick;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    // Collect the last reflections.
    let end = Instant::now() + Duration::from_millis(50);
    while Instant::now() < end {
        match ch.wait(Interest::Readable, Some(Duration::from_millis(10))) {
            Ok(()) => received += drain(ch, &mut got, per_tick * 4, &mut sum)? as u64,
            Err(Error::TimedOut) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    std::hint::black_box(sum);
    Ok(Report {
        received,
        secs: start.elapsed().as_secs_f64(),
        packets: seq,
        ..Report::default()
    })
}
