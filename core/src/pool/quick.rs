//! [`QuickPool`]: a coalescing best-fit pool over any [`MemoryResource`].
//!
//! The pool takes blocks from its upstream resource (a first block, then next blocks, each at
//! least as large as the request that needs it) and serves allocations from them through a
//! [`BlockArena`]: best fit in O(log n), split, merge with free neighbours on free. Upstream
//! blocks are never merged with each other; an upstream block that is wholly free again is
//! *releasable*. `release` hands releasable blocks back; `coalesce` hands them back and takes one
//! block in their place, so the next large request fits. A [`CoalesceHeuristic`] decides after
//! a free whether to coalesce, and whether the pool hands releasable blocks back when it grows.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use super::arena::{padding, round_up, BlockArena, Fit};
use super::heuristic::{CoalesceHeuristic, PercentReleasable, Releasable};
use super::{BlockInfo, LiveAllocation, Pool, PoolStats};
use crate::error::{Error, Result};
use crate::resource::{MemoryKind, MemoryResource};

/// How a [`QuickPool`] grows. The defaults are Umpire's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuickPoolConfig {
    /// Size of the first block taken from upstream (default 512 MiB). A larger first request
    /// takes a block of its own size instead.
    pub first_block_size: usize,
    /// Size of each later block (default 1 MiB), or the request's size if that is larger.
    pub next_block_size: usize,
    /// Alignment of every allocation (a power of two, default 16); sizes round up to it.
    pub alignment: usize,
    /// The most the pool may hold from upstream; a request that would take it past this fails
    /// with `Error::MaxSizeReached`. `None`: no limit but the upstream's.
    pub max_size: Option<usize>,
}

impl Default for QuickPoolConfig {
    fn default() -> Self {
        QuickPoolConfig { first_block_size: 512 << 20, next_block_size: 1 << 20, alignment: 16, max_size: None }
    }
}

/// A coalescing best-fit pool over `R`: upstream blocks carved by best fit (O(log n)), split
/// on allocation, merged with free neighbours on free; wholly free upstream blocks are handed
/// back by `release`, or replaced by one block by `coalesce` when the heuristic says so.
///
/// The pool never dereferences the memory it hands out, so `R` may be device memory. It is `Send`
/// but not `Sync`; wrap it in a [`SyncPool`](super::SyncPool) to share it. Dropping the pool hands
/// every upstream block back, live allocations included.
pub struct QuickPool<R: MemoryResource> {
    upstream: R,
    config: QuickPoolConfig,
    heuristic: Box<dyn CoalesceHeuristic>,
    /// The heuristic's [`every_free`](CoalesceHeuristic::every_free).
    ask_every_free: bool,
    /// The heuristic's [`release_when_growing`](CoalesceHeuristic::release_when_growing).
    release_when_growing: bool,
    /// The heuristic's [`releasable_floor`](CoalesceHeuristic::releasable_floor) at the current
    /// actual size.
    floor: Releasable,
    arena: BlockArena,
    high_watermark: usize,
    actual_high_watermark: usize,
    upstream_allocations: u64,
    upstream_failures: u64,
    coalesce_count: u64,
}

// SAFETY: the only non-`Send` fields are the `NonNull` addresses of upstream blocks the pool
// owns; it never dereferences them, and `R` (like every `MemoryResource`) is `Send + Sync`.
unsafe impl<R: MemoryResource> Send for QuickPool<R> {}

impl<R: MemoryResource> QuickPool<R> {
    /// A pool over `upstream` with the default configuration and heuristic
    /// (`PercentReleasable(100)`). Nothing is taken from upstream until the first allocation.
    /// The pool's own index (about 264 KiB of host memory) is allocated here: if the host cannot
    /// give it, this aborts as `Box::new` does; [`with_config`](Self::with_config) returns
    /// `OutOfMemory` instead.
    pub fn new(upstream: R) -> Self {
        let config = QuickPoolConfig::default();
        QuickPool::build(upstream, config, BlockArena::new(config.alignment))
    }

