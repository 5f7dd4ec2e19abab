//! [`FreeIndex`]: the free blocks of a pool, by size, for exact best fit in O(log n).
//!
//! Sizes fall into bins: the power of two of the size, split into 256 linear sub-bins (as in
//! TLSF, with finer steps; sizes below 256 get a bin each). A two-level bitmap says which bins
//! hold blocks, so the first bin that can serve a request is found with a few bit operations. The
//! bins are narrow so that most hold one block or none: the common operations then take the
//! same, predictable path (set or clear a root and a bit), which matters more than their
//! instruction count. Inside a
//! bin, blocks form a treap (a binary search tree balanced by random priorities, expected depth
//! O(log n)) ordered by `(size, address)`. Best fit is the smallest key `>= (size, 0)` in the
//! request's own bin, else the smallest key of the next non-empty bin: the smallest block that
//! holds the request, the lowest address among equals, as an ordered multimap by size gives it.
//! A bin spans 1/256 of a power of two, so its treap is usually one node.
//!
//! The treaps are threaded through the owner's block records ([`Block`]): one record per block,
//! holding the block's place in memory, its neighbours and its tree links, so an operation reads
//! each block it visits once, and allocates nothing. Priorities are a hash of the record's slot.
//!
//! Only sizes and addresses are stored: nothing here touches the blocks' memory.

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

const SUB_BITS: usize = 8;
const SUB_BINS: usize = 1 << SUB_BITS;
const BINS: usize = usize::BITS as usize * SUB_BINS;
const _: () = assert!(BINS % 64 == 0 && (usize::BITS as usize - SUB_BITS + 1) * SUB_BINS <= BINS);
const WORDS: usize = BINS / 64;
const SUMMARY_WORDS: usize = WORDS.div_ceil(64);
/// No block.
pub(crate) const NIL: u32 = u32::MAX;
/// A record's bin while it is not in the index.
const UNINDEXED: u16 = u16::MAX;
const _: () = assert!(BINS <= UNINDEXED as usize && core::mem::size_of::<Block>() == 64);

/// The bin of a non-zero size. Bins are ordered: a larger size never falls in a lower bin.
#[inline]
fn bin_of(size: usize) -> usize {
    debug_assert!(size > 0);
    let log = (usize::BITS - 1 - size.leading_zeros()) as usize;
    // Below 256 the bin is the size; from 256 on, `size >> shift` keeps the top 9 bits
    // (256..=511), and each doubling moves up 256 bins.
    let shift = log.saturating_sub(SUB_BITS);
    (size >> shift) + (shift << SUB_BITS)
}

/// A record's heap priority: a hash of its slot. Slots are handed out independently of sizes,
/// so this is as good as random for the treap, and needs no storage.
#[inline]
fn priority(slot: u32) -> u32 {
    let mut x = u64::from(slot).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 32;
    (x.wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 32) as u32
}

/// A block's place in the index: `(size, address)`.
type Key = (usize, usize);

/// One block of memory, as its owner and the index see it: one cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Block {
    /// Where the block starts, and its size.
    pub addr: usize,
    pub size: usize,
    /// While the block is free: the index's tree links (smaller keys, larger keys). While it is
    /// used: `child[0]` chains it in the address table's bucket ([`chain`](Self::chain)).
    child: [u32; 2],
    /// The owner's address-order neighbours in the same chunk (`NIL` at either end).
    pub prev: u32,
    pub next: u32,
    /// The owner's chunk number.
    pub chunk: u32,
    /// Allocated (the owner's flag).
    pub used: bool,
    /// While the block is in the index: its bin (so a removal need not work it out again);
    /// `UNINDEXED` otherwise.
    bin: u16,
    /// For a used block: the size asked for, and the allocation's sequence number.
    pub requested: usize,
    pub seq: u64,
    /// The chunk's base pointer: the block's pointer is derived from it (so host memory keeps
    /// its provenance) without a look at the chunk table.
    pub base: NonNull<u8>,
}

