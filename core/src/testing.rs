//! A heap-backed backend for core's own unit tests (the real backends live in hetmem-backends,
//! which depends on this crate).
// Under loom (`--cfg loom`) most tests that use these helpers are not built.
#![cfg_attr(loom, allow(dead_code))]

use std::alloc::{alloc_zeroed, dealloc, Layout};

use crate::backend::{BackendId, BackendKind, MemoryBackend};
use crate::header::RegionHeader;

pub(crate) struct HeapBackend {
    base: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned by the backend and shared only through the trait's contract.
unsafe impl Send for HeapBackend {}
// SAFETY: as above.
unsafe impl Sync for HeapBackend {}

impl HeapBackend {
    pub(crate) fn new(id: BackendId, len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null());
        // SAFETY: `base` is `len` fresh bytes, page-aligned, that no one else sees.
        unsafe { RegionHeader::initialize(base, len as u64, BackendKind::Private, id, std::process::id()) }.unwrap();
        HeapBackend { base, layout }
    }
}

// SAFETY: `len` bytes from the global allocator, page-aligned, with the header written at
// their start, freed only when the backend drops.
unsafe impl MemoryBackend for HeapBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Private
    }
    fn base(&self) -> *mut u8 {
        self.base
    }
    fn len(&self) -> u64 {
        self.layout.size() as u64
    }
    fn header(&self) -> &RegionHeader {
        // SAFETY: initialised in `new`, lives as long as `self`.
        unsafe { &*self.base.cast::<RegionHeader>() }
    }
    fn is_creator(&self) -> bool {
        true
    }
}

/// The `MemoryBackend` methods that a test backend wrapping a `HeapBackend` (as its field `.0`)
/// takes from it as they are, creator included: the wrapper writes only those it changes.
macro_rules! heap_backend_methods {
    () => {
        fn kind(&self) -> crate::backend::BackendKind {
            self.0.kind()
        }
        fn base(&self) -> *mut u8 {
            self.0.base()
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn header(&self) -> &crate::header::RegionHeader {
            self.0.header()
        }
        fn is_creator(&self) -> bool {
            self.0.is_creator()
        }
    };
}
pub(crate) use heap_backend_methods;

impl Drop for HeapBackend {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

/// A host resource over the system allocator that records every live block, so tests can prove
/// each block is returned exactly once, with the size and alignment it was allocated with.
pub(crate) struct CountingResource {
    live: std::sync::Mutex<std::collections::HashMap<usize, (usize, usize)>>,
    allocations: std::sync::atomic::AtomicU64,
    deallocations: std::sync::atomic::AtomicU64,
    /// Allocations fail while this is set.
    failing: std::sync::atomic::AtomicBool,
}

impl CountingResource {
    pub(crate) fn new() -> CountingResource {
        CountingResource {
            live: Default::default(),
            allocations: Default::default(),
            deallocations: Default::default(),
            failing: Default::default(),
        }
    }

    pub(crate) fn leak() -> &'static CountingResource {
        Box::leak(Box::new(CountingResource::new()))
    }

    pub(crate) fn live_blocks(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    pub(crate) fn live_bytes(&self) -> usize {
        self.live.lock().unwrap().values().map(|(s, _)| s).sum()
    }

    pub(crate) fn allocations(&self) -> u64 {
        self.allocations.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn deallocations(&self) -> u64 {
        self.deallocations.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_failing(&self, failing: bool) {
        self.failing.store(failing, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: blocks from the global allocator with the layout asked for, freed with it.
unsafe impl crate::MemoryResource for CountingResource {
    fn name(&self) -> &str {
        "counting"
    }
    fn kind(&self) -> crate::MemoryKind {
        crate::MemoryKind::Host
    }
    fn allocate(&self, size: usize, align: usize) -> crate::Result<core::ptr::NonNull<u8>> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(crate::Error::OutOfMemory { requested: size as u64, available: 0 });
        }
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: tests only ask for non-zero sizes.
        let p = core::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) }).unwrap();
        let old = self.live.lock().unwrap().insert(p.as_ptr() as usize, (size, align));
        assert!(old.is_none(), "the system allocator returned a live block twice");
        self.allocations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(p)
    }
    unsafe fn deallocate(&self, ptr: core::ptr::NonNull<u8>, size: usize, align: usize) {
        let entry = self.live.lock().unwrap().remove(&(ptr.as_ptr() as usize));
        assert_eq!(
            entry,
            Some((size, align)),
            "block {ptr:p} returned twice, never allocated here, or with another layout"
        );
        self.deallocations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(ptr.as_ptr(), Layout::from_size_align(size, align).unwrap()) };
    }
}

/// A thread model for core's own tests (the real ones live in hetmem-thread-models, which
/// depends on this crate): std threads, keys as indexes, destructors run at thread exit.
pub(crate) struct TestThreads;

static DESTRUCTORS: std::sync::Mutex<Vec<Option<crate::thread::TlsDestructor>>> = std::sync::Mutex::new(Vec::new());

struct Values(std::cell::RefCell<Vec<*mut core::ffi::c_void>>);

impl Drop for Values {
    fn drop(&mut self) {
        let values = std::mem::take(&mut *self.0.borrow_mut());
        for (key, value) in values.into_iter().enumerate() {
            let d = DESTRUCTORS.lock().unwrap().get(key).copied().flatten();
            if let (false, Some(d)) = (value.is_null(), d) {
                // SAFETY: `tls_create`'s caller promised the destructor accepts its values.
                unsafe { d(value) };
            }
        }
    }
}

std::thread_local! {
    static VALUES: Values = const { Values(std::cell::RefCell::new(Vec::new())) };
}

// SAFETY: values live in the calling thread's own table (`thread_local!`), by key; at thread
// exit each destructor runs once on that thread's values, taken out of the table first.
unsafe impl crate::thread::ThreadModel for TestThreads {
    type TlsKey = usize;
    const NAME: &'static str = "test";

    fn thread_id() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        std::thread_local! { static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed); }
        ID.with(|i| *i)
    }
    fn yield_now() {
        std::thread::yield_now()
    }
    fn sleep_for_us(us: u64) {
        std::thread::sleep(std::time::Duration::from_micros(us))
    }
    unsafe fn tls_create(destructor: Option<crate::thread::TlsDestructor>) -> crate::error::Result<usize> {
        let mut d = DESTRUCTORS.lock().unwrap();
        d.push(destructor);
        Ok(d.len() - 1)
    }
    fn tls_get(key: usize) -> *mut core::ffi::c_void {
        VALUES
            .try_with(|v| v.0.borrow().get(key).copied().unwrap_or(core::ptr::null_mut()))
            .unwrap_or(core::ptr::null_mut())
    }
    fn tls_set(key: usize, value: *mut core::ffi::c_void) -> crate::error::Result<()> {
        VALUES.with(|v| {
            let mut v = v.0.borrow_mut();
            if v.len() <= key {
                v.resize(key + 1, core::ptr::null_mut());
            }
            v[key] = value;
        });
        Ok(())
    }
    fn tls_delete(key: usize) -> crate::error::Result<()> {
        if let Some(d) = DESTRUCTORS.lock().unwrap().get_mut(key) {
            *d = None;
        }
        Ok(())
    }
}

