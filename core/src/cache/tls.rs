//! The per-thread side of the caches: one [`ThreadCache`] per *slot* in thread-local storage.
//!
//! A slot is a (tier, upstream) pair: slot 0 is [`HetAlloc`](super::HetAlloc) over the system
//! allocator, slot 1 the recycled frames over the global allocator, and the others are handed
//! out on first use to allocators over a [`MemoryResource`](crate::MemoryResource). Each slot
//! has a process-wide [`Depot`] and the counters of its exited threads.
//!
//! Allocator requirements met here:
//! - **Reentrancy**: the thread-local state needs no destructor (so touching it registers
//!   nothing and allocates nothing). The first request of a thread marks it *busy*, registers an
//!   exit guard, reads the configuration (both may allocate), then marks it *active*; requests
//!   made while busy go straight upstream.
//! - **Thread exit**: the guard's destructor marks the thread *exited*, zeroes its limits and
//!   returns every cached block (to the depot, then upstream). Requests in later destructors, and
//!   frees of blocks cached before, go straight upstream: the upstream layout depends on the
//!   request alone, so that is always the right place. A thread whose first request comes after
//!   its thread-local destructors have run (from a pthread key's destructor, which glibc runs
//!   later) registers a guard that never runs: on unix a pthread key's destructor retires it too
//!   (see `backstop`), and a thread that cannot have one gets no cache. On Windows a TLS
//!   callback that runs after std's retires a thread whose guard came too late (see `win`).

use core::cell::Cell;
use core::mem::ManuallyDrop;
use core::ptr::{self, NonNull};

use crate::cache::config::{depot_limit, CacheConfig, ThreadRole};
use crate::cache::depot::{self, Depot};
use crate::cache::size_class::{class_of, class_size, BLOCK_ALIGN};
use crate::cache::stats::{CacheStats, Counters};
use crate::cache::thread_cache::ThreadCache;
use crate::cache::upstream::Upstream;
use crate::error::{Error, Result};
use crate::sync::SpinLock;
use core::alloc::Layout;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Slots per thread.
pub(crate) const SLOTS: usize = 8;
pub(crate) const SLOT_SYSTEM: u8 = 0;
pub(crate) const SLOT_FRAMES: u8 = 1;
/// No slot was free: requests pass straight through.
const SLOT_NONE: u8 = 0xFF;
/// Not looked up yet.
const SLOT_UNASSIGNED: u8 = 0xFE;

/// Which tier a slot's caches serve (it decides where their limits come from).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Tier {
    /// `HetAlloc`: limits from the thread's role.
    Alloc,
    /// Recycled frames: limits from the frame configuration.
    Frames,
}

#[derive(Clone, Copy, PartialEq, Debug)]
struct SlotOwner {
    tier: Tier,
    upstream: Upstream,
}

static OWNERS: SpinLock<[Option<SlotOwner>; SLOTS]> = SpinLock::new({
    let mut owners = [None; SLOTS];
    owners[SLOT_SYSTEM as usize] = Some(SlotOwner { tier: Tier::Alloc, upstream: Upstream::System });
    owners[SLOT_FRAMES as usize] = Some(SlotOwner { tier: Tier::Frames, upstream: Upstream::Global });
    owners
});
static DEPOTS: [Depot; SLOTS] = [const { Depot::new(depot::UNSET) }; SLOTS];
static DEPOT_LIMITS_SET: AtomicBool = AtomicBool::new(false);
/// Counts of exited threads and of requests that bypassed a cache (busy or exited threads).
static RETIRED: [Counters; SLOTS] = [const { Counters::new() }; SLOTS];
static THREADS: SpinLock<ThreadList> = SpinLock::new(ThreadList { head: ptr::null(), live: 0 });

struct ThreadList {
    head: *const ThreadState,
    live: usize,
}

// SAFETY: the list only links thread states of live threads, each unlinked (under the lock) by
// its thread before its storage goes away.
unsafe impl Send for ThreadList {}

const FRESH: u8 = 0;
const BUSY: u8 = 1;
const ACTIVE: u8 = 2;
const EXITED: u8 = 3;

pub(crate) struct ThreadState {
    phase: Cell<u8>,
    role: Cell<ThreadRole>,
    own_config: Cell<Option<CacheConfig>>,
    frame_config: Cell<Option<CacheConfig>>,
    next: Cell<*const ThreadState>,
    /// The resource this thread is calling from a slot's slow path, if any: see
    /// [`SlotRef::call_upstream`].
    serving: Cell<Option<Serving>>,
    caches: [ManuallyDrop<ThreadCache>; SLOTS],
}

impl ThreadState {
    const fn new() -> Self {
        ThreadState {
            phase: Cell::new(FRESH),
            role: Cell::new(ThreadRole::Worker),
            own_config: Cell::new(None),
            frame_config: Cell::new(None),
            next: Cell::new(ptr::null()),
            serving: Cell::new(None),
            caches: [const { ManuallyDrop::new(ThreadCache::unready(Upstream::System, None)) }; SLOTS],
        }
    }
}

#[cfg(not(windows))]
thread_local! {
    static STATE: ThreadState = const { ThreadState::new() };
}

thread_local! {
    static EXIT: ExitGuard = const { ExitGuard };
}

/// Its destructor returns the thread's caches when the thread exits.
struct ExitGuard;

impl Drop for ExitGuard {
    fn drop(&mut self) {
        #[cfg(not(windows))]
        STATE.with(retire_thread);
        #[cfg(windows)]
        win::retire_current();
    }
}

/// Unix: a pthread key whose destructor retires the thread as well. glibc runs the destructors
/// of Rust thread-locals first and then those of pthread keys; a thread whose first request
/// comes from a key's destructor registers its exit guard after the former ran, and glibc never
/// runs it. The thread's state would then stay listed in `THREADS` after its storage went away
/// (and its cached blocks with it). A key's value set while keys' destructors run makes glibc
/// run them again (up to `PTHREAD_DESTRUCTOR_ITERATIONS` rounds), so this one retires such a
/// thread. Where the exit guard ran first (every other thread) it finds the thread retired.
/// (Not covered: a first request in the last of those rounds, which needs key destructors
/// that set keys again round after round.)
#[cfg(unix)]
mod backstop {
    use core::ffi::c_void;
    use core::sync::atomic::{AtomicUsize, Ordering};

