//! Soft Dice plus cross-entropy, the usual pairing for medical segmentation: cross-entropy
//! gives steady gradients early, Dice keeps small structures from drowning in background.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

const SMOOTH: f64 = 1.0;

/// `cross_entropy + (1 - mean foreground soft Dice)` for logits and one-hot targets, both
/// `[batch, classes, height, width]` (or `[batch, classes, depth, height, width]`). Dice is
/// pooled over the batch and all pixels.
pub fn dice_ce_loss<const D: usize>(logits: Tensor<D>, targets: Tensor<D>) -> Tensor<1> {
    let shape = logits.dims();
    let classes = shape[1];
    let pixels = (shape.iter().product::<usize>() / classes) as f64;
    let log_p = log_softmax(logits, 1);
    let cross_entropy = (log_p.clone() * targets.clone())
        .sum()
        .neg()
        .div_scalar(pixels);
    let p = log_p.exp();
    // Per class: sums over every axis but the class axis.
    let others: Vec<usize> = (0..D).filter(|&d| d != 1).collect();
    let intersection = (p.clone() * targets.clone()).sum_dims(&others);
    let total = p.sum_dims(&others) + targets.sum_dims(&others);
    let dice = intersection.mul_scalar(2.0).add_scalar(SMOOTH) / total.add_scalar(SMOOTH);
    let foreground = dice.flatten::<1>(0, D - 1).narrow(0, 1, classes - 1).mean();
    cross_entropy + foreground.neg().add_scalar(1.0)
}

/// One-hot encodes class indices `[batch * pixels]` into `[batch, classes, pixels]` float
/// data (host side, before upload), `pixels` being `height * width` (times depth in 3D).
pub fn one_hot(labels: &[u8], batch: usize, classes: usize, plane: usize) -> Vec<f32> {
    let mut out = vec![0f32; batch * classes * plane];
    for (i, &l) in labels.iter().enumerate() {
        let (b, p) = (i / plane, i % plane);
        out[(b * classes + l as usize) * plane + p] = 1.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_logits_give_a_small_loss_and_wrong_ones_a_large_one() {
        let device = Device::flex();
        let labels: Vec<u8> = (0..32).map(|i| u8::from(i % 4 == 0)).collect();
        let targets = Tensor::<4>::from_data(
            TensorData::new(one_hot(&labels, 2, 2, 16), [2, 2, 4, 4]),
            &device,
        );
        let good = targets.clone().mul_scalar(20.0);
        let bad = targets.clone().neg().add_scalar(1.0).mul_scalar(20.0);
        let good_loss: f32 = dice_ce_loss(good, targets.clone()).into_scalar();
        let bad_loss: f32 = dice_ce_loss(bad, targets).into_scalar();
        assert!(good_loss < 0.05, "{good_loss}");
        assert!(bad_loss > 1.5, "{bad_loss}");
    }
}
