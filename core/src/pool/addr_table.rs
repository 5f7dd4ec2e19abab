//! [`AddrTable`]: block slots by address, for the pools' frees.
//!
//! An open-addressing hash table with linear probing over 8-byte entries: a block slot and a
//! 32-bit fingerprint of its address, the top half of the address times 2^64 / φ (Fibonacci
//! hashing). The entry's home is the fingerprint's top bits, so the table never needs the
//! address itself to rehash or to shift entries back on removal (no tombstones build up). The
//! address lives in the owner's block record: a lookup compares fingerprints, then asks the owner
//! whether the slot is the one (`is`), which reads the record the caller wants next anyway. The
//! load stays at most one quarter, so a lookup usually reads one entry (eight share a cache line)
//! and the loops take the same, predictable path.

use alloc::vec;
use alloc::vec::Vec;

/// 2^64 / φ, odd: multiplying by it spreads every address bit into the top bits.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;
const MIN_BITS: u32 = 4;
const VACANT: u64 = u64::MAX;

#[inline]
fn fingerprint(addr: usize) -> u32 {
    ((addr as u64).wrapping_mul(FIBONACCI) >> 32) as u32
}

#[inline]
fn entry(fp: u32, slot: u32) -> u64 {
    u64::from(fp) << 32 | u64::from(slot)
}

/// Block slots by address. See the [module docs](self).
pub(crate) struct AddrTable {
    /// `fingerprint << 32 | slot`, or `VACANT`; the length is a power of two (or zero).
    entries: Vec<u64>,
    len: usize,
    /// `32 - log2(capacity)`: a fingerprint's home is its top bits.
    shift: u32,
}

impl AddrTable {
    pub(crate) fn new() -> Self {
        AddrTable { entries: Vec::new(), len: 0, shift: 32 }
    }

