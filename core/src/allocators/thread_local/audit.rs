//! Reading a thread-local allocator whole: statistics and `check`.

use alloc::collections::{BTreeMap, BTreeSet};

use crate::allocator::AllocStats;
use crate::error::Result;
use crate::sync::atomic::Ordering;
use crate::sync::tagged_list;

use super::super::common::ClassCounts;
use super::super::large::{self, TAG_LARGE, TAG_META, TAG_SPAN};
use super::super::size_class::CLASS_COUNT;
use super::super::span::{block_at, corrupt, live_user_bytes, span_of_word, Info, SpanHeader, State, LAYOUTS};
use super::heap::AWAITING_OWNER;
use super::Shared;

impl Shared {
    /// Per class: live blocks and allocations, summed over every heap; and live bytes.
    pub(super) fn class_counts(&self) -> Result<ClassCounts> {
        let mut counts = ClassCounts::new();
        for offset in self.heaps.offsets(&self.mem)? {
            // Counters of heaps other threads own are read racily: figures, not invariants.
            let local = self.local_snapshot(self.heaps.slot(&self.mem, offset)?);
            for (c, cs) in local.classes.iter().enumerate() {
                // Frees first: the owner counts an allocation before its free, so on a machine
                // that keeps loads and stores in order (x86) a reader that reads the frees first
                // sees no more frees than allocations. The loads are relaxed: on a weaker machine
                // the figures may still cross, and `saturating_sub` keeps live blocks from
                // wrapping below zero there.
                let frees = cs.frees.get();
                let allocations = cs.allocations.get();
                counts.add(c, allocations.saturating_sub(frees), allocations, cs.live_bytes.get());
            }
        }
        Ok(counts)
    }

    /// Walks one of heap `offset`'s free lists of `class` from `head`, recording each block in
    /// `listed` (a block listed before is an error): each must be a free block of one of the
    /// heap's spans of the class. Returns how many it holds.
    fn check_free_list(
        &self,
        head: Option<u64>,
        offset: u64,
        class: usize,
        limit: u64,
        listed: &mut BTreeMap<u64, u64>,
    ) -> Result<u64> {
        tagged_list::walk(&self.arena, head, limit, |b| {
            let word = self.arena.info(b)?.load(Ordering::Acquire);
            let span = span_of_word(b, word);
            let ok = Info::unpack(word).is_some_and(|i| i.state == State::Free && i.class == class && i.size == 0)
                && self.arena.class_span(span, class).is_some_and(|s| s.owner.load(Ordering::Relaxed) == offset);
            if !ok || listed.insert(b, offset).is_some() {
                return Err(corrupt(b, "heap free list holds a block that is not its free block"));
            }
            Ok(())
        })
    }

    pub(super) fn stats(&self) -> AllocStats {
        self.class_counts().unwrap_or(ClassCounts::new()).stats(&self.fs)
    }

