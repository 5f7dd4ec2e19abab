//! A heap's record and its owner's paths: allocation, local and remote frees, bulk collection
//! of remote frees, sweeping and release.
//!
//! Each class has one cache line in the heap: two LIFO lists of the heap's free blocks of the
//! class (from any of its spans), the span new blocks are bumped from, and the counters. An
//! allocation pops the first list (`free`); a free by the owner pushes on the second (`freed`);
//! neither writes a span header. When `free` runs dry, the slow path collects remote frees,
//! then takes `freed` whole (topped up with fresh blocks of the bump span to [`CYCLE`] blocks),
//! then formats a fresh block of the bump span.
//! Two lists, as mimalloc's pages have, because with one an allocation takes the block the last
//! free gave back: in a loop of allocations and frees each operation then waits for the
//! previous one's stores to that block's header and to the list head (store-to-load
//! forwarding, a chain through every pair); with two, a block comes back only after the
//! others on `free`. When the lists together have doubled since the last sweep (or the heap is
//! trimmed), a sweep counts their blocks per span and returns the spans whose blocks are all
//! free.
//!
//! Collecting a remote list is journaled so that an owner killed at any instruction leaves
//! every block findable: the owner writes the list's first element to the heap's `pending`
//! word before taking the list ([`TaggedOffsetList::take_recorded`]); it then turns a batch of
//! the chain free (links untouched), moves `pending` past the batch, and only then pushes the
//! batch on its free list (which reuses the links). At every instant the part of the chain not
//! yet pushed hangs off `pending` with its links intact, so [`recovery`](super::recovery) can
//! finish the job. Everything else in the heap is rebuilt from the blocks' states on repair.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::crash;
use crate::error::{Error, Result};
use crate::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use crate::sync::tagged_list::{self, LinkStore, TaggedOffsetList};

use super::super::large::TAG_SPAN;
use super::super::size_class::CLASS_COUNT;
use super::super::slots::{Slot, SlotBody};
use super::super::span::{
    back_word, block_at, corrupt, freed_word, fresh_word, has_state, init_span, invalid, live_from_free, remote_word,
    span_of_word, user_of, word_class, zero_padding, Info, LiveSmall, SpanHeader, State, FIELD_MASK, LAYOUTS,
    SMALL_HEADER, SPAN_HEADER,
};
use super::Shared;

/// How many remote frees are turned free before `pending` moves past them.
const COLLECT_BATCH: usize = 32;

/// Per class: how many blocks a heap keeps going round when its own frees are what comes back
/// (about 8 KiB of them, at least one: an eighth of a small class's span): when the
/// allocation list runs dry and takes the freed list whole, fresh blocks of the bump span top
/// the two up to this many. Enough that a loop of allocations and frees cycles through several
/// blocks (see the module docs); blocks that come back only through remote frees are formatted
/// one at a time, as are a class's first (a batch there only adds blocks that sit idle, and a
/// producer feeding a consumer is slower with more blocks going round).
pub(super) const CYCLE: [u64; CLASS_COUNT] = {
    let mut out = [0; CLASS_COUNT];
    let mut c = 0;
    while c < CLASS_COUNT {
        let n = 8192 / LAYOUTS[c].stride;
        out[c] = if n == 0 { 1 } else { n };
        c += 1;
    }
    out
};

/// A word of a heap's owner-only state: only the heap's owner writes it, while anyone may read
/// it at any time (`stats`, `check`, a repairer). Relaxed atomic loads and stores compile to the
/// plain moves (and read-modify-write `add`s) that plain fields would, so the owner pays
/// nothing for them, and a reader racing the owner reads a stale value, which is not a data
/// race (as a plain read beside the owner's writes would be: undefined behaviour).
#[repr(transparent)]
pub(super) struct OwnerWord(AtomicU64);

impl OwnerWord {
    /// The value.
    #[inline(always)]
    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the value (by the owner).
    #[inline(always)]
    pub(super) fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Sets the value to 0 and returns what it was (by the owner: not one atomic step).
    #[inline(always)]
    pub(super) fn take(&self) -> u64 {
        let value = self.get();
        self.set(0);
        value
    }

    /// The value, or `None` for 0: a list head, which 0 marks empty.
    #[inline(always)]
    pub(super) fn head(&self) -> Option<u64> {
        let value = self.get();
        (value != 0).then_some(value)
    }

    /// Adds `delta`, wrapping (by the owner: not one atomic step).
    #[inline(always)]
    fn add(&self, delta: u64) {
        self.set(self.get().wrapping_add(delta));
    }
}

/// One class's state in a heap: one cache line, written by its owner only, read by anyone
/// (each field an [`OwnerWord`]).
///
/// An allocation adds to `allocations` and `live_bytes`, a free (local, or collected from the
/// remote list) to `frees` and takes from `live_bytes`; the rest is derived: live blocks are
/// `allocations - frees` (remote frees count until collected), blocks on the two free lists
/// `blocks - live`. Slow paths (bumping, sweeping, repair) move `blocks` and the sweep
/// threshold.
#[repr(C, align(64))]
pub(super) struct ClassState {
    /// The first free block allocations take (0 = none); the list links through the blocks'
    /// second words.
    pub(super) free: OwnerWord,
    /// Requested bytes of the live blocks.
    pub(super) live_bytes: OwnerWord,
    /// The span new blocks are bumped from (0 = none).
    pub(super) bump_span: OwnerWord,
    /// Blocks handed out since the heap was made. (The counters an operation writes are not
    /// neighbours, so they stay scalar additions.)
    pub(super) allocations: OwnerWord,
    /// Blocks of the class the heap holds that are live or on its free lists (fresh blocks past
    /// a span's bump index are not).
    pub(super) blocks: OwnerWord,
    /// Blocks given back to the heap's free lists since the heap was made.
    pub(super) frees: OwnerWord,
    /// The first block the owner freed since `free` last ran dry (0 = none), linked as `free`
    /// is; taken whole when `free` is empty.
    pub(super) freed: OwnerWord,
    /// `sweep_at - blocks`, where the free lists are swept when longer than `sweep_at`
    /// together: twice their length after the last sweep, plus two spans' worth (set when the
    /// class gets its first span; 0 until then). Kept as the difference so a free tests the
    /// threshold against its own counters alone.
    sweep_mark: OwnerWord,
}

