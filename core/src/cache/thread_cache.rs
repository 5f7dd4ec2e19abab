//! The thread cache: power-of-two buckets of free blocks, each with a byte limit.
//!
//! [`ThreadCache`] is the tier itself, usable on its own (one owner, `&mut self`);
//! [`HetAlloc`](super::HetAlloc) keeps one per thread in thread-local storage. A freed block goes
//! to its bucket unless the bucket would exceed its limit; then a whole batch moves to the
//! [`Depot`] if there is one with room, else the block goes upstream. An empty bucket refills
//! with a batch from the depot before asking the upstream.

use core::alloc::Layout;
use core::cell::Cell;
use core::ptr::{self, NonNull};

use crate::cache::config::CacheConfig;
use crate::cache::depot::{link, set_link, Depot};
use crate::cache::size_class::{batch_len, class_of, class_size, BLOCK_ALIGN, MAX_BUCKETS};
use crate::cache::stats::{CacheStats, Counters};
use crate::cache::upstream::Upstream;
use crate::error::{Error, Result};
use core::sync::atomic::{AtomicUsize, Ordering};

/// One bucket: a free list of same-size blocks linked through their first word.
struct Bucket {
    head: Cell<*mut u8>,
    /// Bytes on the list; written only by the owner, read by statistics from any thread.
    bytes: AtomicUsize,
    limit: Cell<usize>,
}

impl Bucket {
    const fn empty() -> Bucket {
        Bucket { head: Cell::new(ptr::null_mut()), bytes: AtomicUsize::new(0), limit: Cell::new(0) }
    }

    #[inline(always)]
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    #[inline(always)]
    fn set_bytes(&self, bytes: usize) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }
}

/// Per-thread power-of-two buckets with byte limits over an [`Upstream`].
///
/// Requests up to 1 MiB with an alignment of at most 16 are served in whole blocks
/// (`16 << bucket` bytes); others pass straight through to the upstream. Dropping the cache
/// returns everything it holds (to the depot, then upstream).
///
/// Its state is in cells so that the thread-local copies can be used through shared references
/// (a request the upstream makes while the cache is working may come back to the same thread);
/// statistics readers on other threads touch only the atomic counters.
pub struct ThreadCache {
    buckets: [Bucket; MAX_BUCKETS],
    bucket_count: Cell<u8>,
    upstream: Cell<Upstream>,
    depot: Cell<Option<&'static Depot>>,
    pub(crate) counters: Counters,
    /// The fork generation ([`crate::fork::generation`]) the cache was made in, or last dropped
    /// its blocks in: a cache made by hand drops its blocks, unfreed, at its first call in a
    /// forked child (over shared memory they are the parent's too, and it may hand them out).
    /// [`BY_FORK_HANDLERS`] for the thread-local caches, whose blocks the fork handlers drop (a
    /// thread started in a child has nothing from before the fork to drop).
    generation: Cell<u64>,
}

/// The generation of a cache that the fork handlers see to (no generation is this high).
const BY_FORK_HANDLERS: u64 = u64::MAX;

// SAFETY: the cache owns every block on its lists exclusively; moving it to another thread moves
// that ownership. The upstream and depot are `Sync`.
unsafe impl Send for ThreadCache {}

/// Chains of blocks detached from a cache, one per class, to be freed upstream.
pub(crate) struct Chains([*mut u8; MAX_BUCKETS]);

impl Chains {
    /// Frees every block to `upstream` and returns the bytes freed.
    ///
    /// # Safety
    /// The chains hold blocks that came whole from `upstream` and that no one else refers to.
    pub(crate) unsafe fn free(self, upstream: &Upstream) -> u64 {
        let mut bytes = 0u64;
        for (class, &head) in self.0.iter().enumerate() {
            let mut block = head;
            while !block.is_null() {
                // SAFETY: the caller's contract; the link is read before the block goes.
                let next = unsafe { link(block, 0) };
                // SAFETY: as above.
                unsafe { upstream.deallocate(NonNull::new_unchecked(block), class_size(class), BLOCK_ALIGN) };
                bytes += class_size(class) as u64;
                block = next;
            }
        }
        bytes
    }
}

