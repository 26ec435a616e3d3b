//! A user-space TCP/IP stack on a channel: [`UdpSocket`], [`TcpListener`] and [`TcpStream`]
//! that feel like std's, run by smoltcp in this process.
//!
//! A [`Stack`] owns one channel to the nexus and the smoltcp interface on it (the interface's
//! addresses are the ones the nexus serves). Every `bind` or `connect` registers its flow with
//! the nexus, which reserves the port in the kernel too; dropping the socket releases both.
//!
//! The channel has 64 KiB pool buffers and asks for the nexus's TCP offloads
//! ([`Offloads`]): the nexus delivers in-order segments coalesced, up
//! to a buffer each, and cuts the large segments this stack sends to the peer's MSS, computing
//! their checksums as it copies them. smoltcp thus handles one packet per up to ~45 on the
//! wire. (A nexus that refuses large buffers gets the plain channel, and segments stay
//! wire-sized.)
//!
//! Two ways to drive it:
//!
//! * [`Stack::connect`] starts a background thread that polls the stack whenever packets
//!   arrive or a timer is due while no app thread does: a blocking call polls the stack
//!   itself while it waits (spinning a moment, then asleep on the doorbell, so that a packet
//!   wakes the thread that wants it); while one sleeps there, and for a millisecond after,
//!   the background thread stands aside (a thread that just waited usually waits again at
//!   once, and waking the background thread at each return only cost CPU);
//! * [`Stack::connect_manual`] starts none: the app calls [`Stack::poll`] from its own loop
//!   (and sleeps on [`Stack::wakeup_fd`]); blocking calls then drive the stack themselves while
//!   they wait.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use netchannel::stack::{Stack, TcpListener};
//!
//! let stack = Stack::connect(netchannel::nexus::DEFAULT_SOCKET)?;
//! let listener = TcpListener::bind(&stack, "0.0.0.0:8080".parse().unwrap())?;
//! let (mut conn, peer) = listener.accept()?;
//! let mut req = [0u8; 1024];
//! let n = conn.read(&mut req)?;
//! conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")?;
//! # Ok::<(), std::io::Error>(())
//! ```

mod acks;
mod device;
mod park;
mod tcp;
#[cfg(feature = "tokio")]
mod tokio_io;
mod udp;

pub use tcp::{DEFAULT_BACKLOG, DEFAULT_HANDSHAKE_TIMEOUT, TcpListener, TcpStream};
pub use udp::UdpSocket;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netchannel_shm::control::{ErrorCode, FlowProto};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use crate::Error;
use crate::nexus::{ChannelOptions, Nexus, Offloads};
use device::ChannelDevice;

/// How long a blocking call polls the stack itself before it sleeps: a reply from a kernel
/// peer that has to be woken takes 50–150 µs here, and a wake-up of our own would add as much.
/// (Only while the socket's waits usually end that soon: see [`Waits`].)
const SPIN_US: u32 = 200;
const SPIN: Duration = Duration::from_micros(SPIN_US as u64);

/// While spinning, a blocking call polls the stack at least this often (timers), and
/// whenever packets wait.
const SPIN_POLL: Duration = Duration::from_micros(20);

/// Longest a driver sleeps without a reason to wake (timers are polled at least this often).
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// Longest sleep while sending is held up (see `Inner::timer`).
const BACKLOG_SLEEP: Duration = Duration::from_millis(1);
/// How long after a blocking call that slept on the doorbell returns its thread is expected
/// back, so that the driver thread stays aside (see [`Shared::stand_aside`]); also how often
/// it looks again.
const LEASE: Duration = Duration::from_millis(1);
/// Pool buffers the stack asks for: large enough for a coalesced run of segments and a large
/// segment to send, up to IP's 64 KiB (the nexus's GSO then makes one system call per 64 KiB
/// sent: A/B over 16 pairs against 16 KiB, app-to-peer throughput +15%, better in 14; the
/// other direction and round trips unchanged).
const OFFLOAD_BUF_SIZE: u32 = 64 * 1024;
/// Buffers in the stack's pool (128 MiB of address space, touched as used: an ACK in one
/// touches a page). A server's threads may all be off the CPU for a scheduler slice (4 ms)
/// while its peers' ACKs keep coming, 130,000 a second for ten downloads at 3 Gbit/s: with
/// 512, the RX ring filled and the nexus dropped packets for want of a buffer (`rx_no_buf`).
const OFFLOAD_BUFFERS: u32 = 2048;
/// Slots of each of the channel's rings: as many as the pool has buffers, so that a full pool
/// fits on the RX ring.
const OFFLOAD_RING_SLOTS: u32 = 2048;

