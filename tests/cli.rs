//! The `hetmem` command-line tool against live segments: one this test made with an allocator of
//! each type, one a child process left behind when it died, damage, and bad input.

use std::process::{Command, Output};

use hetmem::allocators::ThreadLocalAllocator;
use hetmem::prelude::*;

fn hetmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hetmem")).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A segment with one allocator of each type, each holding live blocks.
struct Segment {
    name: String,
    mm: MemoryManager,
    shm: std::sync::Arc<PosixShmBackend>,
}

const STACK: AllocatorId = AllocatorId::new(1, 0);
const PAGES: AllocatorId = AllocatorId::new(2, 0);
const LOCAL: AllocatorId = AllocatorId::new(3, 0);
const BITMAP: AllocatorId = AllocatorId::new(4, 0);

impl Segment {
    fn new(tag: &str) -> Segment {
        let name = format!("/hetmem-cli-{tag}-{}", std::process::id());
        let mm = MemoryManager::new();
        let shm = mm.add_backend(PosixShmBackend::create(&name, 16 << 20, &ShmOptions::default()).unwrap()).unwrap();
        let b = shm.id();
        let stack = mm.create_allocator::<StackAllocator>(b, STACK, 1 << 20, &Default::default()).unwrap();
        let pages = mm.create_allocator::<ScalablePageAllocator>(b, PAGES, 4 << 20, &Default::default()).unwrap();
        let local = mm.create_allocator::<ThreadLocalAllocator>(b, LOCAL, 4 << 20, &Default::default()).unwrap();
        let bitmap = mm.create_allocator::<BitmapAllocator>(b, BITMAP, 0, &Default::default()).unwrap();
        for size in [24, 100, 3000] {
            stack.allocate(size, 8).unwrap();
            pages.allocate(size, 8).unwrap();
            local.allocate(size, 8).unwrap();
            bitmap.allocate(size, 8).unwrap();
        }
        Segment { name, mm, shm }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = self.mm.destroy_backend(self.shm.id());
    }
}

#[test]
fn show_check_and_list_a_live_segment() {
    let s = Segment::new("show");
    let out = hetmem(&["show", &s.name]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains(&format!("segment {}", s.name)) && shown.contains("kind shared"), "{shown}");
    assert!(shown.contains(&format!("creator pid {} (running)", std::process::id())), "{shown}");
    for (id, label, name) in [
        (STACK, "STK1", "stack"),
        (PAGES, "SPA1", "scalable-page"),
        (LOCAL, "TLA5", "thread-local"),
        (BITMAP, "BMP1", "bitmap"),
    ] {
        let line = shown.lines().find(|l| l.starts_with(&format!("allocator {id} {label}:"))).unwrap_or_else(|| {
            panic!("no line for {id} {label}:\n{shown}");
        });
        assert!(line.ends_with(name), "{line}");
    }
    assert_eq!(shown.matches("3 live allocations").count(), 4, "{shown}");

    let out = hetmem(&["check", &s.name]);
    let checked = text(&out);
    assert!(out.status.success(), "{checked}");
    assert!(checked.contains("4 allocators checked, 0 damaged"), "{checked}");

    let out = hetmem(&["check", s.name.trim_start_matches('/'), "--id", "3.0"]);
    let one = text(&out);
    assert!(out.status.success() && one.contains("1 allocator checked, 0 damaged"), "{one}");
    assert!(one.contains("allocator 3.0 TLA5: ok"), "{one}");

    let out = hetmem(&["list"]);
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    let line =
        listed.lines().find(|l| l.starts_with(&s.name)).unwrap_or_else(|| panic!("{} unlisted:\n{listed}", s.name));
    assert!(line.contains("shared") && line.contains("1.0 STK1, 2.0 SPA1, 3.0 TLA5, 4.0 BMP1"), "{line}");
}

#[test]
fn check_reports_damage_with_exit_status_1() {
    let s = Segment::new("damage");
    let entry = s.shm.header().find_allocator(STACK).unwrap().unwrap();
    // The stack allocator's header, overwritten as a wild write of another process would.
    // SAFETY: the first 64 bytes of the stack allocator's sub-region, in the mapped segment; no
    // thread uses the allocator meanwhile.
    unsafe { std::ptr::write_bytes(s.shm.base().add(entry.offset as usize), 0xa5, 64) };
    let out = hetmem(&["check", &s.name]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("allocator 1.0 STK1: DAMAGED"), "{report}");
    assert!(report.contains("4 allocators checked, 1 damaged"), "{report}");
    assert!(report.contains("allocator 2.0 SPA1: ok"), "{report}");
}

