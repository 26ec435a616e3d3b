//! The driver of a flowswitch: it owns what the core may not touch (the interface backend,
//! the netlink socket, the clock, the channels' memory) and carries out what the core decides.
//!
//! * RX: the interface lends a batch of frames, the core classifies and delivers them into the
//!   channels' ports, and the driver publishes each touched channel's RX ring.
//! * TX: each packet an app sends is copied out of its memory into the interface's own frame
//!   (AF_XDP's UMEM) or the driver's, *before* the core inspects it; the core validates it and
//!   writes its Ethernet header; the driver sends it, cut into segments where the app asked the
//!   nexus to (segmentation offload).
//! * Next hops: the core's questions go to the kernel over netlink without waiting
//!   ([`crate::netns::neighbours`]), and the answers and the kernel's neighbour changes come back
//!   to the core; frames of the nexus's own (ARP, NDP, resets) go out here.

use std::collections::BTreeMap;
use std::time::Instant;

use netchannel_shm::control::ChannelId;

use crate::channel::{Channel, Quarantine};
use crate::config::{Backend, InterfaceConfig};
use crate::flowswitch::fragment;
use crate::flowswitch::neighbour::Hop;
use crate::flowswitch::segment::{self, TcpLayout};
use crate::flowswitch::switch::{ETH, Ready, TxStep};
use crate::flowswitch::{DropReason, FlowTable, NextHop, Switch};
use crate::netif::Netif;
use crate::netif::packet::Gso;
use crate::netns::neighbours::{Learner, Resolver};

/// The most header bytes of a TCP packet the nexus segments: an IPv4 header with the most
/// options (60 bytes; an IPv6 packet it segments has no extension headers, 40) and a TCP
/// header with the most options (60). Only these are copied before validation: a layout that
/// claimed more would reach past the copy, into what the scratch frame held before.
const MAX_HEADERS: usize = 60 + 60;

/// The kernel's answers go to the core.
impl Learner for Switch {
    fn on_route(&mut self, dst: std::net::IpAddr, hop: Hop, now: Instant) {
        Self::on_route(self, dst, hop, now);
    }
    fn on_neighbour(&mut self, ip: std::net::IpAddr, mac: Option<[u8; 6]>) {
        Self::on_neighbour(self, ip, mac);
    }
}

/// A flowswitch at work on an interface.
#[derive(Debug)]
pub struct Datapath {
    switch: Switch,
    netif: Box<dyn Netif>,
    /// Asks the kernel for routes and neighbours (on an interface shared with it).
    resolver: Option<Resolver>,
    /// Where a packet is copied when the interface lends no frame.
    frame: Vec<u8>,
    /// Where a segment is built when the interface lends no frame.
    seg_frame: Vec<u8>,
    ready: Vec<Ready>,
    /// The netlink socket was reported readable (a change of the neighbour table).
    resolver_readable: bool,
    /// When the host's multicast groups were last read (on a shared interface).
    groups_read: Option<Instant>,
}

