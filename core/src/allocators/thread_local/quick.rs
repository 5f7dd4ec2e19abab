//! The quick paths: an allocation from the calling thread's free list for the class, and a free
//! of an unpadded block stamped with the calling thread's heap. They call nothing and build no
//! error value; anything they cannot finish goes to the full path.
//!
//! What they read of process memory sits in [`Quick`], a copy that each handle keeps next to its
//! other fields, so a quick path reaches the limits and the mapping without going through the
//! shared state.

use crate::crash;
use crate::sync::atomic::Ordering;
use crate::sync::tagged_list;

use super::super::size_class::CLASS_COUNT;
use super::super::span::{
    free_from_live, free_pattern, free_word_mask, live_from_free, live_small_class, LineTable, Mem, FIELD_MASK,
    LAYOUTS, LIVE_DELTA, SMALL_HEADER,
};
use super::heap::{ClassState, Heap, HeapLocal, CYCLE};

/// A per-class constant of the quick allocation, on a cache line of its own: the class's
/// line in a heap and its constants here are then at the same offset ([`LineTable`]).
#[repr(align(64))]
#[derive(Clone, Copy)]
struct PerClass(u64);

/// What the quick paths need, all process-local and fixed at open: the region's mapping, the
/// arena, and the limits offsets read from shared memory are checked against.
///
/// (`repr(C)`, and first in the handle: at the handle's first byte a field that only the quick
/// allocation indexes. A field the quick paths read at that byte is read through the handle's
/// address, which the compiler then computes up front for the full path's call and keeps in a
/// register of its own.)
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Quick {
    /// Per class: the [`Mem::holds`] limit of a block of the class in the arena.
    limits: [PerClass; CLASS_COUNT],
    /// Per class: a free info word of the class with label 0, masked with `free_mask`.
    free_words: [PerClass; CLASS_COUNT],
    /// The whole region: the header and heap chunks.
    mem: Mem,
    /// The arena: spans and blocks.
    arena: Mem,
    /// The [`Mem::holds`] limit of a small block's two header words in the arena.
    header_limit: u64,
    /// [`free_word_mask`] and [`LIVE_DELTA`], read from here rather than written as immediates:
    /// a 64-bit immediate takes an instruction and a register of its own, a field folds into
    /// the instruction that uses it.
    free_mask: u64,
    live_delta: u64,
    /// The line (class times 64) of each small request (indexed from the handle, not through
    /// a static).
    lines: LineTable,
}

/// `r` itself, but through a register the compiler cannot see into: the class line's address
/// is then computed once into a register, and each access to the line addresses it as that
/// register plus a displacement. Left alone, the compiler folds the address arithmetic (heap
/// plus class offset) into every access as a base plus an index; on Intel cores an instruction
/// that reads, modifies and writes memory (the counters' `add`s) through a base plus an index
/// is split into more micro-operations than one through a base alone (measured: W1 7.5 -> 7.0
/// ns with both quick paths so).
#[inline(always)]
fn in_register<T>(r: &T) -> &T {
    // (Not under Miri, which runs no inline assembly.)
    #[cfg(all(any(target_arch = "x86", target_arch = "x86_64"), not(miri)))]
    {
        let mut p: *const T = r;
        // SAFETY: the template is a comment: the register holding `p` comes back unchanged, and
        // nothing else (memory, stack, flags) is touched.
        // The pointer is never dereferenced in the template, so `nomem` holds.
        #[allow(clippy::pointers_in_nomem_asm_block)]
        unsafe {
            core::arch::asm!("/* {0} */", inout(reg) p, options(pure, nomem, nostack, preserves_flags))
        };
        // SAFETY: `p` is `r`, unchanged: the same shared borrow, for the same lifetime.
        unsafe { &*p }
    }
    #[cfg(not(all(any(target_arch = "x86", target_arch = "x86_64"), not(miri))))]
    r
}

impl Quick {
    /// The quick paths' view of a region (`mem`) and its arena.
    pub(super) fn new(mem: Mem, arena: Mem) -> Quick {
        let limits = core::array::from_fn(|c| PerClass(arena.limit_for(LAYOUTS[c].stride)));
        let free_words = core::array::from_fn(|c| PerClass(free_pattern(c, 0)));
        Quick {
            mem,
            arena,
            header_limit: arena.limit_for(SMALL_HEADER),
            limits,
            free_words,
            lines: LineTable::new(),
            free_mask: free_word_mask(),
            live_delta: LIVE_DELTA,
        }
    }

