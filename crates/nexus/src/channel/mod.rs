//! The channel server: one app's channel as the nexus holds it. The nexus is the server end of
//! the channel's rings, the home of every buffer of its pool, and the single owner of the
//! ledger. With an interface, the flowswitch delivers into the channel through its
//! [`Port`](crate::flowswitch::Port) and takes what the app sends with [`Channel::drain_tx`];
//! without one (a loopback nexus), the channel is a **reflector**: each packet the app sends is
//! copied into a fresh buffer of the nexus and delivered back on the same channel's RX ring.

use std::time::{Duration, Instant};

use crate::flowswitch::{DropCounters, DropReason, Port};
use netchannel_shm::control::{ChannelId, ChannelStatus, Offloads};
use netchannel_shm::{DefunctReason, Endpoint, Interest, Packet};

use crate::config::ChannelConfig;
use crate::cred::Cred;

/// Why a channel stopped being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quarantine {
    /// The app corrupted a ring index.
    RingCorrupt,
    /// Too many protocol violations.
    Strikes,
}

/// One channel in service (or revoked and waiting for its app to close it).
#[derive(Debug)]
pub struct Channel {
    /// Nexus-wide id.
    pub id: ChannelId,
    /// Control client that opened it.
    pub client: u64,
    /// Owner's credentials.
    pub cred: Cred,
    ep: Endpoint,
    defunct: Option<DefunctReason>,
    /// Nexus-side drops of packets for and from this channel (the app's violations of the
    /// ring protocol are counted by its endpoint).
    drops: DropCounters,
    tx: Vec<Packet>,
    rx: Vec<Packet>,
    audit: String,
    /// Current ALLOC-ring stock (self-tuned between `alloc_min` and `alloc_max`).
    alloc_target: u32,
    /// The configured stock bounds, in buffers of this pool's size (see [`alloc_bounds`]).
    alloc_min: u32,
    alloc_max: u32,
    last_active: Instant,
    trimmed: bool,
    /// Packets the app sent from an address the host does not have or from another app's
    /// flow (not those of flows it no longer has: a closed socket's stragglers are an honest
    /// app's too); and how many of them the last housekeeping saw (only those since are
    /// strikes).
    forged: u64,
    forged_before: u64,
    /// The offloads granted at open (the flowswitch applies them).
    pub offloads: Offloads,
}

/// The ALLOC stock's bounds for a pool of `pool` buffers of `buf_size` bytes. The configured
/// ones count 2 KiB buffers, so a pool of larger buffers keeps the same bytes on its ring in
/// fewer of them (16 KiB buffers: 4 to 64, 64 KiB to 1 MiB, not 512 KiB to 8 MiB). And the
/// stock never exceeds a quarter of the pool (at least one buffer): what sits on the ALLOC ring
/// is the app's, and a stock as large as the pool left the nexus no buffer to deliver into
/// (found as a bulk transfer to an app stalled for good, `rx_no_buf`, with all 512 buffers of
/// a 64 KiB pool on the ring).
fn alloc_bounds(cfg: &ChannelConfig, buf_size: u32, pool: u32) -> (u32, u32) {
    let scale = (buf_size / 2048).max(1);
    let cap = (pool / 4).max(1);
    let max = (cfg.alloc_ring_max / scale).clamp(1, cap);
    let min = (cfg.alloc_ring_min / scale).clamp(1, max);
    (min, max)
}

impl Channel {
    /// Wraps an endpoint (server role, home of every segment) that has just been set up.
    pub fn new(id: ChannelId, client: u64, cred: Cred, ep: Endpoint, cfg: &ChannelConfig) -> Self {
        let g = ep.pool().geometry();
        let (alloc_min, alloc_max) = alloc_bounds(
            cfg,
            g.buf_size,
            g.bufs_per_segment.saturating_mul(g.segments),
        );
        Self {
            id,
            client,
            cred,
            ep,
            defunct: None,
            drops: DropCounters::default(),
            tx: Vec::new(),
            rx: Vec::new(),
            audit: "ok".into(),
            alloc_target: alloc_min,
            alloc_min,
            alloc_max,
            last_active: Instant::now(),
            trimmed: false,
            forged: 0,
            forged_before: 0,
            offloads: Offloads::default(),
        }
    }

    /// The endpoint (for its doorbell fd and counters).
    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    /// Whether the channel is still served.
    pub fn is_active(&self) -> bool {
        self.defunct.is_none()
    }

