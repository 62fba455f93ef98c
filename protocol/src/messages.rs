//! Everything peers say to each other, and its byte encoding.
//!
//! A peer sends a [`Request`] and gets a [`Response`]. Each is split by purpose:
//! announcements, model updates, status and artifacts have their own request and answer
//! types, so a handler matches only what its purpose can carry.
//!
//! Every message travels as a [`Frame`]: the protocol version, then the message, encoded
//! with bincode 2 (standard configuration: little endian, varints). Decoding is bounded by
//! [`MAX_MESSAGE_BYTES`]: it never allocates past that, whatever length prefixes the bytes
//! claim, and it never panics.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use medmesh_crypto::{PublicKey, Role, SignedRoster};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::envelope::UpdateEnvelope;
use crate::manifest::SignedManifest;
use crate::progress::SignedProgress;

/// The wire protocol version this build speaks. 3: manifests carry `training.proximal_mu`
/// and `training.personalize_steps`, progress records `personalized_metric`. 4: manifests
/// carry `averaging.max_sample_weight` and `export.researchers`. 7: manifests carry
/// `model.dims`, `task.input_depth` and `training.swa_rounds`.
pub const PROTOCOL_VERSION: u16 = 7;

/// Largest encoded frame: a 1 MiB payload chunk plus generous room for its header.
pub const MAX_MESSAGE_BYTES: usize = (1 << 20) + (64 << 10);

/// Most progress records one status answer carries.
pub const MAX_STATUS_RECORDS: usize = 4096;

type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_MESSAGE_BYTES>>;
const WIRE: WireConfig = bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>();

/// A versioned message, as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame<T> {
    /// Sender's protocol version.
    pub version: u16,
    /// The message.
    pub message: T,
}

/// A chunk of an update payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateChunk {
    /// The experiment.
    pub experiment_id: String,
    /// The round of the update.
    pub round: u64,
    /// Byte offset of this chunk in the payload.
    pub offset: u64,
    /// Raw payload bytes.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// What one peer asks of another, by purpose. Each purpose has its own answer type in
/// [`Response`]: an announcement is answered by an [`AnnouncementAnswer`], an update request
/// by an [`UpdateAnswer`], and so on. [`Response::Busy`] and [`Response::Refused`] can answer
/// any request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Something every member should know: pushed, acknowledged.
    Announce(Announcement),
    /// Model updates and the pairwise exchanges built on them.
    Update(UpdateRequest),
    /// What a node knows of experiments' progress.
    Status(StatusQuery),
    /// A finished experiment's files (`medmesh export`).
    Artifact(ArtifactRequest),
}

/// What a peer answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// To [`Request::Announce`].
    Announce(AnnouncementAnswer),
    /// To [`Request::Update`].
    Update(UpdateAnswer),
    /// To [`Request::Status`].
    Status(StatusAnswer),
    /// To [`Request::Artifact`].
    Artifact(ArtifactAnswer),
    /// The node is overloaded or the requester exceeded its request rate: ask again after
    /// `retry_after_ms`.
    Busy {
        /// When to ask again, in milliseconds.
        retry_after_ms: u32,
    },
    /// The request was understood and refused.
    Refused {
        /// Why, in words for the requester's log; no code matches on it.
        reason: String,
    },
}

/// Things every member should know, spread member to member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Announcement {
    /// A researcher's signed experiment (boxed: the largest announcement by far).
    Manifest(Box<SignedManifest>),
    /// A roster version, so newer rosters spread.
    Roster(SignedRoster),
    /// A site's signed progress after a round (boxed: it carries text).
    Progress(Box<SignedProgress>),
}

/// The answer to an [`Announcement`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AnnouncementAnswer {
    /// Received (a roster or progress record: adopted if newer and valid).
    Ack,
    /// A node's verdict on an announced manifest.
    Manifest {
        /// The experiment.
        experiment_id: String,
        /// Digest of the manifest acknowledged.
        manifest_digest: [u8; 32],
        /// `None` if accepted, otherwise why not.
        rejection: Option<String>,
    },
}

