//! The pools' specification, as tests: model-based property tests calling `check()` after every
//! step, the heuristics' thresholds, the maximum size, upstream failures, and bad requests.

use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

use super::*;
use crate::error::Error;
use crate::resource::{MemoryKind, MemoryResource};

/// Hands out addresses in a range no one maps, as a GPU driver hands out device addresses: a
/// pool that dereferenced one would crash the test.
struct FakeDevice {
    next: AtomicUsize,
}

impl FakeDevice {
    fn new() -> Self {
        // A 64-bit address; 32-bit targets (where fastmem's tests run too) keep its low half.
        FakeDevice { next: AtomicUsize::new(0x7e00_0000_0000_u64 as usize) }
    }
}

// SAFETY: "device" blocks the CPU is never told it may touch: disjoint address ranges, never
// reused.
unsafe impl MemoryResource for FakeDevice {
    fn name(&self) -> &str {
        "fake-device"
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Device
    }
    fn allocate(&self, size: usize, align: usize) -> crate::Result<NonNull<u8>> {
        crate::check_layout(size, align)?;
        let stride = size.next_multiple_of(4096).max(align) + 4096;
        let addr = self.next.fetch_add(stride.next_multiple_of(align), Ordering::Relaxed).next_multiple_of(align);
        NonNull::new(core::ptr::without_provenance_mut(addr)).ok_or(Error::OutOfMemory { requested: 0, available: 0 })
    }
    unsafe fn deallocate(&self, _: NonNull<u8>, _: usize, _: usize) {}
}

fn small_config() -> QuickPoolConfig {
    QuickPoolConfig { first_block_size: 4096, next_block_size: 4096, alignment: 16, max_size: None }
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize, usize),
    Free(usize),
    Coalesce,
    Release,
}

fn ops(max_size: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (1..=max_size, prop::sample::select(&[1usize, 8, 16, 64, 256, 4096][..]))
            .prop_map(|(s, a)| Op::Allocate(s, a)),
        5 => any::<usize>().prop_map(Op::Free),
        1 => Just(Op::Coalesce),
        1 => Just(Op::Release),
    ];
    prop::collection::vec(op, 1..200)
}

fn heuristic(choice: u8) -> impl CoalesceHeuristic + 'static {
    let mut h: alloc::boxed::Box<dyn CoalesceHeuristic> = match choice % 5 {
        0 => alloc::boxed::Box::new(NeverCoalesce),
        1 => alloc::boxed::Box::new(BlocksReleasable::new(2).unwrap()),
        2 => alloc::boxed::Box::new(BlocksReleasable::hwm(3).unwrap()),
        3 => alloc::boxed::Box::new(PercentReleasable::new(40).unwrap()),
        _ => alloc::boxed::Box::new(PercentReleasable::hwm(75).unwrap()),
    };
    move |s: &PoolStats| h.should_coalesce(s)
}

/// The pool's figures that a walk of its blocks gives, and its watermarks as the most its sizes
/// have been after any step (no step of these pools holds more in between: growing, coalescing
/// and trading a block hand blocks back before they take one).
#[derive(Default)]
struct Watermarks {
    current: usize,
    actual: usize,
}

impl Watermarks {
    fn step(&mut self, pool: &dyn Pool) -> Result<(), TestCaseError> {
        let s = pool.stats();
        self.current = self.current.max(s.current_size);
        self.actual = self.actual.max(s.actual_size);
        prop_assert_eq!((s.high_watermark, s.actual_high_watermark), (self.current, self.actual));
        // Upstream blocks, by number: (size, whether any block in it is used).
        let mut chunks = alloc::collections::BTreeMap::<usize, (usize, bool)>::new();
        let (mut current, mut largest_free, mut free) = (0, 0, false);
        pool.for_each_block(&mut |b| {
            let chunk = chunks.entry(b.chunk).or_insert((b.chunk_size, false));
            chunk.1 |= b.used;
            if b.used {
                current += b.size;
            } else {
                (largest_free, free) = (largest_free.max(b.size), true);
            }
        });
        let releasable = chunks.values().filter(|c| !c.1);
        prop_assert_eq!(
            (s.actual_size, s.upstream_blocks, s.current_size),
            (chunks.values().map(|c| c.0).sum::<usize>(), chunks.len(), current)
        );
        prop_assert_eq!(
            (s.releasable_bytes, s.releasable_blocks),
            (releasable.clone().map(|c| c.0).sum::<usize>(), releasable.count())
        );
        // Neither pool serves more than its largest free block, and each serves something while
        // it has one (a fixed pool its object size, a quick pool the block's whole size).
        prop_assert!(s.largest_available <= largest_free && (s.largest_available > 0) == free);
        Ok(())
    }
}

/// Runs `ops` on `pool` over `upstream`, checking the pool after every step against a model of
/// its live allocations, against a walk of its blocks, and against what upstream holds. An
/// allocation may be refused as out of memory, or with an error that `refused` allows for its
/// size and alignment; `coalesce` is what [`Op::Coalesce`] does. At the end everything is freed
/// and released: the pool is back to nothing in use and nothing held.
fn matches_its_model<P: Pool>(
    mut pool: P,
    upstream: &LimitedResource<HostResource>,
    ops: Vec<Op>,
    refused: impl Fn(&Error, usize, usize) -> bool,
    coalesce: impl Fn(&mut P),
) -> Result<(), TestCaseError> {
    let mut model = PoolModel::new();
    let mut watermarks = Watermarks::default();
    for op in ops {
        match op {
            Op::Allocate(size, align) => match pool.allocate(size, align) {
                Ok(ptr) => model.add(ptr, size, align, 0).unwrap(),
                Err(e) => prop_assert!(e.is_out_of_memory() || refused(&e, size, align), "unexpected {}", e),
            },
            Op::Free(pick) => model.free_one(&mut pool, pick).unwrap(),
            Op::Coalesce => coalesce(&mut pool),
            Op::Release => {
                pool.release();
                prop_assert_eq!(pool.stats().releasable_blocks, 0);
            }
        }
        model.agrees_with(&pool).unwrap();
        prop_assert_eq!(upstream.held(), pool.stats().actual_size);
        watermarks.step(&pool)?;
    }
    model.free_all(&mut pool).unwrap();
    model.agrees_with(&pool).unwrap();
    watermarks.step(&pool)?;
    prop_assert_eq!(pool.stats().current_size, 0);
    pool.release();
    prop_assert_eq!((pool.stats().actual_size, upstream.held()), (0, 0));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn quick_pool_matches_its_model(ops in ops(20_000), choice in any::<u8>(), budget in 64usize..512) {
        let upstream = LimitedResource::new(HostResource, budget << 10);
        let config = QuickPoolConfig { max_size: Some(400 << 10), ..small_config() };
        let pool = QuickPool::with_config(&upstream, config).unwrap().with_heuristic(heuristic(choice));
        matches_its_model(pool, &upstream, ops, |_, _, _| false, |pool| {
            let _ = pool.coalesce();
        })?;
    }

    #[test]
    fn fixed_pool_matches_its_model(ops in ops(300), per_block in 1usize..200) {
        let upstream = LimitedResource::new(HostResource, 64 << 10);
        let config = FixedPoolConfig { objects_per_block: per_block, ..FixedPoolConfig::new(256) };
        let pool = FixedPool::new(&upstream, config).unwrap();
        // Sizes past the object size and alignments past the slots' are refused; a fixed pool
        // coalesces nothing, and releases its empty sub-pools instead.
        let refused = |e: &Error, size, align| match e {
            Error::InvalidAlignment { .. } => align > 16,
            Error::InvalidSize { .. } => size > 256,
            _ => false,
        };
        matches_its_model(pool, &upstream, ops, refused, |pool| {
            pool.release();
        })?;
    }

    #[test]
    fn quick_pool_never_touches_device_memory(sizes in prop::collection::vec(1usize..100_000, 1..100)) {
        let device = FakeDevice::new();
        let mut pool = QuickPool::with_config(&device, small_config()).unwrap()
            .with_heuristic(BlocksReleasable::new(2).unwrap());
        let mut model = PoolModel::new();
        for (i, &size) in sizes.iter().enumerate() {
            model.add(pool.allocate(size, 256).unwrap(), size, 256, 0).unwrap();
            if i % 3 == 2 {
                pool.deallocate(model.take(i * 31).unwrap().ptr).unwrap();
            }
            model.agrees_with(&pool).unwrap();
        }
        prop_assert_eq!(Pool::memory_kind(&pool), MemoryKind::Device);
    }
}

