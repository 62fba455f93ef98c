//! Dataset fingerprints and the experiment plan derived from them: nnU-Net's self-configuration,
//! computed from statistics the sites share instead of from pooled images.
//!
//! Each site computes a [`Fingerprint`] of its dataset (`medmesh data fingerprint`): every
//! case's grid size and voxel spacing, and per channel the count, mean, standard deviation and
//! 101 quantiles of the intensities inside the labelled foreground. Its node signs it. No voxel,
//! no label and no case name leaves the site. [`plan`] merges the sites' fingerprints into:
//!
//! * the target spacing: the median spacing per axis over all cases, with nnU-Net's rule for
//!   anisotropic data (the coarsest axis takes its 10th percentile when the median spacing is
//!   more than three times finer along the other axes);
//! * the normalization: CT's fixed clip at the pooled foreground 0.5th and 99.5th percentiles
//!   then the pooled foreground mean and standard deviation; otherwise a per-case z-score;
//! * the input (patch) size: the median case extent in the manifest's plane at the target
//!   spacing, rounded to what the UNet's depth divides, at most [`MAX_PLANNED_SIDE`].
//!
//! Pooled percentiles are computed from the sites' quantiles by mixing their distribution
//! functions (each interpolated linearly between its quantiles) with weights equal to their
//! foreground voxel counts, and inverting the mixture. The error is that of the interpolation:
//! at most the gap between two neighbouring quantiles of one site.

use medmesh_crypto::{Domain, Identity, MembershipError, PublicKey, Role, Roster, Signature};
use serde::{Deserialize, Serialize};

use crate::manifest::{Intensity, IntensityScheme, Manifest, Plane};

/// The probabilities (in percent) of the quantiles a fingerprint carries: 0.5, 1, 2, ..., 99,
/// 99.5.
pub fn quantile_percents() -> Vec<f64> {
    let mut p = vec![0.5];
    p.extend((1..=99).map(f64::from));
    p.push(99.5);
    p
}

/// Number of quantiles per channel.
pub const QUANTILES: usize = 101;
/// Most cases one fingerprint may describe.
pub const MAX_CASES: usize = 100_000;
/// Most channels.
pub const MAX_CHANNELS: usize = 16;
/// Longest modality name, dataset name or consortium name.
pub const MAX_NAME_LEN: usize = 64;
/// The largest input side a plan proposes (the model trains on slices resized to it).
pub const MAX_PLANNED_SIDE: u32 = 256;
/// The largest 3D patch depth a plan proposes.
pub const MAX_PLANNED_DEPTH: u32 = 128;

/// What one site shares about one of its datasets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// The consortium it is shared with.
    pub consortium: String,
    /// The dataset name, as manifests' `task.dataset` say it.
    pub dataset: String,
    /// The node that signed it (set by [`SignedFingerprint::sign`]).
    pub node: PublicKey,
    /// Per channel, the modality `dataset.json` names ("CT", "MRI", ...); empty when unknown.
    pub modalities: Vec<String>,
    /// Each case's grid and spacing, in RAS.
    pub cases: Vec<CaseShape>,
    /// Per channel, the intensities inside the foreground (label > 0).
    pub foreground: Vec<IntensityStats>,
}

/// One case's grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseShape {
    /// Voxels along x, y, z.
    pub dims: [u32; 3],
    /// Millimetres between voxel centres along x, y, z.
    pub spacing: [f64; 3],
}

/// Summary of one channel's foreground intensities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensityStats {
    /// Foreground voxels counted.
    pub voxels: u64,
    /// Their mean.
    pub mean: f64,
    /// Their standard deviation.
    pub std: f64,
    /// Quantiles at [`quantile_percents`], ascending.
    pub quantiles: Vec<f64>,
}

/// A fingerprint with its node's signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedFingerprint {
    /// The statistics.
    pub fingerprint: Fingerprint,
    /// The node's signature over them.
    pub signature: Signature,
}

/// Why a fingerprint or a set of them cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FingerprintError {
    /// A field is out of its bounds.
    #[error("fingerprint field {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The signer is not an active node of the roster.
    #[error("fingerprint signer not allowed: {0}")]
    Membership(MembershipError),
    /// The signature does not verify.
    #[error("fingerprint signature rejected: {0}")]
    Signature(medmesh_crypto::SignatureError),
}

