//! Allocation traces: record what a program asks of a pool, as JSON lines, and replay it against
//! any pool.
//!
//! One event per line:
//!
//! ```text
//! {"op":"alloc","id":7,"size":4096,"align":16}
//! {"op":"free","id":7}
//! ```
//!
//! Each event is one JSON object on a line of its own, its keys in any order, each at most once. An
//! allocation has `op`, `id`, `size` and `align` (which may be left out: 16); a free has `op` and
//! `id` alone. Numbers are JSON integers from 0 to 2^64 - 1: digits only, without a sign or a
//! leading zero. Strings may use JSON's escapes (`"\u0066ree"` is `"free"`). Blank lines (JSON
//! whitespace alone: spaces, tabs, carriage returns) are skipped; anything else is an error that
//! names the line.
//!
//! Ids name allocations; an id may be reused once its allocation is freed. [`TracedPool`] records
//! the events of a pool in use; [`Replay`] checks a trace once and replays it as often as asked.

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::hash::BuildHasherDefault;
use core::ptr::NonNull;

use hashbrown::HashMap;

use super::arena::{AddrHasher, AddrMap};
use super::{BlockInfo, LiveAllocation, Pool, PoolStats};
use crate::error::{Error, Result};
use crate::resource::MemoryKind;

/// One allocation event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// `size` bytes aligned to `align` were allocated, and named `id`.
    Allocate {
        /// The allocation's name in the trace.
        id: u64,
        /// Bytes asked for.
        size: usize,
        /// Alignment asked for.
        align: usize,
    },
    /// The allocation named `id` was freed.
    Deallocate {
        /// The allocation's name in the trace.
        id: u64,
    },
}

impl TraceEvent {
    /// Appends the event as one JSON line.
    pub fn write_json(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = match self {
            TraceEvent::Allocate { id, size, align } => {
                writeln!(out, r#"{{"op":"alloc","id":{id},"size":{size},"align":{align}}}"#)
            }
            TraceEvent::Deallocate { id } => writeln!(out, r#"{{"op":"free","id":{id}}}"#),
        };
    }

    /// Parses one JSON line in the [format](self) (keys in any order, each at most once, strings
    /// with JSON's escapes, JSON whitespace around tokens). `line_number` goes into the error,
    /// [`Error::BadInput`].
    pub fn parse_json(line: &str, line_number: usize) -> Result<Self> {
        let bad = |detail| Error::BadInput { what: "trace line", number: line_number as u64, detail };
        let mut json = JsonCursor { text: line, at: 0 };
        if !json.eat(b'{') {
            return Err(bad("not a JSON object"));
        }
        let (mut op, mut id, mut size, mut align) = (None, None, None, None);
        if !json.eat(b'}') {
            loop {
                if json.peek() != Some(b'"') {
                    return Err(bad("expected a field name in quotes"));
                }
                let key = json.string().map_err(bad)?;
                if !json.eat(b':') {
                    return Err(bad("field without a value"));
                }
                let first = match &*key {
                    "op" => {
                        if json.peek() != Some(b'"') {
                            return Err(bad("op must be \"alloc\" or \"free\""));
                        }
                        op.replace(json.string().map_err(bad)?).is_none()
                    }
                    "id" => id.replace(json.number().map_err(bad)?).is_none(),
                    "size" => size.replace(json.number().map_err(bad)?).is_none(),
                    "align" => align.replace(json.number().map_err(bad)?).is_none(),
                    _ => return Err(bad("unknown field")),
                };
                if !first {
                    return Err(bad("field given twice"));
                }
                if json.eat(b'}') {
                    break;
                }
                if !json.eat(b',') {
                    return Err(bad("expected ',' or '}' after a value"));
                }
            }
        }
        if !json.at_end() {
            return Err(bad("text after the object"));
        }
        let id = id.ok_or(bad("missing \"id\""))?;
        match op.as_deref().ok_or(bad("missing \"op\""))? {
            "alloc" => {
                let size = size.ok_or(bad("missing \"size\""))?;
                let align = align.unwrap_or(16);
                let to_usize = |v: u64| usize::try_from(v).map_err(|_| bad("value too large for this machine"));
                Ok(TraceEvent::Allocate { id, size: to_usize(size)?, align: to_usize(align)? })
            }
            "free" if size.is_some() || align.is_some() => Err(bad("a free has no size or alignment")),
            "free" => Ok(TraceEvent::Deallocate { id }),
            _ => Err(bad("op must be \"alloc\" or \"free\"")),
        }
    }
}

/// Whether `b` is JSON whitespace (which is narrower than Unicode's).
fn json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Reads the tokens of one JSON line, skipping the whitespace before each.
struct JsonCursor<'a> {
    text: &'a str,
    /// A byte offset into `text`, always at a character boundary.
    at: usize,
}

impl<'a> JsonCursor<'a> {
    fn skip_space(&mut self) {
        while self.text.as_bytes().get(self.at).copied().is_some_and(json_space) {
            self.at += 1;
        }
    }

