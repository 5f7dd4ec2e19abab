//! [`ProcLiveness`]: whether a process still runs, for hetmem-core's crash recovery.
//!
//! Linux names a process by its pid and its start time (field 22 of `/proc/<pid>/stat`, clock
//! ticks since boot), so a recycled pid is told apart from the process that died. Elsewhere on
//! unix the check is `kill(pid, 0)` and the start time is unknown (0).
//!
//! The kernel shows a start time shifted by the *reader's* time namespace's boot-clock offset,
//! so two processes in different time namespaces read different start times for one process:
//! each reading here takes its own offset off first (`ProcView`). A `/proc` of another pid
//! namespace than the caller's (one `unshare --pid` left in place) names other processes under
//! the caller's pids: it is not read at all then.

#[cfg(target_os = "linux")]
use std::sync::atomic::AtomicI64;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hetmem_core::fork;
use hetmem_core::liveness::{self, ProcessLiveness, ProcessStamp};

/// The unix implementation of [`ProcessLiveness`].
///
/// It sees the processes of the calling process's pid namespace: processes that share a segment
/// must share one (containers sharing `/dev/shm` share their pid namespace too, e.g. Docker's
/// `--ipc=host` with `--pid=host`). A process of another namespace would look dead, and what it
/// holds would be taken back. Where `/proc` is another pid namespace's, only `kill(pid, 0)` is
/// asked, and start times are unknown (0). Time namespaces may differ: start times are compared
/// as the initial time namespace shows them.
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
    /// The file could not be read just now (no file descriptor left, say): it says nothing.
    Unread,
}

/// Whether a failed read of `/proc` may pass (a file descriptor or memory short): what it
/// would tell is asked again next time rather than kept unknown.
#[cfg(target_os = "linux")]
fn transient(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR))
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
        Err(e) if transient(&e) => return Seen::Unread,
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

/// How this process may read `/proc`: it changes only across a fork (a child of a process that
/// called `unshare` is in the new namespaces), so it is read once per fork generation.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcView {
    /// `/proc` is another pid namespace's (`/proc/self` is not this process's pid): its
    /// `/proc/<pid>` is some other process, so only `kill(pid, 0)` is asked.
    Foreign,
    /// This pid namespace's `/proc`, whose start times less `offset` clock ticks (this process's
    /// time namespace's boot-clock offset, which the kernel adds to each start time it shows
    /// this process) are those every reader gets.
    Ours { offset: i64 },
    /// This pid namespace's `/proc`, but the offset cannot be known (this process called
    /// `unshare(CLONE_NEWTIME)`, it is not a whole number of ticks, or its files may not be
    /// read): its start times are not compared.
    OursWithoutStartTimes,
    /// A file could not be read just now (no file descriptor left, say): nothing is known, not
    /// even whether `/proc` is this pid namespace's, so only `kill(pid, 0)` is asked, as for
    /// [`ProcView::Foreign`]; the view is read again next time.
    Unread,
}

#[cfg(target_os = "linux")]
impl ProcView {
    /// The cached word of [`ProcView::Foreign`] (no offset comes near it).
    const FOREIGN: i64 = i64::MIN;

    /// The view, cached per fork generation (as [`ProcLiveness::current`] is).
    fn get() -> ProcView {
        static GENERATION: AtomicU64 = AtomicU64::new(u64::MAX);
        static VIEW: AtomicI64 = AtomicI64::new(ProcView::FOREIGN);
        let generation = fork::generation();
        if GENERATION.load(Ordering::Acquire) == generation {
            return match VIEW.load(Ordering::Relaxed) {
                Self::FOREIGN => ProcView::Foreign,
                offset => ProcView::Ours { offset },
            };
        }
        let view = Self::read();
        let word = match view {
            ProcView::Foreign => Self::FOREIGN,
            ProcView::Ours { offset } => offset,
            // Not knowing may pass (a file descriptor short): asked again next time.
            ProcView::OursWithoutStartTimes | ProcView::Unread => return view,
        };
        if fork::watch().is_ok() {
            // Threads that race here store the same value; after a fork the child has one thread.
            VIEW.store(word, Ordering::Relaxed);
            GENERATION.store(generation, Ordering::Release);
        }
        view
    }

