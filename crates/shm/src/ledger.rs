//! One end's private record of who holds every buffer of the pool.
//!
//! The ledger lives in the end's own heap memory, never in shared memory, and it is the truth: a
//! buffer index the peer hands over is accepted only if the ledger says the peer holds it. That
//! catches forged indices and double submissions without trusting anything the peer wrote.
//!
//! Each end has **home segments** (a user-pipe end owns half of the pool, a nexus owns all of it,
//! a nexus app none). Only the home end puts a segment in service, and only it gives the
//! segment's memory back to the OS, once every buffer of the segment is home and free.

use crate::Violation;

/// Where a buffer is, from this end's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BufState {
    /// Its segment is one of ours and not in service.
    Absent,
    /// In our free list.
    Free,
    /// Handed to our user (allocated, or received and not yet released).
    Held,
    /// With the peer, or in a ring on its way to the peer.
    Peer,
}

/// Buffer counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Buffers in segments not in service.
    pub absent: u32,
    /// Buffers in our free list.
    pub free: u32,
    /// Buffers our user holds.
    pub held: u32,
    /// Buffers with the peer.
    pub peer: u32,
}

/// What an audit of the ledger found wrong (it should never find anything).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger audit failed: {0}")]
pub struct AuditError(pub String);

/// The ownership ledger and free list of one end.
#[derive(Debug)]
pub struct Ledger {
    state: Vec<BufState>,
    /// Free buffers, one stack per segment. Allocation takes from the lowest segment that has
    /// any, so buffers in use cluster in the low segments and the high ones fall idle and can be
    /// given back to the OS.
    free: Vec<Vec<u32>>,
    /// Bit `s` set: segment `s` has free buffers.
    nonempty: Vec<u64>,
    /// Free buffers per segment (only meaningful for home segments in service).
    seg_free: Vec<u32>,
    /// Whether each segment is ours.
    home: Vec<bool>,
    /// Whether each home segment is in service.
    active: Vec<bool>,
    /// Home segments out of service: none (always so for an app's end) makes [`Ledger::grow`]
    /// answer at once, and it runs whenever an allocation finds the free list empty.
    dormant: u32,
    bufs_per_segment: u32,
    /// Whether this end owns any segment. An end that owns none (an app of a nexus) is supplied
    /// with the peer's buffers; an end that owns some only ever gets its own buffers back.
    has_home: bool,
    counts: Counts,
}

impl Ledger {
    /// A ledger for `segments` segments of `bufs_per_segment` buffers, where `home(seg)` says
    /// which segments belong to this end. Home segments start out of service; every other
    /// buffer starts with the peer.
    pub fn new(segments: u32, bufs_per_segment: u32, home: impl Fn(u32) -> bool) -> Self {
        let home: Vec<bool> = (0..segments).map(home).collect();
        let mut state = Vec::with_capacity((segments * bufs_per_segment) as usize);
        let mut counts = Counts::default();
        for &h in &home {
            let s = if h { BufState::Absent } else { BufState::Peer };
            state.extend(std::iter::repeat_n(s, bufs_per_segment as usize));
            if h {
                counts.absent += bufs_per_segment;
            } else {
                counts.peer += bufs_per_segment;
            }
        }
        Self {
            has_home: home.iter().any(|&h| h),
            dormant: home.iter().filter(|&&h| h).count() as u32,
            state,
            free: vec![Vec::new(); segments as usize],
            nonempty: vec![0; (segments as usize).div_ceil(64)],
            seg_free: vec![0; segments as usize],
            active: vec![false; segments as usize],
            home,
            bufs_per_segment,
            counts,
        }
    }

    /// Total number of buffers.
    pub fn len(&self) -> u32 {
        self.state.len() as u32
    }

    /// True if the pool has no buffers (never, for a valid geometry).
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Whether this end owns any segment.
    pub fn has_home(&self) -> bool {
        self.has_home
    }

    /// Counts by state.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// State of one buffer (`None` if out of range).
    pub fn state(&self, buf: u32) -> Option<BufState> {
        self.state.get(buf as usize).copied()
    }

    /// Segments in service.
    pub fn active_segments(&self) -> u32 {
        self.active.iter().filter(|&&a| a).count() as u32
    }

    fn segment(&self, buf: u32) -> usize {
        (buf / self.bufs_per_segment) as usize
    }

    /// Whether `buf` belongs to one of our segments.
    pub fn is_home(&self, buf: u32) -> bool {
        self.home.get(self.segment(buf)).copied().unwrap_or(false)
    }

    fn push_free(&mut self, buf: u32) {
        let seg = self.segment(buf);
        self.free[seg].push(buf);
        self.nonempty[seg / 64] |= 1 << (seg % 64);
    }

