//! Thread caches and the shared lists: the fast paths, and the batch moves between them.
//!
//! A block's state says where it is. Live blocks record their process in the back word. A free
//! block carries a label in its info word: the slot (index + 1) of the cache it last entered;
//! it is then in that cache, in that slot's hands on its way somewhere, or on the shared list.
//! Blocks enter a cache only through their own slot (a free, a refill, a carve), which writes
//! its label first, so a dead slot's blocks are exactly those with its label that are on no
//! shared list ([`recovery`](super::recovery)).
//!
//! Each operation on a cache line writes, in this order: the journal (the block and the live
//! count and bytes after the operation), the cache head, the block's words, the counters.
//! A recovery finds the block in its state before or after the operation: before, the counters
//! were not touched; after, they are set from the journal. Either way they end up exact. The
//! state is read off the slot's label: an allocation took effect unless its block is still
//! free with the slot's label, a free took effect if its block is. (The allocation count is
//! bumped before an allocation starts: a process killed during one may have counted it without
//! making it.) One case stays inexact: a process killed inside an in-place resize, between the
//! block's new size and its bytes counter, whose block another process frees before any
//! recovery. That free keeps no trace of the size it took off, so the live bytes stay off by
//! the resize, and `check` says so; the live count is exact. (A reclaimer never frees such a
//! block first: it waits for the settle, see [`recovery`](super::recovery).)
//!
//! Shared list changes happen under the list's lock and commit with one store of its head; the
//! blocks a refill takes are relabelled while still on the list.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::sync::atomic::compiler_fence;

use crate::crash;
use crate::error::{Error, Result};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::tagged_list::{self, LinkStore};

use super::super::large::TAG_SPAN;
use super::super::size_class::CLASS_COUNT;
use super::super::slots::SlotBody;
use super::super::span::{
    back_word, block_at, corrupt, free_pattern, free_word_mask, freed_word, init_span, invalid, live_word, user_of,
    user_of_live, word_class, zero_padding, Info, State, FIELD_MASK, LAYOUTS, SMALL_HEADER,
};
use super::Shared;

/// Journal operation codes, in the low bits of the journal's block offset.
pub(super) const OP_ALLOC: u64 = 1;
pub(super) const OP_FREE: u64 = 2;
pub(super) const OP_RESIZE: u64 = 3;
const OP_MASK: u64 = 0xf;
/// Cache heads: the first block's offset below bit 48, the count above.
const COUNT_SHIFT: u32 = 48;
const OFFSET_MASK: u64 = (1 << COUNT_SHIFT) - 1;

/// One class in a thread cache: one cache line, written only by the slot's thread.
#[repr(C, align(64))]
pub(super) struct ClassCache {
    /// The cached blocks: first block's offset and count.
    pub(super) head: AtomicU64,
    /// Live blocks this slot counted (allocations minus frees through it; wraps).
    pub(super) live: AtomicU64,
    /// Live bytes this slot counted (wraps).
    pub(super) bytes: AtomicU64,
    /// Allocations through this slot.
    pub(super) allocations: AtomicU64,
    /// The operation in progress: block offset and operation code (and, for a resize, the new
    /// size above bit 48).
    pub(super) journal: AtomicU64,
    /// The live count and bytes once that operation is done.
    pub(super) j_live: AtomicU64,
    pub(super) j_bytes: AtomicU64,
    /// After a flush that found the cache damaged: the count below which frees do not try again
    /// (0 = none). (A word that was padding: 0 in slots an older build made.)
    pub(super) retry_at: AtomicU64,
}

/// A thread cache: what the page allocator keeps in each thread slot.
#[repr(C)]
pub(crate) struct CacheBody {
    pub(super) classes: [ClassCache; CLASS_COUNT],
}

// SAFETY: atomics only, valid as zeroes and for any bits.
unsafe impl SlotBody for CacheBody {}

/// The first block and count of a cache head word.
#[inline]
pub(super) fn unpack_head(head: u64) -> (u64, u64) {
    (head & OFFSET_MASK, head >> COUNT_SHIFT)
}

