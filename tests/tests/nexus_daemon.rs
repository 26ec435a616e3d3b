//! The nexus daemon against real processes: hostile apps, control-socket abuse, apps killed at
//! random points, a nexus killed or stopped under its apps, and the memory an idle channel costs.
//!
//! Each test starts its own `nexus_daemon` on a socket path unique to this process and test, and
//! holds it and every `nexus_app` child in guards that kill them on drop, so a failing test leaves
//! no process behind. Every wait has a bound. Children are synchronised through lines on their
//! stdin and stdout, and a blocked wait is recognised from `/proc` (the thread asleep in `poll`),
//! never by sleeping. The tests run one at a time (see [`serial`]): the machine has two cores, and
//! several tests measure latencies or throughput.
//!
//! What the nexus reports is read as any client would, with `Nexus::status`.
//!
//! * Hostile apps (`hostile_*`): each per-descriptor violation is dropped and counted under
//!   exactly its reason while the channel keeps working; a corrupt ring index quarantines at
//!   once; `max_strikes` violations quarantine; the sealed region cannot be written.
//! * A flood of violations beside a healthy app (`a_flood_of_violations_...`).
//! * Control-socket abuse, per-user limits and permissions.
//! * Apps SIGKILLed at random points (`apps_killed_...`), 200 times.
//! * Revocation, SIGTERM and kill -9 of the nexus under apps blocked in waits; restart.
//! * Memory per idle channel.
//!
//! Tests marked `#[ignore = "bug: ..."]` reproduce bugs found in the crates; each says where.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netchannel::nexus::{Channel, ChannelOptions, Nexus};
use netchannel::{DefunctReason, Error, Interest, Packet};
use netchannel_shm::control::{
    self, ChannelStatus, ErrorCode, MAX_REPLY, MAX_REQUEST, NexusStatus, Reply, Request,
};
use netchannel_shm::fdpass::recv_with_fds;
use netchannel_tests::{VALID_AFTER_VIOLATIONS, XorShift};
use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};
use rustix::process::{Pid, PidfdFlags, Signal};

const DAEMON: &str = env!("CARGO_BIN_EXE_nexus_daemon");
const APP: &str = env!("CARGO_BIN_EXE_nexus_app");

/// Generous bound for anything that should take milliseconds.
const SHORT: Duration = Duration::from_secs(10);

/// The bound on noticing a death, a revocation or a shutdown.
const PROMPT: Duration = Duration::from_millis(100);

/// Buffers in a channel's pool with the nexus's default configuration.
const POOL_BUFFERS: u32 = 4096;

/// `DefunctReason::Quarantined` as the status shows it.
const QUARANTINED: &str = "defunct: quarantined after protocol violations";

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of this file one at a time (a failed test poisons the lock; that is fine).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn socket_path(test: &str) -> String {
    format!("/tmp/netchannel-test-{}-{test}.sock", std::process::id())
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32).expect("a child's pid is positive")
}

/// Waits until `fd` is readable (a pidfd: the process exited), at most `timeout`.
fn readable_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
        if fds[0].revents().contains(PollFlags::IN) {
            return true;
        }
    }
}

/// A child process (daemon or app) with a pidfd, killed and reaped on drop.
struct Proc {
    child: Child,
    pidfd: OwnedFd,
    what: String,
}

impl Proc {
    fn new(child: Child, what: String) -> Self {
        let pidfd =
            rustix::process::pidfd_open(pid_of(&child), PidfdFlags::empty()).expect("pidfd_open");
        Self { child, pidfd, what }
    }

    fn pid(&self) -> Pid {
        pid_of(&self.child)
    }

    fn signal(&self, sig: Signal) {
        rustix::process::pidfd_send_signal(&self.pidfd, sig)
            .unwrap_or_else(|e| panic!("signalling {}: {e}", self.what));
    }

    /// Waits (on the pidfd) for the process to exit, and reaps it.
    fn exit_within(&mut self, timeout: Duration) -> ExitStatus {
        assert!(
            readable_within(self.pidfd.as_fd(), timeout),
            "{} did not exit within {timeout:?}",
            self.what
        );
        self.child.wait().expect("waitpid")
    }

    /// Fails the test if the process has already exited.
    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().expect("waitpid") {
            panic!("{} exited on its own: {st}", self.what);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A `nexus_daemon` child serving a socket path.
struct Daemon {
    proc: Proc,
    socket: String,
    config: Option<String>,
    /// Remove the socket file on drop (off when a test leaves it stale on purpose).
    remove_socket: bool,
}

impl Daemon {
    fn start(test: &str, config: Option<&str>) -> Self {
        Self::start_at(&socket_path(test), config)
    }

    /// Starts a nexus on `socket` (with `config` as its TOML file, if any) and waits until it
    /// accepts connections.
    fn start_at(socket: &str, config: Option<&str>) -> Self {
        let mut cmd = Command::new(DAEMON);
        cmd.arg(socket).stdin(Stdio::null());
        let config = config.map(|text| {
            let path = format!("{socket}.toml");
            std::fs::write(&path, text).expect("writing the nexus config");
            cmd.arg(&path);
            path
        });
        let child = cmd.spawn().expect("spawn nexus_daemon");
        let mut d = Self {
            proc: Proc::new(child, format!("nexus_daemon {socket}")),
            socket: socket.to_owned(),
            config,
            remove_socket: true,
        };
        let start = Instant::now();
        while Nexus::connect(socket).is_err() {
            d.proc.assert_running();
            assert!(start.elapsed() < SHORT, "the nexus did not come up");
            std::thread::sleep(Duration::from_millis(2));
        }
        d
    }

    /// A control connection for status requests.
    fn monitor(&self) -> Nexus {
        Nexus::connect(&self.socket).expect("the nexus accepts connections")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.proc.child.try_wait() {
            let _ = self.proc.child.kill();
        }
        let _ = self.proc.child.wait();
        if self.remove_socket {
            let _ = std::fs::remove_file(&self.socket);
        }
        if let Some(c) = &self.config {
            let _ = std::fs::remove_file(c);
        }
    }
}

/// A `nexus_app` child, talking to the test through lines.
struct App {
    proc: Proc,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl App {
    fn spawn(args: &[&str]) -> Self {
        Self::spawn_as(None, args)
    }

    /// Spawns the app as user and group `uid` (an unprivileged user), or as ourselves.
    fn spawn_as(uid: Option<u32>, args: &[&str]) -> Self {
        let what = format!("nexus_app {}", args.join(" "));
        let mut cmd = Command::new(APP);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, uid);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            proc: Proc::new(child, what),
            stdin,
            lines,
        }
    }

    /// Writes one line to the app's stdin.
    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("telling {} {line:?}: {e}", self.proc.what));
    }

    /// Closes the app's stdin (the hostile apps then close their channel and exit).
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next line the app prints.
    fn line(&mut self) -> String {
        self.line_within(SHORT)
    }

    /// The next line the app prints, waiting at most `timeout`.
    fn line_within(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(e) => panic!(
                "{} printed no line within {timeout:?} ({e}); status {:?}",
                self.proc.what,
                self.proc.child.try_wait()
            ),
        }
    }

    fn exits_cleanly(&mut self) {
        let status = self.proc.exit_within(SHORT);
        assert!(status.success(), "{} failed: {status}", self.proc.what);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn channel(s: &NexusStatus, id: u64) -> Option<&ChannelStatus> {
    s.channels.iter().find(|c| c.id == id)
}

/// A counter of a (name, count) list; 0 when absent.
fn count(list: &[(String, u64)], name: &str) -> u64 {
    list.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v)
}

fn owned(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|&(n, v)| (n.to_owned(), v)).collect()
}

fn status(mon: &mut Nexus) -> NexusStatus {
    mon.status().expect("the nexus answers a status request")
}

/// Polls the status until `done` holds (bounded by [`SHORT`]); returns it and the time taken.
fn status_until(
    mon: &mut Nexus,
    what: &str,
    done: impl Fn(&NexusStatus) -> bool,
) -> (NexusStatus, Duration) {
    let start = Instant::now();
    loop {
        let s = status(mon);
        if done(&s) {
            return (s, start.elapsed());
        }
        assert!(start.elapsed() < SHORT, "{what}: not within {SHORT:?}");
        std::thread::yield_now();
    }
}

/// Sends `n` packets (batches of up to 32) and checks that each comes back, in order.
fn round_trip(ch: &mut Channel, n: u32) {
    round_trip_in(ch, n, 32);
}

/// [`round_trip`] in batches of up to `batch`.
fn round_trip_in(ch: &mut Channel, n: u32, batch: usize) {
    let mut got = Vec::new();
    let deadline = Instant::now() + SHORT;
    let mut next = 0u32;
    let mut back = 0u32;
    while back < n {
        assert!(Instant::now() < deadline, "{back} of {n} reflections came");
        let mut pkts = Vec::new();
        while next < n && pkts.len() < batch {
            let Some(buf) = ch.alloc() else { break };
            ch.buffer_mut(buf).expect("allocated")[..4].copy_from_slice(&next.to_le_bytes());
            pkts.push(Packet {
                buf,
                offset: 0,
                len: 4,
            });
            next += 1;
        }
        let k = ch.send(&pkts).expect("send");
        assert_eq!(k, pkts.len(), "the TX ring has room for {batch}");
        got.clear();
        let r = ch.recv(&mut got, 64).expect("recv");
        for p in &got {
            assert_eq!(ch.payload(p), &back.to_le_bytes(), "reflection {back}");
            back += 1;
        }
        ch.free(got.iter().map(|p| p.buf)).expect("free");
        if r == 0 && k == 0 {
            let interest = if next > back {
                Interest::Readable
            } else {
                Interest::Buffers
            };
            ch.wait(interest, Some(SHORT)).expect("wait");
        }
    }
}

/// The nexus still serves: a new client opens a channel, reflects packets, and closes it.
fn assert_serves(socket: &str) {
    let mut nx = Nexus::connect(socket).expect("the nexus still accepts connections");
    let mut ch = nx
        .open_channel(ChannelOptions::default())
        .expect("the nexus still opens channels");
    round_trip(&mut ch, 64);
    let s = status(&mut nx);
    let c = channel(&s, ch.id()).expect("the new channel is listed");
    assert_eq!((c.tx_packets, c.rx_packets), (64, 64));
    assert_eq!(c.drops, vec![], "a well-behaved channel has no drops");
    assert_eq!(c.audit, "ok");
    nx.close_channel(ch).expect("close");
}

