//! [`FrameBox`]: a box whose memory comes from a [`FrameAllocator`].

use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::fmt;
use core::future::Future;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};
use core::pin::Pin;
use core::ptr::{self, NonNull};

use crate::cache::frame::scope::{current_scope, ScopeAllocator, ScopedTask};
use crate::cache::frame::{FrameAllocator, FRAME_ALIGN};
use crate::error::{Error, Result};

/// A pinned, type-erased future in a frame: what an executor keeps per task.
pub type FrameTask<'f, O, A = &'static dyn FrameAllocator> = Pin<FrameBox<dyn Future<Output = O> + Send + 'f, A>>;

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
/// The frame is exactly the value's size when its alignment is at most [`FRAME_ALIGN`];
/// values aligned beyond that get `align` more bytes, sit at an aligned address inside, and
/// keep their distance from the frame's start in the word before them. Zero-sized values take
/// no frame.
///
/// The box holds its allocator by value, like `Box<T, A>`: a reference such as
/// `&'static RecyclingFrameAllocator` or `&'static dyn FrameAllocator` (the default), or a
/// zero-sized handle such as [`ThreadFrames`](super::ThreadFrames), which keeps the box at one
/// pointer (two for `dyn` values) — small enough to travel in registers.
pub struct FrameBox<T: ?Sized, A: FrameAllocator = &'static dyn FrameAllocator> {
    value: NonNull<T>,
    alloc: A,
    _owns: PhantomData<T>,
}

// SAFETY: the box owns its `T` (like `Box<T>`) and its allocator; frames may be given back from
// any thread (the trait's contract).
unsafe impl<T: ?Sized + Send, A: FrameAllocator + Send> Send for FrameBox<T, A> {}
// SAFETY: `&FrameBox` only gives `&T` and `&A`.
unsafe impl<T: ?Sized + Sync, A: FrameAllocator + Sync> Sync for FrameBox<T, A> {}

// The value is behind a pointer: moving the box never moves it (as with `Box`).
impl<T: ?Sized, A: FrameAllocator> Unpin for FrameBox<T, A> {}

/// The frame size for a value of this size and alignment (0: no frame).
#[inline]
fn frame_size(size: usize, align: usize) -> Option<usize> {
    if size == 0 {
        Some(0)
    } else if align <= FRAME_ALIGN {
        Some(size)
    } else {
        size.checked_add(align)
    }
}

impl<T, A: FrameAllocator> FrameBox<T, A> {
    /// Moves `value` into a frame from `alloc`.
    #[inline]
    pub fn new_in(value: T, alloc: A) -> Result<Self> {
        Self::new_with_in(|| value, alloc)
    }

    /// Takes a frame from `alloc` and builds the value in it with `make`, which the compiler can
    /// then write straight into the frame (no copy through the stack, as `Box::new` does).
    /// If no frame can be had, `make` is not called; if `make` panics, the frame goes back.
    #[inline]
    pub fn new_with_in(make: impl FnOnce() -> T, alloc: A) -> Result<Self> {
        let layout = Layout::new::<T>();
        let size = frame_size(layout.size(), layout.align())
            .ok_or(Error::InvalidSize { size: layout.size() as u64, reason: "frame size overflows once aligned" })?;
        let mut frame = None;
        let value_ptr = if size == 0 {
            NonNull::<T>::dangling()
        } else {
            let base = alloc.allocate(size)?;
            frame = Some((base, size));
            if layout.align() <= FRAME_ALIGN {
                base.cast::<T>()
            } else {
                // Past the first word, at the first address aligned for `T`: at most `align`
                // bytes in (the frame is FRAME_ALIGN-aligned), leaving `size` bytes after it.
                let addr = base.as_ptr() as usize;
                let offset = ((addr + 8 + layout.align() - 1) & !(layout.align() - 1)) - addr;
                // SAFETY: `offset` <= `align`, inside the frame of `size + align` bytes.
                let value = unsafe { base.as_ptr().add(offset) };
                // SAFETY: the word before the value is inside the frame (offset >= 8), aligned
                // (both the frame and the value are 8-aligned) and ours.
                unsafe { value.cast::<usize>().sub(1).write(offset) };
                // SAFETY: non-null, derived from `base`.
                unsafe { NonNull::new_unchecked(value.cast::<T>()) }
            }
        };
        // Gives the frame back if `make` panics.
        let on_unwind = GiveBack { alloc: &alloc, frame };
        // SAFETY: aligned, in bounds of a fresh frame (or a zero-sized write); ours.
        unsafe { value_ptr.as_ptr().write(make()) };
        core::mem::forget(on_unwind);
        Ok(FrameBox { value: value_ptr, alloc, _owns: PhantomData })
    }

