//! # netchannel-nexus: the daemon as a library
//!
//! The nexus plays the kernel's part: it creates every channel, owns every pool and the ledger
//! of every buffer, validates everything an app writes, and can take it all back.
//!
//! * [`control`]: the control socket, the policy, per-user limits;
//! * [`channel`]: each channel as the nexus serves it (its datapath, defunct, reclamation);
//! * [`daemon`]: the event loop that ties them together, and [`pacer`], which decides when it
//!   polls and when it sleeps;
//! * [`registry`]: what the nexus serves (channels, flows, port reservations, the datapath),
//!   which the event loop and the control path both act on;
//! * [`flowswitch`]: the sans-IO core: parsing, the flow table, RX demux, TX validation
//!   (anti-spoofing), next hops, TCP offloads for apps' stacks (receive coalescing,
//!   segmentation, checksums folded into the copies), just enough TCP state to reset a dead
//!   app's connections, and the drop taxonomy;
//! * [`datapath`]: the driver that runs the flowswitch on an interface: it owns the backend,
//!   netlink and the clock, and carries out the core's decisions;
//! * [`netif`]: interface backends (AF_XDP with its XDP program, TAP, an in-memory pair) and a
//!   fault-injecting layer for tests;
//! * [`netns`]: one port space with the host (port reservations), netlink, offloads;
//! * [`config`]: the TOML configuration (every setting has a default);
//! * [`flow`]: the flow vocabulary (protocols, 5-tuples, flow specs), shared by all of them.
//!
//! Without an interface, each channel's datapath is a reflector (a loopback nexus).

// Unsafe code is denied here except in the modules that talk to the kernel without a safe
// wrapper: the TAP ioctl (`netif::tap`), AF_XDP's shared rings (`netif::afxdp::ring`), bpf(2)
// (`netif::xdp::bpf`), AF_PACKET's socket address and options (`netif::packet`) and the
// ethtool ioctl (`netns::offload`).
#![deny(unsafe_code)]

pub mod channel;
pub mod config;
pub mod control;
pub mod cred;
pub mod daemon;
pub mod datapath;
pub mod flow;
pub mod flowswitch;
pub mod netif;
pub mod netns;
pub mod pacer;
pub mod registry;

pub use config::Config;
pub use daemon::{Nexus, NexusError};
pub use netchannel_shm as shm;
