//! `hetmem`: looks at live hetmem segments from the command line.
//!
//! ```text
//! hetmem list                  the hetmem segments in /dev/shm
//! hetmem show NAME [--id M.m]  a segment's header, and each allocator's figures
//! hetmem check NAME [--id M.m] walks each allocator's structures (`check()`)
//! --timeout SECS               with any command: give up after SECS seconds (default 30)
//! ```
//!
//! The tool attaches to a segment as any process of the application does, so it sees what a
//! process starting now would see: attaching a scalable-page or thread-local allocator recovers
//! what dead processes left in it, as it does for every attacher. Beyond that and the locks it
//! takes, the tool writes nothing to the segment. It takes those locks as any process does: one
//! that a dead process held is recovered; one that a live process holds for good (stopped in a
//! debugger, say) makes it wait, until the command's timeout, when it gives up with exit status
//! 2 and says why (as Ctrl-C would stop it: a lock it held then is recovered by the next process
//! that wants it).
//! `show` and `check` of a segment still being created wait, as any attacher does, for its
//! creator to set it up, up to the same timeout; then they give up with exit status 2 and say
//! that it is not ready (its creator died setting it up, or it is not hetmem's). `list` waits
//! only a moment for each segment, and lists one that is not ready as such.
//! `check` reads structures that the application's processes may be changing: a report of damage
//! on a busy segment may be a race, so run it again, or run it while the segment is quiet.
//! A segment resized since it was made is refused (`list` says so); one that another process
//! shrinks (`ftruncate`) while the tool reads it ends the tool with `SIGBUS`, as it would any
//! process that has the segment mapped.
//!
//! Exit status: 0 when all is well, 1 when `check` found damage, 2 for anything else (a bad
//! command line, a segment that is missing or not hetmem's).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem::allocators::{BitmapAllocator, ScalablePageAllocator, StackAllocator, ThreadLocalAllocator};
use hetmem::backends::{PosixShmBackend, ShmOptions, HEADER_SIZE};
use hetmem::core::header::AllocatorEntry;
use hetmem::{AllocStats, AllocatorId, AllocatorType, BackendKind, Error, MemoryBackend, Region, RegionAllocator};

const USAGE: &str = "\
usage: hetmem list
       hetmem show NAME [--id MAJOR.MINOR]
       hetmem check NAME [--id MAJOR.MINOR]

  list     the hetmem segments in /dev/shm: size, kind, creator, allocators
           (and, for one it cannot read, why)
  show     a segment's header and each allocator's figures
  check    walks each allocator's structures; exit status 1 if any is damaged

Attaching recovers what dead processes left in scalable-page and thread-local
allocators, as any process that attaches does.

NAME is the segment's name (\"/demo\" or \"demo\"). --id picks one allocator.
--timeout SECS (any command): give up after SECS seconds (default 30), as when
a live process holds a lock in the segment for good (stopped in a debugger).
show and check wait as long for a segment still being created to be ready;
list waits a moment for each segment and lists one that is not as not ready.
Exit status: 0 all well, 1 damage found, 2 any other error.";

/// How long a command may run before the tool gives up, unless `--timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The arguments as text: one that is not UTF-8 names no segment hetmem makes, and is refused.
fn utf8_args(args: impl Iterator<Item = OsString>) -> Result<Vec<String>, String> {
    args.map(|arg| arg.into_string().map_err(|arg| format!("argument {arg:?} is not valid UTF-8"))).collect()
}

/// Takes `--timeout SECS` (anywhere on the line) out of `args`: the timeout, and the rest.
fn split_timeout(args: &[String]) -> Result<(Duration, Vec<String>), String> {
    let mut timeout = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg != "--timeout" {
            rest.push(arg.clone());
            continue;
        }
        let value = it.next().ok_or("--timeout needs a value (seconds)")?;
        let secs: f64 = value.parse().map_err(|_| format!("--timeout {value:?}: not a number of seconds"))?;
        let t = Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or(format!("--timeout {value:?}: not a positive number of seconds"))?;
        if timeout.replace(t).is_some() {
            return Err("--timeout given twice".into());
        }
    }
    Ok((timeout.unwrap_or(DEFAULT_TIMEOUT), rest))
}

