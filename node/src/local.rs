//! A consortium on this machine, for `medmesh demo` and the multi-process tests: keys, a
//! roster, per-site data and node configurations under one directory; the node processes;
//! waiting for them to find each other; and what to read off them afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libp2p::Multiaddr;
use medmesh_crypto::{Identity, Member, NetworkKey, Role, Roster, SignedRoster};
use medmesh_protocol::manifest::Scheme;
use medmesh_protocol::{
    Manifest, Request, Response, UpdateAnswer, UpdateEnvelope, UpdateExpectation, UpdateRequest,
};
use medmesh_training::params::{self, Selection};
use medmesh_training::{DeviceSpec, Trainer, export};

use crate::cli::TaskArg;
use crate::client::Client;
use crate::commands::data;
use crate::keystore;
use crate::metrics::parse_value;

/// Kills the node processes when the demo ends, however it ends.
pub struct Nodes(pub Vec<Child>);

/// A consortium on this machine: keys, roster, per-site data and node configurations under
/// one directory. The demo and the multi-process tests build theirs with it.
pub struct LocalConsortium {
    /// Its directory.
    pub dir: PathBuf,
    /// The pre-shared network key.
    pub network_key: NetworkKey,
    /// The researcher (also the roster's steward).
    pub researcher: Identity,
    /// One identity per site.
    pub sites: Vec<Identity>,
    /// The roster.
    pub roster: Roster,
    /// Node i listens on `port + i` and serves metrics on `port + 100 + i`.
    pub port: u16,
    /// The dataset name node configurations map (a manifest's `task.dataset`).
    pub dataset: String,
    /// Where site i's data is: `data/site-{i+1}`.
    pub data: PathBuf,
}

impl LocalConsortium {
    /// Creates keys, roster and node configurations for `n` sites under `dir`, for the
    /// quickstart experiment (consortium `demo`, dataset `synthetic` in `dir/data`).
    pub fn create(dir: &Path, n: usize, port: u16) -> Result<Self> {
        Self::create_for(dir, n, port, "demo", "synthetic", &dir.join("data"))
    }

    /// Creates keys, a roster of `consortium`, and node configurations for `n` sites under
    /// `dir` that map dataset `dataset` to `data/site-1`, `data/site-2`, ...
    pub fn create_for(
        dir: &Path,
        n: usize,
        port: u16,
        consortium: &str,
        dataset: &str,
        data: &Path,
    ) -> Result<Self> {
        Self::create_with(dir, n, port, consortium, dataset, data, None)
    }

    /// [`LocalConsortium::create_for`] with keys derived from `seed` (for `medmesh demo`): the
    /// roster orders sites by key and the round schedule pairs them by that order, so the
    /// same seed gives the same pairs, and a demo run can be repeated exactly. Without a
    /// seed, keys are random. Derived keys are public knowledge: for a demo on loopback only.
    pub fn create_with(
        dir: &Path,
        n: usize,
        port: u16,
        consortium: &str,
        dataset: &str,
        data: &Path,
        seed: Option<u64>,
    ) -> Result<Self> {
        let derived = |what: &str| -> Option<[u8; 32]> {
            seed.map(|seed| {
                let mut h = blake3::Hasher::new_derive_key("medmesh 2026-12 demo keys v1");
                h.update(&seed.to_le_bytes());
                h.update(consortium.as_bytes());
                h.update(&[0]);
                h.update(what.as_bytes());
                *h.finalize().as_bytes()
            })
        };
        let identity = |what: &str| match derived(what) {
            Some(bytes) => Ok(Identity::from_seed(&bytes)),
            None => Identity::generate(),
        };
        let network_key = match derived("network key") {
            Some(bytes) => NetworkKey::from_bytes(bytes),
            None => NetworkKey::generate()?,
        };
        keystore::save_network_key(&dir.join("swarm.key"), &network_key, true)?;
        let researcher = identity("researcher")?;
        keystore::save_identity(&dir.join("researcher.key"), &researcher, true)?;
        let sites: Vec<Identity> = (0..n)
            .map(|i| identity(&format!("site {i}")))
            .collect::<Result<_, _>>()?;
        let mut roster = Roster::genesis(consortium, vec![researcher.public_key()], 1);
        roster.upsert_member(Member {
            public_key: researcher.public_key(),
            role: Role::Researcher,
            site: "research-lab".into(),
        });
        for (i, s) in sites.iter().enumerate() {
            roster.upsert_member(Member {
                public_key: s.public_key(),
                role: Role::Node,
                site: format!("site-{}", i + 1),
            });
        }
        let mut signed = SignedRoster::unsigned(roster.clone());
        signed.endorse(&researcher);
        keystore::save_roster(&dir.join("roster.toml"), &signed)?;
        let this = Self {
            dir: dir.to_owned(),
            network_key,
            researcher,
            sites,
            roster,
            port,
            dataset: dataset.to_owned(),
            data: std::path::absolute(data)?,
        };
        for i in 0..n {
            this.write_config(i)?;
        }
        Ok(this)
    }

