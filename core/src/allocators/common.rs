//! What the two span allocators share besides blocks: the first words of their headers, the
//! per-class statistics type, the dead-process policy, and a per-thread number for spreading
//! threads over shards and counter stripes.

use crate::error::{Error, Result};
use crate::ptr::AllocatorId;
use crate::region::Region;

use super::free_space::FreeSpaceLayout;
use super::size_class::CLASS_COUNT;
use super::span::LAYOUTS;

/// Layout version of the span allocators' headers.
const VERSION: u32 = 1;

/// The first bytes of a span allocator's header.
#[repr(C)]
pub(crate) struct CommonHeader {
    type_id: u32,
    version: u32,
    id: AllocatorId,
    /// Configuration bits.
    pub(crate) flags: u64,
    table: u64,
    arena: u64,
    units: u64,
}

/// Flag: blocks still live when their allocating process dies are freed by whoever reclaims.
pub(crate) const FLAG_FREE_DEAD: u64 = 1;

impl CommonHeader {
    pub(crate) fn new(type_id: u32, id: AllocatorId, flags: u64, fs: &FreeSpaceLayout) -> Self {
        CommonHeader { type_id, version: VERSION, id, flags, table: fs.table, arena: fs.arena, units: fs.units as u64 }
    }

    /// Checks type, version and id, and returns the free-space layout, validated against the
    /// region (`header_end`: where the allocator's own header ends).
    pub(crate) fn validate(
        &self,
        type_id: u32,
        id: AllocatorId,
        region: &Region,
        header_end: u64,
    ) -> Result<FreeSpaceLayout> {
        let mismatch = |field, expected: u64, found: u64| Error::HeaderMismatch { field, expected, found };
        if self.type_id != type_id {
            return Err(mismatch("allocator type", type_id as u64, self.type_id as u64));
        }
        if self.version != VERSION {
            return Err(mismatch("allocator version", VERSION as u64, self.version as u64));
        }
        if self.id != id {
            return Err(mismatch("allocator id", id.to_bits(), self.id.to_bits()));
        }
        let layout = FreeSpaceLayout {
            table: self.table,
            arena: self.arena,
            units: u32::try_from(self.units).map_err(|_| mismatch("units", 0, self.units))?,
        };
        layout.validate(region, header_end)?;
        Ok(layout)
    }
}

/// What happens to blocks a process still held when it died.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeadProcessBlocks {
    /// They stay allocated: another process may still use them (a block handed over through
    /// shared memory), and whoever holds one frees it as usual. Only the dead process's caches,
    /// empty spans and heaps are reclaimed.
    #[default]
    Keep,
    /// They are freed when the process is found dead. Right when processes never hand blocks
    /// to one another, or when a crashed worker's blocks die with it.
    Free,
}

impl DeadProcessBlocks {
    pub(crate) fn flags(self) -> u64 {
        match self {
            DeadProcessBlocks::Keep => 0,
            DeadProcessBlocks::Free => FLAG_FREE_DEAD,
        }
    }
}

/// One size class's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// The class's block size (user bytes).
    pub size: usize,
    /// Live blocks of this class.
    pub live_blocks: u64,
    /// Blocks of this class handed out since creation.
    pub allocations: u64,
}

/// Per-class figures from live counts and allocation counts.
pub(crate) fn class_stats(live: &[u64; CLASS_COUNT], allocs: &[u64; CLASS_COUNT]) -> alloc::vec::Vec<ClassStats> {
    (0..CLASS_COUNT)
        .map(|c| ClassStats { size: LAYOUTS[c].size as usize, live_blocks: live[c], allocations: allocs[c] })
        .collect()
}

/// Bytes live small blocks take, headers and rounding included.
pub(crate) fn small_reserved(live: &[u64; CLASS_COUNT]) -> u64 {
    live.iter().zip(LAYOUTS.iter()).map(|(n, l)| n.wrapping_mul(l.stride)).fold(0u64, u64::wrapping_add)
}

/// A small number for the calling thread, different for the threads of one process and spread
/// across processes: picks shards and counter stripes.
#[cfg(feature = "std")]
#[inline]
pub(crate) fn thread_number() -> usize {
    use core::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed)
            .wrapping_add((std::process::id() as usize).wrapping_mul(5));
    }
    NUMBER.with(|n| *n)
}

/// Without std there is no thread-local storage here: every caller shares number 0.
#[cfg(not(feature = "std"))]
#[inline]
pub(crate) fn thread_number() -> usize {
    0
}