    /// How many slots are stored.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, fp: u32) -> usize {
        (u64::from(fp) >> self.shift) as usize
    }

    /// Stores `slot` under `addr`. The caller makes sure `addr` is not stored yet (a second
    /// entry would shadow nothing and be found only through `is`).
    #[inline]
    pub(crate) fn insert(&mut self, addr: usize, slot: u32) {
        if (self.len + 1) * 4 > self.entries.len() {
            self.grow();
        }
        let fp = fingerprint(addr);
        let mask = self.entries.len() - 1;
        let mut i = self.home(fp);
        while self.entries[i] != VACANT {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry(fp, slot);
        self.len += 1;
    }

    /// Where the slot stored under `addr` is: the entry whose fingerprint matches and whose slot
    /// `is(slot)` confirms.
    #[inline]
    fn find(&self, addr: usize, is: impl Fn(u32) -> bool) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let fp = fingerprint(addr);
        let mask = self.entries.len() - 1;
        let mut i = self.home(fp);
        loop {
            let e = self.entries[i];
            if e == VACANT {
                return None;
            }
            if (e >> 32) as u32 == fp && is(e as u32) {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot stored under `addr` (see [`find`](Self::find) for `is`).
    #[inline]
    pub(crate) fn get(&self, addr: usize, is: impl Fn(u32) -> bool) -> Option<u32> {
        self.find(addr, is).map(|i| self.entries[i] as u32)
    }

    /// Removes the slot stored under `addr` and returns it (see [`find`](Self::find) for `is`).
    #[inline]
    pub(crate) fn remove(&mut self, addr: usize, is: impl Fn(u32) -> bool) -> Option<u32> {
        let mut hole = self.find(addr, is)?;
        let slot = self.entries[hole] as u32;
        let mask = self.entries.len() - 1;
        // Shift back every entry of the run after the hole that may live there: those whose
        // home is not in (hole, j] (cyclically), so that each stays reachable from its home.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e == VACANT {
                break;
            }
            let home = self.home((e >> 32) as u32);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = VACANT;
        self.len -= 1;
        Some(slot)
    }

    /// Every slot, in no particular order.
    pub(crate) fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().filter(|&&e| e != VACANT).map(|&e| e as u32)
    }

    /// Whether the count is right and each slot is stored under the fingerprint of `addr(slot)`
    /// and reachable from its home (no vacant entry between the two).
    pub(crate) fn consistent(&self, addr: impl Fn(u32) -> Option<usize>) -> bool {
        let mask = self.entries.len().wrapping_sub(1);
        let reachable = |i: usize, e: u64| {
            let mut j = self.home((e >> 32) as u32);
            while j != i {
                if self.entries[j] == VACANT {
                    return false;
                }
                j = (j + 1) & mask;
            }
            true
        };
        let mut count = 0;
        for (i, &e) in self.entries.iter().enumerate().filter(|(_, &e)| e != VACANT) {
            count += 1;
            if addr(e as u32).map(fingerprint) != Some((e >> 32) as u32) || !reachable(i, e) {
                return false;
            }
        }
        count == self.len
    }

    #[cold]
    fn grow(&mut self) {
        let bits = if self.entries.is_empty() { MIN_BITS } else { self.entries.len().trailing_zeros() + 1 };
        let old = core::mem::replace(&mut self.entries, vec![VACANT; 1 << bits]);
        self.shift = 32u32.saturating_sub(bits);
        self.len = 0;
        let mask = self.entries.len() - 1;
        for e in old.into_iter().filter(|&e| e != VACANT) {
            let mut i = self.home((e >> 32) as u32);
            while self.entries[i] != VACANT {
                i = (i + 1) & mask;
            }
            self.entries[i] = e;
            self.len += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    /// A table with its own "block records": slot `s` holds address `addrs[s]`.
    struct Keyed {
        table: AddrTable,
        addrs: Vec<usize>,
    }

    impl Keyed {
        fn insert(&mut self, addr: usize) -> u32 {
            self.addrs.push(addr);
            let slot = (self.addrs.len() - 1) as u32;
            self.table.insert(addr, slot);
            slot
        }
        fn get(&self, addr: usize) -> Option<u32> {
            self.table.get(addr, |s| self.addrs[s as usize] == addr)
        }
        fn remove(&mut self, addr: usize) -> Option<u32> {
            let addrs = &self.addrs;
            self.table.remove(addr, |s| addrs[s as usize] == addr)
        }
        fn consistent(&self) -> bool {
            self.table.consistent(|s| self.addrs.get(s as usize).copied())
        }
    }

    #[test]
    fn stores_finds_and_removes_aligned_addresses() {
        let mut t = Keyed { table: AddrTable::new(), addrs: Vec::new() };
        assert_eq!((t.get(0x1000), t.remove(0x1000)), (None, None));
        for i in 1..=5000usize {
            assert_eq!(t.insert(i * 4096), i as u32 - 1);
        }
        assert_eq!(t.table.len(), 5000);
        assert!(t.consistent());
        for i in (1..=5000usize).step_by(2) {
            assert_eq!(t.remove(i * 4096), Some(i as u32 - 1));
        }
        assert_eq!(t.remove(4096), None);
        assert_eq!(t.table.len(), 2500);
        assert!((1..=5000usize).all(|i| t.get(i * 4096) == (i % 2 == 0).then_some(i as u32 - 1)));
        assert!(t.consistent());
        assert_eq!(t.table.slots().count(), 2500);
    }

    #[test]
    fn a_wrong_fingerprint_or_slot_is_caught() {
        let mut t = Keyed { table: AddrTable::new(), addrs: Vec::new() };
        t.insert(0x5000);
        t.insert(0x6000);
        assert!(t.consistent());
        t.addrs[1] = 0x7000;
        assert!(!t.consistent());
        assert_eq!(t.get(0x6000), None);
    }

    proptest! {
        #[test]
        fn matches_a_map(ops in prop::collection::vec((any::<bool>(), 1usize..64), 1..400)) {
            // Few distinct keys, often colliding: multiples of a large power of two.
            let mut t = Keyed { table: AddrTable::new(), addrs: Vec::new() };
            let mut model = BTreeMap::new();
            for (insert, key) in ops {
                let addr = key << 20;
                if insert {
                    if let alloc::collections::btree_map::Entry::Vacant(e) = model.entry(addr) {
                        e.insert(t.insert(addr));
                    }
                } else {
                    prop_assert_eq!(t.remove(addr), model.remove(&addr));
                }
                prop_assert!(t.consistent());
                prop_assert_eq!(t.table.len(), model.len());
            }
            for (&addr, &slot) in &model {
                prop_assert_eq!(t.get(addr), Some(slot));
            }
        }
    }
}
