//! Segmentation metrics on predicted and true label maps.

/// Dice and IoU of one class between two label maps. A class absent from both counts as a
/// perfect match (1.0): predicting nothing where there is nothing is right.
pub fn dice_iou(pred: &[u8], truth: &[u8], class: u8) -> (f64, f64) {
    let (mut inter, mut p, mut t) = (0usize, 0usize, 0usize);
    for (a, b) in pred.iter().zip(truth) {
        let (pa, tb) = (*a == class, *b == class);
        inter += usize::from(pa && tb);
        p += usize::from(pa);
        t += usize::from(tb);
    }
    if p + t == 0 {
        return (1.0, 1.0);
    }
    let dice = 2.0 * inter as f64 / (p + t) as f64;
    let iou = inter as f64 / (p + t - inter) as f64;
    (dice, iou)
}

/// Per-class Dice and IoU for classes `1..classes` (background excluded), and their means.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scores {
    /// Dice per foreground class.
    pub dice: Vec<f64>,
    /// IoU per foreground class.
    pub iou: Vec<f64>,
}

impl Scores {
    /// Scores of a prediction.
    pub fn of(pred: &[u8], truth: &[u8], classes: usize) -> Self {
        let (dice, iou) = (1..classes as u8).map(|c| dice_iou(pred, truth, c)).unzip();
        Self { dice, iou }
    }

    /// Mean Dice over foreground classes.
    pub fn mean_dice(&self) -> f64 {
        mean(&self.dice)
    }

    /// Mean IoU over foreground classes.
    pub fn mean_iou(&self) -> f64 {
        mean(&self.iou)
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        1.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_and_iou_basics() {
        assert_eq!(dice_iou(&[1, 1, 0, 0], &[1, 1, 0, 0], 1), (1.0, 1.0));
        assert_eq!(
            dice_iou(&[0, 0], &[0, 0], 1),
            (1.0, 1.0),
            "empty vs empty is perfect"
        );
        assert_eq!(dice_iou(&[1, 0], &[0, 0], 1), (0.0, 0.0));
        let (d, i) = dice_iou(&[1, 1, 0, 0], &[1, 0, 1, 0], 1);
        assert!((d - 0.5).abs() < 1e-12 && (i - 1.0 / 3.0).abs() < 1e-12);
        let s = Scores::of(&[0, 1, 2, 2], &[0, 1, 2, 1], 3);
        assert_eq!(s.dice.len(), 2);
        assert!((s.mean_dice() - (2.0 / 3.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }
}
