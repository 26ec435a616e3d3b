//! `TcpListener` and `TcpStream`: TCP through the stack, like std's.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use netchannel_shm::control::FlowProto;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};

use super::park::Interest;
use super::udp::would_block;
use super::{Closing, FlowGuard, Inner, Stack, Waits, deadline};

/// Bytes of each stream's receive and send buffers (the receive window, scaled).
const BUFFER: usize = 2 * 1024 * 1024;
/// How long a dropped stream may wait for its peer to finish closing before it is reset.
const CLOSE_TIMEOUT_S: u64 = 30;
/// Listening sockets a listener keeps ready by default (connections it can take at once, as
/// std's listeners): a SYN beyond them is dropped, as by a kernel whose accept queue is full,
/// and its client tries again.
pub const DEFAULT_BACKLOG: usize = 128;
/// How long a connection not yet accepted may go without a packet from its peer, by default
/// (see [`TcpListener::set_handshake_timeout`]).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Most finished sockets kept for reuse (each holds its two buffers, 4 MiB, mostly untouched
/// pages).
pub(super) const SPARE_SOCKETS: usize = 64;

/// A socket for a new connection or listener: a finished one reused if there is one (see
/// `Inner::reap`), else a new one. Reuse matters: a new socket's buffers are 4 MiB that the
/// allocator zeroes (once it stops taking them from fresh mappings), which took a third of a
/// server's CPU at 1,000 connections a second, under the stack's lock. `listen` and
/// `connect` reset a reused socket's state; its buffers are only reindexed.
fn new_socket(g: &mut Inner) -> tcp::Socket<'static> {
    let mut s = g.spare_tcp.pop().unwrap_or_else(|| {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; BUFFER]),
            tcp::SocketBuffer::new(vec![0u8; BUFFER]),
        )
    });
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    s.set_keep_alive(None);
    s.set_timeout(None);
    s
}

fn socket_addr(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(e.addr), e.port)
}

/// A TCP listener: one flow with the nexus and a pool of listening sockets behind it, so
/// that many connections can arrive at once.
#[derive(Debug)]
pub struct TcpListener {
    stack: Stack,
    local: SocketAddr,
    /// The listening sockets (locked before the stack, by every path).
    pool: std::sync::Mutex<Vec<SocketHandle>>,
    nonblocking: bool,
    flow: Arc<FlowGuard>,
    accepts: Waits,
    handshake: Duration,
}

impl TcpListener {
    /// Listens on `addr` with [`DEFAULT_BACKLOG`] sockets ready.
    pub fn bind(stack: &Stack, addr: SocketAddr) -> io::Result<Self> {
        Self::bind_with_backlog(stack, addr, DEFAULT_BACKLOG)
    }

    /// Listens on `addr` with `backlog` sockets ready (the SYNs of connections beyond that,
    /// before `accept` takes them, are dropped, and their clients try again).
    pub fn bind_with_backlog(stack: &Stack, addr: SocketAddr, backlog: usize) -> io::Result<Self> {
        let shared = stack.shared().clone();
        let mut g = shared.lock();
        g.check()?;
        let (flow, local) = g.add_flow(&shared, FlowProto::Tcp, addr, None)?;
        let mut pool = Vec::with_capacity(backlog.max(1));
        for _ in 0..backlog.max(1) {
            pool.push(listen(&mut g, local, DEFAULT_HANDSHAKE_TIMEOUT)?);
        }
        // Only now: a listener that failed to bind has no `Drop` to undo it.
        g.dev.listen_port(local.port(), true);
        drop(g);
        Ok(Self {
            stack: stack.clone(),
            local,
            pool: std::sync::Mutex::new(pool),
            nonblocking: false,
            flow,
            accepts: Waits::default(),
            handshake: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// How long a connection may go without a packet from its peer while its handshake is not
    /// done, from its SYN on (default [`DEFAULT_HANDSHAKE_TIMEOUT`]). Past it, the connection
    /// is reset and its socket of the backlog listens again (at the next `accept`). Without
    /// it, a SYN whose sender never answers (a spoofed source) would hold one of the backlog's
    /// sockets for good, and enough of them would refuse every client. A connection whose
    /// handshake is done waits for `accept` as long as it takes, as in a kernel's accept
    /// queue (its timeout goes within 100 ms of the handshake's end, so a timeout shorter
    /// than that may still reset a silent one).
    pub fn set_handshake_timeout(&mut self, d: Duration) -> io::Result<()> {
        if d.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a handshake timeout must be longer than zero",
            ));
        }
        self.handshake = d;
        let pool = self.pool().clone();
        let mine: HashSet<SocketHandle> = pool.iter().copied().collect();
        self.stack.shared().with(|g| {
            for b in g.backlog.iter_mut().filter(|b| mine.contains(&b.handle)) {
                b.handshake = d;
            }
            for h in pool {
                let s = g.sockets.get_mut::<tcp::Socket>(h);
                if handshaking(s.state()) {
                    s.set_timeout(Some(d.into()));
                }
            }
        });
        Ok(())
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// Non-blocking mode: `accept` fails with `WouldBlock` when no connection waits.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        self.nonblocking = on;
        Ok(())
    }

