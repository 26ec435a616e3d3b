//! One end of a channel: its mappings, its rings, its ledger and its doorbells.
//!
//! The same type serves both ends. The **app** end produces TX and FREE and consumes RX, ALLOC
//! and EVENT; the **server** end (the nexus, or the serving end of a user pipe) the reverse. The
//! API is named from the end's own point of view:
//!
//! | call | app end | server end |
//! |---|---|---|
//! | [`Endpoint::send`] | TX | RX |
//! | [`Endpoint::recv`] | RX | TX |
//! | [`Endpoint::free`] returns peer buffers on | FREE | ALLOC |
//! | [`Endpoint::alloc`] refills from | ALLOC | FREE |
//!
//! Every descriptor read from the peer is copied into a local once, checked against the pool's
//! bounds and against this end's private [`Ledger`], and dropped and counted under a
//! [`Violation`] reason if it fails. An impossible ring index is an [`Error::RingIndexOob`]: the
//! channel cannot be trusted any more and every later call fails the same way.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use crate::doorbell::{Doorbell, Drained};
use crate::layout::{self, ChannelLayout, Geometry, RegionLayout, Schema, state};
use crate::ledger::{AuditError, Counts, Ledger};
use crate::pool::Pool;
use crate::region::{Access, Region};
use crate::ring::{Consumer, Desc, HalfHeader, Producer, RingKind, RingPtrs, Slot};
use crate::{DefunctReason, Error, Role, Violation};

/// A packet in a buffer this end holds: bytes `[offset, offset + len)` of buffer `buf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Buffer index.
    pub buf: u32,
    /// Start of the data in the buffer.
    pub offset: u32,
    /// Length of the data.
    pub len: u32,
}

/// Which segments of the pool an end owns (puts in service, and may give back to the OS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// Every segment (a nexus).
    All,
    /// No segment: every buffer comes from the peer (an app of a nexus).
    Nothing,
    /// The lower half of the segments (the serving end of a user pipe).
    LowerHalf,
    /// The upper half of the segments (the app end of a user pipe).
    UpperHalf,
}

impl Home {
    fn owns(self, seg: u32, segments: u32) -> bool {
        match self {
            Self::All => true,
            Self::Nothing => false,
            Self::LowerHalf => seg < segments / 2,
            Self::UpperHalf => seg >= segments / 2,
        }
    }
}

/// What a wait waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// A packet to receive.
    Readable,
    /// Room to send.
    Writable,
    /// A buffer to allocate (in the free list, or returned by the peer).
    Buffers,
    /// A buffer returned by the peer on the incoming buffer ring (servers, whose free list is
    /// rarely empty, wait for this rather than for `Buffers`).
    Returns,
}

/// How a wait behaves: spin for a while, then sleep on the doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// How long to poll the rings before sleeping. Zero sleeps at once.
    pub spin: Duration,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self {
            spin: Duration::from_micros(20),
        }
    }
}

/// Counters of one end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets sent.
    pub sent: u64,
    /// Packets received and accepted.
    pub received: u64,
    /// Buffers returned to the peer.
    pub returned: u64,
    /// Buffers the peer returned to us.
    pub reclaimed: u64,
    /// Dropped descriptors, by ring and reason (`[RingKind::index][Violation::index]`).
    pub violations: [[u64; Violation::COUNT]; 5],
    /// Impossible ring indices seen (each ends the channel).
    pub ring_index_oob: u64,
    /// Times this end rang the peer's doorbell.
    pub doorbells: u64,
    /// Times this end went to sleep in a wait.
    pub sleeps: u64,
    /// Idle pool segments whose memory could not be given back to the OS (they stay in
    /// service).
    pub release_failures: u64,
}

impl Stats {
    /// Every non-zero drop counter as (`"rx_not_owner"`, count).
    pub fn drop_counters(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for kind in RingKind::ALL {
            for (i, &n) in self.violations[kind.index()].iter().enumerate() {
                if n > 0 {
                    out.push((format!("{}_{}", kind.name(), Violation::name_of(i)), n));
                }
            }
        }
        if self.ring_index_oob > 0 {
            out.push(("ring_index_oob".into(), self.ring_index_oob));
        }
        if self.release_failures > 0 {
            out.push(("pool_release_failed".into(), self.release_failures));
        }
        out
    }

    /// Sum of every per-descriptor drop.
    pub fn total_violations(&self) -> u64 {
        self.violations.iter().flatten().sum()
    }
}

/// The fds the server end sends to the app end.
#[derive(Debug)]
pub struct ServerFds<'a> {
    /// The server region (schema and server ring halves).
    pub region: BorrowedFd<'a>,
    /// The pool.
    pub pool: BorrowedFd<'a>,
    /// The app's end of the channel's doorbell.
    pub bell: BorrowedFd<'a>,
}

/// A server end that has built its memory and waits for the app end's region.
#[derive(Debug)]
pub struct ServerSetup {
    layout: ChannelLayout,
    region: Region,
    pool: Pool,
    bell: Doorbell,
    /// The app's end of the doorbell, until it is sent (then dropped: the server must not hold
    /// it, so that the app's exit closes it).
    app_bell: OwnedFd,
    cookie: u64,
}

