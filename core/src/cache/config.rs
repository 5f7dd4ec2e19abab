//! How much each thread cache may hold: [`CacheConfig`], thread roles, and where the defaults
//! come from.
//!
//! A thread's limits are, from strongest to weakest:
//! 1. a configuration given to that thread ([`set_thread_config`](super::set_thread_config));
//! 2. one registered for its role ([`configure_role`]);
//! 3. environment variables at run time (read once, at the first thread cache's start);
//! 4. the same variables at build time (`option_env!`, so a rebuild picks up a change);
//! 5. the built-in defaults below.
//!
//! | variable | meaning | built-in default |
//! |---|---|---|
//! | `HETMEM_CACHE_BUCKETS` | buckets per thread (1..=17; bucket `i` holds `16 << i` bytes) | 13 (16 B to 64 KiB) |
//! | `HETMEM_CACHE_LIMIT` | byte limit of every bucket, every role | per role |
//! | `HETMEM_CACHE_LIMIT_MAIN` | ... of the main thread | 256 KiB |
//! | `HETMEM_CACHE_LIMIT_WORKER` | ... of other threads and custom roles | 128 KiB |
//! | `HETMEM_CACHE_LIMIT_SCHEDULER` | ... of a thread marked [`ThreadRole::Scheduler`] | 1 MiB |
//! | `HETMEM_CACHE_DEPOT_LIMIT` | bytes the shared depot of each allocator may hold (0: none) | 32 MiB |
//! | `HETMEM_FRAME_BUCKETS` | size classes of the recycled-frame lists | 13 |
//! | `HETMEM_FRAME_LIMIT` | byte limit of each frame class per thread | 256 KiB |
//!
//! A limit is a size (`65536`, `64K`, `1M`, `1G`) or a comma-separated list of sizes, one per
//! bucket from the smallest; the last one repeats for the buckets the list does not name.

use core::fmt;

use crate::cache::size_class::{block_size, MAX_BUCKETS};
use crate::error::{Error, Result};
use crate::sync::SpinLock;
use core::sync::atomic::{AtomicU8, Ordering};

/// What a thread does, which decides its cache limits.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum ThreadRole {
    /// The process's main thread (the default for it).
    Main,
    /// Any other thread (the default for them).
    Worker,
    /// A thread that runs a scheduler: the heaviest reuse in the process, the largest limits.
    Scheduler,
    /// A role the application defines; its limits are [`ThreadRole::Worker`]'s until
    /// [`configure_role`] gives it its own.
    Custom(u16),
}

impl fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadRole::Main => f.write_str("main"),
            ThreadRole::Worker => f.write_str("worker"),
            ThreadRole::Scheduler => f.write_str("scheduler"),
            ThreadRole::Custom(n) => write!(f, "custom({n})"),
        }
    }
}

/// The shape and limits of one thread cache: how many power-of-two buckets it has and how many
/// bytes each may hold before freed blocks go upstream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CacheConfig {
    buckets: u8,
    limits: [usize; MAX_BUCKETS],
}

impl CacheConfig {
    /// The most buckets a cache can have (blocks of 16 B to 1 MiB).
    pub const MAX_BUCKETS: usize = MAX_BUCKETS;

    /// `buckets` buckets, each holding at most `limit` bytes.
    pub const fn uniform(buckets: usize, limit: usize) -> Result<Self> {
        if buckets == 0 || buckets > MAX_BUCKETS {
            return Err(Error::InvalidSize { size: buckets as u64, reason: "a thread cache has 1 to 17 buckets" });
        }
        let mut limits = [0; MAX_BUCKETS];
        let mut i = 0;
        while i < buckets {
            limits[i] = limit;
            i += 1;
        }
        Ok(CacheConfig { buckets: buckets as u8, limits })
    }

    /// One bucket per entry of `limits`, with those byte limits.
    pub fn from_limits(limits: &[usize]) -> Result<Self> {
        let mut config = Self::uniform(limits.len(), 0)?;
        config.limits[..limits.len()].copy_from_slice(limits);
        Ok(config)
    }

    /// The same configuration with bucket `bucket`'s limit set to `limit` bytes.
    pub fn with_bucket_limit(mut self, bucket: usize, limit: usize) -> Result<Self> {
        if bucket >= self.bucket_count() {
            return Err(Error::InvalidSize { size: bucket as u64, reason: "no such bucket in this configuration" });
        }
        self.limits[bucket] = limit;
        Ok(self)
    }

    /// A cache that holds nothing: every free goes straight upstream.
    pub const fn disabled() -> Self {
        CacheConfig { buckets: 1, limits: [0; MAX_BUCKETS] }
    }