    /// A pool over `upstream` with `config`, and the default heuristic. `InvalidAlignment` for
    /// an alignment that is not a power of two; `InvalidSize` for a block size that is zero or
    /// past `isize::MAX` bytes once aligned, or a maximum size below the alignment;
    /// `OutOfMemory` when the host cannot give the pool's index (about 264 KiB).
    pub fn with_config(upstream: R, config: QuickPoolConfig) -> Result<Self> {
        if !config.alignment.is_power_of_two() {
            return Err(Error::InvalidAlignment { align: config.alignment as u64 });
        }
        // A block no resource can give (zero, or past `isize::MAX` bytes once aligned) is refused
        // here, not by an upstream failure at every growth.
        for (size, what) in [
            (config.first_block_size, "first block size is zero or larger than any resource can give"),
            (config.next_block_size, "next block size is zero or larger than any resource can give"),
        ] {
            if crate::check_layout(size, config.alignment).is_err() {
                return Err(Error::InvalidSize { size: size as u64, reason: what });
            }
        }
        if config.max_size.is_some_and(|max| max < config.alignment) {
            return Err(Error::InvalidSize {
                size: config.max_size.unwrap_or(0) as u64,
                reason: "maximum size below the alignment",
            });
        }
        Ok(QuickPool::build(upstream, config, BlockArena::try_new(config.alignment)?))
    }

    fn build(upstream: R, config: QuickPoolConfig, arena: BlockArena) -> Self {
        let heuristic = PercentReleasable::default();
        QuickPool {
            upstream,
            config,
            ask_every_free: heuristic.every_free(),
            release_when_growing: heuristic.release_when_growing(),
            floor: heuristic.releasable_floor(0),
            heuristic: Box::new(heuristic),
            arena,
            high_watermark: 0,
            actual_high_watermark: 0,
            upstream_allocations: 0,
            upstream_failures: 0,
            coalesce_count: 0,
        }
    }

    /// The pool with `heuristic` in place of its current one.
    pub fn with_heuristic(mut self, heuristic: impl CoalesceHeuristic + 'static) -> Self {
        self.set_heuristic(heuristic);
        self
    }

    /// Replaces the coalescing heuristic.
    pub fn set_heuristic(&mut self, heuristic: impl CoalesceHeuristic + 'static) {
        self.ask_every_free = heuristic.every_free();
        self.release_when_growing = heuristic.release_when_growing();
        self.heuristic = Box::new(heuristic);
        self.refresh_floor();
    }

    /// Works the heuristic's releasable floor out again: after every change of the actual size.
    fn refresh_floor(&mut self) {
        self.ask_always();
        let actual_size = self.arena.counters().actual_size;
        // The pool's own actual size, whatever the heuristic echoes.
        self.floor = Releasable { actual_size, ..self.heuristic.releasable_floor(actual_size) };
    }

    /// Sets the floor that always asks (no bytes, no blocks) at the current actual size: before
    /// the pool calls code of others (the upstream, the heuristic's floor) while its actual size
    /// is changing, so that one that panics leaves a floor that is never wrong, only slower,
    /// until the next refresh.
    fn ask_always(&mut self) {
        self.floor = Releasable { bytes: 0, blocks: 0, actual_size: self.arena.counters().actual_size };
    }

    /// The configuration.
    pub fn config(&self) -> &QuickPoolConfig {
        &self.config
    }

    /// The upstream resource.
    pub fn upstream(&self) -> &R {
        &self.upstream
    }

