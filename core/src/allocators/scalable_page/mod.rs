//! [`ScalablePageAllocator`]: size-classed free lists shared by every process, with a small
//! cache per thread in front of them.
//!
//! ```text
//! region start  header: type, id, free-space layout, free-space state (mutex)
//!               lists[36]      one shared free list per size class, behind an owner-recording lock
//!               slot chunk 0   16 thread caches; more chunks come from the arena as threads do
//! table, arena  the free-space manager: spans (one class each, their blocks shared by all) and
//!               large blocks
//! thread cache  per class, one cache line: the cached blocks (first, count), live count, live
//!               bytes, allocations, and a journal of the operation in progress
//! ```
//!
//! Every block of a span belongs to all processes: a thread allocates from and frees into its
//! own cache in the region (no atomic read-modify-write, no shared line), and moves blocks
//! between its cache and the class's shared list in batches under the list's lock; an empty
//! list is refilled by carving a new span from the free-space manager. Requests above 16 KiB
//! take whole 4 KiB units from the free-space manager (best fit, split, merge). A free block's
//! info word carries a label: the slot of the cache it was last in ([`cache`]).
//!
//! When space runs short, the calling thread's cache is flushed and spans whose blocks are all
//! on the shared list go back to the free-space manager ([`ScalablePageAllocator::trim`]).
//!
//! A free of anything but a live block's offset is refused with an error, a second free of a
//! block included, except for two frees of one block made at the same instant by two threads:
//! the quick free does not compare (see `cache::free_quick`), and the block may then be handed
//! out twice.
//!
//! Crash safety ([`recovery`]): a slot whose process died (by process id and start time) is
//! found on attach, when space runs short, or on [`ScalablePageAllocator::reclaim`]; every block
//! labelled with it that is on no shared list (its cache, and a block it was moving) goes back
//! to the shared list, and its counters are settled from its journal, so no block is lost
//! whatever instruction the process died at. The list locks and the free-space lock record
//! their holder and are taken over from a dead one; every list change commits with one store,
//! and runs a dead holder left half made are returned. With [`DeadProcessBlocks::Free`], blocks
//! a dead process still held are freed as well. A recovery run only to gain space (on attach, or
//! when a slot or space runs short) that meets damage is passed over, and counted
//! ([`ScalablePageAllocator::failed_reclaims`]). Every place between two stores to shared state
//! is a [crash point](crate::crash): `tests/crash_points.rs` kills a process at each one in turn
//! and checks the recovery.

mod audit;
mod cache;
mod recovery;

use core::ptr::NonNull;

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::allocator::{AllocStats, AllocatorType, RegionAllocator};
use crate::allocators::check_request;
use crate::error::{Error, Result};
use crate::liveness::{self, ProcessStamp, StartTimeBits};
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::Region;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{owner_token, Mutex, SpinLock};

use super::common::{
    class_stats, read_header, write_header, ClassCounts, ClassStats, CommonHeader, DeadProcessBlocks, FLAG_FREE_DEAD,
};
use super::fast_slot;
use super::free_space::{FreeSpace, FreeSpaceLayout, FreeSpaceState};
use super::held::{HeldSlot, HeldSlots};
use super::large;
use super::size_class::CLASS_COUNT;
use super::slots::{Chunk, SlotTable};
use super::span::{
    class_for, corrupt, explain_free, find_live, find_small, invalid, live_block, move_block, quick_class, Found, Mem,
    LAYOUTS,
};
use cache::{CacheBody, CacheSlot};

const TYPE_ID: u32 = 0x5350_4131; // "SPA1"

/// Options for [`ScalablePageAllocator`].
#[derive(Clone, Debug, Default)]
pub struct ScalablePageConfig {
    /// What happens to blocks a dead process still held.
    pub dead_process_blocks: DeadProcessBlocks,
}

