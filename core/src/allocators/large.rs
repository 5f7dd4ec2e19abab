//! Large blocks: requests above the size classes, served as whole runs of units straight from
//! the free-space manager, with the 32-byte header described in [`span`](super::span). Both span
//! allocators use these functions unchanged.

use crate::crash;
use crate::error::{Error, Result};
use crate::sync::atomic::Ordering;
use crate::sync::tagged_list::LoopCheck;

use super::free_space::{FreeSpace, FreeSpaceGuard, LargeCounters, UNIT};
use super::span::{
    back_word, corrupt, invalid, large_units, user_of, zero_padding, Info, Mem, State, LARGE_CLASS, LARGE_HEADER,
    MAX_BACK,
};

/// The tag large runs carry in the free-space table.
pub(crate) const TAG_LARGE: u32 = 0x4C52_4745; // "LRGE"
/// The tag spans carry.
pub(crate) const TAG_SPAN: u32 = 0x5350_4E53; // "SPNS"
/// The tag of runs holding allocator metadata (heap tables).
pub(crate) const TAG_META: u32 = 0x4D45_5441; // "META"

/// Allocates a large block under `g`, recording `owner` (a run word) and `stamp` (the allocating
/// process). `Ok(None)` when no run is long enough.
pub(crate) fn allocate(
    g: &mut FreeSpaceGuard<'_>,
    fs: &FreeSpace,
    mem: &Mem,
    size: usize,
    align: usize,
    owner: u32,
    stamp: u64,
) -> Result<Option<u64>> {
    let units = large_units(size, align)
        .ok_or_else(|| Error::OutOfMemory { requested: size as u64, available: g.free_bytes() })?;
    let Some(head) = g.alloc(units, TAG_LARGE, owner) else {
        return Ok(None);
    };
    crash::point();
    let block = fs.layout().unit_offset(head);
    let user = user_of(block, LARGE_HEADER, align as u64);
    let info = Info { state: State::Live, class: LARGE_CLASS, index: 0, size: 0 };
    mem.word(block + 8)?.store(size as u64, Ordering::Relaxed);
    mem.word(block + 16)?.store(stamp, Ordering::Relaxed);
    if user > block + LARGE_HEADER {
        // The header's last word: zero, which says the user bytes are padded (`find_live`);
        // and the padding (where a small block's info word would be among it): zeroes, see
        // `zero_padding`.
        mem.word(block + LARGE_HEADER - 8)?.store(0, Ordering::Relaxed);
        mem.ptr(block, user - block)?;
        // SAFETY: `[block, user)` lies in the arena (checked just above), in the run just
        // taken: ours alone.
        unsafe { zero_padding(mem, block, LARGE_HEADER, user) };
    }
    mem.word(user - 8)?.store(back_word(user - block, stamp), Ordering::Relaxed);
    crash::point();
    mem.info(block)?.store(info.pack(), Ordering::Release);
    crash::point();
    // The counters are shared memory another process may have broken: they wrap, as `check`
    // reports, rather than panic.
    let c = &mut g.st.large;
    c.live = c.live.wrapping_add(1);
    c.live_bytes = c.live_bytes.wrapping_add(size as u64);
    c.live_units = c.live_units.wrapping_add(units as u64);
    c.allocations = c.allocations.wrapping_add(1);
    Ok(Some(user))
}

