//! The control-socket protocol between apps and the nexus.
//!
//! Messages travel on a Unix `SOCK_SEQPACKET` socket, one message per packet: an 8-byte header
//! (`b"NCTL"`, the protocol version as a little-endian `u16`, two reserved zero bytes) followed by
//! a JSON body. Requests are at most [`MAX_REQUEST`] bytes, replies at most [`MAX_REPLY`]; a
//! message of another version is answered with an error naming both versions. Channel memory
//! travels as fds attached to the messages that need them (SCM_RIGHTS), never otherwise.
//!
//! Opening a channel takes three messages:
//! 1. app → nexus: [`Request::OpenChannel`];
//! 2. nexus → app: [`Reply::ChannelOffer`] with the server region, the pool and the nexus's
//!    doorbell attached;
//! 3. app → nexus: [`Request::ChannelReady`] with the app region and the app's doorbell attached;
//!    the nexus answers [`Reply::ChannelOpened`] and starts serving the rings.

use serde::{Deserialize, Serialize};

/// The header's magic.
pub const MAGIC: &[u8; 4] = b"NCTL";
/// The protocol version this library speaks.
pub const VERSION: u16 = 1;
/// Largest request the nexus reads.
pub const MAX_REQUEST: usize = 4096;
/// Largest reply the nexus sends.
pub const MAX_REPLY: usize = 256 * 1024;
/// Default path of the nexus's control socket.
pub const DEFAULT_SOCKET: &str = "/run/netchannel/nexus.sock";

/// A nexus-wide channel identifier.
pub type ChannelId = u64;

/// Kinds of channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// An ordinary best-effort channel.
    #[default]
    Normal,
    /// A channel in the low-latency class.
    LowLatency,
    /// A read-only tap (monitor).
    Monitor,
}

/// Packet offloads between an app's stack and the nexus: the nexus reshapes a channel's TCP
/// packets so that the app's stack handles fewer, larger ones (a per-packet cost saved in the
/// app for every segment on the wire). An app asks for them in `open_channel`; only a nexus
/// serving an interface grants them, and only on channels whose buffers are at least
/// [`Offloads::MIN_BUF_SIZE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offloads {
    /// Receive coalescing: in-order TCP segments of one connection that reach the nexus
    /// together are delivered as one packet, up to a pool buffer, with lengths, flags and
    /// checksums as if the peer had sent it so (the window is the newest segment's).
    #[serde(default)]
    pub rx_coalesce: bool,
    /// Segmentation and checksums: the app may send TCP packets up to a pool buffer, larger
    /// than the MTU; the nexus cuts each into segments the peer accepts (its SYN's MSS,
    /// bounded by the MTU) and computes every TCP checksum, so the app's stack leaves them
    /// out. To let the app's stack build such packets, the nexus raises the MSS option of a
    /// peer's SYN to what a pool buffer holds, and lowers that of the app's own SYN to what
    /// the MTU carries.
    #[serde(default)]
    pub tx_segment: bool,
}

impl Offloads {
    /// Smallest buffer size on which offloads are granted.
    pub const MIN_BUF_SIZE: u32 = 8192;

    /// Both offloads.
    pub const ALL: Self = Self {
        rx_coalesce: true,
        tx_segment: true,
    };

    /// Whether any offload is on.
    pub fn any(self) -> bool {
        self.rx_coalesce || self.tx_segment
    }
}

/// What an app asks of the nexus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Open a channel. Sizes left out take the nexus's defaults.
    OpenChannel {
        /// The kind of channel.
        #[serde(default)]
        kind: ChannelKind,
        /// Slots per data ring (TX and RX).
        ring_slots: Option<u32>,
        /// Maximum number of buffers in the pool.
        buffers: Option<u32>,
        /// Bytes per pool buffer (a power of two from 2 KiB to 64 KiB; 2 KiB if left out).
        /// Offloads coalesce and send packets up to one buffer.
        #[serde(default)]
        buf_size: Option<u32>,
        /// The offloads asked for; `channel_opened` says which were granted.
        #[serde(default)]
        offloads: Offloads,
    },
    /// The app has mapped the offer; its region is attached (one fd).
    ChannelReady {
        /// The channel offered.
        channel: ChannelId,
    },
    /// Close one of this app's channels.
    CloseChannel {
        /// The channel.
        channel: ChannelId,
    },
    /// Report the nexus's state and its channels (every one for root, the caller's own
    /// otherwise), a page at a time: the channels whose ids follow `after`, as many as fit one
    /// reply. The summary (counters of the nexus and the interface) comes with the first page.
    Status {
        /// The last channel of the previous page (none: the first page).
        #[serde(default)]
        after: Option<ChannelId>,
    },
    /// Revoke a channel (root, or the channel's owner).
    Defunct {
        /// The channel.
        channel: ChannelId,
    },
    /// Claim a flow for one of this app's channels: a listener (no remote) or a connected
    /// 5-tuple. The nexus reserves (proto, local) in the host's port space; port 0 lets the
    /// kernel choose.
    AddFlow {
        /// The channel that will own the flow.
        channel: ChannelId,
        /// UDP or TCP.
        proto: FlowProto,
        /// Local address (unspecified for every address of the host) and port.
        local: std::net::SocketAddr,
        /// The peer, for a connected flow.
        remote: Option<std::net::SocketAddr>,
    },
    /// Give a flow up.
    RemoveFlow {
        /// The flow.
        flow: u32,
    },
    /// List flows (every flow for root, one's own otherwise), a page at a time: the flows
    /// whose ids follow `after`.
    Flows {
        /// The last flow of the previous page (none: the first page).
        #[serde(default)]
        after: Option<u32>,
    },
}