/// Where the command is, for the watchdog.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Attaching to the segment: waiting, if it is still being created, for it to be ready.
    Attaching,
    /// Attached, reading the segment (and waiting on any lock in it that it needs).
    Reading,
    /// The command has its report: the watchdog lets the tool write it, however long a slow
    /// reader, a pager, takes, as it is no longer waiting on the segment.
    Reported,
}

/// Where the command is. The watchdog holds the lock while it ends the process, so a report is
/// written whole or not at all.
static STAGE: std::sync::Mutex<Stage> = std::sync::Mutex::new(Stage::Attaching);

fn set_stage(stage: Stage) {
    *STAGE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = stage;
}

/// Why a command gave up after `timeout` waiting for a segment still being created.
fn not_ready(timeout: Duration) -> String {
    format!(
        "gave up after {:.1} s (--timeout SECS waits longer): the segment is not ready: its creator has not \
         finished setting it up (it died doing so, or the segment is not hetmem's)",
        timeout.as_secs_f64()
    )
}

/// Ends the process with status 2 once `timeout` has passed, unless the command has its report
/// by then: the command is most likely waiting for a segment's creator, or on a lock a live
/// process holds, though `check` of a very large segment may take that long.
fn give_up_after(timeout: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        let stage = STAGE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let reason = match *stage {
            Stage::Reported => return,
            Stage::Attaching => not_ready(timeout),
            Stage::Reading => format!(
                "gave up after {:.1} s (--timeout SECS waits longer): a lock in the segment is held by a live \
                 process (stopped in a debugger?), or the segment is too large to go through in that time",
                timeout.as_secs_f64()
            ),
        };
        complain(&reason);
        std::process::exit(2);
    });
}

/// Writes `text` to standard output. A reader that has gone (`hetmem list | head -1`, a pager quit
/// early) took what it wanted: that is no error. Any other failure (a full disk) is.
fn write_report(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        done => done,
    }
}

/// Writes `message` to standard error, as `hetmem: message`; if even that fails, there is no one
/// left to tell (`eprintln!` would panic).
fn complain(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "hetmem: {message}");
}

/// Where POSIX shared-memory segments appear as files (Linux).
const SHM_DIR: &str = "/dev/shm";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    List,
    Show { name: String, id: Option<AllocatorId> },
    Check { name: String, id: Option<AllocatorId> },
}

/// Parses the arguments after the program's name.
fn parse(args: &[String]) -> Result<Command, String> {
    let Some(command) = args.first() else {
        return Err("no command given".into());
    };
    if matches!(command.as_str(), "-h" | "--help" | "help") {
        return Ok(Command::Help);
    }
    if command == "list" {
        return match args.get(1) {
            None => Ok(Command::List),
            Some(extra) => Err(format!("list takes no arguments (got {extra:?})")),
        };
    }
    if !matches!(command.as_str(), "show" | "check") {
        return Err(format!("unknown command {command:?}"));
    }
    let mut name = None;
    let mut id = None;
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--id" => {
                let value = rest.next().ok_or("--id needs a value (MAJOR.MINOR)")?;
                if id.replace(parse_id(value)?).is_some() {
                    return Err("--id given twice".into());
                }
            }
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag:?}")),
            _ if name.is_some() => return Err(format!("{command} takes one segment name (got {arg:?} too)")),
            _ => name = Some(arg.clone()),
        }
    }
    let name = name.ok_or(format!("{command} needs a segment name"))?;
    Ok(if command == "show" { Command::Show { name, id } } else { Command::Check { name, id } })
}

/// Parses an allocator id written as `MAJOR.MINOR`, as hetmem prints them.
fn parse_id(text: &str) -> Result<AllocatorId, String> {
    let bad = || format!("--id {text:?}: not MAJOR.MINOR (two numbers, as in 1.0)");
    let (major, minor) = text.split_once('.').ok_or_else(bad)?;
    Ok(AllocatorId::new(major.parse().map_err(|_| bad())?, minor.parse().map_err(|_| bad())?))
}