/// Whether thread `tid` of process `pid` is asleep in poll(2)/ppoll(2).
fn asleep_in_poll(pid: i32, tid: i32) -> bool {
    let dir = format!("/proc/{pid}/task/{tid}");
    let Ok(stat) = std::fs::read_to_string(format!("{dir}/stat")) else {
        return false;
    };
    let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    let Ok(sc) = std::fs::read_to_string(format!("{dir}/syscall")) else {
        return false;
    };
    let nr = sc.split_whitespace().next().unwrap_or("");
    // x86_64: 7 = poll, 271 = ppoll; aarch64 has only ppoll (73).
    let poll_nr = if cfg!(target_arch = "x86_64") {
        ["7", "271"].contains(&nr)
    } else {
        nr == "73"
    };
    state == Some('S') && poll_nr
}

/// Waits until thread `tid` of process `pid` is asleep in poll (bounded by [`SHORT`]).
fn wait_asleep_in_poll(pid: i32, tid: i32) {
    let start = Instant::now();
    while !asleep_in_poll(pid, tid) {
        assert!(
            start.elapsed() < SHORT,
            "thread {tid} of {pid} never went to sleep in poll"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn my_tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Hostile apps

/// A hostile app against its own nexus, ready to be told `go`.
struct Hostile {
    d: Daemon,
    mon: Nexus,
    app: App,
    id: u64,
}

impl Hostile {
    fn start(case: &str, config: Option<&str>) -> Self {
        let d = Daemon::start(&format!("hostile-{case}"), config);
        let mut mon = d.monitor();
        let mut app = App::spawn(&["hostile", &d.socket, case]);
        let line = app.line();
        let id: u64 = line
            .strip_prefix("channel ")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("expected `channel ID`, got {line:?}"));
        let s = status(&mut mon);
        let c = channel(&s, id).expect("the hostile app's channel is listed");
        assert_eq!(c.state, "active");
        assert_eq!(c.drops, vec![]);
        app.say("go");
        Self { d, mon, app, id }
    }

    fn channel_status(&mut self) -> ChannelStatus {
        let s = status(&mut self.mon);
        channel(&s, self.id)
            .unwrap_or_else(|| panic!("channel {} is gone: {s:?}", self.id))
            .clone()
    }

    /// The nexus still serves others; the app leaves cleanly and its channel is reclaimed with
    /// a whole ledger.
    fn finish(mut self) {
        assert_serves(&self.d.socket);
        let before = count(&status(&mut self.mon).control_errors, "reclaims");
        self.app.close_stdin();
        self.app.exits_cleanly();
        let id = self.id;
        let (s, _) = status_until(&mut self.mon, "the hostile channel is reclaimed", |s| {
            channel(s, id).is_none()
        });
        assert_eq!(count(&s.control_errors, "reclaims"), before + 1);
        assert_eq!(count(&s.control_errors, "reclaim_audit_failed"), 0);
    }
}

/// Per-descriptor violations: each dropped and counted under exactly its reason, the channel
/// stays active and keeps reflecting, every buffer is accounted for, the nexus serves others.
fn per_descriptor_case(case: &str, drops: &[(&str, u64)], others: u64) {
    let _serial = serial();
    let mut h = Hostile::start(case, None);
    assert_eq!(h.app.line(), "violated");
    assert_eq!(
        h.app.line(),
        format!("done {others}"),
        "packets reflected besides the valid ones"
    );
    let c = h.channel_status();
    assert_eq!(c.drops, owned(drops), "drop counters of channel {}", h.id);
    assert_eq!(c.state, "active", "below max_strikes the channel stays up");
    // The warm-up, the valid packets, and whatever else was reflected.
    let accepted = 1 + u64::from(VALID_AFTER_VIOLATIONS) + others;
    assert_eq!(c.tx_packets, accepted, "packets accepted from the app");
    assert_eq!(c.rx_packets, accepted, "packets reflected to the app");
    assert_eq!(c.audit, "ok");
    assert_eq!(
        c.buffers_free + c.buffers_nexus + c.buffers_app + c.buffers_absent,
        POOL_BUFFERS,
        "every buffer is in exactly one place: {c:?}"
    );
    assert_eq!(c.buffers_nexus, 0, "the nexus holds nothing between passes");
    h.finish();
}

#[test]
fn hostile_bad_index_is_dropped_and_counted() {
    per_descriptor_case("bad-index", &[("tx_bad_index", 4)], 0);
}

#[test]
fn hostile_offset_length_overflows_are_dropped_and_counted() {
    per_descriptor_case("bad-desc", &[("tx_bad_desc", 6)], 0);
}

#[test]
fn hostile_lengths_beyond_the_buffer_are_dropped_and_counted() {
    per_descriptor_case("lie-len", &[("tx_bad_desc", 3)], 0);
}

#[test]
fn hostile_forged_indices_are_refused() {
    per_descriptor_case("forged", &[("tx_not_owner", 3)], 0);
}

#[test]
fn hostile_double_submit_is_reflected_once() {
    per_descriptor_case("double-submit", &[("tx_not_owner", 1)], 1);
}

#[test]
fn hostile_double_free_is_taken_once() {
    per_descriptor_case("double-free", &[("free_not_owner", 1)], 0);
}

#[test]
fn hostile_returns_of_buffers_never_lent_are_refused() {
    per_descriptor_case("free-unowned", &[("free_not_owner", 2)], 0);
}

#[test]
fn hostile_returns_of_bad_indices_are_refused() {
    per_descriptor_case("free-bad-index", &[("free_bad_index", 2)], 0);
}

#[test]
fn hostile_reserved_flags_are_dropped_and_counted() {
    per_descriptor_case("bad-flags", &[("tx_bad_flags", 3)], 0);
}

/// A violation that ends the channel: the app sees `Defunct { Quarantined }`, the status shows
/// the channel quarantined with exactly `drops`.
fn quarantine_case(case: &str, drops: &[(&str, u64)]) -> (Hostile, ChannelStatus) {
    let mut h = Hostile::start(case, None);
    if case == "strikes" {
        let line = h.app.line();
        assert!(line.starts_with("quarantined after "), "{line}");
    }
    let line = h.app.line();
    assert!(
        line.starts_with("defunct Defunct { reason: Quarantined } after "),
        "the app sees its channel quarantined: {line}"
    );
    println!("{case}: {line}");
    let c = h.channel_status();
    assert_eq!(c.state, QUARANTINED);
    assert_eq!(c.drops, owned(drops), "drop counters of channel {}", h.id);
    (h, c)
}

/// After a quarantine every buffer is home and the ledger is whole.
fn assert_all_home(c: &ChannelStatus) {
    assert_eq!(c.audit, "ok", "the ledger is whole after the quarantine");
    assert_eq!(
        (c.buffers_app, c.buffers_nexus),
        (0, 0),
        "every buffer came home: {c:?}"
    );
    assert_eq!(c.buffers_free + c.buffers_absent, POOL_BUFFERS, "{c:?}");
}

#[test]
fn hostile_tx_index_out_of_bounds_quarantines_at_once() {
    let _serial = serial();
    let (h, c) = quarantine_case("index-oob", &[("ring_index_oob", 1)]);
    assert_eq!(c.tx_packets, 0, "no strike was needed");
    assert_all_home(&c);
    h.finish();
}

/// A corrupt RX consumer index is seen when the nexus next needs room on RX (the app sends
/// without ever receiving until the RX ring is full). The ledger after this quarantine is the
/// subject of `regression_a_quarantine_on_a_full_rx_ring_leaks_no_buffer`.
#[test]
fn hostile_rx_index_out_of_bounds_quarantines() {
    let _serial = serial();
    let (h, c) = quarantine_case("rx-index-oob", &[("ring_index_oob", 1)]);
    // The nexus reads the consumer index when its cached view has no room for a batch (at most
    // `datapath.batch` = 64 packets): the RX ring (1024 slots) was nearly full by then.
    assert!(
        c.rx_packets > 1024 - 64 && c.rx_packets <= 1024,
        "the RX ring filled first: {c:?}"
    );
    assert!(c.tx_packets > c.rx_packets, "{c:?}");
    assert_serves(&h.d.socket);
}

/// Bug reproducer: when the nexus finds the RX consumer index corrupt while sending a batch of
/// reflections, `Channel::service` (`crates/nexus/src/channel/mod.rs`, the
/// `Err(SendError::Channel(e)) => return Err(corrupt(e))` arm) returns at once and the batch's
/// copies, held by the nexus, are never freed: the quarantine's reclaim reports "after reclaim
/// 64 buffers are still out", and closing the channel counts `reclaim_audit_failed`.
#[test]
fn regression_a_quarantine_on_a_full_rx_ring_leaks_no_buffer() {
    let _serial = serial();
    let (h, c) = quarantine_case("rx-index-oob", &[("ring_index_oob", 1)]);
    assert_all_home(&c);
    h.finish();
}

#[test]
fn hostile_strikes_quarantine_at_max_strikes() {
    let _serial = serial();
    // Pushed 8 at a time, each batch taken before the next: the nexus stops at exactly the
    // default channel.max_strikes (64).
    let (h, c) = quarantine_case("strikes", &[("tx_bad_index", 64)]);
    assert_eq!(c.tx_packets, 0);
    assert_all_home(&c);
    h.finish();
}

#[test]
fn hostile_writes_to_the_sealed_nexus_region_are_refused_by_the_kernel() {
    let _serial = serial();
    let d = Daemon::start("write-ro", None);
    let mut app = App::spawn(&["hostile", &d.socket, "write-ro"]);
    assert!(app.line().starts_with("channel "));
    app.say("go");
    let line = app.line();
    println!("the kernel to the hostile app: {line}");
    // The app exits 0 only if both the writable mapping and pwrite failed with EPERM.
    app.exits_cleanly();
    // And from this process too.
    let mut nx = d.monitor();
    let mut ch = nx.open_channel(ChannelOptions::default()).expect("open");
    let eperm = Some(rustix::io::Errno::PERM);
    assert_eq!(ch.hostile_write_peer_region(), (eperm, eperm));
    round_trip(&mut ch, 16);
    let s = status(&mut nx);
    assert_eq!(channel(&s, ch.id()).expect("listed").audit, "ok");
}

// ---------------------------------------------------------------------------------------------
// A healthy app beside a flood of violations

/// Seconds per measurement phase of the healthy app (samples of 100 ms).
const PHASE_SECS: &str = "0.6";
/// Repetitions of every condition, in mirrored orders (7, not 5: with 5 the median ratio fell
/// to 0.89 in about one run in six on this noisy 2-vCPU machine, whatever the nexus did).
const REPS: usize = 7;

/// Pins process `pid` (its main thread: every process pinned here has only that one) to `cpu`.
fn pin(pid: Pid, cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(Some(pid), &set).expect("sched_setaffinity");
}

/// What runs beside the healthy app during a measurement phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beside {
    /// Nothing.
    Solo,
    /// A process that only burns CPU (asks nothing of the nexus).
    Burner,
    /// A second healthy app streaming valid traffic as fast as it can.
    Peer,
    /// A hostile app flooding the nexus with invalid descriptors.
    Flood,
}

/// One phase: the healthy app's 100 ms samples with `cond` beside it; for the flood, also the
/// violations it committed and the time it took.
fn phase(d: &Daemon, mon: &mut Nexus, healthy: &mut App, cond: Beside) -> (Vec<u64>, u64, f64) {
    let mut other = match cond {
        Beside::Solo => None,
        Beside::Burner => Some(App::spawn(&["burn"])),
        Beside::Peer => Some(App::spawn(&["healthy", &d.socket, "3"])),
        Beside::Flood => Some(App::spawn(&["flood", &d.socket])),
    };
    let before = other.as_mut().map(|o| {
        pin(o.proc.pid(), 0);
        assert_eq!(o.line(), "ready");
        if cond == Beside::Peer {
            o.say("go");
        }
        (status(mon), Instant::now())
    });
    healthy.say("go");
    let line = healthy.line();
    let rest = line
        .strip_prefix("rate ")
        .unwrap_or_else(|| panic!("expected a rate, got {line:?}"));
    let (_, list) = rest.split_once(" samples ").expect("samples");
    let samples: Vec<u64> = list
        .split_whitespace()
        .map(|s| s.parse().expect("a sample is a number"))
        .collect();
    let (mut violations, mut secs) = (0, 0.0);
    if let (Some(o), Some((s0, t0))) = (other.as_mut(), before) {
        o.proc.assert_running();
        let pid = o.proc.pid().as_raw_nonzero().get();
        let s = status(mon);
        let find = |s: &NexusStatus| s.channels.iter().find(|c| c.pid == pid).cloned();
        if let (Some(c0), Some(c)) = (find(&s0), find(&s)) {
            assert_eq!(c.state, "active", "{cond:?} is not quarantined: {c:?}");
            assert_eq!(c.audit, "ok");
            let total = |c: &ChannelStatus| c.drops.iter().map(|(_, n)| n).sum::<u64>();
            if cond == Beside::Flood {
                assert!(total(&c) > total(&c0), "the flood went on during the phase");
                violations = total(&c) - total(&c0);
                secs = t0.elapsed().as_secs_f64();
                assert_eq!(c.tx_packets, 0, "the flood never got a packet through");
            } else {
                assert_eq!(total(&c), 0, "the peer is well-behaved");
                assert!(c.tx_packets > c0.tx_packets, "the peer streamed");
            }
        } else {
            assert_eq!(cond, Beside::Burner, "{cond:?} has a channel");
        }
    }
    drop(other);
    let (s, _) = status_until(mon, "the other app's channel is reclaimed", |s| {
        s.channels.len() == 1
    });
    assert_eq!(count(&s.control_errors, "reclaim_audit_failed"), 0);
    (samples, violations, secs)
}

/// The healthy app's reflected packets per second (100 ms samples) alone, beside a CPU
/// burner, beside a second healthy app, and beside a hostile app that keeps its TX ring full of
/// invalid descriptors and spins (max_strikes raised so that the flood is never quarantined).
/// The nexus is pinned to CPU 0 with whatever runs beside the healthy app, the healthy app to
/// CPU 1, so that the nexus gets the same CPU share beside the burner, the peer and the flood.
/// Conditions are repeated [`REPS`] times in mirrored orders (against drift), and each bound is
/// on the median over the repetitions of the ratio of the two conditions' medians.
///
/// The bounds: beside the flood the healthy app keeps at least 90% of what it gets beside the
/// burner, and of what it gets beside the peer. Not of its solo rate: on this machine's two
/// cores any third process that spins (and a flood must spin) takes CPU time from the nexus or
/// from the healthy app, which then loses 10–40% whatever the nexus does; the burner, which asks
/// nothing of the nexus, shows that same loss. The burner costs the nexus the same CPU share as
/// the flood, so flood/burner is the harm the violations do through the nexus (its time spent
/// on them); flood/peer says that a violation costs the others no more than a valid packet.
/// The solo rate is printed for the record. (A first flood that yielded the CPU while waiting
/// looked *better* than solo: it kept the nexus busy-polling, which helps the healthy app.)
#[test]
fn a_flood_of_violations_does_not_slow_a_healthy_app() {
    let _serial = serial();
    let d = Daemon::start("flood", Some("[channel]\nmax_strikes = 1000000000000000\n"));
    let mut mon = d.monitor();
    let mut healthy = App::spawn(&["healthy", &d.socket, PHASE_SECS]);
    assert_eq!(healthy.line(), "ready");
    pin(d.proc.pid(), 0);
    pin(healthy.proc.pid(), 1);
    let order = [Beside::Solo, Beside::Burner, Beside::Flood, Beside::Peer];
    // Per condition (in `order`), per repetition: the median of the phase's samples.
    let mut medians: [Vec<u64>; 4] = Default::default();
    let mut all: [Vec<u64>; 4] = Default::default();
    let (mut violations, mut secs) = (0u64, 0f64);
    for rep in 0..REPS {
        let mut conds: Vec<usize> = (0..order.len()).collect();
        if rep % 2 == 1 {
            conds.reverse();
        }
        for i in conds {
            let (samples, v, t) = phase(&d, &mut mon, &mut healthy, order[i]);
            medians[i].push(median(&samples));
            all[i].extend(samples);
            violations += v;
            secs += t;
        }
    }
    let ratio = |a: usize, b: usize| -> f64 {
        let mut r: Vec<f64> = (0..REPS)
            .map(|k| medians[a][k] as f64 / medians[b][k].max(1) as f64)
            .collect();
        r.sort_by(f64::total_cmp);
        r[REPS / 2]
    };
    let (solo, burner, flood, peer) = (0, 1, 2, 3);
    let m: Vec<u64> = all.iter().map(|v| median(v)).collect();
    println!(
        "healthy app, reflected 64-byte packets/s (medians): solo {}, beside a CPU burner {}, \
         beside the flood {} ({:.0} violations/s), beside a second healthy app {}; median \
         ratios over {REPS} repetitions: flood/solo {:.3}, flood/burner {:.3}, flood/peer {:.3}",
        m[solo],
        m[burner],
        m[flood],
        violations as f64 / secs,
        m[peer],
        ratio(flood, solo),
        ratio(flood, burner),
        ratio(flood, peer),
    );
    assert!(m.iter().all(|&r| r > 0), "the healthy app streams: {m:?}");
    for (other, what) in [(burner, "a CPU burner"), (peer, "a second healthy app")] {
        assert!(
            ratio(flood, other) >= 0.9,
            "beside the flood the healthy app got {:.3} of what it got beside {what} \
             (median per repetition; flood {:?}, {what} {:?})",
            ratio(flood, other),
            medians[flood],
            medians[other]
        );
    }
    let s = status(&mut mon);
    assert_eq!(s.channels.len(), 1);
    assert_eq!(s.channels[0].drops, vec![], "the healthy app lost nothing");
    assert_eq!(s.channels[0].audit, "ok");
}

// ---------------------------------------------------------------------------------------------
// Control-socket abuse

/// A raw SOCK_SEQPACKET client of the control socket.
struct Raw {
    sock: OwnedFd,
}

impl Raw {
    fn connect(path: &str) -> Self {
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = SocketAddrUnix::new(path).expect("socket path");
        rustix::net::connect(&sock, &addr).expect("connect");
        rustix::net::sockopt::set_socket_timeout(
            &sock,
            rustix::net::sockopt::Timeout::Recv,
            Some(SHORT),
        )
        .expect("SO_RCVTIMEO");
        Self { sock }
    }

    /// Sends one message with up to 16 fds attached.
    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(cmsg.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let n = rustix::net::sendmsg(
            &self.sock,
            &[IoSlice::new(bytes)],
            &mut cmsg,
            SendFlags::NOSIGNAL,
        )
        .expect("sendmsg");
        assert_eq!(n, bytes.len());
    }

    /// The next reply (with its fds), or `None` if the nexus hung up.
    fn reply(&self) -> Option<(Reply, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_REPLY];
        match recv_with_fds(self.sock.as_fd(), &mut buf, false) {
            Ok(r) => Some((
                control::decode(&buf[..r.len], MAX_REPLY).expect("a reply of the protocol"),
                r.fds,
            )),
            Err(Error::PeerGone) => None,
            Err(e) => panic!("receiving a reply: {e}"),
        }
    }

    fn ask(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Reply {
        self.send(bytes, fds);
        self.reply()
            .expect("the nexus answers instead of hanging up")
            .0
    }
}

fn header(version: u16) -> Vec<u8> {
    let mut v = b"NCTL".to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v
}

fn with_body(version: u16, body: &[u8]) -> Vec<u8> {
    let mut v = header(version);
    v.extend_from_slice(body);
    v
}

/// Every malformed or unexpected message is answered with an error and counted under its
/// reason; fds sent unasked are closed at once (the nexus's fd count returns to its baseline
/// while the abuser is still connected), and the nexus keeps serving.
#[test]
fn control_socket_abuse_is_refused_counted_and_leaks_no_fd() {
    let _serial = serial();
    let d = Daemon::start("control-abuse", None);
    let mut mon = d.monitor();
    let s0 = status(&mut mon);
    let raw = Raw::connect(&d.socket);
    let (base, _) = status_until(&mut mon, "the abuser is connected", |s| s.clients == 2);
    let devnull: Vec<OwnedFd> = (0..16)
        .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null")))
        .collect();
    let fds =
        |n: usize| -> Vec<BorrowedFd<'_>> { devnull[..n].iter().map(|f| f.as_fd()).collect() };
    let status_req = control::encode(&Request::Status { after: None });
    let mut oversized = status_req.clone();
    oversized.resize(5000, b' ');
    let huge = vec![b'N'; 100_000];
    let ready = |channel: u64| control::encode(&Request::ChannelReady { channel });
    let cases: Vec<(&str, Vec<u8>, usize, &str, ErrorCode)> = vec![
        (
            "5000 bytes",
            oversized,
            0,
            "oversized",
            ErrorCode::BadMessage,
        ),
        ("100000 bytes", huge, 0, "oversized", ErrorCode::BadMessage),
        (
            "12 fds",
            status_req.clone(),
            12,
            "too_many_fds",
            ErrorCode::BadMessage,
        ),
        (
            "4 bytes",
            b"NCTL".to_vec(),
            0,
            "truncated",
            ErrorCode::BadMessage,
        ),
        (
            "7 bytes",
            header(1)[..7].to_vec(),
            0,
            "truncated",
            ErrorCode::BadMessage,
        ),
        (
            "1 byte",
            b"N".to_vec(),
            0,
            "truncated",
            ErrorCode::BadMessage,
        ),
        (
            "bad magic",
            [b"XXXX".as_slice(), &status_req[4..]].concat(),
            0,
            "bad_magic",
            ErrorCode::BadMessage,
        ),
        (
            "lower-case magic",
            [b"nctl".as_slice(), &status_req[4..]].concat(),
            0,
            "bad_magic",
            ErrorCode::BadMessage,
        ),
        (
            "version 2",
            with_body(2, b"{\"op\":\"status\"}"),
            0,
            "bad_version",
            ErrorCode::Version,
        ),
        (
            "version 0",
            with_body(0, b"{\"op\":\"status\"}"),
            0,
            "bad_version",
            ErrorCode::Version,
        ),
        (
            "version 65535",
            with_body(u16::MAX, b"{}"),
            0,
            "bad_version",
            ErrorCode::Version,
        ),
        ("no body", header(1), 0, "malformed", ErrorCode::BadMessage),
        (
            "broken JSON",
            with_body(1, b"{\"op\":"),
            0,
            "malformed",
            ErrorCode::BadMessage,
        ),
        (
            "unknown op",
            with_body(1, b"{\"op\":\"nope\"}"),
            0,
            "malformed",
            ErrorCode::BadMessage,
        ),
        (
            "not UTF-8",
            with_body(1, b"\xff\xfe\xfd"),
            0,
            "malformed",
            ErrorCode::BadMessage,
        ),
        (
            "wrong field type",
            with_body(1, b"{\"op\":\"defunct\",\"channel\":\"one\"}"),
            0,
            "malformed",
            ErrorCode::BadMessage,
        ),
        (
            "ready, no offer",
            ready(12345),
            0,
            "out_of_order",
            ErrorCode::OutOfOrder,
        ),
        (
            "ready, no offer, 2 fds",
            ready(12345),
            2,
            "out_of_order",
            ErrorCode::OutOfOrder,
        ),
        (
            "status + 2 fds",
            status_req.clone(),
            2,
            "unasked_fds",
            ErrorCode::BadMessage,
        ),
        (
            "status + 8 fds",
            status_req.clone(),
            8,
            "unasked_fds",
            ErrorCode::BadMessage,
        ),
        (
            "open + 1 fd",
            control::encode(&Request::OpenChannel {
                kind: Default::default(),
                ring_slots: None,
                buffers: None,
                buf_size: None,
                offloads: Default::default(),
            }),
            1,
            "unasked_fds",
            ErrorCode::BadMessage,
        ),
        (
            "defunct + 2 fds",
            control::encode(&Request::Defunct { channel: 1 }),
            2,
            "unasked_fds",
            ErrorCode::BadMessage,
        ),
    ];
    for (what, bytes, nfds, counter, code) in &cases {
        let before = count(&status(&mut mon).control_errors, counter);
        match raw.ask(bytes, &fds(*nfds)) {
            Reply::Error { code: c, message } => {
                assert_eq!(c, *code, "{what}: {message}");
                assert!(!message.is_empty(), "{what}: the error says why");
            }
            other => panic!("{what}: answered {other:?}"),
        }
        let s = status(&mut mon);
        assert_eq!(
            count(&s.control_errors, counter),
            before + 1,
            "{what} is counted as {counter}: {:?}",
            s.control_errors
        );
        // Refused fds are closed on the nexus's closer thread, moments later.
        status_until(
            &mut mon,
            &format!("{what}: the nexus keeps no fd of ours"),
            |s| s.fds == base.fds,
        );
    }
    // An unasked fd sent again and again does not accumulate.
    for _ in 0..100 {
        assert!(matches!(raw.ask(&status_req, &fds(2)), Reply::Error { .. }));
    }
    status_until(&mut mon, "no fd kept after 200 unasked fds", |s| {
        s.fds == base.fds
    });

    // A channel offer answered with the wrong fds: refused, and the offer's memory is freed.
    let open = control::encode(&Request::OpenChannel {
        kind: Default::default(),
        ring_slots: None,
        buffers: None,
        buf_size: None,
        offloads: Default::default(),
    });
    // One fd that is no memfd; the channel's own region handed back (below); two or three fds.
    for (nfds, counter) in [
        (1, "bad_app_region"),
        (2, "wrong_fd_count"),
        (3, "wrong_fd_count"),
    ] {
        let before = count(&status(&mut mon).control_errors, counter);
        raw.send(&open, &[]);
        let (reply, offer_fds) = raw.reply().expect("an offer");
        let Reply::ChannelOffer { channel } = reply else {
            panic!("expected an offer, got {reply:?}");
        };
        assert_eq!(offer_fds.len(), 3, "region, pool and doorbell");
        drop(offer_fds);
        let reply = raw.ask(&ready(channel), &fds(nfds));
        assert!(
            matches!(
                reply,
                Reply::Error {
                    code: ErrorCode::BadMessage,
                    ..
                }
            ),
            "ready with {nfds} wrong fds: {reply:?}"
        );
        let s = status(&mut mon);
        assert_eq!(
            count(&s.control_errors, counter),
            before + 1,
            "{nfds} fds: {counter}"
        );
        status_until(&mut mon, "the refused offer left no fd behind", |s| {
            s.fds == base.fds
        });
        assert!(s.channels.is_empty());
    }
    // The nexus's own objects handed back as the app's region (region, pool, or the doorbell
    // end it sent) are refused at once, not found out on the channel's first pass.
    for own in 0..3 {
        let before = count(&status(&mut mon).control_errors, "bad_app_region");
        raw.send(&open, &[]);
        let (reply, offer_fds) = raw.reply().expect("an offer");
        let Reply::ChannelOffer { channel } = reply else {
            panic!("expected an offer, got {reply:?}");
        };
        let reply = raw.ask(&ready(channel), &[offer_fds[own].as_fd()]);
        let Reply::Error { code, message } = reply else {
            panic!("the nexus's own object {own} accepted as the app region: {reply:?}");
        };
        assert_eq!(code, ErrorCode::BadMessage, "{message}");
        assert_eq!(
            count(&status(&mut mon).control_errors, "bad_app_region"),
            before + 1,
            "{message}"
        );
        drop(offer_fds);
        status_until(&mut mon, "the refused offer left no fd behind", |s| {
            s.fds == base.fds
        });
    }

    // Offers left unanswered are bounded, and freed when the client goes.
    let before = count(&status(&mut mon).control_errors, "out_of_order");
    let mut offers = 0;
    loop {
        raw.send(&open, &[]);
        match raw.reply().expect("a reply") {
            (Reply::ChannelOffer { .. }, f) => {
                assert_eq!(f.len(), 3);
                offers += 1;
                assert!(offers <= 64, "offers are never refused");
            }
            (Reply::Error { code, .. }, _) => {
                assert_eq!(code, ErrorCode::OutOfOrder);
                break;
            }
            (other, _) => panic!("{other:?}"),
        }
    }
    println!("unanswered offers allowed per client: {offers}");
    assert_eq!(
        count(&status(&mut mon).control_errors, "out_of_order"),
        before + 1
    );

    // A zero-length message: the nexus may take it for a hang-up, but must survive it.
    raw.send(b"", &[]);
    drop(raw);
    let (s, _) = status_until(&mut mon, "the abuser is gone", |s| s.clients == 1);
    assert_eq!(
        s.fds, s0.fds,
        "every fd of the abuser and of its offers is closed"
    );
    assert!(s.channels.is_empty());
    assert_serves(&d.socket);
    println!(
        "control errors counted: {:?}",
        status(&mut mon).control_errors
    );
}

/// The unprivileged user `nobody`.
const NOBODY: u32 = 65534;

/// Per-user limits and permissions, for an unprivileged app (uid `nobody`): beyond
/// `limits.channels_per_user` its opens are refused (`limit_channels`); it may not open a
/// low-latency channel, nor revoke root's channel (`not_permitted`); its status shows only its
/// own channels. A policy that does not list it refuses it any channel.
#[test]
fn unprivileged_apps_meet_their_limits_and_permissions() {
    let _serial = serial();
    let d = Daemon::start("limits", Some("[limits]\nchannels_per_user = 2\n"));
    let mut nx = d.monitor();
    let mut mine = nx.open_channel(ChannelOptions::default()).expect("open");
    let mut app = App::spawn_as(
        Some(NOBODY),
        &["user", &d.socket, "3", &mine.id().to_string()],
    );
    let opened: Vec<u64> = (0..2)
        .map(|_| {
            let l = app.line();
            l.strip_prefix("open ok ")
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("expected `open ok ID`, got {l:?}"))
        })
        .collect();
    assert_eq!(app.line(), "open refused Limit", "the third channel");
    assert_eq!(app.line(), "open refused NotPermitted", "low latency");
    assert_eq!(app.line(), "defunct refused NotPermitted", "root's channel");
    assert_eq!(
        app.line(),
        format!("status {NOBODY} {NOBODY}"),
        "a user sees only its own channels"
    );
    let s = status(&mut nx);
    assert_eq!(count(&s.control_errors, "limit_channels"), 1);
    assert_eq!(count(&s.control_errors, "not_permitted"), 2);
    for id in &opened {
        assert_eq!(channel(&s, *id).expect("listed for root").uid, NOBODY);
    }
    assert_eq!(channel(&s, mine.id()).expect("root's").state, "active");
    round_trip(&mut mine, 16);
    // Root may revoke anyone's channel.
    nx.defunct(opened[0])
        .expect("root revokes a user's channel");
    app.close_stdin();
    app.exits_cleanly();
    let (s, _) = status_until(&mut nx, "the user's channels are reclaimed", |s| {
        s.channels.len() == 1
    });
    assert_eq!(count(&s.control_errors, "reclaim_audit_failed"), 0);
    drop(app);

    let d = Daemon::start("policy", Some("[policy]\nusers = [12345]\n"));
    let mut nx = d.monitor();
    let mut app = App::spawn_as(Some(NOBODY), &["user", &d.socket, "1"]);
    assert_eq!(
        app.line(),
        "open refused NotPermitted",
        "not in policy.users"
    );
    assert_eq!(app.line(), "open refused NotPermitted", "low latency");
    assert_eq!(app.line(), "status ");
    assert_eq!(count(&status(&mut nx).control_errors, "not_permitted"), 2);
    app.close_stdin();
    app.exits_cleanly();
    assert_serves(&d.socket);
}

