//! loom models of the thread models' key generations (`src/slots.rs`) and of the key table that
//! `StdThreads` and `Windows` keep (`src/table.rs`): racing deletes of one key, a key deleted
//! while another thread uses it and its slot handed to a new key (which the old key must never
//! pass for), a slot freed behind the model's back, and a delete undone; and of the pthreads
//! model's handshake between a `tls_set` and a `tls_delete` of its key (`SetsUnderWay`): a set
//! that passed its check is done before the key's number goes to a new key. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p hetmem-thread-models --release --test 'loom_*'`.
#![cfg(loom)]

use std::cell::Cell;
use std::ffi::c_void;

use hetmem_core::Error;
use hetmem_thread_models::slots::{SetsUnderWay, SlotGenerations};
use hetmem_thread_models::table::{KeyTable, ThreadValues};
use loom::cell::UnsafeCell;
use loom::sync::Arc;

/// What every model answers for a key used after its delete.
const DELETED_KEY: Error = Error::Unsupported("thread-local key was deleted");

/// Two deletes of one key at once: exactly one succeeds, the other gets `DELETED_KEY`, and the
/// slot is left free.
#[test]
fn of_two_deletes_of_one_key_one_succeeds() {
    loom::model(|| {
        let generations = Arc::new(SlotGenerations::<2>::new());
        let key = generations.open(1, Error::Unsupported("beyond")).unwrap();
        let other = {
            let generations = generations.clone();
            loom::thread::spawn(move || generations.close(1, key))
        };
        let mine = generations.close(1, key);
        let other = other.join().unwrap();
        assert!(mine.is_ok() != other.is_ok(), "both or neither of two deletes succeeded: {mine:?} {other:?}");
        assert_eq!(mine.and(other), Err(DELETED_KEY));
        assert!(!generations.is_live(1, key));
        assert!(!generations.is_held(1));
    });
}

/// A key deleted while another thread uses it, and its slot handed to a new key at once: the
/// user's key reads live only until the delete (never again after, though the slot is held
/// again), and its own delete fails once the other has retired it, whoever now holds the slot.
#[test]
fn a_key_whose_slot_went_to_a_new_key_never_passes_for_it() {
    loom::model(|| {
        let generations = Arc::new(SlotGenerations::<2>::new());
        let old = generations.open(0, Error::Unsupported("beyond")).unwrap();
        let user = {
            let generations = generations.clone();
            loom::thread::spawn(move || {
                let before = generations.is_live(0, old);
                let deleted = generations.close(0, old);
                let after = generations.is_live(0, old);
                (before, deleted, after)
            })
        };
        // The deleter; the OS hands the slot to a new key once it is free, after either delete
        // (a failed delete read the other's retirement, so it follows it).
        let deleted = generations.close(0, old);
        let new = generations.open(0, Error::Unsupported("beyond")).unwrap();
        assert!(new > old && new & 1 == 1, "the new key's generation {new} after {old}");
        assert!(generations.is_live(0, new));
        assert!(!generations.is_live(0, old));
        let (before, user_deleted, after) = user.join().unwrap();
        assert!(deleted.is_ok() != user_deleted.is_ok(), "{deleted:?} {user_deleted:?}");
        assert!(before || user_deleted.is_err(), "a key that read deleted was deleted again");
        assert!(!after, "the deleted key read live again");
        // Later uses of the old key, the new one holding the slot: all refused.
        assert_eq!(generations.close(0, old), Err(DELETED_KEY));
        assert!(generations.is_live(0, new));
    });
}

