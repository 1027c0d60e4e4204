//! A fixed table of pointers to per-thread items that readers walk while the
//! owners come and go: how [`crate::counter`] sums counts that live in other
//! threads' thread-local blocks.
//!
//! An owner lists its item and, before the item's memory can go away, retires
//! it: takes the pointer off the table and waits until no reader that might
//! have loaded it is still walking. Readers announce themselves in one shared
//! counter. The two sides are the store-buffering pattern with a SeqCst fence
//! on each side (the hazard-pointer argument): in the fences' single total
//! order, either the owner's fence comes first, and the reader's load of the
//! entry sees null, or the reader's does, and the owner's load of the counter
//! sees the reader's increment and waits for its decrement. `loom`
//! model-checks this (the `loom` cfg swaps the atomics); it understands
//! fences, where it would not understand SeqCst loads and stores.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicPtr, AtomicUsize};
use std::ptr;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicPtr, AtomicUsize};

/// Up to `N` listed items, readable from any thread; more in chunks of `N`
/// chained on, where [`Self::list_or_grow`] is used.
pub(crate) struct Registry<T, const N: usize> {
    entries: [AtomicPtr<T>; N],
    /// Readers walking the table right now (in the first chunk only: one
    /// count covers the whole chain).
    readers: AtomicUsize,
    /// The next chunk, once this one was full when `list_or_grow` looked:
    /// leaked, never freed, so a reader may follow it at any time.
    next: AtomicPtr<Registry<T, N>>,
}

impl<T, const N: usize> Registry<T, N> {
    /// An empty table.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Registry {
            entries: [const { AtomicPtr::new(ptr::null_mut()) }; N],
            readers: AtomicUsize::new(0),
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// An empty table (loom's atomics have no `const` constructor).
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Registry {
            entries: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            readers: AtomicUsize::new(0),
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Lists `item` in a free entry of the first chunk and returns the
    /// entry's index, or `None` when all `N` are taken. Never blocks, never
    /// allocates.
    ///
    /// # Safety
    ///
    /// `*item` must stay valid for shared access until [`Self::retire`] with
    /// the returned index has returned.
    pub(crate) unsafe fn list(&self, item: *const T) -> Option<usize> {
        self.take_entry(item)
    }

    /// Lists `item` in a free entry of any chunk, chaining on a new chunk
    /// when all are taken, and returns the entry's index. Allocates the new
    /// chunk: never call it from the allocator path.
    ///
    /// # Safety
    ///
    /// As [`Self::list`].
    #[cfg(all(not(loom), memwatch_thread_start))]
    pub(crate) unsafe fn list_or_grow(&self, item: *const T) -> usize {
        let mut chunk = self;
        let mut base = 0;
        loop {
            if let Some(i) = chunk.take_entry(item) {
                return base + i;
            }
            // Acquire pairs with the Release below: a chunk found here is
            // seen with its entries empty.
            let mut next = chunk.next.load(Acquire);
            if next.is_null() {
                let fresh = Box::into_raw(Box::new(Registry::new()));
                // Release publishes the empty chunk to readers and to other
                // listers; on failure, Acquire as for the load above.
                next = match chunk
                    .next
                    .compare_exchange(ptr::null_mut(), fresh, Release, Acquire)
                {
                    Ok(_) => fresh,
                    Err(theirs) => {
                        // SAFETY: `fresh` came from `Box::into_raw` above
                        // and was never published.
                        drop(unsafe { Box::from_raw(fresh) });
                        theirs
                    }
                };
            }
            // SAFETY: a chained chunk is leaked: valid for the program's
            // life.
            chunk = unsafe { &*next };
            base += N;
        }
    }

    /// Claims a free entry of this chunk for `item`.
    fn take_entry(&self, item: *const T) -> Option<usize> {
        self.entries.iter().position(|e| {
            // A cheap look before the read-modify-write keeps the scan from
            // bouncing cache lines. Relaxed: only a hint; the
            // compare-and-swap decides, and its failure needs no ordering.
            e.load(Relaxed).is_null()
                // Release pairs with the Acquire load in `for_each`: a reader
                // that finds the item sees it as the owner left it.
                && e.compare_exchange(ptr::null_mut(), item.cast_mut(), Release, Relaxed)
                    .is_ok()
        })
    }

    /// This chunk and every chunk chained on after it.
    fn chunks(&self) -> impl Iterator<Item = &Self> {
        std::iter::successors(Some(self), |c| {
            // Acquire pairs with the Release in `list_or_grow`.
            let next = c.next.load(Acquire);
            // SAFETY: a chained chunk is leaked: valid for the program's
            // life.
            (!next.is_null()).then(|| unsafe { &*next })
        })
    }

    /// Takes entry `index` off the table and returns once no reader can
    /// still reach its item. Waits only for readers already walking, each
    /// of which finishes in one load per entry of every chunk.
    pub(crate) fn retire(&self, index: usize) {
        // Every index `list` or `list_or_grow` returned has its chunk; any
        // other lists nothing to retire.
        let Some(chunk) = self.chunks().nth(index / N) else {
            return;
        };
        // Relaxed: the fence below orders it (see the module docs).
        chunk.entries[index % N].store(ptr::null_mut(), Relaxed);
        fence(SeqCst);
        let mut spins = 0u32;
        // Acquire pairs with the Release decrement in `for_each`: once the
        // count we read no longer includes a reader, everything that reader
        // did with the item happened before this returns.
        while self.readers.load(Acquire) != 0 {
            spins = spins.saturating_add(1);
            backoff(spins);
        }
    }

    /// Calls `f` with every listed item.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&T)) {
        // Relaxed: the fence below orders it (see the module docs).
        self.readers.fetch_add(1, Relaxed);
        fence(SeqCst);
        for e in self.chunks().flat_map(|c| &c.entries) {
            // Acquire pairs with the Release in `take_entry`.
            let item = e.load(Acquire);
            if !item.is_null() {
                // SAFETY: `list`'s contract keeps a listed item valid until
                // `retire` for it returns, and `retire` cannot return while
                // this walk is counted in `readers` unless it took the entry
                // off before our fence, in which case we could not have
                // loaded the pointer (module docs). The reference does not
                // outlive this call of `f`.
                f(unsafe { &*item });
            }
        }
        // Release: see `retire`.
        self.readers.fetch_sub(1, Release);
    }

