//! [`BlockArena`]: the bookkeeping shared by [`QuickPool`](super::QuickPool) and
//! [`BackendResource`](super::BackendResource).
//!
//! An arena holds *chunks* (contiguous ranges handed to it, e.g. upstream blocks) and carves
//! them into *blocks*: best fit through a [`FreeIndex`], split on allocation, merged with free
//! neighbours on free. Each block is one record ([`Block`], half a cache line) in a table outside
//! the memory it describes: its place, its address-order neighbours in the same chunk (so a
//! merge finds them without a lookup), and the index's tree links; what only a used block needs
//! (the size asked for, the sequence number) sits in a [`Cold`] record beside it. Used blocks are
//! found by address through an [`AddrTable`] chained through the same records. Spare records form
//! a list through their `next` links. The arena never reads or writes the memory it manages, so it
//! serves device memory as well as host memory. Pointers are made from block addresses with the
//! provenance of the chunk, exposed when the chunk is added: a record needs no pointer of its own.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::hash::{BuildHasherDefault, Hasher};
use core::ptr::NonNull;

use hashbrown::HashMap;

use super::addr_table::AddrTable;
use super::free_index::{Block, Cold, FreeIndex, Records, Recs, NIL};
use super::{BlockInfo, LiveAllocation};
use crate::error::{Error, Result};

/// Hashes addresses with murmur3's 64-bit finaliser, so that both the low bits (hashbrown's
/// bucket) and the high bits (its tag) depend on every address bit, although addresses are aligned.
#[derive(Default)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = self.0.rotate_left(32) ^ x;
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

/// A map keyed by address (for the trace recorder; the arena uses an [`AddrTable`]).
pub(crate) type AddrMap<V> = HashMap<usize, V, BuildHasherDefault<AddrHasher>>;

/// How many free blocks [`BlockArena::allocate_aligned_in_smaller`] tries.
const ALIGNED_SEARCH: usize = 64;

/// The block table's scratch slot (see [`BlockArena`]).
const SCRATCH: u32 = 0;

/// A neighbour link with `NIL` (no neighbour) mapped to the scratch record, which takes the
/// writes meant for a missing neighbour.
#[inline(always)]
fn or_scratch(slot: u32) -> u32 {
    if slot == NIL {
        SCRATCH
    } else {
        slot
    }
}

/// `value` if `cond` holds, else 0, without a branch.
///
/// LLVM turns the plain forms (`if`, or an and with a mask made from the flag) into a branch when
/// it guesses that one is cheaper. For a flag that is a coin toss to the predictor and known
/// late (after the loads of a free or an allocation), a mispredicted branch costs far more than
/// the and. The mask goes through an empty `asm!` statement, so LLVM cannot see that it is 0 or
/// all ones, and keeps the and.
#[inline(always)]
fn keep_if(cond: bool, value: usize) -> usize {
    #[allow(unused_mut)]
    let mut mask = usize::from(cond).wrapping_neg();
    #[cfg(all(
        not(miri),
        any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64", target_arch = "arm")
    ))]
    // SAFETY: the template is empty: nothing runs, and only the register holding `mask` is named.
    unsafe {
        core::arch::asm!("/* {0} */", inout(reg) mask, options(pure, nomem, nostack, preserves_flags));
    }
    value & mask
}

/// The error for bookkeeping (records, tables) that the host allocator could not give: `bytes`
/// is what the arena asked for.
#[cold]
fn host_out_of_memory(bytes: usize) -> Error {
    Error::OutOfMemory { requested: bytes as u64, available: 0 }
}

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
#[inline]
pub(crate) fn round_up(value: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// The distance from `addr` up to the next multiple of `align` (a power of two): no overflow,
/// unlike rounding the address up.
#[inline(always)]
pub(crate) fn padding(addr: usize, align: usize) -> usize {
    addr.wrapping_neg() & (align - 1)
}

struct Chunk {
    base: NonNull<u8>,
    size: usize,
    /// The alignment the chunk was obtained with, to hand it back the same way.
    align: usize,
    /// The block at the chunk's start; it is never merged into another, so it stays put.
    first: u32,
}

/// A request [`BlockArena::fit`] checked: the size and alignment asked for, the size rounded up
/// to the granule, and the bytes a free block must have to serve it (the rounded size plus the
/// worst-case padding for an alignment above the granule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fit {
    pub size: usize,
    pub align: usize,
    pub rounded: usize,
    pub footprint: usize,
}

