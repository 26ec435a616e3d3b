//! The flowswitch's core: what becomes of each frame from the wire and each packet from an app,
//! as plain functions of (state, bytes, now). No I/O, no clock, no waiting: the driver
//! (`crate::datapath`) owns the interface, the socket to the kernel and the clock, and carries out
//! what the core decides.
//!
//! * **RX** ([`Switch::rx_batch`]): each frame is parsed once, looked up (exact flow, then
//!   listener) and its IP packet (Ethernet stripped) is delivered into the owning channel
//!   through its [`Port`]; the driver then publishes each touched channel's batch. Every frame
//!   that reaches no app is counted under one [`DropReason`]. Fragments are reassembled first
//!   (`super::reassembly`); options and extension headers are stripped (`parse::canonical`).
//! * **TX** ([`Switch::tx_prepare`]): a packet the driver has already copied out of the app's
//!   memory is validated against the sending channel's flows (anti-spoofing) and given its
//!   Ethernet header, or held while its next hop is resolved.
//! * **Next hops**: behind a TAP the core answers ARP/NDP itself and asks for its neighbours
//!   (frames of its own, [`Switch::poll_transmit`]); on a shared interface it asks the kernel
//!   ([`Switch::poll_query`]) and learns the answers ([`Switch::on_route`],
//!   [`Switch::on_neighbour`]).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use netchannel_shm::control::ChannelId;

use super::coalesce::{Coalescer, Incoming};
use super::conntrack::Conns;
use super::drop::{DropCounters, DropReason};
use super::neighbour::{ArpAction, Hop, KernelNeighbours, Neighbours, NoHop, Query};
use super::parse::{RxDrop, canonical, frame_ip_offset, parse_frame_headers, parse_ip_headers};
use super::port::{Port, Ports};
use super::reassembly::{Limits, Reassembler};
use super::table::{BatchScratch, FlowId, FlowKey, FlowTable, Hit};
use super::tx;

/// Interface-level counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Frames received from the interface.
    pub rx_frames: u64,
    /// Frames delivered to a channel (staged in its pool; the channel counts those its full
    /// RX ring then refuses, `rx_ring_full`).
    pub rx_switched: u64,
    /// Frames that reached no channel, and the nexus's own frames the interface refused, by
    /// reason (drops of a channel's packets are counted on the channel).
    pub drops: DropCounters,
    /// Frames sent on the interface.
    pub tx_frames: u64,
    /// Frames the interface refused (queue full, too large), the channels' and the nexus's.
    pub tx_netif_errors: u64,
    /// Packets of all channels dropped without a next hop (waited in vain, or too many
    /// waited).
    pub tx_unresolved: u64,
    /// Resets sent to the peers of a dead app's TCP connections.
    pub tx_resets: u64,
    /// TCP segments appended to the previous one by receive coalescing.
    pub rx_coalesced: u64,
    /// Large TCP packets from apps cut into segments (segmentation offload).
    pub tx_segmented: u64,
    /// Half-open TCP connections forgotten to make room for new ones (a SYN flood).
    pub conntrack_evicted: u64,
    /// Frames of IP fragments taken for reassembly. A fragment is counted here, not in
    /// `rx_switched` or under a drop: what becomes of it is counted per datagram, once
    /// (`rx_reassembled`, then delivered or dropped as one packet; or given up under an
    /// `rx_frag_*` reason), except a fragment refused on its own (`rx_frag_malformed`,
    /// `rx_frag_duplicate`, `rx_frag_oversized`), which is counted here and there.
    pub rx_fragments: u64,
    /// Datagrams made whole again (then classified like any packet).
    pub rx_reassembled: u64,
    /// Bytes held now in incomplete datagrams (within the reassembly budget).
    pub reassembly_bytes: u64,
    /// Packets received with IPv4 options or IPv6 extension headers, handed to apps without.
    pub rx_options_stripped: u64,
    /// Datagrams from apps cut into fragments.
    pub tx_fragmented: u64,
}

impl SwitchStats {
    /// Counts a drop: on the interface if it is the interface's, and in the interface-wide
    /// totals every drop of its kind feeds. (A channel's drop is counted on the channel by the
    /// caller, once.)
    pub fn note(&mut self, reason: DropReason) {
        if reason.scope() == super::drop::Scope::Interface {
            self.drops.add(reason);
        }
        if reason.is_netif_error() {
            self.tx_netif_errors += 1;
        }
        if reason.is_unresolved() {
            self.tx_unresolved += 1;
        }
    }
}

