//! Two real processes share one segment: A creates a `PosixShmBackend` and a `StackAllocator` and
//! writes data; B (this test binary, re-executed) attaches, finds A's data through its own
//! `MemoryManager`, allocates more and writes; A reads B's data.

use std::process::Command;

use hetmem::prelude::*;

const CHILD_ENV: &str = "HETMEM_XPROC_CHILD";
const ALLOCATOR: AllocatorId = AllocatorId::new(1, 0);
const FROM_A: &[u8] = b"written by process A";
const FROM_B: &[u8] = b"and this by process B, at its own address";

/// B's side. Runs only when re-executed by `two_processes_share_a_stack_allocator`.
#[test]
fn child_role() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split(':');
    let name = parts.next().unwrap();
    let offset: u64 = parts.next().unwrap().parse().unwrap();

    let mm = MemoryManager::new();
    let backend = mm.add_backend(PosixShmBackend::attach(name, &ShmOptions::default()).unwrap()).unwrap();
    mm.attach_allocator::<StackAllocator>(backend.id(), ALLOCATOR).unwrap();
    println!("B maps the segment at {:p}", backend.base());

    let from_a = mm.to_local::<u8>(ShmPtr::new(ALLOCATOR, OffsetPtr::new(offset))).unwrap();
    // SAFETY: A allocated FROM_A.len() bytes there and wrote them before starting B.
    let seen = unsafe { std::slice::from_raw_parts(from_a.ptr, FROM_A.len()) };
    assert_eq!(seen, FROM_A, "B reads A's data");

    let mine = mm.allocate(ALLOCATOR, FROM_B.len(), 8).unwrap();
    // SAFETY: a fresh block of FROM_B.len() bytes.
    unsafe { mine.ptr.copy_from_nonoverlapping(FROM_B.as_ptr(), FROM_B.len()) };
    println!("B-ALLOCATED {}", mine.shm.offset.get());
}

#[test]
fn two_processes_share_a_stack_allocator() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let name = format!("/hetmem-xproc-{}", std::process::id());
    let mm = MemoryManager::new();
    let backend = mm.add_backend(PosixShmBackend::create(&name, 1 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let stack = mm.create_allocator::<StackAllocator>(backend.id(), ALLOCATOR, 0, &Default::default()).unwrap();
    println!("A maps the segment at {:p}", backend.base());

    let a = mm.allocate(ALLOCATOR, FROM_A.len(), 8).unwrap();
    // SAFETY: a fresh block of FROM_A.len() bytes.
    unsafe { a.ptr.copy_from_nonoverlapping(FROM_A.as_ptr(), FROM_A.len()) };

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child_role", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{name}:{}", a.shm.offset.get()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(out.status.success(), "B failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));

    let offset: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("B-ALLOCATED "))
        .expect("B reports its allocation")
        .trim()
        .parse()
        .unwrap();
    let b = mm.to_local::<u8>(ShmPtr::new(ALLOCATOR, OffsetPtr::new(offset))).unwrap();
    // SAFETY: B allocated FROM_B.len() bytes there and wrote them before exiting.
    let seen = unsafe { std::slice::from_raw_parts(b.ptr, FROM_B.len()) };
    assert_eq!(seen, FROM_B, "A reads B's data");

    let stats = stack.stats();
    assert_eq!(stats.live_allocations, 2, "A sees B's allocation in the shared counters");
    stack.check().unwrap();
    mm.free(b.shm).unwrap();
    mm.free(a.shm).unwrap();
    assert_eq!(stack.stats().bytes_reserved, 0);
    mm.destroy_backend(backend.id()).unwrap();
    assert!(!PosixShmBackend::exists(&name).unwrap());
}
