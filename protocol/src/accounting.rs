//! Privacy accounting for the Gaussian mechanism by Rényi differential privacy (RDP).
//!
//! A release with L2 sensitivity C and Gaussian noise of standard deviation z·C on every
//! coordinate satisfies (α, α / (2 z²))-RDP for every order α > 1 (Mironov 2017,
//! Corollary 3). RDP composes by adding: `r` releases give r·α / (2 z²). The (ε, δ) guarantee
//! is the best over a fixed grid of orders of
//!
//! ε(α) = rdp(α) + ln(1 − 1/α) − ln(δ·α) / (α − 1)
//!
//! (Canonne, Kamath and Steinke 2020, Proposition 12; Asoodeh et al. 2020), the conversion
//! and order grid of Google's `dp-accounting` RDP accountant, whose values the tests check.
//! No subsampling is assumed: each release uses all of the data it protects.

/// The orders α the accountant minimizes over: 1.1 to 10.9 in steps of 0.1, 11 to 63, and
/// 128, 256, 512, 1024 (the default grid of `dp-accounting`).
pub fn orders() -> impl Iterator<Item = f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
}

/// The RDP of order `alpha` of `releases` Gaussian releases with noise multiplier `z`.
pub fn gaussian_rdp(z: f64, releases: u64, alpha: f64) -> f64 {
    releases as f64 * alpha / (2.0 * z * z)
}

/// The ε that `releases` Gaussian releases with noise multiplier `z` spend at `delta`, and
/// the order that gives it. `(0, 0)` without releases; infinite without noise or with
/// `delta` outside (0, 1).
pub fn epsilon(z: f64, releases: u64, delta: f64) -> (f64, f64) {
    if releases == 0 {
        return (0.0, 0.0);
    }
    if !(z > 0.0 && z.is_finite() && delta > 0.0 && delta < 1.0) {
        return (f64::INFINITY, 0.0);
    }
    orders()
        .map(|a| {
            let rdp = gaussian_rdp(z, releases, a);
            let eps = if delta * delta + (-rdp).exp_m1() > 0.0 {
                // Bounded through the KL divergence: delta >= sqrt(1 - exp(-rdp)).
                0.0
            } else {
                rdp + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            };
            (eps.max(0.0), a)
        })
        .fold(
            (f64::INFINITY, 0.0),
            |best, x| if x.0 < best.0 { x } else { best },
        )
}

