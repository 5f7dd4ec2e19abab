//! The CUDA module's host side against a fake driver (`tests/fake_cuda/libcuda.c`, built here with
//! the host C compiler and named by `HETMEM_CUDA_DRIVER`): the paths a machine without a GPU cannot
//! otherwise reach. The fake counts every driver call and what is still allocated or registered.
//!
//! The driver is loaded once per process, so each test runs its body in a new process (this binary
//! again, asked for that one test, with the environment set). Without a C compiler the tests say
//! so and pass.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::{Error, MemoryBackend, OffsetPtr};
use hetmem_gpu::cuda::{
    compile_ptx_with, driver, nvrtc_available, CudaIpcBackend, CudaIpcOptions, CudaShmBackend, CudaShmOptions,
    DRIVER_ENV, NVRTC_ENV,
};

/// Set (to the test's name) in the process that runs a test's body.
const BODY_ENV: &str = "HETMEM_FAKE_CUDA_BODY";

/// The fake driver, built once per run into its own folder: `None` (and why) without a C compiler.
fn fake_driver() -> Result<&'static Path, &'static str> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Earlier runs' folders, once their process is gone (a running one may have its copy loaded).
        for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("fake-cuda-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        build("libcuda.c", &tmp.join(format!("fake-cuda-{}", std::process::id())).join("libcuda.so.1"))
    });
    built.as_deref().map_err(|e| e.as_str())
}

/// Compiles `tests/fake_cuda/{src}` into the shared library `lib`, whose file name is its soname.
fn build(src: &str, lib: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(lib.parent().unwrap()).map_err(|e| e.to_string())?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_cuda").join(src);
    let soname = format!("-Wl,-soname,{}", lib.file_name().unwrap().to_string_lossy());
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", &soname, "-o"])
        .arg(lib)
        .arg(&src)
        .output()
        .map_err(|e| format!("running {cc:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cc:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(lib.to_path_buf())
}

/// Whether this process runs the body of test `name`; otherwise runs it in a new process with the
/// fake driver (and `env`) and fails if it fails. `false` there, and when there is no C compiler.
fn body_of(name: &str, env: &[(&str, OsString)]) -> bool {
    if std::env::var(BODY_ENV).is_ok_and(|n| n == name) {
        return true;
    }
    let lib = match fake_driver() {
        Ok(lib) => lib,
        Err(why) => {
            println!("skipped: no fake CUDA driver: {why}");
            return false;
        }
    };
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(BODY_ENV, name)
        .env(DRIVER_ENV, lib)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running this test again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed in its own process:\n{text}");
    assert!(text.contains("1 passed"), "{name} did not run in its own process:\n{text}");
    println!("{text}");
    false
}

/// A counter of the fake library at `lib` (`fake_calls`, `fake_allocations`, ...).
fn counter(lib: &Path, name: &str) -> i64 {
    // SAFETY: a fake library, loaded by this process already or free of initialisers.
    let lib = unsafe { libloading::Library::new(lib) }.expect("the fake library loads");
    // SAFETY: every fake_* function takes nothing and returns a C long.
    let f = unsafe { lib.get::<unsafe extern "C" fn() -> std::ffi::c_long>(name.as_bytes()) }.expect(name);
    // SAFETY: as above.
    unsafe { f() }
}

fn unique(tag: &str) -> String {
    format!("/hetmem-fake-cuda-{tag}-{}", std::process::id())
}

/// Whether the fake driver is the one in use: a machine with a real driver on the loader's path
/// may load that one instead, which hetmem refuses (then this test has nothing to check).
fn fake_in_use() -> bool {
    match driver() {
        Ok(_) => true,
        Err(Error::Unsupported(why)) if why.contains(DRIVER_ENV) => {
            println!("skipped: {why}");
            false
        }
        Err(e) => panic!("the fake driver failed to load: {e:?}"),
    }
}

/// A forked child of a process that uses CUDA must not call the driver (NVIDIA: undefined
/// behaviour until it execs). Dropping its copies of the parent's backends leaves the driver, the
/// parent's registrations and the IPC record alone, and a new backend is refused with an error.
#[test]
fn a_forked_child_leaves_the_driver_and_the_shared_record_alone() {
    if !body_of("a_forked_child_leaves_the_driver_and_the_shared_record_alone", &[]) || !fake_in_use() {
        return;
    }
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let ipc = CudaIpcBackend::create(&unique("ipc"), 1 << 16, &CudaIpcOptions::default()).unwrap();
    let shm = CudaShmBackend::create(&unique("shm"), 1 << 16, &CudaShmOptions::default()).unwrap();
    assert_eq!((counter(&lib, "fake_allocations"), counter(&lib, "fake_registrations")), (1, 1));

    // The child drops its copies and tries one create.
    let pid = fork();
    if pid == 0 {
        end_child(|| {
            let before = counter(&lib, "fake_calls");
            drop(ipc);
            drop(shm);
            let name = unique("child");
            let refused = matches!(
                CudaShmBackend::create(&name, 1 << 16, &CudaShmOptions::default()),
                Err(Error::Unsupported(_))
            );
            let left = PosixShmBackend::exists(&name).unwrap_or(true);
            let calls = counter(&lib, "fake_calls") - before;
            if calls != 0 {
                1
            } else if !refused {
                2
            } else if left {
                3
            } else {
                0
            }
        });
    }
    expect_child(
        pid,
        &[
            "the forked child called the CUDA driver",
            "a backend created in the forked child was not refused with Error::Unsupported",
            "the refused create left its segment",
        ],
    );

    // The record still counts nobody and is not closed: the creator frees its memory on drop.
    assert_eq!(ipc.attached(), 0);
    assert!(ipc.device_ptr().is_some());
    drop(ipc);
    assert_eq!(counter(&lib, "fake_allocations"), 0, "the creator could not free its memory after the fork");
    drop(shm);
    assert_eq!(counter(&lib, "fake_registrations"), 0);
}

/// Forks this process: the child's id in the parent, 0 in the child, which ends with [`end_child`].
fn fork() -> libc::pid_t {
    // SAFETY: fork(2); each test's child ends with `end_child`, running none of the parent's exit
    // handlers.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    pid
}

/// The code of a forked child whose checks panicked.
const CHILD_PANICKED: i32 = 101;

/// Ends a forked child with the code `checks` returns (0 when all went well, `n` for the `n`th
/// failure [`expect_child`] is given), or [`CHILD_PANICKED`]: the child's only thread, unwinding
/// out of the test, would otherwise end the process with status 0, as if all went well.
fn end_child(checks: impl FnOnce() -> i32) -> ! {
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks)).unwrap_or(CHILD_PANICKED);
    // SAFETY: ends the forked child, running none of the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

/// Waits for forked child `pid`, which exits 0 when all went well and `n` for the `n`th of
/// `failures`; panics with that failure otherwise.
fn expect_child(pid: libc::pid_t, failures: &[&str]) {
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "the child died: {status:#x}");
    match libc::WEXITSTATUS(status) {
        0 => {}
        CHILD_PANICKED => panic!("the child panicked (its message is above)"),
        n if n as usize <= failures.len() => panic!("{}", failures[n as usize - 1]),
        other => panic!("the child exited with {other}"),
    }
}

