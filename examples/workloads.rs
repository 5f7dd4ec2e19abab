//! The one workload runner for allocators: every allocator runs every workload in the same run,
//! and the table gives ns/op with the ratios to mimalloc and to glibc malloc.
//!
//! ```text
//! cargo run --release --example workloads -- [--csv] [--workloads W1,W2] [--allocators a,b]
//!                                            [--steps N] [--reps R]
//! ```
//!
//! - W1: N alloc+free pairs of 64 B, one thread.
//! - W2: sizes uniform in 16..=4096 B over 1000 slots, N steps: a full slot is freed, an empty one
//!   gets a new block; one thread.
//! - W3: W2 in 2 threads (and, for allocators that support it, in 2 processes on one segment).
//! - W4: producer/consumer: one thread allocates N blocks of 16..=256 B, another frees them.
//!
//! Every allocation writes its first and last byte. ns/op is wall time divided by the steps one
//! thread performs (so in W3 perfect scaling gives W2's figure); each figure is the median of
//! `--reps` runs (default 3). With `--csv` the output is exactly
//! `workload,allocator,threads,procs,ns_per_op` and one row per measurement.

#[path = "common/xorshift.rs"]
mod xorshift;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hetmem::allocators::{BitmapAllocator, ThreadLocalAllocator};
use hetmem::prelude::{
    AllocatorId, AllocatorType, MemoryBackend, MemoryManager, OffsetPtr, PosixShmBackend, RegionAllocator,
    ScalablePageAllocator, ShmOptions,
};
use xorshift::XorShift;

/// An allocator under test. `alloc` returns null on failure.
trait Subject: Send + Sync {
    /// The name used on the command line and in the table.
    fn name(&self) -> &'static str;
    /// Allocates `size` bytes (alignment 8).
    fn alloc(&self, size: usize) -> *mut u8;
    /// Frees a block from `alloc` of this size.
    ///
    /// # Safety
    /// `ptr` came from `alloc(size)` on this subject and is freed once.
    unsafe fn free(&self, ptr: *mut u8, size: usize);
    /// For allocators in a shared-memory segment: how a second process attaches (W3 procs=2).
    fn shared(&self) -> Option<SharedSegment> {
        None
    }
}

/// What a child process needs to attach to a subject's segment.
struct SharedSegment {
    allocator: &'static str,
    segment: String,
}

/// glibc malloc through `std::alloc::System`.
struct SystemSubject;

impl Subject for SystemSubject {
    fn name(&self) -> &'static str {
        "system"
    }
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: size > 0 in every workload; alignment 8 is valid.
        unsafe { System.alloc(Layout::from_size_align_unchecked(size, 8)) }
    }
    unsafe fn free(&self, ptr: *mut u8, size: usize) {
        // SAFETY: the caller's contract: `ptr` came from `alloc(size)`.
        unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, 8)) }
    }
}

/// mimalloc, the crate.
struct MimallocSubject;

impl Subject for MimallocSubject {
    fn name(&self) -> &'static str {
        "mimalloc"
    }
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: as for System.
        unsafe { mimalloc::MiMalloc.alloc(Layout::from_size_align_unchecked(size, 8)) }
    }
    unsafe fn free(&self, ptr: *mut u8, size: usize) {
        // SAFETY: the caller's contract.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, Layout::from_size_align_unchecked(size, 8)) }
    }
}

/// A region allocator over a `PosixShmBackend`, as used by the shared-memory subjects.
struct ShmSubject<A: RegionAllocator> {
    name: &'static str,
    segment: String,
    allocator: Arc<A>,
    base: *mut u8,
    _manager: MemoryManager,
}

// SAFETY: `base` is the segment's mapping, which `_manager` keeps alive; the allocator is Sync.
unsafe impl<A: RegionAllocator> Send for ShmSubject<A> {}
// SAFETY: as above.
unsafe impl<A: RegionAllocator> Sync for ShmSubject<A> {}

const SHM_ID: AllocatorId = AllocatorId::new(1, 0);
const SHM_BYTES: usize = 1 << 30;

impl<A: AllocatorType> ShmSubject<A> {
    /// Creates a fresh segment with an `A` filling it.
    fn create(name: &'static str) -> Arc<dyn Subject> {
        let segment = format!("/hetmem-workloads-{name}-{}", std::process::id());
        let make = || -> hetmem::Result<Self> {
            let manager = MemoryManager::new();
            let backend = manager.add_backend(PosixShmBackend::create(&segment, SHM_BYTES, &ShmOptions::default())?)?;
            let allocator = manager.create_allocator::<A>(backend.id(), SHM_ID, 0, &Default::default())?;
            let base = backend.base();
            Ok(ShmSubject { name, segment: segment.clone(), allocator, base, _manager: manager })
        };
        Arc::new(make().unwrap_or_else(|e| {
            eprintln!("{name}: cannot create segment {segment}: {e}");
            std::process::exit(1);
        }))
    }