/// The run and requested size of the live large block at `block`, checked under `g`. The size is
/// shared memory: it must fit the user bytes, from `user` (the block's user offset, where the
/// caller knows it: callers read or copy that many bytes from there), else from the header's end,
/// to the run's end.
pub(crate) fn live_run(
    g: &FreeSpaceGuard<'_>,
    fs: &FreeSpace,
    mem: &Mem,
    block: u64,
    user: Option<u64>,
) -> Result<(u32, u64)> {
    let head = fs
        .layout()
        .unit_of(block)
        .filter(|&h| fs.layout().unit_offset(h) == block)
        .ok_or(invalid(block, "not a large block of this allocator"))?;
    let run = g.used_run(head)?;
    if run.tag != TAG_LARGE {
        return Err(invalid(block, "not a large block of this allocator"));
    }
    let info =
        Info::unpack(mem.info(block)?.load(Ordering::Acquire)).ok_or(corrupt(block, "large block lost its header"))?;
    if info.state != State::Live {
        return Err(invalid(block, "already freed"));
    }
    let size = mem.word(block + 8)?.load(Ordering::Relaxed);
    // In the arena (checked above), so the run's end does not overflow.
    let run_end = block + run.len() as u64 * UNIT;
    let from = user.unwrap_or(block + LARGE_HEADER);
    if size == 0 || from < block + LARGE_HEADER || size > run_end.saturating_sub(from) {
        return Err(corrupt(block, "large block size outside its run"));
    }
    Ok((head, size))
}

/// Frees the large block at `block`.
pub(crate) fn free(fs: &FreeSpace, mem: &Mem, block: u64) -> Result<()> {
    free_locked(&mut fs.lock(), fs, mem, block)
}

/// [`free`], for a caller that holds the free-space lock.
pub(crate) fn free_locked(g: &mut FreeSpaceGuard<'_>, fs: &FreeSpace, mem: &Mem, block: u64) -> Result<()> {
    let (head, size) = live_run(g, fs, mem, block, None)?;
    let live = Info { state: State::Live, class: LARGE_CLASS, index: 0, size: 0 };
    mem.info(block)?
        .compare_exchange(live.pack(), live.with_state(State::Free).pack(), Ordering::AcqRel, Ordering::Relaxed)
        .map_err(|_| invalid(block, "already freed"))?;
    crash::point();
    let units = g.used_run(head)?.len() as u64;
    g.free(head)?;
    crash::point();
    let c = &mut g.st.large;
    c.live_units = c.live_units.wrapping_sub(units);
    c.live = c.live.wrapping_sub(1);
    c.live_bytes = c.live_bytes.wrapping_sub(size);
    c.frees = c.frees.wrapping_add(1);
    Ok(())
}

/// The requested size of the live block (small or large) whose user bytes are at `ptr`.
pub(crate) fn size_of_user(fs: &FreeSpace, mem: &Mem, ptr: crate::ptr::OffsetPtr) -> Result<usize> {
    let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
    match super::span::live_block(mem, user)? {
        super::span::Found::Large { block } => size_of(fs, mem, block, user).map(|v| v as usize),
        super::span::Found::Small(b) => b.user_size(user).map(|v| v as usize),
    }
}

/// The requested size of the large block at `block` whose user bytes start at `user`.
pub(crate) fn size_of(fs: &FreeSpace, mem: &Mem, block: u64, user: u64) -> Result<u64> {
    let g = fs.lock();
    live_run(&g, fs, mem, block, Some(user)).map(|(_, s)| s)
}

/// Resizes the large block whose user bytes are at `user` in place, if its run can shrink or
/// grow into a free neighbour and `user` suits `align`. Returns whether it did.
pub(crate) fn resize_in_place(
    fs: &FreeSpace,
    mem: &Mem,
    block: u64,
    user: u64,
    new_size: usize,
    align: usize,
) -> Result<bool> {
    if user % align as u64 != 0 {
        return Ok(false);
    }
    let mut g = fs.lock();
    let (head, size) = live_run(&g, fs, mem, block, Some(user))?;
    let Some(units) =
        (user - block).checked_add(new_size as u64).map(|end| end.div_ceil(UNIT)).and_then(|u| u32::try_from(u).ok())
    else {
        return Ok(false);
    };
    let old_units = g.used_run(head)?.len() as u64;
    // The size word never says more than the run holds, whenever the process dies: a recovery
    // would take the block for a half-made one and free it. So a smaller size goes in before the
    // run shrinks, a larger one after it grows.
    let size_word = mem.word(block + 8)?;
    if (new_size as u64) < size {
        size_word.store(new_size as u64, Ordering::Relaxed);
        crash::point();
    }
    if !g.resize(head, units)? {
        size_word.store(size, Ordering::Relaxed);
        return Ok(false);
    }
    size_word.store(new_size as u64, Ordering::Relaxed);
    crash::point();
    let c = &mut g.st.large;
    c.live_units = c.live_units.wrapping_sub(old_units).wrapping_add(units as u64);
    c.live_bytes = c.live_bytes.wrapping_sub(size).wrapping_add(new_size as u64);
    Ok(true)
}

