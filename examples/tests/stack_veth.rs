//! The example apps and the user-space stack against kernel peers, over a real AF_XDP nexus.
//!
//! The bed: a network namespace holding one end of a veth pair (the kernel peer: python3,
//! curl); the other end stays in the host namespace, where a nexus runs in a thread of this
//! process over AF_XDP on it. Apps are the example binaries (`http_server`, `udp_echo`,
//! `tcp_bulk`) or a [`Stack`] in this process. Needs root; without root every test says it
//! skipped.
//!
//! Every test makes its own namespace, veth pair, control socket and scratch directory (names
//! from this process's id and the test's number; addresses in 198.19.0.0/16 and
//! fd00:198:18::/64 only) and removes them in guards, however it ends; child processes are
//! killed in guards too. Every wait has a time bound. The tests run one at a time ([`serial`]):
//! the machine has two cores and the nexus polls.
//!
//! * `http_server_serves_...`: curl downloads 0 B, 1 KiB, 10 MiB and 100 MiB intact.
//! * `tcp_bulk_...`: 100 MiB each way between a kernel peer and an app, hashes equal.
//! * `http_server_serves_50_concurrent_...`: 50 connections open at once, all served.
//! * `connect_to_a_closed_port_...`, `a_reset_...`, `half_close_...`, `read_timeouts_...`: the
//!   library's TCP and UDP errors and half-close behave as kernel sockets do.
//! * `udp_echo_...`, `an_app_udp_socket_...`: datagrams both ways, both families, intact.
//! * `an_app_killed_mid_transfer_...`: what the peer sees, and that the nexus lets go.
//! * `the_first_datagram_...`, `datagrams_sent_just_before_...`: nothing lost to a cold
//!   neighbour cache or to a socket dropped at once.
//! * `half_open_handshakes_...`, `an_established_connection_waits_...`: the backlog's
//!   handshake timeout frees it from spoofed SYNs and spares connections waiting for accept.
//! * `blocked_calls_fail_...`: a nexus that stops fails the app's blocked and later calls with
//!   NotConnected, within moments.
//!
//! The bed (namespace, veth pair, child processes) is `netchannel_tests::testbed`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use netchannel::stack::{TcpStream, UdpSocket};
use netchannel_tests::testbed::{Kid, VethNet, serial, skip_without_root};

mod common;
use common::{InProcess, Scratch, sha256_file, warm_neighbours};

const HTTP_SERVER: &str = env!("CARGO_BIN_EXE_http_server");
const UDP_ECHO: &str = env!("CARGO_BIN_EXE_udp_echo");
const TCP_BULK: &str = env!("CARGO_BIN_EXE_tcp_bulk");

/// Bound for anything that should take milliseconds.
const SHORT: Duration = Duration::from_secs(10);
/// Bound for a 100 MiB transfer (debug builds of the apps and the nexus).
const BULK: Duration = Duration::from_secs(300);
const MIB: usize = 1 << 20;

fn skip() -> bool {
    skip_without_root("network namespace, veth pair, XDP and AF_XDP")
}

/// Test `n`'s network (`n` < 16): its own slot of the bed, 256 + 16 × (pid mod 15) + `n` (a
/// /24 of 198.19.0.0/16), so that the tests of concurrent runs do not collide.
struct Net(VethNet);

impl std::ops::Deref for Net {
    type Target = VethNet;
    fn deref(&self) -> &VethNet {
        &self.0
    }
}

impl Net {
    fn new(n: u32) -> Self {
        assert!(n < 16);
        let k = 256 + 16 * (std::process::id() % 15) + n;
        Self(VethNet::new("stack", k))
    }
}

/// `len` random bytes (the kernel's getrandom).
fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = rustix::rand::getrandom(&mut v[done..], rustix::rand::GetRandomFlags::empty())
            .expect("getrandom");
        done += n;
    }
    v
}

/// Writes a file of `len` random bytes.
fn random_file(path: &Path, len: usize) {
    let mut f = std::fs::File::create(path).expect("creating a file");
    let mut left = len;
    while left > 0 {
        let n = left.min(4 * MIB);
        f.write_all(&random_bytes(n)).expect("writing a file");
        left -= n;
    }
}

/// Starts an example app and waits until it prints `listening on ADDR`; returns it and ADDR.
fn app(what: &str, bin: &str, args: &[&str]) -> (Kid, SocketAddr) {
    let mut kid = Kid::spawn(Command::new(bin).args(args), what);
    let line = kid.expect_line("listening on ", SHORT);
    let addr = line["listening on ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what} said {line:?}"));
    (kid, addr)
}

/// Starts the example HTTP server on `nexus`, serving `root` on an ephemeral port.
fn http_server(nexus: &InProcess, root: &Scratch) -> (Kid, SocketAddr) {
    app(
        "http_server",
        HTTP_SERVER,
        &[
            "--socket",
            &nexus.socket,
            "--root",
            root.str(),
            "--listen",
            "0.0.0.0:0",
        ],
    )
}

/// The words of a line, for the lines our scripts and the apps print.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn rate(bytes: usize, d: Duration) -> String {
    let s = d.as_secs_f64().max(1e-9);
    format!(
        "{:.1} MiB/s, {:.3} Gbit/s",
        bytes as f64 / s / MIB as f64,
        bytes as f64 * 8.0 / s / 1e9
    )
}

