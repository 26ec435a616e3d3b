//! `shm_hostile_peer`: both ends of a channel in one process, the server end wrapped in the
//! nexus's channel server (reflector mode), the app end driven by the input as a sequence of
//! operations: honest ones through the safe API, and hostile ones that write raw descriptors
//! and ring indices into the app's half of the shared memory.
//!
//! Checked after every step: nothing panics; both ledgers pass their audit; the server's
//! buffer counts add up to the pool; the app's ledger holds exactly what the harness holds;
//! every packet the server took from TX was reflected, drained or counted as a drop. While the
//! app has been honest: no violation is counted on either side, the server never quarantines
//! it, and every packet it receives is one it sent (or the nexus delivered) with the same
//! bytes, once; after a final drain nothing is missing but what the drop counters say. After
//! `make_defunct` and after the final `reclaim`: the ledger is whole (nothing with the app,
//! nothing held by the nexus).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use netchannel_nexus::channel::Channel;
use netchannel_nexus::config::ChannelConfig;
use netchannel_nexus::control::policy::Cred;
use netchannel_nexus::flowswitch::DropReason;
use netchannel_shm::endpoint::in_process_pair;
use netchannel_shm::{DefunctReason, Desc, Endpoint, Geometry, Home, Packet, RingKind};

/// Which buffer index a hostile descriptor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufSel {
    /// The `i`-th buffer the app holds (modulo), or 0 if it holds none.
    Held(u8),
    /// A small index: inside the pool, or just past it.
    Small(u8),
    /// Any index.
    Raw(u32),
}

/// A descriptor as a hostile app writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HDesc {
    /// Buffer index.
    pub buf: BufSel,
    /// Offset (`None`: 0).
    pub offset: Option<u32>,
    /// Length.
    pub len: u32,
    /// Flags (`None`: 0).
    pub flags: Option<u32>,
}

/// A ring index a hostile app writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexVal {
    /// Any value.
    Raw(u32),
    /// The index the app's end last published, plus a small signed offset.
    Near(i8),
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// App: take a buffer and fill bytes `[off, off + len)` with a tagged pattern.
    Alloc { off: u8, len: u16 },
    /// App: send up to `n` filled packets.
    Send { n: u8 },
    /// App: receive up to `max` packets (and check them while honest).
    Recv { max: u8 },
    /// App: return up to `n` buffers (received ones first if `received`, else filled ones).
    Free { n: u8, received: bool },
    /// Server: one reflector pass.
    Service,
    /// Server: housekeeping, `ms` milliseconds from now.
    Housekeeping { ms: u16 },
    /// Server: status (with its audit).
    Status,
    /// Server: revoke the channel.
    Defunct { reason: u8 },
    /// Hostile app: raw descriptors on TX.
    HostileTx(Vec<HDesc>),
    /// Hostile app: raw descriptors on FREE.
    HostileFree(Vec<HDesc>),
    /// Hostile app: overwrite its TX producer index (`producer`) or its RX consumer index.
    HostileIndex { producer: bool, v: IndexVal },
    /// App: push pending returns.
    Flush,
    /// Server: set or clear the need-wakeup flags.
    Arm { on: bool },
    /// Both: drain the doorbells.
    Bells,
    /// Server: deliver `n` packets from "the wire" (the flowswitch's RX path), each `len`
    /// bytes; `decline` makes the fill refuse the first one.
    Deliver { n: u8, len: u16, decline: bool },
    /// Server: take up to `budget` packets off TX as the flowswitch does, refusing some
    /// (`refuse` bit k: the k-th packet; `forged`: refused as another app's flow, a strike).
    DrainTx {
        budget: u8,
        refuse: u8,
        forged: bool,
    },
    /// Server: the periodic ledger audit (what `status` then reports).
    AuditNow,
}

const OPS: u8 = 17;

