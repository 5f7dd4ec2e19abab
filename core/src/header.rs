//! The header page every region starts with.
//!
//! ```text
//! offset 0     magic, layout version, kind, sizes, backend id, creator pid, init state
//! offset 128   allocator directory: a mutex, the next free offset, and one entry per
//!              allocator (type, id, sub-region offset and size, state)
//! HEADER_SIZE  data: the sub-regions the allocators own
//! ```
//!
//! The creator writes every field, then sets the init state to ready with release ordering;
//! attachers wait for that (see `hetmem-backends`) before trusting anything else. Every value read
//! from the header is checked against the mapped size before use: a corrupt or hostile peer must
//! not make this process touch memory outside the region.

use crate::backend::{BackendId, BackendKind};
use crate::error::{Error, Result};
use crate::ptr::AllocatorId;
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// Size of the header page; data starts here.
pub const HEADER_SIZE: u64 = 4096;
/// The first eight bytes of every hetmem region.
pub const MAGIC: u64 = u64::from_le_bytes(*b"HETMEM\0\x01");
/// The layout this code reads and writes. Attaching to another fails with a header mismatch.
///
/// Version 2 changed what shortened process stamps mean (see [`crate::liveness`]): a known start
/// time whose kept bits are all 0 is written as all 1s. Code of version 1 compares the kept bits
/// as they are, and would take a live process that wrote such a stamp for a dead one.
pub const LAYOUT_VERSION: u32 = 2;
/// Sub-regions start at multiples of this, so each allocator's header sits on its own cache lines.
pub const SUBREGION_ALIGN: u64 = 64;
/// How many allocators one region's directory holds.
pub const MAX_ALLOCATORS: usize = 123;

const INIT_READY: u32 = 0x5EED_0001;

const ENTRY_EMPTY: u32 = 0;
const ENTRY_CREATING: u32 = 1;
const ENTRY_READY: u32 = 2;
/// An entry's state is its low two bits. Above them, a `creating` entry keeps its creator's
/// process id (0: unknown, as in entries an older build wrote), so that a creator that died
/// before publishing can be told from one still at work.
const STATE_BITS: u32 = 2;
const STATE_MASK: u32 = (1 << STATE_BITS) - 1;

/// A `creating` state naming process `pid` (0, unknown, when it does not fit).
fn creating_by(pid: u32) -> u32 {
    let pid = if pid >> (32 - STATE_BITS) == 0 { pid } else { 0 };
    ENTRY_CREATING | pid << STATE_BITS
}

impl AllocatorEntry {
    /// The entry's state (`ENTRY_*`), without the creator's pid.
    fn state(&self) -> u32 {
        self.state & STATE_MASK
    }

    /// Whether the entry is `creating` and its creator is known to have died.
    fn creator_died(&self) -> bool {
        let pid = self.state >> STATE_BITS;
        self.state() == ENTRY_CREATING && crate::liveness::is_dead(crate::liveness::ProcessStamp { pid, start_time: 0 })
    }
}

/// What an attacher sees when it looks at a header that may still be being written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HeaderState {
    /// Not yet initialised (the magic is still zero, or the init flag not yet set): wait.
    Initialising,
    /// The creator has finished; the header can be validated.
    Ready,
    /// The first eight bytes are neither zero nor the hetmem magic: not a hetmem region.
    BadMagic(u64),
}

/// One allocator's entry in the directory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatorEntry {
    /// The allocator type's `TYPE_ID`.
    pub type_id: u32,
    state: u32,
    /// The allocator's id.
    pub id: AllocatorId,
    /// Start of its sub-region, from the region's start.
    pub offset: u64,
    /// Size of its sub-region.
    pub size: u64,
}

#[repr(C)]
struct Directory {
    next_free: u64,
    count: u32,
    _pad: u32,
    entries: [AllocatorEntry; MAX_ALLOCATORS],
}

/// The header at offset 0 of every region. See the [module docs](self) for the layout.
#[repr(C)]
pub struct RegionHeader {
    magic: AtomicU64,
    version: u32,
    kind: u32,
    total_size: u64,
    data_offset: u64,
    backend_id: u64,
    creator_pid: u32,
    init_state: AtomicU32,
    _reserved: [u64; 10],
    directory: Mutex<Directory>,
}

const _: () = assert!(core::mem::size_of::<RegionHeader>() as u64 <= HEADER_SIZE);
const _: () = assert!(core::mem::size_of::<AllocatorEntry>() == 32);