/// Counters of a [`Stack`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StackStats {
    /// Pure ACKs dropped from the receive queue because a later one of the same connection,
    /// queued behind them, acknowledged more (see the `acks` module): the stack had fallen
    /// behind its peers.
    pub acks_thinned: u64,
    /// SYNs dropped because their listener had no socket of its backlog free (the client
    /// tries again, as when a kernel's accept queue is full).
    pub syns_dropped: u64,
}

/// A user-space TCP/IP stack on one channel of a nexus. Cheap to clone; the last clone (and
/// the last socket) to go closes the channel.
#[derive(Debug, Clone)]
pub struct Stack {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Notified after every poll that changed something, when anyone waits on it.
    changed: Condvar,
    /// Blocking calls waiting on `changed` (counted under the stack's lock).
    waiting: AtomicU32,
    /// A blocking call is driving the stack in the thread's place (see [`Shared::wait`]).
    poller: AtomicBool,
    /// Blocking calls that drove the stack as the poller, so far. (Not those that only spun:
    /// a spinning reader of a bulk transfer got its data while the driver thread took in
    /// the next packets and acknowledged them on the other core; kept aside, it cost that
    /// transfer 8%, 9 of 14 pairs.)
    stints: AtomicU64,
    /// Until when (µs from `epoch`) the thread of the last of them is expected back.
    lease_until: AtomicU64,
    /// Where the driver thread waits (`AT_*`): what a poller finishing must do to rouse it.
    driver_at: AtomicU8,
    epoch: Instant,
    /// Notified when a poller stops, if the driver thread stands aside for long.
    handoff: Condvar,
    /// A duplicate of the channel's doorbell, to sleep on without holding the lock.
    bell: OwnedFd,
    /// This process's own eventfd for rousing a thread asleep on the doorbell (writing to the
    /// doorbell would ring the nexus, not us).
    rouse: OwnedFd,
    driven: bool,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Async tasks waiting for the stack to change (feature `tokio`).
    wakers: Mutex<Vec<std::task::Waker>>,
    /// Flows whose last user went, to be removed at the next poll (a socket may be dropped
    /// while the stack is locked).
    released: Mutex<Vec<u32>>,
    /// The last thread that parked on a socket (see `park`): a poller that stops wakes it, so
    /// that it takes over polling rather than wait for the driver thread.
    last_parked: Mutex<Option<std::thread::Thread>>,
}

pub(crate) struct Inner {
    iface: Interface,
    pub(crate) dev: ChannelDevice,
    pub(crate) sockets: SocketSet<'static>,
    control: Nexus,
    epoch: Instant,
    /// Sockets the app dropped, kept until they have finished (see [`Closing`]).
    closing: Vec<Closing>,
    /// Finished TCP sockets kept for the next connections (see `tcp::new_socket`).
    pub(crate) spare_tcp: Vec<smoltcp::socket::tcp::Socket<'static>>,
    /// The threads parked on one socket each (see `park`).
    parks: park::Parks,
    /// Every listener's backlog sockets, and when to check them next (see
    /// [`tcp::time_handshakes`]).
    backlog: Vec<tcp::Backlogged>,
    next_backlog_check: Duration,
    addresses: Vec<IpAddr>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("dev", &self.dev)
            .field("closing", &self.closing.len())
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

/// A socket the app dropped that has not finished yet: a TCP stream until its connection is
/// closed, a UDP socket until the datagrams it queued have gone (a `send_to` followed by a
/// drop loses nothing, as with a kernel socket, even when the channel had no buffer free at
/// that moment), for at most [`UDP_LINGER`]. The flow stays registered meanwhile, or what
/// is sent would find none.
#[derive(Debug)]
pub(crate) struct Closing {
    handle: SocketHandle,
    /// `Some` for UDP: when to give up.
    udp_until: Option<Instant>,
    _flow: Option<Arc<FlowGuard>>,
}

/// Longest a dropped UDP socket waits for its queued datagrams to go.
const UDP_LINGER: Duration = Duration::from_secs(1);

impl Closing {
    pub(crate) fn tcp(handle: SocketHandle, flow: Option<Arc<FlowGuard>>) -> Self {
        Self {
            handle,
            udp_until: None,
            _flow: flow,
        }
    }

