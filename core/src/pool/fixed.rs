//! [`FixedPool`]: objects of one size, in sub-pools tracked by bitmaps.
//!
//! Each sub-pool is one upstream block of `objects_per_block` slots. A bitmap per sub-pool (in
//! host memory, beside the block) marks used slots, so allocation is a scan for a zero bit from
//! the first word that may hold one, and a free is a bit flip in the sub-pool that served last
//! (or, failing that, one found by binary search: they are kept sorted by address). The slot of
//! an address comes from a shift when the slot size is a power of two, else from a multiply by a
//! precomputed reciprocal: no division on either path. Like every pool here, it never touches
//! the memory it serves.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use super::arena::round_up;
use super::{BlockInfo, LiveAllocation, Pool, PoolStats};
use crate::error::{Error, Result};
use crate::resource::{MemoryKind, MemoryResource};

/// How a [`FixedPool`] is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedPoolConfig {
    /// The largest request the pool serves; slots are this size rounded up to `alignment`.
    pub object_size: usize,
    /// Slots per upstream block (default 2048, as in Umpire).
    pub objects_per_block: usize,
    /// Alignment of every slot (a power of two, default 16); larger alignments are refused.
    pub alignment: usize,
    /// The most the pool may hold from upstream (`Error::MaxSizeReached` past it).
    pub max_size: Option<usize>,
}

impl FixedPoolConfig {
    /// Slots of `object_size` bytes with the other settings at their defaults.
    pub fn new(object_size: usize) -> Self {
        FixedPoolConfig { object_size, objects_per_block: 2048, alignment: 16, max_size: None }
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    requested: usize,
    seq: u64,
}

struct SubPool {
    base: NonNull<u8>,
    addr: usize,
    used_bits: Box<[u64]>,
    slots: Box<[Slot]>,
    used: usize,
    /// No word before this one has a zero bit.
    search_from: usize,
}

impl SubPool {
    /// Takes the first free slot below `cap`; the caller knows there is one. `None` (and nothing
    /// changed) if the bitmap has none: it was damaged.
    #[inline(always)]
    fn take(&mut self, cap: usize) -> Option<usize> {
        let mut word = self.search_from;
        let mut bits = *self.used_bits.get(word)?;
        while bits == u64::MAX {
            word += 1;
            bits = *self.used_bits.get(word)?;
        }
        let bit = bits.trailing_ones() as usize;
        if word * 64 + bit >= cap {
            return None;
        }
        self.used_bits[word] = bits | 1 << bit;
        self.used += 1;
        self.search_from = word;
        Some(word * 64 + bit)
    }
}

/// Division by the slot size without a divide instruction: a shift for a power of two, else
/// Lemire's multiply by `ceil(2^64 / stride)`, exact for offsets below 2^32; larger blocks
/// divide.
#[derive(Clone, Copy, Debug)]
enum SlotDivisor {
    Shift(u32),
    Reciprocal(u64),
    Divide,
}

impl SlotDivisor {
    fn new(stride: usize, block_bytes: usize) -> Self {
        if stride.is_power_of_two() {
            SlotDivisor::Shift(stride.trailing_zeros())
        } else if block_bytes as u64 <= 1 << 32 && stride as u64 <= u64::from(u32::MAX) {
            SlotDivisor::Reciprocal(u64::MAX / stride as u64 + 1)
        } else {
            SlotDivisor::Divide
        }
    }