impl RegionHeader {
    /// Writes a fresh header at `base` and marks it ready.
    ///
    /// # Safety
    /// `base` points to at least `total_size` writable bytes, aligned to 8, that no other thread or
    /// process reads as a header until this returns (attachers wait for the ready flag).
    pub unsafe fn initialize<'a>(
        base: *mut u8,
        total_size: u64,
        kind: BackendKind,
        id: BackendId,
        creator_pid: u32,
    ) -> Result<&'a RegionHeader> {
        if total_size <= HEADER_SIZE {
            return Err(Error::InvalidSize {
                size: total_size,
                reason: "a region must be larger than its 4096-byte header",
            });
        }
        if base.align_offset(8) != 0 {
            return Err(Error::InvalidAlignment { align: 8 });
        }
        let header = base.cast::<RegionHeader>();
        // SAFETY: the caller gives us `total_size` > HEADER_SIZE >= size_of::<RegionHeader>()
        // writable, aligned bytes that nobody else reads yet; the header holds only integers
        // and atomics, for which these bytes are valid once written.
        unsafe {
            core::ptr::write_bytes(base, 0, HEADER_SIZE as usize);
            (*header).version = LAYOUT_VERSION;
            (*header).kind = kind as u32;
            (*header).total_size = total_size;
            (*header).data_offset = HEADER_SIZE;
            (*header).backend_id = id.0;
            (*header).creator_pid = creator_pid;
            (*header).directory.get_mut().next_free = HEADER_SIZE;
            let header = &*header;
            header.magic.store(MAGIC, Ordering::Relaxed);
            header.init_state.store(INIT_READY, Ordering::Release);
            Ok(header)
        }
    }

    /// Reads the magic and init flag without trusting anything else.
    pub fn state(&self) -> HeaderState {
        match self.magic.load(Ordering::Acquire) {
            0 => HeaderState::Initialising,
            MAGIC if self.init_state.load(Ordering::Acquire) == INIT_READY => HeaderState::Ready,
            MAGIC => HeaderState::Initialising,
            other => HeaderState::BadMagic(other),
        }
    }

    /// Checks a ready header against what the attacher expects: layout version, kind, and a
    /// total size that matches the bytes actually mapped (a truncated segment fails here).
    pub fn validate(&self, mapped_len: u64, kind: BackendKind) -> Result<()> {
        match self.state() {
            HeaderState::Ready => {}
            HeaderState::BadMagic(found) => {
                return Err(Error::HeaderMismatch { field: "magic", expected: MAGIC, found });
            }
            HeaderState::Initialising => {
                return Err(Error::TimedOut { what: "the region's creator to initialise it", waited_ms: 0 });
            }
        }
        let mismatch = |field, expected: u64, found: u64| Error::HeaderMismatch { field, expected, found };
        if self.version != LAYOUT_VERSION {
            return Err(mismatch("version", LAYOUT_VERSION as u64, self.version as u64));
        }
        if self.kind != kind as u32 {
            return Err(mismatch("kind", kind as u64, self.kind as u64));
        }
        if self.total_size != mapped_len {
            return Err(mismatch("total_size", mapped_len, self.total_size));
        }
        if self.data_offset != HEADER_SIZE {
            return Err(mismatch("data_offset", HEADER_SIZE, self.data_offset));
        }
        Ok(())
    }

    /// The layout version written by the creator.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The backend kind written by the creator (raw).
    pub fn kind_raw(&self) -> u32 {
        self.kind
    }

    /// The region's total size, header included.
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    /// Where the data area starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The backend id written by the creator.
    pub fn backend_id(&self) -> u64 {
        self.backend_id
    }

    /// The process id of the creator.
    pub fn creator_pid(&self) -> u32 {
        self.creator_pid
    }

    /// Takes the directory's lock; one a dead process left is taken over (see [`repair_directory`]),
    /// so that creating and attaching allocators never waits for ever.
    fn lock_directory(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock_or_recover(|dir| repair_directory(dir, self.total_size))
    }

    /// [`lock_directory`](Self::lock_directory) without waiting: `None` while a live process
    /// holds the lock (one a dead process left is taken over and repaired, as always).
    fn try_lock_directory(&self) -> Option<MutexGuard<'_, Directory>> {
        self.directory.try_lock_or_recover(|dir| repair_directory(dir, self.total_size))
    }

    /// Takes the directory's lock, until the returned guard drops.
    #[cfg(all(test, feature = "std", not(loom)))]
    pub(crate) fn lock_directory_for_test(&self) -> impl Send + '_ {
        self.directory.lock()
    }

    /// Bytes of the data area not yet given to any allocator.
    pub fn unreserved(&self) -> u64 {
        // As the next reservation will see it, without writing (a stray write may have moved
        // `next_free` back).
        self.total_size.saturating_sub(reserved_end(&self.lock_directory(), self.total_size))
    }

    /// Reserves a sub-region for a new allocator and records it as being created by the calling
    /// process.
    ///
    /// `size == 0` takes all the space that is left. Fails if `id` already has an entry, the
    /// directory is full (123 entries, counting those of failed creations until a full
    /// directory takes their places), or the space is not there. An entry whose creator died before
    /// publishing it (as the [liveness hook](crate::liveness) tells) does not count: it is
    /// forgotten, as [`abandon_allocator`](Self::abandon_allocator) would have, and `id` is
    /// created again in a new sub-region.
    pub fn reserve_allocator(&self, type_id: u32, id: AllocatorId, size: u64) -> Result<AllocatorEntry> {
        let mut dir = self.lock_directory();
        // `next_free` is a word of shared memory another process may have scribbled on: a value
        // moved back would hand out a range again (a live allocator's, or the header page).
        repair_directory(&mut dir, self.total_size);
        let count = dir.count as usize;
        if let Some(e) = dir.entries[..count].iter_mut().find(|e| e.state() != ENTRY_EMPTY && e.id == id) {
            if !e.creator_died() {
                return Err(Error::AlreadyExists { what: "allocator", name: id_name(id) });
            }
            e.state = ENTRY_EMPTY;
        }
        // A full directory takes the first entry nothing can use any more: one forgotten (a
        // failed creation), or one whose creator died before publishing it. Only when full, so
        // that the entries stay in creation order as long as they can.
        let index = if count < MAX_ALLOCATORS {
            count
        } else {
            dir.entries
                .iter()
                .position(|e| e.state() == ENTRY_EMPTY || e.creator_died())
                .ok_or(Error::Unsupported("more than 123 allocators in one region"))?
        };
        let start = dir.next_free.checked_next_multiple_of(SUBREGION_ALIGN).unwrap_or(u64::MAX);
        let available = self.total_size.saturating_sub(start);
        let size = if size == 0 { available } else { size };
        if size == 0 || size > available {
            return Err(Error::OutOfMemory { requested: size, available });
        }
        let state = creating_by(crate::liveness::current().pid);
        let entry = AllocatorEntry { type_id, state, id, offset: start, size };
        dir.entries[index] = entry;
        dir.count = count.max(index + 1) as u32;
        dir.next_free = start + size;
        Ok(entry)
    }

    /// Marks `id`'s entry ready: its allocator has written its own header. Only the entry this
    /// process is creating under `id` is marked (`UnknownAllocator` if there is none).
    pub fn publish_allocator(&self, id: AllocatorId) -> Result<()> {
        self.set_entry_state(id, ENTRY_READY)
    }

    /// Forgets an entry whose creation failed. Its space stays reserved (the directory only
    /// bumps), but the id can be created again. Only the entry this process is creating under
    /// `id` is forgotten (`UnknownAllocator` if there is none): never a ready one.
    pub fn abandon_allocator(&self, id: AllocatorId) -> Result<()> {
        self.set_entry_state(id, ENTRY_EMPTY)
    }

    /// [`abandon_allocator`](Self::abandon_allocator), and where the entry's sub-region is the
    /// last one reserved, its space and its directory entry given back too: a creation that
    /// failed (a configuration its allocator type refused, after "all that is left" was
    /// reserved for it, say) leaves the region as it found it.
    ///
    /// # Safety
    /// Nothing uses the sub-region any more, in this process or another: its creation failed,
    /// and nothing made over its range lives (the next reservation is given the same range).
    #[cfg(feature = "alloc")]
    pub(crate) unsafe fn give_back_allocator(&self, id: AllocatorId) -> Result<()> {
        let mut dir = self.lock_directory();
        let index = creating_entry(&dir, id).ok_or(Error::UnknownAllocator(id))?;
        dir.entries[index].state = ENTRY_EMPTY;
        let entry = dir.entries[index];
        if index + 1 == dir.count as usize && entry.offset.checked_add(entry.size) == Some(dir.next_free) {
            // A death between these stores (in whatever order they land) is safe:
            // `repair_directory` moves `next_free` past every entry still counted.
            dir.count = index as u32;
            dir.next_free = entry.offset;
        }
        Ok(())
    }

    /// Sets the state of the entry this process is creating under `id` (see [`creating_entry`]).
    fn set_entry_state(&self, id: AllocatorId, state: u32) -> Result<()> {
        let mut dir = self.lock_directory();
        let index = creating_entry(&dir, id).ok_or(Error::UnknownAllocator(id))?;
        dir.entries[index].state = state;
        Ok(())
    }

    /// Looks up a ready allocator's entry, checking that its sub-region lies inside the region.
    ///
    /// Returns `Ok(None)` while the entry exists but its creator has not finished, and
    /// `Error::Corrupt` once that creator is known to have died: the allocator will never be
    /// ready, and [`reserve_allocator`](Self::reserve_allocator) may create it again.
    pub fn find_allocator(&self, id: AllocatorId) -> Result<Option<AllocatorEntry>> {
        self.find_in(&self.lock_directory(), id)
    }

    /// [`find_allocator`](Self::find_allocator) without waiting for the directory's lock: `None`
    /// while a live process holds it (one a dead process left is taken over, as always). For
    /// lookups under a deadline: a process stopped while it holds the lock holds it for good.
    pub fn try_find_allocator(&self, id: AllocatorId) -> Option<Result<Option<AllocatorEntry>>> {
        let dir = self.try_lock_directory()?;
        Some(self.find_in(&dir, id))
    }

    /// Looks `id` up in `dir`, this header's directory (see [`find_allocator`](Self::find_allocator)).
    fn find_in(&self, dir: &Directory, id: AllocatorId) -> Result<Option<AllocatorEntry>> {
        let count = (dir.count as usize).min(MAX_ALLOCATORS);
        let entry = *dir.entries[..count]
            .iter()
            .find(|e| e.state() != ENTRY_EMPTY && e.id == id)
            .ok_or(Error::UnknownAllocator(id))?;
        let end = entry.offset.checked_add(entry.size);
        if entry.offset < HEADER_SIZE || end.is_none_or(|end| end > self.total_size) {
            return Err(Error::OutOfBounds { offset: entry.offset, len: entry.size, region_len: self.total_size });
        }
        if entry.creator_died() {
            return Err(Error::Corrupt {
                structure: "allocator",
                offset: entry.offset,
                detail: "its creator died before publishing it; create it again",
            });
        }
        Ok((entry.state() == ENTRY_READY).then_some(entry))
    }

    /// The ready allocators in this region, in the directory's order: creation order, except
    /// that one created while the directory was full took the place of a failed creation's entry.
    pub fn allocators(&self) -> impl Iterator<Item = AllocatorEntry> + '_ {
        ready_entries(&self.lock_directory()).into_iter().flatten()
    }

    /// [`allocators`](Self::allocators) without waiting for the directory's lock: `None` while a
    /// live process holds it (see [`try_find_allocator`](Self::try_find_allocator)).
    pub fn try_allocators(&self) -> Option<impl Iterator<Item = AllocatorEntry> + '_> {
        let dir = self.try_lock_directory()?;
        Some(ready_entries(&dir).into_iter().flatten())
    }
}