    /// The next token's first byte.
    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.text.as_bytes().get(self.at).copied()
    }

    /// Takes the next token if it is the one byte `b`.
    fn eat(&mut self, b: u8) -> bool {
        let here = self.peek() == Some(b);
        self.at += usize::from(here);
        here
    }

    fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    /// A number up to the next comma, brace or whitespace, read by [`json_u64`].
    fn number(&mut self) -> core::result::Result<u64, &'static str> {
        self.skip_space();
        let rest = &self.text[self.at..];
        let len = rest.bytes().position(|b| b == b',' || b == b'}' || json_space(b)).unwrap_or(rest.len());
        self.at += len;
        // Only ASCII bytes end it, so `len` is at a character boundary.
        json_u64(&rest[..len])
    }

    /// The string that starts at the next token (its opening quote), with its escapes replaced;
    /// borrowed from the line when it has none.
    fn string(&mut self) -> core::result::Result<Cow<'a, str>, &'static str> {
        self.skip_space();
        let text = self.text;
        let bytes = text.as_bytes();
        debug_assert_eq!(bytes.get(self.at), Some(&b'"'));
        let start = self.at + 1;
        let mut i = start;
        let mut decoded: Option<String> = None;
        loop {
            match bytes.get(i).copied() {
                None => return Err("string without its closing quote"),
                Some(b'"') => break,
                Some(b) if b < 0x20 => return Err("control character in a string"),
                Some(b'\\') => {
                    let out = decoded.get_or_insert_with(|| String::from(&text[start..i]));
                    let (c, len) = unescape(&bytes[i + 1..])?;
                    out.push(c);
                    i += 1 + len;
                }
                Some(_) => {
                    // A whole character: `i` stays at character boundaries.
                    let c = text[i..].chars().next().ok_or("string without its closing quote")?;
                    if let Some(out) = decoded.as_mut() {
                        out.push(c);
                    }
                    i += c.len_utf8();
                }
            }
        }
        self.at = i + 1;
        Ok(decoded.map_or(Cow::Borrowed(&text[start..i]), Cow::Owned))
    }
}

/// The character an escape names, and the bytes it takes after its backslash.
fn unescape(after: &[u8]) -> core::result::Result<(char, usize), &'static str> {
    let simple = match after.first() {
        Some(b'"') => '"',
        Some(b'\\') => '\\',
        Some(b'/') => '/',
        Some(b'b') => '\u{8}',
        Some(b'f') => '\u{c}',
        Some(b'n') => '\n',
        Some(b'r') => '\r',
        Some(b't') => '\t',
        Some(b'u') => {
            let high = hex4(&after[1..])?;
            if !(0xD800..0xDC00).contains(&high) {
                return char::from_u32(high).map(|c| (c, 5)).ok_or("\\u escape of a lone surrogate");
            }
            // A high surrogate: the low one must follow, as another `\u` escape.
            let low = match after.get(5..7) {
                Some(b"\\u") => hex4(&after[7..])?,
                _ => return Err("\\u escape of a lone surrogate"),
            };
            if !(0xDC00..0xE000).contains(&low) {
                return Err("\\u escape of a lone surrogate");
            }
            let c = char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00));
            return c.map(|c| (c, 11)).ok_or("\\u escape of a lone surrogate");
        }
        _ => return Err("unknown escape in a string"),
    };
    Ok((simple, 1))
}