    /// Every heap's remote lists and free lists, every span's blocks, every run, and the
    /// counters against what the blocks say.
    pub(super) fn check(&self) -> Result<()> {
        let g = self.fs.lock();
        g.check()?;
        let heaps = self.heaps.offsets(&self.mem)?;
        // Blocks name heaps by number (a remote free its freer, a large run its heap): in index
        // order, each heap's number is its place.
        for (place, &offset) in heaps.iter().enumerate() {
            if u64::from(self.heaps.slot(&self.mem, offset)?.index) != place as u64 {
                return Err(corrupt(offset, "heap's number is not its place in the table"));
            }
        }
        let heap_set: BTreeSet<u64> = heaps.iter().copied().collect();
        let limit = self.fs.layout().bytes() / 32 + 1;
        // Remote blocks, and the free blocks of each heap (block -> heap).
        let mut remote = BTreeSet::new();
        let mut listed: BTreeMap<u64, u64> = BTreeMap::new();
        // Blocks whose remote free a dead thread left to their owner to settle: each named by an
        // orphan slot of the block's owner, for the block's class, through a heap that awaits
        // its owner and whose record names that block, still marked remote by that heap (or
        // no longer: then the block is the owner's as any other).
        let mut orphaned = BTreeSet::new();
        let mut awaited = BTreeSet::new();
        for &offset in &heaps {
            let h = self.heaps.slot(&self.mem, offset)?;
            for (class, o) in h.body.orphans.0.iter().enumerate() {
                let freer = o.load(Ordering::Acquire);
                if freer == 0 {
                    continue;
                }
                let f = self.heaps.slot(&self.mem, freer).ok().filter(|_| heap_set.contains(&freer));
                let f = f.filter(|f| f.owner.load(Ordering::Acquire) == AWAITING_OWNER).ok_or(corrupt(
                    offset,
                    "an orphan slot names a heap that does not await its owner (reclaim first)",
                ))?;
                if h.owner.load(Ordering::Acquire) == AWAITING_OWNER {
                    // No thread collects for it: a drain must (two heaps awaiting each other).
                    return Err(corrupt(offset, "a heap awaiting its owner has a freer awaiting it (reclaim first)"));
                }
                let r = f.body.in_flight.read();
                let r = r.filter(|&r| r.owner == offset && r.class == class).ok_or(corrupt(
                    freer,
                    "an orphaned remote free is no block of the heap and class that settle it",
                ))?;
                // A block no longer marked by the freer was pushed, and collected between its
                // repairer's test and its posting: the owner's settle just lets the heap go.
                let marked = self.orphan_block(offset, class, freer, r).is_some();
                if !awaited.insert(freer) || (marked && !orphaned.insert(r.block)) {
                    return Err(corrupt(freer, "an orphaned remote free is named twice"));
                }
            }
        }
        let freers = self.freer_heaps()?;
        for &offset in &heaps {
            let h = self.heaps.slot(&self.mem, offset)?;
            if h.body.in_flight.block() != 0 && !awaited.contains(&offset) {
                return Err(corrupt(offset, "a remote free was left half done (reclaim first)"));
            }
            if h.owner.load(Ordering::Acquire) == AWAITING_OWNER && !awaited.contains(&offset) {
                return Err(corrupt(offset, "a heap awaits an owner that no orphan slot names it to (reclaim first)"));
            }
            let local = self.local_snapshot(h);
            for class in 0..CLASS_COUNT {
                if h.body.pending.0[class].load(Ordering::Acquire) != 0 {
                    return Err(corrupt(offset, "a remote collection was left half done (reclaim first)"));
                }
                tagged_list::walk(&self.arena, h.body.remote.0[class].peek(), limit, |b| {
                    if !remote.insert(b) {
                        return Err(corrupt(b, "block on remote lists twice"));
                    }
                    Ok(())
                })?;
                let cs = &local.classes[class];
                let mut n = 0;
                for head in cs.lists() {
                    n += self.check_free_list(head, offset, class, limit, &mut listed)?;
                }
                if n != cs.count() {
                    return Err(corrupt(offset, "heap free list longer or shorter than its count"));
                }
                let bump_span = cs.bump_span.get();
                if bump_span != 0
                    && self.arena.class_span(bump_span, class).is_none_or(|s| s.owner.load(Ordering::Relaxed) != offset)
                {
                    return Err(corrupt(bump_span, "heap bumps into a span that is not its own"));
                }
            }
        }
        let mut live = BTreeMap::<(u64, usize), (u64, u64)>::new();
        let mut free_seen = 0usize;
        let mut remote_seen = 0usize;
        let mut large_runs = large::LargeTally::default();
        g.for_each_used(|head, run| {
            let base = self.fs.layout().unit_offset(head);
            match run.tag {
                TAG_SPAN => {
                    let class = run.aux as usize;
                    let layout = LAYOUTS.get(class).ok_or(corrupt(base, "span class"))?;
                    let s: &SpanHeader = self
                        .arena
                        .class_span(base, class)
                        .ok_or(corrupt(base, "span header disagrees with the table"))?;
                    let owner = s.owner.load(Ordering::Relaxed);
                    if run.len() != layout.units || !heap_set.contains(&owner) {
                        return Err(corrupt(base, "span header disagrees with the table"));
                    }
                    let bump = u64::from(s.bump().load(Ordering::Relaxed));
                    if bump > layout.blocks {
                        return Err(corrupt(base, "span bump past its blocks"));
                    }
                    let entry = live.entry((owner, class)).or_default();
                    for index in 0..bump {
                        let b = block_at(base, class, index);
                        let info = Info::unpack(self.arena.info(b)?.load(Ordering::Acquire))
                            .filter(|i| i.class == class && i.index == index)
                            .ok_or(corrupt(b, "block header damaged"))?;
                        match info.state {
                            State::Free if listed.get(&b) == Some(&owner) => free_seen += 1,
                            State::Free => return Err(corrupt(b, "free block on no list of its heap")),
                            State::Live | State::Remote => {
                                if info.state == State::Remote {
                                    if remote.contains(&b) {
                                        remote_seen += 1;
                                    } else if !orphaned.contains(&b) {
                                        return Err(corrupt(b, "remotely freed block on no remote list"));
                                    }
                                }
                                let stamp = self.arena.word(b + 8)?.load(Ordering::Relaxed);
                                if info.state == State::Live && heap_set.contains(&stamp) && stamp != owner {
                                    return Err(corrupt(b, "live block stamped with another heap"));
                                }
                                // A live block's size is bounded by its user bytes, which a
                                // padded block has fewer of than its class's size (`size_of` and
                                // `reallocate` refuse more); a remote one's by its class.
                                let (size, room) = match info.state {
                                    // The word names the freer; the size is elsewhere.
                                    State::Remote => (self.remote_size(&freers, b, info.size)?, layout.size),
                                    _ => (info.size, live_user_bytes(&self.arena, b, class)?),
                                };
                                if size == 0 || size > room {
                                    return Err(corrupt(b, "live block size past its user bytes"));
                                }
                                entry.0 += 1;
                                entry.1 += size;
                            }
                        }
                    }
                }
                TAG_LARGE => large_runs.add_run(&self.fs, &self.arena, head, run.len())?,
                TAG_META => {
                    if !self.heaps.is_chunk(&self.mem, base)? {
                        return Err(corrupt(base, "metadata run that is no heap chunk"));
                    }
                }
                _ => return Err(corrupt(base, "run with an unknown tag")),
            }
            Ok(())
        })?;
        if free_seen != listed.len() {
            return Err(corrupt(0, "a heap free list holds a block outside its spans"));
        }
        if remote_seen != remote.len() {
            return Err(corrupt(0, "remote list holds a block that is not remotely freed"));
        }
        large_runs.check(&g)?;
        for &offset in &heaps {
            let local = self.local_snapshot(self.heaps.slot(&self.mem, offset)?);
            for class in 0..CLASS_COUNT {
                let (n, bytes) = live.get(&(offset, class)).copied().unwrap_or_default();
                let cs = &local.classes[class];
                if cs.live() != n || cs.live_bytes.get() != bytes {
                    return Err(corrupt(offset, "heap counters disagree with its blocks"));
                }
                if cs.frees.get() > cs.allocations.get() {
                    return Err(corrupt(offset, "heap has more frees than allocations"));
                }
            }
        }
        Ok(())
    }
}
