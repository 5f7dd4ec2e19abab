//! Which slot the calling thread holds in an allocator, cached per thread so the fast paths find
//! it with one load and one compare.
//!
//! Every allocator handle gets an instance number that is never reused. With `std`, a small
//! direct-mapped table in a `thread_local!` maps instance numbers to slot offsets, in front of
//! it the entry found last (const initialisers and no destructor: an access is a plain load
//! from the thread's TLS block). Each entry carries a tag beside the slot: a word the allocator
//! keeps with it in process memory (the page allocator: the label its cache writes into blocks,
//! which must not come from the slot's shared memory).
//! It is only a cache: the thread-local allocator keeps the authoritative record in its thread
//! model's TLS, the page allocator in [`hold`]'s per-thread list, and both fill the cache on a
//! miss. Without `std` every lookup misses, and callers take their fallback path.
//!
//! In the child of a `fork`, the slots the forking thread held are its parent's: the fork
//! handler empties the cache ([`forget_after_fork`]), and [`hold`]'s entries of another fork
//! generation ([`crate::fork`]) are ignored and dropped without their release.

use crate::sync::atomic::{AtomicU64, Ordering};

/// Slot values at or below this are markers a caller may cache (0: none; 1: e.g. "this thread
/// has no slot"); [`get_last`] never returns them, so a fast path needs no second compare.
pub(crate) const MARKERS: u64 = 1;

