//! [`HetAlloc`]: the thread cache as a `GlobalAlloc` and an `allocator_api2` allocator.

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};

use crate::cache::stats::CacheStats;
use crate::cache::tls::{SlotRef, Tier, SLOT_SYSTEM};
use crate::cache::upstream::Upstream;
use crate::resource::MemoryResource;

/// An allocator that serves small requests from per-thread power-of-two caches.
///
/// ```
/// use hetmem_core::cache::HetAlloc;
///
/// #[global_allocator]
/// static A: HetAlloc = HetAlloc::new();
///
/// let v: Vec<u64> = (0..1000).collect();
/// assert_eq!(v.iter().sum::<u64>(), 499_500);
/// ```
///
/// Requests up to 1 MiB with an alignment of at most 16 are rounded up to a power of two and
/// served from the calling thread's bucket for that size; the bucket's byte limit comes from the
/// thread's role ([`set_thread_role`](super::set_thread_role)) or its own configuration. Frees
/// go to the freeing thread's bucket, then (over the limit) to a process-wide depot of batches,
/// then upstream. Bigger or more strictly aligned requests go straight upstream.
///
/// All `HetAlloc`s with the same upstream share the per-thread caches. The upstream is the
/// system allocator ([`HetAlloc::new`]) or a [`MemoryResource`] ([`HetAlloc::with_resource`]).
/// Six slots serve the resources of `HetAlloc`s and [`RecyclingFrameAllocator`]s together, one
/// per distinct resource and tier; a resource that finds none free passes straight through.
///
/// A resource under a `HetAlloc` must not allocate or free through it: not a `HetAlloc` over a
/// [`SyncPool`] as the `#[global_allocator]`, when the pool keeps its tables in global memory (a
/// [`QuickPool`] does, as does a pool over [`HostResource`]). Such a request, made while the
/// resource serves this thread, comes back here; it cannot be served from the resource, whose
/// lock this thread holds, nor from the system allocator (a free could not tell its blocks from
/// the resource's). So it is refused: an allocation the thread's cache cannot serve gets null (a
/// pool then reports its bookkeeping out of memory, and the outer request fails), a free that
/// would go to the resource leaves its block there unused, and the first refusal says so on
/// stderr (on unix). The resource's bookkeeping belongs in the system allocator, or in a `HetAlloc` over
/// another upstream.
///
/// [`SyncPool`]: crate::pool::SyncPool
/// [`QuickPool`]: crate::pool::QuickPool
/// [`HostResource`]: crate::pool::HostResource
///
/// [`RecyclingFrameAllocator`]: super::frame::RecyclingFrameAllocator
///
/// As an [`Allocator`] it makes `allocator_api2::vec::Vec<T, HetAlloc>` and hashbrown maps use
/// the caches without being the global allocator.
pub struct HetAlloc {
    slot: SlotRef,
}

impl HetAlloc {
    /// Caches over the system allocator.
    pub const fn new() -> Self {
        HetAlloc { slot: SlotRef::fixed(SLOT_SYSTEM, Tier::Alloc, Upstream::System) }
    }

    /// Caches over `resource`, which must be host-accessible (device memory passes straight
    /// through uncached, and the CPU never writes into it: zeroed requests, and resizes that
    /// would move a block, fail).
    pub const fn with_resource(resource: &'static dyn MemoryResource) -> Self {
        HetAlloc { slot: SlotRef::lazy(Tier::Alloc, Upstream::Resource(resource)) }
    }

    /// The upstream.
    pub fn upstream(&self) -> Upstream {
        self.slot.upstream()
    }

    /// The thread tier's statistics for this upstream, summed over live and exited threads.
    pub fn stats(&self) -> CacheStats {
        self.slot.stats()
    }

    /// The calling thread's cache statistics for this upstream.
    pub fn thread_stats(&self) -> CacheStats {
        self.slot.thread_stats()
    }

    /// The depot's statistics (hits and misses count batches).
    pub fn depot_stats(&self) -> CacheStats {
        self.slot.existing_depot().map(|d| d.stats()).unwrap_or_default()
    }

