//! The coalescing free-space manager under the span allocators: best fit over 4 KiB units, with
//! split and merge, so space freed by one size serves any other.
//!
//! ```text
//! descriptor table   one 16-byte Desc per unit (outside the data, so user bytes never hold
//!                    allocator state): a run's first unit says FREE or USED and its length, its
//!                    last unit (FREE_TAIL / USED_TAIL) lets the next run find it when merging
//! arena              the units themselves, 4096-aligned
//! FreeSpaceState     behind an owner-recording Mutex: bins of free runs (exact for 1..=64 units,
//!                    four per doubling above), a bitmap of non-empty bins, counters
//! ```
//!
//! Crash safety: every change writes the run's first descriptor last, so the table always reads
//! as a valid sequence of runs. A process that dies holding the mutex is detected through the
//! [`liveness`](crate::liveness) hook; the next one recovers the mutex and rebuilds the bins
//! (and merges neighbours) from the table.

use crate::error::{Error, Result};
use crate::region::Region;
use crate::sync::{Mutex, MutexGuard};

use super::span::Mem;

/// Bytes per unit.
pub(crate) const UNIT: u64 = 4096;
const NONE: u32 = u32::MAX;
const EXACT_BINS: u32 = 64;
const BINS: usize = 64 + 4 * 27;
// The bitmap's last word has bits past the last bin, which `check` requires clear.
const _: () = assert!(BINS / 64 == 2 && BINS % 64 != 0);

const K_FREE: u32 = 0x4652_4545; // "FREE"
const K_FREE_TAIL: u32 = 0x4654_4149; // "FTAI"
const K_USED: u32 = 0x5553_4544; // "USED"
const K_USED_TAIL: u32 = 0x5554_4149; // "UTAI"
const K_INNER: u32 = 0x494E_4E52; // "INNR": inside a run, not its start

/// One unit's descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Desc {
    kind: u32,
    len: u32,
    /// Free runs: previous run in the bin. Used runs: what the run is (the caller's tag).
    pub(crate) tag: u32,
    /// Free runs: next run in the bin. Used runs: the caller's word (an owner).
    pub(crate) aux: u32,
}

impl Desc {
    /// The run's length in units.
    pub(crate) fn len(&self) -> u32 {
        self.len
    }
}

/// The mutable part, in the region behind a mutex.
#[repr(C)]
pub(crate) struct FreeSpaceState {
    bins: [u32; BINS],
    bitmap: [u64; 3],
    free_units: u64,
    peak_used_units: u64,
    /// Counters of the caller's large blocks, kept here because they change under this lock.
    pub(crate) large: LargeCounters,
    /// How many times a dead holder's lock was recovered.
    pub(crate) recoveries: u64,
}

/// Live and total counts of blocks served straight from the free-space manager.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LargeCounters {
    pub(crate) live: u64,
    pub(crate) live_bytes: u64,
    pub(crate) live_units: u64,
    pub(crate) allocations: u64,
    pub(crate) frees: u64,
}

/// Where the table and the arena lie in a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FreeSpaceLayout {
    pub(crate) table: u64,
    pub(crate) arena: u64,
    pub(crate) units: u32,
}

impl FreeSpaceLayout {
    /// Fits a table and as many units as possible into `[start, end)`.
    pub(crate) fn plan(start: u64, end: u64) -> Result<Self> {
        let table = start.next_multiple_of(64);
        let room = end.saturating_sub(table);
        let fits = |units: u64| (table + units * 16).next_multiple_of(UNIT) + units * UNIT <= end;
        let mut units = (room / (UNIT + 16)).min(u32::MAX as u64 - 1);
        // Down to two units at most (the arena's rounding costs at most one), never past: a
        // range whose table start rounds up past its end fits no units at all.
        while units >= 2 && !fits(units) {
            units -= 1;
        }
        if units < 2 {
            return Err(Error::InvalidSize {
                size: end.saturating_sub(start),
                reason: "region too small for a span allocator (needs a few pages)",
            });
        }
        let arena = (table + units * 16).next_multiple_of(UNIT);
        Ok(FreeSpaceLayout { table, arena, units: units as u32 })
    }

