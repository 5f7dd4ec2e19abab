//! [`ThreadLocalAllocator`]: per-thread heaps that live inside the region.
//!
//! ```text
//! region start  header: type, id, free-space layout, free-space state (mutex)
//!               heap chunk 0: 16 heaps; more chunks are linked from the arena as threads come
//! table, arena  the free-space manager: spans (each owned by one heap) and large blocks
//! heap          owner (process id, thread, process start time)
//!               per class: current span, live count and bytes, allocations   (owner only)
//!               per class: spans with free blocks, full spans                 (owner only)
//!               per class: remote-free list                                   (any thread)
//! ```
//!
//! A thread finds its heap through the [`ThreadModel`]'s TLS. It allocates from its current
//! span's local free list or bumps into the span's unused blocks; a free by the owner pushes on
//! the span's local list. The fast path touches only the heap and span lines of its thread.
//! A free by any other thread or process marks the block remote and pushes it on its owner
//! heap's remote list for the class (one CAS); the owner collects that list when its span runs
//! dry. Spans that become empty go back to the free-space manager (except the current one, so
//! an alloc/free loop does not thrash), and so does all free space of a heap when its thread
//! exits. A heap whose thread has exited is released for the next thread; a heap whose process
//! died (pid and start time no longer match, see [`liveness`](crate::liveness)) is repaired from
//! its blocks' headers and released, on attach, when space runs short, or on
//! [`ThreadLocalAllocator::reclaim`].

use core::ffi::c_void;
use core::marker::PhantomData;
use core::ptr::NonNull;

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::allocator::{AllocStats, AllocatorType, RegionAllocator};
use crate::allocators::check_request;
use crate::error::{Error, Result};
use crate::liveness::{self, ProcessStamp};
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::Region;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::tagged_list::{self, LinkStore, TaggedOffsetList};
use crate::sync::Mutex;
use crate::thread::ThreadModel;

use super::common::{class_stats, small_reserved, ClassStats, CommonHeader, DeadProcessBlocks, FLAG_FREE_DEAD};
use super::free_space::{FreeSpace, FreeSpaceGuard, FreeSpaceLayout, FreeSpaceState, UNIT};
use super::large::{self, TAG_LARGE, TAG_META, TAG_SPAN};
use super::size_class::CLASS_COUNT;
use super::span::{
    back_word, block_at, block_of_user, class_for, corrupt, init_span, invalid, span_class, span_of, user_of, Info,
    Mem, SpanHeader, SpanLocal, State, LARGE_CLASS, LAYOUTS, SMALL_HEADER,
};

const TYPE_ID: u32 = 0x544C_4131; // "TLA1"
const CHUNK_HEAPS: usize = 16;
const HEAP_MAGIC: u32 = 0x4845_4150; // "HEAP"

const LIST_NONE: u32 = 0;
const LIST_CURRENT: u32 = 1;
const LIST_AVAIL: u32 = 2;
const LIST_FULL: u32 = 3;

/// Options for [`ThreadLocalAllocator`].
#[derive(Clone, Debug, Default)]
pub struct ThreadLocalConfig {
    /// What happens to blocks a dead process still held.
    pub dead_process_blocks: DeadProcessBlocks,
}

/// One class's state in a heap: the current span and counters, written by the owner only.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ClassState {
    current: u64,
    live: u64,
    live_bytes: u64,
    allocations: u64,
}

#[repr(C, align(64))]
struct HeapLocal {
    classes: [ClassState; CLASS_COUNT],
    avail: [u64; CLASS_COUNT],
    full: [u64; CLASS_COUNT],
}

#[repr(C, align(64))]
struct RemoteLists {
    lists: [TaggedOffsetList; CLASS_COUNT],
}

#[repr(C, align(64))]
struct Heap {
    owner: AtomicU64,
    start_time: AtomicU64,
    magic: u32,
    index: u32,
    local: core::cell::UnsafeCell<HeapLocal>,
    remote: RemoteLists,
}

#[repr(C, align(64))]
struct HeapChunk {
    next: AtomicU64,
    heaps: [Heap; CHUNK_HEAPS],
}

#[repr(C)]
struct TlaHeader {
    common: CommonHeader,
    free_space: Mutex<FreeSpaceState>,
    chunk: HeapChunk,
}

/// What a thread's TLS value points to.
struct ThreadHeap {
    shared: Arc<Shared>,
    heap: u64,
}

/// The process-local view shared by the handle and every thread's TLS value.
struct Shared {
    region: Region,
    header: NonNull<TlaHeader>,
    mem: Mem,
    fs: FreeSpace,
}

// SAFETY: `header` points into `region`, kept mapped by `Shared`; shared parts of the header are
// atomics, lock-free lists and the free-space mutex; each heap's local part is touched only by
// the thread that owns the heap (its owner word says which).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// A region allocator with one heap per thread, inside the region. See the [module docs](self).
///
/// Generic over the thread model that gives it TLS; `hetmem` names it with the platform's
/// default model.
pub struct ThreadLocalAllocator<T: ThreadModel> {
    shared: Arc<Shared>,
    id: AllocatorId,
    key: T::TlsKey,
    _model: PhantomData<T>,
}

/// The owner word of the calling thread: pid in the high half, a thread number in the low.
fn my_token<T: ThreadModel>() -> u64 {
    let pid = liveness::current().pid as u64;
    let thread = (T::thread_id() as u32).max(1) as u64;
    (pid << 32) | thread
}

