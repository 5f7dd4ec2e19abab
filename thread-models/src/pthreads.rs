//! [`Pthreads`]: POSIX threads through libc.
//!
//! `pthread_key_create` reuses a deleted key's number, and glibc lets `pthread_setspecific` store
//! under whatever key now has it, so a key also carries its slot's generation
//! ([`SlotGenerations`]): a key used after `tls_delete` is refused before libc sees it, and never
//! reads another key's value or hands one of its own to another key's destructor. A set that
//! passed that check while another thread deletes the key is waited for ([`SETTING`]) before
//! libc frees the number, so it lands under the deleted key, never under the next one.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};

use crate::slots::{SetsUnderWay, SlotGenerations};
use crate::DELETED_KEY;

/// Key numbers the model can hold: glibc has at most 1024 (`PTHREAD_KEYS_MAX`), macOS 512,
/// musl 128.
const KEY_SLOTS: usize = 1024;

static GENERATIONS: SlotGenerations<KEY_SLOTS> = SlotGenerations::new();

/// Per key number, the `tls_set` calls between their generation check and
/// `pthread_setspecific`: `tls_delete` retires the generation, then waits for these to finish
/// before `pthread_key_delete` lets the number go to a new key ([`SetsUnderWay`] has how). A set
/// counts itself only after a first check found its key live, so the sets of a key already
/// retired, however many, never keep the count from zero.
///
/// A forked child has only the thread that forked, which was in no `tls_set`: its copy of the
/// counts names threads it does not have, and [`forget_sets`] empties it.
static SETTING: SetsUnderWay<KEY_SLOTS> = SetsUnderWay::new();

/// The child's `pthread_atfork` handler: no set is under way in a process just forked.
extern "C" fn forget_sets() {
    SETTING.forget_all();
}

/// Registers [`forget_sets`] before the first key exists (so before any set can be under way).
/// Threads racing the first registration may each register it: running it twice is harmless.
fn forget_sets_in_children() -> Result<()> {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if REGISTERED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: `forget_sets` is an `extern "C" fn()` that lives as long as the program and only
    // stores to atomics (async-signal-safe, as a handler in a forked child must be).
    let rc = unsafe { libc::pthread_atfork(None, None, Some(forget_sets)) };
    if rc != 0 {
        return Err(Error::Os { call: "pthread_atfork", errno: rc });
    }
    REGISTERED.store(true, Ordering::Release);
    Ok(())
}

/// POSIX threads: `gettid`/`pthread_self`, `pthread_key_create`, `sched_yield`, `nanosleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pthreads;

/// A key of [`Pthreads`]: the pthread key and its generation when this key was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PthreadsTlsKey {
    key: libc::pthread_key_t,
    generation: u64,
}

impl PthreadsTlsKey {
    fn is_live(self) -> bool {
        GENERATIONS.is_live(self.key as usize, self.generation)
    }
}

// SAFETY: values live in pthread keys, per thread; a key's generation, checked on each call,
// keeps a deleted key's values from being read or set through a key that reuses its slot; pthread
// runs each destructor on the exiting thread with that thread's value, once, and clears it.
unsafe impl ThreadModel for Pthreads {
    type TlsKey = PthreadsTlsKey;
    const NAME: &'static str = "pthreads";

