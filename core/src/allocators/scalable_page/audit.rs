//! Reading a page allocator whole: statistics and `check`.

use alloc::collections::BTreeMap;

use crate::allocator::AllocStats;
use crate::error::Result;
use crate::sync::atomic::Ordering;
use crate::sync::LinkStore;

use super::super::common::ClassCounts;
use super::super::large::{self, TAG_LARGE, TAG_META, TAG_SPAN};
use super::super::size_class::CLASS_COUNT;
use super::super::span::{block_at, corrupt, live_user_bytes, span_of, Info, State, LAYOUTS};
use super::cache::{label_of, unpack_head};
use super::Shared;

impl Shared {
    /// Per class: live blocks and allocations, summed over every thread cache; and live bytes.
    pub(super) fn class_counts(&self) -> Result<ClassCounts> {
        let mut counts = ClassCounts::new();
        for offset in self.slots.offsets(&self.mem)? {
            let s = self.slots.slot(&self.mem, offset)?;
            for (c, cache) in s.body.classes.iter().enumerate() {
                let load = |w: &crate::sync::atomic::AtomicU64| w.load(Ordering::Relaxed);
                counts.add(c, load(&cache.live), load(&cache.allocations), load(&cache.bytes));
            }
        }
        Ok(counts)
    }

    pub(super) fn stats(&self) -> AllocStats {
        self.class_counts().unwrap_or(ClassCounts::new()).stats(&self.fs)
    }

    /// The runs, every span's blocks, the shared lists and every cache: each free block is on
    /// exactly one list or cache (of its class; a cache holds only its label), and the counters
    /// add up to what the blocks say.
    pub(super) fn check(&self) -> Result<()> {
        let g = self.fs.lock();
        g.check()?;
        let limit = self.fs.layout().bytes() / 32 + 1;
        // Where each free block is: class by class, the shared list and then every cache.
        let mut placed: BTreeMap<u64, usize> = BTreeMap::new();
        for class in 0..CLASS_COUNT {
            let list = self.list(class).lock_or_recover(|_| {});
            self.walk_list(*list, |b| {
                if placed.insert(b, class).is_some() {
                    return Err(corrupt(b, "block on a free list twice"));
                }
                Ok(())
            })?;
        }
        for (place, offset) in self.slots.offsets(&self.mem)?.into_iter().enumerate() {
            let s = self.slots.slot(&self.mem, offset)?;
            // A cache labels its blocks with its slot's number (in index order, its place), by
            // which a recovery finds them: damaged, it names another slot's.
            if u64::from(s.index) != place as u64 {
                return Err(corrupt(offset, "slot's number is not its place in the table"));
            }
            let label = label_of(u64::from(s.index));
            for (class, cache) in s.body.classes.iter().enumerate() {
                let (mut at, count) = unpack_head(cache.head.load(Ordering::Relaxed));
                for _ in 0..count {
                    if at == 0 || placed.len() as u64 > limit {
                        return Err(corrupt(offset, "thread cache shorter than its count"));
                    }
                    let info = Info::unpack(self.arena.info(at)?.load(Ordering::Acquire));
                    if info.is_none_or(|i| i.size != label) {
                        return Err(corrupt(at, "thread cache holds a block of another cache"));
                    }
                    if placed.insert(at, class).is_some() {
                        return Err(corrupt(at, "block on a free list twice"));
                    }
                    at = self.arena.load_link(at)?.unwrap_or(0);
                }
                if at != 0 {
                    return Err(corrupt(offset, "thread cache longer than its count"));
                }
            }
        }
        let mut live = [0u64; CLASS_COUNT];
        let mut bytes = 0u64;
        let (mut free_seen, mut large_runs) = (0usize, large::LargeTally::default());
        g.for_each_used(|head, run| {
            let base = self.fs.layout().unit_offset(head);
            match run.tag {
                TAG_SPAN => {
                    let class = run.aux as usize;
                    let layout = LAYOUTS.get(class).ok_or(corrupt(base, "span class"))?;
                    if run.len() != layout.units || self.arena.class_span(base, class).is_none() {
                        return Err(corrupt(base, "span header disagrees with the table"));
                    }
                    for index in 0..layout.blocks {
                        let b = block_at(base, class, index);
                        let info = Info::unpack(self.arena.info(b)?.load(Ordering::Acquire))
                            .filter(|i| i.class == class && i.index == index && span_of(b, i) == Some(base))
                            .ok_or(corrupt(b, "block header damaged"))?;
                        match info.state {
                            State::Free if placed.get(&b) == Some(&class) => free_seen += 1,
                            State::Free => return Err(corrupt(b, "free block on no list and in no cache")),
                            State::Live => {
                                // Bounded by the user bytes, which a padded block has fewer of
                                // than its class's size: `size_of` and `reallocate` refuse more.
                                if info.size == 0 || info.size > live_user_bytes(&self.arena, b, class)? {
                                    return Err(corrupt(b, "live block size past its user bytes"));
                                }
                                live[class] += 1;
                                bytes += info.size;
                            }
                            State::Remote => return Err(corrupt(b, "remote state in a shared-list allocator")),
                        }
                    }
                }
                TAG_LARGE => {
                    large_runs.add_run(&self.fs, &self.arena, head, run.len())?;
                }
                TAG_META => {
                    if !self.slots.is_chunk(&self.mem, base)? {
                        return Err(corrupt(base, "metadata run that is no slot chunk"));
                    }
                }
                _ => return Err(corrupt(base, "run with an unknown tag")),
            }
            Ok(())
        })?;
        if free_seen != placed.len() {
            return Err(corrupt(0, "a list or cache holds a block outside every span"));
        }
        large_runs.check(&g)?;
        drop(g);
        let counted = self.class_counts()?;
        if counted.live != live || counted.bytes != bytes {
            return Err(corrupt(0, "live counters disagree with the blocks"));
        }
        Ok(())
    }
}
