//! Node configuration: a TOML file, overridden by `MEDMESH_*` environment variables
//! (`MEDMESH_NETWORK__LISTEN=/ip4/0.0.0.0/tcp/4001`: sections and keys joined by `__`).
//! Everything is checked at start; a bad value fails with the field's name and the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use libp2p::{Multiaddr, PeerId};
use medmesh_training::DeviceSpec;
use serde::Deserialize;

use crate::cli::LogFormat;

/// The commented example `medmesh init` writes.
pub const EXAMPLE: &str = r#"# medmesh node configuration. Paths are relative to this file.
# Any value can be overridden from the environment: MEDMESH_<SECTION>__<KEY>,
# e.g. MEDMESH_NODE__DEVICE=cuda:0 or MEDMESH_NETWORK__BOOTNODES=/ip4/10.1.2.3/tcp/4001/p2p/12D3KooW...

[node]
identity = "node.key"          # this site's key (medmesh keygen), mode 0600
network_key = "swarm.key"      # the consortium's pre-shared key (medmesh network-key)
roster = "roster.toml"         # the consortium roster this node was installed with
# roster_digest = "..."        # optional: pin the installed roster's digest (medmesh roster show)
state_dir = "state"            # manifests, checkpoints, exported models
device = "auto"                # auto: CUDA, then wgpu, then flex, the first that works; or one of them
data_memory_mib = 1024         # slices kept in memory; beyond, read from state_dir per batch

[network]
listen = ["/ip4/0.0.0.0/tcp/4001"]
bootnodes = []                 # a few members' addresses, with /p2p/<peer id>
max_connections = 64
request_timeout_secs = 30      # one query or one 1 MiB chunk of a model
idle_timeout_secs = 600        # keep connections between rounds
max_concurrent_transfers = 4   # model downloads at once
peer_requests_per_sec = 100    # each peer's sustained request budget (a 1 MiB chunk is one)
peer_request_burst = 200       # requests a peer may send at once; beyond: "busy, retry"

[nat]
# Behind a NAT or a firewall that lets nothing in? Nothing to configure: AutoNAT finds out,
# and the node then keeps reservations on relays (reachable members) and hole-punches.
relays = []                    # optional: members to relay through, /ip4/../tcp/../p2p/<peer id>
max_reservations = 2           # relays an unreachable node keeps a reservation on
relay_service = true           # relay for other members while this node is reachable
relay_max_reservations = 128   # members that may hold a reservation here
relay_max_circuits = 16        # relayed connections through this node at once
relay_circuit_mib = 1024       # MiB one relayed connection may carry before it is closed
relay_circuit_secs = 3600      # seconds one relayed connection may last
probe_interval_secs = 60       # AutoNAT: how often to retest an unsettled reachability

[dashboard]
listen = "127.0.0.1:9464"      # dashboard, JSON API and Prometheus /metrics; "" to disable
# token_file = "dashboard.token" # a secret of 32+ characters; required unless listen is loopback

[log]
format = "text"                # text or json

# Datasets by the name manifests use in task.dataset:
[datasets.synthetic]
path = "data/site-1"           # MSD layout (dataset.json) or images/ + masks/ PNG pairs
# kind = "msd"                 # optional: "msd" or "png" (detected when left out)
"#;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's files and compute.
    pub node: NodeSection,
    /// Peer-to-peer networking.
    pub network: NetworkSection,
    /// NAT traversal: AutoNAT, relays, hole punching.
    #[serde(default)]
    pub nat: NatSection,
    /// The dashboard, its JSON API and the Prometheus metrics.
    #[serde(default)]
    pub dashboard: DashboardSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// Local datasets by name.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetSection>,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Identity key file.
    pub identity: PathBuf,
    /// Network key file.
    pub network_key: PathBuf,
    /// Roster file.
    pub roster: PathBuf,
    /// Optional pinned roster digest (hex).
    #[serde(default)]
    pub roster_digest: Option<String>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Compute device name.
    #[serde(default = "default_device")]
    pub device: String,
    /// MiB of an experiment's training and validation slices kept in memory (default 1024).
    /// Datasets are sliced one case at a time into `state_dir`; a larger slice set is read
    /// from there a slice at a time.
    #[serde(default = "default_data_memory")]
    pub data_memory_mib: u64,
}

