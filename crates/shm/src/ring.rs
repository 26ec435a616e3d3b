//! Single-producer / single-consumer rings of slot descriptors in shared memory.
//!
//! A ring is split in two halves that live in different regions:
//!
//! * the **producer half** (in the producer's region): the producer index, the producer's
//!   need-wakeup flag and the slot array;
//! * the **consumer half** (in the consumer's region): the consumer index and the consumer's
//!   need-wakeup flag.
//!
//! Each side can therefore write only its own index; the other side maps it read-only. Indices
//! are free-running `u32`s (the slot is `index & mask`). The producer fills slots, then publishes
//! its index with `Release`; the consumer loads it with `Acquire`, reads the slots, and publishes
//! its own index with `Release`.
//!
//! **Untrusted peer.** Every index read from the other side is loaded once into a local and
//! checked before use: the consumer refuses a producer index more than `size` ahead of what it has
//! consumed, the producer refuses a consumer index that moves backwards or past what was produced.
//! Either is an [`Error::RingIndexOob`]: the ring can no longer be trusted. Slot contents are
//! loaded once per field into a plain [`Desc`]; validating them is the caller's job (it needs the
//! pool geometry and the ownership ledger).
//!
//! **Need-wakeup.** A side about to sleep sets the flag in its own half, issues a `SeqCst` fence
//! and re-checks the ring; the other side, after publishing, fences and reads the flag. One of the
//! two always sees the other's write (checked with loom), so a sleeper is never left behind and a
//! busy peer makes no system call.

use std::ptr::NonNull;

use crate::Error;
use crate::sync::{AtomicU32, Ordering, fence};

/// The five ring kinds of a channel. The app produces TX and FREE; the server (the nexus, or the
/// other end of a user pipe) produces RX, ALLOC and EVENT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingKind {
    /// App → server: packets to transmit.
    Tx,
    /// Server → app: received packets.
    Rx,
    /// Server → app: empty buffers for the app to fill.
    Alloc,
    /// App → server: buffers the app gives back.
    Free,
    /// Server → app: transmit status, drops, advisories (no events defined yet).
    Event,
}

impl RingKind {
    /// Every kind, in layout order.
    pub const ALL: [Self; 5] = [Self::Tx, Self::Rx, Self::Alloc, Self::Free, Self::Event];

    /// Dense index, for arrays keyed by kind.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name, as used in counter names (`tx_not_owner`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Tx => "tx",
            Self::Rx => "rx",
            Self::Alloc => "alloc",
            Self::Free => "free",
            Self::Event => "event",
        }
    }

    /// Whether the app end produces this ring (otherwise the server end does).
    pub fn app_produces(self) -> bool {
        matches!(self, Self::Tx | Self::Free)
    }
}

/// A slot descriptor as it sits in shared memory.
#[repr(C)]
#[derive(Debug)]
pub struct Slot {
    buf: AtomicU32,
    offset: AtomicU32,
    len: AtomicU32,
    flags: AtomicU32,
}

/// Size of a slot in shared memory.
pub const SLOT_SIZE: usize = 16;

/// The header of a ring half: one index and one need-wakeup flag, alone on a cache line.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct HalfHeader {
    index: AtomicU32,
    need_wakeup: AtomicU32,
}

/// Size of a half header in shared memory (one cache line).
pub const HALF_HEADER_SIZE: usize = 64;

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<Slot>() == SLOT_SIZE);
    assert!(size_of::<HalfHeader>() == HALF_HEADER_SIZE);
};

#[cfg(any(test, loom))]
impl Slot {
    pub(crate) fn new() -> Self {
        Self {
            buf: AtomicU32::new(0),
            offset: AtomicU32::new(0),
            len: AtomicU32::new(0),
            flags: AtomicU32::new(0),
        }
    }
}

#[cfg(any(test, loom))]
impl HalfHeader {
    pub(crate) fn new() -> Self {
        Self {
            index: AtomicU32::new(0),
            need_wakeup: AtomicU32::new(0),
        }
    }
}

