//! Shared bits of the example apps: argument parsing without a framework (the examples are
//! meant to be read), hex output, and what a server needs to outlive the failures of single
//! requests: a rate-limited error report and a backoff for retries.

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The value after `--name` in `args`, if any.
pub fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Every value after a `--name` in `args`, in order (an option given more than once).
pub fn args_all<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    args.iter()
        .enumerate()
        .filter(|(_, a)| *a == name)
        .filter_map(|(i, _)| args.get(i + 1))
        .map(String::as_str)
        .collect()
}

/// Whether the flag `--name` (an option without a value) is in `args`.
pub fn flag(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

/// The nexus's control socket: `--socket PATH`, else the default.
pub fn socket(args: &[String]) -> String {
    arg(args, "--socket")
        .unwrap_or(netchannel::nexus::DEFAULT_SOCKET)
        .to_owned()
}

fn parse_addr(name: &str, text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{name}: {text:?} is not an address like 0.0.0.0:8080 or [::]:8080"))
}

/// Parses `--name ADDR` (or the default).
pub fn addr(args: &[String], name: &str, default: &str) -> Result<SocketAddr, String> {
    parse_addr(name, arg(args, name).unwrap_or(default))
}

/// Parses every `--name ADDR` (or the default, if there is none).
pub fn addrs(args: &[String], name: &str, default: &str) -> Result<Vec<SocketAddr>, String> {
    let given = args_all(args, name);
    if given.is_empty() {
        return Ok(vec![parse_addr(name, default)?]);
    }
    given.into_iter().map(|t| parse_addr(name, t)).collect()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the stack's channel to the nexus has failed for good (the nexus stopped, or
/// declared the channel defunct): then every call on its sockets fails, and a server should
/// end instead of retrying. Any other error of a call is about that call.
pub fn stack_broken(stack: &netchannel::stack::Stack) -> bool {
    // `poll` says whether the channel works; polling once more from this thread is harmless.
    stack.poll().is_err()
}

/// Lines a [`Reporter`] writes in a second, at most.
const REPORTS_PER_SECOND: u32 = 10;

/// Reports the failures of single requests (a datagram that cannot be echoed, a connection
/// that broke) on stderr, prefixed with the program's name, and goes on. A flood of them (a
/// peer sending one bad datagram after another) is not a flood of lines: past
/// [`REPORTS_PER_SECOND`] lines a second, reports are only counted, and the count is said at
/// the next line that goes out. Shared by the threads of a server.
#[derive(Debug)]
pub struct Reporter {
    who: &'static str,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    lines: u32,
    suppressed: u64,
}

impl Reporter {
    /// A reporter whose lines start with `who: `.
    pub fn new(who: &'static str) -> Self {
        Self {
            who,
            window: Mutex::new(Window {
                start: Instant::now(),
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// Reports `what` (or counts it, past the rate).
    pub fn report(&self, what: impl Display) {
        let suppressed = {
            // A thread that panicked while holding the lock left a count, nothing worse.
            let mut w = self
                .window
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if w.start.elapsed() >= Duration::from_secs(1) {
                w.start = Instant::now();
                w.lines = 0;
            }
            if w.lines >= REPORTS_PER_SECOND {
                w.suppressed += 1;
                return;
            }
            w.lines += 1;
            std::mem::take(&mut w.suppressed)
        };
        if suppressed > 0 {
            eprintln!(
                "{}: {what} (and {suppressed} more failures not shown)",
                self.who
            );
        } else {
            eprintln!("{}: {what}", self.who);
        }
    }
}

/// How long to wait before retrying a call that failed (an `accept` while the process is out
/// of file descriptors, say): 10 ms, doubling to at most 1 s, back to 10 ms after a success.
/// A server that retried at once would spin on the failure.
#[derive(Debug, Default)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// Sleeps before the next try.
    pub fn wait(&mut self) {
        let d = self.next.clamp(Self::FIRST, Self::MAX);
        std::thread::sleep(d);
        self.next = (d * 2).min(Self::MAX);
    }

    /// A call succeeded: the next failure waits the least again.
    pub fn reset(&mut self) {
        self.next = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn repeated_options_are_all_read_in_order() {
        let a = strings(&["--listen", "0.0.0.0:1", "--kernel", "--listen", "[::]:2"]);
        assert_eq!(args_all(&a, "--listen"), ["0.0.0.0:1", "[::]:2"]);
        assert_eq!(arg(&a, "--listen"), Some("0.0.0.0:1"));
        assert!(flag(&a, "--kernel"));
        assert!(!flag(&a, "--upload"));
        let got = addrs(&a, "--listen", "0.0.0.0:8080").expect("addresses");
        assert_eq!(got.len(), 2);
        assert!(got[1].is_ipv6());
        assert_eq!(
            addrs(&[], "--listen", "0.0.0.0:8080").expect("the default"),
            ["0.0.0.0:8080".parse::<SocketAddr>().expect("an address")]
        );
        assert!(addrs(&strings(&["--listen", "nope"]), "--listen", "0.0.0.0:1").is_err());
    }

    #[test]
    fn a_flood_of_reports_is_counted_not_printed() {
        let r = Reporter::new("test");
        for i in 0..100 {
            r.report(format_args!("failure {i}"));
        }
        let w = r.window.lock().expect("the window");
        assert_eq!(w.lines, REPORTS_PER_SECOND);
        assert_eq!(w.suppressed, 100 - u64::from(REPORTS_PER_SECOND));
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::default();
        b.wait();
        b.wait();
        assert_eq!(b.next, Duration::from_millis(40));
        b.next = Duration::from_millis(900);
        b.wait();
        assert_eq!(b.next, Backoff::MAX, "at most a second");
        b.reset();
        assert_eq!(b.next, Duration::ZERO);
    }
}