/// A packet waiting for its next hop to be resolved, as the kernel holds packets while it
/// resolves a neighbour (the first packet to a new peer must not be lost).
#[derive(Debug)]
struct Pending {
    dst: IpAddr,
    /// The whole frame; its MAC addresses are written once the next hop is known.
    frame: Vec<u8>,
    flow: FlowId,
    channel: ChannelId,
    since: Instant,
}

/// A held packet whose next hop is now known: its frame is complete.
#[derive(Debug)]
pub struct Ready {
    /// The whole Ethernet frame.
    pub frame: Vec<u8>,
    /// Its flow.
    pub flow: FlowId,
    /// The channel that sent it.
    pub channel: ChannelId,
}

/// Most packets held for unresolved neighbours, in all and per destination.
const PENDING_MAX: usize = 256;
const PENDING_PER_DST: usize = 16;
/// How long a packet waits for its neighbour before it is dropped (`tx_unresolved`).
const PENDING_FOR: Duration = Duration::from_secs(3);

/// Length of an Ethernet header.
pub const ETH: usize = 14;

/// Where a classified packet of a batch lies: in a frame (index), or in `rebuilt` (index).
#[derive(Debug, Clone, Copy)]
enum Source {
    Frame(usize),
    Rebuilt(usize),
}

const BROADCAST: [u8; 6] = [0xff; 6];

/// Notes a parsed packet of the batch for lookup; `src` says where it lies (at
/// `p.ip_offset`). One with options or extension headers is handed on without them (see
/// [`canonical`]), from a copy in `rebuilt`.
fn keep(
    keys: &mut Vec<FlowKey>,
    parsed: &mut Vec<(Source, usize, usize)>,
    rebuilt: &mut Vec<Vec<u8>>,
    stats: &mut SwitchStats,
    p: &super::Parsed,
    frames: &[&[u8]],
    src: Source,
) {
    keys.push(FlowKey {
        proto: p.proto,
        local: SocketAddr::from(p.dst),
        remote: SocketAddr::from(p.src),
    });
    if !p.has_options() {
        parsed.push((src, p.ip_offset, p.ip_len));
        return;
    }
    let packet = match src {
        Source::Frame(j) => frames.get(j).copied().unwrap_or_default(),
        Source::Rebuilt(k) => rebuilt.get(k).map_or(&[][..], Vec::as_slice),
    };
    let mut plain = Vec::with_capacity(p.ip_len);
    canonical(packet.get(p.ip_offset..).unwrap_or_default(), p, &mut plain);
    stats.rx_options_stripped += 1;
    let len = plain.len();
    let at = match src {
        // A reassembled packet is replaced by its stripped copy.
        Source::Rebuilt(k) if k < rebuilt.len() => {
            rebuilt[k] = plain;
            k
        }
        _ => {
            rebuilt.push(plain);
            rebuilt.len() - 1
        }
    };
    parsed.push((Source::Rebuilt(at), 0, len));
}

/// The multicast groups a host of its own joins (behind a TAP): IPv4 all-hosts, IPv6
/// all-nodes, and the solicited-node group of each IPv6 address.
fn own_groups(host_addrs: &[IpAddr]) -> Vec<[u8; 6]> {
    let mut g = vec![[0x01, 0x00, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]];
    for a in host_addrs {
        if let IpAddr::V6(v6) = a {
            let o = v6.octets();
            g.push([0x33, 0x33, 0xff, o[13], o[14], o[15]]);
        }
    }
    g
}

/// How the switch finds the destination MAC of what it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// Every frame goes to this MAC (a point-to-point link, or a test).
    Fixed([u8; 6]),
    /// The nexus is a host of its own on the link (TAP): it answers ARP for its addresses and
    /// learns its neighbours from theirs; a packet to an unknown neighbour waits while an ARP
    /// request (or neighbour solicitation) goes out.
    Arp,
    /// The interface is shared with the kernel (AF_XDP on interface `ifindex`): routes and
    /// neighbours come from the kernel; a packet to a neighbour the kernel has not resolved
    /// yet waits while the kernel resolves it.
    Kernel(u32),
}