/// The nexus's counters that are not zero (interface and channels), for failure messages.
fn counters(control: &mut netchannel::nexus::Nexus) -> String {
    let st = control.status().expect("the nexus's status");
    let mut out = String::from("interface:");
    for (k, v) in st.interface.iter().filter(|(_, v)| *v > 0) {
        out.push_str(&format!(" {k}={v}"));
    }
    for c in &st.channels {
        out.push_str(&format!(
            "; channel {} (pid {}): tx_packets={} rx_packets={}, drops:",
            c.id, c.pid, c.tx_packets, c.rx_packets
        ));
        for (k, v) in c.drops.iter().filter(|(_, v)| *v > 0) {
            out.push_str(&format!(" {k}={v}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. HTTP downloads.

#[test]
fn http_server_serves_0b_1kib_10mib_and_100mib_files_to_curl_intact() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(1);
    let nexus = InProcess::start(&net.0, "http");
    let root = Scratch::new("http-root");
    let got = Scratch::new("http-got");
    let files = [
        ("empty", 0),
        ("one-kib", 1024),
        ("ten-mib", 10 * MIB),
        ("hundred-mib", 100 * MIB),
    ];
    for (name, len) in files {
        random_file(&root.join(name), len);
    }
    let (mut server, addr) = http_server(&nexus, &root);
    assert!(addr.port() != 0, "a real port: {addr}");
    for (name, len) in files {
        let out = got.join(name);
        let url = format!("http://{}:{}/{name}", net.host4(), addr.port());
        let t0 = Instant::now();
        let curl = net.exec(
            "curl",
            "curl",
            &[
                "-sS",
                "--max-time",
                "300",
                "-o",
                out.to_str().unwrap(),
                "-w",
                "%{http_code} %{size_download}\\n",
                &url,
            ],
        );
        let lines = curl.succeed(BULK);
        let took = t0.elapsed();
        assert_eq!(
            lines,
            vec![format!("200 {len}")],
            "curl's status and size for {name}"
        );
        // curl 7.x leaves no file for an empty body; then what it saved is nothing.
        let want = sha256_file(root.join(name));
        let have = if out.exists() || len > 0 {
            sha256_file(&out)
        } else {
            sha256_file(Path::new("/dev/null"))
        };
        assert_eq!(have, want, "{name}: what curl saved is the file");
        eprintln!(
            "http_server -> curl: {name} ({len} B) in {took:.3?} ({})",
            rate(len, took)
        );
    }
    assert!(server.exited().is_none(), "http_server still serving");
}

// ---------------------------------------------------------------------------------------------
// 2. 100 MiB each way.

const UPLOAD_100MIB: &str = r"
import socket, os, hashlib, time
data = os.urandom(@N@)
s = socket.create_connection(('@HOST@', @PORT@), timeout=60)
t0 = time.time()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
took = time.time() - t0
# The app closes once it has read everything: wait for that (bounded).
s.settimeout(10)
try:
    end = 'eof' if s.recv(1) == b'' else 'data'
except socket.timeout:
    end = 'silence'
except ConnectionResetError:
    end = 'reset'
print('sent', len(data), hashlib.sha256(data).hexdigest(), '%.3f' % took, end, flush=True)
";

const SINK_SERVER: &str = r"
import socket, hashlib, time
srv = socket.socket(socket.@FAM@, socket.SOCK_STREAM)
srv.bind(('@HOST@', 0))
srv.listen(1)
srv.settimeout(30)
print('port', srv.getsockname()[1], flush=True)
c, peer = srv.accept()
c.settimeout(60)
h, n, t0 = hashlib.sha256(), 0, time.time()
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
took = time.time() - t0
c.close()
print('received', n, h.hexdigest(), '%.3f' % took, flush=True)
";

#[test]
fn tcp_bulk_100mib_from_a_kernel_client_and_to_a_kernel_server_intact() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(2);
    let nexus = InProcess::start(&net.0, "bulk");
    const N: usize = 100 * MIB;

    let (sent, r, wall) = kernel_uploads_to_app(&net, &nexus, "0.0.0.0:0", net.host4().into(), N);
    let s = words(&sent);
    eprintln!(
        "kernel -> app, 100 MiB: python's sendall {} s, {wall:.3?} wall ({}); app: {r}; the \
         app's close seen by python as {}",
        s[3],
        rate(N, wall),
        s[4]
    );
    assert_eq!(s[4], "eof", "the app's FIN reached python once it was done");

    let (got, s, wall) = app_sends_to_kernel(&net, &nexus, "AF_INET", net.peer4().into(), N);
    eprintln!(
        "app -> kernel, 100 MiB: {wall:.3?} wall ({}); python's receive {} s; app: {s}",
        rate(N, wall),
        words(&got)[3]
    );
    // Both offloads did the work: segments were coalesced on the way in, and the app's large
    // packets cut on the way out (100 MiB is about 72 000 segments each way).
    let coalesced = interface_counter(&nexus.socket, "rx_coalesced");
    let segmented = interface_counter(&nexus.socket, "tx_segmented");
    eprintln!("offloads: rx_coalesced {coalesced}, tx_segmented {segmented}");
    assert!(
        coalesced > 10_000,
        "receive coalescing merged {coalesced} segments"
    );
    assert!(segmented > 1_000, "segmentation cut {segmented} packets");
}

/// A kernel client (python, in the namespace) uploads `n` random bytes to `tcp_bulk recv` on
/// the stack, listening on `listen` and reached at `host`; checks that every byte came, with
/// python's hash. Returns python's `sent` line, the app's `received` line and the wall time.
fn kernel_uploads_to_app(
    net: &Net,
    nexus: &InProcess,
    listen: &str,
    host: IpAddr,
    n: usize,
) -> (String, String, Duration) {
    let (recv, addr) = app(
        "tcp_bulk recv",
        TCP_BULK,
        &["recv", "--socket", &nexus.socket, "--listen", listen],
    );
    let t0 = Instant::now();
    let mut client = net.python(
        "the python client",
        UPLOAD_100MIB,
        &[
            ("N", n.to_string()),
            ("HOST", host.to_string()),
            ("PORT", addr.port().to_string()),
        ],
    );
    let sent = client.expect_line("sent ", BULK);
    let wall = t0.elapsed();
    let received = recv.succeed(SHORT);
    let _ = client.succeed(SHORT);
    let s = words(&sent);
    assert_eq!(s[1], n.to_string(), "python sent it all: {sent}");
    let r = received
        .iter()
        .find(|l| l.starts_with("received "))
        .unwrap_or_else(|| panic!("tcp_bulk recv's report: {received:?}"))
        .clone();
    let rw = words(&r);
    assert_eq!(
        rw[1],
        n.to_string(),
        "tcp_bulk recv got every byte over {host}: {r}"
    );
    assert_eq!(rw[3], s[2], "what the app hashed is what python sent");
    (sent, r, wall)
}

/// `tcp_bulk send` on the stack sends `n` bytes to a kernel sink (python, socket family
/// `fam`) at `peer`; checks that python got every byte, with the app's hash. Returns python's
/// `received` line, the app's `sent` line and the wall time.
fn app_sends_to_kernel(
    net: &Net,
    nexus: &InProcess,
    fam: &str,
    peer: IpAddr,
    n: usize,
) -> (String, String, Duration) {
    let mut server = net.python(
        "the python server",
        SINK_SERVER,
        &[("FAM", fam.into()), ("HOST", peer.to_string())],
    );
    let port: u16 = words(&server.expect_line("port ", SHORT))[1]
        .parse()
        .expect("a port");
    let t0 = Instant::now();
    let to = SocketAddr::new(peer, port).to_string();
    let sender = Kid::spawn(
        Command::new(TCP_BULK).args([
            "send",
            "--socket",
            &nexus.socket,
            "--to",
            &to,
            "--bytes",
            &n.to_string(),
        ]),
        "tcp_bulk send",
    );
    let got = server.expect_line("received ", BULK);
    let wall = t0.elapsed();
    let sent = sender.succeed(SHORT);
    let _ = server.succeed(SHORT);
    let s = sent
        .iter()
        .find(|l| l.starts_with("sent "))
        .unwrap_or_else(|| panic!("tcp_bulk send's report: {sent:?}"))
        .clone();
    let (sw, g) = (words(&s), words(&got));
    assert_eq!(sw[1], n.to_string(), "tcp_bulk send sent it all: {s}");
    assert_eq!(
        g[1],
        n.to_string(),
        "python received every byte over {peer}: {got}"
    );
    assert_eq!(g[2], sw[3], "what python hashed is what the app sent");
    (got, s, wall)
}

/// The same both ways over IPv6 (16 MiB each): segmentation and coalescing with 40-byte IP
/// headers and the IPv6 MSS.
#[test]
fn tcp_bulk_over_ipv6_both_ways_intact() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(14);
    let nexus = InProcess::start(&net.0, "bulk6");
    const N: usize = 16 * MIB;
    kernel_uploads_to_app(&net, &nexus, "[::]:0", net.host6().into(), N);
    app_sends_to_kernel(&net, &nexus, "AF_INET6", net.peer6().into(), N);
    let segmented = interface_counter(&nexus.socket, "tx_segmented");
    let coalesced = interface_counter(&nexus.socket, "rx_coalesced");
    assert!(
        segmented > 100 && coalesced > 1_000,
        "offloads over IPv6: segmented {segmented}, coalesced {coalesced}"
    );
}

/// One of the nexus's interface counters, from its status.
fn interface_counter(socket: &str, name: &str) -> u64 {
    let mut c = netchannel::nexus::Nexus::connect(socket).expect("the nexus's control socket");
    let status = c.status().expect("the nexus's status");
    status
        .interface
        .iter()
        .find(|(k, _)| k == name)
        .map_or(0, |(_, v)| *v)
}

// ---------------------------------------------------------------------------------------------
// 3. 50 connections at once.

const FIFTY_CLIENTS: &str = r"
import socket, threading
N, root, host, port = @N@, '@ROOT@', '@HOST@', @PORT@
connected = threading.Barrier(N, timeout=30)
res = [None] * N
def one(i):
    try:
        want = open('%s/f%d' % (root, i), 'rb').read()
        s = socket.create_connection((host, port), timeout=30)
        # Every connection is open before any request goes.
        connected.wait()
        s.sendall(b'GET /f%d HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n' % i)
        data = b''
        while True:
            x = s.recv(65536)
            if not x:
                break
            data += x
        s.close()
        head, _, body = data.partition(b'\r\n\r\n')
        status = head.split(b'\r\n')[0]
        if not status.startswith(b'HTTP/1.1 200 '):
            res[i] = 'status %r' % status
        elif body != want:
            res[i] = 'body of %d bytes, want %d' % (len(body), len(want))
        else:
            res[i] = 'ok'
    except Exception as e:
        res[i] = 'error %r' % e
ts = [threading.Thread(target=one, args=(i,)) for i in range(N)]
for t in ts:
    t.start()
for t in ts:
    t.join(60)
print('ok', sum(r == 'ok' for r in res), flush=True)
for i, r in enumerate(res):
    if r != 'ok':
        print('failed', i, r, flush=True)
";

#[test]
fn http_server_serves_50_concurrent_connections() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(3);
    let nexus = InProcess::start(&net.0, "fifty");
    let root = Scratch::new("fifty");
    const N: usize = 50;
    for i in 0..N {
        random_file(&root.join(&format!("f{i}")), 20_000 + i * 997);
    }
    let (mut server, addr) = http_server(&nexus, &root);
    let t0 = Instant::now();
    let lines = net
        .python(
            "the 50 python clients",
            FIFTY_CLIENTS,
            &[
                ("N", N.to_string()),
                ("ROOT", root.str().to_owned()),
                ("HOST", net.host4().to_string()),
                ("PORT", addr.port().to_string()),
            ],
        )
        .succeed(Duration::from_secs(120));
    eprintln!("50 concurrent connections served in {:.3?}", t0.elapsed());
    assert_eq!(
        lines.first().map(String::as_str),
        Some("ok 50"),
        "every connection got 200 and its file: {lines:?}; http_server said: {}",
        server.stderr()
    );
    assert!(server.exited().is_none(), "http_server still serving");
}

// ---------------------------------------------------------------------------------------------
// 4. The library's TCP errors, half-close and read timeouts, in this process.

/// Waits (at most 2 s) until the nexus lists no flow; returns how long that took.
fn no_flows_within(control: &mut netchannel::nexus::Nexus, bound: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let flows = control.flows().expect("the nexus's flows");
        if flows.is_empty() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < bound, "flows left {bound:?} on: {flows:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn connect_to_a_closed_port_is_refused_on_both_families() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(4);
    let nexus = InProcess::start(&net.0, "refused");
    let mut control = nexus.control();
    let stack = nexus.stack();
    // With the peer unresolved the first SYN is dropped and the refusal comes a retransmission
    // later (1 s, IPv6 3 s); that is another test's business.
    warm_neighbours(&net);
    // Nothing listens on port 9 in the fresh namespace: the peer's kernel answers RST.
    for to in [
        SocketAddr::new(net.peer4().into(), 9),
        SocketAddr::new(net.peer6().into(), 9),
    ] {
        let t0 = Instant::now();
        let e = TcpStream::connect_timeout(&stack, to, SHORT)
            .err()
            .unwrap_or_else(|| panic!("connected to {to}, where nothing listens"));
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{to}: {e}");
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "refused at once, not after {:?}",
            t0.elapsed()
        );
        // The same without a time limit.
        let e = TcpStream::connect(&stack, to)
            .err()
            .unwrap_or_else(|| panic!("connected to {to}, where nothing listens"));
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{to}: {e}");
    }
    // The refused connections' flows went with them.
    no_flows_within(&mut control, Duration::from_secs(2));
}

