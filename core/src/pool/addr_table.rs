//! [`AddrTable`]: block slots by address, for the pools' frees.
//!
//! An open-addressing hash table with linear probing: one array of `(address, slot)` entries,
//! Fibonacci hashing (the address times 2^64 / φ, top bits), deletion by shifting the entries
//! that follow back into the hole, so no tombstones build up. A lookup is one multiply and, at a
//! load of at most one half, about one or two entries read, usually in one cache line.
//!
//! Address 0 marks an empty entry: the pools only store the addresses of non-null pointers.

use alloc::vec;
use alloc::vec::Vec;

const EMPTY: usize = 0;
/// 2^64 / φ, odd: multiplying by it spreads every address bit into the top bits.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;
const MIN_CAPACITY: usize = 16;

#[derive(Clone, Copy)]
struct Entry {
    addr: usize,
    slot: u32,
}

const VACANT: Entry = Entry { addr: EMPTY, slot: 0 };

/// Block slots by non-zero address. See the [module docs](self).
pub(crate) struct AddrTable {
    entries: Vec<Entry>,
    len: usize,
    /// `64 - log2(capacity)`: the hash keeps the product's top bits.
    shift: u32,
}

impl AddrTable {
    pub(crate) fn new() -> Self {
        AddrTable { entries: Vec::new(), len: 0, shift: 64 }
    }

    /// How many addresses are stored.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, addr: usize) -> usize {
        ((addr as u64).wrapping_mul(FIBONACCI) >> self.shift) as usize
    }

    /// Stores `slot` for `addr` (non-zero), replacing what was there.
    #[inline]
    pub(crate) fn insert(&mut self, addr: usize, slot: u32) {
        debug_assert!(addr != EMPTY);
        if (self.len + 1) * 2 > self.entries.len() {
            self.grow();
        }
        let mask = self.entries.len() - 1;
        let mut i = self.home(addr);
        loop {
            let e = &mut self.entries[i];
            if e.addr == EMPTY {
                *e = Entry { addr, slot };
                self.len += 1;
                return;
            }
            if e.addr == addr {
                e.slot = slot;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Where `addr` is stored, if it is.
    #[inline]
    fn find(&self, addr: usize) -> Option<usize> {
        if self.len == 0 || addr == EMPTY {
            return None;
        }
        let mask = self.entries.len() - 1;
        let mut i = self.home(addr);
        loop {
            let e = self.entries[i].addr;
            if e == addr {
                return Some(i);
            }
            if e == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot stored for `addr`.
    pub(crate) fn get(&self, addr: usize) -> Option<u32> {
        self.find(addr).map(|i| self.entries[i].slot)
    }

    /// Removes `addr` and returns its slot.
    #[inline]
    pub(crate) fn remove(&mut self, addr: usize) -> Option<u32> {
        let mut hole = self.find(addr)?;
        let slot = self.entries[hole].slot;
        let mask = self.entries.len() - 1;
        // Shift back every entry of the run after the hole that may live there: those whose
        // home is not in (hole, j] (cyclically), so that each stays reachable from its home.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e.addr == EMPTY {
                break;
            }
            let home = self.home(e.addr);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = VACANT;
        self.len -= 1;
        Some(slot)
    }

    /// Every `(address, slot)`, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.entries.iter().filter(|e| e.addr != EMPTY).map(|e| (e.addr, e.slot))
    }

    /// Whether every entry is reachable from its home, and the count is right.
    pub(crate) fn consistent(&self) -> bool {
        self.iter().count() == self.len && self.iter().all(|(addr, slot)| self.get(addr) == Some(slot))
    }

    #[cold]
    fn grow(&mut self) {
        let capacity = (self.entries.len() * 2).max(MIN_CAPACITY);
        let old = core::mem::replace(&mut self.entries, vec![VACANT; capacity]);
        self.shift = 64 - capacity.trailing_zeros();
        self.len = 0;
        for e in old.into_iter().filter(|e| e.addr != EMPTY) {
            self.insert(e.addr, e.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    #[test]
    fn stores_finds_and_removes_aligned_addresses() {
        let mut table = AddrTable::new();
        assert_eq!((table.get(0x1000), table.remove(0x1000)), (None, None));
        for i in 1..=5000usize {
            table.insert(i * 4096, i as u32);
        }
        assert_eq!(table.len(), 5000);
        assert!(table.consistent());
        for i in (1..=5000usize).step_by(2) {
            assert_eq!(table.remove(i * 4096), Some(i as u32));
        }
        assert_eq!(table.remove(4096), None);
        assert_eq!(table.len(), 2500);
        assert!((1..=5000usize).all(|i| table.get(i * 4096) == (i % 2 == 0).then_some(i as u32)));
        assert!(table.consistent());
        table.insert(2 * 4096, 7);
        assert_eq!((table.get(2 * 4096), table.len()), (Some(7), 2500));
    }

    proptest! {
        #[test]
        fn matches_a_map(ops in prop::collection::vec((any::<bool>(), 1usize..64, any::<u32>()), 1..400)) {
            // Few distinct keys that collide often: multiples of a large power of two.
            let mut table = AddrTable::new();
            let mut model = BTreeMap::new();
            for (insert, key, slot) in ops {
                let addr = key << 20;
                if insert {
                    table.insert(addr, slot);
                    model.insert(addr, slot);
                } else {
                    prop_assert_eq!(table.remove(addr), model.remove(&addr));
                }
                prop_assert!(table.consistent());
                prop_assert_eq!(table.len(), model.len());
            }
            for (&addr, &slot) in &model {
                prop_assert_eq!(table.get(addr), Some(slot));
            }
        }
    }
}
