//! `nexus_app`: an app of a nexus daemon, playing a scripted role for the multi-process tests.
//!
//! ```text
//! nexus_app stream SOCKET           open a channel, then send stream packets (see the library
//!                                   docs for their format), check their reflections and free
//!                                   them, forever, holding buffers (allocated and unsent, or
//!                                   received and unfreed) at random moments; prints
//!                                   `ready CHANNEL` once the first reflection is checked
//! nexus_app healthy SOCKET SECS     open a channel, print `ready`; for each line `go` on stdin,
//!                                   stream 64-byte packets for SECS seconds and print
//!                                   `rate MEDIAN samples S1 S2 ...` (reflected packets per
//!                                   second, one sample per 100 ms); exit at end of stdin
//! nexus_app hostile SOCKET CASE     open a channel, print `channel ID`, wait for `go`, break
//!                                   the protocol as CASE says (below)
//! nexus_app flood SOCKET            open a channel and push invalid descriptors on TX and FREE
//!                                   as fast as the nexus takes them, forever; prints `ready`
//!                                   after the first batch was consumed
//! nexus_app attack SOCKET CASE      open a channel, print `ready`, wait for `go`, attack the
//!                                   nexus through what an app holds (below), print what the
//!                                   attack got, and keep at it until stdin ends
//! nexus_app many SOCKET N           open N small channels (64 buffers, rings of 64), print
//!                                   `opened N`, and hold them until stdin ends
//! nexus_app burn                    print `ready` and spin on the CPU forever (the control
//!                                   load of the throughput test)
//! nexus_app wait SOCKET             open a channel, print `waiting CHANNEL`, block in
//!                                   `wait(Readable)` and print `outcome ERROR` (the error's
//!                                   Debug form), or `outcome ok` if a packet came
//! nexus_app user SOCKET N [VICTIM]  (run as an unprivileged user) try to open N channels, then
//!                                   a low-latency one, printing `open ok ID` or
//!                                   `open refused CODE` for each; then try to revoke channel
//!                                   VICTIM (`defunct ok` / `defunct refused CODE`); print
//!                                   `status UIDS` (the uid of every channel the status shows);
//!                                   keep the channels open until stdin ends
//! nexus_app user-flows SOCKET N      (unprivileged) open a channel and try N UDP flows on
//!                                   ephemeral ports, printing `flow ok` or `flow refused CODE`
//!                                   for each; keep them until stdin ends
//! nexus_app user-connections SOCKET N  (unprivileged) open N more control connections, each
//!                                   asking for the status: `connect ok` or
//!                                   `connect refused CODE`; keep them until stdin ends
//! ```
//!
//! Per-descriptor hostile cases first make one valid round trip (a warm-up: afterwards the
//! nexus has topped the ALLOC ring up and, as long as we do not take from it, supplies nothing,
//! so which buffer it hands out next does not depend on timing), commit their violation, print
//! `violated` and then, after [`VALID_AFTER_VIOLATIONS`] valid round trips (one at a time, so
//! the nexus has taken everything published before), `done OTHERS` where OTHERS counts
//! reflected packets other than the warm-up and the valid ones: `bad-index`, `bad-desc`
//! (offset + length overflow shapes), `lie-len` (length beyond the buffer), `forged` (indices
//! the nexus never handed out), `double-submit` (a buffer sent, then pushed again on TX),
//! `double-free` (a buffer freed, then pushed again on FREE), `free-unowned` (never handed out,
//! on FREE), `free-bad-index`, `bad-flags`. (The double cases make their first submission with
//! the library, so that this app's own ledger agrees with the nexus's afterwards.)
//!
//! Cases that end the channel print `defunct ERROR after USus`: `index-oob` (corrupt TX
//! producer index), `rx-index-oob` (corrupt RX consumer index, then traffic until the nexus
//! needs RX room), `strikes` (bad descriptors, 8 at a time, until the nexus quarantines the
//! channel; prints `quarantined after N violations` first). `write-ro` tries
//! to write the nexus's sealed region and exits 0 only if the kernel refused both ways.
//! After its last line a hostile app keeps its channel open until stdin ends.
//!
//! Attacks on the nexus's loop (issue 13), through the app's own fds: `bell-block` makes its
//! doorbell end blocking, keeps the nexus ringing it (RX armed, packets reflected, the bell
//! never read) and fills the nexus's end from a thread with blocking writes; `bell-steal` makes
//! it blocking and reads it from a thread of its own, blocking, while it streams; both print
//! `attacking`. `bell-shut` shuts its end for writing and prints `closed ERROR` when the
//! channel ends; `bell-fds` tries to pass fds through its end and prints `fds RESULT`; `seal`
//! tries to add F_SEAL_FUTURE_WRITE to its pool's memfd and prints `seal RESULT`, then goes
//! idle (so the nexus trims the pool). `status-flood` opens as many channels of 65,536
//! buffers as the user may (64 by default), prints `ready`, and on `go` asks for the status
//! from 8 connections as fast as the nexus answers, printing `attacking` after the first
//! answers and `asked N` (the requests answered) when stdin ends. `churn` opens and closes
//! channels of 65,536 buffers from 4 connections as fast as the nexus lets it.
//!
//! Exit codes: 0 success, 1 failure (message on stderr), 2 bad usage.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netchannel::nexus::{Channel, ChannelOptions, Nexus};
use netchannel::{DefunctReason, Error, Interest, Packet, SendError};
use netchannel_shm::Desc;
use netchannel_tests::{
    DOUBLE_PAYLOAD, VALID_AFTER_VIOLATIONS, XorShift, check_packet, fill_packet, valid_payload,
};