    pub(crate) fn udp(handle: SocketHandle, flow: Arc<FlowGuard>) -> Self {
        Self {
            handle,
            udp_until: Some(Instant::now() + UDP_LINGER),
            _flow: Some(flow),
        }
    }
}

/// Keeps a flow registered while a socket (or a listener's accepted streams) needs it.
#[derive(Debug)]
pub(crate) struct FlowGuard {
    id: u32,
    shared: std::sync::Weak<Shared>,
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        if let Some(s) = self.shared.upgrade() {
            lock(&s.released).push(self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another thread while it held the lock leaves the data as it was; carry on.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The io::Error for a channel that stopped working.
fn channel_error(e: &Error) -> io::Error {
    let kind = match e {
        Error::Defunct { .. } | Error::PeerGone => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("the channel to the nexus failed: {e}"))
}

impl Stack {
    /// Opens a channel on the nexus at `socket` and runs the stack on it, driven by a
    /// background thread.
    pub fn connect(socket: &str) -> io::Result<Self> {
        Self::open(socket, true)
    }

    /// Like [`Stack::connect`], without a thread: the app drives the stack with
    /// [`Stack::poll`].
    pub fn connect_manual(socket: &str) -> io::Result<Self> {
        Self::open(socket, false)
    }

    fn open(socket: &str, driven: bool) -> io::Result<Self> {
        let mut control = Nexus::connect(socket).map_err(|e| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("connecting to the nexus at {socket}: {e}"),
            )
        })?;
        // Large buffers, so that the nexus can coalesce what it receives and the stack can
        // send large TCP segments (an older or stricter nexus gets the plain request).
        let ch = control
            .open_channel(ChannelOptions {
                buf_size: Some(OFFLOAD_BUF_SIZE),
                buffers: Some(OFFLOAD_BUFFERS),
                ring_slots: Some(OFFLOAD_RING_SLOTS),
                offloads: Offloads::ALL,
                ..ChannelOptions::default()
            })
            .or_else(|_| control.open_channel(ChannelOptions::default()))
            .map_err(|e| io::Error::other(format!("opening a channel: {e}")))?;
        // Link-local addresses need a scope the stack does not track; global ones first, so
        // that they are the source of what the stack sends.
        let addresses: Vec<IpAddr> = ch
            .addresses()
            .iter()
            .copied()
            .filter(|a| match a {
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                IpAddr::V4(v4) => !v4.is_link_local(),
            })
            .collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "the nexus serves no interface (start it with --interface), so there is no \
                 address for a protocol stack",
            ));
        }
        let bell = ch
            .wakeup_fd()
            .try_clone_to_owned()
            .map_err(|e| io::Error::other(format!("dup of the channel's doorbell: {e}")))?;
        let rouse = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| io::Error::other(format!("eventfd: {e}")))?;
        let mut dev = ChannelDevice::new(ch);
        let epoch = Instant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed();
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            for ip in &addresses {
                // The nexus routes: every destination is reached through it, so each address
                // stands for a network that holds every destination of its family.
                let _ = a.push(IpCidr::new(IpAddress::from(*ip), 0));
            }
        });
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                iface,
                dev,
                sockets: SocketSet::new(Vec::new()),
                control,
                epoch,
                closing: Vec::new(),
                spare_tcp: Vec::new(),
                parks: park::Parks::default(),
                backlog: Vec::new(),
                next_backlog_check: Duration::ZERO,
                addresses,
            }),
            changed: Condvar::new(),
            waiting: AtomicU32::new(0),
            poller: AtomicBool::new(false),
            stints: AtomicU64::new(0),
            lease_until: AtomicU64::new(0),
            driver_at: AtomicU8::new(AT_WORK),
            epoch,
            handoff: Condvar::new(),
            bell,
            rouse,
            driven,
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            released: Mutex::new(Vec::new()),
            last_parked: Mutex::new(None),
            wakers: Mutex::new(Vec::new()),
        });
        if driven {
            let weak = Arc::downgrade(&shared);
            let t = std::thread::Builder::new()
                .name("netchannel-stack".into())
                .spawn(move || drive(&weak))
                .map_err(|e| io::Error::other(format!("starting the stack's thread: {e}")))?;
            *lock(&shared.thread) = Some(t);
        }
        Ok(Self { shared })
    }

    /// The interface addresses the stack uses as its own.
    pub fn addresses(&self) -> Vec<IpAddr> {
        lock(&self.shared.inner).addresses.clone()
    }

    /// What the stack has done so far (see [`StackStats`]).
    pub fn stats(&self) -> StackStats {
        let g = lock(&self.shared.inner);
        StackStats {
            acks_thinned: g.dev.acks_thinned(),
            syns_dropped: g.dev.syns_dropped(),
        }
    }

    /// The nexus's id of the stack's channel.
    pub fn channel_id(&self) -> u64 {
        lock(&self.shared.inner).dev.channel().id()
    }

    /// Runs the stack once: takes in what arrived, sends what is due. Returns whether anything
    /// changed. Only needed without the background thread ([`Stack::connect_manual`]).
    pub fn poll(&self) -> io::Result<bool> {
        let changed = {
            let mut g = lock(&self.shared.inner);
            let c = g.poll(&self.shared);
            if let Some(e) = &g.dev.broken {
                return Err(channel_error(e));
            }
            c
        };
        if changed {
            self.shared.notify();
        }
        Ok(changed)
    }

    /// How long the app may sleep before [`Stack::poll`] has timers to serve (`None`: until
    /// packets arrive). While sending is held up (no free buffer, or a full TX ring) at most
    /// a millisecond: the doorbell rings when that ends, once armed with [`Stack::arm`].
    pub fn poll_delay(&self) -> Option<Duration> {
        lock(&self.shared.inner).timer()
    }

    /// An fd that becomes readable when packets arrive for the stack (after arming with
    /// [`Stack::arm`]): for an app that drives the stack from its own event loop.
    pub fn wakeup_fd(&self) -> BorrowedFd<'_> {
        self.shared.bell.as_fd()
    }

    /// Asks the nexus to ring [`Stack::wakeup_fd`] when packets arrive (`true`), or not; while
    /// sending is held up (no free buffer, or a full TX ring), also when that ends. Arm after
    /// the last [`Stack::poll`] and before sleeping; then poll once more (what arrived before
    /// the flag was up rang nothing), and sleep on the fd for at most [`Stack::poll_delay`].
    pub fn arm(&self, on: bool) {
        lock(&self.shared.inner).dev.arm(on);
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A random seed for smoltcp (initial sequence numbers and ephemeral choices).
fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    u64::from_ne_bytes(b)
}

