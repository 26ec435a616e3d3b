//! The bed of the integration tests that need hosts: a network namespace holding the peer end
//! of a veth pair whose host end stays in this namespace, and child processes whose output is
//! read line by line. Shared by `netchannel-tests` and `netchannel-examples`.
//!
//! Addresses come from 198.18.0.0/15 and fd00:198:18::/64 only: slot `k` of a bed is the /24
//! `198.18.0.0 + k` and the /112 `fd00:198:18::k:0`, the host end `.1` / `::1` in them and the
//! peer `.2` / `::2`. Each test binary picks its slots from its process id, so concurrent runs
//! do not collide. Everything is removed in `Drop`, however a test ends.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of a binary one at a time (a failed test poisons the lock; that is fine):
/// the machine has two cores and every nexus polls.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True (after saying so on stderr) when the test cannot run here because it needs root.
pub fn skip_without_root(needs: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED: needs root ({needs})");
    true
}

/// Runs `cmd args`; panics if it cannot be started.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Runs `ip args`; panics, with its stderr, if it fails.
pub fn ip(args: &[&str]) {
    let out = run("ip", args);
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace `ns` holding the peer end `peer` of a veth pair whose host end `host` stays in
/// this namespace, both ends up and addressed (see the module docs), the peer's offloads off
/// (so its frames carry real checksums). Deleted on drop.
#[derive(Debug)]
pub struct VethNet {
    /// The namespace.
    pub ns: String,
    /// The host end.
    pub host: String,
    /// The peer end (in `ns`).
    pub peer: String,
    /// Addresses of the host end.
    pub host4: Ipv4Addr,
    /// Addresses of the peer end.
    pub peer4: Ipv4Addr,
    /// IPv6 address of the host end.
    pub host6: Ipv6Addr,
    /// IPv6 address of the peer end.
    pub peer6: Ipv6Addr,
    /// MAC address of the host end (the kernel's choice).
    pub host_mac: [u8; 6],
    /// MAC address of the peer end (fixed, from the slot).
    pub peer_mac: [u8; 6],
}

impl Drop for VethNet {
    fn drop(&mut self) {
        // Deleting the namespace destroys the peer end and with it the pair; deleting the host
        // end is for a pair whose peer never made it into the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .stderr(Stdio::null())
            .status();
    }
}

fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    assert_eq!(parts.len(), 6, "a MAC address: {text:?}");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).expect("hex MAC");
    }
    mac
}

