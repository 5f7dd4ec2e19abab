//! NVRTC needs no GPU: where its library is installed (CI installs the `nvidia-cuda-nvrtc-cu12`
//! wheel and sets `HETMEM_NVRTC`), the GPU tests' kernels are compiled here, and bad source gives
//! the compiler's log. Without the library the test says so and passes: `cuda_no_driver` covers
//! that path.

mod support;

use hetmem_core::Error;
use hetmem_gpu::cuda::{compile_ptx_with, nvrtc_available};

#[test]
fn kernels_compile_to_ptx_and_errors_carry_the_log() {
    if let Err(e) = nvrtc_available() {
        println!("skipped: {e}");
        return;
    }
    let ptx = compile_ptx_with(support::KERNELS, &["--gpu-architecture=compute_90"]).expect("the test kernels compile");
    let text = ptx.to_src();
    assert!(text.contains(".entry fill") && text.contains(".entry copy_u32"), "{text}");
    assert!(text.contains(".target sm_90"), "compiled for the architecture asked for");

    let broken = compile_ptx_with("extern \"C\" __global__ void k() { undeclared = 1; }", &[]).unwrap_err();
    assert!(matches!(broken.error, Error::Gpu { call: "nvrtcCompileProgram", .. }), "{broken}");
    assert!(broken.log.contains("undeclared"), "the log names the error: {}", broken.log);

    let bad_option = compile_ptx_with(support::KERNELS, &["--no-such-option"]).unwrap_err();
    assert!(matches!(bad_option.error, Error::Gpu { .. }), "{bad_option}");
    let nul = compile_ptx_with("extern \"C\" __global__ void k() {}\0", &[]).unwrap_err();
    assert!(matches!(nul.error, Error::InvalidName { .. }), "{nul}");
}

/// The device-side bitmap allocator and thread model compile for the GPU as they are (no
/// includes, system-scope atomics), into kernels that allocate, write and free, and sleep.
#[test]
fn the_bitmap_allocator_header_compiles_into_kernels() {
    if let Err(e) = nvrtc_available() {
        println!("skipped: {e}");
        return;
    }
    let src = hetmem_gpu::device::with_bitmap_header(support::BITMAP_KERNELS);
    let ptx = compile_ptx_with(&src, &["--gpu-architecture=compute_90"]).unwrap_or_else(|e| panic!("{e}\n{}", e.log));
    let text = ptx.to_src();
    assert!(text.contains(".entry bitmap_alloc_free") && text.contains(".entry thread_ids"), "{text}");
    assert!(text.contains("nanosleep"), "the thread model's sleep:\n{text}");
    // The bits are claimed and released with system-scope atomics (CPU processes share the heap).
    assert!(text.contains("atom.global.sys.or.b64"), "no system-scope or:\n{text}");
    assert!(text.contains("atom.global.sys.and.b64"), "no system-scope and:\n{text}");
    assert!(text.contains("membar.sys"), "no system fences:\n{text}");
}