/// Where the driver thread is: working, or asleep on the doorbell, or standing aside for at
/// most a [`LEASE`], or for long (a poller that stops must then notify it).
const AT_WORK: u8 = 0;
const AT_BELL: u8 = 1;
const AT_ASIDE: u8 = 2;
const AT_ASIDE_LONG: u8 = 3;

/// [`Shared::stand_aside`]'s rule: whether a blocking call drives (`poller`), whether any
/// finished since the driver thread last looked (`busy`), and the µs left of the lease.
fn aside(poller: bool, busy: bool, lease_left_us: u64) -> Option<(u8, Duration)> {
    if poller {
        return Some(if busy {
            (AT_ASIDE, LEASE)
        } else {
            (AT_ASIDE_LONG, MAX_SLEEP)
        });
    }
    (lease_left_us > 0).then(|| (AT_ASIDE, Duration::from_micros(lease_left_us)))
}

/// The background thread: poll when packets arrive or timers are due.
fn drive(shared: &std::sync::Weak<Shared>) {
    let mut seen = 0;
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        {
            // A blocking call drives the stack (it sleeps on the doorbell itself), or did a
            // moment ago: stand aside. (Pollers stop under the lock, so no notice is lost.)
            let g = lock(&s.inner);
            if let Some((at, wait)) = s.stand_aside(&mut seen) {
                s.driver_at.store(at, Ordering::Relaxed);
                drop(
                    s.handoff
                        .wait_timeout(g, wait)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                continue;
            }
            s.driver_at.store(AT_WORK, Ordering::Relaxed);
        }
        let (changed, sleep) = {
            let mut g = lock(&s.inner);
            let changed = g.poll(&s);
            if g.dev.broken.is_some() {
                drop(g);
                s.notify();
                return;
            }
            let sleep = if changed || g.dev.rx_pending() {
                None
            } else {
                // Rings are cleared before a sleep (off the path of the packet that ends it),
                // and before arming: a ring for what arrives after the check stays.
                let _ = g.dev.channel().clear_bell();
                g.dev.arm(true);
                if g.dev.has_work() {
                    g.dev.arm(false);
                    None
                } else {
                    s.driver_at.store(AT_BELL, Ordering::Relaxed);
                    Some(g.sleep_for(None))
                }
            };
            (changed, sleep)
        };
        if changed {
            s.notify();
        }
        if let Some(d) = sleep {
            sleep_on(s.bell.as_fd(), s.rouse.as_fd(), d);
            let mut g = lock(&s.inner);
            s.driver_at.store(AT_WORK, Ordering::Relaxed);
            // A caller that took over meanwhile owns the doorbell and its flag.
            if !s.poller.load(Ordering::Acquire) {
                g.dev.arm(false);
            }
        }
    }
}

/// Sleeps until the doorbell `bell` rings, `rouse` is written, or `d` passes. A doorbell
/// whose nexus end is gone polls as ready for ever: then only `rouse` and the time count (the
/// calls that follow report the nexus's departure).
fn sleep_on(bell: BorrowedFd<'_>, rouse: BorrowedFd<'_>, d: Duration) {
    use rustix::event::{PollFd, PollFlags};
    let ts = |d: Duration| rustix::time::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    };
    let start = Instant::now();
    let mut fds = [
        PollFd::new(&rouse, PollFlags::IN),
        PollFd::new(&bell, PollFlags::IN),
    ];
    let _ = rustix::event::poll(&mut fds, Some(&ts(d)));
    let bell_gone = fds[1].revents().intersects(PollFlags::HUP | PollFlags::ERR);
    if bell_gone && !fds[0].revents().contains(PollFlags::IN) {
        let left = d.saturating_sub(start.elapsed());
        let _ = rustix::event::poll(&mut fds[..1], Some(&ts(left)));
    }
    if fds[0].revents().contains(PollFlags::IN) {
        let _ = rustix::io::read(rouse, &mut [0u8; 8]);
    }
}