/// One class's shared free list: the first block's offset (0 = empty), behind a lock that
/// records its holder; the blocks link through their second word.
#[repr(C, align(64))]
struct ClassList(Mutex<u64>);

#[repr(C)]
struct SpaHeader {
    common: CommonHeader,
    free_space: Mutex<FreeSpaceState>,
    lists: [ClassList; CLASS_COUNT],
    chunk: Chunk<CacheBody>,
}

/// The process-local view shared by the handle and every thread's slot registration.
struct Shared {
    region: Region,
    header: NonNull<SpaHeader>,
    /// The whole region: the header and slot chunks.
    mem: Mem,
    /// The arena: spans and blocks.
    arena: Mem,
    fs: FreeSpace,
    slots: SlotTable<CacheBody>,
    /// This process as live blocks record it ([`short_stamp`]), with the low 16 bits of the fork
    /// generation it was read in above it: a forked child is another process.
    stamp: AtomicU64,
    /// Per class: the most blocks a thread cache keeps.
    limits: [u32; CLASS_COUNT],
    /// The slots threads hold through the handle, which its drop gives back.
    held: HeldSlots,
    /// Recoveries run only to gain space that failed and were passed over
    /// ([`ScalablePageAllocator::failed_reclaims`]).
    failed_reclaims: AtomicU64,
}

// SAFETY: `header` points into `region`, which `Shared` keeps mapped; the header's shared parts
// are locks and atomics; each thread cache is written only by the thread holding its slot.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// A size-classed allocator whose free lists are shared by all processes. Its layout and crash
/// recovery are described at the top of `core/src/allocators/scalable_page/mod.rs`.
pub struct ScalablePageAllocator {
    shared: Arc<Shared>,
    id: AllocatorId,
    instance: u64,
    /// A slot for threads that cannot keep one of their own (no `std`, or TLS torn down),
    /// used by one of them at a time, with the fork generation it was taken in (in a forked
    /// child, the slot is the parent's).
    fallback: SpinLock<(u64, Option<CacheSlot>)>,
}

/// The 48-bit stamp blocks record: pid and its start time shortened to 16 bits (never 0, unknown,
/// for a known one: see [`ProcessStamp::shortened`]).
fn short_stamp(s: ProcessStamp) -> u64 {
    ((s.pid as u64) << 16) | s.shortened(StartTimeBits::Low16).start_time
}

/// This process's short stamp with the low 16 bits of the fork generation above it.
fn stamp_word() -> u64 {
    ((crate::fork::generation() & 0xffff) << 48) | short_stamp(liveness::current())
}

/// The process a short stamp names.
fn stamp_process(stamp: u64) -> ProcessStamp {
    ProcessStamp { pid: (stamp >> 16) as u32, start_time: stamp & 0xffff }
}

impl Shared {
    /// This process, as live blocks record it.
    #[inline]
    fn stamp(&self) -> u64 {
        let word = self.stamp.load(Ordering::Relaxed);
        if word >> 48 == crate::fork::generation() & 0xffff {
            return word & ((1 << 48) - 1);
        }
        self.refresh_stamp()
    }

    /// Reads this process's stamp again (in a forked child).
    #[cold]
    fn refresh_stamp(&self) -> u64 {
        let word = stamp_word();
        self.stamp.store(word, Ordering::Relaxed);
        word & ((1 << 48) - 1)
    }

    fn header(&self) -> &SpaHeader {
        // SAFETY: checked in bounds in `open`; the region stays mapped; see the Send note.
        unsafe { self.header.as_ref() }
    }

    fn free_dead(&self) -> bool {
        self.header().common.flags & FLAG_FREE_DEAD != 0
    }