    fn pop_free(&mut self) -> Option<u32> {
        let (w, bits) = self.nonempty.iter().enumerate().find(|(_, b)| **b != 0)?;
        let seg = w * 64 + bits.trailing_zeros() as usize;
        let buf = self.free[seg].pop();
        if self.free[seg].is_empty() {
            self.nonempty[w] &= !(1 << (seg % 64));
        }
        buf
    }

    fn set(&mut self, buf: u32, to: BufState) {
        let from = self.state[buf as usize];
        for (s, d) in [(from, -1i64), (to, 1)] {
            let c = match s {
                BufState::Absent => &mut self.counts.absent,
                BufState::Free => &mut self.counts.free,
                BufState::Held => &mut self.counts.held,
                BufState::Peer => &mut self.counts.peer,
            };
            *c = (i64::from(*c) + d) as u32;
        }
        let seg = self.segment(buf);
        if from == BufState::Free {
            self.seg_free[seg] -= 1;
        }
        if to == BufState::Free {
            self.seg_free[seg] += 1;
        }
        self.state[buf as usize] = to;
    }

    /// Takes a buffer from the free list for our user.
    #[inline]
    pub fn alloc(&mut self) -> Option<u32> {
        let buf = self.pop_free()?;
        self.set(buf, BufState::Held);
        Some(buf)
    }

    /// Takes a free buffer to hand to the peer empty (the server filling the ALLOC ring).
    pub fn alloc_for_peer(&mut self) -> Option<u32> {
        let buf = self.pop_free()?;
        self.set(buf, BufState::Peer);
        Some(buf)
    }

    /// Our user hands a held buffer to the peer (transmit). Fails if our user does not hold it.
    #[inline]
    pub fn give(&mut self, buf: u32) -> Result<(), Violation> {
        match self.state(buf) {
            Some(BufState::Held) => {
                self.set(buf, BufState::Peer);
                Ok(())
            }
            Some(_) => Err(Violation::NotOwner { buf }),
            None => Err(Violation::BadIndex { buf }),
        }
    }

    /// Our user is done with a held buffer. A home buffer goes back to our free list (returns
    /// `Ok(false)`); a buffer from the peer's segments is now the peer's again and the caller
    /// must return it on the FREE/ALLOC ring (returns `Ok(true)`).
    #[inline]
    pub fn release(&mut self, buf: u32) -> Result<bool, Violation> {
        match self.state(buf) {
            Some(BufState::Held) if self.is_home(buf) => {
                self.set(buf, BufState::Free);
                self.push_free(buf);
                Ok(false)
            }
            Some(BufState::Held) => {
                self.set(buf, BufState::Peer);
                Ok(true)
            }
            Some(_) => Err(Violation::NotOwner { buf }),
            None => Err(Violation::BadIndex { buf }),
        }
    }

    /// The peer hands over a buffer carrying data (our RX): accepted only if the peer holds it.
    #[inline]
    pub fn receive(&mut self, buf: u32) -> Result<(), Violation> {
        match self.state(buf) {
            Some(BufState::Peer) => {
                self.set(buf, BufState::Held);
                Ok(())
            }
            Some(_) => Err(Violation::NotOwner { buf }),
            None => Err(Violation::BadIndex { buf }),
        }
    }

    /// The peer hands back an empty buffer (our ALLOC or FREE ring): it joins our free list.
    /// An end with home segments accepts only its own buffers back (the peer's buffers are the
    /// peer's to keep); an end without any accepts what its server supplies.
    #[inline]
    pub fn reclaim(&mut self, buf: u32) -> Result<(), Violation> {
        match self.state(buf) {
            Some(BufState::Peer) if self.has_home && !self.is_home(buf) => {
                Err(Violation::NotOwner { buf })
            }
            Some(BufState::Peer) => {
                self.set(buf, BufState::Free);
                self.push_free(buf);
                Ok(())
            }
            Some(_) => Err(Violation::NotOwner { buf }),
            None => Err(Violation::BadIndex { buf }),
        }
    }

    /// Takes back every buffer the peer holds (after the peer died or was revoked): each goes
    /// to our free list if it is a home buffer, and is otherwise marked held by nobody, i.e.
    /// left with the peer. Returns how many came home.
    pub fn reclaim_all_from_peer(&mut self) -> u32 {
        let mut n = 0;
        for buf in 0..self.len() {
            if self.state[buf as usize] == BufState::Peer && self.is_home(buf) {
                self.set(buf, BufState::Free);
                self.push_free(buf);
                n += 1;
            }
        }
        n
    }

    /// Puts the next home segment in service; its buffers join the free list. Returns the
    /// segment, or `None` when every home segment is already in service.
    pub fn grow(&mut self) -> Option<u32> {
        if self.dormant == 0 {
            return None;
        }
        let seg = (0..self.home.len()).find(|&s| self.home[s] && !self.active[s])?;
        self.activate(seg);
        Some(seg as u32)
    }

