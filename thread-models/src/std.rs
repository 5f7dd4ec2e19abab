//! [`StdThreads`]: threads through the standard library only.
//!
//! std has no dynamically created thread-local keys, so this model keeps its own
//! ([`KeyTable`]) and, per thread, a `thread_local!` [`ThreadValues`] that runs the destructors
//! when the thread exits.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};

use crate::table::{KeyTable, TableKey, ThreadValues};

/// Threads as the standard library sees them.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdThreads;

/// A key of [`StdThreads`]: a slot in the key table and the generation that slot had when the
/// key was made, so a deleted key's old values are never seen through a new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StdTlsKey(TableKey);

static KEYS: KeyTable = KeyTable::new();

std::thread_local! {
    // Not a const initializer: older compilers refuse a reference to a static in one.
    static VALUES: ThreadValues = ThreadValues::new(&KEYS);
    static THREAD_ID: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

// SAFETY: values live in the calling thread's own table (`thread_local!`), by key slot and
// generation, so a thread reads only what it set under a live key; the table runs each
// destructor at thread exit on that thread's values, once, clearing each first.
unsafe impl ThreadModel for StdThreads {
    type TlsKey = StdTlsKey;
    const NAME: &'static str = "std";

    fn thread_id() -> u64 {
        // During thread teardown the id is gone; 0 is never handed out otherwise.
        THREAD_ID.try_with(|id| *id).unwrap_or(0)
    }

    fn yield_now() {
        std::thread::yield_now();
    }

    fn sleep_for_us(us: u64) {
        std::thread::sleep(Duration::from_micros(us));
    }

    unsafe fn tls_create(destructor: Option<TlsDestructor>) -> Result<Self::TlsKey> {
        KEYS.create(destructor).map(StdTlsKey)
    }

    fn tls_get(key: Self::TlsKey) -> *mut c_void {
        VALUES.try_with(|v| v.get(key.0)).unwrap_or(std::ptr::null_mut())
    }

    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()> {
        if !KEYS.is_live(key.0) {
            return Err(crate::DELETED_KEY);
        }
        VALUES
            .try_with(|v| v.set(key.0, value))
            .map_err(|_| Error::Unsupported("thread-local storage is being torn down on this thread"))?
    }

    fn tls_delete(key: Self::TlsKey) -> Result<()> {
        KEYS.delete(key.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl crate::contract::SlotOf for StdTlsKey {
        fn slot(&self) -> usize {
            self.0.slot
        }
    }

    #[test]
    fn meets_the_thread_model_contract() {
        crate::contract::run::<StdThreads>();
    }

    #[test]
    fn refuses_keys_used_after_delete() {
        crate::contract::stale_keys::<StdThreads>();
    }

    #[test]
    fn survives_a_delete_while_in_use() {
        crate::contract::delete_while_in_use::<StdThreads>();
    }
}
