//! Where a caching tier gets memory when it has none, and where memory over its limits goes.

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::ptr::NonNull;
use std::alloc::System;

use crate::resource::MemoryResource;

/// The upstream of a caching tier.
#[derive(Clone, Copy)]
pub enum Upstream {
    /// The system allocator (`std::alloc::System`: malloc on unix).
    System,
    /// The program's `#[global_allocator]` (`std::alloc::alloc`). Not for a [`HetAlloc`] that
    /// is itself the global allocator: it would call itself.
    ///
    /// [`HetAlloc`]: super::HetAlloc
    Global,
    /// Any [`MemoryResource`] whose memory the CPU can touch (the caches write their links
    /// into free blocks).
    Resource(&'static dyn MemoryResource),
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::System => f.write_str("System"),
            Upstream::Global => f.write_str("Global"),
            Upstream::Resource(r) => write!(f, "Resource({})", r.name()),
        }
    }
}

/// Two resource upstreams are equal when they are one object of one type: the address and the
/// vtable both match. The address alone is not enough: a resource and its first field (or two
/// zero-sized resources) share one, and a cache or depot that took them for one upstream would
/// free one's blocks to the other. (One resource may be seen through two copies of its vtable,
/// from two codegen units: it then counts as two upstreams, which costs a thread-cache slot or
/// refuses a depot, never a block.)
impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Upstream::System, Upstream::System) | (Upstream::Global, Upstream::Global) => true,
            (Upstream::Resource(a), Upstream::Resource(b)) => core::ptr::eq(*a, *b),
            _ => false,
        }
    }
}

impl Upstream {
    /// `size` bytes aligned to `align`, or `None` when the upstream is out of memory or the
    /// request is not one a [`Layout`] with a non-zero size can describe (a zero `size`, an
    /// `align` that is not a power of two, `size` rounded up to `align` overflowing `isize`).
    #[inline]
    pub fn allocate(&self, size: usize, align: usize) -> Option<NonNull<u8>> {
        if size == 0 {
            return None;
        }
        match self {
            Upstream::System => {
                let layout = Layout::from_size_align(size, align).ok()?;
                // SAFETY: `size` is non-zero (checked above) and the layout is valid.
                NonNull::new(unsafe { System.alloc(layout) })
            }
            Upstream::Global => {
                let layout = Layout::from_size_align(size, align).ok()?;
                // SAFETY: as above.
                NonNull::new(unsafe { std::alloc::alloc(layout) })
            }
            Upstream::Resource(r) => {
                // A resource may take `align` for a power of two: the check is the layout's, as
                // above (a request that gets here is a miss, and about to ask the resource).
                Layout::from_size_align(size, align).ok()?;
                r.allocate(size, align).ok()
            }
        }
    }

