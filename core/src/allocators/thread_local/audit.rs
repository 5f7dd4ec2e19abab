//! Reading a thread-local allocator whole: statistics and `check`.

use alloc::collections::{BTreeMap, BTreeSet};

use crate::allocator::AllocStats;
use crate::error::Result;
use crate::sync::atomic::Ordering;
use crate::sync::tagged_list;

use super::super::common::small_reserved;
use super::super::free_space::UNIT;
use super::super::large::{self, TAG_LARGE, TAG_META, TAG_SPAN};
use super::super::size_class::CLASS_COUNT;
use super::super::span::{block_at, corrupt, span_of, Info, SpanHeader, State, LAYOUTS};
use super::heap::{LIST_AVAIL, LIST_CURRENT, LIST_FULL};
use super::Shared;

impl Shared {
    /// Per class: live blocks and allocations, summed over every heap; and live bytes.
    pub(super) fn class_counts(&self) -> Result<([u64; CLASS_COUNT], [u64; CLASS_COUNT], u64)> {
        let mut live = [0u64; CLASS_COUNT];
        let mut allocs = [0u64; CLASS_COUNT];
        let mut bytes = 0u64;
        for offset in self.heaps.offsets(&self.mem)? {
            // Counters of heaps other threads own are read racily: figures, not invariants.
            let local = self.local_snapshot(self.heaps.slot(&self.mem, offset)?);
            for c in 0..CLASS_COUNT {
                live[c] = live[c].wrapping_add(local.classes[c].live);
                allocs[c] = allocs[c].wrapping_add(local.classes[c].allocations);
                bytes = bytes.wrapping_add(local.classes[c].live_bytes);
            }
        }
        Ok((live, allocs, bytes))
    }

    pub(super) fn stats(&self) -> AllocStats {
        let (live, allocs, bytes) = self.class_counts().unwrap_or(([0; CLASS_COUNT], [0; CLASS_COUNT], 0));
        let g = self.fs.lock();
        let live_count = live.iter().fold(g.st.large.live, |a, n| a.wrapping_add(*n));
        let total = allocs.iter().fold(g.st.large.allocations, |a, n| a.wrapping_add(*n));
        AllocStats {
            capacity: self.fs.layout().bytes(),
            bytes_in_use: bytes.wrapping_add(g.st.large.live_bytes),
            bytes_reserved: small_reserved(&live)
                .wrapping_add(g.st.large.live_units * UNIT)
                .wrapping_add(large::meta_bytes(&g)),
            high_watermark: g.peak_used_units() * UNIT,
            live_allocations: live_count,
            total_allocations: total,
            total_frees: total.wrapping_sub(live_count),
        }
    }

