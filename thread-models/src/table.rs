//! Thread-local keys kept by the model itself, for [`StdThreads`](crate::StdThreads) (std has no
//! dynamically created keys) and `Windows` (an FLS slot freed under a thread still reading its
//! value is a use after free, so that model frees none).
//!
//! A process-wide [`KeyTable`] holds each key slot's generation ([`SlotGenerations`]) and
//! destructor; each thread owns a [`ThreadValues`]: `(generation, value)` per slot. Deleting a key
//! only retires its generation: no thread's values are touched, so another thread may go on
//! reading or setting under the key meanwhile, and from then on sees null or
//! [`DELETED_KEY`](crate::DELETED_KEY). A value left under a deleted key is never handed to a
//! destructor, neither the deleted key's nor that of a later key in the same slot.

use hetmem_core::{Error, Result, TlsDestructor};
use std::cell::RefCell;
use std::ffi::c_void;

use crate::slots::SlotGenerations;
use crate::sync::{Mutex, MutexGuard};
use crate::DELETED_KEY;

/// Keys one table can hold at once.
#[cfg(not(loom))]
const KEY_SLOTS: usize = 4096;
/// Keys one table can hold at once: a loom model needs a few, and each is an object it tracks.
#[cfg(loom)]
const KEY_SLOTS: usize = 4;

/// Rounds of destructors at thread exit, in case a destructor sets new values: pthreads'
/// `PTHREAD_DESTRUCTOR_ITERATIONS`.
const DESTRUCTOR_ROUNDS: usize = 4;

/// A key of a [`KeyTable`]: its slot and the generation the slot had when the key was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableKey {
    /// The key's slot in the table.
    pub slot: usize,
    generation: u64,
}

/// The keys of one model: a generation per slot (odd while a key holds it) and the destructors.
pub struct KeyTable {
    generations: SlotGenerations<KEY_SLOTS>,
    /// Indexed by slot; as long as the highest slot ever used. Creating and deleting keys hold
    /// this lock, so a slot has one owner at a time.
    destructors: Mutex<Vec<Option<TlsDestructor>>>,
}

impl KeyTable {
    /// No keys.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self { generations: SlotGenerations::new(), destructors: Mutex::new(Vec::new()) }
    }

    /// No keys.
    #[cfg(loom)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self { generations: SlotGenerations::new(), destructors: Mutex::new(Vec::new()) }
    }

    fn destructors(&self) -> MutexGuard<'_, Vec<Option<TlsDestructor>>> {
        // Every update is one store; a panic elsewhere cannot leave the table inconsistent.
        self.destructors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new key in the lowest free slot, running `destructor` at thread exit.
    pub fn create(&self, destructor: Option<TlsDestructor>) -> Result<TableKey> {
        let mut destructors = self.destructors();
        let slot = (0..destructors.len()).find(|&s| !self.generations.is_held(s)).unwrap_or(destructors.len());
        let generation = self.generations.open(slot, Error::Unsupported("all thread-local keys are in use"))?;
        if slot == destructors.len() {
            destructors.push(destructor);
        } else {
            destructors[slot] = destructor;
        }
        Ok(TableKey { slot, generation })
    }

    /// Whether `key` has not been deleted: one atomic load and a compare.
    #[inline]
    pub fn is_live(&self, key: TableKey) -> bool {
        self.generations.is_live(key.slot, key.generation)
    }

    /// Retires `key`; no destructor runs. [`DELETED_KEY`] if it was already deleted.
    pub fn delete(&self, key: TableKey) -> Result<()> {
        let mut destructors = self.destructors();
        self.generations.close(key.slot, key.generation)?;
        destructors[key.slot] = None;
        Ok(())
    }

    /// The destructor of the key `(slot, generation)` if that key is still live.
    fn live_destructor(&self, slot: usize, generation: u64) -> Option<TlsDestructor> {
        let destructors = self.destructors();
        destructors.get(slot).copied().flatten().filter(|_| self.generations.is_live(slot, generation))
    }
}

/// One thread's values under the keys of a [`KeyTable`]; dropping it runs their destructors.
///
/// Only its thread touches it (it is `!Sync`); destructors may get and set values through it
/// while it runs them.
pub struct ThreadValues {
    keys: &'static KeyTable,
    /// `(generation, value)` per slot; a value counts only while its generation is the key's and
    /// the key is live.
    values: RefCell<Vec<(u64, *mut c_void)>>,
}

impl ThreadValues {
    /// No values yet.
    pub fn new(keys: &'static KeyTable) -> Self {
        Self { keys, values: RefCell::new(Vec::new()) }
    }

    /// The value under `key`: null if never set here, or if `key` was deleted.
    #[inline]
    pub fn get(&self, key: TableKey) -> *mut c_void {
        match self.values.borrow().get(key.slot) {
            Some(&(generation, value)) if generation == key.generation && self.keys.is_live(key) => value,
            _ => std::ptr::null_mut(),
        }
    }

    /// Sets the value under `key`; [`DELETED_KEY`] if it was deleted.
    ///
    /// A delete racing this call may land after the check: the value is then stored under the
    /// retired generation, which no get matches and no destructor runs for.
    pub fn set(&self, key: TableKey, value: *mut c_void) -> Result<()> {
        if !self.keys.is_live(key) {
            return Err(DELETED_KEY);
        }
        let mut values = self.values.borrow_mut();
        if values.len() <= key.slot {
            values.resize(key.slot + 1, (0, std::ptr::null_mut()));
        }
        values[key.slot] = (key.generation, value);
        Ok(())
    }

    /// Runs the destructors of the non-null values under live keys, each value once, clearing it
    /// first; repeats up to [`DESTRUCTOR_ROUNDS`] rounds while destructors set new values.
    pub fn run_destructors(&self) {
        for _ in 0..DESTRUCTOR_ROUNDS {
            // Taken out, so destructors may set values (seen by the next round) meanwhile.
            let values = std::mem::take(&mut *self.values.borrow_mut());
            let mut ran = false;
            for (slot, (generation, value)) in values.into_iter().enumerate() {
                if value.is_null() {
                    continue;
                }
                if let Some(destructor) = self.keys.live_destructor(slot, generation) {
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

impl Drop for ThreadValues {
    fn drop(&mut self) {
        self.run_destructors();
    }
}
