//! [`BlockArena`]: the bookkeeping shared by [`QuickPool`](super::QuickPool) and
//! [`BackendResource`](super::BackendResource).
//!
//! An arena holds *chunks* (contiguous ranges handed to it, e.g. upstream blocks) and carves
//! them into *blocks*: best fit through a [`FreeIndex`], split on allocation, merged with free
//! neighbours on free. Each block is a record in a table outside the memory it describes, linked
//! to its address-order neighbours in the same chunk; used blocks are found by address through a
//! hash map. The arena never reads or writes the memory it manages, so it serves device memory
//! as well as host memory.

use alloc::vec::Vec;
use core::hash::{BuildHasherDefault, Hasher};
use core::ptr::NonNull;

use hashbrown::HashMap;

use super::free_index::FreeIndex;
use super::{BlockInfo, LiveAllocation};
use crate::error::{Error, Result};

const NIL: u32 = u32::MAX;

/// Hashes block addresses with murmur3's 64-bit finaliser, so that both the low bits (hashbrown's
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

/// A map keyed by address.
pub(crate) type AddrMap<V> = HashMap<usize, V, BuildHasherDefault<AddrHasher>>;

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn round_up(value: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    /// Address-order neighbours in the same chunk (`NIL` at either end).
    prev: u32,
    next: u32,
    chunk: u32,
    used: bool,
    /// For a used block: the size asked for, and the allocation's sequence number.
    requested: usize,
    seq: u64,
}

struct Chunk {
    base: NonNull<u8>,
    size: usize,
    /// The alignment the chunk was obtained with, to hand it back the same way.
    align: usize,
    /// The block at the chunk's start; it is never merged into another, so it stays put.
    first: u32,
}

/// A chunk that [`BlockArena::take_free_chunks`] removed.
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
    /// Bytes in used blocks (requests rounded up to the granule, plus alignment padding).
    pub current_size: usize,
    /// Bytes asked for by live allocations.
    pub requested_size: usize,
    pub live: usize,
    /// Allocations made since creation (also the next sequence number).
    pub total_allocations: u64,
    pub blocks: usize,
    /// Free blocks that span a whole chunk, and their bytes.
    pub releasable_blocks: usize,
    pub releasable_bytes: usize,
}

/// Chunks carved into blocks. See the [module docs](self).
pub(crate) struct BlockArena {
    blocks: Vec<Block>,
    spare_blocks: Vec<u32>,
    chunks: Vec<Option<Chunk>>,
    spare_chunks: Vec<u32>,
    free: FreeIndex,
    used: AddrMap<u32>,
    granule: usize,
    counters: ArenaCounters,
}

impl BlockArena {
    /// An empty arena whose blocks are multiples of `granule` (a power of two) and start on
    /// `granule` boundaries.
    pub(crate) fn new(granule: usize) -> Self {
        debug_assert!(granule.is_power_of_two());
        BlockArena {
            blocks: Vec::new(),
            spare_blocks: Vec::new(),
            chunks: Vec::new(),
            spare_chunks: Vec::new(),
            free: FreeIndex::new(),
            used: AddrMap::default(),
            granule,
            counters: ArenaCounters::default(),
        }
    }

    #[inline]
    pub(crate) fn counters(&self) -> &ArenaCounters {
        &self.counters
    }

    #[inline]
    pub(crate) fn free_blocks(&self) -> usize {
        self.free.len()
    }

    #[inline]
    pub(crate) fn largest_free(&self) -> usize {
        self.free.largest()
    }

    /// The bytes a free block must have to serve `(size, align)`: the size rounded up to the
    /// granule, plus the worst-case padding for an alignment above the granule.
    #[inline]
    pub(crate) fn footprint(&self, size: usize, align: usize) -> Result<usize> {
        let too_large = Error::InvalidSize { size: size as u64, reason: "size overflows when aligned" };
        let rounded = round_up(size, self.granule).ok_or(too_large)?;
        rounded.checked_add(align.saturating_sub(self.granule)).ok_or(too_large)
    }

