use super::super::span::{back_word, find_small, freed_word, live_word};
use super::cache::{self, OP_ALLOC, OP_FREE};
use super::*;
use crate::allocators::testing::{exercise, op_strategy, region_of, run_model};
use crate::sync::atomic::Ordering;
use crate::sync::LinkStore;
use proptest::prelude::*;

#[test]
fn serves_every_size_and_alignment_and_returns_to_empty() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    exercise(&a);
}

#[test]
fn blocks_freed_by_one_class_serve_another_after_trim() {
    let a = ScalablePageAllocator::create(region_of(1 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let mut small = Vec::new();
    while let Ok(p) = a.allocate(64, 8) {
        small.push(p);
    }
    assert!(small.len() > 5000);
    for p in small {
        a.free(p).unwrap();
    }
    a.check().unwrap();
    // All of it comes back for large requests: the spans are trimmed on shortage.
    let big = a.allocate(600 * 1024, 8).unwrap();
    a.free(big).unwrap();
    a.check().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let a = ScalablePageAllocator::create(region_of(24 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        run_model(&a, &ops);
    }
}

/// A slot of a process that then "dies" (the test hook calls its pid dead).
fn dead_slot(a: &ScalablePageAllocator) -> u64 {
    crate::testing::install_test_liveness();
    let s = &a.shared;
    s.slots.acquire(&s.mem, &s.fs, crate::testing::dead_token(), || Ok(())).unwrap()
}

/// Frees the block at user offset `user` through the cache in `slot`.
fn free_through(a: &ScalablePageAllocator, slot: u64, user: u64) {
    let b = find_small(&a.shared.arena, user).unwrap();
    a.shared.free_small(slot, b.block, b.word).unwrap();
}

#[test]
fn a_dead_threads_cache_and_half_done_free_come_back() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let slot = dead_slot(&a);
    let s = &a.shared;
    let class = class_for(48, 8).unwrap();
    let blocks: Vec<u64> = (0..300).map(|_| s.allocate_small(slot, class, 48, 8).unwrap()).collect();
    // Freed through its cache (which flushed some to the shared list).
    for &u in &blocks[..200] {
        free_through(&a, slot, u);
    }
    // Killed freeing one more: journal written and the block turned free, counters not yet.
    let (c, label) = s.cache(slot, class);
    let b = find_small(&s.arena, blocks[200]).unwrap();
    let live = c.live.load(Ordering::Relaxed);
    let bytes = c.bytes.load(Ordering::Relaxed);
    c.journal(b.block, OP_FREE, live - 1, bytes - 48);
    s.arena.info(b.block).unwrap().store(freed_word(b.word, label), Ordering::Release);
    assert!(a.check().is_err(), "the block in hand is on no list");
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    // Its 99 other blocks stay allocated (`DeadProcessBlocks::Keep`): whoever has them frees them.
    assert_eq!(a.stats().live_allocations, 99);
    for &u in &blocks[201..] {
        a.free(OffsetPtr::new(u)).unwrap();
    }
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
}

#[test]
fn a_dead_allocation_half_done_and_a_dead_list_holder_are_recovered() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let slot = dead_slot(&a);
    let s = &a.shared;
    let class = class_for(200, 8).unwrap();
    let blocks: Vec<u64> = (0..20).map(|_| s.allocate_small(slot, class, 200, 8).unwrap()).collect();
    // Killed in an allocation after the block turned live, before the counters.
    let (c, _) = s.cache(slot, class);
    let (first, count) = cache::unpack_head(c.head.load(Ordering::Relaxed));
    let word = s.arena.info(first).unwrap().load(Ordering::Relaxed);
    let (live, bytes) = (c.live.load(Ordering::Relaxed), c.bytes.load(Ordering::Relaxed));
    c.allocations.store(c.allocations.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    c.journal(first, OP_ALLOC, live + 1, bytes + 200);
    let next = s.arena.load_link(first).unwrap().unwrap_or(0);
    c.head.store(next | ((count - 1) << 48), Ordering::Relaxed);
    s.arena.word(first + 8).unwrap().store(back_word(16, s.stamp), Ordering::Relaxed);
    s.arena.info(first).unwrap().store(live_word(word, 200), Ordering::Release);
    // ... while another of its threads held the class's shared list.
    let lock = &s.list(class);
    // SAFETY: test only: the lock's first word is its owner.
    unsafe {
        (*(*lock as *const crate::sync::Mutex<u64>).cast::<core::sync::atomic::AtomicU64>())
            .store(crate::testing::dead_token(), Ordering::Release)
    };
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 21, "the block it was handing out counts as allocated");
    // The list lock was taken over (by the recovery, which locks every list).
    let others: Vec<_> = (0..100).map(|_| a.allocate(200, 8).unwrap()).collect();
    for p in others.into_iter().chain(blocks.into_iter().map(OffsetPtr::new)).chain([OffsetPtr::new(first + 16)]) {
        a.free(p).unwrap();
    }
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
}

#[test]
fn a_span_left_half_made_by_a_dead_lock_holder_is_returned() {
    crate::testing::install_test_liveness();
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let mut g = s.fs.lock();
    g.alloc(16, super::super::large::TAG_SPAN, 3).unwrap();
    g.alloc(3, super::super::large::TAG_LARGE, 0).unwrap();
    core::mem::forget(g);
    let lock = s.region.offset() + core::mem::offset_of!(SpaHeader, free_space) as u64;
    s.mem.word(lock).unwrap().store(crate::testing::dead_token(), Ordering::Release);
    assert_eq!(a.stats().free_bytes(), start, "the runs went back when the lock was taken over");
    a.check().unwrap();
}

#[test]
fn a_thread_using_many_handles_keeps_one_slot_in_each() {
    let allocators: Vec<_> = (0..9)
        .map(|i| {
            ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, i), &Default::default()).unwrap()
        })
        .collect();
    // More handles than the per-thread cache has ways: lookups miss and must find the slot the
    // thread already holds, not take another.
    for _ in 0..50 {
        for a in &allocators {
            let p = a.allocate(32, 8).unwrap();
            a.free(p).unwrap();
        }
    }
    for a in &allocators {
        let s = &a.shared;
        let owned = s.slots.offsets(&s.mem).unwrap().into_iter();
        let owned = owned.filter(|&o| s.slots.slot(&s.mem, o).unwrap().owner.load(Ordering::Relaxed) != 0);
        assert_eq!(owned.count(), 1);
        a.check().unwrap();
    }
}
