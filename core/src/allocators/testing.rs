//! Shared tests for region allocators: what every allocator must do, run against each.

use std::sync::Arc;

use crate::allocator::{AllocatorType, RegionAllocator};
use crate::backend::BackendId;
use crate::error::Error;
use crate::header::HEADER_SIZE;
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::Region;
use crate::testing::HeapBackend;

/// The whole data area of a fresh heap backend of `len` data bytes.
pub(crate) fn region_of(len: usize) -> Region {
    let backend = Arc::new(HeapBackend::new(BackendId(1), len + HEADER_SIZE as usize));
    // SAFETY: a fresh backend, which only the allocator the test makes over it uses.
    unsafe { Region::whole(backend) }.unwrap()
}

fn fill(a: &dyn RegionAllocator, p: OffsetPtr, len: usize, seed: u8) {
    let ptr = a.region().ptr(p.get(), len as u64).unwrap();
    // SAFETY: a live block of at least `len` bytes, in bounds (checked).
    unsafe { core::ptr::write_bytes(ptr, seed, len) };
}

fn holds(a: &dyn RegionAllocator, p: OffsetPtr, len: usize, seed: u8) -> bool {
    let ptr = a.region().ptr(p.get(), len as u64).unwrap();
    // SAFETY: as in `fill`.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len) };
    bytes.iter().all(|&b| b == seed)
}

/// Sizes across every class and into large blocks, every alignment, contents kept, bad input
/// refused, out of memory recoverable, and back to the starting free capacity at the end.
pub(crate) fn exercise(a: &dyn RegionAllocator) {
    let start = a.stats();
    a.check().unwrap();
    let mut live = Vec::new();
    let mut seed = 1u8;
    for &size in &[1usize, 15, 16, 17, 63, 64, 65, 100, 1000, 4096, 16384, 16385, 40_000, 300_000] {
        for &align in &[1usize, 8, 16, 64, 256, 4096] {
            let p = a.allocate(size, align).unwrap();
            a.check().unwrap_or_else(|e| panic!("size {size} align {align}: {e}"));
            assert_eq!(p.get() % align as u64, 0, "size {size} align {align}");
            assert_eq!(a.size_of(p).unwrap(), size);
            fill(a, p, size, seed);
            live.push((p, size, seed));
            seed = seed.wrapping_add(1);
        }
    }
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, live.len() as u64);
    // No two live blocks overlap.
    let mut spans: Vec<_> = live.iter().map(|(p, s, _)| (p.get(), p.get() + *s as u64)).collect();
    spans.sort_unstable();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    for &(p, size, seed) in &live {
        assert!(holds(a, p, size, seed));
    }
    // Grow and shrink keep the common prefix.
    let (p, size, s) = live.pop().unwrap();
    let q = a.reallocate(p, size * 2, 64).unwrap();
    assert!(holds(a, q, size, s));
    let r = a.reallocate(q, 10, 16).unwrap();
    assert!(holds(a, r, 10, s));
    a.free(r).unwrap();
    // Bad input.
    assert!(matches!(a.allocate(0, 8), Err(Error::InvalidSize { .. })));
    assert!(matches!(a.allocate(8, 3), Err(Error::InvalidAlignment { .. })));
    assert!(matches!(a.allocate(8, 8192), Err(Error::InvalidAlignment { .. })));
    assert!(a.free(OffsetPtr::NULL).is_err());
    assert!(a.free(OffsetPtr::new(live[0].0.get() + 16)).is_err());
    assert!(a.free(OffsetPtr::new(a.region().end() + 64)).is_err());
    let (p0, _, _) = live.remove(0);
    a.free(p0).unwrap();
    assert!(matches!(a.free(p0), Err(Error::InvalidFree { .. })), "double free");
    // Out of memory is an error and the allocator stays usable.
    assert!(matches!(a.allocate(a.region().len() as usize, 8), Err(Error::OutOfMemory { .. })));
    let p = a.allocate(32, 8).unwrap();
    a.free(p).unwrap();
    for (p, size, seed) in live {
        assert!(holds(a, p, size, seed));
        a.free(p).unwrap();
    }
    a.check().unwrap();
    let end = a.stats();
    assert_eq!(end.live_allocations, 0);
    assert_eq!(end.bytes_in_use, 0);
    assert_eq!(end.free_bytes(), start.free_bytes());
    assert_eq!(end.total_allocations, end.total_frees);
}

