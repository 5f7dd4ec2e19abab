//! The pools' own bookkeeping (block records, address table, chunk table, sub-pool bitmaps) lives
//! in host memory. This binary's global allocator can be told to refuse every request; a pool
//! that then needs more bookkeeping reports `OutOfMemory`, gives back any upstream block it took
//! for the request, and stays usable: once host memory returns it serves again, and after all
//! frees it is back where it started. (Before, the host allocator's refusal aborted the process.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use hetmem_core::pool::{FixedPool, FixedPoolConfig, NeverCoalesce, QuickPool, QuickPoolConfig};
use hetmem_core::{Error, MemoryKind, MemoryResource};

/// The system allocator, refusing everything while `REFUSE` is set.
struct Refusing;

static REFUSE: AtomicBool = AtomicBool::new(false);

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer, which
// `GlobalAlloc` allows for any request.
unsafe impl GlobalAlloc for Refusing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if REFUSE.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if REFUSE.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if REFUSE.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static A: Refusing = Refusing;

/// Device memory stand-in: addresses from a counter (never dereferenced), live blocks and
/// requests counted.
struct FakeDevice {
    next: AtomicUsize,
    live: AtomicI64,
    requests: AtomicUsize,
}

impl FakeDevice {
    fn new(first: usize) -> FakeDevice {
        FakeDevice { next: AtomicUsize::new(first), live: AtomicI64::new(0), requests: AtomicUsize::new(0) }
    }
}

