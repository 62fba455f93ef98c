//! What a node keeps on disk under its state directory:
//!
//! ```text
//! state/
//!   roster.toml                      newest roster adopted from peers
//!   experiments/<id>/manifest.json   the signed manifest, as accepted
//!   experiments/<id>/checkpoint.bin  model, optimizer and round (atomic, checksummed)
//!   experiments/<id>/progress.json   what the runner needs besides the checkpoint
//!   experiments/<id>/export/         model.safetensors + provenance.json when finished
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use medmesh_crypto::PublicKey;
use medmesh_protocol::SignedManifest;
use medmesh_training::atomic_file;
use serde::{Deserialize, Serialize};

/// The directory of experiment `id`.
pub fn experiment_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("experiments").join(id)
}

/// Persists an accepted manifest.
pub fn save_manifest(state_dir: &Path, signed: &SignedManifest) -> Result<()> {
    let path = experiment_dir(state_dir, &signed.manifest.id).join("manifest.json");
    let json = serde_json::to_vec_pretty(signed)?;
    atomic_file::write(&path, &json, 0o644).with_context(|| format!("writing {}", path.display()))
}

/// Every manifest accepted before (a restarted node resumes them).
pub fn load_manifests(state_dir: &Path) -> Result<Vec<SignedManifest>> {
    let root = state_dir.join("experiments");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(out);
    };
    for entry in entries {
        let path = entry?.path().join("manifest.json");
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let signed: SignedManifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a signed manifest", path.display()))?;
        out.push(signed);
    }
    out.sort_by(|a, b| a.manifest.id.cmp(&b.manifest.id));
    Ok(out)
}

/// The runner's state beside the checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunnerState {
    /// Validation Dice of the initial model.
    pub dice_initial: Option<f32>,
    /// Sites whose updates were averaged in at least once.
    pub contributors: Vec<PublicKey>,
    /// This site's mass after the last completed round (the round engine's: its sample
    /// count, or its push-sum weight); `None` before the first round.
    #[serde(default)]
    pub mass: Option<f64>,
    /// When this site first started the experiment (ms since the Unix epoch): the start of
    /// `stop.max_minutes`.
    #[serde(default)]
    pub started_unix_ms: Option<u64>,
    /// What the stop rules remember (the best validation metric and its round).
    #[serde(default)]
    pub stop: medmesh_protocol::stop::StopState,
    /// The last training round this site announced, having met a stop rule.
    #[serde(default)]
    pub stop_after: Option<u64>,
    /// The metric of the personalized (locally fine-tuned) model, once made.
    #[serde(default)]
    pub personalized_metric: Option<f32>,
    /// What this site's privacy releases have spent (with privacy noise on).
    #[serde(default)]
    pub privacy: Option<medmesh_protocol::provenance::PrivacySpent>,
    /// Models folded into the weight average of the last rounds (`training.swa_rounds`),
    /// whose mean is in `swa.f32` beside this file.
    #[serde(default)]
    pub swa_count: u32,
    /// Whether the site's model became that average (at the end of training).
    #[serde(default)]
    pub swa_applied: bool,
}

impl RunnerState {
    /// Loads `dir/progress.json`, or the empty state when there is none.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("progress.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is corrupt", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes `dir/progress.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("progress.json");
        atomic_file::write(&path, &serde_json::to_vec_pretty(self)?, 0o644)
            .with_context(|| format!("writing {}", path.display()))
    }
}
