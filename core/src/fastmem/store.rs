//! The store, its handle, the bump path and `check()`.

// The store's atomics live inside its own bytes and must be const-constructible, so they are
// `core`'s even under `--cfg loom`; the lock-free algorithm itself (`stack.rs`, and `claim` below)
// is what `core/tests/loom_fastmem.rs` model-checks.
use core::cell::UnsafeCell;
use core::mem::{size_of, MaybeUninit};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::boxed::{FastBox, StoreRef};
use super::class::{class_count, class_of, heads_bytes, MIN_BLOCK, MIN_CLASS};
#[cfg(not(feature = "critical-section"))]
use super::stack::HeadCell;
use super::stack::{link_in, LINK_UNIT_SHIFT, MAX_LINK};
use crate::error::{Error, Result};

/// `owner` before the first `init`.
const NEVER: usize = 0;
/// `owner` while one `init` lays the store out.
#[cfg(not(feature = "critical-section"))]
const BUSY: usize = 1;

/// `N` bytes of storage for values of at most `S` bytes, usable in a `static`.
///
/// The first bytes hold one free-stack head per size class (`⌈log2(S + 4)⌉ - 2` words, rounded up
/// to 8 bytes); the rest is handed out in blocks. [`init`](Self::init) gives the [`FastMem`] handle that allocates.
/// See the [module documentation](super) for the design and its limits.
///
/// ```
/// use hetmem_core::fastmem::FastMemStore;
/// static STORE: FastMemStore<4096, 256> = FastMemStore::new();
/// let fm = STORE.init();
/// let a = fm.alloc([1u64; 4])?;
/// assert_eq!(a.iter().sum::<u64>(), 4);
/// # Ok::<(), hetmem_core::Error>(())
/// ```
#[repr(C, align(16))]
pub struct FastMemStore<const N: usize, const S: usize> {
    /// Offset of the first byte never handed out.
    cursor: AtomicUsize,
    /// The address of `bytes` the state was laid out for ([`NEVER`], [`BUSY`] otherwise).
    owner: AtomicUsize,
    /// Zeroed by `new`, never uninitialised: [`FastMem::check`] may follow a link that a stray
    /// write pointed at a block whose link cell nothing wrote, and must read defined bytes there
    /// (a zero link is a stack's end). All-zero, a `static` store still takes no space in the
    /// program image (`.bss`).
    bytes: UnsafeCell<MaybeUninit<[u8; N]>>,
}

// SAFETY: shared access only goes through atomics (cursor, owner, stack heads and links) and
// through blocks, each of which is owned by one `FastBox` at a time.
unsafe impl<const N: usize, const S: usize> Sync for FastMemStore<N, S> {}

impl<const N: usize, const S: usize> FastMemStore<N, S> {
    const HEADS: usize = heads_bytes(S);
    const TOP_CLASS: u32 = MIN_CLASS + class_count(S) as u32 - 1;
    const VALID: () = {
        assert!(S > 0, "FastMemStore: S (the largest value) must be at least 1 byte");
        assert!(S <= isize::MAX as usize / 4, "FastMemStore: S is too large");
        assert!(N >= heads_bytes(S) + MIN_BLOCK, "FastMemStore: N leaves no room for blocks after the stack heads");
        assert!((N - 1) >> LINK_UNIT_SHIFT <= MAX_LINK, "FastMemStore: N exceeds what a link can address");
    };

