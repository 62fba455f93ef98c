//! Keeps the memory of freed tensors in the process for the next training step.
//!
//! glibc's malloc hands every block above its mmap threshold (128 KiB at start) to the kernel
//! with `mmap` and gives it back with `munmap` when freed. A UNet step allocates and frees
//! activations, gradients and column buffers of a few MiB each, hundreds of times: every one
//! was a fresh mapping, zeroed page by page on first touch, and every unmap interrupted the
//! other core to flush its TLB. `perf` on the step benchmark put 15% of the step in the kernel
//! for this; raising the thresholds took the flex step from 387 ms to 313 ms on this machine
//! (benches/README.md). The cost: the process keeps its peak heap after training instead of
//! returning it.
//!
//! A site's IT staff can still tune glibc themselves: when any `MALLOC_MMAP_THRESHOLD_` or
//! `MALLOC_TRIM_THRESHOLD_` is set in the environment, this leaves malloc alone.

use std::sync::Once;

/// Blocks up to this size come from the heap (glibc's largest allowed threshold, 32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory at the top of the heap stays mapped up to this much.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Sets malloc up for training, once per process (a no-op off glibc).
pub fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let tuned = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if tuned {
            tracing::debug!("malloc thresholds set in the environment; leaving them");
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallopt only changes two glibc tuning values; it is thread-safe and
            // called once, and glibc checks the values (1 on success).
            #[allow(unsafe_code)]
            let ok = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            };
            if !ok {
                tracing::warn!("glibc refused the malloc thresholds; training runs slower");
            }
        }
    });
}
