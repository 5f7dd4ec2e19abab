//! CUDA tests that need a GPU. Without a usable driver and device every test is skipped with the
//! reason printed (CI); `ci/gpu-check.sh --on-device` runs them on a GPU machine.
//!
//! The cross-process tests run this binary again as the second process (`--child ROLE ...`).

mod support;

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::header::HEADER_SIZE;
use hetmem_core::pool::{
    BlocksReleasable, CoalesceHeuristic, LimitedResource, NeverCoalesce, PercentReleasable, PoolModel, PoolStats,
    QuickPool, QuickPoolConfig,
};
use hetmem_core::{BackendKind, Error, MemoryBackend, MemoryKind, MemoryResource};
use hetmem_gpu::cuda::cudarc::driver::sys::{self, CUresult};
use hetmem_gpu::cuda::cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use hetmem_gpu::cuda::{
    compile_ptx, context, CudaDeviceResource, CudaIpcBackend, CudaIpcOptions, CudaPinnedResource, CudaShmBackend,
    CudaShmOptions, DeviceView, PinnedFlags,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use support::{check_pattern, ensure, pattern, unique, BITMAP_KERNELS, KERNELS};

const SUITE: &str = "cuda_gpu";

fn main() -> ExitCode {
    if let Some(code) = support::run_as_child(run_child) {
        return code;
    }
    let ctx = match context(0) {
        Ok(ctx) => ctx,
        Err(e) => return support::skip(SUITE, &format!("no usable CUDA device: {e}")),
    };
    let driver = hetmem_gpu::cuda::driver().map(|d| d.version).unwrap_or(0);
    println!("device 0: {} (driver API {driver})", ctx.name().unwrap_or_default());
    support::run(
        SUITE,
        &[
            ("shm_registration_and_copies", shm_registration_and_copies),
            ("shm_kernel_writes_seen_by_second_process", shm_kernel_writes_seen_by_second_process),
            ("shm_read_only_registration", shm_read_only_registration),
            ("shm_bad_input_is_refused", shm_bad_input_is_refused),
            ("ipc_backend_opened_by_second_process", ipc_backend_opened_by_second_process),
            ("device_resource_blocks", || device_resource_blocks(CudaDeviceResource::new(0).map_err(s)?)),
            ("device_resource_stream_ordered_blocks", || {
                let stream = context(0).map_err(s)?.new_stream().map_err(s)?;
                device_resource_blocks(CudaDeviceResource::stream_ordered(stream).map_err(s)?)
            }),
            ("pinned_resource_blocks", pinned_resource_blocks),
            ("bitmap_allocator_shared_by_kernels_and_the_cpu", bitmap_allocator_shared_by_kernels_and_the_cpu),
            ("device_thread_model", device_thread_model),
            ("device_pool_matches_its_model", || device_pool_matches_its_model(CudaDeviceResource::new(0).map_err(s)?)),
            ("device_pool_stream_ordered_matches_its_model", || {
                let stream = context(0).map_err(s)?.new_stream().map_err(s)?;
                device_pool_matches_its_model(CudaDeviceResource::stream_ordered(stream).map_err(s)?)
            }),
            (
                "calls_leave_the_callers_current_context_as_they_found_it",
                calls_leave_the_callers_current_context_as_they_found_it,
            ),
            (
                "ipc_attacher_killed_while_attached_does_not_keep_the_memory",
                ipc_attacher_killed_while_attached_does_not_keep_the_memory,
            ),
            (
                "forked_child_leaves_the_driver_and_the_parents_memory_alone",
                forked_child_leaves_the_driver_and_the_parents_memory_alone,
            ),
        ],
    )
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

struct Kernels {
    fill: CudaFunction,
    copy: CudaFunction,
}

fn kernels(ctx: &Arc<CudaContext>) -> Result<&'static Kernels, String> {
    static KERNELS_LOADED: OnceLock<Kernels> = OnceLock::new();
    if let Some(k) = KERNELS_LOADED.get() {
        return Ok(k);
    }
    let ptx = compile_ptx(ctx, KERNELS, &[]).map_err(s)?;
    let module = ctx.load_module(ptx).map_err(s)?;
    let k =
        Kernels { fill: module.load_function("fill").map_err(s)?, copy: module.load_function("copy_u32").map_err(s)? };
    Ok(KERNELS_LOADED.get_or_init(|| k))
}

/// Runs `fill` over `out` on `stream` and waits for it.
fn fill(stream: &Arc<CudaStream>, out: &DeviceView<'_, u32>, seed: u32) -> Result<(), String> {
    let k = kernels(stream.context())?;
    let n = out.len() as u32;
    let mut launch = stream.launch_builder(&k.fill);
    launch.arg(out.kernel_arg()).arg(&n).arg(&seed);
    // SAFETY: `fill` writes `n` u32s through its first argument, which `out` covers.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.map_err(s)?;
    stream.synchronize().map_err(s)
}

/// Copies `view` back and checks it against the pattern for `seed`.
fn check_device(stream: &Arc<CudaStream>, view: &DeviceView<'_, u32>, seed: u32) -> Result<(), String> {
    let mut back = vec![0u32; view.len()];
    stream.memcpy_dtoh(view, &mut back).map_err(s)?;
    stream.synchronize().map_err(s)?;
    check_pattern(&back, seed)
}

/// Checks `n` u32s at `addr` (host memory) against the pattern for `seed`.
///
/// # Safety
/// `addr` is readable for `n` u32s that nobody writes meanwhile.
unsafe fn check_host(addr: *const u32, n: usize, seed: u32) -> Result<(), String> {
    // SAFETY: the caller's contract.
    check_pattern(unsafe { std::slice::from_raw_parts(addr, n) }, seed)
}

fn shm_registration_and_copies() -> Result<(), String> {
    let shm = CudaShmBackend::create(&unique("reg"), 1 << 20, &CudaShmOptions::default()).map_err(s)?;
    ensure(shm.kind() == BackendKind::Pinned, || "kind is not Pinned".into())?;
    let dptr = shm.device_ptr().ok_or("no device pointer")?;
    ensure(dptr != 0, || "device pointer 0".into())?;
    let stream = shm.context().default_stream();
    let n = 4096;
    let src: Vec<u32> = (0..n as u32).map(|i| pattern(i, 11)).collect();
    let mut view = shm.device_view::<u32>(HEADER_SIZE, n, &stream).map_err(s)?;
    stream.memcpy_htod(&src, &mut view).map_err(s)?; // device-side write into the shared segment
    stream.synchronize().map_err(s)?;
    // SAFETY: the data area holds `n` u32s at HEADER_SIZE, written by the finished copy.
    unsafe { check_host(shm.base().add(HEADER_SIZE as usize).cast(), n, 11)? };
    // And the other way: the CPU writes, the device reads through the same mapping.
    // SAFETY: nothing else touches this range while the slice lives.
    let host = unsafe { shm.host_slice_mut::<u32>(HEADER_SIZE + 4 * n as u64, n) }.map_err(s)?;
    for (i, x) in host.iter_mut().enumerate() {
        *x = pattern(i as u32, 12);
    }
    let view = shm.device_view::<u32>(HEADER_SIZE + 4 * n as u64, n, &stream).map_err(s)?;
    check_device(&stream, &view, 12)
}

const CROSS_N: usize = 1 << 20;

fn shm_kernel_writes_seen_by_second_process() -> Result<(), String> {
    let name = unique("xproc");
    let shm = CudaShmBackend::create(&name, 2 * 4 * CROSS_N, &CudaShmOptions::default()).map_err(s)?;
    let stream = shm.context().default_stream();
    let first = shm.device_view::<u32>(HEADER_SIZE, CROSS_N, &stream).map_err(s)?;
    fill(&stream, &first, 0xA5A5)?;
    // SAFETY: the kernel finished; nothing writes the first half now.
    unsafe { check_host(shm.base().add(HEADER_SIZE as usize).cast(), CROSS_N, 0xA5A5)? };
    support::child("shm-reader", std::slice::from_ref(&name))?;
    // The child's kernel wrote the second half through its own registration of the segment.
    // SAFETY: the child exited; nothing writes the second half now.
    unsafe { check_host(shm.base().add(HEADER_SIZE as usize + 4 * CROSS_N).cast(), CROSS_N, 0x5A5A) }
}

/// A bitmap allocator in a pinned shared segment: the CPU allocates a block, 4096 kernel threads
/// allocate (system-scope atomics on the same bitmaps), fill, and free half of their blocks; the
/// CPU then checks every kept block and frees it. A CPU thread allocates and frees beside the
/// kernel where the device's link carries host atomics (`host_native_atomics`), and before and
/// after it elsewhere (PCIe), where a device atomic is not atomic against the CPU's
/// (`HETMEM_CPU_BESIDE_KERNEL=1` runs it beside the kernel there too).
fn bitmap_allocator_shared_by_kernels_and_the_cpu() -> Result<(), String> {
    use hetmem_core::allocators::{BitmapAllocator, BitmapConfig};
    use hetmem_core::{AllocatorId, AllocatorType, OffsetPtr, RegionAllocator};
    let shm = Arc::new(CudaShmBackend::create(&unique("bitmap"), 32 << 20, &CudaShmOptions::default()).map_err(s)?);
    let backend: Arc<dyn MemoryBackend> = shm.clone();
    // SAFETY: the test's own segment, which only this allocator (and the kernels it serves) use.
    let region = unsafe { hetmem_core::region::Region::whole(backend) }.map_err(s)?;
    let config = BitmapConfig { min_block: 16, max_block: 4096 };
    let a = BitmapAllocator::create(region, AllocatorId::new(1, 0), &config).map_err(s)?;
    let start = a.stats();
    let cpu = a.allocate(100, 8).map_err(s)?;
    let ctx = shm.context();
    let stream = ctx.default_stream();
    let src = hetmem_gpu::device::with_bitmap_header(BITMAP_KERNELS);
    let module = ctx.load_module(compile_ptx(ctx, &src, &[]).map_err(s)?).map_err(s)?;
    let kernel = module.load_function("bitmap_alloc_free").map_err(s)?;
    let n = 4096u32;
    let sizes: Vec<u32> = (0..n).map(|i| 1 + (i * 37) % 2000).collect();
    let keep: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
    let d_sizes = stream.clone_htod(&sizes).map_err(s)?;
    let d_keep = stream.clone_htod(&keep).map_err(s)?;
    let mut d_offsets = stream.alloc_zeros::<u64>(n as usize).map_err(s)?;
    let mut d_status = stream.alloc_zeros::<i32>(n as usize).map_err(s)?;
    let base = shm.device_ptr().ok_or("no device pointer")?;
    let (region, region_len) = (a.region().offset(), a.region().len());
    let stop = std::sync::atomic::AtomicBool::new(false);
    /// Rounds of the CPU's turns before and after the kernel (over PCIe).
    const TURN: u64 = 20_000;
    // `stop` ends only the thread beside the kernel: the turns before and after it run in full
    // (the one after runs once `stop` is set).
    let churn = |limit: u64, beside_the_kernel: bool| -> Result<u64, String> {
        let mut rounds = 0;
        while rounds < limit && !(beside_the_kernel && stop.load(std::sync::atomic::Ordering::Relaxed)) {
            let p = a.allocate(1 + rounds as usize % 3000, 16).map_err(s)?;
            a.free(p).map_err(s)?;
            rounds += 1;
        }
        Ok(rounds)
    };
    // HETMEM_CPU_BESIDE_KERNEL=1 runs the CPU thread beside the kernel on any link: over PCIe
    // that shows the failure the turns avoid.
    let beside = shm.host_native_atomics() || std::env::var_os("HETMEM_CPU_BESIDE_KERNEL").is_some_and(|v| v == "1");
    if !beside {
        println!(
            "    no host-native atomics on this link: the CPU allocates before and after the kernel, not beside it"
        );
        let before = churn(TURN, false)?;
        ensure(before == TURN, || format!("the CPU's turn before the kernel ran {before} of {TURN} rounds"))?;
    }
    let (offsets, status) = std::thread::scope(|scope| -> Result<_, String> {
        let cpu_side = scope.spawn(|| if beside { churn(u64::MAX, true) } else { Ok(0) });
        let mut launch = stream.launch_builder(&kernel);
        launch
            .arg(&base)
            .arg(&region)
            .arg(&region_len)
            .arg(&d_sizes)
            .arg(&d_keep)
            .arg(&mut d_offsets)
            .arg(&mut d_status)
            .arg(&n);
        // SAFETY: the kernel reads `n` sizes and flags, writes `n` offsets and statuses, and works
        // in the bitmap allocator's region of the registered segment through its device address.
        let launched = unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.map_err(s);
        let done = launched.and_then(|_| stream.synchronize().map_err(s));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = cpu_side.join().map_err(|_| "the CPU thread panicked".to_string())??;
        done?;
        if beside {
            println!("    the CPU allocated and freed {rounds} blocks while the kernel ran");
        } else {
            let after = churn(TURN, false)?;
            ensure(after == TURN, || format!("the CPU's turn after the kernel ran {after} of {TURN} rounds"))?;
        }
        Ok((stream.clone_dtoh(&d_offsets).map_err(s)?, stream.clone_dtoh(&d_status).map_err(s)?))
    })?;
    let mut kept = std::collections::HashSet::new();
    for i in 0..n as usize {
        let (off, size) = (offsets[i], sizes[i] as usize);
        ensure(off != 0 && off % 16 == 0, || format!("thread {i} got offset {off}"))?;
        ensure(status[i] == i32::from(keep[i]), || format!("thread {i}: status {}", status[i]))?;
        if keep[i] == 1 {
            ensure(kept.insert(off) && off != cpu.get(), || format!("block {off} handed out twice"))?;
            ensure(a.size_of(OffsetPtr::new(off)).map_err(s)? == size, || format!("size of {off}"))?;
            // SAFETY: a live block of `size` bytes in the mapped segment; the kernel has finished.
            let bytes = unsafe { std::slice::from_raw_parts(shm.base().add(off as usize), size) };
            ensure(bytes.iter().all(|&b| b == i as u8), || format!("block {off} of thread {i} overwritten"))?;
        }
    }
    a.check().map_err(s)?;
    for off in kept {
        a.free(OffsetPtr::new(off)).map_err(s)?;
    }
    a.free(cpu).map_err(s)?;
    a.check().map_err(s)?;
    let end = a.stats();
    ensure(end.free_bytes() == start.free_bytes() && end.live_allocations == 0, || format!("{end:?}"))
}

/// The device-side thread model (`include/hetmem_thread.h`): over a 3-D grid, every thread gets
/// a distinct index below the thread count, after a yield and a short sleep.
fn device_thread_model() -> Result<(), String> {
    let ctx = context(0).map_err(s)?;
    let stream = ctx.default_stream();
    let src = hetmem_gpu::device::with_bitmap_header(BITMAP_KERNELS);
    let module = ctx.load_module(compile_ptx(&ctx, &src, &[]).map_err(s)?).map_err(s)?;
    let kernel = module.load_function("thread_ids").map_err(s)?;
    let config = LaunchConfig { grid_dim: (4, 2, 3), block_dim: (32, 2, 2), shared_mem_bytes: 0 };
    let n = 4 * 2 * 3 * 32 * 2 * 2;
    let mut ids = stream.alloc_zeros::<u64>(n).map_err(s)?;
    let mut count = stream.alloc_zeros::<u64>(1).map_err(s)?;
    let sleep_us = 10u32;
    let mut launch = stream.launch_builder(&kernel);
    launch.arg(&mut ids).arg(&mut count).arg(&sleep_us);
    // SAFETY: `thread_ids` writes one u64 per thread of the grid into `ids` (n of them) and one
    // into `count`.
    unsafe { launch.launch(config) }.map_err(s)?;
    let ids = stream.clone_dtoh(&ids).map_err(s)?;
    let count = stream.clone_dtoh(&count).map_err(s)?;
    ensure(count[0] == n as u64, || format!("thread count {} for {n} threads", count[0]))?;
    ensure(ids.iter().enumerate().all(|(i, &id)| id == i as u64), || "thread ids are not 0..n".into())
}

fn shm_read_only_registration() -> Result<(), String> {
    let options = CudaShmOptions { device_read_only: true, ..Default::default() };
    let shm = CudaShmBackend::create(&unique("ro"), 1 << 20, &options).map_err(s)?;
    let stream = shm.context().default_stream();
    let n = 1024;
    // SAFETY: nothing else touches this range while the slice lives.
    let host = unsafe { shm.host_slice_mut::<u32>(HEADER_SIZE, n) }.map_err(s)?;
    for (i, x) in host.iter_mut().enumerate() {
        *x = pattern(i as u32, 3);
    }
    // A kernel reads the (read-only for it) segment into device memory. A writable view is
    // refused where the registration is read-only; a read-only view is taken either way.
    let writable = shm.device_view::<u32>(HEADER_SIZE, n, &stream);
    ensure(writable.is_err() == shm.device_read_only(), || format!("device_view: {:?}", writable.err()))?;
    let input = shm.read_only_view::<u32>(HEADER_SIZE, n, &stream).map_err(s)?;
    let mut out = stream.alloc_zeros::<u32>(n).map_err(s)?;
    let k = kernels(shm.context())?;
    let count = n as u32;
    let mut launch = stream.launch_builder(&k.copy);
    launch.arg(&mut out).arg(input.kernel_arg()).arg(&count);
    // SAFETY: `copy_u32` reads `n` u32s from the segment and writes `n` into `out`.
    unsafe { launch.launch(LaunchConfig::for_num_elems(count)) }.map_err(s)?;
    let back = stream.clone_dtoh(&out).map_err(s)?;
    check_pattern(&back, 3)?;
    println!("    read-only registration supported by this device: {}", shm.device_read_only());
    Ok(())
}

fn shm_bad_input_is_refused() -> Result<(), String> {
    let quick = CudaShmOptions {
        shm: ShmOptions { attach_timeout: std::time::Duration::from_millis(50), ..Default::default() },
        ..Default::default()
    };
    let missing = CudaShmBackend::attach(&unique("missing"), &quick);
    ensure(matches!(missing, Err(Error::NotFound { .. })), || format!("attach of a missing segment: {missing:?}"))?;
    let plain_name = unique("plain");
    let _plain = PosixShmBackend::create(&plain_name, 4096, &quick.shm).map_err(s)?;
    let wrong = CudaShmBackend::attach(&plain_name, &quick);
    ensure(matches!(wrong, Err(Error::HeaderMismatch { field: "kind", .. })), || format!("{wrong:?}"))?;
    let no_device =
        CudaShmBackend::create(&unique("nodev"), 4096, &CudaShmOptions { device: 999, ..Default::default() });
    ensure(matches!(no_device, Err(Error::NotFound { .. })), || format!("device 999: {no_device:?}"))?;
    ensure(!PosixShmBackend::exists(&unique("nodev")).map_err(s)?, || "a failed create left its segment".into())?;
    let shm = CudaShmBackend::create(&unique("bounds"), 4096, &quick).map_err(s)?;
    let stream = shm.context().default_stream();
    let r = shm.device_view::<u32>(HEADER_SIZE, 1025, &stream);
    ensure(matches!(r, Err(Error::OutOfBounds { .. })), || format!("past the end: {r:?}"))?;
    let r = shm.device_view::<u32>(0, 1, &stream);
    ensure(matches!(r, Err(Error::OutOfBounds { .. })), || format!("in the header: {r:?}"))?;
    let r = shm.device_view::<u32>(HEADER_SIZE + 2, 1, &stream);
    ensure(matches!(r, Err(Error::InvalidAlignment { .. })), || format!("misaligned: {r:?}"))?;
    Ok(())
}

const IPC_N: usize = 1 << 20;

fn ipc_backend_opened_by_second_process() -> Result<(), String> {
    let name = unique("ipc");
    let ipc = CudaIpcBackend::create(&name, 2 * 4 * IPC_N, &CudaIpcOptions::default()).map_err(s)?;
    ensure(ipc.kind() == BackendKind::Device && !ipc.host_accessible(), || "not device memory".into())?;
    let stream = ipc.context().default_stream();
    let src: Vec<u32> = (0..IPC_N as u32).map(|i| pattern(i, 0x1234)).collect();
    let mut first = ipc.device_view::<u32>(HEADER_SIZE, IPC_N, &stream).map_err(s)?;
    stream.memcpy_htod(&src, &mut first).map_err(s)?;
    stream.synchronize().map_err(s)?;
    let same = CudaIpcBackend::attach(&name, &CudaIpcOptions::default());
    ensure(matches!(same, Err(Error::Unsupported(_))), || format!("attach in the creating process: {same:?}"))?;
    support::child("ipc-peer", std::slice::from_ref(&name))?;
    ensure(ipc.attached() == 0, || format!("{} processes still attached after the child exited", ipc.attached()))?;
    let second = ipc.device_view::<u32>(HEADER_SIZE + 4 * IPC_N as u64, IPC_N, &stream).map_err(s)?;
    check_device(&stream, &second, 0x4321)
}

/// The same checks for every device resource: layouts, alignment, round trips through the
/// blocks, out of memory leaving the resource usable.
fn device_resource_blocks(res: CudaDeviceResource) -> Result<(), String> {
    ensure(res.kind() == MemoryKind::Device && !res.host_accessible(), || "not device memory".into())?;
    let stream = match res.stream() {
        Some(stream) => stream.clone(),
        None => res.context().default_stream(),
    };
    let zero = res.allocate(0, 8);
    ensure(matches!(zero, Err(Error::InvalidSize { .. })), || format!("size 0: {zero:?}"))?;
    let bad = res.allocate(64, 3);
    ensure(matches!(bad, Err(Error::InvalidAlignment { .. })), || format!("align 3: {bad:?}"))?;
    let mut blocks = Vec::new();
    for (size, align) in [(1usize, 1usize), (1000, 8), (4096, 256), (12345, 4096), (1 << 20, 1 << 20), (3 << 20, 64)] {
        let block = res.allocate(size, align).map_err(s)?;
        ensure(block.as_ptr() as usize % align == 0, || format!("block {block:?} not aligned to {align}"))?;
        blocks.push((block, size, align));
    }
    // Fill every block, then check every block: no block's writes reached another.
    for (k, &(block, size, _)) in blocks.iter().enumerate() {
        device_fill(&stream, block, size, k as u32)?;
    }
    for (k, (block, size, align)) in blocks.into_iter().enumerate() {
        device_verify(&stream, block, size, k as u32)?;
        // SAFETY: each block came from `allocate` with this size and alignment, freed once.
        unsafe { res.deallocate(block, size, align) };
    }
    let (_, total) = res.context().mem_get_info().map_err(s)?;
    support::out_of_memory_leaves_it_usable(&res, 4 * total)?;
    stream.synchronize().map_err(s)
}

fn pinned_resource_blocks() -> Result<(), String> {
    let res = CudaPinnedResource::new(0).map_err(s)?;
    ensure(res.kind() == MemoryKind::PinnedHost && res.host_accessible(), || "not pinned host memory".into())?;
    let n = 1 << 16;
    let block = res.allocate(4 * n, 4096).map_err(s)?;
    ensure(block.as_ptr() as usize % 4096 == 0, || "block not page-aligned".into())?;
    let flags = res.block_flags(block).map_err(s)?;
    ensure(flags.0 & PinnedFlags::WRITE_COMBINED.0 == 0, || format!("default blocks are write-combined: {flags:?}"))?;
    ensure(flags.0 & PinnedFlags::DEVICE_MAP.0 != 0, || format!("default blocks are not device-mapped: {flags:?}"))?;
    let stream = res.context().default_stream();
    let address = res.device_address(block).map_err(s)?;
    // SAFETY: the block is pinned and device-mapped, `4n` bytes, used by this view only.
    let view = unsafe { DeviceView::<u32>::from_raw(address, n, &stream) };
    fill(&stream, &view, 77)?;
    // SAFETY: the kernel finished; the block holds `n` u32s.
    unsafe { check_host(block.as_ptr().cast(), n, 77)? };
    // SAFETY: from `allocate` with this size and alignment.
    unsafe { res.deallocate(block, 4 * n, 4096) };

    // Over-aligned blocks: aligned, and the CPU can use all of them.
    let block = res.allocate(1 << 20, 1 << 16).map_err(s)?;
    ensure(block.as_ptr() as usize % (1 << 16) == 0, || "over-aligned block misaligned".into())?;
    // SAFETY: a live host block of 1 MiB.
    unsafe { std::ptr::write_bytes(block.as_ptr(), 0xEE, 1 << 20) };
    // SAFETY: from `allocate` with this size and alignment.
    unsafe { res.deallocate(block, 1 << 20, 1 << 16) };

    let wc = CudaPinnedResource::with_flags(0, PinnedFlags::WRITE_COMBINED | PinnedFlags::PORTABLE).map_err(s)?;
    let block = wc.allocate(1 << 20, 4096).map_err(s)?;
    let flags = wc.block_flags(block).map_err(s)?;
    ensure(flags.0 & PinnedFlags::WRITE_COMBINED.0 != 0, || format!("asked-for write-combining missing: {flags:?}"))?;
    // SAFETY: from `allocate` with this size and alignment.
    unsafe { wc.deallocate(block, 1 << 20, 4096) };
    Ok(())
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize, usize),
    Free(usize),
    Coalesce,
    Release,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let aligns = prop::sample::select(&[1usize, 8, 256, 4096, 1 << 16][..]);
    let op = prop_oneof![
        6 => (1usize..=(2 << 20), aligns).prop_map(|(size, align)| Op::Allocate(size, align)),
        5 => any::<usize>().prop_map(Op::Free),
        1 => Just(Op::Coalesce),
        1 => Just(Op::Release),
    ];
    prop::collection::vec(op, 1..120)
}

