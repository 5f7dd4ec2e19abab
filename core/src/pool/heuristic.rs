//! When a [`QuickPool`](super::QuickPool) coalesces: the [`CoalesceHeuristic`] trait.
//!
//! After every free the pool asks its heuristic whether to coalesce, and to what size. Coalescing
//! hands every wholly free upstream block back and takes one block that brings the pool back to
//! the size the heuristic names: the pool's actual size (same footprint, one block instead of
//! many), or its high watermark (the `_hwm` variants: the pool shrinks, or grows, to what the
//! application has needed at most).
//!
//! A heuristic also says when the pool asks it ([`CoalesceHeuristic::every_free`]) and whether
//! the pool may hand wholly free upstream blocks back when it has to grow
//! ([`CoalesceHeuristic::release_when_growing`]).

use alloc::boxed::Box;

use crate::error::{Error, Result};

use super::PoolStats;

/// The figures a free changes that the built-in heuristics decide on (see
/// [`CoalesceHeuristic::may_coalesce`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Releasable {
    /// Bytes in upstream blocks that are wholly free.
    pub bytes: usize,
    /// Upstream blocks that are wholly free.
    pub blocks: usize,
    /// The pool's actual size: bytes in all its upstream blocks.
    pub actual_size: usize,
}

/// Decides, after each free, whether the pool should coalesce.
///
/// Any `FnMut(&PoolStats) -> Option<usize> + Send` closure is a heuristic too.
pub trait CoalesceHeuristic: Send {
    /// `Some(target)` to coalesce so that the pool's actual size becomes `target` bytes (at least
    /// what is still in use), or `None` to leave it.
    fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize>;

    /// Whether the pool asks after every free (`true`, the default: a closure may look at any
    /// figure), or only after a free that leaves an upstream block wholly free. A heuristic whose
    /// answer depends only on the releasable figures and the actual size can say `false`: no
    /// other free changes those, so no other free can turn its answer into a yes, and the pool
    /// saves gathering its figures on every free. The pool reads this once, when the heuristic is
    /// installed.
    fn every_free(&self) -> bool {
        true
    }

    /// A cheap necessary condition for [`should_coalesce`](Self::should_coalesce) to answer
    /// `Some`, from the figures a free changes: when it is false, the pool does not gather its
    /// statistics and does not ask. The default, `true`, always asks (a closure may look at any
    /// figure). The built-in heuristics answer exactly, so the common free never builds a
    /// [`PoolStats`].
    fn may_coalesce(&self, releasable: Releasable) -> bool {
        let _ = releasable;
        true
    }

    /// The least releasable bytes and blocks at which [`may_coalesce`](Self::may_coalesce) can
    /// answer `true` while the pool's actual size is `actual_size` (the answer's own
    /// `actual_size` is not read): below either, the pool does not ask. The pool works the floor
    /// out again when the heuristic is installed and whenever its actual size changes, and
    /// compares against it inline on a free that leaves an upstream block wholly free, so that
    /// such frees cost no call while the heuristic cannot fire. So the floor may depend only on
    /// `actual_size` and on settings that stay as they are once the heuristic is installed: a
    /// heuristic whose thresholds move in [`should_coalesce`](Self::should_coalesce) keeps the
    /// default, zero bytes and blocks, which always asks. A floor above the true one would make
    /// the pool skip a coalesce the heuristic wants; the built-in heuristics give theirs exactly.
    fn releasable_floor(&self, actual_size: usize) -> Releasable {
        Releasable { bytes: 0, blocks: 0, actual_size }
    }

    /// Whether the pool may hand wholly free upstream blocks back when it has to grow (`true`,
    /// the default): before it takes a new block for a request no free block fits (every wholly
    /// free block is then too small for it), when they make up at least a quarter of its actual
    /// size, and in place of splitting a wholly free block that a large request would leave
    /// mostly stranded (see [`QuickPool::allocate`]). Then the pool seldom holds many such blocks
    /// and the new one at once. [`NeverCoalesce`] says `false`: its pool hands blocks back only
    /// when its owner calls `release`, `coalesce` or `coalesce_to` (the last two take one block
    /// in their place), or when it could not grow otherwise (upstream refused, or the maximum
    /// size was reached). The pool reads this once, when the heuristic is installed.
    ///
    /// [`QuickPool::allocate`]: super::QuickPool::allocate
    fn release_when_growing(&self) -> bool {
        true
    }
}