/// Four upstream blocks of 4 KiB, each holding one 4 KiB allocation.
fn four_full_blocks(heuristic: impl CoalesceHeuristic + 'static) -> (QuickPool<HostResource>, Vec<NonNull<u8>>) {
    let mut pool = QuickPool::with_config(HostResource, small_config()).unwrap().with_heuristic(heuristic);
    let ptrs = (0..4).map(|_| pool.allocate(4096, 16).unwrap()).collect();
    assert_eq!(pool.stats().upstream_blocks, 4);
    (pool, ptrs)
}

#[test]
fn blocks_releasable_coalesces_exactly_at_its_count() {
    let (mut pool, ptrs) = four_full_blocks(BlocksReleasable::new(3).unwrap());
    for (freed, &ptr) in ptrs[..2].iter().enumerate() {
        pool.deallocate(ptr).unwrap();
        let s = pool.stats();
        assert_eq!((s.releasable_blocks, s.coalesce_count, s.upstream_blocks), (freed + 1, 0, 4));
    }
    pool.deallocate(ptrs[2]).unwrap();
    let s = pool.stats();
    assert_eq!(s.coalesce_count, 1, "the third releasable block crosses the threshold");
    assert_eq!((s.upstream_blocks, s.releasable_blocks, s.actual_size), (2, 1, 4 * 4096));
    assert_eq!(s.largest_available, 3 * 4096);
    // The merged block serves a request none of the three could.
    let big = pool.allocate(3 * 4096, 16).unwrap();
    assert_eq!(pool.stats().upstream_blocks, 2);
    pool.deallocate(big).unwrap();
    pool.check().unwrap();
}

#[test]
fn a_heuristic_set_later_gets_a_floor_for_the_current_size() {
    // Installed on a pool of four upstream blocks: its floor must be worked out for 16 KiB, not
    // for the empty pool the first heuristic saw.
    let (mut pool, ptrs) = four_full_blocks(NeverCoalesce);
    pool.set_heuristic(PercentReleasable::new(50).unwrap());
    pool.deallocate(ptrs[0]).unwrap();
    pool.deallocate(ptrs[1]).unwrap();
    assert_eq!(pool.stats().coalesce_count, 1);
    pool.check().unwrap();
}

/// A built-in heuristic that hides its releasable floor: its pool asks it after every free that
/// leaves an upstream block wholly free.
struct NoFloor(alloc::boxed::Box<dyn CoalesceHeuristic>);

impl CoalesceHeuristic for NoFloor {
    fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize> {
        self.0.should_coalesce(stats)
    }
    fn may_coalesce(&self, releasable: Releasable) -> bool {
        self.0.may_coalesce(releasable)
    }
    fn every_free(&self) -> bool {
        self.0.every_free()
    }
    fn release_when_growing(&self) -> bool {
        self.0.release_when_growing()
    }
}

fn built_in(choice: u8) -> alloc::boxed::Box<dyn CoalesceHeuristic> {
    match choice % 5 {
        0 => alloc::boxed::Box::new(NeverCoalesce),
        1 => alloc::boxed::Box::new(BlocksReleasable::new(2).unwrap()),
        2 => alloc::boxed::Box::new(BlocksReleasable::hwm(3).unwrap()),
        3 => alloc::boxed::Box::new(PercentReleasable::new(40).unwrap()),
        _ => alloc::boxed::Box::new(PercentReleasable::hwm(75).unwrap()),
    }
}

/// A pool configuration and an upstream budget (bytes), for [`pools_agree`]: alignments of 1 to
/// 256 bytes, block sizes that need not be multiples of them, maybe a maximum size.
fn setups() -> impl Strategy<Value = (QuickPoolConfig, usize)> {
    let alignment = prop::sample::select(&[1usize, 16, 256][..]);
    let max_size = prop::option::of(4096usize..64 << 10);
    (alignment, 1usize..16 << 10, 1usize..16 << 10, max_size, 8usize << 10..128 << 10).prop_map(
        |(alignment, first_block_size, next_block_size, max_size, budget)| {
            (QuickPoolConfig { first_block_size, next_block_size, alignment, max_size }, budget)
        },
    )
}