    /// One pass of the datapath: take back returned buffers, reflect up to `batch` packets from
    /// TX to RX (copying each), and top up the ALLOC ring. Returns the packets moved, or why the
    /// channel must be quarantined.
    pub fn service(&mut self, cfg: &ChannelConfig, batch: usize) -> Result<usize, Quarantine> {
        if self.defunct.is_some() {
            return Ok(0);
        }
        self.tx.clear();
        let n = self
            .ep
            .recv(&mut self.tx, batch)
            .map_err(|_| Quarantine::RingCorrupt)?;
        if n > 0 {
            self.rx.clear();
            for p in &self.tx {
                let Some(dst) = self.ep.alloc() else {
                    count(&mut self.drops, &mut self.forged, DropReason::RxNoBuf);
                    continue;
                };
                match self.ep.copy_into(p, dst) {
                    Some(q) => self.rx.push(q),
                    // Cannot happen for a validated packet; never lose the buffer regardless.
                    None => {
                        let _ = self.ep.free([dst]);
                    }
                }
            }
            // The app's TX buffers come home to the nexus's free list.
            if let Err(e) = self.ep.free(self.tx.iter().map(|p| p.buf)) {
                tracing::error!(channel = self.id, error = %e, "ledger refused a validated TX buffer");
            }
            self.flush_rx()?;
        }
        let returned = self.service_buffers(cfg, n)?;
        Ok(n + returned)
    }

    /// Self-tuning when the channel has been idle for `idle_trim_ms`: the ALLOC stock goes
    /// back to its minimum and every idle pool segment goes back to the OS.
    pub fn housekeeping(&mut self, cfg: &ChannelConfig, now: Instant) {
        self.forged_before = self.forged;
        if self.defunct.is_some() || self.trimmed {
            return;
        }
        if now.saturating_duration_since(self.last_active) < Duration::from_millis(cfg.idle_trim_ms)
        {
            return;
        }
        self.alloc_target = self.alloc_min;
        let mut released = 0;
        while let Ok(Some(_)) = self.ep.shrink_pool() {
            released += 1;
        }
        // Buffers still out with the app keep their segments in service; the nexus at least
        // stops holding their pages resident.
        if let Err(e) = self.ep.forget_pool_pages() {
            tracing::warn!(channel = self.id, error = %e, "could not drop the idle pool's pages");
        }
        self.trimmed = true;
        tracing::debug!(channel = self.id, released, "idle channel trimmed");
    }