#[test]
fn bad_input_gets_a_reason_and_exit_status_2() {
    let missing = format!("/hetmem-cli-missing-{}", std::process::id());
    for args in [vec!["show", missing.as_str()], vec!["check", missing.as_str()]] {
        let out = hetmem(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("not found"), "{args:?}: {}", text(&out));
    }
    let s = Segment::new("badid");
    let out = hetmem(&["show", &s.name, "--id", "9.9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("unknown allocator id 9.9"), "{}", text(&out));
    for args in [vec![], vec!["frobnicate"], vec!["check"], vec!["check", "/x", "--id", "x"]] {
        let out = hetmem(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage: hetmem"), "{args:?}");
    }
    let out = hetmem(&["--help"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("usage: hetmem"));
}

/// A segment whose creator died: its pid shows as gone, and attaching recovers the dead
/// process's thread-local heap, so the segment checks whole.
#[test]
fn a_dead_creators_segment_is_shown_and_recovered() {
    if let Ok(name) = std::env::var("HETMEM_CLI_CHILD") {
        let options = ShmOptions { unlink_on_drop: false, ..ShmOptions::default() };
        let mm = MemoryManager::new();
        let shm = mm.add_backend(PosixShmBackend::create(&name, 4 << 20, &options).unwrap()).unwrap();
        let config = ThreadLocalConfig { dead_process_blocks: DeadProcessBlocks::Free };
        let a = mm.create_allocator::<ThreadLocalAllocator>(shm.id(), LOCAL, 0, &config).unwrap();
        for size in [16, 200, 5000] {
            a.allocate(size, 8).unwrap();
        }
        // Killed with its heap held and its blocks live.
        std::process::abort();
    }
    let name = format!("/hetmem-cli-dead-{}", std::process::id());
    // Before the child makes it: removed however the test ends.
    let _remove = Remove(name.clone());
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["a_dead_creators_segment_is_shown_and_recovered", "--exact", "--test-threads=1"])
        .env("HETMEM_CLI_CHILD", &name)
        .output()
        .unwrap()
        .status;
    assert!(!status.success(), "the child aborts");
    let out = hetmem(&["show", &name]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("(gone)"), "{shown}");
    assert!(shown.contains("0 live allocations"), "the dead process's blocks were freed:\n{shown}");
    let out = hetmem(&["check", &name]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Removes what is under a segment's name when dropped, whatever it is (`PosixShmBackend::remove`
/// leaves another program's segment in place).
struct Remove(String);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/dev/shm{}", self.0));
    }
}

/// A segment whose header is hetmem's but whose allocator directory another process broke:
/// entries that name another allocator's sub-region, a shifted or cut one, one outside the
/// segment, a count past the table, bytes at random. The tool reports (exit status 0, 1 or 2)
/// and never panics or crashes.
#[test]
fn a_broken_directory_is_reported_not_a_panic() {
    let s = Segment::new("directory");
    // The directory's table (see `RegionHeader`): after the header's fixed fields (128 bytes),
    // the directory lock's owner word, `next_free` and `count`; 32-byte entries (type id, state,
    // id, offset, size) in the order they were made.
    const COUNT: usize = 144;
    const ENTRIES: usize = 152;
    let header = s.shm.base();
    let word = |at: usize| -> *mut u64 {
        // SAFETY: in the header page (4096 bytes) of the mapped segment, 8-aligned.
        unsafe { header.add(at).cast::<u64>() }
    };
    let entry = |i: usize, field: usize| word(ENTRIES + 32 * i + 8 * field);
    // SAFETY: as above (`word`).
    let read = |p: *mut u64| unsafe { p.read() };
    // SAFETY: as above; no thread of this process uses the directory meanwhile.
    let write = |p: *mut u64, v: u64| unsafe { p.write(v) };
    let stack_type = u64::from(StackAllocator::TYPE_ID);
    assert_eq!(read(entry(0, 0)) & 0xffff_ffff, stack_type, "the directory is where this test looks");
    let saved: Vec<u64> = (COUNT..4096).step_by(8).map(|at| read(word(at))).collect();
    let restore = || {
        for (k, &v) in saved.iter().enumerate() {
            write(word(COUNT + 8 * k), v);
        }
    };
    let (offset, size) = (|i| read(entry(i, 2)), |i| read(entry(i, 3)));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for case in 0..24 {
        restore();
        let i = case % 4;
        match case / 4 {
            // Another allocator's sub-region, under this entry's type.
            0 => {
                let j = (i + 1) % 4;
                write(entry(i, 2), offset(j));
                write(entry(i, 3), size(j));
            }
            // Shifted into its own data.
            1 => {
                write(entry(i, 2), offset(i) + 4096);
                write(entry(i, 3), size(i) - 4096);
            }
            // Cut short.
            2 => write(entry(i, 3), size(i) / 2),
            // Outside the segment.
            3 => {
                write(entry(i, 2), u64::MAX - 4095);
                write(entry(i, 3), 8192);
            }
            // A count past the table.
            4 => write(word(COUNT), u64::from(u32::MAX)),
            // Random bytes, but for the four entries: ready, of the types made, over random
            // sub-regions inside the segment.
            _ => {
                let types: Vec<u64> = (0..4).map(|k| read(entry(k, 0)) & 0xffff_ffff).collect();
                let total = s.shm.len();
                for at in (COUNT..4096).step_by(8) {
                    write(word(at), next());
                }
                for (k, &type_id) in types.iter().enumerate() {
                    let at = 4096 * (1 + next() % (total / 4096 - 2));
                    write(entry(k, 0), type_id | 2 << 32);
                    write(entry(k, 2), at);
                    write(entry(k, 3), 1 + next() % (total - at));
                }
            }
        }
        for command in ["show", "check"] {
            let out = hetmem(&[command, &s.name]);
            let code = out.status.code();
            assert!(matches!(code, Some(0..=2)), "case {case}, {command}: {code:?}\n{}", text(&out));
            assert!(!text(&out).contains("panicked"), "case {case}, {command}:\n{}", text(&out));
        }
    }
    // An entry of a type this build does not know (a user's own allocator type, say) is not
    // checked, and not counted as checked.
    restore();
    write(entry(3, 0), u64::from(u32::from_be_bytes(*b"USR1")) | 2 << 32);
    let out = hetmem(&["check", &s.name]);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("allocator 4.0 USR1: not checked"), "{report}");
    assert!(report.contains("3 allocators checked, 0 damaged, 1 not checked"), "{report}");
    restore();
    let out = hetmem(&["check", &s.name]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A lock a live process holds for good (here the directory's, forged to name this test's
/// process) makes a command wait until its timeout, then give up with status 2 and a reason
/// (the tool used to wait for ever).
#[test]
fn a_lock_a_live_process_holds_makes_the_tool_give_up_at_its_timeout() {
    use std::os::unix::fs::FileExt;
    let s = Segment::new("held");
    let file = std::fs::OpenOptions::new().write(true).open(format!("/dev/shm{}", s.name)).unwrap();
    // The directory's mutex is at offset 128 of the header; its first word is the owner.
    let me = hetmem::core::sync::owner_token();
    file.write_at(&me.to_le_bytes(), 128).unwrap();
    let out = hetmem(&["show", &s.name, "--timeout", "1"]);
    let said = text(&out);
    file.write_at(&0u64.to_le_bytes(), 128).unwrap();
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("gave up after 1.0 s (--timeout SECS waits longer): a lock in the segment is held by a live"),
        "{said}"
    );
    // Free again: the same command succeeds.
    let out = hetmem(&["show", &s.name, "--timeout", "30"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `list` shows a segment whose directory a live process holds locked as busy, and goes on with
/// the others, where it used to wait on that one lock until its timeout and list nothing.
#[test]
fn list_shows_a_segment_a_live_process_holds_locked_as_busy() {
    use std::os::unix::fs::FileExt;
    let held = Segment::new("list-held");
    let free = Segment::new("list-free");
    let file = std::fs::OpenOptions::new().write(true).open(format!("/dev/shm{}", held.name)).unwrap();
    // The directory's mutex is at offset 128 of the header; its first word is the owner.
    file.write_at(&hetmem::core::sync::owner_token().to_le_bytes(), 128).unwrap();
    let out = hetmem(&["list", "--timeout", "10"]);
    file.write_at(&0u64.to_le_bytes(), 128).unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let row = |name: &str| said.lines().find(|l| l.starts_with(name)).map(str::to_string);
    let busy = row(&held.name).unwrap_or_else(|| panic!("no row for the held segment:\n{said}"));
    assert!(busy.contains("(busy: a live process holds its allocator directory locked)"), "{busy}");
    let other = row(&free.name).unwrap_or_else(|| panic!("no row for the free segment:\n{said}"));
    assert!(other.contains("1.0 STK1") && other.contains("4.0 BMP1"), "{other}");
}

/// The timeout is for waiting on the segment, not on the reader: a report the tool has made is
/// written whole, however long its reader (a pager) takes, where the tool used to give up in the
/// middle of it, with status 2 and a reason that blamed a lock.
#[test]
fn a_slow_reader_gets_the_whole_report_past_the_timeout() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let name = format!("/hetmem-cli-slow-reader-{}", std::process::id());
    let mm = MemoryManager::new();
    let shm = mm.add_backend(PosixShmBackend::create(&name, 4 << 20, &ShmOptions::default()).unwrap()).unwrap();
    let allocators = 40;
    for minor in 0..allocators {
        mm.create_allocator::<StackAllocator>(shm.id(), AllocatorId::new(1, minor), 16 << 10, &Default::default())
            .unwrap();
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors `pipe` writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are new and owned by nothing else.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The smallest pipe (a page), so that the report (over 8 KiB) fills it and the tool waits on
    // its reader.
    // SAFETY: an open pipe descriptor.
    assert!(unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) } >= 4096);
    let child = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["show", &name, "--timeout", "1"])
        .stdout(write_end)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let mut shown = String::new();
    std::fs::File::from(read_end).read_to_string(&mut shown).unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = mm.destroy_backend(shm.id());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {said}", out.status);
    assert!(shown.len() > 4096, "{shown}");
    assert_eq!(shown.matches("allocator 1.").count(), allocators as usize, "{shown}");
}

/// `list` names the segments that may be hetmem's but that it cannot read, with the reason (it
/// used to leave them out without a word): one not set up yet, one of another layout version.
/// Another program's (here: a segment smaller than a header) is left out.
#[test]
fn list_names_segments_it_cannot_read_and_why() {
    use std::os::unix::fs::FileExt;
    let raw = |tag: &str, len: u64| {
        let name = format!("/hetmem-cli-{tag}-{}", std::process::id());
        let file = std::fs::File::create(format!("/dev/shm{name}")).unwrap();
        file.set_len(len).unwrap();
        name
    };
    let unready = raw("unready", 3 * 4096);
    let foreign = raw("foreign", 100);
    let s = Segment::new("version");
    let file = std::fs::OpenOptions::new().write(true).open(format!("/dev/shm{}", s.name)).unwrap();
    // The layout version, a u32 after the 8-byte magic.
    let version = hetmem::core::header::LAYOUT_VERSION;
    file.write_at(&(version + 1).to_le_bytes(), 8).unwrap();
    let out = hetmem(&["list"]);
    file.write_at(&version.to_le_bytes(), 8).unwrap();
    for name in [&unready, &foreign] {
        std::fs::remove_file(format!("/dev/shm{name}")).unwrap();
    }
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    let line = |name: &str| listed.lines().find(|l| l.starts_with(name)).map(str::to_string);
    let unready = line(&unready).unwrap_or_else(|| panic!("the segment not set up is unlisted:\n{listed}"));
    assert!(
        unready.contains("12.0 KiB") && unready.contains("(not ready: a hetmem segment being created"),
        "{unready}"
    );
    let other = line(&s.name).unwrap_or_else(|| panic!("the segment of another version is unlisted:\n{listed}"));
    assert!(other.contains(&format!("(layout version {}: this tool reads version {version})", version + 1)), "{other}");
    assert_eq!(line(&foreign), None, "another program's segment is listed:\n{listed}");
}

/// An argument that is not UTF-8 (a file name in another encoding, say) is refused like any
/// other bad argument, with the usage and exit status 2, where reading the arguments panicked.
#[test]
fn an_argument_that_is_not_utf8_is_refused_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"/caf\xe9");
    for args in [vec![std::ffi::OsStr::new("show"), bad], vec![bad]] {
        let out = Command::new(env!("CARGO_BIN_EXE_hetmem")).args(&args).output().unwrap();
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains("not valid UTF-8") && said.contains("usage: hetmem"), "{args:?}: {said}");
        assert!(!said.contains("panicked"), "{args:?}: {said}");
    }
}

/// A reader that goes away before the report is written (`hetmem list | head -1`, a pager quit
/// early) ends the tool quietly with the command's own status, and a report that cannot be
/// written (a full disk) is an error with exit status 2, where printing it panicked (status 101).
#[test]
fn a_report_nobody_reads_or_that_cannot_be_written_is_no_panic() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors `pipe` writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are new and owned by nothing else.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The reader is gone before the tool writes a byte.
    drop(read_end);
    let s = Segment::new("no-reader");
    for args in [vec!["--help"], vec!["show", s.name.as_str()], vec!["check", s.name.as_str()]] {
        let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
            .args(&args)
            .stdout(write_end.try_clone().unwrap())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {said}");
        assert!(said.is_empty(), "{args:?}: {said}");
    }
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["show", &s.name])
        .stdout(full)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("hetmem: cannot write the report") && !said.contains("panicked"), "{said}");
}

