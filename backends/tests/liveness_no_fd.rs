//! A process that has used up its file descriptors cannot read `/proc/<pid>/stat`; that says
//! nothing of the process asked about, which must not be called dead (its memory would be
//! handed out again). A test binary of its own: it lowers this process's descriptor limit.

#[cfg(target_os = "linux")]
#[test]
fn a_stat_file_that_cannot_be_opened_calls_no_process_dead() {
    use hetmem_backends::ProcLiveness;
    use hetmem_core::liveness::{ProcessLiveness, ProcessStamp};

    let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let stamp = ProcessStamp { pid: child.id(), start_time: 0 };
    assert!(ProcLiveness.is_alive(stamp));
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with valid pointers; only this test runs in this binary.
    unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0) };
    let low = libc::rlimit { rlim_cur: 64.min(old.rlim_cur), rlim_max: old.rlim_max };
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0) };
    let mut held = Vec::new();
    let exhausted = loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => break e.raw_os_error() == Some(libc::EMFILE),
        }
        if held.len() > 4096 {
            break false;
        }
    };
    let alive = ProcLiveness.is_alive(stamp);
    drop(held);
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0) };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(exhausted, "the descriptors were not used up");
    assert!(alive, "a running process was called dead because its stat file could not be opened");
}
