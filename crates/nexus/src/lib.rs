//! # netchannel-nexus: the daemon as a library
//!
//! The nexus owns the interface, the packet pools and the ledger of every channel, classifies
//! traffic into flows (the flowswitch) and validates everything apps send. It is built on the
//! channel core in [`netchannel_shm`]: each channel it serves is an
//! [`Endpoint`](netchannel_shm::Endpoint) in the server role.
//!
//! The daemon itself (control socket, channel server, flowswitch, interface backends) is the
//! subject of the next milestones; see `DESIGN.md` §5 for where each part will live.

#![forbid(unsafe_code)]

pub use netchannel_shm as shm;
