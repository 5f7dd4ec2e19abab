//! The table of registered thread roles: full, it refuses a new role with an error that says
//! so, and keeps changing the roles it holds. Its own binary: the table is process-wide.
#![cfg(not(loom))]

use hetmem_core::cache::{configure_role, role_config, CacheConfig, ThreadRole};
use hetmem_core::Error;

#[test]
fn a_full_role_table_refuses_a_new_role_as_unsupported_not_out_of_memory() {
    let config = |limit| CacheConfig::uniform(4, limit).unwrap();
    for n in 0..16 {
        configure_role(ThreadRole::Custom(n), config(1024 + n as usize)).unwrap();
    }
    let refused = configure_role(ThreadRole::Custom(16), config(4096));
    assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
    assert_eq!(role_config(ThreadRole::Custom(16)), role_config(ThreadRole::Worker), "not registered");
    configure_role(ThreadRole::Custom(3), config(8192)).unwrap();
    assert_eq!(role_config(ThreadRole::Custom(3)).limit(0), 8192);
}