unsafe extern "C" fn release_at_exit(value: *mut c_void) {
    // SAFETY: only `thread_heap` stores values under the key: each a leaked Box<ThreadHeap>,
    // passed here once, at this thread's exit.
    let th = unsafe { Box::from_raw(value.cast::<ThreadHeap>()) };
    let _ = th.shared.release_heap(th.heap);
}

impl Shared {
    fn header(&self) -> &TlaHeader {
        // SAFETY: checked in bounds at open; see the Send/Sync note.
        unsafe { self.header.as_ref() }
    }

    fn free_dead(&self) -> bool {
        self.header().common.flags & FLAG_FREE_DEAD != 0
    }

    /// The heap at `offset`, checked: in bounds, aligned, with a heap's magic.
    #[inline]
    fn heap(&self, offset: u64) -> Result<&Heap> {
        let p = self.region.ptr(offset, core::mem::size_of::<Heap>() as u64)?;
        if p.align_offset(64) != 0 {
            return Err(corrupt(offset, "heap misaligned"));
        }
        // SAFETY: in bounds and aligned; a Heap is atomics, lists and plain integers.
        let h = unsafe { &*p.cast::<Heap>() };
        if h.magic != HEAP_MAGIC {
            return Err(corrupt(offset, "not a heap"));
        }
        Ok(h)
    }

