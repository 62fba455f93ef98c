//! The node's libp2p behaviours, combined. Field order is the order of the checks: the
//! roster allow-list and the connection limits see every connection before anything else.

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, allow_block_list, autonat, connection_limits, dcutr, identify, identity, kad,
    ping, relay, request_response,
};

use super::codec::FrameCodec;

/// Protocol names of one consortium: a member of another consortium speaks none of them.
#[derive(Debug, Clone)]
pub struct Protocols {
    /// Kademlia.
    pub kad: StreamProtocol,
    /// Requests and responses carrying [`medmesh_protocol::Message`]s.
    pub rpc: StreamProtocol,
    /// Identify's protocol version string.
    pub identify: String,
}

impl Protocols {
    /// The names for `consortium` (already validated as `[a-z0-9-]+`).
    pub fn for_consortium(consortium: &str) -> Self {
        let name = |p: &str| {
            StreamProtocol::try_from_owned(format!("/medmesh/{consortium}/{p}/1.0.0"))
                .unwrap_or_else(|e| unreachable!("consortium names are [a-z0-9-]: {e}"))
        };
        Self {
            kad: name("kad"),
            rpc: name("rpc"),
            identify: format!("/medmesh/{consortium}/1.0.0"),
        }
    }
}

/// Knobs of the behaviours, from the node's configuration.
#[derive(Debug, Clone)]
pub struct BehaviourSettings {
    /// Consortium protocol names.
    pub protocols: Protocols,
    /// Enforce the roster allow-list (nodes do; a researcher's one-shot client does not).
    pub allow_list: bool,
    /// Kademlia server mode (nodes) or client mode (researcher tools).
    pub dht_server: bool,
    /// Most established connections.
    pub max_connections: u32,
    /// Deadline of one request-response exchange (one chunk, one query).
    pub request_timeout: Duration,
    /// Most concurrent inbound + outbound request streams per connection.
    pub max_concurrent_streams: usize,
    /// NAT traversal: what this swarm relays, and whether it probes its reachability.
    pub nat: NatSettings,
}

/// What a swarm does about NATs. Every swarm can dial through relays and hole-punch; nodes
/// also probe their reachability (AutoNAT) and relay for others while reachable.
#[derive(Debug, Clone, Default)]
pub struct NatSettings {
    /// Relay for other members, within these limits, whenever AutoNAT confirms an external
    /// address (libp2p's relay server advertises itself only then); `None`: never.
    pub relay: Option<RelayLimits>,
    /// Probe reachability with AutoNAT, retrying this often while it is unsettled;
    /// `None`: no probes (researcher tools), and this swarm answers none either.
    pub probe_interval: Option<Duration>,
}

/// A relay's limits (`[nat]` in the node configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Members holding a reservation at once.
    pub max_reservations: usize,
    /// Relayed connections at once.
    pub max_circuits: usize,
    /// Bytes one relayed connection may carry (both directions).
    pub circuit_bytes: u64,
    /// How long one relayed connection may last.
    pub circuit_duration: Duration,
}

impl RelayLimits {
    /// libp2p's relay configuration with these limits (and its default rate limiters).
    fn config(self) -> relay::Config {
        relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits.min(8),
            max_circuit_duration: self.circuit_duration,
            max_circuit_bytes: self.circuit_bytes,
            ..relay::Config::default()
        }
    }
}

pub use derived::{Behaviour, BehaviourEvent};

/// The derive generates `BehaviourEvent`, one variant per field, without docs.
#[allow(missing_docs)]
mod derived {
    use libp2p::swarm::NetworkBehaviour;
    use libp2p::swarm::behaviour::toggle::Toggle;
    use libp2p::{
        allow_block_list, autonat, connection_limits, dcutr, identify, kad, ping, relay,
        request_response,
    };

    use super::FrameCodec;

    /// Everything the node's swarm runs.
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        /// Roster members only.
        pub allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
        /// Connection limits.
        pub limits: connection_limits::Behaviour,
        /// Addresses and protocols of peers.
        pub identify: identify::Behaviour,
        /// Liveness.
        pub ping: ping::Behaviour,
        /// Discovery.
        pub kad: kad::Behaviour<kad::store::MemoryStore>,
        /// The medmesh protocol.
        pub rpc: request_response::Behaviour<FrameCodec>,
        /// Reachability probes (nodes): asks members to dial back, and dials back for them.
        pub autonat: Toggle<autonat::Behaviour>,
        /// Relaying for other members (nodes, while reachable).
        pub relay: Toggle<relay::Behaviour>,
        /// Reservations on relays and relayed connections.
        pub relay_client: relay::client::Behaviour,
        /// Hole punching: relayed connections upgraded to direct ones.
        pub dcutr: dcutr::Behaviour,
    }
}

impl Behaviour {
    /// Builds the behaviours for `key`; `relay_client` is the half of the relay client
    /// whose other half is the transport.
    pub fn new(
        key: &identity::Keypair,
        s: &BehaviourSettings,
        codec: FrameCodec,
        relay_client: relay::client::Behaviour,
    ) -> Self {
        let peer_id = key.public().to_peer_id();
        let max = Some(s.max_connections);
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(max)
            .with_max_pending_incoming(max)
            .with_max_pending_outgoing(max)
            // A direct and a relayed connection while hole punching upgrades the one to the
            // other, and AutoNAT's dial-backs until they idle out.
            .with_max_established_per_peer(Some(8));
        let identify = identify::Behaviour::new(
            identify::Config::new(s.protocols.identify.clone(), key.public())
                .with_agent_version(format!("medmesh/{}", env!("CARGO_PKG_VERSION")))
                .with_interval(Duration::from_secs(60))
                // A new relayed address (a reservation taken) reaches peers, and through
                // them the DHT, at once.
                .with_push_listen_addr_updates(true),
        );
        let mut kad_config = kad::Config::new(s.protocols.kad.clone());
        kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(30)));
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Nothing confirms external addresses inside a private network; without this a node
        // stays a DHT client and nobody answers lookups.
        kad.set_mode(Some(if s.dht_server {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        }));
        let rpc = request_response::Behaviour::with_codec(
            codec,
            [(
                s.protocols.rpc.clone(),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(s.request_timeout)
                .with_max_concurrent_streams(s.max_concurrent_streams),
        );
        Self {
            allowed: Toggle::from(s.allow_list.then(allow_block_list::Behaviour::default)),
            limits: connection_limits::Behaviour::new(limits),
            identify,
            ping: ping::Behaviour::new(ping::Config::new()),
            kad,
            rpc,
            autonat: Toggle::from(s.nat.probe_interval.map(|retry| {
                autonat::Behaviour::new(
                    peer_id,
                    autonat::Config {
                        boot_delay: Duration::from_secs(5),
                        retry_interval: retry,
                        throttle_server_period: retry.min(Duration::from_secs(30)),
                        // Consortium networks are often private address space.
                        only_global_ips: false,
                        ..autonat::Config::default()
                    },
                )
            })),
            relay: Toggle::from(s.nat.relay.map(|limits| {
                let mut relay = relay::Behaviour::new(peer_id, limits.config());
                // Off until AutoNAT finds this node reachable (the event loop switches it):
                // libp2p would switch it on for any confirmed address, a relayed one too.
                relay.set_status(Some(relay::Status::Disable));
                relay
            })),
            relay_client,
            dcutr: dcutr::Behaviour::new(peer_id),
        }
    }
}
