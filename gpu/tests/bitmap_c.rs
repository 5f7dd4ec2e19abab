//! The device-side bitmap allocator (`include/hetmem_bitmap.h`) built as plain C with the host
//! compiler: its layout is the Rust allocator's, field by field, and a C process and the Rust
//! allocator share one heap in a POSIX shared-memory segment, each freeing what the other
//! allocated while both run. The same code runs in kernels with the device's atomics; this is
//! the part a machine without a GPU can check. Without a C compiler the tests say so and pass.
#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::allocators::{BitmapAllocator, BitmapConfig, BitmapHeader, ClassRecord, BITMAP_MAGIC};
use hetmem_core::region::Region;
use hetmem_core::{AllocatorId, AllocatorType, MemoryBackend, OffsetPtr, RegionAllocator};

/// Compiles `tests/bitmap_c/{name}.c` against the header; `Err` (why) without a C compiler.
fn build(name: &str) -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // One file per build: tests build the same program at once.
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, Ordering::Relaxed);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bitmap-{name}-{}-{n}", std::process::id()));
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let run = Command::new(&cc)
        .args(["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(dir.join("include"))
        .arg(dir.join("tests/bitmap_c").join(format!("{name}.c")))
        .arg("-o")
        .arg(&out)
        .arg("-lrt")
        .output()
        .map_err(|e| format!("running {cc:?}: {e}"))?;
    if !run.status.success() {
        // A compiler that runs but rejects the header is a failure of the header, not a skip.
        panic!("{cc:?} rejected tests/bitmap_c/{name}.c:\n{}", String::from_utf8_lossy(&run.stderr));
    }
    Ok(out)
}

/// [`build`]'s program, or `None` without a C compiler (the test says so and passes).
fn program(name: &str) -> Option<PathBuf> {
    build(name).map_err(|why| println!("skipped: no C compiler: {why}")).ok()
}

fn run(program: &Path, args: &[String]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program:?} failed: {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_c_layout_is_the_rust_layout() {
    let Some(program) = program("layout") else { return };
    let text = run(&program, &[]);
    let _ = std::fs::remove_file(&program);
    let c: HashMap<String, u64> = text
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    use std::mem::{offset_of, size_of};
    let id = offset_of!(BitmapHeader, id);
    let rust = [
        ("sizeof.header", size_of::<BitmapHeader>()),
        ("sizeof.class", size_of::<ClassRecord>()),
        ("hetmem_bitmap_header.magic", offset_of!(BitmapHeader, magic)),
        ("hetmem_bitmap_header.type_id", offset_of!(BitmapHeader, type_id)),
        ("hetmem_bitmap_header.class_count", offset_of!(BitmapHeader, class_count)),
        ("hetmem_bitmap_header.id_major", id + offset_of!(AllocatorId, major)),
        ("hetmem_bitmap_header.id_minor", id + offset_of!(AllocatorId, minor)),
        ("hetmem_bitmap_header.region_offset", offset_of!(BitmapHeader, region_offset)),
        ("hetmem_bitmap_header.region_len", offset_of!(BitmapHeader, region_len)),
        ("hetmem_bitmap_header.classes", offset_of!(BitmapHeader, classes)),
        ("hetmem_bitmap_class.block_size", offset_of!(ClassRecord, block_size)),
        ("hetmem_bitmap_class.blocks", offset_of!(ClassRecord, blocks)),
        ("hetmem_bitmap_class.bitmap", offset_of!(ClassRecord, bitmap)),
        ("hetmem_bitmap_class.sizes", offset_of!(ClassRecord, sizes)),
        ("hetmem_bitmap_class.data", offset_of!(ClassRecord, data)),
        ("hetmem_bitmap_class.hint", offset_of!(ClassRecord, hint)),
        ("hetmem_bitmap_class.allocations", offset_of!(ClassRecord, allocations)),
        ("hetmem_bitmap_class.frees", offset_of!(ClassRecord, frees)),
        ("hetmem_bitmap_class.peak", offset_of!(ClassRecord, peak)),
    ];
    for (name, rust) in rust {
        assert_eq!(c.get(name).copied(), Some(rust as u64), "{name}");
    }
    assert_eq!(c["magic"], BITMAP_MAGIC);
    assert_eq!(c["type_id"], u64::from(<BitmapAllocator as AllocatorType>::TYPE_ID));
}

/// Allocations the C process makes (it keeps two in three).
const COUNT: usize = 12000;

#[test]
fn a_c_process_and_the_rust_allocator_share_one_heap() {
    let Some(program) = program("share") else { return };
    let name = format!("/hetmem-bitmap-c-{}", std::process::id());
    let backend: Arc<dyn MemoryBackend> =
        Arc::new(PosixShmBackend::create(&name, 64 << 20, &ShmOptions::default()).unwrap());
    let config = BitmapConfig { min_block: 16, max_block: 4096 };
    // Room for everything both sides keep at once: out of memory is not what this tests.
    // SAFETY: the test's own segment, which only this allocator (and its attachers) use.
    let region = unsafe { Region::whole(backend.clone()) }.unwrap();
    let a = BitmapAllocator::create(region, AllocatorId::new(1, 0), &config).unwrap();
    let start = a.stats();
    let base = backend.base();
    let theirs = a.allocate(300, 16).unwrap();
    // First alone: C frees a block Rust allocated, and the error cases around it.
    let region = [a.region().offset().to_string(), a.region().len().to_string()];
    let args = |count: usize, theirs: u64| {
        let mut args = vec![name.clone()];
        args.extend(region.iter().cloned().chain([count.to_string(), theirs.to_string()]));
        args
    };
    let checks = run(&program, &args(0, theirs.get()));
    let expected = [
        "size-theirs 300",   // C reads the size Rust recorded
        "free-inside -1",    // not the start of a block
        "free-outside -1",   // not in the allocator's blocks
        "wrong-region 0 -3", // no bitmap header there
        "wrong-length 0 -3", // the header is for a shorter region
        "free-theirs 0",     // C frees a block Rust allocated
        "free-again -2",     // a double free is refused
        "size-freed 0",
        "bad 0 0 0 0", // zero size, alignment 3, alignment 8192, 1 TiB
    ];
    assert_eq!(checks.lines().collect::<Vec<_>>(), expected);
    assert!(matches!(a.size_of(theirs), Err(hetmem_core::Error::InvalidFree { .. })), "Rust sees C's free");
    a.check().unwrap();

    // Then at once: Rust threads allocate and free in the heap while the C process does.
    let stop = AtomicBool::new(false);
    let output = std::thread::scope(|s| {
        for t in 0..2u64 {
            let (a, stop) = (&a, &stop);
            s.spawn(move || {
                let mut live = Vec::new();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i += 2;
                    live.push(a.allocate(1 + (i as usize * 31) % 2000, 8).unwrap());
                    if live.len() > 32 {
                        a.free(live.swap_remove(i as usize % live.len())).unwrap();
                    }
                }
                for p in live {
                    a.free(p).unwrap();
                }
            });
        }
        // Stops the threads however the run ends (a panic here must not leave them spinning).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        run(&program, &args(COUNT, 0))
    });
    let _ = std::fs::remove_file(&program);

    let mut kept = Vec::new();
    let (mut freed, mut oom) = (0, 0);
    for line in output.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words[0] {
            "freed" => {
                assert_eq!(words[1], "0");
                freed += 1;
            }
            "oom" => oom += 1,
            "live" => {
                let v: Vec<u64> = words[1..].iter().map(|w| w.parse().unwrap()).collect();
                kept.push((v[0], v[1], v[2], v[3] as u8));
            }
            other => panic!("unexpected line from the C process: {other}"),
        }
    }
    assert_eq!(oom, 0);
    assert_eq!(freed + kept.len(), COUNT);
    for &(offset, size, align, tag) in &kept {
        assert_eq!(offset % align, 0);
        assert_eq!(a.size_of(OffsetPtr::new(offset)).unwrap(), size as usize, "Rust reads the size C recorded");
        // SAFETY: a live block of `size` bytes in the mapped segment, no longer used by C.
        let bytes = unsafe { std::slice::from_raw_parts(base.add(offset as usize), size as usize) };
        assert!(bytes.iter().all(|&b| b == tag), "a block C filled was handed out again");
    }
    a.check().unwrap();
    for &(offset, ..) in &kept {
        a.free(OffsetPtr::new(offset)).unwrap();
    }
    a.check().unwrap();
    let end = a.stats();
    assert_eq!((end.free_bytes(), end.live_allocations, end.bytes_in_use), (start.free_bytes(), 0, 0));
    assert_eq!(end.total_allocations, end.total_frees);
    assert!(end.total_allocations > COUNT as u64, "the C process's allocations count as any other");
}