const RESET_SERVER: &str = r"
import socket, struct
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(('@HOST@', 0))
srv.listen(1)
srv.settimeout(10)
print('port', srv.getsockname()[1], flush=True)
c, peer = srv.accept()
c.settimeout(10)
got = c.recv(100)
# An abortive close: RST, not FIN.
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
c.close()
print('reset after', got.decode(), flush=True)
";

#[test]
fn a_reset_from_the_kernel_peer_fails_the_apps_read_with_connection_reset() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(5);
    let nexus = InProcess::start(&net.0, "reset");
    let mut control = nexus.control();
    let stack = nexus.stack();
    let mut server = net.python(
        "the resetting python server",
        RESET_SERVER,
        &[("HOST", net.peer4().to_string())],
    );
    let port: u16 = words(&server.expect_line("port ", SHORT))[1]
        .parse()
        .unwrap();
    let to = SocketAddr::new(net.peer4().into(), port);
    let mut conn = TcpStream::connect_timeout(&stack, to, SHORT).expect("connected");
    assert_eq!(conn.peer_addr().unwrap(), to);
    assert_eq!(conn.local_addr().unwrap().ip(), IpAddr::V4(net.host4()));
    conn.set_read_timeout(Some(SHORT)).unwrap();
    conn.write_all(b"hello").unwrap();
    assert_eq!(
        server.expect_line("reset after", SHORT),
        "reset after hello"
    );
    let mut buf = [0u8; 64];
    let e = conn
        .read(&mut buf)
        .expect_err("a read after the peer's RST");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    // And writing fails too (a kernel socket says EPIPE or ECONNRESET).
    let e = conn
        .write(b"more")
        .expect_err("a write after the peer's RST");
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        "{e}"
    );
    let _ = server.succeed(SHORT);
    drop(conn);
    no_flows_within(&mut control, Duration::from_secs(2));
}

const HALF_CLOSE_SERVER: &str = r"
import socket
srv = socket.socket(socket.@FAM@, socket.SOCK_STREAM)
srv.bind(('@HOST@', 0))
srv.listen(1)
srv.settimeout(10)
print('port', srv.getsockname()[1], flush=True)
c, peer = srv.accept()
c.settimeout(10)
got = b''
while True:
    b = c.recv(65536)
    if not b:
        break
    got += b