/// A forked child whose checks panic (a failed assertion there) fails its test: it used to exit
/// with status 0, its only thread unwinding out of the test, which read as a pass.
#[test]
fn a_forked_child_that_panics_fails_its_test() {
    if !body_of("a_forked_child_that_panics_fails_its_test", &[]) {
        return;
    }
    let pid = fork();
    if pid == 0 {
        end_child(|| panic!("a failed assertion in the child"));
    }
    let waited = std::panic::catch_unwind(|| expect_child(pid, &[]));
    assert!(waited.is_err(), "a child that panicked passed");
}

/// The cudarc handles a resource or view holds are the parent's too in a forked child: a
/// stream-ordered resource given the only handle to its stream (and, here, to a context of the
/// caller's own), or a view given the only handle to its stream, must not destroy them there (cudarc
/// destroys a stream, and releases a context, when its last handle drops: driver calls).
#[test]
fn a_forked_child_drops_streams_and_contexts_without_the_driver() {
    if !body_of("a_forked_child_drops_streams_and_contexts_without_the_driver", &[]) || !fake_in_use() {
        return;
    }
    use hetmem_core::header::HEADER_SIZE;
    use hetmem_gpu::cuda::cudarc::driver::CudaContext;
    use hetmem_gpu::cuda::CudaDeviceResource;
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let own = CudaContext::new(0).unwrap(); // the caller's, not hetmem's shared one
    let resource = CudaDeviceResource::stream_ordered(own.new_stream().unwrap()).unwrap();
    drop(own);
    let shm = CudaShmBackend::create(&unique("fork-view"), 1 << 16, &CudaShmOptions::default()).unwrap();
    let view = shm.device_view::<u32>(HEADER_SIZE, 4, &hetmem_gpu::cuda::context(0).unwrap().new_stream().unwrap());
    let view = view.unwrap();
    assert_eq!(counter(&lib, "fake_streams"), 2);

    // The child drops its copies (not `shm`'s, which leaves the parent's segment alone anyway).
    let pid = fork();
    if pid == 0 {
        end_child(|| {
            let before = counter(&lib, "fake_calls");
            drop(resource);
            let after_resource = counter(&lib, "fake_calls");
            drop(view);
            let after_view = counter(&lib, "fake_calls");
            if after_resource != before {
                1
            } else if after_view != after_resource {
                2
            } else {
                0
            }
        });
    }
    expect_child(
        pid,
        &[
            "dropping a stream-ordered resource in a forked child called the CUDA driver",
            "dropping a view in a forked child called the CUDA driver",
        ],
    );
    // In the parent they are released as usual.
    drop(resource);
    drop(view);
    assert_eq!(counter(&lib, "fake_streams"), 0);
}

/// A view made on a stream the caller made with cudarc, in a process where hetmem never loaded the
/// driver itself, is the parent's in a forked child too: dropping it there must neither start the
/// driver (`cuInit`) nor destroy the stream.
#[test]
fn a_forked_child_drops_a_view_on_a_cudarc_stream_without_the_driver() {
    if !body_of("a_forked_child_drops_a_view_on_a_cudarc_stream_without_the_driver", &[]) {
        return;
    }
    use hetmem_gpu::cuda::cudarc::driver::CudaContext;
    use hetmem_gpu::cuda::DeviceView;
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    // cudarc finds the fake by its soname once it is loaded; hetmem's `driver()` is never called.
    // SAFETY: the fake driver, whose initialisers do nothing.
    std::mem::forget(unsafe { libloading::Library::new(&lib) }.expect("the fake driver loads"));
    let ctx = CudaContext::new(0).unwrap();
    if counter(&lib, "fake_calls") == 0 {
        println!("skipped: cudarc loaded another driver than the fake");
        return;
    }
    let stream = ctx.new_stream().unwrap();
    drop(ctx);
    // SAFETY: the view is never used for a copy or a kernel, only dropped.
    let view = unsafe { DeviceView::<u32>::from_raw(0x1000, 4, &stream) };
    drop(stream);
    assert_eq!(counter(&lib, "fake_streams"), 1);

    let pid = fork();
    if pid == 0 {
        end_child(|| {
            let before = counter(&lib, "fake_calls");
            drop(view);
            if counter(&lib, "fake_calls") != before {
                1
            } else {
                0
            }
        });
    }
    expect_child(pid, &["dropping a view on a cudarc stream in a forked child called the CUDA driver"]);
    // In the parent the stream is destroyed as usual.
    drop(view);
    assert_eq!(counter(&lib, "fake_streams"), 0);
}

