//! The node's network: a libp2p swarm owned by one event-loop task, driven through a cheap,
//! cloneable [`NetworkHandle`] (the shape of rust-libp2p's file-sharing example).
//!
//! * [`transport`]: TCP + pnet + Noise + Yamux.
//! * [`behaviour`]: allow-list, connection limits, identify, ping, Kademlia, request-response.
//! * [`codec`]: length-prefixed, size-limited bincode frames.
//! * [`event_loop`]: the task that owns the swarm.
//! * [`rate_limit`]: per-peer request budgets.
//! * [`nat`]: reachability, relays and hole punching, as the event loop tracks them.
//! * [`loopback`]: two connected members, for benchmarks and tests.

pub mod behaviour;
pub mod codec;
pub mod event_loop;
pub mod loopback;
pub mod nat;
pub mod rate_limit;
pub mod transport;

use std::time::Duration;

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{PublicKey, Role};
use medmesh_protocol::{Request, Response};
use tokio::sync::{mpsc, oneshot};

pub use behaviour::{BehaviourSettings, NatSettings, Protocols, RelayLimits};
pub use event_loop::EventLoop;
pub use nat::{Path, RelayPolicy};

/// The libp2p peer id of a medmesh public key.
pub fn peer_id_of(key: &PublicKey) -> PeerId {
    PeerId::from_bytes(&key.peer_id().to_bytes())
        .unwrap_or_else(|e| unreachable!("an ed25519 peer id always parses: {e}"))
}

/// Why a request did not get an answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    /// Could not connect.
    #[error("could not reach {peer}: {reason}")]
    Dial {
        /// Whom.
        peer: String,
        /// libp2p's explanation.
        reason: String,
    },
    /// No answer within the request timeout.
    #[error("{0} did not answer in time")]
    Timeout(PeerId),
    /// The connection closed before the answer came.
    #[error("connection to {0} closed during the request")]
    ConnectionClosed(PeerId),
    /// The peer does not speak this consortium's protocol.
    #[error("{0} does not speak this consortium's protocol")]
    UnsupportedProtocol(PeerId),
    /// Anything else on the stream (including a malformed or oversized answer).
    #[error("stream error with {peer}: {reason}")]
    Stream {
        /// Whom.
        peer: PeerId,
        /// What.
        reason: String,
    },
    /// The peer stayed busy (overloaded, or this node exceeded its request rate there)
    /// through every retry.
    #[error("{0} stayed busy; gave up after {BUSY_RETRIES} retries")]
    Busy(PeerId),
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Shutdown,
}

/// Times [`NetworkHandle::request`] asks again after a [`Response::Busy`] answer.
pub const BUSY_RETRIES: u32 = 8;

/// The longest wait between those retries, whatever the peer asks for.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(2);

/// What the network tells the application.
#[derive(Debug)]
pub enum NetEvent {
    /// A request from a roster member; answer it with [`NetworkHandle::respond`].
    Request {
        /// Who asked.
        peer: PeerId,
        /// What (boxed: requests are large, connection events small).
        request: Box<Request>,
        /// Where the answer goes.
        channel: ResponseChannel<Response>,
    },
    /// A node member connected (first connection).
    Connected(PeerId),
    /// A node member's last connection closed.
    Disconnected(PeerId),
}

pub(crate) enum Command {
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, NetError>>,
    },
    Respond {
        channel: ResponseChannel<Response>,
        response: Response,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetError>>,
    },
    ConnectedNodes {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    SetMembers {
        members: Vec<(PeerId, Role)>,
    },
    Isolate {
        peers: Vec<PeerId>,
    },
    Want {
        peers: Vec<PeerId>,
    },
    Reachability {
        peers: Vec<PeerId>,
        reply: oneshot::Sender<Reachability>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerState>>,
    },
    Path {
        peer: PeerId,
        reply: oneshot::Sender<Option<Path>>,
    },
}

