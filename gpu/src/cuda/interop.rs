//! Handing hetmem memory to cudarc without copying it.
//!
//! A [`DeviceView`] is a typed window on memory a kernel can address: part of a
//! [`CudaShmBackend`](super::CudaShmBackend) or [`CudaIpcBackend`](super::CudaIpcBackend), or a
//! block from a device or pinned pool ([`DeviceView::from_block`]; a pinned block's host address
//! is its device address under unified addressing, as on 64-bit Linux). It implements cudarc's
//! `DevicePtr`/`DevicePtrMut`, so `stream.memcpy_htod`, `memcpy_dtoh`, `memcpy_dtod` and friends
//! take it as they take a `CudaSlice`, and [`DeviceView::kernel_arg`] passes its address to a
//! kernel launch:
//!
//! ```no_run
//! # use hetmem_gpu::cuda::*;
//! # fn f(shm: &CudaShmBackend, func: &cudarc::driver::CudaFunction) -> hetmem_core::Result<()> {
//! use cudarc::driver::{LaunchConfig, PushKernelArg};
//! let stream = shm.context().default_stream();
//! let mut out = shm.device_view::<u32>(hetmem_core::header::HEADER_SIZE, 1024, &stream)?;
//! let n = 1024u32;
//! let mut launch = stream.launch_builder(func);
//! launch.arg(out.kernel_arg()).arg(&n);
//! // SAFETY: the kernel writes `n` u32s through its first argument.
//! unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.expect("launch");
//! stream.memcpy_htod(&[7u32; 4], &mut out).expect("copy"); // a copy into shared memory
//! # Ok(()) }
//! ```
//!
//! A view does no event tracking: the memory is shared with the CPU and other processes, which
//! cudarc's events cannot see. Order work with stream synchronisation, as for any shared memory.
//! Work queued through a view may outlive it: dropping the backend waits for the work queued in
//! every device's primary context (a copy may run on any device's stream) before the memory goes.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use hetmem_core::{Error, MemoryBackend, Result};

use crate::pinned::check_range;

/// `len` elements of `T` at a device address, usable for `'a`, with the stream cudarc queues
/// copies on.
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    /// The fork generation the view was made in (see `driver::keep_in_forked_child`).
    generation: u64,
    _memory: PhantomData<&'a mut [T]>,
}

impl<'a, T> DeviceView<'a, T> {
    /// A view of `len` elements at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` is a device address valid (in `stream`'s context) for `len * size_of::<T>()` bytes,
    /// aligned for `T`, for all of `'a` and until the device work queued through the view has
    /// finished (a copy or kernel may still run after the view drops: nothing here waits for it);
    /// no other view of it is written while this one is used.
    pub unsafe fn from_raw(ptr: u64, len: usize, stream: &Arc<CudaStream>) -> Self {
        let generation = super::driver::handle_generation();
        DeviceView { ptr, len, stream: stream.clone(), generation, _memory: PhantomData }
    }