/// A slot descriptor copied out of (or about to be written into) shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Buffer index in the pool.
    pub buf: u32,
    /// Offset of the data inside the buffer.
    pub offset: u32,
    /// Length of the data.
    pub len: u32,
    /// Flags; bits outside [`Desc::KNOWN_FLAGS`] are reserved and must be zero.
    pub flags: u32,
}

impl Desc {
    /// Flag bits with a meaning (none yet: every bit is reserved).
    pub const KNOWN_FLAGS: u32 = 0;
}

/// The pointers that make up one ring, as seen from one side.
#[derive(Debug, Clone, Copy)]
pub struct RingPtrs {
    /// Header of the producer half.
    pub producer: NonNull<HalfHeader>,
    /// Header of the consumer half.
    pub consumer: NonNull<HalfHeader>,
    /// First slot (in the producer's region).
    pub slots: NonNull<Slot>,
    /// Number of slots, a power of two.
    pub size: u32,
}

/// The producing side of a ring.
#[derive(Debug)]
pub struct Producer {
    kind: RingKind,
    ptrs: RingPtrs,
    mask: u32,
    /// Next index to fill (not yet visible to the consumer until `publish`).
    head: u32,
    /// Last consumer index seen and accepted.
    cons: u32,
}

// SAFETY: a Producer only holds pointers into shared mappings that its owner keeps alive; the
// memory is accessed through atomics only.
unsafe impl Send for Producer {}

impl Producer {
    /// Binds the producing side of a ring.
    ///
    /// # Safety
    /// The pointers in `ptrs` must stay valid for as long as the `Producer` is used: the
    /// producer header and `size` slots writable, the consumer header readable. `size` must be a
    /// power of two.
    pub unsafe fn new(kind: RingKind, ptrs: RingPtrs) -> Self {
        Self {
            kind,
            ptrs,
            mask: ptrs.size - 1,
            head: 0,
            cons: 0,
        }
    }

    fn own(&self) -> &HalfHeader {
        // SAFETY: valid per the contract of `new`.
        unsafe { self.ptrs.producer.as_ref() }
    }

    fn peer(&self) -> &HalfHeader {
        // SAFETY: valid per the contract of `new`.
        unsafe { self.ptrs.consumer.as_ref() }
    }

    /// Which ring this is.
    pub fn kind(&self) -> RingKind {
        self.kind
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.ptrs.size
    }

    /// Free slots according to the last consumer index seen (no shared-memory read).
    pub fn free_cached(&self) -> u32 {
        self.ptrs.size - self.head.wrapping_sub(self.cons)
    }

    /// Reads the consumer index once, checks it, and returns the number of free slots.
    pub fn refresh(&mut self) -> Result<u32, Error> {
        let c = self.peer().index.load(Ordering::Acquire);
        // The consumer may only move forward, and not past what we produced.
        if c.wrapping_sub(self.cons) > self.head.wrapping_sub(self.cons) {
            return Err(Error::RingIndexOob {
                ring: self.kind,
                claimed: c,
                valid: self.cons,
                size: self.ptrs.size,
            });
        }
        self.cons = c;
        Ok(self.free_cached())
    }

    /// Free slots, reading the consumer index only when the cached view shows fewer than `want`.
    pub fn free(&mut self, want: u32) -> Result<u32, Error> {
        let free = self.free_cached();
        if free >= want {
            Ok(free)
        } else {
            self.refresh()
        }
    }

    /// Writes one descriptor into the next slot. Returns false (and writes nothing) when the
    /// cached view of the ring is full; call [`Producer::free`] first to refresh it.
    #[inline]
    pub fn push(&mut self, d: Desc) -> bool {
        if self.free_cached() == 0 {
            return false;
        }
        self.write_next(d);
        true
    }

    #[inline]
    fn write_next(&mut self, d: Desc) {
        let i = (self.head & self.mask) as usize;
        // SAFETY: `i <= mask < size`, so the slot is inside the slot array (contract of `new`).
        let slot = unsafe { &*self.ptrs.slots.as_ptr().add(i) };
        slot.buf.store(d.buf, Ordering::Relaxed);
        slot.offset.store(d.offset, Ordering::Relaxed);
        slot.len.store(d.len, Ordering::Relaxed);
        slot.flags.store(d.flags, Ordering::Relaxed);
        self.head = self.head.wrapping_add(1);
    }

