//! The one error type of hetmem.
//!
//! Every fallible operation in every hetmem crate returns [`Error`]. It needs no heap, so it is
//! the same in `no_std` builds and on the GPU host side.

use core::fmt;

use crate::backend::BackendId;
use crate::ptr::AllocatorId;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong in hetmem, with the facts needed to act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A size of zero, one that overflows, or one that does not fit the structure asked for.
    #[error("invalid size {size}: {reason}")]
    InvalidSize {
        /// The size that was asked for.
        size: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An alignment that is not a non-zero power of two, or an address (a buffer, a range) that
    /// does not meet the alignment it needs.
    #[error("invalid alignment {align}: not a non-zero power of two, or not met by the address given")]
    InvalidAlignment {
        /// The alignment that was asked for, or the one the address needed.
        align: u64,
    },
    /// The allocator or backend has no room for the request. The allocator stays usable.
    #[error("out of memory: requested {requested} bytes, {available} available")]
    OutOfMemory {
        /// Bytes requested: the caller's size, or the block size it was rounded to where the
        /// allocator works in blocks (fastmem, the size-class caches, a pool's upstream block).
        requested: u64,
        /// Bytes the allocator could still give out, as far as it knows: its free bytes in all,
        /// which need not lie in one piece, so a request smaller than this can still fail.
        available: u64,
    },
    /// A pool would grow past the maximum size it was configured with. The pool stays usable:
    /// freeing makes room again.
    #[error("pool maximum size reached: {requested} more bytes requested, {held} of its {max_size} bytes taken")]
    MaxSizeReached {
        /// Bytes the pool would have had to take from upstream.
        requested: u64,
        /// The pool's configured maximum size.
        max_size: u64,
        /// Bytes the pool holds from upstream now.
        held: u64,
    },
    /// No backend with this id is registered.
    #[error("unknown backend id {0}")]
    UnknownBackend(BackendId),
    /// No allocator with this id is registered or present in the region.
    #[error("unknown allocator id {0}")]
    UnknownAllocator(AllocatorId),
    /// A named object (segment, file, key) does not exist.
    #[error("{what} {name:?} not found")]
    NotFound {
        /// What kind of object was looked for.
        what: &'static str,
        /// Its name.
        name: ShortStr,
    },
    /// A named object already exists and creation must not reuse it.
    #[error("{what} {name:?} already exists")]
    AlreadyExists {
        /// What kind of object it is.
        what: &'static str,
        /// Its name.
        name: ShortStr,
    },
    /// A region's header does not describe what the caller expects.
    #[error("header mismatch in field `{field}`: expected {expected:#x}, found {found:#x}")]
    HeaderMismatch {
        /// The header field that differs.
        field: &'static str,
        /// The value this process expected.
        expected: u64,
        /// The value found in the region.
        found: u64,
    },
    /// The operating system refused access to a named object.
    #[error("permission denied for {name:?}")]
    PermissionDenied {
        /// The object's name.
        name: ShortStr,
    },
    /// An operating-system call failed.
    #[error("{call} failed: {}", ErrnoText(*errno))]
    Os {
        /// The call that failed, e.g. `shm_open`.
        call: &'static str,
        /// The `errno` (or `GetLastError`) it left.
        errno: i32,
    },
    /// Waited too long, e.g. for a segment's creator to finish initialising it.
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    TimedOut {
        /// What was waited for.
        what: &'static str,
        /// How long the wait lasted.
        waited_ms: u64,
    },
    /// The operation is not supported by this backend, allocator or platform.
    #[error("unsupported operation: {0}")]
    Unsupported(&'static str),
    /// A free (or reallocate) of something that is not a live allocation of this allocator.
    #[error("invalid free of offset {offset:#x}: {reason}")]
    InvalidFree {
        /// The offset passed in.
        offset: u64,
        /// Why it is not a live allocation.
        reason: &'static str,
    },
    /// An offset (or offset plus length) falls outside the region it must lie in.
    #[error("offset {offset:#x}+{len} is outside the region of {region_len} bytes")]
    OutOfBounds {
        /// The offset.
        offset: u64,
        /// The length that must fit after it.
        len: u64,
        /// The region's length.
        region_len: u64,
    },
    /// A name that cannot be used for the object (e.g. a shared-memory name with a second '/').
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: ShortStr,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A GPU driver or runtime call (CUDA, HIP) failed with an error code of its own.
    #[error("{call} failed: {name} (error {code})")]
    Gpu {
        /// The call that failed, e.g. `cuMemHostRegister`.
        call: &'static str,
        /// The driver's or runtime's error code.
        code: i32,
        /// Its name for the code, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        name: &'static str,
    },
    /// Text input (an allocation trace) that cannot be used: which item, counted from 1, and why.
    #[error("{what} {number}: {detail}")]
    BadInput {
        /// What was read, e.g. `trace line` or `trace event`.
        what: &'static str,
        /// Which line or event, counted from 1.
        number: u64,
        /// What is wrong with it.
        detail: &'static str,
    },
    /// An allocator's `check()` found a broken invariant.
    #[error("corrupt {structure} at offset {offset:#x}: {detail}")]
    Corrupt {
        /// The structure that is broken.
        structure: &'static str,
        /// Where, as an offset in the region.
        offset: u64,
        /// What is wrong.
        detail: &'static str,
    },
}

impl Error {
    /// Whether the request failed for want of memory: [`Error::OutOfMemory`], or a pool at its
    /// maximum size ([`Error::MaxSizeReached`]).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory { .. } | Error::MaxSizeReached { .. })
    }
}

