use super::super::span::freed_word;
use super::*;
use crate::allocators::testing::{exercise, op_strategy, region_of, run_model};
use crate::sync::LinkStore;
use crate::testing::TestThreads;
use proptest::prelude::*;

type Tla = ThreadLocalAllocator<TestThreads>;

#[test]
fn serves_every_size_and_alignment_and_returns_to_empty() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    exercise(&a);
    a.trim().unwrap();
    a.check().unwrap();
}

#[test]
fn remote_frees_return_to_the_owner_and_exited_threads_give_their_heaps_back() {
    let a = Arc::new(Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap());
    let start = a.stats().free_bytes();
    let blocks: Vec<u64> = {
        let a = a.clone();
        std::thread::spawn(move || (0..2000).map(|i| a.allocate(16 + i % 500, 8).unwrap().get()).collect())
            .join()
            .unwrap()
    };
    assert_eq!(a.owned_heaps().unwrap(), 0, "the exited thread released its heap");
    a.check().unwrap();
    for b in blocks {
        a.free(OffsetPtr::new(b)).unwrap();
    }
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
    let p = a.allocate(100, 8).unwrap();
    a.free(p).unwrap();
    a.release_thread_heap().unwrap();
    a.check().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let a = Tla::create(region_of(24 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        run_model(&a, &ops);
    }
}

/// Remote-frees `blocks` (user offsets) from this thread (which takes a heap to record them in).
fn free_remotely(a: &Tla, blocks: &[u64]) {
    for &b in blocks {
        a.free(OffsetPtr::new(b)).unwrap();
    }
}

/// A heap owned by a process that then "dies" (the test hook calls its pid dead), with `n` live
/// blocks of 100 bytes.
fn dead_heap(a: &Tla, n: usize) -> (u64, usize, Vec<u64>) {
    crate::testing::install_test_liveness();
    let s = &a.shared;
    let heap = s.heaps.acquire(&s.mem, &s.fs, crate::testing::dead_token(), || Ok(())).unwrap();
    let class = class_for(100, 8).unwrap();
    let blocks = (0..n).map(|_| s.allocate_small(heap, class, 100, 8).unwrap()).collect();
    (heap, class, blocks)
}

#[test]
fn a_heap_whose_owner_died_mid_collection_is_repaired_whole() {
    let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &config).unwrap();
    let start = a.stats().free_bytes();
    let (heap_off, class, blocks) = dead_heap(&a, 300);
    free_remotely(&a, &blocks[..150]);
    // The owner took its remote list and turned a batch of it free, then was killed.
    let s = &a.shared;
    let heap = s.heaps.slot(&s.mem, heap_off).unwrap();
    let first = heap.body.remote.0[class].take_recorded(&heap.body.pending.0[class]).unwrap();
    let mut at = Some(first);
    for _ in 0..40 {
        let b = at.unwrap();
        let w = s.arena.info(b).unwrap();
        w.store(freed_word(w.load(Ordering::Relaxed), 0), Ordering::Relaxed);
        at = s.arena.load_link(b).unwrap();
    }
    // Frees keep arriving meanwhile.
    free_remotely(&a, &blocks[150..200]);
    assert!(a.check().is_err(), "a half-done collection shows");
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    // Its other 100 blocks died with it (`DeadProcessBlocks::Free`).
    let end = a.stats();
    assert_eq!((end.live_allocations, end.bytes_in_use), (0, 0));
    assert_eq!(end.free_bytes(), start);
    // This thread took a heap to record its remote frees in; the dead one's is back.
    assert_eq!(a.owned_heaps().unwrap(), 1);
    a.release_thread_heap().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 0);
}

#[test]
fn a_heap_whose_owner_died_between_recording_and_taking_is_repaired_whole() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let (heap_off, class, blocks) = dead_heap(&a, 120);
    free_remotely(&a, &blocks[..100]);
    // Recorded, but killed before the list let go of the chain: it is in both places.
    let s = &a.shared;
    let heap = s.heaps.slot(&s.mem, heap_off).unwrap();
    let top = heap.body.remote.0[class].peek().unwrap();
    heap.body.pending.0[class].store(crate::sync::tagged_list::encode(Some(top)), Ordering::Release);
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    // `DeadProcessBlocks::Keep`: the 20 blocks it held stay allocated until someone frees them.
    assert_eq!(a.stats().live_allocations, 20);
    free_remotely(&a, &blocks[100..]);
    assert_back_to_start(&a, start);
}

