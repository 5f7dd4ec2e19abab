//! [`FreeIndex`]: the free blocks of a pool, by size, for exact best fit in O(log n).
//!
//! Sizes fall into bins: the power of two of the size, split into 1024 linear sub-bins (as in
//! TLSF, with finer steps; sizes below 2048 get a bin each). A two-level bitmap says which bins
//! hold blocks, so the first bin that can serve a request is found with a few bit operations. The
//! bins are narrow so that most hold one block or none: the common operations then take the
//! same, predictable path (set or clear a root and a bit), which matters more than their
//! instruction count. Inside a bin, blocks form a treap (a binary search tree balanced by random
//! priorities, expected depth O(log n)) ordered by `(size, address)`. Best fit is the smallest
//! key `>= (size, 0)` in the request's own bin, else the smallest key of the next non-empty bin:
//! the smallest block that holds the request, the lowest address among equals, as an ordered
//! multimap by size gives it. A bin spans 1/1024 of a power of two, so its treap is usually one
//! node. (On a random-size workload, P4, where 16% of inserts found their bin taken with 512
//! sub-bins, 512 took 1.07x the cycles of 1024, and 256, 128 and 64 took 1.07x, 1.3x and 1.4x
//! the time of 512.) The roots take 256 KiB on 64-bit targets (128 KiB on 32-bit); they start
//! as zeroed memory, which an allocator that hands out fresh zeroed pages for it leaves unmapped
//! until bins are first used (see [`Roots`]).
//!
//! The treaps are threaded through the owner's block records ([`Block`]): one record per block,
//! holding the block's place in memory, its neighbours and its tree links, so an operation reads
//! each block it visits once, and allocates nothing. Priorities are a hash of the record's slot.
//!
//! Only sizes and addresses are stored: nothing here touches the blocks' memory.

use alloc::boxed::Box;
#[cfg(test)]
use alloc::vec;
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::ptr::NonNull;

const SUB_BITS: usize = 10;
const SUB_BINS: usize = 1 << SUB_BITS;
const BINS: usize = usize::BITS as usize * SUB_BINS;
const _: () = assert!(BINS % 64 == 0 && (usize::BITS as usize - SUB_BITS + 1) * SUB_BINS <= BINS);
const WORDS: usize = BINS / 64;
const SUMMARY_WORDS: usize = WORDS.div_ceil(64);
/// No block.
pub(crate) const NIL: u32 = u32::MAX;
const _: () = assert!(core::mem::size_of::<Block>() == 32);

