//! Blocks and spans: the in-region format the span allocators share.
//!
//! ```text
//! span (a run of units)  [SpanHeader 64 B][block][block]...           one size class per span
//! small block            [info u64][link/back u64][user bytes ...]    16-byte header
//! padded small block     [info][0][0 ...][back u64][user ...]         for alignments over 16
//! large block (a run)    [info][size u64][owner u64][back u64][user]  32-byte header
//! ```
//!
//! `info` packs a magic, the block's state (free, live, or freed remotely and in transit), its
//! class, its distance from its span's start in 16-byte steps (so the span is found with one
//! subtraction) and a 22-bit field: the requested size of a live block, the label of a free one
//! (which thread cache holds it, for allocators that have them). The word just before the user
//! bytes (`back`) gives the distance back to the block start, plus the allocating process for
//! allocators that record it. A free block's second word links it into a list.
//!
//! A free finds an unpadded block's info word right below the user bytes (`user - 16`); padded
//! blocks (and large ones) have a zero there, so the free reads the back word instead. A live
//! padded block's second word is zero too, and a live unpadded one's never is (it holds the
//! back word or the owner's stamp), so the offset just past a padded block's info word, inside
//! its padding, is not taken for an unpadded block's user bytes. The padding up to the back
//! word is all zeroes, so no offset but a padded block's own user offset leads to it, however
//! the block was used before or whatever its user bytes hold.
//!
//! A span header is one cache line: magic and class, the owning heap, and the state only the
//! owning heap's thread writes (a free touches the block and this one line).
//!
//! [`Mem`] is the bounds-checked view every access goes through. Its hot-path checks are plain
//! comparisons returning `Option`; the `Error` saying what was wrong is built afterwards, off the
//! fast path ([`explain_free`]).

use crate::error::{Error, Result};
use crate::region::Region;
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::tagged_list::{decode, encode, storable, LinkStore};

use super::free_space::{FreeSpaceGuard, UNIT};
use super::size_class::{class_size, CLASS_COUNT, SMALL_MAX};

/// Header bytes before a small block's user bytes.
pub(crate) const SMALL_HEADER: u64 = 16;
/// Header bytes before a large block's user bytes.
pub(crate) const LARGE_HEADER: u64 = 32;
/// Bytes at the start of a span before its first block.
pub(crate) const SPAN_HEADER: u64 = 64;
/// The class number large blocks carry.
pub(crate) const LARGE_CLASS: usize = 255;
const MAX_BLOCKS: u64 = 4095;
const MIN_SPAN_UNITS: u64 = 16;
const SPAN_MAGIC: u32 = 0x5350_414E; // "SPAN"
/// The largest distance a back word may give: a 4096 alignment (a small block's header and
/// padding, or a large block's, fit below its user bytes within one alignment step).
pub(crate) const MAX_BACK: u64 = 4096;
const _: () = assert!((MAX_BACK - SMALL_HEADER) & 0xf == 0 && (MAX_BACK - SMALL_HEADER + 16).is_power_of_two());

const INFO_MAGIC: u64 = 0xB10C;
const STATE_SHIFT: u32 = 44;
const CLASS_SHIFT: u32 = 36;
const DIST_SHIFT: u32 = 22;
const DIST_BITS: u64 = 0x3fff << DIST_SHIFT;
/// The 22-bit field: a live block's size, a free block's label.
pub(crate) const FIELD_MASK: u64 = 0x3f_ffff;
/// The top bits of every live info word (magic and state): one compare checks both.
const LIVE_TAG: u64 = (INFO_MAGIC << 4) | State::Live as u64;
const STATE_BITS: u64 = 0xf << STATE_SHIFT;

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
    /// Live blocks: the requested size. Free blocks: a label (0 = none). Remote blocks: who
    /// freed them ([`remote_word`]).
    pub(crate) size: u64,
}

impl Info {
    /// The info word (for a small block, `index` must be below its class's block count).
    #[inline]
    pub(crate) fn pack(self) -> u64 {
        let dist = match LAYOUTS.get(self.class) {
            Some(l) => (SPAN_HEADER + self.index * l.stride) / 16,
            None => 0,
        };
        (INFO_MAGIC << 48)
            | ((self.state as u64) << STATE_SHIFT)
            | ((self.class as u64) << CLASS_SHIFT)
            | (dist << DIST_SHIFT)
            | self.size
    }

    /// The fields of an info word, or `None` if it is not one (bad magic, state or class, or a
    /// distance that is no block of the class).
    #[inline]
    pub(crate) fn unpack(word: u64) -> Option<Info> {
        if word >> 48 != INFO_MAGIC {
            return None;
        }
        let state = match (word >> STATE_SHIFT) & 0xf {
            1 => State::Free,
            2 => State::Live,
            3 => State::Remote,
            _ => return None,
        };
        let class = word_class(word);
        let index = match LAYOUTS.get(class) {
            Some(l) => {
                let rel = word_dist(word).checked_sub(SPAN_HEADER)?;
                if rel % l.stride != 0 || rel / l.stride >= l.blocks {
                    return None;
                }
                rel / l.stride
            }
            None if class == LARGE_CLASS && word_dist(word) == 0 => 0,
            None => return None,
        };
        Some(Info { state, class, index, size: word & FIELD_MASK })
    }

