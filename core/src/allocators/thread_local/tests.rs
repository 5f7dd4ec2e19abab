use super::super::span::{freed_word, span_of_word, Info, State, SMALL_HEADER};
use super::heap::ClassState;
use super::*;
use crate::allocators::testing::{
    exercise, exhaust_and_recover, failed_copy_leaks_nothing, forged_blocks_of_no_class_are_refused,
    interior_offsets_with_back_words_in_the_data_are_refused, offsets_that_are_not_a_padded_blocks_own_are_refused,
    op_strategy, outlive_a_dropped_handle, refuse_bad_input, region_of, run_model,
    small_sizes_past_the_block_are_refused, survive_damage,
};
use crate::sync::atomic::AtomicU64;
use crate::sync::LinkStore;
use crate::testing::TestThreads;
use alloc::collections::BTreeSet;
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
fn runs_out_of_memory_and_recovers_every_time() {
    let a = Tla::create(region_of(4 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    exhaust_and_recover(&a);
}

#[test]
fn a_reallocation_whose_copy_fails_frees_the_new_block() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    failed_copy_leaks_nothing(&a, |p| p.get() - 16);
}

#[test]
fn a_small_blocks_size_field_is_bounded_by_its_user_bytes() {
    let a = Tla::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    small_sizes_past_the_block_are_refused(&a, &|user, bytes| {
        let Ok(Found::Small(b)) = live_block(&a.shared.arena, user) else { panic!("no small block at {user}") };
        let cs = class_line(&a, b.header.owner.load(Ordering::Relaxed), b.class());
        cs.live_bytes.set(cs.live_bytes.get().wrapping_add(bytes));
    });
}

#[test]
fn interior_offsets_are_refused_whatever_the_data_before_them() {
    let a = Tla::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    interior_offsets_with_back_words_in_the_data_are_refused(&a);
}

#[test]
fn a_block_forged_with_no_class_is_refused_not_a_panic() {
    let a = Tla::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    forged_blocks_of_no_class_are_refused(&a);
}

#[test]
fn only_a_padded_blocks_own_offset_frees_it() {
    let a = Tla::create(region_of(4 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    offsets_that_are_not_a_padded_blocks_own_are_refused(&a);
}

#[test]
fn refuses_every_offset_that_is_no_live_block() {
    let a = Tla::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let every_word: Vec<u64> = (a.region().offset()..a.region().end()).step_by(8).collect();
    refuse_bad_input(&a, &every_word);
}

#[test]
fn remote_frees_return_to_the_owner_and_exited_threads_give_their_heaps_back() {
    let a = Arc::new(Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap());
    let start = start_of(&a);
    // This thread holds a heap of its own, so its frees of the other thread's blocks are remote.
    let mine = a.allocate(100, 8).unwrap();
    let before = start_of(&a);
    let (blocks, exited_heap): (Vec<u64>, u64) = {
        let a = a.clone();
        std::thread::spawn(move || {
            let blocks = (0..2000).map(|i| a.allocate(16 + i % 500, 8).unwrap().get()).collect();
            (blocks, a.existing_heap())
        })
        .join()
        .unwrap()
    };
    assert_ne!(exited_heap, a.existing_heap());
    assert_eq!(a.owned_heaps().unwrap(), 1, "the exited thread released its heap");
    a.check().unwrap();
    for b in blocks {
        a.free(OffsetPtr::new(b)).unwrap();
    }
    a.check().unwrap();
    // Each remote free into the heap no thread owns drained it: its spans are back already.
    assert_back_at(&a, before);
    a.free(mine).unwrap();
    assert_back_to_start(&a, start);
    let p = a.allocate(100, 8).unwrap();
    a.free(p).unwrap();
    a.release_thread_heap().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 0);
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
    let start = start_of(&a);
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
    assert_back_at(&a, start);
    // This thread took a heap to record its remote frees in; the dead one's is back.
    assert_eq!(a.owned_heaps().unwrap(), 1);
    a.release_thread_heap().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 0);
}

/// A repairer killed at any point of its repair leaves the heap's count of allocations for the
/// repairer after it. Before, it cleared the count first, keeping the old one in its own memory
/// only, so that the next repair counted the live blocks alone: the heap's history (in
/// `class_stats` and `total_allocations`) went back.
#[test]
fn a_repairer_killed_part_way_leaves_the_allocation_count_to_the_next() {
    for n in 0.. {
        let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let (heap, class, blocks) = dead_heap(&a, 50);
        let s = &a.shared;
        // The owner freed 20 of them itself before it died.
        for &b in &blocks[..20] {
            assert_eq!(s.quick.free(heap, b), Some(false));
        }
        assert_eq!((a.class_stats()[class].allocations, a.stats().live_allocations), (50, 30));
        let died = crate::crash::testing::die_at(n, || s.reclaim_dead(0)).is_none();
        if died {
            // The repairer's process is dead too: its token on the heap is a dead one.
            s.heaps.slot(&s.mem, heap).unwrap().owner.store(crate::testing::dead_token(), Ordering::Release);
            assert_eq!(a.reclaim().unwrap(), 1, "killed at point {n}");
        }
        a.check().unwrap();
        assert_eq!(a.class_stats()[class].allocations, 50, "killed at point {n}");
        assert_eq!(a.stats().live_allocations, 30, "killed at point {n}");
        if !died {
            break;
        }
    }
}

/// A repair clears a dead heap's counters and adds each span's blocks and bytes to them, but
/// they are shared memory: another process that wrote them meanwhile (here near the top of a
/// u64, at each crash point of the reclaim in turn) made the sums overflow, a panic in a debug
/// build. The repair now reports such counters as damage.
#[test]
fn counters_a_peer_writes_during_a_repair_give_errors_not_panics() {
    for n in 0.. {
        let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let (heap, class, _) = dead_heap(&a, 50);
        let s = &a.shared;
        let cs: *const ClassState = &s.local_snapshot(s.heaps.slot(&s.mem, heap).unwrap()).classes[class];
        let write = move || {
            // SAFETY: the heap's class state, in the region `a` keeps mapped while the write can
            // run (inside the reclaim below).
            let cs = unsafe { &*cs };
            cs.blocks.set(u64::MAX - 1);
            cs.live_bytes.set(u64::MAX - 1);
        };
        let (reclaimed, wrote) = crate::crash::testing::write_at(n, write, || a.reclaim());
        assert!(matches!(reclaimed, Ok(_) | Err(Error::Corrupt { .. })), "written at point {n}: {reclaimed:?}");
        if !wrote {
            break;
        }
    }
}

/// A reclaim whose repair of a dead process's heap fails (damage) gives the heap back as it
/// found it, for a later reclaim to try again, and goes on with the other dead heaps; then it
/// reports the damage. Before, the heap stayed with the reclaimer's process, held for good
/// while that lived (its remote frees piling up unseen), and the walk stopped there.
#[test]
fn a_reclaim_whose_repair_fails_gives_the_heap_back() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let (damaged, _, blocks) = dead_heap(&a, 3);
    let (other, _, other_blocks) = dead_heap(&a, 3);
    // Damage: the span of the first heap's blocks says it is of the next class.
    let block = blocks[0] - SMALL_HEADER;
    let kind = s.arena.word(span_of_word(block, s.arena.info(block).unwrap().load(Ordering::Relaxed))).unwrap();
    let good = kind.load(Ordering::Relaxed);
    kind.store(good + (1 << 32), Ordering::Relaxed);
    let owner = |heap: u64| s.heaps.slot(&s.mem, heap).unwrap().owner.load(Ordering::Acquire);
    for _ in 0..2 {
        assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
        assert_eq!(owner(damaged), crate::testing::dead_token(), "given back as it was");
        assert_eq!(owner(other), 0, "the other dead heap is released");
    }
    // An attach reclaims only to gain space: the damaged dead heap does not refuse it.
    for _ in 0..2 {
        let attached = Tla::attach(a.region().duplicate(), AllocatorId::new(1, 0));
        assert!(attached.is_ok(), "attach beside a damaged dead heap: {:?}", attached.err());
        assert_eq!(owner(damaged), crate::testing::dead_token());
    }
    kind.store(good, Ordering::Relaxed);
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    // `DeadProcessBlocks::Keep`: their blocks stay allocated until someone frees them.
    assert_eq!(a.stats().live_allocations, 6);
    free_remotely(&a, &blocks);
    free_remotely(&a, &other_blocks);
    assert_back_to_start(&a, start);
}

/// A dead heap's span whose run the free-space table says is shorter than the class's spans
/// (damage) fails the repair, which writes nothing past the run: before, the rebuild wrote a
/// fresh header into every block of the class's span, past the run into what the free-space
/// manager had handed out there (here another thread's large block, header and bytes).
#[test]
fn a_repair_writes_nothing_past_a_span_whose_run_is_short() {
    use super::super::free_space::UNIT;
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let s = &a.shared;
    let (dead, class, blocks) = dead_heap(&a, 3);
    let block = blocks[0] - SMALL_HEADER;
    let span = span_of_word(block, s.arena.info(block).unwrap().load(Ordering::Relaxed));
    let units = u64::from(LAYOUTS[class].units);
    {
        let mut g = s.fs.lock();
        assert!(g.resize(s.fs.layout().unit_of(span).unwrap(), 1).unwrap());
    }
    let size = ((units - 1) * UNIT - 64) as usize;
    let p = a.allocate(size, 8).unwrap();
    assert_eq!(p.get(), span + UNIT + 32, "the large block lies where the span's run went on");
    let bytes = a.region().ptr(p.get(), size as u64).unwrap();
    // SAFETY: the block's user bytes, ours; no other thread uses `a`.
    unsafe { bytes.write_bytes(0xab, size) };
    let reclaimed = a.reclaim();
    // SAFETY: as above.
    let kept = unsafe { core::slice::from_raw_parts(bytes, size) };
    assert!(kept.iter().all(|&b| b == 0xab), "the large block's bytes were written over");
    assert!(matches!(reclaimed, Err(Error::Corrupt { .. })), "{reclaimed:?}");
    let owner = s.heaps.slot(&s.mem, dead).unwrap().owner.load(Ordering::Acquire);
    assert_eq!(owner, crate::testing::dead_token(), "given back as it was");
    a.free(p).unwrap();
}

