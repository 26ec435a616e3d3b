//! User pipes between real processes: this test process listens (the serving end, which owns
//! the lower half of the pool) and `pipe_peer` connects as the app end in a child process.
//!
//! Each test binds its own abstract socket name, spawns the peer with a role, and holds it in a
//! [`Peer`] guard that kills it on drop, so a failing test leaves no process behind. Every wait
//! has a timeout. The tests run one at a time (see [`serial`]): the machine has two cores, and
//! one test measures a latency.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netchannel::pipe::{PipeListener, UserPipe};
use netchannel::{Error, Geometry, Interest, Packet, SendError};
use netchannel_shm::RingKind;
use netchannel_tests::{
    CONTROL_PAYLOAD, DOUBLE_PAYLOAD, VALID_AFTER_VIOLATIONS, check_packet, fill_packet,
    valid_payload,
};
use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags};

const PEER: &str = env!("CARGO_BIN_EXE_pipe_peer");

/// Generous bound for anything that should take milliseconds.
const SHORT: Duration = Duration::from_secs(10);

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of this file one at a time (a failed test poisons the lock; that is fine).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn pipe_name(test: &str) -> String {
    format!("@netchannel-tests-{}-{test}", std::process::id())
}

/// A `pipe_peer` child process, killed (and reaped) when dropped.
struct Peer {
    child: Child,
    pidfd: OwnedFd,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Peer {
    fn spawn(role: &str, name: &str, args: &[&str]) -> Self {
        let what = format!("pipe_peer {role} {}", args.join(" "));
        let mut child = Command::new(PEER)
            .arg(role)
            .arg(name)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let pid = Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).expect("pidfd_open");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            pidfd,
            stdin,
            lines,
            what,
        }
    }

    /// Writes one line to the peer's stdin.
    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("telling {} {line:?}: {e}", self.what));
    }

    /// The next line the peer prints.
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(SHORT) {
            Ok(l) => l,
            Err(e) => panic!(
                "{} printed no line within {SHORT:?} ({e}); status {:?}",
                self.what,
                self.child.try_wait()
            ),
        }
    }

    /// Waits (on a pidfd) for the peer to exit.
    fn exit_within(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                return status;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                panic!("{} did not exit within {timeout:?}", self.what);
            };
            let ts = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => panic!("poll on a pidfd: {e}"),
            }
        }
    }

    /// Asserts that the peer exits with status 0 within `timeout`.
    fn exits_cleanly(&mut self, timeout: Duration) {
        let status = self.exit_within(timeout);
        assert!(status.success(), "{} failed: {status}", self.what);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Accepts the peer's connection, failing the test if it does not come within [`SHORT`].
fn accept(listener: PipeListener, geometry: Geometry, peer: &mut Peer) -> UserPipe {
    let (tx, rx) = mpsc::channel();
    // If the peer never connects, this thread stays blocked in accept(2) until the test
    // process ends; the test itself fails below.
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept(geometry));
    });
    match rx.recv_timeout(SHORT) {
        Ok(Ok(pipe)) => pipe,
        Ok(Err(e)) => panic!("accepting {}: {e}", peer.what),
        Err(_) => panic!(
            "{} did not connect within {SHORT:?}; status {:?}",
            peer.what,
            peer.child.try_wait()
        ),
    }
}

/// Binds a fresh pipe name, starts the peer, and accepts it.
fn start(test: &str, geometry: Geometry, role: &str, args: &[&str]) -> (Peer, UserPipe) {
    let name = pipe_name(test);
    let listener = PipeListener::bind(&name).unwrap_or_else(|e| panic!("binding {name}: {e}"));
    let mut peer = Peer::spawn(role, &name, args);
    let pipe = accept(listener, geometry, &mut peer);
    (peer, pipe)
}

/// Half of the pool's buffers: what each end owns.
fn half(g: &Geometry) -> u32 {
    g.buffers() / 2
}