/// The error [`check_layout`](crate::check_layout) gives for a request it refuses.
#[cold]
#[inline(never)]
fn layout_error(size: usize, align: usize) -> Error {
    match crate::check_layout(size, align) {
        Err(e) => e,
        Ok(()) => Error::InvalidSize { size: size as u64, reason: "size too large" },
    }
}

/// What [`BlockArena::free`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Freed {
    /// The size the allocation was asked with.
    pub requested: usize,
    /// Whether the free left its chunk wholly free.
    pub releasable: bool,
}

/// A chunk that [`BlockArena::take_free_chunk`] removed.
pub(crate) struct FreedChunk {
    pub base: NonNull<u8>,
    pub size: usize,
    pub align: usize,
}

/// The arena's counters, kept up to date by every operation.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct ArenaCounters {
    /// Bytes in all chunks.
    pub actual_size: usize,
    pub chunks: usize,
    /// Bytes in used blocks: requests rounded up to the granule (the padding an over-aligned
    /// request needs is split off before its block, as a free block).
    pub current_size: usize,
    /// Bytes asked for by live allocations.
    pub requested_size: usize,
    /// Allocations made since creation (also the next sequence number).
    pub total_allocations: u64,
    /// Free blocks that span a whole chunk, and their bytes.
    pub releasable_blocks: usize,
    pub releasable_bytes: usize,
}

/// The records not in use, linked through their `next`.
struct Spares {
    /// The first (`NIL`: none).
    head: u32,
    len: usize,
}

impl Spares {
    /// Takes a spare record; the caller has made sure there is one.
    #[inline(always)]
    fn pop(&mut self, blocks: &mut Recs<'_>) -> u32 {
        debug_assert!(self.head != NIL && self.len > 0);
        let slot = self.head;
        self.head = blocks[slot].next;
        self.len -= 1;
        slot
    }

    #[inline(always)]
    fn push(&mut self, blocks: &mut Recs<'_>, slot: u32) {
        let b = &mut blocks[slot];
        b.set_used(false);
        b.prev = NIL;
        b.next = self.head;
        self.head = slot;
        self.len += 1;
    }
}

/// Chunks carved into blocks. See the [module docs](self).
///
/// The hot paths ([`allocate_fit`](Self::allocate_fit), [`free`](Self::free)) work on a
/// [`Recs`] view of the block table and on the boxed index through one pointer each, so that
/// neither is looked up again after every store to a record.
pub(crate) struct BlockArena {
    /// Slot `SCRATCH` is no block: writes meant for a missing neighbour land there, so that
    /// splits and merges need no branch on whether the neighbour exists.
    blocks: Records,
    spares: Spares,
    chunks: Vec<Option<Chunk>>,
    spare_chunks: Vec<u32>,
    free: Box<FreeIndex>,
    used: AddrTable,
    granule: usize,
    counters: ArenaCounters,
}

impl BlockArena {
    /// An empty arena whose blocks are multiples of `granule` (a power of two) and start on
    /// `granule` boundaries; aborts, as `Box::new` does, when the host cannot give its index.
    pub(crate) fn new(granule: usize) -> Self {
        Self::try_new(granule)
            .unwrap_or_else(|_| alloc::alloc::handle_alloc_error(core::alloc::Layout::new::<FreeIndex>()))
    }

    /// [`new`](Self::new), or `OutOfMemory` when the host cannot give its bookkeeping (the free
    /// index is about 264 KiB).
    pub(crate) fn try_new(granule: usize) -> Result<Self> {
        debug_assert!(granule.is_power_of_two());
        let oom = || host_out_of_memory(core::mem::size_of::<FreeIndex>());
        Ok(BlockArena {
            blocks: Records::try_new().ok_or_else(oom)?,
            spares: Spares { head: NIL, len: 0 },
            chunks: Vec::new(),
            spare_chunks: Vec::new(),
            free: FreeIndex::try_new().ok_or_else(oom)?,
            used: AddrTable::try_new().ok_or_else(oom)?,
            granule,
            counters: ArenaCounters::default(),
        })
    }

    #[inline]
    pub(crate) fn counters(&self) -> &ArenaCounters {
        &self.counters
    }

    /// How many blocks there are, used and free (every record but the scratch one and the
    /// spares).
    #[inline]
    pub(crate) fn blocks(&self) -> usize {
        self.blocks.len() - 1 - self.spares.len
    }

    /// How many blocks are used: the live allocations.
    #[inline]
    pub(crate) fn live(&self) -> usize {
        self.used.len()
    }

    #[inline]
    pub(crate) fn free_blocks(&self) -> usize {
        self.blocks() - self.live()
    }

    #[inline]
    pub(crate) fn largest_free(&self) -> usize {
        self.free.largest(&self.blocks)
    }