impl From<MembershipError> for FingerprintError {
    fn from(e: MembershipError) -> Self {
        Self::Membership(e)
    }
}

impl From<medmesh_crypto::SignatureError> for FingerprintError {
    fn from(e: medmesh_crypto::SignatureError) -> Self {
        Self::Signature(e)
    }
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    /// Nothing to plan from.
    #[error("no fingerprints to plan from")]
    Empty,
    /// A fingerprint that does not fit the manifest or the others.
    #[error("fingerprint of site {node}: {reason}")]
    Mismatch {
        /// The site's node key.
        node: PublicKey,
        /// What does not fit.
        reason: String,
    },
}

impl Fingerprint {
    /// Checks sizes and values: a fingerprint read from a file or the network is untrusted.
    pub fn check(&self) -> Result<(), FingerprintError> {
        let bad = |field, reason: String| Err(FingerprintError::Invalid { field, reason });
        for (field, s) in [("consortium", &self.consortium), ("dataset", &self.dataset)] {
            if s.is_empty() || s.len() > MAX_NAME_LEN {
                return bad(field, format!("must be 1 to {MAX_NAME_LEN} bytes"));
            }
        }
        if self.cases.is_empty() || self.cases.len() > MAX_CASES {
            return bad(
                "cases",
                format!("{} cases, must be 1 to {MAX_CASES}", self.cases.len()),
            );
        }
        let channels = self.foreground.len();
        if channels == 0 || channels > MAX_CHANNELS {
            return bad(
                "foreground",
                format!("{channels} channels, must be 1 to {MAX_CHANNELS}"),
            );
        }
        if self.modalities.len() != channels {
            return bad(
                "modalities",
                format!("{} names for {channels} channels", self.modalities.len()),
            );
        }
        if let Some(m) = self.modalities.iter().find(|m| m.len() > MAX_NAME_LEN) {
            let start: String = m.chars().take(16).collect();
            return bad("modalities", format!("{start:?}... is too long"));
        }
        for (i, c) in self.cases.iter().enumerate() {
            if c.dims.contains(&0)
                || !c
                    .spacing
                    .iter()
                    .all(|s| s.is_finite() && *s > 0.0 && *s <= 1000.0)
            {
                return bad(
                    "cases",
                    format!("case {i}: dims {:?} spacing {:?}", c.dims, c.spacing),
                );
            }
        }
        for (ch, s) in self.foreground.iter().enumerate() {
            let ordered = s.quantiles.windows(2).all(|w| w[0] <= w[1]);
            let finite = s
                .quantiles
                .iter()
                .chain([&s.mean, &s.std])
                .all(|v| v.is_finite());
            if s.quantiles.len() != QUANTILES || !ordered || !finite || s.std < 0.0 {
                return bad(
                    "foreground",
                    format!(
                        "channel {ch}: needs {QUANTILES} finite ascending quantiles, a finite mean \
                         and a standard deviation of at least 0"
                    ),
                );
            }
        }
        Ok(())
    }
}

impl SignedFingerprint {
    /// Signs `fingerprint` as `node` (whose key replaces `fingerprint.node`).
    pub fn sign(mut fingerprint: Fingerprint, node: &Identity) -> Self {
        fingerprint.node = node.public_key();
        let signature = node.sign(Domain::DatasetFingerprint, &canonical(&fingerprint));
        Self {
            fingerprint,
            signature,
        }
    }

    /// Checks the contents, that an active node of `roster` signed it, and that it is for
    /// `roster`'s consortium.
    pub fn verify(&self, roster: &Roster) -> Result<&Fingerprint, FingerprintError> {
        let f = &self.fingerprint;
        f.check()?;
        if f.consortium != roster.consortium {
            return Err(FingerprintError::Invalid {
                field: "consortium",
                reason: format!(
                    "{:?}, but the roster is consortium {:?}",
                    f.consortium, roster.consortium
                ),
            });
        }
        roster.authorize(&f.node, Role::Node)?;
        f.node
            .verify(Domain::DatasetFingerprint, &canonical(f), &self.signature)?;
        Ok(f)
    }
}

fn canonical(f: &Fingerprint) -> Vec<u8> {
    bincode::serde::encode_to_vec(f, bincode::config::standard())
        .unwrap_or_else(|e| unreachable!("encoding a fingerprint into memory cannot fail: {e}"))
}

