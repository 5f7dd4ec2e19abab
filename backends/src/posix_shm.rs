//! [`PosixShmBackend`]: a POSIX shared-memory segment, attachable by name from any process.

use std::ffi::CString;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use hetmem_core::header::{HEADER_SIZE, MAGIC};
use hetmem_core::{BackendId, BackendKind, Error, Result, ShortStr};

use crate::raw::{impl_backend, region_len, RawRegion};

/// The file calls with 64-bit sizes, inode numbers and block counts. On 32-bit glibc targets the
/// plain ones take a 32-bit `off_t` and fail (EOVERFLOW, EINVAL) on a segment past 2 GiB, on an
/// inode number past 32 bits (tmpfs mounted with `inode64`), or on a file system with more blocks
/// than 32 bits count, none of which a 64-bit process sharing the segment notices; on 64-bit
/// targets they are the same calls.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod lfs {
    pub(super) use libc::{
        fstat64 as fstat, fstatvfs64 as fstatvfs, ftruncate64 as ftruncate, lstat64 as lstat, off64_t as off_t,
        posix_fallocate64 as posix_fallocate, stat64 as stat, statvfs64 as statvfs,
    };
}
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod lfs {
    #[cfg(target_os = "linux")]
    pub(super) use libc::lstat;
    pub(super) use libc::{fstat, ftruncate, off_t, stat};
    #[cfg(not(target_vendor = "apple"))]
    pub(super) use libc::{fstatvfs, posix_fallocate, statvfs};
}

/// Options for creating and attaching to a [`PosixShmBackend`].
#[derive(Clone, Debug)]
pub struct ShmOptions {
    /// The backend id written in the header. `None`: derived from the name, so every process
    /// that names the segment agrees on it.
    pub id: Option<BackendId>,
    /// Permission bits for a new segment (default 0600: this user only), set as given: the
    /// process's umask does not apply.
    pub mode: u32,
    /// Whether the creator removes the name when its backend is dropped (default true). A forked
    /// child of the creator never does: its copy of the backend is not the creator's.
    pub unlink_on_drop: bool,
    /// How long `attach` waits for a creator to finish setting the segment up: its mode, its
    /// size and its header (default 5 s).
    pub attach_timeout: Duration,
    /// Whether the creator reserves the segment's memory up front (`posix_fallocate`; default
    /// false). Where the system has no `posix_fallocate` for shared memory (macOS), creation
    /// with `reserve` fails with [`Error::Unsupported`].
    ///
    /// A segment is sparse: its pages take memory in `/dev/shm` only when first touched, so a
    /// segment larger than `/dev/shm` has room for (64 MiB in a default Docker container) is
    /// created without complaint, and the process that first touches a page past what fits dies
    /// of `SIGBUS`. With `reserve`, creation fails instead, with [`Error::OutOfMemory`] (the name
    /// removed again), and once created the whole segment is there: at the cost of its whole size
    /// in memory from the start.
    pub reserve: bool,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions {
            id: None,
            mode: 0o600,
            unlink_on_drop: true,
            attach_timeout: Duration::from_secs(5),
            reserve: false,
        }
    }
}

/// A POSIX shared-memory segment (`shm_open` + `mmap(MAP_SHARED)`), mapped wherever the OS puts
/// it in each process. Offsets, not addresses, cross between processes.
#[derive(Debug)]
pub struct PosixShmBackend {
    raw: RawRegion,
    name: String,
    kind: BackendKind,
    creator: bool,
    unlink_on_drop: bool,
    /// The fork generation the backend was made in ([`hetmem_core::fork`]).
    generation: u64,
    /// The segment's device and inode: once its name is removed, another process may create a
    /// new segment under it, which is not ours to remove.
    identity: (u64, u64),
}

impl PosixShmBackend {
    /// Creates segment `name` with `size` bytes of data (rounded up to whole pages) after its
    /// header. Fails with `AlreadyExists` if the name is taken, with `OutOfMemory` if this
    /// process cannot map that much (past its address space), and, when [`ShmOptions::reserve`]
    /// asks for the memory up front, with `OutOfMemory` if `/dev/shm` cannot hold it. A creation
    /// that fails leaves no new segment behind, and leaves in place another process's segment
    /// made under the name meanwhile (after a [`remove`](Self::remove) of the one half made).
    pub fn create(name: &str, size: usize, options: &ShmOptions) -> Result<Self> {
        Self::create_kind(name, size, options, BackendKind::Shared)
    }

    /// Attaches to segment `name`, waiting for its creator to finish, and checks its header.
    /// `InvalidName` at once if what the name holds is no segment (a FIFO, say). `PermissionDenied`
    /// if this process may not open it for reading and writing; on Linux only once the segment is
    /// sized or the timeout has passed, as until it sizes it, its creator may not have given it
    /// the mode it asked for yet. `NotFound` also when the segment loses its name while this
    /// waits for its creator (Linux): its creation failed, or another process removed it.
    ///
    /// The header's size must be the segment's (`HeaderMismatch` on `total_size` if not), as the
    /// system gives it once the header is ready: a segment resized before or while this waits is
    /// refused. Nothing can stop another process that may write the segment from shrinking it
    /// (`ftruncate`) after this returns; a process that then touches a page past the new end dies
    /// of `SIGBUS`, as with any shared file mapping. Keep the segment's mode to the users trusted
    /// with it (the default, 0600, is this user only).
    pub fn attach(name: &str, options: &ShmOptions) -> Result<Self> {
        Self::attach_kind(name, options, BackendKind::Shared)
    }

    /// [`create`](Self::create) recording another kind in the header; for backends built on this
    /// one (the GPU-registered segments).
    pub fn create_kind(name: &str, size: usize, options: &ShmOptions, kind: BackendKind) -> Result<Self> {
        crate::liveness::install();
        // A forked child must not unlink the segment it did not create (see `Drop`).
        hetmem_core::fork::watch()?;
        let name = normalize_name(name)?;
        let len = region_len(size)?;
        let c_name = c_name(&name)?;
        let fd = shm_open(&c_name, &name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, options.mode)?;
        let identity = match identity(fd) {
            Ok(identity) => identity,
            Err(e) => {
                close(fd);
                // Which segment this is cannot be told (`fstat` of a descriptor just opened does
                // not fail in practice): the name is removed as it stands, almost surely still
                // ours, rather than left to a segment no one will set up.
                unlink(&c_name);
                return Err(e);
            }
        };
        #[cfg(test)]
        tests::BEFORE_CREATE_SETS_MODE.with(|hook| hook.take().map(|hook| hook(&name)));
        let mapped = fchmod(fd, options.mode, &name).and_then(|()| {
            ftruncate(fd, len)?;
            if options.reserve {
                reserve(fd, len)?;
            }
            map(fd, len)
        });
        close(fd);
        let raw = match mapped {
            Ok(raw) => raw,
            Err(e) => {
                // Another process may have removed the name meanwhile (`remove` takes a segment
                // not set up yet) and made a new segment under it, which is not ours to remove.
                #[cfg(test)]
                tests::BEFORE_FAILED_CREATE_UNLINKS.with(|hook| hook.take().map(|hook| hook(&name)));
                let _ = unlink_if_named(&c_name, &name, identity);
                return Err(e);
            }
        };
        let id = options.id.unwrap_or_else(|| id_from_name(&name));
        let generation = hetmem_core::fork::generation();
        let backend = PosixShmBackend {
            raw,
            name,
            kind,
            creator: true,
            unlink_on_drop: options.unlink_on_drop,
            generation,
            identity,
        };
        // SAFETY: a segment this call made (O_EXCL) and mapped; no reference to its header exists,
        // and other processes that opened it meanwhile only wait for the ready flag this sets.
        if let Err(e) = unsafe { backend.raw.initialize(kind, id) } {
            // Not reached (the mapping is page-aligned and two pages long at least); were it, the
            // name goes here, as Drop (which unmaps) keeps it where `unlink_on_drop` is false.
            let _ = backend.unlink_name();
            return Err(e);
        }
        Ok(backend)
    }

