//! [`ForkOnce`]: a platform's start-up answer, worked out once per process and refused in a
//! forked child (neither CUDA nor HIP survives `fork()`: any call before an `exec` is undefined
//! behaviour, so nothing may call them there).

use std::sync::OnceLock;

use hetmem_core::{Error, Result};

/// The answer of a start-up function, and the fork generation ([`hetmem_core::fork`]) it was given
/// in.
pub(crate) struct ForkOnce<T>(OnceLock<(Result<T>, u64)>);

impl<T: Copy> ForkOnce<T> {
    pub(crate) const fn new() -> Self {
        ForkOnce(OnceLock::new())
    }

    /// `start`'s answer, from its first call in this process; `Unsupported(forked)` in a forked
    /// child of a process where it succeeded. Forks are watched before `start` runs, so that every
    /// later one is counted.
    pub(crate) fn get(&self, start: impl FnOnce() -> Result<T>, forked: &'static str) -> Result<T> {
        let (state, generation) = self.0.get_or_init(|| {
            let answer = hetmem_core::fork::watch().and_then(|()| start());
            (answer, hetmem_core::fork::generation())
        });
        if state.is_ok() && *generation != hetmem_core::fork::generation() {
            return Err(Error::Unsupported(forked));
        }
        *state
    }
}
