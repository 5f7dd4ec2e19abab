//! Size classes: which block a value of a given size gets, and where links and stack heads live.

/// Bytes at the end of every block that hold its link while it is on a free stack.
pub(crate) const LINK_BYTES: usize = 4;

/// The smallest size class: blocks of 8 bytes (4 for the value, 4 for the link).
pub(crate) const MIN_CLASS: u32 = 3;

/// The smallest block, in bytes.
pub const MIN_BLOCK: usize = 1 << MIN_CLASS;

/// The size class (log2 of the block size) of a value of `size` bytes, `size > 0`.
///
/// The block holds the value and, after it, the link: the smallest power of two of at least
/// `size + LINK_BYTES` bytes.
#[inline(always)]
pub(crate) const fn class_of(size: usize) -> u32 {
    // size + LINK_BYTES - 1 >= 4, so leading_zeros < BITS; no overflow for size <= isize::MAX.
    usize::BITS - (size + LINK_BYTES - 1).leading_zeros()
}

/// The block a value of `size` bytes takes, in bytes; zero for a zero-sized value, `None` when
/// the block would not fit the address space.
pub const fn block_size(size: usize) -> Option<usize> {
    if size == 0 {
        return Some(0);
    }
    // The largest power of two that an object (at most isize::MAX bytes) can have, less the link.
    if size > (1 << (usize::BITS - 2)) - LINK_BYTES {
        return None;
    }
    Some(1 << class_of(size))
}

/// How many free stacks a store whose largest value is `max_size` bytes needs.
pub(crate) const fn class_count(max_size: usize) -> usize {
    let top = if max_size == 0 { MIN_CLASS } else { class_of(max_size) };
    (top - MIN_CLASS + 1) as usize
}

/// Bytes at the start of the store taken by the stack heads, rounded up to the smallest block.
pub(crate) const fn heads_bytes(max_size: usize) -> usize {
    let raw = class_count(max_size) * core::mem::size_of::<usize>();
    (raw + MIN_BLOCK - 1) & !(MIN_BLOCK - 1)
}

/// Offset of size class `class`'s stack head from the start of the store.
#[inline(always)]
pub(crate) const fn head_offset(class: u32) -> usize {
    (class - MIN_CLASS) as usize * core::mem::size_of::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_leave_room_for_the_link() {
        assert_eq!(class_of(1), 3);
        assert_eq!(class_of(4), 3);
        assert_eq!(class_of(5), 4);
        assert_eq!(class_of(8), 4);
        assert_eq!(class_of(12), 4);
        assert_eq!(class_of(13), 5);
        assert_eq!(class_of(100), 7);
        assert_eq!(class_of(124), 7);
        assert_eq!(class_of(125), 8);
        for size in 1..5000usize {
            let block = 1usize << class_of(size);
            assert!(block >= size + LINK_BYTES, "{size}");
            assert!(block / 2 < size + LINK_BYTES || block == MIN_BLOCK, "{size} wastes a class");
        }
    }

    #[test]
    fn block_sizes_and_heads() {
        assert_eq!(block_size(0), Some(0));
        assert_eq!(block_size(1), Some(8));
        assert_eq!(block_size(100), Some(128));
        assert_eq!(block_size(usize::MAX), None);
        // The largest block that fits the address space is 2^(BITS-2) (2^62 on 64-bit targets):
        // objects are at most isize::MAX bytes.
        let largest = 1usize << (usize::BITS - 2);
        assert_eq!(block_size(largest - LINK_BYTES), Some(largest));
        for size in largest - LINK_BYTES + 1..=largest - LINK_BYTES + 8 {
            assert_eq!(block_size(size), None, "{size}");
        }
        assert_eq!(block_size(isize::MAX as usize / 2), None);
        assert_eq!(class_count(128), 6); // 8, 16, 32, 64, 128, 256
        assert_eq!(class_count(4), 1);
        assert_eq!(heads_bytes(4) % MIN_BLOCK, 0);
        assert_eq!(head_offset(MIN_CLASS), 0);
        assert_eq!(head_offset(MIN_CLASS + 2), 2 * core::mem::size_of::<usize>());
    }
}