/// A heap whose bump span another process's stray write set to another heap's span of the
/// class formats none of that span's blocks: the allocation that reaches it reports the damage.
/// Before, it formatted them onto its own list and handed them out, while the span's own heap
/// formats and hands out the same blocks from its bump index.
#[test]
fn a_heap_bumps_into_no_span_of_another_heap() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let s = &a.shared;
    let class = class_for(100, 8).unwrap();
    let other = s.heaps.acquire(&s.mem, &s.fs, crate::sync::owner_token(), || Ok(())).unwrap();
    let theirs = s.allocate_small(other, class, 100, 8).unwrap() - SMALL_HEADER;
    let span = span_of_word(theirs, s.arena.info(theirs).unwrap().load(Ordering::Relaxed));
    let end = span + LAYOUTS[class].span_bytes;
    let mine = a.allocate(100, 8).unwrap();
    let heap = s.heaps.slot(&s.mem, a.existing_heap()).unwrap();
    // SAFETY: this thread owns the heap.
    unsafe { s.local(heap) }.classes[class].bump_span.set(span);
    let mut ours = Vec::new();
    for _ in 0..4 * LAYOUTS[class].blocks {
        match a.allocate(100, 8) {
            Ok(p) => {
                assert!(p.get() < span || p.get() >= end, "a block of the other heap's span handed out");
                ours.push(p);
            }
            Err(e) => {
                assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
                break;
            }
        }
    }
    assert!(ours.len() < 4 * LAYOUTS[class].blocks as usize, "the damage was reached");
    // SAFETY: as above.
    unsafe { s.local(heap) }.classes[class].bump_span.set(0);
    ours.into_iter().chain([mine]).for_each(|p| a.free(p).unwrap());
}

/// `check()` holds the large-block counters to the runs, as the page allocator's does: before,
/// it checked each large run but passed whatever the counters said.
#[test]
fn check_holds_the_large_block_counters_to_the_runs() {
    let a = Tla::create(region_of(4 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    crate::allocators::testing::large_counters_off_fail_check(&a, &a.shared.fs);
}

/// Reclaims run only to gain space (on attach, when space runs short) pass over a dead heap
/// whose repair fails, and count each such failure where users can read it
/// (`failed_reclaims`); a `reclaim()` returns its failure instead. Before, nothing said that
/// they had failed.
#[test]
fn reclaims_passed_over_on_attach_and_shortage_are_counted() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let s = &a.shared;
    let (_, _, blocks) = dead_heap(&a, 3);
    // Damage: the span of the heap's blocks says it is of the next class.
    let block = blocks[0] - SMALL_HEADER;
    let kind = s.arena.word(span_of_word(block, s.arena.info(block).unwrap().load(Ordering::Relaxed))).unwrap();
    let good = kind.load(Ordering::Relaxed);
    kind.store(good + (1 << 32), Ordering::Relaxed);
    assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
    assert_eq!(a.failed_reclaims(), 0, "reclaim() returns its failure");
    let attached = Tla::attach(a.region().duplicate(), AllocatorId::new(1, 0)).unwrap();
    assert_eq!(attached.failed_reclaims(), 1, "the attach's reclaim failed");
    let too_big = a.stats().capacity as usize;
    assert!(matches!(a.allocate(too_big, 8), Err(Error::OutOfMemory { .. })));
    assert_eq!(a.failed_reclaims(), 2, "both attempts that reclaim failed");
    kind.store(good, Ordering::Relaxed);
    assert!(matches!(a.allocate(too_big, 8), Err(Error::OutOfMemory { .. })));
    assert_eq!(a.failed_reclaims(), 2, "a reclaim that succeeds is not counted");
    let attached = Tla::attach(a.region().duplicate(), AllocatorId::new(1, 0)).unwrap();
    assert_eq!(attached.failed_reclaims(), 0);
    a.check().unwrap();
}

/// A heap whose owner word a stray write of another process set to a token no process writes
/// (its process id 0: a small number, an offset) is repaired and released as a dead process's
/// is: before, no reclaim took it, so the heap was lost for good and the remote frees of its
/// blocks piled up on its lists, never collected.
#[test]
fn a_heap_whose_owner_word_names_no_process_is_reclaimed() {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let class = class_for(100, 8).unwrap();
    for stray in [1u64, 0x356, 0x1000, 0xffff_ffff] {
        let heap = s.heaps.acquire(&s.mem, &s.fs, crate::sync::owner_token(), || Ok(())).unwrap();
        let blocks: Vec<u64> = (0..50).map(|_| s.allocate_small(heap, class, 100, 8).unwrap()).collect();
        let h = s.heaps.slot(&s.mem, heap).unwrap();
        h.owner.store(stray, Ordering::Release);
        free_remotely(&a, &blocks);
        assert_eq!(a.reclaim().unwrap(), 1, "a heap held by {stray:#x} was not reclaimed");
        assert_eq!(h.owner.load(Ordering::Acquire), 0);
        a.check().unwrap();
    }
    // This thread took a heap to record its remote frees in.
    a.release_thread_heap().unwrap();
    assert_back_to_start(&a, start);
}

#[test]
fn a_heap_whose_owner_died_between_recording_and_taking_is_repaired_whole() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
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

/// A dead heap's journal of a remote collection (its `pending` word) that names a block of
/// another heap's span, by a stray write or a damaged link, leaves that block to its heap: before,
/// the repair turned it and every remote free linked after it (the other heap's whole remote
/// list) free, blocks no repair of the dead heap lists (they are not in its spans) and their own
/// heap's collection then refused as damage, so they were lost to both.
#[test]
fn a_repair_frees_no_remote_block_of_another_heaps_span() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let (dead, class, dead_blocks) = dead_heap(&a, 3);
    // Another live thread's heap, whose blocks this thread frees: in transit on its remote list.
    let other = s.heaps.acquire(&s.mem, &s.fs, crate::sync::owner_token(), || Ok(())).unwrap();
    let blocks: Vec<u64> = (0..20).map(|_| s.allocate_small(other, class, 100, 8).unwrap()).collect();
    free_remotely(&a, &blocks);
    let top = s.heaps.slot(&s.mem, other).unwrap().body.remote.0[class].peek().unwrap();
    let dead_heap = s.heaps.slot(&s.mem, dead).unwrap();
    dead_heap.body.pending.0[class].store(crate::sync::tagged_list::encode(Some(top)), Ordering::Release);
    assert_eq!(a.reclaim().unwrap(), 1);
    let state = Info::unpack(s.arena.info(top).unwrap().load(Ordering::Acquire)).map(|i| i.state);
    assert_eq!(state, Some(super::super::span::State::Remote), "still in transit to its own heap");
    a.check().unwrap();
    // Its owner collects every one of them, and lets the heap go.
    s.trim_heap(other).unwrap();
    s.release_heap(other).unwrap();
    // `DeadProcessBlocks::Keep`: the dead heap's blocks stay allocated until someone frees them.
    free_remotely(&a, &dead_blocks);
    assert_back_to_start(&a, start);
}

/// What "back to the start" compares: the free bytes the statistics report (the capacity less
/// the live blocks), and the units the free-space manager holds (so spans that were never
/// handed back show).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Start {
    free_bytes: u64,
    free_units: u64,
}

fn start_of(a: &Tla) -> Start {
    Start { free_bytes: a.stats().free_bytes(), free_units: a.shared.fs.lock().free_units() }
}

/// The free bytes and the free-space manager's units are what they were at `start`.
fn assert_back_at(a: &Tla, start: Start) {
    assert_eq!(start_of(a), start);
}

/// After a trim, `check()` passes, nothing is live and the allocator holds what it held at
/// `start` ([`assert_back_at`]).
fn assert_back_to_start(a: &Tla, start: Start) {
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_back_at(a, start);
}

/// Frees every block but those at `gone` (already freed by the test's own means), then asserts
/// the allocator is back to `start` ([`assert_back_to_start`]).
fn free_the_rest(a: &Tla, start: Start, blocks: &[OffsetPtr], gone: &[usize]) {
    for (i, p) in blocks.iter().enumerate() {
        if !gone.contains(&i) {
            a.free(*p).unwrap();
        }
    }
    assert_back_to_start(a, start);
}

/// A heap of the allocator other than the calling thread's.
fn other_heap(a: &Tla) -> u64 {
    let s = &a.shared;
    s.heaps.offsets(&s.mem).unwrap().into_iter().find(|&h| h != a.existing_heap()).unwrap()
}

#[test]
fn a_run_left_half_made_by_a_dead_lock_holder_is_returned() {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    // Killed holding the free-space lock, after taking a span's units, before its header.
    let mut g = s.fs.lock();
    g.alloc(16, super::super::large::TAG_SPAN, 3).unwrap();
    core::mem::forget(g);
    let lock = s.region.offset() + core::mem::offset_of!(TlaHeader, free_space) as u64;
    s.mem.word(lock).unwrap().store(crate::testing::dead_token(), Ordering::Release);
    assert_back_at(&a, start);
    a.check().unwrap();
    let p = a.allocate(64, 8).unwrap();
    a.free(p).unwrap();
    a.check().unwrap();
}

/// With dead processes' blocks freed: a thread allocates blocks of `sizes` and exits, so its
/// heap is given back with them live. Returns the allocator, its start, the heap and the blocks.
fn given_back_heap(sizes: &[usize]) -> (Arc<Tla>, Start, u64, Vec<OffsetPtr>) {
    crate::testing::install_test_liveness();
    let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = Arc::new(Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &config).unwrap());
    let start = start_of(&a);
    let (heap, blocks) = {
        let (a, sizes) = (a.clone(), sizes.to_vec());
        std::thread::spawn(move || {
            let blocks = sizes.iter().map(|&n| a.allocate(n, 8).unwrap()).collect();
            (a.existing_heap(), blocks)
        })
        .join()
        .unwrap()
    };
    assert_eq!(a.owned_heaps().unwrap(), 0);
    (a, start, heap, blocks)
}

#[test]
fn a_remote_freer_that_died_draining_a_heap_leaves_the_heaps_live_blocks_alone() {
    let (a, start, heap, blocks) = given_back_heap(&[100, 100, 3000, 50_000]);
    // A thread of another process remote-freed into the heap no thread holds, took the heap to
    // drain it, and died holding it. The blocks are this process's, not the drainer's.
    let s = &a.shared;
    let h = s.heaps.slot(&s.mem, heap).unwrap();
    h.owner.compare_exchange(0, crate::testing::dead_token(), Ordering::AcqRel, Ordering::Relaxed).unwrap();
    assert_eq!(a.reclaim().unwrap(), 1);
    for p in &blocks {
        a.size_of(*p).expect("a block of a live process stays live");
    }
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, blocks.len() as u64);
    free_the_rest(&a, start, &blocks, &[]);
}

