//! [`CudaIpcBackend`]: device memory shared between processes with CUDA IPC handles, the handle
//! kept in a POSIX shared-memory segment that other processes attach to by name.
//!
//! ```text
//! shared-memory segment "name" (host)          device allocation (one per region)
//! offset 0      RegionHeader (kind Device)      offset 0     (the header's twin; unused)
//! offset 4096   IpcRecord: state, device UUID,  offset 4096  data, at device_ptr() + offset
//!               size, IPC handle, attach count, ...
//!               the attachers' process stamps
//! ```
//!
//! The segment is as long as the region, so offsets mean the same on both sides, but only its first
//! two pages are ever touched (shared memory is allocated on first touch): the data lives on the
//! device.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream};
use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::header::HEADER_SIZE;
use hetmem_core::{BackendKind, Error, MemoryBackend, Result, ShortStr};

use super::driver::{self, IPC_HANDLE_LEN};
use super::interop::{region_view, DeviceView};
use crate::pinned::{self, impl_shm_device_backend};

/// Version 2 added `creator_token`, version 3 the attachers' stamps: a record of another version
/// is refused as a mismatch.
const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"HMCUIPC3");
/// Attachers whose process the record names, so that one that dies with the memory open is not
/// counted for good. Past this many at once, an attacher is counted without a stamp.
const ATTACHER_STAMPS: usize = 64;
const STATE_READY: u32 = 0x1BC0_0001;
/// `attached` once the creator has claimed the memory to free it: no attacher may count itself in
/// (and open the memory) any more.
const CLOSED: u32 = u32::MAX;

/// What an attacher needs to open the creator's allocation. Lives at offset [`HEADER_SIZE`] of the
/// segment; written by the creator before it sets `state` to ready (release), read after (acquire).
#[repr(C)]
struct IpcRecord {
    magic: u64,
    state: AtomicU32,
    /// Processes that have the allocation open or are opening it, besides the creator; [`CLOSED`]
    /// once the creator frees it.
    attached: AtomicU32,
    creator_pid: u32,
    _pad: u32,
    /// The region's length; the device allocation has exactly this many bytes.
    len: u64,
    device_uuid: [u8; 16],
    handle: [u8; IPC_HANDLE_LEN],
    /// The creator's [`process_token`]: with `creator_pid`, what tells the creator from another
    /// process that has its id (in another PID namespace, or after the creator died).
    creator_token: u64,
    /// The process stamps ([`ProcessStamp::to_word`](hetmem_core::liveness::ProcessStamp::to_word))
    /// of counted attachers, 0 for none: a stamp a dead process left is taken out, and its count
    /// with it (see [`IpcRecord::reap`]).
    stamps: [AtomicU64; ATTACHER_STAMPS],
}

const _: () = assert!(size_of::<IpcRecord>() as u64 <= HEADER_SIZE);