/// What [`plan`] derives, with its reasons.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Sites planned from.
    pub sites: usize,
    /// Cases over all sites.
    pub cases: usize,
    /// Median spacing per axis (mm), before the anisotropy rule.
    pub median_spacing: [f64; 3],
    /// `task.target_spacing`.
    pub target_spacing: [f64; 3],
    /// Median grid at the target spacing (voxels along x, y, z).
    pub median_shape: [f64; 3],
    /// `task.intensity`.
    pub intensity: Intensity,
    /// `task.input_size`.
    pub input_size: [u32; 2],
    /// `task.input_depth`, for a 3D model (`model.dims = 3`).
    pub input_depth: Option<u32>,
    /// Pooled foreground statistics of channel 0: voxels, mean, std, 0.5th and 99.5th
    /// percentiles.
    pub foreground: PooledIntensity,
    /// Why each value is what it is, one line each.
    pub reasons: Vec<String>,
}

/// Pooled statistics of one channel's foreground.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PooledIntensity {
    /// Voxels over all sites.
    pub voxels: u64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
    /// 0.5th percentile.
    pub p00_5: f64,
    /// 99.5th percentile.
    pub p99_5: f64,
}

impl Plan {
    /// Writes the plan into `manifest`'s task.
    pub fn apply(&self, manifest: &mut Manifest) {
        manifest.task.target_spacing = Some(self.target_spacing);
        manifest.task.intensity = self.intensity;
        manifest.task.input_size = self.input_size;
        manifest.task.input_depth = self.input_depth;
    }
}