    /// `offset / stride`, for `offset < block_bytes`.
    #[inline(always)]
    fn divide(self, offset: usize, stride: usize) -> usize {
        match self {
            SlotDivisor::Shift(shift) => offset >> shift,
            SlotDivisor::Reciprocal(m) => ((u128::from(m) * offset as u128) >> 64) as usize,
            SlotDivisor::Divide => offset / stride,
        }
    }
}

/// A pool of fixed-size slots over `R`: upstream blocks of `objects_per_block` slots, a bitmap
/// per block (kept in host memory) marking the used ones.
///
/// `Send` but not `Sync`; share it through a [`SyncPool`](super::SyncPool). Dropping the pool
/// hands every upstream block back, live allocations included.
pub struct FixedPool<R: MemoryResource> {
    upstream: R,
    config: FixedPoolConfig,
    stride: usize,
    block_bytes: usize,
    divisor: SlotDivisor,
    /// Sorted by address.
    pools: Vec<SubPool>,
    /// The sub-pool tried first.
    current: usize,
    empty_pools: usize,
    live: usize,
    requested_size: usize,
    total_allocations: u64,
    high_watermark: usize,
    actual_high_watermark: usize,
    upstream_allocations: u64,
    upstream_failures: u64,
}

// SAFETY: the only non-`Send` fields are `NonNull` addresses of upstream blocks the pool owns and
// never dereferences; `R` is `Send + Sync`.
unsafe impl<R: MemoryResource> Send for FixedPool<R> {}

impl<R: MemoryResource> FixedPool<R> {
    /// A pool of `config.object_size`-byte slots over `upstream`. `InvalidSize` for an object
    /// size, objects per block or maximum size that leaves no sub-pool possible (a maximum below
    /// one sub-pool's bytes); `InvalidAlignment` for an alignment that is not a power of two.
    pub fn new(upstream: R, config: FixedPoolConfig) -> Result<Self> {
        crate::check_layout(config.object_size, config.alignment)?;
        let stride = round_up(config.object_size, config.alignment)
            .ok_or(Error::InvalidSize { size: config.object_size as u64, reason: "object size overflows" })?;
        // A sub-pool no resource can give (past `isize::MAX` bytes) is refused here, not by
        // every allocation.
        let block_bytes = stride
            .checked_mul(config.objects_per_block)
            .filter(|&bytes| config.objects_per_block > 0 && crate::check_layout(bytes, config.alignment).is_ok())
            .ok_or(Error::InvalidSize {
                size: config.objects_per_block as u64,
                reason: "objects per block is zero or too many",
            })?;
        if let Some(max) = config.max_size.filter(|&max| max < block_bytes) {
            // Not one sub-pool would fit: every allocation would fail.
            return Err(Error::InvalidSize { size: max as u64, reason: "maximum size below one sub-pool's bytes" });
        }
        Ok(FixedPool {
            upstream,
            config,
            stride,
            block_bytes,
            divisor: SlotDivisor::new(stride, block_bytes),
            pools: Vec::new(),
            current: 0,
            empty_pools: 0,
            live: 0,
            requested_size: 0,
            total_allocations: 0,
            high_watermark: 0,
            actual_high_watermark: 0,
            upstream_allocations: 0,
            upstream_failures: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FixedPoolConfig {
        &self.config
    }

    /// The upstream resource.
    pub fn upstream(&self) -> &R {
        &self.upstream
    }

    /// A slot for `size` (1..=object size) bytes aligned to `align` (at most the pool's alignment).
    #[inline]
    pub fn allocate(&mut self, size: usize, align: usize) -> Result<NonNull<u8>> {
        crate::check_layout(size, align)?;
        if size > self.config.object_size {
            return Err(Error::InvalidSize { size: size as u64, reason: "larger than the fixed pool's object size" });
        }
        if align > self.config.alignment {
            return Err(Error::InvalidAlignment { align: align as u64 });
        }
        let index = match self.pools.get(self.current) {
            Some(p) if p.used < self.config.objects_per_block => self.current,
            _ => match self.pools.iter().position(|p| p.used < self.config.objects_per_block) {
                Some(i) => i,
                None => self.grow()?,
            },
        };
        self.current = index;
        let cap = self.config.objects_per_block;
        let pool = &mut self.pools[index];
        let slot = pool.take(cap).ok_or(Error::Corrupt {
            structure: "fixed pool",
            offset: pool.addr as u64,
            detail: "sub-pool count says free, bitmap says full",
        })?;
        // Counted once the slot is taken: a failed take changes no counter.
        if pool.used == 1 {
            self.empty_pools -= 1;
        }
        let seq = self.total_allocations;
        pool.slots[slot] = Slot { requested: size, seq };
        let offset = slot * self.stride;
        let ptr = pool.base.as_ptr().wrapping_add(offset);
        self.live += 1;
        self.requested_size += size;
        self.total_allocations += 1;
        self.high_watermark = self.high_watermark.max(self.live * self.stride);
        // SAFETY: `offset < block_bytes` and the block does not wrap the address space, so the
        // address derived from the non-null block base is not null.
        Ok(unsafe { NonNull::new_unchecked(ptr) })
    }

    /// Frees a slot (`Error::InvalidFree` for anything this pool did not hand out, or a slot
    /// already free).
    #[inline]
    pub fn deallocate(&mut self, ptr: NonNull<u8>) -> Result<()> {
        let addr = ptr.as_ptr() as usize;
        let invalid = |reason| Error::InvalidFree { offset: addr as u64, reason };
        // Frees mostly go to the sub-pool that served last.
        let index = match self.pools.get(self.current) {
            Some(p) if addr.wrapping_sub(p.addr) < self.block_bytes => self.current,
            _ => self.pools.partition_point(|p| p.addr <= addr).checked_sub(1).ok_or(invalid("not in this pool"))?,
        };
        let pool = &mut self.pools[index];
        let offset = addr - pool.addr;
        let slot = self.divisor.divide(offset, self.stride);
        if offset >= self.block_bytes || slot * self.stride != offset {
            return Err(invalid("not the start of a slot of this pool"));
        }
        let (word, bit) = (slot / 64, slot % 64);
        if pool.used_bits[word] & (1 << bit) == 0 {
            return Err(invalid("slot is already free"));
        }
        pool.used_bits[word] &= !(1 << bit);
        pool.used -= 1;
        pool.search_from = pool.search_from.min(word);
        if pool.used == 0 {
            self.empty_pools += 1;
        }
        self.live -= 1;
        self.requested_size -= pool.slots[slot].requested;
        self.current = index;
        Ok(())
    }

    /// Hands every empty sub-pool back upstream; returns the bytes handed back.
    /// Allocates nothing, so it works while the host is out of memory.
    pub fn release(&mut self) -> usize {
        let before = self.pools.len();
        let (upstream, block_bytes, align) = (&self.upstream, self.block_bytes, self.config.alignment);
        self.pools.retain(|pool| {
            if pool.used == 0 {
                // SAFETY: the block came from `upstream.allocate(block_bytes, alignment)` and no
                // slot in it is in use.
                unsafe { upstream.deallocate(pool.base, block_bytes, align) };
            }
            pool.used != 0
        });
        self.empty_pools = 0;
        self.current = 0;
        (before - self.pools.len()) * self.block_bytes
    }

    /// The pool's figures. Blocks are slots here: `total_blocks` counts every slot.
    pub fn stats(&self) -> PoolStats {
        let slots = self.pools.len() * self.config.objects_per_block;
        PoolStats {
            current_size: self.live * self.stride,
            requested_size: self.requested_size,
            actual_size: self.pools.len() * self.block_bytes,
            high_watermark: self.high_watermark,
            actual_high_watermark: self.actual_high_watermark,
            allocation_count: self.live,
            total_allocations: self.total_allocations,
            releasable_bytes: self.empty_pools * self.block_bytes,
            releasable_blocks: self.empty_pools,
            total_blocks: slots,
            free_blocks: slots - self.live,
            largest_available: if slots > self.live { self.config.object_size } else { 0 },
            upstream_blocks: self.pools.len(),
            upstream_allocations: self.upstream_allocations,
            upstream_failures: self.upstream_failures,
            coalesce_count: 0,
        }
    }

    /// Checks every bitmap against the counters.
    pub fn check(&self) -> Result<()> {
        let cap = self.config.objects_per_block;
        let corrupt =
            |addr: usize, detail| Err(Error::Corrupt { structure: "fixed pool", offset: addr as u64, detail });
        let (mut live, mut requested, mut empty) = (0, 0, 0);
        for (i, pool) in self.pools.iter().enumerate() {
            if i > 0 && self.pools[i - 1].addr + self.block_bytes > pool.addr {
                return corrupt(pool.addr, "sub-pools out of order or overlapping");
            }
            // Bits past the last slot are kept set, so the scan never hands them out.
            let padding = pool.used_bits.len() * 64 - cap;
            if padding > 0 && pool.used_bits[pool.used_bits.len() - 1].leading_ones() < padding as u32 {
                return corrupt(pool.addr, "bits past the last slot are clear");
            }
            let used = pool.used_bits.iter().map(|w| w.count_ones() as usize).sum::<usize>() - padding;
            if used != pool.used {
                return corrupt(pool.addr, "bitmap disagrees with the sub-pool's count");
            }
            if pool.used_bits[..pool.search_from].iter().any(|&w| w != u64::MAX) {
                return corrupt(pool.addr, "a free slot lies before the search start");
            }
            for slot in 0..cap {
                if pool.used_bits[slot / 64] >> (slot % 64) & 1 == 0 {
                    continue;
                }
                let r = pool.slots[slot].requested;
                if r == 0 || r > self.config.object_size {
                    return corrupt(pool.addr + slot * self.stride, "used slot with a bad size");
                }
                requested += r;
            }
            live += used;
            empty += usize::from(used == 0);
        }
        if (live, requested, empty) != (self.live, self.requested_size, self.empty_pools) {
            return corrupt(0, "counters disagree with the bitmaps");
        }
        if self.config.max_size.is_some_and(|max| self.pools.len() * self.block_bytes > max) {
            return corrupt(0, "pool exceeds its maximum size");
        }
        Ok(())
    }

    /// Takes a new sub-pool from upstream and returns its index. The sub-pool's bookkeeping (its
    /// bitmap, its slot records, its place in the table) is allocated first, fallibly: a pool
    /// whose host memory runs out reports `OutOfMemory` and stays usable.
    fn grow(&mut self) -> Result<usize> {
        let actual = self.pools.len().saturating_mul(self.block_bytes);
        if let Some(max) = self.config.max_size {
            if actual.saturating_add(self.block_bytes) > max {
                return Err(Error::MaxSizeReached {
                    requested: self.block_bytes as u64,
                    max_size: max as u64,
                    held: actual as u64,
                });
            }
        }
        let objects = self.config.objects_per_block;
        let words = objects.div_ceil(64);
        let host_oom = |bytes: usize| Error::OutOfMemory { requested: bytes as u64, available: 0 };
        let mut used_bits = boxed_slice(0u64, words).ok_or_else(|| host_oom(words.saturating_mul(8)))?;
        let slots = boxed_slice(Slot::default(), objects)
            .ok_or_else(|| host_oom(objects.saturating_mul(core::mem::size_of::<Slot>())))?;
        self.pools.try_reserve(1).map_err(|_| host_oom(core::mem::size_of::<SubPool>()))?;
        let align = self.config.alignment;
        let base = match self.upstream.allocate(self.block_bytes, align) {
            Ok(base) => base,
            Err(_) => {
                self.upstream_failures += 1;
                self.release();
                self.upstream.allocate(self.block_bytes, align).inspect_err(|_| self.upstream_failures += 1)?
            }
        };
        self.upstream_allocations += 1;
        // Bits past the last slot read as used, so the scan never hands them out.
        let tail = objects % 64;
        if tail != 0 {
            used_bits[words - 1] = !0u64 << tail;
        }
        let addr = base.as_ptr() as usize;
        let pool = SubPool { base, addr, used_bits, slots, used: 0, search_from: 0 };
        let index = self.pools.partition_point(|p| p.addr < addr);
        self.pools.insert(index, pool);
        self.empty_pools += 1;
        self.actual_high_watermark = self.actual_high_watermark.max(self.pools.len() * self.block_bytes);
        Ok(index)
    }
}

/// `len` copies of `value` in a boxed slice, or `None` when the allocator cannot give the memory
/// (or the size overflows).
fn boxed_slice<T: Clone>(value: T, len: usize) -> Option<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, value);
    Some(v.into_boxed_slice())
}

impl<R: MemoryResource> Drop for FixedPool<R> {
    fn drop(&mut self) {
        for pool in self.pools.drain(..) {
            // SAFETY: every block came from `upstream.allocate(block_bytes, alignment)`; the pool
            // is going away, and its contract says its allocations go with it.
            unsafe { self.upstream.deallocate(pool.base, self.block_bytes, self.config.alignment) };
        }
    }
}

// SAFETY: each block is a slot of a sub-pool carved from a block of `R` (which keeps the
// promises), claimed in the sub-pool's bitmap until it is given back.
unsafe impl<R: MemoryResource> Pool for FixedPool<R> {
    fn name(&self) -> &str {
        "fixed"
    }