    /// How many buckets the cache has.
    pub const fn bucket_count(&self) -> usize {
        self.buckets as usize
    }

    /// Bucket `bucket`'s byte limit (0 for buckets past [`Self::bucket_count`]).
    pub const fn limit(&self, bucket: usize) -> usize {
        if bucket < self.buckets as usize {
            self.limits[bucket]
        } else {
            0
        }
    }

    /// The size of the blocks bucket `bucket` holds: `16 << bucket`; `None` for a bucket past
    /// the last (`MAX_BUCKETS - 1`).
    pub const fn block_size(bucket: usize) -> Option<usize> {
        block_size(bucket)
    }

    /// The most bytes a cache with this configuration can hold (`usize::MAX` when the limits
    /// add up to more).
    pub fn max_cached_bytes(&self) -> usize {
        self.limits[..self.bucket_count()].iter().fold(0, |sum, &limit| sum.saturating_add(limit))
    }

    /// The configuration a thread in `role` starts with: a registered one, else the defaults
    /// from the environment (run time, then build time), else the built-in ones.
    pub fn for_role(role: ThreadRole) -> Self {
        if let Some(config) = registered(role) {
            return config;
        }
        defaults().role_config(role)
    }

    /// The configuration of each thread's recycled-frame lists unless set otherwise.
    pub fn for_frames() -> Self {
        defaults().frame_config()
    }

    /// The configuration for `role` from the environment variables: their values at run time
    /// (read now, not the ones the thread caches took at their start), over the values given at
    /// build time, over the built-in defaults; a role registered with [`configure_role`] plays no
    /// part. An error names the first run-time variable that does not parse (the allocator
    /// itself skips such a variable).
    pub fn from_env(role: ThreadRole) -> Result<Self> {
        let env = Defaults::from_env()?;
        Ok(env.over(&BUILD).role_config(role))
    }
}

/// Registers `config` for every thread in `role`. Threads that start their cache afterwards use
/// it; the calling thread applies it at once if it has this role. At most 16 roles can be
/// registered: a 17th is refused with [`Error::Unsupported`] (the roles registered can still be
/// given new limits).
pub fn configure_role(role: ThreadRole, config: CacheConfig) -> Result<()> {
    {
        let mut table = ROLES.lock();
        if let Some(entry) = table.iter_mut().flatten().find(|(r, _)| *r == role) {
            entry.1 = config;
        } else if let Some(free) = table.iter_mut().find(|e| e.is_none()) {
            *free = Some((role, config));
        } else {
            return Err(Error::Unsupported("at most 16 thread roles can be registered"));
        }
    }
    super::tls::reapply_role_config(role);
    Ok(())
}

/// The configuration threads in `role` get now (see [`CacheConfig::for_role`]).
pub fn role_config(role: ThreadRole) -> CacheConfig {
    CacheConfig::for_role(role)
}

/// The first environment variable that did not parse when the caches read them, if any.
pub fn env_error() -> Option<Error> {
    let _ = defaults();
    *ENV_ERROR.lock()
}

/// The byte limit of each allocator's shared depot.
pub(crate) fn depot_limit() -> usize {
    defaults().depot.unwrap_or(DEFAULT_DEPOT_LIMIT)
}

/// Takes the configuration's locks (before a `fork`; see `tls::fork`).
#[cfg(unix)]
pub(crate) fn lock_all() {
    ROLES.lock_and_keep();
    EFFECTIVE.lock_and_keep();
    ENV_ERROR.lock_and_keep();
}

/// Releases the locks [`lock_all`] took; in a forked child (`child`), also forgets a reading of
/// the environment that another thread of the parent had under way (it never finishes here).
///
/// # Safety
/// `lock_all` took them, and no guard of them is live.
#[cfg(unix)]
pub(crate) unsafe fn unlock_all(child: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        ENV_ERROR.force_unlock();
        EFFECTIVE.force_unlock();
        ROLES.force_unlock();
    }
    if child {
        let _ = ENV_STATE.compare_exchange(ENV_READING, ENV_UNREAD, Ordering::AcqRel, Ordering::Relaxed);
    }
}

const ROLE_SLOTS: usize = 16;
static ROLES: SpinLock<[Option<(ThreadRole, CacheConfig)>; ROLE_SLOTS]> = SpinLock::new([None; ROLE_SLOTS]);

fn registered(role: ThreadRole) -> Option<CacheConfig> {
    ROLES.lock().iter().flatten().find(|(r, _)| *r == role).map(|(_, c)| *c)
}

