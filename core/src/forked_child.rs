//! A test helper shared by core's unit tests (`testing.rs`), the workspace's fork tests
//! (`tests/fork.rs`) and the pthreads model's tests, which include this file.

/// Forks, runs `f` in the child, and returns whether it returned true there. A child that has
/// not finished after 20 s is killed and counts as failed (a hang). `f` runs in a copy of this
/// multi-threaded test process: it must not wait for what another thread may hold.
pub(crate) fn in_a_forked_child(f: impl FnOnce() -> bool) -> bool {
    // SAFETY: fork(2); the child runs `f` alone and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(false);
        // SAFETY: ends the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let start = std::time::Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) on our own child.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if start.elapsed() < std::time::Duration::from_secs(20) => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            0 => {
                // SAFETY: kill(2) and waitpid(2) on our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return false;
            }
            done => {
                assert_eq!(done, pid);
                return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            }
        }
    }
}