    fn thread_id() -> u64 {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() as u64 }
        }
        #[cfg(not(target_os = "linux"))]
        {
            // SAFETY: pthread_self has no preconditions.
            unsafe { libc::pthread_self() as u64 }
        }
    }

    fn yield_now() {
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }

    fn sleep_for_us(us: u64) {
        let mut req = libc::timespec {
            // A 32-bit `time_t` cannot hold every u64 of seconds: the longest sleep it can, rather
            // than a negative one (EINVAL, no sleep at all).
            tv_sec: libc::time_t::try_from(us / 1_000_000).unwrap_or(libc::time_t::MAX),
            tv_nsec: ((us % 1_000_000) * 1000) as libc::c_long,
        };
        let mut rem = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: both timespecs are valid; on EINTR we sleep the remainder.
        while unsafe { libc::nanosleep(&req, &mut rem) } != 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
            req = rem;
        }
    }

    unsafe fn tls_create(destructor: Option<TlsDestructor>) -> Result<Self::TlsKey> {
        forget_sets_in_children()?;
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer; the destructor's soundness is the caller's promise,
        // and `unsafe extern "C" fn(*mut c_void)` is the ABI pthread expects.
        let rc = unsafe { libc::pthread_key_create(&mut key, destructor) };
        if rc != 0 {
            return Err(Error::Os { call: "pthread_key_create", errno: rc });
        }
        let beyond = Error::Unsupported("pthread_key_create returned a key beyond the pthreads model's slot table");
        match usize::try_from(key).map_err(|_| beyond).and_then(|slot| GENERATIONS.open(slot, beyond)) {
            Ok(generation) => Ok(PthreadsTlsKey { key, generation }),
            Err(e) => {
                // SAFETY: deleting the key just created; no thread has a value under it.
                unsafe { libc::pthread_key_delete(key) };
                Err(e)
            }
        }
    }

    fn tls_get(key: Self::TlsKey) -> *mut c_void {
        if !key.is_live() {
            return std::ptr::null_mut();
        }
        // SAFETY: the key is live; pthread_getspecific returns null where this thread set nothing.
        unsafe { libc::pthread_getspecific(key.key) }
    }

    // pthread stores the pointer and never dereferences it; only the key's destructor does.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()> {
        let counted = || {
            #[cfg(test)]
            tests::counted();
        };
        let stored = SETTING.store_if_live(&GENERATIONS, key.key as usize, key.generation, counted, || {
            #[cfg(test)]
            tests::between_check_and_store();
            // SAFETY: storing a pointer value under a key that stays ours until this returns
            // (`tls_delete` waits for it); pthread never dereferences it (only the key's
            // destructor does).
            unsafe { libc::pthread_setspecific(key.key, value) }
        });
        match stored {
            None => Err(DELETED_KEY),
            Some(0) => Ok(()),
            Some(rc) => Err(Error::Os { call: "pthread_setspecific", errno: rc }),
        }
    }

    /// A child forked while another thread of its parent is between the key's retirement and
    /// `pthread_key_delete` keeps the key's number for good (one of its `PTHREAD_KEYS_MAX`): the
    /// key is retired in the child too, so no `tls_delete` there frees it. It is left so on
    /// purpose. The child cannot tell whether the parent's thread had called
    /// `pthread_key_delete` by then (a record of it is written before or after the call, never
    /// with it), and if it had, the number may since belong to a key of another library made
    /// with `pthread_key_create` itself, which a delete in the child would take from it.
    fn tls_delete(key: Self::TlsKey) -> Result<()> {
        // Retired first, so no use of the key follows its number into its next owner; sets that
        // passed their check before are waited for (see `SETTING`).
        SETTING.close_and_wait(&GENERATIONS, key.key as usize, key.generation)?;
        // SAFETY: deleting a live key of ours (just retired); it runs no destructors.
        let rc = unsafe { libc::pthread_key_delete(key.key) };
        if rc != 0 {
            GENERATIONS.reopen(key.key as usize, key.generation);
            return Err(Error::Os { call: "pthread_key_delete", errno: rc });
        }
        Ok(())
    }
}