    /// Checks a request once, on the hot path, and returns what the arena needs of it. A zero
    /// size, an alignment that is not a power of two and a size over `isize::MAX` are refused
    /// with [`check_layout`]'s error; unlike it, a size that passes `isize::MAX` only once
    /// rounded up to the alignment is taken (its rounded size and padding still cannot
    /// overflow). No free block is that large, and the callers refuse it where it could go
    /// further: a pool before going upstream, `BackendResource` before calling this.
    ///
    /// [`check_layout`]: crate::check_layout
    #[inline(always)]
    pub(crate) fn fit(&self, size: usize, align: usize) -> Result<Fit> {
        // `size - 1 >= isize::MAX` is `size == 0 || size > isize::MAX`.
        if !align.is_power_of_two() || size.wrapping_sub(1) >= isize::MAX as usize {
            return Err(layout_error(size, align));
        }
        // No overflow: `size` and `granule - 1` are at most `isize::MAX`, so `rounded` is at
        // most `isize::MAX + 1`, and the padding at most `isize::MAX + 1 - granule` (alignments
        // are powers of two).
        let rounded = (size + (self.granule - 1)) & !(self.granule - 1);
        let footprint = rounded + align.saturating_sub(self.granule);
        Ok(Fit { size, align, rounded, footprint })
    }

    /// Makes room for one more chunk, so that the next [`add_chunk`](Self::add_chunk) allocates
    /// nothing: for its entry, for its index among the spare chunks once it is handed back (so
    /// that `remove_chunk` allocates nothing either), and for `records` block records (its
    /// block's, and any a request served from it splits off). `OutOfMemory` when the host memory
    /// cannot be had. An owner that takes the chunk from upstream calls this first, so that a
    /// refusal costs no upstream call.
    pub(crate) fn reserve_chunk(&mut self, records: usize) -> Result<()> {
        let entries = self.chunks.len() + 1;
        let oom = |_| host_out_of_memory(entries * core::mem::size_of::<Option<Chunk>>());
        self.chunks.try_reserve(1).map_err(oom)?;
        self.spare_chunks.try_reserve(entries - self.spare_chunks.len()).map_err(oom)?;
        self.reserve_spares(records)
    }

    /// Adds `[base, base + size)` as one free block, and returns its slot (for
    /// [`allocate_in`](Self::allocate_in)). `base` is aligned to the granule and `size` is a
    /// non-zero multiple of it; `align` is what the chunk's owner needs to hand it back.
    /// `OutOfMemory` (the arena as it was, the chunk still the caller's) when the host memory
    /// for its bookkeeping cannot be had; `OutOfBounds` when the range runs to or past the top of
    /// the address space (its blocks' addresses would wrap, to a null pointer among them).
    pub(crate) fn add_chunk(&mut self, base: NonNull<u8>, size: usize, align: usize) -> Result<u32> {
        debug_assert!(base.as_ptr() as usize % self.granule == 0 && size % self.granule == 0 && size > 0);
        if (base.as_ptr() as usize).checked_add(size).is_none() {
            let (offset, len) = (base.as_ptr() as u64, size as u64);
            return Err(Error::OutOfBounds { offset, len, region_len: usize::MAX as u64 });
        }
        self.reserve_chunk(1)?;
        let chunk = match self.spare_chunks.pop() {
            Some(c) => c,
            None => {
                self.chunks.push(None);
                (self.chunks.len() - 1) as u32
            }
        };
        let blocks = &mut self.blocks.view();
        let block = self.spares.pop(blocks);
        // Pointers into the chunk are made from addresses (see `ptr_of`), with this provenance.
        blocks[block] = Block::new(base.as_ptr().expose_provenance(), size);
        self.free.insert(blocks, block);
        self.chunks[chunk as usize] = Some(Chunk { base, size, align, first: block });
        let c = &mut self.counters;
        c.actual_size += size;
        c.chunks += 1;
        c.releasable_blocks += 1;
        c.releasable_bytes += size;
        Ok(block)
    }

    /// Serves `size` bytes aligned to `align` from the best-fitting free block, or `None` when
    /// the request is invalid or no free block is large enough.
    #[cfg(test)]
    pub(crate) fn allocate(&mut self, size: usize, align: usize) -> Option<NonNull<u8>> {
        let fit = self.fit(size, align).ok()?;
        self.allocate_fit(fit).unwrap()
    }

    /// Serves a checked request from the best-fitting free block, or `Ok(None)` when no free
    /// block is large enough; `OutOfMemory` (the arena as it was) when the host memory for the
    /// bookkeeping cannot be had.
    #[inline(always)]
    pub(crate) fn allocate_fit(&mut self, fit: Fit) -> Result<Option<NonNull<u8>>> {
        self.allocate_from(fit, |free, blocks| free.take_best_fit(blocks, fit.footprint))
    }