impl ServerSetup {
    /// Builds the server region (with a fresh schema) and the pool for `geometry`.
    pub fn new(geometry: Geometry) -> Result<Self, Error> {
        let layout = ChannelLayout::new(geometry)?;
        let mut cookie = [0u8; 8];
        rustix::rand::getrandom(&mut cookie, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::sys("getrandom", e))?;
        let cookie = u64::from_ne_bytes(cookie);
        // Write the schema and redzone before sealing, while this is the only mapping.
        let region = Region::create("netchannel-server", layout.server.len, Access::OwnerWrites)?;
        // SAFETY: the region is a fresh, page-aligned, writable mapping of `layout.server.len`
        // bytes, which covers the schema and the redzone word.
        unsafe {
            layout::init_schema(region.base().as_ptr(), &layout, cookie);
            region
                .base()
                .as_ptr()
                .add(layout.server.redzone)
                .cast::<u64>()
                .write(cookie);
        }
        let pool = Pool::create(&geometry)?;
        let (bell, app_bell) = Doorbell::pair()?;
        Ok(Self {
            layout,
            region,
            pool,
            bell,
            app_bell,
            cookie,
        })
    }

    /// The channel's geometry.
    pub fn geometry(&self) -> Geometry {
        self.layout.geometry
    }

    /// The fds to send to the app end.
    pub fn fds(&self) -> Result<ServerFds<'_>, Error> {
        Ok(ServerFds {
            region: self.region.fd()?,
            pool: self.pool.fd()?,
            bell: self.app_bell.as_fd(),
        })
    }

    /// Whether `fd` is one of the objects this set-up made (its own region or pool): a peer
    /// that hands one back as its own region is refused.
    pub fn owns_object(&self, fd: BorrowedFd<'_>) -> bool {
        let id = |f: BorrowedFd<'_>| rustix::fs::fstat(f).ok().map(|s| (s.st_dev, s.st_ino));
        let Some(theirs) = id(fd) else { return false };
        [
            self.region.fd().ok(),
            self.pool.fd().ok(),
            Some(self.app_bell.as_fd()),
        ]
        .into_iter()
        .flatten()
        .any(|f| id(f) == Some(theirs))
    }

    /// Completes the set-up with the app end's region, and marks the channel ACTIVE. Refuses a
    /// region that is one of this set-up's own objects.
    pub fn finish(self, app_region: OwnedFd, home: Home) -> Result<Endpoint, Error> {
        if self.owns_object(app_region.as_fd()) {
            return Err(Error::Handshake(
                "the app handed back the server's own memory as its region",
            ));
        }
        let peer = Region::attach(app_region, self.layout.app.len, false)?;
        let ep = Endpoint::bind(
            Role::Server,
            self.layout,
            self.region,
            peer,
            self.pool,
            self.bell,
            home,
            self.cookie,
        )?;
        ep.schema()
            .state
            .store(state::ACTIVE, std::sync::atomic::Ordering::Release);
        Ok(ep)
    }
}

/// Both ends of a channel in one process, set up as two processes would (the server's memory
/// and doorbell handed to the app end, the app's back to the server): for in-process tests,
/// fuzzing and benchmarks. Returns (server, app).
pub fn in_process_pair(
    geometry: Geometry,
    server_home: Home,
    app_home: Home,
) -> Result<(Endpoint, Endpoint), Error> {
    let setup = ServerSetup::new(geometry)?;
    let f = setup.fds()?;
    let dup = |fd: BorrowedFd<'_>| {
        rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|e| Error::sys("dup", e))
    };
    let app = Endpoint::attach_app(dup(f.region)?, dup(f.pool)?, dup(f.bell)?, app_home)?;
    let server = setup.finish(dup(app.region_fd()?)?, server_home)?;
    Ok((server, app))
}

/// One end of a channel.
#[derive(Debug)]
pub struct Endpoint {
    role: Role,
    layout: ChannelLayout,
    cookie: u64,
    // Rings point into the regions below; the regions are dropped after them (field order).
    data_out: Producer,
    data_in: Consumer,
    bufs_out: Producer,
    bufs_in: Consumer,
    events_out: Option<Producer>,
    events_in: Option<Consumer>,
    ledger: Ledger,
    /// Peer buffers released by our user that did not fit the return ring yet.
    pending_return: Vec<u32>,
    broken: Option<(RingKind, u32, u32, u32)>,
    /// Consecutive `recv` calls that found nothing.
    idle_polls: u32,
    stats: Stats,
    policy: WaitPolicy,
    watch: Option<OwnedFd>,
    /// Our end of the doorbell pair: we sleep on it and ring the peer through it.
    bell: Doorbell,
    pool: Pool,
    own: Region,
    peer: Region,
}

