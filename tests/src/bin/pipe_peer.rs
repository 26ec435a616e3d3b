//! `pipe_peer`: the app end of a user pipe, playing a scripted role for the multi-process tests.
//!
//! ```text
//! pipe_peer sender <@pipe> N [K]     send stream packets 0..N (see the library docs for their
//!                                    format), in batches of up to 32; also take K control
//!                                    packets from the listener and free them; exit 0
//! pipe_peer die-mid-stream <@pipe>   send stream packets until killed (exit 0 on PeerGone)
//! pipe_peer echo <@pipe>             send every received packet back in the same buffer, until
//!                                    the listener goes away (exit 0)
//! pipe_peer hostile <@pipe> CASE     break the protocol as CASE says, then send valid packets
//!                                    and echo until the listener goes away
//! ```
//!
//! A hostile peer waits for a line `go HELD FREE ABSENT` on stdin (three buffer indices of the
//! listener's half: one the listener holds, one in its free list, one in a segment not in
//! service), commits its violation, prints `violated`, then sends
//! [`VALID_AFTER_VIOLATIONS`] valid packets and prints `valid sent`. The `index-oob*` cases
//! instead wait for a line `restore` after `violated`, then send the valid packets (which
//! publishes a sane index again), print `restored`, and echo. `write-ro` tries to write the
//! listener's sealed region, prints what the kernel said and exits 0 only if it refused both.
//!
//! Exit codes: 0 success, 1 failure (message on stderr), 2 bad usage.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netchannel::pipe::UserPipe;
use netchannel::{Error, Interest, Packet, SendError};
use netchannel_shm::Desc;
use netchannel_tests::{
    CONTROL_PAYLOAD, DOUBLE_PAYLOAD, VALID_AFTER_VIOLATIONS, fill_packet, valid_payload,
};

/// Longest a peer waits for anything before giving up with an error.
const WAIT: Duration = Duration::from_secs(30);

/// The bogus ring index of the `index-oob` cases.
const HUGE_INDEX: u32 = 1 << 30;

