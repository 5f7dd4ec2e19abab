//! [`StackAllocator`]: bump allocation with LIFO free.
//!
//! ```text
//! region start   StackHeader (type, id, mutex-guarded top / last block / counters)
//! data start     [pad][BlockHeader][user bytes] [pad][BlockHeader][user bytes] ...  top -> free
//! ```
//!
//! Each block header records where the bump pointer was before the block (`start`) and the
//! previous block, so blocks form a list from the top down. Freeing the top block moves the bump
//! pointer back to its `start`, and keeps popping while the new top block was already freed; a
//! free lower down only marks the block, which is popped once everything above it is gone.
//!
//! A process that dies holding the lock is taken over by the next one to lock, which first
//! rebuilds the state from the block list ([`StackAllocator::repair`]): a block is handed out
//! only once `last` names it, and a free marks its block before the block leaves the list, so
//! the list alone says which blocks are live, whichever store the dead process stopped at.

use core::ptr::NonNull;
use core::sync::atomic::{compiler_fence, Ordering};

use crate::allocator::{AllocStats, AllocatorType, RegionAllocator};
use crate::allocators::{align_up, check_request, header_at};
use crate::crash;
use crate::error::{Error, Result};
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::Region;
use crate::sync::{Mutex, MutexGuard};

const TYPE_ID: u32 = 0x5354_4B31; // "STK1"
const BLOCK_HEADER: u64 = core::mem::size_of::<BlockHeader>() as u64;
const MIN_ALIGN: u64 = 16;
const TAG_LIVE: u64 = 0x4C49_5645_0000_0000;
const TAG_FREED: u64 = 0x4652_4545_0000_0000;

/// Options for [`StackAllocator`] (none yet).
#[derive(Clone, Debug, Default)]
pub struct StackConfig {}

#[repr(C)]
struct StackHeader {
    type_id: u32,
    _pad: u32,
    id: AllocatorId,
    state: Mutex<StackState>,
}

#[repr(C)]
struct StackState {
    data_start: u64,
    top: u64,
    last: OffsetPtr,
    bytes_in_use: u64,
    live: u64,
    total_allocations: u64,
    total_frees: u64,
    high_watermark: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct BlockHeader {
    /// The bump pointer before this block was allocated.
    start: u64,
    /// The previous block's user offset (null for the first).
    prev: OffsetPtr,
    /// The requested size.
    size: u64,
    /// `TAG_LIVE` or `TAG_FREED`, mixed with the block's own offset.
    tag: u64,
}

/// The block list as [`StackAllocator::walk`] found it.
struct Blocks {
    /// The highest live block (null: none) and where it ends (the data area's start if none).
    top_live: OffsetPtr,
    top_live_end: u64,
    /// Live blocks and their bytes.
    live: u64,
    in_use: u64,
}

/// A bump allocator whose state lives in its region.
///
/// Each block header records where the bump pointer was before the block and the previous
/// block. Freeing the top block moves the bump pointer back, and keeps popping blocks that were
/// already freed; a free lower down only marks its block, which is popped once everything above
/// it is gone. [`StackAllocator::reset`] frees everything at once.
pub struct StackAllocator {
    region: Region,
    id: AllocatorId,
    header: NonNull<StackHeader>,
}

// SAFETY: `header` points into the region, which `region` keeps mapped for the handle's life;
// the header is only mutated through its shm-safe mutex, so any thread may use the handle.
unsafe impl Send for StackAllocator {}
// SAFETY: as for Send.
unsafe impl Sync for StackAllocator {}

impl StackAllocator {
    fn new(region: Region, id: AllocatorId) -> Result<Self> {
        // SAFETY: callers made sure a StackHeader is (or is about to be, before any use) at the
        // region's start; it is only mutated through its mutex.
        let header = NonNull::from(unsafe { header_at::<StackHeader>(&region) }?);
        Ok(StackAllocator { region, id, header })
    }

    /// Takes the lock; one a dead process left is taken over, and the state repaired first.
    fn lock(&self) -> MutexGuard<'_, StackState> {
        // SAFETY: `header` was checked in bounds and aligned in `new`, and the region stays mapped.
        unsafe { self.header.as_ref() }.state.lock_or_recover(|s| self.repair(s))
    }

    /// Rebuilds the state from the block list, after its holder died between two of its stores
    /// (at any of the crash points below). The list says which blocks are live: a block joins
    /// it when `last` names it, after its header is written, and a freed block is marked before
    /// it leaves. So freed blocks on top are popped, `top` goes to the end of the highest live
    /// block (what lies above was never handed out: an allocation that wrote its header but
    /// did not link it, a free that did not finish popping, a resize of the top block either
    /// way), and the counters are counted again. A list broken beyond what a death leaves is
    /// left as it is, for the operations to report.
    fn repair(&self, s: &mut StackState) {
        if s.data_start < self.region.offset() || s.data_start > self.region.end() {
            return;
        }
        let Ok(blocks) = self.walk(s, self.region.end()) else { return };
        s.last = blocks.top_live;
        s.top = blocks.top_live_end;
        // The dead operation moved the live count but maybe not its total yet: an allocation
        // settles `total_allocations`, a free or a reset `total_frees`.
        let unsettled = blocks.live.wrapping_sub(s.total_allocations.wrapping_sub(s.total_frees)) as i64;
        if unsettled > 0 {
            s.total_allocations = s.total_allocations.wrapping_add(unsettled as u64);
        } else {
            s.total_frees = s.total_frees.wrapping_add(unsettled.unsigned_abs());
        }
        s.live = blocks.live;
        s.bytes_in_use = blocks.in_use;
        s.high_watermark = s.high_watermark.max(s.top - s.data_start);
    }

