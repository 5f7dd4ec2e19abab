//! Pointers that mean the same thing in every process and on the GPU.
//!
//! A region may be mapped at a different address in each process, so nothing stored inside it is
//! a pointer: it is an [`OffsetPtr`] from the region's start. A [`ShmPtr`] adds the allocator the
//! offset belongs to, which is enough for any process's [`MemoryManager`](crate::MemoryManager)
//! to find the local address; a [`FullPtr`] carries both forms.

use core::fmt;
use core::marker::PhantomData;

#[cfg(target_has_atomic = "64")]
use crate::sync::atomic::{AtomicU64, Ordering};

/// An offset in bytes from the start of a region. [`OffsetPtr::NULL`] is the reserved null value.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OffsetPtr(u64);

impl OffsetPtr {
    /// The null offset (no offset can equal it: regions are smaller than `u64::MAX` bytes).
    pub const NULL: OffsetPtr = OffsetPtr(u64::MAX);

    /// An offset of `offset` bytes.
    pub const fn new(offset: u64) -> Self {
        OffsetPtr(offset)
    }

    /// Whether this is [`OffsetPtr::NULL`].
    pub const fn is_null(self) -> bool {
        self.0 == u64::MAX
    }

    /// The raw value (`u64::MAX` for null).
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The offset, or `None` for null.
    pub const fn offset(self) -> Option<u64> {
        if self.is_null() {
            None
        } else {
            Some(self.0)
        }
    }
}

impl Default for OffsetPtr {
    fn default() -> Self {
        OffsetPtr::NULL
    }
}

impl fmt::Debug for OffsetPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset() {
            Some(o) => write!(f, "OffsetPtr({o:#x})"),
            None => f.write_str("OffsetPtr(null)"),
        }
    }
}

/// An [`OffsetPtr`] that can be read and swapped atomically, for lists shared between processes.
/// (Only on targets with 64-bit atomics.)
#[cfg(target_has_atomic = "64")]
#[repr(transparent)]
pub struct AtomicOffsetPtr(AtomicU64);

#[cfg(target_has_atomic = "64")]
impl AtomicOffsetPtr {
    /// A new atomic offset holding `p`.
    #[cfg(not(loom))]
    pub const fn new(p: OffsetPtr) -> Self {
        AtomicOffsetPtr(AtomicU64::new(p.0))
    }

    /// A new atomic offset holding `p`.
    #[cfg(loom)]
    pub fn new(p: OffsetPtr) -> Self {
        AtomicOffsetPtr(AtomicU64::new(p.0))
    }

    /// Reads the offset.
    pub fn load(&self, order: Ordering) -> OffsetPtr {
        OffsetPtr(self.0.load(order))
    }

    /// Writes the offset.
    pub fn store(&self, p: OffsetPtr, order: Ordering) {
        self.0.store(p.0, order)
    }

    /// Replaces `current` with `new` if it still holds `current`; returns what it held.
    pub fn compare_exchange(
        &self,
        current: OffsetPtr,
        new: OffsetPtr,
        success: Ordering,
        failure: Ordering,
    ) -> Result<OffsetPtr, OffsetPtr> {
        self.0.compare_exchange(current.0, new.0, success, failure).map(OffsetPtr).map_err(OffsetPtr)
    }
}

#[cfg(target_has_atomic = "64")]
impl fmt::Debug for AtomicOffsetPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.load(Ordering::Relaxed), f)
    }
}

/// Names an allocator, unique within a memory manager: `major` is usually the backend, `minor`
/// the allocator within it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct AllocatorId {
    /// The group (by convention the backend's number).
    pub major: u32,
    /// The allocator within the group.
    pub minor: u32,
}

impl AllocatorId {
    /// The id `(major, minor)`.
    pub const fn new(major: u32, minor: u32) -> Self {
        AllocatorId { major, minor }
    }

    /// Both halves in one `u64` (major in the high half).
    pub const fn to_bits(self) -> u64 {
        ((self.major as u64) << 32) | self.minor as u64
    }