    /// Puts back in service a segment that [`Ledger::shrink`] just took out, when its memory
    /// could not be given back after all (the ledger says what is true: it is still there).
    pub fn restore(&mut self, seg: u32) {
        let s = seg as usize;
        if s < self.home.len() && self.home[s] && !self.active[s] {
            self.activate(s);
        }
    }

    fn activate(&mut self, seg: usize) {
        self.active[seg] = true;
        self.dormant -= 1;
        let first = seg as u32 * self.bufs_per_segment;
        // Push in reverse so the lowest index is allocated first.
        for buf in (first..first + self.bufs_per_segment).rev() {
            self.set(buf, BufState::Free);
            self.push_free(buf);
        }
    }

    /// Takes one idle home segment (all its buffers home and free) out of service, the highest
    /// first. Returns it so the caller can give its memory back, or `None` if none is idle.
    pub fn shrink(&mut self) -> Option<u32> {
        let seg = (0..self.home.len())
            .rev()
            .find(|&s| self.active[s] && self.seg_free[s] == self.bufs_per_segment)?;
        self.active[seg] = false;
        self.dormant += 1;
        let first = seg as u32 * self.bufs_per_segment;
        let range = first..first + self.bufs_per_segment;
        self.free[seg].clear();
        self.nonempty[seg / 64] &= !(1 << (seg % 64));
        for buf in range {
            self.set(buf, BufState::Absent);
        }
        Some(seg as u32)
    }

    /// Recounts everything from scratch and checks the invariants: each buffer in exactly one
    /// state, counts that add up, a free list with no duplicates and only free buffers, and
    /// absent buffers only in home segments out of service.
    pub fn audit(&self) -> Result<Counts, AuditError> {
        let mut c = Counts::default();
        let mut in_free_list = vec![false; self.state.len()];
        for (seg, stack) in self.free.iter().enumerate() {
            let marked = self.nonempty[seg / 64] & (1 << (seg % 64)) != 0;
            if marked == stack.is_empty() {
                return Err(AuditError(format!(
                    "segment {seg}: free-list bitmap disagrees with its stack"
                )));
            }
        }
        for &b in self.free.iter().flatten() {
            let slot = in_free_list
                .get_mut(b as usize)
                .ok_or_else(|| AuditError(format!("free list holds index {b}")))?;
            if std::mem::replace(slot, true) {
                return Err(AuditError(format!("buffer {b} is twice in the free list")));
            }
        }
        for (i, s) in self.state.iter().enumerate() {
            let seg = i / self.bufs_per_segment as usize;
            match s {
                BufState::Absent => {
                    c.absent += 1;
                    if !self.home[seg] || self.active[seg] {
                        return Err(AuditError(format!(
                            "buffer {i} absent in a segment in service or not ours"
                        )));
                    }
                }
                BufState::Free => {
                    c.free += 1;
                    if self.has_home && !self.home[seg] {
                        return Err(AuditError(format!(
                            "buffer {i} of the peer's segments is in our free list"
                        )));
                    }
                }
                BufState::Held => c.held += 1,
                BufState::Peer => c.peer += 1,
            }
            if (*s == BufState::Free) != in_free_list[i] {
                return Err(AuditError(format!(
                    "buffer {i} is {s:?} but free-list membership is {}",
                    in_free_list[i]
                )));
            }
        }
        if c != self.counts {
            return Err(AuditError(format!(
                "recount {c:?} differs from running counts {:?}",
                self.counts
            )));
        }
        if c.absent + c.free + c.held + c.peer != self.len() {
            return Err(AuditError("counts do not add up to the pool size".into()));
        }
        let dormant = (self.home.iter().zip(&self.active)).filter(|&(&h, &a)| h && !a);
        if dormant.count() != self.dormant as usize {
            return Err(AuditError(format!(
                "{} home segments counted out of service, not as many as there are",
                self.dormant
            )));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn forged_and_double_submissions_are_refused() {
        let mut l = Ledger::new(2, 4, |s| s == 0);
        l.grow().unwrap();
        let a = l.alloc().unwrap();
        assert_eq!(
            l.receive(a),
            Err(Violation::NotOwner { buf: a }),
            "we hold it ourselves"
        );
        l.give(a).unwrap();
        assert_eq!(
            l.give(a),
            Err(Violation::NotOwner { buf: a }),
            "given twice"
        );
        l.receive(a).unwrap();
        assert_eq!(
            l.receive(a),
            Err(Violation::NotOwner { buf: a }),
            "received twice"
        );
        assert_eq!(l.receive(99), Err(Violation::BadIndex { buf: 99 }));
        assert_eq!(
            l.reclaim(1),
            Err(Violation::NotOwner { buf: 1 }),
            "free buffer of ours"
        );
        l.receive(5).unwrap(); // a peer buffer
        assert_eq!(l.release(5), Ok(true), "peer buffers go back to the peer");
        assert_eq!(l.release(a), Ok(false), "home buffers go to the free list");
        l.audit().unwrap();
    }

    #[test]
    fn allocation_prefers_the_lowest_segment() {
        let mut l = Ledger::new(4, 4, |_| true);
        for _ in 0..4 {
            l.grow();
        }
        let all: Vec<u32> = (0..16).map(|_| l.alloc().unwrap()).collect();
        for b in all.iter().rev() {
            l.release(*b).unwrap();
        }
        // Whatever order they came back in, the next allocations come from segment 0 first.
        let again: Vec<u32> = (0..4).map(|_| l.alloc().unwrap()).collect();
        assert!(again.iter().all(|b| *b < 4), "{again:?}");
        assert_eq!(l.shrink(), Some(3));
    }

    #[test]
    fn shrink_takes_only_idle_segments() {
        let mut l = Ledger::new(3, 4, |_| true);
        l.grow();
        let held = l.alloc().unwrap(); // from segment 0
        l.grow();
        assert_eq!(l.shrink(), Some(1));
        assert_eq!(l.shrink(), None, "segment 0 has a buffer out");
        l.release(held).unwrap();
        assert_eq!(l.shrink(), Some(0));
        assert_eq!(l.counts().absent, 12);
        l.audit().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Give(usize),
        Release(usize),
        PeerSends(u32),
        PeerReturns(u32),
        Grow,
        Shrink,
        ReclaimAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Give),
            3 => any::<usize>().prop_map(Op::Release),
            3 => (0u32..40).prop_map(Op::PeerSends),
            3 => (0u32..40).prop_map(Op::PeerReturns),
            1 => Just(Op::Grow),
            1 => Just(Op::Shrink),
            1 => Just(Op::ReclaimAll),
        ]
    }