    /// Sets the depot's byte limit (0: it takes no more batches). The batches it holds stay, and
    /// still refill threads' caches, until taken or [`release_depot`](Self::release_depot).
    ///
    /// The limit belongs to the depot of this upstream's slot, so an upstream that has none yet
    /// claims one here, as its first request would (see the slots above). Where it gets none
    /// (every slot taken, or device memory) nothing is cached, no limit is kept, and
    /// [`depot_limit`](Self::depot_limit) reads 0.
    pub fn set_depot_limit(&self, bytes: usize) {
        if let Some(d) = self.slot.depot() {
            d.set_limit(bytes);
        }
    }

    /// Walks the calling thread's cache for this upstream and checks its invariants (limits
    /// held, lists as long as counted, no cycle).
    pub fn check_thread(&self) -> crate::error::Result<()> {
        self.slot.check_thread()
    }

    /// The depot's byte limit; 0 where this upstream gets no slot (nothing is cached). Claims no
    /// slot: an upstream that has none yet reads the limit its depot would start with.
    pub fn depot_limit(&self) -> usize {
        self.slot.depot_limit()
    }

    /// Frees everything the depot holds to the upstream.
    pub fn release_depot(&self) {
        // A slot this upstream never had has a depot that never held anything: claim none.
        if let Some(d) = self.slot.existing_depot() {
            // The slot's own upstream: the only one its depot ever served.
            let _ = d.release(&self.slot.upstream());
        }
    }

    /// Returns the calling thread's cached blocks for this upstream (depot, then upstream).
    pub fn flush_thread(&self) {
        self.slot.flush_thread();
    }
}

impl Default for HetAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for HetAlloc {
    fn clone(&self) -> Self {
        HetAlloc { slot: self.slot.clone() }
    }
}

impl fmt::Debug for HetAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HetAlloc").field("upstream", &self.slot.upstream()).finish()
    }
}

// SAFETY: blocks are whole upstream blocks of at least the requested size and alignment (cached
// blocks are `16 << class` bytes, 16-aligned, and only serve requests that fit both); a block is
// handed out once until freed; `realloc` keeps the contents.
unsafe impl GlobalAlloc for HetAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.slot.alloc(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `GlobalAlloc`'s contract: `ptr` came from this allocator with `layout`.
        unsafe { self.slot.dealloc(NonNull::new_unchecked(ptr), layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.slot.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `GlobalAlloc`'s contract.
        unsafe { self.slot.realloc(NonNull::new_unchecked(ptr), layout, new_size) }
    }
}

fn dangling(layout: Layout) -> NonNull<[u8]> {
    // SAFETY: an alignment is never zero.
    let p = unsafe { NonNull::new_unchecked(layout.align() as *mut u8) };
    NonNull::slice_from_raw_parts(p, 0)
}

// SAFETY: as for `GlobalAlloc`; zero-sized requests get a dangling, aligned pointer that
// `deallocate` ignores; blocks can be freed through any clone (they share the caches).
unsafe impl Allocator for HetAlloc {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let p = NonNull::new(self.slot.alloc(layout)).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let p = NonNull::new(self.slot.alloc_zeroed(layout)).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: `Allocator`'s contract: `ptr` came from this allocator with `layout`.
            unsafe { self.slot.dealloc(ptr, layout) }
        }
    }

    unsafe fn grow(&self, ptr: NonNull<u8>, old: Layout, new: Layout) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: `Allocator`'s contract for `grow`.
        unsafe { self.resize(ptr, old, new) }
    }

    unsafe fn shrink(&self, ptr: NonNull<u8>, old: Layout, new: Layout) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: `Allocator`'s contract for `shrink`.
        unsafe { self.resize(ptr, old, new) }
    }
}

impl HetAlloc {
    /// `grow` and `shrink`: in place within a class, through `realloc` when the alignment stays.
    /// A move the CPU would copy fails over memory it cannot touch, as `realloc` does.
    ///
    /// # Safety
    /// `Allocator::grow`'s contract.
    unsafe fn resize(&self, ptr: NonNull<u8>, old: Layout, new: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 || new.size() == 0 || old.align() != new.align() {
            if old.size().min(new.size()) != 0 && !self.slot.upstream().host_accessible() {
                return Err(AllocError);
            }
            let fresh = self.allocate(new)?;
            // SAFETY: distinct blocks; `min` bytes are valid in both.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.cast::<u8>().as_ptr(), old.size().min(new.size()));
                self.deallocate(ptr, old);
            }
            return Ok(fresh);
        }
        // SAFETY: same alignment, non-zero sizes; the caller's contract covers the rest.
        let p = unsafe { self.slot.realloc(ptr, old, new.size()) };
        let p = NonNull::new(p).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::config::{configure_role, CacheConfig, ThreadRole};
    use crate::cache::size_class::MAX_BLOCK;
    use crate::cache::tls::{set_thread_config, set_thread_role, thread_config, thread_role};
    use crate::testing::CountingResource;
    use std::sync::{Mutex, OnceLock};