print('eof after', got.decode(), flush=True)
c.sendall(b'reply after your FIN to: ' + got)
c.close()
";

#[test]
fn half_close_the_peer_sees_eof_and_still_replies_on_both_families() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(6);
    let nexus = InProcess::start(&net.0, "halfclose");
    let mut control = nexus.control();
    let stack = nexus.stack();
    for (fam, peer) in [
        ("AF_INET", IpAddr::V4(net.peer4())),
        ("AF_INET6", IpAddr::V6(net.peer6())),
    ] {
        let mut server = net.python(
            "the half-closing python server",
            HALF_CLOSE_SERVER,
            &[("FAM", fam.into()), ("HOST", peer.to_string())],
        );
        let port: u16 = words(&server.expect_line("port ", SHORT))[1]
            .parse()
            .unwrap();
        let to = SocketAddr::new(peer, port);
        let mut conn = TcpStream::connect_timeout(&stack, to, SHORT).expect("connected");
        conn.set_read_timeout(Some(SHORT)).unwrap();
        conn.write_all(b"the request").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        // The peer saw the end of what we send (and only then replies).
        assert_eq!(
            server.expect_line("eof after", SHORT),
            "eof after the request",
            "{fam}"
        );
        // Writing after shutdown(Write) is a broken pipe, as with a kernel socket.
        let e = conn
            .write(b"more")
            .expect_err("a write after shutdown(Write)");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{fam}: {e}");
        // The reply still comes, then the end.
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply).expect("the reply, then EOF");
        assert_eq!(reply, b"reply after your FIN to: the request", "{fam}");
        let mut buf = [0u8; 16];
        assert_eq!(conn.read(&mut buf).unwrap(), 0, "{fam}: EOF stays EOF");
        let _ = server.succeed(SHORT);
        drop(conn);
    }
    no_flows_within(&mut control, Duration::from_secs(2));
}

const IDLE_ECHO_SERVER: &str = r"
import socket
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(('@HOST@', 0))
srv.listen(1)
srv.settimeout(10)
print('port', srv.getsockname()[1], flush=True)
c, peer = srv.accept()
c.settimeout(20)
# Says nothing until spoken to; then echoes.
while True:
    b = c.recv(65536)
    if not b:
        break
    c.sendall(b)
print('closed', flush=True)
";

/// Asserts a read that timed out: `WouldBlock` (Linux's EAGAIN for SO_RCVTIMEO) after about
/// 200 ms.
/// `op` fails with WouldBlock every time, in well under the 200 µs a blocking call may spin
/// (median of 50 calls under 50 µs).
fn assert_would_block_at_once<T: std::fmt::Debug>(
    what: &str,
    mut op: impl FnMut() -> io::Result<T>,
) {
    let mut took: Vec<Duration> = (0..50)
        .map(|_| {
            let t0 = Instant::now();
            let e = op().expect_err(what);
            let d = t0.elapsed();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{what}: {e}");
            d
        })
        .collect();
    took.sort_unstable();
    assert!(
        took[25] < Duration::from_micros(50),
        "{what}: WouldBlock took {:?} (median), not at once",
        took[25]
    );
}

fn assert_timed_out<T: std::fmt::Debug>(what: &str, r: io::Result<T>, took: Duration) {
    let e = r.expect_err(what);
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{what}: {e}");
    assert!(
        took >= Duration::from_millis(195) && took < Duration::from_secs(1),
        "{what}: timed out after {took:?}, not about 200 ms"
    );
}

#[test]
fn read_timeouts_fail_idle_reads_with_would_block_after_200ms_tcp_and_udp() {
    if skip() {
        return;
    }
    let _serial = serial();
    let t = Duration::from_millis(200);

    // What the kernel does, on this machine: the behaviour to match.
    let k = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    k.set_read_timeout(Some(t)).unwrap();
    let t0 = Instant::now();
    assert_timed_out(
        "a kernel UDP socket",
        k.recv_from(&mut [0u8; 8]),
        t0.elapsed(),
    );

    let net = Net::new(7);
    let nexus = InProcess::start(&net.0, "timeouts");
    let mut control = nexus.control();
    let stack = nexus.stack();

    // TCP: an idle connection.
    let mut server = net.python(
        "the idle python server",
        IDLE_ECHO_SERVER,
        &[("HOST", net.peer4().to_string())],
    );
    let port: u16 = words(&server.expect_line("port ", SHORT))[1]
        .parse()
        .unwrap();
    let mut conn =
        TcpStream::connect_timeout(&stack, SocketAddr::new(net.peer4().into(), port), SHORT)
            .expect("connected");
    conn.set_read_timeout(Some(t)).unwrap();
    let mut buf = [0u8; 64];
    for i in 0..3 {
        let t0 = Instant::now();
        let r = conn.read(&mut buf);
        assert_timed_out(&format!("idle TCP read {i}"), r, t0.elapsed());
    }
    // Non-blocking, a read returns WouldBlock at once, not after a spin.
    conn.set_nonblocking(true).unwrap();
    assert_would_block_at_once("a non-blocking idle TCP read", || conn.read(&mut buf));
    conn.set_nonblocking(false).unwrap();
    // The connection is as good as before.
    conn.write_all(b"still there?").unwrap();
    let mut got = [0u8; 12];
    conn.read_exact(&mut got).expect("the echo");
    assert_eq!(&got, b"still there?");
    conn.shutdown(Shutdown::Write).unwrap();
    assert_eq!(server.expect_line("closed", SHORT), "closed");
    let _ = server.succeed(SHORT);
    drop(conn);

    // UDP: nothing comes, on either family, connected or not.
    for local in [
        SocketAddr::new(net.host4().into(), 0),
        SocketAddr::new(net.host6().into(), 0),
    ] {
        let mut u = UdpSocket::bind(&stack, local).expect("a UDP socket");
        u.set_read_timeout(Some(t)).unwrap();
        let t0 = Instant::now();
        let r = u.recv_from(&mut buf);
        assert_timed_out(&format!("idle UDP recv_from on {local}"), r, t0.elapsed());
        let peer = if local.is_ipv4() {
            SocketAddr::new(net.peer4().into(), 9)
        } else {
            SocketAddr::new(net.peer6().into(), 9)
        };
        u.connect(peer).unwrap();
        let t0 = Instant::now();
        let r = u.recv(&mut buf);
        assert_timed_out(&format!("idle UDP recv on {local}"), r, t0.elapsed());
        u.set_nonblocking(true).unwrap();
        assert_would_block_at_once(&format!("a non-blocking UDP recv on {local}"), || {
            u.recv(&mut buf)
        });
    }
    no_flows_within(&mut control, Duration::from_secs(2));
}

// ---------------------------------------------------------------------------------------------
// 5. UDP both ways, both families.

