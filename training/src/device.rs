//! Compute devices by name, chosen at run time from configuration, and checked by trying
//! them: a device is usable when a small computation on it gives the right answer.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::str::FromStr;

use burn::prelude::*;

/// A device as named in configuration: `auto` (the first of CUDA, wgpu and flex that this
/// build has and that works here), `flex` (CPU), `cpu` (CubeCL JIT, feature `cpu-jit`),
/// `ndarray` (feature `ndarray-backend`), `cuda:N` (feature `cuda`), `wgpu` (feature `wgpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The fastest device that works: CUDA GPU 0, then wgpu, then flex, each tried.
    #[default]
    Auto,
    /// burn's pure-Rust CPU backend: the fastest CPU backend measured here.
    Flex,
    /// CubeCL's JIT CPU backend.
    CpuJit,
    /// The deprecated ndarray backend (for comparison only).
    NdArray,
    /// A CUDA GPU.
    Cuda(usize),
    /// The default wgpu adapter.
    Wgpu,
}

/// Why a device name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Not a known name.
    #[error("unknown device {0:?}: use auto, flex, cpu, ndarray, cuda:N or wgpu")]
    Unknown(String),
    /// Compiled in, but failed when tried on this machine.
    #[error(
        "device {name:?} is in this build but does not work on this machine: {reason} \
         (check the driver, or use device = \"auto\" or \"flex\")"
    )]
    Unusable {
        /// The device tried.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// Known, but this binary was built without it.
    #[error("device {name:?} needs a medmesh built with `--features {feature}`")]
    NotCompiled {
        /// The device asked for.
        name: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "flex" => Ok(DeviceSpec::Flex),
            "cpu" => Ok(DeviceSpec::CpuJit),
            "ndarray" => Ok(DeviceSpec::NdArray),
            "wgpu" => Ok(DeviceSpec::Wgpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Unknown(other.to_owned())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Flex => f.write_str("flex"),
            DeviceSpec::CpuJit => f.write_str("cpu"),
            DeviceSpec::NdArray => f.write_str("ndarray"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Wgpu => f.write_str("wgpu"),
        }
    }
}

impl DeviceSpec {
    /// The burn device, tried: [`DeviceSpec::resolve`]'s device.
    pub fn device(self) -> Result<Device, DeviceError> {
        self.resolve().map(|(_, device)| device)
    }

    /// The devices `auto` tries, fastest first: those this build includes.
    pub fn candidates() -> Vec<DeviceSpec> {
        let mut out = Vec::new();
        if cfg!(feature = "cuda") {
            out.push(DeviceSpec::Cuda(0));
        }
        if cfg!(feature = "wgpu") {
            out.push(DeviceSpec::Wgpu);
        }
        out.push(DeviceSpec::Flex);
        out
    }

    /// The concrete device and its burn handle: for `auto`, the first candidate that works;
    /// for any other name, that device if this build has it and it works here.
    pub fn resolve(self) -> Result<(DeviceSpec, Device), DeviceError> {
        if self != DeviceSpec::Auto {
            return self.probe().map(|device| (self, device));
        }
        let mut last = None;
        for candidate in DeviceSpec::candidates() {
            match candidate.probe() {
                Ok(device) => return Ok((candidate, device)),
                Err(e) => {
                    tracing::info!(device = %candidate, "auto: not usable here: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| DeviceError::Unknown("auto".into())))
    }

    /// The device, after a 2x2 matrix product on it came out right. Backends report some
    /// failures (no driver, no adapter) by panicking; those are caught and named.
    fn probe(self) -> Result<Device, DeviceError> {
        let device = self.backend()?;
        let unusable = |reason: String| DeviceError::Unusable {
            name: self.to_string(),
            reason,
        };
        let hook = panic::take_hook();
        panic::set_hook(Box::new(|_| {}));
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            let a = Tensor::<2>::from_data(
                TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
                &device,
            );
            a.clone().matmul(a).into_data().try_to_vec::<f32>().ok()
        }));
        panic::set_hook(hook);
        match outcome {
            Ok(Some(v)) if v == [7.0, 10.0, 15.0, 22.0] => Ok(device),
            Ok(v) => Err(unusable(format!(
                "a 2x2 product came out {v:?}, not [7, 10, 15, 22]"
            ))),
            Err(panic) => Err(unusable(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "its backend panicked".into()),
            )),
        }
    }

    /// The burn device, if this build includes its backend (untried).
    fn backend(self) -> Result<Device, DeviceError> {
        let missing = |feature| DeviceError::NotCompiled {
            name: self.to_string(),
            feature,
        };
        match self {
            DeviceSpec::Auto => self.resolve().map(|(_, device)| device),
            DeviceSpec::Flex => Ok(Device::flex()),
            #[cfg(feature = "cpu-jit")]
            DeviceSpec::CpuJit => Ok(Device::cpu()),
            #[cfg(not(feature = "cpu-jit"))]
            DeviceSpec::CpuJit => Err(missing("cpu-jit")),
            #[cfg(feature = "ndarray-backend")]
            #[allow(deprecated)]
            DeviceSpec::NdArray => Ok(Device::ndarray()),
            #[cfg(not(feature = "ndarray-backend"))]
            DeviceSpec::NdArray => Err(missing("ndarray-backend")),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => Ok(Device::cuda(i)),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(missing("cuda")),
            #[cfg(feature = "wgpu")]
            DeviceSpec::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(not(feature = "wgpu"))]
            DeviceSpec::Wgpu => Err(missing("wgpu")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` tries the devices of this build, fastest first, and ends at flex, which works
    /// everywhere; a named device is tried too.
    #[test]
    fn auto_picks_a_device_that_works() {
        let candidates = DeviceSpec::candidates();
        assert_eq!(candidates.last(), Some(&DeviceSpec::Flex));
        let (chosen, _) = DeviceSpec::Auto.resolve().unwrap();
        assert!(candidates.contains(&chosen), "{chosen}");
        if candidates.len() == 1 {
            assert_eq!(chosen, DeviceSpec::Flex);
        }
        assert_eq!(DeviceSpec::Flex.resolve().unwrap().0, DeviceSpec::Flex);
        assert_eq!("auto".parse::<DeviceSpec>().unwrap().to_string(), "auto");
    }

    #[test]
    fn names_parse_and_missing_backends_say_which_feature() {
        assert_eq!("cuda:1".parse(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("flex".parse(), Ok(DeviceSpec::Flex));
        assert!(matches!(
            "tpu".parse::<DeviceSpec>(),
            Err(DeviceError::Unknown(_))
        ));
        assert!(DeviceSpec::Flex.device().is_ok());
        #[cfg(not(feature = "cuda"))]
        assert!(
            DeviceSpec::Cuda(0)
                .device()
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }
}