/// Transport protocols of flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowProto {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// One flow as `netchannel flows` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStatus {
    /// The flow's id.
    pub id: u32,
    /// The channel that owns it.
    pub channel: ChannelId,
    /// Owner's pid.
    pub pid: i32,
    /// Owner's uid.
    pub uid: u32,
    /// UDP or TCP.
    pub proto: FlowProto,
    /// Local address and port.
    pub local: std::net::SocketAddr,
    /// Remote address and port (connected flows).
    pub remote: Option<std::net::SocketAddr>,
    /// `best_effort` (the low-latency class comes later).
    pub class: String,
    /// Packets the flowswitch delivered to the flow's channel.
    #[serde(default)]
    pub rx_packets: u64,
    /// Packets of the flow the flowswitch sent.
    #[serde(default)]
    pub tx_packets: u64,
}

/// What the nexus answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Reply {
    /// The channel's memory is attached; map it and answer [`Request::ChannelReady`].
    ChannelOffer {
        /// The new channel.
        channel: ChannelId,
    },
    /// The channel is in service.
    ChannelOpened {
        /// The channel.
        channel: ChannelId,
        /// The addresses of the interface the nexus serves (an app's stack uses these as its
        /// own); empty without an interface.
        #[serde(default)]
        addresses: Vec<std::net::IpAddr>,
        /// Largest IP packet the interface carries (0: no interface).
        #[serde(default)]
        mtu: u32,
        /// The offloads the nexus applies to this channel.
        #[serde(default)]
        offloads: Offloads,
    },
    /// The request was carried out.
    Done,
    /// The nexus's state.
    Status(Box<NexusStatus>),
    /// The flow is claimed.
    FlowAdded {
        /// Its id.
        flow: u32,
        /// The local address and port actually held (the kernel's choice for port 0).
        local: std::net::SocketAddr,
    },
    /// The flows.
    Flows {
        /// The flows of this page.
        flows: Vec<FlowStatus>,
        /// More follow: ask again with `after` set to this.
        #[serde(default)]
        next_after: Option<u32>,
    },
    /// The request was refused.
    Error {
        /// A stable code for programs.
        code: ErrorCode,
        /// What went wrong and what to do, for people.
        message: String,
    },
}

/// Stable reasons for refusing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message could not be decoded (bad header, bad JSON, too large).
    BadMessage,
    /// The message's protocol version is not the nexus's.
    Version,
    /// A request that makes no sense now (e.g. ChannelReady for no offer).
    OutOfOrder,
    /// The policy does not allow it.
    NotPermitted,
    /// A per-user limit was reached.
    Limit,
    /// No such channel (or not yours).
    NoSuchChannel,
    /// The address and port are held by the host or another app.
    InUse,
    /// The nexus could not build or attach the channel's memory.
    Resource,
    /// The nexus is shutting down.
    ShuttingDown,
}

/// Everything `netchannel status` and `netchannel channels` show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NexusStatus {
    /// The nexus's process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// Connected control clients.
    pub clients: usize,
    /// Open file descriptors of the nexus.
    pub fds: usize,
    /// Resident memory of the nexus in bytes.
    pub rss_bytes: u64,
    /// Requests refused or messages dropped on the control socket, by reason.
    pub control_errors: Vec<(String, u64)>,
    /// Interface counters (frames in and out, drops by reason), when the nexus serves one.
    #[serde(default)]
    pub interface: Vec<(String, u64)>,
    /// Channels (of this page).
    pub channels: Vec<ChannelStatus>,
    /// More channels follow: ask again with `after` set to this.
    #[serde(default)]
    pub next_after: Option<ChannelId>,
}