impl Inner {
    pub(crate) fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// One pass of the stack; true if any socket may have changed.
    pub(crate) fn poll(&mut self, shared: &Shared) -> bool {
        let elapsed = self.epoch.elapsed();
        let now = smoltcp::time::Instant::from_micros(elapsed.as_micros() as i64);
        self.dev.refill_rx();
        let had_rx = self.dev.rx_pending();
        self.dev.begin_poll();
        let r = self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.dev.flush();
        let reaped = self.reap();
        tcp::time_handshakes(self, elapsed);
        let released: Vec<u32> = std::mem::take(&mut *lock(&shared.released));
        for id in released {
            if let Err(e) = self.control.remove_flow(id) {
                tracing::debug!(flow = id, error = %e, "releasing a flow");
            }
        }
        had_rx || reaped || r == smoltcp::iface::PollResult::SocketStateChanged
    }

    /// Removes the dropped sockets that have finished.
    fn reap(&mut self) -> bool {
        if self.closing.is_empty() {
            return false;
        }
        let before = self.closing.len();
        let now = Instant::now();
        let sockets = &mut self.sockets;
        let spare = &mut self.spare_tcp;
        let parks = &mut self.parks;
        self.closing.retain(|c| {
            let done = match c.udp_until {
                None => {
                    use smoltcp::socket::tcp::{Socket, State};
                    let s = sockets.get::<Socket>(c.handle);
                    matches!(s.state(), State::Closed | State::TimeWait)
                }
                Some(until) => {
                    let s = sockets.get::<smoltcp::socket::udp::Socket>(c.handle);
                    s.send_queue() == 0 || now >= until
                }
            };
            if done {
                parks.forget(c.handle);
                if let smoltcp::socket::Socket::Tcp(s) = sockets.remove(c.handle)
                    && spare.len() < tcp::SPARE_SOCKETS
                {
                    spare.push(s);
                }
            }
            !done
        });
        self.closing.len() != before
    }

    /// Registers a flow with the nexus (which also reserves the port in the kernel).
    pub(crate) fn add_flow(
        &mut self,
        shared: &Arc<Shared>,
        proto: FlowProto,
        local: SocketAddr,
        remote: Option<SocketAddr>,
    ) -> io::Result<(Arc<FlowGuard>, SocketAddr)> {
        let (id, actual) = self
            .control
            .add_flow(self.dev.channel(), proto, local, remote)
            .map_err(|e| flow_error(&e, local))?;
        Ok((
            Arc::new(FlowGuard {
                id,
                shared: Arc::downgrade(shared),
            }),
            actual,
        ))
    }

    /// The stack's own address of `local`'s family, for a wildcard bind.
    pub(crate) fn address_for(&self, v6: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| a.is_ipv6() == v6)
    }

    /// How long the stack may sleep: until its next timer, briefly while sending is held up,
    /// and at most `cap` (and [`MAX_SLEEP`]).
    fn sleep_for(&mut self, cap: Option<Duration>) -> Duration {
        self.timer()
            .unwrap_or(MAX_SLEEP)
            .min(cap.unwrap_or(MAX_SLEEP))
    }

    /// When the stack's timers next need a poll (`None`: only when packets arrive).
    ///
    /// While sending is held up, smoltcp's timer says "now" (it has something to send), but
    /// nothing can go before the nexus gives back a buffer or TX ring room, which rings the
    /// doorbell once armed (`ChannelDevice::arm`); [`BACKLOG_SLEEP`] is the safety net.
    /// Honouring "now" spun a bulk writer through a poll and two system calls per turn, over
    /// 100,000 turns a second.
    fn timer(&mut self) -> Option<Duration> {
        if self.dev.held_up() {
            return Some(BACKLOG_SLEEP);
        }
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(Duration::from)
    }

    pub(crate) fn dev_ip_mtu(&self) -> usize {
        self.dev.ip_mtu()
    }

    pub(crate) fn context(&mut self) -> &mut smoltcp::iface::Context {
        self.iface.context()
    }

    pub(crate) fn check(&self) -> io::Result<()> {
        match &self.dev.broken {
            Some(e) => Err(channel_error(e)),
            None => Ok(()),
        }
    }
}

