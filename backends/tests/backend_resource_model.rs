//! `BackendResource` (blocks carved from a backend's region) against a model of its live blocks:
//! random requests (some too large for what is left, some malformed), frees, and frees of
//! addresses it never handed out, with `check()` after every step; out of memory is an error that
//! changes nothing; after all frees the resource is back to its starting free capacity and hands
//! out its whole range again in one block. Threads sharing one resource end there too.

use std::ptr::NonNull;
use std::sync::Arc;

use hetmem_backends::MallocBackend;
use hetmem_core::pool::BackendResource;
use hetmem_core::{BackendId, Error, MemoryBackend, MemoryResource};
use proptest::prelude::*;

/// Every block starts on, and is sized in, 64-byte granules.
const GRANULE: u64 = 64;

fn resource(data: usize) -> BackendResource {
    let backend: Arc<dyn MemoryBackend> = Arc::new(MallocBackend::create(data, BackendId(9)).unwrap());
    // SAFETY: the test's own backend, which nothing else carves.
    unsafe { BackendResource::new(backend) }.unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Allocate {
        size: usize,
        align_log: u32,
    },
    Free {
        pick: usize,
    },
    /// A deallocate of an address inside a live block (not its start), or past the range.
    FreeBogus {
        pick: usize,
        inside: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        6 => 1usize..=4096,
        3 => 4097usize..=48 << 10,
        1 => Just(0usize),
    ];
    prop_oneof![
        5 => (size, 0u32..=13).prop_map(|(size, align_log)| Op::Allocate { size, align_log }),
        4 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, inside)| Op::FreeBogus { pick, inside }),
    ]
}

fn rounded(size: usize) -> u64 {
    (size as u64).next_multiple_of(GRANULE)
}

/// The bytes of a live block, which the resource hands out as host memory here.
fn bytes<'a>(p: NonNull<u8>, size: usize) -> &'a mut [u8] {
    // SAFETY: a live block of at least `size` bytes that only the test touches.
    unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn backend_resource_matches_its_model(ops in proptest::collection::vec(op(), 1..250)) {
        let r = resource(192 << 10);
        let (start, len) = r.range();
        prop_assert_eq!(r.free_bytes(), len);
        r.check().unwrap();
        // (block, size, align, fill byte)
        let mut live: Vec<(NonNull<u8>, usize, usize, u8)> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let before = r.free_bytes();
            match op {
                Op::Allocate { size, align_log } => {
                    let align = 1usize << align_log;
                    match r.allocate(size, align) {
                        Ok(p) => {
                            prop_assert!(size > 0, "a zero-size block");
                            prop_assert_eq!(p.as_ptr() as usize % align.max(GRANULE as usize), 0);
                            let offset = r.offset_of(p).expect("a block outside the range");
                            prop_assert!(offset >= start && offset + size as u64 <= start + len);
                            prop_assert_eq!(r.free_bytes(), before - rounded(size));
                            let fill = step as u8;
                            bytes(p, size).fill(fill);
                            live.push((p, size, align, fill));
                        }
                        Err(Error::InvalidSize { .. }) => prop_assert_eq!(size, 0),
                        Err(Error::OutOfMemory { available, .. }) => {
                            // Refused only when no free block holds the request at any alignment
                            // of its start (the resource fits on that worst case).
                            let footprint = rounded(size) + (align as u64).saturating_sub(GRANULE);
                            prop_assert!(
                                available < footprint,
                                "refused {size} (align {align}) with {available} free in one block"
                            );
                            prop_assert_eq!(r.free_bytes(), before, "a refusal changed the free bytes");
                        }
                        Err(e) => prop_assert!(false, "allocate({size}, {align}): {e}"),
                    }
                }
                Op::Free { pick } if !live.is_empty() => {
                    let (p, size, align, fill) = live.swap_remove(pick % live.len());
                    prop_assert!(bytes(p, size).iter().all(|&b| b == fill), "contents changed");
                    // SAFETY: from `allocate(size, align)` on `r`, freed once.
                    unsafe { r.deallocate(p, size, align) };
                    prop_assert_eq!(r.free_bytes(), before + rounded(size));
                }
                Op::FreeBogus { pick, inside } if !live.is_empty() => {
                    let (p, size, align, _) = live[pick % live.len()];
                    let bogus = if inside {
                        // SAFETY: inside (or one past) the live block.
                        unsafe { p.add(size.div_ceil(2).min(size)) }
                    } else {
                        // SAFETY: only an address handed to `deallocate`, which must refuse it.
                        NonNull::new(p.as_ptr().wrapping_add((len + GRANULE) as usize)).unwrap()
                    };
                    if bogus != p {
                        // SAFETY: the trait's contract is broken on purpose: the resource must
                        // refuse an address it did not hand out without touching anything.
                        unsafe { r.deallocate(bogus, size, align) };
                        prop_assert_eq!(r.free_bytes(), before, "a bogus free changed the free bytes");
                    }
                }
                _ => {}
            }
            r.check().unwrap_or_else(|e| panic!("after step {step}: {e}"));
            let mut spans: Vec<(usize, usize)> =
                live.iter().map(|&(p, size, _, _)| (p.as_ptr() as usize, p.as_ptr() as usize + size)).collect();
            spans.sort_unstable();
            prop_assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "live blocks overlap");
            let in_use: u64 = live.iter().map(|&(_, size, _, _)| rounded(size)).sum();
            prop_assert_eq!(r.free_bytes(), len - in_use);
        }
        for (p, size, align, fill) in live {
            prop_assert!(bytes(p, size).iter().all(|&b| b == fill), "contents changed");
            // SAFETY: from `allocate(size, align)` on `r`, freed once.
            unsafe { r.deallocate(p, size, align) };
        }
        r.check().unwrap();
        prop_assert_eq!(r.free_bytes(), len, "free capacity not back to the start");
        // Every free block merged back: the whole range is one block again.
        let all = r.allocate(len as usize, 64).expect("the whole range after all frees");
        // SAFETY: just allocated with this layout.
        unsafe { r.deallocate(all, len as usize, 64) };
        r.check().unwrap();
    }
}

