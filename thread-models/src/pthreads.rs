//! [`Pthreads`]: POSIX threads through libc.
//!
//! `pthread_key_create` reuses a deleted key's number, and glibc lets `pthread_setspecific` store
//! under whatever key now has it, so a key also carries its slot's generation
//! ([`SlotGenerations`]): a key used after `tls_delete` is refused before libc sees it, and never
//! reads another key's value or hands one of its own to another key's destructor.

use std::ffi::c_void;

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};

use crate::slots::SlotGenerations;
use crate::DELETED_KEY;

/// Key numbers the model can hold: glibc has at most 1024 (`PTHREAD_KEYS_MAX`), macOS 512,
/// musl 128.
const KEY_SLOTS: usize = 1024;

static GENERATIONS: SlotGenerations<KEY_SLOTS> = SlotGenerations::new();

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
        if !key.is_live() {
            return Err(DELETED_KEY);
        }
        // SAFETY: storing a pointer value under a live key; pthread never dereferences it (only
        // the key's destructor does).
        let rc = unsafe { libc::pthread_setspecific(key.key, value) };
        if rc != 0 {
            return Err(Error::Os { call: "pthread_setspecific", errno: rc });
        }
        Ok(())
    }

    fn tls_delete(key: Self::TlsKey) -> Result<()> {
        // Retired first, so no use of the key follows its number into its next owner.
        GENERATIONS.close(key.key as usize, key.generation)?;
        // SAFETY: deleting a live key of ours (just retired); it runs no destructors.
        let rc = unsafe { libc::pthread_key_delete(key.key) };
        if rc != 0 {
            GENERATIONS.reopen(key.key as usize, key.generation);
            return Err(Error::Os { call: "pthread_key_delete", errno: rc });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl crate::contract::SlotOf for PthreadsTlsKey {
        fn slot(&self) -> usize {
            self.key as usize
        }
    }

    #[test]
    fn meets_the_thread_model_contract() {
        crate::contract::run::<Pthreads>();
    }

    #[test]
    fn refuses_keys_used_after_delete() {
        crate::contract::stale_keys::<Pthreads>();
    }
}