#[test]
fn a_heap_given_back_with_live_blocks_goes_to_no_other_process() {
    let (a, start, heap, blocks) = given_back_heap(&[100, 50_000]);
    // A thread of another process (which then dies) takes a heap: not that one, whose blocks
    // a reclaim would free with the thief's.
    let s = &a.shared;
    let theirs = s.acquire_heap(crate::testing::dead_token()).unwrap();
    assert_ne!(theirs, heap);
    s.allocate_small(theirs, class_for(100, 8).unwrap(), 100, 8).unwrap();
    assert_eq!(a.reclaim().unwrap(), 1);
    for p in &blocks {
        a.size_of(*p).expect("a block of a live process stays live");
    }
    assert_eq!(a.stats().live_allocations, blocks.len() as u64);
    // A thread of this process takes it again.
    assert_eq!(a.thread_heap().unwrap(), heap);
    free_the_rest(&a, start, &blocks, &[]);
}

#[test]
fn the_blocks_of_a_heap_given_back_are_freed_when_its_process_dies() {
    let (a, start, heap, blocks) = given_back_heap(&[100, 200, 3000, 50_000]);
    // As if the process whose thread gave the heap back (and whose other threads still held
    // its blocks) had died since.
    let s = &a.shared;
    let h = s.heaps.slot(&s.mem, heap).unwrap();
    h.body.blocks_of.0.store(crate::testing::dead_token(), Ordering::Release);
    assert_eq!(a.reclaim().unwrap(), 1);
    for p in &blocks {
        assert!(a.size_of(*p).is_err(), "a dead process's block is freed");
    }
    assert_eq!(h.body.blocks_of.0.load(Ordering::Acquire), 0);
    assert_eq!(a.owned_heaps().unwrap(), 0);
    assert_back_to_start(&a, start);
}

/// A dead process's heap whose number (shared memory) was damaged to another heap's: its
/// repair freed that heap's large blocks (a large block's run records its heap by number), here
/// those of a live thread. The repair now holds the number to the heap's place in the table.
#[test]
fn a_repair_frees_no_large_block_of_the_heap_a_damaged_number_names() {
    crate::testing::install_test_liveness();
    let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &config).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let ours = a.allocate(300_000, 8).unwrap();
    let mine = a.existing_heap();
    let (dead, _, _) = dead_heap(&a, 1);
    let index_of = |heap: u64| {
        let at = heap + core::mem::offset_of!(super::heap::Heap, index) as u64;
        s.mem.ptr(at, 4).unwrap().cast::<u32>()
    };
    // SAFETY: the index words of two slots of the table, in bounds and aligned; no one else
    // runs on the allocator.
    let (my_index, dead_index) = unsafe { (*index_of(mine), *index_of(dead)) };
    // SAFETY: as above.
    unsafe { index_of(dead).write(my_index) };
    assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
    assert_eq!(a.size_of(ours).unwrap(), 300_000, "our large block is still ours");
    // SAFETY: as above.
    unsafe { index_of(dead).write(dead_index) };
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    a.free(ours).unwrap();
    assert_back_to_start(&a, start);
}

/// A span's bump index is shared memory. Damaged low, to the number of the span's free blocks,
/// it made a sweep give the span back with live blocks: those past the index, or, with free
/// blocks past it standing in for them, live ones below it. The sweep now holds the free blocks
/// to the index and looks at the headers past it, and reports the damage, giving nothing back.
#[test]
fn a_sweep_gives_back_no_span_whose_bump_index_was_damaged_low() {
    let class = class_for(100, 8).unwrap();
    let n = LAYOUTS[class].blocks as usize;
    // Which blocks (by index in the span) stay live, and the damaged index.
    for (live, damaged) in [(5..n, 5u32), (0..1, n as u32 - 1)] {
        let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let start = start_of(&a);
        let s = &a.shared;
        let mut blocks: Vec<OffsetPtr> = (0..n).map(|_| a.allocate(100, 8).unwrap()).collect();
        blocks.sort_unstable();
        let span_of = |p: OffsetPtr| {
            let b = p.get() - SMALL_HEADER;
            span_of_word(b, s.arena.info(b).unwrap().load(Ordering::Relaxed))
        };
        let span = span_of(blocks[0]);
        assert!(blocks.iter().all(|&p| span_of(p) == span), "one span, carved whole");
        let bump = s.arena.span_at(span).unwrap().bump();
        assert_eq!(bump.load(Ordering::Relaxed), n as u32);
        for (_, &p) in blocks.iter().enumerate().filter(|(i, _)| !live.contains(i)) {
            a.free(p).unwrap();
        }
        bump.store(damaged, Ordering::Relaxed);
        assert!(matches!(a.trim(), Err(Error::Corrupt { .. })), "live {live:?}");
        for &p in &blocks[live.clone()] {
            assert_eq!(a.size_of(p).unwrap(), 100, "live {live:?}: the span is still ours");
        }
        bump.store(n as u32, Ordering::Relaxed);
        free_the_rest(&a, start, &blocks, &(0..n).filter(|i| !live.contains(i)).collect::<Vec<_>>());
    }
}

/// Likewise a live heap's own refill: it formats fresh blocks from its bump span's index on,
/// and the index is shared memory. Damaged low, the refill formatted blocks the heap had handed
/// out and handed them out again (here block 2, still live). Now a live or remote header among
/// the blocks to format is damage (`Corrupt`), found before any is written.
#[test]
fn a_refill_formats_no_block_below_a_bump_index_damaged_low() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    // One at a time, each formatted fresh: the first five blocks of one span.
    let blocks: Vec<OffsetPtr> = (0..5).map(|_| a.allocate(100, 8).unwrap()).collect();
    let b = blocks[0].get() - SMALL_HEADER;
    let span = span_of_word(b, s.arena.info(b).unwrap().load(Ordering::Relaxed));
    let bump = s.arena.span_at(span).unwrap().bump();
    assert_eq!(bump.load(Ordering::Relaxed), 5);
    bump.store(2, Ordering::Relaxed);
    let again = a.allocate(100, 8);
    assert!(matches!(again, Err(Error::Corrupt { .. })), "{again:?} (block 2 is {:?})", blocks[2]);
    for &p in &blocks {
        assert_eq!(a.size_of(p).unwrap(), 100, "still live");
    }
    bump.store(5, Ordering::Relaxed);
    free_the_rest(&a, start, &blocks, &[]);
}

/// Likewise a dead heap's repair: it rebuilt a span from its blocks' headers up to the span's
/// bump index and wrote every block past it free. Damaged low, that freed blocks the dead
/// thread had handed out, and that their holders still use (`DeadProcessBlocks::Keep`): they
/// went on the heap's free list, for the next thread to take it to hand out again. The repair
/// now refuses a span with a live or remote header past its index (`Corrupt`), and the heap
/// stays as it was found.
#[test]
fn a_repair_frees_no_block_past_a_bump_index_damaged_low() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let (_, _, blocks) = dead_heap(&a, 20);
    let b = blocks[0] - SMALL_HEADER;
    let span = span_of_word(b, s.arena.info(b).unwrap().load(Ordering::Relaxed));
    let bump = s.arena.span_at(span).unwrap().bump();
    assert_eq!(bump.load(Ordering::Relaxed), 20, "the blocks are the span's first");
    bump.store(5, Ordering::Relaxed);
    assert!(matches!(a.reclaim(), Err(Error::Corrupt { .. })));
    for &u in &blocks {
        assert_eq!(a.size_of(OffsetPtr::new(u)).unwrap(), 100, "still live");
    }
    bump.store(20, Ordering::Relaxed);
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    free_remotely(&a, &blocks);
    assert_back_to_start(&a, start);
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
fn killed_remote_free(at: KilledBefore) -> (Tla, Start, Vec<OffsetPtr>) {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let blocks: Vec<OffsetPtr> = (0..50).map(|_| a.allocate(100, 8).unwrap()).collect();
    kill_remote_freer(&a, blocks[7], at);
    (a, start, blocks)
}

/// A thread of a process that then dies remote-frees `block` and is killed at `at`; returns
/// its heap.
fn kill_remote_freer(a: &Tla, block: OffsetPtr, at: KilledBefore) -> u64 {
    let s = &a.shared;
    let freer = s.heaps.acquire(&s.mem, &s.fs, crate::testing::dead_token(), || Ok(())).unwrap();
    let Some(Found::Small(b)) = find_live(&s.arena, block.get()) else { panic!("the block is live") };
    let owner = b.header.owner.load(Ordering::Relaxed);
    match at {
        KilledBefore::Marking => {
            let record = heap::Record { block: b.block, owner, class: b.class(), size: 100 };
            s.heaps.slot(&s.mem, freer).unwrap().body.in_flight.write(record);
        }
        KilledBefore::Pushing => {
            s.mark_remote(freer, owner, b.block, b.info()).unwrap();
        }
        KilledBefore::Clearing => {
            let (heap, _record) = s.mark_remote(freer, owner, b.block, b.info()).unwrap();
            heap.body.remote.0[b.class()].push(&s.arena, b.block);
        }
    }
    freer
}

#[test]
fn a_remote_freer_killed_between_marking_and_pushing_leaves_the_block_to_its_owner() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Pushing);
    assert!(a.check().is_err(), "a block marked remote on no list shows");
    // Reclaimed by a thread without a heap: the block's owner (this thread) settles it later.
    assert_eq!(a.shared.reclaim_dead(0).unwrap(), 0, "posted, not released");
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 2, "the freer's heap waits for the block's owner");
    // The owner settles it when it next collects: the block is free again, the heap let go.
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 1);
    assert_eq!(a.stats().live_allocations, 49);
    free_the_rest(&a, start, &blocks, &[7]);
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
        free_the_rest(&a, start, &blocks, if freed == 0 { &[] } else { &[7] });
    }
}

#[test]
fn a_reclaim_by_the_owner_settles_a_dead_freers_block_at_once() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Pushing);
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 1);
    assert_eq!(a.stats().live_allocations, 49);
    free_the_rest(&a, start, &blocks, &[7]);
}

/// The orphan slot of `a`'s calling thread's heap (the blocks' owner) for 100-byte blocks.
fn orphan_slot(a: &Tla) -> &AtomicU64 {
    let s = &a.shared;
    let owner = s.heaps.slot(&s.mem, a.existing_heap()).unwrap();
    &owner.body.orphans.0[class_for(100, 8).unwrap()]
}