/// The ready entries of `dir`, copied (the caller holds its lock only while they are read).
fn ready_entries(dir: &Directory) -> [Option<AllocatorEntry>; MAX_ALLOCATORS] {
    let count = (dir.count as usize).min(MAX_ALLOCATORS);
    core::array::from_fn(|i| {
        let e = dir.entries[i];
        (i < count && e.state() == ENTRY_READY).then_some(e)
    })
}

/// The index of the entry this process is creating under `id`. An entry of the same id that
/// another process is creating (one this process was told had died, wrongly: it reserved the id
/// again) or that is ready is not it. Entries that record no creator (pid 0: an older build's, or
/// a pid too large to keep) count as this process's.
fn creating_entry(dir: &Directory, id: AllocatorId) -> Option<usize> {
    let me = creating_by(crate::liveness::current().pid) >> STATE_BITS;
    let count = (dir.count as usize).min(MAX_ALLOCATORS);
    dir.entries[..count].iter().position(|e| {
        let creator = e.state >> STATE_BITS;
        e.state() == ENTRY_CREATING && e.id == id && (creator == 0 || creator == me)
    })
}

/// Makes `next_free` lie past the header page and every counted entry, as each reservation
/// needs, and the count within the directory. A lock holder that died in
/// [`RegionHeader::reserve_allocator`] may have counted its entry without moving `next_free` past
/// it, and a stray write may have moved it back: either would hand a sub-region out a second
/// time. (A dead creator's entry stays as it was: `creating`, with its pid, which the next
/// reservation of its id and every lookup of it recognise.) An entry that ends past the region's
/// `total_size` bytes is not counted: nothing is made over it (lookups refuse it), and a wild one
/// would leave no room for any reservation after it.
fn repair_directory(dir: &mut Directory, total_size: u64) {
    dir.count = (dir.count as usize).min(MAX_ALLOCATORS) as u32;
    dir.next_free = reserved_end(dir, total_size);
}

