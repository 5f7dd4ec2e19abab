//! Frames for async tasks: the memory a boxed future lives in, recycled instead of freed.
//!
//! - [`FrameAllocator`]: `allocate(size)` / `deallocate(ptr, size)`, frames aligned to
//!   [`FRAME_ALIGN`].
//! - [`RecyclingFrameAllocator`]: thread-local free lists binned by power-of-two size class; in
//!   steady state a task's frame is the one the previous task of that size gave back.
//!   [`ThreadFrames`] is the default one as a zero-sized handle.
//! - [`CountingAllocator`]: wraps another to count frames, bytes and the peak, for profiling.
//! - [`FrameBox`]: a box (and, pinned, a boxed future) whose memory comes from a frame allocator.
//! - [`with_frame_allocator`]: a scope whose futures, and the futures they create while polled,
//!   take their frames from one allocator: [`FrameBox::pin_scoped`] boxes a future as a
//!   [`ScopedTask`], which keeps the scope's allocator (a [`ScopeAllocator`]: a
//!   [`RecyclingFrameAllocator`] called directly, any other through `dyn`) and re-enters the
//!   scope when polled elsewhere.

mod counting;
mod frame_box;
mod recycling;
mod scope;

pub use counting::{CountingAllocator, CountingStats};
pub use frame_box::{FrameBox, FrameTask};
pub use recycling::{RecyclingFrameAllocator, ThreadFrames};
pub use scope::{
    current_frame_allocator, current_scope, default_frame_allocator, with_frame_allocator, ScopeAllocator, ScopedTask,
};

use core::ptr::NonNull;

use crate::error::Result;

/// The alignment of every frame.
pub const FRAME_ALIGN: usize = 16;

/// Where async task frames come from.
///
/// `allocate` returns `size` bytes aligned to [`FRAME_ALIGN`] (`size` 0 is an error);
/// `deallocate` takes back such a frame with the same size, on any thread.
///
/// # Safety
/// [`FrameBox`] writes values into the frames without checking them, so an implementation
/// promises that a frame `allocate(size)` returns is valid for reads and writes of `size` bytes,
/// aligned to [`FRAME_ALIGN`], overlaps no other frame it handed out and has not taken back, and
/// stays valid until it is given to `deallocate` or the allocator is dropped; and that
/// `deallocate` may be called from any thread.
///
/// A safe implementation could otherwise hand out a dangling pointer that safe code then
/// writes through:
///
/// ```compile_fail
/// use core::ptr::NonNull;
/// use hetmem_core::cache::frame::FrameAllocator;
/// struct Liar;
/// impl FrameAllocator for Liar { // needs `unsafe impl`
///     fn allocate(&self, _size: usize) -> hetmem_core::Result<NonNull<u8>> {
///         Ok(NonNull::dangling())
///     }
///     unsafe fn deallocate(&self, _ptr: NonNull<u8>, _size: usize) {}
/// }
/// ```
pub unsafe trait FrameAllocator: Sync {
    /// A frame of `size` bytes.
    fn allocate(&self, size: usize) -> Result<NonNull<u8>>;

    /// Takes back a frame.
    ///
    /// # Safety
    /// `ptr` came from `allocate(size)` on this allocator and is not used again.
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize);

    /// This allocator as the [`RecyclingFrameAllocator`] it is, if it is one used as is: a
    /// [`with_frame_allocator`] scope then has the futures boxed in it call the recycling lists
    /// directly instead of through `dyn` ([`ScopeAllocator`]). Wrappers that add behaviour (such
    /// as [`CountingAllocator`]) keep the default, `None`.
    fn as_recycling(&self) -> Option<&RecyclingFrameAllocator> {
        None
    }
}

// SAFETY: forwards to `A`, which keeps the promises.
unsafe impl<A: FrameAllocator + ?Sized> FrameAllocator for &A {
    #[inline]
    fn allocate(&self, size: usize) -> Result<NonNull<u8>> {
        (**self).allocate(size)
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded contract.
        unsafe { (**self).deallocate(ptr, size) }
    }