/// Checks the ledger and the redzone, and that none of the listener's own buffers is lost:
/// with nothing held and nothing in flight, every home buffer is free or out of service.
fn assert_all_home(pipe: &UserPipe, g: &Geometry) {
    let c = pipe
        .audit()
        .unwrap_or_else(|e| panic!("audit after the test: {e}"));
    assert_eq!(
        c,
        pipe.buffer_counts(),
        "audit recount equals the running counts"
    );
    assert_eq!(c.held, 0, "the listener holds nothing any more: {c:?}");
    assert_eq!(
        c.free + c.absent,
        half(g),
        "every buffer of the listener's half is home: {c:?}"
    );
    assert_eq!(c.peer, half(g), "only the peer's own half is away: {c:?}");
}

// ---------------------------------------------------------------------------------------------
// Streams

/// Sends up to 8 control packets in fresh buffers of the listener; returns how many went.
fn send_controls(pipe: &mut UserPipe, sent: &mut u64, total: u64) -> u64 {
    let mut batch = Vec::new();
    while batch.len() < 8 && *sent + (batch.len() as u64) < total {
        let Some(buf) = pipe.alloc() else { break };
        pipe.buffer_mut(buf).expect("just allocated")[..CONTROL_PAYLOAD.len()]
            .copy_from_slice(CONTROL_PAYLOAD);
        batch.push(Packet {
            buf,
            offset: 0,
            len: CONTROL_PAYLOAD.len() as u32,
        });
    }
    let n = pipe.send(&batch).expect("send control packets");
    // Whatever did not fit goes back to the free list and is allocated again next time.
    pipe.free(batch[n..].iter().map(|p| p.buf))
        .expect("free unsent control buffers");
    *sent += n as u64;
    n as u64
}

