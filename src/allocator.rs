//! The binary's global allocator: jemalloc, for the resident memory it gives back after a
//! crowd of clients has left (docs/performance.md, "The allocator"), and what pgrelay asks
//! of it: a purge of every arena, and a flush of a runtime thread's cache when it parks.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

use tikv_jemallocator::Jemalloc;

#[global_allocator]
static ALLOCATOR: CountingFrees = CountingFrees(Jemalloc);

/// Bytes a runtime thread may free into its jemalloc thread cache before it flushes the
/// cache at its next park. The cache keeps freed blocks for its thread's next allocations
/// and gives them back only as that thread allocates again, which a worker that went idle
/// after a crowd of clients left does not: the workers' caches then held some 900 KiB of
/// the crowd's task cells that no purge reaches. With this, at most this much per worker
/// stays cached. A busy worker reaches it every few milliseconds; a flush of a cache that
/// small costs a few microseconds.
const FLUSH_AFTER_FREED: usize = 64 * 1024;

thread_local! {
    /// Bytes this thread freed since its cache was last flushed. A `Cell` of a plain
    /// integer with a const initializer: reading it from `dealloc` allocates nothing and
    /// needs no destructor, also while the thread is being torn down.
    static FREED_SINCE_FLUSH: Cell<usize> = const { Cell::new(0) };
}

/// jemalloc, counting per thread the bytes freed (and moved by `realloc`), so that a
/// worker can tell whether its thread cache has grown since it last flushed it.
struct CountingFrees(Jemalloc);

fn count_freed(bytes: usize) {
    FREED_SINCE_FLUSH.with(|freed| freed.set(freed.get().saturating_add(bytes)));
}

// SAFETY: every call goes to jemalloc with the same arguments; the counting beside it
// touches only a thread-local integer.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingFrees {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count_freed(layout.size());
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_freed(layout.size());
        // SAFETY: as above.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Called whenever a runtime worker runs out of work (tokio's `on_thread_park`): flushes
/// its thread cache if it freed FLUSH_AFTER_FREED bytes or more since the last flush.
pub fn flush_thread_cache_if_it_grew() {
    FREED_SINCE_FLUSH.with(|freed| {
        if freed.get() >= FLUSH_AFTER_FREED {
            freed.set(0);
            control(c"thread.tcache.flush");
        }
    });
}

/// Hands jemalloc's dirty and muzzy pages of every arena back to the operating system.
pub fn purge() {
    control(c"arena.4096.purge");
}

/// Runs jemalloc's control `name`, one that takes and returns nothing.
fn control(name: &std::ffi::CStr) {
    // SAFETY: `name` is a NUL-terminated control name; every other argument is null with
    // length 0, so jemalloc neither reads nor writes through them.
    #[allow(unsafe_code)]
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}