/// `HETMEM_CUDA_DRIVER` promises that the library it names is used, or none is. cudarc finds the
/// driver by name, trying `libcuda.so` before the soname the named library answers to: with another
/// driver on the loader's path under that name, that other one would be used.
#[test]
fn the_driver_named_by_the_variable_is_used_or_none_is() {
    const NAME: &str = "the_driver_named_by_the_variable_is_used_or_none_is";
    let mut env = Vec::new();
    if std::env::var(BODY_ENV).is_err() {
        if let Ok(lib) = fake_driver() {
            // Another copy of the fake (another file, so the loader loads it apart) as `libcuda.so`.
            let other = lib.parent().unwrap().join("other");
            std::fs::create_dir_all(&other).unwrap();
            std::fs::copy(lib, other.join("libcuda.so")).unwrap();
            env.push(("LD_LIBRARY_PATH", other.into_os_string()));
        }
    }
    if !body_of(NAME, &env) {
        return;
    }
    let named = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    match driver() {
        Ok(_) => {
            assert!(counter(&named, "fake_calls") > 0, "driver() answered from another library than the one named")
        }
        Err(Error::Unsupported(why)) => assert!(why.contains(DRIVER_ENV), "{why}"),
        Err(e) => panic!("{e:?}"),
    }
}

/// The resources against the fake: over-aligned blocks are aligned and freed at their driver base,
/// out of memory leaves the resource usable, and after every free the driver holds nothing.
#[test]
fn resources_free_every_driver_block() {
    if !body_of("resources_free_every_driver_block", &[]) || !fake_in_use() {
        return;
    }
    use hetmem_core::MemoryResource;
    use hetmem_gpu::cuda::{CudaDeviceResource, CudaPinnedResource};
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let device = CudaDeviceResource::new(0).unwrap();
    let pinned = CudaPinnedResource::new(0).unwrap();
    for (res, counter_name) in [
        (&device as &dyn MemoryResource, "fake_allocations"),
        (&pinned as &dyn MemoryResource, "fake_host_allocations"),
    ] {
        let mut blocks = Vec::new();
        for (size, align) in [(1usize, 1usize), (1000, 8), (4096, 256), (12345, 4096), (1 << 20, 1 << 20), (3, 1 << 16)]
        {
            let block = res.allocate(size, align).unwrap();
            assert_eq!(block.as_ptr() as usize % align, 0, "{} ({size}, {align})", res.name());
            blocks.push((block, size, align));
        }
        assert_eq!(counter(&lib, counter_name), blocks.len() as i64);
        let refused = res.allocate(2 << 30, 256);
        assert!(matches!(refused, Err(Error::OutOfMemory { .. })), "{}: {refused:?}", res.name());
        for (block, size, align) in blocks {
            // SAFETY: from `allocate` with this size and alignment, freed once.
            unsafe { res.deallocate(block, size, align) };
        }
        assert_eq!(counter(&lib, counter_name), 0, "{} left driver blocks", res.name());
    }
    assert!(matches!(CudaDeviceResource::new(1), Err(Error::NotFound { .. })));
}

/// IPC between two processes against the fake: the attacher counts itself in and out, and the
/// creator frees its memory once nobody has it open.
#[test]
fn ipc_attach_counts_in_and_out() {
    const NAME_ENV: &str = "HETMEM_FAKE_CUDA_IPC_NAME";
    if let Ok(name) = std::env::var(NAME_ENV) {
        // The attaching process.
        if !body_of("ipc_attach_counts_in_and_out", &[]) || !fake_in_use() {
            return;
        }
        let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
        // A refused open counts the attacher out again.
        fail(&lib, Some("cuIpcOpenMemHandle_v2"));
        let refused = CudaIpcBackend::attach(&name, &CudaIpcOptions::default());
        assert!(matches!(refused, Err(Error::Gpu { call: "cuIpcOpenMemHandle", .. })), "{refused:?}");
        fail(&lib, None);
        // So does an open that answers address 0, which is no mapping.
        null(&lib, Some("cuIpcOpenMemHandle_v2"));
        let refused = CudaIpcBackend::attach(&name, &CudaIpcOptions::default());
        assert!(matches!(refused, Err(Error::Gpu { call: "cuIpcOpenMemHandle", code: 0, .. })), "{refused:?}");
        null(&lib, None);
        let ipc = CudaIpcBackend::attach(&name, &CudaIpcOptions::default()).unwrap();
        assert_eq!(ipc.attached(), 1);
        assert_eq!(counter(&lib, "fake_opened_handles"), 1);
        assert!(!ipc.is_creator() && !ipc.host_accessible());
        drop(ipc);
        assert_eq!(counter(&lib, "fake_opened_handles"), 0);
        return;
    }
    if !body_of("ipc_attach_counts_in_and_out", &[]) || !fake_in_use() {
        return;
    }
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let name = unique("ipc2");
    let ipc = CudaIpcBackend::create(&name, 1 << 20, &CudaIpcOptions::default()).unwrap();
    let same = CudaIpcBackend::attach(&name, &CudaIpcOptions::default());
    assert!(matches!(same, Err(Error::Unsupported(_))), "{same:?}");
    assert_eq!(ipc.attached(), 0);
    // The attacher: this binary again, with the fake driver still named.
    attacher_passes("ipc_attach_counts_in_and_out", NAME_ENV, &name);
    assert_eq!(ipc.attached(), 0, "the attacher did not count itself out");
    drop(ipc);
    assert_eq!(counter(&lib, "fake_allocations"), 0, "the creator did not free its memory");
    assert!(!PosixShmBackend::exists(&name).unwrap());
}

/// Runs this binary's test `name` as the attacher, in another process with `var` set to the
/// segment's name (and this process's environment: the fake driver stays named); fails unless
/// it passed there.
fn attacher_passes(name: &str, var: &str, segment: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(var, segment)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "the attacher failed:\n{text}");
}