/// Runs `ops` on two pools with the same configuration, each over its own budget of fake device
/// memory, one with each heuristic, and checks that they agree on every figure, and on what
/// they took from upstream, after every step. Over fake device memory both pools get the same
/// addresses while they do the same, so best fit breaks ties between blocks of equal size the
/// same way in both.
fn pools_agree(
    ops: Vec<Op>,
    (config, budget): (QuickPoolConfig, usize),
    one: alloc::boxed::Box<dyn CoalesceHeuristic>,
    other: alloc::boxed::Box<dyn CoalesceHeuristic>,
) -> Result<(), TestCaseError> {
    let pool = |h| {
        let upstream = LimitedResource::new(FakeDevice::new(), budget);
        QuickPool::with_config(upstream, config).unwrap().with_heuristic(h)
    };
    let (mut one, mut other) = (pool(one), pool(other));
    let mut live: Vec<(NonNull<u8>, NonNull<u8>)> = Vec::new();
    for op in ops {
        match op {
            Op::Allocate(size, align) => {
                let (a, b) = (one.allocate(size, align), other.allocate(size, align));
                prop_assert_eq!(a.is_ok(), b.is_ok());
                if let (Ok(a), Ok(b)) = (a, b) {
                    live.push((a, b));
                }
            }
            Op::Free(pick) if !live.is_empty() => {
                let (a, b) = live.swap_remove(pick % live.len());
                one.deallocate(a).unwrap();
                other.deallocate(b).unwrap();
            }
            Op::Free(_) => {}
            Op::Coalesce => {
                prop_assert_eq!(one.coalesce().is_ok(), other.coalesce().is_ok());
            }
            Op::Release => {
                prop_assert_eq!(one.release(), other.release());
            }
        }
        one.check().unwrap();
        other.check().unwrap();
        prop_assert_eq!(one.stats(), other.stats());
        let upstream = |p: &QuickPool<LimitedResource<FakeDevice>>| {
            let u = p.upstream();
            (u.held(), u.allocations(), u.refusals())
        };
        prop_assert_eq!(upstream(&one), upstream(&other));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The releasable floor only saves calls: a pool that compares against it coalesces
    /// exactly when one that asks its heuristic after every releasable free does.
    #[test]
    fn the_releasable_floor_never_changes_what_a_pool_does(
        ops in ops(20_000),
        setup in setups(),
        choice in any::<u8>(),
    ) {
        pools_agree(ops, setup, built_in(choice), alloc::boxed::Box::new(NoFloor(built_in(choice))))?;
    }

    /// The built-in heuristics that keep the actual size wait for two wholly free blocks. With
    /// one, a coalesce would hand it back and take one of the same size: closures that fire
    /// then, as these heuristics' thresholds alone say, leave the pool just as it is.
    #[test]
    fn one_wholly_free_block_is_not_worth_a_coalesce(ops in ops(20_000), setup in setups(), choice in any::<u8>()) {
        let percent = [40u8, 100][usize::from(choice % 2)];
        let (built_in, eager): (alloc::boxed::Box<dyn CoalesceHeuristic>, alloc::boxed::Box<dyn CoalesceHeuristic>) =
            if choice % 3 == 0 {
                let eager = |s: &PoolStats| (s.releasable_blocks >= 1).then_some(s.actual_size);
                (alloc::boxed::Box::new(BlocksReleasable::new(1).unwrap()), alloc::boxed::Box::new(eager))
            } else {
                let eager = move |s: &PoolStats| {
                    let fires = s.actual_size > 0
                        && s.releasable_bytes as u128 * 100 >= s.actual_size as u128 * u128::from(percent);
                    fires.then_some(s.actual_size)
                };
                (alloc::boxed::Box::new(PercentReleasable::new(percent).unwrap()), alloc::boxed::Box::new(eager))
            };
        pools_agree(ops, setup, built_in, eager)?;
    }
}

#[test]
fn percent_releasable_coalesces_exactly_at_its_share() {
    let (mut pool, ptrs) = four_full_blocks(PercentReleasable::new(50).unwrap());
    pool.deallocate(ptrs[0]).unwrap();
    assert_eq!(pool.stats().coalesce_count, 0, "25% releasable is below 50%");
    pool.deallocate(ptrs[1]).unwrap();
    let s = pool.stats();
    assert_eq!((s.coalesce_count, s.upstream_blocks, s.releasable_bytes), (1, 3, 2 * 4096));
    pool.check().unwrap();
}

#[test]
fn high_watermark_variants_refill_to_the_watermark() {
    // Growing back: three 4 KiB blocks in use at the peak.
    let mut pool =
        QuickPool::with_config(HostResource, small_config()).unwrap().with_heuristic(BlocksReleasable::hwm(2).unwrap());
    let ptrs: Vec<_> = (0..3).map(|_| pool.allocate(4096, 16).unwrap()).collect();
    let hwm = pool.stats().high_watermark;
    assert_eq!(hwm, 3 * 4096);
    pool.deallocate(ptrs[0]).unwrap();
    pool.deallocate(ptrs[1]).unwrap();
    let s = pool.stats();
    assert_eq!((s.coalesce_count, s.actual_size, s.upstream_blocks), (1, hwm, 2));
    pool.deallocate(ptrs[2]).unwrap();
    let s = pool.stats();
    assert_eq!((s.coalesce_count, s.actual_size, s.upstream_blocks, s.largest_available), (2, hwm, 1, hwm));

    // Shrinking: a 1 MiB first block, of which at most 1008 bytes were ever used.
    let config = QuickPoolConfig { first_block_size: 1 << 20, ..small_config() };
    for (heuristic, expected) in
        [(PercentReleasable::hwm(100).unwrap(), 1008), (PercentReleasable::new(100).unwrap(), 1 << 20)]
    {
        let mut pool = QuickPool::with_config(HostResource, config).unwrap().with_heuristic(heuristic);
        let p = pool.allocate(1000, 16).unwrap();
        pool.deallocate(p).unwrap();
        assert_eq!(pool.stats().actual_size, expected);
        pool.check().unwrap();
    }
}

#[test]
fn closures_decide_and_see_every_free() {
    let calls = alloc::sync::Arc::new(AtomicUsize::new(0));
    let seen = alloc::sync::Arc::clone(&calls);
    let (mut pool, ptrs) = four_full_blocks(move |s: &PoolStats| {
        seen.fetch_add(1, Ordering::Relaxed);
        (s.free_blocks == 4).then_some(2 * 4096)
    });
    for ptr in ptrs {
        pool.deallocate(ptr).unwrap();
    }
    assert_eq!(calls.load(Ordering::Relaxed), 4);
    let s = pool.stats();
    assert_eq!((s.coalesce_count, s.actual_size, s.upstream_blocks), (1, 2 * 4096, 1));
}

#[test]
fn the_maximum_size_is_a_clear_error_and_the_pool_goes_on() {
    let config = QuickPoolConfig {
        max_size: Some(40 << 10),
        first_block_size: 16 << 10,
        next_block_size: 16 << 10,
        ..small_config()
    };
    let mut pool = QuickPool::with_config(HostResource, config).unwrap().with_heuristic(NeverCoalesce);
    let a = pool.allocate(16 << 10, 16).unwrap();
    let b = pool.allocate(16 << 10, 16).unwrap();
    // The next block is cut to the room left under the maximum.
    let c = pool.allocate(4 << 10, 16).unwrap();
    assert_eq!(pool.stats().actual_size, 40 << 10);
    let err = pool.allocate(16 << 10, 16).unwrap_err();
    assert_eq!(err, Error::MaxSizeReached { requested: 16 << 10, max_size: 40 << 10, held: 40 << 10 });
    assert_eq!(
        err.to_string(),
        "pool maximum size reached: 16384 more bytes requested, 40960 of its 40960 bytes taken"
    );
    assert!(err.is_out_of_memory());
    assert!(matches!(pool.allocate(1 << 20, 16), Err(Error::MaxSizeReached { requested: 1048576, .. })));
    pool.check().unwrap();
    // Freeing whole blocks makes room again: they are released before the pool gives up.
    pool.deallocate(a).unwrap();
    pool.deallocate(c).unwrap();
    let d = pool.allocate(24 << 10, 16).unwrap();
    assert_eq!(pool.stats().actual_size, 40 << 10);
    for p in [b, d] {
        pool.deallocate(p).unwrap();
    }
    pool.check().unwrap();
    assert!(QuickPool::with_config(HostResource, QuickPoolConfig { max_size: Some(8), ..small_config() }).is_err());
}

#[test]
fn an_over_aligned_request_takes_no_padding_from_upstream() {
    // A fresh upstream block is aligned to what the request asks, so the request needs only its
    // rounded size of it: no room for padding, which a block taken at that alignment never has.
    const MIB: usize = 1 << 20;
    let upstream = LimitedResource::new(HostResource, 256 << 10);
    let config = QuickPoolConfig { max_size: Some(64 << 10), ..small_config() };
    let mut pool = QuickPool::with_config(&upstream, config).unwrap().with_heuristic(NeverCoalesce);
    let mut model = PoolModel::new();
    let a = pool.allocate(16, MIB).unwrap();
    model.add(a, 16, MIB, 0).unwrap();
    // The first block is the configured 4 KiB, taken at 1 MiB alignment.
    assert_eq!((pool.stats().actual_size, upstream.held()), (4096, 4096));
    // A request as large as the room left gets exactly that room.
    let b = pool.allocate(60 << 10, MIB).unwrap();
    model.add(b, 60 << 10, MIB, 0).unwrap();
    assert_eq!(pool.stats().actual_size, 64 << 10);
    model.agrees_with(&pool).unwrap();
    // Past the maximum, the error names what the request needs, not its worst-case padding.
    let err = pool.allocate(4097, MIB).unwrap_err();
    assert_eq!(err, Error::MaxSizeReached { requested: 4096 + 16, max_size: 64 << 10, held: 64 << 10 });
    model.agrees_with(&pool).unwrap();
    model.free_all(&mut pool).unwrap();
    pool.release();
    assert_eq!((pool.stats().actual_size, upstream.held()), (0, 0));
    // Without a maximum, an upstream budget below the padding serves it too.
    let mut pool = QuickPool::with_config(&upstream, small_config()).unwrap();
    let p = pool.allocate(100, MIB).unwrap();
    assert_eq!(p.as_ptr() as usize % MIB, 0);
    assert_eq!(upstream.held(), 4096);
    pool.deallocate(p).unwrap();
    pool.check().unwrap();
}

#[test]
fn upstream_failure_releases_free_blocks_and_retries_once() {
    let upstream = LimitedResource::new(HostResource, 12 << 10);
    let mut pool = QuickPool::with_config(&upstream, small_config()).unwrap().with_heuristic(NeverCoalesce);
    let ptrs: Vec<_> = (0..3).map(|_| pool.allocate(4096, 16).unwrap()).collect();
    pool.deallocate(ptrs[0]).unwrap();
    pool.deallocate(ptrs[1]).unwrap();
    // No free block holds 8 KiB, and the budget is spent: the pool hands back its two free
    // blocks and asks again.
    let big = pool.allocate(8 << 10, 16).unwrap();
    let s = pool.stats();
    assert_eq!((s.upstream_failures, s.upstream_blocks, s.actual_size), (1, 2, 12 << 10));
    assert_eq!((upstream.refusals(), upstream.held()), (1, 12 << 10));
    // Nothing left to hand back: the upstream's error comes through, and the pool is unchanged.
    let before = pool.stats();
    assert!(matches!(pool.allocate(8 << 10, 16), Err(Error::OutOfMemory { .. })));
    let after = pool.stats();
    assert_eq!((after.actual_size, after.allocation_count, after.upstream_failures), (before.actual_size, 2, 3));
    pool.check().unwrap();
    // An injected failure is retried once and then succeeds.
    pool.deallocate(big).unwrap();
    pool.release();
    upstream.refuse_next(1);
    let p = pool.allocate(100, 16).unwrap();
    // Two injected failures in a row are reported.
    upstream.refuse_next(2);
    assert!(matches!(pool.allocate(8 << 10, 16), Err(Error::OutOfMemory { .. })));
    pool.deallocate(p).unwrap();
    pool.deallocate(ptrs[2]).unwrap();
    pool.check().unwrap();
    drop(pool);
    assert_eq!(upstream.held(), 0);
}

#[test]
fn a_coalesce_upstream_refuses_leaves_the_pool_smaller_and_consistent() {
    let upstream = LimitedResource::new(HostResource, 1 << 20);
    let mut pool = QuickPool::with_config(&upstream, small_config()).unwrap().with_heuristic(NeverCoalesce);
    let ptrs: Vec<_> = (0..3).map(|_| pool.allocate(4096, 16).unwrap()).collect();
    pool.deallocate(ptrs[0]).unwrap();
    pool.deallocate(ptrs[1]).unwrap();
    upstream.refuse_next(1);
    assert!(matches!(pool.coalesce(), Err(Error::OutOfMemory { .. })));
    // The free blocks went back before the refill was refused: only the used one is left.
    let s = pool.stats();
    assert_eq!((s.actual_size, s.upstream_blocks, s.upstream_failures, s.coalesce_count), (4096, 1, 1, 1));
    assert_eq!(upstream.held(), 4096);
    pool.check().unwrap();
    pool.deallocate(ptrs[2]).unwrap();
    pool.check().unwrap();
}

#[test]
fn zero_sizes_and_bad_requests_are_errors_that_change_nothing() {
    let upstream = LimitedResource::new(HostResource, 1 << 30);
    let mut quick = QuickPool::new(&upstream);
    assert!(matches!(quick.allocate(0, 16), Err(Error::InvalidSize { size: 0, .. })));
    assert!(matches!(quick.allocate(16, 0), Err(Error::InvalidAlignment { align: 0 })));
    assert!(matches!(quick.allocate(16, 24), Err(Error::InvalidAlignment { align: 24 })));
    assert!(matches!(quick.allocate(usize::MAX - 8, 16), Err(Error::InvalidSize { .. })));
    assert_eq!((quick.stats(), upstream.allocations()), (PoolStats::default(), 0));
    let p = quick.allocate(1, 1).unwrap();
    let inside = NonNull::new(p.as_ptr().wrapping_add(16)).unwrap();
    assert!(matches!(quick.deallocate(inside), Err(Error::InvalidFree { .. })));
    quick.deallocate(p).unwrap();
    assert!(matches!(quick.deallocate(p), Err(Error::InvalidFree { .. })));
    quick.check().unwrap();

    let mut fixed = FixedPool::new(&upstream, FixedPoolConfig::new(64)).unwrap();
    assert!(matches!(fixed.allocate(0, 16), Err(Error::InvalidSize { size: 0, .. })));
    assert!(matches!(fixed.allocate(65, 16), Err(Error::InvalidSize { size: 65, .. })));
    assert!(matches!(fixed.allocate(64, 32), Err(Error::InvalidAlignment { align: 32 })));
    let p = fixed.allocate(64, 16).unwrap();
    let inside = NonNull::new(p.as_ptr().wrapping_add(8)).unwrap();
    assert!(matches!(fixed.deallocate(inside), Err(Error::InvalidFree { .. })));
    assert!(matches!(
        fixed.deallocate(NonNull::new(core::ptr::without_provenance_mut(16)).unwrap()),
        Err(Error::InvalidFree { .. })
    ));
    fixed.deallocate(p).unwrap();
    assert!(matches!(fixed.deallocate(p), Err(Error::InvalidFree { .. })));
    fixed.check().unwrap();
    assert!(FixedPool::new(HostResource, FixedPoolConfig::new(0)).is_err());
    assert!(FixedPool::new(HostResource, FixedPoolConfig { objects_per_block: 0, ..FixedPoolConfig::new(8) }).is_err());
    // Sub-pools no resource can give (past `isize::MAX` bytes) are refused up front, not by
    // every allocation with an upstream error about a size the caller never asked for.
    for (object_size, alignment) in [(1, 1), (16, 16)] {
        let objects_per_block = (isize::MAX as usize) / object_size + 1;
        let config = FixedPoolConfig { object_size, alignment, objects_per_block, max_size: None };
        let err = FixedPool::new(HostResource, config).err();
        assert!(matches!(err, Some(Error::InvalidSize { reason: "objects per block is zero or too many", .. })));
    }
}

/// A sub-pool whose host bookkeeping (a bit and a record per slot) cannot be allocated is an
/// out-of-memory error, before upstream is asked for the block; the pool stays usable.
#[cfg(target_pointer_width = "64")]
#[test]
fn fixed_pool_bookkeeping_out_of_memory_is_an_error() {
    let upstream = FakeDevice::new();
    // 2^62 one-byte slots: the upstream block is a valid layout (and the fake device hands out
    // an address for it), but its bitmap alone would take 2^59 bytes, past any address space.
    let config = FixedPoolConfig { object_size: 1, alignment: 1, objects_per_block: 1 << 62, max_size: None };
    let mut fixed = FixedPool::new(&upstream, config).unwrap();
    for _ in 0..2 {
        assert!(matches!(fixed.allocate(1, 1), Err(Error::OutOfMemory { available: 0, .. })));
        let stats = fixed.stats();
        assert_eq!((stats.actual_size, stats.allocation_count, stats.upstream_allocations), (0, 0, 0));
        fixed.check().unwrap();
    }
}

#[test]
fn dropping_a_pool_hands_everything_back() {
    let upstream = LimitedResource::new(HostResource, 1 << 30);
    let mut quick = QuickPool::new(&upstream);
    let mut fixed = FixedPool::new(&upstream, FixedPoolConfig::new(48)).unwrap();
    for i in 1..100 {
        quick.allocate(i * 100, 16).unwrap();
        fixed.allocate(i % 48 + 1, 16).unwrap();
    }
    assert!(upstream.held() >= 512 << 20);
    drop(quick);
    drop(fixed);
    assert_eq!(upstream.held(), 0);
}

#[test]
fn blocks_and_live_allocations_describe_the_pool() {
    let mut pool = QuickPool::with_config(HostResource, small_config()).unwrap().with_heuristic(NeverCoalesce);
    let a = pool.allocate(100, 16).unwrap();
    let b = pool.allocate(3000, 16).unwrap();
    let c = pool.allocate(5000, 16).unwrap();
    pool.deallocate(a).unwrap();
    let blocks = pool.blocks();
    let mut shape: Vec<_> = blocks.iter().map(|b| (b.chunk_size, b.offset, b.size, b.used)).collect();
    shape.sort_unstable();
    assert_eq!(
        shape,
        [(4096, 0, 112, false), (4096, 112, 3008, true), (4096, 3120, 976, false), (5008, 0, 5008, true)]
    );
    assert!(blocks.windows(2).all(|w| (w[0].chunk, w[0].chunk_addr) <= (w[1].chunk, w[1].chunk_addr)));
    let s = pool.stats();
    assert_eq!((s.total_blocks, s.free_blocks, s.largest_available), (4, 2, 976));
    let live = pool.live_allocations();
    assert_eq!(live.iter().map(|a| (a.size, a.sequence)).collect::<Vec<_>>().len(), 2);
    assert!(live.iter().any(|a| a.size == 3000 && a.sequence == 1 && a.block_size == 3008));
    assert!(live.iter().any(|a| a.size == 5000 && a.sequence == 2 && a.offset == 0));
    pool.deallocate(b).unwrap();
    pool.deallocate(c).unwrap();
    let s = pool.stats();
    assert_eq!((s.releasable_blocks, s.releasable_bytes, s.total_blocks), (2, 4096 + 5008, 2));
    assert_eq!(pool.release(), 4096 + 5008);
    assert_eq!(pool.stats().actual_size, 0);
}

#[test]
fn fixed_pool_fills_sub_pools_in_order_and_releases_empty_ones() {
    let config = FixedPoolConfig { objects_per_block: 100, ..FixedPoolConfig::new(256) };
    let mut pool = FixedPool::new(HostResource, config).unwrap();
    let ptrs: Vec<_> = (0..250).map(|_| pool.allocate(200, 16).unwrap()).collect();
    let s = pool.stats();
    assert_eq!(
        (s.upstream_blocks, s.total_blocks, s.free_blocks, s.current_size, s.requested_size),
        (3, 300, 50, 250 * 256, 250 * 200)
    );
    for &p in &ptrs[..100] {
        pool.deallocate(p).unwrap();
    }
    pool.check().unwrap();
    let blocks = pool.blocks();
    assert!(blocks.iter().all(|b| b.size % 256 == 0));
    assert_eq!(blocks.iter().filter(|b| b.used).map(|b| b.size).sum::<usize>(), 150 * 256);
    assert!(pool.stats().releasable_blocks >= 1);
    assert_eq!(pool.release(), pool.stats().actual_high_watermark - pool.stats().actual_size);
    pool.check().unwrap();
    for &p in &ptrs[100..] {
        pool.deallocate(p).unwrap();
    }
    assert_eq!(pool.stats().allocation_count, 0);
    pool.release();
    assert_eq!(pool.stats().actual_size, 0);
}

/// A fixed pool at its maximum size refuses the next sub-pool with `MaxSizeReached`, and
/// serves again once objects are freed.
#[test]
fn fixed_pool_maximum_size_is_a_clear_error_and_the_pool_goes_on() {
    let config = FixedPoolConfig { objects_per_block: 4, max_size: Some(2 * 4 * 64 + 63), ..FixedPoolConfig::new(64) };
    let mut pool = FixedPool::new(HostResource, config).unwrap();
    // A maximum below one sub-pool (4 slots of 64 bytes) would refuse every allocation.
    let too_small = FixedPoolConfig { max_size: Some(255), ..config };
    assert!(matches!(FixedPool::new(HostResource, too_small), Err(Error::InvalidSize { size: 255, .. })));
    let ptrs: Vec<_> = (0..8).map(|_| pool.allocate(64, 16).unwrap()).collect();
    let err = pool.allocate(64, 16).unwrap_err();
    assert_eq!(err, Error::MaxSizeReached { requested: 256, max_size: 575, held: 512 });
    assert!(err.is_out_of_memory());
    assert_eq!(pool.stats().actual_size, 512);
    pool.check().unwrap();
    for &p in &ptrs[..4] {
        pool.deallocate(p).unwrap();
    }
    let again: Vec<_> = (0..4).map(|_| pool.allocate(64, 16).unwrap()).collect();
    for p in again.into_iter().chain(ptrs[4..].iter().copied()) {
        pool.deallocate(p).unwrap();
    }
    pool.check().unwrap();
    pool.release();
    assert_eq!(pool.stats().actual_size, 0);
}

#[test]
fn growing_hands_back_wholly_free_blocks_first() {
    // Four 4 KiB upstream blocks, three of them wholly free again: 3/4 of the pool.
    let run = |heuristic: Box<dyn CoalesceHeuristic>| {
        let mut pool = QuickPool::with_config(HostResource, small_config()).unwrap().with_heuristic(heuristic);
        let ptrs: Vec<_> = (0..4).map(|_| pool.allocate(4096, 16).unwrap()).collect();
        for &p in &ptrs[1..] {
            pool.deallocate(p).unwrap();
        }
        assert_eq!(pool.stats().releasable_blocks, 3);
        // No free block holds 8 KiB.
        let big = pool.allocate(8192, 16).unwrap();
        pool.check().unwrap();
        let s = pool.stats();
        pool.deallocate(big).unwrap();
        pool.deallocate(ptrs[0]).unwrap();
        (s.actual_size, s.upstream_blocks, s.releasable_blocks, s.actual_high_watermark)
    };
    // PercentReleasable(100) never fires here (one block stays in use), but the pool hands back
    // as many wholly free bytes as it takes, so it never holds both.
    assert_eq!(run(Box::new(PercentReleasable::new(100).unwrap())), (4 * 4096, 3, 1, 4 * 4096));
    // A naive pool only grows.
    assert_eq!(run(Box::new(NeverCoalesce)), (6 * 4096, 5, 3, 6 * 4096));

    // One wholly free block in eight is not worth the upstream calls: the pool just grows.
    let mut pool = QuickPool::with_config(HostResource, small_config()).unwrap();
    let ptrs: Vec<_> = (0..8).map(|_| pool.allocate(4096, 16).unwrap()).collect();
    pool.deallocate(ptrs[0]).unwrap();
    let big = pool.allocate(8192, 16).unwrap();
    let s = pool.stats();
    assert_eq!((s.actual_size, s.releasable_blocks, s.upstream_blocks), (10 * 4096, 1, 9));
    pool.deallocate(big).unwrap();
    for &p in &ptrs[1..] {
        pool.deallocate(p).unwrap();
    }
    pool.check().unwrap();
}

#[test]
fn a_large_request_does_not_strand_most_of_a_wholly_free_block() {
    let config = QuickPoolConfig { first_block_size: 64 << 10, ..small_config() };
    let run = |heuristic: Box<dyn CoalesceHeuristic>, first: usize| {
        let upstream = LimitedResource::new(HostResource, 1 << 20);
        let mut pool = QuickPool::with_config(&upstream, config).unwrap().with_heuristic(heuristic);
        let p = pool.allocate(100, 16).unwrap();
        pool.deallocate(p).unwrap();
        assert_eq!(pool.stats().releasable_bytes, 64 << 10);
        let a = pool.allocate(first, 16).unwrap();
        let after_first = pool.stats().actual_size;
        let b = pool.allocate(first, 16).unwrap();
        pool.check().unwrap();
        let s = pool.stats();
        assert_eq!(upstream.held(), s.actual_size);
        pool.deallocate(a).unwrap();
        pool.deallocate(b).unwrap();
        (after_first, s.actual_high_watermark)
    };
    // 40 KiB would leave 24 KiB, too little for a second 40 KiB request: the 64 KiB block goes
    // back and the request gets 40 KiB of its own, so two such requests hold 80 KiB, not 104.
    assert_eq!(run(Box::new(PercentReleasable::new(100).unwrap()), 40 << 10), (40 << 10, 80 << 10));
    assert_eq!(run(Box::new(NeverCoalesce), 40 << 10), (64 << 10, 104 << 10));
    // 20 KiB leaves room for another: the block is split as usual.
    assert_eq!(run(Box::new(PercentReleasable::new(100).unwrap()), 20 << 10), (64 << 10, 64 << 10));
}

#[test]
fn built_in_heuristics_are_asked_only_when_a_block_becomes_wholly_free() {
    /// Counts its calls; otherwise as `PercentReleasable` says about when to be asked.
    struct Counting(alloc::sync::Arc<AtomicUsize>, bool);
    impl CoalesceHeuristic for Counting {
        fn should_coalesce(&mut self, _: &PoolStats) -> Option<usize> {
            self.0.fetch_add(1, Ordering::Relaxed);
            None
        }
        fn every_free(&self) -> bool {
            self.1
        }
    }
    for every_free in [false, true] {
        let calls = alloc::sync::Arc::new(AtomicUsize::new(0));
        let heuristic = Counting(alloc::sync::Arc::clone(&calls), every_free);
        let mut pool = QuickPool::with_config(HostResource, small_config()).unwrap().with_heuristic(heuristic);
        let ptrs: Vec<_> = (0..4).map(|_| pool.allocate(1024, 16).unwrap()).collect();
        for (i, &p) in ptrs.iter().enumerate() {
            pool.deallocate(p).unwrap();
            // Only the last free leaves the 4 KiB upstream block wholly free.
            let expected = if every_free { i + 1 } else { usize::from(i == 3) };
            assert_eq!(calls.load(Ordering::Relaxed), expected);
        }
    }
    let built_in: [&dyn CoalesceHeuristic; 4] = [
        &NeverCoalesce,
        &BlocksReleasable::new(2).unwrap(),
        &PercentReleasable::default(),
        &PercentReleasable::hwm(50).unwrap(),
    ];
    assert!(built_in.iter().all(|h| !h.every_free()));
    assert!(!NeverCoalesce.release_when_growing() && PercentReleasable::default().release_when_growing());
}

#[test]
fn a_pool_that_drains_one_upstream_block_does_not_ask_its_heuristic() {
    /// `PercentReleasable::default()`, counting the calls that ask it whether to coalesce.
    struct Counting(PercentReleasable, alloc::sync::Arc<AtomicUsize>);
    impl CoalesceHeuristic for Counting {
        fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.should_coalesce(stats)
        }
        fn may_coalesce(&self, releasable: Releasable) -> bool {
            self.0.may_coalesce(releasable)
        }
        fn releasable_floor(&self, actual_size: usize) -> Releasable {
            self.0.releasable_floor(actual_size)
        }
        fn every_free(&self) -> bool {
            self.0.every_free()
        }
    }
    let calls = alloc::sync::Arc::new(AtomicUsize::new(0));
    let heuristic = Counting(PercentReleasable::default(), alloc::sync::Arc::clone(&calls));
    let mut pool = QuickPool::with_config(FakeDevice::new(), small_config()).unwrap().with_heuristic(heuristic);
    for size in [100, 4096, 16, 2000] {
        let p = pool.allocate(size, 16).unwrap();
        pool.deallocate(p).unwrap();
    }
    let s = pool.stats();
    assert_eq!((s.releasable_blocks, s.upstream_blocks), (1, 1));
    assert_eq!((calls.load(Ordering::Relaxed), s.coalesce_count), (0, 0));
    // Two upstream blocks, both wholly free: now the pool asks, once, and coalesces.
    let (a, b) = (pool.allocate(4096, 16).unwrap(), pool.allocate(4096, 16).unwrap());
    pool.deallocate(a).unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 0);
    pool.deallocate(b).unwrap();
    let s = pool.stats();
    assert_eq!((calls.load(Ordering::Relaxed), s.coalesce_count), (1, 1));
    assert_eq!((s.upstream_blocks, s.actual_size), (1, 2 * 4096));
    pool.check().unwrap();
}

