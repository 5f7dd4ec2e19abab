//! `HetAlloc` over a counting upstream as this binary's global allocator: after threads start
//! and end, and the caches are flushed, the upstream holds exactly what it held before — every
//! block came back, none twice.

// The caches are not built under loom (`--cfg loom`), which models only the lock-free parts.
#![cfg(not(loom))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use hetmem_core::cache::{self, HetAlloc};
use hetmem_core::{MemoryKind, MemoryResource};

/// The system allocator, counting live blocks and bytes (atomics only: it must not allocate).
struct Counted {
    blocks: AtomicI64,
    bytes: AtomicI64,
    allocations: AtomicU64,
}

// SAFETY: blocks from the system allocator with the layout asked for, freed with it.
unsafe impl MemoryResource for Counted {
    fn name(&self) -> &str {
        "counted"
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }
    fn allocate(&self, size: usize, align: usize) -> hetmem_core::Result<NonNull<u8>> {
        let layout = Layout::from_size_align(size, align)
            .map_err(|_| hetmem_core::Error::InvalidAlignment { align: align as u64 })?;
        // SAFETY: the caches never ask for zero bytes.
        let p = NonNull::new(unsafe { System.alloc(layout) })
            .ok_or(hetmem_core::Error::OutOfMemory { requested: size as u64, available: 0 })?;
        self.blocks.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(size as i64, Ordering::Relaxed);
        self.allocations.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
        self.blocks.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(size as i64, Ordering::Relaxed);
        // SAFETY: allocated above with this layout.
        unsafe { System.dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(size, align)) }
    }
}

static COUNTED: Counted =
    Counted { blocks: AtomicI64::new(0), bytes: AtomicI64::new(0), allocations: AtomicU64::new(0) };

#[global_allocator]
static A: HetAlloc = HetAlloc::with_resource(&COUNTED);

/// The upstream's live blocks and bytes once this thread's cache and the depot are emptied.
fn settled() -> (i64, i64) {
    cache::flush_thread();
    A.release_depot();
    (COUNTED.blocks.load(Ordering::Relaxed), COUNTED.bytes.load(Ordering::Relaxed))
}

fn churn(threads: usize) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut keep = Vec::new();
                for i in 0..5000usize {
                    let v = vec![t as u8; (i * 31 + t * 7) % 6000 + 1];
                    if i % 4 == 0 {
                        keep.push(v);
                    }
                }
                let s: String = (0..200).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
                (keep, s)
            })
        })
        .collect();
    for h in handles {
        let (keep, s) = h.join().unwrap();
        assert_eq!(s.len(), 200);
        drop(keep); // blocks from the ended thread, freed here
    }
}

#[test]
fn every_block_returns_to_the_upstream_exactly_once() {
    // Warm up: whatever the runtime keeps for good after its first threads is allocated now.
    churn(4);
    let (blocks, bytes) = settled();
    let allocations = COUNTED.allocations.load(Ordering::Relaxed);
    for _ in 0..20 {
        churn(6);
    }
    assert!(COUNTED.allocations.load(Ordering::Relaxed) > allocations);
    assert_eq!(settled(), (blocks, bytes), "the upstream holds what it held before the threads ran");
    assert!(A.stats().hits > 0);
}