impl Block {
    /// A free, unindexed block.
    pub(crate) fn new(addr: usize, size: usize, chunk: u32, base: NonNull<u8>) -> Self {
        Block {
            addr,
            size,
            child: [NIL; 2],
            prev: NIL,
            next: NIL,
            chunk,
            used: false,
            bin: UNINDEXED,
            requested: 0,
            seq: 0,
            base,
        }
    }

    #[inline]
    fn key(&self) -> Key {
        (self.size, self.addr)
    }

    /// Whether the block is in the index.
    #[inline]
    pub(crate) fn indexed(&self) -> bool {
        self.bin != UNINDEXED
    }

    /// A used block's next block in its address-table bucket.
    #[inline(always)]
    pub(crate) fn chain(&self) -> u32 {
        self.child[0]
    }

    #[inline(always)]
    pub(crate) fn chain_mut(&mut self) -> &mut u32 {
        &mut self.child[0]
    }
}

/// The block table: records by slot. Its length is a power of two, so a slot is reduced with a
/// mask rather than checked against the length: a wrong slot (a bug) reads a wrong record, never
/// memory outside the table, and the hot paths carry no bounds-check branches.
pub(crate) struct Records {
    table: Vec<Block>,
    mask: usize,
}

impl Records {
    /// A table of one blank record.
    pub(crate) fn new() -> Self {
        Records { table: vec![Block::new(0, 0, NIL, NonNull::dangling())], mask: 0 }
    }

    /// How many records there are (a power of two).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Doubles the table with blank records; returns the first new slot.
    #[cold]
    pub(crate) fn grow(&mut self) -> u32 {
        let old = self.table.len();
        self.table.resize(old * 2, Block::new(0, 0, NIL, NonNull::dangling()));
        self.mask = self.table.len() - 1;
        old as u32
    }

    /// Grows the table until `slot` is in it.
    #[cfg(test)]
    pub(crate) fn reach(&mut self, slot: u32) {
        while slot as usize >= self.table.len() {
            self.grow();
        }
    }

    /// Record `slot`, checked against the length.
    #[inline]
    pub(crate) fn get(&self, slot: u32) -> Option<&Block> {
        self.table.get(slot as usize)
    }

    /// Every record, by slot.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Block> {
        self.table.iter()
    }
}

impl core::ops::Index<u32> for Records {
    type Output = Block;

    #[inline(always)]
    fn index(&self, slot: u32) -> &Block {
        debug_assert!((slot as usize) < self.table.len(), "slot {slot} past the block table");
        // SAFETY: the table's length is `mask + 1` (a power of two, never shrinking while `mask`
        // holds), so `slot & mask` is in bounds.
        unsafe { self.table.get_unchecked(slot as usize & self.mask) }
    }
}

impl core::ops::IndexMut<u32> for Records {
    #[inline(always)]
    fn index_mut(&mut self, slot: u32) -> &mut Block {
        debug_assert!((slot as usize) < self.table.len(), "slot {slot} past the block table");
        // SAFETY: as in `index`.
        unsafe { self.table.get_unchecked_mut(slot as usize & self.mask) }
    }
}

/// A table of `N` entries (a power of two) indexed modulo `N`: an index is masked rather than
/// checked, so the index's bitmaps and bin roots cost no bounds-check branches.
pub(crate) struct Masked<T, const N: usize>(alloc::boxed::Box<[T]>);

impl<T: Copy, const N: usize> Masked<T, N> {
    const POWER_OF_TWO: () = assert!(N.is_power_of_two());

    fn new(value: T) -> Self {
        let () = Self::POWER_OF_TWO;
        Masked(vec![value; N].into_boxed_slice())
    }

    fn as_slice(&self) -> &[T] {
        &self.0
    }
}

impl<T, const N: usize> core::ops::Index<usize> for Masked<T, N> {
    type Output = T;

    #[inline(always)]
    fn index(&self, i: usize) -> &T {
        debug_assert!(i < N);
        // SAFETY: the table holds `N` entries (built by `new`, never resized) and `i & (N - 1)`
        // is below `N`.
        unsafe { self.0.get_unchecked(i & (N - 1)) }
    }
}

