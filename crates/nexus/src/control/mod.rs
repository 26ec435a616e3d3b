//! The control socket: apps connect, are identified by SO_PEERCRED, and ask for channels.
//!
//! [`Control`] is a message handler: the event loop hands it each client's readiness, and it
//! acts on what the nexus serves through the [`Registry`] (never on the loop itself).
//!
//! Every message is length-limited and versioned (see [`netchannel_shm::control`]). Anything
//! malformed is answered with an error and counted under its reason; fds a client sends unasked
//! are closed at once, on the closer thread ([`closer`]); requests are rate-limited per client
//! and per user ([`rate`]); nothing a client sends can make the nexus panic or block.

pub(crate) mod closer;
mod flows;
pub mod policy;
pub(crate) mod rate;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use netchannel_shm::control::{
    self, ChannelId, ChannelKind, DecodeError, ErrorCode, MAX_REPLY, MAX_REQUEST, NexusStatus,
    Offloads, Reply, Request,
};
use netchannel_shm::endpoint::{Home, ServerSetup};
use netchannel_shm::fdpass::{recv_with_fds, send_with_fds};
use netchannel_shm::{DefunctReason, Error as ShmError, Geometry};
use policy::Cred;
use rustix::event::epoll;
use rustix::net::SocketFlags;

use crate::channel::Channel;
use crate::config::Config;
use crate::registry::{Registry, token};
use closer::Closer;
use rate::RateLimits;

/// Most offers a client may leave unanswered at once.
const MAX_PENDING_OFFERS: usize = 4;
/// Most messages read from one client per event (fairness between clients).
const MESSAGES_PER_EVENT: usize = 16;
/// Bytes of a reply that cost as much as one more request (a status page of 64 channels is
/// about 40 KB: 160 requests' worth).
const REPLY_BYTES_PER_TOKEN: f64 = 256.0;
/// Pool buffers of a channel offer that cost as much as one more request: building a pool,
/// then reclaiming and unmapping it, costs the loop about 1 ms per 65,536 buffers, so a user
/// churning such channels gets about 8 a second at the default rate.
const BUFFERS_PER_TOKEN: f64 = 256.0;

