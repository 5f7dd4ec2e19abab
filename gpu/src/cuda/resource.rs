//! Upstream resources for pools: [`CudaDeviceResource`] (device memory, `cuMemAlloc` or the
//! stream-ordered `cuMemAllocAsync`) and [`CudaPinnedResource`] (page-locked host memory,
//! `cuMemHostAlloc`).

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};
use hetmem_core::{Error, MemoryKind, MemoryResource, Result};

use super::driver;
use crate::aligned::AlignedBlocks;

/// The alignment every `cuMemAlloc` / `cuMemAllocAsync` result has.
pub const DEVICE_ALLOC_ALIGN: usize = 256;

/// How a [`CudaDeviceResource`] allocates.
#[derive(Clone, Debug)]
enum Mode {
    /// `cuMemAlloc` / `cuMemFree`: synchronous, usable from any stream at once.
    Sync,
    /// `cuMemAllocAsync` / `cuMemFreeAsync` on this stream: ordered with the stream's work.
    StreamOrdered(Arc<CudaStream>),
}

/// Device memory as a [`MemoryResource`] ([`MemoryKind::Device`]): the upstream of device-memory
/// pools. Blocks are device addresses (the CPU must not dereference them); pass them to cudarc with
/// [`DeviceView::from_block`](super::DeviceView::from_block).
///
/// # Errors
/// Construction fails as [`driver::context`] does; allocation returns
/// [`Error::OutOfMemory`] when the device is full (the resource stays usable), and other driver
/// failures as [`Error::Gpu`].
#[derive(Debug)]
pub struct CudaDeviceResource {
    ctx: Arc<CudaContext>,
    mode: Mode,
    moved: AlignedBlocks,
}

impl CudaDeviceResource {
    /// `cuMemAlloc` / `cuMemFree` on device `device`.
    pub fn new(device: usize) -> Result<Self> {
        Ok(CudaDeviceResource {
            ctx: driver::context(device)?,
            mode: Mode::Sync,
            moved: AlignedBlocks::new(DEVICE_ALLOC_ALIGN),
        })
    }

    /// Stream-ordered allocation (`cuMemAllocAsync` / `cuMemFreeAsync` from the device's default
    /// memory pool) on `stream`: a block is usable by work queued on `stream` after the allocation,
    /// and freeing it waits for the work queued before the free.
    ///
    /// # Errors
    /// [`Error::Unsupported`] if the device has no memory pools; [`Error::NotFound`] if the driver
    /// lacks the calls (older than CUDA 11.2).
    pub fn stream_ordered(stream: Arc<CudaStream>) -> Result<Self> {
        driver::require_async_alloc()?;
        let ctx = stream.context().clone();
        if !driver::memory_pools_supported(&ctx)? {
            return Err(Error::Unsupported("this CUDA device has no memory pools for stream-ordered allocation"));
        }
        Ok(CudaDeviceResource { ctx, mode: Mode::StreamOrdered(stream), moved: AlignedBlocks::new(DEVICE_ALLOC_ALIGN) })
    }

    /// The context blocks belong to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream of a stream-ordered resource.
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.mode {
            Mode::Sync => None,
            Mode::StreamOrdered(s) => Some(s),
        }
    }

    fn raw_alloc(&self, size: usize) -> Result<u64> {
        match &self.mode {
            Mode::Sync => driver::mem_alloc(size),
            Mode::StreamOrdered(stream) => driver::mem_alloc_async(size, stream),
        }
    }

    /// # Safety
    /// `dptr` is a driver allocation of this resource that nothing uses any more.
    unsafe fn raw_free(&self, dptr: u64) {
        // A failed free cannot be reported through `deallocate`; the driver keeps its memory
        // consistent either way.
        let _ = match &self.mode {
            // SAFETY: the caller's contract.
            Mode::Sync => unsafe { driver::mem_free(dptr) },
            // SAFETY: the caller's contract.
            Mode::StreamOrdered(stream) => unsafe { driver::mem_free_async(dptr, stream) },
        };
    }
}

impl Drop for CudaDeviceResource {
    fn drop(&mut self) {
        // The context and stream may be the caller's (a stream-ordered resource takes them from its
        // stream), this resource holding their last handles; in a forked child they must not be
        // released (see `keep_in_forked_child`).
        let generation = self.moved.generation();
        driver::keep_in_forked_child(&self.ctx, generation);
        if let Mode::StreamOrdered(stream) = &self.mode {
            driver::keep_in_forked_child(stream, generation);
        }
    }
}

// SAFETY: blocks from `cuMemAlloc` (or `cuMemAllocAsync`) in the resource's context, over-sized
// and offset where the driver's alignment falls short of the one asked for (`AlignedBlocks`),
// freed the same way from their base; device memory, which the resource says the CPU may not
// touch.
unsafe impl MemoryResource for CudaDeviceResource {
    fn name(&self) -> &str {
        match self.mode {
            Mode::Sync => "cuda-device",
            Mode::StreamOrdered(_) => "cuda-device-async",
        }
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Device
    }

    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let _bound = driver::bind(&self.ctx)?;
        let alloc = |n| self.raw_alloc(n);
        // SAFETY: a block freed here was allocated just before and never handed out.
        let free = |p| unsafe { self.raw_free(p) };
        self.moved.allocate(size, align, "cuMemAlloc", alloc, free)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _size: usize, align: usize) {
        // Without a context to bind the block is not freed: the context is gone, and so is its memory.
        let bind = || driver::bind(&self.ctx);
        // SAFETY: `deallocate`'s contract: the block came from `allocate` and is not used again.
        let free = |base| unsafe { self.raw_free(base) };
        self.moved.deallocate(ptr.as_ptr() as u64, align, bind, free);
    }
}

