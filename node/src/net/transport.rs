//! The private transport: TCP, then the consortium's pre-shared key (pnet: without it the
//! bytes that follow are noise to us), then Noise (peer authentication), then Yamux.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{PeerId, Swarm, Transport, identity, noise, tcp, yamux};
use medmesh_crypto::{Identity, NetworkKey};

use super::behaviour::{Behaviour, BehaviourSettings};
use super::codec::FrameCodec;

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the libp2p swarm: {0}")]
pub struct TransportError(String);

/// The libp2p keypair of a medmesh identity (the same ed25519 key signs updates).
pub fn keypair(identity: &Identity) -> identity::Keypair {
    let mut seed = *identity.seed();
    identity::Keypair::ed25519_from_bytes(&mut seed)
        .unwrap_or_else(|e| unreachable!("a 32-byte seed is a valid ed25519 secret: {e}"))
}

/// The private transport alone, for swarms with other behaviours (red-team tools, tests).
pub fn private_transport(
    key: &identity::Keypair,
    network_key: &NetworkKey,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, TransportError> {
    let psk = PreSharedKey::new(*network_key.as_bytes());
    let noise = noise::Config::new(key).map_err(|e| TransportError(e.to_string()))?;
    Ok(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(Duration::from_secs(20))
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    )
}

/// Builds a swarm on the private transport.
pub fn build_swarm(
    identity: &Identity,
    network_key: &NetworkKey,
    settings: &BehaviourSettings,
    codec: FrameCodec,
    idle_timeout: Duration,
) -> Result<Swarm<Behaviour>, TransportError> {
    let err = |e: &dyn std::fmt::Display| TransportError(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair(identity))
        .with_tokio()
        .with_other_transport(|key| {
            private_transport(key, network_key)
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })
        .map_err(|e| err(&e))?
        .with_dns()
        .map_err(|e| err(&e))?
        .with_behaviour(|key| Behaviour::new(key, settings, codec))
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();
    Ok(swarm)
}