/// One step of the model-based test.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Alloc { size: usize, align_log: u32 },
    Realloc { pick: usize, size: usize, align_log: u32 },
    Free { pick: usize },
}

/// Sizes 0..2 MiB, mostly small; alignments 1..4096.
pub(crate) fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let size = prop_oneof![
        6 => 0usize..=512,
        3 => 513usize..=20_000,
        1 => 20_001usize..(2 << 20),
    ];
    prop_oneof![
        4 => (size.clone(), 0u32..=12).prop_map(|(size, align_log)| Op::Alloc { size, align_log }),
        2 => (any::<usize>(), size, 0u32..=12)
            .prop_map(|(pick, size, align_log)| Op::Realloc { pick, size, align_log }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

/// Runs `ops` against `a` and a model (live blocks with their sizes and contents): `check()`
/// after every step, blocks in bounds, never overlapping, contents kept; at the end everything
/// is freed and the free capacity is back where it started.
pub(crate) fn run_model(a: &dyn RegionAllocator, ops: &[Op]) {
    let start = a.stats().free_bytes();
    let mut live: Vec<(OffsetPtr, usize, u8)> = Vec::new();
    let mut seed = 0u8;
    for op in ops {
        seed = seed.wrapping_add(1);
        match *op {
            Op::Alloc { size, align_log } => {
                let align = 1usize << align_log;
                match a.allocate(size, align) {
                    Ok(p) => {
                        assert!(size > 0, "zero size accepted");
                        assert_eq!(p.get() % align as u64, 0);
                        assert!(a.region().contains(p.get(), size as u64));
                        fill(a, p, size, seed);
                        live.push((p, size, seed));
                    }
                    Err(Error::InvalidSize { .. }) => assert_eq!(size, 0),
                    Err(Error::OutOfMemory { .. }) => {}
                    Err(e) => panic!("allocate({size}, {align}): {e}"),
                }
            }
            Op::Realloc { pick, size, align_log } if !live.is_empty() => {
                let i = pick % live.len();
                let (p, old, s) = live[i];
                let align = 1usize << align_log;
                match a.reallocate(p, size, align) {
                    Ok(q) => {
                        assert_eq!(q.get() % align as u64, 0);
                        assert!(holds(a, q, old.min(size), s), "realloc lost contents");
                        fill(a, q, size, s);
                        live[i] = (q, size, s);
                    }
                    Err(Error::InvalidSize { .. }) => assert_eq!(size, 0),
                    Err(Error::OutOfMemory { .. }) => assert!(holds(a, p, old, s)),
                    Err(e) => panic!("reallocate: {e}"),
                }
            }
            Op::Free { pick } if !live.is_empty() => {
                let (p, size, s) = live.swap_remove(pick % live.len());
                assert!(holds(a, p, size, s), "contents changed");
                a.free(p).unwrap();
                assert!(a.free(p).is_err(), "double free accepted");
            }
            _ => {}
        }
        a.check().unwrap_or_else(|e| panic!("after {op:?}: {e}"));
        let mut spans: Vec<_> = live.iter().map(|(p, s, _)| (p.get(), p.get() + *s as u64)).collect();
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "live blocks overlap");
        assert_eq!(a.stats().live_allocations, live.len() as u64);
        assert_eq!(a.stats().bytes_in_use, live.iter().map(|l| l.1 as u64).sum::<u64>());
    }
    for (p, size, s) in live {
        assert!(holds(a, p, size, s));
        a.free(p).unwrap();
    }
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
}

/// A live allocator holding blocks of every kind (unpadded, padded, large, some freed): the
/// user offsets of the live ones with their sizes and seeds, and of the freed ones.
pub(crate) fn populate(a: &dyn RegionAllocator) -> (Vec<(OffsetPtr, usize, u8)>, Vec<u64>) {
    let mut live = Vec::new();
    let mut freed = Vec::new();
    let mut seed = 1u8;
    for &size in &[1usize, 16, 48, 100, 1000, 16384, 40_000] {
        for &align in &[8usize, 16, 64, 256, 4096] {
            for keep in [true, false, true] {
                let p = a.allocate(size, align).unwrap();
                fill(a, p, size, seed);
                if keep {
                    live.push((p, size, seed));
                } else {
                    freed.push(p);
                }
                seed = seed.wrapping_add(1);
            }
        }
    }
    let freed = freed.into_iter().map(|p| {
        a.free(p).unwrap();
        p.get()
    });
    let freed = freed.collect();
    a.check().unwrap();
    (live, freed)
}

/// Offsets worth trying as bad input near the blocks of [`populate`]: every 8 bytes from a
/// page below each block to a few words past its start, and the edges of the region.
pub(crate) fn bad_offsets(a: &dyn RegionAllocator, live: &[(OffsetPtr, usize, u8)], freed: &[u64]) -> Vec<u64> {
    let r = a.region();
    let mut out = vec![0, 1, 8, 15, 16, 32, u64::MAX, u64::MAX - 15, u64::MAX - 7, 1 << 63, r.offset(), r.end()];
    out.extend([r.end() - 16, r.end() - 8, r.end() + 16, r.offset() + 16, r.offset() + 64]);
    for user in live.iter().map(|l| l.0.get()).chain(freed.iter().copied()) {
        for d in (0..4200u64).step_by(8) {
            out.push(user.wrapping_sub(d));
        }
        out.extend((8..80u64).step_by(8).map(|d| user + d));
    }
    let users: std::collections::BTreeSet<u64> = live.iter().map(|l| l.0.get()).collect();
    out.retain(|o| !users.contains(o));
    out.sort_unstable();
    out.dedup();
    out
}

/// Bad offsets and bad requests are refused with an error, and leave the allocator whole:
/// `check()` passes, live blocks keep their contents and stay live, and after all frees the
/// free capacity is back where it started.
pub(crate) fn refuse_bad_input(a: &dyn RegionAllocator, extra: &[u64]) {
    let start = a.stats();
    let (live, freed) = populate(a);
    let mut offsets = bad_offsets(a, &live, &freed);
    let users: std::collections::BTreeSet<u64> = live.iter().map(|l| l.0.get()).collect();
    offsets.extend(extra.iter().filter(|o| !users.contains(o)));
    let stats = a.stats();
    for &o in &offsets {
        let p = OffsetPtr::new(o);
        assert!(a.size_of(p).is_err(), "size_of({o:#x}) accepted");
        assert!(a.free(p).is_err(), "free({o:#x}) accepted");
        assert!(a.reallocate(p, 64, 8).is_err(), "reallocate({o:#x}) accepted");
        assert!(a.reallocate(p, 50_000, 4096).is_err(), "reallocate({o:#x}) accepted");
    }
    a.check().unwrap();
    let after = a.stats();
    assert_eq!((after.live_allocations, after.bytes_in_use), (stats.live_allocations, stats.bytes_in_use));
    for &(p, size, _) in &live {
        for (new_size, align) in
            [(0, 8), (64, 0), (64, 3), (64, 1 << (usize::BITS - 8)), (usize::MAX, 8), (usize::MAX - 15, 16)]
        {
            assert!(a.reallocate(p, new_size, align).is_err(), "reallocate({p:?}, {new_size}, {align}) accepted");
        }
        for (new_size, align) in
            [(usize::MAX / 2, 4096), (1 << (usize::BITS - 2), 16), ((u32::MAX as usize).saturating_mul(4096), 8)]
        {
            assert!(
                matches!(a.reallocate(p, new_size, align), Err(Error::OutOfMemory { .. } | Error::InvalidSize { .. })),
                "reallocate({p:?}, {new_size}, {align})"
            );
        }
        assert_eq!(a.size_of(p).unwrap(), size);
    }
    a.check().unwrap();
    for (p, size, seed) in live {
        assert!(holds(a, p, size, seed), "contents of {p:?} changed");
        a.free(p).unwrap();
    }
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start.free_bytes());
    assert_eq!(a.stats().live_allocations, 0);
}

