//! A counting global allocator: how many bytes one call had allocated at its peak, on this
//! thread, so that a target can fail when an input makes keygate allocate out of proportion to
//! its size (libFuzzer's own `-malloc_limit_mb` needs a sanitizer, which stable Rust lacks).
//!
//! Install it in the binary that runs the targets:
//! `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting the live bytes and their peak per thread.
pub struct CountingAlloc;

thread_local! {
    // `const` and without `Drop`: reading them never allocates nor registers a destructor, so
    // the allocator may use them.
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grow(bytes: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(bytes);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrink(bytes: usize) {
    // Memory freed on another thread than it was allocated on saturates at 0 rather than wrap.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(bytes)));
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated besides.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is the caller's, per `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            shrink(layout.size());
            grow(new_size);
        }
        new
    }
}

/// Runs `f` and returns its result with the most bytes it had allocated at once on this
/// thread (beyond what was live before it started).
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    let peak = PEAK.with(Cell::get);
    (result, peak.saturating_sub(start))
}

/// Whether [`CountingAlloc`] is this program's allocator (otherwise every peak reads 0).
pub fn is_installed() -> bool {
    let ((), peak) = peak_during(|| {
        let probe = std::hint::black_box(vec![0u8; 4096]);
        drop(probe);
    });
    peak >= 4096
}

/// Panics when `f` allocates more than `limit` bytes at once; returns its result otherwise.
pub fn assert_peak_below<R>(what: &str, limit: usize, f: impl FnOnce() -> R) -> R {
    let (result, peak) = peak_during(f);
    assert!(
        peak <= limit,
        "{what}: allocated {peak} bytes at once, over the bound of {limit}"
    );
    result
}
