//! [`AddrTable`]: used blocks by address, for the pools' frees.
//!
//! A chained hash table whose chains run through the block records themselves: a bucket holds
//! the slot of one used block, and that block's record holds the next ([`Block::chain`]). A used
//! block is never in the free index, so the record's tree links are free to carry the chain.
//! Buckets are chosen by Fibonacci hashing (the address times 2^64 / φ, top bits), and there are
//! at least four times as many buckets as used blocks, so a chain is usually one block long: an
//! insert is two stores, and a removal reads the bucket and the record the caller wants next
//! anyway. No loop runs in the common case, so the branches are predictable.
//!
//! Only addresses and slots are stored: nothing here touches the blocks' memory.

#[cfg(test)]
use alloc::vec;
use alloc::vec::Vec;

#[cfg(test)]
use super::free_index::Block;
use super::free_index::{Records, Recs, NIL};

/// 2^64 / φ, odd: multiplying by it spreads every address bit into the top bits.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;
const MIN_BITS: u32 = 4;

/// Used blocks by address, chained through their records. See the [module docs](self).
pub(crate) struct AddrTable {
    /// The first block of each bucket's chain (`NIL`: none); the length is a power of two.
    buckets: Vec<u32>,
    /// `buckets.len() - 1`.
    mask: usize,
    len: usize,
    /// `64 - log2(buckets)`.
    shift: u32,
}

