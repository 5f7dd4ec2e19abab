//! Recycled task frames on a small executor, against `Box::pin` with glibc and with mimalloc.
//!
//! ```text
//! cargo run --release --example frames -- [--tasks N] [--in-flight K] [--reps R]
//! cargo run --release --example frames -- --only STRATEGY [--tasks N]   # one run, for profilers
//! ```
//!
//! A single-thread executor runs N short tasks (default 1,000,000), at most K at a time (default
//! 256). Each task boxes a child future, awaits it and records the result: two frames per task.
//! One child in 16 yields once before it finishes, so its task is suspended, woken and polled
//! again. Four ways to box them, in the same run:
//!
//! - `recycled`: [`FrameBox::pin_dyn_with_in`] with [`ThreadFrames`] (the default
//!   [`RecyclingFrameAllocator`]'s lists): frames come from thread-local free lists (upstream:
//!   the global allocator, here glibc).
//! - `recycled-scope`: [`FrameBox::pin_scoped`], with the executor running inside a
//!   [`with_frame_allocator`] scope over the same allocator: tasks and the children they create
//!   take their frames from it without naming it. Each task keeps the allocator it was boxed
//!   with and, when polled, compares it with the thread's current scope (entering it if not
//!   already there), so the children it creates inherit it.
//! - `box-system`: `Box::pin` with glibc malloc as the global allocator.
//! - `box-mimalloc`: `Box::pin` with mimalloc as the global allocator.
//!
//! The executor is the same for all four: fixed task slots, wakers made of the slot number and
//! a static vtable, a preallocated ready ring, nothing allocated per task but the frames under
//! test; its spawn and poll loops are out of line for every strategy alike, so that the
//! compiler's inlining choices do not favour one.
//!
//! The global allocator here is a switch between glibc and mimalloc that counts the
//! allocations of the executor thread: "upstream allocs/task" is that count over the second
//! half of the tasks (steady state) divided by those tasks. (The switch adds a few instructions
//! to each `Box::pin` allocation and free; recycled frames in steady state never reach it.)
//! `benches/frames-instructions.sh` counts the instructions per task of each strategy. Per task:
//! wall time and the executor thread's CPU time over all N tasks. The strategies run in R rounds (default 7),
//! each round all four back to back, so that load from elsewhere falls on all of them alike;
//! the table shows each strategy's run with the median CPU time, the last line the median and
//! the range of the per-round ratios of `box-system` to `recycled`. Ratios use CPU time, which
//! other load on a shared machine disturbs less (a busy sibling hyperthread still slows
//! every strategy, and narrows the ratios).
//! The program fails if recycled tasks allocate upstream in steady state in any round.

#[cfg(test)]
#[path = "common/command_line_tests.rs"]
mod command_line_tests;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::Instant;

use hetmem::cache::frame::{
    with_frame_allocator, CountingAllocator, FrameAllocator, FrameBox, FrameTask, RecyclingFrameAllocator, ScopedTask,
    ThreadFrames,
};
use hetmem::cache::CacheStats;

/// The global allocator: glibc or mimalloc, switched at run time, counting this thread's calls.
struct Switch;

const GLIBC: u8 = 0;
const MIMALLOC: u8 = 1;
static MODE: AtomicU8 = AtomicU8::new(GLIBC);

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call goes to one of two real allocators; a block is freed by the one that made
// it because the mode only changes between runs, after the executor has dropped every task: the
// only blocks then live are glibc's recycled frames on their lists, which nothing touches while
// mimalloc serves (no frame is taken or freed in a mimalloc run) and which go back to glibc at
// thread exit, after the mode is back to glibc.
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded `GlobalAlloc` contract.
        unsafe {
            match MODE.load(Ordering::Relaxed) {
                MIMALLOC => mimalloc::MiMalloc.alloc(layout),
                _ => System.alloc(layout),
            }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe {
            match MODE.load(Ordering::Relaxed) {
                MIMALLOC => mimalloc::MiMalloc.dealloc(ptr, layout),
                _ => System.dealloc(ptr, layout),
            }
        }
    }
}

#[global_allocator]
static GLOBAL: Switch = Switch;

