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
    assert!(matches!(a.allocate(a.region().len() as usize, 8), Err(Error::OutOfMemory { .. })));
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

/// One step of the model-based test.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Alloc { size: usize, align_log: u32 },
    Realloc { pick: usize, size: usize, align_log: u32 },
    Free { pick: usize },
}

/// Sizes 0..2 MiB, mostly small; alignments 1..4096.
pub(crate) fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let size = prop_oneof![
        6 => 0usize..=512,
        3 => 513usize..=20_000,
        1 => 20_001usize..(2 << 20),
    ];
    prop_oneof![
        4 => (size.clone(), 0u32..=12).prop_map(|(size, align_log)| Op::Alloc { size, align_log }),
        2 => (any::<usize>(), size, 0u32..=12)
            .prop_map(|(pick, size, align_log)| Op::Realloc { pick, size, align_log }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

/// Runs `ops` against `a` and a model (live blocks with their sizes and contents): `check()`
/// after every step, blocks in bounds, never overlapping, contents kept; at the end everything
/// is freed and the free capacity is back where it started.
pub(crate) fn run_model(a: &dyn RegionAllocator, ops: &[Op]) {
    let start = a.stats().free_bytes();
    let mut live: Vec<(OffsetPtr, usize, u8)> = Vec::new();
    let mut seed = 0u8;
    for op in ops {
        seed = seed.wrapping_add(1);
        match *op {
            Op::Alloc { size, align_log } => {
                let align = 1usize << align_log;
                match a.allocate(size, align) {
                    Ok(p) => {
                        assert!(size > 0, "zero size accepted");
                        assert_eq!(p.get() % align as u64, 0);
                        assert!(a.region().contains(p.get(), size as u64));
                        fill(a, p, size, seed);
                        live.push((p, size, seed));
                    }
                    Err(Error::InvalidSize { .. }) => assert_eq!(size, 0),
                    Err(Error::OutOfMemory { .. }) => {}
                    Err(e) => panic!("allocate({size}, {align}): {e}"),
                }
            }
            Op::Realloc { pick, size, align_log } if !live.is_empty() => {
                let i = pick % live.len();
                let (p, old, s) = live[i];
                let align = 1usize << align_log;
                match a.reallocate(p, size, align) {
                    Ok(q) => {
                        assert_eq!(q.get() % align as u64, 0);
                        assert!(holds(a, q, old.min(size), s), "realloc lost contents");
                        fill(a, q, size, s);
                        live[i] = (q, size, s);
                    }
                    Err(Error::InvalidSize { .. }) => assert_eq!(size, 0),
                    Err(Error::OutOfMemory { .. }) => assert!(holds(a, p, old, s)),
                    Err(e) => panic!("reallocate: {e}"),
                }
            }
            Op::Free { pick } if !live.is_empty() => {
                let (p, size, s) = live.swap_remove(pick % live.len());
                assert!(holds(a, p, size, s), "contents changed");
                a.free(p).unwrap();
                assert!(a.free(p).is_err(), "double free accepted");
            }
            _ => {}
        }
        a.check().unwrap_or_else(|e| panic!("after {op:?}: {e}"));
        let mut spans: Vec<_> = live.iter().map(|(p, s, _)| (p.get(), p.get() + *s as u64)).collect();
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "live blocks overlap");
        assert_eq!(a.stats().live_allocations, live.len() as u64);
        assert_eq!(a.stats().bytes_in_use, live.iter().map(|l| l.1 as u64).sum::<u64>());
    }
    for (p, size, s) in live {
        assert!(holds(a, p, size, s));
        a.free(p).unwrap();
    }
    a.check().unwrap();
    assert_eq!(a.stats().free_bytes(), start);
}
