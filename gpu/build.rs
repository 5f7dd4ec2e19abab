//! Turns the `cuda` and `rocm` features into the cfg aliases `hetmem_cuda` and `hetmem_rocm`, set
//! only where the support exists (Linux: the pinned backends are POSIX shared memory), so a feature
//! enabled on another OS builds and does nothing, and the code never spells out the combination.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(hetmem_cuda, hetmem_rocm)");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo::rustc-cfg=hetmem_cuda");
    }
    if linux && std::env::var_os("CARGO_FEATURE_ROCM").is_some() {
        println!("cargo::rustc-cfg=hetmem_rocm");
    }
}
