//! P4 (the quick pool, random sizes 1 KiB..4 MiB, 1000 live slots) in calibrated cycles: for
//! comparing two builds on a noisy machine (`benches/pools-ab.sh`), not for absolute figures.
//!
//! ```text
//! cargo run --release --example p4_cycles [-- REPEATS]    # default 3
//! SLOTS=30 cargo run --release --example p4_cycles            # P4's steps over fewer live slots
//! ```
//!
//! `SLOTS` (default 1000, P4's) changes only how many blocks are live: with fewer, the pool's
//! tables fit the first-level cache. (On the development VM, 30 slots took 161 cycles per step
//! against about 205 for 1000, with the same instructions per step.)
//!
//! The shared machines these figures come from change speed from one millisecond to the next
//! (a countdown loop ran at 1.9 to 3.2 GHz within seconds), so times in nanoseconds scatter by
//! ±20%. Here every burst of 10,000 steps is divided by the time per iteration of a one-cycle
//! countdown loop run just before and just after it; the quotient, cycles per step, scatters
//! by a few percent. Two states of the pool are measured:
//! - `fresh`: a new pool after 300,000 warm-up steps, holding its first block and hundreds of
//!   next blocks (most requests above 1 MiB that found no hole got an upstream block of their own);
//! - `coalesced`: the same pool after every block was freed, which made `PercentReleasable(100)`
//!   coalesce it into one upstream block, and the 1000 slots were filled again: the state in
//!   which `examples/pools.rs` measures its rounds after the first.
//!
//! Prints the median cycles per step of each state.

#[cfg(test)]
#[path = "common/command_line_tests.rs"]
mod command_line_tests;
#[path = "common/p4_steps.rs"]
mod p4_steps;
#[path = "common/xorshift.rs"]
mod xorshift;

use std::hint::black_box;
use std::ptr::NonNull;
use std::time::Instant;

use hetmem::pool::{HostResource, QuickPool};

const STEPS: usize = 300_000;
const BURST: usize = 10_000;

/// Nanoseconds per iteration of a countdown loop that runs one iteration per cycle.
#[inline(never)]
fn ns_per_cycle() -> f64 {
    const N: u64 = 1_000_000;
    let start = Instant::now();
    let mut n = black_box(N);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the loop only counts a register down to zero.
    unsafe {
        std::arch::asm!("2:", "dec {0}", "jnz 2b", inout(reg) n, options(nomem, nostack));
    }
    #[cfg(not(target_arch = "x86_64"))]
    while black_box(n) > 0 {
        n -= 1;
    }
    black_box(n);
    start.elapsed().as_nanos() as f64 / N as f64
}

type Live = Vec<(NonNull<u8>, usize)>;

/// Runs `steps` in bursts; returns each burst's cycles per step.
fn bursts(q: &mut QuickPool<HostResource>, live: &mut Live, steps: &[(usize, usize)]) -> Vec<f64> {
    steps
        .chunks(BURST)
        .map(|burst| {
            let before = ns_per_cycle();
            let start = Instant::now();
            for &(slot, size) in burst {
                q.deallocate(live[slot].0).expect("pool free");
                live[slot] = (q.allocate(size, 16).expect("pool allocation"), size);
            }
            let ns = start.elapsed().as_nanos() as f64 / burst.len() as f64;
            ns / ((before + ns_per_cycle()) / 2.0)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const USAGE: &str = "usage: [SLOTS=N] p4_cycles [REPEATS]    # defaults: 3 repeats, 1000 live slots";

/// The repeats and live slots asked for by the arguments after the program's name and by
/// `SLOTS`; `Ok(None)` for `--help`.
fn parse_args(args: &[String], slots: Option<&str>) -> Result<Option<(usize, usize)>, String> {
    let positive = |s: &str| s.parse().ok().filter(|&n: &usize| n > 0);
    let repeats = match args {
        [] => 3,
        [help] if help == "-h" || help == "--help" => return Ok(None),
        [n] => positive(n).ok_or(format!("REPEATS {n:?}: not a positive number"))?,
        [_, extra, ..] => return Err(format!("one argument at most (got {extra:?} too)")),
    };
    let slots = match slots {
        None => 1000,
        Some(n) => positive(n).ok_or(format!("SLOTS={n:?}: not a positive number of live slots"))?,
    };
    Ok(Some((repeats, slots)))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let slots = std::env::var("SLOTS").ok();
    let (repeats, slots) = match parse_args(&args, slots.as_deref()) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("p4_cycles: {e}\n{USAGE}");
            std::process::exit(2)
        }
    };
    let (initial, steps) = p4_steps::random_steps(slots, STEPS);
    let fill = |q: &mut QuickPool<HostResource>| -> Live {
        initial.iter().map(|&s| (q.allocate(s, 16).expect("pool allocation"), s)).collect()
    };
    let (mut fresh, mut coalesced) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let mut q = QuickPool::new(HostResource);
        let mut live = fill(&mut q);
        bursts(&mut q, &mut live, &steps);
        fresh.extend(bursts(&mut q, &mut live, &steps));
        for (p, _) in live {
            q.deallocate(p).expect("pool free");
        }
        let mut live = fill(&mut q);
        coalesced.extend(bursts(&mut q, &mut live, &steps));
        for (p, _) in live {
            q.deallocate(p).expect("pool free");
        }
    }
    println!("fresh {:.1} coalesced {:.1}", median(fresh), median(coalesced));
}

#[cfg(test)]
mod tests {
    use super::*;
    use command_line_tests::args;

    #[test]
    fn the_command_line_is_parsed_or_refused_with_a_reason() {
        assert_eq!(parse_args(&[], None), Ok(Some((3, 1000))));
        assert_eq!(parse_args(&args("5"), Some("30")), Ok(Some((5, 30))));
        assert_eq!(parse_args(&args("--help"), None), Ok(None));
        for (line, slots, reason) in [
            ("x", None, "REPEATS"),
            ("0", None, "REPEATS"),
            ("--repeats", None, "REPEATS"),
            ("3 4", None, "one argument"),
            ("", Some("lots"), "SLOTS"),
            ("", Some("0"), "SLOTS"),
        ] {
            let err = parse_args(&args(line), slots).unwrap_err();
            assert!(err.contains(reason), "{line:?} {slots:?}: {err}");
        }
    }
}
