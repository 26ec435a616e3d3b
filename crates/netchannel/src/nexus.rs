//! Channels to a nexus: connect to its control socket, open channels, and use their rings.
//!
//! ```no_run
//! use netchannel::nexus::{ChannelOptions, Nexus};
//! use netchannel::{Interest, Packet};
//!
//! # fn main() -> Result<(), netchannel::Error> {
//! let mut nexus = Nexus::connect(netchannel::nexus::DEFAULT_SOCKET)?;
//! let mut ch = nexus.open_channel(ChannelOptions::default())?;
//! // Buffers come from the nexus on the ALLOC ring.
//! ch.wait(Interest::Buffers, None)?;
//! let buf = ch.alloc().expect("the nexus stocked the ALLOC ring");
//! ch.buffer_mut(buf).expect("we hold it")[..4].copy_from_slice(b"ping");
//! ch.send(&[Packet { buf, offset: 0, len: 4 }]).expect("room on a fresh ring");
//! // A nexus without an interface (a loopback nexus) reflects each packet back; with one, the
//! // flowswitch sends it to the peer its flow names.
//! let mut got = Vec::new();
//! while ch.recv(&mut got, 32)? == 0 {
//!     ch.wait(Interest::Readable, None)?;
//! }
//! assert_eq!(ch.payload(&got[0]), b"ping");
//! ch.free(got.iter().map(|p| p.buf)).expect("we hold them");
//! # Ok(()) }
//! ```
//!
//! Every blocking call has a bound: control requests time out after a few seconds, and a channel
//! wait returns [`Error::Defunct`] when the nexus revokes the channel and [`Error::PeerGone`]
//! when the nexus exits, so an app never hangs on a nexus that is gone. To drive a channel from
//! epoll or tokio, register [`Channel::wakeup_fd`] for readability and, before each sleep,
//! clear the doorbell ([`Endpoint::clear_bell`]) and then arm the rings with [`Endpoint::arm`] (cleared
//! before arming, a ring for what arrives after the check stays and ends the sleep).

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use netchannel_shm::control::{
    self, ChannelId, ChannelKind, FlowStatus, MAX_REPLY, NexusStatus, Reply, Request,
};
use netchannel_shm::endpoint::Home;
use netchannel_shm::fdpass::{recv_with_fds, send_with_fds};
use netchannel_shm::{Endpoint, Error};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

pub use netchannel_shm::control::{DEFAULT_SOCKET, FlowProto, Offloads};

/// How long a control request may take before the nexus is considered unresponsive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Most pages one status or flow listing may take (a million flows is 4,000 pages).
const MAX_PAGES: usize = 1 << 16;

/// What to ask for when opening a channel (unset fields take the nexus's defaults).
#[derive(Debug, Clone, Default)]
pub struct ChannelOptions {
    /// The kind of channel.
    pub kind: ChannelKind,
    /// Slots of each data ring (a power of two).
    pub ring_slots: Option<u32>,
    /// Buffers in the channel's pool.
    pub buffers: Option<u32>,
    /// Bytes per pool buffer (a power of two from 2 KiB to 64 KiB; 2 KiB if `None`).
    pub buf_size: Option<u32>,
    /// Offloads to ask for (granted only by a nexus on an interface, with buffers of at
    /// least [`Offloads::MIN_BUF_SIZE`]); [`Channel::offloads`] says what was granted.
    pub offloads: Offloads,
}

/// A connection to a nexus's control socket.
#[derive(Debug)]
pub struct Nexus {
    sock: OwnedFd,
    path: String,
}