    /// Passes over a recovery run only to gain space (on attach, for a slot, when space runs
    /// short), counting it if it failed: damage it met stays for `reclaim()` and `check()` to
    /// report, and must not refuse what the caller was doing.
    fn pass_over<T>(&self, recovered: Result<T>) {
        if recovered.is_err() {
            self.failed_reclaims.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn list(&self, class: usize) -> &Mutex<u64> {
        &self.header().lists[class].0
    }

    fn acquire_slot(&self) -> Result<CacheSlot> {
        // Only a way to free a slot (see `attach`).
        let offset = self.slots.acquire(&self.mem, &self.fs, owner_token(), || {
            self.pass_over(self.recover_dead());
            Ok(())
        })?;
        // (Its place is found by the walk that found it, unless the chunk links changed since:
        // damage, and the slot goes back as it was.)
        self.cache_slot(offset).inspect_err(|_| {
            if let Ok(s) = self.slots.slot(&self.mem, offset) {
                s.owner.store(0, Ordering::Release);
            }
        })
    }

    /// Gives back a slot this process holds: its cache goes to the shared lists. A flush that
    /// finds the cache damaged still lets the slot go (then reports the damage): held, it would
    /// stay ours for good, as our process lives. The damaged class's cache is taken off the slot
    /// first (see [`Shared::give_back_caches`]), so that the slot's next owner can use the class.
    fn release_slot(&self, slot: CacheSlot) -> Result<()> {
        let flushed = self.give_back_caches(slot);
        crate::crash::point();
        self.slots.slot(&self.mem, slot.offset)?.owner.store(0, Ordering::Release);
        flushed
    }

    /// What to try when space runs short, attempt by attempt.
    fn relieve_shortage(&self, slot: CacheSlot, attempt: u32) -> Result<()> {
        if attempt == 0 {
            // A class cache its flush finds damaged keeps its blocks, for its own allocations
            // to report: the spans the other classes give back still serve this request.
            let _damaged = self.flush_all(slot);
            self.release_free_spans(slot)
        } else {
            // Only a way to gain space (see `attach`): the request then fails as out of memory.
            self.pass_over(self.recover_dead());
            self.free_dead_blocks(slot).map(|_| ())
        }
    }

    #[cold]
    #[inline(never)]
    fn allocate_large(&self, slot: CacheSlot, size: usize, align: usize) -> Result<u64> {
        for attempt in 0..3 {
            {
                let mut g = self.fs.lock();
                if let Some(u) = large::allocate(&mut g, &self.fs, &self.arena, size, align, 0, self.stamp())? {
                    return Ok(u);
                }
            }
            self.relieve_shortage(slot, attempt)?;
        }
        Err(Error::OutOfMemory { requested: size as u64, available: self.fs.lock().free_bytes() })
    }
}

impl ScalablePageAllocator {
    fn open(region: Region, id: AllocatorId, layout: FreeSpaceLayout) -> Result<Self> {
        let header_len = core::mem::size_of::<SpaHeader>() as u64;
        let ptr = region.ptr(region.offset(), header_len)?.cast::<SpaHeader>();
        if ptr.align_offset(64) != 0 {
            return Err(Error::InvalidAlignment { align: 64 });
        }
        let header = NonNull::new(ptr).ok_or(corrupt(region.offset(), "null header"))?;
        let state_offset = region.offset() + core::mem::offset_of!(SpaHeader, free_space) as u64;
        let chunk = region.offset() + core::mem::offset_of!(SpaHeader, chunk) as u64;
        // SAFETY: the header (written by `create`) holds the free-space state at this offset.
        let fs = unsafe { FreeSpace::new(region.duplicate(), state_offset, layout, chunk) }?;
        let mem = Mem::of(&region, region.offset(), region.end())?;
        let arena = Mem::of(&region, layout.arena, layout.arena + layout.bytes())?;
        // A cache holds up to ~16 KiB of a class (less in small regions), 2..=64 blocks.
        let budget = (layout.bytes() / 512).clamp(1024, 16 * 1024);
        let limits = core::array::from_fn(|c| (budget / LAYOUTS[c].stride).clamp(2, 64) as u32);
        let slots = SlotTable::new(chunk);
        let stamp = AtomicU64::new(stamp_word());
        let (held, failed_reclaims) = (HeldSlots::new(), AtomicU64::new(0));
        let shared = Shared { region, header, mem, arena, fs, slots, stamp, limits, held, failed_reclaims };
        Ok(ScalablePageAllocator {
            shared: Arc::new(shared),
            id,
            instance: fast_slot::new_instance(),
            fallback: SpinLock::new((0, None)),
        })
    }

    /// Runs `f` with the calling thread's slot: its own (cached per thread with `std`), or the
    /// handle's shared fallback slot, one thread at a time.
    #[inline]
    fn with_slot<R>(&self, f: impl FnOnce(CacheSlot) -> Result<R>) -> Result<R> {
        let (offset, label) = fast_slot::get_tagged(self.instance);
        if offset != 0 {
            return f(CacheSlot { offset, label });
        }
        self.with_slot_slow(f)
    }

    #[cold]
    #[inline(never)]
    fn with_slot_slow<R>(&self, f: impl FnOnce(CacheSlot) -> Result<R>) -> Result<R> {
        if let Some((offset, label)) = fast_slot::held(self.instance) {
            return f(CacheSlot { offset, label });
        }
        if let Some(slot) = self.attach_thread()? {
            return f(slot);
        }
        let mut g = self.fallback.lock();
        let generation = crate::fork::generation();
        let slot = match g.1 {
            Some(slot) if g.0 == generation => slot,
            _ => {
                let slot = self.shared.acquire_slot()?;
                *g = (generation, Some(slot));
                slot
            }
        };
        f(slot)
    }

    /// Takes a slot for the calling thread, held until it exits or the handle is dropped (which
    /// gives back the slots of threads that outlive it); `None` where threads cannot hold one
    /// (no `std`, or the thread's TLS is being torn down).
    fn attach_thread(&self) -> Result<Option<CacheSlot>> {
        if !cfg!(feature = "std") {
            return Ok(None);
        }
        let slot = self.shared.acquire_slot()?;
        let held: *const HeldSlot = self.shared.held.note(slot.offset, crate::fork::generation());
        // Not the handle's state itself: once the handle is dropped (its drop gave the slot
        // back), the region may be unmapped.
        let shared = Arc::downgrade(&self.shared);
        let give_back = Box::new(move || {
            if let Some(shared) = shared.upgrade() {
                // SAFETY: the node lives as long as `shared.held`, and `shared` is alive.
                if unsafe { &*held }.take() {
                    let _ = shared.release_slot(slot);
                }
            }
        });
        if fast_slot::hold(self.instance, slot.offset, slot.label, give_back) {
            return Ok(Some(slot));
        }
        // SAFETY: the node lives as long as `self.shared.held`.
        if unsafe { &*held }.take() {
            self.shared.release_slot(slot)?;
        }
        Ok(None)
    }

    /// Gives back the calling thread's cache and slot now (as thread exit does).
    pub fn release_thread_cache(&self) {
        fast_slot::release(self.instance);
    }

    /// Returns spans whose blocks are all free to the free-space manager, so their space serves
    /// any size again, after moving the calling thread's cache to the shared lists. Blocks in
    /// other threads' caches stay where they are. A class cache of this thread found damaged
    /// keeps its blocks, and the damage is reported once the other spans are returned.
    pub fn trim(&self) -> Result<()> {
        self.with_slot(|slot| self.shared.trim(slot))
    }

    /// Recovers the caches of processes that have died (their blocks go back to the shared
    /// lists) and, if the allocator was created with [`DeadProcessBlocks::Free`], frees the
    /// blocks those processes still held; returns how many slots and blocks that was. Runs on
    /// attach and when space runs short. A shared list found damaged leaves the dead slots as
    /// they were found, for a later reclaim to finish, and the damage is reported.
    pub fn reclaim(&self) -> Result<u64> {
        let slots = self.shared.recover_dead()?;
        let blocks =
            if self.shared.free_dead() { self.with_slot(|slot| self.shared.free_dead_blocks(slot))? } else { 0 };
        Ok(slots + blocks)
    }

    /// How many recoveries of dead processes' slots this handle ran only to gain space (on
    /// attach, when a thread needed a slot and the table was full, when space ran short) failed
    /// on damage and were passed over, so that the attach or request went on without them.
    /// Each left the damaged slots as it found them; [`reclaim`](Self::reclaim) and
    /// [`check`](RegionAllocator::check) report the damage itself (their own failures are
    /// not counted here: they return them).
    pub fn failed_reclaims(&self) -> u64 {
        self.shared.failed_reclaims.load(Ordering::Relaxed)
    }

    /// Per size class: block size, live blocks, allocations since creation.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        let counts = self.shared.class_counts().unwrap_or(ClassCounts::new());
        class_stats(&counts.live, &counts.allocations)
    }
}

impl ScalablePageAllocator {
    /// Every request the quick path does not take (checked in full, then small or large), or a
    /// thread that has no slot cached yet.
    #[inline(never)]
    fn allocate_checked(&self, size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(size, align)?;
        let s = &self.shared;
        let user = match class_for(size, align) {
            Some(class) => self.with_slot(|slot| s.allocate_small(slot, class, size, align))?,
            None => self.with_slot(|slot| s.allocate_large(slot, size, align))?,
        };
        Ok(OffsetPtr::new(user))
    }
}

impl ScalablePageAllocator {
    /// Frees what the quick path did not take: padded and large blocks, bad input, or a thread
    /// that has no slot cached yet.
    #[inline(never)]
    fn free_other(&self, ptr: OffsetPtr) -> Result<()> {
        let s = &self.shared;
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        match find_live(&s.arena, user) {
            Some(Found::Small(b)) => {
                let (block, word) = (b.block, b.word);
                self.with_slot(move |slot| s.free_small(slot, block, word))
            }
            Some(Found::Large { block }) => large::free(&s.fs, &s.arena, block),
            None => Err(explain_free(&s.arena, user)),
        }
    }
}

impl Drop for ScalablePageAllocator {
    fn drop(&mut self) {
        self.release_thread_cache();
        let (generation, slot) = core::mem::take(&mut *self.fallback.lock());
        if let Some(slot) = slot.filter(|_| generation == crate::fork::generation()) {
            let _ = self.shared.release_slot(slot);
        }
        // Other threads' slots are given back here: none is in use, which would take this
        // handle, and no one else can reach it now. A thread exiting meanwhile gives back its
        // own first, or finds it given back.
        for offset in self.shared.held.take_all(crate::fork::generation()) {
            // (A slot whose place is not found any more is in no one's table: no one takes it.)
            if let Ok(slot) = self.shared.cache_slot(offset) {
                let _ = self.shared.release_slot(slot);
            }
        }
    }
}

impl RegionAllocator for ScalablePageAllocator {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn type_name(&self) -> &'static str {
        "scalable-page"
    }