#[test]
fn fixed_pools_of_odd_sizes_find_slots_without_dividing() {
    for object_size in [48, 100, 256, 4000] {
        let config = FixedPoolConfig { objects_per_block: 37, ..FixedPoolConfig::new(object_size) };
        let mut pool = FixedPool::new(HostResource, config).unwrap();
        let mut model = PoolModel::new();
        for i in 0..200 {
            model.add(pool.allocate(object_size - i % 7, 16).unwrap(), object_size - i % 7, 16, 0).unwrap();
            if i % 3 == 0 {
                model.free_one(&mut pool, i * 13).unwrap();
            }
            if i % 50 == 0 {
                model.agrees_with(&pool).unwrap();
            }
        }
        for addr in model.iter().map(|a| a.ptr.as_ptr() as usize) {
            for inside in [addr + 16, addr + object_size.next_multiple_of(16) - 16] {
                if inside != addr && model.get(inside).is_none() {
                    let ptr = NonNull::new(core::ptr::without_provenance_mut(inside)).unwrap();
                    assert!(matches!(pool.deallocate(ptr), Err(Error::InvalidFree { .. })), "{object_size}");
                }
            }
        }
        model.free_all(&mut pool).unwrap();
        model.agrees_with(&pool).unwrap();
    }
}

/// Block sizes no resource can give (past `isize::MAX` bytes once aligned) are refused when the
/// pool is made, as `FixedPool` refuses such sub-pools: accepted, each growth asked upstream for
/// one, counted an upstream failure, and handed every free block back before it asked again.
#[test]
fn block_sizes_no_resource_can_give_are_refused_up_front() {
    let too_large = isize::MAX as usize - 6;
    for (first_block_size, next_block_size) in [(too_large, 4096), (4096, too_large), (usize::MAX, 4096)] {
        let config = QuickPoolConfig { first_block_size, next_block_size, ..small_config() };
        let err = QuickPool::with_config(HostResource, config).err();
        assert!(matches!(err, Some(Error::InvalidSize { .. })), "{first_block_size} {next_block_size}: {err:?}");
    }
    // The largest that a resource could give is accepted.
    let largest = QuickPoolConfig { first_block_size: isize::MAX as usize - 15, ..small_config() };
    assert!(QuickPool::with_config(HostResource, largest).is_ok());
}