/// Another process can have the creator's process id: containers that share `/dev/shm` and a
/// GPU (a Kubernetes pod) have PID namespaces of their own, where the first process of each is 1,
/// and a dead creator's id is reused. Such an attacher is not the creator, and must be let in. The
/// attacher here writes its own id as the record's creator id (at offset 16 of the record, which
/// lies at `HEADER_SIZE`) before attaching, as a creator in another namespace would have.
#[test]
fn an_attacher_with_the_creators_pid_is_not_the_creator() {
    const NAME: &str = "an_attacher_with_the_creators_pid_is_not_the_creator";
    const NAME_ENV: &str = "HETMEM_FAKE_CUDA_IPC_SAME_PID";
    if let Ok(name) = std::env::var(NAME_ENV) {
        // The attaching process.
        if !body_of(NAME, &[]) || !fake_in_use() {
            return;
        }
        use hetmem_core::header::HEADER_SIZE;
        use hetmem_core::BackendKind;
        let raw = PosixShmBackend::attach_kind(&name, &Default::default(), BackendKind::Device).unwrap();
        // SAFETY: the record's creator id, a u32 at offset 16 of the record (in the mapping's second
        // page); the creator has published the record and writes it no more.
        unsafe { raw.base().add(HEADER_SIZE as usize + 16).cast::<u32>().write_volatile(std::process::id()) };
        let ipc = CudaIpcBackend::attach(&name, &CudaIpcOptions::default());
        let ipc = ipc.expect("an attacher whose process id is the creator's was refused");
        assert_eq!(ipc.attached(), 1);
        return;
    }
    if !body_of(NAME, &[]) || !fake_in_use() {
        return;
    }
    let name = unique("same-pid");
    let ipc = CudaIpcBackend::create(&name, 1 << 16, &CudaIpcOptions::default()).unwrap();
    // The creator itself is still refused.
    let same = CudaIpcBackend::attach(&name, &CudaIpcOptions::default());
    assert!(matches!(same, Err(Error::Unsupported(_))), "{same:?}");
    attacher_passes(NAME, NAME_ENV, &name);
    assert_eq!(ipc.attached(), 0, "the attacher did not count itself out");
}

/// An element type aligned past the page size, which is all the alignment a mapping's base has.
#[derive(Debug)]
#[repr(C, align(1048576))]
struct Aligned1M([u8; 1 << 20]);

/// The alignment check of `host_slice` and `device_view` is on the address, not only the offset:
/// a segment is mapped at a page boundary, so an offset that is a multiple of a larger alignment
/// can still give a misaligned address.
#[test]
fn views_check_the_alignment_of_the_address() {
    if !body_of("views_check_the_alignment_of_the_address", &[]) || !fake_in_use() {
        return;
    }
    // Segments until one is mapped at an address that is not a multiple of 1 MiB (almost always
    // the first).
    let mut kept = Vec::new();
    let shm = loop {
        let shm = CudaShmBackend::create(&unique(&format!("align{}", kept.len())), 4 << 20, &CudaShmOptions::default())
            .unwrap();
        if shm.base() as usize % (1 << 20) != 0 && shm.device_ptr().unwrap() % (1 << 20) != 0 {
            break shm;
        }
        assert!(kept.len() < 8, "every segment was mapped at a 1 MiB boundary");
        kept.push(shm);
    };
    let offset = 1 << 20; // a multiple of the alignment, past the header
                          // SAFETY: nothing else uses the segment; a slice that came back would be read by nobody.
    let host = unsafe { shm.host_slice::<Aligned1M>(offset, 1) };
    assert!(matches!(host, Err(Error::InvalidAlignment { .. })), "host slice at {:#x}", shm.base() as u64 + offset);
    let stream = hetmem_gpu::cuda::context(0).unwrap().default_stream();
    let view = shm.device_view::<Aligned1M>(offset, 1, &stream);
    assert!(matches!(view, Err(Error::InvalidAlignment { .. })), "device view: {view:?}");
    // An address that is aligned is accepted.
    let aligned = (1 << 20) - (shm.base() as u64 % (1 << 20)) + (1 << 20);
    // SAFETY: as above.
    let host = unsafe { shm.host_slice::<Aligned1M>(aligned, 1) };
    assert!(host.is_ok(), "{:?}", host.err());
}

/// A view of a pool block must fit the block: the error says how many bytes the view needs (it
/// used to give the element count as the length, next to the block's size in bytes), and a count
/// whose size overflows is an invalid size, as for the backends' views.
#[test]
fn a_view_of_a_block_must_fit_it() {
    if !body_of("a_view_of_a_block_must_fit_it", &[]) || !fake_in_use() {
        return;
    }
    use hetmem_gpu::cuda::{context, DeviceView};
    use std::ptr::NonNull;
    let stream = context(0).unwrap().default_stream();
    let block = NonNull::<u64>::dangling().cast::<u8>();
    // SAFETY: each view is refused before it is made, so the block is never used.
    let too_long = unsafe { DeviceView::<u32>::from_block(block, 4000, 1001, &stream) };
    assert!(matches!(too_long, Err(Error::OutOfBounds { offset: 0, len: 4004, region_len: 4000 })), "{too_long:?}");
    // SAFETY: as above.
    let overflows = unsafe { DeviceView::<u32>::from_block(block, 4000, usize::MAX, &stream) };
    assert!(matches!(overflows, Err(Error::InvalidSize { .. })), "{overflows:?}");
    // SAFETY: as above: a view that fits is made, and dropped unused.
    let fits = unsafe { DeviceView::<u32>::from_block(block, 4000, 1000, &stream) };
    assert_eq!(fits.map(|v| v.len()).ok(), Some(1000));
}