    fn region(&self) -> &Region {
        &self.shared.region
    }

    #[inline]
    fn allocate(&self, size: usize, align: usize) -> Result<OffsetPtr> {
        if let Some(class) = quick_class(size, align) {
            let (offset, label) = fast_slot::get_tagged(self.instance);
            if offset != 0 {
                if let Some(user) = self.shared.allocate_quick(CacheSlot { offset, label }, class, size, align) {
                    return Ok(OffsetPtr::new(user));
                }
            }
        }
        self.allocate_checked(size, align)
    }

    fn reallocate(&self, ptr: OffsetPtr, new_size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(new_size, align)?;
        let s = &self.shared;
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        let old_size = match live_block(&s.arena, user)? {
            Found::Large { block } => {
                if large::resize_in_place(&s.fs, &s.arena, block, user, new_size, align)? {
                    return Ok(ptr);
                }
                large::size_of(&s.fs, &s.arena, block, user)?
            }
            Found::Small(b) => {
                let (block, info) = (b.block, b.info());
                let room = block + LAYOUTS[info.class].stride - user;
                let fits = user % align as u64 == 0 && new_size as u64 <= room;
                // Stay in place unless the block would be mostly empty.
                if fits && class_for(new_size, align).is_some_and(|c| c + 4 >= info.class) {
                    self.with_slot(|slot| s.resize_in_place(slot, block, info, new_size))?;
                    return Ok(ptr);
                }
                b.user_size(user)?
            }
        };
        move_block(self, &s.arena, ptr, old_size, new_size, align)
    }