/// A heap in part of a segment, and its header, as another process could leave it.
struct Damaged {
    backend: Arc<dyn MemoryBackend>,
    name: String,
    a: BitmapAllocator,
}

impl Damaged {
    /// A bitmap allocator in 256 KiB of a 1 MiB segment: the rest is mapped, but not the
    /// allocator's.
    fn new(tag: &str) -> Damaged {
        let name = format!("/hetmem-bitmap-{tag}-{}", std::process::id());
        let backend: Arc<dyn MemoryBackend> =
            Arc::new(PosixShmBackend::create(&name, 1 << 20, &ShmOptions::default()).unwrap());
        // SAFETY: the test's own segment, whose range only this allocator (and its attachers) use.
        let region = unsafe { Region::new(backend.clone(), 4096, 256 << 10) }.unwrap();
        let config = BitmapConfig { min_block: 16, max_block: 4096 };
        let a = BitmapAllocator::create(region, AllocatorId::new(1, 0), &config).unwrap();
        Damaged { backend, name, a }
    }

    /// Arguments for `hostile`: the segment, and the region as its owner knows it.
    fn args(&self, rest: &[&str]) -> Vec<String> {
        let r = self.a.region();
        let mut args = vec![self.name.clone(), r.offset().to_string(), r.len().to_string()];
        args.extend(rest.iter().map(|s| s.to_string()));
        args
    }

