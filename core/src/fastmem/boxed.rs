//! `FastBox<T>`, the view of a store its boxes hold, and the unsizing macro.

use core::borrow::{Borrow, BorrowMut};
use core::fmt;
use core::future::Future;
use core::marker::PhantomData;
use core::mem::{size_of_val, ManuallyDrop};
use core::ops::{Deref, DerefMut};
use core::pin::Pin;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicUsize};
use core::task::{Context, Poll};

use super::class::{class_of, head_offset, LINK_BYTES};
use super::stack::{self, LINK_UNIT_SHIFT};

/// A laid-out store, seen without its size parameters: what a box needs to recycle its block.
///
/// Only [`fastbox_unsize!`](crate::fastbox_unsize) has a use for it outside this module.
#[derive(Clone, Copy)]
pub struct StoreRef<'a> {
    base: NonNull<u8>,
    _store: PhantomData<&'a ()>,
}

// SAFETY: a `StoreRef` stands for a shared reference to a `FastMemStore`, which is `Sync`.
unsafe impl Send for StoreRef<'_> {}
// SAFETY: as above.
unsafe impl Sync for StoreRef<'_> {}

impl<'a> StoreRef<'a> {
    /// # Safety
    /// `base` is the first byte of a [`FastMemStore`](super::FastMemStore) that is laid out at
    /// this address and borrowed for `'a`.
    pub(crate) unsafe fn new(base: NonNull<u8>) -> Self {
        StoreRef { base, _store: PhantomData }
    }

    pub(crate) fn base(self) -> NonNull<u8> {
        self.base
    }

    /// The head of size class `class`'s free stack.
    ///
    /// # Safety
    /// The store has a stack for `class` (it is at most the class of the store's `S`).
    #[inline(always)]
    pub(crate) unsafe fn head(self, class: u32) -> &'a AtomicUsize {
        // SAFETY: the heads are the store's first words, aligned for a word (the store's bytes
        // are, on every target) and only accessed atomically; `class` has one (caller's promise).
        unsafe { &*self.base.as_ptr().add(head_offset(class)).cast::<AtomicUsize>() }
    }

    /// The link cell of the block that `link` names in size class `class`.
    ///
    /// # Safety
    /// `link` names a block of `class` inside the store.
    #[inline(always)]
    pub(crate) unsafe fn link_cell(self, link: usize, class: u32) -> &'a AtomicU32 {
        let offset = (link << LINK_UNIT_SHIFT) + (1 << class) - LINK_BYTES;
        // SAFETY: the link cell is the block's last 4 bytes: inside the store, 4-aligned (blocks
        // are aligned to their size, at least 8), never part of a value, only accessed atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// Takes a recycled block of size class `class`, if its stack has one.
    ///
    /// # Safety
    /// The store has a stack for `class`.
    #[inline(always)]
    pub(crate) unsafe fn pop(self, class: u32) -> Option<NonNull<u8>> {
        // SAFETY: the caller's promise; every link on the stack names a block of `class`.
        let link = stack::pop(unsafe { self.head(class) }, |link| unsafe { self.link_cell(link, class) })?;
        // SAFETY: the link names a block inside the store.
        Some(unsafe { self.base.add(link << LINK_UNIT_SHIFT) })
    }

    /// Puts `block` on the free stack of `class`.
    ///
    /// # Safety
    /// `block` is a block of size class `class` of this store that nothing uses any more.
    #[inline(always)]
    pub(crate) unsafe fn recycle(self, block: NonNull<u8>, class: u32) {
        // SAFETY: blocks lie after the heads, inside the store, at offsets that are multiples of
        // the link unit (caller's promise).
        let link = unsafe { block.offset_from(self.base) } as usize >> LINK_UNIT_SHIFT;
        // SAFETY: as above; the store has a stack for every class it hands out.
        unsafe { stack::push(self.head(class), link, self.link_cell(link, class)) }
    }
}

/// A value in a [`FastMemStore`](super::FastMemStore) block; dropping it drops the value and puts
/// the block on its size class's free stack.
///
/// `T` may be unsized: [`fastbox_unsize!`](crate::fastbox_unsize) turns a `FastBox<T>` into a
/// `FastBox<dyn Trait>` or a `FastBox<[T]>`. Like `Box`, a `FastBox` never moves its value, so
/// [`into_pin`](FastBox::into_pin) is free (for boxes of a `static` store), and it is `Unpin`
/// whatever `T` is.
pub struct FastBox<'a, T: ?Sized> {
    ptr: NonNull<T>,
    store: StoreRef<'a>,
    _owns: PhantomData<T>,
}

