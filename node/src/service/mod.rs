//! `medmesh run`: the long-running node. It owns the network, answers peers, and runs one
//! [`runner`] thread per experiment.
//!
//! * [`registry`]: the experiments the node knows and the progress it has heard of.
//! * [`tasks`]: the owner of the node's tasks and threads, which stops them.
//! * [`inbound`]: answers to peers' requests (manifests, progress, updates, status, export).
//! * [`exchange`]: fetching and checking peers' model updates.
//! * [`privacy`]: clipping and noise on what leaves the site.
//! * [`round`]: one round's exchange (gather, check, confirm pairs, merge), over a small
//!   network trait so that it is unit-tested with an in-memory network.
//! * [`runner`]: an experiment's rounds: train, exchange, average, validate, checkpoint.
//! * [`store`]: what is kept on disk.

pub mod exchange;
pub mod inbound;
pub mod privacy;
pub mod registry;
pub mod round;
pub mod runner;
pub mod store;
pub mod tasks;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{Identity, PublicKey, Role, TrustedRoster};
use medmesh_protocol::{Request, SignedManifest, UpdateEnvelope};
use medmesh_training::DeviceSpec;
use tokio::sync::Semaphore;

pub use registry::{Registered, Registry, SERVED_ROUNDS, Served};
pub use tasks::Tasks;

use crate::config::{NodeConfig, parse_bootnode};
use crate::keystore;
use crate::metrics::Metrics;
use crate::net::{self, BehaviourSettings, EventLoop, NetEvent, NetworkHandle, Protocols};

/// How often a node pulls what one other member knows of experiments' progress (members
/// in turn). Floods of progress records travel the sparse connections of the moment; this
/// makes every node's view complete within `members x STATUS_SYNC` whatever the overlay.
const STATUS_SYNC: Duration = Duration::from_secs(2);

/// Shared by the network task, request handlers and experiment runners.
pub struct Node {
    /// This site's key.
    pub identity: Identity,
    /// The roster in force.
    pub roster: RwLock<TrustedRoster>,
    /// The configuration.
    pub config: NodeConfig,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The network.
    pub net: NetworkHandle,
    /// Experiments and progress.
    pub registry: Registry,
    /// Bounds concurrent model downloads.
    pub transfers: Semaphore,
    /// Everything the node started.
    pub tasks: Tasks,
    /// Drill and test hooks.
    pub hooks: Hooks,
}

/// How long a stopping node waits for its tasks and experiment threads.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

impl Node {
    /// The key and role of the active roster member behind `peer`, if any.
    fn member(&self, peer: &PeerId) -> Option<(PublicKey, Role)> {
        let roster = self.roster.read().unwrap_or_else(|p| p.into_inner());
        roster
            .roster()
            .members
            .iter()
            .find(|m| net::peer_id_of(&m.public_key) == *peer)
            .filter(|m| roster.authorize(&m.public_key, m.role).is_ok())
            .map(|m| (m.public_key, m.role))
    }

    /// The role of the active roster member behind `peer`, if any.
    pub fn role_of(&self, peer: &PeerId) -> Option<Role> {
        self.member(peer).map(|(_, role)| role)
    }

    /// The roster member behind `peer`, if it is an active node.
    pub fn node_key(&self, peer: &PeerId) -> Option<PublicKey> {
        self.member(peer)
            .filter(|(_, role)| *role == Role::Node)
            .map(|(key, _)| key)
    }

    /// The roster's active node members, sorted by key: the round engine's member indices.
    pub fn node_members(&self) -> Vec<PublicKey> {
        let roster = self.roster.read().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<PublicKey> = roster
            .roster()
            .members
            .iter()
            .filter(|m| roster.authorize(&m.public_key, Role::Node).is_ok())
            .map(|m| m.public_key)
            .collect();
        keys.sort_by_key(|k| k.to_bytes());
        keys.dedup();
        keys
    }

    /// Sends `request` to every connected node except `except`, without waiting.
    pub fn broadcast(self: &Arc<Self>, request: Request, except: &[PeerId]) {
        let node = self.clone();
        let except = except.to_vec();
        self.tasks.spawn(async move {
            let peers = node.net.connected_nodes().await;
            let sends = peers
                .into_iter()
                .filter(|p| !except.contains(p))
                .map(|p| node.net.request(p, request.clone()));
            futures::future::join_all(sends).await;
        });
    }

    /// Registers a verified manifest and starts its runner if it is new and this node takes
    /// part. Returns what registration found.
    pub fn adopt(self: &Arc<Self>, signed: &SignedManifest) -> Registered {
        let registered = self.registry.register(signed, &self.config.datasets);
        if registered == Registered::New {
            self.start(signed.clone());
        }
        registered
    }

