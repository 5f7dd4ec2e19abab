//! [`PoolAllocator<T>`]: a private cache of blocks for one layout.

use core::alloc::Layout;
use core::fmt;
use core::marker::PhantomData;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use crate::cache::depot::{link, set_link};
use crate::cache::stats::{CacheStats, Counters};
use crate::cache::upstream::Upstream;
use crate::error::{Error, Result};
use crate::sync::SpinLock;

/// A private cache of blocks that fit one `T`, holding at most `limit` of them.
///
/// Unlike the thread caches, nothing else draws on it: once a block is cached, the next
/// allocation gets it (the last freed first), so code that knows its own pattern (a queue's
/// nodes, a channel's slots) can bound how often it reaches the upstream; [`Self::reserve`]
/// fills it ahead of time. Frees beyond the limit go upstream.
///
/// In a forked child, the blocks it cached before the fork are dropped, unfreed: over shared
/// memory they are the parent's as well, and the parent may hand them out.
///
/// It is usable on its own ([`Self::allocate`], [`Self::deallocate`]) and as an
/// `allocator_api2` [`Allocator`] (by reference) for node-based containers: requests that fit a
/// `T` use the pool, any other size passes through to the upstream.
///
/// ```
/// use allocator_api2::boxed::Box;
/// use hetmem_core::cache::PoolAllocator;
///
/// let pool = PoolAllocator::<[u64; 4]>::new(16);
/// let a = Box::new_in([1, 2, 3, 4], &pool);
/// drop(a);
/// let b = Box::new_in([5, 6, 7, 8], &pool); // reuses a's block
/// assert_eq!(pool.stats().hits, 1);
/// # drop(b);
/// ```
pub struct PoolAllocator<T> {
    free: SpinLock<FreeList>,
    upstream: Upstream,
    counters: Counters,
    /// The fork generation the list and its lock belong to.
    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    epoch: crate::fork::Epoch,
    _marker: PhantomData<fn() -> T>,
}

struct FreeList {
    head: *mut u8,
    len: usize,
    limit: usize,
}

// SAFETY: the list holds blocks the pool owns exclusively.
unsafe impl Send for FreeList {}

impl<T> PoolAllocator<T> {
    /// The layout of every pooled block: `T`'s, widened to hold a link.
    pub const BLOCK: Layout = {
        let size = if size_of::<T>() > size_of::<*mut u8>() { size_of::<T>() } else { size_of::<*mut u8>() };
        let align = if align_of::<T>() > align_of::<*mut u8>() { align_of::<T>() } else { align_of::<*mut u8>() };
        // `size_of::<T>()` is already a multiple of `align_of::<T>()`; only the widening to a
        // pointer can need padding.
        let padded = (size + align - 1) & !(align - 1);
        match Layout::from_size_align(padded, align) {
            Ok(l) => l,
            Err(_) => panic!("T's layout cannot be pooled"),
        }
    };

    /// A pool over the global allocator that caches up to `limit` blocks.
    pub const fn new(limit: usize) -> Self {
        Self::with_upstream(limit, Upstream::Global)
    }

    /// A pool over `upstream` that caches up to `limit` blocks. The upstream must be
    /// host-accessible (the pool writes links into free blocks); see [`Self::allocate`].
    pub const fn with_upstream(limit: usize, upstream: Upstream) -> Self {
        PoolAllocator {
            free: SpinLock::new(FreeList { head: ptr::null_mut(), len: 0, limit }),
            upstream,
            counters: Counters::new(),
            #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
            epoch: crate::fork::Epoch::new(),
            _marker: PhantomData,
        }
    }

    /// Memory for one `T` (uninitialised): a cached block if there is one, else a new one.
    /// An upstream the CPU cannot write is refused with [`Error::Unsupported`].
    pub fn allocate(&self) -> Result<NonNull<T>> {
        if let Some(p) = self.pop() {
            return Ok(p.cast());
        }
        self.counters.misses.add_shared(1);
        self.allocate_upstream().map(NonNull::cast)
    }