#[test]
fn unprivileged_users_meet_their_flow_and_connection_limits() {
    let _serial = serial();
    let d = Daemon::start(
        "user-limits",
        Some("[limits]\nflows_per_user = 3\nconnections_per_user = 2\n"),
    );
    let mut nx = d.monitor();
    // Control connections (each asks for the status): two, then a refusal.
    let mut conns = App::spawn_as(Some(NOBODY), &["user-connections", &d.socket, "3"]);
    assert_eq!(conns.line(), "connect ok");
    assert_eq!(conns.line(), "connect ok");
    assert_eq!(conns.line(), "connect refused Limit");
    assert_eq!(
        count(&status(&mut nx).control_errors, "limit_connections"),
        1
    );
    // Root is not limited.
    let mut root = Nexus::connect(&d.socket).expect("root connects");
    assert!(root.status().is_ok());
    conns.close_stdin();
    conns.exits_cleanly();
    // Flows: three, then a refusal; the limit ends with the app that held them.
    for round in 0..2 {
        let mut flows = App::spawn_as(Some(NOBODY), &["user-flows", &d.socket, "4"]);
        for i in 0..3 {
            assert_eq!(flows.line(), "flow ok", "round {round}, flow {i}");
        }
        assert_eq!(flows.line(), "flow refused Limit", "round {round}");
        assert_eq!(
            count(&status(&mut nx).control_errors, "limit_flows"),
            round + 1
        );
        flows.close_stdin();
        flows.exits_cleanly();
        let (s, _) = status_until(&mut nx, "the user's channel is reclaimed", |s| {
            s.channels.is_empty()
        });
        assert_eq!(count(&s.control_errors, "reclaim_audit_failed"), 0);
    }
    assert_serves(&d.socket);
}

