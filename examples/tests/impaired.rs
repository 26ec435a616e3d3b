//! TCP on the user-space stack over an impaired link: the nexus's interface drops, duplicates
//! and reorders 1% of the frames in both directions (the fault layer of `netif::faults`), and
//! every stream must still arrive intact, both ways. Needs root; without it the test says it
//! skipped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netchannel_nexus::config::{Backend, InterfaceConfig};
use netchannel_nexus::netif::faults::FaultConfig;

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("iproute2");
    assert!(st.success(), "ip {args:?} failed");
}

/// Everything the test made, removed however it ends.
struct Bed {
    ns: String,
    host: String,
    socket: String,
    children: Vec<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Starts an example binary and waits for its `listening on` line.
fn start(bed: &mut Bed, exe: &str, args: &[&str]) {
    let mut c = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("an example binary");
    let out = c.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("a line");
    assert!(line.starts_with("listening on"), "{exe}: {line:?}");
    bed.children.push(c);
}

fn sha256_file(path: &str) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn streams_survive_loss_duplication_and_reordering_both_ways() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: needs root (network namespace, veth, XDP)");
        return;
    }
    let pid = std::process::id() % 10_000;
    let mut bed = Bed {
        ns: format!("nc-imp-{pid}"),
        host: format!("nci{pid}h"),
        socket: format!("/tmp/netchannel-impaired-{pid}.sock"),
        children: Vec::new(),
    };
    let peer = format!("nci{pid}p");
    ip(&["netns", "add", &bed.ns]);
    ip(&[
        "link", "add", &bed.host, "type", "veth", "peer", "name", &peer, "netns", &bed.ns,
    ]);
    ip(&["addr", "add", "198.18.9.1/24", "dev", &bed.host]);
    ip(&["link", "set", &bed.host, "up"]);
    let nsx = |args: &[&str]| {
        let mut full = vec!["netns", "exec", bed.ns.as_str(), "ip"];
        full.extend_from_slice(args);
        ip(&full);
    };
    nsx(&["link", "set", "lo", "up"]);
    nsx(&["addr", "add", "198.18.9.2/24", "dev", &peer]);
    nsx(&["link", "set", &peer, "up"]);
    netchannel_nexus::netns::offload::disable_offloads_in(&bed.ns, &peer).expect("offloads off");

    let faults = FaultConfig {
        seed: 42,
        drop: 0.01,
        duplicate: 0.01,
        reorder: 0.01,
        delay: 0.0,
        delay_us: 0,
    };
    let sw = netchannel_nexus::netif::open_impaired(
        &InterfaceConfig {
            name: bed.host.clone(),
            backend: Backend::Afxdp,
            xdp_mode: None,
            addresses: Vec::new(),
        },
        Some(faults),
    )
    .expect("AF_XDP on the veth");
    let mut cfg = netchannel_nexus::Config::default();
    cfg.control.socket = bed.socket.clone().into();
    let mut nexus = netchannel_nexus::Nexus::with_switch(cfg, sw).expect("a nexus");
    let stop = nexus.stop_flag();
    let daemon = std::thread::spawn(move || nexus.run());

    // Kernel → app: curl downloads 8 MiB from the example HTTP server.
    let dir = format!("/tmp/netchannel-impaired-{pid}");
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let file = format!("{dir}/data");
    let st = Command::new("head")
        .args(["-c", "8388608", "/dev/urandom"])
        .stdout(std::fs::File::create(&file).expect("file"))
        .status()
        .expect("head");
    assert!(st.success());
    let socket = bed.socket.clone();
    start(
        &mut bed,
        env!("CARGO_BIN_EXE_http_server"),
        &[
            "--socket",
            &socket,
            "--root",
            &dir,
            "--listen",
            "0.0.0.0:8080",
        ],
    );
    let got = format!("{dir}/got");
    let t0 = Instant::now();
    let st = Command::new("ip")
        .args([
            "netns", "exec", &bed.ns, "curl", "-sS", "-m", "60", "-o", &got,
        ])
        .arg("http://198.18.9.1:8080/data")
        .status()
        .expect("curl");
    assert!(st.success(), "curl failed over the impaired link");
    eprintln!(
        "8 MiB download over 1% loss/dup/reorder: {:?}",
        t0.elapsed()
    );
    assert_eq!(sha256_file(&got), sha256_file(&file), "download intact");

    // App → kernel: the example bulk sender uploads 8 MiB to a kernel server.
    let server = Command::new("ip")
        .args(["netns", "exec", &bed.ns, "python3", "-c"])
        .arg(
            "import socket, hashlib\n\
             s = socket.socket(); s.bind(('198.18.9.2', 9000)); s.listen(1)\n\
             print('ready', flush=True)\n\
             s.settimeout(60); c, _ = s.accept(); c.settimeout(60)\n\
             h = hashlib.sha256(); n = 0\n\
             while True:\n\
             \x20   b = c.recv(1 << 16)\n\
             \x20   if not b: break\n\
             \x20   h.update(b); n += len(b)\n\
             c.close()\n\
             print(n, h.hexdigest(), flush=True)\n",
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    bed.children.push(server);
    let out = bed
        .children
        .last_mut()
        .and_then(|c| c.stdout.take())
        .expect("stdout");
    let mut lines = BufReader::new(out).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    let sent = Command::new(env!("CARGO_BIN_EXE_tcp_bulk"))
        .args([
            "send",
            "--socket",
            &socket,
            "--to",
            "198.18.9.2:9000",
            "--bytes",
            "8388608",
        ])
        .output()
        .expect("tcp_bulk");
    assert!(
        sent.status.success(),
        "tcp_bulk send: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let sent = String::from_utf8_lossy(&sent.stdout);
    let sent_hash = sent
        .split_whitespace()
        .nth(3)
        .unwrap_or_default()
        .to_owned();
    let received = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(
        received,
        format!("8388608 {sent_hash}"),
        "upload intact ({sent})"
    );

    // The faults really happened, in both directions.
    let st = netchannel::nexus::Nexus::connect(&socket)
        .and_then(|mut n| n.status())
        .expect("status");
    let count = |k: &str| st.interface.iter().find(|(n, _)| n == k).map_or(0, |c| c.1);
    for k in ["faults_dropped", "faults_duplicated", "faults_reordered"] {
        assert!(count(k) > 10, "{k}: {:?}", st.interface);
    }
    let _ = std::fs::remove_dir_all(&dir);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(daemon.is_finished(), "the nexus stops");
}