impl<T, const N: usize> core::ops::IndexMut<usize> for Masked<T, N> {
    #[inline(always)]
    fn index_mut(&mut self, i: usize) -> &mut T {
        debug_assert!(i < N);
        // SAFETY: as in `index`.
        unsafe { self.0.get_unchecked_mut(i & (N - 1)) }
    }
}

/// Free blocks by `(size, address)`, binned; the trees run through a `[Block]` table that the
/// owner keeps and passes in. See the [module docs](self).
pub(crate) struct FreeIndex {
    roots: Masked<u32, BINS>,
    /// Bit `b % 64` of `words[b / 64]` says whether bin `b` holds blocks.
    words: Masked<u64, WORDS>,
    /// Bit `w % 64` of `summary[w / 64]` says whether `words[w]` has a bit set.
    summary: Masked<u64, SUMMARY_WORDS>,
}

impl FreeIndex {
    pub(crate) fn new() -> Self {
        FreeIndex { roots: Masked::new(NIL), words: Masked::new(0), summary: Masked::new(0) }
    }

    /// Hangs `node` where `(parent, side)` says: a record's child, or the root of `bin` when
    /// `parent` is `NIL`.
    #[inline(always)]
    fn attach(&mut self, blocks: &mut Records, bin: usize, (parent, side): (u32, usize), node: u32) {
        if parent == NIL {
            self.roots[bin] = node;
        } else {
            blocks[parent].child[side] = node;
        }
    }

    #[inline(always)]
    fn mark(&mut self, bin: usize) {
        let word = self.words[bin / 64];
        self.words[bin / 64] = word | 1 << (bin % 64);
        // The summary changes only when the word was empty; in a busy pool it seldom is.
        if word == 0 {
            self.summary[bin / 4096] |= 1 << (bin / 64 % 64);
        }
    }

    #[inline(always)]
    fn unmark(&mut self, bin: usize) {
        self.words[bin / 64] &= !(1 << (bin % 64));
        if self.words[bin / 64] == 0 {
            self.summary[bin / 4096] &= !(1 << (bin / 64 % 64));
        }
    }

    /// Indexes block `slot` (not indexed yet) under its current size and address.
    #[inline(always)]
    pub(crate) fn insert(&mut self, blocks: &mut Records, slot: u32) {
        let b = &mut blocks[slot];
        debug_assert!(!b.indexed() && b.size > 0);
        b.child = [NIL; 2];
        let key = b.key();
        let bin = bin_of(key.0);
        b.bin = bin as u16;
        let root = self.roots[bin];
        if root == NIL {
            self.roots[bin] = slot;
            self.mark(bin);
        } else {
            self.insert_below(blocks, bin, root, slot, key);
        }
    }

    /// Inserts `slot` (key `key`) into the non-empty treap of `bin`, rooted at `root`.
    #[inline(always)]
    fn insert_below(&mut self, blocks: &mut Records, bin: usize, root: u32, slot: u32, key: Key) {
        // Down past the records that stay above the new one...
        let p = priority(slot);
        let mut at = (NIL, 0);
        let mut cur = root;
        while cur != NIL && priority(cur) >= p {
            let n = &blocks[cur];
            let side = usize::from(key > n.key());
            at = (cur, side);
            cur = n.child[side];
        }
        self.attach(blocks, bin, at, slot);
        // ...then split the subtree below at `key` into the new record's two children.
        let (mut left, mut right) = ((slot, 0), (slot, 1));
        while cur != NIL {
            let n = &blocks[cur];
            if n.key() < key {
                let next = n.child[1];
                blocks[left.0].child[left.1] = cur;
                left = (cur, 1);
                cur = next;
            } else {
                let next = n.child[0];
                blocks[right.0].child[right.1] = cur;
                right = (cur, 0);
                cur = next;
            }
        }
        blocks[left.0].child[left.1] = NIL;
        blocks[right.0].child[right.1] = NIL;
    }

    /// Removes block `slot` from the index (its size and address as they were indexed); returns
    /// whether it was there.
    #[inline(always)]
    pub(crate) fn remove(&mut self, blocks: &mut Records, slot: u32) -> bool {
        let Some(b) = blocks.get(slot) else {
            return false;
        };
        if !b.indexed() {
            return false;
        }
        if !self.remove_below(blocks, usize::from(b.bin), slot) {
            return false;
        }
        blocks[slot].bin = UNINDEXED;
        true
    }