/// `list` goes only through the regular files of /dev/shm, as every segment is one: a directory,
/// a symbolic link or a FIFO there is another program's and is left out (they were listed as
/// segments it could not open, and a FIFO or device was opened for reading and writing).
#[test]
fn list_leaves_out_what_is_not_a_regular_file() {
    let path = |tag: &str| format!("/dev/shm/hetmem-cli-{tag}-{}", std::process::id());
    let (dir, link, fifo) = (path("dir"), path("link"), path("fifo"));
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
    let c_fifo = std::ffi::CString::new(fifo.clone()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let s = Segment::new("regular");
    let out = hetmem(&["list"]);
    let _ = std::fs::remove_dir(&dir);
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&fifo);
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    for other in [&dir, &link, &fifo] {
        let name = other.strip_prefix("/dev/shm").unwrap();
        assert!(!listed.lines().any(|l| l.starts_with(name)), "{name} is listed:\n{listed}");
    }
    assert!(listed.lines().any(|l| l.starts_with(&s.name)), "the segment is not listed:\n{listed}");
}

/// A segment's name may hold any character but '/' and NUL, and /dev/shm is shared by all users:
/// a line break or a terminal's escape sequence in a name is shown escaped, where `list` and `show`
/// printed it as it was, so that a name could forge a line of the listing or drive the terminal.
#[test]
fn names_with_line_breaks_or_escape_sequences_are_shown_escaped() {
    let name = format!("/hetmem-cli-ctl-{}\nforged 16.0 MiB shared\x1b[2J", std::process::id());
    let shm = PosixShmBackend::create(&name, 1 << 16, &ShmOptions::default()).unwrap();
    let escaped = format!("/hetmem-cli-ctl-{}\\nforged 16.0 MiB shared\\u{{1b}}[2J", std::process::id());
    for args in [vec!["list"], vec!["show", name.as_str()]] {
        let out = hetmem(&args);
        let said = text(&out);
        assert!(out.status.success(), "{args:?}: {said}");
        assert!(!said.contains('\x1b') && !said.lines().any(|l| l.starts_with("forged")), "{args:?}: {said}");
        assert!(said.contains(&escaped), "{args:?}: {said}");
    }
    drop(shm);
}