/// A pinned segment says whether its device's link carries host atomics, which decides whether
/// kernels and the CPU may use a heap in it at the same time: the fake's device 0 has such a link
/// and device 1 has not.
#[test]
fn a_segment_says_whether_kernels_and_the_cpu_may_share_atomics() {
    const NAME: &str = "a_segment_says_whether_kernels_and_the_cpu_may_share_atomics";
    if !body_of(NAME, &[("FAKE_CUDA_DEVICES", "2".into())]) || !fake_in_use() {
        return;
    }
    let on = |device| CudaShmOptions { device, ..Default::default() };
    let linked = CudaShmBackend::create(&unique("atomics0"), 1 << 16, &on(0)).unwrap();
    let pcie = CudaShmBackend::create(&unique("atomics1"), 1 << 16, &on(1)).unwrap();
    assert!(linked.host_native_atomics(), "device 0 answers host-native atomics");
    assert!(!pcie.host_native_atomics(), "device 1 does not");
    let attached = CudaShmBackend::attach(&unique("atomics1"), &on(0)).unwrap();
    assert!(attached.host_native_atomics(), "the attaching process's device decides");
}

/// `HETMEM_NVRTC`, like `HETMEM_CUDA_DRIVER`, gets the library it names or an error: with a fake
/// NVRTC 12 named and another (fake) NVRTC 13 on the loader's path, which cudarc tries first, the
/// named one must be the one that compiles.
#[test]
fn the_nvrtc_named_by_the_variable_is_used_or_none_is() {
    const NAME: &str = "the_nvrtc_named_by_the_variable_is_used_or_none_is";
    let mut env = Vec::new();
    if std::env::var(BODY_ENV).is_err() {
        if let Ok(driver) = fake_driver() {
            let dir = driver.parent().unwrap();
            let named = build("libnvrtc.c", &dir.join("nvrtc12").join("libnvrtc.so.12")).unwrap();
            let other = build("libnvrtc.c", &dir.join("nvrtc13").join("libnvrtc.so.13")).unwrap();
            env.push((NVRTC_ENV, named.into_os_string()));
            env.push(("LD_LIBRARY_PATH", other.parent().unwrap().as_os_str().to_owned()));
        }
    }
    if !body_of(NAME, &env) {
        return;
    }
    let named = PathBuf::from(std::env::var_os(NVRTC_ENV).unwrap());
    match nvrtc_available() {
        Ok(()) => {
            let compiled = compile_ptx_with("extern \"C\" __global__ void k() {}", &[]);
            assert!(compiled.is_err(), "the fake NVRTC compiles nothing");
            assert!(counter(&named, "fake_nvrtc_calls") > 0, "another NVRTC than the one named compiled");
        }
        Err(Error::Unsupported(why)) => assert!(why.contains(NVRTC_ENV), "{why}"),
        Err(e) => panic!("{e:?}"),
    }
}

/// Makes the fake driver at `lib` fail `call` (None: nothing fails).
fn fail(lib: &Path, call: Option<&str>) {
    set_call(lib, "fake_fail", call);
}

/// Makes the fake driver at `lib` answer `call` with success and address 0 (None: no call does).
fn null(lib: &Path, call: Option<&str>) {
    set_call(lib, "fake_null", call);
}

/// Calls the fake's `setter` (`fake_fail`, `fake_null`) with `call`'s name, or null.
fn set_call(lib: &Path, setter: &str, call: Option<&str>) {
    let name = call.map(|c| std::ffi::CString::new(c).unwrap());
    // SAFETY: as in `counter`.
    let lib = unsafe { libloading::Library::new(lib) }.expect("the fake library loads");
    // SAFETY: the setters take a NUL-terminated string or null.
    let f = unsafe { lib.get::<unsafe extern "C" fn(*const std::ffi::c_char)>(setter.as_bytes()) }.expect(setter);
    // SAFETY: as above; `name` outlives the call.
    unsafe { f(name.as_ref().map_or(std::ptr::null(), |n| n.as_ptr())) };
}

/// Every step of creating a backend or allocating a block that the driver refuses gives its error
/// and undoes the steps before it: no segment, registration or allocation is left behind, and the
/// next request works.
#[test]
fn refused_driver_calls_leave_nothing_behind() {
    if !body_of("refused_driver_calls_leave_nothing_behind", &[]) || !fake_in_use() {
        return;
    }
    use hetmem_core::MemoryResource;
    use hetmem_gpu::cuda::{CudaDeviceResource, CudaPinnedResource};
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let held = || {
        ["fake_allocations", "fake_host_allocations", "fake_registrations", "fake_opened_handles"]
            .map(|c| counter(&lib, c))
    };
    let gpu_error = |r: &hetmem_core::Result<()>, call: &str| {
        assert!(matches!(r, Err(Error::Gpu { call: c, .. }) if *c == call), "expected {call} to fail: {r:?}")
    };
    for (call, expected) in [
        ("cuMemHostRegister_v2", "cuMemHostRegister"),
        ("cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer"),
        ("cuDeviceGetAttribute", "cuDeviceGetAttribute"),
    ] {
        // A segment meant to outlive its creator (`unlink_on_drop: false`) is removed too: it
        // was never handed out.
        for unlink_on_drop in [true, false] {
            let name = unique("refused-shm");
            fail(&lib, Some(call));
            let shm = ShmOptions { unlink_on_drop, ..Default::default() };
            let options = CudaShmOptions { device_read_only: true, shm, ..Default::default() };
            gpu_error(&CudaShmBackend::create(&name, 1 << 16, &options).map(drop), expected);
            fail(&lib, None);
            assert!(!PosixShmBackend::exists(&name).unwrap(), "{call}: the segment was left ({unlink_on_drop})");
            assert_eq!(held(), [0; 4], "{call}");
        }
    }
    for (call, expected) in [
        ("cuDeviceGetUuid_v2", "cuDeviceGetUuid_v2"),
        ("cuMemAlloc_v2", "cuMemAlloc"),
        ("cuIpcGetMemHandle", "cuIpcGetMemHandle"),
    ] {
        for unlink_on_drop in [true, false] {
            let name = unique("refused-ipc");
            fail(&lib, Some(call));
            let options =
                CudaIpcOptions { shm: ShmOptions { unlink_on_drop, ..Default::default() }, ..Default::default() };
            gpu_error(&CudaIpcBackend::create(&name, 1 << 16, &options).map(drop), expected);
            fail(&lib, None);
            assert!(!PosixShmBackend::exists(&name).unwrap(), "{call}: the segment was left ({unlink_on_drop})");
            assert_eq!(held(), [0; 4], "{call}");
        }
    }
    let device = CudaDeviceResource::new(0).unwrap();
    let pinned = CudaPinnedResource::new(0).unwrap();
    for (res, call, expected) in [
        (&device as &dyn MemoryResource, "cuMemAlloc_v2", "cuMemAlloc"),
        (&pinned as &dyn MemoryResource, "cuMemHostAlloc", "cuMemHostAlloc"),
    ] {
        for align in [256, 1 << 16] {
            fail(&lib, Some(call));
            gpu_error(&res.allocate(4096, align).map(drop), expected);
            fail(&lib, None);
            assert_eq!(held(), [0; 4], "{call}");
            let block = res.allocate(4096, align).unwrap();
            // SAFETY: from `allocate` with this size and alignment.
            unsafe { res.deallocate(block, 4096, align) };
            assert_eq!(held(), [0; 4], "{call}");
        }
    }
}