    /// Takes `slot` out of the treap of `bin`; false if it is not there.
    #[inline(always)]
    fn remove_below(&mut self, blocks: &mut Records, bin: usize, slot: u32) -> bool {
        let key = blocks[slot].key();
        let mut at = (NIL, 0);
        let mut cur = self.roots[bin];
        while cur != slot {
            if cur == NIL {
                // Marked indexed but not in its bin's treap: `consistent` reports it.
                return false;
            }
            let n = &blocks[cur];
            let side = usize::from(key > n.key());
            at = (cur, side);
            cur = n.child[side];
        }
        self.unlink(blocks, bin, at, slot);
        true
    }

    /// Replaces `slot`, which hangs at `at` in the treap of `bin`, by the merge of its two
    /// subtrees (by priority), and clears the bin's bit if it is left empty.
    #[inline(always)]
    fn unlink(&mut self, blocks: &mut Records, bin: usize, mut at: (u32, usize), slot: u32) {
        let [mut left, mut right] = blocks[slot].child;
        loop {
            if left == NIL {
                self.attach(blocks, bin, at, right);
                break;
            }
            if right == NIL {
                self.attach(blocks, bin, at, left);
                break;
            }
            if priority(left) > priority(right) {
                self.attach(blocks, bin, at, left);
                at = (left, 1);
                left = blocks[left].child[1];
            } else {
                self.attach(blocks, bin, at, right);
                at = (right, 0);
                right = blocks[right].child[0];
            }
        }
        if self.roots[bin] == NIL {
            self.unmark(bin);
        }
    }

    /// The slot of the indexed block `(size, addr)`.
    pub(crate) fn get(&self, blocks: &Records, size: usize, addr: usize) -> Option<u32> {
        let mut cur = self.roots[bin_of(size)];
        while cur != NIL {
            let n = blocks.get(cur)?;
            match (size, addr).cmp(&n.key()) {
                core::cmp::Ordering::Equal => return Some(cur),
                core::cmp::Ordering::Less => cur = n.child[0],
                core::cmp::Ordering::Greater => cur = n.child[1],
            }
        }
        None
    }

    /// The smallest block of at least `size` bytes, lowest address first among equals.
    #[inline(always)]
    pub(crate) fn best_fit(&self, blocks: &Records, size: usize) -> Option<u32> {
        let bin = bin_of(size);
        let mut cur = self.roots[bin];
        let mut best = NIL;
        while cur != NIL {
            let n = &blocks[cur];
            if n.size >= size {
                best = cur;
                cur = n.child[0];
            } else {
                cur = n.child[1];
            }
        }
        if best == NIL {
            let next = self.first_nonempty_from(bin + 1)?;
            best = self.roots[next];
            while blocks[best].child[0] != NIL {
                best = blocks[best].child[0];
            }
        }
        Some(best)
    }

    /// Finds the best fit for `size` bytes (as [`best_fit`](Self::best_fit)) and takes it out
    /// of the index in the same walk.
    #[inline(always)]
    pub(crate) fn take_best_fit(&mut self, blocks: &mut Records, size: usize) -> Option<u32> {
        let mut bin = bin_of(size);
        let mut cur = self.roots[bin];
        let (mut best, mut best_at) = (NIL, (NIL, 0));
        let mut at = (NIL, 0);
        while cur != NIL {
            let n = &blocks[cur];
            if n.size >= size {
                (best, best_at) = (cur, at);
                at = (cur, 0);
                cur = n.child[0];
            } else {
                at = (cur, 1);
                cur = n.child[1];
            }
        }
        if best == NIL {
            bin = self.first_nonempty_from(bin + 1)?;
            (best, best_at) = (self.roots[bin], (NIL, 0));
            loop {
                let left = blocks[best].child[0];
                if left == NIL {
                    break;
                }
                (best, best_at) = (left, (best, 0));
            }
        }
        self.unlink(blocks, bin, best_at, best);
        blocks[best].bin = UNINDEXED;
        Some(best)
    }

