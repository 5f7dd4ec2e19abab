//! [`ProcLiveness`]: whether a process still runs, for hetmem-core's crash recovery.
//!
//! Linux names a process by its pid and its start time (field 22 of `/proc/<pid>/stat`, clock
//! ticks since boot), so a recycled pid is told apart from the process that died. Elsewhere on
//! unix the check is `kill(pid, 0)` and the start time is unknown (0).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hetmem_core::fork;
use hetmem_core::liveness::{self, ProcessLiveness, ProcessStamp};

/// The unix implementation of [`ProcessLiveness`].
///
/// It sees the processes of the calling process's pid namespace: processes that share a segment
/// must share one (containers sharing `/dev/shm` share their pid namespace too, e.g. Docker's
/// `--ipc=host` with `--pid=host`). A process of another namespace would look dead, and what it
/// holds would be taken back.
#[derive(Debug, Default)]
pub struct ProcLiveness;

static HOOK: &dyn ProcessLiveness = &ProcLiveness;

/// Installs [`ProcLiveness`] as this process's hook unless another is installed. The
/// shared-memory backends call this, so allocators in shared segments can recover from crashes.
pub fn install() {
    liveness::install(&HOOK);
}

/// What `/proc/<pid>/stat` tells of a process.
#[cfg(target_os = "linux")]
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// No such process, or one that has exited (a zombie waiting for its parent to reap it: its
    /// memory is already gone).
    Gone,
    /// It runs; its start time, where the file could be read and parsed.
    Running(Option<u64>),
}

/// Process `pid` as `/proc/<pid>/stat` shows it. Only a missing file that `kill(pid, 0)`
/// confirms (a process hidden by `hidepid` has no file but exists), or a zombie, is `Gone`:
/// a file that cannot be read for another reason (no file descriptor left, no permission) or
/// parsed says nothing, and the process counts as running.
#[cfg(target_os = "linux")]
fn seen(pid: u32) -> Seen {
    let stat = match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return if exists(pid) { Seen::Running(None) } else { Seen::Gone };
        }
        Err(_) => return Seen::Running(None),
    };
    // Read as bytes: the command name (field 2) may hold any bytes, UTF-8 or not.
    // The name is in parentheses and may contain spaces and ')': count from the last ')'.
    let Some(close) = stat.iter().rposition(|&b| b == b')') else {
        return Seen::Running(None);
    };
    // `rest` starts at field 3: fields[0] is the state, [17] the thread count, [19] the start time.
    let Ok(rest) = std::str::from_utf8(&stat[close + 1..]) else {
        return Seen::Running(None);
    };
    let fields: Vec<&str> = rest.split_whitespace().take(20).collect();
    // A zombie main thread whose other threads still run is a live process: the count includes
    // the main thread until the whole process is reaped.
    if matches!(fields.first(), Some(&"Z" | &"X")) && fields.get(17).is_none_or(|&threads| threads == "1") {
        return Seen::Gone;
    }
    Seen::Running(fields.get(19).and_then(|t| t.parse().ok()))
}

/// Whether `kill(pid, 0)` finds process `pid` (`EPERM`: it exists, owned by another user).
/// A pid that is no process's (0, or past `pid_t`) is not asked about: `kill` would take it for
/// a process group.
fn exists(pid: u32) -> bool {
    match libc::pid_t::try_from(pid) {
        Ok(0) => true,
        Ok(pid) => {
            // SAFETY: kill with signal 0 only checks whether the process exists.
            let rc = unsafe { libc::kill(pid, 0) };
            rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
        }
        Err(_) => false,
    }
}

// SAFETY: on Linux a process is dead only when its `/proc/<pid>/stat` is missing and
// `kill(pid, 0)` finds no such process, names a zombie with no other thread running, or gives
// another start time (a recycled pid); a file that cannot be read or parsed counts as alive.
// Elsewhere it is dead only when `kill(pid, 0)` answers that there is no such process. `current`
// names the calling process, per fork generation. Processes of one pid namespace are assumed
// (see `ProcLiveness`).
unsafe impl ProcessLiveness for ProcLiveness {
    fn current(&self) -> ProcessStamp {
        // Cached per fork generation: a forked child is another process (its own pid and start
        // time), and must not mark owners and blocks as its parent.
        static GENERATION: AtomicU64 = AtomicU64::new(u64::MAX);
        static PID: AtomicU32 = AtomicU32::new(0);
        static START: AtomicU64 = AtomicU64::new(0);
        let generation = fork::generation();
        if GENERATION.load(Ordering::Acquire) == generation {
            return ProcessStamp { pid: PID.load(Ordering::Relaxed), start_time: START.load(Ordering::Relaxed) };
        }
        let pid = std::process::id();
        #[cfg(target_os = "linux")]
        let start_time = match seen(pid) {
            Seen::Running(Some(t)) => t,
            _ => 0,
        };
        #[cfg(not(target_os = "linux"))]
        let start_time = 0;
        if fork::watch().is_err() {
            // Forks are not counted: a cached stamp could be a parent's.
            return ProcessStamp { pid, start_time };
        }
        // Threads that race here store the same values; after a fork the child has one thread.
        PID.store(pid, Ordering::Relaxed);
        START.store(start_time, Ordering::Relaxed);
        GENERATION.store(generation, Ordering::Release);
        ProcessStamp { pid, start_time }
    }