impl<F: FnMut(&PoolStats) -> Option<usize> + Send> CoalesceHeuristic for F {
    fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize> {
        self(stats)
    }
}

/// A boxed heuristic is one too, so a heuristic can be picked at run time.
impl CoalesceHeuristic for Box<dyn CoalesceHeuristic> {
    fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize> {
        (**self).should_coalesce(stats)
    }

    fn may_coalesce(&self, releasable: Releasable) -> bool {
        (**self).may_coalesce(releasable)
    }

    fn releasable_floor(&self, actual_size: usize) -> Releasable {
        (**self).releasable_floor(actual_size)
    }

    fn every_free(&self) -> bool {
        (**self).every_free()
    }

    fn release_when_growing(&self) -> bool {
        (**self).release_when_growing()
    }
}

/// Never coalesces of itself: the pool grows, and hands wholly free blocks back only when its
/// owner calls [`release`](super::QuickPool::release), or [`coalesce`](super::QuickPool::coalesce)
/// or [`coalesce_to`](super::QuickPool::coalesce_to) (which take one block in their place), or
/// when it could not grow otherwise (upstream refused, or the maximum size was reached: see
/// [`QuickPool::allocate`](super::QuickPool::allocate)).
#[derive(Clone, Copy, Debug, Default)]
pub struct NeverCoalesce;

impl CoalesceHeuristic for NeverCoalesce {
    fn should_coalesce(&mut self, _: &PoolStats) -> Option<usize> {
        None
    }

    fn may_coalesce(&self, _: Releasable) -> bool {
        false
    }

    fn releasable_floor(&self, actual_size: usize) -> Releasable {
        Releasable { bytes: usize::MAX, blocks: usize::MAX, actual_size }
    }

    fn every_free(&self) -> bool {
        false
    }

    fn release_when_growing(&self) -> bool {
        false
    }
}

/// What a heuristic refills the pool to once it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    ActualSize,
    HighWatermark,
}

impl Target {
    /// The least releasable blocks at which coalescing to this target can change the pool. Back
    /// to the actual size, it takes two: coalescing one wholly free block hands it back and takes
    /// one of the same size in its place, which changes nothing, so a heuristic that keeps the
    /// actual size does not fire for one. (Umpire's coalesce likewise does nothing while its pool
    /// holds a single free block.) Then a pool that frees everything, over and over, in one
    /// upstream block gathers no figures. To the high watermark, one block is enough: the pool
    /// shrinks, or grows. Here Umpire, whose guard stops its high-watermark variants too, differs
    /// on purpose: a drained pool of one block still comes back to its watermark.
    fn least_blocks(self) -> usize {
        match self {
            Target::ActualSize => 2,
            Target::HighWatermark => 1,
        }
    }

    fn of(self, stats: &PoolStats) -> usize {
        match self {
            Target::ActualSize => stats.actual_size,
            Target::HighWatermark => stats.high_watermark,
        }
    }
}

/// Coalesces once at least `n` upstream blocks are wholly free (and at least two, for the variant
/// that keeps the actual size: coalescing one block into one of the same size changes nothing).
#[derive(Clone, Copy, Debug)]
pub struct BlocksReleasable {
    blocks: usize,
    target: Target,
}

impl BlocksReleasable {
    /// Fires at `blocks` releasable blocks (`blocks` at least 1), but never at fewer than two,
    /// and keeps the pool's actual size: one block coalesced back to the actual size changes
    /// nothing.
    pub fn new(blocks: usize) -> Result<Self> {
        Self::with_target(blocks, Target::ActualSize)
    }

