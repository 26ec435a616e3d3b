//! Benchmark sides over kernel UDP on loopback: the baseline every netchannel figure is divided
//! by. Batches use `sendmmsg`/`recvmmsg`; batch 1 uses plain `send`/`recv`.

use std::io::ErrorKind;
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::sys::MsgBatch;
use super::worker::{
    Kind, Report, SENDER_GRACE, WaitMode, announce_ready, fill_payload, time_round_trips,
};

/// How long a server waits for a packet before deciding the client is gone.
const IDLE: Duration = Duration::from_secs(3);

fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

pub(crate) fn server(kind: &Kind) -> Result<Report, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(io("bind"))?;
    sock.set_read_timeout(Some(IDLE))
        .map_err(io("SO_RCVTIMEO"))?;
    announce_ready(&sock.local_addr().map_err(io("local_addr"))?.to_string())?;
    match *kind {
        Kind::Throughput {
            size,
            batch,
            duration_ms,
        } => receive(&sock, size, batch, Duration::from_millis(duration_ms)),
        Kind::Rtt { size, wait, .. } => echo(&sock, size, wait),
        Kind::Paced { size, per_tick, .. } => receive_until_done(&sock, size, per_tick),
    }
}

pub(crate) fn client(kind: &Kind, addr: &str) -> Result<Report, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(io("bind"))?;
    sock.connect(addr).map_err(io("connect"))?;
    match *kind {
        Kind::Throughput {
            size,
            batch,
            duration_ms,
        } => send(
            &sock,
            size,
            batch,
            Duration::from_millis(duration_ms) + SENDER_GRACE,
        ),
        Kind::Rtt {
            size,
            iterations,
            wait,
        } => ping(&sock, size, iterations, wait),
        Kind::Paced {
            size,
            per_tick,
            rate,
            duration_ms,
        } => paced(
            &sock,
            size,
            per_tick,
            rate,
            Duration::from_millis(duration_ms),
        ),
    }
}

