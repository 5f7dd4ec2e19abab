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

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
        unsafe {
            self.0
                .dealloc(ptr, Layout::from_size_align_unchecked(size, 8))
        }
    }
}

/// The caching tiers' subjects (kept apart from `subjects()` so branches adding allocators
/// there merge cleanly).
fn cache_subjects() -> Vec<Arc<dyn Subject>> {
    vec![Arc::new(HetAllocSubject(hetmem::cache::HetAlloc::new()))]
}

/// Every allocator the runner knows, in table order. New allocators join here.
fn subjects() -> Vec<Arc<dyn Subject>> {
    vec![Arc::new(SystemSubject), Arc::new(MimallocSubject)]
}

/// A small, fast, deterministic generator: every allocator sees the same sizes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        lo + (self.next() % (hi_inclusive - lo + 1) as u64) as usize
    }
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
        Ok(v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect())
    };
    let number = |v: Option<String>, flag: &str| -> Result<usize, String> {
        v.and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .ok_or(format!("{flag} needs a positive number"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--csv" => o.csv = true,
            "--workloads" => {
                o.workloads = list(args.next(), "--workloads")?
                    .iter()
                    .map(|w| w.to_uppercase())
                    .collect()
            }
            "--allocators" => o.allocators = Some(list(args.next(), "--allocators")?),
            "--steps" => o.steps = number(args.next(), "--steps")?,
            "--reps" => o.reps = number(args.next(), "--reps")?,
            "-h" | "--help" => {
                println!("usage: workloads [--csv] [--workloads W1,W2,W3,W4] [--allocators NAMES] [--steps N] [--reps R]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if let Some(w) = o
        .workloads
        .iter()
        .find(|w| !WORKLOADS.contains(&w.as_str()))
    {
        return Err(format!(
            "unknown workload {w:?}; known: {}",
            WORKLOADS.join(",")
        ));
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let o = parse_args().unwrap_or_else(|e| {
        eprintln!("workloads: {e}");
        std::process::exit(2);
    });
    let all = subjects();
    let all = [all, cache_subjects()].concat();
    let chosen: Vec<_> = match &o.allocators {
        None => all,
        Some(names) => {
            if let Some(n) = names
                .iter()
                .find(|n| !all.iter().any(|s| s.name() == n.as_str()))
            {
                let known: Vec<_> = all.iter().map(|s| s.name()).collect();
                eprintln!(
                    "workloads: unknown allocator {n:?}; known: {}",
                    known.join(",")
                );
                std::process::exit(2);
            }
            all.into_iter()
                .filter(|s| names.iter().any(|n| n == s.name()))
                .collect()
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
        }
    }
    if o.csv {
        println!("workload,allocator,threads,procs,ns_per_op");
        for (w, a, t, p, ns) in &rows {
            println!("{w},{a},{t},{p},{ns:.2}");
        }
        return;
    }
    let baseline: BTreeMap<(&str, &str, usize, usize), f64> = rows
        .iter()
        .map(|(w, a, t, p, ns)| ((w.as_str(), *a, *t, *p), *ns))
        .collect();
    let ratio = |w: &str, peer: &str, t: usize, p: usize, ns: f64| {
        baseline
            .get(&(w, peer, t, p))
            .map_or("-".to_string(), |b| format!("{:.2}x", ns / b))
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
