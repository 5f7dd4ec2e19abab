use super::*;
use crate::backend::BackendId;
use crate::testing::HeapBackend;
use proptest::prelude::*;
use std::sync::Arc;

const ID: AllocatorId = AllocatorId::new(1, 0);

fn region(len: usize) -> Region {
    // SAFETY: a fresh backend, which only the allocator the test makes over it uses.
    unsafe { Region::whole(Arc::new(HeapBackend::new(BackendId(1), len))) }.unwrap()
}

fn bitmap(len: usize, config: BitmapConfig) -> BitmapAllocator {
    BitmapAllocator::create(region(len), ID, &config).unwrap()
}

/// Writes `tag` over the first and last byte of a block of `len` bytes.
fn stamp(a: &BitmapAllocator, p: OffsetPtr, len: usize, tag: u8) {
    let b = a.region().ptr(p.get(), len as u64).unwrap();
    // SAFETY: a live block of `len` bytes in the region.
    unsafe { (b.write(tag), b.add(len - 1).write(tag)) };
}

/// The next value of the xorshift generator `x`.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn stamped(a: &BitmapAllocator, p: OffsetPtr, len: usize) -> (u8, u8) {
    let b = a.region().ptr(p.get(), len as u64).unwrap();
    // SAFETY: as in `stamp`.
    unsafe { (b.read(), b.add(len - 1).read()) }
}

#[test]
fn requests_go_to_the_smallest_class_that_holds_them_and_come_back() {
    let a = bitmap(1 << 20, BitmapConfig::default());
    assert_eq!(a.block_sizes().collect::<Vec<_>>(), (4..=16).map(|s| 1usize << s).collect::<Vec<_>>());
    let start = a.stats();
    assert!(start.capacity > (1 << 20) * 9 / 10 - 8192, "{start:?}");
    assert_eq!(start.free_bytes(), start.capacity);
    let p = a.allocate(100, 8).unwrap();
    assert_eq!((p.get() % 128, a.size_of(p).unwrap()), (0, 100));
    assert_eq!(a.class_usage(128), Some((a.class_usage(128).unwrap().0, 1)));
    let q = a.allocate(10, 4096).unwrap();
    assert_eq!(q.get() % 4096, 0, "alignment picks a class whose blocks have it");
    let r = a.allocate(65536, 16).unwrap();
    assert_eq!(r.get() % 4096, 0);
    let s = a.stats();
    assert_eq!((s.live_allocations, s.bytes_in_use, s.bytes_reserved), (3, 100 + 10 + 65536, 128 + 4096 + 65536));
    a.check().unwrap();
    for x in [p, q, r] {
        a.free(x).unwrap();
    }
    let end = a.stats();
    assert_eq!((end.free_bytes(), end.live_allocations, end.bytes_in_use), (start.free_bytes(), 0, 0));
    assert_eq!((end.total_allocations, end.total_frees, end.high_watermark), (3, 3, 128 + 4096 + 65536));
    a.check().unwrap();
}

#[test]
fn bad_requests_and_bad_frees_are_errors() {
    let a = bitmap(256 << 10, BitmapConfig::default());
    assert!(matches!(a.allocate(0, 8), Err(Error::InvalidSize { .. })));
    assert!(matches!(a.allocate(8, 3), Err(Error::InvalidAlignment { .. })));
    assert!(matches!(a.allocate(8, 8192), Err(Error::InvalidAlignment { .. })));
    assert!(matches!(a.allocate((64 << 10) + 1, 8), Err(Error::InvalidSize { .. })));
    let p = a.allocate(48, 16).unwrap();
    for bad in [p.get() + 16, p.get() + 1, 0, 4096, a.region().end(), u64::MAX] {
        assert!(matches!(a.free(OffsetPtr::new(bad)), Err(Error::InvalidFree { .. })), "{bad}");
        assert!(matches!(a.size_of(OffsetPtr::new(bad)), Err(Error::InvalidFree { .. })), "{bad}");
        assert!(matches!(a.reallocate(OffsetPtr::new(bad), 8, 8), Err(Error::InvalidFree { .. })), "{bad}");
    }
    let never = OffsetPtr::new(p.get() + 64);
    assert!(matches!(a.free(never), Err(Error::InvalidFree { .. })), "a block never handed out");
    a.free(p).unwrap();
    assert!(matches!(a.free(p), Err(Error::InvalidFree { .. })), "double free");
    assert!(matches!(a.size_of(p), Err(Error::InvalidFree { .. })));
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
}

