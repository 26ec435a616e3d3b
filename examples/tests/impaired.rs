//! TCP on the user-space stack over an impaired link: the nexus's interface drops, duplicates
//! and reorders 1% of the frames in both directions (the fault layer of `netif::faults`), and
//! every stream must still arrive intact, both ways. Needs root; without it the test says it
//! skipped.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Instant;

use common::{Bed, sha256_file};
use netchannel_nexus::netif::faults::FaultConfig;

#[test]
fn streams_survive_loss_duplication_and_reordering_both_ways() {
    if !common::is_root() {
        eprintln!("SKIPPED: needs root (network namespace, veth, XDP)");
        return;
    }
    let faults = FaultConfig {
        seed: 42,
        drop: 0.01,
        duplicate: 0.01,
        reorder: 0.01,
        delay: 0.0,
        delay_us: 0,
    };
    let mut bed = Bed::new("imp", 9, Some(faults));
    let socket = bed.socket.clone();

    // Kernel → app: curl downloads 8 MiB from the example HTTP server.
    let dir = format!("/tmp/netchannel-impaired-{}", std::process::id());
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let file = format!("{dir}/data");
    let st = Command::new("head")
        .args(["-c", "8388608", "/dev/urandom"])
        .stdout(std::fs::File::create(&file).expect("file"))
        .status()
        .expect("head");
    assert!(st.success());
    bed.start(
        env!("CARGO_BIN_EXE_http_server"),
        &["--socket", &socket, "--root", &dir, "--listen", "[::]:8080"],
    );
    // Over IPv4, then IPv6 (issue 17 found v6 three times slower than the kernel there).
    let urls = [
        ("IPv4", format!("http://{}:8080/data", bed.host_ip)),
        ("IPv6", format!("http://[{}]:8080/data", bed.host6)),
    ];
    for (family, url) in urls {
        let got = format!("{dir}/got");
        let _ = std::fs::remove_file(&got);
        let t0 = Instant::now();
        let st = Command::new("ip")
            .args([
                "netns", "exec", &bed.ns, "curl", "-sS", "-g", "-m", "60", "-o", &got, &url,
            ])
            .status()
            .expect("curl");
        assert!(
            st.success(),
            "curl failed over the impaired link ({family})"
        );
        eprintln!(
            "8 MiB download over {family} with 1% loss/dup/reorder: {:?}",
            t0.elapsed()
        );
        assert_eq!(
            sha256_file(&got),
            sha256_file(&file),
            "download intact ({family})"
        );
    }

    // App → kernel: the example bulk sender uploads 8 MiB to a kernel server.
    let script = format!(
        "import socket, hashlib\n\
         s = socket.socket(); s.bind(('{}', 9000)); s.listen(1)\n\
         print('ready', flush=True)\n\
         s.settimeout(60); c, _ = s.accept(); c.settimeout(60)\n\
         h = hashlib.sha256(); n = 0\n\
         while True:\n\
         \x20   b = c.recv(1 << 16)\n\
         \x20   if not b: break\n\
         \x20   h.update(b); n += len(b)\n\
         c.close()\n\
         print(n, h.hexdigest(), flush=True)\n",
        bed.peer_ip
    );
    let out = bed.python(&script).stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    let to = format!("{}:9000", bed.peer_ip);
    let sent = Command::new(env!("CARGO_BIN_EXE_tcp_bulk"))
        .args([
            "send", "--socket", &socket, "--to", &to, "--bytes", "8388608",
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

    // The faults really happened.
    let st = netchannel::nexus::Nexus::connect(&socket)
        .and_then(|mut n| n.status())
        .expect("status");
    let count = |k: &str| st.interface.iter().find(|(n, _)| n == k).map_or(0, |c| c.1);
    for k in ["faults_dropped", "faults_duplicated", "faults_reordered"] {
        assert!(count(k) > 10, "{k}: {:?}", st.interface);
    }
    let _ = std::fs::remove_dir_all(&dir);
    bed.stop_nexus();
}
