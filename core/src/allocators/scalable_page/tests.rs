use super::super::span::{back_word, find_small, freed_word, live_word, Info, SMALL_HEADER};
use super::cache::{self, OP_ALLOC, OP_FREE};
use super::*;
use crate::allocators::common::DeadProcessBlocks;
use crate::allocators::testing::{
    exercise, exhaust_and_recover, failed_copy_leaks_nothing, forged_blocks_of_no_class_are_refused,
    interior_offsets_with_back_words_in_the_data_are_refused, offsets_that_are_not_a_padded_blocks_own_are_refused,
    op_strategy, outlive_a_dropped_handle, refuse_bad_input, region_of, run_model,
    small_sizes_past_the_block_are_refused, survive_damage,
};
use crate::sync::atomic::Ordering;
use crate::sync::LinkStore;
use alloc::collections::BTreeSet;
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

#[test]
fn runs_out_of_memory_and_recovers_every_time() {
    let a = ScalablePageAllocator::create(region_of(4 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    exhaust_and_recover(&a);
}

#[test]
fn a_reallocation_whose_copy_fails_frees_the_new_block() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    failed_copy_leaks_nothing(&a, |p| p.get() - 16);
}

#[test]
fn a_small_blocks_size_field_is_bounded_by_its_user_bytes() {
    let a = ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    small_sizes_past_the_block_are_refused(&a, &|user, bytes| {
        let Ok(Found::Small(b)) = live_block(&a.shared.arena, user) else { panic!("no small block at {user}") };
        let slot = a.with_slot(Ok).unwrap();
        a.shared.cache(slot, b.class()).0.bytes.fetch_add(bytes, Ordering::Relaxed);
    });
}

#[test]
fn interior_offsets_are_refused_whatever_the_data_before_them() {
    let a = ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    interior_offsets_with_back_words_in_the_data_are_refused(&a);
}

#[test]
fn a_block_forged_with_no_class_is_refused_not_a_panic() {
    let a = ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    forged_blocks_of_no_class_are_refused(&a);
}

#[test]
fn only_a_padded_blocks_own_offset_frees_it() {
    let a = ScalablePageAllocator::create(region_of(4 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    offsets_that_are_not_a_padded_blocks_own_are_refused(&a);
}

#[test]
fn refuses_every_offset_that_is_no_live_block() {
    let a = ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let every_word: Vec<u64> = (a.region().offset()..a.region().end()).step_by(8).collect();
    refuse_bad_input(&a, &every_word);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let region = region_of(24 << 20);
        let a = ScalablePageAllocator::create(region, AllocatorId::new(1, 0), &Default::default()).unwrap();
        run_model(&a, &ops);
    }
}

/// A slot of a process that then "dies" (the test hook calls its pid dead).
fn dead_slot(a: &ScalablePageAllocator) -> CacheSlot {
    crate::testing::install_test_liveness();
    let s = &a.shared;
    s.cache_slot(s.slots.acquire(&s.mem, &s.fs, crate::testing::dead_token(), || Ok(())).unwrap()).unwrap()
}

/// A slot of this process, taken by hand (as `dead_slot` takes a dead one).
fn own_slot(a: &ScalablePageAllocator) -> CacheSlot {
    let s = &a.shared;
    s.cache_slot(s.slots.acquire(&s.mem, &s.fs, crate::sync::owner_token(), || Ok(())).unwrap()).unwrap()
}

/// Frees the block at user offset `user` through the cache in `slot`.
fn free_through(a: &ScalablePageAllocator, slot: CacheSlot, user: u64) {
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

/// Where the number of the slot at `slot` lies (its `index` word, shared memory), for tests
/// that damage it.
fn index_word(a: &ScalablePageAllocator, slot: u64) -> *mut u32 {
    let at = slot + core::mem::offset_of!(crate::allocators::slots::Slot<CacheBody>, index) as u64;
    a.shared.mem.ptr(at, 4).unwrap().cast::<u32>()
}

/// A dead slot whose number (shared memory) was damaged to a live slot's: a cache labels its
/// free blocks with its slot's number, so its recovery pushed the live cache's blocks onto the
/// shared list too, to be handed out while that cache hands them out again. The recovery now
/// holds the number to the slot's place in the table and leaves such a slot as it found it.
#[test]
fn a_recovery_takes_no_block_from_the_cache_a_damaged_slot_number_names() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let mine = own_slot(&a);
    let dead = dead_slot(&a);
    let class = class_for(48, 8).unwrap();
    let users: Vec<u64> = (0..4).map(|_| s.allocate_small(mine, class, 48, 8).unwrap()).collect();
    // In our cache, labelled with our slot's number.
    for &u in &users {
        free_through(&a, mine, u);
    }
    let index_of = |slot: CacheSlot| index_word(&a, slot.offset);
    // SAFETY: the index words of two slots, in bounds and aligned; no other thread runs.
    let (my_index, dead_index) = unsafe { (*index_of(mine), *index_of(dead)) };
    // SAFETY: as above.
    unsafe { index_of(dead).write_volatile(my_index) };
    assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
    assert_eq!(s.slots.slot(&s.mem, dead.offset).unwrap().owner.load(Ordering::Acquire), crate::testing::dead_token());
    assert!(matches!(a.check(), Err(Error::Corrupt { .. })), "check() reports the number");
    // SAFETY: as above.
    unsafe { index_of(dead).write_volatile(dead_index) };
    a.check().unwrap();
    assert_eq!(a.reclaim().unwrap(), 1);
    s.flush_all(mine).unwrap();
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
}

/// The other way round: a live slot whose number was damaged to a dead slot's. A cache that
/// read its label from the word (as every cache did before it kept the label it took with its
/// slot) labelled the blocks it took in with the dead slot's number, and the dead slot's recovery
/// pushed them onto the shared list (free blocks with its label on no list), to be handed out
/// while the live cache handed them out too. A dead slot whose number another slot claims is
/// left as found, and the damage reported.
#[test]
fn a_recovery_takes_no_block_a_slot_with_a_damaged_number_labelled_with_its_own() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let mine = own_slot(&a);
    let dead = dead_slot(&a);
    let class = class_for(48, 8).unwrap();
    let users: Vec<u64> = (0..4).map(|_| s.allocate_small(mine, class, 48, 8).unwrap()).collect();
    let index_of = |slot: CacheSlot| index_word(&a, slot.offset);
    // SAFETY: the index words of two slots, in bounds and aligned; no other thread runs.
    let (my_index, dead_index) = unsafe { (*index_of(mine), *index_of(dead)) };
    // SAFETY: as above.
    unsafe { index_of(mine).write_volatile(dead_index) };
    // Into our cache, labelled with the dead slot's number.
    for &u in &users {
        free_through(&a, mine, u);
    }
    assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
    assert_eq!(s.slots.slot(&s.mem, dead.offset).unwrap().owner.load(Ordering::Acquire), crate::testing::dead_token());
    assert!(matches!(a.check(), Err(Error::Corrupt { .. })), "check() reports the number");
    let list = *s.list(class).lock_or_recover(|_| {});
    s.walk_list(list, |b| {
        assert!(!users.contains(&(b + SMALL_HEADER)), "a block of our cache is on the shared list");
        Ok(())
    })
    .unwrap();
    s.flush_all(mine).unwrap();
    // SAFETY: as above.
    unsafe { index_of(mine).write_volatile(my_index) };
    assert_eq!(a.reclaim().unwrap(), 1);
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
}

/// A slot's number is shared memory, and a thread's cache read it on every operation for the
/// label it writes into the blocks it takes in: damaged to a dead slot's, the cache labelled
/// its blocks with that slot's number, for good (mending the word did not relabel them), and
/// the dead slot's recovery pushed them onto the shared list while the cache still held them.
/// The cache now keeps the label it took with its slot, from the slot's place in the table.
#[test]
fn a_held_cache_keeps_its_label_whatever_its_slot_number_says() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let users: Vec<OffsetPtr> = (0..8).map(|_| a.allocate(48, 8).unwrap()).collect();
    let mine = a.with_slot(Ok).unwrap();
    let dead = dead_slot(&a);
    let (mine_at, dead_at) = (index_word(&a, mine.offset), index_word(&a, dead.offset));
    // SAFETY: the index words of two slots, in bounds and aligned; no other thread runs.
    let my_index = unsafe { *mine_at };
    // SAFETY: as above.
    unsafe { mine_at.write_volatile(*dead_at) };
    // Quick frees into the cache, quick allocations out of it, refills, a flush.
    for p in users {
        a.free(p).unwrap();
    }
    let mut again: Vec<OffsetPtr> = (0..200).map(|_| a.allocate(48, 8).unwrap()).collect();
    for p in again.split_off(100) {
        a.free(p).unwrap();
    }
    // SAFETY: as above.
    unsafe { mine_at.write_volatile(my_index) };
    a.check().unwrap();
    // Every block of our cache still in it, none on the shared list twice.
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    free_all_and_check(&a, again.into_iter().map(|p| p.get()), start);
}

