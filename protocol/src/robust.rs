//! Byzantine-robust aggregation and the checks a received update must pass before it is
//! averaged: finiteness, layout, and a norm bound.

use crate::averaging::AveragingError;
use crate::layout::ParamLayout;

/// Why a received (decoded) update may not be averaged.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UpdateRejection {
    /// Wrong number of values for the layout.
    #[error("update has {got} values, the layout has {expected}")]
    LayoutMismatch {
        /// Layout's count.
        expected: u64,
        /// Update's count.
        got: u64,
    },
    /// A NaN or infinite value.
    #[error("update value {index} (in tensor {tensor}) is {value}")]
    NonFinite {
        /// Flat index.
        index: usize,
        /// Tensor that holds it.
        tensor: String,
        /// The value.
        value: f32,
    },
    /// Too far from the local model.
    #[error("update is {distance:.3e} away from the local model, the bound is {bound:.3e}")]
    NormExceeded {
        /// L2 distance measured.
        distance: f64,
        /// The manifest's bound.
        bound: f64,
    },
}

/// Checks a decoded update: one value per layout parameter, all finite, and (if `bound` is
/// set) within L2 distance `bound` of `reference` (the local model).
pub fn check_update(
    values: &[f32],
    layout: &ParamLayout,
    reference: &[f32],
    bound: Option<f64>,
) -> Result<(), UpdateRejection> {
    let expected = layout.num_params();
    if values.len() as u64 != expected || reference.len() as u64 != expected {
        return Err(UpdateRejection::LayoutMismatch {
            expected,
            got: values.len() as u64,
        });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        let tensor = layout
            .offsets()
            .take_while(|(offset, _)| *offset <= index as u64)
            .last()
            .map(|(_, t)| t.name.clone())
            .unwrap_or_default();
        return Err(UpdateRejection::NonFinite {
            index,
            tensor,
            value: values[index],
        });
    }
    if let Some(bound) = bound {
        let distance = l2_distance(values, reference);
        if distance > bound {
            return Err(UpdateRejection::NormExceeded { distance, bound });
        }
    }
    Ok(())
}

/// L2 norm, accumulated in f64.
pub fn l2_norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

/// L2 distance between two vectors of equal length, accumulated in f64.
pub fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// Scales `x` down so its L2 norm is at most `max_norm`. Returns the factor applied (1 if none).
pub fn clip_norm(x: &mut [f32], max_norm: f64) -> f64 {
    let norm = l2_norm(x);
    if norm <= max_norm || norm == 0.0 {
        return 1.0;
    }
    let factor = max_norm / norm;
    let f = factor as f32;
    for v in x.iter_mut() {
        *v *= f;
    }
    factor
}

/// Pulls `x` towards `reference` so that `||x - reference|| <= max_norm` (clipping the
/// update, not the model). Returns the factor applied to the difference.
pub fn clip_towards(x: &mut [f32], reference: &[f32], max_norm: f64) -> f64 {
    let distance = l2_distance(x, reference);
    if distance <= max_norm || distance == 0.0 {
        return 1.0;
    }
    let factor = max_norm / distance;
    let f = factor as f32;
    for (v, r) in x.iter_mut().zip(reference) {
        *v = r + (*v - r) * f;
    }
    factor
}

fn check_inputs(inputs: &[&[f32]], out: &[f32]) -> Result<(), AveragingError> {
    if inputs.is_empty() {
        return Err(AveragingError::NoInputs);
    }
    for (index, x) in inputs.iter().enumerate() {
        if x.len() != out.len() {
            return Err(AveragingError::LengthMismatch {
                index,
                len: x.len(),
                expected: out.len(),
            });
        }
    }
    Ok(())
}

/// Coordinate-wise median (the mean of the two middle values for an even count). A minority
/// of arbitrary inputs cannot move any coordinate outside the range of the honest ones.
pub fn coordinate_median(inputs: &[&[f32]], out: &mut [f32]) -> Result<(), AveragingError> {
    check_inputs(inputs, out)?;
    let k = inputs.len();
    let mut column = vec![0f32; k];
    for (i, o) in out.iter_mut().enumerate() {
        for (c, x) in column.iter_mut().zip(inputs) {
            *c = x[i];
        }
        column.sort_unstable_by(f32::total_cmp);
        *o = if k % 2 == 1 {
            column[k / 2]
        } else {
            0.5 * (column[k / 2 - 1] + column[k / 2])
        };
    }
    Ok(())
}

/// How many values a trimmed mean over `k` inputs drops at each end for `fraction`.
pub fn trim_count(k: usize, fraction: f64) -> usize {
    let t = (fraction * k as f64).floor() as usize;
    // Always keep at least one value.
    t.min(k.saturating_sub(1) / 2)
}