/// Bug reproducer: a request of 4097 bytes (one more than `MAX_REQUEST`) is counted as
/// `truncated`. The nexus reads into a buffer of `MAX_REQUEST + 1` bytes, so a 4097-byte message
/// is not cut (no MSG_TRUNC) and reaches `control::decode`, whose `DecodeError::Size` is mapped
/// to "truncated" for too-long messages as well as too-short ones
/// (`crates/nexus/src/control/mod.rs`, `on_message`).
#[test]
fn regression_a_request_one_byte_too_long_is_counted_as_oversized() {
    let _serial = serial();
    let d = Daemon::start("oversized-by-one", None);
    let mut mon = d.monitor();
    let raw = Raw::connect(&d.socket);
    let mut msg = control::encode(&Request::Status { after: None });
    msg.resize(MAX_REQUEST + 1, b' ');
    assert!(matches!(
        raw.ask(&msg, &[]),
        Reply::Error {
            code: ErrorCode::BadMessage,
            ..
        }
    ));
    let s = status(&mut mon);
    assert_eq!(
        count(&s.control_errors, "truncated"),
        0,
        "{:?}",
        s.control_errors
    );
    assert_eq!(
        count(&s.control_errors, "oversized"),
        1,
        "{:?}",
        s.control_errors
    );
}

