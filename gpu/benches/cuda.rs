//! GPU benchmarks for the `cuda` feature, peers side by side in one run, with ratios:
//!
//! 1. Host-to-device and device-to-host bandwidth, 256 MiB, from a pinned shared segment
//!    ([`CudaShmBackend`]) vs `cuMemHostAlloc` ([`CudaPinnedResource`]) vs pageable memory.
//! 2. `cuMemHostRegister` throughput on a fresh 256 MiB segment, untouched and pre-faulted.
//! 3. Alloc+free pairs of 1 MiB: [`QuickPool`] over device memory vs `cuMemAlloc`+`cuMemFree` vs
//!    `cuMemAllocAsync`+`cuMemFreeAsync`.
//!
//! Each figure prints as a `ROW` line (section, name, value, unit, note) that `ci/gpu-check.sh`
//! gathers into its table. Without a GPU the bench says why and exits. Nothing asserts on time.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::header::HEADER_SIZE;
use hetmem_core::pool::{QuickPool, QuickPoolConfig};
use hetmem_core::{BackendKind, MemoryBackend, MemoryResource};
use hetmem_gpu::cuda::cudarc::driver::{result, sys, CudaSlice, CudaStream};
use hetmem_gpu::cuda::{context, CudaDeviceResource, CudaPinnedResource, CudaShmBackend, CudaShmOptions};

const MIB: usize = 1 << 20;
const COPY_BYTES: usize = 256 * MIB;
const COPY_REPS: usize = 5;

fn row(section: &str, name: &str, value: f64, unit: &str, note: &str) {
    println!("ROW\t{section}\t{name}\t{value:.2}\t{unit}\t{note}");
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks sections by name.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |section: &str| filter.as_deref().is_none_or(|f| section.contains(f));
    let ctx = match context(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("skipping the CUDA benches: no usable CUDA device: {e}");
            return;
        }
    };
    println!("device 0: {}", ctx.name().unwrap_or_default());
    let stream = ctx.new_stream().expect("a stream");
    let sections: [(&str, Bench); 3] = [("bandwidth", bandwidth), ("register", register), ("alloc", alloc_pairs)];
    for (name, bench) in sections {
        if wants(name) {
            if let Err(e) = bench(&stream) {
                println!("ROW\t{name}\tERROR\t0\t-\t{e}");
            }
        }
    }
}

/// One section of benches, printing its rows.
type Bench = fn(&Arc<CudaStream>) -> Result<(), String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Median GB/s of `reps` runs of `op` moving `bytes`, after one warm-up run.
fn gbps(bytes: usize, reps: usize, mut op: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    op()?;
    let mut rates = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        op()?;
        rates.push(bytes as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[reps / 2])
}

fn bandwidth(stream: &Arc<CudaStream>) -> Result<(), String> {
    let mut device: CudaSlice<u8> = stream.alloc_zeros(COPY_BYTES).map_err(s)?;
    let name = format!("/hetmem-bench-bw-{}", std::process::id());
    let shm = CudaShmBackend::create(&name, COPY_BYTES, &CudaShmOptions::default()).map_err(s)?;
    // SAFETY: this process alone uses the segment, and only through this slice.
    let shm_buf = unsafe { shm.host_slice_mut::<u8>(HEADER_SIZE, COPY_BYTES) }.map_err(s)?;
    shm_buf.fill(1);
    let pinned = CudaPinnedResource::new(0).map_err(s)?;
    let block = pinned.allocate(COPY_BYTES, 4096).map_err(s)?;
    // SAFETY: a live pinned host block of COPY_BYTES bytes, used only through this slice.
    let pinned_buf = unsafe { std::slice::from_raw_parts_mut(block.as_ptr(), COPY_BYTES) };
    pinned_buf.fill(2);
    let mut pageable = vec![3u8; COPY_BYTES];

    let mut results = Vec::new();
    for (label, buf) in
        [("pinned shm", &mut *shm_buf), ("cuMemHostAlloc", &mut *pinned_buf), ("pageable", &mut pageable[..])]
    {
        let h2d = gbps(COPY_BYTES, COPY_REPS, || {
            stream.memcpy_htod(&*buf, &mut device).map_err(s)?;
            stream.synchronize().map_err(s)
        })?;
        let d2h = gbps(COPY_BYTES, COPY_REPS, || {
            stream.memcpy_dtoh(&device, &mut *buf).map_err(s)?;
            stream.synchronize().map_err(s)
        })?;
        results.push((label, h2d, d2h));
    }
    let (_, base_h2d, base_d2h) = results[1];
    for (label, h2d, d2h) in results {
        let note = |v: f64, base: f64| format!("{:.0}% of cuMemHostAlloc", 100.0 * v / base);
        row("bandwidth", &format!("H2D 256 MiB from {label}"), h2d, "GB/s", &note(h2d, base_h2d));
        row("bandwidth", &format!("D2H 256 MiB into {label}"), d2h, "GB/s", &note(d2h, base_d2h));
    }
    // SAFETY: from `allocate` with this size and alignment; the copies finished.
    unsafe { pinned.deallocate(block, COPY_BYTES, 4096) };
    Ok(())
}

