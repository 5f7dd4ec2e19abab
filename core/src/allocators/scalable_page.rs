//! [`ScalablePageAllocator`]: size-classed free lists in one table shared by every process.
//!
//! ```text
//! region start  header: type, id, free-space layout
//!               shards[8][36]   lock-free tagged free lists, one per shard and size class
//!               stripes[16]     counters (live blocks and bytes per class, allocations, frees)
//!               free-space state (mutex)
//! table, arena  the free-space manager's descriptors and units: spans and large blocks
//! ```
//!
//! A small request pops a block of its class from the calling thread's shard (other shards
//! when that one is empty); when all are empty a new span of the class is carved from the
//! free-space manager and pushed onto the shard in one CAS. Frees push onto the freeing thread's
//! shard. Shards only spread contention: every process may pop from every shard. Requests above
//! 16 KiB take whole 4 KiB units from the free-space manager (best fit, split, merge).
//!
//! When space runs short, spans whose blocks are all free go back to the free-space manager
//! ([`ScalablePageAllocator::trim`]), and, with [`DeadProcessBlocks::Free`], blocks held by dead
//! processes are freed. Crash safety: the lists are lock-free (one CAS per operation) and the
//! free-space mutex is recovered from a dead holder; a process killed between taking a block
//! off a list and handing it out loses that block (at most one per death), which
//! [`check`](RegionAllocator::check) tolerates and reports in [`ScalablePageAllocator::lost_blocks`].

use core::ptr::NonNull;

use crate::allocator::{AllocStats, AllocatorType, RegionAllocator};
use crate::allocators::check_request;
use crate::error::{Error, Result};
use crate::liveness::{self, ProcessStamp};
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::Region;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::tagged_list::{self, TaggedOffsetList};
use crate::sync::Mutex;

use super::common::{
    class_stats, small_reserved, thread_number, ClassStats, CommonHeader, DeadProcessBlocks, FLAG_FREE_DEAD,
};
use super::free_space::{FreeSpace, FreeSpaceGuard, FreeSpaceLayout, FreeSpaceState, UNIT};
use super::large::{self, TAG_LARGE, TAG_SPAN};
use super::size_class::CLASS_COUNT;
use super::span::{
    back_word, block_at, block_of_user, class_for, corrupt, init_span, invalid, span_class, span_of, user_of, Info,
    Mem, State, LARGE_CLASS, LAYOUTS, SMALL_HEADER,
};

const TYPE_ID: u32 = 0x5350_4131; // "SPA1"
const SHARDS: usize = 8;
const STRIPES: usize = 16;

/// Options for [`ScalablePageAllocator`].
#[derive(Clone, Debug, Default)]
pub struct ScalablePageConfig {
    /// What happens to blocks a dead process still held.
    pub dead_process_blocks: DeadProcessBlocks,
}

#[repr(C, align(64))]
struct Shard {
    lists: [TaggedOffsetList; CLASS_COUNT],
}

#[repr(C, align(64))]
struct Stripe {
    live: [AtomicU64; CLASS_COUNT],
    allocations: [AtomicU64; CLASS_COUNT],
    live_bytes: AtomicU64,
    frees: AtomicU64,
}

#[repr(C)]
struct SpaHeader {
    common: CommonHeader,
    shards: [Shard; SHARDS],
    stripes: [Stripe; STRIPES],
    free_space: Mutex<FreeSpaceState>,
}

/// A size-classed allocator whose free lists are shared by all processes. See the
/// [module docs](self).
pub struct ScalablePageAllocator {
    region: Region,
    id: AllocatorId,
    header: NonNull<SpaHeader>,
    mem: Mem,
    fs: FreeSpace,
    stamp: u64,
}

// SAFETY: `header` points into `region`, which the handle keeps mapped; everything in the header
// is atomics, lock-free lists, or state behind the free-space mutex.
unsafe impl Send for ScalablePageAllocator {}
// SAFETY: as for Send.
unsafe impl Sync for ScalablePageAllocator {}