const DEFAULT_BUCKETS: usize = 13;
const DEFAULT_DEPOT_LIMIT: usize = 32 << 20;
const DEFAULT_FRAME_LIMIT: usize = 256 << 10;

const fn builtin_limit(role: ThreadRole) -> usize {
    match role {
        ThreadRole::Main => 256 << 10,
        ThreadRole::Scheduler => 1 << 20,
        ThreadRole::Worker | ThreadRole::Custom(_) => 128 << 10,
    }
}

/// A parsed limit: up to 17 sizes, the last repeating.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct LimitList {
    len: usize,
    values: [usize; MAX_BUCKETS],
}

impl LimitList {
    const fn get(&self, bucket: usize) -> usize {
        if bucket < self.len {
            self.values[bucket]
        } else {
            self.values[self.len - 1]
        }
    }
}

/// Parses a size: digits with an optional `K`, `M` or `G` (binary multiples).
const fn parse_size(s: &[u8], mut start: usize, mut end: usize) -> Option<usize> {
    while start < end && s[start] == b' ' {
        start += 1;
    }
    while end > start && s[end - 1] == b' ' {
        end -= 1;
    }
    if start == end {
        return None;
    }
    let shift = match s[end - 1] {
        b'k' | b'K' => 10,
        b'm' | b'M' => 20,
        b'g' | b'G' => 30,
        _ => 0,
    };
    if shift != 0 {
        end -= 1;
    }
    if start == end {
        return None;
    }
    let mut value: usize = 0;
    let mut i = start;
    while i < end {
        let d = s[i];
        if d < b'0' || d > b'9' {
            return None;
        }
        value = match value.checked_mul(10) {
            Some(v) => match v.checked_add((d - b'0') as usize) {
                Some(v) => v,
                None => return None,
            },
            None => return None,
        };
        i += 1;
    }
    if shift != 0 && value > (usize::MAX >> shift) {
        return None;
    }
    Some(value << shift)
}

/// Parses a comma-separated list of sizes, at most one per bucket.
const fn parse_limits(s: &str) -> Option<LimitList> {
    let s = s.as_bytes();
    let mut list = LimitList { len: 0, values: [0; MAX_BUCKETS] };
    let mut start = 0;
    let mut i = 0;
    while i <= s.len() {
        if i == s.len() || s[i] == b',' {
            if list.len == MAX_BUCKETS {
                return None;
            }
            list.values[list.len] = match parse_size(s, start, i) {
                Some(v) => v,
                None => return None,
            };
            list.len += 1;
            start = i + 1;
        }
        i += 1;
    }
    Some(list)
}

const fn parse_buckets(s: &str) -> Option<usize> {
    match parse_size(s.as_bytes(), 0, s.len()) {
        Some(n) if n >= 1 && n <= MAX_BUCKETS => Some(n),
        _ => None,
    }
}

/// Defaults from one source (build time or run time); `None` means "not set here".
#[derive(Clone, Copy, Debug, Default)]
struct Defaults {
    buckets: Option<usize>,
    all: Option<LimitList>,
    main: Option<LimitList>,
    worker: Option<LimitList>,
    scheduler: Option<LimitList>,
    depot: Option<usize>,
    frame_buckets: Option<usize>,
    frame: Option<LimitList>,
}

/// The names of the variables, in the order of [`Defaults`]' fields.
const VARS: [&str; 8] = [
    "HETMEM_CACHE_BUCKETS",
    "HETMEM_CACHE_LIMIT",
    "HETMEM_CACHE_LIMIT_MAIN",
    "HETMEM_CACHE_LIMIT_WORKER",
    "HETMEM_CACHE_LIMIT_SCHEDULER",
    "HETMEM_CACHE_DEPOT_LIMIT",
    "HETMEM_FRAME_BUCKETS",
    "HETMEM_FRAME_LIMIT",
];

const fn build_limits(v: Option<&str>) -> Option<LimitList> {
    match v {
        None => None,
        Some(s) => match parse_limits(s) {
            Some(l) => Some(l),
            None => panic!(
                "a HETMEM_CACHE_LIMIT*/HETMEM_FRAME_LIMIT variable set at build time is not a size or list of sizes"
            ),
        },
    }
}

const fn build_count(v: Option<&str>) -> Option<usize> {
    match v {
        None => None,
        Some(s) => match parse_buckets(s) {
            Some(n) => Some(n),
            None => panic!("HETMEM_CACHE_BUCKETS/HETMEM_FRAME_BUCKETS set at build time must be 1 to 17"),
        },
    }
}