    /// The owner-only part of a heap.
    ///
    /// # Safety
    /// The caller's thread owns the heap (its owner word), so no one else touches this part.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    unsafe fn local<'a>(&self, heap: &'a Heap) -> &'a mut HeapLocal {
        // SAFETY: the caller's promise: exclusive access.
        unsafe { &mut *heap.local.get() }
    }

    /// The span header at `span` with its owner-only part.
    ///
    /// # Safety
    /// The caller owns the heap that owns the span (or holds a heap being repaired).
    #[allow(clippy::mut_from_ref)]
    #[inline]
    unsafe fn span_local(&self, span: u64) -> Result<&mut SpanLocal> {
        let h = self.mem.span(span)?;
        // SAFETY: the caller's promise: the span's owner-only part is ours alone.
        Ok(unsafe { &mut *(core::ptr::addr_of!(h.local) as *mut SpanLocal) })
    }

    /// Every heap slot, chunk by chunk.
    fn heaps(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let first = self.region.offset() + core::mem::offset_of!(TlaHeader, chunk) as u64;
        let mut chunk = first;
        let limit = self.fs.layout().units as usize + 1;
        for _ in 0..limit {
            let p = self.region.ptr(chunk, core::mem::size_of::<HeapChunk>() as u64)?;
            // SAFETY: in bounds; chunks are atomics and heaps.
            let c = unsafe { &*p.cast::<HeapChunk>() };
            for i in 0..CHUNK_HEAPS {
                out.push(chunk + 64 + (i * core::mem::size_of::<Heap>()) as u64);
            }
            match c.next.load(Ordering::Acquire) {
                0 => return Ok(out),
                next => chunk = next,
            }
        }
        Err(corrupt(first, "heap chunk list does not end"))
    }

    /// Takes a free heap slot for the calling thread, growing the table if all are taken.
    fn acquire_heap(&self, token: u64) -> Result<u64> {
        let stamp = liveness::current();
        for round in 0..3 {
            for offset in self.heaps()? {
                let h = self.heap(offset)?;
                if h.owner.load(Ordering::Relaxed) == 0
                    && h.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_ok()
                {
                    h.start_time.store(stamp.start_time, Ordering::Release);
                    return Ok(offset);
                }
            }
            if round == 0 {
                self.reclaim_dead(token)?;
            } else {
                self.grow_heaps()?;
            }
        }
        Err(Error::OutOfMemory {
            requested: core::mem::size_of::<HeapChunk>() as u64,
            available: self.fs.lock().free_units() * UNIT,
        })
    }

    /// Appends a chunk of heaps, taken from the arena.
    fn grow_heaps(&self) -> Result<()> {
        let units = (core::mem::size_of::<HeapChunk>() as u64).div_ceil(UNIT) as u32;
        let chunk = {
            let mut g = self.fs.lock();
            let head = g
                .alloc(units, TAG_META, 0)
                .ok_or(Error::OutOfMemory { requested: units as u64 * UNIT, available: g.free_units() * UNIT })?;
            self.fs.layout().unit_offset(head)
        };
        let first_index = self.heaps()?.len();
        self.format_chunk(chunk, first_index)?;
        let mut at = self.region.offset() + core::mem::offset_of!(TlaHeader, chunk) as u64;
        loop {
            let p = self.region.ptr(at, 8)?;
            // SAFETY: in bounds; a chunk's first word is its atomic `next`.
            let next = unsafe { &*p.cast::<AtomicU64>() };
            match next.compare_exchange(0, chunk, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(n) => at = n,
            }
        }
    }

    fn format_chunk(&self, chunk: u64, first_index: usize) -> Result<()> {
        let len = core::mem::size_of::<HeapChunk>();
        let p = self.region.ptr(chunk, len as u64)?;
        // SAFETY: fresh memory (just taken from the free-space manager, or the creator's header):
        // no one else sees it; all-zero bytes are valid for every field.
        unsafe { core::ptr::write_bytes(p, 0, len) };
        // SAFETY: as above; fields written before the chunk is published.
        let c = unsafe { &mut *p.cast::<HeapChunk>() };
        for (i, h) in c.heaps.iter_mut().enumerate() {
            h.magic = HEAP_MAGIC;
            h.index = (first_index + i) as u32;
        }
        Ok(())
    }

    fn heap_index_of(&self, heap: u64) -> Result<u32> {
        Ok(self.heap(heap)?.index)
    }

    // ---- allocation ----

    #[inline]
    fn allocate_small(&self, heap_off: u64, class: usize, size: usize, align: usize) -> Result<u64> {
        let heap = self.heap(heap_off)?;
        // SAFETY: the calling thread owns `heap` (it came from this thread's TLS).
        let local = unsafe { self.local(heap) };
        let cs = &mut local.classes[class];
        let (block, index) = match self.take_from(cs.current, class)? {
            Some(b) => b,
            None => self.refill(heap_off, heap, class, size)?,
        };
        cs.live += 1;
        cs.live_bytes += size as u64;
        cs.allocations += 1;
        let user = user_of(block, SMALL_HEADER, align as u64);
        self.mem.word(user - 8)?.store(back_word(user - block, 0), Ordering::Relaxed);
        let info = Info { state: State::Live, class, index, size: size as u64 };
        self.mem.info(block)?.store(info.pack(), Ordering::Release);
        Ok(user)
    }

    /// A block (and its index) from `span`'s local free list or its unused tail.
    #[inline]
    fn take_from(&self, span: u64, class: usize) -> Result<Option<(u64, u64)>> {
        if span == 0 {
            return Ok(None);
        }
        // SAFETY: `span` is our heap's current span.
        let s = unsafe { self.span_local(span) }?;
        let taken = if let Some(b) = tagged_list::decode(s.free) {
            let info = Info::unpack(self.mem.info(b)?.load(Ordering::Relaxed))
                .filter(|i| i.state == State::Free && i.class == class)
                .ok_or(corrupt(b, "span free list holds a block that is not free"))?;
            s.free = tagged_list::encode(self.mem.load_link(b)?);
            (b, info.index)
        } else if (s.bump as u64) < LAYOUTS[class].blocks {
            let index = s.bump as u64;
            s.bump += 1;
            (block_at(span, class, index), index)
        } else {
            return Ok(None);
        };
        s.used += 1;
        Ok(Some(taken))
    }

    /// The slow path: collect remote frees, switch spans, or take a new span.
    fn refill(&self, heap_off: u64, heap: &Heap, class: usize, size: usize) -> Result<(u64, u64)> {
        self.collect(heap_off, heap, class)?;
        // SAFETY: we own the heap.
        let local = unsafe { self.local(heap) };
        let current = local.classes[class].current;
        if let Some(b) = self.take_from(current, class)? {
            return Ok(b);
        }
        if current != 0 {
            self.list_push(local, class, LIST_FULL, current)?;
            local.classes[class].current = 0;
        }
        while let Some(span) = (local.avail[class] != 0).then_some(local.avail[class]) {
            self.list_remove(local, class, span)?;
            local.classes[class].current = span;
            // SAFETY: our span.
            unsafe { self.span_local(span) }?.list = LIST_CURRENT;
            if let Some(b) = self.take_from(span, class)? {
                return Ok(b);
            }
            self.list_push(local, class, LIST_FULL, span)?;
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
                    // SAFETY: fresh units, ours alone.
                    unsafe { init_span(&self.mem, span, class, heap_off) }?;
                    return Ok(span);
                }
            }
            self.relieve_shortage(heap_off, attempt)?;
        }
        Err(Error::OutOfMemory { requested: size as u64, available: self.fs.lock().free_units() * UNIT })
    }

    /// Frees space when the free-space manager is short: our own empty current spans, heaps
    /// of exited threads, heaps of dead processes.
    fn relieve_shortage(&self, heap_off: u64, attempt: u32) -> Result<()> {
        if heap_off != 0 {
            self.trim_heap(heap_off)?;
        }
        self.drain_unowned()?;
        if attempt > 0 {
            self.reclaim_dead(0)?;
        }
        Ok(())
    }

    // ---- span lists (owner only) ----

    fn list_head(local: &mut HeapLocal, class: usize, list: u32) -> &mut u64 {
        if list == LIST_AVAIL {
            &mut local.avail[class]
        } else {
            &mut local.full[class]
        }
    }

    fn list_push(&self, local: &mut HeapLocal, class: usize, list: u32, span: u64) -> Result<()> {
        let head = *Self::list_head(local, class, list);
        // SAFETY: spans of a heap we own.
        let s = unsafe { self.span_local(span) }?;
        s.prev = 0;
        s.next = head;
        s.list = list;
        if head != 0 {
            // SAFETY: as above.
            unsafe { self.span_local(head) }?.prev = span;
        }
        *Self::list_head(local, class, list) = span;
        Ok(())
    }

    fn list_remove(&self, local: &mut HeapLocal, class: usize, span: u64) -> Result<()> {
        // SAFETY: spans of a heap we own.
        let s = *unsafe { self.span_local(span) }?;
        if s.list != LIST_AVAIL && s.list != LIST_FULL {
            return Ok(());
        }
        if s.prev != 0 {
            // SAFETY: as above.
            unsafe { self.span_local(s.prev) }?.next = s.next;
        } else {
            *Self::list_head(local, class, s.list) = s.next;
        }
        if s.next != 0 {
            // SAFETY: as above.
            unsafe { self.span_local(s.next) }?.prev = s.prev;
        }
        // SAFETY: as above.
        unsafe { self.span_local(span) }?.list = LIST_NONE;
        Ok(())
    }

    // ---- freeing ----

    fn free_small(&self, my_heap: u64, block: u64, info: Info) -> Result<()> {
        let span = span_of(block, &info).ok_or(invalid(block, "not a block of this allocator"))?;
        let sh = self.mem.span(span)?;
        if span_class(sh) != info.class {
            return Err(invalid(block, "not a block of this allocator"));
        }
        let owner = sh.owner.load(Ordering::Acquire);
        if owner == my_heap && my_heap != 0 {
            if info.state != State::Live {
                return Err(invalid(block, "already freed"));
            }
            let heap = self.heap(my_heap)?;
            // SAFETY: we own `heap` and therefore its spans.
            let local = unsafe { self.local(heap) };
            self.mem.info(block)?.store(info.with_state(State::Free).pack(), Ordering::Release);
            let cs = &mut local.classes[info.class];
            cs.live -= 1;
            cs.live_bytes -= info.size;
            return self.return_block(local, info.class, span, block);
        }
        let heap = self.heap(owner)?;
        self.mem
            .info(block)?
            .compare_exchange(info.pack(), info.with_state(State::Remote).pack(), Ordering::AcqRel, Ordering::Relaxed)
            .map_err(|_| invalid(block, "already freed"))?;
        heap.remote.lists[info.class].push(&self.mem, block);
        if heap.owner.load(Ordering::Acquire) == 0 {
            self.drain(owner)?;
        }
        Ok(())
    }

    /// Puts a block back on its span's local list (owner only) and files the span.
    fn return_block(&self, local: &mut HeapLocal, class: usize, span: u64, block: u64) -> Result<()> {
        // SAFETY: the caller owns the span's heap.
        let s = unsafe { self.span_local(span) }?;
        self.mem.store_link(block, tagged_list::decode(s.free));
        s.free = tagged_list::encode(Some(block));
        s.used = s.used.checked_sub(1).ok_or(corrupt(span, "span use count underflow"))?;
        let (used, list) = (s.used, s.list);
        if list == LIST_CURRENT {
            return Ok(());
        }
        if used == 0 {
            self.list_remove(local, class, span)?;
            return self.release_span(span);
        }
        if list == LIST_FULL {
            self.list_remove(local, class, span)?;
            self.list_push(local, class, LIST_AVAIL, span)?;
        }
        Ok(())
    }

    fn release_span(&self, span: u64) -> Result<()> {
        let head = self.fs.layout().unit_of(span).ok_or(corrupt(span, "span outside the arena"))?;
        let mut g = self.fs.lock();
        g.free(head)
    }

    /// Moves the remote frees of `class` to their spans (owner only).
    fn collect(&self, heap_off: u64, heap: &Heap, class: usize) -> Result<()> {
        let Some(first) = heap.remote.lists[class].take_all() else {
            return Ok(());
        };
        // SAFETY: the caller owns the heap.
        let local = unsafe { self.local(heap) };
        let limit = self.fs.layout().bytes() / 32 + 1;
        let mut chain = Vec::new();
        tagged_list::walk(&self.mem, Some(first), limit, |b| {
            chain.push(b);
            Ok(())
        })?;
        for b in chain {
            let info = Info::unpack(self.mem.info(b)?.load(Ordering::Acquire))
                .filter(|i| i.state == State::Remote && i.class == class)
                .ok_or(corrupt(b, "remote list holds a block that was not freed remotely"))?;
            let span = span_of(b, &info).ok_or(corrupt(b, "remote block outside a span"))?;
            if self.mem.span(span)?.owner.load(Ordering::Relaxed) != heap_off {
                return Err(corrupt(b, "remote block of another heap"));
            }
            self.mem.info(b)?.store(info.with_state(State::Free).pack(), Ordering::Release);
            let cs = &mut local.classes[class];
            cs.live -= 1;
            cs.live_bytes -= info.size;
            self.return_block(local, class, span, b)?;
        }
        Ok(())
    }

    /// Gives back every empty span of a heap we own, current ones included.
    fn trim_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heap(heap_off)?;
        for class in 0..CLASS_COUNT {
            self.collect(heap_off, heap, class)?;
            // SAFETY: we own the heap.
            let local = unsafe { self.local(heap) };
            let current = local.classes[class].current;
            if current != 0 {
                // SAFETY: our span.
                let s = unsafe { self.span_local(current) }?;
                if s.used == 0 {
                    local.classes[class].current = 0;
                    s.list = LIST_NONE;
                    self.release_span(current)?;
                }
            }
        }
        Ok(())
    }

    /// Trims a heap we hold and lets it go; repeats while remote frees arrived meanwhile.
    fn release_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heap(heap_off)?;
        let token = heap.owner.load(Ordering::Relaxed);
        loop {
            self.trim_heap(heap_off)?;
            heap.owner.store(0, Ordering::Release);
            let pending = heap.remote.lists.iter().any(|l| !l.is_empty());
            if !pending || heap.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_err() {
                return Ok(());
            }
        }
    }

    /// Collects the remote frees of a heap no thread owns, if no one else is doing it.
    fn drain(&self, heap_off: u64) -> Result<()> {
        let heap = self.heap(heap_off)?;
        let token = my_token_plain();
        if heap.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            self.release_heap(heap_off)?;
        }
        Ok(())
    }

    fn drain_unowned(&self) -> Result<()> {
        for offset in self.heaps()? {
            let h = self.heap(offset)?;
            if h.owner.load(Ordering::Relaxed) == 0 && h.remote.lists.iter().any(|l| !l.is_empty()) {
                self.drain(offset)?;
            }
        }
        Ok(())
    }

    // ---- dead processes ----

    fn owner_dead(h: &Heap, owner: u64) -> bool {
        owner != 0
            && liveness::is_dead(ProcessStamp {
                pid: (owner >> 32) as u32,
                start_time: h.start_time.load(Ordering::Acquire),
            })
    }

    /// Repairs and releases every heap whose owning process has died; returns how many.
    fn reclaim_dead(&self, _token: u64) -> Result<u64> {
        let mut reclaimed = 0;
        for offset in self.heaps()? {
            let h = self.heap(offset)?;
            let owner = h.owner.load(Ordering::Acquire);
            if !Self::owner_dead(h, owner) {
                continue;
            }
            let me = my_token_plain();
            if h.owner.compare_exchange(owner, me, Ordering::Acquire, Ordering::Relaxed).is_err() {
                continue;
            }
            self.repair_heap(offset)?;
            self.release_heap(offset)?;
            reclaimed += 1;
        }
        Ok(reclaimed)
    }

    /// Rebuilds a heap's spans and lists from its blocks' headers, after its owner died at an
    /// unknown point. The caller holds the heap.
    fn repair_heap(&self, heap_off: u64) -> Result<()> {
        let heap = self.heap(heap_off)?;
        let index = heap.index;
        let free_dead = self.free_dead();
        // SAFETY: we hold the heap.
        let local = unsafe { self.local(heap) };
        let allocations: Vec<u64> = local.classes.iter().map(|c| c.allocations).collect();
        *local = HeapLocal {
            classes: [ClassState::default(); CLASS_COUNT],
            avail: [0; CLASS_COUNT],
            full: [0; CLASS_COUNT],
        };
        let mut spans = Vec::new();
        let mut dead_large = Vec::new();
        {
            let g = self.fs.lock();
            g.for_each_used(|head, run| {
                let base = self.fs.layout().unit_offset(head);
                if run.tag == TAG_SPAN && self.mem.span(base).is_ok_and(|s| s.owner.load(Ordering::Relaxed) == heap_off)
                {
                    spans.push((base, run.aux as usize));
                } else if run.tag == TAG_LARGE && run.aux == index + 1 && free_dead {
                    dead_large.push(base);
                }
                Ok(())
            })?;
        }
        for (span, class) in spans {
            let layout = *LAYOUTS.get(class).ok_or(corrupt(span, "span class"))?;
            // SAFETY: we hold the span's heap.
            let s = unsafe { self.span_local(span) }?;
            let bump = (s.bump as u64).min(layout.blocks);
            let (mut free, mut used) = (None, 0u32);
            for index in (0..bump).rev() {
                let b = block_at(span, class, index);
                let word = self.mem.info(b)?;
                let info = Info::unpack(word.load(Ordering::Acquire)).filter(|i| i.class == class && i.index == index);
                let keep_live = match info {
                    Some(i) if i.state == State::Remote => true,
                    Some(i) if i.state == State::Live => {
                        let freed = free_dead
                            && word
                                .compare_exchange(
                                    i.pack(),
                                    i.with_state(State::Free).pack(),
                                    Ordering::AcqRel,
                                    Ordering::Relaxed,
                                )
                                .is_ok();
                        !freed
                    }
                    _ => {
                        let fresh = Info { state: State::Free, class, index, size: 0 };
                        word.store(fresh.pack(), Ordering::Release);
                        false
                    }
                };
                if keep_live {
                    let i = Info::unpack(word.load(Ordering::Acquire)).unwrap_or(Info {
                        state: State::Free,
                        class,
                        index,
                        size: 0,
                    });
                    used += 1;
                    local.classes[class].live += 1;
                    local.classes[class].live_bytes += i.size;
                } else {
                    self.mem.store_link(b, free);
                    free = Some(b);
                }
            }
            *s = SpanLocal { free: tagged_list::encode(free), bump: bump as u32, used, ..SpanLocal::default() };
            if used == 0 {
                self.release_span(span)?;
            } else if free.is_some() || bump < layout.blocks {
                self.list_push(local, class, LIST_AVAIL, span)?;
            } else {
                self.list_push(local, class, LIST_FULL, span)?;
            }
        }
        for (c, allocs) in allocations.into_iter().enumerate() {
            local.classes[c].allocations = allocs.max(local.classes[c].live);
        }
        for base in dead_large {
            let _ = large::free(&self.fs, &self.mem, base);
        }
        Ok(())
    }

    // ---- reading ----

    fn class_counts(&self) -> Result<([u64; CLASS_COUNT], [u64; CLASS_COUNT], u64)> {
        let mut live = [0u64; CLASS_COUNT];
        let mut allocs = [0u64; CLASS_COUNT];
        let mut bytes = 0u64;
        for offset in self.heaps()? {
            let h = self.heap(offset)?;
            // Counters of heaps other threads own are read racily: figures, not invariants.
            // SAFETY: plain integer reads of memory in bounds.
            let local = unsafe { &*h.local.get() };
            for c in 0..CLASS_COUNT {
                live[c] = live[c].wrapping_add(local.classes[c].live);
                allocs[c] = allocs[c].wrapping_add(local.classes[c].allocations);
                bytes = bytes.wrapping_add(local.classes[c].live_bytes);
            }
        }
        Ok((live, allocs, bytes))
    }

    fn meta_bytes(&self, g: &FreeSpaceGuard<'_>) -> u64 {
        let mut total = 0;
        let _ = g.for_each_used(|_, run| {
            if run.tag == TAG_META {
                total += run.len() as u64 * UNIT;
            }
            Ok(())
        });
        total
    }

    fn check(&self) -> Result<()> {
        use alloc::collections::{BTreeMap, BTreeSet};
        let g = self.fs.lock();
        g.check()?;
        let heaps = self.heaps()?;
        let heap_set: BTreeSet<u64> = heaps.iter().copied().collect();
        let limit = self.fs.layout().bytes() / 32 + 1;
        // Remote blocks, and each heap's span lists.
        let mut remote = BTreeSet::new();
        let mut filed: BTreeMap<u64, (u64, usize, u32)> = BTreeMap::new();
        for &offset in &heaps {
            let h = self.heap(offset)?;
            for class in 0..CLASS_COUNT {
                tagged_list::walk(&self.mem, h.remote.lists[class].peek(), limit, |b| {
                    if !remote.insert(b) {
                        return Err(corrupt(b, "block on remote lists twice"));
                    }
                    Ok(())
                })?;
                // SAFETY: read while the caller keeps the allocator quiet (see `check`'s docs).
                let local = unsafe { &*h.local.get() };
                let mut file = |span: u64, list: u32| -> Result<()> {
                    if filed.insert(span, (offset, class, list)).is_some() {
                        return Err(corrupt(span, "span filed twice"));
                    }
                    Ok(())
                };
                if local.classes[class].current != 0 {
                    file(local.classes[class].current, LIST_CURRENT)?;
                }
                for (head, list) in [(local.avail[class], LIST_AVAIL), (local.full[class], LIST_FULL)] {
                    let (mut at, mut n) = (head, 0u64);
                    while at != 0 {
                        n += 1;
                        if n > limit {
                            return Err(corrupt(at, "span list does not end"));
                        }
                        file(at, list)?;
                        let s = self.mem.span(at)?;
                        at = s.local.next;
                    }
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
                    let s: &SpanHeader = self.mem.span(base)?;
                    let owner = s.owner.load(Ordering::Relaxed);
                    if span_class(s) != class || run.len() != layout.units || !heap_set.contains(&owner) {
                        return Err(corrupt(base, "span header disagrees with the table"));
                    }
                    let (fh, fc, fl) = *filed.get(&base).ok_or(corrupt(base, "span on no list of its heap"))?;
                    if fh != owner || fc != class || fl != s.local.list {
                        return Err(corrupt(base, "span filed in the wrong place"));
                    }
                    spans_seen += 1;
                    let bump = s.local.bump as u64;
                    if bump > layout.blocks {
                        return Err(corrupt(base, "span bump past its blocks"));
                    }
                    let mut listed = BTreeSet::new();
                    tagged_list::walk(&self.mem, tagged_list::decode(s.local.free), layout.blocks + 1, |b| {
                        let info = Info::unpack(self.mem.info(b)?.load(Ordering::Acquire));
                        let ok = info.is_some_and(|i| i.state == State::Free && i.class == class)
                            && span_of(b, &info.unwrap()) == Some(base);
                        if !ok || !listed.insert(b) {
                            return Err(corrupt(b, "span free list holds a block that is not its free block"));
                        }
                        Ok(())
                    })?;
                    let mut used = 0u32;
                    let entry = live.entry((owner, class)).or_default();
                    for index in 0..bump {
                        let b = block_at(base, class, index);
                        let info = Info::unpack(self.mem.info(b)?.load(Ordering::Acquire))
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
                    if used != s.local.used {
                        return Err(corrupt(base, "span use count disagrees with its blocks"));
                    }
                }
                TAG_LARGE => {
                    large::check_run(&self.fs, &self.mem, head, run.len())?;
                }
                TAG_META => {}
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
            let h = self.heap(offset)?;
            // SAFETY: as above.
            let local = unsafe { &*h.local.get() };
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

/// An owner token for threads that hold a heap only briefly (to drain or repair it).
fn my_token_plain() -> u64 {
    ((liveness::current().pid as u64) << 32) | 0xffff_ffff
}

impl<T: ThreadModel> ThreadLocalAllocator<T> {
    fn open(region: Region, id: AllocatorId, layout: FreeSpaceLayout) -> Result<Self> {
        let header_len = core::mem::size_of::<TlaHeader>() as u64;
        let ptr = region.ptr(region.offset(), header_len)?.cast::<TlaHeader>();
        let header = NonNull::new(ptr).ok_or(corrupt(region.offset(), "null header"))?;
        let state_offset = region.offset() + core::mem::offset_of!(TlaHeader, free_space) as u64;
        // SAFETY: the header holds the free-space state at this offset (written by `create`).
        let fs = unsafe { FreeSpace::new(region.clone(), state_offset, layout) }?;
        let mem = Mem::of(&region, region.offset(), region.end())?;
        // SAFETY: `release_at_exit` accepts exactly the values this allocator stores.
        let key = unsafe { T::tls_create(Some(release_at_exit)) }?;
        Ok(ThreadLocalAllocator { shared: Arc::new(Shared { region, header, mem, fs }), id, key, _model: PhantomData })
    }

    /// The calling thread's heap, acquired on first use.
    #[inline]
    fn thread_heap(&self) -> Result<u64> {
        let value = T::tls_get(self.key);
        if !value.is_null() {
            // SAFETY: values under our key are leaked Box<ThreadHeap>s, freed only at thread exit.
            return Ok(unsafe { &*value.cast::<ThreadHeap>() }.heap);
        }
        self.attach_thread()
    }

    #[cold]
    fn attach_thread(&self) -> Result<u64> {
        let heap = self.shared.acquire_heap(my_token::<T>())?;
        let boxed = Box::new(ThreadHeap { shared: self.shared.clone(), heap });
        let raw = Box::into_raw(boxed);
        if let Err(e) = T::tls_set(self.key, raw.cast()) {
            // SAFETY: `raw` was just leaked and never shared.
            drop(unsafe { Box::from_raw(raw) });
            let _ = self.shared.release_heap(heap);
            return Err(e);
        }
        Ok(heap)
    }

    /// The calling thread's heap if it has one (frees do not create heaps).
    #[inline]
    fn existing_heap(&self) -> u64 {
        let value = T::tls_get(self.key);
        if value.is_null() {
            0
        } else {
            // SAFETY: as in `thread_heap`.
            unsafe { &*value.cast::<ThreadHeap>() }.heap
        }
    }

    /// Gives back the calling thread's heap now (as thread exit does): its empty spans return
    /// to the free-space manager and the heap is released for another thread.
    pub fn release_thread_heap(&self) -> Result<()> {
        let value = T::tls_get(self.key);
        if value.is_null() {
            return Ok(());
        }
        T::tls_set(self.key, core::ptr::null_mut())?;
        // SAFETY: as in `thread_heap`; cleared from TLS above, so this is its only owner.
        let th = unsafe { Box::from_raw(value.cast::<ThreadHeap>()) };
        self.shared.release_heap(th.heap)
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

    /// Repairs and releases the heaps of processes that have died; returns how many.
    pub fn reclaim(&self) -> Result<u64> {
        self.shared.reclaim_dead(0)
    }

    /// Per size class: block size, live blocks, allocations since creation.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        let (live, allocs, _) = self.shared.class_counts().unwrap_or(([0; CLASS_COUNT], [0; CLASS_COUNT], 0));
        class_stats(&live, &allocs)
    }

    /// How many heaps threads hold right now (in every process).
    pub fn owned_heaps(&self) -> Result<usize> {
        let mut n = 0;
        for offset in self.shared.heaps()? {
            n += (self.shared.heap(offset)?.owner.load(Ordering::Relaxed) != 0) as usize;
        }
        Ok(n)
    }
}

impl<T: ThreadModel> Drop for ThreadLocalAllocator<T> {
    fn drop(&mut self) {
        let _ = self.release_thread_heap();
        // Other threads' values stay until they exit; with the key deleted their destructors
        // may not run (pthreads), so their heaps are released when their process exits and is
        // found dead, or by `Drop` of a handle those threads call `release_thread_heap` on.
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
        check_request(size, align)?;
        let heap = self.thread_heap()?;
        let user = match class_for(size, align) {
            Some(class) => self.shared.allocate_small(heap, class, size, align)?,
            None => {
                let s = &self.shared;
                let aux = s.heap_index_of(heap)? + 1;
                for attempt in 0..3 {
                    {
                        let mut g = s.fs.lock();
                        if let Some(u) = large::allocate(&mut g, &s.fs, &s.mem, size, align, aux, 0)? {
                            return Ok(OffsetPtr::new(u));
                        }
                    }
                    s.relieve_shortage(heap, attempt)?;
                }
                return Err(Error::OutOfMemory { requested: size as u64, available: s.fs.lock().free_units() * UNIT });
            }
        };
        Ok(OffsetPtr::new(user))
    }

    fn reallocate(&self, ptr: OffsetPtr, new_size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(new_size, align)?;
        let s = &self.shared;
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        let (block, info, _) = block_of_user(&s.mem, user)?;
        if info.state != State::Live {
            return Err(invalid(user, "already freed"));
        }
        let old_size;
        if info.class == LARGE_CLASS {
            if large::resize_in_place(&s.fs, &s.mem, block, user, new_size, align)? {
                return Ok(ptr);
            }
            old_size = large::size_of(&s.fs, &s.mem, block)?;
        } else {
            old_size = info.size;
            let room = block + LAYOUTS[info.class].stride - user;
            let fits = user % align as u64 == 0 && new_size as u64 <= room;
            let span = span_of(block, &info).ok_or(invalid(user, "not a block of this allocator"))?;
            let mine = self.existing_heap();
            let owned = mine != 0 && s.mem.span(span)?.owner.load(Ordering::Relaxed) == mine;
            if fits && owned && class_for(new_size, align).is_some_and(|c| c + 4 >= info.class) {
                let heap = s.heap(mine)?;
                // SAFETY: we own the heap that owns the block.
                let local = unsafe { s.local(heap) };
                let cs = &mut local.classes[info.class];
                cs.live_bytes = cs.live_bytes - info.size + new_size as u64;
                let resized = Info { size: new_size as u64, ..info };
                s.mem.info(block)?.store(resized.pack(), Ordering::Release);
                return Ok(ptr);
            }
        }
        let new = self.allocate(new_size, align)?;
        s.mem.copy(user, new.get(), old_size.min(new_size as u64))?;
        self.free(ptr)?;
        Ok(new)
    }

    #[inline]
    fn free(&self, ptr: OffsetPtr) -> Result<()> {
        let s = &self.shared;
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        let (block, info, _) = block_of_user(&s.mem, user)?;
        if info.state != State::Live {
            return Err(invalid(user, "already freed"));
        }
        if info.class == LARGE_CLASS {
            return large::free(&s.fs, &s.mem, block);
        }
        s.free_small(self.existing_heap(), block, info)
    }

    fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
        let s = &self.shared;
        let user = ptr.offset().ok_or(invalid(ptr.get(), "null pointer"))?;
        let (block, info, _) = block_of_user(&s.mem, user)?;
        if info.state != State::Live {
            return Err(invalid(user, "already freed"));
        }
        if info.class == LARGE_CLASS {
            return large::size_of(&s.fs, &s.mem, block).map(|v| v as usize);
        }
        Ok(info.size as usize)
    }

    /// Sums every heap's counters (read without stopping their threads). `bytes_in_use` counts
    /// remotely freed blocks until their owner collects them. `bytes_reserved` counts live
    /// blocks with headers and class rounding, large runs and extra heap chunks;
    /// `high_watermark` is the most the free-space manager had out at once.
    fn stats(&self) -> AllocStats {
        let s = &self.shared;
        let (live, allocs, bytes) = s.class_counts().unwrap_or(([0; CLASS_COUNT], [0; CLASS_COUNT], 0));
        let g = s.fs.lock();
        let live_count = live.iter().fold(g.st.large.live, |a, n| a.wrapping_add(*n));
        let total = allocs.iter().fold(g.st.large.allocations, |a, n| a.wrapping_add(*n));
        AllocStats {
            capacity: s.fs.layout().bytes(),
            bytes_in_use: bytes.wrapping_add(g.st.large.live_bytes),
            bytes_reserved: small_reserved(&live)
                .wrapping_add(g.st.large.live_units * UNIT)
                .wrapping_add(s.meta_bytes(&g)),
            high_watermark: g.peak_used_units() * UNIT,
            live_allocations: live_count,
            total_allocations: total,
            total_frees: total.wrapping_sub(live_count),
        }
    }

    /// Walks every heap, span, list and run (see the module docs for what must hold). Heaps
    /// that threads are using are read without stopping them: call it while no thread
    /// allocates or frees.
    fn check(&self) -> Result<()> {
        self.shared.check()
    }
}

impl<T: ThreadModel> AllocatorType for ThreadLocalAllocator<T> {
    const TYPE_ID: u32 = TYPE_ID;
    type Config = ThreadLocalConfig;

    fn create(region: Region, id: AllocatorId, config: &ThreadLocalConfig) -> Result<Self> {
        let header_len = core::mem::size_of::<TlaHeader>() as u64;
        let header_end = region.offset() + header_len;
        let layout = FreeSpaceLayout::plan(header_end, region.end())?;
        let ptr = region.ptr(region.offset(), header_len)?;
        if ptr.align_offset(64) != 0 {
            return Err(Error::InvalidAlignment { align: 64 });
        }
        // SAFETY: in bounds and not yet visible to anyone.
        unsafe {
            core::ptr::write_bytes(ptr, 0, header_len as usize);
            core::ptr::addr_of_mut!((*ptr.cast::<TlaHeader>()).common).write(CommonHeader::new(
                TYPE_ID,
                id,
                config.dead_process_blocks.flags(),
                &layout,
            ));
        }
        let a = ThreadLocalAllocator::open(region, id, layout)?;
        let chunk = a.shared.region.offset() + core::mem::offset_of!(TlaHeader, chunk) as u64;
        a.shared.format_chunk(chunk, 0)?;
        // SAFETY: no one else sees the allocator yet.
        unsafe { a.shared.fs.init() };
        Ok(a)
    }

    fn attach(region: Region, id: AllocatorId) -> Result<Self> {
        let header_len = core::mem::size_of::<TlaHeader>() as u64;
        let ptr = region.ptr(region.offset(), header_len)?.cast::<TlaHeader>();
        // SAFETY: in bounds; plain integers, validated before use.
        let common = unsafe { &(*ptr).common };
        let layout = common.validate(TYPE_ID, id, &region, region.offset() + header_len)?;
        let a = ThreadLocalAllocator::open(region, id, layout)?;
        a.shared.reclaim_dead(0)?;
        a.shared.drain_unowned()?;
        Ok(a)
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;
    use crate::allocators::testing::{exercise, op_strategy, region_of, run_model};
    use crate::testing::TestThreads;
    use proptest::prelude::*;

    type Tla = ThreadLocalAllocator<TestThreads>;

    #[test]
    fn serves_every_size_and_alignment_and_returns_to_empty() {
        let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        exercise(&a);
        a.trim().unwrap();
        a.check().unwrap();
    }

    #[test]
    fn remote_frees_return_to_the_owner_and_exited_threads_give_their_heaps_back() {
        let a = Arc::new(Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap());
        let start = a.stats().free_bytes();
        let blocks: Vec<u64> = {
            let a = a.clone();
            std::thread::spawn(move || (0..2000).map(|i| a.allocate(16 + i % 500, 8).unwrap().get()).collect())
                .join()
                .unwrap()
        };
        assert_eq!(a.owned_heaps().unwrap(), 0, "the exited thread released its heap");
        a.check().unwrap();
        for b in blocks {
            a.free(OffsetPtr::new(b)).unwrap();
        }
        a.check().unwrap();
        assert_eq!(a.stats().live_allocations, 0);
        assert_eq!(a.stats().free_bytes(), start);
        let p = a.allocate(100, 8).unwrap();
        a.free(p).unwrap();
        a.release_thread_heap().unwrap();
        a.check().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn behaves_like_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
            let a = Tla::create(region_of(24 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
            run_model(&a, &ops);
        }
    }
}