    /// One counting upstream for every test here (threads share caches per upstream), used by
    /// one test at a time.
    fn counted() -> (&'static CountingResource, HetAlloc, std::sync::MutexGuard<'static, ()>) {
        static RES: OnceLock<&'static CountingResource> = OnceLock::new();
        static SERIAL: Mutex<()> = Mutex::new(());
        let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let res = *RES.get_or_init(CountingResource::leak);
        (res, HetAlloc::with_resource(res), guard)
    }

    /// Returns everything cached anywhere for `a`'s upstream, so the resource's live blocks are
    /// exactly the blocks still in use.
    fn settle(a: &HetAlloc) {
        a.flush_thread();
        a.release_depot();
    }

    /// Runs `$body` (a closure) on a new thread once its caches started, then `$probe` (another)
    /// from thread-local destructors of that thread, at least once past its exit (once its caches
    /// were returned); returns, for each run of the probe, whether the caches were returned then
    /// and what the probe returned.
    ///
    /// Platforms destroy thread-locals in different orders: on Unix in reverse order of their
    /// registration in the thread, one registered meanwhile next; on Windows (and under wine)
    /// in reverse order of their first use in the process, in rounds, a value set during a round
    /// destroyed in the next. So no order is assumed: one probe is set before the caches' exit
    /// guard is registered and one after, and each that runs while the caches are live sets a
    /// value of a thread-local not used before (the statics are this expansion's own), which is
    /// destroyed later: after the guard, in the next round, on Windows; before it again on Unix,
    /// a few times, until the probe set first runs after the guard.
    macro_rules! probe_past_exit {
        ($body:expr, $probe:expr) => {{
            use core::cell::RefCell;
            use std::sync::atomic::{AtomicUsize, Ordering};
            use std::sync::{mpsc, Arc};
            type Run = Arc<dyn Fn(bool) + Send + Sync>;
            struct Probe {
                run: Run,
                chained: Arc<AtomicUsize>,
            }
            thread_local! {
                static BEFORE: RefCell<Option<Probe>> = const { RefCell::new(None) };
                static AFTER: RefCell<Option<Probe>> = const { RefCell::new(None) };
                static CHAINED_0: RefCell<Option<Probe>> = const { RefCell::new(None) };
                static CHAINED_1: RefCell<Option<Probe>> = const { RefCell::new(None) };
                static CHAINED_2: RefCell<Option<Probe>> = const { RefCell::new(None) };
                static CHAINED_3: RefCell<Option<Probe>> = const { RefCell::new(None) };
            }
            impl Drop for Probe {
                fn drop(&mut self) {
                    let past_exit = crate::cache::tls::thread_exited();
                    (self.run)(past_exit);
                    if past_exit {
                        return;
                    }
                    let chained = match self.chained.fetch_add(1, Ordering::Relaxed) {
                        0 => &CHAINED_0,
                        1 => &CHAINED_1,
                        2 => &CHAINED_2,
                        3 => &CHAINED_3,
                        _ => return,
                    };
                    let next = Probe { run: self.run.clone(), chained: self.chained.clone() };
                    // A value not used before, so nothing is replaced (and dropped) here.
                    let _ = chained.try_with(|c| *c.borrow_mut() = Some(next));
                }
            }
            let (tx, rx) = mpsc::channel();
            let probe = $probe;
            let run: Run = Arc::new(move |past_exit| tx.send((past_exit, probe())).unwrap());
            let chained = Arc::new(AtomicUsize::new(0));
            let body = $body;
            std::thread::spawn(move || {
                let probe = || Some(Probe { run: run.clone(), chained: chained.clone() });
                BEFORE.with(|l| *l.borrow_mut() = probe());
                // The thread's first request registers the exit guard.
                let _ = crate::cache::thread_config();
                body();
                AFTER.with(|l| *l.borrow_mut() = probe());
            })
            .join()
            .unwrap();
            let seen: Vec<_> = rx.try_iter().collect();
            assert!(seen.iter().any(|s| s.0), "no probe ran after the caches' exit guard: {seen:?}");
            seen
        }};
    }

