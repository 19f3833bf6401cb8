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
/// mimalloc also keeps freed memory until the thread that freed it allocates again; a worker
/// thread that goes quiet after a burst of large request bodies would hold it for good (measured:
/// 235 MiB still held 30 s after 40 bodies of 32 MiB). Purging at once returns it within a
/// second (17 MiB), for about one `madvise` per hundred requests under small-request load.
#[cfg(all(feature = "mimalloc", target_os = "linux"))]
mod allocator {
    extern "C" fn before_the_allocator() {
        // SAFETY: prctl with integer arguments only; failure just leaves THP as it was.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        // mimalloc reads its options from the environment when first used, which is after this
        // constructor; an operator's own setting wins.
        let name = c"MIMALLOC_PURGE_DELAY";
        // SAFETY: runs before `main` and before any thread exists; both strings are C strings.
        unsafe {
            if libc::getenv(name.as_ptr()).is_null() {
                libc::setenv(name.as_ptr(), c"0".as_ptr(), 0);
            }
        }
    }

    // A prioritised `.init_array` entry runs before unprioritised constructors (mimalloc's) and
    // before `main`, so no arena has been touched yet.
    #[used]
    #[link_section = ".init_array.00099"]
    static BEFORE_THE_ALLOCATOR: extern "C" fn() = before_the_allocator;
}
