//! hetmem-core: the pieces every other hetmem crate stands on.
//!
//! - [`Error`]: the one error type.
//! - [`ptr`]: offset pointers ([`OffsetPtr`], [`ShmPtr`], [`FullPtr`]) that mean the same thing in
//!   every process and on the GPU.
//! - [`backend`], [`header`]: where bytes live ([`MemoryBackend`]) and the header page every region
//!   starts with.
//! - [`allocator`], [`allocators`]: how a region is carved up ([`RegionAllocator`]), with all state
//!   inside the region.
//! - [`thread`]: what a thread is ([`ThreadModel`]).
//! - [`resource`]: upstream sources of blocks for pools ([`MemoryResource`]).
//! - [`pool`] (feature `alloc`): coalescing and fixed-size pools over any resource.
//! - [`sync`]: locks and lock-free lists that are safe to place in shared memory.
//! - [`liveness`]: the hook that tells whether another process still runs (crash recovery).
//! - [`fastmem`]: an O(1) allocator over a static store for `no_std` targets ([`FastMemStore`],
//!   [`FastBox`]); needs neither `std` nor `alloc`.
//! - [`manager`] (feature `std`): the registry that turns a [`ShmPtr`] into a local address.
//! - [`cache`] (feature `std`): process-private caching tiers: thread caches ([`cache::HetAlloc`]
//!   as a global allocator), typed pools, recycled async-task frames.
//!
//! The crate is `no_std` without its default `std` feature; `alloc` adds regions and allocators.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod backend;
#[doc(hidden)]
pub mod crash;
pub mod error;
pub mod fork;
// Lock-free fastmem needs compare-and-swap; the `critical-section` variant does not.
#[cfg(any(feature = "critical-section", target_has_atomic = "ptr"))]
pub mod fastmem;
#[cfg(target_has_atomic = "64")]
pub mod header;
#[cfg(target_has_atomic = "ptr")]
pub mod liveness;
pub mod ptr;
pub mod resource;
pub mod sync;
pub mod thread;

#[cfg(feature = "alloc")]
pub mod allocator;
#[cfg(feature = "alloc")]
pub mod allocators;
#[cfg(feature = "alloc")]
pub mod pool;
#[cfg(feature = "alloc")]
pub mod region;

#[cfg(feature = "std")]
pub mod manager;

#[cfg(all(feature = "std", not(loom)))]
pub mod cache;

#[cfg(all(test, feature = "std"))]
mod testing;

#[cfg(target_has_atomic = "64")]
pub use backend::MemoryBackend;
pub use backend::{BackendId, BackendKind};
pub use error::{Error, Result, ShortStr};
#[cfg(any(feature = "critical-section", target_has_atomic = "ptr"))]
pub use fastmem::{FastBox, FastMemStore};
#[cfg(target_has_atomic = "64")]
pub use header::RegionHeader;
#[cfg(target_has_atomic = "64")]
pub use ptr::AtomicOffsetPtr;
pub use ptr::{AllocatorId, FullPtr, OffsetPtr, ShmPtr};
pub use resource::{MemoryKind, MemoryResource};
pub use thread::{ThreadModel, TlsDestructor};

#[cfg(feature = "alloc")]
pub use allocator::{AllocStats, AllocatorType, RegionAllocator};
#[cfg(feature = "alloc")]
pub use allocators::StackAllocator;
#[cfg(all(feature = "alloc", not(loom)))]
pub use allocators::{ScalablePageAllocator, ThreadLocalAllocator};
#[cfg(feature = "alloc")]
pub use region::Region;

#[cfg(feature = "std")]
pub use manager::MemoryManager;

/// Checks a requested size and alignment, the way every allocator in hetmem does.
///
/// A size of zero, an alignment that is not a non-zero power of two, or a size that, rounded up
/// to the alignment, exceeds `isize::MAX` (as [`core::alloc::Layout`] rules) is rejected with the
/// matching [`Error`].
pub fn check_layout(size: usize, align: usize) -> Result<()> {
    if !align.is_power_of_two() {
        return Err(Error::InvalidAlignment { align: align as u64 });
    }
    if size == 0 {
        return Err(Error::InvalidSize { size: 0, reason: "zero-sized request" });
    }
    // The largest multiple of `align` up to `isize::MAX` (0 for an alignment of `isize::MAX + 1`).
    if size > (isize::MAX as usize + 1).wrapping_sub(align) {
        return Err(Error::InvalidSize { size: size as u64, reason: "size overflows when aligned" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_checks_reject_bad_input() {
        assert!(matches!(check_layout(0, 8), Err(Error::InvalidSize { .. })));
        assert!(matches!(check_layout(8, 3), Err(Error::InvalidAlignment { align: 3 })));
        assert!(matches!(check_layout(8, 0), Err(Error::InvalidAlignment { align: 0 })));
        assert!(matches!(check_layout(usize::MAX, 16), Err(Error::InvalidSize { .. })));
        // `Layout`'s rule: the size rounded up to the alignment must not exceed `isize::MAX`.
        for align in [1, 16, 4096, 1 << (usize::BITS - 2)] {
            let largest = isize::MAX as usize + 1 - align;
            assert!(check_layout(largest, align).is_ok());
            assert!(core::alloc::Layout::from_size_align(largest, align).is_ok());
            assert!(matches!(check_layout(largest + 1, align), Err(Error::InvalidSize { .. })));
            assert!(core::alloc::Layout::from_size_align(largest + 1, align).is_err());
        }
        assert!(matches!(check_layout(1, 1 << (usize::BITS - 1)), Err(Error::InvalidSize { .. })));
        assert!(check_layout(1, 4096).is_ok());
    }
}