/// Marks `block` remote from heap `freer` (a live thread's, or 0 for a thread without one) as a
/// free stopped between marking and pushing would; returns what finishes it: the push and the
/// record's clearing.
fn mark_only(a: &Tla, freer: u64, block: OffsetPtr) -> impl FnOnce() + '_ {
    let s = &a.shared;
    let Some(Found::Small(b)) = find_live(&s.arena, block.get()) else { panic!("the block is live") };
    let owner = b.header.owner.load(Ordering::Relaxed);
    let (class, at) = (b.class(), b.block);
    let (heap, record) = s.mark_remote(freer, owner, at, b.info()).unwrap();
    move || {
        heap.body.remote.0[class].push(&s.arena, at);
        if let Some(r) = record {
            r.clear();
        }
    }
}

#[test]
fn a_stale_orphan_slot_is_cleared_before_its_heap_is_let_go() {
    // The freer was killed before marking; a repairer killed later left the slot naming it.
    let (a, start, blocks) = killed_remote_free(KilledBefore::Marking);
    let s = &a.shared;
    let freer = other_heap(&a);
    orphan_slot(&a).store(freer, Ordering::Release);
    assert!(a.check().is_err(), "a slot naming a heap that does not await its owner shows");
    assert_eq!(a.shared.reclaim_dead(0).unwrap(), 1);
    assert_eq!(orphan_slot(&a).load(Ordering::Acquire), 0, "the slot let go of the heap");
    a.check().unwrap();
    // A live thread takes that heap and is part way through a remote free when the owner
    // collects, having read its slot before the reclaim cleared it: the owner must leave that
    // free alone.
    let live = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    assert_eq!(live, freer, "the released heap is the next one taken");
    let finish = mark_only(&a, live, blocks[8]);
    let record = s.heaps.slot(&s.mem, live).unwrap().body.in_flight.read();
    let mine = s.heaps.slot(&s.mem, a.existing_heap()).unwrap();
    s.settle_orphan(a.existing_heap(), mine, class_for(100, 8).unwrap(), live).unwrap();
    assert_eq!(s.heaps.slot(&s.mem, live).unwrap().body.in_flight.read(), record, "its record intact");
    assert_eq!(s.heaps.slot(&s.mem, live).unwrap().owner.load(Ordering::Acquire), owner_token());
    finish();
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 49);
    s.release_heap(live).unwrap();
    free_the_rest(&a, start, &blocks, &[8]);
}

#[test]
fn a_double_free_of_a_block_a_dead_freer_marked_leaves_its_recovery_intact() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Marking);
    let s = &a.shared;
    // Another thread found block 7 live, then the dead thread marked it, then it frees it too.
    let Some(Found::Small(b)) = find_live(&s.arena, blocks[7].get()) else { panic!("block 7 is live") };
    let (owner, at, info) = (b.header.owner.load(Ordering::Relaxed), b.block, b.info());
    let freer = other_heap(&a);
    s.mark_remote(freer, owner, at, info).unwrap();
    let other = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let word = s.arena.word(blocks[7].get()).unwrap().load(Ordering::Relaxed);
    assert!(matches!(s.mark_remote(other, owner, at, info), Err(Error::InvalidFree { .. })));
    assert_eq!(s.arena.word(blocks[7].get()).unwrap().load(Ordering::Relaxed), word, "nothing written");
    assert_eq!(a.reclaim().unwrap(), 1);
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 49);
    s.release_heap(other).unwrap();
    free_the_rest(&a, start, &blocks, &[7]);
}

#[test]
fn a_failed_remote_mark_leaves_the_users_bytes_alone() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let p = a.allocate(100, 8).unwrap();
    let s = &a.shared;
    s.arena.word(p.get()).unwrap().store(0x1234_5678, Ordering::Relaxed);
    let Some(Found::Small(b)) = find_live(&s.arena, p.get()) else { panic!("live") };
    let stale = Info { size: 99, ..b.info() };
    let freer = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let owner = b.header.owner.load(Ordering::Relaxed);
    assert!(s.mark_remote(freer, owner, b.block, stale).is_err());
    assert_eq!(s.arena.word(p.get()).unwrap().load(Ordering::Relaxed), 0x1234_5678);
    s.release_heap(freer).unwrap();
    a.free(p).unwrap();
    a.trim().unwrap();
    a.check().unwrap();
}

#[test]
fn a_stale_freer_does_not_settle_a_later_free_by_a_thread_without_a_heap() {
    // Killed after pushing block 7: the owner collects it and hands it out again.
    let (a, start, mut blocks) = killed_remote_free(KilledBefore::Clearing);
    a.trim().unwrap();
    let again = a.allocate(100, 8).unwrap();
    assert_eq!(again, blocks[7], "the collected block is handed out first");
    // A thread without a heap frees it remotely and is part way through when the dead
    // process is reclaimed and the owner collects.
    let finish = mark_only(&a, 0, again);
    assert_eq!(a.shared.reclaim_dead(0).unwrap(), 1);
    a.trim().unwrap();
    finish();
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 49);
    blocks.remove(7);
    for p in blocks {
        a.free(p).unwrap();
    }
    assert_back_to_start(&a, start);
}

#[test]
fn two_dead_freers_of_one_owner_and_class_are_settled_by_one_reclaim() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Pushing);
    // The first is posted to the owner (this thread) by a reclaim elsewhere; then a second
    // dies the same way, and this thread reclaims before collecting.
    assert_eq!(a.shared.reclaim_dead(0).unwrap(), 0);
    kill_remote_freer(&a, blocks[8], KilledBefore::Pushing);
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 1, "both dead heaps were let go");
    a.trim().unwrap();
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 1);
    free_the_rest(&a, start, &blocks, &[7, 8]);
}

#[test]
fn two_dead_freers_wait_in_turn_for_an_owner_no_thread_holds() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Pushing);
    kill_remote_freer(&a, blocks[8], KilledBefore::Pushing);
    // The owner's thread exits: the reclaim drains its heap for the first, then the second.
    a.release_thread_heap().unwrap();
    assert_eq!(a.shared.reclaim_dead(0).unwrap(), 2);
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 0);
    free_the_rest(&a, start, &blocks, &[7, 8]);
}

/// A reclaim that holds a dead freer's heap and, finding the block's owner already awaited by
/// another dead freer in that class, gets the owner to settle it: when that fails (the owner's
/// heap, which no thread holds, is damaged), the freer's heap is given back as it was found, not
/// kept by the reclaimer's process for good.
#[test]
fn a_reclaim_whose_nudge_of_a_damaged_owner_fails_gives_the_freers_heap_back() {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    // Two dead freers of blocks of one class of a heap, which its thread then lets go.
    let owner = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let class = class_for(100, 8).unwrap();
    let blocks: Vec<OffsetPtr> =
        (0..50).map(|_| OffsetPtr::new(s.allocate_small(owner, class, 100, 8).unwrap())).collect();
    kill_remote_freer(&a, blocks[7], KilledBefore::Pushing);
    let second = kill_remote_freer(&a, blocks[8], KilledBefore::Pushing);
    s.release_heap(owner).unwrap();
    // Damage: the owner's heap bumps from a span that is not one (its trims fail).
    class_line(&a, owner, 0).bump_span.set(16);
    let word = |heap: u64| s.heaps.slot(&s.mem, heap).unwrap().owner.load(Ordering::Acquire);
    for _ in 0..2 {
        assert!(matches!(s.reclaim_dead(0), Err(Error::Corrupt { .. })));
        assert_eq!(word(second), crate::testing::dead_token(), "given back as it was");
    }
    class_line(&a, owner, 0).bump_span.set(0);
    s.reclaim_dead(0).unwrap();
    a.check().unwrap();
    assert_eq!(a.owned_heaps().unwrap(), 0);
    assert_eq!(a.stats().live_allocations, 48);
    free_the_rest(&a, start, &blocks, &[7, 8]);
}

/// A dead thread's record of a remote free naming its own heap as the block's owner is damage
/// (a thread's free of a block of its own heap is a local one, recorded nowhere). Before, a
/// reclaim posted the heap to its own orphan slot, where it awaited itself: the drain that
/// nudged it nudged itself again, without end, until the stack overflowed. Likewise a heap
/// found already awaiting itself so. Now the record is dropped (and such a slot cleared), and
/// the heap released; the block the record named stays marked, on no list, for `check()` to
/// report.
#[test]
fn a_record_naming_its_own_heap_is_damage_not_a_loop() {
    for awaiting_itself in [false, true] {
        let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let start = start_of(&a);
        let (heap, class, blocks) = dead_heap(&a, 50);
        let s = &a.shared;
        let h = s.heaps.slot(&s.mem, heap).unwrap();
        let Some(Found::Small(b)) = find_live(&s.arena, blocks[7]) else { panic!("live") };
        s.mark_remote(heap, heap, b.block, b.info()).unwrap();
        if awaiting_itself {
            h.body.orphans.0[class].store(heap, Ordering::Release);
            h.owner.store(heap::AWAITING_OWNER, Ordering::Release);
        }
        assert_eq!(s.reclaim_dead(0).unwrap(), 1, "awaiting itself: {awaiting_itself}");
        assert_eq!(h.owner.load(Ordering::Acquire), 0);
        assert_eq!(h.body.orphans.0[class].load(Ordering::Acquire), 0);
        assert_eq!(h.body.in_flight.read(), None);
        assert!(a.check().is_err(), "the marked block is on no list");
        // Mended: the block reaches its heap's remote list, as if its free had been pushed.
        h.body.remote.0[class].push(&s.arena, b.block);
        a.check().unwrap();
        free_remotely(&a, &blocks[..7]);
        free_remotely(&a, &blocks[8..]);
        assert_back_to_start(&a, start);
    }
}

#[test]
fn check_flags_an_orphaned_free_of_another_class() {
    let (a, _, _) = killed_remote_free(KilledBefore::Pushing);
    let s = &a.shared;
    assert_eq!(s.reclaim_dead(0).unwrap(), 0);
    a.check().unwrap();
    // Move the posting to the next class's slot: the block is not of that class.
    let freer = orphan_slot(&a).swap(0, Ordering::AcqRel);
    let owner = s.heaps.slot(&s.mem, a.existing_heap()).unwrap();
    owner.body.orphans.0[class_for(100, 8).unwrap() + 1].store(freer, Ordering::Release);
    assert!(a.check().is_err());
}

