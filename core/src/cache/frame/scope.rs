//! The frame-allocator scope: which allocator new frames come from on this thread right now.

use core::cell::Cell;

use crate::cache::frame::{FrameAllocator, RecyclingFrameAllocator};

std::thread_local! {
    static CURRENT: Cell<Option<&'static dyn FrameAllocator>> = const { Cell::new(None) };
}

/// Runs `f` with `alloc` as the calling thread's frame allocator, then restores the previous
/// one (also when `f` panics).
///
/// Futures boxed inside with [`FrameBox::pin_scoped`](super::FrameBox::pin_scoped) take their
/// frames from `alloc` and re-enter this scope each time they are polled, so the futures they
/// create (their children) inherit it, however deep, wherever they are polled.
pub fn with_frame_allocator<R>(alloc: &'static dyn FrameAllocator, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<&'static dyn FrameAllocator>);
    impl Drop for Restore {
        fn drop(&mut self) {
            // At thread exit the slot may be gone; there is nothing to restore then.
            let _ = CURRENT.try_with(|c| c.set(self.0));
        }
    }
    let previous = CURRENT.with(|c| c.replace(Some(alloc)));
    let _restore = Restore(previous);
    f()
}

/// The frame allocator of the innermost [`with_frame_allocator`] scope on this thread.
pub fn current_frame_allocator() -> Option<&'static dyn FrameAllocator> {
    CURRENT.try_with(Cell::get).ok().flatten()
}

/// Whether `alloc` is the innermost scope's allocator on this thread.
#[inline]
pub(crate) fn is_current_frame_allocator(alloc: &'static dyn FrameAllocator) -> bool {
    CURRENT.try_with(|c| c.get().is_some_and(|cur| core::ptr::addr_eq(cur, alloc))).unwrap_or(false)
}

/// The allocator used outside any scope: a [`RecyclingFrameAllocator`] over the global
/// allocator.
pub fn default_frame_allocator() -> &'static RecyclingFrameAllocator {
    static DEFAULT: RecyclingFrameAllocator = RecyclingFrameAllocator::new();
    &DEFAULT
}