/// Runs the allocator out of memory class after class (small sizes, then large ones, then a
/// mix), freeing everything between rounds: each round ends in `OutOfMemory`, `check()` passes,
/// and the free capacity comes back each time, so that the largest request that fit at the start
/// fits again.
pub(crate) fn exhaust_and_recover(a: &dyn RegionAllocator) {
    let start = a.stats().free_bytes();
    let largest = (start as usize / 4096 - 64) * 4096;
    let big = a.allocate(largest, 8).unwrap();
    a.free(big).unwrap();
    for sizes in [&[24usize][..], &[3000, 16_000], &[40_000, 300_000], &[8, 700, 20_000, 5000, 200_000]] {
        let mut live = Vec::new();
        let mut i = 0;
        loop {
            let size = sizes[i % sizes.len()];
            let align = [8usize, 8, 8, 8, 8, 8, 16, 64, 4096][i % 9];
            match a.allocate(size, align) {
                Ok(p) => live.push(p),
                Err(Error::OutOfMemory { .. }) => break,
                Err(e) => panic!("allocate({size}, {align}): {e}"),
            }
            i += 1;
        }
        assert!(live.len() > 2, "{sizes:?}");
        a.check().unwrap();
        for p in live {
            a.free(p).unwrap();
        }
        a.check().unwrap();
        assert_eq!(a.stats().free_bytes(), start, "{sizes:?}");
        let big = a.allocate(largest, 8).unwrap_or_else(|e| panic!("after {sizes:?}: {e}"));
        a.free(big).unwrap();
    }
}