/// A cursor over the input that reads zeros once it runs out.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn desc(&mut self) -> HDesc {
        let t = self.u8();
        let buf = match t & 3 {
            0 => BufSel::Held(self.u8()),
            2 => BufSel::Raw(self.u32()),
            _ => BufSel::Small(self.u8()),
        };
        let offset = if t & 4 != 0 { Some(self.u32()) } else { None };
        let len = if t & 8 != 0 {
            self.u32()
        } else {
            u32::from(self.u16())
        };
        let flags = if t & 16 != 0 { Some(self.u32()) } else { None };
        HDesc {
            buf,
            offset,
            len,
            flags,
        }
    }
    fn descs(&mut self) -> Vec<HDesc> {
        let n = self.u8() % 12;
        (0..n).map(|_| self.desc()).collect()
    }
    fn op(&mut self) -> Op {
        match self.u8() % OPS {
            0 => Op::Alloc {
                off: self.u8(),
                len: self.u16(),
            },
            1 => Op::Send { n: self.u8() },
            2 => Op::Recv { max: self.u8() },
            3 => {
                let b = self.u8();
                Op::Free {
                    n: b & 0x7f,
                    received: b & 0x80 != 0,
                }
            }
            4 => Op::Service,
            5 => Op::Housekeeping { ms: self.u16() },
            6 => Op::Status,
            7 => Op::Defunct { reason: self.u8() },
            8 => Op::HostileTx(self.descs()),
            9 => Op::HostileFree(self.descs()),
            10 => {
                let m = self.u8();
                let v = if m & 2 != 0 {
                    IndexVal::Raw(self.u32())
                } else {
                    IndexVal::Near(self.u8() as i8)
                };
                Op::HostileIndex {
                    producer: m & 1 != 0,
                    v,
                }
            }
            11 => Op::Flush,
            12 => Op::Arm {
                on: self.u8() & 1 != 0,
            },
            13 => Op::Bells,
            14 => {
                let b = self.u8();
                Op::Deliver {
                    n: b & 0x0f,
                    len: self.u16(),
                    decline: b & 0x80 != 0,
                }
            }
            16 => Op::AuditNow,
            _ => {
                let b = self.u8();
                Op::DrainTx {
                    budget: b & 0x7f,
                    refuse: self.u8(),
                    forged: b & 0x80 != 0,
                }
            }
        }
    }
}

