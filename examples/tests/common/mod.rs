//! The test bed shared by these tests: a namespace holding one end of a veth pair (the kernel
//! peer), the other end served by a nexus over AF_XDP in this process, all removed on drop.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netchannel_nexus::config::{Backend, InterfaceConfig};
use netchannel_nexus::netif::faults::FaultConfig;
use std::net::SocketAddr;

use netchannel_tests::testbed::{Kid, VethNet, run};

#[allow(unused_imports)] // not every test file uses it
pub(crate) use netchannel_tests::testbed::is_root;

/// Everything a test made, removed however it ends.
pub(crate) struct Bed {
    pub(crate) ns: String,
    pub(crate) socket: String,
    /// This host's end: 198.18.N.1.
    pub(crate) host_ip: String,
    /// The peer in the namespace: 198.18.N.2.
    pub(crate) peer_ip: String,
    /// This host's end's IPv6 address.
    pub(crate) host6: String,
    pub(crate) children: Vec<Child>,
    stop: Option<Arc<AtomicBool>>,
    daemon: Option<JoinHandle<Result<(), netchannel_nexus::NexusError>>>,
    // Last: the namespace goes once the processes in it are gone.
    _net: VethNet,
}

impl Bed {
    /// Builds the network `198.18.{net}.0/24` (peer offloads off) and starts a nexus on it,
    /// impaired by `faults` if given.
    pub(crate) fn new(tag: &str, net: u8, faults: Option<FaultConfig>) -> Self {
        let veth = VethNet::new(tag, u32::from(net));
        let sw = netchannel_nexus::datapath::open_impaired(
            &InterfaceConfig::new(veth.host().to_owned(), Backend::Afxdp),
            faults,
        )
        .expect("AF_XDP on the veth");
        let socket = format!("/tmp/netchannel-{tag}-{}.sock", std::process::id());
        let mut cfg = netchannel_nexus::Config::default();
        cfg.control.socket = socket.clone().into();
        let mut nexus = netchannel_nexus::Nexus::with_datapath(cfg, sw).expect("a nexus");
        Self {
            ns: veth.ns().name().to_owned(),
            socket,
            host_ip: veth.host4().to_string(),
            peer_ip: veth.peer4().to_string(),
            host6: veth.host6().to_string(),
            children: Vec::new(),
            stop: Some(nexus.stop_flag()),
            daemon: Some(std::thread::spawn(move || nexus.run())),
            _net: veth,
        }
    }

    /// Starts an example binary and waits for its `listening on` line.
    pub(crate) fn start(&mut self, exe: &str, args: &[&str]) {
        let mut c = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("an example binary");
        let out = c.stdout.take().expect("stdout");
        let mut out = BufReader::new(out);
        let mut line = String::new();
        out.read_line(&mut line).expect("a line");
        assert!(line.starts_with("listening on"), "{exe}: {line:?}");
        // The rest (a second `listening on`, for one): read, or the example's next print
        // would find the pipe closed and end it.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        self.children.push(c);
    }

    /// Runs python3 in the namespace; returns the child with its stdout piped.
    pub(crate) fn python(&mut self, script: &str) -> &mut Child {
        let c = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3", "-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        self.children.push(c);
        self.children.last_mut().expect("just pushed")
    }

