//! [`Pthreads`]: POSIX threads through libc.

use std::ffi::c_void;

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};

/// POSIX threads: `gettid`/`pthread_self`, `pthread_key_create`, `sched_yield`, `nanosleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pthreads;

impl ThreadModel for Pthreads {
    type TlsKey = libc::pthread_key_t;
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
            tv_sec: (us / 1_000_000) as libc::time_t,
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
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer; the destructor's soundness is the caller's promise,
        // and `unsafe extern "C" fn(*mut c_void)` is the ABI pthread expects.
        let rc = unsafe { libc::pthread_key_create(&mut key, destructor) };
        if rc != 0 {
            return Err(Error::Os { call: "pthread_key_create", errno: rc });
        }
        Ok(key)
    }

    fn tls_get(key: Self::TlsKey) -> *mut c_void {
        // SAFETY: pthread_getspecific returns null for keys without a value in this thread.
        unsafe { libc::pthread_getspecific(key) }
    }

    // pthread stores the pointer and never dereferences it; only the key's destructor does.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()> {
        // SAFETY: storing a pointer value; pthread never dereferences it (only the destructor does).
        let rc = unsafe { libc::pthread_setspecific(key, value) };
        if rc != 0 {
            return Err(Error::Os { call: "pthread_setspecific", errno: rc });
        }
        Ok(())
    }

    fn tls_delete(key: Self::TlsKey) -> Result<()> {
        // SAFETY: deleting a key runs no destructors.
        let rc = unsafe { libc::pthread_key_delete(key) };
        if rc != 0 {
            return Err(Error::Os { call: "pthread_key_delete", errno: rc });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meets_the_thread_model_contract() {
        crate::contract::run::<super::Pthreads>();
    }
}
