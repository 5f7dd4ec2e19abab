//! Upstream sources of blocks: the [`MemoryResource`] trait.
//!
//! Pools (the coalescing pool, device-memory pools) draw big blocks from a resource and carve
//! them. A resource may hand out memory the CPU cannot touch (device memory), so nothing that
//! takes a resource may dereference its blocks unless [`MemoryResource::host_accessible`] says so.

use core::ptr::NonNull;

use crate::error::Result;

/// Where a resource's memory lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum MemoryKind {
    /// Ordinary pageable host memory.
    Host,
    /// Page-locked host memory the GPU can reach directly.
    PinnedHost,
    /// GPU device memory.
    Device,
}

/// A source of blocks for pools.
///
/// Contract: `allocate` returns a block of at least `size` bytes aligned to `align`, or an error
/// (out of memory is `Error::OutOfMemory`, and the resource stays usable); `deallocate` takes back
/// exactly a block this resource returned, with the same size and alignment.
///
/// # Safety
/// Pools hand a resource's blocks to their callers as memory of the size asked for, and the
/// thread caches ([`HetAlloc`](crate::cache::HetAlloc), as a global allocator too) write their
/// links into the blocks of a resource that says it is host-accessible, without checking either.
/// So an implementation promises that a block `allocate(size, align)` returns is `size` bytes
/// aligned to `align`, overlaps no other block it handed out and has not taken back, and stays
/// valid until it is given to `deallocate` or the resource is dropped; that the block is valid
/// for reads and writes by the CPU whenever [`host_accessible`](Self::host_accessible) says so
/// (and `kind` tells the truth about where it lives); and that both calls may be made from any
/// thread.
///
/// A safe implementation could otherwise hand out a dangling pointer that safe code then
/// writes through:
///
/// ```compile_fail,E0200
/// use core::ptr::NonNull;
/// use hetmem_core::{MemoryKind, MemoryResource};
/// struct Liar;
/// impl MemoryResource for Liar { // needs `unsafe impl`
///     fn name(&self) -> &str {
///         "liar"
///     }
///     fn kind(&self) -> MemoryKind {
///         MemoryKind::Host
///     }
///     fn allocate(&self, _size: usize, _align: usize) -> hetmem_core::Result<NonNull<u8>> {
///         Ok(NonNull::dangling())
///     }
///     unsafe fn deallocate(&self, _ptr: NonNull<u8>, _size: usize, _align: usize) {}
/// }
/// ```
pub unsafe trait MemoryResource: Send + Sync {
    /// A short name for reports ("host", "cuda-device", …).
    fn name(&self) -> &str;

    /// Where the memory lives.
    fn kind(&self) -> MemoryKind;

    /// Whether the CPU may dereference blocks from this resource.
    fn host_accessible(&self) -> bool {
        self.kind() != MemoryKind::Device
    }

    /// A block of `size` bytes aligned to `align` (a power of two).
    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>>;

    /// Returns a block.
    ///
    /// # Safety
    /// `ptr` came from `allocate` on this resource with this `size` and `align`, and is not used
    /// again.
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize);
}

/// Implements [`MemoryResource`] for a pointer type `$ptr` to any resource `R` by forwarding.
macro_rules! forward_memory_resource {
    ($(#[$attr:meta])* $ptr:ty) => {
        $(#[$attr])*
        // SAFETY: forwards every call to `R`, which keeps the promises.
        unsafe impl<R: MemoryResource + ?Sized> MemoryResource for $ptr {
            fn name(&self) -> &str {
                (**self).name()
            }
            fn kind(&self) -> MemoryKind {
                (**self).kind()
            }
            fn host_accessible(&self) -> bool {
                (**self).host_accessible()
            }
            fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
                (**self).allocate(size, align)
            }
            unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
                // SAFETY: the caller's contract, passed on to the resource it was made for.
                unsafe { (**self).deallocate(ptr, size, align) }
            }
        }
    };
}

forward_memory_resource!(
    /// A shared reference to a resource is a resource (so several pools can draw on one).
    &R
);
forward_memory_resource!(
    /// A resource behind an `Arc` is a resource (so several pools can own one).
    #[cfg(feature = "alloc")]
    alloc::sync::Arc<R>
);
