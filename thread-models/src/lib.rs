//! hetmem-thread-models: what a thread is, behind the one [`ThreadModel`] trait.
//!
//! | model | where | thread id | TLS with destructors | yield | sleep |
//! |---|---|---|---|---|---|
//! | [`Pthreads`] | unix | `gettid` (Linux) / `pthread_self` | `pthread_key_create` | `sched_yield` | `nanosleep` |
//! | `Windows` | Windows | `GetCurrentThreadId` | own table, found through FLS | `SwitchToThread` | `Sleep` |
//! | [`StdThreads`] | with std | per-process counter | own table, in a `thread_local!` | `yield_now` | `sleep` |
//!
//! [`DefaultThreadModel`] is Pthreads on unix and Windows on Windows; feature `force-std` makes it
//! StdThreads everywhere.
//!
//! Windows finds each thread's table through one `FlsAlloc` slot, allocated once per process,
//! whose callback runs the destructors at the thread's exit. StdThreads runs on any platform
//! with std and yields and sleeps through `std::thread`.
#![warn(missing_docs)]

pub use hetmem_core::{ThreadModel, TlsDestructor};

// Under `--cfg loom` the crate is only the slot generations and the key table, whose atomics and
// lock are loom's (see `sync`), for the models in `tests/loom_*.rs`; the thread models keep them
// in statics, which loom's types cannot initialize.
#[cfg(all(unix, not(loom)))]
mod pthreads;
#[cfg(all(any(unix, windows, feature = "std"), not(loom)))]
mod slots;
#[cfg(loom)]
#[doc(hidden)]
pub mod slots;
#[cfg(all(feature = "std", not(loom)))]
#[path = "std.rs"]
mod std_threads;
#[cfg(any(unix, windows, feature = "std"))]
mod sync;
#[cfg(all(any(windows, feature = "std"), not(loom)))]
mod table;
#[cfg(all(loom, any(windows, feature = "std")))]
#[doc(hidden)]
pub mod table;
#[cfg(all(windows, not(loom)))]
mod windows;

#[cfg(all(unix, not(loom)))]
pub use pthreads::Pthreads;
#[cfg(all(feature = "std", not(loom)))]
pub use std_threads::StdThreads;
#[cfg(all(windows, not(loom)))]
pub use windows::Windows;

/// The thread model this target uses unless told otherwise.
#[cfg(all(unix, not(feature = "force-std"), not(loom)))]
pub type DefaultThreadModel = Pthreads;
/// The thread model this target uses unless told otherwise.
#[cfg(all(windows, not(feature = "force-std"), not(loom)))]
pub type DefaultThreadModel = Windows;
/// The thread model this target uses unless told otherwise.
#[cfg(all(any(feature = "force-std", not(any(unix, windows))), not(loom)))]
pub type DefaultThreadModel = StdThreads;

/// What `tls_set` and `tls_delete` of every model return for a key used after its `tls_delete`.
#[cfg(any(unix, windows, feature = "std"))]
pub(crate) const DELETED_KEY: hetmem_core::Error = hetmem_core::Error::Unsupported("thread-local key was deleted");

/// The behaviour every thread model must show; each model's tests run it.
#[cfg(all(test, not(loom)))]
pub(crate) mod contract {
    use ::std::ffi::c_void;
    use ::std::sync::atomic::{AtomicUsize, Ordering};
    use ::std::sync::Mutex;
    use ::std::time::Instant;

    use hetmem_core::ThreadModel;

    use crate::DELETED_KEY;

    static DESTROYED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    static DESTRUCTOR_CALLS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn record(value: *mut c_void) {
        DESTRUCTOR_CALLS.fetch_add(1, Ordering::SeqCst);
        DESTROYED.lock().unwrap().push(value as usize);
    }