/// A slot freed behind the model's back (its key never saw `tls_delete`) and taken by a new key
/// while a thread still uses the old key: the new key's generation is not the old one, so the
/// old key reads live only until then, and its delete is refused and cannot retire the new key.
///
/// The old key's delete comes after the new key is made: racing the new key's `open` it would be a
/// plain store against a CAS, whose modification order loom leaves partial (it lets the CAS read
/// the value the store overwrote), and the model would fail where C11 cannot.
#[test]
fn a_slot_freed_behind_the_models_back_retires_its_key() {
    loom::model(|| {
        let generations = Arc::new(SlotGenerations::<2>::new());
        let old = generations.open(1, Error::Unsupported("beyond")).unwrap();
        let user = {
            let generations = generations.clone();
            loom::thread::spawn(move || {
                let first = generations.is_live(1, old);
                let second = generations.is_live(1, old);
                assert!(first || !second, "the old key read live again after it read retired");
            })
        };
        // The slot went back to the OS without `close`; the next key that the OS hands it to.
        let new = generations.open(1, Error::Unsupported("beyond")).unwrap();
        assert_ne!(new, old, "the new key took the old key's generation");
        assert!(!generations.is_live(1, old));
        user.join().unwrap();
        assert_eq!(generations.close(1, old), Err(DELETED_KEY));
        assert!(generations.is_live(1, new), "the old key's delete retired the new key");
    });
}

/// A delete that the OS refused undoes its retirement (`reopen`) while another delete of the key
/// races it: the other either fails while the key is retired or succeeds after it is live again;
/// either way the key ends retired at most once and live otherwise.
#[test]
fn a_delete_undone_leaves_the_key_usable() {
    loom::model(|| {
        let generations = Arc::new(SlotGenerations::<2>::new());
        let key = generations.open(0, Error::Unsupported("beyond")).unwrap();
        let other = {
            let generations = generations.clone();
            loom::thread::spawn(move || generations.close(0, key))
        };
        let mine = generations.close(0, key);
        if mine.is_ok() {
            // pthread_key_delete failed: the key stays usable.
            generations.reopen(0, key);
        }
        let other = other.join().unwrap();
        assert!(mine.is_ok() || other.is_ok(), "a live key's deletes both failed");
        assert_eq!(generations.is_live(0, key), other.is_err(), "{mine:?} {other:?}");
    });
}

/// A pthreads `tls_set` that passed its check while another thread deletes its key, whose number
/// the OS then hands to a new key: either the set finds the key retired and stores nothing, or
/// its store happens before the delete lets the number go (loom reports the two writes of the
/// number's value as a race otherwise), so it never lands under the new key.
#[test]
fn a_set_racing_a_delete_is_done_before_the_number_goes_to_a_new_key() {
    loom::model(|| {
        let generations = Arc::new(SlotGenerations::<2>::new());
        let sets = Arc::new(SetsUnderWay::<2>::new());
        // What libc keeps under the key's number for the setting thread.
        let number = Arc::new(UnsafeCell::new(0usize));
        let key = generations.open(1, Error::Unsupported("beyond")).unwrap();
        let setter = {
            let (generations, sets, number) = (generations.clone(), sets.clone(), number.clone());
            loom::thread::spawn(move || {
                // SAFETY: the key's value is this thread's until the delete has waited for it.
                let store = || number.with_mut(|v| unsafe { *v = 7 });
                sets.store_if_live(&generations, 1, key, || {}, store).is_some()
            })
        };
        sets.close_and_wait(&generations, 1, key).unwrap();
        // SAFETY: every set that found the key live is done (loom checks it).
        let left = number.with(|v| unsafe { *v });
        // pthread_key_delete, and the next pthread_key_create gets the number: the new key's
        // value starts empty.
        let new = generations.open(1, Error::Unsupported("beyond")).unwrap();
        // SAFETY: the number is the new key's now; loom checks that no set of the old key races.
        number.with_mut(|v| unsafe { *v = 0 });
        let stored = setter.join().unwrap();
        assert_eq!(left, if stored { 7 } else { 0 }, "the delete returned before a set it let through");
        assert!(generations.is_live(1, new));
        // SAFETY: both writers are done.
        assert_eq!(number.with(|v| unsafe { *v }), 0, "the set of the deleted key landed under the new key");
        // A set of the deleted key now: refused, uncounted.
        assert!(sets.store_if_live(&generations, 1, key, || {}, || unreachable!()).is_none());
    });
}