/// A recovery that finds a class's shared list damaged recovers the other classes, gives the
/// dead slot back as it found it (a dead process's), for a later recovery to finish, and
/// reports the damage. Before, the slot stayed with the recoverer's process, held for good while
/// that lived, and the blocks of its cache not yet pushed with it.
#[test]
fn a_recovery_that_meets_a_damaged_list_gives_the_slot_back() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let slot = dead_slot(&a);
    let s = &a.shared;
    // Its cache holds free blocks of two classes.
    let (small, large) = (class_for(48, 8).unwrap(), class_for(200, 8).unwrap());
    for (class, size) in [(small, 48), (large, 200)] {
        let blocks: Vec<u64> = (0..10).map(|_| s.allocate_small(slot, class, size, 8).unwrap()).collect();
        for u in blocks {
            free_through(&a, slot, u);
        }
    }
    // Damage: the shared list of the second class starts at no block.
    let good = core::mem::replace(&mut *s.list(large).lock(), 8);
    let owner = || s.slots.slot(&s.mem, slot.offset).unwrap().owner.load(Ordering::Acquire);
    let head =
        |class: usize| s.slots.slot(&s.mem, slot.offset).unwrap().body.classes[class].head.load(Ordering::Relaxed);
    assert!(head(small) != 0 && head(large) != 0, "both caches hold blocks");
    for _ in 0..2 {
        assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
        assert_eq!(owner(), crate::testing::dead_token(), "given back as it was");
        assert_eq!(head(small), 0, "the class whose blocks went to the shared list points into it no more");
        assert_ne!(head(large), 0, "the damaged class's cache is left for a later recovery");
    }
    // An attach recovers only to gain space: the damaged dead slot does not refuse it.
    for _ in 0..2 {
        let attached = ScalablePageAllocator::attach(a.region().duplicate(), AllocatorId::new(1, 0));
        assert!(attached.is_ok(), "attach beside a damaged dead slot: {:?}", attached.err());
        assert_eq!(owner(), crate::testing::dead_token());
    }
    *s.list(large).lock() = good;
    assert_eq!(a.reclaim().unwrap(), 1);
    assert_eq!(owner(), 0);
    a.check().unwrap();
    a.trim().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
}

/// A span whose run the free-space table says is shorter than the class's spans (damage) is
/// skipped by a recovery, as a span whose header was never written is: before, the recovery
/// pushed the dead slot's blocks past the run, in units the free-space manager holds as free
/// (and hands out again), onto the class's shared list.
#[test]
fn a_recovery_lists_no_block_past_a_span_whose_run_is_short() {
    use super::super::free_space::UNIT;
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let slot = dead_slot(&a);
    let s = &a.shared;
    let class = class_for(48, 8).unwrap();
    let layout = LAYOUTS[class];
    let mut blocks: Vec<u64> = (0..layout.blocks).map(|_| s.allocate_small(slot, class, 48, 8).unwrap()).collect();
    blocks.sort_unstable();
    let first = find_small(&s.arena, blocks[0]).unwrap();
    let span = super::super::span::span_of(first.block, &Info::unpack(first.word).unwrap()).unwrap();
    // Freed through its cache, the span's last blocks last: those stay in the cache.
    for &u in &blocks {
        free_through(&a, slot, u);
    }
    let (tail, end) = (span + UNIT, span + u64::from(layout.units) * UNIT);
    let listed = || {
        let mut out = BTreeSet::new();
        s.walk_list(*s.list(class).lock(), |b| {
            out.insert(b);
            Ok(())
        })
        .unwrap();
        out
    };
    let before = listed();
    {
        let mut g = s.fs.lock();
        assert!(g.resize(s.fs.layout().unit_of(span).unwrap(), 1).unwrap());
    }
    let _ = a.reclaim();
    let pushed: Vec<u64> = listed().difference(&before).copied().filter(|&b| b >= tail && b < end).collect();
    assert!(pushed.is_empty(), "{} blocks in free units listed", pushed.len());
}

