//! hetmem-thread-models: what a thread is, behind the one [`ThreadModel`] trait.
//!
//! | model | where | thread id | TLS with destructors | yield | sleep |
//! |---|---|---|---|---|---|
//! | [`Pthreads`] | unix | `gettid` (Linux) / `pthread_self` | `pthread_key_create` | `sched_yield` | `nanosleep` |
//! | `Windows` | Windows | `GetCurrentThreadId` | `FlsAlloc` callbacks | `SwitchToThread` | `Sleep` |
//! | [`StdThreads`] | anywhere with std | per-process counter | `thread_local!` table | `std::thread::yield_now` | `std::thread::sleep` |
//!
//! [`DefaultThreadModel`] is Pthreads on unix and Windows on Windows; feature `force-std` makes it
//! StdThreads everywhere.
#![warn(missing_docs)]

pub use hetmem_core::{ThreadModel, TlsDestructor};

#[cfg(unix)]
mod pthreads;
#[cfg(feature = "std")]
#[path = "std.rs"]
mod std_threads;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub use pthreads::Pthreads;
#[cfg(feature = "std")]
pub use std_threads::StdThreads;
#[cfg(windows)]
pub use windows::Windows;

/// The thread model this target uses unless told otherwise.
#[cfg(all(unix, not(feature = "force-std")))]
pub type DefaultThreadModel = Pthreads;
/// The thread model this target uses unless told otherwise.
#[cfg(all(windows, not(feature = "force-std")))]
pub type DefaultThreadModel = Windows;
/// The thread model this target uses unless told otherwise.
#[cfg(any(feature = "force-std", not(any(unix, windows))))]
pub type DefaultThreadModel = StdThreads;

/// The behaviour every thread model must show; each model's tests run it.
#[cfg(test)]
pub(crate) mod contract {
    use ::std::ffi::c_void;
    use ::std::sync::atomic::{AtomicUsize, Ordering};
    use ::std::sync::Mutex;
    use ::std::time::Instant;

    use hetmem_core::ThreadModel;

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
}