/// How often the host's multicast groups on a shared interface are read again.
const GROUPS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Datapath {
    /// Drives `switch` on `netif`, asking the kernel over `resolver` (on a shared interface).
    pub fn new(switch: Switch, netif: Box<dyn Netif>, resolver: Option<Resolver>) -> Self {
        Self {
            switch,
            netif,
            resolver,
            frame: vec![0; ETH + 65_535],
            seg_frame: vec![0; ETH + 65_535],
            ready: Vec::new(),
            resolver_readable: false,
            groups_read: None,
        }
    }

    /// A flowswitch serving `host_addrs` on `netif`, finding next hops as `next_hop` says
    /// (asking the kernel over a netlink socket of its own for [`NextHop::Kernel`]).
    pub fn on(
        netif: Box<dyn Netif>,
        host_addrs: Vec<std::net::IpAddr>,
        next_hop: NextHop,
    ) -> std::io::Result<Self> {
        let resolver = match next_hop {
            NextHop::Kernel(ifindex) => Some(Resolver::open(ifindex)?),
            _ => None,
        };
        let switch = Switch::new(host_addrs, next_hop, netif.mac(), netif.mtu());
        let mut dp = Self::new(switch, netif, resolver);
        dp.housekeeping(Instant::now());
        Ok(dp)
    }

    /// The core, to configure it.
    pub fn switch_mut(&mut self) -> &mut Switch {
        &mut self.switch
    }

    /// The core.
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// The interface (for its wake-up fd).
    pub fn netif(&self) -> &dyn Netif {
        self.netif.as_ref()
    }

    /// The interface, to act on.
    pub fn netif_mut(&mut self) -> &mut dyn Netif {
        self.netif.as_mut()
    }

    /// The netlink socket's fd, readable when the kernel has answered or announced a change.
    pub fn resolver_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.resolver.as_ref().map(Resolver::fd)
    }

    /// The backend's own counters.
    pub fn netif_counters(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.netif.counters();
        if let Some(r) = &self.resolver {
            // Questions the kernel never got (a full socket buffer; asked again when next
            // needed), and answers or changes lost or unreadable (routes are asked again
            // within seconds).
            v.push(("netlink_unsent", r.unsent));
            v.push(("netlink_errors", r.errors));
        }
        v
    }

    /// Whether packets wait for their next hop (the event loop must come back soon).
    pub fn has_pending(&self) -> bool {
        self.switch.has_pending()
    }

    /// Sends one frame of the nexus's own.
    fn send_own(&mut self, frame: &[u8]) -> bool {
        let ok = self.netif.send(frame).is_ok();
        let st = self.switch.stats_mut();
        if ok {
            st.tx_frames += 1;
        } else {
            st.note(DropReason::TxNetifOwn);
        }
        ok
    }

    /// Carries out what the core has asked since the last time: its own frames go out, its
    /// questions go to the kernel, and what the kernel said comes back to it.
    pub fn exchange(&mut self, now: Instant) {
        let mut sent = false;
        while let Some(f) = self.switch.poll_transmit() {
            sent |= self.send_own(&f);
        }
        if sent {
            self.netif.flush();
        }
        let Some(r) = self.resolver.as_mut() else {
            return;
        };
        while let Some(q) = self.switch.poll_query() {
            r.ask(q);
        }
        // The socket is read while answers are awaited, or when the event loop saw it readable
        // (a change of the neighbour table): no system call on a pass with nothing to read.
        if r.awaiting() || std::mem::take(&mut self.resolver_readable) {
            r.poll(&mut self.switch, now);
        }
    }

    /// Called about every 100 ms: the backend's checks, and (every second, on an interface
    /// shared with the kernel) the multicast groups the host has joined, which frames to the
    /// host may be addressed to.
    pub fn housekeeping(&mut self, now: Instant) {
        self.netif.housekeeping();
        let NextHop::Kernel(ifindex) = self.switch.next_hop() else {
            return;
        };
        if self
            .groups_read
            .is_some_and(|t| now.saturating_duration_since(t) < GROUPS_EVERY)
        {
            return;
        }
        self.groups_read = Some(now);
        match crate::netns::multicast_groups(ifindex) {
            Ok(g) => self.switch.set_groups(g),
            Err(e) => tracing::debug!(error = %e, "reading the host's multicast groups"),
        }
    }

    /// The event loop saw the netlink socket readable: the next [`Datapath::exchange`] reads it.
    pub fn resolver_readable(&mut self) {
        self.resolver_readable = true;
    }

    /// Moves up to `budget` frames from the interface to their channels. Returns the frames
    /// handled and the channels that must be quarantined (their RX ring is corrupt).
    pub fn rx_pass(
        &mut self,
        table: &mut FlowTable,
        channels: &mut BTreeMap<ChannelId, Channel>,
        budget: usize,
    ) -> (usize, Vec<ChannelId>) {
        let Self { switch, netif, .. } = self;
        switch.begin_rx();
        let n = netif.recv(budget, &mut |frames| {
            // One clock read per batch, for reassembly's timeouts.
            switch.rx_batch(frames, table, channels, Instant::now())
        });
        let mut broken = Vec::new();
        for id in switch.touched() {
            if let Some(c) = channels.get_mut(id)
                && c.flush_rx().is_err()
            {
                broken.push(*id);
            }
        }
        (n, broken)
    }

    /// Sends a reset to every peer of `channel`'s TCP connections (its app died or its channel
    /// was revoked). Returns how many went.
    pub fn reset_connections(&mut self, channel: ChannelId) -> usize {
        let frames = self.switch.resets(channel, Instant::now());
        if frames.is_empty() {
            return 0;
        }
        let mut sent = 0;
        for f in &frames {
            if self.send_own(f) {
                self.switch.stats_mut().tx_resets += 1;
                sent += 1;
            }
        }
        self.netif.flush();
        sent
    }

    /// Sends the held packets whose next hop is now known (the core drops those that waited
    /// too long). Returns how many went.
    pub fn retry_pending(
        &mut self,
        table: &mut FlowTable,
        channels: &mut BTreeMap<ChannelId, Channel>,
    ) -> usize {
        if !self.switch.has_pending() {
            return 0;
        }
        let now = Instant::now();
        let mut ready = std::mem::take(&mut self.ready);
        self.switch.poll_pending(now, channels, &mut ready);
        let mut sent = 0;
        for r in ready.drain(..) {
            if self.netif.send(&r.frame).is_ok() {
                self.switch.stats_mut().tx_frames += 1;
                table.count(r.flow, true);
                sent += 1;
            } else {
                self.switch.stats_mut().note(DropReason::TxNetif);
                if let Some(c) = channels.get_mut(&r.channel) {
                    c.count_drop(DropReason::TxNetif);
                }
            }
        }
        self.ready = ready;
        if sent > 0 {
            self.netif.flush();
        }
        sent
    }

    /// Pushes out every frame queued by the passes so far (one kick per service round).
    pub fn flush(&mut self) {
        self.netif.flush();
    }

    /// Sends up to `budget` packets of one channel, each validated against its flows; `now`
    /// (read once per pass by the caller) times the next hops of those that wait for one.
    pub fn tx_pass(
        &mut self,
        table: &mut FlowTable,
        channel: &mut Channel,
        budget: usize,
        now: Instant,
    ) -> Result<usize, Quarantine> {
        let id = channel.id;
        let segmenting = channel.offloads.tx_segment;
        // In bytes too: 64 packets of 64 KiB were 2,900 frames to cut and copy in one pass,
        // while the interface's RX ring, read 256 frames a pass, overflowed (`xsk_rx_dropped`:
        // the ACKs of a server's peers, whose loss smoltcp takes a second to recover from).
        let buf_size = channel.endpoint().pool().buf_size() as usize;
        let budget = budget.min((TX_BYTES_PER_PASS / buf_size.max(1)).max(1));
        let Self {
            switch,
            netif,
            frame,
            seg_frame,
            ..
        } = self;
        let mtu = switch.mtu();
        channel.drain_tx(budget, |pkt| {
            let r = tx_one(
                switch,
                netif.as_mut(),
                table,
                id,
                pkt,
                segmenting,
                mtu,
                now,
                frame,
                seg_frame,
            );
            if let Err(reason) = r {
                switch.stats_mut().note(reason);
            }
            r
        })
    }
}