    fn read() -> ProcView {
        let link = match std::fs::read_link("/proc/self") {
            Ok(link) => link,
            Err(e) if transient(&e) => return ProcView::Unread,
            // No `/proc` (or one without `self`), or one we may not read, names no process of
            // ours that we can see.
            Err(_) => return ProcView::Foreign,
        };
        let ours = link.to_str().and_then(|pid| pid.parse::<u32>().ok()).is_some_and(|pid| pid == std::process::id());
        if !ours {
            return ProcView::Foreign;
        }
        match Self::boot_offset_ticks() {
            Ok(Some(offset)) if offset != Self::FOREIGN => ProcView::Ours { offset },
            Ok(_) => ProcView::OursWithoutStartTimes,
            Err(Unread) => ProcView::Unread,
        }
    }

    /// This process's time namespace's boot-clock offset in clock ticks: 0 on a kernel without
    /// time namespaces; `None` when unknown (`/proc/self/timens_offsets` shows the namespace of
    /// the process's future children, which differs from its own after it called `unshare`), or
    /// not a whole number of ticks; [`Unread`] when a file could not be read.
    fn boot_offset_ticks() -> Result<Option<i64>, Unread> {
        let offsets = match std::fs::read_to_string("/proc/self/timens_offsets") {
            Ok(offsets) => offsets,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(0)),
            Err(e) if transient(&e) => return Err(Unread),
            Err(_) => return Ok(None),
        };
        let link = |path| match std::fs::read_link(path) {
            Ok(link) => Ok(Some(link)),
            Err(e) if transient(&e) => Err(Unread),
            Err(_) => Ok(None),
        };
        let (Some(own), Some(for_children)) = (link("/proc/self/ns/time")?, link("/proc/self/ns/time_for_children")?)
        else {
            return Ok(None);
        };
        if own != for_children {
            return Ok(None);
        }
        Ok(Self::ticks(&offsets))
    }

    /// The boot-clock offset `/proc/self/timens_offsets` gives, in whole clock ticks.
    fn ticks(offsets: &str) -> Option<i64> {
        let mut fields = offsets.lines().find(|l| l.starts_with("boottime"))?.split_whitespace().skip(1);
        let seconds: i64 = fields.next()?.parse().ok()?;
        let nanoseconds: i64 = fields.next()?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = i64::from(u32::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?);
        if ticks_per_second == 0 || 1_000_000_000 % ticks_per_second != 0 {
            return None;
        }
        let tick = 1_000_000_000 / ticks_per_second;
        let offset = i128::from(seconds) * 1_000_000_000 + i128::from(nanoseconds);
        // The kernel rounds the shifted start time down to a tick: only a whole number of ticks
        // comes off exactly.
        if offset % i128::from(tick) != 0 {
            return None;
        }
        i64::try_from(offset / i128::from(tick)).ok()
    }

    /// A start time read from `/proc`, as the initial time namespace shows it; `None` when this
    /// view cannot say.
    fn start_time(self, read: u64) -> Option<u64> {
        match self {
            ProcView::Ours { offset } => u64::try_from(i128::from(read) - i128::from(offset)).ok(),
            _ => None,
        }
    }
}