/// Damages words near the blocks of [`populate`] (a block's headers and padding, its span's
/// header, the free-space table, the slot records from `meta` on), each `(pick, at, how)`: a bit
/// flipped, a small number added, or the word replaced; then calls every public operation: none
/// may panic.
pub(crate) fn survive_damage(a: &dyn RegionAllocator, meta: u64, table: u64, damage: &[(usize, u64, u64)]) {
    let (live, freed) = populate(a);
    let users: Vec<u64> = live.iter().map(|l| l.0.get()).chain(freed.iter().copied()).collect();
    for &(pick, at, how) in damage {
        let user = users[pick % users.len()];
        let target = match at % 5 {
            0 => user - 8 * (at / 5 % 520),
            1 => (user - 16) / 4096 * 4096 + 8 * (at / 5 % 8),
            2 => (user - 16) / 4096 * 4096 - 4096 * (at / 5 % 12) + 8 * (at / 64 % 8),
            3 => table + 8 * (at / 5 % 512),
            _ => meta + 8 * (at / 5 % ((table - meta) / 8)),
        };
        let Ok(p) = a.region().ptr(target, 8) else { continue };
        let p = p.cast::<u64>();
        // SAFETY: in bounds (checked), 8-aligned; the test owns the allocator and no other
        // thread uses it.
        unsafe {
            let old = p.read_volatile();
            let new = match how % 4 {
                0 => old ^ (1 << (how / 4 % 64)),
                1 => old.wrapping_add(how / 4 % 64).wrapping_sub(32),
                2 => old ^ (how >> 8),
                _ => how >> 2,
            };
            p.write_volatile(new);
        }
    }
    let _ = a.check();
    let _ = a.stats();
    for &(p, _, _) in &live {
        let _ = a.size_of(p);
        let _ = a.reallocate(p, 3000, 64);
    }
    for &o in &freed {
        let _ = a.free(OffsetPtr::new(o));
    }
    let mut fresh = Vec::new();
    for size in [8usize, 100, 1000, 5000, 40_000] {
        for align in [8usize, 256] {
            if let Ok(p) = a.allocate(size, align) {
                fresh.push(p);
            }
        }
    }
    for &(p, _, _) in &live {
        let _ = a.free(p);
    }
    for p in fresh {
        let _ = a.free(p);
    }
    let _ = a.check();
    let _ = a.stats();
}

