//! # netchannel-shm: the shared-memory ABI of netchannel
//!
//! A **channel** joins two ends, the *app* and the *server* (the nexus, or the serving end of a
//! user pipe), through memory both map:
//!
//! * [`region`]: memfd regions; the ones only their owner writes are sealed `F_SEAL_FUTURE_WRITE`
//!   so the other process can map them read-only and nothing else.
//! * [`layout`]: the [`layout::Geometry`], the schema (magic, version, state, epoch, cookie) and
//!   the offset of every ring half.
//! * [`ring`]: single-producer/single-consumer rings of slot descriptors, with need-wakeup flags.
//! * [`pool`]: fixed-size packet buffers in page-multiple segments that can be given back to the OS.
//! * [`ledger`]: each end's private record of who holds every buffer.
//! * [`doorbell`]: wake-ups over socket pairs that cannot block; [`fdpass`]: SCM_RIGHTS; [`control`]: the control-socket
//!   protocol between apps and the nexus.
//! * [`endpoint`]: one end of a channel, tying the above together behind a batch packet API.
//!
//! Everything the other end writes is untrusted: indices and descriptors are read once into
//! locals and validated, and a failure is a typed [`Error`] or a counted [`Violation`], never a
//! panic or an out-of-bounds access. The `unsafe` of the project lives in `region`, `ring`,
//! `pool`, `layout` and `endpoint` (pointer binding), each block with its justification.

pub mod control;
pub mod doorbell;
pub mod endpoint;
mod error;
pub mod fdpass;
pub mod hint;
pub mod layout;
pub mod ledger;
pub mod pool;
pub mod region;
pub mod ring;
mod sync;

pub use doorbell::{Drained, Rung};
pub use endpoint::{
    Endpoint, Home, Interest, Packet, SendError, ServerSetup, Stats, Supplied, WaitPolicy,
};
pub use error::{DefunctReason, Error, Violation};
pub use layout::Geometry;
pub use ring::{Desc, RingKind};

/// The two ends of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Produces TX and FREE; consumes RX, ALLOC and EVENT.
    App,
    /// Produces RX, ALLOC and EVENT; consumes TX and FREE. Writes the schema.
    Server,
}