    fn is_alive(&self, stamp: ProcessStamp) -> bool {
        #[cfg(target_os = "linux")]
        {
            match seen(stamp.pid) {
                Seen::Gone => false,
                // Compare only the bits the stamp kept (it may have been shortened), and only
                // with a start time read.
                Seen::Running(None) => true,
                Seen::Running(Some(_)) if stamp.start_time == 0 => true,
                // A stamp may keep only the low 16 or 32 bits of the start time.
                Seen::Running(Some(t)) => {
                    let s = stamp.start_time;
                    t == s || (s <= 0xffff && t & 0xffff == s) || (s <= 0xffff_ffff && t & 0xffff_ffff == s)
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            exists(stamp.pid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_child_is_not() {
        let me = ProcLiveness.current();
        assert_eq!(me.pid, std::process::id());
        assert!(ProcLiveness.is_alive(me));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!ProcLiveness.is_alive(ProcessStamp { pid, start_time: 0 }));
        #[cfg(target_os = "linux")]
        {
            assert_ne!(me.start_time, 0);
            let recycled = ProcessStamp { start_time: me.start_time + 1, ..me };
            assert!(!ProcLiveness.is_alive(recycled), "same pid, other start time");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_exited_child_not_yet_reaped_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let stamp = ProcessStamp { pid: child.id(), start_time: 0 };
        // Until its parent reaps it, the child stays in the process table as a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while ProcLiveness.is_alive(stamp) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let alive = ProcLiveness.is_alive(stamp);
        child.wait().unwrap();
        assert!(!alive, "a zombie was reported alive");
    }

    /// Forks a child that runs `child` (system calls only, never returning) with the write end
    /// of a pipe, and returns its pid once it has written to the pipe with `ready`.
    #[cfg(target_os = "linux")]
    fn fork_child(child: fn(ready_fd: i32) -> !) -> libc::pid_t {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) with a valid two-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fork(2); the child runs only `child`, which never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            child(fds[1]);
        }
        let mut byte = 0u8;
        // SAFETY: read one byte into a valid buffer, then close both ends of our pipe.
        unsafe {
            assert_eq!(libc::read(fds[0], (&mut byte as *mut u8).cast(), 1), 1);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        pid
    }

    #[cfg(target_os = "linux")]
    fn ready(fd: i32) {
        // SAFETY: writes one byte from a valid buffer.
        unsafe { libc::write(fd, b"r".as_ptr().cast(), 1) };
    }

    #[cfg(target_os = "linux")]
    fn kill_and_reap(pid: libc::pid_t) {
        let mut status = 0;
        // SAFETY: kill and reap our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
    }

    #[cfg(target_os = "linux")]
    fn wait_forever() -> ! {
        loop {
            // SAFETY: pause(2) has no preconditions.
            unsafe { libc::pause() };
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_whose_main_thread_exited_while_others_run_is_alive() {
        extern "C" fn thread(_: *mut libc::c_void) -> *mut libc::c_void {
            wait_forever()
        }
        let pid = fork_child(|ready_fd| {
            // SAFETY: pthread_create with a valid out-pointer and a function that never returns;
            // the exit system call (not exit_group) ends only this thread, without unwinding.
            unsafe {
                let mut other = std::mem::zeroed();
                if libc::pthread_create(&mut other, std::ptr::null(), thread, std::ptr::null_mut()) != 0 {
                    libc::_exit(1);
                }
                ready(ready_fd);
                libc::syscall(libc::SYS_exit, 0);
                libc::_exit(1)
            }
        });
        // Wait until the main thread has become a zombie.
        let stat = format!("/proc/{pid}/stat");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read_to_string(&stat).unwrap().contains(") Z ") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let alive = ProcLiveness.is_alive(ProcessStamp { pid: pid as u32, start_time: 0 });
        kill_and_reap(pid);
        assert!(alive, "a process still running a thread was reported dead");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_whose_name_is_not_utf8_is_alive() {
        // The kernel cuts a command name at 15 bytes, which may split a UTF-8 character; a name
        // set with prctl may hold any bytes.
        let pid = fork_child(|ready_fd| {
            // SAFETY: prctl with a NUL-terminated name.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"\xff\xfe hetmem )".as_ptr()) };
            ready(ready_fd);
            wait_forever()
        });
        let alive = ProcLiveness.is_alive(ProcessStamp { pid: pid as u32, start_time: 0 });
        kill_and_reap(pid);
        assert!(alive, "a live process with a non-UTF-8 name was reported dead");
    }
}
