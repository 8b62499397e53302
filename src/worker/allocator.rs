//! The allocator's settings for a long-running worker. The binary (and the benchmarks) use mimalloc, which by
//! default keeps freed memory committed for reuse: a worker that drained a large backlog would sit at its peak
//! RSS (~95 MB in the worker benchmark) instead of giving it back. These settings return it to the OS a
//! quarter of a second after it is freed.
//!
//! Not at once: purging every freed page immediately (`purge_delay` 0) made the allocator hand pages back and
//! fault them in again thousands of times a second under load — `madvise` and page faults were ~20 % of the
//! worker's CPU in the end-to-end benchmark (13,500 against 11,600 records/s with 250 ms). A quarter of a
//! second keeps the pages of the records in flight and still returns a drained backlog's memory promptly.
//!
//! Without transparent huge pages: mimalloc asks for them on its arenas (`MADV_HUGEPAGE`) but purges in 4 KiB
//! pages, so a page freed and touched again a moment later faults in a whole 2 MiB huge page, which the kernel
//! zeroes first. In the end-to-end benchmark that zeroing (`clear_page_erms` under `do_huge_pmd_anonymous_page`)
//! was 4-9 % of the worker's CPU samples; with huge pages off for the process it does not appear.

/// mimalloc's `mi_option_arena_eager_commit` and `mi_option_purge_delay` (positions in `mi_option_e` of the
/// mimalloc v3 that `libmimalloc-sys` 0.1.49 builds; the crate does not export these two as constants).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_allow_thp` in the same enum.
const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// How long freed pages stay committed before they are returned to the OS (see the module doc).
pub const PURGE_DELAY_MS: std::os::raw::c_long = 250;

/// Commits arena memory only when used, purges freed pages after [`PURGE_DELAY_MS`] and turns transparent huge
/// pages off for the process. Call first thing in `main`; it only changes settings, so it is harmless when another
/// allocator is installed. A setting given in mimalloc's own environment variable (`MIMALLOC_ARENA_EAGER_COMMIT`,
/// `MIMALLOC_PURGE_DELAY`, `MIMALLOC_ALLOW_THP`) wins, so an operator can trade memory for speed without a rebuild.
pub fn configure() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // mimalloc reads its own option when it starts, before `main`, and by then its first arena is mapped
        // with `MADV_HUGEPAGE`; the process-wide switch also covers that arena (and SQLite's heap).
        #[cfg(target_os = "linux")]
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag of this process's memory map.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    for (option, variable, value) in [
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS),
        (ALLOW_THP, "MIMALLOC_ALLOW_THP", 0),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mi_option_set stores an integer in mimalloc's option table; it is thread-safe and
            // valid for any option index below `_mi_option_last`.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn configure_turns_transparent_huge_pages_off_unless_the_operator_chose() {
        super::configure();
        // SAFETY: PR_GET_THP_DISABLE only reads this process's flag.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        // SAFETY: mi_option_get reads mimalloc's option table.
        let allowed = unsafe { libmimalloc_sys::mi_option_get(super::ALLOW_THP) };
        // An operator's `MIMALLOC_ALLOW_THP` is left alone (mimalloc applied it before `main`); CI sets none.
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            assert_eq!((disabled, allowed), (1, 0));
        }
    }
}
