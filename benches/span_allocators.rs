//! The workload runner's paths as criterion benches, peers side by side: a 64-byte alloc+free
//! pair (W1) and a random 16..=4096 byte step over 1000 slots (W2), for glibc malloc, mimalloc,
//! and the two span allocators over a `PosixShmBackend`. `cargo run --release --example
//! workloads` gives the table with ratios; these give criterion's statistics.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use hetmem::allocators::ThreadLocalAllocator;
use hetmem::prelude::*;

trait Pair {
    fn alloc(&self, size: usize) -> u64;
    fn free(&self, p: u64, size: usize);
}

struct Sys;
impl Pair for Sys {
    fn alloc(&self, size: usize) -> u64 {
        // SAFETY: non-zero size, valid alignment.
        unsafe { System.alloc(Layout::from_size_align_unchecked(size, 8)) as u64 }
    }
    fn free(&self, p: u64, size: usize) {
        // SAFETY: `p` came from `alloc(size)`.
        unsafe { System.dealloc(p as *mut u8, Layout::from_size_align_unchecked(size, 8)) }
    }
}

struct Mi;
impl Pair for Mi {
    fn alloc(&self, size: usize) -> u64 {
        // SAFETY: as for System.
        unsafe { mimalloc::MiMalloc.alloc(Layout::from_size_align_unchecked(size, 8)) as u64 }
    }
    fn free(&self, p: u64, size: usize) {
        // SAFETY: as for System.
        unsafe { mimalloc::MiMalloc.dealloc(p as *mut u8, Layout::from_size_align_unchecked(size, 8)) }
    }
}

/// The allocator and the manager that keeps its segment mapped.
struct Shm<A: RegionAllocator>(Arc<A>, #[allow(dead_code)] MemoryManager);
impl<A: RegionAllocator> Pair for Shm<A> {
    fn alloc(&self, size: usize) -> u64 {
        self.0.allocate(size, 8).unwrap().get()
    }
    fn free(&self, p: u64, _size: usize) {
        self.0.free(OffsetPtr::new(p)).unwrap()
    }
}

fn shm<A: AllocatorType>(tag: &str) -> Shm<A> {
    let mm = MemoryManager::new();
    let name = format!("/hetmem-bench-{tag}-{}", std::process::id());
    let b = mm.add_backend(PosixShmBackend::create(&name, 256 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.create_allocator::<A>(b.id(), AllocatorId::new(1, 0), 0, &Default::default()).unwrap();
    Shm(a, mm)
}

fn peers() -> Vec<(&'static str, Box<dyn Pair>)> {
    vec![
        ("system", Box::new(Sys)),
        ("mimalloc", Box::new(Mi)),
        ("scalable-page", Box::new(shm::<ScalablePageAllocator>("spa"))),
        ("thread-local", Box::new(shm::<ThreadLocalAllocator>("tla"))),
    ]
}

fn w1(c: &mut Criterion) {
    let mut g = c.benchmark_group("W1 64 B alloc+free");
    for (name, a) in peers() {
        g.bench_function(name, |b| {
            b.iter(|| {
                let p = a.alloc(64);
                a.free(black_box(p), 64)
            })
        });
    }
    g.finish();
}

fn w2(c: &mut Criterion) {
    let mut g = c.benchmark_group("W2 16..=4096 B step, 1000 slots");
    for (name, a) in peers() {
        let mut slots = vec![(0u64, 0usize); 1000];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let slot = &mut slots[(x % 1000) as usize];
                if slot.0 == 0 {
                    let size = 16 + (x >> 16) as usize % 4081;
                    *slot = (a.alloc(size), size);
                } else {
                    a.free(slot.0, slot.1);
                    *slot = (0, 0);
                }
            })
        });
        for (p, size) in slots {
            if p != 0 {
                a.free(p, size);
            }
        }
    }
    g.finish();
}

criterion_group!(benches, w1, w2);
criterion_main!(benches);