/// A driver call that answers success with address 0 hands out no memory: each is an error
/// (`Error::Gpu` naming the call), never a backend or block at address 0, and what the steps
/// before it made is undone.
#[test]
fn an_address_0_from_the_driver_is_an_error() {
    if !body_of("an_address_0_from_the_driver_is_an_error", &[]) || !fake_in_use() {
        return;
    }
    use hetmem_core::MemoryResource;
    use hetmem_gpu::cuda::{CudaDeviceResource, CudaPinnedResource};
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let held = || {
        ["fake_allocations", "fake_host_allocations", "fake_registrations", "fake_opened_handles"]
            .map(|c| counter(&lib, c))
    };
    let address_0 = |r: &hetmem_core::Result<()>, call: &str| {
        assert!(matches!(r, Err(Error::Gpu { call: c, code: 0, .. }) if *c == call), "{call} gave address 0: {r:?}")
    };
    let name = unique("null-shm");
    null(&lib, Some("cuMemHostGetDevicePointer_v2"));
    address_0(
        &CudaShmBackend::create(&name, 1 << 16, &CudaShmOptions::default()).map(drop),
        "cuMemHostGetDevicePointer",
    );
    null(&lib, None);
    assert!(!PosixShmBackend::exists(&name).unwrap(), "the segment was left");
    assert_eq!(held(), [0; 4], "the registration was left");

    let name = unique("null-ipc");
    null(&lib, Some("cuMemAlloc_v2"));
    address_0(&CudaIpcBackend::create(&name, 1 << 16, &CudaIpcOptions::default()).map(drop), "cuMemAlloc");
    null(&lib, None);
    assert!(!PosixShmBackend::exists(&name).unwrap(), "the segment was left");

    let device = CudaDeviceResource::new(0).unwrap();
    let pinned = CudaPinnedResource::new(0).unwrap();
    for (res, call, expected) in [
        (&device as &dyn MemoryResource, "cuMemAlloc_v2", "cuMemAlloc"),
        (&pinned as &dyn MemoryResource, "cuMemHostAlloc", "cuMemHostAlloc"),
    ] {
        for align in [256, 1 << 16] {
            null(&lib, Some(call));
            address_0(&res.allocate(4096, align).map(drop), expected);
            null(&lib, None);
            let block = res.allocate(4096, align).unwrap();
            // SAFETY: from `allocate` with this size and alignment.
            unsafe { res.deallocate(block, 4096, align) };
        }
    }
    let block = pinned.allocate(64, 16).unwrap();
    null(&lib, Some("cuMemHostGetDevicePointer_v2"));
    address_0(&pinned.device_address(block).map(drop), "cuMemHostGetDevicePointer");
    null(&lib, None);
    // SAFETY: from `allocate` with this size and alignment.
    unsafe { pinned.deallocate(block, 64, 16) };
    assert_eq!(held(), [0; 4]);
}

/// `attach_timeout` bounds the whole of an IPC attach: waiting for the segment's header, then for
/// the creator's record. A creator that initialises the header late and never publishes its record
/// times the attacher out after the timeout, not after the header's wait plus another timeout.
#[test]
fn ipc_attach_waits_at_most_its_timeout_in_all() {
    if !body_of("ipc_attach_waits_at_most_its_timeout_in_all", &[]) || !fake_in_use() {
        return;
    }
    use hetmem_core::header::RegionHeader;
    use hetmem_core::{BackendId, BackendKind};
    use std::time::{Duration, Instant};
    let name = unique("slow");
    let c_name = std::ffi::CString::new(name.clone()).unwrap();
    let len = 2 * hetmem_core::header::HEADER_SIZE;
    // A creator of our own: the segment exists, sized, with its header not yet written.
    // SAFETY: plain POSIX calls on a new segment of our own, checked below.
    let base = unsafe {
        let fd = libc::shm_open(c_name.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600);
        assert!(fd >= 0, "shm_open");
        assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
        let p =
            libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        libc::close(fd);
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    };
    // The header comes at half the timeout: the old double wait took 1.5x it, and the bound
    // below leaves 0.8 s for a loaded machine's scheduling (not a timing claim).
    let timeout = Duration::from_millis(2000);
    let late = timeout.mul_f64(0.5);
    let creator = std::thread::spawn(move || {
        std::thread::sleep(late);
        // SAFETY: the mapping is `len` bytes, page-aligned; the attacher only reads the header
        // once it is marked ready.
        unsafe { RegionHeader::initialize(base as *mut u8, len, BackendKind::Device, BackendId(7), 1) }.map(drop)
    });
    let options = CudaIpcOptions {
        shm: hetmem_backends::ShmOptions { attach_timeout: timeout, ..Default::default() },
        ..Default::default()
    };
    let started = Instant::now();
    let attached = CudaIpcBackend::attach(&name, &options);
    let took = started.elapsed();
    creator.join().unwrap().unwrap();
    // SAFETY: our own mapping and name, no longer used.
    unsafe {
        libc::munmap(base as *mut libc::c_void, len as usize);
        libc::shm_unlink(c_name.as_ptr());
    }
    assert!(matches!(attached, Err(Error::TimedOut { .. })), "{attached:?}");
    assert!(took < timeout + Duration::from_millis(800), "waited {took:?} with a timeout of {timeout:?}");
}

