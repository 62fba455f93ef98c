//! Differential privacy of what leaves a site (the manifest's `privacy` section). Each
//! round's release is the site's previous release (at first the experiment's initial model,
//! which every member derives from the manifest's seed) plus the site's change since then,
//! clipped to `clip_norm` (L2), plus Gaussian noise of standard deviation
//! `noise_multiplier x clip_norm` on every weight. A release thus depends on the site's data
//! only through one clipped change, given what was already released: each is a Gaussian
//! mechanism of sensitivity `clip_norm`, and they compose ([`medmesh_protocol::accounting`]).
//! Only what is sent changes; the site keeps training its exact model.
//!
//! Releases are counted in a ledger beside the checkpoint, written before a release can
//! leave the site, so a restart (which may redo a round) never forgets one. Once the next
//! release would spend more than the manifest's `target_epsilon`, the site publishes
//! nothing new: it serves its last release again, which reveals nothing more.

use std::path::{Path, PathBuf};

use medmesh_protocol::Manifest;
use medmesh_protocol::accounting::Budget;
use medmesh_protocol::provenance::PrivacySpent;
use medmesh_protocol::robust::clip_towards;
use medmesh_training::atomic_file;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// What can go wrong keeping the privacy ledger.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// The operating system's randomness is unavailable.
    #[error("seeding the privacy noise from the OS: {0}")]
    Seed(getrandom::Error),
    /// The ledger cannot be read or written.
    #[error("privacy ledger {}: {source}", path.display())]
    Io {
        /// The ledger.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The ledger is damaged, or is another model's.
    #[error("privacy ledger {} is unusable: {detail}; it counts this site's releases, so the run stops rather than forget them", path.display())]
    Corrupt {
        /// The ledger.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

/// A round's release.
pub enum Release {
    /// A new release: the model's clipped, noised change on top of the last one, and the
    /// clipping factor (1 when within the norm).
    Fresh(Vec<f32>, f64),
    /// The budget is spent: the last release again, which costs nothing more.
    Spent(Vec<f32>),
}

/// Turns a round's local model into what may leave the site.
pub struct Privatizer {
    clip_norm: f64,
    sigma: f64,
    budget: Option<Budget>,
    rng: ChaCha20Rng,
    /// What the site released last (the initial model before the first release).
    last_release: Vec<f32>,
    /// Releases so far.
    releases: u64,
    ledger: PathBuf,
}

const LEDGER_MAGIC: &[u8; 8] = b"MMDPLED1";

impl Privatizer {
    /// The privatizer `m` asks for, or `None` when `privacy.clip_norm` is not set; `initial`
    /// is the experiment's initial model (public: derived from the manifest's seed), and
    /// `ledger` the file that counts releases (resumed when it exists). The noise is a
    /// ChaCha20 stream seeded by the operating system: members all know the manifest's
    /// training seed, so noise drawn from it could be subtracted again.
    pub fn for_manifest(
        m: &Manifest,
        initial: Vec<f32>,
        ledger: &Path,
    ) -> Result<Option<Self>, PrivacyError> {
        let Some(clip_norm) = m.privacy.clip_norm else {
            return Ok(None);
        };
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(PrivacyError::Seed)?;
        let mut p = Self {
            clip_norm,
            sigma: m.privacy.noise_multiplier.unwrap_or(0.0) * clip_norm,
            budget: Budget::for_manifest(m),
            rng: ChaCha20Rng::from_seed(seed),
            last_release: initial,
            releases: 0,
            ledger: ledger.to_owned(),
        };
        p.resume()?;
        Ok(Some(p))
    }

    /// What leaves the site for `model`: the last release plus `model`'s change since it,
    /// clipped and noised (see the module), once the ledger counts it; or the last release
    /// again once the budget is spent.
    pub fn release(&mut self, model: &[f32]) -> Result<Release, PrivacyError> {
        if self.budget.is_some_and(|b| !b.allows(self.releases + 1)) {
            return Ok(Release::Spent(self.last_release.clone()));
        }
        let mut out = model.to_vec();
        let reference = std::mem::take(&mut self.last_release);
        let factor = self.apply(&reference, &mut out);
        self.last_release = reference;
        // Counted before it can leave; if the ledger cannot be written, it never does.
        self.save(self.releases + 1, &out)?;
        self.releases += 1;
        self.last_release.copy_from_slice(&out);
        Ok(Release::Fresh(out, factor))
    }

    /// The last release (the initial model before the first): what the site may serve
    /// again at no further cost.
    pub fn last_release(&self) -> &[f32] {
        &self.last_release
    }

    /// Standard deviation of the noise on each weight.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Releases so far.
    pub fn releases(&self) -> u64 {
        self.releases
    }

    /// What the releases spent, with noise on.
    pub fn spent(&self) -> Option<PrivacySpent> {
        self.budget.map(|b| PrivacySpent {
            releases: self.releases,
            epsilon: b.spent(self.releases),
            delta: b.delta,
            target_epsilon: b.target_epsilon,
            noise_multiplier: b.noise_multiplier,
            clip_norm: self.clip_norm,
        })
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

    /// Writes the ledger (atomically): magic, `releases`, `last`'s length and weights, BLAKE3
    /// of all before.
    fn save(&self, releases: u64, last: &[f32]) -> Result<(), PrivacyError> {
        let mut bytes = Vec::with_capacity(56 + 4 * last.len());
        bytes.extend_from_slice(LEDGER_MAGIC);
        bytes.extend_from_slice(&releases.to_le_bytes());
        bytes.extend_from_slice(&(last.len() as u64).to_le_bytes());
        for v in last {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let hash = blake3::hash(&bytes);
        bytes.extend_from_slice(hash.as_bytes());
        atomic_file::write(&self.ledger, &bytes, 0o600).map_err(|source| PrivacyError::Io {
            path: self.ledger.clone(),
            source,
        })
    }

    /// Takes up the release count and last release from the ledger, if there is one.
    fn resume(&mut self) -> Result<(), PrivacyError> {
        let bytes = match std::fs::read(&self.ledger) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(PrivacyError::Io {
                    path: self.ledger.clone(),
                    source,
                });
            }
        };
        let corrupt = |detail: String| PrivacyError::Corrupt {
            path: self.ledger.clone(),
            detail,
        };
        let n = self.last_release.len();
        let expected = 24 + 4 * n + 32;
        if bytes.len() < 24 || &bytes[..8] != LEDGER_MAGIC {
            return Err(corrupt("not a privacy ledger".into()));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if word(16) != n as u64 || bytes.len() != expected {
            return Err(corrupt(format!(
                "it holds {} weights in {} bytes, where this model has {n}",
                word(16),
                bytes.len()
            )));
        }
        let (body, hash) = bytes.split_at(expected - 32);
        if blake3::hash(body).as_bytes() != hash {
            return Err(corrupt("its checksum does not match".into()));
        }
        for (v, b) in self.last_release.iter_mut().zip(body[24..].chunks_exact(4)) {
            *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        self.releases = word(8);
        Ok(())
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

    fn privatizer(m: &Manifest, initial: Vec<f32>, dir: &tempfile::TempDir) -> Privatizer {
        Privatizer::for_manifest(m, initial, &dir.path().join("ledger"))
            .unwrap()
            .unwrap()
    }

    fn fresh(r: Release) -> (Vec<f32>, f64) {
        match r {
            Release::Fresh(v, f) => (v, f),
            Release::Spent(_) => panic!("the budget is not spent"),
        }
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
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger");
        assert!(
            Privatizer::for_manifest(&manifest(None, None), Vec::new(), &ledger)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn updates_are_clipped_around_the_starting_model() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = privatizer(&manifest(Some(0.5), None), Vec::new(), &dir);
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
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(Some(2.0), Some(0.25));
        let mut p = privatizer(&m, Vec::new(), &dir);
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
        let mut q = privatizer(&m, Vec::new(), &dir);
        let mut c = start.clone();
        q.apply(&start, &mut c);
        assert!(distance(&a, &b) > 100.0 && distance(&a, &c) > 100.0);
    }

    #[test]
    fn each_release_moves_at_most_clip_norm_from_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let initial: Vec<f32> = (0..500).map(|i| (i as f32 * 0.1).cos()).collect();
        let mut p = privatizer(&manifest(Some(0.5), None), initial.clone(), &dir);
        // The site's own model runs far ahead, mixing in its own exact weights each round;
        // what it releases moves at most clip_norm a round, from its previous release.
        let mut previous = initial.clone();
        let mut model = initial.clone();
        for round in 1..=5 {
            model.iter_mut().for_each(|v| *v += 0.3);
            let (released, factor) = fresh(p.release(&model).unwrap());
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
        let (again, factor) = fresh(p.release(&previous).unwrap());
        assert_eq!(factor, 1.0);
        assert_eq!(again, previous);
        // No noise: no finite epsilon to report.
        assert_eq!(p.spent(), None);
    }

    #[test]
    fn a_spent_budget_publishes_nothing_new_even_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manifest(Some(1.0), Some(3.0));
        // 48 releases at z = 3 spend 12.80 at delta 1e-5; 12.9 allows exactly 48.
        m.averaging.rounds = 48;
        m.privacy.target_epsilon = Some(12.9);
        m.validate().unwrap();
        let initial = vec![0f32; 64];
        let mut p = privatizer(&m, initial.clone(), &dir);
        let mut model = initial.clone();
        for _ in 0..30 {
            model.iter_mut().for_each(|v| *v += 0.01);
            fresh(p.release(&model).unwrap());
        }
        // The node restarts (and may redo a round): the ledger remembers every release and
        // the last one, which the next is taken from.
        let last = p.last_release.clone();
        drop(p);
        let mut p = privatizer(&m, initial.clone(), &dir);
        assert_eq!(p.releases(), 30);
        assert_eq!(p.last_release, last);
        for _ in 30..48 {
            fresh(p.release(&model).unwrap());
        }
        let spent = p.spent().unwrap();
        assert_eq!(spent.releases, 48);
        assert!(spent.epsilon <= 12.9 && spent.epsilon > 12.8, "{spent:?}");
        // The 49th would overspend: the last release again, however the model moves.
        let last = p.last_release.clone();
        model.iter_mut().for_each(|v| *v += 5.0);
        for _ in 0..3 {
            match p.release(&model).unwrap() {
                Release::Spent(v) => assert_eq!(v, last),
                Release::Fresh(..) => panic!("released past the budget"),
            }
        }
        assert_eq!(p.releases(), 48);
        drop(p);
        assert_eq!(privatizer(&m, initial, &dir).releases(), 48);
    }

    #[test]
    fn a_damaged_or_foreign_ledger_stops_the_run_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(Some(1.0), Some(1.0));
        let mut p = privatizer(&m, vec![0.0; 16], &dir);
        fresh(p.release(&[0.5; 16]).unwrap());
        let path = dir.path().join("ledger");
        // Another model's size.
        let e = Privatizer::for_manifest(&m, vec![0.0; 17], &path)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("privacy ledger") && e.contains("this model has 17"),
            "{e}"
        );
        // A flipped bit.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = Privatizer::for_manifest(&m, vec![0.0; 16], &path)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("checksum"), "{e}");
    }
}
