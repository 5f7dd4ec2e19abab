//! Several real processes on one shared segment: the span allocators and the stack allocator
//! under cross-process stress, the span allocators under SIGKILL. The test binary re-executes
//! itself with `HETMEM_CHILD` set to play a child's part.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem::allocators::ThreadLocalAllocator;
use hetmem::prelude::*;

mod common;
use common::{Recover, Rng};

const ID: AllocatorId = AllocatorId::new(1, 0);
const MAILBOX: usize = 64;

/// The mailbox's words: `MAILBOX` atomics at `offset` in the segment mapped at `base`.
///
/// # Safety
/// `[offset, offset + 8 * MAILBOX)` is a live, 8-aligned block of that segment for `'a`.
unsafe fn mailbox_words<'a>(base: *mut u8, offset: u64) -> &'a [AtomicU64] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(base.add(offset as usize).cast::<AtomicU64>(), MAILBOX) }
}

fn segment(tag: &str) -> String {
    format!("/hetmem-proc-{tag}-{}", std::process::id())
}

fn spawn(test: &str, role: &str, args: &[String]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("HETMEM_CHILD", role)
        .env("HETMEM_ARGS", args.join(" "))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn child_args() -> Option<(String, Vec<String>)> {
    let role = std::env::var("HETMEM_CHILD").ok()?;
    let args = std::env::var("HETMEM_ARGS").unwrap_or_default();
    Some((role, args.split(' ').map(String::from).collect()))
}

/// Writes a pattern naming `owner` over a block: owner and size in the first 16 bytes, the
/// owner byte everywhere else.
fn stamp(base: *mut u8, p: OffsetPtr, size: usize, owner: u8) {
    // SAFETY: a live block of `size` >= 16 bytes in the mapped segment.
    unsafe {
        let b = base.add(p.get() as usize);
        std::ptr::write_bytes(b, owner, size);
        b.cast::<u64>().write_unaligned(owner as u64);
        b.add(8).cast::<u64>().write_unaligned(size as u64);
    }
}

/// Checks the pattern and returns the owner it names.
fn verify(base: *mut u8, p: OffsetPtr) -> u8 {
    // SAFETY: a live block written by `stamp`.
    unsafe {
        let b = base.add(p.get() as usize);
        let owner = b.cast::<u64>().read_unaligned() as u8;
        let size = b.add(8).cast::<u64>().read_unaligned() as usize;
        let body = std::slice::from_raw_parts(b.add(16), size - 16);
        assert!(body.iter().all(|&x| x == owner), "block pattern damaged");
        owner
    }
}

/// One stress worker: random alloc/free, a share of frees going through the mailbox to be
/// done by another process.
fn stress_worker<A: RegionAllocator>(a: &A, base: *mut u8, mailbox: u64, owner: u8, ops: u64) {
    // SAFETY: the mailbox is a live block of MAILBOX words the parent allocated.
    let slots = unsafe { mailbox_words(base, mailbox) };
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ ((owner as u64) << 40));
    let mut live: Vec<OffsetPtr> = Vec::new();
    for _ in 0..ops {
        let r = rng.next();
        if live.len() < 64 && (r % 2 == 0 || live.is_empty()) {
            let size = if r % 97 == 0 { 16 + (r >> 20) as usize % 100_000 } else { 16 + (r >> 20) as usize % 4081 };
            let p = a.allocate(size, 1 << ((r >> 8) % 7)).expect("allocate");
            stamp(base, p, size, owner);
            live.push(p);
        } else {
            let p = live.swap_remove((r >> 8) as usize % live.len());
            assert_eq!(verify(base, p), owner);
            if r % 5 == 0 {
                let slot = &slots[(r >> 32) as usize % MAILBOX];
                let other = slot.swap(p.get(), Ordering::AcqRel);
                if other != 0 {
                    verify(base, OffsetPtr::new(other));
                    a.free(OffsetPtr::new(other)).expect("free another process's block");
                }
            } else {
                a.free(p).expect("free");
            }
        }
    }
    for p in live {
        verify(base, p);
        a.free(p).unwrap();
    }
}