fn heuristic(choice: u8) -> impl FnMut(&PoolStats) -> Option<usize> + Send {
    let mut h: Box<dyn CoalesceHeuristic> = match choice % 4 {
        0 => Box::new(NeverCoalesce),
        1 => Box::new(BlocksReleasable::new(2).expect("valid")),
        2 => Box::new(PercentReleasable::new(40).expect("valid")),
        _ => Box::new(PercentReleasable::hwm(75).expect("valid")),
    };
    move |stats: &PoolStats| h.should_coalesce(stats)
}

/// The pools' model-based property test, on device memory: random allocations, frees, coalesces
/// and releases against a model, with `check()` and the statistics compared after every step, the
/// upstream's holdings equal to the pool's actual size, double frees refused, and every block's
/// device contents (filled by a kernel when allocated) intact when freed, which no overlap in
/// device memory would leave. After all frees and a release, the upstream holds nothing.
fn device_pool_matches_its_model(res: CudaDeviceResource) -> Result<(), String> {
    let stream = match res.stream() {
        Some(stream) => stream.clone(),
        None => res.context().default_stream(),
    };
    let upstream = LimitedResource::new(res, 64 << 20);
    let config = QuickPoolConfig {
        first_block_size: 1 << 20,
        next_block_size: 1 << 20,
        alignment: 256,
        max_size: Some(48 << 20),
    };
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 12,
        failure_persistence: None,
        // Each step runs on the GPU: bound the shrinking of a failure to keep the check short.
        max_shrink_iters: 64,
        max_shrink_time: 20_000,
        ..Default::default()
    });
    let result = runner.run(&(ops(), any::<u8>()), |(ops, choice)| {
        let mut pool = QuickPool::with_config(&upstream, config).map_err(|e| TestCaseError::fail(e.to_string()))?;
        pool.set_heuristic(heuristic(choice));
        let mut model = PoolModel::new();
        let mut seed = 0u32;
        for op in ops {
            match op {
                Op::Allocate(size, align) => match pool.allocate(size, align) {
                    Ok(ptr) => {
                        seed += 1;
                        model.add(ptr, size, align, u64::from(seed)).map_err(TestCaseError::fail)?;
                        device_fill(&stream, ptr, size, seed).map_err(TestCaseError::fail)?;
                    }
                    Err(e) if e.is_out_of_memory() => {}
                    Err(e) => return Err(TestCaseError::fail(format!("allocate({size}, {align}): {e}"))),
                },
                Op::Free(pick) => {
                    if let Some(a) = model.take(pick) {
                        device_verify(&stream, a.ptr, a.size, a.tag as u32).map_err(TestCaseError::fail)?;
                        pool.deallocate(a.ptr).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let again = pool.deallocate(a.ptr);
                        prop_assert!(matches!(again, Err(Error::InvalidFree { .. })), "double free: {:?}", again);
                    }
                }
                Op::Coalesce => {
                    let _ = pool.coalesce(); // may fail for want of memory; the pool stays consistent
                }
                Op::Release => {
                    pool.release();
                    prop_assert_eq!(pool.stats().releasable_blocks, 0);
                }
            }
            model.agrees_with(&pool).map_err(TestCaseError::fail)?;
            prop_assert_eq!(upstream.held(), pool.stats().actual_size);
        }
        while let Some(a) = model.take(0) {
            device_verify(&stream, a.ptr, a.size, a.tag as u32).map_err(TestCaseError::fail)?;
            pool.deallocate(a.ptr).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        pool.release();
        prop_assert_eq!(upstream.held(), 0, "memory still held after every free and a release");
        Ok(())
    });
    result.map_err(|e| e.to_string())?;
    stream.synchronize().map_err(s)
}

