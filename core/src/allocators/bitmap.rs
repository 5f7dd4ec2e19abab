//! [`BitmapAllocator`]: power-of-two blocks claimed by bit without a lock, the heap GPU kernels
//! share with the CPU.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use super::{align_up, check_request, header_at};
use crate::allocator::{AllocStats, AllocatorType, RegionAllocator};
use crate::error::{Error, Result};
use crate::ptr::{AllocatorId, OffsetPtr};
use crate::region::{Region, MAX_ALIGN};
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::bits::{bit_is_set, claim_bit, release_bit};

const TYPE_ID: u32 = 0x424D_5031; // "BMP1"
/// The first word of a bitmap allocator's header.
pub const BITMAP_MAGIC: u64 = u64::from_le_bytes(*b"HMBITMAP");
/// The most classes one bitmap allocator has.
pub const MAX_CLASSES: usize = 32;
/// The smallest block size (also the smallest alignment every block has).
pub const MIN_BLOCK: usize = 16;
/// The largest block size: a block's requested size is kept in 32 bits.
pub const MAX_BLOCK: usize = 1 << 31;

/// How a [`BitmapAllocator`] splits its region: one class per power of two from `min_block` to
/// `max_block`, each with an equal share of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapConfig {
    /// The smallest block size: a power of two of at least [`MIN_BLOCK`].
    pub min_block: usize,
    /// The largest block size (and so the largest request): a power of two of at least
    /// `min_block` and at most [`MAX_BLOCK`], with at most [`MAX_CLASSES`] classes in all.
    pub max_block: usize,
}

impl Default for BitmapConfig {
    fn default() -> Self {
        BitmapConfig { min_block: 16, max_block: 64 << 10 }
    }
}

impl BitmapConfig {
    /// The block sizes, smallest first, or the reason the configuration is refused.
    fn block_sizes(&self) -> Result<Vec<u64>> {
        let bad = |reason| Err(Error::InvalidSize { size: self.max_block as u64, reason });
        let (min, max) = (self.min_block, self.max_block);
        if !min.is_power_of_two() || min < MIN_BLOCK {
            return bad("the smallest block must be a power of two of at least 16");
        }
        if !max.is_power_of_two() || max < min || max > MAX_BLOCK {
            return bad("the largest block must be a power of two from the smallest to 2^31");
        }
        let count = (max.trailing_zeros() - min.trailing_zeros() + 1) as usize;
        if count > MAX_CLASSES {
            return bad("more than 32 block classes");
        }
        Ok((0..count).map(|i| (min as u64) << i).collect())
    }
}

/// One class as the region holds it: 128 bytes, the first line written once at creation, the
/// second updated by every allocation and free. Offsets are from the backend's start.
#[repr(C)]
#[derive(Debug)]
pub struct ClassRecord {
    /// Bytes per block (a power of two).
    pub block_size: u64,
    /// Blocks in the class.
    pub blocks: u64,
    /// Where the bitmap starts: `blocks.div_ceil(64)` words; bits past the last block are set.
    pub bitmap: u64,
    /// Where the requested sizes start: one `u32` per block.
    pub sizes: u64,
    /// Where the first block starts, aligned to `min(block_size, 4096)`.
    pub data: u64,
    _pad0: [u64; 3],
    /// The bitmap word the class last served from (where the next search starts).
    pub hint: AtomicU64,
    /// Allocations served since creation (less `frees`: the blocks in use).
    pub allocations: AtomicU64,
    /// Frees since creation.
    pub frees: AtomicU64,
    /// The most blocks that have been in use at once.
    pub peak: AtomicU64,
    _pad1: [u64; 4],
}