/// Attaches the allocator `entry` names as its recorded type, if this build knows the type
/// (`Ok(None)` if not).
fn attach(
    backend: &Arc<dyn MemoryBackend>,
    entry: &AllocatorEntry,
) -> hetmem::Result<Option<Box<dyn RegionAllocator>>> {
    fn typed<A: AllocatorType>(
        backend: &Arc<dyn MemoryBackend>,
        entry: &AllocatorEntry,
    ) -> hetmem::Result<Option<Box<dyn RegionAllocator>>> {
        // SAFETY: the directory gave the range to an allocator of type `A` (its entry's type, which
        // `attach` checks), a region allocator, over whose state this attaches.
        let region = unsafe { Region::new(backend.clone(), entry.offset, entry.size) }?;
        Ok(Some(Box::new(A::attach(region, entry.id)?)))
    }
    match entry.type_id {
        StackAllocator::TYPE_ID => typed::<StackAllocator>(backend, entry),
        ScalablePageAllocator::TYPE_ID => typed::<ScalablePageAllocator>(backend, entry),
        <ThreadLocalAllocator as AllocatorType>::TYPE_ID => typed::<ThreadLocalAllocator>(backend, entry),
        BitmapAllocator::TYPE_ID => typed::<BitmapAllocator>(backend, entry),
        _ => Ok(None),
    }
}

/// A type id as its four ASCII letters where it is printable ("STK1"), else in hex.
fn type_label(type_id: u32) -> String {
    let bytes = type_id.to_be_bytes();
    if bytes.iter().all(|b| b.is_ascii_graphic()) {
        bytes.iter().map(|&b| char::from(b)).collect()
    } else {
        format!("{type_id:#010x}")
    }
}

/// A byte count for people: exact below 1 KiB, else in the largest binary unit that fits.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn kind_label(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Private => "private",
        BackendKind::Shared => "shared",
        BackendKind::Pinned => "pinned",
        BackendKind::Device => "device",
    }
}

/// The creator's pid, and whether a process with that pid runs (Linux: `/proc/PID`; the pid may
/// have been reused by another program since).
fn creator_label(pid: u32) -> String {
    if !std::path::Path::new("/proc/self").exists() {
        return pid.to_string();
    }
    let state = if std::path::Path::new(&format!("/proc/{pid}")).exists() { "running" } else { "gone" };
    format!("{pid} ({state})")
}

/// A segment's name as the tool prints it: a name is any bytes but '/' and NUL, so one with a
/// line break or a terminal's escape sequence in it (another user's, in the shared /dev/shm) would
/// forge lines of the report or take over the terminal; such characters are shown escaped.
fn printable(name: &str) -> String {
    if name.chars().any(char::is_control) {
        name.escape_debug().to_string()
    } else {
        name.to_string()
    }
}

/// Attaches to segment `name` of whatever kind its header records (shared, or pinned for a
/// GPU), without removing it when done.
fn open(name: &str, timeout: Duration) -> hetmem::Result<Arc<dyn MemoryBackend>> {
    let options = ShmOptions { unlink_on_drop: false, attach_timeout: timeout, ..ShmOptions::default() };
    let backend = match PosixShmBackend::attach(name, &options) {
        Err(Error::HeaderMismatch { field: "kind", found, .. }) => {
            let kind = u32::try_from(found).ok().and_then(BackendKind::from_raw).ok_or(Error::HeaderMismatch {
                field: "kind",
                expected: BackendKind::Shared as u64,
                found,
            })?;
            PosixShmBackend::attach_kind(name, &options, kind)?
        }
        other => other?,
    };
    Ok(Arc::new(backend))
}

/// When a command that started now with `timeout` gives up: `None` for a timeout past what the
/// clock counts (`--timeout 1e19`), which no command reaches.
fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Attaches to segment `name` for `show` or `check`, waiting for it to be ready until `deadline`
/// (the command's timeout), or for ever (`None`).
fn open_until(name: &str, deadline: Option<Instant>) -> hetmem::Result<Arc<dyn MemoryBackend>> {
    let patience = deadline.map_or(Duration::MAX, |deadline| deadline.saturating_duration_since(Instant::now()));
    let backend = open(name, patience)?;
    set_stage(Stage::Reading);
    Ok(backend)
}

