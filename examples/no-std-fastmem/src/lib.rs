//! A `#![no_std]` crate without an allocator that uses hetmem's fastmem the way firmware would:
//! a `static` store, boxed message handlers (`FastBox<dyn FnMut>`), a boxed future polled to
//! completion, and an exhausted store answered with an error.
//!
//! It depends on `hetmem-core` with no default features (no `std`, no `alloc`) and builds for
//! bare-metal targets, e.g. `cargo build -p hetmem-no-std-fastmem --target thumbv7em-none-eabihf`
//! (`ci/fastmem.sh`). On the host, `cargo test -p hetmem-no-std-fastmem` runs the same code.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use core::future::Future;
use core::pin::pin;
use core::task::{Context, Poll, Waker};

use hetmem_core::fastbox_unsize;
use hetmem_core::fastmem::{FastBox, FastMemStore};
use hetmem_core::Error;

/// The application's store: 2 KiB for values of up to 256 bytes.
pub static STORE: FastMemStore<2048, 256> = FastMemStore::new();

/// A message handler, as a task would keep it.
pub type Handler = FastBox<'static, dyn FnMut(u32) -> u32 + Send>;

/// Boxes three handlers of different sizes, sends each a few messages, and sums the replies.
pub fn run_handlers() -> Result<u32, Error> {
    let fm = STORE.init();
    let mut count = 0u32;
    let table = [3u32, 5, 7, 11];
    let mut handlers: [Handler; 3] = [
        fastbox_unsize!(fm.alloc(|m: u32| m * 2)? => dyn FnMut(u32) -> u32 + Send),
        fastbox_unsize!(fm.alloc(move |m: u32| { count += 1; m + count })? => dyn FnMut(u32) -> u32 + Send),
        fastbox_unsize!(fm.alloc(move |m: u32| table[m as usize % 4])? => dyn FnMut(u32) -> u32 + Send),
    ];
    let mut sum = 0;
    for message in 0..4 {
        for handler in handlers.iter_mut() {
            sum += handler(message);
        }
    }
    Ok(sum)
}

/// Ready after being polled `n` more times.
struct Countdown(u32);

impl Future for Countdown {
    type Output = u32;
    fn poll(mut self: core::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
        if self.0 == 0 {
            return Poll::Ready(1);
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Boxes an `async` block as a `FastBox<dyn Future>` and polls it to completion; returns its
/// output and the number of polls.
pub fn run_future() -> Result<(u32, u32), Error> {
    let fm = STORE.init();
    let task = async {
        let mut total = 0;
        for n in 0..3 {
            total += Countdown(n).await;
        }
        total
    };
    let boxed = fastbox_unsize!(fm.alloc(task)? => dyn Future<Output = u32> + Send);
    let mut task = pin!(FastBox::into_pin(boxed));
    let mut cx = Context::from_waker(Waker::noop());
    let mut polls = 0;
    loop {
        polls += 1;
        if let Poll::Ready(out) = task.as_mut().poll(&mut cx) {
            return Ok((out, polls));
        }
    }
}

/// Fills a small store with 64-byte messages until it is exhausted; returns how many fitted and
/// whether one more fits after a drop (it must: the dropped block is recycled).
pub fn fill_until_exhausted() -> (usize, bool) {
    let store = FastMemStore::<1024, 64>::new();
    let fm = store.init();
    let mut held: [Option<FastBox<'_, [u8; 60]>>; 32] = [const { None }; 32];
    let mut fitted = 0;
    for slot in held.iter_mut() {
        match fm.alloc([fitted as u8; 60]) {
            Ok(b) => {
                *slot = Some(b);
                fitted += 1;
            }
            Err(Error::OutOfMemory { .. }) => break,
            Err(_) => return (fitted, false),
        }
    }
    held[0] = None;
    let again = fm.alloc([0xffu8; 60]).is_ok();
    (fitted, again)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_reply() {
        // m*2 over 0..4 = 12; m + count = 0+1 + 1+2 + 2+3 + 3+4 = 16; table = 3+5+7+11 = 26.
        assert_eq!(run_handlers(), Ok(54));
    }

    #[test]
    fn future_completes() {
        assert_eq!(run_future(), Ok((3, 4)));
    }

    #[test]
    fn exhausted_store_is_an_error_and_recovers() {
        // 1024 bytes less the stack heads (40 bytes on 64-bit targets, 24 on 32-bit) hold fourteen
        // or fifteen 64-byte blocks (the first after padding).
        let (fitted, again) = fill_until_exhausted();
        assert!((14..=15).contains(&fitted), "{fitted}");
        assert!(again);
    }
}
