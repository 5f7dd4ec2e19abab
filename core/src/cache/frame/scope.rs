//! The frame-allocator scope: which allocator new frames come from on this thread right now.

use core::cell::Cell;
use core::future::Future;
use core::pin::Pin;
use core::ptr::NonNull;
use core::task::{Context, Poll};

use crate::cache::frame::{FrameAllocator, FrameBox, FrameTask, RecyclingFrameAllocator};
use crate::error::Result;

std::thread_local! {
    static CURRENT: Cell<Option<ScopeAllocator>> = const { Cell::new(None) };
}

/// A scope's allocator as the futures boxed in it hold it ([`FrameBox::pin_scoped`]): a
/// [`RecyclingFrameAllocator`] is called directly, its lists in line; any other allocator
/// through `dyn`.
///
/// [`FrameBox::pin_scoped`]: super::FrameBox::pin_scoped
#[derive(Clone, Copy)]
pub struct ScopeAllocator {
    alloc: &'static dyn FrameAllocator,
    /// `alloc` itself when it is a `RecyclingFrameAllocator`.
    lists: Option<&'static RecyclingFrameAllocator>,
}

impl ScopeAllocator {
    /// Captures `alloc` (asks it once whether it is a [`RecyclingFrameAllocator`]).
    pub fn new(alloc: &'static dyn FrameAllocator) -> Self {
        ScopeAllocator { alloc, lists: alloc.as_recycling() }
    }

    /// The default recycling allocator ([`default_frame_allocator`]), used outside any scope.
    #[inline]
    pub fn default_lists() -> Self {
        let lists = default_frame_allocator();
        ScopeAllocator { alloc: lists, lists: Some(lists) }
    }

    /// The default lists as a task boxed outside any scope holds them: the lists of
    /// [`Self::default_lists`], through an allocator of their own that no scope is ever made of,
    /// so that a poll of the task can tell it has no scope to enter ([`Self::scope`]).
    #[inline]
    pub(crate) fn unscoped() -> Self {
        // A static of its own (not `default_frame_allocator`, which a scope may be made of): its
        // address is no other allocator's. Its slot is the default lists' fixed one.
        static UNSCOPED: RecyclingFrameAllocator = RecyclingFrameAllocator::new();
        ScopeAllocator { alloc: &UNSCOPED, lists: Some(&UNSCOPED) }
    }

    /// The scope a task holding this allocator polls in: none for [`Self::unscoped`].
    #[inline]
    pub(crate) fn scope(self) -> Option<Self> {
        let unscoped = Self::unscoped().alloc;
        (!core::ptr::addr_eq(self.alloc, unscoped)).then_some(self)
    }

    /// The allocator captured.
    #[inline]
    pub fn as_dyn(self) -> &'static dyn FrameAllocator {
        self.alloc
    }

    /// Whether both capture the same allocator: one object of one type, the address and the
    /// vtable both equal. The address alone is not enough: an allocator and its first field (or
    /// two zero-sized allocators) share one, and a task polled in the other's scope would box
    /// its children there. (One allocator seen through two copies of its vtable, from two codegen
    /// units, counts as two: its tasks then enter its scope again, which costs a little time.)
    #[inline]
    pub fn same(self, other: Self) -> bool {
        core::ptr::eq(self.alloc, other.alloc)
    }
}

impl core::fmt::Debug for ScopeAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ScopeAllocator")
            .field("at", &(self.alloc as *const dyn FrameAllocator).cast::<()>())
            .field("recycling", &self.lists.is_some())
            .finish()
    }
}

// SAFETY: forwards both calls to one allocator (`lists` is `alloc` when set), which keeps the
// promises.
unsafe impl FrameAllocator for ScopeAllocator {
    #[inline]
    fn allocate(&self, size: usize) -> Result<NonNull<u8>> {
        match self.lists {
            Some(lists) => lists.allocate(size),
            None => self.alloc.allocate(size),
        }
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
        match self.lists {
            // SAFETY: forwarded contract: the same allocator (`lists` is `alloc`) handed the
            // frame out.
            Some(lists) => unsafe { lists.deallocate(ptr, size) },
            // SAFETY: as above.
            None => unsafe { self.alloc.deallocate(ptr, size) },
        }
    }

    fn as_recycling(&self) -> Option<&RecyclingFrameAllocator> {
        self.lists
    }
}

