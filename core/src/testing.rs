//! A heap-backed backend for core's own unit tests (the real backends live in hetmem-backends,
//! which depends on this crate).

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

impl MemoryBackend for HeapBackend {
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

impl Drop for HeapBackend {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}
