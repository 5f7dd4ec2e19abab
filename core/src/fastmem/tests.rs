//! The specification of fastmem, as tests.

extern crate std;

use core::future::Future;
use core::mem::{align_of, size_of, size_of_val};
use core::pin::Pin;
use core::sync::atomic::{AtomicUsize, Ordering};
use core::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::vec::Vec;

use proptest::prelude::*;

use super::class::{class_of, heads_bytes, LINK_BYTES};
use super::*;
use crate::fastbox_unsize;
use crate::Error;

fn addr<T: ?Sized>(b: &FastBox<'_, T>) -> usize {
    &**b as *const T as *const u8 as usize
}

#[repr(align(16))]
#[derive(Debug, Clone, Copy, PartialEq)]
struct A16([u8; 16]);
#[repr(align(64))]
#[derive(Debug, Clone, Copy, PartialEq)]
struct A64([u8; 64]);
#[repr(align(256))]
#[derive(Debug, Clone, Copy, PartialEq)]
struct A256([u8; 256]);
#[repr(align(4096))]
#[derive(Debug, Clone, Copy, PartialEq)]
struct Page([u8; 4096]);

#[test]
fn first_allocation_bumps_and_a_drop_is_recycled_by_the_next_allocation() {
    let store = FastMemStore::<1024, 128>::new();
    let fm = store.init();
    let before = fm.remaining();
    let a = fm.alloc(1u32).unwrap();
    let b = fm.alloc(2u32).unwrap();
    assert_eq!((*a, *b), (1, 2));
    assert_eq!(before - fm.remaining(), 16, "two 8-byte blocks, no padding");
    let (a_at, b_at) = (addr(&a), addr(&b));
    drop(a);
    drop(b);
    assert_eq!(fm.check().unwrap().free_blocks(8), 2);
    let c = fm.alloc(3u8).unwrap();
    let d = fm.alloc(4u16).unwrap();
    assert_eq!((addr(&c), addr(&d)), (b_at, a_at), "last dropped, first reused");
    assert_eq!(before - fm.remaining(), 16, "re-allocations do not bump");
    assert_eq!((*c, *d), (3, 4));
}

#[test]
fn every_type_gets_an_aligned_block_first_time_and_recycled() {
    let store = std::boxed::Box::new(FastMemStore::<65536, 4096>::new());
    let fm = store.init();
    fn check<'a, T: Copy + PartialEq + core::fmt::Debug, const N: usize, const S: usize>(
        fm: FastMem<'a, N, S>,
        value: T,
    ) -> usize {
        let b = fm.alloc(value).unwrap();
        assert_eq!(addr(&b) % align_of::<T>(), 0, "{}", core::any::type_name::<T>());
        assert_eq!(addr(&b) % block_size(size_of::<T>()).unwrap(), 0, "blocks are aligned to their size");
        assert_eq!(*b, value);
        let at = addr(&b);
        drop(b);
        let again = fm.alloc(value).unwrap();
        assert_eq!(addr(&again), at);
        at
    }
    // Bump in an order that misaligns the cursor for the next class each time.
    check(fm, 1u8);
    check(fm, 0x1234u16);
    check(fm, 7u64);
    check(fm, u128::MAX);
    check(fm, 1.5f64);
    check(fm, A16([3; 16]));
    check(fm, [9u8; 100]);
    check(fm, A64([5; 64]));
    check(fm, 3u8);
    check(fm, A256([6; 256]));
    check(fm, (1u8, 2u64, 3u16));
    check(fm, Page([8; 4096]));
    check(fm, 2u8);
    // A block recycled from a byte array serves a type of the same class with a larger
    // alignment: u64 after [u8; 12] (16-byte class), A16 after [u8; 28] (32-byte class).
    let at = fm.alloc([1u8; 12]).unwrap();
    drop(at);
    let b = fm.alloc(5u64).unwrap();
    assert_eq!(addr(&b) % 8, 0);
    let c = fm.alloc([1u8; 28]).unwrap();
    drop(c);
    let d = fm.alloc(A16([1; 16])).unwrap();
    assert_eq!(addr(&d) % 16, 0);
    fm.check().unwrap();
}

