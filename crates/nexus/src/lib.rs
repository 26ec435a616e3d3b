//! # netchannel-nexus: the daemon as a library
//!
//! The nexus plays the kernel's part: it creates every channel, owns every pool and the ledger
//! of every buffer, validates everything an app writes, and can take it all back.
//!
//! * [`control`]: the control socket, the policy, per-user limits;
//! * [`channel`]: each channel as the nexus serves it (its datapath, defunct, reclamation);
//! * [`daemon`]: the event loop that ties them together, and [`pacer`], which decides when it
//!   polls and when it sleeps;
//! * [`flowswitch`]: parsing, the flow table and anti-spoofing validation (not yet wired to an
//!   interface);
//! * [`netif`]: interface backends (TAP, and an in-memory pair for tests);
//! * [`netns`]: one port space with the host (port reservations);
//! * [`config`]: the TOML configuration (every setting has a default).
//!
//! The flowswitch, the interface backends and the host-stack port space come next (see
//! `DESIGN.md` §5); until then each channel's datapath is a reflector.

#![deny(unsafe_code)] // the one exception: the TAP ioctl in `netif::tap`

pub mod channel;
pub mod config;
pub mod control;
pub mod daemon;
pub mod flowswitch;
pub mod netif;
pub mod netns;
pub mod pacer;

pub use config::Config;
pub use daemon::{Nexus, NexusError};
pub use netchannel_shm as shm;
