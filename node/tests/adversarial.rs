//! A malicious member and a crowd of outsiders against real nodes on loopback.
//!
//! * A member breaks every rule an update can break, one round each (NaN weights, a norm far
//!   beyond the bound, a flipped payload bit, a foreign layout, a replayed round, a claim of
//!   10^12 training samples against the manifest's sample-weight bound), and sends
//!   oversized and malformed frames: the honest nodes drop each one, count it under its
//!   reason, log it once with the sender's id, and finish the experiment.
//! * Every kind of request, from a researcher's key and from a node's: updates and progress
//!   records pass between nodes only; the researcher's are refused, counted and logged, and
//!   so is its export of a model whose manifest keeps it with the sites. A
//!   forged manifest that a member forwards is refused by every node, not only the first.
//! * 1,000 connection attempts without the network key: none completes a handshake, and the
//!   nodes train and answer their researcher meanwhile.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{StreamProtocol, SwarmBuilder};
use medmesh_crypto::Identity;
use medmesh_node::client::Client;
use medmesh_node::config::NodeConfig;
use medmesh_node::local::{self, LocalConsortium, Nodes};
use medmesh_node::metrics::parse_value;
use medmesh_node::net::behaviour::Protocols;
use medmesh_node::net::{peer_id_of, transport};
use medmesh_node::service::{self, Hooks};
use medmesh_protocol::manifest::Scheme;
use medmesh_protocol::{
    Announcement, Artifact, ArtifactRequest, Manifest, Request, Response, SignedManifest,
    SignedProgress, StatusQuery, UpdateEnvelope, UpdateRequest,
};
use tokio::io::AsyncWriteExt as _;

const BIN: &str = env!("CARGO_BIN_EXE_medmesh");

/// A sealed envelope with its payload, as a node offers it.
type Offer = (UpdateEnvelope, Vec<u8>);

fn manifest(id: &str, rounds: u32) -> Manifest {
    let mut m = local::test_manifest(rounds, Scheme::MetropolisHastings).unwrap();
    // Every site pulls from every other each round: each honest node meets the attacker.
    m.averaging.fanout = Some(64);
    m.id = id.into();
    m.task.input_size = [32, 32];
    m.averaging.round_timeout_secs = 60;
    m.validate().unwrap();
    m
}

fn wait_finished(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    id: &str,
    n: usize,
) -> Vec<SignedProgress> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let records = rt.block_on(client.status(Some(id))).unwrap();
        if records.len() == n && records.iter().all(|p| p.record.finished) {
            return records;
        }
        assert!(Instant::now() < deadline, "did not finish: {records:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A client of node `site` with `key`'s membership.
fn connect(
    rt: &tokio::runtime::Runtime,
    c: &LocalConsortium,
    key: &Identity,
    site: usize,
) -> Client {
    rt.block_on(Client::connect(
        key,
        &c.network_key,
        c.roster.clone(),
        c.addr(site),
    ))
    .unwrap()
}

/// A consortium of `sites` whose first `running` sites run `medmesh run`, meshed.
fn start_nodes(
    dir: &Path,
    sites: usize,
    running: usize,
    port: u16,
) -> (LocalConsortium, Nodes, tokio::runtime::Runtime) {
    let c = LocalConsortium::create(dir, sites, port).unwrap();
    c.prepare_data(8, 32, 4).unwrap();
    let mut nodes = Nodes(Vec::new());
    for i in 0..running {
        nodes.0.push(c.spawn_node(Path::new(BIN), i, 1).unwrap());
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics: Vec<String> = (0..running).map(|i| c.metrics_addr(i)).collect();
    local::wait_for_mesh(&rt, &metrics, &mut nodes, running).unwrap();
    (c, nodes, rt)
}

/// Sends whatever bytes it is given as a request, and reads any answer whole: a member's
/// client that does not follow the framing rules.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.take(1 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn read_response<T>(&mut self, p: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_request(p, io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&r).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write_request(p, io, r).await
    }
}