    /// Serves a checked request from free block `slot` (the block of a chunk just added, which
    /// was taken at the request's alignment and so needs no room for padding, or one whose
    /// address leaves room for it), or `Ok(None)` when that block is not free or does not hold
    /// the request once aligned; `OutOfMemory` (the arena as it was) when the host memory for
    /// the bookkeeping cannot be had.
    #[inline(never)]
    pub(crate) fn allocate_in(&mut self, slot: u32, fit: Fit) -> Result<Option<NonNull<u8>>> {
        let Some(b) = self.blocks.get(slot).filter(|b| slot != SCRATCH && !b.used()) else {
            return Ok(None);
        };
        let pad = padding(b.addr, fit.align.max(self.granule));
        if pad.checked_add(fit.rounded).is_none_or(|needed| needed > b.size) {
            return Ok(None);
        }
        self.allocate_from(fit, |free, blocks| free.remove(blocks, slot).then_some(slot))
    }

    /// Serves a checked over-aligned request that [`allocate_fit`](Self::allocate_fit) missed
    /// from a free block smaller than its footprint whose address leaves room for the padding
    /// it needs, or `Ok(None)` when none is found; errors as `allocate_fit`'s.
    ///
    /// The index knows sizes, not addresses, so best fit asks for the worst-case padding; a block
    /// of the rounded size that happens to lie on a suitable boundary serves too. The blocks of
    /// at least the rounded size and below the footprint are tried in best-fit order, the first
    /// [`ALIGNED_SEARCH`] of them: a bounded search, off the common path (it runs only before
    /// the owner grows or reports out of memory, or trades a wholly free chunk away).
    #[inline(never)]
    pub(crate) fn allocate_aligned_in_smaller(&mut self, fit: Fit) -> Result<Option<NonNull<u8>>> {
        if fit.align <= self.granule {
            return Ok(None);
        }
        let (mut size, mut addr) = (fit.rounded, 0);
        for _ in 0..ALIGNED_SEARCH {
            let Some(slot) = self.free.next_above(&self.blocks, size, addr) else {
                break;
            };
            // A block of the footprint or more is best fit's to take, not this search's.
            if self.blocks[slot].size >= fit.footprint {
                break;
            }
            if let Some(ptr) = self.allocate_in(slot, fit)? {
                return Ok(Some(ptr));
            }
            (size, addr) = (self.blocks[slot].size, self.blocks[slot].addr);
        }
        Ok(None)
    }