    #[test]
    fn reading_or_emptying_a_fresh_depot_claims_no_slot() {
        let res: &'static dyn MemoryResource = CountingResource::leak();
        let a = HetAlloc::with_resource(res);
        assert_eq!(a.depot_stats(), CacheStats::default());
        let _ = a.depot_limit();
        a.release_depot();
        assert!(!a.slot.claimed(), "a read of the depot claimed one of the six resource slots");
    }

    fn l(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn a_thread_reuses_what_it_freed() {
        std::thread::spawn(|| {
            let a = HetAlloc::new();
            // SAFETY: non-zero layouts; each block freed once with its layout.
            unsafe {
                let p = a.alloc(l(48, 8));
                a.dealloc(p, l(48, 8));
                let q = a.alloc(l(40, 8));
                assert_eq!(p, q, "same class, same thread: the cached block");
                a.dealloc(q, l(40, 8));
            }
            let s = a.thread_stats();
            assert!(s.hits >= 1 && s.bytes_cached >= 64, "{s:?}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn threads_return_their_caches_when_they_exit() {
        let (res, a, _serial) = counted();
        settle(&a);
        let before = res.live_blocks();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..2000usize {
                        let layout = l(16 + (i * 37 + t * 101) % 9000, 8);
                        // SAFETY: non-zero layout.
                        let p = unsafe { a.alloc(layout) };
                        assert!(!p.is_null());
                        // SAFETY: a fresh block of at least this size.
                        unsafe { p.write_bytes(i as u8, layout.size()) };
                        if i % 3 == 0 {
                            kept.push((p as usize, layout));
                        } else {
                            // SAFETY: allocated above with `layout`.
                            unsafe { a.dealloc(p, layout) };
                        }
                    }
                    assert!(a.thread_stats().bytes_cached > 0);
                    kept
                })
            })
            .collect();
        // Blocks made on the other threads are freed here: cross-thread frees.
        for t in threads {
            for (p, layout) in t.join().unwrap() {
                // SAFETY: allocated by `a` (same upstream) with `layout`, handed over.
                unsafe { a.dealloc(p as *mut u8, layout) };
            }
        }
        settle(&a);
        assert_eq!(res.live_blocks(), before, "every block came back to the upstream exactly once");
        let s = a.stats();
        assert!(s.hits > 0 && s.bytes_returned > 0, "{s:?}");
    }

    /// Requests made after a thread's caches were returned (from a thread-local destructor that
    /// runs after the exit guard) go straight upstream: each is a miss, as a request passed
    /// through always is, so hits and misses still add up to the requests made.
    #[test]
    fn requests_after_a_thread_exited_count_as_misses() {
        let (res, a, _serial) = counted();
        let before = a.stats();
        let (first, late) = (a.clone(), a.clone());
        let seen = probe_past_exit!(
            // SAFETY: a non-zero layout, freed once with it.
            move || unsafe { first.dealloc(first.alloc(l(48, 8)), l(48, 8)) },
            move || {
                for size in [48, MAX_BLOCK + 1] {
                    // SAFETY: a non-zero layout, freed once with it.
                    unsafe {
                        let p = late.alloc(l(size, 8));
                        assert!(!p.is_null());
                        late.dealloc(p, l(size, 8));
                    }
                }
            }
        );
        settle(&a);
        let after = a.stats();
        let requests = (after.hits + after.misses) - (before.hits + before.misses);
        let probes = seen.len() as u64;
        assert_eq!(requests, 1 + 2 * probes, "one request on the live thread, two per probe: {before:?} {after:?}");
        let past_exit = seen.iter().filter(|s| s.0).count() as u64;
        let misses = after.misses - before.misses;
        assert!(misses >= 2 * past_exit, "{past_exit} probes past the exit, {misses} misses");
        let returned = after.bytes_returned - before.bytes_returned;
        assert!(returned >= 64 + (MAX_BLOCK + 1) as u64, "{before:?} {after:?}");
        assert_eq!(res.live_blocks(), 0);
    }

