//! Benchmark sides over a netchannel user pipe. The server side listens (and is the receiver or
//! the echoing side); the client connects (and is the sender or the timing side).

use std::time::{Duration, Instant};

use netchannel::pipe::{PipeListener, UserPipe};
use netchannel::{Error, Geometry, Interest, Packet, WaitPolicy};

use super::worker::{
    Kind, Report, SENDER_GRACE, WaitMode, announce_ready, fill_payload, time_round_trips,
};

fn geometry() -> Geometry {
    Geometry::default()
}

fn policy(mode: WaitMode) -> WaitPolicy {
    match mode {
        WaitMode::Busy | WaitMode::Adaptive => WaitPolicy::default(),
        WaitMode::Blocking => WaitPolicy {
            spin: Duration::ZERO,
        },
    }
}

pub(crate) fn server(kind: &Kind, addr: Option<&str>) -> Result<Report, String> {
    let addr = addr.map_or_else(
        || format!("@netchannel-bench-{}", std::process::id()),
        str::to_owned,
    );
    let listener = PipeListener::bind(&addr).map_err(|e| e.to_string())?;
    announce_ready(&addr)?;
    let mut pipe = listener.accept(geometry()).map_err(|e| e.to_string())?;
    match *kind {
        Kind::Throughput {
            batch, duration_ms, ..
        } => receive(&mut pipe, batch, Duration::from_millis(duration_ms)),
        Kind::Rtt { wait, .. } => echo(&mut pipe, wait),
        Kind::Paced { .. } => Err("paced trials are not defined for user pipes".into()),
    }
}

pub(crate) fn client(kind: &Kind, addr: &str) -> Result<Report, String> {
    let mut pipe = UserPipe::connect(addr).map_err(|e| e.to_string())?;
    match *kind {
        Kind::Throughput {
            size,
            batch,
            duration_ms,
        } => send(
            &mut pipe,
            size,
            batch,
            Duration::from_millis(duration_ms) + SENDER_GRACE,
        ),
        Kind::Rtt {
            size,
            iterations,
            wait,
        } => ping(&mut pipe, size, iterations, wait),
        Kind::Paced { .. } => Err("paced trials are not defined for user pipes".into()),
    }
}

/// Receives for `window` after the first packet, copying every payload out once (as a socket
/// `recv` would), and gives the buffers back.
fn receive(pipe: &mut UserPipe, batch: usize, window: Duration) -> Result<Report, String> {
    let mut pkts = Vec::with_capacity(batch);
    let mut scratch = vec![0u8; 65536];
    let mut sum = 0u64;
    let mut count = 0u64;
    let mut start: Option<Instant> = None;
    loop {
        pkts.clear();
        let n = pipe.recv(&mut pkts, batch).map_err(|e| e.to_string())?;
        if n == 0 {
            match pipe.wait(Interest::Readable, Some(Duration::from_secs(5))) {
                Ok(()) => continue,
                Err(e) => return Err(format!("receiver: {e}")),
            }
        }
        let t0 = *start.get_or_insert_with(Instant::now);
        for p in &pkts {
            let data = pipe.payload(p);
            scratch[..data.len()].copy_from_slice(data);
            sum = sum.wrapping_add(u64::from(scratch[0]));
        }
        pipe.free(pkts.iter().map(|p| p.buf))
            .map_err(|e| e.to_string())?;
        count += n as u64;
        if t0.elapsed() >= window {
            std::hint::black_box(sum);
            return Ok(Report {
                received: count,
                secs: t0.elapsed().as_secs_f64(),
                ..Report::default()
            });
        }
    }
}

/// Sends `size`-byte packets in batches until the receiver hangs up (or `limit` passes).
fn send(pipe: &mut UserPipe, size: usize, batch: usize, limit: Duration) -> Result<Report, String> {
    let start = Instant::now();
    let mut seq = 0u64;
    let mut pkts: Vec<Packet> = Vec::with_capacity(batch);
    while start.elapsed() < limit {
        while pkts.len() < batch {
            let Some(buf) = pipe.alloc() else { break };
            let Some(bytes) = pipe.buffer_mut(buf) else {
                break;
            };
            fill_payload(&mut bytes[..size], seq);
            seq += 1;
            pkts.push(Packet {
                buf,
                offset: 0,
                len: size as u32,
            });
        }
        let sent = match pipe.send(&pkts) {
            Ok(n) => n,
            Err(netchannel::SendError::Channel(Error::PeerGone)) => break,
            Err(e) => return Err(format!("sender: {e}")),
        };
        pkts.drain(..sent);
        let want = if pkts.len() < batch {
            Interest::Buffers
        } else {
            Interest::Writable
        };
        if sent == 0 || pkts.len() == batch {
            match pipe.wait(want, Some(Duration::from_millis(200))) {
                Ok(()) | Err(Error::TimedOut) => {}
                Err(Error::PeerGone) => break,
                Err(e) => return Err(format!("sender: {e}")),
            }
        }
        if sent == 0 && pipe.peer_gone() {
            break;
        }
    }
    Ok(Report {
        packets: seq,
        secs: start.elapsed().as_secs_f64(),
        ..Report::default()
    })
}

/// Waits for one packet per the wait mode; `Ok(false)` when the peer has gone.
fn recv_one(pipe: &mut UserPipe, pkts: &mut Vec<Packet>, mode: WaitMode) -> Result<bool, String> {
    loop {
        pkts.clear();
        match pipe.recv(pkts, 1) {
            Ok(0) => {}
            Ok(_) => return Ok(true),
            // A busy poller learns of the peer's departure from `recv` itself.
            Err(Error::PeerGone) => return Ok(false),
            Err(e) => return Err(e.to_string()),
        }
        match mode {
            WaitMode::Busy => std::hint::spin_loop(),
            WaitMode::Blocking | WaitMode::Adaptive => {
                match pipe.wait(Interest::Readable, Some(Duration::from_secs(5))) {
                    Ok(()) => {}
                    Err(Error::PeerGone) => return Ok(false),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    }
}

/// Sends every packet straight back, zero-copy, until the peer hangs up.
fn echo(pipe: &mut UserPipe, mode: WaitMode) -> Result<Report, String> {
    pipe.set_wait_policy(policy(mode));
    let mut pkts = Vec::with_capacity(1);
    let mut n = 0u64;
    while recv_one(pipe, &mut pkts, mode)? {
        pipe.send(&pkts).map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(Report {
        packets: n,
        ..Report::default()
    })
}

/// Times round trips of one packet that travels there and back in the same buffer.
fn ping(
    pipe: &mut UserPipe,
    size: usize,
    iterations: usize,
    mode: WaitMode,
) -> Result<Report, String> {
    pipe.set_wait_policy(policy(mode));
    let buf = pipe.alloc().ok_or("no buffer in a fresh pipe")?;
    let mut pkt = Packet {
        buf,
        offset: 0,
        len: size as u32,
    };
    let mut pkts = Vec::with_capacity(1);
    time_round_trips(iterations, |seq| {
        let bytes = pipe.buffer_mut(pkt.buf).ok_or("lost the ping buffer")?;
        fill_payload(&mut bytes[..size], seq);
        if pipe.send(&[pkt]).map_err(|e| e.to_string())? != 1 {
            return Err("ring full in a ping-pong".into());
        }
        if !recv_one(pipe, &mut pkts, mode)? {
            return Err("the echo side went away".into());
        }
        pkt = pkts[0];
        Ok(())
    })
}