/// The defaults given at build time; a malformed value stops the build.
const BUILD: Defaults = Defaults {
    buckets: build_count(option_env!("HETMEM_CACHE_BUCKETS")),
    all: build_limits(option_env!("HETMEM_CACHE_LIMIT")),
    main: build_limits(option_env!("HETMEM_CACHE_LIMIT_MAIN")),
    worker: build_limits(option_env!("HETMEM_CACHE_LIMIT_WORKER")),
    scheduler: build_limits(option_env!("HETMEM_CACHE_LIMIT_SCHEDULER")),
    depot: match option_env!("HETMEM_CACHE_DEPOT_LIMIT") {
        None => None,
        Some(s) => match parse_size(s.as_bytes(), 0, s.len()) {
            Some(v) => Some(v),
            None => panic!("HETMEM_CACHE_DEPOT_LIMIT set at build time is not a size"),
        },
    },
    frame_buckets: build_count(option_env!("HETMEM_FRAME_BUCKETS")),
    frame: build_limits(option_env!("HETMEM_FRAME_LIMIT")),
};

fn invalid_var(name: &'static str) -> Error {
    Error::InvalidSize { size: 0, reason: name }
}

impl Defaults {
    /// Reads the run-time environment. Every variable is read even after an error, so the
    /// returned partial defaults (in the `Err` case, via [`Self::from_env_lenient`]) keep the
    /// valid ones.
    fn from_env() -> Result<Self> {
        let (d, err) = Self::from_env_lenient();
        match err {
            Some(e) => Err(e),
            None => Ok(d),
        }
    }

    fn from_env_lenient() -> (Self, Option<Error>) {
        let mut d = Defaults::default();
        let mut first_error = None;
        for (i, name) in VARS.iter().enumerate() {
            let Some(value) = std::env::var_os(name) else {
                continue;
            };
            let Some(value) = value.to_str() else {
                first_error.get_or_insert(invalid_var(name));
                continue;
            };
            let ok = match i {
                0 => parse_buckets(value).map(|n| d.buckets = Some(n)),
                1 => parse_limits(value).map(|l| d.all = Some(l)),
                2 => parse_limits(value).map(|l| d.main = Some(l)),
                3 => parse_limits(value).map(|l| d.worker = Some(l)),
                4 => parse_limits(value).map(|l| d.scheduler = Some(l)),
                5 => parse_size(value.as_bytes(), 0, value.len()).map(|v| d.depot = Some(v)),
                6 => parse_buckets(value).map(|n| d.frame_buckets = Some(n)),
                _ => parse_limits(value).map(|l| d.frame = Some(l)),
            };
            if ok.is_none() {
                first_error.get_or_insert(invalid_var(name));
            }
        }
        (d, first_error)
    }

    /// `self` where set, `weaker` elsewhere; a role's own variable beats the all-roles one of
    /// the same source.
    fn over(self, weaker: &Defaults) -> Defaults {
        Defaults {
            buckets: self.buckets.or(weaker.buckets),
            all: self.all.or(weaker.all),
            main: self.main.or(self.all).or(weaker.main).or(weaker.all),
            worker: self.worker.or(self.all).or(weaker.worker).or(weaker.all),
            scheduler: self.scheduler.or(self.all).or(weaker.scheduler).or(weaker.all),
            depot: self.depot.or(weaker.depot),
            frame_buckets: self.frame_buckets.or(weaker.frame_buckets),
            frame: self.frame.or(weaker.frame),
        }
    }

    fn role_config(&self, role: ThreadRole) -> CacheConfig {
        let specific = match role {
            ThreadRole::Main => self.main,
            ThreadRole::Scheduler => self.scheduler,
            ThreadRole::Worker | ThreadRole::Custom(_) => self.worker,
        };
        let buckets = self.buckets.unwrap_or(DEFAULT_BUCKETS);
        config_from(buckets, specific.or(self.all), builtin_limit(role))
    }

    fn frame_config(&self) -> CacheConfig {
        let buckets = self.frame_buckets.unwrap_or(DEFAULT_BUCKETS);
        config_from(buckets, self.frame, DEFAULT_FRAME_LIMIT)
    }
}

fn config_from(buckets: usize, list: Option<LimitList>, fallback: usize) -> CacheConfig {
    let mut config = CacheConfig::uniform(buckets.clamp(1, MAX_BUCKETS), fallback).unwrap_or(CacheConfig::disabled());
    if let Some(list) = list {
        let n = config.bucket_count();
        for (b, limit) in config.limits[..n].iter_mut().enumerate() {
            *limit = list.get(b);
        }
    }
    config
}

