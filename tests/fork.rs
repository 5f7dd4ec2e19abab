//! A process that uses a shared-memory allocator and then calls `fork()`: the child is another
//! process, with a slot (or heap) of its own and its own process stamp, so the two may allocate
//! at once, and a child that dies is recovered without touching its parent's blocks.
//!
//! The test binary re-executes itself with `HETMEM_CHILD` set: that process (the *forker*)
//! allocates, forks, and checks; the test process checks the segment after the forker exits.
//! A last test forks the test process itself: a `BackendResource` over shared memory refuses
//! a forked child.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use hetmem::allocators::ThreadLocalAllocator;
use hetmem::prelude::*;

mod common;
use common::{Recover, Rng};
#[path = "../core/src/forked_child.rs"]
mod forked_child;
use forked_child::in_a_forked_child;

const ID: AllocatorId = AllocatorId::new(1, 0);
/// Blocks the forked child leaves live when it dies.
const LEFT: usize = 48;

/// Fills a block with `owner`, its size in the first 8 bytes.
fn stamp(base: *mut u8, p: OffsetPtr, size: usize, owner: u8) {
    // SAFETY: a live block of `size` >= 16 bytes in the mapped segment.
    unsafe {
        let b = base.add(p.get() as usize);
        std::ptr::write_bytes(b, owner, size);
        b.cast::<u64>().write_unaligned(size as u64);
    }
}

/// Checks a block `stamp` wrote for `owner`.
fn verify(base: *mut u8, p: OffsetPtr, owner: u8) {
    // SAFETY: a live block written by `stamp`.
    unsafe {
        let b = base.add(p.get() as usize);
        let size = b.cast::<u64>().read_unaligned() as usize;
        let body = std::slice::from_raw_parts(b.add(8), size - 8);
        assert!(body.iter().all(|&x| x == owner), "block of owner {owner} damaged");
    }
}

/// Random allocations and frees, every block checked before it is freed; returns what is live.
fn churn(a: &dyn RegionAllocator, base: *mut u8, owner: u8, seed: u64, ops: usize) -> Vec<OffsetPtr> {
    let mut rng = Rng(seed);
    let mut live = Vec::new();
    for _ in 0..ops {
        let r = rng.next();
        if live.len() < 64 && (r % 3 != 0 || live.is_empty()) {
            // Mostly small blocks, some above the size classes, some over-aligned.
            let size =
                if r % 50 == 0 { 100_000 + (r >> 40) as usize % 200_000 } else { 16 + (r >> 20) as usize % 3000 };
            let align = if r % 7 == 0 { 256 } else { 8 };
            let p = a.allocate(size, align).expect("allocate");
            stamp(base, p, size, owner);
            live.push(p);
        } else {
            let p = live.swap_remove((r >> 8) as usize % live.len());
            verify(base, p, owner);
            a.free(p).expect("free");
        }
    }
    live
}

/// The forker: allocates (so its thread holds a slot), forks, and both sides churn at once.
/// The forked child then leaves `LEFT` blocks live and dies; the forker recovers it and checks
/// that exactly the child's blocks were freed.
fn forker<A: Recover>(seg: &str) -> ! {
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::attach(seg, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.attach_allocator::<A>(b.id(), ID).unwrap();
    let base = b.base();
    let mine = churn(&*a, base, 5, 11, 2000);
    // Where the child reports its live blocks.
    let mailbox = a.allocate(8 * (LEFT + 1), 8).unwrap();
    // SAFETY: a live block of LEFT + 1 words.
    let words = unsafe { std::slice::from_raw_parts(base.add(mailbox.get() as usize).cast::<AtomicU64>(), LEFT + 1) };
    words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    // SAFETY: fork(2); the child runs only this function's code and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let left = churn(&*a, base, 6, 22, 20_000);
            for p in left {
                a.free(p).unwrap();
            }
            for (i, w) in words[..LEFT].iter().enumerate() {
                // One block above the size classes, one over-aligned (both record an owner
                // stamp), the rest small.
                let (size, align) = match i {
                    0 => (300_000, 8),
                    1 => (500, 256),
                    _ => (16 + i * 37, 8),
                };
                let p = a.allocate(size, align).unwrap();
                stamp(base, p, size, 6);
                w.store(p.get(), Ordering::Release);
            }
            words[LEFT].store(1, Ordering::Release);
        }));
        // Dies with its blocks live and its slot held: nothing runs at `_exit`.
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(if ok.is_ok() { 0 } else { 1 }) };
    }
    let more = churn(&*a, base, 5, 33, 20_000);
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the forked child failed: {status:#x}");
    assert_eq!(words[LEFT].load(Ordering::Acquire), 1, "the forked child did not finish");
    let left: Vec<OffsetPtr> = words[..LEFT].iter().map(|w| OffsetPtr::new(w.load(Ordering::Acquire))).collect();
    for &p in &left {
        verify(base, p, 6);
    }
    // The child is dead: recovery frees its blocks and none of ours.
    a.recover();
    for &p in &left {
        assert!(a.size_of(p).is_err(), "a dead child's block at {} is still live", p.get());
    }
    for &p in mine.iter().chain(&more) {
        verify(base, p, 5);
        a.free(p).unwrap();
    }
    a.free(mailbox).unwrap();
    a.check().unwrap();
    std::process::exit(0);
}