    /// After a thread's caches were returned at its exit, they cache nothing (every request goes
    /// straight upstream): the limits a later thread-local destructor reads back say so.
    #[test]
    fn a_thread_past_its_exit_reads_back_limits_that_cache_nothing() {
        let seen = probe_past_exit!(|| (), thread_config);
        for &(past_exit, config) in &seen {
            let want = if past_exit { CacheConfig::disabled() } else { CacheConfig::for_role(ThreadRole::Worker) };
            assert_eq!(config, want, "past the exit: {past_exit}");
        }
    }

    /// Past a thread's exit its role reads as it was (the last one set), on every platform: on
    /// Windows the thread's state is freed at its exit, and the role read back was the default.
    #[test]
    fn a_thread_past_its_exit_reads_back_its_last_role() {
        let role = ThreadRole::Custom(0xE817);
        let seen = probe_past_exit!(move || set_thread_role(role).unwrap(), thread_role);
        assert!(seen.iter().all(|s| s.1 == role), "{seen:?}");
    }

    /// A thread whose caches were returned at its exit has none to give limits to: setting its
    /// role or its own limits then (from a later thread-local destructor) is refused, not
    /// silently dropped.
    #[test]
    fn settings_made_past_a_threads_exit_are_refused() {
        let seen = probe_past_exit!(|| (), || {
            let frames = crate::cache::frame::RecyclingFrameAllocator::new();
            [
                set_thread_role(ThreadRole::Scheduler).is_err(),
                set_thread_config(None).is_err(),
                frames.set_thread_config(None).is_err(),
            ]
        });
        for &(past_exit, refused) in &seen {
            assert_eq!(refused, [past_exit; 3], "refused exactly past the exit: {seen:?}");
        }
    }