#[inline]
fn pack_head(first: u64, count: u64) -> u64 {
    first | (count << COUNT_SHIFT)
}

/// The block, operation code and (for a resize) new size of a journal word.
pub(super) fn unpack_journal(journal: u64) -> (u64, u64, u64) {
    (journal & OFFSET_MASK & !OP_MASK, journal & OP_MASK, journal >> COUNT_SHIFT)
}

impl ClassCache {
    /// Writes the journal for an operation on `block` (`op`, and the size for a resize), before
    /// anything else changes. The journal word is cleared while the values change, so that a
    /// recovery never pairs a block with the values of another operation.
    #[inline]
    pub(super) fn journal(&self, block: u64, op: u64, live: u64, bytes: u64) {
        self.journal.store(0, Ordering::Relaxed);
        crash::point();
        compiler_fence(Ordering::Release);
        self.j_live.store(live, Ordering::Relaxed);
        crash::point();
        self.j_bytes.store(bytes, Ordering::Relaxed);
        crash::point();
        compiler_fence(Ordering::Release);
        self.journal.store(block | op, Ordering::Relaxed);
        crash::point();
        compiler_fence(Ordering::Release);
    }

    /// Writes the counters (the journal's values), after the block's state changed.
    #[inline]
    fn settle(&self, live: u64, bytes: u64) {
        compiler_fence(Ordering::Release);
        self.live.store(live, Ordering::Relaxed);
        crash::point();
        self.bytes.store(bytes, Ordering::Relaxed);
        crash::point();
    }
}

/// The label of the slot numbered `index`: the index plus one. The label goes into info words'
/// 22-bit field: one past what the field holds would spill into their class and distance bits,
/// so it saturates (it then names no slot of its own; a table that long would have four million
/// slots). Saturating, not masking: a masked index would take a real slot's label, and that
/// slot's owner dying would have recovery move blocks the broken slot still caches to the shared
/// list, to be handed out twice.
#[inline]
pub(super) fn label_of(index: u64) -> u64 {
    index.saturating_add(1).min(FIELD_MASK)
}

/// A thread cache this process holds: its slot's offset, and the label the cache writes into
/// the blocks that enter it. The label comes from the slot's place in the table, once, when the
/// slot is taken, and is kept here, in process memory: read from the slot's `index` word (shared
/// memory) on each operation, a peer that broke that word could make the cache label blocks with
/// another slot's number, whose recovery would then take them from under it. (`check()` and the
/// recovery still hold the word to the slot's place.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CacheSlot {
    pub(super) offset: u64,
    pub(super) label: u64,
}

impl Shared {
    /// The slot at `offset` (which this process holds) as a [`CacheSlot`].
    pub(super) fn cache_slot(&self, offset: u64) -> Result<CacheSlot> {
        let place = self.slots.position(&self.mem, offset)?;
        Ok(CacheSlot { offset, label: label_of(place) })
    }

    /// The class `class` line of the cache in `slot` (which this thread holds), and its label.
    #[inline]
    pub(super) fn cache(&self, slot: CacheSlot, class: usize) -> (&ClassCache, u64) {
        // SAFETY: `slot` is the calling thread's slot (its registration or the fallback), checked
        // when it was taken.
        let s = unsafe { self.slots.slot_unchecked(&self.mem, slot.offset) };
        (&s.body.classes[class], slot.label)
    }

    /// The first cached block of `class`: its offset, free info word, and the head word once it
    /// is taken. `None` when the cache is empty or its first block is not a free block of the
    /// class with our label.
    #[inline]
    fn peek_cached(&self, c: &ClassCache, class: usize, label: u64) -> Option<(u64, u64, u64)> {
        let (block, count) = unpack_head(c.head.load(Ordering::Relaxed));
        if block % 16 != 0 || !self.arena.contains(block, LAYOUTS[class].stride) {
            return None;
        }
        // SAFETY: the whole block lies in the arena (checked just above), 16-aligned.
        let (info, link) = unsafe { (self.arena.word_unchecked(block), self.arena.word_unchecked(block + 8)) };
        let word = info.load(Ordering::Relaxed);
        if word & free_word_mask() != free_pattern(class, label) {
            return None;
        }
        let next = tagged_list::decode(link.load(Ordering::Relaxed)).unwrap_or(0) & OFFSET_MASK;
        Some((block, word, pack_head(next, count.wrapping_sub(1))))
    }

