//! Lock-free bitmap words: claim a clear bit, release a set one. A set bit is a block in use.
//!
//! These are the two steps of [`BitmapAllocator`](crate::allocators::BitmapAllocator), and of its
//! C twin for CUDA and HIP kernels (`gpu/include/hetmem_bitmap.h`), which does the same with the
//! device's system-scope atomics: a bit is claimed by one atomic or, released by one atomic and,
//! and whoever changes it is told so by the old value, so two claims never get one bit and of two
//! releases of one bit exactly one succeeds.

use crate::sync::atomic::{AtomicU64, Ordering};

/// Claims the lowest clear bit of `word` and returns its index, or `None` once every bit is set.
///
/// Acquire on success: what the bit's last releaser wrote happens before the claimer's use.
#[inline]
pub fn claim_bit(word: &AtomicU64) -> Option<u32> {
    let mut bits = word.load(Ordering::Relaxed);
    while bits != u64::MAX {
        let bit = (!bits).trailing_zeros();
        let old = word.fetch_or(1 << bit, Ordering::AcqRel);
        if old & (1 << bit) == 0 {
            return Some(bit);
        }
        // Another claimer took it first: try the word as it is now.
        bits = old | 1 << bit;
    }
    None
}

/// Clears bit `bit` (below 64) of `word`; returns whether it was set (false: it was not in use,
/// a double free).
///
/// Release: the releaser's writes happen before the next claimer's use.
#[inline]
pub fn release_bit(word: &AtomicU64, bit: u32) -> bool {
    debug_assert!(bit < 64);
    let mask = 1u64 << (bit & 63);
    word.fetch_and(!mask, Ordering::AcqRel) & mask != 0
}

/// Whether bit `bit` (below 64) of `word` is set.
#[inline]
pub fn bit_is_set(word: &AtomicU64, bit: u32) -> bool {
    word.load(Ordering::Acquire) >> (bit & 63) & 1 == 1
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn claims_take_the_lowest_clear_bit_and_releases_report_double_frees() {
        let w = AtomicU64::new(0b1011);
        assert_eq!(claim_bit(&w), Some(2));
        assert_eq!(claim_bit(&w), Some(4));
        assert!(release_bit(&w, 0));
        assert!(!release_bit(&w, 0), "a second release of one bit is refused");
        assert_eq!(claim_bit(&w), Some(0));
        let full = AtomicU64::new(u64::MAX);
        assert_eq!(claim_bit(&full), None);
        assert!(bit_is_set(&full, 63));
        assert!(release_bit(&full, 63));
        assert_eq!(claim_bit(&full), Some(63));
    }

    #[test]
    fn threads_never_claim_one_bit_twice() {
        let words: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        let claimed: Vec<Vec<(usize, u32)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let words = &words;
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        for i in 0..words.len() {
                            let w = (i + t) % words.len();
                            while let Some(bit) = claim_bit(&words[w]) {
                                mine.push((w, bit));
                            }
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<_> = claimed.into_iter().flatten().collect();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        assert_eq!((before, all.len()), (256, 256));
    }
}