    /// [`attach`](Self::attach) expecting another kind in the header.
    pub fn attach_kind(name: &str, options: &ShmOptions, kind: BackendKind) -> Result<Self> {
        let started = Instant::now();
        crate::liveness::install();
        let name = normalize_name(name)?;
        let c_name = c_name(&name)?;
        let fd = open_for_attach(&c_name, &name, options.attach_timeout)?;
        let mapped = fstat(fd).and_then(|st| {
            if !is_segment(&st) {
                // A FIFO, say (any user may make one in /dev/shm): never sized, so waiting for
                // its creator to size it would only time out.
                return Err(Error::InvalidName {
                    name: ShortStr::new(&name),
                    reason: "names no shared-memory segment (not a regular file: a FIFO, say)",
                });
            }
            let identity = identity_of(&st);
            let len = wait_for_size(fd, &name, options.attach_timeout.saturating_sub(started.elapsed()))?;
            Ok((map(fd, len)?, identity))
        });
        let (raw, identity) = match mapped {
            Ok(mapped) => mapped,
            Err(e) => {
                close(fd);
                return Err(e);
            }
        };
        let generation = hetmem_core::fork::generation();
        let backend = PosixShmBackend { raw, name, kind, creator: false, unlink_on_drop: false, generation, identity };
        // The timeout covers every wait: for the creator to give the segment its mode, to size it,
        // then to initialise it.
        let remaining = options.attach_timeout.saturating_sub(started.elapsed());
        let ready = backend.raw.wait_ready_while(kind, remaining, || still_named(fd, &backend.name));
        // The header matched the size the segment had when it was mapped; another process may have
        // resized it since (while this waited for the creator, say): its size now must match too.
        let resized = ready.and_then(|()| match segment_len(fd)? {
            now if now == backend.raw.len() => Ok(()),
            now => Err(Error::HeaderMismatch { field: "total_size", expected: now, found: backend.raw.len() }),
        });
        close(fd);
        resized?;
        Ok(backend)
    }

