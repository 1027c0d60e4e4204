//! The thread table: one [`Slot`] per counting thread, in memory that is
//! never freed, so that a reading may load any slot at any moment and a
//! thread's exit waits for nobody.
//!
//! The first chunk of [`CHUNK`] slots is a `static`; when every slot is
//! taken, a thread maps another chunk from the kernel (`mmap`, not the heap
//! memwatch counts) and chains it on. A slot freed by an exiting thread is
//! claimed again by a later one.
//!
//! # Atomic orderings
//!
//! A slot's `taken` flag is claimed with an Acquire compare-and-swap and
//! freed with a Release store, after the owner's last fold: the next owner
//! sees the slot as the last one left it. The claim then issues a Release
//! fence before the new owner's first store to the slot, so that a reading
//! which sees that store also sees the previous owner's last fold in the
//! total (the argument of [`super::slot`], carried across owners). Readers
//! load `taken` with Acquire; a chunk is published with a Release
//! compare-and-swap and found with Acquire loads.

use std::ptr;
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::slot::Slot;
use crate::sync::fence;
#[cfg(not(loom))]
use crate::sync::AtomicIsize;

/// Slots per chunk: 256 threads before the first growth, 32 KiB a chunk.
pub(crate) const CHUNK: usize = 256;

/// A chunk of slots and the chunk chained on after it.
struct Chunk<const N: usize> {
    slots: [Slot; N],
    /// Null until this chunk was full when a thread looked; then a chunk
    /// mapped for good, never unmapped.
    next: AtomicPtr<Chunk<N>>,
}

/// The slots of one kind of count, readable from any thread.
pub(crate) struct Table<const N: usize = CHUNK> {
    first: Chunk<N>,
}

impl<const N: usize> Table<N> {
    /// An empty table.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Table {
            first: Chunk {
                slots: [const { Slot::outside() }; N],
                next: AtomicPtr::new(ptr::null_mut()),
            },
        }
    }

    /// An empty table (loom's atomics have no `const` constructor).
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Table {
            first: Chunk {
                slots: std::array::from_fn(|_| Slot::outside()),
                next: AtomicPtr::new(ptr::null_mut()),
            },
        }
    }

    /// Every chunk, the first one first.
    fn chunks(&self) -> impl Iterator<Item = &Chunk<N>> {
        std::iter::successors(Some(&self.first), |c| {
            // Acquire pairs with the Release in `grow`.
            let next = c.next.load(Acquire);
            // SAFETY: a chained chunk is mapped for the program's life and
            // was fully initialised (zeroed) before it was published.
            (!next.is_null()).then(|| unsafe { &*next })
        })
    }

    /// Claims a free slot for the calling thread, mapping a new chunk when
    /// all are taken. `None` only when the kernel refuses the mapping.
    /// Allocates nothing on the heap, takes no lock and never waits.
    pub(crate) fn claim(&'static self) -> Option<&'static Slot> {
        let mut chunk = &self.first;
        loop {
            let free = chunk.slots.iter().find(|s| {
                // A plain look before the read-modify-write keeps the scan
                // from bouncing lines. Relaxed: only a hint.
                !s.taken.load(Relaxed)
                    // Acquire: the slot as its last owner left it.
                    && s.taken.compare_exchange(false, true, Acquire, Relaxed).is_ok()
            });
            if let Some(slot) = free {
                // See "Atomic orderings": orders the previous owner's last
                // fold before this owner's first store to the slot.
                fence(Release);
                return Some(slot);
            }
            chunk = Self::next_or_grow(chunk)?;
        }
    }

    /// The chunk after `chunk`, mapping and chaining on a new one if there
    /// is none.
    fn next_or_grow(chunk: &'static Chunk<N>) -> Option<&'static Chunk<N>> {
        // Acquire pairs with the Release below.
        let mut next = chunk.next.load(Acquire);
        if next.is_null() {
            let fresh = map_chunk::<N>()?;
            // Release publishes the zeroed chunk; on failure, Acquire as
            // for the load above.
            next = match chunk
                .next
                .compare_exchange(ptr::null_mut(), fresh, Release, Acquire)
            {
                Ok(_) => fresh,
                Err(theirs) => {
                    unmap_chunk(fresh);
                    theirs
                }
            };
        }
        // SAFETY: as in `chunks`.
        Some(unsafe { &*next })
    }

    /// Gives `slot` back, after its owner's last fold.
    pub(crate) fn release(&self, slot: &Slot) {
        // Release: the next owner (Acquire in `claim`) sees the slot as this
        // one left it.
        slot.taken.store(false, Release);
    }

    /// Calls `f` with every taken slot.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Slot)) {
        for slot in self.chunks().flat_map(|c| &c.slots) {
            // Acquire pairs with the Release fence of the claim.
            if slot.taken.load(Acquire) {
                f(slot);
            }
        }
    }

    /// Adds every taken slot's pending delta to `sum`, and the positive ones
    /// to `ahead`, for a reading.
    #[cfg(not(loom))]
    pub(crate) fn add_pending(&self, sum: &mut isize, ahead: &mut isize) {
        self.for_each(|s| {
            let p = s.pending();
            *sum = sum.wrapping_add(p);
            *ahead = ahead.saturating_add(p.max(0));
        });
    }

    /// In a forked child: folds every taken slot but `mine` into `total`
    /// and frees it; returns how many it freed.
    #[cfg(not(loom))]
    pub(crate) fn forget_all_but(&self, mine: *const Slot, total: &AtomicIsize) -> usize {
        let mut freed = 0;
        self.for_each(|s| {
            if !ptr::eq(s, mine) {
                s.drain_into(total);
                self.release(s);
                freed += 1;
            }
        });
        freed
    }

    /// How many slots are taken now. Relaxed: a statistic.
    #[cfg(test)]
    pub(crate) fn taken(&self) -> usize {
        self.chunks()
            .flat_map(|c| &c.slots)
            .filter(|s| s.taken.load(Relaxed))
            .count()
    }
}

