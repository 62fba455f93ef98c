//! Domain-separated ed25519 signatures.
//!
//! Every signature covers `"medmesh/v1/" || context || 0x00 || message`, where the context
//! names the kind of object signed. A signature on a progress record can therefore never be
//! replayed as a signature on a manifest, even if the two happened to share bytes.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PREFIX: &[u8] = b"medmesh/v1/";

/// The kinds of signed objects. Each has its own context string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A consortium roster (endorsed by stewards).
    Roster,
    /// An experiment manifest (signed by a researcher).
    Manifest,
    /// A model-update envelope (signed by the sending node).
    UpdateEnvelope,
    /// A per-round progress record (signed by the reporting node).
    ProgressRecord,
    /// The provenance file of an exported model.
    Provenance,
    /// A site's dataset fingerprint (signed by its node).
    DatasetFingerprint,
}

impl Domain {
    /// All domains, for diagnostics.
    pub const ALL: [Domain; 6] = [
        Domain::Roster,
        Domain::Manifest,
        Domain::UpdateEnvelope,
        Domain::ProgressRecord,
        Domain::Provenance,
        Domain::DatasetFingerprint,
    ];

    /// The context string mixed into every signature of this domain.
    pub const fn context(self) -> &'static str {
        match self {
            Domain::Roster => "roster",
            Domain::Manifest => "experiment-manifest",
            Domain::UpdateEnvelope => "model-update-envelope",
            Domain::ProgressRecord => "progress-record",
            Domain::Provenance => "model-provenance",
            Domain::DatasetFingerprint => "dataset-fingerprint",
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.context())
    }
}

/// Why a signature did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum SignatureError {
    /// The signature is valid, but for another kind of object: someone tried to reuse it.
    #[error("signature was made for a {actual}, not for a {expected}")]
    WrongDomain {
        /// The domain the verifier asked for.
        expected: Domain,
        /// The domain the signature was actually made in.
        actual: Domain,
    },
    /// The signature does not match the message and key (tampered message or forged signature).
    #[error("signature does not match the signed {domain} (tampered or forged)")]
    Invalid {
        /// The domain the verifier asked for.
        domain: Domain,
    },
}

/// A 64-byte ed25519 signature. Hex in human-readable formats, raw bytes in bincode.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            // serde implements arrays only up to 32 elements, so go through a byte string.
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let bytes: Vec<u8> = if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            hex::decode(text.trim()).map_err(|_| D::Error::custom("signature is not hex"))?
        } else {
            // Bounded: bincode callers decode with a byte limit, and the length is checked next.
            serde_bytes_vec(deserializer)?
        };
        let array: [u8; 64] = bytes.try_into().map_err(|v: Vec<u8>| {
            D::Error::custom(format!("signature has {} bytes, expected 64", v.len()))
        })?;
        Ok(Signature(array))
    }
}

fn serde_bytes_vec<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    struct BytesVisitor;
    impl serde::de::Visitor<'_> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("64 signature bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
    deserializer.deserialize_bytes(BytesVisitor)
}

fn framed(domain: Domain, message: &[u8]) -> Vec<u8> {
    let context = domain.context().as_bytes();
    let mut framed = Vec::with_capacity(PREFIX.len() + context.len() + 1 + message.len());
    framed.extend_from_slice(PREFIX);
    framed.extend_from_slice(context);
    framed.push(0);
    framed.extend_from_slice(message);
    framed
}

pub(crate) fn sign(key: &SigningKey, domain: Domain, message: &[u8]) -> Signature {
    Signature(key.sign(&framed(domain, message)).to_bytes())
}

pub(crate) fn verify(
    key: &VerifyingKey,
    domain: Domain,
    message: &[u8],
    signature: &Signature,
) -> Result<(), SignatureError> {
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    if key.verify_strict(&framed(domain, message), &sig).is_ok() {
        return Ok(());
    }
    // Only on the failure path: tell a misuse (right signer, wrong kind of object) apart
    // from tampering, because the two call for different fixes.
    for other in Domain::ALL.into_iter().filter(|d| *d != domain) {
        if key.verify_strict(&framed(other, message), &sig).is_ok() {
            return Err(SignatureError::WrongDomain {
                expected: domain,
                actual: other,
            });
        }
    }
    Err(SignatureError::Invalid { domain })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use proptest::prelude::*;

    #[test]
    fn signature_for_another_domain_is_named_as_such() {
        let id = Identity::from_seed(&[3u8; 32]);
        let sig = id.sign(Domain::ProgressRecord, b"round 4");
        let err = id
            .public_key()
            .verify(Domain::Manifest, b"round 4", &sig)
            .unwrap_err();
        assert_eq!(
            err,
            SignatureError::WrongDomain {
                expected: Domain::Manifest,
                actual: Domain::ProgressRecord
            }
        );
    }

    #[test]
    fn contexts_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for d in Domain::ALL {
            assert!(seen.insert(d.context()), "{d} used twice");
        }
    }

    proptest! {
        #[test]
        fn sign_verify_round_trip(seed in any::<[u8; 32]>(), msg in proptest::collection::vec(any::<u8>(), 0..256)) {
            let id = Identity::from_seed(&seed);
            let sig = id.sign(Domain::Manifest, &msg);
            prop_assert!(id.public_key().verify(Domain::Manifest, &msg, &sig).is_ok());
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(sig, cfg).unwrap();
            let (back, _): (Signature, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!(back, sig);
        }

        #[test]
        fn any_flipped_bit_is_rejected(seed in any::<[u8; 32]>(), msg in proptest::collection::vec(any::<u8>(), 1..64), bit in any::<usize>()) {
            let id = Identity::from_seed(&seed);
            let sig = id.sign(Domain::UpdateEnvelope, &msg);
            let mut tampered = msg.clone();
            let bit = bit % (tampered.len() * 8);
            tampered[bit / 8] ^= 1 << (bit % 8);
            prop_assert_eq!(
                id.public_key().verify(Domain::UpdateEnvelope, &tampered, &sig),
                Err(SignatureError::Invalid { domain: Domain::UpdateEnvelope })
            );
        }

        #[test]
        fn another_key_is_rejected(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            prop_assume!(a != b);
            let sig = Identity::from_seed(&a).sign(Domain::Roster, b"v2");
            prop_assert!(Identity::from_seed(&b).public_key().verify(Domain::Roster, b"v2", &sig).is_err());
        }
    }
}
