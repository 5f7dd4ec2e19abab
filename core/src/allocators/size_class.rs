//! Size classes shared by the span-based allocators: four per doubling, so a request never
//! wastes more than 20% of its block (sizes of 64 bytes and up; below that, 16-byte steps keep
//! blocks 16-aligned and waste at most 15 bytes).
//!
//! ```text
//! 16 32 48 64 | 80 96 112 128 | 160 192 224 256 | 320 ... | 10240 12288 14336 16384
//! ```
//!
//! Requests above [`SMALL_MAX`] go to the free-space manager in whole units.

/// The largest request served from a size class.
pub const SMALL_MAX: usize = 16 * 1024;
/// How many size classes there are.
pub const CLASS_COUNT: usize = 4 + 4 * 8;

/// The block size of class `class` (user bytes, without the block header). Classes from
/// [`CLASS_COUNT`] on continue the series past [`SMALL_MAX`] (no allocator serves them); where
/// it would overflow, the size is `usize::MAX`.
#[inline]
pub const fn class_size(class: usize) -> usize {
    if class < 4 {
        (class + 1) * 16
    } else {
        let k = (class - 4) / 4; // doubling: 64 << k
        let j = (class - 4) % 4 + 1; // quarter steps
                                     // The largest size of doubling `k` is 128 << k.
        if k > usize::BITS as usize - 8 {
            return usize::MAX;
        }
        (64 << k) + j * (16 << k)
    }
}

/// The smallest class whose size is at least `size` (1 ..= [`SMALL_MAX`]), or `None` above.
#[inline]
pub fn class_of(size: usize) -> Option<usize> {
    if size <= 64 {
        return Some(size.saturating_sub(1) / 16);
    }
    if size > SMALL_MAX {
        return None;
    }
    // size in (64 << k, 128 << k]: k = floor(log2(size - 1)) - 6.
    let top = usize::BITS - 1 - (size - 1).leading_zeros(); // floor(log2(size-1))
    let k = top as usize - 6;
    let step_shift = k + 4; // quarter step = 16 << k
    let j = ((size - 1 - (64 << k)) >> step_shift) + 1; // 1..=4
    Some(4 + k * 4 + j - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_past_the_last_continue_the_series_without_overflow() {
        let top = 4 + 4 * (usize::BITS as usize - 8);
        assert_eq!(class_size(top + 3), 1 << (usize::BITS - 1));
        assert_eq!(class_size(top + 4), usize::MAX);
        assert_eq!(class_size(usize::MAX), usize::MAX);
        assert_eq!(class_size(CLASS_COUNT), SMALL_MAX + SMALL_MAX / 4);
    }

    #[test]
    fn classes_increase_and_end_at_small_max() {
        for c in 1..CLASS_COUNT {
            assert!(class_size(c) > class_size(c - 1));
            assert_eq!(class_size(c) % 16, 0);
        }
        assert_eq!(class_size(CLASS_COUNT - 1), SMALL_MAX);
    }

    #[test]
    fn every_size_maps_to_the_smallest_class_that_fits_with_bounded_waste() {
        for size in 1..=SMALL_MAX {
            let c = class_of(size).unwrap();
            assert!(class_size(c) >= size, "size {size} class {c}");
            assert!(c == 0 || class_size(c - 1) < size, "size {size} not smallest");
            let waste = class_size(c) - size;
            if size >= 64 {
                assert!(waste * 5 <= class_size(c), "size {size}: waste {waste}");
            } else {
                assert!(waste < 16);
            }
        }
        assert_eq!(class_of(SMALL_MAX + 1), None);
    }
}
