//! Checkpoints: model, optimizer state, round and shuffling state in one file, written
//! atomically and checked on load, so a crash never leaves a checkpoint that half loads.
//!
//! Layout: `MMCKPT01` | header length (u32 LE) | header (JSON) | model record | optimizer
//! record | BLAKE3 of everything before it (32 bytes).

use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use medmesh_protocol::manifest::Normalization;
use serde::{Deserialize, Serialize};

use crate::model::UNetConfig;
use crate::trainer::{TrainSettings, Trainer};

const MAGIC: &[u8; 8] = b"MMCKPT01";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system refused (full disk, permissions).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is damaged or not a checkpoint.
    #[error("{path}: corrupt checkpoint: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint of another model shape.
    #[error("{path}: checkpoint is for a different model ({reason})")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// How it differs.
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    round: u64,
    rng_state: u64,
    in_channels: usize,
    classes: usize,
    depth: usize,
    base_channels: usize,
    batch_norm: bool,
    model_len: u64,
    optim_len: u64,
}

/// Writes `trainer`'s state to `path` atomically (temp file, fsync, rename, fsync dir). On any
/// failure the previous checkpoint at `path` is left untouched.
pub fn save(trainer: &Trainer, path: &Path) -> Result<(), CheckpointError> {
    let (model, optim) = trainer
        .state_bytes()
        .map_err(|e| CheckpointError::Corrupt {
            path: path.to_owned(),
            reason: format!("cannot serialize the model: {e}"),
        })?;
    let c = trainer.config();
    let header = Header {
        round: trainer.round,
        rng_state: trainer.rng.state(),
        in_channels: c.in_channels,
        classes: c.classes,
        depth: c.depth,
        base_channels: c.base_channels,
        batch_norm: c.normalization == Normalization::Batch,
        model_len: model.len() as u64,
        optim_len: optim.len() as u64,
    };
    let header = serde_json::to_vec(&header).map_err(|e| CheckpointError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut bytes = Vec::with_capacity(8 + 4 + header.len() + model.len() + optim.len() + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&model);
    bytes.extend_from_slice(&optim);
    let hash = blake3::hash(&bytes);
    bytes.extend_from_slice(hash.as_bytes());
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically (see [`crate::atomic_file`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    crate::atomic_file::write(path, bytes, 0o644).map_err(|source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Loads a checkpoint for a model of `config`, trained with `settings`, onto `device`.
pub fn load(
    path: &Path,
    config: UNetConfig,
    settings: TrainSettings,
    device: Device,
) -> Result<Trainer, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    })?;
    let corrupt = |reason: &str| CheckpointError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < 8 + 4 + 32 || &bytes[..8] != MAGIC {
        return Err(corrupt("not a medmesh checkpoint (bad magic or too short)"));
    }
    let (body, hash) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != hash {
        return Err(corrupt("checksum mismatch (truncated or altered)"));
    }
    let header_len = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
    let header_end = 12usize
        .checked_add(header_len)
        .filter(|e| *e <= body.len())
        .ok_or_else(|| corrupt("header length out of range"))?;
    let header: Header = serde_json::from_slice(&body[12..header_end])
        .map_err(|e| corrupt(&format!("bad header: {e}")))?;
    let model_end = header_end + header.model_len as usize;
    if model_end + header.optim_len as usize != body.len() {
        return Err(corrupt("section lengths do not add up"));
    }
    let expected = (
        config.in_channels,
        config.classes,
        config.depth,
        config.base_channels,
        config.normalization == Normalization::Batch,
    );
    let found = (
        header.in_channels,
        header.classes,
        header.depth,
        header.base_channels,
        header.batch_norm,
    );
    if expected != found {
        return Err(CheckpointError::Mismatch {
            path: path.to_owned(),
            reason: format!(
                "(channels, classes, depth, base, batch-norm) {found:?}, expected {expected:?}"
            ),
        });
    }
    Trainer::restore(
        config,
        settings,
        device,
        body[header_end..model_end].to_vec(),
        body[model_end..].to_vec(),
        header.round,
        header.rng_state,
    )
    .map_err(|e| corrupt(&format!("records do not load: {e}")))
}
