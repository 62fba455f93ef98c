//! The task that owns the swarm: it turns commands into swarm calls and swarm events into
//! answers and [`NetEvent`]s, and keeps the node connected to the members it discovers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, ListenError, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, autonat, dcutr, identify, kad,
    relay,
};
use medmesh_crypto::Role;
use medmesh_protocol::Response;
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::codec::Inbound;
use super::nat::{self, NatState, Reachability, RelayPolicy};
use super::rate_limit::{PeerBudgets, RateLimit};
use super::{Command, NetError, NetEvent, NetworkHandle};
use crate::metrics::Metrics;

/// Inbound requests waiting for the application; beyond this, peers are told "busy".
const INBOUND_QUEUE: usize = 256;

/// How long a connection to a member no round wants may stay open (see
/// [`EventLoop::prune`]).
const LINGER: Duration = Duration::from_secs(5);

/// How long a wanted member may stay reachable only through a relay before this node
/// reconnects through the relay for another hole punch (see [`EventLoop::repunch`]).
const REPUNCH_AFTER: Duration = Duration::from_secs(3);

/// Reconnections for another hole punch, per member, before the relayed path is accepted.
const REPUNCH_TRIES: u32 = 2;

/// When a peer should ask again after the inbound queue was full.
const QUEUE_FULL_RETRY_MS: u32 = 250;

/// Owns the swarm. Run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    /// Outbound requests by id: to whom, and where the answer goes.
    pending_requests:
        HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<Response, NetError>>)>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, NetError>>>,
    members: HashMap<PeerId, Role>,
    /// Node members with at least one connection, and since when.
    connected: HashMap<PeerId, Instant>,
    bootnodes: Vec<(PeerId, Multiaddr)>,
    kad_protocol: StreamProtocol,
    identify_version: String,
    metrics: Arc<Metrics>,
    /// (peer, reason) pairs already logged, so a misbehaving peer is logged once.
    logged: HashSet<(PeerId, &'static str)>,
    /// Request budgets per peer, when limited.
    budgets: Option<PeerBudgets>,
    /// Peers this node is cut off from (a partition drill).
    isolated: HashSet<PeerId>,
    /// Members' listen addresses as they last told them, to reconnect after the DHT has
    /// forgotten them (a healed partition, a restarted site).
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    /// Node members wanted now, and by the previous [`Command::Want`] (a slower peer may
    /// still be finishing that round with this node).
    wanted: (HashSet<PeerId>, HashSet<PeerId>),
    /// Node members whose last dial failed and that have not connected since.
    unreachable: HashSet<PeerId>,
    /// Members' connections as the dashboard shows them.
    seen: HashMap<PeerId, Seen>,
    /// Reachability, relays, reservations, and each connection's path.
    nat: NatState,
    /// Inbound requests per peer not answered yet (a connection carrying one stays open).
    inbound_pending: HashMap<PeerId, usize>,
    /// Whether "unreachable and no relay" was logged (once until a relay turns up).
    warned_no_relay: bool,
    /// Reconnections made per member for another hole punch, and when the last was.
    repunched: HashMap<PeerId, (u32, Instant)>,
}

/// When a member's connections last changed, and where from.
struct Seen {
    since: Option<SystemTime>,
    last: SystemTime,
    address: Multiaddr,
}

impl EventLoop {
    /// Wraps `swarm`. `members` is the roster (who may connect, and who trains);
    /// `bootnodes` are dialed and fed to Kademlia at start.
    pub fn new(
        swarm: Swarm<Behaviour>,
        members: Vec<(PeerId, Role)>,
        bootnodes: Vec<(PeerId, Multiaddr)>,
        protocols: &super::Protocols,
        metrics: Arc<Metrics>,
    ) -> (Self, NetworkHandle, mpsc::Receiver<NetEvent>) {
        let (command_tx, commands) = mpsc::channel(64);
        let (events, event_rx) = mpsc::channel(INBOUND_QUEUE);
        let handle = NetworkHandle {
            commands: command_tx,
            local_peer_id: *swarm.local_peer_id(),
        };
        let mut this = Self {
            swarm,
            commands,
            events,
            pending_requests: HashMap::new(),
            pending_dials: HashMap::new(),
            members: HashMap::new(),
            connected: HashMap::new(),
            bootnodes,
            kad_protocol: protocols.kad.clone(),
            identify_version: protocols.identify.clone(),
            metrics,
            logged: HashSet::new(),
            budgets: None,
            isolated: HashSet::new(),
            addresses: HashMap::new(),
            wanted: Default::default(),
            unreachable: HashSet::new(),
            seen: HashMap::new(),
            nat: NatState::new(RelayPolicy::default()),
            inbound_pending: HashMap::new(),
            warned_no_relay: false,
            repunched: HashMap::new(),
        };
        this.set_members(members);
        (this, handle, event_rx)
    }