impl ClassRecord {
    /// `[block_size, blocks, bitmap, sizes, data]`, each read once with one atomic load: the
    /// compiler may neither read a field again later nor tear it, whatever another process
    /// writes meanwhile.
    fn fixed_fields(&self) -> [u64; 5] {
        [&self.block_size, &self.blocks, &self.bitmap, &self.sizes, &self.data].map(|field| {
            // SAFETY: a live u64 of the header, 8-aligned (the header is, checked by `header_at`,
            // and each field is at a multiple of 8 in it), so valid for an atomic; this process
            // writes it only in `create`, before anyone reads it.
            unsafe { core::sync::atomic::AtomicU64::from_ptr(core::ptr::from_ref(field).cast_mut()) }
                .load(core::sync::atomic::Ordering::Relaxed)
        })
    }
}

/// The header at the start of a bitmap allocator's region (4160 bytes).
#[repr(C)]
#[derive(Debug)]
pub struct BitmapHeader {
    /// [`BITMAP_MAGIC`].
    pub magic: u64,
    /// The allocator type's id (`BMP1`).
    pub type_id: u32,
    /// Classes in use in `classes`.
    pub class_count: u32,
    /// The allocator's id.
    pub id: AllocatorId,
    /// The region this header describes, from the backend's start.
    pub region_offset: u64,
    /// The region's length.
    pub region_len: u64,
    _pad: [u64; 3],
    /// The classes, smallest blocks first.
    pub classes: [ClassRecord; MAX_CLASSES],
}

const _: () = assert!(core::mem::size_of::<ClassRecord>() == 128);
const _: () = assert!(core::mem::offset_of!(ClassRecord, hint) == 64);
const _: () = assert!(core::mem::offset_of!(BitmapHeader, classes) == 64);
const _: () = assert!(core::mem::size_of::<BitmapHeader>() == 64 + 128 * MAX_CLASSES);

/// A class as this process uses it: the immutable fields copied and checked once (at create or
/// attach), and pointers to the bitmap, the sizes and the counters.
struct Class {
    size: u64,
    shift: u32,
    blocks: u64,
    data: u64,
    /// Where the bitmap and the sizes start (the record's fields, as checked).
    bitmap: u64,
    sizes_at: u64,
    words: NonNull<AtomicU64>,
    word_count: usize,
    sizes: NonNull<AtomicU32>,
    record: NonNull<ClassRecord>,
}

impl Class {
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `words` points to `word_count` aligned words inside the region, checked when
        // the class was read; the allocator keeps the region mapped, and they are only ever
        // accessed through atomics.
        unsafe { core::slice::from_raw_parts(self.words.as_ptr(), self.word_count) }
    }

    /// The requested size of block `index` (below `blocks`).
    fn size_slot(&self, index: u64) -> &AtomicU32 {
        debug_assert!(index < self.blocks);
        // SAFETY: `sizes` points to `blocks` aligned `u32`s inside the region (checked when the
        // class was read), and `index < blocks` (every caller has checked it).
        unsafe { &*self.sizes.as_ptr().add(index as usize) }
    }

    fn record(&self) -> &ClassRecord {
        // SAFETY: the record lies in the header, inside the region (checked when the class was
        // read); its fields that change are atomics.
        unsafe { self.record.as_ref() }
    }

    fn end(&self) -> u64 {
        self.data + (self.blocks << self.shift)
    }
}