    /// Walks the block list from `last` down, checking each header read: every block is live
    /// or freed, lies below `limit` and below the start of the block above it, and the lowest
    /// starts the data area.
    fn walk(&self, s: &StackState, limit: u64) -> Result<Blocks> {
        let mut blocks = Blocks { top_live: OffsetPtr::NULL, top_live_end: s.data_start, live: 0, in_use: 0 };
        let mut above = limit;
        let mut next = s.last;
        while let Some(offset) = next.offset() {
            let (_, h) = self.block(s, offset, above).map_err(|_| corrupt(offset, "block outside the stack"))?;
            let is_live = h.tag == (TAG_LIVE ^ offset);
            if !is_live && h.tag != (TAG_FREED ^ offset) {
                return Err(corrupt(offset, "block tag is neither live nor freed"));
            }
            let end = offset.checked_add(h.size).filter(|&e| e <= above);
            let Some(end) = end.filter(|_| h.start <= offset - BLOCK_HEADER) else {
                return Err(corrupt(offset, "blocks overlap"));
            };
            if h.start < s.data_start {
                return Err(corrupt(offset, "block starts before the data area"));
            }
            if is_live {
                if blocks.live == 0 {
                    (blocks.top_live, blocks.top_live_end) = (next, end);
                }
                blocks.live += 1;
                blocks.in_use += h.size;
            }
            above = h.start;
            next = h.prev;
        }
        if s.last.offset().is_some() && above != s.data_start {
            return Err(corrupt(above, "lowest block does not start at the data area"));
        }
        Ok(blocks)
    }

    /// Takes the lock and checks the bump pointers, which another process may have written.
    fn lock_checked(&self) -> Result<MutexGuard<'_, StackState>> {
        let s = self.lock();
        self.check_bounds(&s)?;
        Ok(s)
    }

    /// `region start <= data_start <= top <= region end`.
    fn check_bounds(&self, s: &StackState) -> Result<()> {
        if s.data_start < self.region.offset() || s.data_start > s.top || s.top > self.region.end() {
            return Err(corrupt(s.top, "stack header points outside its region"));
        }
        Ok(())
    }

    fn capacity(&self, state: &StackState) -> u64 {
        self.region.end().saturating_sub(state.data_start)
    }

    /// Frees every block at once: the allocator is as it was after creation.
    ///
    /// Each block's header is marked freed on the way, so that a pointer from before the reset is
    /// refused, not taken for a live block once a new block covers its old header.
    pub fn reset(&self) {
        let mut s = self.lock();
        let mut next = s.last;
        while let Some(offset) = next.offset() {
            let Ok((hp, h)) = self.block(&s, offset, s.top) else { break };
            // SAFETY: `hp` is the header of a block on the stack (bounds checked by `block`),
            // written under the mutex.
            unsafe { (*hp).tag = TAG_FREED ^ offset };
            crash::point();
            // Blocks lie below one another; a link that does not go down is corrupt: stop there.
            next = if h.prev.offset().is_some_and(|prev| prev < offset) { h.prev } else { OffsetPtr::NULL };
        }
        // Every block is marked before the list empties.
        compiler_fence(Ordering::Release);
        s.top = s.data_start;
        crash::point();
        s.last = OffsetPtr::NULL;
        crash::point();
        s.total_frees = s.total_frees.wrapping_add(s.live);
        crash::point();
        s.bytes_in_use = 0;
        crash::point();
        s.live = 0;
    }

    /// Reads the header of the block whose user bytes start at `offset`, at most `limit`, after
    /// bounds checks.
    fn block(&self, state: &StackState, offset: u64, limit: u64) -> Result<(*mut BlockHeader, BlockHeader)> {
        if offset < state.data_start.saturating_add(BLOCK_HEADER) || offset > limit || offset % MIN_ALIGN != 0 {
            return Err(Error::InvalidFree { offset, reason: "not an offset this allocator gave out" });
        }
        let ptr = self.region.ptr(offset - BLOCK_HEADER, BLOCK_HEADER)?.cast::<BlockHeader>();
        // SAFETY: in bounds (checked by `ptr`), 16-aligned (offset and BLOCK_HEADER are multiples
        // of 16, the region's base is page-aligned), and read under the allocator's mutex.
        let header = unsafe { ptr.read() };
        Ok((ptr, header))
    }

    fn live_block(&self, state: &StackState, ptr: OffsetPtr) -> Result<(*mut BlockHeader, BlockHeader)> {
        let offset = ptr.offset().ok_or(Error::InvalidFree { offset: ptr.get(), reason: "null pointer" })?;
        let (hp, h) = self.block(state, offset, state.top)?;
        if h.tag == (TAG_FREED ^ offset) {
            return Err(Error::InvalidFree { offset, reason: "already freed" });
        }
        let sane = h.tag == (TAG_LIVE ^ offset)
            && h.start >= state.data_start
            && h.start <= offset - BLOCK_HEADER
            && offset.checked_add(h.size).is_some_and(|end| end <= state.top);
        if !sane {
            return Err(Error::InvalidFree { offset, reason: "not a live block of this allocator" });
        }
        Ok((hp, h))
    }

    /// Pops freed blocks off the top.
    fn pop_freed(&self, state: &mut StackState) -> Result<()> {
        while let Some(offset) = state.last.offset() {
            let (_, h) =
                self.block(state, offset, state.top).map_err(|_| corrupt(offset, "block list leaves the stack"))?;
            if h.tag != (TAG_FREED ^ offset) {
                break;
            }
            if h.start < state.data_start || h.start > offset - BLOCK_HEADER {
                return Err(corrupt(offset, "block starts outside the stack"));
            }
            state.top = h.start;
            crash::point();
            state.last = h.prev;
            crash::point();
        }
        Ok(())
    }
}

