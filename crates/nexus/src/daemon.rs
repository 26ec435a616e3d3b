//! The nexus daemon: one event loop that serves the control socket and every channel.
//!
//! The loop polls channels while there is work, keeps polling for a short spin time after the
//! last packet (so a busy app never has to ring the nexus), then arms the need-wakeup flags of
//! every channel and sleeps in `epoll_wait` on the control sockets and the channels' doorbells.
//!
//! Nothing an app does may make this loop block or slow it for the others (`SECURITY.md`):
//! doorbells never block and are read only before a sleep, control requests are rate-limited,
//! status costs counters (ledger audits run in housekeeping within a budget), and fds apps
//! send are closed on another thread.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netchannel_shm::control::{ChannelId, ChannelStatus, NexusStatus};
use netchannel_shm::{DefunctReason, Drained};
use rustix::event::epoll;

use crate::channel::{Channel, Quarantine};
use crate::config::Config;
use crate::control::closer::Closer;
use crate::control::rate::RateLimits;
use crate::control::{Client, ControlCount, ControlErrors};
use crate::datapath::Datapath;
use crate::flowswitch::FlowTable;
use crate::netns::HostPorts;
use crate::pacer::{Next, Pacer, Sent};

/// Why the nexus could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum NexusError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Sys {
        /// What was being done.
        op: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another nexus is already serving the socket.
    #[error(
        "another nexus is already listening on {0}; stop it first or choose another control.socket"
    )]
    AlreadyRunning(PathBuf),
    /// The configured interface could not be served.
    #[error("interface: {0}")]
    Interface(String),
}

impl NexusError {
    pub(crate) fn sys(op: impl Into<String>, e: impl Into<std::io::Error>) -> Self {
        Self::Sys {
            op: op.into(),
            source: e.into(),
        }
    }
}

/// Most frames taken from the interface per pass.
const RX_BUDGET: usize = 256;

/// Most flows one nexus holds.
const MAX_FLOWS: usize = 1 << 20;

/// How often idle channels are looked at for trimming.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// Buffers whose ledger entries are audited per housekeeping pass (a few nanoseconds each, so
/// well under a millisecond): audits walk the channels round-robin, and `status` reports the
/// last result instead of auditing on the datapath thread when asked.
const AUDIT_BUDGET: u64 = 1 << 16;

/// Most doorbells cleared per wait (the rest stay ready and end the next wait at once).
const BELLS_PER_WAIT: usize = 256;

/// How often throttled control clients are looked at again.
const RESUME_CHECK: Duration = Duration::from_millis(10);

/// Most bytes of channel records in one status reply (a reply holds at most
/// [`netchannel_shm::control::MAX_REPLY`]; the rest is the summary).
const STATUS_PAGE_BYTES: usize = 128 * 1024;

/// epoll tokens: the kind in the top byte, an id below.
pub(crate) mod token {
    pub(crate) const LISTENER: u64 = 0;
    pub(crate) const SIGNAL: u64 = 1;
    pub(crate) const NETIF: u64 = 2;
    /// The epoll set of the channels' doorbells, nested in the loop's.
    pub(crate) const BELLS: u64 = 3;
    /// The netlink socket of the datapath's next hops.
    pub(crate) const NETLINK: u64 = 4;
    pub(crate) const CLIENT: u64 = 1 << 56;
    pub(crate) const CHANNEL: u64 = 2 << 56;
    pub(crate) const ID_MASK: u64 = (1 << 56) - 1;
}