/// The value of the four hex digits `digits` starts with.
fn hex4(digits: &[u8]) -> core::result::Result<u32, &'static str> {
    let digits = digits.get(..4).filter(|d| d.iter().all(u8::is_ascii_hexdigit));
    let digits = digits.ok_or("\\u escape without four hex digits")?;
    // Four ASCII hex digits are UTF-8 and a number below 2^16.
    let text = core::str::from_utf8(digits).map_err(|_| "\\u escape without four hex digits")?;
    u32::from_str_radix(text, 16).map_err(|_| "\\u escape without four hex digits")
}

/// A JSON integer from 0 to 2^64 - 1: digits only, without a sign or a leading zero (which
/// `str::parse` would take).
fn json_u64(text: &str) -> core::result::Result<u64, &'static str> {
    let digits = text.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || (digits.len() > 1 && digits[0] == b'0') {
        return Err("expected an unsigned integer (digits, no sign, no leading zero)");
    }
    text.parse().map_err(|_| "number past 2^64 - 1")
}

/// The events as JSON lines.
pub fn to_jsonl(events: &[TraceEvent]) -> String {
    let mut out = String::with_capacity(events.len() * 48);
    for event in events {
        event.write_json(&mut out);
    }
    out
}

/// Parses JSON lines (blank lines are skipped).
pub fn parse_jsonl(text: &str) -> Result<Vec<TraceEvent>> {
    parse_jsonl_bytes(text.as_bytes())
}

/// Parses JSON lines as read from a file, which may hold anything: a line that is not UTF-8 is
/// an error that names it, as is any other bad line (blank lines are skipped).
pub fn parse_jsonl_bytes(bytes: &[u8]) -> Result<Vec<TraceEvent>> {
    let mut events = Vec::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = core::str::from_utf8(line).map_err(|_| Error::BadInput {
            what: "trace line",
            number: n as u64 + 1,
            detail: "not UTF-8",
        })?;
        if !line.bytes().all(json_space) {
            events.push(TraceEvent::parse_json(line, n + 1)?);
        }
    }
    Ok(events)
}

/// A pool that records every successful allocation and free as a [`TraceEvent`].
pub struct TracedPool<P: Pool> {
    pool: P,
    events: Vec<TraceEvent>,
    ids: AddrMap<u64>,
    next_id: u64,
}

impl<P: Pool> TracedPool<P> {
    /// Records what is done with `pool`.
    pub fn new(pool: P) -> Self {
        TracedPool { pool, events: Vec::new(), ids: AddrMap::default(), next_id: 0 }
    }

    /// The events so far.
    pub fn events(&self) -> &[TraceEvent] {
        &self.events
    }

    /// The pool.
    pub fn inner(&self) -> &P {
        &self.pool
    }

    /// The pool and its trace.
    pub fn into_parts(self) -> (P, Vec<TraceEvent>) {
        (self.pool, self.events)
    }
}

// SAFETY: forwards every block to and from `P`, which keeps the promises; the recorder touches
// no block.
unsafe impl<P: Pool> Pool for TracedPool<P> {
    fn name(&self) -> &str {
        self.pool.name()
    }

    fn memory_kind(&self) -> MemoryKind {
        self.pool.memory_kind()
    }

    fn host_accessible(&self) -> bool {
        self.pool.host_accessible()
    }

    fn allocate(&mut self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let ptr = self.pool.allocate(size, align)?;
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(ptr.as_ptr() as usize, id);
        self.events.push(TraceEvent::Allocate { id, size, align });
        Ok(ptr)
    }

    fn deallocate(&mut self, ptr: NonNull<u8>) -> Result<()> {
        self.pool.deallocate(ptr)?;
        if let Some(id) = self.ids.remove(&(ptr.as_ptr() as usize)) {
            self.events.push(TraceEvent::Deallocate { id });
        }
        Ok(())
    }