impl Endpoint {
    /// The app end: maps what the server sent, validates the schema, builds its own region and
    /// doorbell (send them back with [`Endpoint::fds`]).
    pub fn attach_app(
        region: OwnedFd,
        pool: OwnedFd,
        bell: OwnedFd,
        home: Home,
    ) -> Result<Self, Error> {
        let len = rustix::fs::fstat(&region)
            .map_err(|e| Error::sys("fstat", e))?
            .st_size;
        let len = usize::try_from(len).map_err(|_| Error::Handshake("negative region size"))?;
        let peer = Region::attach(region, len, false)?;
        // SAFETY: `peer` is a readable page-aligned mapping of `len` bytes.
        let view = unsafe { layout::read_schema(peer.base().as_ptr(), len) }?;
        let pool = Pool::attach(pool, &view.layout.geometry)?;
        let bell = Doorbell::adopt(bell)?;
        let own = Region::create("netchannel-app", view.layout.app.len, Access::OwnerWrites)?;
        // SAFETY: fresh writable mapping covering the redzone word.
        unsafe {
            own.base()
                .as_ptr()
                .add(view.layout.app.redzone)
                .cast::<u64>()
                .write(view.cookie)
        };
        Self::bind(
            Role::App,
            view.layout,
            own,
            peer,
            pool,
            bell,
            home,
            view.cookie,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn bind(
        role: Role,
        layout: ChannelLayout,
        own: Region,
        peer: Region,
        pool: Pool,
        bell: Doorbell,
        home: Home,
        cookie: u64,
    ) -> Result<Self, Error> {
        let (own_l, peer_l) = match role {
            Role::App => (&layout.app, &layout.server),
            Role::Server => (&layout.server, &layout.app),
        };
        if own.len() != own_l.len || peer.len() != peer_l.len {
            return Err(Error::RegionSize {
                expected: own_l.len as u64,
                actual: own.len() as u64,
            });
        }
        let ptrs = |kind: RingKind| -> RingPtrs {
            let app_produces = kind.app_produces();
            let we_produce = app_produces == (role == Role::App);
            let (prod_region, prod_l, cons_region, cons_l) = if we_produce {
                (&own, own_l, &peer, peer_l)
            } else {
                (&peer, peer_l, &own, own_l)
            };
            let at = |r: &Region, off: usize| -> NonNull<u8> {
                // SAFETY: offsets come from `RegionLayout`, whose spans lie inside regions of
                // exactly the lengths checked above.
                unsafe { r.base().add(off) }
            };
            RingPtrs {
                producer: at(prod_region, prod_l.half[kind.index()]).cast::<HalfHeader>(),
                consumer: at(cons_region, cons_l.half[kind.index()]).cast::<HalfHeader>(),
                slots: at(prod_region, prod_l.slots(kind)).cast::<Slot>(),
                size: layout.geometry.slots(kind),
            }
        };
        let (out, inn, bout, binn) = match role {
            Role::App => (RingKind::Tx, RingKind::Rx, RingKind::Free, RingKind::Alloc),
            Role::Server => (RingKind::Rx, RingKind::Tx, RingKind::Alloc, RingKind::Free),
        };
        // SAFETY: the pointers are inside `own` (writable) and `peer` (readable), which the
        // Endpoint owns and drops after its rings; ring sizes are validated powers of two.
        let (data_out, data_in, bufs_out, bufs_in, events_out, events_in) = unsafe {
            let ev = ptrs(RingKind::Event);
            (
                Producer::new(out, ptrs(out)),
                Consumer::new(inn, ptrs(inn)),
                Producer::new(bout, ptrs(bout)),
                Consumer::new(binn, ptrs(binn)),
                (role == Role::Server).then(|| Producer::new(RingKind::Event, ev)),
                (role == Role::App).then(|| Consumer::new(RingKind::Event, ev)),
            )
        };
        let g = layout.geometry;
        let ledger = Ledger::new(g.segments, g.bufs_per_segment, |s| home.owns(s, g.segments));
        Ok(Self {
            role,
            cookie,
            data_out,
            data_in,
            bufs_out,
            bufs_in,
            events_out,
            events_in,
            ledger,
            pending_return: Vec::new(),
            broken: None,
            idle_polls: 0,
            stats: Stats::default(),
            policy: WaitPolicy::default(),
            watch: None,
            bell,
            pool,
            own,
            peer,
            layout,
        })
    }

    /// This end's region, for the app end to send to the server.
    pub fn region_fd(&self) -> Result<BorrowedFd<'_>, Error> {
        self.own.fd()
    }

    /// Closes the memfds of the regions and the pool once set-up is over: the mappings stay,
    /// and the pool still gives segments back. Leaves a server with one fd per channel (its
    /// doorbell), so ten thousand channels fit an ordinary fd limit.
    pub fn release_fds(&mut self) {
        self.own.release_fd();
        self.peer.release_fd();
        self.pool.release_fd();
    }

    /// Watches `fd` (the socket to the peer) during waits: its hang-up ends the channel with
    /// [`Error::PeerGone`].
    pub fn watch(&mut self, fd: OwnedFd) {
        self.watch = Some(fd);
    }

    /// Sets how waits spin before sleeping.
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The channel's layout.
    pub fn layout(&self) -> &ChannelLayout {
        &self.layout
    }

    /// The pool (for reading received packets).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Buffer counts by state, from the private ledger.
    pub fn buffer_counts(&self) -> Counts {
        self.ledger.counts()
    }

    /// Recounts the ledger and checks the redzones.
    pub fn audit(&self) -> Result<Counts, AuditError> {
        let own_l: &RegionLayout = self.layout.region(self.role);
        // SAFETY: the redzone word lies inside our own mapping (layout checked in `bind`).
        let rz = unsafe {
            self.own
                .base()
                .as_ptr()
                .add(own_l.redzone)
                .cast::<u64>()
                .read_volatile()
        };
        if rz != self.cookie {
            return Err(AuditError(format!(
                "redzone of the {:?} region overwritten",
                self.role
            )));
        }
        self.ledger.audit()
    }

    fn schema(&self) -> &Schema {
        let base = match self.role {
            Role::Server => self.own.base(),
            Role::App => self.peer.base(),
        };
        // SAFETY: the server region starts with a schema (validated at attach for the app end,
        // written by `ServerSetup::new` for the server end) and stays mapped while `self` lives.
        unsafe { base.cast::<Schema>().as_ref() }
    }

    /// Fails if a ring was found corrupt (it stays so).
    fn not_broken(&self) -> Result<(), Error> {
        match self.broken {
            Some((ring, claimed, valid, size)) => Err(Error::RingIndexOob {
                ring,
                claimed,
                valid,
                size,
            }),
            None => Ok(()),
        }
    }

    /// Fails if the channel is defunct or a ring was found corrupt.
    pub fn check(&self) -> Result<(), Error> {
        self.not_broken()?;
        if self.schema().state() == state::DEFUNCT {
            return Err(Error::Defunct {
                reason: DefunctReason::from_code(self.schema().defunct_reason()),
            });
        }
        Ok(())
    }

    /// Server end only: revokes the channel and wakes the app end so it notices.
    pub fn make_defunct(&self, reason: DefunctReason) {
        if self.role == Role::Server {
            let s = self.schema();
            s.defunct_reason
                .store(reason.code(), std::sync::atomic::Ordering::Release);
            s.state
                .store(state::DEFUNCT, std::sync::atomic::Ordering::Release);
            self.bell.ring();
        }
    }

    fn note_ring_error(&mut self, e: Error) -> Error {
        if let Error::RingIndexOob {
            ring,
            claimed,
            valid,
            size,
        } = e
        {
            if self.broken.is_none() {
                self.stats.ring_index_oob += 1;
            }
            self.broken = Some((ring, claimed, valid, size));
        }
        e
    }

    fn count(&mut self, kind: RingKind, v: Violation) {
        self.stats.violations[kind.index()][v.index()] += 1;
        tracing::debug!(ring = kind.name(), violation = %v, "dropped a descriptor from the peer");
    }

    fn ring_peer(&mut self) {
        self.stats.doorbells += 1;
        self.bell.ring();
    }

    /// A buffer for our user to fill, refilling from the peer's returns and growing the pool
    /// when needed. `None` when there is no buffer to be had right now.
    #[inline]
    pub fn alloc(&mut self) -> Option<u32> {
        if let Some(b) = self.ledger.alloc() {
            return Some(b);
        }
        if self.broken.is_none() {
            let _ = self.refill();
        }
        if let Some(b) = self.ledger.alloc() {
            return Some(b);
        }
        self.grow_pool()?;
        self.ledger.alloc()
    }

    /// Mutable bytes of a buffer our user holds (`None` if it does not hold it).
    #[inline]
    pub fn buffer_mut(&mut self, buf: u32) -> Option<&mut [u8]> {
        if self.ledger.state(buf) != Some(crate::ledger::BufState::Held) {
            return None;
        }
        self.pool.bytes_mut(buf)
    }

    /// The bytes of a received packet and a buffer our user holds, at once (a stack answers a
    /// packet while it reads it, without copying either). `None` if `buf` is not held, or is the
    /// packet's own buffer.
    #[inline]
    pub fn payload_and_buffer_mut(&mut self, p: &Packet, buf: u32) -> Option<(&[u8], &mut [u8])> {
        if self.ledger.state(buf) != Some(crate::ledger::BufState::Held) {
            return None;
        }
        self.pool.bytes_and_mut(p.buf, p.offset, p.len, buf)
    }

    /// The bytes of a received packet.
    #[inline]
    pub fn payload(&self, p: &Packet) -> &[u8] {
        self.pool.bytes(p.buf, p.offset, p.len).unwrap_or(&[])
    }

    /// Takes back buffers the peer returned (our ALLOC ring as an app, FREE as a server).
    pub fn refill(&mut self) -> Result<u32, Error> {
        self.check()?;
        let n = self
            .bufs_in
            .refresh()
            .map_err(|e| self.note_ring_error(e))?;
        let kind = self.bufs_in.kind();
        let mut taken = 0;
        for _ in 0..n {
            let Some(d) = self.bufs_in.pop() else { break };
            let d = Desc {
                offset: 0,
                len: 0,
                ..d
            }; // only the index matters on this ring
            match self
                .pool
                .check(&d)
                .and_then(|()| self.ledger.reclaim(d.buf))
            {
                Ok(()) => taken += 1,
                Err(v) => self.count(kind, v),
            }
        }
        if n > 0 && self.bufs_in.release() {
            self.ring_peer();
        }
        self.stats.reclaimed += u64::from(taken);
        Ok(taken)
    }

    /// Sends packets from buffers our user holds. Returns how many went (fewer than asked when
    /// the ring is full). A packet whose buffer we do not hold, or whose bounds are outside
    /// the buffer, is a bug in the caller: nothing is sent and the violation is returned.
    #[inline]
    pub fn send(&mut self, pkts: &[Packet]) -> Result<usize, SendError> {
        self.check().map_err(SendError::Channel)?;
        let free = self
            .data_out
            .free(pkts.len() as u32)
            .map_err(|e| SendError::Channel(self.note_ring_error(e)))?;
        let n = pkts.len().min(free as usize);
        for p in &pkts[..n] {
            let d = Desc {
                buf: p.buf,
                offset: p.offset,
                len: p.len,
                flags: 0,
            };
            self.pool.check(&d).map_err(SendError::Invalid)?;
            // The peer drops (and counts as a violation) an empty packet: refuse it here.
            non_empty(&d, self.pool.buf_size()).map_err(SendError::Invalid)?;
            if self.ledger.state(p.buf) != Some(crate::ledger::BufState::Held) {
                return Err(SendError::Invalid(Violation::NotOwner { buf: p.buf }));
            }
        }
        for p in &pkts[..n] {
            // Checked above; cannot fail.
            let _ = self.ledger.give(p.buf);
            self.data_out.push(Desc {
                buf: p.buf,
                offset: p.offset,
                len: p.len,
                flags: 0,
            });
        }
        if n > 0 && self.data_out.publish() {
            self.ring_peer();
        }
        self.stats.sent += n as u64;
        Ok(n)
    }

    /// Receives up to `max` packets into `out`. Descriptors that fail validation are dropped
    /// and counted (see [`Stats::violations`]); the count of accepted packets is returned.
    #[inline]
    pub fn recv(&mut self, out: &mut Vec<Packet>, max: usize) -> Result<usize, Error> {
        // Once revoked, what is left on the ring belongs to the server again.
        self.check()?;
        let avail = self
            .data_in
            .available()
            .map_err(|e| self.note_ring_error(e))?;
        if avail == 0 {
            // A busy-polling caller never waits, so notice a vanished peer here now and then.
            self.idle_polls = self.idle_polls.wrapping_add(1);
            if self.idle_polls.is_multiple_of(IDLE_POLLS_PER_PEER_CHECK) && self.peer_gone() {
                return Err(Error::PeerGone);
            }
            return Ok(0);
        }
        self.idle_polls = 0;
        let kind = self.data_in.kind();
        let mut got = 0;
        for _ in 0..avail.min(max as u32) {
            let Some(d) = self.data_in.pop() else { break };
            match self
                .pool
                .check(&d)
                .and_then(|()| non_empty(&d, self.pool.buf_size()))
                .and_then(|()| self.ledger.receive(d.buf))
            {
                Ok(()) => {
                    out.push(Packet {
                        buf: d.buf,
                        offset: d.offset,
                        len: d.len,
                    });
                    got += 1;
                }
                Err(v) => self.count(kind, v),
            }
        }
        if self.data_in.release() {
            self.ring_peer();
        }
        self.stats.received += got as u64;
        Ok(got)
    }

    /// Our user is done with these buffers: home buffers join our free list, the peer's go back
    /// to it (batched on one publish). A buffer our user does not hold is refused.
    #[inline]
    pub fn free(&mut self, bufs: impl IntoIterator<Item = u32>) -> Result<(), SendError> {
        for b in bufs {
            if self.ledger.release(b).map_err(SendError::Invalid)? {
                self.pending_return.push(b);
            }
        }
        self.flush().map_err(SendError::Channel)
    }

    /// Peer buffers released by our user and not yet on the return ring (it was full).
    pub fn pending_returns(&self) -> usize {
        self.pending_return.len()
    }

    /// Pushes pending returns of peer buffers onto the return ring (as far as it has room).
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.pending_return.is_empty() {
            return Ok(());
        }
        let free = self
            .bufs_out
            .free(self.pending_return.len() as u32)
            .map_err(|e| self.note_ring_error(e))?;
        let n = self.pending_return.len().min(free as usize);
        for b in self.pending_return.drain(..n) {
            self.bufs_out.push(Desc {
                buf: b,
                offset: 0,
                len: 0,
                flags: 0,
            });
        }
        if n > 0 && self.bufs_out.publish() {
            self.ring_peer();
        }
        self.stats.returned += n as u64;
        Ok(())
    }