    /// Makes every pushed descriptor visible. Returns true if the consumer asked to be woken.
    #[inline]
    pub fn publish(&mut self) -> bool {
        self.own().index.store(self.head, Ordering::Release);
        fence(Ordering::SeqCst);
        self.peer().need_wakeup.load(Ordering::Relaxed) != 0
    }

    /// Descriptors pushed and not yet taken by the consumer (per the last index seen).
    pub fn in_flight(&self) -> u32 {
        self.head.wrapping_sub(self.cons)
    }

    /// Overwrites the published producer index with anything (hostile-peer tests).
    #[cfg(feature = "hostile")]
    pub fn force_index(&mut self, v: u32) {
        self.own().index.store(v, Ordering::Release);
    }

    /// Writes a descriptor into the next slot even if the ring looks full (hostile-peer tests).
    #[cfg(feature = "hostile")]
    pub fn force_push(&mut self, d: Desc) {
        self.write_next(d);
    }

    /// Asks the consumer to wake us when it frees slots (before sleeping on a full ring).
    pub fn arm_wakeup(&self) {
        self.own().need_wakeup.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Withdraws the request made by [`Producer::arm_wakeup`].
    pub fn disarm_wakeup(&self) {
        self.own().need_wakeup.store(0, Ordering::Relaxed);
    }
}

/// The consuming side of a ring.
#[derive(Debug)]
pub struct Consumer {
    kind: RingKind,
    ptrs: RingPtrs,
    mask: u32,
    /// Next index to read.
    tail: u32,
    /// Last producer index seen and accepted.
    prod: u32,
}

// SAFETY: as for `Producer`.
unsafe impl Send for Consumer {}

impl Consumer {
    /// Binds the consuming side of a ring.
    ///
    /// # Safety
    /// The pointers in `ptrs` must stay valid for as long as the `Consumer` is used: the
    /// consumer header writable, the producer header and `size` slots readable. `size` must be
    /// a power of two.
    pub unsafe fn new(kind: RingKind, ptrs: RingPtrs) -> Self {
        Self {
            kind,
            ptrs,
            mask: ptrs.size - 1,
            tail: 0,
            prod: 0,
        }
    }

    fn own(&self) -> &HalfHeader {
        // SAFETY: valid per the contract of `new`.
        unsafe { self.ptrs.consumer.as_ref() }
    }

    fn peer(&self) -> &HalfHeader {
        // SAFETY: valid per the contract of `new`.
        unsafe { self.ptrs.producer.as_ref() }
    }

    /// Which ring this is.
    pub fn kind(&self) -> RingKind {
        self.kind
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.ptrs.size
    }

    /// Descriptors available according to the last producer index seen.
    pub fn available_cached(&self) -> u32 {
        self.prod.wrapping_sub(self.tail)
    }

    /// Reads the producer index once, checks it, and returns the number of descriptors ready.
    pub fn refresh(&mut self) -> Result<u32, Error> {
        let p = self.peer().index.load(Ordering::Acquire);
        let avail = p.wrapping_sub(self.tail);
        if avail > self.ptrs.size {
            return Err(Error::RingIndexOob {
                ring: self.kind,
                claimed: p,
                valid: self.tail,
                size: self.ptrs.size,
            });
        }
        self.prod = p;
        Ok(avail)
    }

    /// Descriptors ready, reading the producer index only when none are cached.
    #[inline]
    pub fn available(&mut self) -> Result<u32, Error> {
        match self.available_cached() {
            0 => self.refresh(),
            n => Ok(n),
        }
    }

