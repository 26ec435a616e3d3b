//! smoltcp's view of a channel: a `phy::Device` whose packets live in the channel's pool.
//!
//! No payload is copied on the way: smoltcp reads a received packet where the nexus put it,
//! and writes what it sends straight into a buffer of the pool, which goes to the nexus as is.
//! Received buffers are freed, and sent packets published, in batches (one ring update per
//! poll), by [`ChannelDevice::flush`].

use std::collections::{HashMap, VecDeque};

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::acks::AckThinner;
use crate::nexus::Channel;
use crate::{Error, Interest, Packet, SendError};

/// Packets taken off the RX ring per receive call.
const RX_BATCH: usize = 64;
/// Most packets in the receive queue: a refill takes the whole RX ring up to this, so that
/// redundant ACKs anywhere in it are thinned (see [`acks`](super::acks)) and their buffers
/// go back to the nexus.
const RXQ_MAX: usize = 4096;
/// Packets smoltcp takes in per poll: it acknowledges once per poll, and a peer that gets one
/// ACK per few segments keeps its window open better than one per hundred.
const RX_PER_POLL: usize = 16;
/// Bytes smoltcp takes in per poll (coalesced packets hold many segments each).
const RX_BYTES_PER_POLL: usize = 16 * 1024;

/// A channel as smoltcp's network device (IP packets, no link layer).
#[derive(Debug)]
pub(crate) struct ChannelDevice {
    ch: Channel,
    /// The largest packet smoltcp may build: a pool buffer when the nexus segments TCP and
    /// fragments datagrams, else the link's MTU.
    ip_mtu: usize,
    /// Received packets smoltcp has not taken yet; one of length 0 was thinned away.
    rxq: VecDeque<Packet>,
    /// The position of `rxq`'s head, counted over the device's life.
    rxq_front: u64,
    thinner: AckThinner,
    /// Received buffers smoltcp is done with.
    done: Vec<u32>,
    /// A buffer held ready for the next packet smoltcp sends.
    spare: Option<u32>,
    /// Packets written, not yet published.
    txq: Vec<Packet>,
    scratch: Vec<Packet>,
    /// The channel broke (defunct, or the nexus is gone).
    pub(crate) broken: Option<Error>,
    /// Most packets on the TX ring at once: half the pool. The rest stays for what arrives; a
    /// server sending to many peers at once otherwise filled the whole pool with segments
    /// waiting for the wire, and the nexus dropped the peers' ACKs for want of a buffer
    /// (`rx_no_buf`), which smoltcp took a second to recover from.
    tx_limit: u32,
    /// The local ports listeners of this stack listen on (and how many listeners each).
    listening: HashMap<u16, u32>,
    /// SYNs to a listener whose backlog was full, dropped (see [`TxToken`]).
    syns_dropped: u64,
    /// Packets and bytes handed to smoltcp in this poll.
    taken: usize,
    taken_bytes: usize,
}

impl ChannelDevice {
    pub(crate) fn new(ch: Channel) -> Self {
        // The nexus carries IP packets up to the interface's MTU, within one pool buffer.
        let buf = ch.pool().geometry().buf_size as usize;
        let mtu = match ch.mtu() {
            0 => 1500,
            m => m as usize,
        }
        .min(buf);
        // With segmentation offload, smoltcp writes TCP segments as large as a buffer (and
        // IPv4's 16-bit length) allows; the nexus cuts them to the wire's MSS.
        let ip_mtu = if ch.offloads().tx_segment {
            buf.min(65535)
        } else {
            mtu
        };
        let g = ch.pool().geometry();
        let tx_limit = (g.segments.saturating_mul(g.bufs_per_segment) / 2).max(1);
        Self {
            tx_limit,
            listening: HashMap::new(),
            syns_dropped: 0,
            ch,
            ip_mtu,
            rxq: VecDeque::with_capacity(RX_BATCH),
            rxq_front: 0,
            thinner: AckThinner::default(),
            done: Vec::with_capacity(RX_BATCH),
            spare: None,
            txq: Vec::with_capacity(RX_BATCH),
            scratch: Vec::with_capacity(RX_BATCH),
            broken: None,
            taken: 0,
            taken_bytes: 0,
        }
    }

    /// A new poll starts: smoltcp may take [`RX_PER_POLL`] packets again.
    pub(crate) fn begin_poll(&mut self) {
        self.taken = 0;
        self.taken_bytes = 0;
    }

    /// The largest IP packet the stack may hand the nexus: a buffer's worth (within IP's
    /// 65,535) on a channel whose datagrams the nexus fragments and whose TCP it segments,
    /// else the link's MTU.
    pub(crate) fn ip_mtu(&self) -> usize {
        self.ip_mtu
    }

    pub(crate) fn channel(&self) -> &Channel {
        &self.ch
    }

