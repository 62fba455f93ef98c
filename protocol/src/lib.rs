//! The medmesh protocol: what peers say to each other and how they combine models.
//!
//! * [`manifest`]: experiment manifests (TOML/JSON), validation, researcher signatures.
//! * [`messages`]: every message peers exchange, with a bounded bincode codec.
//! * [`envelope`]: signed model-update envelopes and chunked payload reception.
//! * [`encoding`]: weight payloads as raw little-endian f32, f16 or int8.
//! * [`layout`]: parameter layouts (names, shapes, dtypes) and their digests.
//! * [`progress`]: signed per-round progress records.
//! * [`provenance`]: signed statements about exported models.
//! * [`fingerprint`]: sites' signed dataset statistics, and the experiment plan (spacing,
//!   normalization, input size) derived from them without pooling images.
//! * [`averaging`] and [`robust`]: the averaging rules, as pure functions over flat slices,
//!   used by the node and the simulator alike.
//! * [`round`]: the round engine: each round's communication graph, computed alike by every
//!   site, and how a site combines what it received. Node and simulator call it, nothing else.
//! * [`stop`]: the manifest's stop rules, agreed on without a coordinator.
//! * [`rng`]: the seeded generator every site draws the round graphs from.
//! * [`accounting`]: Rényi-DP accounting of Gaussian releases, converted to (ε, δ).
//!
//! Errors say what went wrong in their own text, including the cause (they expose no
//! `source()` chain), so a single log line or `{err}` is complete.
//!
//! Pure: no I/O, no async runtime, no ML framework.

pub mod accounting;
pub mod averaging;
pub mod encoding;
pub mod envelope;
pub mod fingerprint;
pub mod layout;
pub mod manifest;
pub mod messages;
pub mod progress;
pub mod provenance;
pub mod rng;
pub mod robust;
pub mod round;
pub mod secagg;
pub mod stop;
pub mod swa;

pub use encoding::WeightEncoding;
pub use envelope::{
    PayloadAssembler, UpdateEnvelope, UpdateError, UpdateExpectation, UpdateHeader,
};
pub use layout::{DType, ParamLayout, TensorSpec};
pub use manifest::{Manifest, ManifestError, ManifestVerifyError, SignedManifest};
pub use messages::{
    Announcement, AnnouncementAnswer, Artifact, ArtifactAnswer, ArtifactRequest, ExchangeState,
    Request, Response, StatusAnswer, StatusQuery, Unavailable, UpdateAnswer, UpdateRequest,
    WireError,
};
pub use progress::{ProgressRecord, SignedProgress};
pub use provenance::{Provenance, ProvenanceError, SignedProvenance};

/// What several modules' tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use medmesh_crypto::{Identity, Member, Role, Roster};

    /// Consortium "demo": an active node (site "a", seed 1) and a researcher (site "lab",
    /// seed 2, also the roster's steward). Returns (node, researcher, roster).
    pub fn node_and_researcher() -> (Identity, Identity, Roster) {
        let node = Identity::from_seed(&[1; 32]);
        let researcher = Identity::from_seed(&[2; 32]);
        let mut roster = Roster::genesis("demo", vec![researcher.public_key()], 1);
        for (key, role, site) in [
            (node.public_key(), Role::Node, "a"),
            (researcher.public_key(), Role::Researcher, "lab"),
        ] {
            roster.upsert_member(Member {
                public_key: key,
                role,
                site: site.into(),
            });
        }
        (node, researcher, roster)
    }
}
