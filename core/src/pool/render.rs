//! Pictures of a pool: its blocks as SVG or as a text map, and a report of live allocations.
//!
//! All three read only the pool's bookkeeping ([`Pool::for_each_block`],
//! [`Pool::live_allocations`], [`Pool::stats`]), so they work for device memory too.

use alloc::format;
use alloc::string::String;
use core::fmt::{self, Write};

use super::{BlockInfo, Pool, PoolStats};

/// Bytes in the largest binary unit that keeps the number at least 1 ("1.5 MiB").
pub struct Bytes(pub usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        // From 1023.95 on, one decimal reads "1024.0": that is one of the next unit.
        while value >= 1023.95 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// The pool's figures in one line; `walked` is the blocks and free blocks the picture below it
/// shows, which a pool may count differently in its stats (a fixed pool counts every slot, and
/// walks runs of them).
fn summary(name: &str, s: &PoolStats, walked: Walked) -> String {
    format!(
        "{name} pool: actual {} in {} upstream blocks, current {}, high watermark {}, {} live allocations, \
         {} blocks ({} free)",
        Bytes(s.actual_size),
        s.upstream_blocks,
        Bytes(s.current_size),
        Bytes(s.high_watermark),
        s.allocation_count,
        walked.blocks,
        walked.free,
    )
}

/// Blocks counted as [`Pool::for_each_block`] walks them.
#[derive(Clone, Copy, Default)]
struct Walked {
    blocks: usize,
    free: usize,
}

impl Walked {
    fn count(&mut self, b: &BlockInfo) {
        self.blocks += 1;
        self.free += usize::from(!b.used);
    }
}

/// `text` with the characters that XML reads as markup written as entities, and those XML 1.0
/// forbids even as entities (control characters but tab, newline and carriage return; U+FFFE,
/// U+FFFF) replaced by U+FFFD (a pool names itself).
fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\t' | '\n' | '\r' => out.push(c),
            '\0'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => out.push(char::REPLACEMENT_CHARACTER),
            c => out.push(c),
        }
    }
    out
}

/// A summary line, then one line per block: upstream block, its address, the block's offset in
/// it, size, and state. The summary's block counts are those of the lines below it.
pub fn text_map(pool: &(impl Pool + ?Sized)) -> String {
    let (mut lines, mut walked) = (String::new(), Walked::default());
    pool.for_each_block(&mut |b| {
        walked.count(&b);
        let state = if b.used { "used" } else { "free" };
        // Writing to a String cannot fail.
        let _ = writeln!(lines, "chunk {:>3} @{:#x} +{:#012x} {:>12} {state}", b.chunk, b.chunk_addr, b.offset, b.size);
    });
    let mut out = summary(pool.name(), &pool.stats(), walked);
    out.push('\n');
    out.push_str(&lines);
    out
}

/// The pool as an SVG picture: one bar per upstream block (in address order), each spanning the
/// full width whatever its size, with used blocks red and free blocks green. Hovering a block
/// shows its offset and size. The summary's block counts are those of the bars.
pub fn svg(pool: &(impl Pool + ?Sized)) -> String {
    const WIDTH: f64 = 1000.0;
    const BAR: usize = 22;
    const ROW: usize = 44;
    const TOP: usize = 30;
    let stats = pool.stats();
    // A pool reports what it likes: coordinates past `usize::MAX` stop there rather than overflow.
    let row = |chunk: usize| TOP.saturating_add(chunk.saturating_mul(ROW));
    let height = row(stats.upstream_blocks.max(1));
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}">"#,
        w = WIDTH as usize + 20,
    );
    out.push_str("<style>.used{fill:#d9534f}.free{fill:#5cb85c}rect{stroke:#fff;stroke-width:0.5}");
    out.push_str("text{font:12px monospace;fill:#222}</style>\n");
    let (mut bars, mut walked, mut last_chunk) = (String::new(), Walked::default(), usize::MAX);
    pool.for_each_block(&mut |b| {
        walked.count(&b);
        let y = row(b.chunk);
        if b.chunk != last_chunk {
            last_chunk = b.chunk;
            let _ = writeln!(
                bars,
                r#"<text x="10" y="{}">upstream block {} at {:#x}, {}</text>"#,
                y.saturating_add(10),
                b.chunk,
                b.chunk_addr,
                Bytes(b.chunk_size)
            );
        }
        let scale = WIDTH / b.chunk_size.max(1) as f64;
        let state = if b.used { "used" } else { "free" };
        let _ = writeln!(
            bars,
            concat!(
                r#"<rect class="{state}" x="{:.2}" y="{}" width="{:.2}" height="{BAR}">"#,
                r#"<title>{state} +{:#x} {}</title></rect>"#
            ),
            10.0 + b.offset as f64 * scale,
            y.saturating_add(14),
            (b.size as f64 * scale).max(0.5),
            b.offset,
            Bytes(b.size),
            state = state,
            BAR = BAR,
        );
    });
    let _ = writeln!(out, r#"<text x="10" y="16">{}</text>"#, escaped(&summary(pool.name(), &stats, walked)));
    out.push_str(&bars);
    out.push_str("</svg>\n");
    out
}