/// Requests about model updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UpdateRequest {
    /// The signed envelope of the peer's update of a round; answered by
    /// [`UpdateAnswer::Offer`] or [`UpdateAnswer::Unavailable`].
    Offer {
        /// The experiment.
        experiment_id: String,
        /// The round wanted; `None` for the peer's latest model (late joiners, restarts).
        round: Option<u64>,
        /// The attempt at the round: 0, or a secure-aggregation redo ([`crate::secagg`]).
        attempt: u32,
    },
    /// One chunk of an offered payload, from `offset` on (resumption after a drop is a
    /// request with a later offset); answered by [`UpdateAnswer::Chunk`].
    Chunk {
        /// The experiment.
        experiment_id: String,
        /// The round of the offered update.
        round: u64,
        /// Its attempt (see [`UpdateRequest::Offer`]).
        attempt: u32,
        /// First byte wanted.
        offset: u64,
    },
    /// Whether the other end of a pairwise exchange got this node's model of `round`;
    /// answered by [`UpdateAnswer::Exchange`]. Both ends use the exchange only if both got
    /// it.
    Exchange {
        /// The experiment.
        experiment_id: String,
        /// The round of the exchange.
        round: u64,
    },
}

/// Answers to an [`UpdateRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UpdateAnswer {
    /// "I have weights for this round": the signed envelope; chunks follow on request.
    Offer(UpdateEnvelope),
    /// A piece of a payload.
    Chunk(UpdateChunk),
    /// The peer will not serve the requested update.
    Unavailable {
        /// The experiment.
        experiment_id: String,
        /// Why.
        reason: Unavailable,
        /// Rounds the peer has completed, when it runs the experiment: tells a requester
        /// whether to wait (the peer is training the round) or to catch up (it is ahead).
        latest_round: Option<u64>,
    },
    /// Where this node's side of a pairwise exchange stands.
    Exchange {
        /// The round asked about.
        round: u64,
        /// Its state.
        state: ExchangeState,
    },
}

/// Why a node has no update (or artifact) to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Unavailable {
    /// It has not heard of the experiment (the manifest may still be on its way).
    #[error("unknown experiment")]
    UnknownExperiment,
    /// It knows the experiment and does not train in it (no such dataset, or stopped).
    #[error("not participating")]
    NotParticipating,
    /// It has not trained the round yet (`latest_round` says how far it is).
    #[error("round not trained yet")]
    NotYetTrained,
    /// The round is older than the rounds it keeps.
    #[error("round no longer kept")]
    NoLongerKept,
    /// It has no update of any round yet.
    #[error("no update yet")]
    NoUpdateYet,
    /// Chunks were asked of a round it does not serve.
    #[error("round not served")]
    NotServed,
    /// The experiment has not finished at this node (artifacts only).
    #[error("experiment not finished at this node")]
    NotFinished,
    /// The node cannot read its export (artifacts only; its log says why).
    #[error("export unreadable at this node")]
    ExportUnreadable,
}

/// Ask a node what it knows about experiments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusQuery {
    /// One experiment, or all when `None`.
    pub experiment_id: Option<String>,
}

/// A node's view: the latest signed progress record of each site it has heard from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// The answering node.
    pub node: PublicKey,
    /// Latest record per (experiment, site), at most [`MAX_STATUS_RECORDS`].
    pub records: Vec<SignedProgress>,
}

/// Ask a node for a chunk of a finished experiment's artifact (`medmesh export`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRequest {
    /// The experiment.
    pub experiment_id: String,
    /// Which file.
    pub artifact: Artifact,
    /// First byte wanted.
    pub offset: u64,
}

/// The answer to an [`ArtifactRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ArtifactAnswer {
    /// A piece of the artifact.
    Chunk {
        /// Size of the whole artifact.
        total_len: u64,
        /// Byte offset of this chunk.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The node has no such artifact to give.
    Unavailable(Unavailable),
}

/// One end's side of a pairwise exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeState {
    /// Still fetching (or not yet at that round).
    Pending,
    /// It has the other end's model, checked: it will use the exchange if the other end has
    /// its model too.
    Fetched,
    /// It gave up on the other end's model: neither end may use the exchange.
    Failed,
}

