//! `HetAlloc` as this test binary's global allocator: many threads start, allocate, hand blocks
//! to each other, allocate in their thread-local destructors, and end.
//!
//! Everything runs in one test, in sequence, so the counts of live thread caches are this
//! test's own.

// The caches are not built under loom (`--cfg loom`), which models only the lock-free parts.
#![cfg(not(loom))]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::mpsc;

use hetmem_core::cache::{self, HetAlloc, ThreadRole};
use hetmem_core::{MemoryKind, MemoryResource};

#[global_allocator]
static A: HetAlloc = HetAlloc::new();

/// Thread-local state whose destructor allocates and frees, after or before the cache's own
/// exit guard has run (their order depends on which was touched first).
struct AllocatesOnExit(Vec<Box<[u8]>>);

impl Drop for AllocatesOnExit {
    fn drop(&mut self) {
        let mut scratch: Vec<String> = (0..50).map(|i| format!("exit {i}")).collect();
        scratch.push("x".repeat(10_000));
        assert_eq!(scratch[49], "exit 49");
        for b in self.0.drain(..) {
            assert!(b.iter().all(|&x| x == 0x5A));
        }
    }
}

thread_local! {
    static EXIT_WORK: RefCell<AllocatesOnExit> = const { RefCell::new(AllocatesOnExit(Vec::new())) };
}

fn worker(id: usize, inbox: mpsc::Receiver<Vec<u64>>, outbox: mpsc::Sender<Vec<u64>>) -> u64 {
    if id % 7 == 0 {
        cache::set_thread_role(ThreadRole::Scheduler).unwrap();
    }
    EXIT_WORK.with(|w| w.borrow_mut().0.extend((0..20).map(|i| vec![0x5Au8; 16 << (i % 12)].into_boxed_slice())));
    let mut map: HashMap<u64, String> = HashMap::new();
    let mut text = String::new();
    for i in 0..3000u64 {
        map.insert(i % 500, format!("{id}:{i}"));
        if i % 10 == 0 {
            text.push_str(&i.to_string());
        }
        let v: Vec<u8> = vec![(i % 251) as u8; (i as usize * 13) % 5000 + 1];
        assert!(v.iter().all(|&b| b == (i % 251) as u8));
    }
    assert_eq!(map.len(), 500);
    // Blocks made here are freed by the next thread, and the other way round.
    outbox.send((0..1000).map(|i| i * id as u64).collect()).unwrap();
    let theirs = inbox.recv().unwrap();
    theirs.iter().sum::<u64>() + text.len() as u64
}

fn wave(threads: usize, base: usize) {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..threads).map(|_| mpsc::channel()).unzip();
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(i, inbox)| {
            let outbox = senders[(i + 1) % threads].clone();
            std::thread::Builder::new()
                .name(format!("w{}", base + i))
                .spawn(move || worker(base + i, inbox, outbox))
                .unwrap()
        })
        .collect();
    drop(senders);
    for (i, h) in handles.into_iter().enumerate() {
        let from = (i + threads - 1) % threads;
        let expected = (0..1000u64).sum::<u64>() * (base + from) as u64;
        assert!(h.join().unwrap() >= expected);
    }
}

/// Host memory that counts nothing: only to be a distinct upstream.
struct Plain(&'static str);

// SAFETY: blocks from the system allocator with the layout asked for, freed with it.
unsafe impl MemoryResource for Plain {
    fn name(&self) -> &str {
        self.0
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }
    fn allocate(&self, size: usize, align: usize) -> hetmem_core::Result<std::ptr::NonNull<u8>> {
        let layout = std::alloc::Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero size.
        std::ptr::NonNull::new(unsafe { std::alloc::System.alloc(layout) })
            .ok_or(hetmem_core::Error::OutOfMemory { requested: size as u64, available: 0 })
    }
    unsafe fn deallocate(&self, ptr: std::ptr::NonNull<u8>, size: usize, align: usize) {
        let layout = std::alloc::Layout::from_size_align(size, align).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::System.dealloc(ptr.as_ptr(), layout) }
    }
}

use std::alloc::GlobalAlloc;

fn more_upstreams_than_slots_still_work() {
    static RESOURCES: [Plain; 8] =
        [Plain("r0"), Plain("r1"), Plain("r2"), Plain("r3"), Plain("r4"), Plain("r5"), Plain("r6"), Plain("r7")];
    let layout = std::alloc::Layout::from_size_align(64, 8).unwrap();
    let mut cached = 0;
    for r in &RESOURCES {
        let a = HetAlloc::with_resource(r);
        // SAFETY: non-zero layout; each block freed once with it.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write_bytes(1, 64);
            a.dealloc(p, layout);
            let q = a.alloc(layout);
            a.dealloc(q, layout);
        }
        if a.thread_stats().hits > 0 {
            cached += 1;
        }
        a.flush_thread();
        a.release_depot();
    }
    // Slot 0 is the system allocator, slot 1 the recycled frames: six slots remain.
    assert_eq!(cached, 6, "six resources got caches, the rest passed through");
}

#[test]
fn threads_start_and_end_under_hetalloc() {
    let baseline = cache::live_threads();
    assert!(baseline >= 1, "this thread has a live cache");
    let before = A.stats();

    for w in 0..30 {
        wave(8, w * 8);
        assert_eq!(cache::live_threads(), baseline, "every ended thread retired its cache");
    }

    let after = A.stats();
    assert!(after.hits > before.hits + 100_000, "{after:?}");
    let depot = A.depot_stats();
    assert!(
        after.bytes_returned > before.bytes_returned || depot.bytes_cached > 0,
        "exited threads gave their memory back: {after:?} {depot:?}"
    );
    // Only this thread's cache (and the idle harness thread's) remain.
    let mine = A.thread_stats();
    assert!(after.bytes_cached >= mine.bytes_cached);

    // Threads that end at once, allocating nothing of their own.
    for _ in 0..200 {
        std::thread::spawn(|| {}).join().unwrap();
    }
    assert_eq!(cache::live_threads(), baseline);

    // The caches are still sound here after all that.
    A.check_thread().unwrap();
    A.release_depot();
    assert_eq!(A.depot_stats().bytes_cached, 0);

    more_upstreams_than_slots_still_work();
}
