//! The allocator's settings for a long-running worker. The binary (and the benchmarks) use mimalloc, which by
//! default keeps freed memory committed for reuse: a worker that drained a large backlog would sit at its peak
//! RSS (~95 MB in the worker benchmark) instead of giving it back. These settings return it to the OS at once.

/// mimalloc's `mi_option_arena_eager_commit` and `mi_option_purge_delay` (positions in `mi_option_e` of the
/// mimalloc v3 that `libmimalloc-sys` 0.1.49 builds; the crate does not export these two as constants).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Commits arena memory only when used and purges freed pages without delay. Call first thing in `main`;
/// it only changes settings, so it is harmless when another allocator is installed. A setting given in
/// mimalloc's own environment variable (`MIMALLOC_ARENA_EAGER_COMMIT`, `MIMALLOC_PURGE_DELAY`) wins, so an
/// operator can trade memory for speed without a rebuild.
pub fn configure() {
    for (option, variable, value) in [
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mi_option_set stores an integer in mimalloc's option table; it is thread-safe and
            // valid for any option index below `_mi_option_last`.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}
