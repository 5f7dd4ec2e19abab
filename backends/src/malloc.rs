//! [`MallocBackend`]: memory from the system allocator.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use hetmem_core::header::HEADER_SIZE;
use hetmem_core::{BackendId, BackendKind, Error, Result};

use crate::raw::{impl_backend, region_len, RawRegion};

/// A private region from the system allocator, freed on drop.
#[derive(Debug)]
pub struct MallocBackend {
    raw: RawRegion,
    layout: Layout,
}

impl MallocBackend {
    /// A region with `size` bytes of data (rounded up to whole pages) after its header.
    pub fn create(size: usize, id: BackendId) -> Result<Self> {
        let len = region_len(size)?;
        let layout = Layout::from_size_align(len as usize, HEADER_SIZE as usize)
            .map_err(|_| Error::InvalidSize { size: size as u64, reason: "too large" })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(ptr).ok_or(Error::OutOfMemory { requested: len, available: 0 })?;
        // SAFETY: `len` fresh bytes, page-aligned, freed only in our Drop.
        let raw = unsafe { RawRegion::new(base, len) };
        let backend = MallocBackend { raw, layout };
        // SAFETY: a fresh allocation no one else knows of; no reference to its header exists.
        unsafe { backend.raw.initialize(BackendKind::Private, id)? };
        Ok(backend)
    }
}

impl_backend!(MallocBackend, kind = |_s| BackendKind::Private, creator = |_s| true);

impl Drop for MallocBackend {
    fn drop(&mut self) {
        // SAFETY: allocated in `create` with this layout, and dropped once.
        unsafe { dealloc(self.raw.base(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetmem_core::MemoryBackend;

    #[test]
    fn creates_a_page_aligned_zeroed_region() {
        let b = MallocBackend::create(10_000, BackendId(9)).unwrap();
        assert_eq!(b.len(), HEADER_SIZE + 12_288);
        assert_eq!(b.base() as usize % 4096, 0);
        assert_eq!(b.id(), BackendId(9));
        b.header().validate(b.len(), BackendKind::Private).unwrap();
        assert!(matches!(MallocBackend::create(0, BackendId(1)), Err(Error::InvalidSize { size: 0, .. })));
        assert!(matches!(
            MallocBackend::create(usize::MAX / 2, BackendId(1)),
            Err(Error::InvalidSize { .. } | Error::OutOfMemory { .. })
        ));
    }
}