    /// Listens on `addr`.
    pub fn listen(&mut self, addr: Multiaddr) -> Result<(), String> {
        self.swarm
            .listen_on(addr.clone())
            .map(|_| ())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    }

    /// Limits each peer's inbound requests to `limit`; beyond it, peers are answered
    /// [`Response::Busy`].
    pub fn set_rate_limit(&mut self, limit: RateLimit) {
        self.budgets = Some(PeerBudgets::new(limit));
    }

    /// Where to take reservations when this node turns out unreachable.
    pub fn set_relay_policy(&mut self, policy: RelayPolicy) {
        self.nat.set_policy(policy);
    }

    /// Runs until every [`NetworkHandle`] is dropped.
    pub async fn run(mut self) {
        for (peer, addr) in self.bootnodes.clone() {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
            let opts = DialOpts::peer_id(peer).addresses(vec![addr]).build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::warn!(%peer, "cannot dial bootnode: {e}");
            }
        }
        let mut maintenance = tokio::time::interval(Duration::from_secs(5));
        let mut paths = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                _ = maintenance.tick() => self.maintain(),
                _ = paths.tick() => self.repunch(),
            }
        }
    }

    fn set_members(&mut self, members: Vec<(PeerId, Role)>) {
        let new: HashMap<PeerId, Role> = members.into_iter().collect();
        let removed: Vec<PeerId> = self
            .members
            .keys()
            .filter(|p| !new.contains_key(p))
            .copied()
            .collect();
        if let Some(allowed) = self.swarm.behaviour_mut().allowed.as_mut() {
            for peer in new.keys().filter(|p| !self.isolated.contains(p)) {
                allowed.allow_peer(*peer);
            }
            for peer in &removed {
                // Also closes its connections.
                allowed.disallow_peer(*peer);
            }
        }
        for peer in &removed {
            tracing::warn!(%peer, "no longer on the roster; disconnecting");
            let _ = self.swarm.disconnect_peer_id(*peer);
            self.connected.remove(peer);
            self.seen.remove(peer);
        }
        self.members = new;
        self.metrics
            .peers_connected
            .set(self.connected.len() as i64);
    }

    fn is_node(&self, peer: &PeerId) -> bool {
        self.members.get(peer) == Some(&Role::Node)
    }

    fn isolate(&mut self, peers: Vec<PeerId>) {
        let new: HashSet<PeerId> = peers.into_iter().collect();
        let healed: Vec<PeerId> = self.isolated.difference(&new).copied().collect();
        for peer in &new {
            if let Some(allowed) = self.swarm.behaviour_mut().allowed.as_mut() {
                allowed.disallow_peer(*peer);
            }
            let _ = self.swarm.disconnect_peer_id(*peer);
        }
        for peer in &healed {
            if self.members.contains_key(peer)
                && let Some(allowed) = self.swarm.behaviour_mut().allowed.as_mut()
            {
                allowed.allow_peer(*peer);
            }
        }
        tracing::warn!("partition drill: cut off from {} peer(s)", new.len());
        self.isolated = new;
        for peer in healed {
            self.redial(peer);
        }
    }

    /// Dials a node member at the addresses it last told, if it is not connected.
    fn redial(&mut self, peer: PeerId) {
        if !self.is_node(&peer)
            || self.connected.contains_key(&peer)
            || self.isolated.contains(&peer)
        {
            return;
        }
        let addrs = self.told_addresses(&peer);
        if addrs.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .addresses(addrs)
            .build();
        let _ = self.swarm.dial(opts);
    }

    /// The addresses `peer` told, less circuits through this node.
    fn told_addresses(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let me = *self.swarm.local_peer_id();
        self.addresses
            .get(peer)
            .map(|addrs| {
                addrs
                    .iter()
                    .filter(|a| !nat::through(a, &me))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keeps the wanted members connected, and reaches the bootnodes again if every
    /// connection is gone.
    fn maintain(&mut self) {
        self.count_routing_table();
        self.prune();
        self.keep_reservations();
        self.drop_superseded_relayed();
        let wanted: Vec<PeerId> = self.wanted.0.iter().copied().collect();
        for peer in wanted {
            self.dial_wanted(peer);
        }
        if self.connected.is_empty() && !self.bootnodes.is_empty() {
            for (peer, addr) in self.bootnodes.clone() {
                let opts = DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .addresses(vec![addr])
                    .build();
                let _ = self.swarm.dial(opts);
            }
        }
    }

    /// Closes connections to members no round wants (a DHT query's, a status pull's, a
    /// greeting's) once they are [`LINGER`] old and this node awaits no answer on them, so a
    /// running node's connections follow its rounds' graph rather than everyone it met. An
    /// idle node (no round) leaves them to the idle timeout.
    fn prune(&mut self) {
        let (now_wanted, before) = &self.wanted;
        if now_wanted.is_empty() && before.is_empty() {
            return;
        }
        let busy = self.busy();
        let keep = self.nat.keep();
        let now = Instant::now();
        let stale: Vec<PeerId> = self
            .connected
            .iter()
            .filter(|(p, since)| {
                now.duration_since(**since) >= LINGER
                    && !now_wanted.contains(p)
                    && !before.contains(p)
                    && !busy.contains(p)
                    && !keep.contains(p)
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in stale {
            tracing::debug!(%peer, "closing a lingering connection no round needs");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Publishes the routing table's size (the demo and tests wait on it).
    fn count_routing_table(&mut self) {
        let known: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        self.metrics.routing_table_peers.set(known as i64);
    }

    /// Dials a wanted node member: at the addresses it told, or those the DHT knows; with
    /// neither, looks it up in the DHT first (the dial follows once the lookup finds it).
    fn dial_wanted(&mut self, peer: PeerId) {
        if !self.is_node(&peer)
            || self.connected.contains_key(&peer)
            || self.isolated.contains(&peer)
        {
            return;
        }
        let told = self.told_addresses(&peer);
        let in_dht = self
            .swarm
            .behaviour_mut()
            .kad
            .kbucket(peer)
            .is_some_and(|b| b.iter().any(|e| *e.node.key.preimage() == peer));
        if told.is_empty() && !in_dht {
            self.swarm.behaviour_mut().kad.get_closest_peers(peer);
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .addresses(told)
            .extend_addresses_through_behaviour()
            .build();
        let _ = self.swarm.dial(opts);
    }

    fn want(&mut self, peers: Vec<PeerId>) {
        let now: HashSet<PeerId> = peers.into_iter().collect();
        let previous = std::mem::replace(&mut self.wanted.0, now);
        self.wanted.1 = previous;
        // Bootnodes are not kept either: once a node has joined, its routing table finds
        // peers, and `maintain` dials the bootnodes again if every connection is gone.
        // Relays (and members relaying through this node) are.
        // A connection carrying a request either way stays: a peer a round ahead may already
        // be asking for this node's next model, and closing would fail its fetch.
        let keep = self.nat.keep();
        let busy = self.busy();
        let stale: Vec<PeerId> = self
            .connected
            .keys()
            .filter(|p| {
                !self.wanted.0.contains(p)
                    && !self.wanted.1.contains(p)
                    && !keep.contains(p)
                    && !busy.contains(p)
            })
            .copied()
            .collect();
        for peer in stale {
            tracing::debug!(%peer, "closing the connection to a member this round does not need");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let wanted: Vec<PeerId> = self.wanted.0.iter().copied().collect();
        for peer in wanted {
            self.dial_wanted(peer);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_request(&peer, Inbound::Request(Box::new(request)));
                self.pending_requests.insert(id, (peer, reply));
            }
            Command::Respond { channel, response } => {
                // Err: the requester went away meanwhile; nothing to do.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, response);
            }
            Command::Dial { addr, reply } => {
                // The last /p2p/ names the peer (a circuit address names its relay first).
                let peer = addr
                    .iter()
                    .filter_map(|p| match p {
                        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                        _ => None,
                    })
                    .last();
                let opts = match peer {
                    Some(peer) => DialOpts::peer_id(peer)
                        .addresses(vec![addr.clone()])
                        .condition(PeerCondition::Always)
                        .build(),
                    None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            peer: addr.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::ConnectedNodes { reply } => {
                let mut nodes: Vec<PeerId> = self.connected.keys().copied().collect();
                nodes.sort();
                let _ = reply.send(nodes);
            }
            Command::SetMembers { members } => self.set_members(members),
            Command::Isolate { peers } => self.isolate(peers),
            Command::Want { peers } => self.want(peers),
            Command::Reachability { peers, reply } => {
                let connected = peers
                    .iter()
                    .filter(|p| self.connected.contains_key(p))
                    .count();
                let failed = peers
                    .iter()
                    .filter(|p| !self.connected.contains_key(p) && self.unreachable.contains(p))
                    .count();
                let _ = reply.send(super::Reachability { connected, failed });
            }
            Command::Peers { reply } => {
                let mut peers: Vec<super::PeerState> = self
                    .seen
                    .iter()
                    .map(|(peer, seen)| super::PeerState {
                        peer: *peer,
                        connected_since: seen.since,
                        last_seen: Some(seen.last),
                        address: Some(seen.address.clone()),
                        unreachable: self.unreachable.contains(peer),
                        path: self.nat.path_to(peer),
                    })
                    .collect();
                peers.extend(
                    self.unreachable
                        .iter()
                        .filter(|p| !self.seen.contains_key(p))
                        .map(|peer| super::PeerState {
                            peer: *peer,
                            connected_since: None,
                            last_seen: None,
                            address: None,
                            unreachable: true,
                            path: None,
                        }),
                );
                peers.sort_by_key(|p| p.peer);
                let _ = reply.send(peers);
            }
            Command::Path { peer, reply } => {
                let _ = reply.send(self.nat.path_to(&peer));
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, peer_id = %self.swarm.local_peer_id(), "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                self.unreachable.remove(&peer_id);
                let path = self.nat.opened(peer_id, connection_id, &endpoint);
                if self.is_node(&peer_id) && num_established.get() > 1 {
                    tracing::info!(peer = %peer_id, %path, address = %endpoint.get_remote_address(), "another connection to a member");
                }
                if self.is_node(&peer_id) {
                    let now = SystemTime::now();
                    let address = endpoint.get_remote_address().clone();
                    let seen = self.seen.entry(peer_id).or_insert(Seen {
                        since: None,
                        last: now,
                        address: address.clone(),
                    });
                    seen.since.get_or_insert(now);
                    seen.last = now;
                    seen.address = address;
                }
                if num_established.get() == 1 && self.is_node(&peer_id) {
                    self.connected.insert(peer_id, Instant::now());
                    self.metrics
                        .peers_connected
                        .set(self.connected.len() as i64);
                    tracing::info!(peer = %peer_id, %path, address = %endpoint.get_remote_address(), "member connected");
                    let _ = self.events.try_send(NetEvent::Connected(peer_id));
                }
                self.count_paths();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.nat.closed(peer_id, connection_id);
                self.count_paths();
                if num_established == 0 && self.connected.remove(&peer_id).is_some() {
                    self.member_gone(peer_id);
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => match error {
                ListenError::Denied { cause } => {
                    if let Some(not_allowed) = cause.downcast_ref::<allow_block_list::NotAllowed>()
                    {
                        self.metrics.refused_not_member.inc();
                        tracing::warn!(%send_back_addr, "refused a connection: {not_allowed} (not on the roster)");
                    } else {
                        self.metrics.rejected("connection_limit");
                        tracing::debug!(%send_back_addr, "refused a connection: {cause}");
                    }
                }
                ListenError::Transport(e) => {
                    // Without the network key the handshake fails here; outsiders can knock
                    // often, so this is a counter and a debug line, not a warning each time.
                    self.metrics.failed_handshakes.inc();
                    tracing::debug!(%send_back_addr, "inbound handshake failed: {e}");
                }
                other => tracing::debug!(%send_back_addr, "inbound connection failed: {other}"),
            },
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let reason = error.to_string();
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(NetError::Dial {
                        peer: peer_id.map(|p| p.to_string()).unwrap_or_default(),
                        reason: reason.clone(),
                    }));
                }
                if let libp2p::swarm::DialError::Denied { cause } = &error
                    && cause
                        .downcast_ref::<allow_block_list::NotAllowed>()
                        .is_some()
                {
                    self.metrics.refused_not_member.inc();
                }
                if let Some(peer) = peer_id
                    && self.is_node(&peer)
                    && !self.connected.contains_key(&peer)
                {
                    self.unreachable.insert(peer);
                    // The addresses it was dialed at may be stale (a relay it no longer
                    // uses): ask the DHT again.
                    if self.wanted.0.contains(&peer) {
                        self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                    }
                }
                tracing::debug!(peer = ?peer_id, "dial failed: {reason}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => self.on_rpc(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != self.identify_version {
                    tracing::warn!(peer = %peer_id, version = %info.protocol_version, "peer speaks another consortium's protocol; disconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if self.is_node(&peer_id) && !info.listen_addrs.is_empty() {
                    self.addresses.insert(peer_id, info.listen_addrs.clone());
                }
                if self.is_node(&peer_id) {
                    let serves = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                    self.nat.relay_service(peer_id, serves);
                    self.keep_reservations();
                }
                if info.protocols.contains(&self.kad_protocol) {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) => {
                self.count_routing_table();
                if self.wanted.0.contains(&peer) {
                    self.dial_wanted(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(found)),
                ..
            })) => self.found_peers(found.peers),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(event)) => self.on_autonat(event),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => self.on_relay(event),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                self.on_relay_client(event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => self.on_dcutr(event),
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self.nat.listener_closed(listener_id) {
                    let why = match reason {
                        Ok(()) => "closed".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(%relay, "relay reservation lost ({why}); will reserve again");
                    self.count_paths();
                }
            }
            _ => {}
        }
    }

    fn on_rpc(&mut self, event: request_response::Event<Inbound, Response>) {
        match &event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { .. },
                ..
            } => *self.inbound_pending.entry(*peer).or_default() += 1,
            request_response::Event::ResponseSent { peer, .. }
            | request_response::Event::InboundFailure { peer, .. } => {
                if let Some(n) = self.inbound_pending.get_mut(peer) {
                    *n -= 1;
                    if *n == 0 {
                        self.inbound_pending.remove(peer);
                    }
                }
            }
            _ => {}
        }
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Inbound::Refused { reason, detail },
                    channel,
                    ..
                } => {
                    self.metrics.rejected(reason);
                    if self.logged.insert((peer, reason)) {
                        tracing::warn!(%peer, reason, "dropped a bad frame: {detail}");
                    }
                    let refused = Response::Refused { reason: detail };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rpc
                        .send_response(channel, refused);
                }
                request_response::Message::Request {
                    request: Inbound::Request(request),
                    channel,
                    ..
                } => {
                    if let Some(budgets) = self.budgets.as_mut()
                        && let Err(wait) = budgets.admit(peer, Instant::now())
                    {
                        self.metrics.rejected("rate_limited");
                        if self.logged.insert((peer, "rate_limited")) {
                            tracing::warn!(%peer, "peer exceeds its request rate; answering busy");
                        }
                        let busy = Response::Busy {
                            retry_after_ms: wait.as_millis().clamp(1, 60_000) as u32,
                        };
                        let _ = self.swarm.behaviour_mut().rpc.send_response(channel, busy);
                        return;
                    }
                    let event = NetEvent::Request {
                        peer,
                        request,
                        channel,
                    };
                    if let Err(mpsc::error::TrySendError::Full(NetEvent::Request {
                        channel, ..
                    })) = self.events.try_send(event)
                    {
                        self.metrics.rejected("busy");
                        let busy = Response::Busy {
                            retry_after_ms: QUEUE_FULL_RETRY_MS,
                        };
                        let _ = self.swarm.behaviour_mut().rpc.send_response(channel, busy);
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some((_, reply)) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let error = match error {
                    OutboundFailure::DialFailure => NetError::Dial {
                        peer: peer.to_string(),
                        reason: "dial failed".into(),
                    },
                    OutboundFailure::Timeout => NetError::Timeout(peer),
                    OutboundFailure::ConnectionClosed => NetError::ConnectionClosed(peer),
                    OutboundFailure::UnsupportedProtocols => NetError::UnsupportedProtocol(peer),
                    OutboundFailure::Io(e) => NetError::Stream {
                        peer,
                        reason: e.to_string(),
                    },
                };
                if let Some((_, reply)) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(error));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound request failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// A node member's last connection closed.
    fn member_gone(&mut self, peer: PeerId) {
        if let Some(seen) = self.seen.get_mut(&peer) {
            seen.since = None;
            seen.last = SystemTime::now();
        }
        self.metrics
            .peers_connected
            .set(self.connected.len() as i64);
        tracing::info!(%peer, "member disconnected");
        let _ = self.events.try_send(NetEvent::Disconnected(peer));
    }

    /// Publishes how many members are connected directly and how many through relays.
    fn count_paths(&mut self) {
        let (direct, relayed) = self.nat.count_paths(self.connected.keys());
        self.metrics.peers_direct.set(direct as i64);
        self.metrics.peers_relayed.set(relayed as i64);
        self.metrics
            .relay_reservations
            .set(self.nat.accepted_reservations() as i64);
        self.metrics
            .relayed_circuits
            .set(self.nat.circuits_here_count() as i64);
    }

    /// A DHT lookup found peers: wanted members among them are dialed at the addresses
    /// found (they replace what they told, which may name a relay they have left).
    fn found_peers(&mut self, found: Vec<kad::PeerInfo>) {
        for info in found {
            if self.wanted.0.contains(&info.peer_id) && !info.addrs.is_empty() {
                let told = self.addresses.entry(info.peer_id).or_default();
                for addr in info.addrs {
                    if !told.contains(&addr) {
                        told.push(addr);
                    }
                }
                self.dial_wanted(info.peer_id);
            }
        }
    }

    /// Unreachable: keep reservations on relays. Reachable: give them up.
    fn keep_reservations(&mut self) {
        if self.nat.reachability == Reachability::Public {
            for listener in self.nat.drop_reservations() {
                self.swarm.remove_listener(listener);
            }
            return;
        }
        for (relay, addr) in self.nat.reservations_to_make() {
            match self.swarm.listen_on(addr.clone()) {
                Ok(listener) => {
                    tracing::info!(%relay, "asking a relay for a reservation");
                    self.nat.reserving(relay, listener);
                }
                Err(e) => tracing::warn!(%relay, "cannot reserve on {addr}: {e}"),
            }
        }
        let stranded =
            self.nat.reachability == Reachability::Private && self.nat.reservations_asked() == 0;
        if stranded && !self.warned_no_relay {
            tracing::warn!(
                "not reachable, and no member relays for this node yet: other members cannot \
                 connect to it until one does (a reachable member, or one named in nat.relays)"
            );
        }
        self.warned_no_relay = stranded;
    }

    /// Gives hole punching another go with wanted members still reached only through a
    /// relay. DCUtR tries once per relayed connection, and a try can fail on timing (both
    /// NATs dropping the first SYNs) or be lost (both ends dialing each other through the
    /// relay at once, each connection starting its own punch). So once such a member has
    /// been relayed for [`REPUNCH_AFTER`] with nothing in flight, the end with the smaller
    /// peer id (one end, so the two don't dial each other again) closes the relayed
    /// connections and dials through the relay afresh, which starts a new punch; at most
    /// [`REPUNCH_TRIES`] times per member. A member behind a NAT that can't be punched (a
    /// symmetric one) stays relayed after that.
    fn repunch(&mut self) {
        let me = *self.swarm.local_peer_id();
        let busy = self.busy();
        let now = Instant::now();
        let candidates: Vec<PeerId> = self
            .wanted
            .0
            .iter()
            .filter(|p| {
                me < **p
                    && !busy.contains(p)
                    && self.repunched.get(p).is_none_or(|(tries, last)| {
                        *tries < REPUNCH_TRIES && now.duration_since(*last) >= REPUNCH_AFTER
                    })
                    && self
                        .connected
                        .get(p)
                        .is_some_and(|since| now.duration_since(*since) >= REPUNCH_AFTER)
            })
            .copied()
            .collect();
        for peer in candidates {
            let relayed = self.nat.relayed_only(&peer);
            if relayed.is_empty() {
                continue;
            }
            let (tries, last) = self.repunched.entry(peer).or_insert((0, now));
            *tries += 1;
            *last = now;
            tracing::info!(%peer, attempt = *tries, "still relayed; reconnecting through the relay for another hole punch");
            for id in relayed {
                self.swarm.close_connection(id);
            }
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::Always)
                .addresses(self.told_addresses(&peer))
                .extend_addresses_through_behaviour()
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, "cannot dial through the relay again: {e}");
            }
        }
    }

    /// Peers with a request in flight either way: this node awaits their answer, or they
    /// await its. Closing their connection would lose the request.
    fn busy(&self) -> HashSet<PeerId> {
        self.pending_requests
            .values()
            .map(|(p, _)| *p)
            .chain(self.inbound_pending.keys().copied())
            .collect()
    }

    /// Closes relayed connections to peers that now have a direct one, once nothing is in
    /// flight to or from them (a request answered on a closing connection would be lost):
    /// model transfers then take the direct path.
    fn drop_superseded_relayed(&mut self) {
        let busy = self.busy();
        for (peer, id) in self.nat.superseded() {
            if busy.contains(&peer) {
                continue;
            }
            tracing::info!(%peer, "direct connection up; closing the relayed one");
            self.swarm.close_connection(id);
        }
    }

    fn on_autonat(&mut self, event: autonat::Event) {
        let autonat::Event::StatusChanged { new, .. } = event else {
            return;
        };
        let reachability = match &new {
            autonat::NatStatus::Public(addr) => {
                tracing::info!(%addr, "reachable from other members (AutoNAT)");
                Reachability::Public
            }
            autonat::NatStatus::Private => {
                tracing::info!(
                    "not reachable from other members (AutoNAT); relays will carry inbound connections"
                );
                Reachability::Private
            }
            autonat::NatStatus::Unknown => Reachability::Unknown,
        };
        self.nat.reachability = reachability;
        self.metrics.reachable.set(reachability.gauge());
        // Reachable members relay for the others; unreachable ones cannot.
        if let Some(relay) = self.swarm.behaviour_mut().relay.as_mut() {
            relay.set_status(Some(if reachability == Reachability::Public {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
        }
        self.keep_reservations();
        self.count_paths();
    }

    fn on_relay(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                if !renewed {
                    tracing::info!(peer = %src_peer_id, "a member reserved on this relay");
                }
                self.nat.reservation_here(src_peer_id, true);
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.nat.reservation_here(src_peer_id, false);
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relaying a connection between members");
                self.nat.circuit_here(src_peer_id, dst_peer_id, true);
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                if let Some(e) = error {
                    tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relayed connection ended: {e}");
                }
                self.nat.circuit_here(src_peer_id, dst_peer_id, false);
            }
            other => tracing::debug!("relay: {other:?}"),
        }
        self.count_paths();
    }

    fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } => {
                if self.nat.reserved(relay_peer_id) {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                self.count_paths();
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                tracing::debug!(relay = %relay_peer_id, "relayed connection opened");
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                tracing::debug!(src = %src_peer_id, "relayed connection accepted");
            }
        }
    }

    fn on_dcutr(&mut self, event: dcutr::Event) {
        let peer = event.remote_peer_id;
        match event.result {
            Ok(connection) => {
                self.metrics.hole_punch(true);
                self.nat.hole_punched(connection);
                tracing::info!(%peer, "hole punch succeeded: direct connection");
                self.drop_superseded_relayed();
            }
            Err(e) => {
                self.metrics.hole_punch(false);
                tracing::info!(%peer, "hole punch failed; staying relayed: {e}");
            }
        }
        self.count_paths();
    }
}