/// Most bytes of packets taken from one channel's TX ring per pass (with large buffers, fewer
/// packets than the configured batch).
const TX_BYTES_PER_PASS: usize = 512 * 1024;

/// Copies, validates and sends (or holds) one packet of channel `id`.
#[allow(clippy::too_many_arguments)]
fn tx_one(
    switch: &mut Switch,
    netif: &mut dyn Netif,
    table: &mut FlowTable,
    id: ChannelId,
    pkt: &[u8],
    segmenting: bool,
    mtu: usize,
    now: Instant,
    frame: &mut [u8],
    seg_frame: &mut [u8],
) -> Result<(), DropReason> {
    let len = pkt.len();
    if len == 0 || ETH + len > frame.len() {
        return Err(DropReason::TxBadLen);
    }
    // (Read from the app's memory only to choose the path; what is sent is decided on the
    // nexus's copy.)
    let large = segmenting && len > mtu && TcpLayout::of(pkt).is_some();
    // Past the link's MTU, a TCP packet the nexus segments is cut into segments, anything
    // else into IP fragments (a datagram larger than the MTU, as the kernel fragments it).
    let fragmenting = len > mtu && !large;
    // Straight into the interface's own frame where it lends one (AF_XDP's UMEM), else into
    // the driver's scratch frame: either way the nexus's memory.
    let lent = if large || fragmenting {
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
    // headers: its payload goes from the app's buffer to the interface in one copy (what an
    // app changes there only spoils its own data; the checksums are computed over what is
    // sent).
    let copied = if large { len.min(MAX_HEADERS) } else { len };
    buf[ETH..ETH + copied].copy_from_slice(&pkt[..copied]);
    if segmenting
        && !large
        && let Some(t) = TcpLayout::of(&buf[ETH..ETH + len])
    {
        let max = segment::link_mss(mtu as u32, t.src.is_ipv4());
        segment::finish_whole(&mut buf[ETH..ETH + len], &t, max);
    }
    // A packet to be cut does not wait for its next hop (a datagram held whole would hold
    // up to 64 KiB of the nexus's memory; UDP sends again, as TCP does).
    let step = switch.tx_prepare(table, id, buf, len, !large && !fragmenting, now)?;
    let (flow, key) = match step {
        TxStep::Held => return Ok(()),
        TxStep::Send(flow, key) => (flow, key),
    };
    if large {
        let peer_mss = switch.peer_mss(&key);
        let cut = send_large(
            netif,
            &mut frame[..ETH + len],
            pkt,
            seg_frame,
            peer_mss,
            mtu,
        );
        let st = switch.stats_mut();
        st.tx_frames += cut.sent as u64;
        st.tx_segmented += 1;
        table.count(flow, true);
        return cut.error.map_or(Ok(()), Err);
    }
    if fragmenting {
        let frag_id = switch.next_frag_id(key.remote.ip());
        let cut = send_fragments(netif, &frame[..ETH + len], mtu, frag_id, seg_frame);
        let st = switch.stats_mut();
        st.tx_frames += cut.sent as u64;
        st.tx_fragmented += u64::from(cut.sent > 1);
        table.count(flow, true);
        return cut.error.map_or(Ok(()), Err);
    }
    let sent = if in_place {
        netif.commit(ETH + len)
    } else {
        netif.send(&frame[..ETH + len])
    };
    match sent {
        Ok(()) => {
            switch.stats_mut().tx_frames += 1;
            table.count(flow, true);
            Ok(())
        }
        Err(_) => Err(DropReason::TxNetif),
    }
}

/// What cutting a large packet did.
struct Cut {
    sent: usize,
    error: Option<DropReason>,
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
    let Some(t) = TcpLayout::of(&frame[ETH..]).filter(|t| t.l4 + t.hl <= MAX_HEADERS) else {
        cut.error = Some(DropReason::TxBadHeader);
        return cut;
    };
    // The MSS excludes options; each segment repeats the packet's.
    let wire = segment::link_mss(mtu as u32, t.src.is_ipv4());
    let mss = usize::from(peer_mss.unwrap_or(wire).min(wire)).saturating_sub(t.hl - 20);
    if mss == 0 {
        cut.error = Some(DropReason::TxBadHeader);
        return cut;
    }
    let Some(payload) = pkt.get(t.l4 + t.hl..t.l4 + t.tcp_len) else {
        cut.error = Some(DropReason::TxBadLen);
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
            cut.error = Some(DropReason::TxNetif);
            return cut;
        }
    }
    let headers = &*headers;
    let ip = &headers[ETH..];
    for (k, r) in segment::cuts(&t, mss).enumerate() {
        let last = r.end == payload.len();
        let need = ETH + t.l4 + t.hl + r.len();
        let queued = emit(netif, scratch, &headers[..ETH], need, |out| {
            segment::write_segment(ip, payload, &t, k, r, last, out)
        });
        if let Err(e) = queued {
            // The rest is lost; TCP sends it again.
            cut.error = Some(e);
            return cut;
        }
        cut.sent += 1;
    }
    cut
}