#[test]
fn out_of_store_is_an_error_and_the_store_stays_usable() {
    let store = FastMemStore::<256, 64>::new();
    let fm = store.init();
    let mut held = Vec::new();
    let err = loop {
        match fm.alloc([0u8; 20]) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::OutOfMemory { requested: 32, .. }), "{err:?}");
    assert!(!held.is_empty());
    // A smaller class may still fit in what is left; a dropped block comes back at once.
    let last = addr(held.last().unwrap());
    held.pop();
    let again = fm.alloc([1u8; 20]).unwrap();
    assert_eq!(addr(&again), last);
    assert!(fm.alloc([0u8; 20]).is_err());
    let report = fm.check().unwrap();
    assert!(report.bumped <= report.capacity);
}

#[test]
fn values_larger_than_s_are_refused() {
    let store = FastMemStore::<1024, 16>::new();
    let fm = store.init();
    assert!(fm.alloc([0u8; 16]).is_ok());
    assert!(matches!(fm.alloc([0u8; 17]), Err(Error::InvalidSize { size: 17, .. })));
}

#[test]
fn zero_sized_values_take_no_memory_and_are_dropped() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct Zst;
    impl Drop for Zst {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::Relaxed);
        }
    }
    let store = FastMemStore::<64, 8>::new();
    let fm = store.init();
    let before = fm.remaining();
    let boxes: Vec<_> = (0..1000).map(|_| fm.alloc(Zst).unwrap()).collect();
    assert_eq!(fm.remaining(), before);
    drop(boxes);
    assert_eq!(DROPS.load(Ordering::Relaxed), 1000);
    let f: FastBox<dyn Fn() -> u8> = fastbox_unsize!(fm.alloc(|| 4u8).unwrap() => dyn Fn() -> u8);
    assert_eq!((*f)(), 4);
    drop(f);
    assert_eq!(fm.check().unwrap().free_bytes, 0, "a zero-sized closure is not recycled as a block");
}

#[test]
fn values_are_dropped_exactly_once() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct Counted(#[allow(dead_code)] u64);
    impl Drop for Counted {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::Relaxed);
        }
    }
    let store = FastMemStore::<512, 64>::new();
    let fm = store.init();
    let a = fm.alloc(Counted(1)).unwrap();
    let b = fm.alloc(Counted(2)).unwrap();
    let c = fm.alloc(Counted(3)).unwrap();
    drop(a);
    let inner = FastBox::into_inner(b);
    assert_eq!(DROPS.load(Ordering::Relaxed), 1);
    let d: FastBox<dyn Send> = fastbox_unsize!(c => dyn Send);
    drop(d);
    assert_eq!(DROPS.load(Ordering::Relaxed), 2);
    drop(inner);
    assert_eq!(DROPS.load(Ordering::Relaxed), 3);
    assert_eq!(fm.check().unwrap().free_blocks(16), 3, "into_inner and dyn drops recycle too");
}

#[test]
fn a_panicking_destructor_still_recycles_the_block() {
    struct Bomb(#[allow(dead_code)] u32);
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("boom");
        }
    }
    let store = FastMemStore::<256, 32>::new();
    let fm = store.init();
    let b = fm.alloc(Bomb(1)).unwrap();
    let at = addr(&b);
    assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(b))).is_err());
    assert_eq!(addr(&fm.alloc(2u32).unwrap()), at);
}