#[test]
fn full_classes_pass_requests_up_and_out_of_memory_leaves_it_usable() {
    let a = bitmap(64 << 10, BitmapConfig { min_block: 16, max_block: 64 });
    let start = a.stats();
    let (small, _) = a.class_usage(16).unwrap();
    let mut live = Vec::new();
    loop {
        match a.allocate(16, 16) {
            Ok(p) => live.push(p),
            Err(Error::OutOfMemory { requested: 16, available: 0 }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let total: u64 = a.block_sizes().map(|s| a.class_usage(s).unwrap().0).sum();
    assert_eq!(live.len() as u64, total, "every block of every class served 16 bytes");
    assert!(total > small);
    a.check().unwrap();
    let p = live.pop().unwrap();
    a.free(p).unwrap();
    assert_eq!(a.allocate(16, 16).unwrap(), p, "the freed block serves again");
    live.push(p);
    for p in live {
        a.free(p).unwrap();
    }
    assert_eq!(a.stats().free_bytes(), start.free_bytes());
    a.check().unwrap();
}

#[test]
fn reallocation_keeps_the_contents_in_place_or_moved() {
    let a = bitmap(1 << 20, BitmapConfig::default());
    let p = a.allocate(20, 8).unwrap();
    stamp(&a, p, 20, 7);
    let same = a.reallocate(p, 32, 8).unwrap();
    assert_eq!((same, a.size_of(same).unwrap()), (p, 32), "32 bytes fit the 32-byte block");
    assert_eq!(a.stats().bytes_in_use, 32);
    let moved = a.reallocate(p, 1000, 8).unwrap();
    assert_ne!(moved, p);
    assert_eq!(stamped(&a, moved, 20), (7, 7));
    assert!(matches!(a.size_of(p), Err(Error::InvalidFree { .. })), "the old block is free");
    let shrunk = a.reallocate(moved, 10, 8).unwrap();
    assert_eq!((shrunk, a.stats().bytes_in_use), (moved, 10));
    a.free(shrunk).unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().bytes_reserved, 0);
}

/// A block's recorded size lives in shared memory: a damaged one must not make a moving
/// reallocation copy past the block (into its neighbour), nor `size_of` promise more bytes than
/// the block has.
#[test]
fn a_damaged_recorded_size_is_refused_not_trusted() {
    let a = bitmap(1 << 20, BitmapConfig::default());
    let p = a.allocate(16, 16).unwrap();
    let neighbour = a.allocate(16, 16).unwrap();
    assert_eq!(neighbour.get(), p.get() + 16, "the next block of the class");
    let fill = |q: OffsetPtr, tag: u8| {
        let b = a.region().ptr(q.get(), 16).unwrap();
        // SAFETY: a live 16-byte block in the region, used by this thread alone.
        unsafe { core::ptr::write_bytes(b, tag, 16) };
    };
    fill(p, 0x11);
    fill(neighbour, 0xAB);
    let (c, index) = a.locate(p.get()).unwrap();
    c.size_slot(index).store(1 << 31, Ordering::Relaxed);
    assert!(matches!(a.size_of(p), Err(Error::Corrupt { .. })), "{:?}", a.size_of(p));
    match a.reallocate(p, 64, 16) {
        Err(Error::Corrupt { .. }) => assert_eq!(a.stats().live_allocations, 2, "nothing claimed"),
        Ok(moved) => {
            let b = a.region().ptr(moved.get(), 64).unwrap();
            // SAFETY: a live 64-byte block in the region.
            let bytes = unsafe { core::slice::from_raw_parts(b, 64) };
            assert!(!bytes[16..32].contains(&0xAB), "the neighbour's bytes were copied: {bytes:?}");
            panic!("a block with a damaged size was moved");
        }
        Err(e) => panic!("{e}"),
    }
    c.size_slot(index).store(0, Ordering::Relaxed);
    assert!(matches!(a.size_of(p), Err(Error::Corrupt { .. })));
    c.size_slot(index).store(16, Ordering::Relaxed);
    assert_eq!(a.size_of(p).unwrap(), 16);
    let moved = a.reallocate(p, 64, 16).unwrap();
    assert_eq!(stamped(&a, moved, 16), (0x11, 0x11));
    a.free(moved).unwrap();
    a.free(neighbour).unwrap();
    a.check().unwrap();
}

#[test]
fn configurations_and_regions_are_checked() {
    for (min_block, max_block) in
        [(8, 64), (24, 64), (64, 32), (16, 48), (16, MAX_BLOCK.wrapping_mul(2)), (16, usize::MAX)]
    {
        let config = BitmapConfig { min_block, max_block };
        let err = BitmapAllocator::create(region(1 << 20), ID, &config).err();
        assert!(matches!(err, Some(Error::InvalidSize { .. })), "{config:?}");
    }
    let tiny = region(4096 + 4096 + 512);
    let err = BitmapAllocator::create(tiny, ID, &BitmapConfig { min_block: 16, max_block: 1 << 20 }).err();
    assert!(err.is_some(), "{err:?}");
    let a = bitmap(1 << 20, BitmapConfig::default());
    let region = a.region().duplicate();
    assert!(matches!(
        BitmapAllocator::attach(region.duplicate(), AllocatorId::new(1, 1)),
        Err(Error::HeaderMismatch { field: "allocator id", .. })
    ));
    let again = BitmapAllocator::attach(region, ID).unwrap();
    let p = again.allocate(64, 8).unwrap();
    assert_eq!(a.size_of(p).unwrap(), 64, "both handles see one heap");
    a.free(p).unwrap();
}

#[test]
fn threads_share_the_heap_and_frees_race_safely() {
    let a = bitmap(32 << 20, BitmapConfig { min_block: 16, max_block: 4096 });
    let start = a.stats().free_bytes();
    let (tx, rx) = std::sync::mpsc::channel::<OffsetPtr>();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let (a, tx) = (&a, tx.clone());
            s.spawn(move || {
                let mut live = Vec::new();
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(t);
                for i in 0..20_000 {
                    next(&mut x);
                    let size = 1 + (x % 1000) as usize;
                    let p = a.allocate(size, 8).unwrap();
                    stamp(a, p, size, t);
                    live.push((p, size));
                    if live.len() > 64 {
                        let (q, n) = live.swap_remove((x >> 32) as usize % live.len());
                        assert_eq!(stamped(a, q, n), (t, t), "a block was handed out twice");
                        if i % 5 == 0 {
                            tx.send(q).unwrap(); // freed by the main thread
                        } else {
                            a.free(q).unwrap();
                        }
                    }
                }
                for (q, _) in live {
                    a.free(q).unwrap();
                }
            });
        }
        drop(tx);
        for q in rx {
            a.free(q).unwrap();
        }
    });
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
    // Two threads freeing one block at the same instant: exactly one succeeds.
    for _ in 0..200 {
        let p = a.allocate(40, 8).unwrap();
        let barrier = std::sync::Barrier::new(2);
        let ok: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        a.free(p).is_ok() as usize
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(ok, 1);
    }
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
}

