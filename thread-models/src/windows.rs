//! [`Windows`]: Windows threads through windows-sys.
//!
//! Thread-local values live in fiber-local storage, whose callback runs at thread exit. The
//! callback receives only the value, so for keys with a destructor each thread's slot holds a
//! small heap cell with the value and the destructor, and one trampoline runs it.

use std::ffi::c_void;

use hetmem_core::{Error, Result, ThreadModel, TlsDestructor};
use windows_sys::Win32::Foundation::GetLastError;
use windows_sys::Win32::System::Threading::{
    FlsAlloc, FlsFree, FlsGetValue, FlsSetValue, GetCurrentThreadId, Sleep, SwitchToThread, FLS_OUT_OF_INDEXES,
};

/// Windows threads: `GetCurrentThreadId`, FLS slots with destructors, `SwitchToThread`, `Sleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Windows;

/// A key of [`Windows`]: the FLS index, and the destructor to run (if any).
#[derive(Clone, Copy, Debug)]
pub struct WindowsTlsKey {
    index: u32,
    destructor: Option<TlsDestructor>,
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
        Ok(WindowsTlsKey { index, destructor })
    }

    fn tls_get(key: Self::TlsKey) -> *mut c_void {
        // SAFETY: reading an FLS slot has no preconditions.
        let raw = unsafe { FlsGetValue(key.index) };
        match key.destructor {
            None => raw,
            Some(_) if raw.is_null() => raw,
            // SAFETY: slots of keys with destructors hold cells made by `tls_set`.
            Some(_) => unsafe { (*(raw as *const Cell)).value },
        }
    }

    fn tls_set(key: Self::TlsKey, value: *mut c_void) -> Result<()> {
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
        // SAFETY: freeing an index we allocated. FlsFree runs the callback for this thread's
        // value, which frees its cell.
        if unsafe { FlsFree(key.index) } == 0 {
            return Err(last_error("FlsFree"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meets_the_thread_model_contract() {
        crate::contract::run::<super::Windows>();
    }
}