    /// An empty store, all zero bytes (so a `static` one lies in `.bss` and a local one costs a
    /// fill of `N` bytes). Compile-time error if `S` is 0, or `N` is too small for the stack heads
    /// plus one block, or too large for this target's links:
    ///
    /// ```compile_fail
    /// // 16 bytes cannot hold the six stack heads that values of up to 128 bytes need.
    /// static TOO_SMALL: hetmem_core::fastmem::FastMemStore<16, 128> = hetmem_core::fastmem::FastMemStore::new();
    /// ```
    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::VALID;
        FastMemStore {
            cursor: AtomicUsize::new(0),
            owner: AtomicUsize::new(NEVER),
            bytes: UnsafeCell::new(MaybeUninit::zeroed()),
        }
    }

    /// The handle that allocates from this store.
    ///
    /// The first call (and the first after the store was moved or [`reset`](Self::reset)) lays
    /// the store out: empty stacks, cursor after the heads. Later calls only compare an address.
    /// If several threads make the first call at once, one lays out while the others spin: call
    /// it once at start-up before interrupts that use the store are enabled.
    #[inline]
    pub fn init(&self) -> FastMem<'_, N, S> {
        if self.owner.load(Ordering::Acquire) != self.base().as_ptr() as usize {
            self.lay_out();
        }
        FastMem { store: self }
    }

    /// Frees every block at once; `&mut` proves that no box is alive.
    pub fn reset(&mut self) {
        *self.owner.get_mut() = NEVER;
    }

    /// Bytes available for blocks: `N` less the stack heads.
    pub const fn capacity(&self) -> usize {
        N - Self::HEADS
    }

    fn base(&self) -> NonNull<u8> {
        NonNull::from(&self.bytes).cast()
    }

    #[cold]
    fn lay_out(&self) {
        let base = self.base();
        #[cfg(not(feature = "critical-section"))]
        loop {
            let seen = self.owner.load(Ordering::Acquire);
            if seen == base.as_ptr() as usize {
                return;
            }
            if seen != BUSY && self.owner.compare_exchange(seen, BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                // SAFETY: `owner` is BUSY, so no other `init` touches the store; no handle or box
                // exists, since one only exists once `owner` names this address.
                unsafe { self.clear(base) };
                self.owner.store(base.as_ptr() as usize, Ordering::Release);
                return;
            }
            core::hint::spin_loop();
        }
        #[cfg(feature = "critical-section")]
        critical_section::with(|_| {
            if self.owner.load(Ordering::Relaxed) != base.as_ptr() as usize {
                // SAFETY: inside the critical section no other `init` runs; no handle or box
                // exists, since one only exists once `owner` names this address.
                unsafe { self.clear(base) };
                self.owner.store(base.as_ptr() as usize, Ordering::Release);
            }
        })
    }

    /// Empties every stack and rewinds the cursor.
    ///
    /// # Safety
    /// Nothing else accesses the store meanwhile.
    unsafe fn clear(&self, base: NonNull<u8>) {
        // SAFETY: the heads are the first HEADS <= N bytes of the store, which the caller lets us
        // write; zero is an empty stack.
        unsafe { core::ptr::write_bytes(base.as_ptr(), 0, Self::HEADS) };
        self.cursor.store(Self::HEADS, Ordering::Relaxed);
    }
}

impl<const N: usize, const S: usize> Default for FastMemStore<N, S> {
    fn default() -> Self {
        Self::new()
    }
}

/// The allocating handle of a laid-out [`FastMemStore`]; `Copy`, and usable from any thread or
/// interrupt handler.
pub struct FastMem<'a, const N: usize, const S: usize> {
    store: &'a FastMemStore<N, S>,
}

impl<const N: usize, const S: usize> Clone for FastMem<'_, N, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<const N: usize, const S: usize> Copy for FastMem<'_, N, S> {}