impl ThreadCache {
    /// A cache with `config`'s limits over `upstream`, without a depot.
    pub fn new(config: &CacheConfig, upstream: Upstream) -> Result<Self> {
        Self::build(config, upstream, None)
    }

    /// A cache with `config`'s limits over `upstream` that exchanges batches with `depot`. All
    /// caches sharing a depot share the upstream: the first binds the depot to its upstream, and
    /// a cache over another is refused with [`Error::Unsupported`].
    pub fn with_depot(config: &CacheConfig, upstream: Upstream, depot: &'static Depot) -> Result<Self> {
        Self::build(config, upstream, Some(depot))
    }

    fn build(config: &CacheConfig, upstream: Upstream, depot: Option<&'static Depot>) -> Result<Self> {
        if !upstream.host_accessible() {
            return Err(Error::Unsupported("a thread cache needs an upstream whose memory the CPU can write"));
        }
        if depot.is_some_and(|d| !d.bind(upstream)) {
            return Err(Error::Unsupported("a depot serves the caches of one upstream"));
        }
        // So that forks are counted: a cache made by hand meets no fork handler (see
        // `forget_if_forked`).
        let _ = crate::fork::watch();
        let cache = Self::unready(upstream, depot);
        cache.generation.set(crate::fork::generation());
        cache.apply(config);
        Ok(cache)
    }

    /// A cache with every limit zero: it holds nothing until [`Self::apply`] gives it limits.
    pub(crate) const fn unready(upstream: Upstream, depot: Option<&'static Depot>) -> Self {
        ThreadCache {
            buckets: [const { Bucket::empty() }; MAX_BUCKETS],
            bucket_count: Cell::new(0),
            upstream: Cell::new(upstream),
            depot: Cell::new(depot),
            counters: Counters::new(),
            generation: Cell::new(BY_FORK_HANDLERS),
        }
    }

    /// Whether limits were ever given (a thread-local cache starts without).
    #[inline]
    pub(crate) fn is_ready(&self) -> bool {
        self.bucket_count.get() != 0
    }

    /// Points a thread-local cache at its slot's upstream and depot.
    pub(crate) fn attach(&self, upstream: Upstream, depot: &'static Depot) {
        self.upstream.set(upstream);
        self.depot.set(Some(depot));
    }

    /// Sets the limits without trimming; see [`Self::set_config`].
    pub(crate) fn apply(&self, config: &CacheConfig) {
        self.bucket_count.set(config.bucket_count() as u8);
        for (class, bucket) in self.buckets.iter().enumerate() {
            bucket.limit.set(config.limit(class));
        }
    }

    /// Sets every limit to zero, so nothing more is cached; used when a thread exits.
    pub(crate) fn retire(&self) {
        for bucket in &self.buckets {
            bucket.limit.set(0);
        }
    }

    /// The upstream.
    pub fn upstream(&self) -> Upstream {
        self.upstream.get()
    }

    /// The current limits.
    pub fn config(&self) -> CacheConfig {
        let limits: [usize; MAX_BUCKETS] = core::array::from_fn(|c| self.buckets[c].limit.get());
        CacheConfig::from_limits(&limits[..(self.bucket_count.get() as usize).max(1)])
            .unwrap_or(CacheConfig::disabled())
    }

    /// Bytes held in bucket `class`.
    pub fn bucket_bytes(&self, class: usize) -> usize {
        self.buckets.get(class).map_or(0, Bucket::bytes)
    }

    /// Bytes held in all buckets.
    pub fn bytes_cached(&self) -> usize {
        self.buckets.iter().map(Bucket::bytes).sum()
    }

    /// Hits, misses, bytes held, bytes returned upstream and upstream allocations.
    pub fn stats(&self) -> CacheStats {
        self.counters.snapshot(self.bytes_cached() as u64)
    }