/// One channel as the nexus sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ChannelStatus {
    /// The channel.
    pub id: ChannelId,
    /// Owner's pid and uid (from SO_PEERCRED).
    pub pid: i32,
    /// Owner's uid.
    pub uid: u32,
    /// `active` or `defunct: <reason>`.
    pub state: String,
    /// Packets on TX (app→nexus) and RX (nexus→app) rings right now.
    pub tx_ring: u32,
    /// RX ring occupancy.
    pub rx_ring: u32,
    /// Buffers: free in the nexus, held by the nexus, with the app (held or in a ring), and
    /// out of service.
    pub buffers_free: u32,
    /// Held by the nexus.
    pub buffers_nexus: u32,
    /// With the app or in its rings.
    pub buffers_app: u32,
    /// In segments given back to the OS.
    pub buffers_absent: u32,
    /// Bytes of pool in segments that are in service (the rest is given back to the OS).
    pub pool_bytes_in_service: u64,
    /// Packets the app sent, and packets delivered to it.
    pub tx_packets: u64,
    /// Delivered.
    pub rx_packets: u64,
    /// Drop and violation counters by reason (`tx_not_owner`, `rx_ring_full`, ...).
    pub drops: Vec<(String, u64)>,
    /// Result of the last ledger audit: `ok` or what failed.
    pub audit: String,
    /// No traffic lately: the nexus no longer looks at its rings on every pass, and its app's
    /// next packet rings the doorbell (which costs that packet a system call).
    #[serde(default)]
    pub parked: bool,
}

/// Why a control message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header, or longer than allowed.
    #[error("control message of {0} bytes is outside the allowed size")]
    Size(usize),
    /// The header does not start with the magic.
    #[error("not a netchannel control message")]
    Magic,
    /// The version is not ours.
    #[error(
        "control protocol version {found} is not supported; this side speaks version {expected}"
    )]
    Version {
        /// Version in the message.
        found: u16,
        /// Version we speak.
        expected: u16,
    },
    /// The reserved header bytes are not zero.
    #[error("reserved bytes of the control header must be zero")]
    Reserved,
    /// The body is not a valid message.
    #[error("malformed control message: {0}")]
    Body(String),
}

/// Encodes a message (header + JSON).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    // Serializing these plain enums cannot fail; an empty body would be refused by the peer.
    let _ = serde_json::to_writer(&mut out, msg);
    out
}

/// Decodes a message of at most `max` bytes.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    if bytes.len() < 8 || bytes.len() > max {
        return Err(DecodeError::Size(bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(DecodeError::Version {
            found: version,
            expected: VERSION,
        });
    }
    if bytes[6..8] != [0, 0] {
        return Err(DecodeError::Reserved);
    }
    serde_json::from_slice(&bytes[8..]).map_err(|e| DecodeError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_request_without_a_page_is_the_first_page() {
        let mut old = MAGIC.to_vec();
        old.extend_from_slice(&VERSION.to_le_bytes());
        old.extend_from_slice(&[0, 0]);
        old.extend_from_slice(br#"{"op":"status"}"#);
        assert_eq!(
            decode::<Request>(&old, MAX_REQUEST).unwrap(),
            Request::Status { after: None }
        );
    }

    #[test]
    fn round_trip() {
        let r = Request::OpenChannel {
            kind: ChannelKind::Normal,
            ring_slots: Some(256),
            buffers: None,
            buf_size: Some(16384),
            offloads: Offloads::ALL,
        };
        assert_eq!(decode::<Request>(&encode(&r), MAX_REQUEST).unwrap(), r);
        let s = Reply::Status(Box::new(NexusStatus {
            pid: 7,
            ..NexusStatus::default()
        }));
        assert_eq!(decode::<Reply>(&encode(&s), MAX_REPLY).unwrap(), s);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert_eq!(
            decode::<Request>(b"NCTL", MAX_REQUEST),
            Err(DecodeError::Size(4))
        );
        assert_eq!(
            decode::<Request>(&[0u8; 5000], MAX_REQUEST),
            Err(DecodeError::Size(5000))
        );
        assert_eq!(
            decode::<Request>(b"XXXX\x01\x00\x00\x00{}", MAX_REQUEST),
            Err(DecodeError::Magic)
        );
        assert!(matches!(
            decode::<Request>(b"NCTL\x09\x00\x00\x00{}", MAX_REQUEST),
            Err(DecodeError::Version {
                found: 9,
                expected: VERSION
            })
        ));
        assert!(matches!(
            decode::<Request>(b"NCTL\x01\x00\x00\x00{\"op\":\"nope\"}", MAX_REQUEST),
            Err(DecodeError::Body(_))
        ));
        assert!(matches!(
            decode::<Request>(b"NCTL\x01\x00\x00\x00\xff\xfe", MAX_REQUEST),
            Err(DecodeError::Body(_))
        ));
        assert_eq!(
            decode::<Request>(b"NCTL\x01\x00\xff\x01{\"op\":\"status\"}", MAX_REQUEST),
            Err(DecodeError::Reserved)
        );
    }
}