    /// Adds `[base, base + size)` as one free block. `base` is aligned to the granule and `size`
    /// is a non-zero multiple of it; `align` is what the chunk's owner needs to hand it back.
    pub(crate) fn add_chunk(&mut self, base: NonNull<u8>, size: usize, align: usize) {
        debug_assert!(base.as_ptr() as usize % self.granule == 0 && size % self.granule == 0 && size > 0);
        let chunk = match self.spare_chunks.pop() {
            Some(c) => c,
            None => {
                self.chunks.push(None);
                (self.chunks.len() - 1) as u32
            }
        };
        let addr = base.as_ptr() as usize;
        let block =
            self.new_block(Block { addr, size, prev: NIL, next: NIL, chunk, used: false, requested: 0, seq: 0 });
        self.chunks[chunk as usize] = Some(Chunk { base, size, align, first: block });
        self.free.insert(size, addr, block);
        let c = &mut self.counters;
        c.actual_size += size;
        c.chunks += 1;
        c.releasable_blocks += 1;
        c.releasable_bytes += size;
    }

    /// Serves `size` bytes aligned to `align` from the best-fitting free block, or `None` when no
    /// free block is large enough. `footprint(size, align)` must have succeeded.
    #[inline]
    pub(crate) fn allocate(&mut self, size: usize, align: usize) -> Option<NonNull<u8>> {
        let rounded = round_up(size, self.granule)?;
        let found = self.free.best_fit(self.footprint(size, align).ok()?)?;
        self.free.remove(found.size, found.addr, found.slot);
        let mut slot = found.slot;
        if self.spans_chunk(slot) {
            self.counters.releasable_blocks -= 1;
            self.counters.releasable_bytes -= found.size;
        }
        let pad = round_up(found.addr, align)? - found.addr;
        if pad > 0 {
            let rest = self.split(slot, pad);
            self.free.insert(pad, found.addr, slot);
            slot = rest;
        }
        if self.blocks[slot as usize].size > rounded {
            let rest = self.split(slot, rounded);
            let b = self.blocks[rest as usize];
            self.free.insert(b.size, b.addr, rest);
        }
        let seq = self.counters.total_allocations;
        let b = &mut self.blocks[slot as usize];
        b.used = true;
        b.requested = size;
        b.seq = seq;
        let addr = b.addr;
        self.used.insert(addr, slot);
        let c = &mut self.counters;
        c.current_size += rounded;
        c.requested_size += size;
        c.live += 1;
        c.total_allocations += 1;
        Some(self.ptr_of(slot))
    }

    /// Frees the used block at `addr`, merging it with free neighbours. Returns the size it was
    /// allocated with.
    #[inline]
    pub(crate) fn free(&mut self, addr: usize) -> Result<usize> {
        let Some(mut slot) = self.used.remove(&addr) else {
            return Err(Error::InvalidFree { offset: addr as u64, reason: "not a live allocation of this pool" });
        };
        let b = &mut self.blocks[slot as usize];
        b.used = false;
        let (requested, size, prev, next) = (b.requested, b.size, b.prev, b.next);
        let c = &mut self.counters;
        c.current_size -= size;
        c.requested_size -= requested;
        c.live -= 1;
        if next != NIL && !self.blocks[next as usize].used {
            let n = self.blocks[next as usize];
            self.free.remove(n.size, n.addr, next);
            self.absorb_next(slot);
        }
        if prev != NIL && !self.blocks[prev as usize].used {
            let p = self.blocks[prev as usize];
            self.free.remove(p.size, p.addr, prev);
            self.absorb_next(prev);
            slot = prev;
        }
        let b = self.blocks[slot as usize];
        self.free.insert(b.size, b.addr, slot);
        if self.spans_chunk(slot) {
            self.counters.releasable_blocks += 1;
            self.counters.releasable_bytes += b.size;
        }
        Ok(requested)
    }