    /// Starts the runner of a registered experiment on a thread of its own.
    pub fn start(self: &Arc<Self>, signed: SignedManifest) {
        let id = signed.manifest.id.clone();
        let node = self.clone();
        let spawned = self
            .tasks
            .spawn_thread(format!("experiment {id}"), move || {
                let id = &signed.manifest.id;
                match runner::run(&node, &signed) {
                    Ok(()) => {}
                    Err(e) if e.is::<runner::Stopped>() => {
                        tracing::info!(experiment = %id, "experiment paused; it resumes from its checkpoint")
                    }
                    Err(e) => {
                        tracing::error!(experiment = %id, "experiment stopped: {e:#}");
                        node.registry.stop(id, format!("failed: {e:#}"));
                        runner::publish_failure(&node, &signed, &format!("{e:#}"));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(experiment = %id, "cannot start the experiment thread: {e}");
            self.registry
                .stop(&id, format!("cannot start its thread: {e}"));
        }
    }
}

/// Rewrites a round's outgoing weights in place.
pub type UpdateTamper = Arc<dyn Fn(u64, &mut [f32]) + Send + Sync>;

/// Rewrites a round's sealed offer (envelope and payload bytes) in place.
pub type OfferTamper = Arc<dyn Fn(u64, &mut UpdateEnvelope, &mut Vec<u8>) + Send + Sync>;

/// Changes a node's behaviour for drills and tests; the `medmesh` binary runs with none.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Rewrites this node's outgoing update of a round before it is sealed (a red-team node
    /// that sends poisoned weights).
    pub tamper_update: Option<UpdateTamper>,
    /// Rewrites the offer after sealing (a red-team node that breaks the wire rules:
    /// flipped bits, foreign layouts, replayed rounds).
    pub tamper_offer: Option<OfferTamper>,
    /// Peers this node is cut off from, changing over time (a partition drill: connections
    /// are closed and refused until the list leaves them out).
    pub cut_off: Option<tokio::sync::watch::Receiver<Vec<PeerId>>>,
}

/// Runs a node until interrupted (Ctrl-C or SIGTERM).
pub async fn run(config: NodeConfig) -> Result<()> {
    run_with(config, Hooks::default()).await
}

/// [`run`] with `hooks`.
pub async fn run_with(mut config: NodeConfig, hooks: Hooks) -> Result<()> {
    // The compute device, tried now: a node that could not train must not join the mesh.
    // From here on `node.device` names the device chosen (for `auto`) and proven to work.
    let configured = config.node.device.clone();
    let (device, _) = configured
        .parse::<DeviceSpec>()
        .and_then(DeviceSpec::resolve)
        .with_context(|| format!("node.device = {configured:?}"))?;
    tracing::info!(configured = %configured, device = %device, "compute device");
    config.node.device = device.to_string();
    let identity = keystore::load_identity(&config.node.identity)?;
    let network_key = keystore::load_network_key(&config.node.network_key)?;
    let pin = config
        .node
        .roster_digest
        .as_deref()
        .map(|d| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(d, &mut out).map(|()| out)
        })
        .transpose()
        .context("node.roster_digest")?;
    let installed = keystore::load_roster(&config.node.roster)?;
    let mut roster = installed
        .into_genesis(pin.as_ref())
        .with_context(|| format!("roster {}", config.node.roster.display()))?;
    // A newer roster adopted from peers earlier wins over the installed one.
    let adopted = config.node.state_dir.join("roster.toml");
    if adopted.exists() {
        let newer = keystore::load_roster(&adopted)?;
        let (advanced, errors) = roster.advance(std::slice::from_ref(&newer));
        for e in errors {
            tracing::warn!(path = %adopted.display(), "ignoring the stored roster: {e}");
        }
        roster = advanced;
    }
    roster
        .authorize(&identity.public_key(), Role::Node)
        .with_context(|| {
            format!(
                "this node's key {} is not an active node of the roster",
                identity.public_key()
            )
        })?;
    let consortium = roster.roster().consortium.clone();
    tracing::info!(
        peer_id = %identity.peer_id(),
        %consortium,
        roster_version = roster.roster().version,
        network_key = %libp2p::pnet::PreSharedKey::new(*network_key.as_bytes()).fingerprint(),
        "starting node"
    );

    let tasks = Tasks::new(tokio::runtime::Handle::current());
    // Whichever way this function ends (returned, or its future dropped), everything it
    // started stops.
    let _stop = tasks.stop_on_drop();
    let metrics = Arc::new(Metrics::default());
    let dashboard = crate::dashboard::bind(&config.dashboard).await?;

    let protocols = Protocols::for_consortium(&consortium);
    let settings = BehaviourSettings {
        protocols: protocols.clone(),
        allow_list: true,
        dht_server: true,
        max_connections: config.network.max_connections,
        request_timeout: Duration::from_secs(config.network.request_timeout_secs.into()),
        max_concurrent_streams: 64,
        nat: nat_settings(&config.nat),
    };
    let swarm = net::transport::build_swarm(
        &identity,
        &network_key,
        &settings,
        net::codec::FrameCodec::new(metrics.clone()),
        Duration::from_secs(config.network.idle_timeout_secs.into()),
    )?;
    let bootnodes: Vec<(PeerId, Multiaddr)> = config
        .network
        .bootnodes
        .iter()
        .filter_map(|b| parse_bootnode(b).ok())
        .filter(|(p, _)| *p != *swarm.local_peer_id())
        .collect();
    let members = member_list(&roster);
    let (mut event_loop, handle, mut events) =
        EventLoop::new(swarm, members, bootnodes, &protocols, metrics.clone());
    event_loop.set_relay_policy(net::RelayPolicy {
        pinned: config
            .nat
            .relays
            .iter()
            .filter_map(|r| parse_bootnode(r).ok())
            .collect(),
        max_reservations: config.nat.max_reservations as usize,
    });
    for addr in &config.network.listen {
        let addr: Multiaddr = addr.parse().context("network.listen")?;
        event_loop.listen(addr).map_err(anyhow::Error::msg)?;
    }
    event_loop.set_rate_limit(net::rate_limit::RateLimit {
        per_sec: config.network.peer_requests_per_sec.into(),
        burst: config.network.peer_request_burst.into(),
    });
    tasks.spawn(event_loop.run());
    if let Some(mut cut_off) = hooks.cut_off.clone() {
        let net = handle.clone();
        tasks.spawn(async move {
            loop {
                let peers = cut_off.borrow_and_update().clone();
                net.isolate(peers).await;
                if cut_off.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    let node = Arc::new(Node {
        identity,
        roster: RwLock::new(roster),
        transfers: Semaphore::new(config.network.max_concurrent_transfers as usize),
        config,
        metrics,
        net: handle,
        registry: Registry::default(),
        tasks,
        hooks,
    });

    if let Some(bound) = dashboard {
        let addr = bound.local_addr()?;
        tracing::info!(url = %crate::dashboard::url(addr), "dashboard, JSON API at /api/v1, metrics at /metrics");
        node.tasks
            .spawn(crate::dashboard::serve(bound, node.clone()));
    }

    for signed in store::load_manifests(&node.config.node.state_dir)? {
        let roster = node
            .roster
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match signed.verify(roster.roster()) {
            Ok(_) => {
                node.adopt(&signed);
            }
            Err(e) => {
                tracing::warn!(experiment = %signed.manifest.id, "stored manifest no longer verifies; not resuming it: {e}")
            }
        }
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut status_sync = tokio::time::interval(STATUS_SYNC);
    let mut next_member = 0usize;
    loop {
        tokio::select! {
            _ = status_sync.tick() => {
                let peers: Vec<PeerId> = node
                    .node_members()
                    .iter()
                    .map(net::peer_id_of)
                    .filter(|p| *p != node.net.local_peer_id())
                    .collect();
                if !peers.is_empty() {
                    let peer = peers[next_member % peers.len()];
                    next_member = next_member.wrapping_add(1);
                    let n = node.clone();
                    node.tasks.spawn(async move { inbound::sync_status(&n, peer).await });
                }
            }
            event = events.recv() => match event {
                Some(NetEvent::Request { peer, request, channel }) => {
                    let n = node.clone();
                    node.tasks.spawn(async move {
                        let answer = inbound::handle(&n, peer, *request).await;
                        n.net.respond(channel, answer).await;
                    });
                }
                Some(NetEvent::Connected(peer)) => inbound::greet(&node, peer),
                Some(NetEvent::Disconnected(_)) => {}
                None => anyhow::bail!("the network task stopped"),
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    tracing::info!("shutting down");
    if node.tasks.shutdown(SHUTDOWN_GRACE).await {
        tracing::info!("stopped; checkpoints are on disk");
    } else {
        tracing::warn!(
            "some work was still running after {} s; the last checkpoints are on disk",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    Ok(())
}

/// The roster's active members as peer ids with roles.
pub fn member_list(roster: &TrustedRoster) -> Vec<(PeerId, Role)> {
    roster
        .roster()
        .members
        .iter()
        .filter(|m| roster.authorize(&m.public_key, m.role).is_ok())
        .map(|m| (net::peer_id_of(&m.public_key), m.role))
        .collect()
}

/// The swarm's NAT settings from `[nat]`.
fn nat_settings(nat: &crate::config::NatSection) -> net::NatSettings {
    net::NatSettings {
        relay: nat.relay_service.then(|| net::RelayLimits {
            max_reservations: nat.relay_max_reservations as usize,
            max_circuits: nat.relay_max_circuits as usize,
            circuit_bytes: u64::from(nat.relay_circuit_mib) << 20,
            circuit_duration: Duration::from_secs(nat.relay_circuit_secs.into()),
        }),
        probe_interval: Some(Duration::from_secs(nat.probe_interval_secs.into())),
    }
}