/// The running nexus.
#[derive(Debug)]
pub struct Nexus {
    pub(crate) config: Config,
    pub(crate) listener: OwnedFd,
    pub(crate) epoll: OwnedFd,
    /// The channels' doorbells, in an epoll set of their own nested in `epoll`: while the loop
    /// polls, a flood of rings is one ready entry there, looked at only before it sleeps (an
    /// app cannot make a polling nexus read its doorbell).
    bells: OwnedFd,
    pub(crate) clients: BTreeMap<u64, Client>,
    pub(crate) channels: BTreeMap<ChannelId, Channel>,
    pub(crate) next_id: u64,
    pub(crate) started: Instant,
    pub(crate) errors: ControlErrors,
    /// Every flow of every channel.
    pub(crate) flows: FlowTable,
    /// Host-port reservations, shared by the flows of one channel on one (proto, address,
    /// port) and released with the last of them.
    pub(crate) host_ports: HostPorts,
    /// The flowswitch of the interface and its driver, if the nexus serves one (else
    /// channels reflect).
    pub(crate) datapath: Option<Datapath>,
    stop: Arc<AtomicBool>,
    /// Whether the interface's fd is in the epoll set's interest (not during coalescing).
    netif_watched: bool,
    /// The interface failed for good and is no longer watched.
    netif_failed: bool,
    signals: UnixStream,
    shutting_down: bool,
    /// Closes the fds apps hand us that we refuse, off this thread.
    pub(crate) closer: Closer,
    /// The channel audited last (audits go round-robin, a budget per housekeeping pass).
    audit_cursor: ChannelId,
    /// Control request rates per client and per user.
    pub(crate) rate: RateLimits,
}