/// A process id the test liveness hook calls dead (no real process has it on Linux, whose
/// pids stay below 2^22; it fits the 30 bits a directory entry keeps of a creator's pid).
pub(crate) const DEAD_PID: u32 = 0x3fff_fff1;

/// The owner token of a process that has died, for tests that forge a dead owner.
pub(crate) fn dead_token() -> u64 {
    (DEAD_PID as u64) << 32
}

struct TestLiveness;

// SAFETY: calls dead only `DEAD_PID`, which no real process has (Linux pids stay below 2^22).
unsafe impl crate::liveness::ProcessLiveness for TestLiveness {
    fn current(&self) -> crate::liveness::ProcessStamp {
        crate::liveness::ProcessStamp { pid: std::process::id(), start_time: 0 }
    }
    fn is_alive(&self, stamp: crate::liveness::ProcessStamp) -> bool {
        stamp.pid != DEAD_PID
    }
}

/// Installs a liveness hook under which only [`DEAD_PID`] is dead (every test may call it).
pub(crate) fn install_test_liveness() {
    static HOOK: &dyn crate::liveness::ProcessLiveness = &TestLiveness;
    crate::liveness::install(&HOOK);
}

#[cfg(all(unix, not(loom)))]
#[path = "forked_child.rs"]
mod forked_child;
#[cfg(all(unix, not(loom)))]
pub(crate) use forked_child::in_a_forked_child;

/// Runs `take` (which takes a lock and returns its guard) on another thread, and holds the guard
/// there until the returned value drops: a thread that is inside a critical section of the lock
/// when the test forks.
#[cfg(unix)]
pub(crate) fn held_by_another_thread<G>(take: impl FnOnce() -> G + Send + 'static) -> impl Drop {
    struct Release(Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>);
    impl Drop for Release {
        fn drop(&mut self) {
            if let Some((go, holder)) = self.0.take() {
                let _ = go.send(());
                holder.join().unwrap();
            }
        }
    }
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let guard = take();
        held_tx.send(()).unwrap();
        let _ = go_rx.recv();
        drop(guard);
    });
    held_rx.recv().unwrap();
    Release(Some((go_tx, holder)))
}