/// What becomes of a validated packet from an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStep {
    /// Ready in the buffer, Ethernet header and all: send it.
    Send(FlowId, FlowKey),
    /// Held until its next hop is resolved (sent later by [`Switch::poll_pending`]).
    Held,
}

/// The flowswitch of one interface: its state and its decisions.
#[derive(Debug)]
pub struct Switch {
    host_addrs: Vec<IpAddr>,
    next_hop: NextHop,
    mac: [u8; 6],
    mtu: usize,
    neighbours: Neighbours,
    kernel: KernelNeighbours,
    /// The multicast MAC addresses the host has joined on the interface (with broadcast and
    /// the interface's own, what a frame may be addressed to).
    groups: Vec<[u8; 6]>,
    pending: VecDeque<Pending>,
    conns: Conns,
    coalescer: Coalescer,
    /// Frames of the nexus's own to send (ARP and NDP answers and requests).
    own: VecDeque<Vec<u8>>,
    reassembler: Reassembler,
    /// Datagrams the nexus has fragmented, and the secret that offsets their identification
    /// per destination (see [`Switch::next_frag_id`]).
    frag_count: u32,
    frag_secret: std::collections::hash_map::RandomState,
    /// Packets of this batch that are not a slice of a frame: reassembled, or stripped of
    /// their options.
    rebuilt: Vec<Vec<u8>>,
    touched: Vec<ChannelId>,
    keys: Vec<FlowKey>,
    parsed: Vec<(Source, usize, usize)>,
    hits: Vec<Option<Hit>>,
    scratch: BatchScratch,
    stats: SwitchStats,
}

impl Switch {
    /// The flowswitch of an interface whose MAC address is `mac` and MTU `mtu`, serving
    /// `host_addrs`, finding each frame's destination MAC as `next_hop` says.
    pub fn new(host_addrs: Vec<IpAddr>, next_hop: NextHop, mac: [u8; 6], mtu: u32) -> Self {
        let groups = if next_hop == NextHop::Arp {
            own_groups(&host_addrs)
        } else {
            Vec::new()
        };
        Self {
            host_addrs,
            next_hop,
            mac,
            mtu: mtu as usize,
            neighbours: Neighbours::default(),
            kernel: KernelNeighbours::default(),
            groups,
            pending: VecDeque::new(),
            conns: Conns::default(),
            coalescer: Coalescer::default(),
            own: VecDeque::new(),
            reassembler: Reassembler::new(Limits::default()),
            frag_count: 0,
            frag_secret: std::collections::hash_map::RandomState::new(),
            rebuilt: Vec::new(),
            touched: Vec::new(),
            keys: Vec::new(),
            parsed: Vec::new(),
            hits: Vec::new(),
            scratch: BatchScratch::default(),
            stats: SwitchStats::default(),
        }
    }

    /// The addresses the switch serves.
    pub fn host_addrs(&self) -> &[IpAddr] {
        &self.host_addrs
    }

    /// How next hops are found.
    pub fn next_hop(&self) -> NextHop {
        self.next_hop
    }

    /// The interface's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The interface's MTU (the largest IP packet it carries).
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Bounds reassembly (memory, time, fragments per datagram); drops what is held.
    pub fn set_reassembly_limits(&mut self, limits: Limits) {
        self.reassembler = Reassembler::new(limits);
        self.stats.reassembly_bytes = 0;
    }

    /// The identification of the next datagram the driver fragments to `dst` (IPv4 takes
    /// its low 16 bits), as the kernel's `ip_idents` make it: a count shared by all
    /// destinations, offset by a secret hash of the destination. Consecutive datagrams to one
    /// destination get consecutive IDs (none repeats before 65,536 more, whichever app sent
    /// them: an app's stack may give every datagram the same one), and a peer cannot predict
    /// the IDs of another destination from its own (RFC 7739).
    pub fn next_frag_id(&mut self, dst: IpAddr) -> u32 {
        use std::hash::BuildHasher;
        self.frag_count = self.frag_count.wrapping_add(1);
        (self.frag_secret.hash_one(dst) as u32).wrapping_add(self.frag_count)
    }

    /// The multicast MAC addresses the host has joined on the interface (the driver reads
    /// them from the kernel; behind a TAP the switch's own groups are set at creation).
    pub fn set_groups(&mut self, groups: Vec<[u8; 6]>) {
        self.groups = groups;
    }

