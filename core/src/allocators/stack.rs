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

use core::ptr::NonNull;

use crate::allocator::{AllocStats, AllocatorType, RegionAllocator};
use crate::allocators::{align_up, check_request, header_at};
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

/// A bump allocator whose state lives in its region. See the [module docs](self).
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

    fn lock(&self) -> MutexGuard<'_, StackState> {
        // SAFETY: `header` was checked in bounds and aligned in `new`, and the region stays mapped.
        unsafe { self.header.as_ref() }.state.lock()
    }

    fn capacity(&self, state: &StackState) -> u64 {
        self.region.end() - state.data_start
    }

    /// Frees every block at once: the allocator is as it was after creation.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.top = s.data_start;
        s.last = OffsetPtr::NULL;
        s.total_frees += s.live;
        s.bytes_in_use = 0;
        s.live = 0;
    }

    /// Reads the header of the block whose user bytes start at `offset`, after bounds checks.
    fn block(&self, state: &StackState, offset: u64) -> Result<(*mut BlockHeader, BlockHeader)> {
        if offset < state.data_start + BLOCK_HEADER || offset > state.top || offset % MIN_ALIGN != 0
        {
            return Err(Error::InvalidFree {
                offset,
                reason: "not an offset this allocator gave out",
            });
        }
        let ptr = self
            .region
            .ptr(offset - BLOCK_HEADER, BLOCK_HEADER)?
            .cast::<BlockHeader>();
        // SAFETY: in bounds (checked by `ptr`), 16-aligned (offset and BLOCK_HEADER are multiples
        // of 16, the region's base is page-aligned), and read under the allocator's mutex.
        let header = unsafe { ptr.read() };
        Ok((ptr, header))
    }

    fn live_block(
        &self,
        state: &StackState,
        ptr: OffsetPtr,
    ) -> Result<(*mut BlockHeader, BlockHeader)> {
        let offset = ptr.offset().ok_or(Error::InvalidFree {
            offset: ptr.get(),
            reason: "null pointer",
        })?;
        let (hp, h) = self.block(state, offset)?;
        if h.tag == (TAG_FREED ^ offset) {
            return Err(Error::InvalidFree {
                offset,
                reason: "already freed",
            });
        }
        let sane = h.tag == (TAG_LIVE ^ offset)
            && h.start >= state.data_start
            && h.start <= offset - BLOCK_HEADER
            && offset
                .checked_add(h.size)
                .is_some_and(|end| end <= state.top);
        if !sane {
            return Err(Error::InvalidFree {
                offset,
                reason: "not a live block of this allocator",
            });
        }
        Ok((hp, h))
    }

    /// Pops freed blocks off the top.
    fn pop_freed(&self, state: &mut StackState) -> Result<()> {
        while let Some(offset) = state.last.offset() {
            let (_, h) = self
                .block(state, offset)
                .map_err(|_| corrupt(offset, "block list leaves the stack"))?;
            if h.tag != (TAG_FREED ^ offset) {
                break;
            }
            state.top = h.start;
            state.last = h.prev;
        }
        Ok(())
    }
}