#[test]
fn closures_trait_objects_and_slices() {
    let store = FastMemStore::<2048, 256>::new();
    let fm = store.init();
    let mut total = 0u64;
    let captured = [1u64, 2, 3, 4, 5, 6, 7, 8];
    let mut add: FastBox<dyn FnMut(u64) + '_> =
        fastbox_unsize!(fm.alloc(|x: u64| total += x + captured[0]).unwrap() => dyn FnMut(u64) + '_);
    (*add)(1);
    (*add)(2);
    // Closures capture pointer-sized references; count blocks by the sizes this target gives
    // (every box stays alive to the end, so no block serves two of them).
    let mut expected = [0usize; 16];
    let mut expect = |size: usize| expected[block_size(size).unwrap().trailing_zeros() as usize] += 1;
    expect(2 * size_of::<usize>()); // `add`: &mut total, &captured
    let sum = fm.alloc(move || captured.iter().sum::<u64>()).unwrap();
    assert_eq!(sum(), 36);
    assert_eq!(addr(&sum) % align_of::<u64>(), 0);

    let queue: Vec<FastBox<dyn Fn() -> usize>> = (0..4usize)
        .map(|i| {
            let payload = [i; 5];
            fastbox_unsize!(fm.alloc(move || payload.iter().sum::<usize>()).unwrap() => dyn Fn() -> usize)
        })
        .collect();
    assert_eq!(queue.iter().map(|f| f()).collect::<Vec<_>>(), [0, 5, 10, 15]);
    expect(size_of_val(&*sum));
    queue.iter().for_each(|f| expect(size_of_val(&**f)));

    let s: FastBox<[u32]> = fastbox_unsize!(fm.alloc([1u32, 2, 3]).unwrap() => [u32]);
    assert_eq!(&*s, &[1, 2, 3]);
    let d: FastBox<dyn core::fmt::Debug> = fastbox_unsize!(fm.alloc(A64([2; 64])).unwrap() => dyn core::fmt::Debug);
    assert_eq!(addr(&d) % 64, 0);
    expect(size_of_val(&*s));
    expect(size_of_val(&*d));
    drop((s, d, queue, sum, add));
    assert_eq!(total, 5);
    let r = fm.check().unwrap();
    for (class, &count) in expected.iter().enumerate() {
        assert_eq!(r.free_blocks(1 << class), count, "blocks of {} bytes", 1 << class);
    }
    assert_eq!(expected[7], 2, "the 64-byte closure and A64 take 128-byte blocks");
}

fn noop_waker() -> Waker {
    const VTABLE: RawWakerVTable =
        RawWakerVTable::new(|_| RawWaker::new(core::ptr::null(), &VTABLE), |_| {}, |_| {}, |_| {});
    // SAFETY: every vtable function ignores the data pointer.
    unsafe { Waker::from_raw(RawWaker::new(core::ptr::null(), &VTABLE)) }
}

/// Ready after being polled `n` times.
struct Countdown(u32);
impl Future for Countdown {
    type Output = u32;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
        if self.0 == 0 {
            return Poll::Ready(7);
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[test]
fn futures_are_boxed_pinned_and_polled() {
    // Only a static store's boxes can be pinned (`FastBox::into_pin`).
    static STORE: FastMemStore<4096, 512> = FastMemStore::new();
    let fm = STORE.init();
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    let task = async {
        let a = Countdown(2).await;
        let big = [a; 32]; // held across an await: part of the future's state
        Countdown(1).await;
        big.iter().sum::<u32>()
    };
    let boxed: FastBox<dyn Future<Output = u32>> = fastbox_unsize!(fm.alloc(task).unwrap() => dyn Future<Output = u32>);
    let mut pinned = FastBox::into_pin(boxed);
    let mut polls = 0;
    let out = loop {
        polls += 1;
        if let Poll::Ready(v) = pinned.as_mut().poll(&mut cx) {
            break v;
        }
    };
    assert_eq!((out, polls), (224, 4));
    // An Unpin future in a FastBox is itself a future.
    let mut unpin = fm.alloc(Countdown(0)).unwrap();
    assert_eq!(Pin::new(&mut unpin).poll(&mut cx), Poll::Ready(7));
}

#[test]
fn leak_keeps_the_block_and_into_inner_returns_the_value() {
    let store = FastMemStore::<256, 32>::new();
    let fm = store.init();
    let leaked: &mut u64 = FastBox::leak(fm.alloc(5u64).unwrap());
    *leaked += 1;
    assert_eq!(*leaked, 6);
    let b = fm.alloc(9u64).unwrap();
    assert_ne!(addr(&b), leaked as *mut u64 as usize);
    assert_eq!(FastBox::into_inner(b), 9);
    let r = fm.check().unwrap();
    assert_eq!((r.free_blocks(16), r.free_bytes), (1, 16));
    assert!((32..48).contains(&r.bumped), "two blocks and at most 8 bytes of padding: {}", r.bumped);
}

#[test]
fn a_moved_or_reset_store_is_laid_out_anew() {
    let mut store = FastMemStore::<512, 64>::new();
    {
        let fm = store.init();
        drop(fm.alloc(1u64).unwrap());
        assert_eq!(fm.check().unwrap().free_blocks(16), 1);
    }
    store.reset();
    assert_eq!(store.init().check().unwrap().bumped, 0);
    drop(store.init().alloc(1u64).unwrap());
    let moved = std::boxed::Box::new(store);
    let fm = moved.init();
    let r = fm.check().unwrap();
    assert_eq!((r.bumped, r.free_bytes), (0, 0), "free blocks laid out for the old address are forgotten");
    let a = fm.alloc(A64([1; 64])).unwrap();
    assert_eq!(addr(&a) % 64, 0);
    assert_eq!(moved.capacity(), 512 - heads_bytes(64));
}

#[test]
fn check_finds_corrupt_stacks() {
    let store = FastMemStore::<512, 64>::new();
    let fm = store.init();
    let a = fm.alloc(1u64).unwrap();
    let b = fm.alloc(2u64).unwrap();
    let b_ptr = &*b as *const u64 as *const u8;
    drop(a);
    drop(b);
    fm.check().unwrap();
    // Point b's link at b itself: a cycle.
    let b_offset = b_ptr as usize - fm.store_ref().base().as_ptr() as usize;
    let b_link = (b_offset >> super::stack::LINK_UNIT_SHIFT) as u32;
    // SAFETY: the link cell (last 4 bytes) of b's free 16-byte block, which is only accessed
    // atomically.
    let cell = unsafe {
        let base = fm.store_ref().base().as_ptr();
        &*base.add(b_offset + (1 << class_of(8)) - LINK_BYTES).cast::<core::sync::atomic::AtomicU32>()
    };
    let good = cell.swap(b_link, Ordering::Relaxed);
    assert!(matches!(fm.check(), Err(Error::Corrupt { detail: "free stack has a cycle", .. })));
    // Point it past the handed-out part.
    cell.store((480 >> super::stack::LINK_UNIT_SHIFT) as u32, Ordering::Relaxed);
    assert!(matches!(fm.check(), Err(Error::Corrupt { offset: 480, .. })));
    // Point it at a misaligned offset (a's block + 8 is not 16-aligned).
    cell.store(good + (8 >> super::stack::LINK_UNIT_SHIFT) as u32, Ordering::Relaxed);
    assert!(matches!(fm.check(), Err(Error::Corrupt { detail: "free block not aligned to its size class", .. })));
    cell.store(good, Ordering::Relaxed);
    assert_eq!(fm.check().unwrap().free_blocks(16), 2);
}

/// A stray write that points a free stack at a block that was never on one (here a live box's):
/// `check()` follows it and reads that block's link cell, which nothing wrote. The store's bytes
/// start zeroed, so the cell reads as the stack's end: `check()` cannot tell the live block from a
/// free one, but it reads defined bytes (under Miri, a store whose bytes start uninitialised
/// fails this test with an uninitialised read).
#[test]
fn a_stray_link_to_a_block_never_freed_reads_no_uninitialised_bytes() {
    let store = FastMemStore::<512, 64>::new();
    let fm = store.init();
    let live = fm.alloc(1u64).unwrap();
    let offset = addr(&live) - fm.store_ref().base().as_ptr() as usize;
    // SAFETY: S = 64, so the store has a stack for 16-byte blocks; heads are only accessed
    // atomically.
    let head = unsafe { fm.store_ref().head(class_of(8)) };
    head.store(offset >> super::stack::LINK_UNIT_SHIFT, Ordering::Relaxed);
    assert_eq!(fm.check().unwrap().free_blocks(16), 1, "the live block's unwritten link reads as the end");
    head.store(0, Ordering::Relaxed);
    drop(live);
    assert_eq!(fm.check().unwrap().free_blocks(16), 1);
}

/// Free blocks of different classes must not overlap: two boxes would get the same bytes. A stray
/// write that puts a 16-byte block lying inside a free 32-byte block on the 16-byte stack (its
/// second half, whose link cell is the 32-byte block's, or its first half) is reported, before
/// `check()` reads the first half's "link": bytes of the old value, here uninitialised (under Miri,
/// a `check()` that reads them first fails this test).
#[test]
fn check_finds_a_free_block_inside_a_free_block_of_another_class() {
    let store = FastMemStore::<512, 64>::new();
    let fm = store.init();
    let small = fm.alloc(1u64).unwrap();
    let big = fm.alloc(core::mem::MaybeUninit::<[u8; 20]>::uninit()).unwrap();
    let offset = addr(&big) - fm.store_ref().base().as_ptr() as usize;
    drop(big);
    drop(small);
    let r = fm.check().unwrap();
    assert_eq!((r.free_blocks(16), r.free_blocks(32)), (1, 1));
    // SAFETY: S = 64, so the store has a stack for 16-byte blocks; heads are only accessed
    // atomically.
    let head = unsafe { fm.store_ref().head(class_of(8)) };
    let good = head.load(Ordering::Relaxed);
    for inside in [offset + 16, offset] {
        head.store(inside >> super::stack::LINK_UNIT_SHIFT, Ordering::Relaxed);
        let err = fm.check().unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { offset: o, detail: "free block inside a free block of a larger class", .. }
                if o as usize == inside),
            "{err:?}"
        );
    }
    head.store(good, Ordering::Relaxed);
    fm.check().unwrap();
}

/// A stray write that puts the cursor past the store's end or below the stack heads (here the
/// cursor word of a store whose memory a bug overwrote) is what `check()` reports; meanwhile
/// `remaining()` reads no room rather than wrapping or panicking, a new block is refused as
/// corrupt rather than panicking on the arithmetic (or handing out the heads' own bytes), and
/// recycled blocks are still served.
#[test]
fn a_cursor_written_outside_the_blocks_is_reported_not_a_panic() {
    let store = FastMemStore::<512, 64>::new();
    let fm = store.init();
    drop(fm.alloc(1u64).unwrap());
    // SAFETY: the store is `repr(C)` and its first field is the cursor, an `AtomicUsize`.
    let cursor = unsafe { &*(&store as *const FastMemStore<512, 64>).cast::<AtomicUsize>() };
    let good = cursor.load(Ordering::Relaxed);
    for stray in [512 + 8, usize::MAX / 2, usize::MAX - 4, usize::MAX, 0, 4] {
        cursor.store(stray, Ordering::Relaxed);
        assert!(matches!(fm.check(), Err(Error::Corrupt { detail: "cursor outside the store", .. })));
        assert_eq!(fm.remaining(), 0, "cursor {stray:#x}");
        let err = fm.alloc([1u8; 40]).map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { detail: "cursor outside the store", .. }), "{err:?}");
        assert_eq!(*fm.alloc(2u64).unwrap(), 2, "a recycled block needs no cursor");
    }
    cursor.store(good, Ordering::Relaxed);
    assert_eq!(fm.check().unwrap().free_blocks(16), 1);
}