fn corrupt(offset: u64, detail: &'static str) -> Error {
    Error::Corrupt { structure: "stack allocator", offset, detail }
}

impl RegionAllocator for StackAllocator {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn type_name(&self) -> &'static str {
        "stack"
    }

    fn region(&self) -> &Region {
        &self.region
    }

    fn allocate(&self, size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(size, align)?;
        let mut s = self.lock_checked()?;
        self.allocate_locked(&mut s, size, align)
    }

    fn reallocate(&self, ptr: OffsetPtr, new_size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(new_size, align)?;
        let mut s = self.lock_checked()?;
        let (hp, h) = self.live_block(&s, ptr)?;
        let offset = ptr.get();
        let in_place = s.last == ptr
            && offset % align as u64 == 0
            && offset.checked_add(new_size as u64).is_some_and(|e| e <= self.region.end());
        if in_place {
            // SAFETY: `hp` is this live block's header (validated above), written under the mutex.
            unsafe { (*hp).size = new_size as u64 };
            crash::point();
            s.top = offset + new_size as u64;
            crash::point();
            s.bytes_in_use = s.bytes_in_use.wrapping_sub(h.size).wrapping_add(new_size as u64);
            crash::point();
            s.high_watermark = s.high_watermark.max(s.top - s.data_start);
            return Ok(ptr);
        }
        // The move happens under one hold of the lock: no free of `ptr` from elsewhere can come
        // between the new block and the old one's free, which would leave the new block to no
        // one.
        let len = h.size.min(new_size as u64);
        let src = self.region.ptr(offset, len)?;
        let new = self.allocate_locked(&mut s, new_size, align)?;
        // In bounds: `allocate_locked` placed the block below the region's end.
        let dst = self.region.ptr(new.get(), len)?;
        // SAFETY: both ranges are in the region (checked), belong to two distinct live blocks of
        // this allocator, so they do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, len as usize) };
        self.free_locked(&mut s, ptr, hp, h);
        Ok(new)
    }

    fn free(&self, ptr: OffsetPtr) -> Result<()> {
        let mut s = self.lock_checked()?;
        let (hp, h) = self.live_block(&s, ptr)?;
        self.free_locked(&mut s, ptr, hp, h);
        Ok(())
    }

    fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
        let s = self.lock_checked()?;
        self.live_block(&s, ptr).map(|(_, h)| h.size as usize)
    }

    fn stats(&self) -> AllocStats {
        let s = self.lock();
        AllocStats {
            capacity: self.capacity(&s),
            bytes_in_use: s.bytes_in_use,
            bytes_reserved: s.top.saturating_sub(s.data_start),
            high_watermark: s.high_watermark,
            live_allocations: s.live,
            total_allocations: s.total_allocations,
            total_frees: s.total_frees,
        }
    }

    fn check(&self) -> Result<()> {
        let s = self.lock();
        self.check_bounds(&s)?;
        let blocks = self.walk(&s, s.top)?;
        if blocks.top_live != s.last {
            return Err(corrupt(s.top, "freed block left on top of the stack"));
        }
        if blocks.top_live_end != s.top {
            return Err(corrupt(s.top, "top is not where the top block ends"));
        }
        if blocks.live != s.live || blocks.in_use != s.bytes_in_use {
            return Err(corrupt(s.top, "live counters disagree with the blocks"));
        }
        // Every operation keeps these (a repair settles them), and `stats` reports them.
        if s.total_allocations.wrapping_sub(s.total_frees) != s.live {
            return Err(corrupt(s.top, "allocations less frees is not the live blocks"));
        }
        if s.high_watermark < s.top - s.data_start {
            return Err(corrupt(s.top, "high watermark below the bytes on the stack"));
        }
        if s.high_watermark > self.capacity(&s) {
            return Err(corrupt(s.top, "high watermark past the capacity"));
        }
        Ok(())
    }
}

impl StackAllocator {
    /// Allocates `size` bytes aligned to `align` (a checked request) on top of the stack, under
    /// the lock `s` is.
    fn allocate_locked(&self, s: &mut StackState, size: usize, align: usize) -> Result<OffsetPtr> {
        let end = self.region.end();
        let user = align_up(s.top + BLOCK_HEADER, (align as u64).max(MIN_ALIGN));
        let block_end = user.and_then(|u| u.checked_add(size as u64));
        let (user, block_end) = match (user, block_end) {
            (Some(u), Some(e)) if e <= end => (u, e),
            _ => return Err(Error::OutOfMemory { requested: size as u64, available: end - s.top }),
        };
        let header = BlockHeader { start: s.top, prev: s.last, size: size as u64, tag: TAG_LIVE ^ user };
        let hp = self.region.ptr(user - BLOCK_HEADER, BLOCK_HEADER)?.cast::<BlockHeader>();
        // SAFETY: in bounds, 16-aligned, above `top` so no live block overlaps it; written under
        // the mutex.
        unsafe { hp.write(header) };
        // The header is in place before `last` names the block.
        compiler_fence(Ordering::Release);
        crash::point();
        s.top = block_end;
        crash::point();
        s.last = OffsetPtr::new(user);
        crash::point();
        // Counters are only reported (another process may have written them): they wrap.
        s.bytes_in_use = s.bytes_in_use.wrapping_add(size as u64);
        crash::point();
        s.live = s.live.wrapping_add(1);
        crash::point();
        s.total_allocations = s.total_allocations.wrapping_add(1);
        crash::point();
        s.high_watermark = s.high_watermark.max(s.top - s.data_start);
        Ok(OffsetPtr::new(user))
    }

