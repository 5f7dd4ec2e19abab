//! A thread's exit with `HetAlloc` as the global allocator and a resource that frees through it:
//! the blocks that the resource's cache hands back at the exit land in the global `HetAlloc`,
//! whose cache on that thread may already be returned. They must go upstream then, not into a
//! cache that nothing returns any more (its thread is gone).
//!
//! One test in its own binary, with its own global allocator.
#![cfg(not(loom))]

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use hetmem_core::cache::HetAlloc;
use hetmem_core::{MemoryKind, MemoryResource, Result};

#[global_allocator]
static A: HetAlloc = HetAlloc::new();

/// Host memory from the global allocator, counting the bytes it frees.
struct ThroughGlobal {
    freed: AtomicU64,
}

// SAFETY: every block comes from and goes back to the global allocator with its layout.
unsafe impl MemoryResource for ThroughGlobal {
    fn name(&self) -> &str {
        "through-global"
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }
    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: the upstream passes on no zero size.
        NonNull::new(unsafe { std::alloc::alloc(layout) })
            .ok_or(hetmem_core::Error::OutOfMemory { requested: size as u64, available: 0 })
    }
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
        self.freed.fetch_add(size as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract: from `allocate` above with this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(size, align)) }
    }
}

static RESOURCE: ThroughGlobal = ThroughGlobal { freed: AtomicU64::new(0) };
static OVER_RESOURCE: HetAlloc = HetAlloc::with_resource(&RESOURCE);

#[test]
fn blocks_a_resource_frees_through_hetalloc_at_a_threads_exit_go_upstream() {
    // No depot: what the resource's cache returns at the exit goes to the resource, and so to
    // `A`, the global allocator (whose slot, the system allocator's, is returned first).
    OVER_RESOURCE.set_depot_limit(0);
    let before = A.stats();
    std::thread::spawn(|| {
        let layout = Layout::from_size_align(64, 16).unwrap();
        // SAFETY: a valid non-zero layout; each block is freed once below with it.
        let blocks: Vec<_> = (0..50).map(|_| unsafe { OVER_RESOURCE.alloc(layout) }).collect();
        for &p in &blocks {
            assert!(!p.is_null());
            // SAFETY: from `alloc(layout)` above, freed once.
            unsafe { OVER_RESOURCE.dealloc(p, layout) };
        }
        assert!(OVER_RESOURCE.thread_stats().bytes_cached >= 50 * 64);
        assert_eq!(RESOURCE.freed.load(Ordering::Relaxed), 0, "all cached so far");
    })
    .join()
    .unwrap();
    let freed = RESOURCE.freed.load(Ordering::Relaxed);
    assert!(freed >= 50 * 64, "the exiting thread returned its cache over the resource: {freed}");
    let returned = A.stats().bytes_returned - before.bytes_returned;
    assert!(returned >= freed, "{freed} bytes freed into the exited thread's cache, {returned} of them went upstream");
}
