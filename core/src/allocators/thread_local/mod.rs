//! [`ThreadLocalAllocator`]: per-thread heaps that live inside the region.
//!
//! ```text
//! region start  header: type, id, free-space layout, free-space state (mutex)
//!               heap chunk 0: 16 heaps (thread slots); more chunks come from the arena as threads do
//! table, arena  the free-space manager: spans (each owned by one heap) and large blocks
//! heap          owner (process id and start time)
//!               per class, one cache line: two free lists, span to bump from, counters (owner only)
//!               per class: the remote chain being collected                  (owner, for repair)
//!               per class: remote-free list                                  (any thread)
//!               the block this heap's thread is freeing into another heap    (its thread)
//!               per class: a dead freer's heap whose free we must settle     (repairers)
//!               the process whose threads may hold its blocks                (holders)
//! live block    [info][heap that handed it out][user bytes ...]
//! ```
//!
//! A thread finds its heap through the [`ThreadModel`]'s TLS, cached (with `std`) in a
//! thread-local slot keyed by the allocator instance, so the fast path finds it with one load.
//! It allocates from its heap's allocation list for the class (blocks of any of its spans); a
//! free by the owner pushes on a second list, which the allocation list takes whole when it runs
//! dry, topped up with fresh blocks of its newest span (so a loop of allocations and frees cycles
//! through several blocks instead of waiting on the stores to the one it just freed); else it
//! collects remote frees or formats a fresh block ([`heap`]). The quick paths' constants (limits, class table, the
//! mapping) are copied into the handle ([`quick`]). A block handed
//! out unpadded carries its heap's offset in its second word, so the quick free reads only the
//! block's two header words and the heap's class line: a live info word and the calling thread's
//! heap there make it ours (spans never change heaps). Each offset read from shared memory is
//! bounds-checked with one compare against a limit computed at open ([`Mem::holds`]). The fast
//! paths call nothing and build no error value: anything else goes to the full path.
//!
//! A free by any other thread or process marks the block remote and pushes it on its owner
//! heap's remote list for the class (one CAS); the owner collects that list in bulk when its
//! free lists run dry, recording the chain it took in the heap first ([`heap`]), so an owner
//! killed halfway through leaves every block findable. The freer records the block (its owner,
//! class and size) in its own heap before marking it, marks it with a compare-and-swap whose
//! new info word names the freer's heap in place of the size (which moves to the first user
//! word, for the owner's collection), and clears the record after the push; a repairer of a
//! freer killed in between hands the block to its owner, which alone can tell (after taking its
//! remote list) whether it was pushed. When a class's free lists have
//! doubled since the last sweep, spans whose blocks are all free go back to the free-space
//! manager; on a trim and when the thread exits, all of them do. A heap whose thread has exited
//! (or whose handle was dropped: it gives back the heaps of threads that outlive it) is
//! released for the next thread (with [`DeadProcessBlocks::Free`], the next thread of the
//! same process: the heap keeps naming the process, whose other threads may hold its blocks);
//! a heap whose process died (its owner word, or the process a given-back heap names, names a
//! process that no longer runs, by id and start time, see [`liveness`](crate::liveness)) is
//! repaired from its blocks' headers and released ([`recovery`]), on attach, when space runs
//! short, or on [`ThreadLocalAllocator::reclaim`] (one run only to gain space that meets damage
//! is passed over, and counted: [`ThreadLocalAllocator::failed_reclaims`]). Every place after a
//! store to shared state on these paths (the recovery's included) is a [crash
//! point](crate::crash): `tests/crash_points.rs` kills a process at each one in turn and checks
//! the recovery.

mod audit;
mod heap;
mod quick;
mod recovery;

use core::ffi::c_void;
use core::marker::PhantomData;
use core::ptr::NonNull;

use alloc::boxed::Box;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;

use crate::allocator::{AllocStats, AllocatorType, RegionAllocator};
use crate::allocators::check_request;
use crate::error::{Error, Result};
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::Region;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{owner_token, Mutex};
use crate::thread::ThreadModel;