    /// Attaches to the segment another process created.
    fn attach(name: &'static str, segment: &str) -> hetmem::Result<Arc<dyn Subject>> {
        let manager = MemoryManager::new();
        let backend = manager.add_backend(PosixShmBackend::attach(segment, &ShmOptions::default())?)?;
        let allocator = manager.attach_allocator::<A>(backend.id(), SHM_ID)?;
        let base = backend.base();
        Ok(Arc::new(ShmSubject { name, segment: segment.to_string(), allocator, base, _manager: manager }))
    }
}

impl<A: AllocatorType> Subject for ShmSubject<A> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn alloc(&self, size: usize) -> *mut u8 {
        match self.allocator.allocate(size, 8) {
            // SAFETY: the offset is inside the mapped segment (the allocator checked it).
            Ok(p) => unsafe { self.base.add(p.get() as usize) },
            Err(_) => std::ptr::null_mut(),
        }
    }
    unsafe fn free(&self, ptr: *mut u8, _size: usize) {
        let offset = ptr as usize - self.base as usize;
        if let Err(e) = self.allocator.free(OffsetPtr::new(offset as u64)) {
            eprintln!("{}: free failed: {e}", self.name);
            std::process::exit(1);
        }
    }
    fn shared(&self) -> Option<SharedSegment> {
        Some(SharedSegment { allocator: self.name, segment: self.segment.clone() })
    }
}

/// hetmem's thread caches (`HetAlloc`) over the system allocator.
struct HetAllocSubject(hetmem::cache::HetAlloc);

impl Subject for HetAllocSubject {
    fn name(&self) -> &'static str {
        "hetalloc"
    }
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: as for System.
        unsafe { self.0.alloc(Layout::from_size_align_unchecked(size, 8)) }
    }
    unsafe fn free(&self, ptr: *mut u8, size: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.0.dealloc(ptr, Layout::from_size_align_unchecked(size, 8)) }
    }
}

/// Every allocator the runner knows, in table order. New allocators join here.
fn subjects() -> Vec<Arc<dyn Subject>> {
    vec![
        Arc::new(SystemSubject),
        Arc::new(MimallocSubject),
        ShmSubject::<ScalablePageAllocator>::create("scalable-page"),
        ShmSubject::<ThreadLocalAllocator>::create("thread-local"),
        ShmSubject::<BitmapAllocator>::create("bitmap"),
        Arc::new(HetAllocSubject(hetmem::cache::HetAlloc::new())),
    ]
}

/// Attaches to a subject's segment in a child process, by allocator name.
fn attach_subject(allocator: &str, segment: &str) -> hetmem::Result<Arc<dyn Subject>> {
    match allocator {
        "scalable-page" => ShmSubject::<ScalablePageAllocator>::attach("scalable-page", segment),
        "thread-local" => ShmSubject::<ThreadLocalAllocator>::attach("thread-local", segment),
        "bitmap" => ShmSubject::<BitmapAllocator>::attach("bitmap", segment),
        _ => Err(hetmem::Error::Unsupported("no shared-memory subject of that name")),
    }
}

/// W3 in two processes on one segment: this program re-executed twice with `--w3-child`;
/// each child times its own W2 and the slower one is the figure.
fn w3_processes(shared: &SharedSegment, steps: usize) -> f64 {
    let exe = std::env::current_exe().expect("own executable");
    let children: Vec<_> = (0..2u64)
        .map(|t| {
            std::process::Command::new(&exe)
                .args(["--w3-child", shared.allocator, &shared.segment])
                .arg(steps.to_string())
                .arg((0x9E37_79B9_7F4A_7C15u64 ^ (t + 1)).to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn W3 child")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("W3 child");
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                eprintln!("W3 child failed: {text}");
                std::process::exit(1);
            }
            text.trim().parse::<f64>().expect("W3 child prints its ns")
        })
        .fold(0.0, f64::max)
        / steps as f64
}