    /// Whether sending is held up (no buffer to write into, packets the TX ring had no room
    /// for, or [`ChannelDevice::tx_limit`] packets on it): the stack must be polled again soon,
    /// not only when packets arrive.
    pub(crate) fn backlogged(&mut self) -> bool {
        self.spare.is_none() || !self.txq.is_empty() || self.tx_full()
    }

    /// Whether the TX ring holds [`ChannelDevice::tx_limit`] packets.
    fn tx_full(&mut self) -> bool {
        self.ch.ring_occupancy().0 >= self.tx_limit
    }

    /// Whether sending is held up now: as [`ChannelDevice::backlogged`], after taking the
    /// next spare buffer (each packet sent uses the spare up; that alone is no hold-up).
    pub(crate) fn held_up(&mut self) -> bool {
        self.ensure_spare();
        self.backlogged()
    }

    /// Asks the nexus to ring the doorbell (`on`), or not, for what the stack waits on:
    /// packets, and while sending is held up, buffers coming back and room on the TX ring.
    pub(crate) fn arm(&mut self, on: bool) {
        self.ch.arm(Interest::Readable, on);
        if !on || self.held_up() {
            self.ch.arm(Interest::Buffers, on);
            self.ch.arm(Interest::Writable, on);
        }
    }

    /// Whether the stack has work now (checked after [`ChannelDevice::arm`] and before
    /// sleeping, so that nothing the nexus did before the flag was up is missed): packets
    /// wait, or sending was held up and no longer is (a buffer, room on the TX ring, and the
    /// ring under [`ChannelDevice::tx_limit`]: else a sender at the limit would never sleep).
    pub(crate) fn has_work(&mut self) -> bool {
        if self.rx_pending() {
            return true;
        }
        if !self.backlogged() {
            return false;
        }
        // Both, whatever the first says: queued packets go as soon as the ring has room.
        let sent = self.flush();
        let spare = self.ensure_spare();
        sent && spare && !self.tx_full()
    }

    /// Whether packets wait (in our queue or on the RX ring).
    pub(crate) fn rx_pending(&mut self) -> bool {
        if !self.rxq.is_empty() {
            return true;
        }
        self.refill_rx();
        !self.rxq.is_empty()
    }

    /// Takes what the RX ring holds (up to [`RXQ_MAX`] queued), thinning redundant ACKs. At
    /// the start of every poll, not only once the queue is empty: smoltcp takes
    /// [`RX_PER_POLL`] packets a poll, and a server with a hundred connections has more than
    /// that queued, while the ring behind the queue fills with ACKs that the queue's make
    /// redundant.
    pub(crate) fn refill_rx(&mut self) {
        if self.rxq.is_empty() {
            self.thinner.clear();
        }
        while self.broken.is_none() && self.rxq.len() < RXQ_MAX {
            self.scratch.clear();
            let want = RX_BATCH.min(RXQ_MAX - self.rxq.len());
            match self.ch.recv(&mut self.scratch, want) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.broken = Some(e);
                    break;
                }
            }
            for pkt in self.scratch.drain(..) {
                let pos = self.rxq_front + self.rxq.len() as u64;
                let ip = self.ch.payload(&pkt);
                let thinned = self.thinner.queued(ip, pos, self.rxq_front);
                if let Some(old) = thinned
                    && let Some(q) = self.rxq.get_mut((old - self.rxq_front) as usize)
                {
                    self.done.push(q.buf);
                    q.len = 0;
                }
                self.rxq.push_back(pkt);
            }
        }
        self.thinner.forget_before(self.rxq_front, self.rxq.len());
    }

    /// The next packet for smoltcp, past those thinned away.
    fn next_rx(&mut self) -> Option<Packet> {
        while let Some(p) = self.rxq.pop_front() {
            self.rxq_front += 1;
            if p.len > 0 {
                return Some(p);
            }
        }
        None
    }

    /// A listener starts (`on`) or stops listening on local `port`.
    pub(crate) fn listen_port(&mut self, port: u16, on: bool) {
        let n = self.listening.entry(port).or_insert(0);
        if on {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.listening.remove(&port);
            }
        }
    }

    /// SYNs dropped because their listener's backlog was full.
    pub(crate) fn syns_dropped(&self) -> u64 {
        self.syns_dropped
    }

    /// ACKs thinned from the receive queue so far.
    pub(crate) fn acks_thinned(&self) -> u64 {
        self.thinner.thinned
    }

    fn ensure_spare(&mut self) -> bool {
        if self.spare.is_none() && self.broken.is_none() {
            self.spare = self.ch.alloc();
        }
        self.spare.is_some()
    }

    /// Publishes what smoltcp sent and frees what it received. Returns whether every sent
    /// packet went (the TX ring may be full).
    pub(crate) fn flush(&mut self) -> bool {
        if !self.done.is_empty()
            && let Err(e) = self.ch.free(self.done.drain(..))
        {
            self.fail(e);
        }
        if self.txq.is_empty() {
            return true;
        }
        match self.ch.send(&self.txq) {
            Ok(n) => {
                self.txq.drain(..n);
            }
            Err(e) => {
                self.fail(e);
                self.txq.clear();
            }
        }
        self.txq.is_empty()
    }

    fn fail(&mut self, e: SendError) {
        match e {
            SendError::Channel(e) => {
                self.broken.get_or_insert(e);
            }
            // Our own bookkeeping went wrong; the nexus's ledger is unharmed.
            SendError::Invalid(v) => {
                tracing::error!(violation = ?v, "stack device: refused packet")
            }
        }
    }
}