    /// Serves a checked request from the free block that `take` takes out of the index, which
    /// holds the request once aligned: splits off the padding before it and the rest after it
    /// (both go back to the index) and marks it used. `Ok(None)` when `take` finds none.
    #[inline(always)]
    fn allocate_from(
        &mut self,
        fit: Fit,
        take: impl FnOnce(&mut FreeIndex, &mut Recs<'_>) -> Option<u32>,
    ) -> Result<Option<NonNull<u8>>> {
        let Fit { size, align, rounded, .. } = fit;
        // Room first for what the request may add (two split-off blocks, one address-table
        // entry), so that nothing below grows a table it holds borrowed.
        self.reserve_spares(2)?;
        self.used.reserve_one(&mut self.blocks).map_err(host_out_of_memory)?;
        let blocks = &mut self.blocks.view();
        let free = &mut *self.free;
        let Some(mut slot) = take(free, blocks) else {
            return Ok(None);
        };
        let b = &blocks[slot];
        let (addr, found) = (b.addr, b.size);
        // Without branches: whether a block spans its chunk is a coin toss to the predictor.
        let whole = (b.prev & b.next) == NIL;
        self.counters.releasable_blocks -= usize::from(whole);
        self.counters.releasable_bytes -= keep_if(whole, found);
        if align > self.granule {
            let pad = padding(addr, align);
            if pad > 0 {
                let rest = Self::split(blocks, &mut self.spares, slot, pad);
                free.insert(blocks, slot);
                slot = rest;
            }
        }
        if blocks[slot].size > rounded {
            let rest = Self::split(blocks, &mut self.spares, slot, rounded);
            free.insert(blocks, rest);
        }
        let seq = self.counters.total_allocations;
        let b = &mut blocks[slot];
        b.set_used(true);
        let ptr = Self::ptr_of(b);
        *blocks.cold_mut(slot) = Cold { requested: size, seq };
        self.used.insert(blocks, slot);
        let c = &mut self.counters;
        c.current_size += rounded;
        c.requested_size += size;
        c.total_allocations += 1;
        Ok(Some(ptr))
    }

    /// Frees the used block at `addr`, merging it with free neighbours. Returns the size it was
    /// allocated with, and whether its chunk is now wholly free.
    #[inline(always)]
    pub(crate) fn free(&mut self, addr: usize) -> Result<Freed> {
        let blocks = &mut self.blocks.view();
        let Some(mut slot) = self.used.remove(blocks, addr) else {
            return Err(Error::InvalidFree { offset: addr as u64, reason: "not a live allocation of this pool" });
        };
        let free = &mut *self.free;
        let b = &mut blocks[slot];
        b.set_used(false);
        let (size, prev, next) = (b.size, b.prev, b.next);
        let requested = blocks.cold(slot).requested;
        let c = &mut self.counters;
        c.current_size -= size;
        c.requested_size -= requested;
        if next != NIL && !blocks[next].used() {
            free.remove(blocks, next);
            Self::absorb_next(blocks, &mut self.spares, slot);
        }
        if prev != NIL && !blocks[prev].used() {
            free.remove(blocks, prev);
            Self::absorb_next(blocks, &mut self.spares, prev);
            slot = prev;
        }
        free.insert(blocks, slot);
        let b = &blocks[slot];
        let releasable = (b.prev & b.next) == NIL;
        self.counters.releasable_blocks += usize::from(releasable);
        self.counters.releasable_bytes += keep_if(releasable, b.size);
        Ok(Freed { requested, releasable })
    }

    /// The best fit for `footprint` bytes when it is a chunk that is one free block: its block
    /// slot, address and size.
    #[inline]
    pub(crate) fn best_fit_if_whole_chunk(&self, footprint: usize) -> Option<(u32, usize, usize)> {
        let slot = self.free.best_fit(&self.blocks, footprint)?;
        self.spans_chunk(slot).then(|| (slot, self.blocks[slot].addr, self.blocks[slot].size))
    }

    /// Removes the chunk that block `slot` spans (one free block, as
    /// [`best_fit_if_whole_chunk`](Self::best_fit_if_whole_chunk) found it) and returns it.
    pub(crate) fn take_chunk_of(&mut self, slot: u32) -> Option<FreedChunk> {
        if !self.blocks.get(slot).is_some_and(|_| self.spans_chunk(slot)) {
            return None;
        }
        // The chunk whose first block it is (a wholly free chunk is its first block).
        let index = self.chunks.iter().position(|c| c.as_ref().is_some_and(|c| c.first == slot))?;
        self.remove_chunk(index)
    }

    /// Removes the first chunk at or after table entry `from` that is one free block, and returns
    /// its entry and the chunk, for the owner to hand back; `None` when no such chunk is left.
    /// An owner that hands several back calls it again from the entry after the one returned.
    /// It allocates nothing (the chunk's place among the spare entries was reserved when it was
    /// added), so a pool hands blocks back while the host is out of memory.
    pub(crate) fn take_free_chunk(&mut self, from: usize) -> Option<(usize, FreedChunk)> {
        if self.counters.releasable_blocks == 0 {
            return None;
        }
        let index = (from..self.chunks.len())
            .find(|&i| self.chunks[i].as_ref().is_some_and(|chunk| self.spans_chunk(chunk.first)))?;
        Some((index, self.remove_chunk(index)?))
    }

    /// Removes chunk `index`, which is one free block.
    fn remove_chunk(&mut self, index: usize) -> Option<FreedChunk> {
        let chunk = self.chunks.get_mut(index)?.take()?;
        self.spare_chunks.push(index as u32);
        let blocks = &mut self.blocks.view();
        self.free.remove(blocks, chunk.first);
        self.spares.push(blocks, chunk.first);
        let c = &mut self.counters;
        c.actual_size -= chunk.size;
        c.chunks -= 1;
        c.releasable_blocks -= 1;
        c.releasable_bytes -= chunk.size;
        Some(FreedChunk { base: chunk.base, size: chunk.size, align: chunk.align })
    }

    /// Removes every chunk, used or not, for the owner's `Drop` to hand back: the arena is left
    /// without chunks but with its blocks' records, fit only to be dropped. (It allocates
    /// nothing, so that a pool dropped while the host is out of memory does not abort.)
    pub(crate) fn drain_chunks_for_drop(&mut self) -> impl Iterator<Item = FreedChunk> + '_ {
        self.chunks.drain(..).flatten().map(|c| FreedChunk { base: c.base, size: c.size, align: c.align })
    }