/// What `check()` finds of the large blocks in a walk of the runs, to hold the large-block
/// counters (which `stats()` reports) to.
#[derive(Default)]
pub(crate) struct LargeTally {
    live: u64,
    bytes: u64,
    units: u64,
}

impl LargeTally {
    /// Checks one large run found in the table (its block live, its size within its user
    /// bytes) and counts it.
    pub(crate) fn add_run(&mut self, fs: &FreeSpace, mem: &Mem, head: u32, units: u32) -> Result<()> {
        self.bytes += check_block(mem, fs.layout().unit_offset(head), units)?;
        self.live += 1;
        self.units += units as u64;
        Ok(())
    }

    /// Checks the large-block counters under `g` against the runs counted.
    pub(crate) fn check(&self, g: &FreeSpaceGuard<'_>) -> Result<()> {
        let c = &g.st.large;
        if (c.live, c.live_bytes, c.live_units) != (self.live, self.bytes, self.units) {
            return Err(corrupt(0, "large-block counters disagree with the runs"));
        }
        Ok(())
    }
}

/// The requested size of the live large block at `block`, whose run is `units` long, checked
/// against its user bytes: from its user offset ([`user_of_large`]) to the run's end, which
/// `size_of` and `reallocate` bound it by too (a padded block has fewer than the run less its
/// header). No crash leaves a live block with a size past them (see `resize_in_place`), so the
/// free-space repair takes such a block for damage, as one whose size is past its run.
fn check_block(mem: &Mem, block: u64, units: u32) -> Result<u64> {
    let info = Info::unpack(mem.info(block)?.load(Ordering::Acquire))
        .ok_or(corrupt(block, "large run without a block header"))?;
    if info.state != State::Live || info.class != LARGE_CLASS {
        return Err(corrupt(block, "large run whose block is not live"));
    }
    let size = mem.word(block + 8)?.load(Ordering::Relaxed);
    let run_end = block.saturating_add(units as u64 * UNIT);
    let user = user_of_large(mem, block, run_end)?;
    if size == 0 || size > run_end - user {
        return Err(corrupt(block, "large block size past its user bytes"));
    }
    Ok(size)
}

/// The user offset of the live large block at `block`, whose run ends at `run_end`: the first
/// offset past the header, in 16-byte steps, whose back word gives its distance from the block
/// (the header's last word for an unpadded block; past a padded one's zeroed padding, see
/// [`find_live`](super::span::find_live)), within one alignment step and below the run's end.
fn user_of_large(mem: &Mem, block: u64, run_end: u64) -> Result<u64> {
    let last = run_end.min(block.saturating_add(MAX_BACK + 8));
    let mut user = block + LARGE_HEADER;
    while user < last {
        if mem.word(user - 8)?.load(Ordering::Relaxed) & 0xffff == user - block {
            return Ok(user);
        }
        user += 16;
    }
    Err(corrupt(block, "large block without a back word"))
}