    /// Moves `value` into a frame from `alloc` and pins it there (see [`Self::into_pin`] for why
    /// `A: 'static`).
    #[inline]
    pub fn pin_in(value: T, alloc: A) -> Result<Pin<Self>>
    where
        A: 'static,
    {
        Self::new_in(value, alloc).map(Self::into_pin)
    }

    /// Moves the value back out and gives the frame back.
    pub fn into_inner(self) -> T {
        let this = ManuallyDrop::new(self);
        let frame = this.frame();
        // SAFETY: the box is forgotten, so the allocator is moved out exactly once.
        let alloc = unsafe { ptr::read(&this.alloc) };
        let _give_back = GiveBack { alloc: &alloc, frame };
        // SAFETY: the value is live; the box is forgotten, so it is read (moved) exactly once.
        unsafe { this.value.as_ptr().read() }
    }
}

impl<'f, F: Future + Send + 'f, A: FrameAllocator> FrameBox<F, A> {
    /// The same box as a `dyn Future + Send`.
    #[inline]
    pub fn into_dyn_future(self) -> FrameBox<dyn Future<Output = F::Output> + Send + 'f, A> {
        let this = ManuallyDrop::new(self);
        let value: *mut (dyn Future<Output = F::Output> + Send + 'f) = this.value.as_ptr();
        FrameBox {
            // SAFETY: from a non-null pointer.
            value: unsafe { NonNull::new_unchecked(value) },
            // SAFETY: the old box is forgotten; the allocator moves to the new one.
            alloc: unsafe { ptr::read(&this.alloc) },
            _owns: PhantomData,
        }
    }

    /// Boxes `future` in a frame from `alloc`, pinned and type-erased: a task.
    #[inline]
    pub fn pin_dyn_in(future: F, alloc: A) -> Result<FrameTask<'f, F::Output, A>>
    where
        A: 'static,
    {
        Self::pin_dyn_with_in(|| future, alloc)
    }

    /// [`Self::pin_dyn_in`], building the future in the frame (see [`Self::new_with_in`]).
    #[inline]
    pub fn pin_dyn_with_in(make: impl FnOnce() -> F, alloc: A) -> Result<FrameTask<'f, F::Output, A>>
    where
        A: 'static,
    {
        Self::new_with_in(make, alloc).map(|b| FrameBox::into_pin(b.into_dyn_future()))
    }
}

impl<'f, F: Future + 'f, A: FrameAllocator> FrameBox<F, A> {
    /// The same box as a `dyn Future` (for futures that are not `Send`).
    #[inline]
    pub fn into_local_dyn_future(self) -> FrameBox<dyn Future<Output = F::Output> + 'f, A> {
        let this = ManuallyDrop::new(self);
        let value: *mut (dyn Future<Output = F::Output> + 'f) = this.value.as_ptr();
        FrameBox {
            // SAFETY: from a non-null pointer.
            value: unsafe { NonNull::new_unchecked(value) },
            // SAFETY: the old box is forgotten; the allocator moves to the new one.
            alloc: unsafe { ptr::read(&this.alloc) },
            _owns: PhantomData,
        }
    }
}

impl FrameBox<()> {
    /// Boxes `future` with the current scope's allocator
    /// ([`with_frame_allocator`](super::with_frame_allocator), else the default
    /// [`RecyclingFrameAllocator`](super::RecyclingFrameAllocator)) and makes every poll of it
    /// re-enter that scope, so the futures it creates inherit the allocator. Boxed outside any
    /// scope, it is polled outside any scope (see [`ScopedTask`]).
    ///
    /// The scope is read once, here: the task keeps its allocator, enters its scope when polled
    /// (a comparison with the thread's current scope when it is already set) and gives its frame
    /// back to it wherever it is dropped.
    #[inline]
    pub fn pin_scoped<'f, F: Future + Send + 'f>(future: F) -> Result<ScopedTask<'f, F::Output>> {
        Self::pin_scoped_with(|| future)
    }

    /// [`Self::pin_scoped`], building the future in the frame (see [`FrameBox::new_with_in`]).
    #[inline]
    pub fn pin_scoped_with<'f, F: Future + Send + 'f>(make: impl FnOnce() -> F) -> Result<ScopedTask<'f, F::Output>> {
        let alloc = current_scope().unwrap_or_else(ScopeAllocator::unscoped);
        FrameBox::new_with_in(make, alloc).map(|b| ScopedTask(b.into_dyn_future()))
    }
}