/// Every live allocation, oldest first, with its sequence number: what was never freed.
pub fn live_report(pool: &(impl Pool + ?Sized)) -> String {
    let mut live = pool.live_allocations();
    live.sort_unstable_by_key(|a| a.sequence);
    // A pool reports what it likes; sizes past the address space are summed without overflowing.
    let requested = match live.iter().try_fold(0usize, |total, a| total.checked_add(a.size)) {
        Some(total) => format!("{}", Bytes(total)),
        None => format!("more than {}", Bytes(usize::MAX)),
    };
    let mut out = format!("{} live allocations in the {} pool, {requested} requested\n", live.len(), pool.name());
    for a in &live {
        let _ = writeln!(
            out,
            "#{:<8} {:#x} {:>12} (block {:>12}) upstream block {} +{:#x}",
            a.sequence, a.addr, a.size, a.block_size, a.chunk, a.offset
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{HostResource, LiveAllocation, QuickPool, QuickPoolConfig};

    #[test]
    fn bytes_read_naturally() {
        assert_eq!(alloc::format!("{}", Bytes(512)), "512 B");
        assert_eq!(alloc::format!("{}", Bytes(1536)), "1.5 KiB");
        assert_eq!(alloc::format!("{}", Bytes(3 << 30)), "3.0 GiB");
        // Just under a unit, rounded to one decimal, is one of that unit, not 1024 of the one
        // below.
        assert_eq!(alloc::format!("{}", Bytes((1 << 20) - 1)), "1.0 MiB");
        assert_eq!(alloc::format!("{}", Bytes((1 << 20) - 52)), "1023.9 KiB");
    }

    /// The largest sizes on 64-bit targets are exbibytes (a trace may ask for them).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn bytes_reach_exbibytes() {
        assert_eq!(alloc::format!("{}", Bytes(usize::MAX)), "16.0 EiB");
        assert_eq!(alloc::format!("{}", Bytes(1 << 60)), "1.0 EiB");
        assert_eq!(alloc::format!("{}", Bytes(1 << 50)), "1.0 PiB");
    }

    /// A pool with a name of the test's choosing (markup, control characters), as a user's pool
    /// may name itself.
    struct Named(QuickPool<HostResource>, &'static str);

    // SAFETY: forwards to a `QuickPool`.
    unsafe impl Pool for Named {
        fn name(&self) -> &str {
            self.1
        }
        fn memory_kind(&self) -> crate::resource::MemoryKind {
            self.0.memory_kind()
        }
        fn allocate(&mut self, size: usize, align: usize) -> crate::Result<core::ptr::NonNull<u8>> {
            self.0.allocate(size, align)
        }
        fn deallocate(&mut self, ptr: core::ptr::NonNull<u8>) -> crate::Result<()> {
            self.0.deallocate(ptr)
        }
        fn release(&mut self) -> usize {
            self.0.release()
        }
        fn stats(&self) -> PoolStats {
            self.0.stats()
        }
        fn for_each_block(&self, f: &mut dyn FnMut(crate::pool::BlockInfo)) {
            self.0.for_each_block(f)
        }
        fn live_allocations(&self) -> alloc::vec::Vec<crate::pool::LiveAllocation> {
            self.0.live_allocations()
        }
        fn check(&self) -> crate::Result<()> {
            self.0.check()
        }
    }

    /// A user's pool that reports what the test says, however absurd: the pictures and reports
    /// must not trust its figures to add up.
    #[derive(Default)]
    struct Claims {
        stats: PoolStats,
        blocks: alloc::vec::Vec<BlockInfo>,
        live: alloc::vec::Vec<LiveAllocation>,
    }

    // SAFETY: hands out no memory.
    unsafe impl Pool for Claims {
        fn name(&self) -> &str {
            "claims"
        }
        fn memory_kind(&self) -> crate::resource::MemoryKind {
            crate::resource::MemoryKind::Host
        }
        fn allocate(&mut self, _size: usize, _align: usize) -> crate::Result<core::ptr::NonNull<u8>> {
            Err(crate::Error::Unsupported("a pool of claims"))
        }
        fn deallocate(&mut self, ptr: core::ptr::NonNull<u8>) -> crate::Result<()> {
            Err(crate::Error::InvalidFree { offset: ptr.as_ptr() as u64, reason: "a pool of claims" })
        }
        fn release(&mut self) -> usize {
            0
        }
        fn stats(&self) -> PoolStats {
            self.stats
        }
        fn for_each_block(&self, f: &mut dyn FnMut(BlockInfo)) {
            self.blocks.iter().for_each(|&b| f(b))
        }
        fn live_allocations(&self) -> alloc::vec::Vec<LiveAllocation> {
            self.live.clone()
        }
        fn check(&self) -> crate::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_pool_named_with_markup_still_makes_well_formed_svg() {
        let mut pool = Named(QuickPool::new(HostResource), "<quick & co>");
        let _p = pool.allocate(100, 16).unwrap();
        let svg = svg(&pool);
        assert!(svg.contains("&lt;quick &amp; co&gt; pool: actual"), "{svg}");
        assert!(!svg.contains("<quick"), "{svg}");
    }

    #[test]
    fn characters_xml_forbids_in_a_name_do_not_reach_the_svg() {
        // XML 1.0 allows no control character but tab, newline and carriage return, nor
        // U+FFFE and U+FFFF, not even written as entities: each becomes U+FFFD.
        let pool = Named(QuickPool::new(HostResource), "a\u{0}b\u{1b}[31m\tc\u{fffe}\u{ffff}d\u{7f}");
        let svg = svg(&pool);
        let forbidden =
            |c: char| matches!(c, '\0'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}');
        assert!(!svg.chars().any(forbidden), "{svg:?}");
        assert!(svg.contains("a\u{fffd}b\u{fffd}[31m\tc\u{fffd}\u{fffd}d\u{7f} pool: actual"), "{svg:?}");
    }

    /// A user's pool may claim live allocations whose sizes add up past the address space: the
    /// report says so rather than overflowing.
    #[test]
    fn a_report_of_sizes_past_the_address_space_does_not_overflow() {
        let huge = LiveAllocation {
            addr: 0x1000,
            size: usize::MAX / 2 + 1,
            block_size: usize::MAX / 2 + 1,
            sequence: 0,
            chunk: 0,
            offset: 0,
        };
        let pool = Claims { live: alloc::vec![huge, LiveAllocation { sequence: 1, ..huge }], ..Claims::default() };
        let report = live_report(&pool);
        let expected =
            alloc::format!("2 live allocations in the claims pool, more than {} requested", Bytes(usize::MAX));
        assert!(report.starts_with(&expected), "{report}");
        assert_eq!(report.lines().count(), 3, "{report}");
    }

    /// A user's pool may number its upstream blocks past what an SVG's coordinates can count
    /// in: the picture is drawn without overflowing.
    #[test]
    fn an_svg_of_absurd_upstream_block_numbers_does_not_overflow() {
        let block =
            BlockInfo { chunk: usize::MAX, chunk_addr: 0x1000, chunk_size: 4096, offset: 0, size: 4096, used: true };
        let stats = PoolStats { upstream_blocks: usize::MAX, ..PoolStats::default() };
        let pool = Claims { stats, blocks: alloc::vec![block], ..Claims::default() };
        let svg = svg(&pool);
        assert_eq!(svg.matches("<rect").count(), 1, "{svg}");
        assert!(svg.ends_with("</svg>\n"), "{svg}");
    }

    /// A fixed pool counts every slot in its stats but walks runs of slots in one state: the
    /// pictures' summaries count the blocks they show.
    #[test]
    fn a_fixed_pools_pictures_count_the_blocks_they_show() {
        let config = crate::pool::FixedPoolConfig { objects_per_block: 8, ..crate::pool::FixedPoolConfig::new(64) };
        let mut pool = crate::pool::FixedPool::new(HostResource, config).unwrap();
        let a = pool.allocate(64, 16).unwrap();
        let b = pool.allocate(64, 16).unwrap();
        let _c = pool.allocate(64, 16).unwrap();
        pool.deallocate(b).unwrap();
        assert_eq!((pool.stats().total_blocks, pool.stats().free_blocks), (8, 6), "slots");
        let map = text_map(&pool);
        assert!(map.lines().next().unwrap().ends_with(", 4 blocks (2 free)"), "{map}");
        assert_eq!(map.lines().count(), 1 + 4, "{map}");
        assert_eq!(map.lines().filter(|l| l.ends_with(" free")).count(), 2, "{map}");
        let svg = svg(&pool);
        assert!(svg.contains(", 4 blocks (2 free)</text>"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 4, "{svg}");
        pool.deallocate(a).unwrap();
    }

    #[test]
    fn pictures_show_every_block() {
        let config = QuickPoolConfig { first_block_size: 4096, next_block_size: 4096, ..Default::default() };
        let mut pool = QuickPool::with_config(HostResource, config).unwrap();
        let a = pool.allocate(100, 16).unwrap();
        let _b = pool.allocate(200, 16).unwrap();
        let _c = pool.allocate(5000, 16).unwrap();
        pool.deallocate(a).unwrap();
        let map = text_map(&pool);
        let lines: alloc::vec::Vec<&str> = map.lines().collect();
        assert_eq!(lines.len(), 1 + pool.stats().total_blocks, "{map}");
        // Upstream blocks are listed by address, which depends on the system allocator.
        assert!(lines[1..].iter().any(|l| l.contains("+0x0000000000          112 free")), "{map}");
        assert!(lines[1..].iter().any(|l| l.contains("+0x0000000070          208 used")), "{map}");
        assert!(lines[1..].iter().any(|l| l.ends_with("5008 used")), "{map}");
        let svg = svg(&pool);
        assert_eq!(svg.matches("<rect").count(), pool.stats().total_blocks);
        assert_eq!(svg.matches("upstream block ").count(), 2);
        let report = live_report(&pool);
        assert!(report.starts_with("2 live allocations in the quick pool, 5.1 KiB requested"), "{report}");
        assert!(report.lines().nth(1).unwrap().starts_with("#1 "), "{report}");
    }
}