impl Nexus {
    /// Connects to the nexus listening at `path` (usually [`DEFAULT_SOCKET`]).
    pub fn connect(path: &str) -> Result<Self, Error> {
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|source| Error::Sys {
            op: "socket",
            source,
        })?;
        let addr = SocketAddrUnix::new(path).map_err(|source| Error::NoNexus {
            path: path.into(),
            source,
        })?;
        rustix::net::connect(&sock, &addr).map_err(|source| Error::NoNexus {
            path: path.into(),
            source,
        })?;
        use rustix::net::sockopt::{Timeout, set_socket_timeout};
        for t in [Timeout::Recv, Timeout::Send] {
            set_socket_timeout(&sock, t, Some(REQUEST_TIMEOUT)).map_err(|source| Error::Sys {
                op: "SO_RCVTIMEO",
                source,
            })?;
        }
        Ok(Self {
            sock,
            path: path.into(),
        })
    }

    /// The socket path this connection uses.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn request(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Reply, Vec<OwnedFd>), Error> {
        let mut buf = vec![0u8; MAX_REPLY];
        if let Err(e) = send_with_fds(self.sock.as_fd(), &control::encode(req), fds) {
            return Err(self.turned_away(&mut buf).unwrap_or_else(|| gone(e)));
        }
        let r = match recv_with_fds(self.sock.as_fd(), &mut buf, false) {
            Ok(r) => r,
            Err(e) => return Err(self.turned_away(&mut buf).unwrap_or_else(|| gone(e))),
        };
        if r.truncated {
            return Err(Error::Protocol(
                "reply larger than the protocol allows".into(),
            ));
        }
        let reply: Reply = control::decode(&buf[..r.len], MAX_REPLY)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        if let Reply::Error { code, message } = reply {
            return Err(Error::Refused { code, message });
        }
        Ok((reply, r.fds))
    }

    /// Why the nexus turned this connection away, if it did: it says why (a limit) and closes
    /// the connection at once, so the request may fail to go out, or its reply fail with
    /// ECONNRESET (the request was left unread), while the reason still waits to be read.
    fn turned_away(&self, buf: &mut [u8]) -> Option<Error> {
        for _ in 0..2 {
            match recv_with_fds(self.sock.as_fd(), buf, true) {
                Ok(r) => {
                    return match control::decode::<Reply>(&buf[..r.len], MAX_REPLY) {
                        Ok(Reply::Error { code, message }) => {
                            Some(Error::Refused { code, message })
                        }
                        _ => None,
                    };
                }
                // A pending ECONNRESET is reported (and cleared) before the queued message.
                Err(Error::Sys {
                    source: rustix::io::Errno::CONNRESET,
                    ..
                }) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Opens a channel: the nexus builds its memory, this process maps it and adds its own
    /// region, and the nexus starts serving it.
    pub fn open_channel(&mut self, opts: ChannelOptions) -> Result<Channel, Error> {
        let req = Request::OpenChannel {
            kind: opts.kind,
            ring_slots: opts.ring_slots,
            buffers: opts.buffers,
            buf_size: opts.buf_size,
            offloads: opts.offloads,
        };
        let (reply, fds) = self.request(&req, &[])?;
        let Reply::ChannelOffer { channel } = reply else {
            return Err(Error::Protocol(format!(
                "expected a channel offer, got {reply:?}"
            )));
        };
        let [region, pool, bell]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|_| Error::Protocol("a channel offer carries exactly three fds".into()))?;
        let mut ep = Endpoint::attach_app(region, pool, bell, Home::Nothing)?;
        let (reply, _) = self.request(&Request::ChannelReady { channel }, &[ep.region_fd()?])?;
        let Reply::ChannelOpened {
            channel: opened,
            addresses,
            mtu,
            offloads,
        } = reply
        else {
            return Err(Error::Protocol(format!(
                "expected channel_opened, got {reply:?}"
            )));
        };
        if opened != channel {
            return Err(Error::Protocol(format!(
                "opened channel {opened}, expected {channel}"
            )));
        }
        let watch = self.sock.try_clone().map_err(|e| Error::Sys {
            op: "dup",
            source: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::BADF),
        })?;
        ep.watch(watch);
        Ok(Channel {
            id: channel,
            ep,
            addresses,
            mtu,
            offloads,
        })
    }

    /// The nexus's state (every channel for root, one's own otherwise).
    pub fn status(&mut self) -> Result<NexusStatus, Error> {
        // Page by page (a nexus with thousands of channels answers in several replies).
        let mut status = self.status_page(None)?;
        let mut pages = 1usize;
        while let Some(after) = status.next_after.take() {
            let page = self.status_page(Some(after))?;
            if page.channels.first().is_none_or(|c| c.id <= after) || pages > MAX_PAGES {
                return Err(Error::Protocol("the status pages do not advance".into()));
            }
            status.channels.extend(page.channels);
            status.next_after = page.next_after;
            pages += 1;
        }
        Ok(status)
    }

    /// One page of the status: the summary and the first channels (`after` = `None`), or the
    /// channels whose ids follow `after`.
    pub fn status_page(&mut self, after: Option<ChannelId>) -> Result<NexusStatus, Error> {
        match self.request(&Request::Status { after }, &[])?.0 {
            Reply::Status(s) => Ok(*s),
            other => Err(Error::Protocol(format!("expected a status, got {other:?}"))),
        }
    }

    /// Revokes a channel (root, or its owner).
    pub fn defunct(&mut self, channel: ChannelId) -> Result<(), Error> {
        match self.request(&Request::Defunct { channel }, &[])?.0 {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected done, got {other:?}"))),
        }
    }

    /// Claims a flow for `channel`: a listener when `remote` is `None`, else a connected
    /// 5-tuple. The nexus also reserves (proto, local) in the host's port space, so a port the
    /// host uses is refused ([`Error::Refused`] with code `InUse`, naming the holder) and no
    /// host process can take it while the flow lives; port 0 lets the kernel choose. Returns
    /// the flow's id and the local address actually held.
    pub fn add_flow(
        &mut self,
        channel: &Channel,
        proto: FlowProto,
        local: SocketAddr,
        remote: Option<SocketAddr>,
    ) -> Result<(u32, SocketAddr), Error> {
        let req = Request::AddFlow {
            channel: channel.id,
            proto,
            local,
            remote,
        };
        match self.request(&req, &[])?.0 {
            Reply::FlowAdded { flow, local } => Ok((flow, local)),
            other => Err(Error::Protocol(format!(
                "expected flow_added, got {other:?}"
            ))),
        }
    }

    /// Gives a flow up (and its host-port reservation).
    pub fn remove_flow(&mut self, flow: u32) -> Result<(), Error> {
        match self.request(&Request::RemoveFlow { flow }, &[])?.0 {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected done, got {other:?}"))),
        }
    }

    /// The flows (every flow for root, one's own otherwise).
    pub fn flows(&mut self) -> Result<Vec<FlowStatus>, Error> {
        let (mut all, mut after, mut pages) = (Vec::new(), None, 0usize);
        loop {
            match self.request(&Request::Flows { after }, &[])?.0 {
                Reply::Flows { flows, next_after } => {
                    all.extend(flows);
                    pages += 1;
                    match next_after {
                        Some(n) if after.is_none_or(|a| n > a) && pages <= MAX_PAGES => {
                            after = Some(n)
                        }
                        Some(_) => {
                            return Err(Error::Protocol("the flow pages do not advance".into()));
                        }
                        None => return Ok(all),
                    }
                }
                other => return Err(Error::Protocol(format!("expected flows, got {other:?}"))),
            }
        }
    }

    /// Closes one of this connection's channels; the nexus takes back its buffers.
    pub fn close_channel(&mut self, channel: Channel) -> Result<(), Error> {
        // Asked before the channel's doorbell closes: a nexus that sees the doorbell hang up
        // first closes the channel itself, and would then not know it.
        let reply = self.request(
            &Request::CloseChannel {
                channel: channel.id,
            },
            &[],
        );
        drop(channel);
        match reply?.0 {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected done, got {other:?}"))),
        }
    }
}