    #[inline]
    pub(crate) fn with_state(self, state: State) -> Info {
        Info { state, ..self }
    }
}

/// The info word of a free block of `class` labelled `label`, with its index bits cleared: a
/// free block's word, masked with [`free_word_mask`], equals it.
#[inline]
pub(crate) const fn free_pattern(class: usize, label: u64) -> u64 {
    (INFO_MAGIC << 48) | ((State::Free as u64) << STATE_SHIFT) | ((class as u64) << CLASS_SHIFT) | label
}

/// The bits of an info word [`free_pattern`] fixes (all but the distance).
#[inline]
pub(crate) const fn free_word_mask() -> u64 {
    !DIST_BITS
}

/// The distance in bytes from a block's span to the block, from its info word.
#[inline]
pub(crate) const fn word_dist(word: u64) -> u64 {
    ((word & DIST_BITS) >> DIST_SHIFT) << 4
}

/// The info word of block `index` of a span of `class`, free with `label`.
#[inline]
pub(crate) fn fresh_word(class: usize, index: u64, label: u64) -> u64 {
    free_pattern(class, label) | (((SPAN_HEADER + index * LAYOUTS[class].stride) / 16) << DIST_SHIFT)
}

/// The info word of a block turned live: `word` (a free block's) with its state and field
/// replaced.
#[inline]
pub(crate) const fn live_word(word: u64, size: u64) -> u64 {
    (word & !(STATE_BITS | FIELD_MASK)) | ((State::Live as u64) << STATE_SHIFT) | size
}

/// The info word of a live block turned free with `label`.
#[inline]
pub(crate) const fn freed_word(word: u64, label: u64) -> u64 {
    (word & !(STATE_BITS | FIELD_MASK)) | ((State::Free as u64) << STATE_SHIFT) | label
}

/// The info word of a live block turned remote by the freer named `freer` (an identity that
/// fits the 22-bit field; 0 = none): the freer's identity replaces the size in the word, so
/// the compare-and-swap that marks the block also says who marked it.
#[inline]
pub(crate) const fn remote_word(word: u64, freer: u64) -> u64 {
    (word & !(STATE_BITS | FIELD_MASK)) | ((State::Remote as u64) << STATE_SHIFT) | (freer & FIELD_MASK)
}

/// The info word of a free block handed out for `size` bytes, when `word` is known to be a
/// free info word with an empty field (it matched [`free_pattern`] with label 0): one addition.
#[inline]
pub(crate) const fn live_from_free(word: u64, size: u64) -> u64 {
    word + LIVE_DELTA + size
}

/// What turning a free info word live adds to it (besides the size), and turning a live one
/// free takes away (besides the size).
pub(crate) const LIVE_DELTA: u64 = ((State::Live as u64) - (State::Free as u64)) << STATE_SHIFT;

/// The info word of a live block freed with label 0, when `word` is known to be a live info
/// word ([`live_small_class`] took it).
#[inline]
pub(crate) const fn free_from_live(word: u64) -> u64 {
    (word & !FIELD_MASK) - LIVE_DELTA
}

/// The class of a live small block's info word `word`, or a value of `CLASS_COUNT` or more when
/// it is not one (bad magic or state, a large block): magic, state and class in one compare.
#[inline]
pub(crate) const fn live_small_class(word: u64) -> usize {
    ((word >> CLASS_SHIFT).wrapping_sub(LIVE_TAG << (STATE_SHIFT - CLASS_SHIFT))) as usize
}

/// Whether `word` is an info word (right magic) in state `state`.
#[inline]
pub(crate) const fn has_state(word: u64, state: State) -> bool {
    word >> STATE_SHIFT == (INFO_MAGIC << 4) | state as u64
}