    fn memory_kind(&self) -> MemoryKind {
        self.upstream.kind()
    }

    fn host_accessible(&self) -> bool {
        self.upstream.host_accessible()
    }

    fn allocate(&mut self, size: usize, align: usize) -> Result<NonNull<u8>> {
        FixedPool::allocate(self, size, align)
    }

    fn deallocate(&mut self, ptr: NonNull<u8>) -> Result<()> {
        FixedPool::deallocate(self, ptr)
    }

    fn release(&mut self) -> usize {
        FixedPool::release(self)
    }

    fn stats(&self) -> PoolStats {
        FixedPool::stats(self)
    }

    /// Neighbouring slots in the same state are reported as one block.
    fn for_each_block(&self, f: &mut dyn FnMut(BlockInfo)) {
        let cap = self.config.objects_per_block;
        for (chunk, pool) in self.pools.iter().enumerate() {
            let is_used = |slot: usize| pool.used_bits[slot / 64] >> (slot % 64) & 1 == 1;
            let mut start = 0;
            while start < cap {
                let used = is_used(start);
                let end = (start + 1..cap).find(|&s| is_used(s) != used).unwrap_or(cap);
                f(BlockInfo {
                    chunk,
                    chunk_addr: pool.addr,
                    chunk_size: self.block_bytes,
                    offset: start * self.stride,
                    size: (end - start) * self.stride,
                    used,
                });
                start = end;
            }
        }
    }