    fn pop(&self) -> Option<NonNull<u8>> {
        let mut free = self.list();
        let head = NonNull::new(free.head)?;
        // SAFETY: a block on our list; its first word links the next.
        free.head = unsafe { link(head.as_ptr(), 0) };
        free.len -= 1;
        drop(free);
        self.counters.hits.add_shared(1);
        Some(head)
    }

    fn allocate_upstream(&self) -> Result<NonNull<u8>> {
        if !self.upstream.host_accessible() {
            return Err(Error::Unsupported("a pool needs an upstream whose memory the CPU can write"));
        }
        // Forks are counted before the first block can be cached (see `list`). Where they cannot
        // be (no `pthread_atfork`), the docs of `crate::fork` say what not to do.
        let _ = crate::fork::watch();
        self.counters.upstream_allocations.add_shared(1);
        self.upstream
            .allocate(Self::BLOCK.size(), Self::BLOCK.align())
            .ok_or(Error::OutOfMemory { requested: Self::BLOCK.size() as u64, available: 0 })
    }

    /// Takes back a block: cached if under the limit, else freed upstream.
    ///
    /// # Safety
    /// `ptr` came from [`Self::allocate`] on this pool, any `T` in it is dead, and it is not used
    /// again.
    pub unsafe fn deallocate(&self, ptr: NonNull<T>) {
        let block = ptr.cast::<u8>();
        {
            let mut free = self.list();
            if free.len < free.limit {
                // SAFETY: the block is ours now and holds at least a pointer.
                unsafe { set_link(block.as_ptr(), 0, free.head) };
                free.head = block.as_ptr();
                free.len += 1;
                return;
            }
        }
        // SAFETY: the caller's contract: a block of ours, given up.
        unsafe { self.free_upstream(block) }
    }

    /// Frees a pool block to the upstream and counts it.
    ///
    /// # Safety
    /// `block` came from the upstream with `BLOCK` and is not used again.
    unsafe fn free_upstream(&self, block: NonNull<u8>) {
        self.counters.bytes_returned.add_shared(Self::BLOCK.size() as u64);
        // SAFETY: the caller's contract.
        unsafe { self.upstream.deallocate(block, Self::BLOCK.size(), Self::BLOCK.align()) }
    }

    /// Fills the cache with new blocks until it holds `min(n, limit)`, so that many allocations
    /// are served without the upstream. The limit is the one at each step: a limit lowered
    /// meanwhile (by another thread) ends the filling there.
    pub fn reserve(&self, n: usize) -> Result<()> {
        let short = |free: &FreeList| free.len < n.min(free.limit);
        while short(&self.list()) {
            let block = self.allocate_upstream()?;
            let mut free = self.list();
            if !short(&free) {
                // Filled, or the limit lowered, while the block was being taken: it is not needed.
                drop(free);
                // SAFETY: a fresh block from the upstream with `BLOCK`, never handed out.
                unsafe { self.free_upstream(block) };
                break;
            }
            // SAFETY: a fresh block from the upstream with `BLOCK`, never handed out; it holds at
            // least a pointer.
            unsafe { set_link(block.as_ptr(), 0, free.head) };
            free.head = block.as_ptr();
            free.len += 1;
        }
        Ok(())
    }

    /// Changes the limit; cached blocks over it go upstream now.
    pub fn set_limit(&self, limit: usize) {
        self.trim(Some(limit), limit);
    }

    /// Frees every cached block to the upstream.
    pub fn release(&self) {
        self.trim(None, 0);
    }

    /// Frees the cached blocks past the first `keep` to the upstream, with the limit set to
    /// `limit` first if given: under one lock, so that no one sees more blocks than the limit.
    fn trim(&self, limit: Option<usize>, keep: usize) {
        let mut chain = {
            let mut free = self.list();
            if let Some(limit) = limit {
                free.limit = limit;
            }
            let mut chain = ptr::null_mut();
            while free.len > keep {
                let block = free.head;
                // SAFETY: len > 0, so the list is not empty.
                free.head = unsafe { link(block, 0) };
                // SAFETY: the block moves to our private chain.
                unsafe { set_link(block, 0, chain) };
                chain = block;
                free.len -= 1;
            }
            chain
        };
        while let Some(block) = NonNull::new(chain) {
            // SAFETY: detached under the lock; read the link before the block goes.
            chain = unsafe { link(block.as_ptr(), 0) };
            // SAFETY: a block from this upstream with `BLOCK`, detached and ours.
            unsafe { self.free_upstream(block) };
        }
    }