    /// Writes `data/site-i`: synthetic sites that differ by scanner.
    pub fn prepare_data(&self, cases: usize, size: usize, slices: usize) -> Result<()> {
        data::prepare(&data::PrepareArgs {
            task: TaskArg::Synthetic,
            sites: self.sites.len(),
            out: self.data.clone(),
            preset: "feature-shift".into(),
            seed: 1,
            cases,
            size,
            slices,
        })
    }

    /// Site i's dataset directory.
    pub fn site_data(&self, i: usize) -> PathBuf {
        self.data.join(format!("site-{}", i + 1))
    }

    /// Node i's directory.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("nodes/site-{}", i + 1))
    }

    /// Node i's listen address, with its peer id.
    pub fn addr(&self, i: usize) -> Multiaddr {
        format!(
            "/ip4/127.0.0.1/tcp/{}/p2p/{}",
            self.port + i as u16,
            self.sites[i].peer_id()
        )
        .parse()
        .unwrap_or_else(|e| unreachable!("a well-formed address: {e}"))
    }

    /// Node i's metrics endpoint.
    pub fn metrics_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.port + 100 + i as u16)
    }

    /// The researcher's client, connected to node i.
    pub async fn researcher_client(&self, i: usize) -> Result<Client> {
        Client::connect(
            &self.researcher,
            &self.network_key,
            self.roster.clone(),
            self.addr(i),
        )
        .await
    }

    /// What node `from` offers its peers for round `round` of `m`, fetched off the wire as
    /// a peer fetches it, with site `as_site`'s key: the signed envelope and the weights of
    /// the manifest's shared layout (without normalization layers under FedBN), decoded by
    /// the encoding the envelope names (a masked upload's residues read as fixed point).
    pub async fn fetch_offered_update(
        &self,
        m: &Manifest,
        from: usize,
        as_site: usize,
        round: u64,
    ) -> Result<(UpdateEnvelope, Vec<f32>)> {
        let member = Client::connect(
            &self.sites[as_site],
            &self.network_key,
            self.roster.clone(),
            self.addr(from),
        )
        .await?;
        let query = Request::Update(UpdateRequest::Offer {
            experiment_id: m.id.clone(),
            round: Some(round),
            attempt: 0,
        });
        let answer = member.network().request(member.peer(), query).await?;
        let Response::Update(UpdateAnswer::Offer(envelope)) = answer else {
            bail!(
                "node {} offered nothing for round {round}: {answer:?}",
                from + 1
            );
        };
        let device = "flex".parse::<DeviceSpec>()?.device()?;
        let selection = Selection::for_manifest(m.averaging.keep_normalization_local);
        let layout = params::layout(&Trainer::new(m, device).model(), selection);
        let digest = m.digest();
        let expect = UpdateExpectation {
            experiment_id: &m.id,
            manifest_digest: &digest,
            layout: &layout,
            encoding: envelope.header.encoding,
        };
        let values =
            crate::service::exchange::download(member.network(), member.peer(), &envelope, &expect)
                .await?;
        Ok((envelope, values))
    }

    fn write_config(&self, i: usize) -> Result<()> {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir)?;
        keystore::save_identity(&dir.join("node.key"), &self.sites[i], true)?;
        // Only the first node is anyone's bootnode: the others are found through the DHT.
        let bootnodes = if i == 0 {
            String::new()
        } else {
            format!("\"{}\"", self.addr(0))
        };
        let config = format!(
            "[node]\nidentity = \"node.key\"\nnetwork_key = \"../../swarm.key\"\nroster = \"../../roster.toml\"\nstate_dir = \"state\"\ndevice = \"flex\"\n\n\
             [network]\nlisten = [\"/ip4/127.0.0.1/tcp/{}\"]\nbootnodes = [{bootnodes}]\n\n\
             [dashboard]\nlisten = \"{}\"\n\n[datasets.{}]\npath = {}\n",
            self.port + i as u16,
            self.metrics_addr(i),
            self.dataset,
            toml_string(&self.site_data(i))
        );
        std::fs::write(dir.join("node.toml"), config)?;
        Ok(())
    }

    /// Starts `exe run` (the `medmesh` binary) for node i, logging to its `node.log`.
    pub fn spawn_node(&self, exe: &Path, i: usize, threads: usize) -> Result<Child> {
        let dir = self.node_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))?;
        std::process::Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(dir.join("node.toml"))
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Fails if any node process has exited.
pub fn check_alive(children: &mut Nodes) -> Result<()> {
    for (i, c) in children.0.iter_mut().enumerate() {
        if let Some(status) = c.try_wait()? {
            bail!("node {} exited ({status}); see its node.log", i + 1);
        }
    }
    Ok(())
}