/// The bin of a non-zero size. Bins are ordered: a larger size never falls in a lower bin.
#[inline]
const fn bin_of(size: usize) -> usize {
    debug_assert!(size > 0);
    let log = (usize::BITS - 1 - size.leading_zeros()) as usize;
    // Below 2048 the bin is the size (the shift is 0); from 2048 on, `size >> shift` keeps the
    // top 11 bits (1024..=2047), and each doubling of the size moves up 1024 bins.
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

/// Whether key `a` orders after key `b`, compared as one wide integer: a tuple comparison
/// becomes two branches, and on a search path each is a coin toss to the predictor.
#[inline(always)]
fn above(a: Key, b: Key) -> bool {
    let wide = |(size, addr): Key| (size as u128) << usize::BITS | addr as u128;
    wide(a) > wide(b)
}

/// One block of memory, as its owner and the index see it: half a cache line, so that the
/// records of a busy pool crowd the first-level cache less. What only used blocks need (the size
/// asked for, the sequence number) is kept apart, in a [`Cold`] record.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(32))]
pub(crate) struct Block {
    /// Where the block starts, and its size.
    pub addr: usize,
    pub size: usize,
    /// While the block is free: the index's tree links (smaller keys, larger keys). While it is
    /// used: `child[0]` chains it in the address table's bucket ([`chain`](Self::chain)), and
    /// `child[1]` is [`USED`].
    child: [u32; 2],
    /// The owner's address-order neighbours in the same chunk (`NIL` at either end).
    pub prev: u32,
    pub next: u32,
}

/// `child[1]` of a used block: no slot (the table's length is a power of two of at most 2^31).
const USED: u32 = NIL - 1;

impl Block {
    /// A free block, not in the index.
    pub(crate) fn new(addr: usize, size: usize) -> Self {
        Block { addr, size, child: [NIL; 2], prev: NIL, next: NIL }
    }

    #[inline]
    fn key(&self) -> Key {
        (self.size, self.addr)
    }

    /// Whether the block is allocated.
    #[inline(always)]
    pub(crate) fn used(&self) -> bool {
        self.child[1] == USED
    }

    /// Marks the block allocated (`true`), or free and out of the index.
    #[inline(always)]
    pub(crate) fn set_used(&mut self, used: bool) {
        self.child[1] = if used { USED } else { NIL };
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

/// What a used block's owner keeps beside its [`Block`]: the size asked for and the allocation's
/// sequence number. Written when the block is allocated, read when it is freed or reported.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cold {
    pub requested: usize,
    pub seq: u64,
}

/// The block table: records by slot. Its length is a power of two, so a slot is reduced with a
/// mask rather than checked against the length: a wrong slot (a bug) reads a wrong record, never
/// memory outside the table, and the hot paths carry no bounds-check branches.
pub(crate) struct Records {
    table: Vec<Block>,
    /// Beside each record, by slot: what only a used block needs.
    cold: Vec<Cold>,
    mask: usize,
}

impl Records {
    /// A table of one blank record.
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Records { table: vec![Block::new(0, 0)], cold: vec![Cold::default()], mask: 0 }
    }

    /// A table of one blank record, or `None` when the allocator cannot give its memory.
    pub(crate) fn try_new() -> Option<Self> {
        let (mut table, mut cold) = (Vec::new(), Vec::new());
        table.try_reserve_exact(1).ok()?;
        cold.try_reserve_exact(1).ok()?;
        table.push(Block::new(0, 0));
        cold.push(Cold::default());
        Some(Records { table, cold, mask: 0 })
    }

    /// How many records there are (a power of two).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Doubles the table with blank records; returns the first new slot, or `None` (the table
    /// as it was) when the allocator cannot give the memory or the table has 2^31 records.
    #[cold]
    pub(crate) fn grow(&mut self) -> Option<u32> {
        let old = self.table.len();
        // Slots are `u32`, `NIL` and `USED` at the top; a table stays at most 2^31 long.
        if old > 1 << 30 {
            return None;
        }
        self.table.try_reserve_exact(old).ok()?;
        self.cold.try_reserve_exact(old).ok()?;
        self.table.resize(old * 2, Block::new(0, 0));
        self.cold.resize(old * 2, Cold::default());
        self.mask = self.table.len() - 1;
        Some(old as u32)
    }

    /// Grows the table until `slot` is in it.
    #[cfg(test)]
    pub(crate) fn reach(&mut self, slot: u32) {
        while slot as usize >= self.table.len() {
            self.grow().expect("test tables fit in memory");
        }
    }

    /// Record `slot`, checked against the length.
    #[inline]
    pub(crate) fn get(&self, slot: u32) -> Option<&Block> {
        self.table.get(slot as usize)
    }

    /// The cold record of slot `slot` (reduced by the mask, as records are).
    #[inline]
    pub(crate) fn cold(&self, slot: u32) -> &Cold {
        &self.cold[slot as usize & self.mask]
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

/// The block table borrowed for one operation. The table's base and mask are copied out of the
/// [`Records`], so they stay in registers while the operation writes records: read through the
/// `Records`, every access after a store to a record would load them again, since the compiler
/// cannot tell that the store did not change them.
pub(crate) struct Recs<'a> {
    /// The first of `mask + 1` records, and of as many cold records.
    base: NonNull<Block>,
    cold: NonNull<Cold>,
    mask: usize,
    table: PhantomData<&'a mut [Block]>,
}

impl Records {
    /// The table, borrowed for one operation (see [`Recs`]).
    #[inline(always)]
    pub(crate) fn view(&mut self) -> Recs<'_> {
        debug_assert!(self.table.len() == self.mask + 1 && self.cold.len() == self.mask + 1);
        Recs {
            base: NonNull::from(&mut self.table[..]).cast(),
            cold: NonNull::from(&mut self.cold[..]).cast(),
            mask: self.mask,
            table: PhantomData,
        }
    }
}

impl Recs<'_> {
    /// Record `slot`, or `None` for `NIL`.
    #[inline(always)]
    pub(crate) fn get(&self, slot: u32) -> Option<&Block> {
        (slot != NIL).then(|| &self[slot])
    }

    /// The cold record of slot `slot`.
    #[inline(always)]
    pub(crate) fn cold(&self, slot: u32) -> &Cold {
        // SAFETY: as in `index`: the cold table has the same `mask + 1` length.
        unsafe { &*self.cold.as_ptr().add(slot as usize & self.mask) }
    }

    #[inline(always)]
    pub(crate) fn cold_mut(&mut self, slot: u32) -> &mut Cold {
        // SAFETY: as in `index_mut`.
        unsafe { &mut *self.cold.as_ptr().add(slot as usize & self.mask) }
    }
}