/// A hetmem segment resized since it was made (or whose header's size was overwritten) is listed
/// with the reason it cannot be read, where `list` left it out as though it were another
/// program's: only a segment smaller than a header is that.
#[test]
fn list_names_a_resized_hetmem_segment_and_why() {
    let s = Segment::new("resized");
    let file = std::fs::OpenOptions::new().write(true).open(format!("/dev/shm{}", s.name)).unwrap();
    let made = s.shm.len();
    file.set_len(made + 8192).unwrap();
    let out = hetmem(&["list"]);
    file.set_len(made).unwrap();
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    let line = listed.lines().find(|l| l.starts_with(&s.name));
    let line = line.unwrap_or_else(|| panic!("the resized segment is unlisted:\n{listed}"));
    assert!(line.contains(&format!("(its header says {made} bytes: resized or damaged)")), "{line}");
}

/// A segment another user may read but not write (mode 0644) is one the tool cannot open, as it
/// attaches for reading and writing: `list` says so, where it said the segment was not readable.
/// Needs root, to run the tool as another user.
#[test]
fn list_says_a_segment_this_user_may_only_read_cannot_be_opened_for_writing() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root, to run the tool as another user");
        return;
    }
    let name = format!("/hetmem-cli-readonly-{}", std::process::id());
    let options = ShmOptions { mode: 0o644, ..ShmOptions::default() };
    let shm = PosixShmBackend::create(&name, 1 << 16, &options).unwrap();
    // As `nobody`, who may read the segment but not write it. The build folder may be closed to
    // other users (a checkout under a private temporary folder): the tool runs from a copy in a
    // folder open to all.
    let dir = std::env::temp_dir().join(format!("hetmem-cli-nobody-{}", std::process::id()));
    let tool = dir.join("hetmem");
    let copied = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)))
        .and_then(|()| std::fs::copy(env!("CARGO_BIN_EXE_hetmem"), &tool));
    let out = copied.and_then(|_| Command::new(&tool).arg("list").uid(65534).gid(65534).output());
    let _ = std::fs::remove_dir_all(&dir);
    drop(shm);
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: the tool cannot be run as another user here: {e}");
            return;
        }
    };
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    let line = listed.lines().find(|l| l.starts_with(&name));
    let line = line.unwrap_or_else(|| panic!("the segment is unlisted:\n{listed}"));
    assert!(line.contains("(this user may not open it for reading and writing)"), "{line}");
}

