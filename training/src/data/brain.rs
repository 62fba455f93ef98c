//! A semi-real brain-extraction task from the MNI "ch2" template of the Debian package
//! `mricron-data`: `ch2.nii.gz` is a T1 head with skull, `ch2bet.nii.gz` the same brain
//! skull-stripped, so `ch2bet > 0` is an aligned brain mask. Each case takes axial slices of
//! the head under a random affine and elastic deformation; each site adds its own scanner.

use std::path::{Path, PathBuf};

use super::msd::read_nifti;
use super::synthetic::{Scanner, apply_scanner};
use super::{Case, DataError};
use crate::rng::Rng;

/// Where Debian installs the templates.
pub const TEMPLATE_DIR: &str = "/usr/share/mricron/templates";

/// The head and its brain mask, as loaded once.
#[derive(Debug, Clone)]
pub struct BrainTemplate {
    dims: [usize; 3],
    head: Vec<f32>,
    mask: Vec<bool>,
}

impl BrainTemplate {
    /// Loads `ch2.nii.gz` and `ch2bet.nii.gz` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let head_path = dir.join("ch2.nii.gz");
        let bet_path = dir.join("ch2bet.nii.gz");
        for p in [&head_path, &bet_path] {
            if !p.exists() {
                return Err(DataError::TemplateMissing { path: p.clone() });
            }
        }
        let (shape, head) = read_nifti(&head_path)?;
        let (bet_shape, bet) = read_nifti(&bet_path)?;
        if shape != bet_shape || shape.len() != 3 {
            return Err(DataError::ShapeMismatch {
                image: head_path,
                label: bet_path,
                image_shape: shape,
                label_shape: bet_shape,
            });
        }
        let max = head.iter().copied().fold(0f32, f32::max).max(1.0);
        Ok(Self {
            dims: [shape[0], shape[1], shape[2]],
            head: head.iter().map(|v| v / max).collect(),
            mask: bet.iter().map(|v| *v > 0.0).collect(),
        })
    }

    /// Loads from [`TEMPLATE_DIR`].
    pub fn load_default() -> Result<Self, DataError> {
        Self::load(&PathBuf::from(TEMPLATE_DIR))
    }

    fn sample(&self, x: f64, y: f64, z: usize) -> (f64, bool) {
        let [nx, ny, _] = self.dims;
        if x < 0.0 || y < 0.0 || x > (nx - 1) as f64 || y > (ny - 1) as f64 {
            return (0.0, false);
        }
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(nx - 1), (y0 + 1).min(ny - 1));
        let (fx, fy) = (x - x0 as f64, y - y0 as f64);
        let at = |xx: usize, yy: usize| xx + nx * (yy + ny * z);
        let v = |xx, yy| f64::from(self.head[at(xx, yy)]);
        let value = (v(x0, y0) * (1.0 - fx) + v(x1, y0) * fx) * (1.0 - fy)
            + (v(x0, y1) * (1.0 - fx) + v(x1, y1) * fx) * fy;
        let nearest = at(x.round() as usize, y.round() as usize);
        (value, self.mask[nearest])
    }
}

/// How heads lie in a site's field of view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    /// In-plane tilt in radians: its size is drawn in `[min, max]`, its sign at random.
    pub tilt: (f64, f64),
    /// Head size in the field of view (1: as the template), drawn in this range.
    pub scale: (f64, f64),
}

impl Pose {
    /// The training sites': up to 0.2 rad (11°) of tilt, 0.9 to 1.1 of the template's size.
    pub const USUAL: Pose = Pose {
        tilt: (0.0, 0.2),
        scale: (0.9, 1.1),
    };
    /// A site whose heads lie as no training site's do: tilted 0.35 to 0.6 rad (20-34°) and
    /// smaller in a wider field of view (0.72 to 0.82).
    pub const UNSEEN: Pose = Pose {
        tilt: (0.35, 0.6),
        scale: (0.72, 0.82),
    };
}

/// The scanner of the unseen-site check, outside the training presets' ranges in three ways
/// at once: gamma 1.9 (training sites: 0.7-1.4), bias field 0.45 (0.05-0.35) and Rician noise
/// 0.1 (0.02-0.09); with their strongest blur (a 5-pixel box) and half the gain.
pub const UNSEEN_SCANNER: Scanner = Scanner {
    gain: 0.5,
    gamma: 1.9,
    bias: 0.45,
    noise: super::synthetic::Noise::Rician,
    noise_level: 0.1,
    blur: 2,
};

/// A site unlike any training site, for the unseen-site check: heads in [`Pose::UNSEEN`]
/// under [`UNSEEN_SCANNER`].
pub fn generate_unseen_site(
    template: &BrainTemplate,
    cases: usize,
    size: usize,
    slices: usize,
    seed: u64,
) -> Vec<Case> {
    generate_posed_site(
        template,
        &UNSEEN_SCANNER,
        Pose::UNSEEN,
        cases,
        size,
        slices,
        seed,
        99,
    )
}

