//! `HETMEM_NVRTC` naming a library that loads but is not NVRTC (here the C library, which every
//! process has mapped): NVRTC is reported unavailable, and compiling returns that error instead of
//! panicking inside cudarc's lookup.
//!
//! Its own test binary: the NVRTC state is loaded once per process, and the environment must be set
//! before anything reads it.

use hetmem_core::Error;
use hetmem_gpu::cuda::{compile_ptx_with, nvrtc_available, NVRTC_ENV};

/// The path of the C library this process has mapped.
fn libc_path() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .expect("the C library is mapped")
        .to_string()
}

#[test]
fn a_library_that_is_not_nvrtc_is_an_error_not_a_panic() {
    std::env::set_var(NVRTC_ENV, libc_path());
    let available = nvrtc_available();
    let compiled = std::panic::catch_unwind(|| compile_ptx_with("extern \"C\" __global__ void k() {}", &[]))
        .expect("compile_ptx_with panicked");
    // Also with a real NVRTC on the loader's path: the variable names the library to use, and
    // this one is not NVRTC.
    match available {
        Err(Error::Unsupported(why)) => {
            assert!(why.contains("HETMEM_NVRTC"), "{why}");
            assert!(matches!(compiled, Err(ref e) if matches!(e.error, Error::Unsupported(_))), "{compiled:?}");
        }
        other => panic!("expected Error::Unsupported naming HETMEM_NVRTC, got {other:?}"),
    }
}