/// `show` and `check` of another program's segment (random bytes, or smaller than a header) say
/// that it is not a hetmem segment, with exit status 2, where they gave only the header field
/// that did not match.
#[test]
fn another_programs_segment_is_reported_as_not_hetmem() {
    use std::io::Write;
    let mut random = vec![0u8; 5 * 4096];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for byte in &mut random {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        *byte = rng as u8;
    }
    for (tag, bytes) in [("random", &random[..]), ("short", &random[..100])] {
        let name = format!("/hetmem-cli-{tag}-{}", std::process::id());
        let _remove = Remove(name.clone());
        std::fs::File::create(format!("/dev/shm{name}")).unwrap().write_all(bytes).unwrap();
        for command in ["show", "check"] {
            let out = hetmem(&[command, &name]);
            let said = text(&out);
            assert_eq!(out.status.code(), Some(2), "{tag}, {command}: {said}");
            assert!(said.contains(&format!("hetmem: {name} is not a hetmem segment (header mismatch")), "{said}");
        }
    }
    // A hetmem segment's errors are told as they are.
    let missing = format!("/hetmem-cli-absent-{}", std::process::id());
    let said = text(&hetmem(&["show", &missing]));
    assert!(said.contains("not found") && !said.contains("not a hetmem segment"), "{said}");
}

