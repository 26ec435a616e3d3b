//! The example servers outlive what a single peer does to them, and `http_server`'s uploads,
//! dual-stack listening and kernel twin work, with kernel peers (python3, curl) in a
//! namespace.
//!
//! * `udp_echo_...`: datagrams it cannot echo are reported and skipped; it echoes on.
//! * `http_server_stores_...`: `PUT` of 0 B and 100 MiB stored intact; names that would leave
//!   the upload directory refused with 400, nothing written outside it.
//! * `http_server_serves_v4_and_v6_...`: `--listen [::]:0`, and two `--listen`, serve both
//!   families from one process.
//! * `the_kernel_twin_...`: `http_server --kernel` on kernel sockets, over a plain veth pair
//!   (no nexus): files served and stored intact, both families.
//! * `tcp_bulk_recv_...`: a connection reset mid-transfer is reported; the next one is taken.
//!
//! The bed is `netchannel_tests::testbed`: slots 504 to 508 of 198.18.0.0/15 (and of
//! fd00:198:18::/64), which no other test's scheme reaches (`afxdp_veth`: 8 to 503,
//! `stack_veth`: 256 to 495, fixed ones: 0, 1, 9, 10, 99). The nexus runs in a thread of this
//! process over AF_XDP on the veth's host end. Needs root; without it every test says it
//! skipped. The tests run one at a time ([`serial`]); every wait has a time bound.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use netchannel_tests::testbed::{VethNet, serial, skip_without_root};

mod common;
use common::{InProcess, Scratch, app, sha256_file, warm_neighbours};

const HTTP_SERVER: &str = env!("CARGO_BIN_EXE_http_server");
const UDP_ECHO: &str = env!("CARGO_BIN_EXE_udp_echo");

/// Bound for anything that should take milliseconds.
const SHORT: Duration = Duration::from_secs(10);
/// Bound for a 100 MiB transfer (debug builds of the apps and the nexus).
const BULK: Duration = Duration::from_secs(300);
const MIB: usize = 1 << 20;

fn skip() -> bool {
    skip_without_root("network namespace, veth pair, XDP and AF_XDP")
}

/// Test `n`'s bed (`n` < 8): slot 504 + `n`.
fn net(n: u32) -> VethNet {
    assert!(n < 8);
    VethNet::new("robust", 504 + n)
}

/// Writes a file of `len` random bytes (the kernel's getrandom).
fn random_file(path: &Path, len: usize) {
    let mut f = std::fs::File::create(path).expect("creating a file");
    let mut buf = vec![0u8; 4 * MIB];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        let mut done = 0;
        while done < n {
            done +=
                rustix::rand::getrandom(&mut buf[done..n], rustix::rand::GetRandomFlags::empty())
                    .expect("getrandom");
        }
        f.write_all(&buf[..n]).expect("writing a file");
        left -= n;
    }
}

/// Runs curl in the namespace with `args`, then `-w '%{http_code}'`; returns the status.
fn curl(net: &VethNet, args: &[&str], bound: Duration) -> String {
    // -g: no globbing, so that an IPv6 address in brackets is taken as it is.
    let mut all = vec!["-sSg", "--max-time", "300", "-w", "%{http_code}\\n"];
    all.extend_from_slice(args);
    let lines = net.exec("curl", "curl", &all).succeed(bound);
    lines.last().cloned().unwrap_or_default()
}

/// `http://HOST:PORT/PATH`, the host in brackets for IPv6.
fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}/{path}")
}

// ---------------------------------------------------------------------------------------------
// udp_echo

/// A well-behaved client's echoes before and after `@N@` datagrams from source port 0.
///
/// A datagram from port 0 is the deterministic way to make an echo fail: UDP lets a sender
/// leave its port out (0, RFC 768), the nexus and the stack deliver such a datagram, and
/// sending back to port 0 is refused by the stack (smoltcp's `Unaddressable`, as the kernel
/// refuses it with `EINVAL`), every time, whatever the timing.
const PORTLESS_CLIENT: &str = r"
import socket, struct, time
H, P, SRC, N = '@HOST@', @PORT@, '@SRC@', @N@
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(1)
def echo(msg):
    for _ in range(5):
        u.sendto(msg, (H, P))
        try:
            while True:
                d, _ = u.recvfrom(2048)
                if d == msg:
                    return True
        except socket.timeout:
            pass
    return False
print('before', echo(b'before'), flush=True)
def csum(b):
    if len(b) % 2:
        b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s & 0xffff) or 0xffff