/// `check()` holds every large-block counter to the runs: before, it passed any count of live
/// units (which `stats()` reports as reserved bytes).
#[test]
fn check_holds_the_large_block_counters_to_the_runs() {
    let a = ScalablePageAllocator::create(region_of(4 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    crate::allocators::testing::large_counters_off_fail_check(&a, &a.shared.fs);
}

/// A recovery run only to gain space (here an attach's) passes over a dead slot whose recovery
/// fails, and counts the failure where users can read it (`failed_reclaims`); a `reclaim()`
/// returns its failure instead. Before, nothing said that it had failed.
#[test]
fn a_recovery_passed_over_on_attach_is_counted() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let slot = dead_slot(&a);
    let s = &a.shared;
    let class = class_for(200, 8).unwrap();
    let blocks: Vec<u64> = (0..10).map(|_| s.allocate_small(slot, class, 200, 8).unwrap()).collect();
    for u in blocks {
        free_through(&a, slot, u);
    }
    // Damage: the class's shared list starts at no block.
    let good = core::mem::replace(&mut *s.list(class).lock(), 8);
    assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
    assert_eq!(a.failed_reclaims(), 0, "reclaim() returns its failure");
    for _ in 0..2 {
        let attached = ScalablePageAllocator::attach(a.region().duplicate(), AllocatorId::new(1, 0)).unwrap();
        assert_eq!(attached.failed_reclaims(), 1, "the attach's recovery failed");
    }
    *s.list(class).lock() = good;
    let attached = ScalablePageAllocator::attach(a.region().duplicate(), AllocatorId::new(1, 0)).unwrap();
    assert_eq!(attached.failed_reclaims(), 0, "a recovery that succeeds is not counted");
    a.check().unwrap();
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
    s.arena.word(first + 8).unwrap().store(back_word(16, s.stamp()), Ordering::Relaxed);
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

/// The free-space repair after a dead lock holder recounts the large blocks from their size
/// words, bounded by their user bytes: a size past them (here a 4096-aligned block's run less
/// its header, 4064 bytes more than its padding leaves) is damage, which no crash leaves, as a
/// size past the run is; its run goes back. Before, the repair counted it in the bytes in use,
/// more than the block can hold.
#[test]
fn the_free_space_repair_counts_no_large_size_past_its_user_bytes() {
    use super::super::free_space::UNIT;
    use super::super::span::LARGE_HEADER;
    const SIZE: u64 = 64 << 10;
    crate::testing::install_test_liveness();
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let p = a.allocate(SIZE as usize, 4096).unwrap();
    let block = p.get() - 4096;
    let units = (LARGE_HEADER + 4096 + SIZE).div_ceil(UNIT);
    s.arena.word(block + 8).unwrap().store(units * UNIT - LARGE_HEADER, Ordering::Relaxed);
    // A process died holding the free-space lock: the next to lock it repairs the runs.
    core::mem::forget(s.fs.lock());
    let lock = s.region.offset() + core::mem::offset_of!(SpaHeader, free_space) as u64;
    s.mem.word(lock).unwrap().store(crate::testing::dead_token(), Ordering::Release);
    let in_use = a.stats().bytes_in_use;
    assert!(in_use <= units * UNIT - 4096, "{in_use} bytes in use, more than the block's user bytes");
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
}

#[test]
fn a_span_taken_again_by_a_carver_that_died_before_its_header_is_returned() {
    crate::testing::install_test_liveness();
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let class = class_for(3000, 8).unwrap();
    let blocks: Vec<_> = (0..20).map(|_| a.allocate(3000, 8).unwrap()).collect();
    let first = find_small(&a.shared.arena, blocks[0].get()).unwrap();
    let span = super::super::span::span_of(first.block, &Info::unpack(first.word).unwrap()).unwrap();
    for p in blocks {
        a.free(p).unwrap();
    }
    // The spans go back (their blocks keep their last words) ...
    a.trim().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
    // ... and a carver takes the first again, then dies holding the free-space lock, before it
    // wrote the span's header. No header of the old span may remain to make the run look whole.
    let s = &a.shared;
    let mut g = s.fs.lock();
    let head = g.alloc(LAYOUTS[class].units, super::super::large::TAG_SPAN, class as u32).unwrap();
    assert_eq!(s.fs.layout().unit_offset(head), span, "the same run again");
    assert!(s.arena.class_span(span, class).is_none());
    core::mem::forget(g);
    let lock = s.region.offset() + core::mem::offset_of!(SpaHeader, free_space) as u64;
    s.mem.word(lock).unwrap().store(crate::testing::dead_token(), Ordering::Release);
    assert_eq!(a.stats().free_bytes(), start, "the run went back when the lock was taken over");
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

#[test]
fn threads_that_find_the_slot_table_full_at_once_grow_it_by_one_chunk() {
    let a = ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let s = &a.shared;
    let free = || s.fs.lock().free_units();
    let seen = s.slots.offsets(&s.mem).unwrap().len();
    let before = free();
    // Two growers that scanned the same full table: the second finds it grown and adds nothing.
    s.slots.grow(&s.mem, &s.fs, seen).unwrap();
    let chunk = before - free();
    assert!(chunk > 0);
    s.slots.grow(&s.mem, &s.fs, seen).unwrap();
    assert_eq!(before - free(), chunk, "a second chunk for the same full table");
    assert_eq!(s.slots.offsets(&s.mem).unwrap().len(), 2 * seen);
    // One that scanned the grown table grows it again.
    s.slots.grow(&s.mem, &s.fs, 2 * seen).unwrap();
    assert_eq!(s.slots.offsets(&s.mem).unwrap().len(), 3 * seen);
    a.check().unwrap();
}

/// Starts handing out the first block cached for `class` in `slot` and "dies" before the block
/// turns live: journal written, head moved past it. Returns the block.
fn die_handing_out(a: &ScalablePageAllocator, slot: CacheSlot, class: usize, size: u64) -> u64 {
    let s = &a.shared;
    let (c, _) = s.cache(slot, class);
    let (first, count) = cache::unpack_head(c.head.load(Ordering::Relaxed));
    let (live, bytes) = (c.live.load(Ordering::Relaxed), c.bytes.load(Ordering::Relaxed));
    c.journal(first, OP_ALLOC, live + 1, bytes + size);
    let next = s.arena.load_link(first).unwrap().unwrap_or(0);
    c.head.store(next | ((count - 1) << 48), Ordering::Relaxed);
    first
}

/// Frees `blocks` (user offsets) and checks the allocator is back to `start` free bytes.
fn free_all_and_check(a: &ScalablePageAllocator, blocks: impl IntoIterator<Item = u64>, start: u64) {
    for u in blocks {
        a.free(OffsetPtr::new(u)).unwrap();
    }
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().bytes_in_use, 0);
    assert_eq!(a.stats().free_bytes(), start);
}

/// A dead process's slot (this thread holds another) that died handing out a block of 200 B
/// after allocating five; once `recover` ran, this thread takes that block among 100 of its
/// own. Returns the slot, the dead process's five blocks and this thread's 100.
fn dead_allocation_recovered_and_reused(
    a: &ScalablePageAllocator,
    recover: impl FnOnce(),
) -> (CacheSlot, Vec<u64>, Vec<u64>) {
    a.free(a.allocate(8, 8).unwrap()).unwrap();
    let slot = dead_slot(a);
    let class = class_for(200, 8).unwrap();
    let theirs: Vec<u64> = (0..5).map(|_| a.shared.allocate_small(slot, class, 200, 8).unwrap()).collect();
    let block = die_handing_out(a, slot, class, 200);
    recover();
    let mine: Vec<u64> = (0..100).map(|_| a.allocate(200, 8).unwrap().get()).collect();
    assert!(mine.contains(&(block + 16)), "the block went back to the shared list");
    (slot, theirs, mine)
}

#[test]
fn a_slot_used_again_after_a_recovery_is_not_judged_on_its_old_journal() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let (slot, mut theirs, mine) = dead_allocation_recovered_and_reused(&a, || {
        assert_eq!(a.reclaim().unwrap(), 1);
        a.check().unwrap();
        assert_eq!(a.stats().live_allocations, 5, "the allocation it died in never happened");
    });
    // A second process takes the same slot, works in another class only, and dies. The first
    // journal of the slot, whose block is now live, must not count again.
    assert_eq!(dead_slot(&a), slot);
    theirs.push(a.shared.allocate_small(slot, class_for(48, 8).unwrap(), 48, 8).unwrap());
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 106);
    free_all_and_check(&a, mine.into_iter().chain(theirs), start);
}