    /// `size` bytes aligned to `align` (at least the pool's alignment is always given).
    ///
    /// Serves the request from the best-fitting free block (the smallest that holds it, the
    /// lowest address among equals). The free blocks are indexed by size alone, so for an
    /// alignment above the pool's that means one that holds the request with the most padding
    /// it could need; should there be none, the smallest free blocks of at least the request's
    /// size are tried for one whose address leaves room for the padding (a bounded search: the
    /// first 64 in best-fit order). Without one, takes a block from upstream. If upstream
    /// refuses, hands wholly free blocks back and asks once more for just what the request
    /// needs. Past the maximum size: `Error::MaxSizeReached`. A request that no resource could
    /// give once rounded to the pool's alignment and aligned (past `isize::MAX` bytes) is
    /// `Error::InvalidSize`, and changes nothing.
    ///
    /// Unless the heuristic says otherwise ([`CoalesceHeuristic::release_when_growing`]), the
    /// pool does not hold much memory it cannot use next to memory it takes. Before it grows, if
    /// its wholly free upstream blocks (all of them too small for this request) make up at least a
    /// quarter of its actual size, it hands them back until as many bytes went back as it is
    /// about to take (fewer are not worth the upstream calls: the pool keeps them). And a
    /// request of at least the next block size (its alignment padding not counted) whose best
    /// fit is a wholly free upstream block in which, placed at its aligned address, it leaves a
    /// rest of at least a quarter of the pool's actual size that could not serve a second such
    /// request, gets a block of its own size in that block's place (a second such request would
    /// have the pool hold both), unless it is over-aligned and a smaller free block at a suitable
    /// address serves it, as above.
    pub fn allocate(&mut self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let fit = self.arena.fit(size, align)?;
        // `footprint > actual / 4` is implied by the rest being at least that and too small for
        // a second such request (so below the footprint); it keeps the lookup off the common path.
        let actual = self.arena.counters().actual_size;
        if self.release_when_growing && fit.rounded >= self.config.next_block_size && fit.footprint > actual / 4 {
            if let Some(ptr) = self.trade_whole_block(fit) {
                self.high_watermark = self.high_watermark.max(self.arena.counters().current_size);
                return Ok(ptr);
            }
        }
        let ptr = match self.arena.allocate_fit(fit)? {
            Some(ptr) => ptr,
            None => self.allocate_on_miss(size, align)?,
        };
        self.high_watermark = self.high_watermark.max(self.arena.counters().current_size);
        Ok(ptr)
    }

    /// Frees an allocation (`Error::InvalidFree` for anything else), then asks the heuristic
    /// whether to coalesce: after every free, or, for a heuristic that says so
    /// ([`CoalesceHeuristic::every_free`], the built-in ones), after a free that leaves an
    /// upstream block wholly free. A failed coalesce leaves the pool smaller but consistent; the
    /// free itself has succeeded either way.
    pub fn deallocate(&mut self, ptr: NonNull<u8>) -> Result<()> {
        let freed = self.arena.free(ptr.as_ptr() as usize)?;
        let c = self.arena.counters();
        debug_assert_eq!(self.floor.actual_size, c.actual_size, "releasable floor not refreshed");
        // Whether a free leaves its upstream block wholly free is a coin toss to the predictor,
        // and known late: it is no branch of its own, but part of one that a busy pool seldom
        // takes.
        let may =
            freed.releasable & (c.releasable_bytes >= self.floor.bytes) & (c.releasable_blocks >= self.floor.blocks);
        if may | self.ask_every_free {
            self.ask_heuristic();
        }
        Ok(())
    }

    /// After a free: coalesces if the heuristic says so. Out of line: in a busy pool the
    /// built-in heuristics seldom get this far (see [`deallocate`](Self::deallocate)).
    #[inline(never)]
    fn ask_heuristic(&mut self) {
        if self.heuristic.may_coalesce(self.releasable()) {
            let stats = self.stats();
            if let Some(target) = self.heuristic.should_coalesce(&stats) {
                // The free is done; a refill the upstream refuses is counted in `upstream_failures`.
                let _ = self.coalesce_to(target);
            }
        }
    }

    /// Hands back every wholly free upstream block and takes one block that keeps the pool's
    /// actual size: many free blocks become one. Does nothing when fewer than two upstream
    /// blocks are free.
    pub fn coalesce(&mut self) -> Result<()> {
        self.coalesce_to(self.arena.counters().actual_size)
    }