    /// Allocates a block of `class` from the cache in `slot` if it holds one (the quick path:
    /// it calls nothing, so it keeps no registers across calls).
    #[inline]
    pub(super) fn allocate_quick(&self, slot: CacheSlot, class: usize, size: usize, align: usize) -> Option<u64> {
        let (c, label) = self.cache(slot, class);
        let (block, word, rest) = self.peek_cached(c, class, label)?;
        Some(self.hand_out(c, block, word, rest, size, align))
    }

    /// Allocates a block of `class` through the cache in `slot`.
    pub(super) fn allocate_small(&self, slot: CacheSlot, class: usize, size: usize, align: usize) -> Result<u64> {
        let (c, label) = self.cache(slot, class);
        let (block, word, rest) = match self.peek_cached(c, class, label) {
            Some(taken) => taken,
            None => self.refill(slot, class)?,
        };
        Ok(self.hand_out(c, block, word, rest, size, align))
    }

    /// Takes the first cached block (`rest` is the head word without it) and makes it live;
    /// returns its user offset.
    #[inline]
    fn hand_out(&self, c: &ClassCache, block: u64, word: u64, rest: u64, size: usize, align: usize) -> u64 {
        let live = c.live.load(Ordering::Relaxed).wrapping_add(1);
        let bytes = c.bytes.load(Ordering::Relaxed).wrapping_add(size as u64);
        c.allocations.store(c.allocations.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        crash::point();
        c.journal(block, OP_ALLOC, live, bytes);
        c.head.store(rest, Ordering::Relaxed);
        crash::point();
        compiler_fence(Ordering::Release);
        let user = if align <= 16 { block + SMALL_HEADER } else { user_of(block, SMALL_HEADER, align as u64) };
        // SAFETY: the whole block lies in the arena (checked by `peek_cached`), and the user
        // bytes with their padding (`class_for` counted it) lie in the block; for a padded
        // block `user - 16 >= block + 16`.
        unsafe {
            if user != block + SMALL_HEADER {
                // The second word (the stale link): zero, so `find_small` does not take the
                // offset past the info word for an unpadded block; and the padding (where an
                // unpadded block's info word would be among it): zeroes, see `zero_padding`.
                self.arena.word_unchecked(block + 8).store(0, Ordering::Relaxed);
                crash::point();
                zero_padding(&self.arena, block, SMALL_HEADER, user);
                crash::point();
            }
            self.arena.word_unchecked(user - 8).store(back_word(user - block, self.stamp()), Ordering::Relaxed);
            crash::point();
            compiler_fence(Ordering::Release);
            self.arena.word_unchecked(block).store(live_word(word, size as u64), Ordering::Release);
            crash::point();
        }
        c.settle(live, bytes);
        user
    }

    /// Frees a live small block (found by `find_small`, with info word `word`) into the cache
    /// in `slot`.
    pub(super) fn free_small(&self, slot: CacheSlot, block: u64, word: u64) -> Result<()> {
        let over = self.free_quick(slot, block, word);
        self.flush_class(slot, over);
        Ok(())
    }

    /// Frees a live small block someone else may be freeing at the same time (a dead process's,
    /// found by a scan with its user bytes at `user` and back word `back`): the block is claimed
    /// with a CAS, and nothing happens if that fails, or if the block's user offset or back word
    /// changed since the scan (it was freed and handed out again, with the same info word).
    /// Reclaimers scan and claim under the free-space lock, so only a process that frees a dead
    /// process's block itself (which [`DeadProcessBlocks::Free`](super::DeadProcessBlocks) rules
    /// out) can do that in between; the checks narrow what such a free can break.
    pub(super) fn free_claimed(&self, slot: CacheSlot, block: u64, info: Info, user: u64, back: u64) -> Result<()> {
        if user_of_live(&self.arena, block, info.class).ok() != Some(user)
            || self.arena.word(user - 8)?.load(Ordering::Acquire) != back
        {
            return Err(invalid(block, "no longer the block the scan found"));
        }
        let class = info.class;
        let (c, label) = self.cache(slot, class);
        let (first, count) = unpack_head(c.head.load(Ordering::Relaxed));
        let live = c.live.load(Ordering::Relaxed).wrapping_sub(1);
        let bytes = c.bytes.load(Ordering::Relaxed).wrapping_sub(info.size);
        c.journal(block, OP_FREE, live, bytes);
        let freed = freed_word(info.pack(), label);
        if self.arena.info(block)?.compare_exchange(info.pack(), freed, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            c.journal.store(0, Ordering::Relaxed);
            crash::point();
            return Err(invalid(block, "already freed"));
        }
        crash::point();
        self.arena.store_link(block, (first != 0).then_some(first));
        crash::point();
        compiler_fence(Ordering::Release);
        c.head.store(pack_head(block, count + 1), Ordering::Relaxed);
        crash::point();
        c.settle(live, bytes);
        self.flush_class(slot, (count + 1 > self.limits[class] as u64).then_some(class));
        Ok(())
    }

    /// Frees a live small block into the cache in `slot` (the quick path: it calls nothing).
    /// Returns the class if the cache is now over its limit.
    ///
    /// The store of the free word does not compare first (a compare on this path would cost
    /// every free). So a double free made by two threads at the same instant can put the block
    /// in both their caches, and it may then be handed out twice, as in the thread-local
    /// allocator's quick free. A double free that is not simultaneous is refused: `find_small`
    /// then sees the block free.
    #[inline]
    pub(super) fn free_quick(&self, slot: CacheSlot, block: u64, live_word: u64) -> Option<usize> {
        let class = word_class(live_word);
        let (c, label) = self.cache(slot, class);
        let (first, count) = unpack_head(c.head.load(Ordering::Relaxed));
        let live = c.live.load(Ordering::Relaxed).wrapping_sub(1);
        let bytes = c.bytes.load(Ordering::Relaxed).wrapping_sub(live_word & FIELD_MASK);
        c.journal(block, OP_FREE, live, bytes);
        // SAFETY: `find_small` checked the block lies in the arena.
        unsafe {
            self.arena.word_unchecked(block).store(freed_word(live_word, label), Ordering::Release);
            crash::point();
            self.arena
                .word_unchecked(block + 8)
                .store(tagged_list::encode((first != 0).then_some(first)), Ordering::Relaxed);
            crash::point();
        }
        compiler_fence(Ordering::Release);
        c.head.store(pack_head(block, count + 1), Ordering::Relaxed);
        crash::point();
        c.settle(live, bytes);
        (count + 1 > self.limits[class] as u64).then_some(class)
    }

    /// Flushes the cache of `class` in `slot`, over its limit after a free. The free is done
    /// whatever happens here, so its caller answers `Ok` (an error would tell the caller the
    /// block is still theirs). A flush that finds the cache or the shared list damaged leaves
    /// the damage for the allocation that reaches it, and `check()`, to report.
    #[inline]
    pub(super) fn flush_class(&self, slot: CacheSlot, class: Option<usize>) {
        if let Some(class) = class {
            self.flush_after_free(slot, class);
        }
    }

    /// A flush that fails puts the next try off until the cache has doubled, as the thread-local
    /// allocator's sweep does, so that each free does not walk a damaged list anew.
    #[cold]
    #[inline(never)]
    fn flush_after_free(&self, slot: CacheSlot, class: usize) {
        let (c, label) = self.cache(slot, class);
        let (_, count) = unpack_head(c.head.load(Ordering::Relaxed));
        let retry_at = c.retry_at.load(Ordering::Relaxed);
        if count < retry_at {
            return;
        }
        let next = match self.flush(c, class, label) {
            Ok(()) => 0,
            Err(_) => count.saturating_mul(2),
        };
        if next != retry_at {
            c.retry_at.store(next, Ordering::Relaxed);
        }
    }

    /// Gives a live small block a new requested size (it stays where it is).
    pub(super) fn resize_in_place(&self, slot: CacheSlot, block: u64, info: Info, new_size: usize) -> Result<()> {
        let (c, _) = self.cache(slot, info.class);
        let live = c.live.load(Ordering::Relaxed);
        let bytes = c.bytes.load(Ordering::Relaxed).wrapping_sub(info.size).wrapping_add(new_size as u64);
        c.journal(block, OP_RESIZE | ((new_size as u64) << COUNT_SHIFT), live, bytes);
        let resized = Info { size: new_size as u64, ..info };
        self.arena.info(block)?.store(resized.pack(), Ordering::Release);
        crash::point();
        compiler_fence(Ordering::Release);
        c.bytes.store(bytes, Ordering::Relaxed);
        crash::point();
        Ok(())
    }

    /// The slow path of an allocation: fill the empty cache from the shared list, or from a new
    /// span; when space is short, trim and reclaim first. Returns what `peek_cached` would.
    #[cold]
    #[inline(never)]
    fn refill(&self, slot: CacheSlot, class: usize) -> Result<(u64, u64, u64)> {
        let (c, label) = self.cache(slot, class);
        let (first, _) = unpack_head(c.head.load(Ordering::Relaxed));
        if first != 0 {
            return Err(corrupt(first, "thread cache holds a block that is not free"));
        }
        // Empty (its count, if not 0, was damaged: the refill sets it anew), so a put-off
        // flush (`flush_after_free`) is over: the refilled cache flushes at its limit again.
        if c.retry_at.load(Ordering::Relaxed) != 0 {
            c.retry_at.store(0, Ordering::Relaxed);
        }
        for attempt in 0..3 {
            if self.take_from_list(c, class, label)? || self.carve(c, class, label)? {
                return self
                    .peek_cached(c, class, label)
                    .ok_or(corrupt(slot.offset, "thread cache refilled with a bad block"));
            }
            self.relieve_shortage(slot, attempt)?;
            // The relief may have freed blocks into this very cache (a dead process's, see
            // `free_dead_blocks`): they are handed out, not written over by the next try (they
            // would be free, ours, and on no list: lost until our process dies).
            if unpack_head(c.head.load(Ordering::Relaxed)).0 != 0 {
                return self
                    .peek_cached(c, class, label)
                    .ok_or(corrupt(slot.offset, "thread cache holds a block that is not free"));
            }
        }
        Err(Error::OutOfMemory { requested: LAYOUTS[class].size, available: self.fs.lock().free_bytes() })
    }

    /// How many blocks a refill takes or a flush leaves.
    fn batch(&self, class: usize) -> u64 {
        (self.limits[class] as u64 / 2).max(1)
    }

    /// Moves up to a batch of blocks from the shared list into the (empty) cache `c`; returns
    /// whether there were any. They are relabelled while still on the list, under its lock.
    fn take_from_list(&self, c: &ClassCache, class: usize, label: u64) -> Result<bool> {
        let batch = self.batch(class);
        let stride = LAYOUTS[class].stride;
        let mut list = self.list(class).lock_or_recover(|_| {});
        let first = *list;
        if first == 0 {
            return Ok(false);
        }
        let (mut at, mut last, mut n) = (Some(first), first, 0u64);
        while let (Some(b), true) = (at, n < batch) {
            let w = self.arena.word(b).ok().filter(|_| b % 16 == 0 && self.arena.contains(b, stride));
            let w = w.ok_or(corrupt(b, "shared list links outside the arena"))?;
            let word = w.load(Ordering::Relaxed);
            if word & free_word_mask() & !FIELD_MASK != free_pattern(class, 0) {
                return Err(corrupt(b, "shared list holds a block that is not free"));
            }
            w.store((word & !FIELD_MASK) | label, Ordering::Relaxed);
            crash::point();
            at = self.arena.load_link(b)?;
            last = b;
            n += 1;
        }
        compiler_fence(Ordering::Release);
        *list = at.unwrap_or(0);
        crash::point();
        drop(list);
        self.arena.store_link(last, None);
        crash::point();
        c.head.store(pack_head(first, n), Ordering::Relaxed);
        crash::point();
        Ok(true)
    }

    /// Carves a new span for `class`: all its blocks formatted free with our label (under the
    /// free-space lock, span header last, so a span with a header is whole), a batch into the
    /// cache `c`, the rest onto the shared list. Returns whether there was room.
    fn carve(&self, c: &ClassCache, class: usize, label: u64) -> Result<bool> {
        let layout = LAYOUTS[class];
        let span = {
            let mut g = self.fs.lock();
            let Some(head) = g.alloc(layout.units, TAG_SPAN, class as u32) else {
                return Ok(false);
            };
            crash::point();
            let span = self.fs.layout().unit_offset(head);
            for index in 0..layout.blocks {
                let b = block_at(span, class, index);
                let next = (index + 1 < layout.blocks).then(|| block_at(span, class, index + 1));
                self.arena
                    .word(b)?
                    .store(Info { state: State::Free, class, index, size: label }.pack(), Ordering::Relaxed);
                self.arena.store_link(b, next);
                if index == layout.blocks / 2 {
                    crash::point();
                }
            }
            // SAFETY: the units were just taken from the free-space manager: ours alone.
            unsafe { init_span(&self.arena, span, class, 0) }?;
            crash::point();
            span
        };
        let batch = self.batch(class).min(layout.blocks);
        if batch < layout.blocks {
            self.push_chain(class, block_at(span, class, batch), block_at(span, class, layout.blocks - 1))?;
            crash::point();
        }
        self.arena.store_link(block_at(span, class, batch - 1), None);
        crash::point();
        c.head.store(pack_head(block_at(span, class, 0), batch), Ordering::Relaxed);
        crash::point();
        Ok(true)
    }

    /// Pushes the chain `first -> ... -> last` (linked, ours) onto the class's shared list.
    pub(super) fn push_chain(&self, class: usize, first: u64, last: u64) -> Result<()> {
        let mut list = self.list(class).lock_or_recover(|_| {});
        self.arena.store_link(last, (*list != 0).then_some(*list));
        crash::point();
        compiler_fence(Ordering::Release);
        *list = first;
        crash::point();
        Ok(())
    }

    /// The cache of `class` (with `label`) is over its limit: keep half, push the rest to the
    /// shared list.
    #[cold]
    #[inline(never)]
    fn flush(&self, c: &ClassCache, class: usize, label: u64) -> Result<()> {
        let keep = self.batch(class);
        let (first, count) = unpack_head(c.head.load(Ordering::Relaxed));
        self.flush_part(c, class, label, first, count, count.saturating_sub(keep))
    }

    /// Moves the first `n` of the `count` blocks cached from `first` (in the cache with `label`)
    /// to the shared list. Each must be a free block of the cache: the list is every process's,
    /// and a block that is not (a stray write, or one two threads freed at the same instant
    /// that the other cache handed out since) would fail every refill that meets it there. Such
    /// a cache is left as it is, for its own allocations to report (until its slot is given
    /// back: see [`Shared::give_back_caches`]).
    fn flush_part(&self, c: &ClassCache, class: usize, label: u64, first: u64, count: u64, n: u64) -> Result<()> {
        if n == 0 || first == 0 {
            return Ok(());
        }
        let ours = |b: u64| {
            let word = self.arena.word(b).map(|w| w.load(Ordering::Relaxed));
            if word.is_ok_and(|w| w & free_word_mask() == free_pattern(class, label)) {
                Ok(b)
            } else {
                Err(corrupt(b, "thread cache holds a block that is not free"))
            }
        };
        let mut last = ours(first)?;
        for _ in 1..n {
            last = self.arena.load_link(last)?.ok_or(corrupt(last, "thread cache shorter than its count"))?;
            ours(last)?;
        }
        let rest = self.arena.load_link(last)?.unwrap_or(0);
        c.head.store(pack_head(rest, count - n), Ordering::Relaxed);
        crash::point();
        compiler_fence(Ordering::Release);
        self.push_chain(class, first, last)
    }

    /// Moves every block of the cache in `slot` to the shared lists. A class whose cache is
    /// damaged does not stop the others (their blocks would stay in the cache of a slot that
    /// may be given back next, on no list); the first damage is reported.
    pub(super) fn flush_all(&self, slot: CacheSlot) -> Result<()> {
        let mut failed = None;
        for class in 0..CLASS_COUNT {
            let (c, label) = self.cache(slot, class);
            let (first, count) = unpack_head(c.head.load(Ordering::Relaxed));
            if let Err(e) = self.flush_part(c, class, label, first, count, count) {
                failed.get_or_insert(e);
                continue;
            }
            // The cache is empty and whole: a put-off retry (`flush_after_free`) is over.
            if c.retry_at.load(Ordering::Relaxed) != 0 {
                c.retry_at.store(0, Ordering::Relaxed);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Empties the cache in `slot` as the slot is given back: every class to the shared lists
    /// (see [`Shared::flush_all`]), then any class a flush found damaged is taken off the slot.
    /// Left in place, its next owner (a thread that takes the slot) would fail every refill of
    /// that class, with nothing that mends it. Of such a class, the blocks before the first one
    /// that is not a free block of the cache go to the shared list; that block and those past it
    /// (its link may be anything) stay where they are, on no list, for `check()` to report, and
    /// for the recovery to list should a later owner of the slot die (they still carry its label).
    /// The first damage is reported.
    pub(super) fn give_back_caches(&self, slot: CacheSlot) -> Result<()> {
        let mut failed = self.flush_all(slot).err();
        for class in 0..CLASS_COUNT {
            let (c, label) = self.cache(slot, class);
            let (first, count) = unpack_head(c.head.load(Ordering::Relaxed));
            if first != 0 {
                let e = self.detach_damaged(c, class, label, first, count);
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Takes the damaged cache `c` (of `class`, with `label`; `count` blocks cached from
    /// `first`) off its slot: see [`Shared::give_back_caches`]. Returns the damage.
    #[cold]
    fn detach_damaged(&self, c: &ClassCache, class: usize, label: u64, first: u64, count: u64) -> Error {
        let mut good = Vec::new();
        let mut seen = BTreeSet::new();
        let mut at = Some(first);
        let damage = loop {
            let Some(b) = at else {
                break corrupt(first, "thread cache shorter than its count");
            };
            if good.len() as u64 == count {
                break corrupt(first, "thread cache longer than its count");
            }
            let word = self.arena.word(b).map(|w| w.load(Ordering::Relaxed));
            if !word.is_ok_and(|w| w & free_word_mask() == free_pattern(class, label)) || !seen.insert(b) {
                break corrupt(b, "thread cache holds a block that is not free");
            }
            good.push(b);
            match self.arena.load_link(b) {
                Ok(next) => at = next,
                Err(e) => break e,
            }
        };
        c.head.store(0, Ordering::Relaxed);
        crash::point();
        c.retry_at.store(0, Ordering::Relaxed);
        if let (Some(&first), Some(&last)) = (good.first(), good.last()) {
            compiler_fence(Ordering::Release);
            // The chain's links are as the walk read them; `push_chain` ends it at the list.
            if let Err(e) = self.push_chain(class, first, last) {
                return e;
            }
        }
        damage
    }
}