#[test]
fn a_recovery_that_dies_after_settling_leaves_nothing_to_settle_twice() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    // A recoverer claims the slot, settles its journals, pushes its blocks, and dies before
    // giving the slot back (simulated: the whole recovery, then the slot owned by the dead).
    let (slot, theirs, mine) = dead_allocation_recovered_and_reused(&a, || {
        assert_eq!(a.shared.recover_dead().unwrap(), 1);
    });
    let s = &a.shared;
    let owner = &s.slots.slot(&s.mem, slot.offset).unwrap().owner;
    owner.compare_exchange(0, crate::testing::dead_token(), Ordering::AcqRel, Ordering::Relaxed).unwrap();
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 105);
    free_all_and_check(&a, mine.into_iter().chain(theirs), start);
}

/// A slot whose owner word a stray write of another process set to a token no process writes
/// (its process id 0: a small number, an offset) is recovered as a dead process's is, its
/// cache with it: before, no reclaim took it, and the slot and the blocks in its cache were
/// lost for good.
#[test]
fn a_slot_whose_owner_word_names_no_process_is_recovered() {
    crate::testing::install_test_liveness();
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let class = class_for(48, 8).unwrap();
    for stray in [1u64, 0x356, 0x1000, 0xffff_ffff] {
        let slot = own_slot(&a);
        let blocks: Vec<u64> = (0..10).map(|_| s.allocate_small(slot, class, 48, 8).unwrap()).collect();
        for &u in &blocks {
            free_through(&a, slot, u);
        }
        assert_ne!(s.cache(slot, class).0.head.load(Ordering::Relaxed), 0, "the cache holds blocks");
        let owner = &s.slots.slot(&s.mem, slot.offset).unwrap().owner;
        owner.store(stray, Ordering::Release);
        assert_eq!(a.reclaim().unwrap(), 1, "a slot held by {stray:#x} was not recovered");
        assert_eq!(owner.load(Ordering::Acquire), 0);
        assert_eq!(s.cache(slot, class).0.head.load(Ordering::Relaxed), 0);
        a.check().unwrap();
    }
    free_all_and_check(&a, [], start);
}

#[test]
fn a_free_that_lost_its_race_is_not_counted() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let kept: Vec<u64> = (0..3).map(|_| a.allocate(200, 8).unwrap().get()).collect();
    let p = a.allocate(200, 8).unwrap();
    let b = find_small(&a.shared.arena, p.get()).unwrap();
    a.free(p).unwrap();
    // A dead process was freeing the same block in a scan (`free_claimed`): its compare-and-swap
    // failed, and it died before clearing its journal. The block is free, under another label.
    let slot = dead_slot(&a);
    let s = &a.shared;
    let class = class_for(200, 8).unwrap();
    let (c, _) = s.cache(slot, class);
    c.journal(b.block, OP_FREE, c.live.load(Ordering::Relaxed).wrapping_sub(1), 0u64.wrapping_sub(200));
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 3);
    free_all_and_check(&a, kept, start);
}

/// An allocator that frees dead processes' blocks, its free bytes at the start, and a dead
/// process's slot (this thread holds another).
fn freeing_dead_blocks_with_a_dead_slot() -> (ScalablePageAllocator, u64, CacheSlot) {
    let config = ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &config).unwrap();
    let start = a.stats().free_bytes();
    a.free(a.allocate(8, 8).unwrap()).unwrap();
    let slot = dead_slot(&a);
    (a, start, slot)
}

/// A process whose start time's low 16 bits were 0 stamped its live blocks with start time 0,
/// "unknown": once it died and its pid was reused, its blocks were never freed.
#[test]
fn a_block_stamp_keeps_a_known_start_time_known() {
    for start_time in [1 << 16, 0x7_0000, 0x1_0000_0000] {
        let process = ProcessStamp { pid: 0x3fff_fff1, start_time };
        let recorded = stamp_process(short_stamp(process));
        assert_eq!(recorded.pid, process.pid);
        assert_ne!(recorded.start_time, 0, "{start_time:#x} recorded as unknown");
        assert!(recorded.may_have_started_at(start_time), "{start_time:#x}: its own stamp");
        assert!(!recorded.may_have_started_at(start_time + 1), "{start_time:#x}: another start time");
    }
}

/// Stamps the live block at user offset `user` as the dead process's.
fn mark_dead(a: &ScalablePageAllocator, user: u64) {
    let dead = short_stamp(crate::sync::owner_stamp(crate::testing::dead_token()));
    let w = a.shared.arena.word(user - 8).unwrap();
    w.store(back_word(w.load(Ordering::Relaxed) & 0xffff, dead), Ordering::Relaxed);
}

#[test]
fn blocks_of_a_dead_process_wait_for_the_settle_of_the_journals_that_name_them() {
    let (a, start, slot) = freeing_dead_blocks_with_a_dead_slot();
    let s = &a.shared;
    let mark_dead = |user: u64| mark_dead(&a, user);
    let (small, mid) = (class_for(48, 8).unwrap(), class_for(200, 8).unwrap());
    for _ in 0..10 {
        mark_dead(s.allocate_small(slot, small, 48, 8).unwrap());
    }
    // Killed resizing a block (its new size written, the bytes counter not yet) ...
    let r = s.allocate_small(slot, mid, 200, 8).unwrap();
    mark_dead(r);
    let found = find_small(&s.arena, r).unwrap();
    let (c, _) = s.cache(slot, mid);
    let bytes = c.bytes.load(Ordering::Relaxed) - 100;
    c.journal(found.block, cache::OP_RESIZE | (100 << 48), c.live.load(Ordering::Relaxed), bytes);
    let info = Info::unpack(found.word).unwrap();
    s.arena.info(found.block).unwrap().store(Info { size: 100, ..info }.pack(), Ordering::Release);
    // ... while another of its threads had just made a block of `small` live.
    let block = die_handing_out(&a, slot, small, 48);
    let word = s.arena.info(block).unwrap().load(Ordering::Relaxed);
    let dead = short_stamp(crate::sync::owner_stamp(crate::testing::dead_token()));
    s.arena.word(block + 8).unwrap().store(back_word(16, dead), Ordering::Relaxed);
    s.arena.info(block).unwrap().store(live_word(word, 48), Ordering::Release);
    // A process that finds them dead before anyone recovered the slot frees all but those two.
    assert_eq!(a.with_slot(|mine| s.free_dead_blocks(mine)).unwrap(), 10);
    // The recovery settles the slot, then frees them.
    assert_eq!(a.reclaim().unwrap(), 1 + 2);
    a.check().unwrap();
    free_all_and_check(&a, [], start);
}

