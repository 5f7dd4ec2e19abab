//! [`BackendResource`]: blocks carved from a [`MemoryBackend`]'s region.
//!
//! The region is carved by a [`BlockArena`] kept in host memory beside it (best fit, split,
//! merge), so the resource works for device backends too: it never reads or writes the region.

use alloc::sync::Arc;
use core::ptr::NonNull;

use super::arena::{round_up, BlockArena};
use crate::backend::{BackendKind, MemoryBackend};
use crate::error::{Error, Result};
use crate::header::HEADER_SIZE;
use crate::ptr::AllocatorId;
use crate::resource::{MemoryKind, MemoryResource};
use crate::sync::Mutex;

/// Every block starts on this boundary (the header's sub-region alignment, a cache line).
const GRANULE: usize = 64;

/// The directory type id of a sub-region reserved by [`BackendResource::reserve`] ("POOL").
pub const BACKEND_RESOURCE_TYPE_ID: u32 = 0x504F_4F4C;

/// The arena, sendable: its `NonNull`s are addresses in the backend, which the resource keeps
/// alive and never dereferences.
struct Carver(BlockArena);

// SAFETY: see the type's comment; the arena is plain bookkeeping about memory it never touches.
unsafe impl Send for Carver {}

/// A [`MemoryResource`] that hands out blocks of one backend's region.
///
/// A block's address is the backend's [`base`](MemoryBackend::base) plus its offset for memory
/// the CPU can reach, and the backend's [`device_ptr`](MemoryBackend::device_ptr) plus its offset
/// for device memory; [`offset_of`](Self::offset_of) turns it back into an offset (e.g. for a
/// [`ShmPtr`](crate::ShmPtr)). The resource is `Sync`: one lock guards its bookkeeping.
///
/// The bookkeeping lives in the process that made the resource. After a `fork()`, the child's
/// copy of a resource over memory other than private (shared, pinned or device memory) refuses
/// to allocate with [`Error::Unsupported`]: parent and child would hand out the same blocks.
pub struct BackendResource {
    backend: Arc<dyn MemoryBackend>,
    start: u64,
    len: u64,
    base: NonNull<u8>,
    carver: Mutex<Carver>,
    /// The fork generation it was made in ([`crate::fork`]).
    generation: u64,
}

// SAFETY: `base` is the address of the backend's memory, which `backend` keeps mapped; the
// resource never dereferences it, and all mutable state is behind the mutex.
unsafe impl Send for BackendResource {}
// SAFETY: as for Send.
unsafe impl Sync for BackendResource {}

impl BackendResource {
    /// Carves the whole data area of `backend` (everything after its header page), for a
    /// backend dedicated to the resource. [`reserve`](Self::reserve) is the safe way: it takes a
    /// sub-region through the backend's allocator directory, which no region allocator or other
    /// reserved resource, in any process, shares.
    ///
    /// # Safety
    /// As for [`with_range`](Self::with_range), over the whole data area.
    pub unsafe fn new(backend: Arc<dyn MemoryBackend>) -> Result<Self> {
        let len = backend.len().saturating_sub(HEADER_SIZE);
        // SAFETY: the caller's promise, for the whole data area.
        unsafe { BackendResource::with_range(backend, HEADER_SIZE, len) }
    }

    /// Reserves `size` bytes (0: all that is left) in `backend`'s allocator directory under `id`,
    /// and carves that sub-region. Should the resource not be made over it (a range too small
    /// for a 64-byte block, a base off a 64-byte boundary), the entry is forgotten, and its
    /// space given back where it is the last one reserved.
    pub fn reserve(backend: Arc<dyn MemoryBackend>, id: AllocatorId, size: u64) -> Result<Self> {
        let entry = backend.header().reserve_allocator(BACKEND_RESOURCE_TYPE_ID, id, size)?;
        // SAFETY: the directory gave the sub-region to this id alone (no region allocator or other
        // resource, in any process, is given an overlapping one; a region allocator made by hand
        // needs `Region::new`, whose contract excludes a resource's range, and the memory
        // manager attaches no allocator type with our type id), and it is ours until the backend
        // goes.
        match unsafe { BackendResource::with_range(Arc::clone(&backend), entry.offset, entry.size) } {
            Ok(resource) => {
                backend.header().publish_allocator(id)?;
                Ok(resource)
            }
            Err(e) => {
                // SAFETY: the resource was not made, so nothing over the range lives, in this
                // process or another (none uses a range whose entry is not ready).
                unsafe { backend.header().give_back_allocator(id) }?;
                Err(e)
            }
        }
    }