fn forked<A: Recover>(test: &str, tag: &str, config: A::Config) {
    if let Ok(seg) = std::env::var("HETMEM_CHILD") {
        forker::<A>(&seg);
    }
    let seg = format!("/hetmem-fork-{tag}-{}", std::process::id());
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::create(&seg, 64 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.create_allocator::<A>(b.id(), ID, 0, &config).unwrap();
    let start = a.stats().free_bytes();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("HETMEM_CHILD", &seg)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the forker failed: {status}");
    a.recover();
    a.check().unwrap();
    let end = a.stats();
    assert_eq!((end.live_allocations, end.bytes_in_use), (0, 0), "blocks left live");
    assert_eq!(end.free_bytes(), start, "the segment's free space came back");
}

#[test]
fn scalable_page_after_fork() {
    forked::<ScalablePageAllocator>(
        "scalable_page_after_fork",
        "spa",
        ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Free },
    );
}

#[test]
fn thread_local_after_fork() {
    forked::<ThreadLocalAllocator>(
        "thread_local_after_fork",
        "tla",
        ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free },
    );
}

/// A resource's bookkeeping is the process's own: over shared memory, a forked child's copy
/// refuses to allocate (it would hand out its parent's blocks); over private memory it is the
/// child's own copy of everything, and serves.
#[test]
fn a_backend_resource_over_shared_memory_refuses_a_forked_child() {
    use hetmem::pool::BackendResource;
    use hetmem::MemoryResource;
    use std::sync::Arc;
    let seg = format!("/hetmem-fork-res-{}", std::process::id());
    let shared = BackendResource::reserve(
        Arc::new(PosixShmBackend::create(&seg, 1 << 20, &ShmOptions::default()).unwrap()),
        AllocatorId::new(9, 0),
        0,
    )
    .unwrap();
    let private = BackendResource::reserve(
        Arc::new(MallocBackend::create(1 << 20, BackendId(7)).unwrap()),
        AllocatorId::new(9, 0),
        0,
    )
    .unwrap();
    let (a, b) = (shared.allocate(256, 64).unwrap(), private.allocate(256, 64).unwrap());
    assert!(in_a_forked_child(|| matches!(shared.allocate(256, 64), Err(Error::Unsupported(_)))));
    assert!(in_a_forked_child(|| private.allocate(256, 64).is_ok()));
    // The parent's resources serve on.
    for (r, p) in [(&shared, a), (&private, b)] {
        let q = r.allocate(256, 64).unwrap();
        // SAFETY: blocks this resource handed out, freed once.
        unsafe {
            r.deallocate(p, 256, 64);
            r.deallocate(q, 256, 64);
        }
        r.check().unwrap();
    }
}

/// The thread caches (`HetAlloc`, here called directly rather than as the global allocator)
/// while other threads pass batches through the depot: a fork must not leave the child a depot
/// lock that one of them held (it would wait for ever on its first refill of that class).
#[test]
fn the_thread_caches_serve_a_child_forked_while_other_threads_use_them() {
    use hetmem::cache::HetAlloc;
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    static CACHES: HetAlloc = HetAlloc::new();
    // 16 KiB blocks: a depot batch holds two, so the depot's lock is taken every other request.
    let layout = Layout::from_size_align(16 << 10, 16).unwrap();
    let churn = move |n: usize| {
        // SAFETY: blocks of `layout` from the caches, each freed once with it.
        unsafe {
            let blocks: Vec<*mut u8> = (0..n).map(|_| CACHES.alloc(layout)).collect();
            assert!(blocks.iter().all(|b| !b.is_null()));
            blocks.into_iter().for_each(|b| CACHES.dealloc(b, layout));
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    churn(40);
                }
            })
        })
        .collect();
    churn(40);
    let hung = (0..300).filter(|_| {
        !in_a_forked_child(|| {
            churn(200);
            true
        })
    });
    let hung = hung.count();
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(hung, 0, "forked children that hung or failed");
}