const UDP_CLIENT: &str = r"
import socket, os
fams = {'v4': (socket.AF_INET, '@H4@', @P4@, 1472), 'v6': (socket.AF_INET6, '@H6@', @P6@, 1452)}
for name, (fam, host, port, maxp) in fams.items():
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(2)
    ok, bad = 0, []
    # One at a time, each waiting for its echo.
    sizes = [0, 1, 2, 17, 100, 512, 1000, 1400, maxp - 1, maxp] * 3
    for size in sizes:
        msg = os.urandom(size)
        s.sendto(msg, (host, port))
        try:
            data, addr = s.recvfrom(65536)
        except socket.timeout:
            bad.append('timeout(%d)' % size)
            continue
        if data != msg:
            bad.append('payload(%d->%d)' % (size, len(data)))
        elif addr[0] != host or addr[1] != port:
            bad.append('from(%s)' % (addr,))
        else:
            ok += 1
    # A burst: 64 out before any echo is read.
    burst = [b'%03d' % i + os.urandom(997) for i in range(64)]
    for m in burst:
        s.sendto(m, (host, port))
    back = set()
    try:
        while len(back) < len(burst):
            data, addr = s.recvfrom(65536)
            back.add(data)
    except socket.timeout:
        pass
    lost = [m[:3].decode() for m in burst if m not in back]
    print(name, ok, len(sizes), 'burst', len(burst) - len(lost), len(burst), 'bad', bad, 'lost', lost, flush=True)
";

#[test]
fn udp_echo_echoes_a_kernel_clients_datagrams_intact_v4_and_v6() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(8);
    let nexus = InProcess::start(&net.0, "udpecho");
    let (mut echo4, a4) = app(
        "udp_echo v4",
        UDP_ECHO,
        &["--socket", &nexus.socket, "--listen", "0.0.0.0:0"],
    );
    let (mut echo6, a6) = app(
        "udp_echo v6",
        UDP_ECHO,
        &["--socket", &nexus.socket, "--listen", "[::]:0"],
    );
    let lines = net
        .python(
            "the python UDP client",
            UDP_CLIENT,
            &[
                ("H4", net.host4().to_string()),
                ("P4", a4.port().to_string()),
                ("H6", net.host6().to_string()),
                ("P6", a6.port().to_string()),
            ],
        )
        .succeed(Duration::from_secs(120));
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let w = words(l);
        assert_eq!(
            w[1], w[2],
            "every echo came back intact, from the echo's address: {l}"
        );
        assert_eq!(w[4], w[5], "every datagram of the burst came back: {l}");
    }
    assert!(echo4.exited().is_none() && echo6.exited().is_none());
}

const UDP_ECHO_SERVER: &str = r"
import socket, select, time, sys
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.bind(('@H4@', 0))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.bind(('@H6@', 0))
print('ports', s4.getsockname()[1], s6.getsockname()[1], flush=True)
n, end = 0, time.time() + 60
while time.time() < end:
    r, _, _ = select.select([s4, s6], [], [], 0.5)
    for s in r:
        data, addr = s.recvfrom(65536)
        if data == b'quit':
            print('echoed', n, flush=True)
            sys.exit(0)
        s.sendto(data, addr)
        n += 1
print('no quit', n, flush=True)
";

#[test]
fn an_app_udp_socket_talks_to_a_kernel_echo_server_intact_v4_and_v6() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(9);
    let nexus = InProcess::start(&net.0, "udpapp");
    let mut control = nexus.control();
    let stack = nexus.stack();
    warm_neighbours(&net);
    let mut server = net.python(
        "the python UDP echo server",
        UDP_ECHO_SERVER,
        &[
            ("H4", net.peer4().to_string()),
            ("H6", net.peer6().to_string()),
        ],
    );
    let ports = server.expect_line("ports ", SHORT);
    let w = words(&ports);
    let (p4, p6): (u16, u16) = (w[1].parse().unwrap(), w[2].parse().unwrap());
    let mut total = 0;
    let mut sockets = Vec::new();
    for (local, peer, max) in [
        (
            SocketAddr::new(net.host4().into(), 0),
            SocketAddr::new(net.peer4().into(), p4),
            1472,
        ),
        (
            SocketAddr::new(net.host6().into(), 0),
            SocketAddr::new(net.peer6().into(), p6),
            1452,
        ),
    ] {
        let mut u = UdpSocket::bind(&stack, local).expect("a UDP socket");
        let me = u.local_addr().unwrap();
        assert_eq!(me.ip(), local.ip());
        assert_ne!(me.port(), 0, "the kernel chose a port");
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 2048];
        // send_to / recv_from.
        for size in [0, 1, 2, 17, 100, 512, 1000, 1400, max - 1, max] {
            let msg = random_bytes(size);
            assert_eq!(u.send_to(&msg, peer).unwrap(), size);
            let (n, from) = u.recv_from(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "the echo of {size} bytes to {peer}: {e}; {}",
                    counters(&mut control)
                )
            });
            assert_eq!(from, peer, "the echo's sender");
            assert_eq!(&buf[..n], &msg[..], "the echo of {size} bytes to {peer}");
            total += 1;
        }
        // One byte past the MTU goes as fragments (the nexus cuts it, the peer's kernel
        // reassembles it, and the echo comes back the same way); one byte past what a channel
        // buffer holds does not fit: an error, not a silent drop.
        let mut big = vec![0u8; 65_536];
        let msg = random_bytes(max + 1);
        assert_eq!(u.send_to(&msg, peer).unwrap(), max + 1);
        let (n, _) = u
            .recv_from(&mut big)
            .unwrap_or_else(|e| panic!("the echo of {} bytes: {e}", max + 1));
        assert_eq!(&big[..n], &msg[..], "the echo of a fragmented datagram");
        total += 1;
        let limit = if peer.is_ipv4() { 65_507 } else { 65_487 };
        let e = u
            .send_to(&random_bytes(limit + 1), peer)
            .expect_err("a datagram larger than a channel buffer");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        // connect / send / recv.
        u.connect(peer).unwrap();
        assert_eq!(u.peer_addr().unwrap(), peer);
        for i in 0..10u32 {
            let msg = random_bytes(100 + i as usize * 100);
            assert_eq!(u.send(&msg).unwrap(), msg.len());
            let n = u.recv(&mut buf).expect("the echo (connected)");
            assert_eq!(&buf[..n], &msg[..], "connected echo {i}");
            total += 1;
        }
        // A burst: 64 out before reading.
        let burst: Vec<Vec<u8>> = (0..64u8)
            .map(|i| {
                let mut m = random_bytes(1000);
                m[0] = i;
                m
            })
            .collect();
        for m in &burst {
            u.send(m).unwrap();
        }
        let mut back = Vec::new();
        while back.len() < burst.len() {
            match u.recv(&mut buf) {
                Ok(n) => back.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("receiving the burst: {e}"),
            }
        }
        let lost: Vec<u8> = burst
            .iter()
            .filter(|m| !back.contains(m))
            .map(|m| m[0])
            .collect();
        assert!(lost.is_empty(), "{peer}: burst datagrams lost: {lost:?}");
        total += burst.len();
        sockets.push(u);
    }
    // Ends the python server. (The socket stays until python has it: a datagram sent just
    // before its socket is dropped can be lost, see
    // `datagrams_sent_just_before_their_socket_is_dropped_arrive`.)
    sockets[1].send(b"quit").unwrap();
    let echoed = server.try_line("echoed ", SHORT).unwrap_or_else(|| {
        panic!(
            "python echoed nothing; sent {total}; {}",
            counters(&mut control)
        )
    });
    assert_eq!(echoed, format!("echoed {total}"), "python echoed each once");
    drop(sockets);
    let _ = server.succeed(SHORT);
    no_flows_within(&mut control, Duration::from_secs(2));
}