/// Fork, run, wait with a time limit: core's test helper, shared by file.
#[cfg(test)]
#[path = "../../core/src/forked_child.rs"]
mod forked_child;

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::sync::mpsc;
    use std::time::Duration;

    std::thread_local! {
        /// What this thread's `tls_set` runs after its key check, before libc stores the value.
        static PAUSE: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
    }

    std::thread_local! {
        /// What this thread's `tls_set` runs once counted in `SETTING`, before its key check.
        static COUNTED: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
    }

    pub(super) fn counted() {
        if let Some(mut pause) = COUNTED.with(|p| p.borrow_mut().take()) {
            pause();
        }
    }

    /// A thread that sets `key` and waits, between the set's key check and its store, until the
    /// returned sender sends; returns once the set waits there. The thread then runs `then` on
    /// the set's result.
    fn set_paused_after_its_check<T: Send + 'static>(
        key: PthreadsTlsKey,
        then: impl FnOnce(Result<()>) -> T + Send + 'static,
    ) -> (std::thread::JoinHandle<T>, mpsc::Sender<()>) {
        let (checked, in_window) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let setter = std::thread::spawn(move || {
            PAUSE.with(|p| {
                *p.borrow_mut() = Some(Box::new(move || {
                    checked.send(()).unwrap();
                    released.recv().unwrap();
                }))
            });
            then(Pthreads::tls_set(key, 8 as *mut c_void))
        });
        in_window.recv().unwrap();
        (setter, release)
    }

    /// A set of a key that a delete has already retired is refused before it is counted: it
    /// does not hold the delete up. (Counted, such sets, which threads may go on making, kept the
    /// count from ever reading zero while they came: a delete under a stream of them waited as
    /// long as the stream lasted.)
    #[test]
    fn sets_of_a_retired_key_do_not_hold_its_delete_up() {
        // SAFETY: no destructor.
        let key = unsafe { Pthreads::tls_create(None) }.unwrap();
        // A set that passed its check before the delete: the delete rightly waits for it.
        let (first, release_first) = set_paused_after_its_check(key, move |set| {
            set.unwrap();
            Pthreads::tls_set(key, std::ptr::null_mut())
        });
        let (deleted, delete_done) = mpsc::channel();
        let deleter = std::thread::spawn(move || deleted.send(Pthreads::tls_delete(key)).unwrap());
        while key.is_live() {
            std::thread::yield_now();
        }
        // A set that starts after the key was retired, held where it would be counted.
        let (late_arrived, late_at) = mpsc::channel();
        let (release_late, late_released) = mpsc::channel::<()>();
        let late = std::thread::spawn(move || {
            let counted = late_arrived.clone();
            COUNTED.with(|p| {
                *p.borrow_mut() = Some(Box::new(move || {
                    counted.send(()).unwrap();
                    let _ = late_released.recv_timeout(Duration::from_secs(10));
                }))
            });
            let set = Pthreads::tls_set(key, 8 as *mut c_void);
            let _ = late_arrived.send(());
            set
        });
        late_at.recv().unwrap();
        release_first.send(()).unwrap();
        let delete = delete_done.recv_timeout(Duration::from_secs(2));
        let _ = release_late.send(());
        assert_eq!(late.join().unwrap(), Err(DELETED_KEY));
        assert_eq!(first.join().unwrap(), Err(DELETED_KEY));
        deleter.join().unwrap();
        assert_eq!(delete.expect("the delete waited for a set that began after it retired the key"), Ok(()));
    }

    pub(super) fn between_check_and_store() {
        if let Some(mut pause) = PAUSE.with(|p| p.borrow_mut().take()) {
            pause();
        }
    }

    /// A set that has passed its key check while another thread deletes the key and a new key
    /// takes its number: the value must not land under the new key (whose destructor would then
    /// get it, and whose `tls_get` would answer it on this thread).
    #[test]
    fn a_set_racing_a_delete_never_lands_under_the_next_key() {
        const VALUE: usize = 0xa11_0000;
        for _ in 0..20 {
            // SAFETY: no destructor.
            let old = unsafe { Pthreads::tls_create(None) }.unwrap();
            let (checked, in_window) = mpsc::channel();
            let (reuse, reused) = mpsc::channel::<Option<PthreadsTlsKey>>();
            let setter = std::thread::spawn(move || {
                let reused = Rc::new(reused);
                let arrived = Rc::new(Cell::new(None));
                let (waited, early) = (reused.clone(), arrived.clone());
                PAUSE.with(|p| {
                    *p.borrow_mut() = Some(Box::new(move || {
                        checked.send(()).unwrap();
                        // Time for the deleter to delete and re-create; a delete that waits for
                        // this set to finish answers only after it.
                        if let Ok(new) = waited.recv_timeout(Duration::from_millis(300)) {
                            early.set(Some(new));
                        }
                    }))
                });
                let set = Pthreads::tls_set(old, VALUE as *mut c_void);
                let new = arrived.take().unwrap_or_else(|| reused.recv().unwrap());
                let seen = new.map(|new| Pthreads::tls_get(new) as usize);
                if let Some(new) = new {
                    Pthreads::tls_set(new, std::ptr::null_mut()).unwrap();
                }
                (set, seen)
            });
            in_window.recv().unwrap();
            let deleter = std::thread::spawn(move || {
                Pthreads::tls_delete(old).unwrap();
                let mut others = Vec::new();
                let mut new = None;
                for _ in 0..8 {
                    // SAFETY: no destructor.
                    let key = unsafe { Pthreads::tls_create(None) }.unwrap();
                    if key.key == old.key {
                        new = Some(key);
                        break;
                    }
                    others.push(key);
                }
                for key in others {
                    Pthreads::tls_delete(key).unwrap();
                }
                reuse.send(new).unwrap();
                new
            });
            let (set, seen) = setter.join().unwrap();
            let new = deleter.join().unwrap();
            assert!(set.is_ok() || set == Err(DELETED_KEY), "{set:?}");
            if let Some(new) = new {
                Pthreads::tls_delete(new).unwrap();
                assert_eq!(seen, Some(0), "a set of a deleted key landed under the key that took its number");
                return;
            }
            // Another test took the number first: try again.
        }
        panic!("no new key took the deleted key's number in 20 tries");
    }

    impl crate::contract::SlotOf for PthreadsTlsKey {
        fn slot(&self) -> usize {
            self.key as usize
        }
    }

    /// A child forked while another thread of its parent is inside `tls_set` has no such thread:
    /// deleting the key there must not wait for it.
    #[test]
    fn a_child_forked_during_a_set_can_delete_the_key() {
        // SAFETY: no destructor.
        let key = unsafe { Pthreads::tls_create(None) }.unwrap();
        let (setter, release) = set_paused_after_its_check(key, Result::unwrap);
        // A child that has not finished in 20 s is killed and counts as failed.
        let child = super::forked_child::in_a_forked_child(|| Pthreads::tls_delete(key).is_ok());
        release.send(()).unwrap();
        setter.join().unwrap();
        assert!(child, "the child's tls_delete failed, or waited for a set of a thread it does not have");
        Pthreads::tls_set(key, std::ptr::null_mut()).unwrap();
        Pthreads::tls_delete(key).unwrap();
    }

    #[test]
    fn meets_the_thread_model_contract() {
        crate::contract::run::<Pthreads>();
    }

    #[test]
    fn refuses_keys_used_after_delete() {
        crate::contract::stale_keys::<Pthreads>();
    }

    #[test]
    fn survives_a_delete_while_in_use() {
        crate::contract::delete_while_in_use::<Pthreads>();
    }
}