/// Blocks of power-of-two classes, one bit each, claimed without a lock; the allocator that CPU
/// threads, CPU processes and GPU kernels share.
///
/// The region is split into classes of equal share (16 B to 64 KiB blocks by default). Each class
/// has a bitmap (a set bit is a block in use), an array of the sizes its blocks were asked with,
/// and its blocks. An allocation takes the smallest class whose blocks hold the request and
/// claims a clear bit there with one atomic or ([`claim_bit`]), starting at the word the class
/// last served from; a full class passes the request to the next larger one. A free finds the
/// class from the offset and clears the bit with one atomic and ([`release_bit`]); a bit that was
/// not set is a double free, refused even when two threads free one block at the same instant.
///
/// No lock, no pointer: the whole state is in the region as offsets, so a kernel can run the same
/// two steps on the same memory. `gpu/include/hetmem_bitmap.h` in hetmem-gpu is the C twin of
/// this allocator for CUDA and HIP kernels, with the same `#[repr(C)]` layout ([`BitmapHeader`],
/// [`ClassRecord`]); a test compiles it with the host C compiler and checks sizes and offsets,
/// and another has a C program and this allocator share one heap.
///
/// The price of the design: blocks are powers of two (a request is rounded up, at most doubled),
/// each class is a fixed share of the region, and a search of a nearly full class reads its
/// bitmap. Blocks a killed process held stay allocated (blocks record no owner).
///
/// An operation makes two atomic read-modify-writes: its bit, and its class's allocation or free
/// count (a new peak adds a third, seldom). What else [`stats`](BitmapAllocator::stats) reports
/// is worked out when asked: blocks in use from the counts, requested bytes from the bitmaps and
/// the sizes (a walk of the bitmaps), so figures taken while others allocate may mix moments.
/// Its `high_watermark` is the sum of each class's peak: the true peak when one class is used,
/// and never less than it. [`check`](BitmapAllocator::check) compares the counts with the bitmaps
/// and must run while no one allocates or frees.
pub struct BitmapAllocator {
    region: Region,
    id: AllocatorId,
    header: NonNull<BitmapHeader>,
    classes: Box<[Class]>,
}

// SAFETY: the pointers point into the region, which `region` keeps mapped for the allocator's
// life; everything reached through them that changes is an atomic, so shared use from any thread
// is as sound as from one.
unsafe impl Send for BitmapAllocator {}
// SAFETY: as for `Send`.
unsafe impl Sync for BitmapAllocator {}

/// The error for a broken invariant at `offset`.
fn corrupt(offset: u64, detail: &'static str) -> Error {
    Error::Corrupt { structure: "bitmap allocator", offset, detail }
}

/// Where one class's parts go in a region being created.
struct Placement {
    size: u64,
    blocks: u64,
    bitmap: u64,
    sizes: u64,
    data: u64,
    end: u64,
}

/// Lays out a class of `size`-byte blocks from `start`, with as many blocks as fit before
/// `limit`.
fn place(size: u64, start: u64, limit: u64) -> Placement {
    let lay = |blocks: u64| {
        let bitmap = align_up(start, 8)?;
        let sizes = bitmap.checked_add(blocks.div_ceil(64) * 8)?;
        let data = align_up(sizes.checked_add(blocks * 4)?, size.min(MAX_ALIGN as u64))?;
        let end = data.checked_add(blocks.checked_mul(size)?)?;
        (end <= limit).then_some(Placement { size, blocks, bitmap, sizes, data, end })
    };
    // A first guess from the bytes per block (the block, its size word and its bit), less the
    // worst padding; then fewer until the layout fits.
    let room = limit.saturating_sub(start).saturating_sub(size.min(MAX_ALIGN as u64) + 16);
    let mut blocks = room.saturating_mul(8) / (8 * size + 33);
    loop {
        if let Some(p) = lay(blocks) {
            return p;
        }
        if blocks == 0 {
            return Placement { size, blocks: 0, bitmap: start, sizes: start, data: start, end: start };
        }
        blocks -= 1;
    }
}

impl BitmapAllocator {
    /// The header in the region.
    fn header(&self) -> &BitmapHeader {
        // SAFETY: checked in bounds and aligned when the allocator was made; the region stays
        // mapped; its changing fields are atomics.
        unsafe { self.header.as_ref() }
    }

