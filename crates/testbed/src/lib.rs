//! The one test bed of netchannel's tests, demo and benchmarks: a network namespace holding the
//! peer end of a veth pair whose host end stays in the caller's namespace (or, on request, in a
//! namespace of its own), both ends addressed and up, and everything removed in `Drop`, however
//! the caller ends (error, panic, or a signal it turns into a normal exit).
//!
//! Addresses come from 198.18.0.0/15 and fd00:198:18::/64 only: [`Slot`] `k` (< 512) is the /24
//! `198.18.0.0 + k` and the /112 `fd00:198:18::k:0`, the host end `.1` / `::1` in them and the
//! peer `.2` / `::2`; the caller picks its slot (concurrent runs pick different ones).
//!
//! Names are unique per process: the namespace is `nc-<tag>-<pid>-<n>` and the ends are
//! `nc<pid, 7 digits><n>h` and `…p` (under the 15 bytes of an interface name), `n` counting the
//! namespaces this process made.
//!
//! ```no_run
//! use netchannel_testbed::{Bed, Offloads};
//!
//! let bed = Bed::builder("demo").slot(3).v6(true).offloads(Offloads::PeerOff).build()?;
//! let peer = bed.command("python3").args(["-c", "print('hello from the peer')"]).output();
//! # Ok::<(), netchannel_testbed::BedError>(())
//! ```

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use netchannel_nexus::netns::offload::{self, OffloadError};

/// How many namespaces this process has made (names are unique per process with it).
static MADE: AtomicU32 = AtomicU32::new(0);

/// Interface names are `nc` + 7 digits of pid + this counter + `h`/`p`: at most 15 bytes.
const MAX_BEDS: u32 = 100_000;

/// How long [`BedBuilder::resolve_peer`] waits for the peer to answer ARP.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a test bed could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BedError {
    /// The caller is not root.
    #[error(
        "a test bed (network namespace, veth pair) needs root: run as root (sudo), or skip \
         what needs it"
    )]
    NeedsRoot,
    /// The `ip` command could not be started.
    #[error("cannot run `ip`: {0} (install iproute2)")]
    NoIp(#[source] std::io::Error),
    /// An `ip` command failed.
    #[error(
        "`ip {args}` failed: {stderr} (leftovers of a killed run? see `ip netns list` and `ip \
         link`)"
    )]
    Ip {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// The slot is not in 198.18.0.0/15.
    #[error("slot {0} is outside 198.18.0.0/15: pick a slot below 512")]
    Slot(u32),
    /// The tag cannot be part of a namespace name.
    #[error("tag {0:?} must be 1 to 32 bytes of a-z, 0-9 and '-'")]
    Tag(String),
    /// The process made too many namespaces for its interface names to stay unique.
    #[error(
        "this process already made {MAX_BEDS} namespaces: interface names would not fit 15 \
         bytes; reuse beds instead"
    )]
    Exhausted,
    /// Two options that cannot go together.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The offloads of an end could not be turned off.
    #[error("turning the offloads of {dev} off: {source}")]
    Offloads {
        /// The interface.
        dev: String,
        /// Why.
        #[source]
        source: OffloadError,
    },
    /// `ip link show` did not say what it should.
    #[error("reading the {what} of {dev} from `ip -o link show`: {detail}")]
    LinkInfo {
        /// The MAC address or the interface index.
        what: &'static str,
        /// The interface.
        dev: String,
        /// What was read instead.
        detail: String,
    },
    /// The socket that makes this host resolve the peer could not be used.
    #[error("sending to the peer to resolve it: {0}")]
    Poke(#[source] std::io::Error),
    /// The peer did not answer ARP.
    #[error(
        "the peer {peer} did not answer ARP on {dev} within {RESOLVE_TIMEOUT:?}: is its end up \
         (`ip -n {ns} link`)?"
    )]
    Unresolved {
        /// The peer's address.
        peer: Ipv4Addr,
        /// The host end.
        dev: String,
        /// The peer's namespace.
        ns: String,
    },
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn check_root() -> Result<(), BedError> {
    if is_root() {
        Ok(())
    } else {
        Err(BedError::NeedsRoot)
    }
}