/// The 48-bit stamp blocks record: pid and the low 16 bits of its start time.
pub(crate) fn short_stamp(s: ProcessStamp) -> u64 {
    ((s.pid as u64) << 16) | (s.start_time & 0xffff)
}

/// The process a short stamp names.
pub(crate) fn stamp_process(stamp: u64) -> ProcessStamp {
    ProcessStamp { pid: (stamp >> 16) as u32, start_time: stamp & 0xffff }
}

impl ScalablePageAllocator {
    fn open(region: Region, id: AllocatorId, layout: FreeSpaceLayout) -> Result<Self> {
        let header_len = core::mem::size_of::<SpaHeader>() as u64;
        let ptr = region.ptr(region.offset(), header_len)?.cast::<SpaHeader>();
        let header = NonNull::new(ptr).ok_or(corrupt(region.offset(), "null header"))?;
        let state_offset = region.offset() + core::mem::offset_of!(SpaHeader, free_space) as u64;
        // SAFETY: the header (written by `create`) holds the free-space state at this offset.
        let fs = unsafe { FreeSpace::new(region.clone(), state_offset, layout) }?;
        let mem = Mem::of(&region, layout.arena, layout.arena + layout.bytes())?;
        Ok(ScalablePageAllocator { region, id, header, mem, fs, stamp: short_stamp(liveness::current()) })
    }

    fn header(&self) -> &SpaHeader {
        // SAFETY: checked in bounds in `open`; the region stays mapped; all fields are atomics,
        // lists, a mutex, or plain words written once at creation.
        unsafe { self.header.as_ref() }
    }

    fn free_dead(&self) -> bool {
        self.header().common.flags & FLAG_FREE_DEAD != 0
    }

    fn stripe(&self) -> &Stripe {
        &self.header().stripes[thread_number() % STRIPES]
    }

    fn list(&self, shard: usize, class: usize) -> &TaggedOffsetList {
        &self.header().shards[shard % SHARDS].lists[class]
    }

    fn allocate_small(&self, class: usize, size: usize, align: usize) -> Result<u64> {
        let home = thread_number();
        let block = match self.pop_any(home, class)? {
            Some(b) => b,
            None => self.refill(home, class, size)?,
        };
        let info = Info::unpack(self.mem.info(block)?.load(Ordering::Acquire))
            .filter(|i| i.state == State::Free && i.class == class)
            .ok_or(corrupt(block, "free list holds a block that is not free"))?;
        let stripe = self.stripe();
        stripe.live[class].fetch_add(1, Ordering::Relaxed);
        stripe.allocations[class].fetch_add(1, Ordering::Relaxed);
        stripe.live_bytes.fetch_add(size as u64, Ordering::Relaxed);
        let user = user_of(block, SMALL_HEADER, align as u64);
        self.mem.word(user - 8)?.store(back_word(user - block, self.stamp), Ordering::Relaxed);
        let live = Info { state: State::Live, size: size as u64, ..info };
        self.mem.info(block)?.store(live.pack(), Ordering::Release);
        Ok(user)
    }