    /// Reads and checks the class table of `header` (in `region`): every part of every class
    /// inside the region after the header, aligned, classes in order and apart.
    fn read_classes(region: &Region, header: &BitmapHeader) -> Result<Box<[Class]>> {
        // SAFETY: a live u32 of the header, 4-aligned (the header is 8-aligned, checked by
        // `header_at`); one atomic load, so the count checked is the count used.
        let count =
            unsafe { core::sync::atomic::AtomicU32::from_ptr(core::ptr::from_ref(&header.class_count).cast_mut()) }
                .load(core::sync::atomic::Ordering::Relaxed) as usize;
        if count == 0 || count > MAX_CLASSES {
            return Err(corrupt(region.offset(), "class count out of range"));
        }
        let mut floor = region.offset() + core::mem::size_of::<BitmapHeader>() as u64;
        let mut out = Vec::with_capacity(count);
        for (i, r) in header.classes[..count].iter().enumerate() {
            let at = region.offset() + core::mem::offset_of!(BitmapHeader, classes) as u64 + 128 * i as u64;
            // Another process may write the record while it is read: each field is read once,
            // and what is checked below is what the class keeps.
            let [size, blocks, bitmap, sizes_at, data_at] = r.fixed_fields();
            if !size.is_power_of_two() || size < MIN_BLOCK as u64 || size > MAX_BLOCK as u64 {
                return Err(corrupt(at, "block size not a power of two from 16 to 2^31"));
            }
            if out.last().is_some_and(|c: &Class| c.size >= size) {
                return Err(corrupt(at, "classes not in ascending block size"));
            }
            let word_count = blocks.div_ceil(64);
            let parts = [(bitmap, word_count.checked_mul(8), 8), (sizes_at, blocks.checked_mul(4), 4)];
            let data = (data_at, blocks.checked_mul(size), size.min(MAX_ALIGN as u64));
            let mut words = NonNull::dangling();
            let mut sizes = NonNull::dangling();
            for (k, (offset, len, align)) in parts.into_iter().chain([data]).enumerate() {
                let len = len.ok_or(corrupt(at, "class too large"))?;
                // An empty class's data needs no alignment (it has no blocks); the bitmap and
                // the sizes always do, as slices are made of them.
                let misaligned = offset % align != 0 && (k < 2 || len > 0);
                if offset < floor || misaligned || !region.contains(offset, len) {
                    return Err(corrupt(at, "class parts overlap, are misaligned or leave the region"));
                }
                floor = offset + len;
                let ptr = region.ptr(offset, len)?;
                match k {
                    0 => words = NonNull::new(ptr.cast()).ok_or(corrupt(at, "null bitmap"))?,
                    1 => sizes = NonNull::new(ptr.cast()).ok_or(corrupt(at, "null sizes"))?,
                    _ => {}
                }
            }
            out.push(Class {
                size,
                shift: size.trailing_zeros(),
                blocks,
                data: data_at,
                bitmap,
                sizes_at,
                words,
                word_count: usize::try_from(word_count).map_err(|_| corrupt(at, "class too large"))?,
                sizes,
                record: NonNull::from(r),
            });
        }
        Ok(out.into_boxed_slice())
    }

    fn open(region: Region, id: AllocatorId) -> Result<Self> {
        // SAFETY: the header holds integers and atomics only (valid for any bytes); everything
        // read from it is checked before use.
        let header = unsafe { header_at::<BitmapHeader>(&region) }?;
        let mismatch = |field, expected: u64, found: u64| Error::HeaderMismatch { field, expected, found };
        if header.magic != BITMAP_MAGIC {
            return Err(mismatch("bitmap magic", BITMAP_MAGIC, header.magic));
        }
        if header.type_id != TYPE_ID {
            return Err(mismatch("allocator type", TYPE_ID as u64, header.type_id as u64));
        }
        if header.id != id {
            return Err(mismatch("allocator id", id.to_bits(), header.id.to_bits()));
        }
        if (header.region_offset, header.region_len) != (region.offset(), region.len()) {
            return Err(mismatch("bitmap region", region.offset(), header.region_offset));
        }
        let classes = Self::read_classes(&region, header)?;
        let header = NonNull::from(header);
        Ok(BitmapAllocator { region, id, header, classes })
    }