/// Generates `cases` brain-extraction cases of `size x size x slices` for one site.
pub fn generate_site(
    template: &BrainTemplate,
    scanner: &Scanner,
    cases: usize,
    size: usize,
    slices: usize,
    seed: u64,
    site: usize,
) -> Vec<Case> {
    generate_posed_site(
        template,
        scanner,
        Pose::USUAL,
        cases,
        size,
        slices,
        seed,
        site,
    )
}

/// [`generate_site`] with heads in `pose`.
#[allow(clippy::too_many_arguments)]
pub fn generate_posed_site(
    template: &BrainTemplate,
    scanner: &Scanner,
    pose: Pose,
    cases: usize,
    size: usize,
    slices: usize,
    seed: u64,
    site: usize,
) -> Vec<Case> {
    (0..cases)
        .map(|i| {
            let mut rng = Rng::derive(seed, 0xB8A1_0000_0000 | ((site as u64) << 16) | i as u64);
            generate_case(
                template,
                scanner,
                pose,
                &format!("site{}_brain{:03}", site + 1, i),
                size,
                slices,
                &mut rng,
            )
        })
        .collect()
}

fn generate_case(
    t: &BrainTemplate,
    scanner: &Scanner,
    pose: Pose,
    name: &str,
    size: usize,
    slices: usize,
    rng: &mut Rng,
) -> Case {
    let [nx, ny, nz] = t.dims;
    // Axial slices through the middle of the brain, where most of it is.
    let z_lo = (nz as f64 * 0.30) as usize;
    let z_hi = (nz as f64 * 0.72) as usize;
    // A symmetric range is one draw, so the usual pose makes the same cases it always did.
    let angle = if pose.tilt.0 == 0.0 {
        rng.range(-pose.tilt.1, pose.tilt.1)
    } else {
        let tilt = rng.range(pose.tilt.0, pose.tilt.1);
        if rng.uniform() < 0.5 { -tilt } else { tilt }
    };
    let scale = rng.range(pose.scale.0, pose.scale.1);
    let shift = (rng.range(-8.0, 8.0), rng.range(-8.0, 8.0));
    let waves: Vec<(f64, f64, f64, f64)> = (0..3)
        .map(|_| {
            (
                rng.range(0.5, 2.0),
                rng.range(0.5, 2.0),
                rng.range(0.0, 6.3),
                rng.range(1.5, 4.0),
            )
        })
        .collect();
    let half_span = 0.5 * nx.max(ny) as f64 * 1.05;
    let (cx, cy) = (nx as f64 / 2.0, ny as f64 / 2.0);
    let plane = size * size;
    let mut stacked = Vec::with_capacity(slices);
    for s in 0..slices {
        let z = z_lo + (z_hi - z_lo) * s / slices.max(1) + rng.below(3);
        let mut img = vec![0f64; plane];
        let mut lab = vec![0u8; plane];
        for r in 0..size {
            for c in 0..size {
                let u = (c as f64 + 0.5) / size as f64 * 2.0 - 1.0;
                let v = (r as f64 + 0.5) / size as f64 * 2.0 - 1.0;
                // Elastic part: a smooth displacement field (pixels of the template).
                let (mut dx, mut dy) = (0.0, 0.0);
                for (a, b, phase, amp) in &waves {
                    dx += amp * (a * u * 3.0 + b * v * 2.0 + phase).sin();
                    dy += amp * (b * u * 2.0 - a * v * 3.0 + phase).cos();
                }
                let (ru, rv) = (
                    angle.cos() * u - angle.sin() * v,
                    angle.sin() * u + angle.cos() * v,
                );
                let x = cx + ru * half_span / scale + shift.0 + dx;
                let y = cy + rv * half_span / scale + shift.1 + dy;
                let (value, inside) = t.sample(x, y, z.min(nz - 1));
                img[r * size + c] = value;
                lab[r * size + c] = u8::from(inside);
            }
        }
        apply_scanner(&mut img, size, size, scanner, rng);
        stacked.push((img, lab));
    }
    Case::from_slices(name, size, stacked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::Noise;

    #[test]
    fn missing_templates_say_which_package() {
        let err = BrainTemplate::load(Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("mricron-data"), "{err}");
    }

    /// Runs where `mricron-data` is installed (CI installs it).
    #[test]
    fn cases_have_brain_and_background() {
        let t = BrainTemplate::load_default().expect("mricron-data is installed by .ci/run");
        let scanner = Scanner {
            gain: 1.0,
            gamma: 1.0,
            bias: 0.1,
            noise: Noise::Gaussian,
            noise_level: 0.03,
            blur: 0,
        };
        let cases = generate_site(&t, &scanner, 2, 32, 3, 5, 0);
        for case in &cases {
            let brain = case.label.data.iter().filter(|&&l| l == 1).count() as f64
                / case.label.data.len() as f64;
            assert!((0.15..0.8).contains(&brain), "brain fraction {brain}");
        }
        assert_ne!(cases[0].image.data, cases[1].image.data);
        assert_eq!(generate_site(&t, &scanner, 2, 32, 3, 5, 0), cases);
    }
}