    /// Carves `[offset, offset + len)` of `backend` (offsets from the region's start; the range
    /// must lie after the header page). The range shrinks to 64-byte boundaries.
    ///
    /// # Safety
    /// Nothing else uses the range while the resource or a block from it lives: no region
    /// allocator, no other resource (in this process or another that maps the backend), no other
    /// writer. The resource hands its blocks out as memory of their own (a thread cache over it
    /// writes into them, and so do the users of `HetAlloc` over it), so two carvers of one range
    /// would hand out the same bytes twice.
    pub unsafe fn with_range(backend: Arc<dyn MemoryBackend>, offset: u64, len: u64) -> Result<Self> {
        let total = backend.len();
        let in_bounds = offset >= HEADER_SIZE && offset.checked_add(len).is_some_and(|end| end <= total);
        if !in_bounds {
            return Err(Error::OutOfBounds { offset, len, region_len: total });
        }
        let start =
            round_up(offset as usize, GRANULE).ok_or(Error::OutOfBounds { offset, len, region_len: total })? as u64;
        let end = (offset + len) & !(GRANULE as u64 - 1);
        if end <= start {
            return Err(Error::InvalidSize { size: len, reason: "range holds no whole 64-byte block" });
        }
        // A device address is a number the backend reports: one this target cannot hold, or a
        // range that runs past the top of the address space, is refused rather than cut or
        // wrapped (a block at address 0 would be a null pointer).
        let out_of_bounds = Error::OutOfBounds { offset: start, len, region_len: total };
        let base = match (backend.host_accessible(), backend.device_ptr()) {
            (false, Some(device)) => {
                core::ptr::without_provenance_mut::<u8>(usize::try_from(device).map_err(|_| out_of_bounds)?)
            }
            _ => backend.base(),
        };
        let base = NonNull::new(base).ok_or(Error::Unsupported("backend has a null base address"))?;
        let in_address_space =
            usize::try_from(end).ok().and_then(|end| (base.as_ptr() as usize).checked_add(end)).is_some();
        let chunk = NonNull::new(base.as_ptr().wrapping_add(start as usize))
            .filter(|_| in_address_space)
            .ok_or(out_of_bounds)?;
        if chunk.as_ptr() as usize % GRANULE != 0 {
            return Err(Error::InvalidAlignment { align: GRANULE as u64 });
        }
        if backend.kind() != BackendKind::Private {
            crate::fork::watch()?;
        }
        let generation = crate::fork::generation();
        let mut arena = BlockArena::try_new(GRANULE)?;
        arena.add_chunk(chunk, (end - start) as usize, GRANULE)?;
        let carver = Mutex::new(Carver(arena));
        Ok(BackendResource { backend, start, len: end - start, base, carver, generation })
    }

    /// The backend carved.
    pub fn backend(&self) -> &Arc<dyn MemoryBackend> {
        &self.backend
    }

    /// The carved range, as (offset from the region's start, length).
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.len)
    }

    /// The region offset of a block address this resource handed out (or any address in its
    /// range).
    pub fn offset_of(&self, ptr: NonNull<u8>) -> Option<u64> {
        let offset = (ptr.as_ptr() as usize).checked_sub(self.base.as_ptr() as usize)? as u64;
        (offset >= self.start && offset < self.start + self.len).then_some(offset)
    }

    /// Bytes not handed out.
    pub fn free_bytes(&self) -> u64 {
        let carver = self.carver.lock();
        (carver.0.counters().actual_size - carver.0.counters().current_size) as u64
    }

    /// Checks the bookkeeping.
    pub fn check(&self) -> Result<()> {
        self.carver.lock().0.check("backend resource")
    }
}

// SAFETY: each block is carved from the backend's region, which stays mapped while the resource
// lives, and is handed out by the arena once until it comes back (best fit over free blocks);
// `kind` and `host_accessible` are the backend's own; the carver is behind a lock.
unsafe impl MemoryResource for BackendResource {
    fn name(&self) -> &str {
        "backend"
    }

    fn kind(&self) -> MemoryKind {
        match self.backend.kind() {
            BackendKind::Private | BackendKind::Shared => MemoryKind::Host,
            BackendKind::Pinned => MemoryKind::PinnedHost,
            BackendKind::Device => MemoryKind::Device,
        }
    }