/// After the free-space lock was taken over from a dead holder (the bins are rebuilt already):
/// runs whose maker died before finishing them go back to the free space (a span whose header
/// was never written, a large block without its header or freed but not returned, a metadata
/// run no chunk list links), and the large-block counters are recounted from the runs.
/// `chunks` is the first slot chunk (0 for none), whose list is walked through each chunk's
/// first word.
pub(crate) fn repair_runs(g: &mut FreeSpaceGuard<'_>, arena: &Mem, mem: &Mem, chunks: u64) {
    let mut orphans = alloc::vec::Vec::new();
    let mut counters =
        LargeCounters { allocations: g.st.large.allocations, frees: g.st.large.frees, ..LargeCounters::default() };
    let unit_offset = |head: u32| arena.start() + head as u64 * UNIT;
    let _ = g.for_each_used(|head, run| {
        let base = unit_offset(head);
        match run.tag {
            TAG_SPAN if arena.class_span(base, run.aux as usize).is_none() => orphans.push(head),
            TAG_LARGE => match check_block(arena, base, run.len()) {
                Ok(size) => {
                    counters.live += 1;
                    counters.live_bytes += size;
                    counters.live_units += run.len() as u64;
                }
                Err(_) => orphans.push(head),
            },
            TAG_META if !chunk_linked(mem, chunks, base) => orphans.push(head),
            _ => {}
        }
        Ok(())
    });
    for head in orphans {
        let _ = g.free(head);
    }
    g.st.large = counters;
}

/// Whether the chunk at `chunk` is on the list starting at `first` (each chunk's first word
/// links the next). A list that loops (shared memory) links nothing past the loop.
fn chunk_linked(mem: &Mem, first: u64, chunk: u64) -> bool {
    let mut at = first;
    let mut loops = LoopCheck::new(at);
    for _ in 0..mem.end() / UNIT + 1 {
        if at == 0 {
            return false;
        }
        if at == chunk {
            return true;
        }
        match mem.word_at(at) {
            Some(w) => at = w.load(Ordering::Acquire),
            None => return false,
        }
        if loops.came_round(at) {
            return false;
        }
    }
    false
}