/// The whole u32s of a device block, and its last `size % 4` bytes.
///
/// # Safety
/// `block` is a live device block of `size` bytes, used through these views only while they live.
unsafe fn block_views<'a>(
    stream: &Arc<CudaStream>,
    block: NonNull<u8>,
    size: usize,
) -> Result<(DeviceView<'a, u32>, DeviceView<'a, u8>), String> {
    let words = size / 4;
    // SAFETY: the caller's contract; the two views do not overlap.
    unsafe {
        let head = DeviceView::from_block(block, size, words, stream).map_err(s)?;
        let tail_block = NonNull::new_unchecked(block.as_ptr().add(4 * words));
        let tail = DeviceView::from_block(tail_block, size % 4, size % 4, stream).map_err(s)?;
        Ok((head, tail))
    }
}

/// Fills a live device block's whole u32s with the pattern for `seed` (by kernel), and its odd
/// tail bytes with `seed`'s low byte.
fn device_fill(stream: &Arc<CudaStream>, block: NonNull<u8>, size: usize, seed: u32) -> Result<(), String> {
    // SAFETY: every caller passes a live block of `size` bytes it alone uses.
    let (head, mut tail) = unsafe { block_views(stream, block, size)? };
    if !head.is_empty() {
        fill(stream, &head, seed)?;
    }
    if !tail.is_empty() {
        stream.memcpy_htod(&vec![seed as u8; tail.len()], &mut tail).map_err(s)?;
        stream.synchronize().map_err(s)?;
    }
    Ok(())
}

