//! The private transport: TCP, then the consortium's pre-shared key (pnet: without it the
//! bytes that follow are noise to us), then Noise (peer authentication), then Yamux.
//!
//! Relayed connections get the same stack end to end: the circuit a relay opens between two
//! members is a stream inside each member's own private connection to the relay, and the two
//! members run pnet, Noise and Yamux again over it. So the relay forwards ciphertext of a key
//! it holds but cannot use for them (its Noise sessions are with each end, not between them),
//! and a member reached through a relay checks the network key exactly as on a direct
//! connection. (libp2p's `SwarmBuilder::with_relay_client` would apply Noise and Yamux only.)

use std::time::Duration;

use futures::future::Either;
use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{PeerId, Swarm, Transport, dns, identity, noise, relay, swarm, tcp, yamux};
use medmesh_crypto::{Identity, NetworkKey};

use super::behaviour::{Behaviour, BehaviourSettings};
use super::codec::FrameCodec;

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the libp2p swarm: {0}")]
pub struct TransportError(String);

/// How long a connection may take to come up, handshakes included.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// The libp2p keypair of a medmesh identity (the same ed25519 key signs updates).
pub fn keypair(identity: &Identity) -> identity::Keypair {
    let mut seed = *identity.seed();
    identity::Keypair::ed25519_from_bytes(&mut seed)
        .unwrap_or_else(|e| unreachable!("a 32-byte seed is a valid ed25519 secret: {e}"))
}

