//! Pool workloads P1-P5, every peer side by side in one run.
//!
//! ```text
//! cargo run --release --example pools            # table, ratios to the system allocator
//! cargo run --release --example pools -- --csv   # workload,pool,ns_per_pair,peak_actual_bytes,high_watermark_bytes
//! ```
//!
//! Peers: `system` (the global allocator, called directly), `naive` (a QuickPool that never
//! coalesces), `quick` (a QuickPool with Umpire's block sizes and alignment, 512 MiB first block,
//! 1 MiB next blocks, 16 B alignment, and PercentReleasable(100)), `fixed` (a FixedPool, where
//! every request has one size). No peer touches the memory it gets: the figures are the
//! bookkeeping's cost, as they would be for device memory.
//!
//! - P1, P2, P3: allocate and free at once, 256 B, 4 KiB, 1 MiB.
//! - P4: 1000 slots; each step frees a random slot and fills it with a random size, uniform in
//!   1 KiB..4 MiB.
//! - P5: a fragmenting phase pattern (many small live blocks, then large requests), once per
//!   heuristic, over 1 MiB upstream blocks; what matters is the peak actual size against the
//!   high watermark.
//!
//! `system` has no visible footprint: its peak actual size is reported as its high watermark.
//!
//! P1-P4 run `--rounds N` times (default 3), the peers taking turns, and report each peer's
//! median; P5 runs once. `--only P4` runs one workload and `--pools quick,system` some of the
//! peers (for P5, `quick` names its pools of every heuristic).

#[path = "common/p4_steps.rs"]
mod p4_steps;
#[path = "common/xorshift.rs"]
mod xorshift;

use std::alloc::{alloc, dealloc, Layout};
use std::hint::black_box;
use std::ptr::NonNull;
use std::time::Instant;

use xorshift::XorShift;

use hetmem::pool::{
    BlocksReleasable, CoalesceHeuristic, FixedPool, FixedPoolConfig, HostResource, NeverCoalesce, PercentReleasable,
    QuickPool, QuickPoolConfig,
};

const ALIGN: usize = 16;

/// What the harness needs from a peer; generic, so each peer's loop is compiled for it.
trait Peer {
    fn allocate(&mut self, size: usize) -> NonNull<u8>;
    fn free(&mut self, ptr: NonNull<u8>, size: usize);
    /// (peak actual bytes, high watermark bytes)
    fn footprint(&self) -> (usize, usize);
}

/// The global allocator, with a running count of live bytes for its high watermark.
#[derive(Default)]
struct System {
    live: usize,
    high_watermark: usize,
}

impl Peer for System {
    fn allocate(&mut self, size: usize) -> NonNull<u8> {
        let layout = Layout::from_size_align(size, ALIGN).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { alloc(layout) }).expect("system allocator out of memory");
        self.live += size;
        self.high_watermark = self.high_watermark.max(self.live);
        ptr
    }
    fn free(&mut self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(size, ALIGN)) };
        self.live -= size;
    }
    fn footprint(&self) -> (usize, usize) {
        (self.high_watermark, self.high_watermark)
    }
}

macro_rules! pool_peer {
    ($ty:ty) => {
        impl Peer for $ty {
            #[inline]
            fn allocate(&mut self, size: usize) -> NonNull<u8> {
                <$ty>::allocate(self, size, ALIGN).expect("pool allocation")
            }
            #[inline]
            fn free(&mut self, ptr: NonNull<u8>, _size: usize) {
                <$ty>::deallocate(self, ptr).expect("pool free")
            }
            fn footprint(&self) -> (usize, usize) {
                let s = <$ty>::stats(self);
                (s.actual_high_watermark, s.high_watermark)
            }
        }
    };
}
pool_peer!(QuickPool<HostResource>);
pool_peer!(FixedPool<HostResource>);

struct Row {
    workload: &'static str,
    pool: String,
    ns_per_pair: f64,
    peak_actual: usize,
    high_watermark: usize,
}

fn row(workload: &'static str, pool: &str, ns_per_pair: f64, peer: &impl Peer) -> Row {
    let (peak_actual, high_watermark) = peer.footprint();
    Row { workload, pool: pool.to_string(), ns_per_pair, peak_actual, high_watermark }
}

fn quick(heuristic: impl CoalesceHeuristic + 'static) -> QuickPool<HostResource> {
    QuickPool::new(HostResource).with_heuristic(heuristic)
}