    /// Fires at `blocks` releasable blocks (at least 1) and refills to the high watermark.
    pub fn hwm(blocks: usize) -> Result<Self> {
        Self::with_target(blocks, Target::HighWatermark)
    }

    fn with_target(blocks: usize, target: Target) -> Result<Self> {
        if blocks == 0 {
            return Err(Error::InvalidSize { size: 0, reason: "BlocksReleasable needs at least one block" });
        }
        Ok(BlocksReleasable { blocks: blocks.max(target.least_blocks()), target })
    }
}

impl CoalesceHeuristic for BlocksReleasable {
    fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize> {
        (stats.releasable_blocks >= self.blocks).then(|| self.target.of(stats))
    }

    fn may_coalesce(&self, releasable: Releasable) -> bool {
        releasable.blocks >= self.blocks
    }

    fn releasable_floor(&self, actual_size: usize) -> Releasable {
        Releasable { bytes: 0, blocks: self.blocks, actual_size }
    }

    fn every_free(&self) -> bool {
        false
    }
}

/// Coalesces once at least `percent` of the pool's actual size is releasable: for the variant that
/// keeps the actual size, in at least two upstream blocks (coalescing one block into one of the
/// same size changes nothing).
#[derive(Clone, Copy, Debug)]
pub struct PercentReleasable {
    percent: u8,
    target: Target,
}

impl PercentReleasable {
    /// Fires at `percent` (1..=100) releasable, in two or more upstream blocks, and keeps the
    /// pool's actual size. 100, coalesce when nothing is in use and there is more than one block
    /// to coalesce, was Umpire's default heuristic before Umpire moved to its high-watermark
    /// variant; it is this pool's default.
    pub fn new(percent: u8) -> Result<Self> {
        Self::with_target(percent, Target::ActualSize)
    }

    /// Fires at `percent` (1..=100) releasable and refills to the high watermark.
    pub fn hwm(percent: u8) -> Result<Self> {
        Self::with_target(percent, Target::HighWatermark)
    }

    fn with_target(percent: u8, target: Target) -> Result<Self> {
        if percent == 0 || percent > 100 {
            return Err(Error::InvalidSize { size: u64::from(percent), reason: "percentage must be 1..=100" });
        }
        Ok(PercentReleasable { percent, target })
    }
}

impl Default for PercentReleasable {
    fn default() -> Self {
        PercentReleasable { percent: 100, target: Target::ActualSize }
    }
}

impl PercentReleasable {
    fn fires(&self, releasable: Releasable) -> bool {
        let bytes = releasable.bytes as u128 * 100;
        let actual_size = releasable.actual_size;
        actual_size > 0
            && bytes >= actual_size as u128 * u128::from(self.percent)
            && releasable.blocks >= self.target.least_blocks()
    }
}

impl CoalesceHeuristic for PercentReleasable {
    fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize> {
        let releasable = Releasable {
            bytes: stats.releasable_bytes,
            blocks: stats.releasable_blocks,
            actual_size: stats.actual_size,
        };
        self.fires(releasable).then(|| self.target.of(stats))
    }

    fn may_coalesce(&self, releasable: Releasable) -> bool {
        self.fires(releasable)
    }

    fn releasable_floor(&self, actual_size: usize) -> Releasable {
        // The least `bytes` with `bytes * 100 >= actual_size * percent`; nothing fires in an
        // empty pool.
        let least = (actual_size as u128 * u128::from(self.percent)).div_ceil(100);
        let bytes = if actual_size == 0 { usize::MAX } else { usize::try_from(least).unwrap_or(usize::MAX) };
        Releasable { bytes, blocks: self.target.least_blocks(), actual_size }
    }