    /// How many entries are taken now. Relaxed: a statistic.
    #[cfg(test)]
    pub(crate) fn listed(&self) -> usize {
        self.chunks()
            .flat_map(|c| &c.entries)
            .filter(|e| !e.load(Relaxed).is_null())
            .count()
    }
}

#[cfg(not(loom))]
fn backoff(spins: u32) {
    if spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(loom)]
fn backoff(_: u32) {
    loom::thread::yield_now();
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::Registry;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    /// A reader walking the table while the owner retires its item and then
    /// reuses the item's memory (as a thread's exit frees its thread-local
    /// block): loom reports any read that is not ordered before the reuse.
    #[test]
    fn a_retired_item_is_never_read_after_retire_returns() {
        loom::model(|| {
            let table = Arc::new(Registry::<UnsafeCell<usize>, 2>::new());
            let item = Arc::new(UnsafeCell::new(7));
            let owner = {
                let (table, item) = (table.clone(), item.clone());
                thread::spawn(move || {
                    // SAFETY: `item` outlives the `retire` below.
                    let index = unsafe { table.list(Arc::as_ptr(&item)) }.unwrap();
                    table.retire(index);
                    // SAFETY: after `retire` no reader holds the item.
                    item.with_mut(|p| unsafe { *p = 0 });
                })
            };
            let mut seen = Vec::new();
            table.for_each(|c| {
                // SAFETY: a listed item is valid (the owner writes only
                // after `retire`).
                seen.push(c.with(|p| unsafe { *p }))
            });
            owner.join().unwrap();
            // A listed item is seen as the owner left it, never reused.
            assert!(seen.iter().all(|&v| v == 7), "{seen:?}");
        });
    }
}