/// The class bits of an info word.
#[inline]
pub(crate) const fn word_class(word: u64) -> usize {
    ((word >> CLASS_SHIFT) & 0xff) as usize
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
    /// Bytes per span (`units` whole units).
    pub(crate) span_bytes: u64,
    /// Bytes the blocks take, from the end of the span header (`blocks * stride`).
    pub(crate) area: u64,
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
    ClassLayout { size, stride, units: units as u32, blocks, span_bytes: units * UNIT, area: blocks * stride }
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

// Every block's distance from its span, in 16-byte steps, fits the info word's 14 bits.
const _: () = {
    let l = layouts();
    let mut c = 0;
    while c < CLASS_COUNT {
        assert!((SPAN_HEADER + (l[c].blocks - 1) * l[c].stride) / 16 < 1 << 14);
        c += 1;
    }
};

/// Entries of [`SMALL_CLASSES`]: one per 16 bytes up to [`SMALL_MAX`].
const TABLE_LEN: usize = SMALL_MAX / 16 + 1;

// Every entry names a class, so a class from the table indexes per-class arrays unchecked.
const _: () = {
    let t = small_classes();
    let mut i = 0;
    while i < TABLE_LEN {
        assert!((t[i] as usize) < CLASS_COUNT);
        i += 1;
    }
};

/// Every small request's class, by `(size + 15) / 16` (1 KiB: a lookup instead of a logarithm
/// on the fast path).
static SMALL_CLASSES: [u8; TABLE_LEN] = small_classes();

/// [`SMALL_CLASSES`] with each class times 64: the offset of the class's entry in an array of
/// cache lines (a heap's class lines, say), for a fast path that keeps the table next to its
/// other constants and so needs neither the class nor a shift.
#[derive(Clone, Copy)]
pub(crate) struct LineTable([u16; TABLE_LEN]);

impl LineTable {
    /// The table.
    pub(crate) const fn new() -> LineTable {
        let classes = small_classes();
        let mut out = [0u16; TABLE_LEN];
        let mut i = 0;
        while i < TABLE_LEN {
            out[i] = classes[i] as u16 * 64;
            i += 1;
        }
        LineTable(out)
    }

    /// [`quick_class`] times 64.
    #[inline]
    pub(crate) fn quick_line(&self, size: usize, align: usize) -> Option<usize> {
        let line = self.0[quick_index(size, align)?] as usize;
        // SAFETY: every entry is a class below CLASS_COUNT (checked at compile time above) times
        // 64, and a `LineTable` is made only by `new`.
        unsafe { core::hint::assert_unchecked(line < CLASS_COUNT * 64 && line % 64 == 0) };
        Some(line)
    }
}

const fn small_classes() -> [u8; TABLE_LEN] {
    let mut out = [0u8; TABLE_LEN];
    let mut i = 1;
    let mut c = 0;
    while i < TABLE_LEN {
        // The classes are sorted: the first whose size holds 16 * i bytes.
        while class_size(c) < i * 16 {
            c += 1;
        }
        out[i] = c as u8;
        i += 1;
    }
    out
}

/// The header of every span, one cache line.
#[repr(C, align(64))]
pub(crate) struct SpanHeader {
    /// The span's magic in the low half, its class in the high half (one compare checks both).
    /// Atomic: it is written when a span is carved or released, while other processes may
    /// read it to check a block they free.
    kind: AtomicU64,
    /// What owns the span (the thread-local allocator's heap offset; 0 in the page allocator).
    pub(crate) owner: AtomicU64,
    /// For allocators with per-thread heaps: blocks below this index have been handed out at
    /// least once (the ones above were never formatted). Only the owning heap's thread writes
    /// it (or a repairer holding the heap); anyone may read it (`check`), so it is atomic, used
    /// with relaxed loads and stores, which cost what plain ones do.
    bump: AtomicU32,
    _pad: u32,
}

const _: () = assert!(core::mem::size_of::<SpanHeader>() as u64 == SPAN_HEADER);

impl SpanHeader {
    /// The bump index (see the field): written by the owning heap's thread alone.
    #[inline]
    pub(crate) fn bump(&self) -> &AtomicU32 {
        &self.bump
    }
}

/// The `kind` word of a span of `class`.
#[inline]
const fn span_kind(class: usize) -> u64 {
    SPAN_MAGIC as u64 | ((class as u64) << 32)
}

/// A bounds-checked view of a region, cheap to copy into fast paths.
#[derive(Clone, Copy)]
pub(crate) struct Mem {
    base: *mut u8,
    start: u64,
    len: u64,
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
        let len = end.saturating_sub(start);
        if !region.contains(start, len) || len < SPAN_HEADER {
            return Err(Error::OutOfBounds { offset: start, len, region_len: region.end() });
        }
        Ok(Mem { base, start, len })
    }

    /// A view of `[start, start + len)` at `base` (offset 0), unchecked: for tests that need a
    /// view larger than they can map.
    ///
    /// # Safety
    /// Every offset read or written through the view lies in memory the caller owns.
    #[cfg(test)]
    pub(crate) unsafe fn raw(base: *mut u8, start: u64, len: u64) -> Mem {
        Mem { base, start, len }
    }

    /// Where the view starts.
    #[inline]
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// One past the view's end.
    #[inline]
    pub(crate) fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Whether `[offset, offset + len)` lies in the view: one subtraction and two comparisons.
    #[inline]
    pub(crate) fn contains(&self, offset: u64, len: u64) -> bool {
        len <= self.len && offset.wrapping_sub(self.start) <= self.len - len
    }

    /// The limit [`Mem::holds`] compares with for `len` bytes: one past the largest 16-aligned
    /// distance from the view's start at which `len` bytes still fit, in 16-byte steps (0, which
    /// nothing is below, when they never fit).
    pub(crate) fn limit_for(&self, len: u64) -> u64 {
        match self.len.checked_sub(len) {
            Some(room) => (room >> 4) + 1,
            None => 0,
        }
    }

    /// Whether `offset` is 16-aligned and the bytes `limit` was made for ([`Mem::limit_for`]) lie
    /// in the view from it, in one compare: rotating the distance from the view's start right by
    /// four moves a misalignment into the top bits, above any limit. The view must start
    /// 16-aligned (arenas start on units).
    #[inline]
    pub(crate) fn holds(&self, offset: u64, limit: u64) -> bool {
        debug_assert!(self.start % 16 == 0);
        offset.wrapping_sub(self.start).rotate_right(4) < limit
    }

    /// The address of `offset`, after checking `len` bytes from it lie in the view.
    #[inline]
    pub(crate) fn ptr(&self, offset: u64, len: u64) -> Result<*mut u8> {
        if !self.contains(offset, len) {
            return Err(out_of_bounds(offset, len, self.end()));
        }
        // SAFETY: in bounds of the mapping (checked), so the result stays in the allocation.
        Ok(unsafe { self.base.add(offset as usize) })
    }

    /// The address of `offset`, unchecked.
    ///
    /// # Safety
    /// `offset` lies in the view: the caller checked it earlier (the region stays mapped, so a
    /// checked offset stays valid).
    #[inline]
    pub(crate) unsafe fn addr(&self, offset: u64) -> *mut u8 {
        debug_assert!(self.contains(offset, 0));
        // SAFETY: the caller's promise.
        unsafe { self.base.add(offset as usize) }
    }

    /// The 8-aligned word at `offset`, as an atomic, or `None` out of bounds or misaligned.
    #[inline]
    pub(crate) fn word_at(&self, offset: u64) -> Option<&AtomicU64> {
        if offset % 8 != 0 || !self.contains(offset, 8) {
            return None;
        }
        // SAFETY: in bounds, 8-aligned (the base is page-aligned), and every word the allocators
        // keep state in is only accessed atomically; an AtomicU64 is valid for any bits.
        Some(unsafe { &*self.base.add(offset as usize).cast::<AtomicU64>() })
    }

    /// The 8-aligned word at `offset`, unchecked.
    ///
    /// # Safety
    /// `offset` is 8-aligned and `[offset, offset + 8)` lies in the view (checked earlier, e.g.
    /// as part of a span or block that was).
    #[inline]
    pub(crate) unsafe fn word_unchecked(&self, offset: u64) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && self.contains(offset, 8));
        // SAFETY: the caller's promise; see `word_at` for the rest.
        unsafe { &*self.base.add(offset as usize).cast::<AtomicU64>() }
    }

    /// The 8-aligned word at `offset`, as an atomic.
    #[inline]
    pub(crate) fn word(&self, offset: u64) -> Result<&AtomicU64> {
        match self.word_at(offset) {
            Some(w) => Ok(w),
            None if offset % 8 != 0 => Err(Error::InvalidAlignment { align: offset % 8 }),
            None => Err(out_of_bounds(offset, 8, self.end())),
        }
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

    /// The span header at `span`, if `span` is a unit-aligned offset in the view whose header
    /// has a span's magic.
    #[inline]
    pub(crate) fn span_at(&self, span: u64) -> Option<&SpanHeader> {
        if span % UNIT != 0 || !self.contains(span, SPAN_HEADER) {
            return None;
        }
        // SAFETY: in bounds and 64-aligned (unit-aligned offset, page-aligned base); a
        // SpanHeader is atomics and an integer, valid for any bits.
        let h = unsafe { &*self.base.add(span as usize).cast::<SpanHeader>() };
        (h.kind.load(Ordering::Relaxed) as u32 == SPAN_MAGIC).then_some(h)
    }

    /// The span header at `span` if the whole span of `class` lies in the view and its header
    /// has a span's magic and that class: after this, every block of the span is in bounds.
    #[inline]
    pub(crate) fn class_span(&self, span: u64, class: usize) -> Option<&SpanHeader> {
        let room = self.len.checked_sub(LAYOUTS.get(class)?.span_bytes)?;
        if span.wrapping_sub(self.start) > room || span % 64 != 0 {
            return None;
        }
        // SAFETY: the whole span is in bounds and 64-aligned (checked above; the base is
        // page-aligned); a SpanHeader is valid for any bits. (Spans start on units; an offset
        // that does not is refused by the kind compare unless the bytes there mimic a header,
        // which only a writer of the region's memory could arrange, and which stays in bounds.)
        let h = unsafe { &*self.base.add(span as usize).cast::<SpanHeader>() };
        (h.kind.load(Ordering::Relaxed) == span_kind(class)).then_some(h)
    }

    /// The header of the span at `span` holding the block at `block` (checked in bounds by the
    /// caller), if the span starts in the view, at least a header below the block, 64-aligned,
    /// with a span's magic and `class`: then the header and the block are in bounds, which is
    /// all a free writes.
    #[inline]
    pub(crate) fn span_below(&self, span: u64, block: u64, class: usize) -> Option<&SpanHeader> {
        if span.wrapping_sub(self.start) > block.wrapping_sub(self.start).wrapping_sub(SPAN_HEADER) || span % 64 != 0 {
            return None;
        }
        // SAFETY: `start <= span` and `span + 128 <= block`, inside the view (checked above and by
        // the caller), 64-aligned; a SpanHeader is valid for any bits.
        let h = unsafe { &*self.base.add(span as usize).cast::<SpanHeader>() };
        (h.kind.load(Ordering::Relaxed) == span_kind(class)).then_some(h)
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
        if let Some(w) = self.word_at(offset.wrapping_add(8)) {
            w.store(encode(next), Ordering::Relaxed);
        }
    }
}

