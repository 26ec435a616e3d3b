//! # netchannel: the app library
//!
//! Applications move packets through shared-memory **channels** instead of one system call per
//! packet. This crate is what an application links:
//!
//! * [`nexus`]: channels to a nexus daemon (its control socket, opening channels);
//! * [`pipe`]: user pipes, two processes joined back to back with zero-copy buffer hand-over;
//! * the raw packet API of a channel end, [`Endpoint`]: `alloc` a buffer, write it
//!   (`buffer_mut`), `send` a batch, `recv` a batch, read it (`payload`), `free` it, and `wait`
//!   (spin, then sleep on a doorbell) when there is nothing to do.
//!
//! Channels to a nexus and the user-space protocol stack (UDP and TCP sockets) build on the same
//! endpoint; see `DESIGN.md`.

#![forbid(unsafe_code)]

pub mod nexus;
pub mod pipe;

pub use netchannel_shm::{
    DefunctReason, Endpoint, Error, Geometry, Interest, Packet, SendError, Stats, Violation,
    WaitPolicy,
};
