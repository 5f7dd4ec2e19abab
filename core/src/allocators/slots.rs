//! Thread slots: per-thread records inside the region (the thread-local allocator's heaps, the
//! page allocator's thread caches), shared by both span allocators.
//!
//! ```text
//! chunk   [next chunk][slot 0][slot 1] ... [slot 15]     the first chunk is in the allocator header;
//! slot    [owner][magic][index] [body ...]               more come from the free-space manager
//! ```
//!
//! A slot is free while its owner word is 0; a thread takes one with a CAS of its
//! [`owner_token`](crate::sync::owner_token) (the process id and start time), so the number of
//! threads has no fixed limit and a slot whose process has died is recognised as such, even if
//! the id was reused, as is one whose owner word names no process (a stray write: see
//! [`holder_gone`](crate::sync::holder_gone)).
//!
//! The table never shrinks. A free slot is taken before the table grows, so it holds as many
//! slots as threads ever held at once, and threads that come and go reuse them; but the chunks a
//! burst of threads added stay for the region's life (`bytes_reserved` counts them), so the free
//! capacity they took does not come back when the threads end. Giving a chunk back would take
//! knowing that every walk of the table in every process (a thread taking a slot, a remote free
//! finding its heap, a recovery) is done with it: one that read the link before the chunk was
//! unlinked could take a "slot" in whatever its units became, and a count of walkers in shared
//! memory stays raised for good when a walker's process dies. The slots' counters (summed for
//! the statistics) and their numbers (which blocks record) would have to move elsewhere too.

use core::marker::PhantomData;

use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::tagged_list::LoopCheck;

use super::free_space::{FreeSpace, UNIT};
use super::large::TAG_META;
use super::span::{corrupt, Mem};

/// Slots per chunk.
pub(crate) const CHUNK_SLOTS: usize = 16;
const SLOT_MAGIC: u32 = 0x534C_4F54; // "SLOT"

/// A slot body: what an allocator keeps per thread.
///
/// # Safety
/// All-zero bytes are a valid, empty body, and every field is valid for any bits (integers,
/// atomics, cells of integers): the body lives in shared memory another process may have written.
pub(crate) unsafe trait SlotBody {}

/// One thread's slot.
#[repr(C, align(64))]
pub(crate) struct Slot<B> {
    /// The owning process's token, 0 while free.
    pub(crate) owner: AtomicU64,
    magic: u32,
    /// The slot's number, from 0, in table order.
    pub(crate) index: u32,
    /// The allocator's record.
    pub(crate) body: B,
}

/// A chunk of slots (the allocator header embeds the first).
#[repr(C, align(64))]
pub(crate) struct Chunk<B> {
    next: AtomicU64,
    slots: [Slot<B>; CHUNK_SLOTS],
}

/// The chunked table of slots starting at a chunk in the allocator header.
pub(crate) struct SlotTable<B> {
    first: u64,
    _body: PhantomData<B>,
}

impl<B: SlotBody> SlotTable<B> {
    /// Bytes of a chunk (the allocator header embeds the first).
    pub(crate) const CHUNK_BYTES: usize = core::mem::size_of::<Chunk<B>>();

    /// The table whose first chunk is at `first`.
    pub(crate) const fn new(first: u64) -> Self {
        SlotTable { first, _body: PhantomData }
    }

    /// Writes an empty chunk at `chunk` whose slots are numbered from `first_index`.
    ///
    /// # Safety
    /// No one else sees the chunk's bytes yet (fresh units, or a header being created).
    pub(crate) unsafe fn format(mem: &Mem, chunk: u64, first_index: u32) -> Result<()> {
        // The count comes from walking links in shared memory: numbers past a u32 are damage.
        if first_index.checked_add(CHUNK_SLOTS as u32 - 1).is_none() {
            return Err(corrupt(chunk, "slot numbers past a slot's index"));
        }
        // SAFETY: bounds and alignment checked by `at`; Chunk<B> is valid as zeroes (SlotBody).
        let p = unsafe { mem.at::<Chunk<B>>(chunk) }?;
        // SAFETY: fresh memory the caller owns.
        unsafe {
            core::ptr::write_bytes(p.cast::<u8>(), 0, Self::CHUNK_BYTES);
            for i in 0..CHUNK_SLOTS {
                let s = core::ptr::addr_of_mut!((*p).slots[i]);
                core::ptr::addr_of_mut!((*s).magic).write(SLOT_MAGIC);
                core::ptr::addr_of_mut!((*s).index).write(first_index + i as u32);
            }
        }
        Ok(())
    }