    #[cfg(feature = "tokio")]
    pub(super) fn stack(&self) -> &Stack {
        &self.stack
    }

    #[cfg(feature = "tokio")]
    pub(super) fn handshake(&self) -> Duration {
        self.handshake
    }

    pub(super) fn pool(&self) -> std::sync::MutexGuard<'_, Vec<SocketHandle>> {
        self.pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A stream for a connection the pool accepted.
    pub(super) fn stream(&self, handle: SocketHandle, peer: SocketAddr) -> TcpStream {
        TcpStream::new(&self.stack, handle, self.local, peer, self.flow.clone())
    }

    /// Waits for a connection. Several threads may wait on one listener.
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let shared = self.stack.shared().clone();
        let until = self.nonblocking.then(std::time::Instant::now);
        let local = self.local;
        let mut pool = self.pool();
        let handshake = self.handshake;
        let r = shared.wait(until, &self.accepts, Interest::Any, |g| {
            try_accept(g, &mut pool, local, handshake)
        });
        drop(pool);
        let (handle, peer) = would_block(r, self.nonblocking)?;
        Ok((self.stream(handle, peer), peer))
    }
}

/// Takes a connection the pool has established, putting a fresh listening socket in its
/// place: `None` if none is ready.
pub(super) fn try_accept(
    g: &mut Inner,
    pool: &mut [SocketHandle],
    local: SocketAddr,
    handshake: Duration,
) -> io::Result<Option<(SocketHandle, SocketAddr)>> {
    let ready = pool.iter().position(|h| {
        let s = g.sockets.get::<tcp::Socket>(*h);
        matches!(s.state(), State::Established | State::CloseWait)
    });
    let Some(i) = ready else {
        // A socket whose handshake failed (reset, or timed out) listens again.
        for h in pool.iter() {
            let s = g.sockets.get_mut::<tcp::Socket>(*h);
            if s.state() == State::Closed {
                s.set_timeout(Some(handshake.into()));
                let _ = s.listen(listen_endpoint(local));
            }
        }
        return Ok(None);
    };
    let h = pool[i];
    pool[i] = listen(g, local, handshake)?;
    // Accepted: the handshake's timeout does not limit the connection.
    g.sockets.get_mut::<tcp::Socket>(h).set_timeout(None);
    g.backlog.retain(|b| b.handle != h);
    let peer = g
        .sockets
        .get::<tcp::Socket>(h)
        .remote_endpoint()
        .map(socket_addr)
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
    Ok(Some((h, peer)))
}

fn listen_endpoint(local: SocketAddr) -> IpListenEndpoint {
    IpListenEndpoint {
        addr: (!local.ip().is_unspecified()).then(|| local.ip().into()),
        port: local.port(),
    }
}

fn listen(g: &mut Inner, local: SocketAddr, handshake: Duration) -> io::Result<SocketHandle> {
    let mut s = new_socket(g);
    s.set_timeout(Some(handshake.into()));
    s.listen(listen_endpoint(local))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("listen: {e}")))?;
    let handle = g.sockets.add(s);
    g.backlog.push(Backlogged { handle, handshake });
    Ok(handle)
}

/// How often the backlogs are checked for connections whose handshake is done.
const BACKLOG_CHECK: Duration = Duration::from_millis(100);

/// A socket of a listener's backlog, and the handshake timeout it has while it listens or
/// handshakes.
#[derive(Debug)]
pub(super) struct Backlogged {
    handle: SocketHandle,
    handshake: Duration,
}

