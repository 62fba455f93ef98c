//! Signed per-round progress records: what `medmesh experiment status` shows for each site.

use medmesh_crypto::{
    Domain, Identity, MembershipError, PublicKey, Role, Roster, Signature, SignatureError,
};
use serde::{Deserialize, Serialize};

/// One site's state after a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// The experiment.
    pub experiment_id: String,
    /// Digest of its manifest.
    pub manifest_digest: [u8; 32],
    /// The round just completed.
    pub round: u64,
    /// The reporting node.
    pub node: PublicKey,
    /// Mean training loss of the round.
    pub loss: f32,
    /// Validation metric after averaging (the manifest's `evaluation.metric`).
    pub metric: f32,
    /// The same metric after the manifest's personalization (local fine-tuning of the
    /// consensus model); only in a finished site's last record.
    pub personalized_metric: Option<f32>,
    /// Weight this site contributed to averaging (its sample count).
    pub contribution_weight: f64,
    /// Peers whose updates were averaged in this round.
    pub peers_averaged: u32,
    /// Whether the site has finished the experiment.
    pub finished: bool,
    /// The last training round this site has announced, having met one of the manifest's
    /// stop rules ([`crate::stop`]); every site ends its training at the earliest announced.
    pub stop_after: Option<u64>,
    /// The epsilon this site's privacy releases have spent so far, at the manifest's delta
    /// (only with privacy noise; [`crate::accounting::Budget`]).
    pub privacy_epsilon: Option<f64>,
    /// Wall-clock time of the record, milliseconds since the Unix epoch (sender's clock).
    pub unix_ms: u64,
}

/// A progress record signed by its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedProgress {
    /// The record.
    pub record: ProgressRecord,
    /// Signature in [`Domain::ProgressRecord`].
    pub signature: Signature,
}

/// Why a progress record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProgressError {
    /// The reporting key is not an active node of the roster.
    #[error("progress reporter not allowed: {0}")]
    Reporter(MembershipError),
    /// The signature does not verify.
    #[error("progress signature rejected: {0}")]
    Signature(SignatureError),
}

impl From<MembershipError> for ProgressError {
    fn from(e: MembershipError) -> Self {
        Self::Reporter(e)
    }
}

impl From<SignatureError> for ProgressError {
    fn from(e: SignatureError) -> Self {
        Self::Signature(e)
    }
}

impl SignedProgress {
    /// Signs `record` as `node` (whose key replaces `record.node`).
    pub fn sign(mut record: ProgressRecord, node: &Identity) -> Self {
        record.node = node.public_key();
        let signature = node.sign(Domain::ProgressRecord, &canonical(&record));
        Self { record, signature }
    }

    /// Checks that an active node signed it.
    pub fn verify(&self, roster: &Roster) -> Result<(), ProgressError> {
        roster.authorize(&self.record.node, Role::Node)?;
        self.record.node.verify(
            Domain::ProgressRecord,
            &canonical(&self.record),
            &self.signature,
        )?;
        Ok(())
    }
}

fn canonical(record: &ProgressRecord) -> Vec<u8> {
    bincode::serde::encode_to_vec(record, bincode::config::standard())
        .unwrap_or_else(|e| unreachable!("encoding a record into memory cannot fail: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_crypto::Member;

    #[test]
    fn only_active_nodes_report() {
        let node = Identity::from_seed(&[1; 32]);
        let researcher = Identity::from_seed(&[2; 32]);
        let mut roster = Roster::genesis("demo", vec![researcher.public_key()], 1);
        roster.upsert_member(Member {
            public_key: node.public_key(),
            role: Role::Node,
            site: "a".into(),
        });
        roster.upsert_member(Member {
            public_key: researcher.public_key(),
            role: Role::Researcher,
            site: "lab".into(),
        });
        let record = ProgressRecord {
            experiment_id: "e".into(),
            manifest_digest: [0; 32],
            round: 1,
            node: node.public_key(),
            loss: 0.3,
            metric: 0.8,
            personalized_metric: None,
            contribution_weight: 10.0,
            peers_averaged: 2,
            finished: false,
            stop_after: Some(7),
            privacy_epsilon: Some(1.5),
            unix_ms: 0,
        };
        let signed = SignedProgress::sign(record.clone(), &node);
        assert!(signed.verify(&roster).is_ok());
        let mut forged = signed.clone();
        forged.record.metric = 0.99;
        assert!(matches!(
            forged.verify(&roster),
            Err(ProgressError::Signature(_))
        ));
        let by_researcher = SignedProgress::sign(record, &researcher);
        assert!(matches!(
            by_researcher.verify(&roster),
            Err(ProgressError::Reporter(_))
        ));
    }
}