const FIRST_PACKETS: &str = r"
import socket, select, time
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.bind(('@H4@', 0))
l6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
l6.bind(('@H6@', 0))
l6.listen(1)
print('ports', s4.getsockname()[1], l6.getsockname()[1], flush=True)
conns, end = [], time.time() + 15
while time.time() < end:
    r, _, _ = select.select([s4, l6], [], [], 0.2)
    for s in r:
        if s is s4:
            data, addr = s4.recvfrom(2048)
            print('datagram', data.decode(), flush=True)
        else:
            c, a = l6.accept()
            conns.append(c)
            print('accepted', flush=True)
";

/// Regression: the first packet an app sends to a peer the host has not talked to yet.
///
/// A kernel socket's first datagram to an unresolved neighbour is queued while the kernel
/// resolves it (ARP/NDP, `unres_qlen`), and a kernel TCP connect completes in a round trip.
/// The nexus once dropped the packet (`tx_no_neighbour`) and only asked the kernel to resolve
/// the neighbour: the datagram was lost, and a connect waited for smoltcp's SYN
/// retransmission (1 s on IPv4, 3 s on IPv6). It now holds such packets while the kernel
/// resolves.
#[test]
fn the_first_datagram_an_app_sends_to_a_new_neighbour_arrives() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(12);
    let nexus = InProcess::start(&net.0, "firstpkt");
    let mut control = nexus.control();
    let stack = nexus.stack();
    let mut peer = net.python(
        "the python peer",
        FIRST_PACKETS,
        &[
            ("H4", net.peer4().to_string()),
            ("H6", net.peer6().to_string()),
        ],
    );
    let ports = peer.expect_line("ports ", SHORT);
    let w = words(&ports);
    let (udp, tcp): (u16, u16) = (w[1].parse().unwrap(), w[2].parse().unwrap());

    // UDP, IPv4: one datagram, cold.
    let u = UdpSocket::bind(&stack, SocketAddr::new(net.host4().into(), 0)).unwrap();
    u.send_to(b"first", SocketAddr::new(net.peer4().into(), udp))
        .unwrap();
    let datagram = peer.try_line("datagram ", Duration::from_secs(2));
    // TCP, IPv6: a connect, cold.
    let t0 = Instant::now();
    let conn = TcpStream::connect_timeout(&stack, SocketAddr::new(net.peer6().into(), tcp), SHORT);
    let took = t0.elapsed();
    let why = counters(&mut control);
    assert!(
        datagram.as_deref() == Some("datagram first")
            && conn.is_ok()
            && took < Duration::from_millis(500),
        "the first datagram: {datagram:?} (None: lost); the first connect: {:?} after \
         {took:?}; {why}",
        conn.map(|_| ())
    );
}

const COUNTING_SINK: &str = r"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: room for every datagram
s.bind(('@H4@', 0))
print('port', s.getsockname()[1], flush=True)
s.settimeout(@IDLE@)
got = set()
try:
    while True:
        got.add(int(s.recv(4096)))
except socket.timeout:
    pass
print('got', len(got), 'missing', sorted(set(range(@N@)) - got), flush=True)
";

/// A datagram that `send_to` accepted is sent even if its socket is dropped right after (as
/// with a kernel socket: `sendto` then `close` loses nothing).
///
/// Regression: the stack publishes the datagram on the channel's TX ring, and the drop then
/// releases the flow over the control socket at once (`stack/mod.rs`, `Inner::poll`:
/// `released`). The nexus once removed the flow as soon as it read the request, before taking
/// what the channel's TX ring still held, so the datagram found no flow (`tx_no_flow`; 4 to 9
/// of 1000 send-then-drop cycles). `remove_flow` now drains the channel's TX ring first.
///
/// Regression too: the stack removed a dropped UDP socket at once, so a datagram still queued
/// in it (the channel's ALLOC ring empty at that moment: after the idle pauses below, the
/// stock of a 16 KiB-buffer channel was 4) was lost with it (9 of 1000, in pairs, in 1 of 7
/// runs). A dropped UDP socket now lingers, with its flow, until its queue has gone.
#[test]
fn datagrams_sent_just_before_their_socket_is_dropped_arrive() {
    if skip() {
        return;
    }
    let _serial = serial();
    const N: usize = 1000;
    let net = Net::new(13);
    let nexus = InProcess::start(&net.0, "senddrop");
    let mut control = nexus.control();
    let stack = nexus.stack();
    warm_neighbours(&net);
    let mut sink = net.python(
        "the counting python sink",
        COUNTING_SINK,
        &[
            ("H4", net.peer4().to_string()),
            ("IDLE", "3".into()),
            ("N", N.to_string()),
        ],
    );
    let port: u16 = words(&sink.expect_line("port ", SHORT))[1].parse().unwrap();
    let to = SocketAddr::new(net.peer4().into(), port);
    for i in 0..N {
        if i % 50 == 0 {
            // Now and then an idle moment: the loss is likeliest on a sleeping nexus, which
            // then finds the channel's doorbell and the control request in one wakeup.
            std::thread::sleep(Duration::from_millis(300));
        }
        let u = UdpSocket::bind(&stack, SocketAddr::new(net.host4().into(), 0)).unwrap();
        u.send_to(i.to_string().as_bytes(), to).unwrap();
        drop(u);
    }
    let got = sink.expect_line("got ", SHORT);
    assert!(
        got.starts_with(&format!("got {N} ")),
        "every datagram arrived: {got}; {}",
        counters(&mut control)
    );
}

// ---------------------------------------------------------------------------------------------
// 6. An app that dies mid-transfer.

const PATIENT_SINK: &str = r"
import socket, time
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(('@HOST@', 0))
srv.listen(1)
srv.settimeout(30)
print('port', srv.getsockname()[1], flush=True)
c, peer = srv.accept()
print('accepted', peer[0], peer[1], flush=True)
c.settimeout(@TIMEOUT@)
n, t0, last = 0, time.time(), time.time()
try:
    while True:
        b = c.recv(1 << 20)
        if not b:
            how = 'eof'
            break
        n += len(b)
        last = time.time()
except ConnectionResetError:
    how = 'reset'
except socket.timeout:
    how = 'timeout'
print(how, n, '%.3f' % (time.time() - last), flush=True)
if how == 'timeout':
    # Silence: does anything answer for the dead app? Send it something.
    try:
        c.settimeout(5)
        c.sendall(b'are you there?')
        b = c.recv(1)
        print('then', 'eof' if b == b'' else 'data', flush=True)
    except ConnectionResetError:
        print('then reset', flush=True)
    except socket.timeout:
        print('then timeout', flush=True)
";