    /// Server end: tops the app end's ALLOC ring up to `target` empty buffers (as far as the
    /// pool allows). Returns how many were added.
    pub fn supply_to(&mut self, target: u32) -> Result<Supplied, Error> {
        self.check()?;
        let free = self
            .bufs_out
            .refresh()
            .map_err(|e| self.note_ring_error(e))?;
        let level = self.bufs_out.in_flight();
        let n = target.saturating_sub(level);
        let mut pushed = 0;
        while pushed < n.min(free) {
            let Some(b) = self.ledger.alloc_for_peer().or_else(|| {
                self.ledger
                    .grow()
                    .and_then(|_| self.ledger.alloc_for_peer())
            }) else {
                break;
            };
            self.bufs_out.push(Desc {
                buf: b,
                offset: 0,
                len: 0,
                flags: 0,
            });
            pushed += 1;
        }
        if pushed > 0 && self.bufs_out.publish() {
            self.ring_peer();
        }
        Ok(Supplied {
            added: pushed,
            starved: level == 0,
        })
    }

    /// Drops this process's page-table references to the whole pool. The contents stay in the
    /// shared memfd (the peer still holds buffers); this process's resident size no longer
    /// counts them, and pages fault back in on the next access. For servers whose channel is
    /// idle.
    pub fn forget_pool_pages(&self) -> Result<(), Error> {
        self.pool.forget_pages()
    }

