//! Shared helpers for the medmesh benchmarks: deterministic inputs and the baselines every
//! benchmark is measured against in the same run.

/// Deterministic pseudo-random weights (splitmix64), roughly N(0, 0.05)-sized like trained
/// conv weights; no RNG crate needed.
pub fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// The memcpy baseline: copies `src` into `dst` (same length).
pub fn memcpy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    #[test]
    fn weights_are_deterministic_and_bounded() {
        let a = super::weights(1000, 1);
        assert_eq!(a, super::weights(1000, 1));
        assert_ne!(a, super::weights(1000, 2));
        assert!(a.iter().all(|v| v.abs() <= 0.05));
    }
}
