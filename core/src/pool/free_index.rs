//! [`FreeIndex`]: the free blocks of a pool, by size, for exact best fit in O(log n).
//!
//! Sizes fall into 4096 bins: the power of two of the size, split into 64 linear sub-bins (as in
//! TLSF, with finer steps). A two-level bitmap says which bins hold blocks, so the first bin that
//! can serve a request is found with a few bit operations. Inside a bin, blocks form a treap (a
//! binary search tree balanced by random priorities, expected depth O(log n)) ordered by
//! `(size, address)`, whose nodes live in a table indexed by the owner's block slot: no
//! allocation and no copying per operation. Best fit is the smallest key `>= (size, 0)` in the
//! request's own bin, else the smallest key of the next non-empty bin. Bins are narrow (1/64 of
//! a power of two), so a bin's treap is usually one or two nodes.
//!
//! Only sizes and addresses are stored: nothing here touches the blocks' memory.

use alloc::vec;
use alloc::vec::Vec;

const SUB_BITS: u32 = 6;
const SUB_BINS: usize = 1 << SUB_BITS;
const BINS: usize = usize::BITS as usize * SUB_BINS;
const WORDS: usize = BINS / 64;
const NIL: u32 = u32::MAX;

/// The bin of a non-zero size. Bins are ordered: a larger size never falls in a lower bin.
#[inline]
fn bin_of(size: usize) -> usize {
    debug_assert!(size > 0);
    let log = (usize::BITS - 1 - size.leading_zeros()) as usize;
    let sub = if log >= SUB_BITS as usize { (size >> (log - SUB_BITS as usize)) & (SUB_BINS - 1) } else { 0 };
    log * SUB_BINS + sub
}

/// A node's heap priority: a hash of its slot, so priorities are spread without a generator.
fn priority(slot: u32) -> u32 {
    let mut x = u64::from(slot).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) as u32
}

/// One free block as the index knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FreeEntry {
    pub size: usize,
    pub addr: usize,
    /// The block's slot in the owner's block table.
    pub slot: u32,
}

#[derive(Clone, Copy)]
struct Node {
    size: usize,
    addr: usize,
    left: u32,
    right: u32,
    priority: u32,
    indexed: bool,
}

const EMPTY: Node = Node { size: 0, addr: 0, left: NIL, right: NIL, priority: 0, indexed: false };

/// Free blocks by `(size, address)`, binned. See the [module docs](self).
pub(crate) struct FreeIndex {
    roots: Vec<u32>,
    nodes: Vec<Node>,
    words: [u64; WORDS],
    summary: u64,
    len: usize,
}

impl FreeIndex {
    pub(crate) fn new() -> Self {
        FreeIndex { roots: vec![NIL; BINS], nodes: Vec::new(), words: [0; WORDS], summary: 0, len: 0 }
    }

    /// How many free blocks are indexed.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Indexes block `slot` (not indexed yet) as `(size, addr)`.
    #[inline]
    pub(crate) fn insert(&mut self, size: usize, addr: usize, slot: u32) {
        let s = slot as usize;
        if s >= self.nodes.len() {
            self.nodes.resize(s + 1, EMPTY);
        }
        debug_assert!(!self.nodes[s].indexed);
        self.nodes[s] = Node { size, addr, left: NIL, right: NIL, priority: priority(slot), indexed: true };
        let bin = bin_of(size);
        self.roots[bin] = self.insert_at(self.roots[bin], slot);
        self.words[bin / 64] |= 1 << (bin % 64);
        self.summary |= 1 << (bin / 64);
        self.len += 1;
    }

    /// Removes block `slot`, indexed as `(size, addr)`; returns whether it was there.
    #[inline]
    pub(crate) fn remove(&mut self, size: usize, addr: usize, slot: u32) -> bool {
        let s = slot as usize;
        if self.nodes.get(s).is_none_or(|n| !n.indexed || (n.size, n.addr) != (size, addr)) {
            return false;
        }
        let bin = bin_of(size);
        self.roots[bin] = self.remove_at(self.roots[bin], (size, addr));
        self.nodes[s].indexed = false;
        if self.roots[bin] == NIL {
            self.words[bin / 64] &= !(1 << (bin % 64));
            if self.words[bin / 64] == 0 {
                self.summary &= !(1 << (bin / 64));
            }
        }
        self.len -= 1;
        true
    }

    /// The slot of block `(size, addr)`, if indexed.
    pub(crate) fn get(&self, size: usize, addr: usize) -> Option<u32> {
        let mut cur = self.roots[bin_of(size)];
        while cur != NIL {
            let n = &self.nodes[cur as usize];
            match (size, addr).cmp(&(n.size, n.addr)) {
                core::cmp::Ordering::Equal => return Some(cur),
                core::cmp::Ordering::Less => cur = n.left,
                core::cmp::Ordering::Greater => cur = n.right,
            }
        }
        None
    }

    /// The smallest block of at least `size` bytes, lowest address first among equals.
    #[inline]
    pub(crate) fn best_fit(&self, size: usize) -> Option<FreeEntry> {
        let bin = bin_of(size);
        let mut cur = self.roots[bin];
        let mut best = NIL;
        while cur != NIL {
            let n = &self.nodes[cur as usize];
            if n.size >= size {
                best = cur;
                cur = n.left;
            } else {
                cur = n.right;
            }
        }
        if best == NIL {
            let next = self.first_nonempty_from(bin + 1)?;
            best = self.roots[next];
            while self.nodes[best as usize].left != NIL {
                best = self.nodes[best as usize].left;
            }
        }
        let n = &self.nodes[best as usize];
        Some(FreeEntry { size: n.size, addr: n.addr, slot: best })
    }