static FRAMES: RecyclingFrameAllocator = RecyclingFrameAllocator::new();

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Pending once (waking its task), then ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// How tasks and their children are boxed.
trait Strategy: 'static {
    const NAME: &'static str;
    type Task: Future<Output = ()> + Unpin;
    type Child: Future<Output = u64> + Unpin + Send;
    /// Boxes the task `make` builds.
    fn spawn<F: Future<Output = ()> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Task;
    /// Boxes the child `make` builds.
    fn child<F: Future<Output = u64> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Child;
    /// The frame-allocator scope the executor runs in, if any.
    fn scope() -> Option<&'static dyn FrameAllocator> {
        None
    }
}

/// Frames from the thread's recycling lists, named at each box (`ThreadFrames`: the same lists
/// as `FRAMES`, as a zero-sized handle, so a boxed task is two words like `Box<dyn Future>`).
struct Recycled;

impl Strategy for Recycled {
    const NAME: &'static str = "recycled";
    type Task = FrameTask<'static, (), ThreadFrames>;
    type Child = FrameTask<'static, u64, ThreadFrames>;
    fn spawn<F: Future<Output = ()> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Task {
        FrameBox::pin_dyn_with_in(make, ThreadFrames).expect("frame")
    }
    fn child<F: Future<Output = u64> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Child {
        FrameBox::pin_dyn_with_in(make, ThreadFrames).expect("frame")
    }
}

/// Frames from the scope's allocator: the executor runs in the scope, children inherit it.
/// The scope is `FRAMES`, or with `COUNTED` the same lists through a `CountingAllocator`.
struct Scoped<const COUNTED: bool>;

/// The frames of the profiling run, counted.
static COUNTING: CountingAllocator<RecyclingFrameAllocator> = CountingAllocator::new(RecyclingFrameAllocator::new());

impl<const COUNTED: bool> Strategy for Scoped<COUNTED> {
    const NAME: &'static str = if COUNTED { "counted" } else { "recycled-scope" };
    type Task = ScopedTask<'static, ()>;
    type Child = ScopedTask<'static, u64>;
    fn spawn<F: Future<Output = ()> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Task {
        // The executor runs inside the scope (see `run`).
        FrameBox::pin_scoped(make()).expect("frame")
    }
    fn child<F: Future<Output = u64> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Child {
        // Created while the parent is polled: the parent's allocator, without naming it.
        FrameBox::pin_scoped(make()).expect("frame")
    }
    fn scope() -> Option<&'static dyn FrameAllocator> {
        if COUNTED {
            Some(&COUNTING)
        } else {
            Some(&FRAMES)
        }
    }
}

struct Boxed<const MODE: u8>;

impl<const M: u8> Strategy for Boxed<M> {
    const NAME: &'static str = if M == MIMALLOC { "box-mimalloc" } else { "box-system" };
    type Task = Pin<Box<dyn Future<Output = ()> + Send>>;
    type Child = Pin<Box<dyn Future<Output = u64> + Send>>;
    fn spawn<F: Future<Output = ()> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Task {
        Box::pin(make())
    }
    fn child<F: Future<Output = u64> + Send + 'static>(make: impl FnOnce() -> F) -> Self::Child {
        Box::pin(make())
    }
}

/// The most tasks in flight (the ready queue's capacity).
const MAX_IN_FLIGHT: usize = 4096;

/// Slots of tasks woken and not yet polled: a ring that never allocates. Each task is queued at
/// most once at a time (spawned, or woken by its child), so it never holds more than the tasks
/// in flight.
struct ReadyQueue {
    ring: [Cell<u32>; MAX_IN_FLIGHT],
    head: Cell<usize>,
    tail: Cell<usize>,
}

impl ReadyQueue {
    fn push(&self, slot: usize) {
        let tail = self.tail.get();
        debug_assert!(tail - self.head.get() < MAX_IN_FLIGHT);
        self.ring[tail % MAX_IN_FLIGHT].set(slot as u32);
        self.tail.set(tail + 1);
    }
    fn pop(&self) -> Option<usize> {
        let head = self.head.get();
        if head == self.tail.get() {
            return None;
        }
        self.head.set(head + 1);
        Some(self.ring[head % MAX_IN_FLIGHT].get() as usize)
    }
}

std::thread_local! {
    static READY: ReadyQueue = const {
        ReadyQueue {
            ring: [const { Cell::new(0) }; MAX_IN_FLIGHT],
            head: Cell::new(0),
            tail: Cell::new(0),
        }
    };
}

