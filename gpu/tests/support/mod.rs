//! A small runner for the GPU test binaries (harness = false): they need to re-execute themselves
//! as the second process of cross-process tests, and to print why they skip on machines without a
//! GPU, which libtest's harness does not allow.
#![allow(dead_code)] // each test binary uses part of it

use std::io::{BufRead, BufReader, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use hetmem_core::{Error, MemoryResource};

/// A test: `Ok` passes, `Err` fails with the message (a panic fails too).
pub type TestFn = fn() -> Result<(), String>;

/// Runs `tests` whose name contains the first non-flag argument (all without one), prints one line
/// per test and a summary, and fails the process if any test failed. `suite` names the binary in
/// the summary, which ci/gpu-check.sh collects (`SUMMARY` lines).
pub fn run(suite: &str, tests: &[(&str, TestFn)]) -> ExitCode {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(test)).unwrap_or_else(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {text}"))
        });
        let ms = started.elapsed().as_millis();
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({ms} ms)");
            }
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED ({ms} ms): {why}");
            }
        }
    }
    println!("SUMMARY\t{suite}\t{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// If this process was started as a child (`--child role args...`), runs `role` and gives the exit
/// code to return from `main`.
pub fn run_as_child(run: fn(&str, &[String]) -> Result<(), String>) -> Option<ExitCode> {
    let (role, args) = child_role()?;
    Some(match run(&role, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("child {role}: {why}");
            ExitCode::FAILURE
        }
    })
}

/// Says why the whole suite is skipped; the process passes.
pub fn skip(suite: &str, why: &str) -> ExitCode {
    println!("skipping every test of {suite}: {why}");
    println!("SUMMARY\t{suite}\tskipped: {why}");
    ExitCode::SUCCESS
}

/// Runs this binary again as `--child role args...` and fails with its output if it fails.
pub fn child(role: &str, args: &[String]) -> Result<(), String> {
    let out = child_command(role, args)?.output().map_err(|e| format!("spawning the {role} child: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "the {role} child failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// This binary, to run again as `--child role args...`.
fn child_command(role: &str, args: &[String]) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut command = Command::new(exe);
    command.arg("--child").arg(role).args(args);
    Ok(command)
}

/// A child started by [`spawn_child`], still running: killed and waited for when dropped.
pub struct RunningChild {
    role: String,
    child: Child,
    lines: Receiver<String>,
}

/// Runs this binary again as `--child role args...` without waiting for it, its standard input,
/// output and error piped: it tells how far it got by printing lines
/// ([`RunningChild::expect_line`]), and finds its input closed should the test end without
/// killing it.
pub fn spawn_child(role: &str, args: &[String]) -> Result<RunningChild, String> {
    let mut child = child_command(role, args)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the {role} child: {e}"))?;
    let stdout = child.stdout.take().ok_or("the child's output is not piped")?;
    let (tx, lines) = mpsc::channel();
    // Read on a thread of its own so that waiting for a line can time out; it ends with the pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(RunningChild { role: role.to_string(), child, lines })
}

impl RunningChild {
    /// Waits up to `timeout` for the child to print the line `want`; fails, with the child's
    /// error output, if it exits or stays silent that long (and kills it then).
    pub fn expect_line(&mut self, want: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line == want => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!("printed no {want:?} within {timeout:?}")))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failure(&format!("ended before printing {want:?}")))
                }
            }
        }
    }

    /// Kills the child with SIGKILL and waits for it: how it ended.
    pub fn kill(mut self) -> Result<ExitStatus, String> {
        self.child.kill().map_err(|e| format!("killing the {} child: {e}", self.role))?;
        self.child.wait().map_err(|e| format!("waiting for the {} child: {e}", self.role))
    }

    /// Kills the child, and says `what` of it with how it ended and its error output.
    fn failure(&mut self, what: &str) -> String {
        let _ = self.child.kill();
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        format!("the {} child {what} ({status}): {stderr}", self.role)
    }
}

impl Drop for RunningChild {
    fn drop(&mut self) {
        // Already gone after `kill` or `failure`: then these only report that.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// If this process was started as a child (`--child role args...`), the role and its arguments.
fn child_role() -> Option<(String, Vec<String>)> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("--child") {
        return None;
    }
    let role = args.next()?;
    Some((role, args.collect()))
}

/// A segment name unique to this process and `tag`.
pub fn unique(tag: &str) -> String {
    format!("/hetmem-gpu-{tag}-{}", std::process::id())
}

/// Fails with `what` unless `cond`.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// The pattern the tests write: distinct per index and seed.
pub fn pattern(i: u32, seed: u32) -> u32 {
    seed ^ i.wrapping_mul(2_654_435_761)
}

/// Checks that `v[i]` is [`pattern`]`(i, seed)` for every `i`.
pub fn check_pattern(v: &[u32], seed: u32) -> Result<(), String> {
    for (i, &got) in v.iter().enumerate() {
        let want = pattern(i as u32, seed);
        ensure(got == want, || format!("element {i}: {got:#x}, expected {want:#x}"))?;
    }
    Ok(())
}

/// A request far past what the device has is `Error::OutOfMemory`, and the resource serves the
/// next request.
pub fn out_of_memory_leaves_it_usable(res: &dyn MemoryResource, huge: usize) -> Result<(), String> {
    let refused = res.allocate(huge, 256);
    ensure(matches!(refused, Err(Error::OutOfMemory { .. })), || format!("{huge} bytes: {refused:?}"))?;
    let after = res.allocate(1 << 20, 256).map_err(|e| format!("unusable after running out: {e}"))?;
    // SAFETY: from `allocate` just above, with this size and alignment.
    unsafe { res.deallocate(after, 1 << 20, 256) };
    Ok(())
}

/// Kernels the tests compile at run time with NVRTC. `fill` writes [`pattern`]`(i, seed)`.
pub const KERNELS: &str = r#"
extern "C" __global__ void fill(unsigned int* out, unsigned int n, unsigned int seed) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = seed ^ (i * 2654435761u);
}
extern "C" __global__ void copy_u32(unsigned int* out, const unsigned int* in, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i];
}
"#;

/// Kernels over the bitmap allocator's and the thread model's headers (prepended with
/// `hetmem_gpu::device::with_bitmap_header`). `bitmap_alloc_free`: thread `i` allocates
/// `sizes[i]` bytes, fills them with its index, keeps the block when `keep[i]` is set and frees it
/// otherwise; `offsets[i]` gets the offset (0: none) and `status[i]` the free's answer (1: kept).
#[allow(dead_code)]
pub const BITMAP_KERNELS: &str = r#"
extern "C" __global__ void bitmap_alloc_free(unsigned char *base, unsigned long long region,
                                             unsigned long long region_len,
                                             const unsigned int *sizes, const unsigned char *keep,
                                             unsigned long long *offsets, int *status, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    hetmem_bitmap heap = { base, region, region_len };
    unsigned long long off = hetmem_bitmap_alloc(heap, sizes[i], 16, hetmem_thread_id());
    offsets[i] = off;
    if (off == 0) { status[i] = -100; return; }
    for (unsigned int b = 0; b < sizes[i]; b++) base[off + b] = (unsigned char)i;
    status[i] = keep[i] ? 1 : hetmem_bitmap_free(heap, off);
}
extern "C" __global__ void thread_ids(unsigned long long *ids, unsigned long long *count, unsigned int sleep_us) {
    unsigned long long i = hetmem_thread_id();
    if (i == 0) *count = hetmem_thread_count();
    hetmem_yield();
    hetmem_sleep_for_us(sleep_us);
    ids[i] = i;
}
"#;