    /// Puts one more home segment in service. Returns the segment.
    pub fn grow_pool(&mut self) -> Option<u32> {
        self.ledger.grow()
    }

    /// Gives one idle home segment back to the OS. Returns the segment, if one was idle.
    pub fn shrink_pool(&mut self) -> Result<Option<u32>, Error> {
        match self.ledger.shrink() {
            Some(seg) => match self.pool.release_segment(seg) {
                Ok(()) => Ok(Some(seg)),
                Err(e) => {
                    // The memory is still there: so is the segment, in the ledger too.
                    self.ledger.restore(seg);
                    self.stats.release_failures += 1;
                    Err(e)
                }
            },
            None => Ok(None),
        }
    }

    /// Whether `interest` is satisfied right now (reads the peer's index at most once).
    pub fn ready(&mut self, interest: Interest) -> Result<bool, Error> {
        self.not_broken()?;
        let r = match interest {
            Interest::Readable => self.data_in.available(),
            Interest::Writable => self.data_out.free(1),
            Interest::Buffers => {
                if self.ledger.counts().free > 0 {
                    return Ok(true);
                }
                self.bufs_in.available()
            }
            Interest::Returns => self.bufs_in.available(),
        };
        r.map(|n| n > 0).map_err(|e| self.note_ring_error(e))
    }

