//! Errors of the shared-memory layer.
//!
//! Two kinds: [`Error`], for set-up and for conditions that end a channel (a bad schema, a
//! corrupted ring index, a defunct channel, a vanished peer); and [`Violation`], a per-descriptor
//! problem that drops one descriptor, is counted under its reason and leaves the channel working.

use crate::ring::RingKind;

/// A set-up failure or a condition that ends the channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Sys {
        /// The call that failed.
        op: &'static str,
        /// The errno it returned.
        source: rustix::io::Errno,
    },
    /// A size computation overflowed or a range fell outside its region.
    #[error("{what} of {len} bytes is out of range; use a smaller geometry")]
    TooLarge {
        /// What was being sized.
        what: &'static str,
        /// The requested length.
        len: usize,
    },
    /// The peer sent a memfd it could still shrink or grow.
    #[error("the peer sent a memfd without F_SEAL_SHRINK|F_SEAL_GROW; refusing to map it")]
    Unsealed,
    /// A received memfd does not have the size the schema announces.
    #[error("region is {actual} bytes but the schema says {expected}")]
    RegionSize {
        /// Size the schema implies.
        expected: u64,
        /// Size of the memfd.
        actual: u64,
    },
    /// The schema does not start with the netchannel magic.
    #[error("not a netchannel schema (magic {found:#018x})")]
    BadMagic {
        /// The magic found.
        found: u64,
    },
    /// The schema's layout version is not the one this library speaks.
    #[error(
        "channel layout version {found} is not supported by this library, which speaks version \
         {expected}; run the same netchannel version on both sides"
    )]
    Version {
        /// Version in the schema.
        found: u32,
        /// Version this library implements.
        expected: u32,
    },
    /// The geometry in the schema or in a request is unusable.
    #[error("invalid channel geometry: {0}")]
    Geometry(&'static str),
    /// The channel was revoked by its server.
    #[error("channel is defunct: {reason}")]
    Defunct {
        /// Why the server revoked it.
        reason: DefunctReason,
    },
    /// The peer process went away (its socket hung up).
    #[error("the peer closed the channel (process exited or socket closed)")]
    PeerGone,
    /// A ring index written by the peer is impossible; the ring can no longer be trusted.
    #[error(
        "{ring:?} ring: peer wrote index {claimed}, which is outside the ring (last valid {valid}, {size} slots)"
    )]
    RingIndexOob {
        /// Which ring.
        ring: RingKind,
        /// The index the peer published.
        claimed: u32,
        /// The last index known good on this side.
        valid: u32,
        /// The ring's number of slots.
        size: u32,
    },
    /// The hand-shake over the Unix socket went wrong.
    #[error("channel hand-shake failed: {0}")]
    Handshake(&'static str),
    /// A wait ran out of time.
    #[error("timed out")]
    TimedOut,
    /// Nothing listens on the nexus's control socket.
    #[error(
        "no nexus is listening on {path} ({source}); start one with `netchannel nexus` (as root)"
    )]
    NoNexus {
        /// The socket path tried.
        path: String,
        /// What connect(2) said.
        source: rustix::io::Errno,
    },
    /// The nexus refused a request.
    #[error("the nexus refused the request ({code:?}): {message}")]
    Refused {
        /// Stable reason.
        code: crate::control::ErrorCode,
        /// What to do about it.
        message: String,
    },
    /// The nexus answered something this library did not expect.
    #[error("unexpected answer from the nexus: {0}")]
    Protocol(String),
}

impl Error {
    pub(crate) fn sys(op: &'static str, source: rustix::io::Errno) -> Self {
        Self::Sys { op, source }
    }
}

/// Why a channel was made defunct (stored as a code in the schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DefunctReason {
    /// Revoked by an administrator.
    Administrative,
    /// The server is shutting down.
    ServerShutdown,
    /// The peer broke the ring protocol too often.
    Quarantined,
    /// A reason code this library does not know.
    Other(u32),
}

impl DefunctReason {
    /// The code stored in the schema.
    pub fn code(self) -> u32 {
        match self {
            Self::Administrative => 1,
            Self::ServerShutdown => 2,
            Self::Quarantined => 3,
            Self::Other(c) => c,
        }
    }

    /// The reason for a code read from the schema.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::Administrative,
            2 => Self::ServerShutdown,
            3 => Self::Quarantined,
            c => Self::Other(c),
        }
    }
}

impl std::fmt::Display for DefunctReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Administrative => f.write_str("revoked by an administrator"),
            Self::ServerShutdown => f.write_str("server shutting down"),
            Self::Quarantined => f.write_str("quarantined after protocol violations"),
            Self::Other(c) => write!(f, "reason code {c}"),
        }
    }
}

/// A problem with one descriptor the peer wrote. The descriptor is dropped and counted; the
/// channel keeps working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The buffer index is outside the pool.
    #[error("buffer index {buf} is outside the pool")]
    BadIndex {
        /// The index.
        buf: u32,
    },
    /// Offset plus length runs past the end of the buffer (or overflows).
    #[error("offset {offset} + length {len} runs past the {buf_size}-byte buffer")]
    BadDesc {
        /// Offset written by the peer.
        offset: u32,
        /// Length written by the peer.
        len: u32,
        /// Buffer size of the pool.
        buf_size: u32,
    },
    /// The peer does not own the buffer it handed over (forged, or submitted twice).
    #[error("buffer {buf} does not belong to the peer (forged or submitted twice)")]
    NotOwner {
        /// The index.
        buf: u32,
    },
    /// Reserved flag bits are set.
    #[error("reserved descriptor flags {flags:#x} are set")]
    BadFlags {
        /// The flags word.
        flags: u32,
    },
}

impl Violation {
    /// Number of distinct reasons (the width of a counter row).
    pub const COUNT: usize = 4;

    /// Dense index of the reason, for counter arrays.
    pub fn index(self) -> usize {
        match self {
            Self::BadIndex { .. } => 0,
            Self::BadDesc { .. } => 1,
            Self::NotOwner { .. } => 2,
            Self::BadFlags { .. } => 3,
        }
    }

    /// Counter-name suffix of a reason index (`bad_index`, `bad_desc`, `not_owner`, `bad_flags`).
    pub fn name_of(index: usize) -> &'static str {
        ["bad_index", "bad_desc", "not_owner", "bad_flags"]
            .get(index)
            .copied()
            .unwrap_or("unknown")
    }
}