    /// The key, once made (`NONE` until then).
    static KEY: AtomicUsize = AtomicUsize::new(NONE);
    const NONE: usize = usize::MAX;

    unsafe extern "C" fn retire(_: *mut c_void) {
        super::STATE.with(super::retire_thread);
    }

    fn key() -> Option<libc::pthread_key_t> {
        let key = KEY.load(Ordering::Acquire);
        if key != NONE {
            return Some(key as libc::pthread_key_t);
        }
        let mut mine: libc::pthread_key_t = 0;
        // SAFETY: `retire` may run on any thread at its exit.
        if unsafe { libc::pthread_key_create(&mut mine, Some(retire)) } != 0 || mine as usize == NONE {
            return None;
        }
        match KEY.compare_exchange(NONE, mine as usize, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Some(mine),
            Err(theirs) => {
                // SAFETY: made above, and no thread has a value under it.
                unsafe { libc::pthread_key_delete(mine) };
                Some(theirs as libc::pthread_key_t)
            }
        }
    }

    /// Sets the calling thread's value under the key, so its destructor runs at the thread's
    /// exit; `false` if there is no key or no room for the value.
    pub(super) fn arm() -> bool {
        // SAFETY: a non-null value under our own key; it is never dereferenced.
        key().is_some_and(|key| unsafe { libc::pthread_setspecific(key, ptr_one()) } == 0)
    }

    fn ptr_one() -> *const c_void {
        core::ptr::without_provenance(1)
    }
}

#[cfg(not(windows))]
#[inline(always)]
fn with_state<R>(f: impl FnOnce(&ThreadState) -> R) -> R {
    STATE.with(f)
}

#[cfg(windows)]
use win::with_state;

/// Windows: where the target has no native TLS (windows-gnu), `thread_local!` boxes each
/// thread's value on the global allocator at first touch, so a `STATE` there would recurse
/// into `HetAlloc` forever. Each thread's state is instead a block of the system heap, reached
/// through a raw TLS index; the exit guard (a `thread_local!`, touched while the thread is busy)
/// still decides when it retires.
#[cfg(windows)]
mod win {
    use core::ffi::c_void;
    use core::sync::atomic::AtomicU32;
    use std::alloc::{GlobalAlloc, System};

    use windows_sys::Win32::System::Threading::{TlsAlloc, TlsFree, TlsGetValue, TlsSetValue, TLS_OUT_OF_INDEXES};

    use super::*;

    static INDEX: AtomicU32 = AtomicU32::new(TLS_OUT_OF_INDEXES);

    /// The slot's value once the thread's state is retired and freed: an odd number (a state's
    /// address is even) that keeps the thread's role, so [`thread_role`] reads the same past
    /// the thread's exit as where the state stays (unix).
    fn retired_mark(role: ThreadRole) -> *mut c_void {
        let code = match role {
            ThreadRole::Main => 0,
            ThreadRole::Worker => 1,
            ThreadRole::Scheduler => 2,
            ThreadRole::Custom(n) => 3 + usize::from(n),
        };
        ptr::without_provenance_mut((code << 1) | 1)
    }

    /// The role a slot's value keeps if it is a retired mark.
    fn retired_role(p: *mut c_void) -> Option<ThreadRole> {
        let value = p.addr();
        if value & 1 == 0 {
            return None;
        }
        Some(match value >> 1 {
            0 => ThreadRole::Main,
            1 => ThreadRole::Worker,
            2 => ThreadRole::Scheduler,
            // Only `retired_mark` stores odd values, so this is one of its custom roles.
            n => ThreadRole::Custom(u16::try_from(n - 3).unwrap_or(u16::MAX)),
        })
    }

    fn index() -> Option<u32> {
        let index = INDEX.load(Ordering::Acquire);
        if index != TLS_OUT_OF_INDEXES {
            return Some(index);
        }
        // SAFETY: no preconditions.
        let mine = unsafe { TlsAlloc() };
        if mine == TLS_OUT_OF_INDEXES {
            return None;
        }
        match INDEX.compare_exchange(TLS_OUT_OF_INDEXES, mine, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Some(mine),
            Err(theirs) => {
                // SAFETY: `mine` came from TlsAlloc above and no one else has seen it.
                unsafe { TlsFree(mine) };
                Some(theirs)
            }
        }
    }

    /// The calling thread's state, made on first use; once it retired, `Err` with the role it
    /// had, and `Err(None)` when no TLS index or memory could be had (requests then go straight
    /// upstream).
    #[inline]
    fn current() -> core::result::Result<NonNull<ThreadState>, Option<ThreadRole>> {
        let index = index().ok_or(None)?;
        // SAFETY: reading our own slot has no preconditions.
        let p = unsafe { TlsGetValue(index) };
        if let Some(role) = retired_role(p) {
            return Err(Some(role));
        }
        match NonNull::new(p.cast::<ThreadState>()) {
            Some(state) => Ok(state),
            None => create(index).ok_or(None),
        }
    }

    #[cold]
    fn create(index: u32) -> Option<NonNull<ThreadState>> {
        let layout = Layout::new::<ThreadState>();
        // SAFETY: a non-zero-sized layout; System is the heap, not the global allocator.
        let state = NonNull::new(unsafe { System.alloc(layout) }.cast::<ThreadState>())?;
        // SAFETY: fresh memory sized and aligned for a ThreadState.
        unsafe { state.as_ptr().write(ThreadState::new()) };
        // SAFETY: storing a pointer in our own slot.
        if unsafe { TlsSetValue(index, state.as_ptr().cast()) } == 0 {
            // SAFETY: allocated above with this layout; never published.
            unsafe { System.dealloc(state.as_ptr().cast(), layout) };
            return None;
        }
        Some(state)
    }

    /// Frees a state no one refers to any more; the slot is marked retired (with the thread's
    /// role) first.
    fn release(index: u32, state: NonNull<ThreadState>) {
        // SAFETY: the state is live until the dealloc below.
        let role = unsafe { state.as_ref() }.role.get();
        // SAFETY: our own slot.
        unsafe { TlsSetValue(index, retired_mark(role)) };
        // SAFETY: made by `create` with this layout; the caller guarantees no references.
        unsafe { System.dealloc(state.as_ptr().cast(), Layout::new::<ThreadState>()) };
    }

