//! The async sockets (feature `tokio`) on a current-thread tokio runtime, with kernel peers in
//! a namespace: an async TCP echo served to a python client, and async UDP both ways. Needs
//! root; without it the test says it skipped.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;

use common::Bed;
use netchannel::stack::{Stack, TcpListener, UdpSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn async_tcp_and_udp_serve_kernel_peers() {
    if !common::is_root() {
        eprintln!("SKIPPED: needs root (network namespace, veth, XDP)");
        return;
    }
    let mut bed = Bed::new("tok", 10, None);
    let stack = Stack::connect(&bed.socket).expect("a stack");
    let any: SocketAddr = "0.0.0.0:7000".parse().expect("addr");
    let listener = TcpListener::bind(&stack, any).expect("listen");
    let udp = UdpSocket::bind(&stack, "0.0.0.0:7001".parse().expect("addr")).expect("bind");
    let script = format!(
        "import socket\n\
         c = socket.create_connection(('{h}', 7000), timeout=10)\n\
         c.sendall(b'x' * 100000); c.shutdown(socket.SHUT_WR)\n\
         got = b''\n\
         while True:\n\
         \x20   b = c.recv(65536)\n\
         \x20   if not b: break\n\
         \x20   got += b\n\
         print('tcp', len(got), got == b'x' * 100000, flush=True)\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)\n\
         u.sendto(b'ping', ('{h}', 7001))\n\
         d, a = u.recvfrom(100)\n\
         print('udp', d.decode(), flush=True)\n",
        h = bed.host_ip
    );
    let out = bed.python(&script).stdout.take().expect("stdout");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let serve = async {
            let (mut conn, _) = listener.accept_async().await.expect("accept");
            let mut all = Vec::new();
            conn.read_to_end(&mut all).await.expect("read");
            conn.write_all(&all).await.expect("write");
            AsyncWriteExt::shutdown(&mut conn).await.expect("shutdown");
            all.len()
        };
        let echo_udp = async {
            let mut buf = [0u8; 100];
            let (n, from) = udp.recv_from_async(&mut buf).await.expect("recv");
            udp.send_to_async(&buf[..n], from).await.expect("send");
        };
        let (n, ()) = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            tokio::join!(serve, echo_udp)
        })
        .await
        .expect("served in time");
        assert_eq!(n, 100_000);
    });
    let lines: Vec<String> = BufReader::new(out).lines().map_while(Result::ok).collect();
    assert_eq!(lines, ["tcp 100000 True", "udp ping"]);
    bed.stop_nexus();
}
