//! [`RecyclingFrameAllocator`]: frames from thread-local free lists binned by size.

use core::alloc::Layout;
use core::ptr::NonNull;

use crate::cache::config::CacheConfig;
use crate::cache::frame::{FrameAllocator, FRAME_ALIGN};
use crate::cache::size_class::{class_of_size, BLOCK_ALIGN, MAX_BLOCK};
use crate::cache::stats::CacheStats;
use crate::cache::tls::{SlotRef, Tier, SLOT_FRAMES};
use crate::cache::upstream::Upstream;
use crate::error::{Error, Result};
use crate::resource::MemoryResource;

/// Recycles frames through the calling thread's free lists, one per power-of-two size class.
///
/// A finished task's frame goes on the list of the thread that drops it (up to that class's
/// byte limit, [`CacheConfig::for_frames`]); the next frame of that class on that thread is
/// taken from there, so a steady stream of tasks allocates nothing upstream. Over a limit, a
/// batch moves to a shared depot, and an empty list refills from it: frames freed by one
/// thread serve another. Frames over 1 MiB go straight upstream.
///
/// All `RecyclingFrameAllocator`s with the same upstream share the lists. The upstream is the
/// program's global allocator ([`Self::new`]) or a [`MemoryResource`].
pub struct RecyclingFrameAllocator {
    slot: SlotRef,
}

impl RecyclingFrameAllocator {
    /// Recycles frames from the global allocator.
    pub const fn new() -> Self {
        RecyclingFrameAllocator { slot: SlotRef::fixed(SLOT_FRAMES, Tier::Frames, Upstream::Global) }
    }

    /// Recycles frames from `resource`. Six slots serve the resources of
    /// [`HetAlloc`](crate::cache::HetAlloc)s and `RecyclingFrameAllocator`s together, one per
    /// distinct resource and tier, claimed by the first frame (reading the statistics, checking,
    /// flushing or releasing before that claims none); a resource that finds none free passes
    /// straight through.
    /// A resource the CPU cannot access ([`MemoryResource::host_accessible`] false) gives no
    /// frames: `allocate` answers [`Error::Unsupported`].
    pub const fn with_resource(resource: &'static dyn MemoryResource) -> Self {
        RecyclingFrameAllocator { slot: SlotRef::lazy(Tier::Frames, Upstream::Resource(resource)) }
    }

    /// Statistics of the frame lists for this upstream, summed over live and exited threads:
    /// hits are recycled frames, upstream allocations are new ones.
    pub fn stats(&self) -> CacheStats {
        self.slot.stats()
    }

    /// The calling thread's frame-list statistics.
    pub fn thread_stats(&self) -> CacheStats {
        self.slot.thread_stats()
    }

    /// Gives the calling thread's frame lists their own limits (`None`: the defaults), applied
    /// at once. A thread has one frame configuration: it sets the limits of the thread's lists
    /// of every `RecyclingFrameAllocator` (and of [`ThreadFrames`]), whatever their upstream,
    /// not of this allocator's alone. Refused with [`Error::Unsupported`], keeping
    /// nothing, where the thread has no caches (once they were returned at its exit, see
    /// [`set_thread_role`](crate::cache::set_thread_role)).
    pub fn set_thread_config(&self, config: Option<CacheConfig>) -> Result<()> {
        self.slot.set_thread_config(config)
    }

    /// Returns the calling thread's recycled frames of this upstream (to the depot, then
    /// upstream); the lists of other upstreams keep theirs.
    pub fn flush_thread(&self) {
        self.slot.flush_thread();
    }

    /// Walks the calling thread's cache for this upstream and checks its invariants (limits
    /// held, lists as long as counted, no cycle).
    pub fn check_thread(&self) -> crate::error::Result<()> {
        self.slot.check_thread()
    }