/// Connects to `c`'s node 0 as member `site` and sends it an oversized and a malformed frame.
async fn send_bad_frames(c: &LocalConsortium, site: usize) {
    let protocol = Protocols::for_consortium(&c.roster.consortium).rpc;
    let keypair = transport::keypair(&c.sites[site]);
    let mut swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            transport::private_transport(key, &c.network_key)
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::<RawCodec>::new(
                [(protocol, ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .build();
    swarm.dial(c.addr(0)).unwrap();
    let node = peer_id_of(&c.sites[0].public_key());
    loop {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await
            && peer_id == node
        {
            break;
        }
    }
    let mut oversized = u32::MAX.to_le_bytes().to_vec();
    oversized.extend_from_slice(&[0xAB; 64]);
    let mut malformed = 40u32.to_le_bytes().to_vec();
    malformed.extend_from_slice(&[0xFF; 40]);
    swarm.behaviour_mut().send_request(&node, oversized);
    swarm.behaviour_mut().send_request(&node, malformed);
    // Each is answered with a refusal that says what was wrong.
    let mut answers = Vec::new();
    while answers.len() < 2 {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                panic!("the node did not answer a bad frame: {error}")
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            }) => answers.push(Response::decode(&response[4..]).unwrap()),
            _ => {}
        }
    }
    let reasons: Vec<String> = answers
        .into_iter()
        .map(|a| match a {
            Response::Refused { reason } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("exceeds the limit")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("malformed")),
        "{reasons:?}"
    );
}

#[test]
fn a_malicious_member_is_dropped_counted_and_logged_while_the_experiment_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Sites 0-2 honest, 3 the attacker's node (in this process), 4 its raw client.
    let (honest, attacker, raw) = (3, 3, 4);
    let c = LocalConsortium::create(dir.path(), 5, 19000).unwrap();
    c.prepare_data(8, 32, 4).unwrap();
    let mut nodes = Nodes(Vec::new());
    for i in 0..honest {
        nodes.0.push(c.spawn_node(Path::new(BIN), i, 1).unwrap());
    }
    let identity = medmesh_crypto::Identity::from_seed(&c.sites[attacker].seed());
    let replay: Arc<Mutex<Option<Offer>>> = Arc::default();
    let hooks = Hooks {
        tamper_update: Some(Arc::new(|round: u64, w: &mut [f32]| match round {
            2 => w[17] = f32::NAN,
            3 => w.iter_mut().for_each(|v| *v *= 1e4),
            _ => {}
        })),
        tamper_offer: Some(Arc::new(move |round, envelope, payload| match round {
            1 => *replay.lock().unwrap() = Some((envelope.clone(), payload.clone())),
            4 => payload[100] ^= 0x08,
            5 => {
                let mut header = envelope.header.clone();
                header.layout_digest[0] ^= 1;
                header.num_params += 1;
                payload.extend_from_slice(&[0; 4]);
                *envelope = UpdateEnvelope::seal(header, payload, &identity);
            }
            6 => {
                let old = replay.lock().unwrap().clone().unwrap();
                (*envelope, *payload) = old;
            }
            7 => {
                // A validly signed claim of 10^12 training samples.
                let mut header = envelope.header.clone();
                header.sample_weight = 1e12;
                *envelope = UpdateEnvelope::seal(header, payload, &identity);
            }
            _ => {}
        })),
        ..Hooks::default()
    };
    let config = NodeConfig::load(&c.node_dir(attacker).join("node.toml"), None).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.spawn(async move {
        if let Err(e) = service::run_with(config, hooks).await {
            eprintln!("in-process node stopped: {e:#}");
        }
    });
    let metrics: Vec<String> = (0..=attacker).map(|i| c.metrics_addr(i)).collect();
    local::wait_for_mesh(&rt, &metrics, &mut nodes, attacker + 1).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap_or_default();
        panic!("{e}\n{log}")
    });

    rt.block_on(send_bad_frames(&c, raw));

    let client = rt
        .block_on(Client::connect(
            &c.researcher,
            &c.network_key,
            c.roster.clone(),
            c.addr(0),
        ))
        .unwrap();
    let mut m = manifest("adversarial-test", 8);
    m.averaging.norm_bound = Some(1e3);
    rt.block_on(client.submit(SignedManifest::sign(m, &c.researcher)))
        .unwrap();
    let records = wait_finished(&rt, &client, "adversarial-test", attacker + 1);
    for p in &records {
        assert!(p.record.metric.is_finite() && p.record.round == 8, "{p:?}");
    }

    let attacker_id = peer_id_of(&c.sites[attacker].public_key()).to_string();
    let raw_id = peer_id_of(&c.sites[raw].public_key()).to_string();
    for i in 0..honest {
        let text = rt.block_on(local::scrape(&c.metrics_addr(i))).unwrap();
        let log = std::fs::read_to_string(c.node_dir(i).join("node.log")).unwrap();
        for reason in [
            "non_finite_weights",
            "norm_bound",
            "hash_mismatch",
            "wrong_layout",
            "replayed_update",
            "sample_weight_bound",
        ] {
            let counted = parse_value(
                &text,
                &format!("medmesh_rejected_total{{reason=\"{reason}\"}}"),
            );
            assert_eq!(counted, Some(1.0), "node {i}, {reason}:\n{text}");
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("dropped an update") && l.contains(reason))
                .collect();
            assert_eq!(lines.len(), 1, "node {i}, {reason}: {lines:?}");
            assert!(lines[0].contains(&attacker_id), "{}", lines[0]);
        }
        if i == 0 {
            for reason in ["oversized", "malformed"] {
                let counted = parse_value(
                    &text,
                    &format!("medmesh_rejected_total{{reason=\"{reason}\"}}"),
                );
                assert_eq!(counted, Some(1.0), "{reason}:\n{text}");
            }
            for reason in ["oversized", "malformed"] {
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("dropped a bad frame") && l.contains(reason))
                    .collect();
                assert_eq!(lines.len(), 1, "{reason}: {lines:?}");
                assert!(lines[0].contains(&raw_id), "{}", lines[0]);
            }
        }
    }
    drop(nodes);
    rt.shutdown_background();
}

