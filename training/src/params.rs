//! A model's parameters as one flat f32 vector with a stable layout, and back.
//!
//! Parameters are visited in the module's field order, which is fixed by the code, so two
//! nodes running the same manifest produce identical layouts. Names are the conventional
//! dotted paths (`encoder.0.conv1.weight`, `encoder.0.norm1.running_mean`); normalization
//! layers can be left out (FedBN: they stay local, running statistics included).

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use medmesh_protocol::{DType, ParamLayout, TensorSpec};

/// Which parameters take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every parameter, normalization layers and running statistics included.
    All,
    /// Everything except normalization layers (FedBN).
    WithoutNormalization,
}

impl Selection {
    /// The selection a manifest's `keep_normalization_local` implies.
    pub fn for_manifest(keep_normalization_local: bool) -> Self {
        if keep_normalization_local {
            Selection::WithoutNormalization
        } else {
            Selection::All
        }
    }

    fn includes(self, in_norm: bool) -> bool {
        self == Selection::All || !in_norm
    }
}

/// Why weights could not be loaded into a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    /// The vector's length does not match the model.
    #[error("weight vector has {got} values, the model's layout needs {expected}")]
    Length {
        /// Values the layout needs.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A NaN or infinite value.
    #[error("weight value {index} is not finite")]
    NonFinite {
        /// Its index.
        index: usize,
    },
}

/// Tracks the module path while visiting.
#[derive(Default)]
struct PathTracker {
    stack: Vec<(String, String)>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container: &str) {
        self.stack.push((name.to_owned(), container.to_owned()));
    }

    fn exit(&mut self) {
        self.stack.pop();
    }

    fn in_norm(&self) -> bool {
        self.stack
            .iter()
            .any(|(_, c)| c == "Struct:BatchNorm" || c == "Struct:GroupNorm")
    }

    /// Dotted name without enum variants, with PyTorch's names for norm scale and shift.
    fn name(&self) -> String {
        let in_norm = self.in_norm();
        self.stack
            .iter()
            .filter(|(_, c)| !c.starts_with("Enum:"))
            .map(|(n, _)| match (in_norm, n.as_str()) {
                (true, "gamma") => "weight",
                (true, "beta") => "bias",
                (_, other) => other,
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

struct Collector {
    path: PathTracker,
    selection: Selection,
    layout: Vec<TensorSpec>,
    values: Option<Vec<f32>>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.selection.includes(self.path.in_norm()) {
            return;
        }
        let tensor = param.val();
        self.layout.push(TensorSpec {
            name: self.path.name(),
            shape: tensor.shape().iter().map(|d| *d as u64).collect(),
            dtype: DType::F32,
        });
        if let Some(values) = &mut self.values {
            let data = tensor.into_data();
            match data.as_slice::<f32>() {
                Ok(slice) => values.extend_from_slice(slice),
                Err(_) => values.extend(data.iter::<f32>()),
            }
        }
    }
}

/// The layout of `selection` in `model`.
pub fn layout<M: Module>(model: &M, selection: Selection) -> ParamLayout {
    let mut c = Collector {
        path: PathTracker::default(),
        selection,
        layout: Vec::new(),
        values: None,
    };
    model.visit(&mut c);
    ParamLayout { tensors: c.layout }
}

/// The flat values of `selection` in `model`, in layout order.
pub fn flatten<M: Module>(model: &M, selection: Selection) -> Vec<f32> {
    let mut c = Collector {
        path: PathTracker::default(),
        selection,
        layout: Vec::new(),
        values: Some(Vec::new()),
    };
    model.visit(&mut c);
    c.values.unwrap_or_default()
}

struct Loader<'a> {
    path: PathTracker,
    selection: Selection,
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.selection.includes(self.path.in_norm()) {
            return param;
        }
        let (values, offset) = (self.values, &mut self.offset);
        param.map(|tensor| {
            let shape = tensor.shape();
            let n = shape.num_elements();
            let slice = &values[*offset..*offset + n];
            *offset += n;
            let grad = tensor.is_require_grad();
            let fresh =
                Tensor::<D>::from_data(TensorData::new(slice.to_vec(), shape), &tensor.device());
            if grad { fresh.require_grad() } else { fresh }
        })
    }
}

/// Loads flat `values` (in `layout(model, selection)` order) into `model`; parameters
/// outside the selection keep their values. Checks length and finiteness first.
pub fn load_flat<M: Module>(
    model: M,
    values: &[f32],
    selection: Selection,
) -> Result<M, ParamsError> {
    let expected = layout(&model, selection).num_params() as usize;
    if values.len() != expected {
        return Err(ParamsError::Length {
            expected,
            got: values.len(),
        });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(ParamsError::NonFinite { index });
    }
    let mut loader = Loader {
        path: PathTracker::default(),
        selection,
        values,
        offset: 0,
    };
    Ok(model.map(&mut loader))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UNetConfig;
    use medmesh_protocol::manifest::Normalization;

    fn config(norm: Normalization) -> UNetConfig {
        UNetConfig {
            dims: 2,
            in_channels: 1,
            classes: 2,
            depth: 3,
            base_channels: 8,
            normalization: norm,
        }
    }

    #[test]
    fn flat_weights_round_trip_bit_exactly() {
        let device = Device::flex();
        for norm in [Normalization::Batch, Normalization::Group] {
            let a = crate::model::init::seeded(&config(norm), 1, &device);
            let b = crate::model::init::seeded(&config(norm), 2, &device);
            let wa = flatten(&a, Selection::All);
            assert_ne!(wa, flatten(&b, Selection::All));
            let b = load_flat(b, &wa, Selection::All).unwrap();
            let back = flatten(&b, Selection::All);
            assert!(
                back.iter()
                    .zip(&wa)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
            );
            assert_eq!(layout(&a, Selection::All).num_params() as usize, wa.len());
        }
    }

    #[test]
    fn fedbn_leaves_normalization_local() {
        let device = Device::flex();
        let a = crate::model::init::seeded(&config(Normalization::Batch), 1, &device);
        let all = layout(&a, Selection::All);
        let shared = layout(&a, Selection::WithoutNormalization);
        assert!(shared.num_params() < all.num_params());
        assert!(
            all.tensors
                .iter()
                .any(|t| t.name == "encoder.0.norm1.running_var"),
            "{:?}",
            all.tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
        );
        assert!(shared.tensors.iter().all(|t| !t.name.contains("norm")));
        assert!(
            all.tensors
                .iter()
                .any(|t| t.name == "encoder.0.conv1.weight" && t.shape == vec![8, 1, 3, 3])
        );
        assert!(matches!(
            load_flat(a, &[0.0; 3], Selection::All),
            Err(ParamsError::Length { .. })
        ));
    }
}
