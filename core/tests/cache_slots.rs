//! The six slots that serve resources: reading a depot's limit claims none of them, setting one
//! claims the upstream's slot, and an upstream left without one reads a limit of 0 (nothing is
//! cached for it).
//!
//! One test in its own binary: the table of slots is process-wide, and slots are never given up.
#![cfg(not(loom))]

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;

use hetmem_core::cache::HetAlloc;
use hetmem_core::pool::HostResource;
use hetmem_core::{MemoryKind, MemoryResource, Result};

/// Host memory; not zero-sized, so each one in `RESOURCES` has its own address (a distinct
/// upstream).
struct Host(#[allow(dead_code)] u8);

// SAFETY: `HostResource`'s blocks, freed through it.
unsafe impl MemoryResource for Host {
    fn name(&self) -> &str {
        "host"
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }
    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        HostResource.allocate(size, align)
    }
    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
        // SAFETY: the caller's contract, passed on.
        unsafe { HostResource.deallocate(ptr, size, align) }
    }
}

static RESOURCES: [Host; 7] = [Host(0), Host(1), Host(2), Host(3), Host(4), Host(5), Host(6)];

/// Whether `a` caches on this thread: a freed block serves the next request.
fn caches(a: &HetAlloc) -> bool {
    let layout = Layout::from_size_align(64, 16).unwrap();
    // SAFETY: a non-zero layout; each block is freed once with it.
    unsafe {
        let p = a.alloc(layout);
        assert!(!p.is_null());
        a.dealloc(p, layout);
        let q = a.alloc(layout);
        a.dealloc(q, layout);
    }
    a.thread_stats().hits > 0
}

#[test]
fn a_depot_limit_read_claims_no_slot_and_one_set_claims_the_upstreams() {
    std::thread::spawn(|| {
        let default = HetAlloc::new().depot_limit();
        let reader = HetAlloc::with_resource(&RESOURCES[0]);
        assert_eq!(reader.depot_limit(), default, "an upstream without a slot reads the limit its depot starts with");
        let setter = HetAlloc::with_resource(&RESOURCES[1]);
        setter.set_depot_limit(4096);
        assert_eq!(setter.depot_limit(), 4096);
        assert!(caches(&setter));
        // The read took none of the six: the five other resources each get one.
        for (i, resource) in RESOURCES[2..].iter().enumerate() {
            assert!(caches(&HetAlloc::with_resource(resource)), "resource {} found no free slot", i + 2);
        }
        assert!(!caches(&reader), "a seventh resource passes straight through");
        assert_eq!(reader.depot_limit(), 0, "no slot, no depot: nothing is cached");
        reader.set_depot_limit(4096);
        assert_eq!(reader.depot_limit(), 0, "no limit kept without a slot");
        assert_eq!(setter.depot_limit(), 4096);
    })
    .join()
    .unwrap();
}