/// Who has the allocation open, besides its creator. An attacher counts itself in before it
/// opens the memory (and out if the open fails, or when it closes it); the creator frees the
/// memory only if it finds nobody counted, and marks it closed in the same step, so it never
/// frees memory that an attacher is opening or has open.
///
/// An attacher also leaves its process stamp in a free stamp slot, after counting itself in. An
/// attacher that dies with the memory open (killed, say) never counts itself out: the creator,
/// before it closes, and `attached`, take out the stamps of processes the
/// [liveness hook](hetmem_core::liveness) confirms dead, each with its count. A stamp is taken
/// out by one compare-and-swap, so its count goes once, by whoever wins it (the attacher itself
/// when it counts out, or a reaper). An attacher that dies between its count and its stamp, or
/// finds every stamp slot taken, stays counted, as every attacher did before stamps.
impl IpcRecord {
    /// Counts one more attacher, and leaves `stamp` (this process's, non-zero) in a free slot;
    /// `None` once the creator has closed the allocation, else the slot taken (`None` inside if
    /// every slot was).
    fn count_in(&self, stamp: u64) -> Option<Option<usize>> {
        let counted =
            self.attached.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < CLOSED - 1).then(|| n + 1));
        counted.ok()?;
        if stamp == 0 {
            return Some(None);
        }
        let free = |slot: &AtomicU64| slot.compare_exchange(0, stamp, Ordering::AcqRel, Ordering::Acquire).is_ok();
        Some(self.stamps.iter().position(free))
    }

    /// Counts out the attacher that [`count_in`](Self::count_in) gave `slot`. Nothing if a
    /// reaper took its stamp out (and its count with it): it was judged dead.
    fn count_out(&self, slot: Option<usize>, stamp: u64) {
        if let Some(slot) = slot {
            let mine = &self.stamps[slot];
            if mine.compare_exchange(stamp, 0, Ordering::AcqRel, Ordering::Acquire).is_err() {
                return;
            }
        }
        self.attached.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes out the stamps, and the counts, of attachers the liveness hook confirms dead.
    fn reap(&self) {
        for slot in &self.stamps {
            let stamp = slot.load(Ordering::Acquire);
            if stamp == 0 || !hetmem_core::liveness::is_dead(hetmem_core::liveness::ProcessStamp::from_word(stamp)) {
                continue;
            }
            if slot.compare_exchange(stamp, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                // The count the dead attacher took and never gave back. Never below zero: a stamp is
                // left only after its count, and taken out with it once.
                let _ = self
                    .attached
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n != CLOSED && n > 0).then(|| n - 1));
            }
        }
    }

    /// Closes the allocation for good if no live attacher is counted: the creator may free it.
    fn close(&self) -> bool {
        self.reap();
        self.attached.compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Live attachers counted now (0 once closed).
    fn attachers(&self) -> u32 {
        self.reap();
        match self.attached.load(Ordering::Acquire) {
            CLOSED => 0,
            n => n,
        }
    }
}

/// A random number drawn once per process: process ids are not unique among the processes that
/// share a segment (containers with PID namespaces of their own, ids reused after a process dies).
fn process_token() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    static TOKEN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TOKEN.get_or_init(|| {
        // RandomState's keys come from the OS's random source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        std::process::id().hash(&mut h);
        std::time::SystemTime::now().hash(&mut h);
        h.finish()
    })
}

/// Options for [`CudaIpcBackend`].
#[derive(Clone, Debug, Default)]
pub struct CudaIpcOptions {
    /// The header segment's options (id, mode, unlink on drop, attach timeout).
    pub shm: ShmOptions,
    /// The device the creator allocates on. Attachers ignore it: they open the allocation on the
    /// device with the creator's UUID, whatever its ordinal in their process.
    pub device: usize,
}

/// Device memory ([`BackendKind::Device`]) that several processes use at once: the creator
/// allocates it with `cuMemAlloc` and publishes its `cuIpcGetMemHandle` handle in a shared-memory
/// segment; each attacher opens it with `cuIpcOpenMemHandle`. [`device_ptr`](MemoryBackend::device_ptr)
/// is the region's offset 0 in this process; the CPU sees only the header
/// ([`host_accessible`](MemoryBackend::host_accessible) is false).
///
/// The creator must outlive the attachers' use: dropping the creator while processes still have
/// the memory open leaves the device memory allocated (until the creator exits) rather than free
/// it under them. An attacher that died with the memory open does not count (see
/// [`attached`](Self::attached)). Dropping a backend first waits for the work queued in every
/// device's primary context in this process (copies through [views](Self::device_view) and
/// kernels, queued on any device's streams, may still use the memory; work in contexts made with
/// `cuCtxCreate` is not seen), including work that does not touch the memory: drop it before
/// starting a kernel that runs for good, or after stopping it.
///
/// # Errors
/// As [`driver::context`] and [`PosixShmBackend`]; an attacher gets [`Error::NotFound`] if no
/// device here has the creator's UUID or the creator has freed the memory (its backend dropped
/// with nobody attached), [`Error::HeaderMismatch`] for a record that is not a CUDA IPC record
/// or has the wrong size, [`Error::TimedOut`] if the creator never finishes, and
/// [`Error::Unsupported`] when attaching in the creating process itself (CUDA refuses that).
#[derive(Debug)]
pub struct CudaIpcBackend {
    shm: PosixShmBackend,
    ctx: Arc<CudaContext>,
    device_ptr: u64,
    /// An attacher's stamp slot in the record (`None`: the creator, or no slot was free) and
    /// the stamp it left there.
    slot: Option<usize>,
    stamp: u64,
}

