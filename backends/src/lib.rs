//! hetmem-backends: where the bytes live.
//!
//! | backend | memory | attach from another process |
//! |---|---|---|
//! | [`ArrayBackend`] | a buffer the caller owns | by handing over the buffer |
//! | [`MallocBackend`] | the system allocator | no |
//! | [`PosixMmapBackend`] | an anonymous private mapping | no (a forked child gets a copy: writes are not shared) |
//! | [`PosixShmBackend`] | a POSIX shared-memory segment (unix) | by name |
//!
//! Each starts with the [`RegionHeader`](hetmem_core::RegionHeader) page; allocators carve the
//! rest. [`raw::RawRegion`] is the one piece they share.
#![warn(missing_docs)]

mod array;
#[cfg(unix)]
pub mod liveness;
mod malloc;
mod posix_mmap;
#[cfg(unix)]
mod posix_shm;
pub mod raw;

pub use array::ArrayBackend;
#[cfg(unix)]
pub use liveness::ProcLiveness;
pub use malloc::MallocBackend;
pub use posix_mmap::PosixMmapBackend;
#[cfg(unix)]
pub use posix_shm::{PosixShmBackend, ShmOptions};

/// Size of the header page at the start of every backend.
pub use hetmem_core::header::HEADER_SIZE;