impl Nexus {
    /// Binds the control socket and prepares the event loop. SIGTERM and SIGINT start an
    /// orderly shutdown once [`Nexus::run`] is running.
    pub fn new(config: Config) -> Result<Self, NexusError> {
        let listener = crate::control::bind(&config)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| NexusError::sys("epoll_create", e))?;
        let (signals, sig_writer) =
            UnixStream::pair().map_err(|e| NexusError::sys("socketpair", e))?;
        signals
            .set_nonblocking(true)
            .map_err(|e| NexusError::sys("O_NONBLOCK", e))?;
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let w = sig_writer
                .try_clone()
                .map_err(|e| NexusError::sys("dup", e))?;
            signal_hook::low_level::pipe::register(sig, w)
                .map_err(|e| NexusError::sys("installing a signal handler", e))?;
        }
        let add = |fd: std::os::fd::BorrowedFd<'_>, t: u64| {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(t),
                epoll::EventFlags::IN,
            )
            .map_err(|e| NexusError::sys("epoll_ctl", e))
        };
        let bells = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| NexusError::sys("epoll_create", e))?;
        add(listener.as_fd(), token::LISTENER)?;
        add(signals.as_fd(), token::SIGNAL)?;
        add(bells.as_fd(), token::BELLS)?;
        let closer =
            Closer::start().map_err(|e| NexusError::sys("starting the closer thread", e))?;
        Ok(Self {
            listener,
            epoll,
            bells,
            clients: BTreeMap::new(),
            channels: BTreeMap::new(),
            next_id: 1,
            started: Instant::now(),
            errors: ControlErrors::default(),
            flows: FlowTable::new(MAX_FLOWS),
            host_ports: HostPorts::default(),
            datapath: None,
            stop: Arc::new(AtomicBool::new(false)),
            netif_watched: true,
            netif_failed: false,
            signals,
            shutting_down: false,
            closer,
            audit_cursor: 0,
            rate: RateLimits::new(
                config.limits.requests_per_sec,
                config.limits.user_requests_per_sec,
            ),
            config,
        })
    }

    /// Serves an interface through a flowswitch instead of reflecting packets.
    pub fn with_datapath(config: Config, dp: Datapath) -> Result<Self, NexusError> {
        let mut n = Self::new(config)?;
        let watch = |fd, t, what: &str| {
            epoll::add(
                &n.epoll,
                fd,
                epoll::EventData::new_u64(t),
                epoll::EventFlags::IN,
            )
            .map_err(|e| NexusError::sys(format!("epoll_ctl({what})"), e))
        };
        if let Some(fd) = dp.netif().wake_fd() {
            watch(fd, token::NETIF, "interface")?;
        }
        if let Some(fd) = dp.resolver_fd() {
            watch(fd, token::NETLINK, "netlink")?;
        }
        if let Some(steering) = dp.netif().steering() {
            n.host_ports.set_steering(steering);
        }
        n.datapath = Some(dp);
        Ok(n)
    }

    /// Serves the interface of `config.interface`, or none (channels reflect) without one.
    pub fn from_config(config: Config) -> Result<Self, NexusError> {
        match config.interface.clone() {
            Some(i) => {
                let dp = crate::datapath::open_impaired(&i, config.faults)
                    .map_err(|e| NexusError::Interface(e.to_string()))?;
                Self::with_datapath(config, dp)
            }
            None => Self::new(config),
        }
    }

    /// A flag that stops [`Nexus::run`] (as SIGTERM does) when set, within a second.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Serves until SIGTERM or SIGINT; then marks every channel DEFUNCT ("server shutting down")
    /// and returns.
    pub fn run(&mut self) -> Result<(), NexusError> {
        let d = &self.config.datapath;
        let mut pacer = Pacer::new(
            Duration::from_micros(d.spin_us),
            Duration::from_micros(d.coalesce_us),
            d.coalesce_batch,
            d.batch,
            Instant::now(),
        )
        .with_answer_spin(Duration::from_micros(d.answer_spin_us));
        let mut passes = 0u32;
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        let mut last_housekeeping = Instant::now();
        let mut last_resume = Instant::now();
        tracing::info!(socket = %self.config.control.socket.display(), "nexus serving");
        while !self.shutting_down && !self.stop.load(Ordering::Relaxed) {
            let (moved, sent) = self.service_channels();
            self.check_netif()?;
            passes = passes.wrapping_add(1);
            let now = Instant::now();
            if now.saturating_duration_since(last_housekeeping) >= HOUSEKEEPING {
                last_housekeeping = now;
                for c in self.channels.values_mut() {
                    c.housekeeping(&self.config.channel, now);
                }
                if let Some(dp) = self.datapath.as_mut() {
                    dp.netif_mut().housekeeping();
                }
                self.audit_some(AUDIT_BUDGET);
            }
            // Throttled clients are looked at often (their requests wait meanwhile), also
            // while the loop would otherwise sleep for good.
            let throttled = !self.rate.throttled.is_empty();
            if throttled && now.saturating_duration_since(last_resume) >= RESUME_CHECK {
                last_resume = now;
                self.resume_throttled(now);
            }
            // Packets waiting for a neighbour are retried at least every millisecond.
            let cap = if self.datapath.as_ref().is_some_and(Datapath::has_pending) {
                Duration::from_millis(1)
            } else if throttled {
                RESUME_CHECK
            } else {
                Duration::MAX
            };
            match pacer.after_pass(moved, sent, now) {
                // While polling, look at control events without sleeping every so often.
                Next::Poll if passes.is_multiple_of(32) => {
                    self.wait_events(&mut events, Some(Duration::ZERO))?
                }
                Next::Poll => {}
                Next::Sleep {
                    timeout,
                    arm,
                    netif,
                } => {
                    // A coalescing sleep ends on its timer (or an app's doorbell), not on the
                    // interface's next frame.
                    self.watch_netif(netif)?;
                    // Rings are cleared before a sleep, not after a wake-up: off the path of
                    // the packet that woke us. Before arming, so that a ring for what arrives
                    // after the check below stays and wakes the wait.
                    self.clear_bells()?;
                    if !arm {
                        self.wait_events(&mut events, Some(timeout.min(cap)))?;
                        continue;
                    }
                    if self.arm_all() {
                        continue;
                    }
                    let r = self.wait_events(&mut events, Some(timeout.min(cap)));
                    self.disarm_all();
                    r?;
                }
            }
        }
        self.shutdown();
        Ok(())
    }

    /// Stops watching an interface that failed for good (its fd may poll as ready for ever,
    /// which would spin the loop), once, and says so. Apps keep their channels; what they send
    /// to the wire is dropped and counted (`tx_netif_errors`).
    fn check_netif(&mut self) -> Result<(), NexusError> {
        if self.netif_failed {
            return Ok(());
        }
        let Some(sw) = self.datapath.as_ref() else {
            return Ok(());
        };
        let Some(why) = sw.netif().failed() else {
            return Ok(());
        };
        tracing::error!(
            reason = why,
            "the interface failed; the nexus no longer reads it and drops what apps send to it \
             (restart the nexus once the interface is back)"
        );
        if let Some(fd) = sw.netif().wake_fd() {
            epoll::delete(&self.epoll, fd)
                .map_err(|e| NexusError::sys("epoll_ctl(interface)", e))?;
        }
        self.netif_failed = true;
        self.netif_watched = false;
        Ok(())
    }

    /// Whether the interface's frames wake the event loop.
    fn watch_netif(&mut self, on: bool) -> Result<(), NexusError> {
        if self.netif_watched == on || self.netif_failed {
            return Ok(());
        }
        if let Some(fd) = self.datapath.as_ref().and_then(|dp| dp.netif().wake_fd()) {
            let flags = if on {
                epoll::EventFlags::IN
            } else {
                epoll::EventFlags::empty()
            };
            epoll::modify(
                &self.epoll,
                fd,
                epoll::EventData::new_u64(token::NETIF),
                flags,
            )
            .map_err(|e| NexusError::sys("epoll_ctl(interface)", e))?;
        }
        self.netif_watched = on;
        Ok(())
    }

    fn wait_events(
        &mut self,
        events: &mut Vec<epoll::Event>,
        timeout: Option<Duration>,
    ) -> Result<(), NexusError> {
        let ts = timeout.map(|d| rustix::time::Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        events.clear();
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(events),
            ts.as_ref(),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(NexusError::sys("epoll_wait", e)),
        }
        let ready: Vec<(u64, epoll::EventFlags)> =
            events.iter().map(|e| (e.data.u64(), e.flags)).collect();
        for (t, flags) in ready {
            match t {
                token::LISTENER => self.accept_clients(),
                token::SIGNAL => {
                    let mut b = [0u8; 64];
                    let _ = std::io::Read::read(&mut self.signals, &mut b);
                    tracing::info!("signal received; shutting down");
                    self.shutting_down = true;
                }
                t if t & !token::ID_MASK == token::CLIENT => {
                    self.on_client_event(t & token::ID_MASK, flags)
                }
                token::NETLINK => {
                    if let Some(dp) = self.datapath.as_mut() {
                        dp.resolver_readable();
                    }
                }
                // A ring only ends a sleep: the loop then serves every channel's rings, and
                // clears the doorbells before it sleeps again (`clear_bells`).
                _ => {}
            }
        }
        Ok(())
    }

    /// Clears the doorbells that rang (each read at most
    /// [`netchannel_shm::doorbell::DRAIN_BYTES`]), before the loop sleeps: never while it polls,
    /// so a flood of rings costs a polling nexus nothing. A channel whose app hung up its end
    /// of the doorbell is closed.
    fn clear_bells(&mut self) -> Result<(), NexusError> {
        let (mut stray, mut hung_up) = (Vec::new(), Vec::new());
        let mut rang: Vec<epoll::Event> = Vec::with_capacity(BELLS_PER_WAIT);
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match epoll::wait(
            &self.bells,
            rustix::buffer::spare_capacity(&mut rang),
            Some(&zero),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(NexusError::sys("epoll_wait(doorbells)", e)),
        }
        for e in &rang {
            let id = e.data.u64() & token::ID_MASK;
            if let Some(c) = self.channels.get(&id)
                && c.endpoint().clear_bell_into(&mut stray) == Drained::PeerGone
            {
                hung_up.push(id);
            }
        }
        self.closer.close(stray);
        // An app that shut or closed its end of a channel's doorbell can neither wake us nor be
        // woken: the channel is over, as if it had closed it (and its bell would poll as ready
        // for ever).
        for id in hung_up {
            if self.channels.contains_key(&id) {
                tracing::info!(
                    channel = id,
                    "the app hung up the channel's doorbell; closing the channel"
                );
                self.errors.count(ControlCount::DoorbellHangups);
                self.remove_channel(id);
            }
        }
        Ok(())
    }

    /// Stops waking for a channel that is no longer served (defunct): its app may ring on,
    /// and nothing it rings for is looked at.
    pub(crate) fn unwatch_channel(&mut self, id: ChannelId) {
        if let Some(c) = self.channels.get(&id) {
            let _ = epoll::delete(&self.bells, c.endpoint().bell_fd());
        }
    }

    /// One pass over the interface and every channel: packets moved, and what apps sent.
    fn service_channels(&mut self) -> (usize, Sent) {
        let (cfg, batch) = (&self.config.channel, self.config.datapath.batch);
        let (mut moved, mut sent_all) = (0, Sent::default());
        let mut quarantine = Vec::new();
        match &mut self.datapath {
            // With an interface: the flowswitch moves packets between it and the channels.
            Some(sw) => {
                sw.exchange(Instant::now());
                moved += sw.retry_pending(&mut self.flows, &mut self.channels);
                let (n, broken) = sw.rx_pass(&mut self.flows, &mut self.channels, RX_BUDGET);
                moved += n;
                quarantine.extend(broken.into_iter().map(|id| (id, Quarantine::RingCorrupt)));
                let frames_before = sw.switch().stats().tx_frames;
                for c in self.channels.values_mut() {
                    let sent = match sw.tx_pass(&mut self.flows, c, batch) {
                        Ok(k) => k,
                        Err(q) => {
                            quarantine.push((c.id, q));
                            continue;
                        }
                    };
                    sent_all.packets += sent;
                    match c.service_buffers(cfg, sent) {
                        Ok(r) => moved += sent + r,
                        Err(q) => quarantine.push((c.id, q)),
                    }
                }
                sw.flush();
                sent_all.frames +=
                    sw.switch().stats().tx_frames.saturating_sub(frames_before) as usize;
            }
            // Without one: each channel's packets are reflected back to it.
            None => {
                for c in self.channels.values_mut() {
                    match c.service(cfg, batch) {
                        Ok(n) => {
                            // Everything here was sent by an app (and reflected).
                            moved += n;
                            sent_all.packets += n;
                            sent_all.frames += n;
                        }
                        Err(q) => quarantine.push((c.id, q)),
                    }
                }
            }
        }
        for (id, q) in quarantine {
            self.release_flows(id);
            self.unwatch_channel(id);
            if let Some(c) = self.channels.get_mut(&id) {
                tracing::warn!(channel = id, pid = c.cred.pid, reason = ?q, counters = ?c.endpoint().stats().drop_counters(), "quarantining channel");
                c.make_defunct(match q {
                    Quarantine::RingCorrupt | Quarantine::Strikes => DefunctReason::Quarantined,
                });
            }
        }
        (moved, sent_all)
    }

    /// Arms every channel's need-wakeup flags before sleeping; true if work arrived meanwhile.
    fn arm_all(&mut self) -> bool {
        let mut work = false;
        for c in self.channels.values_mut() {
            work |= c.arm(true);
        }
        if work {
            self.disarm_all();
        }
        work
    }

    fn disarm_all(&mut self) {
        for c in self.channels.values_mut() {
            c.arm(false);
        }
    }

    /// Registers a channel's doorbell in the epoll set and starts serving it.
    pub(crate) fn add_channel(&mut self, ch: Channel) -> Result<(), NexusError> {
        epoll::add(
            &self.bells,
            ch.endpoint().bell_fd(),
            epoll::EventData::new_u64(token::CHANNEL | ch.id),
            epoll::EventFlags::IN,
        )
        .map_err(|e| NexusError::sys("epoll_ctl(channel)", e))?;
        self.channels.insert(ch.id, ch);
        Ok(())
    }

    /// Removes a channel: every buffer comes home, then its memory is unmapped.
    /// Gives up every flow of a channel and its host-port reservations.
    pub(crate) fn release_flows(&mut self, channel: ChannelId) {
        // The app's TCP peers learn of its end at once.
        if let Some(dp) = self.datapath.as_mut() {
            dp.reset_connections(channel);
        }
        for flow in self.flows.remove_channel(channel) {
            self.host_ports.release(flow);
        }
    }

    pub(crate) fn remove_channel(&mut self, id: ChannelId) {
        self.release_flows(id);
        if let Some(mut c) = self.channels.remove(&id) {
            let _ = epoll::delete(&self.bells, c.endpoint().bell_fd());
            if let Err(e) = c.reclaim() {
                tracing::error!(channel = id, error = %e, "ledger not whole after reclaiming a channel");
                self.errors.count(ControlCount::ReclaimAuditFailed);
            } else {
                self.errors.count_ok_reclaim();
            }
        }
    }

    fn shutdown(&mut self) {
        for c in self.channels.values_mut() {
            c.make_defunct(DefunctReason::ServerShutdown);
        }
        let ids: Vec<ChannelId> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_flows(id);
        }
        let _ = std::fs::remove_file(&self.config.control.socket);
        tracing::info!(
            channels = self.channels.len(),
            "nexus stopped; every channel is defunct"
        );
    }

    /// Audits channels' ledgers round-robin from where the last pass stopped, until `budget`
    /// buffers are audited or every channel was.
    fn audit_some(&mut self, budget: u64) {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut spent = 0u64;
        for _ in 0..self.channels.len() {
            if spent >= budget {
                break;
            }
            let next = self
                .channels
                .range_mut((Excluded(self.audit_cursor), Unbounded))
                .next()
                .map(|(id, _)| *id)
                .or_else(|| self.channels.keys().next().copied());
            let Some(id) = next else { break };
            if let Some(c) = self.channels.get_mut(&id) {
                spent += c.audit_now();
            }
            self.audit_cursor = id;
        }
    }

    /// The nexus's state, as `netchannel status` shows it: the summary and the first page of
    /// channels when `after` is `None`, else the channels whose ids follow `after`. Costs the
    /// page's counters, never an audit.
    pub fn status(&mut self, only_uid: Option<u32>, after: Option<ChannelId>) -> NexusStatus {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        let (mut channels, mut bytes, mut next_after) = (Vec::new(), 0usize, None);
        for c in self
            .channels
            .range_mut((from, Unbounded))
            .map(|(_, c)| c)
            .filter(|c| only_uid.is_none_or(|u| c.cred.uid == u))
        {
            let st = c.status();
            // An upper bound of the record's JSON (its fixed fields take under 500 bytes).
            bytes += 600 + st.state.len() + st.audit.len() + 64 * st.drops.len();
            if bytes > STATUS_PAGE_BYTES && !channels.is_empty() {
                next_after = channels.last().map(|c: &ChannelStatus| c.id);
                break;
            }
            channels.push(st);
        }
        if after.is_some() {
            return NexusStatus {
                pid: std::process::id(),
                channels,
                next_after,
                ..NexusStatus::default()
            };
        }
        NexusStatus {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            clients: self.clients.len(),
            fds: std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count())
                .unwrap_or(0),
            rss_bytes: rss_bytes(),
            control_errors: {
                let mut v = self.errors.list();
                // Refused fds whose close has not finished (a lingering socket's, say).
                let closing = self.closer.pending();
                if closing > 0 {
                    v.push(("fds_closing".to_owned(), closing));
                }
                v
            },
            interface: self
                .datapath
                .as_ref()
                .map(|sw| {
                    let st = sw.switch().stats();
                    let mut v = vec![
                        ("rx_frames".to_owned(), st.rx_frames),
                        ("rx_switched".to_owned(), st.rx_switched),
                        ("tx_frames".to_owned(), st.tx_frames),
                        ("tx_netif_errors".to_owned(), st.tx_netif_errors),
                        ("tx_unresolved".to_owned(), st.tx_unresolved),
                        ("tx_resets".to_owned(), st.tx_resets),
                        ("rx_coalesced".to_owned(), st.rx_coalesced),
                        ("tx_segmented".to_owned(), st.tx_segmented),
                        ("conntrack_evicted".to_owned(), st.conntrack_evicted),
                        ("interface_failed".to_owned(), u64::from(self.netif_failed)),
                    ];
                    v.extend(st.drops.nonzero().map(|(r, n)| (r.name().to_owned(), n)));
                    v.extend(
                        sw.netif_counters()
                            .into_iter()
                            .map(|(k, n)| (k.to_owned(), n)),
                    );
                    v
                })
                .unwrap_or_default(),
            channels,
            next_after,
        }
    }
}

/// Resident set size of this process.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * rustix::param::page_size() as u64)
}