/// A file of `/proc` could not be read just now.
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct Unread;

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
// another start time (a recycled pid), as the initial time namespace shows it (this process's
// offset taken off; start times are not compared where it is unknown), in the bits a shortened
// stamp kept (`ProcessStamp::may_have_started_at`, which accepts every shortening of the time); a file that cannot be
// read or parsed counts as alive. Where `/proc` is another pid namespace's (or its files could not
// be read just now), it is dead only when `kill(pid, 0)` finds no such process.
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
        // Whether the start time is settled: one that could not be read just now (a file
        // descriptor short) is 0 for this call only, and read again next time; kept, it would
        // name this process without a start time for good, so that what it holds stayed held
        // once it died and its pid was reused (see `is_alive`).
        #[cfg(target_os = "linux")]
        let (start_time, settled) = match ProcView::get() {
            ProcView::Foreign => (0, true),
            ProcView::Unread => (0, false),
            view => match seen(pid) {
                Seen::Running(Some(t)) => (view.start_time(t).unwrap_or(0), true),
                Seen::Unread => (0, false),
                _ => (0, true),
            },
        };
        #[cfg(not(target_os = "linux"))]
        let (start_time, settled) = (0, true);
        if !settled || fork::watch().is_err() {
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
            let view = ProcView::get();
            // Unread: `/proc` may be another pid namespace's, as far as we know (its files could
            // not be read just now); a zombie there could be some other process.
            if matches!(view, ProcView::Foreign | ProcView::Unread) {
                return exists(stamp.pid);
            }
            match seen(stamp.pid) {
                Seen::Gone => false,
                Seen::Unread => true,
                // Compare only the bits the stamp kept (it may have been shortened), and only
                // with a start time read and known as every reader sees it.
                Seen::Running(read) => match read.and_then(|t| view.start_time(t)) {
                    None => true,
                    // A stamp without a start time (its process could not read it: a `/proc` of
                    // another pid namespace, a time namespace of unknown offset, a non-Linux
                    // build) names whichever process has the pid. If that is not the one that
                    // wrote the stamp (the pid was reused), the stamp's holder stays "alive", and
                    // what it holds stays held, for as long as the new process runs. Nothing here
                    // can tell the two apart soundly: the stamp carries no time it was written, so
                    // a process that started after the writer's death looks the same as the writer
                    // itself, and calling a live writer dead would hand out what it still uses
                    // (the trait's promise). Processes that can read their start time always
                    // record it (`current` does not keep a 0 it got from a failed read).
                    Some(_) if stamp.start_time == 0 => true,
                    // A stamp may keep only the low 16 or 32 bits of the start time.
                    Some(t) => stamp.may_have_started_at(t),
                },
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

    /// A process whose start time's low 32 bits (or 16) were 0 wrote them as 0, "unknown", in
    /// a shortened stamp: once it died and another process got its pid, the stamp still read as
    /// alive, and what it held stayed held for good. Here the pid is this process's, and the
    /// dead process started at an earlier time whose kept bits are 0.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_shortened_stamp_of_a_start_time_whose_low_bits_are_0_is_dead_once_its_pid_is_reused() {
        use hetmem_core::liveness::StartTimeBits;
        let me = ProcLiveness.current();
        assert_ne!(me.start_time, 0);
        for bits in [StartTimeBits::Low16, StartTimeBits::Low32] {
            let width = bits as u32;
            // A start time of another process, with the kept bits 0 and the rest other than ours.
            let dead = ProcessStamp { start_time: ((me.start_time >> width) + 1) << width, ..me };
            // (Also where our kept bits are all 1s: the stamps are equal then too.)
            let ours_reads_as_all_ones = me.shortened(bits).start_time == (1 << width) - 1;
            let mut shortened = vec![dead.shortened(bits)];
            if bits == StartTimeBits::Low32 {
                shortened.push(ProcessStamp::from_word(dead.to_word()));
            }
            for stamp in shortened {
                // Only where our own start time's kept bits are 0 too are the two the same stamp.
                assert_eq!(ProcLiveness.is_alive(stamp), ours_reads_as_all_ones, "{bits:?}: {stamp:?}");
            }
            // This process's own stamp, shortened, is alive.
            assert!(ProcLiveness.is_alive(me.shortened(bits)), "{bits:?}");
            assert!(ProcLiveness.is_alive(ProcessStamp::from_word(me.to_word())));
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

    /// The start time (field 22) in a `/proc/<pid>/stat` text.
    #[cfg(target_os = "linux")]
    fn start_field(stat: &[u8]) -> u64 {
        let close = stat.iter().rposition(|&b| b == b')').unwrap();
        std::str::from_utf8(&stat[close + 1..]).unwrap().split_whitespace().nth(19).unwrap().parse().unwrap()
    }

    /// Forks a child that enters new namespaces (`flags`, with a user namespace so no privilege
    /// is needed), runs `setup` there, and forks a grandchild (the first process of the new pid or
    /// time namespace) that runs `check` and exits with its result (0 = pass). `check` gets the
    /// write end of a pipe; returns the child, for [`reap`], and the pipe's read end, which the
    /// caller reads (or closes) first. The child exits with 77 where this system cannot make such
    /// namespaces, and with the grandchild's status otherwise.
    #[cfg(target_os = "linux")]
    fn in_new_namespaces(
        flags: libc::c_int,
        setup: fn() -> bool,
        check: fn(report_fd: i32) -> i32,
    ) -> (libc::pid_t, i32) {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) with a valid two-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fork(2); the child makes the namespaces and the grandchild, and leaves with
        // `_exit` (77: the namespaces could not be made).
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            // SAFETY: unshare(2) in a single-threaded child; fork(2) and waitpid(2) on our own
            // grandchild; `_exit` leaves without the parent's exit handlers.
            unsafe {
                libc::close(fds[0]);
                let uid = libc::getuid();
                if libc::unshare(libc::CLONE_NEWUSER | flags) != 0 {
                    libc::_exit(77);
                }
                let mapped = std::fs::write("/proc/self/setgroups", "deny").is_ok()
                    && std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).is_ok();
                if !mapped || !setup() {
                    libc::_exit(77);
                }
                let grandchild = libc::fork();
                if grandchild == 0 {
                    // A panic must not unwind into the copy of the test harness.
                    libc::_exit(std::panic::catch_unwind(|| check(fds[1])).unwrap_or(3));
                }
                libc::close(fds[1]);
                let mut status = 0;
                libc::waitpid(grandchild, &mut status, 0);
                libc::_exit(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 2 });
            }
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        (child, fds[0])
    }

    /// Reaps the child of [`in_new_namespaces`]: its grandchild's exit status, `None` for a skip.
    #[cfg(target_os = "linux")]
    fn reap(child: libc::pid_t) -> Option<i32> {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status), "the namespaces' child was killed");
        match libc::WEXITSTATUS(status) {
            77 => {
                eprintln!("skipped: this system makes no user, pid or time namespaces");
                None
            }
            code => Some(code),
        }
    }

    /// A process in a pid namespace that kept its parent's `/proc` (`unshare --pid --fork`
    /// without `--mount-proc`): `/proc/<pid>` there names another namespace's process, whose
    /// start time is not this one's. Read as this process's, it made a live process (here the
    /// namespace's first, pid 1, reading the start time of the `/proc`'s pid 1) dead as soon as
    /// its true start time was given, and gave it a stamp with another process's start time,
    /// which called it dead once that process ended and its pid was reused.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_whose_proc_is_another_pid_namespaces_is_alive() {
        let _ = ProcLiveness.current();
        let (child, report) = in_new_namespaces(
            libc::CLONE_NEWPID,
            || true,
            |_| {
                // `/proc/self` is this process under the outer namespace's pid: its true stat.
                let real = start_field(&std::fs::read("/proc/self/stat").unwrap());
                let me = ProcessStamp { pid: std::process::id(), start_time: real };
                let alive = ProcLiveness.is_alive(me);
                let start = ProcLiveness.current().start_time;
                i32::from(!alive) | i32::from(start != 0 && start != real) << 1
            },
        );
        // SAFETY: closing the unused read end.
        unsafe { libc::close(report) };
        let Some(code) = reap(child) else { return };
        assert_eq!(code & 1, 0, "a live process was called dead from another namespace's /proc");
        assert_eq!(code & 2, 0, "a process's stamp carried another process's start time");
        assert_eq!(code, 0);
    }

    /// A process in a time namespace whose boot clock is ahead (a restored container, say) reads
    /// every start time that much later than a process outside it: each called the other dead.
    #[cfg(target_os = "linux")]
    #[test]
    fn processes_in_different_time_namespaces_see_each_other_alive() {
        let parent = ProcLiveness.current();
        assert_ne!(parent.start_time, 0);
        // The parent's stamp, for the grandchild (a copy of this memory).
        static PARENT: std::sync::Mutex<Option<ProcessStamp>> = std::sync::Mutex::new(None);
        *PARENT.lock().unwrap() = Some(parent);
        let (child, report) = in_new_namespaces(
            libc::CLONE_NEWTIME,
            || std::fs::write("/proc/self/timens_offsets", "boottime 1000 0").is_ok(),
            |report_fd| {
                let parent = PARENT.lock().map(|p| p.unwrap()).unwrap_or_default();
                let me = ProcLiveness.current();
                let mut msg = [0u8; 13];
                msg[..4].copy_from_slice(&me.pid.to_ne_bytes());
                msg[4..12].copy_from_slice(&me.start_time.to_ne_bytes());
                msg[12] = u8::from(ProcLiveness.is_alive(parent));
                // SAFETY: writes a valid buffer, then waits to be killed.
                unsafe {
                    libc::write(report_fd, msg.as_ptr().cast(), msg.len());
                    libc::pause();
                }
                0
            },
        );
        let mut msg = [0u8; 13];
        // SAFETY: reads into a valid buffer (nothing: the child skipped), then closes it.
        let got = unsafe { libc::read(report, msg.as_mut_ptr().cast(), msg.len()) };
        // SAFETY: as above.
        unsafe { libc::close(report) };
        let inside = (got == 13).then(|| {
            let pid = u32::from_ne_bytes(msg[..4].try_into().unwrap());
            let stamp = ProcessStamp { pid, start_time: u64::from_ne_bytes(msg[4..12].try_into().unwrap()) };
            let alive = ProcLiveness.is_alive(stamp);
            // SAFETY: kill(2) of the grandchild, which waits for it; its parent reaps it.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            (stamp, alive, msg[12] == 1)
        });
        if reap(child).is_none() {
            return;
        }
        let (stamp, alive, parent_alive) = inside.expect("the grandchild reported nothing");
        assert!(alive, "a process in a time namespace ({stamp:?}) was called dead from outside it");
        assert!(parent_alive, "a process outside a time namespace was called dead from inside it");
        assert_ne!(stamp.start_time, 0, "the namespace's offset is known, so is the start time");
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

    /// A process that could not read its start time for a moment (no file descriptor left when
    /// it first asked) named itself with start time 0 for the rest of its life: every lock and
    /// slot it held then stayed held for good once it died and another process got its pid.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_start_time_unknown_for_a_moment_is_read_again() {
        // Registers the fork watch, so that the child reads its stamp afresh.
        let _ = ProcLiveness.current();
        // SAFETY: fork(2); the child only sets its file limit, asks for its stamp, and leaves
        // with `_exit` (its result in the exit status).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: getrlimit/setrlimit with valid pointers; `_exit` leaves without the
            // parent's exit handlers.
            unsafe {
                let mut limit = std::mem::zeroed::<libc::rlimit>();
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                let saved = limit;
                limit.rlim_cur = 0; // no file can be opened: /proc cannot be read
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                let short = ProcLiveness.current().start_time;
                libc::setrlimit(libc::RLIMIT_NOFILE, &saved);
                let again = ProcLiveness.current().start_time;
                libc::_exit(i32::from(short != 0) | i32::from(again == 0) << 1);
            }
        }
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "the child was killed");
        let code = libc::WEXITSTATUS(status);
        assert_eq!(code & 1, 0, "a start time was read with no file descriptor to read it");
        assert_eq!(code & 2, 0, "a start time unknown for a moment stayed unknown (0) for good");
    }
}
