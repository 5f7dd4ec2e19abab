//! Slots of dead processes, blocks dead processes held, and trimming.
//!
//! A dead slot's blocks are the free blocks labelled with it that are on no shared list: its
//! cache, a batch it was moving, a block it was handing out or taking back. Recovery happens
//! under the free-space lock: it claims the slot (a CAS on its owner word), settles its counters
//! from its journals and clears them while those blocks are still out of everyone's reach, then,
//! under each list's lock too, walks the list, scans the class's spans for such blocks and
//! pushes them; last, it frees the slot. A recoverer that dies part way leaves a slot that is
//! claimed by a dead process again, and the next recovery does the same steps, which find
//! nothing twice: the journals it settled are clear, and a cleared journal is never judged
//! again, however its block changed since (nor when a later owner of the slot dies).
//!
//! Blocks a dead process still held ([`DeadProcessBlocks::Free`](super::DeadProcessBlocks)) are
//! freed only once no unsettled journal names them: a free before the settle would change the
//! state the settle reads.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::sync::atomic::compiler_fence;

use crate::crash;
use crate::error::Result;
use crate::liveness;
use crate::sync::atomic::Ordering;
use crate::sync::tagged_list::{self, LinkStore};
use crate::sync::{holder_gone, owner_token};

use super::super::free_space::{Desc, FreeSpaceGuard};
use super::super::large::{self, TAG_LARGE, TAG_SPAN};
use super::super::size_class::CLASS_COUNT;
use super::super::span::{block_at, corrupt, release_span, span_of, user_of_live, Info, State, LAYOUTS};
use super::cache::{label_of, unpack_journal, CacheSlot, ClassCache, OP_ALLOC, OP_FREE, OP_RESIZE};
use super::{stamp_process, Shared};

impl Shared {
    /// Every span, by class (spans whose header was never written are skipped, and runs that
    /// are no whole span: see [`Shared::whole_span`]).
    pub(super) fn spans_by_class(&self, g: &FreeSpaceGuard<'_>) -> Result<Vec<Vec<u64>>> {
        let mut spans = alloc::vec![Vec::new(); CLASS_COUNT];
        g.for_each_used(|head, run| {
            let base = self.fs.layout().unit_offset(head);
            if self.whole_span(base, run) {
                spans[run.aux as usize].push(base);
            }
            Ok(())
        })?;
        Ok(spans)
    }

    /// Whether the used run `run` at `base` is a whole span of the class it names: its header
    /// written (one whose maker died first is not a span yet), and as long as the class's spans.
    /// Every span is carved whole, so a run of another length is damage to the table, and the
    /// class's blocks past it would lie in units the free-space manager holds for others: a
    /// recovery that listed or freed them would hand out what is free space, or someone's.
    fn whole_span(&self, base: u64, run: Desc) -> bool {
        let class = run.aux as usize;
        run.tag == TAG_SPAN
            && LAYOUTS.get(class).is_some_and(|l| l.units == run.len())
            && self.arena.class_span(base, class).is_some()
    }

    /// Walks a shared list (the caller holds its lock), calling `visit` on each block.
    pub(super) fn walk_list(&self, first: u64, visit: impl FnMut(u64) -> Result<()>) -> Result<u64> {
        let limit = self.fs.layout().bytes() / 32 + 1;
        tagged_list::walk(&self.arena, (first != 0).then_some(first), limit, visit)
    }

    /// The slots whose owner is a process known to be gone: offset and owner word.
    fn slots_of_the_dead(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for offset in self.slots.offsets(&self.mem)? {
            let owner = self.slots.slot(&self.mem, offset)?.owner.load(Ordering::Acquire);
            if holder_gone(owner) {
                out.push((offset, owner));
            }
        }
        Ok(out)
    }