    /// Checks a layout read back from a region against the region's bounds.
    pub(crate) fn validate(&self, region: &Region, header_end: u64) -> Result<()> {
        // The bounds first: once both ranges lie in the region, no sum here can overflow.
        let ok = region.contains(self.table, self.units as u64 * 16)
            && region.contains(self.arena, self.units as u64 * UNIT)
            && self.table >= header_end
            && self.units >= 2
            && self.arena % UNIT == 0
            && self.arena >= self.table + self.units as u64 * 16;
        if !ok {
            return Err(corrupt(self.table, "free-space layout outside the region"));
        }
        Ok(())
    }

    /// Bytes the arena holds.
    pub(crate) fn bytes(&self) -> u64 {
        self.units as u64 * UNIT
    }

    /// The offset of unit `index`.
    pub(crate) fn unit_offset(&self, index: u32) -> u64 {
        self.arena + index as u64 * UNIT
    }

    /// The unit holding `offset`, if it lies in the arena.
    pub(crate) fn unit_of(&self, offset: u64) -> Option<u32> {
        let rel = offset.checked_sub(self.arena)?;
        let unit = rel / UNIT;
        (unit < self.units as u64).then_some(unit as u32)
    }
}

fn corrupt(offset: u64, detail: &'static str) -> Error {
    Error::Corrupt { structure: "free-space manager", offset, detail }
}

fn bin_of(len: u32) -> usize {
    if len <= EXACT_BINS {
        return len as usize - 1;
    }
    let top = 31 - (len - 1).leading_zeros(); // floor(log2(len - 1)) >= 6
    let k = top - 6;
    let j = ((len - 1 - (64 << k)) >> (k + 4)).min(3);
    (EXACT_BINS + 4 * k + j) as usize
}

/// The manager: a view of the table, the arena and the state in a region.
pub(crate) struct FreeSpace {
    /// Keeps the mapping the pointers below point into alive.
    _region: Region,
    layout: FreeSpaceLayout,
    state: *const Mutex<FreeSpaceState>,
    table: *mut Desc,
    /// For repairs after a dead holder: the arena, the whole region, the first slot chunk.
    arena: Mem,
    whole: Mem,
    chunks: u64,
}

// SAFETY: the pointers point into `region`, which the value keeps mapped; the table is only
// touched under the state's mutex.
unsafe impl Send for FreeSpace {}
// SAFETY: as above.
unsafe impl Sync for FreeSpace {}

impl FreeSpace {
    /// A view of a manager whose state is at `state_offset`; `chunks` is the allocator's first
    /// slot chunk (0 if it has none), so runs a dead holder left half made can be told apart.
    ///
    /// # Safety
    /// A `Mutex<FreeSpaceState>` lives at `state_offset` (or is written by [`FreeSpace::init`]
    /// before any other use) for as long as the region is mapped.
    pub(crate) unsafe fn new(region: Region, state_offset: u64, layout: FreeSpaceLayout, chunks: u64) -> Result<Self> {
        let state = region
            .ptr(state_offset, core::mem::size_of::<Mutex<FreeSpaceState>>() as u64)?
            .cast::<Mutex<FreeSpaceState>>();
        if state.align_offset(core::mem::align_of::<Mutex<FreeSpaceState>>()) != 0 {
            return Err(corrupt(state_offset, "state misaligned"));
        }
        let table = region.ptr(layout.table, layout.units as u64 * 16)?.cast::<Desc>();
        let arena = Mem::of(&region, layout.arena, layout.arena + layout.bytes())?;
        let whole = Mem::of(&region, region.offset(), region.end())?;
        Ok(FreeSpace { _region: region, layout, state, table, arena, whole, chunks })
    }

    /// The layout.
    pub(crate) fn layout(&self) -> &FreeSpaceLayout {
        &self.layout
    }

    /// Writes a fresh state: the whole arena is one free run.
    ///
    /// # Safety
    /// No other thread or process uses the manager yet.
    pub(crate) unsafe fn init(&self) {
        // SAFETY: `new` checked the state's bounds and alignment; no one else sees it yet.
        unsafe {
            (self.state as *mut Mutex<FreeSpaceState>).write(Mutex::new(FreeSpaceState {
                bins: [NONE; BINS],
                bitmap: [0; 3],
                free_units: 0,
                peak_used_units: 0,
                large: LargeCounters::default(),
                recoveries: 0,
            }));
        }
        let mut g = self.lock();
        g.write_free(0, self.layout.units);
        g.st.free_units = self.layout.units as u64;
    }

    fn mutex(&self) -> &Mutex<FreeSpaceState> {
        // SAFETY: see `new`: in bounds, aligned, initialised, mutated only through the mutex.
        unsafe { &*self.state }
    }