/// A member's connection as this node sees it (for the dashboard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// The member.
    pub peer: PeerId,
    /// Since when it is connected; `None` when it is not.
    pub connected_since: Option<std::time::SystemTime>,
    /// When a connection to it last opened or closed; `None` if it never connected.
    pub last_seen: Option<std::time::SystemTime>,
    /// The remote address of its latest connection.
    pub address: Option<Multiaddr>,
    /// Whether the last dial to it failed (and it has not connected since).
    pub unreachable: bool,
    /// How it is connected now: directly or through a relay; `None` when it is not.
    pub path: Option<Path>,
}

/// How many of some members are reachable now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reachability {
    /// Connected.
    pub connected: usize,
    /// Not connected, and the last dial failed.
    pub failed: usize,
}

/// Talks to the event loop.
#[derive(Clone)]
pub struct NetworkHandle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
}

impl NetworkHandle {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Sends `request` to `peer` (dialing if needed) and waits for the answer; a busy peer
    /// is asked again after the wait it names, up to [`BUSY_RETRIES`] times.
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, NetError> {
        for _ in 0..BUSY_RETRIES {
            match self.request_once(peer, request.clone()).await? {
                Response::Busy { retry_after_ms } => {
                    let wait = Duration::from_millis(retry_after_ms.into()).min(MAX_BUSY_WAIT);
                    tokio::time::sleep(wait).await;
                }
                answer => return Ok(answer),
            }
        }
        match self.request_once(peer, request).await? {
            Response::Busy { .. } => Err(NetError::Busy(peer)),
            answer => Ok(answer),
        }
    }

    /// Sends `request` to `peer` once and returns whatever it answers, [`Response::Busy`]
    /// included.
    pub async fn request_once(&self, peer: PeerId, request: Request) -> Result<Response, NetError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request {
                peer,
                request,
                reply,
            })
            .await
            .map_err(|_| NetError::Shutdown)?;
        answer.await.map_err(|_| NetError::Shutdown)?
    }

    /// Answers an inbound request.
    pub async fn respond(&self, channel: ResponseChannel<Response>, response: Response) {
        // Fails only when the loop has stopped, and then there is no one left to answer.
        let _ = self
            .commands
            .send(Command::Respond { channel, response })
            .await;
    }

    /// Connects to `addr`; returns the peer's id once the connection is up.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Dial { addr, reply })
            .await
            .map_err(|_| NetError::Shutdown)?;
        answer.await.map_err(|_| NetError::Shutdown)?
    }

    /// Node members (not researchers) connected now, sorted.
    pub async fn connected_nodes(&self) -> Vec<PeerId> {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::ConnectedNodes { reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Replaces the roster's members: only they may connect; others are disconnected.
    pub async fn set_members(&self, members: Vec<(PeerId, Role)>) {
        let _ = self.commands.send(Command::SetMembers { members }).await;
    }

    /// The node members this node talks to now (a round's neighbours): they are dialed if
    /// not connected, found through the DHT if their addresses are unknown, and connections
    /// to members wanted neither now nor by the previous call are closed. So a node's
    /// connections follow its rounds' sparse graph, not the roster.
    pub async fn want(&self, peers: Vec<PeerId>) {
        let _ = self.commands.send(Command::Want { peers }).await;
    }

    /// Of `peers`, how many are connected and how many could not be dialed.
    pub async fn reachability(&self, peers: Vec<PeerId>) -> Reachability {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::Reachability { peers, reply })
            .await
            .is_err()
        {
            return Reachability::default();
        }
        answer.await.unwrap_or_default()
    }

    /// The connection state of every member this node has connected to or tried to.
    pub async fn peers(&self) -> Vec<PeerState> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Peers { reply }).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// How `peer` is connected now (directly, or only through a relay); `None` if it is not.
    pub async fn path(&self, peer: PeerId) -> Option<Path> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Path { peer, reply })
            .await
            .ok()?;
        answer.await.ok().flatten()
    }

    /// Cuts this node off from `peers` (a partition drill): their connections are closed
    /// and refused, and they are not dialed, until a later call leaves them out.
    pub async fn isolate(&self, peers: Vec<PeerId>) {
        let _ = self.commands.send(Command::Isolate { peers }).await;
    }
}
