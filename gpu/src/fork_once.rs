//! [`ForkOnce`]: a platform's start-up answer, worked out once per process and refused in a
//! forked child (neither CUDA nor HIP survives `fork()`: any call before an `exec` is undefined
//! behaviour, so nothing may call them there); or, for work that leaves no such state (finding
//! NVRTC), worked out again by a child whose parent had not finished it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use hetmem_core::{fork, Error, Result};

/// The answer of a start-up function, and the fork generation ([`hetmem_core::fork`]) it was given
/// in.
pub(crate) struct ForkOnce<T> {
    answer: OnceLock<(Result<T>, u64)>,
    /// 1 + the fork generation in which a thread began to work the answer out; 0 before one has.
    claimed: AtomicU64,
}

impl<T: Copy> ForkOnce<T> {
    pub(crate) const fn new() -> Self {
        ForkOnce { answer: OnceLock::new(), claimed: AtomicU64::new(0) }
    }

    /// `start`'s answer, from its first call in this process; `Unsupported(forked)` in a forked
    /// child of a process where it succeeded, or where another thread was still in `start` at the
    /// fork (that thread does not run in the child, so its answer would never come; and the
    /// driver it was starting is the parent's). Other threads of the process wait for the one in
    /// `start`. Forks are watched before `start` runs, so that every later one is counted.
    pub(crate) fn get(&self, start: impl FnOnce() -> Result<T>, forked: &'static str) -> Result<T> {
        self.resolve(start, |state, generation| match state {
            Ok(_) if generation != fork::generation() => Err(Error::Unsupported(forked)),
            state => state,
        })
        .unwrap_or(Err(Error::Unsupported(forked)))
    }

    /// For start-up work that leaves no state a forked child must not use (finding and loading a
    /// library, not starting a driver): `start`'s answer, from its first call in this process or
    /// in the parent before the fork; a forked child whose parent had a thread in `start` at the
    /// fork gets `again()` instead, every time (that thread does not run in the child, so its
    /// answer would never come, and the child's own answer has nowhere to be kept but the
    /// parent's unfinished slot). Other threads of the process wait for the one in `start`.
    #[cfg_attr(not(hetmem_cuda), allow(dead_code))] // NVRTC's search only
    pub(crate) fn get_or_again(
        &self,
        start: impl FnOnce() -> Result<T>,
        again: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.resolve(start, |state, _| state).unwrap_or_else(again)
    }

    /// Whether this is a forked child of a process that had run `start`, or had a thread in it at
    /// the fork. Starts nothing.
    #[cfg_attr(not(hetmem_cuda), allow(dead_code))] // CUDA's handles only
    pub(crate) fn started_before_a_fork(&self) -> bool {
        let now = fork::generation();
        match self.answer.get() {
            Some(&(_, generation)) => generation != now,
            None => match self.claimed.load(Ordering::Acquire) {
                0 => false,
                claim => claim != now + 1,
            },
        }
    }