/// Coordinate-wise trimmed mean: drops the `trim` smallest and `trim` largest values of each
/// coordinate and averages the rest. Tolerates up to `trim` arbitrary inputs.
pub fn trimmed_mean(inputs: &[&[f32]], trim: usize, out: &mut [f32]) -> Result<(), AveragingError> {
    check_inputs(inputs, out)?;
    let k = inputs.len();
    let trim = trim.min(k.saturating_sub(1) / 2);
    let kept = (k - 2 * trim) as f32;
    let mut column = vec![0f32; k];
    for (i, o) in out.iter_mut().enumerate() {
        for (c, x) in column.iter_mut().zip(inputs) {
            *c = x[i];
        }
        column.sort_unstable_by(f32::total_cmp);
        *o = column[trim..k - trim].iter().sum::<f32>() / kept;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DType, TensorSpec};
    use proptest::prelude::*;

    proptest! {
        /// With h honest inputs near 1.0 and a minority of arbitrary outliers, median and
        /// trimmed mean stay within the honest range.
        #[test]
        fn robust_rules_resist_a_minority(honest in proptest::collection::vec(proptest::collection::vec(0.9f32..1.1, 32), 3..8), outlier in prop_oneof![Just(1e30f32), Just(-1e30f32), -1e6f32..1e6]) {
            let h = honest.len();
            let bad_count = (h - 1) / 2;
            let bad = vec![outlier; 32];
            let mut inputs: Vec<&[f32]> = honest.iter().map(Vec::as_slice).collect();
            inputs.extend(std::iter::repeat_n(bad.as_slice(), bad_count));
            let mut out = vec![0.0; 32];
            coordinate_median(&inputs, &mut out).unwrap();
            prop_assert!(out.iter().all(|v| (0.9..=1.1).contains(v)), "median {out:?}");
            trimmed_mean(&inputs, bad_count, &mut out).unwrap();
            prop_assert!(out.iter().all(|v| (0.9..=1.1).contains(v)), "trimmed {out:?}");
        }
    }

    #[test]
    fn median_and_trim_basics() {
        let inputs: Vec<&[f32]> = vec![&[1.0, 10.0], &[2.0, 20.0], &[3.0, 30.0], &[100.0, -5.0]];
        let mut out = [0.0; 2];
        coordinate_median(&inputs, &mut out).unwrap();
        assert_eq!(out, [2.5, 15.0]);
        trimmed_mean(&inputs, 1, &mut out).unwrap();
        assert_eq!(out, [2.5, 15.0]);
        assert_eq!(trim_count(5, 0.2), 1);
        assert_eq!(trim_count(2, 0.49), 0);
    }

    #[test]
    fn clipping() {
        let mut x = [3.0f32, 4.0];
        assert_eq!(clip_norm(&mut x, 10.0), 1.0);
        clip_norm(&mut x, 1.0);
        assert!((l2_norm(&x) - 1.0).abs() < 1e-6);
        let reference = [1.0f32, 1.0];
        let mut y = [4.0f32, 5.0];
        clip_towards(&mut y, &reference, 1.0);
        assert!((l2_distance(&y, &reference) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn update_checks_name_the_problem() {
        let layout = ParamLayout {
            tensors: vec![
                TensorSpec {
                    name: "a".into(),
                    shape: vec![2],
                    dtype: DType::F32,
                },
                TensorSpec {
                    name: "b".into(),
                    shape: vec![2],
                    dtype: DType::F32,
                },
            ],
        };
        let reference = [0.0f32; 4];
        assert!(check_update(&[0.0, 1.0, 0.0, 0.0], &layout, &reference, Some(2.0)).is_ok());
        assert!(matches!(
            check_update(&[0.0; 3], &layout, &reference, None),
            Err(UpdateRejection::LayoutMismatch { .. })
        ));
        let err = check_update(&[0.0, 0.0, f32::NAN, 0.0], &layout, &reference, None).unwrap_err();
        assert!(
            matches!(&err, UpdateRejection::NonFinite { index: 2, tensor, .. } if tensor == "b"),
            "{err}"
        );
        assert!(matches!(
            check_update(&[0.0, 0.0, f32::INFINITY, 0.0], &layout, &reference, None),
            Err(UpdateRejection::NonFinite { .. })
        ));
        assert!(matches!(
            check_update(&[100.0, 0.0, 0.0, 0.0], &layout, &reference, Some(2.0)),
            Err(UpdateRejection::NormExceeded { .. })
        ));
    }
}
