//! What a node knows about NATs: its own reachability (AutoNAT's verdict), the members that
//! relay, its reservations on them, who relays through it, and which of its connections are
//! direct and which are relayed. The [`super::EventLoop`] feeds it swarm events and acts on
//! its answers; this module keeps the bookkeeping and the choices, and calls no swarm.

use std::collections::{HashMap, HashSet};
use std::fmt;

use libp2p::core::transport::ListenerId;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

/// Where relays come from, and how many to hold.
#[derive(Debug, Clone, Default)]
pub struct RelayPolicy {
    /// Members to reserve on first (`nat.relays`), with their direct addresses.
    pub pinned: Vec<(PeerId, Multiaddr)>,
    /// Relays an unreachable node keeps a reservation on.
    pub max_reservations: usize,
}

/// AutoNAT's verdict on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Not probed yet, or inconclusive.
    Unknown,
    /// A member dialed this node back at the address it names.
    Public,
    /// Members could not dial this node back.
    Private,
}

impl Reachability {
    /// The metric's value: 1, -1 or 0.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Public => 1,
            Self::Private => -1,
            Self::Unknown => 0,
        }
    }
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::Public => "reachable",
            Self::Private => "not reachable",
        })
    }
}

/// How a connection reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A TCP connection of its own (dialed, accepted, or hole-punched).
    Direct,
    /// A circuit through a relay, inside each end's connection to the relay.
    Relayed {
        /// The relay (always named in the circuit addresses libp2p dials and accepts).
        relay: Option<PeerId>,
    },
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct => f.write_str("direct"),
            Self::Relayed { .. } => f.write_str("relayed"),
        }
    }
}

/// The path of a connection: relayed when the address it was dialed at, or accepted on,
/// runs through a `/p2p-circuit` (an accepted relayed connection names only its source as
/// the remote address; the circuit is the local one).
pub fn path_of_connection(endpoint: &ConnectedPoint) -> Path {
    match endpoint {
        ConnectedPoint::Dialer { address, .. } => path_of(address),
        ConnectedPoint::Listener { local_addr, .. } => path_of(local_addr),
    }
}

/// The path of an address: relayed when it runs through a `/p2p-circuit`, through the peer
/// named before it.
pub fn path_of(remote: &Multiaddr) -> Path {
    let mut relay = None;
    for p in remote.iter() {
        match p {
            Protocol::P2p(id) => relay = Some(id),
            Protocol::P2pCircuit => return Path::Relayed { relay },
            _ => {}
        }
    }
    Path::Direct
}

/// Whether `addr` is a circuit through `me` (dialing it would ask this node to relay to
/// itself).
pub fn through(addr: &Multiaddr, me: &PeerId) -> bool {
    matches!(path_of(addr), Path::Relayed { relay: Some(relay) } if relay == *me)
}

/// The NAT bookkeeping of one node.
#[derive(Debug)]
pub struct NatState {
    /// AutoNAT's current verdict.
    pub reachability: Reachability,
    policy: RelayPolicy,
    /// Members seen serving the relay protocol over a direct connection this node dialed,
    /// with the address it dialed them at.
    relays: HashMap<PeerId, Multiaddr>,
    /// Reservations asked for (relay → listener), and whether the relay accepted.
    reservations: HashMap<PeerId, (ListenerId, bool)>,
    /// Members holding a reservation on this node.
    reserved_here: HashSet<PeerId>,
    /// Circuits through this node: (source, destination) → how many.
    circuits_here: HashMap<(PeerId, PeerId), usize>,
    /// Every open connection: peer → connection → path.
    connections: HashMap<PeerId, HashMap<ConnectionId, (Path, Multiaddr, bool)>>,
    /// Direct connections that hole punching made.
    hole_punched: HashSet<ConnectionId>,
}

impl NatState {
    /// Nothing known yet.
    pub fn new(policy: RelayPolicy) -> Self {
        Self {
            reachability: Reachability::Unknown,
            policy,
            relays: HashMap::new(),
            reservations: HashMap::new(),
            reserved_here: HashSet::new(),
            circuits_here: HashMap::new(),
            connections: HashMap::new(),
            hole_punched: HashSet::new(),
        }
    }

