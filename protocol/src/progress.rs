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
    /// The compute device the site trains on (`cpu`, `cuda:0`, ...), at most
    /// [`MAX_DEVICE_LEN`] bytes.
    pub device: String,
    /// Model-update payload bytes this site has served to its peers in this experiment.
    pub bytes_sent: u64,
    /// Model-update payload bytes this site has fetched from its peers in this experiment.
    pub bytes_received: u64,
    /// How far this round's averaging moved the site's model: the root mean square of
    /// (averaged - local) over the shared weights. It falls as the sites agree: the
    /// consensus distance as one site can see it. `None` when nothing was averaged.
    pub averaging_shift: Option<f32>,
    /// Set when the site's experiment failed and stopped: why, in words, at most
    /// [`MAX_FAILURE_LEN`] bytes. The site sends no further records for it.
    pub failure: Option<String>,
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

/// Longest [`ProgressRecord::device`] accepted, in bytes.
pub const MAX_DEVICE_LEN: usize = 64;

/// Longest [`ProgressRecord::failure`] accepted, in bytes.
pub const MAX_FAILURE_LEN: usize = 1024;

/// Why a progress record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProgressError {
    /// The reporting key is not an active node of the roster.
    #[error("progress reporter not allowed: {0}")]
    Reporter(MembershipError),
    /// The signature does not verify.
    #[error("progress signature rejected: {0}")]
    Signature(SignatureError),
    /// A text field is longer than the protocol allows.
    #[error("progress record field {field} is {len} bytes, over the limit of {max}")]
    Oversized {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
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
        let r = &self.record;
        let failure = r.failure.as_deref().map_or(0, str::len);
        for (field, len, max) in [
            ("device", r.device.len(), MAX_DEVICE_LEN),
            ("failure", failure, MAX_FAILURE_LEN),
        ] {
            if len > max {
                return Err(ProgressError::Oversized { field, len, max });
            }
        }
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

    #[test]
    fn only_active_nodes_report() {
        let (node, researcher, roster) = crate::test_support::node_and_researcher();
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
            device: "cpu".into(),
            bytes_sent: 10,
            bytes_received: 20,
            averaging_shift: Some(0.01),
            failure: None,
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
        let mut long = record.clone();
        long.failure = Some("x".repeat(MAX_FAILURE_LEN + 1));
        assert!(matches!(
            SignedProgress::sign(long, &node).verify(&roster),
            Err(ProgressError::Oversized {
                field: "failure",
                ..
            })
        ));
        let by_researcher = SignedProgress::sign(record, &researcher);
        assert!(matches!(
            by_researcher.verify(&roster),
            Err(ProgressError::Reporter(_))
        ));
    }
}