/// The segment's ready allocators, or the one `id` names.
fn entries(backend: &Arc<dyn MemoryBackend>, id: Option<AllocatorId>) -> hetmem::Result<Vec<AllocatorEntry>> {
    let all: Vec<AllocatorEntry> = backend.header().allocators().collect();
    match id {
        None => Ok(all),
        Some(id) => match all.into_iter().find(|e| e.id == id) {
            Some(e) => Ok(vec![e]),
            None => Err(Error::UnknownAllocator(id)),
        },
    }
}

/// A one-line summary of an allocator's figures.
fn stats_line(s: &AllocStats) -> String {
    format!(
        "{} live allocations, {} in use, {} reserved of {} (high watermark {}), {} allocations and {} frees so far",
        s.live_allocations,
        bytes(s.bytes_in_use),
        bytes(s.bytes_reserved),
        bytes(s.capacity),
        bytes(s.high_watermark),
        s.total_allocations,
        s.total_frees,
    )
}

/// What a command printed and how it ended.
struct Report {
    text: String,
    status: u8,
}

fn list() -> hetmem::Result<Report> {
    let dir = std::fs::read_dir(SHM_DIR).map_err(|e| Error::Os {
        call: "reading /dev/shm (listing segments needs Linux's /dev/shm)",
        errno: e.raw_os_error().unwrap_or(0),
    })?;
    // Every segment is a regular file: a directory, a link, a FIFO or a device there is another
    // program's, and opening one (a device, say) to read its header may do something.
    let mut names: Vec<String> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_type().ok()?.is_file().then(|| e.file_name().into_string().ok())?
        })
        .collect();
    names.sort();
    let mut text = format!("{:<32} {:>10}  {:<8} {:<20} {}\n", "NAME", "SIZE", "KIND", "CREATOR", "ALLOCATORS");
    let mut found = 0;
    for name in names {
        let path = format!("/{name}");
        let backend = match open(&path, Duration::from_millis(100)) {
            Ok(backend) => backend,
            Err(e) => {
                // Another program's segments (bad magic, or smaller than a header) are not listed;
                // a segment that may be hetmem's but cannot be read is, with the reason.
                let size = std::fs::metadata(format!("{SHM_DIR}{path}")).map(|m| m.len()).ok();
                if let Some(reason) = unopened(&e, size) {
                    let size = size.map_or("?".to_string(), bytes);
                    let shown = printable(&path);
                    let _ = writeln!(text, "{shown:<32} {size:>10}  {reason}");
                    found += 1;
                }
                continue;
            }
        };
        let header = backend.header();
        // One segment whose directory a live process holds locked (one stopped in a debugger)
        // is listed as busy, after a short wait, rather than holding up the whole listing.
        let allocators = match directory_within(header, Duration::from_millis(200)) {
            None => vec!["(busy: a live process holds its allocator directory locked)".to_string()],
            Some(entries) => entries.iter().map(|e| format!("{} {}", e.id, type_label(e.type_id))).collect(),
        };
        let _ = writeln!(
            text,
            "{:<32} {:>10}  {:<8} {:<20} {}",
            printable(&path),
            bytes(header.total_size()),
            kind_label(backend.kind()),
            creator_label(header.creator_pid()),
            if allocators.is_empty() { "-".to_string() } else { allocators.join(", ") },
        );
        found += 1;
    }
    if found == 0 {
        text.push_str("(no hetmem segments)\n");
    }
    Ok(Report { text, status: 0 })
}