#[test]
fn millions_of_packets_arrive_once_in_order_and_intact() {
    let _serial = serial();
    let n: u64 = if cfg!(debug_assertions) {
        2_000_000
    } else {
        4_000_000
    };
    const CONTROLS: u64 = 512;
    let g = Geometry::default();
    let (mut peer, mut pipe) = start(
        "millions",
        g,
        "sender",
        &[&n.to_string(), &CONTROLS.to_string()],
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let (mut expected, mut bytes) = (0u64, 0u64);
    let mut controls = 0u64;
    let mut got = Vec::with_capacity(256);
    // `wait` may report PeerGone while the sender's last packets are still readable (see
    // `bug_peer_gone_is_reported_while_packets_are_readable`): then drain, but a PeerGone with
    // nothing left to read before the end of the stream fails the test.
    let mut gone = false;
    while expected < n || controls < CONTROLS {
        assert!(
            Instant::now() < deadline,
            "stream too slow: {expected} of {n} packets"
        );
        got.clear();
        let k = pipe.recv(&mut got, 256).expect("recv");
        assert!(
            k > 0 || !gone,
            "the sender went away after {expected} of {n} packets"
        );
        for p in &got {
            let payload = pipe.payload(p);
            let seq = check_packet(payload).unwrap_or_else(|e| {
                panic!("after {expected} good packets, a bad one: {e} ({p:?})")
            });
            assert_eq!(
                seq, expected,
                "packets must arrive exactly once and in order"
            );
            bytes += payload.len() as u64;
            expected += 1;
        }
        pipe.free(got.iter().map(|p| p.buf))
            .expect("free received buffers");
        let c = send_controls(&mut pipe, &mut controls, CONTROLS);
        if k == 0 && c == 0 {
            let interest = if expected < n {
                Interest::Readable
            } else {
                Interest::Writable
            };
            match pipe.wait(interest, Some(SHORT)) {
                Ok(()) => {}
                Err(Error::PeerGone) if interest == Interest::Readable => gone = true,
                Err(e) => panic!("waiting for {interest:?} after {expected} of {n} packets: {e}"),
            }
        }
    }
    let elapsed = start.elapsed();
    println!(
        "{n} packets ({} MB) in {elapsed:.2?}: {:.2} Mpps",
        bytes / 1_000_000,
        n as f64 / elapsed.as_secs_f64() / 1e6
    );

    // The sender exits once it has sent everything and returned our control buffers.
    peer.exits_cleanly(SHORT);
    got.clear();
    assert_eq!(
        pipe.recv(&mut got, 256)
            .expect("recv after the sender exited"),
        0,
        "nothing beyond the {n} packets"
    );
    assert!(matches!(
        pipe.wait(Interest::Readable, Some(SHORT)),
        Err(Error::PeerGone)
    ));
    while pipe.refill().expect("take back returned buffers") > 0 {}
    assert_eq!(pipe.pending_returns(), 0);
    let s = pipe.stats();
    assert_eq!(s.received, n);
    assert_eq!(s.sent, CONTROLS);
    assert_eq!(
        s.reclaimed, CONTROLS,
        "the sender returned every control buffer"
    );
    assert_eq!(
        s.drop_counters(),
        vec![],
        "a well-behaved peer causes no drops"
    );
    assert_all_home(&pipe, &g);
}

#[test]
fn echo_returns_the_same_bytes_in_the_same_buffers() {
    let _serial = serial();
    const PACKETS: u64 = 100_000;
    const WINDOW: usize = 128;
    let g = Geometry::default();
    let (mut peer, mut pipe) = start("echo", g, "echo", &[]);
    let mut outstanding = std::collections::VecDeque::new();
    let (mut next, mut back) = (0u64, 0u64);
    let mut got = Vec::with_capacity(64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while back < PACKETS {
        assert!(
            Instant::now() < deadline,
            "echo too slow: {back} of {PACKETS}"
        );
        let mut batch = Vec::new();
        while next < PACKETS && outstanding.len() + batch.len() < WINDOW {
            let buf = pipe.alloc().expect("the window is smaller than our half");
            let len = fill_packet(next, pipe.buffer_mut(buf).expect("just allocated"));
            batch.push(Packet {
                buf,
                offset: 0,
                len: len as u32,
            });
            next += 1;
        }
        let n = pipe.send(&batch).expect("send");
        assert_eq!(n, batch.len(), "the window is smaller than the ring");
        outstanding.extend(batch);
        got.clear();
        if pipe.recv(&mut got, 64).expect("recv") == 0 {
            pipe.wait(Interest::Readable, Some(SHORT))
                .unwrap_or_else(|e| panic!("waiting for echoes after {back}: {e}"));
            continue;
        }
        for p in &got {
            let sent = outstanding
                .pop_front()
                .expect("no echo without a packet sent");
            assert_eq!(
                *p, sent,
                "echoed in order, zero-copy, same offset and length"
            );
            assert_eq!(check_packet(pipe.payload(p)), Ok(back), "same bytes back");
            back += 1;
        }
        pipe.free(got.iter().map(|p| p.buf)).expect("free echoes");
    }

    // Round-trip time, one packet at a time.
    let mut rtts = Vec::new();
    for i in 0..2000u64 {
        let buf = pipe.alloc().expect("buffers are home");
        pipe.buffer_mut(buf).expect("just allocated")[..8].copy_from_slice(&i.to_le_bytes());
        let t = Instant::now();
        pipe.send(&[Packet {
            buf,
            offset: 0,
            len: 8,
        }])
        .expect("send ping");
        got.clear();
        while got.is_empty() {
            pipe.recv(&mut got, 1).expect("recv pong");
            if got.is_empty() {
                pipe.wait(Interest::Readable, Some(SHORT)).expect("pong");
            }
        }
        rtts.push(t.elapsed());
        assert_eq!(pipe.payload(&got[0]), &i.to_le_bytes());
        pipe.free([got[0].buf]).expect("free pong");
    }
    rtts.sort();
    println!(
        "{PACKETS} echoed with a window of {WINDOW}; ping-pong RTT median {:?}, p99 {:?}",
        rtts[rtts.len() / 2],
        rtts[rtts.len() * 99 / 100]
    );

    assert_eq!(pipe.stats().drop_counters(), vec![]);
    assert_all_home(&pipe, &g);
    // The echo peer leaves when we do.
    drop(pipe);
    peer.exits_cleanly(SHORT);
}

#[test]
fn the_death_of_a_peer_is_noticed_within_100ms() {
    let _serial = serial();
    let g = Geometry::default();
    let (mut peer, mut pipe) = start("death", g, "die-mid-stream", &[]);
    let mut expected = 0u64;
    let mut got = Vec::with_capacity(256);
    let take = |pipe: &mut UserPipe, got: &mut Vec<Packet>, expected: &mut u64| {
        got.clear();
        let k = pipe.recv(got, 256).expect("recv");
        for p in got.iter() {
            assert_eq!(check_packet(pipe.payload(p)), Ok(*expected));
            *expected += 1;
        }
        pipe.free(got.iter().map(|p| p.buf)).expect("free");
        k
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while expected < 50_000 {
        assert!(Instant::now() < deadline, "stream too slow: {expected}");
        if take(&mut pipe, &mut got, &mut expected) == 0 {
            pipe.wait(Interest::Readable, Some(SHORT))
                .expect("the peer streams");
        }
    }

    let killed = Instant::now();
    peer.child.kill().expect("SIGKILL the peer");
    let before = expected;
    let noticed = loop {
        if take(&mut pipe, &mut got, &mut expected) > 0 {
            continue;
        }
        match pipe.wait(Interest::Readable, Some(SHORT)) {
            Ok(()) => {}
            Err(Error::PeerGone) => break killed.elapsed(),
            Err(e) => panic!("waiting after the kill: {e}"),
        }
    };
    println!(
        "peer killed after {before} packets; drained {} more; PeerGone after {noticed:?}",
        expected - before
    );
    assert!(
        noticed < Duration::from_millis(100),
        "the listener noticed the death after {noticed:?}"
    );
    assert!(!peer.exit_within(SHORT).success(), "the peer was killed");

    // Drain what the peer published just before it died (PeerGone may come first: see
    // `bug_peer_gone_is_reported_while_packets_are_readable`); then, the peer being reaped,
    // the ring stays empty and the death stays noticed.
    while take(&mut pipe, &mut got, &mut expected) > 0 {}
    assert_eq!(take(&mut pipe, &mut got, &mut expected), 0);
    assert!(pipe.peer_gone());
    assert!(matches!(
        pipe.wait(Interest::Readable, Some(SHORT)),
        Err(Error::PeerGone)
    ));
    assert_eq!(pipe.stats().drop_counters(), vec![]);
    let c = pipe.audit().expect("audit after the death");
    assert_eq!(c.held, 0);
    assert_eq!(c.free + c.absent, half(&g), "the peer had none of ours");
}

// ---------------------------------------------------------------------------------------------
// Hostile peers

/// A small geometry, so that rings fill quickly: 64-slot rings, 4 segments of 64 buffers.
fn small() -> Geometry {
    Geometry {
        ring_slots: [64; 5],
        segments: 4,
        bufs_per_segment: 64,
        ..Geometry::default()
    }
}

/// The listener's side of a hostile test, after the peer connected.
struct Hostile {
    peer: Peer,
    pipe: UserPipe,
    g: Geometry,
    /// A buffer the listener holds, and what it contains.
    held: u32,
    content: Vec<u8>,
}

impl Hostile {
    /// Connects a hostile peer, prepares a held buffer and tells the peer to go; returns once
    /// the peer has committed its violation.
    fn start(case: &str) -> Self {
        let g = small();
        let (mut peer, mut pipe) = start(&format!("hostile-{case}"), g, "hostile", &[case]);
        let held = pipe.alloc().expect("a fresh pipe has buffers");
        let content: Vec<u8> = (0..g.buf_size).map(|i| (i * 7 + 3) as u8).collect();
        pipe.buffer_mut(held)
            .expect("just allocated")
            .copy_from_slice(&content);
        let free = pipe.alloc().expect("a fresh pipe has buffers");
        pipe.free([free]).expect("free our own buffer");
        // Home segments are put in service lowest first: the last one is not in service.
        let absent = half(&g) - 1;
        let c = pipe.buffer_counts();
        assert_eq!(
            (c.held, c.free, c.absent),
            (1, g.bufs_per_segment - 1, half(&g) - g.bufs_per_segment)
        );
        peer.say(&format!("go {held} {free} {absent}"));
        Self {
            peer,
            pipe,
            g,
            held,
            content,
        }
    }

    /// Receives until the peer's valid packets are in; returns the other payloads received.
    fn collect_valid(&mut self) -> Vec<Vec<u8>> {
        let want: Vec<Vec<u8>> = (0..VALID_AFTER_VIOLATIONS).map(valid_payload).collect();
        let (mut valid, mut others) = (Vec::new(), Vec::new());
        let mut got = Vec::new();
        let deadline = Instant::now() + SHORT;
        while valid.len() < want.len() {
            assert!(
                Instant::now() < deadline,
                "valid packets missing: {valid:?}"
            );
            got.clear();
            if self.pipe.recv(&mut got, 64).expect("recv after violations") == 0 {
                self.pipe
                    .wait(Interest::Readable, Some(SHORT))
                    .expect("the peer sends valid packets after its violations");
            }
            for p in &got {
                let bytes = self.pipe.payload(p).to_vec();
                if bytes.starts_with(b"valid") {
                    valid.push(bytes);
                } else {
                    others.push(bytes);
                }
            }
            self.pipe.free(got.iter().map(|p| p.buf)).expect("free");
        }
        assert_eq!(valid, want, "valid packets after the violations, in order");
        others
    }

    /// The held buffer is still held, and its bytes are unchanged.
    fn assert_held_intact(&mut self) {
        let held = self.held;
        let bytes = self
            .pipe
            .buffer_mut(held)
            .unwrap_or_else(|| panic!("buffer {held} is no longer held by the listener"));
        assert!(
            bytes == self.content,
            "the content of held buffer {held} changed"
        );
    }

    /// Both directions still work: the held buffer and a fresh one go through the peer's
    /// echo and come back unchanged, in the same buffers.
    fn assert_round_trip(&mut self) {
        let fresh = self.pipe.alloc().expect("buffers are home");
        self.pipe.buffer_mut(fresh).expect("just allocated")[..4].copy_from_slice(b"ping");
        let out = [
            Packet {
                buf: self.held,
                offset: 0,
                len: self.g.buf_size,
            },
            Packet {
                buf: fresh,
                offset: 0,
                len: 4,
            },
        ];
        assert_eq!(self.pipe.send(&out).expect("send after violations"), 2);
        let mut got = Vec::new();
        let deadline = Instant::now() + SHORT;
        while got.len() < 2 {
            assert!(Instant::now() < deadline, "echo missing: {got:?}");
            if self.pipe.recv(&mut got, 64).expect("recv echo") == 0 {
                self.pipe
                    .wait(Interest::Readable, Some(SHORT))
                    .expect("the peer echoes");
            }
        }
        assert_eq!(got, out, "echoed zero-copy");
        assert!(self.pipe.payload(&got[0]) == self.content);
        assert_eq!(self.pipe.payload(&got[1]), b"ping");
        self.pipe.free([self.held, fresh]).expect("free echoes");
    }

    /// The listener's books: audit clean, nothing of ours lost. Then the peer leaves with us.
    fn finish(mut self) {
        while self.pipe.refill().expect("refill") > 0 {}
        assert_all_home(&self.pipe, &self.g);
        drop(self.pipe);
        self.peer.exits_cleanly(SHORT);
    }
}

/// A case of per-descriptor violations: each is dropped and counted under its reason, the
/// valid packets sent after them arrive, our held buffer is untouched, and the pipe works.
fn per_descriptor_case(case: &str, drops: &[(&str, u64)], extra: &[&[u8]]) {
    let _serial = serial();
    let mut h = Hostile::start(case);
    assert_eq!(h.peer.line(), "violated");
    let others = h.collect_valid();
    assert_eq!(h.peer.line(), "valid sent");
    assert_eq!(others, extra, "packets other than the valid ones");
    // Returns on the FREE ring are examined when the listener takes them back.
    h.pipe.refill().expect("refill after violations");
    let drops: Vec<(String, u64)> = drops.iter().map(|&(k, n)| (k.to_owned(), n)).collect();
    assert_eq!(h.pipe.stats().drop_counters(), drops);
    h.pipe.audit().expect("audit after violations");
    h.assert_held_intact();
    h.assert_round_trip();
    assert_eq!(h.pipe.stats().drop_counters(), drops, "no further drops");
    h.finish();
}

#[test]
fn hostile_bad_index_is_dropped_and_counted() {
    per_descriptor_case("bad-index", &[("tx_bad_index", 4)], &[]);
}

#[test]
fn hostile_bad_desc_is_dropped_and_counted() {
    per_descriptor_case("bad-desc", &[("tx_bad_desc", 5)], &[]);
}

#[test]
fn hostile_double_submit_delivers_once() {
    per_descriptor_case("double-submit", &[("tx_not_owner", 1)], &[DOUBLE_PAYLOAD]);
}

#[test]
fn hostile_forged_indices_of_ours_are_refused() {
    per_descriptor_case("forged", &[("tx_not_owner", 3)], &[]);
}

#[test]
fn hostile_bad_flags_are_dropped_and_counted() {
    per_descriptor_case("bad-flags", &[("tx_bad_flags", 3)], &[]);
}

#[test]
fn hostile_forged_returns_are_refused() {
    per_descriptor_case(
        "free-forged",
        &[("free_bad_index", 2), ("free_not_owner", 3)],
        &[],
    );
}

/// Bug reproducer: the peer "returns" on the FREE ring a buffer of its own half, which the
/// listener never lent it. `Ledger::reclaim` accepts any buffer in state `Peer`, so the
/// listener takes it into its free list (no drop is counted, the audit passes) and its next
/// `alloc` hands it out: the listener then writes into a buffer the peer holds, and the packet
/// it sends in it is dropped by the peer as `rx_not_owner`.
#[test]
fn regression_a_buffer_never_lent_is_refused_as_returned() {
    let _serial = serial();
    let mut h = Hostile::start("free-own");
    let own: u32 = h
        .peer
        .line()
        .strip_prefix("own ")
        .and_then(|s| s.parse().ok())
        .expect("the peer names its buffer");
    assert!(own >= half(&h.g), "the peer's buffer is in its own half");
    assert_eq!(h.peer.line(), "violated");
    assert!(h.collect_valid().is_empty());
    assert_eq!(h.peer.line(), "valid sent");
    h.pipe.refill().expect("refill after violations");
    let next = h.pipe.alloc().expect("buffers are home");
    assert!(
        next < half(&h.g),
        "the listener allocated buffer {next} of the peer's half (the peer returned {own})"
    );
    h.pipe.free([next]).expect("free");
    assert_eq!(
        h.pipe.stats().drop_counters(),
        vec![("free_not_owner".to_owned(), 1)]
    );
    h.pipe.free([h.held]).expect("free");
    h.finish();
}

/// Bug reproducer: once a ring index was found corrupt, `recv`, `send` and `refill` keep
/// failing with `RingIndexOob`, but `wait(Readable)` calls `ready()` before `check()`; as soon
/// as the peer publishes a sane index again it returns `Ok(())` on the broken channel (and an
/// app looping on wait-then-recv spins on the error).
#[test]
fn regression_wait_keeps_failing_on_a_broken_channel_after_the_peer_restores_its_index() {
    let _serial = serial();
    let mut h = Hostile::start("index-oob");
    assert_eq!(h.peer.line(), "violated");
    let e = h
        .pipe
        .wait(Interest::Readable, Some(SHORT))
        .expect_err("a corrupt producer index must fail the wait");
    assert!(matches!(e, Error::RingIndexOob { .. }), "{e}");
    h.peer.say("restore");
    assert_eq!(h.peer.line(), "restored");
    let mut got = Vec::new();
    assert!(h.pipe.recv(&mut got, 64).is_err(), "recv stays broken");
    match h.pipe.wait(Interest::Readable, Some(SHORT)) {
        Err(Error::RingIndexOob { .. }) => {}
        other => panic!("wait on a broken channel returned {other:?}"),
    }
}

/// Sends our own buffers until the RX ring refuses with `RingIndexOob`; returns the error.
fn fill_rx_until_refused(pipe: &mut UserPipe, slots: u32) -> Error {
    for i in 0..=slots {
        let buf = pipe.alloc().expect("our half is larger than the ring");
        match pipe.send(&[Packet {
            buf,
            offset: 0,
            len: 1,
        }]) {
            Ok(1) => {}
            Ok(n) => panic!("send {i} went {n} without an error"),
            Err(SendError::Channel(e)) => {
                pipe.free([buf]).expect("free our unsent buffer");
                return e;
            }
            Err(e) => panic!("send {i}: {e}"),
        }
    }
    panic!("{} sends passed a corrupt consumer index", slots + 1);
}

/// The peer publishes an impossible ring index: the listener fails with `RingIndexOob`, keeps
/// failing the same way even after the peer publishes a sane index again, and stays whole.
fn index_oob_case(case: &str, ring: RingKind) {
    let _serial = serial();
    let mut h = Hostile::start(case);
    assert_eq!(h.peer.line(), "violated");
    let err = match ring {
        RingKind::Tx => h
            .pipe
            .wait(Interest::Readable, Some(SHORT))
            .expect_err("a corrupt producer index must fail the wait"),
        _ => fill_rx_until_refused(&mut h.pipe, h.g.slots(ring)),
    };
    let size = h.g.slots(ring);
    let (claimed, valid) = match err {
        Error::RingIndexOob {
            ring: r,
            claimed,
            valid,
            size: s,
        } if r == ring && s == size => (claimed, valid),
        e => panic!("expected RingIndexOob on the {ring:?} ring, got {e}"),
    };
    assert_eq!(claimed, 1 << 30);
    let same = |e: &Error| {
        matches!(e, Error::RingIndexOob { ring: r, claimed: c, valid: v, size: s }
            if *r == ring && *c == claimed && *v == valid && *s == size)
    };
    let mut got = Vec::new();
    let check_all_fail = |pipe: &mut UserPipe, got: &mut Vec<Packet>, wait_too: bool| {
        for _ in 0..3 {
            let e = pipe.recv(got, 64).expect_err("recv on a broken channel");
            assert!(same(&e), "recv: {e}");
        }
        assert!(got.is_empty());
        if wait_too {
            let e = pipe
                .wait(Interest::Readable, Some(SHORT))
                .expect_err("wait on a broken channel");
            assert!(same(&e), "wait: {e}");
        }
        let e = pipe.refill().expect_err("refill on a broken channel");
        assert!(same(&e), "refill: {e}");
        let buf = pipe.alloc().expect("our half has buffers");
        match pipe.send(&[Packet {
            buf,
            offset: 0,
            len: 1,
        }]) {
            Err(SendError::Channel(e)) if same(&e) => {}
            other => panic!("send on a broken channel: {other:?}"),
        }
        pipe.free([buf]).expect("free our unsent buffer");
    };
    check_all_fail(&mut h.pipe, &mut got, true);
    // The peer publishes a sane index again and sends valid packets: the channel stays broken.
    // (`wait` is left out here: it then reports the channel readable, see
    // `bug_wait_reports_a_broken_channel_ready_once_the_peer_restores_its_index`.)
    h.peer.say("restore");
    assert_eq!(h.peer.line(), "restored");
    check_all_fail(&mut h.pipe, &mut got, false);
    assert_eq!(
        h.pipe.stats().drop_counters(),
        vec![("ring_index_oob".to_owned(), 1)],
        "counted once"
    );
    assert_eq!(h.pipe.stats().received, 0);
    let c = h.pipe.audit().expect("audit of a broken channel");
    h.assert_held_intact();
    let sent = h.pipe.stats().sent as u32;
    assert_eq!(c.held, 1, "only our held buffer");
    assert_eq!(
        c.peer,
        half(&h.g) + sent,
        "the peer's half and what we sent it"
    );
    assert_eq!(c.free + c.absent + c.held + sent, half(&h.g));
    drop(h.pipe);
    h.peer.exits_cleanly(SHORT);
}

#[test]
fn hostile_producer_index_out_of_bounds_breaks_the_channel_for_good() {
    index_oob_case("index-oob", RingKind::Tx);
}

#[test]
fn hostile_consumer_index_out_of_bounds_breaks_the_channel_for_good() {
    index_oob_case("index-oob-consumer", RingKind::Rx);
}

#[test]
fn hostile_writes_to_sealed_regions_are_refused_by_the_kernel() {
    let _serial = serial();
    let mut h = Hostile::start("write-ro");
    // From the peer's process, against our region (exit code 0 only if both were refused)...
    let line = h.peer.line();
    let status = h.peer.exit_within(SHORT);
    assert!(
        status.success(),
        "the peer could write our sealed region: {line} ({status})"
    );
    // ...and from ours, against the peer's region.
    let eperm = Some(rustix::io::Errno::PERM);
    assert_eq!(h.pipe.hostile_write_peer_region(), (eperm, eperm));
    h.pipe.audit().expect("our redzone is intact");
    h.assert_held_intact();
}

/// Bug reproducer: a peer sends 32 packets and exits at once. When its doorbell and its
/// socket's hang-up are both pending by the time the listener's `poll` returns,
/// `Endpoint::sleep` returns `PeerGone` without looking at the rings again, so `wait` reports
/// the peer gone while its last packets are readable. An app that takes PeerGone as the end
/// of the stream loses them. (Here: most runs out of 300.)
#[test]
fn regression_peer_gone_comes_only_after_the_last_packets() {
    let _serial = serial();
    let (runs, mut hits) = (300, 0);
    for r in 0..runs {
        let (mut peer, mut pipe) = start(&format!("race-{r}"), small(), "sender", &["32"]);
        pipe.set_wait_policy(netchannel::WaitPolicy {
            spin: Duration::ZERO,
        });
        let mut got = Vec::new();
        loop {
            match pipe.wait(Interest::Readable, Some(SHORT)) {
                Ok(()) => {
                    pipe.recv(&mut got, 64).expect("recv");
                }
                Err(Error::PeerGone) => {
                    if pipe.recv(&mut got, 64).expect("recv") > 0 {
                        hits += 1;
                    }
                    break;
                }
                Err(e) => panic!("wait: {e}"),
            }
        }
        assert_eq!(got.len(), 32);
        peer.exits_cleanly(SHORT);
    }
    assert_eq!(
        hits, 0,
        "PeerGone was reported with packets readable in {hits} of {runs} runs"
    );
}