/// Damage to the header (as another process could do) never makes attach or use panic: attach
/// refuses, or the allocator works within its region.
#[test]
fn a_damaged_header_is_refused_or_harmless() {
    let a = bitmap(256 << 10, BitmapConfig::default());
    let region = a.region().duplicate();
    let base = region.ptr(region.offset(), core::mem::size_of::<BitmapHeader>() as u64).unwrap();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..3000 {
        // SAFETY: the header's bytes, in the region; only this thread uses it.
        let saved: Vec<u8> = unsafe { core::slice::from_raw_parts(base, 4160) }.to_vec();
        next(&mut x);
        // One 8-byte word of the class table (or the header's first line) set to a random value.
        let word = (x % (4160 / 8)) as usize;
        let value = match round % 4 {
            0 => x.rotate_left(17),
            1 => x % 4096,
            2 => region.offset() + x % region.len(),
            _ => u64::MAX - x % 64,
        };
        // SAFETY: as above; 8-aligned.
        unsafe { base.cast::<u64>().add(word).write(value) };
        if let Ok(b) = BitmapAllocator::attach(region.duplicate(), ID) {
            if let Ok(p) = b.allocate(1 + (x % 5000) as usize, 8) {
                assert!(region.contains(p.get(), 1));
                let _ = b.free(p);
            }
            let _ = b.check();
            let _ = b.stats();
        }
        // SAFETY: as above.
        unsafe { core::ptr::copy_nonoverlapping(saved.as_ptr(), base, saved.len()) };
    }
    a.check().unwrap();
}