    /// Stages one incoming IP packet of `len` bytes for delivery: `fill` writes it into a
    /// fresh buffer of this channel's pool (given exactly `len` bytes; the copy is the
    /// isolation boundary). If `fill` returns false the buffer goes back to the pool and
    /// nothing is staged. Counted as `rx_no_buf` when the pool is exhausted. True if a packet
    /// was staged; call [`Channel::flush_rx`] after the batch.
    pub fn stage_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        if self.defunct.is_some() {
            return false;
        }
        let Some(buf) = self.ep.alloc() else {
            self.count_drop(DropReason::RxNoBuf);
            return false;
        };
        let filled = match self.ep.buffer_mut(buf).and_then(|b| b.get_mut(..len)) {
            Some(bytes) => fill(bytes),
            None => {
                self.count_drop(DropReason::RxTooBig);
                let _ = self.ep.free([buf]);
                return false;
            }
        };
        if filled {
            self.rx.push(Packet {
                buf,
                offset: 0,
                len: len as u32,
            });
        } else {
            let _ = self.ep.free([buf]);
        }
        filled
    }

    /// The packet staged last in this batch: its length (which the caller may grow) and its
    /// whole buffer. Receive coalescing appends to it.
    pub fn last_staged(&mut self) -> Option<(&mut u32, &mut [u8])> {
        let p = self.rx.last_mut()?;
        let bytes = self.ep.buffer_mut(p.buf)?;
        Some((&mut p.len, bytes))
    }

    /// Delivers the staged packets on the RX ring; what does not fit is dropped and counted
    /// (`rx_ring_full`).
    pub fn flush_rx(&mut self) -> Result<usize, Quarantine> {
        if self.rx.is_empty() {
            return Ok(0);
        }
        let Ok(sent) = self.ep.send(&self.rx) else {
            let _ = self.ep.free(self.rx.iter().map(|q| q.buf));
            self.rx.clear();
            return Err(Quarantine::RingCorrupt);
        };
        for q in &self.rx[sent..] {
            count(&mut self.drops, &mut self.forged, DropReason::RxRingFull);
            let _ = self.ep.free([q.buf]);
        }
        self.rx.clear();
        Ok(sent)
    }

    /// Takes up to `budget` packets from the TX ring and hands each payload to `f`, which
    /// must copy it before looking at it and returns the drop reason if it refuses it. The
    /// buffers go back to the pool either way. Returns the packets taken.
    pub fn drain_tx(
        &mut self,
        budget: usize,
        mut f: impl FnMut(&[u8]) -> Result<(), DropReason>,
    ) -> Result<usize, Quarantine> {
        if self.defunct.is_some() {
            return Ok(0);
        }
        self.tx.clear();
        let n = self
            .ep
            .recv(&mut self.tx, budget)
            .map_err(|_| Quarantine::RingCorrupt)?;
        for p in &self.tx {
            if let Err(reason) = f(self.ep.payload(p)) {
                count(&mut self.drops, &mut self.forged, reason);
            }
        }
        let _ = self.ep.free(self.tx.iter().map(|p| p.buf));
        Ok(n)
    }

    /// The housekeeping half of a pass when a flowswitch moves the packets: take back returned
    /// buffers, top up the ALLOC ring, enforce the strike limit.
    pub fn service_buffers(
        &mut self,
        cfg: &ChannelConfig,
        moved: usize,
    ) -> Result<usize, Quarantine> {
        if self.defunct.is_some() {
            return Ok(0);
        }
        let returned = self.ep.refill().map_err(|_| Quarantine::RingCorrupt)? as usize;
        if moved + returned > 0 {
            self.last_active = Instant::now();
            self.trimmed = false;
        }
        let supplied = self
            .ep
            .supply_to(self.alloc_target)
            .map_err(|_| Quarantine::RingCorrupt)?;
        if supplied.starved && moved + returned > 0 {
            self.alloc_target = (self.alloc_target * 2).min(self.alloc_max);
        }
        if self.strikes() >= cfg.max_strikes {
            return Err(Quarantine::Strikes);
        }
        Ok(returned)
    }

    /// Strikes against the app: every protocol violation, and the forged packets since the
    /// last housekeeping (100 ms). An honest app may now and then send a forged packet (a
    /// closed socket's last answer, from a port another app has since taken); only a stream
    /// of them is an attack.
    fn strikes(&self) -> u64 {
        self.ep.stats().total_violations() + (self.forged - self.forged_before)
    }

    /// Counts a drop of a packet for or from this channel (a forgery is also a strike).
    pub fn count_drop(&mut self, reason: DropReason) {
        count(&mut self.drops, &mut self.forged, reason);
    }

    /// Whether the channel has had no traffic for `after` (as of `now`): it may be parked.
    pub fn quiet_for(&self, after: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.last_active) >= after
    }

    /// Parks the channel if it has no work: its need-wakeup flags stay set, so the app rings
    /// its doorbell for its next packet or returned buffer. False (flags cleared again) if
    /// work came meanwhile.
    pub fn park(&mut self) -> bool {
        if self.arm(true) {
            self.arm(false);
            return false;
        }
        true
    }

    /// Serves a parked channel again (its doorbell rang, or a packet came for it).
    pub fn unpark(&mut self, now: Instant) {
        self.arm(false);
        self.last_active = now;
    }

    /// Sets or clears the need-wakeup flags of the rings the nexus consumes. Returns true if
    /// there is already work (so the caller must not sleep).
    /// Armed, the app's taking buffers from the ALLOC ring rings too, and the ring is topped
    /// up once more (what the app took before the flag was set rang nothing).
    pub fn arm(&mut self, on: bool) -> bool {
        if self.defunct.is_some() {
            return false;
        }
        for i in [Interest::Readable, Interest::Returns] {
            self.ep.arm(i, on);
        }
        self.ep.arm_supply(on);
        if !on {
            return false;
        }
        // A corrupt ring is work: the next pass quarantines the channel.
        let work = self.ep.ready(Interest::Readable).unwrap_or(true)
            || self.ep.ready(Interest::Returns).unwrap_or(true);
        work || self.ep.supply_to(self.alloc_target).is_err()
    }

    /// Revokes the channel: the app sees DEFUNCT with `reason` (and is woken), the rings are no
    /// longer served, every buffer comes home and the pool's memory goes back to the OS.
    pub fn make_defunct(&mut self, reason: DefunctReason) {
        if self.defunct.is_some() {
            return;
        }
        self.ep.make_defunct(reason);
        self.defunct = Some(reason);
        if let Err(e) = self.reclaim() {
            tracing::error!(channel = self.id, error = %e, "ledger not whole after defunct");
        }
        tracing::info!(channel = self.id, pid = self.cred.pid, %reason, "channel defunct");
    }

    /// Takes every buffer back from the app and audits the ledger; returns the audit result.
    pub fn reclaim(&mut self) -> Result<(), String> {
        self.ep.reclaim_from_peer();
        let r = self.ep.audit().map(|_| ()).map_err(|e| e.to_string());
        self.audit = match &r {
            Ok(()) => "ok".into(),
            Err(e) => e.clone(),
        };
        let c = self.ep.buffer_counts();
        if c.peer != 0 || c.held != 0 {
            self.audit = format!("after reclaim {} buffers are still out", c.peer + c.held);
            return Err(self.audit.clone());
        }
        r
    }

    /// Recounts the ledger and checks the redzones now (O(buffers): housekeeping calls it
    /// within a budget, never a status request). Returns the buffers audited.
    pub fn audit_now(&mut self) -> u64 {
        if self.defunct.is_some() {
            return 0;
        }
        self.audit = match self.ep.audit() {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        };
        u64::from(self.ep.pool().buffers())
    }

    /// The channel as `netchannel status` shows it, with the result of its last audit. Costs
    /// its counters only.
    pub fn status(&mut self) -> ChannelStatus {
        let (rx_ring, tx_ring) = if self.defunct.is_none() {
            self.ep.ring_occupancy()
        } else {
            (0, 0)
        };
        let c = self.ep.buffer_counts();
        let s = self.ep.stats();
        let mut drops = s.drop_counters();
        drops.extend(self.drops.nonzero().map(|(r, n)| (r.name().to_owned(), n)));
        ChannelStatus {
            id: self.id,
            pid: self.cred.pid,
            uid: self.cred.uid,
            state: match self.defunct {
                None => "active".into(),
                Some(r) => format!("defunct: {r}"),
            },
            tx_ring,
            rx_ring,
            buffers_free: c.free,
            buffers_nexus: c.held,
            buffers_app: c.peer,
            buffers_absent: c.absent,
            pool_bytes_in_service: u64::from(c.free + c.held + c.peer)
                * u64::from(self.ep.pool().buf_size()),
            tx_packets: s.received,
            rx_packets: s.sent,
            drops,
            audit: self.audit.clone(),
            parked: false,
        }
    }
}

