//! The flow table: exact 5-tuples first, then listeners (protocol, local address or wildcard,
//! local port). Keys hash with a per-process random seed, so a peer cannot pick 5-tuples that
//! collide on purpose.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netchannel_shm::control::ChannelId;

pub use crate::flow::{Flow, FlowId, FlowKey, FlowSpec, Proto};

use super::index::ExactIndex;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Why a flow cannot be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Another flow already claims that address and port.
    #[error("{proto:?} {local} is already claimed by channel {holder}")]
    InUse {
        /// Protocol.
        proto: Proto,
        /// The address asked for.
        local: SocketAddr,
        /// The channel that holds it.
        holder: ChannelId,
    },
    /// The table is full.
    #[error("the flow table is full ({0} flows)")]
    Full(usize),
}

/// A 5-tuple packed into 40 bytes (IPv4 as IPv4-mapped IPv6), hashed in one call: half the
/// size of `FlowKey`, so a million flows touch fewer cache lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Packed([u8; 40]);

impl Packed {
    #[inline]
    fn new(k: &FlowKey) -> Self {
        let mut b = [0u8; 40];
        let v6 = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        b[..16].copy_from_slice(&v6(k.local.ip()));
        b[16..32].copy_from_slice(&v6(k.remote.ip()));
        b[32..34].copy_from_slice(&k.local.port().to_be_bytes());
        b[34..36].copy_from_slice(&k.remote.port().to_be_bytes());
        b[36] = k.proto as u8;
        b[37] = u8::from(k.local.is_ipv4());
        Self(b)
    }
}

/// Buffers reused by [`FlowTable::lookup_batch`].
#[derive(Debug, Default)]
pub struct BatchScratch {
    packed: Vec<[u8; 40]>,
    found: Vec<Option<(u32, u64)>>,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The flow.
    pub id: FlowId,
    /// Its channel.
    pub channel: ChannelId,
    /// Whether it is a listener (rather than an exact 5-tuple).
    pub listener: bool,
}

fn wildcard(a: &SocketAddr) -> SocketAddr {
    let ip = match a.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, a.port())
}

/// Who uses a local (protocol, address, port): one entry per (address, channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortUse {
    addr: IpAddr,
    channel: ChannelId,
    listeners: u32,
    exacts: u32,
}

/// The flow table of one flowswitch.
#[derive(Debug)]
pub struct FlowTable {
    flows: Vec<Option<Flow>>,
    /// Packets received and sent per flow, by [`FlowId`].
    counters: Vec<[u64; 2]>,
    free_ids: Vec<FlowId>,
    /// Exact flows, with their channel beside the key so that a hit touches no other memory.
    exact: ExactIndex,
    listeners: Map<(Proto, SocketAddr), FlowId>,
    /// Users of each (protocol, local port), for conflict checks and spoofing diagnosis. A
    /// port has few users (one per address and channel), however many flows share it.
    ports: Map<(Proto, u16), Vec<PortUse>>,
    /// The flows of each channel, so that counting and removing them costs the channel's
    /// flows, not the whole table.
    by_channel: Map<ChannelId, std::collections::HashSet<FlowId, foldhash::fast::RandomState>>,
    capacity: usize,
}

fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a == b || a.is_unspecified() || b.is_unspecified())
}