impl HDesc {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut t = match self.buf {
            BufSel::Held(_) => 0,
            BufSel::Small(_) => 1,
            BufSel::Raw(_) => 2,
        };
        t |= if self.offset.is_some() { 4 } else { 0 };
        t |= if self.len > 0xffff { 8 } else { 0 };
        t |= if self.flags.is_some() { 16 } else { 0 };
        out.push(t);
        match self.buf {
            BufSel::Held(b) | BufSel::Small(b) => out.push(b),
            BufSel::Raw(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
        if let Some(o) = self.offset {
            out.extend_from_slice(&o.to_le_bytes());
        }
        if self.len > 0xffff {
            out.extend_from_slice(&self.len.to_le_bytes());
        } else {
            out.extend_from_slice(&(self.len as u16).to_le_bytes());
        }
        if let Some(f) = self.flags {
            out.extend_from_slice(&f.to_le_bytes());
        }
    }
}

impl Op {
    /// Appends the bytes that decode to this op.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let descs = |out: &mut Vec<u8>, ds: &[HDesc]| {
            assert!(ds.len() < 12);
            out.push(ds.len() as u8);
            for d in ds {
                d.encode(out);
            }
        };
        match self {
            Op::Alloc { off, len } => {
                out.extend_from_slice(&[0, *off]);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Op::Send { n } => out.extend_from_slice(&[1, *n]),
            Op::Recv { max } => out.extend_from_slice(&[2, *max]),
            Op::Free { n, received } => {
                out.extend_from_slice(&[3, (n & 0x7f) | if *received { 0x80 } else { 0 }]);
            }
            Op::Service => out.push(4),
            Op::Housekeeping { ms } => {
                out.push(5);
                out.extend_from_slice(&ms.to_le_bytes());
            }
            Op::Status => out.push(6),
            Op::Defunct { reason } => out.extend_from_slice(&[7, *reason]),
            Op::HostileTx(ds) => {
                out.push(8);
                descs(out, ds);
            }
            Op::HostileFree(ds) => {
                out.push(9);
                descs(out, ds);
            }
            Op::HostileIndex { producer, v } => {
                out.push(10);
                match v {
                    IndexVal::Raw(x) => {
                        out.push(2 | u8::from(*producer));
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                    IndexVal::Near(d) => out.extend_from_slice(&[u8::from(*producer), *d as u8]),
                }
            }
            Op::Flush => out.push(11),
            Op::Arm { on } => out.extend_from_slice(&[12, u8::from(*on)]),
            Op::Bells => out.push(13),
            Op::Deliver { n, len, decline } => {
                out.extend_from_slice(&[14, (n & 0x0f) | if *decline { 0x80 } else { 0 }]);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Op::AuditNow => out.push(16),
            Op::DrainTx {
                budget,
                refuse,
                forged,
            } => {
                out.extend_from_slice(&[
                    15,
                    (budget & 0x7f) | if *forged { 0x80 } else { 0 },
                    *refuse,
                ]);
            }
        }
    }
}

/// An input: the set-up byte (see [`Setup`]) and the ops.
pub fn encode(setup: u8, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![setup];
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// The most ops one input runs (a run must stay fast).
pub const MAX_OPS: usize = 400;

/// What the set-up byte chooses.
struct Setup {
    geometry: Geometry,
    cfg: ChannelConfig,
    batch: usize,
}

impl Setup {
    fn from_byte(b: u8) -> Self {
        let geometry = if b & 0x40 == 0 {
            Geometry {
                ring_slots: [8; 5],
                buf_size: 2048,
                bufs_per_segment: 16,
                segments: 4,
            }
        } else {
            // Tiny: 6 buffers, 4-slot rings: exhaustion everywhere.
            Geometry {
                ring_slots: [4; 5],
                buf_size: 2048,
                bufs_per_segment: 2,
                segments: 3,
            }
        };
        let (alloc_ring_min, alloc_ring_max) =
            [(32, 512), (1, 2), (2, 8), (4, 16)][usize::from((b >> 3) & 3)];
        let d = ChannelConfig::default();
        let cfg = ChannelConfig {
            max_strikes: [64, 4, 1, 1000][usize::from(b & 3)],
            idle_trim_ms: if b & 4 != 0 { 0 } else { d.idle_trim_ms },
            alloc_ring_min,
            alloc_ring_max,
            ..d
        };
        let batch = if b & 0x20 == 0 { 64 } else { 3 };
        Self {
            geometry,
            cfg,
            batch,
        }
    }
}

/// The harness's view of the app end and of what it must see.
struct App {
    ep: Endpoint,
    /// Buffers the app filled and has not sent.
    filled: Vec<Packet>,
    /// Packets the app received and has not returned.
    received: Vec<Packet>,
    /// Packets sent (by the app, or delivered by the nexus) and not yet seen again: tag → len.
    outstanding: HashMap<u32, u32>,
    next_tag: u32,
    /// Descriptors pushed on TX outside the safe API (the app's TX head moved by them).
    hostile_tx: u32,
    /// A hostile op ran: the honest-only checks are off from now on.
    tainted: bool,
    /// Slots of the TX ring.
    tx_slots: u32,
    /// The app forged its TX producer index: its view of the consumer may be stale.
    tx_index_forged: bool,
    /// Raw pushes filled the app's own TX (FREE) ring past what the server had consumed (or
    /// may have): the app end's producer state is broken by its own hand, and the safe API
    /// (whose arithmetic assumes an intact producer) is no longer used on that ring.
    tx_dirty: bool,
    free_dirty: bool,
}

/// The pattern of a packet with `tag`: the tag, then bytes derived from it.
fn fill(bytes: &mut [u8], tag: u32) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = match i {
            0..4 => tag.to_le_bytes()[i],
            _ => (tag as u8).wrapping_mul(31).wrapping_add(i as u8),
        };
    }
}

impl App {
    fn tag(&mut self, delivered: bool) -> u32 {
        self.next_tag = self.next_tag.wrapping_add(1) & 0x7fff_ffff;
        self.next_tag | if delivered { 0x8000_0000 } else { 0 }
    }

    /// Checks a packet that came back (honest runs only): one outstanding, same bytes.
    fn seen(&mut self, payload: &[u8]) {
        if self.tainted {
            return;
        }
        assert!(
            payload.len() >= 4,
            "a {}-byte packet nobody sent",
            payload.len()
        );
        let tag = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let len = self
            .outstanding
            .remove(&tag)
            .unwrap_or_else(|| panic!("packet with tag {tag:#x} was never sent or came twice"));
        assert_eq!(payload.len(), len as usize, "tag {tag:#x}: length changed");
        let mut want = vec![0; payload.len()];
        fill(&mut want, tag);
        assert_eq!(payload, &want[..], "tag {tag:#x}: bytes changed");
    }

