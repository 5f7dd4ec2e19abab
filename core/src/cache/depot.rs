//! The depot: a bounded, process-wide store of whole batches of free blocks between the thread
//! caches and their upstream.
//!
//! A thread whose bucket is over its limit moves a batch here instead of freeing it, and a thread
//! whose bucket is empty takes a batch before asking the upstream. So memory freed on one thread
//! (a consumer) is reused by another (a producer) without a trip through the upstream, and a
//! thread that exits leaves its blocks for the next one. One lock per class, taken once per batch
//! (`batch_len` blocks, about 32 KiB). Over the depot's byte limit, memory goes upstream.
//!
//! A batch is a null-terminated chain of blocks linked through their first word; the second word
//! of a batch's first block links the batches of a class.

use core::ptr::{self, NonNull};

use crate::cache::size_class::{batch_len, class_size, BLOCK_ALIGN, MAX_BUCKETS};
use crate::cache::stats::{CacheStats, Counters};
use crate::cache::upstream::Upstream;
use crate::error::{Error, Result};
use crate::sync::{BindOnce, SpinLock};
use core::sync::atomic::{AtomicUsize, Ordering};

/// The limit of a depot whose limit is not set yet (the thread caches' depots start with it,
/// and the first thread cache to start gives each its default, see
/// [`set_default_limit`](Depot::set_default_limit)).
pub(crate) const UNSET: usize = usize::MAX;

/// A bounded store of free-block batches shared by the thread caches of one upstream.
///
/// The first [`ThreadCache::with_depot`](super::ThreadCache::with_depot) binds it to its
/// upstream: caches over another upstream are refused, and so is [`Depot::release`] to one.
///
/// In a forked child, the depot starts afresh at its first use: the batches stored before the
/// fork are dropped, unfreed (over shared memory they are the parent's too, which may hand them
/// out), and the locks that threads of the parent held at the fork are released, so that the
/// child does not wait for ever on them.
pub struct Depot {
    classes: [SpinLock<ClassBatches>; MAX_BUCKETS],
    bytes: AtomicUsize,
    limit: AtomicUsize,
    counters: Counters,
    /// The upstream the blocks come from, once bound. A cache made by hand binds the depot; the
    /// thread-local caches' depots are bound by their slot instead, and never to another.
    bound: BindOnce<Upstream>,
    /// The fork generation the batches and locks belong to.
    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    epoch: crate::fork::Epoch,
}

struct ClassBatches {
    head: *mut u8,
    batches: usize,
}

// SAFETY: the chains are blocks the depot owns; nothing else refers to them while they are here.
unsafe impl Send for ClassBatches {}

/// Reads word `i` of a free block.
///
/// # Safety
/// `block` is a free block of at least 16 bytes, aligned to 8, owned by the caller.
#[inline(always)]
pub(crate) unsafe fn link(block: *mut u8, i: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe { block.cast::<*mut u8>().add(i).read() }
}

/// Writes word `i` of a free block.
///
/// # Safety
/// As for [`link`].
#[inline(always)]
pub(crate) unsafe fn set_link(block: *mut u8, i: usize, value: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { block.cast::<*mut u8>().add(i).write(value) }
}

impl Depot {
    /// An empty depot that holds at most `limit` bytes.
    pub const fn new(limit: usize) -> Self {
        Depot {
            classes: [const { SpinLock::new(ClassBatches { head: ptr::null_mut(), batches: 0 }) }; MAX_BUCKETS],
            bytes: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            counters: Counters::new(),
            bound: BindOnce::new(Upstream::System),
            #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
            epoch: crate::fork::Epoch::new(),
        }
    }

    /// Starts the depot afresh if this is its first use since a fork (see [`Depot`]); called
    /// before any of its locks is taken.
    #[inline(always)]
    fn enter(&self) {
        #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
        self.epoch.enter(|| {
            // SAFETY: `Epoch::enter` runs this only in the depot's first entry, or its first
            // since a fork, before which no thread of this process took one of the depot's
            // locks (a reset that a thread of the parent had begun is the parent's).
            unsafe { self.start_afresh() }
        });
    }

    /// Drops every batch, unfreed, and releases every lock: the state of a depot in a forked
    /// child before its first use.
    ///
    /// # Safety
    /// No thread of this process holds one of the depot's locks or is binding it: those held
    /// belong to threads of the parent, which do not run here.
    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    unsafe fn start_afresh(&self) {
        for lock in &self.classes {
            // SAFETY: the caller's contract: no guard of this lock is live in this process.
            unsafe { lock.force_unlock() };
            let mut list = lock.lock();
            (list.head, list.batches) = (ptr::null_mut(), 0);
        }
        self.bytes.store(0, Ordering::Relaxed);
        // A thread of the parent that was binding left `bound` half written: as no cache
        // finished binding to it, the depot is unbound.
        // SAFETY: the caller's contract: no thread of this process is binding.
        unsafe { self.bound.forget_binding() };
    }