/// Where the next reservation of `dir` may start: past the header page, `next_free` and every
/// counted entry that ends inside the region (see [`repair_directory`], which stores it).
fn reserved_end(dir: &Directory, total_size: u64) -> u64 {
    let count = (dir.count as usize).min(MAX_ALLOCATORS);
    dir.entries[..count]
        .iter()
        .filter_map(|e| e.offset.checked_add(e.size).filter(|&end| end <= total_size))
        .fold(dir.next_free.max(HEADER_SIZE), u64::max)
}

fn id_name(id: AllocatorId) -> crate::error::ShortStr {
    use core::fmt::Write;
    let mut buf = FmtBuf::default();
    let _ = write!(buf, "{id}");
    crate::error::ShortStr::new(buf.as_str())
}

#[derive(Default)]
struct FmtBuf {
    buf: [u8; 32],
    len: usize,
}

impl FmtBuf {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl core::fmt::Write for FmtBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;

    fn region(len: usize) -> Vec<u64> {
        vec![0u64; len / 8]
    }

    #[test]
    fn fresh_header_validates_and_wrong_fields_are_named() {
        let mut mem = region(64 * 1024);
        let base = mem.as_mut_ptr().cast::<u8>();
        // SAFETY: `mem` is 64 KiB, 8-aligned, and only this test uses it.
        let h = unsafe { RegionHeader::initialize(base, 64 * 1024, BackendKind::Private, BackendId(3), 1) }.unwrap();
        assert_eq!(h.state(), HeaderState::Ready);
        h.validate(64 * 1024, BackendKind::Private).unwrap();
        assert_eq!(h.backend_id(), 3);
        assert!(matches!(
            h.validate(32 * 1024, BackendKind::Private),
            Err(Error::HeaderMismatch { field: "total_size", .. })
        ));
        assert!(matches!(
            h.validate(64 * 1024, BackendKind::Shared),
            Err(Error::HeaderMismatch { field: "kind", expected: 2, found: 1 })
        ));
        mem[1] = 99; // the version field
        let h = unsafe { &*(mem.as_ptr() as *const RegionHeader) };
        assert!(matches!(
            h.validate(64 * 1024, BackendKind::Private),
            Err(Error::HeaderMismatch { field: "version", expected, .. }) if expected == LAYOUT_VERSION as u64
        ));
        mem[0] = 0x1234;
        let h = unsafe { &*(mem.as_ptr() as *const RegionHeader) };
        assert_eq!(h.state(), HeaderState::BadMagic(0x1234));
    }

