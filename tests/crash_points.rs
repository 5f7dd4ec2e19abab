//! Death at every crash point of the span allocators (a build with `--cfg hetmem_crash_points`,
//! see `core/src/crash.rs`; `ci/test` runs it).
//!
//! A child process attaches to a shared segment and runs a fixed sequence of operations that
//! takes every path of the allocator that writes shared state: allocations and frees in several
//! classes, cache flushes and refills (page allocator), quick and slow paths, fresh blocks and
//! new spans (thread-local allocator), an in-place resize, large blocks, frees of blocks the
//! parent lent through a mailbox in the segment (remote frees into the parent's heap), frees of
//! its own blocks from a second thread (remote frees that its main thread then collects), a
//! trim. It kills itself at crash point `n` of its run. Each point gets a round of three
//! children:
//! 1. the first dies at point `n`; the parent recovers it and takes blocks of every class the
//!    sequence uses, among them those the child had in hand;
//! 2. the second takes the first's slot again and dies at point `n / 2` in every other round,
//!    before it touched some of the classes the first did (a recovery must not judge their old
//!    journals again), and at point `n` again in the others;
//! 3. the third dies at point `n % R` of its run (`R` about as many points as a recovery of
//!    the allocator passes: 300 for the page allocator, 48 for the thread-local one), mostly
//!    inside its own recovery of the second, which the parent's recovery then finishes.
//!
//! After each round the parent checks the allocator whole: every block the children held or
//! had in hand is back, the blocks it lent that a child took are freed once (by the child, or
//! by the parent if the child died before it began to), and the parent's own blocks are
//! untouched.
//!
//! Each allocator runs the sequence twice: with `DeadProcessBlocks::Free` (a dead child's
//! blocks are freed by the recovery) and with `Keep`, the default (they stay allocated; each
//! child stamps the bytes of each block it holds and records it in a journal in the mailbox;
//! the parent checks that each such block is live with its size and its bytes, frees it as its
//! holder would, then checks that nothing else stayed allocated).
//!
//! A second driver ([`slot_table_growth`]) covers the growth of the slot (heap) table, which the
//! sequence above never reaches: a child whose threads hold more slots at once than the table
//! has dies at each point in turn, on a fresh segment each time.
#![cfg(all(hetmem_crash_points, target_os = "linux"))]

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hetmem::allocators::ThreadLocalAllocator;
use hetmem::prelude::*;

const ID: AllocatorId = AllocatorId::new(1, 0);
/// The small requests of the child's sequence, as (size, alignment): their classes.
const CLASSES: [(usize, usize); 7] = [(3000, 8), (2900, 8), (200, 8), (209, 8), (203, 64), (150, 8), (100, 8)];
/// The blocks the parent lends a child (sizes), one per mailbox slot.
const LENT: [usize; 4] = [100, 3000, 100, 24];

/// What the driver needs of an allocator beyond the allocator traits (inherent methods).
trait Probe: AllocatorType {
    /// The growth test's name (see [`slot_table_growth`]).
    const GROW_TEST: &'static str;
    /// At most this many points are tried (evenly spread over the sequence), to bound the run
    /// time.
    const MOST_POINTS: u64;
    /// The third child of a round dies at point `n % RECOVERY` of its run: about as many points
    /// as its recovery of the second passes, so that it mostly dies inside it.
    const RECOVERY: u64;
    /// Recovers what dead processes left.
    fn recover(&self);
    /// Returns what the calling thread holds but does not use.
    fn tidy(&self);
    /// How many per-thread records (heaps) threads of any process hold, where the allocator
    /// tells.
    fn records_held(&self) -> Option<usize> {
        None
    }
}

impl Probe for ScalablePageAllocator {
    const GROW_TEST: &'static str = "a_process_killed_while_its_threads_grow_the_slot_table_is_recovered";
    const MOST_POINTS: u64 = 2500;
    const RECOVERY: u64 = 300;
    fn recover(&self) {
        self.reclaim().unwrap();
    }
    fn tidy(&self) {
        self.trim().unwrap();
    }
}