    fn chunk<'m>(&self, mem: &'m Mem, offset: u64) -> Result<&'m Chunk<B>> {
        // SAFETY: in bounds and aligned (checked by `at`); valid for any bits (SlotBody).
        Ok(unsafe { &*mem.at::<Chunk<B>>(offset)? })
    }

    /// The slot at `offset`, checked: in bounds, aligned, with a slot's magic.
    #[inline]
    pub(crate) fn slot<'m>(&self, mem: &'m Mem, offset: u64) -> Result<&'m Slot<B>> {
        // SAFETY: in bounds and aligned (checked by `at`); valid for any bits (SlotBody).
        let s = unsafe { &*mem.at::<Slot<B>>(offset)? };
        if s.magic != SLOT_MAGIC {
            return Err(corrupt(offset, "not a thread slot"));
        }
        Ok(s)
    }

    /// The slot at `offset` if it is one of the table's (not merely bytes that look like a
    /// slot): for offsets read from records other processes wrote.
    pub(crate) fn member<'m>(&self, mem: &'m Mem, offset: u64) -> Result<&'m Slot<B>> {
        self.position(mem, offset)?;
        self.slot(mem, offset)
    }

    /// The number the slot at `offset` has by its place in the table (what its `index` word
    /// holds unless damaged), or `Corrupt` if it is not one of the table's slots.
    #[inline]
    pub(crate) fn position(&self, mem: &Mem, offset: u64) -> Result<u64> {
        // The first chunk is in the allocator header, which the handle checked when it opened
        // the allocator: a slot there needs no walk (every remote free asks, mostly of these).
        match Self::place_in(self.first, offset) {
            Some(i) => Ok(i),
            None => self.position_past_first(mem, offset),
        }
    }

    /// The number in its chunk of the slot at `offset`, if it is one of the slots of the chunk at
    /// `chunk`.
    #[inline(always)]
    fn place_in(chunk: u64, offset: u64) -> Option<u64> {
        let size = core::mem::size_of::<Slot<B>>() as u64;
        let i = offset.wrapping_sub(chunk + core::mem::offset_of!(Chunk<B>, slots) as u64);
        (i < CHUNK_SLOTS as u64 * size && i % size == 0).then_some(i / size)
    }

    /// [`position`](Self::position) by a walk of the chunk list, for a slot past the first chunk.
    #[inline(never)]
    fn position_past_first(&self, mem: &Mem, offset: u64) -> Result<u64> {
        self.walk(mem, |at, number| Self::place_in(at, offset).map(|i| number * CHUNK_SLOTS as u64 + i))?
            .ok_or_else(|| corrupt(offset, "not a thread slot of the table"))
    }

    /// Walks the chunk list from the first chunk, calling `visit` with each chunk's offset and
    /// its number (from 0), until `visit` answers (`Some`) or the list ends (`None`). The links
    /// are shared memory: each is checked (in bounds, so no sum over a chunk's slots overflows)
    /// before use, and a list that loops back on itself is damage ([`LoopCheck`]).
    fn walk<R>(&self, mem: &Mem, mut visit: impl FnMut(u64, u64) -> Option<R>) -> Result<Option<R>> {
        let mut at = self.first;
        let mut loops = LoopCheck::new(at);
        for number in 0..mem.end() / UNIT + 1 {
            let chunk = self.chunk(mem, at)?;
            if let Some(answer) = visit(at, number) {
                return Ok(Some(answer));
            }
            match chunk.next.load(Ordering::Acquire) {
                0 => return Ok(None),
                next => at = next,
            }
            if loops.came_round(at) {
                break;
            }
        }
        Err(corrupt(self.first, "slot chunk list does not end"))
    }

    /// The slot at `offset` without the checks, for offsets this process checked before.
    ///
    /// # Safety
    /// `offset` came from [`SlotTable::slot`] or [`SlotTable::offsets`] on the same `mem`.
    #[inline]
    pub(crate) unsafe fn slot_unchecked<'m>(&self, mem: &'m Mem, offset: u64) -> &'m Slot<B> {
        // Bounds and alignment only: another process may have overwritten the magic since (the
        // slot is still ours to use, and `check` reports the damage).
        debug_assert!(mem
            .ptr(offset, core::mem::size_of::<Slot<B>>() as u64)
            .is_ok_and(|p| p.align_offset(core::mem::align_of::<Slot<B>>()) == 0));
        // SAFETY: the caller's promise: checked once (bounds, alignment, magic), and the region
        // stays mapped.
        unsafe { &*mem.addr(offset).cast::<Slot<B>>() }
    }

    /// Every slot's offset, in index order.
    pub(crate) fn offsets(&self, mem: &Mem) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        self.walk(mem, |at, _| {
            let slots = at + core::mem::offset_of!(Chunk<B>, slots) as u64;
            out.extend((0..CHUNK_SLOTS as u64).map(|i| slots + i * core::mem::size_of::<Slot<B>>() as u64));
            None::<()>
        })?;
        Ok(out)
    }

    /// Takes a free slot for `token`. When all are taken, `relieve` runs once (to reclaim the
    /// slots of dead processes), then the table grows by a chunk from the free-space manager
    /// (unless another thread grew it since the scan), until a slot is taken or the free-space
    /// manager has no room for a chunk.
    pub(crate) fn acquire(
        &self,
        mem: &Mem,
        fs: &FreeSpace,
        token: u64,
        relieve: impl FnMut() -> Result<()>,
    ) -> Result<u64> {
        self.acquire_where(mem, fs, token, |_| true, relieve)
    }

    /// [`acquire`](Self::acquire), taking only a free slot `usable` accepts (read before the
    /// compare-and-swap that takes it: a caller whose test reads what may change while the
    /// slot is free tests again once it holds it). A fresh chunk's slots are all usable.
    pub(crate) fn acquire_where(
        &self,
        mem: &Mem,
        fs: &FreeSpace,
        token: u64,
        usable: impl Fn(&Slot<B>) -> bool,
        mut relieve: impl FnMut() -> Result<()>,
    ) -> Result<u64> {
        // A scan: the slot taken, or how many slots there were.
        let scan = || -> Result<core::result::Result<u64, usize>> {
            let offsets = self.offsets(mem)?;
            for &offset in &offsets {
                let s = self.slot(mem, offset)?;
                if s.owner.load(Ordering::Relaxed) == 0
                    && usable(s)
                    && s.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_ok()
                {
                    crate::crash::point();
                    return Ok(Ok(offset));
                }
            }
            Ok(Err(offsets.len()))
        };
        let mut relieved = false;
        loop {
            let seen = match scan()? {
                Ok(offset) => return Ok(offset),
                Err(seen) => seen,
            };
            if !relieved {
                relieve()?;
                relieved = true;
                continue;
            }
            // Each round either takes a slot, grows the table by a chunk, or finds that another
            // thread grew it. With no room for a chunk, one last scan: a slot may have come free.
            if let Err(e) = self.grow(mem, fs, seen) {
                return scan()?.map_err(|_| e);
            }
        }
    }

    /// Appends a chunk taken from the arena, unless the table has grown past `seen` slots (the
    /// caller's scan): threads that find the table full at once then grow it by one chunk, not
    /// one each. All of it happens under the free-space lock, so a grower that dies leaves either
    /// a linked chunk or a run no chunk links to, which the lock's next holder frees when it
    /// repairs the free space (`large::repair_runs`).
    pub(crate) fn grow(&self, mem: &Mem, fs: &FreeSpace, seen: usize) -> Result<()> {
        let units = (Self::CHUNK_BYTES as u64).div_ceil(UNIT) as u32;
        let mut g = fs.lock();
        let (at, count) = self.tail(mem)?;
        if count as usize > seen {
            return Ok(());
        }
        let head = g
            .alloc(units, TAG_META, 0)
            .ok_or_else(|| Error::OutOfMemory { requested: units as u64 * UNIT, available: g.free_bytes() })?;
        crate::crash::point();
        let chunk = fs.layout().unit_offset(head);
        // SAFETY: the units were just taken from the free-space manager: ours alone.
        unsafe { Self::format(mem, chunk, count) }?;
        crate::crash::point();
        self.chunk(mem, at)?.next.store(chunk, Ordering::Release);
        crate::crash::point();
        Ok(())
    }

    /// The last chunk, and how many slots the table has. A list that numbers more slots than a
    /// slot's index holds is damage, however large the region (a count of slots bounded by its
    /// units would overflow before the bound in a terabyte); so is one that loops ([`walk`]).
    ///
    /// [`walk`]: Self::walk
    fn tail(&self, mem: &Mem) -> Result<(u64, u32)> {
        let mut last = (self.first, 0u64);
        self.walk(mem, |at, number| {
            last = (at, number + 1);
            None::<()>
        })?;
        let count = u32::try_from(last.1 * CHUNK_SLOTS as u64)
            .map_err(|_| corrupt(self.first, "slot table past its numbers"))?;
        Ok((last.0, count))
    }

    /// Whether the chunk run at `offset` is linked into the table (for repairs after a grower
    /// died holding the free-space lock).
    pub(crate) fn is_chunk(&self, mem: &Mem, offset: u64) -> Result<bool> {
        Ok(self.walk(mem, |at, _| (at == offset).then_some(()))?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Body(#[allow(dead_code)] u64);
    // SAFETY: an integer.
    unsafe impl SlotBody for Body {}

    type Table = SlotTable<Body>;
    const CHUNK: u64 = Table::CHUNK_BYTES as u64;

    /// Zeroed, 64-aligned memory for `chunks` chunks from offset `CHUNK` on, under a view of
    /// `len` bytes (most of which nothing backs: only the chunks are touched).
    struct Fake {
        base: *mut u8,
        layout: std::alloc::Layout,
    }

    impl Fake {
        fn new(chunks: u64) -> Fake {
            let layout = std::alloc::Layout::from_size_align(((chunks + 1) * CHUNK) as usize, 64).unwrap();
            // SAFETY: a nonzero size.
            let base = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!base.is_null());
            Fake { base, layout }
        }

        fn mem(&self, len: u64) -> Mem {
            // SAFETY: the tests touch only the chunks `new` allocated.
            unsafe { Mem::raw(self.base, 0, len) }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.base, self.layout) };
        }
    }

    #[test]
    fn a_looping_chunk_list_in_a_huge_region_is_damage() {
        let fake = Fake::new(2);
        // A terabyte region: more slots than a u32 counts fit its units.
        let mem = fake.mem(1 << 40);
        // SAFETY: fresh memory the test owns.
        unsafe {
            Table::format(&mem, CHUNK, 0).unwrap();
            Table::format(&mem, 2 * CHUNK, CHUNK_SLOTS as u32).unwrap();
        }
        let table = Table::new(CHUNK);
        table.chunk(&mem, CHUNK).unwrap().next.store(2 * CHUNK, Ordering::Relaxed);
        assert_eq!(table.tail(&mem).unwrap(), (2 * CHUNK, 2 * CHUNK_SLOTS as u32));
        // The second chunk links back to the first.
        table.chunk(&mem, 2 * CHUNK).unwrap().next.store(CHUNK, Ordering::Relaxed);
        assert!(matches!(table.tail(&mem), Err(Error::Corrupt { .. })));
    }

    /// Every walk of the chunk list finds a loop, as `tail` does: bounded only by the region's
    /// units, a walk of a looping list in a huge region went round for as many steps (and the
    /// list of slot offsets grew by a chunk's slots at each, past any memory).
    #[test]
    fn every_walk_of_a_looping_chunk_list_finds_the_loop() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let fake = Fake::new(2);
            // Most of the view is nothing; only the two chunks are touched.
            let mem = fake.mem(1 << 62);
            // SAFETY: fresh memory the test owns.
            unsafe {
                Table::format(&mem, CHUNK, 0).unwrap();
                Table::format(&mem, 2 * CHUNK, CHUNK_SLOTS as u32).unwrap();
            }
            let table = Table::new(CHUNK);
            table.chunk(&mem, CHUNK).unwrap().next.store(2 * CHUNK, Ordering::Relaxed);
            let slot_of = |chunk: u64| chunk + core::mem::offset_of!(Chunk<Body>, slots) as u64;
            let sound = format!("{:?}", (table.position(&mem, slot_of(2 * CHUNK)), table.is_chunk(&mem, 2 * CHUNK)));
            let _ = tx.send(("sound", sound));
            // The second chunk links back to the first.
            table.chunk(&mem, 2 * CHUNK).unwrap().next.store(CHUNK, Ordering::Relaxed);
            let _ = tx.send(("position", format!("{:?}", table.position(&mem, slot_of(3 * CHUNK)))));
            let _ = tx.send(("is_chunk", format!("{:?}", table.is_chunk(&mem, 3 * CHUNK))));
            let _ = tx.send(("offsets", format!("{:?}", table.offsets(&mem))));
        });
        let wait = || rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a walk went round the loop");
        assert_eq!(wait(), ("sound", format!("{:?}", (Ok::<_, Error>(CHUNK_SLOTS as u64), Ok::<_, Error>(true)))));
        for walk in ["position", "is_chunk", "offsets"] {
            let (name, result) = wait();
            assert!(name == walk && result.starts_with("Err(Corrupt"), "{name}: {result}");
        }
    }

    #[test]
    fn slot_numbers_past_u32_are_refused() {
        let fake = Fake::new(1);
        let mem = fake.mem(2 * CHUNK);
        // SAFETY: fresh memory the test owns.
        let r = unsafe { Table::format(&mem, CHUNK, u32::MAX - 3) };
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        // SAFETY: as above.
        unsafe { Table::format(&mem, CHUNK, u32::MAX - CHUNK_SLOTS as u32 + 1) }.unwrap();
    }
}
