//! Experiment manifests: what a researcher asks the consortium to train, and how.
//!
//! Researchers write manifests as TOML (JSON is accepted too; see `examples/` at the
//! repository root), sign them with their roster key, and inject them at any node. Every node
//! re-checks the signature against its roster and the fields against [`Manifest::validate`]
//! before it acts.

use std::fmt;

use medmesh_crypto::{
    Domain, Identity, MembershipError, PublicKey, Role, Roster, Signature, SignatureError,
};
use serde::{Deserialize, Serialize};

use crate::encoding::WeightEncoding;

/// A complete experiment description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique id: 1-64 characters of `a-z`, `0-9`, `-`, `_`, `.`, starting with a letter or digit.
    pub id: String,
    /// Human-readable title.
    pub title: String,
    /// The consortium this experiment runs in (must match the roster).
    pub consortium: String,
    /// What is segmented.
    pub task: Task,
    /// The network to train.
    pub model: ModelSpec,
    /// Local training at each site.
    pub training: Training,
    /// How sites combine their weights.
    pub averaging: Averaging,
    /// Optional privacy protection of what is sent.
    #[serde(default)]
    pub privacy: Privacy,
    /// How sites measure progress.
    #[serde(default)]
    pub evaluation: Evaluation,
    /// When to stop early.
    #[serde(default)]
    pub stop: StopConditions,
    /// Who may download the finished consensus model.
    #[serde(default)]
    pub export: ExportPolicy,
}

/// Who may download a finished experiment's consensus model and its provenance
/// (`medmesh export`). Sites' per-round updates never leave the nodes, whatever this says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportPolicy {
    /// Whether a researcher's key may export it (default true). When false the consensus
    /// model stays with the sites: only node keys may download it.
    #[serde(default = "ExportPolicy::default_researchers")]
    pub researchers: bool,
}

impl ExportPolicy {
    fn default_researchers() -> bool {
        true
    }
}

impl Default for ExportPolicy {
    fn default() -> Self {
        Self { researchers: true }
    }
}

/// The segmentation task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Dataset name; each node's config maps it to local paths.
    pub dataset: String,
    /// Input height and width in pixels: of a 2D slice, or in-plane of a 3D patch.
    pub input_size: [u32; 2],
    /// `model.dims = 3` only (and required there): the 3D patch's extent in voxels across
    /// the slices of `plane`, i.e. along the plane's normal. A patch is `input_depth` planes
    /// of `input_size`.
    #[serde(default)]
    pub input_depth: Option<u32>,
    /// Image channels.
    pub channels: u32,
    /// Classes including background.
    pub classes: u32,
    /// Voxel spacing (millimetres along the patient's x, y, z after reorientation to RAS)
    /// that every site resamples its volumes to before slicing: images linearly, labels by
    /// nearest neighbour. Absent: volumes keep their own spacing.
    #[serde(default)]
    pub target_spacing: Option<[f64; 3]>,
    /// The anatomical plane 2D training slices lie in (for a 3D model: the plane of
    /// `input_size`, whose normal `input_depth` runs along). Volumes are read in RAS
    /// orientation, so this names the same plane at every site whatever their scanners stored.
    #[serde(default)]
    pub plane: Plane,
    /// How image intensities are normalized before training. Default: each case z-scored
    /// on its own. `medmesh experiment plan` derives it from the sites' fingerprints.
    #[serde(default)]
    pub intensity: Intensity,
}

/// Intensity normalization, per channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intensity {
    /// Which normalization.
    pub scheme: IntensityScheme,
    /// `ct` only: clip to these intensities (the consortium's foreground 0.5th and 99.5th
    /// percentiles), then subtract `mean` and divide by `std` (its foreground mean and
    /// standard deviation). The same numbers at every site and for every case.
    #[serde(default)]
    pub clip: Option<[f64; 2]>,
    /// `ct` only: the consortium's foreground mean intensity.
    #[serde(default)]
    pub mean: Option<f64>,
    /// `ct` only: the consortium's foreground standard deviation.
    #[serde(default)]
    pub std: Option<f64>,
}

/// An intensity normalization scheme (nnU-Net's two).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntensityScheme {
    /// Each case and channel on its own: clip to its 0.5th and 99.5th percentiles, subtract
    /// its mean, divide by its standard deviation. For MRI and other uncalibrated scales.
    #[default]
    ZScore,
    /// Calibrated intensities (CT's Hounsfield units): one fixed clip and scale for all.
    Ct,
}

impl Intensity {
    /// The CT clip range and scale, when this is the `ct` scheme with all its numbers.
    pub fn ct(&self) -> Option<([f64; 2], f64, f64)> {
        match (self.scheme, self.clip, self.mean, self.std) {
            (IntensityScheme::Ct, Some(clip), Some(mean), Some(std)) => Some((clip, mean, std)),
            _ => None,
        }
    }
}

/// An anatomical plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Plane {
    /// Perpendicular to the inferior-superior axis.
    #[default]
    Axial,
    /// Perpendicular to the posterior-anterior axis.
    Coronal,
    /// Perpendicular to the left-right axis.
    Sagittal,
}

impl Plane {
    /// The RAS array axis a slice in this plane is perpendicular to.
    pub fn axis(self) -> usize {
        match self {
            Plane::Sagittal => 0,
            Plane::Coronal => 1,
            Plane::Axial => 2,
        }
    }
}

/// Normalization layers of the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalization {
    /// Batch normalization.
    Batch,
    /// Group normalization.
    Group,
}

/// The UNet's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// 2 (a 2D UNet on slices, the default) or 3 (a 3D UNet on patches of
    /// `task.input_depth` x `task.input_size` voxels).
    #[serde(default = "ModelSpec::default_dims")]
    pub dims: u32,
    /// Resolution levels, 3 to 5.
    pub depth: u32,
    /// Channels at the first level, 8 to 64 (doubling per level).
    pub base_channels: u32,
    /// Normalization layers.
    pub normalization: Normalization,
}

impl ModelSpec {
    fn default_dims() -> u32 {
        2
    }
}

/// Optimizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// Adam.
    Adam,
    /// Adam with decoupled weight decay.
    Adamw,
}