impl phy::Device for ChannelDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.taken >= RX_PER_POLL || self.taken_bytes >= RX_BYTES_PER_POLL {
            return None;
        }
        // smoltcp may answer the packet while it reads it: both buffers are lent at once.
        if !self.ensure_spare() {
            return None;
        }
        let pkt = match self.next_rx() {
            Some(p) => p,
            None => {
                self.refill_rx();
                self.next_rx()?
            }
        };
        self.taken += 1;
        self.taken_bytes += pkt.len as usize;
        let spare_buf = self.spare?;
        let Self {
            ch,
            done,
            spare,
            txq,
            listening,
            syns_dropped,
            ..
        } = self;
        match ch.payload_and_buffer_mut(&pkt, spare_buf) {
            Some((data, out)) => Some((
                RxToken {
                    data,
                    buf: pkt.buf,
                    done,
                },
                TxToken {
                    out,
                    spare,
                    txq,
                    listening,
                    syns_dropped,
                },
            )),
            None => {
                // Not ours to read (cannot happen for a packet we received): drop it.
                done.push(pkt.buf);
                None
            }
        }
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        if !self.ensure_spare()
            || self.txq.len() as u32 + self.ch.ring_occupancy().0 >= self.tx_limit
        {
            return None;
        }
        let buf = self.spare?;
        let Self {
            ch,
            spare,
            txq,
            listening,
            syns_dropped,
            ..
        } = self;
        let out = ch.buffer_mut(buf)?;
        Some(TxToken {
            out,
            spare,
            txq,
            listening,
            syns_dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.ip_mtu;
        caps.max_burst_size = Some(RX_BATCH);
        // The nexus verifies every checksum it delivers; smoltcp computes the ones it sends,
        // except TCP's when the nexus segments (it computes them for each segment it cuts).
        let mut sums = ChecksumCapabilities::default();
        sums.ipv4 = Checksum::Tx;
        sums.udp = Checksum::Tx;
        sums.tcp = if self.ch.offloads().tx_segment {
            Checksum::None
        } else {
            Checksum::Tx
        };
        caps.checksum = sums;
        caps
    }
}

/// A received packet, read in place.
pub(crate) struct RxToken<'a> {
    data: &'a [u8],
    buf: u32,
    done: &'a mut Vec<u32>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.data)
        // `drop` hands the buffer back.
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        // Read or not, the buffer goes back to the nexus with the next flush.
        self.done.push(self.buf);
    }
}

/// A pool buffer smoltcp writes its packet into.
///
/// A reset refusing a SYN on a port a listener listens on is not sent: smoltcp refuses a SYN
/// when every socket of the listener's backlog is taken, where a kernel drops it (its accept
/// queue is full) and the client tries again a second later. A refused client fails at once.
pub(crate) struct TxToken<'a> {
    out: &'a mut [u8],
    spare: &'a mut Option<u32>,
    txq: &'a mut Vec<Packet>,
    listening: &'a HashMap<u16, u32>,
    syns_dropped: &'a mut u64,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(self.out.len());
        let r = f(&mut self.out[..len]);
        if !self.listening.is_empty() && refuses_syn(&self.out[..len], self.listening) {
            // The buffer stays the spare.
            *self.syns_dropped += 1;
            return r;
        }
        if let Some(buf) = self.spare.take() {
            self.txq.push(Packet {
                buf,
                offset: 0,
                len: len as u32,
            });
        }
        r
    }
}

/// Whether `ip` is smoltcp's reset refusing a SYN on one of the `listening` ports: RST and
/// ACK, sequence number 0 (what RFC 9293 answers to a segment without ACK, as a SYN is).
fn refuses_syn(ip: &[u8], listening: &HashMap<u16, u32>) -> bool {
    super::acks::tcp_in(ip).is_some_and(|(_, _, t)| {
        t.rst() && t.ack() && t.seq_number().0 == 0 && listening.contains_key(&t.src_port())
    })
}