/// Copies through views are queued, and safe code may drop a backend right after queueing one:
/// the backend must not unregister or free its memory while device work may still use it (the
/// driver documents no such wait). The fake counts memory released with a copy still pending.
#[test]
fn dropping_a_backend_waits_for_queued_copies() {
    if !body_of("dropping_a_backend_waits_for_queued_copies", &[]) || !fake_in_use() {
        return;
    }
    use hetmem_core::header::HEADER_SIZE;
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let shm = CudaShmBackend::create(&unique("queued-shm"), 1 << 16, &CudaShmOptions::default()).unwrap();
    let ipc = CudaIpcBackend::create(&unique("queued-ipc"), 1 << 16, &CudaIpcOptions::default()).unwrap();
    let stream = shm.context().default_stream();
    {
        let from = shm.device_view::<u32>(HEADER_SIZE, 1024, &stream).unwrap();
        let mut to = shm.device_view::<u32>(HEADER_SIZE + 4096, 1024, &stream).unwrap();
        stream.memcpy_dtod(&from, &mut to).unwrap(); // safe: queued on the stream
    }
    drop(shm);
    {
        let from = ipc.device_view::<u32>(HEADER_SIZE, 1024, &stream).unwrap();
        let mut to = ipc.device_view::<u32>(HEADER_SIZE + 4096, 1024, &stream).unwrap();
        stream.memcpy_dtod(&from, &mut to).unwrap();
    }
    drop(ipc);
    assert_eq!(counter(&lib, "fake_registrations"), 0);
    assert_eq!(counter(&lib, "fake_allocations"), 0);
    assert_eq!(counter(&lib, "fake_unsynced_releases"), 0, "memory released while a queued copy could still use it");
}

/// Pinned segments are registered portable (every context may use them) and IPC memory is reached
/// by peers: a copy into either queued on another device's stream, from safe code, may still run
/// when the backend drops. The drop must wait for it too, not only for its own context's work.
#[test]
fn dropping_a_backend_waits_for_copies_queued_on_another_device() {
    const NAME: &str = "dropping_a_backend_waits_for_copies_queued_on_another_device";
    if !body_of(NAME, &[("FAKE_CUDA_DEVICES", "2".into())]) || !fake_in_use() {
        return;
    }
    use hetmem_core::header::HEADER_SIZE;
    use hetmem_core::MemoryResource;
    use hetmem_gpu::cuda::{context, CudaDeviceResource, DeviceView};
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    assert_eq!(driver().unwrap().device_count, 2, "the fake has a second device");
    let other = CudaDeviceResource::new(1).unwrap();
    let block = other.allocate(4096, 256).unwrap();
    let stream1 = context(1).unwrap().default_stream();
    // SAFETY: a live 4096-byte block of device 1, freed after the view's last use.
    let from = unsafe { DeviceView::<u32>::from_block(block, 4096, 1024, &stream1) }.unwrap();
    let stream0 = context(0).unwrap().default_stream();
    let shm = CudaShmBackend::create(&unique("peer-shm"), 1 << 16, &CudaShmOptions::default()).unwrap();
    {
        let mut to = shm.device_view::<u32>(HEADER_SIZE, 1024, &stream0).unwrap();
        stream1.memcpy_dtod(&from, &mut to).unwrap(); // queued on device 1
    }
    drop(shm);
    assert_eq!(counter(&lib, "fake_unsynced_releases"), 0, "a segment unregistered under device 1's queued copy");
    let ipc = CudaIpcBackend::create(&unique("peer-ipc"), 1 << 16, &CudaIpcOptions::default()).unwrap();
    {
        let mut to = ipc.device_view::<u32>(HEADER_SIZE, 1024, &stream0).unwrap();
        stream1.memcpy_dtod(&from, &mut to).unwrap();
    }
    drop(ipc);
    assert_eq!(counter(&lib, "fake_unsynced_releases"), 0, "IPC memory freed under device 1's queued copy");
    drop(from);
    // SAFETY: from `allocate` with this size and alignment; its view is gone.
    unsafe { other.deallocate(block, 4096, 256) };
    assert_eq!(counter(&lib, "fake_allocations"), 0);
    assert_eq!(counter(&lib, "fake_registrations"), 0);
}

