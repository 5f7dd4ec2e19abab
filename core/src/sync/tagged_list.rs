//! [`TaggedOffsetList`]: a lock-free stack of offsets for shared memory (a Treiber stack).
//!
//! The head is one `u64`: a 20-bit tag in the high bits and the element's offset divided by 16
//! in the low 44 (0 = empty). Every successful push or pop bumps the tag, so a pop that read
//! `head = A, A.next = B` cannot succeed after another thread popped `A`, popped `B` and pushed
//! `A` back (the ABA problem): the tag differs. Links live in the elements, reached through a
//! [`LinkStore`] that checks each offset before touching memory, so a corrupt head or link is an
//! error, never a wild access.
//!
//! A process killed at any instant leaves the list well formed: each operation is one CAS.

use super::atomic::{AtomicU64, Ordering};
use crate::error::{Error, Result};

const OFFSET_BITS: u32 = 44;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;
const TAG_ONE: u64 = 1 << OFFSET_BITS;

/// Where a list's links live: one `u64` per element, at an offset the store validates.
pub trait LinkStore {
    /// Reads the link of the element at `offset` (`None` ends the list). Fails if `offset` is not
    /// a place an element can be.
    fn load_link(&self, offset: u64) -> Result<Option<u64>>;

    /// Writes the link of the element at `offset`, which the caller owns (it is on no list).
    fn store_link(&self, offset: u64, next: Option<u64>);
}

/// A lock-free stack of 16-aligned offsets below 2^48, safe in shared memory. All-zero bytes are
/// an empty list.
#[repr(C)]
pub struct TaggedOffsetList {
    head: AtomicU64,
}

/// Packs an offset for a head word or a link (0 = none).
///
/// Offsets read back from shared memory may be damaged, so this does not assert: an offset that
/// is not [`storable`] packs into a link that decodes to another offset (past every region, or
/// its low bits lost, or none), which the next pop's bounds and header checks refuse, or which
/// ends the list early (a structure's `check()` then counts the blocks missing).
#[inline]
pub fn encode(offset: Option<u64>) -> u64 {
    match offset {
        Some(o) => o >> 4,
        None => 0,
    }
}

/// Unpacks a head word or a link.
#[inline]
pub fn decode(word: u64) -> Option<u64> {
    match word & OFFSET_MASK {
        0 => None,
        o => Some(o << 4),
    }
}

/// Whether `offset` can be stored in a list: non-zero, 16-aligned, below 2^48.
#[inline]
pub fn storable(offset: u64) -> bool {
    offset != 0 && offset % 16 == 0 && (offset >> 4) <= OFFSET_MASK
}

impl Default for TaggedOffsetList {
    fn default() -> Self {
        Self::new()
    }
}