impl ClassState {
    /// Live blocks (remote frees not yet collected included).
    #[inline]
    pub(super) fn live(&self) -> u64 {
        self.allocations.get().wrapping_sub(self.frees.get())
    }

    /// Blocks of the class the heap holds (live or on its free lists).
    #[inline]
    pub(super) fn blocks(&self) -> u64 {
        self.blocks.get()
    }

    /// Blocks on the free lists.
    #[inline]
    pub(super) fn count(&self) -> u64 {
        self.blocks().wrapping_sub(self.live())
    }

    /// Whether the free lists are longer than the sweep threshold: `blocks - live > sweep_at`,
    /// rearranged so that only the counters a free just wrote vary.
    #[inline]
    pub(super) fn sweep_due(&self) -> bool {
        (self.frees.get().wrapping_sub(self.allocations.get()) as i64) > self.sweep_mark.get() as i64
    }

    /// The sweep threshold (a length of the free lists together).
    pub(super) fn sweep_at(&self) -> u64 {
        self.sweep_mark.get().wrapping_add(self.blocks())
    }

    /// Sets the sweep threshold.
    pub(super) fn set_sweep_at(&self, at: u64) {
        self.sweep_mark.set(at.wrapping_sub(self.blocks()));
    }

    /// Sets how many blocks the heap holds, keeping the threshold.
    pub(super) fn set_blocks(&self, blocks: u64) {
        let at = self.sweep_at();
        self.blocks.set(blocks);
        self.set_sweep_at(at);
    }

    /// The heads of the two free lists, for walks (`None` for an empty one).
    pub(super) fn lists(&self) -> [Option<u64>; 2] {
        [self.free.head(), self.freed.head()]
    }

    /// Counts a block handed out for `size` bytes.
    #[inline]
    pub(super) fn count_allocation(&self, size: u64) {
        self.allocations.add(1);
        self.live_bytes.add(size);
    }

    /// Counts a block given back to the free list.
    #[inline]
    pub(super) fn count_free(&self, size: u64) {
        self.frees.add(1);
        self.live_bytes.add(size.wrapping_neg());
    }

    /// Sets every word a repair rebuilds from the blocks to 0 (a repair of the heap, which it
    /// holds). The history (`allocations`, `frees`) stays until the repair's end sets it from
    /// the blocks it counted: no block tells it, so a repairer killed in between must leave it to
    /// the next one.
    pub(super) fn clear_for_repair(&self) {
        for word in [&self.free, &self.live_bytes, &self.bump_span, &self.blocks, &self.freed, &self.sweep_mark] {
            word.set(0);
        }
    }
}

/// The owner-only part of a heap: written by the heap's owner alone, read by anyone.
#[repr(C)]
pub(super) struct HeapLocal {
    pub(super) classes: [ClassState; CLASS_COUNT],
}

#[repr(C, align(64))]
pub(super) struct LocalCell(pub(super) HeapLocal);

/// Per class: the encoded first element of the remote chain being collected (0 = none).
#[repr(C, align(64))]
pub(super) struct Pending(pub(super) [AtomicU64; CLASS_COUNT]);

/// Per class: blocks other threads freed, waiting for the owner.
#[repr(C, align(64))]
pub(super) struct RemoteLists(pub(super) [TaggedOffsetList; CLASS_COUNT]);

/// The block the heap's thread is freeing into another heap right now: recorded before the
/// block is marked remote and cleared after it is pushed, so a repairer of a thread killed in
/// between knows which block to settle, in which heap's orphan slot, and its size (which the
/// remote info word no longer holds).
#[repr(C, align(64))]
pub(super) struct InFlight {
    /// The block (0 = none); written after the other two, cleared first.
    block: AtomicU64,
    /// The heap that owns the block.
    owner: AtomicU64,
    /// The block's requested size, and its class from bit 32.
    size_class: AtomicU64,
}

/// A remote free as its freer recorded it ([`InFlight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) block: u64,
    pub(super) owner: u64,
    pub(super) class: usize,
    pub(super) size: u64,
}

impl InFlight {
    /// Records a remote free about to start.
    pub(super) fn write(&self, r: Record) {
        self.owner.store(r.owner, Ordering::Release);
        crash::point();
        self.size_class.store(r.size | (r.class as u64) << 32, Ordering::Release);
        crash::point();
        self.block.store(r.block, Ordering::Release);
        crash::point();
    }

    /// The remote free under way, if any (and its class names one). Read block first and
    /// again last: a record that changed meanwhile (its thread went on to another free, so it
    /// finished this one) reads as none.
    pub(super) fn read(&self) -> Option<Record> {
        let block = self.block.load(Ordering::Acquire);
        let owner = self.owner.load(Ordering::Acquire);
        let size_class = self.size_class.load(Ordering::Acquire);
        let class = (size_class >> 32) as usize;
        let r = Record { block, owner, class, size: size_class & 0xffff_ffff };
        (block != 0 && class < CLASS_COUNT && self.block.load(Ordering::Acquire) == block).then_some(r)
    }

    /// The block recorded, or 0 (for walks that only need to know whether one is).
    pub(super) fn block(&self) -> u64 {
        self.block.load(Ordering::Acquire)
    }

    /// Ends the record.
    pub(super) fn clear(&self) {
        self.block.store(0, Ordering::Release);
        crash::point();
    }
}

/// Per class: a heap whose thread died in the middle of a remote free of one of our blocks, left
/// for us to settle (0 = none; see [`Shared::settle_orphan`]).
#[repr(C, align(64))]
pub(super) struct Orphans(pub(super) [AtomicU64; CLASS_COUNT]);

/// The process whose threads may hold blocks the heap handed out: its owner token, 0 for none
/// (kept with [`DeadProcessBlocks::Free`] only). A heap its thread gave back keeps naming the
/// process, whose other threads may still hold its blocks: only that process's threads take
/// it again ([`Shared::acquire_heap`]), and when the process dies a reclaim frees its blocks
/// and clears the word. A repair frees the live blocks of a heap only if the process it names
/// is dead (or it names none), not whenever whoever held the heap died: a remote freer that
/// died draining the heap held it, but its blocks are not that freer's.
///
/// [`DeadProcessBlocks::Free`]: super::super::common::DeadProcessBlocks::Free
#[repr(C, align(64))]
pub(super) struct BlocksOf(pub(super) AtomicU64);