    /// Replaces the policy (at start).
    pub fn set_policy(&mut self, policy: RelayPolicy) {
        self.policy = policy;
    }

    /// A connection opened. Returns its path.
    pub fn opened(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) -> Path {
        let path = path_of_connection(endpoint);
        // Dialed by this node as itself (not in a hole punch's listener role).
        let dialed = matches!(
            endpoint,
            ConnectedPoint::Dialer {
                role_override: Endpoint::Dialer,
                ..
            }
        );
        self.connections
            .entry(peer)
            .or_default()
            .insert(id, (path, endpoint.get_remote_address().clone(), dialed));
        path
    }

    /// A connection closed.
    pub fn closed(&mut self, peer: PeerId, id: ConnectionId) {
        if let Some(conns) = self.connections.get_mut(&peer) {
            conns.remove(&id);
            if conns.is_empty() {
                self.connections.remove(&peer);
                self.relays.remove(&peer);
            }
        }
        self.hole_punched.remove(&id);
    }

    /// Hole punching made connection `id`.
    pub fn hole_punched(&mut self, id: ConnectionId) {
        self.hole_punched.insert(id);
    }

    /// Identify told whether `peer` serves the relay protocol. It counts as a relay when it
    /// does and this node dialed it directly at an address of its own (not through a relay,
    /// not by hole punching): others can reach it the same way.
    pub fn relay_service(&mut self, peer: PeerId, serves: bool) {
        if !serves {
            self.relays.remove(&peer);
            return;
        }
        let dialed = self.connections.get(&peer).and_then(|conns| {
            conns
                .iter()
                .filter(|(id, (path, _, dialed))| {
                    *path == Path::Direct && *dialed && !self.hole_punched.contains(id)
                })
                .map(|(_, (_, addr, _))| addr.clone())
                .next()
        });
        match dialed {
            Some(addr) => {
                self.relays.insert(peer, addr);
            }
            None => {
                self.relays.remove(&peer);
            }
        }
    }

    /// Relays to reserve on now: none while this node is reachable or not yet judged (it
    /// then needs none), else pinned relays first, then discovered ones, up to the policy's
    /// number, as `(relay, circuit listen address)`.
    pub fn reservations_to_make(&self) -> Vec<(PeerId, Multiaddr)> {
        if self.reachability != Reachability::Private {
            return Vec::new();
        }
        let want = self
            .policy
            .max_reservations
            .saturating_sub(self.reservations.len());
        let mut discovered: Vec<(PeerId, Multiaddr)> =
            self.relays.iter().map(|(p, a)| (*p, a.clone())).collect();
        discovered.sort_by_key(|(p, _)| *p);
        self.policy
            .pinned
            .iter()
            .cloned()
            .chain(discovered)
            .filter(|(p, _)| !self.reservations.contains_key(p))
            .take(want)
            .map(|(relay, addr)| {
                let addr = strip_peer(addr)
                    .with(Protocol::P2p(relay))
                    .with(Protocol::P2pCircuit);
                (relay, addr)
            })
            .collect()
    }

    /// A reservation was asked of `relay` through `listener`.
    pub fn reserving(&mut self, relay: PeerId, listener: ListenerId) {
        self.reservations.insert(relay, (listener, false));
    }

    /// `relay` accepted the reservation; true the first time (not a renewal).
    pub fn reserved(&mut self, relay: PeerId) -> bool {
        match self.reservations.get_mut(&relay) {
            Some((_, accepted)) => !std::mem::replace(accepted, true),
            None => false,
        }
    }

    /// A listener closed; the relay whose reservation it held, if any.
    pub fn listener_closed(&mut self, listener: ListenerId) -> Option<PeerId> {
        let relay = self
            .reservations
            .iter()
            .find(|(_, (l, _))| *l == listener)
            .map(|(p, _)| *p)?;
        self.reservations.remove(&relay);
        Some(relay)
    }

