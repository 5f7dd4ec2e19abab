//! Shared tests for region allocators: what every allocator must do, run against each.

use std::sync::Arc;

use crate::allocator::RegionAllocator;
use crate::backend::BackendId;
use crate::error::Error;
use crate::header::HEADER_SIZE;
use crate::ptr::OffsetPtr;
use crate::region::Region;
use crate::testing::HeapBackend;

/// The whole data area of a fresh heap backend of `len` data bytes.
pub(crate) fn region_of(len: usize) -> Region {
    let backend = Arc::new(HeapBackend::new(BackendId(1), len + HEADER_SIZE as usize));
    Region::whole(backend).unwrap()
}

fn fill(a: &dyn RegionAllocator, p: OffsetPtr, len: usize, seed: u8) {
    let ptr = a.region().ptr(p.get(), len as u64).unwrap();
    // SAFETY: a live block of at least `len` bytes, in bounds (checked).
    unsafe { core::ptr::write_bytes(ptr, seed, len) };
}

fn holds(a: &dyn RegionAllocator, p: OffsetPtr, len: usize, seed: u8) -> bool {
    let ptr = a.region().ptr(p.get(), len as u64).unwrap();
    // SAFETY: as in `fill`.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len) };
    bytes.iter().all(|&b| b == seed)
}

/// Sizes across every class and into large blocks, every alignment, contents kept, bad input
/// refused, out of memory recoverable, and back to the starting free capacity at the end.
pub(crate) fn exercise(a: &dyn RegionAllocator) {
    let start = a.stats();
    a.check().unwrap();
    let mut live = Vec::new();
    let mut seed = 1u8;
    for &size in &[1usize, 15, 16, 17, 63, 64, 65, 100, 1000, 4096, 16384, 16385, 40_000, 300_000] {
        for &align in &[1usize, 8, 16, 64, 256, 4096] {
            let p = a.allocate(size, align).unwrap();
            a.check().unwrap_or_else(|e| panic!("size {size} align {align}: {e}"));
            assert_eq!(p.get() % align as u64, 0, "size {size} align {align}");
            assert_eq!(a.size_of(p).unwrap(), size);
            fill(a, p, size, seed);
            live.push((p, size, seed));
            seed = seed.wrapping_add(1);
        }
    }
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, live.len() as u64);
    // No two live blocks overlap.
    let mut spans: Vec<_> = live.iter().map(|(p, s, _)| (p.get(), p.get() + *s as u64)).collect();
    spans.sort_unstable();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    for &(p, size, seed) in &live {
        assert!(holds(a, p, size, seed));
    }
    // Grow and shrink keep the common prefix.
    let (p, size, s) = live.pop().unwrap();
    let q = a.reallocate(p, size * 2, 64).unwrap();
    assert!(holds(a, q, size, s));
    let r = a.reallocate(q, 10, 16).unwrap();
    assert!(holds(a, r, 10, s));
    a.free(r).unwrap();
    // Bad input.
    assert!(matches!(a.allocate(0, 8), Err(Error::InvalidSize { .. })));
    assert!(matches!(a.allocate(8, 3), Err(Error::InvalidAlignment { .. })));
    assert!(matches!(a.allocate(8, 8192), Err(Error::InvalidAlignment { .. })));
    assert!(a.free(OffsetPtr::NULL).is_err());
    assert!(a.free(OffsetPtr::new(live[0].0.get() + 16)).is_err());
    assert!(a.free(OffsetPtr::new(a.region().end() + 64)).is_err());
    let (p0, _, _) = live.remove(0);
    a.free(p0).unwrap();
    assert!(matches!(a.free(p0), Err(Error::InvalidFree { .. })), "double free");
    // Out of memory is an error and the allocator stays usable.
    assert!(matches!(
        a.allocate(a.region().len() as usize, 8),
        Err(Error::OutOfMemory { .. })
    ));
    let p = a.allocate(32, 8).unwrap();
    a.free(p).unwrap();
    for (p, size, seed) in live {
        assert!(holds(a, p, size, seed));
        a.free(p).unwrap();
    }
    a.check().unwrap();
    let end = a.stats();
    assert_eq!(end.live_allocations, 0);
    assert_eq!(end.bytes_in_use, 0);
    assert_eq!(end.free_bytes(), start.free_bytes());
    assert_eq!(end.total_allocations, end.total_frees);
}
