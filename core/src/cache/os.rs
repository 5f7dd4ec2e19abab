//! What the caches ask of the operating system: is this the process's main thread, and a
//! message on stderr written without allocating.

/// Whether the calling thread is the process's main thread. Where the OS cannot tell cheaply,
/// `false` (the thread then starts as a worker until told otherwise).
pub(crate) fn is_main_thread() -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: both calls only read the caller's ids.
        unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t == libc::getpid() }
    }
    #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
    {
        // SAFETY: reads the calling thread's flag.
        unsafe { libc::pthread_main_np() == 1 }
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd"
    )))]
    {
        false
    }
}

/// Writes `parts` to stderr, one after the other, without allocating (from inside an
/// allocator). Where the OS offers no such call here, nothing.
pub(crate) fn write_stderr(parts: &[&[u8]]) {
    #[cfg(unix)]
    for part in parts {
        // SAFETY: writes `part`'s bytes, which it borrows for the call, to stderr.
        let _ = unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    #[cfg(not(unix))]
    let _ = parts;
}