    /// Frees the live block `ptr`, whose header `live_block` read (`hp`, `h`), under the lock `s`
    /// is: marks it, and pops it with the freed blocks below it if it is the top one.
    fn free_locked(&self, s: &mut StackState, ptr: OffsetPtr, hp: *mut BlockHeader, h: BlockHeader) {
        // SAFETY: `hp` is this live block's header (validated by the caller), written under the
        // mutex.
        unsafe { (*hp).tag = TAG_FREED ^ ptr.get() };
        // The block is marked before it leaves the list.
        compiler_fence(Ordering::Release);
        crash::point();
        s.bytes_in_use = s.bytes_in_use.wrapping_sub(h.size);
        crash::point();
        s.live = s.live.wrapping_sub(1);
        crash::point();
        s.total_frees = s.total_frees.wrapping_add(1);
        crash::point();
        if s.last == ptr {
            // The block is freed whatever the pop finds below it: a broken header there stops
            // the pop where it is, for `check` (and the next free of the top) to report, and an
            // error here would tell the caller the block is still theirs.
            let _ = self.pop_freed(s);
        }
    }
}

impl AllocatorType for StackAllocator {
    const TYPE_ID: u32 = TYPE_ID;
    type Config = StackConfig;

    fn create(region: Region, id: AllocatorId, _config: &StackConfig) -> Result<Self> {
        let header_len = core::mem::size_of::<StackHeader>() as u64;
        let data_start = align_up(region.offset() + header_len, 64).unwrap_or(u64::MAX);
        if data_start.checked_add(BLOCK_HEADER + MIN_ALIGN).is_none_or(|e| e > region.end()) {
            return Err(Error::InvalidSize { size: region.len(), reason: "region too small for a stack allocator" });
        }
        let ptr = region.ptr(region.offset(), header_len)?.cast::<StackHeader>();
        // `Region::new` takes any offset; the directory gives multiples of 64.
        if ptr.align_offset(core::mem::align_of::<StackHeader>()) != 0 {
            return Err(Error::InvalidAlignment { align: core::mem::align_of::<StackHeader>() as u64 });
        }
        let state = StackState {
            data_start,
            top: data_start,
            last: OffsetPtr::NULL,
            bytes_in_use: 0,
            live: 0,
            total_allocations: 0,
            total_frees: 0,
            high_watermark: 0,
        };
        // SAFETY: in bounds (checked by `ptr`), aligned (checked above), and not yet visible to
        // anyone: the directory entry is published only after `create` returns.
        unsafe { ptr.write(StackHeader { type_id: TYPE_ID, _pad: 0, id, state: Mutex::new(state) }) };
        StackAllocator::new(region, id)
    }

