//! The region allocators.
//!
//! - [`StackAllocator`]: bump allocation; frees in LIFO order reclaim space at once, other frees
//!   are reclaimed when everything above them is freed; `reset` frees all.
//! - [`ScalablePageAllocator`]: size-classed free lists shared by every process, behind
//!   per-thread caches in the region; caches of dead processes are recovered.
//! - [`ThreadLocalAllocator`]: per-thread heaps inside the region; remote frees go back to their
//!   owner; heaps of exited threads and dead processes are reclaimed.
//! - [`BitmapAllocator`]: power-of-two blocks claimed by bit without a lock, the one GPU kernels
//!   share with the CPU (its C twin is in hetmem-gpu).
//!
//! The two span allocators share their parts: [`size_class`] (four classes per doubling),
//! `free_space` (the coalescing best-fit manager of 4 KiB units), `span` (block and span
//! formats), `large` (blocks above the classes), `slots` (per-thread records in the region),
//! `fast_slot` (the per-thread cache of which slot a thread holds), `held` (the slots threads
//! hold through a handle, which its drop gives back) and `common` (header, statistics,
//! policies).
//!
//! A process that calls `fork()` after using a span allocator leaves its slots (thread caches,
//! heaps) to itself: in the child, the first use takes a slot of the child's own, marked with
//! the child's process stamp, so parent and child may allocate at once and recovery judges each
//! by its own life ([`crate::fork`]; `tests/fork.rs`).

#[cfg(target_has_atomic = "64")]
mod bitmap;
mod stack;

#[cfg(not(loom))]
mod common;
#[cfg(not(loom))]
mod fast_slot;
#[cfg(not(loom))]
mod free_space;
#[cfg(not(loom))]
mod held;
#[cfg(not(loom))]
mod large;
#[cfg(not(loom))]
mod scalable_page;
pub mod size_class;
#[cfg(not(loom))]
mod slots;
#[cfg(not(loom))]
mod span;
#[cfg(all(test, feature = "std", not(loom)))]
mod testing;
#[cfg(not(loom))]
mod thread_local;

#[cfg(target_has_atomic = "64")]
pub use bitmap::{
    BitmapAllocator, BitmapConfig, BitmapHeader, ClassRecord, BITMAP_MAGIC, MAX_BLOCK, MAX_CLASSES, MIN_BLOCK,
};
pub use stack::{StackAllocator, StackConfig};

/// Forgets which slots the calling thread holds, in the child of a `fork` (see [`crate::fork`]).
#[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
pub(crate) fn forget_thread_slots_after_fork() {
    fast_slot::forget_after_fork();
}

#[cfg(not(loom))]
pub use common::{ClassStats, DeadProcessBlocks};
#[cfg(not(loom))]
pub use scalable_page::{ScalablePageAllocator, ScalablePageConfig};
#[cfg(not(loom))]
pub use thread_local::{ThreadLocalAllocator, ThreadLocalConfig};

use crate::error::{Error, Result};
use crate::region::{Region, MAX_ALIGN};

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Checks a request the way every region allocator must: non-zero size, power-of-two alignment
/// no larger than the page size.
pub(crate) fn check_request(size: usize, align: usize) -> Result<()> {
    crate::check_layout(size, align)?;
    if align > MAX_ALIGN {
        return Err(Error::InvalidAlignment { align: align as u64 });
    }
    Ok(())
}

/// The allocator header of type `T` at the start of `region`.
///
/// # Safety
/// The region's first `size_of::<T>()` bytes hold a `T` (or zeroes, if `T` is valid as zeroes)
/// for as long as the returned reference is used, and they are only ever mutated through
/// atomics or `T`'s locks.
pub(crate) unsafe fn header_at<T>(region: &Region) -> Result<&T> {
    let ptr = region.ptr(region.offset(), core::mem::size_of::<T>() as u64)?;
    if ptr.align_offset(core::mem::align_of::<T>()) != 0 {
        return Err(Error::InvalidAlignment { align: core::mem::align_of::<T>() as u64 });
    }
    // SAFETY: in bounds and aligned (checked above); validity is the caller's promise.
    Ok(unsafe { &*ptr.cast::<T>() })
}