    /// The classes' block sizes, smallest first.
    pub fn block_sizes(&self) -> impl Iterator<Item = usize> + '_ {
        self.classes.iter().map(|c| c.size as usize)
    }

    /// How many blocks of `block_size` bytes the allocator has, and how many are in use (`None`
    /// if it has no such class).
    pub fn class_usage(&self, block_size: usize) -> Option<(u64, u64)> {
        let c = self.classes.iter().find(|c| c.size == block_size as u64)?;
        Some((c.blocks, Self::live(c)))
    }

    /// Blocks of class `c` in use, from its counts.
    fn live(c: &Class) -> u64 {
        let r = c.record();
        let frees = r.frees.load(Ordering::Relaxed);
        r.allocations.load(Ordering::Relaxed).wrapping_sub(frees).min(c.blocks)
    }

    /// The bytes asked for by the blocks of class `c` in use (a walk of its bitmap).
    fn requested(c: &Class) -> u64 {
        let mut sum = 0u64;
        for (w, word) in c.words().iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let index = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if index < c.blocks {
                    sum = sum.wrapping_add(u64::from(c.size_slot(index).load(Ordering::Relaxed)));
                }
            }
        }
        sum
    }

    /// Claims a block of class `c` for `size` bytes; its offset, or `None` if the class is full.
    fn claim_in(&self, c: &Class, size: usize) -> Option<u64> {
        let words = c.words();
        if words.is_empty() {
            return None;
        }
        let record = c.record();
        // The hint is only where to start; any value is safe once reduced.
        let mut w = (record.hint.load(Ordering::Relaxed) % words.len() as u64) as usize;
        for _ in 0..words.len() {
            while let Some(bit) = claim_bit(&words[w]) {
                let index = w as u64 * 64 + u64::from(bit);
                if index >= c.blocks {
                    // A bit past the last block was clear (bad memory, or another process broke
                    // it): left set, which is how it should be, and never handed out.
                    continue;
                }
                record.hint.store(w as u64, Ordering::Relaxed);
                c.size_slot(index).store(size as u32, Ordering::Relaxed);
                let allocations = record.allocations.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                let live = allocations.wrapping_sub(record.frees.load(Ordering::Relaxed));
                if live > record.peak.load(Ordering::Relaxed) && live <= c.blocks {
                    record.peak.fetch_max(live, Ordering::Relaxed);
                }
                return Some(c.data + (index << c.shift));
            }
            w = if w + 1 == words.len() { 0 } else { w + 1 };
        }
        None
    }

    /// The class and block index of the block starting at `offset`.
    fn locate(&self, offset: u64) -> Result<(&Class, u64)> {
        let invalid = |reason| Error::InvalidFree { offset, reason };
        let after = self.classes.partition_point(|c| c.data <= offset);
        let c = after.checked_sub(1).map(|i| &self.classes[i]).ok_or(invalid("not in the allocator's blocks"))?;
        if offset >= c.end() {
            return Err(invalid("not in the allocator's blocks"));
        }
        let rel = offset - c.data;
        if rel & (c.size - 1) != 0 {
            return Err(invalid("not the start of a block"));
        }
        Ok((c, rel >> c.shift))
    }

    /// The bitmap word holding block `index`, and the block's bit in it.
    fn bit_of(c: &Class, index: u64) -> (&AtomicU64, u32) {
        (&c.words()[(index / 64) as usize], (index % 64) as u32)
    }

    /// The live block at `offset`: its class and index.
    fn live_block(&self, offset: u64) -> Result<(&Class, u64)> {
        let (c, index) = self.locate(offset)?;
        let (word, bit) = Self::bit_of(c, index);
        if !bit_is_set(word, bit) {
            return Err(Error::InvalidFree { offset, reason: "not an allocated block" });
        }
        Ok((c, index))
    }

    /// The size block `index` of class `c` was asked with, checked to fit the block: it is read
    /// from shared memory, and callers read or copy that many bytes of the block.
    fn recorded_size(c: &Class, index: u64) -> Result<u64> {
        let size = u64::from(c.size_slot(index).load(Ordering::Relaxed));
        if size == 0 || size > c.size {
            return Err(corrupt(c.data + (index << c.shift), "a block's requested size does not fit it"));
        }
        Ok(size)
    }
}