// SAFETY: "device" blocks the CPU is never told it may touch: disjoint address ranges, never
// reused.
unsafe impl MemoryResource for FakeDevice {
    fn name(&self) -> &str {
        "fake device"
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Device
    }
    fn allocate(&self, size: usize, align: usize) -> hetmem_core::Result<NonNull<u8>> {
        hetmem_core::check_layout(size, align)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let stride = size.next_multiple_of(4096).max(align) + 4096;
        let addr = self.next.fetch_add(stride.next_multiple_of(align), Ordering::Relaxed).next_multiple_of(align);
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(NonNull::new(std::ptr::without_provenance_mut(addr)).unwrap())
    }
    unsafe fn deallocate(&self, _: NonNull<u8>, _: usize, _: usize) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `f` with the host allocator refusing everything.
fn refusing<T>(f: impl FnOnce() -> T) -> T {
    REFUSE.store(true, Ordering::Relaxed);
    let out = f();
    REFUSE.store(false, Ordering::Relaxed);
    out
}

fn host_oom<T>(r: hetmem_core::Result<T>) -> bool {
    matches!(r, Err(Error::OutOfMemory { available: 0, .. }))
}

/// One test function: the allocator switch is process-wide, so nothing may run beside it.
#[test]
fn pools_report_host_out_of_memory_and_stay_usable() {
    quick_pool();
    quick_pool_chunk_table();
    fixed_pool();
    giving_back_allocates_nothing();
}

fn quick_pool() {
    let device = FakeDevice::new(1 << 40);
    let config = QuickPoolConfig { first_block_size: 1 << 20, next_block_size: 1 << 20, alignment: 16, max_size: None };
    // Even the pool's own index is refused: an error, not an abort.
    assert!(host_oom(refusing(|| QuickPool::with_config(&device, config))));
    let mut pool = QuickPool::with_config(&device, config).unwrap();

    // The first request needs the chunk table: refused before upstream is asked (a device
    // allocation taken only to be handed back is no use to anyone), so the figures say that no
    // upstream block was taken and that upstream refused nothing.
    assert!(host_oom(refusing(|| pool.allocate(64, 16))));
    assert_eq!(device.requests.load(Ordering::Relaxed), 0, "upstream was asked for a block");
    assert_eq!(device.live.load(Ordering::Relaxed), 0, "the upstream block was not handed back");
    let s = pool.stats();
    assert_eq!((s.actual_size, s.upstream_allocations, s.upstream_failures), (0, 0, 0));
    pool.check().unwrap();
    let start = pool.stats();

    // Fill until a request needs a larger record or address table while the host refuses.
    let mut live = Vec::new();
    let mut refused = 0;
    for i in 0..10_000 {
        let before = pool.stats();
        match refusing(|| pool.allocate(64 + i % 7 * 16, 16)) {
            Ok(p) => live.push(p),
            Err(e) => {
                assert!(matches!(e, Error::OutOfMemory { available: 0, .. }), "{e}");
                assert_eq!(pool.stats().allocation_count, before.allocation_count);
                assert_eq!(pool.stats().current_size, before.current_size);
                pool.check().unwrap();
                refused += 1;
                // Host memory is back: the same request is served.
                live.push(pool.allocate(64 + i % 7 * 16, 16).unwrap());
            }
        }
        if refused >= 3 {
            break;
        }
    }
    assert!(refused >= 3, "the tables never had to grow");
    // Requests past the first block each need a new chunk; with the host refusing, the chunk
    // table soon has to grow. That request is an error, and its upstream block goes back.
    let mut chunk_refused = false;
    for _ in 0..64 {
        let (before, requests) = (pool.stats(), device.requests.load(Ordering::Relaxed));
        let r = refusing(|| pool.allocate(4 << 20, 16));
        assert_eq!(device.live.load(Ordering::Relaxed) as usize, pool.stats().upstream_blocks);
        match r {
            Ok(p) => live.push(p),
            Err(e) => {
                assert!(matches!(e, Error::OutOfMemory { available: 0, .. }), "{e}");
                assert_eq!(device.requests.load(Ordering::Relaxed), requests, "upstream was asked for a block");
                let after = pool.stats();
                assert_eq!(
                    (after.upstream_allocations, after.upstream_failures),
                    (before.upstream_allocations, before.upstream_failures)
                );
                chunk_refused = true;
                break;
            }
        }
    }
    assert!(chunk_refused, "the chunk table never had to grow");
    pool.check().unwrap();
    for p in live {
        pool.deallocate(p).unwrap();
    }
    pool.check().unwrap();
    let end = pool.stats();
    assert_eq!((end.current_size, end.allocation_count, end.requested_size), (0, 0, 0));
    assert_eq!((start.current_size, start.allocation_count), (0, 0));
    // A pool dropped while the host refuses hands its upstream blocks back and allocates
    // nothing (before, its drop built a fresh index, and aborted here).
    pool.allocate(64, 16).unwrap();
    assert!(device.live.load(Ordering::Relaxed) > 0);
    refusing(|| drop(pool));
    assert_eq!(device.live.load(Ordering::Relaxed), 0);
}

/// A request that needs a new upstream block whose entry in the chunk table cannot be had is
/// refused before upstream is asked: a block taken only to be handed back (a device allocation,
/// say) is of no use, and the figures then say what happened: no upstream block taken, and none
/// refused by upstream (the error itself says the host was out of memory).
fn quick_pool_chunk_table() {
    let device = FakeDevice::new(1 << 44);
    let config = QuickPoolConfig { first_block_size: 4096, next_block_size: 4096, alignment: 16, max_size: None };
    let mut pool = QuickPool::with_config(&device, config).unwrap();
    let mut live = Vec::new();
    let mut refused = 0;
    for _ in 0..64 {
        // A whole block each: every request takes a new one, and the chunk table grows.
        live.push(pool.allocate(4096, 16).unwrap());
        let (before, requests) = (pool.stats(), device.requests.load(Ordering::Relaxed));
        match refusing(|| pool.allocate(4096, 16)) {
            Ok(p) => live.push(p),
            Err(e) => {
                assert!(matches!(e, Error::OutOfMemory { available: 0, .. }), "{e}");
                assert_eq!(device.requests.load(Ordering::Relaxed), requests, "upstream was asked for a block");
                let after = pool.stats();
                assert_eq!(
                    (after.upstream_allocations, after.upstream_failures, after.actual_size),
                    (before.upstream_allocations, before.upstream_failures, before.actual_size)
                );
                refused += 1;
            }
        }
        assert_eq!(device.live.load(Ordering::Relaxed) as usize, pool.stats().upstream_blocks);
        pool.check().unwrap();
    }
    assert!(refused > 0, "the chunk table never had to grow while the host refused");
    for p in live {
        pool.deallocate(p).unwrap();
    }
    drop(pool);
    assert_eq!(device.live.load(Ordering::Relaxed), 0);
}

fn fixed_pool() {
    let device = FakeDevice::new(1 << 41);
    let config = FixedPoolConfig { objects_per_block: 64, ..FixedPoolConfig::new(64) };
    let mut pool = FixedPool::new(&device, config).unwrap();
    let mut live = Vec::new();
    for _ in 0..64 {
        live.push(pool.allocate(64, 16).unwrap());
    }
    // The second sub-pool's bitmap and records are refused: no upstream block is taken.
    assert!(host_oom(refusing(|| pool.allocate(64, 16))));
    assert_eq!(device.live.load(Ordering::Relaxed), 1);
    pool.check().unwrap();
    live.push(pool.allocate(64, 16).unwrap());
    assert_eq!(device.live.load(Ordering::Relaxed), 2);
    for p in live {
        pool.deallocate(p).unwrap();
    }
    pool.check().unwrap();
    assert_eq!(pool.stats().allocation_count, 0);
}

/// Handing wholly free blocks back upstream needs no host memory: a free that makes the
/// heuristic coalesce, `coalesce` and `release` work while the host refuses (before, each
/// gathered the blocks in a fresh list, and aborted here), and so does a fixed pool's `release`.
fn giving_back_allocates_nothing() {
    let device = FakeDevice::new(1 << 42);
    let config = QuickPoolConfig { first_block_size: 4096, next_block_size: 4096, alignment: 16, max_size: None };
    // The default heuristic coalesces once every block is free, in two upstream blocks or more.
    let mut pool = QuickPool::with_config(&device, config).unwrap();
    let upstream_blocks = |device: &FakeDevice| device.live.load(Ordering::Relaxed) as usize;
    let (a, b) = (pool.allocate(4096, 16).unwrap(), pool.allocate(4096, 16).unwrap());
    pool.deallocate(a).unwrap();
    refusing(|| pool.deallocate(b)).unwrap();
    pool.check().unwrap();
    assert_eq!(pool.stats().coalesce_count, 1);
    assert_eq!(upstream_blocks(&device), pool.stats().upstream_blocks);
    // Two wholly free blocks again, which only `coalesce` merges (its refill may be refused).
    pool.set_heuristic(NeverCoalesce);
    let (a, b) = (pool.allocate(8192, 16).unwrap(), pool.allocate(4096, 16).unwrap());
    pool.deallocate(a).unwrap();
    pool.deallocate(b).unwrap();
    assert_eq!(pool.stats().releasable_blocks, 2);
    let _ = refusing(|| pool.coalesce());
    pool.check().unwrap();
    assert_eq!(upstream_blocks(&device), pool.stats().upstream_blocks);
    assert!(refusing(|| pool.release()) > 0);
    pool.check().unwrap();
    assert_eq!((pool.stats().actual_size, upstream_blocks(&device)), (0, 0));

    let device = FakeDevice::new(1 << 43);
    let config = FixedPoolConfig { objects_per_block: 4, ..FixedPoolConfig::new(64) };
    let mut pool = FixedPool::new(&device, config).unwrap();
    let live: Vec<_> = (0..12).map(|_| pool.allocate(64, 16).unwrap()).collect();
    for p in live {
        pool.deallocate(p).unwrap();
    }
    assert_eq!(refusing(|| pool.release()), 3 * 4 * 64);
    pool.check().unwrap();
    assert_eq!((pool.stats().actual_size, upstream_blocks(&device)), (0, 0));
}
