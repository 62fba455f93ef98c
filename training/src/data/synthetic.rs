//! Synthetic multi-site segmentation data, non-IID on purpose.
//!
//! Each case is a small 3D volume: an organ-like ellipsoid with texture and bright spherical
//! lesions (class 1). Each *site* has its own scanner (intensity curve, bias field, noise type
//! and level, blur), its own lesion statistics (count, size, prevalence), its own annotator
//! (masks dilated or eroded by a pixel) and its own number of cases. A site generates its own
//! data from `(seed, site)`; nothing crosses the network.

use std::fmt;
use std::str::FromStr;

use super::Case;
use crate::rng::Rng;

/// How different the sites are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// All sites drawn from one distribution.
    Iid,
    /// Different scanners (intensity curve, bias field, noise, blur), same lesions.
    FeatureShift,
    /// Same scanner, different lesion size, count and prevalence.
    LabelSkew,
    /// Everything at once, plus uneven site sizes and annotator bias.
    Realistic,
    /// Few cases per site, each site with its own scanner and its own lesion size and
    /// contrast: too little for any one site to learn the task alone, enough together. The
    /// demo's default.
    Skewed,
}

impl Preset {
    /// All presets, for help texts and scenarios.
    pub const ALL: [Preset; 5] = [
        Preset::Iid,
        Preset::FeatureShift,
        Preset::LabelSkew,
        Preset::Realistic,
        Preset::Skewed,
    ];

    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Iid => "iid",
            Preset::FeatureShift => "feature-shift",
            Preset::LabelSkew => "label-skew",
            Preset::Realistic => "realistic",
            Preset::Skewed => "skewed",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown preset {s:?}; choose one of {}",
                    Preset::ALL.map(Preset::name).join(", ")
                )
            })
    }
}

/// Noise models of MR-like scanners.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Noise {
    /// Additive Gaussian.
    Gaussian,
    /// Rician (magnitude of complex Gaussian), as in magnitude MR images.
    Rician,
}

/// One scanner's imaging chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Scanner {
    /// Multiplicative gain.
    pub gain: f64,
    /// Intensity curve exponent.
    pub gamma: f64,
    /// Amplitude of the smooth multiplicative bias field.
    pub bias: f64,
    /// Noise model.
    pub noise: Noise,
    /// Noise standard deviation (relative to tissue intensity ~0.5).
    pub noise_level: f64,
    /// Box blur radius in pixels.
    pub blur: usize,
}

/// What a site's cases look like.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteProfile {
    /// The scanner.
    pub scanner: Scanner,
    /// Mean number of lesions per case with lesions.
    pub lesions_mean: f64,
    /// Lesion radius range, as a fraction of the image side.
    pub lesion_radius: (f64, f64),
    /// Fraction of cases with at least one lesion.
    pub prevalence: f64,
    /// Annotator bias: +1 dilates masks by a pixel, -1 erodes, 0 is exact.
    pub annotator: i32,
    /// Lesion intensity range (organ tissue is ~0.45).
    pub lesion_contrast: (f64, f64),
    /// How often a case's lesions are bright, dark (hypo-intense) or ring-enhancing.
    pub lesion_kinds: [f64; 3],
    /// Number of cases.
    pub cases: usize,
}

