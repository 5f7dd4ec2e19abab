//! [`ThroughGlobal`]: a resource that frees through the test binary's global allocator, for the
//! tests of a `HetAlloc` over a resource whose frees land in the global `HetAlloc`. Include with
//! `#[path = "common/through_global.rs"] mod through_global;`.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

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
