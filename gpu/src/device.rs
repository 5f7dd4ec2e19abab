//! Allocation inside GPU kernels: the C twin of hetmem-core's
//! [`BitmapAllocator`](hetmem_core::allocators::BitmapAllocator), for CUDA and HIP kernels.
//!
//! [`BITMAP_HEADER`] is `include/hetmem_bitmap.h`: the allocator's `#[repr(C)]` layout and its
//! two steps (claim a bit with one system-scope atomic or, release it with one atomic and). A
//! kernel allocates and frees in a heap that CPU threads and processes use too, when the heap
//! lives in memory both reach: a segment registered with the GPU (`CudaShmBackend`,
//! `RocmShmBackend`). The kernels of one device use it at the same time as each other, and CPU
//! threads and processes as each other; kernels and the CPU (or kernels of several devices) use
//! it at the same time only where the backend's `host_native_atomics()` is true for every device
//! involved (a link that carries atomics natively, as NVLink-C2C does; PCIe does not).
//! Elsewhere they take turns: the CPU allocates and frees before a kernel that uses the heap is
//! launched, or after it has finished. The header includes nothing, so NVRTC compiles it as it
//! is:
//!
//! ```text
//! let src = hetmem_gpu::device::with_bitmap_header(r#"
//!     extern "C" __global__ void k(unsigned char *base, unsigned long long region,
//!                                  unsigned long long region_len, unsigned long long *out) {
//!         hetmem_bitmap heap = { base, region, region_len };
//!         out[threadIdx.x] = hetmem_bitmap_alloc(heap, 64, 16, threadIdx.x);
//!     }"#);
//! let ptx = hetmem_gpu::cuda::compile_ptx_with(&src, &["--gpu-architecture=compute_90"])?;
//! ```
//!
//! A kernel is given the backend's device address (`device_ptr()`, the address of its byte 0) and
//! the allocator's region (`BitmapAllocator::region()`: `offset()` and `len()`, which the heap's
//! header must match); the offsets it gets are from the backend's start, as on the CPU, so either
//! side frees what the other allocated. The header's calls answer 0 (allocation) or a negative
//! code (free) where the Rust side returns an error; every offset they read from the heap is
//! checked against the region its caller named first.
//!
//! [`THREAD_HEADER`] (`include/hetmem_thread.h`) is the thread model on the device side: a
//! thread's index in the grid, a yield for spin loops, and a sleep (thread-local storage is a
//! kernel's own local variables).
//!
//! The bitmap header also builds as plain C on the host (GCC or Clang atomics): the crate's tests compile
//! it with the host compiler to check the layout against Rust's and to share one heap between a C
//! process and this allocator.

/// `include/hetmem_bitmap.h`: the device-side bitmap allocator (see the [module docs](self)).
pub const BITMAP_HEADER: &str = include_str!("../include/hetmem_bitmap.h");

/// The name to give the header where a compiler takes headers by name.
pub const BITMAP_HEADER_NAME: &str = "hetmem_bitmap.h";

/// `include/hetmem_thread.h`: thread ids, yield and sleep for kernels (see the [module docs](self)).
pub const THREAD_HEADER: &str = include_str!("../include/hetmem_thread.h");

/// `kernel` with the bitmap allocator's and the thread model's headers in front, ready for NVRTC
/// or hipRTC.
pub fn with_bitmap_header(kernel: &str) -> String {
    let mut src = String::with_capacity(BITMAP_HEADER.len() + THREAD_HEADER.len() + kernel.len() + 2);
    for part in [BITMAP_HEADER, THREAD_HEADER] {
        src.push_str(part);
        src.push('\n');
    }
    src.push_str(kernel);
    src
}
