//! The node's libp2p behaviours, combined. Field order is the order of the checks: the
//! roster allow-list and the connection limits see every connection before anything else.

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, allow_block_list, connection_limits, identify, identity, kad, ping,
    request_response,
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
}

pub use derived::{Behaviour, BehaviourEvent};

/// The derive generates `BehaviourEvent`, one variant per field, without docs.
#[allow(missing_docs)]
mod derived {
    use libp2p::swarm::NetworkBehaviour;
    use libp2p::swarm::behaviour::toggle::Toggle;
    use libp2p::{allow_block_list, connection_limits, identify, kad, ping, request_response};

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
    }
}

impl Behaviour {
    /// Builds the behaviours for `key`.
    pub fn new(key: &identity::Keypair, s: &BehaviourSettings, codec: FrameCodec) -> Self {
        let peer_id = key.public().to_peer_id();
        let max = Some(s.max_connections);
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(max)
            .with_max_pending_incoming(max)
            .with_max_pending_outgoing(max)
            .with_max_established_per_peer(Some(2));
        let identify = identify::Behaviour::new(
            identify::Config::new(s.protocols.identify.clone(), key.public())
                .with_agent_version(format!("medmesh/{}", env!("CARGO_PKG_VERSION")))
                .with_interval(Duration::from_secs(60)),
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
        }
    }
}