    /// The class of a small, plainly aligned request ([`quick_class`](super::super::span::quick_class))
    /// times 64: its line.
    #[inline]
    pub(super) fn line(&self, size: usize, align: usize) -> Option<usize> {
        self.lines.quick_line(size, align)
    }

    /// The owner-only part of the heap at `heap_off`, for its owner to update.
    ///
    /// # Safety
    /// `heap_off` came from the calling thread's TLS: a heap this thread owns (so no one else
    /// writes this part, see [`Shared::local`](super::Shared::local)), checked (bounds,
    /// alignment, magic) when it was taken, in the region `mem` views (which stays mapped).
    #[inline]
    unsafe fn local(&self, heap_off: u64) -> &HeapLocal {
        // SAFETY: the caller's promise: a checked heap slot in the mapped region.
        unsafe { &(*self.mem.addr(heap_off).cast::<Heap>()).body.local.0 }
    }

    /// Allocates a block of the class of `line` ([`Quick::line`]; the class fits `size`
    /// unpadded) from the free list of the heap at `heap_off`, if it has one.
    #[inline]
    pub(super) fn allocate(&self, heap_off: u64, line: usize, size: usize) -> Option<u64> {
        let class = line / 64;
        // SAFETY: `heap_off` came from this thread's TLS: a heap it owns, checked when taken.
        let local = unsafe { self.local(heap_off) };
        let cs = in_register(local.classes.get(class)?);
        let (block, word) = self.pop_free(cs, class)?;
        // SAFETY: `pop_free` checked the whole block lies in the arena.
        Some(unsafe { self.hand_out(heap_off, cs, block, word, size) })
    }

    /// Allocates as [`Quick::allocate`] after the allocation list of `class` ran dry, from the
    /// blocks the heap freed since (`freed`, taken whole), when nothing else waits: no remote
    /// frees and no orphan to collect first (the full path collects them), and at least a
    /// cycle's worth of blocks ([`CYCLE`]). `None` sends the caller to the full path.
    #[inline]
    pub(super) fn allocate_from_freed(&self, heap_off: u64, line: usize, size: usize) -> Option<u64> {
        let class = line / 64;
        // SAFETY: as in `local`: a checked heap slot of ours.
        let heap = unsafe { &*self.mem.addr(heap_off).cast::<Heap>() };
        let (remote, orphan) = (heap.body.remote.0.get(class)?, heap.body.orphans.0.get(class)?);
        // SAFETY: `heap_off` came from this thread's TLS: a heap it owns, checked when taken.
        let cs = unsafe { self.local(heap_off) }.classes.get(class)?;
        // A non-empty `free` that the quick path did not pop from is damaged: the full path says
        // so. Fewer blocks than a cycle's worth: the full path tops them up.
        if cs.free.get() != 0
            || cs.freed.get() == 0
            || cs.count() < CYCLE.get(class).copied()?
            || !remote.is_empty()
            || orphan.load(Ordering::Acquire) != 0
        {
            return None;
        }
        cs.free.set(cs.freed.take());
        crash::point();
        self.allocate(heap_off, line, size)
    }

    /// Whether `block` is the offset of a whole block of `class` in the arena (16-aligned), as
    /// each pop checks before it reads one.
    #[inline]
    pub(super) fn holds_block(&self, block: u64, class: usize) -> bool {
        self.arena.holds(block, self.limits[class].0)
    }

    /// The first block of a class's free list (and its free info word). `None` when the list is
    /// empty, or its first block is not a free block of the class in the arena.
    #[inline]
    pub(super) fn pop_free(&self, cs: &ClassState, class: usize) -> Option<(u64, u64)> {
        let block = cs.free.get();
        if !self.holds_block(block, class) {
            return None;
        }
        // SAFETY: the whole block lies in the arena, 16-aligned (checked just above). (Through
        // `mem`, which holds the arena, so the heap and the block share one base.)
        let (info, link) = unsafe { (self.mem.word_unchecked(block), self.mem.word_unchecked(block + 8)) };
        let word = info.load(Ordering::Relaxed);
        if word & self.free_mask != self.free_words[class].0 {
            return None;
        }
        // Links are untagged (`tagged_list::encode`): decoding is the shift alone. A damaged
        // link fails the bounds check of the next pop.
        cs.free.set(link.load(Ordering::Relaxed).wrapping_shl(4));
        crash::point();
        Some((block, word))
    }