    /// `answered(answer, generation)` once there is an answer (running `start` first if no thread
    /// has); `None` in a forked child whose parent had a thread in `start` at the fork.
    fn resolve(
        &self,
        start: impl FnOnce() -> Result<T>,
        answered: impl FnOnce(Result<T>, u64) -> Result<T>,
    ) -> Option<Result<T>> {
        loop {
            if let Some(&(state, generation)) = self.answer.get() {
                return Some(answered(state, generation));
            }
            let watched = fork::watch();
            let now = fork::generation();
            match self.claimed.compare_exchange(0, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // A `start` that panics leaves the claim to the next caller.
                    let unclaim = Unclaim(&self.claimed);
                    let answer = watched.and_then(|()| start());
                    std::mem::forget(unclaim);
                    // Only the claimant sets the answer, once.
                    let _ = self.answer.set((answer, now));
                    return Some(answer);
                }
                // Claimed in another generation: in the parent, by a thread this child lacks.
                Err(claim) if claim != now + 1 => return None,
                // Another thread of this process is in `start`.
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

/// Gives a claim back if `start` unwinds.
struct Unclaim<'a>(&'a AtomicU64);

impl Drop for Unclaim<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// For the crate's tests of what a forked child does: runs `child` in a forked child, bounded by
/// an alarm (3 s), and gives `Some` of what it returned (`false` if it panicked), or `None` if it
/// was killed (left waiting).
#[cfg(test)]
pub(crate) fn in_child(child: impl FnOnce() -> bool) -> Option<bool> {
    // SAFETY: fork(2); the child makes the calls in `child`, bounded by an alarm, and leaves
    // with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: alarm(2): a child left waiting dies of SIGALRM.
        unsafe { libc::alarm(3) };
        // A panic must not unwind out of here: the test's thread, the child's only one, would
        // end, and the process with it, with status 0.
        let returned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child));
        let code = if matches!(returned, Ok(true)) { 0 } else { 1 };
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    (!libc::WIFSIGNALED(status)).then(|| libc::WEXITSTATUS(status) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A child forked while another thread of its parent is still working the answer out (the
    /// driver's first load: `cuInit` can take a second) is refused at once: that thread does not
    /// run in the child, so waiting for it would wait for ever, and the start it was in the
    /// middle of is the parent's.
    #[test]
    fn a_child_forked_during_the_start_is_refused_rather_than_left_waiting() {
        static ONCE: ForkOnce<u32> = ForkOnce::new();
        let (began, wait_for_start) = mpsc::channel();
        let starter = std::thread::spawn(move || {
            ONCE.get(
                || {
                    began.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(1)
                },
                "forked",
            )
        });
        wait_for_start.recv().unwrap();
        let child = in_child(|| matches!(ONCE.get(|| Ok(2), "forked"), Err(Error::Unsupported("forked"))));
        assert_eq!(child, Some(true), "the child was left waiting for its parent's start (None) or not refused");
        assert_eq!(starter.join().unwrap(), Ok(1));
        assert_eq!(ONCE.get(|| Ok(3), "forked"), Ok(1), "the parent keeps its answer");
    }

    /// A child that panics (a failed assertion there) did not return true: it must not read as
    /// one that did. Its one thread unwinding out of the test used to end the process with
    /// status 0.
    #[test]
    fn a_child_that_panics_is_a_failure() {
        assert_eq!(in_child(|| panic!("a failed assertion in the child")), Some(false));
        assert_eq!(in_child(|| true), Some(true));
    }

    /// Work that leaves no state a child must not use (the NVRTC search): a child forked while
    /// another thread of its parent is still in it does the work again itself, rather than wait
    /// for ever for a thread it lacks, and a child of a parent that finished uses its answer.
    #[test]
    fn a_child_forked_during_shareable_work_does_it_again() {
        static ONCE: ForkOnce<u32> = ForkOnce::new();
        let (began, wait_for_start) = mpsc::channel();
        let starter = std::thread::spawn(move || {
            ONCE.get_or_again(
                || {
                    began.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(1)
                },
                || unreachable!("the parent's own thread waits for nobody"),
            )
        });
        wait_for_start.recv().unwrap();
        assert!(!ONCE.started_before_a_fork(), "not forked");
        let child = in_child(|| {
            ONCE.started_before_a_fork()
                && ONCE.get_or_again(|| Ok(2), || Ok(5)) == Ok(5)
                && ONCE.get_or_again(|| Ok(2), || Ok(6)) == Ok(6)
        });
        assert_eq!(child, Some(true), "the child was left waiting (None) or did not search again itself");
        assert_eq!(starter.join().unwrap(), Ok(1));
        assert_eq!(ONCE.get_or_again(|| Ok(3), || Ok(4)), Ok(1), "the parent keeps its answer");
        let child = in_child(|| ONCE.started_before_a_fork() && ONCE.get_or_again(|| Ok(2), || Ok(5)) == Ok(1));
        assert_eq!(child, Some(true), "a child of a parent that finished uses the parent's answer");
    }
}