    #[inline(always)]
    pub(super) fn with_state<R>(f: impl FnOnce(&ThreadState) -> R) -> R {
        let state = match current() {
            Ok(state) => state,
            Err(role) => {
                // Retired, or no state could be made: an exited state with the role the thread
                // had (its default where it had none), for this call only.
                let gone = ThreadState::new();
                gone.phase.set(EXITED);
                gone.role.set(role.unwrap_or_else(default_role));
                return f(&gone);
            }
        };
        // SAFETY: the state lives until `release`, which runs only where no reference is held.
        let r = f(unsafe { state.as_ref() });
        // SAFETY: as above.
        if unsafe { state.as_ref() }.phase.get() == EXITED {
            // Only `start_thread` leaves a published state EXITED (the exit guard marks the slot
            // before retiring), and it runs in the outermost call holding the state: nested
            // calls find the thread busy. So nothing refers to the state now.
            if let Some(index) = index() {
                release(index, state);
            }
        }
        r
    }

    /// The backstop of the exit guard (as `backstop` is on unix): std runs the destructors of
    /// thread-locals from its own TLS callback, in `.CRT$XLB`, in at most five rounds, a value
    /// set during one destroyed in the next. A thread whose first request comes in the last
    /// round registers its exit guard too late, and it never runs: its state would stay listed
    /// in `THREADS`, with its cached blocks, after the thread is gone. The loader calls the TLS
    /// callbacks in the order of their sections' names, so this one, in `.CRT$XLY`, runs after
    /// std's and retires such a thread. Where the exit guard ran (every other thread) it finds
    /// the thread retired, or a thread that never made a request; it does nothing on the
    /// process's exit (other threads were stopped wherever they were, holding locks perhaps).
    #[link_section = ".CRT$XLY"]
    #[used]
    static BACKSTOP: unsafe extern "system" fn(*mut c_void, u32, *mut c_void) = backstop;

    unsafe extern "system" fn backstop(_module: *mut c_void, reason: u32, _reserved: *mut c_void) {
        /// `DLL_THREAD_DETACH`: a thread (not the process) exits.
        const THREAD_DETACH: u32 = 3;
        if reason == THREAD_DETACH && INDEX.load(Ordering::Acquire) != TLS_OUT_OF_INDEXES {
            retire_current();
        }
    }

    /// Makes sure the linker keeps [`BACKSTOP`] (as std does for its own callback): the object
    /// that holds it must be referred to from code that runs.
    pub(super) fn arm() {
        // SAFETY: a read of a static, for its side effect on the linker only.
        let _ = unsafe { ptr::from_ref(&BACKSTOP).read_volatile() };
    }

    /// The exit guard's work: retire the thread's state, then free it.
    pub(super) fn retire_current() {
        let Some(index) = index() else {
            return;
        };
        // SAFETY: reading our own slot has no preconditions.
        let p = unsafe { TlsGetValue(index) };
        if retired_role(p).is_some() {
            return;
        }
        let Some(state) = NonNull::new(p.cast::<ThreadState>()) else {
            return;
        };
        // Requests made while retiring (returning blocks may call the global allocator) must
        // not reach this state: mark the slot first, then retire through the pointer.
        // SAFETY: the state is live; our own slot.
        unsafe { TlsSetValue(index, retired_mark(state.as_ref().role.get())) };
        // SAFETY: the state is live until the release below; only this call refers to it now.
        retire_thread(unsafe { state.as_ref() });
        release(index, state);
    }
}

/// A handle on one slot: what `HetAlloc` and the recycled-frame allocator are made of.
pub(crate) struct SlotRef {
    slot: AtomicU8,
    tier: Tier,
    upstream: Upstream,
}

impl Clone for SlotRef {
    fn clone(&self) -> Self {
        SlotRef { slot: AtomicU8::new(self.slot.load(Ordering::Relaxed)), tier: self.tier, upstream: self.upstream }
    }
}

impl SlotRef {
    /// One of the two built-in slots.
    pub(crate) const fn fixed(slot: u8, tier: Tier, upstream: Upstream) -> Self {
        SlotRef { slot: AtomicU8::new(slot), tier, upstream }
    }

    /// A slot found (or claimed) on first use.
    pub(crate) const fn lazy(tier: Tier, upstream: Upstream) -> Self {
        SlotRef { slot: AtomicU8::new(SLOT_UNASSIGNED), tier, upstream }
    }

    pub(crate) fn upstream(&self) -> Upstream {
        self.upstream
    }

    /// The slot index, claimed on first use; `SLOT_NONE` (at least [`SLOTS`]) if none was free.
    #[inline(always)]
    pub(crate) fn slot(&self) -> usize {
        let s = self.slot.load(Ordering::Relaxed);
        if (s as usize) < SLOTS {
            s as usize
        } else if s == SLOT_UNASSIGNED {
            self.assign()
        } else {
            SLOT_NONE as usize
        }
    }

    /// The slot if it is assigned and has a cache, without claiming one: the hot paths branch
    /// on this once, so the code after it knows the slot is valid.
    #[inline(always)]
    pub(crate) fn ready_slot(&self) -> Option<usize> {
        let s = self.slot.load(Ordering::Relaxed) as usize;
        (s < SLOTS).then_some(s)
    }

    #[cold]
    fn assign(&self) -> usize {
        let wanted = SlotOwner { tier: self.tier, upstream: self.upstream };
        let slot = if !self.upstream.host_accessible() {
            SLOT_NONE
        } else {
            let mut owners = OWNERS.lock();
            match owners.iter().position(|o| *o == Some(wanted)) {
                Some(i) => i as u8,
                None => match owners.iter().position(Option::is_none) {
                    Some(i) => {
                        owners[i] = Some(wanted);
                        i as u8
                    }
                    None => SLOT_NONE,
                },
            }
        };
        self.slot.store(slot, Ordering::Relaxed);
        slot as usize
    }

    /// Whether a slot of the table is owned by this handle's tier and upstream.
    #[cfg(test)]
    pub(crate) fn claimed(&self) -> bool {
        let wanted = SlotOwner { tier: self.tier, upstream: self.upstream };
        OWNERS.lock().contains(&Some(wanted))
    }

    /// The slot, claimed on first use as by [`Self::slot`]; `None` if none was free.
    fn assigned(&self) -> Option<usize> {
        let s = self.slot();
        (s < SLOTS).then_some(s)
    }