    /// Frees the frames in the shared depot to the upstream.
    pub fn release_depot(&self) {
        // A depot that does not exist yet holds nothing: claiming a slot for it would waste one.
        if let Some(d) = self.slot.existing_depot() {
            // The slot's own upstream: the only one its depot ever served.
            let _ = d.release(&self.slot.upstream());
        }
    }

    #[inline]
    fn layout(size: usize) -> Result<Layout> {
        crate::check_layout(size, FRAME_ALIGN)?;
        Layout::from_size_align(size, FRAME_ALIGN)
            .map_err(|_| Error::InvalidSize { size: size as u64, reason: "frame too large" })
    }

    /// `allocate` through the lists of `slot`, this allocator's slot (a constant for the default
    /// lists, so [`ThreadFrames`] skips looking it up).
    #[inline(always)]
    fn allocate_at(&self, slot: usize, size: usize) -> Result<NonNull<u8>> {
        // The hot path: a size with a class (frames are FRAME_ALIGN-aligned, which every class
        // is), popped off this thread's list.
        match listed_class(size) {
            Some(class) => NonNull::new(self.slot.alloc_class(slot, class))
                .ok_or(Error::OutOfMemory { requested: size as u64, available: 0 }),
            None => self.allocate_unlisted(size),
        }
    }

    /// Sizes without a list: zero (an error) and frames over the largest class.
    #[cold]
    #[inline(never)]
    fn allocate_unlisted(&self, size: usize) -> Result<NonNull<u8>> {
        let layout = Self::layout(size)?;
        NonNull::new(self.slot.alloc(layout)).ok_or(Error::OutOfMemory { requested: size as u64, available: 0 })
    }

    /// `deallocate` through the lists of `slot` (see [`Self::allocate_at`]).
    ///
    /// # Safety
    /// As for [`FrameAllocator::deallocate`]; `slot` is this allocator's.
    #[inline(always)]
    unsafe fn deallocate_at(&self, slot: usize, ptr: NonNull<u8>, size: usize) {
        match listed_class(size) {
            // SAFETY: the caller's contract: a frame of this class from `allocate_at(slot, _)`.
            Some(class) => unsafe { self.slot.dealloc_class(slot, class, ptr) },
            // SAFETY: as above, a frame over the largest class.
            None => unsafe { self.deallocate_unlisted(ptr, size) },
        }
    }

    /// `allocate` before this allocator has its slot (its first use claims one) or when it has
    /// none (its frames pass straight through). An upstream the CPU cannot touch never gets a
    /// slot, so it is refused here: a frame holds a value the CPU writes.
    #[cold]
    #[inline(never)]
    fn allocate_unready(&self, size: usize) -> Result<NonNull<u8>> {
        if !self.slot.upstream().host_accessible() {
            return Err(Error::Unsupported("frames need memory the CPU can access"));
        }
        self.allocate_at(self.slot.slot(), size)
    }

    /// # Safety
    /// As for [`FrameAllocator::deallocate`].
    #[cold]
    #[inline(never)]
    unsafe fn deallocate_unready(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: the caller's contract; the slot is this allocator's.
        unsafe { self.deallocate_at(self.slot.slot(), ptr, size) }
    }

    /// # Safety
    /// As for [`FrameAllocator::deallocate`], for a frame of a size without a list.
    #[cold]
    #[inline(never)]
    unsafe fn deallocate_unlisted(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: `size` was accepted by `allocate`, so the layout is valid.
        let layout = unsafe { Layout::from_size_align_unchecked(size, FRAME_ALIGN) };
        // SAFETY: the caller's contract: a frame from `allocate(size)`.
        unsafe { self.slot.dealloc(ptr, layout) }
    }
}

/// The list a frame of `size` bytes goes on: `None` for 0 (no frame) and for sizes over the
/// largest class, in one comparison.
#[inline(always)]
fn listed_class(size: usize) -> Option<usize> {
    if size.wrapping_sub(1) < MAX_BLOCK {
        class_of_size(size)
    } else {
        None
    }
}