/// Runs `ip ARGS` in this network namespace; returns its stdout, or what it said on failure.
pub fn ip(args: &[&str]) -> Result<String, BedError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(BedError::NoIp)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BedError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The next per-process number for a name, or [`BedError::Exhausted`].
fn next_number() -> Result<u32, BedError> {
    let n = MADE.fetch_add(1, Ordering::Relaxed);
    if n < MAX_BEDS {
        Ok(n)
    } else {
        Err(BedError::Exhausted)
    }
}

fn check_tag(tag: &str) -> Result<(), BedError> {
    let ok = (1..=32).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BedError::Tag(tag.to_owned()))
    }
}

/// One /24 of 198.18.0.0/15 and one /112 of fd00:198:18::/64: the addresses of a bed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u32);

impl Slot {
    /// Slot `k`: `198.(18 + k / 256).(k % 256).0/24` and `fd00:198:18::k:0/112`.
    pub fn new(k: u32) -> Result<Self, BedError> {
        if k < 512 {
            Ok(Self(k))
        } else {
            Err(BedError::Slot(k))
        }
    }

    /// Its number.
    pub fn index(self) -> u32 {
        self.0
    }

    fn v4(self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18 + (self.0 / 256) as u8, (self.0 % 256) as u8, host)
    }

    fn v6(self, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, self.0 as u16, host)
    }

    /// The host end's IPv4 address (`.1`).
    pub fn host4(self) -> Ipv4Addr {
        self.v4(1)
    }

    /// The peer's IPv4 address (`.2`).
    pub fn peer4(self) -> Ipv4Addr {
        self.v4(2)
    }

    /// The host end's IPv6 address (`::k:1`).
    pub fn host6(self) -> Ipv6Addr {
        self.v6(1)
    }

    /// The peer's IPv6 address (`::k:2`).
    pub fn peer6(self) -> Ipv6Addr {
        self.v6(2)
    }

    /// The peer end's MAC address: `02:4e:43:` then the slot and 2 (locally administered).
    pub fn peer_mac(self) -> [u8; 6] {
        [0x02, 0x4e, 0x43, (self.0 >> 8) as u8, self.0 as u8, 2]
    }
}

/// A named network namespace (`ip netns add`), its loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace `nc-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<Self, BedError> {
        check_root()?;
        check_tag(tag)?;
        let n = next_number()?;
        Self::create(format!("nc-{tag}-{}-{n}", std::process::id()))
    }

    fn create(name: String) -> Result<Self, BedError> {
        ip(&["netns", "add", &name])?;
        // Ours from here on: deleted if anything below fails.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name (as in `ip netns list`; its file is `/run/netns/<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, BedError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// `ip netns exec NAME PROGRAM`, not started: add arguments and pipes, then run it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Which ends get their offloads (checksum, segmentation, GRO) turned off, so that every frame
/// on the wire is a single, fully checksummed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offloads {
    /// Leave both ends as the kernel made them.
    #[default]
    Keep,
    /// Only the peer's end.
    PeerOff,
    /// Both ends.
    BothOff,
}

/// How to make a [`Bed`]; see [`Bed::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct BedBuilder {
    tag: String,
    slot: u32,
    v6: bool,
    offloads: Offloads,
    resolve_peer: bool,
    host_in_netns: bool,
    /// Fails once everything is made (tests of the clean-up).
    #[cfg(test)]
    fail_at_the_end: bool,
}

impl BedBuilder {
    /// The addresses of slot `k` (default 0).
    pub fn slot(mut self, k: u32) -> Self {
        self.slot = k;
        self
    }

    /// IPv6 addresses as well, without duplicate address detection (default: IPv4 only).
    pub fn v6(mut self, on: bool) -> Self {
        self.v6 = on;
        self
    }

    /// Whose offloads to turn off (default: nobody's).
    pub fn offloads(mut self, o: Offloads) -> Self {
        self.offloads = o;
        self
    }

    /// Before [`build`](Self::build) returns, this host's kernel has resolved the peer (ARP),
    /// so that nothing measured later pays for it. Needs the host end in the caller's
    /// namespace.
    pub fn resolve_peer(mut self, on: bool) -> Self {
        self.resolve_peer = on;
        self
    }

    /// The host end too in a namespace of its own, so the caller's namespace is not touched
    /// (default: the host end stays in the caller's namespace).
    pub fn host_in_netns(mut self, on: bool) -> Self {
        self.host_in_netns = on;
        self
    }

