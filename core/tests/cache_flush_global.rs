//! `flush_thread` with `HetAlloc` as the global allocator: the recycled frames' upstream is then
//! `HetAlloc` itself, so the frames a flush returns land in the thread's `HetAlloc` cache. The
//! flush must leave every tier of the thread empty all the same.
//!
//! One test in its own binary, with its own global allocator.
#![cfg(not(loom))]

use hetmem_core::cache::frame::{FrameAllocator, ThreadFrames};
use hetmem_core::cache::{flush_thread, HetAlloc};

#[global_allocator]
static A: HetAlloc = HetAlloc::new();

#[test]
fn a_flush_leaves_every_tier_empty_when_frames_come_from_hetalloc() {
    std::thread::spawn(|| {
        let frames: Vec<_> = (0..50).map(|_| ThreadFrames.allocate(100).unwrap()).collect();
        for f in frames {
            // SAFETY: from `allocate(100)`, freed once.
            unsafe { ThreadFrames.deallocate(f, 100) };
        }
        assert!(hetmem_core::cache::frame::default_frame_allocator().thread_stats().bytes_cached > 0);
        flush_thread();
        let frames = hetmem_core::cache::frame::default_frame_allocator().thread_stats();
        assert_eq!(frames.bytes_cached, 0, "{frames:?}");
        let blocks = A.thread_stats();
        assert_eq!(blocks.bytes_cached, 0, "the frames flushed were cached again by HetAlloc: {blocks:?}");
    })
    .join()
    .unwrap();
}