    fn hostile_buf(&self, sel: BufSel) -> u32 {
        match sel {
            BufSel::Held(i) => {
                let all: Vec<u32> = self
                    .filled
                    .iter()
                    .chain(&self.received)
                    .map(|p| p.buf)
                    .collect();
                if all.is_empty() {
                    0
                } else {
                    all[usize::from(i) % all.len()]
                }
            }
            BufSel::Small(b) => u32::from(b),
            BufSel::Raw(v) => v,
        }
    }

    fn descs(&self, ds: &[HDesc]) -> Vec<Desc> {
        ds.iter()
            .map(|d| Desc {
                buf: self.hostile_buf(d.buf),
                offset: d.offset.unwrap_or(0),
                len: d.len,
                flags: d.flags.unwrap_or(0),
            })
            .collect()
    }
}

/// What the nexus's counters must add up to, tracked alongside.
#[derive(Default)]
struct Tally {
    /// Packets handed to the drain callback.
    drained: u64,
    /// Packets staged by `Deliver` (`stage_with` returned true).
    staged: u64,
    /// `rx_no_buf` counts made by `Deliver` (not by the reflector).
    stage_no_buf: u64,
    /// The channel was quarantined or a pass failed: packets may have been dropped uncounted.
    broken: bool,
    /// Forged refusals were made (strikes an honest app does not earn by itself).
    forged: bool,
}

fn drop_count(drops: &[(String, u64)], name: &str) -> u64 {
    drops
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .sum()
}

/// After revocation or reclamation: every buffer is home, the audit passed.
fn assert_whole(ch: &mut Channel, when: &str) {
    let ep = ch.endpoint();
    if let Err(e) = ep.audit() {
        panic!("{when}: server ledger audit failed: {e}");
    }
    let c = ep.buffer_counts();
    assert_eq!((c.peer, c.held), (0, 0), "{when}: buffers still out: {c:?}");
    let s = ch.status();
    assert_eq!(s.audit, "ok", "{when}: status audit");
}

/// The checks after every step.
fn invariants(ch: &mut Channel, app: &App, l: &Tally, total: u32) {
    let ep = ch.endpoint();
    if let Err(e) = ep.audit() {
        panic!("server ledger audit failed: {e}");
    }
    let c = ep.buffer_counts();
    assert_eq!(
        c.absent + c.free + c.held + c.peer,
        total,
        "server counts {c:?}"
    );
    // The channel server holds no buffer between passes.
    assert_eq!(c.held, 0, "server holds buffers between passes: {c:?}");
    if let Err(e) = app.ep.audit() {
        panic!("app ledger audit failed: {e}");
    }
    let a = app.ep.buffer_counts();
    assert_eq!(
        a.held as usize,
        app.filled.len() + app.received.len(),
        "app ledger disagrees with what the app holds: {a:?}"
    );
    let s = ch.status();
    assert_eq!(
        s.buffers_free + s.buffers_nexus + s.buffers_app + s.buffers_absent,
        total,
        "status buffers"
    );
    if ch.is_active() {
        assert_eq!(s.audit, "ok", "status audit");
    }
    if !l.broken {
        // Every packet taken off TX was reflected, drained, or dropped with a reason; every
        // packet staged was delivered or dropped with a reason.
        let no_buf = drop_count(&s.drops, "rx_no_buf") - l.stage_no_buf;
        let ring_full = drop_count(&s.drops, "rx_ring_full");
        assert_eq!(
            s.tx_packets + l.staged,
            s.rx_packets + no_buf + ring_full + l.drained,
            "packet accounting: {:?}",
            s.drops
        );
    }
    if !app.tainted {
        let sv = ch.endpoint().stats();
        assert_eq!(
            sv.total_violations(),
            0,
            "honest app: server counted {:?}",
            sv.drop_counters()
        );
        assert_eq!(sv.ring_index_oob, 0, "honest app: server saw a bad index");
        let av = app.ep.stats();
        assert_eq!(
            av.total_violations(),
            0,
            "honest server: app counted {:?}",
            av.drop_counters()
        );
        assert_eq!(av.ring_index_oob, 0, "honest server: app saw a bad index");
    }
}

/// Whether to print each op and the final status (`FUZZ_TRACE=1`, to read a crash's input).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader(data);
    let setup = Setup::from_byte(r.u8());
    let (cfg, batch) = (setup.cfg.clone(), setup.batch);
    let total = setup.geometry.buffers();
    let buf_size = setup.geometry.buf_size;
    let (server, app_ep) =
        in_process_pair(setup.geometry, Home::All, Home::Nothing).expect("in-process channel pair");
    let cred = Cred {
        pid: 1,
        uid: 1000,
        gid: 1000,
        groups: vec![],
    };
    let mut ch = Channel::new(7, 1, cred, server, &cfg);
    let mut app = App {
        ep: app_ep,
        filled: Vec::new(),
        received: Vec::new(),
        outstanding: HashMap::new(),
        next_tag: 0,
        hostile_tx: 0,
        tainted: false,
        tx_slots: setup.geometry.slots(RingKind::Tx),
        tx_index_forged: false,
        tx_dirty: false,
        free_dirty: false,
    };
    let mut l = Tally::default();
    // The first pass stocks the ALLOC ring, as the nexus does when a channel opens.
    service(&mut ch, &cfg, batch, &app, &mut l);
    invariants(&mut ch, &app, &l, total);

