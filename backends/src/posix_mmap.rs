//! [`PosixMmapBackend`]: an anonymous private mapping.

use std::ptr::NonNull;

use hetmem_core::{BackendId, BackendKind, Error, Result};
use memmap2::MmapMut;

use crate::raw::{impl_backend, region_len, RawRegion};

/// A private region in an anonymous memory mapping (pages are committed on first touch), unmapped
/// on drop. A child made with `fork` inherits it.
#[derive(Debug)]
pub struct PosixMmapBackend {
    raw: RawRegion,
    _map: MmapMut,
}

impl PosixMmapBackend {
    /// A region with `size` bytes of data (rounded up to whole pages) after its header.
    /// `OutOfMemory` if the system will not map that much (more than its memory allows, or than
    /// this process's address space holds), as from [`MallocBackend`](crate::MallocBackend).
    pub fn create(size: usize, id: BackendId) -> Result<Self> {
        let len = region_len(size)?;
        let mut map = MmapMut::map_anon(len as usize).map_err(|e| match e.kind() {
            std::io::ErrorKind::OutOfMemory => Error::OutOfMemory { requested: len, available: 0 },
            _ => Error::Os { call: "mmap", errno: e.raw_os_error().unwrap_or(0) },
        })?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(Error::Os { call: "mmap", errno: 0 })?;
        // SAFETY: the mapping is `len` bytes, page-aligned, and lives in `_map` as long as we do.
        let raw = unsafe { RawRegion::new(base, len) };
        // SAFETY: a fresh private mapping no one else knows of; no reference to its header exists.
        unsafe { raw.initialize(BackendKind::Private, id)? };
        Ok(PosixMmapBackend { raw, _map: map })
    }
}

impl_backend!(PosixMmapBackend, kind = |_s| BackendKind::Private, creator = |_s| true);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MallocBackend;
    use hetmem_core::MemoryBackend;

    #[test]
    fn maps_a_valid_region() {
        let b = PosixMmapBackend::create(1 << 20, BackendId(3)).unwrap();
        assert_eq!(b.len(), (1 << 20) + 4096);
        assert_eq!(b.id(), BackendId(3));
        assert!(matches!(PosixMmapBackend::create(0, BackendId(3)), Err(Error::InvalidSize { .. })));
    }

    #[test]
    fn a_mapping_the_system_cannot_give_is_out_of_memory() {
        // 2^60 bytes: past any 64-bit address space (57 bits at most), so always refused.
        let r = PosixMmapBackend::create(1 << 60, BackendId(3));
        assert!(matches!(r, Err(Error::OutOfMemory { requested, .. }) if requested > 1 << 60), "{r:?}");
        // As from the system allocator.
        assert!(MallocBackend::create(1 << 60, BackendId(3)).unwrap_err().is_out_of_memory());
    }
}