/// A heap: what the thread-local allocator keeps in each thread slot.
#[repr(C)]
pub(crate) struct HeapBody {
    pub(super) local: LocalCell,
    pub(super) pending: Pending,
    pub(super) remote: RemoteLists,
    pub(super) in_flight: InFlight,
    pub(super) orphans: Orphans,
    pub(super) blocks_of: BlocksOf,
}

/// The owner word of a dead thread's heap kept until the owner of the block it was freeing has
/// settled that free (no process token has all bits set).
pub(super) const AWAITING_OWNER: u64 = u64::MAX;

/// Who a remote freer of heap index `index` is, in the info word it marks remote
/// ([`remote_word`]): the index plus one, or 0 (unrecorded) past what the field holds.
#[inline]
pub(super) const fn freer_id(index: u32) -> u64 {
    let id = index as u64 + 1;
    if id <= FIELD_MASK {
        id
    } else {
        0
    }
}

// SAFETY: integers, atomics and lists of atomics, all valid as zeroes and for any bits.
unsafe impl SlotBody for HeapBody {}

/// A heap in its slot.
pub(super) type Heap = Slot<HeapBody>;

/// Whether a heap has remote frees to collect or dead freers' frees to settle (orphan slots
/// naming heaps that await it: one its repairer still holds is not ready, and waiting on it
/// would spin).
pub(super) fn awaits_collection(s: &Shared, heap: &Heap) -> bool {
    heap.body.remote.0.iter().any(|l| !l.is_empty())
        || heap.body.orphans.0.iter().any(|o| match o.load(Ordering::Acquire) {
            0 => false,
            f => s.heaps.member(&s.mem, f).is_ok_and(|f| f.owner.load(Ordering::Acquire) == AWAITING_OWNER),
        })
}

/// The sweep threshold for a free list of `count` blocks after a sweep (saturating: the count
/// is shared memory another process may have broken).
pub(super) fn sweep_limit(count: u64, class: usize) -> u64 {
    count.saturating_mul(2).saturating_add(2 * LAYOUTS[class].blocks)
}

