//! Two members connected over loopback TCP on the full private transport, for benchmarks and
//! tests of what travels between nodes.

use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{Identity, NetworkKey, Role};
use tokio::sync::mpsc;

use super::{
    BehaviourSettings, EventLoop, NetEvent, NetworkHandle, Protocols, codec, peer_id_of, transport,
};
use crate::metrics::Metrics;

/// A connected pair: the server's requests arrive on `server_requests`.
pub struct LoopbackPair {
    /// The serving side's identity.
    pub server_identity: Identity,
    /// Its handle (to answer requests).
    pub server: NetworkHandle,
    /// Requests to the server.
    pub server_requests: mpsc::Receiver<NetEvent>,
    /// The fetching side.
    pub client: NetworkHandle,
    /// The server's peer id.
    pub server_peer: PeerId,
}

fn settings() -> BehaviourSettings {
    BehaviourSettings {
        protocols: Protocols::for_consortium("loopback"),
        allow_list: true,
        dht_server: true,
        max_connections: 8,
        request_timeout: Duration::from_secs(60),
        max_concurrent_streams: 64,
        nat: super::NatSettings::default(),
    }
}

/// Starts two members (fixed test keys) on the current tokio runtime; the server listens on
/// 127.0.0.1:`port`.
pub async fn connected_pair(port: u16) -> Result<LoopbackPair, String> {
    let server_identity = Identity::from_seed(&[1; 32]);
    let client_identity = Identity::from_seed(&[2; 32]);
    let key = NetworkKey::from_bytes([9; 32]);
    let members = vec![
        (peer_id_of(&server_identity.public_key()), Role::Node),
        (peer_id_of(&client_identity.public_key()), Role::Node),
    ];
    let s = settings();
    let start = |identity: &Identity| {
        let metrics = Arc::new(Metrics::default());
        let swarm = transport::build_swarm(
            identity,
            &key,
            &s,
            codec::FrameCodec::new(metrics.clone()),
            Duration::from_secs(600),
        )
        .map_err(|e| e.to_string())?;
        Ok::<_, String>(EventLoop::new(
            swarm,
            members.clone(),
            Vec::new(),
            &s.protocols,
            metrics,
        ))
    };
    let (mut server_loop, server, server_requests) = start(&server_identity)?;
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    server_loop.listen(addr.clone())?;
    tokio::spawn(server_loop.run());
    let (client_loop, client, _) = start(&client_identity)?;
    tokio::spawn(client_loop.run());
    let server_peer = peer_id_of(&server_identity.public_key());
    let target = addr.with(libp2p::multiaddr::Protocol::P2p(server_peer));
    // The listener comes up asynchronously; retry briefly.
    let mut last = String::new();
    for _ in 0..50 {
        match client.dial(target.clone()).await {
            Ok(_) => {
                return Ok(LoopbackPair {
                    server_identity,
                    server,
                    server_requests,
                    client,
                    server_peer,
                });
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("loopback pair did not connect: {last}"))
}