/// Maps a refused flow to the error a kernel socket would give.
fn flow_error(e: &Error, local: SocketAddr) -> io::Error {
    let kind = match e {
        Error::Refused { code, .. } => match code {
            ErrorCode::InUse => io::ErrorKind::AddrInUse,
            ErrorCode::NotPermitted => io::ErrorKind::PermissionDenied,
            // The kernel would not reserve it (not an address of this host, mostly).
            ErrorCode::Resource => io::ErrorKind::AddrNotAvailable,
            _ => io::ErrorKind::Other,
        },
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{local}: {e}"))
}

/// Whether a socket's blocking waits should spin before they sleep. Spinning pays only when
/// what the call waits for usually comes within [`SPIN`], as a reply does; a bulk reader whose
/// data comes in bursts far apart spins in vain, on a core that the nexus or the sender needs
/// (measured: 200 µs spins in ~700 of ~900 waits per second, each ending after 320 µs or
/// more). The nexus's pacer decides its own spin the same way.
///
/// The history is the share of recent waits that lasted over twice the spin (an EWMA, in
/// 1/1024); past half, the next wait sleeps at once. A share, not a mean, so that a few long
/// waits (a peer descheduled) do not switch spinning off for a conversation that mostly
/// answers at once. Waits that slept without spinning count too: they include the wake-up,
/// so they can only overstate the wait, and a socket whose waits are short even so spins
/// again. (Twice the spin, because a wake-up on this busy 2-vCPU machine can itself take a
/// spin's length: with the spin as the bound, a round-trip test that once fell asleep could
/// stay asleep, at 70-270 µs round trips instead of 35 µs.)
///
/// Measured, A/B over 14 pairs of `bench tcp` trials: bulk peer-to-app throughput +7% and
/// +11% (11 and 9 pairs of 14 better), the machine's CPU per GB 4% lower, the UDP round
/// trip's p50 within noise (34 vs 36 µs, 40 vs 44 µs).
#[derive(Debug, Default)]
pub(crate) struct Waits {
    long: AtomicU32,
    /// Never spin, whatever the history.
    sleeps: bool,
}

impl Waits {
    const ONE: u32 = 1024;

    /// Waits that never spin: for what cannot come soon enough to pay for it. A TCP write
    /// waits only on a full send buffer (2 MiB, milliseconds of data at link speed), so the
    /// writer can sleep through the wake-up without the link going idle, and a spin would
    /// only take the core from the nexus sending that data. (A/B of app-to-peer bulk: no
    /// spinning anywhere +9% and +14%, in 8 and 9 of 10 pairs; sleeping writes alone +3%, 8 of
    /// 12, and ahead of no spinning anywhere in 9 of 14: the rest of that gain was the writes.)
    pub(crate) fn sleeping() -> Self {
        Self {
            long: AtomicU32::new(0),
            sleeps: true,
        }
    }

    /// How long the next wait spins.
    fn spin(&self) -> Duration {
        if !self.sleeps && self.long.load(Ordering::Relaxed) < Self::ONE / 2 {
            SPIN
        } else {
            Duration::ZERO
        }
    }

    /// Counts a wait that lasted `waited`.
    fn record(&self, waited: Duration) {
        let long = if waited > 2 * SPIN { Self::ONE } else { 0 };
        let old = self.long.load(Ordering::Relaxed);
        self.long.store((old * 7 + long) / 8, Ordering::Relaxed);
    }
}

/// A blocking call driving the stack in the driver thread's place.
struct Poller<'a>(&'a Shared);

impl<'a> Poller<'a> {
    /// Takes over (with the stack locked).
    fn claim(s: &'a Shared) -> Self {
        s.poller.store(true, Ordering::Release);
        Self(s)
    }
}

impl Drop for Poller<'_> {
    /// Hands back (with the stack locked), lazily: the driver thread, standing aside, looks
    /// again within a [`LEASE`] by itself; only one asleep on the doorbell or standing aside
    /// for long is roused. Other blocking calls waiting on this one wake to drive in its place.
    fn drop(&mut self) {
        let s = self.0;
        s.poller.store(false, Ordering::Release);
        s.renew_lease();
        s.notify_waiting();
        if let Some(t) = lock(&s.last_parked).take() {
            t.unpark();
        }
        match s.driver_at.load(Ordering::Relaxed) {
            AT_BELL => {
                let _ = rustix::io::write(&s.rouse, &1u64.to_ne_bytes());
            }
            AT_ASIDE_LONG => s.handoff.notify_all(),
            _ => {}
        }
    }
}

impl Shared {
    fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A poller is done: its thread is expected back soon.
    fn renew_lease(&self) {
        self.stints.fetch_add(1, Ordering::Relaxed);
        let until = self.micros() + LEASE.as_micros() as u64;
        self.lease_until.store(until, Ordering::Relaxed);
    }