    /// Stops the nexus and checks it stopped.
    pub(crate) fn stop_nexus(&mut self) {
        if let Some(s) = &self.stop {
            s.store(true, Ordering::Relaxed);
        }
        if let Some(d) = self.daemon.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !d.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(d.is_finished(), "the nexus stops");
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(s) = &self.stop {
            s.store(true, Ordering::Relaxed);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A nexus on the veth's host end (AF_XDP), running in a thread of this process; stopped and
/// joined on drop, its control socket removed.
pub(crate) struct InProcess {
    pub(crate) socket: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl InProcess {
    pub(crate) fn start(net: &VethNet, tag: &str) -> Self {
        Self::start_with(net, tag, |_| {})
    }

    /// Like [`InProcess::start`], with the config changed by `tune` first.
    pub(crate) fn start_with(
        net: &VethNet,
        tag: &str,
        tune: impl FnOnce(&mut netchannel_nexus::Config),
    ) -> Self {
        let socket = format!("/tmp/netchannel-examples-{}-{tag}.sock", std::process::id());
        let _ = std::fs::remove_file(&socket);
        let sw = netchannel_nexus::datapath::open(&InterfaceConfig::new(
            net.host().to_owned(),
            Backend::Afxdp,
        ))
        .expect("AF_XDP on the veth's host end");
        let mut cfg = netchannel_nexus::Config::default();
        cfg.control.socket = socket.clone().into();
        tune(&mut cfg);
        let mut nexus =
            netchannel_nexus::Nexus::with_datapath(cfg, sw).expect("a nexus on the veth");
        let stop = nexus.stop_flag();
        let thread = std::thread::spawn(move || nexus.run().expect("the nexus runs"));
        Self {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    /// A control connection (as an app makes).
    pub(crate) fn control(&self) -> netchannel::nexus::Nexus {
        let t0 = Instant::now();
        loop {
            match netchannel::nexus::Nexus::connect(&self.socket) {
                Ok(n) => return n,
                Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                    panic!("no nexus on {}: {e}", self.socket)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// An interface counter of `status` (0 if absent: counters of drops are listed once they
    /// are not 0).
    pub(crate) fn counter(&self, name: &str) -> u64 {
        let st = self.control().status().expect("status");
        st.interface
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v)
    }

    pub(crate) fn stack(&self) -> netchannel::stack::Stack {
        netchannel::stack::Stack::connect(&self.socket).expect("a stack on the nexus")
    }
}

impl InProcess {
    /// Stops the nexus and waits for its thread (`Err`: the thread panicked).
    pub(crate) fn stop(&mut self) -> std::thread::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(Ok(()), JoinHandle::join)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A scratch directory under /tmp, removed on drop.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/tmp/netchannel-examples-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("a scratch directory");
        Self(p)
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub(crate) fn str(&self) -> &str {
        self.0.to_str().expect("a UTF-8 path")
    }

    /// The names it holds, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("a scratch directory")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SHA-256 of each file, in hex and in order, from one `sha256sum` (fast even when the test
/// is a debug build).
pub(crate) fn sha256_all<P: AsRef<std::path::Path>>(
    paths: impl IntoIterator<Item = P>,
) -> Vec<String> {
    let paths: Vec<P> = paths.into_iter().collect();
    let out = Command::new("sha256sum")
        .args(paths.iter().map(AsRef::as_ref))
        .output()
        .expect("sha256sum");
    assert!(
        out.status.success(),
        "sha256sum: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sums: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(sums.len(), paths.len(), "a hash per file");
    sums
}

/// SHA-256 of a file, in hex.
pub(crate) fn sha256_file(path: impl AsRef<std::path::Path>) -> String {
    sha256_all([path]).remove(0)
}

/// Starts an example app and waits until it has printed `lines` lines `listening on ADDR`;
/// returns it and the ADDRs.
pub(crate) fn app(what: &str, bin: &str, args: &[&str], lines: usize) -> (Kid, Vec<SocketAddr>) {
    let mut kid = Kid::spawn(Command::new(bin).args(args), what);
    let addrs = (0..lines)
        .map(|_| {
            let line = kid.expect_line("listening on ", Duration::from_secs(10));
            line["listening on ".len()..]
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{what} said {line:?}"))
        })
        .collect();
    (kid, addrs)
}

/// Has the host's kernel resolve the peer's MAC address for both families (a datagram from a
/// kernel socket to the peer's discard port) and waits until its neighbour table has both.
///
/// The nexus drops what an app sends to a neighbour the kernel has not resolved yet (it asks
/// the kernel to resolve it and counts `tx_no_neighbour`; see `stack_veth`'s
/// `the_first_datagram_an_app_sends_to_a_new_neighbour_arrives`), so tests about something
/// else start with the neighbours known, as on a host that has talked to its peer before.
pub(crate) fn warm_neighbours(net: &VethNet) {
    let u4 = std::net::UdpSocket::bind((net.host4(), 0)).expect("a kernel UDP socket");
    let u6 = std::net::UdpSocket::bind((net.host6(), 0)).expect("a kernel UDP socket");
    let t0 = Instant::now();
    loop {
        u4.send_to(b"hello", (net.peer4(), 9))
            .expect("sending to the peer");
        u6.send_to(b"hello", (net.peer6(), 9))
            .expect("sending to the peer");
        std::thread::sleep(Duration::from_millis(50));
        let out = run("ip", &["neigh", "show", "dev", net.host()]);
        let table = String::from_utf8_lossy(&out.stdout);
        let known = |ip: String| {
            table
                .lines()
                .any(|l| l.starts_with(&format!("{ip} ")) && l.contains("lladdr"))
        };
        if known(net.peer4().to_string()) && known(net.peer6().to_string()) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the host did not resolve its peer: {table}"
        );
    }
}