use super::common::{
    class_stats, read_header, write_header, ClassCounts, ClassStats, CommonHeader, DeadProcessBlocks, FLAG_FREE_DEAD,
};
use super::fast_slot;
use super::free_space::{FreeSpace, FreeSpaceLayout, FreeSpaceState};
use super::held::{HeldSlot, HeldSlots};
use super::large;
use super::slots::{Chunk, SlotTable};
use super::span::{class_for, corrupt, explain_free, find_live, invalid, live_block, move_block, Found, Mem, LAYOUTS};
use heap::HeapBody;
use quick::Quick;

/// "TLA5": remote info words name their freer, heaps record remote frees under way and the
/// process whose threads may hold their blocks, and each class line holds two free lists (the
/// sweep threshold is kept only as its difference).
const TYPE_ID: u32 = 0x544C_4135;

/// What the fast-slot cache holds for a thread known to have no heap (never a heap offset, which
/// is 64-aligned).
const NO_HEAP: u64 = fast_slot::MARKERS;

/// Options for [`ThreadLocalAllocator`].
#[derive(Clone, Debug, Default)]
pub struct ThreadLocalConfig {
    /// What happens to blocks a dead process still held.
    pub dead_process_blocks: DeadProcessBlocks,
}

#[repr(C)]
struct TlaHeader {
    common: CommonHeader,
    free_space: Mutex<FreeSpaceState>,
    chunk: Chunk<HeapBody>,
}

/// What a thread's TLS value points to. It does not keep the handle's state alive: once the
/// handle is dropped (its drop gave the heap back), the region may be unmapped.
struct ThreadHeap {
    shared: Weak<Shared>,
    heap: u64,
    /// The heap on the handle's list (`Shared::held`), alive as long as `shared` is.
    held: *const HeldSlot,
    instance: u64,
    /// The fork generation it was taken in ([`crate::fork`]): in a forked child, the value the
    /// forking thread's TLS still holds names the parent's heap.
    generation: u64,
}

impl ThreadHeap {
    /// Whether the heap is this process's (not a parent's, seen through a fork).
    fn current(&self) -> bool {
        self.generation == crate::fork::generation()
    }
}

/// The process-local view shared by the handle and every thread's TLS value.
struct Shared {
    region: Region,
    header: NonNull<TlaHeader>,
    /// The whole region: the header and heap chunks.
    mem: Mem,
    /// The arena: spans and blocks.
    arena: Mem,
    fs: FreeSpace,
    heaps: SlotTable<HeapBody>,
    /// What the quick paths read (the handle keeps a copy of its own).
    quick: Quick,
    /// The heaps threads hold through the handle's TLS key, which its drop gives back.
    held: HeldSlots,
    /// Reclaims run only to gain space that failed and were passed over
    /// ([`ThreadLocalAllocator::failed_reclaims`]).
    failed_reclaims: AtomicU64,
}

// SAFETY: `header` points into `region`, kept mapped by `Shared`; shared parts of the header are
// atomics, lock-free lists and the free-space mutex; each heap's local part is touched only by
// the thread that owns the heap (its TLS says which).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// A region allocator with one heap per thread, inside the region. Its layout and crash recovery
/// are described at the top of `core/src/allocators/thread_local/mod.rs`.
///
/// Generic over the thread model that gives it TLS; `hetmem` names it with the platform's
/// default model.
///
/// A handle carries its own copy of the constants the quick paths read (bounds limits, free-word
/// patterns, the size-to-class table): about 7 KB, 64-byte aligned. Keep handles in an `Arc`
/// (as `MemoryManager` does) rather than moving them by value.
#[repr(C)]
pub struct ThreadLocalAllocator<T: ThreadModel> {
    /// A copy of `shared.quick`, one load closer to the quick paths (first: see [`Quick`]).
    quick: Quick,
    shared: Arc<Shared>,
    id: AllocatorId,
    key: T::TlsKey,
    instance: u64,
    _model: PhantomData<T>,
}

unsafe extern "C" fn release_at_exit(value: *mut c_void) {
    // SAFETY: only `attach_thread` stores values under the key: each a leaked Box<ThreadHeap>,
    // passed here once, at this thread's exit.
    let th = unsafe { Box::from_raw(value.cast::<ThreadHeap>()) };
    if th.current() {
        fast_slot::clear(th.instance);
        if let Some(shared) = th.shared.upgrade() {
            let _ = shared.give_back(&th);
        }
    }
}