impl CudaIpcBackend {
    /// Creates segment `name` and `size` bytes of device memory after its header.
    pub fn create(name: &str, size: usize, options: &CudaIpcOptions) -> Result<Self> {
        let ctx = driver::context(options.device)?;
        let uuid = driver::device_uuid(options.device)?;
        let give_memory = |shm: PosixShmBackend| {
            let _bound = driver::bind(&ctx)?;
            let device_ptr = driver::mem_alloc(shm.len() as usize)?;
            // From here, Drop frees the memory.
            let backend = CudaIpcBackend { shm, ctx, device_ptr, slot: None, stamp: 0 };
            backend.publish(uuid)?;
            Ok(backend)
        };
        pinned::create_segment(name, size, &options.shm, BackendKind::Device, give_memory, |b| &mut b.shm)
    }

    /// Writes the creator's record (its memory's IPC handle, the device, the length) and marks it
    /// ready for attachers.
    fn publish(&self, uuid: [u8; 16]) -> Result<()> {
        let (device_ptr, len) = (self.device_ptr, self.shm.len());
        let handle = driver::ipc_get_handle(device_ptr)?;
        let record = self.record_ptr();
        // SAFETY: the record lies in the segment's second page, which only the creator touches
        // until it publishes `state` below; plain fields are written before the release store.
        unsafe {
            (*record).magic = RECORD_MAGIC;
            (*record).creator_pid = std::process::id();
            (*record).creator_token = process_token();
            (*record).len = len;
            (*record).device_uuid = uuid;
            (*record).handle = handle;
        }
        self.record().attached.store(0, Ordering::Relaxed);
        self.record().state.store(STATE_READY, Ordering::Release);
        Ok(())
    }

    /// Attaches to segment `name` and opens the creator's device memory in this process.
    pub fn attach(name: &str, options: &CudaIpcOptions) -> Result<Self> {
        driver::driver()?;
        let started = Instant::now();
        let shm = PosixShmBackend::attach_kind(name, &options.shm, BackendKind::Device)?;
        // The timeout covers both waits: for the segment's header, then for the record.
        let record = wait_for_record(&shm, started, options.shm.attach_timeout)?;
        if record.creator_pid == std::process::id() && record.creator_token == process_token() {
            return Err(Error::Unsupported(
                "a CUDA IPC handle cannot be opened in the process that exported it: use the creator's backend",
            ));
        }
        // Counted before the handle is opened (see `IpcRecord::count_in`).
        let stamp = hetmem_core::liveness::current().to_word();
        let Some(slot) = record.count_in(stamp) else {
            return Err(Error::NotFound {
                what: "CUDA IPC allocation (its creator freed it)",
                name: ShortStr::new(name),
            });
        };
        let opened = device_with_uuid(&record.device_uuid).and_then(driver::context).and_then(|ctx| {
            let _bound = driver::bind(&ctx)?;
            Ok((ctx, driver::ipc_open(&record.handle)?))
        });
        match opened {
            // From here, Drop closes the handle and uncounts this process.
            Ok((ctx, device_ptr)) => Ok(CudaIpcBackend { shm, ctx, device_ptr, slot, stamp }),
            Err(e) => {
                record.count_out(slot, stamp);
                Err(e)
            }
        }
    }

