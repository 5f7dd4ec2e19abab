//! Where the bytes live: the [`MemoryBackend`] trait.
//!
//! A backend is one contiguous region that starts with a [`RegionHeader`] page; allocators carve
//! the rest. Concrete backends (`hetmem-backends`, `hetmem-gpu`) each have their own `create` and
//! `attach` constructors, because what they need differs (a name and a size, a buffer, a device);
//! once made, every backend answers the same questions through this trait.

use core::fmt;

#[cfg(target_has_atomic = "64")]
use crate::error::Result;
#[cfg(target_has_atomic = "64")]
use crate::header::RegionHeader;

/// Names a backend within a memory manager (and in its region's header).
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct BackendId(pub u64);

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What kind of memory a backend holds; stored in the header, and checked on attach.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum BackendKind {
    /// Memory private to one process (a heap buffer, an anonymous mapping).
    Private = 1,
    /// Shared memory any process may attach by name.
    Shared = 2,
    /// Shared memory that is also registered with a GPU (pinned and mapped for kernels).
    Pinned = 3,
    /// GPU device memory: the CPU cannot dereference it.
    Device = 4,
}

impl BackendKind {
    /// The kind stored as `raw` in a header, if it is one.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(BackendKind::Private),
            2 => Some(BackendKind::Shared),
            3 => Some(BackendKind::Pinned),
            4 => Some(BackendKind::Device),
            _ => None,
        }
    }
}

/// One contiguous region of memory with a [`RegionHeader`] at its start.
///
/// Contract for implementors:
/// - [`base`](Self::base) is the local address of offset 0 and stays valid, with
///   [`len`](Self::len) bytes, for the backend's whole life; it never moves.
/// - [`header`](Self::header) is initialised (the creator finished) before the backend is handed
///   out by `create` or `attach`.
/// - Dropping a backend unmaps it in this process only; [`destroy`](Self::destroy) removes its
///   name so no one else can attach, and is what the creator calls when the region is done.
///
/// # Safety
/// Regions, region allocators and the memory manager read and write the bytes at
/// [`base`](Self::base) without checking them (calls such as `Region::new` and
/// `AllocatorType::create` do). So an implementation promises that whenever
/// [`host_accessible`](Self::host_accessible) says so, `base` is valid for reads and writes of
/// [`len`](Self::len) bytes, page-aligned, and stays so, at the same address, for the backend's
/// whole life (both return the same values on every call); and that
/// [`header`](Self::header) is the header at `base`. A safe implementation could otherwise hand
/// out a dangling base that safe code then writes through:
///
/// ```compile_fail,E0200
/// use hetmem_core::{BackendKind, MemoryBackend, RegionHeader};
/// struct Liar(&'static RegionHeader);
/// impl MemoryBackend for Liar { // needs `unsafe impl`
///     fn kind(&self) -> BackendKind {
///         BackendKind::Private
///     }
///     fn base(&self) -> *mut u8 {
///         core::ptr::dangling_mut()
///     }
///     fn len(&self) -> u64 {
///         1 << 30
///     }
///     fn header(&self) -> &RegionHeader {
///         self.0
///     }
///     fn is_creator(&self) -> bool {
///         true
///     }
/// }
/// ```
#[cfg(target_has_atomic = "64")]
pub unsafe trait MemoryBackend: Send + Sync + 'static {
    /// The backend's id, as written in its header.
    fn id(&self) -> BackendId {
        BackendId(self.header().backend_id())
    }

    /// What kind of memory this is.
    fn kind(&self) -> BackendKind;

    /// The name other processes attach by, if it has one.
    fn name(&self) -> Option<&str> {
        None
    }

    /// The local address of the region's first byte (the header). Offsets count from here.
    fn base(&self) -> *mut u8;

    /// The region's total size in bytes, header included.
    fn len(&self) -> u64;

    /// Whether the region is empty; never true for a valid backend, which holds at least its header.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header page, in host memory.
    fn header(&self) -> &RegionHeader;

    /// Whether this process created the region (rather than attached to it).
    fn is_creator(&self) -> bool;

    /// Whether the CPU may read and write the region through [`base`](Self::base).
    fn host_accessible(&self) -> bool {
        self.kind() != BackendKind::Device
    }

    /// The address GPU kernels use for offset 0, where a GPU sees the region.
    fn device_ptr(&self) -> Option<u64> {
        None
    }

    /// Removes the region's name so that no further process can attach. The mapping stays valid
    /// in every process that has it until each drops its backend. A no-op for unnamed memory.
    /// `NotFound` where the name no longer names this region (another process removed it first),
    /// which `MemoryManager::destroy_backend` takes as done.
    fn destroy(&self) -> Result<()> {
        Ok(())
    }
}
