//! A thread whose first `HetAlloc` request comes after its Rust thread-local destructors have
//! run (from a pthread key's destructor, as the thread-local allocator's thread models have)
//! still returns its caches and leaves the list of live threads: the list must never keep a
//! thread state whose storage goes away with its thread.
//!
//! One test in its own binary, so the counts of live thread caches are its own.
#![cfg(all(unix, not(loom)))]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use hetmem_core::cache::{self, HetAlloc};

static A: HetAlloc = HetAlloc::new();

unsafe extern "C" fn first_request_at_exit(_: *mut c_void) {
    let l = Layout::from_size_align(48, 8).unwrap();
    // SAFETY: a non-zero layout; the block is freed once, with it.
    unsafe {
        let p = A.alloc(l);
        assert!(!p.is_null());
        A.dealloc(p, l);
    }
}

#[test]
fn a_first_request_from_a_pthread_key_destructor_leaves_no_thread_listed() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a fresh key with a destructor that may run on any thread.
    assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(first_request_at_exit)) }, 0);
    let before = cache::live_threads();
    for _ in 0..4 {
        std::thread::spawn(move || {
            // SAFETY: a non-null value, so the destructor runs at thread exit.
            assert_eq!(unsafe { libc::pthread_setspecific(key, core::ptr::dangling::<c_void>()) }, 0);
        })
        .join()
        .unwrap();
    }
    assert_eq!(cache::live_threads(), before, "every thread that started a cache has left the list");
    // The list is walked whole (every listed state must still be there).
    let s = A.stats();
    assert!(s.hits + s.misses >= 4, "{s:?}");
}