    /// Whether the driver thread should stand aside (with the stack locked), where, and for
    /// how long before it looks again: while a blocking call drives asleep on the doorbell,
    /// and for a [`LEASE`] after. The thread that made it usually comes back at once (a bulk
    /// reader or writer waits thousands of times a second), and handing the stack back at
    /// every return woke the driver thread each time, only for it to find nothing to do
    /// (measured: 4,000-6,000 wake-ups a second in bulk transfers). A poller that has driven
    /// for a whole lease without a break (a call blocked on an idle socket) lets the driver
    /// thread stand aside until it notifies it. `seen` is the driver's count of stints at its
    /// last look.
    fn stand_aside(&self, seen: &mut u64) -> Option<(u8, Duration)> {
        let stints = self.stints.load(Ordering::Relaxed);
        let busy = stints != std::mem::replace(seen, stints);
        let left = self
            .lease_until
            .load(Ordering::Relaxed)
            .saturating_sub(self.micros());
        aside(self.poller.load(Ordering::Acquire), busy, left)
    }

    /// Wakes the blocking calls waiting for a change. Only when there are some: a notice is a
    /// system call, and the thread driving the stack would make one per poll that changed
    /// anything (per write of a bulk writer, per segment received).
    fn notify_waiting(&self) {
        // SeqCst: a waiter counts itself under the stack's lock before it sleeps, and the
        // notifier looks after its own change was made under that lock.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }

    /// Wakes every blocking call and async task waiting on the stack.
    pub(crate) fn notify(&self) {
        self.notify_waiting();
        let wakers = std::mem::take(&mut *lock(&self.wakers));
        for w in wakers {
            w.wake();
        }
    }

    /// The async form of [`Shared::wait`]: `ready` now, or `Pending` with the task's waker
    /// registered (under the stack's lock, so no change can slip in between).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll_op<T>(
        self: &Arc<Self>,
        cx: &mut std::task::Context<'_>,
        ready: impl FnOnce(&mut Inner) -> io::Result<Option<T>>,
    ) -> std::task::Poll<io::Result<T>> {
        use std::task::Poll;
        let mut g = lock(&self.inner);
        if !self.driven {
            // Nobody else polls: do it here.
            g.poll(self);
        }
        let r = g.check().and_then(|()| ready(&mut g));
        match r {
            Ok(Some(v)) => {
                // Send what the operation queued, now.
                let changed = g.poll(self);
                drop(g);
                if changed {
                    self.notify();
                }
                Poll::Ready(Ok(v))
            }
            Err(e) => Poll::Ready(Err(e)),
            Ok(None) => {
                lock(&self.wakers).push(cx.waker().clone());
                if !self.driven {
                    // Without a driver, come back soon rather than never.
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }

    /// Waits until `ready` returns a value, or `deadline` passes (`Err(TimedOut)`), driving
    /// the stack itself when no thread does. `ready` runs with the stack locked. `waits` is
    /// the history of this kind of wait on this socket.
    pub(crate) fn wait<T>(
        self: &Arc<Self>,
        deadline: Option<Instant>,
        waits: &Waits,
        interest: park::Interest,
        mut ready: impl FnMut(&mut Inner) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        let mut g = lock(&self.inner);
        if let Some(v) = ready(&mut g)? {
            return Ok(v);
        }
        let start = Instant::now();
        let r = self.wait_more(g, deadline, waits.spin(), interest, ready);
        waits.record(start.elapsed());
        r
    }

    fn wait_more<'a, T>(
        self: &'a Arc<Self>,
        mut g: MutexGuard<'a, Inner>,
        deadline: Option<Instant>,
        spin: Duration,
        interest: park::Interest,
        mut ready: impl FnMut(&mut Inner) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        // Before handing over to the driver thread, poll the stack from this thread for a
        // moment: an answer that comes back within it costs no thread wake-up. Never past the
        // deadline: a non-blocking call (deadline now) returns WouldBlock at once.
        let now = Instant::now();
        let spin_until = deadline.map_or(now + spin, |d| d.min(now + spin));
        let mut next_poll = now;
        // A local, dropped before the guard (a parameter), so while the stack is still locked.
        let mut poller: Option<Poller<'_>> = None;
        loop {
            if let Some(v) = ready(&mut g)? {
                return Ok(v);
            }
            g.check()?;
            let now = Instant::now();
            if self.driven && now < spin_until {
                // Poll when packets wait, and now and then for timers: a full pass of the
                // stack per turn of the loop would take the lock (and the core) from the
                // threads doing the work.
                if g.dev.rx_pending() || now >= next_poll {
                    next_poll = now + SPIN_POLL;
                    if g.poll(self) {
                        self.notify();
                    }
                }
                drop(g);
                std::hint::spin_loop();
                g = lock(&self.inner);
                continue;
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l,
                    _ => return Err(io::Error::from(io::ErrorKind::TimedOut)),
                },
                None => MAX_SLEEP,
            };
            // Past the spin, the first blocking call drives the stack itself and sleeps on the
            // doorbell, as without a driver thread: a packet then wakes the thread that wants
            // it, not the driver first and this thread second (each wake-up is a trip through
            // the scheduler, which on a busy small machine takes up to a millisecond).
            if self.driven && poller.is_none() && !self.poller.load(Ordering::Acquire) {
                poller = Some(Poller::claim(self));
            }
            if self.driven && poller.is_none() {
                // Another call drives: wait for it (or the thread) to report a change, of this
                // call's socket only when it has one (see `park`).
                let Inner { parks, sockets, .. } = &mut *g;
                if parks.register(sockets, interest) {
                    *lock(&self.last_parked) = Some(std::thread::current());
                    drop(g);
                    std::thread::park_timeout(left.min(MAX_SLEEP));
                    g = lock(&self.inner);
                    continue;
                }
                self.waiting.fetch_add(1, Ordering::SeqCst);
                g = self
                    .changed
                    .wait_timeout(g, left.min(MAX_SLEEP))
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            if g.poll(self) {
                if self.driven {
                    self.notify();
                }
                continue;
            }
            let delay = g.sleep_for(Some(left));
            let _ = g.dev.channel().clear_bell();
            g.dev.arm(true);
            if g.dev.has_work() {
                g.dev.arm(false);
                continue;
            }
            drop(g);
            sleep_on(self.bell.as_fd(), self.rouse.as_fd(), delay);
            g = lock(&self.inner);
            g.dev.arm(false);
        }
    }

    /// Runs `f` on the locked stack, then polls so that what it queued goes out now.
    pub(crate) fn with<T>(self: &Arc<Self>, f: impl FnOnce(&mut Inner) -> T) -> T {
        let (v, changed) = {
            let mut g = lock(&self.inner);
            let v = f(&mut g);
            let c = g.poll(self);
            (v, c)
        };
        if changed {
            self.notify();
        }
        v
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The driver holds only a weak reference; the last strong one going stops it.
        if Arc::strong_count(&self.shared) == 1 {
            self.shared.stop.store(true, Ordering::Relaxed);
            if let Some(t) = lock(&self.shared.thread).take() {
                let _ = t.join();
            }
        }
    }
}

/// A deadline `d` from now.
pub(crate) fn deadline(d: Option<Duration>) -> Option<Instant> {
    d.map(|d| Instant::now() + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_spin_until_most_of_them_run_long_and_again_once_most_are_short() {
        let w = Waits::default();
        assert_eq!(w.spin(), SPIN, "a new socket spins");
        // Replies within the spin, with now and then a slow one: it keeps spinning.
        for i in 0..100 {
            let d = if i % 4 == 0 { 10 * SPIN } else { SPIN / 4 };
            w.record(d);
            assert_eq!(w.spin(), SPIN, "wait {i}");
        }
        // A bulk reader's long gaps: a few in a row switch spinning off.
        let mut off_after = None;
        for i in 0..20 {
            w.record(5 * SPIN);
            if w.spin().is_zero() {
                off_after = Some(i + 1);
                break;
            }
        }
        assert!(
            matches!(off_after, Some(2..=8)),
            "spinning went off after {off_after:?} long waits"
        );
        // Waits between one and two spins (a wake-up's length) count as short.
        let mut on_after = None;
        for i in 0..20 {
            w.record(SPIN * 3 / 2);
            if w.spin() == SPIN {
                on_after = Some(i + 1);
                break;
            }
        }
        assert!(
            matches!(on_after, Some(1..=8)),
            "spinning came back after {on_after:?} short waits"
        );
    }

    #[test]
    fn the_driver_thread_stands_aside_while_a_call_drives_and_for_a_lease_after() {
        // A call drives and others keep finishing: look again within a lease.
        assert_eq!(aside(true, true, 0), Some((AT_ASIDE, LEASE)));
        // A call has driven alone since the last look (blocked on an idle socket): stand
        // aside until it hands back, which then notifies.
        assert_eq!(aside(true, false, 0), Some((AT_ASIDE_LONG, MAX_SLEEP)));
        // A call finished a moment ago: its thread is likely back before the lease ends.
        assert_eq!(
            aside(false, true, 300),
            Some((AT_ASIDE, Duration::from_micros(300)))
        );
        // Nobody drives and the lease is over: the thread drives.
        assert_eq!(aside(false, true, 0), None);
        assert_eq!(aside(false, false, 0), None);
    }

    #[test]
    fn sleeping_waits_never_spin_however_short_they_are() {
        let w = Waits::sleeping();
        for _ in 0..20 {
            assert!(w.spin().is_zero());
            w.record(Duration::from_micros(1));
        }
    }
}