/// Derives target spacing, normalization and input size for `manifest` from the sites'
/// verified fingerprints (see the module's documentation for the rules).
pub fn plan(manifest: &Manifest, fingerprints: &[&Fingerprint]) -> Result<Plan, PlanError> {
    if fingerprints.is_empty() {
        return Err(PlanError::Empty);
    }
    let channels = manifest.task.channels as usize;
    let mut seen = Vec::new();
    for f in fingerprints {
        let mismatch = |reason: String| PlanError::Mismatch {
            node: f.node,
            reason,
        };
        if f.dataset != manifest.task.dataset {
            return Err(mismatch(format!(
                "it describes dataset {:?}, the manifest trains on {:?}",
                f.dataset, manifest.task.dataset
            )));
        }
        if f.consortium != manifest.consortium {
            return Err(mismatch(format!(
                "it is for consortium {:?}, the manifest for {:?}",
                f.consortium, manifest.consortium
            )));
        }
        if f.foreground.len() != channels {
            return Err(mismatch(format!(
                "{} channels, the manifest says {channels}",
                f.foreground.len()
            )));
        }
        if seen.contains(&f.node) {
            return Err(mismatch("given twice".into()));
        }
        seen.push(f.node);
    }
    let mut reasons = Vec::new();
    let shapes: Vec<&CaseShape> = fingerprints.iter().flat_map(|f| &f.cases).collect();

    // Spacing: the median per axis; nnU-Net's anisotropy rule for the coarsest axis.
    let axis_values =
        |axis: usize| -> Vec<f64> { shapes.iter().map(|c| c.spacing[axis]).collect() };
    let median_spacing: [f64; 3] = std::array::from_fn(|a| percentile(&axis_values(a), 50.0));
    let mut target_spacing = median_spacing;
    let (coarse, &coarsest) = median_spacing
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("three axes");
    let finest_other = (0..3)
        .filter(|&a| a != coarse)
        .map(|a| median_spacing[a])
        .fold(f64::INFINITY, f64::min);
    if coarsest > 3.0 * finest_other {
        target_spacing[coarse] = percentile(&axis_values(coarse), 10.0).max(finest_other);
        reasons.push(format!(
            "spacing: median {median_spacing:.3?} mm is anisotropic (axis {coarse} over 3x the \
             finest); that axis takes its 10th percentile, {:.3} mm",
            target_spacing[coarse]
        ));
    } else {
        reasons.push(format!(
            "spacing: the median over {} cases, {median_spacing:.3?} mm",
            shapes.len()
        ));
    }

    // Shape at the target spacing, then the input size in the manifest's plane.
    let extent = |axis: usize| -> Vec<f64> {
        shapes
            .iter()
            .map(|c| f64::from(c.dims[axis]) * c.spacing[axis] / target_spacing[axis])
            .collect()
    };
    let median_shape: [f64; 3] = std::array::from_fn(|a| percentile(&extent(a), 50.0));
    let (rows_axis, cols_axis) = in_plane_axes(manifest.task.plane);
    let divisor = 1u32 << (manifest.model.depth.clamp(3, 5) - 1);
    let side = |voxels: f64| -> u32 {
        let rounded = (voxels / f64::from(divisor)).round().max(1.0) as u32 * divisor;
        rounded.clamp(16u32.next_multiple_of(divisor), MAX_PLANNED_SIDE)
    };
    let input_size = [side(median_shape[rows_axis]), side(median_shape[cols_axis])];
    reasons.push(format!(
        "input size: the median {} plane at the target spacing is {:.0} x {:.0} voxels; \
         rounded to multiples of {divisor} (depth {}) within 16 to {MAX_PLANNED_SIDE}: {} x {}",
        format!("{:?}", manifest.task.plane).to_lowercase(),
        median_shape[rows_axis],
        median_shape[cols_axis],
        manifest.model.depth,
        input_size[0],
        input_size[1]
    ));

    let normal_axis = manifest.task.plane.axis();
    let input_depth = (manifest.model.dims == 3).then(|| {
        let rounded = (median_shape[normal_axis] / f64::from(divisor))
            .round()
            .max(1.0) as u32;
        let depth = (rounded * divisor).clamp(8u32.next_multiple_of(divisor), MAX_PLANNED_DEPTH);
        reasons.push(format!(
            "input depth (3D): the median extent across the plane is {:.0} voxels; rounded to a \
             multiple of {divisor} within 8 to {MAX_PLANNED_DEPTH}: {depth}",
            median_shape[normal_axis]
        ));
        depth
    });

    // Normalization: CT when every site says channel 0 is CT.
    let channel0: Vec<&IntensityStats> = fingerprints.iter().map(|f| &f.foreground[0]).collect();
    let foreground = pool(&channel0);
    let ct_sites = fingerprints
        .iter()
        .filter(|f| f.modalities[0].eq_ignore_ascii_case("ct"))
        .count();
    let intensity = if ct_sites == fingerprints.len() && channels == 1 {
        reasons.push(format!(
            "normalization: every site's images are CT; clip to the pooled foreground 0.5th and \
             99.5th percentiles [{:.1}, {:.1}], then subtract {:.1} and divide by {:.1}",
            foreground.p00_5, foreground.p99_5, foreground.mean, foreground.std
        ));
        Intensity {
            scheme: IntensityScheme::Ct,
            clip: Some([foreground.p00_5, foreground.p99_5]),
            mean: Some(foreground.mean),
            std: Some(foreground.std.max(1e-6)),
        }
    } else {
        let why = if ct_sites == 0 {
            "no site's images are CT".to_owned()
        } else if channels > 1 {
            format!("{channels} channels")
        } else {
            format!("only {ct_sites} of {} sites say CT", fingerprints.len())
        };
        reasons.push(format!(
            "normalization: {why}; each case is z-scored on its own"
        ));
        Intensity::default()
    };

    // Readable manifests: 0.1 µm and 0.001 intensity units are below any scanner's precision
    // (NIfTI stores spacings as f32, so 0.8 arrives as 0.800000011920929).
    let round = |v: f64, per_unit: f64| (v * per_unit).round() / per_unit;
    let target_spacing = target_spacing.map(|s| round(s, 1e4));
    let intensity = Intensity {
        clip: intensity.clip.map(|c| c.map(|v| round(v, 1e3))),
        mean: intensity.mean.map(|v| round(v, 1e3)),
        std: intensity.std.map(|v| round(v, 1e3).max(1e-3)),
        ..intensity
    };
    Ok(Plan {
        sites: fingerprints.len(),
        cases: shapes.len(),
        median_spacing,
        target_spacing,
        median_shape,
        intensity,
        input_size,
        input_depth,
        foreground,
        reasons,
    })
}

/// The array axes of a slice in `plane`'s rows and columns (as the slicer cuts them).
pub fn in_plane_axes(plane: Plane) -> (usize, usize) {
    match plane {
        Plane::Sagittal => (2, 1),
        Plane::Coronal => (2, 0),
        Plane::Axial => (1, 0),
    }
}

