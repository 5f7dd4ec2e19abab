//! The free stacks, one per size class: Treiber stacks whose head word is tagged against ABA.
//!
//! A head word holds the link of the top block in its low [`LINK_BITS`] bits (0: the stack is
//! empty) and a tag in the bits above. Every pop advances the tag. A pop that read `(X, t)` and
//! then lost the processor while others popped `X`, popped its successor and pushed `X` back finds
//! `(X, t + 2)` or more and retries instead of installing a successor that is in use. (The head can
//! only show `X` on top again after `X`, or something pushed above it, was popped, so the tag has
//! moved on: the head does not repeat a value short of 2^32 pops of that class on 64-bit
//! targets, 2^16 on 32-bit ones.) A
//! block's link to the next block lives in the block (its last four bytes) and is only ever
//! accessed atomically, so a stale read by a pop that is about to fail is not a data race with
//! the value's new owner.
//!
//! The layout is chosen for the push (the drop of a box), which should be the shortest path: the
//! link cell takes the low 32 bits of the old head as they are (readers mask them), and the new
//! head is `(old & !LINK_MASK) + link`. The pop does the tag's arithmetic.
//!
//! The algorithm is written over [`HeadCell`] and [`LinkCell`] so that the loom models
//! (`core/tests/loom_fastmem.rs`) run it on loom's atomics; the store runs it on `core`'s atomics
//! placed inside its bytes. With the `critical-section` feature, the same operations run inside a
//! critical section with plain loads and stores (no compare-and-swap needed).

use core::sync::atomic::Ordering;

/// Bits of a head word (and of a link cell) that hold a link: 30 on 64-bit targets, where links
/// are byte offsets (stores up to 1 GiB), 16 on 32-bit ones, where links count 8-byte units
/// (stores up to 512 KiB). The tag has the other 34 or 16 bits.
#[cfg(target_pointer_width = "64")]
pub const LINK_BITS: u32 = 30;
/// See the 64-bit definition.
#[cfg(not(target_pointer_width = "64"))]
pub const LINK_BITS: u32 = 16;
/// log2 of the bytes one link unit stands for.
#[cfg(target_pointer_width = "64")]
pub(crate) const LINK_UNIT_SHIFT: u32 = 0;
/// See the 64-bit definition.
#[cfg(not(target_pointer_width = "64"))]
pub(crate) const LINK_UNIT_SHIFT: u32 = 3;
/// The link bits of a head word or link cell.
pub(crate) const LINK_MASK: usize = (1 << LINK_BITS) - 1;
/// The largest link.
pub(crate) const MAX_LINK: usize = LINK_MASK;
/// One step of the tag.
const ONE_TAG: usize = 1 << LINK_BITS;
/// What a pop keeps of a link cell. On 64-bit targets the cell's two bits above the link are the
/// low tag bits of the head it was copied from; keeping them (the 32-bit load needs no mask) adds
/// 0 to 3 more to the tag, which still moves it on by 1 to 4 per pop. On 32-bit targets the cell
/// holds a whole head word, whose tag must be masked off.
#[cfg(target_pointer_width = "64")]
const NEXT_MASK: usize = u32::MAX as usize;
/// See the 64-bit definition.
#[cfg(not(target_pointer_width = "64"))]
const NEXT_MASK: usize = LINK_MASK;

/// A stack's head word.
pub trait HeadCell {
    /// Reads the word.
    fn load(&self, order: Ordering) -> usize;
    /// Writes the word (only inside a critical section).
    #[cfg(feature = "critical-section")]
    fn store(&self, value: usize, order: Ordering);
    /// Replaces `current` with `new`; may fail spuriously.
    #[cfg(not(feature = "critical-section"))]
    fn compare_exchange_weak(
        &self,
        current: usize,
        new: usize,
        success: Ordering,
        failure: Ordering,
    ) -> Result<usize, usize>;
}

/// A block's link to the block below it on its stack.
pub trait LinkCell {
    /// Reads the cell.
    fn load(&self, order: Ordering) -> u32;
    /// Writes the cell.
    fn store(&self, value: u32, order: Ordering);
}

macro_rules! impl_cells {
    ($head:ty, $link:ty) => {
        impl HeadCell for $head {
            #[inline(always)]
            fn load(&self, order: Ordering) -> usize {
                <$head>::load(self, order)
            }
            #[cfg(feature = "critical-section")]
            #[inline(always)]
            fn store(&self, value: usize, order: Ordering) {
                <$head>::store(self, value, order)
            }
            #[cfg(not(feature = "critical-section"))]
            #[inline(always)]
            fn compare_exchange_weak(
                &self,
                current: usize,
                new: usize,
                success: Ordering,
                failure: Ordering,
            ) -> Result<usize, usize> {
                <$head>::compare_exchange_weak(self, current, new, success, failure)
            }
        }
        impl LinkCell for $link {
            #[inline(always)]
            fn load(&self, order: Ordering) -> u32 {
                <$link>::load(self, order)
            }
            #[inline(always)]
            fn store(&self, value: u32, order: Ordering) {
                <$link>::store(self, value, order)
            }
        }
    };
}