impl Shared {
    /// Gives back the heap of a thread's TLS value unless the handle's drop did.
    fn give_back(&self, th: &ThreadHeap) -> Result<()> {
        // SAFETY: the node lives as long as `self.held`, and `self` is alive.
        if unsafe { &*th.held }.take() {
            self.release_heap(th.heap)?;
        }
        Ok(())
    }

    fn header(&self) -> &TlaHeader {
        // SAFETY: checked in bounds at open; see the Send/Sync note.
        unsafe { self.header.as_ref() }
    }

    fn free_dead(&self) -> bool {
        self.header().common.flags & FLAG_FREE_DEAD != 0
    }

    /// Passes over a reclaim run only to gain space (on attach, for a heap, when space runs
    /// short), counting it if it failed: damage it met stays for `reclaim()` and `check()` to
    /// report, and must not refuse what the caller was doing.
    fn pass_over<T>(&self, reclaimed: Result<T>) {
        if reclaimed.is_err() {
            self.failed_reclaims.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Frees space when the free-space manager is short: our own empty current spans, heaps
    /// of exited threads, heaps of dead processes.
    fn relieve_shortage(&self, heap_off: u64, attempt: u32) -> Result<()> {
        if heap_off != 0 {
            self.trim_heap(heap_off)?;
        }
        self.drain_unowned()?;
        if attempt > 0 {
            // Only a way to gain space (see `attach`): the request then fails as out of memory.
            self.pass_over(self.reclaim_dead(heap_off));
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn allocate_large(&self, heap: u64, size: usize, align: usize) -> Result<u64> {
        // The run records the heap by number, by which a dead heap's repair frees its blocks:
        // held to the heap's place in the table (damaged, it would name another heap).
        let aux = self.heap_number(heap, self.heaps.slot(&self.mem, heap)?)?.wrapping_add(1);
        for attempt in 0..3 {
            {
                let mut g = self.fs.lock();
                if let Some(u) = large::allocate(&mut g, &self.fs, &self.arena, size, align, aux, 0)? {
                    return Ok(u);
                }
            }
            self.relieve_shortage(heap, attempt)?;
        }
        Err(Error::OutOfMemory { requested: size as u64, available: self.fs.lock().free_bytes() })
    }
}

impl<T: ThreadModel> ThreadLocalAllocator<T> {
    fn open(region: Region, id: AllocatorId, layout: FreeSpaceLayout) -> Result<Self> {
        let header_len = core::mem::size_of::<TlaHeader>() as u64;
        let ptr = region.ptr(region.offset(), header_len)?.cast::<TlaHeader>();
        if ptr.align_offset(64) != 0 {
            return Err(Error::InvalidAlignment { align: 64 });
        }
        let header = NonNull::new(ptr).ok_or(corrupt(region.offset(), "null header"))?;
        let state_offset = region.offset() + core::mem::offset_of!(TlaHeader, free_space) as u64;
        let chunk = region.offset() + core::mem::offset_of!(TlaHeader, chunk) as u64;
        // SAFETY: the header holds the free-space state at this offset (written by `create`).
        let fs = unsafe { FreeSpace::new(region.duplicate(), state_offset, layout, chunk) }?;
        let mem = Mem::of(&region, region.offset(), region.end())?;
        let arena = Mem::of(&region, layout.arena, layout.arena + layout.bytes())?;
        let heaps = SlotTable::new(chunk);
        // SAFETY: `release_at_exit` accepts exactly the values this allocator stores.
        let key = unsafe { T::tls_create(Some(release_at_exit)) }?;
        let quick = Quick::new(mem, arena);
        let (held, failed_reclaims) = (HeldSlots::new(), AtomicU64::new(0));
        let shared = Arc::new(Shared { region, header, mem, arena, fs, heaps, quick, held, failed_reclaims });
        Ok(ThreadLocalAllocator { quick, shared, id, key, instance: fast_slot::new_instance(), _model: PhantomData })
    }

    /// The calling thread's heap, acquired on first use.
    #[inline]
    fn thread_heap(&self) -> Result<u64> {
        let heap = fast_slot::get(self.instance);
        if heap > NO_HEAP {
            return Ok(heap);
        }
        self.thread_heap_slow()
    }

    #[cold]
    #[inline(never)]
    fn thread_heap_slow(&self) -> Result<u64> {
        match self.tls_heap() {
            0 => self.attach_thread(),
            heap => Ok(heap),
        }
    }

    /// The heap in the thread model's TLS (0 if none), cached in the fast slot.
    fn tls_heap(&self) -> u64 {
        let value = T::tls_get(self.key);
        if value.is_null() {
            fast_slot::set(self.instance, NO_HEAP);
            return 0;
        }
        // SAFETY: values under our key are leaked Box<ThreadHeap>s, freed only at thread exit or
        // by `release_thread_heap` or `forget_parent_heap` on this thread.
        let th = unsafe { &*value.cast::<ThreadHeap>() };
        if !th.current() {
            return self.forget_parent_heap(value);
        }
        fast_slot::set(self.instance, th.heap);
        th.heap
    }

    /// In a forked child: drops the TLS value that names the parent's heap (without giving the
    /// heap back: the parent still uses it), so the thread takes a heap of its own. Returns 0.
    #[cold]
    fn forget_parent_heap(&self, value: *mut c_void) -> u64 {
        if T::tls_set(self.key, core::ptr::null_mut()).is_ok() {
            // SAFETY: as in `tls_heap`; cleared from TLS above, so this is its only owner.
            drop(unsafe { Box::from_raw(value.cast::<ThreadHeap>()) });
        }
        fast_slot::clear(self.instance);
        0
    }

    fn attach_thread(&self) -> Result<u64> {
        let s = &self.shared;
        let heap = s.acquire_heap(owner_token())?;
        let generation = crate::fork::generation();
        let held = s.held.note(heap, generation);
        let boxed = Box::new(ThreadHeap { shared: Arc::downgrade(s), heap, held, instance: self.instance, generation });
        let raw = Box::into_raw(boxed);
        if let Err(e) = T::tls_set(self.key, raw.cast()) {
            // SAFETY: `raw` was just leaked and never shared.
            let th = unsafe { Box::from_raw(raw) };
            let _ = s.give_back(&th);
            return Err(e);
        }
        fast_slot::set(self.instance, heap);
        Ok(heap)
    }

    /// The calling thread's heap if it has one, else 0 (a local free needs none).
    #[inline]
    fn existing_heap(&self) -> u64 {
        match fast_slot::get(self.instance) {
            0 => self.tls_heap(),
            NO_HEAP => 0,
            heap => heap,
        }
    }

    /// The calling thread's heap for a free of a block of heap `owner`: a remote free is
    /// recorded in the freer's heap while under way (see [`heap`]), so a thread without one
    /// takes one; 0 if it cannot (the free then goes unrecorded).
    fn freeing_heap(&self, owner: u64) -> u64 {
        match self.existing_heap() {
            0 if owner != 0 => self.thread_heap().unwrap_or(0),
            heap => heap,
        }
    }

    /// Gives back the calling thread's heap now (as thread exit does): its empty spans return
    /// to the free-space manager and the heap is released for another thread.
    pub fn release_thread_heap(&self) -> Result<()> {
        let value = T::tls_get(self.key);
        fast_slot::clear(self.instance);
        if value.is_null() {
            return Ok(());
        }
        T::tls_set(self.key, core::ptr::null_mut())?;
        // SAFETY: as in `tls_heap`; cleared from TLS above, so this is its only owner.
        let th = unsafe { Box::from_raw(value.cast::<ThreadHeap>()) };
        if !th.current() {
            // A parent's heap, seen through a fork: not ours to give back.
            return Ok(());
        }
        self.shared.give_back(&th)
    }

    /// Returns space the calling thread's heap holds but does not use (empty spans), and
    /// collects remote frees into heaps no thread owns.
    pub fn trim(&self) -> Result<()> {
        let heap = self.existing_heap();
        if heap != 0 {
            self.shared.trim_heap(heap)?;
        }
        self.shared.drain_unowned()
    }

    /// Repairs and releases the heaps of processes that have died; returns how many were
    /// released. A dead thread's remote free of a block of the calling thread's heap is settled
    /// here; one of another live thread's heap waits for that thread's next collection (and the
    /// dead heap with it). A heap whose repair finds it damaged is left as it was found, for a
    /// later reclaim to try again, and the damage is reported (after the other heaps).
    pub fn reclaim(&self) -> Result<u64> {
        self.shared.reclaim_dead(self.existing_heap())
    }

    /// How many reclaims of dead processes' heaps this handle ran only to gain space (on attach,
    /// when a thread needed a heap and the table was full, when space ran short) failed on
    /// damage and were passed over, so that the attach or request went on without them. Each
    /// left the damaged heaps as it found them; [`reclaim`](Self::reclaim) and
    /// [`check`](RegionAllocator::check) report the damage itself (their own failures are not
    /// counted here: they return them).
    pub fn failed_reclaims(&self) -> u64 {
        self.shared.failed_reclaims.load(Ordering::Relaxed)
    }

    /// Per size class: block size, live blocks, allocations since creation.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        let counts = self.shared.class_counts().unwrap_or(ClassCounts::new());
        class_stats(&counts.live, &counts.allocations)
    }

    /// How many heaps have an owner right now (in every process): those live threads hold, and
    /// also those whose owner's process died and which no reclaim has repaired yet (they still
    /// name it), those held for a repair, and dead threads' heaps kept awaiting the owner of a
    /// block they were freeing (until that owner settles the free). So it is not the number of
    /// live threads.
    pub fn owned_heaps(&self) -> Result<usize> {
        let s = &self.shared;
        let mut n = 0;
        for offset in s.heaps.offsets(&s.mem)? {
            n += (s.heaps.slot(&s.mem, offset)?.owner.load(Ordering::Relaxed) != 0) as usize;
        }
        Ok(n)
    }
}

impl<T: ThreadModel> ThreadLocalAllocator<T> {
    /// Every request the quick path does not finish: first, if the class's allocation list ran
    /// dry, the blocks the heap freed since; else checked in full, then small or large. (The
    /// handle comes last: the quick path has the size in the register of a call's first
    /// argument after the result's address, and leaves it there.)
    #[inline(never)]
    fn allocate_checked(size: usize, align: usize, this: &Self) -> Result<OffsetPtr> {
        if let (Some(line), Some(heap)) = (this.quick.line(size, align), fast_slot::get_last(this.instance)) {
            if let Some(user) = this.quick.allocate_from_freed(heap, line, size) {
                return Ok(OffsetPtr::new(user));
            }
        }
        check_request(size, align)?;
        let heap = this.thread_heap()?;
        let user = match class_for(size, align) {
            Some(class) => this.shared.allocate_small(heap, class, size, align)?,
            None => this.shared.allocate_large(heap, size, align)?,
        };
        Ok(OffsetPtr::new(user))
    }
}

impl<T: ThreadModel> ThreadLocalAllocator<T> {
    /// Frees what the quick path did not take: padded, large or other heaps' blocks, a thread
    /// whose heap is not cached, or bad input. (The handle comes last: the quick path leaves
    /// the offset where the call wants it.)
    #[inline(never)]
    fn free_other(ptr: OffsetPtr, this: &Self) -> Result<()> {
        let s = &this.shared;
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        match find_live(&s.arena, user) {
            Some(Found::Small(b)) => s.free_small(this.freeing_heap(b.header.owner.load(Ordering::Acquire)), b),
            Some(Found::Large { block }) => large::free(&s.fs, &s.arena, block),
            None => Err(explain_free(&s.arena, user)),
        }
    }
}

impl<T: ThreadModel> Drop for ThreadLocalAllocator<T> {
    fn drop(&mut self) {
        let _ = self.release_thread_heap();
        // Other threads' values stay until they exit, and with the key deleted their destructors
        // do not run (no model runs them for a deleted key): their heaps are given back here.
        // None is in use: that would take this handle, which no one else can reach now. A thread
        // exiting meanwhile gives back its own first, or finds it given back.
        for heap in self.shared.held.take_all(crate::fork::generation()) {
            let _ = self.shared.release_heap(heap);
        }
        let _ = T::tls_delete(self.key);
    }
}

impl<T: ThreadModel> RegionAllocator for ThreadLocalAllocator<T> {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn type_name(&self) -> &'static str {
        "thread-local"
    }

    fn region(&self) -> &Region {
        &self.shared.region
    }

    #[inline]
    fn allocate(&self, size: usize, align: usize) -> Result<OffsetPtr> {
        // The quick path calls nothing: anything it cannot finish goes to the full path.
        if let Some(line) = self.quick.line(size, align) {
            // `get_last` never answers a marker (`NO_HEAP` is one): a heap this thread owns.
            if let Some(heap) = fast_slot::get_last(self.instance) {
                if let Some(user) = self.quick.allocate(heap, line, size) {
                    return Ok(OffsetPtr::new(user));
                }
            }
        }
        Self::allocate_checked(size, align, self)
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
                let info = b.info();
                let room = b.block + LAYOUTS[info.class].stride - user;
                let fits = user % align as u64 == 0 && new_size as u64 <= room;
                let mine = self.existing_heap();
                let owned = mine != 0 && b.header.owner.load(Ordering::Relaxed) == mine;
                if fits && owned && class_for(new_size, align).is_some_and(|c| c + 4 >= info.class) {
                    s.resize_in_place(mine, b.block, info, new_size)?;
                    return Ok(ptr);
                }
                b.user_size(user)?
            }
        };
        move_block(self, &s.arena, ptr, old_size, new_size, align)
    }