/// Pools the sites' statistics of one channel: exact count, mean and standard deviation;
/// percentiles by inverting the count-weighted mixture of the sites' distribution functions.
pub fn pool(sites: &[&IntensityStats]) -> PooledIntensity {
    let voxels: u64 = sites.iter().map(|s| s.voxels).sum();
    let n = voxels.max(1) as f64;
    let mean = sites.iter().map(|s| s.voxels as f64 * s.mean).sum::<f64>() / n;
    let second = sites
        .iter()
        .map(|s| s.voxels as f64 * (s.std * s.std + s.mean * s.mean))
        .sum::<f64>()
        / n;
    let std = (second - mean * mean).max(0.0).sqrt();
    PooledIntensity {
        voxels,
        mean,
        std,
        p00_5: pooled_percentile(sites, 0.5),
        p99_5: pooled_percentile(sites, 99.5),
    }
}

/// The pooled `pct` percentile: solves Σ wₖ Fₖ(x) = pct/100 by bisection, where Fₖ is site
/// k's distribution function interpolated between its quantiles (and linearly to 0 and 1 one
/// quantile gap beyond its outermost ones).
pub fn pooled_percentile(sites: &[&IntensityStats], pct: f64) -> f64 {
    let total: f64 = sites.iter().map(|s| s.voxels as f64).sum();
    let live: Vec<&&IntensityStats> = sites.iter().filter(|s| s.voxels > 0).collect();
    if live.is_empty() || total <= 0.0 {
        return 0.0;
    }
    let percents = quantile_percents();
    let knots: Vec<Vec<(f64, f64)>> = live
        .iter()
        .map(|s| {
            let q = &s.quantiles;
            let mut k = Vec::with_capacity(q.len() + 2);
            k.push((q[0] - (q[1] - q[0]), 0.0));
            k.extend(q.iter().zip(&percents).map(|(x, p)| (*x, p / 100.0)));
            let last = q.len() - 1;
            k.push((q[last] + (q[last] - q[last - 1]), 1.0));
            k
        })
        .collect();
    let cdf = |x: f64| -> f64 {
        live.iter()
            .zip(&knots)
            .map(|(s, k)| s.voxels as f64 / total * interpolate_cdf(k, x))
            .sum()
    };
    let target = pct / 100.0;
    let (mut lo, mut hi) = knots
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), k| {
            (lo.min(k[0].0), hi.max(k[k.len() - 1].0))
        });
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

fn interpolate_cdf(knots: &[(f64, f64)], x: f64) -> f64 {
    if x <= knots[0].0 {
        return 0.0;
    }
    if x >= knots[knots.len() - 1].0 {
        return 1.0;
    }
    // Last knot at or below x; ties (repeated quantiles) take the highest probability.
    let i = knots.partition_point(|k| k.0 <= x) - 1;
    let (x0, p0) = knots[i];
    let (x1, p1) = knots[i + 1];
    if x1 <= x0 {
        p1
    } else {
        p0 + (p1 - p0) * (x - x0) / (x1 - x0)
    }
}

/// The `pct` percentile of `values` by linear interpolation between order statistics (numpy's
/// default). Sites compute their quantiles with it, the plan its spacing medians.
pub fn percentile(values: &[f64], pct: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, pct)
}

/// Count, mean, standard deviation and quantiles of `values` (a site's foreground sample).
pub fn intensity_stats(values: &[f64], voxels: u64, mean: f64, std: f64) -> IntensityStats {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let quantiles = quantile_percents()
        .iter()
        .map(|p| percentile_sorted(&sorted, *p))
        .collect();
    IntensityStats {
        voxels,
        mean,
        std,
        quantiles,
    }
}