    /// Counts a block taken from the heap at `heap_off` (`cs` its class line) and makes it live,
    /// unpadded, stamped with the heap (see [`Quick::free`]); returns its user offset. `word` is
    /// the block's free info word.
    ///
    /// # Safety
    /// `block` lies whole in the arena, and `size` fits its class unpadded.
    #[inline]
    pub(super) unsafe fn hand_out(&self, heap_off: u64, cs: &ClassState, block: u64, word: u64, size: usize) -> u64 {
        cs.count_allocation(size as u64);
        crash::point();
        let live = word.wrapping_add(self.live_delta).wrapping_add(size as u64);
        debug_assert_eq!(live, live_from_free(word, size as u64));
        // SAFETY: the caller's promise: the block's header words lie in the arena, which `mem`
        // holds.
        unsafe {
            self.mem.word_unchecked(block + 8).store(heap_off, Ordering::Relaxed);
            crash::point();
            self.mem.word_unchecked(block).store(live, Ordering::Release);
            crash::point();
        }
        block + SMALL_HEADER
    }

    /// Frees the block at `user` if it is a live unpadded small block stamped with the calling
    /// thread's heap `heap_off`. `None` when it is not (the full path then sorts it out); else
    /// whether its class's lists are due for a sweep (the block tells which class: the class
    /// is not kept live for that rare case).
    ///
    /// The stamp in the block's second word, written when the block was handed out, names the
    /// heap that owns its span (spans never change heaps), so the free reads only the block's
    /// two header words and the heap's class line. It does not check the span geometry (the
    /// info word's distance against the class stride, the span header): a caller that writes a
    /// live info word and our heap's offset into its own block's user bytes and frees the
    /// address past them gets that address put on our free list. Such a forged block stays in
    /// the arena (each pop bounds-checks a whole block of its class) but may overlap a live
    /// block when it is handed out; `check()` reports it (a free block on no span of ours).
    /// Likewise a double free made by the owner and another thread at the same instant: the
    /// owner's store of the free word does not compare first, so the block can land on both
    /// `freed` and the remote list, and the owner's collections of the class then fail with
    /// `Error::Corrupt`, as for any damage (a compare on this path would cost every free).
    #[inline]
    pub(super) fn free(&self, heap_off: u64, user: u64) -> Option<bool> {
        let block = user.wrapping_sub(SMALL_HEADER);
        if !self.arena.holds(block, self.header_limit) {
            return None;
        }
        // SAFETY: `[block, block + 16)` lies in the arena, 16-aligned (checked just above);
        // `mem` holds the arena.
        let (info, stamp) = unsafe { (self.mem.word_unchecked(block), self.mem.word_unchecked(block + 8)) };
        let word = info.load(Ordering::Acquire);
        let class = live_small_class(word);
        if class >= CLASS_COUNT || stamp.load(Ordering::Relaxed) != heap_off {
            return None;
        }
        // SAFETY: `heap_off` is this thread's heap (from its TLS), checked when taken.
        let local = unsafe { self.local(heap_off) };
        let cs = in_register(local.classes.get(class)?);
        Some(self.push_freed(cs, block, word))
    }

    /// Turns a live block of our heap free and pushes it on `cs.freed`, the heap's list of the
    /// blocks of its class it freed (allocations take them once `cs.free` runs dry); returns
    /// whether the lists are due for a sweep. `block` lies in the arena with its two
    /// header words, and `word` is its live info word.
    #[inline]
    pub(super) fn push_freed(&self, cs: &ClassState, block: u64, word: u64) -> bool {
        let free = (word & !FIELD_MASK).wrapping_sub(self.live_delta);
        debug_assert_eq!(free, free_from_live(word));
        let freed = cs.freed.head();
        // SAFETY: the caller's promise: both header words lie in the arena (which `mem` holds),
        // 16-aligned.
        unsafe {
            self.mem.word_unchecked(block).store(free, Ordering::Release);
            crash::point();
            self.mem.word_unchecked(block + 8).store(tagged_list::encode(freed), Ordering::Relaxed);
            crash::point();
        }
        cs.freed.set(block);
        crash::point();
        cs.count_free(word & FIELD_MASK);
        crash::point();
        cs.sweep_due()
    }
}