#[cold]
fn out_of_bounds(offset: u64, len: u64, region_len: u64) -> Error {
    Error::OutOfBounds { offset, len, region_len }
}

#[cold]
pub(crate) fn corrupt(offset: u64, detail: &'static str) -> Error {
    Error::Corrupt { structure: "span allocator", offset, detail }
}

#[cold]
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
    // SAFETY: as above. The magic goes in last, so a span is never seen with a magic and a stale
    // owner.
    unsafe {
        (*p).owner.store(owner, Ordering::Relaxed);
        (*p).bump.store(0, Ordering::Relaxed);
        crate::crash::point();
        core::sync::atomic::compiler_fence(Ordering::Release);
        (*p).kind.store(span_kind(class), Ordering::Relaxed);
    }
    Ok(())
}

/// Returns the span at `span` to the free-space manager, its header's magic cleared first. A
/// recovery takes a span run with a header for a whole span (the header is written last when a
/// span is carved), so none may be left behind: a carver that took the run again and died
/// before writing its own would leave the stale header, and the stale blocks under it, looking
/// whole.
///
/// # Safety
/// The span is no one's: all its blocks are free and on no list or cache, and the caller holds
/// the free-space lock `g`.
pub(crate) unsafe fn release_span(g: &mut FreeSpaceGuard<'_>, mem: &Mem, span: u64) -> Result<()> {
    let head = g.layout().unit_of(span).ok_or(corrupt(span, "span outside the arena"))?;
    if let Some(h) = mem.span_at(span) {
        h.kind.store(0, Ordering::Relaxed);
    }
    // The clear before the run's descriptors change (a release fence keeps it before the
    // stores that follow).
    core::sync::atomic::compiler_fence(Ordering::Release);
    crate::crash::point();
    g.free(head)
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

/// The span a small block belongs to, from its raw info word (its class's span must then be
/// checked with [`Mem::class_span`] or [`Mem::span_below`]).
#[inline]
pub(crate) fn span_of_word(block: u64, word: u64) -> u64 {
    block.wrapping_sub(word_dist(word))
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

/// A live small block found from a user offset, with every check done.
#[derive(Clone, Copy)]
pub(crate) struct LiveSmall<'m> {
    /// The block's start.
    pub(crate) block: u64,
    /// Its info word (live).
    pub(crate) word: u64,
    /// Its span's header (the span starts in the view, below the block, with the block's class).
    pub(crate) header: &'m SpanHeader,
}

impl LiveSmall<'_> {
    /// The block's class.
    #[inline]
    pub(crate) fn class(&self) -> usize {
        word_class(self.word)
    }

    /// The requested size.
    #[inline]
    pub(crate) fn size(&self) -> u64 {
        self.word & FIELD_MASK
    }

    /// The requested size, checked to fit the user bytes from `user` (the block's user offset)
    /// to the block's end: it is shared memory, and callers read or copy that many bytes from
    /// `user` (a padded block holds fewer than its class's size).
    pub(crate) fn user_size(&self, user: u64) -> Result<u64> {
        let size = self.size();
        let room = (self.block + LAYOUTS[self.class()].stride).saturating_sub(user);
        if size == 0 || size > room {
            return Err(corrupt(self.block, "small block size outside its block"));
        }
        Ok(size)
    }

    /// The info word unpacked.
    pub(crate) fn info(&self) -> Info {
        let rel = word_dist(self.word) - SPAN_HEADER;
        Info { state: State::Live, class: self.class(), index: rel / LAYOUTS[self.class()].stride, size: self.size() }
    }
}

