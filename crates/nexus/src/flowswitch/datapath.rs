//! The flowswitch datapath between an interface and the channels.
//!
//! * **RX**: each frame is parsed once, looked up (exact flow, then listener), and its IP packet
//!   (Ethernet stripped) is copied into the owning channel's pool; a batch per channel is then
//!   published with one ring update. Every frame that reaches no app is counted under one
//!   reason.
//! * **TX**: each packet an app sends is copied out of its memory into the switch's own buffer
//!   *before* it is inspected, validated against the sending channel's flows (anti-spoofing),
//!   given an Ethernet header and sent.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use netchannel_shm::control::ChannelId;

use super::coalesce::{Coalescer, Incoming};
use super::neighbour::{ArpAction, KernelNeighbours, Neighbours, NoHop};
use super::parse::{RxDrop, parse_frame_headers};
use super::segment::{self, TcpLayout};
use super::table::{BatchScratch, FlowId, FlowKey, FlowTable, Hit};
use super::tx;
use crate::channel::Channel;
use crate::netif::Netif;
use crate::netif::packet::Gso;

/// Interface-level counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Frames received from the interface.
    pub rx_frames: u64,
    /// Frames delivered to a channel (staged; the channel counts ring-full drops).
    pub rx_switched: u64,
    /// Frames that reached no channel, by reason (`arp`: ARP handled by the nexus itself).
    pub rx_drops: BTreeMap<&'static str, u64>,
    /// Frames sent on the interface.
    pub tx_frames: u64,
    /// Frames the interface refused (queue full, too large).
    pub tx_netif_errors: u64,
    /// Packets dropped after waiting in vain for their neighbour to be resolved (or because
    /// too many waited).
    pub tx_unresolved: u64,
    /// Resets sent to the peers of a dead app's TCP connections.
    pub tx_resets: u64,
    /// TCP segments appended to the previous one by receive coalescing.
    pub rx_coalesced: u64,
    /// Large TCP packets from apps cut into segments (segmentation offload).
    pub tx_segmented: u64,
    /// Half-open TCP connections forgotten to make room for new ones (a SYN flood).
    pub conntrack_evicted: u64,
}

/// A packet waiting for its next hop to be resolved, as the kernel holds packets while it
/// resolves a neighbour (the first packet to a new peer must not be lost).
#[derive(Debug)]
struct Pending {
    dst: IpAddr,
    /// The whole frame; its MAC addresses are written once the next hop is known.
    frame: Vec<u8>,
    flow: FlowId,
    since: std::time::Instant,
}

/// Most packets held for unresolved neighbours, in all and per destination.
const PENDING_MAX: usize = 256;
const PENDING_PER_DST: usize = 16;
/// How long a packet waits for its neighbour before it is dropped (`tx_unresolved`).
const PENDING_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// How the switch finds the destination MAC of what it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// Every frame goes to this MAC (a point-to-point link, or a test).
    Fixed([u8; 6]),
    /// The nexus is a host of its own on the link (TAP): it answers ARP for its addresses and
    /// learns its neighbours from theirs; a packet to an unknown IPv4 neighbour is dropped
    /// (`tx_no_neighbour`) after an ARP request goes out.
    Arp,
    /// The interface is shared with the kernel (AF_XDP on interface `ifindex`): routes and
    /// neighbours come from the kernel over netlink; a packet to a neighbour the kernel has
    /// not resolved yet is dropped (`tx_no_neighbour`) while the kernel resolves it.
    Kernel(u32),
}

/// The flowswitch of one interface.
#[derive(Debug)]
pub struct Switch {
    netif: Box<dyn Netif>,
    host_addrs: Vec<IpAddr>,
    next_hop: NextHop,
    neighbours: Neighbours,
    kernel: Option<KernelNeighbours>,
    pending: std::collections::VecDeque<Pending>,
    conns: super::conntrack::Conns,
    coalescer: Coalescer,
    frame: Vec<u8>,
    /// Where a segment is built when the interface lends no frame.
    seg_frame: Vec<u8>,
    touched: Vec<ChannelId>,
    keys: Vec<FlowKey>,
    parsed: Vec<(usize, usize, usize)>,
    hits: Vec<Option<Hit>>,
    scratch: BatchScratch,
    stats: SwitchStats,
}