    #[inline]
    fn free(&self, ptr: OffsetPtr) -> Result<()> {
        // The quick path: a small block of the calling thread's own heap; anything else goes to
        // the full path, as does the sweep a quick free can make due.
        if let Some(heap) = fast_slot::get_last(self.instance) {
            match self.quick.free(heap, ptr.get()) {
                Some(false) => return Ok(()),
                Some(true) => {
                    self.shared.sweep_freed(heap, ptr.get());
                    return Ok(());
                }
                None => {}
            }
        }
        Self::free_other(ptr, self)
    }

    fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
        large::size_of_user(&self.shared.fs, &self.shared.arena, ptr)
    }

    /// Sums every heap's counters (read without stopping their threads). `bytes_in_use` counts
    /// remotely freed blocks until their owner collects them. `bytes_reserved` counts live
    /// blocks with headers and class rounding, large runs and extra heap chunks;
    /// `high_watermark` is the most the free-space manager had out at once.
    fn stats(&self) -> AllocStats {
        self.shared.stats()
    }

    /// Walks every heap, span, list and run (see the module docs for what must hold). Heaps
    /// that threads are using are read without stopping them: call it while no thread
    /// allocates or frees, and after [`reclaim`](ThreadLocalAllocator::reclaim) if processes
    /// died.
    fn check(&self) -> Result<()> {
        self.shared.check()
    }
}

