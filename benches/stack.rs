//! The StackAllocator's LIFO alloc+free pair over shared memory, beside glibc malloc's pair.
//!
//! `cargo bench --bench stack`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hetmem::prelude::*;

fn pairs(c: &mut Criterion) {
    let name = format!("/hetmem-bench-stack-{}", std::process::id());
    let mm = MemoryManager::new();
    let shm = mm.add_backend(PosixShmBackend::create(&name, 1 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let id = AllocatorId::new(1, 0);
    let stack = mm.create_allocator::<StackAllocator>(shm.id(), id, 0, &Default::default()).unwrap();

    let mut group = c.benchmark_group("alloc+free 64 B");
    group.bench_function("stack (posix shm)", |b| {
        b.iter(|| {
            let p = stack.allocate(black_box(64), 8).unwrap();
            stack.free(black_box(p)).unwrap();
        })
    });
    let layout = Layout::from_size_align(64, 8).unwrap();
    group.bench_function("system (glibc)", |b| {
        b.iter(|| {
            // SAFETY: non-zero layout; freed with the same layout.
            unsafe {
                let p = System.alloc(black_box(layout));
                System.dealloc(black_box(p), layout);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, pairs);
criterion_main!(benches);
