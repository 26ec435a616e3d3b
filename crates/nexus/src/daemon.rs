//! The nexus daemon: one event loop that serves the control socket and every channel.
//!
//! The loop polls channels while there is work, keeps polling for a short spin time after the
//! last packet (so a busy app never has to ring the nexus), then arms the need-wakeup flags of
//! every channel and sleeps in `epoll_wait` on the control sockets and the channels' doorbells.
//! A channel with no traffic for `park_after_us` is **parked** meanwhile: armed and left out
//! of the passes until its doorbell rings or a packet comes for it, so that a pass costs the
//! busy channels, not every channel the nexus holds.
//!
//! Nothing an app does may make this loop block or slow it for the others (`SECURITY.md`):
//! doorbells never block and are read only before a sleep, control requests are rate-limited,
//! status costs counters (ledger audits run in housekeeping within a budget), and fds apps
//! send are closed on another thread.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netchannel_shm::control::ChannelId;
use netchannel_shm::{DefunctReason, Drained};
use rustix::event::epoll;
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::channel::Quarantine;
use crate::config::Config;
use crate::control::{Control, ControlCount};
use crate::datapath::Datapath;
use crate::pacer::{Next, Pacer, Sent};
use crate::registry::{Registry, token};

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

/// How often served channels are looked at for parking.
const PARK_CHECK: Duration = Duration::from_millis(1);

/// How often throttled control clients are looked at again.
const RESUME_CHECK: Duration = Duration::from_millis(10);

/// The running nexus: the event loop over what it serves ([`Registry`]) and its control path
/// ([`Control`]).
#[derive(Debug)]
pub struct Nexus {
    /// Channels, flows, port reservations, the datapath.
    pub(crate) reg: Registry,
    /// The control socket's clients, their rates, the control counters.
    pub(crate) control: Control,
    stop: Arc<AtomicBool>,
    /// Whether the interface's fd is in the epoll set's interest (not during coalescing).
    netif_watched: bool,
    signals: UnixStream,
    shutting_down: bool,
}

impl Nexus {
    /// Binds the control socket and prepares the event loop. SIGTERM and SIGINT start an
    /// orderly shutdown once [`Nexus::run`] is running.
    pub fn new(config: Config) -> Result<Self, NexusError> {
        let listener = bind(&config)?;
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
        let control = Control::new(listener, &config)
            .map_err(|e| NexusError::sys("starting the closer thread", e))?;
        Ok(Self {
            reg: Registry::new(config, epoll, bells, MAX_FLOWS),
            control,
            stop: Arc::new(AtomicBool::new(false)),
            netif_watched: true,
            signals,
            shutting_down: false,
        })
    }