    /// Claims the slots of dead processes and returns their blocks to the shared lists; returns
    /// how many slots. See the module docs. A class whose list or spans are damaged does not
    /// stop the others; the claimed slots then go back to their dead owners as found (held,
    /// they would stay ours for good, as our process lives, with the blocks of that class), for
    /// a later recovery to finish, and the damage is reported.
    pub(super) fn recover_dead(&self) -> Result<u64> {
        // Asking the OS about each owner takes no lock; the claims do.
        let candidates = self.slots_of_the_dead()?;
        if candidates.is_empty() {
            return Ok(0);
        }
        let g = self.fs.lock();
        let claimed = self.labels_of_damaged_slots()?;
        let (mut dead, mut labels, mut damaged) = (Vec::new(), BTreeSet::new(), None);
        for (offset, owner) in candidates {
            let Ok(s) = self.slots.slot(&self.mem, offset) else {
                continue;
            };
            // A cache labels its free blocks with its slot's number, which is shared memory:
            // damaged to a live slot's, the recovery would push that slot's cached blocks too,
            // which its thread hands out again. Such a slot is left as found, and reported.
            if self.slots.position(&self.mem, offset).ok() != Some(u64::from(s.index)) {
                damaged.get_or_insert(corrupt(offset, "slot's number is not its place in the table"));
                continue;
            }
            // Likewise the other way round: a live slot whose number was damaged to ours. A cache
            // labels by its slot's place, taken with the slot, but one that read the word instead
            // (an earlier build's) labels the blocks it takes in with our number, and they are on
            // no shared list.
            if claimed.contains(&label_of(u64::from(s.index))) {
                damaged.get_or_insert(corrupt(offset, "another slot's number names this slot"));
                continue;
            }
            if s.owner.compare_exchange(owner, owner_token(), Ordering::Acquire, Ordering::Relaxed).is_ok() {
                crash::point();
                let label = label_of(u64::from(s.index));
                for (class, c) in s.body.classes.iter().enumerate() {
                    self.settle_journal(c, class, label);
                }
                dead.push((offset, owner));
                labels.insert(label);
            }
        }
        if dead.is_empty() {
            return damaged.map_or(Ok(0), Err);
        }
        let mut failed = None;
        let mut pushed = Vec::new(); // the classes whose blocks are all listed now
        match self.spans_by_class(&g) {
            Ok(spans) => {
                for (class, spans) in spans.iter().enumerate() {
                    match self.push_orphans(class, spans, &labels) {
                        Ok(()) => pushed.push(class),
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
            }
            Err(e) => failed = Some(e),
        }
        for &(offset, owner) in &dead {
            let Ok(s) = self.slots.slot(&self.mem, offset) else {
                continue;
            };
            // The caches of the classes whose blocks are all listed now (every class, unless one
            // failed) are emptied: none points into a shared list any more, and a flush the dead
            // process put off (`flush_after_free`) is over, or the slot's next owner would let
            // its cache grow to the dead one's count.
            for &class in &pushed {
                let c = &s.body.classes[class];
                c.head.store(0, Ordering::Relaxed);
                c.retry_at.store(0, Ordering::Relaxed);
            }
            crash::point();
            // After a failure the slot goes back to its dead owner as found: its settled journals
            // stay clear, and the blocks already pushed are listed, so the next recovery finds
            // nothing twice.
            s.owner.store(if failed.is_some() { owner } else { 0 }, Ordering::Release);
            crash::point();
        }
        drop(g);
        match failed.or(damaged) {
            Some(e) => Err(e),
            None => Ok(dead.len() as u64),
        }
    }

    /// The labels of the slots whose number is not their place in the table (damage): their
    /// caches label blocks with them, perhaps another slot's.
    fn labels_of_damaged_slots(&self) -> Result<BTreeSet<u64>> {
        let mut out = BTreeSet::new();
        // In index order: each slot's place is its position in the list.
        for (place, offset) in self.slots.offsets(&self.mem)?.into_iter().enumerate() {
            let index = self.slots.slot(&self.mem, offset)?.index;
            if u64::from(index) != place as u64 {
                out.insert(label_of(u64::from(index)));
            }
        }
        Ok(out)
    }

    /// Pushes the free blocks of `class` labelled with one of `labels` (dead slots') that are on
    /// no shared list onto the class's list (the caller holds the free-space lock); `spans` are
    /// the class's spans.
    fn push_orphans(&self, class: usize, spans: &[u64], labels: &BTreeSet<u64>) -> Result<()> {
        let mut list = self.list(class).lock_or_recover(|_| {});
        let mut listed = BTreeSet::new();
        self.walk_list(*list, |b| {
            listed.insert(b);
            Ok(())
        })?;
        let mut orphans = Vec::new();
        for &span in spans {
            for index in 0..LAYOUTS[class].blocks {
                let b = block_at(span, class, index);
                let info = Info::unpack(self.arena.info(b)?.load(Ordering::Acquire));
                if info.is_some_and(|i| i.state == State::Free && labels.contains(&i.size)) && !listed.contains(&b) {
                    orphans.push(b);
                }
            }
        }
        if let (Some(&first), Some(&last)) = (orphans.first(), orphans.last()) {
            for pair in orphans.windows(2) {
                self.arena.store_link(pair[0], Some(pair[1]));
            }
            self.arena.store_link(last, (*list != 0).then_some(*list));
            crash::point();
            compiler_fence(Ordering::Release);
            *list = first;
            crash::point();
        }
        Ok(())
    }

    /// Settles the counters of a dead slot's cache line for `class` from its journal, then
    /// clears the journal, so that a later recovery of the slot (its recoverer died, or a later
    /// owner of the slot died) judges nothing again. See [`cache`](super::cache).
    ///
    /// Whether the journaled operation took effect is read off its block: a block free with
    /// the slot's `label` was freed by the slot (a free that did), or is still in its hands (an
    /// allocation that did not). Only the slot writes its label, so nothing another process
    /// does to the block afterwards can forge that state.
    fn settle_journal(&self, c: &ClassCache, class: usize, label: u64) {
        let (block, op, new_size) = unpack_journal(c.journal.load(Ordering::Acquire));
        if op == 0 {
            return;
        }
        // `unpack_journal` keeps the block 16-aligned; `word_at` checks it lies in the arena.
        let info = self.arena.word_at(block).map(|w| Info::unpack(w.load(Ordering::Acquire)));
        let ours = |i: &Info| i.state == State::Free && i.class == class && i.size == label;
        let done = match (op, info) {
            // A journal naming no block of the arena is damaged: trust the counters.
            (_, None) => false,
            (OP_ALLOC, Some(info)) => !info.is_some_and(|i| ours(&i)),
            (OP_FREE, Some(info)) => info.is_some_and(|i| ours(&i)),
            (OP_RESIZE, Some(info)) => info.is_some_and(|i| i.state == State::Live && i.size == new_size),
            _ => false,
        };
        if done {
            c.live.store(c.j_live.load(Ordering::Relaxed), Ordering::Relaxed);
            crash::point();
            c.bytes.store(c.j_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
            crash::point();
            compiler_fence(Ordering::Release);
        }
        c.journal.store(0, Ordering::Release);
        crash::point();
    }

    /// Frees the blocks processes that have died still held (small ones through the cache in
    /// `slot`); returns how many. Only with [`DeadProcessBlocks::Free`](super::DeadProcessBlocks).
    pub(super) fn free_dead_blocks(&self, slot: CacheSlot) -> Result<u64> {
        if !self.free_dead() {
            return Ok(0);
        }
        let mut verdict: BTreeMap<u64, bool> = BTreeMap::new();
        let mut dead_process = |stamp: u64| {
            *verdict.entry(stamp).or_insert_with(|| stamp != self.stamp() && liveness::is_dead(stamp_process(stamp)))
        };
        let (mut small, mut large_blocks) = (Vec::new(), Vec::new());
        // All of it under the free-space lock: slots are claimed and settled under it, and a
        // reclaimer elsewhere, or a large free, waits for it (see the module docs).
        let mut g = self.fs.lock();
        g.for_each_used(|head, run| {
            let base = self.fs.layout().unit_offset(head);
            let class = run.aux as usize;
            match run.tag {
                TAG_SPAN if self.whole_span(base, run) => {
                    for index in 0..LAYOUTS[class].blocks {
                        let b = block_at(base, class, index);
                        let word = self.arena.info(b)?.load(Ordering::Acquire);
                        let Some(info) = Info::unpack(word).filter(|i| i.state == State::Live) else {
                            continue;
                        };
                        let Ok(user) = user_of_live(&self.arena, b, class) else {
                            continue;
                        };
                        let back = self.arena.word(user - 8)?.load(Ordering::Relaxed);
                        if dead_process(back >> 16) {
                            small.push((b, info, user, back));
                        }
                    }
                }
                TAG_LARGE if dead_process(self.arena.word(base + 16)?.load(Ordering::Relaxed)) => {
                    large_blocks.push(base);
                }
                _ => {}
            }
            Ok(())
        })?;
        // The journals of slots whose owner died are the unsettled ones (read after the scan:
        // every process it found dead had died by then); their blocks wait for the recovery
        // that settles them, whose judgement freeing them now would mislead.
        let mut unsettled = BTreeSet::new();
        for (offset, _) in self.slots_of_the_dead()? {
            for c in &self.slots.slot(&self.mem, offset)?.body.classes {
                let (block, op, _) = unpack_journal(c.journal.load(Ordering::Acquire));
                if op != 0 {
                    unsettled.insert(block);
                }
            }
        }
        let mut freed = 0;
        for (block, info, user, back) in small {
            if !unsettled.contains(&block) {
                freed += self.free_claimed(slot, block, info, user, back).is_ok() as u64;
            }
        }
        for block in large_blocks {
            freed += large::free_locked(&mut g, &self.fs, &self.arena, block).is_ok() as u64;
        }
        Ok(freed)
    }

    /// Returns spans whose blocks are all on the shared list to the free-space manager, after
    /// flushing the cache in `slot`. A class cache its flush finds damaged keeps its blocks (its
    /// own allocations report it), and the spans are returned all the same; that damage is then
    /// reported, as is any the shared lists hold.
    pub(super) fn trim(&self, slot: CacheSlot) -> Result<()> {
        let flushed = self.flush_all(slot);
        self.release_free_spans(slot)?;
        flushed
    }

    /// Returns spans whose blocks are all on the shared list to the free-space manager. Each list
    /// is relabelled with `slot`'s label while still on the list, then taken whole, so its blocks
    /// stay recoverable while they are off it.
    pub(super) fn release_free_spans(&self, slot: CacheSlot) -> Result<()> {
        let label = slot.label;
        let mut g = self.fs.lock();
        for (class, layout) in LAYOUTS.iter().enumerate() {
            let mut taken = Vec::new();
            {
                let mut list = self.list(class).lock_or_recover(|_| {});
                self.walk_list(*list, |b| {
                    let w = self.arena.info(b)?;
                    let word = w.load(Ordering::Relaxed);
                    let info = Info::unpack(word).filter(|i| i.state == State::Free && i.class == class);
                    let info = info.ok_or(corrupt(b, "shared list holds a block that is not free"))?;
                    w.store(Info { size: label, ..info }.pack(), Ordering::Relaxed);
                    crash::point();
                    taken.push(b);
                    Ok(())
                })?;
                compiler_fence(Ordering::Release);
                *list = 0;
                crash::point();
            }
            let mut per_span: BTreeMap<u64, u64> = BTreeMap::new();
            let mut span_of_block = Vec::with_capacity(taken.len());
            for &b in &taken {
                let info = Info::unpack(self.arena.info(b)?.load(Ordering::Relaxed))
                    .ok_or(corrupt(b, "free block lost its header"))?;
                let span = span_of(b, &info).ok_or(corrupt(b, "free block outside a span"))?;
                *per_span.entry(span).or_default() += 1;
                span_of_block.push(span);
            }
            for (&span, &free) in &per_span {
                if free == layout.blocks {
                    // SAFETY: every block of the span was on the list, which this trim took
                    // whole; the free-space lock is held.
                    unsafe { release_span(&mut g, &self.arena, span) }?;
                    crash::point();
                }
            }
            let keep: Vec<u64> = taken
                .iter()
                .zip(&span_of_block)
                .filter(|(_, span)| per_span[span] != layout.blocks)
                .map(|(&b, _)| b)
                .collect();
            if let (Some(&first), Some(&last)) = (keep.first(), keep.last()) {
                for pair in keep.windows(2) {
                    self.arena.store_link(pair[0], Some(pair[1]));
                }
                self.push_chain(class, first, last)?;
            }
        }
        drop(g);
        Ok(())
    }
}
