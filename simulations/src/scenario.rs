//! Scenario files: what to simulate. TOML, unknown keys refused, every value checked with the
//! offending key named. See `simulations/scenarios/*.toml` for commented examples.

use medmesh_protocol::manifest::{Aggregation, Scheme};
use serde::{Deserialize, Serialize};

/// A whole scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (used in file names).
    pub name: String,
    /// What the scenario asks.
    #[serde(default)]
    pub description: String,
    /// Seed of everything random: the same scenario and seed give the same report.
    #[serde(default)]
    pub seed: u64,
    /// `consensus` (random vectors, no training) or `learning` (real UNet training).
    pub mode: Mode,
    /// Sites.
    pub nodes: usize,
    /// Communication rounds.
    pub rounds: u32,
    /// Schemes compared, each run on the same sites.
    pub schemes: Vec<Method>,
    /// Aggregation rules compared (each scheme runs once per rule).
    #[serde(default = "default_aggregations")]
    pub aggregations: Vec<Aggregation>,
    /// Peers a round, as a manifest's `averaging.fanout`: sites each site pushes to under
    /// `epidemic`; random matchings per round under `metropolis-hastings` (at least the
    /// topology's largest degree: the whole topology, every round).
    #[serde(default = "default_fanout")]
    pub fanout: usize,
    /// Members of each round's groups under `group-average`, as a manifest's
    /// `averaging.group_size`.
    #[serde(default = "default_group_size")]
    pub group_size: usize,
    /// The graph the gossip schemes draw each round's edges from (`complete`: as the nodes,
    /// who can reach every member through the DHT).
    pub topology: Topology,
    /// Links and hardware.
    #[serde(default)]
    pub network: Network,
    /// Sites leaving and coming back.
    #[serde(default)]
    pub churn: Churn,
    /// Malicious sites.
    #[serde(default)]
    pub byzantine: Byzantine,
    /// Consensus-only settings.
    #[serde(default)]
    pub consensus: ConsensusSettings,
    /// Learning settings.
    #[serde(default)]
    pub learning: LearningSettings,
}

fn default_fanout() -> usize {
    2
}

fn default_group_size() -> usize {
    medmesh_protocol::round::DEFAULT_GROUP_SIZE
}

fn default_aggregations() -> Vec<Aggregation> {
    vec![Aggregation::Mean]
}

/// Simulation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Random vectors; consensus error only.
    Consensus,
    /// Real training per site; Dice per site.
    Learning,
}

/// What a variant runs: one of the product's gossip schemes (through `medmesh-protocol`'s
/// round engine, exactly as the nodes run it), or a baseline only the simulator has.
/// Written as the scheme's name: `pairwise-gossip`, `push-sum`, `metropolis-hastings`,
/// `epidemic`, `fedavg` or `local-only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Method {
    /// A gossip scheme, as a manifest names it.
    Gossip(Scheme),
    /// Centralized FedAvg with the server at site 0 (a star): the baseline gossip competes
    /// with, which medmesh nodes do not run (they have no server).
    Fedavg,
    /// No communication.
    LocalOnly,
}

impl Method {
    /// The name as written in scenarios.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gossip(s) => s.as_str(),
            Self::Fedavg => "fedavg",
            Self::LocalOnly => "local-only",
        }
    }
}

impl TryFrom<String> for Method {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        match name.as_str() {
            "fedavg" => Ok(Self::Fedavg),
            "local-only" => Ok(Self::LocalOnly),
            other => other
                .parse::<Scheme>()
                .map(Self::Gossip)
                .map_err(|e| format!("{e}, fedavg, local-only")),
        }
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.as_str().to_string()
    }
}

/// Graph shapes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum Topology {
    /// Everyone with everyone.
    Complete,
    /// A cycle.
    Ring,
    /// A wrap-around grid (`rows * cols` must equal `nodes`).
    Torus {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// Random d-regular.
    RandomRegular {
        /// Degree.
        degree: usize,
    },
    /// Erdős–Rényi over a ring.
    ErdosRenyi {
        /// Edge probability.
        p: f64,
    },
    /// Watts–Strogatz small world.
    WattsStrogatz {
        /// Lattice neighbours (even).
        k: usize,
        /// Rewiring probability.
        beta: f64,
    },
    /// Hypercube-like exponential graph.
    Exponential,
    /// Peers a Kademlia routing table gives.
    Kademlia {
        /// Peers kept per bucket.
        bucket_size: usize,
    },
}

/// A value drawn per node, uniform in `[min, max]` (log-uniform with `log = true`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Draw uniformly in log space (for quantities spanning orders of magnitude).
    #[serde(default)]
    pub log: bool,
}

impl Range {
    /// A fixed value.
    pub const fn fixed(v: f64) -> Self {
        Self {
            min: v,
            max: v,
            log: false,
        }
    }
}