    /// The context the memory is used in by this process.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// How many processes besides the creator have the memory open now (an attacher counts
    /// itself: 1 when it is the only one). Attachers that died with it open are not counted, once
    /// the liveness hook confirms them dead (an attacher killed in the instant between counting
    /// itself in and leaving its stamp, or one of more than 64 at once, stays counted).
    pub fn attached(&self) -> u32 {
        self.record().attachers()
    }

    /// A view of `len` elements of `T` at `offset` (past the header page), for cudarc copies and
    /// kernel launches on `stream` (which must belong to [`context`](Self::context)).
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] or [`Error::InvalidAlignment`] for a range outside the data area or
    /// misaligned for `T`.
    pub fn device_view<T>(&self, offset: u64, len: usize, stream: &Arc<CudaStream>) -> Result<DeviceView<'_, T>> {
        // SAFETY: the device allocation is as long as the region and stays mapped at
        // `device_ptr` until `self` drops.
        unsafe { region_view(self, offset, len, stream) }
    }

    fn record_ptr(&self) -> *mut IpcRecord {
        // SAFETY: the segment is at least two pages (header + data, rounded to pages), so the
        // record at HEADER_SIZE is in bounds; the mapping is page-aligned.
        unsafe { self.shm.base().add(HEADER_SIZE as usize).cast() }
    }

    fn record(&self) -> &IpcRecord {
        // SAFETY: in bounds and aligned (see `record_ptr`); every field is an integer, valid for
        // any bytes, and the ones written concurrently are atomics.
        unsafe { &*self.record_ptr() }
    }
}