/// A failure to talk to the nexus means it is gone (or not answering).
fn gone(e: Error) -> Error {
    match e {
        Error::Sys {
            source: rustix::io::Errno::AGAIN,
            ..
        } => Error::TimedOut,
        Error::Sys {
            source: rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET,
            ..
        } => Error::PeerGone,
        e => e,
    }
}

/// An open channel to the nexus. Dereferences to the channel [`Endpoint`] for the raw packet
/// API: `alloc`, `buffer_mut`, `send`, `recv`, `payload`, `free`, `wait`.
#[derive(Debug)]
pub struct Channel {
    id: ChannelId,
    ep: Endpoint,
    addresses: Vec<std::net::IpAddr>,
    mtu: u32,
    offloads: Offloads,
}

impl Channel {
    /// The offloads the nexus applies to this channel's packets.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// The addresses of the interface the nexus serves this channel on (empty if it serves
    /// none): what an app's protocol stack uses as its own.
    pub fn addresses(&self) -> &[std::net::IpAddr] {
        &self.addresses
    }

    /// Largest IP packet the interface carries (0 if the nexus serves no interface).
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The nexus's id of this channel (as `netchannel channels` shows it).
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// An fd that becomes readable when the nexus rings this channel (for epoll or tokio).
    pub fn wakeup_fd(&self) -> BorrowedFd<'_> {
        self.ep.bell_fd()
    }
}

impl Deref for Channel {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.ep
    }
}

impl DerefMut for Channel {
    fn deref_mut(&mut self) -> &mut Endpoint {
        &mut self.ep
    }
}