// Frames are served from the classes, whose blocks have this alignment.
const _: () = assert!(FRAME_ALIGN <= BLOCK_ALIGN);

impl Default for RecyclingFrameAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for RecyclingFrameAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RecyclingFrameAllocator").field("upstream", &self.slot.upstream()).finish()
    }
}

// SAFETY: frames come from the size-class lists (blocks of at least the class size, aligned to
// BLOCK_ALIGN >= FRAME_ALIGN) or straight from the upstream with a FRAME_ALIGN layout; a frame
// goes back on a list, or upstream, only when deallocated; the lists serve any thread.
unsafe impl FrameAllocator for RecyclingFrameAllocator {
    #[inline]
    fn allocate(&self, size: usize) -> Result<NonNull<u8>> {
        match self.slot.ready_slot() {
            Some(slot) => self.allocate_at(slot, size),
            None => self.allocate_unready(size),
        }
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
        match self.slot.ready_slot() {
            // SAFETY: the caller's contract; the slot is this allocator's.
            Some(slot) => unsafe { self.deallocate_at(slot, ptr, size) },
            // SAFETY: as above.
            None => unsafe { self.deallocate_unready(ptr, size) },
        }
    }

    fn as_recycling(&self) -> Option<&RecyclingFrameAllocator> {
        Some(self)
    }
}

/// The default recycled frames as a zero-sized handle: the calling thread's lists over the
/// global allocator, the same ones [`RecyclingFrameAllocator::new`] uses. A
/// `FrameBox<T, ThreadFrames>` is a single pointer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadFrames;

// SAFETY: the default `RecyclingFrameAllocator`'s lists, allocated and freed through the same
// fixed slot.
unsafe impl FrameAllocator for ThreadFrames {
    #[inline]
    fn allocate(&self, size: usize) -> Result<NonNull<u8>> {
        // The default allocator is `RecyclingFrameAllocator::new()`: its slot is fixed.
        super::default_frame_allocator().allocate_at(SLOT_FRAMES as usize, size)
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded contract; the same lists (same fixed slot) took the frame out.
        unsafe { super::default_frame_allocator().deallocate_at(SLOT_FRAMES as usize, ptr, size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CountingResource;

    /// Reading a fresh allocator over a resource (its figures, its check, a flush or a release
    /// of its depot, with nothing in them) claims none of the six resource slots: a slot is
    /// claimed by the first frame alone, and a table used up by reads would leave later
    /// allocators uncached. Another handle on a resource whose slot is claimed reads that slot.
    #[test]
    fn reading_a_fresh_allocator_claims_no_slot() {
        let counting = CountingResource::leak();
        // One vtable for both handles: two coercions may make two (see `Upstream`'s `eq`).
        let res: &'static dyn MemoryResource = counting;
        std::thread::spawn(move || {
            let frames = RecyclingFrameAllocator::with_resource(res);
            assert_eq!(frames.stats(), CacheStats::default());
            assert_eq!(frames.thread_stats(), CacheStats::default());
            frames.check_thread().unwrap();
            frames.flush_thread();
            frames.release_depot();
            assert!(!frames.slot.claimed(), "a read claimed a slot");
            // SAFETY: from `allocate(64)`.
            unsafe { frames.deallocate(frames.allocate(64).unwrap(), 64) };
            if frames.slot.ready_slot().is_some() {
                let other = RecyclingFrameAllocator::with_resource(res);
                assert_eq!(other.stats(), frames.stats());
                assert_eq!(
                    other.slot.ready_slot(),
                    frames.slot.ready_slot(),
                    "the same slot, read through another handle"
                );
                assert_eq!(other.thread_stats(), frames.thread_stats());
            }
            frames.flush_thread();
            frames.release_depot();
            assert_eq!(counting.live_blocks(), 0);
        })
        .join()
        .unwrap();
    }
}