/// Waits for the creator to publish the record, until `timeout` after `started`, then checks it.
fn wait_for_record(shm: &PosixShmBackend, started: Instant, timeout: Duration) -> Result<&IpcRecord> {
    // SAFETY: as `CudaIpcBackend::record`: the segment holds at least the header and one page.
    let record = unsafe { &*shm.base().add(HEADER_SIZE as usize).cast::<IpcRecord>() };
    while record.state.load(Ordering::Acquire) != STATE_READY {
        if started.elapsed() >= timeout {
            return Err(Error::TimedOut {
                what: "the CUDA IPC segment's creator to publish its handle",
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if record.magic != RECORD_MAGIC {
        return Err(Error::HeaderMismatch { field: "ipc_magic", expected: RECORD_MAGIC, found: record.magic });
    }
    if record.len != shm.len() {
        return Err(Error::HeaderMismatch { field: "ipc_len", expected: shm.len(), found: record.len });
    }
    Ok(record)
}

/// The ordinal, in this process, of the device with `uuid`.
fn device_with_uuid(uuid: &[u8; 16]) -> Result<usize> {
    let count = driver::driver()?.device_count;
    for ordinal in 0..count {
        if driver::device_uuid(ordinal)? == *uuid {
            return Ok(ordinal);
        }
    }
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    Err(Error::NotFound { what: "CUDA device with the creator's UUID", name: ShortStr::new(&hex) })
}

impl_shm_device_backend!(CudaIpcBackend);

impl Drop for CudaIpcBackend {
    fn drop(&mut self) {
        let Ok(_bound) = driver::bind(&self.ctx) else {
            // The context is gone, and the memory with it; or this is a forked child's copy, whose
            // count and memory are the parent's (and which must not call the driver).
            return;
        };
        // Copies through views and kernels may still be running: views borrow the backend, but
        // the work they queued outlives them, and closing or freeing is not documented to wait.
        // Other devices reach the memory as peers, so that work may be queued in any context. A
        // failure (a context in an error state) means nothing runs there any more.
        if !driver::synchronize_all_bound(&self.ctx) {
            // The context cannot be made current again: nothing to close or free in. An attacher
            // stays counted (the memory may still be mapped here) until this process exits and
            // the creator reaps its stamp; a creator leaves the memory to the driver's clean-up.
            return;
        }
        if !self.shm.is_creator() {
            // SAFETY: opened in `attach`, and the owner is done with it.
            let _ = unsafe { driver::ipc_close(self.device_ptr) };
            self.record().count_out(self.slot, self.stamp);
        } else if self.record().close() {
            // SAFETY: allocated in `create`; no other process has it open or is opening it (and
            // none can start now that it is closed), and the owner is done.
            let _ = unsafe { driver::mem_free(self.device_ptr) };
        }
        // Otherwise other processes still use it: leave it allocated (the driver frees it when
        // this process exits) rather than pull it from under them.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> IpcRecord {
        IpcRecord {
            magic: RECORD_MAGIC,
            state: AtomicU32::new(STATE_READY),
            attached: AtomicU32::new(0),
            creator_pid: 1,
            _pad: 0,
            len: 0,
            device_uuid: [0; 16],
            handle: [0; IPC_HANDLE_LEN],
            creator_token: 0,
            stamps: [const { AtomicU64::new(0) }; ATTACHER_STAMPS],
        }
    }

    /// The stamp of a process that has exited (a child, waited for: its pid is free).
    fn dead_stamp() -> u64 {
        hetmem_backends::liveness::install();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        hetmem_core::liveness::ProcessStamp { pid: child.id(), start_time: 0 }.to_word()
    }

    #[test]
    fn the_creator_frees_only_memory_no_attacher_counts_and_none_counts_in_after() {
        hetmem_backends::liveness::install();
        let me = hetmem_core::liveness::current().to_word();
        let r = record();
        // An attacher opening the memory (counted before its open) keeps the creator from freeing it.
        let slot = r.count_in(me).expect("open");
        assert_eq!(slot, Some(0));
        assert!(!r.close(), "freed under an attacher");
        assert_eq!(r.attachers(), 1, "a live attacher was reaped");
        r.count_out(slot, me);
        assert_eq!(r.stamps[0].load(Ordering::Relaxed), 0);
        assert!(r.close());
        assert_eq!(r.attachers(), 0);
        // Once the creator has freed it, no attacher may open it.
        assert_eq!(r.count_in(me), None, "counted in after the free");
        assert!(!r.close(), "freed twice");
    }

    /// An attacher that died with the memory open (it never counted itself out) does not keep
    /// the creator from freeing it, nor count in `attached` (it used to, for good); one reaped
    /// wrongly that counts itself out later takes nothing off the others' count.
    #[test]
    fn an_attacher_that_died_with_the_memory_open_is_not_counted() {
        let dead = dead_stamp();
        let me = hetmem_core::liveness::current().to_word();
        let r = record();
        let dead_slot = r.count_in(dead).expect("open");
        let my_slot = r.count_in(me).expect("open");
        assert_eq!((dead_slot, my_slot), (Some(0), Some(1)));
        assert_eq!(r.attachers(), 1, "the dead attacher is counted");
        // The dead one's own count-out, had it come, finds its stamp gone and takes nothing.
        r.count_out(dead_slot, dead);
        assert_eq!(r.attachers(), 1, "a stale count-out took a live attacher's count");
        assert!(!r.close(), "freed under a live attacher");
        r.count_out(my_slot, me);
        assert!(r.close(), "a dead attacher kept the memory allocated");
        // Every slot taken: an attacher is counted without a stamp, and counts itself out.
        let r = record();
        for _ in 0..ATTACHER_STAMPS {
            assert!(r.count_in(me).expect("open").is_some());
        }
        let unstamped = r.count_in(me).expect("open");
        assert_eq!(unstamped, None);
        assert_eq!(r.attachers(), ATTACHER_STAMPS as u32 + 1);
        r.count_out(unstamped, me);
        assert_eq!(r.attachers(), ATTACHER_STAMPS as u32);
    }
}
