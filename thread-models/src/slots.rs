//! Generations of thread-local slots, so a key used after `tls_delete` is refused even once its
//! slot has been handed to another key.
//!
//! pthreads names a key by a small slot index that it reuses as soon as it is freed, and the
//! models that keep their own key table ([`KeyTable`](crate::table::KeyTable)) do the same. The
//! models keep one generation per index: odd while a key of the model holds the slot, even
//! while it is free (or held by code outside the model). A key carries the odd generation it was
//! made with; every get, set and delete compares it with the slot's, so a deleted key never
//! matches again, whoever holds its slot now. For pthreads, whose `tls_set` stores into the OS's
//! slot, [`SetsUnderWay`] also keeps a delete waiting for the sets that found the key live.

use hetmem_core::{Error, Result};

#[cfg(unix)]
use crate::sync::{fence, yield_now, AtomicU32};
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
    /// compare of the fast paths. (A store racing the key's delete is ordered against it by
    /// [`SetsUnderWay`]'s fences, not by this load.)
    #[inline]
    pub fn is_live(&self, index: usize, generation: u64) -> bool {
        // Keys only carry indexes that `open` accepted; the mask drops the bounds check.
        self.0[index & (N - 1)].load(Ordering::Acquire) == generation
    }

    /// Retires the key `(index, generation)` before its slot goes back to the OS; a key already
    /// retired gets [`DELETED_KEY`]. Exactly one of several racing deletes of a key succeeds.
    pub fn close(&self, index: usize, generation: u64) -> Result<()> {
        self.0[index & (N - 1)]
            .compare_exchange(generation, generation + 1, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
            .map_err(|_| DELETED_KEY)
    }

    /// Undoes `close` when the OS refused to free the slot: the key stays usable.
    #[cfg(unix)]
    pub fn reopen(&self, index: usize, generation: u64) {
        self.0[index & (N - 1)].store(generation, Ordering::Release);
    }
}

/// Per slot index, the stores under way through keys that were live when they began (the
/// pthreads model's `tls_set`, between its generation check and `pthread_setspecific`), so that a
/// delete waits for them before the OS hands the slot to a new key: a store that passed its check
/// lands under the deleted key, never under the next one.
///
/// A store counts itself, then checks its key; a delete retires the key, then reads the count.
/// Each side writes its own word, then a sequentially consistent fence, then reads the other's.
/// Of the two fences one comes first, and the read after the later one sees the write before
/// the earlier one: a store either finds its key retired or is waited for. (Sequentially
/// consistent accesses without the fences would do as well in C11, but loom, which checks this
/// in `tests/loom_slots.rs`, models them as acquire and release ones, and the fences it models.)
#[cfg(unix)]
pub struct SetsUnderWay<const N: usize>([AtomicU32; N]);

#[cfg(unix)]
impl<const N: usize> SetsUnderWay<N> {
    /// None under way.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        assert!(N.is_power_of_two());
        Self([const { AtomicU32::new(0) }; N])
    }

    /// None under way.
    #[cfg(loom)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        assert!(N.is_power_of_two());
        Self(std::array::from_fn(|_| AtomicU32::new(0)))
    }

    /// Runs `store` if the key `(index, generation)` of `generations` is live, keeping
    /// [`close_and_wait`](Self::close_and_wait) of the key waiting until it has run; `None`, and
    /// `store` not run, if the key is retired. `counted` runs once the store is counted, before
    /// it checks the key (for tests).
    #[inline]
    pub fn store_if_live<R>(
        &self,
        generations: &SlotGenerations<N>,
        index: usize,
        generation: u64,
        counted: impl FnOnce(),
        store: impl FnOnce() -> R,
    ) -> Option<R> {
        // A key already retired is refused before it is counted: stores through it, which other
        // threads may go on making, must not keep a delete waiting on the count.
        if !generations.is_live(index, generation) {
            return None;
        }
        let under_way = &self.0[index & (N - 1)];
        under_way.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        counted();
        let stored = generations.is_live(index, generation).then(store);
        // Release: what `store` did happens before the delete that reads the count back to zero.
        under_way.fetch_sub(1, Ordering::Release);
        stored
    }

    /// Retires the key `(index, generation)` of `generations` (see
    /// [`SlotGenerations::close`]), then waits for the stores through it that found it live.
    pub fn close_and_wait(&self, generations: &SlotGenerations<N>, index: usize, generation: u64) -> Result<()> {
        generations.close(index, generation)?;
        fence(Ordering::SeqCst);
        let under_way = &self.0[index & (N - 1)];
        while under_way.load(Ordering::Acquire) != 0 {
            yield_now();
        }
        Ok(())
    }

    /// Forgets every store under way, for a forked child: it has only the thread that forked,
    /// which was in none. Only stores to atomics, so async-signal-safe.
    pub fn forget_all(&self) {
        for under_way in &self.0 {
            under_way.store(0, Ordering::Relaxed);
        }
    }
}