/// A resource over a new shared segment `/hetmem-fork-TAG-PID` of `size` bytes, and the name.
/// The resource is leaked, for the `'static` the caches and pools over it need, so its backend
/// never drops: the test removes the name itself at its end.
fn leaked_shared_resource(tag: &str, size: usize) -> (&'static hetmem::pool::BackendResource, String) {
    let seg = format!("/hetmem-fork-{tag}-{}", std::process::id());
    let backend = std::sync::Arc::new(PosixShmBackend::create(&seg, size, &ShmOptions::default()).unwrap());
    let resource = hetmem::pool::BackendResource::reserve(backend, AllocatorId::new(9, 0), 0).unwrap();
    (Box::leak(Box::new(resource)), seg)
}

/// Caches over a resource in shared memory: a forked child must not hand out the blocks its
/// parent's caches held (the parent may hand them out too); it gets none (the resource refuses
/// a forked child) rather than a cached one.
#[test]
fn caches_over_shared_memory_hand_a_forked_child_no_cached_block() {
    use hetmem::cache::HetAlloc;
    use std::alloc::{GlobalAlloc, Layout};
    let (resource, seg) = leaked_shared_resource("caches", 8 << 20);
    let caches = HetAlloc::with_resource(resource);
    let layout = Layout::from_size_align(256, 16).unwrap();
    // SAFETY: blocks of `layout` from the caches, each freed once with it; freed, they stay
    // cached in this thread (and the depot).
    unsafe {
        let blocks: Vec<*mut u8> = (0..64).map(|_| caches.alloc(layout)).collect();
        assert!(blocks.iter().all(|b| !b.is_null()));
        blocks.into_iter().for_each(|b| caches.dealloc(b, layout));
    }
    assert!(caches.thread_stats().bytes_cached > 0, "nothing cached to test with");
    // SAFETY: as above.
    assert!(in_a_forked_child(|| unsafe { caches.alloc(layout) }.is_null()));
    // The parent's caches serve on.
    // SAFETY: as above.
    unsafe {
        let b = caches.alloc(layout);
        assert!(!b.is_null());
        caches.dealloc(b, layout);
    }
    // The resource is leaked (the caches need it for 'static), so its backend never drops: the
    // name goes here, the mapping with the process.
    PosixShmBackend::remove(&seg).unwrap();
}

/// A thread cache and a depot made by hand over a resource in shared memory (no fork handler
/// knows them): a forked child must not hand out the blocks they held before the fork (the
/// parent hands them out too). Each drops them at its first call in the child, and the child
/// gets none (the resource refuses a forked child) rather than a cached one. The parent's cache
/// serves on.
#[test]
fn a_hand_made_cache_and_depot_over_shared_memory_hand_a_forked_child_no_cached_block() {
    use hetmem::cache::{CacheConfig, Depot, ThreadCache, Upstream};
    use std::alloc::Layout;
    let (resource, seg) = leaked_shared_resource("handmade", 8 << 20);
    let depot: &'static Depot = Box::leak(Box::new(Depot::new(4 << 20)));
    let upstream = Upstream::Resource(resource);
    let config = CacheConfig::uniform(hetmem::cache::MAX_BUCKETS, 16 << 10).unwrap();
    let mut cache = ThreadCache::with_depot(&config, upstream, depot).unwrap();
    let layout = Layout::from_size_align(256, 16).unwrap();
    let blocks: Vec<_> = (0..512).map(|_| cache.allocate(layout).unwrap()).collect();
    for &b in &blocks {
        // SAFETY: from `allocate(layout)` on this cache, freed once.
        unsafe { cache.deallocate(b, layout) };
    }
    assert!(cache.bytes_cached() > 0 && depot.stats().bytes_cached > 0, "nothing cached to test with");
    assert!(in_a_forked_child(|| {
        let mut other = ThreadCache::with_depot(&config, upstream, depot).unwrap();
        // The depot drops its batches at the child's first request of it ...
        let from_depot = other.allocate(layout).is_err() && depot.stats().bytes_cached == 0;
        // ... and the cache its blocks at the child's first call.
        from_depot && cache.allocate(layout).is_err() && cache.bytes_cached() == 0
    }));
    let again = cache.allocate(layout).unwrap();
    assert!(blocks.contains(&again), "the parent's cache still serves from what it held");
    // SAFETY: as above.
    unsafe { cache.deallocate(again, layout) };
    cache.check().unwrap();
    depot.check().unwrap();
    cache.flush();
    depot.release(&upstream).unwrap();
    // The resource is leaked (the depot needs it for 'static): the name goes here.
    PosixShmBackend::remove(&seg).unwrap();
}

