//! Blocks and spans: the in-region format the span allocators share.
//!
//! ```text
//! span (a run of units)  [SpanHeader 128 B][block][block]...          one size class per span
//! small block            [info u64][link/back u64][user bytes ...]    16-byte header
//! padded small block     [info][link][pad ...][back u64][user ...]    for alignments over 16
//! large block (a run)    [info][size u64][owner u64][back u64][user]  32-byte header
//! ```
//!
//! `info` packs a magic, the block's state (free, live, or freed remotely and in transit), its
//! class, its index in its span (so the span is found without any lookup) and, for small blocks,
//! the requested size. The word just before the user bytes (`back`) gives the distance back to
//! the block start, plus the allocating process for allocators that record it. A free block's
//! second word links it into a [`TaggedOffsetList`](crate::sync::TaggedOffsetList).
//!
//! [`Mem`] is the bounds-checked view every access goes through.

use crate::error::{Error, Result};
use crate::region::Region;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::tagged_list::{decode, encode, storable, LinkStore};

use super::free_space::UNIT;
use super::size_class::{class_size, CLASS_COUNT};

/// Header bytes before a small block's user bytes.
pub(crate) const SMALL_HEADER: u64 = 16;
/// Header bytes before a large block's user bytes.
pub(crate) const LARGE_HEADER: u64 = 32;
/// Bytes at the start of a span before its first block.
pub(crate) const SPAN_HEADER: u64 = 128;
/// The class number large blocks carry.
pub(crate) const LARGE_CLASS: usize = 255;
const MAX_BLOCKS: u64 = 4095;
const MIN_SPAN_UNITS: u64 = 16;
const SPAN_MAGIC: u32 = 0x5350_414E; // "SPAN"

const INFO_MAGIC: u64 = 0xB10C;

/// A block's state, in its info word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// On a free list (or not yet handed out).
    Free = 1,
    /// Handed out.
    Live = 2,
    /// Freed by a thread other than its heap's owner, on its way back through a remote list.
    Remote = 3,
}

/// A block's info word, unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Info {
    pub(crate) state: State,
    pub(crate) class: usize,
    pub(crate) index: u64,
    pub(crate) size: u64,
}

impl Info {
    #[inline]
    pub(crate) fn pack(self) -> u64 {
        (INFO_MAGIC << 48) | ((self.state as u64) << 44) | ((self.class as u64) << 36) | (self.index << 24) | self.size
    }

    #[inline]
    pub(crate) fn unpack(word: u64) -> Option<Info> {
        if word >> 48 != INFO_MAGIC {
            return None;
        }
        let state = match (word >> 44) & 0xf {
            1 => State::Free,
            2 => State::Live,
            3 => State::Remote,
            _ => return None,
        };
        let class = ((word >> 36) & 0xff) as usize;
        if class >= CLASS_COUNT && class != LARGE_CLASS {
            return None;
        }
        Some(Info { state, class, index: (word >> 24) & 0xfff, size: word & 0xff_ffff })
    }

    #[inline]
    pub(crate) fn with_state(self, state: State) -> Info {
        Info { state, ..self }
    }
}

/// The shape of a class's spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClassLayout {
    /// User bytes per block.
    pub(crate) size: u64,
    /// Bytes from one block to the next (header included).
    pub(crate) stride: u64,
    /// Units per span.
    pub(crate) units: u32,
    /// Blocks per span.
    pub(crate) blocks: u64,
}

const fn layout_of(class: usize) -> ClassLayout {
    let size = class_size(class) as u64;
    let stride = size + SMALL_HEADER;
    let want = SPAN_HEADER + 8 * stride;
    let mut units = want.div_ceil(UNIT);
    if units < MIN_SPAN_UNITS {
        units = MIN_SPAN_UNITS;
    }
    let mut blocks = (units * UNIT - SPAN_HEADER) / stride;
    if blocks > MAX_BLOCKS {
        blocks = MAX_BLOCKS;
    }
    ClassLayout { size, stride, units: units as u32, blocks }
}

const fn layouts() -> [ClassLayout; CLASS_COUNT] {
    let mut out = [layout_of(0); CLASS_COUNT];
    let mut c = 1;
    while c < CLASS_COUNT {
        out[c] = layout_of(c);
        c += 1;
    }
    out
}

/// Every class's span shape.
pub(crate) static LAYOUTS: [ClassLayout; CLASS_COUNT] = layouts();

/// The first part of every span.
#[repr(C)]
pub(crate) struct SpanHeader {
    magic: u32,
    class: u32,
    /// What owns the span (the thread-local allocator's heap offset; 0 in the page allocator).
    pub(crate) owner: AtomicU64,
    /// Owner-only state for allocators with per-thread heaps.
    pub(crate) local: SpanLocal,
}

