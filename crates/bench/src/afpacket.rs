//! A fast UDP traffic generator over AF_PACKET, for benchmarks that need a source of wire
//! frames the kernel's UDP stack does not produce itself (e.g. offered load into a veth).
//!
//! The Ethernet + IP + UDP frame is built once, with a correct IPv4 header checksum and UDP
//! checksum, and every datagram sent is a copy of it: one `sendmmsg` call sends a whole batch
//! of headers that all point at the same buffer. Copies are therefore indistinguishable; a
//! receiver counts them and checks their length and contents.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use netchannel_nexus::netif::packet;
use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// `sendmmsg` sends at most `UIO_MAXIOV` messages per call; so does [`Generator::send_batch`].
const MAX_BATCH: usize = 1024;
/// Time to live of the generated IPv4 datagrams (hop limit, for IPv6).
const TTL: u8 = 64;

/// What the generator sends: one UDP datagram of `payload_len` bytes, framed for Ethernet.
///
/// IPv4 only for now; the frame is built by [`build_frame`], which already takes either
/// family, so IPv6 needs only wider address fields here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameSpec {
    /// Ethernet source address.
    pub(crate) src_mac: [u8; 6],
    /// Ethernet destination address: the receiving interface's, or it drops the frames.
    pub(crate) dst_mac: [u8; 6],
    /// UDP source.
    pub(crate) src: SocketAddrV4,
    /// UDP destination.
    pub(crate) dst: SocketAddrV4,
    /// UDP payload length; the whole frame must fit the interface's MTU (plus the Ethernet
    /// header), or sends fail with EMSGSIZE.
    pub(crate) payload_len: usize,
}

impl FrameSpec {
    /// The frame, payload bytes `0, 1, 2, …` (mod 256).
    pub(crate) fn build(&self) -> io::Result<Vec<u8>> {
        let payload: Vec<u8> = (0..self.payload_len).map(|i| i as u8).collect();
        build_frame(
            self.src_mac,
            self.dst_mac,
            SocketAddr::V4(self.src),
            SocketAddr::V4(self.dst),
            &payload,
        )
    }
}

/// An Ethernet + IPv4 or IPv6 + UDP frame carrying `payload`, checksums filled in.
fn build_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> io::Result<Vec<u8>> {
    let eth = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac);
    let ip = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => eth.ipv4(s.ip().octets(), d.ip().octets(), TTL),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => eth.ipv6(s.ip().octets(), d.ip().octets(), TTL),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source {src} and destination {dst} are of different families"),
            ));
        }
    };
    let udp = ip.udp(src.port(), dst.port());
    let mut frame = Vec::with_capacity(udp.size(payload.len()));
    udp.write(&mut frame, payload).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot build a UDP frame with {} payload bytes: {e}",
                payload.len()
            ),
        )
    })?;
    Ok(frame)
}

/// Sends copies of one prebuilt frame through an AF_PACKET socket bound to one interface.
pub(crate) struct Generator {
    fd: OwnedFd,
    ifindex: u32,
    /// The frame; its heap storage never moves while the generator lives.
    frame: Box<[u8]>,
    /// The one iovec (pointing at `frame`) that every header shares; boxed so that its address
    /// is stable while the generator (and `hdrs`) move or grow.
    iov: Box<libc::iovec>,
    /// Message headers for `sendmmsg`, each pointing at `iov`; grown on demand up to
    /// [`MAX_BATCH`] and then reused.
    hdrs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("fd", &self.fd)
            .field("ifindex", &self.ifindex)
            .field("frame_len", &self.frame.len())
            .field("hdrs", &self.hdrs.len())
            .finish()
    }
}

// SAFETY: the raw pointers in `iov` and `hdrs` only point into the generator's own heap
// allocations (`frame` and `iov`), which move with it and are never shared.
unsafe impl Send for Generator {}

