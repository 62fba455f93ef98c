//! Compute devices by name, chosen at run time from configuration.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A device as named in configuration: `flex` (default CPU), `cpu` (CubeCL JIT, feature
/// `cpu-jit`), `ndarray` (feature `ndarray-backend`), `cuda:N` (feature `cuda`), `wgpu` (feature `wgpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// burn's pure-Rust CPU backend: the fastest CPU backend measured here.
    #[default]
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
    #[error("unknown device {0:?}: use flex, cpu, ndarray, cuda:N or wgpu")]
    Unknown(String),
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
            DeviceSpec::Flex => f.write_str("flex"),
            DeviceSpec::CpuJit => f.write_str("cpu"),
            DeviceSpec::NdArray => f.write_str("ndarray"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Wgpu => f.write_str("wgpu"),
        }
    }
}

impl DeviceSpec {
    /// The burn device, if this build includes its backend.
    pub fn device(self) -> Result<Device, DeviceError> {
        let missing = |feature| DeviceError::NotCompiled {
            name: self.to_string(),
            feature,
        };
        match self {
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