    /// The upstream the depot is bound to, if any.
    fn bound(&self) -> Option<Upstream> {
        self.bound.get()
    }

    /// Binds the depot to `upstream` if it is not bound yet; `false` if it serves another.
    pub(crate) fn bind(&self, upstream: Upstream) -> bool {
        self.enter();
        self.bound.bind(upstream)
    }

    /// Takes every class lock (before a `fork`; see `tls::fork`).
    #[cfg(unix)]
    pub(crate) fn lock_all(&self) {
        self.enter();
        self.classes.iter().for_each(SpinLock::lock_and_keep);
    }

    /// Releases the locks [`lock_all`](Self::lock_all) took.
    ///
    /// # Safety
    /// `lock_all` took them, and no guard of them is live.
    #[cfg(unix)]
    pub(crate) unsafe fn unlock_all(&self) {
        for lock in self.classes.iter().rev() {
            // SAFETY: the caller's contract.
            unsafe { lock.force_unlock() };
        }
    }

    /// Drops every batch without freeing it (in a forked child, for a depot over a resource
    /// whose blocks the parent may hand out too).
    ///
    /// # Safety
    /// As for [`unlock_all`](Self::unlock_all): the caller took the locks with `lock_all`.
    #[cfg(unix)]
    pub(crate) unsafe fn forget_all_locked(&self) {
        for lock in &self.classes {
            // SAFETY: the caller holds every class lock.
            let list = unsafe { lock.kept_value() };
            list.head = ptr::null_mut();
            list.batches = 0;
        }
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Keeps the depot's batches in this forked child, where its first use would otherwise drop
    /// them (see [`Depot`]): the fork handlers, which held every lock through the fork, have made
    /// them the child's (over the system allocator they are the child's own copy).
    ///
    /// # Safety
    /// As for [`forget_all_locked`](Self::forget_all_locked): the caller holds every class lock,
    /// taken with `lock_all` before the fork.
    #[cfg(unix)]
    pub(crate) unsafe fn adopt_locked(&self) {
        #[cfg(all(feature = "std", not(loom), target_has_atomic = "64"))]
        self.epoch.adopt();
    }

    /// Changes the byte limit. Memory already held stays until taken or released. (A limit of
    /// `usize::MAX` is kept as `usize::MAX - 1`: the largest value marks a limit not set yet.)
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit.min(UNSET - 1), Ordering::Relaxed);
    }

    /// Sets `limit` unless a limit was set since the depot was made with [`UNSET`]: a default
    /// that must not replace a limit its user set first, even one set at the same time.
    pub(crate) fn set_default_limit(&self, limit: usize) {
        let _ = self.limit.compare_exchange(UNSET, limit.min(UNSET - 1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The byte limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Hits (batches handed out), misses (requests that found none), bytes held and bytes
    /// released upstream.
    pub fn stats(&self) -> CacheStats {
        self.counters.snapshot(self.bytes.load(Ordering::Relaxed) as u64)
    }

    /// The batches of `class`, locked. In a forked child, the depot first starts afresh (see
    /// [`Depot`]).
    fn list(&self, class: usize) -> crate::sync::SpinLockGuard<'_, ClassBatches> {
        self.enter();
        self.classes[class].lock()
    }

    /// Takes a batch of `batch_len(class)` blocks if the limit allows.
    ///
    /// # Safety
    /// `head` starts a null-terminated chain of exactly `batch_len(class)` free blocks of
    /// `class`, all from the upstream this depot serves, which the caller gives up.
    pub(crate) unsafe fn try_push(&self, class: usize, head: NonNull<u8>) -> bool {
        let bytes = batch_len(class) * class_size(class);
        let limit = self.limit.load(Ordering::Relaxed);
        // The count moves under the class's lock, with the list: a fork, which the handlers make
        // while holding every class lock, then finds the two agreeing.
        let mut list = self.list(class);
        let reserved = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| held.checked_add(bytes).filter(|&b| b <= limit));
        if reserved.is_err() {
            return false;
        }
        // SAFETY: `head` is a free block the caller hands over (contract).
        unsafe { set_link(head.as_ptr(), 1, list.head) };
        list.head = head.as_ptr();
        list.batches += 1;
        true
    }

    /// Hands out a batch of `batch_len(class)` blocks (a null-terminated chain), if it has one.
    pub(crate) fn try_pop(&self, class: usize) -> Option<NonNull<u8>> {
        let head = {
            let mut list = self.list(class);
            let head = NonNull::new(list.head);
            if let Some(h) = head {
                // SAFETY: `h` heads a batch the depot owns; its second word links the next batch.
                list.head = unsafe { link(h.as_ptr(), 1) };
                list.batches -= 1;
                // Under the lock, with the list (see `try_push`).
                self.bytes.fetch_sub(batch_len(class) * class_size(class), Ordering::Relaxed);
            }
            head
        };
        match head {
            Some(h) => {
                self.counters.hits.add_shared(1);
                Some(h)
            }
            None => {
                self.counters.misses.add_shared(1);
                None
            }
        }
    }

    /// Frees every held block to `upstream`, the one the blocks came from; refused with
    /// [`Error::Unsupported`] (nothing freed) if the depot is bound to another.
    pub fn release(&self, upstream: &Upstream) -> Result<()> {
        self.enter();
        if self.bound().is_some_and(|bound| bound != *upstream) {
            return Err(Error::Unsupported("a depot's blocks go back to the upstream they came from"));
        }
        for class in 0..MAX_BUCKETS {
            let size = class_size(class);
            let mut batch = {
                let mut list = self.list(class);
                let head = list.head;
                // Under the lock, with the list (see `try_push`).
                self.bytes.fetch_sub(list.batches * batch_len(class) * size, Ordering::Relaxed);
                list.head = ptr::null_mut();
                list.batches = 0;
                head
            };
            while !batch.is_null() {
                // SAFETY: the batches were detached under the lock and are now ours alone.
                let next_batch = unsafe { link(batch, 1) };
                let mut block = batch;
                while !block.is_null() {
                    // SAFETY: as above; read the link before the block goes away.
                    let next = unsafe { link(block, 0) };
                    // SAFETY: every block came from `upstream` as a whole block of this class.
                    unsafe { upstream.deallocate(NonNull::new_unchecked(block), size, BLOCK_ALIGN) };
                    self.counters.bytes_returned.add_shared(size as u64);
                    block = next;
                }
                batch = next_batch;
            }
        }
        Ok(())
    }

    /// Walks every class and checks that each batch has `batch_len` blocks and that the byte
    /// count matches what is held.
    pub fn check(&self) -> Result<()> {
        // Every class at once (in class order, as `lock_all`; nothing holds one class lock while
        // it takes another): the byte count moves with the lists, so it agrees with their sum
        // only while none of them can change.
        let lists: [_; MAX_BUCKETS] = core::array::from_fn(|class| self.list(class));
        let mut total = 0;
        for (class, list) in lists.iter().enumerate() {
            let mut batch = list.head;
            let mut batches = 0;
            while !batch.is_null() {
                let mut n = 0;
                let mut block = batch;
                while !block.is_null() && n <= batch_len(class) {
                    // SAFETY: the lock is held; the chain is the depot's.
                    block = unsafe { link(block, 0) };
                    n += 1;
                }
                if n != batch_len(class) || !block.is_null() {
                    return Err(corrupt(class, "a batch does not have batch_len blocks"));
                }
                batches += 1;
                if batches > list.batches {
                    return Err(corrupt(class, "more batches than counted"));
                }
                // SAFETY: as above.
                batch = unsafe { link(batch, 1) };
            }
            if batches != list.batches {
                return Err(corrupt(class, "fewer batches than counted"));
            }
            total += batches * batch_len(class) * class_size(class);
        }
        if total != self.bytes.load(Ordering::Relaxed) {
            return Err(corrupt(0, "byte count does not match the batches held"));
        }
        Ok(())
    }
}