impl Probe for ThreadLocalAllocator {
    const GROW_TEST: &'static str = "a_thread_local_process_killed_while_its_threads_grow_the_heap_table_is_recovered";
    const MOST_POINTS: u64 = 1500;
    const RECOVERY: u64 = 48;
    fn recover(&self) {
        self.reclaim().unwrap();
    }
    fn tidy(&self) {
        self.trim().unwrap();
    }
    fn records_held(&self) -> Option<usize> {
        Some(self.owned_heaps().unwrap())
    }
}

/// The words of a child's journal of the blocks it holds: one per block (0: none), then the
/// operation under way (0: none): [`ALLOCATING`], [`FREEING`] or [`RESIZING`] with the size
/// asked for or the block's offset.
const JOURNAL: usize = 64 + 1;
const ALLOCATING: u64 = 1 << 63;
const FREEING: u64 = 1 << 62;
const RESIZING: u64 = 1 << 61;
const OPERATION: u64 = ALLOCATING | FREEING | RESIZING;
/// A held block's word: its offset in the low bits, its size from this bit on.
const SIZE_SHIFT: u32 = 40;
const OFFSET: u64 = (1 << SIZE_SHIFT) - 1;
/// The mailbox's words: one per [`LENT`] block, then a journal for each child of a round.
const MAIL_WORDS: usize = LENT.len() + 3 * JOURNAL;

/// The mailbox's words, at `offset` in the segment mapped at `base`: [`MAIL_WORDS`] of them.
///
/// # Safety
/// `[offset, offset + 8 * MAIL_WORDS)` is a live, 8-aligned block of that segment for `'a`.
unsafe fn mailbox<'a>(base: *mut u8, offset: u64) -> &'a [AtomicU64] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(base.add(offset as usize).cast::<AtomicU64>(), MAIL_WORDS) }
}

/// The journal of child `k` (0, 1, 2) of a round in the mailbox `mail`.
fn journal(mail: &[AtomicU64], k: usize) -> &[AtomicU64] {
    &mail[LENT.len() + k * JOURNAL..][..JOURNAL]
}

/// A child's operations, each recorded in its journal, so that the parent knows which blocks
/// a dead child held (with `DeadProcessBlocks::Keep` they stay allocated, for their holder to
/// free; here the parent plays that part).
struct Tracked<A> {
    a: Arc<A>,
    journal: &'static [AtomicU64],
    /// Child `k` of its round (see [`stamp`]).
    k: usize,
    /// Where the segment is mapped (an address, so that the tracker crosses threads).
    base: usize,
}

impl<A> Clone for Tracked<A> {
    fn clone(&self) -> Self {
        Tracked { a: self.a.clone(), journal: self.journal, k: self.k, base: self.base }
    }
}

/// The bytes child `k` writes into a block it holds at `offset`, of `size` bytes, before it
/// journals it (a splitmix64 hash of the three, repeated): the parent finds them there after
/// the child's death, unless the allocator wrote into a live block or handed it to someone else.
fn stamp(offset: u64, size: usize, k: usize) -> impl Iterator<Item = u8> {
    let mut x = offset ^ (size as u64) << SIZE_SHIFT ^ (k as u64 + 1) << 60;
    x = (x ^ x >> 30).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ x >> 27).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (0..size).map(move |i| (x >> (8 * (i % 8))) as u8)
}

/// The `size` bytes at `offset` of the segment mapped at `base`.
///
/// # Safety
/// `[offset, offset + size)` is a live block of that segment, which no one else writes while the
/// slice lives.
unsafe fn block<'a>(base: usize, offset: u64, size: usize) -> &'a mut [u8] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts_mut((base + offset as usize) as *mut u8, size) }
}

impl<A: Probe> Tracked<A> {
    fn doing(&self) -> &AtomicU64 {
        &self.journal[JOURNAL - 1]
    }

    /// Stamps block `p` of `size` bytes (see [`stamp`]) and records it: one word, the size above
    /// the offset.
    fn hold(&self, p: OffsetPtr, size: usize) {
        // SAFETY: `p` is a block of `size` bytes that this child was just given and holds alone.
        let bytes = unsafe { block(self.base, p.get(), size) };
        for (byte, s) in bytes.iter_mut().zip(stamp(p.get(), size, self.k)) {
            *byte = s;
        }
        let word = self.journal[..JOURNAL - 1].iter().find(|w| w.load(Ordering::Relaxed) == 0);
        word.expect("the journal is full").store(p.get() | (size as u64) << SIZE_SHIFT, Ordering::SeqCst);
    }