fn percentile_sorted(v: &[f64], pct: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let pos = pct / 100.0 * (v.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    let j = (i + 1).min(v.len() - 1);
    v[i] + (v[j] - v[i]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn stats_of(values: &[f64]) -> IntensityStats {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        intensity_stats(values, values.len() as u64, mean, std)
    }

    fn fingerprint(
        dataset: &str,
        modality: &str,
        cases: Vec<CaseShape>,
        values: &[f64],
    ) -> Fingerprint {
        Fingerprint {
            consortium: "demo".into(),
            dataset: dataset.into(),
            node: Identity::from_seed(&[9; 32]).public_key(),
            modalities: vec![modality.into()],
            cases,
            foreground: vec![stats_of(values)],
        }
    }

    /// One 8-voxel cube at 1 mm with two foreground intensities.
    fn tiny(dataset: &str) -> Fingerprint {
        let cube = CaseShape {
            dims: [8; 3],
            spacing: [1.0; 3],
        };
        fingerprint(dataset, "CT", vec![cube], &[1.0, 2.0])
    }

    fn manifest() -> Manifest {
        let mut m =
            Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
        m.task.dataset = "ct".into();
        m
    }

    /// Pooled percentiles, mean and std from per-site summaries match the pooled data's own,
    /// for sites whose distributions differ in location, scale and size.
    #[test]
    fn pooled_statistics_match_the_pooled_data() {
        let mut rng = Rng::new(7);
        let sites: Vec<Vec<f64>> = [
            (40.0, 30.0, 20_000),
            (120.0, 60.0, 5_000),
            (-50.0, 10.0, 50_000),
        ]
        .iter()
        .map(|&(mu, sigma, n)| (0..n).map(|_| mu + sigma * rng.normal()).collect())
        .collect();
        let stats: Vec<IntensityStats> = sites.iter().map(|v| stats_of(v)).collect();
        let refs: Vec<&IntensityStats> = stats.iter().collect();
        let pooled = pool(&refs);
        let all: Vec<f64> = sites.concat();
        let exact = stats_of(&all);
        assert_eq!(pooled.voxels, all.len() as u64);
        assert!(
            (pooled.mean - exact.mean).abs() < 1e-9,
            "{} vs {}",
            pooled.mean,
            exact.mean
        );
        assert!(
            (pooled.std - exact.std).abs() < 1e-6,
            "{} vs {}",
            pooled.std,
            exact.std
        );
        for (pct, got) in [(0.5, pooled.p00_5), (99.5, pooled.p99_5)] {
            let want = percentile(&all, pct);
            // Within a few HU: the spacing of one site's neighbouring quantiles in the tails.
            assert!(
                (got - want).abs() < 3.0,
                "{pct}th percentile: {got} vs {want}"
            );
        }
        for pct in [5.0, 25.0, 50.0, 75.0, 95.0] {
            let (got, want) = (pooled_percentile(&refs, pct), percentile(&all, pct));
            assert!(
                (got - want).abs() < 1.0,
                "{pct}th percentile: {got} vs {want}"
            );
        }
    }

    #[test]
    fn ct_sites_get_a_fixed_clip_and_median_spacing() {
        let shape = |dims: [u32; 3], spacing: [f64; 3]| CaseShape { dims, spacing };
        let a = fingerprint(
            "ct",
            "CT",
            vec![
                shape([100, 100, 50], [0.8, 0.8, 2.0]),
                shape([120, 120, 40], [0.7, 0.7, 2.5]),
            ],
            &(0..1000).map(|i| f64::from(i) - 200.0).collect::<Vec<_>>(),
        );
        let mut b = fingerprint(
            "ct",
            "ct",
            vec![shape([80, 80, 60], [1.0, 1.0, 2.0])],
            &(0..3000).map(|i| f64::from(i % 500)).collect::<Vec<_>>(),
        );
        b.node = Identity::from_seed(&[8; 32]).public_key();
        let m = manifest();
        let p = plan(&m, &[&a, &b]).unwrap();
        assert_eq!(p.sites, 2);
        assert_eq!(p.cases, 3);
        assert_eq!(p.median_spacing, [0.8, 0.8, 2.0]);
        assert_eq!(p.target_spacing, [0.8, 0.8, 2.0]);
        // Axial extents at 0.8 mm: 100, 105 and 100 voxels; the median, 100, divides by 4.
        assert_eq!(p.input_size, [100, 100]);
        let (clip, mean, std) = p.intensity.ct().expect("CT scheme");
        let all: Vec<f64> = (0..1000)
            .map(|i| f64::from(i) - 200.0)
            .chain((0..3000).map(|i| f64::from(i % 500)))
            .collect();
        assert!((clip[0] - percentile(&all, 0.5)).abs() < 2.0, "{clip:?}");
        assert!((clip[1] - percentile(&all, 99.5)).abs() < 2.0, "{clip:?}");
        let exact = stats_of(&all);
        assert!(
            (mean - exact.mean).abs() <= 5e-4 && (std - exact.std).abs() <= 5e-4,
            "rounded to 0.001"
        );
        let mut applied = m.clone();
        p.apply(&mut applied);
        applied.validate().unwrap();

        // One MRI site: z-score.
        b.modalities = vec!["MRI".into()];
        let p = plan(&m, &[&a, &b]).unwrap();
        assert_eq!(p.intensity, Intensity::default());
        assert!(
            p.reasons
                .iter()
                .any(|r| r.contains("only 1 of 2 sites say CT")),
            "{:?}",
            p.reasons
        );
    }

    #[test]
    fn anisotropic_data_takes_the_tenth_percentile_on_its_coarse_axis() {
        let cases: Vec<CaseShape> = (0..10)
            .map(|i| CaseShape {
                dims: [256, 256, 30],
                spacing: [0.5, 0.5, 4.0 + f64::from(i)],
            })
            .collect();
        let f = fingerprint("ct", "MRI", cases, &[1.0, 2.0, 3.0]);
        let p = plan(&manifest(), &[&f]).unwrap();
        assert_eq!(p.median_spacing[2], 8.5);
        assert!(
            (p.target_spacing[2] - 4.9).abs() < 1e-9,
            "{:?}",
            p.target_spacing
        );
        // 256 voxels of 0.5 mm at 0.5 mm: capped at 256.
        assert_eq!(p.input_size, [256, 256]);
        assert!(p.reasons[0].contains("anisotropic"), "{:?}", p.reasons);
        assert_eq!(p.input_depth, None, "a 2D model has no patch depth");

        // A 3D model: the median z extent, 30 slices of 8 and 9 mm at 4.9 mm (49.0 and 55.1
        // voxels, median 52.0), is already a multiple of 4 (depth 3).
        let mut m3 = manifest();
        m3.model.dims = 3;
        let p = plan(&m3, &[&f]).unwrap();
        assert_eq!(p.input_depth, Some(52));
        p.apply(&mut m3);
        m3.validate().unwrap();
    }

    #[test]
    fn plans_refuse_fingerprints_that_do_not_fit() {
        let err = plan(&manifest(), &[&tiny("other")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dataset \"other\""), "{err}");
        let f = tiny("ct");
        let err = plan(&manifest(), &[&f, &f]).unwrap_err().to_string();
        assert!(err.contains("given twice"), "{err}");
        assert_eq!(plan(&manifest(), &[]), Err(PlanError::Empty));
    }

    #[test]
    fn only_active_nodes_sign_fingerprints_and_tampering_shows() {
        let (node, researcher, roster) = crate::test_support::node_and_researcher();
        let f = tiny("ct");
        let signed = SignedFingerprint::sign(f.clone(), &node);
        assert_eq!(signed.verify(&roster).unwrap().node, node.public_key());

        let mut tampered = signed.clone();
        tampered.fingerprint.cases[0].spacing[2] = 3.0;
        assert!(matches!(
            tampered.verify(&roster),
            Err(FingerprintError::Signature(_))
        ));
        let by_researcher = SignedFingerprint::sign(f.clone(), &researcher);
        assert!(matches!(
            by_researcher.verify(&roster),
            Err(FingerprintError::Membership(_))
        ));

        // Records a node signed but that no plan may use, each refused by the field at fault.
        let refusal = |change: &dyn Fn(&mut Fingerprint)| {
            let mut bad = f.clone();
            change(&mut bad);
            let signed = SignedFingerprint::sign(bad, &node);
            signed.verify(&roster).unwrap_err().to_string()
        };
        let err = refusal(&|f| f.foreground[0].mean = f64::NAN);
        assert!(err.contains("foreground"), "{err}");
        let err = refusal(&|f| f.foreground[0].quantiles.swap(0, QUANTILES - 1));
        assert!(
            err.contains("foreground") && err.contains("ascending"),
            "{err}"
        );
        let err = refusal(&|f| f.cases = vec![f.cases[0]; MAX_CASES + 1]);
        assert!(err.contains("cases"), "{err}");
        let err = refusal(&|f| f.consortium = "other".into());
        assert!(err.contains("consortium"), "{err}");
    }
}