    /// Blocks cached now.
    pub fn cached(&self) -> usize {
        self.list().len
    }

    /// The most blocks it caches.
    pub fn limit(&self) -> usize {
        self.list().limit
    }

    /// Hits, misses, bytes cached, bytes returned upstream and upstream allocations.
    pub fn stats(&self) -> CacheStats {
        let bytes = (self.cached() * Self::BLOCK.size()) as u64;
        self.counters.snapshot(bytes)
    }

    /// Walks the free list: as long as counted, within the limit, aligned, no cycle.
    pub fn check(&self) -> Result<()> {
        let free = self.list();
        let corrupt = |detail| Error::Corrupt { structure: "pool allocator", offset: 0, detail };
        if free.len > free.limit {
            return Err(corrupt("more blocks cached than the limit"));
        }
        let mut n = 0;
        let mut block = free.head;
        while !block.is_null() {
            if n == free.len {
                return Err(corrupt("list longer than counted (or a cycle)"));
            }
            if block as usize % Self::BLOCK.align() != 0 {
                return Err(corrupt("misaligned block on the free list"));
            }
            // SAFETY: a block on our list, visited at most `len` times.
            block = unsafe { link(block, 0) };
            n += 1;
        }
        if n != free.len {
            return Err(corrupt("list shorter than counted"));
        }
        Ok(())
    }

    /// The free list, locked. In a forked child, the blocks cached before the fork are first
    /// dropped, unfreed: over shared memory they are the parent's too (it may hand them out), and
    /// over private memory they are copies the child can do without. The lock is released too,
    /// should a thread of the parent have held it at the fork: that thread does not run here.
    fn list(&self) -> crate::sync::SpinLockGuard<'_, FreeList> {
        #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
        self.epoch.enter(|| {
            // SAFETY: `Epoch::enter` runs this only in the pool's first entry, or its first since
            // a fork, before which no thread of this process took the lock (every taker comes
            // through here first; a reset that a thread of the parent had begun is the parent's).
            unsafe { self.free.force_unlock() };
            let mut free = self.free.lock();
            (free.head, free.len) = (ptr::null_mut(), 0);
        });
        self.free.lock()
    }

    /// Whether an `Allocator` request of `layout` is served by the pool.
    fn pooled(layout: Layout) -> bool {
        layout.size() != 0 && layout.size() <= Self::BLOCK.size() && layout.align() <= Self::BLOCK.align()
    }
}

impl<T> Drop for PoolAllocator<T> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<T> fmt::Debug for PoolAllocator<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolAllocator")
            .field("block", &Self::BLOCK)
            .field("cached", &self.cached())
            .field("limit", &self.limit())
            .field("upstream", &self.upstream)
            .finish()
    }
}

