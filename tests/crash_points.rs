//! Death at every crash point of the page allocator (a build with `--cfg hetmem_crash_points`,
//! see `core/src/crash.rs`; `ci/test` runs it).
//!
//! A child process attaches to a shared segment and runs a fixed sequence of operations that
//! takes every path of the allocator that writes shared state: allocations and frees in several
//! classes, cache flushes and refills, new spans, an in-place resize, large blocks, a trim. It
//! kills itself at crash point `n` of its run. Each point gets a round of three children:
//! 1. the first dies at point `n`; the parent recovers it and takes blocks of every class the
//!    sequence uses, among them those the child had in hand;
//! 2. the second takes the first's slot again and dies at point `n / 2`, before it touched
//!    some of the classes the first did (a recovery must not judge their old journals again);
//! 3. the third dies at point `n % 300` of its run, mostly inside its own recovery of the
//!    second, which the parent's recovery then finishes.
//!
//! After each round the parent checks the allocator whole: every block the children held or
//! had in hand is back, and the parent's own blocks are untouched.
#![cfg(all(hetmem_crash_points, target_os = "linux"))]

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use hetmem::prelude::*;

const ID: AllocatorId = AllocatorId::new(1, 0);
const TEST: &str = "a_process_killed_at_any_crash_point_is_recovered";
/// The small requests of the child's sequence, as (size, alignment): their classes.
const CLASSES: [(usize, usize); 6] = [(3000, 8), (2900, 8), (200, 8), (209, 8), (203, 64), (150, 8)];
/// At most this many points are tried (evenly spread over the sequence), to bound the run time.
const MOST_POINTS: u64 = 5000;

/// The child's part: every operation on `a`, then the count of points it passed on stdout.
fn child(seg: &str) -> ! {
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::attach(seg, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.attach_allocator::<ScalablePageAllocator>(b.id(), ID).unwrap();
    let mut held = Vec::new();
    // A class whose cache holds a few blocks: new spans, flushes and refills.
    for _ in 0..12 {
        held.push(a.allocate(3000, 8).unwrap());
    }
    for p in held.drain(..10) {
        a.free(p).unwrap();
    }
    for _ in 0..6 {
        held.push(a.allocate(2900, 8).unwrap());
    }
    // A small class, an aligned request, and an in-place resize.
    for i in 0..10 {
        held.push(a.allocate(200 + i, if i == 3 { 64 } else { 8 }).unwrap());
    }
    let last = held.pop().unwrap();
    let last = a.reallocate(last, 205, 8).unwrap();
    held.push(a.reallocate(last, 150, 8).unwrap());
    // Large blocks: one freed, one kept.
    let big = a.allocate(40_000, 8).unwrap();
    held.push(a.allocate(70_000, 8).unwrap());
    a.free(big).unwrap();
    for p in held.drain(12..16) {
        a.free(p).unwrap();
    }
    a.trim().unwrap();
    // Still holding the rest: a dead process's blocks, freed by the recovery.
    println!("crash points passed: {}", hetmem::core::crash::points_passed());
    std::process::exit(0);
}

/// Runs a child that dies at point `at` (none: runs to the end); returns whether it was killed
/// and what it printed.
fn run_child(seg: &str, at: Option<u64>) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env("HETMEM_CHILD", seg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(at) = at {
        cmd.env("HETMEM_CRASH_AT", at.to_string());
    }
    let out = cmd.output().unwrap();
    let killed = out.status.signal() == Some(libc::SIGKILL);
    assert!(killed || out.status.success(), "a child failed: {:?}", out.status);
    (killed, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_process_killed_at_any_crash_point_is_recovered() {
    if let Ok(seg) = std::env::var("HETMEM_CHILD") {
        child(&seg);
    }
    let seg = format!("/hetmem-crash-points-{}", std::process::id());
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::create(&seg, 8 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let config = ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Free };
    let a = mm.create_allocator::<ScalablePageAllocator>(b.id(), ID, 0, &config).unwrap();
    // The parent's own blocks, which no recovery may touch.
    let base = b.base();
    let mine: Vec<(OffsetPtr, usize)> = [24, 200, 3000, 50_000]
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let p = a.allocate(size, 8).unwrap();
            // SAFETY: a live block of `size` bytes in the mapped segment.
            unsafe { std::ptr::write_bytes(base.add(p.get() as usize), i as u8 + 1, size) };
            (p, size)
        })
        .collect();
    a.trim().unwrap();
    let start = a.stats();
    // A run to the end counts the points.
    let (killed, out) = run_child(&seg, None);
    assert!(!killed);
    // The test harness may have printed the test's name on the same line.
    let count = out.split("crash points passed: ").nth(1).and_then(|s| s.split_whitespace().next());
    let total: u64 = count.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count in {out:?}"));
    assert!(total > 100, "the sequence passed only {total} crash points");
    let step = total.div_ceil(MOST_POINTS);
    let mut tried = 0;
    // `HETMEM_CRASH_ONLY=A-B` tries the points from A to B alone (to look into a failure).
    let only = std::env::var("HETMEM_CRASH_ONLY").ok();
    let only = only.as_deref().and_then(|v| v.split_once('-')).map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()));
    for at in (0..total).step_by(step as usize).filter(|&at| only.is_none_or(|(a, b)| (a..=b).contains(&at))) {
        let (killed, _) = run_child(&seg, Some(at));
        assert!(killed, "point {at} of {total} was not reached");
        a.reclaim().unwrap();
        let taken: Vec<OffsetPtr> =
            CLASSES.iter().flat_map(|&c| [c; 8]).map(|(size, align)| a.allocate(size, align).unwrap()).collect();
        run_child(&seg, Some(at / 2));
        run_child(&seg, Some(at % 300));
        a.reclaim().unwrap();
        for p in taken {
            a.free(p).unwrap();
        }
        a.trim().unwrap();
        a.check().unwrap_or_else(|e| panic!("after deaths at points {at}, {}, {}: {e}", at / 2, at % 300));
        let now = a.stats();
        assert_eq!(now.live_allocations, start.live_allocations, "after a death at point {at}");
        assert_eq!(now.bytes_in_use, start.bytes_in_use, "after a death at point {at}");
        assert_eq!(now.free_bytes(), start.free_bytes(), "after a death at point {at}");
        tried += 1;
    }
    for (i, &(p, size)) in mine.iter().enumerate() {
        // SAFETY: still live, `size` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(base.add(p.get() as usize), size) };
        assert!(bytes.iter().all(|&x| x == i as u8 + 1), "a block of the parent changed");
        a.free(p).unwrap();
    }
    println!("crash points: {tried} of {total} tried, each killing three processes in turn");
}
