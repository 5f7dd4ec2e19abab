//! What a thread is: the [`ThreadModel`] trait.
//!
//! Allocators that keep per-thread state are generic over a thread model rather than calling the
//! OS, so the same allocator runs on pthreads, Windows threads, std threads, or (in the device
//! header) GPU threads. Implementations live in `hetmem-thread-models`.

use core::ffi::c_void;

use crate::error::Result;

/// Runs at thread exit for each non-null value stored under a key that registered it.
pub type TlsDestructor = unsafe extern "C" fn(*mut c_void);

/// Thread identity, scheduling and dynamically created thread-local storage.
///
/// Models are zero-sized types used through their associated functions.
///
/// # Safety
/// Allocators keep owned pointers (leaked boxes) under their keys and take them back, without
/// checking, from what [`tls_get`](Self::tls_get) answers (safe calls such as
/// `ThreadLocalAllocator::allocate` do). So an implementation promises that `tls_get(key)` is
/// null or the value the calling thread last stored under `key` with
/// [`tls_set`](Self::tls_set): never another thread's value, another key's, or one made up;
/// and that a destructor given to [`tls_create`](Self::tls_create) runs only on the thread that
/// left a value, once, with that value, after which the thread reads null under the key. A safe
/// implementation could otherwise answer a pointer the allocator then frees or writes through:
///
/// ```compile_fail,E0200
/// use core::ffi::c_void;
/// use hetmem_core::{Result, ThreadModel, TlsDestructor};
/// struct Liar;
/// impl ThreadModel for Liar { // needs `unsafe impl`
///     type TlsKey = ();
///     const NAME: &'static str = "liar";
///     fn thread_id() -> u64 {
///         1
///     }
///     fn yield_now() {}
///     fn sleep_for_us(_us: u64) {}
///     unsafe fn tls_create(_destructor: Option<TlsDestructor>) -> Result<()> {
///         Ok(())
///     }
///     fn tls_get(_key: ()) -> *mut c_void {
///         8 as *mut c_void
///     }
///     fn tls_set(_key: (), _value: *mut c_void) -> Result<()> {
///         Ok(())
///     }
///     fn tls_delete(_key: ()) -> Result<()> {
///         Ok(())
///     }
/// }
/// ```
pub unsafe trait ThreadModel: Send + Sync + 'static {
    /// A thread-local storage key.
    type TlsKey: Copy + Send + Sync + core::fmt::Debug;

    /// A short name for messages ("pthreads", "std", "windows").
    const NAME: &'static str;

    /// An id for the calling thread, unique among the live threads of the process.
    fn thread_id() -> u64;

    /// Offers the CPU to another runnable thread.
    fn yield_now();

    /// Sleeps for at least `us` microseconds (longer where the OS timer is coarser).
    fn sleep_for_us(us: u64);

    /// Creates a key; every thread sees null under it until it sets a value.
    ///
    /// # Safety
    /// `destructor`, if given, is called at thread exit with each non-null value a thread left
    /// under the key; it must be sound to call with every such value.
    unsafe fn tls_create(destructor: Option<TlsDestructor>) -> Result<Self::TlsKey>;

    /// The calling thread's value under `key` (null if never set, and null for a deleted key).
    fn tls_get(key: Self::TlsKey) -> *mut c_void;

    /// Sets the calling thread's value under `key`.
    ///
    /// # Errors
    /// `Error::Unsupported("thread-local key was deleted")` for a deleted key; an OS error when
    /// the OS refuses the value.
    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()>;

    /// Deletes `key`. No destructor runs for the values threads left under it, then or at thread
    /// exit: clear this thread's value first, and free what other threads held yourself.
    ///
    /// Other threads may go on using the key meanwhile: each thread's value stays its own, and
    /// once `tls_delete` returns they read null and their sets fail; even a set already under
    /// way lands in no later key (the pthreads model waits for such a set before freeing the
    /// key's number).
    ///
    /// A deleted key stays dead even after the OS hands its slot to a new key: `tls_get` returns
    /// null, and `tls_set` and `tls_delete` return
    /// `Error::Unsupported("thread-local key was deleted")`, on every thread, without reading,
    /// replacing or freeing a value of the new key. Every model keeps a generation per slot for
    /// this, checked on each call.
    ///
    /// # Errors
    /// `Error::Unsupported("thread-local key was deleted")` for a key already deleted; an OS
    /// error when the OS refuses to free the slot (the key then stays usable).
    fn tls_delete(key: Self::TlsKey) -> Result<()>;
}