impl RegionAllocator for BitmapAllocator {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn type_name(&self) -> &'static str {
        "bitmap"
    }

    fn region(&self) -> &Region {
        &self.region
    }

    fn allocate(&self, size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(size, align)?;
        // Every block is aligned to its size up to 4096, the most `check_request` allows.
        let need = size.max(align) as u64;
        let first = self.classes.partition_point(|c| c.size < need);
        if first == self.classes.len() {
            return Err(Error::InvalidSize { size: size as u64, reason: "larger than the largest block class" });
        }
        for c in &self.classes[first..] {
            if let Some(offset) = self.claim_in(c, size) {
                return Ok(OffsetPtr::new(offset));
            }
        }
        let available = self.classes[first..]
            .iter()
            .map(|c| c.blocks.saturating_sub(Self::live(c)).saturating_mul(c.size))
            .fold(0u64, u64::saturating_add);
        Err(Error::OutOfMemory { requested: size as u64, available })
    }

    fn reallocate(&self, ptr: OffsetPtr, new_size: usize, align: usize) -> Result<OffsetPtr> {
        check_request(new_size, align)?;
        let (c, index) = self.live_block(ptr.get())?;
        if new_size.max(align) as u64 <= c.size {
            c.size_slot(index).store(new_size as u32, Ordering::Relaxed);
            return Ok(ptr);
        }
        // At most the block's size (checked), which is below `new_size` here.
        let len = Self::recorded_size(c, index)?;
        let moved = self.allocate(new_size, align)?;
        let copied = self.region.ptr(ptr.get(), len).and_then(|from| Ok((from, self.region.ptr(moved.get(), len)?)));
        let freed = copied.and_then(|(from, to)| {
            // SAFETY: both ranges are inside the region (checked by `ptr`); `len` is at most the
            // old block's size (`recorded_size`), so they lie in two different live blocks (the old
            // one this call's caller holds, the new one just claimed in a larger class).
            unsafe { core::ptr::copy_nonoverlapping(from, to, len as usize) };
            self.free(ptr)
        });
        if let Err(e) = freed {
            let _ = self.free(moved);
            return Err(e);
        }
        Ok(moved)
    }

    fn free(&self, ptr: OffsetPtr) -> Result<()> {
        let offset = ptr.get();
        let (c, index) = self.locate(offset)?;
        let (word, bit) = Self::bit_of(c, index);
        if !release_bit(word, bit) {
            return Err(Error::InvalidFree { offset, reason: "not an allocated block (freed twice?)" });
        }
        c.record().frees.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
        let (c, index) = self.live_block(ptr.get())?;
        Ok(Self::recorded_size(c, index)? as usize)
    }

    /// The counters; see [`BitmapAllocator`] for what is counted and what is worked out.
    fn stats(&self) -> AllocStats {
        let sum = |f: &dyn Fn(&Class) -> u64| self.classes.iter().map(f).fold(0u64, u64::wrapping_add);
        AllocStats {
            capacity: sum(&|c| c.blocks << c.shift),
            bytes_in_use: sum(&Self::requested),
            bytes_reserved: sum(&|c| Self::live(c) << c.shift),
            high_watermark: sum(&|c| c.record().peak.load(Ordering::Relaxed).min(c.blocks) << c.shift),
            live_allocations: sum(&Self::live),
            total_allocations: sum(&|c| c.record().allocations.load(Ordering::Relaxed)),
            total_frees: sum(&|c| c.record().frees.load(Ordering::Relaxed)),
        }
    }

    fn check(&self) -> Result<()> {
        let header = self.header();
        // Every word attach checked: this process works from its copy, but the next one to
        // attach reads the header.
        let fields = (header.magic, header.type_id, header.class_count as usize, header.id);
        let region = (header.region_offset, header.region_len);
        if fields != (BITMAP_MAGIC, TYPE_ID, self.classes.len(), self.id)
            || region != (self.region.offset(), self.region.len())
        {
            return Err(corrupt(self.region.offset(), "header changed since attach"));
        }
        for (c, r) in self.classes.iter().zip(&header.classes) {
            let at = c.data;
            if r.fixed_fields() != [c.size, c.blocks, c.bitmap, c.sizes_at, c.data] {
                return Err(corrupt(at, "class record changed since attach"));
            }
            let words = c.words();
            if let Some(last) = words.last() {
                let tail = c.blocks % 64;
                if tail != 0 && last.load(Ordering::Relaxed) >> tail != u64::MAX >> tail {
                    return Err(corrupt(at, "bits past the last block are clear"));
                }
            }
            let mut live = 0u64;
            for index in 0..c.blocks {
                let (word, bit) = Self::bit_of(c, index);
                if bit_is_set(word, bit) {
                    Self::recorded_size(c, index)?;
                    live += 1;
                }
            }
            let (allocations, frees) = (r.allocations.load(Ordering::Relaxed), r.frees.load(Ordering::Relaxed));
            if allocations.wrapping_sub(frees) != live {
                return Err(corrupt(at, "allocations less frees is not the blocks in use"));
            }
            let peak = r.peak.load(Ordering::Relaxed);
            if peak < live {
                return Err(corrupt(at, "peak below the blocks in use"));
            }
            if peak > c.blocks {
                return Err(corrupt(at, "peak past the class's blocks"));
            }
        }
        Ok(())
    }
}