// SAFETY: a `FastBox` owns its `T` like `Box` does; recycling goes through the store's atomics
// (or critical sections), which any thread may use.
unsafe impl<T: ?Sized + Send> Send for FastBox<'_, T> {}
// SAFETY: `&FastBox<T>` only gives `&T`.
unsafe impl<T: ?Sized + Sync> Sync for FastBox<'_, T> {}

impl<T: ?Sized> Unpin for FastBox<'_, T> {}

impl<'a, T> FastBox<'a, T> {
    /// A box for a zero-sized value: no block, a dangling well-aligned pointer.
    pub(crate) fn zero_sized(value: T, store: StoreRef<'a>) -> Self {
        debug_assert_eq!(core::mem::size_of::<T>(), 0);
        let ptr = NonNull::<T>::dangling();
        // SAFETY: writing a zero-sized value through an aligned non-null pointer is valid.
        unsafe { ptr.as_ptr().write(value) };
        FastBox { ptr, store, _owns: PhantomData }
    }

    /// Moves the value out and recycles the block.
    pub fn into_inner(boxed: Self) -> T {
        let boxed = ManuallyDrop::new(boxed);
        // SAFETY: the box owns an initialised `T`; it is not dropped (ManuallyDrop), so the value
        // is read exactly once.
        let value = unsafe { boxed.ptr.as_ptr().read() };
        // SAFETY: the value was moved out, so the block is unused.
        unsafe { boxed.release_block(core::mem::size_of::<T>()) };
        value
    }
}

impl<'a, T: ?Sized> FastBox<'a, T> {
    /// Gives up the box without dropping the value: the block stays taken for as long as the
    /// store is borrowed.
    pub fn leak(boxed: Self) -> &'a mut T {
        let boxed = ManuallyDrop::new(boxed);
        // SAFETY: the block is never recycled, so the value stays valid while the store is
        // borrowed ('a), and no one else has access to it.
        unsafe { &mut *boxed.ptr.as_ptr() }
    }

    /// Splits the box for [`fastbox_unsize!`](crate::fastbox_unsize). The block stays taken
    /// until the parts are put back together with [`__from_raw_parts`](Self::__from_raw_parts).
    #[doc(hidden)]
    pub fn __into_raw_parts(boxed: Self) -> (*mut T, StoreRef<'a>) {
        let boxed = ManuallyDrop::new(boxed);
        (boxed.ptr.as_ptr(), boxed.store)
    }

    /// Puts a box back together from [`__into_raw_parts`](Self::__into_raw_parts).
    ///
    /// # Safety
    /// `ptr` and `store` came from one `__into_raw_parts`, and `ptr` was at most coerced (e.g.
    /// unsized) since: the same address and the same value.
    #[doc(hidden)]
    pub unsafe fn __from_raw_parts(ptr: *mut T, store: StoreRef<'a>) -> Self {
        // SAFETY: `ptr` came out of a box, so it is not null (caller's promise).
        FastBox { ptr: unsafe { NonNull::new_unchecked(ptr) }, store, _owns: PhantomData }
    }

    /// Wraps a block that holds an initialised value.
    ///
    /// # Safety
    /// `ptr` points to the start of a block of this store of the size class of `size_of_val`
    /// of the value, the value is initialised and nothing else owns the block.
    #[inline(always)]
    pub(crate) unsafe fn from_raw_parts(ptr: *mut T, store: StoreRef<'a>) -> Self {
        // SAFETY: blocks are never at address 0 (caller's promise).
        FastBox { ptr: unsafe { NonNull::new_unchecked(ptr) }, store, _owns: PhantomData }
    }

    /// Recycles the block of a value of `size` bytes.
    ///
    /// # Safety
    /// The value was dropped or moved out, the box is not used afterwards, `size` is the value's.
    #[inline(always)]
    unsafe fn release_block(&self, size: usize) {
        if size != 0 {
            // SAFETY: the block holds a value of `size` bytes, so it is of class_of(size), which
            // the store has (it was checked against S at allocation); it is now unused.
            unsafe { self.store.recycle(self.ptr.cast(), class_of(size)) }
        }
    }
}

