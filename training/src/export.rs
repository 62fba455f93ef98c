//! Model export as safetensors, with conventional tensor names and the network's shape in
//! the metadata, so other tools (and `medmesh evaluate`) can read it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use medmesh_protocol::manifest::Normalization;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::{UNet, UNetConfig, init};
use crate::params::{self, Selection};

/// Why a model could not be exported or imported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a safetensors file of a medmesh UNet.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Writes `model` (every parameter, normalization statistics included) to `path` atomically,
/// with `extra` metadata (e.g. manifest digest) beside the network shape.
pub fn save(
    model: &UNet,
    config: &UNetConfig,
    extra: &[(&str, String)],
    path: &Path,
) -> Result<(), ExportError> {
    let layout = params::layout(model, Selection::All);
    let values = params::flatten(model, Selection::All);
    let bytes: &[u8] = bytemuck::cast_slice(&values);
    let mut views = Vec::with_capacity(layout.tensors.len());
    for (offset, spec) in layout.offsets() {
        let start = offset as usize * 4;
        let shape: Vec<usize> = spec.shape.iter().map(|d| *d as usize).collect();
        let view = TensorView::new(
            Dtype::F32,
            shape,
            &bytes[start..start + spec.len() as usize * 4],
        )
        .map_err(|e| ExportError::Format {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        views.push((spec.name.clone(), view));
    }
    let mut metadata: HashMap<String, String> = [
        ("format", "medmesh-unet-v1".to_owned()),
        ("dims", config.dims.to_string()),
        ("in_channels", config.in_channels.to_string()),
        ("classes", config.classes.to_string()),
        ("depth", config.depth.to_string()),
        ("base_channels", config.base_channels.to_string()),
        (
            "normalization",
            match config.normalization {
                Normalization::Batch => "batch",
                Normalization::Group => "group",
            }
            .to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    metadata.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let out = safetensors::serialize(views, Some(metadata)).map_err(|e| ExportError::Format {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    crate::checkpoint::write_atomic(path, &out).map_err(|e| match e {
        crate::checkpoint::CheckpointError::Io { path, source } => ExportError::Io { path, source },
        other => ExportError::Format {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// Reads a model written by [`save`] onto `device`; returns it with its shape.
pub fn load(path: &Path, device: &Device) -> Result<(UNet, UNetConfig), ExportError> {
    let bytes = std::fs::read(path).map_err(|source| ExportError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| ExportError::Format {
        path: path.to_owned(),
        reason,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("metadata lacks `{k}`: not a medmesh model")))
    };
    let num = |k: &str| {
        get(k)?
            .parse::<usize>()
            .map_err(|_| bad(format!("metadata `{k}` is not a number")))
    };
    let config = UNetConfig {
        // Files from before 3D models carry no `dims`: they are 2D (and their kernel shapes
        // are checked against a 2D network below).
        dims: if meta.contains_key("dims") {
            num("dims")?
        } else {
            2
        },
        in_channels: num("in_channels")?,
        classes: num("classes")?,
        depth: num("depth")?,
        base_channels: num("base_channels")?,
        normalization: match get("normalization")?.as_str() {
            "batch" => Normalization::Batch,
            "group" => Normalization::Group,
            other => return Err(bad(format!("unknown normalization {other:?}"))),
        },
    };
    if !(2..=3).contains(&config.dims)
        || !(3..=5).contains(&config.depth)
        || !(1..=64).contains(&config.base_channels)
        || config.classes < 2
    {
        return Err(bad(format!("implausible network shape {config:?}")));
    }
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let model = init::seeded(&config, 0, device);
    let layout = params::layout(&model, Selection::All);
    let mut values = Vec::with_capacity(layout.num_params() as usize);
    for spec in &layout.tensors {
        let view = tensors
            .tensor(&spec.name)
            .map_err(|_| bad(format!("tensor `{}` is missing", spec.name)))?;
        let shape: Vec<u64> = view.shape().iter().map(|d| *d as u64).collect();
        if view.dtype() != Dtype::F32 || shape != spec.shape {
            return Err(bad(format!(
                "tensor `{}` is {:?} {:?}, expected F32 {:?}",
                spec.name,
                view.dtype(),
                shape,
                spec.shape
            )));
        }
        values.extend(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    let model =
        params::load_flat(model, &values, Selection::All).map_err(|e| bad(e.to_string()))?;
    Ok((model, config))
}