/// Links and hardware per site.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Uplink, Mbit/s.
    pub uplink_mbps: Range,
    /// Downlink, Mbit/s.
    pub downlink_mbps: Range,
    /// One-way latency to the backbone, ms (a link's latency is the sum of its ends').
    pub latency_ms: Range,
    /// Packet loss probability; transfers take `1 / (1 - loss)` longer (retransmissions).
    pub loss: f64,
    /// Compute speed relative to the reference machine.
    pub compute_speed: Range,
    /// Virtual seconds of one training step on the reference machine (learning mode), or
    /// of one local round (consensus mode, where nothing trains).
    pub step_seconds: f64,
    /// Payload encoding: bytes per parameter on the wire ("f32", "f16", "int8").
    pub encoding: medmesh_protocol::WeightEncoding,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            uplink_mbps: Range::fixed(100.0),
            downlink_mbps: Range::fixed(100.0),
            latency_ms: Range::fixed(10.0),
            loss: 0.0,
            compute_speed: Range::fixed(1.0),
            step_seconds: 0.2,
            encoding: medmesh_protocol::WeightEncoding::F32,
        }
    }
}

/// Sites leaving and rejoining. A site that rejoins resumes from its checkpoint (its model
/// when it left).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Per online site and round, probability of leaving.
    #[serde(default)]
    pub leave_probability: f64,
    /// Per offline site and round, probability of coming back.
    #[serde(default)]
    pub rejoin_probability: f64,
    /// Scripted events.
    #[serde(default)]
    pub events: Vec<ChurnEvent>,
    /// A trace of individual sites leaving and joining: a CSV file (`round,site,event` with
    /// `leave`, `join` or `crash`; a crash is a leave), relative to the scenario file.
    #[serde(default)]
    pub trace_file: Option<std::path::PathBuf>,
    /// The trace's entries (read from `trace_file`, or written inline as `[[churn.trace]]`).
    #[serde(default)]
    pub trace: Vec<TraceEntry>,
}

/// One line of a churn trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceEntry {
    /// Before this round's training.
    pub round: u32,
    /// The site (0-based).
    pub site: usize,
    /// `leave` (or `crash`) or `join`.
    pub event: TraceEvent,
}

/// What a site does in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TraceEvent {
    /// Goes offline (a crash is recorded the same way: it resumes from its checkpoint).
    #[serde(alias = "crash")]
    Leave,
    /// Comes back.
    Join,
}

/// Parses a churn trace CSV: `round,site,event` per line, `#` comments and a header allowed.
pub fn parse_trace(text: &str) -> Result<Vec<TraceEntry>, ScenarioError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (n == 0 && line.starts_with("round")) {
            continue;
        }
        let field = format!("churn.trace_file line {}", n + 1);
        let parts: Vec<&str> = line.split(',').map(str::trim).collect();
        let [round, site, event] = parts[..] else {
            return Err(invalid(
                &field,
                format!("expected round,site,event, got {line:?}"),
            ));
        };
        let event = match event {
            "leave" | "crash" => TraceEvent::Leave,
            "join" => TraceEvent::Join,
            other => {
                return Err(invalid(
                    &field,
                    format!("unknown event {other:?} (leave, crash, join)"),
                ));
            }
        };
        out.push(TraceEntry {
            round: round
                .parse()
                .map_err(|_| invalid(&field, format!("round {round:?} is not a number")))?,
            site: site
                .parse()
                .map_err(|_| invalid(&field, format!("site {site:?} is not a number")))?,
            event,
        });
    }
    Ok(out)
}

/// At `round`, a fraction of the sites leaves, or a fraction of those away comes back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnEvent {
    /// Before this round's training.
    pub round: u32,
    /// Fraction of online sites that leave.
    #[serde(default)]
    pub leave: f64,
    /// Fraction of offline sites that come back.
    #[serde(default)]
    pub rejoin: f64,
}

/// Malicious sites: they train like the others but send `attack(model)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Byzantine {
    /// Fraction of sites (rounded down), never site 0 (the FedAvg server).
    #[serde(default)]
    pub fraction: f64,
    /// What they send.
    #[serde(default)]
    pub attack: Attack,
    /// Attack strength: the factor of `scaling` and `sign-flip`, the noise's standard
    /// deviation relative to the model's for `noise`.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Fraction trimmed at each end by `trimmed-mean`.
    #[serde(default = "default_trim")]
    pub trim_fraction: f64,
}

impl Default for Byzantine {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            attack: Attack::default(),
            scale: default_scale(),
            trim_fraction: default_trim(),
        }
    }
}

fn default_scale() -> f64 {
    10.0
}

fn default_trim() -> f64 {
    0.2
}

/// Attacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// `-scale * x`.
    #[default]
    SignFlip,
    /// `scale * x`.
    Scaling,
    /// `x + N(0, (scale * std x)^2)`.
    Noise,
}

/// Consensus-only settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsensusSettings {
    /// Values per node.
    pub dim: usize,
    /// Consensus error counted as reached.
    pub target_error: f64,
}

impl Default for ConsensusSettings {
    fn default() -> Self {
        Self {
            dim: 1000,
            target_error: 1e-3,
        }
    }
}

/// Learning settings: the data and a small UNet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearningSettings {
    /// `synthetic` or `brain`.
    pub task: DataTask,
    /// Non-IID presets compared (each variant runs once per preset).
    pub presets: Vec<String>,
    /// Cases per site (before the preset's uneven sizes).
    pub cases: usize,
    /// Image side, pixels.
    pub size: usize,
    /// Slices per case.
    pub slices: usize,
    /// UNet base channels.
    pub base_channels: u32,
    /// UNet depth.
    pub depth: u32,
    /// Training steps per round.
    pub local_steps: u32,
    /// Batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// Mean validation Dice counted as reached.
    pub target_dice: f64,
    /// The site (1-based) the unseen-site baseline leaves out of a FedAvg federation and
    /// scores; 0 skips it. The pooled baseline always runs.
    pub held_out: usize,
    /// The manifest's `training.swa_rounds`: each site averages its models over the last
    /// rounds, as nodes do.
    pub swa_rounds: Option<u32>,
}

impl Default for LearningSettings {
    fn default() -> Self {
        Self {
            task: DataTask::Synthetic,
            presets: vec!["feature-shift".into()],
            cases: 8,
            size: 32,
            slices: 6,
            base_channels: 8,
            depth: 3,
            local_steps: 4,
            batch_size: 8,
            learning_rate: 0.003,
            target_dice: 0.8,
            held_out: 1,
            swa_rounds: None,
        }
    }
}

/// Data tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataTask {
    /// Synthetic lesions.
    Synthetic,
    /// Brain extraction from the MNI template (needs mricron-data).
    Brain,
}