#[test]
fn a_dead_block_handed_out_again_since_the_scan_is_not_freed() {
    let (a, start, slot) = freeing_dead_blocks_with_a_dead_slot();
    let s = &a.shared;
    let u = s.allocate_small(slot, class_for(200, 8).unwrap(), 200, 8).unwrap();
    mark_dead(&a, u);
    // What a scan saw of the dead process's block ...
    let b = find_small(&s.arena, u).unwrap();
    let (info, back) = (Info::unpack(b.word).unwrap(), s.arena.word(u - 8).unwrap().load(Ordering::Relaxed));
    // ... before someone else freed it and this thread got it again, with the same info word.
    assert_eq!(a.reclaim().unwrap(), 2);
    let p = a.allocate(200, 8).unwrap();
    assert_eq!(p.get(), u);
    assert_eq!(s.arena.info(b.block).unwrap().load(Ordering::Relaxed), b.word);
    assert!(a.with_slot(|mine| s.free_claimed(mine, b.block, info, u, back)).is_err());
    assert_eq!(a.size_of(p).unwrap(), 200, "still live");
    a.check().unwrap();
    free_all_and_check(&a, [p.get()], start);
}

#[test]
fn a_resize_killed_at_any_point_after_a_lost_claim_is_settled_exactly() {
    for n in 0.. {
        let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let start = a.stats().free_bytes();
        a.free(a.allocate(8, 8).unwrap()).unwrap();
        let slot = dead_slot(&a);
        let s = &a.shared;
        let x = s.allocate_small(slot, class_for(200, 8).unwrap(), 200, 8).unwrap();
        // A claim that lost its compare-and-swap leaves the journal clear and its values stale.
        let y = a.allocate(200, 8).unwrap();
        let yb = find_small(&s.arena, y.get()).unwrap();
        a.free(y).unwrap();
        let back = s.arena.word(y.get() - 8).unwrap().load(Ordering::Relaxed);
        assert!(s.free_claimed(slot, yb.block, Info::unpack(yb.word).unwrap(), y.get(), back).is_err());
        // Then the slot's process dies resizing a block of the class in place, to its own size.
        let xb = find_small(&s.arena, x).unwrap();
        let resize = || s.resize_in_place(slot, xb.block, Info::unpack(xb.word).unwrap(), 200);
        let died = crate::crash::testing::die_at(n, resize).is_none();
        assert_eq!(a.reclaim().unwrap(), 1);
        a.check().unwrap_or_else(|e| panic!("died at point {n} of the resize: {e}"));
        free_all_and_check(&a, [x], start);
        if !died {
            break;
        }
    }
}

#[test]
fn a_large_block_resized_in_place_survives_a_death_at_any_point() {
    crate::testing::install_test_liveness();
    for (from, to) in [(70_000, 30_000), (30_000, 70_000)] {
        for n in 0.. {
            let a =
                ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
            let start = a.stats().free_bytes();
            let p = a.allocate(from, 8).unwrap();
            let died = crate::crash::testing::die_at(n, || a.reallocate(p, to, 8)).is_none();
            if died {
                // It may have died holding the free-space lock (whose guard the unwinding dropped).
                let s = &a.shared;
                let lock = s.region.offset() + core::mem::offset_of!(SpaHeader, free_space) as u64;
                s.mem.word(lock).unwrap().store(crate::testing::dead_token(), Ordering::Release);
            }
            a.reclaim().unwrap();
            a.check().unwrap_or_else(|e| panic!("{from} -> {to}, died at point {n}: {e}"));
            let size = a.size_of(p).unwrap_or_else(|e| panic!("{from} -> {to}, died at point {n}: block lost: {e}"));
            assert!(size == from || size == to);
            free_all_and_check(&a, [p.get()], start);
            if !died {
                assert_eq!(size, to);
                break;
            }
        }
    }
}

#[test]
fn a_padded_dead_block_handed_out_again_unpadded_is_not_freed() {
    let (a, start, slot) = freeing_dead_blocks_with_a_dead_slot();
    let s = &a.shared;
    assert_eq!(class_for(260, 64), class_for(260, 8));
    let class = class_for(260, 64).unwrap();
    // A block of the dead process whose user bytes sit past some padding.
    let mut theirs = Vec::new();
    let (u, block) = loop {
        let u = s.allocate_small(slot, class, 260, 64).unwrap();
        let Some(Found::Small(b)) = find_live(&s.arena, u) else { panic!("not a small block") };
        let block = b.block;
        if u != block + 16 {
            break (u, block);
        }
        theirs.push(u);
    };
    mark_dead(&a, u);
    // What a scan saw; then the block is freed and handed out again, unpadded, same size: the
    // info word is the same, and the old back word is still there.
    let word = s.arena.info(block).unwrap().load(Ordering::Relaxed);
    let back = s.arena.word(u - 8).unwrap().load(Ordering::Relaxed);
    a.free(OffsetPtr::new(u)).unwrap();
    let p = a.allocate(260, 8).unwrap();
    assert_eq!(p.get(), block + 16);
    assert_eq!(s.arena.info(block).unwrap().load(Ordering::Relaxed), word);
    assert_eq!(s.arena.word(u - 8).unwrap().load(Ordering::Relaxed), back);
    let info = Info::unpack(word).unwrap();
    assert!(a.with_slot(|mine| s.free_claimed(mine, block, info, u, back)).is_err());
    assert_eq!(a.size_of(p).unwrap(), 260, "still live");
    assert_eq!(a.reclaim().unwrap(), 1 + theirs.len() as u64);
    free_all_and_check(&a, [p.get()], start);
}