    fn as_recycling(&self) -> Option<&RecyclingFrameAllocator> {
        (**self).as_recycling()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::config::CacheConfig;
    use crate::cache::size_class::{MAX_BLOCK, MAX_BUCKETS};
    use crate::error::Error;
    use crate::testing::CountingResource;
    use core::future::Future;
    use core::pin::Pin;
    use core::task::{Context, Poll, Waker};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn counting() -> &'static CountingAllocator<RecyclingFrameAllocator> {
        Box::leak(Box::new(CountingAllocator::new(RecyclingFrameAllocator::new())))
    }

    /// Polls a future to completion on this thread.
    fn block_on<F: Future>(f: F) -> F::Output {
        let mut f = core::pin::pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    /// Pending once, then ready.
    struct YieldOnce(bool);
    impl Future for YieldOnce {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_freed_frame_serves_the_next_one_of_its_class() {
        std::thread::spawn(|| {
            let frames = RecyclingFrameAllocator::new();
            let p = frames.allocate(100).unwrap();
            // SAFETY: from `allocate(100)`.
            unsafe { frames.deallocate(p, 100) };
            let q = frames.allocate(120).unwrap();
            assert_eq!(p, q, "100 and 120 bytes share the 128-byte class");
            assert_eq!(q.as_ptr() as usize % FRAME_ALIGN, 0);
            // SAFETY: from `allocate(120)`.
            unsafe { frames.deallocate(q, 120) };
            let s = frames.thread_stats();
            assert_eq!((s.hits, s.upstream_allocations), (1, 1));
            frames.check_thread().unwrap();
            assert!(matches!(frames.allocate(0), Err(Error::InvalidSize { .. })));
            assert!(matches!(frames.allocate(usize::MAX), Err(Error::InvalidSize { .. })));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_counting_allocator_counts_frames_bytes_and_peak() {
        let c = CountingAllocator::new(RecyclingFrameAllocator::new());
        let a = c.allocate(64).unwrap();
        let b = c.allocate(200).unwrap();
        // SAFETY: from `allocate` with these sizes.
        unsafe {
            c.deallocate(a, 64);
            c.deallocate(b, 200);
        }
        let s = c.stats();
        assert_eq!(
            s,
            CountingStats { allocations: 2, deallocations: 2, bytes_allocated: 264, live_bytes: 0, peak_bytes: 264 }
        );
        c.reset();
        assert_eq!(c.stats().peak_bytes, 0);
        assert!(c.allocate(0).is_err());
        assert_eq!(c.stats().allocations, 0, "failed requests are not counted");
    }

    /// Frames from the system allocator, each recorded so a wrong pointer or size on the way
    /// back fails the test.
    struct Recorder(std::sync::Mutex<Vec<(usize, usize)>>);

    // SAFETY: frames of `size` bytes aligned to FRAME_ALIGN from the global allocator, each
    // freed once, when given back.
    unsafe impl FrameAllocator for Recorder {
        fn allocate(&self, size: usize) -> crate::Result<NonNull<u8>> {
            let layout = core::alloc::Layout::from_size_align(size, FRAME_ALIGN).unwrap();
            // SAFETY: tests ask for non-zero sizes.
            let p = NonNull::new(unsafe { std::alloc::alloc(layout) }).unwrap();
            self.0.lock().unwrap().push((p.as_ptr() as usize, size));
            Ok(p)
        }
        unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
            let mut live = self.0.lock().unwrap();
            let i = live
                .iter()
                .position(|&e| e == (ptr.as_ptr() as usize, size))
                .expect("a frame this allocator gave out, with its size");
            live.swap_remove(i);
            let layout = core::alloc::Layout::from_size_align(size, FRAME_ALIGN).unwrap();
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }

    #[test]
    fn over_aligned_values_find_their_frame_again() {
        let rec: &'static Recorder = Box::leak(Box::new(Recorder(Default::default())));
        #[repr(align(64))]
        struct Wide([u8; 100]);
        #[repr(align(4096))]
        struct Page(u8);
        for _ in 0..50 {
            let b = FrameBox::new_in(Wide([9; 100]), rec).unwrap();
            assert_eq!(&*b as *const Wide as usize % 64, 0);
            assert_eq!(FrameBox::frame_size(&b), size_of::<Wide>() + 64);
            assert_eq!(b.0[99], 9);
            let p = FrameBox::new_in(Page(3), rec).unwrap();
            assert_eq!(&*p as *const Page as usize % 4096, 0);
            assert_eq!(p.into_inner().0, 3);
            drop(b);
        }
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn frame_boxes_give_their_frame_back_once() {
        let c = counting();
        let b = FrameBox::new_in([7u8; 100], c).unwrap();
        assert_eq!(FrameBox::frame_size(&b), 100);
        drop(b);
        let zst = FrameBox::new_in((), c).unwrap();
        assert_eq!(FrameBox::frame_size(&zst), 0);
        drop(zst);
        let v = FrameBox::new_in(String::from("kept"), c).unwrap().into_inner();
        assert_eq!(v, "kept");
        let s = c.stats();
        assert_eq!((s.allocations, s.deallocations, s.live_bytes), (2, 2, 0));
        assert_eq!(s.bytes_allocated, 100 + size_of::<String>() as u64);
    }

    #[test]
    fn a_panicking_destructor_still_returns_the_frame() {
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("boom");
            }
        }
        let c = counting();
        let b = FrameBox::new_in(Bomb, c).unwrap();
        let _ = FrameBox::frame_size(&b);
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(b))).is_err());
        assert_eq!(c.stats().deallocations, 0, "zero-sized: no frame to return");
        struct SizedBomb([u8; 32]);
        impl Drop for SizedBomb {
            fn drop(&mut self) {
                panic!("boom {}", self.0[0]);
            }
        }
        let b = FrameBox::new_in(SizedBomb([1; 32]), c).unwrap();
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(b))).is_err());
        assert_eq!(c.stats().deallocations, 1);
    }

    #[test]
    fn a_panicking_constructor_returns_the_frame() {
        let c = counting();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            FrameBox::new_with_in(|| -> [u8; 64] { panic!("make") }, c)
        }));
        assert!(r.is_err());
        #[repr(align(64))]
        struct Wide(#[allow(dead_code)] [u8; 100]);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            FrameBox::new_with_in(|| -> Wide { panic!("make") }, c)
        }));
        assert!(r.is_err());
        let s = c.stats();
        assert_eq!((s.allocations, s.deallocations, s.live_bytes), (2, 2, 0), "both frames went back");
    }

    /// A "device" resource: it says the CPU cannot touch its blocks (they are host memory here,
    /// counted, so the test sees whether any was handed out).
    struct FakeDevice(std::sync::atomic::AtomicUsize);

    // SAFETY: blocks from the global allocator with the layout asked for, freed with it.
    unsafe impl crate::MemoryResource for FakeDevice {
        fn name(&self) -> &str {
            "fake device"
        }
        fn kind(&self) -> crate::MemoryKind {
            crate::MemoryKind::Device
        }
        fn allocate(&self, size: usize, align: usize) -> crate::Result<NonNull<u8>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let layout = core::alloc::Layout::from_size_align(size, align).unwrap();
            // SAFETY: frames are never zero-sized.
            Ok(NonNull::new(unsafe { std::alloc::alloc(layout) }).unwrap())
        }
        unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
            let layout = core::alloc::Layout::from_size_align(size, align).unwrap();
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
        }
    }

    #[test]
    fn frames_are_never_taken_from_memory_the_cpu_cannot_touch() {
        static DEVICE: FakeDevice = FakeDevice(std::sync::atomic::AtomicUsize::new(0));
        static FRAMES: RecyclingFrameAllocator = RecyclingFrameAllocator::with_resource(&DEVICE);
        for size in [64, MAX_BLOCK + 1] {
            assert!(matches!(FRAMES.allocate(size), Err(Error::Unsupported(_))), "{size} bytes");
        }
        assert!(matches!(FrameBox::new_in([1u8; 64], &FRAMES), Err(Error::Unsupported(_))));
        assert_eq!(DEVICE.0.load(std::sync::atomic::Ordering::Relaxed), 0, "no device block was taken");
    }

    #[test]
    fn boxed_futures_run_and_free() {
        let c = counting();
        let task = FrameBox::pin_dyn_in(
            async {
                YieldOnce(false).await;
                7u32
            },
            c,
        )
        .unwrap();
        assert_eq!(block_on(task), 7);
        let local = FrameBox::new_in(async { std::rc::Rc::new(3) }, c).unwrap().into_local_dyn_future();
        assert_eq!(*block_on(FrameBox::into_pin(local)), 3);
        assert_eq!(c.stats().live_bytes, 0);
    }

    /// A future suspended while one of its locals borrows another, whose destructor writes
    /// through that borrow, is dropped in its frame before it finishes. Only Miri sees the fault
    /// this guards against (`ci/test` runs it there): finding the frame must not read the
    /// future, or the borrow it still holds ends before its destructor writes through it.
    #[test]
    fn a_suspended_future_that_borrows_itself_drops_in_its_frame() {
        struct Bump<'a>(&'a mut u32);
        impl Drop for Bump<'_> {
            fn drop(&mut self) {
                *self.0 += 1;
            }
        }
        async fn borrows_itself() {
            let mut n = 0u32;
            let _bump = Bump(&mut n);
            core::future::pending::<()>().await;
        }
        // A static, not `counting()`: Miri reports leaked allocators.
        static C: CountingAllocator<RecyclingFrameAllocator> = CountingAllocator::new(RecyclingFrameAllocator::new());
        let mut cx = Context::from_waker(Waker::noop());
        let mut task = FrameBox::pin_dyn_in(borrows_itself(), &C).unwrap();
        assert!(task.as_mut().poll(&mut cx).is_pending());
        drop(task);
        let mut scoped = with_frame_allocator(&C, || FrameBox::pin_scoped(borrows_itself())).unwrap();
        assert!(Pin::new(&mut scoped).poll(&mut cx).is_pending());
        drop(scoped);
        assert_eq!((C.stats().allocations, C.stats().live_bytes), (2, 0));
    }

    #[test]
    fn scopes_nest_and_restore_even_on_panic() {
        let a = counting();
        let b = counting();
        let is = |x: Option<&'static dyn FrameAllocator>, y: &'static dyn FrameAllocator| {
            x.is_some_and(|x| core::ptr::addr_eq(x, y))
        };
        assert!(current_frame_allocator().is_none());
        with_frame_allocator(a, || {
            assert!(is(current_frame_allocator(), a));
            with_frame_allocator(b, || assert!(is(current_frame_allocator(), b)));
            assert!(is(current_frame_allocator(), a));
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| with_frame_allocator(b, || panic!("inside"))));
            assert!(r.is_err());
            assert!(is(current_frame_allocator(), a));
        });
        assert!(current_frame_allocator().is_none());
    }

    #[test]
    fn children_inherit_the_scope_wherever_they_are_polled() {
        let a = counting();
        let root = with_frame_allocator(a, || scoped_tree(3));
        // Polled outside any scope.
        assert!(current_frame_allocator().is_none());
        assert_eq!(block_on(root), 7);
        let s = a.stats();
        assert_eq!(s.allocations, 15, "all 15 nodes took frames from the scope's allocator");
        assert_eq!(s.live_bytes, 0);
        // Outside a scope, the default recycling allocator is used.
        let before = default_frame_allocator().thread_stats();
        drop(FrameBox::pin_scoped(async {}).unwrap());
        let after = default_frame_allocator().thread_stats();
        assert_eq!(after.hits + after.misses, before.hits + before.misses + 1);
    }

    /// Inside a scoped task's poll, the current allocator is the scope the task was boxed in,
    /// wherever it is polled; a task boxed outside any scope is polled outside any scope (its
    /// children take the default lists, and there is no current allocator, as outside it).
    #[test]
    fn a_scoped_task_sees_the_scope_it_was_boxed_in_or_none() {
        let (a, b) = (counting(), counting());
        let seen = || {
            FrameBox::pin_scoped(async {
                let at = current_frame_allocator().map(|x| x as *const dyn FrameAllocator as *const () as usize);
                // A child boxed here: counted by `a` only inside `a`'s scope.
                drop(FrameBox::pin_scoped(async {}).unwrap());
                at
            })
            .unwrap()
        };
        let addr = |x: &'static dyn FrameAllocator| Some(x as *const dyn FrameAllocator as *const () as usize);
        assert_eq!(block_on(with_frame_allocator(a, seen)), addr(a), "boxed in a, polled outside");
        assert_eq!(with_frame_allocator(b, || block_on(with_frame_allocator(a, seen))), addr(a), "polled in b");
        assert_eq!((a.stats().allocations, b.stats().allocations), (4, 0));
        assert_eq!(block_on(seen()), None, "boxed and polled outside any scope");
        let outside = seen();
        assert_eq!(with_frame_allocator(b, || block_on(outside)), None, "boxed outside, polled in b");
        assert_eq!((a.stats().allocations, b.stats().allocations), (4, 0), "children took the default lists");
        assert!(current_frame_allocator().is_none());
        // Unwrapped, either task gives its frame back to where it came from.
        let unscoped = FrameBox::pin_scoped(async { 5 }).unwrap();
        let default: &dyn FrameAllocator = default_frame_allocator();
        assert!(core::ptr::addr_eq(unscoped.allocator().as_dyn(), default));
        assert_eq!(block_on(unscoped.into_inner()), 5);
        let scoped = with_frame_allocator(a, || FrameBox::pin_scoped(async { 6u64 })).unwrap();
        assert_eq!(block_on(scoped.into_inner()), 6);
        assert_eq!((a.stats().allocations, a.stats().live_bytes), (5, 0));
    }

    /// A binary tree of scoped tasks, each leaf yielding once: 2^(depth+1) - 1 frames.
    fn scoped_tree(depth: u32) -> ScopedTask<'static, u32> {
        async fn leaf(depth: u32) -> u32 {
            YieldOnce(false).await;
            depth
        }
        FrameBox::pin_scoped(async move {
            if depth == 0 {
                return leaf(0).await;
            }
            // Created while this future is polled: inherits its allocator.
            let left = scoped_tree(depth - 1).await;
            let right = scoped_tree(depth - 1).await;
            left + right + 1
        })
        .unwrap()
    }

    #[test]
    fn a_task_polled_in_another_scope_still_boxes_its_children_in_its_own() {
        let (a, b) = (counting(), counting());
        let root = with_frame_allocator(a, || scoped_tree(3));
        assert!(core::ptr::addr_eq(root.allocator().as_dyn(), a as &dyn FrameAllocator));
        assert_eq!(with_frame_allocator(b, || block_on(root)), 7);
        assert_eq!((a.stats().allocations, a.stats().live_bytes), (15, 0));
        assert_eq!(b.stats().allocations, 0, "the scope the root was polled in took no frame");
    }

    /// An allocator that holds another as its first field: the two share an address and are two
    /// allocators (this one takes its frames from `other`).
    #[repr(C)]
    struct Shell {
        first: CountingAllocator<RecyclingFrameAllocator>,
        other: CountingAllocator<RecyclingFrameAllocator>,
    }

    // SAFETY: forwards both calls to `other`, which keeps the promises.
    unsafe impl FrameAllocator for Shell {
        fn allocate(&self, size: usize) -> crate::Result<NonNull<u8>> {
            self.other.allocate(size)
        }
        unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
            // SAFETY: forwarded contract.
            unsafe { self.other.deallocate(ptr, size) }
        }
    }

    /// A task polled in the scope of another allocator at the same address (a struct and its
    /// first field) still enters its own scope: its children take their frames from its
    /// allocator, not from the one that merely shares the address.
    #[test]
    fn allocators_at_one_address_are_distinct_scopes() {
        let shell: &'static Shell = Box::leak(Box::new(Shell {
            first: CountingAllocator::new(RecyclingFrameAllocator::new()),
            other: CountingAllocator::new(RecyclingFrameAllocator::new()),
        }));
        assert!(core::ptr::addr_eq(shell, &shell.first), "the test needs one address");
        let root = with_frame_allocator(&shell.first, || scoped_tree(2));
        assert_eq!(with_frame_allocator(shell, || block_on(root)), 3);
        assert_eq!(shell.first.stats().allocations, 7, "all 7 nodes took frames from the root's allocator");
        assert_eq!(shell.other.stats().allocations, 0, "the scope the root was polled in took no frame");
    }

    #[test]
    fn a_recycling_scope_is_called_directly_and_gets_every_frame_back() {
        let res = shared_resource();
        std::thread::spawn(move || {
            let _serial = serial();
            let frames: &'static RecyclingFrameAllocator =
                Box::leak(Box::new(RecyclingFrameAllocator::with_resource(res)));
            let before = res.live_blocks();
            let captured = ScopeAllocator::new(frames);
            assert!(captured.as_recycling().is_some_and(|r| core::ptr::eq(r, frames)));
            let root = with_frame_allocator(frames, || scoped_tree(3));
            assert!(root.allocator().as_recycling().is_some());
            assert_eq!(block_on(root), 7);
            let s = frames.thread_stats();
            assert_eq!(s.hits + s.misses, 15, "all 15 nodes took frames from the scope's lists");
            frames.check_thread().unwrap();
            frames.flush_thread();
            frames.release_depot();
            assert_eq!(res.live_blocks(), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn only_the_recycling_allocator_offers_its_lists() {
        let recycling = RecyclingFrameAllocator::new();
        assert!(recycling.as_recycling().is_some());
        assert!(
            <&RecyclingFrameAllocator as FrameAllocator>::as_recycling(&&recycling).is_some(),
            "references forward"
        );
        let c = CountingAllocator::new(RecyclingFrameAllocator::new());
        assert!(c.as_recycling().is_none(), "a wrapper that counts must be called");
        assert!(ScopeAllocator::new(counting()).as_recycling().is_none());
        assert!(ScopeAllocator::default_lists().as_recycling().is_some());
        assert!(ThreadFrames.as_recycling().is_none());
    }

    #[test]
    fn thread_frames_use_the_default_lists() {
        std::thread::spawn(|| {
            let p = ThreadFrames.allocate(48).unwrap();
            // SAFETY: from `allocate(48)`.
            unsafe { ThreadFrames.deallocate(p, 48) };
            let q = default_frame_allocator().allocate(40).unwrap();
            assert_eq!(p, q, "the same 64-byte list");
            // SAFETY: from `allocate(40)`.
            unsafe { ThreadFrames.deallocate(q, 40) };
            let s = default_frame_allocator().thread_stats();
            assert_eq!((s.hits, s.misses), (1, 1));
            assert!(ThreadFrames.allocate(0).is_err());
        })
        .join()
        .unwrap();
    }

    /// A thread has one frame configuration, whichever allocator sets it: the limits reach the
    /// default lists too. A flush empties this upstream's lists alone.
    #[test]
    fn a_thread_frame_configuration_covers_every_upstream_and_a_flush_one() {
        let res = shared_resource();
        std::thread::spawn(move || {
            let _serial = serial();
            let frames = RecyclingFrameAllocator::with_resource(res);
            let before = res.live_blocks();
            for alloc in [&frames, default_frame_allocator()] {
                // SAFETY: from `allocate(64)`.
                unsafe { alloc.deallocate(alloc.allocate(64).unwrap(), 64) };
            }
            frames.flush_thread();
            assert_eq!(frames.thread_stats().bytes_cached, 0);
            assert_eq!(default_frame_allocator().thread_stats().bytes_cached, 64, "other lists keep their frames");
            frames.set_thread_config(Some(CacheConfig::disabled())).unwrap();
            assert_eq!(default_frame_allocator().thread_stats().bytes_cached, 0, "trimmed to the new limits");
            let p = ThreadFrames.allocate(64).unwrap();
            // SAFETY: from `allocate(64)`.
            unsafe { ThreadFrames.deallocate(p, 64) };
            assert_eq!(default_frame_allocator().thread_stats().bytes_cached, 0, "nothing kept under them");
            frames.release_depot();
            assert_eq!(res.live_blocks(), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn frames_at_and_over_the_largest_class() {
        let res = shared_resource();
        std::thread::spawn(move || {
            let _serial = serial();
            let frames = RecyclingFrameAllocator::with_resource(res);
            frames.set_thread_config(Some(CacheConfig::uniform(MAX_BUCKETS, 2 * MAX_BLOCK).unwrap())).unwrap();
            let before = res.live_blocks();
            let top = frames.allocate(MAX_BLOCK).unwrap();
            let over = frames.allocate(MAX_BLOCK + 1).unwrap();
            assert_eq!(over.as_ptr() as usize % FRAME_ALIGN, 0);
            // SAFETY: from `allocate` with these sizes.
            unsafe {
                frames.deallocate(top, MAX_BLOCK);
                frames.deallocate(over, MAX_BLOCK + 1);
            }
            let again = frames.allocate(MAX_BLOCK).unwrap();
            assert_eq!(again, top, "the largest class is recycled");
            // SAFETY: from `allocate(MAX_BLOCK)`.
            unsafe { frames.deallocate(again, MAX_BLOCK) };
            frames.flush_thread();
            frames.release_depot();
            assert_eq!(res.live_blocks(), before, "the frame over the largest class went straight back");
        })
        .join()
        .unwrap();
    }

    /// Tests that count the shared resource's live blocks take turns.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shared_resource() -> &'static CountingResource {
        static RES: OnceLock<&'static CountingResource> = OnceLock::new();
        RES.get_or_init(CountingResource::leak)
    }

    /// An upstream that refuses a new frame is an `OutOfMemory` error, not a panic or a null
    /// frame; a recycled frame is still served meanwhile, and once the upstream gives again the
    /// frames work as before and every frame goes back.
    #[test]
    fn a_refused_frame_is_an_error_and_the_frames_stay_usable() {
        let res = shared_resource();
        std::thread::spawn(move || {
            let _serial = serial();
            let frames = RecyclingFrameAllocator::with_resource(res);
            let before = res.live_blocks();
            let a = frames.allocate(100).unwrap();
            // SAFETY: from `allocate(100)`.
            unsafe { frames.deallocate(a, 100) };
            res.set_failing(true);
            let recycled = frames.allocate(100);
            let refused = frames.allocate(100);
            let large = frames.allocate(MAX_BLOCK + 1);
            res.set_failing(false);
            assert_eq!(recycled, Ok(a), "a recycled frame needs no upstream");
            assert!(matches!(refused, Err(Error::OutOfMemory { .. })), "{refused:?}");
            assert!(matches!(large, Err(Error::OutOfMemory { .. })), "{large:?}");
            frames.check_thread().unwrap();
            let b = frames.allocate(100).unwrap();
            assert_ne!(a, b);
            // SAFETY: from `allocate(100)`.
            unsafe {
                frames.deallocate(a, 100);
                frames.deallocate(b, 100);
            }
            frames.check_thread().unwrap();
            frames.flush_thread();
            frames.release_depot();
            assert_eq!(res.live_blocks(), before, "every frame went back once");
        })
        .join()
        .unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Random frame sizes allocated and freed on one thread with small limits: the lists
        /// never exceed them and, once flushed, every frame has gone back upstream exactly once.
        #[test]
        fn frame_lists_hold_their_limits_and_return_every_frame(
            ops in proptest::collection::vec((any::<bool>(), 1..5000usize, any::<usize>()), 1..300),
            limit in 0..8192usize,
        ) {
            let res = shared_resource();
            std::thread::spawn(move || {
                let _serial = serial();
                let frames = RecyclingFrameAllocator::with_resource(res);
                let config = CacheConfig::uniform(10, limit).unwrap();
                frames.set_thread_config(Some(config)).unwrap();
                let before = res.live_blocks();
                let mut live = Vec::new();
                for (alloc, size, pick) in ops {
                    if alloc || live.is_empty() {
                        live.push((frames.allocate(size).unwrap(), size));
                    } else {
                        let (p, size) = live.swap_remove(pick % live.len());
                        // SAFETY: from `allocate(size)`.
                        unsafe { frames.deallocate(p, size) };
                    }
                    frames.check_thread().unwrap();
                    assert!(frames.thread_stats().bytes_cached as usize <= config.max_cached_bytes());
                }
                for (p, size) in live {
                    // SAFETY: from `allocate(size)`.
                    unsafe { frames.deallocate(p, size) };
                }
                frames.flush_thread();
                frames.release_depot();
                assert_eq!(res.live_blocks(), before);
            })
            .join()
            .unwrap();
        }
    }
}