    fn forget(&self, p: OffsetPtr) {
        let word = self.journal[..JOURNAL - 1].iter().find(|w| w.load(Ordering::Relaxed) & OFFSET == p.get());
        word.expect("a block the journal does not hold").store(0, Ordering::SeqCst);
    }

    fn allocate(&self, size: usize, align: usize) -> OffsetPtr {
        self.doing().store(ALLOCATING | size as u64, Ordering::SeqCst);
        let p = self.a.allocate(size, align).unwrap();
        self.hold(p, size);
        self.doing().store(0, Ordering::SeqCst);
        p
    }

    fn free(&self, p: OffsetPtr) {
        self.doing().store(FREEING | p.get(), Ordering::SeqCst);
        self.forget(p);
        self.a.free(p).unwrap();
        self.doing().store(0, Ordering::SeqCst);
    }

    fn reallocate(&self, p: OffsetPtr, size: usize, align: usize) -> OffsetPtr {
        self.doing().store(RESIZING | p.get(), Ordering::SeqCst);
        self.forget(p);
        let q = self.a.reallocate(p, size, align).unwrap();
        self.hold(q, size);
        self.doing().store(0, Ordering::SeqCst);
        q
    }
}

/// The child's part (child `k` of a round): every operation on `a`, then the count of points it
/// passed on stdout.
fn child<A: Probe>(seg: &str, mail: u64, k: usize) -> ! {
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::attach(seg, &ShmOptions::default()).unwrap()).unwrap();
    let a = Tracked::<A> {
        a: mm.attach_allocator::<A>(b.id(), ID).unwrap(),
        // SAFETY: the parent's mailbox block, live while children run; this process exits
        // without unmapping the segment (`mm` is never dropped).
        journal: journal(unsafe { mailbox(b.base(), mail) }, k),
        k,
        base: b.base() as usize,
    };
    // SAFETY: as above.
    let slots = &unsafe { mailbox(b.base(), mail) }[..LENT.len()];
    let mut held = Vec::new();
    // A class whose cache holds a few blocks: new spans, flushes and refills.
    for _ in 0..12 {
        held.push(a.allocate(3000, 8));
    }
    for p in held.drain(..10) {
        a.free(p);
    }
    for _ in 0..6 {
        held.push(a.allocate(2900, 8));
    }
    // A small class, an aligned request, and an in-place resize.
    for i in 0..10 {
        held.push(a.allocate(200 + i, if i == 3 { 64 } else { 8 }));
    }
    let last = held.pop().unwrap();
    let last = a.reallocate(last, 205, 8);
    held.push(a.reallocate(last, 150, 8));
    // Large blocks: one freed, one shrunk in place and kept.
    let big = a.allocate(40_000, 8);
    let kept = a.allocate(70_000, 8);
    held.push(a.reallocate(kept, 60_000, 8));
    a.free(big);
    for p in held.drain(12..16) {
        a.free(p);
    }
    // The parent's blocks: frees into another process's heap.
    for slot in slots {
        let p = slot.swap(0, Ordering::AcqRel);
        if p != 0 {
            a.a.free(OffsetPtr::new(p)).unwrap();
        }
    }
    // Blocks freed by a second thread (with a block of its own, and a heap or cache it gives
    // back when it exits): remote frees, which this thread then collects.
    let mine: Vec<OffsetPtr> = (0..40).map(|_| a.allocate(100, 8)).collect();
    let a2 = a.clone();
    let theirs: Vec<u64> = mine[..36].iter().map(|p| p.get()).collect();
    // `join` (unlike a scope) returns only after the thread's TLS destructors ran.
    std::thread::spawn(move || {
        let own = a2.allocate(500, 8);
        a2.free(own);
        for p in theirs {
            a2.free(OffsetPtr::new(p));
        }
    })
    .join()
    .unwrap();
    let again: Vec<OffsetPtr> = (0..2).map(|_| a.allocate(100, 8)).collect();
    for p in again.into_iter().chain(mine[36..38].iter().copied()) {
        a.free(p);
    }
    held.extend_from_slice(&mine[38..]);
    a.a.tidy();
    // Still holding the rest: a dead process's blocks, freed by the recovery.
    println!("crash points passed: {}", hetmem::core::crash::points_passed());
    std::process::exit(0);
}