/// Span state only the owning heap's thread touches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpanLocal {
    /// Local free list (an encoded link, 0 = empty).
    pub(crate) free: u64,
    /// Blocks below this index have been handed out at least once.
    pub(crate) bump: u32,
    /// Blocks not on the local free list and not past `bump`: live or in a remote list.
    pub(crate) used: u32,
    /// Neighbours in the heap's list for this class (offsets, 0 = none).
    pub(crate) prev: u64,
    pub(crate) next: u64,
    /// Which of the heap's lists holds the span.
    pub(crate) list: u32,
    pub(crate) _pad: u32,
}

const _: () = assert!(core::mem::size_of::<SpanHeader>() as u64 <= SPAN_HEADER);

/// A bounds-checked view of a region, cheap to copy into fast paths.
#[derive(Clone, Copy)]
pub(crate) struct Mem {
    base: *mut u8,
    start: u64,
    end: u64,
}

// SAFETY: a Mem is an address range inside a region its owner keeps mapped; every access through
// it is bounds-checked and uses atomics or memory the caller owns.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    /// A view of `[start, end)` of `region`'s backend.
    pub(crate) fn of(region: &Region, start: u64, end: u64) -> Result<Mem> {
        let base = region.ptr(region.offset(), 0)?.wrapping_sub(region.offset() as usize);
        if !region.contains(start, end.saturating_sub(start)) {
            return Err(Error::OutOfBounds { offset: start, len: end.saturating_sub(start), region_len: region.end() });
        }
        Ok(Mem { base, start, end })
    }

    /// Whether `[offset, offset + len)` lies in the view.
    #[inline]
    pub(crate) fn contains(&self, offset: u64, len: u64) -> bool {
        offset >= self.start && offset <= self.end && len <= self.end - offset
    }

    /// The address of `offset`, after checking `len` bytes from it lie in the view.
    #[inline]
    pub(crate) fn ptr(&self, offset: u64, len: u64) -> Result<*mut u8> {
        if !self.contains(offset, len) {
            return Err(Error::OutOfBounds { offset, len, region_len: self.end });
        }
        // SAFETY: in bounds of the mapping (checked), so the result stays in the allocation.
        Ok(unsafe { self.base.add(offset as usize) })
    }

    /// The 8-aligned word at `offset`, as an atomic.
    #[inline]
    pub(crate) fn word(&self, offset: u64) -> Result<&AtomicU64> {
        if offset % 8 != 0 {
            return Err(Error::InvalidAlignment { align: offset % 8 });
        }
        let p = self.ptr(offset, 8)?;
        // SAFETY: in bounds, 8-aligned (the base is page-aligned), and every word the allocators
        // keep state in is only accessed atomically; an AtomicU64 is valid for any bits.
        Ok(unsafe { &*p.cast::<AtomicU64>() })
    }

    /// A `T` at `offset`, after bounds and alignment checks.
    ///
    /// # Safety
    /// The bytes at `offset` hold a valid `T` (any bits must be valid for it) that is only
    /// mutated through atomics, or by the one thread the caller's protocol allows.
    #[inline]
    pub(crate) unsafe fn at<T>(&self, offset: u64) -> Result<*mut T> {
        let p = self.ptr(offset, core::mem::size_of::<T>() as u64)?;
        if p.align_offset(core::mem::align_of::<T>()) != 0 {
            return Err(Error::InvalidAlignment { align: core::mem::align_of::<T>() as u64 });
        }
        Ok(p.cast::<T>())
    }

    /// The info word of the block at `block`.
    #[inline]
    pub(crate) fn info(&self, block: u64) -> Result<&AtomicU64> {
        self.word(block)
    }

    /// A span's header, checked for its magic.
    #[inline]
    pub(crate) fn span(&self, span: u64) -> Result<&SpanHeader> {
        // SAFETY: a SpanHeader is integers and atomics (valid for any bits); its owner-only part
        // is only written by the protocol's one writer.
        let p = unsafe { self.at::<SpanHeader>(span) }?;
        // SAFETY: in bounds and aligned (checked by `at`).
        let h = unsafe { &*p };
        if h.magic != SPAN_MAGIC {
            return Err(corrupt(span, "not a span"));
        }
        Ok(h)
    }

    /// Copies `len` bytes between two blocks that do not overlap.
    pub(crate) fn copy(&self, from: u64, to: u64, len: u64) -> Result<()> {
        let src = self.ptr(from, len)?;
        let dst = self.ptr(to, len)?;
        if from < to + len && to < from + len {
            return Err(corrupt(to, "copy between overlapping blocks"));
        }
        // SAFETY: both ranges are in bounds (checked) and disjoint (checked).
        unsafe { core::ptr::copy_nonoverlapping(src, dst, len as usize) };
        Ok(())
    }
}

impl LinkStore for Mem {
    #[inline]
    fn load_link(&self, offset: u64) -> Result<Option<u64>> {
        if !storable(offset) {
            return Err(corrupt(offset, "list link is not a block offset"));
        }
        Ok(decode(self.word(offset + 8)?.load(Ordering::Relaxed)))
    }