/// A reallocation whose copy fails (the block's size word says more than its block holds: a
/// peer broke it) frees the new block again: nothing is left allocated by it.
pub(crate) fn failed_copy_leaks_nothing(a: &dyn RegionAllocator, info_word: impl Fn(OffsetPtr) -> u64) {
    let p = a.allocate(100, 8).unwrap();
    let at = info_word(p);
    let w = a.region().ptr(at, 8).unwrap().cast::<u64>();
    // SAFETY: the block's info word, in bounds and 8-aligned; no other thread uses the allocator.
    unsafe { w.write_volatile(w.read_volatile() | 0x3f_ffff) };
    let before = a.stats();
    assert!(a.reallocate(p, 3 << 20, 8).is_err());
    let after = a.stats();
    assert_eq!(after.live_allocations, before.live_allocations, "the new block leaked");
    assert_eq!(after.bytes_in_use, before.bytes_in_use);
}

/// An interior offset of a live block whose preceding word, in the block's own user bytes,
/// happens to hold that offset's distance from the block's start (as the data of a caller may)
/// is refused: the block stays live.
pub(crate) fn interior_offsets_with_back_words_in_the_data_are_refused(a: &dyn RegionAllocator) {
    for (size, header) in [(1000usize, 16u64), (40_000, 32)] {
        let p = a.allocate(size, 8).unwrap();
        let user = p.get();
        let block = user - header;
        for j in 1..(size as u64 / 16).min(200) {
            let q = user + 16 * j;
            let w = a.region().ptr(q - 8, 8).unwrap().cast::<u64>();
            // SAFETY: a word of the block's user bytes, in bounds and aligned.
            unsafe { w.write(q - block) };
            assert!(a.size_of(OffsetPtr::new(q)).is_err(), "size_of interior {j} of {size}");
            assert!(a.free(OffsetPtr::new(q)).is_err(), "free interior {j} of {size}");
        }
        assert_eq!(a.size_of(p).unwrap(), size);
        a.free(p).unwrap();
        a.check().unwrap();
    }
}

/// A small block's size field (its info word, shared memory) that says more than the user bytes
/// from its user offset to the block's end (a peer broke it; a padded block has fewer than its
/// class's size) is refused by `size_of` and `reallocate`, not taken as a length to read or copy
/// from the user offset, which would reach into the next block; and `check` reports it, even
/// with the live-byte counter that holds the block's size (`count`: adds the given bytes to it,
/// wrapping, for the block at the given user offset) broken to match.
pub(crate) fn small_sizes_past_the_block_are_refused(a: &dyn RegionAllocator, count: &dyn Fn(u64, u64)) {
    let word = |at: u64| a.region().ptr(at, 8).unwrap().cast::<u64>();
    for align in [8usize, 256] {
        let p = a.allocate(100, align).unwrap();
        let next = a.allocate(100, align).unwrap();
        let user = p.get();
        // An unpadded block's header is right below its user bytes; a padded one's back word
        // says how far.
        // SAFETY: the block's back word, in bounds and 8-aligned; no other thread uses `a`.
        let block = user - if align <= 16 { 16 } else { (unsafe { word(user - 8).read_volatile() }) & 0xffff };
        // SAFETY: the block's info word, as above.
        let info = unsafe { word(block).read_volatile() };
        let room = block + super::span::LAYOUTS[super::span::word_class(info)].stride - user;
        // SAFETY: as above.
        unsafe { word(block).write_volatile((info & !0x3f_ffff) | (room + 16)) };
        count(user, room + 16 - 100);
        let size = a.size_of(p);
        assert!(
            size.as_ref().is_ok_and(|&s| s as u64 <= room) || matches!(size, Err(Error::Corrupt { .. })),
            "align {align}: size_of says {size:?}, the block holds {room} bytes from its user offset"
        );
        let moved = a.reallocate(p, 20_000, 8);
        assert!(matches!(moved, Err(Error::Corrupt { .. })), "align {align}: {moved:?}");
        let checked = a.check();
        assert!(matches!(checked, Err(Error::Corrupt { .. })), "align {align}: check says {checked:?}");
        count(user, (room + 16 - 100).wrapping_neg());
        // SAFETY: as above.
        unsafe { word(block).write_volatile(info) };
        assert_eq!(a.size_of(p).unwrap(), 100, "the block stayed the caller's");
        a.free(p).unwrap();
        a.free(next).unwrap();
        a.check().unwrap();
    }
}