/// Builds one frame (Ethernet header `eth`, then what `build` writes after it, at most
/// `need` bytes in all) straight into a frame the interface lends, or in `scratch`, and queues
/// it: `tx_bad_len` if `build` could not write it, `tx_netif` if the interface refused it.
fn emit(
    netif: &mut dyn Netif,
    scratch: &mut [u8],
    eth: &[u8],
    need: usize,
    build: impl FnOnce(&mut [u8]) -> Option<usize>,
) -> Result<(), DropReason> {
    let queued = match netif.tx_buffer().filter(|b| b.len() >= need) {
        Some(out) => {
            out[..ETH].copy_from_slice(eth);
            let n = build(&mut out[ETH..]).ok_or(DropReason::TxBadLen)?;
            netif.commit(ETH + n)
        }
        None => {
            scratch[..ETH].copy_from_slice(eth);
            let n = build(&mut scratch[ETH..]).ok_or(DropReason::TxBadLen)?;
            netif.send(&scratch[..ETH + n])
        }
    };
    queued.map_err(|_| DropReason::TxNetif)
}

/// Sends a validated packet whose buffer is larger than the MTU (`frame`: Ethernet header and
/// IP packet) as IP fragments of at most `mtu` bytes identified by `id`, each written straight
/// into a frame the interface lends, or through `scratch`; or whole, without what follows its
/// IP length, if that fits.
fn send_fragments(
    netif: &mut dyn Netif,
    frame: &[u8],
    mtu: usize,
    id: u32,
    scratch: &mut [u8],
) -> Cut {
    let mut cut = Cut {
        sent: 0,
        error: None,
    };
    let (eth, ip) = frame.split_at(ETH.min(frame.len()));
    let Ok(plan) = fragment::plan(ip, mtu) else {
        cut.error = Some(DropReason::TxBadLen);
        return cut;
    };
    if plan.packet_len() <= mtu {
        match netif.send(&frame[..ETH + plan.packet_len()]) {
            Ok(()) => cut.sent = 1,
            Err(_) => cut.error = Some(DropReason::TxNetif),
        }
        return cut;
    }
    for k in 0..plan.count() {
        if let Err(e) = emit(netif, scratch, eth, ETH + mtu, |out| {
            plan.write(ip, k, id, out)
        }) {
            // The datagram is lost (as one whose fragment the wire drops).
            cut.error = Some(e);
            return cut;
        }
        cut.sent += 1;
    }
    cut
}