/// Damage to the header after attach (another process may write it at any time) never makes
/// this process panic or leave its region: it works from the class table it copied and checked,
/// and reads only counters and the hint from the header again, each bounded before use.
#[test]
fn damage_after_attach_is_harmless() {
    let a = bitmap(256 << 10, BitmapConfig::default());
    let region = a.region().duplicate();
    let base = region.ptr(region.offset(), core::mem::size_of::<BitmapHeader>() as u64).unwrap();
    // SAFETY: the header's bytes, in the region; only this thread uses the allocator.
    let saved: Vec<u8> = unsafe { core::slice::from_raw_parts(base, 4160) }.to_vec();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut live = Vec::new();
    for round in 0..4000 {
        next(&mut x);
        let word = (x % (4160 / 8)) as usize;
        let value = match round % 3 {
            0 => x.rotate_left(17),
            1 => x % 64,
            _ => u64::MAX - x % 64,
        };
        // SAFETY: as above; 8-aligned. The fields the allocator changes are atomics.
        unsafe { base.cast::<u64>().add(word).write_volatile(value) };
        if let Ok(p) = a.allocate(1 + (x % 5000) as usize, 8) {
            assert!(region.contains(p.get(), 1));
            live.push(p);
        }
        if round % 3 == 0 {
            if let Some(p) = live.pop() {
                let _ = a.size_of(p);
                a.free(p).unwrap();
            }
        }
        let _ = (a.stats(), a.check());
    }
    for p in live {
        a.free(p).unwrap();
    }
    // SAFETY: as above.
    unsafe { core::ptr::copy_nonoverlapping(saved.as_ptr(), base, saved.len()) };
}

/// A backend that plays another process: on its `at`-th `base()` call (attach asks for it each
/// time it turns a checked offset into an address) it writes `value` over the header's u64 at
/// `field`, between two of attach's reads of the class table.
struct Meddling {
    inner: HeapBackend,
    calls: AtomicU64,
    at: AtomicU64,
    field: AtomicU64,
    value: AtomicU64,
}