    fn pop_any(&self, home: usize, class: usize) -> Result<Option<u64>> {
        for k in 0..SHARDS {
            if let Some(b) = self.list(home + k, class).pop(&self.mem)? {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// Carves a new span for `class` into the home shard and returns one of its blocks; when
    /// space is short, trims and reclaims first.
    fn refill(&self, home: usize, class: usize, size: usize) -> Result<u64> {
        for attempt in 0..3 {
            {
                let mut g = self.fs.lock();
                if let Some(b) = self.carve(&mut g, home, class)? {
                    return Ok(b);
                }
            }
            if let Some(b) = self.pop_any(home, class)? {
                return Ok(b);
            }
            match attempt {
                0 => self.trim()?,
                _ => {
                    self.reclaim()?;
                }
            }
        }
        Err(Error::OutOfMemory { requested: size as u64, available: self.stats().free_bytes() })
    }

    /// Takes a span from the free-space manager, formats its blocks, keeps the first and pushes
    /// the rest onto the home shard.
    fn carve(&self, g: &mut FreeSpaceGuard<'_>, home: usize, class: usize) -> Result<Option<u64>> {
        let layout = LAYOUTS[class];
        let Some(head) = g.alloc(layout.units, TAG_SPAN, class as u32) else {
            return Ok(None);
        };
        let span = self.fs.layout().unit_offset(head);
        // SAFETY: the units were just taken from the free-space manager: ours alone.
        unsafe { init_span(&self.mem, span, class, 0) }?;
        for index in 0..layout.blocks {
            let b = block_at(span, class, index);
            let info = Info { state: State::Free, class, index, size: 0 };
            self.mem.info(b)?.store(info.pack(), Ordering::Relaxed);
            let next = (index + 1 < layout.blocks).then(|| block_at(span, class, index + 1));
            if index >= 1 {
                self.mem.word(b + 8)?.store(tagged_list::encode(next), Ordering::Relaxed);
            }
        }
        if layout.blocks > 1 {
            let first = block_at(span, class, 1);
            let last = block_at(span, class, layout.blocks - 1);
            self.list(home, class).push_chain(&self.mem, first, last);
        }
        Ok(Some(block_at(span, class, 0)))
    }

    fn free_small(&self, block: u64, info: Info) -> Result<()> {
        let span = span_of(block, &info).ok_or(invalid(block, "not a block of this allocator"))?;
        let h = self.mem.span(span)?;
        if span_class(h) != info.class {
            return Err(invalid(block, "not a block of this allocator"));
        }
        self.mem
            .info(block)?
            .compare_exchange(info.pack(), info.with_state(State::Free).pack(), Ordering::AcqRel, Ordering::Relaxed)
            .map_err(|_| invalid(block, "already freed"))?;
        let stripe = self.stripe();
        stripe.live[info.class].fetch_sub(1, Ordering::Relaxed);
        stripe.live_bytes.fetch_sub(info.size, Ordering::Relaxed);
        stripe.frees.fetch_add(1, Ordering::Relaxed);
        self.list(thread_number(), info.class).push(&self.mem, block);
        Ok(())
    }

    /// The live block whose user bytes start at `user`.
    fn live_block(&self, user: u64) -> Result<(u64, Info)> {
        let (block, info, _) = block_of_user(&self.mem, user)?;
        if info.state != State::Live {
            return Err(invalid(user, "already freed"));
        }
        Ok((block, info))
    }

    /// Returns spans whose blocks are all free to the free-space manager, so their space serves
    /// any size again. Safe to call at any time; allocations running meanwhile may carve new
    /// spans instead of reusing the ones being examined.
    pub fn trim(&self) -> Result<()> {
        let mut g = self.fs.lock();
        for class in 0..CLASS_COUNT {
            self.trim_class(&mut g, class)?;
        }
        Ok(())
    }

    fn trim_class(&self, g: &mut FreeSpaceGuard<'_>, class: usize) -> Result<()> {
        use alloc::collections::BTreeMap;
        let layout = LAYOUTS[class];
        let limit = self.fs.layout().bytes() / 32;
        let mut taken = alloc::vec::Vec::new();
        for shard in 0..SHARDS {
            let first = self.list(shard, class).take_all();
            tagged_list::walk(&self.mem, first, limit, |b| {
                taken.push(b);
                Ok(())
            })?;
        }
        let mut per_span: BTreeMap<u64, u64> = BTreeMap::new();
        for &b in &taken {
            let info = Info::unpack(self.mem.info(b)?.load(Ordering::Acquire))
                .ok_or(corrupt(b, "free list holds a block with no header"))?;
            let span = span_of(b, &info).ok_or(corrupt(b, "free block outside a span"))?;
            *per_span.entry(span).or_default() += 1;
        }
        for (&span, &free) in &per_span {
            if free == layout.blocks {
                let head = self.fs.layout().unit_of(span).ok_or(corrupt(span, "span outside the arena"))?;
                g.free(head)?;
            }
        }
        let keep: alloc::vec::Vec<u64> = taken
            .into_iter()
            .filter(|b| {
                Info::unpack(self.mem.info(*b).map_or(0, |w| w.load(Ordering::Relaxed)))
                    .and_then(|i| span_of(*b, &i))
                    .is_some_and(|s| per_span.get(&s) != Some(&layout.blocks))
            })
            .collect();
        if let (Some(&first), Some(&last)) = (keep.first(), keep.last()) {
            for pair in keep.windows(2) {
                tagged_list::LinkStore::store_link(&self.mem, pair[0], Some(pair[1]));
            }
            self.list(0, class).push_chain(&self.mem, first, last);
        }
        Ok(())
    }

    /// Frees the blocks of processes that have died, if the allocator was created with
    /// [`DeadProcessBlocks::Free`]; returns how many. Called on attach and when space runs short.
    pub fn reclaim(&self) -> Result<u64> {
        if !self.free_dead() {
            return Ok(0);
        }
        use alloc::collections::BTreeMap;
        let mut verdict: BTreeMap<u64, bool> = BTreeMap::new();
        let mut dead_blocks = alloc::vec::Vec::new();
        {
            let g = self.fs.lock();
            g.for_each_used(|head, run| {
                let base = self.fs.layout().unit_offset(head);
                match run.tag {
                    TAG_SPAN => {
                        let class = run.aux as usize;
                        let layout = LAYOUTS.get(class).ok_or(corrupt(base, "span class"))?;
                        for index in 0..layout.blocks {
                            let b = block_at(base, class, index);
                            let info = Info::unpack(self.mem.info(b)?.load(Ordering::Acquire));
                            if info.is_some_and(|i| i.state == State::Live) {
                                if let Ok((_, _, stamp)) = block_of_user(&self.mem, self.user_of_live(b)?) {
                                    if *verdict.entry(stamp).or_insert_with(|| {
                                        stamp != self.stamp && liveness::is_dead(stamp_process(stamp))
                                    }) {
                                        dead_blocks.push((false, self.user_of_live(b)?));
                                    }
                                }
                            }
                        }
                    }
                    TAG_LARGE => {
                        let stamp = self.mem.word(base + 16)?.load(Ordering::Relaxed);
                        if *verdict
                            .entry(stamp)
                            .or_insert_with(|| stamp != self.stamp && liveness::is_dead(stamp_process(stamp)))
                        {
                            dead_blocks.push((true, base));
                        }
                    }
                    _ => {}
                }
                Ok(())
            })?;
        }
        let mut freed = 0;
        for (is_large, target) in dead_blocks {
            let done = if is_large {
                large::free(&self.fs, &self.mem, target).is_ok()
            } else {
                self.free(OffsetPtr::new(target)).is_ok()
            };
            freed += done as u64;
        }
        Ok(freed)
    }

    /// The user offset of the live small block at `block`: where its back word points from.
    fn user_of_live(&self, block: u64) -> Result<u64> {
        // The back word sits right before the user bytes; for unpadded blocks that is the
        // block's second word. Padded blocks have their back word further in, at a 16-byte
        // step: scan the (at most 256) candidate positions of the block.
        let info = Info::unpack(self.mem.info(block)?.load(Ordering::Acquire))
            .ok_or(corrupt(block, "block without header"))?;
        let stride = LAYOUTS[info.class].stride;
        let mut user = block + SMALL_HEADER;
        while user < block + stride {
            let w = self.mem.word(user - 8)?.load(Ordering::Relaxed);
            if w & 0xffff == user - block {
                return Ok(user);
            }
            user += 16;
        }
        Err(corrupt(block, "live block without a back word"))
    }

    /// Free blocks that are on no free list: each is a block a killed process had taken off a
    /// list but not yet handed out. Walks everything; call while no one allocates or frees.
    pub fn lost_blocks(&self) -> Result<u64> {
        Ok(self.audit()?.lost)
    }

    /// Per size class: block size, live blocks, allocations since creation.
    pub fn class_stats(&self) -> alloc::vec::Vec<ClassStats> {
        let (live, allocs) = self.class_counts();
        class_stats(&live, &allocs)
    }

    fn class_counts(&self) -> ([u64; CLASS_COUNT], [u64; CLASS_COUNT]) {
        let mut live = [0u64; CLASS_COUNT];
        let mut allocs = [0u64; CLASS_COUNT];
        for s in &self.header().stripes {
            for c in 0..CLASS_COUNT {
                live[c] = live[c].wrapping_add(s.live[c].load(Ordering::Relaxed));
                allocs[c] = allocs[c].wrapping_add(s.allocations[c].load(Ordering::Relaxed));
            }
        }
        (live, allocs)
    }

    /// Walks every structure (see `check`) and counts what it found.
    fn audit(&self) -> Result<Audit> {
        use alloc::collections::BTreeSet;
        let g = self.fs.lock();
        g.check()?;
        let limit = self.fs.layout().bytes() / 32 + 1;
        let mut listed = BTreeSet::new();
        for shard in 0..SHARDS {
            for class in 0..CLASS_COUNT {
                let first = self.list(shard, class).peek();
                tagged_list::walk(&self.mem, first, limit, |b| {
                    let info = Info::unpack(self.mem.info(b)?.load(Ordering::Acquire));
                    if info.is_none_or(|i| i.state != State::Free || i.class != class) {
                        return Err(corrupt(b, "free list holds a block that is not free"));
                    }
                    if !listed.insert(b) {
                        return Err(corrupt(b, "block on a free list twice"));
                    }
                    Ok(())
                })?;
            }
        }
        let mut a = Audit { live: [0; CLASS_COUNT], live_bytes: 0, large: 0, large_bytes: 0, lost: 0 };
        let mut seen_listed = 0usize;
        g.for_each_used(|head, run| {
            let base = self.fs.layout().unit_offset(head);
            match run.tag {
                TAG_SPAN => {
                    let class = run.aux as usize;
                    let layout = LAYOUTS.get(class).ok_or(corrupt(base, "span class"))?;
                    if run.len() != layout.units {
                        return Err(corrupt(base, "span length does not fit its class"));
                    }
                    let h = self.mem.span(base)?;
                    if span_class(h) != class {
                        return Err(corrupt(base, "span header disagrees with the table"));
                    }
                    for index in 0..layout.blocks {
                        let b = block_at(base, class, index);
                        let info = Info::unpack(self.mem.info(b)?.load(Ordering::Acquire))
                            .filter(|i| i.class == class && i.index == index)
                            .ok_or(corrupt(b, "block header damaged"))?;
                        match info.state {
                            State::Free if listed.contains(&b) => seen_listed += 1,
                            State::Free => a.lost += 1,
                            State::Live => {
                                if info.size == 0 || info.size > layout.size {
                                    return Err(corrupt(b, "live block size outside its class"));
                                }
                                a.live[class] += 1;
                                a.live_bytes += info.size;
                            }
                            State::Remote => return Err(corrupt(b, "remote state in a shared-list allocator")),
                        }
                    }
                }
                TAG_LARGE => {
                    a.large += 1;
                    a.large_bytes += large::check_run(&self.fs, &self.mem, head, run.len())?;
                }
                _ => return Err(corrupt(base, "run with an unknown tag")),
            }
            Ok(())
        })?;
        if seen_listed != listed.len() {
            return Err(corrupt(0, "free list holds a block outside every span"));
        }
        if a.large != g.st.large.live || a.large_bytes != g.st.large.live_bytes {
            return Err(corrupt(0, "large-block counters disagree with the runs"));
        }
        drop(g);
        // Counters may lead the blocks by the blocks a killed process had counted but not yet
        // marked: never more than the lost blocks.
        let (live, _) = self.class_counts();
        let counted: u64 = live.iter().fold(0, |s, n| s.wrapping_add(*n));
        let found: u64 = a.live.iter().sum();
        let excess = counted.wrapping_sub(found);
        if (0..CLASS_COUNT).any(|c| (live[c].wrapping_sub(a.live[c]) as i64) < 0) || excess > a.lost {
            return Err(corrupt(0, "live counters disagree with the blocks"));
        }
        let bytes =
            self.header().stripes.iter().fold(0u64, |s, st| s.wrapping_add(st.live_bytes.load(Ordering::Relaxed)));
        if excess == 0 && bytes != a.live_bytes {
            return Err(corrupt(0, "live byte counter disagrees with the blocks"));
        }
        Ok(a)
    }
}

struct Audit {
    live: [u64; CLASS_COUNT],
    live_bytes: u64,
    large: u64,
    large_bytes: u64,
    lost: u64,
}

impl RegionAllocator for ScalablePageAllocator {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn type_name(&self) -> &'static str {
        "scalable-page"
    }

    fn region(&self) -> &Region {
        &self.region
    }

    fn allocate(&self, size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(size, align)?;
        let user = match class_for(size, align) {
            Some(class) => self.allocate_small(class, size, align)?,
            None => {
                for attempt in 0..3 {
                    {
                        let mut g = self.fs.lock();
                        if let Some(u) = large::allocate(&mut g, &self.fs, &self.mem, size, align, 0, self.stamp)? {
                            return Ok(OffsetPtr::new(u));
                        }
                    }
                    if attempt == 0 {
                        self.trim()?;
                    } else {
                        self.reclaim()?;
                    }
                }
                return Err(Error::OutOfMemory {
                    requested: size as u64,
                    available: self.fs.lock().free_units() * UNIT,
                });
            }
        };
        Ok(OffsetPtr::new(user))
    }

    fn reallocate(&self, ptr: OffsetPtr, new_size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(new_size, align)?;
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        let (block, info) = self.live_block(user)?;
        let old_size;
        if info.class == LARGE_CLASS {
            if large::resize_in_place(&self.fs, &self.mem, block, user, new_size, align)? {
                return Ok(ptr);
            }
            old_size = large::size_of(&self.fs, &self.mem, block)?;
        } else {
            old_size = info.size;
            let room = block + LAYOUTS[info.class].stride - user;
            let fits = user % align as u64 == 0 && new_size as u64 <= room;
            // Stay in place unless the block would be mostly empty.
            if fits && class_for(new_size, align).is_some_and(|c| c + 4 >= info.class) {
                let resized = Info { size: new_size as u64, ..info };
                self.mem
                    .info(block)?
                    .compare_exchange(info.pack(), resized.pack(), Ordering::AcqRel, Ordering::Relaxed)
                    .map_err(|_| invalid(user, "freed while being resized"))?;
                let stripe = self.stripe();
                stripe.live_bytes.fetch_add(new_size as u64, Ordering::Relaxed);
                stripe.live_bytes.fetch_sub(info.size, Ordering::Relaxed);
                return Ok(ptr);
            }
        }
        let new = self.allocate(new_size, align)?;
        self.mem.copy(user, new.get(), old_size.min(new_size as u64))?;
        self.free(ptr)?;
        Ok(new)
    }

    fn free(&self, ptr: OffsetPtr) -> Result<()> {
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        let (block, info) = self.live_block(user)?;
        if info.class == LARGE_CLASS {
            return large::free(&self.fs, &self.mem, block);
        }
        self.free_small(block, info)
    }

    fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        let (block, info) = self.live_block(user)?;
        if info.class == LARGE_CLASS {
            return large::size_of(&self.fs, &self.mem, block).map(|s| s as usize);
        }
        Ok(info.size as usize)
    }

    /// `bytes_reserved` counts live blocks with their headers and class rounding, and large
    /// blocks' whole runs; free blocks cached in spans are free capacity (trimmed back to the
    /// free-space manager when space runs short). `high_watermark` is the most the free-space
    /// manager had handed out at once (spans and large blocks), an upper bound of the former.
    fn stats(&self) -> AllocStats {
        let (live, allocs) = self.class_counts();
        let mut bytes_in_use = 0u64;
        let mut frees = 0u64;
        for s in &self.header().stripes {
            bytes_in_use = bytes_in_use.wrapping_add(s.live_bytes.load(Ordering::Relaxed));
            frees = frees.wrapping_add(s.frees.load(Ordering::Relaxed));
        }
        let g = self.fs.lock();
        AllocStats {
            capacity: self.fs.layout().bytes(),
            bytes_in_use: bytes_in_use.wrapping_add(g.st.large.live_bytes),
            bytes_reserved: small_reserved(&live).wrapping_add(g.st.large.live_units * UNIT),
            high_watermark: g.peak_used_units() * UNIT,
            live_allocations: live.iter().fold(g.st.large.live, |s, n| s.wrapping_add(*n)),
            total_allocations: allocs.iter().fold(g.st.large.allocations, |s, n| s.wrapping_add(*n)),
            total_frees: frees.wrapping_add(g.st.large.frees),
        }
    }

    fn check(&self) -> Result<()> {
        self.audit().map(|_| ())
    }
}

impl AllocatorType for ScalablePageAllocator {
    const TYPE_ID: u32 = TYPE_ID;
    type Config = ScalablePageConfig;