/// Why the configured interface could not be served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// AF_XDP.
    #[error(transparent)]
    AfXdp(#[from] crate::netif::afxdp::AfXdpError),
    /// TAP.
    #[error(transparent)]
    Tap(#[from] crate::netif::tap::TapError),
    /// The interface's addresses could not be read.
    #[error("reading the addresses of {ifname} over netlink: {source}")]
    Addresses {
        /// The interface.
        ifname: String,
        /// The error.
        source: std::io::Error,
    },
    /// Nothing to serve on.
    #[error(
        "{0} has no IP address: add one (`ip addr add ... dev {0}`) or, for TAP, set interface.addresses"
    )]
    NoAddress(String),
    /// The fault settings are out of range.
    #[error("{0}")]
    Faults(String),
    /// No netlink socket to ask the kernel for next hops.
    #[error("opening a netlink socket for the next hops of {ifname}: {source}")]
    Netlink {
        /// The interface.
        ifname: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Opens the configured interface and builds its flowswitch and the driver that runs it.
pub fn open(cfg: &InterfaceConfig) -> Result<Datapath, OpenError> {
    open_impaired(cfg, None)
}

/// Like [`open`], with the interface impaired by `faults` (see [`faults`]).
pub fn open_impaired(
    cfg: &InterfaceConfig,
    faults: Option<crate::netif::faults::FaultConfig>,
) -> Result<Datapath, OpenError> {
    if let Some(f) = &faults {
        f.validate().map_err(OpenError::Faults)?;
    }
    let (netif, addrs, next_hop): (Box<dyn Netif>, _, _) = match cfg.backend {
        Backend::Afxdp => {
            let xsk = crate::netif::afxdp::AfXdp::open(
                &cfg.name,
                crate::netif::afxdp::AfXdpOptions {
                    mode: cfg.xdp_mode,
                    force_copy: false,
                },
            )?;
            let ifindex = xsk.ifindex();
            let addrs = crate::netns::netlink::Rtnl::open()
                .and_then(|mut nl| nl.addresses(ifindex))
                .map_err(|source| OpenError::Addresses {
                    ifname: cfg.name.clone(),
                    source,
                })?;
            if addrs.is_empty() {
                return Err(OpenError::NoAddress(cfg.name.clone()));
            }
            tracing::info!(ifname = %cfg.name, ?addrs, "serving the interface's addresses");
            (Box::new(xsk), addrs, NextHop::Kernel(ifindex))
        }
        Backend::Tap => {
            if cfg.addresses.is_empty() {
                return Err(OpenError::NoAddress(cfg.name.clone()));
            }
            // A locally administered MAC derived from the pid: unique enough on one host.
            let pid = std::process::id().to_be_bytes();
            let mac = [0x02, 0x4e, pid[0], pid[1], pid[2], pid[3]];
            let tap = crate::netif::tap::Tap::create(&cfg.name, mac)?;
            (Box::new(tap), cfg.addresses.clone(), NextHop::Arp)
        }
    };
    let netif = match faults {
        Some(f) => {
            tracing::warn!(ifname = %cfg.name, faults = ?f, "impairing the interface on purpose");
            Box::new(crate::netif::faults::Faulty::new(netif, f))
        }
        None => netif,
    };
    Datapath::on(netif, addrs, next_hop).map_err(|source| OpenError::Netlink {
        ifname: cfg.name.clone(),
        source,
    })
}