/// An offset past a block forged in a caller's own user bytes (as a caller's data, or a peer's
/// stray write, may hold): a live info word of a class that is no small class (nor the large
/// one), under a forged span header of that class, with a back word leading to it. A free,
/// `size_of` or `reallocate` of it is refused with an error, not a panic on the class table,
/// and the blocks around it stay the caller's.
pub(crate) fn forged_blocks_of_no_class_are_refused(a: &dyn RegionAllocator) {
    use super::size_class::CLASS_COUNT;
    use super::span::{span_of_word, Info, State};
    let word = |at: u64| a.region().ptr(at, 8).unwrap().cast::<u64>();
    let small = a.allocate(100, 8).unwrap();
    // SAFETY: the small block's info word, and its span's first word, in bounds and 8-aligned;
    // no other thread uses `a`.
    let kind = unsafe { word(span_of_word(small.get() - 16, word(small.get() - 16).read_volatile())).read_volatile() };
    let p = a.allocate(40_000, 8).unwrap();
    // In the large block's user bytes: a span header, a padded block right after it, and its user
    // bytes 32 bytes in (its back word just below them, a zero where an unpadded block's info
    // word would be).
    let span = p.get().next_multiple_of(64);
    let block = span + 64;
    let user = block + 32;
    let class_bits = 0xffu64 << 36;
    let live = Info { state: State::Live, class: 0, index: 0, size: 8 }.pack() & !class_bits;
    for class in [CLASS_COUNT as u64, 100, 254] {
        // SAFETY: words of the large block's user bytes, in bounds and 8-aligned.
        unsafe {
            word(span).write_volatile((kind & 0xffff_ffff) | class << 32);
            word(block).write_volatile(live | class << 36);
            word(block + 8).write_volatile(0);
            word(user - 16).write_volatile(0);
            word(user - 8).write_volatile(user - block);
        }
        let forged = OffsetPtr::new(user);
        assert!(matches!(a.free(forged), Err(Error::InvalidFree { .. })), "class {class}");
        assert!(a.size_of(forged).is_err(), "class {class}");
        assert!(a.reallocate(forged, 200, 8).is_err(), "class {class}");
    }
    assert_eq!(a.size_of(p).unwrap(), 40_000);
    assert_eq!(a.size_of(small).unwrap(), 100);
    a.free(p).unwrap();
    a.free(small).unwrap();
    a.check().unwrap();
}

/// Offsets that lead to a live padded block through a back word but are not its user offset
/// are refused as `InvalidFree`, and the block stays the caller's: one further in, past a word of
/// the caller's data that looks like a back word; and stale ones, left by an earlier use of the
/// block that was freed (a small or large block handed out again with another alignment).
pub(crate) fn offsets_that_are_not_a_padded_blocks_own_are_refused(a: &dyn RegionAllocator) {
    let word = |at: u64| a.region().ptr(at, 8).unwrap().cast::<u64>();
    // SAFETY: a live block's back word, in bounds and 8-aligned; no other thread uses `a`.
    let block_of = |p: OffsetPtr| p.get() - (unsafe { word(p.get() - 8).read_volatile() } & 0xffff);
    let refused = |q: u64, live: OffsetPtr, size: usize, what: &str| {
        let freed = a.free(OffsetPtr::new(q));
        assert!(matches!(freed, Err(Error::InvalidFree { .. })), "{what}: {freed:?}");
        assert_eq!(a.size_of(live).unwrap(), size, "{what}: the live block stayed the caller's");
    };
    // Further in: the caller's data holds the distance from the block.
    for (size, align) in [(100usize, 256usize), (40_000, 128)] {
        let p = a.allocate(size, align).unwrap();
        let q = p.get() + 32;
        // SAFETY: a word of the block's user bytes, in bounds and 8-aligned.
        unsafe { word(q - 8).write_volatile(q - block_of(p)) };
        refused(q, p, size, "an interior offset");
        a.free(p).unwrap();
    }
    // Stale: freed, and the block handed out again with a larger alignment (a large block's run
    // is taken again at once; a small one's class cycles through a few blocks first).
    let old = a.allocate(40_000, 64).unwrap();
    let old_block = block_of(old);
    a.free(old).unwrap();
    let new = a.allocate(40_000, 128).unwrap();
    assert_eq!(block_of(new), old_block, "the run taken again");
    refused(old.get(), new, 40_000, "a stale large offset");
    a.free(new).unwrap();
    // 200 bytes at 64 and 16 at 256 are the same class.
    let old = a.allocate(200, 64).unwrap();
    let old_block = block_of(old);
    a.free(old).unwrap();
    let mut kept = Vec::new();
    loop {
        let p = a.allocate(16, 256).unwrap();
        kept.push(p);
        if block_of(p) == old_block {
            refused(old.get(), p, 16, "a stale small offset");
            break;
        }
        assert!(kept.len() < 1000, "the block never came back");
    }
    for p in kept {
        a.free(p).unwrap();
    }
    a.check().unwrap();
}

