//! Test helpers for the examples' command-line parsers, shared so that each example's test reads
//! as a table of lines and what becomes of them. Include with
//! `#[cfg(test)] #[path = "common/command_line_tests.rs"] mod command_line_tests;`.

/// The arguments after the program's name for `line` typed at a shell (split at white space, no
/// quoting), as `std::env::args().skip(1)` would give them.
pub fn args(line: &str) -> Vec<String> {
    line.split_whitespace().map(String::from).collect()
}

/// Asserts that `parse` refuses each line of `refusals` with an error that contains its reason.
#[track_caller]
#[allow(dead_code)] // not every example's parser fits a table of lines and reasons
pub fn assert_refused<T: std::fmt::Debug>(parse: impl Fn(&[String]) -> Result<T, String>, refusals: &[(&str, &str)]) {
    for &(line, reason) in refusals {
        let err = match parse(&args(line)) {
            Ok(parsed) => panic!("{line:?} was accepted: {parsed:?}"),
            Err(err) => err,
        };
        assert!(err.contains(reason), "{line:?}: {err}");
    }
}