#[test]
fn an_app_killed_mid_transfer_releases_its_flow_and_port() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(10);
    let nexus = InProcess::start(&net.0, "kill");
    let mut control = nexus.control();
    let mut server = net.python(
        "the python sink",
        PATIENT_SINK,
        &[("HOST", net.peer4().to_string()), ("TIMEOUT", "10".into())],
    );
    let port = words(&server.expect_line("port ", SHORT))[1].to_owned();
    let to = format!("{}:{port}", net.peer4());
    let mut sender = Kid::spawn(
        Command::new(TCP_BULK).args([
            "send",
            "--socket",
            &nexus.socket,
            "--to",
            &to,
            "--bytes",
            "1073741824",
        ]),
        "tcp_bulk send",
    );
    let accepted = server.expect_line("accepted ", SHORT);
    let a = words(&accepted);
    let app_addr = SocketAddr::new(a[1].parse().unwrap(), a[2].parse().unwrap());
    assert_eq!(app_addr.ip(), IpAddr::V4(net.host4()));
    // The app's flow is there while it sends.
    let flows = control.flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f.local == app_addr && f.pid == sender.pid() as i32),
        "the app's flow {app_addr} is listed: {flows:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sender.exited().is_none(),
        "tcp_bulk send still sending after 0.5 s"
    );
    sender.kill();
    let killed = Instant::now();

    // The nexus lets go of the app's flow (and its port reservation).
    let gone = no_flows_within(&mut control, Duration::from_secs(2));
    eprintln!("the app's flow was gone {gone:?} after the kill");
    let port_free = std::net::TcpListener::bind(app_addr)
        .unwrap_or_else(|e| panic!("binding {app_addr}, the dead app's port, in the host: {e}"));
    drop(port_free);

    let end = server.expect_line("", Duration::from_secs(20));
    let seen = killed.elapsed();
    let w = words(&end);
    eprintln!("the python sink saw {end:?} {seen:.3?} after the kill");
    // The nexus resets the dead app's TCP connections as it reclaims the channel (from what
    // it saw of each: the peer's last acknowledgement), so the peer learns at once, as it
    // would from a kernel socket whose owner died. (Once, the peer heard nothing until its
    // own read timed out.)
    let st = control.status().expect("status");
    assert_eq!(
        w[0], "reset",
        "the peer is reset, not left in silence: {end:?}; nexus: {:?}",
        st.interface
    );
    assert!(
        seen < Duration::from_secs(2),
        "the reset came only {seen:?} after the kill"
    );
    let resets = st
        .interface
        .iter()
        .find(|(k, _)| k == "tx_resets")
        .map_or(0, |c| c.1);
    assert!(
        resets >= 1,
        "the nexus counts the reset it sent: {:?}",
        st.interface
    );
    let _ = server.finish(SHORT);
}

/// A kernel client that asks for a file, half-closes (no more requests), takes the first MiB,
/// pauses a second so that the server stalls mid-response, then reads on until the end.
const HALF_CLOSED_CLIENT: &str = r"
import socket, time
c = socket.create_connection(('@HOST@', @PORT@), timeout=10)
c.sendall(b'GET /big HTTP/1.1\r\nhost: x\r\n\r\n')
c.shutdown(socket.SHUT_WR)
n, said = 0, False
try:
    while True:
        b = c.recv(1 << 16)
        if not b:
            how = 'eof'
            break
        n += len(b)
        if n >= 1 << 20 and not said:
            said = True
            print('midway', flush=True)
            time.sleep(1)
except ConnectionResetError:
    how = 'reset'
except socket.timeout:
    how = 'timeout'
print(how, n, flush=True)
";

/// A peer that half-closed is still owed a reset when the app answering it dies: the nexus
/// remembers a connection until both sides' FINs (or a reset), not just until the peer's FIN.
#[test]
fn a_half_closed_peer_is_reset_when_the_app_answering_it_dies() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(15);
    let nexus = InProcess::start(&net.0, "half-close-kill");
    let root = Scratch::new("half-close-root");
    random_file(&root.join("big"), 100 * MIB);
    let (mut server, addr) = http_server(&nexus, &root);
    let mut client = net.python(
        "the half-closed client",
        HALF_CLOSED_CLIENT,
        &[
            ("HOST", net.host4().to_string()),
            ("PORT", addr.port().to_string()),
        ],
    );
    client.expect_line("midway", SHORT);
    server.kill();
    let killed = Instant::now();
    let end = client.expect_line("", Duration::from_secs(20));
    let seen = killed.elapsed();
    eprintln!("the client saw {end:?} {seen:.3?} after the kill");
    let w = words(&end);
    assert_eq!(w[0], "reset", "the half-closed peer is reset: {end:?}");
    let got: usize = w[1].parse().expect("a byte count");
    assert!(
        got < 100 * MIB,
        "the app died before it sent the whole file ({got} bytes came)"
    );
    assert!(
        seen < Duration::from_secs(3),
        "the reset came {seen:?} after the kill (1 s of it the client's pause)"
    );
    let _ = client.finish(SHORT);
}

// ---------------------------------------------------------------------------------------------
// 7. Half-open handshakes.

/// SYNs from an address nobody owns in the peer's subnet, built by hand on a raw socket: the
/// listener answers each with a SYN-ACK that can never be delivered.
const SPOOFED_SYNS: &str = r"
import socket, struct
def csum(b):
    if len(b) % 2:
        b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
src, dst, port = socket.inet_aton('@SPOOF@'), socket.inet_aton('@HOST@'), @PORT@
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i in range(@N@):
    tcp = struct.pack('!HHIIBBHHH', 40000 + i, port, 1000 + i, 0, 5 << 4, 0x02, 65535, 0, 0)
    c = csum(src + dst + struct.pack('!BBH', 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack('!H', c) + tcp[18:]
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(tcp), i + 1, 0, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
    r.sendto(ip + tcp, ('@HOST@', 0))
print('sent', @N@, flush=True)
";

/// A client that tries once at once and once after `WAIT` seconds.
const TWO_ATTEMPTS: &str = r"
import socket, time
def attempt():
    try:
        c = socket.create_connection(('@HOST@', @PORT@), timeout=1)
        return 'served ' + c.recv(16).decode()
    except ConnectionRefusedError:
        return 'refused'
    except socket.timeout:
        return 'timeout'
print('first', attempt(), flush=True)
time.sleep(@WAIT@)
print('then', attempt(), flush=True)
";

/// Handshakes that never finish (SYNs from a spoofed source) fill a listener's backlog, as
/// they would a kernel's, but only for the handshake timeout: then the listener serves again.
/// (Before it had one, each such SYN held a backlog socket for good: four made a listener
/// with a backlog of four refuse every client from then on.)
#[test]
fn half_open_handshakes_time_out_and_the_listener_serves_again() {
    if skip() {
        return;
    }
    let _serial = serial();
    const BACKLOG: usize = 4;
    let net = Net::new(11);
    let nexus = InProcess::start(&net.0, "synflood");
    let stack = nexus.stack();
    warm_neighbours(&net);
    let mut listener = netchannel::stack::TcpListener::bind_with_backlog(
        &stack,
        SocketAddr::new(net.host4().into(), 0),
        BACKLOG,
    )
    .expect("listening");
    listener
        .set_handshake_timeout(Duration::from_secs(2))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("a connection");
        conn.write_all(b"hello").expect("a greeting");
        peer
    });
    let spoof = Ipv4Addr::from(u32::from(net.peer4()) + 1);
    let mut flood = net.python(
        "the spoofed SYNs",
        SPOOFED_SYNS,
        &[
            ("SPOOF", spoof.to_string()),
            ("HOST", net.host4().to_string()),
            ("PORT", port.to_string()),
            ("N", BACKLOG.to_string()),
        ],
    );
    flood.expect_line("sent ", SHORT);
    let _ = flood.succeed(SHORT);
    std::thread::sleep(Duration::from_millis(200));
    let mut client = net.python(
        "the python client",
        TWO_ATTEMPTS,
        &[
            ("HOST", net.host4().to_string()),
            ("PORT", port.to_string()),
            ("WAIT", "3".into()),
        ],
    );
    let first = client.expect_line("first ", SHORT);
    assert!(
        first == "first refused" || first == "first timeout",
        "the half-open handshakes fill the backlog at first: {first}"
    );
    let then = client.expect_line("then ", SHORT);
    assert_eq!(
        then, "then served hello",
        "the handshakes timed out and the listener serves again"
    );
    let peer = server.join().expect("the server thread");
    assert_eq!(peer.ip(), IpAddr::V4(net.peer4()));
    let _ = client.succeed(SHORT);
}