/// A segment registered read-only for the device (the fake device supports it) gives no
/// writable view, whose device writes would fault; it gives read-only views, which cudarc copies
/// only read. A segment registered read-write gives both.
#[test]
fn a_read_only_registration_gives_only_read_only_views() {
    if !body_of("a_read_only_registration_gives_only_read_only_views", &[]) || !fake_in_use() {
        return;
    }
    let stream = hetmem_gpu::cuda::context(0).unwrap().default_stream();
    let offset = hetmem_core::header::HEADER_SIZE;
    let options = CudaShmOptions { device_read_only: true, ..CudaShmOptions::default() };
    let ro = CudaShmBackend::create(&unique("ro"), 1 << 16, &options).unwrap();
    assert!(ro.device_read_only());
    let refused = ro.device_view::<u32>(offset, 4, &stream);
    assert!(matches!(refused, Err(Error::Unsupported(why)) if why.contains("read_only_view")), "{refused:?}");
    assert!(ro.device_view_at::<u32>(OffsetPtr::new(offset), 4, &stream).is_err());
    let view = ro.read_only_view::<u32>(offset, 4, &stream).unwrap();
    assert_eq!(view.device_address(), ro.device_ptr().unwrap() + offset);
    assert_eq!(view.len(), 4);
    assert!(matches!(ro.read_only_view::<u32>(ro.len(), 1, &stream), Err(Error::OutOfBounds { .. })));
    let rw = CudaShmBackend::create(&unique("rw"), 1 << 16, &CudaShmOptions::default()).unwrap();
    assert!(!rw.device_read_only());
    let writable = rw.device_view::<u32>(offset, 4, &stream).unwrap();
    let read_only = rw.read_only_view_at::<u32>(OffsetPtr::new(offset), 4, &stream).unwrap();
    assert_eq!(writable.device_address(), read_only.device_address());
}

/// This thread's current context, as the driver tells it.
fn current_context() -> cudarc::driver::sys::CUcontext {
    let mut now = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the driver is loaded and initialised (`driver()` answered).
    let rc = unsafe { cudarc::driver::sys::cuCtxGetCurrent(&mut now) };
    assert_eq!(rc, cudarc::driver::sys::CUresult::CUDA_SUCCESS);
    now
}

/// hetmem's calls leave the caller's thread bound to the context it was (or to none), as RMM's
/// device guards do: before, every call that worked on device 0 left device 0's context current,
/// so the caller's next raw driver call went to the wrong device.
#[test]
fn calls_leave_the_callers_current_context_as_they_found_it() {
    const NAME: &str = "calls_leave_the_callers_current_context_as_they_found_it";
    if !body_of(NAME, &[("FAKE_CUDA_DEVICES", "2".into())]) || !fake_in_use() {
        return;
    }
    use hetmem_core::MemoryResource;
    use hetmem_gpu::cuda::{context, CudaDeviceResource, CudaPinnedResource};
    assert!(current_context().is_null(), "a new thread has no current context");
    // Making a context (cudarc binds what it retains) leaves none current either.
    let mine = context(1).unwrap();
    assert!(current_context().is_null(), "making device 1's context bound it");
    mine.bind_to_thread().unwrap();
    let expect = current_context();
    assert_eq!(expect, mine.cu_ctx());
    let check = |what: &str| assert_eq!(current_context(), expect, "{what} left another context current");
    let shm = CudaShmBackend::create(&unique("ctx-shm"), 1 << 16, &CudaShmOptions::default()).unwrap();
    check("CudaShmBackend::create");
    let ipc = CudaIpcBackend::create(&unique("ctx-ipc"), 1 << 16, &CudaIpcOptions::default()).unwrap();
    check("CudaIpcBackend::create");
    let device = CudaDeviceResource::new(0).unwrap();
    let pinned = CudaPinnedResource::new(0).unwrap();
    check("the resources' new");
    for res in [&device as &dyn MemoryResource, &pinned] {
        let block = res.allocate(4096, 256).unwrap();
        check(res.name());
        // SAFETY: from `allocate` with this size and alignment, freed once.
        unsafe { res.deallocate(block, 4096, 256) };
        check(res.name());
    }
    let block = pinned.allocate(64, 16).unwrap();
    pinned.device_address(block).unwrap();
    pinned.block_flags(block).unwrap();
    check("CudaPinnedResource::device_address and block_flags");
    // SAFETY: as above.
    unsafe { pinned.deallocate(block, 64, 16) };
    drop((shm, ipc));
    check("dropping the backends");
    // With no context current, none is current after either.
    // SAFETY: unbinding this thread; null is a valid argument.
    unsafe { cudarc::driver::sys::cuCtxSetCurrent(std::ptr::null_mut()) };
    let block = device.allocate(4096, 256).unwrap();
    assert!(current_context().is_null(), "an allocation left a context current");
    // SAFETY: as above.
    unsafe { device.deallocate(block, 4096, 256) };
    assert!(current_context().is_null(), "a free left a context current");
}

/// An attacher killed with the memory open never counts itself out: the creator's `attached`
/// leaves it out once it is gone, and dropping the creator frees the memory (it used to stay
/// allocated until the creator exited, the dead attacher counted for good).
#[test]
fn an_attacher_killed_with_the_memory_open_does_not_keep_it_allocated() {
    const NAME: &str = "an_attacher_killed_with_the_memory_open_does_not_keep_it_allocated";
    const NAME_ENV: &str = "HETMEM_FAKE_CUDA_IPC_KILLED";
    if let Ok(name) = std::env::var(NAME_ENV) {
        // The attaching process: opens the memory, then dies without closing it.
        if !body_of(NAME, &[]) || !fake_in_use() {
            return;
        }
        let ipc = CudaIpcBackend::attach(&name, &CudaIpcOptions::default()).unwrap();
        assert_eq!(ipc.attached(), 1);
        // Gone without running destructors (`exit` runs none for the stack), as if killed.
        std::process::exit(3);
    }
    if !body_of(NAME, &[]) || !fake_in_use() {
        return;
    }
    let lib = PathBuf::from(std::env::var_os(DRIVER_ENV).unwrap());
    let name = unique("killed");
    let ipc = CudaIpcBackend::create(&name, 1 << 16, &CudaIpcOptions::default()).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(NAME_ENV, &name)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.code() == Some(3), "the attacher did not end as planned:\n{text}");
    assert_eq!(ipc.attached(), 0, "the killed attacher is still counted");
    drop(ipc);
    assert_eq!(counter(&lib, "fake_allocations"), 0, "the creator kept its memory for a dead attacher");
}