#[test]
fn an_over_aligned_request_fits_a_smaller_free_block_whose_address_leaves_room() {
    // One 8 KiB block taken at 4 KiB alignment, and a maximum of 8 KiB: the pool cannot grow.
    let config = QuickPoolConfig {
        first_block_size: 8 << 10,
        next_block_size: 8 << 10,
        max_size: Some(8 << 10),
        ..small_config()
    };
    let mut pool = QuickPool::with_config(HostResource, config).unwrap().with_heuristic(NeverCoalesce);
    let mut model = PoolModel::new();
    let a = pool.allocate(4096 - 16, 4096).unwrap();
    model.add(a, 4096 - 16, 4096, 0).unwrap();
    // The rest, 4 KiB + 16 B from 16 bytes below a 4 KiB boundary, holds 4 KiB at 4 KiB
    // alignment, though it is smaller than the request with its worst-case padding (8 KiB - 16).
    let b = pool.allocate(4096, 4096).unwrap();
    model.add(b, 4096, 4096, 0).unwrap();
    assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + 4096);
    model.agrees_with(&pool).unwrap();
    assert_eq!((pool.stats().actual_size, pool.stats().upstream_allocations), (8 << 10, 1));
    // The 16 bytes of padding left before it are too small for anything aligned: full.
    assert!(matches!(pool.allocate(16, 4096), Err(Error::MaxSizeReached { .. })));
    model.free_all(&mut pool).unwrap();
    // Freed, a 4 KiB-aligned half of the block serves such a request again, without a maximum too.
    let mut pool = QuickPool::with_config(HostResource, QuickPoolConfig { max_size: None, ..config }).unwrap();
    let a = pool.allocate(4096, 4096).unwrap();
    let b = pool.allocate(4096, 4096).unwrap();
    assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + 4096);
    assert_eq!(pool.stats().upstream_allocations, 1);
    pool.deallocate(a).unwrap();
    pool.deallocate(b).unwrap();
    pool.check().unwrap();
}