fn default_data_memory() -> u64 {
    1024
}

fn default_device() -> String {
    "auto".into()
}

/// `[network]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Listen multiaddresses.
    pub listen: Vec<String>,
    /// Bootstrap peers (multiaddresses ending in `/p2p/<peer id>`).
    #[serde(default)]
    pub bootnodes: Vec<String>,
    /// Most simultaneous connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Seconds one request (a query, one chunk of a model) may take.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u32,
    /// Seconds an unused connection stays open.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u32,
    /// Model downloads running at once.
    #[serde(default = "default_max_transfers")]
    pub max_concurrent_transfers: u32,
    /// Requests per second each peer may send, sustained.
    #[serde(default = "default_peer_rate")]
    pub peer_requests_per_sec: u32,
    /// Requests each peer may send at once.
    #[serde(default = "default_peer_burst")]
    pub peer_request_burst: u32,
}

fn default_peer_rate() -> u32 {
    100
}

fn default_peer_burst() -> u32 {
    200
}

fn default_request_timeout() -> u32 {
    30
}

fn default_idle_timeout() -> u32 {
    600
}

fn default_max_transfers() -> u32 {
    4
}

/// Parses a bootnode address, which must name the peer: `/ip4/../tcp/../p2p/<peer id>`.
pub fn parse_bootnode(text: &str) -> Result<(PeerId, Multiaddr), String> {
    let addr: Multiaddr = text
        .parse()
        .map_err(|e| format!("{text:?} is not a multiaddress: {e}"))?;
    let peer = addr
        .iter()
        .filter_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .last()
        .ok_or_else(|| format!("{text:?} must end in /p2p/<peer id>"))?;
    Ok((peer, addr))
}

fn default_max_connections() -> u32 {
    64
}

/// `[nat]`: how a node behind a NAT is reached, and what it relays for others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// Members to take reservations on first (multiaddresses ending in `/p2p/<peer id>`).
    #[serde(default)]
    pub relays: Vec<String>,
    /// Relays an unreachable node keeps a reservation on.
    #[serde(default = "default_max_reservations")]
    pub max_reservations: u32,
    /// Whether this node relays for other members while AutoNAT finds it reachable.
    #[serde(default = "default_true")]
    pub relay_service: bool,
    /// Members that may hold a reservation on this node.
    #[serde(default = "default_relay_max_reservations")]
    pub relay_max_reservations: u32,
    /// Relayed connections through this node at once.
    #[serde(default = "default_relay_max_circuits")]
    pub relay_max_circuits: u32,
    /// MiB one relayed connection may carry.
    #[serde(default = "default_relay_circuit_mib")]
    pub relay_circuit_mib: u32,
    /// Seconds one relayed connection may last.
    #[serde(default = "default_relay_circuit_secs")]
    pub relay_circuit_secs: u32,
    /// Seconds between AutoNAT probes while reachability is unsettled.
    #[serde(default = "default_probe_interval")]
    pub probe_interval_secs: u32,
}

