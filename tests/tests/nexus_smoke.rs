//! A first end-to-end pass through a real nexus process: open a channel, reflect packets,
//! read the status, revoke the channel under a blocked wait.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use netchannel::nexus::{ChannelOptions, Nexus};
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