/// A new instance number (never 0, never reused in this process). The handle that takes it
/// has called [`crate::fork::watch`]: its slots must not pass to a forked child.
pub(crate) fn new_instance() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(feature = "std")]
mod imp {
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};

    const WAYS: usize = 4;

    std::thread_local! {
        /// The entry found last: the common case of one allocator per thread in one compare.
        /// Each entry: instance, slot, tag.
        static LAST: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
        static CACHE: [Cell<(u64, u64, u64)>; WAYS] = const { [const { Cell::new((0, 0, 0)) }; WAYS] };
        static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
    }

    /// The calling thread's slot in allocator `instance`, or 0 if not cached.
    #[inline]
    pub(crate) fn get(instance: u64) -> u64 {
        get_tagged(instance).0
    }

    /// The calling thread's slot in allocator `instance` and its tag, or `(0, 0)` if not cached.
    #[inline]
    pub(crate) fn get_tagged(instance: u64) -> (u64, u64) {
        match LAST.try_with(Cell::get) {
            Ok((i, slot, tag)) if i == instance => (slot, tag),
            _ => get_way(instance),
        }
    }

    /// The calling thread's slot in allocator `instance` if it is the entry found last: for fast
    /// paths that leave every other case to their full path (no call, no spills). Never a
    /// marker (at most [`MARKERS`]): the last entry only ever holds real slots.
    #[inline]
    pub(crate) fn get_last(instance: u64) -> Option<u64> {
        match LAST.try_with(Cell::get) {
            Ok((i, slot, _)) if i == instance => Some(slot),
            _ => None,
        }
    }

    /// The last entry for `(instance, slot, tag)`: a marker slot is kept out of it.
    #[inline]
    fn last_entry(instance: u64, slot: u64, tag: u64) -> (u64, u64, u64) {
        if slot > super::MARKERS {
            (instance, slot, tag)
        } else {
            (0, 0, 0)
        }
    }

    /// [`get_tagged`] past the last entry: the direct-mapped ways, which then become the last
    /// entry.
    #[inline(never)]
    fn get_way(instance: u64) -> (u64, u64) {
        CACHE
            .try_with(|c| {
                let (i, slot, tag) = c[instance as usize % WAYS].get();
                if i != instance {
                    return (0, 0);
                }
                let _ = LAST.try_with(|l| l.set(last_entry(i, slot, tag)));
                (slot, tag)
            })
            .unwrap_or((0, 0))
    }

    /// Caches `slot` as the calling thread's slot in `instance` (with tag 0).
    pub(crate) fn set(instance: u64, slot: u64) {
        set_tagged(instance, slot, 0);
    }

    /// Caches `slot` with `tag` as the calling thread's slot in `instance`.
    fn set_tagged(instance: u64, slot: u64, tag: u64) {
        let _ = CACHE.try_with(|c| c[instance as usize % WAYS].set((instance, slot, tag)));
        let _ = LAST.try_with(|l| l.set(last_entry(instance, slot, tag)));
    }

    /// Forgets the calling thread's slot in `instance`.
    pub(crate) fn clear(instance: u64) {
        let _ = CACHE.try_with(|c| {
            let e = &c[instance as usize % WAYS];
            if e.get().0 == instance {
                e.set((0, 0, 0));
            }
        });
        let _ = LAST.try_with(|l| {
            if l.get().0 == instance {
                l.set((0, 0, 0));
            }
        });
    }

    /// Empties the calling thread's cache: in a forked child, whose forking thread's slots are
    /// its parent's. Only stores to plain TLS cells (it runs in the fork handler).
    #[cfg(unix)]
    pub(crate) fn forget_after_fork() {
        let _ = LAST.try_with(|l| l.set((0, 0, 0)));
        let _ = CACHE.try_with(|c| c.iter().for_each(|e| e.set((0, 0, 0))));
    }

    /// A slot the thread holds until it exits (or [`release`] is called).
    struct Held {
        instance: u64,
        slot: u64,
        tag: u64,
        /// The fork generation it was taken in: in a forked child, the slot is the parent's.
        generation: u64,
        release: Option<Box<dyn FnOnce()>>,
    }

    impl Held {
        fn current(&self) -> bool {
            self.generation == crate::fork::generation()
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            if !self.current() {
                // The parent's slot: neither cached here nor ours to give back.
                return;
            }
            clear(self.instance);
            if let Some(r) = self.release.take() {
                r();
            }
        }
    }

    /// Records that the calling thread holds `slot` (with `tag`) in `instance` until it exits,
    /// when `release` runs; caches the slot. Returns `false` (and drops `release` unrun) when the
    /// thread's TLS is already being torn down.
    pub(crate) fn hold(instance: u64, slot: u64, tag: u64, release: Box<dyn FnOnce()>) -> bool {
        let mut release = Some(release);
        let generation = crate::fork::generation();
        let mut stale = Vec::new();
        let held = HELD
            .try_with(|h| {
                let mut h = h.try_borrow_mut().ok()?;
                // Entries a fork left behind go (dropped below, outside the borrow).
                if h.iter().any(|x| !x.current()) {
                    let (keep, old): (Vec<Held>, Vec<Held>) = h.drain(..).partition(Held::current);
                    (*h, stale) = (keep, old);
                }
                h.push(Held { instance, slot, tag, generation, release: release.take() });
                Some(())
            })
            .ok()
            .flatten()
            .is_some();
        if held {
            set_tagged(instance, slot, tag);
        }
        held
    }

    /// The slot the calling thread holds in `instance` through [`hold`] and its tag, if any (and
    /// caches them).
    pub(crate) fn held(instance: u64) -> Option<(u64, u64)> {
        let (slot, tag) = HELD
            .try_with(|h| {
                let h = h.try_borrow().ok()?;
                h.iter().find(|x| x.instance == instance && x.current()).map(|x| (x.slot, x.tag))
            })
            .ok()
            .flatten()?;
        set_tagged(instance, slot, tag);
        Some((slot, tag))
    }

    /// Runs the release of the calling thread's slot in `instance` now; returns whether it held one.
    pub(crate) fn release(instance: u64) -> bool {
        let taken = HELD
            .try_with(|h| {
                let mut h = h.try_borrow_mut().ok()?;
                let i = h.iter().position(|x| x.instance == instance && x.current())?;
                Some(h.swap_remove(i))
            })
            .ok()
            .flatten();
        // Dropped outside the borrow: the release may use the allocator again.
        taken.is_some()
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    use alloc::boxed::Box;

    #[inline]
    pub(crate) fn get(_instance: u64) -> u64 {
        0
    }
    #[inline]
    pub(crate) fn get_tagged(_instance: u64) -> (u64, u64) {
        (0, 0)
    }
    #[inline]
    pub(crate) fn get_last(_instance: u64) -> Option<u64> {
        None
    }
    pub(crate) fn set(_instance: u64, _slot: u64) {}
    pub(crate) fn clear(_instance: u64) {}
    pub(crate) fn hold(_instance: u64, _slot: u64, _tag: u64, _release: Box<dyn FnOnce()>) -> bool {
        false
    }
    pub(crate) fn held(_instance: u64) -> Option<(u64, u64)> {
        None
    }
    pub(crate) fn release(_instance: u64) -> bool {
        false
    }
}

#[cfg(all(unix, feature = "std"))]
pub(crate) use imp::forget_after_fork;
pub(crate) use imp::{clear, get, get_last, get_tagged, held, hold, release, set};

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn the_last_entry_never_answers_a_marker() {
        let (a, b) = (new_instance(), new_instance());
        set(a, 4096);
        assert_eq!((get_last(a), get(a)), (Some(4096), 4096));
        // A marker is cached for `get`, but the fast path's lookup does not see it.
        set(a, MARKERS);
        assert_eq!((get_last(a), get(a)), (None, MARKERS));
        set(b, 8192);
        assert_eq!((get_last(b), get_last(a)), (Some(8192), None));
        // Finding `a` in its way does not promote the marker either.
        assert_eq!(get(a), MARKERS);
        assert_eq!(get_last(a), None);
        clear(b);
        assert_eq!((get_last(b), get(b)), (None, 0));
    }
}