    /// Serves an interface through a flowswitch instead of reflecting packets.
    pub fn with_datapath(config: Config, mut dp: Datapath) -> Result<Self, NexusError> {
        let d = &config.datapath;
        dp.switch_mut()
            .set_reassembly_limits(crate::flowswitch::reassembly::Limits {
                memory: usize::try_from(d.reassembly_memory_kib.saturating_mul(1024))
                    .unwrap_or(usize::MAX),
                timeout: Duration::from_millis(d.reassembly_timeout_ms),
                ..Default::default()
            });
        let mut n = Self::new(config)?;
        let watch = |fd, t, what: &str| {
            epoll::add(
                &n.reg.epoll,
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
            n.reg.host_ports.set_steering(steering);
        }
        n.reg.datapath = Some(dp);
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
        let d = &self.reg.config.datapath;
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
        let mut last_park = Instant::now();
        let park_after = Duration::from_micros(d.park_after_us);
        tracing::info!(socket = %self.reg.config.control.socket.display(), "nexus serving");
        while !self.shutting_down && !self.stop.load(Ordering::Relaxed) {
            let (moved, sent) = self.service_channels();
            self.check_netif()?;
            passes = passes.wrapping_add(1);
            let now = Instant::now();
            if now.saturating_duration_since(last_housekeeping) >= HOUSEKEEPING {
                last_housekeeping = now;
                for c in self.reg.channels.values_mut() {
                    c.housekeeping(&self.reg.config.channel, now);
                }
                if let Some(dp) = self.reg.datapath.as_mut() {
                    dp.housekeeping(now);
                }
                self.reg.audit_some(AUDIT_BUDGET);
            }
            if now.saturating_duration_since(last_park) >= PARK_CHECK {
                last_park = now;
                self.reg.park_quiet(park_after, now);
            }
            // Throttled clients are looked at often (their requests wait meanwhile), also
            // while the loop would otherwise sleep for good.
            let throttled = !self.control.rate.throttled.is_empty();
            if throttled && now.saturating_duration_since(last_resume) >= RESUME_CHECK {
                last_resume = now;
                self.control.resume_throttled(&self.reg, now);
            }
            // Packets waiting for a neighbour are retried at least every millisecond.
            let cap = if self
                .reg
                .datapath
                .as_ref()
                .is_some_and(Datapath::has_pending)
            {
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
        if self.reg.netif_failed {
            return Ok(());
        }
        let Some(sw) = self.reg.datapath.as_ref() else {
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
            epoll::delete(&self.reg.epoll, fd)
                .map_err(|e| NexusError::sys("epoll_ctl(interface)", e))?;
        }
        self.reg.netif_failed = true;
        self.netif_watched = false;
        Ok(())
    }

    /// Whether the interface's frames wake the event loop.
    fn watch_netif(&mut self, on: bool) -> Result<(), NexusError> {
        if self.netif_watched == on || self.reg.netif_failed {
            return Ok(());
        }
        if let Some(fd) = self
            .reg
            .datapath
            .as_ref()
            .and_then(|dp| dp.netif().wake_fd())
        {
            let flags = if on {
                epoll::EventFlags::IN
            } else {
                epoll::EventFlags::empty()
            };
            epoll::modify(
                &self.reg.epoll,
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
            &self.reg.epoll,
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
                token::LISTENER => self.control.accept_clients(&mut self.reg),
                token::SIGNAL => {
                    let mut b = [0u8; 64];
                    let _ = std::io::Read::read(&mut self.signals, &mut b);
                    tracing::info!("signal received; shutting down");
                    self.shutting_down = true;
                }
                t if t & !token::ID_MASK == token::CLIENT => {
                    self.control
                        .on_client_event(&mut self.reg, t & token::ID_MASK, flags)
                }
                token::NETLINK => {
                    if let Some(dp) = self.reg.datapath.as_mut() {
                        dp.resolver_readable();
                    }
                }
                // A ring of a parked channel's app brings the channel back into the passes.
                token::BELLS if self.reg.any_parked() => self.unpark_rung()?,
                // Else a ring only ends a sleep: the loop then serves every channel's rings,
                // and clears the doorbells before it sleeps again (`clear_bells`).
                _ => {}
            }
        }
        Ok(())
    }

    /// The channels whose doorbells rang (at most [`BELLS_PER_WAIT`]; the rest stay ready),
    /// without waiting.
    fn rung_channels(&self) -> Result<Vec<ChannelId>, NexusError> {
        let mut rang: Vec<epoll::Event> = Vec::with_capacity(BELLS_PER_WAIT);
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match epoll::wait(
            &self.reg.bells,
            rustix::buffer::spare_capacity(&mut rang),
            Some(&zero),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(NexusError::sys("epoll_wait(doorbells)", e)),
        }
        Ok(rang.iter().map(|e| e.data.u64() & token::ID_MASK).collect())
    }

    /// Serves the parked channels whose doorbells rang, and clears those doorbells (else the
    /// old ring would wake each channel again every time it is parked while the loop polls).
    /// At most one read per park of a channel, which takes 5 ms of silence: an app ringing
    /// without sending still costs a polling nexus next to nothing. (A hang-up is left for
    /// `clear_bells`: a shut doorbell stays readable.)
    fn unpark_rung(&mut self) -> Result<(), NexusError> {
        let now = Instant::now();
        let mut stray = Vec::new();
        for id in self.rung_channels()? {
            if self.reg.unpark(id, now)
                && let Some(c) = self.reg.channels.get(&id)
            {
                let _ = c.endpoint().clear_bell_into(&mut stray);
            }
        }
        self.control.closer.close(stray);
        Ok(())
    }

    /// Clears the doorbells that rang (each read at most
    /// [`netchannel_shm::doorbell::DRAIN_BYTES`]), before the loop sleeps: never while it polls
    /// (but for parked channels' first rings, in `unpark_rung`), so a flood of rings costs a
    /// polling nexus nothing. A channel whose app hung up its end
    /// of the doorbell is closed.
    fn clear_bells(&mut self) -> Result<(), NexusError> {
        let (mut stray, mut hung_up) = (Vec::new(), Vec::new());
        let now = Instant::now();
        for id in self.rung_channels()? {
            // Its ring is cleared here, so this is the last chance to see that it rang.
            let _ = self.reg.unpark(id, now);
            if let Some(c) = self.reg.channels.get(&id)
                && c.endpoint().clear_bell_into(&mut stray) == Drained::PeerGone
            {
                hung_up.push(id);
            }
        }
        self.control.closer.close(stray);
        // An app that shut or closed its end of a channel's doorbell can neither wake us nor be
        // woken: the channel is over, as if it had closed it (and its bell would poll as ready
        // for ever).
        for id in hung_up {
            if self.reg.channels.contains_key(&id) {
                tracing::info!(
                    channel = id,
                    "the app hung up the channel's doorbell; closing the channel"
                );
                self.control.errors.count(ControlCount::DoorbellHangups);
                self.control.remove_channel(&mut self.reg, id);
            }
        }
        Ok(())
    }

    /// One pass over the interface and every channel: packets moved, and what apps sent.
    fn service_channels(&mut self) -> (usize, Sent) {
        let (cfg, batch) = (&self.reg.config.channel, self.reg.config.datapath.batch);
        let (mut moved, mut sent_all) = (0, Sent::default());
        let mut quarantine = Vec::new();
        // Parked channels a packet came for.
        let (mut woken, any_parked) = (Vec::new(), self.reg.any_parked());
        match &mut self.reg.datapath {
            // With an interface: the flowswitch moves packets between it and the channels.
            Some(sw) => {
                // One reading of the clock for the whole pass.
                let now = Instant::now();
                sw.exchange(now);
                moved += sw.retry_pending(&mut self.reg.flows, &mut self.reg.channels);
                let (n, broken) =
                    sw.rx_pass(&mut self.reg.flows, &mut self.reg.channels, RX_BUDGET);
                moved += n;
                quarantine.extend(broken.into_iter().map(|id| (id, Quarantine::RingCorrupt)));
                if any_parked {
                    woken.extend_from_slice(sw.switch().touched());
                }
                let frames_before = sw.switch().stats().tx_frames;
                for id in &self.reg.active {
                    let Some(c) = self.reg.channels.get_mut(id) else {
                        continue;
                    };
                    let sent = match sw.tx_pass(&mut self.reg.flows, c, batch, now) {
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
                for id in &self.reg.active {
                    let Some(c) = self.reg.channels.get_mut(id) else {
                        continue;
                    };
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
        if !woken.is_empty() {
            let now = Instant::now();
            for id in woken {
                let _ = self.reg.unpark(id, now);
            }
        }
        for (id, q) in quarantine {
            self.reg.release_flows(id);
            self.reg.unwatch_channel(id);
            if let Some(c) = self.reg.channels.get_mut(&id) {
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
        // Parked channels are armed already.
        for id in &self.reg.active {
            if let Some(c) = self.reg.channels.get_mut(id) {
                work |= c.arm(true);
            }
        }
        if work {
            self.disarm_all();
        }
        work
    }

    fn disarm_all(&mut self) {
        for id in &self.reg.active {
            if let Some(c) = self.reg.channels.get_mut(id) {
                c.arm(false);
            }
        }
    }

    fn shutdown(&mut self) {
        for c in self.reg.channels.values_mut() {
            c.make_defunct(DefunctReason::ServerShutdown);
        }
        let ids: Vec<ChannelId> = self.reg.channels.keys().copied().collect();
        for id in ids {
            self.reg.release_flows(id);
        }
        let _ = std::fs::remove_file(&self.reg.config.control.socket);
        tracing::info!(
            channels = self.reg.channels.len(),
            "nexus stopped; every channel is defunct"
        );
    }
}

/// Binds the control socket per the config (refusing to steal it from a live nexus).
pub(crate) fn bind(config: &Config) -> Result<OwnedFd, NexusError> {
    let path = &config.control.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| NexusError::sys(format!("creating {}", dir.display()), e))?;
    }
    let addr = rustix::net::SocketAddrUnix::new(path.as_path())
        .map_err(|e| NexusError::sys("socket path", e))?;
    if path.exists() {
        let probe = socket(SocketFlags::CLOEXEC)?;
        if rustix::net::connect(&probe, &addr).is_ok() {
            return Err(NexusError::AlreadyRunning(path.clone()));
        }
        std::fs::remove_file(path)
            .map_err(|e| NexusError::sys(format!("removing stale {}", path.display()), e))?;
    }
    let fd = socket(SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)?;
    rustix::net::bind(&fd, &addr)
        .map_err(|e| NexusError::sys(format!("binding {}", path.display()), e))?;
    let mode = config
        .control_mode()
        .map_err(|e| NexusError::sys(e.to_string(), std::io::ErrorKind::InvalidInput))?;
    std::fs::set_permissions(
        path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
    )
    .map_err(|e| NexusError::sys("chmod control socket", e))?;
    if let Some(g) = &config.control.group {
        let gid = group_id(g).ok_or_else(|| {
            NexusError::sys(
                format!("unknown group {g:?} in control.group"),
                std::io::ErrorKind::NotFound,
            )
        })?;
        rustix::fs::chown(path.as_path(), None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| NexusError::sys("chown control socket", e))?;
    }
    rustix::net::listen(&fd, 64).map_err(|e| NexusError::sys("listen", e))?;
    Ok(fd)
}

fn socket(flags: SocketFlags) -> Result<OwnedFd, NexusError> {
    rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)
        .map_err(|e| NexusError::sys("socket(AF_UNIX, SOCK_SEQPACKET)", e))
}

/// A group's id from its number or its name in /etc/group.
fn group_id(g: &str) -> Option<u32> {
    g.parse().ok().or_else(|| {
        std::fs::read_to_string("/etc/group")
            .ok()?
            .lines()
            .find_map(|l| {
                let mut f = l.split(':');
                (f.next()? == g).then(|| f.nth(1)?.parse().ok())?
            })
    })
}