    /// Sets (`on`) or clears the need-wakeup flag for `interest`, so the peer rings our
    /// doorbell when it changes the ring. For servers that sleep on many channels at once.
    pub fn arm(&self, interest: Interest, on: bool) {
        match (interest, on) {
            (Interest::Readable, true) => self.data_in.arm_wakeup(),
            (Interest::Readable, false) => self.data_in.disarm_wakeup(),
            (Interest::Writable, true) => self.data_out.arm_wakeup(),
            (Interest::Writable, false) => self.data_out.disarm_wakeup(),
            (Interest::Buffers | Interest::Returns, true) => self.bufs_in.arm_wakeup(),
            (Interest::Buffers | Interest::Returns, false) => self.bufs_in.disarm_wakeup(),
        }
    }

    /// Server end: sets (`on`) or clears the request that the app ring our doorbell when it
    /// takes buffers from the ALLOC ring, so that a sleeping server tops the ring up again
    /// (else an app that needs more buffers than the ring holds waits for ever).
    pub fn arm_supply(&self, on: bool) {
        if on {
            self.bufs_out.arm_wakeup();
        } else {
            self.bufs_out.disarm_wakeup();
        }
    }

    /// Waits until `interest` is satisfied: spins for the policy's spin time, then sets the
    /// need-wakeup flag and sleeps on the doorbell. Returns early with an error when the channel
    /// goes defunct, a ring is corrupt, or the watched socket hangs up;
    /// [`Error::TimedOut`] after `timeout`.
    pub fn wait(&mut self, interest: Interest, timeout: Option<Duration>) -> Result<(), Error> {
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        // A revoked or corrupt channel is never "ready", whatever its rings show.
        self.check()?;
        if interest == Interest::Buffers {
            self.flush()?;
        }
        if self.ready(interest)? {
            return Ok(());
        }
        let spin_end = start + self.policy.spin;
        let mut spins = 0u32;
        while !self.policy.spin.is_zero() {
            if self.ready(interest)? {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && Instant::now() >= spin_end {
                break;
            }
            crate::sync::spin_hint();
        }
        loop {
            // Rings are cleared before a sleep, not after a wake-up (off the path of the
            // packet that woke us), and before arming: a ring for what arrives after the check
            // below stays, and ends the sleep.
            if self.bell.drain() == Drained::PeerGone {
                self.check()?;
                if self.ready(interest)? {
                    return Ok(());
                }
                return Err(Error::PeerGone);
            }
            self.arm(interest, true);
            let ready = self.ready(interest);
            if !matches!(ready, Ok(false)) {
                self.arm(interest, false);
                return ready.map(|_| ());
            }
            self.check().inspect_err(|_| self.arm(interest, false))?;
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => {
                        self.arm(interest, false);
                        return Err(Error::TimedOut);
                    }
                },
                None => None,
            };
            self.stats.sleeps += 1;
            let slept = self.sleep(left);
            self.arm(interest, false);
            if let Err(e) = slept {
                // A server that shut down in order said so in the schema before it left; and
                // the peer may have published its last packets before it went away: deliver
                // them first, report its departure once nothing is left.
                self.check()?;
                return match self.ready(interest) {
                    Ok(true) => Ok(()),
                    _ => Err(e),
                };
            }
        }
    }

    /// Sleeps on our doorbell (and the watched socket) for at most `left`.
    fn sleep(&self, left: Option<Duration>) -> Result<(), Error> {
        let ts = left.map(|d| rustix::time::Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        let mut fds = [
            PollFd::new(&self.bell, PollFlags::IN),
            PollFd::from_borrowed_fd(
                self.watch.as_ref().map_or(self.bell.as_fd(), |w| w.as_fd()),
                PollFlags::RDHUP,
            ),
        ];
        let n = if self.watch.is_some() { 2 } else { 1 };
        match rustix::event::poll(&mut fds[..n], ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::sys("poll", e)),
        }
        // A doorbell whose other end is gone (shut or closed) is readable for ever: the peer
        // left, so say so rather than spin. A plain ring is left for the next sleep to clear.
        if fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
            && self.bell.drain() == Drained::PeerGone
        {
            return Err(Error::PeerGone);
        }
        if n == 2
            && fds[1]
                .revents()
                .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR)
        {
            return Err(Error::PeerGone);
        }
        Ok(())
    }

    /// Whether the watched socket has hung up (without waiting).
    pub fn peer_gone(&self) -> bool {
        let Some(w) = &self.watch else { return false };
        let mut fds = [PollFd::new(w, PollFlags::RDHUP)];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(1))
            && fds[0]
                .revents()
                .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR)
    }

    /// This end's doorbell (readable when the peer rang it), e.g. for an epoll set.
    pub fn bell_fd(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    /// Clears pending rings of this end's doorbell; [`Drained::PeerGone`] when the peer shut or
    /// closed its end.
    pub fn clear_bell(&self) -> Drained {
        self.bell.drain()
    }

    /// As [`Endpoint::clear_bell`], for a server whose peer is untrusted: fds the peer attached
    /// (possible only on kernels without `SO_PASSRIGHTS`) go to `stray`, to be closed off the
    /// datapath (the last close of some files blocks).
    pub fn clear_bell_into(&self, stray: &mut Vec<OwnedFd>) -> Drained {
        self.bell.drain_into(stray)
    }

    /// Descriptors this end has published on its outgoing data ring that the peer has not
    /// consumed yet (as of the last refresh), and descriptors waiting on the incoming one.
    pub fn ring_occupancy(&mut self) -> (u32, u32) {
        let out = self
            .data_out
            .refresh()
            .map(|_| self.data_out.in_flight())
            .unwrap_or(0);
        let inn = self.data_in.refresh().unwrap_or(0);
        (out, inn)
    }

    /// Copies a received packet into a buffer this end holds (for servers that copy between
    /// channels); returns the new packet, or `None` if `dst` is not held or the data does not fit.
    #[inline]
    pub fn copy_into(&mut self, src: &Packet, dst: u32) -> Option<Packet> {
        if self.ledger.state(dst) != Some(crate::ledger::BufState::Held) {
            return None;
        }
        self.pool
            .copy(src.buf, src.offset, src.len, dst, 0)
            .then_some(Packet {
                buf: dst,
                offset: 0,
                len: src.len,
            })
    }

    /// Takes back every home buffer the peer holds (the peer died or was revoked), then gives
    /// every idle home segment back to the OS. Returns the number of buffers taken back.
    pub fn reclaim_from_peer(&mut self) -> u32 {
        self.pending_return.clear();
        let n = self.ledger.reclaim_all_from_peer();
        while let Ok(Some(_)) = self.shrink_pool() {}
        n
    }

    /// The event ring this end consumes (app) or produces (server); carries nothing yet.
    pub fn has_event_ring(&self) -> bool {
        self.events_in.is_some() || self.events_out.is_some()
    }
}

