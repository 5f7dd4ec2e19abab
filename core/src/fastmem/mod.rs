//! fastmem: an O(1) allocator over a static store, for `no_std` targets with no heap.
//!
//! Hard real-time code (interrupt handlers, RTIC-style tasks, async futures on a microcontroller)
//! needs allocation whose cost is small and known. fastmem never frees: a dropped box goes onto
//! the free stack of its size class and the next allocation of that class takes it back.
//!
//! - [`FastMemStore<N, S>`](FastMemStore): `N` bytes of storage, values of at most `S` bytes;
//!   `const fn new()`, so it can be a `static`. [`FastMemStore::init`] gives the handle.
//! - [`FastMem`]: the handle (`Copy`); [`FastMem::alloc`] boxes a value.
//! - [`FastBox<T>`](FastBox): `Deref`/`DerefMut`; its `Drop` drops the value and recycles the
//!   block. [`fastbox_unsize!`](crate::fastbox_unsize) turns a `FastBox<T>` into a
//!   `FastBox<dyn Trait>` (closures, futures) or `FastBox<[T]>`.
//!
//! # How it works
//! A value of `size` bytes gets a block of the smallest power of two that holds `size + 4`
//! bytes (its *size class*, 8 bytes at least). The value sits at the block's start; the last 4
//! bytes hold the block's link while it is on a free stack, so the value and the bookkeeping
//! never overlap. Blocks are aligned to their own size, which satisfies the alignment of every
//! type that fits them (a type's alignment never exceeds its size). One free stack per class;
//! the stack heads are the first words of the store. A first allocation is one bump of the store's
//! cursor; a re-allocation is one pop; a drop is one push. All state is offsets from the store's
//! start, so a store that was moved (possible only while nothing borrows it) is laid out anew by
//! the next [`FastMemStore::init`].
//!
//! # Concurrency
//! By default the free stacks and the cursor are lock-free: a compare-and-swap on a word that packs
//! the top block's link with a tag that every pop increments, so a pop that was overtaken by a
//! pop–pop–push of the same block fails instead of corrupting the stack (ABA). The tag has 34 bits
//! on 64-bit targets and 16 on 32-bit ones: an ABA can be missed only if one pop is held up while
//! at least 2³² (2¹⁶ on 32-bit targets) other pops of the same class complete and the tag wraps to
//! exactly its old value. Boxes may be sent to and dropped on other threads or interrupt handlers.
//!
//! With the `critical-section` feature the same operations run inside
//! [`critical_section::with`](https://docs.rs/critical-section) using plain loads and stores, for
//! targets without compare-and-swap or for code that prefers masking interrupts to retry loops.
//! The program must then provide a critical-section implementation (e.g. `cortex-m`'s
//! `critical-section-single-core` feature, or `critical-section`'s `std` feature on a host).
//!
//! # Limits
//! - `N` is at most 512 KiB on 32-bit targets (links are 16 bits in units of 8 bytes) and 1 GiB on
//!   64-bit ones (30-bit byte offsets); checked at compile time.
//! - A value larger than `S` is refused with [`Error::InvalidSize`](crate::Error::InvalidSize);
//!   an exhausted store returns [`Error::OutOfMemory`](crate::Error::OutOfMemory) and stays usable.
//! - Memory is recycled by class, never returned: a program that first fills the store with
//!   8-byte boxes cannot later use that memory for 64-byte ones. This suits "semi-static" systems
//!   with a recurring set of message and future types. [`FastMemStore::reset`] (which needs `&mut`,
//!   so no box is alive) reclaims everything.
//! - Zero-sized values take no memory.
//!
//! ```
//! use hetmem_core::fastmem::{FastBox, FastMemStore};
//! use hetmem_core::fastbox_unsize;
//!
//! static STORE: FastMemStore<1024, 128> = FastMemStore::new();
//!
//! let fm = STORE.init();
//! let b = fm.alloc(7u32)?;                  // first allocation: one bump
//! assert_eq!(*b, 7);
//! drop(b);                                  // back onto the 8-byte class's stack
//! let again = fm.alloc(9u32)?;              // re-allocation: one pop, same block
//! assert_eq!(*again, 9);
//!
//! let mut count = 0u32;
//! let mut tick: FastBox<dyn FnMut() -> u32> =
//!     fastbox_unsize!(fm.alloc(move || { count += 1; count })? => dyn FnMut() -> u32);
//! assert_eq!((*tick)(), 1);
//! assert_eq!((*tick)(), 2);
//! # Ok::<(), hetmem_core::Error>(())
//! ```

mod boxed;
mod class;
mod stack;
mod store;

pub use boxed::{FastBox, StoreRef};
pub use class::{block_size, MIN_BLOCK};
pub use store::{FastMem, FastMemReport, FastMemStore};

/// The free-stack algorithm and the store's bump claim, for the loom models in
/// `core/tests/loom_fastmem.rs` (only under `--cfg loom`, where they also run on loom's atomics).
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_api {
    pub use super::stack::{pop, push, HeadCell, LinkCell, LINK_BITS};
    #[cfg(not(feature = "critical-section"))]
    pub use super::store::claim;
}

#[cfg(test)]
mod tests;