    /// The largest free block's size (0 when there is none).
    #[inline]
    pub(crate) fn largest(&self, blocks: &Records) -> usize {
        let Some(top) = (0..SUMMARY_WORDS).rev().find(|&i| self.summary[i] != 0) else {
            return 0;
        };
        let word = top * 64 + 63 - self.summary[top].leading_zeros() as usize;
        let bin = word * 64 + 63 - self.words[word].leading_zeros() as usize;
        let mut cur = self.roots[bin];
        while blocks[cur].child[1] != NIL {
            cur = blocks[cur].child[1];
        }
        blocks[cur].size
    }

    /// Whether the bitmaps, the bins and the treaps agree (order and heap property included),
    /// the treaps hold `expected` blocks, and every record marked indexed is in a treap.
    pub(crate) fn consistent(&self, blocks: &Records, expected: usize) -> bool {
        let mut count = 0;
        for (w, &word) in self.words.as_slice().iter().enumerate() {
            if (word != 0) != (self.summary[w / 64] >> (w % 64) & 1 == 1) {
                return false;
            }
            for (i, &root) in self.roots.as_slice()[w * 64..(w + 1) * 64].iter().enumerate() {
                let bin = w * 64 + i;
                if (word >> i & 1 == 1) != (root != NIL) {
                    return false;
                }
                if root != NIL && !self.treap_ok(blocks, root, bin, (None, None), u32::MAX, &mut count) {
                    return false;
                }
            }
        }
        count == expected && blocks.iter().filter(|b| b.indexed()).count() == expected
    }

    fn treap_ok(
        &self,
        blocks: &Records,
        node: u32,
        bin: usize,
        (low, high): (Option<Key>, Option<Key>),
        max_priority: u32,
        count: &mut usize,
    ) -> bool {
        let Some(n) = blocks.get(node) else {
            return false;
        };
        let key = n.key();
        *count += 1;
        if usize::from(n.bin) != bin
            || n.size == 0
            || priority(node) > max_priority
            || bin_of(n.size) != bin
            || *count > blocks.len()
        {
            return false;
        }
        if low.is_some_and(|l| key <= l) || high.is_some_and(|h| key >= h) {
            return false;
        }
        let [left, right] = n.child;
        let p = priority(node);
        (left == NIL || self.treap_ok(blocks, left, bin, (low, Some(key)), p, count))
            && (right == NIL || self.treap_ok(blocks, right, bin, (Some(key), high), p, count))
    }

