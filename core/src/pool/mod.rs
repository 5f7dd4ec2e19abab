//! Pools: big blocks from an upstream [`MemoryResource`](crate::MemoryResource), served as many small allocations.
//!
//! - Upstream resources: [`HostResource`] (the system allocator), [`BackendResource`] (blocks
//!   carved from any [`MemoryBackend`](crate::MemoryBackend) region), [`LimitedResource`] (a byte
//!   budget and failure injection around another resource). Pinned and device resources come
//!   from `hetmem-gpu`.
//! - [`QuickPool`]: best fit in O(log n), split, merge with free neighbours, `coalesce`, `release`,
//!   a maximum size, and [`CoalesceHeuristic`]s ([`BlocksReleasable`], [`PercentReleasable`], their
//!   high-watermark variants, closures), which also let the pool hand wholly free upstream blocks
//!   back when it grows (once they make up a quarter of its size), so it does not hold many of
//!   them and the new block at once.
//! - [`FixedPool`]: objects of one size in sub-pools tracked by bitmaps.
//! - [`SyncPool`]: a lock around any [`Pool`], which makes it `Sync` and a
//!   [`MemoryResource`](crate::MemoryResource).
//! - [`PoolModel`]: the live allocations a test made, and the checks any pool must pass against
//!   them (for testing pools, resources and heuristics, host or device).
//! - [`render`]: the blocks as SVG or as a text map; [`trace`]: record and replay allocation traces.
//!
//! No pool ever reads or writes the memory it manages: all bookkeeping lives in ordinary heap
//! structures beside the blocks, so the same pools serve host, pinned and device memory.
//!
//! # Threads
//! [`QuickPool`] and [`FixedPool`] are `Send` but not `Sync`: every operation takes `&mut self`.
//! Share one between threads through [`SyncPool`]. [`HostResource`], [`BackendResource`] and
//! [`LimitedResource`] are `Sync`. A [`TracedPool`](trace::TracedPool) is `Sync` only if the pool
//! it records is, so it is not over either pool; wrap it in a [`SyncPool`] too.
//!
//! ```
//! use hetmem_core::pool::{FixedPool, HostResource, QuickPool, SyncPool};
//! fn shared<T: Send + Sync>() {}
//! shared::<SyncPool<QuickPool<HostResource>>>();
//! shared::<SyncPool<FixedPool<HostResource>>>();
//! ```
//!
//! ```compile_fail,E0277
//! fn shared<T: Sync>() {}
//! shared::<hetmem_core::pool::QuickPool<hetmem_core::pool::HostResource>>();
//! ```
//!
//! ```compile_fail,E0277
//! fn shared<T: Sync>() {}
//! shared::<hetmem_core::pool::FixedPool<hetmem_core::pool::HostResource>>();
//! ```

mod addr_table;
mod arena;
mod backend_resource;
mod fixed;
mod free_index;
mod heuristic;
mod host;
mod limited;
mod model;
mod quick;
pub mod render;
mod sync;
pub mod trace;

use alloc::vec::Vec;
use core::ptr::NonNull;

pub use backend_resource::{BackendResource, BACKEND_RESOURCE_TYPE_ID};
pub use fixed::{FixedPool, FixedPoolConfig};
pub use heuristic::{BlocksReleasable, CoalesceHeuristic, NeverCoalesce, PercentReleasable, Releasable};
pub use host::HostResource;
pub use limited::LimitedResource;
pub use model::{ModelAllocation, PoolModel};
pub use quick::{QuickPool, QuickPoolConfig};
pub use sync::SyncPool;

use crate::error::Result;
use crate::resource::MemoryKind;

/// A pool's figures at one moment (the vocabulary is Umpire's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes in live allocations as the pool hands them out (rounded up to its alignment).
    pub current_size: usize,
    /// Bytes asked for by live allocations.
    pub requested_size: usize,
    /// Bytes held from upstream.
    pub actual_size: usize,
    /// The most `current_size` has been.
    pub high_watermark: usize,
    /// The most `actual_size` has been.
    pub actual_high_watermark: usize,
    /// Live allocations.
    pub allocation_count: usize,
    /// Allocations made since creation.
    pub total_allocations: u64,
    /// Bytes in upstream blocks that are wholly free, which `release` would hand back.
    pub releasable_bytes: usize,
    /// How many upstream blocks are wholly free.
    pub releasable_blocks: usize,
    /// Blocks, used and free.
    pub total_blocks: usize,
    /// Free blocks.
    pub free_blocks: usize,
    /// The largest request (at the pool's alignment) that can be served without going upstream.
    pub largest_available: usize,
    /// Blocks held from upstream.
    pub upstream_blocks: usize,
    /// Blocks taken from upstream since creation.
    pub upstream_allocations: u64,
    /// Upstream requests that failed. A request the pool refuses because the host memory for
    /// its own bookkeeping cannot be had (`OutOfMemory` with nothing available) asks nothing of
    /// upstream, and counts neither here nor in `upstream_allocations`.
    pub upstream_failures: u64,
    /// Times the pool coalesced (by heuristic or by `coalesce`).
    pub coalesce_count: u64,
}