    #[inline]
    fn store_link(&self, offset: u64, next: Option<u64>) {
        if let Ok(w) = self.word(offset + 8) {
            w.store(encode(next), Ordering::Relaxed);
        }
    }
}

pub(crate) fn corrupt(offset: u64, detail: &'static str) -> Error {
    Error::Corrupt { structure: "span allocator", offset, detail }
}

pub(crate) fn invalid(offset: u64, reason: &'static str) -> Error {
    Error::InvalidFree { offset, reason }
}

/// Writes a fresh span header for `class` at `span`.
///
/// # Safety
/// The span's units were just taken from the free-space manager: no one else uses them.
pub(crate) unsafe fn init_span(mem: &Mem, span: u64, class: usize, owner: u64) -> Result<()> {
    // SAFETY: fresh memory the caller owns; SpanHeader is valid for any bits.
    let p = unsafe { mem.at::<SpanHeader>(span) }?;
    // SAFETY: as above.
    unsafe {
        p.write(SpanHeader {
            magic: SPAN_MAGIC,
            class: class as u32,
            owner: AtomicU64::new(owner),
            local: SpanLocal::default(),
        })
    };
    Ok(())
}

/// The class a span header records.
pub(crate) fn span_class(h: &SpanHeader) -> usize {
    h.class as usize
}

/// The block start of block `index` of a span.
#[inline]
pub(crate) fn block_at(span: u64, class: usize, index: u64) -> u64 {
    span + SPAN_HEADER + index * LAYOUTS[class].stride
}

/// The span a block belongs to, from its info.
#[inline]
pub(crate) fn span_of(block: u64, info: &Info) -> Option<u64> {
    let l = LAYOUTS.get(info.class)?;
    if info.index >= l.blocks {
        return None;
    }
    block.checked_sub(SPAN_HEADER + info.index * l.stride)
}

/// Where the user bytes of a block at `block` start for alignment `align`, with `header` bytes
/// of header.
#[inline]
pub(crate) fn user_of(block: u64, header: u64, align: u64) -> u64 {
    (block + header).next_multiple_of(align.max(16))
}

/// The back word: distance to the block start, plus an owner stamp in the high bits.
#[inline]
pub(crate) fn back_word(back: u64, stamp: u64) -> u64 {
    back | (stamp << 16)
}

/// The block start of the user pointer `user`, checked: a 16-aligned pointer whose back word
/// leads to a block with a valid info word that places it at `user` again.
#[inline]
pub(crate) fn block_of_user(mem: &Mem, user: u64) -> Result<(u64, Info, u64)> {
    if user % 16 != 0 {
        return Err(invalid(user, "not an offset this allocator gave out"));
    }
    let word = mem.word(user.wrapping_sub(8))?.load(Ordering::Relaxed);
    let back = word & 0xffff;
    if back < SMALL_HEADER || back % 16 != 0 || back > 4096 + LARGE_HEADER || back > user {
        return Err(invalid(user, "not an offset this allocator gave out"));
    }
    let block = user - back;
    let info = Info::unpack(mem.info(block)?.load(Ordering::Acquire))
        .ok_or(invalid(user, "not an offset this allocator gave out"))?;
    let header = if info.class == LARGE_CLASS { LARGE_HEADER } else { SMALL_HEADER };
    if back < header {
        return Err(invalid(user, "not an offset this allocator gave out"));
    }
    Ok((block, info, word >> 16))
}

/// The smallest class whose blocks fit `size` bytes at alignment `align` (padding included),
/// or `None` if the request is large.
#[inline]
pub(crate) fn class_for(size: usize, align: usize) -> Option<usize> {
    let need = if align <= 16 { size } else { size.checked_add(align - 16)? };
    super::size_class::class_of(need)
}

/// Units a large request needs.
pub(crate) fn large_units(size: usize, align: usize) -> Option<u32> {
    let need = LARGE_HEADER.checked_add(if align > 16 { align as u64 } else { 0 })?.checked_add(size as u64)?;
    u32::try_from(need.div_ceil(UNIT)).ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn info_words_round_trip_and_reject_garbage() {
        let i = Info { state: State::Live, class: 17, index: 4000, size: 12345 };
        assert_eq!(Info::unpack(i.pack()), Some(i));
        assert_eq!(Info::unpack(0), None);
        assert_eq!(Info::unpack(i.pack() ^ (1 << 60)), None);
    }

    #[test]
    fn every_class_has_a_sane_span() {
        for (c, l) in LAYOUTS.iter().enumerate() {
            assert!(l.blocks >= 8, "class {c}");
            assert!(SPAN_HEADER + l.blocks * l.stride <= l.units as u64 * UNIT);
            assert_eq!(l.stride % 16, 0);
        }
        assert_eq!(class_for(16, 4096), super::super::size_class::class_of(16 + 4080));
        assert_eq!(class_for(20_000, 8), None);
    }
}
