//! What the two span allocators share besides blocks: the first words of their headers, the
//! per-class statistics type and the dead-process policy.

use crate::error::{Error, Result};
use crate::ptr::AllocatorId;
use crate::region::Region;

use crate::allocator::AllocStats;

use super::free_space::{FreeSpace, FreeSpaceLayout, UNIT};
use super::large;
use super::size_class::CLASS_COUNT;
use super::span::LAYOUTS;

/// Layout version of the span allocators' headers.
const VERSION: u32 = 2;

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

/// Writes a fresh span allocator header: the `header_len` bytes at the region's start zeroed,
/// then a [`CommonHeader`] at their start; returns the free-space layout after the header.
///
/// # Safety
/// The allocator's header type starts with a `CommonHeader` (`#[repr(C)]`), is `header_len`
/// bytes, is valid as zeroes, and no one else sees the region yet.
pub(crate) unsafe fn write_header(
    region: &Region,
    header_len: u64,
    type_id: u32,
    id: AllocatorId,
    flags: u64,
) -> Result<FreeSpaceLayout> {
    let layout = FreeSpaceLayout::plan(region.offset() + header_len, region.end())?;
    let ptr = region.ptr(region.offset(), header_len)?;
    if ptr.align_offset(64) != 0 {
        return Err(Error::InvalidAlignment { align: 64 });
    }
    // SAFETY: in bounds (checked), not visible to anyone (the caller's promise; the directory
    // entry is published after `create` returns), and valid as zeroes.
    unsafe {
        core::ptr::write_bytes(ptr, 0, header_len as usize);
        ptr.cast::<CommonHeader>().write(CommonHeader::new(type_id, id, flags, &layout));
    }
    Ok(layout)
}

/// Reads back the header [`write_header`] wrote, checking it (see [`CommonHeader::validate`]).
pub(crate) fn read_header(region: &Region, header_len: u64, type_id: u32, id: AllocatorId) -> Result<FreeSpaceLayout> {
    let ptr = region.ptr(region.offset(), header_len)?.cast::<CommonHeader>();
    // As `write_header` requires: the region's offset may come from a corrupt directory entry.
    if ptr.align_offset(64) != 0 {
        return Err(Error::InvalidAlignment { align: 64 });
    }
    // SAFETY: in bounds and aligned (checked); plain integers, validated before use.
    let common = unsafe { &*ptr };
    common.validate(type_id, id, region, region.offset() + header_len)
}

/// Per class: live blocks and allocations, summed over every thread's record; and live bytes.
pub(crate) struct ClassCounts {
    pub(crate) live: [u64; CLASS_COUNT],
    pub(crate) allocations: [u64; CLASS_COUNT],
    pub(crate) bytes: u64,
}

impl ClassCounts {
    /// All zero.
    pub(crate) const fn new() -> Self {
        ClassCounts { live: [0; CLASS_COUNT], allocations: [0; CLASS_COUNT], bytes: 0 }
    }

    /// Adds one record's figures for `class`.
    pub(crate) fn add(&mut self, class: usize, live: u64, allocations: u64, bytes: u64) {
        self.live[class] = self.live[class].wrapping_add(live);
        self.allocations[class] = self.allocations[class].wrapping_add(allocations);
        self.bytes = self.bytes.wrapping_add(bytes);
    }

    /// A span allocator's statistics: these small-block figures and the free-space manager's
    /// (large blocks, metadata runs, high watermark).
    pub(crate) fn stats(&self, fs: &FreeSpace) -> AllocStats {
        let g = fs.lock();
        let live_count = self.live.iter().fold(g.st.large.live, |a, n| a.wrapping_add(*n));
        let total = self.allocations.iter().fold(g.st.large.allocations, |a, n| a.wrapping_add(*n));
        AllocStats {
            capacity: fs.layout().bytes(),
            bytes_in_use: self.bytes.wrapping_add(g.st.large.live_bytes),
            bytes_reserved: small_reserved(&self.live)
                .wrapping_add(g.st.large.live_units.wrapping_mul(UNIT))
                .wrapping_add(large::meta_bytes(&g)),
            high_watermark: g.peak_used_units().wrapping_mul(UNIT),
            live_allocations: live_count,
            total_allocations: total,
            total_frees: total.wrapping_sub(live_count),
        }
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

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;
    use crate::allocator::AllocatorType;
    use crate::allocators::ScalablePageAllocator;
    use crate::backend::BackendId;
    use crate::header::HEADER_SIZE;
    use crate::testing::HeapBackend;
    use alloc::sync::Arc;

    /// A span allocator over a region too small for its header and two units is refused with
    /// an error (its layout planner once looped for ever on it).
    #[test]
    fn creating_over_a_region_too_small_is_an_error_not_a_hang() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let results = [HEADER_SIZE + 64, 4096, 6 * 4096].map(|len| {
                let backend = Arc::new(HeapBackend::new(BackendId(1), 64 * 1024));
                // SAFETY: the test's own backend, whose range only the allocator created uses.
                let region = unsafe { Region::new(backend, HEADER_SIZE, len) }.unwrap();
                ScalablePageAllocator::create(region, AllocatorId::new(1, 0), &Default::default()).err()
            });
            let _ = tx.send(results);
        });
        let results = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("create never returned");
        for e in results {
            assert!(matches!(e, Some(Error::InvalidSize { .. })), "{e:?}");
        }
    }

    #[test]
    fn attaching_at_a_misaligned_offset_is_refused_before_the_header_is_read() {
        // `Region::new` takes any offset past the header (and a directory entry is read from
        // shared memory); the span headers start with 8-byte fields.
        let backend = Arc::new(HeapBackend::new(BackendId(1), 256 * 1024));
        // SAFETY: the test's own backend, whose range only the allocator attached uses.
        let region = unsafe { Region::new(backend, HEADER_SIZE + 4, 128 * 1024) }.unwrap();
        let attached = ScalablePageAllocator::attach(region, AllocatorId::new(1, 0));
        assert!(matches!(attached, Err(Error::InvalidAlignment { .. })), "{:?}", attached.err());
    }
}