    /// The inverse of [`AllocatorId::to_bits`].
    pub const fn from_bits(bits: u64) -> Self {
        AllocatorId { major: (bits >> 32) as u32, minor: bits as u32 }
    }
}

impl fmt::Display for AllocatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The form of a pointer that crosses process and device boundaries: an allocator and an offset
/// in its backend's region.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ShmPtr {
    /// The allocator the memory belongs to.
    pub allocator: AllocatorId,
    /// The offset from the start of that allocator's backend region.
    pub offset: OffsetPtr,
}

impl ShmPtr {
    /// A pointer to `offset` in `allocator`'s region.
    pub const fn new(allocator: AllocatorId, offset: OffsetPtr) -> Self {
        ShmPtr { allocator, offset }
    }

    /// Whether the offset is null.
    pub const fn is_null(self) -> bool {
        self.offset.is_null()
    }
}

impl fmt::Display for ShmPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset.offset() {
            Some(o) => write!(f, "{}+{o:#x}", self.allocator),
            None => write!(f, "{}+null", self.allocator),
        }
    }
}

/// A [`ShmPtr`] together with the address it maps to in this process.
///
/// The local address is only meaningful in the process that made the `FullPtr`; send the
/// [`ShmPtr`] to others.
#[repr(C)]
pub struct FullPtr<T> {
    /// The process-independent form.
    pub shm: ShmPtr,
    /// The address in this process.
    pub ptr: *mut T,
    _marker: PhantomData<*mut T>,
}

impl<T> FullPtr<T> {
    /// Pairs a shared pointer with its local address. Nothing is checked: use
    /// [`MemoryManager::to_local`](crate::MemoryManager::to_local) to get one that is.
    pub const fn new(shm: ShmPtr, ptr: *mut T) -> Self {
        FullPtr { shm, ptr, _marker: PhantomData }
    }

    /// The same memory seen as another type.
    pub const fn cast<U>(self) -> FullPtr<U> {
        FullPtr { shm: self.shm, ptr: self.ptr.cast(), _marker: PhantomData }
    }
}

impl<T> Clone for FullPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for FullPtr<T> {}

impl<T> fmt::Debug for FullPtr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FullPtr").field("shm", &self.shm).field("ptr", &self.ptr).finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn null_is_reserved_and_distinct_from_zero() {
        assert!(OffsetPtr::NULL.is_null());
        assert_eq!(OffsetPtr::default(), OffsetPtr::NULL);
        assert_eq!(OffsetPtr::new(0).offset(), Some(0));
        assert_eq!(OffsetPtr::NULL.offset(), None);
    }

    #[test]
    fn allocator_id_round_trips_through_bits() {
        let id = AllocatorId::new(7, 0xdead_beef);
        assert_eq!(AllocatorId::from_bits(id.to_bits()), id);
        assert_eq!(id.to_string(), "7.3735928559");
        assert_eq!(ShmPtr::new(AllocatorId::new(1, 2), OffsetPtr::new(0x40)).to_string(), "1.2+0x40");
    }

    #[test]
    fn atomic_offset_swaps() {
        let a = AtomicOffsetPtr::new(OffsetPtr::NULL);
        assert!(a.compare_exchange(OffsetPtr::new(1), OffsetPtr::new(2), Ordering::AcqRel, Ordering::Acquire).is_err());
        assert_eq!(
            a.compare_exchange(OffsetPtr::NULL, OffsetPtr::new(64), Ordering::AcqRel, Ordering::Acquire),
            Ok(OffsetPtr::NULL)
        );
        assert_eq!(a.load(Ordering::Acquire), OffsetPtr::new(64));
    }

    #[test]
    fn pointer_types_have_stable_layouts() {
        assert_eq!(core::mem::size_of::<OffsetPtr>(), 8);
        assert_eq!(core::mem::size_of::<AllocatorId>(), 8);
        assert_eq!(core::mem::size_of::<ShmPtr>(), 16);
    }
}