macro_rules! control_counts {
    ($( $(#[doc = $doc:literal])* $v:ident = $name:literal; )*) => {
        /// What the control path counts: refused requests, dropped messages, reclaims.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum ControlCount {
            $( $(#[doc = $doc])* $v, )*
        }

        impl ControlCount {
            /// Every kind, in counter order.
            pub const ALL: &'static [ControlCount] = &[$(ControlCount::$v,)*];

            /// The counter's name in `netchannel status`.
            pub const fn name(self) -> &'static str {
                match self { $(ControlCount::$v => $name,)* }
            }
        }
    };
}

control_counts! {
    /// A channel_ready carried a region that is not a valid app region (or the nexus's own).
    BadAppRegion = "bad_app_region";
    /// A message that is not netchannel's.
    BadMagic = "bad_magic";
    /// A message of another protocol version.
    BadVersion = "bad_version";
    /// A channel closed because its app hung up its doorbell.
    DoorbellHangups = "doorbell_hangups";
    /// A client could not be watched (epoll refused it).
    EpollFull = "epoll_full";
    /// A channel refused: the user's channel limit.
    LimitChannels = "limit_channels";
    /// A client refused: the connection limit.
    LimitConnections = "limit_connections";
    /// A flow refused: the user's flow limit.
    LimitFlows = "limit_flows";
    /// A message whose body does not decode.
    Malformed = "malformed";
    /// A client refused: its credentials could not be read.
    NoPeercred = "no_peercred";
    /// A request the policy does not permit.
    NotPermitted = "not_permitted";
    /// A request out of order (a channel_ready without an offer, say).
    OutOfOrder = "out_of_order";
    /// A message larger than a request may be.
    Oversized = "oversized";
    /// A flow refused: the host already uses the port.
    PortInUse = "port_in_use";
    /// A channel's ledger was not whole after it was reclaimed.
    ReclaimAuditFailed = "reclaim_audit_failed";
    /// Channels reclaimed with a whole ledger.
    Reclaims = "reclaims";
    /// A reply the client's socket did not take.
    ReplyDropped = "reply_dropped";
    /// A reply larger than a reply may be.
    ReplyTooLarge = "reply_too_large";
    /// A request refused for want of a resource (memory, fds).
    Resource = "resource";
    /// A client paused for exceeding its request rate.
    Throttled = "throttled";
    /// A message with more fds than any request carries.
    TooManyFds = "too_many_fds";
    /// A message shorter than its header.
    Truncated = "truncated";
    /// Fds sent with a request that takes none.
    UnaskedFds = "unasked_fds";
    /// A channel_ready with the wrong number of fds.
    WrongFdCount = "wrong_fd_count";
}

/// Counters of the control path, one per [`ControlCount`].
#[derive(Debug)]
pub struct ControlErrors {
    counts: [u64; ControlCount::ALL.len()],
}

impl Default for ControlErrors {
    fn default() -> Self {
        Self {
            counts: [0; ControlCount::ALL.len()],
        }
    }
}

impl ControlErrors {
    pub(crate) fn count(&mut self, what: ControlCount) {
        self.counts[what as usize] += 1;
    }

    pub(crate) fn count_ok_reclaim(&mut self) {
        self.count(ControlCount::Reclaims);
    }

    /// Every counter counted at least once, as (name, count), by name.
    pub fn list(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = ControlCount::ALL
            .iter()
            .zip(self.counts.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.name().to_owned(), *n))
            .collect();
        v.sort();
        v
    }
}

/// A connected app.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    cred: Cred,
    /// Channels offered and not yet ready, with the offloads they were granted.
    offers: BTreeMap<ChannelId, (ServerSetup, Offloads)>,
}

/// The control path: a message handler over the nexus's [`Registry`]. It owns the control
/// socket and its clients, their request rates and the control counters; the event loop
/// hands it each client's readiness.
#[derive(Debug)]
pub struct Control {
    listener: OwnedFd,
    pub(crate) clients: BTreeMap<u64, Client>,
    pub(crate) errors: ControlErrors,
    /// Control request rates per client and per user.
    pub(crate) rate: RateLimits,
    /// Closes the fds apps hand us that we refuse, off the loop's thread.
    pub(crate) closer: Closer,
}

/// Checks, before the nexus maps it or becomes able to close it inline, that the fd an app
/// sent as its region is what it must be: a new memfd of the app's own (not one of the
/// channel's own objects handed back), sealed against shrinking and growing.
fn app_region_is_usable(setup: &ServerSetup, fd: &OwnedFd) -> Result<(), String> {
    let seals = rustix::fs::fcntl_get_seals(fd)
        .map_err(|_| "it is not a memfd (no seals to read)".to_owned())?;
    if !seals.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW) {
        return Err("it is not sealed against shrinking and growing".into());
    }
    if setup.owns_object(fd.as_fd()) {
        return Err("it is the channel's own memory, handed back".into());
    }
    Ok(())
}

/// What an `open_channel` request asks for.
struct OpenAsk {
    kind: ChannelKind,
    ring_slots: Option<u32>,
    buffers: Option<u32>,
    buf_size: Option<u32>,
    offloads: Offloads,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::Error {
        code,
        message: message.into(),
    }
}