/// What [`outlive_a_dropped_handle`] saw.
pub(crate) struct Outlived<A, R> {
    /// A handle attached to the region after the first one was dropped.
    pub(crate) attached: A,
    /// What the caller's look at `attached` found while the thread still stayed.
    pub(crate) seen: R,
    /// The free bytes before anything was allocated.
    pub(crate) start: u64,
    /// Whether the dropped handle's state, which keeps the region mapped, was gone after the drop.
    pub(crate) unmapped: bool,
}

/// A thread that outlives the handle it allocated through (a pool's thread): a fresh allocator
/// of type `A`, a thread that allocates and frees 200 small blocks through it and then stays
/// (parked), the handle dropped, and another one attached to the region, which `look` is given
/// while the thread still stays. `shared` gives a handle's state (a weak reference to it tells
/// whether the drop let it go). The thread is let go and joined before this returns.
pub(crate) fn outlive_a_dropped_handle<A, S, R>(
    shared: impl Fn(&A) -> &Arc<S>,
    look: impl FnOnce(&A) -> R,
) -> Outlived<A, R>
where
    A: AllocatorType + Send + Sync + 'static,
{
    let a = A::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let region = a.region().duplicate();
    let start = a.stats().free_bytes();
    let a = Arc::new(a);
    let user = a.clone();
    let (release, thread) = on_a_thread_that_stays(move || {
        let blocks: Vec<_> = (0..200).map(|i| user.allocate(16 + i % 300, 8).unwrap()).collect();
        for p in blocks {
            user.free(p).unwrap();
        }
    });
    let state = Arc::downgrade(shared(&a));
    drop(a);
    let unmapped = state.upgrade().is_none();
    let attached = A::attach(region, AllocatorId::new(1, 0)).unwrap();
    let seen = look(&attached);
    release.send(()).unwrap();
    thread.join().unwrap();
    Outlived { attached, seen, start, unmapped }
}

/// Runs `work` on a thread that then outlives it (a pool's thread, parked until the returned
/// sender is used or dropped), and returns once `work` is done.
fn on_a_thread_that_stays(
    work: impl FnOnce() + Send + 'static,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (done, worked) = std::sync::mpsc::channel();
    let (release, parked) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        work();
        done.send(()).unwrap();
        let _ = parked.recv();
    });
    worked.recv().unwrap();
    (release, thread)
}

/// `check()` holds the large-block counters (which `stats()` reports) to the runs: each of
/// them off by one, in the free-space state `fs`, is damage it reports.
pub(crate) fn large_counters_off_fail_check(a: &dyn RegionAllocator, fs: &super::free_space::FreeSpace) {
    let p = a.allocate(100 << 10, 8).unwrap();
    a.check().unwrap();
    for field in 0..3 {
        let bump = |by: u64| {
            let mut g = fs.lock();
            let c = &mut g.st.large;
            let word = [&mut c.live, &mut c.live_bytes, &mut c.live_units].into_iter().nth(field).unwrap();
            *word = word.wrapping_add(by);
        };
        bump(1);
        assert!(matches!(a.check(), Err(Error::Corrupt { .. })), "counter {field} off by one passed check()");
        bump(u64::MAX);
        a.check().unwrap();
    }
    a.free(p).unwrap();
    a.check().unwrap();
}