    /// Takes the next descriptor (one load per field, into a local), or `None` if the cached
    /// view is empty.
    #[inline]
    pub fn pop(&mut self) -> Option<Desc> {
        if self.available_cached() == 0 {
            return None;
        }
        let i = (self.tail & self.mask) as usize;
        // SAFETY: `i <= mask < size`, inside the slot array (contract of `new`).
        let slot = unsafe { &*self.ptrs.slots.as_ptr().add(i) };
        let d = Desc {
            buf: slot.buf.load(Ordering::Relaxed),
            offset: slot.offset.load(Ordering::Relaxed),
            len: slot.len.load(Ordering::Relaxed),
            flags: slot.flags.load(Ordering::Relaxed),
        };
        self.tail = self.tail.wrapping_add(1);
        Some(d)
    }

    /// Hands the consumed slots back to the producer. Returns true if the producer asked to be
    /// woken when space frees up.
    #[inline]
    pub fn release(&mut self) -> bool {
        self.own().index.store(self.tail, Ordering::Release);
        fence(Ordering::SeqCst);
        self.peer().need_wakeup.load(Ordering::Relaxed) != 0
    }

    /// Overwrites the published consumer index with anything (hostile-peer tests).
    #[cfg(feature = "hostile")]
    pub fn force_index(&mut self, v: u32) {
        self.own().index.store(v, Ordering::Release);
    }

    /// Asks the producer to wake us when it publishes (before sleeping on an empty ring).
    pub fn arm_wakeup(&self) {
        self.own().need_wakeup.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Withdraws the request made by [`Consumer::arm_wakeup`].
    pub fn disarm_wakeup(&self) {
        self.own().need_wakeup.store(0, Ordering::Relaxed);
    }
}

/// A ring in ordinary heap memory, for tests and model checking.
#[cfg(any(test, loom))]
pub(crate) mod heap {
    use super::*;

    /// Owns the memory of one ring.
    pub(crate) struct HeapRing {
        producer: Box<HalfHeader>,
        consumer: Box<HalfHeader>,
        slots: Box<[Slot]>,
    }

    impl HeapRing {
        pub(crate) fn new(size: u32) -> Self {
            assert!(size.is_power_of_two());
            Self {
                producer: Box::new(HalfHeader::new()),
                consumer: Box::new(HalfHeader::new()),
                slots: (0..size).map(|_| Slot::new()).collect(),
            }
        }

        pub(crate) fn ptrs(&self) -> RingPtrs {
            RingPtrs {
                producer: NonNull::from(&*self.producer),
                consumer: NonNull::from(&*self.consumer),
                slots: NonNull::from(&self.slots[0]),
                size: self.slots.len() as u32,
            }
        }

        /// A hostile write of the producer index.
        #[cfg_attr(loom, allow(dead_code))]
        pub(crate) fn force_producer_index(&self, v: u32) {
            self.producer.index.store(v, Ordering::Release);
        }

        /// A hostile write of the consumer index.
        #[cfg_attr(loom, allow(dead_code))]
        pub(crate) fn force_consumer_index(&self, v: u32) {
            self.consumer.index.store(v, Ordering::Release);
        }

        pub(crate) fn split(&self) -> (Producer, Consumer) {
            // SAFETY: the boxes live as long as `self`, which every test keeps alive while it
            // uses the cursors.
            unsafe {
                (
                    Producer::new(RingKind::Tx, self.ptrs()),
                    Consumer::new(RingKind::Tx, self.ptrs()),
                )
            }
        }
    }
}

#[cfg(test)]
#[cfg(not(loom))]
mod tests {
    use super::heap::HeapRing;
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn d(n: u32) -> Desc {
        Desc {
            buf: n,
            offset: n.wrapping_mul(3),
            len: n ^ 0x55,
            flags: 0,
        }
    }

    #[test]
    fn fills_then_refuses_then_drains_in_order() {
        let ring = HeapRing::new(4);
        let (mut p, mut c) = ring.split();
        for i in 0..4 {
            assert!(p.push(d(i)));
        }
        assert!(!p.push(d(9)));
        assert!(!p.publish());
        assert_eq!(c.refresh().unwrap(), 4);
        for i in 0..4 {
            assert_eq!(c.pop(), Some(d(i)));
        }
        assert_eq!(c.pop(), None);
        c.release();
        assert_eq!(p.refresh().unwrap(), 4);
    }