/// Whether a backlog socket has no connection yet, or one whose handshake is not done.
fn handshaking(s: State) -> bool {
    matches!(s, State::Listen | State::SynReceived | State::Closed)
}

/// Gives each backlog socket the timeout its state calls for, every [`BACKLOG_CHECK`]: the
/// handshake timeout while it listens or handshakes, none once its connection is established
/// and waits for `accept` (a kernel keeps those in its accept queue however long they are
/// silent; smoltcp's one timeout would reset them).
pub(super) fn time_handshakes(g: &mut Inner, now: Duration) {
    if g.backlog.is_empty() || now < g.next_backlog_check {
        return;
    }
    g.next_backlog_check = now + BACKLOG_CHECK;
    for b in &g.backlog {
        let s = g.sockets.get_mut::<tcp::Socket>(b.handle);
        let want = handshaking(s.state()).then(|| b.handshake.into());
        if s.timeout() != want {
            s.set_timeout(want);
        }
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let pool = std::mem::take(
            self.pool
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mine: HashSet<SocketHandle> = pool.iter().copied().collect();
        let port = self.local.port();
        self.stack.shared().with(|g| {
            g.dev.listen_port(port, false);
            g.backlog.retain(|b| !mine.contains(&b.handle));
            for h in pool {
                let s = g.sockets.get_mut::<tcp::Socket>(h);
                if s.state() == State::Listen || s.state() == State::Closed {
                    g.sockets.remove(h);
                } else {
                    // A connection not yet accepted: reset it, as a kernel listener does.
                    s.abort();
                    g.closing.push(Closing::tcp(h, None));
                }
            }
        });
    }
}

/// A TCP connection on a [`Stack`].
#[derive(Debug)]
pub struct TcpStream {
    stack: Stack,
    handle: SocketHandle,
    local: SocketAddr,
    peer: SocketAddr,
    nonblocking: bool,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    read_shut: bool,
    flow: Option<Arc<FlowGuard>>,
    reads: Waits,
    writes: Waits,
}

impl TcpStream {
    fn new(
        stack: &Stack,
        handle: SocketHandle,
        local: SocketAddr,
        peer: SocketAddr,
        flow: Arc<FlowGuard>,
    ) -> Self {
        Self {
            stack: stack.clone(),
            handle,
            local,
            peer,
            nonblocking: false,
            read_timeout: None,
            write_timeout: None,
            read_shut: false,
            flow: Some(flow),
            reads: Waits::default(),
            writes: Waits::sleeping(),
        }
    }

    /// Connects to `addr` (no time limit, like std's `connect`, beyond TCP's own).
    pub fn connect(stack: &Stack, addr: SocketAddr) -> io::Result<Self> {
        Self::connect_inner(stack, addr, None)
    }

    /// Connects to `addr`, giving up with `TimedOut` after `timeout`.
    pub fn connect_timeout(stack: &Stack, addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        Self::connect_inner(stack, addr, Some(timeout))
    }

    fn connect_inner(
        stack: &Stack,
        addr: SocketAddr,
        timeout: Option<Duration>,
    ) -> io::Result<Self> {
        let shared = stack.shared().clone();
        let (handle, local, flow) = {
            let mut g = shared.lock();
            g.check()?;
            let ip = g.address_for(addr.is_ipv6()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("the stack has no address of {addr}'s family"),
                )
            })?;
            // Port 0: the kernel picks a free ephemeral port and holds it for us.
            let (flow, local) =
                g.add_flow(&shared, FlowProto::Tcp, SocketAddr::new(ip, 0), Some(addr))?;
            let mut s = new_socket(&mut g);
            let remote = IpEndpoint::new(addr.ip().into(), addr.port());
            let cx = g.context();
            s.connect(cx, remote, IpListenEndpoint::from(local))
                .map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("connect: {e}"))
                })?;
            let handle = g.sockets.add(s);
            (handle, local, flow)
        };
        // Poll now so the SYN leaves at once.
        shared.with(|_| ());
        let r = shared.wait(deadline(timeout), &Waits::default(), Interest::Any, |g| {
            let s = g.sockets.get::<tcp::Socket>(handle);
            match s.state() {
                State::Established | State::CloseWait => Ok(Some(())),
                State::Closed => Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("connecting to {addr}: refused"),
                )),
                _ => Ok(None),
            }
        });
        if let Err(e) = r {
            shared.with(|g| {
                g.sockets.get_mut::<tcp::Socket>(handle).abort();
                g.closing.push(Closing::tcp(handle, None));
            });
            drop(flow);
            return Err(e);
        }
        Ok(Self::new(stack, handle, local, addr, flow))
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
    pub(super) fn read_shut(&self) -> bool {
        self.read_shut
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// Non-blocking mode: reads and writes that would wait fail with `WouldBlock`.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        self.nonblocking = on;
        Ok(())
    }

    /// Longest a read waits (`None`: forever); then it fails with `WouldBlock`, as a kernel
    /// socket's `SO_RCVTIMEO` does on Linux.
    pub fn set_read_timeout(&mut self, d: Option<Duration>) -> io::Result<()> {
        self.read_timeout = d;
        Ok(())
    }

    /// Longest a write waits for buffer room (`None`: forever).
    pub fn set_write_timeout(&mut self, d: Option<Duration>) -> io::Result<()> {
        self.write_timeout = d;
        Ok(())
    }

    /// Closes one or both directions: `Write` sends FIN once the queued data is out; `Read`
    /// makes further reads return 0.
    pub fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            self.read_shut = true;
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            let h = self.handle;
            self.stack
                .shared()
                .with(|g| g.sockets.get_mut::<tcp::Socket>(h).close());
        }
        Ok(())
    }

    fn until(&self, timeout: Option<Duration>) -> Option<std::time::Instant> {
        if self.nonblocking {
            Some(std::time::Instant::now())
        } else {
            deadline(timeout)
        }
    }

    fn read_inner(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_shut || buf.is_empty() {
            return Ok(0);
        }
        let shared = self.stack.shared().clone();
        let h = self.handle;
        let r = shared.wait(
            self.until(self.read_timeout),
            &self.reads,
            Interest::TcpRecv(h),
            |g| try_read(g, h, buf),
        );
        let n = would_block(r, self.nonblocking || self.read_timeout.is_some())?;
        // Reading opened the window: tell the peer now.
        if n > 0 {
            shared.with(|_| ());
        }
        Ok(n)
    }

    fn write_inner(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let shared = self.stack.shared().clone();
        let h = self.handle;
        let r = shared.wait(
            self.until(self.write_timeout),
            &self.writes,
            Interest::TcpSend(h),
            |g| try_write(g, h, buf),
        );
        let n = would_block(r, self.nonblocking || self.write_timeout.is_some())?;
        shared.with(|_| ());
        Ok(n)
    }
}

