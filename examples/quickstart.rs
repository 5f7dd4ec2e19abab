//! Two processes share memory through hetmem.
//!
//! Process A creates a POSIX shared-memory segment with a stack allocator in it, writes a message,
//! and starts process B (this program again). B attaches to the segment by name, finds A's message
//! through its own memory manager, allocates a reply and writes it. A reads the reply, prints the
//! allocator's statistics, frees everything and removes the segment. The segment is removed also
//! when something fails: the creating backend unlinks its name when dropped.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};

use hetmem::prelude::*;

const ALLOCATOR: AllocatorId = AllocatorId::new(1, 0);

/// Lives in the segment: where B left its reply. Offsets only, no pointers.
#[repr(C)]
struct Mailbox {
    reply_offset: AtomicU64,
    reply_len: AtomicU64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("--child") => child(&args[2..]),
        _ => parent(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parent() -> Result<(), Box<dyn std::error::Error>> {
    let name = format!("/hetmem-quickstart-{}", std::process::id());
    let mm = MemoryManager::new();
    let shm = mm.add_backend(PosixShmBackend::create(&name, 1 << 20, &ShmOptions::default())?)?;
    let stack = mm.create_allocator::<StackAllocator>(shm.id(), ALLOCATOR, 0, &Default::default())?;
    println!("[A pid {}] created {name} ({} KiB), mapped at {:p}", std::process::id(), shm.len() / 1024, shm.base());

    let message = format!("hello from process A (pid {})", std::process::id());
    let msg = mm.allocate(ALLOCATOR, message.len(), 1)?;
    // SAFETY: a fresh block of message.len() bytes.
    unsafe { msg.ptr.copy_from_nonoverlapping(message.as_ptr(), message.len()) };
    let mailbox = mm.allocate(ALLOCATOR, size_of::<Mailbox>(), align_of::<Mailbox>())?;
    let mailbox_ptr = mm.to_local::<Mailbox>(mailbox.shm)?.ptr;
    // SAFETY: a fresh, aligned block the size of a Mailbox; atomics are valid for any bytes.
    unsafe { mailbox_ptr.write(Mailbox { reply_offset: AtomicU64::new(0), reply_len: AtomicU64::new(0) }) };
    println!("[A] wrote {message:?} at {}", msg.shm);

    let status = Command::new(std::env::current_exe()?)
        .args(["--child", &name])
        .args([msg.shm.offset.get(), message.len() as u64, mailbox.shm.offset.get()].map(|n| n.to_string()))
        .status()?;
    if !status.success() {
        return Err(format!("process B failed ({status})").into());
    }

    // SAFETY: the mailbox lives in the segment until we free it below.
    let mailbox_ref = unsafe { &*mailbox_ptr };
    let reply = ShmPtr::new(ALLOCATOR, OffsetPtr::new(mailbox_ref.reply_offset.load(Ordering::Acquire)));
    let reply_len = mailbox_ref.reply_len.load(Ordering::Acquire) as usize;
    let text = read_text(&mm, reply, reply_len)?;
    println!("[A] read B's reply at {reply}: {text:?}");
    print_stats("A, with both processes' blocks live", &stack.stats());

    for p in [reply, mailbox.shm, msg.shm] {
        mm.free(p)?;
    }
    stack.check()?;
    print_stats("A, after freeing everything", &stack.stats());
    mm.destroy_backend(shm.id())?;
    println!("[A] removed {name}");
    Ok(())
}

fn child(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [name, msg_offset, msg_len, mailbox_offset] = args else {
        return Err("usage: quickstart --child NAME MSG_OFFSET MSG_LEN MAILBOX_OFFSET".into());
    };
    let mm = MemoryManager::new();
    let shm = mm.add_backend(PosixShmBackend::attach(name, &ShmOptions::default())?)?;
    let stack = mm.attach_allocator::<StackAllocator>(shm.id(), ALLOCATOR)?;
    println!("[B pid {}] attached {name}, mapped at {:p}", std::process::id(), shm.base());

    let msg = ShmPtr::new(ALLOCATOR, OffsetPtr::new(msg_offset.parse()?));
    println!("[B] read A's message at {msg}: {:?}", read_text(&mm, msg, msg_len.parse()?)?);

    let reply = format!("hello back from process B (pid {})", std::process::id());
    let block = mm.allocate(ALLOCATOR, reply.len(), 1)?;
    // SAFETY: a fresh block of reply.len() bytes.
    unsafe { block.ptr.copy_from_nonoverlapping(reply.as_ptr(), reply.len()) };
    let mailbox = mm.to_local::<Mailbox>(ShmPtr::new(ALLOCATOR, OffsetPtr::new(mailbox_offset.parse()?)))?;
    // SAFETY: A initialised the mailbox before starting us and keeps it live until we exit.
    let mailbox = unsafe { &*mailbox.ptr };
    mailbox.reply_len.store(reply.len() as u64, Ordering::Release);
    mailbox.reply_offset.store(block.shm.offset.get(), Ordering::Release);
    println!("[B] wrote {reply:?} at {}", block.shm);
    print_stats("B", &stack.stats());
    Ok(())
}

/// Reads `len` bytes of UTF-8 text at `ptr`, checked against the allocator's region.
fn read_text(mm: &MemoryManager, ptr: ShmPtr, len: usize) -> Result<String, Box<dyn std::error::Error>> {
    let allocator = mm.allocator_dyn(ptr.allocator)?;
    let bytes = allocator.region().ptr(ptr.offset.get(), len as u64)?;
    // SAFETY: `len` bytes in the region (checked above), written by the other process before it
    // published the pointer.
    let slice = unsafe { std::slice::from_raw_parts(bytes, len) };
    Ok(String::from_utf8(slice.to_vec())?)
}

fn print_stats(who: &str, s: &hetmem::AllocStats) {
    println!(
        "[{who}] stack allocator: {} live blocks, {} B in use, {} B reserved of {} B, high watermark {} B, \
         {} allocations, {} frees",
        s.live_allocations,
        s.bytes_in_use,
        s.bytes_reserved,
        s.capacity,
        s.high_watermark,
        s.total_allocations,
        s.total_frees
    );
}
