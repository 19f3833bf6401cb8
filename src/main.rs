//! The `keygate` binary: see [`keygate::cli`].

// A proxied request allocates and frees many small buffers. Measured with callgrind: 137k
// instructions per request with glibc's malloc, 119k with mimalloc (bench/instructions.py).
// `--no-default-features` builds with the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}

/// Where transparent huge pages are `always` on, mimalloc's 2 MiB-aligned arenas get a huge page
/// on first touch: 22 MiB idle RSS instead of 14. keygate's heap is small, so huge pages buy
/// nothing; they are turned off for this process before the allocator starts.
///
/// Freed memory goes back to the system through `keygate::memory_upkeep`.
#[cfg(all(feature = "mimalloc", target_os = "linux"))]
mod allocator {
    extern "C" fn before_the_allocator() {
        // SAFETY: prctl with integer arguments only; failure just leaves THP as it was.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }

    // A prioritised `.init_array` entry runs before unprioritised constructors (mimalloc's) and
    // before `main`, so no arena has been touched yet.
    #[used]
    #[link_section = ".init_array.00099"]
    static BEFORE_THE_ALLOCATOR: extern "C" fn() = before_the_allocator;
}
