//! [`Windows`]: Windows threads through windows-sys.
//!
//! Thread-local keys are the model's own ([`KeyTable`]): each thread (each fiber, as FLS is)
//! owns a [`ThreadValues`] table, found through one FLS slot that is allocated once per process
//! and never freed, and whose callback runs the destructors when the thread exits (or its fiber
//! is deleted) and frees the table. A slot per key would not do: `FlsFree` frees every thread's
//! value under it, also while another thread is reading it, and Windows hands the freed index to
//! the next `FlsAlloc` while a `tls_set` of the deleted key may still be about to store into it.
//! Here deleting a key only retires its generation; each thread's values stay its own.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};
use windows_sys::Win32::Foundation::GetLastError;
use windows_sys::Win32::System::Threading::{
    FlsAlloc, FlsFree, FlsGetValue, FlsSetValue, GetCurrentThreadId, Sleep, SwitchToThread, FLS_OUT_OF_INDEXES,
};

use crate::table::{KeyTable, TableKey, ThreadValues};
use crate::DELETED_KEY;

static KEYS: KeyTable = KeyTable::new();

/// The process's FLS index for the tables, `FLS_OUT_OF_INDEXES` until the first `tls_create`.
static FLS_INDEX: AtomicU32 = AtomicU32::new(FLS_OUT_OF_INDEXES);

/// Windows threads: `GetCurrentThreadId`, keys in a table of the model's with one FLS slot for
/// the thread-exit destructors, `SwitchToThread`, `Sleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Windows;

/// A key of [`Windows`]: a slot in the model's key table and the generation that slot had when
/// the key was made, so a deleted key's old values are never seen through a new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowsTlsKey(TableKey);

fn last_error(call: &'static str) -> Error {
    // SAFETY: GetLastError has no preconditions.
    Error::Os { call, errno: unsafe { GetLastError() } as i32 }
}

/// The FLS index of the tables, allocated on first use; never freed.
fn fls_index() -> Result<u32> {
    let index = FLS_INDEX.load(Ordering::Acquire);
    if index != FLS_OUT_OF_INDEXES {
        return Ok(index);
    }
    // SAFETY: `thread_exit` accepts every value stored under the index: null or a table of
    // `tls_set`.
    let fresh = unsafe { FlsAlloc(Some(thread_exit)) };
    if fresh == FLS_OUT_OF_INDEXES {
        return Err(last_error("FlsAlloc"));
    }
    match FLS_INDEX.compare_exchange(FLS_OUT_OF_INDEXES, fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Ok(fresh),
        Err(winner) => {
            // SAFETY: another thread published its index first; `fresh` was never published, so
            // no thread has a value under it.
            unsafe { FlsFree(fresh) };
            Ok(winner)
        }
    }
}

/// This fiber's table, or null if it has none yet (or no key was ever made).
#[inline]
fn this_table() -> *const ThreadValues {
    let index = FLS_INDEX.load(Ordering::Acquire);
    if index == FLS_OUT_OF_INDEXES {
        return std::ptr::null();
    }
    // SAFETY: reading an FLS slot has no preconditions.
    unsafe { FlsGetValue(index) as *const ThreadValues }
}

/// The FLS callback: runs the destructors of the values left under live keys, then frees the
/// table. Windows calls it once per table, at thread exit or when its fiber is deleted (then
/// perhaps on another thread, whose own table is left alone).
unsafe extern "system" fn thread_exit(table: *const c_void) {
    if table.is_null() {
        return;
    }
    let table = table as *mut ThreadValues;
    // SAFETY: non-null values under our index are tables boxed by `tls_set`, and Windows passes
    // each to this callback once, after its fiber's last call; the box is freed only below.
    // Destructors that get or set values on this thread reach the same table through shared
    // references (if Windows still shows it in the slot), which `ThreadValues` allows.
    unsafe { (*table).run_destructors() };
    let index = FLS_INDEX.load(Ordering::Acquire);
    // SAFETY: reading and clearing our own slot; cleared only if it still names this table, so
    // no later call on this thread reads the freed box, and a fiber-deletion callback leaves the
    // running fiber's table alone.
    unsafe {
        if FlsGetValue(index).cast::<ThreadValues>() == table {
            FlsSetValue(index, std::ptr::null());
        }
    }
    // SAFETY: the table is ours (see above) and no reference to it is left; dropping it runs one
    // more round of destructors for values set since.
    drop(unsafe { Box::from_raw(table) });
}

// SAFETY: values live in the calling thread's own table (a fiber-local slot), by key slot and
// generation, so a thread reads only what it set under a live key; the table runs each
// destructor at thread (or fiber) exit on that thread's values, once, clearing each first.
unsafe impl ThreadModel for Windows {
    type TlsKey = WindowsTlsKey;
    const NAME: &'static str = "windows";

    fn thread_id() -> u64 {
        // SAFETY: no preconditions.
        unsafe { GetCurrentThreadId() as u64 }
    }

    fn yield_now() {
        // SAFETY: no preconditions.
        unsafe { SwitchToThread() };
    }

    fn sleep_for_us(us: u64) {
        // `Sleep` takes at most `u32::MAX - 1` ms (about 49.7 days; `u32::MAX` is INFINITE): a
        // longer sleep is taken in turns, so that it lasts at least as asked.
        let mut ms = us.div_ceil(1000);
        loop {
            let turn = ms.min(u64::from(u32::MAX - 1));
            // SAFETY: no preconditions.
            unsafe { Sleep(turn as u32) };
            ms -= turn;
            if ms == 0 {
                break;
            }
        }
    }

    unsafe fn tls_create(destructor: Option<TlsDestructor>) -> Result<Self::TlsKey> {
        fls_index()?;
        KEYS.create(destructor).map(WindowsTlsKey)
    }

    #[inline]
    fn tls_get(key: Self::TlsKey) -> *mut c_void {
        let table = this_table();
        if table.is_null() {
            return std::ptr::null_mut();
        }
        // SAFETY: a non-null value under our index is this fiber's table (see `thread_exit`),
        // freed only by the callback after its fiber's last call.
        unsafe { (*table).get(key.0) }
    }

    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()> {
        if !KEYS.is_live(key.0) {
            return Err(DELETED_KEY);
        }
        let mut table = this_table();
        if table.is_null() {
            if value.is_null() {
                // Null is what an absent table reads as already.
                return Ok(());
            }
            // A key exists, so `tls_create` allocated the index.
            let index = fls_index()?;
            let fresh = Box::into_raw(Box::new(ThreadValues::new(&KEYS)));
            // SAFETY: storing this fiber's table in our own slot.
            if unsafe { FlsSetValue(index, fresh as *const c_void) } == 0 {
                let error = last_error("FlsSetValue");
                // SAFETY: the slot refused the box, so it is still only ours.
                drop(unsafe { Box::from_raw(fresh) });
                return Err(error);
            }
            table = fresh;
        }
        // SAFETY: as in `tls_get`.
        unsafe { (*table).set(key.0, value) }
    }

    fn tls_delete(key: Self::TlsKey) -> Result<()> {
        KEYS.delete(key.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl crate::contract::SlotOf for WindowsTlsKey {
        fn slot(&self) -> usize {
            self.0.slot
        }
    }

    #[test]
    fn meets_the_thread_model_contract() {
        crate::contract::run::<Windows>();
    }

    #[test]
    fn refuses_keys_used_after_delete() {
        crate::contract::stale_keys::<Windows>();
    }

    #[test]
    fn survives_a_delete_while_in_use() {
        crate::contract::delete_while_in_use::<Windows>();
    }
}