    let mut ops = 0;
    while !r.0.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = r.op();
        if trace() {
            eprintln!("op {ops}: {op:?}");
        }
        step(&mut ch, &mut app, &mut l, &cfg, batch, buf_size, op);
        invariants(&mut ch, &app, &l, total);
    }

    if trace() {
        let s = ch.status();
        eprintln!(
            "end: tainted {} broken {} outstanding {}; server {:?}; status {s:?}",
            app.tainted,
            l.broken,
            app.outstanding.len(),
            ch.endpoint().buffer_counts()
        );
    }
    if ch.is_active() && !app.tainted && !l.broken {
        final_drain(&mut ch, &mut app, &mut l, &cfg, batch, total);
    }
    if ch.is_active() {
        if let Err(e) = ch.reclaim() {
            panic!("reclaim at the end: {e}");
        }
        assert_whole(&mut ch, "after the final reclaim");
    } else {
        assert_whole(&mut ch, "at the end of a defunct channel");
    }
}

fn service(ch: &mut Channel, cfg: &ChannelConfig, batch: usize, app: &App, l: &mut Tally) {
    match ch.service(cfg, batch) {
        Ok(_) => {}
        Err(q) => {
            assert!(
                app.tainted || l.forged,
                "honest app quarantined ({q:?}): {:?}",
                ch.endpoint().stats().drop_counters()
            );
            l.broken = true;
            ch.make_defunct(DefunctReason::Quarantined);
            assert_whole(ch, "after quarantine");
        }
    }
}

/// Whether an app call's error is allowed: any, once hostile; only "revoked" while honest.
fn allowed(app: &App, what: &str, e: &dyn std::fmt::Display) {
    if !app.tainted && app.ep.check().is_ok() {
        panic!("honest app: {what} failed on a live channel: {e}");
    }
}