/// The child side of [`w3_processes`]: `--w3-child ALLOCATOR SEGMENT STEPS SEED`.
fn w3_child(args: &[String]) -> ! {
    let (allocator, segment) = (&args[0], &args[1]);
    let steps: usize = args[2].parse().expect("steps");
    let seed: u64 = args[3].parse().expect("seed");
    let s = attach_subject(allocator, segment).unwrap_or_else(|e| {
        eprintln!("W3 child: cannot attach {allocator} at {segment}: {e}");
        std::process::exit(1);
    });
    let started = Instant::now();
    w2(&*s, steps, seed);
    println!("{}", started.elapsed().as_nanos());
    drop(s);
    std::process::exit(0);
}

fn touch(p: *mut u8, size: usize, value: u8) {
    // SAFETY: `p` is a live block of `size` >= 1 bytes.
    unsafe {
        p.write_volatile(value);
        p.add(size - 1).write_volatile(value);
    }
}

fn check_alloc(p: *mut u8, name: &str, size: usize) -> *mut u8 {
    if p.is_null() {
        eprintln!("{name}: allocation of {size} bytes failed");
        std::process::exit(1);
    }
    p
}

fn w1(s: &dyn Subject, steps: usize) {
    for i in 0..steps {
        let p = check_alloc(s.alloc(64), s.name(), 64);
        touch(p, 64, i as u8);
        // SAFETY: just allocated with this size.
        unsafe { s.free(p, 64) };
    }
}

fn w2(s: &dyn Subject, steps: usize, seed: u64) {
    const SLOTS: usize = 1000;
    let mut rng = XorShift(seed);
    let mut slots: Vec<(*mut u8, usize)> = vec![(std::ptr::null_mut(), 0); SLOTS];
    for i in 0..steps {
        let slot = &mut slots[rng.range(0, SLOTS - 1)];
        if slot.0.is_null() {
            let size = rng.range(16, 4096);
            let p = check_alloc(s.alloc(size), s.name(), size);
            touch(p, size, i as u8);
            *slot = (p, size);
        } else {
            // SAFETY: the slot holds a live block of this size.
            unsafe { s.free(slot.0, slot.1) };
            *slot = (std::ptr::null_mut(), 0);
        }
    }
    for (p, size) in slots {
        if !p.is_null() {
            // SAFETY: live block of this size.
            unsafe { s.free(p, size) };
        }
    }
}

fn w3(s: &Arc<dyn Subject>, steps: usize) {
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || w2(&*s, steps, 0x9E37_79B9_7F4A_7C15 ^ (t + 1)))
        })
        .collect();
    for t in threads {
        t.join().expect("W3 thread panicked");
    }
}

/// One producer allocates, one consumer frees, through a bounded single-producer ring.
fn w4(s: &Arc<dyn Subject>, steps: usize) {
    const RING: usize = 4096;
    struct Ring {
        slots: Vec<AtomicUsize>,
        sizes: Vec<AtomicUsize>,
        head: AtomicUsize,
        tail: AtomicUsize,
    }
    let ring = Arc::new(Ring {
        slots: (0..RING).map(|_| AtomicUsize::new(0)).collect(),
        sizes: (0..RING).map(|_| AtomicUsize::new(0)).collect(),
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
    });
    let consumer = {
        let (s, ring) = (s.clone(), ring.clone());
        std::thread::spawn(move || {
            for i in 0..steps {
                while ring.head.load(Ordering::Acquire) == i {
                    std::hint::spin_loop();
                }
                let p = ring.slots[i % RING].load(Ordering::Relaxed) as *mut u8;
                let size = ring.sizes[i % RING].load(Ordering::Relaxed);
                ring.tail.store(i + 1, Ordering::Release);
                // SAFETY: the producer published a live block of this size and never touches it again.
                unsafe { s.free(p, size) };
            }
        })
    };
    let mut rng = XorShift(0xC0FF_EE00_1234_5678);
    for i in 0..steps {
        let size = rng.range(16, 256);
        let p = check_alloc(s.alloc(size), s.name(), size);
        touch(p, size, i as u8);
        while i - ring.tail.load(Ordering::Acquire) >= RING {
            std::hint::spin_loop();
        }
        ring.slots[i % RING].store(p as usize, Ordering::Relaxed);
        ring.sizes[i % RING].store(size, Ordering::Relaxed);
        ring.head.store(i + 1, Ordering::Release);
    }
    consumer.join().expect("W4 consumer panicked");
}

const WORKLOADS: [&str; 4] = ["W1", "W2", "W3", "W4"];

fn run(workload: &str, s: &Arc<dyn Subject>, steps: usize) -> (usize, f64) {
    let started = Instant::now();
    let threads = match workload {
        "W1" => {
            w1(&**s, steps);
            1
        }
        "W2" => {
            w2(&**s, steps, 0x9E37_79B9_7F4A_7C15);
            1
        }
        "W3" => {
            w3(s, steps);
            2
        }
        _ => {
            w4(s, steps);
            2
        }
    };
    (threads, started.elapsed().as_nanos() as f64 / steps as f64)
}