    /// Counters.
    pub fn stats(&self) -> &SwitchStats {
        &self.stats
    }

    /// Counters, for the driver to add what it did (frames sent, refused).
    pub fn stats_mut(&mut self) -> &mut SwitchStats {
        &mut self.stats
    }

    /// The channels that received packets in the last [`Switch::rx_batch`]: their staged
    /// batches must be published.
    pub fn touched(&self) -> &[ChannelId] {
        &self.touched
    }

    /// Starts a new RX pass (forgets the channels touched by the last one).
    pub fn begin_rx(&mut self) {
        self.touched.clear();
    }

    /// Classifies one batch of frames from the wire and delivers each into its channel's
    /// port; every frame that is not a fragment is counted once: delivered (`rx_switched`),
    /// handled by the nexus (ARP, NDP) or dropped under one reason; a fragment is counted in
    /// `rx_fragments`, and its datagram once (see [`SwitchStats::rx_fragments`]). `now` times
    /// reassembly.
    pub fn rx_batch(
        &mut self,
        frames: &[&[u8]],
        table: &mut FlowTable,
        ports: &mut impl Ports,
        now: Instant,
    ) {
        let Self {
            stats,
            touched,
            keys,
            parsed,
            hits,
            scratch,
            neighbours,
            next_hop,
            host_addrs,
            conns,
            coalescer,
            own,
            mac,
            groups,
            reassembler,
            rebuilt,
            ..
        } = self;
        // Parse the whole batch, look it up in one go (the misses overlap), then deliver.
        stats.rx_frames += frames.len() as u64;
        parsed.clear();
        keys.clear();
        rebuilt.clear();
        if reassembler.incomplete() > 0 {
            reassembler.expire(now, &mut |d| stats.note(d));
            stats.reassembly_bytes = reassembler.memory() as u64;
        }
        for (j, frame) in frames.iter().enumerate() {
            // What the kernel would not take (PACKET_OTHERHOST) never reaches an app, whatever
            // mode the interface is in.
            // (A frame too short to have a destination is left to the parser: truncated.)
            if let Some(dst) = frame.get(..6)
                && dst != mac
                && !(dst[0] & 1 == 1 && (dst == BROADCAST || groups.iter().any(|g| g == dst)))
            {
                stats.note(DropReason::RxOtherHost);
                continue;
            }
            if *next_hop == NextHop::Arp {
                // Behind a TAP the nexus resolves its own neighbours: ARP, and IPv6 neighbour
                // discovery (ICMPv6 types 135 and 136).
                let action = match frame.get(12..14) {
                    Some([0x08, 0x06]) => Some((
                        DropReason::RxArp,
                        neighbours.on_arp(frame, *mac, host_addrs),
                    )),
                    Some([0x86, 0xdd])
                        if frame.get(20) == Some(&58)
                            && matches!(frame.get(54), Some(135 | 136)) =>
                    {
                        Some((
                            DropReason::RxNdp,
                            neighbours.on_ndp(frame, *mac, host_addrs),
                        ))
                    }
                    _ => None,
                };
                if let Some((kind, action)) = action {
                    stats.note(kind);
                    if let ArpAction::Reply(r) = action {
                        own.push_back(r);
                    }
                    continue;
                }
            }
            let p = match parse_frame_headers(frame) {
                Ok(p) => p,
                Err(RxDrop::Fragment) => {
                    // Whole again, it is parsed and classified as if it had come so.
                    stats.rx_fragments += 1;
                    let ip = frame.get(frame_ip_offset(frame)..).unwrap_or_default();
                    let whole = reassembler.insert(ip, now, &mut |d| stats.note(d));
                    stats.reassembly_bytes = reassembler.memory() as u64;
                    let Some(whole) = whole else { continue };
                    stats.rx_reassembled += 1;
                    match parse_ip_headers(&whole) {
                        Ok(p) => {
                            rebuilt.push(whole);
                            let src = Source::Rebuilt(rebuilt.len() - 1);
                            keep(keys, parsed, rebuilt, stats, &p, frames, src);
                        }
                        Err(d) => stats.note(d.into()),
                    }
                    continue;
                }
                Err(d) => {
                    stats.note(d.into());
                    continue;
                }
            };
            keep(keys, parsed, rebuilt, stats, &p, frames, Source::Frame(j));
        }
        table.lookup_batch(keys, scratch, hits);
        for ((&(src, off, len), hit), key) in parsed.iter().zip(hits.iter()).zip(keys.iter()) {
            let Some(hit) = hit else {
                stats.note(DropReason::RxNoFlow);
                continue;
            };
            let Some(port) = ports.port(hit.channel).filter(|p| p.is_active()) else {
                stats.note(DropReason::RxChannelGone);
                continue;
            };
            let ip = match src {
                Source::Frame(j) => &frames[j][off..off + len],
                Source::Rebuilt(k) => &rebuilt[k][off..off + len],
            };
            let p = Incoming {
                ip,
                proto: key.proto,
                src: key.remote.ip(),
                dst: key.local.ip(),
            };
            match coalescer.deliver(port, &p) {
                Ok(true) => {}
                // The channel counted why it could not take it.
                Ok(false) => continue,
                Err(d) => {
                    stats.note(d.into());
                    continue;
                }
            }
            if key.proto == super::Proto::Tcp {
                // Options and extension headers are gone, so the header is 20 or 40 bytes.
                let iphl = if key.local.is_ipv4() { 20 } else { 40 };
                if let Some(tcp) = ip.get(iphl..) {
                    conns.on_rx(hit.channel, key.local, key.remote, tcp);
                }
            }
            table.count(hit.id, false);
            if !touched.contains(&hit.channel) {
                touched.push(hit.channel);
            }
            stats.rx_switched += 1;
        }
        // Growing packets get their checksums before the rings are published.
        coalescer.finish(ports);
        stats.rx_coalesced = coalescer.stats.merged;
        stats.conntrack_evicted = conns.evicted();
    }