/// A zeroed chunk from the kernel: all slots free (a zeroed `Slot` is free,
/// with pending 0), no next chunk.
#[cfg(not(loom))]
fn map_chunk<const N: usize>() -> Option<*mut Chunk<N>> {
    // SAFETY: an anonymous private mapping of the chunk's size: no file, no
    // address hint; the result is checked below.
    let at = unsafe {
        libc::mmap(
            ptr::null_mut(),
            std::mem::size_of::<Chunk<N>>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    // A mapping is page-aligned, more than a chunk's 128-byte alignment.
    (at != libc::MAP_FAILED).then_some(at.cast())
}

/// Returns a chunk that lost the race to be chained on, never published.
#[cfg(not(loom))]
fn unmap_chunk<const N: usize>(chunk: *mut Chunk<N>) {
    // SAFETY: `chunk` came from `map_chunk` with this size and no other
    // thread ever saw it.
    unsafe { libc::munmap(chunk.cast(), std::mem::size_of::<Chunk<N>>()) };
}

/// Under loom the table never grows: its models stay within one chunk.
#[cfg(loom)]
fn map_chunk<const N: usize>() -> Option<*mut Chunk<N>> {
    None
}

#[cfg(loom)]
fn unmap_chunk<const N: usize>(_: *mut Chunk<N>) {}

/// Model checks of a slot changing owners under a reading.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::Table;
    use crate::sync::AtomicIsize;
    use loom::thread;
    use std::sync::atomic::Ordering::Relaxed;

    /// A thread has counted 100 bytes in its slot; then, while a reading
    /// runs, it exits (drains, frees the slot) and another owner claims the
    /// slot and counts 10. The reading never loses the first owner's 100
    /// (it may count them twice for the instant of the drain), and once
    /// both are done the reading is exact.
    #[test]
    fn a_reused_slot_never_hides_its_last_owners_count() {
        loom::model(|| {
            let table: &'static Table<1> = Box::leak(Box::new(Table::new()));
            let total: &'static AtomicIsize = Box::leak(Box::new(AtomicIsize::new(0)));
            let slot = table.claim().unwrap();
            slot.empty(1000);
            assert!(slot.add(100));
            let owners = thread::spawn(move || {
                slot.drain_into(total);
                table.release(slot);
                let next = table.claim().unwrap();
                next.empty(1000);
                assert!(next.add(10));
            });
            let mut sum = 0;
            table.for_each(|s| sum += s.pending());
            let reading = sum + total.load(Relaxed);
            owners.join().unwrap();
            assert!((100..=210).contains(&reading), "read {reading}");
            let mut exact = 0;
            table.for_each(|s| exact += s.pending());
            assert_eq!(exact + total.load(Relaxed), 110);
        });
    }
}
