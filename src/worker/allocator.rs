//! The allocator's settings for a long-running worker. The binary (and the benchmarks) use mimalloc, which by
//! default keeps freed memory committed for reuse: a worker that drained a large backlog would sit at its peak
//! RSS (~95 MB in the worker benchmark) instead of giving it back. These settings return it to the OS a
//! quarter of a second after it is freed.
//!
//! Not at once: purging every freed page immediately (`purge_delay` 0) made the allocator hand pages back and
//! fault them in again thousands of times a second under load — `madvise` and page faults were ~20 % of the
//! worker's CPU in the end-to-end benchmark (13,500 against 11,600 records/s with 250 ms). A quarter of a
//! second keeps the pages of the records in flight and still returns a drained backlog's memory promptly.

/// mimalloc's `mi_option_arena_eager_commit` and `mi_option_purge_delay` (positions in `mi_option_e` of the
/// mimalloc v3 that `libmimalloc-sys` 0.1.49 builds; the crate does not export these two as constants).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed pages stay committed before they are returned to the OS (see the module doc).
pub const PURGE_DELAY_MS: std::os::raw::c_long = 250;

/// Commits arena memory only when used and purges freed pages after [`PURGE_DELAY_MS`]. Call first thing in `main`;
/// it only changes settings, so it is harmless when another allocator is installed. A setting given in
/// mimalloc's own environment variable (`MIMALLOC_ARENA_EAGER_COMMIT`, `MIMALLOC_PURGE_DELAY`) wins, so an
/// operator can trade memory for speed without a rebuild.
pub fn configure() {
    for (option, variable, value) in [
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mi_option_set stores an integer in mimalloc's option table; it is thread-safe and
            // valid for any option index below `_mi_option_last`.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}