    fn release(&mut self) -> usize {
        self.pool.release()
    }

    fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    fn for_each_block(&self, f: &mut dyn FnMut(BlockInfo)) {
        self.pool.for_each_block(f)
    }

    fn live_allocations(&self) -> Vec<LiveAllocation> {
        self.pool.live_allocations()
    }

    fn check(&self) -> Result<()> {
        self.pool.check()
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Allocate { slot: u32, size: usize, align: usize },
    Deallocate { slot: u32 },
}

/// A checked trace, ready to replay: ids are mapped to dense slots up front, so replaying costs
/// the pool's work and little else.
#[derive(Debug)]
pub struct Replay {
    steps: Vec<Step>,
    slots: usize,
}

/// What a replay did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Events replayed.
    pub operations: usize,
    /// Allocations the pool refused (their frees are skipped).
    pub failed_allocations: usize,
    /// The pool's figures afterwards (its `actual_high_watermark` is the peak actual size).
    pub stats: PoolStats,
}

impl Replay {
    /// Checks `events`: every allocation is one some pool could serve (a non-zero size, an
    /// alignment that is a power of two, at most `isize::MAX` bytes once aligned), every free
    /// names a live allocation, and no id is allocated twice while live. A bad event is an
    /// [`Error::BadInput`] that gives its number in `events`, counted from 1 (the line number
    /// too when the trace has no blank lines).
    pub fn new(events: &[TraceEvent]) -> Result<Self> {
        // Keyed by the whole id: cut to `usize`, two ids would collide on a 32-bit target.
        let mut live: HashMap<u64, u32, BuildHasherDefault<AddrHasher>> = HashMap::default();
        let mut spare: Vec<u32> = Vec::new();
        let mut slots = 0u32;
        let mut steps = Vec::with_capacity(events.len());
        for (n, event) in events.iter().enumerate() {
            let bad = |detail| Error::BadInput { what: "trace event", number: n as u64 + 1, detail };
            match *event {
                TraceEvent::Allocate { id, size, align } => {
                    // What no pool can serve is the trace's error, not a refusal to count.
                    crate::check_layout(size, align).map_err(|e| {
                        bad(match e {
                            Error::InvalidAlignment { .. } => "alignment is not a power of two",
                            _ if size == 0 => "allocation of zero bytes",
                            _ => "size past isize::MAX bytes once aligned",
                        })
                    })?;
                    let slot = spare.pop().unwrap_or_else(|| {
                        slots += 1;
                        slots - 1
                    });
                    if live.insert(id, slot).is_some() {
                        return Err(bad("id allocated again while live"));
                    }
                    steps.push(Step::Allocate { slot, size, align });
                }
                TraceEvent::Deallocate { id } => {
                    let slot = live.remove(&id).ok_or(bad("free of an id that is not live"))?;
                    spare.push(slot);
                    steps.push(Step::Deallocate { slot });
                }
            }
        }
        Ok(Replay { steps, slots: slots as usize })
    }

    /// Events in the trace.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the trace is empty.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The largest allocation in the trace (0 if none).
    pub fn max_size(&self) -> usize {
        self.steps.iter().map(|s| if let Step::Allocate { size, .. } = s { *size } else { 0 }).max().unwrap_or(0)
    }

    /// The largest alignment in the trace (0 if none).
    pub fn max_align(&self) -> usize {
        self.steps.iter().map(|s| if let Step::Allocate { align, .. } = s { *align } else { 0 }).max().unwrap_or(0)
    }

