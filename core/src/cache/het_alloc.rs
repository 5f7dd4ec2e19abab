//! [`HetAlloc`]: the thread cache as a `GlobalAlloc` and an `allocator_api2` allocator.

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};

use crate::cache::stats::CacheStats;
use crate::cache::tls::{SlotRef, Tier, SLOT_SYSTEM};
use crate::cache::upstream::Upstream;
use crate::resource::MemoryResource;

/// An allocator that serves small requests from per-thread power-of-two caches.
///
/// ```
/// use hetmem_core::cache::HetAlloc;
///
/// #[global_allocator]
/// static A: HetAlloc = HetAlloc::new();
///
/// let v: Vec<u64> = (0..1000).collect();
/// assert_eq!(v.iter().sum::<u64>(), 499_500);
/// ```
///
/// Requests up to 1 MiB with an alignment of at most 16 are rounded up to a power of two and
/// served from the calling thread's bucket for that size; the bucket's byte limit comes from the
/// thread's role ([`set_thread_role`](super::set_thread_role)) or its own configuration. Frees
/// go to the freeing thread's bucket, then (over the limit) to a process-wide depot of batches,
/// then upstream. Bigger or more strictly aligned requests go straight upstream.
///
/// All `HetAlloc`s with the same upstream share the per-thread caches. The upstream is the
/// system allocator ([`HetAlloc::new`]) or a [`MemoryResource`] ([`HetAlloc::with_resource`];
/// up to six distinct resources get caches, later ones pass straight through). A resource used
/// by the global `HetAlloc` must not allocate through it.
///
/// As an [`Allocator`] it makes `allocator_api2::vec::Vec<T, HetAlloc>` and hashbrown maps use
/// the caches without being the global allocator.
pub struct HetAlloc {
    slot: SlotRef,
}

impl HetAlloc {
    /// Caches over the system allocator.
    pub const fn new() -> Self {
        HetAlloc {
            slot: SlotRef::fixed(SLOT_SYSTEM, Tier::Alloc, Upstream::System),
        }
    }

    /// Caches over `resource`, which must be host-accessible (device memory passes straight
    /// through uncached).
    pub const fn with_resource(resource: &'static dyn MemoryResource) -> Self {
        HetAlloc {
            slot: SlotRef::lazy(Tier::Alloc, Upstream::Resource(resource)),
        }
    }

    /// The upstream.
    pub fn upstream(&self) -> Upstream {
        self.slot.upstream()
    }

    /// The thread tier's statistics for this upstream, summed over live and exited threads.
    pub fn stats(&self) -> CacheStats {
        self.slot.stats()
    }

    /// The calling thread's cache statistics for this upstream.
    pub fn thread_stats(&self) -> CacheStats {
        self.slot.thread_stats()
    }

    /// The depot's statistics (hits and misses count batches).
    pub fn depot_stats(&self) -> CacheStats {
        self.slot.depot().map(|d| d.stats()).unwrap_or_default()
    }

    /// Sets the depot's byte limit (0 turns it off).
    pub fn set_depot_limit(&self, bytes: usize) {
        if let Some(d) = self.slot.depot() {
            d.set_limit(bytes);
        }
    }

    /// Frees everything the depot holds to the upstream.
    pub fn release_depot(&self) {
        if let Some(d) = self.slot.depot() {
            d.release(&self.slot.upstream());
        }
    }

    /// Returns the calling thread's cached blocks for this upstream (depot, then upstream).
    pub fn flush_thread(&self) {
        self.slot.flush_thread();
    }
}

impl Default for HetAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for HetAlloc {
    fn clone(&self) -> Self {
        HetAlloc {
            slot: self.slot.clone(),
        }
    }
}

impl fmt::Debug for HetAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HetAlloc")
            .field("upstream", &self.slot.upstream())
            .finish()
    }
}

// SAFETY: blocks are whole upstream blocks of at least the requested size and alignment (cached
// blocks are `16 << class` bytes, 16-aligned, and only serve requests that fit both); a block is
// handed out once until freed; `realloc` keeps the contents.
unsafe impl GlobalAlloc for HetAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.slot.alloc(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `GlobalAlloc`'s contract: `ptr` came from this allocator with `layout`.
        unsafe { self.slot.dealloc(NonNull::new_unchecked(ptr), layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.slot.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `GlobalAlloc`'s contract.
        unsafe {
            self.slot
                .realloc(NonNull::new_unchecked(ptr), layout, new_size)
        }
    }
}

fn dangling(layout: Layout) -> NonNull<[u8]> {
    // SAFETY: an alignment is never zero.
    let p = unsafe { NonNull::new_unchecked(layout.align() as *mut u8) };
    NonNull::slice_from_raw_parts(p, 0)
}

// SAFETY: as for `GlobalAlloc`; zero-sized requests get a dangling, aligned pointer that
// `deallocate` ignores; blocks can be freed through any clone (they share the caches).
unsafe impl Allocator for HetAlloc {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let p = NonNull::new(self.slot.alloc(layout)).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let p = NonNull::new(self.slot.alloc_zeroed(layout)).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: `Allocator`'s contract: `ptr` came from this allocator with `layout`.
            unsafe { self.slot.dealloc(ptr, layout) }
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: `Allocator`'s contract for `grow`.
        unsafe { self.resize(ptr, old, new) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: `Allocator`'s contract for `shrink`.
        unsafe { self.resize(ptr, old, new) }
    }
}

impl HetAlloc {
    /// `grow` and `shrink`: in place within a class, through `realloc` when the alignment stays.
    ///
    /// # Safety
    /// `Allocator::grow`'s contract.
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 || new.size() == 0 || old.align() != new.align() {
            let fresh = self.allocate(new)?;
            // SAFETY: distinct blocks; `min` bytes are valid in both.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    ptr.as_ptr(),
                    fresh.cast::<u8>().as_ptr(),
                    old.size().min(new.size()),
                );
                self.deallocate(ptr, old);
            }
            return Ok(fresh);
        }
        // SAFETY: same alignment, non-zero sizes; the caller's contract covers the rest.
        let p = unsafe { self.slot.realloc(ptr, old, new.size()) };
        let p = NonNull::new(p).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }
}
