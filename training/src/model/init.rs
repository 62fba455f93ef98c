//! Deterministic initialization: the same seed gives the same weights on every machine and
//! backend, independent of any global random state.

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;

use super::{UNet, UNetConfig};
use crate::rng::Rng;

/// Builds the network of `config` and draws its convolution weights from `seed`:
/// He-uniform (`bound = sqrt(6 / fan_in)`) for convolution kernels, zero for biases;
/// normalization layers keep their standard constants (scale 1, shift 0).
pub fn seeded(config: &UNetConfig, seed: u64, device: &Device) -> UNet {
    let mut init = SeededInit {
        rng: Rng::derive(seed, 0x1417),
        last: String::new(),
    };
    config.init(device).map(&mut init)
}

struct SeededInit {
    rng: Rng,
    last: String,
}

impl ModuleMapper for SeededInit {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        name.clone_into(&mut self.last);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let is_kernel = D == 4 || D == 5;
        let is_bias = D == 1 && self.last == "bias";
        if !is_kernel && !is_bias {
            return param;
        }
        let rng = &mut self.rng;
        param.map(|tensor| {
            let shape = tensor.shape();
            let n = shape.num_elements();
            let values: Vec<f32> = if is_kernel {
                let fan_in: usize = shape.iter().skip(1).product();
                let bound = (6.0 / fan_in.max(1) as f64).sqrt();
                (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
            } else {
                vec![0.0; n]
            };
            let grad = tensor.is_require_grad();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, shape), &tensor.device());
            if grad { fresh.require_grad() } else { fresh }
        })
    }
}