    fn host_accessible(&self) -> bool {
        self.backend.host_accessible()
    }

    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        if self.generation != crate::fork::generation() && self.backend.kind() != BackendKind::Private {
            return Err(Error::Unsupported(
                "a BackendResource over shared or device memory used in a forked child \
                 (its parent hands out the same blocks)",
            ));
        }
        // Bad input, as a resource of any size would answer it (the arena's own check takes any
        // size up to `isize::MAX`, whatever the alignment).
        crate::check_layout(size, align)?;
        let mut carver = self.carver.lock();
        let fit = carver.0.fit(size, align)?;
        if let Some(ptr) = carver.0.allocate_fit(fit)? {
            return Ok(ptr);
        }
        // Best fit asks for the worst-case padding; a smaller free block on a suitable boundary
        // serves an over-aligned request too (a pool over the resource asks for its blocks at
        // the alignment of the request that needs them).
        carver
            .0
            .allocate_aligned_in_smaller(fit)?
            .ok_or(Error::OutOfMemory { requested: size as u64, available: carver.0.largest_free() as u64 })
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _size: usize, _align: usize) {
        // The arena knows each block's size and refuses anything it did not hand out; the
        // trait gives no way to report that, and the region is untouched either way.
        let _ = self.carver.lock().0.free(ptr.as_ptr() as usize);
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::backend::BackendId;
    use crate::pool::{HostResource, QuickPool, QuickPoolConfig};
    use crate::testing::HeapBackend;

    fn backend(len: usize) -> Arc<dyn MemoryBackend> {
        Arc::new(HeapBackend::new(BackendId(3), len))
    }

    #[test]
    fn carves_blocks_inside_the_region_and_takes_them_back() {
        let b = backend(1 << 20);
        // SAFETY: the test's own backend, which nothing else carves.
        let r = unsafe { BackendResource::new(Arc::clone(&b)) }.unwrap();
        let (start, len) = r.range();
        assert_eq!((start, len), (HEADER_SIZE, (1 << 20) - HEADER_SIZE));
        let p = r.allocate(1000, 256).unwrap();
        let q = r.allocate(5000, 4096).unwrap();
        for (ptr, size) in [(p, 1000), (q, 5000)] {
            let offset = r.offset_of(ptr).unwrap();
            assert!(offset >= start && offset + size <= start + len);
        }
        assert_eq!(q.as_ptr() as usize % 4096, 0);
        assert!(matches!(r.allocate(1 << 20, 16), Err(Error::OutOfMemory { .. })));
        r.check().unwrap();
        // SAFETY: both came from `r` with these sizes.
        unsafe {
            r.deallocate(p, 1000, 256);
            r.deallocate(q, 5000, 4096);
        }
        assert_eq!(r.free_bytes(), len);
        r.check().unwrap();
    }

    #[test]
    fn reserves_a_sub_region_in_the_directory() {
        let b = backend(1 << 20);
        let r = BackendResource::reserve(Arc::clone(&b), AllocatorId::new(7, 0), 64 << 10).unwrap();
        assert_eq!(r.range().1, 64 << 10);
        assert!(b.header().find_allocator(AllocatorId::new(7, 0)).unwrap().is_some());
        assert!(matches!(
            BackendResource::reserve(Arc::clone(&b), AllocatorId::new(7, 0), 4096),
            Err(Error::AlreadyExists { .. })
        ));
        // SAFETY: refused before anything is carved.
        let header = unsafe { BackendResource::with_range(Arc::clone(&b), 0, 4096) };
        assert!(matches!(header, Err(Error::OutOfBounds { .. })));
    }

    /// `HeapBackend`'s region seen as device memory at a device address of the test's choosing.
    struct OddDevice(HeapBackend, u64);

    // SAFETY: `HeapBackend`'s memory, which it says the CPU may not touch (no one does).
    unsafe impl MemoryBackend for OddDevice {
        crate::testing::heap_backend_methods!();
        fn host_accessible(&self) -> bool {
            false
        }
        fn device_ptr(&self) -> Option<u64> {
            Some(self.1)
        }
    }

    #[test]
    fn a_misaligned_base_is_refused_with_the_alignment_it_needs() {
        // 32 bytes off a 64-byte boundary.
        let odd = Arc::new(OddDevice(HeapBackend::new(BackendId(4), 1 << 20), 0x7e00_0020));
        // SAFETY: the test's own backend, which nothing else carves.
        let err = unsafe { BackendResource::new(odd) }.err();
        assert_eq!(err, Some(Error::InvalidAlignment { align: GRANULE as u64 }));
    }

    /// A reservation whose resource cannot be made gives its space back, as a failed
    /// `create_allocator` does: before, the space stayed reserved for good, so after one that
    /// asked for all that is left (here over a device address off a 64-byte boundary) every later
    /// reservation in the backend failed with `OutOfMemory`.
    #[test]
    fn a_reservation_whose_resource_cannot_be_made_gives_its_space_back() {
        let odd = Arc::new(OddDevice(HeapBackend::new(BackendId(7), 1 << 20), 0x7e00_0020));
        let odd: Arc<dyn MemoryBackend> = odd;
        for size in [0, 64 << 10] {
            let err = BackendResource::reserve(Arc::clone(&odd), AllocatorId::new(8, 0), size).err();
            assert_eq!(err, Some(Error::InvalidAlignment { align: GRANULE as u64 }), "{size}");
        }
        // All that is left is still all there is, at the same place, for the same id too.
        let fresh = backend(1 << 20).header().reserve_allocator(BACKEND_RESOURCE_TYPE_ID, AllocatorId::new(8, 0), 0);
        let again = odd.header().reserve_allocator(BACKEND_RESOURCE_TYPE_ID, AllocatorId::new(8, 0), 0);
        let (fresh, again) = (fresh.unwrap(), again.unwrap());
        assert_eq!((again.offset, again.size), (fresh.offset, fresh.size));
    }

    /// A device range that runs past the top of the address space is refused: carved, its
    /// blocks' addresses would wrap (a block at address 0 is a null pointer).
    #[test]
    fn a_device_range_past_the_top_of_the_address_space_is_refused() {
        let len = 1u64 << 20;
        // Half the range past the top (of 64-bit addresses, of this target's), and a range that
        // starts at the last 64-byte boundary.
        let last_boundary = !(GRANULE as u64 - 1);
        for device in [u64::MAX - (len / 2) + 1, usize::MAX as u64 - (len / 2) + 1, last_boundary] {
            let odd = Arc::new(OddDevice(HeapBackend::new(BackendId(5), len as usize), device));
            // SAFETY: the test's own backend, which nothing else carves.
            let err = unsafe { BackendResource::new(odd) }.err();
            assert!(matches!(err, Some(Error::OutOfBounds { .. })), "{device:#x}: {err:?}");
        }
        // A range that ends at the very top is refused too: its end is no address.
        let top = (usize::MAX as u64).wrapping_add(1).wrapping_sub(len);
        let odd = Arc::new(OddDevice(HeapBackend::new(BackendId(6), len as usize), top));
        // SAFETY: the test's own backend, which nothing else carves.
        let err = unsafe { BackendResource::new(odd) }.err();
        assert!(matches!(err, Some(Error::OutOfBounds { .. })), "{top:#x}: {err:?}");
    }

    #[test]
    fn a_quick_pool_runs_over_a_backend() {
        // SAFETY: a fresh backend, which nothing else carves.
        let r = unsafe { BackendResource::new(backend(4 << 20)) }.unwrap();
        let config = QuickPoolConfig { first_block_size: 1 << 20, next_block_size: 1 << 20, ..Default::default() };
        let mut pool = QuickPool::with_config(&r, config).unwrap();
        let ptrs: std::vec::Vec<_> = (0..100).map(|i| pool.allocate(1000 + i * 100, 16).unwrap()).collect();
        assert!(ptrs.iter().all(|&p| r.offset_of(p).is_some()));
        assert!(matches!(pool.allocate(8 << 20, 16), Err(Error::OutOfMemory { .. })));
        for p in ptrs {
            pool.deallocate(p).unwrap();
        }
        pool.check().unwrap();
        drop(pool);
        assert_eq!(r.free_bytes(), r.range().1);
    }

    #[test]
    fn an_over_aligned_request_fits_a_free_block_on_its_boundary() {
        // 8 KiB of data from a page boundary: two 4 KiB-aligned pages.
        // SAFETY: a fresh backend, which nothing else carves.
        let r = unsafe { BackendResource::new(backend(HEADER_SIZE as usize + 8192)) }.unwrap();
        let a = r.allocate(4096, 4096).unwrap();
        // The second page is free and on a 4 KiB boundary, though smaller than a 4 KiB request
        // with its worst-case padding: it serves the request.
        let b = r.allocate(4096, 4096).unwrap();
        assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + 4096);
        assert_eq!(r.free_bytes(), 0);
        r.check().unwrap();
        assert!(matches!(r.allocate(64, 64), Err(Error::OutOfMemory { .. })));
        // SAFETY: both came from `r` with these sizes.
        unsafe {
            r.deallocate(a, 4096, 4096);
            r.deallocate(b, 4096, 4096);
        }
        assert_eq!(r.free_bytes(), 8192);
        r.check().unwrap();
    }

    #[test]
    fn requests_no_layout_allows_are_invalid_not_out_of_memory() {
        // SAFETY: a fresh backend, which nothing else carves.
        let r = unsafe { BackendResource::new(backend(1 << 16)) }.unwrap();
        // As the host resource answers them: the sizes are bad input, whatever the region holds.
        for (size, align) in
            [(isize::MAX as usize - 8, 16), (isize::MAX as usize / 2 + 2, 1 << (usize::BITS - 2)), (0, 16)]
        {
            let err = r.allocate(size, align).unwrap_err();
            assert!(matches!(err, Error::InvalidSize { .. }), "{size:#x} {align:#x}: {err:?}");
            assert_eq!(Some(err), HostResource.allocate(size, align).err());
        }
        assert!(matches!(r.allocate(16, 24), Err(Error::InvalidAlignment { align: 24 })));
        assert_eq!(r.free_bytes(), r.range().1);
        r.check().unwrap();
    }
}