/// Threads that make a static store's first `init` at once: one lays it out, the others wait for
/// it (under Miri, a layout that is not published to them is a data race on the stack heads), and
/// no thread's blocks are wiped by a second layout.
#[test]
fn racing_first_inits_lay_the_store_out_once() {
    static STORE: FastMemStore<1024, 64> = FastMemStore::new();
    const THREADS: usize = 4;
    let barrier = std::sync::Barrier::new(THREADS);
    let addrs: Vec<usize> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS as u32)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let fm = STORE.init();
                    let held = [fm.alloc(t).unwrap(), fm.alloc(t + 100).unwrap()];
                    // Every thread holds its blocks until all have bumped theirs.
                    barrier.wait();
                    assert_eq!((*held[0], *held[1]), (t, t + 100), "a block of thread {t} was handed out again");
                    let at = [addr(&held[0]), addr(&held[1])];
                    drop(held);
                    at
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    let mut sorted = addrs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 2 * THREADS, "two threads got one block: {addrs:?}");
    // The heads of a store for values of up to 64 bytes take 5 words, a multiple of 8 bytes: the
    // 8-byte blocks need no padding.
    let r = STORE.init().check().unwrap();
    assert_eq!((r.bumped, r.free_bytes, r.free_blocks(8)), (16 * THREADS, 16 * THREADS, 2 * THREADS));
}