/// Waits until every node has found the other `n - 1` through the DHT (its routing table,
/// per its metrics). Nodes connect only to the peers their rounds need, so the routing
/// table, not the connection count, says a consortium has formed.
pub fn wait_for_mesh(
    rt: &tokio::runtime::Runtime,
    metrics: &[String],
    children: &mut Nodes,
    n: usize,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        check_alive(children)?;
        let mut known = Vec::new();
        for addr in metrics {
            let text = rt.block_on(scrape(addr)).unwrap_or_default();
            known.push(parse_value(&text, "medmesh_routing_table_peers").unwrap_or(0.0) as usize);
        }
        if known.iter().all(|&c| c + 1 >= n) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nodes did not find each other within 60 s (peers in each routing table: {known:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// GET /metrics.
pub async fn scrape(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    Ok(body)
}

/// max_i ||w_i - mean w|| / ||mean w|| over the `selection` of the models' flat weights
/// (what the sites share: normalization layers stay each site's own under FedBN).
pub fn consensus_distance(models: &[PathBuf], selection: Selection) -> Result<f64> {
    let device = "flex".parse::<DeviceSpec>()?.device()?;
    let mut weights = Vec::new();
    for p in models {
        let (model, _) = export::load(p, &device)?;
        weights.push(params::flatten(&model, selection));
    }
    let len = weights.first().map_or(0, Vec::len);
    anyhow::ensure!(
        weights.iter().all(|w| w.len() == len),
        "models differ in size"
    );
    let mut mean = vec![0f64; len];
    for w in &weights {
        for (m, v) in mean.iter_mut().zip(w) {
            *m += f64::from(*v) / weights.len() as f64;
        }
    }
    let norm = mean
        .iter()
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    Ok(weights
        .iter()
        .map(|w| {
            w.iter()
                .zip(&mean)
                .map(|(a, b)| (f64::from(*a) - b).powi(2))
                .sum::<f64>()
                .sqrt()
                / norm
        })
        .fold(0.0, f64::max))
}

/// The quickstart experiment at `rounds` rounds and `scheme` (two peers a round where the
/// scheme takes a fanout), as the multi-process tests run it.
pub fn test_manifest(rounds: u32, scheme: Scheme) -> Result<Manifest> {
    let mut m = Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml"))?;
    m.id = "demo-synthetic-lesions".into();
    m.averaging.scheme = scheme;
    m.averaging.fanout = scheme.takes_fanout().then_some(2);
    m.averaging.rounds = rounds;
    m.averaging.round_timeout_secs = 120;
    m.stop.target_metric = None;
    m.validate()?;
    Ok(m)
}

/// A path as a TOML basic string.
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}