    fn live_allocations(&self) -> Vec<LiveAllocation> {
        let mut out = Vec::with_capacity(self.live);
        for (chunk, pool) in self.pools.iter().enumerate() {
            for (slot, info) in pool.slots.iter().enumerate() {
                if pool.used_bits[slot / 64] >> (slot % 64) & 1 == 1 {
                    let offset = slot * self.stride;
                    out.push(LiveAllocation {
                        addr: pool.addr + offset,
                        size: info.requested,
                        block_size: self.stride,
                        sequence: info.seq,
                        chunk,
                        offset,
                    });
                }
            }
        }
        out
    }

    fn check(&self) -> Result<()> {
        FixedPool::check(self)
    }
}

/// The divisor's test uses 64-bit block sizes.
#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    use super::{FixedPool, FixedPoolConfig, SlotDivisor};
    use crate::error::Error;
    use crate::pool::HostResource;

    /// A failed allocation (here a bitmap that says full where the count says free) leaves the
    /// counters as they were: the empty sub-pool is still counted empty, nothing counted used.
    #[test]
    fn a_corrupt_bitmap_leaves_the_counters_alone() {
        let config = FixedPoolConfig { objects_per_block: 100, ..FixedPoolConfig::new(32) };
        let mut pool = FixedPool::new(HostResource, config).unwrap();
        let p = pool.allocate(32, 16).unwrap();
        pool.deallocate(p).unwrap();
        assert_eq!(pool.stats().releasable_blocks, 1);
        let saved = pool.pools[0].used_bits.clone();
        // Every slot reads used; then only a bit past the last slot reads free.
        for bits in [[u64::MAX; 2], [u64::MAX, !(1u64 << 40)]] {
            pool.pools[0].used_bits.copy_from_slice(&bits);
            assert!(matches!(pool.allocate(32, 16), Err(Error::Corrupt { .. })));
            assert_eq!(pool.stats().releasable_blocks, 1);
            assert_eq!(pool.stats().allocation_count, 0);
            assert_eq!(pool.pools[0].used, 0);
            assert_eq!(*pool.pools[0].used_bits, bits);
        }
        pool.pools[0].used_bits.copy_from_slice(&saved);
        pool.check().unwrap();
        let p = pool.allocate(32, 16).unwrap();
        assert_eq!(pool.stats().releasable_blocks, 0);
        pool.deallocate(p).unwrap();
        pool.check().unwrap();
    }

    #[test]
    fn slot_divisors_agree_with_division() {
        for stride in [16usize, 48, 112, 4000, 4096, 65_552, (1 << 20) + 16] {
            for block_bytes in [stride * 2048, 1 << 32, 1 << 33] {
                let divisor = SlotDivisor::new(stride, block_bytes);
                let cap = block_bytes.min(1 << 32);
                let offsets = (0..64).flat_map(|k| [k * stride, k * stride + 16, cap - 1 - k, cap / 3 + k]);
                for offset in offsets.filter(|&o| o < block_bytes) {
                    assert_eq!(divisor.divide(offset, stride), offset / stride, "{stride} {block_bytes} {offset}");
                }
            }
        }
        assert!(matches!(SlotDivisor::new(4096, 1 << 40), SlotDivisor::Shift(12)));
        assert!(matches!(SlotDivisor::new(48, 1 << 33), SlotDivisor::Divide));
    }
}