    /// Whether the name is taken, so that [`create`](Self::create) would fail with
    /// `AlreadyExists`: `true` for any segment under it (a hetmem one or another program's, ready
    /// or not, another user's or one this process may not open), and, in Linux's /dev/shm, where
    /// any user may put one, for a FIFO, a directory or a symbolic link, which
    /// [`attach`](Self::attach) refuses (`InvalidName`). `false` if nothing has that name.
    pub fn exists(name: &str) -> Result<bool> {
        let name = normalize_name(name)?;
        match named_identity(&c_name(&name)?, &name) {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            // Another user's segment (or one made with mode 0), where only opening it tells that
            // it is there (not Linux): there, but not ours to open.
            Err(Error::PermissionDenied { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Removes segment `name` from the namespace, as `shm_unlink` does: processes that have it
    /// mapped keep their mapping, and its memory goes when the last of them unmaps it. For a
    /// segment kept with [`persist`](Self::persist), or one whose creator died before setting it
    /// up (which [`attach`](Self::attach) refuses). `NotFound` if no segment has that name.
    ///
    /// It removes a hetmem segment whoever made it, whether or not its creator still runs (that
    /// creator's drop then finds the name gone, and leaves it so), and one still empty or whose
    /// header is not written yet: the segment of a creator that died setting it up, or, as the
    /// two cannot be told apart, of one setting it up now, whose attachers then find no segment.
    /// What is surely not a hetmem segment is left in place, with the error `attach` gives:
    /// `InvalidName` for what is no segment at all (a FIFO, say), `HeaderMismatch` for another
    /// program's segment (its first bytes are not hetmem's magic, or it is smaller than a
    /// header). A segment this process may not read (mode 0 or 0200) cannot be checked: it is
    /// removed if the system lets this process remove it (in Linux's /dev/shm, its owner or
    /// root). A new segment could take the name between the check and the removal: POSIX offers
    /// no way to remove a name only if it still names a given segment.
    pub fn remove(name: &str) -> Result<()> {
        let name = normalize_name(name)?;
        let c_name = c_name(&name)?;
        match shm_open(&c_name, &name, PEEK, 0) {
            Ok(fd) => {
                let checked = check_removable(fd, &name);
                close(fd);
                checked?;
            }
            // Unreadable to us, but maybe still removable: let shm_unlink decide.
            Err(Error::PermissionDenied { .. }) => {}
            Err(e) => return Err(e),
        }
        // SAFETY: `c_name` is a valid NUL-terminated string.
        if unsafe { libc::shm_unlink(c_name.as_ptr()) } != 0 {
            return Err(os_error("shm_unlink", &name));
        }
        Ok(())
    }

    /// Keeps the segment after this (creating) process drops its backend.
    pub fn persist(&mut self) {
        self.unlink_on_drop = false;
    }

    /// Removes the name if it still names this segment. Another process may have removed it and
    /// created a new segment under it: that one is left alone (`NotFound`: ours has no name).
    fn unlink_name(&self) -> Result<()> {
        unlink_if_named(&c_name(&self.name)?, &self.name, self.identity)
    }
}

/// Removes `name` if it still names the segment of device and inode `identity`; `NotFound` if it
/// names another (a newer segment, left alone) or nothing.
fn unlink_if_named(c_name: &CString, name: &str, identity: (u64, u64)) -> Result<()> {
    match named_identity(c_name, name) {
        Ok(found) if found != identity => {
            return Err(Error::NotFound { what: "shared-memory segment", name: ShortStr::new(name) });
        }
        Ok(_) => {}
        // Unreadable to us, but maybe still removable: go on and let shm_unlink decide.
        Err(Error::PermissionDenied { .. }) => {}
        Err(e) => return Err(e),
    }
    // A new segment could take the name between the check and here; POSIX offers no way to
    // remove a name only if it still names a given segment.
    // SAFETY: `c_name` is a valid NUL-terminated string.
    if unsafe { libc::shm_unlink(c_name.as_ptr()) } != 0 {
        return Err(os_error("shm_unlink", name));
    }
    Ok(())
}

impl_backend! {
    PosixShmBackend,
    kind = |s| s.kind,
    creator = |s| s.creator,
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    },
    fn destroy(&self) -> Result<()> {
        self.unlink_name()
    }
}

impl Drop for PosixShmBackend {
    fn drop(&mut self) {
        if self.creator && self.unlink_on_drop && self.generation == hetmem_core::fork::generation() {
            let _ = self.unlink_name(); // already gone if destroy() ran: nothing to report
        }
        // SAFETY: `raw` is the mapping made in `map`, unmapped once, here.
        unsafe { libc::munmap(self.raw.base().cast(), self.raw.len() as usize) };
    }
}

/// Checks a segment name and gives it its leading '/': one '/' at the start, no other, no NUL,
/// not "." or "..", at most 255 bytes.
fn normalize_name(name: &str) -> Result<String> {
    let bad = |reason| Error::InvalidName { name: ShortStr::new(name), reason };
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty() {
        return Err(bad("empty name"));
    }
    if bare.contains('/') {
        return Err(bad("a shared-memory name may contain '/' only as its first character"));
    }
    if bare.contains('\0') {
        return Err(bad("NUL byte in name"));
    }
    if bare == "." || bare == ".." {
        // glibc would open the shared-memory directory or its parent.
        return Err(bad("'.' and '..' name directories"));
    }
    if bare.len() + 1 > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    Ok(format!("/{bare}"))
}

/// How a segment is opened only to see that it is there, or which one it is: for reading, and,
/// where /dev/shm is a file system that any user may put a FIFO in (Linux), without blocking, as
/// opening a FIFO for reading waits for a writer, for ever if none comes.
#[cfg(target_os = "linux")]
const PEEK: i32 = libc::O_RDONLY | libc::O_NONBLOCK;
#[cfg(not(target_os = "linux"))]
const PEEK: i32 = libc::O_RDONLY;

fn c_name(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::InvalidName { name: ShortStr::new(name), reason: "NUL byte in name" })
}

/// FNV-1a of the name: the same id in every process that names the segment.
fn id_from_name(name: &str) -> BackendId {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    BackendId(hash)
}

fn os_error(call: &'static str, name: &str) -> Error {
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    match errno {
        libc::EEXIST => Error::AlreadyExists { what: "shared-memory segment", name: ShortStr::new(name) },
        libc::ENOENT => Error::NotFound { what: "shared-memory segment", name: ShortStr::new(name) },
        libc::EACCES | libc::EPERM => Error::PermissionDenied { name: ShortStr::new(name) },
        libc::ENAMETOOLONG | libc::EINVAL if call == "shm_open" => {
            Error::InvalidName { name: ShortStr::new(name), reason: "refused by shm_open" }
        }
        // Any user may make a directory or a symbolic link in Linux's /dev/shm under a segment's
        // name; `shm_open` will not open either for writing (nor follow the link).
        libc::EISDIR | libc::ELOOP if call == "shm_open" => Error::InvalidName {
            name: ShortStr::new(name),
            reason: "names no shared-memory segment (a directory or a symbolic link)",
        },
        // Nor will it open a Unix socket, which any user may bind there too (ENXIO; the other
        // files it means, devices, are no segments either).
        libc::ENXIO if call == "shm_open" => {
            Error::InvalidName { name: ShortStr::new(name), reason: "names no shared-memory segment (a socket)" }
        }
        _ => Error::Os { call, errno },
    }
}

fn shm_open(c_name: &CString, name: &str, flags: i32, mode: u32) -> Result<i32> {
    // Where `shm_open` is variadic (macOS), its mode goes through C's default promotions, as an
    // `unsigned int`; elsewhere it is a `mode_t`.
    #[cfg(target_vendor = "apple")]
    let mode = mode as libc::c_uint;
    #[cfg(not(target_vendor = "apple"))]
    let mode = mode as libc::mode_t;
    // SAFETY: `c_name` is a valid NUL-terminated string; the mode is passed as the argument
    // shm_open expects with O_CREAT.
    let fd = unsafe { libc::shm_open(c_name.as_ptr(), flags, mode) };
    if fd < 0 {
        return Err(os_error("shm_open", name));
    }
    Ok(fd)
}

/// Gives the segment exactly `mode`: `shm_open` takes the process's umask off the mode it is
/// given, so a segment meant for a group (0660) would come out 0640 under the usual umask.
/// Asked only when the bits differ, for systems whose shared-memory objects refuse `fchmod`.
fn fchmod(fd: i32, mode: u32, name: &str) -> Result<()> {
    if fstat(fd)?.st_mode as u32 & 0o7777 == mode & 0o7777 {
        return Ok(());
    }
    // SAFETY: `fd` is an open descriptor we own.
    if unsafe { libc::fchmod(fd, mode as libc::mode_t) } != 0 {
        return Err(os_error("fchmod", name));
    }
    Ok(())
}

fn ftruncate(fd: i32, len: u64) -> Result<()> {
    // SAFETY: `fd` is an open descriptor we own.
    if unsafe { lfs::ftruncate(fd, len as lfs::off_t) } != 0 {
        return Err(os_error("ftruncate", ""));
    }
    Ok(())
}

/// Gives the segment's `len` bytes their memory now (see [`ShmOptions::reserve`]).
#[cfg(not(target_vendor = "apple"))]
fn reserve(fd: i32, len: u64) -> Result<()> {
    let Ok(len_off) = lfs::off_t::try_from(len) else {
        return Err(Error::OutOfMemory { requested: len, available: free_bytes(fd) });
    };
    // Older kernels let any signal interrupt a reservation on tmpfs (EINTR, the pages taken so
    // far given back): tried again a few times, not for ever, for a process that signals itself
    // often (a profiler's timer, say).
    let mut rc = libc::EINTR;
    for _ in 0..8 {
        // SAFETY: `fd` is an open descriptor we own; the range is the segment's.
        rc = unsafe { lfs::posix_fallocate(fd, 0, len_off) };
        if rc != libc::EINTR {
            break;
        }
    }
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(Error::OutOfMemory { requested: len, available: free_bytes(fd) }),
        errno => Err(Error::Os { call: "posix_fallocate", errno }),
    }
}

/// macOS has no `posix_fallocate`, and its shared-memory objects take no other way of giving
/// their pages memory ahead of use (`fcntl(F_PREALLOCATE)` serves files on disk only).
#[cfg(target_vendor = "apple")]
fn reserve(_fd: i32, _len: u64) -> Result<()> {
    Err(Error::Unsupported("ShmOptions::reserve: this system cannot reserve shared memory up front"))
}

/// The bytes free in the file system holding `fd` (0 if it cannot say), for an error report.
#[cfg(not(target_vendor = "apple"))]
fn free_bytes(fd: i32) -> u64 {
    // SAFETY: an all-zero `statvfs` is a valid value to be overwritten.
    let mut st: lfs::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is a valid out-pointer.
    if unsafe { lfs::fstatvfs(fd, &mut st) } != 0 {
        return 0;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
}

fn fstat(fd: i32) -> Result<lfs::stat> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten by fstat.
    let mut st: lfs::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is a valid out-pointer.
    if unsafe { lfs::fstat(fd, &mut st) } != 0 {
        return Err(os_error("fstat", ""));
    }
    Ok(st)
}

fn segment_len(fd: i32) -> Result<u64> {
    Ok(fstat(fd)?.st_size as u64)
}

/// The device and inode of the segment open as `fd`.
fn identity(fd: i32) -> Result<(u64, u64)> {
    Ok(identity_of(&fstat(fd)?))
}

/// The device and inode `st` gives (their types differ between systems: the casts are no-ops
/// on some, not on others).
#[allow(clippy::unnecessary_cast)]
fn identity_of(st: &lfs::stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// Whether `st` is a shared-memory segment's. On Linux a segment is a regular file in /dev/shm,
/// where any user may put a FIFO or another special file under a segment's name; elsewhere the
/// names hold nothing but segments, whose file type the system reports its own way.
#[cfg(target_os = "linux")]
fn is_segment(st: &lfs::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}
#[cfg(not(target_os = "linux"))]
fn is_segment(_st: &lfs::stat) -> bool {
    true
}

/// Opens segment `name` read-write, for `attach`. Its creator gives it the mode asked for
/// (`fchmod`) only after `shm_open` made it with the umask's bits taken off, and before it sizes
/// it: a refusal while the segment is not sized yet may be that moment's, and is waited out, up
/// to `timeout`. Only on Linux, where the segment's size is seen without opening it.
fn open_for_attach(c_name: &CString, name: &str, timeout: Duration) -> Result<i32> {
    let started = Instant::now();
    loop {
        match shm_open(c_name, name, libc::O_RDWR, 0) {
            Err(Error::PermissionDenied { .. }) if started.elapsed() < timeout && not_sized_yet(name) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            opened => return opened,
        }
    }
}

/// Whether `name` names a segment whose creator has not sized it yet (its mode may not be the
/// one asked for yet).
#[cfg(target_os = "linux")]
fn not_sized_yet(name: &str) -> bool {
    named_stat(name).is_ok_and(|st| is_segment(&st) && st.st_size == 0)
}
#[cfg(not(target_os = "linux"))]
fn not_sized_yet(_name: &str) -> bool {
    false
}

/// What `lstat` says of `name`'s entry in /dev/shm (the one `shm_unlink` removes), which needs
/// no permission on the segment.
#[cfg(target_os = "linux")]
fn named_stat(name: &str) -> Result<lfs::stat> {
    let path = c_name(&format!("/dev/shm{name}"))?;
    // SAFETY: an all-zero `stat` is a valid value to be overwritten by lstat.
    let mut st: lfs::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a valid out-pointer.
    if unsafe { lfs::lstat(path.as_ptr(), &mut st) } != 0 {
        return Err(os_error("lstat", name));
    }
    Ok(st)
}

/// The device and inode of what `name` names now. On Linux from its entry in /dev/shm
/// ([`named_stat`]): a segment this process may not open for reading (mode 0 or 0200) is still
/// told from another. Elsewhere by opening it for reading, which such a segment refuses
/// (`PermissionDenied`).
#[cfg(target_os = "linux")]
fn named_identity(_c_name: &CString, name: &str) -> Result<(u64, u64)> {
    Ok(identity_of(&named_stat(name)?))
}
#[cfg(not(target_os = "linux"))]
fn named_identity(c_name: &CString, name: &str) -> Result<(u64, u64)> {
    let fd = shm_open(c_name, name, PEEK, 0)?;
    let found = identity(fd);
    close(fd);
    found
}

/// What [`PosixShmBackend::remove`] refuses to remove: what `fd` (open for reading) names is no
/// segment, or another program's segment, not a hetmem one.
fn check_removable(fd: i32, name: &str) -> Result<()> {
    let st = fstat(fd)?;
    if !is_segment(&st) {
        return Err(Error::InvalidName {
            name: ShortStr::new(name),
            reason: "names no shared-memory segment (not a regular file: a FIFO, say)",
        });
    }
    let len = st.st_size as u64;
    if len == 0 {
        // Not sized yet: a hetmem creator's that died before sizing it, or one sizing it now.
        return Ok(());
    }
    if len <= HEADER_SIZE {
        // A creator sizes its segment once, from 0 to more than a header.
        return Err(Error::HeaderMismatch { field: "total_size", expected: HEADER_SIZE + 1, found: len });
    }
    match read_magic(fd)? {
        // Zero: the header not written yet (a creator that died setting it up, or one at work).
        0 | MAGIC => Ok(()),
        found => Err(Error::HeaderMismatch { field: "magic", expected: MAGIC, found }),
    }
}

/// The first eight bytes of the segment open (for reading) as `fd`, at least a page long. A
/// creator may be storing its magic meanwhile: bytes read halfway through that store are neither
/// 0 nor the magic, which the caller takes for another program's segment (and leaves in place).
///
/// Linux reads them with `pread`, so a segment truncated since the caller measured it reads short
/// (`HeaderMismatch` on its size) rather than faulting.
#[cfg(target_os = "linux")]
fn read_magic(fd: i32) -> Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: reading at most `bytes.len()` bytes into `bytes`, from a descriptor we hold open.
    let read = unsafe { libc::pread(fd, bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    match read {
        8 => Ok(u64::from_ne_bytes(bytes)),
        n if n < 0 => Err(os_error("pread", "")),
        n => Err(Error::HeaderMismatch { field: "total_size", expected: HEADER_SIZE + 1, found: n as u64 }),
    }
}

/// The first eight bytes of the segment open (for reading) as `fd`, at least a page long: through
/// a read-only mapping, as some systems (macOS) do not `read` shared memory. A creator may be
/// storing its magic meanwhile: bytes read halfway through that store are neither 0 nor the
/// magic, which the caller takes for another program's segment (and leaves in place). A segment
/// truncated by another process between the caller's measure and this read faults (SIGBUS), as
/// any access to a shrunk segment does.
#[cfg(not(target_os = "linux"))]
fn read_magic(fd: i32) -> Result<u64> {
    use std::sync::atomic::{AtomicU32, Ordering};
    let len = HEADER_SIZE as usize;
    // SAFETY: mapping a descriptor we hold open, for reading; the kernel chooses the address.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(os_error("mmap", ""));
    }
    let words = ptr.cast::<AtomicU32>();
    // SAFETY: the mapping is a page long (the segment is longer than one) and page-aligned. The
    // words are read as atomics, since a creator may be writing them; as two register-wide loads,
    // since a wider atomic load may be a compare-and-swap (32-bit x86), which faults on a
    // read-only page.
    let (low, high) = unsafe { ((*words).load(Ordering::Acquire), (*words.add(1)).load(Ordering::Acquire)) };
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(ptr, len) };
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&low.to_ne_bytes());
    bytes[4..].copy_from_slice(&high.to_ne_bytes());
    Ok(u64::from_ne_bytes(bytes))
}

