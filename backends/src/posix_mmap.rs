//! [`PosixMmapBackend`]: an anonymous private mapping.

use std::ptr::NonNull;

use hetmem_core::{BackendId, BackendKind, Error, Result};
use memmap2::MmapMut;

use crate::raw::{impl_backend, region_len, RawRegion};

/// A private region in an anonymous memory mapping (pages are committed on first touch), unmapped
/// on drop. The mapping is private (copy-on-write), so a child made with `fork` gets a copy of
/// the region as it was at the fork, at the same address: what either process writes after the
/// fork the other does not see, and an allocator over it is two allocators from then on. For a
/// region that processes share, use a `PosixShmBackend`.
#[derive(Debug)]
pub struct PosixMmapBackend {
    raw: RawRegion,
    _map: MmapMut,
}

impl PosixMmapBackend {
    /// A region with `size` bytes of data (rounded up to whole pages) after its header.
    /// `OutOfMemory` if the system will not map that much (more than its memory allows, or than
    /// this process's address space holds), as from [`MallocBackend`](crate::MallocBackend).
    pub fn create(size: usize, id: BackendId) -> Result<Self> {
        let len = region_len(size)?;
        let mut map = MmapMut::map_anon(len as usize).map_err(|e| match e.kind() {
            std::io::ErrorKind::OutOfMemory => Error::OutOfMemory { requested: len, available: 0 },
            _ => Error::Os { call: "mmap", errno: e.raw_os_error().unwrap_or(0) },
        })?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(Error::Os { call: "mmap", errno: 0 })?;
        // SAFETY: the mapping is `len` bytes, page-aligned, and lives in `_map` as long as we do.
        let raw = unsafe { RawRegion::new(base, len) };
        // SAFETY: a fresh private mapping no one else knows of; no reference to its header exists.
        unsafe { raw.initialize(BackendKind::Private, id)? };
        Ok(PosixMmapBackend { raw, _map: map })
    }
}

impl_backend!(PosixMmapBackend, kind = |_s| BackendKind::Private, creator = |_s| true);

#[cfg(test)]
mod tests {
    use super::*;
    use hetmem_core::MemoryBackend;

    #[test]
    fn maps_a_valid_region() {
        let b = PosixMmapBackend::create(1 << 20, BackendId(3)).unwrap();
        assert_eq!(b.len(), (1 << 20) + 4096);
        assert_eq!(b.id(), BackendId(3));
        assert!(matches!(PosixMmapBackend::create(0, BackendId(3)), Err(Error::InvalidSize { .. })));
    }

    /// The docs said a forked child "inherits" the region: it gets a copy, and writes after the
    /// fork are not shared either way.
    #[cfg(unix)]
    #[test]
    fn a_forked_child_gets_a_copy_and_writes_are_not_shared() {
        let b = PosixMmapBackend::create(4096, BackendId(3)).unwrap();
        // SAFETY: the first data byte, past the header, in the live mapping.
        let byte = unsafe { b.base().add(hetmem_core::header::HEADER_SIZE as usize) };
        // SAFETY: as above; no other thread uses the region.
        unsafe { byte.write(1) };
        // SAFETY: fork(2); the child reads and writes its copy and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: the child's copy of the mapping, at the same address.
            let code = unsafe {
                let seen = byte.read();
                byte.write(2);
                std::thread::sleep(std::time::Duration::from_millis(200));
                // 0: saw the value from before the fork, and not the parent's write after it.
                if seen == 1 && byte.read() == 2 {
                    0
                } else {
                    1
                }
            };
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(code) };
        }
        // SAFETY: as above, in the parent.
        unsafe { byte.write(3) };
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child saw the parent's write");
        // SAFETY: as above.
        assert_eq!(unsafe { byte.read() }, 3, "the parent saw the child's write");
    }

    #[cfg(target_pointer_width = "64")] // 32-bit: every size accepted can be mapped
    #[test]
    fn a_mapping_the_system_cannot_give_is_out_of_memory() {
        // 2^60 bytes: past any 64-bit address space (57 bits at most), so always refused.
        let r = PosixMmapBackend::create(1 << 60, BackendId(3));
        assert!(matches!(r, Err(Error::OutOfMemory { requested, .. }) if requested > 1 << 60), "{r:?}");
        // As from the system allocator.
        assert!(crate::MallocBackend::create(1 << 60, BackendId(3)).unwrap_err().is_out_of_memory());
    }
}