#[test]
fn counters_and_sizes_another_process_broke_give_errors_not_panics() {
    let a = ScalablePageAllocator::create(region_of(4 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let s = &a.shared;
    let mut p = a.allocate(40_000, 8).unwrap();
    let q = a.allocate(40_000, 8).unwrap();
    for broken in [0, u64::MAX] {
        {
            let mut g = s.fs.lock();
            g.st.large = crate::allocators::free_space::LargeCounters {
                live: broken,
                live_bytes: broken,
                live_units: broken,
                allocations: broken,
                frees: broken,
            };
            // The peak (private to the free-space manager) is the word just before the large
            // counters (`repr(C)`).
            let state: *mut crate::allocators::free_space::FreeSpaceState = &mut *g.st;
            let at = core::mem::offset_of!(crate::allocators::free_space::FreeSpaceState, large) - 8;
            // SAFETY: the state's `peak_used_units` field, a u64 we hold the lock for.
            unsafe { state.cast::<u8>().add(at).cast::<u64>().write(broken) };
        }
        let _ = a.stats();
        assert!(a.check().is_err());
        // Shrunk in place, then grown (moved: `q` is in the way).
        assert_eq!(a.reallocate(p, 10_000, 8).unwrap(), p);
        p = a.reallocate(p, 100_000, 8).unwrap();
        let t = a.allocate(40_000, 8).unwrap();
        a.free(t).unwrap();
    }
    // The free-unit count broken: out of memory is still an error, and the allocator usable.
    {
        let mut g = s.fs.lock();
        let state: *mut crate::allocators::free_space::FreeSpaceState = &mut *g.st;
        let at = core::mem::offset_of!(crate::allocators::free_space::FreeSpaceState, large) - 16;
        // SAFETY: the state's `free_units` field (two words before the large counters, `repr(C)`),
        // a u64 we hold the lock for.
        unsafe { state.cast::<u8>().add(at).cast::<u64>().write(u64::MAX) };
    }
    assert!(matches!(a.allocate(8 << 20, 8), Err(Error::OutOfMemory { .. })));
    let mut small = Vec::new();
    while let Ok(b) = a.allocate(1000, 8) {
        small.push(b);
    }
    for b in small {
        a.free(b).unwrap();
    }
    a.free(p).unwrap();
    // A large block's size word broken.
    let block = q.get() - 32;
    s.arena.word(block + 8).unwrap().store(u64::MAX - 8, Ordering::Relaxed);
    assert!(a.check().is_err());
    assert!(a.size_of(q).is_err());
    assert!(a.free(q).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn damage_in_the_arena_never_panics(
        damage in proptest::collection::vec((any::<usize>(), any::<u64>(), any::<u64>()), 1..6),
    ) {
        let a = ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let meta = a.region().offset() + core::mem::offset_of!(SpaHeader, chunk) as u64;
        survive_damage(&a, meta, a.shared.fs.layout().table, &damage);
    }
}

/// A free that puts its class's cache over the limit is done even when the flush it makes
/// finds the cache damaged: it answers `Ok` (an error would tell the caller the block is still
/// theirs). A release whose flush fails still lets the slot go (held, it would stay this live
/// process's for good).
#[test]
fn a_free_whose_flush_finds_damage_is_still_done() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let slot = own_slot(&a);
    let class = class_for(48, 8).unwrap();
    let limit = s.limits[class] as usize;
    let blocks: Vec<u64> = (0..2 * limit).map(|_| s.allocate_small(slot, class, 48, 8).unwrap()).collect();
    let (c, _) = s.cache(slot, class);
    let mut freed = fill_cache(&a, slot, class, &blocks);
    // Damage: the cache counts 1000 blocks more than its list holds, so a flush walks off the
    // list's end.
    miscount(&a, slot, class, 1000);
    // Over the limit: the flush fails, the free is done.
    let b = find_small(&s.arena, blocks[freed]).unwrap();
    s.free_small(slot, b.block, b.word).unwrap();
    assert_eq!(cached(&a, slot, class), limit as u64 + 1001, "the block is cached, and the flush moved nothing");
    assert_eq!(c.retry_at.load(Ordering::Relaxed), 2 * (limit as u64 + 1001), "the next try waits");
    let b = find_small(&s.arena, blocks[freed + 1]).unwrap();
    s.free_small(slot, b.block, b.word).unwrap();
    assert_eq!(cached(&a, slot, class), limit as u64 + 1002, "no flush was tried");
    freed += 1;
    assert!(a.check().is_err());
    assert!(s.release_slot(slot).is_err(), "the flush of every class finds the damage");
    assert_eq!(s.slots.slot(&s.mem, slot.offset).unwrap().owner.load(Ordering::Acquire), 0, "the slot was let go");
    // Its whole list was free blocks of the cache: all of it is listed, none left in the slot.
    assert_eq!(cached(&a, slot, class), 0, "the damaged cache was taken off the slot");
    assert_eq!(c.retry_at.load(Ordering::Relaxed), 0, "an emptied cache flushes at its limit again");
    free_all_and_check(&a, blocks[freed + 1..].iter().copied(), start);
}

/// A large request that runs short trims the caller's caches (their free spans serve it). One
/// class cache whose flush found damage made the whole trim fail, and so the large request, as
/// corrupt, though the other classes' free spans would have served it. The damaged cache keeps
/// its blocks (its own allocations report it) and the trim goes on: the request is served, and
/// an explicit `trim()` still reports the damage.
#[test]
fn a_damaged_class_cache_does_not_stop_a_shortage_from_trimming_the_others() {
    let a = ScalablePageAllocator::create(region_of(1 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let slot = a.with_slot(Ok).unwrap();
    let (damaged, other) = (class_for(48, 8).unwrap(), class_for(64, 8).unwrap());
    assert_ne!(damaged, other);
    let limit = s.limits[damaged] as usize;
    let mine: Vec<u64> = (0..limit).map(|_| s.allocate_small(slot, damaged, 48, 8).unwrap()).collect();
    let mut small = Vec::new();
    while let Ok(p) = a.allocate(64, 8) {
        small.push(p);
    }
    for p in small {
        a.free(p).unwrap();
    }
    let freed = fill_cache(&a, slot, damaged, &mine);
    miscount(&a, slot, damaged, 1000);
    let big = a.allocate(600 * 1024, 8).expect("the other classes' free spans serve the request");
    assert!(a.trim().is_err(), "an explicit trim reports the damaged cache");
    miscount(&a, slot, damaged, -1000);
    a.free(big).unwrap();
    free_all_and_check(&a, mine[freed..].iter().copied(), start);
}

/// A flush moved part of its cache to the shared list without looking at the blocks: one that
/// is no free block of the cache (a stray write, or a block two threads freed at the same
/// instant that the other cache handed out since) went onto the list, where every refill of
/// the class, in every process, then met it and failed. Such a flush now fails (the free is
/// done, and the next try waits), the block stays in the cache whose own allocations report
/// it, and the other caches are served.
#[test]
fn a_flush_puts_no_block_that_is_not_free_onto_the_shared_list() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let slot = own_slot(&a);
    let class = class_for(48, 8).unwrap();
    let limit = s.limits[class] as usize;
    let blocks: Vec<u64> = (0..2 * limit).map(|_| s.allocate_small(slot, class, 48, 8).unwrap()).collect();
    let mut freed = fill_cache(&a, slot, class, &blocks);
    // The block freed last, first in the cache, is live again: handed out elsewhere.
    let block = blocks[freed - 1] - SMALL_HEADER;
    let info = s.arena.info(block).unwrap();
    let free = info.load(Ordering::Relaxed);
    info.store(live_word(free, 48), Ordering::Relaxed);
    // Over the limit: the flush would move it.
    free_through(&a, slot, blocks[freed]);
    freed += 1;
    let other = own_slot(&a);
    let theirs = s.allocate_small(other, class, 48, 8).expect("the shared list holds only free blocks");
    info.store(free, Ordering::Relaxed);
    s.release_slot(slot).unwrap();
    s.release_slot(other).unwrap();
    free_all_and_check(&a, blocks[freed..].iter().copied().chain([theirs]), start);
}

/// A slot given back with a damaged class cache (its flush, refusing to list a block that is not
/// free, left it in place) kept that cache: the thread that took the slot next failed every
/// refill of the class as corrupt, for good. The damaged cache is now taken off the slot as it
/// goes: the next owner starts the class empty, and the blocks that could not be listed stay on
/// no list, which `check()` reports, until the recovery of a later dead owner lists them.
#[test]
fn a_slot_given_back_with_a_damaged_cache_serves_its_next_owner() {
    // The damaged block first in the cache, in the middle (those before it are listed), last.
    for place in [Place::First, Place::Middle, Place::Last] {
        slot_given_back_with_a_damaged_block(place);
    }
}

enum Place {
    First,
    Middle,
    Last,
}

fn slot_given_back_with_a_damaged_block(place: Place) {
    crate::testing::install_test_liveness();
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let slot = own_slot(&a);
    let class = class_for(48, 8).unwrap();
    let limit = s.limits[class] as usize;
    let blocks: Vec<u64> = (0..2 * limit).map(|_| s.allocate_small(slot, class, 48, 8).unwrap()).collect();
    let freed = fill_cache(&a, slot, class, &blocks);
    // A cached block is live again: handed out elsewhere. (The cache holds the blocks freed
    // last first.)
    let damaged = match place {
        Place::First => freed - 1,
        Place::Middle => freed / 2,
        Place::Last => 0,
    };
    let info = s.arena.info(blocks[damaged] - SMALL_HEADER).unwrap();
    let free = info.load(Ordering::Relaxed);
    info.store(live_word(free, 48), Ordering::Relaxed);
    assert!(s.release_slot(slot).is_err(), "the flush finds the damage");
    assert_eq!(cached(&a, slot, class), 0);
    // Another thread takes the slot, and uses the class.
    let next = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let slot = own_slot(&a);
                let mine: Vec<u64> =
                    (0..2 * limit).map(|_| s.allocate_small(slot, class, 48, 8).expect("a refill")).collect();
                for u in mine {
                    free_through(&a, slot, u);
                }
                s.release_slot(slot).unwrap();
                slot
            })
            .join()
            .unwrap()
    });
    assert_eq!(next, slot, "the same slot, taken again");
    assert!(a.check().is_err(), "the blocks left off the lists are reported");
    // The damage is undone, and a later owner of the slot dies: its recovery lists them.
    info.store(free, Ordering::Relaxed);
    s.slots.slot(&s.mem, slot.offset).unwrap().owner.store(crate::testing::dead_token(), Ordering::Release);
    assert_eq!(s.recover_dead().unwrap(), 1);
    free_all_and_check(&a, blocks[freed..].iter().copied(), start);
}