/// Counts a drop on a channel's counters (a forgery also on its strikes): the one place a
/// channel's drops are counted.
fn count(drops: &mut DropCounters, forged: &mut u64, reason: DropReason) {
    drops.add(reason);
    if reason.is_forgery() {
        *forged += 1;
    }
}

impl Port for Channel {
    fn id(&self) -> ChannelId {
        self.id
    }
    fn is_active(&self) -> bool {
        self.defunct.is_none()
    }
    fn offloads(&self) -> Offloads {
        self.offloads
    }
    fn buf_size(&self) -> usize {
        self.ep.pool().buf_size() as usize
    }
    fn stage_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        Self::stage_with(self, len, fill)
    }
    fn last_staged(&mut self) -> Option<(&mut u32, &mut [u8])> {
        Self::last_staged(self)
    }
    fn count_drop(&mut self, reason: DropReason) {
        Self::count_drop(self, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alloc_stock_keeps_its_bytes_whatever_the_buffer_size() {
        let cfg = ChannelConfig::default();
        let big = 1 << 16;
        assert_eq!(alloc_bounds(&cfg, 2048, big), (32, 512));
        assert_eq!(alloc_bounds(&cfg, 16384, big), (4, 64));
        assert_eq!(alloc_bounds(&cfg, 65536, big), (1, 16));
        // Small buffers do not raise it, and a tiny configured range keeps one buffer.
        assert_eq!(alloc_bounds(&cfg, 1024, big), (32, 512));
        let tiny = ChannelConfig {
            alloc_ring_min: 1,
            alloc_ring_max: 2,
            ..ChannelConfig::default()
        };
        assert_eq!(alloc_bounds(&tiny, 65536, big), (1, 1));
    }

    #[test]
    fn the_alloc_stock_leaves_three_quarters_of_the_pool_for_delivery() {
        let cfg = ChannelConfig::default();
        assert_eq!(alloc_bounds(&cfg, 2048, 4096), (32, 512));
        assert_eq!(alloc_bounds(&cfg, 2048, 1024), (32, 256));
        assert_eq!(alloc_bounds(&cfg, 2048, 64), (16, 16));
        assert_eq!(alloc_bounds(&cfg, 65536, 16), (1, 4));
        assert_eq!(alloc_bounds(&cfg, 2048, 2), (1, 1));
        assert_eq!(alloc_bounds(&cfg, 2048, 0), (1, 1));
    }
}
