//! [`Windows`]: Windows threads through windows-sys.
//!
//! Thread-local values live in fiber-local storage, whose callback runs at thread exit. The
//! callback receives only the value, so for keys with a destructor each thread's slot holds a
//! small heap cell with the value and the destructor, and one trampoline runs it.
//!
//! Windows reuses a freed FLS index for the next `FlsAlloc`, so a key also carries its slot's
//! generation ([`SlotGenerations`]): a key used after `tls_delete` is refused before its index is
//! touched, and never reads another key's value as a cell or frees it.

use std::ffi::c_void;

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};
use windows_sys::Win32::Foundation::GetLastError;
use windows_sys::Win32::System::Threading::{
    FlsAlloc, FlsFree, FlsGetValue, FlsSetValue, GetCurrentThreadId, Sleep, SwitchToThread, FLS_OUT_OF_INDEXES,
};

use crate::slots::SlotGenerations;
use crate::DELETED_KEY;

/// FLS indexes the model can hold: Windows has at most `FLS_MAXIMUM_AVAILABLE` (4080).
const FLS_SLOTS: usize = 4096;

static GENERATIONS: SlotGenerations<FLS_SLOTS> = SlotGenerations::new();

/// Windows threads: `GetCurrentThreadId`, FLS slots with destructors, `SwitchToThread`, `Sleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Windows;

/// A key of [`Windows`]: the FLS index, its generation when the key was made, and the destructor
/// to run (if any).
#[derive(Clone, Copy, Debug)]
pub struct WindowsTlsKey {
    index: u32,
    generation: u64,
    destructor: Option<TlsDestructor>,
}

impl WindowsTlsKey {
    fn is_live(self) -> bool {
        GENERATIONS.is_live(self.index as usize, self.generation)
    }
}

struct Cell {
    value: *mut c_void,
    destructor: TlsDestructor,
}

unsafe extern "system" fn run_destructor(cell: *const c_void) {
    if cell.is_null() {
        return;
    }
    // SAFETY: non-null FLS values of keys with destructors are cells made by `tls_set` with
    // Box::into_raw; Windows calls this once per thread per slot.
    let cell = unsafe { Box::from_raw(cell as *mut Cell) };
    if !cell.value.is_null() {
        // SAFETY: `tls_create`'s caller promised the destructor is sound for every non-null value.
        unsafe { (cell.destructor)(cell.value) };
    }
}

fn last_error(call: &'static str) -> Error {
    // SAFETY: GetLastError has no preconditions.
    Error::Os { call, errno: unsafe { GetLastError() } as i32 }
}

impl ThreadModel for Windows {
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
        let ms = us.div_ceil(1000).min(u32::MAX as u64 - 1) as u32;
        // SAFETY: no preconditions.
        unsafe { Sleep(ms) };
    }

    unsafe fn tls_create(destructor: Option<TlsDestructor>) -> Result<Self::TlsKey> {
        let callback = destructor.map(|_| run_destructor as unsafe extern "system" fn(*const c_void));
        // SAFETY: the callback, if any, only accepts the cells `tls_set` stores.
        let index = unsafe { FlsAlloc(callback) };
        if index == FLS_OUT_OF_INDEXES {
            return Err(last_error("FlsAlloc"));
        }
        let beyond = Error::Unsupported("FlsAlloc returned an index beyond the Windows model's slot table");
        match GENERATIONS.open(index as usize, beyond) {
            Ok(generation) => Ok(WindowsTlsKey { index, generation, destructor }),
            Err(e) => {
                // SAFETY: freeing the index just allocated; no thread has a value under it.
                unsafe { FlsFree(index) };
                Err(e)
            }
        }
    }

    fn tls_get(key: Self::TlsKey) -> *mut c_void {
        if !key.is_live() {
            // A deleted key's index may hold another key's value, perhaps raw, perhaps a cell.
            return std::ptr::null_mut();
        }
        // SAFETY: reading an FLS slot has no preconditions.
        let raw = unsafe { FlsGetValue(key.index) };
        match key.destructor {
            None => raw,
            Some(_) if raw.is_null() => raw,
            // SAFETY: the key is live, so its slot holds cells made by its `tls_set`.
            Some(_) => unsafe { (*(raw as *const Cell)).value },
        }
    }

    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()> {
        if !key.is_live() {
            return Err(DELETED_KEY);
        }
        let stored = match key.destructor {
            None => value as *const c_void,
            Some(destructor) => {
                // SAFETY: reading an FLS slot has no preconditions.
                let raw = unsafe { FlsGetValue(key.index) };
                if !raw.is_null() {
                    // SAFETY: as in `tls_get`; we own this thread's cell.
                    unsafe { (*(raw as *mut Cell)).value = value };
                    return Ok(());
                }
                Box::into_raw(Box::new(Cell { value, destructor })) as *const c_void
            }
        };
        // SAFETY: storing a pointer value in our own slot.
        if unsafe { FlsSetValue(key.index, stored) } == 0 {
            let error = last_error("FlsSetValue");
            if key.destructor.is_some() {
                // SAFETY: `stored` is the cell boxed above; the slot refused it, so it is still ours.
                drop(unsafe { Box::from_raw(stored as *mut Cell) });
            }
            return Err(error);
        }
        Ok(())
    }

    fn tls_delete(key: Self::TlsKey) -> Result<()> {
        // Retired first, so no use of the key follows the index into its next owner.
        GENERATIONS.close(key.index as usize, key.generation)?;
        // SAFETY: freeing the index of a live key of ours (just retired). FlsFree runs the
        // callback for each thread's value, which frees its cell.
        if unsafe { FlsFree(key.index) } == 0 {
            let error = last_error("FlsFree");
            GENERATIONS.reopen(key.index as usize, key.generation);
            return Err(error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl crate::contract::SlotOf for WindowsTlsKey {
        fn slot(&self) -> usize {
            self.index as usize
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
}