/// Where the second child of round `round` dies (the round for point `n`, counted over the
/// whole sequence): in even rounds at `n / 2`, so that it dies before it touched some of the
/// classes the first did; in odd rounds at `n`, so that the third child dies recovering a death
/// at any point of the sequence (not only in its first half).
fn second(round: u64, n: u64) -> u64 {
    if round % 2 == 0 {
        n / 2
    } else {
        n
    }
}

/// Runs test `test` again as a child with `HETMEM_CHILD=role`, dying at point `at` (none: runs
/// to the end); returns whether it was killed and what it printed.
fn run_child(test: &str, role: &str, at: Option<u64>) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("HETMEM_CHILD", role)
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

/// The count of points a child that ran to the end printed (the test harness may have printed
/// the test's name on the same line).
fn points_passed(out: &str) -> Option<u64> {
    out.split("crash points passed: ").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Which points are to be tried: all, unless `HETMEM_CRASH_ONLY=A-B` narrows them to A..=B (to
/// look into a failure).
fn wanted() -> impl Fn(&u64) -> bool {
    let only = std::env::var("HETMEM_CRASH_ONLY").ok();
    let only = only.as_deref().and_then(|v| v.split_once('-')).map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()));
    move |at| only.is_none_or(|(a, b)| (a..=b).contains(at))
}

/// The blocks the parent lent through the mailbox (per slot, 0 for none) that no child is
/// known to have freed.
struct Lent(Vec<u64>);

impl Lent {
    /// Fills the empty slots with blocks of the parent's, allocated by a thread that then
    /// exits (its heap or cache is given back while the blocks live on).
    fn lend<A: Probe>(&mut self, a: &Arc<A>, slots: &[AtomicU64]) {
        let empty: Vec<usize> = (0..LENT.len()).filter(|&i| slots[i].load(Ordering::Acquire) == 0).collect();
        let blocks = on_a_thread_that_exits(a, move |a| {
            empty.iter().map(|&i| (i, a.allocate(LENT[i], 8).unwrap().get())).collect::<Vec<_>>()
        });
        for (i, p) in blocks {
            self.0[i] = p;
            slots[i].store(p, Ordering::Release);
        }
    }

    /// After the children are dead and recovered (before the parent allocates again): a lent
    /// block a child took is free unless the child died before it began to free it; the
    /// parent frees those. With `all`, the blocks still in the mailbox come back too.
    fn settle<A: Probe>(&mut self, a: &A, slots: &[AtomicU64], all: bool, deaths: &str) {
        for (slot, lent) in slots.iter().zip(&mut self.0) {
            let taken = slot.load(Ordering::Acquire) == 0;
            if *lent != 0 && (taken || all) {
                slot.store(0, Ordering::Release);
                if a.size_of(OffsetPtr::new(*lent)).is_ok() {
                    a.free(OffsetPtr::new(*lent)).unwrap_or_else(|e| panic!("after {deaths}: a lent block: {e}"));
                }
                *lent = 0;
            }
        }
    }
}

/// Runs `f` on a thread of its own and returns what it returned once the thread has exited
/// (`join`, unlike a scope, returns only after the thread's TLS destructors ran).
fn on_a_thread_that_exits<A: Probe, R: Send + 'static>(a: &Arc<A>, f: impl FnOnce(&A) -> R + Send + 'static) -> R {
    let a = a.clone();
    std::thread::spawn(move || f(&a)).join().unwrap()
}

/// Blocks that may be live with no journal naming them: how many at most, and a bound on the
/// bytes they take.
#[derive(Clone, Copy, Default)]
struct Unnamed {
    blocks: u64,
    bytes: u64,
}

