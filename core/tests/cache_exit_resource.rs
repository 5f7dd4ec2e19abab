//! A thread's exit with `HetAlloc` as the global allocator and a resource that frees through it:
//! the blocks that the resource's cache hands back at the exit land in the global `HetAlloc`,
//! whose cache on that thread may already be returned. They must go upstream then, not into a
//! cache that nothing returns any more (its thread is gone).
//!
//! One test in its own binary, with its own global allocator.
#![cfg(not(loom))]

#[path = "common/through_global.rs"]
mod through_global;

use std::sync::atomic::Ordering;

use hetmem_core::cache::HetAlloc;
use through_global::{cache_blocks, ThroughGlobal};

#[global_allocator]
static A: HetAlloc = HetAlloc::new();

static RESOURCE: ThroughGlobal = ThroughGlobal::new();
static OVER_RESOURCE: HetAlloc = HetAlloc::with_resource(&RESOURCE);

#[test]
fn blocks_a_resource_frees_through_hetalloc_at_a_threads_exit_go_upstream() {
    // No depot: what the resource's cache returns at the exit goes to the resource, and so to
    // `A`, the global allocator (whose slot, the system allocator's, is returned first).
    OVER_RESOURCE.set_depot_limit(0);
    let before = A.stats();
    let cached = std::thread::spawn(|| {
        let cached = cache_blocks(&OVER_RESOURCE);
        assert!(OVER_RESOURCE.thread_stats().bytes_cached >= cached);
        assert_eq!(RESOURCE.freed.load(Ordering::Relaxed), 0, "all cached so far");
        cached
    })
    .join()
    .unwrap();
    let freed = RESOURCE.freed.load(Ordering::Relaxed);
    assert!(freed >= cached, "the exiting thread returned its cache over the resource: {freed}");
    let returned = A.stats().bytes_returned - before.bytes_returned;
    assert!(returned >= freed, "{freed} bytes freed into the exited thread's cache, {returned} of them went upstream");
}
