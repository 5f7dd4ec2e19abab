//! [`ThroughGlobal`]: a resource that frees through the test binary's global allocator, for the
//! tests of a `HetAlloc` over a resource whose frees land in the global `HetAlloc`, and
//! [`cache_blocks`], which fills such a `HetAlloc`'s cache. Include with
//! `#[path = "common/through_global.rs"] mod through_global;`.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use hetmem_core::cache::HetAlloc;
use hetmem_core::{MemoryKind, MemoryResource, Result};

/// Host memory from the global allocator, counting the bytes it frees.
pub struct ThroughGlobal {
    pub freed: AtomicU64,
}

impl ThroughGlobal {
    pub const fn new() -> Self {
        ThroughGlobal { freed: AtomicU64::new(0) }
    }
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

/// Allocates 50 blocks of 64 bytes from `over` and frees them all, so that they lie in this
/// thread's cache of `over`; returns their bytes.
pub fn cache_blocks(over: &HetAlloc) -> u64 {
    let layout = Layout::from_size_align(64, 16).unwrap();
    // SAFETY: a valid non-zero layout; each block is freed once below with it.
    let blocks: Vec<_> = (0..50).map(|_| unsafe { over.alloc(layout) }).collect();
    for &p in &blocks {
        assert!(!p.is_null());
        // SAFETY: from `alloc(layout)` above, freed once.
        unsafe { over.dealloc(p, layout) };
    }
    (blocks.len() * layout.size()) as u64
}