/// Longest an app waits for anything before giving up with an error.
const WAIT: Duration = Duration::from_secs(30);

/// The bogus ring index of the `*index-oob` cases.
const HUGE_INDEX: u32 = 1 << 30;

const USAGE: &str = "usage: nexus_app <stream SOCKET | healthy SOCKET SECS | hostile SOCKET CASE \
                     | flood SOCKET | burn | wait SOCKET | user SOCKET N [VICTIM] \
                     | user-flows SOCKET N | user-connections SOCKET N>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["burn"] => burn(),
        ["stream", sock] => open(sock).and_then(|(_n, mut ch)| stream(&mut ch)),
        ["healthy", sock, secs] => match secs.parse::<f64>() {
            Ok(s) if s > 0.0 => open(sock).and_then(|(_n, mut ch)| healthy(&mut ch, s)),
            _ => Err(format!("{secs:?} is not a positive number of seconds")),
        },
        ["hostile", sock, case] => open(sock).and_then(|(_n, mut ch)| hostile(&mut ch, case)),
        ["flood", sock] => open(sock).and_then(|(_n, mut ch)| flood(&mut ch)),
        ["attack", sock, "status-flood"] => status_flood(sock, false),
        ["attack", sock, "idle-channels"] => status_flood(sock, true),
        ["attack", sock, "churn"] => churn(sock),
        ["many", sock, n] => number(n).and_then(|n| many(sock, n)),
        ["attack", sock, case] => open(sock).and_then(|(_n, mut ch)| attack(&mut ch, case)),
        ["wait", sock] => open(sock).and_then(|(_n, mut ch)| wait_blocked(&mut ch)),
        ["user", sock, n] => number(n).and_then(|n| user(sock, n, None)),
        ["user", sock, n, victim] => {
            number(n).and_then(|n| number(victim).and_then(|v| user(sock, n, Some(v))))
        }
        ["user-flows", sock, n] => number(n).and_then(|n| user_flows(sock, n)),
        ["user-connections", sock, n] => number(n).and_then(|n| user_connections(sock, n)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("nexus_app {}: {msg}", args.join(" "));
            ExitCode::FAILURE
        }
    }
}

/// Connects and opens a channel with the nexus's defaults (the connection must outlive the
/// channel: its hang-up is the app's death notice).
fn open(sock: &str) -> Result<(Nexus, Channel), String> {
    let mut nexus = Nexus::connect(sock).map_err(|e| format!("connect: {e}"))?;
    let ch = nexus
        .open_channel(ChannelOptions::default())
        .map_err(|e| format!("open_channel: {e}"))?;
    Ok((nexus, ch))
}

/// Prints one line at once (stdout is a pipe: flush, the test is waiting for it).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reads one line of stdin; `None` at end of file (the test went away).
fn read_line() -> Option<String> {
    let mut s = String::new();
    match std::io::stdin().lock().read_line(&mut s) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(s.trim().to_owned()),
    }
}

fn chan(what: &'static str) -> impl Fn(Error) -> String {
    move |e| format!("{what}: {e}")
}

/// A send error is either a channel error or a bug in this program.
fn sent(r: Result<usize, SendError>) -> Result<usize, String> {
    r.map_err(|e| match e {
        SendError::Channel(e) => format!("send: {e}"),
        SendError::Invalid(v) => format!("nexus_app sent a packet it does not hold: {v}"),
    })
}

fn freed(r: Result<(), SendError>) -> Result<(), String> {
    r.map_err(|e| format!("free: {e}"))
}