    fn header(&self) -> *mut BitmapHeader {
        let r = self.a.region();
        r.ptr(r.offset(), std::mem::size_of::<BitmapHeader>() as u64).unwrap().cast()
    }
}

/// The region's bounds come from the C side's caller, never from the heap: a header that claims
/// the whole segment, with a class moved past the region's end, gets no block there.
#[test]
fn the_c_side_keeps_to_the_region_its_caller_names() {
    let Some(program) = program("hostile") else { return };
    let d = Damaged::new("region");
    let end = d.a.region().end();
    let h = d.header();
    // SAFETY: the header in the mapped segment; no one else uses the heap during the test. The
    // fields written are plain integers the allocator copied at create.
    let saved = unsafe {
        let top = std::ptr::addr_of_mut!((*h).classes[8]);
        assert_eq!((*top).block_size, 4096);
        let saved = ((*h).region_len, (*top).data);
        (*h).region_len = d.backend.len() - d.a.region().offset();
        (*top).data = end;
        saved
    };
    let out = run(&program, &d.args(&["region"]));
    let _ = std::fs::remove_file(&program);
    let offset: u64 = out.trim().strip_prefix("alloc ").unwrap().parse().unwrap();
    assert!(offset == 0 || d.a.region().contains(offset, 4096), "a block at {offset}, past the region's end {end}");
    // SAFETY: as above.
    unsafe { ((*h).region_len, (*h).classes[8].data) = saved };
    d.a.check().unwrap();
    assert_eq!(d.a.stats().live_allocations, 0);
}