fn open<A: AllocatorType>(seg: &str) -> (MemoryManager, Arc<A>, *mut u8) {
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::attach(seg, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.attach_allocator::<A>(b.id(), ID).unwrap();
    let base = b.base();
    (mm, a, base)
}

/// A stress worker: (allocator, segment base, mailbox offset, owner byte, operations).
type Worker<A> = fn(&A, *mut u8, u64, u8, u64);

fn stress<A: AllocatorType>(test: &str, tag: &str, config: A::Config) {
    stress_with::<A>(test, tag, config, stress_worker::<A>);
}

fn stress_with<A: AllocatorType>(test: &str, tag: &str, config: A::Config, worker: Worker<A>) {
    if let Some((_, args)) = child_args() {
        let (_mm, a, base) = open::<A>(&args[0]);
        let mailbox = args[1].parse().unwrap();
        let owner = args[2].parse().unwrap();
        let ops = args[3].parse().unwrap();
        let base = base as usize;
        // A thread, so the thread-local allocator's heap is released at its exit; `join`
        // (unlike a scope) returns only after the thread's TLS destructors ran.
        let a2 = a.clone();
        std::thread::spawn(move || worker(&*a2, base as *mut u8, mailbox, owner, ops)).join().unwrap();
        std::process::exit(0);
    }
    let seg = segment(tag);
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::create(&seg, 64 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.create_allocator::<A>(b.id(), ID, 0, &config).unwrap();
    let start = a.stats().free_bytes();
    let ops: u64 = std::env::var("HETMEM_STRESS_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    // Threads joined with `join` (a scope may return before their TLS destructors ran), so
    // their heaps and caches are back before the checks below.
    let base = b.base() as usize;
    let mailbox = {
        let a = a.clone();
        std::thread::spawn(move || {
            let m = a.allocate(MAILBOX * 8, 8).unwrap();
            // SAFETY: a live block of MAILBOX words.
            unsafe { std::ptr::write_bytes((base as *mut u8).add(m.get() as usize), 0, MAILBOX * 8) };
            m
        })
        .join()
        .unwrap()
    };
    let children: Vec<_> = (1..=4u8)
        .map(|owner| {
            let args = [seg.clone(), mailbox.get().to_string(), owner.to_string(), ops.to_string()];
            spawn(test, "stress", &args)
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a stress child failed");
    }
    {
        let a = a.clone();
        std::thread::spawn(move || {
            let base = base as *mut u8;
            // SAFETY: the mailbox is still live; the children are gone.
            let slots = unsafe { mailbox_words(base, mailbox.get()) };
            for slot in slots {
                let p = slot.load(Ordering::Acquire);
                if p != 0 {
                    verify(base, OffsetPtr::new(p));
                    a.free(OffsetPtr::new(p)).unwrap();
                }
            }
            a.free(mailbox).unwrap();
        })
        .join()
        .unwrap();
    }
    a.check().unwrap();
    let end = a.stats();
    assert_eq!(end.live_allocations, 0);
    assert_eq!(end.free_bytes(), start, "free capacity back to the start");
}

#[test]
fn scalable_page_four_processes_stress() {
    stress::<ScalablePageAllocator>("scalable_page_four_processes_stress", "spa-stress", Default::default());
}

#[test]
fn thread_local_four_processes_stress() {
    stress::<ThreadLocalAllocator>("thread_local_four_processes_stress", "tla-stress", Default::default());
}

#[test]
fn bitmap_four_processes_stress() {
    // Blocks up to 128 KiB: the workers ask for up to 100,000 bytes.
    let config = BitmapConfig { min_block: 16, max_block: 128 << 10 };
    stress::<hetmem::allocators::BitmapAllocator>("bitmap_four_processes_stress", "bitmap-stress", config);
}

/// A stack allocator's worker: rounds of a few blocks taken and then freed last first (the
/// order a stack serves), interleaved with the other processes' rounds, so frees often wait for a
/// block of another process above them. Now and then a round takes nearly the whole segment for
/// a moment, so that the others' requests meanwhile, or its own, run out of memory: an error
/// after which the round gives its blocks back and the next one goes on. (A tenth of `ops`: a
/// stack serialises the processes on one lock.)
fn stack_worker(a: &StackAllocator, base: *mut u8, _mailbox: u64, owner: u8, ops: u64) {
    let mut rng = Rng(0x51ac_0000_1234_5678 ^ ((owner as u64) << 40));
    let (mut done, mut refused) = (0, 0u64);
    while done < ops / 10 {
        let r = rng.next();
        if r % 256 == 0 {
            match a.allocate(60 << 20, 8) {
                Ok(p) => {
                    std::thread::sleep(Duration::from_millis(2));
                    a.free(p).expect("free");
                }
                Err(Error::OutOfMemory { .. }) => refused += 1,
                Err(e) => panic!("allocate: {e}"),
            }
        }
        let mut round = Vec::new();
        for _ in 0..1 + r % 12 {
            let r = rng.next();
            let size = 16 + (r >> 20) as usize % 4081;
            match a.allocate(size, 1 << ((r >> 8) % 7)) {
                Ok(p) => {
                    stamp(base, p, size, owner);
                    round.push(p);
                }
                Err(Error::OutOfMemory { .. }) => {
                    refused += 1;
                    std::thread::yield_now();
                    break;
                }
                Err(e) => panic!("allocate: {e}"),
            }
        }
        done += 2 * round.len() as u64;
        for p in round.into_iter().rev() {
            assert_eq!(verify(base, p), owner, "a block another process wrote into");
            a.free(p).expect("free");
        }
    }
    println!("stack worker {owner}: {refused} requests refused for want of memory");
}

#[test]
fn stack_four_processes_stress() {
    stress_with::<StackAllocator>("stack_four_processes_stress", "stack-stress", Default::default(), stack_worker);
}

/// A child that allocates and frees in a tight loop until it is killed; every fourth step it
/// also takes a block the parent's survivor lent through the mailbox and frees it (a remote
/// free into the survivor's heap, so kills land inside that protocol too).
fn crash_child<A: AllocatorType>(seg: &str, mailbox: u64) -> ! {
    let (_mm, a, base) = open::<A>(seg);
    // SAFETY: the mailbox is a live block of MAILBOX words the parent allocated.
    let slots = unsafe { mailbox_words(base, mailbox) };
    let mut rng = Rng(std::process::id() as u64 | 1);
    let mut window = Vec::new();
    loop {
        let r = rng.next();
        if r % 4 == 0 {
            let lent = slots[(r >> 32) as usize % MAILBOX].swap(0, Ordering::AcqRel);
            if lent != 0 {
                assert_eq!(verify(base, OffsetPtr::new(lent)), 3, "a lent block is the survivor's");
                a.free(OffsetPtr::new(lent)).expect("free a lent block");
            }
        }
        let size = 16 + (r >> 20) as usize % 3000;
        let p = a.allocate(size, 8).expect("allocate");
        stamp(base, p, size, 9);
        window.push(p);
        if window.len() > 8 {
            let q = window.swap_remove((r >> 8) as usize % window.len());
            verify(base, q);
            a.free(q).expect("free");
        }
    }
}

fn crash<A: Recover>(test: &str, tag: &str, config: A::Config) {
    if let Some((_, args)) = child_args() {
        crash_child::<A>(&args[0], args[1].parse().unwrap());
    }
    let seg = segment(tag);
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::create(&seg, 32 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.create_allocator::<A>(b.id(), ID, 0, &config).unwrap();
    let start = a.stats().free_bytes();
    let base = b.base() as usize;
    let mailbox = a.allocate(MAILBOX * 8, 8).unwrap();
    // SAFETY: a live block of MAILBOX words.
    unsafe { std::ptr::write_bytes((base as *mut u8).add(mailbox.get() as usize), 0, MAILBOX * 8) };
    // A survivor keeps working through every kill; none of its operations may wait long. It
    // lends some of its blocks to the children through the mailbox, for them to free.
    let stop = Arc::new(AtomicBool::new(false));
    let survivor = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let base = base as *mut u8;
            // SAFETY: the mailbox stays live until this thread is joined.
            let slots = unsafe { mailbox_words(base, mailbox.get()) };
            let mut worst = Duration::ZERO;
            let mut rng = Rng(77);
            let mut mine = Vec::new();
            // Blocks lent that no one is known to have freed.
            let mut lent = std::collections::HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = rng.next();
                let size = 16 + r as usize % 2000;
                let p = a.allocate(size, 8).unwrap();
                // Handed out again: whoever it was lent to freed it.
                lent.remove(&p.get());
                stamp(base, p, size, 3);
                mine.push(p);
                if mine.len() > 16 {
                    let q = mine.remove(0);
                    verify(base, q);
                    if r % 3 == 0 {
                        lent.insert(q.get());
                        let back = slots[(r >> 32) as usize % MAILBOX].swap(q.get(), Ordering::AcqRel);
                        if back != 0 {
                            lent.remove(&back);
                            a.free(OffsetPtr::new(back)).unwrap();
                        }
                    } else {
                        a.free(q).unwrap();
                    }
                }
                worst = worst.max(t.elapsed());
            }
            for q in mine {
                a.free(q).unwrap();
            }
            (worst, lent)
        })
    };
    let mut rng = Rng(0xdead_beef);
    for _ in 0..100 {
        let args = [seg.clone(), mailbox.get().to_string()];
        let mut c = spawn(test, "crash", &args);
        std::thread::sleep(Duration::from_micros(3_000 + rng.next() % 20_000));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
        c.wait().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let (worst, mut lent) = survivor.join().unwrap();
    // A hang detector, not a timing claim: a lock a killed child held must be taken over, never
    // waited on for good. The bound is loose, since a loaded 2-core machine can stall any one
    // operation for a second or more (2 s failed once beside parallel builds).
    assert!(worst < Duration::from_secs(30), "a survivor's operation took {worst:?}");
    // Every child is dead and, once reclaimed, every block it held is free: what is still in
    // the mailbox, and what a child took and was killed before it began to free (still live),
    // is the survivor's to free. A block a child was killed part way through freeing is no
    // longer live: recovery settles it.
    a.recover();
    // SAFETY: the mailbox is live; no one else uses it now.
    let slots = unsafe { mailbox_words(base as *mut u8, mailbox.get()) };
    for slot in slots {
        let p = slot.swap(0, Ordering::AcqRel);
        if p != 0 {
            lent.remove(&p);
            verify(base as *mut u8, OffsetPtr::new(p));
            a.free(OffsetPtr::new(p)).unwrap();
        }
    }
    for p in lent {
        if a.size_of(OffsetPtr::new(p)).is_ok() {
            assert_eq!(verify(base as *mut u8, OffsetPtr::new(p)), 3, "a live lent block is the survivor's");
            a.free(OffsetPtr::new(p)).unwrap();
        }
    }
    a.free(mailbox).unwrap();
    a.recover();
    a.check().unwrap();
    let end = a.stats();
    assert_eq!(end.live_allocations, 0);
    assert_eq!(end.bytes_in_use, 0);
    assert_eq!(end.free_bytes(), start, "the dead children's memory came back");
}

#[test]
fn thread_local_survives_a_hundred_kills() {
    crash::<ThreadLocalAllocator>(
        "thread_local_survives_a_hundred_kills",
        "tla-crash",
        ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free },
    );
}

#[test]
fn scalable_page_survives_a_hundred_kills() {
    crash::<ScalablePageAllocator>(
        "scalable_page_survives_a_hundred_kills",
        "spa-crash",
        ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Free },
    );
}

