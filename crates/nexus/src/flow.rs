//! The flow vocabulary every part of the nexus speaks: protocols, 5-tuples, flow specs and
//! ids. A bottom module: it imports nothing of the nexus, so the flowswitch, the port
//! reservations and the control path can all use it without importing each other.

use std::net::SocketAddr;

use netchannel_shm::control::ChannelId;

/// The transport protocols the flowswitch switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Proto {
    /// TCP (IP protocol 6).
    Tcp = 6,
    /// UDP (IP protocol 17).
    Udp = 17,
}

/// Index of a flow in the table.
pub type FlowId = u32;

/// A connected flow, from the nexus host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// UDP or TCP.
    pub proto: Proto,
    /// The host's address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub remote: SocketAddr,
}

/// What a flow matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSpec {
    /// One exact 5-tuple.
    Exact(FlowKey),
    /// Every packet to (proto, local), the address possibly unspecified (any local address of
    /// that family).
    Listener(Proto, SocketAddr),
}

/// A flow and its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// What it matches.
    pub spec: FlowSpec,
    /// The channel that owns it.
    pub channel: ChannelId,
}