    /// A block of `class` from its bucket.
    #[inline(always)]
    pub(crate) fn pop(&self, class: usize) -> Option<NonNull<u8>> {
        let bucket = &self.buckets[class];
        let head = NonNull::new(bucket.head.get())?;
        // SAFETY: `head` is a free block on our list; its first word links the next one.
        bucket.head.set(unsafe { link(head.as_ptr(), 0) });
        bucket.set_bytes(bucket.bytes() - class_size(class));
        self.counters.hits.add_owned(1);
        Some(head)
    }

    /// Puts a free block of `class` on its bucket; `false` if that would exceed the limit.
    ///
    /// # Safety
    /// `block` is a whole block of `class` from this cache's upstream that the caller gives up.
    #[inline(always)]
    pub(crate) unsafe fn push(&self, class: usize, block: NonNull<u8>) -> bool {
        let bucket = &self.buckets[class];
        let bytes = bucket.bytes() + class_size(class);
        if bytes > bucket.limit.get() {
            return false;
        }
        // SAFETY: the caller gives the block up; it is at least 16 bytes and 16-aligned.
        unsafe { set_link(block.as_ptr(), 0, bucket.head.get()) };
        bucket.head.set(block.as_ptr());
        bucket.set_bytes(bytes);
        true
    }

    /// Whether batches of `class` may move between this cache and its depot.
    #[inline]
    fn batch_fits(&self, class: usize) -> Option<&'static Depot> {
        let depot = self.depot.get()?;
        (batch_len(class) * class_size(class) <= self.buckets[class].limit.get()).then_some(depot)
    }

    /// After [`Self::pop`] failed: counts the miss and refills the bucket from the depot.
    pub(crate) fn refill(&self, class: usize) -> Option<NonNull<u8>> {
        if !self.buckets[class].head.get().is_null() {
            // A request the upstream made refilled it meanwhile: a hit after all, which `pop`
            // counts.
            return self.pop(class);
        }
        self.counters.misses.add_owned(1);
        let depot = self.batch_fits(class)?;
        let bucket = &self.buckets[class];
        let head = depot.try_pop(class)?;
        // SAFETY: the depot handed over a null-terminated chain of `batch_len` free blocks.
        bucket.head.set(unsafe { link(head.as_ptr(), 0) });
        bucket.set_bytes((batch_len(class) - 1) * class_size(class));
        Some(head)
    }

    /// After [`Self::push`] failed: moves a batch to the depot and pushes `block`. `false` if
    /// that was not possible: the caller frees `block` upstream.
    ///
    /// # Safety
    /// As for [`Self::push`].
    pub(crate) unsafe fn spill(&self, class: usize, block: NonNull<u8>) -> bool {
        let Some(depot) = self.batch_fits(class) else {
            return false;
        };
        if !self.batch_to_depot(class, depot) {
            return false;
        }
        // SAFETY: the caller's contract; the limit holds a batch, so the block now fits.
        unsafe { self.push(class, block) }
    }

    /// Moves the first `batch_len(class)` blocks of a bucket to `depot`; `false` if the bucket
    /// has fewer or the depot is full.
    fn batch_to_depot(&self, class: usize, depot: &Depot) -> bool {
        let n = batch_len(class);
        let size = class_size(class);
        let bucket = &self.buckets[class];
        if bucket.bytes() < n * size {
            return false;
        }
        let head = bucket.head.get();
        let mut tail = head;
        for _ in 1..n {
            // SAFETY: the list holds at least `n` blocks (bytes checked above).
            tail = unsafe { link(tail, 0) };
        }
        // SAFETY: `tail` is on our list.
        let rest = unsafe { link(tail, 0) };
        // SAFETY: as above; the batch is cut off the list.
        unsafe { set_link(tail, 0, ptr::null_mut()) };
        // SAFETY: `head` starts a null-terminated chain of `n` blocks of `class` that we give up.
        if unsafe { depot.try_push(class, NonNull::new_unchecked(head)) } {
            bucket.head.set(rest);
            bucket.set_bytes(bucket.bytes() - n * size);
            true
        } else {
            // SAFETY: put the batch back as it was.
            unsafe { set_link(tail, 0, rest) };
            false
        }
    }

    /// Drops every cached block without freeing it: in a forked child, for caches over a
    /// resource whose blocks the parent may hand out too (the blocks are lost to the child).
    pub(crate) fn forget_all(&self) {
        for bucket in &self.buckets {
            bucket.head.set(ptr::null_mut());
            bucket.set_bytes(0);
        }
    }

    /// For the calls of a cache made by hand (the thread-local caches are seen to by the fork
    /// handlers): in a forked child, drops the blocks cached before the fork, unfreed, as the
    /// typed pools do. Over shared memory they are the parent's too, which may hand them out;
    /// over private memory they are copies the child can do without.
    #[inline]
    fn forget_if_forked(&self) {
        let (made, now) = (self.generation.get(), crate::fork::generation());
        if made != now && made != BY_FORK_HANDLERS {
            self.forget_all();
            self.generation.set(now);
        }
    }

    /// Detaches blocks for the upstream: those over each limit, or with `all` every block (whole
    /// batches go to the depot first, where it has room).
    pub(crate) fn detach(&self, all: bool) -> Chains {
        let mut chains = Chains([ptr::null_mut(); MAX_BUCKETS]);
        for class in 0..MAX_BUCKETS {
            if all {
                if let Some(depot) = self.depot.get() {
                    while self.batch_to_depot(class, depot) {}
                }
            }
            let bucket = &self.buckets[class];
            let keep = if all { 0 } else { bucket.limit.get() };
            while bucket.bytes() > keep {
                let block = bucket.head.get();
                // SAFETY: bytes > 0, so the list is not empty.
                bucket.head.set(unsafe { link(block, 0) });
                // SAFETY: the block leaves the list for the chain.
                unsafe { set_link(block, 0, chains.0[class]) };
                chains.0[class] = block;
                bucket.set_bytes(bucket.bytes() - class_size(class));
            }
        }
        chains
    }

    /// A block for `layout` (any size and alignment; zero-sized requests are refused).
    pub fn allocate(&mut self, layout: Layout) -> Result<NonNull<u8>> {
        crate::check_layout(layout.size(), layout.align())?;
        self.forget_if_forked();
        if let Some(class) = class_of(layout) {
            if let Some(p) = self.pop(class).or_else(|| self.refill(class)) {
                return Ok(p);
            }
            return self.allocate_upstream(class_size(class), BLOCK_ALIGN, layout.size());
        }
        self.counters.misses.add_owned(1);
        self.allocate_upstream(layout.size(), layout.align(), layout.size())
    }

    fn allocate_upstream(&mut self, size: usize, align: usize, requested: usize) -> Result<NonNull<u8>> {
        self.counters.upstream_allocations.add_owned(1);
        self.upstream
            .get()
            .allocate(size, align)
            .ok_or(Error::OutOfMemory { requested: requested as u64, available: 0 })
    }

    /// Takes back a block from [`Self::allocate`].
    ///
    /// # Safety
    /// `ptr` came from `allocate(layout)` on a cache with an equal upstream (this one, or another
    /// thread's) and is not used again.
    pub unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout) {
        self.forget_if_forked();
        if let Some(class) = class_of(layout) {
            // SAFETY: the caller's contract makes `ptr` a whole block of `class` we may keep.
            if unsafe { self.push(class, ptr) || self.spill(class, ptr) } {
                return;
            }
            self.counters.bytes_returned.add_owned(class_size(class) as u64);
            // SAFETY: a whole block of this class from this upstream.
            unsafe { self.upstream.get().deallocate(ptr, class_size(class), BLOCK_ALIGN) };
            return;
        }
        self.counters.bytes_returned.add_owned(layout.size() as u64);
        // SAFETY: passed through with exactly this layout.
        unsafe { self.upstream.get().deallocate(ptr, layout.size(), layout.align()) };
    }

    /// New limits; blocks over them go upstream now.
    pub fn set_config(&mut self, config: &CacheConfig) {
        self.forget_if_forked();
        self.apply(config);
        let chains = self.detach(false);
        // SAFETY: detached blocks came whole from our upstream.
        let bytes = unsafe { chains.free(&self.upstream.get()) };
        self.counters.bytes_returned.add_owned(bytes);
    }

    /// Returns every held block: whole batches to the depot where it has room, the rest upstream.
    pub fn flush(&mut self) {
        self.forget_if_forked();
        let chains = self.detach(true);
        // SAFETY: detached blocks came whole from our upstream.
        let bytes = unsafe { chains.free(&self.upstream.get()) };
        self.counters.bytes_returned.add_owned(bytes);
    }

    /// Walks every bucket: each list has exactly as many blocks as its byte count says, never
    /// more bytes than its limit, only 16-aligned blocks, and no cycle.
    pub fn check(&self) -> Result<()> {
        // In a forked child the blocks from before the fork may be the parent's again, their
        // links its data: they are dropped, not walked.
        self.forget_if_forked();
        for (class, bucket) in self.buckets.iter().enumerate() {
            let size = class_size(class);
            let bytes = bucket.bytes();
            if bytes > bucket.limit.get() {
                return Err(corrupt(class, "bucket holds more bytes than its limit"));
            }
            if bytes % size != 0 {
                return Err(corrupt(class, "byte count is not a whole number of blocks"));
            }
            let expected = bytes / size;
            let mut n = 0;
            let mut block = bucket.head.get();
            while !block.is_null() {
                if n == expected {
                    return Err(corrupt(class, "list longer than its byte count (or a cycle)"));
                }
                if block as usize % BLOCK_ALIGN != 0 {
                    return Err(corrupt(class, "misaligned block on a free list"));
                }
                // SAFETY: the list is ours and no longer than counted so far.
                block = unsafe { link(block, 0) };
                n += 1;
            }
            if n != expected {
                return Err(corrupt(class, "list shorter than its byte count"));
            }
        }
        Ok(())
    }
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        self.flush();
    }
}