    #[test]
    fn a_directory_lock_left_by_a_dead_process_is_taken_over() {
        crate::testing::install_test_liveness();
        let mem: &'static mut [u64] = region(64 * 1024).leak();
        // SAFETY: as above; the memory is leaked, so it outlives the thread below.
        let h = unsafe {
            RegionHeader::initialize(mem.as_mut_ptr().cast(), 64 * 1024, BackendKind::Private, BackendId(1), 1)
        }
        .unwrap();
        h.reserve_allocator(7, AllocatorId::new(1, 0), 1000).unwrap();
        // A process died in `reserve_allocator`, holding the lock, after it counted its entry
        // and before it moved `next_free` past it.
        let dead =
            AllocatorEntry { type_id: 7, state: ENTRY_CREATING, id: AllocatorId::new(1, 1), offset: 8192, size: 4000 };
        {
            let mut dir = h.directory.lock();
            dir.entries[1] = dead;
            dir.count = 2;
            core::mem::forget(dir);
        }
        let owner = core::mem::offset_of!(RegionHeader, directory);
        // SAFETY: the mutex's first field is its owner word (`#[repr(C)]`), an aligned AtomicU64.
        unsafe { &*(mem.as_ptr().cast::<u8>().add(owner).cast::<AtomicU64>()) }
            .store(crate::testing::dead_token(), Ordering::Release);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(h.reserve_allocator(7, AllocatorId::new(1, 2), 1000)));
        let entry = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the directory lock of a dead process was never taken over")
            .unwrap();
        assert!(entry.offset >= dead.offset + dead.size, "{entry:?} overlaps the dead creator's {dead:?}");
        assert_eq!(h.allocators().count(), 0);
    }

    /// A directory lock whose owner word a stray write of another process overwrote with a
    /// token no process writes (its process id 0: a small number, an offset) is taken over, as a
    /// dead holder's is: before, every process that created or attached an allocator in the
    /// region (and `hetmem show` and `list`) waited on it for ever.
    #[test]
    fn a_directory_lock_no_process_holds_is_taken_over() {
        crate::testing::install_test_liveness();
        let mem: &'static mut [u64] = region(64 * 1024).leak();
        // SAFETY: as above; the memory is leaked, so it outlives the threads below.
        let h = unsafe {
            RegionHeader::initialize(mem.as_mut_ptr().cast(), 64 * 1024, BackendKind::Private, BackendId(1), 1)
        }
        .unwrap();
        let owner = core::mem::offset_of!(RegionHeader, directory);
        // SAFETY: the mutex's first field is its owner word (`#[repr(C)]`), an aligned AtomicU64.
        let owner = unsafe { &*(mem.as_ptr().cast::<u8>().add(owner).cast::<AtomicU64>()) };
        for (minor, stray) in [1u64, 0x356, 0x1000, 0xffff_ffff].into_iter().enumerate() {
            owner.store(stray, Ordering::Release);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || tx.send(h.reserve_allocator(7, AllocatorId::new(1, minor as u32), 100)));
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("a directory lock held by {stray:#x} was never taken over"))
                .unwrap();
        }
        assert_eq!(h.directory.owner(), None);
    }

    /// A `next_free` that a stray write moved back, into a live allocator's sub-region or the
    /// header page, hands out no range twice: the next reservation starts past every entry (it
    /// used to be given the live allocator's range, or the header's, from safe calls).
    #[test]
    fn a_next_free_moved_back_hands_out_no_range_twice() {
        let mut mem = region(64 * 1024);
        // SAFETY: as above.
        let h = unsafe {
            RegionHeader::initialize(mem.as_mut_ptr().cast(), 64 * 1024, BackendKind::Private, BackendId(1), 1)
        }
        .unwrap();
        let live = h.reserve_allocator(7, AllocatorId::new(1, 0), 1000).unwrap();
        h.publish_allocator(live.id).unwrap();
        for (minor, stray) in [(1, HEADER_SIZE), (2, live.offset + 64), (3, 0)] {
            h.directory.lock().next_free = stray;
            let end = h.allocators().map(|e| e.offset + e.size).max().unwrap();
            assert_eq!(h.unreserved(), 64 * 1024 - end, "next_free {stray:#x}: what is left to reserve");
            let next = h.reserve_allocator(7, AllocatorId::new(1, minor), 1000).unwrap();
            assert!(next.offset >= live.offset + live.size, "next_free {stray:#x}: {next:?} overlaps {live:?}");
            h.publish_allocator(next.id).unwrap();
        }
        let mut ranges: Vec<_> = h.allocators().map(|e| (e.offset, e.offset + e.size)).collect();
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:?}");
        // An entry a stray write sent past the region is refused, and takes no room from others.
        h.directory.lock().entries[0].size = u64::MAX - 5;
        assert!(matches!(h.find_allocator(live.id), Err(Error::OutOfBounds { .. })));
        h.reserve_allocator(7, AllocatorId::new(1, 4), 1000).unwrap();
    }

    /// An entry whose creator died before publishing it is recognised: lookups say so, and the
    /// id can be reserved again. One whose creator lives, or is unknown (an older build's), still
    /// holds its id.
    #[test]
    fn an_entry_whose_creator_died_unfinished_gives_its_id_back() {
        crate::testing::install_test_liveness();
        let mut mem = region(64 * 1024);
        // SAFETY: as above.
        let h = unsafe {
            RegionHeader::initialize(mem.as_mut_ptr().cast(), 64 * 1024, BackendKind::Private, BackendId(1), 1)
        }
        .unwrap();
        let (dead, unknown, mine) = (AllocatorId::new(1, 0), AllocatorId::new(1, 1), AllocatorId::new(1, 2));
        let first = h.reserve_allocator(7, dead, 1000).unwrap();
        assert_eq!(first.state >> STATE_BITS, std::process::id(), "the creator's pid is recorded");
        h.reserve_allocator(7, unknown, 1000).unwrap();
        h.reserve_allocator(7, mine, 1000).unwrap();
        {
            let mut dir = h.directory.lock();
            dir.entries[0].state = creating_by(crate::testing::DEAD_PID);
            dir.entries[1].state = ENTRY_CREATING;
        }
        let found = h.find_allocator(dead);
        assert!(
            matches!(found, Err(Error::Corrupt { structure: "allocator", offset, .. }) if offset == first.offset),
            "{found:?}"
        );
        assert_eq!(h.find_allocator(unknown).unwrap(), None);
        assert_eq!(h.find_allocator(mine).unwrap(), None);
        assert!(matches!(h.reserve_allocator(7, unknown, 10), Err(Error::AlreadyExists { .. })));
        assert!(matches!(h.reserve_allocator(7, mine, 10), Err(Error::AlreadyExists { .. })));
        let again = h.reserve_allocator(7, dead, 1000).unwrap();
        assert!(again.offset >= first.offset + first.size, "{again:?} overlaps the dead creator's {first:?}");
        assert_eq!(h.find_allocator(dead).unwrap(), None, "created again, not published yet");
        h.publish_allocator(dead).unwrap();
        assert_eq!(h.find_allocator(dead).unwrap().map(|e| e.offset), Some(again.offset));
        assert!(matches!(h.reserve_allocator(7, dead, 10), Err(Error::AlreadyExists { .. })));
        assert_eq!(h.allocators().map(|e| e.id).collect::<Vec<_>>(), [dead]);
        // A pid past the 30 bits an entry keeps is recorded as unknown, never as another pid.
        assert_eq!(creating_by(u32::MAX), ENTRY_CREATING);
    }

    /// Publish and abandon touch only the entry this process is creating under the id: not a
    /// ready one (a safe call emptied a live allocator's entry), and not one another process is
    /// creating (after this one was wrongly told that process had died, and reserved the id
    /// again, the first creator's publish marked the second one's entry ready too early).
    #[test]
    fn publish_and_abandon_touch_only_this_processs_creating_entry() {
        let mut mem = region(64 * 1024);
        // SAFETY: as above.
        let h = unsafe {
            RegionHeader::initialize(mem.as_mut_ptr().cast(), 64 * 1024, BackendKind::Private, BackendId(1), 1)
        }
        .unwrap();
        let (ready, other) = (AllocatorId::new(1, 0), AllocatorId::new(2, 0));
        h.reserve_allocator(7, ready, 1000).unwrap();
        h.publish_allocator(ready).unwrap();
        assert!(matches!(h.abandon_allocator(ready), Err(Error::UnknownAllocator(_))));
        assert!(matches!(h.publish_allocator(ready), Err(Error::UnknownAllocator(_))));
        assert!(h.find_allocator(ready).unwrap().is_some(), "the ready entry stays");
        let theirs = h.reserve_allocator(7, other, 1000).unwrap();
        let me = creating_by(crate::liveness::current().pid) >> STATE_BITS;
        // An entry another running process is creating (pid 1, or 2 should this process be 1).
        let foreign = if me == 1 { 2 } else { 1 };
        h.directory.lock().entries[1].state = creating_by(foreign);
        assert!(matches!(h.publish_allocator(other), Err(Error::UnknownAllocator(_))));
        assert!(matches!(h.abandon_allocator(other), Err(Error::UnknownAllocator(_))));
        assert_eq!(h.find_allocator(other).unwrap(), None, "still being created by the other process");
        // Its creator's own publish (recorded as this process, for the test) goes through.
        h.directory.lock().entries[1].state = creating_by(crate::liveness::current().pid);
        h.publish_allocator(other).unwrap();
        assert_eq!(h.find_allocator(other).unwrap().map(|e| e.offset), Some(theirs.offset));
    }

    /// Giving back a failed creation's entry returns its space only where it is the last one
    /// reserved; an earlier one is forgotten, as abandoned, and its space stays reserved.
    #[test]
    fn a_given_back_entry_returns_its_space_only_when_it_is_the_last() {
        let mut mem = region(64 * 1024);
        // SAFETY: as above.
        let h = unsafe {
            RegionHeader::initialize(mem.as_mut_ptr().cast(), 64 * 1024, BackendKind::Private, BackendId(1), 1)
        }
        .unwrap();
        let (a, b) = (AllocatorId::new(1, 0), AllocatorId::new(1, 1));
        let first = h.reserve_allocator(7, a, 1000).unwrap();
        let after_first = h.unreserved();
        let second = h.reserve_allocator(7, b, 1000).unwrap();
        let after_second = h.unreserved();
        // SAFETY: nothing uses either range.
        unsafe { h.give_back_allocator(a) }.unwrap();
        assert_eq!(h.unreserved(), after_second, "not the last: its space stays reserved");
        assert!(matches!(h.find_allocator(a), Err(Error::UnknownAllocator(_))));
        // SAFETY: as above.
        unsafe { h.give_back_allocator(b) }.unwrap();
        assert_eq!(h.unreserved(), 64 * 1024 - second.offset, "the last: its space is back");
        assert!(after_first - h.unreserved() < SUBREGION_ALIGN);
        assert_eq!(h.reserve_allocator(7, b, 1000).unwrap().offset, second.offset);
        assert!(matches!(unsafe { h.give_back_allocator(a) }, Err(Error::UnknownAllocator(_))));
        h.publish_allocator(b).unwrap();
        // SAFETY: a ready entry is never given back (refused, as asserted).
        assert!(matches!(unsafe { h.give_back_allocator(b) }, Err(Error::UnknownAllocator(_))));
        assert!(first.offset + first.size <= second.offset);
    }

    /// A full directory takes the place of a failed creation's entry, or of one whose creator
    /// died, for the next reservation (they used to keep their places for good, so 123 failures
    /// made a region refuse every new allocator); a directory of live entries stays full.
    #[test]
    fn a_full_directory_reuses_the_entries_of_failed_creations() {
        crate::testing::install_test_liveness();
        let len = HEADER_SIZE + (MAX_ALLOCATORS as u64 + 8) * SUBREGION_ALIGN;
        let mut mem = region(len as usize);
        // SAFETY: as above.
        let h =
            unsafe { RegionHeader::initialize(mem.as_mut_ptr().cast(), len, BackendKind::Private, BackendId(1), 1) }
                .unwrap();
        let id = |minor| AllocatorId::new(1, minor);
        for minor in 0..MAX_ALLOCATORS as u32 {
            h.reserve_allocator(7, id(minor), 1).unwrap();
            if minor != 5 {
                h.publish_allocator(id(minor)).unwrap();
            }
        }
        let full = h.reserve_allocator(7, id(1000), 1);
        assert!(matches!(full, Err(Error::Unsupported(_))), "{full:?}");
        h.abandon_allocator(id(5)).unwrap();
        let reused = h.reserve_allocator(7, id(1000), 1).unwrap();
        h.publish_allocator(id(1000)).unwrap();
        assert_eq!(h.find_allocator(id(1000)).unwrap().map(|e| e.offset), Some(reused.offset));
        assert_eq!(h.directory.lock().entries[5].id, id(1000));
        assert!(matches!(h.find_allocator(id(5)), Err(Error::UnknownAllocator(_))));
        assert_eq!(h.allocators().count(), MAX_ALLOCATORS);
        // An entry whose creator died is taken too.
        h.directory.lock().entries[9].state = creating_by(crate::testing::DEAD_PID);
        h.reserve_allocator(7, id(1001), 1).unwrap();
        assert_eq!(h.directory.lock().entries[9].id, id(1001));
        assert!(matches!(h.reserve_allocator(7, id(1002), 1), Err(Error::Unsupported(_))));
        // The sub-regions stay disjoint: the reused entries took new space.
        let mut ranges: Vec<_> = h.allocators().map(|e| (e.offset, e.offset + e.size)).collect();
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
    }

    #[test]
    fn directory_reserves_disjoint_subregions_and_refuses_duplicates() {
        let mut mem = region(64 * 1024);
        // SAFETY: as above.
        let h = unsafe {
            RegionHeader::initialize(mem.as_mut_ptr().cast(), 64 * 1024, BackendKind::Private, BackendId(1), 1)
        }
        .unwrap();
        let a = h.reserve_allocator(7, AllocatorId::new(1, 0), 1000).unwrap();
        assert_eq!(a.offset, HEADER_SIZE);
        assert!(h.find_allocator(AllocatorId::new(1, 0)).unwrap().is_none(), "not ready yet");
        h.publish_allocator(AllocatorId::new(1, 0)).unwrap();
        assert_eq!(h.find_allocator(AllocatorId::new(1, 0)).unwrap(), Some(AllocatorEntry { state: ENTRY_READY, ..a }));
        assert!(matches!(h.reserve_allocator(7, AllocatorId::new(1, 0), 10), Err(Error::AlreadyExists { .. })));
        let b = h.reserve_allocator(7, AllocatorId::new(1, 1), 0).unwrap();
        assert_eq!(b.offset, (HEADER_SIZE + 1000).next_multiple_of(SUBREGION_ALIGN));
        assert_eq!(b.offset + b.size, 64 * 1024);
        assert!(matches!(h.reserve_allocator(7, AllocatorId::new(1, 2), 0), Err(Error::OutOfMemory { .. })));
        assert!(matches!(h.find_allocator(AllocatorId::new(9, 9)), Err(Error::UnknownAllocator(_))));
        assert_eq!(h.allocators().count(), 1);
    }
}