/// Deliberate protocol violations, for hostile-peer tests only (feature `hostile`).
#[cfg(feature = "hostile")]
impl Endpoint {
    /// Pushes raw descriptors on the outgoing data ring (`data = true`) or the buffer-return
    /// ring, with no bounds or ledger check, and publishes them. Rings the peer.
    pub fn hostile_push(&mut self, data: bool, descs: &[Desc]) {
        let ring = if data {
            &mut self.data_out
        } else {
            &mut self.bufs_out
        };
        for &d in descs {
            ring.force_push(d);
        }
        ring.publish();
        self.bell.ring();
    }

    /// The pool's memfd (a duplicate), its buffer size and its number of buffers: buffer `b`
    /// starts at byte `b * size`. Writing through it is what another thread or process of a
    /// hostile app can do at any moment, such as rewriting a packet's headers after handing
    /// it over.
    pub fn hostile_pool(&self) -> Result<(OwnedFd, u32, u32), rustix::io::Errno> {
        let pool = self.pool.fd().map_err(|_| rustix::io::Errno::BADF)?;
        let fd = rustix::io::fcntl_dupfd_cloexec(pool, 0)?;
        Ok((fd, self.pool.buf_size(), self.pool.buffers()))
    }

    /// Publishes an arbitrary index on one of this end's rings: the producer index of the
    /// outgoing data ring (`data = true`), or the consumer index of the incoming data ring.
    pub fn hostile_set_index(&mut self, producer: bool, v: u32) {
        if producer {
            self.data_out.force_index(v);
        } else {
            self.data_in.force_index(v);
        }
        self.bell.ring();
    }

    /// Tries to map the peer's (read-only) region writable and to `pwrite` into it; returns
    /// the two errors the kernel gave, or `None` where the write was (wrongly) allowed.
    pub fn hostile_write_peer_region(
        &self,
    ) -> (Option<rustix::io::Errno>, Option<rustix::io::Errno>) {
        use rustix::mm::{MapFlags, ProtFlags};
        let Ok(fd) = self.peer.fd() else {
            return (Some(rustix::io::Errno::BADF), Some(rustix::io::Errno::BADF));
        };
        // SAFETY: a fresh mapping chosen by the kernel, unmapped at once if it succeeds.
        let map = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                self.peer.len(),
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        };
        let map_err = match map {
            Ok(p) => {
                // SAFETY: exactly the mapping just made.
                let _ = unsafe { rustix::mm::munmap(p, self.peer.len()) };
                None
            }
            Err(e) => Some(e),
        };
        let write_err = rustix::io::pwrite(fd, &[0xff; 8], 0).err();
        (map_err, write_err)
    }
}

/// A packet on a data ring carries at least one byte.
fn non_empty(d: &Desc, buf_size: u32) -> Result<(), Violation> {
    if d.len == 0 {
        return Err(Violation::BadDesc {
            offset: d.offset,
            len: d.len,
            buf_size,
        });
    }
    Ok(())
}

/// Empty `recv` calls between two checks that the peer is still there.
const IDLE_POLLS_PER_PEER_CHECK: u32 = 4096;

/// What [`Endpoint::supply_to`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supplied {
    /// Buffers added to the ring.
    pub added: u32,
    /// The ring was empty before: the app end took everything it had been given.
    pub starved: bool,
}

