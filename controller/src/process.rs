//! Settings of the controller process itself, applied by a binary that runs a controller
//! and starts no user work (`scabbard controller`, `scabbard-bench`).
//!
//! **Transparent huge pages off.** mimalloc asks the kernel for transparent huge pages, so
//! every fresh or purged 2 MiB region is zeroed in full on its first touch. A controller
//! allocates and frees at a steady rate (requests, task records, watch events), and under
//! `scabbard-bench --kind noop` (2 cores) the kernel's `clear_page_erms` took ~9–10 % of all
//! CPU; with THP off for the process it fell to 0.2 %, system time from 0.87–1.00 s to
//! 0.54–0.63 s and peak RSS from 189–205 MB to 152–158 MB (4 + 4 interleaved runs with
//! `MIMALLOC_ALLOW_THP=0`, which does the same). Databases give the same advice (Redis,
//! MongoDB). The flag is inherited by child processes, which is why workers (whose tasks
//! are children) and `scabbard dev` (which runs a worker) leave it alone.

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing). Failure
/// only costs the speed-up, so it is logged, not returned.
#[allow(unsafe_code)] // one prctl(2) call
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not turn transparent huge pages off");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    #[allow(unsafe_code)] // reads the flag back
    fn the_process_flag_is_set() {
        super::disable_transparent_huge_pages();
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1);
    }
}