    /// Every block, chunk by chunk in address order, each chunk's blocks in address order.
    pub(crate) fn for_each_block(&self, f: &mut dyn FnMut(BlockInfo)) {
        for (index, chunk) in self.chunks_by_address().into_iter().enumerate() {
            let chunk_addr = chunk.base.as_ptr() as usize;
            let mut slot = chunk.first;
            while slot != NIL {
                let b = &self.blocks[slot];
                f(BlockInfo {
                    chunk: index,
                    chunk_addr,
                    chunk_size: chunk.size,
                    offset: b.addr - chunk_addr,
                    size: b.size,
                    used: b.used(),
                });
                slot = b.next;
            }
        }
    }

    /// Every live allocation, by address.
    pub(crate) fn live_allocations(&self) -> Vec<LiveAllocation> {
        let chunks = self.chunks_by_address();
        let mut out: Vec<LiveAllocation> = self
            .used
            .slots(&self.blocks)
            .map(|slot| {
                let (b, cold) = (&self.blocks[slot], self.blocks.cold(slot));
                let chunk = chunks.partition_point(|c| c.base.as_ptr() as usize <= b.addr) - 1;
                LiveAllocation {
                    addr: b.addr,
                    size: cold.requested,
                    block_size: b.size,
                    sequence: cold.seq,
                    chunk,
                    offset: b.addr - chunks[chunk].base.as_ptr() as usize,
                }
            })
            .collect();
        out.sort_unstable_by_key(|a| a.addr);
        out
    }

    /// Walks every chunk and block and checks the arena's invariants; `structure` names the owner
    /// in the error.
    pub(crate) fn check(&self, structure: &'static str) -> Result<()> {
        let corrupt = |addr: usize, detail| Err(Error::Corrupt { structure, offset: addr as u64, detail });
        let mut seen = ArenaCounters { total_allocations: self.counters.total_allocations, ..Default::default() };
        let (mut free_seen, mut blocks_seen, mut live_seen) = (0, 0, 0);
        for chunk in self.chunks.iter().flatten() {
            let base = chunk.base.as_ptr() as usize;
            seen.chunks += 1;
            seen.actual_size += chunk.size;
            if base % self.granule != 0 || chunk.size % self.granule != 0 {
                return corrupt(base, "chunk not aligned to the granule");
            }
            let (mut slot, mut prev, mut expect) = (chunk.first, NIL, base);
            while slot != NIL {
                let Some(b) = self.blocks.get(slot).filter(|_| slot != SCRATCH) else {
                    return corrupt(expect, "block slot out of range");
                };
                if b.addr != expect || b.prev != prev {
                    return corrupt(b.addr, "block list does not tile its chunk");
                }
                if b.size == 0 || b.size % self.granule != 0 {
                    return corrupt(b.addr, "block size is zero or not a multiple of the granule");
                }
                blocks_seen += 1;
                if blocks_seen > self.blocks.len() {
                    return corrupt(b.addr, "block list runs in a cycle");
                }
                if b.used() {
                    if self.used.get(&self.blocks, b.addr) != Some(slot) {
                        return corrupt(b.addr, "used block missing from the address table");
                    }
                    let requested = self.blocks.cold(slot).requested;
                    if requested == 0 || requested > b.size {
                        return corrupt(b.addr, "used block smaller than its request");
                    }
                    live_seen += 1;
                    seen.current_size += b.size;
                    seen.requested_size += requested;
                } else {
                    if prev != NIL && !self.blocks[prev].used() {
                        return corrupt(b.addr, "two free neighbours left unmerged");
                    }
                    if self.free.get(&self.blocks, b.size, b.addr) != Some(slot) {
                        return corrupt(b.addr, "free block missing from the size index");
                    }
                    free_seen += 1;
                    if b.prev == NIL && b.next == NIL {
                        seen.releasable_blocks += 1;
                        seen.releasable_bytes += b.size;
                    }
                }
                expect = b.addr.checked_add(b.size).ok_or(Error::Corrupt {
                    structure,
                    offset: b.addr as u64,
                    detail: "block runs past the end of the address space",
                })?;
                prev = slot;
                slot = b.next;
            }
            if expect != base + chunk.size {
                return corrupt(base, "blocks do not add up to the chunk's size");
            }
        }
        if !self.free.consistent(&self.blocks, free_seen) {
            return corrupt(0, "size index holds blocks that are not free blocks of the arena");
        }
        let used = |s: u32| self.blocks.get(s).is_some_and(Block::used);
        if self.used.len() != live_seen || !self.used.consistent(&self.blocks, used) {
            return corrupt(0, "address table holds blocks that are not used blocks of the arena");
        }
        if seen != self.counters {
            return corrupt(0, "counters disagree with the blocks");
        }
        let (mut spares, mut spare) = (0, self.spares.head);
        while spare != NIL && spares <= self.blocks.len() {
            spares += 1;
            spare = self.blocks.get(spare).map_or(NIL, |b| b.next);
        }
        if spares != self.spares.len || self.blocks() != blocks_seen {
            return corrupt(0, "block table leaks slots");
        }
        Ok(())
    }

