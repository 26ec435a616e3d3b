//! A first end-to-end pass through a real nexus process: open a channel, reflect packets,
//! read the status, revoke the channel under a blocked wait.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use netchannel::nexus::{ChannelOptions, FlowProto, Nexus};
use netchannel::{Error, Interest, Packet};

struct Daemon {
    child: Child,
    socket: String,
}

impl Daemon {
    fn start(name: &str) -> Self {
        let socket = format!("/tmp/netchannel-test-{}-{name}.sock", std::process::id());
        let child = Command::new(env!("CARGO_BIN_EXE_nexus_daemon"))
            .arg(&socket)
            .spawn()
            .expect("spawn nexus");
        let start = Instant::now();
        while Nexus::connect(&socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nexus did not come up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn packets_are_reflected_and_counted() {
    let d = Daemon::start("reflect");
    let mut nexus = Nexus::connect(&d.socket).unwrap();
    let mut ch = nexus.open_channel(ChannelOptions::default()).unwrap();
    let mut got = Vec::new();
    for round in 0..100u32 {
        let mut pkts = Vec::new();
        while pkts.len() < 16 {
            match ch.alloc() {
                Some(b) => {
                    ch.buffer_mut(b).unwrap()[..4]
                        .copy_from_slice(&(round * 16 + pkts.len() as u32).to_le_bytes());
                    pkts.push(Packet {
                        buf: b,
                        offset: 0,
                        len: 4,
                    });
                }
                None => ch
                    .wait(Interest::Buffers, Some(Duration::from_secs(5)))
                    .unwrap(),
            }
        }
        assert_eq!(ch.send(&pkts).unwrap(), 16);
        let mut n = 0;
        while n < 16 {
            got.clear();
            let k = ch.recv(&mut got, 64).unwrap();
            for (i, p) in got.iter().enumerate() {
                assert_eq!(ch.payload(p), &(round * 16 + (n + i) as u32).to_le_bytes());
            }
            ch.free(got.iter().map(|p| p.buf)).unwrap();
            n += k;
            if k == 0 {
                ch.wait(Interest::Readable, Some(Duration::from_secs(5)))
                    .unwrap();
            }
        }
    }
    let s = nexus.status().unwrap();
    let c = s.channels.iter().find(|c| c.id == ch.id()).unwrap();
    assert_eq!(c.tx_packets, 1600);
    assert_eq!(c.rx_packets, 1600);
    assert!(c.drops.is_empty(), "{:?}", c.drops);
    assert_eq!(c.audit, "ok");
}

#[test]
fn defunct_wakes_a_blocked_wait() {
    let d = Daemon::start("defunct");
    let mut nexus = Nexus::connect(&d.socket).unwrap();
    let mut ch = nexus.open_channel(ChannelOptions::default()).unwrap();
    let id = ch.id();
    let sock = d.socket.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        Nexus::connect(&sock).unwrap().defunct(id).unwrap();
        Instant::now()
    });
    let err = ch
        .wait(Interest::Readable, Some(Duration::from_secs(5)))
        .unwrap_err();
    let woke = Instant::now();
    let revoked = t.join().unwrap();
    assert!(matches!(err, Error::Defunct { .. }), "{err}");
    assert!(woke.duration_since(revoked) < Duration::from_millis(100));
}

#[test]
fn flows_claim_the_host_port_space_and_give_it_back() {
    let d = Daemon::start("flows");
    let mut nexus = Nexus::connect(&d.socket).unwrap();
    let a = nexus.open_channel(ChannelOptions::default()).unwrap();
    let b = nexus.open_channel(ChannelOptions::default()).unwrap();
    // Port 0: the kernel chooses, and the host can no longer bind it.
    let (flow, local) = nexus
        .add_flow(&a, FlowProto::Udp, "127.0.0.1:0".parse().unwrap(), None)
        .unwrap();
    assert_ne!(local.port(), 0);
    assert!(
        std::net::UdpSocket::bind(local).is_err(),
        "the host cannot take an app's port"
    );
    // Another channel cannot claim it, nor the wildcard on the same port.
    let err = nexus.add_flow(&b, FlowProto::Udp, local, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: netchannel_shm::control::ErrorCode::InUse,
                ..
            }
        ),
        "{err}"
    );
    let wild = std::net::SocketAddr::from(([0, 0, 0, 0], local.port()));
    assert!(nexus.add_flow(&b, FlowProto::Udp, wild, None).is_err());
    // TCP on the same port is another port space.
    nexus.add_flow(&b, FlowProto::Tcp, local, None).unwrap();
    // A connected flow of the same channel shares the listener's reservation.
    let peer: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    nexus
        .add_flow(&a, FlowProto::Udp, local, Some(peer))
        .unwrap();
    // A port the host holds is refused, naming the holder.
    let host = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = nexus
        .add_flow(&a, FlowProto::Udp, host.local_addr().unwrap(), None)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("[{}]", std::process::id())),
        "{err}"
    );
    let flows = nexus.flows().unwrap();
    assert_eq!(flows.len(), 3, "{flows:?}");
    assert!(
        flows
            .iter()
            .any(|f| f.id == flow && f.channel == a.id() && f.remote.is_none())
    );
    // Removing the flow, then closing the channel, give the ports back.
    nexus.remove_flow(flow).unwrap();
    assert!(
        std::net::UdpSocket::bind(local).is_err(),
        "the connected flow still holds it"
    );
    nexus.close_channel(a).unwrap();
    std::net::UdpSocket::bind(local).expect("released when its channel closed");
    drop(b);
    drop(nexus);
}

#[test]
fn an_app_that_dies_releases_its_ports() {
    let d = Daemon::start("flows-death");
    let socket = d.socket.clone();
    // The app is a thread with its own connection: dropping the connection is its death.
    let local = std::thread::spawn(move || {
        let mut nexus = Nexus::connect(&socket).unwrap();
        let ch = nexus.open_channel(ChannelOptions::default()).unwrap();
        let (_, local) = nexus
            .add_flow(&ch, FlowProto::Udp, "127.0.0.1:0".parse().unwrap(), None)
            .unwrap();
        local
    })
    .join()
    .unwrap();
    let start = Instant::now();
    while std::net::UdpSocket::bind(local).is_err() {
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "port not released within 100 ms"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