impl_cells!(core::sync::atomic::AtomicUsize, core::sync::atomic::AtomicU32);
#[cfg(loom)]
impl_cells!(loom::sync::atomic::AtomicUsize, loom::sync::atomic::AtomicU32);

/// The link held by a head word or a link cell (0: none).
#[inline(always)]
pub(crate) const fn link_in(word: usize) -> usize {
    word & LINK_MASK
}

/// Takes the top block off the stack and returns its link, or `None` if the stack is empty.
///
/// `link_cell(link)` gives the link cell of the block that `link` names; it is only called with
/// links that were pushed onto this stack at some time.
#[inline(always)]
pub fn pop<'c, H: HeadCell, L: LinkCell + 'c>(head: &H, link_cell: impl Fn(usize) -> &'c L) -> Option<usize> {
    #[cfg(not(feature = "critical-section"))]
    {
        let mut old = head.load(Ordering::Acquire);
        loop {
            let link = link_in(old);
            if link == 0 {
                return None;
            }
            // If another thread takes `link` meanwhile, this may read a stale successor; the tag
            // then differs and the exchange fails.
            let next = link_cell(link).load(Ordering::Relaxed) as usize & NEXT_MASK;
            let new = (old & !LINK_MASK).wrapping_add(ONE_TAG).wrapping_add(next);
            match head.compare_exchange_weak(old, new, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => return Some(link),
                Err(seen) => old = seen,
            }
        }
    }
    #[cfg(feature = "critical-section")]
    {
        critical_section::with(|_| {
            let old = head.load(Ordering::Relaxed);
            let link = link_in(old);
            if link == 0 {
                return None;
            }
            let next = link_cell(link).load(Ordering::Relaxed) as usize & NEXT_MASK;
            head.store((old & !LINK_MASK).wrapping_add(ONE_TAG).wrapping_add(next), Ordering::Relaxed);
            Some(link)
        })
    }
}

/// Puts the block named `link` (`0 < link <= MAX_LINK`), whose link cell is `cell`, on top of
/// the stack.
#[inline(always)]
pub fn push<H: HeadCell, L: LinkCell>(head: &H, link: usize, cell: &L) {
    debug_assert!(link != 0 && link <= MAX_LINK);
    #[cfg(not(feature = "critical-section"))]
    {
        let mut old = head.load(Ordering::Relaxed);
        loop {
            // The low 32 bits hold the link below (LINK_BITS <= 32); readers mask off the rest.
            cell.store(old as u32, Ordering::Relaxed);
            let new = (old & !LINK_MASK) + link;
            match head.compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => old = seen,
            }
        }
    }
    #[cfg(feature = "critical-section")]
    {
        critical_section::with(|_| {
            let old = head.load(Ordering::Relaxed);
            cell.store(old as u32, Ordering::Relaxed);
            head.store((old & !LINK_MASK) + link, Ordering::Relaxed);
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;

    use super::*;
    use core::sync::atomic::{AtomicU32, AtomicUsize};

    fn cells(n: usize) -> std::vec::Vec<AtomicU32> {
        (0..=n).map(|_| AtomicU32::new(u32::MAX)).collect()
    }

    #[test]
    fn lifo_order_and_tags() {
        let head = AtomicUsize::new(0);
        let links = cells(3);
        let tag = |head: &AtomicUsize| head.load(Ordering::Relaxed) >> LINK_BITS;
        assert_eq!(pop(&head, |l| &links[l]), None);
        push(&head, 1, &links[1]);
        push(&head, 3, &links[3]);
        push(&head, 2, &links[2]);
        assert_eq!(tag(&head), 0, "pushes keep the tag");
        let mut tags = std::vec![];
        assert_eq!(pop(&head, |l| &links[l]), Some(2));
        tags.push(tag(&head));
        assert_eq!(pop(&head, |l| &links[l]), Some(3));
        tags.push(tag(&head));
        push(&head, 3, &links[3]);
        assert_eq!(pop(&head, |l| &links[l]), Some(3));
        tags.push(tag(&head));
        assert_eq!(pop(&head, |l| &links[l]), Some(1));
        tags.push(tag(&head));
        assert_eq!(pop(&head, |l| &links[l]), None);
        assert!(
            tags[0] >= 1 && tags.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= 4),
            "each pop advances the tag by 1 to 4: {tags:?}"
        );
    }

    #[test]
    fn largest_link_and_tag_wraparound() {
        let head = AtomicUsize::new(!LINK_MASK); // the largest tag: the next pop wraps it
        let cell = AtomicU32::new(0);
        push(&head, MAX_LINK, &cell);
        assert_eq!(head.load(Ordering::Relaxed), usize::MAX);
        assert_eq!(pop(&head, |_| &cell), Some(MAX_LINK));
        let after = head.load(Ordering::Relaxed);
        assert_eq!(link_in(after), 0, "empty again");
        assert!(after >> LINK_BITS <= 3, "the tag wrapped around: {after:#x}");
        assert_eq!(pop(&head, |_| &cell), None);
    }
}