    #[inline]
    fn free(&self, ptr: OffsetPtr) -> Result<()> {
        if let Some(b) = find_small(&self.shared.arena, ptr.get()) {
            let (offset, label) = fast_slot::get_tagged(self.instance);
            if offset != 0 {
                let slot = CacheSlot { offset, label };
                let over = self.shared.free_quick(slot, b.block, b.word);
                self.shared.flush_class(slot, over);
                return Ok(());
            }
        }
        self.free_other(ptr)
    }

    fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
        large::size_of_user(&self.shared.fs, &self.shared.arena, ptr)
    }

    /// `bytes_reserved` counts live blocks with their headers and class rounding, large blocks'
    /// whole runs and extra slot chunks; free blocks in caches and spans are free capacity
    /// (trimmed back to the free-space manager when space runs short). `high_watermark` is the
    /// most the free-space manager had handed out at once (spans and large blocks), an upper
    /// bound of the former. Thread caches are read without stopping their threads.
    fn stats(&self) -> AllocStats {
        self.shared.stats()
    }

    /// Walks the runs, every span's blocks, the shared lists and every thread cache, and checks
    /// the counters against the blocks. Call it while no thread allocates or frees, and after
    /// [`reclaim`](ScalablePageAllocator::reclaim) if processes died.
    fn check(&self) -> Result<()> {
        self.shared.check()
    }
}