    /// Replays the trace against `pool`. Allocations the pool refuses are counted, not fatal;
    /// what is still live at the end stays allocated.
    pub fn run(&self, pool: &mut (impl Pool + ?Sized)) -> Result<ReplayOutcome> {
        let mut live: Vec<Option<NonNull<u8>>> = alloc::vec![None; self.slots];
        let mut failed = 0;
        for step in &self.steps {
            match *step {
                Step::Allocate { slot, size, align } => match pool.allocate(size, align) {
                    Ok(ptr) => live[slot as usize] = Some(ptr),
                    Err(e)
                        if e.is_out_of_memory()
                            || matches!(e, Error::InvalidSize { .. } | Error::InvalidAlignment { .. }) =>
                    {
                        failed += 1
                    }
                    Err(e) => return Err(e),
                },
                Step::Deallocate { slot } => {
                    if let Some(ptr) = live[slot as usize].take() {
                        pool.deallocate(ptr)?;
                    }
                }
            }
        }
        Ok(ReplayOutcome { operations: self.steps.len(), failed_allocations: failed, stats: pool.stats() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{HostResource, QuickPool};

    #[test]
    fn events_round_trip_through_json_lines() {
        let events = [
            TraceEvent::Allocate { id: 1, size: 4096, align: 64 },
            TraceEvent::Allocate { id: 2, size: 1, align: 16 },
            TraceEvent::Deallocate { id: 1 },
        ];
        let text = to_jsonl(&events);
        assert_eq!(text.lines().next(), Some(r#"{"op":"alloc","id":1,"size":4096,"align":64}"#));
        assert_eq!(parse_jsonl(&text).unwrap(), events);
        let spaced = "\n{ \"id\": 3, \"op\": \"free\" }\n";
        assert_eq!(parse_jsonl(spaced).unwrap(), [TraceEvent::Deallocate { id: 3 }]);
    }

    #[test]
    fn bad_lines_say_where_and_why() {
        let err = parse_jsonl("{\"op\":\"free\",\"id\":1}\n{\"op\":\"grow\",\"id\":1}").unwrap_err();
        assert_eq!(err, Error::BadInput { what: "trace line", number: 2, detail: "op must be \"alloc\" or \"free\"" });
        assert_eq!(err.to_string(), "trace line 2: op must be \"alloc\" or \"free\"");
        let twice = "{\"op\":\"alloc\",\"id\":1,\"size\":8,\"size\":9000}";
        assert_eq!(
            parse_jsonl(twice).unwrap_err(),
            Error::BadInput { what: "trace line", number: 1, detail: "field given twice" }
        );
        assert!(parse_jsonl("{\"op\":\"free\",\"op\":\"alloc\",\"id\":1,\"size\":8}").is_err());
        assert!(parse_jsonl("{\"op\":\"alloc\",\"id\":1}").is_err());
        assert!(parse_jsonl("{\"op\":\"alloc\",\"id\":-1,\"size\":3}").is_err());
        assert!(parse_jsonl("[1,2]").is_err());
        let not_utf8 = b"{\"op\":\"free\",\"id\":1}\r\n\n{\"op\":\"free\",\"id\":\xff}\n";
        assert_eq!(
            parse_jsonl_bytes(not_utf8).unwrap_err(),
            Error::BadInput { what: "trace line", number: 3, detail: "not UTF-8" }
        );
        assert_eq!(parse_jsonl_bytes(&not_utf8[..23]).unwrap(), [TraceEvent::Deallocate { id: 1 }]);
        let free_unknown = [TraceEvent::Deallocate { id: 9 }];
        let err = Replay::new(&free_unknown).unwrap_err();
        assert_eq!(err.to_string(), "trace event 1: free of an id that is not live");
    }

    #[test]
    fn lines_are_read_as_json_strings_escapes_and_whitespace_included() {
        let line = |text: &str| TraceEvent::parse_json(text, 4);
        let bad = |detail| Err(Error::BadInput { what: "trace line", number: 4, detail });
        // Escapes name the same characters as the plain text, in keys and in values.
        assert_eq!(line(r#"{"op":"\u0066ree","id":1}"#), Ok(TraceEvent::Deallocate { id: 1 }));
        assert_eq!(line(r#"{"\u006fp" : "free" ,	"id":2}"#), Ok(TraceEvent::Deallocate { id: 2 }));
        assert_eq!(line(r#"{"op":"fre\u0065","\u0069d":3}"#), Ok(TraceEvent::Deallocate { id: 3 }));
        assert_eq!(line(r#"{"op":"free","\u006fp":"alloc","id":3}"#), bad("field given twice"));
        // A comma, a colon or an escaped quote inside a string is part of the string.
        let op = "op must be \"alloc\" or \"free\"";
        for text in [r#"{"op":"free,","id":1}"#, r#"{"op":"a:b","id":1}"#, r#"{"op":"fr\"ee","id":1}"#] {
            assert_eq!(line(text), bad(op), "{text}");
        }
        assert_eq!(line(r#"{"op":"free","i,d":1}"#), bad("unknown field"));
        assert_eq!(line(r#"{"op":"free","id:":1}"#), bad("unknown field"));
        // What JSON does not allow is refused: whitespace other than space, tab, CR and LF;
        // control characters and unknown or broken escapes in strings; a trailing comma; text
        // after the object; a lone surrogate.
        for (text, detail) in [
            ("{\"op\":\"free\",\u{a0}\"id\":1}", "expected a field name in quotes"),
            ("{\"op\":\"free\"\u{b},\"id\":1}", "expected ',' or '}' after a value"),
            ("{\"op\":\"fr\u{1}ee\",\"id\":1}", "control character in a string"),
            (r#"{"op":"fr\xee","id":1}"#, "unknown escape in a string"),
            (r#"{"op":"fr\u00e","id":1}"#, "\\u escape without four hex digits"),
            (r#"{"op":"\ud800","id":1}"#, "\\u escape of a lone surrogate"),
            (r#"{"op":"free","id":1,}"#, "expected a field name in quotes"),
            (r#"{"op":"free","id":1} x"#, "text after the object"),
            (r#"{"op":"free","id":1}}"#, "text after the object"),
            (r#"{"op":"free","id":1"#, "expected ',' or '}' after a value"),
            (r#"{"op":"free"  "id":1}"#, "expected ',' or '}' after a value"),
            (r#"{"op" "free","id":1}"#, "field without a value"),
            (r#"{"op":"free","id":1,"note":"x"}"#, "unknown field"),
            (r#"{"op":"free,"id":1}"#, "expected ',' or '}' after a value"),
            (r#"{"op":"free"#, "string without its closing quote"),
        ] {
            assert_eq!(line(text), bad(detail), "{text}");
        }
        // A surrogate pair is one character (not an op, but read whole).
        assert_eq!(line(r#"{"op":"\ud83d\ude00","id":1}"#), bad(op));
        // Blank lines are JSON whitespace alone.
        assert_eq!(
            parse_jsonl(" \t\r\n{\"op\":\"free\",\"id\":1}\n\r\n"),
            Ok(alloc::vec![TraceEvent::Deallocate { id: 1 }])
        );
        assert!(parse_jsonl("\u{a0}\n").is_err());
    }

    proptest::proptest! {
        /// Any text, above all pieces of JSON with escapes cut short, is an event or an error,
        /// never a panic; and a line that parses reads the same with its keys' letters escaped.
        #[test]
        fn any_line_parses_or_is_refused(
            line in proptest::string::string_regex(r#"[{}":,\\/u0-9a-fdlopsizeADF \t\u{a0}\u{1F600}]{0,40}"#).unwrap(),
            noise in ".{0,12}",
        ) {
            let _ = TraceEvent::parse_json(&line, 1);
            let _ = TraceEvent::parse_json(&noise, 1);
            if let Ok(event) = TraceEvent::parse_json(&line, 1) {
                let escaped = line.replace("\"id\"", "\"\\u0069d\"").replace("\"op\"", "\"o\\u0070\"");
                proptest::prop_assert_eq!(TraceEvent::parse_json(&escaped, 1), Ok(event));
            }
        }
    }

    #[test]
    fn numbers_are_json_integers_and_a_free_has_only_its_id() {
        let bad = |line: &str| parse_jsonl(&alloc::format!("{{\"op\":\"free\",\"id\":1}}\n{line}")).unwrap_err();
        for number in ["+8", "08", "00", "-0", "8.0", "1e3", "0x8", "", "\"8\""] {
            let line = alloc::format!("{{\"op\":\"alloc\",\"id\":1,\"size\":{number}}}");
            let detail = "expected an unsigned integer (digits, no sign, no leading zero)";
            assert_eq!(bad(&line), Error::BadInput { what: "trace line", number: 2, detail }, "{line}");
        }
        let too_large = Error::BadInput { what: "trace line", number: 2, detail: "number past 2^64 - 1" };
        assert_eq!(bad(r#"{"op":"free","id":18446744073709551616}"#), too_large);
        for line in [r#"{"op":"free","id":1,"size":8}"#, r#"{"align":16,"op":"free","id":1}"#] {
            let detail = "a free has no size or alignment";
            assert_eq!(bad(line), Error::BadInput { what: "trace line", number: 2, detail }, "{line}");
        }
        // Zero is one digit; the largest id is whole.
        let ok =
            concat!(r#"{"op":"alloc","id":0,"size":10,"align":1}"#, "\n", r#"{"op":"free","id":18446744073709551615}"#);
        assert_eq!(
            parse_jsonl(ok).unwrap(),
            [TraceEvent::Allocate { id: 0, size: 10, align: 1 }, TraceEvent::Deallocate { id: u64::MAX }]
        );
    }

    #[test]
    fn requests_no_pool_can_serve_are_bad_events_that_say_why() {
        let alloc = |size, align| TraceEvent::Allocate { id: 1, size, align };
        let ok = alloc(64, 16);
        for (bad, detail) in [
            (alloc(0, 16), "allocation of zero bytes"),
            (alloc(64, 0), "alignment is not a power of two"),
            (alloc(64, 24), "alignment is not a power of two"),
            (alloc(isize::MAX as usize, 16), "size past isize::MAX bytes once aligned"),
        ] {
            let events = [TraceEvent::Allocate { id: 0, size: 8, align: 8 }, bad, TraceEvent::Deallocate { id: 1 }];
            assert_eq!(Replay::new(&events).unwrap_err(), Error::BadInput { what: "trace event", number: 2, detail });
        }
        // Requests some pool can serve stay in, even where one pool refuses them (a fixed pool
        // its larger sizes, a pool over a small budget its larger blocks).
        let largest = TraceEvent::Allocate { id: 2, size: isize::MAX as usize - 15, align: 16 };
        assert_eq!(Replay::new(&[ok, largest]).map(|r| r.len()), Ok(2));
    }

    #[test]
    fn ids_are_64_bit_on_every_target() {
        // On a 32-bit target these two ids would collide if cut to `usize`.
        let big = 1 + (1u64 << 32);
        let events = [
            TraceEvent::Allocate { id: 1, size: 16, align: 16 },
            TraceEvent::Allocate { id: big, size: 32, align: 16 },
            TraceEvent::Deallocate { id: big },
        ];
        let replay = Replay::new(&events).unwrap();
        let mut pool = QuickPool::new(HostResource);
        let outcome = replay.run(&mut pool).unwrap();
        assert_eq!((outcome.stats.allocation_count, outcome.stats.requested_size), (1, 16));
    }

    #[test]
    fn a_recorded_trace_replays_to_the_same_state() {
        let mut traced = TracedPool::new(QuickPool::new(HostResource));
        let mut live = Vec::new();
        for i in 0..300usize {
            live.push(traced.allocate(64 + i * 37 % 5000, 16).unwrap());
            if i % 3 == 2 {
                let p = live.swap_remove(i * 7 % live.len());
                traced.deallocate(p).unwrap();
            }
        }
        let (pool, events) = traced.into_parts();
        let replay = Replay::new(&parse_jsonl(&to_jsonl(&events)).unwrap()).unwrap();
        assert_eq!(replay.len(), 400);
        let mut fresh = QuickPool::new(HostResource);
        let outcome = replay.run(&mut fresh).unwrap();
        fresh.check().unwrap();
        assert_eq!(outcome.failed_allocations, 0);
        let (a, b) = (pool.stats(), outcome.stats);
        assert_eq!(
            (a.current_size, a.allocation_count, a.high_watermark),
            (b.current_size, b.allocation_count, b.high_watermark)
        );
    }
}