/// Local training at each site, per round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Initial learning rate.
    pub learning_rate: f64,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Local epochs per round (exactly one of this and `local_steps`).
    #[serde(default)]
    pub local_epochs: Option<u32>,
    /// Local optimizer steps per round (exactly one of this and `local_epochs`).
    #[serde(default)]
    pub local_steps: Option<u32>,
    /// Seed for initialization, shuffling and augmentation.
    pub seed: u64,
    /// Weight decay (AdamW).
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// Gradient norm clipping.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// FedProx: the proximal term mu/2 * ||w - w_round_start||^2 added to the local loss,
    /// which holds a site's local steps near the model the round started from.
    #[serde(default)]
    pub proximal_mu: Option<f64>,
    /// Personalization: local fine-tuning steps each site takes on its own data after the
    /// federated rounds. The site reports both the consensus model's score and this one's.
    #[serde(default)]
    pub personalize_steps: Option<u32>,
    /// Stochastic weight averaging: a site's model after each of the last `swa_rounds`
    /// training rounds (after the round's exchange) is averaged, and the average goes into
    /// the final reduce instead of the last round's model (all rounds if it exceeds them).
    /// The pooled and local-only baselines average their last rounds the same way.
    #[serde(default)]
    pub swa_rounds: Option<u32>,
    /// nnU-Net-style augmentation of training slices, beyond the random horizontal flips
    /// that always apply. Absent: flips only.
    #[serde(default)]
    pub augmentation: Option<Augmentation>,
}

/// Random transforms of each training slice (never of validation slices). Each transform
/// that is set applies to a slice with `probability`, with its parameters drawn uniformly
/// from the given range; spatial ones move image and label together.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augmentation {
    /// Chance that each transform applies to a slice (nnU-Net uses 0.2; default 0.2).
    #[serde(default = "Augmentation::default_probability")]
    pub probability: f64,
    /// In-plane rotation by up to this many degrees either way.
    #[serde(default)]
    pub rotate_degrees: Option<f64>,
    /// Zoom by a factor in `[low, high]` (below 1 shrinks the anatomy).
    #[serde(default)]
    pub scale: Option<[f64; 2]>,
    /// Elastic deformation `[alpha, sigma]`, in pixels: a random displacement field smoothed
    /// by a Gaussian of `sigma` and scaled to `alpha`.
    #[serde(default)]
    pub elastic: Option<[f64; 2]>,
    /// Gamma curve with an exponent in `[low, high]` on intensities scaled to [0, 1]; the
    /// slice keeps its mean and standard deviation.
    #[serde(default)]
    pub gamma: Option<[f64; 2]>,
    /// Multiply intensities by a factor in `[low, high]`.
    #[serde(default)]
    pub brightness: Option<[f64; 2]>,
    /// Shift intensities by an offset in `[low, high]` (in normalized units).
    #[serde(default)]
    pub shift: Option<[f64; 2]>,
    /// Gaussian noise with a standard deviation drawn in `[0, this]` (normalized units).
    #[serde(default)]
    pub noise: Option<f64>,
    /// Gaussian blur with a sigma in `[low, high]` pixels.
    #[serde(default)]
    pub blur: Option<[f64; 2]>,
}

impl Augmentation {
    fn default_probability() -> f64 {
        0.2
    }

    /// Each set range with its name and bounds, for validation.
    fn ranges(&self) -> [(&'static str, Option<[f64; 2]>, f64, f64); 6] {
        [
            ("scale", self.scale, 0.25, 4.0),
            ("elastic", self.elastic, 0.0, 200.0),
            ("gamma", self.gamma, 0.1, 10.0),
            ("brightness", self.brightness, 0.1, 10.0),
            ("shift", self.shift, -10.0, 10.0),
            ("blur", self.blur, 0.0, 10.0),
        ]
    }
}

/// Averaging schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// Randomized pairwise gossip: each round, pairs of peers average.
    PairwiseGossip,
    /// Push-sum: (value, weight) shares pushed to peers; works on directed, asynchronous links.
    PushSum,
    /// Neighbour averaging with Metropolis-Hastings weights on a fixed graph (D-PSGD).
    MetropolisHastings,
    /// Epidemic push to `fanout` random peers per round.
    Epidemic,
    /// Random groups of `group_size` each round; every member takes its group's weighted
    /// mean (random group averaging, as in Moshpit SGD).
    GroupAverage,
}

impl Scheme {
    /// The name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PairwiseGossip => "pairwise-gossip",
            Self::PushSum => "push-sum",
            Self::MetropolisHastings => "metropolis-hastings",
            Self::Epidemic => "epidemic",
            Self::GroupAverage => "group-average",
        }
    }

    /// Whether the scheme takes `averaging.fanout` (peers per round): epidemic pushes to that
    /// many, metropolis-hastings averages over that many random matchings. The others talk
    /// to one peer a round.
    pub fn takes_fanout(self) -> bool {
        matches!(self, Self::Epidemic | Self::MetropolisHastings)
    }

    /// Whether received models combine by `averaging.aggregation`. Pairwise gossip and
    /// push-sum average by mass (that is what preserves the mean), so only `mean` applies.
    pub fn takes_aggregation(self) -> bool {
        self.takes_fanout() || self == Self::GroupAverage
    }

    /// Every scheme, in a fixed order.
    pub const ALL: [Scheme; 5] = [
        Self::PairwiseGossip,
        Self::PushSum,
        Self::MetropolisHastings,
        Self::Epidemic,
        Self::GroupAverage,
    ];
}

impl std::str::FromStr for Scheme {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown scheme {s:?}; one of {}", names.join(", "))
            })
    }
}

/// How received models are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Sample-weighted mean.
    Mean,
    /// Coordinate-wise median (robust to a minority of arbitrary models).
    Median,
    /// Coordinate-wise trimmed mean (drops `trim_fraction` at each end).
    TrimmedMean,
}

impl Aggregation {
    /// The name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Median => "median",
            Self::TrimmedMean => "trimmed-mean",
        }
    }
}