/// The C side reads a class's fixed fields once per call and uses what it checked: a header
/// changed during a call (here by a timer signal, between any two instructions) makes the call
/// fail, never hand out an offset outside the region or lose a block.
#[test]
fn the_c_side_uses_the_class_fields_it_checked() {
    let Some(program) = program("hostile") else { return };
    let d = Damaged::new("race");
    let start = d.a.stats();
    let out = run(&program, &d.args(&["race", "500"]));
    let _ = std::fs::remove_file(&program);
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!((words[0], words[2], words[4], words[6]), ("escaped", "lost", "calls", "refused"), "{out}");
    println!("{out}");
    assert_eq!((words[1], words[3]), ("0", "0"), "{out}");
    let refused: u64 = words[7].parse().unwrap();
    assert!(refused > 0, "the damage was never seen: {out}");
    d.a.check().unwrap();
    assert_eq!(d.a.stats().free_bytes(), start.free_bytes());
}

/// The C side checks every class it reads as Rust's attach does, order and overlap included: a
/// class table Rust refuses, the C side refuses too. And a block's recorded size that does not
/// fit the block is not handed on.
#[test]
fn the_c_side_refuses_what_rust_refuses() {
    let Some(program) = program("hostile") else { return };
    let d = Damaged::new("refuse");
    let h = d.header();
    let probe = |at: u64| run(&program, &d.args(&["probe", "16", &at.to_string()]));
    // Offset 1 is in no class: a free of it reads every class, then says "not a block".
    let whole = probe(1);
    assert!(!whole.starts_with("alloc 0 ") && whole.ends_with(" size 0 free -1\n"), "{whole}");
    type Damage = fn(&mut BitmapHeader);
    let damages: [(&str, Damage); 3] = [
        ("class 0's sizes inside its bitmap", |h| h.classes[0].sizes = h.classes[0].bitmap),
        ("class 1's blocks no larger than class 0's", |h| h.classes[1].block_size = 16),
        ("class 1's bitmap inside class 0's blocks", |h| h.classes[1].bitmap = h.classes[0].data),
    ];
    for (what, damage) in damages {
        // SAFETY: the header's bytes, in the mapped segment.
        let saved: Vec<u8> = unsafe { std::slice::from_raw_parts(h.cast::<u8>(), 4160) }.to_vec();
        // SAFETY: the header in the mapped segment, aligned; no one else uses the heap during the
        // test, and the allocator holds no reference into it between its calls.
        damage(unsafe { &mut *h });
        let r = d.a.region();
        // SAFETY: the bitmap allocator's own range; attaching another handle to it is what every
        // attacher does (and this one is refused).
        let region = unsafe { Region::new(Arc::clone(r.backend()), r.offset(), r.len()) }.unwrap();
        let refused = BitmapAllocator::attach(region, AllocatorId::new(1, 0));
        assert!(matches!(refused, Err(hetmem_core::Error::Corrupt { .. })), "Rust takes {what}");
        let out = probe(1);
        assert!(out.ends_with(" size 0 free -3\n"), "C takes {what}: {out}");
        if what.starts_with("class 0") {
            assert!(out.starts_with("alloc 0 "), "C allocates in {what}: {out}");
        }
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(saved.as_ptr(), h.cast::<u8>(), saved.len()) };
    }
    // A recorded size past the block's end: not a size C hands on (the block frees as any other).
    let p = d.a.allocate(16, 16).unwrap();
    // SAFETY: as above.
    let (sizes, data) = unsafe { ((*h).classes[0].sizes, (*h).classes[0].data) };
    let slot = d.a.region().ptr(sizes + (p.get() - data) / 16 * 4, 4).unwrap().cast::<u32>();
    // SAFETY: `p`'s size slot, in the region; C reads it only after this write.
    unsafe { slot.write(1 << 31) };
    let out = probe(p.get());
    let _ = std::fs::remove_file(&program);
    assert!(out.ends_with(" size 0 free 0\n"), "C hands on a size past the block: {out}");
    d.a.check().unwrap();
    assert_eq!(d.a.stats().live_allocations, 0);
}
