//! CPU hints for the datapath.

/// Asks the CPU to bring the cache line holding `r` closer (a no-op where unsupported). It never
/// faults and changes nothing observable: the flowswitch uses it to overlap the cache misses of
/// a batch of lookups.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` only needs SSE, which every x86_64 CPU has; a prefetch of any
    // address is architecturally a hint and never faults, and `r` is a valid reference anyway.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            (r as *const T).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}