fn pairs(peer: &mut impl Peer, size: usize, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let p = peer.allocate(size);
        peer.free(black_box(p), size);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn random_slots(peer: &mut impl Peer, initial: &[usize], steps: &[(usize, usize)]) -> f64 {
    let mut live: Vec<(NonNull<u8>, usize)> = initial.iter().map(|&s| (peer.allocate(s), s)).collect();
    let start = Instant::now();
    for &(slot, size) in steps {
        let (p, old) = live[slot];
        peer.free(p, old);
        live[slot] = (peer.allocate(size), size);
    }
    let ns = start.elapsed().as_nanos() as f64 / steps.len() as f64;
    for (p, s) in live {
        peer.free(p, s);
    }
    ns
}

/// P5: cycles of a churning small phase (4..64 KiB blocks, up to ~40 MiB live), then a few large
/// requests (8..32 MiB) of about the same total; a handful of long-lived blocks stay throughout.
/// Returns ns per allocate/free pair.
fn phases(peer: &mut impl Peer) -> f64 {
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut pairs = 0usize;
    let start = Instant::now();
    let long_lived: Vec<(NonNull<u8>, usize)> = (0..16)
        .map(|_| {
            let s = rng.range(64 << 10, 256 << 10);
            (peer.allocate(s), s)
        })
        .collect();
    for cycle in 0..10 {
        let mut small: Vec<(NonNull<u8>, usize)> = Vec::new();
        for _ in 0..3000 {
            if small.is_empty() || rng.below(10) < 7 {
                let s = rng.range(4 << 10, 64 << 10);
                small.push((peer.allocate(s), s));
            } else {
                let (p, s) = small.swap_remove(rng.below(small.len()));
                peer.free(p, s);
                pairs += 1;
            }
        }
        while !small.is_empty() {
            let (p, s) = small.swap_remove(rng.below(small.len()));
            peer.free(p, s);
            pairs += 1;
        }
        let large = [8usize, 12, 16, 24, 32][cycle % 5] << 20;
        let count = (40usize << 20).div_ceil(large);
        let big: Vec<NonNull<u8>> = (0..count).map(|_| peer.allocate(large)).collect();
        for p in big {
            peer.free(p, large);
            pairs += 1;
        }
    }
    for (p, s) in long_lived {
        peer.free(p, s);
        pairs += 1;
    }
    start.elapsed().as_nanos() as f64 / pairs as f64
}

/// The command line: `--csv`, `--only P4` (one workload), `--pools quick,fixed` (only these
/// peers, for profiling), `--rounds N`.
struct Args {
    csv: bool,
    only: Option<String>,
    pools: Option<String>,
    rounds: usize,
}

const WORKLOADS: [&str; 5] = ["P1", "P2", "P3", "P4", "P5"];
const USAGE: &str = "usage: pools [--csv] [--only P1..P5] [--pools system,naive,quick,fixed] [--rounds N]";
const PEERS: [&str; 4] = ["system", "naive", "quick", "fixed"];

/// Parses the command line; anything it does not know is an error, so that a typo does not
/// quietly run something else (or nothing).
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args { csv: false, only: None, pools: None, rounds: 3 };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--csv" => parsed.csv = true,
            "--only" => {
                let w = value()?;
                if !WORKLOADS.contains(&w.as_str()) {
                    return Err(format!("--only {w}: not one of {}", WORKLOADS.join(", ")));
                }
                parsed.only = Some(w);
            }
            "--pools" => {
                let list = value()?;
                if let Some(bad) = list.split(',').find(|p| !PEERS.contains(p)) {
                    return Err(format!("--pools: {bad:?} is not one of {}", PEERS.join(", ")));
                }
                parsed.pools = Some(list);
            }
            "--rounds" => {
                let n = value()?;
                parsed.rounds =
                    n.parse().ok().filter(|&r| r > 0).ok_or(format!("--rounds {n}: not a positive integer"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(parsed)
}

fn main() {
    let Args { csv, only, pools, rounds } = parse_args(std::env::args().skip(1)).unwrap_or_else(|e| {
        eprintln!("pools: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let wanted = |w: &str| only.as_deref().is_none_or(|o| o == w);
    let runs = |p: &str| pools.as_deref().is_none_or(|list| list.split(',').any(|name| name == p));
    let mut rows = Vec::new();

    for (workload, size, n) in [("P1", 256usize, 2_000_000usize), ("P2", 4 << 10, 2_000_000), ("P3", 1 << 20, 200_000)]
    {
        if !wanted(workload) {
            continue;
        }
        let per_block = ((16usize << 20) / size).clamp(16, 2048);
        let config = FixedPoolConfig { objects_per_block: per_block, ..FixedPoolConfig::new(size) };
        let mut system = System::default();
        let mut naive = quick(NeverCoalesce);
        let mut q = quick(PercentReleasable::default());
        let mut fixed = FixedPool::new(HostResource, config).expect("fixed pool config");
        let mut times = [const { Vec::new() }; 4];
        // Rounds interleave the peers, so a noisy moment hits all of them; each reports its median.
        for _ in 0..rounds {
            if runs("system") {
                times[0].push(pairs(&mut system, size, n));
            }
            if runs("naive") {
                times[1].push(pairs(&mut naive, size, n));
            }
            if runs("quick") {
                times[2].push(pairs(&mut q, size, n));
            }
            if runs("fixed") {
                times[3].push(pairs(&mut fixed, size, n));
            }
        }
        push_median(&mut rows, workload, "system", &mut times[0], &system);
        push_median(&mut rows, workload, "naive", &mut times[1], &naive);
        push_median(&mut rows, workload, "quick", &mut times[2], &q);
        push_median(&mut rows, workload, "fixed", &mut times[3], &fixed);
    }

    if wanted("P4") {
        let (initial, steps) = p4_steps::random_steps(1000, 300_000);
        let mut times = [const { Vec::new() }; 3];
        let (mut system, mut naive, mut q) =
            (System::default(), quick(NeverCoalesce), quick(PercentReleasable::default()));
        for _ in 0..rounds {
            if runs("system") {
                times[0].push(random_slots(&mut system, &initial, &steps));
            }
            if runs("naive") {
                times[1].push(random_slots(&mut naive, &initial, &steps));
            }
            if runs("quick") {
                times[2].push(random_slots(&mut q, &initial, &steps));
            }
        }
        push_median(&mut rows, "P4", "system", &mut times[0], &system);
        push_median(&mut rows, "P4", "naive", &mut times[1], &naive);
        push_median(&mut rows, "P4", "quick", &mut times[2], &q);
    }
    if wanted("P5") {
        p5(&mut rows, &runs);
    }
    print(csv, &rows);
}

/// Adds a row with the median of `times`, if the peer ran.
fn push_median(rows: &mut Vec<Row>, workload: &'static str, pool: &str, times: &mut [f64], peer: &impl Peer) {
    if times.is_empty() {
        return;
    }
    times.sort_by(f64::total_cmp);
    rows.push(row(workload, pool, times[times.len() / 2], peer));
}

/// P5 for the peers `runs` names: `system`, `naive` (never coalescing) and `quick` (a pool per
/// heuristic).
fn p5(rows: &mut Vec<Row>, runs: &dyn Fn(&str) -> bool) {
    if runs("system") {
        let mut system = System::default();
        let ns = phases(&mut system);
        rows.push(row("P5", "system", ns, &system));
    }
    let small_blocks = QuickPoolConfig { first_block_size: 1 << 20, next_block_size: 1 << 20, ..Default::default() };
    let heuristics: Vec<(&str, Box<dyn CoalesceHeuristic>)> = vec![
        ("naive", Box::new(NeverCoalesce)),
        ("quick-blocks4", Box::new(BlocksReleasable::new(4).expect("valid"))),
        ("quick-blocks4-hwm", Box::new(BlocksReleasable::hwm(4).expect("valid"))),
        ("quick-percent100", Box::new(PercentReleasable::new(100).expect("valid"))),
        ("quick-percent50", Box::new(PercentReleasable::new(50).expect("valid"))),
        ("quick-percent50-hwm", Box::new(PercentReleasable::hwm(50).expect("valid"))),
    ];
    for (name, heuristic) in heuristics {
        if !runs(if name == "naive" { "naive" } else { "quick" }) {
            continue;
        }
        let mut pool =
            QuickPool::with_config(HostResource, small_blocks).expect("valid config").with_heuristic(heuristic);
        let ns = phases(&mut pool);
        pool.check().expect("pool consistent after P5");
        rows.push(row("P5", name, ns, &pool));
    }
}

fn print(csv: bool, rows: &[Row]) {
    if csv {
        println!("workload,pool,ns_per_pair,peak_actual_bytes,high_watermark_bytes");
        for r in rows {
            println!("{},{},{:.1},{},{}", r.workload, r.pool, r.ns_per_pair, r.peak_actual, r.high_watermark);
        }
        return;
    }
    println!(
        "{:<8} {:<20} {:>11} {:>10} {:>14} {:>14} {:>10}",
        "workload", "pool", "ns/pair", "x system", "peak actual", "high water", "peak/hwm"
    );
    for r in rows {
        let system =
            rows.iter().find(|s| s.workload == r.workload && s.pool == "system").map_or(f64::NAN, |s| s.ns_per_pair);
        println!(
            "{:<8} {:<20} {:>11.1} {:>10.2} {:>14} {:>14} {:>10.2}",
            r.workload,
            r.pool,
            r.ns_per_pair,
            r.ns_per_pair / system,
            hetmem::pool::render::Bytes(r.peak_actual).to_string(),
            hetmem::pool::render::Bytes(r.high_watermark).to_string(),
            r.peak_actual as f64 / r.high_watermark.max(1) as f64,
        );
    }
}
