//! Generations of thread-local slots, so a key used after `tls_delete` is refused even once its
//! slot has been handed to another key.
//!
//! pthreads names a key by a small slot index that it reuses as soon as it is freed, and the
//! models that keep their own key table ([`KeyTable`](crate::table::KeyTable)) do the same. The
//! models keep one generation per index: odd while a key of the model holds the slot, even
//! while it is free (or held by code outside the model). A key carries the odd generation it was
//! made with; every get, set and delete compares it with the slot's, so a deleted key never
//! matches again, whoever holds its slot now.

use hetmem_core::{Error, Result};

use crate::sync::{AtomicU64, Ordering};
use crate::DELETED_KEY;

/// The generation of each slot index below `N` (a power of two).
pub struct SlotGenerations<const N: usize>([AtomicU64; N]);

impl<const N: usize> SlotGenerations<N> {
    /// All slots free.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        assert!(N.is_power_of_two());
        Self([const { AtomicU64::new(0) }; N])
    }

    /// All slots free.
    #[cfg(loom)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        assert!(N.is_power_of_two());
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    /// Whether a key holds `index` (its generation is odd).
    #[cfg(any(windows, feature = "std"))]
    pub fn is_held(&self, index: usize) -> bool {
        self.0[index & (N - 1)].load(Ordering::Acquire) & 1 == 1
    }

    /// Marks `index`, just handed out by the OS (or the model's key table), as held by a new key; returns the key's
    /// generation, or `beyond_table` when the index does not fit the table.
    pub fn open(&self, index: usize, beyond_table: Error) -> Result<u64> {
        let slot = self.0.get(index).ok_or(beyond_table)?;
        // Only the owner of a slot index writes its generation, and the OS (or the key table,
        // under its lock) gives each index one owner at a time, so this needs no loop. The next
        // odd value: from an even one (freed through the model) +1; from an odd one (freed behind
        // the model's back, so its old key never saw `tls_delete`) +2, which retires that key too.
        let old = slot.load(Ordering::Acquire);
        let generation = (old + 1) | 1;
        slot.store(generation, Ordering::Release);
        Ok(generation)
    }

    /// Whether the key `(index, generation)` is still the one holding its slot: the one extra
    /// compare of the fast paths.
    ///
    /// Sequentially consistent, as is [`close`](Self::close): the pthreads model orders this
    /// load after its own store of a counter that `tls_delete` reads after closing (an acquire
    /// load costs the same on x86 and ARMv8).
    #[inline]
    pub fn is_live(&self, index: usize, generation: u64) -> bool {
        // Keys only carry indexes that `open` accepted; the mask drops the bounds check.
        self.0[index & (N - 1)].load(Ordering::SeqCst) == generation
    }

    /// Retires the key `(index, generation)` before its slot goes back to the OS; a key already
    /// retired gets [`DELETED_KEY`]. Exactly one of several racing deletes of a key succeeds.
    pub fn close(&self, index: usize, generation: u64) -> Result<()> {
        self.0[index & (N - 1)]
            .compare_exchange(generation, generation + 1, Ordering::SeqCst, Ordering::Acquire)
            .map(drop)
            .map_err(|_| DELETED_KEY)
    }

    /// Undoes `close` when the OS refused to free the slot: the key stays usable.
    #[cfg(unix)]
    pub fn reopen(&self, index: usize, generation: u64) {
        self.0[index & (N - 1)].store(generation, Ordering::Release);
    }
}