#[test]
fn alignment_padding_does_not_count_as_filling_a_block_traded_for_a_request() {
    let config = QuickPoolConfig { first_block_size: 12 << 10, ..small_config() };
    let upstream = LimitedResource::new(HostResource, 1 << 20);
    let mut pool = QuickPool::with_config(&upstream, config).unwrap();
    let p = pool.allocate(100, 16).unwrap();
    pool.deallocate(p).unwrap();
    // 16 bytes at 8 KiB alignment fill 16 bytes of the wholly free 12 KiB block, wherever it
    // lies: the block is not handed back for a block of 16 bytes...
    let p = pool.allocate(16, 8 << 10).unwrap();
    assert_eq!(p.as_ptr() as usize % (8 << 10), 0);
    // ...so the next small request needs no upstream block either.
    let q = pool.allocate(100, 16).unwrap();
    pool.check().unwrap();
    let s = pool.stats();
    assert_eq!((s.actual_size, s.upstream_allocations, upstream.held()), (12 << 10, 1, 12 << 10));
    pool.deallocate(p).unwrap();
    pool.deallocate(q).unwrap();

    // 12 KiB at 8 KiB alignment at the start of a wholly free 24 KiB block taken at 8 KiB
    // alignment leaves 12 KiB, which starts 4 KiB past a boundary and so cannot hold a second
    // such request: the block goes back, and two such requests hold 24 KiB, not 36 KiB.
    let config = QuickPoolConfig { first_block_size: 24 << 10, ..small_config() };
    let upstream = LimitedResource::new(HostResource, 1 << 20);
    let mut pool = QuickPool::with_config(&upstream, config).unwrap();
    let p = pool.allocate(100, 8 << 10).unwrap();
    pool.deallocate(p).unwrap();
    let a = pool.allocate(12 << 10, 8 << 10).unwrap();
    // The block in its place has the request's size: taken at the request's alignment, it needs
    // no padding.
    assert_eq!((pool.stats().actual_size, pool.stats().upstream_blocks), (12 << 10, 1));
    let b = pool.allocate(12 << 10, 8 << 10).unwrap();
    pool.check().unwrap();
    let s = pool.stats();
    assert_eq!((s.actual_size, s.actual_high_watermark, upstream.held()), (24 << 10, 24 << 10, 24 << 10));
    pool.deallocate(a).unwrap();
    pool.deallocate(b).unwrap();
    pool.release();
    assert_eq!(upstream.held(), 0);
}

