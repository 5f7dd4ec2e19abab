//! [`MemoryManager`]: the registry of backends and allocators of one process.
//!
//! It is where an application creates, attaches and destroys backends and allocators, and where a
//! [`ShmPtr`] received from another process (or a GPU kernel) becomes a local address.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::allocator::{AllocatorType, RegionAllocator};
use crate::backend::{BackendId, MemoryBackend};
use crate::error::{Error, Result};
use crate::ptr::{AllocatorId, FullPtr, OffsetPtr, ShmPtr};
use crate::region::Region;

/// How long [`MemoryManager::attach_allocator`] waits for another process to finish creating an
/// allocator.
pub const DEFAULT_ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an attach waits at least for a region's allocator directory that a live process
/// holds locked, whatever its timeout: the lock is held for a moment (while an allocator is
/// reserved or looked up), except by a process stopped while it holds it.
const DIRECTORY_LOCK_PATIENCE: Duration = Duration::from_secs(1);

struct AllocatorEntry {
    backend: BackendId,
    dynamic: Arc<dyn RegionAllocator>,
    typed: Arc<dyn Any + Send + Sync>,
}

#[derive(Default)]
struct Registry {
    backends: BTreeMap<BackendId, Arc<dyn MemoryBackend>>,
    allocators: BTreeMap<AllocatorId, AllocatorEntry>,
    /// Ids a `create_allocator` of this manager is creating: no other create or attach of the
    /// manager takes them meanwhile.
    creating: BTreeSet<AllocatorId>,
}

impl Registry {
    /// Whether `b` is still the backend registered as `backend`: one destroyed or detached
    /// while an allocator in it was being created or attached takes that allocator with it.
    fn holds(&self, backend: BackendId, b: &Arc<dyn MemoryBackend>) -> bool {
        self.backends.get(&backend).is_some_and(|current| Arc::ptr_eq(current, b))
    }
}

/// A directory entry this process reserved and has not published: abandoned on drop, and its
/// space given back where no handle on its range (the lease's other holders) is left.
struct Reserved<'a> {
    backend: &'a Arc<dyn MemoryBackend>,
    id: AllocatorId,
    lease: Arc<()>,
    published: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        let header = self.backend.header();
        // The count cannot rise again once at one: only region handles on the range hold clones.
        if Arc::strong_count(&self.lease) == 1 {
            // SAFETY: the entry's creation failed, and no region handle on its range is left in
            // this process (the lease counts them all, duplicates included); no other process
            // uses a range whose entry is not ready.
            let _ = unsafe { header.give_back_allocator(self.id) };
        } else {
            // `A::create` kept a handle on the range somewhere: the space stays reserved.
            let _ = header.abandon_allocator(self.id);
        }
    }
}

/// An id in [`Registry::creating`], taken out again on drop.
struct Creating<'a> {
    manager: &'a MemoryManager,
    id: AllocatorId,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.manager.write().creating.remove(&self.id);
    }
}

fn already_exists(id: AllocatorId) -> Error {
    Error::AlreadyExists { what: "allocator", name: id.to_string().as_str().into() }
}

/// A registry of backends and allocators by id. Any number of each; all methods take `&self` and
/// may be called from any thread.
#[derive(Default)]
pub struct MemoryManager {
    registry: RwLock<Registry>,
}