impl Shared {
    /// The owner-only part of a heap, for its owner to update.
    ///
    /// # Safety
    /// The caller's thread owns the heap (its TLS says so) or holds it for repair, so no one
    /// else writes this part: its words are updated by plain loads and stores (two writers would
    /// lose updates), and its free lists are popped without compare-and-swap (two poppers would
    /// hand a block out twice). Others may read it meanwhile (see [`OwnerWord`]).
    #[inline]
    pub(super) unsafe fn local<'a>(&self, heap: &'a Heap) -> &'a HeapLocal {
        &heap.body.local.0
    }

    /// A heap's owner-only part, for readers: racing with the owner gives stale figures, which
    /// is why stats are figures and `check` wants a quiet allocator.
    pub(super) fn local_snapshot<'a>(&self, heap: &'a Heap) -> &'a HeapLocal {
        &heap.body.local.0
    }

    /// The bump index of `span`, checked to be a span of `class` of our heap `heap_off` (the span
    /// comes from shared memory: a heap bumping into another heap's span would format and hand
    /// out blocks that heap hands out too).
    ///
    /// # Safety
    /// The caller owns the heap `heap_off` (or holds it for repair): only it moves the index of
    /// its spans (a plain load and store), and the blocks past it are its to format.
    #[inline]
    pub(super) unsafe fn span_bump(&self, heap_off: u64, span: u64, class: usize) -> Result<&AtomicU32> {
        Ok(self.own_span(heap_off, span, class)?.bump())
    }

    // ---- allocation ----

    /// Allocates a block of `class` from the heap at `heap_off`, which the calling thread owns.
    pub(super) fn allocate_small(&self, heap_off: u64, class: usize, size: usize, align: usize) -> Result<u64> {
        // SAFETY: `heap_off` came from this thread's TLS: a heap it owns, checked when taken.
        let heap = unsafe { self.heaps.slot_unchecked(&self.mem, heap_off) };
        // SAFETY: the calling thread owns the heap.
        let popped = self.quick.pop_free(&unsafe { self.local(heap) }.classes[class], class);
        let (block, word) = match popped {
            Some(taken) => taken,
            None => self.refill(heap_off, heap, class, size)?,
        };
        // SAFETY: as above.
        let local = unsafe { self.local(heap) };
        Ok(self.hand_out(heap_off, local, block, word, class, size, align))
    }

    /// Counts a block taken from the heap and makes it live (stamped with the heap when unpadded,
    /// see [`Quick::free`](super::quick::Quick::free)); returns its user offset. `word` is the
    /// block's free info word.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn hand_out(
        &self,
        heap_off: u64,
        local: &HeapLocal,
        block: u64,
        word: u64,
        class: usize,
        size: usize,
        align: usize,
    ) -> u64 {
        let cs = &local.classes[class];
        // SAFETY: `block` lies whole in the arena (checked by `pop_free`, or a block of a span
        // checked whole by `refill`), and its user bytes with their padding (`class_for` counted
        // it) lie in the block.
        unsafe {
            if align > 16 {
                cs.count_allocation(size as u64);
                crash::point();
                return self.pad(block, word, size, align);
            }
            self.quick.hand_out(heap_off, cs, block, word, size)
        }
    }

    /// Hands out a block with its user bytes aligned past 16: the back word just below them, and
    /// zeroes below that down to the header ([`zero_padding`]), among them where an unpadded
    /// block's info word would be.
    ///
    /// # Safety
    /// The block lies whole in the arena, and its class has room for the padding.
    #[cold]
    unsafe fn pad(&self, block: u64, word: u64, size: usize, align: usize) -> u64 {
        let user = user_of(block, SMALL_HEADER, align as u64);
        // SAFETY: the caller's promise: `[block, user)` lies in the block.
        unsafe {
            // No stamp but zero: the quick free and `find_small` take only unpadded blocks.
            self.arena.word_unchecked(block + 8).store(0, Ordering::Relaxed);
            crash::point();
            zero_padding(&self.arena, block, SMALL_HEADER, user);
            crash::point();
            self.arena.word_unchecked(user - 8).store(back_word(user - block, 0), Ordering::Relaxed);
            crash::point();
            self.arena.word_unchecked(block).store(live_from_free(word, size as u64), Ordering::Release);
            crash::point();
        }
        user
    }

    /// The slow path: collect remote frees, take the blocks the owner freed (topped up with fresh
    /// blocks to a cycle's worth, [`CYCLE`]), format a fresh block of the bump span, or take a
    /// new span.
    #[cold]
    #[inline(never)]
    fn refill(&self, heap_off: u64, heap: &Heap, class: usize, size: usize) -> Result<(u64, u64)> {
        // SAFETY: we own the heap.
        if let Some(free) = unsafe { self.local(heap) }.classes[class].free.head() {
            return Err(corrupt(free, "heap free list holds a block that is not free"));
        }
        self.collect(heap_off, heap, class)?;
        // SAFETY: we own the heap.
        let cs = &unsafe { self.local(heap) }.classes[class];
        let freed = cs.freed.get();
        if cs.free.get() == 0 && freed != 0 {
            // The head comes from shared memory: checked before fresh blocks link to it.
            if !self.quick.holds_block(freed, class) {
                return Err(corrupt(freed, "heap freed list starts outside the arena"));
            }
            cs.free.set(cs.freed.take());
            crash::point();
            let short = CYCLE[class].saturating_sub(cs.count());
            let span = cs.bump_span.get();
            if short > 0 && span != 0 {
                // SAFETY: our span.
                let bump = unsafe { self.span_bump(heap_off, span, class) }?;
                self.format(cs, span, bump, class, short)?;
            }
        }
        if let Some(b) = self.quick.pop_free(cs, class) {
            return Ok(b);
        }
        if let Some(free) = cs.free.head() {
            return Err(corrupt(free, "heap free list holds a block that is not free"));
        }
        for _ in 0..2 {
            let span = cs.bump_span.get();
            if span != 0 {
                // SAFETY: our span.
                let bump = unsafe { self.span_bump(heap_off, span, class) }?;
                if self.format(cs, span, bump, class, 1)? == 1 {
                    return self.quick.pop_free(cs, class).ok_or(corrupt(span, "fresh block not free"));
                }
            }
            let span = match self.new_span(heap_off, class, size) {
                Ok(span) => span,
                // Relieving the shortage may have brought blocks of the class back to our list
                // (remote frees collected, a dead freer's free settled): one of them, then,
                // rather than out of memory.
                Err(e) => return self.quick.pop_free(cs, class).ok_or(e),
            };
            cs.bump_span.set(span);
            crash::point();
            cs.set_sweep_at(cs.sweep_at().max(sweep_limit(cs.count(), class)));
            crash::point();
        }
        Err(corrupt(heap_off, "fresh span has no block"))
    }

    /// Formats up to `n` fresh blocks of the bump span `span` (whose bump index is `bump`) free
    /// onto `free`, the lowest on top; returns how many (fewer when the span runs out).
    fn format(&self, cs: &ClassState, span: u64, bump: &AtomicU32, class: usize, n: u64) -> Result<u64> {
        let layout = LAYOUTS[class];
        let first = u64::from(bump.load(Ordering::Relaxed));
        let end = layout.blocks.min(first.saturating_add(n));
        // The index is shared memory: damaged low, the blocks from it on include blocks handed
        // out, which would be formatted free and handed out again. Checked before any is written.
        self.none_in_use(span, class, first..end)?;
        // Pushed from the last block down, so `free` lists them in address order.
        for index in (first..end).rev() {
            let b = span + SPAN_HEADER + index * layout.stride;
            // SAFETY: a block of our span, which lies whole in the arena (checked when the span
            // was taken), past its bump index: no one else reads or writes it.
            unsafe {
                self.arena.word_unchecked(b).store(fresh_word(class, index, 0), Ordering::Release);
                self.arena.word_unchecked(b + 8).store(tagged_list::encode(cs.free.head()), Ordering::Relaxed);
            }
            cs.free.set(b);
            if index == first + (end - first) / 2 {
                crash::point();
            }
        }
        if end <= first {
            return Ok(0);
        }
        bump.store(end as u32, Ordering::Relaxed);
        crash::point();
        cs.set_blocks(cs.blocks().wrapping_add(end - first));
        crash::point();
        Ok(end - first)
    }

    fn new_span(&self, heap_off: u64, class: usize, size: usize) -> Result<u64> {
        let layout = LAYOUTS[class];
        for attempt in 0..3 {
            {
                let mut g = self.fs.lock();
                if let Some(head) = g.alloc(layout.units, TAG_SPAN, class as u32) {
                    crash::point();
                    let span = self.fs.layout().unit_offset(head);
                    // SAFETY: fresh units, ours alone; written before the lock is let go, so a
                    // run whose span has no header means its maker died (see recovery).
                    unsafe { init_span(&self.arena, span, class, heap_off) }?;
                    crash::point();
                    return Ok(span);
                }
            }
            self.relieve_shortage(heap_off, attempt)?;
        }
        Err(Error::OutOfMemory { requested: size as u64, available: self.fs.lock().free_bytes() })
    }

    /// Resizes a live block of our own heap in place (same block, new requested size).
    pub(super) fn resize_in_place(&self, heap_off: u64, block: u64, info: Info, new_size: usize) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        // SAFETY: we own the heap that owns the block.
        let local = unsafe { self.local(heap) };
        let cs = &local.classes[info.class];
        cs.live_bytes.set(cs.live_bytes.get().wrapping_sub(info.size).wrapping_add(new_size as u64));
        crash::point();
        let resized = Info { size: new_size as u64, ..info };
        self.arena.info(block)?.store(resized.pack(), Ordering::Release);
        crash::point();
        Ok(())
    }

    // ---- freeing ----

    /// Frees a live small block `find_small` found; `my_heap` is the calling thread's heap (0 if
    /// it has none).
    pub(super) fn free_small(&self, my_heap: u64, b: LiveSmall<'_>) -> Result<()> {
        let owner = b.header.owner.load(Ordering::Acquire);
        if owner != my_heap || my_heap == 0 {
            return self.free_remote(my_heap, owner, b.block, b.info());
        }
        if let sweep @ Some(_) = self.free_local(my_heap, b) {
            self.sweep_class(my_heap, sweep);
        }
        Ok(())
    }

    /// Frees a live small block of the calling thread's own heap `heap_off` (found by the full
    /// path: padded, or not stamped by the quick path's rules). Returns the class if its list is
    /// due for a sweep.
    pub(super) fn free_local(&self, heap_off: u64, b: LiveSmall<'_>) -> Option<usize> {
        // SAFETY: `heap_off` is this thread's heap (from its TLS), checked when taken.
        let heap = unsafe { self.heaps.slot_unchecked(&self.mem, heap_off) };
        // SAFETY: we own the heap.
        let local = unsafe { self.local(heap) };
        let class = b.class();
        let cs = local.classes.get(class)?;
        self.quick.push_freed(cs, b.block, b.word).then_some(class)
    }

    /// Sweeps the class of the block at `user` that the quick free just gave back to our heap
    /// (which made the class due). See [`sweep_class`](Self::sweep_class).
    #[cold]
    #[inline(never)]
    pub(super) fn sweep_freed(&self, heap_off: u64, user: u64) {
        let word = self.arena.info(user.wrapping_sub(SMALL_HEADER)).map_or(0, |w| w.load(Ordering::Relaxed));
        self.sweep_class(heap_off, Some(word_class(word)).filter(|&c| c < CLASS_COUNT));
    }

    /// Sweeps `class` of our heap after a free made it due. The free is done whatever happens
    /// here, so it answers `Ok` (an error would tell its caller the block is still theirs). A
    /// sweep that finds the lists damaged leaves them as they are: the allocation that reaches
    /// the damage, and `check()`, report it. The next try waits until the lists have doubled
    /// again, so that each free does not walk them anew.
    #[cold]
    #[inline(never)]
    pub(super) fn sweep_class(&self, heap_off: u64, class: Option<usize>) {
        let (Ok(heap), Some(class)) = (self.heaps.slot(&self.mem, heap_off), class) else {
            return;
        };
        // SAFETY: we own the heap.
        let local = unsafe { self.local(heap) };
        if self.sweep(heap_off, local, class, false).is_err() {
            let cs = &local.classes[class];
            cs.set_sweep_at(sweep_limit(cs.count(), class));
        }
    }

    /// A free by a thread that does not own the block's heap: mark it remote and push it on the
    /// owner's remote list. `freer` is the calling thread's heap (0 if it could get none), where
    /// the free is recorded while it is under way.
    #[inline(never)]
    pub(super) fn free_remote(&self, freer: u64, owner: u64, block: u64, info: Info) -> Result<()> {
        let (heap, record) = self.mark_remote(freer, owner, block, info)?;
        heap.body.remote.0[info.class].push(&self.arena, block);
        crash::point();
        if let Some(r) = record {
            r.clear();
        }
        // The push before the owner's word is read, as `release_heap` lets go of the heap
        // before it looks at its lists: one of us sees the other (see `release_heap`).
        fence(Ordering::SeqCst);
        if heap.owner.load(Ordering::Acquire) == 0 {
            // The free is done, so it answers `Ok` (an error would tell its caller the block is
            // still theirs). A drain that finds the owner's heap damaged lets it go as it is,
            // for the allocation or `check()` that reaches the damage to report.
            let _ = self.drain(owner);
        }
        Ok(())
    }

    /// The first half of a remote free: records the block in the freer's heap, then marks it
    /// remote with one compare-and-swap that also names the freer ([`freer_id`]; a freer with
    /// no heap names none, and one whose number is damaged is refused, see
    /// [`heap_number`](Self::heap_number)), then moves its size to its first user word, where
    /// the owner's collection reads it. Nothing is written into the block unless the swap succeeded (the
    /// block is then ours). Returns the owner's heap and the record to clear once the block is
    /// pushed.
    pub(super) fn mark_remote(
        &self,
        freer: u64,
        owner: u64,
        block: u64,
        info: Info,
    ) -> Result<(&Heap, Option<&InFlight>)> {
        // The owner is the span's owner word, shared memory: damaged to bytes that merely look
        // like a heap (a live block's user data), the block would go on a "remote list" there,
        // and the drain that follows would take that "heap", collect and sweep through it (its
        // words the block's user bytes), perhaps giving back a span its real heap still lists.
        let heap = self.heaps.member(&self.mem, owner)?;
        let (record, id) = match freer {
            0 => (None, 0),
            f => {
                let h = self.heaps.slot(&self.mem, f)?;
                match freer_id(self.heap_number(f, h)?) {
                    0 => (None, 0),
                    id => (Some(&h.body.in_flight), id),
                }
            }
        };
        let word = self.arena.info(block)?;
        // Every block has 16 user bytes or more past its header.
        let size_word = self.arena.word(block + SMALL_HEADER)?;
        if let Some(r) = record {
            r.write(Record { block, owner, class: info.class, size: info.size });
        }
        let live = info.pack();
        if word.compare_exchange(live, remote_word(live, id), Ordering::AcqRel, Ordering::Relaxed).is_err() {
            if let Some(r) = record {
                r.clear();
            }
            return Err(invalid(block, "already freed"));
        }
        crash::point();
        size_word.store(info.size, Ordering::Relaxed);
        crash::point();
        Ok((heap, record))
    }

    /// The number of heap `offset` (`h`), held to the heap's place in the table. Blocks record
    /// it (a remote free's info word names its freer by it, a large block's run its heap), and
    /// it is shared memory: damaged to another heap's, the blocks would name that heap, whose
    /// recovery then takes them for its own (a dead thread's remote free of a block, settled by
    /// the block's owner while our free of it is still under way; a dead heap's large blocks,
    /// freed under our thread).
    pub(super) fn heap_number(&self, offset: u64, h: &Heap) -> Result<u32> {
        if u64::from(h.index) != self.heaps.position(&self.mem, offset)? {
            return Err(corrupt(offset, "heap's number is not its place in the table"));
        }
        Ok(h.index)
    }

    /// The requested size of `block`, marked remote by the freer named `id` (`freers` maps
    /// identities to heaps): from the freer's record while it names the block (its thread may
    /// have been killed before writing the size into the block), else from the block's first
    /// user word (written before the push, so before the record was cleared).
    pub(super) fn remote_size(&self, freers: &BTreeMap<u64, u64>, block: u64, id: u64) -> Result<u64> {
        if let Some(&f) = freers.get(&id) {
            let r = self.heaps.slot(&self.mem, f)?.body.in_flight.read();
            if let Some(r) = r.filter(|r| r.block == block) {
                return Ok(r.size);
            }
        }
        Ok(self.arena.word(block + SMALL_HEADER)?.load(Ordering::Acquire))
    }

    /// Every heap by its freer identity ([`freer_id`]), the identity of its place in the table:
    /// remote frees are marked with the heap's number only once it is held to that place
    /// ([`heap_number`](Self::heap_number)), and the number word, shared memory, may be
    /// damaged since. (Taken from the word, a heap damaged to another's number would stand in
    /// for it, and its record's size be counted for that heap's remote free.)
    pub(super) fn freer_heaps(&self) -> Result<BTreeMap<u64, u64>> {
        let mut out = BTreeMap::new();
        // In index order: each heap's place is its position in the list.
        for (place, offset) in self.heaps.offsets(&self.mem)?.into_iter().enumerate() {
            out.insert(u32::try_from(place).map_or(0, freer_id), offset);
        }
        out.remove(&0);
        Ok(out)
    }

    /// Settles the remote free a dead thread of heap `freer` left to us (the owner of the block,
    /// `heap_off`, holding our heap): the block goes on our free list if it is still marked
    /// remote by that thread, since we have taken our remote list since, so it was never pushed
    /// (if it was, collecting it turned it free). Then the freer's heap is let go.
    ///
    /// Only a freer's heap under [`AWAITING_OWNER`] is settled, and we hold it while we do (its
    /// owner word our token): one its repairer or another owner holds is left alone. Held, it
    /// is settled only if our slot still names it and its record names our heap and `class`
    /// (the slot may have been read before it changed); else the slot, if it still names the
    /// heap, is stale and cleared, and the heap goes back to awaiting the owner its record
    /// names. The steps are ordered so that an owner killed between any two leaves a heap that
    /// [`reclaim`](super::recovery) repairs the same way (its owner word names a dead process):
    /// the block is settled before the slot is cleared, the slot before the record, and all
    /// before the heap is let go.
    pub(super) fn settle_orphan(&self, heap_off: u64, heap: &Heap, class: usize, freer: u64) -> Result<()> {
        let slot = &heap.body.orphans.0[class];
        let f = self.heaps.member(&self.mem, freer).ok().filter(|_| freer != heap_off);
        let Some(f) = f else {
            // A damaged slot names no heap (or ours, which cannot await itself: see
            // `hand_over_in_flight`): nothing to settle through it, and it must not stop every
            // collection of the class.
            let _ = slot.compare_exchange(freer, 0, Ordering::AcqRel, Ordering::Relaxed);
            crash::point();
            return Ok(());
        };
        let token = crate::sync::owner_token();
        if f.owner.compare_exchange(AWAITING_OWNER, token, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return Ok(());
        }
        crash::point();
        let record = f.body.in_flight.read().filter(|r| r.owner == heap_off && r.class == class);
        let Some(r) = record.filter(|_| slot.load(Ordering::Acquire) == freer) else {
            let _ = slot.compare_exchange(freer, 0, Ordering::AcqRel, Ordering::Relaxed);
            crash::point();
            return self.await_owner(0, f);
        };
        if let Some((w, word)) = self.orphan_block(heap_off, class, freer, r) {
            w.store(freed_word(word, 0), Ordering::Release);
            crash::point();
            // SAFETY: we hold the heap.
            let cs = &unsafe { self.local(heap) }.classes[class];
            self.arena.store_link(r.block, cs.free.head());
            crash::point();
            cs.free.set(r.block);
            crash::point();
            cs.count_free(r.size);
            crash::point();
        }
        let _ = slot.compare_exchange(freer, 0, Ordering::AcqRel, Ordering::Relaxed);
        crash::point();
        f.body.in_flight.clear();
        f.owner.store(0, Ordering::Release);
        crash::point();
        // As in `release_heap`: let go, then look for what arrived meanwhile.
        fence(Ordering::SeqCst);
        if awaits_collection(self, f) {
            self.drain(freer)?;
        }
        Ok(())
    }

    /// The info word (and its value) of the block of record `r` of the freer's heap `freer`, if
    /// the record names a block of `class` of heap `heap_off` that is still marked remote by that
    /// heap's thread, with a size its class holds.
    ///
    /// The thread is known by the heap's place in the table, not by its number word: that is
    /// shared memory, which may have been damaged while the heap awaited its owner (after its
    /// repair checked it). Damaged to another heap's, it would take a block that heap's thread
    /// is freeing now for this one's, and the owner would settle it (onto its free list, to be
    /// handed out) while that free is still under way.
    pub(super) fn orphan_block(&self, heap_off: u64, class: usize, freer: u64, r: Record) -> Option<(&AtomicU64, u64)> {
        let place = self.heaps.position(&self.mem, freer).ok()?;
        let id = u32::try_from(place).map_or(0, freer_id);
        let block = r.block;
        let w = self.arena.word_at(block).filter(|_| block % 16 == 0)?;
        let word = w.load(Ordering::Acquire);
        let span = span_of_word(block, word);
        let ours = id != 0
            && r.owner == heap_off
            && r.class == class
            && r.size != 0
            && r.size <= LAYOUTS[class].size
            && has_state(word, State::Remote)
            && word_class(word) == class
            && word & FIELD_MASK == id
            && self.arena.class_span(span, class)?.owner.load(Ordering::Relaxed) == heap_off
            && block.wrapping_sub(span + SPAN_HEADER) < LAYOUTS[class].area;
        ours.then_some((w, word))
    }

    /// Returns the spans of `class` whose blocks are all on the free lists of our heap `heap_off`
    /// (keeping the bump span unless `all`), and rebuilds `free` from the blocks of both lists but
    /// theirs (`freed` is then empty). A span is judged by the blocks counted in it, so each must
    /// be a free block of the class in one of our spans, as `check()` wants: a live block, or
    /// another heap's, on a damaged list would make a span look all free and go back with
    /// blocks in use. Such damage is reported, and nothing changes.
    #[cold]
    #[inline(never)]
    fn sweep(&self, heap_off: u64, local: &HeapLocal, class: usize, all: bool) -> Result<()> {
        let cs = &local.classes[class];
        let limit = self.fs.layout().bytes() / 32 + 1;
        let mut blocks = Vec::new();
        for head in cs.lists() {
            tagged_list::walk(&self.arena, head, limit, |b| {
                blocks.push(b);
                Ok(())
            })?;
        }
        // In address order (the rebuilt list hands them out so); a block on both lists is
        // damage that would make its span look all free.
        blocks.sort_unstable();
        if let Some(w) = blocks.windows(2).find(|w| w[0] == w[1]) {
            return Err(corrupt(w[0], "block on a heap's free lists twice"));
        }
        // Per span: its free blocks, and one past the highest index among them.
        let mut per_span: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for &b in &blocks {
            let word = self.arena.info(b)?.load(Ordering::Relaxed);
            let Some(info) = Info::unpack(word).filter(|i| i.state == State::Free && i.class == class && i.size == 0)
            else {
                return Err(corrupt(b, "heap free list holds a block that is not free"));
            };
            let (free, end) = per_span.entry(span_of_word(b, word)).or_default();
            *free += 1;
            *end = (*end).max(info.index + 1);
        }
        let mut released = Vec::new();
        for (&span, &(free, end)) in &per_span {
            let bump = u64::from(self.own_span(heap_off, span, class)?.bump().load(Ordering::Relaxed));
            if free == bump && (all || span != cs.bump_span.get()) {
                // The bump index is shared memory, and the count of free blocks is held to it:
                // damaged low, it would have the span go back with live blocks. The free blocks
                // (distinct, above) are all of those below it only if none lies past it.
                if end > bump {
                    return Err(corrupt(span, "free block past its span's bump index"));
                }
                self.none_carved_past(span, class, bump)?;
                released.push(span);
            }
        }
        let bump_span = cs.bump_span.get();
        if all
            && bump_span != 0
            && !per_span.contains_key(&bump_span)
            && self.own_span(heap_off, bump_span, class)?.bump().load(Ordering::Relaxed) == 0
        {
            self.none_carved_past(bump_span, class, 0)?;
            released.push(bump_span);
        }
        released.sort_unstable();
        let gone = |b: &u64| {
            let word = self.arena.info(*b).map_or(0, |w| w.load(Ordering::Relaxed));
            released.binary_search(&span_of_word(*b, word)).is_ok()
        };
        let kept: Vec<u64> = blocks.iter().copied().filter(|b| !gone(b)).collect();
        for (i, pair) in kept.windows(2).enumerate() {
            self.arena.store_link(pair[0], Some(pair[1]));
            if i == kept.len() / 2 {
                crash::point();
            }
        }
        if let Some(&last) = kept.last() {
            self.arena.store_link(last, None);
            crash::point();
        }
        cs.free.set(kept.first().copied().unwrap_or(0));
        cs.freed.set(0);
        cs.set_blocks(cs.live().wrapping_add(kept.len() as u64));
        cs.set_sweep_at(sweep_limit(kept.len() as u64, class));
        if released.binary_search(&bump_span).is_ok() {
            cs.bump_span.set(0);
        }
        if !blocks.is_empty() || !released.is_empty() {
            // (With neither, the stores above wrote what was there.)
            crash::point();
        }
        for span in released {
            self.release_span(span)?;
            crash::point();
        }
        Ok(())
    }

    /// Checks that no block of `span` (of `class`) from `bump` on has the header of a live or
    /// remotely freed block, before a sweep gives the span back or a repair writes those blocks
    /// free: one there means the bump index was damaged low, under blocks in use. (No such
    /// header is left there otherwise: the span never carved those blocks, and a span goes back
    /// only with all its blocks free, a repaired one with every block's header rewritten.)
    pub(super) fn none_carved_past(&self, span: u64, class: usize, bump: u64) -> Result<()> {
        self.none_in_use(span, class, bump..LAYOUTS[class].blocks)
    }

    /// [`none_carved_past`](Self::none_carved_past) for the blocks of `span` at `indices` alone
    /// (those a refill is about to format).
    fn none_in_use(&self, span: u64, class: usize, indices: core::ops::Range<u64>) -> Result<()> {
        for index in indices {
            let b = block_at(span, class, index);
            let word = self.arena.info(b)?.load(Ordering::Relaxed);
            if Info::unpack(word).is_some_and(|i| i.class == class && i.index == index && i.state != State::Free) {
                return Err(corrupt(b, "block in use past its span's bump index"));
            }
        }
        Ok(())
    }

    /// The header of `span` if it is a span of `class` that our heap `heap_off` owns (a sweep's
    /// test before it gives a span back, a collection's and a repair's for each remote block).
    pub(super) fn own_span(&self, heap_off: u64, span: u64, class: usize) -> Result<&SpanHeader> {
        let h = self.arena.class_span(span, class).ok_or(corrupt(span, "heap lists a span of another class"))?;
        if h.owner.load(Ordering::Relaxed) != heap_off {
            return Err(corrupt(span, "heap lists a block of another heap's span"));
        }
        Ok(h)
    }

    pub(super) fn release_span(&self, span: u64) -> Result<()> {
        // SAFETY: the caller found every block of the span free and took them all off its lists;
        // the free-space lock is held.
        unsafe { super::super::span::release_span(&mut self.fs.lock(), &self.arena, span) }
    }

    /// Moves the remote frees of `class` to the free list (owner only), journaled in the heap's
    /// `pending` word (see the module docs).
    pub(super) fn collect(&self, heap_off: u64, heap: &Heap, class: usize) -> Result<()> {
        // Read before the list is taken: a block the orphan's freer pushed is then in the chain.
        let orphan = heap.body.orphans.0[class].load(Ordering::Acquire);
        self.collect_chain(heap_off, heap, class)?;
        if orphan != 0 {
            self.settle_orphan(heap_off, heap, class, orphan)?;
        }
        Ok(())
    }

    /// Takes the remote list of `class` and puts its blocks on the free list. A block that is no
    /// remote free of ours ends the chain there (its link, and what follows it, cannot be
    /// trusted): the blocks before it are collected all the same, then the damage is reported.
    fn collect_chain(&self, heap_off: u64, heap: &Heap, class: usize) -> Result<()> {
        let pending = &heap.body.pending.0[class];
        let Some(first) = heap.body.remote.0[class].take_recorded(pending) else {
            return Ok(());
        };
        crash::point();
        // SAFETY: the caller owns the heap.
        let local = unsafe { self.local(heap) };
        let limit = self.fs.layout().bytes() / 32 + 1;
        let mut next = Some(first);
        let mut seen = 0u64;
        let mut damage = None;
        let mut batch = [(0u64, 0u64); COLLECT_BATCH];
        while next.is_some() {
            let mut k = 0;
            while let (Some(b), true) = (next, k < COLLECT_BATCH) {
                let (w, word, size) = match self.remote_free_of(heap_off, class, b) {
                    Ok(taken) => taken,
                    Err(e) => {
                        damage = Some(e);
                        next = None;
                        break;
                    }
                };
                next = self.arena.load_link(b).unwrap_or_else(|e| {
                    damage = Some(e);
                    None
                });
                w.store(freed_word(word, 0), Ordering::Release);
                crash::point();
                batch[k] = (b, size);
                k += 1;
            }
            // The batch is free; what follows it still hangs off its links (after damage,
            // nothing: the chain ends at the batch).
            pending.store(tagged_list::encode(next), Ordering::Release);
            crash::point();
            let cs = &local.classes[class];
            for &(b, size) in &batch[..k] {
                self.arena.store_link(b, cs.free.head());
                crash::point();
                cs.free.set(b);
                cs.count_free(size);
                crash::point();
            }
            seen += k as u64;
            if seen > limit {
                return Err(corrupt(first, "remote list longer than its blocks can be (a cycle)"));
            }
        }
        if let Some(e) = damage {
            return Err(e);
        }
        if local.classes[class].sweep_due() {
            self.sweep(heap_off, local, class, false)?;
        }
        Ok(())
    }

    /// The info word (and its value) and the requested size of `b`, a block on the remote list
    /// of `class` of our heap `heap_off`, if it is a remote free of a block of that heap and
    /// class; else the error saying it is not.
    fn remote_free_of(&self, heap_off: u64, class: usize, b: u64) -> Result<(&AtomicU64, u64, u64)> {
        let w = self.arena.info(b)?;
        let word = w.load(Ordering::Acquire);
        let span = span_of_word(b, word);
        // Its freer moved its size here before pushing it (`mark_remote`).
        let size = self.arena.word(b + SMALL_HEADER)?.load(Ordering::Acquire);
        let ours = has_state(word, State::Remote)
            && word_class(word) == class
            && self.own_span(heap_off, span, class).is_ok()
            && b.wrapping_sub(span + SPAN_HEADER) < LAYOUTS[class].area
            && size != 0
            && size <= LAYOUTS[class].size;
        if !ours {
            return Err(corrupt(b, "remote list holds a block that is not a remote free of this heap"));
        }
        Ok((w, word, size))
    }

    /// Collects every remote free of a heap we own and returns every span whose blocks are all
    /// free.
    pub(super) fn trim_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        for class in 0..CLASS_COUNT {
            self.collect(heap_off, heap, class)?;
            // SAFETY: we own the heap.
            self.sweep(heap_off, unsafe { self.local(heap) }, class, true)?;
        }
        Ok(())
    }

    /// Takes a heap for a thread of the process `token` names. With dead processes' blocks
    /// freed, only a heap that names no process or this one ([`BlocksOf`]) will do: one given
    /// back by a thread of another process may hand out blocks that process still holds. (Its
    /// word is read again once the heap is ours: another process's thread may have taken the
    /// heap, and given it back, in between.)
    pub(super) fn acquire_heap(&self, token: u64) -> Result<u64> {
        // Only a way to free a heap slot (see `attach`).
        let relieve = || {
            self.pass_over(self.reclaim_dead(0));
            Ok(())
        };
        if !self.free_dead() {
            return self.heaps.acquire(&self.mem, &self.fs, token, relieve);
        }
        let usable = |h: &Heap| {
            let p = h.body.blocks_of.0.load(Ordering::Acquire);
            p == 0 || p == token
        };
        loop {
            let heap_off = self.heaps.acquire_where(&self.mem, &self.fs, token, usable, relieve)?;
            let heap = self.heaps.slot(&self.mem, heap_off)?;
            match heap.body.blocks_of.0.load(Ordering::Acquire) {
                0 => {
                    heap.body.blocks_of.0.store(token, Ordering::Release);
                    crash::point();
                    return Ok(heap_off);
                }
                p if p == token => return Ok(heap_off),
                _ => self.release_heap(heap_off)?,
            }
        }
    }

    /// Trims a heap we hold and lets it go; repeats while remote frees arrived meanwhile. A
    /// trim that finds the heap damaged still lets it go (then reports the damage): held, it
    /// would stay ours for good, as our process lives, and the remote frees it is sent would
    /// pile up unseen.
    pub(super) fn release_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        let token = heap.owner.load(Ordering::Relaxed);
        loop {
            let trimmed = self.trim_heap(heap_off);
            heap.owner.store(0, Ordering::Release);
            crash::point();
            trimmed?;
            // A remote freer pushes then reads our owner word; a repairer posts a dead freer
            // and stores `AWAITING_OWNER` into its heap, then reads our owner word. Each side
            // stores, then loads what the other stores: with a SeqCst fence between on both
            // sides, at least one of us sees the other's store (Release/Acquire alone lets both
            // loads miss, the store still in a store buffer), so the work is not left behind.
            fence(Ordering::SeqCst);
            let pending = awaits_collection(self, heap);
            if !pending || heap.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_err() {
                return Ok(());
            }
            crash::point();
        }
    }

    /// Collects the remote frees of a heap no thread owns, if no one else is doing it.
    pub(super) fn drain(&self, heap_off: u64) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        let token = crate::sync::owner_token();
        if heap.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            crash::point();
            self.release_heap(heap_off)?;
        }
        Ok(())
    }

    pub(super) fn drain_unowned(&self) -> Result<()> {
        for offset in self.heaps.offsets(&self.mem)? {
            let h = self.heaps.slot(&self.mem, offset)?;
            match h.owner.load(Ordering::Relaxed) {
                0 if awaits_collection(self, h) => self.drain(offset)?,
                AWAITING_OWNER if awaits_collection(self, h) => self.drain_awaiting(0, offset)?,
                _ => {}
            }
        }
        Ok(())
    }
}