fn corrupt(offset: u64, detail: &'static str) -> Error {
    Error::Corrupt {
        structure: "stack allocator",
        offset,
        detail,
    }
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
        let mut s = self.lock();
        let end = self.region.end();
        let user = align_up(s.top + BLOCK_HEADER, (align as u64).max(MIN_ALIGN));
        let block_end = user.and_then(|u| u.checked_add(size as u64));
        let (user, block_end) = match (user, block_end) {
            (Some(u), Some(e)) if e <= end => (u, e),
            _ => {
                return Err(Error::OutOfMemory {
                    requested: size as u64,
                    available: end - s.top,
                })
            }
        };
        let header = BlockHeader {
            start: s.top,
            prev: s.last,
            size: size as u64,
            tag: TAG_LIVE ^ user,
        };
        let hp = self
            .region
            .ptr(user - BLOCK_HEADER, BLOCK_HEADER)?
            .cast::<BlockHeader>();
        // SAFETY: in bounds, 16-aligned, above `top` so no live block overlaps it; written under
        // the mutex.
        unsafe { hp.write(header) };
        s.top = block_end;
        s.last = OffsetPtr::new(user);
        s.bytes_in_use += size as u64;
        s.live += 1;
        s.total_allocations += 1;
        s.high_watermark = s.high_watermark.max(s.top - s.data_start);
        Ok(OffsetPtr::new(user))
    }

    fn reallocate(&self, ptr: OffsetPtr, new_size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(new_size, align)?;
        let mut s = self.lock();
        let (hp, h) = self.live_block(&s, ptr)?;
        let offset = ptr.get();
        let in_place = s.last == ptr
            && offset % align as u64 == 0
            && offset
                .checked_add(new_size as u64)
                .is_some_and(|e| e <= self.region.end());
        if in_place {
            // SAFETY: `hp` is this live block's header (validated above), written under the mutex.
            unsafe { (*hp).size = new_size as u64 };
            s.top = offset + new_size as u64;
            s.bytes_in_use = s.bytes_in_use - h.size + new_size as u64;
            s.high_watermark = s.high_watermark.max(s.top - s.data_start);
            return Ok(ptr);
        }
        drop(s);
        let new = self.allocate(new_size, align)?;
        let len = h.size.min(new_size as u64);
        let src = self.region.ptr(offset, len)?;
        let dst = self.region.ptr(new.get(), len)?;
        // SAFETY: both ranges are in the region (checked), belong to two distinct live blocks of
        // this allocator, so they do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, len as usize) };
        self.free(ptr)?;
        Ok(new)
    }

    fn free(&self, ptr: OffsetPtr) -> Result<()> {
        let mut s = self.lock();
        let (hp, h) = self.live_block(&s, ptr)?;
        // SAFETY: `hp` is this live block's header (validated above), written under the mutex.
        unsafe { (*hp).tag = TAG_FREED ^ ptr.get() };
        s.bytes_in_use -= h.size;
        s.live -= 1;
        s.total_frees += 1;
        if s.last == ptr {
            self.pop_freed(&mut s)?;
        }
        Ok(())
    }

    fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
        let s = self.lock();
        self.live_block(&s, ptr).map(|(_, h)| h.size as usize)
    }

    fn stats(&self) -> AllocStats {
        let s = self.lock();
        AllocStats {
            capacity: self.capacity(&s),
            bytes_in_use: s.bytes_in_use,
            bytes_reserved: s.top - s.data_start,
            high_watermark: s.high_watermark,
            live_allocations: s.live,
            total_allocations: s.total_allocations,
            total_frees: s.total_frees,
        }
    }

    fn check(&self) -> Result<()> {
        let s = self.lock();
        if s.top < s.data_start || s.top > self.region.end() {
            return Err(corrupt(s.top, "bump pointer outside the data area"));
        }
        let (mut live, mut in_use, mut above) = (0u64, 0u64, s.top);
        let mut next = s.last;
        let mut first = true;
        while let Some(offset) = next.offset() {
            let (_, h) = self
                .block(&s, offset)
                .map_err(|_| corrupt(offset, "block outside the stack"))?;
            let is_live = h.tag == (TAG_LIVE ^ offset);
            if !is_live && h.tag != (TAG_FREED ^ offset) {
                return Err(corrupt(offset, "block tag is neither live nor freed"));
            }
            if first && !is_live {
                return Err(corrupt(offset, "freed block left on top of the stack"));
            }
            if offset.checked_add(h.size).is_none_or(|e| e > above)
                || h.start > offset - BLOCK_HEADER
            {
                return Err(corrupt(offset, "blocks overlap"));
            }
            if h.start < s.data_start {
                return Err(corrupt(offset, "block starts before the data area"));
            }
            if is_live {
                live += 1;
                in_use += h.size;
            }
            above = h.start;
            next = h.prev;
            first = false;
        }
        if above != s.data_start {
            return Err(corrupt(
                above,
                "lowest block does not start at the data area",
            ));
        }
        if live != s.live || in_use != s.bytes_in_use {
            return Err(corrupt(s.top, "live counters disagree with the blocks"));
        }
        Ok(())
    }
}

impl AllocatorType for StackAllocator {
    const TYPE_ID: u32 = TYPE_ID;
    type Config = StackConfig;

    fn create(region: Region, id: AllocatorId, _config: &StackConfig) -> Result<Self> {
        let header_len = core::mem::size_of::<StackHeader>() as u64;
        let data_start = align_up(region.offset() + header_len, 64).unwrap_or(u64::MAX);
        if data_start
            .checked_add(BLOCK_HEADER + MIN_ALIGN)
            .is_none_or(|e| e > region.end())
        {
            return Err(Error::InvalidSize {
                size: region.len(),
                reason: "region too small for a stack allocator",
            });
        }
        let ptr = region
            .ptr(region.offset(), header_len)?
            .cast::<StackHeader>();
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
        // SAFETY: in bounds (checked by `ptr`), 64-aligned (sub-regions start at multiples of
        // 64 of a page-aligned base), and not yet visible to anyone: the directory entry is
        // published only after `create` returns.
        unsafe {
            ptr.write(StackHeader {
                type_id: TYPE_ID,
                _pad: 0,
                id,
                state: Mutex::new(state),
            })
        };
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
        {
            let s = allocator.lock();
            let data_ok =
                s.data_start >= allocator.region.offset() && s.data_start <= allocator.region.end();
            if !data_ok || s.top < s.data_start || s.top > allocator.region.end() {
                return Err(corrupt(s.top, "stack header points outside its region"));
            }
        }
        Ok(allocator)
    }
}
