//! Differential privacy of what leaves a site (the manifest's `privacy` section). Each
//! round's release is the site's previous release (at first the experiment's initial model,
//! which every member derives from the manifest's seed) plus the site's change since then,
//! clipped to `clip_norm` (L2), plus Gaussian noise of standard deviation
//! `noise_multiplier x clip_norm` on every weight. A release thus depends on the site's data
//! only through one clipped change, given what was already released: each is a Gaussian
//! mechanism of sensitivity `clip_norm`, and they compose ([`medmesh_protocol::accounting`]).
//! Only what is sent changes; the site keeps training its exact model.

use medmesh_protocol::Manifest;
use medmesh_protocol::robust::clip_towards;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// Turns a round's local model into what may leave the site.
pub struct Privatizer {
    clip_norm: f64,
    sigma: f64,
    rng: ChaCha20Rng,
    /// What the site released last (the initial model before the first release).
    last_release: Vec<f32>,
}

impl Privatizer {
    /// The privatizer `m` asks for, or `None` when `privacy.clip_norm` is not set; `initial`
    /// is the experiment's initial model (public: derived from the manifest's seed). The noise
    /// is a ChaCha20 stream seeded by the operating system: members all know the manifest's
    /// training seed, so noise drawn from it could be subtracted again.
    pub fn for_manifest(m: &Manifest, initial: Vec<f32>) -> Result<Option<Self>, getrandom::Error> {
        let Some(clip_norm) = m.privacy.clip_norm else {
            return Ok(None);
        };
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(Some(Self {
            clip_norm,
            sigma: m.privacy.noise_multiplier.unwrap_or(0.0) * clip_norm,
            rng: ChaCha20Rng::from_seed(seed),
            last_release: initial,
        }))
    }

    /// What leaves the site for `model`: the last release plus `model`'s change since it,
    /// clipped and noised (see the module). The result becomes the next release's reference,
    /// whether or not a peer fetches it. Returns it with the clipping factor.
    pub fn release(&mut self, model: &[f32]) -> (Vec<f32>, f64) {
        let reference = std::mem::take(&mut self.last_release);
        let mut out = model.to_vec();
        let factor = self.apply(&reference, &mut out);
        self.last_release = reference;
        self.last_release.copy_from_slice(&out);
        (out, factor)
    }

    /// Standard deviation of the noise on each weight.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Rewrites `model` in place: clips its distance to `start`, then adds noise. Returns the
    /// clipping factor (1 when within the norm).
    fn apply(&mut self, start: &[f32], model: &mut [f32]) -> f64 {
        let factor = clip_towards(model, start, self.clip_norm);
        if self.sigma > 0.0 {
            for pair in model.chunks_mut(2) {
                let (a, b) = self.gaussian_pair();
                pair[0] += (a * self.sigma) as f32;
                if let Some(second) = pair.get_mut(1) {
                    *second += (b * self.sigma) as f32;
                }
            }
        }
        factor
    }

    /// Two independent standard normal draws (Box-Muller).
    fn gaussian_pair(&mut self) -> (f64, f64) {
        // In (0, 1]: the logarithm below never sees zero.
        let u1 = ((self.rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        (r * theta.cos(), r * theta.sin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(clip: Option<f64>, noise: Option<f64>) -> Manifest {
        let mut m =
            Manifest::parse(include_str!("../../../examples/synthetic-quickstart.toml")).unwrap();
        m.privacy.clip_norm = clip;
        m.privacy.noise_multiplier = noise;
        m.validate().unwrap();
        m
    }

    fn distance(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn off_unless_clip_norm_is_set() {
        assert!(
            Privatizer::for_manifest(&manifest(None, None), Vec::new())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn updates_are_clipped_around_the_starting_model() {
        let mut p = Privatizer::for_manifest(&manifest(Some(0.5), None), Vec::new())
            .unwrap()
            .unwrap();
        let start: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
        let mut far: Vec<f32> = start.iter().map(|v| v + 0.1).collect();
        let factor = p.apply(&start, &mut far);
        assert!(factor < 1.0);
        assert!((distance(&far, &start) - 0.5).abs() < 1e-4);
        // Within the norm: unchanged (no noise without a multiplier).
        let mut near: Vec<f32> = start.iter().map(|v| v + 0.001).collect();
        let before = near.clone();
        assert_eq!(p.apply(&start, &mut near), 1.0);
        assert_eq!(near, before);
    }

    #[test]
    fn noise_has_the_asked_deviation_and_is_never_repeated() {
        let mut p = Privatizer::for_manifest(&manifest(Some(2.0), Some(0.25)), Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(p.sigma(), 0.5);
        let start = vec![0f32; 200_001];
        let mut a = start.clone();
        p.apply(&start, &mut a);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let sd = (a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((sd - 0.5).abs() < 0.005, "sd {sd}");
        // A second round, and a second privatizer, draw other noise.
        let mut b = start.clone();
        p.apply(&start, &mut b);
        let mut q = Privatizer::for_manifest(&manifest(Some(2.0), Some(0.25)), Vec::new())
            .unwrap()
            .unwrap();
        let mut c = start.clone();
        q.apply(&start, &mut c);
        assert!(distance(&a, &b) > 100.0 && distance(&a, &c) > 100.0);
    }

    #[test]
    fn each_release_moves_at_most_clip_norm_from_the_last() {
        let initial: Vec<f32> = (0..500).map(|i| (i as f32 * 0.1).cos()).collect();
        let mut p = Privatizer::for_manifest(&manifest(Some(0.5), None), initial.clone())
            .unwrap()
            .unwrap();
        // The site's own model runs far ahead, mixing in its own exact weights each round;
        // what it releases moves at most clip_norm a round, from its previous release.
        let mut previous = initial.clone();
        let mut model = initial.clone();
        for round in 1..=5 {
            model.iter_mut().for_each(|v| *v += 0.3);
            let (released, factor) = p.release(&model);
            assert!(factor < 1.0, "round {round}: the change is clipped");
            let step = distance(&released, &previous);
            assert!((step - 0.5).abs() < 1e-3, "round {round}: moved {step}");
            assert!(
                distance(&released, &model) > 1.0,
                "the model itself never leaves"
            );
            previous = released;
        }
        // The reference is the last release, not the model: a model equal to it releases
        // unchanged.
        let (again, factor) = p.release(&previous);
        assert_eq!(factor, 1.0);
        assert_eq!(again, previous);
    }
}