#[test]
fn static_store_shared_by_threads() {
    static STORE: FastMemStore<{ 64 * 1024 }, 128> = FastMemStore::new();
    let fm = STORE.init();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let fm = STORE.init();
                let mut mine: Vec<FastBox<'static, dyn Fn() -> u64 + Send>> = Vec::new();
                // Miri (which checks these threads for data races) runs fewer rounds.
                let rounds = if cfg!(miri) { 60 } else { 2000 };
                for i in 0..rounds {
                    let v = t * 1_000_000 + i;
                    match i % 3 {
                        0 => mine.push(fastbox_unsize!(fm.alloc(move || v).unwrap() => dyn Fn() -> u64 + Send)),
                        1 => {
                            let parts = [v as u32, (v >> 32) as u32, 7];
                            let f = move || parts[0] as u64 | (parts[1] as u64) << 32;
                            mine.push(fastbox_unsize!(fm.alloc(f).unwrap() => dyn Fn() -> u64 + Send))
                        }
                        _ => {
                            let x = fm.alloc(v).unwrap();
                            assert_eq!(*x, v);
                        }
                    }
                    if mine.len() > 16 {
                        // Drop from the middle so blocks change hands between threads' stacks.
                        let b = mine.swap_remove(i as usize % 16);
                        let got = b();
                        assert!(got / 1_000_000 == t && got % 1_000_000 <= i, "box of thread {t} held {got}");
                    }
                }
            });
        }
    });
    let r = fm.check().unwrap();
    assert_eq!(r.free_bytes, r.bumped, "every block is back on a stack (one class: no padding)");
    assert!(r.free_blocks(16) > 0);
}