/// Seconds for one `cuMemHostRegister` of a fresh segment's whole mapping; `touch` faults every page
/// in first.
fn register_once(stream: &Arc<CudaStream>, tag: usize, touch: bool) -> Result<f64, String> {
    let name = format!("/hetmem-bench-reg-{}-{tag}", std::process::id());
    let shm =
        PosixShmBackend::create_kind(&name, COPY_BYTES, &ShmOptions::default(), BackendKind::Pinned).map_err(s)?;
    let len = shm.len() as usize;
    if touch {
        // SAFETY: the mapping is `len` bytes and this process alone uses it.
        unsafe { std::ptr::write_bytes(shm.base().add(HEADER_SIZE as usize), 0, len - HEADER_SIZE as usize) };
    }
    stream.context().bind_to_thread().map_err(s)?;
    let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
    let started = Instant::now();
    // SAFETY: the mapping stays valid until after the unregister below.
    unsafe { sys::cuMemHostRegister_v2(shm.base().cast(), len, flags) }.result().map_err(s)?;
    let took = started.elapsed().as_secs_f64();
    // SAFETY: registered above; nothing used it.
    unsafe { sys::cuMemHostUnregister(shm.base().cast()) }.result().map_err(s)?;
    Ok(took)
}

fn register(stream: &Arc<CudaStream>) -> Result<(), String> {
    for (touch, label) in [(false, "fresh pages"), (true, "pre-faulted pages")] {
        let mut times: Vec<f64> = (0..3).map(|i| register_once(stream, i, touch)).collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        let rate = COPY_BYTES as f64 / times[1] / 1e9;
        row("register", &format!("cuMemHostRegister 256 MiB, {label}"), rate, "GB/s", "median of 3");
    }
    Ok(())
}

/// Nanoseconds per pair from `pairs` runs of `op`, then `finish` (inside the timing).
fn ns_per_pair(
    pairs: usize,
    mut op: impl FnMut() -> Result<(), String>,
    finish: impl FnOnce() -> Result<(), String>,
) -> Result<f64, String> {
    for _ in 0..pairs.min(100) {
        op()?;
    }
    let started = Instant::now();
    for _ in 0..pairs {
        op()?;
    }
    finish()?;
    Ok(started.elapsed().as_nanos() as f64 / pairs as f64)
}

fn alloc_pairs(stream: &Arc<CudaStream>) -> Result<(), String> {
    const SIZE: usize = MIB;
    let budget = Duration::from_millis(300);
    // Enough pairs for each peer to run about `budget`, from a short trial.
    let pairs_for = |trial_ns: f64| ((budget.as_nanos() as f64 / trial_ns.max(1.0)) as usize).clamp(200, 2_000_000);
    stream.context().bind_to_thread().map_err(s)?;

    let sync_pair = || {
        // SAFETY: a fresh allocation freed at once; nothing else uses it.
        let p = unsafe { result::malloc_sync(SIZE) }.map_err(s)?;
        // SAFETY: from malloc_sync above.
        unsafe { result::free_sync(black_box(p)) }.map_err(s)
    };
    let trial = ns_per_pair(200, sync_pair, || Ok(()))?;
    let sync_ns = ns_per_pair(pairs_for(trial), sync_pair, || Ok(()))?;

    let cu_stream = stream.cu_stream();
    let async_pair = || {
        // SAFETY: stream-ordered allocation on a live stream, freed on the same stream.
        let p = unsafe { result::malloc_async(cu_stream, SIZE) }.map_err(s)?;
        // SAFETY: from malloc_async above, on the same stream.
        unsafe { result::free_async(black_box(p), cu_stream) }.map_err(s)
    };
    let sync_stream = || stream.synchronize().map_err(s);
    let trial = ns_per_pair(200, async_pair, sync_stream)?;
    let async_ns = ns_per_pair(pairs_for(trial), async_pair, sync_stream)?;

    let config = QuickPoolConfig { first_block_size: 64 * MIB, next_block_size: 16 * MIB, ..Default::default() };
    let mut pool = QuickPool::with_config(CudaDeviceResource::new(0).map_err(s)?, config).map_err(s)?;
    let mut pool_pair = || {
        let p = pool.allocate(SIZE, 256).map_err(s)?;
        pool.deallocate(black_box(p)).map_err(s)
    };
    let trial = ns_per_pair(200, &mut pool_pair, || Ok(()))?;
    let pool_ns = ns_per_pair(pairs_for(trial), &mut pool_pair, || Ok(()))?;

    let section = "alloc";
    row(section, "QuickPool<CudaDeviceResource> 1 MiB alloc+free", pool_ns, "ns/pair", "1.00x");
    row(
        section,
        "cuMemAlloc+cuMemFree 1 MiB",
        sync_ns,
        "ns/pair",
        &format!("pool is {:.1}x faster", sync_ns / pool_ns),
    );
    row(
        section,
        "cuMemAllocAsync+cuMemFreeAsync 1 MiB",
        async_ns,
        "ns/pair",
        &format!("pool is {:.1}x faster", async_ns / pool_ns),
    );
    Ok(())
}