/// A live block found from a user offset.
#[derive(Clone, Copy)]
pub(crate) enum Found<'m> {
    /// A small block.
    Small(LiveSmall<'m>),
    /// A large block: its start (its run is checked under the free-space lock).
    Large { block: u64 },
}

/// The live unpadded small block whose user bytes start at `user` (the common case): its info
/// word is right below them, a live info word whose span, below the block, has the block's
/// class, and its second word is not zero (a padded block's is). `None` for anything else,
/// which [`find_live`] then sorts out.
#[inline]
pub(crate) fn find_small(mem: &Mem, user: u64) -> Option<LiveSmall<'_>> {
    let block = user.wrapping_sub(SMALL_HEADER);
    if user % 16 != 0 || block.wrapping_sub(mem.start) > mem.len - SMALL_HEADER {
        return None;
    }
    // SAFETY: `[block, block + 16)` is in bounds (checked just above), 16-aligned.
    let (info, second) = unsafe { (mem.word_unchecked(block), mem.word_unchecked(block + 8)) };
    let word = info.load(Ordering::Acquire);
    if word >> STATE_SHIFT != LIVE_TAG || word_class(word) >= CLASS_COUNT || second.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let span = span_of_word(block, word);
    let header = mem.span_below(span, block, word_class(word))?;
    Some(LiveSmall { block, word, header })
}