const USAGE: &str = "usage: pipe_peer <sender @pipe N [K] | die-mid-stream @pipe | echo @pipe | \
                     hostile @pipe CASE>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(role), Some(name)) = (args.first(), args.get(1)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[2..];
    let mut pipe = match UserPipe::connect(name) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pipe_peer {role}: connecting to {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match (role.as_str(), rest) {
        ("sender", [n]) => number(n).and_then(|n| stream(&mut pipe, n, 0)),
        ("sender", [n, k]) => {
            number(n).and_then(|n| number(k).and_then(|k| stream(&mut pipe, n, k)))
        }
        ("die-mid-stream", []) => match stream(&mut pipe, u64::MAX, 0) {
            Err(_) if pipe.peer_gone() => Ok(()),
            other => other,
        },
        ("echo", []) => echo(&mut pipe),
        ("hostile", [case]) => hostile(&mut pipe, case),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("pipe_peer {role}: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn number(s: &str) -> Result<u64, String> {
    s.parse().map_err(|e| format!("{s:?} is not a count: {e}"))
}

fn chan(what: &'static str) -> impl Fn(Error) -> String {
    move |e| format!("{what}: {e}")
}

/// A send error is either a channel error or a bug in this program.
fn sent(r: Result<usize, SendError>) -> Result<usize, String> {
    r.map_err(|e| match e {
        SendError::Channel(e) => format!("send: {e}"),
        SendError::Invalid(v) => panic!("pipe_peer sent a packet it does not hold: {v}"),
    })
}

/// Sends every packet of `pkts`, waiting for room as needed.
fn send_all(pipe: &mut UserPipe, mut pkts: &[Packet]) -> Result<(), String> {
    while !pkts.is_empty() {
        let n = sent(pipe.send(pkts))?;
        pkts = &pkts[n..];
        if !pkts.is_empty() {
            pipe.wait(Interest::Writable, Some(WAIT))
                .map_err(chan("waiting for room in the TX ring"))?;
        }
    }
    Ok(())
}

/// Receives and frees the listener's control packets; returns how many came.
fn take_controls(pipe: &mut UserPipe, inbox: &mut Vec<Packet>) -> Result<u64, String> {
    inbox.clear();
    let n = pipe.recv(inbox, 64).map_err(chan("recv"))?;
    for p in inbox.iter() {
        if pipe.payload(p) != CONTROL_PAYLOAD {
            return Err(format!("unexpected packet from the listener: {p:?}"));
        }
    }
    pipe.free(inbox.iter().map(|p| p.buf))
        .map_err(|e| format!("free: {e}"))?;
    Ok(n as u64)
}

/// Sends stream packets `0..n` and takes `controls` control packets; returns once all are
/// sent and taken and every buffer of the listener is on its way back.
fn stream(pipe: &mut UserPipe, n: u64, controls: u64) -> Result<(), String> {
    let mut seq = 0u64;
    let mut batch: Vec<Packet> = Vec::with_capacity(32);
    let mut inbox = Vec::with_capacity(64);
    let mut taken = 0u64;
    while seq < n || !batch.is_empty() {
        while batch.len() < 32 && seq < n {
            let Some(buf) = pipe.alloc() else { break };
            let bytes = pipe
                .buffer_mut(buf)
                .expect("a buffer just allocated is held");
            let len = fill_packet(seq, bytes);
            batch.push(Packet {
                buf,
                offset: 0,
                len: len as u32,
            });
            seq += 1;
        }
        if batch.is_empty() {
            pipe.wait(Interest::Buffers, Some(WAIT))
                .map_err(chan("waiting for buffers"))?;
            continue;
        }
        let k = sent(pipe.send(&batch))?;
        batch.drain(..k);
        taken += take_controls(pipe, &mut inbox)?;
        if !batch.is_empty() {
            pipe.wait(Interest::Writable, Some(WAIT))
                .map_err(chan("waiting for room in the TX ring"))?;
        }
    }
    while taken < controls {
        let k = take_controls(pipe, &mut inbox)?;
        taken += k;
        if k == 0 {
            pipe.wait(Interest::Readable, Some(WAIT))
                .map_err(chan("waiting for control packets"))?;
        }
    }
    // The return ring has a slot for every buffer of the listener, so this cannot take long.
    let deadline = Instant::now() + WAIT;
    while pipe.pending_returns() > 0 {
        pipe.flush().map_err(chan("flushing returns"))?;
        if Instant::now() > deadline {
            return Err("the listener's buffers could not be returned".into());
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// Sends back every packet in the buffer it came in, until the listener goes away.
fn echo(pipe: &mut UserPipe) -> Result<(), String> {
    let mut got = Vec::with_capacity(64);
    loop {
        got.clear();
        let n = pipe.recv(&mut got, 64).map_err(chan("recv"))?;
        let r = if n == 0 {
            pipe.wait(Interest::Readable, Some(WAIT))
        } else {
            match send_all(pipe, &got) {
                Ok(()) => Ok(()),
                Err(_) if pipe.peer_gone() => Err(Error::PeerGone),
                Err(e) => return Err(e),
            }
        };
        match r {
            Ok(()) | Err(Error::TimedOut) => {}
            Err(Error::PeerGone) => return Ok(()),
            Err(e) => return Err(format!("echo: {e}")),
        }
    }
}

/// Reads one line of stdin; `None` at end of file (the test went away).
fn read_line() -> Option<String> {
    let mut s = String::new();
    match std::io::stdin().lock().read_line(&mut s) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(s.trim().to_owned()),
    }
}

/// A buffer of our own, holding `bytes`.
fn own_buffer(pipe: &mut UserPipe, bytes: &[u8]) -> Packet {
    let buf = pipe
        .alloc()
        .expect("a fresh pipe has buffers for its app end");
    pipe.buffer_mut(buf)
        .expect("a buffer just allocated is held")[..bytes.len()]
        .copy_from_slice(bytes);
    Packet {
        buf,
        offset: 0,
        len: bytes.len() as u32,
    }
}

fn desc(buf: u32, offset: u32, len: u32, flags: u32) -> Desc {
    Desc {
        buf,
        offset,
        len,
        flags,
    }
}

fn hostile(pipe: &mut UserPipe, case: &str) -> Result<(), String> {
    let Some(go) = read_line() else {
        return Ok(());
    };
    let idx: Vec<u32> = go
        .strip_prefix("go ")
        .ok_or_else(|| format!("expected a `go` line, got {go:?}"))?
        .split_whitespace()
        .map(|w| w.parse().map_err(|e| format!("{w:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let [held, free, absent] = idx[..] else {
        return Err(format!("expected three buffer indices, got {go:?}"));
    };
    let g = pipe.layout().geometry;
    let (nbufs, bs) = (g.buffers(), g.buf_size);
    // A buffer of our own, used by the cases whose descriptors must fail for another reason
    // than ownership; it is then sent validly, which proves the drop left it ours.
    let mut first: Option<Packet> = None;
    let mut wait_for_restore = false;
    match case {
        "bad-index" => {
            let bad = [nbufs, nbufs + 1, 0x8000_0000, u32::MAX];
            pipe.hostile_push(true, &bad.map(|b| desc(b, 0, 1, 0)));
        }
        "bad-desc" => {
            let p = own_buffer(pipe, b"x");
            let b = p.buf;
            pipe.hostile_push(
                true,
                &[
                    desc(b, u32::MAX, 1, 0),
                    desc(b, bs - 1, 2, 0),
                    desc(b, 0, u32::MAX, 0),
                    desc(b, bs, 1, 0),
                    desc(b, 1, bs, 0),
                ],
            );
            first = Some(p);
        }
        "double-submit" => {
            let p = own_buffer(pipe, DOUBLE_PAYLOAD);
            let d = desc(p.buf, 0, p.len, 0);
            pipe.hostile_push(true, &[d, d]);
        }
        "forged" => {
            pipe.hostile_push(true, &[held, free, absent].map(|b| desc(b, 0, 16, 0)));
        }
        "bad-flags" => {
            let p = own_buffer(pipe, b"flags");
            let b = p.buf;
            pipe.hostile_push(
                true,
                &[1, 0x8000_0000, u32::MAX].map(|f| desc(b, 0, p.len, f)),
            );
            first = Some(p);
        }
        "free-forged" => {
            let bad = [nbufs, u32::MAX, held, free, absent];
            pipe.hostile_push(false, &bad.map(|b| desc(b, 0, 0, 0)));
        }
        "free-own" => {
            // One of our own buffers "returned" to the listener, which never lent it.
            let p = own_buffer(pipe, b"mine");
            pipe.hostile_push(false, &[desc(p.buf, 0, 0, 0)]);
            println!("own {}", p.buf);
        }
        "index-oob" => {
            pipe.hostile_set_index(true, HUGE_INDEX);
            wait_for_restore = true;
        }
        "index-oob-consumer" => {
            pipe.hostile_set_index(false, HUGE_INDEX);
            wait_for_restore = true;
        }
        "write-ro" => {
            let (map, write) = pipe.hostile_write_peer_region();
            println!("mmap {map:?} pwrite {write:?}");
            let eperm = Some(rustix::io::Errno::PERM);
            return if map == eperm && write == eperm {
                Ok(())
            } else {
                Err(format!(
                    "the listener's sealed region was not refused: mmap {map:?}, pwrite {write:?}"
                ))
            };
        }
        other => return Err(format!("unknown hostile case {other:?}")),
    }
    println!("violated");
    if wait_for_restore {
        match read_line() {
            Some(l) if l == "restore" => {}
            Some(l) => return Err(format!("expected `restore`, got {l:?}")),
            None => return Ok(()),
        }
    }
    let mut valid = Vec::new();
    for i in 0..VALID_AFTER_VIOLATIONS {
        let bytes = valid_payload(i);
        let p = match first.take() {
            Some(p) => {
                pipe.buffer_mut(p.buf)
                    .expect("a buffer dropped by the listener is still ours")[..bytes.len()]
                    .copy_from_slice(&bytes);
                Packet {
                    len: bytes.len() as u32,
                    ..p
                }
            }
            None => own_buffer(pipe, &bytes),
        };
        valid.push(p);
    }
    send_all(pipe, &valid)?;
    println!(
        "{}",
        if wait_for_restore {
            "restored"
        } else {
            "valid sent"
        }
    );
    echo(pipe)
}