    /// Makes the bed. Whatever it made before failing is removed again.
    pub fn build(self) -> Result<Bed, BedError> {
        check_root()?;
        check_tag(&self.tag)?;
        let slot = Slot::new(self.slot)?;
        if self.resolve_peer && self.host_in_netns {
            return Err(BedError::Unsupported(
                "resolve_peer needs the host end in this namespace: drop host_in_netns or \
                 resolve_peer",
            ));
        }
        let n = next_number()?;
        let pid = std::process::id();
        let base = format!("nc-{}-{pid}-{n}", self.tag);
        let ns = Netns::create(base.clone())?;
        let host_ns = if self.host_in_netns {
            Some(Netns::create(format!("{base}-host"))?)
        } else {
            None
        };
        let (host, peer) = (format!("nc{pid:07}{n}h"), format!("nc{pid:07}{n}p"));
        let mut bed = Bed {
            ns,
            host_ns,
            host,
            peer,
            slot,
            v6: self.v6,
            host_mac: [0; 6],
            host_ifindex: 0,
            made_link: false,
        };
        bed.host_ip(&[
            "link",
            "add",
            &bed.host,
            "type",
            "veth",
            "peer",
            "name",
            &bed.peer,
            "netns",
            bed.ns.name(),
        ])?;
        bed.made_link = true;
        // From here on, an error drops `bed`, which deletes all of it.
        bed.configure(&self)?;
        Ok(bed)
    }
}

/// A namespace holding the peer end of a veth pair whose host end stays in the caller's
/// namespace (or one of its own), both ends up and addressed from their [`Slot`] (see the
/// crate docs), the peer end's MAC fixed by the slot. Deleted on drop.
#[derive(Debug)]
pub struct Bed {
    ns: Netns,
    host_ns: Option<Netns>,
    host: String,
    peer: String,
    slot: Slot,
    v6: bool,
    host_mac: [u8; 6],
    host_ifindex: u32,
    /// Whether the pair exists (and is ours to delete).
    made_link: bool,
}

impl Bed {
    /// A bed whose names carry `tag` (a-z, 0-9, '-'): slot 0, IPv4 only, offloads on, the
    /// host end in the caller's namespace, until the builder says otherwise.
    pub fn builder(tag: &str) -> BedBuilder {
        BedBuilder {
            tag: tag.to_owned(),
            slot: 0,
            v6: false,
            offloads: Offloads::Keep,
            resolve_peer: false,
            host_in_netns: false,
            #[cfg(test)]
            fail_at_the_end: false,
        }
    }

    /// `ip [-n HOST_NS] ARGS`: a command about the host end, wherever it is.
    fn host_ip(&self, args: &[&str]) -> Result<String, BedError> {
        match &self.host_ns {
            Some(ns) => ns.ip(args),
            None => ip(args),
        }
    }

