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
use crate::cache::size_class::{batch_len, block_size, class_of, BLOCK_ALIGN, MAX_BUCKETS};
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
    const EMPTY: Bucket = Bucket {
        head: Cell::new(ptr::null_mut()),
        bytes: AtomicUsize::new(0),
        limit: Cell::new(0),
    };

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
}

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
                unsafe {
                    upstream.deallocate(
                        NonNull::new_unchecked(block),
                        block_size(class),
                        BLOCK_ALIGN,
                    )
                };
                bytes += block_size(class) as u64;
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
    /// caches sharing a depot must share the upstream.
    pub fn with_depot(config: &CacheConfig, upstream: Upstream, depot: &'static Depot) -> Result<Self> {
        Self::build(config, upstream, Some(depot))
    }

    fn build(config: &CacheConfig, upstream: Upstream, depot: Option<&'static Depot>) -> Result<Self> {
        if !upstream.host_accessible() {
            return Err(Error::Unsupported(
                "a thread cache needs an upstream whose memory the CPU can write",
            ));
        }
        let cache = Self::unready(upstream, depot);
        cache.apply(config);
        Ok(cache)
    }

    /// A cache with every limit zero: it holds nothing until [`Self::apply`] gives it limits.
    pub(crate) const fn unready(upstream: Upstream, depot: Option<&'static Depot>) -> Self {
        ThreadCache {
            buckets: [Bucket::EMPTY; MAX_BUCKETS],
            bucket_count: Cell::new(0),
            upstream: Cell::new(upstream),
            depot: Cell::new(depot),
            counters: Counters::new(),
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
        bucket.set_bytes(bucket.bytes() - block_size(class));
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
        let bytes = bucket.bytes() + block_size(class);
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
        (batch_len(class) * block_size(class) <= self.buckets[class].limit.get()).then_some(depot)
    }

    /// After [`Self::pop`] failed: counts the miss and refills the bucket from the depot.
    pub(crate) fn refill(&self, class: usize) -> Option<NonNull<u8>> {
        self.counters.misses.add_owned(1);
        let depot = self.batch_fits(class)?;
        let bucket = &self.buckets[class];
        if !bucket.head.get().is_null() {
            // A request the upstream made refilled it meanwhile.
            return self.pop(class);
        }
        let head = depot.try_pop(class)?;
        // SAFETY: the depot handed over a null-terminated chain of `batch_len` free blocks.
        bucket.head.set(unsafe { link(head.as_ptr(), 0) });
        bucket.set_bytes((batch_len(class) - 1) * block_size(class));
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
        let size = block_size(class);
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
                bucket.set_bytes(bucket.bytes() - block_size(class));
            }
        }
        chains
    }

    /// A block for `layout` (any size and alignment; zero-sized requests are refused).
    pub fn allocate(&mut self, layout: Layout) -> Result<NonNull<u8>> {
        crate::check_layout(layout.size(), layout.align())?;
        if let Some(class) = class_of(layout) {
            if let Some(p) = self.pop(class).or_else(|| self.refill(class)) {
                return Ok(p);
            }
            return self.allocate_upstream(block_size(class), BLOCK_ALIGN, layout.size());
        }
        self.counters.misses.add_owned(1);
        self.allocate_upstream(layout.size(), layout.align(), layout.size())
    }

    fn allocate_upstream(&mut self, size: usize, align: usize, requested: usize) -> Result<NonNull<u8>> {
        self.counters.upstream_allocations.add_owned(1);
        self.upstream.get().allocate(size, align).ok_or(Error::OutOfMemory {
            requested: requested as u64,
            available: 0,
        })
    }

    /// Takes back a block from [`Self::allocate`].
    ///
    /// # Safety
    /// `ptr` came from `allocate(layout)` on a cache with an equal upstream (this one, or another
    /// thread's) and is not used again.
    pub unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout) {
        if let Some(class) = class_of(layout) {
            // SAFETY: the caller's contract makes `ptr` a whole block of `class` we may keep.
            if unsafe { self.push(class, ptr) || self.spill(class, ptr) } {
                return;
            }
            self.counters
                .bytes_returned
                .add_owned(block_size(class) as u64);
            // SAFETY: a whole block of this class from this upstream.
            unsafe { self.upstream.get().deallocate(ptr, block_size(class), BLOCK_ALIGN) };
            return;
        }
        self.counters.bytes_returned.add_owned(layout.size() as u64);
        // SAFETY: passed through with exactly this layout.
        unsafe { self.upstream.get().deallocate(ptr, layout.size(), layout.align()) };
    }

    /// New limits; blocks over them go upstream now.
    pub fn set_config(&mut self, config: &CacheConfig) {
        self.apply(config);
        let chains = self.detach(false);
        // SAFETY: detached blocks came whole from our upstream.
        let bytes = unsafe { chains.free(&self.upstream.get()) };
        self.counters.bytes_returned.add_owned(bytes);
    }

    /// Returns every held block: whole batches to the depot where it has room, the rest upstream.
    pub fn flush(&mut self) {
        let chains = self.detach(true);
        // SAFETY: detached blocks came whole from our upstream.
        let bytes = unsafe { chains.free(&self.upstream.get()) };
        self.counters.bytes_returned.add_owned(bytes);
    }

    /// Walks every bucket: each list has exactly as many blocks as its byte count says, never
    /// more bytes than its limit, only 16-aligned blocks, and no cycle.
    pub fn check(&self) -> Result<()> {
        for (class, bucket) in self.buckets.iter().enumerate() {
            let size = block_size(class);
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
    Error::Corrupt {
        structure: "thread cache",
        offset: class as u64,
        detail,
    }
}