/// After children `ks` (in the order they ran) are dead and recovered, with `keep`
/// (`DeadProcessBlocks::Keep`): frees the blocks their journals say they held, which must still
/// be live, with their sizes and stamped bytes (the segment is mapped at `base`), and the block
/// of a free or resize under way if it is live and no later child holds it (a free that took
/// effect lets a later child have the block). Returns what may be live
/// that no journal names: the block of an allocation under way, or of a resize that moved.
/// Without `keep` the recovery freed them all. Empties the journals.
fn settle_journals<A: Probe>(
    a: &A,
    base: *mut u8,
    mail: &[AtomicU64],
    ks: &[usize],
    keep: bool,
    deaths: &str,
) -> Unnamed {
    let journals: Vec<(Vec<u64>, u64)> = ks
        .iter()
        .map(|&k| {
            let words = journal(mail, k);
            let held = words[..JOURNAL - 1].iter().map(|w| w.swap(0, Ordering::AcqRel)).filter(|&p| p != 0);
            (held.collect(), words[JOURNAL - 1].swap(0, Ordering::AcqRel))
        })
        .collect();
    let mut unnamed = Unnamed::default();
    if !keep {
        return unnamed;
    }
    // Held blocks' offsets, per journal.
    let offsets: Vec<Vec<u64>> = journals.iter().map(|(h, _)| h.iter().map(|w| w & OFFSET).collect()).collect();
    for (i, (held, doing)) in journals.iter().enumerate() {
        let k = ks[i];
        for &word in held {
            let (p, size) = (OffsetPtr::new(word & OFFSET), (word >> SIZE_SHIFT) as usize);
            match a.size_of(p) {
                Ok(now) => assert_eq!(now, size, "after {deaths}: a block child {k} held ({}) changed", p.get()),
                Err(e) => panic!("after {deaths}: a block child {k} held ({}) is not live, with Keep: {e}", p.get()),
            }
            // SAFETY: a live block of `size` bytes (checked just above), whose holder is dead.
            let bytes = unsafe { block(base as usize, p.get(), size) };
            assert!(
                bytes.iter().copied().eq(stamp(p.get(), size, k)),
                "after {deaths}: the bytes of a block child {k} held ({}) changed",
                p.get()
            );
            a.free(p).unwrap_or_else(|e| panic!("after {deaths}: a block child {k} held: {e}"));
        }
        let held = &offsets[i];
        let (operation, value) = (doing & OPERATION, doing & !OPERATION);
        // The block of a free or resize under way, unless the journal or a later child has it.
        let p = OffsetPtr::new(value);
        let later = (i + 1..journals.len()).any(|j| offsets[j].contains(&value) || journals[j].1 & !OPERATION == value);
        if operation & (FREEING | RESIZING) != 0 && !held.contains(&value) && !later && a.size_of(p).is_ok() {
            a.free(p).unwrap_or_else(|e| panic!("after {deaths}: the block child {k} was freeing: {e}"));
        }
        // A new block that an allocation, or a resize that moved, may have made. (A large
        // block takes whole 4 KiB units.)
        let size = match operation {
            ALLOCATING => value,
            RESIZING => 70_000,
            _ => continue,
        };
        unnamed.blocks += 1;
        unnamed.bytes += size.next_multiple_of(4096);
    }
    unnamed
}

