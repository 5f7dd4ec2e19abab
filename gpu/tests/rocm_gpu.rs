//! ROCm tests that need an AMD GPU. Without one (CI: `hipGetDeviceCount` answers
//! `hipErrorNoDevice`) every test is skipped with the reason printed; `rocm_no_device` covers that
//! path. The cross-process test runs this binary again as the second process.

mod support;

use std::ffi::c_void;
use std::process::ExitCode;

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::header::HEADER_SIZE;
use hetmem_core::pool::{QuickPool, QuickPoolConfig};
use hetmem_core::{BackendKind, Error, MemoryBackend, MemoryKind, MemoryResource};
use hetmem_gpu::rocm::hip_sys::hiprt::{self, hipError_t, hipMemcpyKind};
use hetmem_gpu::rocm::{runtime, RocmDeviceResource, RocmShmBackend, RocmShmOptions};
use support::{check_pattern, ensure, pattern, unique};

const SUITE: &str = "rocm_gpu";
const N: usize = 1 << 16;

fn main() -> ExitCode {
    if let Some(code) = support::run_as_child(run_child) {
        return code;
    }
    if let Err(e) = runtime() {
        return support::skip(SUITE, &format!("no usable HIP device: {e}"));
    }
    support::run(
        SUITE,
        &[
            ("shm_registration_and_copies", shm_registration_and_copies),
            ("shm_device_writes_seen_by_second_process", shm_device_writes_seen_by_second_process),
            ("device_resource_blocks", device_resource_blocks),
            ("device_pool_round_trip", device_pool_round_trip),
        ],
    )
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// `hipMemcpy` of `bytes` bytes.
fn copy(dst: u64, src: u64, bytes: usize, kind: hipMemcpyKind) -> Result<(), String> {
    // SAFETY: every caller passes ranges of `bytes` bytes it owns, in the memory `kind` names.
    let code = unsafe { hiprt::hipMemcpy(dst as *mut c_void, src as *const c_void, bytes, kind) };
    ensure(code == hipError_t::hipSuccess, || format!("hipMemcpy: {code:?}"))
}

fn to_device(dst: u64, src: &[u32]) -> Result<(), String> {
    copy(dst, src.as_ptr() as u64, 4 * src.len(), hipMemcpyKind::hipMemcpyHostToDevice)
}

fn from_device(src: u64, n: usize) -> Result<Vec<u32>, String> {
    let mut out = vec![0u32; n];
    copy(out.as_mut_ptr() as u64, src, 4 * n, hipMemcpyKind::hipMemcpyDeviceToHost)?;
    Ok(out)
}

fn data(backend: &dyn MemoryBackend, words_in: usize) -> *mut u32 {
    // SAFETY: every caller stays inside the data area of `backend`.
    unsafe { backend.base().add(HEADER_SIZE as usize + 4 * words_in).cast() }
}

fn shm_registration_and_copies() -> Result<(), String> {
    let shm = RocmShmBackend::create(&unique("reg"), 8 * N, &RocmShmOptions::default()).map_err(s)?;
    ensure(shm.kind() == BackendKind::Pinned, || "kind is not Pinned".into())?;
    ensure(shm.device_ptr().is_some_and(|p| p != 0), || "no device pointer".into())?;
    let src: Vec<u32> = (0..N as u32).map(|i| pattern(i, 1)).collect();
    to_device(shm.device_address(HEADER_SIZE, 4 * N).map_err(s)?, &src)?;
    // SAFETY: the copy finished; the data area holds N u32s.
    check_pattern(unsafe { std::slice::from_raw_parts(data(&shm, 0), N) }, 1)?;
    for i in 0..N {
        // SAFETY: inside the data area's second half.
        unsafe { data(&shm, N).add(i).write(pattern(i as u32, 2)) };
    }
    let second = shm.device_address(HEADER_SIZE + 4 * N as u64, 4 * N).map_err(s)?;
    check_pattern(&from_device(second, N)?, 2)?;
    let past = shm.device_address(HEADER_SIZE + 4 * N as u64, 4 * N + 1);
    ensure(matches!(past, Err(Error::OutOfBounds { .. })), || format!("past the end: {past:?}"))
}

fn shm_device_writes_seen_by_second_process() -> Result<(), String> {
    let name = unique("xproc");
    let shm = RocmShmBackend::create(&name, 8 * N, &RocmShmOptions::default()).map_err(s)?;
    let src: Vec<u32> = (0..N as u32).map(|i| pattern(i, 3)).collect();
    to_device(shm.device_address(HEADER_SIZE, 4 * N).map_err(s)?, &src)?;
    support::child("shm-peer", std::slice::from_ref(&name))?;
    // SAFETY: the child exited; it wrote the second half through its own registration.
    check_pattern(unsafe { std::slice::from_raw_parts(data(&shm, N), N) }, 4)
}

fn device_resource_blocks() -> Result<(), String> {
    let res = RocmDeviceResource::new(0).map_err(s)?;
    ensure(res.kind() == MemoryKind::Device, || "not device memory".into())?;
    let zero = res.allocate(0, 8);
    ensure(matches!(zero, Err(Error::InvalidSize { .. })), || format!("size 0: {zero:?}"))?;
    let mut blocks = Vec::new();
    for (k, (size, align)) in [(4096usize, 8usize), (12344, 4096), (1 << 20, 1 << 20)].into_iter().enumerate() {
        let block = res.allocate(size, align).map_err(s)?;
        ensure(block.as_ptr() as usize % align == 0, || format!("{block:?} not aligned to {align}"))?;
        let src: Vec<u32> = (0..(size / 4) as u32).map(|i| pattern(i, k as u32)).collect();
        to_device(block.as_ptr() as u64, &src)?;
        blocks.push((block, size, align, k as u32));
    }
    for (block, size, align, seed) in blocks {
        check_pattern(&from_device(block.as_ptr() as u64, size / 4)?, seed)?;
        // SAFETY: from `allocate` with this size and alignment.
        unsafe { res.deallocate(block, size, align) };
    }
    support::out_of_memory_leaves_it_usable(&res, 1 << 46)?;
    Ok(())
}

fn device_pool_round_trip() -> Result<(), String> {
    let config = QuickPoolConfig { first_block_size: 4 << 20, next_block_size: 1 << 20, ..Default::default() };
    let mut pool = QuickPool::with_config(RocmDeviceResource::new(0).map_err(s)?, config).map_err(s)?;
    let mut live = Vec::new();
    for k in 0..64u32 {
        let words = 1 + (k as usize * 977) % 20_000;
        let block = pool.allocate(4 * words, 256).map_err(s)?;
        let src: Vec<u32> = (0..words as u32).map(|i| pattern(i, k)).collect();
        to_device(block.as_ptr() as u64, &src)?;
        live.push((block, words, k));
        pool.check().map_err(s)?;
    }
    for (block, words, k) in live {
        check_pattern(&from_device(block.as_ptr() as u64, words)?, k)?;
        pool.deallocate(block).map_err(s)?;
        pool.check().map_err(s)?;
    }
    ensure(pool.stats().allocation_count == 0, || "allocations left".into())
}

fn run_child(role: &str, args: &[String]) -> Result<(), String> {
    let name = args.first().ok_or("missing segment name")?;
    match role {
        "shm-peer" => {
            let plain = PosixShmBackend::attach_kind(name, &ShmOptions::default(), BackendKind::Pinned).map_err(s)?;
            // SAFETY: the parent's copy finished before it started this process.
            check_pattern(unsafe { std::slice::from_raw_parts(data(&plain, 0), N) }, 3)?;
            drop(plain);
            let shm = RocmShmBackend::attach(name, &RocmShmOptions::default()).map_err(s)?;
            let src: Vec<u32> = (0..N as u32).map(|i| pattern(i, 4)).collect();
            to_device(shm.device_address(HEADER_SIZE + 4 * N as u64, 4 * N).map_err(s)?, &src)
        }
        other => Err(format!("unknown child role {other}")),
    }
}
