//! loom models of [`BindOnce`] (`hetmem_core::sync`), with which a depot binds its upstream:
//! racing binders agree on one value, and a reader sees no value or the whole bound one. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --test loom_bind_once --release`.
#![cfg(loom)]

use hetmem_core::sync::BindOnce;
use loom::sync::Arc;

/// A value of two words, so that a reader racing the writer could see half of one value.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Two(u64, u64);

/// Two threads bind different values at once: exactly one wins, and each binder's answer
/// agrees with the value that stays. (Two binders: with a third, the waiting binders' spinning
/// takes the model past loom's branch limit.)
#[test]
fn racing_binders_agree_on_one_value() {
    loom::model(|| {
        let once = Arc::new(BindOnce::new(Two(0, 0)));
        let other = {
            let once = once.clone();
            loom::thread::spawn(move || once.bind(Two(1, 1)))
        };
        let mine = once.bind(Two(2, 2));
        let other = other.join().unwrap();
        let bound = once.get().expect("a binding finished");
        assert_eq!(bound.0, bound.1, "a torn value: {bound:?}");
        assert_eq!((other, mine), (bound.0 == 1, bound.0 == 2), "answers disagree with {bound:?}");
    });
}

/// A reader beside a binder sees nothing or the whole value (loom reports a data race on the
/// value's cell if the binder's store and the reader's load do not order its write and read).
#[test]
fn a_reader_sees_nothing_or_the_bound_value() {
    loom::model(|| {
        let once = Arc::new(BindOnce::new(Two(0, 0)));
        let binder = {
            let once = once.clone();
            loom::thread::spawn(move || once.bind(Two(7, 9)))
        };
        if let Some(seen) = once.get() {
            assert_eq!(seen, Two(7, 9));
        }
        assert!(binder.join().unwrap());
        assert_eq!(once.get(), Some(Two(7, 9)));
    });
}

/// A binder that finds the value bound by another accepts it only if it is its own.
#[test]
fn a_late_binder_with_the_same_value_is_accepted() {
    loom::model(|| {
        let once = Arc::new(BindOnce::new(Two(0, 0)));
        let other = {
            let once = once.clone();
            loom::thread::spawn(move || once.bind(Two(5, 5)))
        };
        assert!(once.bind(Two(5, 5)));
        assert!(other.join().unwrap());
        assert!(!once.bind(Two(6, 6)));
    });
}
