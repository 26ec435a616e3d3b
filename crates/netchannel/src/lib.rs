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
//! * [`stack`]: a user-space TCP/IP stack (smoltcp) on a channel, with `UdpSocket`,
//!   `TcpListener` and `TcpStream` that feel like std's.

#![forbid(unsafe_code)]

pub mod nexus;
pub mod pipe;
pub mod stack;

pub use netchannel_shm::{
    DefunctReason, Endpoint, Error, Geometry, Interest, Packet, SendError, Stats, Violation,
    WaitPolicy,
};
