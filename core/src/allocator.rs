//! How a region is carved up: the [`RegionAllocator`] and [`AllocatorType`] traits.
//!
//! A region allocator keeps all of its state inside its [`Region`], as offsets, so any process
//! that maps the region at any address can allocate and free in it. Its Rust value is only a
//! handle: creating one writes the state, attaching reads it back.

use crate::error::Result;
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::Region;

/// An allocator's counters, as bytes and counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes the allocator can give out in all (its region less its own header).
    pub capacity: u64,
    /// Bytes of live allocations, as requested.
    pub bytes_in_use: u64,
    /// Bytes taken from the capacity: live blocks with their headers and padding, and space not
    /// yet reclaimed.
    pub bytes_reserved: u64,
    /// The most `bytes_reserved` has been.
    pub high_watermark: u64,
    /// Live allocations.
    pub live_allocations: u64,
    /// Allocations made since creation.
    pub total_allocations: u64,
    /// Frees since creation.
    pub total_frees: u64,
}

impl AllocStats {
    /// Bytes that can still be reserved: `capacity - bytes_reserved`.
    pub fn free_bytes(&self) -> u64 {
        self.capacity.saturating_sub(self.bytes_reserved)
    }
}

/// The operations of an allocator whose state lives in its region.
///
/// Contract:
/// - `allocate` returns an offset (from the backend's start) of a block of at least `size` bytes
///   aligned to `align`, which is a power of two no larger than the page size (4096). Zero sizes
///   and bad alignments are errors; out of memory is `Error::OutOfMemory` and the allocator stays
///   usable.
/// - `free` and `reallocate` take offsets from `allocate`; anything else is refused with
///   `Error::InvalidFree` where the allocator can tell.
/// - After every live block is freed, `stats().free_bytes()` is back to its value after creation.
/// - `check` walks the allocator's structures and returns `Error::Corrupt` on the first broken
///   invariant.
pub trait RegionAllocator: Send + Sync + 'static {
    /// The allocator's id.
    fn id(&self) -> AllocatorId;

    /// The allocator type's name ("stack", …).
    fn type_name(&self) -> &'static str;

    /// The region the allocator owns.
    fn region(&self) -> &Region;

    /// Allocates `size` bytes aligned to `align`.
    fn allocate(&self, size: usize, align: usize) -> Result<OffsetPtr>;

    /// Resizes the block at `ptr` to `new_size` bytes aligned to `align`, in place where it can,
    /// else by allocating, copying the common prefix, and freeing. On error `ptr` stays valid.
    fn reallocate(&self, ptr: OffsetPtr, new_size: usize, align: usize) -> Result<OffsetPtr>;

    /// Frees the block at `ptr`. An error means nothing was freed: a block `ptr` names is still
    /// the caller's. (Damage that an allocator finds in its own structures after the block is
    /// freed, while tidying up, is left for the operation that needs them, and for `check`, to
    /// report.)
    fn free(&self, ptr: OffsetPtr) -> Result<()>;

    /// The size the block at `ptr` was allocated with.
    fn size_of(&self, ptr: OffsetPtr) -> Result<usize>;

    /// The allocator's counters.
    fn stats(&self) -> AllocStats;

    /// Walks every structure and verifies its invariants.
    fn check(&self) -> Result<()>;
}

/// How an allocator type is created in a region and attached to from another process.
pub trait AllocatorType: RegionAllocator + Sized {
    /// Stored in the region's directory and the allocator's header; checked on attach.
    const TYPE_ID: u32;

    /// Creation options.
    type Config: Default + Clone + Send + Sync;

    /// Writes a new allocator's state into `region`.
    fn create(region: Region, id: AllocatorId, config: &Self::Config) -> Result<Self>;

    /// Reads back an allocator another process created in `region`, checking its type and id.
    fn attach(region: Region, id: AllocatorId) -> Result<Self>;
}