impl core::ops::Index<u32> for Recs<'_> {
    type Output = Block;

    #[inline(always)]
    fn index(&self, slot: u32) -> &Block {
        debug_assert!((slot as usize) <= self.mask, "slot {slot} past the block table");
        // SAFETY: `base` points to the `mask + 1` records of a `Records` (its length is a power of
        // two) that this view borrows mutably, so the table neither moves nor changes length
        // while the view lives, and `slot & mask` is in bounds.
        unsafe { &*self.base.as_ptr().add(slot as usize & self.mask) }
    }
}

impl core::ops::IndexMut<u32> for Recs<'_> {
    #[inline(always)]
    fn index_mut(&mut self, slot: u32) -> &mut Block {
        debug_assert!((slot as usize) <= self.mask, "slot {slot} past the block table");
        // SAFETY: as in `index`; `&mut self` makes the reference the only one into the table.
        unsafe { &mut *self.base.as_ptr().add(slot as usize & self.mask) }
    }
}

/// A table of `N` entries (a power of two) indexed modulo `N`: an index is masked rather than
/// checked, so the index's bitmaps and bin roots cost no bounds-check branches.
pub(crate) struct Masked<T, const N: usize>([T; N]);

impl<T, const N: usize> Masked<T, N> {
    const POWER_OF_TWO: () = assert!(N.is_power_of_two());

    fn as_slice(&self) -> &[T] {
        &self.0
    }
}

impl<T, const N: usize> core::ops::Index<usize> for Masked<T, N> {
    type Output = T;

    #[inline(always)]
    fn index(&self, i: usize) -> &T {
        let () = Self::POWER_OF_TWO;
        debug_assert!(i < N);
        &self.0[i & (N - 1)]
    }
}

impl<T, const N: usize> core::ops::IndexMut<usize> for Masked<T, N> {
    #[inline(always)]
    fn index_mut(&mut self, i: usize) -> &mut T {
        let () = Self::POWER_OF_TWO;
        debug_assert!(i < N);
        &mut self.0[i & (N - 1)]
    }
}

/// The bins' roots. A root is kept inverted, so that the all-zero table a new index starts as
/// reads as all `NIL`: a new index needs no pass over its 256 KiB, and where the allocator hands
/// out fresh zeroed pages for it, they are mapped only as bins are first used.
struct Roots(Masked<u32, BINS>);

impl Roots {
    #[inline(always)]
    fn get(&self, bin: usize) -> u32 {
        !self.0[bin]
    }

    #[inline(always)]
    fn set(&mut self, bin: usize, slot: u32) {
        self.0[bin] = !slot;
    }
}

/// Free blocks by `(size, address)`, binned; the trees run through a `[Block]` table that the
/// owner keeps and passes in. See the [module docs](self).
///
/// The tables are inline (about 264 KiB on 64-bit targets; see [`Roots`] for how little of it a
/// new index touches): the owner keeps the index boxed, so that an operation reaches every table
/// through the one pointer it was called with.
pub(crate) struct FreeIndex {
    roots: Roots,
    /// Bit `b % 64` of `words[b / 64]` says whether bin `b` holds blocks.
    words: Masked<u64, WORDS>,
    /// Bit `w % 64` of `summary[w / 64]` says whether `words[w]` has a bit set.
    summary: Masked<u64, SUMMARY_WORDS>,
}

impl FreeIndex {
    /// An empty index, built in place on the heap (it is too large to build on a small stack).
    #[cfg(test)]
    pub(crate) fn new() -> Box<Self> {
        Self::try_new().unwrap_or_else(|| alloc::alloc::handle_alloc_error(core::alloc::Layout::new::<FreeIndex>()))
    }