/// The live block whose user bytes start at `user`: [`find_small`], or else through the back
/// word (padded small blocks, large blocks). `None` on anything else; [`explain_free`] then
/// says what.
#[inline(never)]
pub(crate) fn find_live(mem: &Mem, user: u64) -> Option<Found<'_>> {
    match find_small(mem, user) {
        Some(b) => Some(Found::Small(b)),
        None => find_live_back(mem, user),
    }
}

/// [`find_live`] through the back word: padded small blocks and large blocks.
fn find_live_back(mem: &Mem, user: u64) -> Option<Found<'_>> {
    if user % 16 != 0 || user.wrapping_sub(8).wrapping_sub(mem.start) > mem.len - 8 {
        return None;
    }
    // SAFETY: in bounds (checked just above) and 8-aligned.
    let back = unsafe { mem.word_unchecked(user - 8) }.load(Ordering::Relaxed) & 0xffff;
    // 32..=4096 in steps of 16, in one test (16 would be unpadded, handled by the caller).
    if back.wrapping_sub(SMALL_HEADER) & !(MAX_BACK - SMALL_HEADER) != 0 || back == SMALL_HEADER {
        return None;
    }
    let block = user - back;
    if block.wrapping_sub(mem.start) > mem.len - SMALL_HEADER {
        return None;
    }
    // SAFETY: in bounds (checked just above), 16-aligned.
    let word = unsafe { mem.word_unchecked(block) }.load(Ordering::Acquire);
    if word >> STATE_SHIFT != LIVE_TAG {
        return None;
    }
    // The word after the header is a block's back word if its user bytes follow the header
    // (its low bits the header's size), and zero if they are padded: an unpadded block has one
    // user offset, and the back word that led here lies in its user bytes.
    let class = word_class(word);
    let header_size = if class == LARGE_CLASS { LARGE_HEADER } else { SMALL_HEADER };
    // SAFETY: `block + header_size <= user - 8`, in bounds (checked above), 8-aligned.
    let first = unsafe { mem.word_unchecked(block + header_size - 8) }.load(Ordering::Relaxed);
    if first != 0 && back != header_size {
        return None;
    }
    if first == 0 && !lowest_back_word(mem, block, back) {
        return None;
    }
    if class == LARGE_CLASS {
        return (back >= LARGE_HEADER).then_some(Found::Large { block });
    }
    // A class past the table (its 8 bits hold up to 254 here) is no small block's, though a
    // header forged in a caller's data may carry it: refused before anything indexes by it.
    let l = LAYOUTS.get(class)?;
    let span = span_of_word(block, word);
    let header = mem.span_below(span, block, class)?;
    // The user bytes lie in the block.
    (back < l.stride).then_some(Found::Small(LiveSmall { block, word, header }))
}

/// Whether no word of a padded block's padding below the back word `back` bytes in (which
/// [`zero_padding`] cleared when the block was handed out) looks like a back word for its own
/// position: the block's user offset is then the lowest one a back word leads to. An offset
/// further in (past a word of the caller's data that looks like a back word) is not the
/// block's, nor is a stale one from an earlier use of the block (a padded block freed and handed
/// out again with another alignment leaves its back word behind, or in the new user bytes).
/// `[block, block + back)` lies in `mem`.
fn lowest_back_word(mem: &Mem, block: u64, back: u64) -> bool {
    (2 * SMALL_HEADER..back).step_by(16).all(|d| {
        // SAFETY: `block + 24 <= block + d - 8 < block + back`, in bounds (the caller's
        // promise), 8-aligned.
        unsafe { mem.word_unchecked(block + d - 8) }.load(Ordering::Relaxed) & 0xffff != d
    })
}

/// Zeroes the padding of a block handed out with its user bytes at `user`, past a header of
/// `header` bytes: every word from the header's end to below the back word (`user - 8`), so
/// that [`find_live`] takes no offset but `user` for the block (see [`lowest_back_word`]). Cold:
/// padded requests are rare, and the quick paths serve none.
///
/// # Safety
/// `[block, user)` lies in `mem`, 8-aligned, and is the caller's to write (a block it is
/// handing out).
#[cold]
#[inline(never)]
pub(crate) unsafe fn zero_padding(mem: &Mem, block: u64, header: u64, user: u64) {
    let mut at = block + header;
    while at < user.saturating_sub(8) {
        // SAFETY: the caller's promise.
        unsafe { mem.word_unchecked(at) }.store(0, Ordering::Relaxed);
        at += 8;
    }
}