/// How sites combine their weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Averaging {
    /// The scheme.
    pub scheme: Scheme,
    /// Peers per round: `epidemic` pushes to this many (required there);
    /// `metropolis-hastings` averages over the union of this many random matchings
    /// (default 2). Refused by the schemes that talk to one peer a round.
    #[serde(default)]
    pub fanout: Option<u32>,
    /// Members of each round's groups under `group-average` (default 4; 2 to 64). Refused
    /// by the other schemes.
    #[serde(default)]
    pub group_size: Option<u32>,
    /// Communication rounds.
    pub rounds: u32,
    /// Seconds to wait for peers each round before going on without them.
    pub round_timeout_secs: u32,
    /// Neighbours of a training round (the round engine's graph) that must be reachable
    /// before a site trains it: it waits up to `round_timeout_secs` for them, then trains
    /// anyway and counts the round in `medmesh_rounds_short_of_peers_total`. At most the
    /// scheme's peers a round (1, or the fanout); a round that gives a site fewer neighbours
    /// waits for all of them. 0: never wait.
    pub min_peers: u32,
    /// Combination rule.
    pub aggregation: Aggregation,
    /// Fraction trimmed at each end for `trimmed-mean`, in `[0, 0.5)`.
    #[serde(default)]
    pub trim_fraction: Option<f64>,
    /// Keep normalization layers' parameters and statistics local (FedBN).
    #[serde(default)]
    pub keep_normalization_local: bool,
    /// Payload encoding on the wire.
    #[serde(default)]
    pub encoding: WeightEncoding,
    /// Secure aggregation inside `group-average` groups ([`crate::secagg`]): a site's upload
    /// is masked so that only its group's sum is revealed. Needs groups of at least 3, the
    /// mean, no `clip_norm` or `norm_bound` (they inspect single updates) and the f32
    /// encoding (uploads are 8-byte residues); there is no final exact reduce.
    #[serde(default)]
    pub secure_aggregation: bool,
    /// Refuse updates whose distance to the local model exceeds this L2 norm.
    #[serde(default)]
    pub norm_bound: Option<f64>,
    /// Clip each received model's distance to the local model to this L2 norm before
    /// combining (centred clipping): one peer moves the model at most this far per round.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// The most training samples a site may count in the weighted mean (default
    /// [`DEFAULT_MAX_SAMPLE_WEIGHT`]). A site with more counts this many; an update that
    /// claims more than the bound allows is refused. Set it near the largest site's count:
    /// a member that inflates its count then weighs at most this much.
    #[serde(default)]
    pub max_sample_weight: Option<u64>,
}

/// The sample-weight bound of a manifest that sets none.
pub const DEFAULT_MAX_SAMPLE_WEIGHT: u64 = 100_000;

/// Optional protection of what leaves a site.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// Clip the L2 norm of each sent update (relative to the round's starting model).
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Gaussian noise standard deviation as a multiple of `clip_norm` (needs `clip_norm`).
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// The most epsilon a site's releases may spend on this experiment, at `delta` (needs
    /// noise): a manifest whose rounds would spend more is refused, and a site that has spent
    /// it publishes nothing new ([`crate::accounting::Budget`]).
    #[serde(default)]
    pub target_epsilon: Option<f64>,
    /// The delta of the (epsilon, delta) guarantee (needs noise; [`DEFAULT_DELTA`] if unset).
    #[serde(default)]
    pub delta: Option<f64>,
}

/// The delta of a manifest with privacy noise that sets none.
pub const DEFAULT_DELTA: f64 = 1e-5;

/// Validation metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Mean Dice over foreground classes.
    #[default]
    Dice,
    /// Mean intersection over union over foreground classes.
    Iou,
}

impl Metric {
    /// The manifest's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Dice => "dice",
            Metric::Iou => "iou",
        }
    }
}

/// How sites measure progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// Fraction of each site's cases held out for validation, in `(0, 1)`.
    pub validation_fraction: f64,
    /// The metric reported in progress records.
    #[serde(default)]
    pub metric: Metric,
}

impl Default for Evaluation {
    fn default() -> Self {
        Self {
            validation_fraction: 0.2,
            metric: Metric::Dice,
        }
    }
}

/// Early stopping. Without any, the experiment runs `averaging.rounds` rounds. In a
/// federated run the first site that meets a rule ends training for every site, a couple of
/// rounds later (see [`crate::stop`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopConditions {
    /// Stop once a site's validation metric (`evaluation.metric`) reaches this value.
    #[serde(default)]
    pub target_metric: Option<f64>,
    /// Stop after this many rounds without a better validation metric at a site.
    #[serde(default)]
    pub patience_rounds: Option<u32>,
    /// Stop after this many minutes of wall-clock time (counted by each site from the moment
    /// it started the experiment; `train-local`: from its start).
    #[serde(default)]
    pub max_minutes: Option<u32>,
}

/// One bad field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `training.learning_rate`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not valid TOML/JSON, a missing field, an unknown field, or a wrong type.
    #[error("manifest could not be parsed: {0}")]
    Syntax(String),
    /// Parsed, but fields have invalid values. Lists every one.
    #[error("manifest has {} invalid field(s): {}", .0.len(), join(.0))]
    Invalid(Vec<FieldError>),
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a signed manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestVerifyError {
    /// For another consortium.
    #[error("manifest is for consortium {manifest:?}, this roster is {roster:?}")]
    ConsortiumMismatch {
        /// The manifest's consortium.
        manifest: String,
        /// The roster's consortium.
        roster: String,
    },
    /// The signer may not submit experiments.
    #[error("manifest signer not allowed: {0}")]
    Signer(MembershipError),
    /// The signature does not verify (tampered, forged, or made for another kind of object).
    #[error("manifest signature rejected: {0}")]
    Signature(SignatureError),
    /// Signed correctly, but the fields are invalid.
    #[error("{0}")]
    Manifest(ManifestError),
}

impl From<MembershipError> for ManifestVerifyError {
    fn from(e: MembershipError) -> Self {
        Self::Signer(e)
    }
}

impl From<SignatureError> for ManifestVerifyError {
    fn from(e: SignatureError) -> Self {
        Self::Signature(e)
    }
}

impl From<ManifestError> for ManifestVerifyError {
    fn from(e: ManifestError) -> Self {
        Self::Manifest(e)
    }
}