/// pnet with `psk`, Noise with `key`, Yamux, over whatever `base` connects.
fn secure<T>(
    base: T,
    key: &identity::Keypair,
    psk: PreSharedKey,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, TransportError>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    let noise = noise::Config::new(key).map_err(|e| TransportError(e.to_string()))?;
    Ok(base
        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// The private transport alone (TCP only), for swarms with other behaviours (red-team
/// tools, tests).
pub fn private_transport(
    key: &identity::Keypair,
    network_key: &NetworkKey,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, TransportError> {
    let psk = PreSharedKey::new(*network_key.as_bytes());
    secure(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)),
        key,
        psk,
    )
}

/// TCP (with DNS) and relayed circuits, each under pnet + Noise + Yamux: `hop_key` guards
/// the connections to peers and relays, `circuit_key` the end-to-end connections through
/// relays. Nodes use the network key for both; tests use two to show that the second is
/// checked.
pub(crate) fn relaying_transport(
    key: &identity::Keypair,
    hop_key: &NetworkKey,
    circuit_key: &NetworkKey,
) -> Result<(Boxed<(PeerId, StreamMuxerBox)>, relay::client::Behaviour), TransportError> {
    let tcp = dns::tokio::Transport::system(tcp::tokio::Transport::new(
        tcp::Config::default().nodelay(true),
    ))
    .map_err(|e| TransportError(format!("reading the system's DNS configuration: {e}")))?;
    let direct = secure(tcp, key, PreSharedKey::new(*hop_key.as_bytes()))?;
    let (circuits, client) = relay::client::new(key.public().to_peer_id());
    let relayed = secure(circuits, key, PreSharedKey::new(*circuit_key.as_bytes()))?;
    // Circuits first: the DNS transport claims every address and fails later on those it
    // cannot dial, while the relay transport declines non-circuit addresses at once.
    let transport = relayed
        .or_transport(direct)
        .map(|either, _| match either {
            Either::Left(out) | Either::Right(out) => out,
        })
        .boxed();
    Ok((transport, client))
}

/// Builds a swarm on the private transport, relayed circuits included.
pub fn build_swarm(
    identity: &Identity,
    network_key: &NetworkKey,
    settings: &BehaviourSettings,
    codec: FrameCodec,
    idle_timeout: Duration,
) -> Result<Swarm<Behaviour>, TransportError> {
    build_swarm_with_keys(
        identity,
        network_key,
        network_key,
        settings,
        codec,
        idle_timeout,
    )
}

/// [`build_swarm`] with separate keys for hops and circuits (see [`relaying_transport`]).
pub(crate) fn build_swarm_with_keys(
    identity: &Identity,
    hop_key: &NetworkKey,
    circuit_key: &NetworkKey,
    settings: &BehaviourSettings,
    codec: FrameCodec,
    idle_timeout: Duration,
) -> Result<Swarm<Behaviour>, TransportError> {
    let key = keypair(identity);
    let (transport, relay_client) = relaying_transport(&key, hop_key, circuit_key)?;
    let behaviour = Behaviour::new(&key, settings, codec, relay_client);
    Ok(Swarm::new(
        transport,
        behaviour,
        key.public().to_peer_id(),
        swarm::Config::with_tokio_executor().with_idle_connection_timeout(idle_timeout),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use futures::StreamExt;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, relay};
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::metrics::Metrics;
    use crate::net::behaviour::BehaviourEvent;
    use crate::net::{NatSettings, Protocols, RelayLimits};

    fn settings(relay: Option<RelayLimits>) -> BehaviourSettings {
        BehaviourSettings {
            protocols: Protocols::for_consortium("relay-test"),
            allow_list: false,
            dht_server: false,
            max_connections: 16,
            request_timeout: Duration::from_secs(10),
            max_concurrent_streams: 8,
            nat: NatSettings {
                relay,
                probe_interval: None,
            },
        }
    }

    fn swarm(
        seed: u8,
        hop: &NetworkKey,
        circuit: &NetworkKey,
        relay: Option<RelayLimits>,
    ) -> Swarm<Behaviour> {
        build_swarm_with_keys(
            &Identity::from_seed(&[seed; 32]),
            hop,
            circuit,
            &settings(relay),
            FrameCodec::new(Arc::new(Metrics::default())),
            Duration::from_secs(30),
        )
        .unwrap()
    }

    /// A relay with `limits` on 127.0.0.1:`port`, serving (as a node does once AutoNAT finds
    /// it reachable), and a member holding a reservation on it; returns the address that
    /// reaches the member through the relay, the member's id, and the errors of relayed
    /// connections that reached the member but failed there.
    async fn relay_and_member(
        port: u16,
        key: &NetworkKey,
        limits: RelayLimits,
    ) -> (Multiaddr, PeerId, mpsc::UnboundedReceiver<String>) {
        let mut relay_swarm = swarm(1, key, key, Some(limits));
        let relay_peer = *relay_swarm.local_peer_id();
        let listen: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        relay_swarm.listen_on(listen.clone()).unwrap();
        relay_swarm.add_external_address(listen.clone());
        if let Some(relay) = relay_swarm.behaviour_mut().relay.as_mut() {
            relay.set_status(Some(relay::Status::Enable));
        }
        tokio::spawn(async move {
            loop {
                relay_swarm.select_next_some().await;
            }
        });
        let mut member = swarm(2, key, key, None);
        let member_peer = *member.local_peer_id();
        let via_relay = listen
            .with(Protocol::P2p(relay_peer))
            .with(Protocol::P2pCircuit);
        let (reserved, on_reserved) = oneshot::channel();
        let (failed_tx, failed) = mpsc::unbounded_channel();
        let mut reserved = Some(reserved);
        let mut attempts = 0;
        member.listen_on(via_relay.clone()).unwrap();
        let target = via_relay.clone().with(Protocol::P2p(member_peer));
        tokio::spawn(async move {
            loop {
                match member.select_next_some().await {
                    SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                        relay::client::Event::ReservationReqAccepted { .. },
                    )) => {
                        if let Some(tx) = reserved.take() {
                            let _ = tx.send(());
                        }
                    }
                    SwarmEvent::IncomingConnectionError {
                        error, local_addr, ..
                    } if local_addr.iter().any(|p| p == Protocol::P2pCircuit) => {
                        let _ = failed_tx.send(format!("{error:?}"));
                    }
                    // The relay may not listen yet when the first request goes out.
                    SwarmEvent::ListenerClosed { .. } if attempts < 20 => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        member.listen_on(via_relay.clone()).unwrap();
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), on_reserved)
            .await
            .expect("no reservation within 20 s")
            .unwrap();
        (target, member_peer, failed)
    }

    /// Dials `target` from a fresh swarm with these keys. Ok(how long the relayed
    /// connection to `peer` lasted, up to `hold`) once connected; Err if it never was.
    async fn dial_through(
        seed: u8,
        hop: &NetworkKey,
        circuit: &NetworkKey,
        target: Multiaddr,
        peer: PeerId,
        hold: Duration,
    ) -> Result<Duration, String> {
        let mut s = swarm(seed, hop, circuit, None);
        s.dial(target).map_err(|e| e.to_string())?;
        let up = loop {
            match s.select_next_some().await {
                SwarmEvent::ConnectionEstablished {
                    peer_id, endpoint, ..
                } if peer_id == peer => {
                    assert!(endpoint.is_relayed(), "{endpoint:?}");
                    break Instant::now();
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error.to_string()),
                _ => {}
            }
        };
        let closed = tokio::time::timeout(hold, async {
            loop {
                if let SwarmEvent::ConnectionClosed { peer_id, .. } = s.select_next_some().await
                    && peer_id == peer
                {
                    return;
                }
            }
        })
        .await;
        Ok(match closed {
            Ok(()) => up.elapsed(),
            Err(_) => hold,
        })
    }

    fn limits(circuit_bytes: u64, circuit_duration: Duration) -> RelayLimits {
        RelayLimits {
            max_reservations: 8,
            max_circuits: 8,
            circuit_bytes,
            circuit_duration,
        }
    }

    /// A relayed connection runs pnet end to end, not just on each hop to the relay: a
    /// member that passes the hop with the right key but holds another key for the circuit
    /// cannot connect through the relay, and one with the right key for both can.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relayed_connections_carry_the_network_key_end_to_end() {
        let key = NetworkKey::from_bytes([7; 32]);
        let other = NetworkKey::from_bytes([8; 32]);
        let (target, member, mut failed) =
            relay_and_member(21700, &key, limits(1 << 20, Duration::from_secs(60))).await;
        let hold = Duration::from_millis(500);
        let wrong = dial_through(3, &key, &other, target.clone(), member, hold).await;
        wrong.expect_err("a wrong circuit key must not connect through the relay");
        // The relay opened the circuit (the member saw the connection), and the upgrade over
        // it (pnet, then Noise) failed there.
        let seen = tokio::time::timeout(Duration::from_secs(25), failed.recv())
            .await
            .expect("the member saw no relayed connection fail")
            .unwrap();
        assert!(seen.starts_with("Transport("), "{seen}");
        let lasted = dial_through(4, &key, &key, target, member, hold)
            .await
            .expect("the right key connects through the relay");
        assert_eq!(lasted, hold, "within the limits the connection stays");
    }

    /// A relay closes a relayed connection at the consortium's limits: after
    /// `relay_circuit_secs`, and after `relay_circuit_mib` (here: 2 KiB, which the
    /// peers' identify exchange alone exceeds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_close_connections_at_their_limits() {
        let key = NetworkKey::from_bytes([7; 32]);
        let hold = Duration::from_secs(15);
        let (target, member, _) =
            relay_and_member(21701, &key, limits(1 << 20, Duration::from_secs(2))).await;
        let lasted = dial_through(5, &key, &key, target, member, hold)
            .await
            .unwrap();
        assert!(
            lasted > Duration::from_millis(1500) && lasted < Duration::from_secs(5),
            "a 2 s circuit lasted {lasted:?}"
        );
        let (target, member, _) =
            relay_and_member(21702, &key, limits(2048, Duration::from_secs(60))).await;
        let lasted = dial_through(6, &key, &key, target, member, hold)
            .await
            .unwrap();
        assert!(
            lasted < Duration::from_secs(5),
            "a 2 KiB circuit lasted {lasted:?}"
        );
    }
}
