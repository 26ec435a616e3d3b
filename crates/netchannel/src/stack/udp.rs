//! `UdpSocket`: datagrams through the stack, like `std::net::UdpSocket`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use netchannel_shm::control::FlowProto;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};

use super::park::Interest;
use super::{Closing, FlowGuard, Inner, Stack, Waits, deadline};

/// Datagrams each direction may queue, and their bytes.
const QUEUE_DATAGRAMS: usize = 256;
const QUEUE_BYTES: usize = 256 * 1024;

/// A UDP socket on a [`Stack`]. Binding registers a flow with the nexus (and reserves the
/// port in the kernel); dropping the socket releases both, once what it queued has gone.
#[derive(Debug)]
pub struct UdpSocket {
    stack: Stack,
    handle: SocketHandle,
    local: SocketAddr,
    peer: Option<SocketAddr>,
    nonblocking: bool,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    flow: Arc<FlowGuard>,
    sends: Waits,
    recvs: Waits,
}

fn endpoint(a: SocketAddr) -> IpEndpoint {
    IpEndpoint::new(a.ip().into(), a.port())
}

fn socket_addr(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(e.addr), e.port)
}

impl UdpSocket {
    /// Binds to `addr` (port 0: the kernel picks a free one; an unspecified address: every
    /// address of the stack in that family).
    pub fn bind(stack: &Stack, addr: SocketAddr) -> io::Result<Self> {
        let shared = stack.shared().clone();
        let mut g = shared.lock();
        g.check()?;
        let (flow, local) = g.add_flow(&shared, FlowProto::Udp, addr, None)?;
        let buf = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; QUEUE_DATAGRAMS],
                vec![0u8; QUEUE_BYTES],
            )
        };
        let mut sock = udp::Socket::new(buf(), buf());
        let listen = IpListenEndpoint {
            addr: (!local.ip().is_unspecified()).then(|| local.ip().into()),
            port: local.port(),
        };
        sock.bind(listen)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bind: {e}")))?;
        let handle = g.sockets.add(sock);
        drop(g);
        Ok(Self {
            stack: stack.clone(),
            handle,
            local,
            peer: None,
            nonblocking: false,
            read_timeout: None,
            write_timeout: None,
            flow,
            sends: Waits::default(),
            recvs: Waits::default(),
        })
    }

    #[cfg(feature = "tokio")]
    pub(super) fn stack(&self) -> &Stack {
        &self.stack
    }

    #[cfg(feature = "tokio")]
    pub(super) fn handle(&self) -> SocketHandle {
        self.handle
    }

    #[cfg(feature = "tokio")]
    pub(super) fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The local address (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// The peer of [`UdpSocket::connect`].
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.peer
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Sends to and receives from `addr` only, from now on.
    pub fn connect(&mut self, addr: SocketAddr) -> io::Result<()> {
        self.peer = Some(addr);
        Ok(())
    }

    /// Non-blocking mode: calls that would wait fail with `WouldBlock` instead.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        self.nonblocking = on;
        Ok(())
    }

    /// Longest a receive waits (`None`: forever); then it fails with `WouldBlock`, as a kernel
    /// socket's `SO_RCVTIMEO` does on Linux.
    pub fn set_read_timeout(&mut self, d: Option<Duration>) -> io::Result<()> {
        self.read_timeout = d;
        Ok(())
    }

    /// Longest a send waits for queue room (`None`: forever).
    pub fn set_write_timeout(&mut self, d: Option<Duration>) -> io::Result<()> {
        self.write_timeout = d;
        Ok(())
    }

    fn wait_deadline(&self, timeout: Option<Duration>) -> Option<std::time::Instant> {
        if self.nonblocking {
            Some(std::time::Instant::now())
        } else {
            deadline(timeout)
        }
    }

    /// Sends one datagram to `addr`; returns its length.
    pub fn send_to(&self, buf: &[u8], addr: SocketAddr) -> io::Result<usize> {
        let shared = self.stack.shared().clone();
        let handle = self.handle;
        let r = shared.wait(
            self.wait_deadline(self.write_timeout),
            &self.sends,
            Interest::UdpSend(handle),
            |g| try_send_to(g, handle, buf, addr),
        );
        let r = would_block(r, self.nonblocking);
        if r.is_ok() {
            shared.with(|_| ());
        }
        r
    }

    /// Receives one datagram; returns its length (truncated to `buf`) and its sender.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let shared = self.stack.shared().clone();
        let handle = self.handle;
        let peer = self.peer;
        let r = shared.wait(
            self.wait_deadline(self.read_timeout),
            &self.recvs,
            Interest::UdpRecv(handle),
            |g| try_recv_from(g, handle, buf, peer),
        );
        would_block(r, self.nonblocking || self.read_timeout.is_some())
    }

    /// Sends to the connected peer.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.send_to(buf, self.peer_addr()?)
    }

    /// Receives from the connected peer.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.peer_addr()?;
        self.recv_from(buf).map(|(n, _)| n)
    }
}

/// Queues one datagram: `None` if the queue has no room yet.
pub(super) fn try_send_to(
    g: &mut Inner,
    handle: SocketHandle,
    buf: &[u8],
    addr: SocketAddr,
) -> io::Result<Option<usize>> {
    // A datagram larger than the link's MTU goes whole to the nexus, which fragments it (as
    // the kernel does for a socket); what no buffer of the channel holds cannot go.
    let max = g.dev_ip_mtu();
    let header = if addr.is_ipv6() { 48 } else { 28 };
    if buf.len() + header > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a datagram of {} bytes is larger than this channel carries ({} bytes of \
                 payload over {}: an IP packet of at most {max} bytes)",
                buf.len(),
                max.saturating_sub(header),
                if addr.is_ipv6() { "IPv6" } else { "IPv4" },
            ),
        ));
    }
    let s = g.sockets.get_mut::<udp::Socket>(handle);
    match s.send_slice(buf, endpoint(addr)) {
        Ok(()) => Ok(Some(buf.len())),
        Err(udp::SendError::BufferFull) => Ok(None),
        Err(udp::SendError::Unaddressable) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot send to {addr}"),
        )),
    }
}

/// Takes one datagram (from `peer` only, if given): `None` if none waits.
pub(super) fn try_recv_from(
    g: &mut Inner,
    handle: SocketHandle,
    buf: &mut [u8],
    peer: Option<SocketAddr>,
) -> io::Result<Option<(usize, SocketAddr)>> {
    let s = g.sockets.get_mut::<udp::Socket>(handle);
    loop {
        // smoltcp refuses a datagram longer than `buf`; std truncates, so take it whole.
        let (n, from) = match s.recv() {
            Ok((data, meta)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                (n, socket_addr(meta.endpoint))
            }
            Err(_) => return Ok(None),
        };
        // A connected socket hears its peer only.
        if peer.is_none_or(|p| p == from) {
            return Ok(Some((n, from)));
        }
    }
}

/// A wait that ran out is `WouldBlock` for a non-blocking call or a read timeout (as Linux
/// reports `EAGAIN`).
pub(super) fn would_block<T>(r: io::Result<T>, as_would_block: bool) -> io::Result<T> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::TimedOut && as_would_block => {
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        }
        r => r,
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        // Removed once what it queued has gone (at the poll that follows, mostly).
        let closing = Closing::udp(self.handle, self.flow.clone());
        self.stack.shared().with(|g| g.closing.push(closing));
    }
}