impl Manifest {
    /// Parses TOML and validates.
    pub fn from_toml(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses JSON and validates.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses JSON if the text starts with `{`, TOML otherwise.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        if text.trim_start().starts_with('{') {
            Self::from_json(text)
        } else {
            Self::from_toml(text)
        }
    }

    /// Renders TOML (as a researcher would write it).
    pub fn to_toml(&self) -> String {
        toml::to_string(self)
            .unwrap_or_else(|e| unreachable!("a manifest always renders as TOML: {e}"))
    }

    /// The bytes a researcher signs: bincode (standard config) of the parsed manifest, so
    /// formatting, comments and TOML-vs-JSON do not change the signature.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .unwrap_or_else(|e| unreachable!("encoding a manifest into memory cannot fail: {e}"))
    }

    /// BLAKE3 of the canonical bytes: names this exact experiment in envelopes and records.
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.canonical_bytes()).as_bytes()
    }

    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, reason: String| {
            errors.push(FieldError {
                field: field.to_owned(),
                reason,
            })
        };

        if !valid_id(&self.id) {
            bad(
                "id",
                format!(
                    "{:?} must be 1-64 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit",
                    self.id
                ),
            );
        }
        if self.title.trim().is_empty() || self.title.len() > 200 {
            bad("title", "must be 1-200 characters".into());
        }
        if self.consortium.is_empty() {
            bad("consortium", "must not be empty".into());
        }

        let t = &self.task;
        if t.dataset.trim().is_empty() {
            bad("task.dataset", "must name a dataset".into());
        }
        let levels = self.model.depth.clamp(3, 5);
        let divisor = 1u32 << (levels - 1);
        for (i, side) in t.input_size.iter().enumerate() {
            if !(16..=1024).contains(side) {
                bad(
                    "task.input_size",
                    format!("side {i} is {side}, must be 16 to 1024"),
                );
            } else if side % divisor != 0 {
                bad(
                    "task.input_size",
                    format!(
                        "side {i} is {side}, must be divisible by {divisor} for a depth-{levels} UNet"
                    ),
                );
            }
        }
        match (self.model.dims, t.input_depth) {
            (2, None) => {}
            (2, Some(_)) => bad(
                "task.input_depth",
                "is the depth of a 3D patch; set model.dims = 3 or remove it".into(),
            ),
            (3, None) => bad(
                "task.input_depth",
                "model.dims = 3 needs the patch depth across the plane's slices".into(),
            ),
            (3, Some(d)) if !(8..=512).contains(&d) => {
                bad("task.input_depth", format!("{d} must be 8 to 512"))
            }
            (3, Some(d)) if d % divisor != 0 => bad(
                "task.input_depth",
                format!("{d} must be divisible by {divisor} for a depth-{levels} UNet"),
            ),
            (3, Some(_)) => {}
            (dims, _) => bad("model.dims", format!("{dims} must be 2 or 3")),
        }
        if !(1..=16).contains(&t.channels) {
            bad("task.channels", format!("{} must be 1 to 16", t.channels));
        }
        if let Some(s) = t.target_spacing
            && s.iter()
                .any(|v| !(v.is_finite() && (0.01..=100.0).contains(v)))
        {
            bad(
                "task.target_spacing",
                format!("{s:?}: each spacing must be 0.01 to 100 mm"),
            );
        }
        let i = &t.intensity;
        match i.scheme {
            IntensityScheme::ZScore => {
                for (name, set) in [
                    ("clip", i.clip.is_some()),
                    ("mean", i.mean.is_some()),
                    ("std", i.std.is_some()),
                ] {
                    if set {
                        bad(
                            "task.intensity",
                            format!("{name} is for the ct scheme; z-score computes its own"),
                        );
                    }
                }
            }
            IntensityScheme::Ct => match i.ct() {
                None => bad(
                    "task.intensity",
                    "the ct scheme needs clip, mean and std (medmesh experiment plan derives them)"
                        .into(),
                ),
                Some(([lo, hi], mean, std)) => {
                    if ![lo, hi, mean, std].iter().all(|v| v.is_finite()) || lo >= hi {
                        bad(
                            "task.intensity",
                            format!("clip {:?} must be two finite values, low first", [lo, hi]),
                        );
                    }
                    if !(std.is_finite() && std > 0.0) {
                        bad("task.intensity", format!("std {std} must be above 0"));
                    }
                }
            },
        }
        if !(2..=32).contains(&t.classes) {
            bad(
                "task.classes",
                format!("{} must be 2 to 32 (background included)", t.classes),
            );
        }

        if !(3..=5).contains(&self.model.depth) {
            bad(
                "model.depth",
                format!("{} must be 3 to 5", self.model.depth),
            );
        }
        if !(8..=64).contains(&self.model.base_channels) {
            bad(
                "model.base_channels",
                format!("{} must be 8 to 64", self.model.base_channels),
            );
        }

        let tr = &self.training;
        if !(tr.learning_rate.is_finite() && tr.learning_rate > 0.0 && tr.learning_rate <= 1.0) {
            bad(
                "training.learning_rate",
                format!("{} must be in (0, 1]", tr.learning_rate),
            );
        }
        if !(1..=1024).contains(&tr.batch_size) {
            bad(
                "training.batch_size",
                format!("{} must be 1 to 1024", tr.batch_size),
            );
        }
        match (tr.local_epochs, tr.local_steps) {
            (Some(_), Some(_)) => bad(
                "training.local_epochs",
                "give either local_epochs or local_steps, not both".into(),
            ),
            (None, None) => bad(
                "training.local_epochs",
                "give one of local_epochs or local_steps".into(),
            ),
            (Some(0), None) => bad("training.local_epochs", "must be at least 1".into()),
            (None, Some(0)) => bad("training.local_steps", "must be at least 1".into()),
            _ => {}
        }
        if let Some(wd) = tr.weight_decay
            && !(wd.is_finite() && (0.0..1.0).contains(&wd))
        {
            bad("training.weight_decay", format!("{wd} must be in [0, 1)"));
        }
        if let Some(c) = tr.grad_clip
            && !(c.is_finite() && c > 0.0)
        {
            bad(
                "training.grad_clip",
                format!("{c} must be a positive number"),
            );
        }
        if let Some(mu) = tr.proximal_mu
            && !(mu.is_finite() && mu > 0.0 && mu <= 100.0)
        {
            bad("training.proximal_mu", format!("{mu} must be in (0, 100]"));
        }
        if let Some(k) = tr.swa_rounds
            && !(1..=100_000).contains(&k)
        {
            bad("training.swa_rounds", format!("{k} must be 1 to 100000"));
        }
        if let Some(s) = tr.personalize_steps
            && !(1..=100_000).contains(&s)
        {
            bad(
                "training.personalize_steps",
                format!("{s} must be 1 to 100000"),
            );
        }

        if let Some(a) = &tr.augmentation {
            let field = |name: &str| format!("training.augmentation.{name}");
            if !(a.probability.is_finite() && a.probability > 0.0 && a.probability <= 1.0) {
                bad(
                    &field("probability"),
                    format!("{} must be in (0, 1]", a.probability),
                );
            }
            if let Some(r) = a.rotate_degrees
                && !(r.is_finite() && (0.0..=180.0).contains(&r))
            {
                bad(&field("rotate_degrees"), format!("{r} must be 0 to 180"));
            }
            if let Some(n) = a.noise
                && !(n.is_finite() && (0.0..=10.0).contains(&n))
            {
                bad(&field("noise"), format!("{n} must be 0 to 10"));
            }
            for (name, range, lo, hi) in a.ranges() {
                if let Some([a, b]) = range
                    && !(a.is_finite() && b.is_finite() && lo <= a && a <= b && b <= hi)
                {
                    bad(
                        &field(name),
                        format!("[{a}, {b}] must be ascending within [{lo}, {hi}]"),
                    );
                }
            }
            if let Some([_, sigma]) = a.elastic
                && sigma < 1.0
            {
                bad(
                    &field("elastic"),
                    format!("sigma {sigma} must be at least 1 pixel"),
                );
            }
            let none = a.rotate_degrees.is_none()
                && a.noise.is_none()
                && a.ranges().iter().all(|r| r.1.is_none());
            if none {
                bad(
                    "training.augmentation",
                    "names no transform (rotate_degrees, scale, elastic, gamma, brightness, \
                     shift, noise, blur)"
                        .into(),
                );
            }
        }

        let av = &self.averaging;
        match (av.scheme, av.fanout) {
            (Scheme::Epidemic, None) => bad(
                "averaging.fanout",
                "the epidemic scheme needs a fanout".into(),
            ),
            (s, Some(f)) if s.takes_fanout() && !(1..=64).contains(&f) => {
                bad("averaging.fanout", format!("{f} must be 1 to 64"))
            }
            (s, Some(_)) if !s.takes_fanout() => bad(
                "averaging.fanout",
                format!(
                    "{} talks to one peer a round; only epidemic (pushes) and metropolis-hastings (random matchings) take a fanout",
                    s.as_str()
                ),
            ),
            _ => {}
        }
        if av.encoding == WeightEncoding::Masked {
            bad(
                "averaging.encoding",
                "\"masked\" is what averaging.secure_aggregation sends; choose f32, f16 or int8"
                    .into(),
            );
        }
        if av.secure_aggregation {
            let k = av
                .group_size
                .unwrap_or(crate::round::DEFAULT_GROUP_SIZE as u32);
            let why = if av.scheme != Scheme::GroupAverage {
                Some(format!(
                    "masks cancel in a group's sum; {} forms no groups (use group-average)",
                    av.scheme.as_str()
                ))
            } else if (k as usize) < crate::secagg::MIN_GROUP {
                Some(format!(
                    "groups of {k} hide nothing (each learns the other from the sum); set averaging.group_size to at least {}",
                    crate::secagg::MIN_GROUP
                ))
            } else if av.aggregation != Aggregation::Mean {
                Some("only the group's sum is revealed, so only \"mean\" applies".into())
            } else if av.clip_norm.is_some() || av.norm_bound.is_some() {
                Some(
                    "averaging.clip_norm and norm_bound inspect each update, which masking hides"
                        .into(),
                )
            } else if av.encoding != WeightEncoding::F32 {
                Some("uploads are 8-byte residues; leave averaging.encoding at f32".into())
            } else {
                None
            };
            if let Some(why) = why {
                bad("averaging.secure_aggregation", why);
            }
        }
        match (av.scheme, av.group_size) {
            (Scheme::GroupAverage, Some(k)) if !(2..=64).contains(&k) => {
                bad("averaging.group_size", format!("{k} must be 2 to 64"))
            }
            (s, Some(_)) if s != Scheme::GroupAverage => bad(
                "averaging.group_size",
                format!("only group-average forms groups, not {}", s.as_str()),
            ),
            _ => {}
        }
        if !(1..=10_000).contains(&av.rounds) {
            bad(
                "averaging.rounds",
                format!("{} must be 1 to 10000", av.rounds),
            );
        }
        if !(1..=86_400).contains(&av.round_timeout_secs) {
            bad(
                "averaging.round_timeout_secs",
                format!("{} must be 1 to 86400", av.round_timeout_secs),
            );
        }
        let peers_a_round = match av.scheme {
            Scheme::MetropolisHastings => av
                .fanout
                .unwrap_or(crate::round::DEFAULT_MIXING_DEGREE as u32),
            Scheme::Epidemic => av.fanout.unwrap_or(1),
            Scheme::GroupAverage => av
                .group_size
                .unwrap_or(crate::round::DEFAULT_GROUP_SIZE as u32)
                .saturating_sub(1),
            Scheme::PairwiseGossip | Scheme::PushSum => 1,
        };
        if av.min_peers > peers_a_round {
            bad(
                "averaging.min_peers",
                format!(
                    "{} exchanges with at most {peers_a_round} peer(s) a round (its fanout); min_peers {} can never be met",
                    av.scheme.as_str(),
                    av.min_peers
                ),
            );
        }
        if !av.scheme.takes_aggregation() && av.aggregation != Aggregation::Mean {
            bad(
                "averaging.aggregation",
                format!(
                    "{} averages two models by their weights; only \"mean\" applies (robust rules need metropolis-hastings, epidemic or group-average)",
                    av.scheme.as_str()
                ),
            );
        }
        match (av.aggregation, av.trim_fraction) {
            (Aggregation::TrimmedMean, None) => bad(
                "averaging.trim_fraction",
                "trimmed-mean needs a trim_fraction".into(),
            ),
            (Aggregation::TrimmedMean, Some(f)) if !(f.is_finite() && (0.0..0.5).contains(&f)) => {
                bad(
                    "averaging.trim_fraction",
                    format!("{f} must be in [0, 0.5)"),
                )
            }
            (a, Some(_)) if a != Aggregation::TrimmedMean => bad(
                "averaging.trim_fraction",
                "only trimmed-mean takes a trim_fraction".into(),
            ),
            _ => {}
        }
        if let Some(b) = av.norm_bound
            && !(b.is_finite() && b > 0.0)
        {
            bad(
                "averaging.norm_bound",
                format!("{b} must be a positive number"),
            );
        }
        if av.max_sample_weight == Some(0) {
            bad("averaging.max_sample_weight", "0 must be at least 1".into());
        }
        if let Some(c) = av.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            bad(
                "averaging.clip_norm",
                format!("{c} must be a positive number"),
            );
        }

        let p = &self.privacy;
        if let Some(c) = p.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            bad(
                "privacy.clip_norm",
                format!("{c} must be a positive number"),
            );
        }
        match (p.noise_multiplier, p.clip_norm) {
            (Some(_), None) => bad(
                "privacy.noise_multiplier",
                "noise needs privacy.clip_norm to scale it".into(),
            ),
            (Some(m), Some(_)) if !(m.is_finite() && m >= 0.0) => bad(
                "privacy.noise_multiplier",
                format!("{m} must be a non-negative number"),
            ),
            _ => {}
        }
        let noisy = p.noise_multiplier.is_some_and(|z| z > 0.0);
        if let Some(d) = p.delta {
            if !(d > 0.0 && d < 1.0) {
                bad("privacy.delta", format!("{d} must be in (0, 1)"));
            } else if !noisy {
                bad(
                    "privacy.delta",
                    "a guarantee needs privacy.noise_multiplier above 0".into(),
                );
            }
        }
        if let Some(t) = p.target_epsilon {
            if !(t.is_finite() && t > 0.0) {
                bad(
                    "privacy.target_epsilon",
                    format!("{t} must be a positive number"),
                );
            } else if !noisy {
                bad(
                    "privacy.target_epsilon",
                    "a budget needs privacy.noise_multiplier above 0".into(),
                );
            } else if let Some(budget) = crate::accounting::Budget::for_manifest(self)
                && budget.delta > 0.0
                && budget.delta < 1.0
            {
                let rounds = u64::from(self.averaging.rounds);
                let planned = budget.spent(rounds);
                if planned > t {
                    bad(
                        "privacy.target_epsilon",
                        format!(
                            "{rounds} rounds at noise multiplier {} spend epsilon {planned:.3} at delta {}, over the target {t}: at most {} rounds fit, or raise the noise multiplier",
                            budget.noise_multiplier,
                            budget.delta,
                            budget.max_releases().unwrap_or(0)
                        ),
                    );
                }
            }
        }

        let v = self.evaluation.validation_fraction;
        if !(v.is_finite() && v > 0.0 && v < 1.0) {
            bad(
                "evaluation.validation_fraction",
                format!("{v} must be in (0, 1)"),
            );
        }

        let s = &self.stop;
        if let Some(m) = s.target_metric
            && !(m.is_finite() && m > 0.0 && m <= 1.0)
        {
            bad("stop.target_metric", format!("{m} must be in (0, 1]"));
        }
        if s.patience_rounds == Some(0) {
            bad("stop.patience_rounds", "must be at least 1".into());
        }
        if s.max_minutes == Some(0) {
            bad("stop.max_minutes", "must be at least 1".into());
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(ManifestError::Invalid(errors))
        }
    }
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// A manifest with its researcher's signature: what travels and what nodes persist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// The researcher who signed.
    pub signer: PublicKey,
    /// Signature in [`Domain::Manifest`] over [`Manifest::canonical_bytes`].
    pub signature: Signature,
}

