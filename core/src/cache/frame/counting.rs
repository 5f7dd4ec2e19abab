//! [`CountingAllocator`]: counts what passes through another frame allocator.

use core::ptr::NonNull;

use crate::cache::frame::FrameAllocator;
use crate::error::Result;
use core::sync::atomic::{AtomicU64, Ordering};

/// What a [`CountingAllocator`] saw.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CountingStats {
    /// Frames allocated.
    pub allocations: u64,
    /// Frames freed.
    pub deallocations: u64,
    /// Bytes allocated in all.
    pub bytes_allocated: u64,
    /// Bytes in frames not yet freed.
    pub live_bytes: u64,
    /// The most bytes live at once.
    pub peak_bytes: u64,
}

/// Wraps a frame allocator and counts allocations, bytes and the peak of live bytes.
#[derive(Debug, Default)]
pub struct CountingAllocator<A> {
    inner: A,
    allocations: AtomicU64,
    deallocations: AtomicU64,
    bytes_allocated: AtomicU64,
    live_bytes: AtomicU64,
    peak_bytes: AtomicU64,
}

impl<A> CountingAllocator<A> {
    /// Counts what goes through `inner`.
    pub const fn new(inner: A) -> Self {
        CountingAllocator {
            inner,
            allocations: AtomicU64::new(0),
            deallocations: AtomicU64::new(0),
            bytes_allocated: AtomicU64::new(0),
            live_bytes: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
        }
    }

    /// The wrapped allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The counts so far.
    pub fn stats(&self) -> CountingStats {
        CountingStats {
            allocations: self.allocations.load(Ordering::Relaxed),
            deallocations: self.deallocations.load(Ordering::Relaxed),
            bytes_allocated: self.bytes_allocated.load(Ordering::Relaxed),
            live_bytes: self.live_bytes.load(Ordering::Relaxed),
            peak_bytes: self.peak_bytes.load(Ordering::Relaxed),
        }
    }

    /// Starts counting again; the peak restarts from the bytes live now.
    pub fn reset(&self) {
        self.allocations.store(0, Ordering::Relaxed);
        self.deallocations.store(0, Ordering::Relaxed);
        self.bytes_allocated.store(0, Ordering::Relaxed);
        self.peak_bytes.store(self.live_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

// SAFETY: forwards to `A`, which keeps the promises; counting touches no frame.
unsafe impl<A: FrameAllocator> FrameAllocator for CountingAllocator<A> {
    fn allocate(&self, size: usize) -> Result<NonNull<u8>> {
        let p = self.inner.allocate(size)?;
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.bytes_allocated.fetch_add(size as u64, Ordering::Relaxed);
        let live = self.live_bytes.fetch_add(size as u64, Ordering::Relaxed) + size as u64;
        self.peak_bytes.fetch_max(live, Ordering::Relaxed);
        Ok(p)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize) {
        self.deallocations.fetch_add(1, Ordering::Relaxed);
        self.live_bytes.fetch_sub(size as u64, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { self.inner.deallocate(ptr, size) }
    }
}