    fn chunks_by_address(&self) -> Vec<&Chunk> {
        let mut chunks: Vec<&Chunk> = self.chunks.iter().flatten().collect();
        chunks.sort_unstable_by_key(|c| c.base.as_ptr() as usize);
        chunks
    }

    #[inline]
    fn spans_chunk(&self, slot: u32) -> bool {
        let b = &self.blocks[slot];
        !b.used() && b.prev == NIL && b.next == NIL
    }

    #[inline]
    fn ptr_of(b: &Block) -> NonNull<u8> {
        // The chunk's provenance was exposed when it was added, so the address alone makes a
        // pointer that may reach the chunk's host memory; the pool itself never dereferences
        // it (device memory is not dereferenceable).
        let ptr = core::ptr::with_exposed_provenance_mut(b.addr);
        // SAFETY: the block lies in its chunk, `[base, base + size)`, which starts at a non-null
        // `base` and does not wrap around the address space (`add_chunk` refuses one that
        // would), so the address is not null.
        unsafe { NonNull::new_unchecked(ptr) }
    }

    /// Grows the block table until at least `n` spare records are on the list.
    #[inline(always)]
    fn reserve_spares(&mut self, n: usize) -> Result<()> {
        while self.spares.len < n {
            self.add_spares()?;
        }
        Ok(())
    }

    /// Doubles the block table and puts the new records on the spare list; `OutOfMemory` (the
    /// table as it was) when the host memory cannot be had.
    #[cold]
    #[inline(never)]
    fn add_spares(&mut self) -> Result<()> {
        let Some(first) = self.blocks.grow() else {
            let record = core::mem::size_of::<Block>() + core::mem::size_of::<Cold>();
            return Err(host_out_of_memory(self.blocks.len().saturating_mul(record)));
        };
        let end = self.blocks.len() as u32;
        let blocks = &mut self.blocks.view();
        for slot in (first..end).rev() {
            self.spares.push(blocks, slot);
        }
        Ok(())
    }

    /// Splits the block at `slot` after `at` bytes; the new block (returned) is free and
    /// not yet indexed. Takes a spare record, which the caller has made sure there is.
    #[inline(always)]
    fn split(blocks: &mut Recs<'_>, spares: &mut Spares, slot: u32, at: usize) -> u32 {
        let rest = spares.pop(blocks);
        let b = &mut blocks[slot];
        let (addr, size, next) = (b.addr, b.size, b.next);
        b.size = at;
        b.next = rest;
        let mut block = Block::new(addr + at, size - at);
        block.prev = slot;
        block.next = next;
        blocks[rest] = block;
        blocks[or_scratch(next)].prev = rest;
        rest
    }