/// Threads share one resource (it is `Sync`): no block is handed to two of them, out of memory is
/// an error they recover from, and once all have freed everything the range is whole again.
#[test]
fn threads_sharing_a_resource_end_with_it_whole() {
    let r = resource(256 << 10);
    let (_, len) = r.range();
    let refused = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let (r, refused) = (&r, &refused);
            s.spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(t) << 32;
                let mut live: Vec<(NonNull<u8>, usize)> = Vec::new();
                for _ in 0..3000 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if live.len() < 40 && rng % 3 != 0 {
                        let size = 1 + (rng >> 16) as usize % 12_000;
                        match r.allocate(size, 64) {
                            Ok(p) => {
                                bytes(p, size).fill(t);
                                live.push((p, size));
                            }
                            Err(Error::OutOfMemory { .. }) => {
                                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => panic!("{e}"),
                        }
                    } else if !live.is_empty() {
                        let (p, size) = live.swap_remove((rng >> 8) as usize % live.len());
                        assert!(bytes(p, size).iter().all(|&b| b == t), "another thread wrote into a block");
                        // SAFETY: from `allocate(size, 64)` on `r`, freed once.
                        unsafe { r.deallocate(p, size, 64) };
                    }
                }
                for (p, size) in live {
                    assert!(bytes(p, size).iter().all(|&b| b == t), "another thread wrote into a block");
                    // SAFETY: as above.
                    unsafe { r.deallocate(p, size, 64) };
                }
            });
        }
    });
    r.check().unwrap();
    assert_eq!(r.free_bytes(), len);
    assert!(refused.into_inner() > 0, "the threads never ran the resource out of memory");
    let all = r.allocate(len as usize, 64).unwrap();
    // SAFETY: just allocated with this layout.
    unsafe { r.deallocate(all, len as usize, 64) };
}