// SAFETY: `HeapBackend`'s memory and header; the meddling writes inside it.
unsafe impl crate::backend::MemoryBackend for Meddling {
    fn kind(&self) -> crate::backend::BackendKind {
        self.inner.kind()
    }
    fn base(&self) -> *mut u8 {
        let base = self.inner.base();
        if self.calls.fetch_add(1, Ordering::Relaxed) + 1 == self.at.load(Ordering::Relaxed) {
            let field = base.wrapping_add(self.field.load(Ordering::Relaxed) as usize).cast::<u64>();
            // SAFETY: an 8-aligned u64 of the allocator's header in the buffer; this thread is
            // the only one using the allocator.
            unsafe { field.write_volatile(self.value.load(Ordering::Relaxed)) };
        }
        base
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn header(&self) -> &crate::header::RegionHeader {
        self.inner.header()
    }
    fn is_creator(&self) -> bool {
        true
    }
}

/// attach reads each field of the class table once and keeps what it checked: another process
/// changing the table during an attach makes that attach fail, or see the table as it was before
/// or after, never keep a value other than the one it checked.
#[test]
fn attach_keeps_the_class_fields_it_checked() {
    let zero = || AtomicU64::new(0);
    let backend = Arc::new(Meddling {
        inner: HeapBackend::new(BackendId(1), 256 << 10),
        calls: zero(),
        at: zero(),
        field: zero(),
        value: zero(),
    });
    // SAFETY: the test's own backend, which only this allocator uses.
    let region = unsafe { Region::whole(backend.clone()) }.unwrap();
    let a = BitmapAllocator::create(region, ID, &BitmapConfig::default()).unwrap();
    let (blocks, _) = a.class_usage(16).unwrap();
    let record = |name| a.region().offset() + 64 + name;
    let end = a.region().end();
    let set = |field: u64, value: u64| {
        backend.at.store(0, Ordering::Relaxed);
        let slot = a.region().ptr(field, 8).unwrap().cast::<u64>();
        // SAFETY: an 8-aligned u64 of the header, in the region; only this thread uses it.
        unsafe { slot.write_volatile(value) };
    };
    // Class 0's block count made far too large, its blocks moved past the region's end.
    for (field, good, bad) in [(record(8), blocks, blocks * 1000), (record(32), a.classes[0].data, end)] {
        for at in 1..40 {
            set(field, good);
            backend.field.store(field, Ordering::Relaxed);
            backend.value.store(bad, Ordering::Relaxed);
            backend.calls.store(0, Ordering::Relaxed);
            backend.at.store(at, Ordering::Relaxed);
            if let Ok(b) = BitmapAllocator::attach(a.region().duplicate(), ID) {
                assert_eq!(b.class_usage(16).unwrap().0, blocks, "changed at base() call {at}");
                let p = b.allocate(16, 16).unwrap();
                assert!(a.region().contains(p.get(), 16), "a block at {}, changed at base() call {at}", p.get());
                b.free(p).unwrap();
            }
        }
        set(field, good);
    }
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize, usize),
    Free(usize),
    Reallocate(usize, usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let align = prop::sample::select(&[1usize, 8, 16, 64, 4096][..]);
    let op = prop_oneof![
        5 => (1usize..5000, align.clone()).prop_map(|(s, a)| Op::Allocate(s, a)),
        4 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), 1usize..5000).prop_map(|(i, s)| Op::Reallocate(i, s)),
    ];
    prop::collection::vec(op, 1..200)
}

