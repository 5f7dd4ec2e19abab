//! With no CUDA driver (here forced by pointing `HETMEM_CUDA_DRIVER` and `HETMEM_NVRTC` at files
//! that do not exist, so the test means the same on machines with and without a GPU), every entry
//! point returns the documented error, leaves nothing behind, and never panics.
//!
//! One test function: the driver state is loaded once per process, and the environment must be
//! set before anything reads it.

use hetmem_backends::PosixShmBackend;
use hetmem_core::Error;
use hetmem_gpu::cuda::{
    compile_ptx_with, context, driver, nvrtc_available, CudaDeviceResource, CudaIpcBackend, CudaIpcOptions,
    CudaPinnedResource, CudaShmBackend, CudaShmOptions, DRIVER_ENV, NVRTC_ENV,
};

fn unsupported<T: std::fmt::Debug>(what: &str, r: hetmem_core::Result<T>) {
    match r {
        Err(Error::Unsupported(why)) => {
            assert!(why.contains("HETMEM_"), "{what}: the message names the variable: {why}")
        }
        other => panic!("{what}: expected Error::Unsupported, got {other:?}"),
    }
}

#[test]
fn without_a_driver_every_entry_point_says_unsupported() {
    std::env::set_var(DRIVER_ENV, "/nonexistent/hetmem/libcuda.so.1");
    std::env::set_var(NVRTC_ENV, "/nonexistent/hetmem/libnvrtc.so.13");

    unsupported("driver()", driver());
    unsupported("context(0)", context(0));
    let name = format!("/hetmem-nodrv-{}", std::process::id());
    unsupported("CudaShmBackend::create", CudaShmBackend::create(&name, 1 << 16, &CudaShmOptions::default()));
    assert!(!PosixShmBackend::exists(&name).unwrap(), "a failed create must not leave a segment behind");
    unsupported("CudaShmBackend::attach", CudaShmBackend::attach(&name, &CudaShmOptions::default()));
    unsupported("CudaIpcBackend::create", CudaIpcBackend::create(&name, 1 << 16, &CudaIpcOptions::default()));
    assert!(!PosixShmBackend::exists(&name).unwrap());
    unsupported("CudaIpcBackend::attach", CudaIpcBackend::attach(&name, &CudaIpcOptions::default()));
    unsupported("CudaDeviceResource::new", CudaDeviceResource::new(0));
    unsupported("CudaPinnedResource::new", CudaPinnedResource::new(0));

    unsupported("nvrtc_available", nvrtc_available());
    let compiled = compile_ptx_with("extern \"C\" __global__ void k() {}", &[]);
    unsupported("compile_ptx_with", compiled.map_err(Error::from));
    // Asking again gives the same answer (the state is cached, not retried into a panic).
    unsupported("driver() again", driver());
}