/// The most releases with noise multiplier `z` that stay within (`target`, `delta`).
pub fn max_releases(z: f64, target: f64, delta: f64) -> u64 {
    if epsilon(z, 1, delta).0 > target {
        return 0;
    }
    // ε grows with the number of releases: double, then bisect.
    let (mut lo, mut hi) = (1u64, 2u64);
    while epsilon(z, hi, delta).0 <= target {
        lo = hi;
        hi = match hi.checked_mul(2) {
            Some(h) if h <= 1 << 40 => h,
            _ => return lo,
        };
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if epsilon(z, mid, delta).0 <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The smallest noise multiplier (to 0.1%) with which `releases` releases spend at most
/// `target` at `delta`; `None` for a target or delta that no noise meets.
pub fn noise_multiplier_for(target: f64, releases: u64, delta: f64) -> Option<f64> {
    if !(target > 0.0 && target.is_finite() && delta > 0.0 && delta < 1.0) {
        return None;
    }
    // ε falls as the noise grows: double, then bisect.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while epsilon(hi, releases, delta).0 > target {
        lo = hi;
        hi *= 2.0;
        if hi > 1e6 {
            return None;
        }
    }
    while hi - lo > 1e-3 * hi {
        let mid = 0.5 * (lo + hi);
        if epsilon(mid, releases, delta).0 > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The privacy budget of one site's releases in an experiment: the manifest's noise
/// multiplier, delta and optional target epsilon. Each training round is one release.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Noise standard deviation over the clip norm.
    pub noise_multiplier: f64,
    /// The delta epsilon is stated at.
    pub delta: f64,
    /// The most epsilon the releases may spend, if the manifest caps it.
    pub target_epsilon: Option<f64>,
}

impl Budget {
    /// The budget of `m`, or `None` without privacy noise (no finite epsilon to speak of).
    pub fn for_manifest(m: &crate::Manifest) -> Option<Self> {
        let p = &m.privacy;
        let z = p
            .noise_multiplier
            .filter(|&z| z > 0.0 && p.clip_norm.is_some())?;
        Some(Self {
            noise_multiplier: z,
            delta: p.delta.unwrap_or(crate::manifest::DEFAULT_DELTA),
            target_epsilon: p.target_epsilon,
        })
    }

    /// The epsilon `releases` releases spend.
    pub fn spent(&self, releases: u64) -> f64 {
        epsilon(self.noise_multiplier, releases, self.delta).0
    }

    /// The most releases within the target, if there is one.
    pub fn max_releases(&self) -> Option<u64> {
        self.target_epsilon
            .map(|t| max_releases(self.noise_multiplier, t, self.delta))
    }

    /// Whether `releases` releases stay within the target (always, without one).
    pub fn allows(&self, releases: u64) -> bool {
        self.target_epsilon
            .is_none_or(|t| self.spent(releases) <= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (noise multiplier, releases, delta, epsilon, best order) from Google's
    /// `dp-accounting` 0.6.0 (`pip install dp-accounting`):
    ///
    /// ```python
    /// import dp_accounting
    /// from dp_accounting.rdp import rdp_privacy_accountant as rdp
    /// acc = rdp.RdpAccountant()
    /// acc.compose(dp_accounting.GaussianDpEvent(z), releases)
    /// acc.get_epsilon_and_optimal_order(delta)
    /// ```
    const DP_ACCOUNTING: [(f64, u64, f64, f64, f64); 7] = [
        (1.0, 1, 1e-5, 4.728507067217623, 5.4),
        (1.0, 10, 1e-5, 19.05359753163139, 2.5),
        (2.0, 50, 1e-5, 22.019852327713252, 2.3),
        (5.0, 100, 1e-6, 11.68862679916635, 3.5),
        (0.8, 48, 1e-5, 77.366308425056, 1.5),
        (10.0, 1000, 1e-5, 19.05359753163139, 2.5),
        (3.0, 48, 1e-5, 12.801691480042894, 3.0),
    ];

    #[test]
    fn epsilon_matches_dp_accounting() {
        for (z, releases, delta, expected, order) in DP_ACCOUNTING {
            let (eps, best) = epsilon(z, releases, delta);
            assert!(
                (eps - expected).abs() <= 1e-9 * expected,
                "z {z}, {releases} releases, delta {delta}: {eps} vs {expected}"
            );
            assert!((best - order).abs() < 1e-9, "order {best} vs {order}");
        }
    }

    #[test]
    fn orders_are_the_default_grid() {
        let grid: Vec<f64> = orders().collect();
        assert_eq!(grid.len(), 99 + 53 + 4);
        assert!((grid[0] - 1.1).abs() < 1e-12 && grid[155] == 1024.0);
    }

    #[test]
    fn max_releases_is_the_last_count_within_the_target() {
        for (z, target) in [(1.0, 4.0), (2.0, 1.0), (3.0, 10.0), (5.0, 4.0)] {
            let n = max_releases(z, target, 1e-5);
            assert!(epsilon(z, n, 1e-5).0 <= target, "z {z}: {n}");
            assert!(epsilon(z, n + 1, 1e-5).0 > target, "z {z}: {n} + 1");
        }
        assert_eq!(
            max_releases(0.3, 1.0, 1e-5),
            0,
            "one release already spends more"
        );
    }

    #[test]
    fn a_manifest_whose_rounds_overspend_its_target_is_refused() {
        let mut m =
            crate::Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml"))
                .unwrap();
        m.privacy.clip_norm = Some(1.0);
        m.privacy.noise_multiplier = Some(3.0);
        m.averaging.rounds = 48;
        // 48 releases at z = 3 spend 12.80 at delta 1e-5 (the dp-accounting table above).
        m.privacy.target_epsilon = Some(12.9);
        m.validate().unwrap();
        let budget = Budget::for_manifest(&m).unwrap();
        assert_eq!(budget.delta, crate::manifest::DEFAULT_DELTA);
        assert!((budget.spent(48) - 12.801691480042894).abs() < 1e-9);
        assert!(budget.allows(48) && !budget.allows(49));
        assert_eq!(budget.max_releases(), Some(48));

        m.privacy.target_epsilon = Some(12.7);
        let e = m.validate().unwrap_err().to_string();
        assert!(
            e.contains("privacy.target_epsilon")
                && e.contains("48 rounds")
                && e.contains("at most 47 rounds fit"),
            "{e}"
        );
        m.averaging.rounds = 47;
        m.validate().unwrap();

        // A budget or a delta without noise means nothing: refused by name.
        m.privacy.noise_multiplier = None;
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("privacy.target_epsilon"), "{e}");
        m.privacy.target_epsilon = None;
        m.privacy.delta = Some(1e-6);
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("privacy.delta"), "{e}");
        m.privacy.noise_multiplier = Some(3.0);
        m.validate().unwrap();
        m.privacy.delta = Some(1.5);
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("privacy.delta") && e.contains("(0, 1)"), "{e}");
    }

    #[test]
    fn the_noise_for_a_target_just_meets_it() {
        for (target, releases) in [(1.0, 48), (4.0, 48), (10.0, 48), (4.0, 1), (0.5, 1000)] {
            let z = noise_multiplier_for(target, releases, 1e-5).unwrap();
            assert!(
                epsilon(z, releases, 1e-5).0 <= target,
                "{target}, {releases}: z {z}"
            );
            assert!(
                epsilon(z * 0.998, releases, 1e-5).0 > target,
                "{target}, {releases}: z {z} is not the smallest"
            );
        }
        assert_eq!(noise_multiplier_for(0.0, 10, 1e-5), None);
        assert_eq!(noise_multiplier_for(1.0, 10, 1.0), None);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(epsilon(1.0, 0, 1e-5), (0.0, 0.0));
        assert!(epsilon(0.0, 3, 1e-5).0.is_infinite());
        assert!(epsilon(1.0, 3, 0.0).0.is_infinite());
        assert!(epsilon(f64::NAN, 3, 1e-5).0.is_infinite());
    }
}