/// Files a node exports at the end of an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Artifact {
    /// The consensus model, as safetensors.
    Model,
    /// The signed provenance record (JSON).
    Provenance,
}

impl Artifact {
    /// File name in the experiment's export directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Artifact::Model => "model.safetensors",
            Artifact::Provenance => "provenance.json",
        }
    }
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Bigger than any valid frame; refused before decoding.
    #[error("message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge {
        /// The offered length.
        len: usize,
    },
    /// A protocol version this build does not speak.
    #[error("peer speaks protocol version {got}, this node speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
    },
    /// Bytes that are not a valid frame (including length prefixes beyond the limit).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A valid frame followed by extra bytes.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// A status answer with more records than allowed.
    #[error("status answer carries {0} records, at most {MAX_STATUS_RECORDS} are allowed")]
    TooManyRecords(usize),
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The message is larger than [`MAX_MESSAGE_BYTES`] (a receiver would refuse it).
    #[error("message does not fit in {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
}

impl Request {
    /// Encodes as a frame of the current protocol version.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_frame(self)
    }

    /// What is asked, in a few words, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Announce(Announcement::Manifest(_)) => "manifest announcement",
            Request::Announce(Announcement::Roster(_)) => "roster announcement",
            Request::Announce(Announcement::Progress(_)) => "progress announcement",
            Request::Update(UpdateRequest::Offer { .. }) => "update offer",
            Request::Update(UpdateRequest::Chunk { .. }) => "update chunk",
            Request::Update(UpdateRequest::Exchange { .. }) => "update exchange",
            Request::Status(_) => "status query",
            Request::Artifact(_) => "artifact request",
        }
    }

    /// Whether a member of `role` may ask this, or why not. Model updates, their chunks and
    /// exchanges, and progress records pass between nodes only: a site's weights leak
    /// information about its images, so no researcher reads them. Researchers submit
    /// experiments, spread steward-signed rosters, read progress, and export a finished
    /// experiment's consensus model where its manifest allows (`export.researchers`, checked
    /// by the node that holds the manifest).
    pub fn permitted(&self, role: Role) -> Result<(), &'static str> {
        match role {
            Role::Node => Ok(()),
            Role::Researcher => match self {
                Request::Announce(Announcement::Manifest(_) | Announcement::Roster(_))
                | Request::Status(_)
                | Request::Artifact(_) => Ok(()),
                Request::Announce(Announcement::Progress(_)) => {
                    Err("only nodes announce progress records")
                }
                Request::Update(_) => Err("model updates pass between nodes only"),
            },
        }
    }

    /// Decodes a frame, checking size, version, structure and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        decode_frame(bytes)
    }
}

impl Response {
    /// Encodes as a frame of the current protocol version.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_frame(self)
    }

    /// Decodes a frame, checking size, version, structure, trailing bytes and the number of
    /// status records.
    pub fn decode(bytes: &[u8]) -> Result<Response, WireError> {
        let response: Response = decode_frame(bytes)?;
        if let Response::Status(StatusAnswer { records, .. }) = &response
            && records.len() > MAX_STATUS_RECORDS
        {
            return Err(WireError::TooManyRecords(records.len()));
        }
        Ok(response)
    }

    /// A short description, for errors about unexpected answers.
    pub fn describe(&self) -> String {
        match self {
            Response::Refused { reason } => format!("refused: {reason}"),
            Response::Update(UpdateAnswer::Unavailable { reason, .. })
            | Response::Artifact(ArtifactAnswer::Unavailable(reason)) => {
                format!("unavailable: {reason}")
            }
            Response::Busy { .. } => "busy".into(),
            other => format!("{other:?}").chars().take(60).collect(),
        }
    }
}

fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let frame = Frame {
        version: PROTOCOL_VERSION,
        message,
    };
    // bincode enforces its limit only when decoding; check the size ourselves.
    let bytes = bincode::serde::encode_to_vec(&frame, WIRE).map_err(|_| EncodeError::TooLarge)?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(EncodeError::TooLarge);
    }
    Ok(bytes)
}

fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge { len: bytes.len() });
    }
    // The version comes first, so a peer on a newer protocol gets a clear error rather
    // than whatever the rest of its bytes happen to decode to.
    let (version, _): (u16, usize) = bincode::serde::decode_from_slice(bytes, WIRE)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { got: version });
    }
    let (frame, used): (Frame<T>, usize) = bincode::serde::decode_from_slice(bytes, WIRE)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::TrailingBytes(bytes.len() - used));
    }
    Ok(frame.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::WeightEncoding;
    use crate::envelope::UpdateHeader;
    use crate::manifest::Manifest;
    use crate::progress::ProgressRecord;
    use medmesh_crypto::{Identity, Roster};
    use proptest::prelude::*;

    fn progress() -> (Identity, Manifest, SignedProgress) {
        let node = Identity::from_seed(&[1; 32]);
        let manifest =
            Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
        let record = ProgressRecord {
            experiment_id: manifest.id.clone(),
            manifest_digest: manifest.digest(),
            round: 2,
            node: node.public_key(),
            loss: 0.1,
            metric: 0.9,
            personalized_metric: None,
            contribution_weight: 50.0,
            peers_averaged: 3,
            finished: true,
            stop_after: None,
            privacy_epsilon: None,
            device: "cpu".into(),
            bytes_sent: 1 << 20,
            bytes_received: 1 << 20,
            averaging_shift: Some(0.002),
            failure: None,
            unix_ms: 1_700_000_000_000,
        };
        let progress = SignedProgress::sign(record, &node);
        (node, manifest, progress)
    }

    fn requests() -> Vec<Request> {
        let (node, manifest, progress) = progress();
        let mut roster = medmesh_crypto::SignedRoster::unsigned(Roster::genesis(
            "demo",
            vec![node.public_key()],
            1,
        ));
        roster.endorse(&node);
        vec![
            Request::Announce(Announcement::Manifest(Box::new(
                crate::manifest::SignedManifest::sign(manifest, &node),
            ))),
            Request::Announce(Announcement::Roster(roster)),
            Request::Announce(Announcement::Progress(Box::new(progress))),
            Request::Update(UpdateRequest::Offer {
                experiment_id: "e".into(),
                round: None,
                attempt: 0,
            }),
            Request::Update(UpdateRequest::Chunk {
                experiment_id: "e".into(),
                round: 3,
                attempt: 1,
                offset: 4096,
            }),
            Request::Update(UpdateRequest::Exchange {
                experiment_id: "e".into(),
                round: 7,
            }),
            Request::Status(StatusQuery {
                experiment_id: None,
            }),
            Request::Artifact(ArtifactRequest {
                experiment_id: "e".into(),
                artifact: Artifact::Provenance,
                offset: 10,
            }),
        ]
    }

    fn responses() -> Vec<Response> {
        let (node, manifest, progress) = progress();
        let header = UpdateHeader {
            experiment_id: manifest.id.clone(),
            manifest_digest: manifest.digest(),
            round: 2,
            attempt: 0,
            sender: node.public_key(),
            layout_digest: [3; 32],
            num_params: 10,
            encoding: WeightEncoding::F16,
            sample_weight: 1.0,
            payload_len: 0,
            payload_hash: [0; 32],
            chunk_size: 4096,
        };
        vec![
            Response::Announce(AnnouncementAnswer::Ack),
            Response::Announce(AnnouncementAnswer::Manifest {
                experiment_id: manifest.id.clone(),
                manifest_digest: manifest.digest(),
                rejection: Some("no".into()),
            }),
            Response::Update(UpdateAnswer::Offer(UpdateEnvelope::seal(
                header, &[0u8; 20], &node,
            ))),
            Response::Update(UpdateAnswer::Chunk(UpdateChunk {
                experiment_id: "e".into(),
                round: 1,
                offset: 0,
                bytes: vec![7; 1 << 20],
            })),
            Response::Update(UpdateAnswer::Unavailable {
                experiment_id: "e".into(),
                reason: Unavailable::NotYetTrained,
                latest_round: Some(4),
            }),
            Response::Update(UpdateAnswer::Exchange {
                round: 7,
                state: ExchangeState::Fetched,
            }),
            Response::Status(StatusAnswer {
                node: node.public_key(),
                records: vec![progress; 3],
            }),
            Response::Artifact(ArtifactAnswer::Chunk {
                total_len: 100,
                offset: 10,
                bytes: vec![1; 90],
            }),
            Response::Artifact(ArtifactAnswer::Unavailable(Unavailable::NotFinished)),
            Response::Busy {
                retry_after_ms: 250,
            },
            Response::Refused {
                reason: "not a member".into(),
            },
        ]
    }

    #[test]
    fn nodes_may_ask_anything_researchers_no_updates_or_progress() {
        let allowed: Vec<(&str, bool)> = requests()
            .iter()
            .map(|r| {
                assert!(r.permitted(Role::Node).is_ok(), "{}", r.kind());
                (r.kind(), r.permitted(Role::Researcher).is_ok())
            })
            .collect();
        assert_eq!(
            allowed,
            [
                ("manifest announcement", true),
                ("roster announcement", true),
                ("progress announcement", false),
                ("update offer", false),
                ("update chunk", false),
                ("update exchange", false),
                ("status query", true),
                ("artifact request", true),
            ]
        );
    }

    #[test]
    fn every_message_round_trips() {
        for m in requests() {
            let bytes = m.encode().unwrap();
            assert!(bytes.len() <= MAX_MESSAGE_BYTES);
            assert_eq!(Request::decode(&bytes).unwrap(), m);
        }
        for m in responses() {
            let bytes = m.encode().unwrap();
            assert!(bytes.len() <= MAX_MESSAGE_BYTES);
            assert_eq!(Response::decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn chunk_bytes_are_raw_not_element_wise() {
        let m = Response::Update(UpdateAnswer::Chunk(UpdateChunk {
            experiment_id: "e".into(),
            round: 1,
            offset: 0,
            bytes: vec![0xff; 1000],
        }));
        assert!(m.encode().unwrap().len() < 1020);
    }

    #[test]
    fn other_versions_trailing_bytes_and_oversize_are_named() {
        let query = Request::Status(StatusQuery {
            experiment_id: None,
        });
        let mut bytes = query.encode().unwrap();
        bytes[0] = 9;
        assert_eq!(
            Request::decode(&bytes),
            Err(WireError::UnsupportedVersion { got: 9 })
        );
        let mut bytes = query.encode().unwrap();
        bytes.push(0);
        assert_eq!(Request::decode(&bytes), Err(WireError::TrailingBytes(1)));
        assert!(matches!(
            Request::decode(&vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(WireError::TooLarge { .. })
        ));
        let too_big = Response::Update(UpdateAnswer::Chunk(UpdateChunk {
            experiment_id: "e".into(),
            round: 1,
            offset: 0,
            bytes: vec![0; MAX_MESSAGE_BYTES],
        }));
        assert!(matches!(too_big.encode(), Err(EncodeError::TooLarge)));
    }

    #[test]
    fn too_many_status_records_are_refused() {
        let (node, _, progress) = progress();
        let m = Response::Status(StatusAnswer {
            node: node.public_key(),
            records: vec![progress; 2],
        });
        let bytes = m.encode().unwrap();
        assert!(Response::decode(&bytes).is_ok());
        // Rewrite the record count (a varint after version, variant and the 32-byte key).
        let mut forged = bytes[..2 + 32].to_vec();
        forged.push(0xfb);
        forged.extend_from_slice(&((MAX_STATUS_RECORDS + 1) as u16).to_le_bytes());
        let one = (bytes.len() - (2 + 32 + 1)) / 2;
        for _ in 0..=MAX_STATUS_RECORDS {
            forged.extend_from_slice(&bytes[bytes.len() - one..]);
        }
        assert!(forged.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(
            Response::decode(&forged),
            Err(WireError::TooManyRecords(MAX_STATUS_RECORDS + 1))
        );
    }

    #[test]
    fn a_request_is_not_a_response() {
        // The two directions are different types: a request's bytes do not pass for an answer
        // of the same purpose (the variants' fields differ).
        let bytes = Request::Update(UpdateRequest::Chunk {
            experiment_id: "e".into(),
            round: 3,
            attempt: 0,
            offset: 4096,
        })
        .encode()
        .unwrap();
        assert!(!matches!(
            Response::decode(&bytes),
            Ok(Response::Update(UpdateAnswer::Chunk(_)))
        ));
    }

    #[test]
    fn huge_length_prefixes_do_not_allocate() {
        // The version, Response::Update (1), UpdateAnswer::Chunk (1), then a string length
        // of 2^64-1 (varint 0xff + u64).
        let v = PROTOCOL_VERSION as u8;
        let mut bytes = vec![v, 1, 1, 0xff];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Response::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
        // A chunk claiming 2^40 bytes.
        let mut bytes = vec![v, 1, 1, 1, b'e', 1, 0, 0xfd];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            Response::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn truncations_of_every_message_fail_cleanly() {
        for bytes in requests().iter().map(|m| m.encode().unwrap()) {
            for cut in (0..bytes.len()).step_by((bytes.len() / 97).max(1)) {
                assert!(Request::decode(&bytes[..cut]).is_err());
            }
        }
        for bytes in responses().iter().map(|m| m.encode().unwrap()) {
            for cut in (0..bytes.len()).step_by((bytes.len() / 97).max(1)) {
                assert!(Response::decode(&bytes[..cut]).is_err());
            }
        }
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            ("[a-z0-9-]{0,40}", any::<u64>(), any::<u32>(), any::<u64>()).prop_map(
                |(experiment_id, round, attempt, offset)| Request::Update(UpdateRequest::Chunk {
                    experiment_id,
                    round,
                    attempt,
                    offset
                })
            ),
            (
                "[a-z0-9-]{0,40}",
                proptest::option::of(any::<u64>()),
                any::<u32>()
            )
                .prop_map(|(experiment_id, round, attempt)| Request::Update(
                    UpdateRequest::Offer {
                        experiment_id,
                        round,
                        attempt
                    }
                )),
            proptest::option::of(".{0,60}")
                .prop_map(|experiment_id| Request::Status(StatusQuery { experiment_id })),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (
                "[a-z0-9-]{0,40}",
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..5000)
            )
                .prop_map(|(experiment_id, round, offset, bytes)| {
                    Response::Update(UpdateAnswer::Chunk(UpdateChunk {
                        experiment_id,
                        round,
                        offset,
                        bytes,
                    }))
                }),
            (
                ".{0,60}",
                any::<[u8; 32]>(),
                proptest::option::of(".{0,200}")
            )
                .prop_map(|(experiment_id, manifest_digest, rejection)| {
                    Response::Announce(AnnouncementAnswer::Manifest {
                        experiment_id,
                        manifest_digest,
                        rejection,
                    })
                }),
            (".{0,60}", proptest::option::of(any::<u64>())).prop_map(
                |(experiment_id, latest_round)| {
                    Response::Update(UpdateAnswer::Unavailable {
                        experiment_id,
                        reason: Unavailable::NoLongerKept,
                        latest_round,
                    })
                }
            ),
            ".{0,200}".prop_map(|reason| Response::Refused { reason }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_messages_round_trip(q in arb_request(), a in arb_response()) {
            prop_assert_eq!(Request::decode(&q.encode().unwrap()).unwrap(), q);
            prop_assert_eq!(Response::decode(&a.encode().unwrap()).unwrap(), a);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_prefix_never_panic(variant in 0u8..8, sub in 0u8..6, tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = vec![PROTOCOL_VERSION as u8, variant, sub];
            bytes.extend(tail);
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn mutated_valid_messages_never_panic(which in 0usize..19, pos in any::<usize>(), byte in any::<u8>()) {
            let requests = requests();
            let mut bytes = if which < requests.len() {
                requests[which].encode().unwrap()
            } else {
                responses()[which - requests.len()].encode().unwrap()
            };
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }
    }
}
