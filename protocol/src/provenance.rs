//! Signed provenance of an exported model: which experiment, which sites contributed, how
//! many rounds, how well it scored, and the hash of the model file it describes.

use medmesh_crypto::{
    Domain, Identity, MembershipError, PublicKey, Role, Roster, Signature, SignatureError,
};
use serde::{Deserialize, Serialize};

/// What a node states about the model it exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The experiment.
    pub experiment_id: String,
    /// Digest of the signed manifest the experiment ran.
    #[serde(with = "hex_digest")]
    pub manifest_digest: [u8; 32],
    /// The exporting node.
    pub node: PublicKey,
    /// Communication rounds completed.
    pub rounds_completed: u64,
    /// Every site whose update was averaged into this model at least once.
    pub contributors: Vec<PublicKey>,
    /// Validation metric on the exporting site's data.
    pub final_metric: f32,
    /// Last training loss.
    pub final_loss: f32,
    /// BLAKE3 of the exported model file.
    #[serde(with = "hex_digest")]
    pub model_hash: [u8; 32],
    /// What the exporting site's privacy releases spent, with privacy noise on.
    pub privacy: Option<PrivacySpent>,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// The differential privacy a site's releases spent in an experiment
/// ([`crate::accounting::Budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    /// Releases (training rounds whose update left the site).
    pub releases: u64,
    /// Epsilon they spent, at `delta`.
    pub epsilon: f64,
    /// The delta of the guarantee.
    pub delta: f64,
    /// The manifest's target, if it set one.
    pub target_epsilon: Option<f64>,
    /// Noise standard deviation over the clip norm.
    pub noise_multiplier: f64,
    /// The L2 bound of each release's change.
    pub clip_norm: f64,
}

/// A provenance record and its node's signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedProvenance {
    /// The statement.
    pub provenance: Provenance,
    /// The node's signature over its canonical bytes.
    pub signature: Signature,
}

/// Why a provenance record or the model it describes was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProvenanceError {
    /// The signer is not an active node of the roster.
    #[error("provenance signer not allowed: {0}")]
    Signer(MembershipError),
    /// The signature does not verify.
    #[error("provenance signature rejected: {0}")]
    Signature(SignatureError),
    /// The model file is not the one the record describes.
    #[error("model file hash {got} does not match the provenance record's {expected}")]
    ModelMismatch {
        /// Hash in the record.
        expected: String,
        /// Hash of the file.
        got: String,
    },
}

impl SignedProvenance {
    /// Signs `provenance` as `node` (whose key replaces `provenance.node`).
    pub fn sign(mut provenance: Provenance, node: &Identity) -> Self {
        provenance.node = node.public_key();
        let signature = node.sign(Domain::Provenance, &canonical(&provenance));
        Self {
            provenance,
            signature,
        }
    }

    /// Checks that an active node of `roster` signed it and that `model` is the file it
    /// describes.
    pub fn verify(&self, roster: &Roster, model: &[u8]) -> Result<(), ProvenanceError> {
        roster
            .authorize(&self.provenance.node, Role::Node)
            .map_err(ProvenanceError::Signer)?;
        self.provenance
            .node
            .verify(
                Domain::Provenance,
                &canonical(&self.provenance),
                &self.signature,
            )
            .map_err(ProvenanceError::Signature)?;
        let got = blake3::hash(model);
        if got.as_bytes() != &self.provenance.model_hash {
            return Err(ProvenanceError::ModelMismatch {
                expected: hex::encode(self.provenance.model_hash),
                got: got.to_hex().to_string(),
            });
        }
        Ok(())
    }
}

fn canonical(p: &Provenance) -> Vec<u8> {
    bincode::serde::encode_to_vec(p, bincode::config::standard())
        .unwrap_or_else(|e| unreachable!("encoding a record into memory cannot fail: {e}"))
}

/// Digests as hex in human-readable formats (the provenance file is JSON), raw bytes otherwise.
mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(d))
        } else {
            serde::Serialize::serialize(d, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        use serde::de::Error;
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            let bytes =
                hex::decode(text.trim()).map_err(|_| D::Error::custom("digest is not hex"))?;
            bytes
                .try_into()
                .map_err(|_| D::Error::custom("digest is not 32 bytes"))
        } else {
            <[u8; 32]>::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_crypto::Member;

    #[test]
    fn signed_provenance_survives_json_and_catches_tampering() {
        let node = Identity::from_seed(&[1; 32]);
        let other = Identity::from_seed(&[2; 32]);
        let mut roster = Roster::genesis("demo", vec![node.public_key()], 1);
        roster.upsert_member(Member {
            public_key: node.public_key(),
            role: Role::Node,
            site: "a".into(),
        });
        let model = b"model bytes".to_vec();
        let p = Provenance {
            experiment_id: "e".into(),
            manifest_digest: [9; 32],
            node: node.public_key(),
            rounds_completed: 10,
            contributors: vec![node.public_key(), other.public_key()],
            final_metric: 0.9,
            final_loss: 0.1,
            model_hash: *blake3::hash(&model).as_bytes(),
            privacy: None,
            unix_ms: 1,
        };
        let signed = SignedProvenance::sign(p, &node);
        let json = serde_json::to_string_pretty(&signed).unwrap();
        let back: SignedProvenance = serde_json::from_str(&json).unwrap();
        assert_eq!(back, signed);
        back.verify(&roster, &model).unwrap();
        assert!(matches!(
            back.verify(&roster, b"other model"),
            Err(ProvenanceError::ModelMismatch { .. })
        ));
        let mut forged = back.clone();
        forged.provenance.rounds_completed = 11;
        assert!(matches!(
            forged.verify(&roster, &model),
            Err(ProvenanceError::Signature(_))
        ));
        let by_outsider = SignedProvenance::sign(back.provenance.clone(), &other);
        assert!(matches!(
            by_outsider.verify(&roster, &model),
            Err(ProvenanceError::Signer(_))
        ));
    }
}
