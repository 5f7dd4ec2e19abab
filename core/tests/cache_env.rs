//! The cache defaults follow environment variables read at run time. Each case runs this binary
//! again with the variables set, since a process reads them once.

// The caches are not built under loom (`--cfg loom`), which models only the lock-free parts.
#![cfg(not(loom))]

use std::process::Command;

use hetmem_core::cache::{self, CacheConfig, HetAlloc, ThreadRole};
use hetmem_core::Error;

const CHILD: &str = "HETMEM_CACHE_ENV_CHILD";

/// Runs `test` in a child process with `vars` set; the child runs the checks.
fn in_child(test: &str, vars: &[(&str, &str)]) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]).env(CHILD, "1");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
}

#[test]
fn run_time_variables_set_the_defaults() {
    if std::env::var_os(CHILD).is_none() {
        return in_child(
            "run_time_variables_set_the_defaults",
            &[
                ("HETMEM_CACHE_BUCKETS", "5"),
                ("HETMEM_CACHE_LIMIT", "8K"),
                ("HETMEM_CACHE_LIMIT_SCHEDULER", "1K,2K,64K"),
                ("HETMEM_CACHE_DEPOT_LIMIT", "0"),
                ("HETMEM_FRAME_LIMIT", "4K"),
            ],
        );
    }
    std::thread::spawn(|| {
        assert_eq!(cache::thread_role(), ThreadRole::Worker);
        assert_eq!(cache::thread_config(), CacheConfig::uniform(5, 8 << 10).unwrap());
        cache::set_thread_role(ThreadRole::Scheduler).unwrap();
        assert_eq!(
            cache::thread_config(),
            CacheConfig::from_limits(&[1 << 10, 2 << 10, 64 << 10, 64 << 10, 64 << 10]).unwrap()
        );
        assert_eq!(cache::role_config(ThreadRole::Main), CacheConfig::uniform(5, 8 << 10).unwrap());
        assert_eq!(CacheConfig::for_frames().limit(0), 4 << 10);
        assert_eq!(HetAlloc::new().depot_limit(), 0);
        assert_eq!(cache::env_error(), None);
        assert!(CacheConfig::from_env(ThreadRole::Worker).is_ok());
    })
    .join()
    .unwrap();
}

#[test]
fn a_malformed_variable_is_reported_and_skipped() {
    if std::env::var_os(CHILD).is_none() {
        return in_child(
            "a_malformed_variable_is_reported_and_skipped",
            &[("HETMEM_CACHE_LIMIT", "lots"), ("HETMEM_CACHE_LIMIT_WORKER", "16K")],
        );
    }
    std::thread::spawn(|| {
        assert_eq!(cache::thread_config().limit(0), 16 << 10, "the valid one applies");
        assert_eq!(cache::env_error(), Some(Error::InvalidSize { size: 0, reason: "HETMEM_CACHE_LIMIT" }));
        assert!(matches!(CacheConfig::from_env(ThreadRole::Worker), Err(Error::InvalidSize { .. })));
        // Roles without a valid variable keep the built-in defaults.
        assert_eq!(cache::role_config(ThreadRole::Main).limit(0), 256 << 10);
    })
    .join()
    .unwrap();
}

/// A depot limit set by hand before any thread cache of the process has started is not
/// replaced by the default when the first one starts.
#[test]
fn a_depot_limit_set_before_the_first_request_is_kept() {
    if std::env::var_os(CHILD).is_none() {
        return in_child("a_depot_limit_set_before_the_first_request_is_kept", &[("HETMEM_CACHE_DEPOT_LIMIT", "8M")]);
    }
    let caches = HetAlloc::new();
    caches.set_depot_limit(4096);
    assert_eq!(caches.depot_limit(), 4096);
    let layout = std::alloc::Layout::from_size_align(64, 8).unwrap();
    // SAFETY: a non-zero layout, freed once with it; the first request of the process's caches.
    unsafe {
        use std::alloc::GlobalAlloc;
        caches.dealloc(caches.alloc(layout), layout);
    }
    assert_eq!(caches.depot_limit(), 4096, "the first thread cache to start kept the limit set by hand");
    let other = HetAlloc::new();
    assert_eq!(other.depot_limit(), 4096, "one depot per upstream");
}
