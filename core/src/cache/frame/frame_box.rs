//! [`FrameBox`]: a box whose memory comes from a [`FrameAllocator`].

use core::alloc::Layout;
use core::fmt;
use core::future::Future;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};
use core::pin::Pin;
use core::ptr::{self, NonNull};
use core::task::{Context, Poll};

use crate::cache::frame::scope::{current_frame_allocator, default_frame_allocator};
use crate::cache::frame::{with_frame_allocator, FrameAllocator, FRAME_ALIGN};
use crate::error::{Error, Result};

/// An owned value in a frame from a [`FrameAllocator`]; pinned, a boxed future.
///
/// ```
/// use core::future::Future;
/// use core::pin::Pin;
/// use hetmem_core::cache::frame::{FrameBox, RecyclingFrameAllocator};
///
/// static FRAMES: RecyclingFrameAllocator = RecyclingFrameAllocator::new();
///
/// let task: Pin<FrameBox<dyn Future<Output = u32> + Send, _>> =
///     FrameBox::pin_dyn_in(async { 42 }, &FRAMES)?;
/// # drop(task);
/// # Ok::<(), hetmem_core::Error>(())
/// ```
///
/// Values aligned beyond [`FRAME_ALIGN`] get a larger frame and are placed at the first aligned
/// address in it; zero-sized values take no frame.
pub struct FrameBox<T: ?Sized, A: ?Sized + FrameAllocator + 'static = dyn FrameAllocator> {
    value: NonNull<T>,
    /// The frame to give back: its start and size (`None` for zero-sized values).
    frame: Option<(NonNull<u8>, usize)>,
    alloc: &'static A,
    _owns: PhantomData<T>,
}

// SAFETY: the box owns its `T` (like `Box<T>`); the allocator is shared by reference and is
// `Sync` (the trait requires it), so the frame may be given back from any thread.
unsafe impl<T: ?Sized + Send, A: ?Sized + FrameAllocator> Send for FrameBox<T, A> {}
// SAFETY: `&FrameBox` only gives `&T`.
unsafe impl<T: ?Sized + Sync, A: ?Sized + FrameAllocator> Sync for FrameBox<T, A> {}

// The value is behind a pointer: moving the box never moves it (as with `Box`).
impl<T: ?Sized, A: ?Sized + FrameAllocator> Unpin for FrameBox<T, A> {}

impl<T, A: ?Sized + FrameAllocator> FrameBox<T, A> {
    /// Moves `value` into a frame from `alloc`.
    pub fn new_in(value: T, alloc: &'static A) -> Result<Self> {
        let layout = Layout::new::<T>();
        if layout.size() == 0 {
            let value_ptr = NonNull::<T>::dangling();
            // SAFETY: a zero-sized write to an aligned, non-null pointer.
            unsafe { value_ptr.as_ptr().write(value) };
            return Ok(FrameBox {
                value: value_ptr,
                frame: None,
                alloc,
                _owns: PhantomData,
            });
        }
        let slack = layout.align().saturating_sub(FRAME_ALIGN);
        let size = layout.size().checked_add(slack).ok_or(Error::InvalidSize {
            size: layout.size() as u64,
            reason: "frame size overflows once aligned",
        })?;
        let base = alloc.allocate(size)?;
        let offset = base.as_ptr().align_offset(layout.align());
        debug_assert!(offset <= slack);
        // SAFETY: `base` is `size` bytes aligned to FRAME_ALIGN; the first address aligned for
        // `T` is at most `slack` bytes in, leaving `layout.size()` bytes after it.
        let value_ptr = unsafe { NonNull::new_unchecked(base.as_ptr().add(offset).cast::<T>()) };
        // SAFETY: in bounds and aligned (above); the memory is ours and uninitialised.
        unsafe { value_ptr.as_ptr().write(value) };
        Ok(FrameBox {
            value: value_ptr,
            frame: Some((base, size)),
            alloc,
            _owns: PhantomData,
        })
    }

    /// Moves `value` into a frame from `alloc` and pins it there.
    pub fn pin_in(value: T, alloc: &'static A) -> Result<Pin<Self>> {
        Self::new_in(value, alloc).map(Self::into_pin)
    }

    /// Moves the value back out and gives the frame back.
    pub fn into_inner(self) -> T {
        let this = ManuallyDrop::new(self);
        // SAFETY: the value is live; the box is forgotten, so it is read (moved) exactly once.
        let value = unsafe { this.value.as_ptr().read() };
        this.give_back();
        value
    }
}