    #[inline(always)]
    fn first_nonempty_from(&self, bin: usize) -> Option<usize> {
        if bin >= BINS {
            return None;
        }
        let word = bin / 64;
        let bits = self.words[word] & (!0u64 << (bin % 64));
        if bits != 0 {
            return Some(word * 64 + bits.trailing_zeros() as usize);
        }
        // The next non-empty word after `word`, through the summary.
        let from = word + 1;
        let mut i = from / 64;
        let mut above = if i < SUMMARY_WORDS { self.summary[i] & (!0u64 << (from % 64)) } else { 0 };
        while above == 0 {
            i += 1;
            if i >= SUMMARY_WORDS {
                return None;
            }
            above = self.summary[i];
        }
        let word = i * 64 + above.trailing_zeros() as usize;
        Some(word * 64 + self.words[word].trailing_zeros() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Entry {
        size: usize,
        addr: usize,
    }

    /// An index with its own block table, for testing it alone.
    struct Standalone {
        index: FreeIndex,
        blocks: Records,
    }

    impl Standalone {
        fn new() -> Self {
            Standalone { index: FreeIndex::new(), blocks: Records::new() }
        }

        fn insert(&mut self, size: usize, addr: usize, slot: u32) {
            self.blocks.reach(slot);
            self.blocks[slot] = Block::new(addr, size, 0, NonNull::dangling());
            self.index.insert(&mut self.blocks, slot);
        }

        fn remove(&mut self, size: usize, addr: usize, slot: u32) -> bool {
            let here = self.blocks.get(slot).is_some_and(|b| b.key() == (size, addr));
            here && self.index.remove(&mut self.blocks, slot)
        }

        fn best_fit(&self, size: usize) -> Option<Entry> {
            let b = &self.blocks[self.index.best_fit(&self.blocks, size)?];
            Some(Entry { size: b.size, addr: b.addr })
        }

        fn largest(&self) -> usize {
            self.index.largest(&self.blocks)
        }

        fn take_best_fit(&mut self, size: usize) -> Option<Entry> {
            let slot = self.index.take_best_fit(&mut self.blocks, size)?;
            let b = &self.blocks[slot];
            Some(Entry { size: b.size, addr: b.addr })
        }

        fn len(&self) -> usize {
            self.blocks.iter().filter(|b| b.indexed()).count()
        }

        fn consistent(&self) -> bool {
            self.index.consistent(&self.blocks, self.len())
        }
    }

    #[test]
    fn bins_are_ordered_by_size() {
        let mut last = 0;
        for size in (1..70_000).chain([usize::MAX / 2, usize::MAX]) {
            let bin = bin_of(size);
            assert!(bin >= last && bin < BINS, "size {size}");
            last = bin;
        }
    }

    #[test]
    fn best_fit_is_the_smallest_block_that_fits() {
        let mut index = Standalone::new();
        let blocks = [(4096, 0x1000), (300, 0x9000), (256, 0x8000), (256, 0x7000), (1 << 20, 0x100000)];
        for (i, (size, addr)) in blocks.into_iter().enumerate() {
            index.insert(size, addr, i as u32);
        }
        assert!(index.consistent());
        assert_eq!(index.best_fit(200).map(|e| (e.size, e.addr)), Some((256, 0x7000)));
        assert_eq!(index.best_fit(257).map(|e| e.size), Some(300));
        assert_eq!(index.best_fit(301).map(|e| e.size), Some(4096));
        assert_eq!(index.best_fit(5000).map(|e| e.size), Some(1 << 20));
        assert_eq!(index.best_fit((1 << 20) + 1), None);
        assert_eq!(index.largest(), 1 << 20);
        assert!(index.remove(1 << 20, 0x100000, 4));
        assert!(!index.remove(1 << 20, 0x100000, 4));
        assert_eq!(index.largest(), 4096);
        assert_eq!(index.len(), 4);
        assert!(index.consistent());
    }

    #[test]
    fn many_blocks_in_one_bin_stay_ordered_and_balanced() {
        let mut index = Standalone::new();
        // 2000 sizes in one bin (2 MiB .. 2 MiB + 32 KiB), inserted out of order.
        let size = |i: usize| (2 << 20) + (i * 7919 % 2000) * 16;
        for i in 0..2000 {
            index.insert(size(i), 0x1000 * i, i as u32);
        }
        assert!(index.consistent());
        for want in [2 << 20, (2 << 20) + 17, (2 << 20) + 16 * 1999] {
            let best = (0..2000).map(size).filter(|&s| s >= want).min();
            assert_eq!(index.best_fit(want).map(|e| e.size), best);
        }
        for i in (0..2000).step_by(3) {
            assert!(index.remove(size(i), 0x1000 * i, i as u32));
        }
        assert!(index.consistent());
        assert_eq!(index.len(), 2000 - 667);
    }

    #[test]
    fn taking_the_best_fit_removes_what_best_fit_names() {
        let mut index = Standalone::new();
        let size = |i: usize| 64 + (i * 7919 % 3000) * 16;
        for i in 0..3000 {
            index.insert(size(i), 0x10_0000 + 0x1000 * i, i as u32);
        }
        let mut want = 1;
        while index.len() > 0 {
            let expected = index.best_fit(want);
            assert_eq!(index.take_best_fit(want), expected);
            assert!(!index.best_fit(want).is_some_and(|e| Some(&e) == expected.as_ref()));
            want = if expected.is_some() { (want * 37 + 11) % 50_000 } else { 1 };
        }
        assert!(index.consistent());
        assert_eq!(index.take_best_fit(1), None);
    }
}
