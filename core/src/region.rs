//! [`Region`]: the part of a backend one allocator owns, with bounds-checked access.

use alloc::sync::Arc;

use crate::backend::MemoryBackend;
use crate::error::{Error, Result};
use crate::header::HEADER_SIZE;

/// The largest alignment a region allocator guarantees: mappings start on page boundaries, so
/// an offset aligned to this is an address aligned to it in every process.
pub const MAX_ALIGN: usize = 4096;

/// A sub-range `[offset, offset + len)` of a backend's region, owned by one allocator.
///
/// Offsets are always from the backend's start (offset 0 is its header), so an offset means the
/// same thing to the allocator, the memory manager and every other process. All access from
/// offsets goes through [`Region::ptr`], which checks bounds first.
///
/// A region is not `Clone`: a copy would let safe code create a second allocator over the bytes
/// of a live one (`AllocatorType::create` writes a fresh header), which [`Region::new`]'s
/// promise rules out. The crate copies regions only where the copy serves the same allocator.
///
/// ```compile_fail,E0277
/// fn second_handle(r: &hetmem_core::Region) -> hetmem_core::Region {
///     <hetmem_core::Region as Clone>::clone(r)
/// }
/// ```
pub struct Region {
    backend: Arc<dyn MemoryBackend>,
    offset: u64,
    len: u64,
    /// Shared by this region and its duplicates, for a creator that must know when the last of
    /// them is gone ([`Region::leased`]).
    lease: Option<Arc<()>>,
}

impl Region {
    /// The sub-range `[offset, offset + len)` of `backend`'s data area.
    ///
    /// # Safety
    /// The region allocators made over the region (`AllocatorType::create` and `attach`) write
    /// into it from safe calls, so the range is theirs: no `BackendResource` carves any of it
    /// (it hands its blocks out as memory of their own, which safe code then reads and writes),
    /// and nothing but region allocators over the state it holds, in this process or another,
    /// writes it. A range the backend's allocator directory gave a region allocator (as
    /// `MemoryManager` creates and attaches them) is one; a `BackendResource`'s
    /// (`BACKEND_RESOURCE_TYPE_ID`) is not.
    pub unsafe fn new(backend: Arc<dyn MemoryBackend>, offset: u64, len: u64) -> Result<Self> {
        if !backend.host_accessible() {
            return Err(Error::Unsupported("region allocators need memory the CPU can access"));
        }
        let total = backend.len();
        let in_bounds = offset >= HEADER_SIZE && offset.checked_add(len).is_some_and(|end| end <= total);
        if !in_bounds || len == 0 {
            return Err(Error::OutOfBounds { offset, len, region_len: total });
        }
        if (backend.base() as usize) % MAX_ALIGN != 0 {
            // The alignment the base needed (the error's field says so), not the base's remainder.
            return Err(Error::InvalidAlignment { align: MAX_ALIGN as u64 });
        }
        Ok(Region { backend, offset, len, lease: None })
    }

    /// The whole data area of `backend` (everything after the header page).
    ///
    /// # Safety
    /// As for [`new`](Self::new), over the whole data area.
    pub unsafe fn whole(backend: Arc<dyn MemoryBackend>) -> Result<Self> {
        let len = backend.len().saturating_sub(HEADER_SIZE);
        // SAFETY: the caller's promise, for the whole data area.
        unsafe { Region::new(backend, HEADER_SIZE, len) }
    }

    /// A second handle on the same range, for the allocator that owns it (its free-space
    /// manager, its tests' attaches).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn duplicate(&self) -> Region {
        Region { backend: Arc::clone(&self.backend), offset: self.offset, len: self.len, lease: self.lease.clone() }
    }

    /// The region holding `lease`, which its duplicates share: while the lease's strong count
    /// is above the holder's own, some handle on the range lives (an allocator made over it, say).
    #[cfg(feature = "std")]
    pub(crate) fn leased(mut self, lease: Arc<()>) -> Region {
        self.lease = Some(lease);
        self
    }

    /// The backend this region is part of.
    pub fn backend(&self) -> &Arc<dyn MemoryBackend> {
        &self.backend
    }

    /// Where the region starts, from the backend's start.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The region's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never, for a region made by [`Region::new`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the region's last offset.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Whether `[offset, offset + len)` lies inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset >= self.offset && offset.checked_add(len).is_some_and(|end| end <= self.end())
    }

    /// The local address of `offset`, after checking that `len` bytes from there lie in the region.
    pub fn ptr(&self, offset: u64, len: u64) -> Result<*mut u8> {
        if !self.contains(offset, len) {
            return Err(Error::OutOfBounds { offset, len, region_len: self.end() });
        }
        // SAFETY: `offset` is inside the backend's mapping (checked just above; the region is
        // inside the backend, checked in `new`), so the result stays in the same allocation.
        Ok(unsafe { self.backend.base().add(offset as usize) })
    }

    /// The offset of a local address, if it lies in the region (one past its end does not: that
    /// is the next region's first byte).
    pub fn offset_of(&self, ptr: *const u8) -> Option<u64> {
        let base = self.backend.base() as usize;
        let offset = (ptr as usize).checked_sub(base)? as u64;
        self.contains(offset, 1).then_some(offset)
    }
}

impl core::fmt::Debug for Region {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Region")
            .field("backend", &self.backend.id())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::backend::{BackendId, BackendKind};
    use crate::header::RegionHeader;
    use crate::testing::HeapBackend;

    /// A heap backend whose base is 64 bytes past the page it starts on.
    struct Shifted(HeapBackend);

    // SAFETY: the inner backend's memory, less its first 64 bytes; the header is the inner one's.
    unsafe impl MemoryBackend for Shifted {
        fn kind(&self) -> BackendKind {
            BackendKind::Private
        }
        fn base(&self) -> *mut u8 {
            self.0.base().wrapping_add(64)
        }
        fn len(&self) -> u64 {
            self.0.len() - 64
        }
        fn header(&self) -> &RegionHeader {
            self.0.header()
        }
        fn is_creator(&self) -> bool {
            true
        }
    }

    /// The error names the alignment the base needed (it used to give the base's remainder, 64).
    #[test]
    fn a_base_off_the_maximum_alignment_is_refused_naming_the_alignment() {
        let backend = Arc::new(Shifted(HeapBackend::new(BackendId(1), 1 << 16)));
        // SAFETY: refused before any use.
        let err = unsafe { Region::new(backend, HEADER_SIZE, 4096) }.err();
        assert_eq!(err, Some(Error::InvalidAlignment { align: MAX_ALIGN as u64 }));
    }
}