const MANY_AT_ONCE: &str = r"
import socket, threading
results = []
def attempt():
    try:
        c = socket.create_connection(('@HOST@', @PORT@), timeout=8)
        results.append('served ' + c.recv(16).decode())
    except ConnectionRefusedError:
        results.append('refused')
    except socket.timeout:
        results.append('timeout')
ts = [threading.Thread(target=attempt) for _ in range(@N@)]
for t in ts: t.start()
for t in ts: t.join()
print('results', ' '.join(sorted(set(results))), len(results), flush=True)
";

/// More clients at once than the listener has backlog sockets: the SYNs beyond the backlog
/// are dropped, as by a kernel whose accept queue is full, and their clients, trying again,
/// are all served. (Before, smoltcp refused them with a reset: `curl` failed with "connection
/// refused" for 35 of 100 parallel downloads.)
#[test]
fn syns_beyond_the_backlog_are_dropped_not_refused() {
    if skip() {
        return;
    }
    let _serial = serial();
    const BACKLOG: usize = 2;
    const CLIENTS: usize = 8;
    let net = Net::new(11);
    let nexus = InProcess::start(&net.0, "synover");
    let stack = nexus.stack();
    warm_neighbours(&net);
    let listener = netchannel::stack::TcpListener::bind_with_backlog(
        &stack,
        SocketAddr::new(net.host4().into(), 0),
        BACKLOG,
    )
    .expect("listening");
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..CLIENTS {
            let (mut conn, _) = listener.accept().expect("a connection");
            conn.write_all(b"hello").expect("a greeting");
            conns.push(conn);
        }
        conns
    });
    let mut clients = net.python(
        "the python clients",
        MANY_AT_ONCE,
        &[
            ("HOST", net.host4().to_string()),
            ("PORT", port.to_string()),
            ("N", CLIENTS.to_string()),
        ],
    );
    let line = clients.expect_line("results ", Duration::from_secs(20));
    assert_eq!(line, format!("results served hello {CLIENTS}"));
    let _ = clients.succeed(SHORT);
    drop(server.join().expect("the server thread"));
    let dropped = stack.stats().syns_dropped;
    assert!(
        dropped >= 1,
        "{CLIENTS} SYNs at once, a backlog of {BACKLOG}: {dropped} dropped"
    );
}

const SILENT_CLIENT: &str = r"
import socket
c = socket.create_connection(('@HOST@', @PORT@), timeout=2)
print('connected', flush=True)
c.settimeout(15)
try:
    print('got', c.recv(16).decode(), flush=True)
except ConnectionResetError:
    print('got reset', flush=True)
except socket.timeout:
    print('got timeout', flush=True)
";

/// A connection whose handshake is done waits for `accept` however long it is silent, as in a
/// kernel's accept queue: the handshake timeout is for handshakes only. (Before, a client that
/// waits for the server to speak first was reset once it had been silent that long.)
#[test]
fn an_established_connection_waits_for_accept_past_the_handshake_timeout() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(11);
    let nexus = InProcess::start(&net.0, "acceptq");
    let stack = nexus.stack();
    warm_neighbours(&net);
    let mut listener =
        netchannel::stack::TcpListener::bind(&stack, SocketAddr::new(net.host4().into(), 0))
            .expect("listening");
    let timeout = Duration::from_secs(1);
    listener.set_handshake_timeout(timeout).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = net.python(
        "the silent python client",
        SILENT_CLIENT,
        &[
            ("HOST", net.host4().to_string()),
            ("PORT", port.to_string()),
        ],
    );
    client.expect_line("connected", SHORT);
    // Three handshake timeouts without a packet from the client before the app accepts.
    std::thread::sleep(3 * timeout);
    listener.set_nonblocking(true).unwrap();
    let until = Instant::now() + SHORT;
    let (mut conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the connection that waited for accept is gone: {e}"),
        }
    };
    assert_eq!(peer.ip(), IpAddr::V4(net.peer4()));
    conn.write_all(b"hello").expect("a greeting");
    let got = client.expect_line("got ", SHORT);
    assert_eq!(got, "got hello", "the client got the greeting");
    let _ = client.succeed(SHORT);
}

/// A nexus that stops (as on SIGTERM: its channels go defunct) takes the app's stack with it:
/// calls blocked in accept and recv come back with NotConnected, not a hang, and later calls
/// fail the same way at once. (A crash ends the channel with `PeerGone`, which the stack maps
/// to the same error.)
#[test]
fn blocked_calls_fail_with_not_connected_when_the_nexus_stops() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = Net::new(0);
    let mut nexus = InProcess::start(&net.0, "stops");
    let stack = nexus.stack();
    let listener =
        netchannel::stack::TcpListener::bind(&stack, SocketAddr::new(net.host4().into(), 0))
            .expect("a listener");
    let udp = UdpSocket::bind(&stack, SocketAddr::new(net.host4().into(), 0)).expect("a socket");
    let accepting = std::thread::spawn(move || listener.accept().map(|_| ()));
    let receiving = std::thread::spawn(move || udp.recv_from(&mut [0u8; 64]).map(|_| ()));
    // Both are asleep by now.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!accepting.is_finished() && !receiving.is_finished());
    nexus.stop().expect("the nexus thread");
    // From the moment the nexus is gone.
    let t0 = Instant::now();
    for (what, call) in [("accept", accepting), ("recv_from", receiving)] {
        let e = call
            .join()
            .expect("the blocked call's thread")
            .expect_err("a call on a stopped nexus succeeded");
        assert_eq!(e.kind(), io::ErrorKind::NotConnected, "{what}: {e}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the blocked calls took {:?} to fail",
        t0.elapsed()
    );
    let e = TcpStream::connect_timeout(&stack, SocketAddr::new(net.peer4().into(), 9), SHORT)
        .expect_err("connected through a stopped nexus");
    assert_eq!(e.kind(), io::ErrorKind::NotConnected, "{e}");
}