impl<'a, const N: usize, const S: usize> FastMem<'a, N, S> {
    /// Boxes `value` in a block of its size class: a recycled one if its stack has one, else a
    /// new one bumped from the store.
    ///
    /// Errors (the value is dropped): [`Error::InvalidSize`] if `T` is larger than `S` bytes,
    /// [`Error::OutOfMemory`] if the stack is empty and the store has no room for a new block,
    /// [`Error::Corrupt`] if it needs a new block and a stray write put the cursor past the
    /// store's end or below the stack heads (a block there would overlap them). Zero-sized
    /// values take no memory and never fail.
    #[inline(always)]
    pub fn alloc<T>(self, value: T) -> Result<FastBox<'a, T>> {
        let store = self.store_ref();
        let size = size_of::<T>();
        if size == 0 {
            return Ok(FastBox::zero_sized(value, store));
        }
        if size > S {
            return Err(too_large(size));
        }
        let class = class_of(size);
        // SAFETY: size <= S, so the store has a stack for this class.
        let block = match unsafe { store.pop(class) } {
            Some(block) => block,
            None => self.bump(class)?,
        };
        // SAFETY: the block is 2^class >= size + 4 bytes, aligned to 2^class >= align_of::<T>()
        // (a type's alignment never exceeds its size), and owned by no one else.
        unsafe {
            block.as_ptr().cast::<T>().write(value);
            Ok(FastBox::from_raw_parts(block.as_ptr().cast(), store))
        }
    }

    /// Bytes never handed out yet (recycled blocks not counted); 0 if a stray write put the
    /// cursor past the store's end or below the stack heads (which [`check`](Self::check)
    /// reports).
    pub fn remaining(self) -> usize {
        let cursor = self.store.cursor.load(Ordering::Relaxed);
        if cursor_inside(cursor, FastMemStore::<N, S>::HEADS, N) {
            N - cursor
        } else {
            0
        }
    }

    /// Walks every free stack and checks that each block lies inside the part of the store
    /// handed out so far and is aligned to its class, that no stack has a cycle, and that no free
    /// block lies inside a free block of another class (two boxes would get the same bytes).
    ///
    /// Meant for tests and diagnostics while no other thread allocates or drops: a concurrent
    /// pop or push can make a consistent store look corrupt. Comparing the classes' free blocks
    /// takes time that grows with the product of their numbers.
    ///
    /// A block carries no mark of being free, so a link that a stray write pointed at a block in
    /// use (or at padding between blocks) is followed like any other: that block's link cell,
    /// never written, reads as zero (the store starts zeroed), the end of the stack. Only a spot
    /// inside the value of a larger block in use can hold bytes the value left uninitialised (its
    /// padding); one inside a larger free block is reported before its link is read.
    pub fn check(self) -> Result<FastMemReport> {
        let heads = FastMemStore::<N, S>::HEADS;
        let cursor = self.store.cursor.load(Ordering::Acquire);
        if !(heads..=N).contains(&cursor) {
            return Err(corrupt(cursor, CURSOR_OUTSIDE));
        }
        let mut report = FastMemReport {
            capacity: N - heads,
            bumped: cursor - heads,
            free_bytes: 0,
            free_blocks: [0; usize::BITS as usize],
        };
        // Blocks are aligned to their size, so two of different classes overlap exactly when the
        // larger one is the block of its class that holds the smaller one's first byte. Classes
        // are walked from the largest down and each block is compared with the larger free ones
        // before its link is read: a stray link into a larger free block is reported rather than
        // followed into that block's old value.
        let base = self.store.base().as_ptr() as usize;
        let top = FastMemStore::<N, S>::TOP_CLASS;
        for class in (MIN_CLASS..=top).rev() {
            let free = &report.free_blocks;
            let count = self.walk_free_stack(class, cursor, |inner| {
                for large in (class + 1..=top).filter(|&c| free[c as usize] > 0) {
                    let holder = (base + inner) & !((1usize << large) - 1);
                    self.walk_free_stack(large, cursor, |outer| {
                        if base + outer == holder {
                            return Err(corrupt(inner, "free block inside a free block of a larger class"));
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
            report.free_blocks[class as usize] = count;
            report.free_bytes += count << class;
        }
        Ok(report)
    }

    /// Walks the free stack of `class` (at most `TOP_CLASS`) of a store whose cursor is
    /// `cursor` (between the heads and `N`): checks that each block is in that part of the store
    /// and aligned, and calls `visit` with its offset, before it reads the block's link; returns
    /// the number of blocks.
    fn walk_free_stack(self, class: u32, cursor: usize, mut visit: impl FnMut(usize) -> Result<()>) -> Result<usize> {
        let heads = FastMemStore::<N, S>::HEADS;
        let store = self.store_ref();
        let base = store.base().as_ptr() as usize;
        let size = 1usize << class;
        let most = (cursor - heads) / size;
        let mut count = 0;
        // SAFETY: class <= TOP_CLASS: the store has this stack.
        let mut link = link_in(unsafe { store.head(class) }.load(Ordering::Acquire));
        while link != 0 {
            let offset = link << LINK_UNIT_SHIFT;
            if offset < heads || offset > cursor || cursor - offset < size {
                return Err(corrupt(offset, "free block outside the part of the store handed out"));
            }
            if (base + offset) % size != 0 {
                return Err(corrupt(offset, "free block not aligned to its size class"));
            }
            count += 1;
            if count > most {
                return Err(corrupt(offset, "free stack has a cycle"));
            }
            visit(offset)?;
            // SAFETY: `link` names a block of this class inside the handed-out part of the store
            // (checked above), so its link cell is inside the store and 4-aligned. On a sound
            // stack a push wrote the cell; on one a stray write corrupted, the cell still holds
            // defined bytes (the store starts zeroed) unless it lies in the padding of the value
            // of a larger block in use, which nothing here can rule out (see `check`).
            link = link_in(unsafe { store.link_cell(link, class) }.load(Ordering::Acquire) as usize);
        }
        Ok(count)
    }

    pub(crate) fn store_ref(self) -> StoreRef<'a> {
        // SAFETY: `self` exists only once the store is laid out at this address, and borrows it
        // for 'a.
        unsafe { StoreRef::new(self.store.base()) }
    }

    /// Takes a new block of `2^class` bytes, aligned to its size, from the untouched part.
    #[inline(always)]
    fn bump(self, class: u32) -> Result<NonNull<u8>> {
        let size = 1usize << class;
        let base = self.store.base();
        let addr = base.as_ptr() as usize;
        let cursor = &self.store.cursor;
        #[cfg(not(feature = "critical-section"))]
        {
            let start = claim(cursor, addr, FastMemStore::<N, S>::HEADS, N, size)?;
            // SAFETY: start < start + size <= N: inside the store.
            Ok(unsafe { base.add(start) })
        }
        #[cfg(feature = "critical-section")]
        critical_section::with(|_| {
            let current = cursor.load(Ordering::Relaxed);
            if !cursor_inside(current, FastMemStore::<N, S>::HEADS, N) {
                return Err(cursor_outside(current));
            }
            let start = bump_start(addr, current, size);
            let end = start + size;
            if end > N {
                return Err(out_of_memory(size, N - current));
            }
            cursor.store(end, Ordering::Relaxed);
            // SAFETY: start < end <= N: inside the store.
            Ok(unsafe { base.add(start) })
        })
    }
}

/// Claims the next `size` bytes (a power of two), aligned to their size, of the untouched part
/// of a store of `n` bytes at address `addr` whose cursor is `cursor`, and returns their offset.
/// Claims racing on one cursor get disjoint ranges: each moves the cursor from the value it
/// computed its range from, or retries. Run on loom's atomics by `core/tests/loom_fastmem.rs`.
/// Blocks lie from offset `lo` (the end of the stack heads) on: a cursor below `lo` or past `n`
/// (a stray write) is [`Error::Corrupt`]. Below `lo` the block would overlap the heads; past `n`
/// the arithmetic below does not hold.
#[cfg(not(feature = "critical-section"))]
#[inline(always)]
pub fn claim<C: HeadCell>(cursor: &C, addr: usize, lo: usize, n: usize, size: usize) -> Result<usize> {
    let mut current = cursor.load(Ordering::Relaxed);
    loop {
        if !cursor_inside(current, lo, n) {
            return Err(cursor_outside(current));
        }
        let start = bump_start(addr, current, size);
        let end = start + size;
        if end > n {
            return Err(out_of_memory(size, n - current));
        }
        match cursor.compare_exchange_weak(current, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Ok(start),
            Err(seen) => current = seen,
        }
    }
}

/// Whether `cursor` lies between `lo` and `n` (`lo <= n`), as the cursor of a sound store
/// does: one comparison, as the difference wraps below `lo`.
#[inline(always)]
fn cursor_inside(cursor: usize, lo: usize, n: usize) -> bool {
    cursor.wrapping_sub(lo) <= n - lo
}

/// The offset, at or after `cursor`, where a block of `size` bytes aligned to its size starts in
/// a store whose bytes begin at address `addr`: `cursor` plus the padding to the next multiple of
/// `size`. The result is below `cursor + size`, and with `cursor <= N` and `size <= 4 * S + 16`
/// (both far below `usize::MAX / 4`) neither it nor `start + size` can overflow.
#[inline(always)]
fn bump_start(addr: usize, cursor: usize, size: usize) -> usize {
    // addr + cursor lies inside the store (or one past it), so it does not overflow.
    cursor + ((addr + cursor).wrapping_neg() & (size - 1))
}

#[cold]
fn too_large(size: usize) -> Error {
    Error::InvalidSize { size: size as u64, reason: "larger than the store's largest value S" }
}

#[cold]
fn out_of_memory(size: usize, available: usize) -> Error {
    Error::OutOfMemory { requested: size as u64, available: available as u64 }
}

#[cold]
fn cursor_outside(cursor: usize) -> Error {
    corrupt(cursor, CURSOR_OUTSIDE)
}

const CURSOR_OUTSIDE: &str = "cursor outside the store";

fn corrupt(offset: usize, detail: &'static str) -> Error {
    Error::Corrupt { structure: "fastmem store", offset: offset as u64, detail }
}

/// What [`FastMem::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastMemReport {
    /// Bytes available for blocks: `N` less the stack heads.
    pub capacity: usize,
    /// Bytes handed out by bumping so far: blocks, and padding that aligned them.
    pub bumped: usize,
    /// Bytes in blocks waiting on the free stacks.
    pub free_bytes: usize,
    free_blocks: [usize; usize::BITS as usize],
}

impl FastMemReport {
    /// Blocks of `block_size` bytes (see [`block_size`](super::block_size)) on their free stack.
    pub fn free_blocks(&self, block_size: usize) -> usize {
        if block_size.is_power_of_two() {
            self.free_blocks[block_size.trailing_zeros() as usize]
        } else {
            0
        }
    }
}