/// Bug reproducer: the header's two reserved bytes (`NCTL`, version, **two zero bytes**, per
/// `crates/shm/src/control.rs`) are never checked by `control::decode`: a request with garbage
/// there is carried out. Reserved bits must be refused, or they can never be given a meaning.
#[test]
fn regression_reserved_header_bytes_must_be_zero() {
    let _serial = serial();
    let d = Daemon::start("reserved-bytes", None);
    let mut mon = d.monitor();
    let raw = Raw::connect(&d.socket);
    let mut msg = control::encode(&Request::Status { after: None });
    msg[6] = 0xff;
    msg[7] = 0x01;
    let reply = raw.ask(&msg, &[]);
    assert!(
        matches!(
            reply,
            Reply::Error {
                code: ErrorCode::BadMessage,
                ..
            }
        ),
        "answered {reply:?}"
    );
    let s = status(&mut mon);
    assert_eq!(
        count(&s.control_errors, "malformed"),
        1,
        "{:?}",
        s.control_errors
    );
}

// ---------------------------------------------------------------------------------------------
// Apps killed at random points

/// Apps streaming with buffers held at random moments are SIGKILLed after a random delay
/// (seeded; every tenth one while it is still connecting or opening its channel): each time,
/// within 100 ms, its channel and its connection are gone, the reclaim passed its ledger audit;
/// at the end the nexus has exactly its baseline fds and about its baseline memory.
#[test]
fn apps_killed_at_random_points_are_reclaimed_within_100ms() {
    const SEED: u64 = 0x6b69_6c6c_2d39;
    const WARMUP: usize = 10;
    const ITERATIONS: usize = 200;
    /// Slack on the nexus's RSS: a few allocator pages (the heap's free lists and thread
    /// caches may end larger than after the warm-up) but far less than a leak of 200 channels
    /// or even of 5 KiB per iteration (1 MiB).
    const RSS_SLACK: u64 = 512 * 1024;
    let _serial = serial();
    let d = Daemon::start("kill9", None);
    let mut mon = d.monitor();
    let mut rng = XorShift::new(SEED);
    let mut latencies = Vec::with_capacity(ITERATIONS);
    let mut base: Option<NexusStatus> = None;
    let started = Instant::now();
    for i in 0..WARMUP + ITERATIONS {
        if i == WARMUP {
            let (s, _) = status_until(&mut mon, "idle", |s| s.clients == 1);
            base = Some(s);
        }
        let early = i % 10 == 9;
        let s0 = status(&mut mon);
        let reclaims = count(&s0.control_errors, "reclaims");
        let mut app = App::spawn(&["stream", &d.socket]);
        let id: Option<u64> = (!early).then(|| {
            let line = app.line();
            line.strip_prefix("ready ")
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("expected `ready ID`, got {line:?}"))
        });
        let delay = Duration::from_micros(if early {
            rng.below(3_000)
        } else {
            rng.below(20_000)
        });
        std::thread::sleep(delay);
        if !early {
            app.proc.assert_running();
        }
        let pid = app.proc.pid().as_raw_nonzero().get();
        let killed = Instant::now();
        app.proc.signal(Signal::KILL);
        let (s, _) = status_until(&mut mon, "the killed app's channel is reclaimed", |s| {
            s.clients == 1 && !s.channels.iter().any(|c| c.pid == pid)
        });
        let latency = killed.elapsed();
        let st = app.proc.exit_within(SHORT);
        assert_eq!(
            st.signal(),
            Some(9),
            "iteration {i}: the stream app died of our SIGKILL, not on its own: {st}"
        );
        if let Some(id) = id {
            assert!(channel(&s, id).is_none());
        }
        let n = count(&s.control_errors, "reclaims") - reclaims;
        if early {
            assert!(n <= 1, "iteration {i}: {n} reclaims for one app");
        } else {
            assert_eq!(n, 1, "iteration {i}: the channel was reclaimed once");
        }
        assert_eq!(
            count(&s.control_errors, "reclaim_audit_failed"),
            0,
            "iteration {i} (delay {delay:?}): {:?}",
            s.control_errors
        );
        assert!(s.channels.is_empty(), "iteration {i}: {:?}", s.channels);
        if i >= WARMUP && !early {
            latencies.push(latency);
        }
        assert!(
            latency < PROMPT,
            "iteration {i} (delay {delay:?}): reclaimed after {latency:?}"
        );
    }
    let elapsed = started.elapsed();
    let base = base.expect("baseline taken");
    let (end, _) = status_until(&mut mon, "idle", |s| s.clients == 1);
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "{ITERATIONS} kills (+{WARMUP} warm-up) in {elapsed:?}; reclaim latency after SIGKILL: \
         median {:?}, p99 {:?}, max {:?}; nexus fds {} -> {}, rss {} KiB -> {} KiB; reclaims {}",
        at(0.5),
        at(0.99),
        at(1.0),
        base.fds,
        end.fds,
        base.rss_bytes / 1024,
        end.rss_bytes / 1024,
        count(&end.control_errors, "reclaims")
    );
    assert_eq!(
        end.fds, base.fds,
        "the nexus's fds are back to their baseline"
    );
    assert!(
        end.rss_bytes <= base.rss_bytes + RSS_SLACK,
        "the nexus's RSS grew from {} to {} bytes",
        base.rss_bytes,
        end.rss_bytes
    );
    assert_serves(&d.socket);
}

// ---------------------------------------------------------------------------------------------
// Revocation, shutdown and restart under blocked apps

/// `netchannel defunct` by another client wakes an app asleep in `wait(Buffers)` (it holds
/// the whole pool), within 100 ms; every buffer comes home and the ledger is whole.
#[test]
fn defunct_wakes_an_app_blocked_waiting_for_buffers() {
    let _serial = serial();
    let d = Daemon::start("defunct-buffers", None);
    let mut nx = d.monitor();
    let mut ch = nx
        .open_channel(ChannelOptions {
            buffers: Some(64),
            ..ChannelOptions::default()
        })
        .expect("open");
    let id = ch.id();
    let mut held = Vec::new();
    let deadline = Instant::now() + SHORT;
    while held.len() < 64 {
        assert!(
            Instant::now() < deadline,
            "only {} buffers came",
            held.len()
        );
        match ch.alloc() {
            Some(b) => held.push(b),
            None => ch.wait(Interest::Buffers, Some(SHORT)).expect("wait"),
        }
    }
    assert_eq!(ch.alloc(), None, "the pool has 64 buffers");
    let s = status(&mut nx);
    let c = channel(&s, id).expect("listed");
    assert_eq!((c.buffers_app, c.buffers_free), (64, 0), "{c:?}");

    let (pid, tid, sock) = (std::process::id() as i32, my_tid(), d.socket.clone());
    let revoker = std::thread::spawn(move || {
        wait_asleep_in_poll(pid, tid);
        let mut admin = Nexus::connect(&sock).expect("connect");
        let asked = Instant::now();
        admin.defunct(id).expect("defunct");
        asked
    });
    let err = ch
        .wait(Interest::Buffers, Some(SHORT))
        .expect_err("the wait ends with the channel");
    let woke = Instant::now();
    let asked = revoker.join().expect("revoker");
    // From the moment the request was sent: an upper bound of the wake-up latency.
    let latency = woke.saturating_duration_since(asked);
    println!("defunct noticed by a wait(Buffers) {latency:?} after it was requested");
    assert!(
        matches!(
            err,
            Error::Defunct {
                reason: DefunctReason::Administrative
            }
        ),
        "{err}"
    );
    assert!(latency < PROMPT, "woke {latency:?} after the revocation");
    assert!(matches!(ch.refill(), Err(Error::Defunct { .. })));
    let s = status(&mut nx);
    let c = channel(&s, id).expect("a defunct channel stays listed until closed");
    assert_eq!(c.state, "defunct: revoked by an administrator");
    assert_eq!((c.buffers_app, c.buffers_nexus), (0, 0), "all home: {c:?}");
    assert_eq!(c.audit, "ok");
    let before = count(&s.control_errors, "reclaims");
    nx.close_channel(ch).expect("closing a defunct channel");
    let s = status(&mut nx);
    assert!(s.channels.is_empty());
    assert_eq!(count(&s.control_errors, "reclaims"), before + 1);
    assert_eq!(count(&s.control_errors, "reclaim_audit_failed"), 0);
}