    fn every_free(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(actual: usize, releasable_bytes: usize, releasable_blocks: usize) -> PoolStats {
        PoolStats {
            actual_size: actual,
            releasable_bytes,
            releasable_blocks,
            high_watermark: 1000,
            ..PoolStats::default()
        }
    }

    #[test]
    fn blocks_releasable_fires_at_its_count() {
        let mut h = BlocksReleasable::new(3).unwrap();
        assert_eq!(h.should_coalesce(&stats(4096, 2048, 2)), None);
        assert_eq!(h.should_coalesce(&stats(4096, 3072, 3)), Some(4096));
        assert_eq!(BlocksReleasable::hwm(3).unwrap().should_coalesce(&stats(4096, 3072, 3)), Some(1000));
        assert!(BlocksReleasable::new(0).is_err());
        // Back to the actual size, one block would be handed back and taken again: it takes two.
        let mut one = BlocksReleasable::new(1).unwrap();
        assert_eq!(one.should_coalesce(&stats(4096, 4096, 1)), None);
        assert_eq!(one.should_coalesce(&stats(4096, 2048, 2)), Some(4096));
        assert_eq!(BlocksReleasable::hwm(1).unwrap().should_coalesce(&stats(4096, 4096, 1)), Some(1000));
    }

    #[test]
    fn percent_releasable_fires_at_its_share() {
        let mut h = PercentReleasable::new(50).unwrap();
        assert_eq!(h.should_coalesce(&stats(4096, 2047, 2)), None);
        assert_eq!(h.should_coalesce(&stats(4096, 2048, 2)), Some(4096));
        assert_eq!(PercentReleasable::default().should_coalesce(&stats(4096, 4095, 2)), None);
        assert_eq!(PercentReleasable::default().should_coalesce(&stats(4096, 4096, 2)), Some(4096));
        // One wholly free block is all there is: coalescing it back to the actual size would
        // change nothing, so only the high-watermark variant fires.
        assert_eq!(PercentReleasable::default().should_coalesce(&stats(4096, 4096, 1)), None);
        assert_eq!(PercentReleasable::hwm(100).unwrap().should_coalesce(&stats(4096, 4096, 1)), Some(1000));
        assert_eq!(PercentReleasable::default().should_coalesce(&stats(0, 0, 0)), None);
        assert!(PercentReleasable::new(0).is_err() && PercentReleasable::new(101).is_err());
    }

    #[test]
    fn the_cheap_check_never_skips_a_coalesce() {
        let mut built_in: [Box<dyn CoalesceHeuristic>; 8] = [
            Box::new(NeverCoalesce),
            Box::new(BlocksReleasable::new(1).unwrap()),
            Box::new(BlocksReleasable::new(2).unwrap()),
            Box::new(BlocksReleasable::hwm(1).unwrap()),
            Box::new(PercentReleasable::new(50).unwrap()),
            Box::new(PercentReleasable::default()),
            Box::new(PercentReleasable::hwm(50).unwrap()),
            Box::new(PercentReleasable::hwm(100).unwrap()),
        ];
        let figures = [0usize, 1, 2, 2047, 2048, 4095, 4096];
        for h in &mut built_in {
            for i in 0..figures.len().pow(3) {
                let n = figures.len();
                let (actual, bytes, blocks) = (figures[i % n], figures[i / n % n], figures[i / n / n]);
                let cheap = h.may_coalesce(Releasable { bytes, blocks, actual_size: actual });
                let full = h.should_coalesce(&stats(actual, bytes, blocks)).is_some();
                // Built-in heuristics answer exactly: the check is neither looser nor tighter,
                // and neither is the floor the pool compares against before it asks.
                assert_eq!(cheap, full, "actual {actual}, bytes {bytes}, blocks {blocks}");
                let floor = h.releasable_floor(actual);
                assert_eq!(floor.actual_size, actual);
                let over = bytes >= floor.bytes && blocks >= floor.blocks;
                assert_eq!(over, cheap, "floor {floor:?}: bytes {bytes}, blocks {blocks}");
            }
        }
    }

    #[test]
    fn closures_are_heuristics() {
        let mut calls = 0;
        let mut h = |s: &PoolStats| {
            calls += 1;
            (s.free_blocks > 2).then_some(0)
        };
        assert_eq!(h.should_coalesce(&PoolStats { free_blocks: 3, ..PoolStats::default() }), Some(0));
        assert_eq!(calls, 1);
    }
}