/// Flags for [`CudaPinnedResource`] (`CU_MEMHOSTALLOC_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PinnedFlags(pub u32);

impl PinnedFlags {
    /// Pinned for every CUDA context, not only the allocating one.
    pub const PORTABLE: PinnedFlags = PinnedFlags(sys::CU_MEMHOSTALLOC_PORTABLE);
    /// Mapped into the device's address space (kernels can use it; see
    /// [`CudaPinnedResource::device_address`]).
    pub const DEVICE_MAP: PinnedFlags = PinnedFlags(sys::CU_MEMHOSTALLOC_DEVICEMAP);
    /// Write-combined: faster for the device to read over PCIe, very slow for the CPU to read.
    /// Only for buffers the CPU writes and never reads.
    pub const WRITE_COMBINED: PinnedFlags = PinnedFlags(sys::CU_MEMHOSTALLOC_WRITECOMBINED);
}

impl std::ops::BitOr for PinnedFlags {
    type Output = PinnedFlags;
    fn bitor(self, rhs: PinnedFlags) -> PinnedFlags {
        PinnedFlags(self.0 | rhs.0)
    }
}

impl Default for PinnedFlags {
    /// Portable and device-mapped, **not** write-combined, so the CPU reads it at full speed.
    fn default() -> Self {
        PinnedFlags::PORTABLE | PinnedFlags::DEVICE_MAP
    }
}

/// Page-locked host memory from `cuMemHostAlloc` as a [`MemoryResource`]
/// ([`MemoryKind::PinnedHost`]): the upstream of pinned-memory pools. Copies between it and the
/// device run at full bus speed and asynchronously; the CPU reads and writes it as ordinary memory.
/// Blocks are host addresses, which are their device addresses too under unified addressing (every
/// 64-bit Linux process): pass them to cudarc with
/// [`DeviceView::from_block`](super::DeviceView::from_block).
///
/// # Errors
/// As [`CudaDeviceResource`]; out of pinnable memory is [`Error::OutOfMemory`].
#[derive(Debug)]
pub struct CudaPinnedResource {
    ctx: Arc<CudaContext>,
    flags: PinnedFlags,
    moved: AlignedBlocks,
}

/// The alignment assumed of every `cuMemHostAlloc` result (the driver promises no more; one that
/// falls short is refused); larger alignments are checked and arranged per block.
const HOST_ALLOC_ALIGN: usize = 16;

impl CudaPinnedResource {
    /// Pinned memory with the default flags (portable, device-mapped, not write-combined) for
    /// device `device`.
    pub fn new(device: usize) -> Result<Self> {
        Self::with_flags(device, PinnedFlags::default())
    }

    /// Pinned memory with `flags`.
    pub fn with_flags(device: usize, flags: PinnedFlags) -> Result<Self> {
        Ok(CudaPinnedResource { ctx: driver::context(device)?, flags, moved: AlignedBlocks::new(HOST_ALLOC_ALIGN) })
    }

    /// The flags blocks are allocated with.
    pub fn flags(&self) -> PinnedFlags {
        self.flags
    }

    /// The context blocks belong to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device address of a block (or of any address inside one), for kernels.
    ///
    /// # Errors
    /// [`Error::Gpu`] if `ptr` is not pinned memory mapped for the device (e.g. the resource's flags
    /// lack [`PinnedFlags::DEVICE_MAP`]).
    pub fn device_address(&self, ptr: NonNull<u8>) -> Result<u64> {
        let _bound = driver::bind(&self.ctx)?;
        driver::host_device_pointer(ptr.as_ptr().cast())
    }

    /// The flags the driver records for the pinned block holding `ptr`.
    pub fn block_flags(&self, ptr: NonNull<u8>) -> Result<PinnedFlags> {
        let _bound = driver::bind(&self.ctx)?;
        driver::host_get_flags(ptr.as_ptr().cast()).map(PinnedFlags)
    }
}

// SAFETY: blocks from `cuMemHostAlloc`, over-sized and offset where the driver's alignment falls
// short of the one asked for (`AlignedBlocks`): page-locked host memory the CPU may read and
// write, freed with `cuMemFreeHost` from their base.
unsafe impl MemoryResource for CudaPinnedResource {
    fn name(&self) -> &str {
        "cuda-pinned"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::PinnedHost
    }

    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let _bound = driver::bind(&self.ctx)?;
        let alloc = |n| driver::host_alloc(n, self.flags.0).map(|p| p as u64);
        let free = |p: u64| {
            // SAFETY: a block freed here was allocated just before and never handed out.
            let _ = unsafe { driver::free_host(p as *mut c_void) };
        };
        self.moved.allocate(size, align, "cuMemHostAlloc", alloc, free)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _size: usize, align: usize) {
        let bind = || driver::bind(&self.ctx);
        let free = |base: u64| {
            // SAFETY: `deallocate`'s contract: the block came from `allocate` and is not used again.
            let _ = unsafe { driver::free_host(base as *mut c_void) };
        };
        self.moved.deallocate(ptr.as_ptr() as u64, align, bind, free);
    }
}