impl<'f, F: Future + Send + 'f, A: ?Sized + FrameAllocator> FrameBox<F, A> {
    /// The same box as a `dyn Future + Send`.
    pub fn into_dyn_future(self) -> FrameBox<dyn Future<Output = F::Output> + Send + 'f, A> {
        let this = ManuallyDrop::new(self);
        let value: *mut (dyn Future<Output = F::Output> + Send + 'f) = this.value.as_ptr();
        FrameBox {
            // SAFETY: from a non-null pointer.
            value: unsafe { NonNull::new_unchecked(value) },
            frame: this.frame,
            alloc: this.alloc,
            _owns: PhantomData,
        }
    }

    /// Boxes `future` in a frame from `alloc`, pinned and type-erased: a task.
    pub fn pin_dyn_in(
        future: F,
        alloc: &'static A,
    ) -> Result<Pin<FrameBox<dyn Future<Output = F::Output> + Send + 'f, A>>> {
        Self::new_in(future, alloc).map(|b| FrameBox::into_pin(b.into_dyn_future()))
    }
}

impl<'f, F: Future + 'f, A: ?Sized + FrameAllocator> FrameBox<F, A> {
    /// The same box as a `dyn Future` (for futures that are not `Send`).
    pub fn into_local_dyn_future(self) -> FrameBox<dyn Future<Output = F::Output> + 'f, A> {
        let this = ManuallyDrop::new(self);
        let value: *mut (dyn Future<Output = F::Output> + 'f) = this.value.as_ptr();
        FrameBox {
            // SAFETY: from a non-null pointer.
            value: unsafe { NonNull::new_unchecked(value) },
            frame: this.frame,
            alloc: this.alloc,
            _owns: PhantomData,
        }
    }
}

impl FrameBox<(), dyn FrameAllocator> {
    /// Boxes `future` with the current scope's allocator ([`with_frame_allocator`], else the
    /// default [`RecyclingFrameAllocator`](super::RecyclingFrameAllocator)) and makes every poll
    /// of it re-enter that scope, so the futures it creates inherit the allocator.
    pub fn pin_scoped<'f, F: Future + Send + 'f>(
        future: F,
    ) -> Result<Pin<FrameBox<dyn Future<Output = F::Output> + Send + 'f>>> {
        let alloc = current_frame_allocator().unwrap_or_else(|| default_frame_allocator());
        FrameBox::pin_dyn_in(Scoped { alloc, future }, alloc)
    }
}

impl<T: ?Sized, A: ?Sized + FrameAllocator> FrameBox<T, A> {
    /// Pins the box (the value never moves while boxed).
    pub fn into_pin(this: Self) -> Pin<Self> {
        // SAFETY: the value lives behind a pointer until the box drops it in place.
        unsafe { Pin::new_unchecked(this) }
    }

    /// The allocator the frame came from.
    pub fn allocator(this: &Self) -> &'static A {
        this.alloc
    }

    /// The size of the frame taken (0 for zero-sized values).
    pub fn frame_size(this: &Self) -> usize {
        this.frame.map_or(0, |(_, size)| size)
    }

    fn give_back(&self) {
        if let Some((base, size)) = self.frame {
            // SAFETY: the frame came from `alloc.allocate(size)` and the value in it is gone.
            unsafe { self.alloc.deallocate(base, size) };
        }
    }
}

impl<T: ?Sized, A: ?Sized + FrameAllocator> Drop for FrameBox<T, A> {
    fn drop(&mut self) {
        struct GiveBack<'a, T: ?Sized, A: ?Sized + FrameAllocator + 'static>(&'a FrameBox<T, A>);
        impl<T: ?Sized, A: ?Sized + FrameAllocator> Drop for GiveBack<'_, T, A> {
            fn drop(&mut self) {
                self.0.give_back();
            }
        }
        // The frame goes back even if the value's destructor panics.
        let guard = GiveBack(self);
        // SAFETY: the value is live and dropped exactly once, here.
        unsafe { ptr::drop_in_place(guard.0.value.as_ptr()) };
    }
}

impl<T: ?Sized, A: ?Sized + FrameAllocator> Deref for FrameBox<T, A> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the value is live while the box is.
        unsafe { self.value.as_ref() }
    }
}

impl<T: ?Sized, A: ?Sized + FrameAllocator> DerefMut for FrameBox<T, A> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the value is live and the box is its only owner.
        unsafe { self.value.as_mut() }
    }
}

impl<T: ?Sized + fmt::Debug, A: ?Sized + FrameAllocator> fmt::Debug for FrameBox<T, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A future that polls its inner future inside its allocator's scope.
struct Scoped<F> {
    alloc: &'static dyn FrameAllocator,
    future: F,
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let alloc = self.alloc;
        // SAFETY: `future` is structurally pinned: it is never moved out of `Scoped`, which is
        // itself pinned and has no `Drop` or `Unpin` impl of its own that could move it.
        let future = unsafe { self.map_unchecked_mut(|s| &mut s.future) };
        with_frame_allocator(alloc, || future.poll(cx))
    }
}