    /// Listeners of every reservation, forgotten (the node turned out reachable).
    pub fn drop_reservations(&mut self) -> Vec<ListenerId> {
        self.reservations.drain().map(|(_, (l, _))| l).collect()
    }

    /// Reservations asked for (accepted or not yet).
    pub fn reservations_asked(&self) -> usize {
        self.reservations.len()
    }

    /// Reservations accepted now.
    pub fn accepted_reservations(&self) -> usize {
        self.reservations.values().filter(|(_, ok)| *ok).count()
    }

    /// A member reserved on this node (or its reservation ended).
    pub fn reservation_here(&mut self, peer: PeerId, held: bool) {
        if held {
            self.reserved_here.insert(peer);
        } else {
            self.reserved_here.remove(&peer);
        }
    }

    /// A circuit between `src` and `dst` through this node opened or closed.
    pub fn circuit_here(&mut self, src: PeerId, dst: PeerId, open: bool) {
        let n = self.circuits_here.entry((src, dst)).or_default();
        if open {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.circuits_here.remove(&(src, dst));
            }
        }
    }

    /// Circuits through this node now.
    pub fn circuits_here_count(&self) -> usize {
        self.circuits_here.values().sum()
    }

    /// Peers whose connections must stay open whatever the rounds want: relays this node
    /// holds reservations on or relays through, and members that hold a reservation on it or
    /// have circuits through it.
    pub fn keep(&self) -> HashSet<PeerId> {
        let mut keep: HashSet<PeerId> = self.reservations.keys().copied().collect();
        keep.extend(self.reserved_here.iter().copied());
        for (src, dst) in self.circuits_here.keys() {
            keep.insert(*src);
            keep.insert(*dst);
        }
        for conns in self.connections.values() {
            for (path, _, _) in conns.values() {
                if let Path::Relayed { relay: Some(relay) } = path {
                    keep.insert(*relay);
                }
            }
        }
        keep
    }

    /// Relayed connections to peers that also have a direct one: the relayed ones can go.
    pub fn superseded(&self) -> Vec<(PeerId, ConnectionId)> {
        let mut out = Vec::new();
        for (peer, conns) in &self.connections {
            if conns.values().any(|(p, _, _)| *p == Path::Direct) {
                out.extend(
                    conns
                        .iter()
                        .filter(|(_, (p, _, _))| *p != Path::Direct)
                        .map(|(id, _)| (*peer, *id)),
                );
            }
        }
        out
    }

    /// `peer`'s connections when every one of them goes through a relay (no hole punch has
    /// given a direct one yet); empty when it has a direct one or none.
    pub fn relayed_only(&self, peer: &PeerId) -> Vec<ConnectionId> {
        match self.connections.get(peer) {
            Some(conns) if conns.values().all(|(p, _, _)| *p != Path::Direct) => {
                let mut ids: Vec<ConnectionId> = conns.keys().copied().collect();
                ids.sort();
                ids
            }
            _ => Vec::new(),
        }
    }

    /// The path of `peer`'s connections: direct when any is, relayed when all are.
    pub fn path_to(&self, peer: &PeerId) -> Option<Path> {
        let conns = self.connections.get(peer)?;
        if conns.values().any(|(p, _, _)| *p == Path::Direct) {
            Some(Path::Direct)
        } else {
            conns.values().map(|(p, _, _)| *p).next()
        }
    }

    /// Of `peers`, how many are connected directly and how many only through relays.
    pub fn count_paths<'a>(&self, peers: impl Iterator<Item = &'a PeerId>) -> (usize, usize) {
        let mut direct = 0;
        let mut relayed = 0;
        for p in peers {
            match self.path_to(p) {
                Some(Path::Direct) => direct += 1,
                Some(Path::Relayed { .. }) => relayed += 1,
                None => {}
            }
        }
        (direct, relayed)
    }
}