struct ErrnoText(i32);

impl fmt::Display for ErrnoText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "std")]
        {
            write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
        }
        #[cfg(not(feature = "std"))]
        {
            write!(f, "errno {}", self.0)
        }
    }
}

/// A short string held inline (no heap), for names in errors. Longer text is cut at a character
/// boundary and ends in `…`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortStr {
    len: u8,
    buf: [u8; Self::CAPACITY],
}

impl ShortStr {
    /// Bytes kept inline.
    pub const CAPACITY: usize = 62;

    /// Copies `s`, cutting it to [`Self::CAPACITY`] bytes if needed.
    pub fn new(s: &str) -> Self {
        let mut out = ShortStr { len: 0, buf: [0; Self::CAPACITY] };
        if s.len() <= Self::CAPACITY {
            out.buf[..s.len()].copy_from_slice(s.as_bytes());
            out.len = s.len() as u8;
            return out;
        }
        const ELLIPSIS: &str = "…";
        let mut cut = Self::CAPACITY - ELLIPSIS.len();
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        out.buf[..cut].copy_from_slice(&s.as_bytes()[..cut]);
        out.buf[cut..cut + ELLIPSIS.len()].copy_from_slice(ELLIPSIS.as_bytes());
        out.len = (cut + ELLIPSIS.len()) as u8;
        out
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 text is ever copied in (cut at char boundaries), so this cannot fail;
        // fall back to "" rather than panic should that ever change.
        core::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for ShortStr {
    fn from(s: &str) -> Self {
        ShortStr::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_str_keeps_short_names_and_cuts_long_ones() {
        assert_eq!(ShortStr::new("/hetmem-a").as_str(), "/hetmem-a");
        let long = "é".repeat(40);
        let cut = ShortStr::new(&long);
        assert!(cut.as_str().len() <= ShortStr::CAPACITY);
        assert!(cut.as_str().ends_with('…'));
    }

    #[cfg(feature = "std")]
    #[test]
    fn errors_say_what_went_wrong() {
        let e = Error::HeaderMismatch { field: "version", expected: 1, found: 7 };
        assert_eq!(e.to_string(), "header mismatch in field `version`: expected 0x1, found 0x7");
        // The code is the OS's own: errno on unix, GetLastError on Windows.
        #[cfg(unix)]
        {
            let e = Error::Os { call: "shm_open", errno: 2 };
            assert!(e.to_string().starts_with("shm_open failed: No such file"), "{e}");
        }
        #[cfg(windows)]
        {
            // ERROR_NOT_ENOUGH_MEMORY (errno 8 would be ENOEXEC).
            let e = Error::Os { call: "FlsAlloc", errno: 8 }.to_string();
            assert!(e.starts_with("FlsAlloc failed: ") && e.to_lowercase().contains("memory"), "{e}");
        }
    }
}