/// One block of a pool, as [`Pool::for_each_block`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Which upstream block it lies in (numbered by address).
    pub chunk: usize,
    /// The upstream block's address.
    pub chunk_addr: usize,
    /// The upstream block's size.
    pub chunk_size: usize,
    /// The block's offset in its upstream block.
    pub offset: usize,
    /// The block's size.
    pub size: usize,
    /// Whether it is allocated.
    pub used: bool,
}

/// One live allocation, for leak hunting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveAllocation {
    /// Its address.
    pub addr: usize,
    /// The size asked for.
    pub size: usize,
    /// The size of the block that serves it.
    pub block_size: usize,
    /// Its place in the order of all allocations made by the pool (0 is the first).
    pub sequence: u64,
    /// The upstream block it lies in (numbered by address, as in [`BlockInfo::chunk`]).
    pub chunk: usize,
    /// Its offset in that upstream block.
    pub offset: usize,
}

/// What every pool offers: allocation, statistics, a walk over its blocks, and a self-check.
///
/// Pools hand out `NonNull<u8>` addresses that they never dereference; whether the caller may
/// depends on the upstream resource ([`MemoryResource::host_accessible`](crate::MemoryResource)).
///
/// # Safety
/// A [`SyncPool`] over a pool is a [`MemoryResource`](crate::MemoryResource), whose blocks
/// thread caches write into, so an implementation keeps that trait's promises: a block
/// `allocate(size, align)` returns is `size` bytes aligned to `align`, overlaps no other block it
/// handed out and has not taken back, stays valid until it is given back or the pool is dropped,
/// lives where [`memory_kind`](Self::memory_kind) says, and is valid for reads and writes by the
/// CPU whenever [`host_accessible`](Self::host_accessible) says so.
pub unsafe trait Pool: Send {
    /// A short name for reports ("quick", "fixed").
    fn name(&self) -> &str;

    /// Where the pool's memory lives (its upstream's kind).
    fn memory_kind(&self) -> MemoryKind;

    /// Whether the CPU may dereference the pool's blocks: its upstream's
    /// [`host_accessible`](crate::MemoryResource::host_accessible), which a pool over a resource
    /// forwards (the memory's kind does not tell: a backend may map shared memory for a device
    /// alone). The default, for a pool that does not forward it, is the kind's answer: unless it
    /// is device memory.
    fn host_accessible(&self) -> bool {
        self.memory_kind() != MemoryKind::Device
    }

    /// `size` bytes aligned to `align` (a power of two). Zero sizes and bad alignments are
    /// errors; out of memory is `Error::OutOfMemory` (`Error::MaxSizeReached` at a configured
    /// maximum size: [`Error::is_out_of_memory`](crate::Error::is_out_of_memory) covers both),
    /// and the pool stays usable.
    fn allocate(&mut self, size: usize, align: usize) -> Result<NonNull<u8>>;

    /// Gives back an allocation. A pointer this pool did not hand out (or already took back) is
    /// refused with `Error::InvalidFree` and changes nothing.
    fn deallocate(&mut self, ptr: NonNull<u8>) -> Result<()>;

    /// Hands wholly free upstream blocks back upstream; returns the bytes handed back.
    fn release(&mut self) -> usize;

    /// The pool's figures.
    fn stats(&self) -> PoolStats;

    /// Calls `f` for every block, upstream block by upstream block in address order.
    fn for_each_block(&self, f: &mut dyn FnMut(BlockInfo));

    /// Every block, as [`for_each_block`](Self::for_each_block) walks them.
    fn blocks(&self) -> Vec<BlockInfo> {
        let mut out = Vec::new();
        self.for_each_block(&mut |b| out.push(b));
        out
    }

    /// Every live allocation, by address.
    fn live_allocations(&self) -> Vec<LiveAllocation>;

    /// Walks the pool's structures and verifies their invariants (`Error::Corrupt` if broken).
    fn check(&self) -> Result<()>;
}

#[cfg(test)]
mod tests;