fn corrupt(class: usize, detail: &'static str) -> Error {
    Error::Corrupt { structure: "cache depot", offset: class as u64, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of `batch_len(class)` fresh blocks of `class` from `res`.
    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    fn batch(res: &crate::testing::CountingResource, class: usize) -> NonNull<u8> {
        use crate::MemoryResource;
        let mut head = ptr::null_mut();
        for _ in 0..batch_len(class) {
            let b = res.allocate(class_size(class), BLOCK_ALIGN).unwrap().as_ptr();
            // SAFETY: a fresh block of at least 16 bytes, aligned to 16.
            unsafe { set_link(b, 0, head) };
            head = b;
        }
        NonNull::new(head).unwrap()
    }

    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    #[test]
    fn a_forked_child_is_not_held_up_by_a_lock_a_thread_of_its_parent_held() {
        use crate::testing::{held_by_another_thread, in_a_forked_child, CountingResource};
        crate::fork::watch().unwrap();
        let res = CountingResource::leak();
        let up = Upstream::Resource(res);
        let depot: &'static Depot = Box::leak(Box::new(Depot::new(1 << 20)));
        assert!(depot.bind(up));
        let class = 3;
        // SAFETY: a batch of `class` from the upstream the depot is bound to.
        assert!(unsafe { depot.try_push(class, batch(res, class)) });
        let held = held_by_another_thread(move || depot.classes[class].lock());
        let child = in_a_forked_child(|| {
            // The parent's batch is dropped, unfreed, and the lock its thread held released.
            let dropped = depot.try_pop(class).is_none() && depot.stats().bytes_cached == 0;
            // SAFETY: as above.
            let pushed = unsafe { depot.try_push(class, batch(res, class)) };
            let served = depot.try_pop(class).is_some();
            dropped && pushed && served && depot.check().is_ok()
        });
        drop(held);
        assert!(child, "the forked child hung on the depot's lock, or found the parent's batch");
        // The parent's depot is as it was.
        depot.check().unwrap();
        assert_eq!(depot.stats().bytes_cached, (batch_len(class) * class_size(class)) as u64);
        depot.release(&up).unwrap();
        assert_eq!(res.live_blocks(), 0);
    }

    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    #[test]
    fn a_forked_child_binds_a_depot_a_thread_of_its_parent_was_binding() {
        use crate::testing::{in_a_forked_child, CountingResource};
        crate::fork::watch().unwrap();
        let res = CountingResource::leak();
        let depot: &'static Depot = Box::leak(Box::new(Depot::new(1 << 20)));
        // As a thread of the parent leaves it between its compare-exchange and its store.
        depot.bound.stop_mid_binding();
        let child = in_a_forked_child(|| depot.bind(Upstream::Resource(res)) && depot.bound().is_some());
        assert!(child, "the forked child waited for a binding no thread of it was making");
        assert!(depot.bound().is_none(), "the parent's depot is as it was");
    }

    #[test]
    fn a_default_limit_never_replaces_one_set_before() {
        let d = Depot::new(UNSET);
        d.set_limit(4096);
        d.set_default_limit(1 << 20);
        assert_eq!(d.limit(), 4096);
        let d = Depot::new(UNSET);
        d.set_default_limit(1 << 20);
        assert_eq!(d.limit(), 1 << 20);
        d.set_default_limit(8);
        assert_eq!(d.limit(), 1 << 20, "a default is set once");
        d.set_limit(usize::MAX);
        assert_eq!(d.limit(), usize::MAX - 1, "the largest value stays the mark of no limit set");
        d.set_default_limit(8);
        assert_eq!(d.limit(), usize::MAX - 1);
    }

    /// `check` beside caches that move batches in and out of several classes: each class it has
    /// counted may change before it reads the byte count, which must still be found to agree.
    #[test]
    fn check_beside_busy_caches_finds_nothing_wrong() {
        use crate::cache::{CacheConfig, ThreadCache};
        use crate::testing::CountingResource;
        use core::alloc::Layout;
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let res = CountingResource::leak();
        let up = Upstream::Resource(res);
        let depot: &'static Depot = Box::leak(Box::new(Depot::new(1 << 20)));
        let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        let rounds: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        // Batches of 64 blocks in classes 2 and 3: a bucket limit that holds a batch of either.
        let config = CacheConfig::uniform(13, 64 * 128).unwrap();
        let workers: Vec<_> = [2usize, 3]
            .into_iter()
            .map(|class| {
                let mut cache = ThreadCache::with_depot(&config, up, depot).unwrap();
                std::thread::spawn(move || {
                    let layout = Layout::from_size_align(class_size(class), 8).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let blocks: Vec<_> = (0..200).map(|_| cache.allocate(layout).unwrap()).collect();
                        for b in blocks {
                            // SAFETY: from `allocate(layout)` on this cache.
                            unsafe { cache.deallocate(b, layout) };
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // Checks until the workers have been through many rounds meanwhile.
        let mut failed = None;
        while failed.is_none() && rounds.load(Ordering::Relaxed) < 400 {
            failed = depot.check().err();
        }
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().for_each(|w| w.join().unwrap());
        assert_eq!(failed, None, "a sound depot was reported corrupt");
        depot.check().unwrap();
        depot.release(&up).unwrap();
        assert_eq!(res.live_blocks(), 0);
    }
}