impl FlowTable {
    /// An empty table that holds at most `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        Self {
            flows: Vec::new(),
            counters: Vec::new(),
            free_ids: Vec::new(),
            exact: ExactIndex::new(),
            listeners: Map::default(),
            ports: Map::default(),
            by_channel: Map::default(),
            capacity,
        }
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.exact.len() + self.listeners.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flow with id `id`.
    pub fn get(&self, id: FlowId) -> Option<&Flow> {
        self.flows.get(id as usize).and_then(Option::as_ref)
    }

    /// Whether `channel` has any flow on local (proto, port).
    pub fn channel_uses_port(&self, channel: ChannelId, proto: Proto, port: u16) -> bool {
        self.ports
            .get(&(proto, port))
            .is_some_and(|v| v.iter().any(|u| u.channel == channel))
    }

    fn local_of(spec: &FlowSpec) -> (Proto, SocketAddr) {
        match *spec {
            FlowSpec::Exact(k) => (k.proto, k.local),
            FlowSpec::Listener(p, a) => (p, a),
        }
    }

    /// Whether `channel` may add `spec`. A listener conflicts with any listener, and with another
    /// channel's exact flows, on the same protocol and port whose address is equal or where
    /// either address is the wildcard (same family); an exact flow conflicts with the same
    /// 5-tuple and with another channel's flows on its local address.
    pub fn check(&self, channel: ChannelId, spec: FlowSpec) -> Result<(), TableError> {
        let (proto, local) = Self::local_of(&spec);
        if let FlowSpec::Exact(k) = spec
            && let Some((_, holder)) = self.exact.get(&Packed::new(&k).0)
        {
            return Err(TableError::InUse {
                proto,
                local,
                holder,
            });
        }
        let listener = matches!(spec, FlowSpec::Listener(..));
        for u in self.ports.get(&(proto, local.port())).into_iter().flatten() {
            if !overlaps(local.ip(), u.addr) {
                continue;
            }
            let clash = if listener {
                u.listeners > 0 || (u.exacts > 0 && u.channel != channel)
            } else {
                u.channel != channel
            };
            if clash {
                return Err(TableError::InUse {
                    proto,
                    local,
                    holder: u.channel,
                });
            }
        }
        Ok(())
    }

    /// Adds a flow for `channel` (see [`FlowTable::check`] for what conflicts).
    pub fn insert(&mut self, channel: ChannelId, spec: FlowSpec) -> Result<FlowId, TableError> {
        if self.len() >= self.capacity {
            return Err(TableError::Full(self.capacity));
        }
        self.check(channel, spec)?;
        let (proto, local) = Self::local_of(&spec);
        let listener = matches!(spec, FlowSpec::Listener(..));
        let flow = Flow { spec, channel };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.flows[id as usize] = Some(flow);
                self.counters[id as usize] = [0, 0];
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.counters.push([0, 0]);
                (self.flows.len() - 1) as FlowId
            }
        };
        self.by_channel.entry(channel).or_default().insert(id);
        match spec {
            FlowSpec::Exact(k) => {
                self.exact.insert(Packed::new(&k).0, id, channel);
            }
            FlowSpec::Listener(p, a) => {
                self.listeners.insert((p, a), id);
            }
        }
        let uses = self.ports.entry((proto, local.port())).or_default();
        let u = match uses
            .iter_mut()
            .find(|u| u.addr == local.ip() && u.channel == channel)
        {
            Some(u) => u,
            None => {
                uses.push(PortUse {
                    addr: local.ip(),
                    channel,
                    listeners: 0,
                    exacts: 0,
                });
                let last = uses.len() - 1;
                &mut uses[last]
            }
        };
        if listener {
            u.listeners += 1;
        } else {
            u.exacts += 1;
        }
        Ok(id)
    }

    /// Removes a flow.
    pub fn remove(&mut self, id: FlowId) -> Option<Flow> {
        let flow = self.flows.get_mut(id as usize)?.take()?;
        let (proto, local) = Self::local_of(&flow.spec);
        let listener = match flow.spec {
            FlowSpec::Exact(k) => {
                self.exact.remove(&Packed::new(&k).0);
                false
            }
            FlowSpec::Listener(p, a) => {
                self.listeners.remove(&(p, a));
                true
            }
        };
        if let Some(uses) = self.ports.get_mut(&(proto, local.port())) {
            if let Some(u) = uses
                .iter_mut()
                .find(|u| u.addr == local.ip() && u.channel == flow.channel)
            {
                let n = if listener {
                    &mut u.listeners
                } else {
                    &mut u.exacts
                };
                *n = n.saturating_sub(1);
            }
            uses.retain(|u| u.listeners + u.exacts > 0);
            if uses.is_empty() {
                self.ports.remove(&(proto, local.port()));
            }
        }
        if let Some(set) = self.by_channel.get_mut(&flow.channel) {
            set.remove(&id);
            if set.is_empty() {
                self.by_channel.remove(&flow.channel);
            }
        }
        self.free_ids.push(id);
        Some(flow)
    }

    /// Removes every flow of a channel; returns their ids.
    pub fn remove_channel(&mut self, channel: ChannelId) -> Vec<FlowId> {
        let ids: Vec<FlowId> = self
            .by_channel
            .get(&channel)
            .map_or_else(Vec::new, |set| set.iter().copied().collect());
        for &id in &ids {
            self.remove(id);
        }
        ids
    }

    /// Looks up a batch of keys, overlapping the exact index's cache misses;
    /// `out[j]` is the flow of `keys[j]`. `scratch` is reused between calls.
    pub fn lookup_batch(
        &self,
        keys: &[FlowKey],
        scratch: &mut BatchScratch,
        out: &mut Vec<Option<Hit>>,
    ) {
        scratch.packed.clear();
        scratch.packed.extend(keys.iter().map(|k| Packed::new(k).0));
        self.exact.get_batch(&scratch.packed, &mut scratch.found);
        out.clear();
        for (k, f) in keys.iter().zip(&scratch.found) {
            out.push(match *f {
                Some((id, channel)) => Some(Hit {
                    id,
                    channel,
                    listener: false,
                }),
                None => self.lookup_listener(k),
            });
        }
    }

    /// Counts a packet received (`tx = false`) or sent on a flow.
    #[inline]
    pub fn count(&mut self, id: FlowId, tx: bool) {
        if let Some(c) = self.counters.get_mut(id as usize) {
            c[usize::from(tx)] += 1;
        }
    }

    /// Packets received and sent on a flow.
    pub fn counters(&self, id: FlowId) -> (u64, u64) {
        self.counters
            .get(id as usize)
            .map_or((0, 0), |c| (c[0], c[1]))
    }

    /// Number of flows of a channel.
    pub fn flows_of(&self, channel: ChannelId) -> usize {
        self.by_channel.get(&channel).map_or(0, |set| set.len())
    }

    /// Every flow, with its id.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &Flow)> {
        self.iter_from(0)
    }

    /// Every flow whose id is `first` or more, in id order.
    pub fn iter_from(&self, first: FlowId) -> impl Iterator<Item = (FlowId, &Flow)> {
        let skip = (first as usize).min(self.flows.len());
        self.flows[skip..]
            .iter()
            .enumerate()
            .filter_map(move |(i, f)| f.as_ref().map(|f| ((skip + i) as FlowId, f)))
    }

    /// The flow a packet belongs to: the exact 5-tuple, else a listener on its local address,
    /// else a wildcard listener on its local port.
    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<Hit> {
        if let Some((id, channel)) = self.exact.get(&Packed::new(key).0) {
            return Some(Hit {
                id,
                channel,
                listener: false,
            });
        }
        self.lookup_listener(key)
    }

    fn lookup_listener(&self, key: &FlowKey) -> Option<Hit> {
        let id = *self
            .listeners
            .get(&(key.proto, key.local))
            .or_else(|| self.listeners.get(&(key.proto, wildcard(&key.local))))?;
        self.get(id).map(|f| Hit {
            id,
            channel: f.channel,
            listener: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn key(p: Proto, l: &str, r: &str) -> FlowKey {
        FlowKey {
            proto: p,
            local: sa(l),
            remote: sa(r),
        }
    }

    #[test]
    fn exact_first_then_listener_then_wildcard() {
        let mut t = FlowTable::new(100);
        let wild = t
            .insert(1, FlowSpec::Listener(Proto::Udp, sa("0.0.0.0:53")))
            .unwrap();
        let exact = t
            .insert(
                1,
                FlowSpec::Exact(key(Proto::Udp, "198.18.0.1:53", "198.18.0.2:999")),
            )
            .unwrap();
        assert_eq!(
            t.lookup(&key(Proto::Udp, "198.18.0.1:53", "198.18.0.2:999"))
                .unwrap()
                .id,
            exact
        );
        assert_eq!(
            t.lookup(&key(Proto::Udp, "198.18.0.1:53", "198.18.0.3:999"))
                .unwrap()
                .id,
            wild
        );
        assert!(
            t.lookup(&key(Proto::Tcp, "198.18.0.1:53", "198.18.0.3:999"))
                .is_none(),
            "TCP is not UDP"
        );
        assert!(
            t.lookup(&key(
                Proto::Udp,
                "[fd00:198:18::1]:53",
                "[fd00:198:18::2]:9"
            ))
            .is_none(),
            "v4 wildcard is not v6"
        );
        t.remove(exact);
        assert_eq!(
            t.lookup(&key(Proto::Udp, "198.18.0.1:53", "198.18.0.2:999"))
                .unwrap()
                .id,
            wild
        );
    }

    #[test]
    fn conflicts_in_both_orders() {
        let mut t = FlowTable::new(100);
        t.insert(1, FlowSpec::Listener(Proto::Udp, sa("198.18.0.1:80")))
            .unwrap();
        // wildcard against specific, either order, any channel
        assert!(matches!(
            t.insert(2, FlowSpec::Listener(Proto::Udp, sa("0.0.0.0:80"))),
            Err(TableError::InUse { holder: 1, .. })
        ));
        let mut t2 = FlowTable::new(100);
        t2.insert(2, FlowSpec::Listener(Proto::Udp, sa("0.0.0.0:80")))
            .unwrap();
        assert!(
            t2.insert(1, FlowSpec::Listener(Proto::Udp, sa("198.18.0.1:80")))
                .is_err()
        );
        // other protocol, other family, other address: fine
        t.insert(2, FlowSpec::Listener(Proto::Tcp, sa("198.18.0.1:80")))
            .unwrap();
        t.insert(2, FlowSpec::Listener(Proto::Udp, sa("[::]:80")))
            .unwrap();
        t.insert(2, FlowSpec::Listener(Proto::Udp, sa("198.18.0.2:80")))
            .unwrap();
        // an exact flow on a listener's address: only its owner (accepted connections)
        t.insert(
            1,
            FlowSpec::Exact(key(Proto::Udp, "198.18.0.1:80", "198.18.0.9:1")),
        )
        .unwrap();
        assert!(
            t.insert(
                3,
                FlowSpec::Exact(key(Proto::Udp, "198.18.0.1:80", "198.18.0.9:2"))
            )
            .is_err()
        );
        assert!(
            t.insert(
                1,
                FlowSpec::Exact(key(Proto::Udp, "198.18.0.1:80", "198.18.0.9:1"))
            )
            .is_err(),
            "same 5-tuple twice"
        );
        assert_eq!(t.flows_of(2), 3);
        assert_eq!(t.remove_channel(2).len(), 3);
        assert_eq!(t.flows_of(2), 0);
        assert_eq!(t.flows_of(1), 2);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn capacity_is_enforced() {
        let mut t = FlowTable::new(2);
        t.insert(1, FlowSpec::Listener(Proto::Udp, sa("0.0.0.0:1")))
            .unwrap();
        t.insert(1, FlowSpec::Listener(Proto::Udp, sa("0.0.0.0:2")))
            .unwrap();
        assert_eq!(
            t.insert(1, FlowSpec::Listener(Proto::Udp, sa("0.0.0.0:3"))),
            Err(TableError::Full(2))
        );
    }
}
