//! [`FreeIndex`]: the free blocks of a pool, by size, for exact best fit in O(log n).
//!
//! Sizes fall into 512 bins: the power of two of the size, split into 8 linear sub-bins (as in
//! TLSF). A bitmap says which bins hold blocks, so the first bin that can serve a request is
//! found with a few bit operations; inside a bin, blocks are kept in a `BTreeMap` by
//! `(size, address)`, so the smallest block that fits (lowest address among equals) is an
//! ordered-map lookup. Bins keep each map small, so the lookup is usually one node.
//!
//! Only sizes and addresses are stored: nothing here touches the blocks' memory.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

const SUB_BITS: u32 = 3;
const SUB_BINS: usize = 1 << SUB_BITS;
const BINS: usize = usize::BITS as usize * SUB_BINS;
const WORDS: usize = BINS / 64;

/// The bin of a non-zero size. Bins are ordered: a larger size never falls in a lower bin.
fn bin_of(size: usize) -> usize {
    debug_assert!(size > 0);
    let log = (usize::BITS - 1 - size.leading_zeros()) as usize;
    let sub = if log >= SUB_BITS as usize { (size >> (log - SUB_BITS as usize)) & (SUB_BINS - 1) } else { 0 };
    log * SUB_BINS + sub
}

/// One free block as the index knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FreeEntry {
    pub size: usize,
    pub addr: usize,
    /// The block's slot in the owner's block table.
    pub slot: u32,
}

/// Free blocks by `(size, address)`, binned. See the [module docs](self).
pub(crate) struct FreeIndex {
    bins: Vec<BTreeMap<(usize, usize), u32>>,
    nonempty: [u64; WORDS],
    len: usize,
}

impl FreeIndex {
    pub(crate) fn new() -> Self {
        FreeIndex { bins: (0..BINS).map(|_| BTreeMap::new()).collect(), nonempty: [0; WORDS], len: 0 }
    }

    /// How many free blocks are indexed.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn insert(&mut self, size: usize, addr: usize, slot: u32) {
        let bin = bin_of(size);
        if self.bins[bin].insert((size, addr), slot).is_none() {
            self.len += 1;
        }
        self.nonempty[bin / 64] |= 1 << (bin % 64);
    }

    /// Removes the block `(size, addr)`; returns whether it was there.
    pub(crate) fn remove(&mut self, size: usize, addr: usize) -> bool {
        let bin = bin_of(size);
        let map = &mut self.bins[bin];
        let found = map.remove(&(size, addr)).is_some();
        if found {
            self.len -= 1;
            if map.is_empty() {
                self.nonempty[bin / 64] &= !(1 << (bin % 64));
            }
        }
        found
    }

    /// The slot of block `(size, addr)`, if indexed.
    pub(crate) fn get(&self, size: usize, addr: usize) -> Option<u32> {
        self.bins[bin_of(size)].get(&(size, addr)).copied()
    }

    /// The smallest block of at least `size` bytes, lowest address first among equals.
    pub(crate) fn best_fit(&self, size: usize) -> Option<FreeEntry> {
        let bin = bin_of(size);
        if self.nonempty[bin / 64] & (1 << (bin % 64)) != 0 {
            if let Some((&(size, addr), &slot)) = self.bins[bin].range((size, 0)..).next() {
                return Some(FreeEntry { size, addr, slot });
            }
        }
        let next = self.first_nonempty_from(bin + 1)?;
        let (&(size, addr), &slot) = self.bins[next].first_key_value()?;
        Some(FreeEntry { size, addr, slot })
    }

    /// The largest free block's size (0 when there is none).
    pub(crate) fn largest(&self) -> usize {
        let top = (0..WORDS).rev().find(|&w| self.nonempty[w] != 0);
        top.and_then(|w| {
            let bin = w * 64 + 63 - self.nonempty[w].leading_zeros() as usize;
            self.bins[bin].last_key_value().map(|(&(size, _), _)| size)
        })
        .unwrap_or(0)
    }

    /// Whether the bitmap agrees with the bins.
    pub(crate) fn bitmap_consistent(&self) -> bool {
        self.bins.iter().enumerate().all(|(bin, m)| (self.nonempty[bin / 64] >> (bin % 64) & 1 == 1) != m.is_empty())
            && self.bins.iter().map(BTreeMap::len).sum::<usize>() == self.len
    }

    fn first_nonempty_from(&self, bin: usize) -> Option<usize> {
        if bin >= BINS {
            return None;
        }
        let mut word = bin / 64;
        let mut bits = self.nonempty[word] & (!0u64 << (bin % 64));
        loop {
            if bits != 0 {
                return Some(word * 64 + bits.trailing_zeros() as usize);
            }
            word += 1;
            if word == WORDS {
                return None;
            }
            bits = self.nonempty[word];
        }
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
        for (i, (size, addr)) in [(4096, 0x1000), (300, 0x9000), (256, 0x8000), (256, 0x7000), (1 << 20, 0x100000)]
            .into_iter()
            .enumerate()
        {
            index.insert(size, addr, i as u32);
        }
        assert_eq!(index.best_fit(200).map(|e| (e.size, e.addr)), Some((256, 0x7000)));
        assert_eq!(index.best_fit(257).map(|e| e.size), Some(300));
        assert_eq!(index.best_fit(301).map(|e| e.size), Some(4096));
        assert_eq!(index.best_fit(5000).map(|e| e.size), Some(1 << 20));
        assert_eq!(index.best_fit((1 << 20) + 1), None);
        assert_eq!(index.largest(), 1 << 20);
        assert!(index.remove(1 << 20, 0x100000));
        assert!(!index.remove(1 << 20, 0x100000));
        assert_eq!(index.largest(), 4096);
        assert_eq!(index.len(), 4);
        assert!(index.bitmap_consistent());
    }
}