/// Checks what [`device_fill`] wrote.
fn device_verify(stream: &Arc<CudaStream>, block: NonNull<u8>, size: usize, seed: u32) -> Result<(), String> {
    // SAFETY: every caller passes a live block of `size` bytes it alone uses.
    let (head, tail) = unsafe { block_views(stream, block, size)? };
    let overwritten = |e: String| format!("block {block:?} of {size} bytes was overwritten: {e}");
    check_device(stream, &head, seed).map_err(overwritten)?;
    let mut bytes = vec![0u8; tail.len()];
    if !bytes.is_empty() {
        stream.memcpy_dtoh(&tail, &mut bytes).map_err(s)?;
        stream.synchronize().map_err(s)?;
    }
    ensure(bytes.iter().all(|&b| b == seed as u8), || overwritten("in its tail".into()))
}

/// This thread's current context (null: none).
fn current_context() -> Result<sys::CUcontext, String> {
    let mut now = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the driver is initialised (`context(0)` answered in `main`).
    let rc = unsafe { sys::cuCtxGetCurrent(&mut now) };
    ensure(rc == CUresult::CUDA_SUCCESS, || format!("cuCtxGetCurrent: {rc:?}"))?;
    Ok(now)
}

/// Makes `ctx` (null: none) this thread's current context.
fn set_current_context(ctx: sys::CUcontext) -> Result<(), String> {
    // SAFETY: `ctx` is null or a context its owner keeps alive while it is current here.
    let rc = unsafe { sys::cuCtxSetCurrent(ctx) };
    ensure(rc == CUresult::CUDA_SUCCESS, || format!("cuCtxSetCurrent({ctx:?}): {rc:?}"))
}