impl<T: ThreadModel> AllocatorType for ThreadLocalAllocator<T> {
    const TYPE_ID: u32 = TYPE_ID;
    type Config = ThreadLocalConfig;

    fn create(region: Region, id: AllocatorId, config: &ThreadLocalConfig) -> Result<Self> {
        // Before anything of the region is touched: its slots must not pass to a forked child.
        crate::fork::watch()?;
        let header_len = core::mem::size_of::<TlaHeader>() as u64;
        let flags = config.dead_process_blocks.flags();
        // SAFETY: the header starts with its CommonHeader, is valid as zeroes (empty lists,
        // free locks), and no one sees the region before `create` returns.
        let layout = unsafe { write_header(&region, header_len, TYPE_ID, id, flags) }?;
        let a = ThreadLocalAllocator::open(region, id, layout)?;
        let chunk = a.shared.region.offset() + core::mem::offset_of!(TlaHeader, chunk) as u64;
        // SAFETY: the header's chunk, not yet visible to anyone.
        unsafe { SlotTable::<HeapBody>::format(&a.shared.mem, chunk, 0) }?;
        // SAFETY: no one else sees the allocator yet.
        unsafe { a.shared.fs.init() };
        Ok(a)
    }

    fn attach(region: Region, id: AllocatorId) -> Result<Self> {
        crate::fork::watch()?;
        let layout = read_header(&region, core::mem::size_of::<TlaHeader>() as u64, TYPE_ID, id)?;
        let a = ThreadLocalAllocator::open(region, id, layout)?;
        // Reclaiming dead processes' heaps only gains space: a damaged one, which stays for
        // `check()` and `reclaim()` to report, must not refuse every later attach.
        a.shared.pass_over(a.shared.reclaim_dead(0));
        a.shared.drain_unowned()?;
        Ok(a)
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests;