    /// The largest free block's size (0 when there is none).
    #[inline]
    pub(crate) fn largest(&self) -> usize {
        if self.summary == 0 {
            return 0;
        }
        let word = 63 - self.summary.leading_zeros() as usize;
        let bin = word * 64 + 63 - self.words[word].leading_zeros() as usize;
        let mut cur = self.roots[bin];
        while self.nodes[cur as usize].right != NIL {
            cur = self.nodes[cur as usize].right;
        }
        self.nodes[cur as usize].size
    }

    /// Whether the bitmaps, the bins and the treaps agree (order and heap property included).
    pub(crate) fn consistent(&self) -> bool {
        let mut count = 0;
        for (bin, &root) in self.roots.iter().enumerate() {
            let marked = self.words[bin / 64] >> (bin % 64) & 1 == 1;
            if marked != (root != NIL) || (self.words[bin / 64] != 0) != (self.summary >> (bin / 64) & 1 == 1) {
                return false;
            }
            if root != NIL && !self.treap_ok(root, bin, None, None, u32::MAX, &mut count) {
                return false;
            }
        }
        count == self.len && self.nodes.iter().filter(|n| n.indexed).count() == self.len
    }

    fn treap_ok(
        &self,
        node: u32,
        bin: usize,
        low: Option<(usize, usize)>,
        high: Option<(usize, usize)>,
        max_priority: u32,
        count: &mut usize,
    ) -> bool {
        let Some(n) = self.nodes.get(node as usize) else {
            return false;
        };
        let key = (n.size, n.addr);
        *count += 1;
        if !n.indexed || n.priority > max_priority || bin_of(n.size) != bin || *count > self.len {
            return false;
        }
        if low.is_some_and(|l| key <= l) || high.is_some_and(|h| key >= h) {
            return false;
        }
        (n.left == NIL || self.treap_ok(n.left, bin, low, Some(key), n.priority, count))
            && (n.right == NIL || self.treap_ok(n.right, bin, Some(key), high, n.priority, count))
    }

    /// Inserts `slot` into the treap rooted at `root`; returns the new root.
    fn insert_at(&mut self, root: u32, slot: u32) -> u32 {
        if root == NIL {
            return slot;
        }
        let (key, priority) = {
            let n = &self.nodes[slot as usize];
            ((n.size, n.addr), n.priority)
        };
        if priority > self.nodes[root as usize].priority {
            let (left, right) = self.split(root, key);
            let n = &mut self.nodes[slot as usize];
            n.left = left;
            n.right = right;
            return slot;
        }
        let r = self.nodes[root as usize];
        if key < (r.size, r.addr) {
            let left = self.insert_at(r.left, slot);
            self.nodes[root as usize].left = left;
        } else {
            let right = self.insert_at(r.right, slot);
            self.nodes[root as usize].right = right;
        }
        root
    }

    /// Splits the treap at `root` into keys below `key` and keys above it.
    fn split(&mut self, root: u32, key: (usize, usize)) -> (u32, u32) {
        if root == NIL {
            return (NIL, NIL);
        }
        let r = self.nodes[root as usize];
        if (r.size, r.addr) < key {
            let (left, right) = self.split(r.right, key);
            self.nodes[root as usize].right = left;
            (root, right)
        } else {
            let (left, right) = self.split(r.left, key);
            self.nodes[root as usize].left = right;
            (left, root)
        }
    }

    /// Removes `key` (present) from the treap at `root`; returns the new root.
    fn remove_at(&mut self, root: u32, key: (usize, usize)) -> u32 {
        if root == NIL {
            return NIL;
        }
        let r = self.nodes[root as usize];
        match key.cmp(&(r.size, r.addr)) {
            core::cmp::Ordering::Equal => self.merge(r.left, r.right),
            core::cmp::Ordering::Less => {
                let left = self.remove_at(r.left, key);
                self.nodes[root as usize].left = left;
                root
            }
            core::cmp::Ordering::Greater => {
                let right = self.remove_at(r.right, key);
                self.nodes[root as usize].right = right;
                root
            }
        }
    }

    /// Joins two treaps whose keys are all below / all above each other.
    fn merge(&mut self, left: u32, right: u32) -> u32 {
        if left == NIL {
            return right;
        }
        if right == NIL {
            return left;
        }
        if self.nodes[left as usize].priority > self.nodes[right as usize].priority {
            let merged = self.merge(self.nodes[left as usize].right, right);
            self.nodes[left as usize].right = merged;
            left
        } else {
            let merged = self.merge(left, self.nodes[right as usize].left);
            self.nodes[right as usize].left = merged;
            right
        }
    }

    fn first_nonempty_from(&self, bin: usize) -> Option<usize> {
        if bin >= BINS {
            return None;
        }
        let word = bin / 64;
        let bits = self.words[word] & (!0u64 << (bin % 64));
        if bits != 0 {
            return Some(word * 64 + bits.trailing_zeros() as usize);
        }
        let above = if word + 1 < WORDS { self.summary & (!0u64 << (word + 1)) } else { 0 };
        if above == 0 {
            return None;
        }
        let word = above.trailing_zeros() as usize;
        Some(word * 64 + self.words[word].trailing_zeros() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut index = FreeIndex::new();
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
        let mut index = FreeIndex::new();
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
}