/// Makes current again, when it drops, the context that was current when it was made: a test that
/// changes the thread's context leaves it to the next test as it found it.
struct KeepsCurrentContext(sys::CUcontext);

impl KeepsCurrentContext {
    fn new() -> Result<Self, String> {
        current_context().map(KeepsCurrentContext)
    }
}

impl Drop for KeepsCurrentContext {
    fn drop(&mut self) {
        let _ = set_current_context(self.0);
    }
}

/// A context of the caller's own (`cuCtxCreate`), not the primary context hetmem uses: current on
/// this thread once made, destroyed when it drops.
struct OwnContext(sys::CUcontext);

impl OwnContext {
    fn create(device: sys::CUdevice) -> Result<Self, String> {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; null parameters ask for a regular context (CUDA 13's
        // `cuCtxCreate` is `cuCtxCreate_v4`, in the driver since 12.5).
        let mut rc = unsafe { sys::cuCtxCreate_v4(&mut ctx, std::ptr::null_mut(), 0, device) };
        if rc == CUresult::CUDA_ERROR_INVALID_VALUE {
            // Drivers that want the parameters: none of them set is a regular context too.
            let mut none = sys::CUctxCreateParams {
                execAffinityParams: std::ptr::null_mut(),
                numExecAffinityParams: 0,
                cigParams: std::ptr::null_mut(),
            };
            // SAFETY: as above, with parameters that ask for nothing.
            rc = unsafe { sys::cuCtxCreate_v4(&mut ctx, &mut none, 0, device) };
        }
        ensure(rc == CUresult::CUDA_SUCCESS && !ctx.is_null(), || format!("cuCtxCreate: {rc:?}"))?;
        Ok(OwnContext(ctx))
    }
}

impl Drop for OwnContext {
    fn drop(&mut self) {
        // SAFETY: made by `create`, destroyed once; nothing of it is in use any more.
        let _ = unsafe { sys::cuCtxDestroy_v2(self.0) };
    }
}

/// hetmem's calls leave the caller's thread bound to the context it was, or to none, as RMM's
/// device guards do (they used to leave device 0's primary context current, so the caller's next
/// raw driver call went to another context than the caller's): with no context current, then
/// with a context of the caller's own (made with `cuCtxCreate`, as a library beside hetmem may).
fn calls_leave_the_callers_current_context_as_they_found_it() -> Result<(), String> {
    let ctx = context(0).map_err(s)?;
    // cudarc binds its context to make a stream: before the contexts are set up.
    let stream = ctx.new_stream().map_err(s)?;
    let _restore = KeepsCurrentContext::new()?;
    // Setting none pops the thread's context stack, which cudarc keeps one deep.
    set_current_context(std::ptr::null_mut())?;
    ensure(current_context()?.is_null(), || "a context is still current after setting none".into())?;
    calls_keep_the_current_context("no context", std::ptr::null_mut(), &stream)?;
    let own = OwnContext::create(ctx.cu_device())?;
    ensure(current_context()? == own.0, || "cuCtxCreate did not make its context current".into())?;
    calls_keep_the_current_context("a context of the caller's own", own.0, &stream)
}

/// hetmem's calls that bind a context, each followed by a check that `expect` (described by
/// `what`) is still this thread's current context. `stream` is of device 0's primary context.
fn calls_keep_the_current_context(what: &str, expect: sys::CUcontext, stream: &Arc<CudaStream>) -> Result<(), String> {
    let check = |call: &str| -> Result<(), String> {
        let now = current_context()?;
        ensure(now == expect, || format!("with {what} current, {call} left {now:?} current instead of {expect:?}"))
    };
    let shm = CudaShmBackend::create(&unique("ctx-shm"), 1 << 16, &CudaShmOptions::default()).map_err(s)?;
    check("CudaShmBackend::create")?;
    let ipc = CudaIpcBackend::create(&unique("ctx-ipc"), 1 << 16, &CudaIpcOptions::default()).map_err(s)?;
    check("CudaIpcBackend::create")?;
    let device = CudaDeviceResource::new(0).map_err(s)?;
    let ordered = CudaDeviceResource::stream_ordered(stream.clone()).map_err(s)?;
    let pinned = CudaPinnedResource::new(0).map_err(s)?;
    check("the resources' constructors")?;
    for res in [&device as &dyn MemoryResource, &ordered, &pinned] {
        let block = res.allocate(4096, 256).map_err(s)?;
        check(&format!("{}'s allocate", res.name()))?;
        // SAFETY: from `allocate` with this size and alignment, freed once.
        unsafe { res.deallocate(block, 4096, 256) };
        check(&format!("{}'s deallocate", res.name()))?;
    }
    let block = pinned.allocate(64, 16).map_err(s)?;
    let address = pinned.device_address(block);
    let flags = pinned.block_flags(block);
    // SAFETY: from `allocate` with this size and alignment, freed once.
    unsafe { pinned.deallocate(block, 64, 16) };
    address.map_err(s)?;
    flags.map_err(s)?;
    check("CudaPinnedResource::device_address and block_flags")?;
    drop(shm);
    check("dropping a CudaShmBackend")?;
    drop(ipc);
    check("dropping a CudaIpcBackend")?;
    // The stream-ordered frees are queued on `stream`: done before the next phase.
    stream.synchronize().map_err(s)
}

/// Whether device address `dptr` lies in a live allocation (`cuMemGetAddressRange`), asked in
/// `ctx`, which is left current.
fn allocated(ctx: &CudaContext, dptr: u64) -> Result<bool, String> {
    set_current_context(ctx.cu_ctx())?;
    let (mut base, mut size) = (0, 0);
    // SAFETY: valid out-pointers; a context is current.
    let rc = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, dptr) };
    match rc {
        CUresult::CUDA_SUCCESS => Ok(base <= dptr && dptr - base < size as u64),
        CUresult::CUDA_ERROR_NOT_FOUND | CUresult::CUDA_ERROR_INVALID_VALUE => Ok(false),
        other => Err(format!("cuMemGetAddressRange({dptr:#x}): {other:?}")),
    }
}