    pub(crate) fn run<T: ThreadModel>() {
        // Distinct ids for live threads.
        let main_id = T::thread_id();
        let other = ::std::thread::spawn(T::thread_id).join().unwrap();
        assert_ne!(main_id, other, "{}: two live threads share an id", T::NAME);
        assert_eq!(T::thread_id(), main_id);

        // Sleep lasts at least as asked; yield returns.
        let t = Instant::now();
        T::sleep_for_us(2_000);
        assert!(t.elapsed().as_micros() >= 2_000);
        T::yield_now();

        // TLS: null until set, per thread, destructor at exit for non-null values only.
        // SAFETY: `record` accepts any value.
        let key = unsafe { T::tls_create(Some(record)) }.unwrap();
        assert!(T::tls_get(key).is_null());
        T::tls_set(key, 0x1000 as *mut c_void).unwrap();
        let tag = 0x5000 + T::NAME.len();
        ::std::thread::spawn(move || {
            assert!(T::tls_get(key).is_null(), "a new thread sees null");
            T::tls_set(key, tag as *mut c_void).unwrap();
            assert_eq!(T::tls_get(key) as usize, tag);
        })
        .join()
        .unwrap();
        ::std::thread::spawn(move || assert!(T::tls_get(key).is_null())).join().unwrap();
        assert!(DESTROYED.lock().unwrap().contains(&tag), "{}: destructor ran at thread exit", T::NAME);
        assert_eq!(T::tls_get(key) as usize, 0x1000, "this thread's value is untouched");
        T::tls_set(key, ::std::ptr::null_mut()).unwrap();
        T::tls_delete(key).unwrap();
    }

    /// The OS slot (or table slot) a key names, so the tests can make a new key take an old one's.
    pub(crate) trait SlotOf {
        fn slot(&self) -> usize;
    }

    static STALE_DESTROYED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    unsafe extern "C" fn record_stale(value: *mut c_void) {
        STALE_DESTROYED.lock().unwrap().push(value as usize);
    }

    /// Makes a key (leaving `leftover` as this thread's value), deletes it, and makes keys until
    /// one takes its slot: `(deleted, successor)`. Tests of other models run alongside and may
    /// take the slot first, so this retries.
    fn reused_slot<T: ThreadModel>(
        old_destructor: Option<crate::TlsDestructor>,
        leftover: *mut c_void,
        new_destructor: Option<crate::TlsDestructor>,
    ) -> (T::TlsKey, T::TlsKey)
    where
        T::TlsKey: SlotOf,
    {
        for _ in 0..100 {
            // SAFETY: the destructors given are `record_stale` or none; it accepts any value.
            let old = unsafe { T::tls_create(old_destructor) }.unwrap();
            T::tls_set(old, leftover).unwrap();
            T::tls_delete(old).unwrap();
            let mut others = Vec::new();
            let mut successor = None;
            for _ in 0..8 {
                // SAFETY: as above.
                let key = unsafe { T::tls_create(new_destructor) }.unwrap();
                if key.slot() == old.slot() {
                    successor = Some(key);
                    break;
                }
                others.push(key);
            }
            for key in others {
                T::tls_delete(key).unwrap();
            }
            if let Some(new) = successor {
                return (old, new);
            }
        }
        panic!("{}: no new key took a deleted key's slot in 100 tries", T::NAME);
    }