/// The parent's part (or the child's, in a child process), for allocator `A` with `config`,
/// whose dead processes' blocks stay allocated if `keep`; at most `most` points are tried.
fn crash_points<A: Probe>(test: &str, config: A::Config, keep: bool, most: u64, tag: &str) {
    if let Ok(args) = std::env::var("HETMEM_CHILD") {
        let mut args = args.split(' ');
        let (seg, mail, k) = (args.next().unwrap(), args.next().unwrap(), args.next().unwrap());
        child::<A>(seg, mail.parse().unwrap(), k.parse().unwrap());
    }
    assert!(std::env::var_os("HETMEM_CRASH_AT").is_none(), "HETMEM_CRASH_AT is for the children this test starts");
    let seg = format!("/hetmem-crash-points-{tag}-{}", std::process::id());
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::create(&seg, 8 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.create_allocator::<A>(b.id(), ID, 0, &config).unwrap();
    // The parent's own blocks, which no recovery may touch: some allocated by this thread,
    // some by a thread that has exited since (a heap it gave back holds them).
    let base = b.base();
    const MINE: [usize; 4] = [24, 200, 3000, 50_000];
    let fill = |i: usize, p: OffsetPtr, size: usize| {
        // SAFETY: a live block of `size` bytes in the mapped segment.
        unsafe { std::ptr::write_bytes(base.add(p.get() as usize), i as u8 + 1, size) };
    };
    let mut mine: Vec<(OffsetPtr, usize)> = MINE.iter().map(|&size| (a.allocate(size, 8).unwrap(), size)).collect();
    mine.extend(on_a_thread_that_exits(&a, |a| {
        MINE.iter().map(|&size| (a.allocate(size, 8).unwrap(), size)).collect::<Vec<_>>()
    }));
    for (i, &(p, size)) in mine.iter().enumerate() {
        fill(i, p, size);
    }
    let mail = a.allocate(8 * MAIL_WORDS, 8).unwrap();
    // SAFETY: a live block of `MAIL_WORDS` words.
    let words = unsafe {
        std::ptr::write_bytes(base.add(mail.get() as usize), 0, 8 * MAIL_WORDS);
        mailbox(base, mail.get())
    };
    let slots = &words[..LENT.len()];
    let mut lent = Lent(vec![0; LENT.len()]);
    a.tidy();
    let mut start = a.stats();
    let child = |k, at| run_child(test, &format!("{seg} {} {k}", mail.get()), at);
    // A run to the end counts the points.
    lent.lend(&a, slots);
    let (killed, out) = child(0, None);
    assert!(!killed);
    a.recover();
    assert_eq!(settle_journals(&*a, base, words, &[0], keep, "a run to the end").blocks, 0);
    lent.settle(&*a, slots, true, "a run to the end");
    let total = points_passed(&out).unwrap_or_else(|| panic!("no count in {out:?}"));
    assert!(total > 100, "the sequence passed only {total} crash points");
    let step = total.div_ceil(most);
    let mut tried = 0;
    // The parent's blocks are live and whole.
    let verify = |deaths: &str| {
        for (i, &(p, size)) in mine.iter().enumerate() {
            assert_eq!(a.size_of(p).ok(), Some(size), "after {deaths}: a block of the parent was freed");
            // SAFETY: live (checked just above), `size` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(base.add(p.get() as usize), size) };
            assert!(bytes.iter().all(|&x| x == i as u8 + 1), "after {deaths}: a block of the parent changed");
        }
    };
    for at in (0..total).step_by(step as usize).filter(wanted()) {
        let first = format!("a death at point {at}");
        lent.lend(&a, slots);
        let (killed, out) = child(0, Some(at));
        if !killed {
            // With Keep, blocks whose allocation a dead child had under way stay allocated, and
            // the sequence may take other paths (fewer points); with Free, every round starts
            // from the same state.
            let passed = points_passed(&out).unwrap_or(total);
            assert!(keep && at >= passed, "point {at} of {total} was not reached ({passed} passed)");
        }
        a.recover();
        verify(&first);
        // The journals first: a lent block that a child freed may be a later child's now.
        // Blocks that may stay live with Keep, unnamed (at most one per child):
        let first_unnamed = settle_journals(&*a, base, words, &[0], keep, &first);
        lent.settle(&*a, slots, false, &first);
        let taken: Vec<OffsetPtr> =
            CLASSES.iter().flat_map(|&c| [c; 8]).map(|(size, align)| a.allocate(size, align).unwrap()).collect();
        lent.lend(&a, slots);
        let deaths = format!("deaths at points {at}, {}, {}", second(at / step, at), at % A::RECOVERY);
        child(1, Some(second(at / step, at)));
        child(2, Some(at % A::RECOVERY));
        a.recover();
        verify(&deaths);
        let later_unnamed = settle_journals(&*a, base, words, &[1, 2], keep, &deaths);
        let unnamed = Unnamed {
            blocks: first_unnamed.blocks + later_unnamed.blocks,
            bytes: first_unnamed.bytes + later_unnamed.bytes,
        };
        lent.settle(&*a, slots, true, &deaths);
        for p in taken {
            a.free(p).unwrap_or_else(|e| panic!("after {deaths}: a block the parent took: {e}"));
        }
        a.tidy();
        a.check().unwrap_or_else(|e| panic!("after {deaths}: {e}"));
        let now = a.stats();
        let extra = now.live_allocations.checked_sub(start.live_allocations);
        if extra == Some(0) {
            assert_eq!(now.bytes_in_use, start.bytes_in_use, "after {deaths}");
            assert_eq!(now.free_bytes(), start.free_bytes(), "after {deaths}");
        } else {
            // With Keep, a block whose allocation a dead child had under way stays allocated,
            // and no one knows it: the figures from here on count it.
            let grew = now.bytes_in_use.checked_sub(start.bytes_in_use);
            assert!(
                extra.is_some_and(|n| n <= unnamed.blocks) && grew.is_some_and(|b| b <= unnamed.bytes),
                "after {deaths}: {now:?} against {start:?}, with at most {} blocks of {} bytes unnamed",
                unnamed.blocks,
                unnamed.bytes
            );
            start = now;
        }
        // The parent's own heap alone: every heap of the dead children is back.
        assert_eq!(a.records_held().unwrap_or(1), 1, "after {deaths}");
        tried += usize::from(killed);
    }
    verify("the last round");
    for &(p, _) in &mine {
        a.free(p).unwrap();
    }
    a.free(mail).unwrap();
    println!("crash points ({tag}): {tried} of {total} tried, each killing three processes in turn");
}

/// The test functions' names, for the children to run them again.
const SPA_FREE: &str = "a_process_killed_at_any_crash_point_is_recovered";
const SPA_KEEP: &str = "a_process_killed_at_any_crash_point_keeps_its_blocks_and_loses_nothing";
const TLA_FREE: &str = "a_thread_local_process_killed_at_any_crash_point_is_recovered";
const TLA_KEEP: &str = "a_thread_local_process_killed_at_any_crash_point_keeps_its_blocks_and_loses_nothing";

#[test]
fn a_process_killed_at_any_crash_point_is_recovered() {
    let config = ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Free };
    crash_points::<ScalablePageAllocator>(SPA_FREE, config, false, ScalablePageAllocator::MOST_POINTS, "spa");
}

