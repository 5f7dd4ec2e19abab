//! A heap's record and its owner's paths: allocation, local and remote frees, bulk collection
//! of remote frees, span lists, trimming and release.
//!
//! Collecting a remote list is journaled so that an owner killed at any instruction leaves
//! every block findable: the owner writes the list's first element to the heap's `pending`
//! word before taking the list ([`TaggedOffsetList::take_recorded`]); it then turns a batch of
//! the chain free (links untouched), moves `pending` past the batch, and only then files the
//! batch into its spans (which reuses the links). At every instant the part of the chain not
//! yet filed hangs off `pending` with its links intact, so [`recovery`](super::recovery) can
//! finish the job.

use core::cell::UnsafeCell;

use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::tagged_list::{self, LinkStore, TaggedOffsetList};

use super::super::free_space::UNIT;
use super::super::large::TAG_SPAN;
use super::super::size_class::CLASS_COUNT;
use super::super::slots::{Slot, SlotBody};
use super::super::span::{
    back_word, corrupt, free_pattern, free_word_mask, freed_word, fresh_word, has_state, init_span, invalid, live_word,
    span_of_word, user_of, word_class, Info, LiveSmall, SpanLocal, State, FIELD_MASK, LAYOUTS, SMALL_HEADER,
    SPAN_HEADER,
};
use super::Shared;

/// Where a heap keeps a span (its `list` field): the class's current span; on the class's stack
/// of spans with free blocks; or full (on no list: it was used up as the current span, and goes
/// on the stack when a block comes back).
pub(super) const LIST_CURRENT: u32 = 1;
pub(super) const LIST_AVAIL: u32 = 2;
pub(super) const LIST_FULL: u32 = 3;
/// Empty spans a heap keeps on a class's stack (so random sizes do not make it give spans back
/// and take them again through the free-space lock); more are returned.
const KEEP_EMPTY: u32 = 1;

/// How many remote frees are turned free before `pending` moves past them.
const COLLECT_BATCH: usize = 32;

/// One class's state in a heap: the current span and counters, written by the owner only.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct ClassState {
    pub(super) current: u64,
    pub(super) live: u64,
    pub(super) live_bytes: u64,
    pub(super) allocations: u64,
}

/// The owner-only part of a heap.
#[repr(C)]
pub(super) struct HeapLocal {
    pub(super) classes: [ClassState; CLASS_COUNT],
    /// Per class: the stack of spans with free blocks (linked through their `next`).
    pub(super) avail: [u64; CLASS_COUNT],
    /// Per class: how many spans on the stack are empty.
    pub(super) empty: [u32; CLASS_COUNT],
}

#[repr(C, align(64))]
pub(super) struct LocalCell(UnsafeCell<HeapLocal>);

/// Per class: the encoded first element of the remote chain being collected (0 = none).
#[repr(C, align(64))]
pub(super) struct Pending(pub(super) [AtomicU64; CLASS_COUNT]);

/// Per class: blocks other threads freed, waiting for the owner.
#[repr(C, align(64))]
pub(super) struct RemoteLists(pub(super) [TaggedOffsetList; CLASS_COUNT]);

/// A heap: what the thread-local allocator keeps in each thread slot.
#[repr(C)]
pub(crate) struct HeapBody {
    pub(super) local: LocalCell,
    pub(super) pending: Pending,
    pub(super) remote: RemoteLists,
}

// SAFETY: integers, atomics and lists of atomics, all valid as zeroes and for any bits.
unsafe impl SlotBody for HeapBody {}

/// A heap in its slot.
pub(super) type Heap = Slot<HeapBody>;