    /// A key used after its `tls_delete`, while a new key holds its slot: `tls_get` sees null,
    /// `tls_set` and `tls_delete` fail with [`DELETED_KEY`], on every thread, and the new key's
    /// values, cells and destructor are untouched. Run for both mixes of destructor / none, the
    /// two ways a stale key used to misread (a raw value as a cell) or misfree (its value as a
    /// cell) on Windows and to feed its value to the new key's destructor on pthreads.
    pub(crate) fn stale_keys<T: ThreadModel>()
    where
        T::TlsKey: SlotOf,
    {
        let tag = 0x10_0000 + 0x100 * T::NAME.len();
        let cases: [(Option<crate::TlsDestructor>, Option<crate::TlsDestructor>); 2] =
            [(None, Some(record_stale)), (Some(record_stale), None)];
        for (case, (old_destructor, new_destructor)) in cases.into_iter().enumerate() {
            // A key without a destructor may be deleted with a value left (Windows runs a
            // destructor for one left under a key with one, pthreads does not).
            let leftover = if old_destructor.is_none() { tag + 1 } else { 0 };
            let (old, new) = reused_slot::<T>(old_destructor, leftover as *mut c_void, new_destructor);
            assert!(T::tls_get(new).is_null(), "{} case {case}: the new key sees the deleted key's value", T::NAME);

            // A real word as the new key's value: a model that took it for a cell would read its
            // first field as the stale key's value, or write into it.
            let mut word: [usize; 4] = [tag + 2, tag + 3, 0, 0];
            let mine = word.as_mut_ptr().cast::<c_void>();
            T::tls_set(new, mine).unwrap();
            assert!(T::tls_get(old).is_null(), "{} case {case}: a deleted key reads the new key's value", T::NAME);
            assert_eq!(T::tls_set(old, (tag + 4) as *mut c_void), Err(DELETED_KEY), "{} case {case}", T::NAME);
            assert_eq!(T::tls_delete(old), Err(DELETED_KEY), "{} case {case}", T::NAME);
            assert_eq!(T::tls_get(new), mine, "{} case {case}: the stale key changed the new key's value", T::NAME);
            assert_eq!(word, [tag + 2, tag + 3, 0, 0], "{} case {case}: the stale key wrote into the value", T::NAME);

            let other_thread = tag + 5 + case;
            ::std::thread::spawn(move || {
                assert!(T::tls_get(old).is_null());
                assert_eq!(T::tls_set(old, (tag + 6) as *mut c_void), Err(DELETED_KEY));
                assert!(T::tls_get(new).is_null());
                T::tls_set(new, other_thread as *mut c_void).unwrap();
                assert_eq!(T::tls_set(old, (tag + 6) as *mut c_void), Err(DELETED_KEY));
                assert_eq!(T::tls_get(new) as usize, other_thread);
            })
            .join()
            .unwrap();
            let destroyed: Vec<usize> =
                STALE_DESTROYED.lock().unwrap().iter().copied().filter(|v| v & !0xff == tag).collect();
            let expected = if new_destructor.is_some() { vec![other_thread] } else { vec![] };
            assert_eq!(destroyed, expected, "{} case {case}: destructors ran for the wrong values", T::NAME);
            STALE_DESTROYED.lock().unwrap().retain(|v| v & !0xff != tag);

            T::tls_set(new, ::std::ptr::null_mut()).unwrap();
            T::tls_delete(new).unwrap();
            // Deleted and not (yet) reused: refused all the same.
            assert!(T::tls_get(new).is_null());
            assert_eq!(T::tls_set(new, mine), Err(DELETED_KEY), "{}: set after delete", T::NAME);
            assert_eq!(T::tls_delete(new), Err(DELETED_KEY), "{}: second delete", T::NAME);
        }
    }

    static RACE_DESTROYED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    unsafe extern "C" fn record_race(value: *mut c_void) {
        RACE_DESTROYED.lock().unwrap().push(value as usize);
    }