/// A flush of every class (a slot given back, a trim) that found one class's cache damaged
/// stopped there: the caches of the classes after it kept their blocks, in a slot no one held
/// once given back, on no shared list until a thread took that slot again (and trimmed, none
/// of their spans could go back). Every class is now flushed, and the damage reported.
#[test]
fn a_flush_of_every_class_goes_past_a_damaged_one() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let slot = own_slot(&a);
    let (small, large) = (class_for(48, 8).unwrap(), class_for(1000, 8).unwrap());
    assert!(small < large);
    let p = s.allocate_small(slot, small, 48, 8).unwrap();
    let q = s.allocate_small(slot, large, 1000, 8).unwrap();
    free_through(&a, slot, q);
    assert_ne!(cached(&a, slot, large), 0);
    // The cache of the smaller class counts 1000 blocks more than its list holds.
    miscount(&a, slot, small, 1000);
    assert!(s.release_slot(slot).is_err(), "the flush finds the damage");
    assert_eq!(cached(&a, slot, large), 0, "the healthy class is on the shared list");
    assert_eq!(cached(&a, slot, small), 0, "the damaged class was taken off the slot, its blocks listed");
    free_all_and_check(&a, [p], start);
}

/// Frees `blocks` through the cache of `class` in `slot`, checking after each free that the
/// cache keeps to its limit (a healthy cache flushes as soon as it is over).
/// The blocks the cache of `class` in `slot` counts.
fn cached(a: &ScalablePageAllocator, slot: CacheSlot, class: usize) -> u64 {
    cache::unpack_head(a.shared.cache(slot, class).0.head.load(Ordering::Relaxed)).1
}

/// Adds `by` to the count of the cache of `class` in `slot`, leaving its list as it is: with
/// `by > 0`, a flush walks off the list's end.
fn miscount(a: &ScalablePageAllocator, slot: CacheSlot, class: usize, by: i64) {
    let (c, _) = a.shared.cache(slot, class);
    let (first, count) = cache::unpack_head(c.head.load(Ordering::Relaxed));
    c.head.store(first | (count.wrapping_add_signed(by) << 48), Ordering::Relaxed);
}

/// Frees `blocks` through the cache of `class` in `slot` until the cache is full (the next free
/// puts it over its limit); returns how many it freed.
fn fill_cache(a: &ScalablePageAllocator, slot: CacheSlot, class: usize, blocks: &[u64]) -> usize {
    let mut freed = 0;
    while cached(a, slot, class) < a.shared.limits[class] as u64 {
        free_through(a, slot, blocks[freed]);
        freed += 1;
    }
    freed
}

fn free_within_the_limit(a: &ScalablePageAllocator, slot: CacheSlot, class: usize, blocks: &[u64]) {
    let s = &a.shared;
    let (c, _) = s.cache(slot, class);
    for &u in blocks {
        free_through(a, slot, u);
        let count = cache::unpack_head(c.head.load(Ordering::Relaxed)).1;
        assert!(count <= s.limits[class] as u64, "a healthy cache holds {count} blocks, over its limit");
    }
}