#[test]
fn an_over_aligned_request_a_smaller_free_block_serves_trades_no_upstream_block() {
    // A closure never coalesces, and lets the pool hand blocks back when it grows.
    let never = |_: &PoolStats| None;
    let config = QuickPoolConfig { first_block_size: 12 << 10, ..small_config() };
    let upstream = LimitedResource::new(HostResource, 1 << 20);
    let mut pool = QuickPool::with_config(&upstream, config).unwrap().with_heuristic(never);
    // A 12 KiB upstream block at 8 KiB alignment: its first 8 KiB free again, the rest in use.
    let x = pool.allocate(8 << 10, 8 << 10).unwrap();
    let used = pool.allocate(4 << 10, 16).unwrap();
    // A second upstream block, 16 KiB - 16 at 8 KiB alignment, wholly free again.
    let p = pool.allocate((16 << 10) - 16, 8 << 10).unwrap();
    pool.deallocate(p).unwrap();
    pool.deallocate(x).unwrap();
    let actual = (28 << 10) - 16;
    let s = pool.stats();
    assert_eq!((s.upstream_allocations, s.releasable_blocks, s.actual_size), (2, 1, actual));
    // 8 KiB at 8 KiB alignment: the wholly free block is its best fit by size with the worst-case
    // padding, and would strand half of itself, but the free 8 KiB of the first block serve it as
    // they are: the pool makes no upstream call.
    let a = pool.allocate(8 << 10, 8 << 10).unwrap();
    assert_eq!(a, x);
    pool.check().unwrap();
    let s = pool.stats();
    assert_eq!((s.upstream_allocations, s.actual_size, upstream.held()), (2, actual, actual));
    // A second such request finds no such block: now the wholly free block is traded for one of
    // the request's size.
    let b = pool.allocate(8 << 10, 8 << 10).unwrap();
    pool.check().unwrap();
    let s = pool.stats();
    assert_eq!((s.upstream_allocations, s.actual_size, upstream.held()), (3, 20 << 10, 20 << 10));
    for ptr in [used, a, b] {
        pool.deallocate(ptr).unwrap();
    }
    pool.release();
    assert_eq!(upstream.held(), 0);
}

