//! A thread that can have no caches reads the depots' default limit, even where it is the
//! process's first to ask: no start of a thread's caches gave the depots their defaults then.
//!
//! One test in its own binary: the defaults are given once per process, by the first thread
//! that starts its caches (or, now, reads a limit without any).
#![cfg(all(unix, not(loom)))]

use hetmem_core::cache::{self, CacheConfig, HetAlloc, ThreadRole};

#[test]
fn the_first_thread_to_read_a_depot_limit_with_no_caches_reads_the_default() {
    let (limit, role, config) = std::thread::spawn(|| {
        // Every pthread key taken: the caches' backstop gets none, so this thread can have no
        // caches (as past its exit), and it is the first of the process to reach them.
        let mut keys = Vec::with_capacity(4096);
        loop {
            let mut key: libc::pthread_key_t = 0;
            // SAFETY: a fresh key without a destructor.
            if unsafe { libc::pthread_key_create(&mut key, None) } != 0 {
                break;
            }
            keys.push(key);
        }
        let seen = (HetAlloc::new().depot_limit(), cache::thread_role(), cache::thread_config());
        for key in keys {
            // SAFETY: made above; no thread has a value under it.
            unsafe { libc::pthread_key_delete(key) };
        }
        seen
    })
    .join()
    .unwrap();
    assert_eq!(config, CacheConfig::disabled(), "the thread had no caches");
    assert_eq!(role, ThreadRole::Worker, "a thread with no caches reads its default role");
    let default = std::thread::spawn(|| HetAlloc::new().depot_limit()).join().unwrap();
    assert_ne!(default, usize::MAX);
    assert_eq!(limit, default, "the depot limit read with no caches is the default");
}