/// Why [`find_live`] refused `user`.
#[cold]
#[inline(never)]
pub(crate) fn explain_free(mem: &Mem, user: u64) -> Error {
    let foreign = invalid(user, "not an offset this allocator gave out");
    if user % 16 != 0 {
        return foreign;
    }
    let below = mem.word_at(user.wrapping_sub(SMALL_HEADER)).map(|w| w.load(Ordering::Acquire));
    if below.and_then(Info::unpack).is_some_and(|i| i.state != State::Live) {
        return invalid(user, "already freed");
    }
    let Some(w) = mem.word_at(user.wrapping_sub(8)) else {
        return out_of_bounds(user, 0, mem.end());
    };
    let back = w.load(Ordering::Relaxed) & 0xffff;
    if back.wrapping_sub(SMALL_HEADER) & !(MAX_BACK - SMALL_HEADER) != 0 {
        return foreign;
    }
    let block = user.wrapping_sub(back);
    let Some(info) = mem.word_at(block).and_then(|w| Info::unpack(w.load(Ordering::Acquire))) else {
        return foreign;
    };
    if info.state != State::Live {
        return invalid(user, "already freed");
    }
    if info.class == LARGE_CLASS {
        return foreign;
    }
    invalid(user, "not a block of this allocator")
}

/// The live block at `user`, or the error saying why not.
#[inline]
pub(crate) fn live_block(mem: &Mem, user: u64) -> Result<Found<'_>> {
    match find_live(mem, user) {
        Some(f) => Ok(f),
        None => Err(explain_free(mem, user)),
    }
}

/// The second half of a reallocation that cannot stay in place: a new block from `alloc`, the
/// common prefix copied from the block at `ptr` (of `old_size` bytes, in `mem`), the old block
/// freed. The old size comes from shared memory: if the copy it asks for is refused, or the old
/// block's free fails (damage, or a racing free of it), the new block goes back and the old one
/// stays (a failed free freed nothing).
pub(crate) fn move_block(
    alloc: &dyn crate::allocator::RegionAllocator,
    mem: &Mem,
    ptr: crate::ptr::OffsetPtr,
    old_size: u64,
    new_size: usize,
    align: usize,
) -> Result<crate::ptr::OffsetPtr> {
    let new = alloc.allocate(new_size, align)?;
    if let Err(e) = mem.copy(ptr.get(), new.get(), old_size.min(new_size as u64)) {
        let _ = alloc.free(new);
        return Err(e);
    }
    if let Err(e) = alloc.free(ptr) {
        let _ = alloc.free(new);
        return Err(e);
    }
    Ok(new)
}

/// How many user bytes the live small block at `block` of `class` holds: from its user offset to
/// its end, what [`LiveSmall::user_size`] bounds its size field by (for walks over the blocks).
/// The user bytes follow the header unless the block is padded: its second word is then zero
/// (see [`find_live`]) and its back word says where they start ([`user_of_live`]).
pub(crate) fn live_user_bytes(mem: &Mem, block: u64, class: usize) -> Result<u64> {
    let stride = LAYOUTS.get(class).ok_or_else(|| corrupt(block, "block class"))?.stride;
    let user = match mem.word(block + 8)?.load(Ordering::Relaxed) {
        0 => user_of_live(mem, block, class)?,
        _ => block + SMALL_HEADER,
    };
    Ok(block + stride - user)
}

/// The user offset of the live small block at `block`: where its back word points from. For
/// unpadded blocks that is the block's second word; padded blocks have their back word further
/// in, at a 16-byte step, so the block's candidate positions are scanned.
pub(crate) fn user_of_live(mem: &Mem, block: u64, class: usize) -> Result<u64> {
    let stride = LAYOUTS.get(class).ok_or_else(|| corrupt(block, "block class"))?.stride;
    let mut user = block + SMALL_HEADER;
    while user < block + stride {
        let w = mem.word(user - 8)?.load(Ordering::Relaxed);
        if w & 0xffff == user - block {
            return Ok(user);
        }
        user += 16;
    }
    Err(corrupt(block, "live block without a back word"))
}

/// The class of a request that is small and plainly aligned (alignment up to 16, size
/// 1..=[`SMALL_MAX`]): the common case, validated in a few instructions. `None` sends the
/// caller to the full path ([`check_request`](super::check_request), [`class_for`]).
#[inline]
pub(crate) fn quick_class(size: usize, align: usize) -> Option<usize> {
    let class = SMALL_CLASSES[quick_index(size, align)?] as usize;
    // SAFETY: every entry of the table is below CLASS_COUNT (checked at compile time above).
    unsafe { core::hint::assert_unchecked(class < CLASS_COUNT) };
    Some(class)
}