    /// [`new`](Self::new), or `None` when the allocator cannot give its memory.
    pub(crate) fn try_new() -> Option<Box<Self>> {
        let layout = core::alloc::Layout::new::<FreeIndex>();
        // SAFETY: the layout is not zero-sized.
        let raw = unsafe { alloc::alloc::alloc_zeroed(layout) }.cast::<FreeIndex>();
        if raw.is_null() {
            return None;
        }
        // SAFETY: `raw` was just allocated with `FreeIndex`'s layout, as `Box` allocates, and a
        // `FreeIndex` is arrays of `u32` and `u64`, for which all-zero bytes are a valid value.
        Some(unsafe { Box::from_raw(raw) })
    }

    /// Hangs `node` where `(parent, side)` says: a record's child, or the root of `bin` when
    /// `parent` is `NIL`.
    #[inline(always)]
    fn attach(&mut self, blocks: &mut Recs<'_>, bin: usize, (parent, side): (u32, usize), node: u32) {
        if parent == NIL {
            self.roots.set(bin, node);
        } else {
            blocks[parent].child[side] = node;
        }
    }

    /// Sets bin `bin`'s bit, and its word's bit in the summary (without a branch: whether the
    /// word was empty is a coin toss to the predictor).
    #[inline(always)]
    fn mark(&mut self, bin: usize) {
        self.words[bin / 64] |= 1 << (bin % 64);
        self.summary[bin / 4096] |= 1 << (bin / 64 % 64);
    }

    /// Clears bin `bin`'s bit, and its word's bit in the summary if the word is left empty
    /// (without a branch).
    #[inline(always)]
    fn unmark(&mut self, bin: usize) {
        let word = self.words[bin / 64] & !(1 << (bin % 64));
        self.words[bin / 64] = word;
        self.summary[bin / 4096] &= !(u64::from(word == 0) << (bin / 64 % 64));
    }

    /// Indexes block `slot` (not indexed yet) under its current size and address.
    #[inline(always)]
    pub(crate) fn insert(&mut self, blocks: &mut Recs<'_>, slot: u32) {
        let b = &mut blocks[slot];
        debug_assert!(b.size > 0);
        b.child = [NIL; 2];
        let key = b.key();
        let bin = bin_of(key.0);
        let root = self.roots.get(bin);
        if root == NIL {
            self.roots.set(bin, slot);
            self.mark(bin);
        } else {
            self.insert_below(blocks, bin, root, slot, key);
        }
    }