    /// Every heap's remote lists and span lists, every span's blocks and free list, every run,
    /// and the counters against what the blocks say.
    pub(super) fn check(&self) -> Result<()> {
        let g = self.fs.lock();
        g.check()?;
        let heaps = self.heaps.offsets(&self.mem)?;
        let heap_set: BTreeSet<u64> = heaps.iter().copied().collect();
        let limit = self.fs.layout().bytes() / 32 + 1;
        // Remote blocks, and each heap's span lists.
        let mut remote = BTreeSet::new();
        let mut filed: BTreeMap<u64, (u64, usize, u32)> = BTreeMap::new();
        for &offset in &heaps {
            let h = self.heaps.slot(&self.mem, offset)?;
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
                let mut file = |span: u64, list: u32| -> Result<()> {
                    if filed.insert(span, (offset, class, list)).is_some() {
                        return Err(corrupt(span, "span filed twice"));
                    }
                    Ok(())
                };
                if local.classes[class].current != 0 {
                    file(local.classes[class].current, LIST_CURRENT)?;
                }
                let (mut at, mut n, mut empty) = (local.avail[class], 0u64, 0u32);
                while at != 0 {
                    n += 1;
                    if n > limit {
                        return Err(corrupt(at, "span stack does not end"));
                    }
                    file(at, LIST_AVAIL)?;
                    let sl = self.arena.span(at)?.local_snapshot();
                    empty += (sl.used == 0) as u32;
                    at = sl.next;
                }
                if empty != local.empty[class] {
                    return Err(corrupt(offset, "heap's count of empty spans is off"));
                }
            }
        }
        let mut live = BTreeMap::<(u64, usize), (u64, u64)>::new();
        let mut spans_seen = 0usize;
        let mut remote_seen = 0usize;
        g.for_each_used(|head, run| {
            let base = self.fs.layout().unit_offset(head);
            match run.tag {
                TAG_SPAN => {
                    let class = run.aux as usize;
                    let layout = LAYOUTS.get(class).ok_or(corrupt(base, "span class"))?;
                    let s: &SpanHeader = self.arena.span(base)?;
                    let owner = s.owner.load(Ordering::Relaxed);
                    if s.class() != class || run.len() != layout.units || !heap_set.contains(&owner) {
                        return Err(corrupt(base, "span header disagrees with the table"));
                    }
                    let sl = s.local_snapshot();
                    if sl.list == LIST_FULL {
                        if filed.contains_key(&base) || sl.free != 0 || sl.bump as u64 != layout.blocks {
                            return Err(corrupt(base, "full span with free blocks or on a list"));
                        }
                    } else {
                        let (fh, fc, fl) = *filed.get(&base).ok_or(corrupt(base, "span on no list of its heap"))?;
                        if fh != owner || fc != class || fl != sl.list {
                            return Err(corrupt(base, "span filed in the wrong place"));
                        }
                        spans_seen += 1;
                    }
                    let bump = sl.bump as u64;
                    if bump > layout.blocks {
                        return Err(corrupt(base, "span bump past its blocks"));
                    }
                    let mut listed = BTreeSet::new();
                    tagged_list::walk(&self.arena, tagged_list::decode(sl.free), layout.blocks + 1, |b| {
                        let info = Info::unpack(self.arena.info(b)?.load(Ordering::Acquire));
                        let ok = info.is_some_and(|i| i.state == State::Free && i.class == class && i.size == 0)
                            && info.and_then(|i| span_of(b, &i)) == Some(base);
                        if !ok || !listed.insert(b) {
                            return Err(corrupt(b, "span free list holds a block that is not its free block"));
                        }
                        Ok(())
                    })?;
                    let mut used = 0u32;
                    let entry = live.entry((owner, class)).or_default();
                    for index in 0..bump {
                        let b = block_at(base, class, index);
                        let info = Info::unpack(self.arena.info(b)?.load(Ordering::Acquire))
                            .filter(|i| i.class == class && i.index == index)
                            .ok_or(corrupt(b, "block header damaged"))?;
                        match info.state {
                            State::Free if listed.contains(&b) => {}
                            State::Free => return Err(corrupt(b, "free block on no list")),
                            State::Live | State::Remote => {
                                if info.state == State::Remote {
                                    if !remote.contains(&b) {
                                        return Err(corrupt(b, "remotely freed block on no remote list"));
                                    }
                                    remote_seen += 1;
                                }
                                if info.size == 0 || info.size > layout.size {
                                    return Err(corrupt(b, "live block size outside its class"));
                                }
                                used += 1;
                                entry.0 += 1;
                                entry.1 += info.size;
                            }
                        }
                    }
                    if used != sl.used {
                        return Err(corrupt(base, "span use count disagrees with its blocks"));
                    }
                }
                TAG_LARGE => {
                    large::check_run(&self.fs, &self.arena, head, run.len())?;
                }
                TAG_META => {
                    if !self.heaps.is_chunk(&self.mem, base)? {
                        return Err(corrupt(base, "metadata run that is no heap chunk"));
                    }
                }
                _ => return Err(corrupt(base, "run with an unknown tag")),
            }
            Ok(())
        })?;
        if spans_seen != filed.len() {
            return Err(corrupt(0, "a heap lists a span that is not in use"));
        }
        if remote_seen != remote.len() {
            return Err(corrupt(0, "remote list holds a block that is not remotely freed"));
        }
        for &offset in &heaps {
            let local = self.local_snapshot(self.heaps.slot(&self.mem, offset)?);
            for class in 0..CLASS_COUNT {
                let (n, bytes) = live.get(&(offset, class)).copied().unwrap_or_default();
                let cs = &local.classes[class];
                if cs.live != n || cs.live_bytes != bytes {
                    return Err(corrupt(offset, "heap counters disagree with its blocks"));
                }
                if cs.allocations < cs.live {
                    return Err(corrupt(offset, "heap has more live blocks than allocations"));
                }
            }
        }
        Ok(())
    }
}