#[test]
fn a_damaged_orphan_slot_is_cleared_and_does_not_stop_collections() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Clearing);
    assert_eq!(a.reclaim().unwrap(), 1);
    let s = &a.shared;
    let mine = a.existing_heap();
    // Out of the region, unaligned, and a heap's offset plus one slot's worth of its bytes.
    for bad in [u64::MAX - 63, 12_345, mine + 64] {
        orphan_slot(&a).store(bad, Ordering::Release);
        a.trim().unwrap();
        assert_eq!(orphan_slot(&a).load(Ordering::Acquire), 0, "{bad:#x}: cleared as stale");
        a.check().unwrap();
    }
    // The same in a dead owner's heap, settled by its repair.
    let (dead, class, dead_blocks) = dead_heap(&a, 3);
    s.heaps.slot(&s.mem, dead).unwrap().body.orphans.0[class].store(12_345, Ordering::Release);
    assert_eq!(a.reclaim().unwrap(), 1);
    assert_eq!(s.heaps.slot(&s.mem, dead).unwrap().body.orphans.0[class].load(Ordering::Acquire), 0);
    a.check().unwrap();
    free_remotely(&a, &dead_blocks);
    free_the_rest(&a, start, &blocks, &[7]);
}

#[test]
fn a_record_naming_bytes_that_look_like_a_heap_does_not_hold_its_heap_forever() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Marking);
    let s = &a.shared;
    let freer = other_heap(&a);
    // User bytes laid out as a heap (a real heap's magic and index), whose orphan slot names the
    // dead freer, and the freer's record naming them as the block's owner, awaiting.
    let size = core::mem::size_of::<heap::Heap>();
    let forged = a.allocate(size, 64).unwrap().get();
    let magic = s.mem.word(a.existing_heap() + 8).unwrap().load(Ordering::Relaxed);
    s.mem.word(forged + 8).unwrap().store(magic, Ordering::Relaxed);
    assert!(s.heaps.slot(&s.mem, forged).is_ok(), "passes bounds and magic");
    let class = class_for(100, 8).unwrap();
    let orphans = core::mem::offset_of!(heap::Heap, body) + core::mem::offset_of!(heap::HeapBody, orphans);
    s.mem.word(forged + orphans as u64 + 8 * class as u64).unwrap().store(freer, Ordering::Release);
    let f = s.heaps.slot(&s.mem, freer).unwrap();
    let r = f.body.in_flight.read().unwrap();
    f.body.in_flight.write(heap::Record { owner: forged, ..r });
    f.owner.store(heap::AWAITING_OWNER, Ordering::Release);
    assert_eq!(a.reclaim().unwrap(), 1, "the freer's heap is repaired and let go");
    a.check().unwrap();
    a.free(OffsetPtr::new(forged)).unwrap();
    for p in &blocks {
        a.free(*p).unwrap();
    }
    assert_back_to_start(&a, start);
}

/// A remote free takes the block's heap from its span's owner word, which is shared memory.
/// Damaged to user bytes laid out as a heap (a real heap's magic), the free pushed the block
/// on that "heap's" remote list and drained it, writing the list, owner word and free lists
/// into a live block's user bytes, and the freed block was lost. The owner must now be one of
/// the table's heaps: the free is refused (`Corrupt`) and the block stays live.
#[test]
fn a_remote_free_to_bytes_that_look_like_a_heap_is_refused() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let size = core::mem::size_of::<heap::Heap>();
    let forged = a.allocate(size, 64).unwrap().get();
    let magic = s.mem.word(a.existing_heap() + 8).unwrap().load(Ordering::Relaxed);
    s.mem.word(forged + 8).unwrap().store(magic, Ordering::Relaxed);
    assert!(s.heaps.slot(&s.mem, forged).is_ok(), "passes bounds and magic");
    // Another thread's block (its heap given back at its exit), so that our free is remote.
    let p = std::thread::scope(|t| t.spawn(|| a.allocate(100, 8).unwrap()).join().unwrap());
    let Some(Found::Small(b)) = find_live(&s.arena, p.get()) else { panic!("the block is live") };
    let owner = b.header.owner.swap(forged, Ordering::AcqRel);
    assert!(matches!(a.free(p), Err(Error::Corrupt { .. })));
    b.header.owner.store(owner, Ordering::Release);
    assert_eq!(a.size_of(p).unwrap(), 100, "still live");
    a.free(p).unwrap();
    a.free(OffsetPtr::new(forged)).unwrap();
    assert_back_to_start(&a, start);
}

#[test]
fn a_dead_freers_block_collected_before_its_posting_passes_check_and_is_let_go() {
    // Killed after pushing block 7. A reclaimer takes the heap over and finds the block still
    // marked by it; the owner collects the block; then the reclaimer posts the heap.
    let (a, start, blocks) = killed_remote_free(KilledBefore::Clearing);
    let s = &a.shared;
    let freer = other_heap(&a);
    let f = s.heaps.slot(&s.mem, freer).unwrap();
    f.owner.store(owner_token(), Ordering::Release);
    a.trim().unwrap();
    orphan_slot(&a).store(freer, Ordering::Release);
    f.owner.store(heap::AWAITING_OWNER, Ordering::Release);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 49);
    // The owner's next collection lets the heap go and leaves the block alone.
    a.trim().unwrap();
    assert_eq!(orphan_slot(&a).load(Ordering::Acquire), 0);
    assert_eq!(a.owned_heaps().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 49);
    free_the_rest(&a, start, &blocks, &[7]);
}

#[test]
fn an_owner_that_read_a_slot_stale_leaves_a_freer_posted_elsewhere_alone() {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let mine = s.heaps.slot(&s.mem, a.thread_heap().unwrap()).unwrap();
    // Another live thread's heap owns the block a dead freer was freeing; the freer is posted
    // to it.
    let other = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let class = class_for(100, 8).unwrap();
    let block = s.allocate_small(other, class, 100, 8).unwrap();
    let freer = kill_remote_freer(&a, OffsetPtr::new(block), KilledBefore::Pushing);
    assert_eq!(s.reclaim_dead(0).unwrap(), 0, "posted to the other heap");
    let f = s.heaps.slot(&s.mem, freer).unwrap();
    let record = f.body.in_flight.read();
    // This thread's heap read its slot as naming the freer (long ago) and settles now.
    s.settle_orphan(a.existing_heap(), mine, class, freer).unwrap();
    assert_eq!(f.owner.load(Ordering::Acquire), heap::AWAITING_OWNER, "still awaits its owner");
    assert_eq!(f.body.in_flight.read(), record, "its record intact");
    a.check().unwrap();
    // Its owner settles it.
    s.trim_heap(other).unwrap();
    assert_eq!(f.owner.load(Ordering::Acquire), 0);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    s.release_heap(other).unwrap();
    assert_back_to_start(&a, start);
}

#[test]
fn a_freer_named_by_a_slot_of_another_class_is_given_back_not_let_go() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Pushing);
    let s = &a.shared;
    assert_eq!(s.reclaim_dead(0).unwrap(), 0);
    // A damaged slot of the next class names the freer instead of the block's class's slot.
    let freer = orphan_slot(&a).swap(0, Ordering::AcqRel);
    let owner = s.heaps.slot(&s.mem, a.existing_heap()).unwrap();
    let next = &owner.body.orphans.0[class_for(100, 8).unwrap() + 1];
    next.store(freer, Ordering::Release);
    a.trim().unwrap();
    assert_eq!(next.load(Ordering::Acquire), 0, "the stale slot is cleared");
    let f = s.heaps.slot(&s.mem, freer).unwrap();
    assert_eq!(f.owner.load(Ordering::Acquire), heap::AWAITING_OWNER, "the heap is kept");
    assert!(f.body.in_flight.read().is_some(), "with its record");
    // A reclaim posts it again where it belongs, and the owner settles block 7.
    assert_eq!(a.reclaim().unwrap(), 1);
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 49);
    free_the_rest(&a, start, &blocks, &[7]);
}

#[test]
fn two_dead_heaps_posted_to_each_other_are_settled() {
    for nudged in [true, false] {
        crate::testing::install_test_liveness();
        let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let start = start_of(&a);
        let s = &a.shared;
        // Two threads of a process that then dies, each freeing a block of the other's heap.
        let (f, class, f_blocks) = dead_heap(&a, 2);
        let (o, _, o_blocks) = dead_heap(&a, 2);
        for (freer, block) in [(f, o_blocks[0]), (o, f_blocks[0])] {
            let Some(Found::Small(b)) = find_live(&s.arena, block) else { panic!("live") };
            s.mark_remote(freer, b.header.owner.load(Ordering::Relaxed), b.block, b.info()).unwrap();
        }
        // Two reclaimers take one heap each and repair it, then each posts its heap to the
        // other's (which its reclaimer holds, so the first nudge finds no one to drain).
        let (hf, ho) = (s.heaps.slot(&s.mem, f).unwrap(), s.heaps.slot(&s.mem, o).unwrap());
        hf.owner.store(owner_token(), Ordering::Release);
        ho.owner.store(owner_token(), Ordering::Release);
        s.repair_heap(f).unwrap();
        s.repair_heap(o).unwrap();
        assert!(matches!(s.hand_over_in_flight(f, hf).unwrap(), recovery::Handover::Posted(x, _) if x == o));
        s.nudge(0, o, class).unwrap();
        assert!(matches!(s.hand_over_in_flight(o, ho).unwrap(), recovery::Handover::Posted(x, _) if x == f));
        if nudged {
            s.nudge(0, f, class).unwrap();
        } else {
            assert!(a.check().is_err(), "two heaps awaiting each other show");
            assert_eq!(a.reclaim().unwrap(), 0);
        }
        assert_eq!(hf.owner.load(Ordering::Acquire), 0, "nudged={nudged}");
        assert_eq!(ho.owner.load(Ordering::Acquire), 0, "nudged={nudged}");
        a.check().unwrap();
        assert_eq!(a.stats().live_allocations, 2, "each heap's other block is still live");
        free_remotely(&a, &[f_blocks[1], o_blocks[1]]);
        assert_back_to_start(&a, start);
    }
}