const ENV_UNREAD: u8 = 0;
const ENV_READING: u8 = 1;
const ENV_READ: u8 = 2;
static ENV_STATE: AtomicU8 = AtomicU8::new(ENV_UNREAD);
static EFFECTIVE: SpinLock<Defaults> = SpinLock::new(BUILD);
static ENV_ERROR: SpinLock<Option<Error>> = SpinLock::new(None);

/// The merged defaults; reads the environment on first use. Reading allocates, so callers
/// inside the allocator must have marked their thread busy first (nested requests then go
/// straight upstream).
fn defaults() -> Defaults {
    if ENV_STATE.load(Ordering::Acquire) != ENV_READ {
        load_env();
    }
    *EFFECTIVE.lock()
}

#[cold]
fn load_env() {
    match ENV_STATE.compare_exchange(ENV_UNREAD, ENV_READING, Ordering::Acquire, Ordering::Acquire) {
        Ok(_) => {
            let (env, err) = Defaults::from_env_lenient();
            *EFFECTIVE.lock() = env.over(&BUILD);
            *ENV_ERROR.lock() = err;
            ENV_STATE.store(ENV_READ, Ordering::Release);
        }
        Err(_) => {
            // Another thread is reading; it takes microseconds and allocates nothing from us.
            while ENV_STATE.load(Ordering::Acquire) != ENV_READ {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        let p = |s: &str| parse_size(s.as_bytes(), 0, s.len());
        assert_eq!(p("65536"), Some(65536));
        assert_eq!(p("64K"), Some(64 << 10));
        assert_eq!(p(" 2m "), Some(2 << 20));
        assert_eq!(p("1G"), Some(1 << 30));
        assert_eq!(p(""), None);
        assert_eq!(p("K"), None);
        assert_eq!(p("12x"), None);
        assert_eq!(p("-1"), None);
        assert_eq!(p("99999999999999999999999"), None);
        assert_eq!(p("99999999999999999G"), None);
    }

    #[test]
    fn limit_lists_repeat_their_last_value() {
        let l = parse_limits("1K,2K,4K").unwrap();
        assert_eq!((l.get(0), l.get(1), l.get(2), l.get(9)), (1024, 2048, 4096, 4096));
        assert!(parse_limits("1K,,2K").is_none());
        assert!(parse_limits(&["1"; 18].join(",")).is_none());
        let c = config_from(4, Some(l), 7);
        assert_eq!(c.bucket_count(), 4);
        assert_eq!((c.limit(0), c.limit(3), c.limit(4)), (1024, 4096, 0));
    }

    #[test]
    fn bad_configurations_are_errors() {
        assert!(matches!(CacheConfig::uniform(0, 1), Err(Error::InvalidSize { .. })));
        assert!(CacheConfig::uniform(18, 1).is_err());
        assert!(CacheConfig::from_limits(&[]).is_err());
        let c = CacheConfig::from_limits(&[10, 20]).unwrap();
        assert_eq!(c.max_cached_bytes(), 30);
        assert!(c.with_bucket_limit(2, 1).is_err());
        assert_eq!(c.with_bucket_limit(1, 5).unwrap().limit(1), 5);
    }

    #[test]
    fn unbounded_limits_sum_without_overflow() {
        let c = CacheConfig::uniform(MAX_BUCKETS, usize::MAX).unwrap();
        assert_eq!(c.max_cached_bytes(), usize::MAX);
        assert_eq!(CacheConfig::from_limits(&[usize::MAX - 1, 1, 1]).unwrap().max_cached_bytes(), usize::MAX);
    }

    #[test]
    fn roles_have_distinct_defaults() {
        let d = Defaults::default();
        assert_eq!(d.role_config(ThreadRole::Main).limit(0), 256 << 10);
        assert_eq!(d.role_config(ThreadRole::Worker).limit(0), 128 << 10);
        assert_eq!(d.role_config(ThreadRole::Scheduler).limit(12), 1 << 20);
        assert_eq!(d.role_config(ThreadRole::Custom(3)).limit(0), 128 << 10);
        assert_eq!(d.role_config(ThreadRole::Main).bucket_count(), DEFAULT_BUCKETS);
        let runtime = Defaults { main: parse_limits("8K"), buckets: Some(3), ..Default::default() };
        let build = Defaults { all: parse_limits("4K"), main: parse_limits("2K"), ..Default::default() };
        let merged = runtime.over(&build);
        assert_eq!(merged.role_config(ThreadRole::Main).limit(2), 8 << 10);
        assert_eq!(merged.role_config(ThreadRole::Worker).limit(0), 4 << 10);
        assert_eq!(merged.role_config(ThreadRole::Worker).bucket_count(), 3);
    }
}