fn corrupt(class: usize, detail: &'static str) -> Error {
    Error::Corrupt { structure: "thread cache", offset: class as u64, detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::size_class::MAX_BLOCK;
    use crate::testing::CountingResource;
    use proptest::prelude::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn freed_blocks_are_reused_until_the_limit() {
        let res = CountingResource::leak();
        let config = CacheConfig::uniform(13, 4 * 64).unwrap();
        let mut cache = ThreadCache::new(&config, Upstream::Resource(res)).unwrap();
        let l = layout(50, 8); // class 2: 64-byte blocks
        let blocks: Vec<_> = (0..6).map(|_| cache.allocate(l).unwrap()).collect();
        assert_eq!(res.allocations(), 6);
        for &b in &blocks {
            // SAFETY: allocated above with `l`.
            unsafe { cache.deallocate(b, l) };
        }
        // Four fit under the limit; two went upstream.
        assert_eq!(cache.bucket_bytes(2), 4 * 64);
        assert_eq!(res.deallocations(), 2);
        let again = cache.allocate(l).unwrap();
        assert_eq!(again, blocks[3], "the last block cached is the first reused");
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.upstream_allocations), (1, 6, 6));
        assert_eq!(s.bytes_returned, 2 * 64);
        cache.check().unwrap();
        // SAFETY: from `allocate(l)`.
        unsafe { cache.deallocate(again, l) };
        drop(cache);
        assert_eq!(res.live_blocks(), 0);
    }

    #[test]
    fn large_and_over_aligned_requests_pass_through() {
        let res = CountingResource::leak();
        let mut cache = ThreadCache::new(&CacheConfig::uniform(17, 1 << 30).unwrap(), Upstream::Resource(res)).unwrap();
        for l in [layout(MAX_BLOCK + 1, 8), layout(64, 64), layout(100, 4096)] {
            let p = cache.allocate(l).unwrap();
            assert_eq!(p.as_ptr() as usize % l.align(), 0);
            assert_eq!(res.live_bytes(), l.size(), "passed through with its own size");
            // SAFETY: from `allocate(l)`.
            unsafe { cache.deallocate(p, l) };
            assert_eq!(cache.bytes_cached(), 0);
            assert_eq!(res.live_blocks(), 0);
        }
    }

    #[test]
    fn bad_requests_are_errors_and_out_of_memory_leaves_it_usable() {
        let res = CountingResource::leak();
        let mut cache = ThreadCache::new(&CacheConfig::uniform(4, 1024).unwrap(), Upstream::Resource(res)).unwrap();
        assert!(matches!(cache.allocate(layout(0, 8)), Err(Error::InvalidSize { .. })));
        res.set_failing(true);
        assert!(matches!(cache.allocate(layout(32, 8)), Err(Error::OutOfMemory { requested: 32, .. })));
        res.set_failing(false);
        let p = cache.allocate(layout(32, 8)).unwrap();
        // SAFETY: from `allocate`.
        unsafe { cache.deallocate(p, layout(32, 8)) };
        cache.check().unwrap();
    }

    #[test]
    fn lowering_the_limits_trims_and_flush_empties() {
        let res = CountingResource::leak();
        let mut cache = ThreadCache::new(&CacheConfig::uniform(13, 1 << 20).unwrap(), Upstream::Resource(res)).unwrap();
        let l = layout(4096, 16);
        let blocks: Vec<_> = (0..10).map(|_| cache.allocate(l).unwrap()).collect();
        for b in blocks {
            // SAFETY: from `allocate(l)`.
            unsafe { cache.deallocate(b, l) };
        }
        assert_eq!(cache.bytes_cached(), 10 * 4096);
        cache.set_config(&CacheConfig::uniform(13, 3 * 4096).unwrap());
        assert_eq!(cache.bytes_cached(), 3 * 4096);
        assert_eq!(res.live_blocks(), 3);
        cache.check().unwrap();
        cache.flush();
        assert_eq!(cache.bytes_cached(), 0);
        assert_eq!(res.live_blocks(), 0);
        assert_eq!(cache.stats().bytes_returned, 10 * 4096);
    }

    #[test]
    fn a_device_upstream_is_refused() {
        struct Device;
        // SAFETY: hands out nothing.
        unsafe impl crate::MemoryResource for Device {
            fn name(&self) -> &str {
                "device"
            }
            fn kind(&self) -> crate::MemoryKind {
                crate::MemoryKind::Device
            }
            fn allocate(&self, _: usize, _: usize) -> Result<NonNull<u8>> {
                Err(Error::Unsupported("test"))
            }
            unsafe fn deallocate(&self, _: NonNull<u8>, _: usize, _: usize) {}
        }
        static DEVICE: Device = Device;
        assert!(matches!(
            ThreadCache::new(&CacheConfig::disabled(), Upstream::Resource(&DEVICE)),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn a_consumer_feeds_a_producer_through_the_depot() {
        let res = CountingResource::leak();
        let depot: &'static Depot = Box::leak(Box::new(Depot::new(1 << 20)));
        let config = CacheConfig::uniform(13, 64 * 128).unwrap();
        let up = Upstream::Resource(res);
        let mut producer = ThreadCache::with_depot(&config, up, depot).unwrap();
        let mut consumer = ThreadCache::with_depot(&config, up, depot).unwrap();
        let l = layout(100, 8); // class 3: 128 B, batches of 64
        for _round in 0..50 {
            let blocks: Vec<_> = (0..200).map(|_| producer.allocate(l).unwrap()).collect();
            for b in blocks {
                // SAFETY: allocated by the producer from the same upstream.
                unsafe { consumer.deallocate(b, l) };
            }
            producer.check().unwrap();
            consumer.check().unwrap();
            depot.check().unwrap();
        }
        let d = depot.stats();
        assert!(d.hits > 100, "the producer refilled from the depot: {d:?}");
        assert!(
            res.allocations() < 50 * 200 / 4,
            "most blocks were recycled, only {} of 10000 came from upstream",
            res.allocations()
        );
        drop(producer);
        drop(consumer);
        depot.check().unwrap();
        depot.release(&up).unwrap();
        assert_eq!(res.live_blocks(), 0);
        assert_eq!(depot.stats().bytes_cached, 0);
    }

    #[test]
    fn a_depot_serves_the_caches_of_one_upstream() {
        let (a, b) = (CountingResource::leak(), CountingResource::leak());
        let depot: &'static Depot = Box::leak(Box::new(Depot::new(1 << 20)));
        let config = CacheConfig::uniform(13, 64 * 128).unwrap();
        let mut cache = ThreadCache::with_depot(&config, Upstream::Resource(a), depot).unwrap();
        // Another upstream's cache would take `a`'s blocks from the depot and free them to `b`.
        assert!(matches!(ThreadCache::with_depot(&config, Upstream::Resource(b), depot), Err(Error::Unsupported(_))));
        let _same = ThreadCache::with_depot(&config, Upstream::Resource(a), depot).unwrap();
        let l = layout(100, 8); // class 3: 128 B, batches of 64
        let blocks: Vec<_> = (0..200).map(|_| cache.allocate(l).unwrap()).collect();
        for p in blocks {
            // SAFETY: from `allocate(l)`.
            unsafe { cache.deallocate(p, l) };
        }
        drop(cache);
        let held = depot.stats().bytes_cached;
        assert!(held > 0);
        assert!(matches!(depot.release(&Upstream::Resource(b)), Err(Error::Unsupported(_))));
        assert_eq!((depot.stats().bytes_cached, b.deallocations()), (held, 0), "nothing freed to `b`");
        depot.release(&Upstream::Resource(a)).unwrap();
        assert_eq!(a.live_blocks(), 0);
    }

    /// A resource that holds another as its first field: the two share an address and are two
    /// resources (this one serves its blocks from `other`).
    #[repr(C)]
    struct Shell {
        first: CountingResource,
        other: &'static CountingResource,
    }

    // SAFETY: forwards every block to and from `other`, which keeps the promises.
    unsafe impl crate::MemoryResource for Shell {
        fn name(&self) -> &str {
            "shell"
        }
        fn kind(&self) -> crate::MemoryKind {
            crate::MemoryKind::Host
        }
        fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
            self.other.allocate(size, align)
        }
        unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.other.deallocate(ptr, size, align) }
        }
    }

    /// Two resources at one address (a struct and its first field) are two upstreams: a depot
    /// bound to one refuses the other's caches, which would take its blocks from the depot and
    /// free them to the wrong resource.
    #[test]
    fn resources_at_one_address_are_distinct_upstreams() {
        let shell: &'static Shell =
            Box::leak(Box::new(Shell { first: CountingResource::new(), other: CountingResource::leak() }));
        let (outer, inner) = (Upstream::Resource(shell), Upstream::Resource(&shell.first));
        assert!(core::ptr::addr_eq(shell, &shell.first), "the test needs one address");
        assert!(outer != inner);
        assert!(outer == Upstream::Resource(shell) && inner == Upstream::Resource(&shell.first));
        let depot: &'static Depot = Box::leak(Box::new(Depot::new(1 << 20)));
        let config = CacheConfig::uniform(13, 64 * 128).unwrap();
        let mut a = ThreadCache::with_depot(&config, inner, depot).unwrap();
        assert!(matches!(ThreadCache::with_depot(&config, outer, depot), Err(Error::Unsupported(_))));
        let l = layout(100, 8); // class 3: 128 B, batches of 64
        let blocks: Vec<_> = (0..200).map(|_| a.allocate(l).unwrap()).collect();
        for p in blocks {
            // SAFETY: from `allocate(l)`.
            unsafe { a.deallocate(p, l) };
        }
        drop(a);
        assert!(matches!(depot.release(&outer), Err(Error::Unsupported(_))));
        depot.release(&inner).unwrap();
        assert_eq!((shell.first.live_blocks(), shell.other.allocations()), (0, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { cache: usize, size: usize, align_shift: u32 },
        Free { cache: usize, pick: usize },
        Limits { cache: usize, limits: Vec<usize> },
        Flush { cache: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..2usize, prop_oneof![1..=256usize, 1..=70_000usize, Just(MAX_BLOCK + 10)], 0..7u32)
                .prop_map(|(cache, size, align_shift)| Op::Alloc { cache, size, align_shift }),
            6 => (0..2usize, any::<usize>()).prop_map(|(cache, pick)| Op::Free { cache, pick }),
            1 => (0..2usize, proptest::collection::vec(0..20_000usize, 1..=17))
                .prop_map(|(cache, limits)| Op::Limits { cache, limits }),
            1 => (0..2usize).prop_map(|cache| Op::Flush { cache }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Two caches sharing a depot and an upstream, random requests and frees (frees may go to
        /// either cache): after every step no bucket exceeds its limit, the lists are sound, no
        /// live block is handed out twice and contents survive; at the end every upstream block
        /// has come back exactly once.
        #[test]
        fn limits_hold_and_every_block_returns_once(ops in proptest::collection::vec(op(), 1..300)) {
            let res = CountingResource::leak();
            let up = Upstream::Resource(res);
            let depot: &'static Depot = Box::leak(Box::new(Depot::new(64 << 10)));
            let config = CacheConfig::uniform(10, 8 << 10).unwrap();
            let mut caches = [
                ThreadCache::with_depot(&config, up, depot).unwrap(),
                ThreadCache::with_depot(&config, up, depot).unwrap(),
            ];
            let mut live: Vec<(NonNull<u8>, Layout, u8)> = Vec::new();
            let mut requests = 0u64;
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Alloc { cache, size, align_shift } => {
                        let l = layout(size, 1 << align_shift);
                        let p = caches[cache].allocate(l).unwrap();
                        requests += 1;
                        prop_assert_eq!(p.as_ptr() as usize % l.align(), 0);
                        let tag = step as u8;
                        // SAFETY: a fresh block of `size` bytes.
                        unsafe { core::ptr::write_bytes(p.as_ptr(), tag, size) };
                        prop_assert!(live.iter().all(|(q, _, _)| *q != p), "block handed out twice");
                        live.push((p, l, tag));
                    }
                    Op::Free { cache, pick } => {
                        if !live.is_empty() {
                            let (p, l, tag) = live.swap_remove(pick % live.len());
                            // SAFETY: a live block of `l.size()` bytes we wrote.
                            let bytes = unsafe { core::slice::from_raw_parts(p.as_ptr(), l.size()) };
                            prop_assert!(bytes.iter().all(|&b| b == tag), "contents changed");
                            // SAFETY: from `allocate(l)` on a cache with this upstream.
                            unsafe { caches[cache].deallocate(p, l) };
                        }
                    }
                    Op::Limits { cache, limits } => {
                        caches[cache].set_config(&CacheConfig::from_limits(&limits).unwrap());
                    }
                    Op::Flush { cache } => {
                        caches[cache].flush();
                        prop_assert_eq!(caches[cache].bytes_cached(), 0);
                    }
                }
                for c in &caches {
                    c.check().unwrap();
                    let config = c.config();
                    for class in 0..MAX_BUCKETS {
                        prop_assert!(c.bucket_bytes(class) <= config.limit(class));
                    }
                }
                depot.check().unwrap();
                prop_assert!(depot.stats().bytes_cached <= 64 << 10);
            }
            let s = caches[0].stats();
            let t = caches[1].stats();
            prop_assert_eq!(s.hits + s.misses + t.hits + t.misses, requests);
            for (p, l, _) in live {
                // SAFETY: still live, from `allocate(l)`.
                unsafe { caches[0].deallocate(p, l) };
            }
            drop(caches);
            depot.release(&up).unwrap();
            prop_assert_eq!(res.live_blocks(), 0);
            prop_assert_eq!(res.allocations(), res.deallocations());
        }
    }
}
