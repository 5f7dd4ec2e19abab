//! `flush_thread` with `HetAlloc` as the global allocator and a resource that frees through it:
//! the blocks a flush hands that resource land in the thread's cache over the system allocator.
//! The flush must leave that cache empty all the same, so it comes after the resource's.
//!
//! One test in its own binary, with its own global allocator.
#![cfg(not(loom))]

#[path = "common/through_global.rs"]
mod through_global;

use hetmem_core::cache::{flush_thread, HetAlloc};
use through_global::{cache_blocks, ThroughGlobal};

#[global_allocator]
static A: HetAlloc = HetAlloc::new();

static RESOURCE: ThroughGlobal = ThroughGlobal::new();
static OVER_RESOURCE: HetAlloc = HetAlloc::with_resource(&RESOURCE);

#[test]
fn a_flush_leaves_every_cache_empty_when_a_resource_frees_through_hetalloc() {
    std::thread::spawn(|| {
        // No depot: what the resource's cache returns goes to the resource, and so to `A`.
        OVER_RESOURCE.set_depot_limit(0);
        cache_blocks(&OVER_RESOURCE);
        assert!(OVER_RESOURCE.thread_stats().bytes_cached > 0);
        flush_thread();
        let over_resource = OVER_RESOURCE.thread_stats();
        assert_eq!(over_resource.bytes_cached, 0, "{over_resource:?}");
        let global = A.thread_stats();
        assert_eq!(global.bytes_cached, 0, "the resource's blocks were cached again by HetAlloc: {global:?}");
    })
    .join()
    .unwrap();
}