    #[test]
    fn indices_wrap_around_u32() {
        let ring = HeapRing::new(2);
        let (mut p, mut c) = ring.split();
        p.head = u32::MAX - 1;
        p.cons = u32::MAX - 1;
        c.tail = u32::MAX - 1;
        c.prod = u32::MAX - 1;
        ring.force_consumer_index(u32::MAX - 1);
        for round in 0..5 {
            assert_eq!(p.free(2).unwrap(), 2);
            assert!(p.push(d(round)) && p.push(d(round + 100)));
            p.publish();
            assert_eq!(c.refresh().unwrap(), 2);
            assert_eq!(c.pop(), Some(d(round)));
            assert_eq!(c.pop(), Some(d(round + 100)));
            c.release();
        }
    }

    #[test]
    fn consumer_refuses_a_producer_index_past_the_ring() {
        let ring = HeapRing::new(8);
        let (_p, mut c) = ring.split();
        for bad in [9, 1000, u32::MAX, 0x8000_0000] {
            ring.force_producer_index(bad);
            assert!(matches!(
                c.refresh(),
                Err(Error::RingIndexOob {
                    ring: RingKind::Tx,
                    ..
                })
            ));
            assert_eq!(c.pop(), None, "nothing may be read after a bad index");
        }
        ring.force_producer_index(8);
        assert_eq!(c.refresh().unwrap(), 8, "a full ring is legal");
    }

    #[test]
    fn producer_refuses_a_consumer_index_that_jumps_or_goes_back() {
        let ring = HeapRing::new(8);
        let (mut p, mut c) = ring.split();
        for i in 0..3 {
            p.push(d(i));
        }
        p.publish();
        ring.force_consumer_index(4);
        assert!(p.refresh().is_err(), "past what was produced");
        c.refresh().unwrap();
        c.pop();
        c.pop();
        c.release();
        assert_eq!(p.refresh().unwrap(), 7);
        ring.force_consumer_index(1);
        assert!(p.refresh().is_err(), "backwards");
    }

    #[test]
    fn wakeup_flags_are_seen_by_the_other_side() {
        let ring = HeapRing::new(4);
        let (mut p, mut c) = ring.split();
        c.arm_wakeup();
        p.push(d(1));
        assert!(p.publish(), "consumer asked for a wake-up");
        c.disarm_wakeup();
        p.push(d(2));
        assert!(!p.publish());
        p.arm_wakeup();
        c.refresh().unwrap();
        c.pop();
        assert!(c.release(), "producer asked for a wake-up");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        Publish,
        Refresh,
        Pop(u32),
        Release,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u32..10).prop_map(Op::Push),
            Just(Op::Publish),
            Just(Op::Refresh),
            (1u32..10).prop_map(Op::Pop),
            Just(Op::Release),
        ]
    }

    proptest! {
        /// The ring against a reference FIFO: same items, same order, capacity respected.
        #[test]
        fn ring_matches_a_fifo_model(size_log in 0u32..5, ops in proptest::collection::vec(op(), 1..200)) {
            let size = 1u32 << size_log;
            let ring = HeapRing::new(size);
            let (mut p, mut c) = ring.split();
            let mut next = 0u32;
            let mut pushed: VecDeque<Desc> = VecDeque::new(); // pushed, not published
            let mut visible: VecDeque<Desc> = VecDeque::new(); // published, not popped
            let mut popped_unreleased = 0u32;
            let mut released_total = 0u32;
            let mut pushed_total = 0u32;
            for op in ops {
                match op {
                    Op::Push(n) => for _ in 0..n {
                        let occupied = pushed_total - released_total;
                        let ok = p.push(d(next));
                        // The producer may only refuse when its cached view is full, and must
                        // refuse when the ring really is full.
                        if occupied == size { prop_assert!(!ok); }
                        if ok { pushed.push_back(d(next)); next += 1; pushed_total += 1; }
                    },
                    Op::Publish => { p.publish(); visible.extend(pushed.drain(..)); }
                    Op::Refresh => {
                        let free = p.refresh().unwrap();
                        prop_assert_eq!(free, size - (pushed_total - released_total));
                        let avail = c.refresh().unwrap();
                        prop_assert_eq!(avail as usize, visible.len());
                    }
                    Op::Pop(n) => for _ in 0..n {
                        match c.pop() {
                            Some(got) => {
                                prop_assert_eq!(Some(got), visible.pop_front());
                                popped_unreleased += 1;
                            }
                            None => break,
                        }
                    },
                    Op::Release => { c.release(); released_total += popped_unreleased; popped_unreleased = 0; }
                }
            }
        }
    }
}