    /// Inserts `slot` (key `key`) into the non-empty treap of `bin`, rooted at `root`.
    #[inline(always)]
    fn insert_below(&mut self, blocks: &mut Recs<'_>, bin: usize, root: u32, slot: u32, key: Key) {
        // Down past the records that stay above the new one...
        let p = priority(slot);
        let mut at = (NIL, 0);
        let mut cur = root;
        while cur != NIL && priority(cur) >= p {
            let n = &blocks[cur];
            let side = usize::from(above(key, n.key()));
            at = (cur, side);
            cur = n.child[side];
        }
        self.attach(blocks, bin, at, slot);
        // ...then split the subtree below at `key` into the new record's two children.
        let (mut left, mut right) = ((slot, 0), (slot, 1));
        while cur != NIL {
            let n = &blocks[cur];
            if above(key, n.key()) {
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
    pub(crate) fn remove(&mut self, blocks: &mut Recs<'_>, slot: u32) -> bool {
        let Some(b) = blocks.get(slot) else {
            return false;
        };
        if b.size == 0 || b.used() {
            return false;
        }
        self.remove_below(blocks, bin_of(b.size), slot)
    }

    /// Takes `slot` out of the treap of `bin`; false if it is not there.
    #[inline(always)]
    fn remove_below(&mut self, blocks: &mut Recs<'_>, bin: usize, slot: u32) -> bool {
        let key = blocks[slot].key();
        let mut at = (NIL, 0);
        let mut cur = self.roots.get(bin);
        while cur != slot {
            if cur == NIL {
                // A free block missing from its bin's treap: the owner's check reports it.
                return false;
            }
            let n = &blocks[cur];
            let side = usize::from(above(key, n.key()));
            at = (cur, side);
            cur = n.child[side];
        }
        self.unlink(blocks, bin, at, slot);
        true
    }

    /// Replaces `slot`, which hangs at `at` in the treap of `bin`, by the merge of its two
    /// subtrees (by priority), and clears the bin's bit if it is left empty.
    #[inline(always)]
    fn unlink(&mut self, blocks: &mut Recs<'_>, bin: usize, mut at: (u32, usize), slot: u32) {
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
        if self.roots.get(bin) == NIL {
            self.unmark(bin);
        }
    }

    /// The slot of the indexed block `(size, addr)`.
    pub(crate) fn get(&self, blocks: &Records, size: usize, addr: usize) -> Option<u32> {
        let mut cur = self.roots.get(bin_of(size));
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
    #[inline]
    pub(crate) fn best_fit(&self, blocks: &Records, size: usize) -> Option<u32> {
        self.find_best_fit(blocks, size).map(|(_, best, _)| best)
    }

    /// Finds the best fit for `size` bytes (as [`best_fit`](Self::best_fit)) and takes it out
    /// of the index.
    #[inline(always)]
    pub(crate) fn take_best_fit(&mut self, blocks: &mut Recs<'_>, size: usize) -> Option<u32> {
        let (bin, best, at) = self.find_best_fit(&*blocks, size)?;
        self.unlink(blocks, bin, at, best);
        Some(best)
    }

    /// The best fit for `size` bytes: its bin, its slot, and where it hangs in the bin's treap.
    ///
    /// The bitmap says first whether the request's own bin holds blocks at all (in a busy pool
    /// it seldom does), so the bin's treap is read only when it might hold the fit.
    #[inline(always)]
    fn find_best_fit<B>(&self, blocks: &B, size: usize) -> Option<(usize, u32, (u32, usize))>
    where
        B: core::ops::Index<u32, Output = Block>,
    {
        let own = bin_of(size);
        let mut bin = self.first_nonempty_from(own)?;
        if bin == own {
            if let Some((best, at)) = self.fit_in_bin(blocks, own, size) {
                return Some((own, best, at));
            }
            bin = self.first_nonempty_from(own + 1)?;
        }
        // Every block of a higher bin holds the request: take the bin's smallest.
        let (mut best, mut at) = (self.roots.get(bin), (NIL, 0));
        loop {
            let left = blocks[best].child[0];
            if left == NIL {
                return Some((bin, best, at));
            }
            (best, at) = (left, (best, 0));
        }
    }

    /// The smallest block of at least `size` bytes in the treap of `bin`, and where it hangs.
    #[inline(always)]
    fn fit_in_bin<B>(&self, blocks: &B, bin: usize, size: usize) -> Option<(u32, (u32, usize))>
    where
        B: core::ops::Index<u32, Output = Block>,
    {
        let mut cur = self.roots.get(bin);
        let mut best = None;
        let mut at = (NIL, 0);
        while cur != NIL {
            let n = &blocks[cur];
            if n.size >= size {
                best = Some((cur, at));
                at = (cur, 0);
                cur = n.child[0];
            } else {
                at = (cur, 1);
                cur = n.child[1];
            }
        }
        best
    }

    /// The indexed block with the smallest key `(size, address)` above `(size, addr)`: walked
    /// from `(size, 0)` on, the blocks of at least `size` bytes in best-fit order.
    pub(crate) fn next_above(&self, blocks: &Records, size: usize, addr: usize) -> Option<u32> {
        let key = (size, addr);
        let own = bin_of(size);
        let mut bin = self.first_nonempty_from(own)?;
        if bin == own {
            let (mut cur, mut next) = (self.roots.get(own), None);
            while cur != NIL {
                let n = blocks.get(cur)?;
                if above(n.key(), key) {
                    (next, cur) = (Some(cur), n.child[0]);
                } else {
                    cur = n.child[1];
                }
            }
            if next.is_some() {
                return next;
            }
            bin = self.first_nonempty_from(own + 1)?;
        }
        // Every block of a higher bin is above the key: the bin's smallest.
        let mut cur = self.roots.get(bin);
        while let Some(left) = blocks.get(cur).map(|n| n.child[0]).filter(|&l| l != NIL) {
            cur = left;
        }
        Some(cur)
    }

    /// The largest free block's size (0 when there is none).
    #[inline]
    pub(crate) fn largest(&self, blocks: &Records) -> usize {
        let Some(top) = (0..SUMMARY_WORDS).rev().find(|&i| self.summary[i] != 0) else {
            return 0;
        };
        let word = top * 64 + 63 - self.summary[top].leading_zeros() as usize;
        let bin = word * 64 + 63 - self.words[word].leading_zeros() as usize;
        let mut cur = self.roots.get(bin);
        while blocks[cur].child[1] != NIL {
            cur = blocks[cur].child[1];
        }
        blocks[cur].size
    }

    /// Whether the bitmaps, the bins and the treaps agree (order and heap property included),
    /// no used record is in a treap, and the treaps hold `expected` blocks. (The owner checks
    /// that each of its free blocks is in the index: with distinct keys and the count, the
    /// treaps then hold exactly those.)
    pub(crate) fn consistent(&self, blocks: &Records, expected: usize) -> bool {
        let mut count = 0;
        for (w, &word) in self.words.as_slice().iter().enumerate() {
            if (word != 0) != (self.summary[w / 64] >> (w % 64) & 1 == 1) {
                return false;
            }
            if word == 0 {
                // Every root `NIL` (stored inverted: zero), compared in one go.
                if self.roots.0.as_slice()[w * 64..(w + 1) * 64] != [0; 64] {
                    return false;
                }
                continue;
            }
            for i in 0..64 {
                let bin = w * 64 + i;
                let root = self.roots.get(bin);
                if (word >> i & 1 == 1) != (root != NIL) {
                    return false;
                }
                if root != NIL && !self.treap_ok(blocks, root, bin, (None, None), u32::MAX, &mut count) {
                    return false;
                }
            }
        }
        count == expected
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
        if n.used() || n.size == 0 || priority(node) > max_priority || bin_of(n.size) != bin || *count > blocks.len() {
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

    /// The first non-empty bin from `bin` on.
    ///
    /// The common answers, in `bin`'s own bitmap word or in the next non-empty word that the
    /// same summary word knows of, are both worked out and one is picked without a branch:
    /// which of the two it is, is a coin toss to the predictor.
    #[inline(always)]
    fn first_nonempty_from(&self, bin: usize) -> Option<usize> {
        if bin >= BINS {
            return None;
        }
        let word = bin / 64;
        let here = self.words[word] & (!0u64 << (bin % 64));
        // The next non-empty word after `word` within the summary word that holds `word`.
        let above = self.summary[word / 64] & ((!0u64 << (word % 64)) << 1);
        let next = (word & !63) | (above.trailing_zeros() as usize & 63);
        let next_bits = self.words[next] & 0u64.wrapping_sub(u64::from(above != 0));
        // `here` if it has a bit, else `next_bits`, in arithmetic (a plain `if` becomes a branch).
        let elsewhere = 0u64.wrapping_sub(u64::from(here == 0));
        let bits = here | (next_bits & elsewhere);
        let word = word.wrapping_add(next.wrapping_sub(word) & elsewhere as usize);
        if bits == 0 {
            return self.first_nonempty_after_summary_word(word / 64);
        }
        Some(word * 64 + bits.trailing_zeros() as usize)
    }

    /// The first non-empty bin in the words that summary words after `summary` cover.
    #[inline(never)]
    fn first_nonempty_after_summary_word(&self, summary: usize) -> Option<usize> {
        let i = (summary + 1..SUMMARY_WORDS).find(|&i| self.summary[i] != 0)?;
        let word = i * 64 + self.summary[i].trailing_zeros() as usize;
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
        index: Box<FreeIndex>,
        blocks: Records,
        /// Blocks inserted and not yet removed or taken, counted here.
        len: usize,
    }

    impl Standalone {
        fn new() -> Self {
            Standalone { index: FreeIndex::new(), blocks: Records::new(), len: 0 }
        }

        fn insert(&mut self, size: usize, addr: usize, slot: u32) {
            self.blocks.reach(slot);
            self.blocks[slot] = Block::new(addr, size);
            self.index.insert(&mut self.blocks.view(), slot);
            self.len += 1;
        }

        fn remove(&mut self, size: usize, addr: usize, slot: u32) -> bool {
            let here = self.blocks.get(slot).is_some_and(|b| b.key() == (size, addr));
            let removed = here && self.index.remove(&mut self.blocks.view(), slot);
            self.len -= usize::from(removed);
            removed
        }

        fn best_fit(&self, size: usize) -> Option<Entry> {
            let b = &self.blocks[self.index.best_fit(&self.blocks, size)?];
            Some(Entry { size: b.size, addr: b.addr })
        }

        fn largest(&self) -> usize {
            self.index.largest(&self.blocks)
        }

        fn take_best_fit(&mut self, size: usize) -> Option<Entry> {
            let slot = self.index.take_best_fit(&mut self.blocks.view(), size)?;
            self.len -= 1;
            let b = &self.blocks[slot];
            Some(Entry { size: b.size, addr: b.addr })
        }

        fn len(&self) -> usize {
            self.len
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
    fn each_power_of_two_from_2048_on_spans_1024_bins_of_equal_width() {
        assert!((1..2048).all(|size| bin_of(size) == size));
        for shift in 1..=usize::BITS as usize - SUB_BITS - 1 {
            for top in 1024..2048usize {
                let (first, last) = (top << shift, (top << shift) + ((1 << shift) - 1));
                let bin = top + (shift << SUB_BITS);
                assert_eq!((bin_of(first), bin_of(last)), (bin, bin), "shift {shift}, top {top}");
            }
        }
        // The last of those was `usize::MAX`.
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
        // 2000 sizes in one bin (2 MiB .. 2 MiB + 2000 B; a bin there spans 2 KiB), inserted out
        // of order.
        let size = |i: usize| (2 << 20) + i * 7919 % 2000;
        for i in 0..2000 {
            index.insert(size(i), 0x1000 * i, i as u32);
        }
        assert!(index.consistent());
        assert!((0..2000).all(|i| bin_of(size(i)) == bin_of(2 << 20)));
        for want in [2 << 20, (2 << 20) + 17, (2 << 20) + 1999] {
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
    fn a_stale_root_is_caught() {
        let mut index = Standalone::new();
        index.insert(4096, 0x1000, 1);
        assert!(index.remove(4096, 0x1000, 1) && index.consistent());
        // A root left behind in an empty bin (the bitmap says empty).
        index.index.roots.set(bin_of(4096), 1);
        assert!(!index.consistent());
        index.index.roots.set(bin_of(4096), NIL);
        // A root in an empty bin of a word that has another bin in use.
        index.insert(4096, 0x1000, 1);
        index.index.roots.set(bin_of(4096) + 1, 2);
        assert!(!index.consistent());
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

    #[test]
    fn walking_above_a_key_visits_blocks_in_best_fit_order() {
        let mut index = Standalone::new();
        // Sizes in one bin, in neighbouring bins and far apart, several blocks of one size.
        let size = |i: usize| [64, 64, 2048, 2049, 4096, 4100, 1 << 20, (1 << 20) + 4096][i % 8] + i / 8 * 16;
        for i in 0..200 {
            index.insert(size(i), 0x1000 * (i * 7919 % 200 + 1), i as u32);
        }
        let mut keys: Vec<(usize, usize)> = (0..200).map(|i| (size(i), 0x1000 * (i * 7919 % 200 + 1))).collect();
        keys.sort_unstable();
        for from in [1, 64, 65, 2049, 4097, 1 << 20] {
            let (mut walked, mut key) = (Vec::new(), (from, 0));
            while let Some(slot) = index.index.next_above(&index.blocks, key.0, key.1) {
                key = index.blocks[slot].key();
                walked.push(key);
            }
            let expected: Vec<_> = keys.iter().copied().filter(|&(s, _)| s >= from).collect();
            assert_eq!(walked, expected, "from {from}");
        }
        assert_eq!(index.index.next_above(&index.blocks, usize::MAX, 0), None);
    }

    proptest::proptest! {
        /// Sizes from 1 B to 2^62 B (2^30 B on 32-bit targets), so the bins lie in every summary
        /// word: taking the best fit gives what a scan of all blocks gives, and the index stays
        /// consistent.
        #[test]
        fn takes_the_best_fit_across_every_summary_word(
            ops in proptest::collection::vec(
                (proptest::bool::weighted(0.6), 0u32..usize::BITS - 2, 0usize..1024),
                1..300,
            )
        ) {
            let mut index = Standalone::new();
            let mut model: Vec<(usize, usize, u32)> = Vec::new();
            let mut next = 1u32;
            for (insert, log, low) in ops {
                let size = (1usize << log) + low;
                if insert {
                    let addr = 0x1000 * next as usize;
                    index.insert(size, addr, next);
                    model.push((size, addr, next));
                    next += 1;
                } else {
                    let want = model.iter().filter(|e| e.0 >= size).min_by_key(|e| (e.0, e.1)).copied();
                    let got = index.take_best_fit(size);
                    proptest::prop_assert_eq!(got.map(|e| (e.size, e.addr)), want.map(|e| (e.0, e.1)));
                    model.retain(|e| Some(*e) != want);
                }
                proptest::prop_assert!(index.consistent());
                proptest::prop_assert_eq!(index.len(), model.len());
            }
        }
    }
}