/// Bug reproducer: on a defunct channel whose ALLOC ring still holds descriptors (the nexus
/// topped it up before the revocation) and whose free list is empty, `alloc()` returns `None`
/// (its `refill` fails `check()` and the error is dropped: `let _ = self.refill()` in
/// `Endpoint::alloc`, `crates/shm/src/endpoint.rs`) while `wait(Interest::Buffers)` returns
/// `Ok(())` at once (`ready(Buffers)` sees the ALLOC ring non-empty and `wait` tests readiness
/// before `check()`). The usual loop "alloc, or wait for buffers" spins forever on a revoked
/// channel instead of seeing `Defunct` (found by `hostile_rx_index_out_of_bounds_quarantines`,
/// whose app spun at 100% CPU after its quarantine).
#[test]
fn regression_wait_for_buffers_fails_on_a_defunct_channel() {
    let _serial = serial();
    let d = Daemon::start("defunct-alloc-ring", None);
    let mut nx = d.monitor();
    let mut ch = nx.open_channel(ChannelOptions::default()).expect("open");
    // Take everything in the free list (the first alloc refills it from the ALLOC ring)...
    let mut held = vec![ch.alloc().expect("the nexus stocks the ALLOC ring")];
    while ch.buffer_counts().free > 0 {
        held.push(ch.alloc().expect("the free list has buffers"));
    }
    // ...and let the nexus stock the ALLOC ring again (this takes nothing from it).
    ch.wait(Interest::Buffers, Some(SHORT)).expect("restocked");
    assert_eq!(ch.buffer_counts().free, 0);
    nx.defunct(ch.id()).expect("defunct");
    assert_eq!(ch.alloc(), None, "nothing to allocate on a defunct channel");
    let r = ch.wait(Interest::Buffers, Some(SHORT));
    assert!(
        matches!(r, Err(Error::Defunct { .. })),
        "wait(Buffers) on a defunct channel whose alloc() returns None: {r:?}"
    );
}

/// SIGTERM with an app asleep in a wait: the wait ends with `Defunct { ServerShutdown }` (or
/// `PeerGone`, see `regression_a_descheduled_app_still_learns_the_shutdown_reason`) within
/// 100 ms of the nexus's exit, the schema says why in either case, the nexus exits 0 and
/// removes its socket.
#[test]
fn sigterm_revokes_channels_wakes_blocked_apps_and_removes_the_socket() {
    let _serial = serial();
    let mut d = Daemon::start("sigterm", None);
    let mut nx = d.monitor();
    let mut ch = nx.open_channel(ChannelOptions::default()).expect("open");
    round_trip(&mut ch, 16);
    let (pid, tid) = (std::process::id() as i32, my_tid());
    let nexus_pidfd = d.proc.pidfd.try_clone().expect("dup pidfd");
    let killer = std::thread::spawn(move || {
        wait_asleep_in_poll(pid, tid);
        let sent = Instant::now();
        rustix::process::pidfd_send_signal(&nexus_pidfd, Signal::TERM).expect("SIGTERM");
        assert!(
            readable_within(nexus_pidfd.as_fd(), SHORT),
            "the nexus exits"
        );
        (sent, Instant::now())
    });
    let err = ch
        .wait(Interest::Readable, Some(SHORT))
        .expect_err("the wait ends with the nexus");
    let woke = Instant::now();
    let (sent, exited) = killer.join().expect("killer");
    let latency = woke.saturating_duration_since(exited);
    println!(
        "SIGTERM: the wait returned {err:?} {:?} after the signal; the nexus exited {:?} after \
         the signal",
        woke - sent,
        exited - sent
    );
    assert!(
        matches!(
            err,
            Error::Defunct {
                reason: DefunctReason::ServerShutdown
            } | Error::PeerGone
        ),
        "{err}"
    );
    assert!(latency < PROMPT, "woke {latency:?} after the exit");
    assert!(
        matches!(
            ch.check(),
            Err(Error::Defunct {
                reason: DefunctReason::ServerShutdown
            })
        ),
        "the schema says the server shut down"
    );
    let st = d.proc.exit_within(SHORT);
    assert_eq!(st.code(), Some(0), "the nexus exits 0 on SIGTERM: {st}");
    assert!(
        !std::path::Path::new(&d.socket).exists(),
        "the socket file is removed"
    );
    assert!(nx.status().is_err(), "nobody answers any more");
}

/// Bug reproducer: an app that is not running when the nexus shuts down (descheduled; here
/// stopped with SIGSTOP while asleep in its wait) wakes to find both its doorbell rung and the
/// control socket hung up; `Endpoint::sleep` (`crates/shm/src/endpoint.rs`) returns `PeerGone`
/// as soon as the watched socket hung up, and `wait` returns that without looking at the
/// schema, which says DEFUNCT "server shutting down". The reason the nexus took care to publish
/// before exiting is lost to the app (a graceful shutdown looks like a crash).
#[test]
fn regression_a_descheduled_app_still_learns_the_shutdown_reason() {
    let _serial = serial();
    let mut d = Daemon::start("sigterm-stopped", None);
    let mut app = App::spawn(&["wait", &d.socket]);
    assert!(app.line().starts_with("waiting "));
    let pid = app.proc.pid().as_raw_nonzero().get();
    wait_asleep_in_poll(pid, pid);
    app.proc.signal(Signal::STOP);
    d.proc.signal(Signal::TERM);
    assert!(d.proc.exit_within(SHORT).success());
    app.proc.signal(Signal::CONT);
    assert_eq!(app.line(), "outcome Defunct { reason: ServerShutdown }");
    app.exits_cleanly();
}

/// kill -9 of the nexus under an app asleep in a wait: the wait returns `PeerGone` within 100 ms
/// and later calls fail at once; a new nexus starts on the same path (the stale socket file is
/// replaced), and the app connects again and opens a channel that works.
#[test]
fn a_killed_nexus_is_noticed_at_once_and_a_new_one_takes_its_socket() {
    let _serial = serial();
    let mut first = Daemon::start("restart", None);
    let socket = first.socket.clone();
    let mut nx = first.monitor();
    let mut ch = nx.open_channel(ChannelOptions::default()).expect("open");
    round_trip(&mut ch, 16);
    let (pid, tid) = (std::process::id() as i32, my_tid());
    let nexus_pidfd = first.proc.pidfd.try_clone().expect("dup pidfd");
    let killer = std::thread::spawn(move || {
        wait_asleep_in_poll(pid, tid);
        let sent = Instant::now();
        rustix::process::pidfd_send_signal(&nexus_pidfd, Signal::KILL).expect("SIGKILL");
        assert!(
            readable_within(nexus_pidfd.as_fd(), SHORT),
            "the nexus dies"
        );
        (sent, Instant::now())
    });
    let err = ch
        .wait(Interest::Readable, Some(SHORT))
        .expect_err("the wait ends with the nexus");
    let woke = Instant::now();
    let (sent, died) = killer.join().expect("killer");
    let latency = woke.saturating_duration_since(died);
    println!(
        "kill -9 of the nexus: the wait returned {err:?} {:?} after the signal (the death was \
         seen {:?} after the signal)",
        woke - sent,
        died - sent
    );
    assert!(matches!(err, Error::PeerGone), "{err}");
    assert!(latency < PROMPT, "woke {latency:?} after the death");
    let t = Instant::now();
    assert!(matches!(
        ch.wait(Interest::Readable, Some(SHORT)),
        Err(Error::PeerGone)
    ));
    assert!(ch.peer_gone());
    assert!(t.elapsed() < PROMPT, "later waits fail at once");
    assert!(nx.status().is_err(), "the old connection is dead");
    drop(ch);
    drop(nx);
    assert_eq!(first.proc.exit_within(SHORT).signal(), Some(9));
    first.remove_socket = false;
    drop(first);
    assert!(
        std::path::Path::new(&socket).exists(),
        "kill -9 leaves a stale socket file behind"
    );

    let second = Daemon::start_at(&socket, None);
    let mut nx = second.monitor();
    let mut ch = nx
        .open_channel(ChannelOptions::default())
        .expect("the app opens a channel on the new nexus");
    round_trip(&mut ch, 64);
    let s = status(&mut nx);
    assert_eq!(s.pid, second.proc.pid().as_raw_nonzero().get() as u32);
    assert_eq!(s.channels.len(), 1);
    assert_eq!(s.channels[0].audit, "ok");
    assert_eq!(s.channels[0].tx_packets, 64);
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Bytes of memory allocated to the memfds (channel regions and pools) that process `pid`
/// holds open, by memfd name.
fn memfd_bytes(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd") {
        let path = e.expect("fd entry").path();
        let Ok(link) = std::fs::read_link(&path) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Some(name) = link.strip_prefix("/memfd:") else {
            continue;
        };
        let name = name.trim_end_matches(" (deleted)").to_owned();
        if let Ok(f) = std::fs::File::open(&path) {
            let st = rustix::fs::fstat(&f).expect("fstat");
            *by_name.entry(name).or_default() += st.st_blocks as u64 * 512;
        }
    }
    by_name
}

/// `RssAnon` and `RssShmem` of process `pid`, in bytes.
fn rss_parts(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("RssAnon:"), field("RssShmem:"))
}

/// What the nexus holds, at one moment.
struct Memory {
    rss: u64,
    anon: u64,
    shmem: u64,
    memfds: BTreeMap<String, u64>,
}

impl Memory {
    fn of(nx: &mut Nexus) -> Self {
        let s = status(nx);
        let (anon, shmem) = rss_parts(s.pid);
        Self {
            rss: s.rss_bytes,
            anon,
            shmem,
            memfds: memfd_bytes(s.pid),
        }
    }

