//! One allocator operation, measured: `fastmem_ops <op> <type> <allocator>`.
//!
//! `benches/fastmem-instructions.sh` runs this under valgrind's callgrind with
//! `--toggle-collect=*measure*`, so the count covers exactly one call of [`measure`]: the
//! operation, with the value's initialisation, and nothing of the setup around it.
//!
//! - op: `first` (first allocation of the type), `realloc` (allocation after one was dropped),
//!   `drop`.
//! - type: `u8`, `u32`, `u64`, `struct100` (a 100-byte struct).
//! - allocator: `fastmem` (a static [`FastMemStore`]), `heapless-pool` (`heapless::pool::boxed`,
//!   two blocks managed up front, so its first allocation is a pop too), `box` (`Box` with the
//!   system allocator).

use std::hint::black_box;
use std::process::ExitCode;

use heapless::box_pool;
use heapless::pool::boxed::{BoxBlock, BoxPool};
use hetmem_core::fastmem::FastMemStore;

/// Runs `op` with instruction counting switched on (callgrind's toggle-collect matches the name).
#[inline(never)]
fn measure<R>(op: impl FnOnce() -> R) -> R {
    op()
}

/// A 100-byte message.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Struct100 {
    pub id: u32,
    pub payload: [u8; 96],
}

static STORE: FastMemStore<4096, 128> = FastMemStore::new();

box_pool!(PoolU8: u8);
box_pool!(PoolU32: u32);
box_pool!(PoolU64: u64);
box_pool!(PoolStruct100: Struct100);

#[derive(Clone, Copy, PartialEq)]
enum Op {
    First,
    Realloc,
    Drop,
}

/// Allocates with `a` (which gives `None` on failure), and measures the step `op` names.
///
/// `a` is passed by value (its captures arrive in registers), so the count holds no loads of
/// captured variables.
fn run<B>(op: Op, a: impl Fn() -> Option<B> + Copy) -> Result<(), String> {
    let failed = || "allocation failed".to_string();
    match op {
        Op::First => drop(black_box(measure(a).ok_or_else(failed)?)),
        Op::Realloc => {
            drop(black_box(a().ok_or_else(failed)?));
            drop(black_box(measure(a).ok_or_else(failed)?));
        }
        Op::Drop => {
            let b = black_box(a().ok_or_else(failed)?);
            measure(move || drop(b));
        }
    }
    Ok(())
}

fn heapless_blocks<P: BoxPool>(pool: &P, manage: impl Fn(&P, &'static mut BoxBlock<P::Data>)) {
    for _ in 0..2 {
        manage(pool, Box::leak(Box::new(BoxBlock::new())));
    }
}

macro_rules! for_type {
    ($op:expr, $alloc:expr, $value:expr, $pool:ident) => {{
        let value = black_box($value);
        match $alloc {
            "fastmem" => {
                let fm = STORE.init();
                run($op, move || fm.alloc(value).ok())
            }
            "heapless-pool" => {
                heapless_blocks(&$pool, |p, b| p.manage(b));
                run($op, move || $pool.alloc(value).ok())
            }
            "box" => run($op, move || Some(Box::new(value))),
            other => return Err(format!("unknown allocator {other}")),
        }
    }};
}

fn main_with(args: &[String]) -> Result<(), String> {
    let [op, ty, alloc] = args else {
        return Err("usage: fastmem_ops <first|realloc|drop> <u8|u32|u64|struct100> <fastmem|heapless-pool|box>".into());
    };
    let op = match op.as_str() {
        "first" => Op::First,
        "realloc" => Op::Realloc,
        "drop" => Op::Drop,
        other => return Err(format!("unknown op {other}")),
    };
    match ty.as_str() {
        "u8" => for_type!(op, alloc.as_str(), 0x5au8, PoolU8),
        "u32" => for_type!(op, alloc.as_str(), 0x5a5a_5a5au32, PoolU32),
        "u64" => for_type!(op, alloc.as_str(), 0x5a5a_5a5a_5a5a_5a5au64, PoolU64),
        "struct100" => for_type!(op, alloc.as_str(), Struct100 { id: 7, payload: [0x5a; 96] }, PoolStruct100),
        other => Err(format!("unknown type {other}")),
    }
}

fn main() -> ExitCode {
    // Kept alive to the end: freeing them first would leave chunks in the system allocator's
    // cache and turn Box's first allocation into a re-allocation.
    let args: Vec<String> = std::env::args().skip(1).collect();
    match main_with(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