/// With `DeadProcessBlocks::Keep` (the default): a dead child's blocks stay allocated, and the
/// parent frees them as their holder would; fewer points, since the other test covers the
/// same paths with `Free`.
#[test]
fn a_process_killed_at_any_crash_point_keeps_its_blocks_and_loses_nothing() {
    let config = ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Keep };
    crash_points::<ScalablePageAllocator>(SPA_KEEP, config, true, ScalablePageAllocator::MOST_POINTS / 4, "spa-keep");
}

#[test]
fn a_thread_local_process_killed_at_any_crash_point_is_recovered() {
    let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free };
    crash_points::<ThreadLocalAllocator>(TLA_FREE, config, false, ThreadLocalAllocator::MOST_POINTS, "tla");
}

#[test]
fn a_thread_local_process_killed_at_any_crash_point_keeps_its_blocks_and_loses_nothing() {
    let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Keep };
    crash_points::<ThreadLocalAllocator>(TLA_KEEP, config, true, ThreadLocalAllocator::MOST_POINTS / 4, "tla-keep");
}

/// Threads of the growth child that hold a slot (page allocator: a cache; thread-local
/// allocator: a heap) at once: with the parent's, one more than a chunk of the slot table
/// holds (16), so the child's last thread grows it.
const THREADS: usize = 16;

/// The growth child's part: `THREADS` threads take slots one after another, each keeping its
/// own (and a block) while the next starts, so that one of them grows the table; then they
/// exit one after another. Deterministic: one thread works at a time.
fn grow_child<A: Probe>(seg: &str) -> ! {
    let mm = MemoryManager::new();
    let b = mm.add_backend(PosixShmBackend::attach(seg, &ShmOptions::default()).unwrap()).unwrap();
    let a = mm.attach_allocator::<A>(b.id(), ID).unwrap();
    let mut threads = Vec::new();
    for i in 0..THREADS {
        let (ready, wait_ready) = std::sync::mpsc::channel();
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let a = a.clone();
        let thread = std::thread::spawn(move || {
            // Kept: a dead process's block for the recovery to free.
            let _kept = a.allocate(100 + i, 8).unwrap();
            ready.send(()).unwrap();
            wait_go.recv().unwrap();
        });
        wait_ready.recv().unwrap();
        threads.push((go, thread));
    }
    for (go, thread) in threads {
        go.send(()).unwrap();
        thread.join().unwrap();
    }
    println!("crash points passed: {}", hetmem::core::crash::points_passed());
    std::process::exit(0);
}