    fn attach(region: Region, id: AllocatorId) -> Result<Self> {
        // SAFETY: we only read plain integers here, and check them before trusting the rest.
        let header = unsafe { header_at::<StackHeader>(&region) }?;
        if header.type_id != TYPE_ID {
            return Err(Error::HeaderMismatch {
                field: "allocator type",
                expected: TYPE_ID as u64,
                found: header.type_id as u64,
            });
        }
        if header.id != id {
            return Err(Error::HeaderMismatch {
                field: "allocator id",
                expected: id.to_bits(),
                found: header.id.to_bits(),
            });
        }
        let allocator = StackAllocator::new(region, id)?;
        allocator.lock_checked()?;
        Ok(allocator)
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;
    use crate::backend::BackendId;
    use crate::testing::HeapBackend;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn stack(len: usize) -> StackAllocator {
        let backend = Arc::new(HeapBackend::new(BackendId(1), len));
        // SAFETY: a fresh backend, which only this allocator uses.
        let region = unsafe { Region::whole(backend) }.unwrap();
        StackAllocator::create(region, AllocatorId::new(1, 0), &StackConfig {}).unwrap()
    }

    #[test]
    fn lifo_frees_return_all_space_and_other_orders_wait_for_the_top() {
        let s = stack(64 * 1024);
        let start = s.stats().free_bytes();
        let a = s.allocate(100, 8).unwrap();
        let b = s.allocate(200, 64).unwrap();
        let c = s.allocate(50, 4096).unwrap();
        assert_eq!(b.get() % 64, 0);
        assert_eq!(c.get() % 4096, 0);
        s.free(b).unwrap(); // not the top: marked only
        assert_eq!(s.stats().live_allocations, 2);
        assert!(s.stats().free_bytes() < start);
        s.check().unwrap();
        s.free(c).unwrap(); // pops c, then b
        s.check().unwrap();
        let after_c = s.stats();
        let data_start = s.lock().data_start;
        assert_eq!(after_c.bytes_reserved, a.get() + 100 - data_start, "only a is left on the stack");
        s.free(a).unwrap();
        assert_eq!(s.stats().free_bytes(), start);
        s.check().unwrap();
    }

    #[test]
    fn bad_frees_and_requests_are_errors() {
        let s = stack(64 * 1024);
        let a = s.allocate(32, 8).unwrap();
        assert!(matches!(s.allocate(0, 8), Err(Error::InvalidSize { .. })));
        assert!(matches!(s.allocate(8, 3), Err(Error::InvalidAlignment { align: 3 })));
        assert!(matches!(s.allocate(8, 8192), Err(Error::InvalidAlignment { align: 8192 })));
        assert!(matches!(s.free(OffsetPtr::NULL), Err(Error::InvalidFree { .. })));
        assert!(matches!(s.free(OffsetPtr::new(a.get() + 16)), Err(Error::InvalidFree { .. })));
        assert!(matches!(s.free(OffsetPtr::new(3)), Err(Error::InvalidFree { .. })));
        assert!(matches!(s.free(OffsetPtr::new(u64::MAX - 1)), Err(Error::InvalidFree { .. })));
        let b = s.allocate(32, 8).unwrap();
        s.free(a).unwrap();
        assert!(matches!(s.free(a), Err(Error::InvalidFree { reason: "already freed", .. })));
        s.free(b).unwrap();
        s.check().unwrap();
    }

    #[test]
    fn a_misaligned_region_is_refused_not_written() {
        // `Region::new` accepts any offset past the header; the stack header holds atomics.
        let backend = Arc::new(HeapBackend::new(BackendId(1), 64 * 1024));
        // SAFETY: the test's own backend, whose range only this allocator uses.
        let region = unsafe { Region::new(backend, crate::header::HEADER_SIZE + 4, 32 * 1024) }.unwrap();
        let created = StackAllocator::create(region.duplicate(), AllocatorId::new(1, 0), &StackConfig {});
        assert!(matches!(created, Err(Error::InvalidAlignment { .. })));
        let len = core::mem::size_of::<StackHeader>();
        // SAFETY: `len` bytes at the region's start, in bounds (checked by `ptr`), read as bytes.
        let bytes = unsafe { std::slice::from_raw_parts(region.ptr(region.offset(), len as u64).unwrap(), len) };
        assert!(bytes.iter().all(|&b| b == 0), "nothing was written through the misaligned pointer");
    }

    #[test]
    fn out_of_memory_leaves_the_allocator_usable() {
        let s = stack(8 * 4096);
        let cap = s.stats().capacity as usize;
        assert!(matches!(s.allocate(cap + 1, 8), Err(Error::OutOfMemory { .. })));
        assert!(matches!(s.allocate(usize::MAX - 4096, 8), Err(Error::InvalidSize { .. } | Error::OutOfMemory { .. })));
        let a = s.allocate(cap / 2, 8).unwrap();
        s.free(a).unwrap();
        assert_eq!(s.stats().bytes_reserved, 0);
    }

    #[test]
    fn reallocate_grows_the_top_block_in_place_and_moves_others() {
        let s = stack(64 * 1024);
        let a = s.allocate(16, 8).unwrap();
        let region = s.region.duplicate();
        // SAFETY: 16 live bytes of block `a`.
        unsafe { region.ptr(a.get(), 16).unwrap().write_bytes(7, 16) };
        let a2 = s.reallocate(a, 1000, 8).unwrap();
        assert_eq!(a2, a, "top block grows in place");
        let b = s.allocate(8, 8).unwrap();
        let a3 = s.reallocate(a2, 2000, 8).unwrap();
        assert_ne!(a3, a2, "a buried block moves");
        // SAFETY: the first 16 bytes were copied into the new live block.
        let copied = unsafe { std::slice::from_raw_parts(region.ptr(a3.get(), 16).unwrap(), 16) };
        assert_eq!(copied, &[7u8; 16]);
        s.free(a3).unwrap();
        s.free(b).unwrap();
        assert_eq!(s.stats().bytes_reserved, 0);
        s.check().unwrap();
    }

    /// A moving reallocation that a free of the same block races (a caller's double free) ends
    /// one of two ways: the move succeeds and the free is refused, or the free succeeds and the
    /// move is refused. Either way no block is left to no one. (Before the move held the lock
    /// throughout, a free that came between its new block and its copy's end left the new block
    /// live and the move an error.)
    #[test]
    fn a_move_racing_a_free_of_its_block_leaves_no_block_to_no_one() {
        use std::sync::{mpsc, Barrier};
        let s = Arc::new(stack(1 << 20));
        let start = s.stats().free_bytes();
        let go = Arc::new(Barrier::new(2));
        let (block_tx, block_rx) = mpsc::channel::<OffsetPtr>();
        let (freed_tx, freed_rx) = mpsc::channel();
        let freer = {
            let (s, go) = (s.clone(), go.clone());
            std::thread::spawn(move || {
                for a in block_rx {
                    go.wait();
                    // Mostly during the move's copy of 200 KB.
                    std::thread::sleep(std::time::Duration::from_micros(a.get() % 7));
                    freed_tx.send(s.free(a).is_ok()).unwrap();
                }
            })
        };
        let (mut moves, mut frees) = (0, 0);
        for _ in 0..300 {
            let a = s.allocate(200_000, 16).unwrap();
            let b = s.allocate(16, 16).unwrap();
            block_tx.send(a).unwrap();
            go.wait();
            let moved = s.reallocate(a, 300_000, 16);
            let freed = freed_rx.recv().unwrap();
            assert!(moved.is_ok() != freed, "exactly one of the move and the free succeeds: {moved:?}, {freed}");
            if let Ok(new) = moved {
                s.free(new).unwrap();
                moves += 1;
            } else {
                frees += 1;
            }
            s.free(b).unwrap();
            assert_eq!(s.stats().live_allocations, 0, "a block was left to no one");
            assert_eq!(s.stats().free_bytes(), start);
        }
        drop(block_tx);
        freer.join().unwrap();
        s.check().unwrap();
        println!("{moves} moves won, {frees} frees won");
    }

    #[test]
    fn reset_frees_everything() {
        let s = stack(64 * 1024);
        for _ in 0..10 {
            s.allocate(100, 16).unwrap();
        }
        s.reset();
        assert_eq!(s.stats().bytes_reserved, 0);
        assert_eq!(s.stats().live_allocations, 0);
        s.check().unwrap();
    }

    #[test]
    fn a_block_freed_by_reset_cannot_be_freed_again() {
        let s = stack(64 * 1024);
        let start = s.stats().free_bytes();
        let _a = s.allocate(100, 16).unwrap();
        let b = s.allocate(100, 16).unwrap();
        s.reset();
        // A new block over the old ones; its owner has not written over b's old header yet.
        let c = s.allocate(1000, 16).unwrap();
        assert!(matches!(s.free(b), Err(Error::InvalidFree { .. })), "a stale pointer freed a block");
        assert!(matches!(s.size_of(b), Err(Error::InvalidFree { .. })));
        s.check().unwrap();
        s.free(c).unwrap();
        assert_eq!(s.stats().free_bytes(), start);
        s.check().unwrap();
    }

    #[test]
    fn a_state_another_process_broke_gives_errors_not_panics() {
        let s = stack(64 * 1024);
        let a = s.allocate(64, 16).unwrap();
        let (data_start, top) = {
            let st = s.lock();
            (st.data_start, st.top)
        };
        // The state lives in shared memory: a peer (buggy or hostile) may write anything there.
        for (bad_start, bad_top) in
            [(data_start, u64::MAX - 8), (u64::MAX - 8, top), (u64::MAX, u64::MAX), (top + 64, top)]
        {
            {
                let mut st = s.lock();
                st.data_start = bad_start;
                st.top = bad_top;
            }
            assert!(matches!(s.allocate(16, 16), Err(Error::Corrupt { .. })));
            assert!(matches!(s.free(a), Err(Error::Corrupt { .. })));
            assert!(matches!(s.reallocate(a, 128, 16), Err(Error::Corrupt { .. })));
            assert!(matches!(s.size_of(a), Err(Error::Corrupt { .. })));
            assert!(s.check().is_err());
            let _ = s.stats();
            s.reset();
            let mut st = s.lock();
            st.data_start = data_start;
            st.top = top;
        }
        // Counters that disagree with the blocks are reported by `check`, and never overflow.
        {
            let mut st = s.lock();
            (st.live, st.bytes_in_use, st.total_allocations, st.total_frees) = (0, 0, u64::MAX, u64::MAX);
        }
        let b = s.allocate(64, 16).unwrap();
        s.free(b).unwrap();
        assert!(matches!(s.check(), Err(Error::Corrupt { .. })));
        // A freed block whose header's `start` was overwritten (a neighbour's write overran) is
        // not popped: the bump pointer stays in the region. The free that meets it is done all
        // the same (an error would tell its caller the block is still theirs); `check` reports
        // the damage.
        let c = s.allocate(64, 16).unwrap();
        let d = s.allocate(64, 16).unwrap();
        s.free(c).unwrap();
        let hp = s.region.ptr(c.get() - BLOCK_HEADER, BLOCK_HEADER).unwrap().cast::<BlockHeader>();
        // SAFETY: c's header, in bounds and aligned; no other thread uses the allocator.
        unsafe { (*hp).start = u64::MAX };
        s.free(d).unwrap();
        assert!(matches!(s.free(d), Err(Error::InvalidFree { .. })), "d was freed");
        assert!(matches!(s.check(), Err(Error::Corrupt { .. })));
        s.check_bounds(&s.lock()).unwrap();
        let _ = s.stats();
    }

    /// The totals and the high watermark are shared memory too: a peer's write that makes them
    /// disagree with the blocks (allocations less frees not the live blocks, a high watermark
    /// below the bytes on the stack) is reported by `check`, as the live counters are.
    #[test]
    fn totals_and_high_watermark_that_disagree_with_the_blocks_are_reported() {
        let s = stack(64 * 1024);
        let a = s.allocate(3000, 16).unwrap();
        let b = s.allocate(64, 16).unwrap();
        s.free(a).unwrap();
        s.check().unwrap();
        let damage: [fn(&mut StackState); 5] = [
            |st| st.total_frees = st.total_frees.wrapping_add(1),
            |st| st.total_allocations = st.total_allocations.wrapping_sub(1),
            |st| st.total_allocations = 0,
            |st| st.high_watermark = st.top - st.data_start - 16,
            // Past the capacity, which no stack ever held.
            |st| st.high_watermark = u64::MAX,
        ];
        for (i, damage) in damage.iter().enumerate() {
            let saved = {
                let mut st = s.lock();
                let saved = (st.total_allocations, st.total_frees, st.high_watermark);
                damage(&mut st);
                saved
            };
            let checked = s.check();
            {
                let mut st = s.lock();
                (st.total_allocations, st.total_frees, st.high_watermark) = saved;
            }
            assert!(matches!(checked, Err(Error::Corrupt { .. })), "damage {i}: {checked:?}");
        }
        s.check().unwrap();
        s.free(b).unwrap();
        s.check().unwrap();
    }

    /// Marks the lock held by a dead process, as a process killed inside an operation leaves it
    /// (`die_at` unwinds, which released it).
    fn held_by_the_dead(s: &StackAllocator) {
        // SAFETY: the header is in bounds and aligned (`new`); the mutex is `#[repr(C)]` with its
        // owner word, an aligned AtomicU64, first.
        let owner = unsafe { &*core::ptr::from_ref(&s.header.as_ref().state).cast::<crate::sync::atomic::AtomicU64>() };
        owner.store(crate::testing::dead_token(), Ordering::Release);
    }

    fn fill(s: &StackAllocator, p: OffsetPtr, len: u64, byte: u8) {
        // SAFETY: `len` bytes of a live block.
        unsafe { s.region.ptr(p.get(), len).unwrap().write_bytes(byte, len as usize) };
    }

    fn holds(s: &StackAllocator, p: OffsetPtr, len: u64, byte: u8) -> bool {
        // SAFETY: `len` bytes of a live block, read only.
        unsafe { std::slice::from_raw_parts(s.region.ptr(p.get(), len).unwrap(), len as usize) }
            .iter()
            .all(|&b| b == byte)
    }

    /// An operation a process dies inside, on blocks a and c (see the test below).
    struct Case {
        name: &'static str,
        run: fn(&StackAllocator, [OffsetPtr; 2]) -> Result<Option<OffsetPtr>>,
        /// Which of a and c a death may leave freed.
        may_free: &'static [usize],
        /// How many blocks no one was handed a death may leave live.
        may_leave: u64,
        /// The fill byte of a or c that the block it returns holds (`None`: a fresh block).
        result_holds: Option<u8>,
    }

    #[test]
    fn a_death_at_any_point_of_any_operation_is_repaired_by_the_next_locker() {
        crate::testing::install_test_liveness();
        // Blocks a, b, c, with b freed: a free of c pops two blocks.
        let cases = [
            Case {
                name: "allocate",
                run: |s, _| s.allocate(5000, 64).map(Some),
                may_free: &[],
                may_leave: 1,
                result_holds: None,
            },
            Case {
                name: "free the top block",
                run: |s, [_, c]| s.free(c).map(|_| None),
                may_free: &[1],
                may_leave: 0,
                result_holds: None,
            },
            Case {
                name: "free a buried block",
                run: |s, [a, _]| s.free(a).map(|_| None),
                may_free: &[0],
                may_leave: 0,
                result_holds: None,
            },
            Case {
                name: "grow the top block in place",
                run: |s, [_, c]| s.reallocate(c, 4000, 16).map(Some),
                may_free: &[],
                may_leave: 0,
                result_holds: Some(3),
            },
            Case {
                name: "shrink the top block in place",
                run: |s, [_, c]| s.reallocate(c, 20, 16).map(Some),
                may_free: &[],
                may_leave: 0,
                result_holds: Some(3),
            },
            Case {
                name: "move a buried block",
                run: |s, [a, _]| s.reallocate(a, 4000, 16).map(Some),
                may_free: &[0],
                may_leave: 1,
                result_holds: Some(1),
            },
            Case {
                name: "reset",
                run: |s, _| {
                    s.reset();
                    Ok(None)
                },
                may_free: &[0, 1],
                may_leave: 0,
                result_holds: None,
            },
        ];
        for Case { name, run, may_free, may_leave, result_holds } in cases {
            for n in 0.. {
                let s = Arc::new(stack(64 * 1024));
                let start = s.stats().free_bytes();
                let (a, b, c) =
                    (s.allocate(100, 16).unwrap(), s.allocate(200, 16).unwrap(), s.allocate(300, 16).unwrap());
                for (p, len, byte) in [(a, 100, 1), (b, 200, 2), (c, 300, 3)] {
                    fill(&s, p, len, byte);
                }
                s.free(b).unwrap();
                let out = crate::crash::testing::die_at(n, || run(&s, [a, c]));
                if out.is_some() && n == 0 {
                    panic!("{name} passes no crash point");
                }
                if out.is_none() {
                    held_by_the_dead(&s);
                }
                let (tx, rx) = std::sync::mpsc::channel();
                let peer = s.clone();
                std::thread::spawn(move || tx.send(peer.check()));
                let checked = rx.recv_timeout(std::time::Duration::from_secs(10));
                let at = format!("{name}, died at point {n}");
                checked
                    .unwrap_or_else(|_| panic!("{at}: the lock was never taken over"))
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                let stats = s.stats();
                assert_eq!(stats.total_allocations.wrapping_sub(stats.total_frees), stats.live_allocations, "{at}");
                // The blocks the caller holds: a and c unless the operation freed them, its result.
                let mut held = Vec::new();
                for (i, (p, len, byte)) in [(a, 100, 1u8), (c, 300, 3)].into_iter().enumerate() {
                    match s.size_of(p) {
                        Ok(size) => held.push((p, len.min(size as u64), byte)),
                        Err(Error::InvalidFree { .. }) if may_free.contains(&i) => {}
                        Err(e) => panic!("{at}: block {i} lost: {e}"),
                    }
                }
                if let Some(Ok(Some(p))) = out {
                    held.retain(|&(q, _, _)| q != p);
                    let size = s.size_of(p).unwrap() as u64;
                    match result_holds {
                        Some(byte) => held.push((p, size.min(20), byte)),
                        None => {
                            fill(&s, p, size, 5);
                            held.push((p, size, 5));
                        }
                    }
                }
                // New blocks go above every live one.
                let fresh = s.allocate(2000, 16).unwrap();
                fill(&s, fresh, 2000, 0xee);
                for &(p, len, byte) in &held {
                    assert!(holds(&s, p, len, byte), "{at}: a live block's bytes changed");
                }
                s.free(fresh).unwrap();
                for &(p, _, _) in &held {
                    s.free(p).unwrap();
                }
                assert!(s.stats().live_allocations <= may_leave, "{at}: {:?}", s.stats());
                s.reset();
                assert_eq!(s.stats().free_bytes(), start, "{at}");
                s.check().unwrap_or_else(|e| panic!("{at}: {e}"));
                if out.is_some() {
                    break;
                }
            }
        }
    }

    #[test]
    fn a_dead_holder_of_a_broken_state_is_taken_over_and_the_state_left_for_errors() {
        crate::testing::install_test_liveness();
        let s = stack(64 * 1024);
        let a = s.allocate(64, 16).unwrap();
        let (data_start, top) = {
            let st = s.lock();
            (st.data_start, st.top)
        };
        // What no death leaves: the repair cannot tell the live blocks, so it changes nothing.
        for (bad_start, bad_last) in [
            (data_start, u64::MAX - 15),
            (data_start, top + 4096),
            (u64::MAX, a.get()),
            (u64::MAX, OffsetPtr::NULL.get()),
        ] {
            {
                let mut st = s.lock();
                (st.data_start, st.last) = (bad_start, OffsetPtr::new(bad_last));
            }
            held_by_the_dead(&s);
            let _ = s.stats();
            let st = s.lock();
            assert_eq!((st.data_start, st.last.get(), st.top), (bad_start, bad_last, top), "the repair wrote");
            drop(st);
            assert!(s.check().is_err());
            let mut st = s.lock();
            (st.data_start, st.last) = (data_start, a);
        }
        s.check().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { size: usize, align_log2: u32 },
        Free { pick: usize },
        Realloc { pick: usize, size: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1usize..3000, 0u32..=12).prop_map(|(size, align_log2)| Op::Alloc { size, align_log2 }),
            2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
            1 => (any::<usize>(), 1usize..3000).prop_map(|(pick, size)| Op::Realloc { pick, size }),
        ]
    }