// `quick_index`'s one compare on `(size - 1) / 16` is the range check only for these.
const _: () = assert!(SMALL_MAX % 16 == 0);

/// The class-table index of a request [`quick_class`] takes (`size.div_ceil(16)`), else `None`.
#[inline]
fn quick_index(size: usize, align: usize) -> Option<usize> {
    // Bits 1, 2, 4, 8 and 16: the powers of two up to 16.
    if align > 16 || (0x10116u32 >> align) & 1 == 0 {
        return None;
    }
    // 1..=SMALL_MAX in one compare (0 wraps past it), on `(size - 1) / 16`, which is
    // `size.div_ceil(16) - 1`.
    let index = size.wrapping_sub(1) / 16;
    if index >= SMALL_MAX / 16 {
        return None;
    }
    Some(index + 1)
}

/// The smallest class whose blocks fit `size` bytes at alignment `align` (padding included),
/// or `None` if the request is large.
#[inline]
pub(crate) fn class_for(size: usize, align: usize) -> Option<usize> {
    let need = if align <= 16 { size } else { size.checked_add(align - 16)? };
    (need <= SMALL_MAX).then(|| SMALL_CLASSES[need.div_ceil(16)] as usize)
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
        let last = LAYOUTS[17].blocks - 1;
        let i = Info { state: State::Live, class: 17, index: last, size: 12345 };
        assert_eq!(Info::unpack(i.pack()), Some(i));
        assert_eq!(Info::unpack(0), None);
        assert_eq!(Info::unpack(i.pack() ^ (1 << 60)), None);
        assert_eq!(Info::unpack(i.pack() + (1 << DIST_SHIFT)), None, "a distance between blocks");
        assert_eq!(span_of_word(1 << 20, i.pack()), (1 << 20) - SPAN_HEADER - last * LAYOUTS[17].stride);
        let free = Info { state: State::Free, class: 17, index: last, size: 9 };
        assert_eq!(fresh_word(17, last, 9), free.pack());
        assert_eq!(free.pack() & free_word_mask(), free_pattern(17, 9));
        assert_eq!(Info::unpack(live_word(free.pack(), 77)), Some(Info { state: State::Live, size: 77, ..free }));
        assert_eq!(Info::unpack(freed_word(i.pack(), 3)), Some(Info { state: State::Free, size: 3, ..i }));
    }

    #[test]
    fn live_small_class_takes_only_live_small_words() {
        let live = Info { state: State::Live, class: 17, index: 3, size: 40 }.pack();
        assert_eq!(live_small_class(live), 17);
        assert!(live_small_class(freed_word(live, 0)) >= CLASS_COUNT);
        assert!(live_small_class(Info { state: State::Remote, ..Info::unpack(live).unwrap() }.pack()) >= CLASS_COUNT);
        assert!(
            live_small_class(Info { state: State::Live, class: LARGE_CLASS, index: 0, size: 1 }.pack()) >= CLASS_COUNT
        );
        assert!(live_small_class(live ^ (1 << 60)) >= CLASS_COUNT);
        assert!(live_small_class(0) >= CLASS_COUNT);
    }

    #[test]
    fn holds_is_an_aligned_bounds_check() {
        let mut bytes = alloc::vec![0u128; 64];
        let mem = Mem { base: bytes.as_mut_ptr().cast(), start: 256, len: 512 };
        let limit = mem.limit_for(48);
        for offset in 0..1024u64 {
            let expect = offset % 16 == 0 && offset >= 256 && offset + 48 <= 768;
            assert_eq!(mem.holds(offset, limit), expect, "{offset}");
        }
        assert!(!mem.holds(256, mem.limit_for(513)));
        assert!(!mem.holds(u64::MAX - 15, limit));
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

    #[test]
    fn the_quick_path_takes_only_plain_small_requests() {
        for align in 0usize..40 {
            for size in [0, 1, 15, 16, 17, 1000, 1024, 1025, 4000, SMALL_MAX, SMALL_MAX + 1, usize::MAX] {
                let plain = align.is_power_of_two() && align <= 16 && (1..=SMALL_MAX).contains(&size);
                assert_eq!(quick_class(size, align).is_some(), plain, "{size} {align}");
                if plain {
                    assert_eq!(quick_class(size, align), class_for(size, align));
                }
            }
        }
    }

    #[test]
    fn the_class_table_agrees_with_the_formula() {
        for size in 1..=SMALL_MAX + 1 {
            for align in [1, 8, 16, 32, 256] {
                let need = if align <= 16 { size } else { size + align - 16 };
                assert_eq!(class_for(size, align), super::super::size_class::class_of(need), "{size} {align}");
                if align <= 16 {
                    assert_eq!(quick_class(size, align), class_for(size, align), "{size} {align}");
                }
            }
        }
    }
}
