//! What the nexus serves: every channel, every flow with its host-port reservation (and so the
//! XDP steering), and the datapath. The one owner that both the event loop (`daemon`) and the
//! control path (`control`, a message handler) act on, so that neither imports the other's
//! internals and the flow table, the port reservations and the steering never disagree.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use netchannel_shm::control::{ChannelId, ChannelStatus, NexusStatus};
use rustix::event::epoll;

use crate::channel::Channel;
use crate::config::Config;
use crate::datapath::Datapath;
use crate::flowswitch::FlowTable;
use crate::netns::HostPorts;

/// Most bytes of channel records in one status reply (a reply holds at most
/// [`netchannel_shm::control::MAX_REPLY`]; the rest is the summary).
const STATUS_PAGE_BYTES: usize = 128 * 1024;

/// epoll tokens: the kind in the top byte, an id below.
pub(crate) mod token {
    pub(crate) const LISTENER: u64 = 0;
    pub(crate) const SIGNAL: u64 = 1;
    pub(crate) const NETIF: u64 = 2;
    /// The epoll set of the channels' doorbells, nested in the loop's.
    pub(crate) const BELLS: u64 = 3;
    /// The netlink socket of the datapath's next hops.
    pub(crate) const NETLINK: u64 = 4;
    pub(crate) const CLIENT: u64 = 1 << 56;
    pub(crate) const CHANNEL: u64 = 2 << 56;
    pub(crate) const ID_MASK: u64 = (1 << 56) - 1;
}

/// Every channel, flow and port reservation of the nexus, and its datapath.
#[derive(Debug)]
pub struct Registry {
    pub(crate) config: Config,
    /// The event loop's epoll set (control clients are registered in it).
    pub(crate) epoll: OwnedFd,
    /// The channels' doorbells, in an epoll set of their own nested in `epoll`: while the loop
    /// polls, a flood of rings is one ready entry there, looked at only before it sleeps (an
    /// app cannot make a polling nexus read its doorbell).
    pub(crate) bells: OwnedFd,
    pub(crate) channels: BTreeMap<ChannelId, Channel>,
    /// The channels served on every pass of the loop.
    pub(crate) active: BTreeSet<ChannelId>,
    /// The channels with no traffic for `park_after_us`: not looked at on each pass, armed so
    /// that their doorbell rings for their next packet (see [`Registry::unpark`]). A defunct
    /// channel is in neither set.
    parked: BTreeSet<ChannelId>,
    next_id: u64,
    pub(crate) started: Instant,
    /// Every flow of every channel.
    pub(crate) flows: FlowTable,
    /// Host-port reservations, shared by the flows of one channel on one (proto, address,
    /// port) and released with the last of them.
    pub(crate) host_ports: HostPorts,
    /// The flowswitch of the interface and its driver, if the nexus serves one (else
    /// channels reflect).
    pub(crate) datapath: Option<Datapath>,
    /// The interface failed for good and is no longer watched.
    pub(crate) netif_failed: bool,
    /// The channel audited last (audits go round-robin, a budget per housekeeping pass).
    audit_cursor: ChannelId,
}

impl Registry {
    /// Nothing served yet.
    pub(crate) fn new(config: Config, epoll: OwnedFd, bells: OwnedFd, max_flows: usize) -> Self {
        Self {
            config,
            epoll,
            bells,
            channels: BTreeMap::new(),
            active: BTreeSet::new(),
            parked: BTreeSet::new(),
            next_id: 1,
            started: Instant::now(),
            flows: FlowTable::new(max_flows),
            host_ports: HostPorts::default(),
            datapath: None,
            netif_failed: false,
            audit_cursor: 0,
        }
    }

    /// Stops waking for a channel that is no longer served (defunct): its app may ring on,
    /// and nothing it rings for is looked at.
    pub(crate) fn unwatch_channel(&mut self, id: ChannelId) {
        self.active.remove(&id);
        self.parked.remove(&id);
        if let Some(c) = self.channels.get(&id) {
            let _ = epoll::delete(&self.bells, c.endpoint().bell_fd());
        }
    }

    /// Registers a channel's doorbell in the epoll set and starts serving it.
    pub(crate) fn add_channel(&mut self, ch: Channel) -> Result<(), rustix::io::Errno> {
        epoll::add(
            &self.bells,
            ch.endpoint().bell_fd(),
            epoll::EventData::new_u64(token::CHANNEL | ch.id),
            epoll::EventFlags::IN,
        )?;
        self.active.insert(ch.id);
        self.channels.insert(ch.id, ch);
        Ok(())
    }

    /// Whether any channel is parked (its doorbell must then be looked at while polling).
    pub(crate) fn any_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// Parks every served channel that has had no traffic for `after` and has no work now.
    pub(crate) fn park_quiet(&mut self, after: Duration, now: Instant) {
        if after.is_zero() {
            return;
        }
        let quiet: Vec<ChannelId> = (self.active.iter())
            .filter(|id| {
                self.channels
                    .get(id)
                    .is_some_and(|c| c.quiet_for(after, now))
            })
            .copied()
            .collect();
        for id in quiet {
            if self.channels.get_mut(&id).is_some_and(Channel::park) {
                self.active.remove(&id);
                self.parked.insert(id);
                tracing::trace!(channel = id, "quiet channel parked");
            }
        }
    }