/// A child whose threads grow the slot table dies at each crash point in turn, on a fresh
/// segment each time (a table, once grown, stays grown). After each death the parent recovers,
/// checks the allocator whole and back to its start, and then has `THREADS` threads of its own
/// hold slots at once: a table a death left half grown must still serve them.
fn slot_table_growth<A: Probe>(config: A::Config, tag: &str) {
    if let Some(seg) = std::env::var("HETMEM_CHILD").ok().as_deref().and_then(|c| c.strip_prefix("grow ")) {
        grow_child::<A>(seg);
    }
    assert!(std::env::var_os("HETMEM_CRASH_AT").is_none(), "HETMEM_CRASH_AT is for the children this test starts");
    let child = |seg: &str, at| run_child(A::GROW_TEST, &format!("grow {seg}"), at);
    // One round on a fresh segment: the child dies at `at` (or runs to the end, with `growth`
    // unknown); returns what it printed and the bytes the table's growth took. A table, once
    // grown, keeps its new chunk: after a death the segment's free bytes are those at the start,
    // or those less the chunk; after the parent's threads, always the latter.
    let round = |at: Option<u64>, growth: Option<u64>| -> (String, u64) {
        let seg = format!("/hetmem-crash-grow-{tag}-{}-{}", std::process::id(), at.map_or(-1, |n| n as i64));
        let mm = MemoryManager::new();
        let b = mm.add_backend(PosixShmBackend::create(&seg, 8 << 20, &ShmOptions::default()).unwrap()).unwrap();
        let a = mm.create_allocator::<A>(b.id(), ID, 0, &config).unwrap();
        // The parent holds a slot of its own, as every user of the segment would.
        let own = a.allocate(24, 8).unwrap();
        a.tidy();
        let start = a.stats();
        let (killed, out) = child(&seg, at);
        assert_eq!(killed, at.is_some(), "point {at:?} was not reached");
        let after = format!("a death at growth point {at:?}");
        // Checks the allocator whole; returns how many bytes less are free than at the start.
        let whole = |what: &str| {
            a.recover();
            a.tidy();
            a.check().unwrap_or_else(|e| panic!("{what}: {e}"));
            let now = a.stats();
            assert_eq!(
                (now.live_allocations, now.bytes_in_use),
                (start.live_allocations, start.bytes_in_use),
                "{what}"
            );
            assert_eq!(a.records_held().unwrap_or(1), 1, "{what}");
            start.free_bytes() - now.free_bytes()
        };
        let less = whole(&after);
        let growth = growth.unwrap_or(less);
        assert!(growth > 0, "the child's threads did not grow the table");
        assert!(less == 0 || less == growth, "{after}: {less} bytes less free, the table's chunk is {growth}");
        // The table serves `THREADS` threads at once again.
        let barrier = Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|i| {
                let (a, barrier) = (a.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let p = a.allocate(100 + i, 8).unwrap();
                    barrier.wait();
                    a.free(p).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let then = format!("{after}, then {THREADS} threads of the parent");
        assert_eq!(whole(&then), growth, "{then}: the table grew by other than one chunk");
        a.free(own).unwrap();
        (out, growth)
    };
    let (out, growth) = round(None, None);
    let total = points_passed(&out).unwrap_or_else(|| panic!("no count in {out:?}"));
    assert!(total > 50, "the growth sequence passed only {total} crash points");
    let mut tried = 0;
    for at in (0..total).filter(wanted()) {
        round(Some(at), Some(growth));
        tried += 1;
    }
    println!("crash points while growing ({tag}): {tried} of {total} tried");
}

#[test]
fn a_process_killed_while_its_threads_grow_the_slot_table_is_recovered() {
    slot_table_growth::<ScalablePageAllocator>(
        ScalablePageConfig { dead_process_blocks: DeadProcessBlocks::Free },
        "spa",
    );
}

#[test]
fn a_thread_local_process_killed_while_its_threads_grow_the_heap_table_is_recovered() {
    slot_table_growth::<ThreadLocalAllocator>(
        ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free },
        "tla",
    );
}