/// The ready entries of `header`'s directory, waiting up to `patience` for its lock: `None`
/// while a live process still holds it then.
fn directory_within(header: &hetmem::core::header::RegionHeader, patience: Duration) -> Option<Vec<AllocatorEntry>> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(entries) = header.try_allocators() {
            return Some(entries.collect());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Why `list` could not open a segment (of `size` bytes, if known) that may be hetmem's, or `None`
/// for one that is not.
fn unopened(e: &Error, size: Option<u64>) -> Option<String> {
    match e {
        Error::HeaderMismatch { field: "magic", .. } => None,
        // Smaller than a header: no hetmem segment is ever that size.
        Error::HeaderMismatch { field: "total_size", .. } if size.is_none_or(|size| size <= HEADER_SIZE) => None,
        // A hetmem header, ready, that does not describe the segment: resized since, or damaged.
        Error::HeaderMismatch { field: "total_size", found, .. } => {
            Some(format!("(its header says {found} bytes: resized or damaged)"))
        }
        Error::HeaderMismatch { field: "version", expected, found } => {
            Some(format!("(layout version {found}: this tool reads version {expected})"))
        }
        // The tool attaches as the application's processes do, for reading and writing: a segment
        // this user may only read is refused too.
        Error::PermissionDenied { .. } => Some("(this user may not open it for reading and writing)".into()),
        Error::TimedOut { .. } => Some("(not ready: a hetmem segment being created, or another program's)".into()),
        e => Some(format!("(cannot open: {e})")),
    }
}

fn show(name: &str, id: Option<AllocatorId>, deadline: Option<Instant>) -> hetmem::Result<Report> {
    let backend = open_until(name, deadline)?;
    let header = backend.header();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "segment {}: {} ({} bytes), kind {}, layout {}, backend id {:#x}, creator pid {}",
        printable(backend.name().unwrap_or(name)),
        bytes(header.total_size()),
        header.total_size(),
        kind_label(backend.kind()),
        header.version(),
        header.backend_id(),
        creator_label(header.creator_pid()),
    );
    let _ = writeln!(text, "not yet given to an allocator: {}", bytes(header.unreserved()));
    let entries = entries(&backend, id)?;
    if entries.is_empty() {
        text.push_str("no allocators\n");
    }
    for e in entries {
        let _ =
            write!(text, "allocator {} {}: {} at offset {:#x}: ", e.id, type_label(e.type_id), bytes(e.size), e.offset);
        match attach(&backend, &e) {
            Ok(Some(a)) => {
                let _ = writeln!(text, "{}", a.type_name());
                let _ = writeln!(text, "  {}", stats_line(&a.stats()));
            }
            Ok(None) => text.push_str("a type this build does not know\n"),
            Err(err) => {
                let _ = writeln!(text, "cannot attach: {err}");
            }
        }
    }
    Ok(Report { text, status: 0 })
}

fn check(name: &str, id: Option<AllocatorId>, deadline: Option<Instant>) -> hetmem::Result<Report> {
    let backend = open_until(name, deadline)?;
    let mut text = String::new();
    let (mut damaged, mut unknown) = (0, 0);
    let entries = entries(&backend, id)?;
    for e in &entries {
        let _ = write!(text, "allocator {} {}: ", e.id, type_label(e.type_id));
        match attach(&backend, e) {
            Ok(Some(a)) => match a.check() {
                Ok(()) => {
                    let s = a.stats();
                    let _ = writeln!(
                        text,
                        "ok ({} live allocations, {} in use)",
                        s.live_allocations,
                        bytes(s.bytes_in_use)
                    );
                }
                Err(err) => {
                    damaged += 1;
                    let _ = writeln!(text, "DAMAGED: {err}");
                }
            },
            Ok(None) => {
                unknown += 1;
                text.push_str("not checked: a type this build does not know\n");
            }
            Err(err) => {
                damaged += 1;
                let _ = writeln!(text, "DAMAGED: cannot attach: {err}");
            }
        }
    }
    let checked = entries.len() - unknown;
    let plural = if checked == 1 { "" } else { "s" };
    let _ = write!(text, "{checked} allocator{plural} checked, {damaged} damaged");
    if unknown > 0 {
        let _ = write!(text, ", {unknown} not checked (of a type this build does not know)");
    }
    text.push('\n');
    Ok(Report { text, status: u8::from(damaged > 0) })
}