#[test]
fn a_loop_of_one_size_cycles_through_a_batch_and_reuses_it() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let class = class_for(64, 8).unwrap();
    let counts = |a: &Tla| {
        let s = &a.shared;
        let cs = &s.local_snapshot(s.heaps.slot(&s.mem, a.existing_heap()).unwrap()).classes[class];
        (cs.blocks(), cs.count())
    };
    let first = a.allocate(64, 8).unwrap();
    assert_eq!(counts(&a), (1, 0), "a class's first block comes alone");
    a.free(first).unwrap();
    let mut seen = BTreeSet::new();
    seen.insert(first.get());
    let (mut last, mut again) = (first.get(), 0);
    for i in 0..2000 {
        let p = a.allocate(64, 8).unwrap();
        again += (p.get() == last) as usize;
        seen.insert(p.get());
        a.free(p).unwrap();
        last = p.get();
        if i % 97 == 0 {
            a.check().unwrap();
        }
    }
    // The freed block topped up with fresh ones to a cycle's worth, then the same blocks round
    // and round; the block just freed comes back next only when the freed list is taken (its
    // top first).
    let batch = heap::CYCLE[class] as usize;
    assert!(batch >= 8);
    assert_eq!(seen.len(), batch);
    assert_eq!(counts(&a), (batch as u64, batch as u64));
    assert!(again <= 2000 / (batch - 1) + 1, "{again} immediate reuses");
    assert_eq!(a.stats().live_allocations, 0);
    a.check().unwrap();
    a.trim().unwrap();
    assert_back_at(&a, start);
    a.check().unwrap();
}

#[test]
fn a_sweep_takes_both_lists_and_returns_their_spans() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let blocks: Vec<OffsetPtr> = (0..3000).map(|_| a.allocate(200, 8).unwrap()).collect();
    // Half of them back, then some reused (from both lists), then the rest back.
    for p in &blocks[..1500] {
        a.free(*p).unwrap();
    }
    let again: Vec<OffsetPtr> = (0..700).map(|_| a.allocate(200, 8).unwrap()).collect();
    a.check().unwrap();
    for p in blocks[1500..].iter().chain(&again) {
        a.free(*p).unwrap();
    }
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    let cs = class_line(&a, a.existing_heap(), class_for(200, 8).unwrap());
    assert!(cs.free.get() != 0 && cs.freed.get() != 0, "the sweep takes both lists");
    a.trim().unwrap();
    a.check().unwrap();
    assert_back_at(&a, start);
}

#[test]
fn a_block_on_both_free_lists_is_reported_not_swept() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let p = a.allocate(64, 8).unwrap();
    let q = a.allocate(64, 8).unwrap();
    a.free(p).unwrap();
    a.free(q).unwrap();
    let heap = a.existing_heap();
    let class = class_for(64, 8).unwrap();
    let cs = class_line(&a, heap, class);
    assert_eq!(cs.freed.get(), q.get() - SMALL_HEADER, "a free by the owner goes on the second list");
    // Damage: the first list starts with the block the second list starts with.
    let before = cs.free.get();
    cs.free.set(cs.freed.get());
    assert!(a.check().is_err());
    assert!(a.trim().is_err(), "the sweep finds the block twice");
    class_line(&a, heap, class).free.set(before);
    a.check().unwrap();
}

/// A sweep judges a span free by the blocks its heap's lists hold. A damaged list that holds
/// another heap's free blocks must not make it give that heap's span back (before, it did: the
/// other heap went on bumping into, and handing out, units the free-space manager had back).
#[test]
fn a_sweep_gives_back_no_span_of_another_heap() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let class = class_for(100, 8).unwrap();
    // This thread's heap, with no block of the class.
    let mine = a.allocate(24, 8).unwrap();
    let heap = a.existing_heap();
    // Another heap's span of the class: five blocks, all freed by their owner.
    let other = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let theirs: Vec<u64> = (0..5).map(|_| s.allocate_small(other, class, 100, 8).unwrap()).collect();
    for &b in &theirs {
        assert_eq!(s.quick.free(other, b), Some(false));
    }
    let block = theirs[0] - SMALL_HEADER;
    let span = span_of_word(block, s.arena.info(block).unwrap().load(Ordering::Relaxed));
    // Damage: this heap's list of the class is the other heap's.
    class_line(&a, heap, class).freed.set(class_line(&a, other, class).freed.get());
    let units = s.fs.lock().free_units();
    assert!(matches!(a.trim(), Err(Error::Corrupt { .. })));
    let owner = s.arena.class_span(span, class).map(|h| h.owner.load(Ordering::Relaxed));
    assert_eq!(owner, Some(other), "the span is still the other heap's");
    assert_eq!(s.fs.lock().free_units(), units);
    class_line(&a, heap, class).freed.set(0);
    a.check().unwrap();
    s.release_heap(other).unwrap();
    a.free(mine).unwrap();
    assert_back_to_start(&a, start);
}

/// Likewise, a damaged list that holds a live block of the heap: counted with the free ones,
/// it made its span look all free, and the sweep gave the span back with the block in it.
#[test]
fn a_sweep_gives_back_no_span_with_a_live_block_a_damaged_list_holds() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let blocks: Vec<OffsetPtr> = (0..3).map(|_| a.allocate(100, 8).unwrap()).collect();
    let at: Vec<u64> = blocks.iter().map(|p| p.get() - SMALL_HEADER).collect();
    let heap = a.existing_heap();
    let class = class_for(100, 8).unwrap();
    a.free(blocks[0]).unwrap();
    a.free(blocks[1]).unwrap();
    // The list is [1, 0]; damage puts the live block 2 on top of it.
    let cs = class_line(&a, heap, class);
    assert_eq!(cs.freed.get(), at[1]);
    let stamp = s.arena.word(at[2] + 8).unwrap().load(Ordering::Relaxed);
    s.arena.store_link(at[2], Some(at[1]));
    cs.freed.set(at[2]);
    let units = s.fs.lock().free_units();
    assert!(matches!(a.trim(), Err(Error::Corrupt { .. })));
    assert_eq!(s.fs.lock().free_units(), units, "the span stays");
    s.arena.word(at[2] + 8).unwrap().store(stamp, Ordering::Relaxed);
    class_line(&a, heap, class).freed.set(at[1]);
    a.check().unwrap();
    assert_eq!(a.size_of(blocks[2]).unwrap(), 100, "and its live block with it");
    a.free(blocks[2]).unwrap();
    assert_back_to_start(&a, start);
}

/// The class line of `class` in heap `heap`, to read or damage (no other thread may use the
/// heap meanwhile).
fn class_line(a: &Tla, heap: u64, class: usize) -> &heap::ClassState {
    let s = &a.shared;
    // SAFETY: the tests that call this run alone on the heap they name.
    &unsafe { s.local(s.heaps.slot(&s.mem, heap).unwrap()) }.classes[class]
}

#[test]
fn a_damaged_freed_list_head_is_an_error_not_a_panic() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let class = class_for(64, 8).unwrap();
    let p = a.allocate(64, 8).unwrap();
    let heap = a.existing_heap();
    let cs = class_line(&a, heap, class);
    let (free, freed) = (cs.free.get(), cs.freed.get());
    let set_lists = |(free, freed): (u64, u64)| {
        let cs = class_line(&a, heap, class);
        cs.free.set(free);
        cs.freed.set(freed);
    };
    for damaged in [0x8, 0xffff_ffff_ffff_fff0, 1 << 52, 16] {
        // The allocation list is empty and the owner's list starts at `damaged`: the swap that
        // refills the first from the second refuses it.
        set_lists((0, damaged));
        let err = a.allocate(64, 8).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{damaged:#x}: {err}");
        assert_eq!(class_line(&a, heap, class).freed.get(), damaged, "nothing moved");
        // A quick free links the block to the damaged head without a fuss; `check()` reports
        // the list.
        let q = a.allocate(100, 8).unwrap();
        set_lists((free, freed));
        a.free(q).unwrap();
    }
    set_lists((free, freed));
    a.check().unwrap();
    // A free pushed onto a damaged head cuts the owner's list there: the blocks past it are on
    // no list, which `check()` reports (and repair finds).
    let r = a.allocate(64, 8).unwrap();
    a.free(r).unwrap();
    let r_block = r.get() - SMALL_HEADER;
    assert_eq!(class_line(&a, heap, class).freed.get(), r_block);
    class_line(&a, heap, class).freed.set(0x8);
    a.free(p).unwrap();
    assert!(a.check().is_err());
    let p_block = p.get() - SMALL_HEADER;
    assert_eq!(class_line(&a, heap, class).freed.get(), p_block);
    a.shared.arena.store_link(p_block, Some(r_block));
    a.check().unwrap();
    assert_back_to_start(&a, start);
}

#[test]
fn a_dead_owner_with_blocks_on_both_lists_is_repaired_whole() {
    for killed_mid_swap in [false, true] {
        let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let start = start_of(&a);
        let (heap, class, blocks) = dead_heap(&a, 300);
        // The owner freed half of its blocks itself (onto its second list), took them back
        // whole into the first when it ran dry, and freed some more.
        let s = &a.shared;
        for &b in &blocks[..150] {
            assert_eq!(s.quick.free(heap, b), Some(false));
        }
        let again: Vec<u64> = (0..40).map(|_| s.allocate_small(heap, class, 100, 8).unwrap()).collect();
        for &b in blocks[150..200].iter().chain(&again[..20]) {
            assert_eq!(s.quick.free(heap, b), Some(false));
        }
        let cs = class_line(&a, heap, class);
        assert!(cs.free.get() != 0 && cs.freed.get() != 0, "both lists hold blocks");
        if killed_mid_swap {
            // Killed between the two stores of a swap: both lists name one chain.
            cs.free.set(cs.freed.get());
        }
        assert_eq!(a.reclaim().unwrap(), 1);
        a.check().unwrap();
        // `DeadProcessBlocks::Keep`: its live blocks stay allocated until someone frees them.
        assert_eq!(a.stats().live_allocations, 120);
        free_remotely(&a, &blocks[200..]);
        free_remotely(&a, &again[20..]);
        assert_back_to_start(&a, start);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn damage_in_the_arena_never_panics(
        damage in proptest::collection::vec((any::<usize>(), any::<u64>(), any::<u64>()), 1..6),
    ) {
        let a = Tla::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let meta = a.region().offset() + core::mem::offset_of!(TlaHeader, chunk) as u64;
        survive_damage(&a, meta, a.shared.fs.layout().table, &damage);
    }
}

#[test]
fn block_counts_another_process_broke_wrap_rather_than_panic() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let class = crate::allocators::span::class_for(48, 8).unwrap();
    let first = a.allocate(48, 8).unwrap();
    let heap = a.existing_heap();
    class_line(&a, heap, class).blocks.set(u64::MAX);
    // Fresh blocks formatted (counted onto `blocks`), then a sweep (recounting it).
    let blocks: Vec<_> = (0..3 * LAYOUTS[class].blocks).map(|_| a.allocate(48, 8).unwrap()).collect();
    for p in blocks.into_iter().chain([first]) {
        a.free(p).unwrap();
    }
    // The sweeps recount the blocks: the heap is whole again.
    a.trim().unwrap();
    a.check().unwrap();
}

