//! Replays an allocation trace (JSON lines) against every pool and heuristic.
//!
//! ```text
//! cargo run --release --example replay                       # the sample trace
//! cargo run --release --example replay -- my-trace.jsonl     # a trace of your own
//! cargo run --release --example replay -- --record out.jsonl # write a fresh sample trace
//! ```
//!
//! A trace is what [`TracedPool`] records: `{"op":"alloc","id":7,"size":4096,"align":16}` and
//! `{"op":"free","id":7}`, one per line. For each pool the replay prints the time it took, the
//! peak actual size (what the pool held from upstream at most), the final actual size, and the
//! high watermark of bytes in use. `fixed` serves every request from slots of the trace's largest
//! size.

#[cfg(test)]
#[path = "common/command_line_tests.rs"]
mod command_line_tests;
#[path = "common/xorshift.rs"]
mod xorshift;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use hetmem::pool::render::Bytes;
use hetmem::pool::trace::{parse_jsonl_bytes, to_jsonl, Replay, TracedPool};
use hetmem::pool::{
    BlocksReleasable, CoalesceHeuristic, FixedPool, FixedPoolConfig, HostResource, NeverCoalesce, PercentReleasable,
    Pool, QuickPool, QuickPoolConfig,
};
use hetmem::Result;
use xorshift::XorShift;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/traces/sample.jsonl");

/// The pools a trace is replayed against, each fresh.
fn pools(max_size: usize, max_align: usize) -> Result<Vec<(String, Box<dyn Pool>)>> {
    let config = QuickPoolConfig { first_block_size: 512 << 10, next_block_size: 512 << 10, ..Default::default() };
    let heuristics: Vec<(&str, Box<dyn CoalesceHeuristic>)> = vec![
        ("naive", Box::new(NeverCoalesce)),
        ("quick blocks(4)", Box::new(BlocksReleasable::new(4)?)),
        ("quick blocks-hwm(4)", Box::new(BlocksReleasable::hwm(4)?)),
        ("quick percent(100)", Box::new(PercentReleasable::new(100)?)),
        ("quick percent(50)", Box::new(PercentReleasable::new(50)?)),
        ("quick percent-hwm(50)", Box::new(PercentReleasable::hwm(50)?)),
    ];
    let mut out: Vec<(String, Box<dyn Pool>)> = Vec::new();
    for (name, h) in heuristics {
        let pool = QuickPool::with_config(HostResource, config)?.with_heuristic(h);
        out.push((name.to_string(), Box::new(pool)));
    }
    if max_size > 0 {
        let fixed =
            FixedPoolConfig { objects_per_block: 64, alignment: max_align.max(16), ..FixedPoolConfig::new(max_size) };
        // `Replay::new` refused requests no pool can serve, but one huge request (or alignment)
        // may still leave no fixed pool to build, where the quick pools count it as failed.
        match FixedPool::new(HostResource, fixed) {
            Ok(pool) => out.push((format!("fixed ({})", Bytes(max_size)), Box::new(pool))),
            Err(e) => println!("fixed: no pool for the trace's largest request ({}): {e}", Bytes(max_size)),
        }
    }
    Ok(out)
}

/// A simulation-like run: each step allocates field arrays and temporaries of varying sizes,
/// frees the temporaries at the end of the step, and every few steps regrids (frees the fields
/// and allocates new ones of another size). Recorded through a [`TracedPool`].
fn record_sample() -> Result<String> {
    let mut pool = TracedPool::new(QuickPool::new(HostResource));
    let mut rng = XorShift(0x0005_DEEC_E66D);
    let mut next = move |n: usize| rng.below(n);
    let mut fields = Vec::new();
    for step in 0..60 {
        if step % 15 == 0 {
            for p in fields.drain(..) {
                pool.deallocate(p)?;
            }
            let cells = (64 + next(192)) << 10;
            for _ in 0..6 {
                fields.push(pool.allocate(cells, 64)?);
            }
        }
        let temporaries: Vec<_> =
            (0..8 + next(16)).map(|_| pool.allocate(256 + next(48 << 10), 16)).collect::<Result<_>>()?;
        for p in temporaries {
            pool.deallocate(p)?;
        }
    }
    for p in fields {
        pool.deallocate(p)?;
    }
    Ok(to_jsonl(pool.events()))
}

const USAGE: &str = "usage: replay [TRACE.jsonl] | replay --record [OUT.jsonl]";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Help,
    Replay(PathBuf),
    Record(PathBuf),
}