    /// Takes the lock. A holder that is a dead process is replaced; the bins are rebuilt from
    /// the table and runs it left half made are returned ([`repair_runs`]) before the guard is
    /// handed out.
    ///
    /// [`repair_runs`]: super::large::repair_runs
    pub(crate) fn lock(&self) -> FreeSpaceGuard<'_> {
        let mut recovered = false;
        let st = self.mutex().lock_or_recover(|st| {
            // Shared memory another process may have written: it wraps rather than panic.
            st.recoveries = st.recoveries.wrapping_add(1);
            recovered = true;
        });
        let mut g = FreeSpaceGuard { fs: self, st };
        if recovered {
            // A table that cannot be rebuilt is reported by `check`; the guard is still handed
            // out so that callers see errors, not a hang.
            if g.rebuild().is_ok() {
                super::large::repair_runs(&mut g, &self.arena, &self.whole, self.chunks);
            }
        }
        g
    }
}

/// The locked manager.
pub(crate) struct FreeSpaceGuard<'a> {
    fs: &'a FreeSpace,
    pub(crate) st: MutexGuard<'a, FreeSpaceState>,
}

impl FreeSpaceGuard<'_> {
    /// The layout of the free space this guard locks.
    pub(crate) fn layout(&self) -> &FreeSpaceLayout {
        self.fs.layout()
    }

    fn units(&self) -> u32 {
        self.fs.layout.units
    }

    /// The descriptor of unit `i` (`i` < units).
    pub(crate) fn desc(&self, i: u32) -> Desc {
        assert!(i < self.units());
        // SAFETY: the table has `units` descriptors (checked in `FreeSpace::new`); we hold the lock.
        unsafe { self.fs.table.add(i as usize).read() }
    }

    fn set(&mut self, i: u32, d: Desc) {
        assert!(i < self.units());
        // SAFETY: as in `desc`.
        unsafe { self.fs.table.add(i as usize).write(d) }
        crate::crash::point();
    }

    /// Writes descriptors for a free run (tail first, head last) without binning it.
    fn write_free(&mut self, head: u32, len: u32) {
        if len > 1 {
            self.set(head + len - 1, Desc { kind: K_FREE_TAIL, len, tag: NONE, aux: NONE });
        }
        self.set(head, Desc { kind: K_FREE, len, tag: NONE, aux: NONE });
        self.link(head, len);
    }

    fn link(&mut self, head: u32, len: u32) {
        let bin = bin_of(len);
        // The bins are in shared memory: a head that is no free run at the head of a bin is
        // dropped, not relinked (`check` reports the runs lost with it; a recovery's `rebuild`
        // finds them again).
        let first = self.free_link(self.st.bins[bin], |f| f.tag == NONE && f.len != 0 && bin_of(f.len) == bin);
        let mut d = self.desc(head);
        d.tag = NONE;
        d.aux = first.map_or(NONE, |(f, _)| f);
        self.set(head, d);
        if let Some((at, mut f)) = first {
            f.tag = head;
            self.set(at, f);
        }
        self.st.bins[bin] = head;
        self.st.bitmap[bin / 64] |= 1 << (bin % 64);
    }

    fn unlink(&mut self, head: u32) {
        let d = self.desc(head);
        let bin = bin_of(d.len);
        // The links are shared memory: a neighbour is relinked only if it is a free run that
        // links back here. (Else a link a peer broke would rewrite whatever run it names: a used
        // run's tag and owner word.)
        let prev = self.free_link(d.tag, |p| p.aux == head);
        let next = self.free_link(d.aux, |n| n.tag == head);
        match prev {
            Some((at, mut p)) => {
                p.aux = next.map_or(NONE, |(n, _)| n);
                self.set(at, p);
            }
            None if self.st.bins[bin] == head => self.st.bins[bin] = next.map_or(NONE, |(n, _)| n),
            None => {}
        }
        if let Some((at, mut n)) = next {
            n.tag = prev.map_or(NONE, |(p, _)| p);
            self.set(at, n);
        }
        if self.st.bins[bin] == NONE {
            self.st.bitmap[bin / 64] &= !(1 << (bin % 64));
        }
    }

    /// Unit `at` and its descriptor, if `at` is a free run's head for which `back` holds.
    fn free_link(&self, at: u32, back: impl Fn(&Desc) -> bool) -> Option<(u32, Desc)> {
        if at >= self.units() {
            return None;
        }
        let d = self.desc(at);
        (d.kind == K_FREE && back(&d)).then_some((at, d))
    }

    fn next_bin(&self, from: usize) -> Option<usize> {
        let mut word = from / 64;
        let mut bits = self.st.bitmap.get(word)? & (!0u64 << (from % 64));
        loop {
            if bits != 0 {
                // Bits past the last bin are shared memory gone bad: no bin is there.
                let bin = word * 64 + bits.trailing_zeros() as usize;
                return (bin < BINS).then_some(bin);
            }
            word += 1;
            bits = *self.st.bitmap.get(word)?;
        }
    }

    /// The best-fitting free run of at least `len` units.
    fn find(&self, len: u32) -> Option<u32> {
        const SCAN: usize = 32;
        let mut bin = self.next_bin(bin_of(len))?;
        loop {
            let mut best: Option<(u32, u32)> = None;
            let mut at = self.st.bins[bin];
            for _ in 0..SCAN {
                if at == NONE || at >= self.units() {
                    break;
                }
                let d = self.desc(at);
                // The bins and the table are shared memory: a bin entry that is no free run
                // lying in the table ends the bin's scan (`check` reports it; `rebuild` repairs).
                if d.kind != K_FREE || d.len == 0 || d.len > self.units() - at {
                    break;
                }
                if d.len >= len && best.is_none_or(|(_, l)| d.len < l) {
                    best = Some((at, d.len));
                    if d.len == len {
                        break;
                    }
                }
                at = d.aux;
            }
            if let Some((head, _)) = best {
                return Some(head);
            }
            bin = self.next_bin(bin + 1)?;
        }
    }

    /// Takes a run of `len` units, tagging it `tag`/`aux`; `None` when no free run is that long.
    pub(crate) fn alloc(&mut self, len: u32, tag: u32, aux: u32) -> Option<u32> {
        if len == 0 || len > self.units() {
            return None;
        }
        let head = self.find(len)?;
        let have = self.desc(head).len;
        self.unlink(head);
        if have > len {
            self.write_free(head + len, have - len);
        }
        self.write_used(head, len, tag, aux);
        // The counters are only reported and checked (another process may have written them).
        self.st.free_units = self.st.free_units.wrapping_sub(len as u64);
        let used = (self.units() as u64).saturating_sub(self.st.free_units);
        self.st.peak_used_units = self.st.peak_used_units.max(used);
        Some(head)
    }

    /// The used run starting at unit `head`, or an error naming what is wrong.
    pub(crate) fn used_run(&self, head: u32) -> Result<Desc> {
        if head >= self.units() {
            return Err(corrupt(head as u64, "unit outside the arena"));
        }
        let d = self.desc(head);
        if d.kind != K_USED || d.len == 0 || d.len > self.units() - head {
            return Err(Error::InvalidFree {
                offset: self.fs.layout.unit_offset(head),
                reason: "not the start of a used run",
            });
        }
        Ok(d)
    }

    /// Returns the used run at `head` and merges it with free neighbours.
    pub(crate) fn free(&mut self, head: u32) -> Result<()> {
        let d = self.used_run(head)?;
        let (mut start, mut len) = (head, d.len);
        let next = head + d.len;
        if next < self.units() {
            let n = self.desc(next);
            if n.kind == K_FREE && n.len >= 1 && n.len <= self.units() - next {
                self.unlink(next);
                len += n.len;
            }
        }
        if head > 0 {
            if let Some(prev) = self.free_run_ending_at(head - 1) {
                let p = self.desc(prev);
                self.unlink(prev);
                start = prev;
                len += p.len;
            }
        }
        self.st.free_units = self.st.free_units.wrapping_add(d.len as u64);
        self.write_free(start, len);
        if start != head && head != start + len - 1 {
            // After the merged run is committed: the old start is no longer a run start, so
            // freeing it again is refused. (Where it is the new run's last unit, its tail
            // descriptor already says so.)
            self.set(head, Desc { kind: K_INNER, len: 0, tag: NONE, aux: NONE });
        }
        Ok(())
    }

    /// Resizes the used run at `head` to `len` units in place: shrinking frees the tail, growing
    /// takes units from a free run right after it. Returns whether it could.
    pub(crate) fn resize(&mut self, head: u32, len: u32) -> Result<bool> {
        let d = self.used_run(head)?;
        if len == 0 {
            return Ok(false);
        }
        if len == d.len {
            return Ok(true);
        }
        let next = head + d.len;
        if len < d.len {
            // Commit the shorter run first; the cut-off tail becomes a run of its own, then free.
            let cut = d.len - len;
            self.set(head + len, Desc { kind: K_USED, len: cut, tag: d.tag, aux: d.aux });
            self.write_used(head, len, d.tag, d.aux);
            self.free(head + len)?;
            return Ok(true);
        }
        let extra = len - d.len;
        if next >= self.units() {
            return Ok(false);
        }
        let n = self.desc(next);
        if n.kind != K_FREE || n.len < extra || n.len > self.units() - next {
            return Ok(false);
        }
        self.unlink(next);
        if n.len > extra {
            self.write_free(next + extra, n.len - extra);
        }
        self.write_used(head, len, d.tag, d.aux);
        self.st.free_units = self.st.free_units.wrapping_sub(extra as u64);
        let used = (self.units() as u64).saturating_sub(self.st.free_units);
        self.st.peak_used_units = self.st.peak_used_units.max(used);
        Ok(true)
    }

    fn write_used(&mut self, head: u32, len: u32, tag: u32, aux: u32) {
        if len > 1 {
            self.set(head + len - 1, Desc { kind: K_USED_TAIL, len, tag, aux });
        }
        self.set(head, Desc { kind: K_USED, len, tag, aux });
    }

    /// The head of the free run whose last unit is `last`, if there is one.
    fn free_run_ending_at(&self, last: u32) -> Option<u32> {
        let t = self.desc(last);
        let head = match t.kind {
            K_FREE if t.len == 1 => last,
            K_FREE_TAIL if t.len >= 2 && t.len <= last + 1 => last + 1 - t.len,
            _ => return None,
        };
        let h = self.desc(head);
        (h.kind == K_FREE && h.len == last + 1 - head).then_some(head)
    }

    /// Calls `f` for every used run, in address order.
    pub(crate) fn for_each_used(&self, mut f: impl FnMut(u32, Desc) -> Result<()>) -> Result<()> {
        self.walk(|head, d| if d.kind == K_USED { f(head, d) } else { Ok(()) })
    }

    fn walk(&self, mut f: impl FnMut(u32, Desc) -> Result<()>) -> Result<()> {
        let mut i = 0;
        while i < self.units() {
            let d = self.desc(i);
            let valid = (d.kind == K_FREE || d.kind == K_USED) && d.len >= 1;
            if !valid || d.len > self.units() - i {
                return Err(corrupt(self.fs.layout.unit_offset(i), "descriptor is not the start of a run"));
            }
            f(i, d)?;
            i += d.len;
        }
        Ok(())
    }

    /// Rebuilds the bins (merging neighbours) from the table: the repair after a holder died.
    pub(crate) fn rebuild(&mut self) -> Result<()> {
        self.st.bins = [NONE; BINS];
        self.st.bitmap = [0; 3];
        let mut runs = alloc::vec::Vec::new();
        self.walk(|head, d| {
            runs.push((head, d));
            Ok(())
        })?;
        let mut free_units = 0u64;
        let mut pending: Option<(u32, u32)> = None;
        for (head, d) in runs {
            if d.kind == K_FREE {
                pending = Some(match pending {
                    Some((h, l)) => (h, l + d.len),
                    None => (head, d.len),
                });
                free_units += d.len as u64;
            } else {
                if let Some((h, l)) = pending.take() {
                    self.write_free(h, l);
                }
                if d.len > 1 {
                    let mut t = d;
                    t.kind = K_USED_TAIL;
                    self.set(head + d.len - 1, t);
                }
            }
        }
        if let Some((h, l)) = pending {
            self.write_free(h, l);
        }
        self.st.free_units = free_units;
        // A holder that died between taking units and raising the peak left it below them.
        let (units, used) = (self.units() as u64, self.units() as u64 - free_units);
        self.st.peak_used_units = self.st.peak_used_units.max(used).min(units);
        Ok(())
    }

    /// Free units.
    pub(crate) fn free_units(&self) -> u64 {
        self.st.free_units
    }

    /// Free bytes, for an out-of-memory error (saturating: the count is shared memory another
    /// process may have broken).
    pub(crate) fn free_bytes(&self) -> u64 {
        self.free_units().saturating_mul(UNIT)
    }

    /// The most units that were ever in use at once.
    pub(crate) fn peak_used_units(&self) -> u64 {
        self.st.peak_used_units
    }

    /// Verifies the table and the bins: runs tile the arena, no two free runs touch, tails match,
    /// every free run is binned once in the right bin, and the free count adds up.
    pub(crate) fn check(&self) -> Result<()> {
        let mut free_runs = alloc::collections::BTreeSet::new();
        let mut free_units = 0u64;
        let mut prev_free = false;
        self.walk(|head, d| {
            let is_free = d.kind == K_FREE;
            if is_free && prev_free {
                return Err(corrupt(self.fs.layout.unit_offset(head), "free runs not merged"));
            }
            if d.len > 1 {
                let t = self.desc(head + d.len - 1);
                let want = if is_free { K_FREE_TAIL } else { K_USED_TAIL };
                if t.kind != want || t.len != d.len {
                    return Err(corrupt(
                        self.fs.layout.unit_offset(head),
                        "run's last descriptor does not match its first",
                    ));
                }
            }
            if is_free {
                free_runs.insert(head);
                free_units += d.len as u64;
            }
            prev_free = is_free;
            Ok(())
        })?;
        if free_units != self.st.free_units {
            return Err(corrupt(0, "free-unit count disagrees with the table"));
        }
        // What the allocators' stats report as their high watermark.
        let (units, peak) = (self.units() as u64, self.st.peak_used_units);
        if peak < units - free_units || peak > units {
            return Err(corrupt(0, "peak of units in use below the units in use or past the arena"));
        }
        if self.st.bitmap[BINS / 64] >> (BINS % 64) != 0 {
            return Err(corrupt(BINS as u64, "bin bitmap has bits past the last bin"));
        }
        let mut binned = 0usize;
        for bin in 0..BINS {
            let nonempty = self.st.bitmap[bin / 64] & (1 << (bin % 64)) != 0;
            if nonempty != (self.st.bins[bin] != NONE) {
                return Err(corrupt(bin as u64, "bin bitmap disagrees with the bins"));
            }
            let (mut at, mut prev) = (self.st.bins[bin], NONE);
            while at != NONE {
                if !free_runs.contains(&at) || binned >= free_runs.len() {
                    return Err(corrupt(at as u64, "bin holds something that is not a free run"));
                }
                let d = self.desc(at);
                if bin_of(d.len) != bin || d.tag != prev {
                    return Err(corrupt(at as u64, "free run in the wrong bin or badly linked"));
                }
                binned += 1;
                prev = at;
                at = d.aux;
            }
        }
        if binned != free_runs.len() {
            return Err(corrupt(0, "a free run is missing from the bins"));
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;
    use crate::backend::BackendId;
    use crate::header::HEADER_SIZE;
    use crate::testing::HeapBackend;
    use std::sync::Arc;

    fn manager(units: u64) -> FreeSpace {
        let len = HEADER_SIZE + 4096 + units * (UNIT + 16) + UNIT;
        let backend = Arc::new(HeapBackend::new(BackendId(1), len as usize));
        // SAFETY: the test's own backend, which only the free-space manager uses.
        let region = unsafe { Region::whole(backend) }.unwrap();
        let state = region.offset();
        let start = state + core::mem::size_of::<Mutex<FreeSpaceState>>() as u64;
        let layout = FreeSpaceLayout::plan(start, region.end()).unwrap();
        // SAFETY: the state goes at the region's start, before the table; `init` runs first.
        let fs = unsafe { FreeSpace::new(region, state, layout, 0) }.unwrap();
        // SAFETY: no one else uses it.
        unsafe { fs.init() };
        fs
    }

    #[test]
    fn a_layout_read_back_with_offsets_near_the_top_is_refused() {
        // The layout comes from a header another process wrote.
        let backend = Arc::new(HeapBackend::new(BackendId(1), 64 * 1024));
        // SAFETY: the test's own backend, which only the free-space manager uses.
        let region = unsafe { Region::whole(backend) }.unwrap();
        for (table, arena) in [(u64::MAX - 15, 0), (u64::MAX - 15, u64::MAX - UNIT + 1), (HEADER_SIZE, !(UNIT - 1))] {
            let layout = FreeSpaceLayout { table, arena, units: 2 };
            assert!(matches!(layout.validate(&region, region.offset()), Err(Error::Corrupt { .. })), "{layout:?}");
        }
    }

    /// A range too small for two units (a span allocator over a region smaller than its own
    /// header, say) is refused: the planner once looked for a smaller table for ever.
    #[test]
    fn a_range_too_small_for_a_table_and_two_units_is_refused_not_looped_on() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ranges = [(HEADER_SIZE + 64, HEADER_SIZE + 264), (HEADER_SIZE + 8000, HEADER_SIZE + 4096), (64, 64)];
            let _ = tx.send(ranges.map(|(start, end)| FreeSpaceLayout::plan(start, end)));
        });
        let planned = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("plan never returned");
        for p in planned {
            assert!(matches!(p, Err(Error::InvalidSize { .. })), "{p:?}");
        }
    }

    /// Bits of the bin bitmap past the last bin (shared memory a peer may have written) are
    /// neither followed into a bin that does not exist (a panic) nor passed by `check`.
    #[test]
    fn bitmap_bits_past_the_last_bin_are_ignored_and_reported() {
        let fs = manager(16);
        let units = fs.layout().units;
        let mut g = fs.lock();
        let all = g.alloc(units, 1, 0).unwrap();
        g.st.bitmap[BINS / 64] |= 1 << 63;
        assert_eq!(g.alloc(1, 1, 0), None, "nothing is free");
        assert!(matches!(g.check(), Err(Error::Corrupt { .. })));
        g.free(all).unwrap();
        assert_eq!(g.alloc(units, 1, 0), Some(all));
    }

    /// A free run's bin links are shared memory: a link a peer broke so that it names a used
    /// run is not followed when the free run is taken, so the used run's tag and owner word
    /// (what a recovery tells a live span or block by) stay as they were.
    #[test]
    fn a_broken_bin_link_does_not_rewrite_a_used_run() {
        let fs = manager(32);
        let mut g = fs.lock();
        let before = g.alloc(2, 7, 77).unwrap();
        let hole = g.alloc(2, 1, 0).unwrap();
        let after = g.alloc(2, 7, 88).unwrap();
        g.free(hole).unwrap();
        let d = g.desc(hole);
        g.set(hole, Desc { tag: before, aux: after, ..d });
        assert_eq!(g.alloc(2, 1, 0), Some(hole));
        for (run, aux) in [(before, 77), (after, 88)] {
            let r = g.desc(run);
            assert_eq!((r.kind, r.len, r.tag, r.aux), (K_USED, 2, 7, aux), "run {run}");
        }
        g.rebuild().unwrap();
        g.check().unwrap();
        // A bin head that names a used run is not linked behind a run freed into the bin.
        g.st.bins[bin_of(2)] = before;
        g.free(hole).unwrap();
        assert_eq!(g.desc(hole).len, 2, "freed between two used runs");
        let r = g.desc(before);
        assert_eq!((r.kind, r.len, r.tag, r.aux), (K_USED, 2, 7, 77));
        g.rebuild().unwrap();
        g.check().unwrap();
    }

    /// The recovery count is shared memory a peer may have written: a lock taken over from a
    /// dead holder with the count at its largest is recovered (the count wraps), not a panic.
    #[test]
    fn a_recovery_with_the_count_at_its_largest_takes_the_lock() {
        crate::testing::install_test_liveness();
        let fs = manager(16);
        let units = fs.layout().units;
        let run = {
            let mut g = fs.lock();
            g.st.recoveries = u64::MAX;
            g.alloc(2, 1, 0).unwrap()
        };
        // The holder's process died with the lock held.
        // SAFETY: the mutex's first word is its owner word (`#[repr(C)]`), an atomic.
        let owner = unsafe { &*(fs.state as *const crate::sync::atomic::AtomicU64) };
        owner.store(crate::testing::dead_token(), crate::sync::atomic::Ordering::Release);
        let mut g = fs.lock();
        assert_eq!(g.st.recoveries, 0);
        g.check().unwrap();
        g.free(run).unwrap();
        assert_eq!(g.free_units(), units as u64);
    }

    /// The high watermark (shared memory, which the span allocators' stats report) is checked
    /// as the other counters are: below the units in use or past the arena it is damage. A
    /// holder that died between taking units and raising the peak left it below them; the
    /// recovery's rebuild settles it.
    #[test]
    fn a_peak_below_the_units_in_use_or_past_the_arena_fails_check() {
        let fs = manager(16);
        let units = fs.layout().units as u64;
        let mut g = fs.lock();
        let run = g.alloc(3, 1, 0).unwrap();
        g.check().unwrap();
        for broken in [2, units + 1, u64::MAX] {
            g.st.peak_used_units = broken;
            assert!(matches!(g.check(), Err(Error::Corrupt { .. })), "peak {broken}");
        }
        g.st.peak_used_units = 2;
        g.rebuild().unwrap();
        assert_eq!(g.peak_used_units(), 3);
        g.check().unwrap();
        g.free(run).unwrap();
        g.check().unwrap();
    }

    #[test]
    fn bins_cover_every_length_in_order() {
        let mut last = 0;
        for len in 1..100_000u32 {
            let b = bin_of(len);
            assert!(b >= last && b < BINS);
            last = b;
        }
        assert!(bin_of(u32::MAX) < BINS);
    }

    #[test]
    fn split_merge_and_best_fit() {
        let fs = manager(64);
        let units = fs.layout().units;
        let mut g = fs.lock();
        let a = g.alloc(3, 1, 0).unwrap();
        let b = g.alloc(5, 1, 0).unwrap();
        let c = g.alloc(2, 1, 0).unwrap();
        g.check().unwrap();
        assert_eq!(g.free_units(), (units - 10) as u64);
        g.free(b).unwrap();
        g.check().unwrap();
        // Best fit: a 4-unit request takes b's 5-unit hole, not the big tail.
        assert_eq!(g.alloc(4, 1, 0), Some(b));
        g.free(a).unwrap();
        g.free(c).unwrap();
        g.free(b).unwrap();
        g.check().unwrap();
        assert_eq!(g.free_units(), units as u64);
        assert!(g.free(b).is_err(), "double free is refused");
        assert_eq!(g.alloc(units + 1, 1, 0), None);
        assert_eq!(g.alloc(units, 1, 0), Some(0));
    }

    #[test]
    fn state_another_process_broke_is_reported_by_check_not_a_panic() {
        let fs = manager(32);
        let mut g = fs.lock();
        let runs: Vec<_> = (0..4).map(|_| g.alloc(3, 1, 0).unwrap()).collect();
        // The bins and counters live in shared memory: a peer may have written anything there.
        g.st.bins[bin_of(3)] = 1000;
        g.st.free_units = 0;
        g.free(runs[1]).unwrap();
        assert!(g.alloc(2, 1, 0).is_some());
        g.st.free_units = u64::MAX;
        assert!(g.alloc(1, 1, 0).is_some());
        assert!(g.check().is_err());
        g.rebuild().unwrap();
        g.check().unwrap();
    }

    #[test]
    fn rebuild_repairs_bins_lost_mid_operation() {
        let fs = manager(32);
        let mut g = fs.lock();
        let runs: Vec<_> = (0..6).map(|_| g.alloc(2, 1, 0).unwrap()).collect();
        g.free(runs[1]).unwrap();
        g.free(runs[3]).unwrap();
        g.st.bins = [NONE; BINS]; // as if the holder died while relinking
        assert!(g.check().is_err());
        g.rebuild().unwrap();
        g.check().unwrap();
        let again = g.alloc(2, 1, 0).unwrap();
        assert!(again == runs[1] || again == runs[3]);
        g.check().unwrap();
    }

    #[test]
    fn a_descriptor_another_process_broke_is_not_handed_out_or_panicked_on() {
        let fs = manager(32);
        let mut g = fs.lock();
        let runs: Vec<_> = (0..6).map(|_| g.alloc(2, 1, 0).unwrap()).collect();
        g.free(runs[1]).unwrap();
        let hole = g.desc(runs[1]);
        // A free run's head claiming more units than the table has, or none.
        for len in [u32::MAX, 1000, 0] {
            g.set(runs[1], Desc { len, ..hole });
            assert!(g.check().is_err());
            let taken = g.alloc(2, 1, 0);
            assert_ne!(taken, Some(runs[1]), "len {len}");
            if let Some(t) = taken {
                g.free(t).unwrap();
            }
            assert!(g.free(runs[1]).is_err());
        }
        // A bin that leads to a used run.
        g.set(runs[1], hole);
        g.rebuild().unwrap();
        g.st.bins[bin_of(2)] = runs[2];
        let taken = g.alloc(2, 1, 0);
        assert_ne!(taken, Some(runs[2]), "a used run handed out again");
        // Freeing next to a free tail that claims to reach past the table's start.
        g.rebuild().unwrap();
        let tail = runs[1] + 1;
        g.set(tail, Desc { kind: K_FREE_TAIL, len: 2, tag: NONE, aux: NONE });
        g.set(runs[1], Desc { kind: K_FREE, len: u32::MAX, tag: NONE, aux: NONE });
        let _ = g.free(runs[2]);
    }
}
