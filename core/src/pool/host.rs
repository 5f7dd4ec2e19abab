//! [`HostResource`]: blocks from the system allocator.

use alloc::alloc::{alloc, dealloc, Layout};
use core::ptr::NonNull;

use crate::error::{Error, Result};
use crate::resource::{MemoryKind, MemoryResource};

/// Ordinary host memory from the global allocator (`malloc` unless the program sets another).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostResource;

fn layout(size: usize, align: usize) -> Result<Layout> {
    crate::check_layout(size, align)?;
    Layout::from_size_align(size, align).map_err(|_| Error::InvalidSize { size: size as u64, reason: "too large" })
}

// SAFETY: blocks come from the global allocator with the layout asked for, and go back to it
// with the same layout; host memory, from any thread.
unsafe impl MemoryResource for HostResource {
    fn name(&self) -> &str {
        "host"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }

    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let layout = layout(size, align)?;
        // SAFETY: `layout` has a non-zero size (checked by `check_layout`).
        let ptr = unsafe { alloc(layout) };
        NonNull::new(ptr).ok_or(Error::OutOfMemory { requested: size as u64, available: 0 })
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
        // The caller passes what `allocate` accepted, so the layout is valid; should it not be,
        // leaking the block is the only safe answer.
        if let Ok(layout) = layout(size, align) {
            // SAFETY: the caller's contract: `ptr` came from `allocate` with this size and align,
            // which used this layout with the global allocator.
            unsafe { dealloc(ptr.as_ptr(), layout) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_aligned_host_memory_and_refuses_bad_layouts() {
        let host = HostResource;
        let p = host.allocate(1000, 256).unwrap();
        assert_eq!(p.as_ptr() as usize % 256, 0);
        // SAFETY: host memory, 1000 bytes just allocated.
        unsafe { p.as_ptr().write_bytes(0xab, 1000) };
        // SAFETY: allocated above with this size and alignment.
        unsafe { host.deallocate(p, 1000, 256) };
        assert!(matches!(host.allocate(0, 16), Err(Error::InvalidSize { .. })));
        assert!(matches!(host.allocate(16, 3), Err(Error::InvalidAlignment { .. })));
        assert!(matches!(
            host.allocate(isize::MAX as usize, 16),
            Err(Error::InvalidSize { .. } | Error::OutOfMemory { .. })
        ));
        assert!(host.host_accessible());
    }
}