/// The free bytes of `ctx`'s device (`cuMemGetInfo`), asked in `ctx`, which is left current.
fn free_device_bytes(ctx: &CudaContext) -> Result<usize, String> {
    set_current_context(ctx.cu_ctx())?;
    let (mut free, mut total) = (0, 0);
    // SAFETY: valid out-pointers; a context is current.
    let rc = unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
    ensure(rc == CUresult::CUDA_SUCCESS, || format!("cuMemGetInfo: {rc:?}"))?;
    Ok(free)
}

/// The device memory the killed-attacher test shares: enough to stand out in the free bytes.
const KILLED_LEN: usize = 128 << 20;
/// The u32s at its start that the attacher reads before it is killed.
const KILLED_N: usize = 4096;

/// An attacher killed with the memory open never counts itself out, nor closes its handle: the
/// creator's `attached` leaves it out once it is gone, and dropping the creator frees the device
/// memory (it used to stay allocated until the creator exited, the dead attacher counted for
/// good). The driver frees an exported allocation whose importer died: the creator's address no
/// longer lies in an allocation, and the device's free memory grows by it.
fn ipc_attacher_killed_while_attached_does_not_keep_the_memory() -> Result<(), String> {
    let ctx = context(0).map_err(s)?;
    let name = unique("ipc-killed");
    let ipc = CudaIpcBackend::create(&name, KILLED_LEN, &CudaIpcOptions::default()).map_err(s)?;
    let dptr = ipc.device_ptr().ok_or("no device pointer")?;
    let stream = ipc.context().default_stream();
    let src: Vec<u32> = (0..KILLED_N as u32).map(|i| pattern(i, 0xD1E)).collect();
    let mut head = ipc.device_view::<u32>(HEADER_SIZE, KILLED_N, &stream).map_err(s)?;
    stream.memcpy_htod(&src, &mut head).map_err(s)?;
    stream.synchronize().map_err(s)?;
    drop(head);

    let holder = {
        let mut holder = support::spawn_child("ipc-hold", std::slice::from_ref(&name))?;
        holder.expect_line("attached", Duration::from_secs(30))?;
        holder
    };
    let counted = ipc.attached();
    ensure(counted == 1, || format!("{counted} attachers counted while one process has the memory open"))?;
    let status = holder.kill()?;
    ensure(status.signal() == Some(libc::SIGKILL), || format!("the attacher ended otherwise than killed: {status}"))?;
    let counted = ipc.attached();
    ensure(counted == 0, || format!("the killed attacher is still counted: {counted} attached"))?;

    ensure(allocated(&ctx, dptr)?, || format!("cuMemGetAddressRange does not find the live allocation {dptr:#x}"))?;
    let before = free_device_bytes(&ctx)?;
    drop(ipc);
    ensure(!allocated(&ctx, dptr)?, || {
        "dropping the creator left its device memory allocated after its attacher was killed".into()
    })?;
    // The driver may take a moment to hand the memory back.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = free_device_bytes(&ctx)?;
        if now >= before + KILLED_LEN / 2 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the creator's {KILLED_LEN}-byte allocation is freed, but the device's free memory went from \
                 {before} to only {now} bytes"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The u32s of the segment and pinned block the fork test checks in the parent after the fork.
const FORK_N: usize = 1 << 16;

/// Why the forked child failed, by its exit code (1 for the first).
const FORK_FAILURES: &[&str] = &[
    "hetmem_gpu::cuda::driver() answered in the forked child instead of Error::Unsupported",
    "CudaShmBackend::create in the forked child was not refused with Error::Unsupported",
    "the create refused in the forked child left its segment",
    "CudaIpcBackend::attach in the forked child was not refused with Error::Unsupported",
    "CudaDeviceResource::new in the forked child was not refused with Error::Unsupported",
    "the forked child panicked",
];

/// Ends a forked child should anything in it panic: the unwinding would otherwise reach the test
/// runner, and the child would go on with the parent's remaining tests.
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        // SAFETY: ends the forked child at once, running none of the parent's exit handlers.
        unsafe { libc::_exit(FORK_FAILURES.len() as i32) };
    }
}

