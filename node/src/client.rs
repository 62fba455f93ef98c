//! The researcher's side: a short-lived, non-listening member that joins the private network
//! with its own key, talks to one node, and leaves. Used by `experiment submit`,
//! `experiment status`, `export` and the demo.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{Identity, NetworkKey, Roster};
use medmesh_protocol::{
    Announcement, AnnouncementAnswer, Artifact, ArtifactAnswer, ArtifactRequest, Request, Response,
    SignedManifest, SignedProgress, SignedProvenance, StatusAnswer, StatusQuery,
};

use crate::metrics::Metrics;
use crate::net::{self, BehaviourSettings, EventLoop, NetworkHandle, Protocols};

/// A connection to one node.
pub struct Client {
    net: NetworkHandle,
    peer: PeerId,
    roster: Roster,
    _tasks: Tasks,
}

/// The swarm's task and the responder's: they hold each other's channels, so they are
/// stopped on drop (else the swarm and its connections would outlive the client).
struct Tasks([tokio::task::AbortHandle; 2]);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Client {
    /// Joins the network of `roster`'s consortium with `identity` and connects to `addr`.
    pub async fn connect(
        identity: &Identity,
        network_key: &NetworkKey,
        roster: Roster,
        addr: Multiaddr,
    ) -> Result<Self> {
        let protocols = Protocols::for_consortium(&roster.consortium);
        let settings = BehaviourSettings {
            protocols: protocols.clone(),
            allow_list: false,
            dht_server: false,
            max_connections: 4,
            request_timeout: Duration::from_secs(60),
            max_concurrent_streams: 16,
            nat: net::NatSettings::default(),
        };
        let swarm = net::transport::build_swarm(
            identity,
            network_key,
            &settings,
            net::codec::FrameCodec::new(Arc::new(Metrics::default())),
            Duration::from_secs(60),
        )?;
        let (event_loop, handle, mut events) = EventLoop::new(
            swarm,
            Vec::new(),
            Vec::new(),
            &protocols,
            Arc::new(Metrics::default()),
        );
        let swarm_task = tokio::spawn(event_loop.run()).abort_handle();
        // A client serves nothing; refuse whatever a node might ask it.
        let responder = handle.clone();
        let responder_task = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let net::NetEvent::Request { channel, .. } = event {
                    let refusal = Response::Refused {
                        reason: "a researcher client serves nothing".into(),
                    };
                    responder.respond(channel, refusal).await;
                }
            }
        });
        let tasks = Tasks([swarm_task, responder_task.abort_handle()]);
        // Longer than the transport's handshake timeout, so a failed handshake (a wrong
        // network key) is reported as such rather than as silence.
        let peer = tokio::time::timeout(Duration::from_secs(30), handle.dial(addr.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("no connection to {addr} within 30 s"))?
            .with_context(|| {
                format!(
                    "cannot connect to {addr} (a wrong network key shows up as a failed handshake)"
                )
            })?;
        Ok(Self {
            net: handle,
            peer,
            roster,
            _tasks: tasks,
        })
    }

    /// The node's peer id.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The client's network, for requests beyond the researcher's commands.
    pub fn network(&self) -> &NetworkHandle {
        &self.net
    }

    async fn ask(&self, request: Request) -> Result<Response> {
        let answer = self.net.request(self.peer, request).await;
        match answer {
            Ok(Response::Refused { reason }) => bail!("the node refused: {reason}"),
            Ok(other) => Ok(other),
            Err(e) => Err(e).context("no answer from the node (is this key on its roster?)"),
        }
    }

    /// Hands a signed manifest to the node; Ok once the node accepted it.
    pub async fn submit(&self, signed: SignedManifest) -> Result<()> {
        let id = signed.manifest.id.clone();
        let request = Request::Announce(Announcement::Manifest(Box::new(signed)));
        match self.ask(request).await? {
            Response::Announce(AnnouncementAnswer::Manifest {
                rejection: None, ..
            }) => Ok(()),
            Response::Announce(AnnouncementAnswer::Manifest {
                rejection: Some(why),
                ..
            }) => bail!("the node rejected experiment {id:?}: {why}"),
            other => bail!("unexpected answer: {}", other.describe()),
        }
    }

    /// Hands a newer roster to the node, which adopts it if its stewards endorsed it and
    /// spreads it; members it drops or revokes are disconnected.
    pub async fn announce_roster(&self, roster: medmesh_crypto::SignedRoster) -> Result<()> {
        match self
            .ask(Request::Announce(Announcement::Roster(roster)))
            .await?
        {
            Response::Announce(AnnouncementAnswer::Ack) => Ok(()),
            other => bail!("unexpected answer: {}", other.describe()),
        }
    }

    /// Every site's latest progress the node knows of, signature-checked against the roster.
    pub async fn status(&self, experiment: Option<&str>) -> Result<Vec<SignedProgress>> {
        let query = Request::Status(StatusQuery {
            experiment_id: experiment.map(str::to_owned),
        });
        match self.ask(query).await? {
            Response::Status(StatusAnswer { records, .. }) => {
                let mut good = Vec::with_capacity(records.len());
                for r in records {
                    match r.verify(&self.roster) {
                        Ok(()) => good.push(r),
                        Err(e) => tracing::warn!("dropping a progress record: {e}"),
                    }
                }
                good.sort_by_key(|r| (r.record.experiment_id.clone(), self.site(&r.record.node)));
                Ok(good)
            }
            other => bail!("unexpected answer: {}", other.describe()),
        }
    }

    /// The site name of a key on the roster.
    pub fn site(&self, key: &medmesh_crypto::PublicKey) -> String {
        self.roster
            .member(key)
            .map_or_else(|| key.to_string(), |m| m.site.clone())
    }

    /// Downloads one artifact of a finished experiment.
    pub async fn artifact(&self, experiment: &str, artifact: Artifact) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        loop {
            let request = Request::Artifact(ArtifactRequest {
                experiment_id: experiment.to_owned(),
                artifact,
                offset: bytes.len() as u64,
            });
            match self.ask(request).await? {
                Response::Artifact(ArtifactAnswer::Chunk {
                    total_len,
                    offset,
                    bytes: chunk,
                }) => {
                    if offset != bytes.len() as u64 || total_len > (4 << 30) {
                        bail!(
                            "the node sent a chunk at {offset} of {total_len} bytes, expected offset {}",
                            bytes.len()
                        );
                    }
                    if chunk.is_empty() && (bytes.len() as u64) < total_len {
                        bail!("the node sent an empty chunk before the end");
                    }
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() as u64 >= total_len {
                        return Ok(bytes);
                    }
                }
                other => bail!("{}", other.describe()),
            }
        }
    }

    /// Downloads the model and its provenance and checks them against each other and the
    /// roster. Returns (model bytes, provenance).
    pub async fn export(&self, experiment: &str) -> Result<(Vec<u8>, SignedProvenance)> {
        let provenance = self.artifact(experiment, Artifact::Provenance).await?;
        let provenance: SignedProvenance = serde_json::from_slice(&provenance)
            .context("the node's provenance file is not valid")?;
        let model = self.artifact(experiment, Artifact::Model).await?;
        provenance.verify(&self.roster, &model)?;
        Ok((model, provenance))
    }
}