/// Parses the arguments after the program's name. Anything it does not know is an error, and so
/// is an option where a file name belongs (`--record --record` would write a file named
/// `--record`).
fn parse_args(args: &[String]) -> Result<Command, String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Command::Help);
    }
    match args {
        [] => Ok(Command::Replay(PathBuf::from(SAMPLE))),
        [record] if record == "--record" => Ok(Command::Record(PathBuf::from(SAMPLE))),
        [record, out] if record == "--record" => match out.starts_with('-') {
            true => Err(format!("--record takes a file name, not the option {out:?}")),
            false => Ok(Command::Record(PathBuf::from(out))),
        },
        [path] if !path.starts_with('-') => Ok(Command::Replay(PathBuf::from(path))),
        _ => Err(format!("unexpected arguments {args:?}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(command) => command,
        Err(e) => {
            eprintln!("replay: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads and checks the trace at `path`; an error names the path.
fn read_trace(path: &Path) -> std::result::Result<Replay, String> {
    let named = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    // Bytes, not a string: a line that is not UTF-8 is the trace's error, which names the line.
    let bytes = std::fs::read(path).map_err(|e| named(&e))?;
    parse_jsonl_bytes(&bytes).and_then(|events| Replay::new(&events)).map_err(|e| named(&e))
}

/// Records the sample trace into `out`; an error names the path.
fn write_sample(out: &Path) -> std::result::Result<(), String> {
    let named = |e: &dyn std::fmt::Display| format!("{}: {e}", out.display());
    std::fs::write(out, record_sample().map_err(|e| named(&e))?).map_err(|e| named(&e))
}

fn run(command: Command) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let path = match command {
        Command::Help => return Ok(()),
        Command::Record(out) => {
            write_sample(&out)?;
            println!("wrote {}", out.display());
            return Ok(());
        }
        Command::Replay(path) => path,
    };
    let replay = read_trace(&path)?;
    println!("{}: {} events, largest request {}", path.display(), replay.len(), Bytes(replay.max_size()));
    // Built before the header, so that a note about the fixed pool does not split the table.
    let pools = pools(replay.max_size(), replay.max_align())?;
    println!(
        "{:<24} {:>10} {:>9} {:>14} {:>14} {:>14} {:>7}",
        "pool", "time ms", "ns/op", "peak actual", "final actual", "high water", "failed"
    );
    for (name, mut pool) in pools {
        let start = Instant::now();
        let outcome = replay.run(pool.as_mut())?;
        let elapsed = start.elapsed();
        pool.check()?;
        let s = outcome.stats;
        println!(
            "{:<24} {:>10.3} {:>9.1} {:>14} {:>14} {:>14} {:>7}",
            name,
            elapsed.as_secs_f64() * 1e3,
            elapsed.as_nanos() as f64 / outcome.operations.max(1) as f64,
            Bytes(s.actual_high_watermark).to_string(),
            Bytes(s.actual_size).to_string(),
            Bytes(s.high_watermark).to_string(),
            outcome.failed_allocations,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use command_line_tests::{args, assert_refused};

    #[test]
    fn the_command_line_is_parsed_or_refused_with_a_reason() {
        let sample = || PathBuf::from(SAMPLE);
        assert_eq!(parse_args(&args("")), Ok(Command::Replay(sample())));
        assert_eq!(parse_args(&args("t.jsonl")), Ok(Command::Replay("t.jsonl".into())));
        assert_eq!(parse_args(&args("--record")), Ok(Command::Record(sample())));
        assert_eq!(parse_args(&args("--record o.jsonl")), Ok(Command::Record("o.jsonl".into())));
        assert_eq!(parse_args(&args("--record -h")), Ok(Command::Help));
        assert_refused(
            parse_args,
            &[
                // An option where the file name belongs is not a file name.
                ("--record --record", "--record takes a file name"),
                ("--record -x", "--record takes a file name"),
                ("-x", "unexpected arguments"),
                ("a.jsonl b.jsonl", "unexpected arguments"),
                ("a.jsonl --record", "unexpected arguments"),
                ("--record a b", "unexpected arguments"),
            ],
        );
    }

    #[test]
    fn errors_name_the_trace_s_path() {
        let dir = std::env::temp_dir().join(format!("hetmem-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.jsonl");
        let err = read_trace(&missing).unwrap_err();
        assert!(err.starts_with(&format!("{}: ", missing.display())), "{err}");
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"op\":\"alloc\",\"id\":1,\"size\":8}\n{\"op\":\"free\",\"id\":+1}\n").unwrap();
        let err = read_trace(&bad).unwrap_err();
        assert!(err.starts_with(&format!("{}: trace line 2: ", bad.display())), "{err}");
        let nowhere = dir.join("no-such-directory").join("out.jsonl");
        let err = write_sample(&nowhere).unwrap_err();
        assert!(err.starts_with(&format!("{}: ", nowhere.display())), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