    /// Growth since `base` per channel, in KiB: (RSS, anon, shmem, memfds by name, memfds).
    fn per_channel(&self, base: &Self, n: u64) -> (u64, String) {
        let per = |a: u64, b: u64| a.saturating_sub(b) / n / 1024;
        let names: Vec<String> = self
            .memfds
            .iter()
            .map(|(k, &v)| {
                let b = base.memfds.get(k).copied().unwrap_or(0);
                format!("{k} {} KiB", per(v, b))
            })
            .collect();
        let total = per(self.memfds.values().sum(), base.memfds.values().sum());
        let rss = self.rss.saturating_sub(base.rss) / n;
        (
            rss,
            format!(
                "nexus RSS +{} KiB (anon +{}, shmem +{}); channel memfds {total} KiB ({})",
                rss / 1024,
                per(self.anon, base.anon),
                per(self.shmem, base.shmem),
                names.join(", ")
            ),
        )
    }
}

/// Empties the channel's ALLOC ring 40 times over (giving every buffer back each time), so
/// that the nexus grows its stock as far as it will, then lets it settle.
fn starve_alloc_ring(ch: &mut Channel) {
    let mut held = Vec::new();
    for _ in 0..40 {
        while let Some(b) = ch.alloc() {
            held.push(b);
        }
        ch.free(held.drain(..)).expect("free what it took");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(50));
}

/// Large pool buffers: granted up to `channel.max_buf_size`, in segments of the same bytes as
/// 2 KiB ones, and refused (with the limit named) beyond it or when not a power of two;
/// offloads are not granted by a nexus without an interface, whatever the app asks.
#[test]
fn large_buffers_keep_segment_bytes_and_offloads_need_an_interface() {
    let _serial = serial();
    let d = Daemon::start("large-buffers", None);
    let mut nx = d.monitor();
    let mut ch = nx
        .open_channel(ChannelOptions {
            buf_size: Some(16384),
            offloads: netchannel::nexus::Offloads::ALL,
            ..ChannelOptions::default()
        })
        .expect("a channel of 16 KiB buffers");
    // The ALLOC stock keeps the bytes of the configured 32 to 512 buffers of 2 KiB: 4 to 64.
    let (s, _) = status_until(&mut nx, "the first ALLOC stock", |s| {
        channel(s, ch.id()).is_some_and(|c| c.buffers_app > 0)
    });
    assert_eq!(channel(&s, ch.id()).expect("listed").buffers_app, 4);
    // An app that keeps emptying the ring makes the stock double, up to its bound.
    starve_alloc_ring(&mut ch);
    let stock = channel(&status(&mut nx), ch.id())
        .expect("listed")
        .buffers_app;
    assert!(
        (8..=64).contains(&stock),
        "the stock grew from 4 and stayed within 64 buffers of 16 KiB: {stock}"
    );
    let g = ch.pool().geometry();
    assert_eq!(g.buf_size, 16384);
    assert_eq!(
        g.segment_bytes(),
        64 * 2048,
        "a segment keeps the bytes of 64 buffers of 2 KiB"
    );
    assert_eq!(
        ch.offloads(),
        Default::default(),
        "no interface, no offloads"
    );
    nx.close_channel(ch).expect("close");
    for bad in [3000, 1024, 131072] {
        let e = nx
            .open_channel(ChannelOptions {
                buf_size: Some(bad),
                ..ChannelOptions::default()
            })
            .expect_err("refused");
        assert!(e.to_string().contains("buf_size"), "{bad}: {e}");
    }
}

/// A small pool (64 buffers) whose app keeps emptying its ALLOC ring: the stock grows to a
/// quarter of the pool at most, so the nexus always has buffers to deliver into, and every
/// reflection comes back. (Uncapped, the stock grew to the whole pool and the nexus dropped
/// what it had to deliver as `rx_no_buf`: a stack's bulk transfer stalled for good that way.)
#[test]
fn the_alloc_stock_of_a_small_pool_leaves_buffers_to_deliver_into() {
    let _serial = serial();
    let d = Daemon::start("small-pool", None);
    let mut nx = d.monitor();
    let mut ch = nx
        .open_channel(ChannelOptions {
            buffers: Some(64),
            ..ChannelOptions::default()
        })
        .expect("a channel of 64 buffers");
    starve_alloc_ring(&mut ch);
    let c = channel(&status(&mut nx), ch.id()).expect("listed").clone();
    assert!(
        c.buffers_app <= 16,
        "the stock stays within a quarter of the pool: {} of 64 with the app",
        c.buffers_app
    );
    // Batches of 8: the nexus takes a fresh buffer for each packet of a batch before it frees
    // the batch's own, so 8 sent, 8 reflected and the stock's 16 leave half the pool. (In
    // batches of 32, the 32 sent, 32 fresh ones and the stock could be more than the pool:
    // CI once saw a reflection missing.)
    round_trip_in(&mut ch, 1000, 8);
    let c = channel(&status(&mut nx), ch.id()).expect("listed").clone();
    assert_eq!(c.drops, vec![], "nothing dropped");
    nx.close_channel(ch).expect("close");
}

/// How long the idle-memory test lets its channels idle.
const IDLE: Duration = Duration::from_millis(2500);

/// Memory per idle channel: 20 channels are opened (measured), each carries 256 packets and
/// then idles for [`IDLE`] (measured again). The growth of the nexus's RSS per idle channel
/// must be at most the design target of 256 KiB (`DESIGN.md` §7). The channel memory whoever
/// touched it (the memfds' allocated pages) is printed beside it.
///
/// Measured: about 33 KiB per channel just opened, 450–580 KiB per channel idle after the
/// traffic, nearly all of it pool pages the nexus touched (copying). In one run, 736 of the 4096
/// buffers were with the app (its free list and the ALLOC stock) in 12 segments, which the idle
/// trim cannot give back since they are not idle.
#[test]
fn an_idle_channel_costs_at_most_256_kib() {
    const CHANNELS: u64 = 20;
    let _serial = serial();
    let d = Daemon::start("idle-memory", None);
    let mut nx = d.monitor();
    // Warm up the nexus's allocator with one channel's life.
    let mut ch = nx.open_channel(ChannelOptions::default()).expect("open");
    round_trip(&mut ch, 256);
    nx.close_channel(ch).expect("close");
    let m0 = Memory::of(&mut nx);
    let mut chans = Vec::new();
    for _ in 0..CHANNELS {
        chans.push(nx.open_channel(ChannelOptions::default()).expect("open"));
    }
    let (_, opened) = Memory::of(&mut nx).per_channel(&m0, CHANNELS);
    for ch in &mut chans {
        round_trip(ch, 256);
    }
    // Idle long enough for the nexus to trim idle channels (`channel.idle_trim_ms`, 1 s by
    // default, checked by its housekeeping, which runs at least once per 1 s idle sleep).
    std::thread::sleep(IDLE);
    let s = status(&mut nx);
    assert_eq!(s.channels.len() as u64, CHANNELS);
    let (rss, idle) = Memory::of(&mut nx).per_channel(&m0, CHANNELS);
    let c = &s.channels[0];
    println!("per channel, just opened: {opened}");
    println!(
        "per channel, idle after 256 packets: {idle}; buffers {} free, {} with the app, {} absent",
        c.buffers_free, c.buffers_app, c.buffers_absent
    );
    assert!(
        rss <= 256 * 1024,
        "the nexus's RSS grew by {} KiB per idle channel",
        rss / 1024
    );
    drop(chans);
}

// ---------------------------------------------------------------------------------------------
// Attacks on the nexus's loop (issue 13): an unprivileged app attacks through what it holds
// while an honest app's reflection rate is measured.

/// One measured phase of the healthy app: its median reflected packets per second.
fn healthy_rate(h: &mut App) -> u64 {
    h.say("go");
    let line = h.line();
    let rest = line
        .strip_prefix("rate ")
        .unwrap_or_else(|| panic!("expected a rate, got {line:?}"));
    rest.split_whitespace()
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("a rate: {line:?}"))
}