impl VethNet {
    /// Test `n`'s bed in slot `k` (< 512) of 198.18.0.0/15; its names are `nc-<tag>-<pid>-<n>`
    /// for the namespace and `<short><pid>n` + `h`/`p` for the ends (`short` keeps them under
    /// the 15 bytes of an interface name).
    pub fn new(tag: &str, short: &str, n: u32, k: u32) -> Self {
        assert!(k < 512, "slot {k} is outside 198.18.0.0/15");
        let pid = std::process::id();
        let (b, c) = (18 + (k / 256) as u8, (k % 256) as u8);
        let mut net = Self {
            ns: format!("nc-{tag}-{pid}-{n}"),
            host: format!("{short}{}{n}h", pid % 10_000),
            peer: format!("{short}{}{n}p", pid % 10_000),
            host4: Ipv4Addr::new(198, b, c, 1),
            peer4: Ipv4Addr::new(198, b, c, 2),
            host6: Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, k as u16, 1),
            peer6: Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, k as u16, 2),
            host_mac: [0; 6],
            peer_mac: [0x02, 0x4e, 0x43, (k >> 8) as u8, k as u8, 2],
        };
        ip(&["netns", "add", &net.ns]);
        ip(&[
            "link", "add", &net.host, "type", "veth", "peer", "name", &net.peer, "netns", &net.ns,
        ]);
        let peer_mac = net
            .peer_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", net.ns.as_str(), "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        let peer = net.peer.as_str();
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["link", "set", peer, "address", &peer_mac]);
        in_ns(&["addr", "add", &format!("{}/24", net.peer4), "dev", peer]);
        let peer6 = format!("{}/112", net.peer6);
        in_ns(&["addr", "add", &peer6, "dev", peer, "nodad"]);
        in_ns(&["link", "set", peer, "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host4),
            "dev",
            &net.host,
        ]);
        let host6 = format!("{}/112", net.host6);
        ip(&["addr", "add", &host6, "dev", &net.host, "nodad"]);
        // No duplicate address detection on the link-local address either: until it ends
        // (1-2 s), the kernel cannot send a neighbour solicitation from it, for its own
        // sockets or the nexus's packets alike, and cold-start tests would measure DAD.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/accept_dad", net.host),
            "0",
        );
        ip(&["link", "set", &net.host, "up"]);
        netchannel_nexus::netns::offload::disable_offloads_in(&net.ns, &net.peer)
            .expect("turning the peer's offloads off");
        let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", net.host))
            .expect("the host end's MAC address");
        net.host_mac = parse_mac(&mac);
        net
    }

    /// `ip netns exec NS PROGRAM ARGS...`, started; its output read line by line.
    pub fn exec(&self, what: &str, program: &str, args: &[&str]) -> Kid {
        Kid::spawn(
            Command::new("ip")
                .args(["netns", "exec", &self.ns, program])
                .args(args),
            what,
        )
    }

    /// `ip netns exec NS python3 -c SCRIPT`, with every `@KEY@` of the script replaced.
    pub fn python(&self, what: &str, script: &str, vars: &[(&str, String)]) -> Kid {
        let mut s = script.to_owned();
        for (k, v) in vars {
            s = s.replace(&format!("@{k}@"), v);
        }
        assert!(!s.contains('@'), "a placeholder left in the script:\n{s}");
        self.exec(what, "python3", &["-c", &s])
    }
}

/// A child process whose stdout arrives line by line on a channel and whose stderr is kept;
/// killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Kid {
    child: Child,
    what: String,
    lines: mpsc::Receiver<String>,
    /// Lines read past while looking for another.
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Kid {
    /// Starts `cmd` with its stdout and stderr piped; `what` names it in panics.
    pub fn spawn(cmd: &mut Command, what: &str) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let keep = stderr.clone();
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = keep.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self {
            child,
            what: what.to_owned(),
            lines,
            seen: Vec::new(),
            stderr,
            stderr_thread: Some(stderr_thread),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waitpid")
    }

    /// The next line of output, if one comes within `timeout`.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits (at most `timeout`) for a line of output that starts with `prefix`; lines before
    /// it are kept in `seen`. Panics, with what the process said, if none comes.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => self.seen.push(l),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{} printed no {prefix:?} line within {timeout:?}; stdout {:?}, stderr: {}",
                    self.what,
                    self.seen,
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    // Its stdout closed: it exited (or is about to).
                    std::thread::sleep(Duration::from_millis(100));
                    let status = self.exited();
                    panic!(
                        "{} ended ({:?}) without a {prefix:?} line; stdout {:?}, stderr: {}",
                        self.what,
                        status,
                        self.seen,
                        self.stderr()
                    )
                }
            }
        }
    }

    /// Like [`Kid::expect_line`], but `None` when no such line comes in time.
    pub fn try_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Some(l),
                Ok(l) => self.seen.push(l),
                Err(_) => return None,
            }
        }
    }

    /// Waits (at most `timeout`, then kills and panics) for the process to exit; returns its
    /// status, the lines not read yet and its stderr.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.exited() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not finish within {timeout:?}; stdout {:?}, stderr: {}",
                    self.what,
                    self.seen,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut lines = std::mem::take(&mut self.seen);
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            lines.push(l);
        }
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        (status, lines, self.stderr())
    }

    /// Like [`Kid::finish`], and the process must have succeeded.
    pub fn succeed(self, timeout: Duration) -> Vec<String> {
        let what = self.what.clone();
        let (st, lines, err) = self.finish(timeout);
        assert!(
            st.success(),
            "{what} failed ({st}): {err}\nstdout: {lines:?}"
        );
        lines
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
