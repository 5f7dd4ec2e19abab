//! A `hetmem_core::sync::Mutex` in a shared segment, held by another process: while that process
//! runs its lock is never taken from it, not even by naming its owner token; once it is killed,
//! `lock_or_recover` takes the lock over and repairs the value.

#[cfg(target_os = "linux")]
#[test]
fn a_live_holders_lock_is_never_taken_and_a_killed_ones_is_recovered() {
    use hetmem_backends::{PosixShmBackend, ShmOptions};
    use hetmem_core::header::HEADER_SIZE;
    use hetmem_core::sync::Mutex;
    use hetmem_core::MemoryBackend;

    let name = format!("/hetmem-test-mutex-{}", std::process::id());
    let segment = PosixShmBackend::create(&name, 4096, &ShmOptions::default()).unwrap();
    // SAFETY: the first page past the header, page-aligned and zero-filled by the OS: all-zero
    // bytes are a free `Mutex<u64>` holding 0, and both processes use it only as that mutex.
    let mutex = unsafe { &*segment.base().add(HEADER_SIZE as usize).cast::<Mutex<u64>>() };

    let mut fds = [0; 2];
    // SAFETY: pipe(2) with a valid two-int array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fork(2); the child only takes the lock, writes one byte and waits to be killed.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut guard = mutex.lock();
        *guard = 41;
        core::mem::forget(guard);
        // SAFETY: writes one byte from a valid buffer; pause(2) has no preconditions.
        unsafe {
            libc::write(fds[1], b"l".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    let mut byte = 0u8;
    // SAFETY: reads one byte into a valid buffer, then closes both ends of our pipe.
    unsafe {
        assert_eq!(libc::read(fds[0], (&mut byte as *mut u8).cast(), 1), 1);
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let holder = mutex.owner().expect("the child holds the lock");
    assert_eq!(hetmem_core::sync::owner_pid(holder), pid as u32);
    assert!(mutex.try_lock().is_none());
    let stolen = mutex.recover(holder).is_some();

    let mut status = 0;
    // SAFETY: kill and reap our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
    }
    assert!(!stolen, "a running process's lock was taken from it by naming its owner token");

    let mut repaired = false;
    let mut guard = mutex.lock_or_recover(|value| {
        repaired = true;
        *value += 1;
    });
    assert!(repaired, "the killed holder's lock was handed out without repair");
    assert_eq!(*guard, 42);
    *guard = 0;
    drop(guard);
    assert_eq!(mutex.owner(), None);
}