/// `check()` as the first call of a thread cache made by hand in a forked child walks none of
/// the blocks it held before the fork: over shared memory the parent hands them out and writes
/// into them, so their first words are no longer links for the child's cache to follow (a walk
/// would read wherever the parent's data points).
#[test]
fn a_hand_made_caches_check_in_a_forked_child_follows_no_link_from_before_the_fork() {
    use hetmem::cache::{CacheConfig, ThreadCache, Upstream};
    use std::alloc::Layout;
    let (resource, seg) = leaked_shared_resource("check", 4 << 20);
    let config = CacheConfig::uniform(hetmem::cache::MAX_BUCKETS, 16 << 10).unwrap();
    let mut cache = ThreadCache::new(&config, Upstream::Resource(resource)).unwrap();
    let layout = Layout::from_size_align(256, 16).unwrap();
    let blocks: Vec<_> = (0..8).map(|_| cache.allocate(layout).unwrap()).collect();
    for &b in &blocks {
        // SAFETY: from `allocate(layout)` on this cache, freed once.
        unsafe { cache.deallocate(b, layout) };
    }
    assert!(cache.bytes_cached() >= 8 * 256, "nothing cached to test with");
    let first_words = |write: Option<&[u64]>| -> Vec<u64> {
        let mut old = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            let w = b.as_ptr().cast::<u64>();
            // SAFETY: a block of 256 bytes in the mapped segment, cached (no one reads it as data
            // meanwhile: the parent waits for the child).
            unsafe {
                old.push(w.read());
                if let Some(values) = write {
                    w.write(values[i]);
                }
            }
        }
        old
    };
    assert!(in_a_forked_child(|| {
        // The parent's use of the blocks, as the child sees it: their first words hold its data.
        let saved = first_words(Some(&[0; 8]));
        let ok = cache.check().is_ok() && cache.bytes_cached() == 0;
        // Put back for the parent, which still holds the blocks in its cache.
        first_words(Some(&saved));
        ok
    }));
    cache.check().unwrap();
    cache.flush();
    PosixShmBackend::remove(&seg).unwrap();
}

/// The thread-local caches are the fork handlers' to see to, not their own: a thread started in
/// a forked child keeps what its cache holds through `check_thread`, which walks it.
#[test]
fn a_thread_started_in_a_forked_child_keeps_its_cached_blocks_through_a_check() {
    use hetmem::cache::HetAlloc;
    use std::alloc::{GlobalAlloc, Layout};
    static CACHES: HetAlloc = HetAlloc::new();
    let layout = Layout::from_size_align(256, 16).unwrap();
    // Forks are counted from here on (run alone, the test would otherwise fork uncounted).
    hetmem::core::fork::watch().unwrap();
    assert!(in_a_forked_child(|| {
        std::thread::spawn(move || {
            // SAFETY: blocks of `layout` from the caches, each freed once with it.
            unsafe {
                let blocks: Vec<*mut u8> = (0..8).map(|_| CACHES.alloc(layout)).collect();
                blocks.into_iter().for_each(|b| CACHES.dealloc(b, layout));
            }
            let cached = CACHES.thread_stats().bytes_cached;
            cached > 0 && CACHES.check_thread().is_ok() && CACHES.thread_stats().bytes_cached == cached
        })
        .join()
        .unwrap_or(false)
    }));
}

/// A typed pool over a resource in shared memory: a forked child must not hand out the blocks
/// its parent's pool cached (the parent hands them out too); it drops them, and gets none (the
/// resource refuses a forked child) rather than a cached one. The parent's pool serves on.
#[test]
fn a_typed_pool_over_shared_memory_hands_a_forked_child_no_cached_block() {
    use hetmem::cache::{PoolAllocator, Upstream};
    let (resource, seg) = leaked_shared_resource("pool", 1 << 20);
    let pool = PoolAllocator::<[u64; 8]>::with_upstream(16, Upstream::Resource(resource));
    let blocks: Vec<_> = (0..8).map(|_| pool.allocate().unwrap()).collect();
    for &b in &blocks {
        // SAFETY: from `allocate`, no value written, freed once.
        unsafe { pool.deallocate(b) };
    }
    assert_eq!(pool.cached(), 8);
    assert!(in_a_forked_child(|| pool.allocate().is_err() && pool.cached() == 0));
    let again = pool.allocate().unwrap();
    assert!(blocks.contains(&again), "the parent's pool still serves from its cache");
    // SAFETY: as above.
    unsafe { pool.deallocate(again) };
    assert_eq!(pool.cached(), 8);
    pool.check().unwrap();
    // The resource is leaked (the pool needs it for 'static): the name goes here.
    PosixShmBackend::remove(&seg).unwrap();
}