/// The profile of site `site` (0-based) under `preset`.
pub fn site_profile(preset: Preset, site: usize, base_cases: usize, seed: u64) -> SiteProfile {
    let mut rng = Rng::derive(seed, 0x517E_0000 + site as u64);
    let reference = SiteProfile {
        scanner: Scanner {
            gain: 1.0,
            gamma: 1.0,
            bias: 0.1,
            noise: Noise::Gaussian,
            noise_level: 0.05,
            blur: 0,
        },
        lesions_mean: 2.0,
        lesion_radius: (0.06, 0.12),
        prevalence: 0.9,
        annotator: 0,
        lesion_contrast: (0.80, 1.0),
        lesion_kinds: [1.0, 0.0, 0.0],
        cases: base_cases,
    };
    let shifted_scanner = |rng: &mut Rng| Scanner {
        gain: rng.range(0.6, 1.6),
        gamma: rng.range(0.7, 1.4),
        bias: rng.range(0.05, 0.35),
        noise: if rng.uniform() < 0.5 {
            Noise::Gaussian
        } else {
            Noise::Rician
        },
        noise_level: rng.range(0.02, 0.09),
        blur: rng.below(3),
    };
    let skewed_lesions = |rng: &mut Rng, p: &mut SiteProfile| {
        p.lesions_mean = rng.range(1.0, 4.0);
        let small = rng.range(0.04, 0.08);
        p.lesion_radius = (small, small + rng.range(0.03, 0.08));
        p.prevalence = rng.range(0.6, 1.0);
    };
    let mut profile = reference.clone();
    match preset {
        Preset::Iid => {}
        Preset::FeatureShift => profile.scanner = shifted_scanner(&mut rng),
        Preset::LabelSkew => skewed_lesions(&mut rng, &mut profile),
        Preset::Realistic => {
            profile.scanner = shifted_scanner(&mut rng);
            skewed_lesions(&mut rng, &mut profile);
            profile.annotator = [0, 0, 1, -1][rng.below(4)];
            let scale = [1.0, 0.5, 1.5, 0.75, 1.25, 0.4][site % 6] * rng.range(0.9, 1.1);
            profile.cases = ((base_cases as f64 * scale).round() as usize).max(4);
        }
        Preset::Skewed => {
            profile.scanner = shifted_scanner(&mut rng);
            profile.scanner.noise_level = profile.scanner.noise_level.min(0.05);
            // Every site sees every kind of lesion, one kind more often than the others (its
            // referral pattern), and lesions of its own sizes. With a few cases a site has
            // seen one or two kinds; the consortium has seen them all.
            let mut kinds = [0.25, 0.25, 0.25];
            kinds[site % 3] = 0.5;
            profile.lesion_kinds = kinds;
            profile.lesion_radius =
                [(0.10, 0.14), (0.11, 0.15), (0.09, 0.13), (0.10, 0.15)][site % 4];
            profile.lesions_mean = [2.0, 1.0, 2.0, 1.0][site % 4];
            profile.prevalence = 1.0;
        }
    }
    profile
}

/// Generates site `site`'s cases: volumes of `size x size x slices`.
pub fn generate_site(
    profile: &SiteProfile,
    size: usize,
    slices: usize,
    seed: u64,
    site: usize,
) -> Vec<Case> {
    (0..profile.cases)
        .map(|i| {
            let mut rng = Rng::derive(seed, ((site as u64) << 32) | i as u64);
            generate_case(
                &format!("site{}_case{:03}", site + 1, i),
                profile,
                size,
                slices,
                &mut rng,
            )
        })
        .collect()
}

struct Lesion {
    center: [f64; 3],
    radius: f64,
    brightness: f64,
    kind: LesionKind,
}

/// How a lesion looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LesionKind {
    /// Brighter than the tissue around it.
    Bright,
    /// Darker than the tissue around it.
    Dark,
    /// A bright rim around a dark core.
    Ring,
}