struct Options {
    csv: bool,
    workloads: Vec<String>,
    allocators: Option<Vec<String>>,
    steps: usize,
    reps: usize,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        csv: false,
        workloads: WORKLOADS.map(String::from).to_vec(),
        allocators: None,
        steps: 10_000_000,
        reps: 3,
    };
    let mut args = std::env::args().skip(1);
    let list = |v: Option<String>, flag: &str| -> Result<Vec<String>, String> {
        let v = v.ok_or(format!("{flag} needs a comma-separated list"))?;
        Ok(v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
    };
    let number = |v: Option<String>, flag: &str| -> Result<usize, String> {
        v.and_then(|v| v.parse().ok()).filter(|&n| n > 0).ok_or(format!("{flag} needs a positive number"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--csv" => o.csv = true,
            "--workloads" => o.workloads = list(args.next(), "--workloads")?.iter().map(|w| w.to_uppercase()).collect(),
            "--allocators" => o.allocators = Some(list(args.next(), "--allocators")?),
            "--steps" => o.steps = number(args.next(), "--steps")?,
            "--reps" => o.reps = number(args.next(), "--reps")?,
            "-h" | "--help" => {
                println!(
                    "usage: workloads [--csv] [--workloads W1,W2,W3,W4] [--allocators NAMES] [--steps N] [--reps R]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if let Some(w) = o.workloads.iter().find(|w| !WORKLOADS.contains(&w.as_str())) {
        return Err(format!("unknown workload {w:?}; known: {}", WORKLOADS.join(",")));
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--w3-child") && args.len() == 5 {
        w3_child(&args[1..]);
    }
    let o = parse_args().unwrap_or_else(|e| {
        eprintln!("workloads: {e}");
        std::process::exit(2);
    });
    let all = subjects();
    let chosen: Vec<_> = match &o.allocators {
        None => all,
        Some(names) => {
            if let Some(n) = names.iter().find(|n| !all.iter().any(|s| s.name() == n.as_str())) {
                let known: Vec<_> = all.iter().map(|s| s.name()).collect();
                eprintln!("workloads: unknown allocator {n:?}; known: {}", known.join(","));
                std::process::exit(2);
            }
            all.into_iter().filter(|s| names.iter().any(|n| n == s.name())).collect()
        }
    };
    // (workload, allocator, threads, procs) -> ns/op
    let mut rows: Vec<(String, &'static str, usize, usize, f64)> = Vec::new();
    for w in &o.workloads {
        for s in &chosen {
            let mut threads = 1;
            let times = (0..o.reps)
                .map(|_| {
                    let (t, ns) = run(w, s, o.steps);
                    threads = t;
                    ns
                })
                .collect();
            rows.push((w.clone(), s.name(), threads, 1, median(times)));
            if let (true, Some(shared)) = (w == "W3", s.shared()) {
                let times = (0..o.reps).map(|_| w3_processes(&shared, o.steps)).collect();
                rows.push((w.clone(), s.name(), 1, 2, median(times)));
            }
        }
    }
    if o.csv {
        println!("workload,allocator,threads,procs,ns_per_op");
        for (w, a, t, p, ns) in &rows {
            println!("{w},{a},{t},{p},{ns:.2}");
        }
        return;
    }
    let baseline: BTreeMap<(&str, &str, usize, usize), f64> =
        rows.iter().map(|(w, a, t, p, ns)| ((w.as_str(), *a, *t, *p), *ns)).collect();
    // Rows of several processes compare with the peer's row of as many threads.
    let ratio = |w: &str, peer: &str, t: usize, p: usize, ns: f64| {
        baseline.get(&(w, peer, t * p, 1)).map_or("-".to_string(), |b| format!("{:.2}x", ns / b))
    };
    println!("steps per thread: {}, median of {} runs", o.steps, o.reps);
    println!(
        "{:<4} {:<14} {:>7} {:>5} {:>10} {:>11} {:>9}",
        "wl", "allocator", "threads", "procs", "ns/op", "/mimalloc", "/glibc"
    );
    for (w, a, t, p, ns) in &rows {
        println!(
            "{:<4} {:<14} {:>7} {:>5} {:>10.2} {:>11} {:>9}",
            w,
            a,
            t,
            p,
            ns,
            ratio(w, "mimalloc", *t, *p, *ns),
            ratio(w, "system", *t, *p, *ns)
        );
    }
}