/// Overwrites the slot number of the heap at `heap` (shared memory another process may break).
fn set_slot_index(a: &Tla, heap: u64, index: u32) {
    let at = heap + core::mem::offset_of!(heap::Heap, index) as u64;
    let p = a.region().ptr(at, 4).unwrap().cast::<u32>();
    // SAFETY: the slot's index word, in bounds and aligned; the test runs alone on the region.
    unsafe { p.write_volatile(index) };
    assert_eq!(a.shared.heaps.slot(&a.shared.mem, heap).unwrap().index, index);
}

/// A remote free names its freer in the block's info word by the freer's heap number, which is
/// shared memory. Damaged to another heap's, our free named that heap: had that heap's thread
/// died between pushing the same block in an earlier free and clearing its record, a reclaim
/// took the block for that dead thread's free, and the block's owner settled it (onto its free
/// list, to be handed out) while our free of it was still under way (its push then put the block
/// on the owner's remote list too). The number is now held to the heap's place in the table:
/// such a free is refused (`Corrupt`) and the block stays live.
#[test]
fn a_remote_free_by_a_heap_whose_number_was_damaged_is_refused() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    // This thread holds a heap of its own, so its frees of the other thread's blocks are remote.
    let mine = a.thread_heap().unwrap();
    let (blocks, exited) = std::thread::scope(|t| {
        t.spawn(|| ((0..3).map(|_| a.allocate(100, 8).unwrap()).collect::<Vec<_>>(), a.existing_heap())).join().unwrap()
    });
    assert_ne!(mine, exited);
    let index = |heap: u64| s.heaps.slot(&s.mem, heap).unwrap().index;
    let my_index = index(mine);
    set_slot_index(&a, mine, index(exited));
    assert!(matches!(a.free(blocks[0]), Err(Error::Corrupt { .. })));
    assert_eq!(a.size_of(blocks[0]).unwrap(), 100, "still live");
    assert!(matches!(a.check(), Err(Error::Corrupt { .. })), "check() reports the number");
    set_slot_index(&a, mine, my_index);
    free_the_rest(&a, start, &blocks, &[]);
}

/// A large block's run records its heap by number, which is shared memory. A live thread
/// whose heap's number was damaged to a dead heap's stamped its large blocks with that heap's,
/// and the dead heap's repair (with `DeadProcessBlocks::Free`) freed them under the thread, to
/// be handed out again. A large allocation now holds the number to the heap's place in the
/// table, and is refused (`Corrupt`) while it is damaged.
#[test]
fn a_large_block_takes_no_damaged_heap_number() {
    crate::testing::install_test_liveness();
    let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &config).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let mine = a.thread_heap().unwrap();
    let (dead, _, _) = dead_heap(&a, 1);
    let index = |heap: u64| s.heaps.slot(&s.mem, heap).unwrap().index;
    let my_index = index(mine);
    set_slot_index(&a, mine, index(dead));
    assert!(matches!(a.allocate(300_000, 8), Err(Error::Corrupt { .. })));
    set_slot_index(&a, mine, my_index);
    assert_eq!(a.reclaim().unwrap(), 1);
    let p = a.allocate(300_000, 8).unwrap();
    assert_eq!(a.size_of(p).unwrap(), 300_000);
    a.free(p).unwrap();
    assert_back_to_start(&a, start);
}

/// A dead thread's heap awaiting the owner of the block it was freeing is known to that owner's
/// settle by its number, which is shared memory and may be damaged after the heap's repair
/// checked it. Damaged to another heap's, the settle took a block that heap's live thread was
/// freeing now (marked remote by it, not yet pushed) for the dead thread's, and put it on the
/// owner's free list while the free went on to push it on the remote list too. The freer is
/// now known by its heap's place in the table: the live thread's block is left to its free.
#[test]
fn a_settle_takes_no_block_of_the_heap_a_damaged_freer_number_names() {
    let (a, start, blocks) = killed_remote_free(KilledBefore::Clearing);
    let s = &a.shared;
    let class = class_for(100, 8).unwrap();
    let freer = other_heap(&a);
    let f = s.heaps.slot(&s.mem, freer).unwrap();
    // Its repairer holds it while the owner collects block 7, then posts it.
    f.owner.store(owner_token(), Ordering::Release);
    a.trim().unwrap();
    orphan_slot(&a).store(freer, Ordering::Release);
    f.owner.store(heap::AWAITING_OWNER, Ordering::Release);
    // Block 7 is handed out again, and another live thread's heap is freeing it.
    let p = a.allocate(100, 8).unwrap();
    assert_eq!(p, blocks[7]);
    let live = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let Some(Found::Small(b)) = find_live(&s.arena, p.get()) else { panic!("the block is live") };
    let owner = b.header.owner.load(Ordering::Relaxed);
    let (heap, record) = s.mark_remote(live, owner, b.block, b.info()).unwrap();
    let index = |heap: u64| s.heaps.slot(&s.mem, heap).unwrap().index;
    let freer_index = index(freer);
    set_slot_index(&a, freer, index(live));
    a.trim().unwrap();
    let state = |block: u64| Info::unpack(s.arena.info(block).unwrap().load(Ordering::Acquire)).unwrap().state;
    assert_eq!(state(b.block), State::Remote, "left to the live thread's free");
    assert_eq!(orphan_slot(&a).load(Ordering::Acquire), 0, "the dead freer is let go");
    set_slot_index(&a, freer, freer_index);
    heap.body.remote.0[class].push(&s.arena, b.block);
    record.unwrap().clear();
    s.release_heap(live).unwrap();
    free_the_rest(&a, start, &blocks, &[7]);
}

/// A repair counts a remote block's size from the record of the heap its info word names as
/// freer, found by heap number. The numbers are shared memory: another heap's damaged to the
/// freer's took its place in that lookup, and the repair counted the size that heap's stale
/// record named for the same block, so the repaired heap's byte count disagreed with its blocks
/// (`check()` failed after the damage was mended). Freers are now found by place in the table.
#[test]
fn a_repair_counts_a_remote_blocks_size_by_its_real_freer() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let (dead, class, blocks) = dead_heap(&a, 1);
    // A live thread's heap is freeing the dead heap's block; a later heap's record names the
    // same block with another size (stale), and its number is damaged to the freer's.
    let freer = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let stale = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let Some(Found::Small(b)) = find_live(&s.arena, blocks[0]) else { panic!("the block is live") };
    let (heap, record) = s.mark_remote(freer, dead, b.block, b.info()).unwrap();
    let h = |heap: u64| s.heaps.slot(&s.mem, heap).unwrap();
    h(stale).body.in_flight.write(heap::Record { block: b.block, owner: dead, class, size: 50 });
    let stale_index = h(stale).index;
    assert!(stale_index > h(freer).index, "later in the table");
    set_slot_index(&a, stale, h(freer).index);
    assert_eq!(a.reclaim().unwrap(), 1);
    set_slot_index(&a, stale, stale_index);
    h(stale).body.in_flight.clear();
    heap.body.remote.0[class].push(&s.arena, b.block);
    record.unwrap().clear();
    a.check().unwrap();
    s.release_heap(freer).unwrap();
    s.release_heap(stale).unwrap();
    assert_back_to_start(&a, start);
}

#[test]
fn a_slot_number_another_process_broke_is_no_panic() {
    let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &config).unwrap();
    // A large block of our own heap, whose slot number reads u32::MAX.
    let p = a.allocate(100, 8).unwrap();
    assert_eq!(a.shared.heaps.slot(&a.shared.mem, a.existing_heap()).unwrap().index, 0);
    set_slot_index(&a, a.existing_heap(), u32::MAX);
    let large = a.allocate(100_000, 8);
    // A dead process's heap, broken the same way, repaired.
    let (heap, _, _) = dead_heap(&a, 3);
    set_slot_index(&a, heap, u32::MAX);
    let _ = a.reclaim();
    if let Ok(l) = large {
        let _ = a.free(l);
    }
    let _ = a.free(p);
}