    /// Hands back every wholly free upstream block and takes one block so that the pool's actual
    /// size becomes `target` (never less than what is still in use, never more than the maximum
    /// size). Does nothing when no upstream block is wholly free, or when one already is and has
    /// exactly the size the refill would take. The free blocks go back before the refill is
    /// taken, so that the pool never holds both: should upstream refuse the refill, its error is
    /// returned and the pool is left smaller (what is in use, and nothing free), but consistent.
    pub fn coalesce_to(&mut self, target: usize) -> Result<()> {
        let c = *self.arena.counters();
        if c.releasable_blocks == 0 {
            return Ok(());
        }
        let granule = self.config.alignment;
        let kept = c.actual_size - c.releasable_bytes;
        let mut refill = round_up(target.saturating_sub(kept), granule).unwrap_or(usize::MAX & !(granule - 1));
        if let Some(max) = self.config.max_size {
            refill = refill.min(max.saturating_sub(kept) & !(granule - 1));
        }
        if c.releasable_blocks == 1 && refill == c.releasable_bytes {
            return Ok(());
        }
        self.coalesce_count += 1;
        self.release();
        if refill > 0 {
            self.take_upstream(refill, granule)?;
        }
        Ok(())
    }

    /// Hands every wholly free upstream block back; returns the bytes handed back.
    pub fn release(&mut self) -> usize {
        self.release_up_to(usize::MAX)
    }

    /// Hands wholly free upstream blocks back until at least `wanted` bytes went back or none is
    /// left; returns the bytes handed back.
    /// One chunk at a time, gathered in no list: handing blocks back needs no host memory.
    fn release_up_to(&mut self, wanted: usize) -> usize {
        let (mut bytes, mut from) = (0usize, 0);
        while bytes < wanted {
            let Some((index, chunk)) = self.arena.take_free_chunk(from) else {
                break;
            };
            from = index + 1;
            bytes = bytes.saturating_add(chunk.size);
            self.ask_always();
            // SAFETY: the chunk came from `self.upstream.allocate(chunk.size, chunk.align)` and
            // the arena has just forgotten it, so no allocation points into it.
            unsafe { self.upstream.deallocate(chunk.base, chunk.size, chunk.align) };
        }
        if bytes > 0 {
            // After the upstream calls: a heuristic that panics here has the blocks handed back.
            self.refresh_floor();
        }
        bytes
    }

    /// The figures a free changes that a heuristic's cheap check reads.
    fn releasable(&self) -> Releasable {
        let c = self.arena.counters();
        Releasable { bytes: c.releasable_bytes, blocks: c.releasable_blocks, actual_size: c.actual_size }
    }

    /// The pool's figures.
    pub fn stats(&self) -> PoolStats {
        let c = self.arena.counters();
        PoolStats {
            current_size: c.current_size,
            requested_size: c.requested_size,
            actual_size: c.actual_size,
            high_watermark: self.high_watermark,
            actual_high_watermark: self.actual_high_watermark,
            allocation_count: self.arena.live(),
            total_allocations: c.total_allocations,
            releasable_bytes: c.releasable_bytes,
            releasable_blocks: c.releasable_blocks,
            total_blocks: self.arena.blocks(),
            free_blocks: self.arena.free_blocks(),
            largest_available: self.arena.largest_free(),
            upstream_blocks: c.chunks,
            upstream_allocations: self.upstream_allocations,
            upstream_failures: self.upstream_failures,
            coalesce_count: self.coalesce_count,
        }
    }

    /// Every live allocation, by address (for leak hunting: each carries its sequence number).
    pub fn live_allocations(&self) -> Vec<LiveAllocation> {
        self.arena.live_allocations()
    }

    /// Checks every block, the indexes and the counters.
    pub fn check(&self) -> Result<()> {
        self.arena.check("quick pool")?;
        let c = self.arena.counters();
        if self.high_watermark < c.current_size || self.actual_high_watermark < c.actual_size {
            return Err(Error::Corrupt { structure: "quick pool", offset: 0, detail: "a high watermark is too low" });
        }
        if self.config.max_size.is_some_and(|max| c.actual_size > max) {
            return Err(Error::Corrupt { structure: "quick pool", offset: 0, detail: "pool exceeds its maximum size" });
        }
        Ok(())
    }