fn waker(slot: usize) -> Waker {
    fn clone(data: *const ()) -> RawWaker {
        RawWaker::new(data, &VTABLE)
    }
    fn wake(data: *const ()) {
        READY.with(|r| r.push(data as usize));
    }
    fn drop(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);
    // SAFETY: the vtable's functions only use the data as a slot number.
    unsafe { Waker::from_raw(RawWaker::new(slot as *const (), &VTABLE)) }
}

/// A single-thread executor with a fixed number of task slots: nothing on it allocates once
/// its slots exist, so every allocation counted is a frame.
struct Executor<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
}

struct Slot<T> {
    task: Option<T>,
    waker: Waker,
}

impl<T: Future<Output = ()> + Unpin> Executor<T> {
    fn new(slots: usize) -> Self {
        assert!(slots <= MAX_IN_FLIGHT, "at most {MAX_IN_FLIGHT} tasks in flight");
        Executor {
            slots: (0..slots).map(|i| Slot { task: None, waker: waker(i) }).collect(),
            free: (0..slots).rev().collect(),
        }
    }

    /// Starts the tasks `make` builds for `next..until` while slots are free; returns where it
    /// stopped.
    // Each batch call is out of line, for every strategy alike: the executor's code is the same
    // shape for all (left to itself, the compiler inlines it for some and not for others), and
    // a loop of its own keeps its few values in registers.
    #[inline(never)]
    fn spawn_batch(&mut self, mut next: u64, until: u64, mut make: impl FnMut(u64) -> T) -> u64 {
        while next < until {
            let Some(slot) = self.free.pop() else {
                break;
            };
            // The slot is free (`None`): nothing to drop, so no call to the task's drop glue.
            core::mem::forget(self.slots[slot].task.replace(make(next)));
            READY.with(|r| r.push(slot));
            next += 1;
        }
        next
    }

    /// Polls the woken tasks once each; `false` if none was woken.
    #[inline(never)]
    fn run_ready(&mut self) -> bool {
        let mut ran = false;
        while let Some(i) = READY.with(ReadyQueue::pop) {
            ran = true;
            let slot = &mut self.slots[i];
            let Some(task) = slot.task.as_mut() else {
                continue; // woken after it finished
            };
            if Pin::new(task).poll(&mut Context::from_waker(&slot.waker)).is_ready() {
                slot.task = None;
                self.free.push(i);
            }
        }
        ran
    }
}

async fn child(i: u64) -> u64 {
    if i % 16 == 0 {
        YieldOnce(false).await;
    }
    i & 0xFF
}

thread_local! {
    static SUM: Cell<u64> = const { Cell::new(0) };
}

async fn task<S: Strategy>(i: u64) {
    let v = S::child(|| child(i)).await;
    SUM.with(|s| s.set(s.get() + v));
}

/// CPU time of the calling thread, in nanoseconds: unlike wall time, it leaves out the time
/// other processes on a shared machine take.
fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the calling thread's CPU clock into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

#[derive(Clone)]
struct Run {
    ns_per_task: f64,
    cpu_ns_per_task: f64,
    steady_allocations_per_task: f64,
}

fn run<S: Strategy>(tasks: u64, in_flight: usize) -> Run {
    match S::scope() {
        Some(alloc) => with_frame_allocator(alloc, || run_in_scope::<S>(tasks, in_flight)),
        None => run_in_scope::<S>(tasks, in_flight),
    }
}

fn run_in_scope<S: Strategy>(tasks: u64, in_flight: usize) -> Run {
    SUM.with(|s| s.set(0));
    let mut ex = Executor::<S::Task>::new(in_flight);
    let half = tasks / 2;
    let mut allocations_at_half = 0;
    let started = Instant::now();
    let cpu_started = thread_cpu_ns();
    let mut spawned = 0;
    for until in [half, tasks] {
        if until == tasks {
            allocations_at_half = allocations();
        }
        // Spawns while there is room, runs the ready tasks when there is none.
        loop {
            spawned = ex.spawn_batch(spawned, until, |i| S::spawn(|| task::<S>(i)));
            if spawned == until {
                break;
            }
            ex.run_ready();
        }
    }
    while ex.run_ready() {}
    let elapsed = started.elapsed();
    let cpu = thread_cpu_ns() - cpu_started;
    let steady = allocations() - allocations_at_half;
    let expected: u64 = (0..tasks).map(|i| i & 0xFF).sum();
    assert_eq!(SUM.with(Cell::get), expected, "every task ran once");
    Run {
        ns_per_task: elapsed.as_nanos() as f64 / tasks as f64,
        cpu_ns_per_task: cpu / tasks as f64,
        steady_allocations_per_task: steady as f64 / (tasks - half) as f64,
    }
}

