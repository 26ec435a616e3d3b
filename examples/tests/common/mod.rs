//! The test bed shared by these tests: a namespace holding one end of a veth pair (the kernel
//! peer), the other end served by a nexus over AF_XDP in this process, all removed on drop.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netchannel_nexus::config::{Backend, InterfaceConfig};
use netchannel_nexus::netif::faults::FaultConfig;

pub(crate) fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("iproute2");
    assert!(st.success(), "ip {args:?} failed");
}

pub(crate) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Everything a test made, removed however it ends.
pub(crate) struct Bed {
    pub(crate) ns: String,
    pub(crate) host: String,
    pub(crate) socket: String,
    /// This host's end: 198.18.N.1.
    pub(crate) host_ip: String,
    /// The peer in the namespace: 198.18.N.2.
    pub(crate) peer_ip: String,
    pub(crate) children: Vec<Child>,
    stop: Option<Arc<AtomicBool>>,
    daemon: Option<JoinHandle<Result<(), netchannel_nexus::NexusError>>>,
}

impl Bed {
    /// Builds the network `198.18.{net}.0/24` (peer offloads off) and starts a nexus on it,
    /// impaired by `faults` if given.
    pub(crate) fn new(tag: &str, net: u8, faults: Option<FaultConfig>) -> Self {
        let pid = std::process::id() % 10_000;
        let mut bed = Self {
            ns: format!("nc-{tag}-{pid}"),
            host: format!("nc{tag}{pid}h"),
            socket: format!("/tmp/netchannel-{tag}-{pid}.sock"),
            host_ip: format!("198.18.{net}.1"),
            peer_ip: format!("198.18.{net}.2"),
            children: Vec::new(),
            stop: None,
            daemon: None,
        };
        let peer = format!("nc{tag}{pid}p");
        ip(&["netns", "add", &bed.ns]);
        ip(&[
            "link", "add", &bed.host, "type", "veth", "peer", "name", &peer, "netns", &bed.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", bed.host_ip),
            "dev",
            &bed.host,
        ]);
        ip(&["link", "set", &bed.host, "up"]);
        let nsx = |args: &[&str]| {
            let mut full = vec!["netns", "exec", bed.ns.as_str(), "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        nsx(&["link", "set", "lo", "up"]);
        nsx(&["addr", "add", &format!("{}/24", bed.peer_ip), "dev", &peer]);
        nsx(&["link", "set", &peer, "up"]);
        netchannel_nexus::netns::offload::disable_offloads_in(&bed.ns, &peer)
            .expect("offloads off");
        let sw = netchannel_nexus::netif::open_impaired(
            &InterfaceConfig::new(bed.host.clone(), Backend::Afxdp),
            faults,
        )
        .expect("AF_XDP on the veth");
        let mut cfg = netchannel_nexus::Config::default();
        cfg.control.socket = bed.socket.clone().into();
        let mut nexus = netchannel_nexus::Nexus::with_switch(cfg, sw).expect("a nexus");
        bed.stop = Some(nexus.stop_flag());
        bed.daemon = Some(std::thread::spawn(move || nexus.run()));
        bed
    }

    /// Starts an example binary and waits for its `listening on` line.
    pub(crate) fn start(&mut self, exe: &str, args: &[&str]) {
        let mut c = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("an example binary");
        let out = c.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("a line");
        assert!(line.starts_with("listening on"), "{exe}: {line:?}");
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
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.socket);
    }
}