/// `show` and `check` wait for a segment still being created until the command's `--timeout`,
/// where they gave up after one second whatever it said: a creator that finishes within the
/// timeout is waited for, and one that never does is given up on at the timeout, not before,
/// with exit status 2 and the reason.
#[test]
fn show_and_check_wait_for_a_segment_being_created_until_the_timeout() {
    use std::os::unix::fs::FileExt;
    use std::time::Duration;
    let s = Segment::new("unready");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(format!("/dev/shm{}", s.name)).unwrap();
    // A header whose magic is still zero is one its creator has not finished writing.
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0).unwrap();
    let unready = || file.write_at(&[0; 8], 0).unwrap();
    for command in ["show", "check"] {
        unready();
        let out = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(1500));
                file.write_at(&magic, 0).unwrap();
            });
            hetmem(&[command, &s.name, "--timeout", "20"])
        });
        assert!(out.status.success(), "{command}: {}", text(&out));
    }
    unready();
    let out = hetmem(&["show", &s.name, "--timeout", "2.5"]);
    file.write_at(&magic, 0).unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("gave up after 2.5 s (--timeout SECS waits longer): the segment is not ready"), "{said}");
    // A timeout past what the clock counts is no deadline, not a panic.
    let out = hetmem(&["check", &s.name, "--timeout", "1e19"]);
    assert!(out.status.success(), "{}", text(&out));
}