impl<T: ?Sized, A: FrameAllocator> FrameBox<T, A> {
    /// Pins the box (the value never moves while boxed).
    ///
    /// `A: 'static`, as for `Box::into_pin`: `Pin` promises that a pinned value's memory is not
    /// reused before its destructor runs, and a box can be forgotten. An allocator borrowed for
    /// less (`&'a Arena`) may free every frame when it is dropped, under the forgotten value.
    ///
    /// ```compile_fail
    /// use hetmem_core::cache::frame::{FrameBox, RecyclingFrameAllocator};
    /// let frames = RecyclingFrameAllocator::new(); // a local: borrowed for less than 'static
    /// let _pinned = FrameBox::pin_in(core::marker::PhantomPinned, &frames);
    /// ```
    #[inline]
    pub fn into_pin(this: Self) -> Pin<Self>
    where
        A: 'static,
    {
        // SAFETY: the value lives behind a pointer until the box drops it in place; the
        // allocator is 'static, so a forgotten box's frame stays valid for good.
        unsafe { Pin::new_unchecked(this) }
    }

    /// The allocator the frame came from.
    pub fn allocator(this: &Self) -> &A {
        &this.alloc
    }

    /// The size of the frame taken (0 for zero-sized values).
    pub fn frame_size(this: &Self) -> usize {
        this.frame().map_or(0, |(_, size)| size)
    }

    /// The frame (start, size) the value lives in; `None` for zero-sized values. Call it while
    /// the value is live: it reads the value's size and alignment.
    #[inline]
    fn frame(&self) -> Option<(NonNull<u8>, usize)> {
        // Seen through an `UnsafeCell`, so that asking for its size and alignment does not
        // read the value: a plain `&T` would count as a read of all its bytes, and a suspended
        // future may hold a `&mut` to one of its own locals that its destructor still writes
        // through (a read by anyone else ends such a borrow).
        // SAFETY: the value is live while the box owns it (callers ensure it is not dropped yet);
        // `UnsafeCell<T>` has the layout and metadata of `T`.
        let value = unsafe { &*(self.value.as_ptr() as *const UnsafeCell<T>) };
        let (size, align) = (core::mem::size_of_val(value), core::mem::align_of_val(value));
        let start = self.value.cast::<u8>();
        if align <= FRAME_ALIGN {
            // The common case, with the fewest steps: the frame is the value.
            return (size != 0).then_some((start, size));
        }
        // It fit when the frame was taken, so it does not overflow now.
        let frame = frame_size(size, align).filter(|&f| f != 0)?;
        // SAFETY: the distance to the frame's start was written in the word before the value
        // when the frame was taken.
        let offset = unsafe { start.as_ptr().cast::<usize>().sub(1).read() };
        // SAFETY: the frame starts `offset` bytes before the value.
        Some((unsafe { NonNull::new_unchecked(start.as_ptr().sub(offset)) }, frame))
    }
}

/// Gives a frame back when dropped (so it also happens when the value's destructor panics).
struct GiveBack<'a, A: FrameAllocator> {
    alloc: &'a A,
    frame: Option<(NonNull<u8>, usize)>,
}

impl<A: FrameAllocator> Drop for GiveBack<'_, A> {
    #[inline]
    fn drop(&mut self) {
        if let Some((start, size)) = self.frame {
            // SAFETY: the frame came from `alloc.allocate(size)` and holds no value (it was
            // dropped, moved out, or never built).
            unsafe { self.alloc.deallocate(start, size) };
        }
    }
}

impl<T: ?Sized, A: FrameAllocator> Drop for FrameBox<T, A> {
    #[inline]
    fn drop(&mut self) {
        let frame = self.frame();
        // Gives the frame back if the value's destructor panics.
        let on_unwind = GiveBack { alloc: &self.alloc, frame };
        // SAFETY: the value is live and dropped exactly once, here.
        unsafe { ptr::drop_in_place(self.value.as_ptr()) };
        // Without unwinding, the frame goes back here, in line: a guard dropped on both paths
        // would be an out-of-line call on the hot one.
        core::mem::forget(on_unwind);
        if let Some((start, size)) = frame {
            // SAFETY: the frame came from `alloc.allocate(size)` and the value in it is gone.
            unsafe { self.alloc.deallocate(start, size) };
        }
    }
}

impl<T: ?Sized, A: FrameAllocator> Deref for FrameBox<T, A> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the value is live while the box is.
        unsafe { self.value.as_ref() }
    }
}

impl<T: ?Sized, A: FrameAllocator> DerefMut for FrameBox<T, A> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the value is live and the box is its only owner.
        unsafe { self.value.as_mut() }
    }
}

impl<T: ?Sized + fmt::Debug, A: FrameAllocator> fmt::Debug for FrameBox<T, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
