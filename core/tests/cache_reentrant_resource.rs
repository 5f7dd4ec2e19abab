//! A `HetAlloc` over a resource whose own bookkeeping allocates through that `HetAlloc` (the
//! global one over a `SyncPool<QuickPool<..>>`, whose tables come from the global allocator).
//! A request the pool serves makes the pool grow its tables, and that request comes back to
//! the same `HetAlloc`, and to the pool, whose lock this thread holds. It must be refused (the
//! pool then reports its bookkeeping out of memory, and the outer request fails), not wait for
//! a lock that its own thread holds.
//!
//! One test in its own binary, with its own global allocator: the system allocator, except on
//! a thread that switched to the `HetAlloc` over the pool. Blocks are freed to whichever
//! allocator their address says (the pool's memory is a static buffer).
//!
//! Unix only for now: the Windows build of this binary overflows its stack under wine before
//! the test harness prints anything (not investigated yet; the crate's other test binaries with
//! their own global allocators run there).
#![cfg(all(not(loom), unix))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use hetmem_core::cache::HetAlloc;
use hetmem_core::pool::{NeverCoalesce, QuickPool, QuickPoolConfig, SyncPool};
use hetmem_core::{Error, MemoryKind, MemoryResource, Result};

const ARENA: usize = 8 << 20;

/// Host memory handed out from a static buffer by bumping an offset, never reused.
struct Bump {
    buf: UnsafeCell<[u8; ARENA]>,
    next: AtomicUsize,
}

// SAFETY: the buffer is only handed out in disjoint ranges (`next` only grows).
unsafe impl Sync for Bump {}

impl Bump {
    fn holds(&self, p: *mut u8) -> bool {
        let base = self.buf.get() as usize;
        (base..base + ARENA).contains(&(p as usize))
    }
}

// SAFETY: disjoint ranges of a static buffer, aligned as asked, never handed out twice.
unsafe impl MemoryResource for Bump {
    fn name(&self) -> &str {
        "bump"
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }
    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        hetmem_core::check_layout(size, align)?;
        let base = self.buf.get() as usize;
        let mut start = 0;
        let took = self.next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
            start = (base + next).next_multiple_of(align) - base;
            (start + size <= ARENA).then_some(start + size)
        });
        took.map_err(|_| Error::OutOfMemory { requested: size as u64, available: 0 })?;
        Ok(NonNull::new(self.buf.get().cast::<u8>().wrapping_add(start)).unwrap())
    }
    unsafe fn deallocate(&self, _: NonNull<u8>, _: usize, _: usize) {}
}

static BUMP: Bump = Bump { buf: UnsafeCell::new([0; ARENA]), next: AtomicUsize::new(0) };

type Pool = SyncPool<QuickPool<&'static Bump>>;

/// Made (with the system allocator) before any thread switches to `OVER_POOL`.
static POOL: OnceLock<Pool> = OnceLock::new();

/// The pool, as a resource `HetAlloc::with_resource` can name in a static.
struct PoolRef;

// SAFETY: the pool's blocks, which it hands out once each.
unsafe impl MemoryResource for PoolRef {
    fn name(&self) -> &str {
        "pool"
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }
    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        POOL.get().unwrap().allocate(size, align)
    }
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
        // SAFETY: the caller's contract.
        unsafe { MemoryResource::deallocate(POOL.get().unwrap(), ptr, size, align) }
    }
}

static POOL_REF: PoolRef = PoolRef;
static OVER_POOL: HetAlloc = HetAlloc::with_resource(&POOL_REF);

thread_local! {
    static ON_POOL: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator, or `OVER_POOL` on a thread that switched to it.
struct Switch;

// SAFETY: each block is freed to the allocator that made it: the pool's lie in `BUMP`.
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ON_POOL.with(Cell::get) {
            // SAFETY: the caller's contract.
            unsafe { OVER_POOL.alloc(layout) }
        } else {
            // SAFETY: the caller's contract.
            unsafe { System.alloc(layout) }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if BUMP.holds(ptr) {
            // SAFETY: the caller's contract; the block came from `OVER_POOL`.
            unsafe { OVER_POOL.dealloc(ptr, layout) }
        } else {
            // SAFETY: the caller's contract; the block came from `System`.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}

#[global_allocator]
static A: Switch = Switch;

#[test]
fn a_resource_that_allocates_through_the_hetalloc_over_it_is_refused_not_waited_on() {
    let config = QuickPoolConfig { first_block_size: 1 << 20, next_block_size: 1 << 20, alignment: 16, max_size: None };
    POOL.set(SyncPool::new(QuickPool::with_config(&BUMP, config).unwrap().with_heuristic(NeverCoalesce))).ok().unwrap();
    let (done, outcome) = std::sync::mpsc::channel();
    // The thread's own figures are read with the system allocator: only its requests go to
    // the pool.
    std::thread::spawn(move || {
        let layout = Layout::from_size_align(64, 16).unwrap();
        ON_POOL.with(|on| on.set(true));
        // SAFETY: a valid non-zero layout.
        let p = unsafe { std::alloc::alloc(layout) };
        ON_POOL.with(|on| on.set(false));
        done.send(p as usize).unwrap();
    });
    // Before, the thread waited for ever on the pool's lock, which it held itself.
    let p = outcome.recv_timeout(Duration::from_secs(20)).expect("the nested request waited on the pool's lock");
    assert_eq!(p, 0, "the pool's tables grew through the pool while it served the outer request");
    let pool = POOL.get().unwrap();
    pool.check().unwrap();
    let s = pool.stats();
    assert_eq!((s.allocation_count, s.current_size), (0, 0));
}