fn generate_case(name: &str, p: &SiteProfile, size: usize, slices: usize, rng: &mut Rng) -> Case {
    let n = size as f64;
    // Organ: an ellipsoid filling most of the field of view.
    let organ_center = [n * rng.range(0.45, 0.55), n * rng.range(0.45, 0.55)];
    let organ_radii = [n * rng.range(0.32, 0.44), n * rng.range(0.30, 0.42)];
    let organ_level = rng.range(0.40, 0.50);
    let texture_phase: Vec<f64> = (0..4)
        .map(|_| rng.range(0.0, std::f64::consts::TAU))
        .collect();

    let mut lesions = Vec::new();
    // Presets with bright lesions only draw nothing here, so their data stays as it was.
    let kind = if p.lesion_kinds == [1.0, 0.0, 0.0] {
        LesionKind::Bright
    } else {
        let u = rng.uniform() * p.lesion_kinds.iter().sum::<f64>();
        if u < p.lesion_kinds[0] {
            LesionKind::Bright
        } else if u < p.lesion_kinds[0] + p.lesion_kinds[1] {
            LesionKind::Dark
        } else {
            LesionKind::Ring
        }
    };
    if rng.uniform() < p.prevalence {
        let count = 1 + (rng.uniform() * 2.0 * (p.lesions_mean - 1.0).max(0.0)).round() as usize;
        for _ in 0..count {
            let angle = rng.range(0.0, std::f64::consts::TAU);
            let dist = rng.range(0.0, 0.6);
            lesions.push(Lesion {
                center: [
                    organ_center[0] + angle.cos() * dist * organ_radii[0],
                    organ_center[1] + angle.sin() * dist * organ_radii[1],
                    rng.range(0.2, 0.8) * slices as f64,
                ],
                radius: n * rng.range(p.lesion_radius.0, p.lesion_radius.1),
                brightness: rng.range(p.lesion_contrast.0, p.lesion_contrast.1),
                kind,
            });
        }
    }

    let plane = size * size;
    let mut stacked = Vec::with_capacity(slices);
    for z in 0..slices {
        let mut img = vec![0f64; plane];
        let mut lab = vec![0u8; plane];
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
                let dx = (fx - organ_center[0]) / organ_radii[0];
                let dy = (fy - organ_center[1]) / organ_radii[1];
                let i = y * size + x;
                if dx * dx + dy * dy <= 1.0 {
                    let texture = 0.04
                        * ((fx * 0.31 + texture_phase[0]).sin()
                            * (fy * 0.27 + texture_phase[1]).cos()
                            + (fx * 0.11 + fy * 0.07 + texture_phase[2] + z as f64 * 0.3).sin());
                    img[i] = organ_level + texture;
                }
                for l in &lesions {
                    // Slices are thicker than pixels are wide: scale z distance.
                    let dz = (z as f64 + 0.5 - l.center[2]) * n / (slices as f64 * 2.5);
                    let d2 = (fx - l.center[0]).powi(2) + (fy - l.center[1]).powi(2) + dz * dz;
                    if d2 <= l.radius * l.radius {
                        let core = d2 <= (0.55 * l.radius).powi(2);
                        img[i] = match l.kind {
                            LesionKind::Bright => l.brightness,
                            LesionKind::Dark => organ_level * (1.1 - l.brightness),
                            LesionKind::Ring if core => organ_level * (1.1 - l.brightness),
                            LesionKind::Ring => l.brightness,
                        };
                        lab[i] = 1;
                    }
                }
            }
        }
        apply_scanner(&mut img, size, size, &p.scanner, rng);
        let lab = annotate(&lab, size, size, p.annotator);
        stacked.push((img, lab));
    }
    Case::from_slices(name, size, stacked)
}

/// Applies a scanner's imaging chain to one `rows x cols` image with intensities in ~[0, 1].
pub fn apply_scanner(img: &mut [f64], rows: usize, cols: usize, s: &Scanner, rng: &mut Rng) {
    let bias_phase = (rng.range(0.0, 6.3), rng.range(0.0, 6.3));
    for (i, v) in img.iter_mut().enumerate() {
        let (y, x) = (
            (i / cols) as f64 / rows as f64,
            (i % cols) as f64 / cols as f64,
        );
        let bias = 1.0 + s.bias * ((x * 2.1 + bias_phase.0).sin() * (y * 1.7 + bias_phase.1).cos());
        *v = s.gain * v.max(0.0).powf(s.gamma) * bias;
    }
    if s.blur > 0 {
        box_blur(img, rows, cols, s.blur);
    }
    let sigma = s.noise_level * s.gain;
    for v in img.iter_mut() {
        *v = match s.noise {
            Noise::Gaussian => *v + sigma * rng.normal(),
            Noise::Rician => {
                ((*v + sigma * rng.normal()).powi(2) + (sigma * rng.normal()).powi(2)).sqrt()
            }
        };
    }
}