impl AddrTable {
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        AddrTable { buckets: vec![NIL; 1 << MIN_BITS], mask: (1 << MIN_BITS) - 1, len: 0, shift: 64 - MIN_BITS }
    }

    /// An empty table, or `None` when the allocator cannot give its memory.
    pub(crate) fn try_new() -> Option<Self> {
        let mut buckets = Vec::new();
        buckets.try_reserve_exact(1 << MIN_BITS).ok()?;
        buckets.resize(1 << MIN_BITS, NIL);
        Some(AddrTable { buckets, mask: (1 << MIN_BITS) - 1, len: 0, shift: 64 - MIN_BITS })
    }

    /// How many blocks are stored.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn bucket(&self, addr: usize) -> usize {
        ((addr as u64).wrapping_mul(FIBONACCI) >> self.shift) as usize & self.mask
    }

    /// Bucket `h` (reduced by the mask, so never out of bounds).
    #[inline(always)]
    fn head(&mut self, h: usize) -> &mut u32 {
        debug_assert!(h <= self.mask);
        // SAFETY: `buckets.len()` is `mask + 1` (both change together, in `new` and `grow`).
        unsafe { self.buckets.get_unchecked_mut(h & self.mask) }
    }

    /// Grows the table, if need be, so that one more block can be stored; `Err` with the bytes
    /// asked for (the table as it was) when the allocator cannot give the larger table.
    #[inline(always)]
    pub(crate) fn reserve_one(&mut self, blocks: &mut Records) -> Result<(), usize> {
        if self.len * 4 >= self.buckets.len() {
            return self.grow(blocks);
        }
        Ok(())
    }

    /// Stores used block `slot` under its address. The caller makes sure no stored block has
    /// that address, and has called [`reserve_one`](Self::reserve_one) (without it the chains
    /// grow long, but stay correct).
    #[inline(always)]
    pub(crate) fn insert(&mut self, blocks: &mut Recs<'_>, slot: u32) {
        let b = &mut blocks[slot];
        let h = self.bucket(b.addr);
        let head = self.head(h);
        *b.chain_mut() = *head;
        *head = slot;
        self.len += 1;
    }

    /// The stored block at `addr`.
    pub(crate) fn get(&self, blocks: &Records, addr: usize) -> Option<u32> {
        let mut cur = self.buckets[self.bucket(addr)];
        let mut steps = 0;
        while cur != NIL && steps <= self.len {
            let b = blocks.get(cur)?;
            if b.addr == addr {
                return Some(cur);
            }
            cur = b.chain();
            steps += 1;
        }
        None
    }

    /// Removes the stored block at `addr` and returns its slot.
    #[inline(always)]
    pub(crate) fn remove(&mut self, blocks: &mut Recs<'_>, addr: usize) -> Option<u32> {
        let h = self.bucket(addr);
        let head = *self.head(h);
        let b = blocks.get(head)?;
        if b.addr == addr {
            *self.head(h) = b.chain();
            self.len -= 1;
            return Some(head);
        }
        self.remove_further(blocks, head, addr)
    }

    /// Removes the block at `addr` from the chain after `head`.
    #[inline(never)]
    fn remove_further(&mut self, blocks: &mut Recs<'_>, head: u32, addr: usize) -> Option<u32> {
        let mut prev = head;
        for _ in 0..self.len {
            let cur = blocks.get(prev)?.chain();
            let b = blocks.get(cur)?;
            if b.addr == addr {
                let next = b.chain();
                *blocks[prev].chain_mut() = next;
                self.len -= 1;
                return Some(cur);
            }
            prev = cur;
        }
        None
    }

    /// Every stored slot, bucket by bucket.
    pub(crate) fn slots<'a>(&'a self, blocks: &'a Records) -> impl Iterator<Item = u32> + 'a {
        self.buckets.iter().flat_map(move |&head| {
            let mut cur = head;
            core::iter::from_fn(move || {
                let slot = cur;
                cur = blocks.get(slot)?.chain();
                Some(slot)
            })
        })
    }

    /// Whether every chain ends, holds only blocks that `used` says are used and that hash to
    /// its bucket, and the chains hold `len` blocks in all.
    pub(crate) fn consistent(&self, blocks: &Records, used: impl Fn(u32) -> bool) -> bool {
        let mut count = 0;
        for (h, &head) in self.buckets.iter().enumerate() {
            let mut cur = head;
            while cur != NIL {
                count += 1;
                let Some(b) = blocks.get(cur) else {
                    return false;
                };
                if count > self.len || !used(cur) || self.bucket(b.addr) != h {
                    return false;
                }
                cur = b.chain();
            }
        }
        count == self.len
    }

    /// Doubles the buckets and moves every chain's blocks into them. The new buckets are
    /// allocated first, fallibly: on failure nothing has changed.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, blocks: &mut Records) -> Result<(), usize> {
        let bits = self.buckets.len().trailing_zeros() + 1;
        let mut buckets = Vec::new();
        if buckets.try_reserve_exact(1 << bits).is_err() {
            return Err((1usize << bits).saturating_mul(core::mem::size_of::<u32>()));
        }
        buckets.resize(1 << bits, NIL);
        let old = core::mem::replace(&mut self.buckets, buckets);
        self.mask = (1 << bits) - 1;
        self.shift = 64 - bits;
        for head in old {
            let mut slot = head;
            // Each block is moved once: `len` bounds the walk should a chain be broken.
            for _ in 0..self.len {
                let Some(b) = blocks.get(slot) else { break };
                let (next, h) = (b.chain(), self.bucket(b.addr));
                *blocks[slot].chain_mut() = self.buckets[h];
                self.buckets[h] = slot;
                slot = next;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    /// A table with block records of its own.
    struct Keyed {
        table: AddrTable,
        blocks: Records,
        len: u32,
    }

    impl Keyed {
        fn new() -> Self {
            Keyed { table: AddrTable::new(), blocks: Records::new(), len: 0 }
        }
        fn insert(&mut self, addr: usize) -> u32 {
            let mut b = Block::new(addr, 16);
            b.set_used(true);
            let slot = self.len;
            self.len += 1;
            self.blocks.reach(slot);
            self.blocks[slot] = b;
            self.table.reserve_one(&mut self.blocks).unwrap();
            self.table.insert(&mut self.blocks.view(), slot);
            slot
        }
        fn get(&self, addr: usize) -> Option<u32> {
            self.table.get(&self.blocks, addr)
        }
        fn remove(&mut self, addr: usize) -> Option<u32> {
            let slot = self.table.remove(&mut self.blocks.view(), addr)?;
            self.blocks[slot].set_used(false);
            Some(slot)
        }
        fn consistent(&self) -> bool {
            self.table.consistent(&self.blocks, |s| self.blocks[s].used())
        }
    }

    #[test]
    fn stores_finds_and_removes_aligned_addresses() {
        let mut t = Keyed::new();
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
        assert_eq!(t.table.slots(&t.blocks).count(), 2500);
    }

    #[test]
    fn a_block_in_the_wrong_chain_is_caught() {
        let mut t = Keyed::new();
        t.insert(0x5000);
        t.insert(0x6000);
        assert!(t.consistent());
        // Move a stored block without telling the table.
        let moved = (1..64).map(|i| 0x6000 + i * 0x10_0000).find(|&a| t.table.bucket(a) != t.table.bucket(0x6000));
        t.blocks[1].addr = moved.unwrap();
        assert!(!t.consistent());
        t.blocks[1].addr = 0x6000;
        t.blocks[0].set_used(false);
        assert!(!t.consistent());
    }

    proptest! {
        #[test]
        fn matches_a_map(ops in prop::collection::vec((any::<bool>(), 1usize..64), 1..400)) {
            // Few distinct keys, often in one bucket: multiples of a large power of two.
            let mut t = Keyed::new();
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