/// The run with the median CPU time.
fn median(runs: &[Run]) -> &Run {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by(|a, b| a.cpu_ns_per_task.total_cmp(&b.cpu_ns_per_task));
    sorted[sorted.len() / 2]
}

/// One round: each strategy once, back to back, so that load from elsewhere on the machine
/// falls on all of them alike.
/// Also returns the frame lists' statistics at the end of the glibc part.
fn round(tasks: u64, in_flight: usize) -> ([Run; 4], CacheStats) {
    MODE.store(GLIBC, Ordering::Relaxed);
    let recycled = run::<Recycled>(tasks, in_flight);
    let scoped = run::<Scoped<false>>(tasks, in_flight);
    let system = run::<Boxed<GLIBC>>(tasks, in_flight);
    let frames = FRAMES.thread_stats();
    // The recycled frames stay on their lists meanwhile: glibc blocks, which nothing touches
    // while mimalloc serves, and which go back upstream (to glibc) only at thread exit, after
    // the last round has switched back.
    MODE.store(MIMALLOC, Ordering::Relaxed);
    let mimalloc = run::<Boxed<MIMALLOC>>(tasks, in_flight);
    MODE.store(GLIBC, Ordering::Relaxed);
    ([recycled, scoped, system, mimalloc], frames)
}

/// A short run through a counting allocator: what the frames are.
fn profile(tasks: u64) {
    run::<Scoped<true>>(tasks, 256);
    let s = COUNTING.stats();
    println!(
        "profile ({tasks} tasks through CountingAllocator): {:.2} frames/task, {:.0} bytes/frame, \
         peak {} bytes live, {} frames still live",
        s.allocations as f64 / tasks as f64,
        s.bytes_allocated as f64 / s.allocations as f64,
        s.peak_bytes,
        s.allocations - s.deallocations
    );
    let _ = COUNTING.inner().allocate(16).map(|p| {
        // SAFETY: just allocated with this size.
        unsafe { COUNTING.inner().deallocate(p, 16) }
    });
}

const USAGE: &str = "usage: frames [--tasks N] [--in-flight K] [--reps R]
       frames --only recycled|recycled-scope|box-system|box-mimalloc [--tasks N] [--in-flight K]";

/// The strategies `--only` runs alone.
const STRATEGIES: [&str; 4] = ["recycled", "recycled-scope", "box-system", "box-mimalloc"];

/// What the command line asks for.
#[derive(Debug, PartialEq)]
struct Options {
    tasks: u64,
    in_flight: usize,
    reps: usize,
    only: Option<String>,
}