impl AllocatorType for ScalablePageAllocator {
    const TYPE_ID: u32 = TYPE_ID;
    type Config = ScalablePageConfig;

    fn create(region: Region, id: AllocatorId, config: &ScalablePageConfig) -> Result<Self> {
        // Before anything of the region is touched: its slots must not pass to a forked child.
        crate::fork::watch()?;
        let header_len = core::mem::size_of::<SpaHeader>() as u64;
        let flags = config.dead_process_blocks.flags();
        // SAFETY: the header starts with its CommonHeader, is valid as zeroes (empty lists,
        // free locks), and no one sees the region before `create` returns.
        let layout = unsafe { write_header(&region, header_len, TYPE_ID, id, flags) }?;
        let a = ScalablePageAllocator::open(region, id, layout)?;
        let chunk = a.shared.region.offset() + core::mem::offset_of!(SpaHeader, chunk) as u64;
        // SAFETY: the header's chunk, not yet visible to anyone.
        unsafe { SlotTable::<CacheBody>::format(&a.shared.mem, chunk, 0) }?;
        // SAFETY: no one else sees the allocator yet.
        unsafe { a.shared.fs.init() };
        Ok(a)
    }

    fn attach(region: Region, id: AllocatorId) -> Result<Self> {
        crate::fork::watch()?;
        let layout = read_header(&region, core::mem::size_of::<SpaHeader>() as u64, TYPE_ID, id)?;
        let a = ScalablePageAllocator::open(region, id, layout)?;
        // Recovering dead processes' slots only gains space: a damaged one, which stays for
        // `check()` and `reclaim()` to report, must not refuse every later attach.
        a.shared.pass_over(a.reclaim());
        Ok(a)
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests;