/// A request that no resource could give once rounded to the pool's alignment (past `isize::MAX`
/// bytes) is refused before the pool grows: it hands no wholly free block back, counts no
/// upstream failure, and the error names the size asked for.
#[test]
fn a_request_no_resource_can_give_changes_nothing() {
    let heuristics: [Box<dyn CoalesceHeuristic>; 2] = [Box::new(PercentReleasable::default()), Box::new(NeverCoalesce)];
    for heuristic in heuristics {
        let upstream = LimitedResource::new(HostResource, 1 << 20);
        let mut pool = QuickPool::with_config(&upstream, small_config()).unwrap().with_heuristic(heuristic);
        let (a, b) = (pool.allocate(4096, 16).unwrap(), pool.allocate(4096, 16).unwrap());
        pool.deallocate(b).unwrap();
        let before = pool.stats();
        assert_eq!((before.releasable_blocks, before.upstream_blocks), (1, 2));
        for (size, align) in [
            (isize::MAX as usize - 8, 16),
            (isize::MAX as usize - 8, 1),
            (isize::MAX as usize / 2 + 2, 1 << (usize::BITS - 2)),
        ] {
            let err = pool.allocate(size, align).unwrap_err();
            assert!(
                matches!(err, Error::InvalidSize { size: s, .. } if s == size as u64),
                "{size:#x} {align:#x}: {err:?}"
            );
            assert_eq!(pool.stats(), before, "{size:#x} {align:#x}");
            assert_eq!(upstream.held(), 2 * 4096);
        }
        pool.check().unwrap();
        pool.deallocate(a).unwrap();
    }
}
