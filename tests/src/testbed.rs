//! The bed of the integration tests that need hosts: `netchannel_testbed`'s network namespace
//! holding the peer end of a veth pair whose host end stays in this namespace, and child
//! processes whose output is read line by line. Shared by `netchannel-tests` and
//! `netchannel-examples`.
//!
//! Addresses come from 198.18.0.0/15 and fd00:198:18::/64 only (see [`netchannel_testbed::Slot`]).
//! Each test binary picks its slots from its process id, so concurrent runs do not collide.
//! Everything is removed in `Drop`, however a test ends.

use std::io::{BufRead, BufReader};
use std::net::Ipv6Addr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netchannel_testbed::{Bed, Offloads};

pub use netchannel_testbed::is_root;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of a binary one at a time (a failed test poisons the lock; that is fine):
/// the machine has two cores and every nexus polls.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
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

/// A test's bed: `netchannel_testbed`'s namespace and veth pair in slot `k`, with IPv6 and the
/// peer's offloads off (so its frames carry real checksums); deleted on drop. Derefs to the
/// [`Bed`] for its names and addresses.
#[derive(Debug)]
pub struct VethNet(Bed);

impl std::ops::Deref for VethNet {
    type Target = Bed;
    fn deref(&self) -> &Bed {
        &self.0
    }
}

impl VethNet {
    /// The bed of slot `k` (< 512) of 198.18.0.0/15, its names carrying `tag`; panics, saying
    /// why, if it cannot be made.
    pub fn new(tag: &str, k: u32) -> Self {
        let bed = Bed::builder(tag)
            .slot(k)
            .v6(true)
            .offloads(Offloads::PeerOff)
            .build()
            .unwrap_or_else(|e| panic!("the {tag} test bed in slot {k}: {e}"));
        Self(bed)
    }

    /// The host end's IPv6 address.
    pub fn host6(&self) -> Ipv6Addr {
        self.0.host6().expect("a bed with IPv6")
    }

    /// The peer's IPv6 address.
    pub fn peer6(&self) -> Ipv6Addr {
        self.0.peer6().expect("a bed with IPv6")
    }

    /// `ip netns exec NS PROGRAM ARGS...`, started; its output read line by line.
    pub fn exec(&self, what: &str, program: &str, args: &[&str]) -> Kid {
        Kid::spawn(self.0.command(program).args(args), what)
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