/// A buffer of the nexus's, allocated (waiting for the ALLOC ring if needed).
fn alloc(ch: &mut Channel) -> Result<u32, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(b) = ch.alloc() {
            return Ok(b);
        }
        if Instant::now() > deadline {
            return Err("no buffer came on the ALLOC ring".into());
        }
        // `wait(Buffers)` alone may spin on a defunct channel (see the nexus_daemon test
        // `regression_wait_for_buffers_fails_on_a_defunct_channel`).
        ch.check().map_err(chan("allocating"))?;
        ch.wait(Interest::Buffers, Some(WAIT))
            .map_err(chan("waiting for buffers"))?;
    }
}

/// A packet in a fresh buffer holding `bytes`.
fn packet(ch: &mut Channel, bytes: &[u8]) -> Result<Packet, String> {
    let buf = alloc(ch)?;
    ch.buffer_mut(buf).expect("a buffer just allocated is held")[..bytes.len()]
        .copy_from_slice(bytes);
    Ok(Packet {
        buf,
        offset: 0,
        len: bytes.len() as u32,
    })
}

fn desc(buf: u32, offset: u32, len: u32, flags: u32) -> Desc {
    Desc {
        buf,
        offset,
        len,
        flags,
    }
}

// ---------------------------------------------------------------------------------------------

/// Reflections a `stream` app lets be outstanding: half the default ring (the nexus's
/// `channel.ring_slots`).
const STREAM_IN_FLIGHT: u64 = 512;

fn burn() -> Result<(), String> {
    say("ready");
    let mut x = 1u64;
    loop {
        x = std::hint::black_box(x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7));
    }
}