impl SignedManifest {
    /// Signs `manifest` as `researcher`.
    pub fn sign(manifest: Manifest, researcher: &Identity) -> Self {
        let signature = researcher.sign(Domain::Manifest, &manifest.canonical_bytes());
        Self {
            manifest,
            signer: researcher.public_key(),
            signature,
        }
    }

    /// Checks consortium, signer's membership and role, signature, and fields, in that order.
    pub fn verify(&self, roster: &Roster) -> Result<&Manifest, ManifestVerifyError> {
        if self.manifest.consortium != roster.consortium {
            return Err(ManifestVerifyError::ConsortiumMismatch {
                manifest: self.manifest.consortium.clone(),
                roster: roster.consortium.clone(),
            });
        }
        roster.authorize(&self.signer, Role::Researcher)?;
        self.signer.verify(
            Domain::Manifest,
            &self.manifest.canonical_bytes(),
            &self.signature,
        )?;
        self.manifest.validate()?;
        Ok(&self.manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_crypto::{Member, Roster};
    use proptest::prelude::*;

    const QUICKSTART: &str = include_str!("../../examples/synthetic-quickstart.toml");
    const BRAIN: &str = include_str!("../../examples/brain-extraction.toml");
    const ROBUST: &str = include_str!("../../examples/robust-median.json");
    const SKEWED: &str = include_str!("../../examples/synthetic-skewed.toml");
    const THREE_D: &str = include_str!("../../examples/lesions-3d.toml");

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    fn roster() -> Roster {
        let mut r = Roster::genesis("demo", vec![id(1).public_key()], 1);
        for (n, role) in [
            (10, Role::Node),
            (20, Role::Researcher),
            (21, Role::Researcher),
        ] {
            r.upsert_member(Member {
                public_key: id(n).public_key(),
                role,
                site: format!("site-{n}"),
            });
        }
        r.revoke(id(21).public_key(), "left the project");
        r
    }

    #[test]
    fn shipped_examples_are_valid() {
        for text in [QUICKSTART, BRAIN, ROBUST, SKEWED, THREE_D] {
            let m = Manifest::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(Manifest::from_toml(&m.to_toml()).unwrap(), m);
        }
    }

    #[test]
    fn every_bad_field_is_reported() {
        let mut m = Manifest::parse(QUICKSTART).unwrap();
        m.id = "Bad Id".into();
        m.training.learning_rate = f64::NAN;
        m.training.local_steps = Some(5);
        m.model.depth = 9;
        m.averaging.scheme = Scheme::Epidemic;
        m.averaging.min_peers = 2;
        m.privacy.noise_multiplier = Some(1.0);
        m.averaging.max_sample_weight = Some(0);
        m.training.swa_rounds = Some(0);
        let Err(ManifestError::Invalid(errors)) = m.validate() else {
            panic!("accepted")
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "id",
            "training.learning_rate",
            "training.local_epochs",
            "model.depth",
            "averaging.fanout",
            "averaging.min_peers",
            "privacy.noise_multiplier",
            "averaging.max_sample_weight",
            "training.swa_rounds",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    /// `model.dims` and `task.input_depth` come together: a 3D model needs a patch depth the
    /// UNet divides, a 2D one refuses it, and nothing but 2 or 3 is a dimension.
    #[test]
    fn a_3d_model_takes_exactly_a_patch_depth() {
        let mut m = Manifest::parse(QUICKSTART).unwrap();
        assert_eq!((m.model.dims, m.task.input_depth), (2, None));
        let fields = |m: &Manifest| match m.validate() {
            Ok(()) => Vec::new(),
            Err(ManifestError::Invalid(e)) => e.into_iter().map(|e| e.field).collect(),
            Err(e) => panic!("{e}"),
        };
        m.task.input_depth = Some(16);
        assert_eq!(fields(&m), ["task.input_depth"]);
        m.model.dims = 3;
        assert_eq!(fields(&m), Vec::<String>::new());
        assert_eq!(Manifest::from_toml(&m.to_toml()).unwrap(), m);
        m.task.input_depth = Some(18);
        assert_eq!(fields(&m), ["task.input_depth"]);
        m.task.input_depth = None;
        assert_eq!(fields(&m), ["task.input_depth"]);
        m.model.dims = 4;
        assert_eq!(fields(&m), ["model.dims"]);
    }

    /// `task.intensity`: CT needs all its numbers, z-score takes none, and TOML round-trips.
    #[test]
    fn intensity_schemes_take_exactly_their_fields() {
        let ct = QUICKSTART.replace(
            "classes = 2 ",
            "classes = 2\nintensity = { scheme = \"ct\", clip = [-100.0, 300.0], mean = 40.0, std = 60.0 } ",
        );
        let m = Manifest::parse(&ct).unwrap();
        assert_eq!(m.task.intensity.ct(), Some(([-100.0, 300.0], 40.0, 60.0)));
        assert_eq!(Manifest::from_toml(&m.to_toml()).unwrap(), m);
        for (bad, why) in [
            (
                r#"{ scheme = "ct", clip = [-100.0, 300.0] }"#,
                "needs clip, mean and std",
            ),
            (
                r#"{ scheme = "ct", clip = [300.0, -100.0], mean = 1.0, std = 1.0 }"#,
                "low first",
            ),
            (
                r#"{ scheme = "ct", clip = [0.0, 1.0], mean = 1.0, std = 0.0 }"#,
                "above 0",
            ),
            (
                r#"{ scheme = "z-score", mean = 1.0 }"#,
                "mean is for the ct scheme",
            ),
        ] {
            let text =
                QUICKSTART.replace("classes = 2 ", &format!("classes = 2\nintensity = {bad} "));
            let err = Manifest::parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("task.intensity") && err.contains(why),
                "{bad}: {err}"
            );
        }
        let typo = QUICKSTART.replace(
            "classes = 2 ",
            "classes = 2\nintensity = { scheme = \"ct\", slope = 1.0 } ",
        );
        assert!(
            Manifest::parse(&typo)
                .unwrap_err()
                .to_string()
                .contains("slope")
        );
    }

    /// `training.augmentation`: each transform's range is checked and named; an empty table
    /// and unknown transforms are refused.
    #[test]
    fn augmentation_fields_are_checked_by_name() {
        let with = |table: &str| {
            QUICKSTART.replace("seed = 7\n", &format!("seed = 7\naugmentation = {table}\n"))
        };
        let m = Manifest::parse(&with(
            "{ rotate_degrees = 35.0, scale = [0.7, 1.3], gamma = [0.6, 2.0], noise = 0.32 }",
        ))
        .unwrap();
        let a = m.training.augmentation.unwrap();
        assert_eq!((a.probability, a.rotate_degrees), (0.2, Some(35.0)));
        assert_eq!(Manifest::from_toml(&m.to_toml()).unwrap(), m);
        for (bad, field) in [
            ("{ scale = [1.3, 0.7] }", "training.augmentation.scale"),
            ("{ gamma = [0.0, 2.0] }", "training.augmentation.gamma"),
            (
                "{ rotate_degrees = 400.0 }",
                "training.augmentation.rotate_degrees",
            ),
            ("{ noise = -1.0 }", "training.augmentation.noise"),
            ("{ elastic = [10.0, 0.5] }", "training.augmentation.elastic"),
            (
                "{ probability = 0.0, noise = 0.1 }",
                "training.augmentation.probability",
            ),
            ("{ probability = 0.5 }", "training.augmentation"),
        ] {
            let err = Manifest::parse(&with(bad)).unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
        let err = Manifest::parse(&with("{ mirror = true }"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mirror"), "{err}");
    }

    #[test]
    fn min_peers_is_at_most_the_peers_of_a_round() {
        let mut m = Manifest::parse(QUICKSTART).unwrap();
        m.averaging.scheme = Scheme::PairwiseGossip;
        m.averaging.min_peers = 1;
        assert!(m.validate().is_ok());
        m.averaging.min_peers = 2;
        let err = m.validate().unwrap_err().to_string();
        assert!(
            err.contains("averaging.min_peers") && err.contains("at most 1"),
            "{err}"
        );
        m.averaging.scheme = Scheme::MetropolisHastings;
        assert!(m.validate().is_ok(), "two matchings a round by default");
        m.averaging.fanout = Some(1);
        assert!(m.validate().is_err());
    }

    #[test]
    fn secure_aggregation_and_groups_are_refused_where_they_cannot_work() {
        let mut m = Manifest::parse(QUICKSTART).unwrap();
        m.averaging.scheme = Scheme::GroupAverage;
        m.averaging.fanout = None;
        m.averaging.min_peers = 1;
        m.averaging.secure_aggregation = true;
        m.validate().unwrap();
        assert!(!crate::round::RoundRules::from_manifest(&m).final_reduce);
        let refused = |m: &Manifest, field: &str, words: &str| {
            let e = m.validate().unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(words), "{e}");
        };
        let mut x = m.clone();
        x.averaging.group_size = Some(2);
        refused(&x, "averaging.secure_aggregation", "hide nothing");
        let mut x = m.clone();
        x.averaging.aggregation = Aggregation::Median;
        refused(&x, "averaging.secure_aggregation", "mean");
        let mut x = m.clone();
        x.averaging.norm_bound = Some(10.0);
        refused(&x, "averaging.secure_aggregation", "masking hides");
        let mut x = m.clone();
        x.averaging.encoding = WeightEncoding::F16;
        refused(&x, "averaging.secure_aggregation", "f32");
        let mut x = m.clone();
        x.averaging.scheme = Scheme::PairwiseGossip;
        x.averaging.group_size = None;
        refused(&x, "averaging.secure_aggregation", "forms no groups");
        // Groups only where the scheme forms them; the masked encoding is not a choice.
        let mut x = m.clone();
        x.averaging.secure_aggregation = false;
        x.averaging.scheme = Scheme::MetropolisHastings;
        x.averaging.group_size = Some(4);
        refused(&x, "averaging.group_size", "only group-average");
        let mut x = m.clone();
        x.averaging.secure_aggregation = false;
        x.averaging.encoding = WeightEncoding::Masked;
        refused(&x, "averaging.encoding", "masked");
        let mut x = m;
        x.averaging.group_size = Some(65);
        refused(&x, "averaging.group_size", "2 to 64");
    }

    #[test]
    fn typos_and_bad_syntax_are_syntax_errors() {
        let typo = QUICKSTART.replace("batch_size", "batch_sise");
        let err = Manifest::from_toml(&typo).unwrap_err();
        assert!(
            matches!(&err, ManifestError::Syntax(s) if s.contains("batch_sise")),
            "{err}"
        );
        assert!(matches!(
            Manifest::parse("{ not json"),
            Err(ManifestError::Syntax(_))
        ));
    }

    #[test]
    fn canonical_bytes_ignore_formatting() {
        let m = Manifest::parse(QUICKSTART).unwrap();
        let json = serde_json::to_string_pretty(&m).unwrap();
        assert_eq!(Manifest::from_json(&json).unwrap().digest(), m.digest());
    }

    #[test]
    fn each_refusal_has_its_own_error() {
        let m = Manifest::parse(QUICKSTART).unwrap();
        let roster = roster();
        let good = SignedManifest::sign(m.clone(), &id(20));
        assert!(good.verify(&roster).is_ok());

        let mut tampered = good.clone();
        tampered.manifest.averaging.rounds += 1;
        assert!(matches!(
            tampered.verify(&roster),
            Err(ManifestVerifyError::Signature(
                SignatureError::Invalid { .. }
            ))
        ));

        let outsider = SignedManifest::sign(m.clone(), &id(99));
        assert!(matches!(
            outsider.verify(&roster),
            Err(ManifestVerifyError::Signer(MembershipError::NotAMember(_)))
        ));

        let by_node = SignedManifest::sign(m.clone(), &id(10));
        assert!(matches!(
            by_node.verify(&roster),
            Err(ManifestVerifyError::Signer(
                MembershipError::WrongRole { .. }
            ))
        ));

        let by_revoked = SignedManifest::sign(m.clone(), &id(21));
        assert!(matches!(
            by_revoked.verify(&roster),
            Err(ManifestVerifyError::Signer(MembershipError::Revoked { .. }))
        ));

        let other_domain = SignedManifest {
            signature: id(20).sign(Domain::ProgressRecord, &m.canonical_bytes()),
            ..good.clone()
        };
        assert!(matches!(
            other_domain.verify(&roster),
            Err(ManifestVerifyError::Signature(
                SignatureError::WrongDomain {
                    actual: Domain::ProgressRecord,
                    ..
                }
            ))
        ));

        let mut foreign = m.clone();
        foreign.consortium = "other".into();
        let foreign = SignedManifest::sign(foreign, &id(20));
        assert!(matches!(
            foreign.verify(&roster),
            Err(ManifestVerifyError::ConsortiumMismatch { .. })
        ));
    }

    proptest! {
        #[test]
        fn manifests_round_trip(rounds in 1u32..10_000, lr_mantissa in 1u32..10_000, lr_exp in 4i32..9, seed in any::<u64>(), steps in 1u32..1000, fanout in 1u32..64) {
            let mut m = Manifest::parse(QUICKSTART).unwrap();
            m.averaging.rounds = rounds;
            m.averaging.scheme = Scheme::Epidemic;
            m.averaging.fanout = Some(fanout);
            // Learning rates as researchers write them (TOML floats are decimal text).
            m.training.learning_rate = format!("{lr_mantissa}e-{lr_exp}").parse().unwrap();
            m.training.seed = seed;
            m.training.local_epochs = None;
            m.training.local_steps = Some(steps);
            prop_assert!(m.validate().is_ok());
            prop_assert_eq!(&Manifest::from_toml(&m.to_toml()).unwrap(), &m);
            prop_assert_eq!(&Manifest::from_json(&serde_json::to_string(&m).unwrap()).unwrap(), &m);
            let signed = SignedManifest::sign(m, &id(20));
            let cfg = bincode::config::standard().with_limit::<{ 1 << 16 }>();
            let bytes = bincode::serde::encode_to_vec(&signed, cfg).unwrap();
            let (back, _): (SignedManifest, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert!(back.verify(&roster()).is_ok());
        }

        #[test]
        fn manifest_parser_never_panics(text in ".{0,400}") {
            let _ = Manifest::parse(&text);
        }
    }
}