    /// Removes every chunk that is one free block and returns them, for the owner to hand back.
    pub(crate) fn take_free_chunks(&mut self) -> Vec<FreedChunk> {
        let mut out = Vec::new();
        if self.counters.releasable_blocks == 0 {
            return out;
        }
        for index in 0..self.chunks.len() {
            let Some(chunk) = &self.chunks[index] else {
                continue;
            };
            if !self.spans_chunk(chunk.first) {
                continue;
            }
            let (first, base, size, align) = (chunk.first, chunk.base, chunk.size, chunk.align);
            self.chunks[index] = None;
            self.spare_chunks.push(index as u32);
            self.free.remove(size, base.as_ptr() as usize, first);
            self.recycle(first);
            let c = &mut self.counters;
            c.actual_size -= size;
            c.chunks -= 1;
            c.releasable_blocks -= 1;
            c.releasable_bytes -= size;
            out.push(FreedChunk { base, size, align });
        }
        out
    }

    /// Removes every chunk, used or not, and returns them (for the owner's `Drop`).
    pub(crate) fn take_all_chunks(&mut self) -> Vec<FreedChunk> {
        let out = self.chunks.drain(..).flatten().map(|c| FreedChunk { base: c.base, size: c.size, align: c.align });
        let out = out.collect();
        *self = BlockArena::new(self.granule);
        out
    }

