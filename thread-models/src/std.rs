//! [`StdThreads`]: threads through the standard library only.
//!
//! std has no dynamically created thread-local keys, so this model keeps a process-wide table of
//! keys (destructor and generation) and, per thread, a `thread_local!` vector of values that runs
//! the destructors when the thread exits.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};

use crate::DELETED_KEY;

/// Threads as the standard library sees them.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdThreads;

/// A key of [`StdThreads`]: a slot in the key table and the generation that slot had when the
/// key was made, so a deleted key's old values are never seen through a new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StdTlsKey {
    slot: usize,
    generation: u64,
}

struct KeySlot {
    generation: u64,
    live: bool,
    destructor: Option<TlsDestructor>,
}

static KEYS: Mutex<Vec<KeySlot>> = Mutex::new(Vec::new());

fn keys() -> std::sync::MutexGuard<'static, Vec<KeySlot>> {
    // The table is updated one field at a time; a panic elsewhere cannot leave it inconsistent.
    KEYS.lock().unwrap_or_else(|e| e.into_inner())
}

/// One thread's values: `(generation, value)` per slot.
struct ThreadValues(RefCell<Vec<(u64, *mut c_void)>>);

impl Drop for ThreadValues {
    fn drop(&mut self) {
        // As pthreads does: run destructors for non-null values, repeating a few rounds in case a
        // destructor sets new values.
        for _ in 0..4 {
            let values = std::mem::take(&mut *self.0.borrow_mut());
            let mut ran = false;
            for (slot, (generation, value)) in values.into_iter().enumerate() {
                if value.is_null() {
                    continue;
                }
                let destructor =
                    keys().get(slot).filter(|k| k.live && k.generation == generation).and_then(|k| k.destructor);
                if let Some(destructor) = destructor {
                    // SAFETY: `tls_create`'s caller promised the destructor is sound for every
                    // non-null value set under the key; this is such a value, passed once.
                    unsafe { destructor(value) };
                    ran = true;
                }
            }
            if !ran {
                break;
            }
        }
    }
}

std::thread_local! {
    static VALUES: ThreadValues = const { ThreadValues(RefCell::new(Vec::new())) };
    static THREAD_ID: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

fn key_is_live(key: StdTlsKey) -> bool {
    keys().get(key.slot).is_some_and(|k| k.live && k.generation == key.generation)
}

impl ThreadModel for StdThreads {
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
        let mut keys = keys();
        if let Some(slot) = keys.iter().position(|k| !k.live) {
            let k = &mut keys[slot];
            k.generation += 1;
            k.live = true;
            k.destructor = destructor;
            return Ok(StdTlsKey { slot, generation: k.generation });
        }
        keys.push(KeySlot { generation: 0, live: true, destructor });
        Ok(StdTlsKey { slot: keys.len() - 1, generation: 0 })
    }

    fn tls_get(key: Self::TlsKey) -> *mut c_void {
        VALUES
            .try_with(|v| match v.0.borrow().get(key.slot) {
                Some(&(generation, value)) if generation == key.generation => value,
                _ => std::ptr::null_mut(),
            })
            .unwrap_or(std::ptr::null_mut())
    }

    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()> {
        if !key_is_live(key) {
            return Err(DELETED_KEY);
        }
        VALUES
            .try_with(|v| {
                let mut values = v.0.borrow_mut();
                if values.len() <= key.slot {
                    values.resize(key.slot + 1, (0, std::ptr::null_mut()));
                }
                values[key.slot] = (key.generation, value);
            })
            .map_err(|_| Error::Unsupported("thread-local storage is being torn down on this thread"))
    }

    fn tls_delete(key: Self::TlsKey) -> Result<()> {
        let mut keys = keys();
        match keys.get_mut(key.slot) {
            Some(k) if k.live && k.generation == key.generation => {
                k.live = false;
                k.destructor = None;
                Ok(())
            }
            _ => Err(DELETED_KEY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl crate::contract::SlotOf for StdTlsKey {
        fn slot(&self) -> usize {
            self.slot
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
}
