//! The atomics the ring protocol uses, routed through one module so that `--cfg loom` can swap in
//! loom's model-checked versions (see `ring::loom_tests`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, Ordering, fence};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU32, Ordering, fence};

/// A pause inside a spin loop (under loom: a yield, so the model can schedule the other side).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