fn step(
    ch: &mut Channel,
    app: &mut App,
    l: &mut Tally,
    cfg: &ChannelConfig,
    batch: usize,
    buf_size: u32,
    op: Op,
) {
    match op {
        Op::Alloc { off, len } => {
            let Some(buf) = app.ep.alloc() else { return };
            let off = u32::from(off) % 64;
            let len = 4 + u32::from(len) % (buf_size - off - 4 + 1);
            let tag = app.tag(false);
            let bytes = app
                .ep
                .buffer_mut(buf)
                .expect("a buffer just allocated is writable");
            fill(&mut bytes[off as usize..(off + len) as usize], tag);
            app.filled.push(Packet {
                buf,
                offset: off,
                len,
            });
        }
        Op::Send { n } => {
            let n = usize::from(n % 13).min(app.filled.len());
            if n == 0 || app.tx_dirty {
                return;
            }
            match app.ep.send(&app.filled[..n]) {
                Ok(k) => {
                    for p in app.filled.drain(..k).collect::<Vec<_>>() {
                        let mut b = [0u8; 4];
                        b.copy_from_slice(&app.ep.payload(&p)[..4]);
                        app.outstanding.insert(u32::from_le_bytes(b), p.len);
                    }
                }
                Err(e) => allowed(app, "send", &e),
            }
        }
        Op::Recv { max } => {
            let mut got = Vec::new();
            match app.ep.recv(&mut got, usize::from(max % 17)) {
                Ok(_) => {
                    for p in got {
                        let payload = app.ep.payload(&p).to_vec();
                        app.seen(&payload);
                        app.received.push(p);
                    }
                }
                Err(e) => allowed(app, "recv", &e),
            }
        }
        Op::Free { n, received } => {
            if app.free_dirty {
                return;
            }
            let list = if received {
                &mut app.received
            } else {
                &mut app.filled
            };
            let n = usize::from(n).min(list.len());
            let bufs: Vec<u32> = list.drain(..n).map(|p| p.buf).collect();
            if let Err(e) = app.ep.free(bufs) {
                // The ledger released them before the ring refused; they are gone either way.
                allowed(app, "free", &e);
            }
        }
        Op::Service => service(ch, cfg, batch, app, l),
        Op::Housekeeping { ms } => {
            let ms = if ms & 1 == 1 {
                cfg.idle_trim_ms + 1
            } else {
                u64::from(ms >> 1)
            };
            ch.housekeeping(cfg, Instant::now() + Duration::from_millis(ms));
        }
        Op::Status => {
            let s = ch.status();
            assert_eq!(s.id, 7);
        }
        Op::AuditNow => {
            let audited = ch.audit_now();
            let s = ch.status();
            if ch.is_active() {
                assert_eq!(
                    u64::from(s.buffers_free + s.buffers_nexus + s.buffers_app + s.buffers_absent),
                    audited
                );
                assert_eq!(s.audit, "ok", "the periodic audit failed");
            } else {
                assert_eq!(audited, 0);
            }
        }
        Op::Defunct { reason } => {
            let reason = match reason % 4 {
                0 => DefunctReason::Administrative,
                1 => DefunctReason::ServerShutdown,
                2 => DefunctReason::Quarantined,
                _ => DefunctReason::Other(1000 + u32::from(reason)),
            };
            let was_active = ch.is_active();
            ch.make_defunct(reason);
            assert!(!ch.is_active());
            if was_active {
                assert_whole(ch, "after make_defunct");
                assert!(
                    app.ep.check().is_err(),
                    "the app does not see the revocation"
                );
            }
        }
        Op::HostileTx(ds) => {
            app.tainted = true;
            let descs = app.descs(&ds);
            // Room left in the app's own view of TX (this refreshes it; a failed refresh
            // reads as 0 in flight, which is why a forged index makes the room unknown).
            let room = if app.tx_index_forged || app.tx_dirty {
                0
            } else {
                app.tx_slots.saturating_sub(app.ep.ring_occupancy().0)
            };
            if descs.len() as u32 > room {
                app.tx_dirty = true;
            }
            app.hostile_tx = app.hostile_tx.wrapping_add(descs.len() as u32);
            app.ep.hostile_push(true, &descs);
        }
        Op::HostileFree(ds) => {
            app.tainted = true;
            let descs = app.descs(&ds);
            // The app's view of FREE cannot be refreshed from outside: any raw push may have
            // overfilled it.
            app.free_dirty |= !descs.is_empty();
            app.ep.hostile_push(false, &descs);
        }
        Op::HostileIndex { producer, v } => {
            app.tainted = true;
            app.tx_index_forged |= producer;
            let s = app.ep.stats();
            let base = if producer {
                (s.sent as u32).wrapping_add(app.hostile_tx)
            } else {
                let bad: u64 = s.violations[RingKind::Rx.index()].iter().sum();
                (s.received + bad) as u32
            };
            let v = match v {
                IndexVal::Raw(x) => x,
                IndexVal::Near(d) => base.wrapping_add(i32::from(d) as u32),
            };
            app.ep.hostile_set_index(producer, v);
        }
        Op::Flush => {
            if app.free_dirty {
                return;
            }
            if let Err(e) = app.ep.flush() {
                allowed(app, "flush", &e);
            }
        }
        Op::Arm { on } => {
            ch.arm(on);
        }
        Op::Bells => {
            let _ = ch.endpoint().clear_bell();
            let _ = app.ep.clear_bell();
        }
        Op::Deliver { n, len, decline } => {
            if !ch.is_active() {
                return;
            }
            let len = 4 + usize::from(len) % (buf_size as usize + 64);
            let too_big = |ch: &mut Channel| drop_count(&ch.status().drops, "rx_too_big");
            let too_big_before = too_big(ch);
            // `stage_with` returns false without calling the fill when the pool is empty
            // (`rx_no_buf`) or the packet does not fit a buffer (`rx_too_big`).
            let mut not_filled = 0;
            for i in 0..n {
                let tag = app.tag(true);
                let mut called = false;
                let refuse = decline && i == 0;
                let ok = ch.stage_with(len, |bytes| {
                    called = true;
                    assert_eq!(bytes.len(), len, "stage_with gave the wrong length");
                    fill(bytes, tag);
                    !refuse
                });
                if ok {
                    l.staged += 1;
                    app.outstanding.insert(tag, len as u32);
                } else if !called {
                    not_filled += 1;
                }
            }
            let too_big_now = too_big(ch) - too_big_before;
            assert!(
                too_big_now <= not_filled,
                "rx_too_big counted for a packet that was filled"
            );
            if len <= buf_size as usize {
                assert_eq!(too_big_now, 0, "rx_too_big for a {len}-byte packet");
            }
            l.stage_no_buf += not_filled - too_big_now;
            if ch.flush_rx().is_err() {
                assert!(app.tainted, "honest app: flush_rx failed");
                l.broken = true;
                ch.make_defunct(DefunctReason::Quarantined);
                assert_whole(ch, "after a failed flush_rx");
            }
        }
        Op::DrainTx {
            budget,
            refuse,
            forged,
        } => {
            let mut k = 0u32;
            let mut payloads = Vec::new();
            let name = if forged {
                DropReason::TxNotOwner
            } else {
                DropReason::TxNoFlow
            };
            let r = ch.drain_tx(usize::from(budget % 17), |p| {
                payloads.push(p.to_vec());
                let refused = refuse & (1 << (k % 8)) != 0;
                k += 1;
                if refused { Err(name) } else { Ok(()) }
            });
            match r {
                Ok(n) => {
                    assert_eq!(n, payloads.len(), "drain_tx count");
                    l.drained += n as u64;
                    if forged && refuse != 0 && n > 0 {
                        l.forged = true;
                    }
                    for p in &payloads {
                        app.seen(p);
                    }
                    match ch.service_buffers(cfg, n) {
                        Ok(_) => {}
                        Err(q) => {
                            assert!(app.tainted || l.forged, "honest app quarantined ({q:?})");
                            l.broken = true;
                            ch.make_defunct(DefunctReason::Quarantined);
                            assert_whole(ch, "after quarantine");
                        }
                    }
                }
                Err(q) => {
                    assert!(app.tainted, "honest app: drain_tx failed ({q:?})");
                    l.broken = true;
                    ch.make_defunct(DefunctReason::Quarantined);
                    assert_whole(ch, "after quarantine");
                }
            }
        }
    }
}