/// Waits until the segment is at least a header long (its creator may not have sized it yet).
fn wait_for_size(fd: i32, name: &str, timeout: Duration) -> Result<u64> {
    let started = Instant::now();
    loop {
        let len = segment_len(fd)?;
        if len > HEADER_SIZE {
            return Ok(len);
        }
        if len > 0 {
            // A creator sizes its segment once, from 0 to more than the header: this size is no
            // creator's, and waiting would not change it.
            return Err(Error::HeaderMismatch { field: "total_size", expected: HEADER_SIZE + 1, found: len });
        }
        if started.elapsed() >= timeout {
            return Err(Error::TimedOut {
                what: "the segment's creator to size it (still empty: its creator died, or it is not hetmem's)",
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        still_named(fd, name)?;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `NotFound` once the segment open as `fd`, not set up yet, has no name any more (Linux: no
/// link left): its creator failed and removed it again, or another process removed it (as
/// [`PosixShmBackend::remove`] does one not set up yet). Attachers from then on find no segment,
/// and one that is waiting for the creator is told so at once.
fn still_named(fd: i32, name: &str) -> Result<()> {
    #[cfg(target_os = "linux")]
    if fstat(fd)?.st_nlink == 0 {
        return Err(Error::NotFound { what: "shared-memory segment", name: ShortStr::new(name) });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (fd, name);
    Ok(())
}

fn map(fd: i32, len: u64) -> Result<RawRegion> {
    // A segment another (64-bit) process sized may be larger than this process can map whole.
    let size = usize::try_from(len)
        .ok()
        .filter(|&size| size <= isize::MAX as usize)
        .ok_or(Error::InvalidSize { size: len, reason: "segment larger than this process's address space" })?;
    // SAFETY: mapping a shared-memory descriptor we hold open; the kernel chooses the address.
    let ptr =
        unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if ptr == libc::MAP_FAILED {
        // No memory for the mapping, or no room for it in the address space: out of memory, as
        // the other backends report it, not a failed call to make sense of.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM) {
            return Err(Error::OutOfMemory { requested: len, available: 0 });
        }
        return Err(os_error("mmap", ""));
    }
    let base = NonNull::new(ptr.cast::<u8>()).ok_or(Error::Os { call: "mmap", errno: 0 })?;
    // SAFETY: a fresh `len`-byte page-aligned mapping, unmapped only by PosixShmBackend's Drop.
    Ok(unsafe { RawRegion::new(base, len) })
}

fn close(fd: i32) {
    // SAFETY: `fd` is open and closed once; the mapping stays valid after close.
    unsafe { libc::close(fd) };
}

fn unlink(c_name: &CString) {
    // SAFETY: valid NUL-terminated name.
    unsafe { libc::shm_unlink(c_name.as_ptr()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetmem_core::header::LAYOUT_VERSION;
    use hetmem_core::MemoryBackend;

    thread_local! {
        /// Run by a failed `create` on this thread just before it removes its name again: where
        /// another process may act.
        pub(super) static BEFORE_FAILED_CREATE_UNLINKS: std::cell::Cell<Option<fn(&str)>> =
            const { std::cell::Cell::new(None) };
        /// Run by `create` on this thread once it has made its segment, before it gives the
        /// segment the mode asked for: where another process may attach.
        pub(super) static BEFORE_CREATE_SETS_MODE: std::cell::Cell<Option<fn(&str)>> =
            const { std::cell::Cell::new(None) };
    }

    /// A creation that failed after making its segment removed the name without asking which
    /// segment it named: another process may have removed the half-made segment meanwhile
    /// (`remove` takes one not set up yet) and created its own, which the failed creation took
    /// away. It now removes the name only if it still names its own segment.
    #[cfg(target_os = "linux")]
    #[cfg(target_pointer_width = "64")] // fails its create by a size no 32-bit create accepts
    #[test]
    fn a_failed_create_leaves_a_newer_segment_under_its_name() {
        let name = unique("failed-create");
        struct Remove(String);
        impl Drop for Remove {
            fn drop(&mut self) {
                BEFORE_FAILED_CREATE_UNLINKS.with(|hook| hook.set(None));
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _remove = Remove(format!("/dev/shm{name}"));
        // Another process, in between: removes the half-made segment and makes its own.
        BEFORE_FAILED_CREATE_UNLINKS.with(|hook| {
            hook.set(Some(|name| {
                PosixShmBackend::remove(name).unwrap();
                let keep = ShmOptions { unlink_on_drop: false, ..quick() };
                drop(PosixShmBackend::create(name, 4096, &keep).unwrap());
            }))
        });
        // 2^60 bytes: sized, but no process can map it (see the test of that).
        let failed = PosixShmBackend::create(&name, 1 << 60, &quick());
        BEFORE_FAILED_CREATE_UNLINKS.with(|hook| hook.set(None));
        assert!(matches!(failed, Err(Error::OutOfMemory { .. })), "{failed:?}");
        let newer = PosixShmBackend::attach(&name, &quick());
        assert!(newer.is_ok(), "the failed creation removed the newer segment: {newer:?}");
        PosixShmBackend::remove(&name).unwrap();
    }

    /// Removes whatever is left at a path in /dev/shm (a file of any kind, or an empty
    /// directory) however the test ends.
    #[cfg(target_os = "linux")]
    struct RemoveOnDrop(String);

    #[cfg(target_os = "linux")]
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn unique(tag: &str) -> String {
        format!("/hetmem-test-{tag}-{}", std::process::id())
    }

    fn quick() -> ShmOptions {
        ShmOptions { attach_timeout: Duration::from_millis(50), ..Default::default() }
    }

    /// The size of `/dev/shm`, used and free.
    #[cfg(all(target_pointer_width = "64", not(target_vendor = "apple")))] // as the tests that use it
    fn shm_size() -> u64 {
        let dir = std::ffi::CString::new("/dev/shm").unwrap();
        // SAFETY: an all-zero `statvfs` is a valid value to be overwritten.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid path and out-pointer.
        assert_eq!(unsafe { libc::statvfs(dir.as_ptr(), &mut st) }, 0);
        st.f_blocks as u64 * st.f_frsize as u64
    }

    #[cfg(target_vendor = "apple")]
    #[test]
    fn reserve_is_refused_where_the_system_cannot_reserve_shared_memory() {
        let name = unique("reserve");
        let reserve = ShmOptions { reserve: true, ..Default::default() };
        assert!(matches!(PosixShmBackend::create(&name, 1 << 20, &reserve), Err(Error::Unsupported(_))));
        // The name went with the failed creation: a plain create takes it.
        drop(PosixShmBackend::create(&name, 1 << 20, &quick()).unwrap());
    }

    #[cfg(not(target_vendor = "apple"))]
    #[cfg(target_pointer_width = "64")] // 32-bit: no size accepted is larger than /dev/shm
    #[test]
    fn a_reserved_segment_has_its_memory_and_one_too_large_is_refused_not_left_to_sigbus() {
        let name = unique("reserve");
        let reserve = ShmOptions { reserve: true, ..Default::default() };
        let a = PosixShmBackend::create(&name, 1 << 20, &reserve).unwrap();
        let file = std::fs::metadata(format!("/dev/shm{name}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(file.blocks() * 512 >= a.len(), "{} bytes held of {}", file.blocks() * 512, a.len());
        a.destroy().unwrap();
        // More than /dev/shm holds: sparse, it is created (and a process touching its pages would
        // die of SIGBUS past what fits); reserved, it is refused, and its name removed. Larger
        // than the whole file system, not only its free space, so that the kernel refuses the
        // reservation before it takes any memory (tmpfs takes pages up to what is free first).
        let too_large = (shm_size() + (1 << 30)) as usize;
        match PosixShmBackend::create(&name, too_large, &reserve) {
            Err(Error::OutOfMemory { requested, available }) => {
                assert!(requested >= too_large as u64 && available < requested, "{requested} {available}");
            }
            other => panic!("a segment /dev/shm cannot hold was not refused: {other:?}"),
        }
        assert!(!PosixShmBackend::exists(&name).unwrap(), "the refused segment's name was left");
        let sparse = PosixShmBackend::create(&name, too_large, &ShmOptions::default()).unwrap();
        sparse.destroy().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[cfg(target_pointer_width = "64")] // 32-bit: every size accepted can be mapped
    #[test]
    fn a_segment_past_the_address_space_is_out_of_memory_and_its_name_removed() {
        let name = unique("huge");
        // 2^60 bytes: tmpfs sizes a sparse file that large, but no 64-bit process can map it.
        let r = PosixShmBackend::create(&name, 1 << 60, &quick());
        assert!(matches!(r, Err(Error::OutOfMemory { requested, .. }) if requested > 1 << 60), "{r:?}");
        assert!(!PosixShmBackend::exists(&name).unwrap(), "the refused segment's name was left");
    }

    /// Runs `f` on a thread; if it has not returned within two seconds (blocked opening the FIFO
    /// at `fifo` for reading), opens the FIFO for writing so that it returns, and fails.
    #[cfg(target_os = "linux")]
    fn returns_at_once<T: Send + 'static>(fifo: &str, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || tx.send(f()).unwrap());
        let r = rx.recv_timeout(Duration::from_secs(2));
        if r.is_err() {
            // Frees the blocked open: a writer arrives.
            let _writer = std::fs::OpenOptions::new().write(true).open(fifo);
            worker.join().unwrap();
            panic!("{what} waited on the FIFO for a writer");
        }
        worker.join().unwrap();
        r.unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_fifo_under_the_name_does_not_block_exists_or_the_creators_drop() {
        let name = unique("fifo");
        let fifo = format!("/dev/shm{name}");
        let mkfifo = || {
            let c = CString::new(fifo.clone()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        };
        let _remove = RemoveOnDrop(fifo.clone());
        // Any user may make a FIFO in /dev/shm, under the name an application is about to use.
        mkfifo();
        let n = name.clone();
        let there = returns_at_once(&fifo, "exists()", move || PosixShmBackend::exists(&n));
        assert!(matches!(there, Ok(true)), "{there:?}");
        std::fs::remove_file(&fifo).unwrap();
        // Or under the name of a segment its creator destroyed and has not dropped yet.
        let a = PosixShmBackend::create(&name, 4096, &quick()).unwrap();
        a.destroy().unwrap();
        mkfifo();
        returns_at_once(&fifo, "the creator's drop", move || drop(a));
        assert!(std::fs::metadata(&fifo).is_ok(), "the creator's drop removed what was not its segment");
        std::fs::remove_file(&fifo).unwrap();
    }

    /// `attach` on a FIFO under the name (opened read-write, it does not block) refuses it at
    /// once: it is no segment, and waiting for it to be sized would only time out.
    #[cfg(target_os = "linux")]
    #[test]
    fn attach_refuses_a_fifo_under_the_name_at_once() {
        let name = unique("fifo-attach");
        let fifo = format!("/dev/shm{name}");
        let c = CString::new(fifo.clone()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        let started = Instant::now();
        let options = ShmOptions { attach_timeout: Duration::from_secs(3), ..Default::default() };
        let r = PosixShmBackend::attach(&name, &options);
        let waited = started.elapsed();
        let left = std::fs::metadata(&fifo).is_ok();
        std::fs::remove_file(&fifo).unwrap();
        assert!(matches!(r, Err(Error::InvalidName { .. })), "{r:?}");
        assert!(waited < Duration::from_secs(1), "attach waited {waited:?} on a FIFO");
        assert!(left, "attach removed the FIFO");
    }

    /// A directory or a symbolic link under the name (any user may make one in /dev/shm) is
    /// refused by `attach` as no segment, as a FIFO is, where it was a failed `shm_open` call;
    /// `remove` leaves it in place, as it does a FIFO.
    #[cfg(target_os = "linux")]
    #[test]
    fn attach_refuses_a_directory_or_a_link_under_the_name_as_no_segment() {
        let name = unique("dir-attach");
        let path = format!("/dev/shm{name}");
        std::fs::create_dir(&path).unwrap();
        let r = PosixShmBackend::attach(&name, &quick());
        let removed = PosixShmBackend::remove(&name);
        let _ = std::fs::remove_dir(&path);
        assert!(matches!(r, Err(Error::InvalidName { .. })), "a directory: {r:?}");
        assert!(matches!(removed, Err(Error::InvalidName { .. })), "a directory: {removed:?}");
        std::os::unix::fs::symlink("/dev/null", &path).unwrap();
        let r = PosixShmBackend::attach(&name, &quick());
        let removed = PosixShmBackend::remove(&name);
        let left = std::fs::symlink_metadata(&path).is_ok();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(r, Err(Error::InvalidName { .. })), "a symbolic link: {r:?}");
        assert!(matches!(removed, Err(Error::InvalidName { .. })) && left, "a symbolic link: {removed:?}");
    }

    /// An attacher waiting for a creator whose creation then failed, and which removed its
    /// segment again, waited its whole timeout for a header no one would write, and was told
    /// the creator had not finished (`TimedOut`). It now learns at once that the segment has no
    /// name any more (`NotFound`), as an attacher that came a moment later does.
    #[cfg(target_os = "linux")]
    #[cfg(target_pointer_width = "64")] // 32-bit: no size accepted is larger than /dev/shm
    #[test]
    fn an_attacher_waiting_for_a_failed_creation_learns_at_once_that_the_segment_is_gone() {
        let name = unique("attach-failed-create");
        let _remove = RemoveOnDrop(format!("/dev/shm{name}"));
        type Attached = std::thread::JoinHandle<(Result<()>, Duration)>;
        static ATTACHER: std::sync::Mutex<Option<Attached>> = std::sync::Mutex::new(None);
        // Another process attaches to the sized segment while its creator fails to reserve it.
        BEFORE_FAILED_CREATE_UNLINKS.with(|hook| {
            hook.set(Some(|name| {
                let name = name.to_string();
                let attacher = std::thread::spawn(move || {
                    let started = Instant::now();
                    let options = ShmOptions { attach_timeout: Duration::from_secs(10), ..Default::default() };
                    (PosixShmBackend::attach(&name, &options).map(drop), started.elapsed())
                });
                std::thread::sleep(Duration::from_millis(100));
                *ATTACHER.lock().unwrap() = Some(attacher);
            }))
        });
        // Larger than /dev/shm: sized, then refused by the reservation.
        let too_large = (shm_size() + (1 << 30)) as usize;
        let created = PosixShmBackend::create(&name, too_large, &ShmOptions { reserve: true, ..quick() });
        BEFORE_FAILED_CREATE_UNLINKS.with(|hook| hook.set(None));
        let (attached, waited) = ATTACHER.lock().unwrap().take().expect("the hook ran").join().unwrap();
        assert!(matches!(created, Err(Error::OutOfMemory { .. })), "{created:?}");
        // `NotFound` is the early answer: one that waited out its timeout is `TimedOut` (the time
        // taken is only for the message).
        assert!(matches!(attached, Err(Error::NotFound { .. })), "{attached:?} after {waited:?}");
    }

    /// An attacher that came between its creator's `shm_open`, which takes the umask's bits off
    /// the mode, and its `fchmod`, which gives the segment the mode asked for, was refused
    /// (`PermissionDenied`) a segment it could open a moment later, where `attach` waits for a
    /// creator to finish. It now waits while the segment is not sized yet: the creator sets the
    /// mode first.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_attacher_that_comes_before_the_mode_is_set_waits_for_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root, to attach as another user");
            return;
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status.lines().find_map(|l| l.strip_prefix("Umask:")).map(|m| m.trim().to_string());
        if umask.and_then(|m| u32::from_str_radix(&m, 8).ok()).is_none_or(|m| m & 0o002 == 0) {
            eprintln!("skipped: the umask leaves others write access, so shm_open gives the mode asked for");
            return;
        }
        let name = unique("mode-race");
        let _remove = RemoveOnDrop(format!("/dev/shm{name}"));
        type Attached = std::thread::JoinHandle<Result<()>>;
        static ATTACHER: std::sync::Mutex<Option<Attached>> = std::sync::Mutex::new(None);
        // Another user's process attaches while the segment still has the umask's mode.
        BEFORE_CREATE_SETS_MODE.with(|hook| {
            hook.set(Some(|name| {
                let name = name.to_string();
                let attacher = std::thread::spawn(move || {
                    // SAFETY: changes only this thread's file-system user id (root may).
                    unsafe { libc::setfsuid(65534) };
                    let options = ShmOptions { attach_timeout: Duration::from_secs(5), ..Default::default() };
                    PosixShmBackend::attach(&name, &options).map(drop)
                });
                std::thread::sleep(Duration::from_millis(100));
                *ATTACHER.lock().unwrap() = Some(attacher);
            }))
        });
        let created = PosixShmBackend::create(&name, 4096, &ShmOptions { mode: 0o666, ..quick() });
        BEFORE_CREATE_SETS_MODE.with(|hook| hook.set(None));
        let attached = ATTACHER.lock().unwrap().take().expect("the hook ran").join().unwrap();
        assert!(created.is_ok(), "{created:?}");
        assert!(attached.is_ok(), "{attached:?}");
    }

    /// A Unix socket under the name (any user may bind one in /dev/shm) is no segment either:
    /// `attach` and `remove` gave an `Os` error (`shm_open` cannot open a socket: ENXIO) where
    /// they refuse a FIFO, a directory or a link as `InvalidName`; now they refuse it so too, and
    /// `remove` leaves it in place.
    #[cfg(target_os = "linux")]
    #[test]
    fn attach_and_remove_refuse_a_socket_under_the_name_as_no_segment() {
        let name = unique("socket");
        let path = format!("/dev/shm{name}");
        let _remove = RemoveOnDrop(path.clone());
        let _socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let attached = PosixShmBackend::attach(&name, &quick());
        let removed = PosixShmBackend::remove(&name);
        assert!(matches!(attached, Err(Error::InvalidName { .. })), "{attached:?}");
        assert!(matches!(removed, Err(Error::InvalidName { .. })), "{removed:?}");
        assert!(std::fs::symlink_metadata(&path).is_ok(), "remove took the socket away");
        assert!(matches!(PosixShmBackend::exists(&name), Ok(true)));
        let created = PosixShmBackend::create(&name, 4096, &quick());
        assert!(matches!(created, Err(Error::AlreadyExists { .. })), "{created:?}");
    }

    /// `exists` said a FIFO or a directory under the name was there (as `create` finds it), but
    /// failed on a symbolic link (`InvalidName`, as `shm_open` will not follow it): each takes
    /// the name, and `exists` now says so, as `create`'s `AlreadyExists` does.
    #[cfg(target_os = "linux")]
    #[test]
    fn exists_says_whether_the_name_is_taken_whatever_takes_it() {
        let name = unique("exists-taken");
        let path = format!("/dev/shm{name}");
        let _remove = RemoveOnDrop(path.clone());
        let taken = |what: &str| {
            let there = PosixShmBackend::exists(&name);
            let created = PosixShmBackend::create(&name, 4096, &quick());
            assert!(matches!(there, Ok(true)), "{what}: {there:?}");
            assert!(matches!(created, Err(Error::AlreadyExists { .. })), "{what}: {created:?}");
        };
        std::os::unix::fs::symlink("/dev/null", &path).unwrap();
        taken("a symbolic link");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/shm/hetmem-test-no-such-target", &path).unwrap();
        taken("a dangling symbolic link");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        taken("a directory");
        std::fs::remove_dir(&path).unwrap();
        assert!(matches!(PosixShmBackend::exists(&name), Ok(false)));
    }

    /// A creator that may not read its own segment (mode 0200) still tells it from a newer
    /// segment under the same name, and leaves that one alone when it drops.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_unreadable_creator_leaves_a_newer_segment_under_its_name() {
        let name = unique("unreadable");
        let _remove = RemoveOnDrop(format!("/dev/shm{name}"));
        // On a thread of its own whose file-system user is not root (whose permission checks
        // would let it read the segments): the change is the thread's alone, and goes with it.
        std::thread::spawn(move || {
            // SAFETY: changes only this thread's file-system user id; fails harmlessly when not root.
            unsafe { libc::setfsuid(65534) };
            let options = ShmOptions { mode: 0o200, ..quick() };
            let a = PosixShmBackend::create(&name, 4096, &options).unwrap();
            let path = format!("/dev/shm{name}");
            assert!(std::fs::File::open(&path).is_err(), "the test's segment is readable: it tests nothing");
            PosixShmBackend::remove(&name).unwrap();
            let b = PosixShmBackend::create(&name, 4096, &options).unwrap();
            drop(a);
            assert!(std::fs::symlink_metadata(&path).is_ok(), "the old creator's drop removed the new segment");
            drop(b);
            assert!(std::fs::symlink_metadata(&path).is_err(), "the new segment's drop left its name");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn create_attach_destroy() {
        let name = unique("cad");
        let a = PosixShmBackend::create(&name, 1 << 16, &ShmOptions::default()).unwrap();
        assert!(PosixShmBackend::exists(&name).unwrap());
        let b = PosixShmBackend::attach(&name, &ShmOptions::default()).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.len(), b.len());
        assert!(a.is_creator() && !b.is_creator());
        // SAFETY: both map the same segment; byte 5000 is in the data area.
        unsafe { a.base().add(5000).write(42) };
        assert_eq!(unsafe { b.base().add(5000).read() }, 42);
        a.destroy().unwrap();
        assert!(!PosixShmBackend::exists(&name).unwrap());
        assert!(matches!(PosixShmBackend::attach(&name, &quick()), Err(Error::NotFound { .. })));
    }

    #[test]
    fn a_forked_child_of_the_creator_leaves_the_name_in_place() {
        let name = unique("fork");
        let a = PosixShmBackend::create(&name, 4096, &ShmOptions::default()).unwrap();
        // SAFETY: fork(2); the child only drops its copy of the backend and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            drop(a);
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(PosixShmBackend::exists(&name).unwrap(), "the child's drop removed the creator's segment");
        drop(a);
        assert!(!PosixShmBackend::exists(&name).unwrap());
    }

    #[test]
    fn new_segments_are_private_to_this_user() {
        let name = unique("mode");
        let _a = PosixShmBackend::create(&name, 4096, &ShmOptions::default()).unwrap();
        let meta = std::fs::metadata(format!("/dev/shm{name}")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn bad_names_are_refused() {
        for (name, why) in [("/a/b", "a second '/'"), ("", "empty"), ("/", "empty"), ("a\0b", "NUL")] {
            assert!(matches!(PosixShmBackend::create(name, 4096, &quick()), Err(Error::InvalidName { .. })), "{why}");
        }
        for name in ["/.", "..", "/.."] {
            assert!(
                matches!(PosixShmBackend::exists(name), Err(Error::InvalidName { .. })),
                "{name} names a directory"
            );
            assert!(matches!(PosixShmBackend::create(name, 4096, &quick()), Err(Error::InvalidName { .. })), "{name}");
        }
        let long = "x".repeat(300);
        assert!(matches!(PosixShmBackend::attach(&long, &quick()), Err(Error::InvalidName { .. })));
        assert_eq!(normalize_name("plain").unwrap(), "/plain");
    }

    #[test]
    fn zero_size_existing_and_missing_names_are_errors() {
        let name = unique("exists");
        assert!(matches!(PosixShmBackend::create(&name, 0, &quick()), Err(Error::InvalidSize { size: 0, .. })));
        let _a = PosixShmBackend::create(&name, 4096, &quick()).unwrap();
        assert!(matches!(PosixShmBackend::create(&name, 4096, &quick()), Err(Error::AlreadyExists { .. })));
        assert!(matches!(PosixShmBackend::attach(&unique("missing"), &quick()), Err(Error::NotFound { .. })));
    }

    #[test]
    fn a_new_segment_gets_the_mode_asked_for_whatever_the_umask() {
        let name = unique("umask");
        // SAFETY: fork(2); the child sets its own umask, makes and checks a segment, and leaves
        // with `_exit` (its drop removes the segment).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: umask(2) of this single-threaded child.
            unsafe { libc::umask(0o077) };
            let options = ShmOptions { mode: 0o660, ..quick() };
            let code = match PosixShmBackend::create(&name, 4096, &options) {
                Ok(a) => {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(format!("/dev/shm{name}")).map(|m| m.permissions().mode() & 0o777);
                    drop(a);
                    if mode.ok() == Some(0o660) {
                        0
                    } else {
                        1
                    }
                }
                Err(_) => 2,
            };
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0, "1 = the umask took bits off the mode asked for, 2 = create failed");
        assert!(!PosixShmBackend::exists(&name).unwrap());
    }

    #[test]
    fn a_segment_we_may_not_open_still_exists() {
        let name = unique("noaccess");
        let _a = PosixShmBackend::create(&name, 4096, &ShmOptions { mode: 0, ..quick() }).unwrap();
        // SAFETY: fork(2); the child drops root (which reads any file), asks, and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: setuid(2) in the single-threaded child; 65534 is `nobody`.
            if unsafe { libc::geteuid() } == 0 && unsafe { libc::setuid(65534) } != 0 {
                // SAFETY: ends the forked child.
                unsafe { libc::_exit(3) };
            }
            let code = match PosixShmBackend::exists(&name) {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(_) => 2,
            };
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0, "exists: 1 = said no, 2 = an error, 3 = setuid failed");
    }

    /// Writes `bytes` at `offset` of segment `name` through a second, raw mapping.
    fn poke(name: &str, offset: usize, bytes: &[u8]) {
        let path = format!("/dev/shm{name}");
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_at(bytes, offset as u64).unwrap();
    }

    #[test]
    fn wrong_magic_version_kind_and_truncation_are_header_mismatches() {
        let name = unique("hdr");
        let a = PosixShmBackend::create(&name, 1 << 16, &quick()).unwrap();
        let field = |r: Result<PosixShmBackend>| match r {
            Err(Error::HeaderMismatch { field, .. }) => field,
            other => panic!("expected a header mismatch, got {other:?}"),
        };
        assert_eq!(field(PosixShmBackend::attach_kind(&name, &quick(), BackendKind::Pinned)), "kind");

        poke(&name, 8, &(LAYOUT_VERSION + 1).to_le_bytes());
        assert_eq!(field(PosixShmBackend::attach(&name, &quick())), "version");
        poke(&name, 8, &LAYOUT_VERSION.to_le_bytes());

        let file = std::fs::OpenOptions::new().write(true).open(format!("/dev/shm{name}")).unwrap();
        file.set_len(8192).unwrap();
        assert_eq!(field(PosixShmBackend::attach(&name, &quick())), "total_size");
        // Smaller than a header: refused at once (the timeout is not waited for: a creator
        // never gives a segment that size).
        let patient = ShmOptions { attach_timeout: Duration::from_secs(20), ..Default::default() };
        file.set_len(100).unwrap();
        let asked = Instant::now();
        assert_eq!(field(PosixShmBackend::attach(&name, &patient)), "total_size");
        assert!(asked.elapsed() < Duration::from_secs(10), "waited for a size no creator gives");
        // Empty: a creator that has not sized it yet is waited for, up to the timeout.
        file.set_len(0).unwrap();
        assert!(matches!(PosixShmBackend::attach(&name, &quick()), Err(Error::TimedOut { .. })));
        file.set_len(a.len()).unwrap();

        poke(&name, 0, b"NOTHETMM");
        assert_eq!(field(PosixShmBackend::attach(&name, &quick())), "magic");
    }

    /// A segment shrunk while an attacher waits for its creator (or at any time after it was
    /// mapped, before its header is ready) is refused, where the attacher took the size it had
    /// when it was mapped and would die of SIGBUS past the new end.
    #[test]
    fn attach_refuses_a_segment_shrunk_while_it_waited() {
        let name = unique("shrunk");
        let a = PosixShmBackend::create(&name, 1 << 16, &quick()).unwrap();
        let path = format!("/dev/shm{name}");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt;
        let mut magic = [0; 8];
        file.read_exact_at(&mut magic, 0).unwrap();
        // Not ready yet: the magic is still zero.
        file.write_at(&[0; 8], 0).unwrap();
        let options = ShmOptions { attach_timeout: Duration::from_secs(10), ..Default::default() };
        let r = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                file.set_len(2 * HEADER_SIZE).unwrap();
                file.write_at(&magic, 0).unwrap();
            });
            PosixShmBackend::attach(&name, &options)
        });
        match r {
            Err(Error::HeaderMismatch { field: "total_size", expected, found }) => {
                assert_eq!((expected, found), (2 * HEADER_SIZE, a.len()));
            }
            other => panic!("attached to a segment shrunk under it: {other:?}"),
        }
        file.set_len(a.len()).unwrap();
        assert!(PosixShmBackend::attach(&name, &quick()).is_ok());
    }

    #[test]
    fn attach_times_out_on_a_segment_never_initialised() {
        let name = unique("uninit");
        let c = c_name(&name).unwrap();
        let fd = shm_open(&c, &name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600).unwrap();
        ftruncate(fd, 3 * HEADER_SIZE).unwrap();
        close(fd);
        let r = PosixShmBackend::attach(&name, &quick());
        unlink(&c);
        assert!(matches!(r, Err(Error::TimedOut { .. })), "{r:?}");
    }

    #[test]
    fn remove_takes_away_a_name_attach_refuses() {
        let name = unique("halfmade");
        let c = c_name(&name).unwrap();
        // A creator that died after shm_open, before sizing the segment.
        close(shm_open(&c, &name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600).unwrap());
        let options = ShmOptions { attach_timeout: Duration::from_millis(10), ..Default::default() };
        assert!(matches!(PosixShmBackend::attach(&name, &options), Err(Error::TimedOut { .. })));
        PosixShmBackend::remove(&name).unwrap();
        assert!(!PosixShmBackend::exists(&name).unwrap());
        assert!(matches!(PosixShmBackend::remove(&name), Err(Error::NotFound { .. })));
        assert!(matches!(PosixShmBackend::remove("/a/b"), Err(Error::InvalidName { .. })));
        // A mapped segment keeps its memory once its name is gone.
        let mut kept = PosixShmBackend::create(&name, 4096, &quick()).unwrap();
        kept.persist();
        PosixShmBackend::remove(&name).unwrap();
        assert!(!PosixShmBackend::exists(&name).unwrap());
        // SAFETY: the segment's first user byte, past the header, in the live mapping.
        unsafe { kept.base().add(HEADER_SIZE as usize).write(7) };
    }

    /// A segment another process truncated after `remove` measured it: its magic was read
    /// through a mapping past the segment's end (zeros within the page, SIGBUS past it). Linux
    /// now reads it with `pread`, which sees the short segment.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_magic_read_past_a_truncated_segments_end_is_a_size_mismatch() {
        let path = std::env::temp_dir().join(format!("hetmem-short-magic-{}", std::process::id()));
        std::fs::write(&path, [0x5a; 3]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let r = read_magic(std::os::fd::AsRawFd::as_raw_fd(&file));
        assert!(matches!(r, Err(Error::HeaderMismatch { field: "total_size", found: 3, .. })), "{r:?}");
    }

    /// `remove` used to unlink whatever the name held: it leaves what is surely not a hetmem
    /// segment (a FIFO, another program's segment) in place, with the error `attach` gives, and
    /// still removes a segment whose header is not written yet (a creator that died at work).
    #[cfg(target_os = "linux")]
    #[test]
    fn remove_leaves_what_is_not_a_hetmem_segment() {
        let name = unique("remove-other");
        let path = format!("/dev/shm{name}");
        let _remove = RemoveOnDrop(path.clone());
        let c_path = CString::new(path.clone()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let r = PosixShmBackend::remove(&name);
        assert!(matches!(r, Err(Error::InvalidName { .. })), "{r:?}");
        assert!(std::fs::symlink_metadata(&path).is_ok(), "remove took away a FIFO");
        std::fs::remove_file(&path).unwrap();

        // Another program's segments: one whose first bytes are not hetmem's, one too short to
        // hold a header.
        for (len, field) in [(3 * HEADER_SIZE as usize, "magic"), (100, "total_size")] {
            std::fs::write(&path, vec![0x5a; len]).unwrap();
            match PosixShmBackend::remove(&name) {
                Err(Error::HeaderMismatch { field: found, .. }) => assert_eq!(found, field),
                other => panic!("{len} bytes: {other:?}"),
            }
            assert!(std::fs::metadata(&path).is_ok(), "remove took away another program's segment");
            std::fs::remove_file(&path).unwrap();
        }

        // A hetmem creator's that died after sizing it, before writing its header.
        std::fs::write(&path, vec![0; 3 * HEADER_SIZE as usize]).unwrap();
        PosixShmBackend::remove(&name).unwrap();
        assert!(!PosixShmBackend::exists(&name).unwrap());
    }

    /// A segment past 2 GiB (sparse: it takes no memory): a 32-bit process's plain `fstat` and
    /// `lstat` fail on it with EOVERFLOW, so such a process could not remove it or check it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_segment_past_2_gib_is_measured_in_a_32_bit_process_too() {
        let name = unique("past-2-gib");
        let path = format!("/dev/shm{name}");
        let _remove = RemoveOnDrop(path.clone());
        std::fs::File::create(&path).unwrap().set_len(3 << 30).unwrap();
        assert!(PosixShmBackend::exists(&name).unwrap());
        // Its header is not written yet (a creator that died setting it up): remove takes it away.
        PosixShmBackend::remove(&name).unwrap();
        assert!(!PosixShmBackend::exists(&name).unwrap());
    }

    #[test]
    fn only_the_segment_itself_is_unlinked_not_a_newer_one_of_the_same_name() {
        let name = unique("reuse");
        let first = PosixShmBackend::create(&name, 4096, &quick()).unwrap();
        let attached = PosixShmBackend::attach(&name, &quick()).unwrap();
        first.destroy().unwrap();
        let second = PosixShmBackend::create(&name, 4096, &quick()).unwrap();
        assert!(
            matches!(attached.destroy(), Err(Error::NotFound { .. })),
            "destroy through the old segment removed the new one"
        );
        drop(first);
        assert!(PosixShmBackend::exists(&name).unwrap(), "the old creator's drop removed the new segment");
        drop(second);
        assert!(!PosixShmBackend::exists(&name).unwrap());
    }

    #[test]
    fn attach_waits_at_most_its_timeout_in_all() {
        let name = unique("slow");
        let c = c_name(&name).unwrap();
        let fd = shm_open(&c, &name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600).unwrap();
        // A creator that sizes the segment late and never writes its header.
        let sizer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(900));
            ftruncate(fd, 3 * HEADER_SIZE).unwrap();
            close(fd);
        });
        let options = ShmOptions { attach_timeout: Duration::from_millis(1000), ..Default::default() };
        let started = Instant::now();
        let r = PosixShmBackend::attach(&name, &options);
        let waited = started.elapsed();
        sizer.join().unwrap();
        unlink(&c);
        assert!(r.is_err());
        // Waiting for the size and then for the header, each with the full timeout, took 1.9 s:
        // the bound leaves 0.7 s for a loaded machine's scheduling.
        assert!(waited < Duration::from_millis(1700), "attach waited {waited:?} with a 1 s timeout");
    }

    #[test]
    fn drop_unlinks_unless_persisted() {
        let name = unique("drop");
        drop(PosixShmBackend::create(&name, 4096, &quick()).unwrap());
        assert!(!PosixShmBackend::exists(&name).unwrap());
        let mut a = PosixShmBackend::create(&name, 4096, &quick()).unwrap();
        a.persist();
        drop(a);
        assert!(PosixShmBackend::exists(&name).unwrap());
        PosixShmBackend::attach(&name, &quick()).unwrap().destroy().unwrap();
        assert!(!PosixShmBackend::exists(&name).unwrap());
    }
}
