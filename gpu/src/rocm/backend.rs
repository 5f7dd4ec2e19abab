//! [`RocmShmBackend`]: a POSIX shared-memory segment registered with a HIP device, so every process
//! that attaches, and their kernels, share one region.

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::{BackendKind, MemoryBackend, Result};

use super::runtime;
use crate::pinned::{check_range, impl_shm_device_backend};

/// Options for [`RocmShmBackend`].
#[derive(Clone, Debug, Default)]
pub struct RocmShmOptions {
    /// The segment's options (id, mode, unlink on drop, attach timeout).
    pub shm: ShmOptions,
    /// The HIP device whose kernels see the segment.
    pub device: usize,
}

/// A POSIX shared-memory segment ([`BackendKind::Pinned`]) registered with `hipHostRegister`
/// (portable + mapped); kernels use it at [`device_ptr`](MemoryBackend::device_ptr), from
/// `hipHostGetDevicePointer`. Each process registers its own mapping and unregisters it on drop.
///
/// # Errors
/// As [`PosixShmBackend`], and as [`runtime::runtime`] when there is no HIP device (checked before
/// any segment is made); a refused registration is [`hetmem_core::Error::Gpu`].
#[derive(Debug)]
pub struct RocmShmBackend {
    shm: PosixShmBackend,
    device: usize,
    device_ptr: u64,
    host_atomics: bool,
}

impl RocmShmBackend {
    /// Creates segment `name` with `size` bytes of data and registers it with the device.
    pub fn create(name: &str, size: usize, options: &RocmShmOptions) -> Result<Self> {
        let _device = runtime::use_device(options.device)?;
        let shm = PosixShmBackend::create_kind(name, size, &options.shm, BackendKind::Pinned)?;
        Self::register(shm, options.device)
    }

    /// Attaches to segment `name` and registers this process's mapping with the device.
    pub fn attach(name: &str, options: &RocmShmOptions) -> Result<Self> {
        let _device = runtime::use_device(options.device)?;
        let shm = PosixShmBackend::attach_kind(name, &options.shm, BackendKind::Pinned)?;
        Self::register(shm, options.device)
    }

    fn register(shm: PosixShmBackend, device: usize) -> Result<Self> {
        let host_atomics = runtime::host_native_atomics(device);
        // SAFETY: the mapping is `len` bytes at `base` and stays mapped until the returned backend
        // drops, which unregisters first.
        unsafe { runtime::host_register(shm.base(), shm.len() as usize)? };
        match runtime::host_device_pointer(shm.base()) {
            Ok(device_ptr) => Ok(RocmShmBackend { shm, device, device_ptr, host_atomics }),
            Err(e) => {
                // SAFETY: registered just above; no device work has used it.
                let _ = unsafe { runtime::host_unregister(shm.base()) };
                Err(e)
            }
        }
    }

    /// The HIP device the segment is registered with.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The device address of the `len` bytes at `offset` (past the header page), for HIP copies
    /// and kernel arguments.
    ///
    /// # Errors
    /// [`hetmem_core::Error::OutOfBounds`] for a range outside the data area.
    pub fn device_address(&self, offset: u64, len: usize) -> Result<u64> {
        check_range(self.device_ptr, self.shm.len(), offset, len, 1, 1)?;
        Ok(self.device_ptr + offset)
    }

    /// Whether kernels and CPU threads may work on the same words of the segment with atomics at
    /// the same time, as the runtime reports it (`hipDeviceAttributeHostNativeAtomicSupported`;
    /// false where it does not answer).
    ///
    /// Where it is false, a heap in the segment that kernels allocate in
    /// ([`device::BITMAP_HEADER`](crate::device::BITMAP_HEADER)) is used by kernels and by the CPU
    /// in turns: the CPU allocates and frees before a kernel that uses the heap is launched, or
    /// after it has finished, never while it runs.
    pub fn host_native_atomics(&self) -> bool {
        self.host_atomics
    }

    /// The underlying segment.
    pub fn shm(&self) -> &PosixShmBackend {
        &self.shm
    }

    /// Keeps the segment after this (creating) process drops its backend.
    pub fn persist(&mut self) {
        self.shm.persist();
    }
}

impl_shm_device_backend!(RocmShmBackend);

impl Drop for RocmShmBackend {
    fn drop(&mut self) {
        // In a forked child `use_device` fails and nothing is unregistered: the registration is
        // the parent's.
        if let Ok(_device) = runtime::use_device(self.device) {
            // Copies and kernels queued on any device with the segment's device addresses may
            // still be running when the backend drops.
            runtime::synchronize_all();
            // SAFETY: registered in `register`; no device work is queued any more.
            let _ = unsafe { runtime::host_unregister(self.shm.base()) };
        }
    }
}