/// `addr` without a trailing `/p2p/<peer id>`.
fn strip_peer(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Multiaddr {
        text.parse().unwrap()
    }

    fn dialer(text: &str) -> ConnectedPoint {
        ConnectedPoint::Dialer {
            address: addr(text),
            role_override: Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::Reuse,
        }
    }

    fn listener(local: &str, remote: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: addr(local),
            send_back_addr: addr(remote),
        }
    }

    #[test]
    fn circuit_addresses_are_relayed_through_the_peer_before_them() {
        let relay = PeerId::random();
        let dst = PeerId::random();
        let circuit = addr(&format!(
            "/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{dst}"
        ));
        assert_eq!(path_of(&circuit), Path::Relayed { relay: Some(relay) });
        assert!(through(&circuit, &relay));
        assert!(!through(&circuit, &dst));
        assert_eq!(
            path_of(&addr(&format!("/ip4/10.0.0.1/tcp/4001/p2p/{dst}"))),
            Path::Direct
        );
    }

    #[test]
    fn only_an_unreachable_node_reserves_and_only_on_relays_it_dialed_itself() {
        let pinned = PeerId::random();
        let dialed = PeerId::random();
        let accepted = PeerId::random();
        let punched = PeerId::random();
        let mut nat = NatState::new(RelayPolicy {
            pinned: vec![(pinned, addr(&format!("/ip4/10.0.0.9/tcp/1/p2p/{pinned}")))],
            max_reservations: 2,
        });
        let c = |n: usize| ConnectionId::new_unchecked(n);
        nat.opened(dialed, c(1), &dialer("/ip4/10.0.0.2/tcp/2"));
        nat.opened(
            accepted,
            c(2),
            &listener("/ip4/0.0.0.0/tcp/1", "/ip4/10.0.0.3/tcp/3"),
        );
        nat.opened(punched, c(3), &dialer("/ip4/10.0.0.4/tcp/4"));
        nat.hole_punched(c(3));
        for p in [dialed, accepted, punched] {
            nat.relay_service(p, true);
        }
        assert!(
            nat.reservations_to_make().is_empty(),
            "unknown: no reservations"
        );
        nat.reachability = Reachability::Public;
        assert!(nat.reservations_to_make().is_empty(), "reachable: none");
        nat.reachability = Reachability::Private;
        let made = nat.reservations_to_make();
        assert_eq!(
            made.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![pinned, dialed],
            "pinned first, then the relay it dialed; not one that dialed it or was punched"
        );
        assert_eq!(
            made[1].1,
            addr(&format!("/ip4/10.0.0.2/tcp/2/p2p/{dialed}/p2p-circuit"))
        );
        nat.reserving(pinned, ListenerId::next());
        assert!(!nat.reserved(dialed), "not asked");
        assert_eq!(nat.reservations_to_make().len(), 1);
        assert!(nat.keep().contains(&pinned));
        assert_eq!(nat.drop_reservations().len(), 1);
    }

    #[test]
    fn a_relayed_connection_is_superseded_by_a_direct_one() {
        let relay = PeerId::random();
        let peer = PeerId::random();
        let mut nat = NatState::new(RelayPolicy::default());
        let c = |n: usize| ConnectionId::new_unchecked(n);
        let circuit = format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit");
        // Accepted through a reservation: the remote address is just the source's id.
        let accepted = listener(&circuit, &format!("/p2p/{peer}"));
        assert_eq!(
            nat.opened(peer, c(1), &accepted),
            Path::Relayed { relay: Some(relay) }
        );
        assert!(nat.superseded().is_empty());
        assert!(
            nat.keep().contains(&relay),
            "the relay carries a connection"
        );
        assert_eq!(nat.count_paths([peer].iter()), (0, 1));
        assert_eq!(nat.relayed_only(&peer), vec![c(1)]);
        assert!(nat.relayed_only(&relay).is_empty(), "not connected");
        nat.opened(peer, c(2), &dialer("/ip4/10.0.0.5/tcp/5"));
        nat.hole_punched(c(2));
        assert!(nat.relayed_only(&peer).is_empty(), "a direct one is up");
        assert_eq!(nat.superseded(), vec![(peer, c(1))]);
        assert_eq!(nat.count_paths([peer].iter()), (1, 0));
        nat.closed(peer, c(1));
        assert!(nat.superseded().is_empty());
        assert!(!nat.keep().contains(&relay));
    }
}