impl MemoryManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide default manager, for code that does not want to pass one around.
    pub fn global() -> &'static MemoryManager {
        static GLOBAL: OnceLock<MemoryManager> = OnceLock::new();
        GLOBAL.get_or_init(MemoryManager::new)
    }

    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the maps half-updated (each update is one
        // insert or remove), so a poisoned lock is still consistent.
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a backend under the id in its header and returns it, shared.
    pub fn add_backend<B: MemoryBackend>(&self, backend: B) -> Result<Arc<B>> {
        let backend = Arc::new(backend);
        self.add_backend_arc(backend.clone())?;
        Ok(backend)
    }

    /// Registers an already shared backend.
    pub fn add_backend_arc(&self, backend: Arc<dyn MemoryBackend>) -> Result<BackendId> {
        let id = backend.id();
        let mut reg = self.write();
        if reg.backends.contains_key(&id) {
            return Err(Error::AlreadyExists { what: "backend", name: id.to_string().as_str().into() });
        }
        reg.backends.insert(id, backend);
        Ok(id)
    }

    /// The backend registered under `id`.
    pub fn backend(&self, id: BackendId) -> Result<Arc<dyn MemoryBackend>> {
        self.read().backends.get(&id).cloned().ok_or(Error::UnknownBackend(id))
    }

    /// The ids of every registered backend.
    pub fn backend_ids(&self) -> Vec<BackendId> {
        self.read().backends.keys().copied().collect()
    }

    /// Creates an allocator of type `A` in a new sub-region of `size` bytes (0: all that is left)
    /// of backend `backend`, records it in the region's directory, and registers it here.
    ///
    /// A creation that fails gives its directory entry and its space back, unless another
    /// reservation came after it (the directory only bumps) or `A::create` kept a handle on the
    /// range: then the space stays reserved, and only the id is free again.
    pub fn create_allocator<A: AllocatorType>(
        &self,
        backend: BackendId,
        id: AllocatorId,
        size: u64,
        config: &A::Config,
    ) -> Result<Arc<A>> {
        let b = self.backend(backend)?;
        {
            // The id is this call's from here: two threads creating it (in two backends, say)
            // would otherwise both publish an allocator, and only one could be registered.
            let mut reg = self.write();
            if reg.allocators.contains_key(&id) || !reg.creating.insert(id) {
                return Err(already_exists(id));
            }
        }
        // Given back however the creation ends (a panic in `A::create` included), once the
        // allocator, if any, is registered.
        let _creating = Creating { manager: self, id };
        pool_type_refused::<A>()?;
        let entry = b.header().reserve_allocator(A::TYPE_ID, id, size)?;
        // Until it is published, the entry is abandoned on every way out: an error, a failed
        // publish, or a panic in `create` (else it would stay "creating" while this process
        // lives, and the id could be neither attached nor created again).
        let mut reserved = Reserved { backend: &b, id, lease: Arc::new(()), published: false };
        // SAFETY: the directory gave the range to this id alone, for an allocator of type `A`,
        // which is no `BackendResource` (refused above).
        let region = unsafe { Region::new(b.clone(), entry.offset, entry.size) }?.leased(reserved.lease.clone());
        let allocator = Arc::new(A::create(region, id, config)?);
        // Published and registered under the lock, with the backend still registered: a backend
        // destroyed or detached meanwhile takes the creation with it, as if it had come first,
        // rather than leaving an allocator registered here without its backend.
        let mut reg = self.write();
        if !reg.holds(backend, &b) {
            // The allocator first, so that `reserved` finds no handle on the range left.
            drop(allocator);
            return Err(Error::UnknownBackend(backend));
        }
        b.header().publish_allocator(id)?;
        reserved.published = true;
        let entry = AllocatorEntry { backend, dynamic: allocator.clone(), typed: allocator.clone() };
        reg.allocators.insert(id, entry);
        Ok(allocator)
    }

    /// Attaches to allocator `id`, which some process created in backend `backend`, waiting up to
    /// [`DEFAULT_ATTACH_TIMEOUT`] for its creator to finish (`TimedOut` past it). The region's
    /// allocator directory, which a live process may hold locked for good (stopped while it held
    /// it), is waited for as long, or a second where that is longer, then `TimedOut` too. An id
    /// the directory does not name at all is `UnknownAllocator` as soon as it is read, without
    /// waiting: its creator has not started on it (or never will), and only the application
    /// knows when it will, so an attacher that may come first waits for the creator's word, or
    /// retries.
    pub fn attach_allocator<A: AllocatorType>(&self, backend: BackendId, id: AllocatorId) -> Result<Arc<A>> {
        self.attach_allocator_within::<A>(backend, id, DEFAULT_ATTACH_TIMEOUT)
    }

    /// [`attach_allocator`](Self::attach_allocator) with a chosen timeout.
    pub fn attach_allocator_within<A: AllocatorType>(
        &self,
        backend: BackendId,
        id: AllocatorId,
        timeout: Duration,
    ) -> Result<Arc<A>> {
        pool_type_refused::<A>()?;
        let b = self.backend(backend)?;
        let started = Instant::now();
        let entry = loop {
            // The directory's lock is not waited for without end: a process stopped while it
            // holds the lock holds it for good.
            let locked = match b.header().try_find_allocator(id) {
                Some(found) => {
                    if let Some(entry) = found? {
                        break entry;
                    }
                    false
                }
                None => true,
            };
            if started.elapsed() >= if locked { timeout.max(DIRECTORY_LOCK_PATIENCE) } else { timeout } {
                return Err(Error::TimedOut {
                    what: if locked {
                        "the region's allocator directory, which a live process holds locked"
                    } else {
                        "an allocator's creator to finish"
                    },
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if entry.type_id != A::TYPE_ID {
            return Err(Error::HeaderMismatch {
                field: "allocator type",
                expected: A::TYPE_ID as u64,
                found: entry.type_id as u64,
            });
        }
        // SAFETY: the directory gave the range to an allocator of type `A` (checked above), which
        // is no `BackendResource` (refused above): a region allocator, over whose state this
        // attaches.
        let region = unsafe { Region::new(b.clone(), entry.offset, entry.size) }?;
        let allocator = Arc::new(A::attach(region, id)?);
        self.register(&b, backend, id, allocator.clone())?;
        Ok(allocator)
    }

    /// Registers an attached allocator, unless its backend `b` was destroyed or detached
    /// meanwhile (then it goes with its backend) or `id` was taken.
    fn register<A: AllocatorType>(
        &self,
        b: &Arc<dyn MemoryBackend>,
        backend: BackendId,
        id: AllocatorId,
        allocator: Arc<A>,
    ) -> Result<()> {
        let mut reg = self.write();
        if !reg.holds(backend, b) {
            return Err(Error::UnknownBackend(backend));
        }
        if reg.allocators.contains_key(&id) || reg.creating.contains(&id) {
            return Err(already_exists(id));
        }
        let entry = AllocatorEntry { backend, dynamic: allocator.clone(), typed: allocator };
        reg.allocators.insert(id, entry);
        Ok(())
    }

    /// The allocator registered under `id`, as its concrete type.
    pub fn allocator<A: AllocatorType>(&self, id: AllocatorId) -> Result<Arc<A>> {
        let typed = self.read().allocators.get(&id).map(|e| e.typed.clone()).ok_or(Error::UnknownAllocator(id))?;
        typed.downcast::<A>().map_err(|_| Error::Unsupported("the allocator has another type"))
    }

    /// The allocator registered under `id`, whatever its type.
    pub fn allocator_dyn(&self, id: AllocatorId) -> Result<Arc<dyn RegionAllocator>> {
        self.read().allocators.get(&id).map(|e| e.dynamic.clone()).ok_or(Error::UnknownAllocator(id))
    }

    /// The ids of every registered allocator.
    pub fn allocator_ids(&self) -> Vec<AllocatorId> {
        self.read().allocators.keys().copied().collect()
    }

    /// Allocates from allocator `id` and returns both pointer forms.
    pub fn allocate(&self, id: AllocatorId, size: usize, align: usize) -> Result<FullPtr<u8>> {
        let allocator = self.allocator_dyn(id)?;
        let offset = allocator.allocate(size, align)?;
        let ptr = allocator.region().ptr(offset.get(), size as u64)?;
        Ok(FullPtr::new(ShmPtr::new(id, offset), ptr))
    }

    /// Frees a block from whichever registered allocator owns it.
    pub fn free(&self, ptr: ShmPtr) -> Result<()> {
        self.allocator_dyn(ptr.allocator)?.free(ptr.offset)
    }

    /// The local address of `ptr`, checked: the allocator is known, and a whole `T` at the
    /// offset lies inside its region and is aligned for `T`.
    pub fn to_local<T>(&self, ptr: ShmPtr) -> Result<FullPtr<T>> {
        let allocator = self.allocator_dyn(ptr.allocator)?;
        let region = allocator.region();
        let local = region.ptr(ptr.offset.get(), core::mem::size_of::<T>() as u64)?;
        if local.align_offset(core::mem::align_of::<T>()) != 0 {
            return Err(Error::InvalidAlignment { align: core::mem::align_of::<T>() as u64 });
        }
        Ok(FullPtr::new(ptr, local.cast()))
    }

    /// The shared form of a local address inside one of the registered allocators' regions.
    pub fn to_shm<T>(&self, ptr: *const T) -> Result<ShmPtr> {
        let reg = self.read();
        reg.allocators
            .iter()
            .find_map(|(id, e)| e.dynamic.region().offset_of(ptr.cast()).map(|o| ShmPtr::new(*id, OffsetPtr::new(o))))
            .ok_or(Error::NotFound { what: "allocator region holding address", name: "local pointer".into() })
    }

    /// Forgets allocator `id` in this process. Its state stays in the region for others.
    pub fn remove_allocator(&self, id: AllocatorId) -> Result<()> {
        self.write().allocators.remove(&id).map(|_| ()).ok_or(Error::UnknownAllocator(id))
    }

    /// Forgets backend `id` and its allocators in this process, without removing its name. An
    /// allocator being created or attached in it meanwhile goes too: that call fails with
    /// `UnknownBackend`.
    pub fn detach_backend(&self, id: BackendId) -> Result<Arc<dyn MemoryBackend>> {
        let mut reg = self.write();
        let backend = reg.backends.remove(&id).ok_or(Error::UnknownBackend(id))?;
        reg.allocators.retain(|_, e| e.backend != id);
        Ok(backend)
    }

    /// Forgets backend `id` and its allocators, and removes the region's name
    /// ([`MemoryBackend::destroy`]). Mappings end when the last handle is dropped. A name already
    /// gone (`NotFound`: another process removed it, and may have made a new region under it,
    /// which is left alone) is as good as removed: the backend is forgotten and `Ok` returned. If
    /// the name cannot be removed for another reason, the error is returned and the backend stays
    /// registered. As with [`detach_backend`](Self::detach_backend), a create or attach in it
    /// meanwhile fails with `UnknownBackend` (a create leaving no allocator published in the
    /// region).
    pub fn destroy_backend(&self, id: BackendId) -> Result<()> {
        // Under the lock throughout: no other call sees the backend gone before it is.
        let mut reg = self.write();
        match reg.backends.get(&id).ok_or(Error::UnknownBackend(id))?.destroy() {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        reg.backends.remove(&id);
        reg.allocators.retain(|_, e| e.backend != id);
        Ok(())
    }
}

/// Refuses an allocator type that claims a `BackendResource`'s type id: attached, it would be
/// given the resource's sub-region, whose blocks are memory of their own.
fn pool_type_refused<A: AllocatorType>() -> Result<()> {
    if A::TYPE_ID == crate::pool::BACKEND_RESOURCE_TYPE_ID {
        return Err(Error::Unsupported("an allocator type with the type id of a BackendResource's sub-region"));
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::allocators::StackAllocator;
    use crate::testing::HeapBackend;

    #[test]
    fn pointers_round_trip_through_the_manager() {
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(1), 1 << 20)).unwrap();
        let id = AllocatorId::new(1, 0);
        let a = mm.create_allocator::<StackAllocator>(b.id(), id, 0, &Default::default()).unwrap();
        let p = mm.allocate(id, 64, 8).unwrap();
        // SAFETY: 64 fresh bytes of a live allocation.
        unsafe { p.ptr.write_bytes(0xAB, 64) };
        let local = mm.to_local::<u64>(p.shm).unwrap();
        assert_eq!(local.ptr.cast::<u8>(), p.ptr);
        assert_eq!(mm.to_shm(p.ptr).unwrap(), p.shm);
        assert_eq!(a.stats().live_allocations, 1);
        mm.free(p.shm).unwrap();
        assert!(matches!(mm.free(p.shm), Err(Error::InvalidFree { .. })));
        assert!(matches!(
            mm.to_local::<u8>(ShmPtr::new(id, OffsetPtr::new(u64::MAX - 8))),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            mm.to_local::<u8>(ShmPtr::new(AllocatorId::new(9, 9), OffsetPtr::new(0))),
            Err(Error::UnknownAllocator(_))
        ));
    }

    #[test]
    fn an_address_maps_to_the_allocator_whose_region_holds_it_not_the_one_it_ends() {
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(3), 1 << 20)).unwrap();
        let (low, high) = (AllocatorId::new(3, 0), AllocatorId::new(3, 1));
        let a0 = mm.create_allocator::<StackAllocator>(b.id(), low, 64 * 1024, &Default::default()).unwrap();
        let a1 = mm.create_allocator::<StackAllocator>(b.id(), high, 0, &Default::default()).unwrap();
        assert_eq!(a0.region().end(), a1.region().offset(), "the two regions touch");
        let start_of_high = a1.region().ptr(a1.region().offset(), 1).unwrap();
        assert_eq!(mm.to_shm(start_of_high).unwrap(), ShmPtr::new(high, OffsetPtr::new(a1.region().offset())));
        assert_eq!(a0.region().offset_of(start_of_high), None, "one past the end is not in the region");
        let end_of_high = a1.region().ptr(a1.region().end() - 1, 1).unwrap().wrapping_add(1);
        assert!(matches!(mm.to_shm(end_of_high), Err(Error::NotFound { .. })));
    }

    #[test]
    fn threads_creating_one_id_in_two_backends_at_once_publish_it_once() {
        for round in 0..200u32 {
            let mm = MemoryManager::new();
            let backends: Vec<_> =
                (1..=2).map(|i| mm.add_backend(HeapBackend::new(BackendId(i), 1 << 16)).unwrap()).collect();
            let id = AllocatorId::new(9, round);
            let barrier = std::sync::Barrier::new(2);
            let created: Vec<bool> = std::thread::scope(|s| {
                let (mm, barrier) = (&mm, &barrier);
                let threads: Vec<_> = backends
                    .iter()
                    .map(|b| {
                        let b = b.id();
                        s.spawn(move || {
                            barrier.wait();
                            mm.create_allocator::<StackAllocator>(b, id, 0, &Default::default()).is_ok()
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert_eq!(created.iter().filter(|&&c| c).count(), 1, "round {round}: {created:?}");
            // The loser reserved nothing: no backend holds an allocator that no one registered.
            let published = backends.iter().filter(|b| b.header().find_allocator(id).is_ok_and(|e| e.is_some()));
            assert_eq!(published.count(), 1, "round {round}");
            assert!(mm.allocator::<StackAllocator>(id).is_ok());
        }
    }

    /// An allocator type whose `create` panics, for the unwinding path of `create_allocator`,
    /// and which nothing attaches; its type id is `TYPE`. With `KEEP`, `create` fails with an
    /// error instead, after keeping its region where it stays alive.
    struct PanicsOnCreate<const TYPE: u32 = 0x5041_4E43, const KEEP: bool = false>;

    static KEPT_REGIONS: std::sync::Mutex<Vec<Region>> = std::sync::Mutex::new(Vec::new());

    impl<const TYPE: u32, const KEEP: bool> RegionAllocator for PanicsOnCreate<TYPE, KEEP> {
        fn id(&self) -> AllocatorId {
            unreachable!()
        }
        fn type_name(&self) -> &'static str {
            unreachable!()
        }
        fn region(&self) -> &Region {
            unreachable!()
        }
        fn allocate(&self, _: usize, _: usize) -> Result<OffsetPtr> {
            unreachable!()
        }
        fn reallocate(&self, _: OffsetPtr, _: usize, _: usize) -> Result<OffsetPtr> {
            unreachable!()
        }
        fn free(&self, _: OffsetPtr) -> Result<()> {
            unreachable!()
        }
        fn size_of(&self, _: OffsetPtr) -> Result<usize> {
            unreachable!()
        }
        fn stats(&self) -> crate::allocator::AllocStats {
            unreachable!()
        }
        fn check(&self) -> Result<()> {
            unreachable!()
        }
    }

    impl<const TYPE: u32, const KEEP: bool> AllocatorType for PanicsOnCreate<TYPE, KEEP> {
        const TYPE_ID: u32 = TYPE;
        type Config = ();
        fn create(region: Region, _: AllocatorId, _: &()) -> Result<Self> {
            if KEEP {
                KEPT_REGIONS.lock().unwrap().push(region);
                return Err(Error::Unsupported("create failed, keeping its region"));
            }
            panic!("create failed half way")
        }
        fn attach(_: Region, _: AllocatorId) -> Result<Self> {
            unreachable!()
        }
    }

    /// A `create` that panics leaves no entry "creating" behind: the id can be created again.
    #[test]
    fn a_create_that_panics_gives_its_id_back() {
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(3), 1 << 20)).unwrap();
        let id = AllocatorId::new(3, 0);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = mm.create_allocator::<PanicsOnCreate>(b.id(), id, 4096, &());
        }));
        assert!(panicked.is_err());
        assert!(matches!(b.header().find_allocator(id), Err(Error::UnknownAllocator(_))));
        mm.create_allocator::<StackAllocator>(b.id(), id, 0, &Default::default()).unwrap();
    }

    /// An allocator type with a `BackendResource`'s type id is neither attached (it would be
    /// given the resource's sub-region, whose blocks are memory of their own, from safe code)
    /// nor created.
    #[test]
    fn no_allocator_type_is_given_a_backend_resources_sub_region() {
        use crate::pool::{BackendResource, BACKEND_RESOURCE_TYPE_ID};
        type Impostor = PanicsOnCreate<BACKEND_RESOURCE_TYPE_ID>;
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(4), 1 << 20)).unwrap();
        let id = AllocatorId::new(4, 0);
        let _resource = BackendResource::reserve(b.clone(), id, 64 * 1024).unwrap();
        let attached = mm.attach_allocator_within::<Impostor>(b.id(), id, Duration::ZERO);
        assert!(matches!(attached, Err(Error::Unsupported(_))), "{:?}", attached.err());
        let created = mm.create_allocator::<Impostor>(b.id(), AllocatorId::new(4, 1), 4096, &());
        assert!(matches!(created, Err(Error::Unsupported(_))), "{:?}", created.err());
    }

    /// A create that fails (here a configuration the allocator type refuses, after the
    /// directory reserved "all that is left" for it) gives its space and its directory entry
    /// back: later creates in the backend are not refused for want of either.
    #[test]
    fn a_failed_create_gives_back_the_space_and_entry_it_reserved() {
        use crate::allocators::{BitmapAllocator, BitmapConfig};
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(5), 1 << 20)).unwrap();
        let before = b.header().unreserved();
        let refused = BitmapConfig { min_block: 3, max_block: 64 };
        // More failures than the directory has entries.
        for minor in 0..2 * crate::header::MAX_ALLOCATORS as u32 {
            let created = mm.create_allocator::<BitmapAllocator>(b.id(), AllocatorId::new(5, minor), 0, &refused);
            assert!(matches!(created, Err(Error::InvalidSize { .. })), "{:?}", created.err());
        }
        assert_eq!(b.header().unreserved(), before);
        let a = mm.create_allocator::<StackAllocator>(b.id(), AllocatorId::new(5, 0), 0, &Default::default()).unwrap();
        assert_eq!(a.region().len(), before);
    }

    /// A failed create whose allocator type kept a handle on its range (it could make an
    /// allocator over it later) does not give the space back: no later create is given it.
    #[test]
    fn a_failed_create_that_kept_its_region_keeps_the_space_reserved() {
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(6), 1 << 20)).unwrap();
        let before = b.header().unreserved();
        let created =
            mm.create_allocator::<PanicsOnCreate<0x4B45_4550, true>>(b.id(), AllocatorId::new(6, 0), 4096, &());
        assert!(matches!(created, Err(Error::Unsupported(_))), "{:?}", created.err());
        assert!(b.header().unreserved() <= before - 4096);
        let kept = KEPT_REGIONS.lock().unwrap().iter().find(|r| r.backend().id() == b.id()).map(Region::end).unwrap();
        let a = mm.create_allocator::<StackAllocator>(b.id(), AllocatorId::new(6, 0), 0, &Default::default()).unwrap();
        assert!(a.region().offset() >= kept, "given the range a failed create still holds");
    }

    /// A backend whose `destroy` fails with the error it carries: a name that cannot be removed,
    /// or one another process removed first.
    struct DestroyFails(HeapBackend, Error);

    // SAFETY: forwards to a heap backend, which keeps the promises.
    unsafe impl MemoryBackend for DestroyFails {
        crate::testing::heap_backend_methods!();
        fn destroy(&self) -> Result<()> {
            Err(self.1)
        }
    }

    /// A backend whose name another process removed first stayed registered, with its
    /// allocators and its mapping, and every later destroy failed the same way: its name is gone,
    /// as asked, so it is forgotten.
    #[test]
    fn a_destroy_whose_name_is_already_gone_forgets_the_backend() {
        let mm = MemoryManager::new();
        let b = mm
            .add_backend(DestroyFails(
                HeapBackend::new(BackendId(9), 1 << 20),
                Error::NotFound { what: "shared-memory segment", name: "/removed-elsewhere".into() },
            ))
            .unwrap();
        let id = AllocatorId::new(9, 0);
        mm.create_allocator::<StackAllocator>(b.id(), id, 0, &Default::default()).unwrap();
        let weak = Arc::downgrade(&b);
        drop(b);
        assert!(matches!(mm.destroy_backend(BackendId(9)), Ok(())));
        assert!(mm.backend_ids().is_empty());
        assert!(matches!(mm.allocate(id, 64, 8), Err(Error::UnknownAllocator(_))));
        assert!(weak.upgrade().is_none(), "the manager still maps the region");
        assert!(matches!(mm.destroy_backend(BackendId(9)), Err(Error::UnknownBackend(_))));
    }

    /// A destroy that fails leaves the backend and its allocators registered, as they were.
    #[test]
    fn a_failed_destroy_forgets_nothing() {
        let mm = MemoryManager::new();
        let b = mm
            .add_backend(DestroyFails(
                HeapBackend::new(BackendId(7), 1 << 20),
                Error::PermissionDenied { name: "/undestroyable".into() },
            ))
            .unwrap();
        let id = AllocatorId::new(7, 0);
        mm.create_allocator::<StackAllocator>(b.id(), id, 0, &Default::default()).unwrap();
        assert!(matches!(mm.destroy_backend(b.id()), Err(Error::PermissionDenied { .. })));
        assert_eq!(mm.backend_ids(), [b.id()]);
        let p = mm.allocate(id, 64, 8).unwrap();
        mm.free(p.shm).unwrap();
        assert!(matches!(mm.destroy_backend(BackendId(8)), Err(Error::UnknownBackend(_))));
    }

    /// Where `Gated`'s create and attach stop half way, until the test lets them go on.
    static GATE_REACHED: std::sync::Barrier = std::sync::Barrier::new(2);
    static GATE_OPEN: std::sync::Barrier = std::sync::Barrier::new(2);

    fn pass_gate() {
        GATE_REACHED.wait();
        GATE_OPEN.wait();
    }

    /// A stack allocator whose create and attach wait at the gate, for a backend that goes
    /// meanwhile.
    struct Gated(StackAllocator);

    impl RegionAllocator for Gated {
        fn id(&self) -> AllocatorId {
            self.0.id()
        }
        fn type_name(&self) -> &'static str {
            "gated"
        }
        fn region(&self) -> &Region {
            self.0.region()
        }
        fn allocate(&self, size: usize, align: usize) -> Result<OffsetPtr> {
            self.0.allocate(size, align)
        }
        fn reallocate(&self, ptr: OffsetPtr, size: usize, align: usize) -> Result<OffsetPtr> {
            self.0.reallocate(ptr, size, align)
        }
        fn free(&self, ptr: OffsetPtr) -> Result<()> {
            self.0.free(ptr)
        }
        fn size_of(&self, ptr: OffsetPtr) -> Result<usize> {
            self.0.size_of(ptr)
        }
        fn stats(&self) -> crate::allocator::AllocStats {
            self.0.stats()
        }
        fn check(&self) -> Result<()> {
            self.0.check()
        }
    }

    impl AllocatorType for Gated {
        const TYPE_ID: u32 = u32::from_be_bytes(*b"GAT1");
        type Config = ();
        fn create(region: Region, id: AllocatorId, _: &()) -> Result<Self> {
            pass_gate();
            StackAllocator::create(region, id, &Default::default()).map(Gated)
        }
        fn attach(region: Region, id: AllocatorId) -> Result<Self> {
            pass_gate();
            StackAllocator::attach(region, id).map(Gated)
        }
    }

    /// A backend destroyed (or detached) while an allocator in it is being created or attached
    /// takes that allocator with it: the create or attach fails, nothing of it stays registered
    /// (its id free for a backend added again under the same id), and a failed create leaves no
    /// allocator published in the region.
    #[test]
    fn a_backend_gone_during_a_create_or_attach_leaves_no_allocator_behind() {
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(9), 1 << 20)).unwrap();
        let id = AllocatorId::new(9, 0);
        let before = b.header().unreserved();
        std::thread::scope(|s| {
            let creating = s.spawn(|| mm.create_allocator::<Gated>(b.id(), id, 64 * 1024, &()));
            GATE_REACHED.wait();
            mm.destroy_backend(b.id()).unwrap();
            GATE_OPEN.wait();
            let created = creating.join().unwrap();
            assert!(matches!(created, Err(Error::UnknownBackend(BackendId(9)))), "{:?}", created.err());
        });
        assert_eq!(mm.allocator_ids(), [], "an allocator of a destroyed backend is registered");
        assert!(matches!(b.header().find_allocator(id), Err(Error::UnknownAllocator(_))));
        assert_eq!(b.header().unreserved(), before);

        // Made by another manager (as another process would), attached here while detached.
        let maker = MemoryManager::new();
        maker.add_backend_arc(b.clone()).unwrap();
        std::thread::scope(|s| {
            s.spawn(pass_gate);
            maker.create_allocator::<Gated>(b.id(), id, 64 * 1024, &()).unwrap();
        });
        mm.add_backend_arc(b.clone()).unwrap();
        std::thread::scope(|s| {
            let attaching = s.spawn(|| mm.attach_allocator_within::<Gated>(b.id(), id, Duration::ZERO));
            GATE_REACHED.wait();
            mm.detach_backend(b.id()).unwrap();
            GATE_OPEN.wait();
            let attached = attaching.join().unwrap();
            assert!(matches!(attached, Err(Error::UnknownBackend(BackendId(9)))), "{:?}", attached.err());
        });
        assert_eq!(mm.allocator_ids(), [], "an allocator of a detached backend is registered");
        mm.add_backend_arc(b.clone()).unwrap();
        std::thread::scope(|s| {
            s.spawn(pass_gate);
            mm.attach_allocator_within::<Gated>(b.id(), id, Duration::ZERO).unwrap();
        });
    }

    /// An attach gives up (at its timeout, or after a second) when a live process holds the
    /// region's directory lock for good (stopped in a debugger, or named by a stray write into
    /// the lock word): it used to wait for the lock without end, whatever the timeout.
    #[test]
    fn an_attach_gives_up_at_its_timeout_while_a_live_process_holds_the_directory() {
        let mm = Arc::new(MemoryManager::new());
        let b = mm.add_backend(HeapBackend::new(BackendId(6), 1 << 20)).unwrap();
        let id = AllocatorId::new(6, 0);
        mm.create_allocator::<StackAllocator>(b.id(), id, 0, &Default::default()).unwrap();
        mm.remove_allocator(id).unwrap();
        // Held for good, as by a process stopped while it holds the lock.
        core::mem::forget(b.header().lock_directory_for_test());
        let (tx, rx) = std::sync::mpsc::channel();
        let attacher = Arc::clone(&mm);
        std::thread::spawn(move || {
            let _ = tx.send(attacher.attach_allocator_within::<StackAllocator>(b.id(), id, Duration::from_millis(50)));
        });
        let attached = rx.recv_timeout(Duration::from_secs(10)).expect("the attach waited past its timeout");
        assert!(matches!(attached, Err(Error::TimedOut { .. })), "{:?}", attached.err());
    }

    /// An attach with no time to wait for a creator still waits for the directory's lock that
    /// another thread or process holds for a moment (as every create does), rather than fail.
    #[test]
    fn an_attach_without_a_timeout_waits_for_a_directory_lock_held_a_moment() {
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(7), 1 << 20)).unwrap();
        let id = AllocatorId::new(7, 0);
        mm.create_allocator::<StackAllocator>(b.id(), id, 0, &Default::default()).unwrap();
        mm.remove_allocator(id).unwrap();
        let (locked, held) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let guard = b.header().lock_directory_for_test();
                locked.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                drop(guard);
            });
            held.recv().unwrap();
            mm.attach_allocator_within::<StackAllocator>(b.id(), id, Duration::ZERO).unwrap();
        });
    }

    #[test]
    fn several_allocators_share_one_backend_and_ids_are_unique() {
        let mm = MemoryManager::new();
        let b = mm.add_backend(HeapBackend::new(BackendId(2), 1 << 20)).unwrap();
        let a0 = mm
            .create_allocator::<StackAllocator>(b.id(), AllocatorId::new(2, 0), 64 * 1024, &Default::default())
            .unwrap();
        let a1 = mm.create_allocator::<StackAllocator>(b.id(), AllocatorId::new(2, 1), 0, &Default::default()).unwrap();
        assert!(a0.region().end() <= a1.region().offset());
        let dup = mm.create_allocator::<StackAllocator>(b.id(), AllocatorId::new(2, 1), 0, &Default::default());
        assert!(matches!(dup, Err(Error::AlreadyExists { .. })));
        assert!(matches!(mm.add_backend(HeapBackend::new(BackendId(2), 1 << 16)), Err(Error::AlreadyExists { .. })));
        assert!(matches!(
            mm.create_allocator::<StackAllocator>(BackendId(77), AllocatorId::new(7, 0), 0, &Default::default()),
            Err(Error::UnknownBackend(BackendId(77)))
        ));
        // A second manager (as another process would) attaches by id and sees the same blocks.
        let other = MemoryManager::new();
        other.add_backend_arc(mm.backend(b.id()).unwrap()).unwrap();
        let seen = other.attach_allocator::<StackAllocator>(b.id(), AllocatorId::new(2, 0)).unwrap();
        let p = a0.allocate(100, 16).unwrap();
        assert_eq!(seen.size_of(p).unwrap(), 100);
        mm.destroy_backend(b.id()).unwrap();
        assert!(matches!(mm.allocator_dyn(AllocatorId::new(2, 0)), Err(Error::UnknownAllocator(_))));
    }
}