/// A dead process's cache whose flush was put off (its cache had been damaged) is emptied by
/// the recovery, and so is the put-off: the slot's next owner flushes at the limit again.
#[test]
fn a_recovered_slot_flushes_at_its_limit_again() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let slot = dead_slot(&a);
    let s = &a.shared;
    let class = class_for(48, 8).unwrap();
    s.cache(slot, class).0.retry_at.store(1 << 40, Ordering::Relaxed);
    // Blocks a live thread allocated in another slot, to free through the recovered one (which
    // allocates nothing, so no refill sees its cache empty first).
    let other = own_slot(&a);
    let limit = s.limits[class] as usize;
    let blocks: Vec<u64> = (0..4 * limit).map(|_| s.allocate_small(other, class, 48, 8).unwrap()).collect();
    assert_eq!(a.reclaim().unwrap(), 1);
    let mine = own_slot(&a);
    assert_eq!(mine, slot, "the recovered slot is taken again");
    free_within_the_limit(&a, slot, class, &blocks);
    s.release_slot(slot).unwrap();
    s.release_slot(other).unwrap();
    free_all_and_check(&a, [], start);
}

/// A damaged cache whose flush was put off and which allocations then emptied is refilled
/// whole: the put-off is over, and it flushes at its limit again.
#[test]
fn a_damaged_cache_emptied_and_refilled_flushes_at_its_limit_again() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let slot = own_slot(&a);
    let class = class_for(48, 8).unwrap();
    let limit = s.limits[class] as usize;
    let mut blocks: Vec<u64> = (0..4 * limit).map(|_| s.allocate_small(slot, class, 48, 8).unwrap()).collect();
    let (c, _) = s.cache(slot, class);
    let mut freed = fill_cache(&a, slot, class, &blocks);
    // The cache counts 1000 blocks more than its list holds: the flush fails and is put off.
    miscount(&a, slot, class, 1000);
    free_through(&a, slot, blocks[freed]);
    freed += 1;
    assert_ne!(c.retry_at.load(Ordering::Relaxed), 0, "the next try waits");
    // Allocations take every block it holds, then find its list's end and refill it.
    let held = (0..=limit + 1).map(|_| s.allocate_small(slot, class, 48, 8).unwrap());
    blocks.splice(..freed, held);
    assert!(cached(&a, slot, class) <= limit as u64, "the refilled cache counts what it holds");
    free_within_the_limit(&a, slot, class, &blocks);
    s.release_slot(slot).unwrap();
    free_all_and_check(&a, [], start);
}

/// A slot this thread holds whose magic another process overwrote is still used without a
/// panic, in debug builds too: its offset was checked when it was taken, and what its use relies
/// on (bounds, alignment) cannot change. `check()` reports the damage.
#[test]
fn a_held_slot_whose_magic_was_overwritten_is_used_without_a_panic() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    let slot = own_slot(&a);
    let class = class_for(48, 8).unwrap();
    let p = s.allocate_small(slot, class, 48, 8).unwrap();
    // The slot's magic and index share the word after its owner.
    let magic = s.mem.word(slot.offset + 8).unwrap();
    let before = magic.load(Ordering::Relaxed);
    magic.store(before ^ 0xffff, Ordering::Relaxed);
    let q = s.allocate_small(slot, class, 48, 8).unwrap();
    free_through(&a, slot, q);
    free_through(&a, slot, p);
    assert!(a.check().is_err());
    magic.store(before, Ordering::Relaxed);
    s.release_slot(slot).unwrap();
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
}

/// A slot's index is shared memory, and a cache labelled its free blocks with it (before it kept
/// the label it took with its slot): an index a peer broke past what an info word's label field
/// holds must not spill into the words' class and distance bits (a carve then formatted a whole
/// span of blocks no one could use or free again, and `check` found them damaged for good). Once
/// the index is mended and the damaged cache flushed, the allocator is whole and back to its
/// starting free capacity.
#[test]
fn a_slot_index_past_the_label_field_breaks_no_info_word() {
    let a = ScalablePageAllocator::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let s = &a.shared;
    let start = a.stats().free_bytes();
    let slot = own_slot(&a);
    let index = s.slots.slot(&s.mem, slot.offset).unwrap().index;
    let at = index_word(&a, slot.offset);
    let class = class_for(1000, 8).unwrap();
    for bad in [u32::MAX - 1, 1 << 22, (1 << 22) - 1] {
        // SAFETY: the slot's index, in bounds and aligned; no other thread uses the slot.
        unsafe { at.write_volatile(bad) };
        let mut users = Vec::new();
        for _ in 0..40 {
            if let Ok(u) = s.allocate_small(slot, class, 1000, 8) {
                users.push(u);
            }
        }
        assert_eq!(users.len(), 40, "index {bad:#x}: the cache served");
        for u in users {
            free_through(&a, slot, u);
        }
        s.flush_all(slot).unwrap();
        // SAFETY: as above.
        unsafe { at.write_volatile(index) };
        a.check().unwrap_or_else(|e| panic!("index {bad:#x}: {e}"));
    }
    s.release_slot(slot).unwrap();
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
}

#[test]
fn blocks_a_shortage_frees_into_the_cache_it_refills_are_kept() {
    let config = ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = ScalablePageAllocator::create(region_of(1 << 20), AllocatorId::new(1, 0), &config).unwrap();
    let start = a.stats().free_bytes();
    crate::testing::install_test_liveness();
    // Every block the region holds, all of them a dead process's: the cache of their class is
    // empty and so is the shared list when the next allocation of the class runs short.
    let mut blocks = Vec::new();
    loop {
        match a.allocate(48, 8) {
            Ok(p) => blocks.push(p.get()),
            Err(Error::OutOfMemory { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    for &u in &blocks {
        mark_dead(&a, u);
    }
    // Its relief frees them, some into that very cache (the rest overflow to the shared list):
    // the refill that follows must not write over them.
    let p = a.allocate(48, 8).unwrap();
    a.check().unwrap();
    free_all_and_check(&a, [p.get()], start);
}

/// A thread that outlived the handle it allocated through (a pool's) kept its slot, with the
/// blocks its cache held, until it exited: the slot's release, registered with the thread, kept
/// the region mapped too.
#[test]
fn dropping_a_handle_gives_back_the_slots_of_threads_that_outlive_it() {
    let o = outlive_a_dropped_handle(
        |a: &ScalablePageAllocator| &a.shared,
        |b| {
            let s = &b.shared;
            let offsets = s.slots.offsets(&s.mem).unwrap();
            let owned = |at: &&u64| s.slots.slot(&s.mem, **at).unwrap().owner.load(Ordering::Relaxed) != 0;
            let held = offsets.iter().filter(owned).count();
            b.trim().unwrap();
            (held, b.stats().free_bytes())
        },
    );
    let (held, free) = o.seen;
    assert_eq!(held, 0, "a slot stayed held with no handle left to use it");
    assert_eq!(free, o.start, "the slot's cache kept its blocks");
    assert!(o.unmapped, "the thread kept the handle's region mapped");
    o.attached.check().unwrap();
}
