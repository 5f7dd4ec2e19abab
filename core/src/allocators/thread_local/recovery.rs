//! Heaps of dead processes: found by their owner word (a process id and start time that no
//! longer run), taken over with a CAS, repaired from their blocks' headers, and released.
//!
//! Repair first finishes any remote collection the dead owner left half done (the chain its
//! `pending` word records, then the remote lists themselves, journaled the same way), turning
//! those blocks free without touching their links. Only then does it rebuild every span's free
//! list, use count and the heap's counters from the blocks' states, so a repairer that dies in
//! turn leaves a state the next one repairs the same way. (The heap's history, its counts of
//! allocations and frees, no block tells: it stays in place until the repair's last step.)
//!
//! A dead heap's thread may also have been remote-freeing a block of another heap (its
//! `in_flight` record). Marked remote by that thread (its info word names the heap, written by
//! the same compare-and-swap that marked it), the block may or may not have reached its
//! owner's remote list; only the owner can tell, by taking its list: so the repairer names the
//! dead heap in the owner's orphan slot for the class and keeps the heap (owner word
//! [`AWAITING_OWNER`]) until the owner has settled the block ([`Shared::settle_orphan`]) at its
//! next collection, or its own repair. A slot names a heap only while the heap awaits its
//! owner (or its repairer holds it): whoever lets such a heap go clears the slot first. An
//! owner that itself awaits its owner has no thread to collect for it: reclaims, trims and
//! nudges take it (from [`AWAITING_OWNER`] to their token), collect and settle what waits in
//! it, and give it back ([`Shared::drain_awaiting`]).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::crash;
use crate::error::Result;
use crate::sync::atomic::{fence, Ordering};
use crate::sync::tagged_list::{self, LinkStore};
use crate::sync::{holder_gone, owner_token};

use super::super::large::{self, TAG_LARGE, TAG_SPAN};
use super::super::size_class::CLASS_COUNT;
use super::super::span::{block_at, corrupt, freed_word, fresh_word, span_of_word, Info, State, LAYOUTS};
use super::heap::{awaits_collection, sweep_limit, ClassState, Heap, HeapLocal, AWAITING_OWNER};
use super::Shared;

/// What became of a dead thread's remote free.
pub(super) enum Handover {
    /// Nothing was under way, or nothing is left to do: no orphan slot names the heap.
    None,
    /// The block's owner (heap, class) settles it; the freer's heap waits for that.
    Posted(u64, usize),
    /// The owner already has another such free to settle in that class.
    Busy(u64, usize),
}

/// What a reclaim did with one heap ([`Shared::reclaim_heap`]).
enum Reclaimed {
    /// Nothing to do, or nothing more: not a dead process's heap, or another reclaimer's.
    Left,
    /// Repaired and let go (`released`), or handed over to the owner of its dead thread's remote
    /// free, which may have let it go already.
    Done { released: bool },
    /// Repaired, but that owner has another dead freer's free to settle first: given back for a
    /// later pass.
    Busy,
}

