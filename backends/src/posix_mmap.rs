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
    pub fn create(size: usize, id: BackendId) -> Result<Self> {
        let len = region_len(size)?;
        let mut map = MmapMut::map_anon(len as usize)
            .map_err(|e| Error::Os { call: "mmap", errno: e.raw_os_error().unwrap_or(0) })?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(Error::Os { call: "mmap", errno: 0 })?;
        // SAFETY: the mapping is `len` bytes, page-aligned, and lives in `_map` as long as we do.
        let raw = unsafe { RawRegion::new(base, len) };
        raw.initialize(BackendKind::Private, id)?;
        Ok(PosixMmapBackend { raw, _map: map })
    }
}

impl_backend!(PosixMmapBackend, kind = |_s| BackendKind::Private, creator = |_s| true);

#[cfg(test)]
mod tests {
    use super::*;
    use hetmem_core::MemoryBackend;

    #[test]
    fn maps_a_valid_region() {
        let b = PosixMmapBackend::create(1 << 20, BackendId(3)).unwrap();
        assert_eq!(b.len(), (1 << 20) + 4096);
        assert_eq!(b.id(), BackendId(3));
        assert!(matches!(PosixMmapBackend::create(0, BackendId(3)), Err(Error::InvalidSize { .. })));
    }
}