body = b'portless'
length = 8 + len(body)
pseudo = socket.inet_aton(SRC) + socket.inet_aton(H) + struct.pack('!BBH', 0, 17, length)
c = csum(pseudo + struct.pack('!HHHH', 0, P, length, 0) + body)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
for i in range(N):
    raw.sendto(struct.pack('!HHHH', 0, P, length, c) + body, (H, 0))
    if i % 32 == 31:
        time.sleep(0.01)
print('after', all(echo(b'after %d' % i) for i in range(20)), flush=True)
";

#[test]
fn udp_echo_reports_datagrams_it_cannot_echo_and_echoes_on() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = net(0);
    let nexus = InProcess::start(&net, "udp");
    warm_neighbours(&net);
    let (mut echo, addrs) = app(
        "udp_echo",
        UDP_ECHO,
        &["--socket", &nexus.socket, "--listen", "0.0.0.0:0"],
        1,
    );
    const N: usize = 200;
    let t0 = Instant::now();
    let lines = net
        .python(
            "the python UDP client",
            PORTLESS_CLIENT,
            &[
                ("HOST", net.host4().to_string()),
                ("PORT", addrs[0].port().to_string()),
                ("SRC", net.peer4().to_string()),
                ("N", N.to_string()),
            ],
        )
        .succeed(Duration::from_secs(60));
    eprintln!(
        "udp_echo: 1 echo, {N} portless datagrams, 20 echoes in {:.3?}",
        t0.elapsed()
    );
    assert_eq!(lines, ["before True", "after True"], "{}", echo.stderr());
    assert!(echo.exited().is_none(), "udp_echo still serving");
    let err = echo.stderr();
    eprintln!("udp_echo said: {}", err.lines().next().unwrap_or_default());
    let said = format!("echo of 8 bytes to {}:0", net.peer4());
    assert!(
        err.contains(&said) && err.contains("skipped"),
        "udp_echo reported the echoes it could not send: {err}"
    );
    // A flood of them is counted, not printed line by line.
    let reports = err.lines().count();
    assert!(
        reports < N,
        "{reports} lines for {N} failures: the report is rate-limited: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// http_server: uploads

/// Starts a 10 MiB upload, sends 1 MiB of it, and resets the connection (SO_LINGER 0).
const ABORTED_PUT: &str = r"
import socket, struct, time
s = socket.create_connection(('@HOST@', @PORT@), timeout=10)
s.sendall(b'PUT /aborted HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n')
s.sendall(b'x' * (1 << 20))
time.sleep(0.2)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
s.close()
print('reset', flush=True)
";

#[test]
fn http_server_stores_puts_of_0b_and_100mib_intact_and_refuses_bad_names() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = net(1);
    let nexus = InProcess::start(&net, "put");
    warm_neighbours(&net);
    let root = Scratch::new("put-root");
    let up = Scratch::new("put-up");
    let src = Scratch::new("put-src");
    let (mut server, addrs) = app(
        "http_server",
        HTTP_SERVER,
        &[
            "--socket",
            &nexus.socket,
            "--root",
            root.str(),
            "--upload",
            up.str(),
            "--listen",
            "0.0.0.0:0",
        ],
        1,
    );
    let at = SocketAddr::new(net.host4().into(), addrs[0].port());
    for (name, len) in [("empty", 0), ("hundred-mib", 100 * MIB)] {
        let file = src.join(name);
        random_file(&file, len);
        let t0 = Instant::now();
        let status = curl(
            &net,
            &[
                "-T",
                file.to_str().expect("a path"),
                "-o",
                "/dev/null",
                &url(at, name),
            ],
            BULK,
        );
        let took = t0.elapsed();
        assert_eq!(status, "201", "PUT /{name}: {}", server.stderr());
        assert_eq!(
            sha256_file(up.join(name)),
            sha256_file(&file),
            "{name}: what was stored is what was sent"
        );
        eprintln!("curl -> http_server: PUT {name} ({len} B) in {took:.3?}");
    }
    // A client that resets its connection in the middle of an upload: reported, its temporary
    // file removed, the name not made.
    let lines = net
        .python(
            "the aborting python client",
            ABORTED_PUT,
            &[
                ("HOST", net.host4().to_string()),
                ("PORT", at.port().to_string()),
            ],
        )
        .succeed(SHORT * 3);
    assert_eq!(lines, ["reset"]);
    let t0 = Instant::now();
    while up.names().iter().any(|n| n.ends_with(".part")) {
        assert!(
            t0.elapsed() < SHORT,
            "the temporary file stays: {:?}",
            up.names()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server.stderr().contains("connection from"),
        "the failed connection was reported: {}",
        server.stderr()
    );
    // Names that are not one plain file name. curl's --path-as-is sends `..` as it is.
    for bad in [
        "",
        "..",
        "../escape",
        "a/b",
        "..%2fescape/..",
        ".hidden",
        "a..b",
    ] {
        let status = curl(
            &net,
            &[
                "--path-as-is",
                "-X",
                "PUT",
                "--data-binary",
                "x",
                "-o",
                "/dev/null",
                &url(at, bad),
            ],
            SHORT,
        );
        assert_eq!(status, "400", "PUT /{bad:?}");
    }
    assert_eq!(
        up.names(),
        ["empty", "hundred-mib"],
        "only the good uploads, no temporary files"
    );
    let parent = up.0.parent().expect("a parent");
    assert!(!parent.join("escape").exists() && !root.join("escape").exists());
    // Still serving, and an upload is a file like any other to fetch.
    let got = src.join("got");
    std::fs::copy(up.join("hundred-mib"), root.join("back")).expect("a copy");
    let status = curl(
        &net,
        &["-o", got.to_str().expect("a path"), &url(at, "back")],
        BULK,
    );
    assert_eq!(status, "200");
    assert_eq!(sha256_file(&got), sha256_file(src.join("hundred-mib")));
    assert!(server.exited().is_none(), "http_server still serving");
}

// ---------------------------------------------------------------------------------------------
// http_server: both families from one process

#[test]
fn http_server_serves_v4_and_v6_from_one_process() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = net(2);
    let nexus = InProcess::start(&net, "dual");
    warm_neighbours(&net);
    let root = Scratch::new("dual-root");
    let up = Scratch::new("dual-up");
    let got = Scratch::new("dual-got");
    random_file(&root.join("file"), MIB);
    let want = sha256_file(root.join("file"));
    let serve = |listen: &[&str]| {
        let mut args = vec![
            "--socket",
            nexus.socket.as_str(),
            "--root",
            root.str(),
            "--upload",
            up.str(),
        ];
        for l in listen {
            args.extend(["--listen", l]);
        }
        app("http_server", HTTP_SERVER, &args, 2)
    };
    let (host4, host6) = (net.host4().to_string(), format!("[{}]", net.host6()));
    let explicit = [format!("{host4}:0"), format!("{host6}:0")];
    for listen in [
        vec!["[::]:0"],
        vec![explicit[0].as_str(), explicit[1].as_str()],
    ] {
        let (mut server, addrs) = serve(&listen);
        assert!(
            addrs[0].is_ipv6() != addrs[1].is_ipv6(),
            "{listen:?}: one socket per family: {addrs:?}"
        );
        if listen == ["[::]:0"] {
            assert_eq!(
                addrs[0].port(),
                addrs[1].port(),
                "[::]:0: one port: {addrs:?}"
            );
        }
        for a in &addrs {
            let at = match a {
                SocketAddr::V4(_) => SocketAddr::new(net.host4().into(), a.port()),
                SocketAddr::V6(_) => SocketAddr::new(net.host6().into(), a.port()),
            };
            let out = got.join("file");
            let _ = std::fs::remove_file(&out);
            let status = curl(
                &net,
                &["-o", out.to_str().expect("a path"), &url(at, "file")],
                SHORT * 3,
            );
            assert_eq!(status, "200", "GET over {at}: {}", server.stderr());
            assert_eq!(sha256_file(&out), want, "GET over {at}");
            let name = format!("from-{}", if at.is_ipv6() { "v6" } else { "v4" });
            let status = curl(
                &net,
                &[
                    "-T",
                    &root.join("file").to_string_lossy(),
                    "-o",
                    "/dev/null",
                    &url(at, &name),
                ],
                SHORT * 3,
            );
            assert_eq!(status, "201", "PUT over {at}: {}", server.stderr());
            assert_eq!(sha256_file(up.join(&name)), want, "PUT over {at}");
        }
        assert!(server.exited().is_none(), "http_server still serving");
        server.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// http_server --kernel

#[test]
fn the_kernel_twin_serves_and_stores_files_intact_without_a_nexus() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = net(3);
    let root = Scratch::new("kernel-root");
    let up = Scratch::new("kernel-up");
    let got = Scratch::new("kernel-got");
    random_file(&root.join("ten-mib"), 10 * MIB);
    let want = sha256_file(root.join("ten-mib"));
    // No nexus: with --kernel, --socket is not even looked at.
    let (mut server, addrs) = app(
        "http_server --kernel",
        HTTP_SERVER,
        &[
            "--kernel",
            "--socket",
            "/nonexistent/nexus.sock",
            "--root",
            root.str(),
            "--upload",
            up.str(),
            "--listen",
            "[::]:0",
        ],
        1,
    );
    let port = addrs[0].port();
    for at in [
        SocketAddr::new(net.host4().into(), port),
        SocketAddr::new(net.host6().into(), port),
    ] {
        let out = got.join("ten-mib");
        let _ = std::fs::remove_file(&out);
        let t0 = Instant::now();
        let status = curl(
            &net,
            &["-o", out.to_str().expect("a path"), &url(at, "ten-mib")],
            BULK,
        );
        assert_eq!(status, "200", "GET over {at}: {}", server.stderr());
        assert_eq!(sha256_file(&out), want, "GET over {at}");
        eprintln!(
            "http_server --kernel -> curl over {at}: 10 MiB in {:.3?}",
            t0.elapsed()
        );
        let name = format!("up-{}", if at.is_ipv6() { "v6" } else { "v4" });
        let status = curl(
            &net,
            &[
                "-T",
                &root.join("ten-mib").to_string_lossy(),
                "-o",
                "/dev/null",
                &url(at, &name),
            ],
            BULK,
        );
        assert_eq!(status, "201", "PUT over {at}: {}", server.stderr());
        assert_eq!(sha256_file(up.join(&name)), want, "PUT over {at}");
    }
    let status = curl(
        &net,
        &[
            "--path-as-is",
            "-X",
            "PUT",
            "--data-binary",
            "x",
            "-o",
            "/dev/null",
            &url(SocketAddr::new(net.host4().into(), port), "../escape"),
        ],
        SHORT,
    );
    assert_eq!(status, "400");
    assert!(
        server.exited().is_none(),
        "http_server --kernel still serving"
    );
    server.kill();
    // Without --upload, PUT is refused.
    let (_plain, addrs) = app(
        "http_server --kernel",
        HTTP_SERVER,
        &[
            "--kernel",
            "--root",
            root.str(),
            "--listen",
            &format!("{}:0", net.host4()),
        ],
        1,
    );
    let status = curl(
        &net,
        &[
            "-X",
            "PUT",
            "--data-binary",
            "x",
            "-o",
            "/dev/null",
            &url(addrs[0], "x"),
        ],
        SHORT,
    );
    assert_eq!(status, "405");
    assert_eq!(up.names(), ["up-v4", "up-v6"]);
}

// ---------------------------------------------------------------------------------------------
// tcp_bulk recv

/// A connection reset after 100 kB, then a whole 1 MiB transfer.
const RESET_THEN_WHOLE: &str = r"
import socket, struct, time, os, hashlib
H, P = '@HOST@', @PORT@
s = socket.create_connection((H, P), timeout=10)
s.sendall(b'x' * 100000)
time.sleep(0.2)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
s.close()
time.sleep(0.2)
data = os.urandom(1 << 20)
s = socket.create_connection((H, P), timeout=10)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.settimeout(10)
s.recv(1)
print('sent', len(data), hashlib.sha256(data).hexdigest(), flush=True)
";

#[test]
fn tcp_bulk_recv_reports_a_reset_connection_and_takes_the_next() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = net(4);
    let nexus = InProcess::start(&net, "bulk");
    warm_neighbours(&net);
    let (recv, addrs) = app(
        "tcp_bulk recv",
        env!("CARGO_BIN_EXE_tcp_bulk"),
        &["recv", "--socket", &nexus.socket, "--listen", "0.0.0.0:0"],
        1,
    );
    let sent = net
        .python(
            "the python sender",
            RESET_THEN_WHOLE,
            &[
                ("HOST", net.host4().to_string()),
                ("PORT", addrs[0].port().to_string()),
            ],
        )
        .succeed(SHORT * 3);
    let (status, lines, err) = recv.finish(SHORT * 3);
    assert!(status.success(), "tcp_bulk recv: {status}: {err}");
    let want: Vec<&str> = sent[0].split_whitespace().collect();
    let got = lines
        .iter()
        .find(|l| l.starts_with("received"))
        .unwrap_or_else(|| panic!("no report: {lines:?}, {err}"));
    let got: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(
        (got[1], got[3]),
        (want[1], want[2]),
        "the second connection's bytes, whole"
    );
    assert!(
        err.contains("failed after") && err.contains("waiting for another"),
        "the reset connection was reported: {err}"
    );
}