    /// Returns a block.
    ///
    /// # Safety
    /// `ptr` came from [`Self::allocate`] on an equal upstream with this `size` and `align`, and
    /// is not used again.
    #[inline]
    pub unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
        match self {
            Upstream::System => {
                // SAFETY: the caller's contract; the layout was valid when allocated.
                unsafe { System.dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(size, align)) }
            }
            Upstream::Global => {
                // SAFETY: as above.
                unsafe { std::alloc::dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(size, align)) }
            }
            // SAFETY: the caller's contract is the resource's.
            Upstream::Resource(r) => unsafe { r.deallocate(ptr, size, align) },
        }
    }

    /// Grows or shrinks a block in place or by moving it, keeping `min(old, new)` bytes; `None`
    /// (the block left as it was) when out of memory, or over a resource the CPU cannot copy.
    ///
    /// # Safety
    /// As for [`Self::deallocate`] with `old_size`; `new_size` is non-zero and valid with `align`.
    pub unsafe fn reallocate(
        &self,
        ptr: NonNull<u8>,
        old_size: usize,
        align: usize,
        new_size: usize,
    ) -> Option<NonNull<u8>> {
        match self {
            Upstream::System => {
                // SAFETY: the caller's contract.
                NonNull::new(unsafe {
                    System.realloc(ptr.as_ptr(), Layout::from_size_align_unchecked(old_size, align), new_size)
                })
            }
            Upstream::Global => {
                // SAFETY: the caller's contract.
                NonNull::new(unsafe {
                    std::alloc::realloc(ptr.as_ptr(), Layout::from_size_align_unchecked(old_size, align), new_size)
                })
            }
            Upstream::Resource(r) => {
                if !r.host_accessible() {
                    return None;
                }
                let new = self.allocate(new_size, align)?;
                // SAFETY: both blocks are live and distinct; each holds at least the bytes copied.
                unsafe {
                    core::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), old_size.min(new_size));
                    self.deallocate(ptr, old_size, align);
                }
                Some(new)
            }
        }
    }

    /// Whether the CPU may write into this upstream's blocks (caches need that for their links).
    pub fn host_accessible(&self) -> bool {
        match self {
            Upstream::System | Upstream::Global => true,
            Upstream::Resource(r) => r.host_accessible(),
        }
    }

    /// Like [`Self::allocate`], with the block zeroed (by the upstream where it can).
    pub fn allocate_zeroed(&self, size: usize, align: usize) -> Option<NonNull<u8>> {
        if size == 0 {
            return None;
        }
        match self {
            Upstream::System => {
                let layout = Layout::from_size_align(size, align).ok()?;
                // SAFETY: non-zero size (checked above), valid layout.
                NonNull::new(unsafe { System.alloc_zeroed(layout) })
            }
            Upstream::Global => {
                let layout = Layout::from_size_align(size, align).ok()?;
                // SAFETY: as above.
                NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            }
            Upstream::Resource(r) => {
                if !r.host_accessible() {
                    return None;
                }
                let p = self.allocate(size, align)?;
                // SAFETY: a fresh block of `size` bytes the CPU may write (checked above).
                unsafe { core::ptr::write_bytes(p.as_ptr(), 0, size) };
                Some(p)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `allocate` is a safe function: a zero size (undefined behaviour for `GlobalAlloc::alloc`)
    /// is refused, not passed on.
    #[test]
    fn zero_sized_requests_are_refused() {
        for upstream in [Upstream::System, Upstream::Global] {
            assert!(upstream.allocate(0, 8).is_none(), "{upstream:?}");
            assert!(upstream.allocate_zeroed(0, 8).is_none(), "{upstream:?}");
            assert!(upstream.allocate(8, 3).is_none(), "{upstream:?}: not a power of two");
            assert!(upstream.allocate(isize::MAX as usize, 16).is_none(), "{upstream:?}: too large once aligned");
            let p = upstream.allocate(24, 8).unwrap();
            // SAFETY: allocated above with this size and alignment.
            unsafe { upstream.deallocate(p, 24, 8) };
        }
    }

    /// A resource upstream refuses what no `Layout` describes before its resource sees it, as
    /// the promise says: a resource may assume a power-of-two alignment.
    #[test]
    fn a_resource_upstream_refuses_bad_layouts_itself() {
        use crate::resource::MemoryKind;
        use core::sync::atomic::{AtomicUsize, Ordering};

        struct Counting(AtomicUsize);
        // SAFETY: every block comes from and goes back to the system allocator with its layout.
        unsafe impl MemoryResource for Counting {
            fn name(&self) -> &str {
                "counting"
            }
            fn kind(&self) -> MemoryKind {
                MemoryKind::Host
            }
            fn allocate(&self, size: usize, align: usize) -> crate::Result<NonNull<u8>> {
                self.0.fetch_add(1, Ordering::Relaxed);
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    return Err(crate::Error::InvalidAlignment { align: align as u64 });
                };
                // SAFETY: `size` is non-zero: the upstream refuses zero.
                NonNull::new(unsafe { System.alloc(layout) })
                    .ok_or(crate::Error::OutOfMemory { requested: size as u64, available: 0 })
            }
            unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
                // SAFETY: the caller's contract: allocated above with this layout.
                unsafe { System.dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(size, align)) }
            }
        }
        static RESOURCE: Counting = Counting(AtomicUsize::new(0));
        let upstream = Upstream::Resource(&RESOURCE);
        assert!(upstream.allocate(0, 8).is_none());
        assert!(upstream.allocate(8, 3).is_none(), "not a power of two");
        assert!(upstream.allocate(8, 0).is_none(), "zero alignment");
        assert!(upstream.allocate(isize::MAX as usize, 16).is_none(), "too large once aligned");
        assert!(upstream.allocate_zeroed(8, 3).is_none());
        assert_eq!(RESOURCE.0.load(Ordering::Relaxed), 0, "a bad layout reached the resource");
        let p = upstream.allocate_zeroed(24, 8).unwrap();
        // SAFETY: allocated above with this size and alignment.
        unsafe { upstream.deallocate(p, 24, 8) };
        assert_eq!(RESOURCE.0.load(Ordering::Relaxed), 1);
    }
}