impl Generator {
    /// Opens an AF_PACKET socket on interface `ifname` (in the calling thread's network
    /// namespace) and builds the frame of `spec`. Needs root or CAP_NET_RAW.
    ///
    /// The socket is bound with protocol 0, so it receives nothing, and asks for
    /// `PACKET_QDISC_BYPASS` (frames skip the interface's queueing discipline; where the
    /// kernel refuses, they go through it instead).
    pub(crate) fn open(ifname: &str, spec: FrameSpec) -> io::Result<Self> {
        let mut frame = spec.build()?.into_boxed_slice();
        // Any socket serves to look the name up; the AF_PACKET one is bound to the index.
        let probe = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let ifindex = rustix::net::netdevice::name_to_index(&probe, ifname).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("no interface {ifname:?} in this network namespace: {e}"),
            )
        })?;
        let fd = packet::send_only_socket(ifindex).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("an AF_PACKET socket on {ifname:?}: {e} (needs root or CAP_NET_RAW)"),
            )
        })?;
        // Failure (older kernels) is harmless: the frames go through the qdisc.
        let _ = packet::set_option(&fd, packet::PACKET_QDISC_BYPASS, 1);
        let iov = Box::new(libc::iovec {
            iov_base: frame.as_mut_ptr().cast(),
            iov_len: frame.len(),
        });
        let mut g = Self {
            fd,
            ifindex,
            frame,
            iov,
            hdrs: Vec::new(),
        };
        g.reserve(64);
        Ok(g)
    }

    /// Makes sure at least `n` (at most [`MAX_BATCH`]) headers exist.
    fn reserve(&mut self, n: usize) {
        let iov: *mut libc::iovec = &raw mut *self.iov;
        while self.hdrs.len() < n.min(MAX_BATCH) {
            // SAFETY: an all-zero msghdr is a valid "no address, no control" header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
    }

    /// Sends up to `n` (at most 1024) copies of the frame in one `sendmmsg` call; returns how
    /// many the kernel took. A full queue (ENOBUFS, EAGAIN) or a signal (EINTR) before the
    /// first is not an error: the result is then 0, and the caller tries again.
    pub(crate) fn send_batch(&mut self, n: usize) -> io::Result<usize> {
        self.reserve(n);
        let n = n.min(self.hdrs.len());
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: `hdrs[..n]` are valid headers without address or control data, each with one
        // iovec (`*self.iov`) describing `frame`; all of it is owned by `self`, alive and not
        // otherwise borrowed during the call. The kernel only reads the iovec and frame, and
        // writes each header's `msg_len`.
        let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), self.hdrs.as_mut_ptr(), n as u32, 0) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => Ok(0),
            _ => Err(e),
        }
    }

    /// Sends batches of `batch` (1 to 1024) frames as fast as the kernel takes them for
    /// `duration`; returns how many frames it took. Frames a full receive side drops later
    /// still count: this is the offered load.
    pub(crate) fn run_for(&mut self, duration: Duration, batch: usize) -> io::Result<u64> {
        let batch = batch.clamp(1, MAX_BATCH);
        self.reserve(batch);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            match self.send_batch(batch)? {
                0 => std::thread::yield_now(),
                k => sent += k as u64,
            }
        }
        Ok(sent)
    }
}