    fn configure(&mut self, o: &BedBuilder) -> Result<(), BedError> {
        let slot = self.slot;
        let (ns, peer, host) = (&self.ns, self.peer.as_str(), self.host.as_str());
        let peer_mac = format_mac(slot.peer_mac());
        ns.ip(&["link", "set", peer, "address", &peer_mac])?;
        ns.ip(&["addr", "add", &format!("{}/24", slot.peer4()), "dev", peer])?;
        if self.v6 {
            let a = format!("{}/112", slot.peer6());
            ns.ip(&["addr", "add", &a, "dev", peer, "nodad"])?;
        }
        ns.ip(&["link", "set", peer, "up"])?;
        self.host_ip(&["addr", "add", &format!("{}/24", slot.host4()), "dev", host])?;
        if self.v6 {
            let a = format!("{}/112", slot.host6());
            self.host_ip(&["addr", "add", &a, "dev", host, "nodad"])?;
            // No duplicate address detection on the link-local address either: until it ends
            // (1-2 s), the kernel cannot send a neighbour solicitation from it, for its own
            // sockets or a nexus's packets alike, and cold starts would measure DAD. Best
            // effort: without it, things are only slower at first.
            let path = format!("/proc/sys/net/ipv6/conf/{host}/accept_dad");
            match &self.host_ns {
                None => {
                    let _ = std::fs::write(&path, "0");
                }
                Some(h) => {
                    let _ = h
                        .command("sh")
                        .args(["-c", &format!("echo 0 > {path}")])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        self.host_ip(&["link", "set", host, "up"])?;
        if o.offloads != Offloads::Keep {
            offload::disable_offloads_in(ns.name(), peer).map_err(|source| BedError::Offloads {
                dev: peer.to_owned(),
                source,
            })?;
        }
        if o.offloads == Offloads::BothOff {
            match &self.host_ns {
                Some(h) => offload::disable_offloads_in(h.name(), host),
                None => offload::disable_offloads(host),
            }
            .map_err(|source| BedError::Offloads {
                dev: host.to_owned(),
                source,
            })?;
        }
        let info = self.host_ip(&["-o", "link", "show", "dev", host])?;
        let (ifindex, mac) = parse_link(&info, host)?;
        self.host_ifindex = ifindex;
        self.host_mac = mac;
        if o.resolve_peer {
            self.resolve()?;
        }
        #[cfg(test)]
        if o.fail_at_the_end {
            return Err(BedError::Unsupported("injected"));
        }
        Ok(())
    }

    /// Makes this host's kernel resolve the peer: a datagram to a closed port of the peer
    /// makes it ARP; waits until the neighbour table has the peer's address.
    fn resolve(&self) -> Result<(), BedError> {
        let (host4, peer4) = (self.slot.host4(), self.slot.peer4());
        let poke = UdpSocket::bind(SocketAddrV4::new(host4, 0)).map_err(BedError::Poke)?;
        let peer = peer4.to_string();
        let t0 = Instant::now();
        loop {
            let table = ip(&["-4", "neigh", "show", "to", &peer, "dev", &self.host])?;
            if neighbour_known(&table) {
                return Ok(());
            }
            if t0.elapsed() > RESOLVE_TIMEOUT {
                return Err(BedError::Unresolved {
                    peer: peer4,
                    dev: self.host.clone(),
                    ns: self.ns.name().to_owned(),
                });
            }
            let _ = poke.send_to(b"hello", SocketAddrV4::new(peer4, 9));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The namespace of the peer end.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The namespace of the host end, if it has one of its own
    /// ([`BedBuilder::host_in_netns`]).
    pub fn host_ns(&self) -> Option<&Netns> {
        self.host_ns.as_ref()
    }

    /// `ip netns exec NS PROGRAM` in the peer's namespace, not started.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.ns.command(program)
    }

    /// The host end's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The peer end's name (in [`Bed::ns`]).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Its addresses.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The host end's IPv4 address.
    pub fn host4(&self) -> Ipv4Addr {
        self.slot.host4()
    }

    /// The peer's IPv4 address.
    pub fn peer4(&self) -> Ipv4Addr {
        self.slot.peer4()
    }

    /// The host end's IPv6 address, if the bed has IPv6 ([`BedBuilder::v6`]).
    pub fn host6(&self) -> Option<Ipv6Addr> {
        self.v6.then(|| self.slot.host6())
    }

    /// The peer's IPv6 address, if the bed has IPv6.
    pub fn peer6(&self) -> Option<Ipv6Addr> {
        self.v6.then(|| self.slot.peer6())
    }

    /// The host end's MAC address (the kernel's choice).
    pub fn host_mac(&self) -> [u8; 6] {
        self.host_mac
    }

    /// The peer end's MAC address (fixed by the slot).
    pub fn peer_mac(&self) -> [u8; 6] {
        self.slot.peer_mac()
    }

    /// The host end's interface index (in its namespace).
    pub fn host_ifindex(&self) -> u32 {
        self.host_ifindex
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // Deleting the host end deletes the pair, even when the peer end is held by a process
        // still in its namespace; the namespaces go with their fields.
        if self.made_link && self.host_ns.is_none() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC address written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for m in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The interface index and MAC address in a line of `ip -o link show dev DEV`
/// (`7: DEV@if6: <...> ... link/ether aa:bb:cc:dd:ee:ff brd ...`).
fn parse_link(line: &str, dev: &str) -> Result<(u32, [u8; 6]), BedError> {
    let bad = |what, detail: &str| BedError::LinkInfo {
        what,
        dev: dev.to_owned(),
        detail: detail.trim().to_owned(),
    };
    let ifindex = line
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| bad("interface index", line))?;
    let mut words = line.split_whitespace();
    let mac = words
        .by_ref()
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .and_then(parse_mac)
        .ok_or_else(|| bad("MAC address", line))?;
    Ok((ifindex, mac))
}

/// Whether `ip neigh show to ADDR dev DEV` shows a usable entry (a link-layer address, in a
/// state other than incomplete or failed).
fn neighbour_known(table: &str) -> bool {
    table
        .lines()
        .any(|l| l.contains("lladdr") && !l.contains("INCOMPLETE") && !l.contains("FAILED"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip() -> bool {
        if is_root() {
            return false;
        }
        eprintln!("SKIPPED: needs root (network namespaces, veth pairs)");
        true
    }

    /// One test at a time where a test compares what exists before and after.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        ONE.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Test beds use slots 480..512, out of the way of the other tests' beds.
    fn slot(i: u32) -> u32 {
        480 + (std::process::id() % 4) * 8 + i
    }

    fn namespaces() -> String {
        ip(&["netns", "list"]).unwrap()
    }

    fn link_exists(dev: &str) -> bool {
        ip(&["link", "show", "dev", dev]).is_ok()
    }

    #[test]
    fn slots_map_into_the_benchmarking_ranges() {
        let s = Slot::new(0).unwrap();
        assert_eq!(s.host4(), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(s.peer4(), Ipv4Addr::new(198, 18, 0, 2));
        let s = Slot::new(300).unwrap();
        assert_eq!(s.host4(), Ipv4Addr::new(198, 19, 44, 1));
        assert_eq!(s.peer6(), "fd00:198:18::12c:2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(s.peer_mac(), [0x02, 0x4e, 0x43, 1, 44, 2]);
        let s = Slot::new(511).unwrap();
        assert_eq!(s.peer4(), Ipv4Addr::new(198, 19, 255, 2));
        assert!(matches!(Slot::new(512), Err(BedError::Slot(512))));
    }

    #[test]
    fn tags_and_macs_are_checked() {
        for good in ["veth", "a", "stack-2"] {
            check_tag(good).unwrap();
        }
        for bad in ["", "Veth", "a b", "a/b", &"x".repeat(33)] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
        let mac = [0x02, 0x4e, 0x43, 0x01, 0xff, 0x0a];
        assert_eq!(parse_mac(&format_mac(mac)), Some(mac));
        assert_eq!(parse_mac(" 2:4e:43:1:ff:a\n"), Some(mac));
        for bad in [
            "",
            "02:4e:43:01:ff",
            "02:4e:43:01:ff:0a:00",
            "02:4e:43:01:ff:xx",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn link_lines_and_neighbour_tables_are_read() {
        let line = "7: nc0001234h@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue \
                    state UP mode DEFAULT group default qlen 1000\\    link/ether \
                    8e:2c:00:11:22:33 brd ff:ff:ff:ff:ff:ff link-netns nc-x-1-0";
        assert_eq!(
            parse_link(line, "d").unwrap(),
            (7, [0x8e, 0x2c, 0, 0x11, 0x22, 0x33])
        );
        assert!(parse_link("garbage", "d").is_err());
        assert!(neighbour_known(
            "198.18.1.2 lladdr 02:4e:43:00:01:02 REACHABLE\n"
        ));
        assert!(neighbour_known(
            "198.18.1.2 lladdr 02:4e:43:00:01:02 STALE\n"
        ));
        assert!(!neighbour_known("198.18.1.2 INCOMPLETE\n"));
        assert!(!neighbour_known(
            "198.18.1.2 lladdr 02:4e:43:00:01:02 FAILED\n"
        ));
        assert!(!neighbour_known(""));
    }

    #[test]
    fn a_bed_is_built_as_asked_and_removed_on_drop() {
        if skip() {
            return;
        }
        let _one = serial();
        let bed = Bed::builder("tb-build")
            .slot(slot(0))
            .v6(true)
            .offloads(Offloads::BothOff)
            .resolve_peer(true)
            .build()
            .unwrap();
        let (ns, host, peer) = (bed.ns().name().to_owned(), bed.host(), bed.peer());
        assert!(host.len() <= 15 && peer.len() <= 15, "{host} {peer}");
        assert!(namespaces().contains(&ns));
        let addrs = ip(&["-o", "addr", "show", "dev", host]).unwrap();
        assert!(addrs.contains(&format!("{}/24", bed.host4())), "{addrs}");
        assert!(
            addrs.contains(&format!("{}/112", bed.host6().unwrap())),
            "{addrs}"
        );
        let peer_addrs = bed.ns().ip(&["-o", "addr", "show", "dev", peer]).unwrap();
        assert!(peer_addrs.contains(&format!("{}/24", bed.peer4())));
        assert!(peer_addrs.contains(&format!("{}/112", bed.peer6().unwrap())));
        let peer_link = bed.ns().ip(&["-o", "link", "show", "dev", peer]).unwrap();
        assert_eq!(parse_link(&peer_link, peer).unwrap().1, bed.peer_mac());
        assert!(peer_link.contains("state UP") || peer_link.contains("LOWER_UP"));
        let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{host}/ifindex"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(bed.host_ifindex(), ifindex);
        let mac = std::fs::read_to_string(format!("/sys/class/net/{host}/address")).unwrap();
        assert_eq!(parse_mac(&mac), Some(bed.host_mac()));
        assert!(!offload::offload_state(host).unwrap().any_on());
        assert!(!offload::offload_state_in(&ns, peer).unwrap().any_on());
        let table = ip(&["neigh", "show", "to", &bed.peer4().to_string(), "dev", host]).unwrap();
        assert!(neighbour_known(&table), "{table}");
        // The peer is reachable from a process in its namespace.
        let out = bed.command("cat").arg("/proc/net/dev").output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(peer));
        let host = host.to_owned();
        drop(bed);
        assert!(!namespaces().contains(&ns));
        assert!(!link_exists(&host));
    }

    #[test]
    fn a_bed_is_removed_when_its_owner_panics() {
        if skip() {
            return;
        }
        let _one = serial();
        let names = std::sync::Mutex::new(None);
        let r = std::panic::catch_unwind(|| {
            let bed = Bed::builder("tb-panic").slot(slot(1)).build().unwrap();
            *names.lock().unwrap() = Some((bed.ns().name().to_owned(), bed.host().to_owned()));
            panic!("the test fails with its bed up");
        });
        assert!(r.is_err());
        let (ns, host) = names.lock().unwrap().take().unwrap();
        assert!(!namespaces().contains(&ns));
        assert!(!link_exists(&host));
    }

    #[test]
    fn a_failed_build_leaves_nothing_behind() {
        if skip() {
            return;
        }
        let _one = serial();
        let ours = || {
            let prefix = format!("nc{:07}", std::process::id());
            let links = ip(&["-o", "link", "show"]).unwrap();
            let links: Vec<String> = links
                .lines()
                .filter_map(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect();
            (namespaces(), links)
        };
        let before = ours();
        let mut b = Bed::builder("tb-fail").slot(slot(2)).v6(true);
        b.fail_at_the_end = true;
        let e = b.build().unwrap_err();
        assert!(matches!(e, BedError::Unsupported("injected")), "{e}");
        assert_eq!(ours(), before);
        assert!(matches!(
            Bed::builder("tb-fail").slot(999).build(),
            Err(BedError::Slot(999))
        ));
        assert!(matches!(
            Bed::builder("tb-fail")
                .resolve_peer(true)
                .host_in_netns(true)
                .build(),
            Err(BedError::Unsupported(_))
        ));
        assert_eq!(ours(), before);
    }

    #[test]
    fn a_bed_can_leave_this_namespace_alone() {
        if skip() {
            return;
        }
        let _one = serial();
        let bed = Bed::builder("tb-apart")
            .slot(slot(3))
            .host_in_netns(true)
            .build()
            .unwrap();
        let hns = bed.host_ns().unwrap().name().to_owned();
        assert!(!link_exists(bed.host()));
        let link = bed
            .host_ns()
            .unwrap()
            .ip(&["-o", "link", "show", "dev", bed.host()])
            .unwrap();
        assert_eq!(parse_link(&link, bed.host()).unwrap().1, bed.host_mac());
        // The peer answers a ping from the host end's namespace.
        let out = bed
            .host_ns()
            .unwrap()
            .command("ping")
            .args(["-c", "1", "-W", "2", &bed.peer4().to_string()])
            .output();
        if let Ok(out) = out {
            assert!(out.status.success(), "{out:?}");
        }
        drop(bed);
        assert!(!namespaces().contains(&hns));
    }

    #[test]
    fn names_are_unique_within_a_process() {
        if skip() {
            return;
        }
        let _one = serial();
        let a = Netns::new("tb-names").unwrap();
        let b = Netns::new("tb-names").unwrap();
        assert_ne!(a.name(), b.name());
        assert!(
            a.name()
                .starts_with(&format!("nc-tb-names-{}-", std::process::id()))
        );
        assert!(matches!(Netns::new("Bad Tag"), Err(BedError::Tag(_))));
    }
}