fn box_blur(img: &mut [f64], rows: usize, cols: usize, radius: usize) {
    let src = img.to_vec();
    for r in 0..rows {
        for c in 0..cols {
            let (r0, r1) = (r.saturating_sub(radius), (r + radius).min(rows - 1));
            let (c0, c1) = (c.saturating_sub(radius), (c + radius).min(cols - 1));
            let mut sum = 0.0;
            for rr in r0..=r1 {
                sum += src[rr * cols + c0..=rr * cols + c1].iter().sum::<f64>();
            }
            img[r * cols + c] = sum / ((r1 - r0 + 1) * (c1 - c0 + 1)) as f64;
        }
    }
}

/// Dilates (`bias > 0`) or erodes (`bias < 0`) the foreground by one pixel (4-neighbourhood).
pub fn annotate(label: &[u8], rows: usize, cols: usize, bias: i32) -> Vec<u8> {
    if bias == 0 {
        return label.to_vec();
    }
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let neighbours = [
                (r > 0).then(|| label[i - cols]),
                (r + 1 < rows).then(|| label[i + cols]),
                (c > 0).then(|| label[i - 1]),
                (c + 1 < cols).then(|| label[i + 1]),
            ];
            let n = neighbours.iter().flatten();
            if bias > 0 && label[i] == 0 {
                n.copied().find(|&l| l != 0).unwrap_or(0)
            } else if bias < 0 && label[i] != 0 && neighbours.contains(&Some(0)) {
                0
            } else {
                label[i]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_are_deterministic_and_different() {
        let a = generate_site(&site_profile(Preset::Realistic, 0, 6, 1), 32, 4, 1, 0);
        let again = generate_site(&site_profile(Preset::Realistic, 0, 6, 1), 32, 4, 1, 0);
        assert_eq!(a, again);
        let b = generate_site(&site_profile(Preset::Realistic, 1, 6, 1), 32, 4, 1, 1);
        assert_ne!(a[0].image.data, b[0].image.data);
        assert_ne!(a.len(), b.len(), "realistic sites have uneven sizes");
        let foreground: usize = a
            .iter()
            .map(|c| c.label.data.iter().filter(|&&l| l == 1).count())
            .sum();
        assert!(foreground > 0);
    }

    #[test]
    fn presets_change_what_they_say() {
        let iid: Vec<_> = (0..3)
            .map(|s| site_profile(Preset::Iid, s, 10, 7))
            .collect();
        assert!(iid.windows(2).all(|w| w[0] == w[1]));
        let fs: Vec<_> = (0..3)
            .map(|s| site_profile(Preset::FeatureShift, s, 10, 7))
            .collect();
        assert!(fs[0].scanner != fs[1].scanner && fs[0].lesion_radius == fs[1].lesion_radius);
        let ls: Vec<_> = (0..3)
            .map(|s| site_profile(Preset::LabelSkew, s, 10, 7))
            .collect();
        assert!(ls[0].scanner == ls[1].scanner && ls[0].lesion_radius != ls[1].lesion_radius);
        assert_eq!("feature-shift".parse::<Preset>(), Ok(Preset::FeatureShift));
        assert!("nope".parse::<Preset>().is_err());
    }

    #[test]
    fn annotator_bias_grows_or_shrinks_masks() {
        let mut label = vec![0u8; 25];
        for i in [6, 7, 8, 11, 12, 13, 16, 17, 18] {
            label[i] = 1;
        }
        let count = |l: &[u8]| l.iter().filter(|&&v| v == 1).count();
        assert!(count(&annotate(&label, 5, 5, 1)) > 9);
        assert_eq!(count(&annotate(&label, 5, 5, -1)), 1);
        assert_eq!(annotate(&label, 5, 5, 0), label);
    }
}