impl TaggedOffsetList {
    /// An empty list.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        TaggedOffsetList { head: AtomicU64::new(0) }
    }

    /// An empty list.
    #[cfg(loom)]
    pub fn new() -> Self {
        TaggedOffsetList { head: AtomicU64::new(0) }
    }

    /// Pushes the element at `offset`, which the caller owns.
    #[inline]
    pub fn push<S: LinkStore + ?Sized>(&self, store: &S, offset: u64) {
        self.push_chain(store, offset, offset)
    }

    /// Pushes a chain `first -> ... -> last` already linked through `store` (`last`'s link is
    /// overwritten), in one CAS.
    #[inline]
    pub fn push_chain<S: LinkStore + ?Sized>(&self, store: &S, first: u64, last: u64) {
        debug_assert!(storable(first) && storable(last), "pushing {first:#x}..{last:#x}, not block offsets");
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            store.store_link(last, decode(head));
            let new = (head & !OFFSET_MASK).wrapping_add(TAG_ONE) | encode(Some(first));
            match self.head.compare_exchange_weak(head, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => head = seen,
            }
        }
    }

    /// Pops the element on top, if any.
    #[inline]
    pub fn pop<S: LinkStore + ?Sized>(&self, store: &S) -> Result<Option<u64>> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let Some(top) = decode(head) else {
                return Ok(None);
            };
            // The link may be stale (another thread may have taken `top` meanwhile); then the
            // tag has moved on and the CAS below fails. `top` itself came from a successful CAS,
            // so it was a valid element: a bad one means the list is corrupt.
            let next = store.load_link(top)?;
            let new = (head & !OFFSET_MASK).wrapping_add(TAG_ONE) | encode(next);
            match self.head.compare_exchange_weak(head, new, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => return Ok(Some(top)),
                Err(seen) => head = seen,
            }
        }
    }

    /// Takes the whole list at once (for a single consumer that walks it privately).
    #[inline]
    pub fn take_all(&self) -> Option<u64> {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            decode(head)?;
            let new = (head & !OFFSET_MASK).wrapping_add(TAG_ONE);
            match self.head.compare_exchange_weak(head, new, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return decode(head),
                Err(seen) => head = seen,
            }
        }
    }

    /// Takes the whole list at once, like [`take_all`](Self::take_all), writing the first
    /// element to `record` before the list lets go of it: a taker killed right after the take
    /// leaves the chain findable from `record` (links of taken elements are not touched).
    #[inline]
    pub fn take_recorded(&self, record: &AtomicU64) -> Option<u64> {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            let first = decode(head)?;
            record.store(encode(Some(first)), Ordering::Release);
            crate::crash::point();
            let new = (head & !OFFSET_MASK).wrapping_add(TAG_ONE);
            match self.head.compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(first),
                Err(seen) => head = seen,
            }
        }
    }

    /// The element on top right now (for walks by a caller that knows no one else is changing
    /// the list).
    pub fn peek(&self) -> Option<u64> {
        decode(self.head.load(Ordering::Acquire))
    }

    /// Whether the list is empty right now.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) & OFFSET_MASK == 0
    }

    /// Replaces the list with `first` (a chain the caller built), for repair by a caller that
    /// knows no one else is using the list.
    pub fn reset(&self, first: Option<u64>) {
        let head = self.head.load(Ordering::Relaxed);
        let new = (head & !OFFSET_MASK).wrapping_add(TAG_ONE) | encode(first);
        self.head.store(new, Ordering::Release);
    }
}

/// Walks a chain from `first`, calling `visit` on each element, stopping with `Error::Corrupt`
/// after `limit` elements or once it comes round a loop (found in steps of the loop and the
/// path to it, however high the limit), or at a link the store refuses.
pub fn walk<S: LinkStore + ?Sized>(
    store: &S,
    first: Option<u64>,
    limit: u64,
    mut visit: impl FnMut(u64) -> Result<()>,
) -> Result<u64> {
    let mut n = 0u64;
    let mut next = first;
    let mut loops = LoopCheck::new(first.unwrap_or(0));
    while let Some(at) = next {
        if n >= limit || (n > 0 && loops.came_round(at)) {
            return Err(Error::Corrupt {
                structure: "offset list",
                offset: at,
                detail: "list longer than its elements can be (a cycle)",
            });
        }
        visit(at)?;
        next = store.load_link(at)?;
        n += 1;
    }
    Ok(n)
}

/// Finds a loop in a walk of a list whose links are shared memory, in steps of the loop's
/// length and the path to it rather than of a bound on the list's length (which in a large region
/// is many times either): each offset reached is compared with one seen before, taken afresh at
/// doubling distances (Brent's method), so a short loop is found at once.
pub(crate) struct LoopCheck {
    seen: u64,
    stride: u64,
    steps: u64,
}

impl LoopCheck {
    /// A check of a walk that starts at `first`.
    pub(crate) fn new(first: u64) -> Self {
        LoopCheck { seen: first, stride: 1, steps: 0 }
    }

    /// Whether `at`, the offset the walk has just reached, shows that it goes round a loop.
    pub(crate) fn came_round(&mut self, at: u64) -> bool {
        if at == self.seen {
            return true;
        }
        self.steps += 1;
        if self.steps == self.stride {
            (self.seen, self.stride, self.steps) = (at, self.stride * 2, 0);
        }
        false
    }
}