impl Control {
    /// The control path of the socket `listener` (bound and listening), per `config`'s
    /// limits. Starts the closer thread.
    pub(crate) fn new(listener: OwnedFd, config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            listener,
            clients: BTreeMap::new(),
            errors: ControlErrors::default(),
            rate: RateLimits::new(
                config.limits.requests_per_sec,
                config.limits.user_requests_per_sec,
            ),
            closer: Closer::start()?,
        })
    }

    /// Removes a channel (its app closed it or is gone) and counts how its reclaim went.
    pub(crate) fn remove_channel(&mut self, reg: &mut Registry, id: ChannelId) {
        match reg.remove_channel(id) {
            Some(Ok(())) => self.errors.count_ok_reclaim(),
            Some(Err(_)) => self.errors.count(ControlCount::ReclaimAuditFailed),
            None => {}
        }
    }

    /// The nexus's state for `netchannel status`, with the control path's counters.
    pub(crate) fn status(
        &self,
        reg: &mut Registry,
        only_uid: Option<u32>,
        after: Option<ChannelId>,
    ) -> NexusStatus {
        let mut st = reg.status(only_uid, after);
        if after.is_none() {
            st.clients = self.clients.len();
            st.control_errors = self.errors.list();
            // Refused fds whose close has not finished (a lingering socket's, say).
            let closing = self.closer.pending();
            if closing > 0 {
                st.control_errors.push(("fds_closing".to_owned(), closing));
            }
        }
        st
    }

    /// Accepts every pending connection.
    pub(crate) fn accept_clients(&mut self, reg: &mut Registry) {
        loop {
            let sock = match rustix::net::accept_with(
                &self.listener,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            ) {
                Ok(s) => s,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            let Ok(uc) = rustix::net::sockopt::socket_peercred(&sock) else {
                self.errors.count(ControlCount::NoPeercred);
                continue;
            };
            let cred = Cred {
                pid: uc.pid.as_raw_nonzero().get(),
                uid: uc.uid.as_raw(),
                gid: uc.gid.as_raw(),
                groups: Cred::groups_of(uc.pid.as_raw_nonzero().get()),
            };
            let same_user = self
                .clients
                .values()
                .filter(|c| c.cred.uid == cred.uid)
                .count();
            if cred.uid != 0 && same_user >= reg.config.limits.connections_per_user {
                self.errors.count(ControlCount::LimitConnections);
                let msg = format!(
                    "uid {} already has {same_user} connections; the limit is limits.connections_per_user = {}",
                    cred.uid, reg.config.limits.connections_per_user
                );
                let _ = send_with_fds(
                    sock.as_fd(),
                    &control::encode(&refuse(ErrorCode::Limit, msg)),
                    &[],
                );
                continue;
            }
            let id = reg.next_id();
            let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
            if epoll::add(
                &reg.epoll,
                &sock,
                epoll::EventData::new_u64(token::CLIENT | id),
                flags,
            )
            .is_err()
            {
                self.errors.count(ControlCount::EpollFull);
                continue;
            }
            tracing::debug!(
                client = id,
                pid = cred.pid,
                uid = cred.uid,
                "client connected"
            );
            self.clients.insert(
                id,
                Client {
                    sock,
                    cred,
                    offers: BTreeMap::new(),
                },
            );
        }
    }

    /// Handles readiness or hang-up of a client socket.
    pub(crate) fn on_client_event(
        &mut self,
        reg: &mut Registry,
        id: u64,
        flags: epoll::EventFlags,
    ) {
        let hung_up = flags
            .intersects(epoll::EventFlags::HUP | epoll::EventFlags::RDHUP | epoll::EventFlags::ERR);
        let now = std::time::Instant::now();
        for _ in 0..MESSAGES_PER_EVENT {
            let Some(client) = self.clients.get(&id) else {
                return;
            };
            if !self.rate.admit(id, client.cred.uid, now) {
                // Not read until its buckets refill: its requests wait in its own socket.
                if !hung_up {
                    self.throttle(reg, id);
                }
                break;
            }
            let mut buf = vec![0u8; MAX_REQUEST + 1];
            match recv_with_fds(client.sock.as_fd(), &mut buf, true) {
                Ok(r) => {
                    buf.truncate(r.len);
                    let reply = self.on_message(reg, id, &buf, r.fds, r.truncated, r.fds_truncated);
                    // A large reply (a page of many records) or a large pool costs the
                    // datapath thread more than one request: charged in proportion.
                    let pool = match &reply.0 {
                        Reply::ChannelOffer { channel } => self
                            .clients
                            .get(&id)
                            .and_then(|c| c.offers.get(channel))
                            .map_or(0, |o| o.0.geometry().buffers()),
                        _ => 0,
                    };
                    let bytes = self.send_reply(id, &reply.0, &reply.1);
                    if let Some(uid) = self.clients.get(&id).map(|c| c.cred.uid) {
                        let extra = bytes as f64 / REPLY_BYTES_PER_TOKEN
                            + f64::from(pool) / BUFFERS_PER_TOKEN;
                        self.rate.charge(id, uid, extra);
                    }
                }
                Err(ShmError::Sys {
                    source: rustix::io::Errno::AGAIN,
                    ..
                }) => break,
                Err(_) => {
                    self.drop_client(reg, id);
                    return;
                }
            }
        }
        if hung_up {
            self.drop_client(reg, id);
        }
    }

    /// Stops reading a client over its request rate (a hang-up is still noticed).
    fn throttle(&mut self, reg: &Registry, id: u64) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        if self.rate.throttled.insert(id, client.cred.uid).is_some() {
            return;
        }
        self.errors.count(ControlCount::Throttled);
        tracing::debug!(
            client = id,
            uid = client.cred.uid,
            "control requests throttled"
        );
        let _ = epoll::modify(
            &reg.epoll,
            &client.sock,
            epoll::EventData::new_u64(token::CLIENT | id),
            epoll::EventFlags::RDHUP,
        );
    }

    /// Reads again the throttled clients whose buckets have refilled (every few milliseconds
    /// while any is throttled).
    pub(crate) fn resume_throttled(&mut self, reg: &Registry, now: std::time::Instant) {
        let ready: Vec<u64> = self
            .rate
            .throttled
            .clone()
            .into_iter()
            .filter(|&(id, uid)| self.rate.may_resume(id, uid, now))
            .map(|(id, _)| id)
            .collect();
        for id in ready {
            self.rate.throttled.remove(&id);
            if let Some(client) = self.clients.get(&id) {
                let _ = epoll::modify(
                    &reg.epoll,
                    &client.sock,
                    epoll::EventData::new_u64(token::CLIENT | id),
                    epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
                );
            }
        }
    }

    /// Sends a reply (never blocking); returns its size in bytes.
    fn send_reply(&mut self, id: u64, reply: &Reply, fds: &[OwnedFd]) -> usize {
        let Some(client) = self.clients.get(&id) else {
            return 0;
        };
        let bytes = control::encode(reply);
        if bytes.len() > MAX_REPLY {
            self.errors.count(ControlCount::ReplyTooLarge);
            return bytes.len();
        }
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if send_with_fds(client.sock.as_fd(), &bytes, &borrowed).is_err() {
            // The client does not read its replies (or is gone); never block on it.
            self.errors.count(ControlCount::ReplyDropped);
        }
        bytes.len()
    }

    /// The app is gone: every channel it held is reclaimed at once.
    fn drop_client(&mut self, reg: &mut Registry, id: u64) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        let _ = epoll::delete(&reg.epoll, &client.sock);
        self.rate.forget(id);
        let owned: Vec<ChannelId> = reg
            .channels
            .values()
            .filter(|c| c.client == id)
            .map(|c| c.id)
            .collect();
        for ch in owned {
            self.remove_channel(reg, ch);
        }
        tracing::debug!(
            client = id,
            pid = client.cred.pid,
            "client gone; its channels reclaimed"
        );
    }

    /// Decodes and carries out one request; returns the reply and the fds to attach.
    fn on_message(
        &mut self,
        reg: &mut Registry,
        id: u64,
        bytes: &[u8],
        fds: Vec<OwnedFd>,
        truncated: bool,
        too_many_fds: bool,
    ) -> (Reply, Vec<OwnedFd>) {
        if too_many_fds {
            let n = fds.len();
            self.closer.close(fds);
            self.errors.count(ControlCount::TooManyFds);
            return (
                refuse(
                    ErrorCode::BadMessage,
                    format!(
                        "this message carried {n} fds; a request carries at most one \
                         (channel_ready: the app region); they were closed"
                    ),
                ),
                vec![],
            );
        }
        if truncated || bytes.len() > MAX_REQUEST {
            self.closer.close(fds);
            self.errors.count(ControlCount::Oversized);
            return (
                refuse(
                    ErrorCode::BadMessage,
                    format!("control messages are at most {MAX_REQUEST} bytes"),
                ),
                vec![],
            );
        }
        let req = match control::decode::<Request>(bytes, MAX_REQUEST) {
            Ok(r) => r,
            Err(e) => {
                self.closer.close(fds);
                self.errors.count(match e {
                    DecodeError::Size(_) => ControlCount::Truncated,
                    DecodeError::Magic => ControlCount::BadMagic,
                    DecodeError::Version { .. } => ControlCount::BadVersion,
                    DecodeError::Body(_) | DecodeError::Reserved => ControlCount::Malformed,
                });
                let code = if matches!(e, DecodeError::Version { .. }) {
                    ErrorCode::Version
                } else {
                    ErrorCode::BadMessage
                };
                return (refuse(code, e.to_string()), vec![]);
            }
        };
        let expects_fds = matches!(req, Request::ChannelReady { .. });
        if !expects_fds && !fds.is_empty() {
            self.errors.count(ControlCount::UnaskedFds);
            self.closer.close(fds);
            return (
                refuse(
                    ErrorCode::BadMessage,
                    "this request takes no fds; they were closed",
                ),
                vec![],
            );
        }
        match req {
            Request::OpenChannel {
                kind,
                ring_slots,
                buffers,
                buf_size,
                offloads,
            } => self.open_channel(
                reg,
                id,
                OpenAsk {
                    kind,
                    ring_slots,
                    buffers,
                    buf_size,
                    offloads,
                },
            ),
            Request::ChannelReady { channel } => {
                (self.channel_ready(reg, id, channel, fds), vec![])
            }
            Request::CloseChannel { channel } => (self.close_channel(reg, id, channel), vec![]),
            Request::Status { after } => {
                let uid = self.clients.get(&id).map_or(u32::MAX, |c| c.cred.uid);
                (
                    Reply::Status(Box::new(self.status(reg, (uid != 0).then_some(uid), after))),
                    vec![],
                )
            }
            Request::Defunct { channel } => (self.defunct(reg, id, channel), vec![]),
            Request::AddFlow {
                channel,
                proto,
                local,
                remote,
            } => (
                self.add_flow(reg, id, channel, proto, local, remote),
                vec![],
            ),
            Request::RemoveFlow { flow } => (self.remove_flow(reg, id, flow), vec![]),
            Request::Flows { after } => (self.list_flows(reg, id, after), vec![]),
        }
    }

    fn open_channel(&mut self, reg: &mut Registry, id: u64, ask: OpenAsk) -> (Reply, Vec<OwnedFd>) {
        let OpenAsk {
            kind,
            ring_slots,
            buffers,
            buf_size,
            offloads,
        } = ask;
        let Some(client) = self.clients.get(&id) else {
            return (refuse(ErrorCode::OutOfOrder, "unknown client"), vec![]);
        };
        let cred = client.cred.clone();
        if let Err(why) = policy::may_open(&reg.config.policy, &cred, kind) {
            self.errors.count(ControlCount::NotPermitted);
            return (refuse(ErrorCode::NotPermitted, why), vec![]);
        }
        if kind != ChannelKind::Normal {
            return (
                refuse(
                    ErrorCode::NotPermitted,
                    format!("{kind:?} channels are not available yet"),
                ),
                vec![],
            );
        }
        let held = reg
            .channels
            .values()
            .filter(|c| c.cred.uid == cred.uid)
            .count()
            + self
                .clients
                .values()
                .filter(|c| c.cred.uid == cred.uid)
                .map(|c| c.offers.len())
                .sum::<usize>();
        let limit = reg.config.limits.channels_per_user;
        if cred.uid != 0 && held >= limit {
            self.errors.count(ControlCount::LimitChannels);
            return (
                refuse(
                    ErrorCode::Limit,
                    format!(
                        "uid {} has {held} channels; the limit is limits.channels_per_user = {limit}",
                        cred.uid
                    ),
                ),
                vec![],
            );
        }
        if client.offers.len() >= MAX_PENDING_OFFERS {
            self.errors.count(ControlCount::OutOfOrder);
            return (
                refuse(
                    ErrorCode::OutOfOrder,
                    "too many channel offers left unanswered; answer them with channel_ready first",
                ),
                vec![],
            );
        }
        let c = &reg.config.channel;
        let slots = ring_slots.unwrap_or(c.ring_slots);
        if !slots.is_power_of_two() || slots > c.max_ring_slots {
            return (
                refuse(
                    ErrorCode::Resource,
                    format!(
                        "ring_slots must be a power of two up to {}",
                        c.max_ring_slots
                    ),
                ),
                vec![],
            );
        }
        let buf_size = buf_size.unwrap_or(2048);
        if !buf_size.is_power_of_two() || !(2048..=c.max_buf_size).contains(&buf_size) {
            return (
                refuse(
                    ErrorCode::Resource,
                    format!(
                        "buf_size must be a power of two from 2048 to {} (channel.max_buf_size)",
                        c.max_buf_size
                    ),
                ),
                vec![],
            );
        }
        // Larger buffers mean fewer of them: a pool never exceeds the bytes of the largest
        // pool of 2 KiB buffers.
        let max_buffers = (u64::from(c.max_buffers) * 2048 / u64::from(buf_size))
            .max(u64::from(c.buffers_per_segment)) as u32;
        let want = buffers
            .unwrap_or(c.buffers)
            .clamp(c.buffers_per_segment, max_buffers);
        // Offloads need an interface to reshape packets for, and buffers that hold several
        // segments.
        let offloads = if reg.datapath.is_some() && buf_size >= Offloads::MIN_BUF_SIZE {
            offloads
        } else {
            Offloads::default()
        };
        // A segment (the unit of growth and of return to the OS) keeps its bytes whatever
        // the buffer size: fewer buffers per segment when they are larger.
        let per_segment = (c.buffers_per_segment * 2048 / buf_size).max(1);
        let geometry = Geometry {
            ring_slots: [slots, slots, slots, slots, 64],
            buf_size,
            bufs_per_segment: per_segment,
            segments: want.div_ceil(per_segment),
        };
        let setup = match ServerSetup::new(geometry) {
            Ok(s) => s,
            Err(e) => {
                self.errors.count(ControlCount::Resource);
                return (
                    refuse(
                        ErrorCode::Resource,
                        format!("cannot build the channel: {e}"),
                    ),
                    vec![],
                );
            }
        };
        let fds: Option<Vec<OwnedFd>> = setup.fds().ok().and_then(|f| {
            [f.region, f.pool, f.bell]
                .iter()
                .map(|fd| fd.try_clone_to_owned().ok())
                .collect()
        });
        let Some(fds) = fds else {
            self.errors.count(ControlCount::Resource);
            return (
                refuse(ErrorCode::Resource, "out of file descriptors"),
                vec![],
            );
        };
        let channel = reg.next_id();
        if let Some(client) = self.clients.get_mut(&id) {
            client.offers.insert(channel, (setup, offloads));
        }
        (Reply::ChannelOffer { channel }, fds)
    }

    fn channel_ready(
        &mut self,
        reg: &mut Registry,
        id: u64,
        channel: ChannelId,
        fds: Vec<OwnedFd>,
    ) -> Reply {
        let Some(client) = self.clients.get_mut(&id) else {
            return refuse(ErrorCode::OutOfOrder, "unknown client");
        };
        let Some((setup, offloads)) = client.offers.remove(&channel) else {
            self.closer.close(fds);
            self.errors.count(ControlCount::OutOfOrder);
            return refuse(
                ErrorCode::OutOfOrder,
                format!("no channel {channel} was offered to you; send open_channel first"),
            );
        };
        let cred = client.cred.clone();
        let region = match <[OwnedFd; 1]>::try_from(fds) {
            Ok([region]) => region,
            Err(fds) => {
                let n = fds.len();
                self.closer.close(fds);
                self.errors.count(ControlCount::WrongFdCount);
                return refuse(
                    ErrorCode::BadMessage,
                    format!(
                        "channel_ready carries exactly one fd, the app region (got {n}); \
                         the offer is withdrawn: open the channel again"
                    ),
                );
            }
        };
        if let Err(why) = app_region_is_usable(&setup, &region) {
            self.closer.close(vec![region]);
            self.errors.count(ControlCount::BadAppRegion);
            return refuse(
                ErrorCode::BadMessage,
                format!("the app region is unusable: {why}; the offer is withdrawn"),
            );
        }
        let mut ep = match setup.finish(region, Home::All) {
            Ok(ep) => ep,
            Err(e) => {
                self.errors.count(ControlCount::BadAppRegion);
                return refuse(
                    ErrorCode::BadMessage,
                    format!("the app region is unusable: {e}; the offer is withdrawn"),
                );
            }
        };
        // From here on the mappings and the doorbell are all the nexus needs: one fd per
        // channel, so that thousands of channels fit an ordinary fd limit.
        ep.release_fds();
        let mut ch = Channel::new(channel, id, cred, ep, &reg.config.channel);
        ch.offloads = offloads;
        if let Err(q) = ch.service(&reg.config.channel, 0) {
            tracing::warn!(channel, ?q, "a new channel failed its first pass");
        }
        if let Err(e) = reg.add_channel(ch) {
            self.errors.count(ControlCount::Resource);
            return refuse(ErrorCode::Resource, e.to_string());
        }
        tracing::info!(
            channel,
            pid = self.clients.get(&id).map_or(0, |c| c.cred.pid),
            "channel opened"
        );
        let (addresses, mtu) = reg
            .datapath
            .as_ref()
            .map(|dp| (dp.switch().host_addrs().to_vec(), dp.netif().mtu()))
            .unwrap_or_default();
        Reply::ChannelOpened {
            channel,
            addresses,
            mtu,
            offloads,
        }
    }

    fn close_channel(&mut self, reg: &mut Registry, id: u64, channel: ChannelId) -> Reply {
        if reg.channels.get(&channel).is_none_or(|c| c.client != id) {
            return refuse(
                ErrorCode::NoSuchChannel,
                format!("you have no channel {channel}"),
            );
        }
        self.remove_channel(reg, channel);
        Reply::Done
    }

    fn defunct(&mut self, reg: &mut Registry, id: u64, channel: ChannelId) -> Reply {
        let uid = self.clients.get(&id).map_or(u32::MAX, |c| c.cred.uid);
        match reg.channels.get_mut(&channel) {
            Some(c) if uid == 0 || c.cred.uid == uid => {
                c.make_defunct(DefunctReason::Administrative);
                reg.release_flows(channel);
                reg.unwatch_channel(channel);
                Reply::Done
            }
            Some(_) => {
                self.errors.count(ControlCount::NotPermitted);
                refuse(
                    ErrorCode::NotPermitted,
                    format!("channel {channel} is not yours; only root may revoke it"),
                )
            }
            None => refuse(ErrorCode::NoSuchChannel, format!("no channel {channel}")),
        }
    }
}