/// An allocation whose refill collects remote frees: the collection takes the heap's owner-only
/// part for itself, so the refill and the allocation must not keep using a reference to it made
/// before (Miri: `cargo +nightly miri test -p hetmem-core --lib refill_that_collects`).
#[test]
fn a_refill_that_collects_remote_frees_keeps_one_view_of_the_heap() {
    let a = Tla::create(region_of(1 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let p = a.allocate(48, 8).unwrap();
    let s = &a.shared;
    // Another heap (another thread's) frees the block remotely.
    let freer = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    let Some(Found::Small(b)) = find_live(&s.arena, p.get()) else { panic!("live") };
    s.free_small(freer, b).unwrap();
    s.release_heap(freer).unwrap();
    // The allocation list is empty: the refill collects the block and hands it out again.
    let q = a.allocate(48, 8).unwrap();
    assert_eq!(q, p);
    a.free(q).unwrap();
    assert_back_to_start(&a, start);
}

/// A collection that meets a block failing its check part way through a batch: the blocks of
/// the batch it already turned free go on the free list and count as freed (before, they were
/// on no list and still counted live, lost while the process lived); the chain from the damaged
/// block on stays off the lists, for `check()` to report.
#[test]
fn a_collection_that_meets_a_damaged_block_keeps_the_blocks_before_it() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let s = &a.shared;
    let class = class_for(100, 8).unwrap();
    let blocks: Vec<OffsetPtr> = (0..100).map(|_| a.allocate(100, 8).unwrap()).collect();
    let heap = a.existing_heap();
    // Another heap frees 40 of them: they wait on this heap's remote list, the last freed first.
    let freer = s.heaps.acquire(&s.mem, &s.fs, owner_token(), || Ok(())).unwrap();
    for p in &blocks[..40] {
        let Some(Found::Small(b)) = find_live(&s.arena, p.get()) else { panic!("live") };
        s.free_small(freer, b).unwrap();
    }
    s.release_heap(freer).unwrap();
    let chain: Vec<u64> = blocks[..40].iter().rev().map(|p| p.get() - SMALL_HEADER).collect();
    // Damage: the 36th block of the chain (the fourth of the second batch) lost the size its
    // freer left in its user bytes.
    let bad = chain[35];
    let size_word = s.arena.word(bad + SMALL_HEADER).unwrap();
    assert_eq!(size_word.swap(0, Ordering::Relaxed), 100);
    assert!(matches!(a.trim(), Err(Error::Corrupt { .. })));
    assert_eq!(a.stats().live_allocations, 100 - 35, "the 35 blocks before the damaged one are freed");
    let mut listed = BTreeSet::new();
    for head in class_line(&a, heap, class).lists() {
        crate::sync::tagged_list::walk(&s.arena, head, 1 << 20, |b| {
            listed.insert(b);
            Ok(())
        })
        .unwrap();
    }
    assert!(chain[..35].iter().all(|b| listed.contains(b)), "and on the heap's free lists");
    assert!(a.check().is_err(), "the rest of the chain is on no list");
    // Mended, and the rest of the chain put back: it is collected.
    size_word.store(100, Ordering::Relaxed);
    s.heaps.slot(&s.mem, heap).unwrap().body.remote.0[class].reset(Some(bad));
    a.trim().unwrap();
    a.check().unwrap();
    free_the_rest(&a, start, &blocks, &(0..40).collect::<Vec<_>>());
}

/// `stats()` reads the counters of heaps whose threads are allocating and freeing. The owner's
/// words are atomics, so this is a race for stale figures, never a data race: Miri, which runs
/// this test in CI (`ci/test`), reported one here when they were plain integers the owner
/// wrote through `&mut`. (`check()`, safe to call at any time though it wants a quiet
/// allocator, reads the same words; its acquire loads of block words hide the race from Miri.)
#[test]
fn stats_beside_a_busy_owner_is_no_data_race() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let a = Tla::create(region_of(2 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let (started, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let reads = if cfg!(miri) { 40 } else { 20_000 };
    std::thread::scope(|s| {
        s.spawn(|| {
            started.store(true, Ordering::Release);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let p = a.allocate(24 + i % 200, 8).unwrap();
                let q = a.allocate(64, 8).unwrap();
                a.free(p).unwrap();
                a.free(q).unwrap();
                i += 1;
            }
            a.trim().unwrap();
        });
        while !started.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        for _ in 0..reads {
            // Figures read while they change (relaxed loads may be stale); only their shape holds.
            let stats = a.stats();
            assert!(stats.live_allocations <= stats.total_allocations, "{stats:?}");
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_back_to_start(&a, start);
}

/// A free by the owner that makes a sweep due is done even when the sweep finds the lists
/// damaged: it answers `Ok` (an error would tell the caller the block is still theirs), the
/// damage stays for `check()` to report, and the sweep is not tried again at every free.
#[test]
fn a_free_whose_sweep_finds_damage_is_still_done() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let class = class_for(64, 8).unwrap();
    let blocks: Vec<OffsetPtr> = (0..3000).map(|_| a.allocate(64, 8).unwrap()).collect();
    let heap = a.existing_heap();
    a.free(blocks[0]).unwrap();
    a.free(blocks[1]).unwrap();
    // Damage: the allocation list starts with the block the owner's list starts with, which a
    // sweep refuses (a block on both lists).
    let cs = class_line(&a, heap, class);
    let before = cs.free.get();
    cs.free.set(cs.freed.get());
    let sweep_at = |a: &Tla| class_line(a, heap, class).sweep_at();
    let first_due = sweep_at(&a);
    for p in &blocks[2..] {
        a.free(*p).unwrap();
    }
    let cs = class_line(&a, heap, class);
    assert!(cs.count() > first_due, "the frees made a sweep due ({} blocks listed)", cs.count());
    assert!(sweep_at(&a) > first_due, "a failed sweep puts the next try off");
    assert_eq!(a.stats().live_allocations, 0, "every free was done");
    assert!(a.check().is_err(), "the damage is still there to report");
    class_line(&a, heap, class).free.set(before);
    a.check().unwrap();
    assert_back_to_start(&a, start);
}

/// A remote free into a heap no thread holds drains that heap; a drain that finds it damaged
/// leaves the free done (`Ok`) and the heap let go, not held for good by the freer's process.
#[test]
fn a_remote_free_whose_drain_finds_damage_is_still_done() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let class = class_for(100, 8).unwrap();
    // This thread has a heap of its own, so its frees of the other thread's blocks are remote.
    let mine = a.allocate(100, 8).unwrap();
    let (heap, blocks) = std::thread::scope(|s| {
        s.spawn(|| {
            let blocks: Vec<OffsetPtr> = (0..50).map(|_| a.allocate(100, 8).unwrap()).collect();
            let heap = a.existing_heap();
            a.release_thread_heap().unwrap();
            (heap, blocks)
        })
        .join()
        .unwrap()
    });
    assert_ne!(heap, a.existing_heap());
    let owner = |a: &Tla| a.shared.heaps.slot(&a.shared.mem, heap).unwrap().owner.load(Ordering::Acquire);
    assert_eq!(owner(&a), 0, "the heap was let go");
    // Damage: the heap bumps from a span that is not one (its trim refuses it).
    let cs = class_line(&a, heap, class);
    let bump_span = cs.bump_span.get();
    cs.bump_span.set(16);
    a.free(blocks[0]).unwrap();
    assert_eq!(owner(&a), 0, "the drain let the heap go");
    assert!(a.check().is_err());
    class_line(&a, heap, class).bump_span.set(bump_span);
    for p in &blocks[1..] {
        a.free(*p).unwrap();
    }
    a.free(mine).unwrap();
    assert_back_to_start(&a, start);
}

/// A reallocation that moves its block gives the new block back when the free of the old one
/// fails (here: the old block's span names no heap), so that nothing leaks and the old block
/// stays the caller's, as the error says.
#[test]
fn a_move_whose_free_fails_gives_the_new_block_back() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let p = a.allocate(64, 8).unwrap();
    let s = &a.shared;
    let block = p.get() - SMALL_HEADER;
    let word = s.arena.info(block).unwrap().load(Ordering::Relaxed);
    let span = s.arena.class_span(span_of_word(block, word), class_for(64, 8).unwrap()).unwrap();
    let stamp = s.arena.word(block + 8).unwrap();
    let (owner, stamped) = (span.owner.load(Ordering::Relaxed), stamp.load(Ordering::Relaxed));
    // Damage: the span names no heap, nor does the block's stamp (so the quick free passes the
    // block on to the full path, which refuses it).
    span.owner.store(8, Ordering::Relaxed);
    stamp.store(8, Ordering::Relaxed);
    let live = a.stats().live_allocations;
    assert!(a.reallocate(p, 3000, 8).is_err());
    assert_eq!(a.stats().live_allocations, live, "the new block went back");
    span.owner.store(owner, Ordering::Relaxed);
    stamp.store(stamped, Ordering::Relaxed);
    a.check().unwrap();
    a.free(p).unwrap();
    assert_back_to_start(&a, start);
}

#[test]
fn a_block_a_shortage_brings_back_to_the_heap_is_handed_out_not_out_of_memory() {
    crate::testing::install_test_liveness();
    let a = Tla::create(region_of(1 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let start = start_of(&a);
    let mut blocks = Vec::new();
    loop {
        match a.allocate(100, 8) {
            Ok(p) => blocks.push(p),
            Err(Error::OutOfMemory { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // A thread of a process that then died was freeing one of them: the block comes back to
    // this heap when the next allocation, short of space, reclaims the dead heap.
    kill_remote_freer(&a, blocks[7], KilledBefore::Pushing);
    let p = a.allocate(100, 8).expect("the block the shortage brought back");
    assert_eq!(p, blocks[7]);
    a.check().unwrap();
    blocks[7] = p;
    free_the_rest(&a, start, &blocks, &[]);
}

/// A chunk's next link that a stray write set near the top of the address space is refused as
/// damage when a record names a slot past the first chunk: before, the slot area's offset was
/// computed from the link before the link was checked, which overflowed (a panic in debug builds).
#[test]
fn a_slot_lookup_past_a_chunk_link_near_the_top_is_refused() {
    let a = Tla::create(region_of(1 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let s = &a.shared;
    let chunk = a.region().offset() + core::mem::offset_of!(TlaHeader, chunk) as u64;
    // SAFETY: the header's first chunk, in bounds and aligned; its link is its first word.
    let next = unsafe { &*s.mem.at::<AtomicU64>(chunk).unwrap() };
    for stray in [u64::MAX - 8, u64::MAX - 64, u64::MAX] {
        next.store(stray, Ordering::Release);
        let past = chunk + SlotTable::<HeapBody>::CHUNK_BYTES as u64 + 64;
        assert!(s.heaps.member(&s.mem, past).is_err(), "a slot behind the link {stray:#x}");
    }
    next.store(0, Ordering::Release);
    a.check().unwrap();
}

/// A thread that outlived the handle it allocated through (a pool's) kept its heap, with the
/// spans in it, for as long as its process ran: the handle's drop deleted the TLS key whose
/// destructor would have given the heap back at the thread's exit.
#[test]
fn dropping_a_handle_gives_back_the_heaps_of_threads_that_outlive_it() {
    let o = outlive_a_dropped_handle(|a: &Tla| &a.shared, |b| (b.owned_heaps().unwrap(), b.stats().free_bytes()));
    let (held, free) = o.seen;
    assert_eq!(held, 0, "a heap stayed held with no handle left to use it");
    assert_eq!(free, o.start, "the heap kept its spans");
    assert!(o.unmapped, "the thread kept the handle's region mapped");
    o.attached.check().unwrap();
}

/// The heap table keeps the chunks a burst of threads added (see `slots`), and the next threads
/// take their heaps from them: threads that come and go do not grow it past the most that held
/// heaps at once.
#[test]
fn threads_that_come_and_go_reuse_the_heap_chunks_a_burst_added() {
    let a = Tla::create(region_of(16 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let burst = |n: usize| {
        let barrier = std::sync::Barrier::new(n);
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| {
                        let p = a.allocate(64, 8).unwrap();
                        barrier.wait();
                        a.free(p).unwrap();
                    })
                })
                .collect();
            // Joined one by one: the scope's own end does not wait for the threads' exit, whose
            // TLS destructors give the heaps back.
            threads.into_iter().for_each(|t| t.join().unwrap());
        });
        a.shared.heaps.offsets(&a.shared.mem).unwrap().len()
    };
    let peak = burst(40);
    assert!(peak >= 40, "{peak} heaps for 40 threads at once");
    let free = a.stats().free_bytes();
    for _ in 0..5 {
        assert_eq!(burst(40), peak, "the table grew for threads it had heaps for");
        assert_eq!(burst(7), peak);
    }
    assert_eq!(a.stats().free_bytes(), free);
    assert_eq!(a.owned_heaps().unwrap(), 0);
    a.check().unwrap();
}
