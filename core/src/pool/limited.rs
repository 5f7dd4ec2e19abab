//! [`LimitedResource`]: a byte budget and failure injection around another resource.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::resource::{MemoryKind, MemoryResource};

/// Passes requests to `inner` while the bytes it holds stay within a limit, and refuses a chosen
/// number of upcoming requests on demand.
///
/// Use it to cap what a pool may take from a shared device, or to test what a pool does when its
/// upstream fails. Refusals are `Error::OutOfMemory`, as a real resource's would be.
#[derive(Debug)]
pub struct LimitedResource<R> {
    inner: R,
    limit: usize,
    held: AtomicUsize,
    refuse_next: AtomicUsize,
    allocations: AtomicU64,
    refusals: AtomicU64,
}

impl<R: MemoryResource> LimitedResource<R> {
    /// `inner`, allowed to hold at most `limit` bytes at once.
    pub fn new(inner: R, limit: usize) -> Self {
        LimitedResource {
            inner,
            limit,
            held: AtomicUsize::new(0),
            refuse_next: AtomicUsize::new(0),
            allocations: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        }
    }

    /// Refuses the next `n` requests, whatever the budget says.
    pub fn refuse_next(&self, n: usize) {
        self.refuse_next.store(n, Ordering::Relaxed);
    }

    /// Bytes held by callers now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The budget.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Requests served since creation.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Requests refused since creation.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// The wrapped resource.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    fn refuse(&self, size: usize, available: usize) -> Error {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        Error::OutOfMemory { requested: size as u64, available: available as u64 }
    }
}

// SAFETY: forwards every block to and from `R`, which keeps the promises; the limit only
// refuses requests.
unsafe impl<R: MemoryResource> MemoryResource for LimitedResource<R> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn kind(&self) -> MemoryKind {
        self.inner.kind()
    }

    fn host_accessible(&self) -> bool {
        self.inner.host_accessible()
    }

    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        crate::check_layout(size, align)?;
        let injected = self.refuse_next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if injected.is_ok() {
            return Err(self.refuse(size, self.limit.saturating_sub(self.held())));
        }
        let reserved = self.held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            held.checked_add(size).filter(|&total| total <= self.limit)
        });
        if let Err(held) = reserved {
            return Err(self.refuse(size, self.limit.saturating_sub(held)));
        }
        match self.inner.allocate(size, align) {
            Ok(ptr) => {
                self.allocations.fetch_add(1, Ordering::Relaxed);
                Ok(ptr)
            }
            Err(e) => {
                self.held.fetch_sub(size, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
        // SAFETY: the caller's contract, passed on unchanged: `ptr` came from our `allocate`,
        // which got it from `inner.allocate` with the same size and alignment.
        unsafe { self.inner.deallocate(ptr, size, align) };
        self.held.fetch_sub(size, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::HostResource;

    #[test]
    fn keeps_to_its_budget_and_refuses_on_demand() {
        let r = LimitedResource::new(HostResource, 1000);
        let a = r.allocate(600, 16).unwrap();
        assert!(matches!(r.allocate(500, 16), Err(Error::OutOfMemory { requested: 500, available: 400 })));
        r.refuse_next(1);
        assert!(r.allocate(100, 16).is_err());
        let b = r.allocate(400, 16).unwrap();
        assert_eq!((r.held(), r.allocations(), r.refusals()), (1000, 2, 2));
        // SAFETY: both came from `r` with these sizes.
        unsafe {
            r.deallocate(a, 600, 16);
            r.deallocate(b, 400, 16);
        }
        assert_eq!(r.held(), 0);
    }
}