    /// A view of the first `len` elements of a pool block, with `bytes` its size: `block` as
    /// returned by a pool over [`CudaDeviceResource`](super::CudaDeviceResource) (a device
    /// address) or over [`CudaPinnedResource`](super::CudaPinnedResource) (a host address). The
    /// address is used as it is: a pinned block's host address is also its device address only
    /// under unified addressing, which CUDA gives every 64-bit process on Linux (this module
    /// builds only on Linux); where a device lacks it
    /// ([`CudaPinnedResource::device_address`](super::CudaPinnedResource::device_address) then
    /// differs), make the view with [`from_raw`](Self::from_raw) and that address.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if `len` elements do not fit in `bytes` (its `len` is the bytes they
    /// need), [`Error::InvalidSize`] if their size overflows, [`Error::InvalidAlignment`] if the
    /// block is not aligned for `T`.
    ///
    /// # Safety
    /// `block` is a live block of at least `bytes` bytes that `stream`'s device can address at
    /// `block` (device memory of `stream`'s context, or pinned memory under unified addressing),
    /// not freed during `'a` nor before the device work queued through the view has finished
    /// (synchronise the streams that used it, or, for a stream-ordered resource, order that work
    /// before the free on its stream), and not written through another view while this one is
    /// used.
    pub unsafe fn from_block(block: NonNull<u8>, bytes: usize, len: usize, stream: &Arc<CudaStream>) -> Result<Self> {
        let need = len
            .checked_mul(size_of::<T>())
            .ok_or(Error::InvalidSize { size: len as u64, reason: "element count overflows" })?;
        if need > bytes {
            return Err(Error::OutOfBounds { offset: 0, len: need as u64, region_len: bytes as u64 });
        }
        if (block.as_ptr() as usize) % align_of::<T>() != 0 {
            return Err(Error::InvalidAlignment { align: align_of::<T>() as u64 });
        }
        // SAFETY: the caller's contract, with size and alignment checked above.
        Ok(unsafe { Self::from_raw(block.as_ptr() as u64, len, stream) })
    }

    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.ptr
    }

    /// The address as a kernel argument: `launch.arg(view.kernel_arg())` passes a `T*`.
    pub fn kernel_arg(&self) -> &u64 {
        &self.ptr
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The stream cudarc queues this view's copies on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> Drop for DeviceView<'_, T> {
    fn drop(&mut self) {
        // The view may hold the last handle to its stream: not destroyed in a forked child.
        super::driver::keep_in_forked_child(&self.stream, self.generation);
    }
}

/// A view of `len` elements of `T` at `offset` of `backend`, checked to lie in its data area and for
/// its device address to be aligned for `T`.
///
/// # Safety
/// `backend.device_ptr()` is the device address of offset 0, valid in `stream`'s context for the
/// backend's whole length and for as long as the backend lives.
pub(crate) unsafe fn region_view<'a, T>(
    backend: &'a dyn MemoryBackend,
    offset: u64,
    len: usize,
    stream: &Arc<CudaStream>,
) -> Result<DeviceView<'a, T>> {
    let base = backend.device_ptr().ok_or(Error::Unsupported("this backend has no device address"))?;
    check_range(base, backend.len(), offset, len, size_of::<T>(), align_of::<T>())?;
    // SAFETY: the range lies in the region (checked), which the caller promises is mapped for the
    // device while `backend` (borrowed for `'a`) lives.
    Ok(unsafe { DeviceView::from_raw(base + offset, len, stream) })
}

impl<T> DeviceSlice<T> for DeviceView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DeviceView<'_, T> {
    fn device_ptr<'b>(&'b self, _stream: &'b CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'b>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for DeviceView<'_, T> {
    fn device_ptr_mut<'b>(&'b mut self, _stream: &'b CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'b>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

/// A view that copies and kernels may only read: of a [`CudaShmBackend`](super::CudaShmBackend)
/// registered read-only for the device, whose writable [`DeviceView`]s are refused (a device
/// write there faults, and the context is lost). It implements cudarc's `DevicePtr`, so it is the
/// source of `memcpy_dtoh` and `memcpy_dtod`, but not `DevicePtrMut`: no copy can write through
/// it.
///
/// ```compile_fail
/// # use hetmem_gpu::cuda::*;
/// # fn f(shm: &CudaShmBackend) -> hetmem_core::Result<()> {
/// let stream = shm.context().default_stream();
/// let mut view = shm.read_only_view::<u32>(hetmem_core::header::HEADER_SIZE, 4, &stream)?;
/// stream.memcpy_htod(&[7u32; 4], &mut view).unwrap(); // needs `DevicePtrMut`
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ReadOnlyView<'a, T>(DeviceView<'a, T>);

impl<T> ReadOnlyView<'_, T> {
    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.0.ptr
    }

    /// The address as a kernel argument, for a `const T*` parameter: the kernel may only read
    /// through it.
    pub fn kernel_arg(&self) -> &u64 {
        &self.0.ptr
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The stream cudarc queues this view's copies on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.0.stream
    }
}

impl<'a, T> From<DeviceView<'a, T>> for ReadOnlyView<'a, T> {
    /// A view of the same memory that only reads it.
    fn from(view: DeviceView<'a, T>) -> Self {
        ReadOnlyView(view)
    }
}

impl<T> DeviceSlice<T> for ReadOnlyView<'_, T> {
    fn len(&self) -> usize {
        self.0.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.0.stream
    }
}

impl<T> DevicePtr<T> for ReadOnlyView<'_, T> {
    fn device_ptr<'b>(&'b self, stream: &'b CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'b>) {
        self.0.device_ptr(stream)
    }
}