// SAFETY: pooled requests get a whole `BLOCK` (at least their size and alignment) used by no
// one else until freed; other requests pass through with their own layout, and `deallocate`
// makes the same choice from the layout, so each block goes back where it came from.
unsafe impl<T> Allocator for PoolAllocator<T> {
    fn allocate(&self, layout: Layout) -> core::result::Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            // SAFETY: an alignment is never zero.
            let p = unsafe { NonNull::new_unchecked(layout.align() as *mut u8) };
            return Ok(NonNull::slice_from_raw_parts(p, 0));
        }
        let p = if Self::pooled(layout) {
            PoolAllocator::allocate(self).map_err(|_| AllocError)?.cast()
        } else {
            self.counters.misses.add_shared(1);
            if !self.upstream.host_accessible() {
                return Err(AllocError);
            }
            self.counters.upstream_allocations.add_shared(1);
            self.upstream.allocate(layout.size(), layout.align()).ok_or(AllocError)?
        };
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        if Self::pooled(layout) {
            // SAFETY: the same choice as `allocate` made: a pool block, given back.
            unsafe { PoolAllocator::deallocate(self, ptr.cast()) }
        } else {
            self.counters.bytes_returned.add_shared(layout.size() as u64);
            // SAFETY: passed through with exactly this layout.
            unsafe { self.upstream.deallocate(ptr, layout.size(), layout.align()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CountingResource;
    use proptest::prelude::*;

    /// The first thread to use a pool, in a process that does not count forks yet, holds its
    /// lock when another thread forks: the child must still count as a new generation, or it
    /// waits for ever on that lock. (Forks used to be counted from the pool's first request
    /// upstream, after its first lock.) Runs in a process of its own, where no other test has
    /// counted forks before.
    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    #[test]
    fn a_child_forked_while_the_first_user_of_a_pool_holds_its_lock_is_not_held_up() {
        const NAME: &str =
            "cache::pool::tests::a_child_forked_while_the_first_user_of_a_pool_holds_its_lock_is_not_held_up";
        const ALONE: &str = "HETMEM_TEST_ALONE_IN_ITS_PROCESS";
        if std::env::var_os(ALONE).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
                .env(ALONE, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        use crate::testing::{held_by_another_thread, in_a_forked_child};
        assert!(!crate::fork::watched(), "forks were counted before the pool's first use: the test proves nothing");
        let res = CountingResource::leak();
        let pool: &'static PoolAllocator<[u64; 8]> =
            Box::leak(Box::new(PoolAllocator::with_upstream(8, Upstream::Resource(res))));
        // Inside the pool's first request, as `pop` is, between taking the lock and leaving it.
        let held = held_by_another_thread(|| pool.list());
        let child = in_a_forked_child(|| {
            let Ok(b) = pool.allocate() else { return false };
            // SAFETY: allocated from this pool, not used since.
            unsafe { pool.deallocate(b) };
            pool.check().is_ok()
        });
        drop(held);
        assert!(child, "the forked child hung on the lock the first user of the pool held in its parent");
        pool.release();
        assert_eq!(res.live_blocks(), 0);
    }

    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    #[test]
    fn a_forked_child_is_not_held_up_by_a_lock_a_thread_of_its_parent_held() {
        use crate::testing::{held_by_another_thread, in_a_forked_child};
        let res = CountingResource::leak();
        let pool: &'static PoolAllocator<[u64; 8]> =
            Box::leak(Box::new(PoolAllocator::with_upstream(8, Upstream::Resource(res))));
        let b = pool.allocate().unwrap();
        // SAFETY: allocated from this pool, not used since.
        unsafe { pool.deallocate(b) };
        assert_eq!(pool.cached(), 1);
        let held = held_by_another_thread(|| pool.free.lock());
        let child = in_a_forked_child(|| {
            // The parent's cached block is dropped, unfreed, and the lock its thread held
            // released: the child's first block is a new one.
            let dropped = pool.cached() == 0;
            let Ok(c) = pool.allocate() else { return false };
            // SAFETY: as above.
            unsafe { pool.deallocate(c) };
            dropped && c != b && pool.cached() == 1 && pool.check().is_ok()
        });
        drop(held);
        assert!(child, "the forked child hung on the pool's lock, or was handed the parent's block");
        assert_eq!(pool.cached(), 1, "the parent's pool is as it was");
        pool.release();
        assert_eq!(res.live_blocks(), 0);
    }

    #[test]
    fn cached_blocks_are_reused_first_and_the_limit_holds() {
        let res = CountingResource::leak();
        let pool = PoolAllocator::<[u64; 3]>::with_upstream(2, Upstream::Resource(res));
        assert_eq!(PoolAllocator::<[u64; 3]>::BLOCK.size(), 24);
        let blocks: Vec<_> = (0..4).map(|_| pool.allocate().unwrap()).collect();
        for &b in &blocks {
            // SAFETY: from `allocate`, no `T` written.
            unsafe { pool.deallocate(b) };
        }
        assert_eq!(pool.cached(), 2);
        assert_eq!(res.live_blocks(), 2, "frees over the limit went upstream");
        assert_eq!(pool.allocate().unwrap(), blocks[1]);
        assert_eq!(pool.allocate().unwrap(), blocks[0]);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses, s.upstream_allocations), (2, 4, 4));
        assert_eq!(s.bytes_returned, 2 * 24);
        pool.check().unwrap();
    }

    #[test]
    fn reserve_guarantees_reuse_and_release_empties() {
        let res = CountingResource::leak();
        let pool = PoolAllocator::<u8>::with_upstream(100, Upstream::Resource(res));
        pool.reserve(10).unwrap();
        assert_eq!(pool.cached(), 10);
        let n = res.allocations();
        let got: Vec<_> = (0..10).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(res.allocations(), n, "reserved blocks need no upstream");
        for b in got {
            // SAFETY: from `allocate`.
            unsafe { pool.deallocate(b) };
        }
        pool.reserve(1000).unwrap();
        assert_eq!(pool.cached(), 100, "reserve stops at the limit");
        pool.set_limit(5);
        assert_eq!((pool.cached(), res.live_blocks()), (5, 5));
        pool.release();
        assert_eq!(res.live_blocks(), 0);
        assert_eq!(pool.stats().bytes_cached, 0);
    }

    /// An upstream that lowers its pool's limit to one block while `reserve` fills the pool, as
    /// another thread's `set_limit` would, and refuses after 1000 blocks.
    struct Lowering {
        blocks: CountingResource,
        pool: std::sync::OnceLock<&'static PoolAllocator<u64>>,
    }

    // SAFETY: forwards every block to and from `blocks`, which keeps the promises.
    unsafe impl crate::MemoryResource for Lowering {
        fn name(&self) -> &str {
            "lowering"
        }
        fn kind(&self) -> crate::MemoryKind {
            crate::MemoryKind::Host
        }
        fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
            match self.blocks.allocations() {
                2 => self.pool.get().unwrap().set_limit(1),
                1000.. => return Err(Error::OutOfMemory { requested: size as u64, available: 0 }),
                _ => {}
            }
            self.blocks.allocate(size, align)
        }
        unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.blocks.deallocate(ptr, size, align) }
        }
    }

    /// `reserve` fills up to the limit as it is while it runs: a limit lowered meanwhile ends it
    /// (it used to aim at the old limit for ever, each new block over the new one freed at once).
    #[test]
    fn reserve_stops_at_a_limit_lowered_meanwhile() {
        let up: &'static Lowering =
            Box::leak(Box::new(Lowering { blocks: CountingResource::new(), pool: std::sync::OnceLock::new() }));
        let pool: &'static PoolAllocator<u64> =
            Box::leak(Box::new(PoolAllocator::with_upstream(8, Upstream::Resource(up))));
        up.pool.set(pool).ok().unwrap();
        pool.reserve(8).unwrap();
        assert_eq!((pool.limit(), pool.cached()), (1, 1));
        assert!(up.blocks.allocations() <= 4, "{} blocks taken for a limit of 1", up.blocks.allocations());
        pool.check().unwrap();
        pool.release();
        assert_eq!(up.blocks.live_blocks(), 0);
    }

    /// `check` beside another thread lowering and raising the limit: the limit and the blocks
    /// trimmed to it change together, so the pool is never seen holding more than its limit.
    #[test]
    fn check_beside_limit_changes_finds_nothing_wrong() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let res = CountingResource::leak();
        let pool: &'static PoolAllocator<[u64; 4]> =
            Box::leak(Box::new(PoolAllocator::with_upstream(8, Upstream::Resource(res))));
        let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        let rounds: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let changer = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                pool.set_limit(8);
                pool.reserve(8).unwrap();
                pool.set_limit(2);
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Until a few seconds of rounds have passed (the window is narrow).
        let start = std::time::Instant::now();
        let mut failed = None;
        while failed.is_none() && rounds.load(Ordering::Relaxed) < 200_000 && start.elapsed().as_secs() < 3 {
            failed = pool.check().err();
        }
        stop.store(true, Ordering::Relaxed);
        changer.join().unwrap();
        assert_eq!(failed, None, "a sound pool was reported corrupt");
        pool.release();
        assert_eq!(res.live_blocks(), 0);
    }

    #[test]
    fn out_of_memory_is_an_error_and_the_pool_stays_usable() {
        let res = CountingResource::leak();
        let pool = PoolAllocator::<u64>::with_upstream(4, Upstream::Resource(res));
        res.set_failing(true);
        assert!(matches!(pool.allocate(), Err(Error::OutOfMemory { .. })));
        assert!(matches!(pool.reserve(2), Err(Error::OutOfMemory { .. })));
        res.set_failing(false);
        let b = pool.allocate().unwrap();
        // SAFETY: from `allocate`.
        unsafe { pool.deallocate(b) };
        pool.check().unwrap();
        drop(pool);
        assert_eq!(res.live_blocks(), 0, "dropping the pool frees its cache");
    }

    #[test]
    fn node_based_containers_allocate_from_it() {
        use allocator_api2::boxed::Box;
        struct Node<'a> {
            value: u64,
            next: Option<Box<Node<'a>, &'a PoolAllocator<Node<'a>>>>,
        }
        let res = CountingResource::leak();
        let pool = PoolAllocator::<Node<'_>>::with_upstream(1000, Upstream::Resource(res));
        for round in 0..3u64 {
            let mut head: Option<Box<Node<'_>, _>> = None;
            for i in 0..500 {
                head = Some(Box::new_in(Node { value: i + round, next: head }, &pool));
            }
            let mut sum = 0;
            let mut cur = head.as_deref();
            while let Some(n) = cur {
                sum += n.value;
                cur = n.next.as_deref();
            }
            assert_eq!(sum, (0..500).sum::<u64>() + 500 * round);
            // Drop iteratively so a long list does not recurse deeply.
            while let Some(mut n) = head {
                head = n.next.take();
            }
        }
        assert_eq!(res.allocations(), 500, "rounds after the first reuse every node");
        // Requests of another size pass through.
        let mut v: allocator_api2::vec::Vec<Node<'_>, _> = allocator_api2::vec::Vec::with_capacity_in(10, &pool);
        v.push(Node { value: 1, next: None });
        assert_eq!(res.allocations(), 501);
        drop(v);
        drop(pool);
        assert_eq!(res.live_blocks(), 0);
    }

    /// Requests the pool does not serve (another size, a stricter alignment) are misses, and their
    /// frees are bytes returned upstream, as the caches count them: the statistics account for
    /// every request and every byte given back.
    #[test]
    fn requests_passed_through_count_as_misses_and_bytes_returned() {
        let res = CountingResource::leak();
        let pool = PoolAllocator::<u64>::with_upstream(4, Upstream::Resource(res));
        let other = Layout::from_size_align(100, 8).unwrap();
        let stricter = Layout::from_size_align(8, 64).unwrap();
        for layout in [other, stricter] {
            let p = Allocator::allocate(&pool, layout).unwrap().cast::<u8>();
            // SAFETY: allocated above with `layout`.
            unsafe { Allocator::deallocate(&pool, p, layout) };
        }
        assert_eq!(res.live_blocks(), 0);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses, s.upstream_allocations), (0, 2, 2), "{s:?}");
        assert_eq!(s.bytes_returned, 100 + 8, "{s:?}");
    }

    proptest! {
        /// Random allocations and frees with random limit changes: the cache never exceeds its
        /// limit, its list stays sound, and every block returns upstream exactly once.
        #[test]
        fn limit_holds_and_blocks_return_once(
            ops in proptest::collection::vec((0..4u8, 0..64usize), 1..400)
        ) {
            let res = CountingResource::leak();
            let pool = PoolAllocator::<[u8; 40]>::with_upstream(8, Upstream::Resource(res));
            let mut live: Vec<NonNull<[u8; 40]>> = Vec::new();
            for (kind, arg) in ops {
                match kind {
                    0 | 1 => {
                        let p = pool.allocate().unwrap();
                        prop_assert!(!live.contains(&p), "block handed out twice");
                        live.push(p);
                    }
                    2 => if !live.is_empty() {
                        let p = live.swap_remove(arg % live.len());
                        // SAFETY: from `allocate`.
                        unsafe { pool.deallocate(p) };
                    },
                    _ => pool.set_limit(arg % 16),
                }
                pool.check().unwrap();
                prop_assert!(pool.cached() <= pool.limit());
            }
            for p in live {
                // SAFETY: from `allocate`.
                unsafe { pool.deallocate(p) };
            }
            drop(pool);
            prop_assert_eq!(res.live_blocks(), 0);
            prop_assert_eq!(res.allocations(), res.deallocations());
        }
    }
}