/// Why a send or free failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The caller passed a packet or buffer it does not hold, or bounds outside the buffer.
    #[error("invalid packet: {0}")]
    Invalid(Violation),
    /// The channel is unusable.
    #[error(transparent)]
    Channel(Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends in one process (the multi-process cases live in the integration tests).
    fn pair(g: Geometry) -> (Endpoint, Endpoint) {
        in_process_pair(g, Home::LowerHalf, Home::UpperHalf).unwrap()
    }

    fn small() -> Geometry {
        Geometry {
            ring_slots: [8, 8, 8, 8, 8],
            segments: 4,
            bufs_per_segment: 16,
            ..Geometry::default()
        }
    }

    #[test]
    fn packets_and_buffers_go_round_and_ledgers_stay_whole() {
        let (mut s, mut a) = pair(small());
        let mut got = Vec::new();
        for round in 0..50u32 {
            let mut pkts = Vec::new();
            for i in 0..5 {
                let b = a.alloc().expect("app has buffers");
                let bytes = a.buffer_mut(b).unwrap();
                bytes[..4].copy_from_slice(&(round * 10 + i).to_le_bytes());
                pkts.push(Packet {
                    buf: b,
                    offset: 0,
                    len: 4,
                });
            }
            assert_eq!(a.send(&pkts).unwrap(), 5);
            got.clear();
            assert_eq!(s.recv(&mut got, 64).unwrap(), 5);
            for (i, p) in got.iter().enumerate() {
                assert_eq!(s.payload(p), &(round * 10 + i as u32).to_le_bytes());
            }
            // Echo the packets back zero-copy, then the app frees them (home buffers).
            assert_eq!(s.send(&got).unwrap(), 5);
            got.clear();
            assert_eq!(a.recv(&mut got, 64).unwrap(), 5);
            a.free(got.iter().map(|p| p.buf)).unwrap();
        }
        assert_eq!(
            s.stats().total_violations() + a.stats().total_violations(),
            0
        );
        s.audit().unwrap();
        let c = a.audit().unwrap();
        assert_eq!(c.held + c.peer, 32, "no app buffer is out");
    }

    #[test]
    fn one_way_traffic_returns_buffers_to_their_home() {
        let (mut s, mut a) = pair(small());
        let mut got = Vec::new();
        for _ in 0..200 {
            let Some(b) = s.alloc() else {
                // Out of buffers until the app returns some.
                assert_eq!(s.buffer_counts().free, 0);
                continue;
            };
            assert_eq!(
                s.send(&[Packet {
                    buf: b,
                    offset: 0,
                    len: 64
                }])
                .unwrap(),
                1
            );
            got.clear();
            a.recv(&mut got, 8).unwrap();
            a.free(got.iter().map(|p| p.buf)).unwrap();
        }
        assert_eq!(s.stats().sent, 200, "returns kept the sender supplied");
        loop {
            let n = s.refill().unwrap();
            a.flush().unwrap();
            if n == 0 && a.pending_returns() == 0 {
                break;
            }
        }
        assert_eq!(
            s.buffer_counts().peer,
            32,
            "only the app's own half is away"
        );
        assert_eq!(
            s.buffer_counts().free + s.buffer_counts().absent,
            32,
            "every server buffer is home"
        );
        assert_eq!(a.stats().returned, 200);
    }

    #[test]
    fn the_caller_cannot_send_what_it_does_not_hold() {
        let (mut s, mut a) = pair(small());
        let b = a.alloc().unwrap();
        assert!(matches!(
            a.send(&[Packet {
                buf: b,
                offset: 2040,
                len: 100
            }]),
            Err(SendError::Invalid(Violation::BadDesc { .. }))
        ));
        assert!(matches!(
            a.send(&[Packet {
                buf: 0,
                offset: 0,
                len: 1
            }]),
            Err(SendError::Invalid(Violation::NotOwner { buf: 0 }))
        ));
        assert!(matches!(a.free([0]), Err(SendError::Invalid(_))));
        assert_eq!(
            a.send(&[Packet {
                buf: b,
                offset: 0,
                len: 1
            }])
            .unwrap(),
            1
        );
        assert!(
            a.buffer_mut(b).is_none(),
            "a sent buffer is no longer ours to write"
        );
        let mut got = Vec::new();
        s.recv(&mut got, 1).unwrap();
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn defunct_wakes_a_waiting_app_and_fails_its_calls() {
        let (s, mut a) = pair(small());
        a.set_wait_policy(WaitPolicy {
            spin: Duration::ZERO,
        });
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            s.make_defunct(DefunctReason::Administrative);
            s
        });
        let start = Instant::now();
        let err = a
            .wait(Interest::Readable, Some(Duration::from_secs(5)))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Defunct {
                    reason: DefunctReason::Administrative
                }
            ),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        let mut v = Vec::new();
        assert!(matches!(a.recv(&mut v, 1), Err(Error::Defunct { .. })));
        drop(t.join());
    }

    #[test]
    fn wait_times_out_and_wakes_on_send() {
        let (mut s, mut a) = pair(small());
        a.set_wait_policy(WaitPolicy {
            spin: Duration::ZERO,
        });
        assert!(matches!(
            a.wait(Interest::Readable, Some(Duration::from_millis(20))),
            Err(Error::TimedOut)
        ));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let b = s.alloc().unwrap();
            s.send(&[Packet {
                buf: b,
                offset: 0,
                len: 1,
            }])
            .unwrap();
            s
        });
        a.wait(Interest::Readable, Some(Duration::from_secs(5)))
            .unwrap();
        let s = t.join().unwrap();
        assert!(s.stats().doorbells >= 1, "the sleeping app was rung");
        assert!(a.stats().sleeps >= 1);
    }

    /// An empty packet is refused at the sender, not found out (and counted as a violation)
    /// by the peer.
    #[test]
    fn an_empty_packet_is_refused_at_the_sender() {
        let (_server, mut app) = pair(small());
        let buf = app.alloc().expect("the app end's own half of the pool");
        let empty = Packet {
            buf,
            offset: 0,
            len: 0,
        };
        assert!(matches!(app.send(&[empty]), Err(SendError::Invalid(_))));
        assert_eq!(app.send(&[Packet { len: 1, ..empty }]).unwrap(), 1);
    }

    #[test]
    fn shrinking_gives_segments_back_only_when_idle() {
        let (mut s, _a) = pair(Geometry {
            segments: 4,
            bufs_per_segment: 64,
            ..Geometry::default()
        });
        let b = s.alloc().unwrap();
        s.grow_pool().unwrap();
        assert_eq!(s.shrink_pool().unwrap(), Some(1));
        assert_eq!(s.shrink_pool().unwrap(), None, "segment 0 has a buffer out");
        s.free([b]).unwrap();
        assert_eq!(s.shrink_pool().unwrap(), Some(0));
        assert_eq!(s.buffer_counts().absent, 128);
        s.audit().unwrap();
    }
}