/// After a trim, `check()` passes, nothing is live and the free bytes are `start` again.
fn assert_back_to_start(a: &Tla, start: u64) {
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
}

#[test]
fn a_run_left_half_made_by_a_dead_lock_holder_is_returned() {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let s = &a.shared;
    // Killed holding the free-space lock, after taking a span's units, before its header.
    let mut g = s.fs.lock();
    g.alloc(16, super::super::large::TAG_SPAN, 3).unwrap();
    core::mem::forget(g);
    let lock = s.region.offset() + core::mem::offset_of!(TlaHeader, free_space) as u64;
    s.mem.word(lock).unwrap().store(crate::testing::dead_token(), Ordering::Release);
    assert_eq!(a.stats().free_bytes(), start, "the run went back when the lock was taken over");
    a.check().unwrap();
    let p = a.allocate(64, 8).unwrap();
    a.free(p).unwrap();
    a.check().unwrap();
}

/// Which step of a remote free its process was killed before.
#[derive(Clone, Copy, Debug)]
enum KilledBefore {
    /// Recorded the block in its heap and in the block, not yet marked it.
    Marking,
    /// Marked it remote, not yet pushed it on the owner's list.
    Pushing,
    /// Pushed it, not yet cleared its record.
    Clearing,
}

/// This thread allocates 50 blocks; a thread of a process that then dies remote-frees block 7
/// and is killed at `at`. Returns the allocator, its starting free bytes and the blocks.
fn killed_remote_free(at: KilledBefore) -> (Tla, u64, Vec<OffsetPtr>) {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = a.stats().free_bytes();
    let blocks: Vec<OffsetPtr> = (0..50).map(|_| a.allocate(100, 8).unwrap()).collect();
    let s = &a.shared;
    let freer = s.heaps.acquire(&s.mem, &s.fs, crate::testing::dead_token(), || Ok(())).unwrap();
    let Some(Found::Small(b)) = find_live(&s.arena, blocks[7].get()) else { panic!("block 7 is live") };
    let owner = b.header.owner.load(Ordering::Relaxed);
    match at {
        KilledBefore::Marking => {
            s.heaps.slot(&s.mem, freer).unwrap().body.in_flight.0.store(b.block, Ordering::Release);
            s.arena.word(b.block + 16).unwrap().store(heap::freer_mark(freer), Ordering::Release);
        }
        KilledBefore::Pushing => {
            s.mark_remote(freer, owner, b.block, b.info()).unwrap();
        }
        KilledBefore::Clearing => {
            let (heap, _record) = s.mark_remote(freer, owner, b.block, b.info()).unwrap();
            heap.body.remote.0[b.class()].push(&s.arena, b.block);
        }
    }
    (a, start, blocks)
}

#[test]
fn a_remote_freer_killed_between_marking_and_pushing_leaves_the_block_to_its_owner() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Pushing);
    assert!(a.check().is_err(), "a block marked remote on no list shows");
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 2, "the freer's heap waits for the block's owner");
    // The owner settles it when it next collects: the block is free again, the heap let go.
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 1);
    assert_eq!(a.stats().live_allocations, 49);
    for (i, p) in blocks.iter().enumerate() {
        if i != 7 {
            a.free(*p).unwrap();
        }
    }
    assert_back_to_start(&a, start);
}

#[test]
fn a_remote_freer_killed_before_marking_or_after_pushing_is_settled_once() {
    for at in [KilledBefore::Marking, KilledBefore::Clearing] {
        let (a, start, blocks) = killed_remote_free(at);
        assert!(a.check().is_err(), "{at:?}: a half-done remote free shows until reclaimed");
        assert_eq!(a.reclaim().unwrap(), 1);
        a.trim().unwrap();
        a.check().unwrap();
        assert_eq!(a.owned_heaps().unwrap(), 1, "{at:?}");
        // Before marking, the free never happened: block 7 is still live, and freeable.
        let freed = matches!(at, KilledBefore::Clearing) as u64;
        assert_eq!(a.stats().live_allocations, 50 - freed, "{at:?}");
        for (i, p) in blocks.iter().enumerate() {
            if i != 7 || freed == 0 {
                a.free(*p).unwrap();
            }
        }
        assert_back_to_start(&a, start);
    }
}