/// Two sets of one key, one of them racing its delete: each either stores or is refused, and the
/// delete returns once both are done, whatever order they came in.
#[test]
fn a_delete_waits_for_every_set_that_found_its_key_live() {
    loom::model(|| {
        let generations = Arc::new(SlotGenerations::<2>::new());
        let sets = Arc::new(SetsUnderWay::<2>::new());
        let number = Arc::new(UnsafeCell::new(0usize));
        let key = generations.open(0, Error::Unsupported("beyond")).unwrap();
        let setter = {
            let (generations, sets, number) = (generations.clone(), sets.clone(), number.clone());
            loom::thread::spawn(move || {
                let mut stored = 0;
                for value in [1, 2] {
                    // SAFETY: as in the model above.
                    let store = || number.with_mut(|v| unsafe { *v = value });
                    stored += usize::from(sets.store_if_live(&generations, 0, key, || {}, store).is_some());
                }
                stored
            })
        };
        sets.close_and_wait(&generations, 0, key).unwrap();
        // SAFETY: every set that found the key live is done.
        let left = number.with(|v| unsafe { *v });
        let stored = setter.join().unwrap();
        assert_eq!(left, [0, 1, 2][stored], "{stored} sets stored, {left} left");
    });
}

std::thread_local! {
    /// The values that `count_destroyed` got on this thread (loom runs a model's threads on one).
    static DESTROYED: Cell<usize> = const { Cell::new(0) };
}

unsafe extern "C" fn count_destroyed(value: *mut c_void) {
    DESTROYED.with(|d| d.set(d.get() + value as usize));
}

/// A key table that lives as long as the thread values that name it (leaked: a few bytes per
/// explored execution).
fn leaked_table() -> &'static KeyTable {
    Box::leak(Box::new(KeyTable::new()))
}

/// A thread sets a key while another deletes it and makes a new key, which takes its slot: the
/// set either fails or lands under the deleted key, where no get and no destructor finds it; the
/// new key reads null on the setting thread, and its destructor never gets the old value.
#[test]
fn a_set_racing_a_delete_never_lands_under_the_next_key() {
    loom::model(|| {
        DESTROYED.with(|d| d.set(0));
        let keys = leaked_table();
        let old = keys.create(Some(count_destroyed)).unwrap();
        let deleter = loom::thread::spawn(move || {
            keys.delete(old).unwrap();
            keys.create(Some(count_destroyed)).unwrap()
        });
        let values = ThreadValues::new(keys);
        let set = values.set(old, 2 as *mut c_void);
        let read = values.get(old);
        assert!(read.is_null() || (set.is_ok() && read == 2 as *mut c_void));
        let new = deleter.join().unwrap();
        assert_eq!(new.slot, old.slot, "the new key takes the lowest free slot");
        assert_ne!(new, old);
        assert!(set.is_ok() || set == Err(DELETED_KEY), "{set:?}");
        assert!(values.get(new).is_null(), "the new key reads the deleted key's value");
        assert!(values.get(old).is_null(), "the deleted key reads its value after the delete");
        assert_eq!(values.set(old, 4 as *mut c_void), Err(DELETED_KEY));
        values.run_destructors();
        assert_eq!(DESTROYED.with(Cell::get), 0, "a destructor ran for the deleted key's value");
        values.set(new, 16 as *mut c_void).unwrap();
        assert_eq!(values.get(new), 16 as *mut c_void);
        values.run_destructors();
        assert_eq!(DESTROYED.with(Cell::get), 16, "destructors ran for other values than the new key's");
    });
}

/// Two threads make keys while one of them deletes its first: every key made is distinct from
/// every other, also from a deleted one whose slot it took, and those not deleted stay live.
#[test]
fn keys_made_at_once_are_distinct() {
    loom::model(|| {
        let keys = leaked_table();
        let maker = loom::thread::spawn(move || keys.create(None).unwrap());
        let first = keys.create(None).unwrap();
        keys.delete(first).unwrap();
        let second = keys.create(None).unwrap();
        let theirs = maker.join().unwrap();
        assert!(theirs != first && theirs != second && first != second, "{first:?} {second:?} {theirs:?}");
        assert_ne!(theirs.slot, second.slot, "two live keys share a slot");
        assert!(keys.is_live(theirs) && keys.is_live(second) && !keys.is_live(first));
        assert_eq!(keys.delete(first), Err(DELETED_KEY));
    });
}