/// Streams checked packets forever, holding buffers at random moments. Every reflection must
/// come back, in order: at most [`STREAM_IN_FLIGHT`] packets are out at once, well under the RX
/// ring's slots (a reflector whose app does not keep up drops what its RX ring cannot hold,
/// as `rx_ring_full`, which is right for it and no loss to complain of here).
fn stream(ch: &mut Channel) -> Result<(), String> {
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = XorShift::new(seed);
    let id = ch.id();
    // Allocated and not sent yet; received and not freed yet.
    let mut unsent: Vec<u32> = Vec::with_capacity(512);
    let mut received: Vec<u32> = Vec::with_capacity(512);
    let mut pkts: Vec<Packet> = Vec::with_capacity(64);
    let mut got: Vec<Packet> = Vec::with_capacity(64);
    let (mut next_seq, mut expect) = (0u64, 0u64);
    let mut ready = false;
    loop {
        let mut moved = 0;
        for _ in 0..rng.below(40) {
            match ch.alloc() {
                Some(b) => unsent.push(b),
                None => break,
            }
        }
        let room = STREAM_IN_FLIGHT.saturating_sub(next_seq - expect) as usize;
        let k = (rng.below(unsent.len() as u64 + 1) as usize).min(room);
        pkts.clear();
        for (i, &b) in unsent[..k].iter().enumerate() {
            let bytes = ch.buffer_mut(b).expect("an allocated buffer is held");
            let len = fill_packet(next_seq + i as u64, bytes);
            pkts.push(Packet {
                buf: b,
                offset: 0,
                len: len as u32,
            });
        }
        let n = sent(ch.send(&pkts))?;
        unsent.drain(..n);
        next_seq += n as u64;
        moved += n;

        got.clear();
        let r = ch.recv(&mut got, 64).map_err(chan("recv"))?;
        for p in &got {
            match check_packet(ch.payload(p)) {
                Ok(seq) if seq == expect => expect += 1,
                Ok(seq) => return Err(format!("reflection {seq} came, expected {expect}")),
                Err(e) => return Err(format!("reflection {expect}: {e}")),
            }
            received.push(p.buf);
        }
        moved += r;
        if !ready && expect > 0 {
            say(&format!("ready {id}"));
            ready = true;
        }

        let f = if received.len() > 256 {
            received.len()
        } else {
            rng.below(received.len() as u64 + 1) as usize
        };
        freed(ch.free(received.drain(..f)))?;
        if unsent.len() > 256 || rng.below(16) == 0 {
            let u = rng.below(unsent.len() as u64 + 1) as usize;
            freed(ch.free(unsent.drain(..u)))?;
        }
        if moved == 0 {
            let interest = if next_seq > expect {
                Interest::Readable
            } else {
                Interest::Buffers
            };
            match ch.wait(interest, Some(Duration::from_secs(1))) {
                Ok(()) | Err(Error::TimedOut) => {}
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
    }
}

/// Reflected 64-byte packets per second, sampled every 100 ms, for `secs` seconds after each
/// `go` line.
fn healthy(ch: &mut Channel, secs: f64) -> Result<(), String> {
    const IN_FLIGHT: u64 = 128;
    const SAMPLE: Duration = Duration::from_millis(100);
    let payload = [0x5au8; 64];
    let mut pkts: Vec<Packet> = Vec::with_capacity(32);
    let mut got: Vec<Packet> = Vec::with_capacity(64);
    // One round trip before announcing readiness.
    let p = packet(ch, &payload)?;
    sent(ch.send(&[p]))?;
    while ch.recv(&mut got, 1).map_err(chan("recv"))? == 0 {
        ch.wait(Interest::Readable, Some(WAIT))
            .map_err(chan("waiting for the first reflection"))?;
    }
    freed(ch.free(got.drain(..).map(|p| p.buf)))?;
    say("ready");
    // Counted over the app's life: packets still in flight at the end of a phase come back in
    // the next one, and must count against IN_FLIGHT there.
    let (mut sent_n, mut recv_n) = (0u64, 0u64);
    while let Some(line) = read_line() {
        if line != "go" {
            return Err(format!("expected `go`, got {line:?}"));
        }
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut next_sample = start + SAMPLE;
        let mut at_sample = recv_n;
        let mut samples: Vec<u64> = Vec::new();
        loop {
            let now = Instant::now();
            if now >= next_sample {
                samples.push((recv_n - at_sample) * 1000 / SAMPLE.as_millis() as u64);
                at_sample = recv_n;
                next_sample += SAMPLE;
                if next_sample > end {
                    break;
                }
            }
            pkts.clear();
            while pkts.len() < 32 && sent_n + (pkts.len() as u64) < recv_n + IN_FLIGHT {
                let Some(buf) = ch.alloc() else { break };
                ch.buffer_mut(buf).expect("an allocated buffer is held")[..64]
                    .copy_from_slice(&payload);
                pkts.push(Packet {
                    buf,
                    offset: 0,
                    len: 64,
                });
            }
            let n = sent(ch.send(&pkts))?;
            freed(ch.free(pkts[n..].iter().map(|p| p.buf)))?;
            sent_n += n as u64;
            got.clear();
            let r = ch.recv(&mut got, 64).map_err(chan("recv"))?;
            freed(ch.free(got.iter().map(|p| p.buf)))?;
            recv_n += r as u64;
            if n == 0 && r == 0 {
                let interest = if sent_n > recv_n {
                    Interest::Readable
                } else {
                    Interest::Buffers
                };
                match ch.wait(interest, Some(Duration::from_millis(50))) {
                    Ok(()) | Err(Error::TimedOut) => {}
                    Err(e) => return Err(format!("wait: {e}")),
                }
            }
        }
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
        let list: Vec<String> = samples.iter().map(u64::to_string).collect();
        say(&format!("rate {median} samples {}", list.join(" ")));
    }
    Ok(())
}

/// Waits until the nexus has consumed everything we published on TX (or the channel ends).
fn until_tx_consumed(ch: &mut Channel) -> Result<(), Error> {
    let mut spins = 0u32;
    loop {
        ch.check()?;
        if ch.ring_occupancy().0 == 0 {
            return Ok(());
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Invalid descriptors as fast as the nexus takes them, spinning (never yielding the CPU): the
/// TX ring is kept full with rounds of 64 (bad index, bad bounds, forged index, reserved flags),
/// each with 8 forged returns on FREE. (The nexus takes at most 64 TX descriptors per pass and
/// every FREE descriptor, so FREE never holds more than 8 per TX round in flight.)
fn flood(ch: &mut Channel) -> Result<(), String> {
    let g = ch.layout().geometry;
    let (nb, bs) = (g.buffers(), g.buf_size);
    let own = alloc(ch)?;
    let kinds = [
        desc(u32::MAX, 0, 1, 0),
        desc(own, bs - 1, 2, 0),
        desc(nb - 1, 0, 16, 0),
        desc(own, 0, 16, 1),
    ];
    let tx: Vec<Desc> = kinds.iter().copied().cycle().take(64).collect();
    let free = [desc(nb - 1, 0, 0, 0); 8];
    let slots = g.slots(netchannel_shm::RingKind::Tx);
    let mut pushed = 0u64;
    let mut ready = false;
    loop {
        ch.check().map_err(chan("flooding"))?;
        let in_flight = ch.ring_occupancy().0;
        if in_flight + tx.len() as u32 <= slots {
            ch.hostile_push(false, &free);
            ch.hostile_push(true, &tx);
            pushed += tx.len() as u64;
        } else {
            std::hint::spin_loop();
        }
        if !ready && u64::from(in_flight) < pushed {
            say("ready");
            ready = true;
        }
    }
}

fn number(s: &str) -> Result<u64, String> {
    s.parse().map_err(|e| format!("{s:?} is not a number: {e}"))
}

/// What a refusal says, or the error.
fn refusal(what: &str, r: Result<(), Error>) -> Result<(), String> {
    match r {
        Ok(()) => say(&format!("{what} ok")),
        Err(Error::Refused { code, .. }) => say(&format!("{what} refused {code:?}")),
        Err(e) => return Err(format!("{what}: {e}")),
    }
    Ok(())
}

/// An unprivileged user's requests (see the usage at the top).
fn user(sock: &str, n: u64, victim: Option<u64>) -> Result<(), String> {
    let mut nexus = Nexus::connect(sock).map_err(|e| format!("connect: {e}"))?;
    let mut chans = Vec::new();
    for _ in 0..n {
        match nexus.open_channel(ChannelOptions::default()) {
            Ok(ch) => {
                say(&format!("open ok {}", ch.id()));
                chans.push(ch);
            }
            Err(e) => refusal("open", Err(e))?,
        }
    }
    let low_latency = ChannelOptions {
        kind: netchannel_shm::control::ChannelKind::LowLatency,
        ..ChannelOptions::default()
    };
    match nexus.open_channel(low_latency) {
        Ok(ch) => {
            say(&format!("open ok {}", ch.id()));
            chans.push(ch);
        }
        Err(e) => refusal("open", Err(e))?,
    }
    if let Some(v) = victim {
        refusal("defunct", nexus.defunct(v))?;
    }
    let s = nexus.status().map_err(|e| format!("status: {e}"))?;
    let uids: Vec<String> = s.channels.iter().map(|c| c.uid.to_string()).collect();
    say(&format!("status {}", uids.join(" ")));
    hold_until_eof();
    drop(chans);
    Ok(())
}

/// An unprivileged user's flows, up to its limit (see the usage at the top).
fn user_flows(sock: &str, n: u64) -> Result<(), String> {
    let mut nexus = Nexus::connect(sock).map_err(|e| format!("connect: {e}"))?;
    let ch = nexus
        .open_channel(ChannelOptions::default())
        .map_err(|e| format!("open: {e}"))?;
    let any = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    for _ in 0..n {
        let r = nexus.add_flow(&ch, netchannel::nexus::FlowProto::Udp, any, None);
        refusal("flow", r.map(|_| ()))?;
    }
    hold_until_eof();
    drop(ch);
    Ok(())
}

/// An unprivileged user's control connections, up to its limit (see the usage at the top).
fn user_connections(sock: &str, n: u64) -> Result<(), String> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut nexus = Nexus::connect(sock).map_err(|e| format!("connect: {e}"))?;
        refusal("connect", nexus.status().map(|_| ()))?;
        conns.push(nexus);
    }
    hold_until_eof();
    drop(conns);
    Ok(())
}

/// Blocks in `wait(Readable)` and reports how it ended.
fn wait_blocked(ch: &mut Channel) -> Result<(), String> {
    // Sleep at once, so the test can see the process asleep in poll.
    ch.set_wait_policy(netchannel::WaitPolicy {
        spin: Duration::ZERO,
    });
    say(&format!("waiting {}", ch.id()));
    match ch.wait(Interest::Readable, Some(WAIT)) {
        Ok(()) => say("outcome ok"),
        Err(e) => say(&format!("outcome {e:?}")),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hostile cases

fn hostile(ch: &mut Channel, case: &str) -> Result<(), String> {
    say(&format!("channel {}", ch.id()));
    match read_line() {
        Some(l) if l == "go" => {}
        Some(l) => return Err(format!("expected `go`, got {l:?}")),
        None => return Ok(()),
    }
    let g = ch.layout().geometry;
    let (nb, bs) = (g.buffers(), g.buf_size);
    // A buffer of ours, used by cases whose descriptors must fail for another reason than
    // ownership; it is then sent validly, which proves the drop left it ours.
    let mut first: Option<Packet> = None;
    let mut got = Vec::new();
    let per_descriptor = !matches!(case, "index-oob" | "rx-index-oob" | "strikes" | "write-ro");
    if per_descriptor {
        let warm_up = packet(ch, b"warm-up")?;
        if reflect(ch, warm_up, &mut got)? != 0 {
            return Err("unexpected packets before the warm-up".into());
        }
    }
    match case {
        "bad-index" => {
            let bad = [nb, nb + 1, 0x8000_0000, u32::MAX];
            ch.hostile_push(true, &bad.map(|b| desc(b, 0, 1, 0)));
        }
        "bad-desc" => {
            let p = packet(ch, b"x")?;
            let b = p.buf;
            ch.hostile_push(
                true,
                &[
                    desc(b, u32::MAX, 1, 0),
                    desc(b, bs - 1, 2, 0),
                    desc(b, 0, u32::MAX, 0),
                    desc(b, bs, 1, 0),
                    desc(b, 1, bs, 0),
                    desc(b, u32::MAX, u32::MAX, 0),
                ],
            );
            first = Some(p);
        }
        "lie-len" => {
            let p = packet(ch, b"short")?;
            let b = p.buf;
            ch.hostile_push(
                true,
                &[bs + 1, 65_535, 1 << 20].map(|len| desc(b, 0, len, 0)),
            );
            first = Some(p);
        }
        "forged" => {
            let never = [nb - 1, nb - 64, nb / 2];
            ch.hostile_push(true, &never.map(|b| desc(b, 0, 16, 0)));
        }
        "double-submit" => {
            let p = packet(ch, DOUBLE_PAYLOAD)?;
            if sent(ch.send(&[p]))? != 1 {
                return Err("no room on a TX ring the nexus keeps draining".into());
            }
            ch.hostile_push(true, &[desc(p.buf, 0, p.len, 0)]);
        }
        "double-free" => {
            let b = alloc(ch)?;
            freed(ch.free([b]))?;
            ch.hostile_push(false, &[desc(b, 0, 0, 0)]);
        }
        "free-unowned" => {
            ch.hostile_push(false, &[desc(nb - 1, 0, 0, 0), desc(nb / 2, 0, 0, 0)]);
        }
        "free-bad-index" => {
            ch.hostile_push(false, &[desc(nb, 0, 0, 0), desc(u32::MAX, 0, 0, 0)]);
        }
        "bad-flags" => {
            let p = packet(ch, b"flags")?;
            let b = p.buf;
            ch.hostile_push(
                true,
                &[1, 0x8000_0000, u32::MAX].map(|f| desc(b, 0, p.len, f)),
            );
            first = Some(p);
        }
        "index-oob" => {
            let t = Instant::now();
            ch.hostile_set_index(true, HUGE_INDEX);
            let e = match ch.wait(Interest::Readable, Some(WAIT)) {
                Ok(()) => return Err("a packet came after the corrupt index".into()),
                Err(e) => e,
            };
            return report_end(&e, t);
        }
        "rx-index-oob" => {
            let t = Instant::now();
            ch.hostile_set_index(false, HUGE_INDEX);
            let e = fill_until_error(ch, 4 * g.slots(netchannel_shm::RingKind::Rx))?;
            return report_end(&e, t);
        }
        "strikes" => return strikes(ch, nb),
        "write-ro" => {
            let (map, write) = ch.hostile_write_peer_region();
            say(&format!("mmap {map:?} pwrite {write:?}"));
            let eperm = Some(rustix::io::Errno::PERM);
            return if map == eperm && write == eperm {
                Ok(())
            } else {
                Err(format!(
                    "the nexus's sealed region was not refused: mmap {map:?}, pwrite {write:?}"
                ))
            };
        }
        other => return Err(format!("unknown hostile case {other:?}")),
    }
    say("violated");
    let mut others = 0u32;
    for i in 0..VALID_AFTER_VIOLATIONS {
        let bytes = valid_payload(i);
        let p = match first.take() {
            Some(p) => {
                ch.buffer_mut(p.buf)
                    .ok_or("a buffer whose descriptors were dropped is no longer ours")?
                    [..bytes.len()]
                    .copy_from_slice(&bytes);
                Packet {
                    len: bytes.len() as u32,
                    ..p
                }
            }
            None => packet(ch, &bytes)?,
        };
        others += reflect(ch, p, &mut got)?;
    }
    say(&format!("done {others}"));
    hold_until_eof();
    Ok(())
}

/// Sends `p` and receives until its reflection is back (the nexus reflects in order); returns
/// how many other packets came meanwhile. Frees everything received.
fn reflect(ch: &mut Channel, p: Packet, got: &mut Vec<Packet>) -> Result<u32, String> {
    let bytes = ch.payload(&p).to_vec();
    if sent(ch.send(&[p]))? != 1 {
        return Err("no room on a TX ring the nexus keeps draining".into());
    }
    let mut others = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        got.clear();
        if ch.recv(got, 64).map_err(chan("recv"))? == 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "{:?} was not reflected",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            ch.wait(Interest::Readable, Some(WAIT))
                .map_err(chan("waiting for a reflection"))?;
            continue;
        }
        let mut back = false;
        for q in got.iter() {
            if ch.payload(q) == bytes.as_slice() {
                back = true;
            } else {
                others += 1;
            }
        }
        freed(ch.free(got.iter().map(|q| q.buf)))?;
        if back {
            return Ok(others);
        }
    }
}

/// Keeps the channel open until the test closes our stdin.
fn hold_until_eof() {
    while read_line().is_some() {}
}

/// Prints how the channel ended (after an attack started at `t`), then holds it open.
fn report_end(e: &Error, t: Instant) -> Result<(), String> {
    say(&format!(
        "defunct {e:?} after {}us",
        t.elapsed().as_micros()
    ));
    hold_until_eof();
    Ok(())
}

/// Sends one-byte packets without ever receiving, until a call fails; returns the error.
fn fill_until_error(ch: &mut Channel, most: u32) -> Result<Error, String> {
    for _ in 0..most {
        let buf = loop {
            if let Some(b) = ch.alloc() {
                break b;
            }
            // `wait(Buffers)` alone may spin on a defunct channel (see the nexus_daemon test
            // `regression_wait_for_buffers_fails_on_a_defunct_channel`).
            if let Err(e) = ch
                .check()
                .and_then(|()| ch.wait(Interest::Buffers, Some(WAIT)))
            {
                return Ok(e);
            }
        };
        loop {
            match ch.send(&[Packet {
                buf,
                offset: 0,
                len: 1,
            }]) {
                Ok(1) => break,
                Ok(_) => {
                    if let Err(e) = ch.wait(Interest::Writable, Some(WAIT)) {
                        return Ok(e);
                    }
                }
                Err(SendError::Channel(e)) => return Ok(e),
                Err(SendError::Invalid(v)) => return Err(format!("send: {v}")),
            }
        }
    }
    Err(format!(
        "{most} packets went without the nexus noticing the corrupt RX index"
    ))
}

/// Bad-index descriptors, 8 at a time (each batch taken by the nexus before the next), until
/// the nexus quarantines the channel.
fn strikes(ch: &mut Channel, nb: u32) -> Result<(), String> {
    let bad = [desc(nb, 0, 1, 0); 8];
    let t = Instant::now();
    let mut pushed = 0u64;
    loop {
        ch.hostile_push(true, &bad);
        pushed += bad.len() as u64;
        match until_tx_consumed(ch) {
            Ok(()) => {}
            Err(
                e @ Error::Defunct {
                    reason: DefunctReason::Quarantined,
                },
            ) => {
                say(&format!("quarantined after {pushed} violations"));
                return report_end(&e, t);
            }
            Err(e) => return Err(format!("expected a quarantine, got: {e}")),
        }
        if pushed > 100_000 {
            return Err(format!("{pushed} violations and still not quarantined"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attacks on the nexus's loop through the app's own fds (issue 13)

fn attack(ch: &mut Channel, case: &str) -> Result<(), String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    if !ready_then_go()? {
        return Ok(());
    }
    let bell =
        || rustix::io::fcntl_dupfd_cloexec(ch.wakeup_fd(), 0).map_err(|e| format!("dup: {e}"));
    let make_blocking = |fd: &std::os::fd::OwnedFd| -> Result<(), String> {
        let fl = rustix::fs::fcntl_getfl(fd).map_err(|e| format!("F_GETFL: {e}"))?;
        rustix::fs::fcntl_setfl(fd, fl - rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| format!("F_SETFL: {e}"))
    };
    match case {
        "bell-block" | "bell-steal" => {
            let fd = bell()?;
            make_blocking(&fd)?;
            if case == "bell-block" {
                // Blocking writes into the nexus's end: they block this thread, never the nexus.
                std::thread::spawn(move || {
                    let chunk = [0xffu8; 4096];
                    while rustix::net::send(&fd, &chunk, rustix::net::SendFlags::NOSIGNAL).is_ok() {
                    }
                });
            } else {
                // A thief reading the doorbell, blocking: it can only take our own wake-ups.
                std::thread::spawn(move || {
                    let mut b = [0u8; 4096];
                    while matches!(rustix::io::read(&fd, &mut b), Ok(n) if n > 0) {}
                });
            }
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            std::thread::spawn(move || {
                hold_until_eof();
                s2.store(true, Ordering::Relaxed);
            });
            say("attacking");
            let mut got = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Armed, so that every delivery rings a doorbell nobody drains.
                if case == "bell-block" {
                    ch.arm(Interest::Readable, true);
                }
                let mut pkts = Vec::new();
                for _ in 0..8 {
                    let Some(buf) = ch.alloc() else { break };
                    if let Some(b) = ch.buffer_mut(buf) {
                        b[..64].fill(0x5a);
                    }
                    pkts.push(Packet {
                        buf,
                        offset: 0,
                        len: 64,
                    });
                }
                let n = sent(ch.send(&pkts))?;
                freed(ch.free(pkts[n..].iter().map(|p| p.buf)))?;
                got.clear();
                ch.recv(&mut got, 64).map_err(chan("recv"))?;
                freed(ch.free(got.iter().map(|p| p.buf)))?;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        }
        "bell-shut" => {
            let fd = bell()?;
            rustix::net::shutdown(&fd, rustix::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            let e = match ch.wait(Interest::Readable, Some(WAIT)) {
                Ok(()) => return Err("a packet came after the doorbell was shut".into()),
                Err(e) => e,
            };
            say(&format!("closed {e:?}"));
            hold_until_eof();
            Ok(())
        }
        "bell-fds" => {
            let fd = bell()?;
            let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
            let r = netchannel_shm::fdpass::send_with_fds(
                std::os::fd::AsFd::as_fd(&fd),
                &[1],
                &[std::os::fd::AsFd::as_fd(&null)],
            );
            say(&format!("fds {r:?}"));
            hold_until_eof();
            Ok(())
        }
        "seal" => {
            let (pool, _, _) = ch
                .hostile_pool()
                .map_err(|e| format!("dup of the pool: {e}"))?;
            let r = rustix::fs::fcntl_add_seals(&pool, rustix::fs::SealFlags::FUTURE_WRITE);
            say(&format!("seal {r:?}"));
            hold_until_eof();
            Ok(())
        }
        other => Err(format!("unknown attack {other:?}")),
    }
}

/// Prints `ready` and waits for `go`; false if stdin ended first.
fn ready_then_go() -> Result<bool, String> {
    say("ready");
    match read_line() {
        Some(l) if l == "go" => Ok(true),
        Some(l) => Err(format!("expected `go`, got {l:?}")),
        None => Ok(false),
    }
}

/// Runs `op` in a loop on each of `conns` control connections of its own, until stdin ends
/// or `op` fails; prints `attacking` once they have done it `conns` times. Returns how many
/// times `op` succeeded.
fn from_connections(sock: &str, conns: usize, op: fn(&mut Nexus) -> bool) -> u64 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, done, sock) = (stop.clone(), done.clone(), sock.to_owned());
            std::thread::spawn(move || {
                let Ok(mut nx) = Nexus::connect(&sock) else {
                    return;
                };
                while !stop.load(Ordering::Relaxed) && op(&mut nx) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    while done.load(Ordering::Relaxed) < conns as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    say("attacking");
    hold_until_eof();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    done.load(Ordering::Relaxed)
}

/// Many large channels, and status requests from several connections as fast as they are
/// answered (issue 13, attack 3); or (`idle`) the channels alone, sitting idle.
fn status_flood(sock: &str, idle: bool) -> Result<(), String> {
    let mut nx = Nexus::connect(sock).map_err(|e| format!("connect: {e}"))?;
    let mut channels = Vec::new();
    loop {
        let opts = ChannelOptions {
            buffers: Some(65_536),
            ..ChannelOptions::default()
        };
        match nx.open_channel(opts) {
            Ok(ch) => channels.push(ch),
            Err(Error::Refused { .. }) => break,
            Err(e) => return Err(format!("open: {e}")),
        }
    }
    if !ready_then_go()? {
        return Ok(());
    }
    if idle {
        say("attacking");
        hold_until_eof();
        return Ok(());
    }
    let asked = from_connections(sock, 8, |nx| nx.status_page(None).is_ok());
    say(&format!("asked {asked} with {} channels", channels.len()));
    Ok(())
}

/// Channels of 65,536 buffers opened and closed as fast as the nexus allows, from 4
/// connections (each open builds a pool and a ledger on the nexus's thread).
fn churn(sock: &str) -> Result<(), String> {
    if !ready_then_go()? {
        return Ok(());
    }
    from_connections(sock, 4, |nx| {
        let opts = ChannelOptions {
            buffers: Some(65_536),
            ..ChannelOptions::default()
        };
        nx.open_channel(opts)
            .and_then(|ch| nx.close_channel(ch))
            .is_ok()
    });
    Ok(())
}

/// Opens `n` small channels and holds them until stdin ends.
fn many(sock: &str, n: u64) -> Result<(), String> {
    let mut nx = Nexus::connect(sock).map_err(|e| format!("connect: {e}"))?;
    let mut channels = Vec::new();
    for i in 0..n {
        let opts = ChannelOptions {
            buffers: Some(64),
            ring_slots: Some(64),
            ..ChannelOptions::default()
        };
        channels.push(
            nx.open_channel(opts)
                .map_err(|e| format!("open #{i}: {e}"))?,
        );
    }
    say(&format!("opened {}", channels.len()));
    hold_until_eof();
    Ok(())
}