    /// The next frame of the nexus's own to send (an ARP or NDP answer or request).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.own.pop_front()
    }

    /// The next question for the kernel (routes and neighbours, on a shared interface).
    pub fn poll_query(&mut self) -> Option<Query> {
        self.kernel.poll_query()
    }

    /// The kernel's answer to [`Query::Route`].
    pub fn on_route(&mut self, dst: IpAddr, hop: Hop, now: Instant) {
        self.kernel.on_route(dst, hop, now);
    }

    /// The kernel's neighbour entry for `ip` (an answer, or a change it announced).
    pub fn on_neighbour(&mut self, ip: IpAddr, mac: Option<[u8; 6]>) {
        self.kernel.on_neighbour(ip, mac);
    }

    /// The MAC address of `dst`'s next hop, if known now (an unknown one is being asked).
    fn hop_mac(&mut self, dst: IpAddr, now: Instant) -> Result<[u8; 6], NoHop> {
        match self.next_hop {
            NextHop::Fixed(mac) => Ok(mac),
            NextHop::Kernel(_) => self.kernel.lookup(dst, now),
            NextHop::Arp => self.neighbours.get(dst).ok_or(NoHop::Unresolved),
        }
    }

    /// Validates the IP packet an app sent, already copied to `frame[ETH..ETH + len]` (the
    /// nexus's memory), against `channel`'s flows (anti-spoofing), and writes its Ethernet
    /// header; or holds a copy while its next hop is resolved (if `may_hold`: a large packet
    /// cannot wait whole, TCP sends it again). The caller counts a refusal on the channel.
    pub fn tx_prepare(
        &mut self,
        table: &FlowTable,
        channel: ChannelId,
        frame: &mut [u8],
        len: usize,
        may_hold: bool,
        now: Instant,
    ) -> Result<TxStep, DropReason> {
        let ip = frame.get(ETH..ETH + len).ok_or(DropReason::TxBadLen)?;
        let tx::Valid { flow, key, l4 } = tx::validate(table, channel, ip, &self.host_addrs)?;
        let dst = key.remote.ip();
        let dst_mac = match self.hop_mac(dst, now) {
            Ok(mac) => mac,
            Err(NoHop::OtherInterface) => return Err(DropReason::TxOtherInterface),
            Err(NoHop::Unresolved) if !may_hold => return Err(DropReason::TxUnresolved),
            Err(NoHop::Unresolved) => {
                self.hold(dst, &frame[..ETH + len], flow, channel, now)?;
                // Behind a TAP the nexus resolves its neighbours itself: ask.
                match (self.next_hop, key.local.ip(), dst) {
                    (NextHop::Arp, IpAddr::V4(src), IpAddr::V4(d)) => {
                        self.own.push_back(Neighbours::request(self.mac, src, d));
                    }
                    (NextHop::Arp, IpAddr::V6(src), IpAddr::V6(d)) => {
                        self.own.push_back(Neighbours::solicit(self.mac, src, d));
                    }
                    _ => {}
                }
                return Ok(TxStep::Held);
            }
        };
        frame[..6].copy_from_slice(&dst_mac);
        frame[6..12].copy_from_slice(&self.mac);
        let ethertype: u16 = if key.remote.is_ipv6() { 0x86dd } else { 0x0800 };
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        // What the app sends on a TCP connection tells where a reset must start.
        if key.proto == super::Proto::Tcp
            && !self.conns.is_empty()
            && let Some(tcp) = frame.get(ETH + l4..ETH + len)
        {
            self.conns.on_tx(key.local, key.remote, tcp);
        }
        Ok(TxStep::Send(flow, key))
    }

    /// The MSS the peer of a TCP connection announced, if known (segmentation cuts to it).
    pub fn peer_mss(&self, key: &FlowKey) -> Option<u16> {
        self.conns.mss(key.local, key.remote)
    }

    /// Holds a packet until its next hop is resolved.
    fn hold(
        &mut self,
        dst: IpAddr,
        frame: &[u8],
        flow: FlowId,
        channel: ChannelId,
        now: Instant,
    ) -> Result<(), DropReason> {
        let same = self.pending.iter().filter(|p| p.dst == dst).count();
        if self.pending.len() >= PENDING_MAX || same >= PENDING_PER_DST {
            return Err(DropReason::TxNoNeighbour);
        }
        let mut f = frame.to_vec();
        let ethertype: u16 = if f.get(ETH).is_some_and(|b| b >> 4 == 6) {
            0x86dd
        } else {
            0x0800
        };
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        self.pending.push_back(Pending {
            dst,
            frame: f,
            flow,
            channel,
            since: now,
        });
        Ok(())
    }

    /// Whether packets wait for their next hop (the driver must come back soon).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Moves the held packets whose next hop is now known to `ready` (their frames complete);
    /// drops, on their channels, those that waited too long.
    pub fn poll_pending(&mut self, now: Instant, ports: &mut impl Ports, ready: &mut Vec<Ready>) {
        for _ in 0..self.pending.len() {
            let Some(mut p) = self.pending.pop_front() else {
                break;
            };
            match self.hop_mac(p.dst, now) {
                Ok(mac) => {
                    p.frame[..6].copy_from_slice(&mac);
                    p.frame[6..12].copy_from_slice(&self.mac);
                    ready.push(Ready {
                        frame: p.frame,
                        flow: p.flow,
                        channel: p.channel,
                    });
                }
                Err(NoHop::Unresolved) if now.saturating_duration_since(p.since) < PENDING_FOR => {
                    self.pending.push_back(p);
                }
                Err(_) => {
                    let reason = DropReason::TxUnresolved;
                    self.stats.note(reason);
                    if let Some(port) = ports.port(p.channel) {
                        port.count_drop(reason);
                    }
                }
            }
        }
    }

    /// Resets for every peer of `channel`'s TCP connections (its app died or its channel was
    /// revoked), as whole frames: they learn at once instead of waiting on a silent
    /// connection. Peers whose next hop is unknown get none.
    pub fn resets(&mut self, channel: ChannelId, now: Instant) -> Vec<Vec<u8>> {
        let resets = self.conns.take_channel(channel);
        let mut frames = Vec::with_capacity(resets.len());
        for r in resets {
            let Some(pkt) = r.packet() else { continue };
            let Ok(mac) = self.hop_mac(r.remote.ip(), now) else {
                continue;
            };
            let mut f = Vec::with_capacity(ETH + pkt.len());
            f.extend_from_slice(&mac);
            f.extend_from_slice(&self.mac);
            let ethertype: u16 = if r.remote.is_ipv6() { 0x86dd } else { 0x0800 };
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend_from_slice(&pkt);
            frames.push(f);
        }
        frames
    }
}