/// A future boxed in a scope's frame ([`FrameBox::pin_scoped`]): polling it enters that scope,
/// so the futures it creates (its children) inherit the allocator, wherever it is polled.
///
/// The task holds the allocator (and gives the frame back to it when dropped, in or out of the
/// scope); the frame holds the future alone. A poll compares the allocator with the thread's
/// current scope and enters the scope only when they differ: children polled by their parent,
/// and tasks run by an executor inside the scope, find it set.
///
/// A task boxed outside any scope has none: it takes its frame from the default lists, and its
/// polls run outside any scope (leaving the one they are polled in, if any), so its children
/// take the default lists too and [`current_frame_allocator`] is `None` there, as it was where
/// the task was boxed.
///
/// [`FrameBox::pin_scoped`]: super::FrameBox::pin_scoped
pub struct ScopedTask<'f, O>(pub(crate) FrameBox<dyn Future<Output = O> + Send + 'f, ScopeAllocator>);

impl<'f, O> ScopedTask<'f, O> {
    /// The allocator the frame came from: the scope's, or for a task boxed outside any scope
    /// the default lists ([`ScopeAllocator::default_lists`]).
    pub fn allocator(&self) -> ScopeAllocator {
        FrameBox::allocator(&self.0).scope().unwrap_or_else(ScopeAllocator::default_lists)
    }

    /// The boxed future, without the scope around its polls.
    pub fn into_inner(self) -> FrameTask<'f, O, ScopeAllocator> {
        FrameBox::into_pin(self.0)
    }
}

impl<O> Future for ScopedTask<'_, O> {
    type Output = O;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let task = &mut self.get_mut().0;
        let alloc = *FrameBox::allocator(task);
        // SAFETY: the future stays in its frame until the box drops it there: the task never
        // hands out the box unpinned (`into_inner` pins it).
        let future = unsafe { Pin::new_unchecked(&mut **task) };
        // Children polled inside their parent (or an executor that runs in the scope) find the
        // scope already set: nothing to do.
        if current_scope().is_some_and(|current| current.same(alloc)) {
            return future.poll(cx);
        }
        poll_in_scope(alloc.scope(), future, cx)
    }
}

impl<O> core::fmt::Debug for ScopedTask<'_, O> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ScopedTask").field("allocator", &self.allocator()).finish_non_exhaustive()
    }
}

/// Polls `future` inside `scope` (outside any for `None`): out of line, so the common case (the
/// scope already set) stays a comparison and a call.
#[cold]
#[inline(never)]
fn poll_in_scope<O>(
    scope: Option<ScopeAllocator>,
    future: Pin<&mut (dyn Future<Output = O> + Send + '_)>,
    cx: &mut Context<'_>,
) -> Poll<O> {
    with_scope(scope, || future.poll(cx))
}

/// Runs `f` with `alloc` as the calling thread's frame allocator, then restores the previous
/// one (also when `f` panics).
///
/// Futures boxed inside with [`FrameBox::pin_scoped`](super::FrameBox::pin_scoped) take their
/// frames from `alloc` and re-enter this scope each time they are polled, so the futures they
/// create (their children) inherit it, however deep, wherever they are polled. `alloc` is
/// captured once, here ([`ScopeAllocator::new`]).
pub fn with_frame_allocator<R>(alloc: &'static dyn FrameAllocator, f: impl FnOnce() -> R) -> R {
    with_scope(Some(ScopeAllocator::new(alloc)), f)
}

/// [`with_frame_allocator`] with the allocator already captured; `None` runs `f` outside any
/// scope.
#[inline]
fn with_scope<R>(alloc: Option<ScopeAllocator>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<ScopeAllocator>);
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            // At thread exit the slot may be gone; there is nothing to restore then.
            let _ = CURRENT.try_with(|c| c.set(self.0));
        }
    }
    let previous = CURRENT.try_with(|c| c.replace(alloc)).ok().flatten();
    let _restore = Restore(previous);
    f()
}

/// The frame allocator of the innermost [`with_frame_allocator`] scope on this thread: also, while
/// a [`ScopedTask`] is polled, the scope it was boxed in. `None` outside any scope, and while a
/// task boxed outside any scope is polled (its frames, and its children's, come from the
/// default lists).
#[inline]
pub fn current_frame_allocator() -> Option<&'static dyn FrameAllocator> {
    current_scope().map(ScopeAllocator::as_dyn)
}

/// The innermost scope's allocator, as captured.
#[inline]
pub fn current_scope() -> Option<ScopeAllocator> {
    CURRENT.try_with(Cell::get).ok().flatten()
}

/// The allocator used outside any scope: a [`RecyclingFrameAllocator`] over the global
/// allocator.
#[inline]
pub fn default_frame_allocator() -> &'static RecyclingFrameAllocator {
    static DEFAULT: RecyclingFrameAllocator = RecyclingFrameAllocator::new();
    &DEFAULT
}