fn receive(
    sock: &UdpSocket,
    size: usize,
    batch: usize,
    window: Duration,
) -> Result<Report, String> {
    let mut msgs = MsgBatch::new(batch, size.max(64));
    let mut one = vec![0u8; size.max(64)];
    let mut count = 0u64;
    let mut sum = 0u64;
    let mut start: Option<Instant> = None;
    loop {
        let n = if batch == 1 {
            match sock.recv(&mut one) {
                Ok(_) => {
                    sum = sum.wrapping_add(u64::from(one[0]));
                    1
                }
                Err(e) => return Err(format!("recv: {e}")),
            }
        } else {
            let n = msgs
                .recv(sock.as_fd(), batch, false)
                .map_err(io("recvmmsg"))?;
            for i in 0..n {
                if msgs.received_len(i) > 0 {
                    sum = sum.wrapping_add(u64::from(msgs.buf(i)[0]));
                }
            }
            n
        };
        let t0 = *start.get_or_insert_with(Instant::now);
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

fn send(sock: &UdpSocket, size: usize, batch: usize, limit: Duration) -> Result<Report, String> {
    let mut msgs = MsgBatch::new(batch, size);
    let mut one = vec![0u8; size];
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < limit {
        let r = if batch == 1 {
            fill_payload(&mut one, seq);
            sock.send(&one).map(|_| 1)
        } else {
            for i in 0..batch {
                fill_payload(msgs.buf_mut(i), seq + i as u64);
            }
            msgs.send(sock.as_fd(), batch)
        };
        match r {
            Ok(n) => seq += n as u64,
            // The receiver has finished and closed its socket.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("send: {e}")),
        }
    }
    Ok(Report {
        packets: seq,
        secs: start.elapsed().as_secs_f64(),
        ..Report::default()
    })
}

/// Receives one datagram per the wait mode (busy: non-blocking polling).
fn recv_one(
    sock: &UdpSocket,
    buf: &mut [u8],
    mode: WaitMode,
) -> Result<Option<(usize, std::net::SocketAddr)>, String> {
    loop {
        match sock.recv_from(buf) {
            Ok(r) => return Ok(Some(r)),
            Err(e) if e.kind() == ErrorKind::WouldBlock && mode == WaitMode::Busy => {
                std::hint::spin_loop()
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None);
            }
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
}

/// Echoes datagrams until a one-byte "done" datagram or a long silence.
fn echo(sock: &UdpSocket, size: usize, mode: WaitMode) -> Result<Report, String> {
    sock.set_nonblocking(mode == WaitMode::Busy)
        .map_err(io("O_NONBLOCK"))?;
    let mut buf = vec![0u8; size.max(64)];
    let mut n = 0u64;
    let mut last = Instant::now();
    loop {
        match recv_one(sock, &mut buf, mode)? {
            Some((1, _)) => break,
            Some((len, from)) => {
                sock.send_to(&buf[..len], from).map_err(io("send_to"))?;
                n += 1;
                last = Instant::now();
            }
            None if last.elapsed() > IDLE => break,
            None => {}
        }
    }
    Ok(Report {
        packets: n,
        ..Report::default()
    })
}

fn ping(
    sock: &UdpSocket,
    size: usize,
    iterations: usize,
    mode: WaitMode,
) -> Result<Report, String> {
    sock.set_nonblocking(mode == WaitMode::Busy)
        .map_err(io("O_NONBLOCK"))?;
    sock.set_read_timeout(Some(IDLE))
        .map_err(io("SO_RCVTIMEO"))?;
    let mut out = vec![0u8; size.max(2)];
    let mut back = vec![0u8; size.max(64)];
    let report = time_round_trips(iterations, |seq| {
        fill_payload(&mut out, seq);
        sock.send(&out).map_err(io("send"))?;
        match recv_one(sock, &mut back, mode)? {
            Some(_) => Ok(()),
            None => Err("no echo within the idle limit".into()),
        }
    });
    let _ = sock.send(&[0u8]); // tell the echo side we are done
    report
}

/// Receives in batches (blocking `recvmmsg`) until the one-byte "done" datagram.
fn receive_until_done(sock: &UdpSocket, size: usize, batch: usize) -> Result<Report, String> {
    let mut msgs = MsgBatch::new(batch, size.max(64));
    let (mut received, mut sum) = (0u64, 0u64);
    let start = Instant::now();
    loop {
        let n = match msgs.recv(sock.as_fd(), batch, false) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("the paced sender went silent".into());
            }
            Err(e) => return Err(format!("recvmmsg: {e}")),
        };
        for i in 0..n {
            if msgs.received_len(i) == 1 {
                std::hint::black_box(sum);
                return Ok(Report {
                    received,
                    secs: start.elapsed().as_secs_f64(),
                    ..Report::default()
                });
            }
            sum = sum.wrapping_add(u64::from(msgs.buf(i)[0]));
            received += 1;
        }
    }
}

/// Sends `per_tick` datagrams (one `sendmmsg`) every `per_tick / rate` seconds, sleeping
/// between ticks, then the "done" datagram.
fn paced(
    sock: &UdpSocket,
    size: usize,
    per_tick: usize,
    rate: u64,
    window: Duration,
) -> Result<Report, String> {
    let tick = Duration::from_secs_f64(per_tick as f64 / rate as f64);
    let mut msgs = MsgBatch::new(per_tick, size);
    let start = Instant::now();
    let mut next = start;
    let mut seq = 0u64;
    while start.elapsed() < window {
        for i in 0..per_tick {
            fill_payload(msgs.buf_mut(i), seq + i as u64);
        }
        seq += msgs.send(sock.as_fd(), per_tick).map_err(io("sendmmsg"))? as u64;
        next += tick;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // The end marker is a datagram too: a receiver that fell behind (a descheduled worker on
    // a busy machine) has a full receive buffer that drops it. Repeat it, spaced out, until the
    // receiver has gone (its closed port refuses us) or the receiver's own idle limit passes.
    let give_up = Instant::now() + IDLE;
    while Instant::now() < give_up {
        match sock.send(&[0u8]) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Ok(Report {
        packets: seq,
        secs,
        ..Report::default()
    })
}
