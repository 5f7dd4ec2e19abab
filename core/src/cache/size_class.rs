//! Power-of-two size classes shared by every caching tier.
//!
//! Class `c` holds blocks of `16 << c` bytes, aligned to [`BLOCK_ALIGN`]. The mapping from a
//! request to its class and to the layout asked of the upstream depends on the request alone,
//! never on a thread's configuration: a block allocated on one thread can be freed on any other,
//! cached or not, and the upstream always gets back exactly the layout it handed out.

use core::alloc::Layout;

/// log2 of the smallest block: two pointers, so a cached block can hold the free-list links.
pub const MIN_BLOCK_SHIFT: u32 = 4;
/// The number of size classes: 16 B to 1 MiB.
pub const MAX_BUCKETS: usize = 17;
/// The largest block a cache holds; bigger requests go straight upstream.
pub const MAX_BLOCK: usize = class_size(MAX_BUCKETS - 1);
/// The alignment every cached block has. Requests with a larger alignment bypass the caches.
pub const BLOCK_ALIGN: usize = 16;

/// The size of the blocks in class `class`, or `None` for a class past the last
/// (`MAX_BUCKETS - 1`).
#[inline]
pub const fn block_size(class: usize) -> Option<usize> {
    if class < MAX_BUCKETS {
        Some(class_size(class))
    } else {
        None
    }
}

/// [`block_size`] of a class the caller knows to be below [`MAX_BUCKETS`].
#[inline]
pub(crate) const fn class_size(class: usize) -> usize {
    debug_assert!(class < MAX_BUCKETS);
    1 << (class as u32 + MIN_BLOCK_SHIFT)
}

/// The class whose blocks hold `size` bytes, or `None` if `size` exceeds [`MAX_BLOCK`].
#[inline]
pub const fn class_of_size(size: usize) -> Option<usize> {
    if size > MAX_BLOCK {
        return None;
    }
    // Or-ing in the low bits puts every size up to the smallest block (0 included) in class 0
    // without a branch, and keeps `leading_zeros` away from 0.
    let last_byte = size.saturating_sub(1) | ((1 << MIN_BLOCK_SHIFT) - 1);
    Some((usize::BITS - last_byte.leading_zeros() - MIN_BLOCK_SHIFT) as usize)
}

/// The class that serves `layout`, or `None` if the request is too big or too strictly aligned
/// to be cached.
#[inline]
pub const fn class_of(layout: Layout) -> Option<usize> {
    if layout.align() > BLOCK_ALIGN {
        return None;
    }
    class_of_size(layout.size())
}

/// The `(size, align)` the upstream sees for `layout`: a whole block for cacheable requests,
/// the request itself otherwise.
#[inline]
pub const fn upstream_layout(layout: Layout) -> (usize, usize) {
    match class_of(layout) {
        Some(class) => (class_size(class), BLOCK_ALIGN),
        None => (layout.size(), layout.align()),
    }
}

/// How many blocks of `class` move between a thread cache and the depot at once: about 32 KiB,
/// between 1 and 64 blocks.
#[inline]
pub const fn batch_len(class: usize) -> usize {
    let n = (32 * 1024) / class_size(class);
    if n == 0 {
        1
    } else if n > 64 {
        64
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class_of_size(0), Some(0));
        assert_eq!(class_of_size(1), Some(0));
        assert_eq!(class_of_size(16), Some(0));
        assert_eq!(class_of_size(17), Some(1));
        assert_eq!(class_of_size(32), Some(1));
        assert_eq!(class_of_size(4096), Some(8));
        assert_eq!(class_of_size(4097), Some(9));
        assert_eq!(class_of_size(MAX_BLOCK), Some(MAX_BUCKETS - 1));
        assert_eq!(class_of_size(MAX_BLOCK + 1), None);
        for size in 1..=70_000 {
            let c = class_of_size(size).unwrap();
            assert!(class_size(c) >= size);
            assert!(c == 0 || class_size(c - 1) < size);
        }
    }

    /// A class past the last has no block size (a shift past the word used to panic in debug
    /// builds and wrap in release).
    #[test]
    fn block_sizes_of_classes_past_the_last_are_none() {
        assert_eq!(block_size(0), Some(16));
        assert_eq!(block_size(MAX_BUCKETS - 1), Some(MAX_BLOCK));
        for class in [MAX_BUCKETS, 60, 64, usize::MAX / 2, usize::MAX] {
            assert_eq!(block_size(class), None);
            assert_eq!(crate::cache::CacheConfig::block_size(class), None);
        }
    }

    #[test]
    fn over_aligned_requests_bypass_the_classes() {
        let l = Layout::from_size_align(64, 64).unwrap();
        assert_eq!(class_of(l), None);
        assert_eq!(upstream_layout(l), (64, 64));
        let l = Layout::from_size_align(100, 8).unwrap();
        assert_eq!(upstream_layout(l), (128, BLOCK_ALIGN));
    }

    #[test]
    fn batches_are_about_32k() {
        assert_eq!(batch_len(0), 64);
        assert_eq!(batch_len(8), 8);
        assert_eq!(batch_len(MAX_BUCKETS - 1), 1);
    }
}