#[cfg(test)]
#[cfg(loom)]
mod loom_tests {
    use super::heap::HeapRing;
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicBool;

    /// Every item the producer publishes arrives once, in order, with its payload, through a
    /// ring smaller than the stream.
    #[test]
    fn items_arrive_once_and_in_order() {
        loom::model(|| {
            let ring = Arc::new(HeapRing::new(2));
            let r2 = ring.clone();
            let producer = loom::thread::spawn(move || {
                let (mut p, _) = r2.split();
                for i in 0..3u32 {
                    while p.free(1).unwrap() == 0 {
                        crate::sync::spin_hint();
                    }
                    assert!(p.push(Desc {
                        buf: i,
                        offset: i + 10,
                        len: i + 20,
                        flags: 0
                    }));
                    p.publish();
                }
            });
            let (_, mut c) = ring.split();
            let mut expect = 0u32;
            while expect < 3 {
                if c.available().unwrap() == 0 {
                    crate::sync::spin_hint();
                    continue;
                }
                let got = c.pop().unwrap();
                assert_eq!(
                    got,
                    Desc {
                        buf: expect,
                        offset: expect + 10,
                        len: expect + 20,
                        flags: 0
                    }
                );
                c.release();
                expect += 1;
            }
            producer.join().unwrap();
        });
    }

    /// The need-wakeup hand-shake never loses a wake-up: if the consumer decides to sleep on an
    /// empty ring, the producer's publish sees its flag and rings the doorbell.
    #[test]
    fn a_sleeping_consumer_is_always_woken() {
        loom::model(|| {
            let ring = Arc::new(HeapRing::new(2));
            let rang = Arc::new(AtomicBool::new(false));
            let (r2, rang2) = (ring.clone(), rang.clone());
            let producer = loom::thread::spawn(move || {
                let (mut p, _) = r2.split();
                assert!(p.push(Desc::default()));
                if p.publish() {
                    rang2.store(true, Ordering::SeqCst);
                }
            });
            let (_, mut c) = ring.split();
            let slept = if c.refresh().unwrap() > 0 {
                false
            } else {
                c.arm_wakeup();
                c.refresh().unwrap() == 0
            };
            producer.join().unwrap();
            if slept {
                assert!(
                    rang.load(Ordering::SeqCst),
                    "consumer slept and nobody rang"
                );
            }
        });
    }

    /// The same for a producer sleeping on a full ring.
    #[test]
    fn a_sleeping_producer_is_always_woken() {
        loom::model(|| {
            let ring = Arc::new(HeapRing::new(1));
            {
                let (mut p, _) = ring.split();
                assert!(p.push(Desc::default()));
                p.publish();
            }
            let rang = Arc::new(AtomicBool::new(false));
            let (r2, rang2) = (ring.clone(), rang.clone());
            let consumer = loom::thread::spawn(move || {
                let (_, mut c) = r2.split();
                c.refresh().unwrap();
                c.pop().unwrap();
                if c.release() {
                    rang2.store(true, Ordering::SeqCst);
                }
            });
            let (mut p, _) = ring.split();
            p.head = 1; // this handle stands for the producer that pushed above
            let slept = if p.refresh().unwrap() > 0 {
                false
            } else {
                p.arm_wakeup();
                p.refresh().unwrap() == 0
            };
            consumer.join().unwrap();
            if slept {
                assert!(
                    rang.load(Ordering::SeqCst),
                    "producer slept and nobody rang"
                );
            }
        });
    }
}