#[cfg(all(test, not(loom), feature = "std"))]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Links in a plain vector of atomics: element at offset `o` uses slot `o / 16`.
    struct VecStore(Vec<AtomicU64>);

    impl LinkStore for VecStore {
        fn load_link(&self, offset: u64) -> Result<Option<u64>> {
            let slot = self.0.get((offset / 16) as usize).ok_or(Error::OutOfBounds {
                offset,
                len: 8,
                region_len: self.0.len() as u64 * 16,
            })?;
            Ok(decode(slot.load(Ordering::Relaxed)))
        }
        fn store_link(&self, offset: u64, next: Option<u64>) {
            self.0[(offset / 16) as usize].store(encode(next), Ordering::Relaxed);
        }
    }

    #[test]
    fn pushes_pops_chains_and_takes_all() {
        let store = VecStore((0..64).map(|_| AtomicU64::new(0)).collect());
        let list = TaggedOffsetList::new();
        assert_eq!(list.pop(&store).unwrap(), None);
        list.push(&store, 16);
        list.push(&store, 32);
        store.store_link(48, Some(64));
        list.push_chain(&store, 48, 64);
        let order: Vec<_> = std::iter::from_fn(|| list.pop(&store).unwrap()).collect();
        assert_eq!(order, [48, 64, 32, 16]);
        list.push(&store, 16);
        list.push(&store, 32);
        let first = list.take_all();
        assert!(list.is_empty());
        let mut seen = Vec::new();
        walk(&store, first, 10, |o| {
            seen.push(o);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [32, 16]);
    }

    #[test]
    fn a_cycle_or_a_wild_link_is_reported() {
        let store = VecStore((0..8).map(|_| AtomicU64::new(0)).collect());
        store.store_link(16, Some(32));
        store.store_link(32, Some(16));
        assert!(matches!(walk(&store, Some(16), 8, |_| Ok(())), Err(Error::Corrupt { .. })));
        let list = TaggedOffsetList::new();
        list.reset(Some(4096));
        assert!(list.pop(&store).is_err());
    }

    /// A walk finds a loop in steps of the loop, not of its limit: the span allocators bound
    /// their walks by the blocks an arena holds, which in a large region let a loop of two
    /// blocks keep a walker going round for billions of steps.
    #[test]
    fn a_cycle_is_found_however_high_the_limit() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let store = VecStore((0..8).map(|_| AtomicU64::new(0)).collect());
            // 16 -> 32 -> 48 -> 32: a loop behind a first element.
            store.store_link(16, Some(32));
            store.store_link(32, Some(48));
            store.store_link(48, Some(32));
            let mut visits = 0u64;
            let walked = walk(&store, Some(16), u64::MAX, |_| {
                visits += 1;
                Ok(())
            });
            let _ = tx.send((walked, visits));
        });
        let (walked, visits) =
            rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the walk went round the loop");
        assert!(matches!(walked, Err(Error::Corrupt { .. })), "{walked:?}");
        assert!(visits <= 8, "{visits} visits of three elements");
    }

    #[test]
    fn threads_never_lose_or_share_an_element() {
        let store = Arc::new(VecStore((0..=256).map(|_| AtomicU64::new(0)).collect()));
        let list = Arc::new(TaggedOffsetList::new());
        for i in 1..=256u64 {
            list.push(&*store, i * 16);
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (store, list) = (store.clone(), list.clone());
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for round in 0..20_000 {
                        if round % 3 != 2 {
                            if let Some(o) = list.pop(&*store).unwrap() {
                                mine.push(o);
                            }
                        } else if let Some(o) = mine.pop() {
                            list.push(&*store, o);
                        }
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.extend(std::iter::from_fn(|| list.pop(&*store).unwrap()));
        all.sort_unstable();
        assert_eq!(all, (1..=256u64).map(|i| i * 16).collect::<Vec<_>>());
    }
}