const ETH: usize = 14;
/// The most header bytes a packet the flowswitch sends can have: IPv6 (IPv4 options are
/// refused) and a TCP header with the most options.
const MAX_HEADERS: usize = 40 + 60;

/// The MAC address of `dst`'s next hop as `next_hop` finds it, if known now (an unknown one
/// is being resolved: by the kernel, or by the ARP/NDP request of the caller).
fn hop_mac(
    next_hop: NextHop,
    kernel: Option<&mut KernelNeighbours>,
    neighbours: &Neighbours,
    dst: IpAddr,
    now: std::time::Instant,
) -> Result<[u8; 6], NoHop> {
    match (next_hop, kernel) {
        (NextHop::Fixed(mac), _) => Ok(mac),
        (NextHop::Kernel(_), Some(k)) => k.lookup(dst, now),
        (NextHop::Kernel(_), None) => Err(NoHop::Unresolved),
        (NextHop::Arp, _) => neighbours.get(dst).ok_or(NoHop::Unresolved),
    }
}

/// Holds a packet until its next hop is resolved: counted as handed over to the interface
/// now, sent (or dropped as `tx_unresolved`) by [`Switch::retry_pending`].
fn hold(
    pending: &mut std::collections::VecDeque<Pending>,
    stats: &mut SwitchStats,
    dst: IpAddr,
    frame: &[u8],
    flow: FlowId,
    now: std::time::Instant,
) -> Result<(), &'static str> {
    let same = pending.iter().filter(|p| p.dst == dst).count();
    if pending.len() >= PENDING_MAX || same >= PENDING_PER_DST {
        stats.tx_unresolved += 1;
        return Err("no_neighbour");
    }
    let mut f = frame.to_vec();
    let ethertype: u16 = if f[ETH] >> 4 == 6 { 0x86dd } else { 0x0800 };
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    pending.push_back(Pending {
        dst,
        frame: f,
        flow,
        since: now,
    });
    Ok(())
}

