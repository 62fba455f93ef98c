//! A site's dataset fingerprint ([`medmesh_protocol::fingerprint`]): computed here from the
//! cases as loaded (in RAS, at their own spacing, intensities as stored), so it describes what
//! the site has, before any experiment's resampling or normalization.

use medmesh_crypto::PublicKey;
use medmesh_protocol::fingerprint::{CaseShape, Fingerprint, IntensityStats, intensity_stats};

use super::Case;

/// Foreground voxels per case and channel that go into the quantiles (nnU-Net samples 10,000
/// too); counts, means and standard deviations use every foreground voxel.
pub const SAMPLES_PER_CASE: usize = 10_000;

/// The fingerprint of `cases` for `dataset` in `consortium`, by `node`, channels named by
/// `modalities` (padded with "" where fewer).
pub fn fingerprint(
    cases: &[Case],
    modalities: &[String],
    consortium: &str,
    dataset: &str,
    node: PublicKey,
) -> Fingerprint {
    let channels = cases.first().map_or(1, |c| c.image.channels);
    let shapes = cases
        .iter()
        .map(|c| CaseShape {
            dims: c.image.dims.map(|d| u32::try_from(d).unwrap_or(u32::MAX)),
            spacing: c.image.spacing,
        })
        .collect();
    let foreground = (0..channels).map(|ch| channel_stats(cases, ch)).collect();
    Fingerprint {
        consortium: consortium.to_owned(),
        dataset: dataset.to_owned(),
        node,
        modalities: (0..channels)
            .map(|ch| modalities.get(ch).cloned().unwrap_or_default())
            .collect(),
        cases: shapes,
        foreground,
    }
}

fn channel_stats(cases: &[Case], channel: usize) -> IntensityStats {
    let (mut count, mut sum, mut sum_sq) = (0u64, 0.0f64, 0.0f64);
    let mut sample = Vec::new();
    for case in cases {
        let n = case.image.voxels();
        let plane = &case.image.data[channel * n..(channel + 1) * n];
        let inside: Vec<f64> = plane
            .iter()
            .zip(&case.label.data)
            .filter(|(_, l)| **l > 0)
            .map(|(v, _)| f64::from(*v))
            .collect();
        count += inside.len() as u64;
        sum += inside.iter().sum::<f64>();
        sum_sq += inside.iter().map(|v| v * v).sum::<f64>();
        // Evenly spaced, so the sample is deterministic and covers the whole case.
        let step = inside.len().div_ceil(SAMPLES_PER_CASE).max(1);
        sample.extend(inside.iter().step_by(step));
    }
    let n = count.max(1) as f64;
    let mean = sum / n;
    let std = (sum_sq / n - mean * mean).max(0.0).sqrt();
    intensity_stats(&sample, count, mean, std)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{LabelVolume, Volume};

    /// Only foreground voxels count, and every one of them for the mean and deviation.
    #[test]
    fn statistics_cover_the_foreground_only() {
        let dims = [4, 4, 2];
        let data: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let label: Vec<u8> = (0..32).map(|i| u8::from(i >= 16)).collect();
        let case = Case {
            name: "c".into(),
            image: Volume {
                dims,
                spacing: [0.5, 0.5, 3.0],
                channels: 1,
                data,
            },
            label: LabelVolume { dims, data: label },
        };
        let node = medmesh_crypto::Identity::from_seed(&[1; 32]).public_key();
        let f = fingerprint(&[case], &["CT".into()], "demo", "ct", node);
        assert_eq!(
            f.cases,
            vec![CaseShape {
                dims: [4, 4, 2],
                spacing: [0.5, 0.5, 3.0]
            }]
        );
        assert_eq!(f.modalities, vec!["CT".to_owned()]);
        let s = &f.foreground[0];
        assert_eq!(s.voxels, 16);
        assert!((s.mean - 23.5).abs() < 1e-12);
        assert!((s.std - (255.0f64 / 12.0).sqrt()).abs() < 1e-9, "{}", s.std);
        assert_eq!(s.quantiles[0], 16.0 + 0.005 * 15.0);
        assert_eq!(s.quantiles[100], 31.0 - 0.005 * 15.0);
        assert!(f.check().is_ok());
    }
}