impl<T: ?Sized> FastBox<'static, T> {
    /// Pins the value where it is (a `FastBox` never moves its value), e.g. to poll a
    /// `FastBox<dyn Future>`.
    ///
    /// Only for boxes of a store borrowed for `'static` (a `static` store): `Pin` promises that
    /// a pinned value's memory is not reused before its destructor has run, and a box can be
    /// forgotten. A store borrowed for less could then be [`reset`](super::FastMemStore::reset),
    /// moved or dropped once the borrow ends, and its blocks handed out again under the
    /// forgotten value; a store borrowed for `'static` never can.
    ///
    /// ```compile_fail
    /// use hetmem_core::fastmem::{FastBox, FastMemStore};
    /// let mut store = FastMemStore::<256, 64>::new();
    /// let pinned = FastBox::into_pin(store.init().alloc(core::marker::PhantomPinned).unwrap());
    /// core::mem::forget(pinned);
    /// store.reset(); // would hand the pinned value's block out again
    /// ```
    pub fn into_pin(boxed: Self) -> Pin<Self> {
        // SAFETY: the value stays at its address until the box is dropped; `FastBox` gives no
        // way to move it out of a pinned box (`into_inner` takes the box by value, which `Pin`
        // does not give for `!Unpin` values); and the store is borrowed for 'static, so it is
        // never reset, moved or dropped: a forgotten box's block is never handed out again.
        unsafe { Pin::new_unchecked(boxed) }
    }
}

impl<T: ?Sized> Drop for FastBox<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        /// Recycles the block even if the value's destructor panics.
        struct Release<'b, 'a, T: ?Sized>(&'b FastBox<'a, T>, usize);
        impl<T: ?Sized> Drop for Release<'_, '_, T> {
            #[inline(always)]
            fn drop(&mut self) {
                // SAFETY: runs after the value was dropped; the box is being dropped.
                unsafe { self.0.release_block(self.1) }
            }
        }
        // SAFETY: the box owns an initialised value.
        let size = size_of_val(unsafe { self.ptr.as_ref() });
        let _release = Release(self, size);
        // SAFETY: the value is initialised and dropped exactly once, here.
        unsafe { core::ptr::drop_in_place(self.ptr.as_ptr()) };
    }
}

impl<T: ?Sized> Deref for FastBox<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialised value; `&self` gives shared access.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: ?Sized> DerefMut for FastBox<'_, T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the box owns an initialised value; `&mut self` gives exclusive access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: ?Sized> AsRef<T> for FastBox<'_, T> {
    fn as_ref(&self) -> &T {
        self
    }
}

impl<T: ?Sized> AsMut<T> for FastBox<'_, T> {
    fn as_mut(&mut self) -> &mut T {
        self
    }
}

impl<T: ?Sized> Borrow<T> for FastBox<'_, T> {
    fn borrow(&self) -> &T {
        self
    }
}

impl<T: ?Sized> BorrowMut<T> for FastBox<'_, T> {
    fn borrow_mut(&mut self) -> &mut T {
        self
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for FastBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for FastBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

impl<T: ?Sized> fmt::Pointer for FastBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Pointer::fmt(&self.ptr, f)
    }
}

impl<T: ?Sized + PartialEq> PartialEq for FastBox<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: ?Sized + Eq> Eq for FastBox<'_, T> {}

impl<F: ?Sized + Future + Unpin> Future for FastBox<'_, F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        F::poll(Pin::new(&mut **self), cx)
    }
}

/// Turns a `FastBox<T>` into a `FastBox<U>` where `T` unsizes to `U`: a trait object
/// (`dyn FnMut()`, `dyn Future<Output = ()>`, `dyn Any`) or a slice (`[T; N]` to `[T]`).
///
/// `CoerceUnsized` is unstable, so a `FastBox` cannot coerce by itself; this macro coerces the
/// raw pointer inside, which stable Rust allows, and therefore accepts exactly the coercions the
/// compiler accepts for `*mut T` to `*mut U`.
///
/// ```
/// use core::future::Future;
/// use hetmem_core::fastbox_unsize;
/// use hetmem_core::fastmem::{FastBox, FastMemStore};
///
/// static STORE: FastMemStore<512, 64> = FastMemStore::new();
/// let fm = STORE.init();
/// let mut calls = 0;
/// let mut f: FastBox<dyn FnMut() -> i32> =
///     fastbox_unsize!(fm.alloc(move || { calls += 1; calls })? => dyn FnMut() -> i32);
/// assert_eq!((*f)(), 1);
/// let s: FastBox<[u16]> = fastbox_unsize!(fm.alloc([1u16, 2, 3])? => [u16]);
/// assert_eq!(s.len(), 3);
/// let fut = fastbox_unsize!(fm.alloc(async { 7 })? => dyn Future<Output = i32>);
/// let _pinned = FastBox::into_pin(fut); // a static store's box can be pinned
/// # Ok::<(), hetmem_core::Error>(())
/// ```
#[macro_export]
macro_rules! fastbox_unsize {
    ($boxed:expr => $target:ty) => {{
        let (ptr, store) = $crate::fastmem::FastBox::__into_raw_parts($boxed);
        let ptr: *mut $target = ptr;
        // SAFETY: `ptr` and `store` come from one box and `ptr` was only coerced by the
        // compiler: same address, same value.
        unsafe { $crate::fastmem::FastBox::__from_raw_parts(ptr, store) }
    }};
}