impl Shared {
    /// Repairs and releases every heap whose owning process has died; returns how many were
    /// released. A heap whose thread died mid-way through a remote free is handed to the
    /// block's owner to settle instead ([`Shared::hand_over_in_flight`]), and kept until it
    /// has; `my_heap` (the calling thread's heap, 0 if none) settles at once what is handed to
    /// it, and an owner no thread holds is drained. A heap that finds the owner's slot taken by
    /// another dead freer waits for that one to be settled: the walk repeats while one pass
    /// left such a heap and got something done. A heap that fails (damage) does not stop the
    /// walk: the first failure is reported once the other heaps have been seen to.
    pub(super) fn reclaim_dead(&self, my_heap: u64) -> Result<u64> {
        let offsets = self.heaps.offsets(&self.mem)?;
        let mut released = 0;
        let mut failed = None;
        loop {
            let (mut busy, mut progress) = (false, false);
            for &offset in &offsets {
                match self.heaps.slot(&self.mem, offset).and_then(|h| self.reclaim_heap(my_heap, offset, h)) {
                    Ok(Reclaimed::Left) => {}
                    Ok(Reclaimed::Done { released: r }) => {
                        released += r as u64;
                        progress = true;
                    }
                    Ok(Reclaimed::Busy) => busy = true,
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if !(busy && progress) {
                return match failed {
                    Some(e) => Err(e),
                    None => Ok(released),
                };
            }
        }
    }

    /// One heap of [`Shared::reclaim_dead`]'s walk: taken over, repaired and let go (or handed
    /// over) if its process has died. A failure while we hold it (a repair that finds damage, or
    /// the owner of its dead thread's remote free failing to settle another one first) gives it
    /// back as we found it, for a later reclaim to try again: held, it would stay ours for good,
    /// as our process lives, and the remote frees it is sent would pile up unseen. (A repair is
    /// redone whole from the blocks' states, as after a repairer killed part way.)
    fn reclaim_heap(&self, my_heap: u64, offset: u64, h: &Heap) -> Result<Reclaimed> {
        let owner = h.owner.load(Ordering::Acquire);
        // A heap awaiting an owner whose slot does not name it was left by a repairer or an owner
        // killed mid-way: it is taken over again like a dead one.
        let awaiting = owner == AWAITING_OWNER;
        let taken_over = match owner {
            AWAITING_OWNER => !self.awaited(offset, h),
            // Given back by its thread, with blocks of a process that has died since.
            0 => self.free_dead() && holder_gone(h.body.blocks_of.0.load(Ordering::Acquire)),
            _ => holder_gone(owner),
        };
        if !taken_over {
            if awaiting && awaits_collection(self, h) {
                self.drain_awaiting(my_heap, offset)?;
            }
            return Ok(Reclaimed::Left);
        }
        if h.owner.compare_exchange(owner, owner_token(), Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Ok(Reclaimed::Left);
        }
        crash::point();
        if awaiting && self.awaited(offset, h) {
            // Another reclaimer posted it meanwhile; its owner may have looked while we held it,
            // and left it.
            self.await_owner(my_heap, h)?;
            return Ok(Reclaimed::Left);
        }
        let give_back = || {
            h.owner.store(owner, Ordering::Release);
            crash::point();
        };
        self.repair_heap(offset).inspect_err(|_| give_back())?;
        let mut outcome = self.hand_over_in_flight(offset, h)?;
        if let Handover::Busy(owner_off, class) = outcome {
            self.nudge(my_heap, owner_off, class).inspect_err(|_| give_back())?;
            outcome = self.hand_over_in_flight(offset, h)?;
        }
        match outcome {
            Handover::None => {
                self.release_heap(offset)?;
                Ok(Reclaimed::Done { released: true })
            }
            Handover::Posted(owner_off, class) => {
                self.nudge(my_heap, owner_off, class)?;
                Ok(Reclaimed::Done { released: h.owner.load(Ordering::Acquire) != AWAITING_OWNER })
            }
            Handover::Busy(..) => {
                give_back();
                Ok(Reclaimed::Busy)
            }
        }
    }

    /// Whether the orphan slot that the record of heap `freer` (`h`) names holds that heap. (A
    /// record naming its own heap is damage, which no slot may make it await: it would await
    /// itself, see [`Shared::hand_over_in_flight`].)
    fn awaited(&self, freer: u64, h: &Heap) -> bool {
        h.body.in_flight.read().is_some_and(|r| {
            r.owner != freer
                && self
                    .heaps
                    .member(&self.mem, r.owner)
                    .is_ok_and(|o| o.body.orphans.0[r.class].load(Ordering::Acquire) == freer)
        })
    }

    /// Gives heap `h` (which we hold, posted to an orphan slot) back to the owner its record
    /// names, and gets that owner to look again: it may have looked while we held the heap.
    pub(super) fn await_owner(&self, my_heap: u64, h: &Heap) -> Result<()> {
        h.owner.store(AWAITING_OWNER, Ordering::Release);
        crash::point();
        // Before the owner's word is read (see `Shared::release_heap`).
        fence(Ordering::SeqCst);
        match h.body.in_flight.read() {
            Some(r) => self.nudge(my_heap, r.owner, r.class),
            None => Ok(()),
        }
    }

    /// Gets heap `owner_off` to settle what dead freers left it in `class` now if it can: at
    /// once if it is the calling thread's heap (`my_heap`), by draining it if no thread holds
    /// it; else at its thread's next collection.
    pub(super) fn nudge(&self, my_heap: u64, owner_off: u64, class: usize) -> Result<()> {
        let Ok(owner) = self.heaps.member(&self.mem, owner_off) else {
            // A record naming no heap: no one to nudge.
            return Ok(());
        };
        if my_heap != 0 && owner_off == my_heap {
            return self.collect(owner_off, owner, class);
        }
        match owner.owner.load(Ordering::Acquire) {
            0 => self.drain(owner_off),
            AWAITING_OWNER if awaits_collection(self, owner) => self.drain_awaiting(my_heap, owner_off),
            _ => Ok(()),
        }
    }

    /// Collects (and settles) what heap `offset` has waiting while it awaits its own owner, then
    /// gives it back to that owner (`my_heap` as in [`Shared::reclaim_dead`]). Without it, two
    /// dead threads that were each freeing a block of the other's heap, posted to each other by
    /// two repairers, would wait on each other forever.
    pub(super) fn drain_awaiting(&self, my_heap: u64, offset: u64) -> Result<()> {
        let h = self.heaps.slot(&self.mem, offset)?;
        if h.owner.compare_exchange(AWAITING_OWNER, owner_token(), Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Ok(());
        }
        crash::point();
        if let Err(e) = self.trim_heap(offset) {
            h.owner.store(AWAITING_OWNER, Ordering::Release);
            return Err(e);
        }
        if self.awaited(offset, h) {
            return self.await_owner(my_heap, h);
        }
        // Its posting was cleared meanwhile: hand it over again, as a reclaim would.
        match self.hand_over_in_flight(offset, h)? {
            Handover::None => self.release_heap(offset),
            Handover::Posted(owner_off, class) => self.nudge(my_heap, owner_off, class),
            Handover::Busy(..) => {
                // A later reclaim takes it over.
                h.owner.store(AWAITING_OWNER, Ordering::Release);
                crash::point();
                Ok(())
            }
        }
    }

    /// Hands the remote free a dead thread of heap `freer` was making (its `in_flight` record)
    /// to the owner of the block, which alone can tell whether the block was pushed (see
    /// [`Shared::settle_orphan`]). The caller holds the freer's heap. Whatever the outcome but
    /// `Posted`, no orphan slot names the heap afterwards (it may be let go).
    ///
    /// A record naming the freer's own heap as the block's owner is damage (a thread's free of
    /// a block of its own heap is a local one, recorded nowhere): posted, the heap would await
    /// itself, and the drain that nudges it would nudge itself again without end.
    pub(super) fn hand_over_in_flight(&self, freer: u64, h: &Heap) -> Result<Handover> {
        let Some(r) = h.body.in_flight.read() else {
            h.body.in_flight.clear();
            return Ok(Handover::None);
        };
        let owner = self.heaps.member(&self.mem, r.owner).ok().filter(|_| r.owner != freer);
        let Some(owner) = owner else {
            // A damaged record: no slot can name us through it.
            h.body.in_flight.clear();
            return Ok(Handover::None);
        };
        let slot = &owner.body.orphans.0[r.class];
        if self.orphan_block(r.owner, r.class, freer, r).is_none() {
            // Not marked (the free never happened), or pushed and collected already: nothing to
            // settle. A slot a repairer killed mid-way left naming us is cleared first.
            let _ = slot.compare_exchange(freer, 0, Ordering::AcqRel, Ordering::Relaxed);
            crash::point();
            h.body.in_flight.clear();
            return Ok(Handover::None);
        }
        match slot.compare_exchange(0, freer, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            Err(f) if f == freer => {}
            Err(_) => return Ok(Handover::Busy(r.owner, r.class)),
        }
        crash::point();
        h.owner.store(AWAITING_OWNER, Ordering::Release);
        crash::point();
        // Before the caller reads the owner's word (`nudge`): an owner letting its heap go
        // stores 0 there, then reads our slot and owner word (see `Shared::release_heap`).
        fence(Ordering::SeqCst);
        Ok(Handover::Posted(r.owner, r.class))
    }

    /// Turns the remotely freed blocks of a chain of heap `heap_off` free, without touching
    /// links: the chain a dead owner was collecting (some of it already free) or a remote list
    /// the repairer took. A damaged chain ends at the first block that is neither, or that lies
    /// in no span of the heap and class: a stray link (into another heap's remote list, say)
    /// must not free blocks another heap's thread has in transit, which its repair would never
    /// list (it rebuilds the heap's own spans only) and its owner's collection then refuses.
    fn free_remote_chain(&self, heap_off: u64, first: Option<u64>, class: usize) {
        let limit = self.fs.layout().bytes() / 32 + 1;
        let mut at = first;
        let mut n = 0u64;
        while let Some(b) = at {
            n += 1;
            let Some(w) = self.arena.word_at(b).filter(|_| n <= limit) else {
                return;
            };
            let word = w.load(Ordering::Acquire);
            if self.own_span(heap_off, span_of_word(b, word), class).is_err() {
                return;
            }
            match Info::unpack(word) {
                Some(i) if i.class == class && i.state == State::Remote => {
                    w.store(freed_word(word, 0), Ordering::Release);
                    if n.is_power_of_two() {
                        crash::point();
                    }
                }
                Some(i) if i.class == class && i.state == State::Free => {}
                _ => return,
            }
            at = self.arena.load_link(b).unwrap_or(None);
        }
    }

    /// Finishes the remote collections of heap `heap_off` (`heap`), which we hold for repair.
    fn finish_collections(&self, heap_off: u64, heap: &Heap) {
        for class in 0..CLASS_COUNT {
            let pending = &heap.body.pending.0[class];
            if let Some(first) = tagged_list::decode(pending.load(Ordering::Acquire)) {
                self.free_remote_chain(heap_off, Some(first), class);
                pending.store(0, Ordering::Release);
                crash::point();
            }
            if let Some(first) = heap.body.remote.0[class].take_recorded(pending) {
                crash::point();
                self.free_remote_chain(heap_off, Some(first), class);
                pending.store(0, Ordering::Release);
                crash::point();
            }
        }
    }

    /// Settles the remote frees dead threads left to a heap we hold for repair (after its
    /// remote lists were collected: a settled block turns free, and the rebuild lists it).
    fn settle_orphans(&self, heap_off: u64, heap: &Heap) -> Result<()> {
        for class in 0..CLASS_COUNT {
            match heap.body.orphans.0[class].load(Ordering::Acquire) {
                0 => {}
                freer => self.settle_orphan(heap_off, heap, class, freer)?,
            }
        }
        Ok(())
    }

    /// Rebuilds a heap's spans and lists from its blocks' headers, after its owner died at an
    /// unknown point (or the process whose blocks it holds died, see [`BlocksOf`]). The caller
    /// holds the heap. Live blocks are freed (with [`DeadProcessBlocks::Free`]) only if the
    /// heap's blocks are a dead process's: an owner that died holding the heap to drain it
    /// held none of them.
    ///
    /// [`BlocksOf`]: super::heap::BlocksOf
    /// [`DeadProcessBlocks::Free`]: super::super::common::DeadProcessBlocks::Free
    pub(super) fn repair_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heaps.slot(&self.mem, heap_off)?;
        // The heap's large blocks are known by its number (their runs record it), which is
        // shared memory: damaged to another heap's, the repair would free that heap's blocks,
        // perhaps a live thread's. Checked before anything changes.
        let index = self.heap_number(heap_off, heap)?;
        let process = heap.body.blocks_of.0.load(Ordering::Acquire);
        let free_dead = self.free_dead() && (process == 0 || holder_gone(process));
        self.finish_collections(heap_off, heap);
        self.settle_orphans(heap_off, heap)?;
        // SAFETY: we hold the heap.
        let local = unsafe { self.local(heap) };
        local.classes.iter().for_each(ClassState::clear_for_repair);
        crash::point();
        let mut spans = Vec::new();
        let mut dead_large = Vec::new();
        {
            let g = self.fs.lock();
            g.for_each_used(|head, run| {
                let base = self.fs.layout().unit_offset(head);
                let owned = self.arena.span_at(base).is_some_and(|s| s.owner.load(Ordering::Relaxed) == heap_off);
                if run.tag == TAG_SPAN && owned {
                    // The rebuild writes every block of the class's span: a run the table says
                    // is of another length (damage; every span is carved whole) would have it
                    // write past the run, into what the free-space manager handed out there.
                    if LAYOUTS.get(run.aux as usize).is_none_or(|l| l.units != run.len()) {
                        return Err(corrupt(base, "span header disagrees with the table"));
                    }
                    spans.push((base, run.aux as usize));
                } else if run.tag == TAG_LARGE && run.aux == index.wrapping_add(1) && free_dead {
                    dead_large.push(base);
                }
                Ok(())
            })?;
        }
        let freers = self.freer_heaps()?;
        let mut live = [0u64; CLASS_COUNT];
        for (span, class) in spans {
            let kept = self.repair_span(heap_off, local, span, class, free_dead, &freers)?;
            // (`repair_span` refuses a class past the table.)
            live[class] += kept;
        }
        for (c, &live) in live.iter().enumerate() {
            // The count of allocations only grows (it may be behind the blocks if shared memory
            // was damaged); the frees are what it leaves over the live blocks. Killed between the
            // two stores, a repairer leaves the count at least what it was, for the next one.
            let cs = &local.classes[c];
            let allocations = cs.allocations.get().max(live);
            cs.allocations.set(allocations);
            cs.frees.set(allocations - live);
            cs.set_sweep_at(sweep_limit(cs.count(), c));
        }
        crash::point();
        for base in dead_large {
            let _ = large::free(&self.fs, &self.arena, base);
            crash::point();
        }
        if free_dead && process != 0 {
            // Its blocks are all free now: any process's thread may take it.
            heap.body.blocks_of.0.store(0, Ordering::Release);
            crash::point();
        }
        Ok(())
    }

    /// Rebuilds one span of heap `heap_off`, which we hold for repair: its free blocks go on the
    /// heap's list (those past its bump index formatted now), its live and remote ones into the
    /// counters; a span with none of those goes back. Remote blocks still here are in transit
    /// (their freer pushes them later) and stay counted. Returns how many blocks it kept (live
    /// and remote), which the caller sets the class's history by. A live or remote block past
    /// the bump index is damage (`Corrupt`, the span unchanged).
    fn repair_span(
        &self,
        heap_off: u64,
        local: &HeapLocal,
        span: u64,
        class: usize,
        free_dead: bool,
        freers: &BTreeMap<u64, u64>,
    ) -> Result<u64> {
        let layout = *LAYOUTS.get(class).ok_or(corrupt(span, "span class"))?;
        // SAFETY: we hold the span's heap.
        let bump = unsafe { self.span_bump(heap_off, span, class) }?;
        let formatted = u64::from(bump.load(Ordering::Relaxed)).min(layout.blocks);
        // The index is shared memory: damaged low, the blocks past it, which the rebuild writes
        // free, would take in blocks handed out (live ones still held, remote ones their freers
        // push yet), to be handed out again. Checked before anything of the span changes.
        self.none_carved_past(span, class, formatted)?;
        let (mut free, mut kept, mut bytes) = (Vec::new(), 0u64, 0u64);
        for index in 0..layout.blocks {
            let b = block_at(span, class, index);
            let word = self.arena.info(b)?;
            let info = Info::unpack(word.load(Ordering::Acquire)).filter(|i| i.class == class && i.index == index);
            let held = match info {
                _ if index >= formatted => None,
                Some(i) if i.state == State::Remote => Some(i),
                Some(i) if i.state == State::Live => {
                    let freed = free_dead
                        && word
                            .compare_exchange(i.pack(), freed_word(i.pack(), 0), Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok();
                    (!freed).then_some(i)
                }
                _ => None,
            };
            match held {
                Some(i) => {
                    kept += 1;
                    bytes += match i.state {
                        // A remote block's word names its freer; its size is elsewhere.
                        State::Remote => self.remote_size(freers, b, i.size)?.min(layout.size),
                        _ => i.size,
                    };
                }
                None => {
                    word.store(fresh_word(class, index, 0), Ordering::Release);
                    free.push(b);
                }
            }
            if index == layout.blocks / 2 {
                crash::point();
            }
        }
        bump.store(layout.blocks as u32, Ordering::Relaxed);
        crash::point();
        if kept == 0 {
            return self.release_span(span).map(|()| 0);
        }
        let cs = &local.classes[class];
        // The counters were cleared for the rebuild and only it adds to them, but they are shared
        // memory: sums past a u64 mean another process wrote them since (damage), refused before
        // the span's blocks are listed (the next repair clears them and rebuilds the span anew).
        let blocks = cs.blocks().checked_add(free.len() as u64 + kept);
        let (Some(blocks), Some(live_bytes)) = (blocks, cs.live_bytes.get().checked_add(bytes)) else {
            return Err(corrupt(span, "heap's counters past what its spans hold"));
        };
        cs.set_blocks(blocks);
        crash::point();
        let middle = free.len() / 2;
        for (i, b) in free.into_iter().enumerate() {
            self.arena.store_link(b, cs.free.head());
            cs.free.set(b);
            if i == middle {
                crash::point();
            }
        }
        cs.live_bytes.set(live_bytes);
        crash::point();
        Ok(kept)
    }
}