    proptest! {
        #[test]
        fn random_sequences_keep_blocks_disjoint_and_intact(ops in proptest::collection::vec(op(), 1..200)) {
            let s = stack(256 * 1024);
            let start = s.stats().free_bytes();
            let region = s.region.duplicate();
            // live blocks: (offset, size, fill byte)
            let mut live: Vec<(u64, usize, u8)> = Vec::new();
            for (step, op) in ops.into_iter().enumerate() {
                let fill = step as u8;
                match op {
                    Op::Alloc { size, align_log2 } => {
                        let align = 1usize << align_log2;
                        match s.allocate(size, align) {
                            Ok(p) => {
                                prop_assert_eq!(p.get() % align as u64, 0);
                                prop_assert!(region.contains(p.get(), size as u64));
                                // SAFETY: a fresh live block of `size` bytes.
                                unsafe { region.ptr(p.get(), size as u64).unwrap().write_bytes(fill, size) };
                                live.push((p.get(), size, fill));
                            }
                            Err(Error::OutOfMemory { .. }) => {}
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Free { pick } if !live.is_empty() => {
                        let (off, _, _) = live.swap_remove(pick % live.len());
                        s.free(OffsetPtr::new(off)).unwrap();
                    }
                    Op::Realloc { pick, size } if !live.is_empty() => {
                        let i = pick % live.len();
                        let (off, old, f) = live[i];
                        match s.reallocate(OffsetPtr::new(off), size, 16) {
                            Ok(p) => {
                                // SAFETY: the common prefix was kept in the live block.
                                let kept = unsafe {
                                    let keep = old.min(size);
                                    std::slice::from_raw_parts(region.ptr(p.get(), keep as u64).unwrap(), keep)
                                };
                                prop_assert!(kept.iter().all(|&b| b == f));
                                // SAFETY: live block of `size` bytes.
                                unsafe { region.ptr(p.get(), size as u64).unwrap().write_bytes(f, size) };
                                live[i] = (p.get(), size, f);
                            }
                            Err(Error::OutOfMemory { .. }) => {}
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    _ => {}
                }
                s.check().unwrap();
                let mut sorted = live.clone();
                sorted.sort();
                for w in sorted.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 as u64 <= w[1].0, "blocks overlap");
                }
                for &(off, size, f) in &live {
                    // SAFETY: live block of `size` bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(region.ptr(off, size as u64).unwrap(), size) };
                    prop_assert!(bytes.iter().all(|&b| b == f), "contents changed");
                }
                prop_assert_eq!(s.stats().live_allocations, live.len() as u64);
            }
            for (off, _, _) in live {
                s.free(OffsetPtr::new(off)).unwrap();
            }
            prop_assert_eq!(s.stats().free_bytes(), start);
        }
    }
}