/// Bytes of metadata runs (slot chunks), which count as reserved.
pub(crate) fn meta_bytes(g: &FreeSpaceGuard<'_>) -> u64 {
    let mut total = 0;
    let _ = g.for_each_used(|_, run| {
        if run.tag == TAG_META {
            total += run.len() as u64 * UNIT;
        }
        Ok(())
    });
    total
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use crate::allocator::{AllocatorType, RegionAllocator};
    use crate::allocators::testing::region_of;
    use crate::allocators::{ScalablePageAllocator, ThreadLocalAllocator};
    use crate::error::Error;
    use crate::ptr::AllocatorId;
    use crate::testing::TestThreads;

    use super::UNIT;

    /// A large block's size word is shared memory: one a peer set to its whole run (more than
    /// the user bytes after a 4096-aligned block's padding hold) is refused by `size_of` and
    /// `reallocate`, not taken as a length to read or copy from the user offset, which would
    /// reach a page into the next run (here a live block of another owner).
    fn a_size_word_reaching_past_the_run_is_refused(a: &dyn RegionAllocator) {
        const SIZE: u64 = 64 << 10;
        let p = a.allocate(SIZE as usize, 4096).unwrap();
        let neighbour = a.allocate(SIZE as usize, 4096).unwrap();
        let (user, block) = (p.get(), p.get() - 4096);
        // 32 header bytes and 4064 of padding before the user bytes.
        let units = (super::LARGE_HEADER + 4096 + SIZE).div_ceil(UNIT);
        let run_end = block + units * UNIT;
        assert!(neighbour.get() >= run_end, "the neighbour lies after the run");
        let size_word = a.region().ptr(block + 8, 8).unwrap().cast::<u64>();
        // SAFETY: the block's size word, in bounds and 8-aligned; no other thread uses `a`.
        unsafe { size_word.write_volatile(units * UNIT) };
        let size = a.size_of(p);
        assert!(
            size.as_ref().is_ok_and(|&s| user + s as u64 <= run_end) || matches!(size, Err(Error::Corrupt { .. })),
            "size_of says {size:?}: past the run's end"
        );
        let moved = a.reallocate(p, 1 << 20, 8);
        assert!(matches!(moved, Err(Error::Corrupt { .. })), "{moved:?}");
        // SAFETY: as above.
        unsafe { size_word.write_volatile(SIZE) };
        assert_eq!(a.size_of(p).unwrap(), SIZE as usize, "the block stayed the caller's");
        a.free(p).unwrap();
        a.free(neighbour).unwrap();
        a.check().unwrap();
    }

    /// `check()` bounds a large block's size word by its user bytes, as `size_of` does: a size
    /// past them (here the run less its header, which a 4096-aligned block's padding leaves
    /// 4064 bytes short of) is damage. Before, `check()` bounded it by the run less its header
    /// and passed it, and the free-space repair counted it in the bytes in use.
    fn a_size_word_past_the_user_bytes_fails_check(a: &dyn RegionAllocator) {
        const SIZE: u64 = 64 << 10;
        let p = a.allocate(SIZE as usize, 4096).unwrap();
        let block = p.get() - 4096;
        let units = (super::LARGE_HEADER + 4096 + SIZE).div_ceil(UNIT);
        let size_word = a.region().ptr(block + 8, 8).unwrap().cast::<u64>();
        // SAFETY: the block's size word, in bounds and 8-aligned; no other thread uses `a`.
        unsafe { size_word.write_volatile(units * UNIT - super::LARGE_HEADER) };
        assert!(a.size_of(p).is_err(), "size_of refuses it");
        assert!(matches!(a.check(), Err(Error::Corrupt { .. })), "check() passes what size_of refuses");
        // SAFETY: as above.
        unsafe { size_word.write_volatile(SIZE) };
        a.check().unwrap();
        a.free(p).unwrap();
        a.check().unwrap();
    }

    #[test]
    fn check_bounds_a_large_blocks_size_word_by_its_user_bytes() {
        let id = AllocatorId::new(1, 0);
        let tla = ThreadLocalAllocator::<TestThreads>::create(region_of(4 << 20), id, &Default::default()).unwrap();
        a_size_word_past_the_user_bytes_fails_check(&tla);
        let spa = ScalablePageAllocator::create(region_of(4 << 20), id, &Default::default()).unwrap();
        a_size_word_past_the_user_bytes_fails_check(&spa);
        // Unpadded blocks, and blocks padded for every alignment, pass.
        for align in [8, 64, 128, 1024, 4096] {
            let blocks: alloc::vec::Vec<_> =
                (0..3).map(|i| spa.allocate((40 << 10) + i * 16, align).unwrap()).collect();
            spa.check().unwrap();
            blocks.into_iter().for_each(|p| spa.free(p).unwrap());
        }
    }

    /// The repair's walk of the slot chunk list (shared memory) finds a loop in it, as the slot
    /// table's walks do: bounded only by the region's units, it went round a looping list for as
    /// many steps, for each metadata run it asked about, holding the free-space lock.
    #[test]
    fn the_repairs_walk_of_a_looping_chunk_list_finds_the_loop() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut words = alloc::vec![0u64; 4 * UNIT as usize / 8];
            // A view far larger than the words (a huge region): only the words are touched.
            // SAFETY: every offset the walk reads is a chunk's first word, inside `words`.
            let mem = unsafe { super::Mem::raw(words.as_mut_ptr().cast(), 0, 1 << 62) };
            let word = |chunk: u64| (chunk / 8) as usize;
            // Chunks at units 1 and 2 link each other; unit 3 holds a run no chunk links.
            words[word(UNIT)] = 2 * UNIT;
            words[word(2 * UNIT)] = UNIT;
            let _ = tx.send([super::chunk_linked(&mem, UNIT, 2 * UNIT), super::chunk_linked(&mem, UNIT, 3 * UNIT)]);
            drop(words);
        });
        let linked = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the walk went round the loop");
        assert_eq!(linked, [true, false]);
    }

    #[test]
    fn a_large_blocks_size_word_is_bounded_by_its_user_bytes() {
        let id = AllocatorId::new(1, 0);
        let spa = ScalablePageAllocator::create(region_of(4 << 20), id, &Default::default()).unwrap();
        a_size_word_reaching_past_the_run_is_refused(&spa);
        let tla = ThreadLocalAllocator::<TestThreads>::create(region_of(4 << 20), id, &Default::default()).unwrap();
        a_size_word_reaching_past_the_run_is_refused(&tla);
    }
}