impl Switch {
    /// A flowswitch on `netif`, whose host addresses are `host_addrs`, finding each frame's
    /// destination MAC as `next_hop` says.
    pub fn new(netif: Box<dyn Netif>, host_addrs: Vec<IpAddr>, next_hop: NextHop) -> Self {
        Self {
            netif,
            host_addrs,
            next_hop,
            neighbours: Neighbours::default(),
            kernel: match next_hop {
                NextHop::Kernel(ifindex) => Some(KernelNeighbours::new(ifindex)),
                _ => None,
            },
            pending: std::collections::VecDeque::new(),
            conns: super::conntrack::Conns::default(),
            coalescer: Coalescer::default(),
            frame: vec![0; ETH + 65_535],
            seg_frame: vec![0; ETH + 65_535],
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

    /// The interface (for its wake-up fd).
    pub fn netif(&self) -> &dyn Netif {
        self.netif.as_ref()
    }

    /// The interface, to act on.
    pub fn netif_mut(&mut self) -> &mut dyn Netif {
        self.netif.as_mut()
    }

    /// Counters.
    pub fn stats(&self) -> &SwitchStats {
        &self.stats
    }

    /// Moves up to `budget` frames from the interface to their channels. Returns the frames
    /// handled and the channels that must be quarantined (their RX ring is corrupt).
    pub fn rx_pass(
        &mut self,
        table: &mut FlowTable,
        channels: &mut BTreeMap<ChannelId, Channel>,
        budget: usize,
    ) -> (usize, Vec<ChannelId>) {
        let Self {
            netif,
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
            ..
        } = self;
        touched.clear();
        let our_mac = netif.mac();
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let n = netif.recv(budget, &mut |frames| {
            // Parse the whole batch, look it up in one go (the misses overlap), then deliver.
            stats.rx_frames += frames.len() as u64;
            parsed.clear();
            keys.clear();
            for (j, frame) in frames.iter().enumerate() {
                if *next_hop == NextHop::Arp {
                    // Behind a TAP the nexus resolves its own neighbours: ARP, and IPv6
                    // neighbour discovery (ICMPv6 types 135 and 136).
                    let action = match frame.get(12..14) {
                        Some([0x08, 0x06]) => {
                            Some(("arp", neighbours.on_arp(frame, our_mac, host_addrs)))
                        }
                        Some([0x86, 0xdd])
                            if frame.get(20) == Some(&58)
                                && matches!(frame.get(54), Some(135 | 136)) =>
                        {
                            Some(("ndp", neighbours.on_ndp(frame, our_mac, host_addrs)))
                        }
                        _ => None,
                    };
                    if let Some((kind, action)) = action {
                        *stats.rx_drops.entry(kind).or_default() += 1;
                        if let ArpAction::Reply(r) = action {
                            replies.push(r);
                        }
                        continue;
                    }
                }
                match parse_frame_headers(frame) {
                    Ok(p) => {
                        keys.push(FlowKey {
                            proto: p.proto,
                            local: SocketAddr::from(p.dst),
                            remote: SocketAddr::from(p.src),
                        });
                        parsed.push((j, p.ip_offset, p.ip_len));
                    }
                    Err(d) => *stats.rx_drops.entry(d.name()).or_default() += 1,
                }
            }
            table.lookup_batch(keys, scratch, hits);
            for ((&(j, off, len), hit), key) in parsed.iter().zip(hits.iter()).zip(keys.iter()) {
                let Some(hit) = hit else {
                    *stats.rx_drops.entry(RxDrop::NoFlow.name()).or_default() += 1;
                    continue;
                };
                match channels.get_mut(&hit.channel) {
                    Some(c) if c.is_active() => {
                        let ip = &frames[j][off..off + len];
                        let p = Incoming {
                            ip,
                            proto: key.proto,
                            src: key.remote.ip(),
                            dst: key.local.ip(),
                        };
                        if let Err(d) = coalescer.deliver(c, &p) {
                            *stats.rx_drops.entry(d.name()).or_default() += 1;
                            continue;
                        }
                        if key.proto == super::Proto::Tcp {
                            // IPv4 options are refused, so the header is 20 or 40 bytes.
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
                    _ => *stats.rx_drops.entry("channel_gone").or_default() += 1,
                }
            }
            // Growing packets get their checksums before the rings are published.
            coalescer.finish(channels);
            stats.rx_coalesced = coalescer.stats.merged;
            stats.conntrack_evicted = conns.evicted();
        });
        for r in &replies {
            if netif.send(r).is_ok() {
                stats.tx_frames += 1;
            }
        }
        if !replies.is_empty() {
            netif.flush();
        }
        let mut broken = Vec::new();
        for id in touched.iter() {
            if let Some(c) = channels.get_mut(id)
                && c.flush_rx().is_err()
            {
                broken.push(*id);
            }
        }
        (n, broken)
    }

    /// Sends a reset to every peer of `channel`'s TCP connections (its app died or its channel
    /// was revoked): they learn at once, instead of waiting on a silent connection. Returns
    /// how many went.
    pub fn reset_connections(&mut self, channel: ChannelId) -> usize {
        let resets = self.conns.take_channel(channel);
        if resets.is_empty() {
            return 0;
        }
        let now = std::time::Instant::now();
        let src_mac = self.netif.mac();
        let mut sent = 0;
        for r in resets {
            let Some(pkt) = r.packet() else { continue };
            let Ok(mac) = hop_mac(
                self.next_hop,
                self.kernel.as_mut(),
                &self.neighbours,
                r.remote.ip(),
                now,
            ) else {
                continue;
            };
            let mut f = Vec::with_capacity(ETH + pkt.len());
            f.extend_from_slice(&mac);
            f.extend_from_slice(&src_mac);
            let ethertype: u16 = if r.remote.is_ipv6() { 0x86dd } else { 0x0800 };
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend_from_slice(&pkt);
            if self.netif.send(&f).is_ok() {
                self.stats.tx_frames += 1;
                self.stats.tx_resets += 1;
                sent += 1;
            }
        }
        self.netif.flush();
        sent
    }

    /// Whether packets wait for their next hop (the event loop must come back soon).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Sends the held packets whose next hop is now known; drops those that waited too long.
    /// Returns how many went.
    pub fn retry_pending(&mut self, table: &mut FlowTable) -> usize {
        if self.pending.is_empty() {
            return 0;
        }
        let now = std::time::Instant::now();
        let src_mac = self.netif.mac();
        let mut sent = 0;
        for _ in 0..self.pending.len() {
            let Some(mut p) = self.pending.pop_front() else {
                break;
            };
            let mac = hop_mac(
                self.next_hop,
                self.kernel.as_mut(),
                &self.neighbours,
                p.dst,
                now,
            )
            .ok();
            match mac {
                Some(mac) => {
                    p.frame[..6].copy_from_slice(&mac);
                    p.frame[6..12].copy_from_slice(&src_mac);
                    if self.netif.send(&p.frame).is_ok() {
                        self.stats.tx_frames += 1;
                        table.count(p.flow, true);
                        sent += 1;
                    } else {
                        self.stats.tx_netif_errors += 1;
                    }
                }
                None if now.saturating_duration_since(p.since) < PENDING_FOR => {
                    self.pending.push_back(p);
                }
                None => self.stats.tx_unresolved += 1,
            }
        }
        if sent > 0 {
            self.netif.flush();
        }
        sent
    }

    /// Pushes out every frame queued by the passes so far (one kick per service round).
    pub fn flush(&mut self) {
        self.netif.flush();
    }

    /// The backend's own counters.
    pub fn netif_counters(&self) -> Vec<(&'static str, u64)> {
        self.netif.counters()
    }

    /// Sends up to `budget` packets of one channel, each validated against its flows.
    pub fn tx_pass(
        &mut self,
        table: &mut FlowTable,
        channel: &mut Channel,
        budget: usize,
    ) -> Result<usize, crate::channel::Quarantine> {
        let id = channel.id;
        let offloads = channel.offloads;
        let Self {
            netif,
            host_addrs,
            next_hop,
            neighbours,
            kernel,
            pending,
            conns,
            frame,
            seg_frame,
            stats,
            ..
        } = self;
        let src_mac = netif.mac();
        let mtu = netif.mtu() as usize;
        let now = kernel.as_ref().map(|_| std::time::Instant::now());
        channel.drain_tx(budget, |pkt| {
            let len = pkt.len();
            if len == 0 || ETH + len > frame.len() {
                return Err("bad_len");
            }
            // (Read from the app's memory only to choose the path; what is sent is decided on
            // the nexus's copy.)
            let segmenting = offloads.tx_segment;
            let large = segmenting && len > mtu && TcpLayout::of(pkt).is_some();
            // Past the link's MTU only a TCP packet the nexus segments may go (IP fragments
            // from apps are refused too): the interface would refuse it, or the peer drop it.
            if len > mtu && !large {
                return Err("bad_len");
            }
            // Straight into the interface's own frame where it lends one (AF_XDP's UMEM),
            // else into the switch's scratch frame: either way the nexus's memory.
            let lent = if large {
                None
            } else {
                netif.tx_buffer().filter(|b| b.len() >= ETH + len)
            };
            let in_place = lent.is_some();
            let buf: &mut [u8] = match lent {
                Some(b) => b,
                None => &mut frame[..],
            };
            // Copy first: the app may still be writing its buffer. Of a large packet only the
            // headers: its payload goes from the app's buffer to the interface in one copy
            // (what an app changes there only spoils its own data; the checksums are computed
            // over what is sent).
            let copied = if large { len.min(MAX_HEADERS) } else { len };
            buf[ETH..ETH + copied].copy_from_slice(&pkt[..copied]);
            if segmenting
                && !large
                && let Some(t) = TcpLayout::of(&buf[ETH..ETH + len])
            {
                let max = segment::link_mss(mtu as u32, t.src.is_ipv4());
                segment::finish_whole(&mut buf[ETH..ETH + len], &t, max);
            }
            let hop = Hop {
                table,
                channel: id,
                host_addrs,
                next_hop: *next_hop,
                neighbours,
                kernel: kernel.as_mut(),
                pending,
                stats,
                src_mac,
                now,
                // A large packet cannot wait whole for its neighbour (it would go out
                // uncut); TCP sends it again.
                may_hold: !large,
            };
            let step = hop.prepare(buf, len)?;
            // What the app sends on a TCP connection tells where a reset must start.
            if let Step::Send(_, key) = &step
                && key.proto == super::Proto::Tcp
                && !conns.is_empty()
            {
                let iphl = if key.local.is_ipv4() { 20 } else { 40 };
                conns.on_tx(key.local, key.remote, &buf[ETH + iphl..ETH + len]);
            }
            match step {
                Step::Held => Ok(()),
                Step::HeldAsking(request) => {
                    if netif.send(&request).is_ok() {
                        stats.tx_frames += 1;
                    }
                    Ok(())
                }
                Step::Send(flow, key) if large => {
                    let peer_mss = conns.mss(key.local, key.remote);
                    let cut = send_large(
                        netif.as_mut(),
                        &mut frame[..ETH + len],
                        pkt,
                        seg_frame,
                        peer_mss,
                        mtu,
                    );
                    stats.tx_frames += cut.sent as u64;
                    stats.tx_segmented += 1;
                    table.count(flow, true);
                    match cut.error {
                        None => Ok(()),
                        Some(e) => {
                            if e == "netif" {
                                stats.tx_netif_errors += 1;
                            }
                            Err(e)
                        }
                    }
                }
                Step::Send(flow, _) => {
                    let sent = if in_place {
                        netif.commit(ETH + len)
                    } else {
                        netif.send(&frame[..ETH + len])
                    };
                    match sent {
                        Ok(()) => {
                            stats.tx_frames += 1;
                            table.count(flow, true);
                            Ok(())
                        }
                        Err(_) => {
                            stats.tx_netif_errors += 1;
                            Err("netif")
                        }
                    }
                }
            }
        })
    }
}

/// What cutting a large packet did.
struct Cut {
    sent: usize,
    error: Option<&'static str>,
}

/// Sends a validated large TCP packet as segments of the peer's MSS (bounded by the MTU): its
/// headers from `frame` (Ethernet header written), its payload from `pkt` (the app's packet,
/// in the app's buffer). Cut by the kernel where the interface can have it do so, else cut
/// here while copied into the interface's frames.
fn send_large(
    netif: &mut dyn Netif,
    frame: &mut [u8],
    pkt: &[u8],
    scratch: &mut [u8],
    peer_mss: Option<u16>,
    mtu: usize,
) -> Cut {
    let mut cut = Cut {
        sent: 0,
        error: None,
    };
    let Some(t) = TcpLayout::of(&frame[ETH..]) else {
        cut.error = Some("bad_header");
        return cut;
    };
    // The MSS excludes options; each segment repeats the packet's.
    let wire = segment::link_mss(mtu as u32, t.src.is_ipv4());
    let mss = usize::from(peer_mss.unwrap_or(wire).min(wire)).saturating_sub(t.hl - 20);
    if mss == 0 {
        cut.error = Some("bad_header");
        return cut;
    }
    let Some(payload) = pkt.get(t.l4 + t.hl..t.l4 + t.tcp_len) else {
        cut.error = Some("bad_len");
        return cut;
    };
    let headers = &mut frame[..ETH + t.l4 + t.hl];
    let gso = Gso {
        l4: (ETH + t.l4) as u16,
        headers: (ETH + t.l4 + t.hl) as u16,
        mss: mss as u16,
        v6: t.src.is_ipv6(),
    };
    segment::prepare_partial(&mut headers[ETH..], &t);
    match netif.send_gso(headers, payload, &gso) {
        Ok(true) => {
            cut.sent = t.payload_len().div_ceil(mss);
            return cut;
        }
        // Cut here (each segment's checksum is computed afresh).
        Ok(false) => {}
        Err(_) => {
            cut.error = Some("netif");
            return cut;
        }
    }
    let headers = &*headers;
    let ip = &headers[ETH..];
    for (k, r) in segment::cuts(&t, mss).enumerate() {
        let last = r.end == payload.len();
        let need = ETH + t.l4 + t.hl + r.len();
        let queued = match netif.tx_buffer().filter(|b| b.len() >= need) {
            Some(out) => {
                out[..ETH].copy_from_slice(&headers[..ETH]);
                match segment::write_segment(ip, payload, &t, k, r, last, &mut out[ETH..]) {
                    Some(n) => netif.commit(ETH + n),
                    None => {
                        cut.error = Some("bad_len");
                        return cut;
                    }
                }
            }
            None => {
                scratch[..ETH].copy_from_slice(&headers[..ETH]);
                match segment::write_segment(ip, payload, &t, k, r, last, &mut scratch[ETH..]) {
                    Some(n) => netif.send(&scratch[..ETH + n]),
                    None => {
                        cut.error = Some("bad_len");
                        return cut;
                    }
                }
            }
        };
        if queued.is_err() {
            // The rest is lost; TCP sends it again.
            cut.error = Some("netif");
            return cut;
        }
        cut.sent += 1;
    }
    cut
}

/// What to do with a validated packet.
enum Step {
    /// Ready in the buffer, Ethernet header and all.
    Send(FlowId, FlowKey),
    /// Held until its next hop is resolved.
    Held,
    /// Held; this request (ARP or neighbour solicitation) goes out to resolve it.
    HeldAsking(Vec<u8>),
}

/// Everything a packet's validation and next-hop resolution need but the interface.
struct Hop<'a> {
    table: &'a FlowTable,
    channel: ChannelId,
    host_addrs: &'a [IpAddr],
    next_hop: NextHop,
    neighbours: &'a Neighbours,
    kernel: Option<&'a mut KernelNeighbours>,
    pending: &'a mut std::collections::VecDeque<Pending>,
    stats: &'a mut SwitchStats,
    src_mac: [u8; 6],
    now: Option<std::time::Instant>,
    /// Whether the packet may wait for its neighbour (else it is dropped as `unresolved`).
    may_hold: bool,
}

impl Hop<'_> {
    /// Validates the IP packet at `frame[ETH..ETH + len]` (anti-spoofing) and writes its
    /// Ethernet header, or holds it while its next hop is resolved.
    fn prepare(self, frame: &mut [u8], len: usize) -> Result<Step, &'static str> {
        let (flow, key) = tx::validate(
            self.table,
            self.channel,
            &frame[ETH..ETH + len],
            self.host_addrs,
        )
        .map_err(|d| d.name())?;
        let (v6, dst) = (key.remote.is_ipv6(), key.remote.ip());
        let now = self.now.unwrap_or_else(std::time::Instant::now);
        let dst_mac = match hop_mac(self.next_hop, self.kernel, self.neighbours, dst, now) {
            Ok(mac) => mac,
            Err(NoHop::OtherInterface) => return Err("other_interface"),
            Err(NoHop::Unresolved) if !self.may_hold => return Err("unresolved"),
            Err(NoHop::Unresolved) => {
                hold(
                    self.pending,
                    self.stats,
                    dst,
                    &frame[..ETH + len],
                    flow,
                    now,
                )?;
                // Behind a TAP the nexus resolves its neighbours itself: ask.
                return Ok(match (self.next_hop, key.local.ip(), dst) {
                    (NextHop::Arp, IpAddr::V4(src), IpAddr::V4(d)) => {
                        Step::HeldAsking(Neighbours::request(self.src_mac, src, d))
                    }
                    (NextHop::Arp, IpAddr::V6(src), IpAddr::V6(d)) => {
                        Step::HeldAsking(Neighbours::solicit(self.src_mac, src, d))
                    }
                    _ => Step::Held,
                });
            }
        };
        frame[..6].copy_from_slice(&dst_mac);
        frame[6..12].copy_from_slice(&self.src_mac);
        let ethertype: u16 = if v6 { 0x86dd } else { 0x0800 };
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        Ok(Step::Send(flow, key))
    }
}