    proptest! {
        /// The ledger against a map model: every buffer in exactly one place, never lost, never
        /// duplicated, and every peer hand-over accepted exactly when the model says the peer
        /// holds that buffer.
        #[test]
        fn ledger_matches_a_model(ops in proptest::collection::vec(op(), 1..300)) {
            let (segs, per) = (4u32, 8u32);
            let home = |s: u32| s.is_multiple_of(2);
            let mut l = Ledger::new(segs, per, home);
            let mut model: BTreeMap<u32, BufState> = (0..segs * per)
                .map(|b| (b, if home(b / per) { BufState::Absent } else { BufState::Peer }))
                .collect();
            let mut held: Vec<u32> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc => match l.alloc() {
                        Some(b) => {
                            prop_assert_eq!(model[&b], BufState::Free);
                            model.insert(b, BufState::Held);
                            held.push(b);
                        }
                        None => prop_assert!(model.values().all(|s| *s != BufState::Free)),
                    },
                    Op::Give(i) if !held.is_empty() => {
                        let b = held.swap_remove(i % held.len());
                        l.give(b).unwrap();
                        model.insert(b, BufState::Peer);
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let b = held.swap_remove(i % held.len());
                        let back = l.release(b).unwrap();
                        prop_assert_eq!(back, !home(b / per));
                        model.insert(b, if back { BufState::Peer } else { BufState::Free });
                    }
                    Op::Give(_) | Op::Release(_) => {}
                    Op::PeerSends(b) => {
                        let ok = l.receive(b).is_ok();
                        prop_assert_eq!(ok, model.get(&b) == Some(&BufState::Peer));
                        if ok { model.insert(b, BufState::Held); held.push(b); }
                    }
                    Op::PeerReturns(b) => {
                        let ok = l.reclaim(b).is_ok();
                        prop_assert_eq!(ok, model.get(&b) == Some(&BufState::Peer) && home(b / per));
                        if ok { model.insert(b, BufState::Free); }
                    }
                    Op::Grow => if let Some(s) = l.grow() {
                        for b in s * per..(s + 1) * per {
                            prop_assert_eq!(model[&b], BufState::Absent);
                            model.insert(b, BufState::Free);
                        }
                    },
                    Op::Shrink => if let Some(s) = l.shrink() {
                        for b in s * per..(s + 1) * per {
                            prop_assert_eq!(model[&b], BufState::Free);
                            model.insert(b, BufState::Absent);
                        }
                    },
                    Op::ReclaimAll => {
                        l.reclaim_all_from_peer();
                        for (b, s) in model.iter_mut() {
                            if *s == BufState::Peer && home(b / per) { *s = BufState::Free; }
                        }
                    }
                }
                for (&b, &s) in &model {
                    prop_assert_eq!(l.state(b), Some(s), "buffer {}", b);
                }
                l.audit().map_err(|e| TestCaseError::fail(e.0))?;
            }
        }
    }
}
