//! Frames for async tasks: the memory a boxed future lives in, recycled instead of freed.
//!
//! - [`FrameAllocator`]: `allocate(size)` / `deallocate(ptr, size)`, frames aligned to
//!   [`FRAME_ALIGN`].
//! - [`RecyclingFrameAllocator`]: thread-local free lists binned by power-of-two size class; in
//!   steady state a task's frame is the one the previous task of that size gave back.
//! - [`CountingAllocator`]: wraps another to count frames, bytes and the peak, for profiling.
//! - [`FrameBox`]: a box (and, pinned, a boxed future) whose memory comes from a frame allocator.
//! - [`with_frame_allocator`]: a scope whose futures, and the futures they create while polled,
//!   take their frames from one allocator ([`FrameBox::pin_scoped`]).

mod counting;
mod frame_box;
mod recycling;
mod scope;

pub use counting::{CountingAllocator, CountingStats};
pub use frame_box::FrameBox;
pub use recycling::RecyclingFrameAllocator;
pub use scope::{current_frame_allocator, default_frame_allocator, with_frame_allocator};

use core::ptr::NonNull;

use crate::error::Result;

/// The alignment of every frame.
pub const FRAME_ALIGN: usize = 16;

/// Where async task frames come from.
///
/// `allocate` returns `size` bytes aligned to [`FRAME_ALIGN`] (`size` 0 is an error);
/// `deallocate` takes back such a frame with the same size, on any thread.
pub trait FrameAllocator: Sync {
    /// A frame of `size` bytes.
    fn allocate(&self, size: usize) -> Result<NonNull<u8>>;

    /// Takes back a frame.
    ///
    /// # Safety
    /// `ptr` came from `allocate(size)` on this allocator and is not used again.
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize);
}

impl<A: FrameAllocator + ?Sized> FrameAllocator for &A {
    fn allocate(&self, size: usize) -> Result<NonNull<u8>> {
        (**self).allocate(size)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded contract.
        unsafe { (**self).deallocate(ptr, size) }
    }
}
