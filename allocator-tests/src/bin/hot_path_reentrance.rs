//! Nothing on memwatch's allocator path allocates: a probe wrapped around
//! memwatch counts calls that arrive while another call of the same thread
//! is still inside, through thread start-up and tear-down, cross-thread
//! frees, the trip and the shutdown. The hook prints the count; exit 2.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Forwards to memwatch and notes nested entries.
struct Probe(memwatch::MemWatch);

static NESTED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // `const`, no destructor: usable at any point of a thread's life.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

impl Probe {
    fn enter(&self) -> bool {
        let was = INSIDE.with(|i| i.replace(true));
        if was {
            // A statistic read after the threads are done: Relaxed is enough.
            NESTED.fetch_add(1, Relaxed);
        }
        was
    }
    fn leave(&self, was: bool) {
        INSIDE.with(|i| i.set(was));
    }
}

// SAFETY: forwards every call unchanged to memwatch.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let was = self.enter();
        // SAFETY: the caller upholds `alloc`'s contract.
        let p = unsafe { self.0.alloc(layout) };
        self.leave(was);
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let was = self.enter();
        // SAFETY: `ptr` came from this allocator, hence from memwatch.
        unsafe { self.0.dealloc(ptr, layout) };
        self.leave(was);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was = self.enter();
        // SAFETY: as above.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        self.leave(was);
        p
    }
}

#[global_allocator]
static GLOBAL: Probe = Probe(memwatch::MemWatch::new(memwatch::Jemalloc));

fn main() {
    allocator_tests::init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("report", || println!("nested: {}", NESTED.load(Relaxed)))
        .start();
    // Thread churn with frees across threads.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    for _ in 0..10 {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let tx = tx.clone();
                let rx = rx.clone();
                std::thread::spawn(move || {
                    for j in 0..200 {
                        tx.send(vec![0u8; 16 + i * j]).unwrap();
                        drop(rx.lock().unwrap().try_recv());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
    println!("churn done, nested so far: {}", NESTED.load(Relaxed));
    // Then the trip.
    let _held = allocator_tests::grow_until_tripped(1024, std::time::Duration::from_millis(1));
    watchdog.exit_if_tripped();
    println!("finished without a trip");
}