    fn create(region: Region, id: AllocatorId, config: &ScalablePageConfig) -> Result<Self> {
        let header_len = core::mem::size_of::<SpaHeader>() as u64;
        let header_end = region.offset() + header_len;
        let layout = FreeSpaceLayout::plan(header_end, region.end())?;
        let ptr = region.ptr(region.offset(), header_len)?;
        // SAFETY: in bounds (checked), and not yet visible to anyone (the directory entry is
        // published after `create` returns). All-zero bytes are empty lists and zero counters.
        unsafe {
            core::ptr::write_bytes(ptr, 0, header_len as usize);
            core::ptr::addr_of_mut!((*ptr.cast::<SpaHeader>()).common).write(CommonHeader::new(
                TYPE_ID,
                id,
                config.dead_process_blocks.flags(),
                &layout,
            ));
        }
        let a = ScalablePageAllocator::open(region, id, layout)?;
        // SAFETY: no one else sees the allocator yet.
        unsafe { a.fs.init() };
        Ok(a)
    }

    fn attach(region: Region, id: AllocatorId) -> Result<Self> {
        let header_len = core::mem::size_of::<SpaHeader>() as u64;
        let ptr = region.ptr(region.offset(), header_len)?.cast::<SpaHeader>();
        // SAFETY: in bounds; we read plain integers of the common header and validate them.
        let common = unsafe { &(*ptr).common };
        let layout = common.validate(TYPE_ID, id, &region, region.offset() + header_len)?;
        let a = ScalablePageAllocator::open(region, id, layout)?;
        a.reclaim()?;
        Ok(a)
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;
    use crate::allocators::testing::{exercise, op_strategy, region_of, run_model};
    use proptest::prelude::*;

    #[test]
    fn serves_every_size_and_alignment_and_returns_to_empty() {
        let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        exercise(&a);
    }

    #[test]
    fn blocks_freed_by_one_class_serve_another_after_trim() {
        let a = ScalablePageAllocator::create(region_of(1 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        let mut small = Vec::new();
        while let Ok(p) = a.allocate(64, 8) {
            small.push(p);
        }
        assert!(small.len() > 5000);
        for p in small {
            a.free(p).unwrap();
        }
        a.check().unwrap();
        // All of it comes back for large requests: the spans are trimmed on shortage.
        let big = a.allocate(600 * 1024, 8).unwrap();
        a.free(big).unwrap();
        a.check().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn behaves_like_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
            let a = ScalablePageAllocator::create(region_of(24 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
            run_model(&a, &ops);
        }
    }
}