/// What the proptest model allocates: values of several sizes and alignments behind one trait.
trait Probe: Send {
    fn verify(&self, id: u8) -> bool;
}
macro_rules! probe {
    ($name:ident, $inner:ty, $make:expr, $check:expr) => {
        #[derive(Clone, Copy)]
        struct $name($inner);
        impl $name {
            fn new(id: u8) -> Self {
                $name($make(id))
            }
        }
        impl Probe for $name {
            fn verify(&self, id: u8) -> bool {
                $check(&self.0, id)
            }
        }
    };
}
probe!(P1, u8, |id| id, |v: &u8, id| *v == id);
probe!(P4, u32, |id| id as u32 * 0x0101_0101, |v: &u32, id| *v == id as u32 * 0x0101_0101);
probe!(P16, u128, |id| id as u128 * 3, |v: &u128, id| *v == id as u128 * 3);
probe!(P100, [u8; 100], |id| [id; 100], |v: &[u8; 100], id| v.iter().all(|b| *b == id));
probe!(P64A, A64, |id| A64([id; 64]), |v: &A64, id| v.0.iter().all(|b| *b == id));
probe!(P0, (), |_| (), |_: &(), _| true);

enum Live<'a> {
    Sized(FastBox<'a, u64>),
    Dyn(FastBox<'a, dyn Probe>),
}

/// A box given up with [`FastBox::leak`]: its block must never be handed out again.
enum Leaked<'a> {
    Sized(&'a mut u64),
    Dyn(&'a mut dyn Probe),
}

fn sized_value(id: u8) -> u64 {
    id as u64 * 7
}

impl<'a> Live<'a> {
    fn addr(&self) -> usize {
        match self {
            Live::Sized(b) => addr(b),
            Live::Dyn(b) => addr(b),
        }
    }
    fn verify(&self, id: u8) -> bool {
        match self {
            Live::Sized(b) => **b == sized_value(id),
            Live::Dyn(b) => b.verify(id),
        }
    }
    fn leak(self) -> Leaked<'a> {
        match self {
            Live::Sized(b) => Leaked::Sized(FastBox::leak(b)),
            Live::Dyn(b) => Leaked::Dyn(FastBox::leak(b)),
        }
    }
}

impl Leaked<'_> {
    fn verify(&self, id: u8) -> bool {
        match self {
            Leaked::Sized(v) => **v == sized_value(id),
            Leaked::Dyn(v) => v.verify(id),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(u8),
    Drop(usize),
    /// `FastBox::into_inner` of a live `u64` box (a drop for the others).
    IntoInner(usize),
    Leak(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            12 => (0u8..7).prop_map(Op::Alloc),
            7 => any::<usize>().prop_map(Op::Drop),
            2 => any::<usize>().prop_map(Op::IntoInner),
            1 => any::<usize>().prop_map(Op::Leak),
        ],
        // Miri (run by ci/fastmem.sh for undefined behaviour, not for the model) runs shorter ones.
        1..if cfg!(miri) { 100 } else { 200 },
    )
}

/// (value size, alignment) of each kind the model allocates.
const KINDS: [(usize, usize); 7] = [
    (8, 8),   // u64, sized
    (1, 1),   // P1
    (4, 4),   // P4
    (16, 16), // P16 (u128)
    (100, 1), // P100
    (64, 64), // P64A
    (0, 1),   // P0
];

/// Runs `ops` on a fresh `FastMemStore<N, S>` against a model that predicts the outcome of every
/// step: a recycled block comes from the top of its class's stack; a new one is bumped at the
/// first address past the cursor aligned to its size, or, when that block would end past the
/// store, the allocation fails with `OutOfMemory` and the cursor stays; a value larger than `S` is
/// refused. After each step the store's `check()`, `remaining()` and report must agree with the
/// model (cursor, free blocks per class, free bytes), and every live or leaked value must be
/// intact. At the end, after all drops, every block ever bumped is free again except the leaked
/// ones.
fn run_model<const N: usize, const S: usize>(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let store = FastMemStore::<N, S>::new();
    let fm = store.init();
    let base = fm.store_ref().base().as_ptr() as usize;
    let heads = heads_bytes(S);
    prop_assert_eq!(store.capacity(), N - heads);
    let mut cursor = heads; // the model's cursor: offset of the first byte never handed out
    let mut live: Vec<(Live<'_>, u8, usize)> = Vec::new(); // box, id, class (0: zero-sized)
    let mut leaked: Vec<(Leaked<'_>, u8, usize)> = Vec::new(); // value, id, block size
    let mut stacks: [Vec<usize>; 16] = Default::default();
    let mut bumped: Vec<(usize, usize)> = Vec::new(); // every block ever bumped: (addr, size)
    let mut next_id = 0u8;
    for op in ops {
        match op {
            Op::Alloc(kind) => {
                let id = next_id;
                next_id = next_id.wrapping_add(1);
                let (size, align) = KINDS[kind as usize];
                let result = match kind {
                    0 => fm.alloc(sized_value(id)).map(Live::Sized),
                    1 => fm.alloc(P1::new(id)).map(|b| Live::Dyn(fastbox_unsize!(b => dyn Probe))),
                    2 => fm.alloc(P4::new(id)).map(|b| Live::Dyn(fastbox_unsize!(b => dyn Probe))),
                    3 => fm.alloc(P16::new(id)).map(|b| Live::Dyn(fastbox_unsize!(b => dyn Probe))),
                    4 => fm.alloc(P100::new(id)).map(|b| Live::Dyn(fastbox_unsize!(b => dyn Probe))),
                    5 => fm.alloc(P64A::new(id)).map(|b| Live::Dyn(fastbox_unsize!(b => dyn Probe))),
                    _ => fm.alloc(P0::new(id)).map(|b| Live::Dyn(fastbox_unsize!(b => dyn Probe))),
                };
                if size == 0 {
                    let b = result.unwrap();
                    prop_assert_eq!(b.addr() % align, 0);
                    live.push((b, id, 0));
                } else if size > S {
                    let refused = matches!(result, Err(Error::InvalidSize { size: s, .. }) if s as usize == size);
                    prop_assert!(refused, "a {}-byte value in a store for {} bytes", size, S);
                } else {
                    let class = class_of(size) as usize;
                    let block = 1usize << class;
                    let expected = match stacks[class].pop() {
                        Some(recycled) => Some(recycled),
                        None => {
                            let at = (base + cursor).next_multiple_of(block);
                            (at + block <= base + N).then_some(at)
                        }
                    };
                    match (result, expected) {
                        (Ok(b), Some(expected)) => {
                            let at = b.addr();
                            prop_assert_eq!(at, expected, "block of {} bytes not where the model expects it", block);
                            prop_assert_eq!(at % align, 0);
                            if at >= base + cursor {
                                prop_assert!(at + block <= base + N);
                                for &(other, len) in &bumped {
                                    prop_assert!(at + block <= other || other + len <= at, "overlaps an old block");
                                }
                                bumped.push((at, block));
                                cursor = at - base + block;
                            }
                            live.push((b, id, class));
                        }
                        (Err(Error::OutOfMemory { requested, available }), None) => {
                            prop_assert_eq!(requested as usize, block);
                            prop_assert_eq!(available as usize, N - cursor);
                        }
                        (Ok(b), None) => {
                            prop_assert!(false, "a {}-byte block at {:#x} past the store's end", block, b.addr() - base)
                        }
                        (Err(e), Some(_)) => {
                            prop_assert!(false, "{:?}, but a {}-byte block fits at offset {:#x}", e, block, cursor)
                        }
                        (Err(e), None) => prop_assert!(false, "unexpected error {:?}", e),
                    }
                }
            }
            Op::Drop(i) | Op::IntoInner(i) | Op::Leak(i) => {
                if live.is_empty() {
                    continue;
                }
                let (b, id, class) = live.swap_remove(i % live.len());
                prop_assert!(b.verify(id), "value {} was overwritten", id);
                let at = b.addr();
                match (op, b) {
                    (Op::Leak(_), b) => {
                        if class != 0 {
                            leaked.push((b.leak(), id, 1 << class));
                        }
                        continue;
                    }
                    (Op::IntoInner(_), Live::Sized(b)) => prop_assert_eq!(FastBox::into_inner(b), sized_value(id)),
                    (_, b) => drop(b),
                }
                if class != 0 {
                    stacks[class].push(at);
                }
            }
        }
        for (b, id, _) in &live {
            prop_assert!(b.verify(*id), "value {} was overwritten", id);
        }
        for (v, id, _) in &leaked {
            prop_assert!(v.verify(*id), "leaked value {} was overwritten", id);
        }
        prop_assert_eq!(fm.remaining(), N - cursor);
        let report = fm.check().unwrap();
        prop_assert_eq!(report.bumped, cursor - heads);
        let mut free_bytes = 0;
        for (class, stack) in stacks.iter().enumerate().skip(3) {
            prop_assert_eq!(report.free_blocks(1 << class), stack.len(), "free blocks of {} bytes", 1 << class);
            free_bytes += stack.len() << class;
        }
        prop_assert_eq!(report.free_bytes, free_bytes);
    }
    drop(live);
    // Nothing is lost: every block ever bumped is on a free stack again, but the leaked ones.
    let report = fm.check().unwrap();
    let total: usize = bumped.iter().map(|&(_, len)| len).sum();
    let kept: usize = leaked.iter().map(|&(_, _, len)| len).sum();
    prop_assert_eq!(report.free_bytes, total - kept);
    prop_assert_eq!(report.bumped, cursor - heads);
    Ok(())
}

proptest! {
    /// Random allocations, drops, `into_inner`s and leaks against the model of `run_model`, in a
    /// roomy store and in a small one that runs out often and refuses the larger kinds.
    #[test]
    fn random_boxes_and_drops_match_the_model(ops in ops()) {
        run_model::<2048, 128>(ops)?;
    }

    #[test]
    fn random_boxes_and_drops_match_the_model_in_a_small_store(ops in ops()) {
        run_model::<400, 64>(ops)?;
    }
}