    /// Serves a parked channel on every pass again (its doorbell rang or a packet came for it);
    /// nothing if it is not parked. True if it was.
    pub(crate) fn unpark(&mut self, id: ChannelId, now: Instant) -> bool {
        if !self.parked.remove(&id) {
            return false;
        }
        if let Some(c) = self.channels.get_mut(&id) {
            c.unpark(now);
        }
        self.active.insert(id);
        true
    }

    /// Gives up every flow of a channel and its host-port reservations.
    pub(crate) fn release_flows(&mut self, channel: ChannelId) {
        // The app's TCP peers learn of its end at once.
        if let Some(dp) = self.datapath.as_mut() {
            dp.reset_connections(channel);
        }
        for flow in self.flows.remove_channel(channel) {
            self.host_ports.release(flow);
        }
    }

    /// Removes a channel: its flows are released, every buffer comes home, then its memory is
    /// unmapped. Returns whether its ledger was whole (`None`: no such channel).
    pub(crate) fn remove_channel(&mut self, id: ChannelId) -> Option<Result<(), String>> {
        self.release_flows(id);
        let mut c = self.channels.remove(&id)?;
        self.active.remove(&id);
        self.parked.remove(&id);
        let _ = epoll::delete(&self.bells, c.endpoint().bell_fd());
        let r = c.reclaim();
        if let Err(e) = &r {
            tracing::error!(channel = id, error = %e, "ledger not whole after reclaiming a channel");
        }
        Some(r)
    }

    /// A fresh id for a client or a channel.
    pub(crate) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Audits channels' ledgers round-robin from where the last pass stopped, until `budget`
    /// buffers are audited or every channel was.
    pub(crate) fn audit_some(&mut self, budget: u64) {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut spent = 0u64;
        for _ in 0..self.channels.len() {
            if spent >= budget {
                break;
            }
            let next = self
                .channels
                .range_mut((Excluded(self.audit_cursor), Unbounded))
                .next()
                .map(|(id, _)| *id)
                .or_else(|| self.channels.keys().next().copied());
            let Some(id) = next else { break };
            if let Some(c) = self.channels.get_mut(&id) {
                spent += c.audit_now();
            }
            self.audit_cursor = id;
        }
    }

    /// The nexus's state, as `netchannel status` shows it (but for the control path's own
    /// counters): the summary and the first page of channels when `after` is `None`, else the
    /// channels whose ids follow `after`. Costs the page's counters, never an audit.
    pub(crate) fn status(
        &mut self,
        only_uid: Option<u32>,
        after: Option<ChannelId>,
    ) -> NexusStatus {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        let (mut channels, mut bytes, mut next_after) = (Vec::new(), 0usize, None);
        for c in self
            .channels
            .range_mut((from, Unbounded))
            .map(|(_, c)| c)
            .filter(|c| only_uid.is_none_or(|u| c.cred.uid == u))
        {
            let mut st = c.status();
            st.parked = self.parked.contains(&st.id);
            // An upper bound of the record's JSON (its fixed fields take under 500 bytes).
            bytes += 600 + st.state.len() + st.audit.len() + 64 * st.drops.len();
            if bytes > STATUS_PAGE_BYTES && !channels.is_empty() {
                next_after = channels.last().map(|c: &ChannelStatus| c.id);
                break;
            }
            channels.push(st);
        }
        if after.is_some() {
            return NexusStatus {
                pid: std::process::id(),
                channels,
                next_after,
                ..NexusStatus::default()
            };
        }
        NexusStatus {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            // The control path's own: filled in by `Control::status`.
            clients: 0,
            control_errors: Vec::new(),
            fds: std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count())
                .unwrap_or(0),
            rss_bytes: rss_bytes(),
            interface: self
                .datapath
                .as_ref()
                .map(|sw| {
                    let st = sw.switch().stats();
                    let mut v = vec![
                        ("rx_frames".to_owned(), st.rx_frames),
                        ("rx_switched".to_owned(), st.rx_switched),
                        ("tx_frames".to_owned(), st.tx_frames),
                        ("tx_netif_errors".to_owned(), st.tx_netif_errors),
                        ("tx_unresolved".to_owned(), st.tx_unresolved),
                        ("tx_resets".to_owned(), st.tx_resets),
                        ("rx_coalesced".to_owned(), st.rx_coalesced),
                        ("tx_segmented".to_owned(), st.tx_segmented),
                        ("conntrack_evicted".to_owned(), st.conntrack_evicted),
                        ("rx_fragments".to_owned(), st.rx_fragments),
                        ("rx_reassembled".to_owned(), st.rx_reassembled),
                        ("reassembly_bytes".to_owned(), st.reassembly_bytes),
                        ("rx_options_stripped".to_owned(), st.rx_options_stripped),
                        ("tx_fragmented".to_owned(), st.tx_fragmented),
                        ("interface_failed".to_owned(), u64::from(self.netif_failed)),
                    ];
                    v.extend(st.drops.nonzero().map(|(r, n)| (r.name().to_owned(), n)));
                    v.extend(
                        sw.netif_counters()
                            .into_iter()
                            .map(|(k, n)| (k.to_owned(), n)),
                    );
                    v
                })
                .unwrap_or_default(),
            channels,
            next_after,
        }
    }
}

/// Resident set size of this process.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * rustix::param::page_size() as u64)
}