/// A forked child of a process that uses CUDA must not call the driver (NVIDIA: undefined until it
/// execs): it drops its copies of the parent's backends, resources and views (among them a
/// stream-ordered resource holding the only handles to its stream and to a context retained apart
/// from hetmem's, and a view holding the only handle to its stream, which cudarc would destroy and
/// release), is refused new ones with `Error::Unsupported`, and exits cleanly. The parent's are
/// untouched: the IPC record counts nobody and is not closed (a new process attaches and writes),
/// the segment and the pinned block are still mapped for the device both ways, the blocks free,
/// and dropping the IPC creator frees its memory.
fn forked_child_leaves_the_driver_and_the_parents_memory_alone() -> Result<(), String> {
    let ctx = context(0).map_err(s)?;
    let stream = ctx.default_stream();
    let ipc_name = unique("fork-ipc");
    let ipc = CudaIpcBackend::create(&ipc_name, 2 * 4 * IPC_N, &CudaIpcOptions::default()).map_err(s)?;
    let dptr = ipc.device_ptr().ok_or("no device pointer")?;
    {
        let src: Vec<u32> = (0..IPC_N as u32).map(|i| pattern(i, 0x1234)).collect();
        let mut first = ipc.device_view::<u32>(HEADER_SIZE, IPC_N, &stream).map_err(s)?;
        stream.memcpy_htod(&src, &mut first).map_err(s)?;
        stream.synchronize().map_err(s)?;
    }
    let shm = CudaShmBackend::create(&unique("fork-shm"), 2 * 4 * FORK_N, &CudaShmOptions::default()).map_err(s)?;
    let device = CudaDeviceResource::new(0).map_err(s)?;
    let block = device.allocate(1 << 20, 256).map_err(s)?;
    let pinned = CudaPinnedResource::new(0).map_err(s)?;
    let pinned_block = pinned.allocate(4 * FORK_N, 4096).map_err(s)?;
    let own_stream = CudaContext::new(0).map_err(s)?.new_stream().map_err(s)?;
    let ordered = CudaDeviceResource::stream_ordered(own_stream).map_err(s)?;
    let ordered_block = ordered.allocate(1 << 20, 256).map_err(s)?;
    ordered.stream().ok_or("a stream-ordered resource without a stream")?.synchronize().map_err(s)?;
    let mut view = shm.device_view::<u32>(HEADER_SIZE, FORK_N, &ctx.new_stream().map_err(s)?).map_err(s)?;

    // SAFETY: fork(2). The child drops its copies, asks for new CUDA objects (refused before any
    // driver call) and leaves with `_exit`, running none of the parent's (or the driver's) exit
    // handlers; a panic ends it the same way (`ExitOnUnwind`).
    let pid = unsafe { libc::fork() };
    ensure(pid >= 0, || format!("fork: {}", std::io::Error::last_os_error()))?;
    if pid == 0 {
        let _unwinding = ExitOnUnwind;
        drop(view);
        drop(ordered);
        drop(device);
        drop(pinned);
        drop(ipc);
        drop(shm);
        let code = forked_child_checks(&ipc_name);
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    wait_for_forked_child(pid)?;

    let counted = ipc.attached();
    ensure(counted == 0, || format!("{counted} attachers counted after the forked child dropped its copy"))?;
    // Not closed either: a new process attaches, checks the first half and fills the second.
    support::child("ipc-peer", std::slice::from_ref(&ipc_name))?;
    let second = ipc.device_view::<u32>(HEADER_SIZE + 4 * IPC_N as u64, IPC_N, &stream).map_err(s)?;
    check_device(&stream, &second, 0x4321)?;
    drop(second);

    // The segment is still registered: the device writes what the CPU reads, and reads what the
    // CPU writes.
    let src: Vec<u32> = (0..FORK_N as u32).map(|i| pattern(i, 0xF0F0)).collect();
    stream.memcpy_htod(&src, &mut view).map_err(s)?;
    stream.synchronize().map_err(s)?;
    // SAFETY: the copy finished; nothing else writes the first FORK_N u32s of the data area.
    unsafe { check_host(shm.base().add(HEADER_SIZE as usize).cast(), FORK_N, 0xF0F0)? };
    let after = HEADER_SIZE + 4 * FORK_N as u64;
    // SAFETY: nothing else touches the second FORK_N u32s while the slice lives.
    let host = unsafe { shm.host_slice_mut::<u32>(after, FORK_N) }.map_err(s)?;
    host.iter_mut().enumerate().for_each(|(i, x)| *x = pattern(i as u32, 0x0F0F));
    check_device(&stream, &shm.device_view::<u32>(after, FORK_N, &stream).map_err(s)?, 0x0F0F)?;
    drop(view);

    // So is the pinned block: the device reads what the CPU wrote after the fork.
    // SAFETY: a live pinned block of FORK_N u32s that nothing else uses.
    let host = unsafe { std::slice::from_raw_parts_mut(pinned_block.as_ptr().cast::<u32>(), FORK_N) };
    host.iter_mut().enumerate().for_each(|(i, x)| *x = pattern(i as u32, 0xBEEF));
    let address = pinned.device_address(pinned_block).map_err(s)?;
    // SAFETY: the block is pinned and device-mapped, FORK_N u32s, read through this view only.
    let pinned_view = unsafe { DeviceView::<u32>::from_raw(address, FORK_N, &stream) };
    check_device(&stream, &pinned_view, 0xBEEF)?;
    drop(pinned_view);

    // SAFETY: each block came from its resource's `allocate` with this size and alignment.
    unsafe {
        pinned.deallocate(pinned_block, 4 * FORK_N, 4096);
        device.deallocate(block, 1 << 20, 256);
        ordered.deallocate(ordered_block, 1 << 20, 256);
    }
    ordered.stream().ok_or("a stream-ordered resource without a stream")?.synchronize().map_err(s)?;
    drop(ordered); // the last handles to its stream and context: released here, in the parent
    ensure(allocated(&ctx, dptr)?, || format!("cuMemGetAddressRange does not find the live allocation {dptr:#x}"))?;
    drop(ipc);
    ensure(!allocated(&ctx, dptr)?, || "the IPC creator did not free its memory after the fork".into())
}

/// What the forked child checks once it has dropped its copies: 0 when all is well, else the
/// number of the failure in [`FORK_FAILURES`]. Calls nothing that reaches the driver unless a
/// check fails.
fn forked_child_checks(ipc_name: &str) -> i32 {
    if !matches!(hetmem_gpu::cuda::driver(), Err(Error::Unsupported(_))) {
        return 1;
    }
    let name = unique("fork-child");
    if !matches!(CudaShmBackend::create(&name, 1 << 16, &CudaShmOptions::default()), Err(Error::Unsupported(_))) {
        return 2;
    }
    if PosixShmBackend::exists(&name).unwrap_or(true) {
        return 3;
    }
    if !matches!(CudaIpcBackend::attach(ipc_name, &CudaIpcOptions::default()), Err(Error::Unsupported(_))) {
        return 4;
    }
    if !matches!(CudaDeviceResource::new(0), Err(Error::Unsupported(_))) {
        return 5;
    }
    0
}

/// Waits for forked child `pid`, which exits 0 when all went well and `n` for the `n`th of
/// [`FORK_FAILURES`]; one still running after 20 s is killed (a hang).
fn wait_for_forked_child(pid: libc::pid_t) -> Result<(), String> {
    let started = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) on our own child, with a valid out-pointer.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            break;
        }
        if done < 0 {
            return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
        }
        if started.elapsed() > Duration::from_secs(20) {
            // SAFETY: kill(2) and waitpid(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err("the forked child hung (killed after 20 s)".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if !libc::WIFEXITED(status) {
        return Err(format!("the forked child died (wait status {status:#x})"));
    }
    match libc::WEXITSTATUS(status) as usize {
        0 => Ok(()),
        n if n <= FORK_FAILURES.len() => Err(FORK_FAILURES[n - 1].into()),
        other => Err(format!("the forked child exited with {other}")),
    }
}

