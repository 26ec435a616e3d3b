//! The exact-flow index: an open-addressing hash table built for lookups in batches.
//!
//! A slot is 8 bytes (a 32-bit tag from the key's hash and the flow id); the 40-byte packed
//! keys, each with a 64-bit value (the owning channel), live in a separate array indexed by
//! flow id. A lookup touches one slot and one key, and
//! [`ExactIndex::get_batch`] hashes a whole batch first and prefetches every slot, then every
//! key, so the cache misses of a large table overlap instead of adding up. Linear probing at a
//! load of at most one half; deletion shifts the cluster back (no tombstones).

use std::hash::BuildHasher;

use netchannel_shm::hint::prefetch;

/// A key as the index stores it (see `table::Packed`).
pub type Key = [u8; 40];

const EMPTY: u64 = 0;

/// Flow ids by exact key.
#[derive(Debug)]
pub struct ExactIndex {
    slots: Vec<u64>,
    keys: Vec<(Key, u64)>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl Default for ExactIndex {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn slot_of(tag: u32, id: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(id)
}

impl ExactIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            slots: vec![EMPTY; 16],
            keys: Vec::new(),
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn hash(&self, k: &Key) -> (usize, u32) {
        let h = self.hasher.hash_one(k);
        // The tag is never 0, so a slot of an entry is never EMPTY.
        (
            (h as usize) & (self.slots.len() - 1),
            ((h >> 32) as u32) | 1,
        )
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The id and value stored for `k`.
    #[inline]
    pub fn get(&self, k: &Key) -> Option<(u32, u64)> {
        let (i, tag) = self.hash(k);
        self.probe(k, i, tag)
    }

    #[inline]
    fn probe(&self, k: &Key, mut i: usize, tag: u32) -> Option<(u32, u64)> {
        loop {
            let s = self.slots[i];
            if s == EMPTY {
                return None;
            }
            if (s >> 32) as u32 == tag {
                let id = s as u32;
                if let Some((key, value)) = self.keys.get(id as usize)
                    && key == k
                {
                    return Some((id, *value));
                }
            }
            i = (i + 1) & self.mask();
        }
    }

    /// Looks up many keys at once, overlapping their cache misses; `out[j]` is the id of
    /// `keys[j]`.
    pub fn get_batch(&self, keys: &[Key], out: &mut Vec<Option<(u32, u64)>>) {
        const CHUNK: usize = 16;
        out.clear();
        let mut pos = [(0usize, 0u32); CHUNK];
        for chunk in keys.chunks(CHUNK) {
            for (j, k) in chunk.iter().enumerate() {
                pos[j] = self.hash(k);
                prefetch(&self.slots[pos[j].0]);
            }
            for (j, _) in chunk.iter().enumerate() {
                let s = self.slots[pos[j].0];
                if s != EMPTY
                    && (s >> 32) as u32 == pos[j].1
                    && let Some(k) = self.keys.get(s as u32 as usize)
                {
                    prefetch(k);
                }
            }
            for (j, k) in chunk.iter().enumerate() {
                out.push(self.probe(k, pos[j].0, pos[j].1));
            }
        }
    }

    /// Stores `id` and `value` for `k` (replacing nothing: the caller checked `k` is absent).
    pub fn insert(&mut self, k: Key, id: u32, value: u64) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let idx = id as usize;
        if self.keys.len() <= idx {
            self.keys.resize(idx + 1, ([0; 40], 0));
        }
        self.keys[idx] = (k, value);
        let (mut i, tag) = self.hash(&k);
        while self.slots[i] != EMPTY {
            i = (i + 1) & self.mask();
        }
        self.slots[i] = slot_of(tag, id);
        self.len += 1;
    }

    /// Removes `k`; returns its id.
    pub fn remove(&mut self, k: &Key) -> Option<u32> {
        let (mut i, tag) = self.hash(k);
        loop {
            let s = self.slots[i];
            if s == EMPTY {
                return None;
            }
            if (s >> 32) as u32 == tag
                && self.keys.get(s as u32 as usize).is_some_and(|e| &e.0 == k)
            {
                break;
            }
            i = (i + 1) & self.mask();
        }
        let id = self.slots[i] as u32;
        // Backward-shift deletion: move later members of the cluster into the hole when their
        // home slot allows it, so probes never need tombstones.
        let mask = self.mask();
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.slots[j] != EMPTY {
            let key = &self.keys[self.slots[j] as u32 as usize].0;
            let home = self.hash(key).0;
            let dist_home_to_j = j.wrapping_sub(home) & mask;
            let dist_hole_to_j = j.wrapping_sub(hole) & mask;
            if dist_home_to_j >= dist_hole_to_j {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        Some(id)
    }

    fn grow(&mut self) {
        let bigger = vec![EMPTY; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, bigger);
        for s in old.into_iter().filter(|s| *s != EMPTY) {
            let id = s as u32;
            let (mut i, tag) = self.hash(&self.keys[id as usize].0);
            while self.slots[i] != EMPTY {
                i = (i + 1) & self.mask();
            }
            self.slots[i] = slot_of(tag, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(n: u16) -> Key {
        let mut k = [0u8; 40];
        k[..2].copy_from_slice(&n.to_le_bytes());
        k
    }

    proptest! {
        /// The index against a HashMap: inserts, removals (with cluster shifts) and batched
        /// and single lookups always agree.
        #[test]
        fn matches_a_hash_map(ops in proptest::collection::vec((any::<bool>(), 0u16..300), 1..2000)) {
            let mut ix = ExactIndex::new();
            let mut model: HashMap<Key, (u32, u64)> = HashMap::new();
            let mut next = 0u32;
            for (insert, n) in ops {
                let k = key(n);
                if insert {
                    if let std::collections::hash_map::Entry::Vacant(e) = model.entry(k) {
                        ix.insert(k, next, u64::from(n) * 7);
                        e.insert((next, u64::from(n) * 7));
                        next += 1;
                    }
                } else {
                    prop_assert_eq!(ix.remove(&k), model.remove(&k).map(|v| v.0));
                }
                prop_assert_eq!(ix.len(), model.len());
            }
            let all: Vec<Key> = (0..300).map(key).collect();
            let mut out = Vec::new();
            ix.get_batch(&all, &mut out);
            for (k, got) in all.iter().zip(&out) {
                prop_assert_eq!(*got, model.get(k).copied());
                prop_assert_eq!(ix.get(k), model.get(k).copied());
            }
        }
    }
}