/// Why a scenario was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not TOML, a wrong type, or an unknown key.
    #[error("scenario is not valid TOML for this format: {0}")]
    Parse(String),
    /// A value out of range.
    #[error("scenario field `{field}`: {reason}")]
    Invalid {
        /// Dotted key.
        field: String,
        /// Why.
        reason: String,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Scenario {
    /// Reads a scenario file, with its churn trace (resolved beside it).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError::Parse(format!("{}: {e}", path.display())))?;
        let mut s: Self = toml::from_str(&text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        if let Some(trace) = &s.churn.trace_file {
            let trace = path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(trace);
            let text = std::fs::read_to_string(&trace)
                .map_err(|e| invalid("churn.trace_file", format!("{}: {e}", trace.display())))?;
            s.churn.trace.extend(parse_trace(&text)?);
        }
        s.validate()?;
        Ok(s)
    }

    /// Parses and checks a scenario.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let s: Self = toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid("name", "must be letters, digits, '-' or '_'"));
        }
        if !(2..=1_000_000).contains(&self.nodes) {
            return Err(invalid("nodes", "must be 2 to 1,000,000"));
        }
        if self.rounds == 0 {
            return Err(invalid("rounds", "must be at least 1"));
        }
        if self.schemes.is_empty() {
            return Err(invalid("schemes", "name at least one scheme"));
        }
        if self.fanout == 0 || self.fanout >= self.nodes {
            return Err(invalid(
                "fanout",
                format!("must be 1 to {}", self.nodes - 1),
            ));
        }
        if !(2..=64).contains(&self.group_size) {
            return Err(invalid("group_size", "must be 2 to 64"));
        }
        if self.aggregations.is_empty() {
            return Err(invalid("aggregations", "name at least one rule"));
        }
        for (field, r, lo) in [
            ("network.uplink_mbps", self.network.uplink_mbps, 1e-3),
            ("network.downlink_mbps", self.network.downlink_mbps, 1e-3),
            ("network.latency_ms", self.network.latency_ms, 0.0),
            ("network.compute_speed", self.network.compute_speed, 1e-3),
        ] {
            if !(r.min.is_finite() && r.max.is_finite() && r.min >= lo && r.min <= r.max) {
                return Err(invalid(field, format!("needs {lo} <= min <= max, finite")));
            }
            if r.log && r.min <= 0.0 {
                return Err(invalid(field, "log ranges need min > 0"));
            }
        }
        if !(0.0..0.9).contains(&self.network.loss) {
            return Err(invalid("network.loss", "must be in [0, 0.9)"));
        }
        if !(self.network.step_seconds >= 0.0 && self.network.step_seconds.is_finite()) {
            return Err(invalid("network.step_seconds", "must be >= 0"));
        }
        for (field, p) in [
            ("churn.leave_probability", self.churn.leave_probability),
            ("churn.rejoin_probability", self.churn.rejoin_probability),
            ("byzantine.fraction", self.byzantine.fraction),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(invalid(field, "must be in [0, 1]"));
            }
        }
        for (i, e) in self.churn.events.iter().enumerate() {
            if !(0.0..=1.0).contains(&e.leave) || !(0.0..=1.0).contains(&e.rejoin) {
                return Err(invalid(
                    &format!("churn.events[{i}]"),
                    "fractions must be in [0, 1]",
                ));
            }
        }
        if let Some(e) = self.churn.trace.iter().find(|e| e.site >= self.nodes) {
            return Err(invalid(
                "churn.trace",
                format!("site {} does not exist ({} nodes)", e.site, self.nodes),
            ));
        }
        if self.byzantine.fraction >= 0.5 {
            return Err(invalid("byzantine.fraction", "must be below 0.5"));
        }
        if !(0.0..0.5).contains(&self.byzantine.trim_fraction) {
            return Err(invalid("byzantine.trim_fraction", "must be in [0, 0.5)"));
        }
        if !(self.byzantine.scale.is_finite() && self.byzantine.scale > 0.0) {
            return Err(invalid("byzantine.scale", "must be > 0"));
        }
        match self.mode {
            Mode::Consensus => {
                if self.consensus.dim == 0 {
                    return Err(invalid("consensus.dim", "must be at least 1"));
                }
                if !(self.consensus.target_error.is_finite() && self.consensus.target_error > 0.0) {
                    return Err(invalid("consensus.target_error", "must be > 0"));
                }
            }
            Mode::Learning => {
                let l = &self.learning;
                if l.presets.is_empty() {
                    return Err(invalid("learning.presets", "name at least one preset"));
                }
                for (i, p) in l.presets.iter().enumerate() {
                    p.parse::<medmesh_training::data::synthetic::Preset>()
                        .map_err(|e| invalid(&format!("learning.presets[{i}]"), e))?;
                }
                if l.held_out > self.nodes {
                    return Err(invalid(
                        "learning.held_out",
                        format!(
                            "site {} does not exist (0 skips the unseen-site baseline)",
                            l.held_out
                        ),
                    ));
                }
                if !(16..=256).contains(&l.size) || l.cases < 2 || l.slices == 0 {
                    return Err(invalid(
                        "learning",
                        "size must be 16 to 256, cases at least 2, slices at least 1",
                    ));
                }
                if l.local_steps == 0
                    || l.batch_size == 0
                    || !(l.learning_rate.is_finite() && l.learning_rate > 0.0)
                {
                    return Err(invalid(
                        "learning",
                        "local_steps, batch_size and learning_rate must be positive",
                    ));
                }
            }
        }
        if let Topology::Torus { rows, cols } = self.topology
            && rows * cols != self.nodes
        {
            return Err(invalid(
                "topology",
                format!("torus {rows}x{cols} != {} nodes", self.nodes),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
mode = "consensus"
nodes = 10
rounds = 5
schemes = ["pairwise-gossip"]
[topology]
kind = "ring"
"#;

    #[test]
    fn minimal_scenario_parses_with_defaults() {
        let s = Scenario::from_toml(MINIMAL).unwrap();
        assert_eq!(s.aggregations, vec![Aggregation::Mean]);
        assert_eq!(s.consensus.dim, 1000);
    }

    #[test]
    fn bad_values_name_the_field() {
        for (from, to, field) in [
            ("nodes = 10", "nodes = 1", "nodes"),
            (
                "kind = \"ring\"",
                "kind = \"torus\"\nrows = 3\ncols = 3",
                "topology",
            ),
        ] {
            let err = Scenario::from_toml(&MINIMAL.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        for (extra, field) in [
            ("[byzantine]\nfraction = 0.6", "byzantine.fraction"),
            (
                "[network]\nuplink_mbps = { min = 10, max = 1 }\ndownlink_mbps = { min = 1, max = 1 }\nlatency_ms = { min = 1, max = 1 }\nloss = 0.0\ncompute_speed = { min = 1, max = 1 }\nstep_seconds = 1\nencoding = \"f32\"",
                "network.uplink_mbps",
            ),
        ] {
            let err = Scenario::from_toml(&format!("{MINIMAL}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let trace = parse_trace("round,site,event\n3,1,leave\n5,1,join\n4,2,crash\n").unwrap();
        assert_eq!(trace.len(), 3);
        assert_eq!(trace[2].event, TraceEvent::Leave);
        assert!(
            parse_trace("3,1,explode")
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        let err = Scenario::from_toml(&MINIMAL.replace("rounds = 5", "rounds = 5\nbogus = 1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