fn run_child(role: &str, args: &[String]) -> Result<(), String> {
    let name = args.first().ok_or("missing segment name")?;
    match role {
        "shm-reader" => {
            // A plain CPU process: no CUDA at all, just the segment.
            let plain = PosixShmBackend::attach_kind(name, &ShmOptions::default(), BackendKind::Pinned).map_err(s)?;
            // SAFETY: the parent's kernel finished before it started this process.
            unsafe { check_host(plain.base().add(HEADER_SIZE as usize).cast(), CROSS_N, 0xA5A5)? };
            drop(plain);
            // A CUDA process: registers its own mapping and writes with its own kernel.
            let shm = CudaShmBackend::attach(name, &CudaShmOptions::default()).map_err(s)?;
            // SAFETY: as above.
            unsafe { check_host(shm.base().add(HEADER_SIZE as usize).cast(), CROSS_N, 0xA5A5)? };
            let stream = shm.context().default_stream();
            let second = shm.device_view::<u32>(HEADER_SIZE + 4 * CROSS_N as u64, CROSS_N, &stream).map_err(s)?;
            fill(&stream, &second, 0x5A5A)
        }
        "ipc-peer" => {
            let ipc = CudaIpcBackend::attach(name, &CudaIpcOptions::default()).map_err(s)?;
            let stream = ipc.context().default_stream();
            let first = ipc.device_view::<u32>(HEADER_SIZE, IPC_N, &stream).map_err(s)?;
            check_device(&stream, &first, 0x1234)?;
            let second = ipc.device_view::<u32>(HEADER_SIZE + 4 * IPC_N as u64, IPC_N, &stream).map_err(s)?;
            fill(&stream, &second, 0x4321)
        }
        "ipc-hold" => {
            // Opens the memory, says so, and holds it open until the parent kills this process.
            let ipc = CudaIpcBackend::attach(name, &CudaIpcOptions::default()).map_err(s)?;
            ensure(ipc.attached() == 1, || format!("the attacher counts {} attachers", ipc.attached()))?;
            let stream = ipc.context().default_stream();
            let head = ipc.device_view::<u32>(HEADER_SIZE, KILLED_N, &stream).map_err(s)?;
            check_device(&stream, &head, 0xD1E)?;
            let mut out = std::io::stdout();
            writeln!(out, "attached").and_then(|()| out.flush()).map_err(s)?;
            // Should the parent end without killing it, its end of the pipe closes and this returns.
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            Err("the parent went away without killing this attacher".into())
        }
        other => Err(format!("unknown child role {other}")),
    }
}