    /// If the best fit for the request is a wholly free upstream block in which, placed at its
    /// aligned address, it leaves a rest that could not serve a second such request but is at
    /// least a quarter of the actual size, serves an over-aligned request from a smaller free
    /// block whose address leaves room for its padding if there is one; else hands the block
    /// back, takes a block of the request's rounded size at its alignment in its place (see
    /// [`allocate`](Self::allocate)), and serves the request from it. Should upstream refuse the
    /// new block, takes the old size back; should it refuse that too, the request goes on as a
    /// miss.
    #[inline(never)]
    fn trade_whole_block(&mut self, fit: Fit) -> Option<NonNull<u8>> {
        let (slot, addr, size) = self.arena.best_fit_if_whole_chunk(fit.footprint)?;
        // The padding before the request stays free, and is no part of what it fills: what
        // matters is the rest after it. (No overflow: the block holds the request with its
        // worst-case padding and does not wrap the address space; a padding is below the
        // alignment and the rounded size at most `isize::MAX + 1`, so the two add up.)
        let align = fit.align.max(self.config.alignment);
        let end = addr + padding(addr, align) + fit.rounded;
        let rest = addr + size - end;
        let second_fits = padding(end, align) + fit.rounded <= rest;
        if second_fits || rest < self.arena.counters().actual_size / 4 {
            return None;
        }
        // An over-aligned request may fit a smaller free block at a suitable address: served
        // there, it costs no upstream call, and the wholly free block stays for what it fits.
        // (A bookkeeping failure here is met again by the trade, or the miss.)
        if let Ok(Some(ptr)) = self.arena.allocate_aligned_in_smaller(fit) {
            return Some(ptr);
        }
        let chunk = self.arena.take_chunk_of(slot)?;
        self.ask_always();
        // SAFETY: the chunk came from `self.upstream.allocate(chunk.size, chunk.align)` and the
        // arena has just forgotten it; it was one free block, so no allocation points into it.
        unsafe { self.upstream.deallocate(chunk.base, chunk.size, chunk.align) };
        self.refresh_floor();
        // Taken at the request's alignment, the new block needs no room for padding.
        match self.take_upstream(fit.rounded, fit.align.max(self.config.alignment)) {
            // Should the bookkeeping fail, the request goes on as a miss, and meets it again.
            Ok(slot) => self.arena.allocate_in(slot, fit).ok().flatten(),
            Err(_) => {
                let _ = self.take_upstream(chunk.size, chunk.align);
                None
            }
        }
    }

    /// The slow path of [`allocate`](Self::allocate): no free block holds the request with its
    /// worst-case padding. An over-aligned request may still fit a smaller free block at a
    /// suitable address; else take a block upstream and serve the request from it.
    #[inline(never)]
    fn allocate_on_miss(&mut self, size: usize, align: usize) -> Result<NonNull<u8>> {
        // Checked again rather than passed in: the caller then keeps the request in registers.
        let fit = self.arena.fit(size, align)?;
        // `fit` takes any size up to `isize::MAX`; rounded to the granule and aligned, a request
        // may still be past what any resource can give. No free block holds it (none is that
        // large), and growing would hand free blocks back for nothing: it is refused here.
        if crate::check_layout(fit.rounded, fit.align.max(self.config.alignment)).is_err() {
            return Err(Error::InvalidSize { size: size as u64, reason: "size overflows when aligned" });
        }
        if let Some(ptr) = self.arena.allocate_aligned_in_smaller(fit)? {
            return Ok(ptr);
        }
        let slot = self.grow(fit.rounded, fit.align)?;
        self.arena.allocate_in(slot, fit)?.ok_or(Error::Corrupt {
            structure: "quick pool",
            offset: 0,
            detail: "a fresh upstream block did not serve the request",
        })
    }