impl Default for NatSection {
    fn default() -> Self {
        Self {
            relays: Vec::new(),
            max_reservations: default_max_reservations(),
            relay_service: true,
            relay_max_reservations: default_relay_max_reservations(),
            relay_max_circuits: default_relay_max_circuits(),
            relay_circuit_mib: default_relay_circuit_mib(),
            relay_circuit_secs: default_relay_circuit_secs(),
            probe_interval_secs: default_probe_interval(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_max_reservations() -> u32 {
    2
}

fn default_relay_max_reservations() -> u32 {
    128
}

fn default_relay_max_circuits() -> u32 {
    16
}

fn default_relay_circuit_mib() -> u32 {
    1024
}

fn default_relay_circuit_secs() -> u32 {
    3600
}

fn default_probe_interval() -> u32 {
    60
}

/// `[dashboard]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardSection {
    /// `host:port` of the dashboard, JSON API and `/metrics`; empty disables it.
    #[serde(default)]
    pub listen: String,
    /// A file holding the bearer token that the JSON API and `/metrics` ask for. Required
    /// when `listen` is not a loopback address.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for DashboardSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            token_file: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormatValue,
}

/// Log format as written in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatValue {
    /// Human-readable.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

impl From<LogFormatValue> for LogFormat {
    fn from(v: LogFormatValue) -> Self {
        match v {
            LogFormatValue::Text => LogFormat::Text,
            LogFormatValue::Json => LogFormat::Json,
        }
    }
}

/// `[datasets.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    /// Dataset directory.
    pub path: PathBuf,
    /// Its layout; detected from the directory when left out.
    #[serde(default)]
    pub kind: Option<DatasetKind>,
}

/// Dataset layouts the node reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// Medical Segmentation Decathlon: `dataset.json`, `imagesTr/`, `labelsTr/`.
    Msd,
    /// PNG pairs: `images/` and `masks/`.
    Png,
}

impl DatasetKind {
    /// What `dir` holds, judged by its marker files.
    pub fn detect(dir: &Path) -> Option<Self> {
        if dir.join("dataset.json").is_file() {
            Some(Self::Msd)
        } else if dir.join("images").is_dir() && dir.join("masks").is_dir() {
            Some(Self::Png)
        } else {
            None
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, unreadable, not TOML, or has a wrong type or unknown key.
    #[error("{path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The config crate's explanation (names the key).
        reason: String,
    },
    /// A value is present but not acceptable.
    #[error("{path}: `{field}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key.
        field: String,
        /// Why.
        reason: String,
    },
}

impl NodeConfig {
    /// Loads `path` with environment overrides from `env` (the process environment when
    /// `None`), resolves relative paths against the file's directory, and validates.
    pub fn load(
        path: &Path,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let load_err = |e: config::ConfigError| ConfigError::Load {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let environment = Environment::with_prefix("MEDMESH")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("network.listen")
            .with_list_parse_key("network.bootnodes")
            .with_list_parse_key("nat.relays")
            .source(env);
        let mut cfg: NodeConfig = Config::builder()
            .add_source(File::from_str(&text, FileFormat::Toml))
            .add_source(environment)
            .build()
            .map_err(load_err)?
            .try_deserialize()
            .map_err(load_err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.node.identity,
            &mut cfg.node.network_key,
            &mut cfg.node.roster,
            &mut cfg.node.state_dir,
        ] {
            *p = base.join(&*p);
        }
        for d in cfg.datasets.values_mut() {
            d.path = base.join(&d.path);
        }
        if let Some(t) = &mut cfg.dashboard.token_file {
            *t = base.join(&*t);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks that every configured dataset exists and has the declared layout (run at node
    /// start; a config can be written before the data is in place).
    pub fn check_datasets(&self, path: &Path) -> Result<(), ConfigError> {
        for (name, d) in &self.datasets {
            let field = format!("datasets.{name}.path");
            let invalid = |reason: String| ConfigError::Invalid {
                path: path.to_owned(),
                field: field.clone(),
                reason,
            };
            if !d.path.is_dir() {
                return Err(invalid(format!("{} is not a directory", d.path.display())));
            }
            match (DatasetKind::detect(&d.path), d.kind) {
                (None, _) => {
                    return Err(invalid(format!(
                        "{} has neither dataset.json (MSD) nor images/ and masks/ (PNG pairs)",
                        d.path.display()
                    )));
                }
                (Some(found), Some(declared)) if found != declared => {
                    return Err(invalid(format!(
                        "{} holds a {found:?} dataset, but kind = {declared:?}",
                        d.path.display()
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        self.node
            .device
            .parse::<DeviceSpec>()
            .map_err(|e| invalid("node.device", e.to_string()))?;
        if let Some(d) = &self.node.roster_digest {
            let ok = d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit());
            if !ok {
                return Err(invalid(
                    "node.roster_digest",
                    "must be 64 hex digits (see `medmesh roster show`)".into(),
                ));
            }
        }
        if self.network.listen.is_empty() {
            return Err(invalid(
                "network.listen",
                "needs at least one address".into(),
            ));
        }
        for (i, a) in self.network.listen.iter().enumerate() {
            if a.parse::<Multiaddr>().is_err() || !a.contains("/tcp/") {
                return Err(invalid(
                    &format!("network.listen[{i}]"),
                    format!("{a:?} is not a TCP multiaddress like /ip4/0.0.0.0/tcp/4001"),
                ));
            }
        }
        for (i, a) in self.network.bootnodes.iter().enumerate() {
            if let Err(reason) = parse_bootnode(a) {
                return Err(invalid(&format!("network.bootnodes[{i}]"), reason));
            }
        }
        for (field, value, range) in [
            (
                "network.request_timeout_secs",
                self.network.request_timeout_secs,
                1..=3600,
            ),
            (
                "network.idle_timeout_secs",
                self.network.idle_timeout_secs,
                10..=86_400,
            ),
            (
                "network.max_concurrent_transfers",
                self.network.max_concurrent_transfers,
                1..=64,
            ),
            (
                "network.peer_requests_per_sec",
                self.network.peer_requests_per_sec,
                1..=1_000_000,
            ),
            (
                "network.peer_request_burst",
                self.network.peer_request_burst,
                1..=1_000_000,
            ),
        ] {
            if !range.contains(&value) {
                return Err(invalid(
                    field,
                    format!("{value} must be {} to {}", range.start(), range.end()),
                ));
            }
        }
        for (i, a) in self.nat.relays.iter().enumerate() {
            if let Err(reason) = parse_bootnode(a) {
                return Err(invalid(&format!("nat.relays[{i}]"), reason));
            }
        }
        let n = &self.nat;
        for (field, value, range) in [
            ("nat.max_reservations", n.max_reservations, 0..=16),
            (
                "nat.relay_max_reservations",
                n.relay_max_reservations,
                1..=10_000,
            ),
            ("nat.relay_max_circuits", n.relay_max_circuits, 1..=10_000),
            ("nat.relay_circuit_mib", n.relay_circuit_mib, 1..=1_048_576),
            ("nat.relay_circuit_secs", n.relay_circuit_secs, 10..=86_400),
            ("nat.probe_interval_secs", n.probe_interval_secs, 5..=86_400),
        ] {
            if !range.contains(&value) {
                return Err(invalid(
                    field,
                    format!("{value} must be {} to {}", range.start(), range.end()),
                ));
            }
        }
        if !(1..=10_000).contains(&self.network.max_connections) {
            return Err(invalid(
                "network.max_connections",
                format!("{} must be 1 to 10000", self.network.max_connections),
            ));
        }
        let d = &self.dashboard;
        if !d.listen.is_empty() {
            let addr = d.listen.parse::<std::net::SocketAddr>().map_err(|_| {
                invalid(
                    "dashboard.listen",
                    format!("{:?} is not host:port (or empty to disable)", d.listen),
                )
            })?;
            if !addr.ip().is_loopback() && d.token_file.is_none() {
                return Err(invalid(
                    "dashboard.token_file",
                    format!(
                        "dashboard.listen {addr} is reachable from other machines: set a token file (or listen on 127.0.0.1)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("node.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The node configurations the README points clinic IT to load as written.
    #[test]
    fn shipped_node_examples_load() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            (
                "behind-nat",
                include_str!("../../examples/nodes/behind-nat.toml"),
            ),
            (
                "reachable-relay",
                include_str!("../../examples/nodes/reachable-relay.toml"),
            ),
        ] {
            let cfg = NodeConfig::load(&write(dir.path(), text), Some(HashMap::new()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.network.listen, ["/ip4/0.0.0.0/tcp/4001"], "{name}");
            if name == "behind-nat" {
                assert_eq!(cfg.nat.relays.len(), 1);
                assert_eq!(cfg.nat.max_reservations, 2);
            } else {
                assert!(cfg.nat.relay_service);
                assert_eq!(cfg.nat.relay_circuit_mib, 1024);
            }
        }
    }

    #[test]
    fn example_loads_and_env_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), EXAMPLE);
        let cfg = NodeConfig::load(&p, Some(HashMap::new())).unwrap();
        assert_eq!(cfg.node.identity, dir.path().join("node.key"));
        assert_eq!(
            cfg.datasets["synthetic"].path,
            dir.path().join("data/site-1")
        );
        let env = HashMap::from([
            ("MEDMESH_NODE__DEVICE".to_owned(), "cuda:1".to_owned()),
            (
                "MEDMESH_NETWORK__BOOTNODES".to_owned(),
                format!(
                    "/ip4/1.2.3.4/tcp/1/p2p/{},/dns4/node.example/tcp/1/p2p/{}",
                    medmesh_crypto::Identity::from_seed(&[1; 32]).peer_id(),
                    medmesh_crypto::Identity::from_seed(&[2; 32]).peer_id()
                ),
            ),
            (
                "MEDMESH_NETWORK__MAX_CONNECTIONS".to_owned(),
                "8".to_owned(),
            ),
        ]);
        let cfg = NodeConfig::load(&p, Some(env)).unwrap();
        assert_eq!(cfg.node.device, "cuda:1");
        assert_eq!(cfg.network.bootnodes.len(), 2);
        assert_eq!(cfg.network.max_connections, 8);
    }

    #[test]
    fn bad_values_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                EXAMPLE.replace("device = \"auto\"", "device = \"tpu\""),
                "node.device",
            ),
            (
                EXAMPLE.replace("max_connections = 64", "max_connections = 0"),
                "network.max_connections",
            ),
            (
                EXAMPLE.replace("bootnodes = []", "bootnodes = [\"10.0.0.1:4001\"]"),
                "network.bootnodes[0]",
            ),
            (
                EXAMPLE.replace("listen = \"127.0.0.1:9464\"", "listen = \"nowhere\""),
                "dashboard.listen",
            ),
            (
                EXAMPLE.replace("listen = \"127.0.0.1:9464\"", "listen = \"0.0.0.0:9464\""),
                "dashboard.token_file",
            ),
            (
                EXAMPLE.replace("identity = \"node.key\"", "identiti = \"node.key\""),
                "identiti",
            ),
            (
                EXAMPLE.replace("max_connections = 64", "max_connections = \"many\""),
                "max_connections",
            ),
            (
                EXAMPLE.replace("peer_requests_per_sec = 100", "peer_requests_per_sec = 0"),
                "network.peer_requests_per_sec",
            ),
            (
                EXAMPLE.replace("relays = []", "relays = [\"/ip4/10.0.0.1/tcp/4001\"]"),
                "nat.relays[0]",
            ),
            (
                EXAMPLE.replace("relay_circuit_mib = 1024", "relay_circuit_mib = 0"),
                "nat.relay_circuit_mib",
            ),
            (
                EXAMPLE.replace("probe_interval_secs = 60", "probe_interval_secs = 1"),
                "nat.probe_interval_secs",
            ),
        ];
        for (text, field) in cases {
            let err =
                NodeConfig::load(&write(dir.path(), &text), Some(HashMap::new())).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        let env = HashMap::from([("MEDMESH_NODE__DEVICE".to_owned(), "gpu9".to_owned())]);
        let err = NodeConfig::load(&write(dir.path(), EXAMPLE), Some(env)).unwrap_err();
        assert!(err.to_string().contains("node.device"), "{err}");
    }

    #[test]
    fn datasets_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), EXAMPLE);
        let cfg = NodeConfig::load(&p, Some(HashMap::new())).unwrap();
        let err = cfg.check_datasets(&p).unwrap_err().to_string();
        assert!(
            err.contains("datasets.synthetic.path") && err.contains("not a directory"),
            "{err}"
        );
        std::fs::create_dir_all(dir.path().join("data/site-1")).unwrap();
        let err = cfg.check_datasets(&p).unwrap_err().to_string();
        assert!(err.contains("neither dataset.json"), "{err}");
        std::fs::write(dir.path().join("data/site-1/dataset.json"), "{}").unwrap();
        cfg.check_datasets(&p).unwrap();
        let png = EXAMPLE.replace("# kind = \"msd\"", "kind = \"png\"");
        let cfg = NodeConfig::load(&write(dir.path(), &png), Some(HashMap::new())).unwrap();
        let err = cfg.check_datasets(&p).unwrap_err().to_string();
        assert!(err.contains("kind = Png"), "{err}");
    }
}
