//! How the flowswitch reaches a channel: a small trait, so that the core delivers into the
//! nexus's channels in service and into plain memory in its tests.

use std::collections::BTreeMap;

use netchannel_shm::control::{ChannelId, Offloads};

use super::drop::{DropCounters, DropReason};

/// A channel as the flowswitch delivers into it.
pub trait Port {
    /// The channel's id.
    fn id(&self) -> ChannelId;
    /// Whether the channel is still served (not defunct).
    fn is_active(&self) -> bool;
    /// The offloads granted at open.
    fn offloads(&self) -> Offloads;
    /// The size of the channel's buffers.
    fn buf_size(&self) -> usize;
    /// Stages one incoming IP packet of `len` bytes: `fill` writes it into a fresh buffer
    /// (exactly `len` bytes), and nothing is staged if it returns false. False also when no
    /// buffer could take it, which the port counts itself (`rx_no_buf`, `rx_too_big`).
    fn stage_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool;
    /// The packet staged last in this batch: its length (which the caller may grow) and its
    /// whole buffer.
    fn last_staged(&mut self) -> Option<(&mut u32, &mut [u8])>;
    /// Counts a drop of a packet for or from this channel.
    fn count_drop(&mut self, reason: DropReason);
}

/// The channels by id.
pub trait Ports {
    /// One channel.
    type Port: Port;
    /// The channel `id`, if it exists.
    fn port(&mut self, id: ChannelId) -> Option<&mut Self::Port>;
}

impl<P: Port> Ports for BTreeMap<ChannelId, P> {
    type Port = P;
    fn port(&mut self, id: ChannelId) -> Option<&mut P> {
        self.get_mut(&id)
    }
}

/// A channel in plain memory: what the core's tests (and benchmarks) deliver into.
#[derive(Debug, Clone)]
pub struct MemPort {
    /// Its id.
    pub id: ChannelId,
    /// Its offloads.
    pub offloads: Offloads,
    /// Its buffer size.
    pub buf_size: usize,
    /// How many packets it can take before it counts `rx_no_buf`.
    pub capacity: usize,
    /// Whether it is served.
    pub active: bool,
    /// What was staged, in order: each packet's length and its whole buffer.
    pub staged: Vec<(u32, Vec<u8>)>,
    /// Its drop counters.
    pub drops: DropCounters,
}

impl MemPort {
    /// An active channel `id` of 2 KiB buffers, with room for 1,024 packets and no offloads.
    pub fn new(id: ChannelId) -> Self {
        Self {
            id,
            offloads: Offloads::default(),
            buf_size: 2048,
            capacity: 1024,
            active: true,
            staged: Vec::new(),
            drops: DropCounters::default(),
        }
    }
}

impl MemPort {
    /// The packets staged so far, each as long as it is.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.staged
            .iter()
            .map(|(l, b)| &b[..(*l as usize).min(b.len())])
    }
}

impl Port for MemPort {
    fn id(&self) -> ChannelId {
        self.id
    }
    fn is_active(&self) -> bool {
        self.active
    }
    fn offloads(&self) -> Offloads {
        self.offloads
    }
    fn buf_size(&self) -> usize {
        self.buf_size
    }
    fn stage_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        if self.staged.len() >= self.capacity {
            self.count_drop(DropReason::RxNoBuf);
            return false;
        }
        if len > self.buf_size {
            self.count_drop(DropReason::RxTooBig);
            return false;
        }
        let mut buf = vec![0; self.buf_size];
        if !fill(&mut buf[..len]) {
            return false;
        }
        self.staged.push((len as u32, buf));
        true
    }
    fn last_staged(&mut self) -> Option<(&mut u32, &mut [u8])> {
        self.staged.last_mut().map(|(l, b)| (l, &mut b[..]))
    }
    fn count_drop(&mut self, reason: DropReason) {
        self.drops.add(reason);
    }
}