    /// Takes a block from upstream for a request of `rounded` bytes (a multiple of the granule)
    /// at `align`, and returns its block's slot. The block is taken at the request's alignment,
    /// so `rounded` bytes of it serve the request: no room for padding is needed, and none is
    /// counted against the maximum size.
    fn grow(&mut self, rounded: usize, align: usize) -> Result<u32> {
        let granule = self.config.alignment;
        let first = self.upstream_allocations == 0;
        let wanted = if first { self.config.first_block_size } else { self.config.next_block_size };
        // Both are multiples of the granule; `rounded` is, by construction.
        let mut size = round_up(wanted, granule).unwrap_or(usize::MAX & !(granule - 1)).max(rounded);
        let c = self.arena.counters();
        if self.release_when_growing && c.releasable_bytes >= c.actual_size / 4 {
            // No free block holds the request, so none of these is of use to it; handing back as
            // many bytes as the pool is about to take keeps its size. A few such blocks in a
            // large pool are not worth the upstream calls.
            self.release_up_to(size);
        }
        if let Some(max) = self.config.max_size {
            let mut room = max.saturating_sub(self.arena.counters().actual_size) & !(granule - 1);
            if room < rounded {
                self.release();
                room = max.saturating_sub(self.arena.counters().actual_size) & !(granule - 1);
            }
            if room < rounded {
                let held = self.arena.counters().actual_size as u64;
                return Err(Error::MaxSizeReached { requested: rounded as u64, max_size: max as u64, held });
            }
            size = size.min(room);
        }
        let align = align.max(granule);
        match self.take_upstream(size, align) {
            Ok(slot) => Ok(slot),
            Err(_) => {
                self.release();
                self.take_upstream(rounded, align)
            }
        }
    }

    /// Takes a block of `size` bytes at `align` from upstream and returns its block's slot.
    /// The host memory for its bookkeeping (and for serving a request from it) is had first:
    /// should the host refuse it, upstream is not asked (a block taken only to be handed back is
    /// an upstream call for nothing, a device allocation perhaps), and the error counts in
    /// neither `upstream_allocations` nor `upstream_failures` (see [`PoolStats`]).
    fn take_upstream(&mut self, size: usize, align: usize) -> Result<u32> {
        // Its block's record, and the two a request served from it may split off.
        self.arena.reserve_chunk(3)?;
        match self.upstream.allocate(size, align) {
            Ok(base) => {
                let slot = match self.arena.add_chunk(base, size, align) {
                    Ok(slot) => slot,
                    Err(e) => {
                        // SAFETY: the block was just taken from upstream with this size and
                        // alignment, and nothing has seen it.
                        unsafe { self.upstream.deallocate(base, size, align) };
                        return Err(e);
                    }
                };
                self.upstream_allocations += 1;
                self.actual_high_watermark = self.actual_high_watermark.max(self.arena.counters().actual_size);
                // Last: a heuristic that panics here leaves the figures right (and the floor
                // that always asks).
                self.refresh_floor();
                Ok(slot)
            }
            Err(e) => {
                self.upstream_failures += 1;
                Err(e)
            }
        }
    }
}

impl<R: MemoryResource> Drop for QuickPool<R> {
    fn drop(&mut self) {
        for chunk in self.arena.drain_chunks_for_drop() {
            // SAFETY: every chunk came from `self.upstream.allocate(chunk.size, chunk.align)`;
            // the pool is going away, and its contract says its allocations go with it.
            unsafe { self.upstream.deallocate(chunk.base, chunk.size, chunk.align) };
        }
    }
}

// SAFETY: each block is carved from a block of `R` (which keeps the promises) by the arena, and
// handed out once until it comes back.
unsafe impl<R: MemoryResource> Pool for QuickPool<R> {
    fn name(&self) -> &str {
        "quick"
    }

    fn memory_kind(&self) -> MemoryKind {
        self.upstream.kind()
    }

    fn host_accessible(&self) -> bool {
        self.upstream.host_accessible()
    }

    fn allocate(&mut self, size: usize, align: usize) -> Result<NonNull<u8>> {
        QuickPool::allocate(self, size, align)
    }

    fn deallocate(&mut self, ptr: NonNull<u8>) -> Result<()> {
        QuickPool::deallocate(self, ptr)
    }

    fn release(&mut self) -> usize {
        QuickPool::release(self)
    }

    fn stats(&self) -> PoolStats {
        QuickPool::stats(self)
    }

    fn for_each_block(&self, f: &mut dyn FnMut(BlockInfo)) {
        self.arena.for_each_block(f)
    }

    fn live_allocations(&self) -> Vec<LiveAllocation> {
        QuickPool::live_allocations(self)
    }

    fn check(&self) -> Result<()> {
        QuickPool::check(self)
    }
}