/// A process that reserves an allocator in the directory and is killed before publishing it:
/// a process waiting to attach learns so at once, not at its timeout, and the id can be created
/// again (before, the entry stayed "creating" for good).
#[test]
fn an_allocator_whose_creator_died_unfinished_can_be_created_again() {
    const TEST: &str = "an_allocator_whose_creator_died_unfinished_can_be_created_again";
    if let Some((_, args)) = child_args() {
        let b = PosixShmBackend::attach(&args[0], &ShmOptions::default()).unwrap();
        b.header().reserve_allocator(<ThreadLocalAllocator as AllocatorType>::TYPE_ID, ID, 1 << 20).unwrap();
        // Killed mid-creation: no publish, no abandon, no unwinding.
        // SAFETY: a plain signal to this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILL returned");
    }
    let seg = segment("unfinished");
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::create(&seg, 8 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let status = spawn(TEST, "creator", std::slice::from_ref(&seg)).wait().unwrap();
    assert!(!status.success(), "the creator was not killed");
    let started = Instant::now();
    let Err(err) = mm.attach_allocator_within::<ThreadLocalAllocator>(b.id(), ID, Duration::from_secs(60)) else {
        panic!("attached to an allocator no one finished creating");
    };
    assert!(started.elapsed() < Duration::from_secs(10), "the attach waited {:?}", started.elapsed());
    assert!(matches!(err, hetmem::Error::Corrupt { structure: "allocator", .. }), "{err}");
    let a = mm.create_allocator::<ThreadLocalAllocator>(b.id(), ID, 0, &Default::default()).unwrap();
    let p = a.allocate(4096, 8).unwrap();
    a.free(p).unwrap();
    // A second process attaches to the one created again.
    let other = MemoryManager::new();
    let ob = other.add_backend(PosixShmBackend::attach(&seg, &ShmOptions::default()).unwrap()).unwrap();
    other.attach_allocator::<ThreadLocalAllocator>(ob.id(), ID).unwrap();
}