fn median_of(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Runs attack `case` (an unprivileged `nexus_app attack`) beside a healthy app and checks the
/// promise of issue 13 (in a release build, as the nexus runs: a debug build's JSON alone costs
/// the honest app 20% under the status flood, against nothing in release): the healthy app
/// keeps at least 90% of its rate without the attacker, status answers within [`PROMPT`] all
/// along, and the nexus stops cleanly on SIGTERM with an attacker attached. Returns the
/// attacker's line after `go`.
///
/// "Its rate without the attacker" is the lower of two baselines: the median of the phases
/// before the attack, and of the phases after the attacker is killed and its channels
/// reclaimed. One baseline is not enough on this VM: the healthy app and the nexus hand cache
/// lines to each other across the two vCPUs, and the host moves the vCPUs between placements
/// at random moments, which halves the rate for seconds or minutes (a two-thread C ping-pong
/// with no nexus in it swings 4.3 M ↔ 1.3 M round trips/s the same way). A flip in the middle
/// of the attack then fails the test against the earlier baseline while the later one shows
/// the same rate without any attacker. A real stall cannot hide behind the lower baseline: the
/// nexus has reclaimed the attacker by then, so it is slow only during the attack.
fn stall_attack(case: &str) -> String {
    const BEFORE: usize = 4;
    const DURING: usize = 6;
    const AFTER: usize = 4;
    // Without interrupt moderation: with it, the healthy app's rate in a release build jumps
    // between two regimes (the nexus serving on its 100 µs timer, or spinning) whatever the
    // attack does, and any other app's traffic tips it into the faster one.
    let d = Daemon::start(
        &format!("attack-{case}"),
        Some("[datapath]\ncoalesce_us = 0\n"),
    );
    let mut mon = d.monitor();
    let mut healthy = App::spawn(&["healthy", &d.socket, PHASE_SECS]);
    assert_eq!(healthy.line(), "ready");
    let healthy_pid = healthy.proc.pid().as_raw_nonzero().get();
    let attack = |d: &Daemon| -> (App, String) {
        let mut attacker = App::spawn_as(Some(NOBODY), &["attack", &d.socket, case]);
        // 64 channels of 65,536 buffers take a while to open in a debug build.
        assert_eq!(attacker.line_within(Duration::from_secs(120)), "ready");
        // As in the flood test: the nexus and the attacker (whose threads start after `go` and
        // inherit this) share CPU 0, the healthy app has CPU 1, so that scheduling noise and
        // the attacker's own CPU time do not pass for harm done through the nexus.
        pin(d.proc.pid(), 0);
        pin(attacker.proc.pid(), 0);
        attacker.say("go");
        let said = attacker.line();
        (attacker, said)
    };
    pin(healthy.proc.pid(), 1);
    let before: Vec<u64> = (0..BEFORE).map(|_| healthy_rate(&mut healthy)).collect();
    let (mut attacker, said) = attack(&d);
    let mut during = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..DURING {
        during.push(healthy_rate(&mut healthy));
        for _ in 0..5 {
            let t = Instant::now();
            let s = status(&mut mon);
            slowest = slowest.max(t.elapsed());
            assert!(
                s.channels.iter().any(|c| c.pid == healthy_pid),
                "the healthy app is served: {:?}",
                s.channels
            );
        }
    }
    assert!(slowest <= PROMPT, "{case}: a status took {slowest:?}");
    let s = status(&mut mon);
    assert_eq!(count(&s.control_errors, "reclaim_audit_failed"), 0);
    for c in &s.channels {
        assert_eq!(c.audit, "ok", "{case}: {c:?}");
    }
    attacker.proc.assert_running();
    attacker.proc.signal(Signal::KILL);
    attacker.proc.exit_within(SHORT);
    status_until(&mut mon, "the attacker's channels are reclaimed", |s| {
        s.channels.iter().all(|c| c.pid == healthy_pid)
    });
    let after: Vec<u64> = (0..AFTER).map(|_| healthy_rate(&mut healthy)).collect();
    let (b, m, a) = (
        median_of(before.clone()),
        median_of(during.clone()),
        median_of(after.clone()),
    );
    let base = b.min(a);
    println!(
        "{case}: healthy app {m} packets/s during the attack, {b} before, {a} after ({:.3} of \
         the lower){}; phases before {before:?}, during {during:?}, after {after:?}; slowest \
         status {slowest:?}; attacker said {said:?}",
        m as f64 / base.max(1) as f64,
        if b.max(a) as f64 > 1.5 * base as f64 {
            " (the baselines differ: the VM changed regime)"
        } else {
            ""
        },
    );
    assert!(
        m as f64 >= 0.9 * base as f64,
        "{case}: the healthy app fell to {m} packets/s from {b} before and {a} after (phases \
         before {before:?}, during {during:?}, after {after:?})"
    );
    let s = status(&mut mon);
    assert_eq!(count(&s.control_errors, "reclaim_audit_failed"), 0);
    // Stopping with an attacker attached (and attacking) is part of the promise.
    let (mut attacker, _) = attack(&d);
    attacker.proc.assert_running();
    let mut d = d;
    d.proc.signal(Signal::TERM);
    let st = d.proc.exit_within(SHORT);
    assert!(st.success(), "{case}: the nexus stopped with {st}");
    said
}

/// Attack 1: the app makes its doorbell end blocking, never reads it while the nexus keeps
/// ringing it, and fills the nexus's end with blocking writes. Before doorbells were socket
/// pairs this hung the nexus for good in write(2).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "rates are judged in a release build: scripts/test.sh runs this with --release"
)]
fn attack_a_blocking_doorbell_never_stalls_the_nexus() {
    let _serial = serial();
    assert_eq!(stall_attack("bell-block"), "attacking");
}

/// Attack 2: the app reads its doorbell from a blocking thread of its own (with a shared
/// eventfd it stole the nexus's wake-ups, and the nexus blocked in read(2)).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "rates are judged in a release build: scripts/test.sh runs this with --release"
)]
fn attack_a_doorbell_thief_never_stalls_the_nexus() {
    let _serial = serial();
    assert_eq!(stall_attack("bell-steal"), "attacking");
}

/// Attack 3: 64 channels of 65,536 buffers and status requests from 8 connections as fast as
/// they are answered. Status costs counters (audits run in housekeeping, within a budget) and
/// the user's requests are rate-limited, so the honest app keeps its rate.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "rates are judged in a release build: scripts/test.sh runs this with --release"
)]
fn attack_a_status_flood_never_starves_the_datapath() {
    let _serial = serial();
    assert_eq!(stall_attack("status-flood"), "attacking");
}

/// Channel churn: channels of 65,536 buffers opened and closed from 4 connections as fast as
/// the nexus lets them (an open costs the nexus's thread in proportion to its pool, and is
/// charged so).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "rates are judged in a release build: scripts/test.sh runs this with --release"
)]
fn attack_channel_churn_never_starves_the_datapath() {
    let _serial = serial();
    assert_eq!(stall_attack("churn"), "attacking");
}

/// 64 idle channels of 65,536 buffers beside a busy app: the nexus parks them, so a pass
/// costs the busy channel only (before parking, each pass looked at every channel's rings, and
/// the busy app kept 0.70 of its rate).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "rates are judged in a release build: scripts/test.sh runs this with --release"
)]
fn attack_idle_channels_cost_a_busy_app_nothing() {
    let _serial = serial();
    assert_eq!(stall_attack("idle-channels"), "attacking");
}

/// A channel with no traffic for `park_after_us` is parked (status says so), and its app's
/// next packets are served at once: they ring the doorbell, whether the nexus sleeps or
/// polls for another app meanwhile.
#[test]
fn a_quiet_channel_is_parked_and_its_next_packet_wakes_it() {
    let _serial = serial();
    let d = Daemon::start("park", Some("[datapath]\npark_after_us = 2000\n"));
    let mut mon = d.monitor();
    let mut quiet = App::spawn(&["healthy", &d.socket, "0.3"]);
    assert_eq!(quiet.line(), "ready");
    let pid = quiet.proc.pid().as_raw_nonzero().get();
    let parked = |s: &NexusStatus| s.channels.iter().any(|c| c.pid == pid && c.parked);
    status_until(&mut mon, "the quiet channel is parked", parked);
    // The nexus sleeps: the app's first packet rings it awake and unparks the channel.
    let alone = healthy_rate(&mut quiet);
    assert!(alone > 0, "a parked channel's app is served");
    // Parked again; now another app keeps the nexus polling while it sends.
    status_until(&mut mon, "parked again", parked);
    let mut busy = App::spawn(&["healthy", &d.socket, "3"]);
    assert_eq!(busy.line(), "ready");
    busy.say("go");
    std::thread::sleep(Duration::from_millis(500));
    let beside = healthy_rate(&mut quiet);
    assert!(
        beside > 0,
        "a parked channel's app is served beside a busy one"
    );
    assert!(busy.line().starts_with("rate "));
    let s = status(&mut mon);
    for c in &s.channels {
        assert_eq!(c.drops, vec![], "nothing lost: {c:?}");
        assert_eq!(c.audit, "ok");
    }
    println!("parked app's rate alone {alone}/s, beside a busy app {beside}/s");
}

/// Lesser attacks through the app's own fds: a doorbell shut (the channel is closed at once,
/// not polled as ready for ever), fds passed through the doorbell (refused by the kernel),
/// and a seal added to the pool's memfd (refused: the nexus sealed it with F_SEAL_SEAL, so it
/// still gives the idle pool back).
#[test]
fn attack_doorbell_shut_fds_and_seals_are_refused_or_ended() {
    let _serial = serial();
    let d = Daemon::start("attack-fds", Some("[channel]\nidle_trim_ms = 100\n"));
    let mut mon = d.monitor();
    let base = status(&mut mon);

    let mut shut = App::spawn_as(Some(NOBODY), &["attack", &d.socket, "bell-shut"]);
    assert_eq!(shut.line(), "ready");
    shut.say("go");
    let line = shut.line();
    assert!(line.starts_with("closed "), "{line}");
    let (s, _) = status_until(&mut mon, "the shut channel is closed", |s| {
        s.channels.is_empty()
    });
    assert_eq!(count(&s.control_errors, "doorbell_hangups"), 1);
    drop(shut);

    let mut fds = App::spawn_as(Some(NOBODY), &["attack", &d.socket, "bell-fds"]);
    assert_eq!(fds.line(), "ready");
    fds.say("go");
    let line = fds.line();
    assert!(
        line.starts_with("fds Err("),
        "passing an fd through a doorbell: {line}"
    );
    drop(fds);

    let mut seal = App::spawn_as(Some(NOBODY), &["attack", &d.socket, "seal"]);
    assert_eq!(seal.line(), "ready");
    seal.say("go");
    let line = seal.line();
    assert!(
        line.starts_with("seal Err("),
        "adding a seal to the pool: {line}"
    );
    let (s, _) = status_until(&mut mon, "the idle pool is given back", |s| {
        s.channels.len() == 1 && s.channels[0].buffers_absent > 0
    });
    assert_eq!(s.channels[0].drops, vec![], "no pool_release_failed");
    drop(seal);
    status_until(&mut mon, "every attacker is reclaimed", |s| {
        s.channels.is_empty() && s.fds == base.fds
    });
    assert_serves(&d.socket);
}

/// Attack 4: more channels than one status reply holds. Status pages, and `Nexus::status`
/// reads every page: 1,280 channels (20 users' worth) and then 10,000, opened by 4 app
/// processes (each within an ordinary fd limit; the nexus keeps one fd per channel).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "opening 10,000 channels takes minutes in a debug build: scripts/test.sh runs this \
              with --release"
)]
fn status_answers_with_ten_thousand_channels() {
    const APPS: usize = 4;
    let _serial = serial();
    let d = Daemon::start("many-channels", None);
    let mut mon = d.monitor();
    let mut apps = Vec::new();
    let mut opened = 0usize;
    for target in [1_280usize, 10_000] {
        let t = Instant::now();
        let per_app = (target - opened) / APPS;
        for _ in 0..APPS {
            let mut app = App::spawn(&["many", &d.socket, &per_app.to_string()]);
            assert_eq!(
                app.line_within(Duration::from_secs(300)),
                format!("opened {per_app}")
            );
            apps.push(app);
        }
        opened += per_app * APPS;
        let took = t.elapsed();
        let t = Instant::now();
        let s = status(&mut mon);
        let all = t.elapsed();
        let t = Instant::now();
        let first = mon.status_page(None).expect("first page");
        let one = t.elapsed();
        println!(
            "{opened} channels (opened in {took:?}): whole status in {all:?}, first page ({} \
             channels) in {one:?}; the nexus holds {} fds",
            first.channels.len(),
            s.fds
        );
        assert_eq!(s.channels.len(), opened);
        let mut ids: Vec<u64> = s.channels.iter().map(|c| c.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), opened, "no channel twice");
        assert!(
            first.next_after.is_some(),
            "{opened} channels take more than a page"
        );
        assert!(one <= PROMPT, "a page took {one:?}");
        assert!(
            s.fds < opened + 100,
            "one fd per channel: {} for {opened}",
            s.fds
        );
    }
    assert_serves(&d.socket);
}