    /// A key deleted while another thread keeps reading and setting its value, and a third thread
    /// makes new keys meanwhile (taking the deleted key's slot): no crash; once the delete has
    /// returned the user reads null and its sets fail; its racing sets land in no new key; no
    /// destructor runs for the deleted key's value, and at thread exit they run for the values
    /// under the new keys. Every model promises this.
    pub(crate) fn delete_while_in_use<T: ThreadModel>() {
        use ::std::sync::atomic::AtomicBool;
        use ::std::sync::{mpsc, Arc, Barrier};

        let base = 0x20_0000 + 0x1000 * T::NAME.len();
        for round in 0..8 {
            // SAFETY: `record_race` accepts any value.
            let key = unsafe { T::tls_create(Some(record_race)) }.unwrap();
            let ready = Arc::new(Barrier::new(3));
            let deleted = Arc::new(AtomicBool::new(false));
            let (send_keys, new_keys) = mpsc::channel::<Vec<T::TlsKey>>();

            let user = {
                let (ready, deleted) = (ready.clone(), deleted.clone());
                ::std::thread::spawn(move || {
                    // A real value the thread goes on using, and frees itself after the delete.
                    let mine = Box::into_raw(Box::new([round; 4]));
                    T::tls_set(key, mine.cast()).unwrap();
                    ready.wait();
                    let mut gone = false;
                    loop {
                        // Read first: once it is set, the delete has returned.
                        let done = deleted.load(Ordering::SeqCst);
                        let v = T::tls_get(key);
                        assert!(v == mine.cast() || v.is_null(), "{} round {round}: read a foreign value", T::NAME);
                        if !v.is_null() {
                            assert!(!gone, "{} round {round}: the value came back after the delete", T::NAME);
                            // SAFETY: `mine` is this thread's live box, freed only below.
                            assert_eq!(unsafe { *v.cast::<[usize; 4]>() }, [round; 4]);
                        }
                        gone |= v.is_null();
                        assert!(!done || gone, "{} round {round}: the key reads its value after the delete", T::NAME);
                        match T::tls_set(key, mine.cast()) {
                            Ok(()) => assert!(!done, "{} round {round}: set after the delete", T::NAME),
                            Err(e) => assert_eq!(e, DELETED_KEY),
                        }
                        if done {
                            break;
                        }
                        T::yield_now();
                    }
                    assert!(T::tls_get(key).is_null());
                    // SAFETY: the key is deleted and refused every set since: nothing else holds `mine`.
                    drop(unsafe { Box::from_raw(mine) });
                    // The keys made meanwhile: this thread never set them, so its racing sets of
                    // the deleted key landed in none of them.
                    for (i, new) in new_keys.recv().unwrap().into_iter().enumerate() {
                        assert!(T::tls_get(new).is_null(), "{} round {round}: a stale set reached a new key", T::NAME);
                        T::tls_set(new, (base + 0x10 + i) as *mut c_void).unwrap();
                    }
                })
            };
            let creator = {
                let (ready, deleted) = (ready.clone(), deleted.clone());
                ::std::thread::spawn(move || {
                    ready.wait();
                    let mut keys = Vec::new();
                    let mut after = 0;
                    while after < 4 && keys.len() < 64 {
                        after += usize::from(deleted.load(Ordering::SeqCst));
                        // SAFETY: as above.
                        keys.push(unsafe { T::tls_create(Some(record_race)) }.unwrap());
                        T::yield_now();
                    }
                    keys
                })
            };
            ready.wait();
            T::yield_now();
            T::tls_delete(key).unwrap();
            deleted.store(true, Ordering::SeqCst);
            let keys = creator.join().unwrap();
            send_keys.send(keys.clone()).unwrap();
            user.join().unwrap();

            let mut destroyed: Vec<usize> = {
                let mut all = RACE_DESTROYED.lock().unwrap();
                let mine: Vec<usize> = all.iter().copied().filter(|v| v & !0xfff == base).collect();
                all.retain(|v| v & !0xfff != base);
                mine
            };
            destroyed.sort_unstable();
            let expected: Vec<usize> = (0..keys.len()).map(|i| base + 0x10 + i).collect();
            assert_eq!(destroyed, expected, "{} round {round}: destructors ran for the wrong values", T::NAME);
            assert!(T::tls_get(key).is_null());
            assert_eq!(T::tls_delete(key), Err(DELETED_KEY));
            for new in keys {
                T::tls_delete(new).unwrap();
            }
        }
    }
}
