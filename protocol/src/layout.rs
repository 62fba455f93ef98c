//! The parameter layout of a model: tensor names, shapes and dtypes in a stable order.
//!
//! Two nodes may only average weights whose layouts are identical; the envelope carries the
//! layout's digest so a mismatch is caught before a single payload byte is read.

use serde::{Deserialize, Serialize};

/// Element type of a model tensor as stored in the model (not as sent: see
/// [`crate::encoding::WeightEncoding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
}

/// One named tensor of the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Conventional dotted name, e.g. `encoder.0.conv1.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Element type.
    pub dtype: DType,
}

impl TensorSpec {
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn len(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ordered list of tensors that make up a flat parameter vector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamLayout {
    /// Tensors in flattening order.
    pub tensors: Vec<TensorSpec>,
}

impl ParamLayout {
    /// Total number of scalar parameters.
    pub fn num_params(&self) -> u64 {
        self.tensors.iter().map(TensorSpec::len).sum()
    }

    /// BLAKE3 of the canonical (bincode) encoding: equal digests mean equal layouts.
    pub fn digest(&self) -> [u8; 32] {
        let bytes = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .unwrap_or_else(|e| unreachable!("encoding a layout into memory cannot fail: {e}"));
        *blake3::hash(&bytes).as_bytes()
    }

    /// Element offset and tensor of each entry, in order.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &TensorSpec)> {
        self.tensors.iter().scan(0u64, |offset, t| {
            let start = *offset;
            *offset += t.len();
            Some((start, t))
        })
    }

    /// The sub-layout of tensors for which `keep` is true (e.g. all but normalization layers).
    pub fn filtered(&self, keep: impl Fn(&TensorSpec) -> bool) -> ParamLayout {
        ParamLayout {
            tensors: self.tensors.iter().filter(|t| keep(t)).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[u64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: DType::F32,
        }
    }

    #[test]
    fn offsets_and_counts() {
        let layout = ParamLayout {
            tensors: vec![spec("a", &[2, 3]), spec("b", &[4]), spec("c", &[])],
        };
        assert_eq!(layout.num_params(), 11);
        let offsets: Vec<u64> = layout.offsets().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![0, 6, 10]);
    }

    #[test]
    fn digest_sees_names_shapes_and_order() {
        let a = ParamLayout {
            tensors: vec![spec("a", &[2, 3]), spec("b", &[4])],
        };
        let renamed = ParamLayout {
            tensors: vec![spec("x", &[2, 3]), spec("b", &[4])],
        };
        let reshaped = ParamLayout {
            tensors: vec![spec("a", &[3, 2]), spec("b", &[4])],
        };
        let reordered = ParamLayout {
            tensors: vec![spec("b", &[4]), spec("a", &[2, 3])],
        };
        for other in [renamed, reshaped, reordered] {
            assert_ne!(a.digest(), other.digest());
        }
        assert_eq!(a.digest(), a.clone().digest());
    }
}