    /// The slot if this handle has one, or if another handle of the same tier and upstream
    /// claimed it; `None` otherwise, without claiming a free one. For the calls that only read
    /// (or empty) what a slot holds: a handle that never served a request has nothing there, and
    /// a read must not use up one of the few slots.
    fn existing(&self) -> Option<usize> {
        let s = self.slot.load(Ordering::Relaxed);
        if (s as usize) < SLOTS {
            return Some(s as usize);
        }
        if s != SLOT_UNASSIGNED {
            return None;
        }
        let wanted = SlotOwner { tier: self.tier, upstream: self.upstream };
        let found = OWNERS.lock().iter().position(|o| *o == Some(wanted))?;
        // Owners are never given up, so this is what `assign` would store too.
        self.slot.store(found as u8, Ordering::Relaxed);
        Some(found)
    }

    /// Allocates for `layout` (non-zero size); null when the upstream is out of memory.
    #[inline(always)]
    pub(crate) fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => self.alloc_class(self.slot(), class),
            None => self.passthrough_alloc(layout, false),
        }
    }

    /// A block of `class`, from the calling thread's cache of `slot`: this handle's slot, given
    /// by callers that know it at compile time ([`SLOT_FRAMES`]) to skip looking it up.
    #[inline(always)]
    pub(crate) fn alloc_class(&self, slot: usize, class: usize) -> *mut u8 {
        if slot < SLOTS {
            if let Some(p) = with_state(|s| s.caches[slot].pop(class)) {
                return p.as_ptr();
            }
        }
        self.alloc_slow(slot, class)
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, slot: usize, class: usize) -> *mut u8 {
        let size = class_size(class);
        if slot < SLOTS {
            let served = with_state(|s| {
                if !enter(s, slot) {
                    // Passed straight through: a miss, as in `passthrough_alloc`.
                    RETIRED[slot].misses.add_shared(1);
                    RETIRED[slot].upstream_allocations.add_shared(1);
                    return None;
                }
                let cache = &s.caches[slot];
                if let Some(p) = cache.pop(class).or_else(|| cache.refill(class)) {
                    return Some(p);
                }
                cache.counters.upstream_allocations.add_owned(1);
                None
            });
            if let Some(p) = served {
                return p.as_ptr();
            }
        }
        self.call_upstream(|up| up.allocate(size, BLOCK_ALIGN)).flatten().map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    #[cold]
    fn passthrough_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        self.count_passthrough();
        let p = self.call_upstream(|up| {
            if zeroed {
                up.allocate_zeroed(layout.size(), layout.align())
            } else {
                up.allocate(layout.size(), layout.align())
            }
        });
        p.flatten().map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    /// Calls `f` with the upstream, from a slow path of this slot: `None`, and the upstream not
    /// called, where it is a resource that this thread is calling already. Such a resource
    /// allocates (or frees) through a `HetAlloc` over itself (the global `HetAlloc` over a
    /// `SyncPool` whose pool keeps its tables in global memory), and the request that came back
    /// here would wait for ever on the lock its own thread holds. Refused instead: an allocation
    /// gets null (the resource's own bookkeeping is then out of memory, which hetmem's pools
    /// report as an error, and the outer request fails), and a free leaves its block with the
    /// resource, unused. Requests the thread's cache serves never get here: they do not call
    /// the resource.
    #[inline]
    fn call_upstream<T>(&self, f: impl FnOnce(&Upstream) -> T) -> Option<T> {
        let Upstream::Resource(resource) = self.upstream else {
            return Some(f(&self.upstream));
        };
        let outer = with_state(|s| s.serving.replace(Some(Serving(resource))));
        // Address and vtable, as upstreams compare: a resource and its first field are two.
        if outer.is_some_and(|o| core::ptr::eq(o.0, resource)) {
            report_reentry(resource);
            return None;
        }
        /// Puts the outer call's resource back, even if the resource panics.
        struct Restore(Option<Serving>);
        impl Drop for Restore {
            fn drop(&mut self) {
                with_state(|s| s.serving.set(self.0));
            }
        }
        let _restore = Restore(outer);
        Some(f(&self.upstream))
    }

    /// Counts a request passed straight through to the upstream: a miss, and a block asked of it.
    fn count_passthrough(&self) {
        if let Some(slot) = self.assigned() {
            RETIRED[slot].upstream_allocations.add_shared(1);
            RETIRED[slot].misses.add_shared(1);
        }
    }

    /// Zeroed memory for `layout` (non-zero size). Over memory the CPU cannot write, null, as
    /// from the upstream's own zeroing: the CPU must not zero a block there.
    pub(crate) fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if class_of(layout).is_none() || !self.upstream.host_accessible() {
            return self.passthrough_alloc(layout, true);
        }
        let p = self.alloc(layout);
        if !p.is_null() {
            // SAFETY: a fresh block of at least `layout.size()` bytes.
            unsafe { ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    /// Frees a block from [`Self::alloc`].
    ///
    /// # Safety
    /// `ptr` came from `alloc(layout)` (or a realloc to `layout`) on a `SlotRef` with the same
    /// upstream and is not used again.
    #[inline(always)]
    pub(crate) unsafe fn dealloc(&self, ptr: NonNull<u8>, layout: Layout) {
        if let Some(class) = class_of(layout) {
            // SAFETY: the caller's contract: a whole block of `class` from this upstream.
            return unsafe { self.dealloc_class(self.slot(), class, ptr) };
        }
        // SAFETY: the caller's contract, for a block passed through.
        unsafe { self.passthrough_dealloc(ptr, layout) }
    }

    /// Frees a block that passed straight through (no class holds its layout).
    ///
    /// # Safety
    /// As for [`Self::dealloc`].
    #[cold]
    #[inline(never)]
    unsafe fn passthrough_dealloc(&self, ptr: NonNull<u8>, layout: Layout) {
        if let Some(slot) = self.assigned() {
            RETIRED[slot].bytes_returned.add_shared(layout.size() as u64);
        }
        // SAFETY: passed through with exactly this layout.
        self.call_upstream(|up| unsafe { up.deallocate(ptr, layout.size(), layout.align()) });
    }

    /// Frees a block of `class` to the calling thread's cache of `slot` (as in
    /// [`Self::alloc_class`]).
    ///
    /// # Safety
    /// `ptr` came from `alloc_class(slot, class)`, or from `alloc` with a layout of `class`, on a
    /// `SlotRef` with the same upstream and is not used again.
    #[inline(always)]
    pub(crate) unsafe fn dealloc_class(&self, slot: usize, class: usize, ptr: NonNull<u8>) {
        // SAFETY: the caller's contract: a whole block of `class` from this upstream.
        if slot < SLOTS && with_state(|s| unsafe { s.caches[slot].push(class, ptr) }) {
            return;
        }
        // SAFETY: as above.
        unsafe { self.dealloc_slow(slot, class, ptr) }
    }

    /// # Safety
    /// As for [`Self::dealloc`].
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_slow(&self, slot: usize, class: usize, ptr: NonNull<u8>) {
        let size = class_size(class);
        if slot < SLOTS {
            let kept = with_state(|s| {
                if !enter(s, slot) {
                    RETIRED[slot].bytes_returned.add_shared(size as u64);
                    return false;
                }
                let cache = &s.caches[slot];
                // SAFETY: the caller's contract.
                if unsafe { cache.push(class, ptr) || cache.spill(class, ptr) } {
                    return true;
                }
                cache.counters.bytes_returned.add_owned(size as u64);
                false
            });
            if kept {
                return;
            }
        }
        // SAFETY: a whole block of this class from this upstream.
        self.call_upstream(|up| unsafe { up.deallocate(ptr, size, BLOCK_ALIGN) });
    }

    /// Resizes a block; null (with the old block intact) when out of memory, or when the block
    /// would have to move over memory the CPU cannot copy.
    ///
    /// # Safety
    /// As for [`Self::dealloc`]; `new_size` is non-zero and valid with `layout.align()`.
    pub(crate) unsafe fn realloc(&self, ptr: NonNull<u8>, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller promises `new_size` is valid with this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            (Some(a), Some(b)) if a == b => ptr.as_ptr(),
            _ if !self.upstream.host_accessible() => ptr::null_mut(),
            (None, None) => {
                // Counted as the allocation and the free it stands for, as a move between
                // classes is (the upstream may well do just that).
                self.count_passthrough();
                // SAFETY: both layouts pass through untouched; the caller's contract.
                let new = self
                    .call_upstream(|up| unsafe { up.reallocate(ptr, layout.size(), layout.align(), new_size) })
                    .flatten();
                if let (Some(_), Some(slot)) = (new, self.assigned()) {
                    RETIRED[slot].bytes_returned.add_shared(layout.size() as u64);
                }
                new.map_or(ptr::null_mut(), NonNull::as_ptr)
            }
            _ => {
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    // SAFETY: distinct live blocks, each at least `min` bytes long.
                    unsafe {
                        ptr::copy_nonoverlapping(ptr.as_ptr(), new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                new
            }
        }
    }

    /// The calling thread's cache statistics for this slot.
    pub(crate) fn thread_stats(&self) -> CacheStats {
        match self.existing() {
            Some(slot) => with_state(|s| s.caches[slot].stats()),
            None => CacheStats::default(),
        }
    }

    /// Statistics of this slot's thread caches, live and exited.
    pub(crate) fn stats(&self) -> CacheStats {
        let Some(slot) = self.existing() else {
            return CacheStats::default();
        };
        let list = THREADS.lock();
        let mut total = RETIRED[slot].snapshot(0);
        let mut state = list.head;
        while !state.is_null() {
            // SAFETY: linked states belong to live threads (they unlink under this lock before
            // their storage goes); only the atomic counters and byte counts are read.
            let cache = unsafe { &(*state).caches[slot] };
            total.add(&cache.stats());
            // SAFETY: as above; `next` is written only under this lock.
            state = unsafe { (*state).next.get() };
        }
        total
    }

    /// Checks the calling thread's cache of this slot ([`ThreadCache::check`]).
    pub(crate) fn check_thread(&self) -> crate::error::Result<()> {
        match self.existing() {
            Some(slot) => with_state(|s| s.caches[slot].check()),
            None => Ok(()),
        }
    }

    /// This slot's depot. The calling thread's caches start first if they have not: the first
    /// thread of the process to start gives every depot its default limit, so a limit read back
    /// before any request is the default, not the unset mark. (A limit set before that start is
    /// kept: the default is set only over the mark, see `Depot::set_default_limit`.)
    pub(crate) fn depot(&self) -> Option<&'static Depot> {
        start_for_depots();
        self.assigned().map(|slot| &DEPOTS[slot])
    }

    /// The byte limit of this slot's depot, claiming no slot: a handle without one reads the
    /// limit of the depot it would claim (a depot no slot owns keeps the default, as only
    /// [`Self::depot`] sets limits and it claims first), or 0 where it would get none (device
    /// memory, or every slot taken), since nothing is then cached. The calling thread's caches
    /// start first, as in [`Self::depot`].
    pub(crate) fn depot_limit(&self) -> usize {
        start_for_depots();
        let slot = self.existing().or_else(|| {
            let free = self.upstream.host_accessible().then(|| OWNERS.lock().iter().position(Option::is_none));
            free.flatten()
        });
        slot.map_or(0, |slot| DEPOTS[slot].limit())
    }

    /// This slot's depot if the slot exists ([`Self::existing`]): claims none, and starts
    /// nothing (a depot that was never used holds nothing to release).
    pub(crate) fn existing_depot(&self) -> Option<&'static Depot> {
        self.existing().map(|slot| &DEPOTS[slot])
    }

    /// Returns the calling thread's cached blocks of this slot (depot, then upstream).
    pub(crate) fn flush_thread(&self) {
        if let Some(slot) = self.existing() {
            with_state(|s| {
                if s.phase.get() == ACTIVE {
                    flush_cache(&s.caches[slot]);
                }
            });
        }
    }

    /// Sets the calling thread's configuration for this slot's tier; refused as by
    /// [`set_thread_config`].
    pub(crate) fn set_thread_config(&self, config: Option<CacheConfig>) -> Result<()> {
        with_state(|s| {
            if !ensure_active(s) {
                return Err(NO_CACHES);
            }
            match self.tier {
                Tier::Alloc => s.own_config.set(config),
                Tier::Frames => s.frame_config.set(config),
            }
            reapply(s, self.tier);
            Ok(())
        })
    }
}

/// Makes sure the thread is active and the slot's cache ready; `false` if requests must go
/// straight upstream (the thread is starting its cache or has exited).
#[inline]
fn enter(s: &ThreadState, slot: usize) -> bool {
    if !ensure_active(s) {
        return false;
    }
    if !s.caches[slot].is_ready() {
        prepare_slot(s, slot);
    }
    true
}

fn ensure_active(s: &ThreadState) -> bool {
    match s.phase.get() {
        ACTIVE => true,
        FRESH => start_thread(s),
        _ => false,
    }
}

/// A resource a thread is calling (only compared, never called through).
#[derive(Clone, Copy)]
struct Serving(&'static dyn crate::MemoryResource);

/// Says once per process, on stderr, that a resource's request came back to the `HetAlloc` over
/// it and was refused (see [`SlotRef::call_upstream`]): the outer request's failure alone
/// ("memory allocation failed") would not say why. Written without allocating.
#[cold]
fn report_reentry(resource: &dyn crate::MemoryResource) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    if REPORTED.swap(true, Ordering::Relaxed) {
        return;
    }
    crate::cache::os::write_stderr(&[
        b"hetmem: refused a request that resource `",
        resource.name().as_bytes(),
        b"` made through the HetAlloc over it while serving it (it would wait on itself); \
          a resource under a HetAlloc must not allocate through it\n",
    ]);
}

/// The thread's first request: register the exit guard and the thread, pick the role.
#[cold]
fn start_thread(s: &ThreadState) -> bool {
    s.phase.set(BUSY);
    // The role first: a thread that gets no cache still reads its default.
    s.role.set(default_role());
    if EXIT.try_with(|_| ()).is_err() {
        // Past this thread's destructors: no cache for it.
        s.phase.set(EXITED);
        return false;
    }
    #[cfg(unix)]
    if !backstop::arm() {
        // The guard alone may never run (see `backstop`): a listed state must be unlisted.
        s.phase.set(EXITED);
        return false;
    }
    #[cfg(windows)]
    win::arm();
    // Fork handlers for these caches (see `fork`). A failure (ENOMEM) leaves forks as unsafe as
    // without them; the caches work.
    #[cfg(unix)]
    let _ = crate::fork::watch();
    set_default_depot_limits();
    let mut list = THREADS.lock();
    s.next.set(list.head);
    list.head = s;
    list.live += 1;
    drop(list);
    s.phase.set(ACTIVE);
    true
}

/// Starts the calling thread's caches if they have not started, which gives the depots their
/// default limits ([`set_default_depot_limits`]); a thread that can have no caches (past its
/// exit, say) gives them those limits itself: it may be the process's first, and a depot must
/// not read the unset mark (no limit at all).
fn start_for_depots() {
    with_state(|s| {
        if !ensure_active(s) && s.phase.get() == EXITED {
            set_default_depot_limits();
        }
    });
}

/// Gives every depot its default limit, once per process: at the first start of a thread's
/// caches, or where a thread that can have none reads a limit. Reading the defaults may
/// allocate: the calling thread's requests must go straight upstream meanwhile (it is busy, or
/// its caches are gone).
fn set_default_depot_limits() {
    // Acquire, against the release below: a thread that finds the flag set reads the limits
    // the setter stored (relaxed, a weakly ordered processor could show it a depot still UNSET,
    // that is without a limit).
    if !DEPOT_LIMITS_SET.load(Ordering::Acquire) {
        // The flag last: a child forked before it is set sets the limits again.
        let limit = depot_limit();
        for d in &DEPOTS {
            // Not over a limit set through `HetAlloc::set_depot_limit` first, or meanwhile.
            d.set_default_limit(limit);
        }
        DEPOT_LIMITS_SET.store(true, Ordering::Release);
    }
}

/// The role a thread starts with.
fn default_role() -> ThreadRole {
    if super::os::is_main_thread() {
        ThreadRole::Main
    } else {
        ThreadRole::Worker
    }
}

/// `fork()` with the caches in use: every lock of theirs is taken before the fork and given back
/// after it, in the parent and in the child, so the child never starts with a lock that another
/// thread of the parent held (that thread does not run there: the child would wait for ever).
/// Meanwhile the forking thread's own requests go straight upstream (another fork handler may
/// allocate). In the child the forking thread is the only one: the others' caches are lost to it
/// (their blocks stay allocated in the child's copy of the memory), and the list of live threads
/// keeps only the forking thread. Caches and depots over a [`MemoryResource`] drop what they hold,
/// without freeing it: the resource's memory may be shared, and the parent may hand the same
/// blocks out.
///
/// The handlers are registered by [`crate::fork::watch`], which the first thread's first request
/// calls; they may run twice per fork (a child forked while its parent was registering registers
/// again), so each does its work once per forking thread. Two threads that fork at once take
/// turns: the second one's `prepare` waits for the locks until the first one's fork is over.
///
/// Caches and depots made by hand ([`ThreadCache::new`], [`ThreadCache::with_depot`]) meet no
/// handler: each drops what it held before the fork, unfreed, at its first call in the child
/// (as the typed pools do); a depot made by hand also releases the locks that threads of the
/// parent held at the fork (see [`Depot`](super::Depot)). Not covered: a fork from a signal
/// handler that interrupted one of these locks' holders (the prepare handler would wait for it).
///
/// [`MemoryResource`]: crate::MemoryResource
#[cfg(unix)]
pub(crate) mod fork {
    use super::{with_state, Upstream, BUSY, DEPOTS, OWNERS, SLOTS, THREADS};
    use crate::cache::config;
    use core::cell::Cell;
    use core::ptr;

    std::thread_local! {
        /// The forking thread's phase, kept while its requests go straight upstream.
        static PHASE: Cell<u8> = const { Cell::new(BUSY) };
        /// Whether this thread's `prepare` holds the locks; makes the handlers safe to run twice
        /// per fork. Per thread: another thread forking meanwhile must wait for the locks, not
        /// take this thread's for its own (and give them back under it).
        static HELD: Cell<bool> = const { Cell::new(false) };
    }

    /// Every lock, in one order (no code holds one of them while it takes another, or while
    /// it allocates, so any order is deadlock-free).
    pub(crate) fn prepare() {
        if HELD.with(Cell::get) {
            return;
        }
        with_state(|s| PHASE.with(|p| p.set(s.phase.replace(BUSY))));
        config::lock_all();
        OWNERS.lock_and_keep();
        THREADS.lock_and_keep();
        DEPOTS.iter().for_each(|d| d.lock_all());
        HELD.with(|h| h.set(true));
    }

    /// Releases what `prepare` took and gives the thread its phase back.
    ///
    /// # Safety
    /// `prepare` took the locks before this fork, in this thread (the child's copy of it);
    /// `HELD` was cleared by the caller.
    unsafe fn release(child: bool) {
        // SAFETY: `prepare` took every one of these and no guard of them is live: the handlers
        // hold none.
        unsafe {
            DEPOTS.iter().rev().for_each(|d| d.unlock_all());
            THREADS.force_unlock();
            OWNERS.force_unlock();
            config::unlock_all(child);
        }
        with_state(|s| s.phase.set(PHASE.with(Cell::get)));
    }

    pub(crate) fn parent() {
        if HELD.with(|h| h.replace(false)) {
            // SAFETY: the parent handler runs after `prepare`, on the thread that forked.
            unsafe { release(false) };
        }
    }

    pub(crate) fn child() {
        if !HELD.with(|h| h.replace(false)) {
            return;
        }
        // SAFETY: `prepare` took these locks for this thread; the references end before the
        // locks are released below.
        let (list, owners) = unsafe { (THREADS.kept_value(), OWNERS.kept_value()) };
        with_state(|s| {
            // The forking thread alone is live here; it stays listed if it was.
            let me: *const super::ThreadState = s;
            let mut at = list.head;
            let mut steps = 0;
            while !at.is_null() && at != me && steps <= list.live {
                // SAFETY: linked states are in the (copied) memory of the parent's threads,
                // linked and unlinked only under the lock `prepare` holds.
                at = unsafe { (*at).next.get() };
                steps += 1;
            }
            let linked = at == me;
            s.next.set(ptr::null());
            list.head = if linked { me } else { ptr::null() };
            list.live = usize::from(linked);
            for slot in 0..SLOTS {
                if matches!(owners[slot], Some(o) if matches!(o.upstream, Upstream::Resource(_))) {
                    // SAFETY: `prepare` holds the depot's locks.
                    unsafe { DEPOTS[slot].forget_all_locked() };
                    s.caches[slot].forget_all();
                }
                // What the depot holds now is the child's: its first use here must not drop it.
                // SAFETY: as above.
                unsafe { DEPOTS[slot].adopt_locked() };
            }
        });
        // SAFETY: as in `parent`, for the child's copy of the thread.
        unsafe { release(true) };
    }
}

/// Gives a slot's cache on this thread its upstream, depot and limits.
#[cold]
fn prepare_slot(s: &ThreadState, slot: usize) {
    let Some(owner) = OWNERS.lock()[slot] else {
        return;
    };
    s.caches[slot].attach(owner.upstream, &DEPOTS[slot]);
    let config = config_for(s, owner.tier);
    s.caches[slot].apply(&config);
}

/// The limits a tier's caches on this thread should have. Reading the defaults may allocate,
/// so the thread is busy meanwhile.
fn config_for(s: &ThreadState, tier: Tier) -> CacheConfig {
    let phase = s.phase.replace(BUSY);
    let config = match tier {
        Tier::Alloc => s.own_config.get().unwrap_or_else(|| CacheConfig::for_role(s.role.get())),
        Tier::Frames => s.frame_config.get().unwrap_or_else(CacheConfig::for_frames),
    };
    s.phase.set(phase);
    config
}

/// Applies the current limits to every ready cache of `tier` on this thread, trimming.
fn reapply(s: &ThreadState, tier: Tier) {
    let owners = *OWNERS.lock();
    let config = config_for(s, tier);
    for (slot, owner) in owners.iter().enumerate() {
        let cache = &s.caches[slot];
        if owner.is_some_and(|o| o.tier == tier) && cache.is_ready() {
            cache.apply(&config);
            let chains = cache.detach(false);
            // SAFETY: detached blocks came whole from this slot's upstream.
            let bytes = unsafe { chains.free(&cache.upstream()) };
            cache.counters.bytes_returned.add_owned(bytes);
        }
    }
}

fn flush_cache(cache: &ThreadCache) {
    let chains = cache.detach(true);
    // SAFETY: detached blocks came whole from this cache's upstream.
    let bytes = unsafe { chains.free(&cache.upstream()) };
    cache.counters.bytes_returned.add_owned(bytes);
}

/// The exit guard's work: no more caching on this thread; everything cached goes back.
fn retire_thread(s: &ThreadState) {
    if s.phase.replace(EXITED) != ACTIVE {
        return;
    }
    // Every cache stops caching before any is returned: what one returns may come back to
    // another of this thread (through a global `HetAlloc`, see `flush_thread`), and one returned
    // already would keep it, with no one left to return it. So no order of flushes is needed.
    for cache in &s.caches {
        cache.retire();
    }
    for cache in &s.caches {
        if cache.is_ready() {
            flush_cache(cache);
        }
    }
    let mut list = THREADS.lock();
    let me: *const ThreadState = s;
    let mut link: *const ThreadState = list.head;
    if link == me {
        list.head = s.next.get();
    } else {
        while !link.is_null() {
            // SAFETY: linked states are live (see `THREADS`); we hold the lock.
            let next = unsafe { (*link).next.get() };
            if next == me {
                // SAFETY: as above.
                unsafe { (*link).next.set(s.next.get()) };
                break;
            }
            link = next;
        }
    }
    list.live -= 1;
    for (slot, cache) in s.caches.iter().enumerate() {
        RETIRED[slot].add_shared(&cache.stats());
        cache.counters.reset();
    }
}

/// Whether the calling thread's caches were returned at its exit (or it could have none).
#[cfg(test)]
pub(crate) fn thread_exited() -> bool {
    with_state(|s| s.phase.get() == EXITED)
}

/// Threads whose caches are live now.
pub(crate) fn live_threads() -> usize {
    THREADS.lock().live
}

/// What the calls that set a thread's limits return where the thread has no caches to apply
/// them to.
const NO_CACHES: Error = Error::Unsupported(
    "the calling thread has no caches: they were returned at its exit (or are being started, or it could have none)",
);

/// Gives the calling thread `role` and applies that role's limits now.
///
/// Refused with [`Error::Unsupported`] where the thread has no caches to apply them to: once
/// they were returned at its exit (from a later thread-local destructor, say; its requests go
/// straight upstream and [`thread_config`] reads [`CacheConfig::disabled`]), or where it could
/// have none. The role is then not kept.
pub fn set_thread_role(role: ThreadRole) -> Result<()> {
    with_state(|s| {
        if !ensure_active(s) {
            return Err(NO_CACHES);
        }
        s.role.set(role);
        reapply(s, Tier::Alloc);
        Ok(())
    })
}

/// The calling thread's role: the last one [`set_thread_role`] gave it, else its default
/// ([`ThreadRole::Main`] on the process's main thread where the platform tells it apart, else
/// [`ThreadRole::Worker`]). Past the thread's exit, once its caches were returned, it still reads
/// the role the thread had then (on every platform), though the caches' limits are
/// [`CacheConfig::disabled`] (see [`thread_config`]) and a new role is refused.
pub fn thread_role() -> ThreadRole {
    with_state(|s| {
        ensure_active(s);
        s.role.get()
    })
}

/// Gives the calling thread its own limits for its `HetAlloc` caches (`None`: back to its
/// role's), applied at once. Refused with [`Error::Unsupported`], keeping nothing, where the
/// thread has no caches (see [`set_thread_role`]).
pub fn set_thread_config(config: Option<CacheConfig>) -> Result<()> {
    with_state(|s| {
        if !ensure_active(s) {
            return Err(NO_CACHES);
        }
        s.own_config.set(config);
        reapply(s, Tier::Alloc);
        Ok(())
    })
}

/// The limits the calling thread's `HetAlloc` caches have now: [`CacheConfig::disabled`] once
/// they were returned at the thread's exit (or where the thread could not have any), when every
/// request goes straight upstream.
pub fn thread_config() -> CacheConfig {
    with_state(|s| {
        if !ensure_active(s) && s.phase.get() == EXITED {
            return CacheConfig::disabled();
        }
        config_for(s, Tier::Alloc)
    })
}

/// Returns every block the calling thread has cached, in every tier (to the depots, then
/// upstream). The caches stay usable.
pub fn flush_thread() {
    with_state(|s| {
        if s.phase.get() != ACTIVE {
            return;
        }
        // What a cache returns may come back to another cache of this thread: a cache over the
        // global allocator frees through it, and a resource's `deallocate` may too; when that is
        // a `HetAlloc`, the blocks land in its cache here. So caches over the global allocator
        // go first, then those over a resource, and the system allocator's last (nothing it
        // frees comes back). The global `HetAlloc` may be over a resource itself: its cache may
        // be flushed before another resource's fills it, so the resource caches go again while
        // one holds blocks. (That chain ends there: a resource under the global allocator that
        // freed through it would call itself.)
        let ready = |over: fn(Upstream) -> bool| {
            s.caches.iter().map(|c| &**c).filter(move |c| c.is_ready() && over(c.upstream()))
        };
        ready(|u| u == Upstream::Global).for_each(flush_cache);
        for _ in 0..SLOTS {
            let mut flushed = false;
            for cache in ready(|u| matches!(u, Upstream::Resource(_))).filter(|c| c.bytes_cached() > 0) {
                flush_cache(cache);
                flushed = true;
            }
            if !flushed {
                break;
            }
        }
        ready(|u| u == Upstream::System).for_each(flush_cache);
    });
}

/// Called when `role`'s registered configuration changes.
pub(crate) fn reapply_role_config(role: ThreadRole) {
    with_state(|s| {
        if s.phase.get() == ACTIVE && s.role.get() == role && s.own_config.get().is_none() {
            reapply(s, Tier::Alloc);
        }
    });
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use core::alloc::GlobalAlloc;
    use std::sync::mpsc;

    fn phase() -> u8 {
        with_state(|s| s.phase.get())
    }

    /// The system allocator's depot keeps its batches in a forked child: the fork handlers hold
    /// its locks through the fork and leave its batches there (its memory is the child's own
    /// copy), so its first use in the child must not start it afresh and leak them.
    #[cfg(all(feature = "std", not(loom), target_has_atomic = "64"))]
    #[test]
    fn the_system_depot_keeps_its_batches_in_a_forked_child() {
        use crate::cache::depot::set_link;
        use crate::cache::size_class::{batch_len, MAX_BUCKETS};
        crate::fork::watch().unwrap();
        let depot = &DEPOTS[SLOT_SYSTEM as usize];
        // The largest class, which the other tests' requests are least likely to take meanwhile.
        let class = MAX_BUCKETS - 1;
        let layout = Layout::from_size_align(class_size(class), BLOCK_ALIGN).unwrap();
        let mut head = ptr::null_mut();
        for _ in 0..batch_len(class) {
            // SAFETY: a layout of non-zero size.
            let block = unsafe { std::alloc::System.alloc(layout) };
            assert!(!block.is_null());
            // SAFETY: a fresh block of at least 16 bytes, aligned to 16.
            unsafe { set_link(block, 0, head) };
            head = block;
        }
        // SAFETY: a batch of `class` from the system allocator, which this depot serves.
        assert!(unsafe { depot.try_push(class, NonNull::new(head).unwrap()) }, "the depot's limit refused a batch");
        let child = crate::testing::in_a_forked_child(|| {
            let held = depot.stats().bytes_cached;
            // The first use in the child: it must find the batches the handlers kept.
            let checked = depot.check().is_ok();
            held > 0 && depot.stats().bytes_cached == held && checked
        });
        assert!(child, "the forked child's first use of the system depot dropped the batches the fork handlers kept");
    }

    /// Two threads fork at once: the second one's handlers must wait for the first one's locks,
    /// not release them under it, and each thread gets its own phase back.
    #[test]
    fn concurrent_forks_each_take_the_locks_and_restore_their_own_phase() {
        fn start_cache() {
            let a = crate::cache::HetAlloc::new();
            // SAFETY: a non-zero layout, freed once.
            unsafe { a.dealloc(a.alloc(Layout::new::<u64>()), Layout::new::<u64>()) };
            assert_eq!(phase(), ACTIVE);
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        let (prepared_tx, prepared_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        // Both threads have live caches before either forks.
        let second = std::thread::spawn(move || {
            start_cache();
            ready_tx.send(()).unwrap();
            prepared_rx.recv().unwrap();
            fork::prepare();
            fork::parent();
            assert_eq!(phase(), ACTIVE, "the second forking thread got its phase back");
        });
        ready_rx.recv().unwrap();
        let first = std::thread::spawn(move || {
            start_cache();
            fork::prepare();
            prepared_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            assert!(THREADS.is_locked(), "the first fork's locks are held until its parent handler");
            fork::parent();
            assert_eq!(phase(), ACTIVE, "the first forking thread got its phase back");
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        go_tx.send(()).unwrap();
        let first = first.join();
        let second = second.join();
        assert!(first.is_ok() && second.is_ok());
    }
}