fn main() -> ExitCode {
    let command = utf8_args(std::env::args_os().skip(1))
        .and_then(|args| split_timeout(&args))
        .and_then(|(timeout, rest)| Ok((timeout, parse(&rest)?)));
    let (command, timeout) = match command {
        Ok((timeout, c)) => {
            give_up_after(timeout);
            (c, timeout)
        }
        Err(message) => {
            complain(&format!("{message}\n\n{USAGE}"));
            return ExitCode::from(2);
        }
    };
    let deadline = deadline_after(timeout);
    let report = match command {
        Command::Help => Ok(Report { text: format!("{USAGE}\n"), status: 0 }),
        Command::List => {
            // `list` waits for no segment to be ready: it gives each a moment.
            set_stage(Stage::Reading);
            list().map_err(|err| err.to_string())
        }
        Command::Show { name, id } => show(&name, id, deadline).map_err(|err| failed(&name, &err, timeout)),
        Command::Check { name, id } => check(&name, id, deadline).map_err(|err| failed(&name, &err, timeout)),
    };
    // Done with the segment: from here on the timeout does not apply.
    set_stage(Stage::Reported);
    match report {
        Ok(Report { text, status }) => match write_report(&text) {
            Ok(()) => ExitCode::from(status),
            Err(err) => {
                complain(&format!("cannot write the report: {err}"));
                ExitCode::from(2)
            }
        },
        Err(message) => {
            complain(&message);
            ExitCode::from(2)
        }
    }
}

/// Why `show` or `check` of segment `name` failed: the error, and, where the segment is another
/// program's (its header not hetmem's, or smaller than one), that first, in words; one still
/// not ready at the command's `timeout` (the one wait that ends in `TimedOut`), in words.
fn failed(name: &str, err: &Error, timeout: Duration) -> String {
    let path = format!("{SHM_DIR}/{}", name.strip_prefix('/').unwrap_or(name));
    let size = std::fs::metadata(path).map(|m| m.len()).ok();
    match unopened(err, size) {
        None => format!("{} is not a hetmem segment ({err})", printable(name)),
        Some(_) if matches!(err, Error::TimedOut { .. }) => {
            format!("{}: {} ({err})", printable(name), not_ready(timeout))
        }
        Some(_) => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_command_line_is_parsed_or_refused_with_a_reason() {
        assert_eq!(parse(&args("list")), Ok(Command::List));
        assert_eq!(parse(&args("--help")), Ok(Command::Help));
        assert_eq!(parse(&args("show /demo")), Ok(Command::Show { name: "/demo".into(), id: None }));
        assert_eq!(
            parse(&args("check demo --id 3.1")),
            Ok(Command::Check { name: "demo".into(), id: Some(AllocatorId::new(3, 1)) })
        );
        assert_eq!(
            parse(&args("show --id 0.7 /x")),
            Ok(Command::Show { name: "/x".into(), id: Some(AllocatorId::new(0, 7)) })
        );
        for (line, reason) in [
            ("", "no command"),
            ("frobnicate /x", "unknown command"),
            ("reclaim /x", "unknown command"),
            ("list /x", "no arguments"),
            ("show", "needs a segment name"),
            ("show /a /b", "one segment name"),
            ("check /a --id", "needs a value"),
            ("check /a --id 1", "not MAJOR.MINOR"),
            ("check /a --id 1.x", "not MAJOR.MINOR"),
            ("check /a --id 1.0 --id 2.0", "twice"),
            ("check /a --verbose", "unknown option"),
        ] {
            let err = parse(&args(line)).unwrap_err();
            assert!(err.contains(reason), "{line:?}: {err}");
        }
    }

    #[test]
    fn the_timeout_is_taken_from_anywhere_on_the_line() {
        assert_eq!(split_timeout(&args("list")), Ok((DEFAULT_TIMEOUT, args("list"))));
        assert_eq!(split_timeout(&args("--timeout 2.5 list")), Ok((Duration::from_millis(2500), args("list"))));
        assert_eq!(
            split_timeout(&args("show /x --timeout 30 --id 1.0")),
            Ok((Duration::from_secs(30), args("show /x --id 1.0")))
        );
        for (line, reason) in [
            ("list --timeout", "needs a value"),
            ("list --timeout soon", "not a number"),
            ("list --timeout 0", "not a positive"),
            ("list --timeout -1", "not a positive"),
            ("list --timeout inf", "not a positive"),
            ("list --timeout 1 --timeout 2", "twice"),
        ] {
            let err = split_timeout(&args(line)).unwrap_err();
            assert!(err.contains(reason), "{line:?}: {err}");
        }
    }

    #[test]
    fn labels_read_as_people_write_them() {
        assert_eq!(type_label(u32::from_be_bytes(*b"STK1")), "STK1");
        assert_eq!(type_label(7), "0x00000007");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
    }
}