/// Parses the arguments after the program's name; `Ok(None)` for `--help`. Anything it does not
/// know is an error, so that a typo (or `--help`) does not quietly run the whole benchmark.
fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options { tasks: 1_000_000, in_flight: 256, reps: 7, only: None };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = || -> Result<u64, String> {
            it.next().and_then(|v| v.parse().ok()).filter(|&v| v > 0).ok_or(format!("{arg} needs a positive number"))
        };
        match arg.as_str() {
            "--tasks" => o.tasks = number()?,
            "--in-flight" => {
                o.in_flight = usize::try_from(number()?)
                    .ok()
                    .filter(|&k| k <= MAX_IN_FLIGHT)
                    .ok_or(format!("--in-flight takes at most {MAX_IN_FLIGHT}"))?;
            }
            "--reps" => o.reps = usize::try_from(number()?).map_err(|_| "--reps: too many".to_string())?,
            "--only" => {
                let only = it.next().filter(|s| STRATEGIES.contains(&s.as_str()));
                o.only = Some(only.ok_or(format!("--only takes one of {}", STRATEGIES.join(", ")))?.clone());
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(o))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Options { tasks, in_flight, reps, only } = match parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("frames: {e}\n{USAGE}");
            std::process::exit(2)
        }
    };
    if let Some(only) = only {
        // One strategy alone, for profilers.
        let r = match only.as_str() {
            "recycled" => run::<Recycled>(tasks, in_flight),
            "recycled-scope" => run::<Scoped<false>>(tasks, in_flight),
            "box-system" => run::<Boxed<GLIBC>>(tasks, in_flight),
            "box-mimalloc" => {
                MODE.store(MIMALLOC, Ordering::Relaxed);
                let r = run::<Boxed<MIMALLOC>>(tasks, in_flight);
                MODE.store(GLIBC, Ordering::Relaxed);
                r
            }
            _ => unreachable!("parse_args takes only the four strategies"),
        };
        println!("{only}: {:.2} ns/task wall, {:.2} ns/task CPU", r.ns_per_task, r.cpu_ns_per_task);
        return;
    }

    profile(10_000);

    let (rounds, frames): (Vec<[Run; 4]>, Vec<CacheStats>) = (0..reps).map(|_| round(tasks, in_flight)).unzip();
    let frames = frames[frames.len() - 1];
    let names = [Recycled::NAME, Scoped::<false>::NAME, Boxed::<GLIBC>::NAME, Boxed::<MIMALLOC>::NAME];
    let runs_of = |k: usize| -> Vec<Run> { rounds.iter().map(|r| r[k].clone()).collect() };
    let medians: Vec<Run> = (0..names.len()).map(|k| median(&runs_of(k)).clone()).collect();
    let (system, mimalloc) = (&medians[2], &medians[3]);

    println!(
        "tasks: {tasks}, in flight: {in_flight}, 2 frames per task; {reps} rounds of the four strategies \
         back to back, the run with the median CPU time of each"
    );
    println!(
        "recycled frame lists (this thread, all rounds): {} hits, {} upstream allocations, \
         {} bytes cached",
        frames.hits, frames.upstream_allocations, frames.bytes_cached
    );
    println!(
        "{:<15} {:>9} {:>9} {:>12} {:>14} {:>22}",
        "strategy", "wall ns", "CPU ns", "/box-system", "/box-mimalloc", "upstream allocs/task"
    );
    for (name, r) in names.iter().zip(&medians) {
        println!(
            "{:<15} {:>9.2} {:>9.2} {:>11.2}x {:>13.2}x {:>22.4}",
            name,
            r.ns_per_task,
            r.cpu_ns_per_task,
            r.cpu_ns_per_task / system.cpu_ns_per_task,
            r.cpu_ns_per_task / mimalloc.cpu_ns_per_task,
            r.steady_allocations_per_task
        );
    }
    // Round by round, the two ran within milliseconds of each other: the median of those
    // ratios is the comparison least moved by load that comes and goes; the spread says how
    // much the machine moved.
    let mut per_round: Vec<f64> = rounds.iter().map(|r| r[2].cpu_ns_per_task / r[0].cpu_ns_per_task).collect();
    per_round.sort_by(f64::total_cmp);
    println!(
        "recycled frames: {:.2}x faster per task (CPU time) than Box::pin with glibc (median of the per-round \
         ratios; rounds: {:.2}x to {:.2}x); steady-state upstream allocations per task: {}",
        per_round[per_round.len() / 2],
        per_round[0],
        per_round[per_round.len() - 1],
        medians[0].steady_allocations_per_task
    );
    let allocating =
        rounds.iter().any(|r| r[0].steady_allocations_per_task != 0.0 || r[1].steady_allocations_per_task != 0.0);
    if allocating {
        eprintln!("frames: recycled tasks still allocate upstream in steady state");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use command_line_tests::{args, assert_refused};

    #[test]
    fn the_command_line_is_parsed_or_refused_with_a_reason() {
        let defaults = Options { tasks: 1_000_000, in_flight: 256, reps: 7, only: None };
        assert_eq!(parse_args(&args("")), Ok(Some(defaults)));
        assert_eq!(
            parse_args(&args("--reps 3 --tasks 10 --in-flight 4096 --only box-system")),
            Ok(Some(Options { tasks: 10, in_flight: 4096, reps: 3, only: Some("box-system".into()) }))
        );
        assert_eq!(parse_args(&args("--help")), Ok(None));
        assert_eq!(parse_args(&args("--tasks 5 -h")), Ok(None));
        assert_refused(
            parse_args,
            &[
                ("--taks 5", "unknown argument"),
                ("5", "unknown argument"),
                ("--tasks", "positive number"),
                ("--tasks 0", "positive number"),
                ("--reps x", "positive number"),
                ("--in-flight 4097", "at most 4096"),
                ("--only", "--only takes"),
                ("--only box", "--only takes"),
            ],
        );
    }
}