/// An honest run ends by taking everything in flight off the rings: what was sent and never
/// came back must be exactly what the drop counters count.
fn final_drain(
    ch: &mut Channel,
    app: &mut App,
    l: &mut Tally,
    cfg: &ChannelConfig,
    batch: usize,
    total: u32,
) {
    let bufs: Vec<u32> = app.filled.drain(..).map(|p| p.buf).collect();
    app.ep.free(bufs).expect("honest free");
    for _ in 0..64 {
        service(ch, cfg, batch, app, l);
        let mut got = Vec::new();
        app.ep.recv(&mut got, usize::MAX).expect("honest recv");
        for p in &got {
            let payload = app.ep.payload(p).to_vec();
            app.seen(&payload);
        }
        app.ep.free(got.iter().map(|p| p.buf)).expect("honest free");
        let bufs: Vec<u32> = app.received.drain(..).map(|p| p.buf).collect();
        app.ep.free(bufs).expect("honest free");
        invariants(ch, app, l, total);
        let s = ch.status();
        if s.tx_ring == 0 && s.rx_ring == 0 && got.is_empty() && app.ep.pending_returns() == 0 {
            break;
        }
    }
    let s = ch.status();
    assert_eq!((s.tx_ring, s.rx_ring), (0, 0), "rings did not drain");
    let lost =
        drop_count(&s.drops, "rx_no_buf") - l.stage_no_buf + drop_count(&s.drops, "rx_ring_full");
    assert_eq!(
        app.outstanding.len() as u64,
        lost,
        "packets neither delivered nor counted as dropped: {:?}",
        s.drops
    );
}