impl AllocatorType for BitmapAllocator {
    const TYPE_ID: u32 = TYPE_ID;
    type Config = BitmapConfig;

    fn create(region: Region, id: AllocatorId, config: &BitmapConfig) -> Result<Self> {
        let sizes = config.block_sizes()?;
        let header_len = core::mem::size_of::<BitmapHeader>() as u64;
        let ptr = region.ptr(region.offset(), header_len)?.cast::<BitmapHeader>();
        if ptr.align_offset(core::mem::align_of::<BitmapHeader>()) != 0 {
            return Err(Error::InvalidAlignment { align: core::mem::align_of::<BitmapHeader>() as u64 });
        }
        // Equal shares of what follows the header; the last class also takes what the others
        // leave over.
        let start = region.offset() + header_len;
        let share = (region.end() - start) / sizes.len() as u64;
        let mut at = start;
        let placements: Vec<Placement> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let limit = if i + 1 == sizes.len() { region.end() } else { (start + share * (i as u64 + 1)).max(at) };
                let p = place(size, at, limit);
                at = p.end.max(at);
                p
            })
            .collect();
        if placements.iter().all(|p| p.blocks == 0) {
            return Err(Error::InvalidSize { size: region.len(), reason: "region too small for a bitmap allocator" });
        }
        // SAFETY: in bounds (checked by `ptr`) and aligned (checked above); the region is this
        // allocator's and not yet visible to anyone (the directory entry is published after
        // `create` returns). Zeroes are a valid header (integers and atomics).
        unsafe { core::ptr::write_bytes(ptr.cast::<u8>(), 0, header_len as usize) };
        // SAFETY: as above; the header is now initialised, and no one else refers to it.
        let header = unsafe { &mut *ptr };
        header.magic = BITMAP_MAGIC;
        header.type_id = TYPE_ID;
        header.class_count = sizes.len() as u32;
        header.id = id;
        header.region_offset = region.offset();
        header.region_len = region.len();
        for (r, p) in header.classes.iter_mut().zip(&placements) {
            (r.block_size, r.blocks, r.bitmap, r.sizes, r.data) = (p.size, p.blocks, p.bitmap, p.sizes, p.data);
            let words = p.blocks.div_ceil(64);
            let bitmap = region.ptr(p.bitmap, words * 8)?;
            // SAFETY: the bitmap lies in the region (checked by `ptr`), 8-aligned by `place`,
            // and is this allocator's alone until it is published.
            unsafe { core::ptr::write_bytes(bitmap, 0, (words * 8) as usize) };
            if p.blocks % 64 != 0 {
                let last = bitmap.wrapping_add(((words - 1) * 8) as usize).cast::<u64>();
                // SAFETY: the last word of the bitmap just cleared: in bounds and aligned.
                unsafe { last.write(u64::MAX << (p.blocks % 64)) };
            }
        }
        BitmapAllocator::open(region, id)
    }

    fn attach(region: Region, id: AllocatorId) -> Result<Self> {
        BitmapAllocator::open(region, id)
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests;