impl Shared {
    /// The owner-only part of a heap.
    ///
    /// # Safety
    /// The caller's thread owns the heap (its TLS says so) or holds it for repair, so no one
    /// else touches this part while the reference lives.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    pub(super) unsafe fn local<'a>(&self, heap: &'a Heap) -> &'a mut HeapLocal {
        // SAFETY: the caller's promise: exclusive access.
        unsafe { &mut *heap.body.local.0.get() }
    }

    /// A copy of a heap's owner-only part, for readers while the allocator is quiet.
    pub(super) fn local_snapshot<'a>(&self, heap: &'a Heap) -> &'a HeapLocal {
        // SAFETY: plain integers in bounds; racing with the owner only gives stale figures,
        // and callers (stats, check) document that they want a quiet allocator.
        unsafe { &*heap.body.local.0.get() }
    }

    /// The span header at `span` with its owner-only part.
    ///
    /// # Safety
    /// The caller owns the heap that owns the span (or holds a heap being repaired).
    #[allow(clippy::mut_from_ref)]
    #[inline]
    pub(super) unsafe fn span_local(&self, span: u64) -> Result<&mut SpanLocal> {
        let h = self.arena.span(span)?;
        // SAFETY: the caller's promise: the span's owner-only part is ours alone.
        Ok(unsafe { &mut *h.local() })
    }

    // ---- allocation ----

    /// Allocates a block of `class` from the heap at `heap_off`, which the calling thread owns.
    #[inline]
    pub(super) fn allocate_small(&self, heap_off: u64, class: usize, size: usize, align: usize) -> Result<u64> {
        // SAFETY: `heap_off` came from this thread's TLS: a heap it owns, checked when taken.
        let heap = unsafe { self.heaps.slot_unchecked(&self.mem, heap_off) };
        // SAFETY: the calling thread owns the heap.
        let local = unsafe { self.local(heap) };
        let (block, word) = match self.take_fast(local.classes[class].current, class) {
            Some(taken) => taken,
            None => self.refill(heap_off, heap, class, size)?,
        };
        let cs = &mut local.classes[class];
        cs.live = cs.live.wrapping_add(1);
        cs.live_bytes = cs.live_bytes.wrapping_add(size as u64);
        cs.allocations = cs.allocations.wrapping_add(1);
        // SAFETY: `block` lies in a span checked whole by `take_fast`/`refill`, and the block's
        // user bytes with their padding (`class_for` counted it) lie in the block.
        unsafe {
            if align > 16 {
                return Ok(self.pad(block, word, size, align));
            }
            self.arena.word_unchecked(block).store(live_word(word, size as u64), Ordering::Release);
        }
        Ok(block + SMALL_HEADER)
    }

    /// Hands out a block with its user bytes aligned past 16: the back word just below them, and
    /// a zero below that, where an unpadded block's info word would be.
    ///
    /// # Safety
    /// The block lies in a checked span, and its class has room for the padding.
    #[cold]
    unsafe fn pad(&self, block: u64, word: u64, size: usize, align: usize) -> u64 {
        let user = user_of(block, SMALL_HEADER, align as u64);
        // SAFETY: the caller's promise; `user - 16 >= block + 16` as `user > block + 16`.
        unsafe {
            self.arena.word_unchecked(user - 16).store(0, Ordering::Relaxed);
            self.arena.word_unchecked(user - 8).store(back_word(user - block, 0), Ordering::Relaxed);
            self.arena.word_unchecked(block).store(live_word(word, size as u64), Ordering::Release);
        }
        user
    }

    /// A block (and its free info word) from `span`'s local free list or its unused tail.
    /// `None` when the span is empty, is not a span of the class, or its list is damaged.
    #[inline]
    fn take_fast(&self, span: u64, class: usize) -> Option<(u64, u64)> {
        let h = self.arena.span_in_bounds(span, class)?;
        // SAFETY: `span` is our heap's current span (or one we are filing): ours alone.
        let s = unsafe { &mut *h.local() };
        let layout = &LAYOUTS[class];
        let taken = if s.free != 0 {
            let block = tagged_list::decode(s.free)?;
            if block.wrapping_sub(span + SPAN_HEADER) >= layout.area || block % 16 != 0 {
                return None;
            }
            // SAFETY: inside the span `class_span` checked whole; 16-aligned.
            let (info, link) = unsafe { (self.arena.word_unchecked(block), self.arena.word_unchecked(block + 8)) };
            let word = info.load(Ordering::Relaxed);
            if word & free_word_mask() != free_pattern(class, 0) {
                return None;
            }
            s.free = link.load(Ordering::Relaxed);
            (block, word)
        } else if (s.bump as u64) < layout.blocks {
            let index = s.bump as u64;
            s.bump += 1;
            (span + SPAN_HEADER + index * layout.stride, fresh_word(class, index, 0))
        } else {
            return None;
        };
        s.used += 1;
        Some(taken)
    }

    /// [`take_fast`](Self::take_fast) with the reason when it finds nothing: `Ok(None)` for an
    /// empty span, an error for a damaged one.
    fn take_from(&self, span: u64, class: usize) -> Result<Option<(u64, u64)>> {
        if span == 0 {
            return Ok(None);
        }
        let h = self.arena.class_span(span, class).ok_or(corrupt(span, "heap lists a span of another class"))?;
        let s = h.local_snapshot();
        if s.free == 0 && s.bump as u64 >= LAYOUTS[class].blocks {
            return Ok(None);
        }
        self.take_fast(span, class).map(Some).ok_or(corrupt(span, "span free list holds a block that is not free"))
    }

    /// The slow path: collect remote frees, switch spans, or take a new span.
    #[cold]
    #[inline(never)]
    fn refill(&self, heap_off: u64, heap: &Heap, class: usize, size: usize) -> Result<(u64, u64)> {
        self.collect(heap_off, heap, class)?;
        // SAFETY: we own the heap.
        let local = unsafe { self.local(heap) };
        let current = local.classes[class].current;
        if let Some(b) = self.take_from(current, class)? {
            return Ok(b);
        }
        if current != 0 {
            // Used up: on no list until a block comes back.
            // SAFETY: our span.
            unsafe { self.span_local(current) }?.list = LIST_FULL;
            local.classes[class].current = 0;
        }
        while local.avail[class] != 0 {
            let span = local.avail[class];
            // SAFETY: a span on our stack.
            let s = unsafe { self.span_local(span) }?;
            local.avail[class] = s.next;
            if s.used == 0 {
                local.empty[class] = local.empty[class].saturating_sub(1);
            }
            s.next = 0;
            s.list = LIST_CURRENT;
            local.classes[class].current = span;
            if let Some(b) = self.take_from(span, class)? {
                return Ok(b);
            }
            s.list = LIST_FULL;
            local.classes[class].current = 0;
        }
        let span = self.new_span(heap_off, class, size)?;
        local.classes[class].current = span;
        // SAFETY: our fresh span.
        unsafe { self.span_local(span) }?.list = LIST_CURRENT;
        self.take_from(span, class)?.ok_or(corrupt(span, "fresh span has no block"))
    }

    fn new_span(&self, heap_off: u64, class: usize, size: usize) -> Result<u64> {
        let layout = LAYOUTS[class];
        for attempt in 0..3 {
            {
                let mut g = self.fs.lock();
                if let Some(head) = g.alloc(layout.units, TAG_SPAN, class as u32) {
                    let span = self.fs.layout().unit_offset(head);
                    // SAFETY: fresh units, ours alone; written before the lock is let go, so a
                    // run whose span has no header means its maker died (see recovery).
                    unsafe { init_span(&self.arena, span, class, heap_off) }?;
                    return Ok(span);
                }
            }
            self.relieve_shortage(heap_off, attempt)?;
        }
        Err(Error::OutOfMemory { requested: size as u64, available: self.fs.lock().free_units() * UNIT })
    }

    /// Resizes a live block of our own heap in place (same block, new requested size).
    pub(super) fn resize_in_place(&self, heap_off: u64, block: u64, info: Info, new_size: usize) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        // SAFETY: we own the heap that owns the block.
        let local = unsafe { self.local(heap) };
        let cs = &mut local.classes[info.class];
        cs.live_bytes = cs.live_bytes.wrapping_sub(info.size).wrapping_add(new_size as u64);
        let resized = Info { size: new_size as u64, ..info };
        self.arena.info(block)?.store(resized.pack(), Ordering::Release);
        Ok(())
    }

    // ---- the stack of spans with free blocks (owner only) ----

    /// Puts one of our spans on its class's stack.
    pub(super) fn push_avail(&self, local: &mut HeapLocal, class: usize, span: u64) -> Result<()> {
        // SAFETY: a span of a heap we own.
        let s = unsafe { self.span_local(span) }?;
        s.list = LIST_AVAIL;
        s.next = local.avail[class];
        local.avail[class] = span;
        if s.used == 0 {
            local.empty[class] += 1;
        }
        Ok(())
    }

    /// Rebuilds a class's stack keeping at most `keep` empty spans; the other empty ones go
    /// back to the free-space manager.
    fn sweep_avail(&self, local: &mut HeapLocal, class: usize, keep: u32) -> Result<()> {
        let mut spans = Vec::new();
        let mut at = core::mem::take(&mut local.avail[class]);
        local.empty[class] = 0;
        let limit = self.fs.layout().units as usize + 1;
        while at != 0 && spans.len() < limit {
            spans.push(at);
            // SAFETY: a span on our stack.
            at = unsafe { self.span_local(at) }?.next;
        }
        let mut kept = 0;
        for span in spans.into_iter().rev() {
            // SAFETY: as above.
            let empty = unsafe { self.span_local(span) }?.used == 0;
            if empty && kept >= keep {
                self.release_span(span)?;
                continue;
            }
            kept += empty as u32;
            self.push_avail(local, class, span)?;
        }
        Ok(())
    }

    // ---- freeing ----

    /// Frees a live small block `find_live` found; `my_heap` is the calling thread's heap (0 if
    /// it has none).
    #[inline]
    pub(super) fn free_small(&self, my_heap: u64, b: LiveSmall<'_>) -> Result<()> {
        let h = b.header;
        let owner = h.owner.load(Ordering::Acquire);
        if owner != my_heap || my_heap == 0 {
            return self.free_remote(owner, b.block, b.info());
        }
        // SAFETY: `my_heap` is this thread's heap (from its TLS), checked when taken.
        let heap = unsafe { self.heaps.slot_unchecked(&self.mem, my_heap) };
        // SAFETY: we own the heap, and therefore its spans.
        let (local, s) = unsafe { (self.local(heap), &mut *h.local()) };
        if s.used == 0 {
            return Err(corrupt(b.span, "span use count underflow"));
        }
        // SAFETY: the block lies in the span `find_live` checked whole.
        unsafe {
            self.arena.word_unchecked(b.block).store(freed_word(b.word, 0), Ordering::Release);
            self.arena.word_unchecked(b.block + 8).store(s.free, Ordering::Relaxed);
        }
        s.free = tagged_list::encode(Some(b.block));
        s.used -= 1;
        let class = b.class();
        let cs = &mut local.classes[class];
        cs.live = cs.live.wrapping_sub(1);
        cs.live_bytes = cs.live_bytes.wrapping_sub(b.size());
        if s.list != LIST_CURRENT && (s.used == 0 || s.list == LIST_FULL) {
            return self.refile(local, class, b.span);
        }
        Ok(())
    }

    /// A free by a thread that does not own the block's heap: mark it remote and push it on the
    /// owner's remote list.
    #[inline(never)]
    fn free_remote(&self, owner: u64, block: u64, info: Info) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, owner)?;
        self.arena
            .info(block)?
            .compare_exchange(info.pack(), info.with_state(State::Remote).pack(), Ordering::AcqRel, Ordering::Relaxed)
            .map_err(|_| invalid(block, "already freed"))?;
        heap.body.remote.0[info.class].push(&self.arena, block);
        if heap.owner.load(Ordering::Acquire) == 0 {
            self.drain(owner)?;
        }
        Ok(())
    }

    /// A span not current any more got a block back: a full one goes on the stack; one on the
    /// stack that became empty is counted, and past [`KEEP_EMPTY`] the stack is swept.
    #[cold]
    fn refile(&self, local: &mut HeapLocal, class: usize, span: u64) -> Result<()> {
        // SAFETY: the caller owns the span's heap.
        let s = *unsafe { self.span_local(span) }?;
        match s.list {
            LIST_FULL => self.push_avail(local, class, span),
            LIST_AVAIL if s.used == 0 => {
                local.empty[class] += 1;
                if local.empty[class] > KEEP_EMPTY {
                    self.sweep_avail(local, class, KEEP_EMPTY)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Puts a block back on its span's local list (owner only) and files the span.
    fn return_block(&self, local: &mut HeapLocal, class: usize, span: u64, block: u64) -> Result<()> {
        // SAFETY: the caller owns the span's heap.
        let s = unsafe { self.span_local(span) }?;
        self.arena.store_link(block, tagged_list::decode(s.free));
        s.free = tagged_list::encode(Some(block));
        s.used = s.used.checked_sub(1).ok_or(corrupt(span, "span use count underflow"))?;
        if s.list != LIST_CURRENT && (s.used == 0 || s.list == LIST_FULL) {
            return self.refile(local, class, span);
        }
        Ok(())
    }

    pub(super) fn release_span(&self, span: u64) -> Result<()> {
        let head = self.fs.layout().unit_of(span).ok_or(corrupt(span, "span outside the arena"))?;
        let mut g = self.fs.lock();
        g.free(head)
    }

    /// Moves the remote frees of `class` to their spans (owner only), journaled in the heap's
    /// `pending` word (see the module docs).
    pub(super) fn collect(&self, heap_off: u64, heap: &Heap, class: usize) -> Result<()> {
        let pending = &heap.body.pending.0[class];
        let Some(first) = heap.body.remote.0[class].take_recorded(pending) else {
            return Ok(());
        };
        // SAFETY: the caller owns the heap.
        let local = unsafe { self.local(heap) };
        let limit = self.fs.layout().bytes() / 32 + 1;
        let mut next = Some(first);
        let mut seen = 0u64;
        let mut batch = [(0u64, 0u64, 0u64); COLLECT_BATCH];
        while next.is_some() {
            let mut k = 0;
            while let (Some(b), true) = (next, k < COLLECT_BATCH) {
                let w = self.arena.info(b)?;
                let word = w.load(Ordering::Acquire);
                let span = span_of_word(b, word);
                let ours = has_state(word, State::Remote)
                    && word_class(word) == class
                    && self.arena.class_span(span, class).map(|h| h.owner.load(Ordering::Relaxed)) == Some(heap_off)
                    && b.wrapping_sub(span + SPAN_HEADER) < LAYOUTS[class].area;
                if !ours {
                    return Err(corrupt(b, "remote list holds a block that is not a remote free of this heap"));
                }
                next = self.arena.load_link(b)?;
                w.store(freed_word(word, 0), Ordering::Release);
                batch[k] = (b, span, word & FIELD_MASK);
                k += 1;
            }
            // The batch is free; what follows it still hangs off its links.
            pending.store(tagged_list::encode(next), Ordering::Release);
            for &(b, span, size) in &batch[..k] {
                let cs = &mut local.classes[class];
                cs.live = cs.live.wrapping_sub(1);
                cs.live_bytes = cs.live_bytes.wrapping_sub(size);
                self.return_block(local, class, span, b)?;
            }
            seen += k as u64;
            if seen > limit {
                return Err(corrupt(first, "remote list longer than its blocks can be (a cycle)"));
            }
        }
        Ok(())
    }

    /// Gives back every empty span of a heap we own, current ones included.
    pub(super) fn trim_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        for class in 0..CLASS_COUNT {
            self.collect(heap_off, heap, class)?;
            // SAFETY: we own the heap.
            let local = unsafe { self.local(heap) };
            self.sweep_avail(local, class, 0)?;
            let current = local.classes[class].current;
            if current != 0 {
                // SAFETY: our span.
                let s = unsafe { self.span_local(current) }?;
                if s.used == 0 {
                    local.classes[class].current = 0;
                    s.list = 0;
                    self.release_span(current)?;
                }
            }
        }
        Ok(())
    }

    /// Trims a heap we hold and lets it go; repeats while remote frees arrived meanwhile.
    pub(super) fn release_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        let token = heap.owner.load(Ordering::Relaxed);
        loop {
            self.trim_heap(heap_off)?;
            heap.owner.store(0, Ordering::Release);
            let pending = heap.body.remote.0.iter().any(|l| !l.is_empty());
            if !pending || heap.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_err() {
                return Ok(());
            }
        }
    }

    /// Collects the remote frees of a heap no thread owns, if no one else is doing it.
    pub(super) fn drain(&self, heap_off: u64) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        let token = crate::sync::owner_token();
        if heap.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            self.release_heap(heap_off)?;
        }
        Ok(())
    }

    pub(super) fn drain_unowned(&self) -> Result<()> {
        for offset in self.heaps.offsets(&self.mem)? {
            let h = self.heaps.slot(&self.mem, offset)?;
            if h.owner.load(Ordering::Relaxed) == 0 && h.body.remote.0.iter().any(|l| !l.is_empty()) {
                self.drain(offset)?;
            }
        }
        Ok(())
    }
}