/// Reads what the stream has: `None` if nothing yet.
pub(super) fn try_read(
    g: &mut Inner,
    h: SocketHandle,
    buf: &mut [u8],
) -> io::Result<Option<usize>> {
    let s = g.sockets.get_mut::<tcp::Socket>(h);
    match s.recv_slice(buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        // The peer closed its side and everything it sent was read.
        Err(tcp::RecvError::Finished) => Ok(Some(0)),
        // Closed without a FIN: the peer reset the connection (or it timed out).
        Err(tcp::RecvError::InvalidState) => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )),
    }
}

/// Queues what fits of `buf`: `None` if nothing fits yet.
pub(super) fn try_write(g: &mut Inner, h: SocketHandle, buf: &[u8]) -> io::Result<Option<usize>> {
    let s = g.sockets.get_mut::<tcp::Socket>(h);
    if !s.may_send() {
        let kind = if s.state() == State::Closed {
            io::ErrorKind::ConnectionReset
        } else {
            io::ErrorKind::BrokenPipe
        };
        return Err(io::Error::new(kind, "the connection is closed for writing"));
    }
    match s.send_slice(buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
    }
}

impl io::Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf)
    }
}

impl io::Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf)
    }
}

impl io::Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        // A graceful close: FIN after the queued data; the socket (and the flow, if this was
        // its last user) goes once the connection is closed.
        let h = self.handle;
        let flow = self.flow.take();
        self.stack.shared().with(|g| {
            let s = g.sockets.get_mut::<tcp::Socket>(h);
            s.close();
            // A peer that stops answering must not keep the socket (and its flow) forever.
            s.set_timeout(Some(smoltcp::time::Duration::from_secs(CLOSE_TIMEOUT_S)));
            g.closing.push(Closing::tcp(h, flow));
        });
    }
}
