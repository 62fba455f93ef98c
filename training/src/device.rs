//! Compute devices by name, chosen at run time from configuration, and checked by trying
//! them: a device is usable when a small computation on it gives the right answer.

use std::any::Any;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use burn::prelude::*;

/// A device as named in configuration: `auto` (the first of CUDA, a wgpu GPU and flex that
/// this build has and that works here), `flex` (CPU), `cpu` (CubeCL JIT, feature `cpu-jit`),
/// `ndarray` (feature `ndarray-backend`), `cuda:N` (feature `cuda`), and with feature `wgpu`:
/// `wgpu` (the best adapter wgpu finds), `wgpu:discrete`, `wgpu:integrated` and `wgpu:cpu` (a
/// software Vulkan such as Mesa's lavapipe: the GPU kernels, run on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The fastest device that works: CUDA GPU 0, then a discrete and an integrated GPU
    /// through wgpu, then flex, each tried. Never a software adapter: flex is faster.
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
    /// A wgpu adapter (Vulkan, Metal, DirectX 12).
    Wgpu(WgpuAdapter),
}

/// Which wgpu adapter: the first of its kind on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuAdapter {
    /// Whichever wgpu ranks best: a GPU before a software adapter.
    Best,
    /// The first discrete GPU.
    Discrete,
    /// The first integrated GPU.
    Integrated,
    /// A software adapter on the CPU (Mesa's lavapipe): for tests of the GPU code path on
    /// machines without a GPU, much slower than flex.
    Software,
}

/// Why a device name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Not a known name.
    #[error(
        "unknown device {0:?}: use auto, flex, cpu, ndarray, cuda:N, wgpu, wgpu:discrete, \
         wgpu:integrated or wgpu:cpu"
    )]
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
            "wgpu" => Ok(DeviceSpec::Wgpu(WgpuAdapter::Best)),
            "wgpu:discrete" => Ok(DeviceSpec::Wgpu(WgpuAdapter::Discrete)),
            "wgpu:integrated" => Ok(DeviceSpec::Wgpu(WgpuAdapter::Integrated)),
            "wgpu:cpu" => Ok(DeviceSpec::Wgpu(WgpuAdapter::Software)),
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
            DeviceSpec::Wgpu(WgpuAdapter::Best) => f.write_str("wgpu"),
            DeviceSpec::Wgpu(WgpuAdapter::Discrete) => f.write_str("wgpu:discrete"),
            DeviceSpec::Wgpu(WgpuAdapter::Integrated) => f.write_str("wgpu:integrated"),
            DeviceSpec::Wgpu(WgpuAdapter::Software) => f.write_str("wgpu:cpu"),
        }
    }
}

impl DeviceSpec {
    /// The burn device, tried: [`DeviceSpec::resolve`]'s device.
    pub fn device(self) -> Result<Device, DeviceError> {
        self.resolve().map(|(_, device)| device)
    }

    /// The devices `auto` tries, fastest first: those this build includes. A software wgpu
    /// adapter is not among them: on the same CPU, flex trains faster.
    pub fn candidates() -> Vec<DeviceSpec> {
        let mut out = Vec::new();
        if cfg!(feature = "cuda") {
            out.push(DeviceSpec::Cuda(0));
        }
        if cfg!(feature = "wgpu") {
            out.push(DeviceSpec::Wgpu(WgpuAdapter::Discrete));
            out.push(DeviceSpec::Wgpu(WgpuAdapter::Integrated));
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
    /// failures (no driver, no adapter) by panicking, often on a thread of their own; those
    /// are caught, and the first panic's message is the reason given.
    fn probe(self) -> Result<Device, DeviceError> {
        let device = self.backend()?;
        let unusable = |reason: String| DeviceError::Unusable {
            name: self.to_string(),
            reason,
        };
        let panics = Arc::new(Mutex::new(Vec::<String>::new()));
        let hook = panic::take_hook();
        let seen = Arc::clone(&panics);
        panic::set_hook(Box::new(move |info| {
            if let Ok(mut seen) = seen.lock() {
                seen.push(payload_text(info.payload()));
            }
        }));
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
            Err(panic) => {
                let first = panics.lock().ok().and_then(|seen| seen.first().cloned());
                Err(unusable(first.unwrap_or_else(|| payload_text(&*panic))))
            }
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
            DeviceSpec::Wgpu(adapter) => {
                use burn::tensor::DeviceKind;
                Ok(Device::wgpu(match adapter {
                    WgpuAdapter::Best => DeviceKind::DefaultDevice,
                    WgpuAdapter::Discrete => DeviceKind::DiscreteGpu(0),
                    WgpuAdapter::Integrated => DeviceKind::IntegratedGpu(0),
                    WgpuAdapter::Software => DeviceKind::Cpu,
                }))
            }
            #[cfg(not(feature = "wgpu"))]
            DeviceSpec::Wgpu(_) => Err(missing("wgpu")),
        }
    }
}

/// A panic's message, where it has one.
fn payload_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "its backend panicked".into())
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
        for name in ["wgpu", "wgpu:discrete", "wgpu:integrated", "wgpu:cpu"] {
            assert_eq!(name.parse::<DeviceSpec>().unwrap().to_string(), name);
        }
        assert!(
            !DeviceSpec::candidates().contains(&DeviceSpec::Wgpu(WgpuAdapter::Software)),
            "auto never picks a software adapter"
        );
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