proptest! {
    /// Random allocations, frees and reallocations against a model of the live blocks:
    /// blocks never overlap, keep their contents, and `check()` holds after every step.
    #[test]
    fn bitmap_allocator_matches_its_model(ops in ops()) {
        let a = bitmap(128 << 10, BitmapConfig { min_block: 16, max_block: 8192 });
        let start = a.stats();
        let mut live: Vec<(OffsetPtr, usize, u8)> = Vec::new();
        for (n, op) in ops.into_iter().enumerate() {
            let tag = n as u8;
            match op {
                Op::Allocate(size, align) => match a.allocate(size, align) {
                    Ok(p) => {
                        prop_assert_eq!(p.get() % align as u64, 0);
                        for &(q, qs, _) in &live {
                            prop_assert!(p.get() + size as u64 <= q.get() || q.get() + qs as u64 <= p.get());
                        }
                        stamp(&a, p, size, tag);
                        live.push((p, size, tag));
                    }
                    Err(Error::OutOfMemory { .. }) => {}
                    Err(e) => prop_assert!(false, "{e}"),
                },
                Op::Free(i) if !live.is_empty() => {
                    let (p, size, t) = live.swap_remove(i % live.len());
                    prop_assert_eq!(stamped(&a, p, size), (t, t));
                    a.free(p).unwrap();
                }
                Op::Reallocate(i, size) if !live.is_empty() => {
                    let k = i % live.len();
                    let (p, old, t) = live[k];
                    match a.reallocate(p, size, 8) {
                        Ok(q) => {
                            let keep = old.min(size);
                            let b = a.region().ptr(q.get(), keep as u64).unwrap();
                            // SAFETY: a live block of at least `keep` bytes.
                            prop_assert_eq!(unsafe { b.read() }, t);
                            stamp(&a, q, size, t);
                            live[k] = (q, size, t);
                        }
                        Err(Error::OutOfMemory { .. }) => prop_assert_eq!(a.size_of(p).unwrap(), old),
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                _ => {}
            }
            a.check().unwrap();
            let s = a.stats();
            prop_assert_eq!(s.live_allocations, live.len() as u64);
            prop_assert_eq!(s.bytes_in_use, live.iter().map(|l| l.1 as u64).sum::<u64>());
        }
        for (p, _, _) in live {
            a.free(p).unwrap();
        }
        prop_assert_eq!(a.stats().free_bytes(), start.free_bytes());
        a.check().unwrap();
    }
}

/// `check` reports a change to any header word attach checked (the allocator keeps working
/// from its copy, but the next process to attach reads the changed one): the type, the id, the
/// region and each class's five fixed fields, the bitmap's and the sizes' offsets included.
#[test]
fn check_reports_a_change_to_any_word_attach_checked() {
    let a = bitmap(256 << 10, BitmapConfig::default());
    let p = a.allocate(100, 8).unwrap();
    let region = a.region().duplicate();
    let base = region.ptr(region.offset(), core::mem::size_of::<BitmapHeader>() as u64).unwrap().cast::<u64>();
    let classes = a.block_sizes().count();
    let mut words: Vec<usize> = (0..5).collect();
    words.extend((0..classes).flat_map(|c| (0..5).map(move |f| 8 + 16 * c + f)));
    for word in words {
        // SAFETY: a word of the header, in the region and 8-aligned; only this thread uses it.
        let old = unsafe { base.add(word).read_volatile() };
        // SAFETY: as above.
        unsafe { base.add(word).write_volatile(old.wrapping_add(64)) };
        let checked = a.check();
        // SAFETY: as above.
        unsafe { base.add(word).write_volatile(old) };
        assert!(matches!(checked, Err(Error::Corrupt { .. })), "header word {word}: {checked:?}");
    }
    a.check().unwrap();
    a.free(p).unwrap();
}

/// A class's peak (shared memory) past its blocks is damage `check` reports, as it does one
/// below the blocks in use: no class ever had more blocks in use than it has.
#[test]
fn check_reports_a_peak_past_the_class() {
    let a = bitmap(256 << 10, BitmapConfig::default());
    let p = a.allocate(100, 8).unwrap();
    let (blocks, _) = a.class_usage(128).unwrap();
    let region = a.region().duplicate();
    let base = region.ptr(region.offset(), core::mem::size_of::<BitmapHeader>() as u64).unwrap();
    let class = a.block_sizes().position(|s| s == 128).unwrap();
    let at = core::mem::offset_of!(BitmapHeader, classes)
        + class * core::mem::size_of::<ClassRecord>()
        + core::mem::offset_of!(ClassRecord, peak);
    // SAFETY: the class's peak, an atomic u64 in the header (in the region, 8-aligned).
    let peak = unsafe { &*base.add(at).cast::<AtomicU64>() };
    peak.store(blocks + 1, Ordering::Relaxed);
    assert!(matches!(a.check(), Err(Error::Corrupt { .. })), "a peak past the class's blocks passed");
    peak.store(1, Ordering::Relaxed);
    a.check().unwrap();
    a.free(p).unwrap();
    a.check().unwrap();
}