    /// Every block, chunk by chunk in address order, each chunk's blocks in address order.
    pub(crate) fn for_each_block(&self, f: &mut dyn FnMut(BlockInfo)) {
        for (index, chunk) in self.chunks_by_address().into_iter().enumerate() {
            let chunk_addr = chunk.base.as_ptr() as usize;
            let mut slot = chunk.first;
            while slot != NIL {
                let b = &self.blocks[slot as usize];
                f(BlockInfo {
                    chunk: index,
                    chunk_addr,
                    chunk_size: chunk.size,
                    offset: b.addr - chunk_addr,
                    size: b.size,
                    used: b.used,
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
            .values()
            .map(|&slot| {
                let b = &self.blocks[slot as usize];
                let chunk = chunks.partition_point(|c| c.base.as_ptr() as usize <= b.addr) - 1;
                LiveAllocation {
                    addr: b.addr,
                    size: b.requested,
                    block_size: b.size,
                    sequence: b.seq,
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
        let mut free_seen = 0;
        for (index, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            let base = chunk.base.as_ptr() as usize;
            seen.chunks += 1;
            seen.actual_size += chunk.size;
            if base % self.granule != 0 || chunk.size % self.granule != 0 {
                return corrupt(base, "chunk not aligned to the granule");
            }
            let (mut slot, mut prev, mut expect) = (chunk.first, NIL, base);
            while slot != NIL {
                let Some(b) = self.blocks.get(slot as usize) else {
                    return corrupt(expect, "block slot out of range");
                };
                if b.addr != expect || b.prev != prev || b.chunk as usize != index {
                    return corrupt(b.addr, "block list does not tile its chunk");
                }
                if b.size == 0 || b.size % self.granule != 0 {
                    return corrupt(b.addr, "block size is zero or not a multiple of the granule");
                }
                seen.blocks += 1;
                if b.used {
                    if self.used.get(&b.addr) != Some(&slot) {
                        return corrupt(b.addr, "used block missing from the address map");
                    }
                    if b.requested == 0 || b.requested > b.size {
                        return corrupt(b.addr, "used block smaller than its request");
                    }
                    seen.live += 1;
                    seen.current_size += b.size;
                    seen.requested_size += b.requested;
                } else {
                    if prev != NIL && !self.blocks[prev as usize].used {
                        return corrupt(b.addr, "two free neighbours left unmerged");
                    }
                    if self.free.get(b.size, b.addr) != Some(slot) {
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
        if free_seen != self.free.len() || !self.free.consistent() {
            return corrupt(0, "size index holds blocks that are not free blocks of the arena");
        }
        if self.used.len() != seen.live {
            return corrupt(0, "address map holds blocks that are not used blocks of the arena");
        }
        if seen != self.counters {
            return corrupt(0, "counters disagree with the blocks");
        }
        if self.blocks.len() - self.spare_blocks.len() != seen.blocks {
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
        let b = &self.blocks[slot as usize];
        !b.used && b.prev == NIL && b.next == NIL
    }

    #[inline]
    fn ptr_of(&self, slot: u32) -> NonNull<u8> {
        let b = &self.blocks[slot as usize];
        let chunk = self.chunks[b.chunk as usize].as_ref().expect("a block's chunk is live");
        let offset = b.addr - chunk.base.as_ptr() as usize;
        // The pointer is derived from the chunk's own pointer (so host memory keeps its
        // provenance) without claiming it is dereferenceable: device memory is not.
        let ptr = chunk.base.as_ptr().wrapping_add(offset);
        // SAFETY: `offset < chunk.size` and the chunk `[base, base + size)` does not wrap around
        // the address space, so `base + offset` is not null.
        unsafe { NonNull::new_unchecked(ptr) }
    }

    #[inline]
    fn new_block(&mut self, block: Block) -> u32 {
        self.counters.blocks += 1;
        match self.spare_blocks.pop() {
            Some(slot) => {
                self.blocks[slot as usize] = block;
                slot
            }
            None => {
                self.blocks.push(block);
                (self.blocks.len() - 1) as u32
            }
        }
    }

    #[inline]
    fn recycle(&mut self, slot: u32) {
        self.counters.blocks -= 1;
        self.spare_blocks.push(slot);
    }

    /// Splits the block at `slot` after `at` bytes; the new block (returned) is free and
    /// not yet indexed.
    #[inline]
    fn split(&mut self, slot: u32, at: usize) -> u32 {
        let b = self.blocks[slot as usize];
        let rest = self.new_block(Block {
            addr: b.addr + at,
            size: b.size - at,
            prev: slot,
            next: b.next,
            chunk: b.chunk,
            used: false,
            requested: 0,
            seq: 0,
        });
        if b.next != NIL {
            self.blocks[b.next as usize].prev = rest;
        }
        let b = &mut self.blocks[slot as usize];
        b.size = at;
        b.next = rest;
        rest
    }

    /// Merges the block after `slot` (already out of the index) into `slot`.
    #[inline]
    fn absorb_next(&mut self, slot: u32) {
        let next = self.blocks[slot as usize].next;
        let n = self.blocks[next as usize];
        if n.next != NIL {
            self.blocks[n.next as usize].prev = slot;
        }
        let b = &mut self.blocks[slot as usize];
        b.size += n.size;
        b.next = n.next;
        self.recycle(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena_with_chunk(addr: usize, size: usize) -> BlockArena {
        let mut arena = BlockArena::new(16);
        arena.add_chunk(NonNull::new(addr as *mut u8).unwrap(), size, 16);
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
    fn over_aligned_requests_split_off_padding() {
        let mut arena = arena_with_chunk(0x10010, 8192 - 16);
        let p = arena.allocate(64, 4096).unwrap().as_ptr() as usize;
        assert_eq!(p, 0x11000);
        arena.check("test").unwrap();
        let mut blocks = Vec::new();
        arena.for_each_block(&mut |b| blocks.push((b.offset, b.size, b.used)));
        assert_eq!(blocks, [(0, 0xff0, false), (0xff0, 64, true), (0x1030, 8192 - 16 - 0x1030, false)]);
        arena.free(p).unwrap();
        arena.check("test").unwrap();
        assert_eq!(arena.take_free_chunks().len(), 1);
        assert_eq!(arena.counters().actual_size, 0);
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