impl AsFd for Generator {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, UdpSocket};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    use netchannel_testbed::Bed;
    use rustix::fs::{Mode, OFlags};
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

    const PAYLOAD: usize = 64;

    /// The 16-bit one's-complement sum of `data` (odd length padded with a zero byte).
    fn ones_sum(data: &[u8], mut acc: u32) -> u32 {
        for c in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc
    }

    fn spec(dst_mac: [u8; 6], dst_port: u16) -> FrameSpec {
        FrameSpec {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac,
            src: SocketAddrV4::new(Ipv4Addr::new(198, 18, 99, 1), 40000),
            dst: SocketAddrV4::new(Ipv4Addr::new(198, 18, 99, 2), dst_port),
            payload_len: PAYLOAD,
        }
    }

    #[test]
    fn the_frame_has_correct_checksums() {
        for len in [0, 1, 17, PAYLOAD, 1400] {
            let s = FrameSpec {
                payload_len: len,
                ..spec([0x02, 0, 0, 0, 0, 0x02], 9)
            };
            let f = s.build().unwrap();
            assert_eq!(f.len(), 14 + 20 + 8 + len);
            assert_eq!(&f[0..6], &s.dst_mac);
            assert_eq!(&f[6..12], &s.src_mac);
            assert_eq!(&f[12..14], &[0x08, 0x00]);
            let ip = &f[14..34];
            assert_eq!(ones_sum(ip, 0), 0xffff, "IPv4 header checksum");
            assert_eq!(ip[9], 17);
            let udp = &f[34..];
            assert_ne!(&udp[6..8], &[0, 0], "UDP checksum must be filled in");
            // Pseudo-header: addresses, protocol, UDP length.
            let mut acc = ones_sum(&ip[12..20], 0);
            acc = ones_sum(&[0, 17], acc);
            acc = ones_sum(&(udp.len() as u16).to_be_bytes(), acc);
            assert_eq!(ones_sum(udp, acc), 0xffff, "UDP checksum, payload {len}");
            assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 9);
            assert!(udp[8..].iter().enumerate().all(|(i, &b)| b == i as u8));
        }
        let too_big = FrameSpec {
            payload_len: 70_000,
            ..spec([0; 6], 9)
        };
        assert!(too_big.build().is_err());
    }

    /// Moves the calling thread into network namespace `ns` (a test thread of its own).
    fn enter(ns: &str) {
        let fd = rustix::fs::open(
            format!("/run/netns/{ns}").as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network)).unwrap();
    }

    #[test]
    fn frames_reach_a_kernel_udp_socket_through_a_veth() {
        if !rustix::process::geteuid().is_root() {
            println!("skipped: frames_reach_a_kernel_udp_socket_through_a_veth needs root");
            return;
        }
        // Both ends live in namespaces of their own: the host's is not touched. Deleted
        // however the test ends.
        let bed = Bed::builder("afp")
            .slot(99)
            .host_in_netns(true)
            .build()
            .unwrap();
        let near = bed.host_ns().unwrap().name();
        let far = bed.ns().name();
        let (near_dev, near_mac, far_mac) = (bed.host(), bed.host_mac(), bed.peer_mac());
        let (near_ip, far_ip) = (bed.host4(), bed.peer4());

        let stop = AtomicBool::new(false);
        let (port_tx, port_rx) = mpsc::channel();
        let (sent, (good, bad)) = std::thread::scope(|s| {
            let receiver = s.spawn(|| {
                enter(far);
                let sock = UdpSocket::bind((far_ip, 0)).unwrap();
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                port_tx.send(sock.local_addr().unwrap().port()).unwrap();
                let (mut good, mut bad) = (0u64, 0u64);
                let mut buf = [0u8; 2048];
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    match sock.recv(&mut buf) {
                        Ok(n)
                            if n == PAYLOAD
                                && buf[..n].iter().enumerate().all(|(i, &b)| b == i as u8) =>
                        {
                            good += 1;
                        }
                        Ok(_) => bad += 1,
                        Err(_) if stop.load(Ordering::Acquire) => break,
                        Err(_) => {}
                    }
                }
                (good, bad)
            });
            // Whatever happens to the generator, the receiver is told to stop, so the scope
            // can end.
            let sent = match port_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(port) => s
                    .spawn(move || {
                        enter(near);
                        let mut g = Generator::open(
                            near_dev,
                            FrameSpec {
                                src_mac: near_mac,
                                src: SocketAddrV4::new(near_ip, 40000),
                                dst: SocketAddrV4::new(far_ip, port),
                                ..spec(far_mac, port)
                            },
                        )?;
                        g.run_for(Duration::from_millis(200), 32)
                    })
                    .join()
                    .map_err(|_| "the generator panicked".to_owned())
                    .and_then(|r| r.map_err(|e| format!("generator: {e}"))),
                Err(_) => Err("the receiver did not start".to_owned()),
            };
            stop.store(true, Ordering::Release);
            (sent, receiver.join().expect("receiver panicked"))
        });
        let sent = sent.unwrap();
        println!("sent {sent} frames; received {good} good, {bad} bad datagrams");
        assert!(sent > 0);
        assert!(good > 0, "no datagram arrived (sent {sent})");
        assert_eq!(bad, 0);
        assert!(good <= sent);
    }
}
