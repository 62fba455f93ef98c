//! Everything peers say to each other, and its byte encoding.
//!
//! Every message travels as a [`Frame`]: the protocol version, then the [`Message`], encoded
//! with bincode 2 (standard configuration: little endian, varints). Decoding is bounded by
//! [`MAX_MESSAGE_BYTES`]: it never allocates past that, whatever length prefixes the bytes
//! claim, and it never panics.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use medmesh_crypto::{PublicKey, SignedRoster};
use serde::{Deserialize, Serialize};

use crate::envelope::UpdateEnvelope;
use crate::manifest::SignedManifest;
use crate::progress::SignedProgress;

/// The wire protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest encoded frame: a 1 MiB payload chunk plus generous room for its header.
pub const MAX_MESSAGE_BYTES: usize = (1 << 20) + (64 << 10);

/// Most progress records one status answer carries.
pub const MAX_STATUS_RECORDS: usize = 4096;

type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_MESSAGE_BYTES>>;
const WIRE: WireConfig = bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>();

/// A versioned message, as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// Sender's protocol version.
    pub version: u16,
    /// The message.
    pub message: Message,
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

/// Every message of the medmesh protocols.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// A researcher's signed experiment, spread to every member.
    ManifestAnnouncement(SignedManifest),
    /// A node's answer to a submitted manifest.
    ManifestAck {
        /// The experiment.
        experiment_id: String,
        /// Digest of the manifest acknowledged.
        manifest_digest: [u8; 32],
        /// `None` if accepted, otherwise why not.
        rejection: Option<String>,
    },
    /// A roster version, so newer rosters spread.
    RosterAnnouncement(SignedRoster),
    /// A site's signed progress after a round.
    Progress(SignedProgress),
    /// "I have weights for this round": the signed envelope; chunks follow on request.
    UpdateOffer(UpdateEnvelope),
    /// Ask a peer for the envelope of its update of a round; answered by `UpdateOffer` or
    /// `UpdateUnavailable`.
    UpdateQuery {
        /// The experiment.
        experiment_id: String,
        /// The round wanted; `None` for the peer's latest model (late joiners, restarts).
        round: Option<u64>,
    },
    /// Ask a peer for one chunk of an offered payload, from `offset` on (resumption after a
    /// drop is a request with a later offset); answered by `UpdateChunk`.
    UpdateRequest {
        /// The experiment.
        experiment_id: String,
        /// The round of the offered update.
        round: u64,
        /// First byte wanted.
        offset: u64,
    },
    /// A piece of a payload.
    UpdateChunk(UpdateChunk),
    /// The peer will not serve the requested update.
    UpdateUnavailable {
        /// The experiment.
        experiment_id: String,
        /// Why.
        reason: String,
        /// Rounds the peer has completed, when it runs the experiment: tells a requester
        /// whether to wait (the peer is training the round) or to catch up (it is ahead).
        latest_round: Option<u64>,
    },
    /// Ask a node for a chunk of a finished experiment's artifact (`medmesh export`).
    ArtifactRequest {
        /// The experiment.
        experiment_id: String,
        /// Which file.
        artifact: Artifact,
        /// First byte wanted.
        offset: u64,
    },
    /// A piece of an artifact.
    ArtifactChunk {
        /// Size of the whole artifact.
        total_len: u64,
        /// Byte offset of this chunk.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Receipt of a pushed announcement (progress, roster).
    Ack,
    /// The request was understood and refused; `reason` says why.
    Refused {
        /// Why.
        reason: String,
    },
    /// Ask a node what it knows about experiments.
    StatusQuery {
        /// One experiment, or all when `None`.
        experiment_id: Option<String>,
    },
    /// A node's view: the latest signed progress record of each site it has heard from.
    StatusAnswer {
        /// The answering node.
        node: PublicKey,
        /// Latest record per (experiment, site).
        records: Vec<SignedProgress>,
    },
    /// The node is overloaded or the requester exceeded its request rate: ask again after
    /// `retry_after_ms`.
    Busy {
        /// When to ask again, in milliseconds.
        retry_after_ms: u32,
    },
    /// Ask the other end of a pairwise exchange whether it got this node's model of `round`;
    /// answered by `ExchangeAnswer`. Both ends use the exchange only if both got it.
    ExchangeQuery {
        /// The experiment.
        experiment_id: String,
        /// The round of the exchange.
        round: u64,
    },
    /// Where this node's side of a pairwise exchange stands.
    ExchangeAnswer {
        /// The round asked about.
        round: u64,
        /// Its state.
        state: ExchangeState,
    },
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

impl Message {
    /// Encodes as a frame of the current protocol version.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        #[derive(Serialize)]
        struct FrameRef<'a> {
            version: u16,
            message: &'a Message,
        }
        let frame = FrameRef {
            version: PROTOCOL_VERSION,
            message: self,
        };
        // bincode enforces its limit only when decoding; check the size ourselves.
        let bytes =
            bincode::serde::encode_to_vec(&frame, WIRE).map_err(|_| EncodeError::TooLarge)?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(EncodeError::TooLarge);
        }
        Ok(bytes)
    }

    /// Decodes a frame, checking size, version, structure and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
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
        let (frame, used): (Frame, usize) = bincode::serde::decode_from_slice(bytes, WIRE)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(WireError::TrailingBytes(bytes.len() - used));
        }
        if let Message::StatusAnswer { records, .. } = &frame.message
            && records.len() > MAX_STATUS_RECORDS
        {
            return Err(WireError::TooManyRecords(records.len()));
        }
        Ok(frame.message)
    }
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

    fn samples() -> Vec<Message> {
        let node = Identity::from_seed(&[1; 32]);
        let manifest =
            Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
        let digest = manifest.digest();
        let header = UpdateHeader {
            experiment_id: manifest.id.clone(),
            manifest_digest: digest,
            round: 2,
            sender: node.public_key(),
            layout_digest: [3; 32],
            num_params: 10,
            encoding: WeightEncoding::F16,
            sample_weight: 1.0,
            payload_len: 0,
            payload_hash: [0; 32],
            chunk_size: 4096,
        };
        let record = ProgressRecord {
            experiment_id: manifest.id.clone(),
            manifest_digest: digest,
            round: 2,
            node: node.public_key(),
            loss: 0.1,
            metric: 0.9,
            contribution_weight: 50.0,
            peers_averaged: 3,
            finished: true,
            unix_ms: 1_700_000_000_000,
        };
        let progress = SignedProgress::sign(record, &node);
        let mut roster = medmesh_crypto::SignedRoster::unsigned(Roster::genesis(
            "demo",
            vec![node.public_key()],
            1,
        ));
        roster.endorse(&node);
        vec![
            Message::ManifestAnnouncement(crate::manifest::SignedManifest::sign(
                manifest.clone(),
                &node,
            )),
            Message::ManifestAck {
                experiment_id: manifest.id.clone(),
                manifest_digest: digest,
                rejection: Some("no".into()),
            },
            Message::RosterAnnouncement(roster),
            Message::Progress(progress.clone()),
            Message::UpdateOffer(UpdateEnvelope::seal(header, &[0u8; 20], &node)),
            Message::UpdateQuery {
                experiment_id: "e".into(),
                round: None,
            },
            Message::UpdateRequest {
                experiment_id: "e".into(),
                round: 3,
                offset: 4096,
            },
            Message::ArtifactRequest {
                experiment_id: "e".into(),
                artifact: Artifact::Provenance,
                offset: 10,
            },
            Message::ArtifactChunk {
                total_len: 100,
                offset: 10,
                bytes: vec![1; 90],
            },
            Message::Ack,
            Message::Refused {
                reason: "not a member".into(),
            },
            Message::Busy {
                retry_after_ms: 250,
            },
            Message::ExchangeQuery {
                experiment_id: "e".into(),
                round: 7,
            },
            Message::ExchangeAnswer {
                round: 7,
                state: ExchangeState::Fetched,
            },
            Message::UpdateChunk(UpdateChunk {
                experiment_id: "e".into(),
                round: 1,
                offset: 0,
                bytes: vec![7; 1 << 20],
            }),
            Message::UpdateUnavailable {
                experiment_id: "e".into(),
                reason: "not yet".into(),
                latest_round: Some(4),
            },
            Message::StatusQuery {
                experiment_id: None,
            },
            Message::StatusAnswer {
                node: node.public_key(),
                records: vec![progress; 3],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode().unwrap();
            assert!(bytes.len() <= MAX_MESSAGE_BYTES);
            assert_eq!(Message::decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn chunk_bytes_are_raw_not_element_wise() {
        let m = Message::UpdateChunk(UpdateChunk {
            experiment_id: "e".into(),
            round: 1,
            offset: 0,
            bytes: vec![0xff; 1000],
        });
        assert!(m.encode().unwrap().len() < 1020);
    }

    #[test]
    fn other_versions_trailing_bytes_and_oversize_are_named() {
        let mut bytes = Message::StatusQuery {
            experiment_id: None,
        }
        .encode()
        .unwrap();
        bytes[0] = 9;
        assert_eq!(
            Message::decode(&bytes),
            Err(WireError::UnsupportedVersion { got: 9 })
        );
        let mut bytes = Message::StatusQuery {
            experiment_id: None,
        }
        .encode()
        .unwrap();
        bytes.push(0);
        assert_eq!(Message::decode(&bytes), Err(WireError::TrailingBytes(1)));
        assert!(matches!(
            Message::decode(&vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(WireError::TooLarge { .. })
        ));
        let too_big = Message::UpdateChunk(UpdateChunk {
            experiment_id: "e".into(),
            round: 1,
            offset: 0,
            bytes: vec![0; MAX_MESSAGE_BYTES],
        });
        assert!(matches!(too_big.encode(), Err(EncodeError::TooLarge)));
    }

    #[test]
    fn huge_length_prefixes_do_not_allocate() {
        // version 1, variant UpdateChunk (7), then a string length of 2^64-1 (varint 0xff + u64).
        let mut bytes = vec![1u8, 7, 0xff];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
        // A chunk claiming 2^40 bytes.
        let mut bytes = vec![1u8, 7, 1, b'e', 1, 0, 0xfd];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            Message::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn truncations_of_every_message_fail_cleanly() {
        for m in samples() {
            let bytes = m.encode().unwrap();
            for cut in (0..bytes.len()).step_by((bytes.len() / 97).max(1)) {
                assert!(Message::decode(&bytes[..cut]).is_err());
            }
        }
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            ("[a-z0-9-]{0,40}", any::<u64>(), any::<u64>()).prop_map(
                |(experiment_id, round, offset)| Message::UpdateRequest {
                    experiment_id,
                    round,
                    offset
                }
            ),
            (
                "[a-z0-9-]{0,40}",
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..5000)
            )
                .prop_map(
                    |(experiment_id, round, offset, bytes)| Message::UpdateChunk(UpdateChunk {
                        experiment_id,
                        round,
                        offset,
                        bytes
                    })
                ),
            proptest::option::of(".{0,60}")
                .prop_map(|experiment_id| Message::StatusQuery { experiment_id }),
            (
                ".{0,60}",
                any::<[u8; 32]>(),
                proptest::option::of(".{0,200}")
            )
                .prop_map(|(experiment_id, manifest_digest, rejection)| {
                    Message::ManifestAck {
                        experiment_id,
                        manifest_digest,
                        rejection,
                    }
                }),
            (".{0,60}", ".{0,200}", proptest::option::of(any::<u64>())).prop_map(
                |(experiment_id, reason, latest_round)| {
                    Message::UpdateUnavailable {
                        experiment_id,
                        reason,
                        latest_round,
                    }
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_messages_round_trip(m in arb_message()) {
            let bytes = m.encode().unwrap();
            prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_prefix_never_panic(variant in 0u8..10, tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = vec![1u8, variant];
            bytes.extend(tail);
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn mutated_valid_messages_never_panic(which in 0usize..15, pos in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = samples()[which].encode().unwrap();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            let _ = Message::decode(&bytes);
        }
    }
}