    /// Merges the block after `slot` (already out of the index) into `slot`.
    #[inline(always)]
    fn absorb_next(blocks: &mut Recs<'_>, spares: &mut Spares, slot: u32) {
        let next = blocks[slot].next;
        let n = &blocks[next];
        let (size, after) = (n.size, n.next);
        blocks[or_scratch(after)].prev = slot;
        let b = &mut blocks[slot];
        b.size += size;
        b.next = after;
        spares.push(blocks, next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena_with_chunk(addr: usize, size: usize) -> BlockArena {
        let mut arena = BlockArena::new(16);
        arena.add_chunk(NonNull::new(addr as *mut u8).unwrap(), size, 16).unwrap();
        arena
    }

    #[test]
    fn split_and_merge_restore_one_block() {
        let mut arena = arena_with_chunk(0x10000, 4096);
        let a = arena.allocate(100, 16).unwrap().as_ptr() as usize;
        let b = arena.allocate(200, 16).unwrap().as_ptr() as usize;
        let c = arena.allocate(300, 16).unwrap().as_ptr() as usize;
        assert_eq!((a, b, c), (0x10000, 0x10070, 0x10140));
        arena.check("test").unwrap();
        assert_eq!(arena.counters().releasable_blocks, 0);
        arena.free(b).unwrap();
        arena.free(a).unwrap();
        assert_eq!(arena.free_blocks(), 2);
        arena.free(c).unwrap();
        arena.check("test").unwrap();
        assert_eq!(arena.free_blocks(), 1);
        assert_eq!(arena.counters().releasable_bytes, 4096);
        assert!(matches!(arena.free(c), Err(Error::InvalidFree { .. })));
    }

    #[test]
    fn fit_refuses_what_check_layout_refuses_and_rounds_the_rest() {
        let arena = BlockArena::new(16);
        for (size, align) in [(0, 16), (8, 0), (8, 24), (usize::MAX, 16), (isize::MAX as usize + 1, 1)] {
            assert_eq!(arena.fit(size, align).err(), crate::check_layout(size, align).err(), "({size}, {align})");
        }
        let top = 1usize << (usize::BITS - 1);
        let largest = arena.fit(isize::MAX as usize, top).unwrap();
        assert_eq!((largest.rounded, largest.footprint), (top, usize::MAX - 15));
        assert_eq!(arena.fit(100, 8).unwrap(), Fit { size: 100, align: 8, rounded: 112, footprint: 112 });
        assert_eq!(arena.fit(100, 256).unwrap(), Fit { size: 100, align: 256, rounded: 112, footprint: 352 });
    }

    #[test]
    fn over_aligned_requests_split_off_padding() {
        let mut arena = arena_with_chunk(0x10010, 8192 - 16);
        let p = arena.allocate(64, 4096).unwrap().as_ptr() as usize;
        assert_eq!(p, 0x11000);
        arena.check("test").unwrap();
        let mut blocks = Vec::new();
        arena.for_each_block(&mut |b| blocks.push((b.offset, b.size, b.used)));
        assert_eq!(blocks, [(0, 0xff0, false), (0xff0, 64, true), (0x1030, 8192 - 16 - 0x1030, false)]);
        assert_eq!(arena.counters().current_size, 64);
        arena.free(p).unwrap();
        arena.check("test").unwrap();
        assert!(arena.take_free_chunk(0).is_some_and(|(index, chunk)| index == 0 && chunk.size == 8192 - 16));
        assert!(arena.take_free_chunk(0).is_none());
        assert_eq!(arena.counters().actual_size, 0);
        arena.check("test").unwrap();
    }

    #[test]
    fn a_chunk_taken_at_the_alignment_serves_its_rounded_size_alone() {
        let mut arena = BlockArena::new(16);
        let fit = arena.fit(100, 4096).unwrap();
        // Less than the footprint, but aligned: no padding is needed.
        let aligned = arena.add_chunk(NonNull::new(0x10000 as *mut u8).unwrap(), fit.rounded, 4096).unwrap();
        // Not aligned: the padding does not fit, and the arena stays as it was.
        let unaligned = arena.add_chunk(NonNull::new(0x20010 as *mut u8).unwrap(), 4096, 16).unwrap();
        assert_eq!(arena.allocate_in(unaligned, fit).unwrap(), None);
        arena.check("test").unwrap();
        assert_eq!(arena.counters().releasable_blocks, 2);
        let p = arena.allocate_in(aligned, fit).unwrap().unwrap().as_ptr() as usize;
        assert_eq!(p, 0x10000);
        // A used block, or the scratch slot, serves nothing.
        assert_eq!(arena.allocate_in(aligned, fit).unwrap(), None);
        assert_eq!(arena.allocate_in(SCRATCH, fit).unwrap(), None);
        arena.check("test").unwrap();
        assert_eq!((arena.counters().current_size, arena.counters().releasable_blocks), (112, 1));
        arena.free(p).unwrap();
        arena.check("test").unwrap();
        assert_eq!(arena.counters().releasable_bytes, 112 + 4096);
    }

    #[test]
    fn a_chunk_that_wraps_the_address_space_is_refused() {
        let mut arena = BlockArena::new(16);
        let top = NonNull::new(core::ptr::without_provenance_mut(usize::MAX - 4095)).unwrap();
        for size in [4096, 8192] {
            assert!(matches!(arena.add_chunk(top, size, 16), Err(Error::OutOfBounds { .. })), "{size}");
        }
        arena.check("test").unwrap();
        assert_eq!(arena.counters(), &ArenaCounters::default());
        assert!(arena.add_chunk(top, 4080, 16).is_ok());
        arena.check("test").unwrap();
    }

    #[test]
    fn the_address_hash_spreads_aligned_addresses() {
        let hash = |x: usize| {
            let mut h = AddrHasher::default();
            h.write_usize(x);
            h.finish()
        };
        let low: alloc::collections::BTreeSet<u64> = (0..1024).map(|i| hash(i * 4096) & 1023).collect();
        assert!(low.len() > 500, "only {} distinct buckets", low.len());
    }
}
