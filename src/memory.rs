//! Gives memory back once a crowd of clients has left: the maps that grew to hold one
//! entry per client are shrunk, and the allocator returns its free pages to the operating
//! system, so that resident memory after a login storm or a load test goes back near
//! where it started instead of staying at its peak.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::runtime::Shared;
use crate::watchdog::Watchdog;

/// How often the client count is looked at (one atomic load).
const PERIOD: Duration = Duration::from_secs(1);

/// Clients that must have left since the peak before memory is given back: below this the
/// maps are small and what the allocator keeps is worth keeping for the next logins.
const LEFT_AT_LEAST: usize = 256;

/// Watches the number of connected clients and gives memory back once at most half of its
/// peak is still there. Runs until `shared` is gone.
pub fn spawn(shared: Weak<Shared>, watchdog: Weak<Watchdog>) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut peak = 0;
        // Free pages are given back once more on the tick after a crowd left: what the
        // crowd left in the workers' thread caches reaches the arenas only as each worker
        // parks and flushes its cache (the binary's allocator), after the first time.
        let mut again = false;
        loop {
            ticker.tick().await;
            let Some(shared) = shared.upgrade() else { return };
            let clients = shared.clients.load(Ordering::Relaxed);
            peak = peak.max(clients);
            if !crowd_left(peak, clients) {
                if std::mem::take(&mut again) {
                    drop(shared);
                    let _ = tokio::task::spawn_blocking(release_free_pages).await;
                }
                continue;
            }
            again = true;
            peak = clients;
            shared.registry.shrink();
            shared.cancel.shrink();
            shared.access.counts.shrink();
            if let Some(watchdog) = watchdog.upgrade() {
                watchdog.shrink();
            }
            drop(shared);
            // Walking the allocator's free lists takes a few milliseconds on a large heap:
            // not on a worker thread.
            let _ = tokio::task::spawn_blocking(release_free_pages).await;
        }
    });
}

/// Whether enough of the `peak` clients have left for memory to be worth giving back.
fn crowd_left(peak: usize, now: usize) -> bool {
    peak - now >= LEFT_AT_LEAST && now <= peak / 2
}

/// How the process's allocator gives its free pages back, when it is not glibc's malloc
/// (the binary sets it at start; the library cannot name its allocator).
static RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets how the global allocator returns free pages to the operating system.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

fn release_free_pages() {
    match RELEASE.get() {
        Some(release) => release(),
        None => release_free_glibc_pages(),
    }
}

/// Returns the allocator's free memory to the operating system. glibc keeps freed chunks
/// in its arenas (one per thread that allocated) and gives back only the top of each heap
/// on its own; `malloc_trim` also releases the free pages in the middle.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_glibc_pages() {
    // SAFETY: malloc_trim takes no pointers and may be called at any time from any thread;
    // it only hands free pages of the allocator's own heaps back to the kernel.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators give memory back on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_glibc_pages() {}

#[cfg(test)]
mod tests {
    use super::crowd_left;

    #[test]
    fn memory_is_given_back_once_most_of_a_large_crowd_has_left() {
        assert!(crowd_left(10_000, 0));
        assert!(crowd_left(10_000, 5_000));
        assert!(!crowd_left(10_000, 5_001), "more than half still there");
        assert!(!crowd_left(300, 100), "fewer than 256 left");
        assert!(crowd_left(400, 100));
        assert!(!crowd_left(0, 0));
    }
}