    #[test]
    fn allocations_out_of_memory_are_null_and_the_cache_recovers() {
        let (res, a, _serial) = counted();
        std::thread::spawn(move || {
            res.set_failing(true);
            // SAFETY: non-zero layouts.
            let p = unsafe { a.alloc(l(100, 8)) };
            let big = unsafe { a.alloc(l(4 << 20, 8)) };
            res.set_failing(false);
            assert!(p.is_null() && big.is_null());
            // SAFETY: as above; freed with its layout.
            unsafe {
                let q = a.alloc(l(100, 8));
                assert!(!q.is_null());
                a.dealloc(q, l(100, 8));
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn realloc_stays_in_place_within_a_class_and_keeps_contents() {
        let a = HetAlloc::new();
        // SAFETY: every pointer is used with the layout it currently has.
        unsafe {
            let p = a.alloc(l(40, 8));
            p.write_bytes(7, 40);
            let q = a.realloc(p, l(40, 8), 64);
            assert_eq!(p, q);
            let r = a.realloc(q, l(64, 8), 5000);
            assert!((0..40).all(|i| *r.add(i) == 7));
            let big = a.realloc(r, l(5000, 8), 3 << 20);
            assert!((0..40).all(|i| *big.add(i) == 7));
            let bigger = a.realloc(big, l(3 << 20, 8), 5 << 20);
            assert!((0..40).all(|i| *bigger.add(i) == 7));
            let small = a.realloc(bigger, l(5 << 20, 8), 24);
            assert!((0..24).all(|i| *small.add(i) == 7));
            a.dealloc(small, l(24, 8));
        }
    }

    /// A resize of a block passed through (too big or too strictly aligned to cache) is a request
    /// passed on to the upstream, as the allocation and the free it stands for would be: a miss,
    /// a block asked of the upstream, and the old block's bytes given back. The statistics then
    /// agree with what the upstream saw.
    #[test]
    fn resizes_passed_through_are_counted_as_the_upstream_saw_them() {
        let (res, a, _serial) = counted();
        std::thread::spawn(move || {
            let (before, taken) = (a.stats(), res.allocations());
            let (big, bigger) = (l(2 << 20, 8), l(3 << 20, 8));
            let aligned = l(100, 64);
            // SAFETY: every block is used with the layout it has now and freed once.
            unsafe {
                let p = a.alloc(big);
                let q = a.realloc(p, big, bigger.size());
                assert!(!q.is_null());
                a.dealloc(q, bigger);
                let p = Allocator::allocate(&a, aligned).unwrap().cast::<u8>();
                let q = Allocator::grow(&a, p, aligned, l(5000, 64)).unwrap().cast::<u8>();
                Allocator::deallocate(&a, q, l(5000, 64));
            }
            let after = a.stats();
            assert_eq!(
                after.upstream_allocations - before.upstream_allocations,
                res.allocations() - taken,
                "every block the upstream handed out is counted: {before:?} {after:?}"
            );
            assert_eq!(after.misses - before.misses, 4, "two requests and two resizes passed on: {after:?}");
            let freed = big.size() + bigger.size() + aligned.size() + 5000;
            assert_eq!(after.bytes_returned - before.bytes_returned, freed as u64, "{before:?} {after:?}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn zeroed_memory_is_zero_even_when_recycled() {
        std::thread::spawn(|| {
            let a = HetAlloc::new();
            // SAFETY: non-zero layouts, each freed once.
            unsafe {
                let p = a.alloc(l(200, 8));
                p.write_bytes(0xAB, 200);
                a.dealloc(p, l(200, 8));
                let z = a.alloc_zeroed(l(200, 8));
                assert_eq!(z, p);
                assert!((0..200).all(|i| *z.add(i) == 0));
                a.dealloc(z, l(200, 8));
                let big = a.alloc_zeroed(l(2 << 20, 8));
                assert!((0..2 << 20).step_by(4096).all(|i| *big.add(i) == 0));
                a.dealloc(big, l(2 << 20, 8));
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn std_style_containers_use_it() {
        let (res, a, _serial) = counted();
        settle(&a);
        let before = res.live_blocks();
        {
            let mut v: allocator_api2::vec::Vec<u64, HetAlloc> = allocator_api2::vec::Vec::new_in(a.clone());
            v.extend(0..10_000u64);
            assert_eq!(v.iter().sum::<u64>(), 49_995_000);
            let mut m = hashbrown::HashMap::with_hasher_in(std::collections::hash_map::RandomState::new(), a.clone());
            for i in 0..5000u32 {
                m.insert(i, i * 2);
            }
            assert_eq!(m.get(&4999), Some(&9998));
            let empty: allocator_api2::vec::Vec<u8, HetAlloc> =
                allocator_api2::vec::Vec::with_capacity_in(0, a.clone());
            assert!(empty.is_empty());
            let b = allocator_api2::boxed::Box::new_in([1u8; 3000], a.clone());
            assert_eq!(b[2999], 1);
        }
        settle(&a);
        assert_eq!(res.live_blocks(), before);
    }

    #[test]
    fn roles_pick_the_limits() {
        std::thread::spawn(|| {
            assert_eq!(thread_role(), ThreadRole::Worker);
            assert_eq!(thread_config(), CacheConfig::for_role(ThreadRole::Worker));
            set_thread_role(ThreadRole::Scheduler).unwrap();
            assert_eq!(thread_role(), ThreadRole::Scheduler);
            assert_eq!(thread_config(), CacheConfig::for_role(ThreadRole::Scheduler));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_custom_role_or_thread_config_applies_at_once_and_trims() {
        let (res, a, _serial) = counted();
        let role = ThreadRole::Custom(0xCAFE);
        std::thread::spawn(move || {
            set_thread_role(role).unwrap();
            let layout = l(4096, 16);
            let blocks: Vec<_> = (0..16).map(|_| unsafe { a.alloc(layout) }).collect();
            for &p in &blocks {
                // SAFETY: from `a.alloc(layout)`.
                unsafe { a.dealloc(p, layout) };
            }
            let class = crate::cache::class_of(layout).unwrap();
            assert_eq!(a.thread_stats().bytes_cached, 16 * 4096);
            let tight = CacheConfig::uniform(13, 0).unwrap().with_bucket_limit(class, 2 * 4096).unwrap();
            configure_role(role, tight).unwrap();
            assert_eq!(thread_config(), tight);
            assert_eq!(a.thread_stats().bytes_cached, 2 * 4096, "trimmed at once");
            set_thread_config(Some(CacheConfig::disabled())).unwrap();
            assert_eq!(a.thread_stats().bytes_cached, 0);
            let live = res.live_blocks();
            // SAFETY: non-zero layout, freed once.
            unsafe {
                let p = a.alloc(layout);
                a.dealloc(p, layout);
            }
            assert_eq!(res.live_blocks(), live, "a disabled cache keeps nothing");
            set_thread_config(None).unwrap();
            assert_eq!(thread_config(), tight);
        })
        .join()
        .unwrap();
    }

    /// A "device" resource whose blocks are host memory filled with 0xDE, so a test can see
    /// whether the CPU wrote into them.
    struct FakeDevice;

    // SAFETY: blocks from the global allocator with the layout asked for, freed with it.
    unsafe impl MemoryResource for FakeDevice {
        fn name(&self) -> &str {
            "fake device"
        }
        fn kind(&self) -> crate::MemoryKind {
            crate::MemoryKind::Device
        }
        fn allocate(&self, size: usize, align: usize) -> crate::error::Result<NonNull<u8>> {
            // SAFETY: the caches never ask for zero bytes.
            let p = NonNull::new(unsafe { std::alloc::alloc(l(size, align)) }).unwrap();
            // SAFETY: a fresh block of `size` bytes (this test's stand-in for device memory).
            unsafe { p.as_ptr().write_bytes(0xDE, size) };
            Ok(p)
        }
        unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), l(size, align)) }
        }
    }

    /// Device memory passes through uncached, and the CPU never touches it: requests that would
    /// need the CPU to write into a block (zeroing, moving on a resize) fail as the upstream's
    /// own zeroing does, whatever the size.
    #[test]
    fn the_cpu_never_writes_into_device_memory() {
        static DEVICE: FakeDevice = FakeDevice;
        let a = HetAlloc::with_resource(&DEVICE);
        let untouched = |p: *mut u8, n: usize| (0..n).all(|i| unsafe { *p.add(i) } == 0xDE);
        // SAFETY: non-zero layouts; every block freed once with the layout it has.
        unsafe {
            for size in [64, 4 << 20] {
                assert!(a.alloc_zeroed(l(size, 8)).is_null(), "{size} bytes zeroed by the CPU");
            }
            assert!(Allocator::allocate_zeroed(&a, l(64, 8)).is_err());
            let p = a.alloc(l(64, 8));
            assert!(!p.is_null() && untouched(p, 64));
            for new_size in [5000, 4 << 20] {
                assert!(a.realloc(p, l(64, 8), new_size).is_null(), "moved to {new_size} bytes by the CPU");
                assert!(untouched(p, 64), "the old block is left as it was");
            }
            let big = a.alloc(l(2 << 20, 8));
            assert!(!big.is_null());
            assert!(a.realloc(big, l(2 << 20, 8), 3 << 20).is_null());
            assert!(a.realloc(big, l(2 << 20, 8), 100).is_null());
            a.dealloc(big, l(2 << 20, 8));
            let same_class = a.realloc(p, l(64, 8), 60);
            assert_eq!(same_class, p, "within a class nothing moves");
            a.dealloc(p, l(60, 8));
        }
    }

    /// Through `Allocator`, a grow or shrink that changes the alignment moves the block too: over
    /// device memory it fails (the CPU would copy it), leaving the block as it was.
    #[test]
    fn allocator_resizes_across_alignments_never_copy_device_memory() {
        static DEVICE: FakeDevice = FakeDevice;
        let a = HetAlloc::with_resource(&DEVICE);
        let p = Allocator::allocate(&a, l(64, 8)).unwrap().cast::<u8>();
        // SAFETY: `p` is live with `l(64, 8)`; each new layout is at least as large (grow) or at
        // most as large (shrink); on failure the block stays live with its old layout.
        unsafe {
            assert!(Allocator::grow(&a, p, l(64, 8), l(128, 32)).is_err(), "grown by a CPU copy");
            assert!(Allocator::shrink(&a, p, l(64, 8), l(32, 4)).is_err(), "shrunk by a CPU copy");
            assert!((0..64).all(|i| *p.as_ptr().add(i) == 0xDE), "the block is left as it was");
            // Nothing to copy: a zero-sized block may move.
            let z = Allocator::allocate(&a, l(0, 8)).unwrap().cast::<u8>();
            let g = Allocator::grow(&a, z, l(0, 8), l(64, 32)).unwrap().cast::<u8>();
            Allocator::deallocate(&a, g, l(64, 32));
            Allocator::deallocate(&a, p, l(64, 8));
        }
    }
}