#[test]
fn a_thousand_outsider_attempts_fail_while_the_nodes_train() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2;
    let (c, nodes, rt) = start_nodes(dir.path(), n, n, 19200);
    let client = rt
        .block_on(Client::connect(
            &c.researcher,
            &c.network_key,
            c.roster.clone(),
            c.addr(0),
        ))
        .unwrap();
    rt.block_on(client.submit(SignedManifest::sign(
        manifest("outsiders-test", 6),
        &c.researcher,
    )))
    .unwrap();

    // What a peer with another network key sends: a 24-byte pnet nonce, then a stream
    // encrypted under its key, which is noise under ours. 1,000 of them, 50 at a time.
    let target = format!("127.0.0.1:{}", c.port);
    let attempts = rt.block_on(async {
        let mut done = 0u32;
        for wave in 0..20u32 {
            let sends = (0..50u32).map(|k| {
                let target = target.clone();
                async move {
                    let mut stream = tokio::net::TcpStream::connect(&target).await.ok()?;
                    let noise: Vec<u8> = (0..24 + 96u32)
                        .map(|b| (b.wrapping_mul(31) ^ (wave * 50 + k)) as u8)
                        .collect();
                    stream.write_all(&noise).await.ok()?;
                    let _ = stream.shutdown().await;
                    Some(())
                }
            });
            done += futures::future::join_all(sends)
                .await
                .iter()
                .flatten()
                .count() as u32;
            // The researcher is answered while the crowd knocks.
            assert!(client.status(Some("outsiders-test")).await.is_ok());
        }
        done
    });
    assert_eq!(attempts, 1000, "every attempt reached the node's socket");

    let records = wait_finished(&rt, &client, "outsiders-test", n);
    assert!(records.iter().all(|p| p.record.round == 6));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = rt.block_on(local::scrape(&c.metrics_addr(0))).unwrap();
        let handshakes = parse_value(&text, "medmesh_handshakes_failed_total").unwrap_or(0.0);
        // Under load more than the pending-connection limit wait in the handshake at once:
        // those are refused at the limit instead, and counted there.
        let at_limit = text
            .lines()
            .find(|l| l.starts_with("medmesh_rejected_total{reason=\"connection_limit\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let peers = parse_value(&text, "medmesh_peers_connected").unwrap_or(0.0);
        // No outsider ever became a peer: the one peer is the other node.
        assert!(peers <= 1.0, "{text}");
        if handshakes + at_limit >= 1000.0 {
            assert_eq!(handshakes + at_limit, 1000.0, "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {handshakes} failed handshakes and {at_limit} refusals at the limit counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(nodes);
}

#[test]
fn a_flooding_member_is_rate_limited_and_the_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    // Site 3's key floods; it runs no node.
    let n = 2;
    let (c, nodes, rt) = start_nodes(dir.path(), 3, n, 19800);
    let client = connect(&rt, &c, &c.researcher, 0);
    rt.block_on(client.submit(SignedManifest::sign(
        manifest("flood-test", 6),
        &c.researcher,
    )))
    .unwrap();

    // 2,004 status queries, 12 at a time (a client's stream limit is 16, shared with the
    // node's own pushes to this member), each sent once (no retry on "busy"); the researcher
    // asks between the waves.
    let flooder = connect(&rt, &c, &c.sites[2], 0);
    let (mut answered, mut busy, mut failed) = (0u32, 0u32, 0u32);
    let started = Instant::now();
    rt.block_on(async {
        for wave in 0..167 {
            let asks = (0..12).map(|_| {
                let query = Request::Status(StatusQuery {
                    experiment_id: None,
                });
                flooder.network().request_once(flooder.peer(), query)
            });
            for answer in futures::future::join_all(asks).await {
                match answer {
                    Ok(Response::Status(_)) => answered += 1,
                    Ok(Response::Busy { retry_after_ms }) => {
                        assert!((1..=60_000).contains(&retry_after_ms));
                        busy += 1;
                    }
                    other => {
                        eprintln!("unexpected: {other:?}");
                        failed += 1;
                    }
                }
            }
            if wave % 5 == 0 {
                assert!(client.status(Some("flood-test")).await.is_ok());
            }
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("flood: {answered} answered, {busy} busy, {failed} failed in {elapsed:.2} s");
    assert_eq!(failed, 0);
    // The budget (config defaults): a burst of 200, then 100 per second.
    assert!(answered >= 200, "the burst is served: {answered}");
    let budget = 200.0 + 100.0 * elapsed;
    assert!(
        f64::from(answered) <= budget + 1.0,
        "{answered} answered, budget {budget}"
    );
    assert!(busy >= 500, "the rest is refused: {busy}");

    let records = wait_finished(&rt, &client, "flood-test", n);
    assert!(records.iter().all(|p| p.record.round == 6));
    let text = rt.block_on(local::scrape(&c.metrics_addr(0))).unwrap();
    assert!(
        text.contains(&format!(
            "medmesh_rejected_total{{reason=\"rate_limited\"}} {busy}"
        )),
        "{text}"
    );
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("exceeds its request rate"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&flooder.network().local_peer_id().to_string()));
    drop(nodes);
}

/// Asks node 1 each kind of request as `client`'s member; returns each refusal's reason
/// (`None`: answered, if only with "unavailable").
fn ask_each_kind(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    id: &str,
    progress: &SignedProgress,
) -> Vec<(&'static str, Option<String>)> {
    let update = |u| Request::Update(u);
    let requests = [
        update(UpdateRequest::Offer {
            experiment_id: id.into(),
            round: Some(2),
            attempt: 0,
        }),
        update(UpdateRequest::Chunk {
            experiment_id: id.into(),
            round: 2,
            attempt: 0,
            offset: 0,
        }),
        update(UpdateRequest::Exchange {
            experiment_id: id.into(),
            round: 2,
        }),
        Request::Announce(Announcement::Progress(Box::new(progress.clone()))),
        Request::Status(StatusQuery {
            experiment_id: Some(id.into()),
        }),
        Request::Artifact(ArtifactRequest {
            experiment_id: id.into(),
            artifact: Artifact::Model,
            offset: 0,
        }),
    ];
    requests
        .into_iter()
        .map(|r| {
            let kind = r.kind();
            let answer = rt
                .block_on(client.network().request(client.peer(), r))
                .unwrap_or_else(|e| panic!("{kind}: {e}"));
            let refused = match answer {
                Response::Refused { reason } => Some(reason),
                Response::Busy { .. } => panic!("{kind}: busy"),
                _ => None,
            };
            (kind, refused)
        })
        .collect()
}

#[test]
fn each_request_is_checked_against_the_requesters_role() {
    let dir = tempfile::tempdir().unwrap();
    // Sites 1 and 2 run; site 3's key asks as a node member, beside the researcher.
    let (c, nodes, rt) = start_nodes(dir.path(), 3, 2, 20700);
    let researcher = connect(&rt, &c, &c.researcher, 0);
    let id = "roles-test";
    rt.block_on(researcher.submit(SignedManifest::sign(manifest(id, 2), &c.researcher)))
        .unwrap();
    let records = wait_finished(&rt, &researcher, id, 2);

    let answers = ask_each_kind(&rt, &researcher, id, &records[0]);
    let refused: Vec<_> = answers
        .iter()
        .filter_map(|(kind, r)| r.as_ref().map(|why| (*kind, why.as_str())))
        .collect();
    assert_eq!(
        refused.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        [
            "update offer",
            "update chunk",
            "update exchange",
            "progress announcement"
        ],
        "{answers:?}"
    );
    for (kind, why) in &refused {
        let expected = if *kind == "progress announcement" {
            "a researcher member: only nodes announce progress records"
        } else {
            "a researcher member: model updates pass between nodes only"
        };
        assert_eq!(*why, expected, "{kind}");
    }

    let member = connect(&rt, &c, &c.sites[2], 0);
    let answers = ask_each_kind(&rt, &member, id, &records[0]);
    assert!(answers.iter().all(|(_, r)| r.is_none()), "{answers:?}");

    // A member forwards forged manifests, as if passing on a researcher's: one signed by a
    // node's key, one altered after the researcher signed it. Every node verifies for
    // itself and refuses both.
    let by_node = SignedManifest::sign(manifest("forged-by-node", 2), &c.sites[2]);
    let mut altered = SignedManifest::sign(manifest("forged-altered", 2), &c.researcher);
    altered.manifest.averaging.rounds = 50;
    for site in 0..2 {
        let member = connect(&rt, &c, &c.sites[2], site);
        for (forged, why) in [
            (&by_node, "a researcher is required"),
            (&altered, "signature"),
        ] {
            let err = rt
                .block_on(member.submit(forged.clone()))
                .expect_err("a forged manifest is refused");
            let err = format!("{err:#}");
            assert!(
                err.contains("rejected") && err.contains(why),
                "node {site}: {err}"
            );
        }
    }
    let known = rt.block_on(researcher.status(None)).unwrap();
    assert!(
        known.iter().all(|p| p.record.experiment_id == id),
        "no node runs a forged experiment: {known:?}"
    );

    let text = rt.block_on(local::scrape(&c.metrics_addr(0))).unwrap();
    assert_eq!(
        parse_value(&text, "medmesh_rejected_total{reason=\"forbidden\"}"),
        Some(4.0),
        "{text}"
    );
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    let researcher_id = peer_id_of(&c.researcher.public_key()).to_string();
    let lines = log
        .lines()
        .filter(|l| l.contains("refused: a researcher member") && l.contains(&researcher_id))
        .count();
    assert_eq!(lines, 4, "{log}");

    // A manifest that keeps the consensus model with the sites: the researcher's export is
    // refused, a node key's is served.
    let mut kept = manifest("roles-kept", 2);
    kept.export.researchers = false;
    rt.block_on(researcher.submit(SignedManifest::sign(kept, &c.researcher)))
        .unwrap();
    wait_finished(&rt, &researcher, "roles-kept", 2);
    let err = rt
        .block_on(researcher.export("roles-kept"))
        .expect_err("the manifest keeps the model with the sites");
    assert!(
        format!("{err:#}").contains("export.researchers = false"),
        "{err:#}"
    );
    rt.block_on(member.export("roles-kept")).unwrap();
    let text = rt.block_on(local::scrape(&c.metrics_addr(0))).unwrap();
    assert_eq!(
        parse_value(&text, "medmesh_rejected_total{reason=\"forbidden\"}"),
        Some(5.0),
        "{text}"
    );
    drop(nodes);
    rt.shutdown_background();
}
